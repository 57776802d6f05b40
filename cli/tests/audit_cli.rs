//! `fedlink audit verify | show` end to end: the real binary on logs signed
//! with a real site kit's update key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedlink_audit::AuditLog;
use fedlink_audit::ed25519_dalek::SigningKey;
use serde_json::json;

fn fedlink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedlink"))
}

fn run(args: &[&str]) -> Output {
    fedlink().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key: SigningKey,
    pub_pem: PathBuf,
    other_pub_pem: PathBuf,
}

/// A federation with two site kits (real `fedlink certs`).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let fed = root.join("fed");
    let o = run(&["certs", "init", "--federation", "t", "--out", s(&fed)]);
    assert!(o.status.success(), "{}", stderr(&o));
    for site in ["st-mary", "st-john"] {
        let o = run(&["certs", "issue-site", site, "--ca", s(&fed.join("ca"))]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let kit = fedlink_certs::Kit::load(fed.join("sites/st-mary")).unwrap();
    let key = kit.update_signing_key().unwrap().clone();
    Fixture {
        _dir: dir,
        pub_pem: fed
            .join("sites/st-mary")
            .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE),
        other_pub_pem: fed
            .join("sites/st-john")
            .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE),
        root,
        key,
    }
}

/// Six entries: three, a rotation, three more.
fn write_log(f: &Fixture) -> (PathBuf, PathBuf) {
    let path = f.root.join("audit.jsonl");
    let mut log = AuditLog::open(&path, f.key.clone()).unwrap();
    let site = "fedlink://t/site/st-mary";
    let t0 = 1_735_689_600_000; // 2025-01-01T00:00:00Z
    log.append(t0, "system", "agent.started", &json!({"version": "0.1.0"}))
        .unwrap();
    log.append(
        t0 + 1_000,
        "fedlink://t/coordinator/coordinator",
        "model.received",
        &json!({"round": 1, "model": "ab".repeat(32)}),
    )
    .unwrap();
    log.append(
        t0 + 2_000,
        site,
        "update.sent",
        &json!({"site": "st-mary", "round": 1, "payload": "cd".repeat(32), "num_examples": 120}),
    )
    .unwrap();
    log.rotate().unwrap();
    log.append(
        t0 + 3_600_000,
        "fedlink://t/coordinator/coordinator",
        "model.received",
        &json!({"round": 2, "note": "C1 control \u{9b}31m here"}),
    )
    .unwrap();
    log.append(
        t0 + 3_601_000,
        site,
        "update.sent",
        &json!({"site": "st-mary", "round": 2, "num_examples": 118}),
    )
    .unwrap();
    log.append(t0 + 7_200_000, "system", "agent.stopped", &json!({}))
        .unwrap();
    let head = f.root.join("head.json");
    log.export_head(t0 + 7_200_001, &head).unwrap();
    (path, head)
}

