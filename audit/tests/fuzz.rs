//! Property tests: garbage and random mutations never make the readers
//! panic, and any change to a valid log is detected (with key and head).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use ed25519_dalek::SigningKey;
use fedlink_audit::{AuditLog, EntryReader, SignedHead, verify, verify_chain};
use proptest::prelude::*;
use serde_json::json;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// A valid 5-entry log and its head, as bytes (built once).
fn valid_log() -> (Vec<u8>, SignedHead) {
    static LOG: std::sync::OnceLock<(Vec<u8>, SignedHead)> = std::sync::OnceLock::new();
    LOG.get_or_init(build_log).clone()
}

fn build_log() -> (Vec<u8>, SignedHead) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let mut log = AuditLog::open(&path, key()).unwrap();
    for i in 0..5u64 {
        log.append(
            i * 10,
            "fedlink://fed/site/a",
            "update.received",
            &json!({"site": "a", "round": i, "ok": i % 2 == 0, "x": 0.1 * i as f64}),
        )
        .unwrap();
    }
    let head = log.signed_head(100).unwrap();
    (std::fs::read(&path).unwrap(), head)
}

fn run_all(path: &Path, head: &SignedHead) -> Result<(), String> {
    // None of these may panic; their result is returned for the caller.
    let with_key = verify(&[path], &key().verifying_key(), Some(head));
    let _ = verify(&[path], &key().verifying_key(), None);
    let _ = verify_chain(&[path], Some(head));
    let _ = verify_chain(&[path], None);
    for item in EntryReader::new(&[path]) {
        let _ = item.map(|e| e.entry.seq);
    }
    with_key.map(|_| ()).map_err(|f| f.to_string())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(p, m)| Mutation::Flip(p, m)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..40)
        )
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 1usize..300).prop_map(|(p, n)| Mutation::Delete(p, n)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    let len = data.len();
    match m {
        Mutation::Flip(p, mask) => {
            if len > 0 {
                data[p % len] ^= mask;
            }
        }
        Mutation::Insert(p, bytes) => {
            let at = p % (len + 1);
            data.splice(at..at, bytes.iter().copied());
        }
        Mutation::Delete(p, n) => {
            if len > 0 {
                let at = p % len;
                let end = (at + n).min(len);
                data.drain(at..end);
            }
        }
        Mutation::Truncate(p) => data.truncate(p % (len + 1)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (_, head) = valid_log();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.jsonl");
        std::fs::write(&path, &data).unwrap();
        // Random bytes are never a valid log vouched for by the head.
        prop_assert!(run_all(&path, &head).is_err());
    }

    #[test]
    fn json_shaped_garbage_never_panics(
        lines in proptest::collection::vec(
            (any::<u64>(), any::<u64>(), "[a-z/:.]{0,20}", "[a-z.]{0,10}", "[0-9a-f]{0,70}", "[0-9a-f]{0,130}"),
            0..6)
    ) {
        let (_, head) = valid_log();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.jsonl");
        let mut data = Vec::new();
        for (seq, ts, actor, event, prev, sig) in &lines {
            data.extend_from_slice(
                format!(
                    "{{\"seq\":{seq},\"ts_unix_ms\":{ts},\"actor\":\"{actor}\",\"event\":\"{event}\",\"details\":{{}},\"prev\":\"{prev}\",\"sig\":\"{sig}\"}}\n"
                )
                .as_bytes(),
            );
        }
        std::fs::write(&path, &data).unwrap();
        // Never valid: no line carries a real signature (and the head needs 5 entries).
        prop_assert!(run_all(&path, &head).is_err());
    }

    #[test]
    fn any_mutation_of_a_valid_log_is_detected(muts in proptest::collection::vec(mutation(), 1..4)) {
        let (original, head) = valid_log();
        let mut data = original.clone();
        for m in &muts {
            apply(&mut data, m);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, &data).unwrap();
        let result = run_all(&path, &head);
        if data == original {
            prop_assert!(result.is_ok(), "{:?}", result);
        } else {
            prop_assert!(result.is_err(), "mutation {:?} not detected", muts);
        }
    }
}
