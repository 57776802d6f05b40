//! Conversion between safetensors bytes and [`FlatModel`] (no file IO: the
//! caller reads and writes the bytes).
//!
//! Tensors are stored as `F32` under their dotted paths (`fc1.weight`), in
//! canonical order; the header's `__metadata__` may carry string pairs, e.g.
//! `fedlink.kind = "model" | "delta"`.

use std::collections::{BTreeMap, HashMap};

use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{SafetensorsError, UpdateError};
use crate::validate::check_tensors;

/// A parsed safetensors buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    /// The model.
    pub model: FlatModel,
    /// The `__metadata__` pairs.
    pub metadata: BTreeMap<String, String>,
}

/// Parse a safetensors buffer into a flat model. Every tensor must be F32.
/// `source` names the file or site in errors.
pub fn parse(source: &str, bytes: &[u8]) -> Result<Parsed, SafetensorsError> {
    let st = SafeTensors::deserialize(bytes)?;
    let (_, meta) = SafeTensors::read_metadata(bytes)?;
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut tensors: Vec<(String, TensorView<'_>)> = st.tensors();
    tensors.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut specs = Vec::with_capacity(tensors.len());
    for (name, view) in &tensors {
        if view.dtype() != Dtype::F32 {
            return Err(UpdateError::WrongDType {
                site: source.to_owned(),
                tensor: name.clone(),
                actual: view.dtype().to_string(),
            }
            .into());
        }
        specs.push(TensorSpec::f32(
            name.clone(),
            view.shape().iter().map(|&d| d as u64).collect(),
        ));
    }
    let spec = ModelSpec::new(specs)?;
    let mut values = Vec::with_capacity(spec.num_params() as usize);
    for (_, view) in &tensors {
        values.extend(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    let model = FlatModel::new(spec, values)?;
    Ok(Parsed { model, metadata })
}

/// Parse and check the tensors against `expected` (names, shapes, dtypes):
/// the error names the first unknown, missing or misshaped tensor.
pub fn parse_as(
    source: &str,
    bytes: &[u8],
    expected: &ModelSpec,
) -> Result<Parsed, SafetensorsError> {
    // Check the header against the spec before decoding any value.
    let st = SafeTensors::deserialize(bytes)?;
    let mut declared = Vec::new();
    for (name, view) in st.iter() {
        if view.dtype() != Dtype::F32 {
            return Err(UpdateError::WrongDType {
                site: source.to_owned(),
                tensor: name.to_owned(),
                actual: view.dtype().to_string(),
            }
            .into());
        }
        declared.push(TensorSpec::f32(
            name,
            view.shape().iter().map(|&d| d as u64).collect(),
        ));
    }
    check_tensors(source, expected, &declared)?;
    parse(source, bytes)
}

/// Serialize a flat model as safetensors with the given metadata.
pub fn serialize(
    model: &FlatModel,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, SafetensorsError> {
    let bytes: Vec<u8> = model
        .values()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let spec = model.spec();
    let mut views = Vec::with_capacity(spec.tensors().len());
    for (i, t) in spec.tensors().iter().enumerate() {
        let r = spec.range(i).unwrap_or(0..0);
        let shape = t.shape.iter().map(|&d| d as usize).collect();
        views.push((
            t.path.clone(),
            TensorView::new(Dtype::F32, shape, &bytes[r.start * 4..r.end * 4])?,
        ));
    }
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(safetensors::serialize(
        views,
        if meta.is_empty() { None } else { Some(meta) },
    )?)
}
