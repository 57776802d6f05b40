//! Fuzz target bodies for what fedlink reads from disk: audit logs, model
//! files, the coordinator's store, round archives, configuration files,
//! certificate kits and a site's imaging files (DICOM, NIfTI). Each body writes the input where the real reader looks
//! for it (a scratch directory, on tmpfs when there is one) and calls the
//! same public function the services call at start or on review.

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fedlink_audit::{AuditLog, EntryReader, Verifier};
use fedlink_coordinator::round::{JobRunner, RoundConfig};
use fedlink_coordinator::round_archive::RoundFile;
use fedlink_coordinator::store::{DB_FILE, MODELS_DIR, Store, read_model_file};
use fedlink_protocol::{FederationId, FlatModel, JobId, ModelSpec, ReplayGuard};
use redb::{Database, Durability, TableDefinition};

/// The key every audit-log seed is signed with (so that mutations of a valid
/// log reach the writer's `open` and the signature checks).
pub const AUDIT_SEED_KEY: [u8; 32] = [7; 32];

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// A fresh, empty directory `name` inside this thread's scratch directory.
fn scratch(name: &str) -> PathBuf {
    let root = SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            let shm = Path::new("/dev/shm");
            let dir = if shm.is_dir() {
                tempfile::Builder::new()
                    .prefix("fedlink-fuzz-")
                    .tempdir_in(shm)
            } else {
                tempfile::Builder::new().prefix("fedlink-fuzz-").tempdir()
            };
            *s = Some(dir.unwrap_or_else(|e| panic!("scratch directory: {e}")));
        }
        s.as_ref().map(|d| d.path().to_path_buf())
    });
    let Some(root) = root else {
        panic!("scratch directory missing")
    };
    let dir = root.join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

fn put(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Audit logs: the input is an `audit.jsonl`. It is verified with and
/// without the seed key, read entry by entry as `fedlink audit show` does,
/// read as a signed head, and opened by the writer (torn-tail repair,
/// full re-verification). Oracle: a log the writer accepts, it continues
/// with an entry that verifies.
pub fn audit_log(data: &[u8]) {
    let dir = scratch("audit_log");
    let path = dir.join("audit.jsonl");
    put(&path, data);
    let key = SigningKey::from_bytes(&AUDIT_SEED_KEY);
    let with_key = Verifier::new().key(key.verifying_key()).verify(&[&path]);
    let chain = Verifier::new().verify(&[&path]);
    if with_key.is_ok() {
        assert!(chain.is_ok(), "signed log verifies but its chain does not");
    }
    for entry in EntryReader::new(&[&path]).take(10_000) {
        if entry.is_err() {
            break;
        }
    }
    let _ = fedlink_audit::read_head(&path);
    if let Ok((mut log, _repair)) = AuditLog::open_repairing(&path, key.clone()) {
        let details = serde_json::json!({ "fuzz": true });
        log.append(u64::MAX / 2, "system", "fuzz.appended", &details)
            .unwrap_or_else(|e| panic!("append to an opened log: {e}"));
        drop(log);
        if let Err(e) = Verifier::new().key(key.verifying_key()).verify(&[&path]) {
            panic!("the writer accepted a log and appended, and it no longer verifies: {e}");
        }
    }
}

/// Model files: the first byte picks the reader, the rest is the file.
/// Even: a coordinator model file (`models/<hash>.bin`: magic, spec length,
/// spec JSON, f32 values) read for the hash of [`seed_model`]; odd: a
/// site's cached model (manifest frame + chunk frames) loaded for that hash
/// and spec. The seeds are those files for [`seed_model`], so mutations
/// get past the hash checks into every later one.
pub fn model_file(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch("model_file");
    let model = seed_model();
    let hash = model.hash();
    if sel % 2 == 0 {
        let path = dir.join("model.bin");
        put(&path, rest);
        if let Ok(read) = read_model_file(&path, &hash) {
            assert_eq!(read.values(), model.values(), "hash matched, values differ");
        }
    } else if let Ok(cache) = fedlink_agent::modelcache::ModelCache::open(dir.join("cache")) {
        put(&cache.path(&hash), rest);
        if let Ok(Some(read)) = cache.load(&hash, model.spec()) {
            assert_eq!(read.values(), model.values(), "hash matched, values differ");
        }
    }
}

/// The small model the model-file seeds hold.
pub fn seed_model() -> &'static FlatModel {
    static MODEL: OnceLock<FlatModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let spec = ModelSpec::new(vec![
            fedlink_protocol::TensorSpec::f32("w", vec![4, 3]),
            fedlink_protocol::TensorSpec::f32("b", vec![3]),
        ])
        .unwrap_or_else(|e| panic!("fixed spec: {e}"));
        FlatModel::new(spec, (0..15).map(|i| i as f32 / 8.0 - 0.5).collect())
            .unwrap_or_else(|e| panic!("fixed model: {e}"))
    })
}

