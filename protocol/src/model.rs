//! Model representation: named f32 tensors in a canonical order, stored flat.
//!
//! A model (or a delta) is a [`ModelSpec`] — the list of tensors with their
//! paths and shapes, sorted by path — plus one flat `Vec<f32>` holding every
//! tensor's values one after the other in that order. The flat layout makes
//! aggregation a loop over one slice and lets the wire chunk a model at any
//! element boundary.
//!
//! A model *version* is the blake3 hash of its canonical encoding
//! ([`ModelHash::of`]): the spec (paths, shapes, dtypes) followed by the
//! little-endian values. Two models with the same hash are bit-identical.

use serde::{Deserialize, Serialize};

/// Largest number of tensors a model may declare.
pub const MAX_TENSORS: usize = 65_536;
/// Longest tensor path, in bytes.
pub const MAX_PATH_LEN: usize = 512;
/// Most dimensions a tensor may have.
pub const MAX_RANK: usize = 8;
/// Most f32 parameters a model may hold: 2^31 (8 GiB of f32), so that models
/// of 2 GiB and more travel while absurd declarations are refused before any
/// allocation.
pub const MAX_PARAMS: u64 = 1 << 31;

/// Element type of a model parameter.
///
/// Parameters are always `f32` in memory; wire encodings (f16, int8, …) are a
/// property of the payload, not of the model.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
}

/// One tensor of a model: where it lives, its shape and element type.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Dotted module path, e.g. `fc1.weight`.
    pub path: String,
    /// Dimensions, outermost first. An empty shape is a scalar.
    pub shape: Vec<u64>,
    /// Element type.
    pub dtype: DType,
}

impl TensorSpec {
    /// A new f32 tensor spec.
    pub fn f32(path: impl Into<String>, shape: Vec<u64>) -> Self {
        Self {
            path: path.into(),
            shape,
            dtype: DType::F32,
        }
    }

    /// Number of elements (product of the shape), or `None` on overflow.
    pub fn num_elements(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// Why a model spec or a set of values was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The spec lists no tensor.
    #[error("model declares no tensors")]
    Empty,
    /// More tensors than [`MAX_TENSORS`].
    #[error("model declares {0} tensors, more than the limit of {MAX_TENSORS}")]
    TooManyTensors(usize),
    /// A path is empty, too long or contains control characters.
    #[error(
        "tensor path {0:?} is invalid (empty, longer than {MAX_PATH_LEN} bytes, or has control characters)"
    )]
    BadPath(String),
    /// Two tensors share a path.
    #[error("tensor path {0:?} appears twice")]
    DuplicatePath(String),
    /// Rank above [`MAX_RANK`].
    #[error("tensor {path:?} has rank {rank}, more than {MAX_RANK}")]
    RankTooHigh {
        /// Tensor path.
        path: String,
        /// Declared rank.
        rank: usize,
    },
    /// The element count overflows or the model exceeds [`MAX_PARAMS`].
    #[error("model is too large: more than {MAX_PARAMS} parameters")]
    TooLarge,
    /// The number of values does not match the spec.
    #[error("model spec declares {expected} values but {actual} were given")]
    LengthMismatch {
        /// Values the spec declares.
        expected: u64,
        /// Values present.
        actual: u64,
    },
}

/// The ordered list of tensors of a model. Always valid: sorted by path,
/// unique paths, bounded sizes (see the `MAX_*` constants).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ModelSpec {
    tensors: Vec<TensorSpec>,
    #[serde(skip)]
    offsets: Vec<u64>,
    #[serde(skip)]
    num_params: u64,
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            tensors: Vec<TensorSpec>,
        }
        let raw = Raw::deserialize(d)?;
        Self::new(raw.tensors).map_err(serde::de::Error::custom)
    }
}

