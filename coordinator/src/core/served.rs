//! Which model versions the coordinator serves for download, and which
//! files of its `models/` directory are pruned.
//!
//! ```text
//!  a round's model published ──▶ Served::publish(hash, file) ──▶ the version no longer served (its file is removed)
//!  start: the directory's names + the served hashes ──▶ models_to_prune ──▶ the names to remove
//!  a round's update published: names + its name ──▶ updates_to_prune ──▶ the names to remove
//!  restart: names + the job's downlink encoding ──▶ update_to_serve_again ──▶ the one file to read back
//!           its record headers ──▶ update_fits ──▶ served again, or whole models only
//! ```
//!
//! The driver lists the directory, reads the record headers and removes
//! files (`store::wire`); this module names the files
//! ([`wire_file_name`], [`update_file_name`]) and decides.
//!
//! Served: the current global model (what offers, the final evaluation and
//! a site's fetch or resumed fetch name) and the one before it, for one
//! round more: a download that looked its version up just before a round's
//! end still finds and opens the file. Older versions are not served again:
//! a site asking for one is refused (`unknown model version`) and its next
//! offer names the current model, as after a restart, which serves the
//! current model only. A site holding an older model gets the whole
//! current model, never an update from it: only the latest round's update
//! is served and kept.

use std::sync::Arc;

use fedlink_protocol::payload::ChunkHeader;
use fedlink_protocol::{Encoding, ModelHash, ModelSpec};

/// File name suffix of a model's wire file (`<hash>.wire`).
const WIRE_SUFFIX: &str = ".wire";
/// File name extension of update files (`<base>-<hash>.update`).
const UPDATE_EXTENSION: &str = "update";

/// The file name of model `hash`'s wire form: `<hash>.wire` (lower-case
/// hex).
pub fn wire_file_name(hash: &ModelHash) -> String {
    format!("{}{WIRE_SUFFIX}", hash.to_hex())
}

/// The file name of the update from model `base` to model `hash`:
/// `<base>-<hash>.update`.
pub fn update_file_name(base: &ModelHash, hash: &ModelHash) -> String {
    format!("{}-{}.{UPDATE_EXTENSION}", base.to_hex(), hash.to_hex())
}

/// The name an update is written under until its resulting model's hash is
/// known: `<base>-next.update` (an update file too: pruned like one).
pub fn update_staging_name(base: &ModelHash) -> String {
    format!("{}-next.{UPDATE_EXTENSION}", base.to_hex())
}

/// The model versions served in wire form, each with the driver's handle
/// on it (`T`: its file's description): the current version and the one
/// before it (see the module's docs).
#[derive(Debug)]
pub struct Served<T> {
    current: Option<(ModelHash, Arc<T>)>,
    previous: Option<(ModelHash, Arc<T>)>,
}

impl<T> Default for Served<T> {
    fn default() -> Self {
        Self {
            current: None,
            previous: None,
        }
    }
}

impl<T> Served<T> {
    fn versions(&self) -> impl Iterator<Item = &(ModelHash, Arc<T>)> {
        [&self.current, &self.previous].into_iter().flatten()
    }

    /// The served version `hash`, if it is one.
    pub fn get(&self, hash: &ModelHash) -> Option<Arc<T>> {
        self.versions()
            .find(|(h, _)| h == hash)
            .map(|(_, v)| v.clone())
    }

    /// Serve `version` (model `hash`) as the current version; the current
    /// one becomes the previous one (unless it is `hash` again), the
    /// previous one is dropped and returned: its file is no longer served
    /// (`None` if nothing was dropped, or what was dropped is `hash`).
    pub fn publish(&mut self, hash: ModelHash, version: T) -> Option<Arc<T>> {
        let new = (hash, Arc::new(version));
        let dropped = match self.current.take() {
            Some(c) if c.0 == hash => None,
            Some(c) => self.previous.replace(c),
            None => None,
        };
        self.current = Some(new);
        dropped
            .filter(|(h, _)| self.get(h).is_none())
            .map(|(_, v)| v)
    }

    /// The hashes of the served versions, the current one first.
    pub fn hashes(&self) -> Vec<ModelHash> {
        self.versions().map(|(h, _)| *h).collect()
    }
}

