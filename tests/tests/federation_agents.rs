//! End-to-end federations with REAL site agents (`fedlink_agent::Agent`:
//! QUIC + mutual TLS, policy, burn training on the WDBC hospital splits,
//! signed deltas) against the real coordinator, in-process or as the
//! `fedlink-coordinator` binary killed with SIGKILL and restarted.
//!
//! Progress is observed through the agents' audit-log events and the
//! coordinator's `status.json`; nothing waits a fixed time. Every wait has a
//! generous safety limit that the happy path never reaches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedlink_agent::audit::Recorded as LogEntry;
use fedlink_agent::{Agent, AgentError, SiteConfig};
use fedlink_coordinator::round::JobOutcome;
use fedlink_coordinator::store::{RoundRecord, RoundState, Store, read_model_file};
use fedlink_protocol::message::UploadResult;
use fedlink_protocol::{FlatModel, ModelHash};
use fedlink_test_util::TestPki;
use fedlink_tests::fixture::{
    JobSpec, RunningCoordinator, free_udp_addr, read_status, wait_for_status, wdbc_site_toml,
    workspace_binary, write_config, write_job,
};
use fedlink_tests::raw_site::RawSite;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Safety net for any single wait (never reached when things work).
const LIMIT: Duration = Duration::from_secs(60);

/// WDBC has 30 features.
const WDBC_FEATURES: u32 = 30;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out ({LIMIT:?}) waiting for {what}"))
}

/// A small job over the WDBC features: one epoch, deadlines that never
/// fire in the happy path.
fn wdbc_job(id: &str, rounds: u32, sites: u32) -> JobSpec {
    JobSpec {
        id: id.into(),
        rounds,
        sites,
        quorum: sites,
        deadline_secs: 120,
        inputs: WDBC_FEATURES,
        ..JobSpec::default()
    }
}

/// `site.toml` of site `i` (kit `site-i`, hospital split `i`), pointed at
/// `coordinator`, with short reconnection delays.
fn site_config(pki: &TestPki, i: usize, dir: &Path, coordinator: SocketAddr) -> SiteConfig {
    let text = wdbc_site_toml(pki, i, coordinator).unwrap();
    SiteConfig::parse(&text, Path::new("site.toml"), dir).unwrap()
}

/// An agent running in this process, its audit-log entries observed as they
/// are written.
struct RunningAgent {
    name: String,
    log_path: PathBuf,
    key_path: PathBuf,
    events: mpsc::UnboundedReceiver<LogEntry>,
    seen: Vec<LogEntry>,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    fn start(name: &str, config: SiteConfig) -> Self {
        let log_path = config.audit_log_path();
        let key_path = config.kit_dir.join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE);
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(Agent::new(config).with_events(tx).run(async {
            let _ = stopped.await;
        }));
        Self {
            name: name.to_owned(),
            log_path,
            key_path,
            events,
            seen: Vec::new(),
            stop: Some(stop),
            handle,
        }
    }

    /// The next entry (after those already seen) for which `want` holds.
    async fn wait_for(&mut self, what: &str, want: impl Fn(&LogEntry) -> bool) -> LogEntry {
        let name = self.name.clone();
        loop {
            let e = within(&format!("{name}: {what}"), self.events.recv())
                .await
                .unwrap_or_else(|| panic!("{name} stopped before {what}: {:#?}", self.seen));
            self.seen.push(e.clone());
            assert_ne!(e.event, "round.failed", "{name}: {e:?}");
            if want(&e) {
                return e;
            }
        }
    }

    /// Shut down (orderly), expect `Ok`, and return every entry written,
    /// checked against the audit-log file (which verifies with the site's
    /// update key).
    async fn stop(mut self) -> Vec<LogEntry> {
        let _ = self.stop.take().unwrap().send(());
        within("the agent to stop", self.handle)
            .await
            .unwrap()
            .unwrap();
        while let Some(e) = self.events.recv().await {
            self.seen.push(e);
        }
        // The file holds exactly what was observed (compared through the
        // same JSON text, as serde_json's float parsing is not exact).
        let key = fedlink_audit::load_verifying_key(&self.key_path).unwrap();
        let report = fedlink_audit::verify(&[&self.log_path], &key, None).unwrap();
        assert_eq!(report.entries, self.seen.len() as u64, "{}", self.name);
        let as_json = |seq: u64, ts: u64, actor: &str, event: &str, details: &serde_json::Value| {
            serde_json::to_string(&serde_json::json!([seq, ts, actor, event, details])).unwrap()
        };
        let on_disk: Vec<String> = fedlink_audit::EntryReader::new(&[&self.log_path])
            .map(|e| {
                let e = e.unwrap().entry;
                as_json(e.seq, e.ts_unix_ms, &e.actor, &e.event, &e.details)
            })
            .collect();
        // Observed details go through the same JSON text as the file's
        // (serde_json's float parsing is not exact).
        let observed: Vec<String> = self
            .seen
            .iter()
            .map(|e| {
                let details: serde_json::Value =
                    serde_json::from_str(&e.details.to_string()).unwrap();
                as_json(e.seq, e.ts_unix_ms, &e.actor, &e.event, &details)
            })
            .collect();
        if on_disk != observed {
            let first = on_disk
                .iter()
                .zip(&observed)
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| on_disk.len().min(observed.len()));
            panic!(
                "{}: the audit log file differs from what was observed, first at entry {first} \
                 ({} on disk, {} observed):\n  on disk:  {:?}\n  observed: {:?}",
                self.name,
                on_disk.len(),
                observed.len(),
                on_disk.get(first),
                observed.get(first)
            );
        }
        assert_eq!(self.seen.last().unwrap().event, "agent.stopped");
        self.seen
    }
}

