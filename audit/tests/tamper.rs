//! Every kind of tampering is detected, and the first bad entry is named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use fedlink_audit::{AuditLog, FailureKind, SignedHead, VerifyFailure, verify, verify_chain};
use serde_json::json;

const N: u64 = 6;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// A log of `N` entries; `salt` makes logs differ from the first entry on.
fn make_log(dir: &Path, name: &str, key: SigningKey, salt: &str) -> (PathBuf, SignedHead) {
    let path = dir.join(name);
    let mut log = AuditLog::open(&path, key).unwrap();
    for i in 0..N {
        log.append(
            1_000 * (i + 1),
            "fedlink://fed/site/a",
            "update.received",
            &json!({"site": "a", "round": i, "salt": salt, "payload": format!("{:064x}", i)}),
        )
        .unwrap();
    }
    let head = log.signed_head(99_000).unwrap();
    (path, head)
}

fn lines(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    data.split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    std::fs::write(path, lines.concat()).unwrap();
}

fn check(path: &Path, head: Option<&SignedHead>) -> Result<u64, VerifyFailure> {
    verify(&[path], &key().verifying_key(), head).map(|r| r.entries)
}

#[test]
fn untouched_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = make_log(dir.path(), "a.jsonl", key(), "a");
    assert_eq!(check(&path, Some(&head)).unwrap(), N);
    assert_eq!(verify_chain(&[&path], Some(&head)).unwrap().entries, N);
}

#[test]
fn every_flipped_byte_is_detected_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = make_log(dir.path(), "a.jsonl", key(), "a");
    let original = lines(&path);
    let tampered = dir.path().join("t.jsonl");
    for (li, line) in original.iter().enumerate() {
        for pos in 0..line.len() {
            // One flip per byte, cycling through low, case and high bits.
            {
                let mask = [0x01u8, 0x20, 0x80][pos % 3];
                let mut ls = original.clone();
                ls[li][pos] ^= mask;
                write_lines(&tampered, &ls);
                // With the key: named at the flipped line itself.
                let f = check(&tampered, None).expect_err("flip not detected");
                assert_eq!(
                    f.line,
                    Some(li as u64 + 1),
                    "line {} byte {pos} ^{mask:#x}: {f}",
                    li + 1
                );
                assert_eq!(f.file.as_deref(), Some(tampered.as_path()));
                // Without the key but with a head, still detected.
                assert!(
                    verify_chain(&[&tampered], Some(&head)).is_err(),
                    "line {} byte {pos}: chain+head missed it",
                    li + 1
                );
            }
        }
    }
}

#[test]
fn an_edited_value_is_a_bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_log(dir.path(), "a.jsonl", key(), "a");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"round\":2", "\"round\":7", 1)).unwrap();
    let f = check(&path, None).unwrap_err();
    assert_eq!((f.line, f.seq), (Some(3), Some(2)));
    assert_eq!(*f.kind, FailureKind::BadSignature);
    assert!(
        f.to_string()
            .contains("a.jsonl:3: entry seq 2: bad signature"),
        "{f}"
    );
    // Chain only: the next entry's prev no longer matches.
    let f = verify_chain(&[&path], None).unwrap_err();
    assert_eq!(f.line, Some(4));
    assert!(matches!(*f.kind, FailureKind::ChainBreak { .. }));
}

#[test]
fn a_deleted_line_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = make_log(dir.path(), "a.jsonl", key(), "a");
    let original = lines(&path);
    for del in 0..original.len() - 1 {
        let mut ls = original.clone();
        ls.remove(del);
        write_lines(&path, &ls);
        let f = check(&path, None).unwrap_err();
        assert_eq!(f.line, Some(del as u64 + 1));
        assert_eq!(
            *f.kind,
            FailureKind::SeqMismatch {
                expected: del as u64,
                found: del as u64 + 1
            }
        );
        assert!(verify_chain(&[&path], None).is_err());
    }
    // Deleting the last line is a truncation: only the head reveals it.
    let mut ls = original.clone();
    ls.pop();
    write_lines(&path, &ls);
    assert_eq!(check(&path, None).unwrap(), N - 1);
    let f = check(&path, Some(&head)).unwrap_err();
    assert_eq!(
        *f.kind,
        FailureKind::Truncated {
            last_seq: Some(N - 2),
            head_seq: N - 1
        }
    );
    assert_eq!(f.line, Some(N));
}