/// The wire files among `names` (a listing of `models/`) that are not
/// served: every `<hash>.wire` whose name is not that of a version in
/// `served` (at start, files an earlier run served). Nothing when nothing
/// is served (the served versions are not known: nothing is known to be
/// unserved). `.bin` model files, update files and other names are never
/// chosen.
pub fn models_to_prune<'a>(
    names: impl IntoIterator<Item = &'a str>,
    served: &[ModelHash],
) -> Vec<&'a str> {
    if served.is_empty() {
        return Vec::new();
    }
    let keep: Vec<String> = served.iter().map(wire_file_name).collect();
    names
        .into_iter()
        .filter(|n| {
            n.strip_suffix(WIRE_SUFFIX)
                .and_then(ModelHash::from_hex)
                .is_some()
                && !keep.iter().any(|k| k == n)
        })
        .collect()
}

/// Whether `name`'s extension is `update` (as `Path::extension` reads it:
/// a name that only starts with the dot has none).
fn is_update_file(name: &str) -> bool {
    matches!(name.rsplit_once('.'), Some((stem, ext)) if ext == UPDATE_EXTENSION && !stem.is_empty())
}

/// The update files among `names` (a listing of `models/`) but `keep`
/// (the name of the update being served, if one is): only the latest
/// round's update is served, older ones never again; an update written
/// under its staging name and left by a failure goes too.
pub fn updates_to_prune<'a>(
    names: impl IntoIterator<Item = &'a str>,
    keep: Option<&str>,
) -> Vec<&'a str> {
    names
        .into_iter()
        .filter(|n| is_update_file(n) && Some(*n) != keep)
        .collect()
}

/// An update file a restarted coordinator may serve again, before its
/// records are checked ([`update_fits`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateFile<'a> {
    /// The model the update applies to.
    pub base: ModelHash,
    /// Its file name in the listing.
    pub name: &'a str,
    /// The job's downlink encoding, which its records must have.
    pub encoding: Encoding,
}

/// After a restart, the update file that made the current model `hash`
/// (`<base>-<hash>.update` in `names`, a listing of `models/`): served
/// again to sites holding its base when the job sends updates
/// (`downlink`, its downlink encoding) and exactly one such file is there;
/// otherwise sites get whole models. Its records are checked next
/// ([`update_fits`]).
pub fn update_to_serve_again<'a>(
    downlink: Option<Encoding>,
    hash: &ModelHash,
    names: impl IntoIterator<Item = &'a str>,
) -> Option<UpdateFile<'a>> {
    let encoding = downlink?;
    let suffix = format!("-{}.{UPDATE_EXTENSION}", hash.to_hex());
    let mut found = names.into_iter().filter_map(|name| {
        let base = ModelHash::from_hex(name.strip_suffix(&suffix)?)?;
        Some(UpdateFile {
            base,
            name,
            encoding,
        })
    });
    let one = found.next()?;
    found.next().is_none().then_some(one)
}

/// Whether an update file's record headers (`records`, in file order)
/// were written in `encoding` for a model of `spec`: every record's codec
/// and byte shuffle are the encoding's and there are as many records as
/// the encoding's chunks of the model. A file that does not fit is not
/// served (it is pruned when the next round writes its update).
pub fn update_fits(records: &[ChunkHeader], spec: &ModelSpec, encoding: Encoding) -> bool {
    records
        .iter()
        .all(|h| h.codec_tag == encoding.values().tag() && h.shuffle == encoding.shuffle())
        && records.len() as u64 == spec.num_params().div_ceil(encoding.chunk_elems())
}

#[cfg(test)]
mod tests {
    use fedlink_protocol::{TensorSpec, ValueCodec};

    use super::*;

    fn hash(n: u8) -> ModelHash {
        ModelHash([n; 32])
    }

    #[test]
    fn the_current_and_the_previous_versions_stay_served() {
        let mut served = Served::default();
        assert!(served.hashes().is_empty());
        assert_eq!(served.publish(hash(0), "v0"), None);
        assert_eq!(served.publish(hash(1), "v1"), None);
        for n in 2..6u8 {
            // Publishing version n drops version n - 2.
            let dropped = served.publish(hash(n), "vn");
            assert!(dropped.is_some(), "round {n}");
            assert!(served.get(&hash(n - 2)).is_none(), "round {n}");
            assert_eq!(served.hashes(), vec![hash(n), hash(n - 1)]);
        }
        assert_eq!(served.get(&hash(4)).as_deref(), Some(&"vn"));
        // The current version published again: nothing dropped, the
        // previous one still served.
        assert_eq!(served.publish(hash(5), "v5 again"), None);
        assert_eq!(served.hashes(), vec![hash(5), hash(4)]);
        assert_eq!(served.get(&hash(5)).as_deref(), Some(&"v5 again"));
        // The previous version published again: the two swap, nothing is
        // dropped (its file is still served).
        assert_eq!(served.publish(hash(4), "v4 again"), None);
        assert_eq!(served.hashes(), vec![hash(4), hash(5)]);
    }

