//! End-to-end rounds against the real coordinator (real QUIC, mTLS, store,
//! signatures, aggregation) with scripted sites that can misbehave.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedlink_coordinator::job::Privacy;
use fedlink_coordinator::round::JobOutcome;
use fedlink_coordinator::store::read_model_file;
use fedlink_protocol::message::Message;
use fedlink_protocol::message::{RejectCode, TaskOffer, UploadResult};
use fedlink_protocol::{EvalMetrics, FlatModel, ModelHash, RoundId};
use fedlink_test_util::TestPki;
use fedlink_tests::assert_completed;
use fedlink_tests::fixture::{JobSpec, RunningCoordinator, write_config, write_job};
use fedlink_tests::raw_site::{PreparedUpload, RawSite, join_round};

/// A deterministic delta for `site` in `round`.
fn delta_for(global: &FlatModel, site: usize, round: u64) -> FlatModel {
    let values = (0..global.values().len())
        .map(|j| ((j % 7) as f32 - 3.0) * 0.01 * (site as f32 + 1.0) + round as f32 * 0.001)
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

fn examples(site: usize) -> u64 {
    10 * (site as u64 + 1)
}

fn expected_next(global: &FlatModel, sites: &[usize], round: u64) -> Vec<f32> {
    let total: u64 = sites.iter().map(|&s| examples(s)).sum();
    let deltas: Vec<(u64, FlatModel)> = sites
        .iter()
        .map(|&s| (examples(s), delta_for(global, s, round)))
        .collect();
    let mut out = global.values().to_vec();
    for (j, x) in out.iter_mut().enumerate() {
        let acc: f64 = deltas
            .iter()
            .map(|(n, d)| *n as f64 * f64::from(d.values()[j]))
            .sum();
        *x += (acc / total as f64) as f32;
    }
    out
}

async fn start(spec: &JobSpec, pki: &TestPki, dir: &std::path::Path) -> RunningCoordinator {
    RunningCoordinator::start_job(spec, pki, dir).await.unwrap()
}

async fn connect(pki: &TestPki, i: usize, c: &RunningCoordinator) -> RawSite {
    RawSite::connect(pki.site_kit(i).unwrap(), c.addr)
        .await
        .unwrap()
}

async fn honest_round(site: &mut RawSite, i: usize) -> (TaskOffer, FlatModel) {
    let offer = site.next_offer().await.unwrap();
    site.accept(&offer).await.unwrap();
    let global = site.fetch_model(&offer).await.unwrap();
    upload_accepted(site, &offer, &global, i).await;
    (offer, global)
}

/// Site `i`'s honest update for `offer` (its `delta_for` the offer's round,
/// its `examples`), uploaded and acknowledged as accepted; returns it (to
/// replay it).
async fn upload_accepted(
    site: &mut RawSite,
    offer: &TaskOffer,
    global: &FlatModel,
    i: usize,
) -> PreparedUpload {
    let up = site
        .prepare(offer, &delta_for(global, i, offer.round.0), examples(i))
        .unwrap();
    let r = site.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "site {i} round {}: {r:?}",
        offer.round
    );
    up
}

