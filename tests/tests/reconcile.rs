//! Site audit logs against the coordinator's, end to end: REAL agents
//! (`fedlink_agent::Agent`: QUIC + mTLS, burn training on two WDBC hospital
//! splits, signed deltas, signed audit log, audit heads at protocol 2) and
//! the real coordinator, then the `fedlink` and `fedlink-agent` binaries:
//! `fedlink audit verify` of each site log with the site's update key,
//! `fedlink audit reconcile` of each site log against the coordinator's
//! (consistent), `fedlink-agent audit-head`, and a truncated site log caught
//! through the head the coordinator recorded.
//!
//! Needs the binaries: `cargo build -p fedlink-coordinator -p fedlink-cli -p fedlink-agent
//! --bins` (`cargo test --workspace` builds them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fedlink_agent::audit::Recorded;
use fedlink_agent::{Agent, AgentError, SiteConfig};
use fedlink_test_util::TestPki;
use fedlink_tests::fixture::{
    JobSpec, RunningCoordinator, wait_for_status, wdbc_site_toml, workspace_binary, write_config,
    write_job,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Safety net for any single wait (never reached when things work).
const LIMIT: Duration = Duration::from_secs(120);
const SITES: usize = 2;
const ROUNDS: u64 = 2;

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out ({LIMIT:?}) waiting for {what}"))
}

