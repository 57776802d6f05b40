//! Writer, reader, rotation, heads and torn tails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use fedlink_audit::{
    AuditLog, EntryHash, EntryReader, Error, FailureKind, Filter, MAX_LINE_LEN, Verifier,
    read_head, segments, verify, verify_chain,
};
use serde_json::json;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn write_entries(log: &mut AuditLog, from: u64, n: u64) {
    for i in from..from + n {
        log.append(
            1_000 + i,
            "fedlink://fed/site/a",
            "update.received",
            &json!({"site": "a", "round": i, "n": i}),
        )
        .unwrap();
    }
}

fn files(path: &Path) -> Vec<PathBuf> {
    segments(path).unwrap()
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, key()).unwrap();
    assert_eq!(log.head(), None);
    let h0 = log
        .append(
            10,
            "system",
            "coordinator.started",
            &json!({"version": "0.1.0"}),
        )
        .unwrap();
    let h1 = log
        .append(
            20,
            "fedlink://fed/admin/ops",
            "site.approved",
            &json!({"site": "fedlink://fed/site/b", "note": "é \"quoted\"\nnewline", "x": 0.1}),
        )
        .unwrap();
    assert_eq!((h0.seq, h1.seq), (0, 1));
    assert_eq!(log.head(), Some(h1));

    let entries: Vec<_> = EntryReader::new(&[&path])
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].entry.prev, EntryHash::GENESIS);
    assert_eq!(entries[0].hash, h0.hash);
    assert_eq!(entries[1].entry.prev, h0.hash);
    assert_eq!(entries[1].line, 2);
    assert_eq!(entries[1].entry.actor, "fedlink://fed/admin/ops");
    assert_eq!(entries[1].entry.event, "site.approved");
    assert_eq!(entries[1].entry.details["note"], "é \"quoted\"\nnewline");
    assert_eq!(entries[1].entry.ts_unix_ms, 20);

    // The hash of an entry is blake3 of its line.
    let text = std::fs::read_to_string(&path).unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(EntryHash::of_line(first.as_bytes()), h0.hash);
    assert!(first.starts_with(r#"{"seq":0,"ts_unix_ms":10,"actor":"system","event":"coordinator.started","details":{"version":"0.1.0"},"prev":"0000"#));

    let report = verify(&[&path], &log.verifying_key(), None).unwrap();
    assert_eq!(report.entries, 2);
    assert!(report.signatures_checked);
    assert_eq!(report.last, Some(h1));
}

#[cfg(unix)]
#[test]
fn log_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, key()).unwrap();
    write_entries(&mut log, 0, 1);
    log.rotate().unwrap();
    for f in files(&path) {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
}

#[test]
fn reopen_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let head = {
        let mut log = AuditLog::open(&path, key()).unwrap();
        write_entries(&mut log, 0, 3);
        log.head().unwrap()
    };
    let mut log = AuditLog::open(&path, key()).unwrap();
    assert_eq!(log.head(), Some(head));
    let next = log.append(5_000, "system", "x.y", &json!({})).unwrap();
    assert_eq!(next.seq, 3);
    let report = verify(&[&path], &key().verifying_key(), None).unwrap();
    assert_eq!(report.entries, 4);
}