/// Directories and files below `dir` (and `dir`) that group or others can
/// access, with their modes.
fn too_open(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push((p.clone(), mode));
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

fn chmod(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn assert_close(actual: &[f32], expected: &[f32]) {
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() <= 1e-6, "{a} vs {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_three_rounds_with_exact_weighted_average() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&JobSpec::default(), &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut site = connect(&pki, i, &coord).await;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..3 {
                seen.push(honest_round(&mut site, i).await);
            }
            seen
        }));
    }
    let mut per_site = Vec::new();
    for t in tasks {
        per_site.push(t.await.unwrap());
    }
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    // Everything the coordinator wrote (spool, archived payloads and
    // envelopes, models, audit log, status) is owner-only.
    assert_eq!(too_open(&data_dir), Vec::<(std::path::PathBuf, u32)>::new());
    // A data directory opened up by hand (or by an older version) is made
    // owner-only again at start.
    let payload = std::fs::read_dir(data_dir.join("updates/e2e/round-000001"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "payload"))
        .unwrap();
    chmod(&data_dir, 0o755);
    chmod(&data_dir.join("updates"), 0o755);
    chmod(&payload, 0o644);
    // Started again on the same data directory with the same job file, the
    // finished job is not run again: with exit_after_job the coordinator
    // stops at once and reports the stored outcome.
    let cfg =
        fedlink_coordinator::config::CoordinatorConfig::load(&dir.path().join("coordinator.toml"))
            .unwrap();
    let opts = fedlink_coordinator::server::ServeOptions {
        exit_after_job: true,
        bound: None,
    };
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        fedlink_coordinator::server::serve(cfg, opts, std::future::pending::<()>()),
    )
    .await
    .expect("a finished job must not be run or waited on again")
    .unwrap();
    assert_eq!(again.outcome, Some(JobOutcome::Completed { model }));
    assert_eq!(too_open(&data_dir), Vec::<(std::path::PathBuf, u32)>::new());
    // Every site trained on the same model each round, and each round's
    // model is the exact weighted average of the three deltas.
    let models = data_dir.join("models");
    for round in 0..3 {
        let (offer, global) = &per_site[0][round];
        for s in &per_site[1..] {
            assert_eq!(s[round].0.base_model, offer.base_model);
        }
        let next_hash = if round < 2 {
            per_site[0][round + 1].0.base_model
        } else {
            model
        };
        let next = read_model_file(&models.join(format!("{next_hash}.bin")), &next_hash).unwrap();
        assert_close(
            next.values(),
            &expected_next(global, &[0, 1, 2], offer.round.0),
        );
    }
    let status = fedlink_tests::fixture::read_status(&data_dir).unwrap();
    assert!(status.completed);
    assert_eq!(status.completed_rounds, 3);
    for r in &status.rounds {
        assert_eq!(r.updates.len(), 3, "round {}", r.round);
        assert_eq!(r.metrics.get("num_updates"), Some(&3.0));
    }
    // Accepted updates are archived with their signed envelopes, next to
    // the round's replay record (round.json, state-before.json).
    let round_dir = data_dir.join("updates/e2e/round-000001");
    let archived = std::fs::read_dir(&round_dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".payload") || name.ends_with(".envelope.json")
        })
        .count();
    assert_eq!(archived, 6, "3 payloads + 3 envelopes");
    assert!(round_dir.join("round.json").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_replayed_updates_are_rejected_while_the_round_completes() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(connect(&pki, i, &coord).await);
    }
    let (offers, global) = join_round(&mut sites).await.unwrap();

    // Site 0 is honest.
    let up0 = upload_accepted(&mut sites[0], &offers[0], &global, 0).await;
    // Site 0 replays its own accepted upload (same nonce): refused.
    let r = sites[0].upload(&up0, None).await.unwrap().unwrap();
    assert!(
        matches!(
            r,
            UploadResult::Reject {
                code: RejectCode::Replay,
                ..
            }
        ),
        "{r:?}"
    );

    // Site 1 replays site 0's signed upload: the envelope names site-0, the
    // connection is site-1.
    let r = sites[1].upload(&up0, None).await.unwrap().unwrap();
    assert!(
        matches!(
            r,
            UploadResult::Reject {
                code: RejectCode::UnknownSite,
                ..
            }
        ),
        "{r:?}"
    );

    // Site 2 tampers with its payload after signing: the hash gives it away.
    let mut bad = sites[2]
        .prepare(&offers[2], &delta_for(&global, 2, 1), examples(2))
        .unwrap();
    let last = bad.records[0].len() - 1;
    bad.records[0][last] ^= 0x01;
    let r = sites[2].upload(&bad, None).await.unwrap().unwrap();
    assert!(
        matches!(
            r,
            UploadResult::Reject {
                code: RejectCode::PayloadMismatch,
                ..
            }
        ),
        "{r:?}"
    );
    // …and the same envelope replayed with the right payload is a replay.
    let mut replay = bad.clone();
    replay.records[0][last] ^= 0x01;
    let r = sites[2].upload(&replay, None).await.unwrap().unwrap();
    assert!(
        matches!(
            r,
            UploadResult::Reject {
                code: RejectCode::Replay,
                ..
            }
        ),
        "{r:?}"
    );

    // Honest updates from sites 1 and 2 complete the round.
    for i in [1usize, 2] {
        upload_accepted(&mut sites[i], &offers[i], &global, i).await;
    }
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    let next = read_model_file(&data_dir.join(format!("models/{model}.bin")), &model).unwrap();
    assert_close(next.values(), &expected_next(&global, &[0, 1, 2], 1));
    let status = fedlink_tests::fixture::read_status(&data_dir).unwrap();
    assert_eq!(
        status.rounds[0].updates.len(),
        3,
        "only the honest updates count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_dropping_mid_upload_leaves_the_round_to_the_quorum() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        quorum: 2,
        // The round closes at its deadline (site 2 never reports): long
        // enough for two uploads on a loaded 2-core machine in a debug
        // build, short enough to keep the test quick. The uploads are
        // prepared before the clock matters (below).
        deadline_secs: 6,
        // Enough parameters for several chunks.
        inputs: 300_000,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(connect(&pki, i, &coord).await);
    }
    let (offers, global) = join_round(&mut sites).await.unwrap();
    // Every update encoded and signed first, so that the deadline only
    // has to cover the transfers.
    let ups: Vec<_> = (0..3)
        .map(|i| {
            sites[i]
                .prepare(&offers[i], &delta_for(&global, i, 1), examples(i))
                .unwrap()
        })
        .collect();
    // Site 2 sends one chunk of its update and disappears.
    assert!(
        ups[2].records.len() > 1,
        "the update must span several chunks"
    );
    assert!(sites[2].upload(&ups[2], Some(1)).await.unwrap().is_none());
    sites[2].vanish();
    for i in [0usize, 1] {
        let r = sites[i].upload(&ups[i], None).await.unwrap().unwrap();
        assert!(
            matches!(r, UploadResult::Ack { accepted: true, .. }),
            "{r:?}"
        );
    }
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    let next = read_model_file(&data_dir.join(format!("models/{model}.bin")), &model).unwrap();
    assert_close(next.values(), &expected_next(&global, &[0, 1], 1));
    let status = fedlink_tests::fixture::read_status(&data_dir).unwrap();
    assert_eq!(status.rounds[0].updates.len(), 2);
    // The partial upload left nothing behind in the spool.
    let spool: Vec<_> = std::fs::read_dir(data_dir.join("spool"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(spool.is_empty(), "spool not cleaned: {spool:?}");
    let _: Option<ModelHash> = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_site_cuts_its_open_connection_and_refuses_the_next() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let site0 = connect(&pki, 0, &coord).await;
    // Revoke site-0 (connected) and site-1 (not yet connected) with the CA.
    let now = fedlink_certs::time::OffsetDateTime::now_utc();
    for name in ["site-0", "site-1"] {
        pki.ca()
            .revoke(name, Some(fedlink_certs::Role::Site), Some("test"), now)
            .unwrap();
    }
    // The first connection after the revocation is refused: the list is
    // reloaded before the handshake is checked.
    let refused = RawSite::connect(pki.site_kit(1).unwrap(), coord.addr).await;
    let err = refused.err().expect("a revoked site must not be welcomed");
    assert!(err.to_string().contains("revoked"), "{err:#}");
    // The open connection of the revoked site is closed by the coordinator.
    let reason = fedlink_tests::bounded("revoked connection to close", site0.conn.closed())
        .await
        .unwrap();
    assert!(reason.to_string().contains("revoked"), "{reason}");
    coord.shutdown().await.unwrap();
}

/// More sites upload in the same round than the coordinator has upload
/// slots (1 here): the others wait with their payloads held back by QUIC
/// flow control (the coordinator's idle receive window is smaller than one
/// payload) and are still all accepted, round after round, with the exact
/// weighted average.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_the_upload_slots_wait_and_are_all_accepted() {
    const SITES: usize = 4;
    let pki = TestPki::new(SITES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 2,
        sites: SITES as u32,
        quorum: SITES as u32,
        // 2 × 50 000 + 2 parameters: a 400 kB f32 payload, several times
        // the idle receive window of 64 KiB.
        inputs: 50_000,
        ..JobSpec::default()
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("max_concurrent_uploads = 1\n");
    std::fs::write(&cfg, text).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let data_dir = coord.data_dir.clone();
    let mut tasks = Vec::new();
    for i in 0..SITES {
        let mut site = connect(&pki, i, &coord).await;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                seen.push(honest_round(&mut site, i).await);
            }
            seen
        }));
    }
    let mut per_site = Vec::new();
    for t in tasks {
        per_site.push(t.await.unwrap());
    }
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    let models = data_dir.join("models");
    let all: Vec<usize> = (0..SITES).collect();
    for round in 0..2 {
        let (offer, global) = &per_site[0][round];
        let next_hash = if round == 0 {
            per_site[0][1].0.base_model
        } else {
            model
        };
        let next = read_model_file(&models.join(format!("{next_hash}.bin")), &next_hash).unwrap();
        assert_close(next.values(), &expected_next(global, &all, offer.round.0));
    }
    let status = fedlink_tests::fixture::read_status(&data_dir).unwrap();
    for r in &status.rounds {
        assert_eq!(r.updates.len(), SITES, "round {}", r.round);
    }
}

