#!/usr/bin/env python3
"""Generate reference outputs from Flower's own aggregation code for
aggregation/tests/flower_reference.rs.

    python3 -m venv /tmp/venv-flwr && /tmp/venv-flwr/bin/pip install flwr numpy
    /tmp/venv-flwr/bin/python scripts/gen_flower_reference.py > aggregation/tests/data/flower_reference.json

Robust rules call flwr.server.strategy.aggregate directly; the server
optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi) run the strategies'
aggregate_fit on fake FitRes over several rounds. Inputs are client *weights*
(as Flower sees them); the Rust test turns them into deltas (w - global).
Model: tensors "a" [3, 4] and "b" [5], flattened in canonical order (a, b).
"""
import json

import flwr
import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.server.strategy import aggregate as agg

SHAPES = {"a": [3, 4], "b": [5]}
rng = np.random.default_rng(20240611)


def rand_model(scale=1.0):
    return [rng.normal(0, scale, size=SHAPES["a"]).astype(np.float32),
            rng.normal(0, scale, size=SHAPES["b"]).astype(np.float32)]


def flat(m):
    return [float(x) for x in np.concatenate([np.asarray(l, dtype=np.float32).ravel() for l in m])]


def clients(global_w, k, outliers=0, scale=0.1):
    res = []
    for i in range(k):
        d = rand_model(scale)
        if i < outliers:
            d = [x * 0 + np.float32(50.0) * (1 + i) for x in d]
        w = [(g + x).astype(np.float32) for g, x in zip(global_w, d)]
        res.append((w, int(rng.integers(1, 500))))
    return res


def robust_case(name, strategy, params, fn, k, outliers=0):
    g = rand_model()
    res = clients(g, k, outliers)
    out = fn(res)
    return {"name": name, "strategy": strategy, "params": params,
            "rounds": [{"global": flat(g),
                        "updates": [{"weights": flat(w), "num_examples": n} for w, n in res],
                        "expected": flat(out)}]}


def fitres(w, n):
    return FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(w),
                  num_examples=n, metrics={})


def opt_case(name, strategy, params, make, rounds=3, k=4):
    g = rand_model()
    strat = make(ndarrays_to_parameters(g))
    out_rounds = []
    for r in range(1, rounds + 1):
        res = clients(g, k)
        new, _ = strat.aggregate_fit(r, [(None, fitres(w, n)) for w, n in res], [])
        new_w = parameters_to_ndarrays(new)
        out_rounds.append({"global": flat(g),
                           "updates": [{"weights": flat(w), "num_examples": n} for w, n in res],
                           "expected": flat(new_w)})
        g = new_w
    return {"name": name, "strategy": strategy, "params": params, "rounds": out_rounds}


cases = [
    robust_case("fedavg_k5", "fedavg", {}, agg.aggregate, 5),
    robust_case("median_k5", "fedmedian", {}, agg.aggregate_median, 5, outliers=1),
    robust_case("median_k6", "fedmedian", {}, agg.aggregate_median, 6, outliers=2),
    robust_case("trimmed_k10_b02", "fedtrimmedavg", {"beta": "0.2"},
                lambda r: agg.aggregate_trimmed_avg(r, 0.2), 10, outliers=2),
    robust_case("trimmed_k7_b03", "fedtrimmedavg", {"beta": "0.3"},
                lambda r: agg.aggregate_trimmed_avg(r, 0.3), 7, outliers=1),
    robust_case("krum_k7_f2", "krum", {"num_malicious_clients": "2"},
                lambda r: agg.aggregate_krum(r, 2, 0), 7, outliers=2),
    robust_case("multikrum_k7_f1_keep3", "krum", {"num_malicious": "1", "to_keep": "3"},
                lambda r: agg.aggregate_krum(r, 1, 3), 7, outliers=1),
    robust_case("bulyan_k7_f1", "bulyan", {"num_malicious_clients": "1"},
                lambda r: agg.aggregate_bulyan(list(r), 1, agg.aggregate_krum, to_keep=0), 7, outliers=1),
    robust_case("bulyan_k11_f2", "bulyan", {"num_malicious": "2"},
                lambda r: agg.aggregate_bulyan(list(r), 2, agg.aggregate_krum, to_keep=0), 11, outliers=2),
    opt_case("fedavgm_m09", "fedavgm", {"server_learning_rate": "1.0", "server_momentum": "0.9"},
             lambda p: FedAvgM(initial_parameters=p, server_learning_rate=1.0, server_momentum=0.9)),
    opt_case("fedavgm_lr05", "fedavgm", {"server_learning_rate": "0.5"},
             lambda p: FedAvgM(initial_parameters=p, server_learning_rate=0.5)),
    opt_case("fedadagrad_default", "fedadagrad", {}, lambda p: FedAdagrad(initial_parameters=p)),
    opt_case("fedadam_default", "fedadam", {}, lambda p: FedAdam(initial_parameters=p)),
    opt_case("fedadam_custom", "fedadam", {"eta": "0.05", "beta_1": "0.8", "beta_2": "0.95", "tau": "0.001"},
             lambda p: FedAdam(initial_parameters=p, eta=0.05, beta_1=0.8, beta_2=0.95, tau=0.001)),
    opt_case("fedyogi_default", "fedyogi", {}, lambda p: FedYogi(initial_parameters=p)),
]

print(json.dumps({"generator": f"flwr {flwr.__version__}, numpy {np.__version__}",
                  "shapes": SHAPES, "cases": cases}, indent=1))