#[test]
fn an_inserted_forged_line_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_log(dir.path(), "a.jsonl", key(), "a");
    let original = lines(&path);
    // The forger writes a well-formed entry at seq 3 chained to entry 2,
    // signed with their own key, and inserts it before the real entry 3.
    let forger_path = dir.path().join("forger.jsonl");
    {
        // Chained to the real entry 2; the forger has no key, so the
        // signature is made up.
        let real: Vec<_> = fedlink_audit::EntryReader::new(&[&path])
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut line = serde_json::to_vec(&fedlink_audit::Entry {
            seq: 3,
            ts_unix_ms: 3_500,
            actor: "fedlink://fed/site/a".into(),
            event: "update.received".into(),
            details: json!({"site": "a", "round": 3, "salt": "forged"}),
            prev: real[2].hash,
            sig: "ab".repeat(64),
        })
        .unwrap();
        line.push(b'\n');
        std::fs::write(&forger_path, &line).unwrap();
    }
    let forged = std::fs::read(&forger_path).unwrap();
    let mut ls = original.clone();
    ls.insert(3, forged);
    write_lines(&path, &ls);
    let f = check(&path, None).unwrap_err();
    assert_eq!((f.line, f.seq), (Some(4), Some(3)));
    assert_eq!(*f.kind, FailureKind::BadSignature);
    // Without the key, the real entry 3 that follows is out of sequence.
    let f = verify_chain(&[&path], None).unwrap_err();
    assert_eq!(f.line, Some(5));
    assert_eq!(
        *f.kind,
        FailureKind::SeqMismatch {
            expected: 4,
            found: 3
        }
    );
}

#[test]
fn a_duplicated_line_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_log(dir.path(), "a.jsonl", key(), "a");
    let mut ls = lines(&path);
    let dup = ls[2].clone();
    ls.insert(3, dup);
    write_lines(&path, &ls);
    let f = check(&path, None).unwrap_err();
    assert_eq!((f.line, f.seq), (Some(4), Some(2)));
    assert_eq!(
        *f.kind,
        FailureKind::SeqMismatch {
            expected: 3,
            found: 2
        }
    );
}

#[test]
fn swapped_lines_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = make_log(dir.path(), "a.jsonl", key(), "a");
    let original = lines(&path);
    for i in 0..original.len() - 1 {
        let mut ls = original.clone();
        ls.swap(i, i + 1);
        write_lines(&path, &ls);
        let f = check(&path, Some(&head)).unwrap_err();
        assert_eq!(f.line, Some(i as u64 + 1), "swap {i}: {f}");
        assert_eq!(
            *f.kind,
            FailureKind::SeqMismatch {
                expected: i as u64,
                found: i as u64 + 1
            }
        );
    }
}

#[test]
fn a_truncated_tail_is_detected_against_the_signed_head() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = make_log(dir.path(), "a.jsonl", key(), "a");
    let original = lines(&path);
    for keep in 0..original.len() {
        write_lines(&path, &original[..keep]);
        // The prefix alone is a valid log...
        assert_eq!(check(&path, None).unwrap(), keep as u64);
        // ...but not against the head.
        let f = check(&path, Some(&head)).unwrap_err();
        assert_eq!(
            *f.kind,
            FailureKind::Truncated {
                last_seq: keep.checked_sub(1).map(|k| k as u64),
                head_seq: N - 1
            }
        );
        assert_eq!(f.line, Some(keep as u64 + 1));
        assert!(f.to_string().contains("truncated"), "{f}");
    }
    // Cut in the middle of a line.
    let mut data = original.concat();
    data.truncate(data.len() - 10);
    std::fs::write(&path, &data).unwrap();
    let f = check(&path, Some(&head)).unwrap_err();
    assert_eq!(f.line, Some(N));
    assert!(matches!(*f.kind, FailureKind::TornLine { .. }));
}

#[test]
fn a_head_of_another_log_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = make_log(dir.path(), "a.jsonl", key(), "a");
    let (_, head_b) = make_log(dir.path(), "b.jsonl", key(), "b");
    let f = check(&a, Some(&head_b)).unwrap_err();
    assert_eq!((f.line, f.seq), (Some(N), Some(N - 1)));
    assert!(matches!(*f.kind, FailureKind::HeadMismatch { .. }));
    // A head signed by another key.
    let (_, head_c) = make_log(dir.path(), "c.jsonl", SigningKey::from_bytes(&[9; 32]), "a");
    let f = check(&a, Some(&head_c)).unwrap_err();
    assert_eq!(*f.kind, FailureKind::HeadSignature);
}