const JOBS: TableDefinition<'_, &str, &str> = TableDefinition::new("jobs");
const ROUNDS: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("rounds");
const SITES: TableDefinition<'_, &str, &str> = TableDefinition::new("sites");
const MODELS: TableDefinition<'_, &str, &str> = TableDefinition::new("models");
const OPTIMIZER: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("optimizer");
const REPLAY: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("replay");

/// One record of a store input (see [`store_records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRecord {
    /// 0 jobs, 1 rounds, 2 sites, 3 models, 4 optimizer, 5 replay, 6 a model
    /// file (`key` is its hash in hex), 7 a `round.json` (key unused).
    pub table: u8,
    /// The key (for rounds: `job` and the round number after a `/`).
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
}

/// Splits a store input into records: `[table u8][key len u8][key]
/// [value len u32 LE][value]`, repeated; a truncated record ends the list.
pub fn store_records(mut data: &[u8]) -> Vec<StoreRecord> {
    let mut out = Vec::new();
    while let Some((&table, rest)) = data.split_first() {
        let Some((&klen, rest)) = rest.split_first() else {
            break;
        };
        let Some((key, rest)) = rest.split_at_checked(usize::from(klen)) else {
            break;
        };
        let Some((len, rest)) = rest.split_at_checked(4) else {
            break;
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some((value, rest)) = rest.split_at_checked(len) else {
            break;
        };
        out.push(StoreRecord {
            table,
            key: String::from_utf8_lossy(key).into_owned(),
            value: value.to_vec(),
        });
        data = rest;
    }
    out
}

/// Encodes records in the [`store_records`] layout (for seeds).
pub fn encode_store_records(records: &[StoreRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        let key = &r.key.as_bytes()[..r.key.len().min(255)];
        out.push(r.table);
        out.push(key.len() as u8);
        out.extend_from_slice(key);
        out.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.value);
    }
    out
}

/// The coordinator's store: the input is a list of raw records written into
/// a fresh database (and model files and a `round.json` beside it); then
/// the coordinator's start-up path runs on it: open, list jobs, sites and
/// rounds, recover every job (job TOML, model file, in-flight round), decode
/// its replay state, re-open the round, and resume the round machine.
pub fn store(data: &[u8]) {
    let dir = scratch("store");
    let records = store_records(data);
    if let Err(e) = write_raw_store(&dir, &records) {
        panic!("writing raw records: {e}");
    }
    for r in records.iter().filter(|r| r.table % 8 == 7) {
        let _ = RoundFile::parse(&r.value, Path::new("round.json"));
    }
    let Ok(store) = Store::open(&dir) else {
        return;
    };
    let _ = store.sites();
    let Ok(jobs) = store.jobs() else {
        return;
    };
    let federation = FederationId::new("fuzz").unwrap_or_else(|e| panic!("{e}"));
    for job in jobs.iter().take(8) {
        let _ = store.rounds(&job.id);
        let _ = store.optimizer_state(&job.id);
        let Ok(rec) = store.recover(&job.id) else {
            continue;
        };
        // As the coordinator does at start (server::serve_job).
        let mut replay: ReplayGuard = match store.replay_state(&job.id) {
            Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(_) => continue,
            },
            Ok(None) => ReplayGuard::new(),
            Err(_) => continue,
        };
        if let (Some(r), Ok(id)) = (rec.reopened_round, JobId::new(&job.id)) {
            replay.reopen_round(&federation, &id, r);
        }
        let mut runner = JobRunner::resume(RoundConfig::from_job(&rec.job), rec.snapshot);
        let t0 = Instant::now();
        for step in 0..4u64 {
            while runner.poll_action().is_some() {}
            runner.handle(
                t0 + Duration::from_secs(step * 3600),
                fedlink_coordinator::round::Input::Timeout,
            );
        }
    }
}

