//! The hospital's own data, read from local files and validated.
//!
//! Data never leaves the site: this module only produces in-memory
//! [`Samples`] for [`crate::train`] and a [`Fingerprint`] (a blake3 hash of
//! the file contents and the loading configuration) that may appear in logs
//! and reports so that runs can be traced to the exact data used.
//!
//! ```text
//!  CSV (tabular)  ──┐
//!  PNG folders    ──┼─▶ validate ─▶ split (seeded) ─▶ LocalData { train, validation }
//!  PNG pairs/raw  ──┤                                  + Fingerprint
//!  DICOM / NIfTI  ──┘
//! ```
//!
//! Every loader refuses malformed input with a [`DataError`] that names the
//! file, line or column at fault; nothing here panics on bad files.
//!
//! * [`tabular`]: CSV with feature columns and an integer label column.
//! * [`image`]: classification images, one folder per class (PNG).
//! * [`segmentation`]: image + mask pairs (PNG folders, or the raw u8 format
//!   with `header.json`), cut into square tiles.
//! * [`volume`]: DICOM series ([`dicom`]) and NIfTI files ([`nifti`]) →
//!   2D slices (or tiles) for segmentation or classification.

pub mod dicom;
pub mod image;
pub mod nifti;
pub mod segmentation;
pub mod tabular;
pub mod volume;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use fedlink_protocol::{FeatureScaling, FeatureStats};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Most f32 values a loaded dataset may hold (2^28, 1 GiB).
pub const MAX_VALUES: usize = 1 << 28;
/// Largest file a loader reads (1 GiB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Largest class index + 1 a label may imply.
pub const MAX_CLASSES: u32 = fedlink_protocol::arch::MAX_CLASSES;

