#!/usr/bin/env python3
"""Write the demo data splits committed under data/ (deterministic, stdlib only).

Usage:  python3 scripts/split_data.py [--data DIR] [--check]

  --data DIR   repository data folder (default: data/ next to this script's parent)
  --check      do not write; exit 1 if a committed split differs from what
               this script would write

Splits (documented in data/README.md):

* breast_cancer_wisconsin/splits/
    global_test.csv   stratified 20 % hold-out (never given to a site)
    hospital_a.csv    large, mostly benign      (label- and size-skewed)
    hospital_b.csv    medium, about half malignant
    hospital_c.csv    small, mostly malignant
* opt_preterm_4hospitals/splits/
    global_test.csv   15 % of every hospital, stratified by `preterm`
    <SITE>/train.csv  the hospital's training rows   (SITE in KY, MN, MS, NY)
    <SITE>/test.csv   20 % of the rest, the hospital's local hold-out

Rows are copied as text, never reformatted; every file keeps the header and
the original row order within it.
"""

import argparse
import csv
import io
import random
import sys
from pathlib import Path

SEED = 20240611

# Benign / malignant rows per WDBC site, after the global test hold-out
# (286 benign and 170 malignant remain).
WDBC_SITES = [
    ("hospital_a", 200, 30),
    ("hospital_b", 66, 74),
    ("hospital_c", 20, 66),
]
WDBC_TEST_FRACTION = 0.2
OPT_GLOBAL_FRACTION = 0.15
OPT_LOCAL_FRACTION = 0.2
OPT_SITES = ["KY", "MN", "MS", "NY"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def render(header, rows):
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue()


def stratified_take(indices, labels, fraction, rng):
    """Take round(fraction * n_c) indices of every class c; return (taken, rest)."""
    taken, rest = [], []
    for c in sorted(set(labels[i] for i in indices)):
        group = [i for i in indices if labels[i] == c]
        rng.shuffle(group)
        k = round(len(group) * fraction)
        taken += group[:k]
        rest += group[k:]
    return sorted(taken), sorted(rest)


def wdbc(data):
    src = data / "breast_cancer_wisconsin"
    header, rows = read_csv(src / "wdbc.csv")
    label = header.index("malignant")
    labels = [r[label] for r in rows]
    rng = random.Random(SEED)
    test, rest = stratified_take(list(range(len(rows))), labels, WDBC_TEST_FRACTION, rng)
    benign = [i for i in rest if labels[i] == "0"]
    malignant = [i for i in rest if labels[i] == "1"]
    rng.shuffle(benign)
    rng.shuffle(malignant)
    need_b = sum(b for _, b, _ in WDBC_SITES)
    need_m = sum(m for _, _, m in WDBC_SITES)
    if (need_b, need_m) != (len(benign), len(malignant)):
        sys.exit(f"WDBC site sizes {need_b}/{need_m} do not use all {len(benign)}/{len(malignant)} rows")
    files = {src / "splits" / "global_test.csv": render(header, [rows[i] for i in test])}
    for name, nb, nm in WDBC_SITES:
        take = sorted(benign[:nb] + malignant[:nm])
        benign, malignant = benign[nb:], malignant[nm:]
        files[src / "splits" / f"{name}.csv"] = render(header, [rows[i] for i in take])
    return files


def opt(data):
    src = data / "opt_preterm_4hospitals"
    header, rows = read_csv(src / "opt_model.csv")
    site_col, label = header.index("site"), header.index("preterm")
    labels = [r[label] for r in rows]
    rng = random.Random(SEED + 1)
    files = {}
    global_test = []
    for site in OPT_SITES:
        idx = [i for i, r in enumerate(rows) if r[site_col] == site]
        if not idx:
            sys.exit(f"OPT: no rows for site {site}")
        held, rest = stratified_take(idx, labels, OPT_GLOBAL_FRACTION, rng)
        local_test, train = stratified_take(rest, labels, OPT_LOCAL_FRACTION, rng)
        global_test += held
        files[src / "splits" / site / "train.csv"] = render(header, [rows[i] for i in train])
        files[src / "splits" / site / "test.csv"] = render(header, [rows[i] for i in local_test])
    files[src / "splits" / "global_test.csv"] = render(header, [rows[i] for i in sorted(global_test)])
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    files = {**wdbc(args.data), **opt(args.data)}
    differ = []
    for path, text in sorted(files.items()):
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                differ.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        n = text.count("\n") - 1
        print(f"{path.relative_to(args.data)}: {n} rows")
    if differ:
        for p in differ:
            print(f"differs: {p}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