#[test]
fn verify_valid_log_with_pem_or_hex_key() {
    let f = fixture();
    let (log, head) = write_log(&f);
    let rotated = f.root.join("audit.000001.jsonl");

    let o = run(&[
        "audit",
        "verify",
        s(&rotated),
        s(&log),
        "--key",
        s(&f.pub_pem),
        "--head",
        s(&head),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("VALID: 6 entries (seq 0..=5) in 2 file(s)"),
        "{out}"
    );
    assert!(
        out.contains("signed head: seq 5 found in the log (signature checked)"),
        "{out}"
    );

    let hex_key = hex::encode(f.key.verifying_key().as_bytes());
    let o = run(&["audit", "verify", "--rotated", s(&log), "--key", &hex_key]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains(&hex_key));

    // JSON for scripts.
    let o = run(&[
        "audit",
        "verify",
        "--rotated",
        s(&log),
        "--key",
        s(&f.pub_pem),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["entries"], 6);
    assert_eq!(v["last_seq"], 5);
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
}

#[test]
fn verify_without_key_never_says_valid() {
    let f = fixture();
    let (log, _) = write_log(&f);
    let o = run(&["audit", "verify", "--rotated", s(&log)]);
    assert_eq!(o.status.code(), Some(4), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains("VALID"), "{out}");
    assert!(out.contains("signatures NOT checked"), "{out}");
    let o = run(&["audit", "verify", "--rotated", s(&log), "--json"]);
    assert_eq!(o.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["chain_intact"], true);
    assert_eq!(v["signatures_checked"], false);
}

#[test]
fn verify_names_the_first_bad_entry() {
    let f = fixture();
    let (log, head) = write_log(&f);
    let rotated = f.root.join("audit.000001.jsonl");

    // An edited value in the current file's second line (seq 4).
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(
        &log,
        text.replacen("\"num_examples\":118", "\"num_examples\":999", 1),
    )
    .unwrap();
    let o = run(&[
        "audit",
        "verify",
        s(&rotated),
        s(&log),
        "--key",
        s(&f.pub_pem),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "INVALID: {}:2: entry seq 4: bad signature",
            log.display()
        )),
        "{out}"
    );
    let o = run(&[
        "audit",
        "verify",
        s(&rotated),
        s(&log),
        "--key",
        s(&f.pub_pem),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["failure"]["line"], 2);
    assert_eq!(v["failure"]["seq"], 4);
    assert_eq!(v["failure"]["file"], s(&log));
    // Without the key, the chain break one line later is still caught.
    let o = run(&["audit", "verify", s(&rotated), s(&log)]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stdout(&o).contains(":3: entry seq 5: prev is"),
        "{}",
        stdout(&o)
    );

    // Restore, then cut the tail: only the head reveals it.
    std::fs::write(&log, &text).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let o = run(&[
        "audit",
        "verify",
        s(&rotated),
        s(&log),
        "--key",
        s(&f.pub_pem),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = run(&[
        "audit",
        "verify",
        s(&rotated),
        s(&log),
        "--key",
        s(&f.pub_pem),
        "--head",
        s(&head),
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stdout(&o).contains("the log ends at seq 4 but the signed head vouches for seq 5"),
        "{}",
        stdout(&o)
    );

    // The current file alone is a continuation: refused at its first line.
    let o = run(&["audit", "verify", s(&log), "--key", s(&f.pub_pem)]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stdout(&o).contains(":1: entry seq 3: sequence number 3, expected 0"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn verify_with_another_sites_key_fails_at_line_one() {
    let f = fixture();
    let (log, _) = write_log(&f);
    let o = run(&[
        "audit",
        "verify",
        "--rotated",
        s(&log),
        "--key",
        s(&f.other_pub_pem),
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stdout(&o).contains("audit.000001.jsonl:1: entry seq 0: bad signature"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn verify_usage_and_unreadable_inputs() {
    let f = fixture();
    let (log, _) = write_log(&f);
    // No LOG: usage error.
    assert_eq!(run(&["audit", "verify"]).status.code(), Some(2));
    // A key that is neither a file nor hex.
    let o = run(&["audit", "verify", s(&log), "--key", "not-a-key"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not 64 hex digits"), "{}", stderr(&o));
    // A key file that is not a public key (the private key PEM is refused).
    let private = f.pub_pem.with_file_name(fedlink_certs::UPDATE_KEY_FILE);
    let o = run(&["audit", "verify", s(&log), "--key", s(&private)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("ed25519 public key"), "{}", stderr(&o));
    // A missing log.
    let o = run(&[
        "audit",
        "verify",
        s(&f.root.join("nope.jsonl")),
        "--key",
        s(&f.pub_pem),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope.jsonl"), "{}", stderr(&o));
    // A bad head file.
    let o = run(&["audit", "verify", s(&log), "--head", s(&f.pub_pem)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--head"), "{}", stderr(&o));
}

fn show(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["audit", "show"];
    all.extend_from_slice(args);
    let o = run(&all);
    (o.status.code(), stdout(&o))
}

fn json_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn show_filters_entries() {
    let f = fixture();
    let (log, _) = write_log(&f);
    let l = s(&log);

    let (code, out) = show(&["--rotated", l]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("   SEQ  TIME (UTC)"), "{out}");
    assert!(
        out.contains("2025-01-01T00:00:02.000Z  fedlink://t/site/st-mary"),
        "{out}"
    );
    assert!(out.contains("-- 6 of 6 entries"), "{out}");
    // A C1 control character (CSI) in details is escaped, not sent to the terminal.
    assert!(!out.contains('\u{9b}'), "{out}");
    assert!(out.contains("\\u{9b}31m"), "{out}");

    let (code, out) = show(&["--rotated", l, "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(json_seqs(&out), vec![0, 1, 2, 3, 4, 5]);

    let cases: Vec<(Vec<&str>, Vec<u64>)> = vec![
        (vec!["--site", "st-mary"], vec![2, 4]),
        (vec!["--site", "fedlink://t/site/st-mary"], vec![2, 4]),
        (vec!["--round", "2"], vec![3, 4]),
        (vec!["--event", "update."], vec![2, 4]),
        (vec!["--event", "agent"], vec![0, 5]),
        (vec!["--actor", "system"], vec![0, 5]),
        (vec!["--since", "2025-01-01T01:00:00Z"], vec![3, 4, 5]),
        (vec!["--until", "1735689601000"], vec![0, 1]),
        (
            vec![
                "--since",
                "2025-01-01T00:00:01Z",
                "--until",
                "2025-01-01T01:00:00Z",
                "--site",
                "st-mary",
            ],
            vec![2],
        ),
    ];
    for (filter, want) in cases {
        let mut args = vec!["--rotated", l, "--json"];
        args.extend_from_slice(&filter);
        let (code, out) = show(&args);
        assert_eq!(code, Some(0), "{filter:?}");
        assert_eq!(json_seqs(&out), want, "{filter:?}");
    }
    // The table's footer counts matches.
    let (_, out) = show(&["--rotated", l, "--round", "1"]);
    assert!(out.contains("-- 2 of 6 entries"), "{out}");

    // Bad filter values are usage errors or refused.
    let o = run(&["audit", "show", l, "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--since"), "{}", stderr(&o));
    assert_eq!(
        run(&["audit", "show", l, "--round", "x"]).status.code(),
        Some(2)
    );
}

#[test]
fn show_stops_at_a_malformed_line() {
    let f = fixture();
    let (log, _) = write_log(&f);
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"seq\":6,\"trunc\n");
    std::fs::write(&log, text).unwrap();
    let o = run(&["audit", "show", s(&log), "--json"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(json_seqs(&stdout(&o)), vec![3, 4, 5]);
    assert!(stderr(&o).contains("audit.jsonl:4:"), "{}", stderr(&o));
}

/// Issue 15 (4): the coordinator's audit key is recorded in the CA
/// directory when its kit is issued. A log rewritten and re-signed under a
/// new key, with that key put next to the log where the coordinator exports
/// its own, verifies with the key next to the log — and is refused with
/// `--ca`, which reads the key the federation recorded.
#[test]
fn verify_with_the_key_the_ca_recorded_not_the_one_next_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let fed = dir.path().join("fed");
    let o = run(&["certs", "init", "--federation", "t", "--out", s(&fed)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ca = fed.join("ca");
    let coord = fedlink_certs::Kit::load(fed.join("coordinator")).unwrap();
    let recorded = std::fs::read(ca.join(fedlink_certs::COORDINATOR_AUDIT_KEY_FILE)).unwrap();
    assert_eq!(
        recorded,
        std::fs::read(
            fed.join("coordinator")
                .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE)
        )
        .unwrap(),
        "the CA records the coordinator kit's audit key"
    );

    // A one-entry coordinator log signed with `key`.
    let one_entry_log = |name: &str, key: &SigningKey| {
        let path = dir.path().join(name);
        let mut log = AuditLog::open(&path, key.clone()).unwrap();
        log.append(
            1,
            "fedlink://t/coordinator/coordinator",
            "coordinator.started",
            &json!({}),
        )
        .unwrap();
        path
    };
    // The genuine log verifies with the CA's record.
    let genuine = one_entry_log("genuine.jsonl", coord.update_signing_key().unwrap());
    let o = run(&["audit", "verify", s(&genuine), "--ca", s(&ca)]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));

    // A forged log under a new key, the new key exported beside it.
    let forged_key = SigningKey::from_bytes(&[7; 32]);
    let forged = one_entry_log("forged.jsonl", &forged_key);
    let beside = dir.path().join("audit-key.pub");
    std::fs::write(&beside, hex::encode(forged_key.verifying_key().as_bytes())).unwrap();
    let o = run(&["audit", "verify", s(&forged), "--key", s(&beside)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the key beside the log proves nothing"
    );
    let o = run(&["audit", "verify", s(&forged), "--ca", s(&ca)]);
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    // --key and --ca together are a usage error.
    let o = run(&[
        "audit",
        "verify",
        s(&forged),
        "--ca",
        s(&ca),
        "--key",
        s(&beside),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
