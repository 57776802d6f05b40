//! Replays the committed corpus through every target body on the stable
//! toolchain (no libFuzzer needed): `cargo test` in `fuzz/`.
use std::fs;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = format!("{}/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f(&data);
        // also every prefix and a few bit flips of each input
        for cut in (0..data.len()).step_by(data.len() / 16 + 1) {
            f(&data[..cut]);
        }
        for i in (0..data.len()).step_by(data.len() / 32 + 1) {
            let mut m = data.clone();
            m[i] ^= 0x5a;
            f(&m);
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus for {target}");
}

#[test]
fn corpus_frame() {
    replay("frame", fedlink_protocol_fuzz::frame);
}

#[test]
fn corpus_message() {
    replay("message", fedlink_protocol_fuzz::message);
}

#[test]
fn corpus_chunk() {
    replay("chunk", fedlink_protocol_fuzz::chunk);
}

#[test]
fn corpus_update() {
    replay("update", fedlink_protocol_fuzz::update);
}

#[test]
fn corpus_admin() {
    replay("admin", fedlink_protocol_fuzz::admin);
}

#[test]
fn corpus_envelope() {
    replay("envelope", fedlink_protocol_fuzz::envelope);
}

#[test]
fn corpus_audit_log() {
    replay("audit_log", fedlink_protocol_fuzz::disk::audit_log);
}

#[test]
fn corpus_model_file() {
    replay("model_file", fedlink_protocol_fuzz::disk::model_file);
}

#[test]
fn corpus_store() {
    replay("store", fedlink_protocol_fuzz::disk::store);
}

#[test]
fn corpus_config() {
    replay("config", fedlink_protocol_fuzz::disk::config);
}

/// The disk seeds are valid inputs: each reaches the end of its reader (a
/// corpus of inputs refused at the first check would fuzz nothing deep).
#[test]
fn disk_seeds_are_accepted_by_their_readers() {
    use fedlink_protocol_fuzz::disk;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let corpus = format!("{}/corpus", env!("CARGO_MANIFEST_DIR"));
    let seed = |t: &str, n: &str| {
        fs::read(format!("{corpus}/{t}/seed-{n}")).unwrap_or_else(|e| panic!("{t}/{n}: {e}"))
    };

    let log = dir.path().join("audit.jsonl");
    fs::write(&log, seed("audit_log", "signed-log")).unwrap_or_else(|e| panic!("{e}"));
    let key = ed25519_dalek::SigningKey::from_bytes(&disk::AUDIT_SEED_KEY);
    let report = fedlink_audit::Verifier::new()
        .key(key.verifying_key())
        .verify(&[&log])
        .unwrap_or_else(|e| panic!("signed-log: {e}"));
    assert_eq!(report.entries, 5);

    let model = seed("model_file", "coordinator-model");
    let path = dir.path().join("m.bin");
    fs::write(&path, &model[1..]).unwrap_or_else(|e| panic!("{e}"));
    let read = fedlink_coordinator::store::read_model_file(&path, &disk::seed_model().hash())
        .unwrap_or_else(|e| panic!("coordinator-model: {e}"));
    assert_eq!(read.values(), disk::seed_model().values());

    let store_dir = dir.path().join("store");
    let records = disk::store_records(&seed("store", "demo-store"));
    assert!(records.iter().any(|r| r.table == 0), "no job record");
    fs::create_dir_all(&store_dir).unwrap_or_else(|e| panic!("{e}"));
    disk::write_raw_store(&store_dir, &records).unwrap_or_else(|e| panic!("{e}"));
    let store =
        fedlink_coordinator::store::Store::open(&store_dir).unwrap_or_else(|e| panic!("{e}"));
    let jobs = store.jobs().unwrap_or_else(|e| panic!("{e}"));
    assert!(!jobs.is_empty());
    for job in jobs {
        let rec = store
            .recover(&job.id)
            .unwrap_or_else(|e| panic!("demo-store job {}: {e}", job.id));
        assert!(rec.snapshot.completed_rounds > 0);
    }
}

#[test]
fn corpus_imaging() {
    replay("imaging", fedlink_protocol_fuzz::disk::imaging);
}