fn str_field<'a>(e: &'a LogEntry, field: &str) -> &'a str {
    e.details[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {e:?}"))
}

fn round_of(e: &LogEntry) -> u64 {
    e.details["round"].as_u64().unwrap()
}

fn events<'a>(log: &'a [LogEntry], name: &str) -> Vec<&'a LogEntry> {
    log.iter().filter(|e| e.event == name).collect()
}

fn is_accepted_upload(e: &LogEntry) -> bool {
    e.event == "update.result" && e.details["accepted"] == serde_json::json!(true)
}

/// How many models the site fetched (`from_cache = false`) or took from its
/// cache.
fn models_received(log: &[LogEntry], from_cache: bool) -> usize {
    events(log, "model.received")
        .into_iter()
        .filter(|e| e.details["from_cache"] == serde_json::json!(from_cache))
        .count()
}

/// The store of a data directory whose coordinator has stopped.
fn open_store(data_dir: &Path) -> Store {
    Store::open(data_dir).unwrap()
}

/// Every round is completed exactly once, in order, each from the previous
/// round's model, each model file verifies; returns the final model.
fn check_round_chain(store: &Store, job: &str, rounds: u64) -> (Vec<RoundRecord>, ModelHash) {
    let records = store.rounds(job).unwrap();
    assert_eq!(
        records.iter().map(|r| r.round).collect::<Vec<_>>(),
        (1..=rounds).collect::<Vec<_>>()
    );
    let rec = store.job(job).unwrap().unwrap();
    assert_eq!(rec.completed_rounds, rounds);
    assert_eq!(rec.round_in_flight, None);
    let Some(JobOutcome::Completed { model: final_model }) = rec.outcome.clone() else {
        panic!("job did not complete: {:?}", rec.outcome)
    };
    let models = data_dir_models(store);
    let mut base = rec.initial_model;
    read_model_file(&models.join(format!("{base}.bin")), &base).unwrap();
    for r in &records {
        assert_eq!(r.state, RoundState::Completed, "round {}", r.round);
        assert_eq!(r.base_model, base, "round {} base model", r.round);
        let model = r.model.unwrap();
        assert_ne!(model, base, "round {} changed the model", r.round);
        let m: FlatModel = read_model_file(&models.join(format!("{model}.bin")), &model).unwrap();
        assert!(m.values().iter().all(|v| v.is_finite()));
        // No site counted twice in a round.
        let sites: BTreeSet<_> = r.accepted.iter().map(|u| u.site.as_str()).collect();
        assert_eq!(sites.len(), r.accepted.len(), "round {}", r.round);
        assert!(r.accepted.iter().all(|u| u.round.0 == r.round));
        base = model;
    }
    assert_eq!(base, final_model);
    assert_eq!(rec.current_model, final_model);
    // One model file per version: the initial model and one per round.
    let bins = std::fs::read_dir(&models)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "bin")
        })
        .count();
    assert_eq!(
        bins as u64,
        rounds + 1,
        "model versions in {}",
        models.display()
    );
    (records, final_model)
}

fn data_dir_models(store: &Store) -> PathBuf {
    store.dir().join(fedlink_coordinator::store::MODELS_DIR)
}

