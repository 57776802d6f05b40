//! Downlink updates: a site that holds the previous global model receives
//! the round's *global update* (new − old), encoded with the job's codec,
//! instead of the whole lossless model (protocol version
//! [`DOWNLINK_VERSION`](crate::message::DOWNLINK_VERSION)).
//!
//! The coordinator encodes the update, decodes it back with the real
//! [`PayloadDecoder`], and publishes `base + decoded` as the new global
//! model; a site decodes the same records and computes the same sum with
//! [`apply_update`]. Both compute one IEEE f32 addition per element, so
//! both hold bit-identical models, and the site checks that with the
//! announced [`ModelHash`] before it caches or trains on the result
//! ([`UpdateApplier::finish`]).
//!
//! ```text
//!  base model (cached, hash-checked) ─┐
//!  UpdateManifest + chunk records ──▶ UpdateApplier ──▶ FlatModel, hash == target
//!  (network)                          decode → base[i] + u[i]
//! ```
//!
//! ```
//! use fedlink_protocol::downlink::{UpdateApplier, apply_update};
//! use fedlink_protocol::{
//!     Encoding, FlatModel, ModelSpec, TensorSpec, UpdateManifest, ValueCodec, encode_payload,
//!     decode_payload,
//! };
//! let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![6])])?;
//! let base = FlatModel::new(spec.clone(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let update = FlatModel::new(spec.clone(), vec![0.1, -0.2, 0.3, 0.0, 0.5, -0.6])?;
//! let enc = Encoding::with_codec(ValueCodec::F16)?.with_chunk_bytes(16)?;
//! let (records, summary) = encode_payload(&update, enc, 0)?;
//! // The coordinator: the published model is base + the *decoded* update.
//! let decoded = decode_payload(spec.clone(), enc, records.iter().map(Vec::as_slice))?;
//! let mut published = base.clone();
//! apply_update(published.values_mut(), 0, decoded.values())?;
//! // The site: the same records applied to its copy of the base.
//! let manifest = UpdateManifest {
//!     base: base.hash(),
//!     hash: published.hash(),
//!     spec: spec.clone(),
//!     encoding: enc,
//!     payload_len: summary.payload_len,
//!     num_chunks: summary.num_chunks,
//! };
//! let mut applier = UpdateApplier::new(manifest, base, u64::MAX)?;
//! for r in &records {
//!     applier.push(r)?;
//! }
//! assert_eq!(applier.finish()?, published);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::encoding::ValueCodec;
use crate::message::UpdateManifest;
use crate::model::{FlatModel, ModelHash};
use crate::payload::{PayloadDecoder, PayloadError, max_payload_len};

/// Why a downlink update was refused or could not be applied.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    /// The manifest does not fit the base model or the site's limits.
    #[error("update manifest: {0}")]
    Manifest(String),
    /// A chunk record is malformed or out of place.
    #[error("update payload: {0}")]
    Payload(#[from] PayloadError),
    /// The decoded values do not fit the model they are applied to.
    #[error("update of {len} values at offset {offset} does not fit a model of {params}")]
    OutOfRange {
        /// First element.
        offset: u64,
        /// Values given.
        len: u64,
        /// Parameters of the model.
        params: u64,
    },
    /// `base + update` is not finite at this element.
    #[error("applying the update makes element {0} non-finite")]
    NonFinite(u64),
    /// The number or length of records differs from the manifest.
    #[error("update payload: {0}")]
    Length(String),
    /// The model the update produced does not hash to the announced hash.
    #[error("updated model hash mismatch: announced {announced}, the result hashes to {actual}")]
    HashMismatch {
        /// Hash announced (and asked for).
        announced: ModelHash,
        /// Hash of the result.
        actual: ModelHash,
    },
}