    #[test]
    fn unserved_wire_files_are_pruned_and_nothing_else() {
        let served = [hash(1), hash(2)];
        let names = [
            wire_file_name(&hash(1)),
            wire_file_name(&hash(2)),
            wire_file_name(&hash(3)),
            format!("{}.bin", hash(3).to_hex()),
            update_file_name(&hash(1), &hash(2)),
            "notes.wire".to_owned(),
            ".fedlink-tmp-123".to_owned(),
            // Upper-case hex is a model hash but not a served file's name.
            wire_file_name(&hash(0xab))
                .to_uppercase()
                .replace(".WIRE", ".wire"),
        ];
        let pruned = models_to_prune(names.iter().map(String::as_str), &served);
        assert_eq!(pruned, vec![names[2].as_str(), names[7].as_str()]);
        // Nothing is served (not known): nothing is pruned.
        assert!(models_to_prune(names.iter().map(String::as_str), &[]).is_empty());
    }

    #[test]
    fn every_update_file_but_the_served_one_is_pruned() {
        let served = update_file_name(&hash(1), &hash(2));
        let names = [
            served.clone(),
            update_file_name(&hash(0), &hash(1)),
            update_staging_name(&hash(2)),
            "odd.name.update".to_owned(),
            ".update".to_owned(),
            "x.updates".to_owned(),
            wire_file_name(&hash(2)),
        ];
        let listing = || names.iter().map(String::as_str);
        assert_eq!(
            updates_to_prune(listing(), Some(&served)),
            vec![names[1].as_str(), names[2].as_str(), names[3].as_str()]
        );
        assert_eq!(updates_to_prune(listing(), None).len(), 4);
    }

    #[test]
    fn after_a_restart_the_one_update_to_the_current_model_is_served_again_in_the_jobs_encoding() {
        let enc = Encoding::with_codec(ValueCodec::F16).unwrap();
        let current = hash(2);
        let only = update_file_name(&hash(1), &current);
        let other = update_file_name(&hash(0), &hash(1));
        let names = [only.clone(), other.clone(), wire_file_name(&current)];
        let listing = || names.iter().map(String::as_str);
        assert_eq!(
            update_to_serve_again(Some(enc), &current, listing()),
            Some(UpdateFile {
                base: hash(1),
                name: only.as_str(),
                encoding: enc,
            })
        );
        // The job sends whole models: no update.
        assert_eq!(update_to_serve_again(None, &current, listing()), None);
        // None to the current model.
        assert_eq!(update_to_serve_again(Some(enc), &hash(3), listing()), None);
        // Two to it: which one made it is not known.
        let two = [only.clone(), update_file_name(&hash(7), &current)];
        assert_eq!(
            update_to_serve_again(Some(enc), &current, two.iter().map(String::as_str)),
            None
        );
    }

    #[test]
    fn an_update_fits_when_every_record_has_the_jobs_codec_and_the_count_is_right() {
        // 10 values, 4 per chunk: 3 records.
        let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![10])]).unwrap();
        let enc = Encoding::with_codec(ValueCodec::F16)
            .unwrap()
            .with_chunk_bytes(16)
            .unwrap();
        assert_eq!(enc.chunk_elems(), 4);
        let head = |codec: ValueCodec, shuffle: bool| ChunkHeader {
            codec_tag: codec.tag(),
            shuffle,
            offset: 0,
            count: 4,
            raw_len: 8,
            compressed_len: 8,
        };
        let good = head(ValueCodec::F16, enc.shuffle());
        assert!(update_fits(&[good; 3], &spec, enc));
        assert!(!update_fits(&[good; 2], &spec, enc));
        assert!(!update_fits(&[good; 4], &spec, enc));
        let int8 = head(ValueCodec::Int8 { stochastic: false }, enc.shuffle());
        assert!(!update_fits(&[good, int8, good], &spec, enc));
        let unshuffled = head(ValueCodec::F16, !enc.shuffle());
        assert!(!update_fits(&[good, good, unshuffled], &spec, enc));
    }
}