/// A delta that does not compress (seeded pseudo-random values).
fn noise_delta(global: &FlatModel) -> FlatModel {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let values = (0..global.values().len())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        })
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

/// Issue 15 (6): the nonce of an upload attempt is durable before its
/// payload is read. An upload cut off before a coordinator restart was never
/// accepted, yet after the restart the same signed envelope is refused as a
/// replay; a fresh one from the same site is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_update_cut_off_before_a_restart_is_a_replay_after_it() {
    let pki = TestPki::new(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        sites: 2,
        quorum: 2,
        deadline_secs: 120,
        // Enough parameters for several chunk records.
        inputs: 300_000,
        ..JobSpec::default()
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, false).await.unwrap();
    let mut sites = [
        connect(&pki, 0, &coord).await,
        connect(&pki, 1, &coord).await,
    ];
    let offer = sites[0].next_offer().await.unwrap();
    sites[0].accept(&offer).await.unwrap();
    let global = sites[0].fetch_model(&offer).await.unwrap();
    let delta = noise_delta(&global);
    let first = sites[0].prepare(&offer, &delta, examples(0)).unwrap();
    // The first record is far larger than the coordinator's idle receive
    // window: writing it completes only once the coordinator has checked
    // the header (and recorded its nonce) and opened the window.
    assert!(
        first.records[0].len() > 4 * fedlink_transport::SERVER_IDLE_RECEIVE_WINDOW as usize,
        "records of {:?} bytes",
        first.records.iter().map(|r| r.len()).collect::<Vec<_>>()
    );
    assert!(sites[0].upload(&first, Some(1)).await.unwrap().is_none());
    sites[0].vanish();
    drop(sites);
    coord.shutdown().await.unwrap();

    // Same data directory: the round in flight is opened again.
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let mut sites = [
        connect(&pki, 0, &coord).await,
        connect(&pki, 1, &coord).await,
    ];
    let again = sites[0].next_offer().await.unwrap();
    assert_eq!(again.round, offer.round, "the same round is offered again");
    assert_eq!(again.base_model, offer.base_model);
    sites[0].accept(&again).await.unwrap();
    let r = sites[0].upload(&first, None).await.unwrap().unwrap();
    assert!(
        matches!(
            &r,
            UploadResult::Reject {
                code: RejectCode::Replay,
                ..
            }
        ),
        "the envelope of the cut-off attempt must be a replay: {r:?}"
    );
    // A fresh signature over the same delta is a new attempt.
    let fresh = sites[0].prepare(&again, &delta, examples(0)).unwrap();
    let r = sites[0].upload(&fresh, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    let (offer1, _) = honest_round(&mut sites[1], 1).await;
    assert_eq!(offer1.round, offer.round);
    let out = coord.finished().await.unwrap();
    assert_completed(&out);
}