#[test]
fn a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let _log = AuditLog::open(&path, key()).unwrap();
    assert!(matches!(
        AuditLog::open(&path, key()),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn reopening_with_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    {
        let mut log = AuditLog::open(&path, key()).unwrap();
        write_entries(&mut log, 0, 2);
    }
    let err = AuditLog::open(&path, SigningKey::from_bytes(&[8; 32])).unwrap_err();
    let Error::Invalid(f) = err else {
        panic!("{err}")
    };
    assert_eq!(f.line, Some(1));
    assert_eq!(*f.kind, FailureKind::BadSignature);
}

#[test]
fn invalid_entries_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, key()).unwrap();
    for (actor, event, details) in [
        ("", "a.b", json!({})),
        ("sys\u{1b}[2J", "a.b", json!({})),
        ("system", "", json!({})),
        ("system", "a b", json!({})),
        ("system", "a.b", json!([1, 2])),
        ("system", "a.b", json!("text")),
    ] {
        assert!(matches!(
            log.append(1, actor, event, &details),
            Err(Error::InvalidEntry(_))
        ));
    }
    let big = json!({"blob": "x".repeat(MAX_LINE_LEN)});
    assert!(matches!(
        log.append(1, "system", "a.b", &big),
        Err(Error::EntryTooLarge { .. })
    ));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(log.append(1, "system", "a.b", &json!({})).unwrap().seq, 0);
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, key()).unwrap();
    write_entries(&mut log, 0, 3);
    let r1 = log.rotate().unwrap();
    assert_eq!(r1, dir.path().join("audit.000001.jsonl"));
    let anchor = log.head().unwrap();
    write_entries(&mut log, 3, 2);
    let r2 = log.rotate().unwrap();
    assert_eq!(r2, dir.path().join("audit.000002.jsonl"));
    write_entries(&mut log, 5, 1);

    let all = files(&path);
    assert_eq!(all, vec![r1.clone(), r2.clone(), path.clone()]);
    let report = verify(&all, &key().verifying_key(), None).unwrap();
    assert_eq!(report.entries, 6);
    assert_eq!(
        report.files.iter().map(|f| f.seq_range).collect::<Vec<_>>(),
        vec![Some((0, 2)), Some((3, 4)), Some((5, 5))]
    );
    // The first entry of the second file chains from the last of the first.
    let second: Vec<_> = EntryReader::new(&[&r2]).collect::<Result<_, _>>().unwrap();
    assert_eq!(second[0].entry.prev, anchor.hash);
    assert_eq!(second[0].entry.seq, 3);

    // A rotated continuation alone is refused, named at its first line...
    let f = verify(&[&r2], &key().verifying_key(), None).unwrap_err();
    assert_eq!((f.file.as_deref(), f.line), (Some(r2.as_path()), Some(1)));
    assert_eq!(
        *f.kind,
        FailureKind::SeqMismatch {
            expected: 0,
            found: 3
        }
    );
    // ...unless anchored to a trusted head.
    let report = Verifier::new()
        .key(key().verifying_key())
        .start_after(anchor)
        .verify(&[&r2, &path])
        .unwrap();
    assert_eq!(report.entries, 3);
    // Files out of order are refused.
    assert!(verify(&[&r2, &r1, &path], &key().verifying_key(), None).is_err());

    // Reopening after rotation continues from the newest entry.
    drop(log);
    let mut log = AuditLog::open(&path, key()).unwrap();
    assert_eq!(log.head().unwrap().seq, 5);
    // Rotation right before a restart: the new file is empty.
    log.rotate().unwrap();
    drop(log);
    let mut log = AuditLog::open(&path, key()).unwrap();
    assert_eq!(log.append(9, "system", "a.b", &json!({})).unwrap().seq, 6);
    verify(&files(&path), &key().verifying_key(), None).unwrap();
}

#[cfg(unix)]
#[test]
fn an_interrupted_rotation_is_completed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    {
        let mut log = AuditLog::open(&path, key()).unwrap();
        write_entries(&mut log, 0, 2);
    }
    // Crash after the hard link, before the rename.
    std::fs::hard_link(&path, dir.path().join("audit.000001.jsonl")).unwrap();
    let mut log = AuditLog::open(&path, key()).unwrap();
    assert_eq!(log.head().unwrap().seq, 1);
    write_entries(&mut log, 2, 1);
    let all = files(&path);
    assert_eq!(all.len(), 2);
    assert_eq!(
        verify(&all, &key().verifying_key(), None).unwrap().entries,
        3
    );
}

#[test]
fn rotation_never_overwrites_and_ignores_foreign_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(dir.path().join("audit.backup.jsonl"), "not ours").unwrap();
    std::fs::write(dir.path().join("audit.12.jsonl"), "too few digits").unwrap();
    let mut log = AuditLog::open(&path, key()).unwrap();
    write_entries(&mut log, 0, 1);
    assert_eq!(log.rotate().unwrap(), dir.path().join("audit.000001.jsonl"));
    assert_eq!(files(&path).len(), 2);
}

