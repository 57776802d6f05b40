//! Tabular data from a CSV file with a header row.
//!
//! * Every column except the label column and `drop_columns` (ids, site
//!   codes, …) is a feature and must be numeric.
//! * The label column holds integer class indices `0, 1, …` (`1.0` is
//!   accepted as `1`). A missing label is always an error.
//! * Missing feature values are the empty cell and (case-insensitively)
//!   `NA`, `N/A`, `NaN`, `null`, `?`. With [`MissingValues::Reject`] (the
//!   default) the first one is an error naming line and column; with
//!   [`MissingValues::ImputeMean`] it becomes the *local training split's*
//!   mean of that column (raw units, before anything else: the statistics
//!   below are of the imputed data).
//! * Infinite values, ragged rows and bad quoting are errors.
//!
//! # Standardisation
//!
//! The raw (imputed) features of the split stay in memory
//! ([`TabularData`]); the statistics of the raw training split
//! ([`TabularData::stats`]: count, Σx, Σx²) are what the site reports to
//! the federation. Features are standardised (`(x − mean) / std`) with a
//! [`FeatureScaling`]:
//!
//! * the federation's pooled scaling when an offer carries one
//!   ([`TabularData::standardize`]; it must name this file's feature columns
//!   in the same order);
//! * otherwise the local one ([`TabularData::scaling`], the same formula
//!   over this site's statistics only: population std, a constant column
//!   keeps `std = 1`), which [`TabularData::data`] is standardised with.
//!
//! Training and validation rows always use the same scaling; a test file is
//! standardised with a given scaling by [`load_tabular_test`] (missing test
//! values become the scaling's mean, i.e. 0).

use std::path::PathBuf;

use fedlink_protocol::{FeatureScaling, FeatureStats};
use serde::{Deserialize, Serialize};

use super::{
    DataError, FingerprintBuilder, LocalData, MAX_CLASSES, MAX_FILE_BYTES, MAX_VALUES, SampleShape,
    Samples, Targets, check_fraction, read_limited, split_indices,
};

/// Most columns a CSV may have.
pub const MAX_COLUMNS: usize = 1 << 16;

/// What to do with a missing feature value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingValues {
    /// Refuse the file, naming the first missing cell.
    #[default]
    Reject,
    /// Replace with the training split's column mean.
    ImputeMean,
}

fn default_validation_fraction() -> f64 {
    0.2
}

/// How to read a CSV dataset (a `[data]` table of `site.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TabularConfig {
    /// The CSV file.
    pub path: PathBuf,
    /// Name of the label column.
    pub label_column: String,
    /// Columns to ignore (identifiers, site codes, leaked outcomes).
    #[serde(default)]
    pub drop_columns: Vec<String>,
    /// Missing-value policy.
    #[serde(default)]
    pub missing: MissingValues,
    /// Fraction of rows held out for local validation, `[0, 0.9]`.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Seed of the train/validation split.
    #[serde(default)]
    pub split_seed: u64,
}

impl TabularConfig {
    /// A config with the defaults: reject missing values, 20 % validation,
    /// split seed 0.
    pub fn new(path: impl Into<PathBuf>, label_column: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            label_column: label_column.into(),
            drop_columns: Vec::new(),
            missing: MissingValues::Reject,
            validation_fraction: default_validation_fraction(),
            split_seed: 0,
        }
    }
}

/// The parsed CSV: features row-major with NaN marking missing cells.
struct Table {
    features: Vec<String>,
    x: Vec<f32>,
    y: Vec<u32>,
}

impl Table {
    fn row(&self, r: usize) -> &[f32] {
        let f = self.features.len();
        &self.x[r * f..(r + 1) * f]
    }

    fn rows(&self) -> usize {
        self.y.len()
    }
}