/// A DP job's offers say what the coordinator applies (clip norm, central
/// noise multiplier, δ; no noise asked of the sites), and a site's decline
/// reason reaches the round record (`fedlink rounds show`) and the audit
/// log. Before, offers said `dp: None` only and a decline was only logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_offers_carry_the_jobs_settings_and_declines_are_recorded() {
    let pki = TestPki::new(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        sites: 2,
        quorum: 1,
        privacy: Privacy {
            clip_norm: Some(5.0),
            noise_multiplier: 0.5,
            target_delta: Some(1e-5),
        },
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let mut s0 = connect(&pki, 0, &coord).await;
    let mut s1 = connect(&pki, 1, &coord).await;

    let o0 = s0.next_offer().await.unwrap();
    assert_eq!(o0.privacy.clip_norm, Some(5.0));
    assert_eq!(
        o0.privacy.dp, None,
        "central noise is not asked of the sites"
    );
    let central = o0.privacy.central_dp.expect("the offer names the job's DP");
    assert_eq!(central.noise_multiplier, 0.5);
    assert_eq!(central.target_delta, Some(1e-5));
    let reason = "policy requires noise added at the site (accept_central_dp = false)";
    s0.decline(&o0, reason).await.unwrap();
    s0.decline(&o0, "declined twice").await.unwrap();

    let (_, _) = honest_round(&mut s1, 1).await;
    let out = coord.finished().await.unwrap();
    assert_completed(&out);

    let store = fedlink_coordinator::store::Store::open(&data_dir).unwrap();
    let round = store.round("e2e", RoundId(1)).unwrap().unwrap();
    assert_eq!(round.declined.len(), 1, "{:?}", round.declined);
    assert_eq!(round.declined[0].site, "site-0");
    assert_eq!(round.declined[0].reason, reason);

    let audit = std::fs::read_to_string(data_dir.join("audit/audit.jsonl")).unwrap();
    let declines: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "offer.declined")
        .collect();
    assert_eq!(declines.len(), 1, "recorded once per site and round");
    let d = &declines[0]["details"];
    assert_eq!(d["site"], "site-0");
    assert_eq!(d["round"], 1);
    assert_eq!(d["reason"], reason);
}