/// Why local data could not be loaded.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The CSV is malformed (bad quoting, ragged rows, bad UTF-8).
    #[error("{path}: line {line}: {message}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line number (the header is line 1).
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A configured column is not in the CSV header.
    #[error("{path}: no column named {column:?} (header has: {available})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// Comma-separated header names.
        available: String,
    },
    /// A feature cell is not a finite number.
    #[error("{path}: line {line}, column {column:?}: {value:?} is not a finite number")]
    NonNumeric {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column name.
        column: String,
        /// The cell text (truncated).
        value: String,
    },
    /// A cell is missing and the policy is to reject missing values.
    #[error(
        "{path}: line {line}, column {column:?}: missing value (set `missing = \"impute_mean\"` to impute)"
    )]
    MissingValue {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column name.
        column: String,
    },
    /// A label is not a class index.
    #[error(
        "{path}: line {line}: label {value:?} is not an integer class index below {MAX_CLASSES}"
    )]
    BadLabel {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0 when not line-based).
        line: u64,
        /// The label text.
        value: String,
    },
    /// A PNG file could not be decoded or has an unsupported format.
    #[error("{path}: {message}")]
    Png {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An image does not have the configured size.
    #[error("{path}: image is {found_width}×{found_height}, expected {width}×{height}")]
    ImageSize {
        /// The file.
        path: PathBuf,
        /// Expected width.
        width: u32,
        /// Expected height.
        height: u32,
        /// Actual width.
        found_width: u32,
        /// Actual height.
        found_height: u32,
    },
    /// An image and its mask do not match.
    #[error("image {image} and mask {mask} do not match: {detail}")]
    MaskMismatch {
        /// The image file.
        image: PathBuf,
        /// The mask file.
        mask: PathBuf,
        /// What differs.
        detail: String,
    },
    /// A `header.json` is missing fields or inconsistent with the data.
    #[error("{path}: bad header: {message}")]
    Header {
        /// The header file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The data is larger than this agent accepts.
    #[error("{what} is too large: {size} > limit {limit}")]
    TooLarge {
        /// What exceeded the limit.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// No samples (or too few to split as configured).
    #[error("{0}")]
    Empty(String),
    /// The loading configuration is invalid.
    #[error("invalid data configuration: {0}")]
    Config(String),
    /// A feature scaling was offered for data that is not tabular.
    #[error("a feature scaling applies to tabular data only; the local dataset is not tabular")]
    ScalingNotApplicable,
    /// A feature scaling (e.g. the federation's) does not name this
    /// dataset's feature columns, in the same order.
    #[error("the feature scaling names columns {scaling}, the local feature columns are {local}")]
    ScalingMismatch {
        /// The scaling's feature names (quoted, truncated).
        scaling: String,
        /// The local feature columns (quoted, truncated).
        local: String,
    },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Layout of one sample's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleShape {
    /// A feature vector of this length.
    Features(usize),
    /// An image, channels first.
    Image {
        /// Channels.
        channels: usize,
        /// Height in pixels.
        height: usize,
        /// Width in pixels.
        width: usize,
    },
}

impl SampleShape {
    /// Number of f32 values per sample.
    pub fn len(&self) -> usize {
        match *self {
            Self::Features(n) => n,
            Self::Image {
                channels,
                height,
                width,
            } => channels * height * width,
        }
    }

    /// Whether a sample has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the model should predict for each sample.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// One class index per sample.
    Classes(Vec<u32>),
    /// One class index per pixel, `height × width` per sample (row-major).
    Masks(Vec<u8>),
}

/// An in-memory set of samples: features (row-major, `n × shape.len()`)
/// and targets. Always consistent (checked by [`Samples::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Samples {
    shape: SampleShape,
    x: Vec<f32>,
    targets: Targets,
    n: usize,
}

impl Samples {
    /// Check the lengths and pair features with targets.
    pub fn new(shape: SampleShape, x: Vec<f32>, targets: Targets) -> Result<Self, DataError> {
        let per = shape.len();
        if per == 0 {
            return Err(DataError::Config("samples have no features".to_owned()));
        }
        if !x.len().is_multiple_of(per) {
            return Err(DataError::Config(format!(
                "{} values is not a multiple of the sample size {per}",
                x.len()
            )));
        }
        let n = x.len() / per;
        let ok = match (&targets, shape) {
            (Targets::Classes(y), _) => y.len() == n,
            (Targets::Masks(m), SampleShape::Image { height, width, .. }) => {
                m.len() == n * height * width
            }
            (Targets::Masks(_), SampleShape::Features(_)) => false,
        };
        if !ok {
            return Err(DataError::Config(format!(
                "targets do not match {n} samples of shape {shape:?}"
            )));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(DataError::Config(
                "features contain non-finite values".to_owned(),
            ));
        }
        Ok(Self {
            shape,
            x,
            targets,
            n,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Layout of one sample.
    pub fn shape(&self) -> SampleShape {
        self.shape
    }

    /// All features, row-major.
    pub fn features(&self) -> &[f32] {
        &self.x
    }

    /// The targets.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// Largest class index present + 1 (0 when empty).
    pub fn num_classes_seen(&self) -> u32 {
        match &self.targets {
            Targets::Classes(y) => y.iter().copied().max().map_or(0, |m| m + 1),
            Targets::Masks(m) => m.iter().copied().max().map_or(0, |v| u32::from(v) + 1),
        }
    }

    /// The samples at `indices`, in that order. Indices out of range are
    /// skipped (callers pass indices from `0..len()`).
    pub fn subset(&self, indices: &[usize]) -> Self {
        let per = self.shape.len();
        let idx: Vec<usize> = indices.iter().copied().filter(|&i| i < self.n).collect();
        let mut x = Vec::with_capacity(idx.len() * per);
        for &i in &idx {
            x.extend_from_slice(&self.x[i * per..(i + 1) * per]);
        }
        let targets = match &self.targets {
            Targets::Classes(y) => Targets::Classes(idx.iter().map(|&i| y[i]).collect()),
            Targets::Masks(m) => {
                let px = match self.shape {
                    SampleShape::Image { height, width, .. } => height * width,
                    SampleShape::Features(_) => 0,
                };
                let mut out = Vec::with_capacity(idx.len() * px);
                for &i in &idx {
                    out.extend_from_slice(&m[i * px..(i + 1) * px]);
                }
                Targets::Masks(out)
            }
        };
        Self {
            shape: self.shape,
            x,
            targets,
            n: idx.len(),
        }
    }
}

/// blake3 over a dataset's file contents (with names relative to the
/// dataset root) and loading settings, hex. Identifies the data in logs
/// without revealing it; where the files live does not enter it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub String);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Incremental fingerprint: config first, then files in a fixed order.
pub(crate) struct FingerprintBuilder(blake3::Hasher);

impl FingerprintBuilder {
    pub(crate) fn new(kind: &str, config: &impl serde::Serialize) -> Self {
        let mut h = blake3::Hasher::new_derive_key("fedlink dataset fingerprint v1");
        h.update(kind.as_bytes());
        h.update(&[0]);
        // Serialising a plain config struct to JSON cannot fail; an empty
        // config still fingerprints the files.
        let cfg = serde_json::to_vec(config).unwrap_or_default();
        h.update(&(cfg.len() as u64).to_le_bytes());
        h.update(&cfg);
        Self(h)
    }

    /// Add one file: its name relative to the dataset root, then its bytes.
    pub(crate) fn file(&mut self, name: &str, bytes: &[u8]) {
        self.0.update(&(name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub(crate) fn finish(&self) -> Fingerprint {
        Fingerprint(self.0.finalize().to_hex().to_string())
    }
}

/// Local data ready for training: a seeded train/validation split.
#[derive(Clone, Debug)]
pub struct LocalData {
    /// Training samples.
    pub train: Samples,
    /// Held-out validation samples (may be empty when the fraction is 0).
    pub validation: Samples,
    /// Hash of the files and configuration.
    pub fingerprint: Fingerprint,
}

/// The site's dataset as loaded: for CSV data, the raw features too, so
/// that each round can standardise them with the scaling its offer carries
/// (see [`tabular`]); other data is used as loaded.
#[derive(Clone, Debug)]
pub enum SiteData {
    /// A CSV dataset.
    Tabular(Box<tabular::TabularData>),
    /// Images or segmentation tiles.
    Fixed(Box<LocalData>),
}

impl From<LocalData> for SiteData {
    fn from(d: LocalData) -> Self {
        Self::Fixed(Box::new(d))
    }
}

impl From<tabular::TabularData> for SiteData {
    fn from(t: tabular::TabularData) -> Self {
        Self::Tabular(Box::new(t))
    }
}

impl SiteData {
    /// The data as loaded (tabular: standardised with local statistics).
    pub fn local(&self) -> &LocalData {
        match self {
            Self::Tabular(t) => &t.data,
            Self::Fixed(d) => d,
        }
    }

    /// Count, Σx, Σx² of the raw training features, reported to the
    /// federation in the signed update header (tabular data only).
    pub fn feature_stats(&self) -> Option<&FeatureStats> {
        match self {
            Self::Tabular(t) => Some(&t.stats),
            Self::Fixed(_) => None,
        }
    }

    /// Whether an offer's `scaling` can be honoured: none, or one naming
    /// this tabular dataset's feature columns in order.
    pub fn check_scaling(&self, scaling: Option<&FeatureScaling>) -> Result<(), DataError> {
        match (self, scaling) {
            (_, None) => Ok(()),
            (Self::Tabular(t), Some(s)) => t.check_scaling(s),
            (Self::Fixed(_), Some(_)) => Err(DataError::ScalingNotApplicable),
        }
    }

    /// The samples to evaluate and train on in a round whose offer carries
    /// `scaling`: standardised with it, or as loaded when there is none.
    pub fn for_scaling(
        &self,
        scaling: Option<&FeatureScaling>,
    ) -> Result<Cow<'_, LocalData>, DataError> {
        match (self, scaling) {
            (_, None) => Ok(Cow::Borrowed(self.local())),
            (Self::Tabular(t), Some(s)) => t.standardize(s).map(Cow::Owned),
            (Self::Fixed(_), Some(_)) => Err(DataError::ScalingNotApplicable),
        }
    }
}

/// Check a validation fraction: finite, in `[0, 0.9]`.
pub(crate) fn check_fraction(fraction: f64) -> Result<(), DataError> {
    if fraction.is_finite() && (0.0..=0.9).contains(&fraction) {
        Ok(())
    } else {
        Err(DataError::Config(format!(
            "validation_fraction {fraction} must be within [0, 0.9]"
        )))
    }
}

/// Deterministic split of `0..n`: shuffle with ChaCha8(`seed`), the first
/// `floor(fraction · n)` indices are validation, the rest training; both
/// lists are returned sorted so that the training order does not depend on
/// the split.
pub fn split_indices(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    idx.shuffle(&mut rng);
    let n_valid = ((n as f64) * fraction.clamp(0.0, 1.0)).floor() as usize;
    let mut valid = idx[..n_valid].to_vec();
    let mut train = idx[n_valid..].to_vec();
    valid.sort_unstable();
    train.sort_unstable();
    (train, valid)
}

/// Split `samples` into [`LocalData`].
pub(crate) fn split(
    samples: &Samples,
    fraction: f64,
    seed: u64,
    fingerprint: Fingerprint,
) -> Result<LocalData, DataError> {
    check_fraction(fraction)?;
    let (train, valid) = split_indices(samples.len(), fraction, seed);
    if train.is_empty() {
        return Err(DataError::Empty(format!(
            "no training samples left after the split ({} samples)",
            samples.len()
        )));
    }
    Ok(LocalData {
        train: samples.subset(&train),
        validation: samples.subset(&valid),
        fingerprint,
    })
}

/// Read a whole file, refusing files above `limit` bytes.
pub(crate) fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, DataError> {
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if meta.len() > limit {
        return Err(DataError::TooLarge {
            what: path.display().to_string(),
            size: meta.len(),
            limit,
        });
    }
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let (t1, v1) = split_indices(100, 0.2, 7);
        let (t2, v2) = split_indices(100, 0.2, 7);
        let (t3, _) = split_indices(100, 0.2, 8);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_ne!(t1, t3);
        assert_eq!(v1.len(), 20);
        assert_eq!(t1.len(), 80);
        let mut all: Vec<_> = t1.iter().chain(&v1).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn samples_check_lengths() {
        let ok = Samples::new(
            SampleShape::Features(2),
            vec![1.0, 2.0, 3.0, 4.0],
            Targets::Classes(vec![0, 1]),
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok.num_classes_seen(), 2);
        let sub = ok.subset(&[1]);
        assert_eq!(sub.features(), &[3.0, 4.0]);
        assert!(
            Samples::new(
                SampleShape::Features(2),
                vec![1.0, 2.0, 3.0],
                Targets::Classes(vec![0])
            )
            .is_err()
        );
        assert!(
            Samples::new(
                SampleShape::Features(1),
                vec![1.0],
                Targets::Classes(vec![0, 1])
            )
            .is_err()
        );
        assert!(
            Samples::new(
                SampleShape::Features(1),
                vec![f32::NAN],
                Targets::Classes(vec![0])
            )
            .is_err()
        );
    }
}
