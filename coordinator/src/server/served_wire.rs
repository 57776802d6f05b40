//! A served model version and its wire form, made when it is first needed.
//!
//! ```text
//!  round's end, whole models ──▶ ServedWire::made(wire)      (encoded beside the round's records)
//!  round's end, downlink     ──▶ ServedWire::on_demand(bin)  (sites holding the base fetch the update)
//!  a site fetches the whole model ──▶ ServedWire::wire() ──▶ made once, from the stored `.bin`
//!                                                            (every fetch of it meanwhile waits for the same one)
//! ```
//!
//! With downlink updates every site that holds the round's base downloads
//! the update; only a site without it (new, or one that missed a round)
//! needs the new model whole. Encoding that lossless wire form at every
//! round's end cost the coordinator ≈ 6 % of its CPU and put ≈ 0.1 s on
//! the round's critical path (docs/PERFORMANCE.md, "Issue #10, session
//! 19"). It is now made the first time a site asks for it, from the model
//! file the round's end has stored (durably, before the version was
//! published), one chunk at a time: [`crate::store::wire::ensure_from_stored`].

use std::path::{Path, PathBuf};

use fedlink_protocol::ModelHash;
use tokio::sync::OnceCell;

use crate::core::served::Served;
use crate::store::wire::{self, WireError, WireModel};

/// The model versions served for download: the current one and the one
/// before it ([`Served`] decides which), each with its wire form or where
/// to make it from.
pub(crate) type ServedModels = Served<ServedWire>;

/// A served model version: its wire form, or the stored model it is made
/// from on first use.
#[derive(Debug)]
pub(crate) struct ServedWire {
    hash: ModelHash,
    /// `(models/, models/<hash>.bin)`: where the wire form is written and
    /// what it is encoded from; `None` when it was made at once.
    source: Option<(PathBuf, PathBuf)>,
    wire: OnceCell<WireModel>,
}

impl ServedWire {
    /// A version whose wire form is written already.
    pub(crate) fn made(wire: WireModel) -> Self {
        Self {
            hash: wire.hash,
            source: None,
            wire: OnceCell::new_with(Some(wire)),
        }
    }

    /// A version stored as `bin` (the store's verified model file, named
    /// by `hash`), whose wire form is written to `models_dir` when a site
    /// first asks for it.
    pub(crate) fn on_demand(models_dir: &Path, bin: PathBuf, hash: ModelHash) -> Self {
        Self {
            hash,
            source: Some((models_dir.to_owned(), bin)),
            wire: OnceCell::new(),
        }
    }

    /// The model's hash.
    pub(crate) fn hash(&self) -> ModelHash {
        self.hash
    }

    /// The wire form if it has been made (its file to remove when the
    /// version is no longer served).
    pub(crate) fn made_already(&self) -> Option<&WireModel> {
        self.wire.get()
    }

    /// The wire form, made now if it is not yet (on a blocking thread;
    /// fetches arriving meanwhile wait for the same one). A failure is
    /// returned to every fetch waiting on it, and the next fetch tries
    /// again.
    pub(crate) async fn wire(&self) -> Result<&WireModel, WireError> {
        self.wire
            .get_or_try_init(|| async {
                let Some((dir, bin)) = self.source.clone() else {
                    // `made` always holds its wire form: unreachable, but
                    // an error rather than a panic.
                    return Err(WireError::Thread);
                };
                let hash = self.hash;
                let started = std::time::Instant::now();
                let made = tokio::task::spawn_blocking(move || {
                    // A fold pass's values buffer: pages the
                    // coordinator holds already, not a fresh chunk's
                    // worth in the middle of a round.
                    let mut values = super::pool::VALUES.take();
                    wire::ensure_from_stored(&dir, &bin, hash, &mut values)
                })
                .await
                .map_err(|_| WireError::Thread)??;
                tracing::info!(
                    model = %hash,
                    ms = started.elapsed().as_millis() as u64,
                    bytes = made.payload_len,
                    "model's wire form made for a whole-model download"
                );
                Ok(made)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};

    fn model(seed: u32, n: u32) -> FlatModel {
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![u64::from(n)])]).unwrap();
        FlatModel::new(
            spec,
            (0..n).map(|i| (i as f32 + seed as f32) * 0.25).collect(),
        )
        .unwrap()
    }

    /// `m` stored in a fresh store: the directory, the model's hash, its
    /// `.bin` and the `models/` directory.
    fn stored(m: &FlatModel) -> (tempfile::TempDir, ModelHash, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let hash = store.put_model(m).unwrap();
        let bin = store.model_path(&hash);
        let models = dir.path().join(crate::store::MODELS_DIR);
        (dir, hash, bin, models)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn made_on_first_use_from_the_stored_model_and_once_for_concurrent_fetches() {
        // Several chunks (the wire form's default chunk is 512 Ki values).
        let m = model(3, 1_300_000);
        let (_dir, hash, bin, models) = stored(&m);
        let served = ServedWire::on_demand(&models, bin, hash);
        assert!(served.made_already().is_none());
        assert!(
            !models
                .join(crate::core::served::wire_file_name(&hash))
                .exists()
        );
        let (a, b) = tokio::join!(served.wire(), served.wire());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(std::ptr::eq(a, b), "one wire form for both fetches");
        assert_eq!(served.made_already().map(|w| w.hash), Some(hash));
        // The same file, byte for byte, as the round's end writes from the
        // model in memory.
        let made = std::fs::read(&a.path).unwrap();
        let other = tempfile::tempdir().unwrap();
        let eager = wire::ensure(other.path(), &m).unwrap();
        assert_eq!(made, std::fs::read(&eager.path).unwrap());
        assert_eq!(
            (a.payload_len, a.num_chunks),
            (eager.payload_len, eager.num_chunks)
        );
        assert_eq!(a.num_chunks, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stored_model_that_does_not_hash_to_its_name_is_not_served_and_is_retried() {
        let (_dir, hash, bin, models) = stored(&model(1, 1000));
        let good = std::fs::read(&bin).unwrap();
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        std::fs::write(&bin, &bad).unwrap();
        let served = ServedWire::on_demand(&models, bin.clone(), hash);
        let err = served.wire().await.unwrap_err().to_string();
        assert!(err.contains("content hash"), "{err}");
        // Nothing was put in place, nothing is left behind.
        assert!(served.made_already().is_none());
        let names: Vec<_> = std::fs::read_dir(&models)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![crate::core::served::wire_file_name(&hash).replace(".wire", ".bin")]
        );
        // Mended (or a passing read error gone): the next fetch makes it.
        std::fs::write(&bin, &good).unwrap();
        assert_eq!(served.wire().await.unwrap().hash, hash);
        // Missing altogether: named as missing.
        std::fs::remove_file(&bin).unwrap();
        let gone = ServedWire::on_demand(&models, bin, model(2, 1000).hash());
        assert!(gone.wire().await.is_err());
    }
}