/// What a site's log says it received, round by round: the offered base
/// model, and the model it actually obtained (fetched or from its cache).
fn received_models(log: &[LogEntry]) -> (Vec<(u64, String)>, Vec<String>) {
    let offered = events(log, "offer.received")
        .into_iter()
        .map(|e| (round_of(e), str_field(e, "base_model").to_owned()))
        .collect();
    let obtained = events(log, "model.received")
        .into_iter()
        .map(|e| str_field(e, "model").to_owned())
        .collect();
    (offered, obtained)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_three_rounds_in_process() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = wdbc_job("wdbc-agents", 3, 3);
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let data_dir = coord.data_dir.clone();
    let mut agents: Vec<RunningAgent> = (0..3)
        .map(|i| {
            RunningAgent::start(
                &format!("site-{i}"),
                site_config(&pki, i, dir.path(), coord.addr),
            )
        })
        .collect();

    let out = coord.finished_within(LIMIT).await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    // The last round's result reached every site before the job ended.
    for a in &mut agents {
        a.wait_for("round 3 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 3
        })
        .await;
    }
    let mut logs = Vec::new();
    for a in agents {
        logs.push(a.stop().await);
    }

    let status = read_status(&data_dir).unwrap();
    assert!(status.completed, "{status:#?}");
    assert_eq!(status.completed_rounds, 3);
    assert_eq!(status.current_model, model.to_hex());
    for r in &status.rounds {
        assert_eq!(r.updates.len(), 3, "round {}", r.round);
    }

    let store = open_store(&data_dir);
    let (rounds, final_model) = check_round_chain(&store, &spec.id, 3);
    assert_eq!(final_model, model);
    let bases: Vec<(u64, String)> = rounds
        .iter()
        .map(|r| (r.round, r.base_model.to_hex()))
        .collect();
    for r in &rounds {
        let sites: Vec<&str> = r.accepted.iter().map(|u| u.site.as_str()).collect();
        assert_eq!(sites.len(), 3, "round {}: {sites:?}", r.round);
        assert!(
            r.discarded.is_empty() && r.restarts == 0,
            "round {}",
            r.round
        );
    }
    for (i, log) in logs.iter().enumerate() {
        // Each site trained on exactly the coordinator's base model of each
        // round (offered, then fetched and verified by hash), then fetched
        // the final model to evaluate it (asked by the coordinator).
        let (offered, obtained) = received_models(log);
        assert_eq!(offered, bases, "site-{i} offers");
        let mut want: Vec<String> = bases.iter().map(|(_, h)| h.clone()).collect();
        want.push(model.to_hex());
        assert_eq!(obtained, want, "site-{i} models");
        assert_eq!(models_received(log, false), 4, "site-{i}");
        let evaluated = events(log, "eval.reported");
        assert_eq!(evaluated.len(), 1, "site-{i}");
        assert_eq!(str_field(evaluated[0], "model"), model.to_hex());
        let accepted: Vec<u64> = log
            .iter()
            .filter(|e| is_accepted_upload(e))
            .map(round_of)
            .collect();
        assert_eq!(accepted, vec![1, 2, 3], "site-{i} accepted uploads");
        assert_eq!(events(log, "train.completed").len(), 3, "site-{i}");
        assert_eq!(events(log, "update.sent").len(), 3, "site-{i}");
        assert!(events(log, "offer.declined").is_empty(), "site-{i}");
        // The coordinator weighs each update by the examples the site claims
        // in its signed header.
        for r in &rounds {
            let sent = events(log, "update.sent")
                .into_iter()
                .find(|e| round_of(e) == r.round)
                .unwrap();
            let u = r
                .accepted
                .iter()
                .find(|u| u.site.as_str() == format!("site-{i}"))
                .unwrap();
            assert_eq!(Some(u.num_examples), sent.details["num_examples"].as_u64());
            assert_eq!(u.payload_hash.to_hex(), str_field(sent, "payload_hash"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_the_coordinator_joins_when_it_comes_up() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_udp_addr().unwrap();
    let mut agent = RunningAgent::start("site-0", site_config(&pki, 0, dir.path(), addr));
    // Nothing listens yet: the agent fails to connect and schedules a retry.
    let first = agent
        .wait_for("a failed attempt", |e| e.event == "conn.lost")
        .await;
    assert!(first.details["retry_in_ms"].as_u64().is_some(), "{first:?}");
    assert!(events(&agent.seen, "conn.established").is_empty());

    let spec = wdbc_job("wdbc-late", 2, 1);
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, addr).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    assert_eq!(coord.addr, addr);
    let data_dir = coord.data_dir.clone();
    agent
        .wait_for("connected", |e| e.event == "conn.established")
        .await;
    let out = coord.finished_within(LIMIT).await.unwrap();
    assert!(
        matches!(out.outcome, Some(JobOutcome::Completed { .. })),
        "{:?}",
        out.outcome
    );
    agent
        .wait_for("round 2 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 2
        })
        .await;
    let log = agent.stop().await;

    let first_connect = log
        .iter()
        .position(|e| e.event == "conn.established")
        .unwrap();
    assert!(
        log[..first_connect].iter().any(|e| e.event == "conn.lost"),
        "the agent tried before the coordinator was up"
    );
    let accepted: Vec<u64> = log
        .iter()
        .filter(|e| is_accepted_upload(e))
        .map(round_of)
        .collect();
    assert_eq!(accepted, vec![1, 2]);
    let store = open_store(&data_dir);
    let (rounds, _) = check_round_chain(&store, &spec.id, 2);
    for r in &rounds {
        assert_eq!(r.accepted.len(), 1);
        assert_eq!(r.accepted[0].site.as_str(), "site-0");
    }
}

/// The `fedlink-coordinator` binary serving `config`, its stderr in `log`.
fn spawn_coordinator(config: &Path, log: &Path) -> tokio::process::Child {
    let bin = workspace_binary("fedlink-coordinator").unwrap();
    let stderr = std::fs::File::create(log).unwrap();
    tokio::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .arg("--exit-after-job")
        .env("FEDLINK_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A deterministic, small delta for the scripted site.
fn gate_delta(global: &FlatModel, round: u64) -> FlatModel {
    let values = (0..global.values().len())
        .map(|j| ((j % 5) as f32 - 2.0) * 0.01 + round as f32 * 0.001)
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

/// The scripted site takes part honestly in the offered round.
async fn gate_round(site: &mut RawSite, expect_round: u64) {
    let offer = site.next_offer().await.unwrap();
    assert_eq!(offer.round.0, expect_round);
    site.accept(&offer).await.unwrap();
    let global = site.fetch_model(&offer).await.unwrap();
    let up = site
        .prepare(&offer, &gate_delta(&global, offer.round.0), 60)
        .unwrap();
    let r = site.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "round {expect_round}: {r:?}"
    );
}

/// Kill the coordinator process with SIGKILL in the middle of round 2 (two
/// of three updates accepted, the third held back by a scripted site) and
/// start the binary again on the same port and data directory. The agents
/// reconnect by themselves and the job completes with every round counted
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_mid_round_resumes_the_job() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_udp_addr().unwrap();
    let spec = wdbc_job("wdbc-crash", 3, 3);
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, addr).unwrap();
    let data_dir = dir.path().join("data");
    let mut child = spawn_coordinator(&cfg, &dir.path().join("coordinator-1.log"));

    // site-0 and site-1 are real agents; site-2 is scripted so that round 2
    // is held open at a known point.
    let mut agents: Vec<RunningAgent> = (0..2)
        .map(|i| RunningAgent::start(&format!("site-{i}"), site_config(&pki, i, dir.path(), addr)))
        .collect();
    agents[0]
        .wait_for("connected", |e| e.event == "conn.established")
        .await;
    let mut gate = RawSite::connect(pki.site_kit(2).unwrap(), addr)
        .await
        .unwrap();
    gate_round(&mut gate, 1).await;
    let offer2 = gate.next_offer().await.unwrap();
    assert_eq!(offer2.round.0, 2);
    gate.accept(&offer2).await.unwrap();

    // Round 1 completed, round 2 in flight with both agents' updates
    // accepted (and acknowledged to them).
    for a in &mut agents {
        a.wait_for("round 2 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 2
        })
        .await;
    }
    let before = wait_for_status(&data_dir, "round 2 with two updates", LIMIT, |s| {
        s.completed_rounds == 1
            && s.rounds
                .iter()
                .any(|r| r.round == 2 && r.state == "Open" && r.updates.len() == 2)
    })
    .await
    .unwrap();
    let held: BTreeSet<String> = before
        .rounds
        .iter()
        .find(|r| r.round == 2)
        .unwrap()
        .updates
        .iter()
        .map(|u| u.0.clone())
        .collect();
    assert_eq!(held, BTreeSet::from(["site-0".into(), "site-1".into()]));

    // kill -9.
    child.start_kill().unwrap();
    let status = within("the killed coordinator", child.wait())
        .await
        .unwrap();
    assert!(!status.success(), "SIGKILL: {status:?}");
    drop(gate);

    let restarted_at = unix_ms();
    let mut child = spawn_coordinator(&cfg, &dir.path().join("coordinator-2.log"));
    for a in &mut agents {
        a.wait_for("reconnection", |e| {
            e.event == "conn.established" && e.ts_unix_ms >= restarted_at
        })
        .await;
    }
    let mut gate = RawSite::connect(pki.site_kit(2).unwrap(), addr)
        .await
        .unwrap();
    // Round 2 is offered again, from the same base model.
    let again = gate.next_offer().await.unwrap();
    assert_eq!(again.round.0, 2);
    assert_eq!(again.base_model, offer2.base_model);
    gate.accept(&again).await.unwrap();
    let global = gate.fetch_model(&again).await.unwrap();
    let up = gate.prepare(&again, &gate_delta(&global, 2), 60).unwrap();
    let r = gate.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    gate_round(&mut gate, 3).await;

    let exit = within("the restarted coordinator to finish the job", child.wait())
        .await
        .unwrap();
    assert!(
        exit.success(),
        "fedlink-coordinator exited with {exit:?}; see {}",
        dir.path().join("coordinator-2.log").display()
    );
    for a in &mut agents {
        a.wait_for("round 3 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 3
        })
        .await;
    }
    let mut logs = Vec::new();
    for a in agents {
        logs.push(a.stop().await);
    }

    let status = read_status(&data_dir).unwrap();
    assert!(status.completed, "{status:#?}");
    assert_eq!(status.completed_rounds, 3);

    let store = open_store(&data_dir);
    let (rounds, _) = check_round_chain(&store, &spec.id, 3);
    let all = BTreeSet::from(["site-0", "site-1", "site-2"]);
    for r in &rounds {
        let sites: BTreeSet<&str> = r.accepted.iter().map(|u| u.site.as_str()).collect();
        assert_eq!(sites, all, "round {}", r.round);
        if r.round == 2 {
            // The updates accepted before the crash are kept apart and were
            // not aggregated; the round ran again in full.
            assert_eq!(r.restarts, 1);
            let discarded: BTreeSet<String> = r
                .discarded
                .iter()
                .map(|u| u.site.as_str().to_owned())
                .collect();
            assert_eq!(discarded, held);
            assert_eq!(r.discarded.len(), 2);
            for d in &r.discarded {
                assert!(
                    !r.accepted.iter().any(|a| a.payload_hash == d.payload_hash
                        && a.received_unix_ms == d.received_unix_ms),
                    "a discarded update was aggregated: {d:?}"
                );
            }
        } else {
            assert_eq!(r.restarts, 0, "round {}", r.round);
            assert!(r.discarded.is_empty(), "round {}", r.round);
        }
    }
    // Each site's updates were aggregated once per round: 3, not 4.
    for s in store.sites().unwrap() {
        assert_eq!(s.updates_aggregated, 3, "{}", s.id);
    }
    // The coordinator's audit log: the restart recorded round 2's discard
    // once, with the two updates it set aside, before round 2 was opened
    // again.
    let audit: Vec<serde_json::Value> = std::fs::read_to_string(data_dir.join("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at = |event: &str| -> Vec<usize> {
        (0..audit.len())
            .filter(|&i| audit[i]["event"] == event && audit[i]["details"]["round"] == 2)
            .collect()
    };
    let discarded = at("round.discarded");
    assert_eq!(discarded.len(), 1, "{discarded:?}");
    assert_eq!(
        audit[discarded[0]]["details"],
        serde_json::json!({
            "job": "wdbc-crash",
            "round": 2,
            "reason": "the coordinator restarted during the round; its 2 accepted update(s) \
                       are discarded and the round is re-opened",
        })
    );
    let opened = at("round.opened");
    assert_eq!(opened.len(), 2, "round 2 opened before and after the crash");
    assert!(opened[0] < discarded[0] && discarded[0] < opened[1]);
    // The agents trained round 2 twice (before and after the crash), each
    // time on the same base model, and every model they used is a version
    // the coordinator kept.
    let bases: Vec<String> = rounds.iter().map(|r| r.base_model.to_hex()).collect();
    for (i, log) in logs.iter().enumerate() {
        let (offered, obtained) = received_models(log);
        let offered_rounds: Vec<u64> = offered.iter().map(|(r, _)| *r).collect();
        assert_eq!(offered_rounds, vec![1, 2, 2, 3], "site-{i}");
        for (r, h) in &offered {
            assert_eq!(*h, bases[(*r - 1) as usize], "site-{i} round {r}");
        }
        // The four models trained on, then the final one, evaluated.
        assert_eq!(obtained.len(), 5, "site-{i}");
        assert!(obtained[..4].iter().all(|h| bases.contains(h)), "site-{i}");
        assert_eq!(
            Some(obtained[4].clone()),
            rounds.last().and_then(|r| r.model).map(|m| m.to_hex()),
            "site-{i}"
        );
        // The second time, round 2's model came from the site's cache.
        assert_eq!(models_received(log, false), 4, "site-{i}");
        assert_eq!(models_received(log, true), 1, "site-{i}");
        let accepted: Vec<u64> = log
            .iter()
            .filter(|e| is_accepted_upload(e))
            .map(round_of)
            .collect();
        assert_eq!(accepted, vec![1, 2, 2, 3], "site-{i}");
    }
}