/// Writes `records` into a fresh database in `dir` (the [`store`] target's
/// first step; public for the seed test).
#[allow(clippy::result_large_err)] // redb's error type; a fuzz harness
pub fn write_raw_store(dir: &Path, records: &[StoreRecord]) -> Result<(), redb::Error> {
    let db = Database::create(dir.join(DB_FILE))?;
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::None);
    {
        let mut jobs = txn.open_table(JOBS)?;
        let mut rounds = txn.open_table(ROUNDS)?;
        let mut sites = txn.open_table(SITES)?;
        let mut models = txn.open_table(MODELS)?;
        let mut optimizer = txn.open_table(OPTIMIZER)?;
        let mut replay = txn.open_table(REPLAY)?;
        for r in records {
            let text = String::from_utf8_lossy(&r.value);
            match r.table % 8 {
                0 => drop(jobs.insert(r.key.as_str(), text.as_ref())?),
                1 => {
                    let (job, n) = r.key.rsplit_once('/').unwrap_or((r.key.as_str(), "0"));
                    let n = n.parse::<u64>().unwrap_or(0);
                    drop(rounds.insert((job, n), text.as_ref())?);
                }
                2 => drop(sites.insert(r.key.as_str(), text.as_ref())?),
                3 => drop(models.insert(r.key.as_str(), text.as_ref())?),
                4 => drop(optimizer.insert(r.key.as_str(), r.value.as_slice())?),
                5 => drop(replay.insert(r.key.as_str(), r.value.as_slice())?),
                6 => {
                    // A file name, never a path: keep the fuzzer inside dir.
                    let name: String = r
                        .key
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric())
                        .take(64)
                        .collect();
                    if !name.is_empty() {
                        put(&dir.join(MODELS_DIR).join(format!("{name}.bin")), &r.value);
                    }
                }
                _ => {}
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Configuration files and kits: the first byte picks the file, the rest is
/// its content. 0 `coordinator.toml`, 1 a job file, 2 `site.toml`,
/// 3 `sites.toml` (the site manifest), 4 `revoked.toml`, 5..=9 one file of
/// a valid site kit replaced (`kit.toml`, CA certificate, certificate, key,
/// update key), then the kit loaded.
pub fn config(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch("config");
    let text = String::from_utf8_lossy(rest);
    match sel % 10 {
        0 => {
            let _ = fedlink_coordinator::config::CoordinatorConfig::from_toml(
                &text,
                Path::new("coordinator.toml"),
                &dir,
            );
        }
        1 => {
            let _ = fedlink_coordinator::job::Job::from_toml(&text);
        }
        2 => {
            let _ = fedlink_agent::SiteConfig::parse(&text, Path::new("site.toml"), &dir);
        }
        3 => {
            let path = dir.join("sites.toml");
            put(&path, rest);
            let _ = fedlink_certs::SiteManifest::load(&path);
        }
        4 => {
            let path = dir.join("revoked.toml");
            put(&path, rest);
            let _ = fedlink_certs::RevokedFile::load(&path);
        }
        n => {
            let kit = dir.join("kit");
            copy_dir(seed_kit(), &kit);
            let file = KIT_FILES[usize::from(n - 5)];
            put(&kit.join(file), rest);
            let _ = fedlink_certs::Kit::load(&kit);
        }
    }
}

/// The files of a site kit, in the order [`config`]'s selectors 5..=9 name them.
pub const KIT_FILES: [&str; 5] = [
    fedlink_certs::KIT_FILE,
    fedlink_certs::CA_CERT_FILE,
    fedlink_certs::CERT_FILE,
    fedlink_certs::KEY_FILE,
    fedlink_certs::UPDATE_KEY_FILE,
];

/// A valid site kit, issued once per process by the test PKI.
pub fn seed_kit() -> &'static Path {
    static PKI: OnceLock<fedlink_test_util::TestPki> = OnceLock::new();
    let pki = PKI.get_or_init(|| {
        fedlink_test_util::TestPki::new(1).unwrap_or_else(|e| panic!("test PKI: {e}"))
    });
    pki.site_dir(0)
        .unwrap_or_else(|e| panic!("test PKI site: {e}"))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("{e}"));
        if entry.path().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name()))
                .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        }
    }
}

/// Most values one fuzzed DICOM slice may decode to (a 4096 × 4096 slice),
/// so that a hostile `Rows` × `Columns` is refused by the bound, not by the
/// fuzzer's memory limit.
const IMAGING_BUDGET: usize = 1 << 24;

/// A site's imaging file, as its dataset loader reads it: first byte even, a
/// DICOM slice (`data::dicom::decode_slice`: parse, attribute checks, pixel
/// data, rescale; compressed pixel data is refused); odd, a NIfTI-1 file, plain or gzip
/// (`data::nifti::decode_nifti`). Oracle: what decodes holds exactly as many
/// values as its dimensions say, all finite for NIfTI.
pub fn imaging(data: &[u8]) {
    use fedlink_agent::data::{dicom, nifti};
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if sel % 2 == 0 {
        if let Ok(s) = dicom::decode_slice(Path::new("fuzz.dcm"), rest, IMAGING_BUDGET) {
            assert_eq!(s.values.len(), s.size.0 * s.size.1);
        }
    } else if let Ok(v) = nifti::decode_nifti(Path::new("fuzz.nii"), rest) {
        assert_eq!(v.values.len(), v.dims.iter().product::<usize>());
        assert!(v.values.iter().all(|x| x.is_finite()));
    }
}