/// A site's claimed `num_examples` (its FedAvg weight) is bounded by the
/// job (`strategy.max_examples_per_site`) and by the size the registry
/// declares for the site (`max_examples` in `sites.toml`). A claim over
/// either is rejected before its payload is read, with a reason naming both
/// numbers in the round record and the audit log; the sites' honest
/// retries complete the round with the exact weighted average. Before, only
/// the aggregation crate's 2^30 applied and both lies were accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_claimed_over_the_job_or_site_limit_are_rejected() {
    let pki = TestPki::new(3).unwrap();
    // site-1 trains on 20 examples (`examples(1)`), and says so to the CA.
    pki.ca()
        .set_site_max_examples("site-1", Some(examples(1)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        max_examples_per_site: Some(1000),
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(connect(&pki, i, &coord).await);
    }
    let (offers, global) = join_round(&mut sites).await.unwrap();

    let not_authorized = |r: &UploadResult| match r {
        UploadResult::Reject {
            code: RejectCode::NotAuthorized,
            message,
        } => message.clone(),
        other => panic!("expected a rejection, got {other:?}"),
    };
    // site-1 claims one example more than it declared (under the job cap).
    let lie1 = sites[1]
        .prepare(&offers[1], &delta_for(&global, 1, 1), examples(1) + 1)
        .unwrap();
    let r = sites[1].upload(&lie1, None).await.unwrap().unwrap();
    let why1 = not_authorized(&r);
    assert!(
        why1.contains("num_examples = 21") && why1.contains("20 examples declared for site site-1"),
        "{why1}"
    );
    // site-2 declares nothing and claims 2^30: the job's cap applies.
    let lie2 = sites[2]
        .prepare(&offers[2], &delta_for(&global, 2, 1), 1 << 30)
        .unwrap();
    let r = sites[2].upload(&lie2, None).await.unwrap().unwrap();
    let why2 = not_authorized(&r);
    assert!(
        why2.contains("num_examples = 1073741824") && why2.contains("limit of 1000"),
        "{why2}"
    );

    // Every site, honest now, completes the round.
    for (i, s) in sites.iter_mut().enumerate() {
        upload_accepted(s, &offers[i], &global, i).await;
    }
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    let next = read_model_file(&data_dir.join(format!("models/{model}.bin")), &model).unwrap();
    assert_close(next.values(), &expected_next(&global, &[0, 1, 2], 1));

    // `fedlink rounds show` and the audit log say why.
    let store = fedlink_coordinator::store::Store::open(&data_dir).unwrap();
    let round = store.round("e2e", RoundId(1)).unwrap().unwrap();
    let reasons: Vec<(&str, &str)> = round
        .rejected
        .iter()
        .map(|r| (r.site.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [("site-1", why1.as_str()), ("site-2", why2.as_str())]
    );
    let audit = std::fs::read_to_string(data_dir.join("audit/audit.jsonl")).unwrap();
    let refused: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "update.received" && e["details"]["accepted"] == false)
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[0]["details"]["reason"], why1.as_str());
    assert_eq!(refused[1]["details"]["reason"], why2.as_str());
}

/// An upload that stops sending while it holds an upload slot is refused
/// (`TooLate`) after `upload_stall_secs`, and the slot goes to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_in_its_slot_is_refused() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        sites: 1,
        quorum: 1,
        deadline_secs: 120,
        // Enough parameters for several chunk records.
        inputs: 300_000,
        ..JobSpec::default()
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("upload_stall_secs = 1\nmax_concurrent_uploads = 1\n");
    std::fs::write(&cfg, text).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let mut site = connect(&pki, 0, &coord).await;
    let offer = site.next_offer().await.unwrap();
    site.accept(&offer).await.unwrap();
    let global = site.fetch_model(&offer).await.unwrap();
    let delta = noise_delta(&global);
    let stalled = site.prepare(&offer, &delta, examples(0)).unwrap();
    assert!(
        stalled.records.len() > 1,
        "{} records",
        stalled.records.len()
    );
    let r = site.upload_stalling(&stalled, 1).await.unwrap();
    assert!(
        matches!(&r, UploadResult::Reject { code: RejectCode::TooLate, message } if message.contains("upload slot")),
        "{r:?}"
    );
    // The only slot is free again: a complete upload (a fresh signature)
    // is taken and the round completes.
    let fresh = site.prepare(&offer, &delta, examples(0)).unwrap();
    let r = site.upload(&fresh, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    let out = coord.finished().await.unwrap();
    assert_completed(&out);
}