fn is_missing(cell: &str) -> bool {
    let c = cell.trim();
    c.is_empty()
        || ["na", "n/a", "nan", "null", "?"]
            .iter()
            .any(|m| c.eq_ignore_ascii_case(m))
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn parse_label(cell: &str) -> Option<u32> {
    let c = cell.trim();
    if let Ok(v) = c.parse::<u32>() {
        return (v < MAX_CLASSES).then_some(v);
    }
    let f = c.parse::<f64>().ok()?;
    (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < f64::from(MAX_CLASSES))
        .then_some(f as u32)
}

fn parse(cfg: &TabularConfig, bytes: &[u8]) -> Result<Table, DataError> {
    let path = &cfg.path;
    let csv_err = |line: u64, e: &dyn std::fmt::Display| DataError::Csv {
        path: path.clone(),
        line,
        message: e.to_string(),
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| csv_err(1, &e))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    if header.len() > MAX_COLUMNS {
        return Err(DataError::TooLarge {
            what: format!("{} columns", path.display()),
            size: header.len() as u64,
            limit: MAX_COLUMNS as u64,
        });
    }
    let available = header.join(",");
    let find = |name: &str| -> Result<usize, DataError> {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| DataError::MissingColumn {
                path: path.clone(),
                column: name.to_owned(),
                available: available.clone(),
            })
    };
    let label = find(&cfg.label_column)?;
    let mut dropped = vec![false; header.len()];
    dropped[label] = true;
    for d in &cfg.drop_columns {
        dropped[find(d)?] = true;
    }
    for (i, h) in header.iter().enumerate() {
        if header[..i].contains(h) {
            return Err(DataError::Csv {
                path: path.clone(),
                line: 1,
                message: format!("column {h:?} appears twice in the header"),
            });
        }
    }
    let feature_cols: Vec<usize> = (0..header.len()).filter(|&i| !dropped[i]).collect();
    if feature_cols.is_empty() {
        return Err(DataError::Config(format!(
            "{}: no feature columns left after dropping the label and drop_columns",
            path.display()
        )));
    }
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i as u64 + 2;
        let record = record.map_err(|e| {
            let line = e.position().map_or(line, |p| p.line());
            csv_err(line, &e)
        })?;
        if record.len() != header.len() {
            return Err(DataError::Csv {
                path: path.clone(),
                line,
                message: format!("{} fields, header has {}", record.len(), header.len()),
            });
        }
        if x.len() + feature_cols.len() > MAX_VALUES {
            return Err(DataError::TooLarge {
                what: format!("{} values", path.display()),
                size: (x.len() + feature_cols.len()) as u64,
                limit: MAX_VALUES as u64,
            });
        }
        let cell = record.get(label).unwrap_or_default();
        let class = parse_label(cell).ok_or_else(|| DataError::BadLabel {
            path: path.clone(),
            line,
            value: truncate(cell),
        })?;
        y.push(class);
        for &c in &feature_cols {
            let cell = record.get(c).unwrap_or_default();
            if is_missing(cell) {
                if cfg.missing == MissingValues::Reject {
                    return Err(DataError::MissingValue {
                        path: path.clone(),
                        line,
                        column: header[c].clone(),
                    });
                }
                x.push(f32::NAN);
                continue;
            }
            match cell.trim().parse::<f32>() {
                Ok(v) if v.is_finite() => x.push(v),
                _ => {
                    return Err(DataError::NonNumeric {
                        path: path.clone(),
                        line,
                        column: header[c].clone(),
                        value: truncate(cell),
                    });
                }
            }
        }
    }
    if y.is_empty() {
        return Err(DataError::Empty(format!(
            "{}: no data rows",
            path.display()
        )));
    }
    Ok(Table {
        features: feature_cols.iter().map(|&c| header[c].clone()).collect(),
        x,
        y,
    })
}

fn read(cfg: &TabularConfig) -> Result<(Table, FingerprintBuilder), DataError> {
    let bytes = read_limited(&cfg.path, MAX_FILE_BYTES)?;
    // Locations are not part of the fingerprint: the same file read the same
    // way fingerprints the same wherever it lives.
    let mut settings = cfg.clone();
    settings.path = PathBuf::new();
    let mut fp = FingerprintBuilder::new("tabular", &settings);
    let name = cfg
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    fp.file(&name, &bytes);
    Ok((parse(cfg, &bytes)?, fp))
}

/// Longest list of feature names quoted in an error message.
const MAX_QUOTED_NAMES: usize = 400;

fn quote_names(names: &[String]) -> String {
    let s = format!("{names:?}");
    if s.len() <= MAX_QUOTED_NAMES {
        return s;
    }
    let mut end = MAX_QUOTED_NAMES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Check that `scaling` names exactly `features`, in order.
fn check_features(features: &[String], scaling: &FeatureScaling) -> Result<(), DataError> {
    if scaling.features == features {
        return Ok(());
    }
    Err(DataError::ScalingMismatch {
        scaling: quote_names(&scaling.features),
        local: quote_names(features),
    })
}

/// Standardise row-major raw features (NaN: missing → the scaling's mean,
/// 0) with `scaling` (already checked against the columns).
fn transform(x: &[f32], scaling: &FeatureScaling) -> Vec<f32> {
    let f = scaling.mean.len();
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let j = i % f;
            if v.is_nan() {
                0.0
            } else {
                ((f64::from(v) - scaling.mean[j]) / scaling.std[j]) as f32
            }
        })
        .collect()
}