impl ModelSpec {
    /// Validate and sort `tensors` into canonical order (by path, bytewise).
    pub fn new(mut tensors: Vec<TensorSpec>) -> Result<Self, ModelError> {
        if tensors.is_empty() {
            return Err(ModelError::Empty);
        }
        if tensors.len() > MAX_TENSORS {
            return Err(ModelError::TooManyTensors(tensors.len()));
        }
        for t in &tensors {
            if t.path.is_empty()
                || t.path.len() > MAX_PATH_LEN
                || t.path.chars().any(char::is_control)
            {
                return Err(ModelError::BadPath(t.path.clone()));
            }
            if t.shape.len() > MAX_RANK {
                return Err(ModelError::RankTooHigh {
                    path: t.path.clone(),
                    rank: t.shape.len(),
                });
            }
        }
        tensors.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        for w in tensors.windows(2) {
            if w[0].path == w[1].path {
                return Err(ModelError::DuplicatePath(w[0].path.clone()));
            }
        }
        let mut offsets = Vec::with_capacity(tensors.len() + 1);
        let mut total = 0u64;
        offsets.push(0);
        for t in &tensors {
            let n = t.num_elements().ok_or(ModelError::TooLarge)?;
            total = total.checked_add(n).ok_or(ModelError::TooLarge)?;
            if total > MAX_PARAMS {
                return Err(ModelError::TooLarge);
            }
            offsets.push(total);
        }
        Ok(Self {
            tensors,
            offsets,
            num_params: total,
        })
    }

    /// The tensors in canonical order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Total number of f32 parameters.
    pub fn num_params(&self) -> u64 {
        self.num_params
    }

    /// Index of the tensor with this path.
    pub fn index_of(&self, path: &str) -> Option<usize> {
        self.tensors
            .binary_search_by(|t| t.path.as_bytes().cmp(path.as_bytes()))
            .ok()
    }

    /// Element range `[start, end)` of tensor `index` in the flat values.
    pub fn range(&self, index: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(*self.offsets.get(index)?).ok()?;
        let end = usize::try_from(*self.offsets.get(index + 1)?).ok()?;
        Some(start..end)
    }

    /// Index of the tensor that holds flat element `element`, skipping
    /// tensors with no elements. `None` past the end.
    pub fn tensor_at(&self, element: u64) -> Option<usize> {
        if element >= self.num_params {
            return None;
        }
        // offsets[i] <= element < offsets[i + 1]; the last such i skips empty tensors.
        let i = self.offsets.partition_point(|&o| o <= element);
        i.checked_sub(1)
    }

    /// The pieces of the flat element range `[start, end)` that fall in each
    /// tensor, in order: `(tensor index, element range)`. Empty tensors are
    /// skipped, so every yielded range is non-empty. The range is clamped to
    /// the model's size.
    pub fn segments(&self, start: u64, end: u64) -> Segments<'_> {
        let end = end.min(self.num_params);
        let tensor = self.tensor_at(start).unwrap_or(self.tensors.len());
        Segments {
            spec: self,
            pos: start,
            end,
            tensor,
        }
    }

    /// Canonical bytes of the spec: what [`ModelHash::of`] hashes before the
    /// values. `u32` count, then per tensor: `u32` path length, path bytes,
    /// `u8` dtype, `u32` rank, `u64` dims; all little-endian.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            out.extend_from_slice(&(t.path.len() as u32).to_le_bytes());
            out.extend_from_slice(t.path.as_bytes());
            out.push(match t.dtype {
                DType::F32 => 0,
            });
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        out
    }
}

/// Iterator over the per-tensor pieces of an element range, see
/// [`ModelSpec::segments`].
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    spec: &'a ModelSpec,
    pos: u64,
    end: u64,
    tensor: usize,
}

impl Iterator for Segments<'_> {
    type Item = (usize, std::ops::Range<u64>);

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos < self.end {
            let t_end = *self.spec.offsets.get(self.tensor + 1)?;
            let idx = self.tensor;
            self.tensor += 1;
            if t_end <= self.pos {
                continue;
            }
            let seg_end = t_end.min(self.end);
            let r = self.pos..seg_end;
            self.pos = seg_end;
            return Some((idx, r));
        }
        None
    }
}

/// A model or a delta: a spec and its flat f32 values in canonical order.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatModel {
    spec: ModelSpec,
    values: Vec<f32>,
}