#[test]
fn torn_tail_is_detected_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    {
        let mut log = AuditLog::open(&path, key()).unwrap();
        write_entries(&mut log, 0, 3);
    }
    // A crash in the middle of the fourth write.
    let partial = br#"{"seq":3,"ts_unix_ms":1003,"actor":"fedl"#;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(partial)
        .unwrap();

    let err = AuditLog::open(&path, key()).unwrap_err();
    assert!(
        matches!(err, Error::TornTail { line: 4, len, .. } if len == partial.len()),
        "{err}"
    );
    assert!(err.to_string().contains(":4: torn last line"), "{err}");
    let f = verify(&[&path], &key().verifying_key(), None).unwrap_err();
    assert_eq!(f.line, Some(4));
    assert_eq!(*f.kind, FailureKind::TornLine { len: partial.len() });

    let repair = AuditLog::repair_torn_tail(&path).unwrap().unwrap();
    assert_eq!(repair.line, 4);
    assert_eq!(repair.removed_bytes, partial.len() as u64);
    assert_eq!(
        repair.removed_blake3,
        blake3::hash(partial).to_hex().to_string()
    );
    // Nothing left to repair; complete lines are never touched.
    assert_eq!(AuditLog::repair_torn_tail(&path).unwrap(), None);

    let mut log = AuditLog::open(&path, key()).unwrap();
    let h = log
        .append(
            2_000,
            "system",
            "audit.tail_repaired",
            &json!({"line": repair.line, "removed_bytes": repair.removed_bytes, "removed_blake3": repair.removed_blake3}),
        )
        .unwrap();
    assert_eq!(h.seq, 3);
    verify(&[&path], &key().verifying_key(), None).unwrap();
}

#[test]
fn repair_leaves_a_tampered_complete_line_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    {
        let mut log = AuditLog::open(&path, key()).unwrap();
        write_entries(&mut log, 0, 2);
    }
    let mut text = std::fs::read_to_string(&path).unwrap();
    text = text.replacen("\"round\":1", "\"round\":9", 1);
    std::fs::write(&path, &text).unwrap();
    assert_eq!(AuditLog::repair_torn_tail(&path).unwrap(), None);
    let Error::Invalid(f) = AuditLog::open(&path, key()).unwrap_err() else {
        panic!()
    };
    assert_eq!((f.line, f.seq), (Some(2), Some(1)));
    assert_eq!(*f.kind, FailureKind::BadSignature);
}

#[test]
fn signed_head_export_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let head_path = dir.path().join("head.json");
    let mut log = AuditLog::open(&path, key()).unwrap();
    assert!(matches!(log.signed_head(1), Err(Error::Empty)));
    write_entries(&mut log, 0, 3);
    let exported = log.export_head(9_999, &head_path).unwrap();
    assert_eq!(read_head(&head_path).unwrap(), exported);
    assert_eq!(exported.entry_head(), log.head().unwrap());
    assert!(exported.signature_ok(&key().verifying_key()));

    // Later entries do not invalidate an older head.
    write_entries(&mut log, 3, 2);
    let report = verify(&[&path], &key().verifying_key(), Some(&exported)).unwrap();
    assert_eq!(report.head_matched, Some(2));
    assert!(report.head_signature_checked);

    // A newer export replaces the file.
    let newer = log.export_head(10_000, &head_path).unwrap();
    assert_eq!(read_head(&head_path).unwrap(), newer);
    assert_eq!(newer.seq, 4);

    // A head signed by another key is refused before the log is read.
    let mut forged = newer.clone();
    forged.seq = 1;
    let f = verify(&[&path], &key().verifying_key(), Some(&forged)).unwrap_err();
    assert_eq!(*f.kind, FailureKind::HeadSignature);
    assert_eq!(f.file, None);
    // Without a key, the head is used unsigned (chain-only check).
    let report = verify_chain(&[&path], Some(&newer)).unwrap();
    assert!(!report.signatures_checked && !report.head_signature_checked);

    std::fs::write(&head_path, "{\"seq\":1}").unwrap();
    assert!(matches!(read_head(&head_path), Err(Error::BadFile { .. })));
}

#[test]
fn overlong_line_is_refused_without_buffering_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut data = vec![b'{'; 3 * MAX_LINE_LEN];
    data.push(b'\n');
    std::fs::write(&path, &data).unwrap();
    let f = verify(&[&path], &key().verifying_key(), None).unwrap_err();
    assert_eq!(f.line, Some(1));
    assert_eq!(*f.kind, FailureKind::LineTooLong { max: MAX_LINE_LEN });
    let first = EntryReader::new(&[&path]).next().unwrap().unwrap_err();
    assert_eq!(*first.kind, FailureKind::LineTooLong { max: MAX_LINE_LEN });
}