/// One part of the split in raw units: features row-major, labels.
#[derive(Clone, Debug)]
struct RawRows {
    x: Vec<f32>,
    y: Vec<u32>,
}

impl RawRows {
    fn of(table: &Table, rows: &[usize]) -> Self {
        let mut x = Vec::with_capacity(rows.len() * table.features.len());
        for &r in rows {
            x.extend_from_slice(table.row(r));
        }
        Self {
            x,
            y: rows.iter().map(|&r| table.y[r]).collect(),
        }
    }

    fn samples(&self, scaling: &FeatureScaling) -> Result<Samples, DataError> {
        Samples::new(
            SampleShape::Features(scaling.features.len()),
            transform(&self.x, scaling),
            Targets::Classes(self.y.clone()),
        )
    }
}

/// Replace missing cells (NaN) with the column mean of the training rows
/// (0 for a column with no value there).
fn impute(table: &mut Table, train: &[usize]) {
    let f = table.features.len();
    let mut sum = vec![0f64; f];
    let mut count = vec![0u64; f];
    for &r in train {
        for (j, v) in table.row(r).iter().enumerate() {
            if !v.is_nan() {
                sum[j] += f64::from(*v);
                count[j] += 1;
            }
        }
    }
    let mean: Vec<f32> = sum
        .iter()
        .zip(&count)
        .map(|(s, &c)| if c == 0 { 0.0 } else { (s / c as f64) as f32 })
        .collect();
    for (i, v) in table.x.iter_mut().enumerate() {
        if v.is_nan() {
            *v = mean[i % f];
        }
    }
}

/// Count, Σx and Σx² per feature of row-major `x` (no missing values).
fn feature_stats(features: &[String], x: &[f32]) -> FeatureStats {
    let f = features.len();
    let mut sum = vec![0f64; f];
    let mut sum_sq = vec![0f64; f];
    for row in x.chunks_exact(f) {
        for ((s, q), &v) in sum.iter_mut().zip(&mut sum_sq).zip(row) {
            let v = f64::from(v);
            *s += v;
            *q += v * v;
        }
    }
    FeatureStats {
        features: features.to_vec(),
        count: (x.len() / f) as u64,
        sum,
        sum_sq,
    }
}

/// A loaded tabular dataset: the split in raw units, the statistics of its
/// training part, and the split standardised with those local statistics.
#[derive(Clone, Debug)]
pub struct TabularData {
    /// Train/validation samples standardised with [`TabularData::scaling`],
    /// and the fingerprint.
    pub data: LocalData,
    /// The local standardisation (from [`TabularData::stats`] alone).
    pub scaling: FeatureScaling,
    /// Count, Σx, Σx² of the raw (imputed) training split: what the site
    /// reports to the federation.
    pub stats: FeatureStats,
    train: RawRows,
    validation: RawRows,
}

impl TabularData {
    /// Feature column names, in order.
    pub fn features(&self) -> &[String] {
        &self.scaling.features
    }

    /// Check that `scaling` can be applied: it names this dataset's feature
    /// columns, in order.
    pub fn check_scaling(&self, scaling: &FeatureScaling) -> Result<(), DataError> {
        check_features(self.features(), scaling)
    }

    /// The split standardised with `scaling` (e.g. the federation's) instead
    /// of the local statistics; the raw values are read again, nothing is
    /// re-parsed.
    pub fn standardize(&self, scaling: &FeatureScaling) -> Result<LocalData, DataError> {
        self.check_scaling(scaling)?;
        Ok(LocalData {
            train: self.train.samples(scaling)?,
            validation: self.validation.samples(scaling)?,
            fingerprint: self.data.fingerprint.clone(),
        })
    }
}

/// Read, validate, split and standardise (locally) a CSV dataset.
pub fn load_tabular(cfg: &TabularConfig) -> Result<TabularData, DataError> {
    check_fraction(cfg.validation_fraction)?;
    let (mut table, fp) = read(cfg)?;
    let (train, valid) = split_indices(table.rows(), cfg.validation_fraction, cfg.split_seed);
    if train.is_empty() {
        return Err(DataError::Empty(format!(
            "{}: no training rows left after the split",
            cfg.path.display()
        )));
    }
    impute(&mut table, &train);
    let train = RawRows::of(&table, &train);
    let validation = RawRows::of(&table, &valid);
    let stats = feature_stats(&table.features, &train.x);
    let scaling = FeatureScaling::pooled([&stats]).map_err(|e| {
        DataError::Config(format!(
            "{}: the training columns cannot be standardised: {e}",
            cfg.path.display()
        ))
    })?;
    Ok(TabularData {
        data: LocalData {
            train: train.samples(&scaling)?,
            validation: validation.samples(&scaling)?,
            fingerprint: fp.finish(),
        },
        scaling,
        stats,
        train,
        validation,
    })
}