impl FlatModel {
    /// Pair a spec with its values; the length must match.
    pub fn new(spec: ModelSpec, values: Vec<f32>) -> Result<Self, ModelError> {
        if values.len() as u64 != spec.num_params() {
            return Err(ModelError::LengthMismatch {
                expected: spec.num_params(),
                actual: values.len() as u64,
            });
        }
        Ok(Self { spec, values })
    }

    /// All zeros with this spec.
    pub fn zeros(spec: ModelSpec) -> Self {
        let n = spec.num_params() as usize;
        Self {
            spec,
            values: vec![0.0; n],
        }
    }

    /// The spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// All values, canonical order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// All values, mutable.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Values of tensor `index`.
    pub fn tensor(&self, index: usize) -> Option<&[f32]> {
        self.spec.range(index).and_then(|r| self.values.get(r))
    }

    /// Values of the tensor at `path`.
    pub fn tensor_by_path(&self, path: &str) -> Option<&[f32]> {
        self.spec.index_of(path).and_then(|i| self.tensor(i))
    }

    /// Split into spec and values.
    pub fn into_parts(self) -> (ModelSpec, Vec<f32>) {
        (self.spec, self.values)
    }

    /// Content hash of this model (its version id).
    pub fn hash(&self) -> ModelHash {
        ModelHash::of(&self.spec, &self.values)
    }
}

/// blake3 hash identifying a model version (or any content-addressed blob).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelHash(pub [u8; 32]);

impl ModelHash {
    /// Domain separation prefix of model hashes.
    pub const DOMAIN: &'static [u8] = b"fedlink/model/v1\0";

    /// Hash of the canonical encoding of a model: domain, spec bytes, values
    /// as little-endian f32.
    pub fn of(spec: &ModelSpec, values: &[f32]) -> Self {
        let mut h = ModelHasher::new(spec);
        h.update(values);
        h.finalize()
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Debug for ModelHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelHash({})", self.to_hex())
    }
}

impl std::fmt::Display for ModelHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Incremental [`ModelHash`]: feed the values chunk by chunk, as they arrive.
#[derive(Debug)]
pub struct ModelHasher {
    inner: blake3::Hasher,
}

impl ModelHasher {
    /// Start hashing a model with this spec.
    pub fn new(spec: &ModelSpec) -> Self {
        let mut inner = blake3::Hasher::new();
        inner.update(ModelHash::DOMAIN);
        inner.update(&spec.canonical_bytes());
        Self { inner }
    }

    /// Feed the next values (canonical order).
    pub fn update(&mut self, values: &[f32]) {
        if cfg!(target_endian = "little") {
            self.inner.update(bytemuck::cast_slice(values));
        } else {
            for v in values {
                self.inner.update(&v.to_le_bytes());
            }
        }
    }

    /// The hash.
    pub fn finalize(&self) -> ModelHash {
        ModelHash(*self.inner.finalize().as_bytes())
    }
}