fn run(binary: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_binary(binary).unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `site.toml` of site `i` (kit `site-i`, WDBC hospital split a/b), written
/// to `<dir>/site-i.toml` and parsed.
fn site_config(pki: &TestPki, i: usize, dir: &Path, coordinator: std::net::SocketAddr) -> PathBuf {
    let text = wdbc_site_toml(pki, i, coordinator).unwrap();
    let path = dir.join(format!("site-{i}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

struct RunningAgent {
    name: String,
    events: mpsc::UnboundedReceiver<Recorded>,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    fn start(name: &str, config: SiteConfig) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(Agent::new(config).with_events(tx).run(async {
            let _ = stopped.await;
        }));
        Self {
            name: name.to_owned(),
            events,
            stop: Some(stop),
            handle,
        }
    }

    /// The next entry for which `want` holds.
    async fn wait_for(&mut self, what: &str, want: impl Fn(&Recorded) -> bool) -> Recorded {
        let name = self.name.clone();
        loop {
            let e = within(&format!("{name}: {what}"), self.events.recv())
                .await
                .unwrap_or_else(|| panic!("{name} stopped before {what}"));
            assert_ne!(e.event, "round.failed", "{name}: {e:?}");
            if want(&e) {
                return e;
            }
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        within("the agent to stop", self.handle)
            .await
            .unwrap()
            .unwrap();
    }
}

fn events(log: &Path, name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap();
    // The coordinator may still be appending (heads answered after the
    // job's end): a last line without its newline is being written, and is
    // not read. Every complete line must parse.
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_logs_verify_and_reconcile_with_the_coordinator_log() {
    let pki = TestPki::new(SITES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        id: "reconciled".into(),
        rounds: ROUNDS as u32,
        sites: SITES as u32,
        quorum: SITES as u32,
        deadline_secs: 120,
        inputs: 30,
        ..JobSpec::default()
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, false).await.unwrap();
    let data_dir = coord.data_dir.clone();
    let mut tomls = Vec::new();
    let mut agents = Vec::new();
    for i in 0..SITES {
        let toml = site_config(&pki, i, dir.path(), coord.addr);
        let config = SiteConfig::load(&toml).unwrap();
        agents.push(RunningAgent::start(&format!("site-{i}"), config));
        tomls.push(toml);
    }

    wait_for_status(&data_dir, "the job to complete", LIMIT, |s| s.completed)
        .await
        .unwrap();
    // Every site got its last result and, at protocol 2, the coordinator's
    // answer to the head it sent after it.
    for a in &mut agents {
        let last = a
            .wait_for("the last round's result", |e| {
                e.event == "update.result" && e.details["round"] == ROUNDS
            })
            .await;
        assert_eq!(last.details["accepted"], true, "{last:?}");
        a.wait_for("the coordinator's head after it", |e| {
            e.event == "coordinator.audit_head" && e.seq > last.seq
        })
        .await;
    }
    // The end of the job reaches the sites: each records a head of the
    // coordinator's log that covers `job.finished` (recorded before the
    // status says completed).
    let finished_seq = events(&data_dir.join("audit/audit.jsonl"), "job.finished")[0]["seq"]
        .as_u64()
        .unwrap();
    let final_model = events(&data_dir.join("audit/audit.jsonl"), "job.finished")[0]["details"]
        ["outcome"]["model"]
        .clone();
    for a in &mut agents {
        // The final model's hash (protocol 4), sent just before the head.
        let fin = a
            .wait_for("the job's final model", |e| {
                e.event == "round.outcome" && e.details["job_completed"] == true
            })
            .await;
        assert_eq!(fin.details["model"], final_model, "{fin:?}");
        assert_eq!(fin.details["round"], ROUNDS, "{fin:?}");
        a.wait_for("the coordinator's head over job.finished", |e| {
            e.event == "coordinator.audit_head"
                && e.details["seq"].as_u64().is_some_and(|s| s >= finished_seq)
        })
        .await;
    }
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();

    let coord_log = data_dir.join("audit/audit.jsonl");
    let coord_key = data_dir.join("audit/audit-key.pub");
    assert!(coord_log.is_file(), "{}", coord_log.display());
    let (code, out, err) = run(
        "fedlink",
        &[
            "audit",
            "verify",
            coord_log.to_str().unwrap(),
            "--key",
            coord_key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "coordinator log: {out}{err}");

    for (i, toml) in tomls.iter().enumerate() {
        let site = format!("site-{i}");
        let site_log = dir.path().join(format!("site-{i}/audit.jsonl"));
        let site_key = pki
            .site_dir(i)
            .unwrap()
            .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE);
        let (site_log_s, site_key_s) = (site_log.to_str().unwrap(), site_key.to_str().unwrap());

        // The site log verifies with the site's update key ...
        let (code, out, err) = run(
            "fedlink",
            &["audit", "verify", site_log_s, "--key", site_key_s],
        );
        assert_eq!(code, 0, "{site}: {out}{err}");
        assert!(out.starts_with("VALID"), "{out}");
        // ... and not with another site's.
        let other = pki
            .site_dir(1 - i)
            .unwrap()
            .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE);
        let (code, out, _) = run(
            "fedlink",
            &[
                "audit",
                "verify",
                site_log_s,
                "--key",
                other.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 3, "{site}: {out}");

        // What the site says it sent is exactly what the coordinator received.
        let sent = events(&site_log, "update.sent");
        assert_eq!(sent.len() as u64, ROUNDS, "{site}");
        let received: Vec<Value> = events(&coord_log, "update.received")
            .into_iter()
            .filter(|e| e["details"]["site"] == site.as_str())
            .collect();
        for s in &sent {
            let d = &s["details"];
            assert!(
                received.iter().any(|r| {
                    let r = &r["details"];
                    r["nonce"] == d["nonce"]
                        && r["payload_hash"] == d["payload_hash"]
                        && r["payload_bytes"] == d["payload_bytes"]
                }),
                "{site}: {d} not received"
            );
        }
        assert!(
            !events(&coord_log, "site.audit_head")
                .iter()
                .all(|e| e["details"]["site"] != site.as_str())
        );

        // fedlink audit reconcile agrees.
        let args = [
            "audit",
            "reconcile",
            "--site",
            site_log_s,
            "--site-key",
            site_key_s,
            "--coordinator",
            coord_log.to_str().unwrap(),
            "--coordinator-key",
            coord_key.to_str().unwrap(),
        ];
        let (code, out, err) = run("fedlink", &args);
        assert_eq!(code, 0, "{site}: {out}{err}");
        assert!(
            out.starts_with(&format!(
                "CONSISTENT: site {site}: {ROUNDS} update(s) sent, {ROUNDS} received identically"
            )),
            "{out}"
        );
        let mut json_args = args.to_vec();
        json_args.push("--json");
        let (code, out, err) = run("fedlink", &json_args);
        assert_eq!(code, 0, "{site}: {out}{err}");
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["consistent"], true);
        assert_eq!(report["counts"]["updates_matched"], ROUNDS);
        assert_eq!(report["counts"]["aggregated_inputs"], ROUNDS);
        // Every round it contributed to, and the job's end.
        assert_eq!(report["counts"]["round_outcomes"], ROUNDS + 1, "{report}");
        assert!(
            report["counts"]["site_heads"].as_u64().unwrap() >= 1,
            "{report}"
        );
        assert!(
            report["counts"]["coordinator_heads"].as_u64().unwrap() >= 1,
            "{report}"
        );
        assert_eq!(report["differences"], serde_json::json!([]));

        // The agent exports its signed head; the log verifies against it.
        let head = dir.path().join(format!("head-{i}.json"));
        let (code, out, err) = run(
            "fedlink-agent",
            &[
                "audit-head",
                "--config",
                toml.to_str().unwrap(),
                "--out",
                head.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{site}: {out}{err}");
        let (code, out, err) = run(
            "fedlink",
            &[
                "audit",
                "verify",
                site_log_s,
                "--key",
                site_key_s,
                "--head",
                head.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{site}: {out}{err}");
    }

    // Issue 14 (1): the coordinator's log cut at any entry of the last round
    // — from its `round.opened` up to `job.finished` — is caught by
    // reconciling it with any site's log, which holds the coordinator's head
    // over `job.finished`. A site may hold a later head too (its own head
    // exchanged after the job's end is recorded, and answered, by the
    // coordinator). Entries written after the last head a site holds (the
    // connections' ends at shutdown) are beyond its knowledge: a cut there
    // is not caught by reconcile (only by a head file exported later).
    let coord_text = std::fs::read_to_string(&coord_log).unwrap();
    let coord_lines: Vec<&str> = coord_text.lines().collect();
    let line_of = |event: &str| {
        coord_lines
            .iter()
            .rposition(|l| l.contains(&format!("\"event\":\"{event}\"")))
            .unwrap()
    };
    let (first, finished) = (line_of("round.opened"), line_of("job.finished"));
    let cut_log = dir.path().join("cut-audit.jsonl");
    let site0_log = dir.path().join("site-0/audit.jsonl");
    let site0_key = pki
        .site_dir(0)
        .unwrap()
        .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE);
    let reconcile_cut = |keep: usize| {
        std::fs::write(&cut_log, coord_lines[..keep].join("\n") + "\n").unwrap();
        run(
            "fedlink",
            &[
                "audit",
                "reconcile",
                "--site",
                site0_log.to_str().unwrap(),
                "--site-key",
                site0_key.to_str().unwrap(),
                "--coordinator",
                cut_log.to_str().unwrap(),
                "--coordinator-key",
                coord_key.to_str().unwrap(),
            ],
        )
    };
    let mut caught = 0;
    for (keep, cut_line) in coord_lines
        .iter()
        .enumerate()
        .take(finished + 1)
        .skip(first)
    {
        let (code, out, err) = reconcile_cut(keep);
        assert_eq!(
            code,
            3,
            "cut before line {} ({cut_line}) not caught: {out}{err}",
            keep + 1,
        );
        assert!(out.contains("COORDINATOR LOG TRUNCATED"), "{out}");
        caught += 1;
    }
    assert!(caught >= 5, "{caught} positions");
    println!("cut-tail matrix: {caught} cut positions in the last round, every one caught");
    // Kept through job.finished and every entry site-0 holds a head of:
    // nothing it knows of is missing.
    let held = std::fs::read_to_string(&site0_log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"event\":\"coordinator.audit_head\""))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["details"]["seq"].as_u64().unwrap()
        })
        .max()
        .unwrap();
    let held_line = coord_lines
        .iter()
        .position(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["seq"].as_u64() == Some(held)
        })
        .unwrap();
    let keep = (finished + 1).max(held_line + 1);
    let (code, out, err) = reconcile_cut(keep);
    assert_eq!(
        code, 0,
        "kept through job.finished and site-0's last head (seq {held}): {out}{err}"
    );

    // A site log cut back to before its last upload is still a valid log on
    // its own, but the coordinator holds a later head of it.
    let site_log = dir.path().join("site-0/audit.jsonl");
    let site_key = pki
        .site_dir(0)
        .unwrap()
        .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE);
    let text = std::fs::read_to_string(&site_log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let last_sent = lines
        .iter()
        .rposition(|l| l.contains("\"event\":\"update.sent\""))
        .unwrap();
    std::fs::write(&site_log, lines[..last_sent].join("\n") + "\n").unwrap();
    let (code, out, err) = run(
        "fedlink",
        &[
            "audit",
            "verify",
            site_log.to_str().unwrap(),
            "--key",
            site_key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "a prefix verifies on its own: {out}{err}");
    let (code, out, err) = run(
        "fedlink",
        &[
            "audit",
            "reconcile",
            "--site",
            site_log.to_str().unwrap(),
            "--site-key",
            site_key.to_str().unwrap(),
            "--coordinator",
            coord_log.to_str().unwrap(),
            "--coordinator-key",
            coord_key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("SITE LOG TRUNCATED"), "{out}");
    assert!(out.contains("NOT SENT BY THE SITE"), "{out}");

    // A log signed by someone else cannot be checked: exit 1, naming it.
    let (code, out, err) = run(
        "fedlink",
        &[
            "audit",
            "reconcile",
            "--site",
            site_log.to_str().unwrap(),
            "--site-key",
            coord_key.to_str().unwrap(),
            "--coordinator",
            coord_log.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("the site log does not verify"), "{err}");
}