/// Read every row of a test CSV (same columns as the training file) and
/// standardise it with `scaling` (the training data's, or the
/// federation's). The split settings of `cfg` are ignored.
pub fn load_tabular_test(
    cfg: &TabularConfig,
    scaling: &FeatureScaling,
) -> Result<Samples, DataError> {
    let (table, _) = read(cfg)?;
    check_features(&table.features, scaling)
        .map_err(|e| DataError::Config(format!("{}: {e}", cfg.path.display())))?;
    RawRows::of(&table, &(0..table.rows()).collect::<Vec<_>>()).samples(scaling)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn cfg(path: PathBuf) -> TabularConfig {
        let mut c = TabularConfig::new(path, "y");
        c.validation_fraction = 0.0;
        c
    }

    #[test]
    fn reads_standardises_and_drops_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.csv",
            "id,a,b,y\n1,1,10,0\n2,2,10,1\n3,3,10,1\n",
        );
        let mut c = cfg(p);
        c.drop_columns = vec!["id".into()];
        let t = load_tabular(&c).unwrap();
        assert_eq!(t.scaling.features, vec!["a", "b"]);
        assert_eq!(t.scaling.mean, vec![2.0, 10.0]);
        assert_eq!(t.scaling.std[1], 1.0, "constant column keeps std 1");
        // Raw statistics of the training split, for the federation.
        assert_eq!(t.stats.features, vec!["a", "b"]);
        assert_eq!(t.stats.count, 3);
        assert_eq!(t.stats.sum, vec![6.0, 30.0]);
        assert_eq!(t.stats.sum_sq, vec![14.0, 300.0]);
        let x = t.data.train.features();
        let s = (2.0f32 / 3.0).sqrt();
        assert!((x[0] + 1.0 / s).abs() < 1e-6);
        assert_eq!(x[1], 0.0);
        assert_eq!(t.data.train.targets(), &Targets::Classes(vec![0, 1, 1]));
        assert_eq!(t.data.fingerprint.0.len(), 64);
        // The fingerprint covers the configuration too.
        let mut c2 = c.clone();
        c2.split_seed = 9;
        assert_ne!(
            load_tabular(&c2).unwrap().data.fingerprint,
            t.data.fingerprint
        );
        // …but not the file's location.
        let sub = dir.path().join("elsewhere");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::copy(&c.path, sub.join("a.csv")).unwrap();
        let mut moved = c.clone();
        moved.path = sub.join("a.csv");
        assert_eq!(
            load_tabular(&moved).unwrap().data.fingerprint,
            t.data.fingerprint
        );
    }

    #[test]
    fn imputes_with_training_mean() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.csv", "a,y\n1,0\nNA,1\n3,0\n,1\n");
        let mut c = cfg(p.clone());
        assert!(matches!(
            load_tabular(&c),
            Err(DataError::MissingValue { line: 3, .. })
        ));
        c.missing = MissingValues::ImputeMean;
        let t = load_tabular(&c).unwrap();
        // Imputed raw column: 1, 2, 3, 2 (mean 2, population std √0.5).
        assert_eq!(t.scaling.mean, vec![2.0]);
        assert_eq!(t.stats.sum, vec![8.0]);
        assert_eq!(t.stats.sum_sq, vec![18.0]);
        let s = 0.5f64.sqrt();
        let want = [-1.0 / s, 0.0, 1.0 / s, 0.0];
        for (x, w) in t.data.train.features().iter().zip(want) {
            assert!((f64::from(*x) - w).abs() < 1e-6, "{x} vs {w}");
        }
    }

    #[test]
    fn rejects_malformed_files_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        type Check = fn(&DataError) -> bool;
        let cases: Vec<(&str, Check)> = vec![
            (
                "a,b\n1,2\n",
                |e| matches!(e, DataError::MissingColumn { column, .. } if column == "y"),
            ),
            (
                "a,y\n1,0\nabc,1\n",
                |e| matches!(e, DataError::NonNumeric { line: 3, column, value, .. } if column == "a" && value == "abc"),
            ),
            ("a,y\n1,0\ninf,1\n", |e| {
                matches!(e, DataError::NonNumeric { .. })
            }),
            ("a,y\n1,0\n2\n", |e| {
                matches!(e, DataError::Csv { line: 3, .. })
            }),
            ("a,y\n1,0\n2,1,5\n", |e| {
                matches!(e, DataError::Csv { line: 3, .. })
            }),
            ("a,y\n1,0\n2,-1\n", |e| {
                matches!(e, DataError::BadLabel { line: 3, .. })
            }),
            ("a,y\n1,0\n2,0.5\n", |e| {
                matches!(e, DataError::BadLabel { .. })
            }),
            ("a,y\n1,0\n2,\n", |e| {
                matches!(e, DataError::BadLabel { .. })
            }),
            ("a,y\n", |e| matches!(e, DataError::Empty(_))),
            ("a,a,y\n1,2,0\n", |e| {
                matches!(e, DataError::Csv { line: 1, .. })
            }),
            ("y\n1\n", |e| matches!(e, DataError::Config(_))),
        ];
        for (i, (text, check)) in cases.into_iter().enumerate() {
            let p = write(d, &format!("bad{i}.csv"), text);
            let err = load_tabular(&cfg(p)).unwrap_err();
            assert!(check(&err), "case {i} ({text:?}): {err}");
            // Messages name the file.
            assert!(
                err.to_string().contains(&format!("bad{i}.csv"))
                    || matches!(err, DataError::Config(_)),
                "{err}"
            );
        }
        let missing = load_tabular(&cfg(d.join("nope.csv"))).unwrap_err();
        assert!(matches!(missing, DataError::Io { .. }), "{missing}");
        let mut c = cfg(write(d, "ok.csv", "a,y\n1,0\n"));
        c.validation_fraction = 1.5;
        assert!(matches!(load_tabular(&c), Err(DataError::Config(_))));
    }

    #[test]
    fn test_file_uses_training_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let train = write(dir.path(), "train.csv", "a,y\n0,0\n2,1\n");
        let test = write(dir.path(), "test.csv", "a,y\n4,1\n");
        let other = write(dir.path(), "other.csv", "b,y\n4,1\n");
        let t = load_tabular(&cfg(train)).unwrap();
        let s = load_tabular_test(&cfg(test), &t.scaling).unwrap();
        assert_eq!(s.features(), &[3.0]);
        assert!(matches!(
            load_tabular_test(&cfg(other), &t.scaling),
            Err(DataError::Config(_))
        ));
    }

    #[test]
    fn standardizes_with_an_offered_scaling_from_the_raw_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.csv",
            "a,b,y\n1,10,0\n2,20,1\n3,30,1\n4,40,0\n5,50,1\n",
        );
        let mut c = cfg(p);
        c.validation_fraction = 0.4;
        let t = load_tabular(&c).unwrap();
        assert_eq!(t.data.train.len(), 3);
        assert_eq!(t.data.validation.len(), 2);
        let fed = FeatureScaling {
            features: vec!["a".into(), "b".into()],
            mean: vec![1.0, 100.0],
            std: vec![2.0, 10.0],
        };
        let d = t.standardize(&fed).unwrap();
        assert_eq!(d.fingerprint, t.data.fingerprint);
        assert_eq!(d.train.targets(), t.data.train.targets());
        assert_eq!(d.validation.targets(), t.data.validation.targets());
        // Undo the local scaling to get the raw values back, then apply the
        // offered one: (x − mean) / std with the offered numbers.
        for (local, offered) in [
            (&t.data.train, &d.train),
            (&t.data.validation, &d.validation),
        ] {
            for (i, (l, o)) in local.features().iter().zip(offered.features()).enumerate() {
                let j = i % 2;
                let raw = f64::from(*l) * t.scaling.std[j] + t.scaling.mean[j];
                let want = (raw - fed.mean[j]) / fed.std[j];
                assert!((f64::from(*o) - want).abs() < 1e-5, "{o} vs {want}");
            }
        }
        // The statistics stay those of the raw training split.
        let train_a: f64 = (0..3)
            .map(|i| {
                f64::from(t.data.train.features()[2 * i]) * t.scaling.std[0] + t.scaling.mean[0]
            })
            .sum();
        assert!((t.stats.sum[0] - train_a).abs() < 1e-9);
        assert_eq!(t.stats.count, 3);
        // Names must match, in order.
        for features in [vec!["b", "a"], vec!["a"], vec!["a", "c"]] {
            let n = features.len();
            let wrong = FeatureScaling {
                features: features.into_iter().map(String::from).collect(),
                mean: vec![0.0; n],
                std: vec![1.0; n],
            };
            let err = t.standardize(&wrong).unwrap_err();
            assert!(matches!(err, DataError::ScalingMismatch { .. }), "{err}");
            assert!(err.to_string().contains("[\"a\", \"b\"]"), "{err}");
        }
    }
}