/// Run the `fedlink` admin CLI against `addr` with the admin kit; its
/// stdout, after checking that it succeeded.
async fn fedlink_cli(pki: &TestPki, addr: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new(workspace_binary("fedlink").unwrap())
        .args(args)
        .arg("--kit")
        .arg(pki.admin_dir())
        .arg("--coordinator")
        .arg(addr.to_string())
        .output();
    let out = within(&format!("fedlink {args:?}"), out).await.unwrap();
    assert!(
        out.status.success(),
        "fedlink {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `a` and `b` are the same JSON document, numbers equal within 1e-12
/// relative (serde_json's float parsing is not exact).
fn assert_close(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                "{at}: {x} vs {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_close(x, y, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{at}"
            );
            for (k, v) in x {
                assert_close(v, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

/// `Σ nᵢ·mᵢ / Σ nᵢ` of one metric over the sites that report it.
fn weighted(sites: &[serde_json::Value], metric: &str) -> f64 {
    let (mut sum, mut n) = (0.0, 0.0);
    for s in sites {
        if let Some(v) = s[metric].as_f64() {
            let w = s["num_eval_examples"].as_f64().unwrap();
            sum += v * w;
            n += w;
        }
    }
    sum / n
}

/// Federated evaluation with real agents, `[evaluation] every_rounds = 2` in
/// a 3-round job: the initial model (reported in round 1), round 2's model
/// (reported in round 3) and the final model (asked for after round 3,
/// protocol 6) are evaluated, round 1's model is not. Each site's figures
/// are exactly what it signed and recorded in its own audit log; the
/// weighted mean is over the sites' validation examples; `rounds show`,
/// `status`, `status.json` and the coordinator's audit log agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_evaluation_every_two_rounds_per_site_and_weighted() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = wdbc_job("wdbc-eval", 3, 3);
    spec.evaluation_every_rounds = 2;
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, false).await.unwrap();
    let data_dir = coord.data_dir.clone();
    let mut agents: Vec<RunningAgent> = (0..3)
        .map(|i| {
            RunningAgent::start(
                &format!("site-{i}"),
                site_config(&pki, i, dir.path(), coord.addr),
            )
        })
        .collect();
    let status = wait_for_status(&data_dir, "the job to complete", LIMIT, |s| s.completed)
        .await
        .unwrap();
    for a in &mut agents {
        a.wait_for("round 3 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 3
        })
        .await;
    }
    let mut logs = Vec::new();
    for a in agents {
        logs.push(a.stop().await);
    }

    // While the coordinator runs: `fedlink rounds show` and `fedlink status`
    // (checked below, against the store).
    let show3 = fedlink_cli(
        &pki,
        coord.addr,
        &["rounds", "show", &spec.id, "3", "--json"],
    )
    .await;
    let text = fedlink_cli(&pki, coord.addr, &["rounds", "show", &spec.id, "3"]).await;
    let text2 = fedlink_cli(&pki, coord.addr, &["rounds", "show", &spec.id, "2"]).await;
    let st = fedlink_cli(&pki, coord.addr, &["status", "--json"]).await;
    let st_text = fedlink_cli(&pki, coord.addr, &["status"]).await;
    coord.shutdown().await.unwrap();

    // Which rounds carry an evaluation, of which model.
    let store = open_store(&data_dir);
    let (rounds, _) = check_round_chain(&store, &spec.id, 3);
    let evaluated: Vec<(u64, u64, String)> = rounds
        .iter()
        .filter_map(|r| {
            r.evaluation
                .as_ref()
                .map(|e| (r.round, e.after_round, e.model.clone()))
        })
        .collect();
    assert_eq!(
        evaluated,
        [
            (1, 0, rounds[0].base_model.to_hex()),
            (3, 2, rounds[2].base_model.to_hex())
        ]
    );
    // status.json: per round, and the newest.
    let in_status: Vec<u64> = status
        .rounds
        .iter()
        .filter(|r| r.evaluation.is_some())
        .map(|r| r.round)
        .collect();
    assert_eq!(in_status, [1, 3]);
    let carried = rounds[2].evaluation.clone().unwrap();
    assert!(carried.excluded.is_empty(), "{carried:?}");
    // The final model (no round follows it): asked for by the coordinator
    // after round 3, answered with signed reports; the newest evaluation.
    assert!(rounds[..2].iter().all(|r| r.final_evaluation.is_none()));
    let newest = rounds[2].final_evaluation.clone().unwrap();
    assert_eq!((newest.after_round, newest.reported_in_round), (3, None));
    assert_eq!(
        Some(newest.model.clone()),
        rounds[2].model.map(|m| m.to_hex())
    );
    assert!(newest.excluded.is_empty(), "{newest:?}");
    assert_eq!(status.evaluation.as_ref(), Some(&newest));
    assert_eq!(status.rounds[2].final_evaluation.as_ref(), Some(&newest));
    // Each site's final figures are what it recorded (`eval.reported`,
    // before sending them signed).
    assert_eq!(newest.sites.len(), 3);
    for (i, log) in logs.iter().enumerate() {
        let reported = events(log, "eval.reported");
        assert_eq!(reported.len(), 1, "site-{i}");
        let d = &reported[0].details;
        assert_eq!(d["model"], newest.model.as_str());
        assert_eq!(d["round"], 3);
        let s = newest
            .sites
            .iter()
            .find(|s| s.site == format!("site-{i}"))
            .unwrap();
        assert!(s.num_eval_examples > 0);
        assert_eq!(Some(s.num_eval_examples), d["num_eval_examples"].as_u64());
        for (mine, theirs) in [
            (s.loss, &d["loss"]),
            (s.accuracy, &d["accuracy"]),
            (s.auc, &d["auc"]),
        ] {
            let (a, b) = (mine.unwrap(), theirs.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
    {
        let sites = serde_json::to_value(&newest.sites).unwrap();
        let w = &newest.weighted;
        assert_eq!(w.sites, 3);
        for (got, metric) in [(w.loss, "loss"), (w.accuracy, "accuracy"), (w.auc, "auc")] {
            let want = weighted(sites.as_array().unwrap(), metric);
            assert!((got.unwrap() - want).abs() < 1e-12, "{metric}");
        }
    }

    // Each site's figures are what it signed and recorded (its audit log:
    // `train.completed`, `metrics.global_eval`), for the model it was offered.
    for r in [&rounds[0], &rounds[2]] {
        let ev = r.evaluation.as_ref().unwrap();
        assert_eq!(ev.sites.len(), 3, "round {}", r.round);
        for (i, log) in logs.iter().enumerate() {
            let trained = events(log, "train.completed")
                .into_iter()
                .find(|e| round_of(e) == r.round)
                .unwrap();
            assert_eq!(str_field(trained, "base_model"), ev.model);
            let sent = &trained.details["metrics"]["global_eval"];
            let s = ev
                .sites
                .iter()
                .find(|s| s.site == format!("site-{i}"))
                .unwrap();
            assert!(s.num_eval_examples > 0);
            assert_eq!(Some(s.num_eval_examples), sent["n"].as_u64());
            for (mine, theirs) in [
                (s.loss, &sent["loss"]),
                (s.accuracy, &sent["accuracy"]),
                (s.auc, &sent["auc"]),
            ] {
                let (a, b) = (mine.unwrap(), theirs.as_f64().unwrap());
                assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
        let sites = serde_json::to_value(&ev.sites).unwrap();
        let sites = sites.as_array().unwrap();
        let w = &ev.weighted;
        assert_eq!(w.sites, 3);
        assert_eq!(
            w.num_eval_examples,
            ev.sites.iter().map(|s| s.num_eval_examples).sum::<u64>()
        );
        for (got, metric) in [(w.loss, "loss"), (w.accuracy, "accuracy"), (w.auc, "auc")] {
            let want = weighted(sites, metric);
            assert!((got.unwrap() - want).abs() < 1e-12, "{metric}");
        }
        assert_eq!(w.dice, None);
        assert_eq!(r.metrics.get("site_eval_auc").copied(), w.auc);
    }
    assert!(!rounds[1].metrics.contains_key("site_eval_auc"));

    // `fedlink rounds show` (JSON: the record; text: per site + weighted)
    // and `fedlink status`.
    let shown: serde_json::Value = serde_json::from_str(&show3).unwrap();
    let newest_json = serde_json::to_value(&newest).unwrap();
    let carried_json = serde_json::to_value(&carried).unwrap();
    assert_close(&shown["round"]["evaluation"], &carried_json, "rounds show");
    assert_close(
        &shown["round"]["final_evaluation"],
        &newest_json,
        "rounds show",
    );
    assert!(
        text.contains("federated evaluation of model") && text.contains("after round 2"),
        "{text}"
    );
    assert!(
        text.contains("after round 3; asked for by the coordinator"),
        "{text}"
    );
    assert_eq!(text.matches("weighted (3 sites)").count(), 2, "{text}");
    for i in 0..3 {
        assert!(text.contains(&format!("site-{i}")), "{text}");
    }
    assert!(!text2.contains("federated evaluation"), "{text2}");
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_close(&st["current_job"]["evaluation"], &newest_json, "status");
    assert!(st_text.contains("weighted (3 sites)"), "{st_text}");

    // The coordinator's audit log: `round.evaluated` for the models of
    // rounds 0 and 2 (carried by rounds 1 and 3) and the final one; the
    // request and each site's accepted report.
    let audit = std::fs::read_to_string(data_dir.join("audit/audit.jsonl")).unwrap();
    let evaluated: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "round.evaluated")
        .collect();
    let audited: Vec<u64> = evaluated
        .iter()
        .map(|e| e["details"]["round"].as_u64().unwrap())
        .collect();
    assert_eq!(audited, [1, 3, 3]);
    assert_close(
        &evaluated[1]["details"]["weighted"],
        &carried_json["weighted"],
        "round.evaluated",
    );
    assert_eq!(evaluated[2]["details"]["requested"], true);
    assert_close(
        &evaluated[2]["details"]["weighted"],
        &newest_json["weighted"],
        "round.evaluated (final)",
    );
    assert_eq!(evaluated[2]["details"]["model"], newest.model.as_str());
    let of = |name: &str| -> Vec<serde_json::Value> {
        audit
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"] == name)
            .collect()
    };
    let requested = of("eval.requested");
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0]["details"]["model"], newest.model.as_str());
    let mut accepted: Vec<String> = of("eval.accepted")
        .iter()
        .map(|e| e["details"]["site"].as_str().unwrap().to_owned())
        .collect();
    accepted.sort();
    assert_eq!(accepted, ["site-0", "site-1", "site-2"]);
    assert!(of("eval.rejected").is_empty());
}

/// `fedlink audit replay` of one round (signatures checked): its exit code
/// and output.
fn replay_round(data: &Path, ca: &Path, job: &str, round: u64) -> (i32, String) {
    let out = std::process::Command::new(workspace_binary("fedlink").unwrap())
        .args(["audit", "replay", "--data-dir"])
        .arg(data)
        .args(["--job", job, "--round", &round.to_string(), "--ca-dir"])
        .arg(ca)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Downlink updates (protocol 7) with real agents and a lossy job codec
/// (f16): from round 2 on an agent downloads the round's global update,
/// applies it to the model it holds and holds the coordinator's model bit
/// for bit. A site asking for the update of a base the coordinator has no
/// update from gets the whole model. A garbled
/// update file is refused by the agents (`model.refused`), which fetch the
/// whole model and go on. Every round replays bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_updates_reach_real_agents_and_a_garbled_one_is_refused() {
    use fedlink_protocol::Message;
    use fedlink_protocol::downlink::UpdateApplier;

    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        codec: fedlink_coordinator::job::CodecKind::F16,
        evaluation_every_rounds: 0,
        ..wdbc_job("wdbc-downlink", 3, 3)
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let data_dir = coord.data_dir.clone();
    let models_dir = data_dir.join(fedlink_coordinator::store::MODELS_DIR);
    let model_spec = spec.job().arch.spec().unwrap();
    let configs: Vec<SiteConfig> = (0..2)
        .map(|i| {
            let mut c = site_config(&pki, i, dir.path(), coord.addr);
            c.policy.encodings.push("f16".into());
            c
        })
        .collect();
    let mut agents: Vec<RunningAgent> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| RunningAgent::start(&format!("site-{i}"), c.clone()))
        .collect();
    // site-2 is scripted (speaking protocol 7) so that the test decides
    // when rounds close.
    let mut gate = RawSite::connect_latest(
        pki.site_kit(2).unwrap(),
        coord.addr,
        fedlink_transport::TransportKind::Quic,
    )
    .await
    .unwrap();

    // Round 1: everyone gets the whole initial model.
    let offer1 = gate.next_offer().await.unwrap();
    gate.accept(&offer1).await.unwrap();
    let m0 = gate.fetch_model(&offer1).await.unwrap();
    let up = gate.prepare(&offer1, &gate_delta(&m0, 1), 60).unwrap();
    let r = gate.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );

    for a in &mut agents {
        a.wait_for("round 1 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 1
        })
        .await;
    }
    let status = wait_for_status(&data_dir, "round 1 completed", LIMIT, |s| {
        s.completed_rounds >= 1
    })
    .await
    .unwrap();
    assert_eq!(status.completed_rounds, 1, "{status:#?}");

    // Round 2: the update of m0, as the agents and the gate ask for it.
    let offer2 = gate.next_offer().await.unwrap();
    assert_eq!(offer2.round.0, 2);
    gate.accept(&offer2).await.unwrap();
    let m1 = offer2.base_model;
    let (first, records) = gate.fetch_update(m1, m0.hash()).await.unwrap();
    let Message::UpdateManifest(manifest) = first else {
        panic!("expected an update manifest, got {}", first.name())
    };
    assert_eq!((manifest.base, manifest.hash), (m0.hash(), m1));
    assert_eq!(
        manifest.encoding.values(),
        fedlink_protocol::ValueCodec::F16
    );
    let mut applier = UpdateApplier::new(*manifest.clone(), m0.clone(), u64::MAX).unwrap();
    for r in &records {
        applier.push(r).unwrap();
    }
    let applied = applier.finish().unwrap();
    assert_eq!(applied.hash(), m1);
    // Bit for bit the coordinator's stored model.
    let stored: FlatModel = read_model_file(&models_dir.join(format!("{m1}.bin")), &m1).unwrap();
    assert_eq!(applied.values(), stored.values());
    // An unknown base: the whole model (a ModelManifest and all its records).
    let (first, records) = gate.fetch_update(m1, ModelHash([9; 32])).await.unwrap();
    let Message::ModelManifest(whole) = first else {
        panic!("expected the whole model, got {}", first.name())
    };
    assert_eq!(whole.hash, m1);
    assert_eq!(records.len() as u64, whole.num_chunks);
    for a in &mut agents {
        a.wait_for("round 2 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 2
        })
        .await;
    }
    // The agents stop (holding m1) before round 2 closes, so the test can
    // garble the next update before anyone downloads it.
    let mut first_logs = Vec::new();
    for a in agents {
        first_logs.push(a.stop().await);
    }
    let up = gate.prepare(&offer2, &gate_delta(&applied, 2), 60).unwrap();
    let r = gate.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    // Round 3 opens once the agents are back; its model is round 2's.
    let status = wait_for_status(&data_dir, "round 2 completed", LIMIT, |s| {
        s.completed_rounds >= 2
    })
    .await
    .unwrap();
    let m2 = ModelHash::from_hex(&status.current_model).unwrap();
    // Only the latest update is kept: m1 → m2.
    let updates: Vec<PathBuf> = std::fs::read_dir(&models_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "update"))
        .collect();
    let name = format!("{}-{}.update", m1.to_hex(), m2.to_hex());
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert!(updates[0].ends_with(&name), "{updates:?}");
    // Garble it: one byte of the first record's compressed body.
    let mut bytes = std::fs::read(&updates[0]).unwrap();
    let at = fedlink_protocol::payload::CHUNK_HEADER_LEN + 8;
    bytes[at] ^= 0x5a;
    std::fs::write(&updates[0], &bytes).unwrap();

    // Restarted (their audit logs of the first run set aside, so that each
    // run's log is checked whole); their model caches are kept.
    for c in &configs {
        let log = c.audit_log_path();
        std::fs::rename(&log, log.with_extension("first-run")).unwrap();
    }
    let mut agents: Vec<RunningAgent> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| RunningAgent::start(&format!("site-{i}"), c.clone()))
        .collect();
    let offer3 = gate.next_offer().await.unwrap();
    assert_eq!((offer3.round.0, offer3.base_model), (3, m2));
    gate.accept(&offer3).await.unwrap();
    let m2_model = gate.fetch_model(&offer3).await.unwrap();
    for a in &mut agents {
        a.wait_for("round 3 uploaded", |e| e.event == "update.sent")
            .await;
    }
    let up = gate
        .prepare(&offer3, &gate_delta(&m2_model, 3), 60)
        .unwrap();
    let r = gate.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    let out = coord.finished_within(LIMIT).await.unwrap();
    assert!(
        matches!(out.outcome, Some(JobOutcome::Completed { .. })),
        "{:?}",
        out.outcome
    );
    for a in &mut agents {
        a.wait_for("round 3 accepted", |e| {
            is_accepted_upload(e) && round_of(e) == 3
        })
        .await;
    }
    let mut second_logs = Vec::new();
    for a in agents {
        second_logs.push(a.stop().await);
    }

    let store = open_store(&data_dir);
    let (rounds, _) = check_round_chain(&store, &spec.id, 3);
    assert_eq!(rounds[1].base_model, m1);
    assert_eq!(rounds[2].base_model, m2);
    for (i, (log1, log2)) in first_logs.iter().zip(&second_logs).enumerate() {
        // Round 1 whole, round 2 as the update of m0, into m1.
        let got: Vec<(&str, Option<&str>)> = events(log1, "model.received")
            .into_iter()
            .map(|e| (str_field(e, "model"), e.details["as_update_of"].as_str()))
            .collect();
        let (m0h, m1h, m2h) = (m0.hash().to_hex(), m1.to_hex(), m2.to_hex());
        assert_eq!(
            got,
            vec![(m0h.as_str(), None), (m1h.as_str(), Some(m0h.as_str()))],
            "site-{i}"
        );
        // What the agent cached is the coordinator's model, bit for bit.
        let cache =
            fedlink_agent::modelcache::ModelCache::open(configs[i].model_cache_dir()).unwrap();
        let held = cache.load(&m1, &model_spec).unwrap().unwrap();
        assert_eq!(held.values(), stored.values(), "site-{i}");
        // After the restart: the garbled update of m1 refused, the whole
        // m2 fetched, trained on, accepted.
        let refused = events(log2, "model.refused");
        assert_eq!(refused.len(), 1, "site-{i}: {log2:#?}");
        assert_eq!(str_field(refused[0], "model"), m2h);
        assert_eq!(str_field(refused[0], "as_update_of"), m1h);
        let got: Vec<(&str, Option<&str>)> = events(log2, "model.received")
            .into_iter()
            .map(|e| (str_field(e, "model"), e.details["as_update_of"].as_str()))
            .collect();
        assert_eq!(got, vec![(m2h.as_str(), None)], "site-{i}");
        let accepted: Vec<u64> = log2
            .iter()
            .filter(|e| is_accepted_upload(e))
            .map(round_of)
            .collect();
        assert_eq!(accepted, vec![3], "site-{i}");
    }
    // Every round replays bit for bit, downlink encoding included.
    let ca = pki.manifest_path().parent().unwrap().to_owned();
    for round in 1..=3 {
        let (code, out) = replay_round(&data_dir, &ca, &spec.id, round);
        assert_eq!(code, 0, "round {round}: {out}");
        let file = fedlink_coordinator::round_archive::RoundFile::load(
            &fedlink_coordinator::round_archive::round_dir(&data_dir, &spec.id, round)
                .join(fedlink_coordinator::round_archive::ROUND_FILE),
        )
        .unwrap();
        assert_eq!(
            file.downlink.map(|e| e.values()),
            Some(fedlink_protocol::ValueCodec::F16),
            "round {round}"
        );
    }
}