#[test]
fn filters_select_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, key()).unwrap();
    log.append(100, "system", "coordinator.started", &json!({}))
        .unwrap();
    log.append(
        200,
        "fedlink://fed/site/a",
        "update.received",
        &json!({"site": "a", "round": 1}),
    )
    .unwrap();
    log.append(
        300,
        "fedlink://fed/site/b",
        "update.received",
        &json!({"round": 1}),
    )
    .unwrap();
    log.append(
        400,
        "system",
        "update.rejected",
        &json!({"site": "fedlink://fed/site/a", "round": 2}),
    )
    .unwrap();
    log.append(
        500,
        "fedlink://fed/admin/ops",
        "site.revoked",
        &json!({"site": "b"}),
    )
    .unwrap();

    let seqs = |f: Filter| -> Vec<u64> {
        EntryReader::new(&[&path])
            .map(|e| e.unwrap())
            .filter(|e| f.matches(&e.entry))
            .map(|e| e.entry.seq)
            .collect()
    };
    assert_eq!(seqs(Filter::default()), vec![0, 1, 2, 3, 4]);
    assert_eq!(
        seqs(Filter {
            since: Some(200),
            until: Some(400),
            ..Filter::default()
        }),
        vec![1, 2, 3]
    );
    assert_eq!(
        seqs(Filter {
            site: Some("a".into()),
            ..Filter::default()
        }),
        vec![1, 3]
    );
    assert_eq!(
        seqs(Filter {
            site: Some("b".into()),
            ..Filter::default()
        }),
        vec![2, 4]
    );
    assert_eq!(
        seqs(Filter {
            site: Some("fedlink://fed/site/a".into()),
            ..Filter::default()
        }),
        vec![1, 3]
    );
    assert_eq!(
        seqs(Filter {
            round: Some(1),
            ..Filter::default()
        }),
        vec![1, 2]
    );
    assert_eq!(
        seqs(Filter {
            event_prefix: Some("update.".into()),
            ..Filter::default()
        }),
        vec![1, 2, 3]
    );
    assert_eq!(
        seqs(Filter {
            actor: Some("system".into()),
            ..Filter::default()
        }),
        vec![0, 3]
    );
    assert_eq!(
        seqs(Filter {
            event_prefix: Some("update".into()),
            site: Some("a".into()),
            round: Some(2),
            ..Filter::default()
        }),
        vec![3]
    );
}

/// A batch writes the entries `append` would (same sequence, chain and
/// signatures), continues the chain either way, and refuses every entry when
/// one is invalid.
#[test]
fn a_batch_is_the_appends_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.jsonl");
    let many = dir.path().join("many.jsonl");
    let details: Vec<_> = (0..5)
        .map(|i| json!({"site": format!("s{i}"), "round": 3}))
        .collect();
    let mut a = AuditLog::open(&one, key()).unwrap();
    a.append(7, "system", "round.opened", &json!({"round": 3}))
        .unwrap();
    let singles: Vec<_> = details
        .iter()
        .map(|d| a.append(9, "system", "offer.sent", d).unwrap())
        .collect();
    let mut b = AuditLog::open(&many, key()).unwrap();
    b.append(7, "system", "round.opened", &json!({"round": 3}))
        .unwrap();
    let batch: Vec<_> = details.iter().map(|d| ("offer.sent", d)).collect();
    let heads = b.append_batch(9, "system", &batch).unwrap();
    assert_eq!(heads, singles);
    assert_eq!(b.head(), a.head());
    assert_eq!(
        std::fs::read(&one).unwrap(),
        std::fs::read(&many).unwrap(),
        "byte for byte"
    );
    assert!(b.append_batch(10, "system", &[]).unwrap().is_empty());
    let next = b
        .append(11, "system", "round.aggregated", &json!({}))
        .unwrap();
    assert_eq!(next.seq, 6);
    let report = verify(&[&many], &key().verifying_key(), None).unwrap();
    assert_eq!(report.entries, 7);
    // One invalid entry: nothing of the batch is written.
    let len = std::fs::metadata(&many).unwrap().len();
    let bad = json!([1]);
    let ok = json!({});
    assert!(matches!(
        b.append_batch(12, "system", &[("offer.sent", &ok), ("offer.sent", &bad)]),
        Err(Error::InvalidEntry(_))
    ));
    assert!(matches!(
        b.append_batch(12, "system", &[("offer.sent", &ok), ("bad event", &ok)]),
        Err(Error::InvalidEntry(_))
    ));
    assert_eq!(std::fs::metadata(&many).unwrap().len(), len);
    assert_eq!(b.head(), Some(next));
}