#[test]
fn spliced_entries_from_another_log_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = make_log(dir.path(), "a.jsonl", key(), "a");
    let (b, _) = make_log(dir.path(), "b.jsonl", key(), "b");
    let (c, _) = make_log(dir.path(), "c.jsonl", SigningKey::from_bytes(&[9; 32]), "c");
    let la = lines(&a);
    let lb = lines(&b);
    let lc = lines(&c);
    let out = dir.path().join("spliced.jsonl");

    // Same key, other log: one entry replaced — the chain breaks there.
    let mut ls = la.clone();
    ls[3] = lb[3].clone();
    write_lines(&out, &ls);
    let f = check(&out, None).unwrap_err();
    assert_eq!((f.line, f.seq), (Some(4), Some(3)));
    assert!(matches!(*f.kind, FailureKind::ChainBreak { .. }));

    // Same key, other log's whole tail.
    let mut ls = la[..2].to_vec();
    ls.extend_from_slice(&lb[2..]);
    write_lines(&out, &ls);
    let f = check(&out, None).unwrap_err();
    assert_eq!((f.line, f.seq), (Some(3), Some(2)));
    assert!(matches!(*f.kind, FailureKind::ChainBreak { .. }));

    // Another key: a bad signature at the spliced line.
    let mut ls = la.clone();
    ls[1] = lc[1].clone();
    write_lines(&out, &ls);
    let f = check(&out, None).unwrap_err();
    assert_eq!((f.line, f.seq), (Some(2), Some(1)));
    assert_eq!(*f.kind, FailureKind::BadSignature);

    // A whole log by another key.
    let f = check(&c, None).unwrap_err();
    assert_eq!(f.line, Some(1));
    assert_eq!(*f.kind, FailureKind::BadSignature);
}

#[test]
fn files_in_the_wrong_order_or_missing_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, key()).unwrap();
    for i in 0..3 {
        log.append(i, "system", "a.b", &json!({})).unwrap();
    }
    let r1 = log.rotate().unwrap();
    for i in 3..6 {
        log.append(i, "system", "a.b", &json!({})).unwrap();
    }
    let r2 = log.rotate().unwrap();
    log.append(6, "system", "a.b", &json!({})).unwrap();
    // A rotated file missing from the middle.
    let f = verify(&[&r1, &path], &key().verifying_key(), None).unwrap_err();
    assert_eq!(f.file.as_deref(), Some(path.as_path()));
    assert_eq!(
        *f.kind,
        FailureKind::SeqMismatch {
            expected: 3,
            found: 6
        }
    );
    assert!(verify(&[&r2, &r1, &path], &key().verifying_key(), None).is_err());
    assert!(verify(&[&r1, &r2, &path], &key().verifying_key(), None).is_ok());
}

#[test]
fn garbage_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_log(dir.path(), "a.jsonl", key(), "a");
    let original = lines(&path);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"\n".to_vec()),
        ("not json", b"hello\n".to_vec()),
        ("array", b"[1,2]\n".to_vec()),
        ("invalid utf-8", vec![0xff, 0xfe, b'\n']),
        ("unknown member", {
            let mut l = original[2].clone();
            l.splice(1..1, b"\"extra\":1,".iter().copied());
            l
        }),
        ("sig not last", {
            // Move `sig` to the front: valid JSON, same values.
            let e: serde_json::Value =
                serde_json::from_slice(&original[2][..original[2].len() - 1]).unwrap();
            let sig = e["sig"].as_str().unwrap().to_owned();
            let mut text = String::from_utf8(original[2].clone()).unwrap();
            text = text.replace(&format!(",\"sig\":\"{sig}\""), "");
            text = text.replacen('{', &format!("{{\"sig\":\"{sig}\","), 1);
            text.into_bytes()
        }),
    ];
    for (what, bad) in cases {
        let mut ls = original.clone();
        ls[2] = bad;
        write_lines(&path, &ls);
        let f = check(&path, None).unwrap_err();
        assert_eq!(f.line, Some(3), "{what}: {f}");
        assert!(
            matches!(*f.kind, FailureKind::Malformed(_) | FailureKind::EmptyLine),
            "{what}: {f}"
        );
    }
}