/// Evaluation metrics in signed headers that cannot be used (here an
/// accuracy of 1.5) are left out of the federated evaluation with the
/// reason, in the round record and the coordinator's audit log; the update
/// itself still counts, and the weighted mean is over the other sites'
/// validation examples, exactly. A NaN metric (no JSON form) refuses the
/// upload, with the reason, and the coordinator goes on. Raw sites speak
/// protocol 5: they are not asked to evaluate the final model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_evaluation_reports_are_left_out_with_the_reason() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let reports = [
        EvalMetrics {
            num_eval_examples: 3,
            loss: Some(0.25),
            accuracy: Some(0.5),
            auc: Some(0.75),
            ..EvalMetrics::default()
        },
        EvalMetrics {
            num_eval_examples: 1,
            loss: Some(0.5),
            accuracy: Some(1.0),
            ..EvalMetrics::default()
        },
        EvalMetrics {
            num_eval_examples: 1000,
            loss: Some(0.1),
            accuracy: Some(1.5),
            ..EvalMetrics::default()
        },
    ];
    let mut tasks = Vec::new();
    for (i, metrics) in reports.into_iter().enumerate() {
        let mut site = connect(&pki, i, &coord).await;
        tasks.push(tokio::spawn(async move {
            let offer = site.next_offer().await.unwrap();
            site.accept(&offer).await.unwrap();
            let global = site.fetch_model(&offer).await.unwrap();
            let delta = delta_for(&global, i, 1);
            if i == 2 {
                // A NaN has no JSON form (the signed envelope could not be
                // archived): the upload is refused before its payload.
                let nan = EvalMetrics {
                    loss: Some(f64::NAN),
                    ..metrics.clone()
                };
                let up = site
                    .prepare_with_metrics(&offer, &delta, examples(i), nan)
                    .unwrap();
                let r = site.upload(&up, None).await.unwrap().unwrap();
                assert_eq!(
                    r,
                    UploadResult::Reject {
                        code: RejectCode::Malformed,
                        message: "the signed header's metric loss is not finite".into()
                    }
                );
            }
            let up = site
                .prepare_with_metrics(&offer, &delta, examples(i), metrics)
                .unwrap();
            let r = site.upload(&up, None).await.unwrap().unwrap();
            assert!(
                matches!(r, UploadResult::Ack { accepted: true, .. }),
                "{r:?}"
            );
            offer.base_model
        }));
    }
    let mut joined = Vec::new();
    for t in tasks {
        joined.push(t.await);
    }
    let out = coord.finished().await.unwrap();
    let bases: Vec<ModelHash> = joined.into_iter().map(Result::unwrap).collect();
    assert_completed(&out);
    let store = fedlink_coordinator::store::Store::open(&data_dir).unwrap();
    let round = store.round("e2e", RoundId(1)).unwrap().unwrap();
    assert_eq!(round.accepted.len(), 3);
    let ev = round.evaluation.unwrap();
    assert_eq!(ev.model, bases[0].to_hex());
    assert_eq!((ev.after_round, ev.reported_in_round), (0, Some(1)));
    let sites: Vec<(&str, u64)> = ev
        .sites
        .iter()
        .map(|s| (s.site.as_str(), s.num_eval_examples))
        .collect();
    assert_eq!(sites, [("site-0", 3), ("site-1", 1)]);
    // (3·0.25 + 1·0.5) / 4, (3·0.5 + 1·1) / 4; only site-0 reports an AUC.
    assert_eq!(ev.weighted.loss, Some(0.3125));
    assert_eq!(ev.weighted.accuracy, Some(0.625));
    assert_eq!(ev.weighted.auc, Some(0.75));
    assert_eq!((ev.weighted.sites, ev.weighted.num_eval_examples), (2, 4));
    assert_eq!(ev.excluded.len(), 1);
    assert_eq!(ev.excluded[0].site, "site-2");
    assert_eq!(ev.excluded[0].reason, "accuracy = 1.5 is outside [0, 1]");
    assert_eq!(round.metrics.get("site_eval_accuracy"), Some(&0.625));
    let audit = std::fs::read_to_string(data_dir.join("audit/audit.jsonl")).unwrap();
    let evaluated: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "round.evaluated")
        .collect();
    assert_eq!(evaluated.len(), 1);
    let d = &evaluated[0]["details"];
    assert_eq!(d["round"], 1);
    assert_eq!(d["excluded"][0]["site"], "site-2");
    assert_eq!(
        d["excluded"][0]["reason"],
        "accuracy = 1.5 is outside [0, 1]"
    );
    assert_eq!(d["weighted"]["accuracy"], 0.625);
    // Raw sites speak protocol 5: they are not asked to evaluate the final
    // model, and the job ends without waiting for them.
    assert!(round.final_evaluation.is_none());
    assert!(!audit.contains("\"eval.requested\""));
}

fn eval_metrics(n: u64) -> EvalMetrics {
    EvalMetrics {
        num_eval_examples: n,
        loss: Some(0.5),
        accuracy: Some(0.75),
        ..EvalMetrics::default()
    }
}

