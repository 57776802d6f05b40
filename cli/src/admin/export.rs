//! Write an exported model as safetensors, streaming: the values arrive in
//! stored order, chunk by chunk; only a tensor that must be transposed is
//! held whole in memory. The model hash is recomputed over the stored
//! values and must match the coordinator's.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, bail};
use fedlink_protocol::admin::{ExportHeader, ExportTensor};
use fedlink_protocol::{FlatModel, ModelHasher, ModelSpec, TensorSpec};
use fedlink_transport::FramedRecv;

/// Format note written into the file's `__metadata__`.
pub const FORMAT_NOTE: &str = "fedlink export for PyTorch: Linear weights transposed from burn's \
     [in, out] to [out, in]; Conv2d [out, in, kh, kw] and ConvTranspose2d [in, out, kh, kw] \
     weights unchanged; GroupNorm gamma/beta renamed weight/bias; float32 little-endian";

fn elements(shape: &[u64]) -> anyhow::Result<usize> {
    shape
        .iter()
        .try_fold(1u64, |a, d| a.checked_mul(*d))
        .and_then(|n| usize::try_from(n).ok())
        .context("tensor too large")
}

/// The safetensors JSON header (padded to 8 bytes) for `header`.
pub fn safetensors_header(header: &ExportHeader) -> anyhow::Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("fedlink_model".into(), header.model.to_hex().into());
    meta.insert("fedlink_job".into(), header.job.as_str().into());
    meta.insert("fedlink_round".into(), header.round.to_string().into());
    meta.insert("fedlink_arch".into(), header.arch.to_string().into());
    meta.insert("format".into(), FORMAT_NOTE.into());
    let transposed: Vec<&str> = header
        .tensors
        .iter()
        .filter(|t| t.transposed)
        .map(|t| t.name.as_str())
        .collect();
    meta.insert("fedlink_transposed".into(), transposed.join(",").into());
    map.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0u64;
    for t in &header.tensors {
        let len = elements(&t.shape)? as u64 * 4;
        map.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    if offset != header.total_bytes {
        bail!(
            "the export header announces {} bytes but its tensors hold {offset}",
            header.total_bytes
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    Ok(json)
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

struct Writer<W: Write> {
    out: W,
    tensors: Vec<ExportTensor>,
    index: usize,
    /// Values of the current tensor still expected.
    left: usize,
    /// The current tensor's values, when it must be transposed.
    held: Vec<f32>,
    hasher: ModelHasher,
    carry: Vec<u8>,
}

impl<W: Write> Writer<W> {
    fn start_tensor(&mut self) -> anyhow::Result<()> {
        while let Some(t) = self.tensors.get(self.index) {
            self.left = elements(&t.stored_shape)?;
            if self.left > 0 {
                break;
            }
            self.index += 1;
        }
        self.held.clear();
        Ok(())
    }

    fn push(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.carry.extend_from_slice(bytes);
        let whole = self.carry.len() / 4 * 4;
        let values: Vec<f32> = self.carry[..whole]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        self.carry.drain(..whole);
        self.hasher.update(&values);
        let mut rest: &[f32] = &values;
        while !rest.is_empty() {
            let Some(t) = self.tensors.get(self.index) else {
                bail!("more values than the export header announced");
            };
            let n = rest.len().min(self.left);
            let (now, later) = rest.split_at(n);
            if t.transposed {
                self.held.extend_from_slice(now);
            } else {
                for v in now {
                    self.out.write_all(&v.to_le_bytes())?;
                }
            }
            self.left -= n;
            rest = later;
            if self.left == 0 {
                if t.transposed {
                    let (rows, cols) = match t.stored_shape.as_slice() {
                        [r, c] => (*r as usize, *c as usize),
                        _ => bail!("{} is marked transposed but is not 2-D", t.source_path),
                    };
                    for v in transpose(&self.held, rows, cols) {
                        self.out.write_all(&v.to_le_bytes())?;
                    }
                }
                self.index += 1;
                self.start_tensor()?;
            }
        }
        Ok(())
    }
}

/// Receive the values after `header` from `recv` and write `out` (which must
/// not exist: it is written to a temporary file and renamed at the end).
pub async fn receive(
    header: &ExportHeader,
    recv: &mut FramedRecv,
    out: &Path,
) -> anyhow::Result<u64> {
    if out.exists() {
        bail!("{} exists; not overwriting it", out.display());
    }
    let spec = ModelSpec::new(
        header
            .tensors
            .iter()
            .map(|t| TensorSpec::f32(t.source_path.clone(), t.stored_shape.clone()))
            .collect(),
    )
    .context("the export header's tensors do not form a model spec")?;
    let expected = header.model;
    let json = safetensors_header(header)?;
    // Written next to `out` and renamed there only when complete and
    // verified (fedlink-durable; mode 0600: a model is derived from the
    // sites' data); an error or a drop removes the temporary file.
    let staged = fedlink_durable::Staged::new(out, fedlink_durable::Mode::Private)?;
    let mut w = Writer {
        out: BufWriter::with_capacity(1 << 20, staged),
        tensors: header.tensors.clone(),
        index: 0,
        left: 0,
        held: Vec::new(),
        hasher: ModelHasher::new(&spec),
        carry: Vec::new(),
    };
    let result = async {
        w.out.write_all(&(json.len() as u64).to_le_bytes())?;
        w.out.write_all(&json)?;
        w.start_tensor()?;
        let mut received = 0u64;
        while let Some(frame) = recv.next_frame().await? {
            let chunk = frame
                .into_chunk()
                .context("expected a chunk of model values")?;
            received += chunk.len() as u64;
            if received > header.total_bytes {
                bail!("more bytes than the export header announced");
            }
            w.push(&chunk)?;
        }
        if received != header.total_bytes || !w.carry.is_empty() || w.index < w.tensors.len() {
            bail!(
                "the export ended early: {received} of {} bytes",
                header.total_bytes
            );
        }
        let got = w.hasher.finalize();
        if got != expected {
            bail!("the received model hashes to {got}, not {expected}");
        }
        w.out.flush()?;
        Ok(received)
    }
    .await;
    let n = result?;
    let staged = w.out.into_inner().map_err(|e| e.into_error())?;
    staged
        .commit_new()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(n)
}

/// The tensors of `model` as [`receive`] writes them (PyTorch names and
/// layouts), for checks: `(name, shape, values)`.
pub fn expected_tensors(model: &FlatModel) -> Vec<(String, Vec<u64>, Vec<f32>)> {
    fedlink_protocol::admin::pytorch_tensors(model.spec())
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let v = model.tensor(i).unwrap_or_default();
            let values = match (t.transposed, t.stored_shape.as_slice()) {
                (true, [r, c]) => transpose(v, *r as usize, *c as usize),
                _ => v.to_vec(),
            };
            (t.name, t.shape, values)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_is_row_major() {
        // [[1, 2, 3], [4, 5, 6]] (2 x 3) -> [[1, 4], [2, 5], [3, 6]]
        assert_eq!(
            transpose(&[1., 2., 3., 4., 5., 6.], 2, 3),
            vec![1., 4., 2., 5., 3., 6.]
        );
    }

    #[test]
    fn streamed_writer_matches_expected_layout_across_chunk_splits() {
        let spec = ModelSpec::new(vec![
            TensorSpec::f32("fc.weight", vec![3, 2]),
            TensorSpec::f32("fc.bias", vec![2]),
            TensorSpec::f32("n.gamma", vec![2]),
        ])
        .unwrap();
        let values: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let model = FlatModel::new(spec.clone(), values.clone()).unwrap();
        let tensors = fedlink_protocol::admin::pytorch_tensors(&spec);
        let mut w = Writer {
            out: Vec::new(),
            tensors,
            index: 0,
            left: 0,
            held: Vec::new(),
            hasher: ModelHasher::new(&spec),
            carry: Vec::new(),
        };
        w.start_tensor().unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        // Odd split sizes cut values and tensors in the middle.
        for piece in bytes.chunks(7) {
            w.push(piece).unwrap();
        }
        assert_eq!(w.hasher.finalize(), model.hash());
        let got: Vec<f32> = w
            .out
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want: Vec<f32> = expected_tensors(&model)
            .into_iter()
            .flat_map(|(_, _, v)| v)
            .collect();
        assert_eq!(got, want);
    }
}