/// Apply decoded update values to a model: `model[offset + i] += update[i]`,
/// one IEEE f32 addition per element, in index order. This one function is
/// what the coordinator, the site agent, the load generator and the replay
/// use, so all of them compute bit-identical models. Refuses a range outside
/// the model and a non-finite result (the model is then partly updated and
/// must be discarded).
pub fn apply_update(model: &mut [f32], offset: u64, update: &[f32]) -> Result<(), DownlinkError> {
    let params = model.len() as u64;
    let out_of_range = || DownlinkError::OutOfRange {
        offset,
        len: update.len() as u64,
        params,
    };
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = start.checked_add(update.len()).ok_or_else(out_of_range)?;
    let target = model.get_mut(start..end).ok_or_else(out_of_range)?;
    for (i, (x, u)) in target.iter_mut().zip(update).enumerate() {
        let y = *x + *u;
        if !y.is_finite() {
            return Err(DownlinkError::NonFinite(offset + i as u64));
        }
        *x = y;
    }
    Ok(())
}

/// Whether a job's value codec can carry the downlink update. Top-k keeps
/// ~1 % of each chunk: as a downlink codec it would drop the rest of every
/// round's global update for good (no error feedback on the coordinator),
/// so a top-k job sends the whole model instead.
pub fn codec_carries_updates(codec: ValueCodec) -> bool {
    !matches!(codec, ValueCodec::TopK { .. })
}

/// Check an [`UpdateManifest`] against the base model the site holds, then
/// decode its chunk records one by one and add them to that model
/// ([`apply_update`]); [`UpdateApplier::finish`] checks the result's hash.
#[derive(Debug)]
pub struct UpdateApplier {
    manifest: UpdateManifest,
    model: FlatModel,
    decoder: PayloadDecoder,
    values: Vec<f32>,
    next: u64,
    records: u64,
    bytes: u64,
}

impl UpdateApplier {
    /// Accept `manifest` for an update of `base` (a model the site holds,
    /// hash-checked): at most `max_params` parameters (checked first), the
    /// same base hash and spec, a codec that carries updates, a payload
    /// length within the bound and the exact chunk count.
    pub fn new(
        manifest: UpdateManifest,
        base: FlatModel,
        max_params: u64,
    ) -> Result<Self, DownlinkError> {
        let bad = |m: String| Err(DownlinkError::Manifest(m));
        let params = manifest.spec.num_params();
        if params > max_params {
            return bad(format!(
                "describes a model of {params} parameters, the limit is {max_params}"
            ));
        }
        if manifest.spec != *base.spec() {
            return bad("tensor layout differs from the base model's".into());
        }
        let held = base.hash();
        if manifest.base != held {
            return bad(format!(
                "is an update of {}, the base held is {held}",
                manifest.base
            ));
        }
        if !codec_carries_updates(manifest.encoding.values()) {
            return bad(format!(
                "codec {} does not carry downlink updates",
                manifest.encoding.values().name()
            ));
        }
        let max = max_payload_len(&manifest.spec, &manifest.encoding);
        if manifest.payload_len > max {
            return bad(format!(
                "payload of {} bytes exceeds the bound of {max}",
                manifest.payload_len
            ));
        }
        let chunks = params.div_ceil(manifest.encoding.chunk_elems());
        if manifest.num_chunks != chunks {
            return bad(format!(
                "{} chunks announced, the layout needs {chunks}",
                manifest.num_chunks
            ));
        }
        // The result is hashed once, at the end; the update's own values
        // need no hash of their own.
        let decoder =
            PayloadDecoder::new(manifest.spec.clone(), manifest.encoding)?.without_model_hash();
        Ok(Self {
            manifest,
            model: base,
            decoder,
            values: Vec::new(),
            next: 0,
            records: 0,
            bytes: 0,
        })
    }

    /// The accepted manifest.
    pub fn manifest(&self) -> &UpdateManifest {
        &self.manifest
    }

    /// Records still expected.
    pub fn remaining(&self) -> u64 {
        self.manifest.num_chunks.saturating_sub(self.records)
    }