/// The final model's evaluation with scripted protocol-6 sites: a report
/// for another model, one whose signature does not verify and one signed by
/// another site are refused with the reason (audited; the coordinator goes
/// on and keeps waiting for the site); a verified report with a NaN loss is
/// the site's answer, left out with the reason; a good one counts. The job
/// ends as soon as both asked sites have answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_final_evaluation_reports_are_refused_with_the_reason_and_audited() {
    let pki = TestPki::new(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        sites: 2,
        quorum: 2,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let mut tasks = Vec::new();
    for i in 0..2 {
        let mut site = RawSite::connect_evaluating(pki.site_kit(i).unwrap(), coord.addr)
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            honest_round(&mut site, i).await;
            let req = site.next_eval_request().await.unwrap();
            (site, req)
        }));
    }
    let mut asked = Vec::new();
    for t in tasks {
        asked.push(t.await.unwrap());
    }
    let (mut s1, req1) = asked.pop().unwrap();
    let (mut s0, req0) = asked.pop().unwrap();
    assert_eq!(req0, req1);
    assert_eq!(req0.round.0, 1);
    let model = req0.model;
    let report = |r: fedlink_protocol::SignedEvalReport| Message::EvalReport(Box::new(r));
    // site-0: another model, then a tampered report, then a NaN loss.
    let wrong = s0
        .sign_eval(&req0, ModelHash([7; 32]), eval_metrics(2))
        .unwrap();
    s0.send_control(&report(wrong)).await.unwrap();
    let mut tampered = s0.sign_eval(&req0, model, eval_metrics(2)).unwrap();
    tampered.report.metrics.accuracy = Some(1.0);
    s0.send_control(&report(tampered)).await.unwrap();
    let nan = EvalMetrics {
        loss: Some(f64::NAN),
        ..eval_metrics(2)
    };
    let nan = s0.sign_eval(&req0, model, nan).unwrap();
    s0.send_control(&report(nan)).await.unwrap();
    // site-1: site-0's report on its own connection, then its own.
    let borrowed = s0.sign_eval(&req0, model, eval_metrics(9)).unwrap();
    s1.send_control(&report(borrowed)).await.unwrap();
    let own = s1.sign_eval(&req1, model, eval_metrics(3)).unwrap();
    s1.send_control(&report(own)).await.unwrap();

    let out = coord.finished().await.unwrap();
    assert_eq!(out.outcome, Some(JobOutcome::Completed { model }));
    let store = fedlink_coordinator::store::Store::open(&data_dir).unwrap();
    let round = store.round("e2e", RoundId(1)).unwrap().unwrap();
    let fin = round.final_evaluation.unwrap();
    assert_eq!((fin.after_round, fin.reported_in_round), (1, None));
    assert_eq!(fin.model, model.to_hex());
    let sites: Vec<(&str, u64)> = fin
        .sites
        .iter()
        .map(|s| (s.site.as_str(), s.num_eval_examples))
        .collect();
    assert_eq!(sites, [("site-1", 3)]);
    assert_eq!(fin.weighted.accuracy, Some(0.75));
    assert_eq!(fin.excluded.len(), 1);
    assert_eq!(
        (
            fin.excluded[0].site.as_str(),
            fin.excluded[0].reason.as_str()
        ),
        ("site-0", "loss is not finite")
    );
    let audit = std::fs::read_to_string(data_dir.join("audit/audit.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reasons = |site: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|e| e["event"] == "eval.rejected" && e["details"]["site"] == site)
            .map(|e| e["details"]["reason"].as_str().unwrap().to_owned())
            .collect()
    };
    let r0 = reasons("site-0");
    assert_eq!(r0.len(), 3, "{r0:?}");
    assert!(r0[0].starts_with("report is for model 0707"), "{r0:?}");
    assert_eq!(
        r0[1],
        "report signature does not verify with the key registered for the site"
    );
    assert_eq!(r0[2], "loss is not finite");
    assert_eq!(
        reasons("site-1"),
        ["report claims site site-0 but the connection is authenticated as site-1"]
    );
    let accepted: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["event"] == "eval.accepted")
        .collect();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0]["details"]["site"], "site-1");
    // Asked after `job.finished`; the final model's `round.evaluated` (the
    // last one; round 1's updates evaluated the initial model) after.
    let pos = |name: &str| entries.iter().position(|e| e["event"] == name).unwrap();
    let last = entries
        .iter()
        .rposition(|e| e["event"] == "round.evaluated")
        .unwrap();
    assert!(pos("job.finished") < pos("eval.requested"));
    assert!(pos("eval.requested") < last);
    assert_eq!(entries[last]["details"]["requested"], true);
}

/// A site that negotiated a version below 7 (`RawSite::connect` speaks up
/// to 5) cannot ask for a downlink update: the stream is refused as
/// `UnexpectedMessage`, and it fetches the whole model as before. The
/// coordinator still wrote the round's update, for sites that can ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_below_version_7_cannot_ask_for_an_update_and_gets_whole_models() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 2,
        codec: fedlink_coordinator::job::CodecKind::F16,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let models = coord.data_dir.join("models");
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(connect(&pki, i, &coord).await);
    }
    let mut round1 = Vec::new();
    for (i, s) in sites.iter_mut().enumerate() {
        round1.push(honest_round(s, i).await);
    }
    let base = round1[0].0.base_model;
    let offer = sites[0].next_offer().await.unwrap();
    assert_eq!(offer.round.0, 2);
    let (answer, records) = sites[0].fetch_update(offer.base_model, base).await.unwrap();
    match answer {
        Message::Reject(r) => {
            assert_eq!(r.code, RejectCode::UnexpectedMessage, "{r:?}")
        }
        other => panic!("expected a refusal, got {}", other.name()),
    }
    assert!(records.is_empty());
    // The update exists (f16 job: downlink "update" by default).
    let name = format!("{}-{}.update", base.to_hex(), offer.base_model.to_hex());
    assert!(models.join(&name).is_file(), "{name}");
    // The whole model, as before; the round completes. With downlink
    // updates the round's end left its wire form to the first site that
    // asks for the whole model: made now, from the stored model.
    let wire = models.join(format!("{}.wire", offer.base_model.to_hex()));
    assert!(!wire.exists(), "{}", wire.display());
    sites[0].accept(&offer).await.unwrap();
    let global = sites[0].fetch_model(&offer).await.unwrap();
    assert_eq!(global.hash(), offer.base_model);
    assert!(wire.is_file(), "{}", wire.display());
    let up = sites[0]
        .prepare(&offer, &delta_for(&global, 0, 2), examples(0))
        .unwrap();
    let r = sites[0].upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    for (i, s) in sites.iter_mut().enumerate().skip(1) {
        honest_round(s, i).await;
    }
    let out = coord.finished().await.unwrap();
    assert_completed(&out);
}

