//! Cost of the audit log: append + fsync per entry (what every audited
//! action waits for), bytes per entry, and verification throughput.
//!
//! ```text
//! cargo bench -p fedlink-audit --bench audit_log [-- ENTRIES [DIR]]
//! ```
//!
//! DIR (default: a temporary directory under $TMPDIR) should be on the disk
//! the service will use: the fsync dominates and depends on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use ed25519_dalek::SigningKey;
use fedlink_audit::{AuditLog, verify};

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let base = args.next().map(std::path::PathBuf::from);
    let dir = match &base {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let path = dir.path().join("audit.jsonl");
    let key = SigningKey::from_bytes(&[7; 32]);
    let public = key.verifying_key();
    let mut log = AuditLog::open(&path, key).unwrap();
    // An `update.received` entry as the coordinator writes it.
    let details = |i: usize| {
        serde_json::json!({
            "job": "breast-cancer",
            "round": i / 8,
            "site": format!("hospital-{}", i % 8),
            "payload_hash": blake3::hash(&i.to_le_bytes()).to_hex().to_string(),
            "payload_bytes": 16_205_312 + i,
            "num_examples": 184,
            "nonce": hex::encode((i as u128).to_le_bytes()),
            "envelope_sig": hex::encode([0xab; 64]),
            "accepted": true,
            "reason": null,
        })
    };
    let mut times = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        log.append(
            1_800_000_000_000 + i as u64,
            "fedlink://fed/site/hospital-1",
            "update.received",
            &details(i),
        )
        .unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total = t0.elapsed().as_secs_f64();
    drop(log);
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    let bytes = std::fs::metadata(&path).unwrap().len();
    let t = Instant::now();
    let report = verify(&[&path], &public, None).unwrap();
    let vt = t.elapsed().as_secs_f64();
    println!(
        "audit log, {n} update.received entries in {}",
        dir.path().display()
    );
    println!(
        "append + fsync per entry: median {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({:.0} entries/s)",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0),
        n as f64 / total
    );
    println!("bytes per entry: {:.0}", bytes as f64 / n as f64);
    println!(
        "verify (chain + every signature): {:.1} ms for {} entries ({:.0} entries/s)",
        vt * 1e3,
        report.entries,
        report.entries as f64 / vt
    );
}