    /// Decode the next chunk record and add it to the model.
    pub fn push(&mut self, record: &[u8]) -> Result<(), DownlinkError> {
        if self.records >= self.manifest.num_chunks {
            return Err(DownlinkError::Length(format!(
                "more than the {} announced chunks",
                self.manifest.num_chunks
            )));
        }
        self.bytes = self.bytes.saturating_add(record.len() as u64);
        if self.bytes > self.manifest.payload_len {
            return Err(DownlinkError::Length(format!(
                "more than the {} announced bytes",
                self.manifest.payload_len
            )));
        }
        let offset = self.decoder.decode_chunk_into(record, &mut self.values)?;
        if offset != self.next {
            return Err(DownlinkError::Length(format!(
                "chunk at offset {offset} where {} was expected",
                self.next
            )));
        }
        apply_update(self.model.values_mut(), offset, &self.values)?;
        self.next = offset + self.values.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Check completeness, length and the result's hash; return the model.
    pub fn finish(self) -> Result<FlatModel, DownlinkError> {
        let summary = self.decoder.finish()?;
        if summary.payload_len != self.manifest.payload_len || self.bytes != summary.payload_len {
            return Err(DownlinkError::Length(format!(
                "{} payload bytes received, {} announced",
                self.bytes, self.manifest.payload_len
            )));
        }
        let actual = self.model.hash();
        if actual != self.manifest.hash {
            return Err(DownlinkError::HashMismatch {
                announced: self.manifest.hash,
                actual,
            });
        }
        Ok(self.model)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::encoding::Encoding;
    use crate::model::{ModelSpec, TensorSpec};
    use crate::payload::{decode_payload, encode_payload};

    fn spec() -> ModelSpec {
        ModelSpec::new(vec![
            TensorSpec::f32("a", vec![5]),
            TensorSpec::f32("b", vec![2, 3]),
        ])
        .unwrap()
    }

    fn models() -> (FlatModel, FlatModel) {
        let base =
            FlatModel::new(spec(), (0..11).map(|i| i as f32 * 0.37 - 1.0).collect()).unwrap();
        let update = FlatModel::new(
            spec(),
            (0..11).map(|i| (i as f32 * 0.91).sin() * 0.01).collect(),
        )
        .unwrap();
        (base, update)
    }

    /// What the coordinator publishes: base + decoded update; and the
    /// manifest it sends.
    fn publish(
        base: &FlatModel,
        update: &FlatModel,
        enc: Encoding,
    ) -> (FlatModel, UpdateManifest, Vec<Vec<u8>>) {
        let (records, summary) = encode_payload(update, enc, 9).unwrap();
        let decoded = decode_payload(spec(), enc, records.iter().map(Vec::as_slice)).unwrap();
        let mut published = base.clone();
        apply_update(published.values_mut(), 0, decoded.values()).unwrap();
        let manifest = UpdateManifest {
            base: base.hash(),
            hash: published.hash(),
            spec: spec(),
            encoding: enc,
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
        };
        (published, manifest, records)
    }

    #[test]
    fn apply_update_adds_in_f32_and_refuses_what_does_not_fit() {
        let mut m = vec![1.0f32, 2.0, 3.0];
        apply_update(&mut m, 1, &[0.5, -1.0]).unwrap();
        assert_eq!(m, vec![1.0, 2.5, 2.0]);
        assert!(matches!(
            apply_update(&mut m, 2, &[1.0, 1.0]),
            Err(DownlinkError::OutOfRange {
                offset: 2,
                len: 2,
                params: 3
            })
        ));
        assert!(matches!(
            apply_update(&mut m, u64::MAX, &[1.0]),
            Err(DownlinkError::OutOfRange { .. })
        ));
        let mut big = vec![f32::MAX];
        assert!(matches!(
            apply_update(&mut big, 0, &[f32::MAX]),
            Err(DownlinkError::NonFinite(0))
        ));
    }

    #[test]
    fn a_site_applying_the_records_holds_the_published_model_bit_for_bit() {
        let (base, update) = models();
        for codec in [
            ValueCodec::F32,
            ValueCodec::F16,
            ValueCodec::Bf16,
            ValueCodec::Int8 { stochastic: false },
            ValueCodec::Int8 { stochastic: true },
        ] {
            let enc = Encoding::with_codec(codec)
                .unwrap()
                .with_chunk_bytes(16)
                .unwrap();
            let (published, manifest, records) = publish(&base, &update, enc);
            let mut a = UpdateApplier::new(manifest, base.clone(), 11).unwrap();
            for r in &records {
                a.push(r).unwrap();
            }
            assert_eq!(a.remaining(), 0);
            let got = a.finish().unwrap();
            assert_eq!(got.hash(), published.hash(), "{}", codec.name());
            if codec == ValueCodec::F32 {
                // Lossless: exactly the plain element-wise sum.
                let plain: Vec<f32> = base
                    .values()
                    .iter()
                    .zip(update.values())
                    .map(|(x, u)| x + u)
                    .collect();
                assert_eq!(got.values(), plain.as_slice());
            }
        }
    }

    #[test]
    fn a_wrong_base_spec_codec_or_count_is_refused_before_decoding() {
        let (base, update) = models();
        let enc = Encoding::with_codec(ValueCodec::F16)
            .unwrap()
            .with_chunk_bytes(16)
            .unwrap();
        let (_, manifest, _) = publish(&base, &update, enc);
        let refused = |m: UpdateManifest, b: FlatModel, max: u64| {
            matches!(
                UpdateApplier::new(m, b, max),
                Err(DownlinkError::Manifest(_))
            )
        };
        assert!(
            refused(manifest.clone(), base.clone(), 10),
            "too many params"
        );
        assert!(refused(manifest.clone(), update.clone(), 11), "other base");
        let mut m = manifest.clone();
        m.num_chunks += 1;
        assert!(refused(m, base.clone(), 11), "chunk count");
        let mut m = manifest.clone();
        m.payload_len = u64::MAX;
        assert!(refused(m, base.clone(), 11), "payload bound");
        let mut m = manifest.clone();
        m.encoding = Encoding::with_codec(ValueCodec::TopK {
            per_million: 10_000,
        })
        .unwrap()
        .with_chunk_bytes(16)
        .unwrap();
        assert!(refused(m, base.clone(), 11), "top-k");
        let other = FlatModel::zeros(ModelSpec::new(vec![TensorSpec::f32("a", vec![11])]).unwrap());
        assert!(refused(manifest, other, 11), "spec");
    }

    #[test]
    fn a_garbled_or_wrong_update_is_an_error_never_a_model() {
        let (base, update) = models();
        let enc = Encoding::with_codec(ValueCodec::F16)
            .unwrap()
            .with_chunk_bytes(16)
            .unwrap();
        let (_, manifest, records) = publish(&base, &update, enc);
        // Valid records of another update: decodes, but the result's hash
        // is not the announced one.
        let other = FlatModel::new(spec(), vec![0.25; 11]).unwrap();
        let (wrong, _) = encode_payload(&other, enc, 9).unwrap();
        let mut m = manifest.clone();
        m.payload_len = wrong.iter().map(|r| r.len() as u64).sum();
        let mut a = UpdateApplier::new(m, base.clone(), 11).unwrap();
        for r in &wrong {
            a.push(r).unwrap();
        }
        assert!(matches!(
            a.finish(),
            Err(DownlinkError::HashMismatch { .. })
        ));
        // A flipped byte in a record's body.
        let mut bad = records.clone();
        let last = bad[0].len() - 1;
        bad[0][last] ^= 0xff;
        let mut a = UpdateApplier::new(manifest.clone(), base.clone(), 11).unwrap();
        let r = bad.iter().try_for_each(|r| a.push(r));
        assert!(r.is_err() || a.finish().is_err());
        // Too few, too many records.
        let mut a = UpdateApplier::new(manifest.clone(), base.clone(), 11).unwrap();
        a.push(&records[0]).unwrap();
        assert!(a.finish().is_err());
        let mut a = UpdateApplier::new(manifest, base, 11).unwrap();
        for r in &records {
            a.push(r).unwrap();
        }
        assert!(matches!(a.push(&records[0]), Err(DownlinkError::Length(_))));
    }
}