/// A coordinator restarted after a round serves that round's update again
/// (`models/<base>-<model>.update`, found at start) to a site that holds
/// the base; the update applied to the base is the current model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_serves_the_last_rounds_update_again() {
    use fedlink_protocol::downlink::UpdateApplier;
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 2,
        codec: fedlink_coordinator::job::CodecKind::F16,
        evaluation_every_rounds: 0,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let latest = |i: usize, addr| {
        RawSite::connect_latest(
            pki.site_kit(i).unwrap(),
            addr,
            fedlink_transport::TransportKind::Quic,
        )
    };
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(latest(i, coord.addr).await.unwrap());
    }
    let mut round1 = Vec::new();
    for (i, s) in sites.iter_mut().enumerate() {
        round1.push(honest_round(s, i).await);
    }
    let m0 = round1[0].1.clone();
    fedlink_tests::fixture::wait_for_status(
        &data_dir,
        "round 1 completed",
        std::time::Duration::from_secs(60),
        |s| s.completed_rounds >= 1,
    )
    .await
    .unwrap();
    drop(sites);
    coord.shutdown().await.unwrap();

    let coord = RunningCoordinator::start(&dir.path().join("coordinator.toml"), true)
        .await
        .unwrap();
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(latest(i, coord.addr).await.unwrap());
    }
    let offer = sites[0].next_offer().await.unwrap();
    assert_eq!(offer.round.0, 2);
    let (answer, records) = sites[0]
        .fetch_update(offer.base_model, m0.hash())
        .await
        .unwrap();
    let Message::UpdateManifest(manifest) = answer else {
        panic!(
            "expected the update after the restart, got {}",
            answer.name()
        )
    };
    let mut applier = UpdateApplier::new(*manifest, m0, u64::MAX).unwrap();
    for r in &records {
        applier.push(r).unwrap();
    }
    assert_eq!(applier.finish().unwrap().hash(), offer.base_model);
    sites[0].accept(&offer).await.unwrap();
    let global = sites[0].fetch_model(&offer).await.unwrap();
    let up = sites[0]
        .prepare(&offer, &delta_for(&global, 0, 2), examples(0))
        .unwrap();
    let r = sites[0].upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    for (i, s) in sites.iter_mut().enumerate().skip(1) {
        honest_round(s, i).await;
    }
    let out = coord.finished().await.unwrap();
    assert_completed(&out);
}

/// One decode per upload: an update's chunks are checked and folded into
/// the round at once, and only its whole-update check (here: the
/// accumulator's magnitude bound, `num_examples · |x| ≤ 2^26`, on its last
/// value) refuses it at its end. What it folded is taken out again: the
/// published model is the model of the counted updates only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_refused_at_its_end_leaves_the_counted_updates_model() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        // Sites 0 and 1 count; site 2's invalid update is its report.
        quorum: 2,
        // 10 parameters in records of 4 values: three records.
        chunk_bytes: Some(16),
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(connect(&pki, i, &coord).await);
    }
    let (offers, global) = join_round(&mut sites).await.unwrap();
    upload_accepted(&mut sites[0], &offers[0], &global, 0).await;
    // Site 2: finite values, within every per-value bound, but its last
    // value times its weight is past the exact accumulator's bound.
    let mut big = delta_for(&global, 2, 1);
    let n = big.values().len();
    big.values_mut()[n - 1] = 1.0e7;
    let bad = sites[2].prepare(&offers[2], &big, examples(2)).unwrap();
    assert!(bad.records.len() >= 3, "{} records", bad.records.len());
    let r = sites[2].upload(&bad, None).await.unwrap().unwrap();
    assert!(
        matches!(
            r,
            UploadResult::Reject {
                code: RejectCode::Malformed,
                ..
            }
        ),
        "{r:?}"
    );
    // Site 1's honest update completes the round (every site reported).
    upload_accepted(&mut sites[1], &offers[1], &global, 1).await;
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    let next = read_model_file(&data_dir.join(format!("models/{model}.bin")), &model).unwrap();
    assert_close(next.values(), &expected_next(&global, &[0, 1], 1));
    let status = fedlink_tests::fixture::read_status(&data_dir).unwrap();
    assert_eq!(
        status.rounds[0].updates.len(),
        2,
        "only the counted updates"
    );
}