/// The largest `|x|` of `values` (0 for none), or `None` when one of them
/// is not finite. Compares the magnitude bits as integers — for
/// non-negative floats their order is the values' order, and infinities
/// and NaNs are the patterns from `0x7f80_0000` up — so that the loop
/// vectorises (a float `max` with its NaN rules, or a search that stops
/// at the first non-finite value, does not): ≈ 8× faster than
/// `is_finite` + `f32::max` per value. Used wherever values from outside
/// are checked (the payload decoder, the encoder, the validation pass).
pub fn max_abs(values: &[f32]) -> Option<f32> {
    const LANES: usize = 8;
    let mut lanes = [0u32; LANES];
    let (blocks, rest) = values.as_chunks::<LANES>();
    for b in blocks {
        for (m, v) in lanes.iter_mut().zip(b) {
            *m = (*m).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    let mut max = lanes.into_iter().max().unwrap_or(0);
    for v in rest {
        max = max.max(v.to_bits() & 0x7fff_ffff);
    }
    (max < 0x7f80_0000).then(|| f32::from_bits(max))
}

/// Index of the first value that is not finite, if any: [`max_abs`]'s
/// vectorised pass first, the search only when it finds one.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    match max_abs(values) {
        Some(_) => None,
        None => values.iter().position(|v| !v.is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_max_abs(values: &[f32]) -> Option<f32> {
        values
            .iter()
            .all(|v| v.is_finite())
            .then(|| values.iter().fold(0f32, |m, v| m.max(v.abs())))
    }

    /// The bit-pattern maximum agrees with `is_finite` + `f32::max` on
    /// every kind of value, at every position, for every length around
    /// the lane width; `first_non_finite` finds the first bad value.
    #[test]
    fn max_abs_agrees_with_the_float_loop() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE / 8.0, // subnormal
            f32::MAX,
            f32::MIN,
            1e-30,
            -3.5e7,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in 0..40usize {
            for _ in 0..50 {
                let values: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = next();
                        if r % 5 == 0 {
                            specials[(r >> 8) as usize % specials.len()]
                        } else {
                            f32::from_bits(r as u32 & 0xbfff_ffff) // finite
                        }
                    })
                    .collect();
                assert_eq!(max_abs(&values), naive_max_abs(&values), "{values:?}");
                assert_eq!(first_non_finite(&values), None);
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                    for at in 0..len {
                        let mut v = values.clone();
                        v[at] = bad;
                        assert_eq!(max_abs(&v), None, "{bad} at {at} of {len}");
                        assert_eq!(first_non_finite(&v), Some(at));
                        v[len - 1] = f32::NAN;
                        assert_eq!(first_non_finite(&v), Some(at.min(len - 1)));
                    }
                }
            }
        }
    }

    #[test]
    fn spec_is_sorted_and_offsets_match() {
        let spec = ModelSpec::new(vec![
            TensorSpec::f32("fc2.weight", vec![3, 2]),
            TensorSpec::f32("fc1.bias", vec![4]),
        ])
        .unwrap();
        assert_eq!(spec.tensors()[0].path, "fc1.bias");
        assert_eq!(spec.range(0), Some(0..4));
        assert_eq!(spec.range(1), Some(4..10));
        assert_eq!(spec.num_params(), 10);
        assert_eq!(spec.index_of("fc2.weight"), Some(1));
    }

    #[test]
    fn spec_rejects_duplicates_and_overflow() {
        let dup = ModelSpec::new(vec![
            TensorSpec::f32("a", vec![1]),
            TensorSpec::f32("a", vec![2]),
        ]);
        assert!(matches!(dup, Err(ModelError::DuplicatePath(_))));
        let huge = ModelSpec::new(vec![TensorSpec::f32("a", vec![u64::MAX, 2])]);
        assert_eq!(huge, Err(ModelError::TooLarge));
        assert_eq!(ModelSpec::new(vec![]), Err(ModelError::Empty));
    }

    #[test]
    fn segments_split_ranges_by_tensor() {
        let spec = ModelSpec::new(vec![
            TensorSpec::f32("a", vec![3]),
            TensorSpec::f32("b", vec![0]),
            TensorSpec::f32("c", vec![2, 2]),
            TensorSpec::f32("d", vec![1]),
        ])
        .unwrap();
        assert_eq!(spec.tensor_at(0), Some(0));
        assert_eq!(spec.tensor_at(3), Some(2));
        assert_eq!(spec.tensor_at(7), Some(3));
        assert_eq!(spec.tensor_at(8), None);
        let segs: Vec<_> = spec.segments(2, 8).collect();
        assert_eq!(segs, vec![(0, 2..3), (2, 3..7), (3, 7..8)]);
        let segs: Vec<_> = spec.segments(4, 6).collect();
        assert_eq!(segs, vec![(2, 4..6)]);
        assert_eq!(spec.segments(8, 100).count(), 0);
    }

    #[test]
    fn hash_changes_with_values_and_spec() {
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![2])]).unwrap();
        let a = FlatModel::new(spec.clone(), vec![1.0, 2.0]).unwrap();
        let b = FlatModel::new(spec, vec![1.0, 2.5]).unwrap();
        assert_ne!(a.hash(), b.hash());
        let spec2 = ModelSpec::new(vec![TensorSpec::f32("v", vec![2])]).unwrap();
        let c = FlatModel::new(spec2, vec![1.0, 2.0]).unwrap();
        assert_ne!(a.hash(), c.hash());
        assert_eq!(ModelHash::from_hex(&a.hash().to_hex()), Some(a.hash()));
    }
}
