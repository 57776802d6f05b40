//! Resumable uploads against the real coordinator (QUIC, mTLS, store,
//! signatures, aggregation): an upload cut mid-record, again and again,
//! resumes from the last whole record the coordinator spooled, with the
//! same signed envelope; the bytes sent twice are at most one record per
//! cut; the round's model is exactly the one the whole update gives; the
//! audit log says what was kept. A resume the coordinator cannot match is
//! refused, and nothing is lost by it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedlink_coordinator::round::JobOutcome;
use fedlink_coordinator::store::read_model_file;
use fedlink_protocol::message::{RejectCode, UploadResult};
use fedlink_protocol::{FlatModel, UpdateNonce};
use fedlink_test_util::TestPki;
use fedlink_tests::assert_completed;
use fedlink_tests::fixture::{JobSpec, RunningCoordinator};
use fedlink_tests::raw_site::{PreparedUpload, RawSite, join_round};
use rand::{Rng, SeedableRng};

fn spec(id: &str) -> JobSpec {
    JobSpec {
        id: id.into(),
        rounds: 1,
        sites: 1,
        quorum: 1,
        deadline_secs: 120,
        // 4 values per chunk record: the update spans dozens of records.
        inputs: 120,
        // The sites below speak version 6 (resumable transfers) and never
        // answer an evaluation request.
        chunk_bytes: Some(16),
        evaluation_every_rounds: 0,
        ..JobSpec::default()
    }
}

/// A raw site speaking version 6.
async fn v6_site(pki: &TestPki, addr: std::net::SocketAddr) -> RawSite {
    RawSite::connect_latest(
        pki.site_kit(0).unwrap(),
        addr,
        fedlink_transport::TransportKind::Quic,
    )
    .await
    .unwrap()
}

async fn start(spec: &JobSpec, pki: &TestPki, dir: &std::path::Path) -> RunningCoordinator {
    RunningCoordinator::start_job(spec, pki, dir).await.unwrap()
}

fn delta_for(global: &FlatModel) -> FlatModel {
    let values = (0..global.values().len())
        .map(|j| ((j % 11) as f32 - 5.0) * 0.01)
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

fn audit(data: &std::path::Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == event)
        .map(|e| e["details"].clone())
        .collect()
}

fn accepted_with(r: &UploadResult, up: &PreparedUpload) {
    match r {
        UploadResult::Ack {
            payload_hash,
            accepted: true,
        } => assert_eq!(*payload_hash, up.envelope.header.payload_hash),
        other => panic!("expected an accepted ack, got {other:?}"),
    }
}

/// Seeded cut points: increasing record indices, each with a partial
/// record of random length (at least one byte, never the whole record).
fn cut_points(up: &PreparedUpload, cuts: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = up.records.len();
    let mut points: Vec<usize> = Vec::new();
    while points.len() < cuts {
        let k = rng.gen_range(0..n);
        if !points.contains(&k) {
            points.push(k);
        }
    }
    points.sort_unstable();
    points
        .into_iter()
        .map(|k| {
            let len = up.records[k].len();
            (k, rng.gen_range(1..len.max(2)).min(len - 1).max(1))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_again_and_again_resumes_from_the_last_whole_record() {
    const CUTS: usize = 5;
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&spec("resume"), &pki, dir.path()).await;
    let data = coord.data_dir.clone();
    let mut sites = vec![v6_site(&pki, coord.addr).await];
    let (offers, global) = join_round(&mut sites).await.unwrap();
    let site = &sites[0];
    let delta = delta_for(&global);
    let up = site.prepare(&offers[0], &delta, 40).unwrap();
    assert!(up.records.len() > 20, "{} records", up.records.len());
    let payload_len = up.envelope.header.payload_len;
    let max_record = up.records.iter().map(Vec::len).max().unwrap() as u64;
    let cuts = cut_points(&up, CUTS, 7);

    // The first attempt is cut part way into record k0.
    let (k0, p0) = cuts[0];
    let r = site.upload_cut(&up, k0, p0).await.unwrap();
    let UploadResult::Reject { message, .. } = &r else {
        panic!("a cut upload is answered with a refusal: {r:?}");
    };
    assert!(
        message.contains(&format!("the {k0} records received are kept")),
        "{message}"
    );
    let mut sent_total: u64 =
        up.records[..k0].iter().map(|r| r.len() as u64).sum::<u64>() + p0 as u64;
    let mut held = k0;
    // Each resume continues from the last whole record, and is cut again.
    for &(k, p) in &cuts[1..] {
        let (progress, sent, r) = site.resume_upload(&up, Some((k, p))).await.unwrap();
        let progress = progress.unwrap_or_else(|| panic!("resume refused: {r:?}"));
        assert_eq!(
            progress.records, held as u64,
            "resumed from the kept records"
        );
        sent_total += sent;
        held = k;
    }
    let (progress, sent, r) = site.resume_upload(&up, None).await.unwrap();
    assert_eq!(progress.unwrap().records, held as u64);
    sent_total += sent;
    accepted_with(&r, &up);

    // Bytes sent twice: the partial records, at most one record per cut.
    let resent = sent_total - payload_len;
    let partials: u64 = cuts.iter().map(|&(_, p)| p as u64).sum();
    assert_eq!(resent, partials);
    assert!(
        resent <= CUTS as u64 * max_record,
        "{resent} > {CUTS} × {max_record}"
    );

    // The round's model is the one the whole update gives (one site:
    // global + delta).
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };
    let next = read_model_file(&data.join(format!("models/{model}.bin")), &model).unwrap();
    for ((n, g), d) in next
        .values()
        .iter()
        .zip(global.values())
        .zip(delta.values())
    {
        assert!((n - (g + d)).abs() < 1e-6, "{n} vs {g} + {d}");
    }

    // The audit log: every cut, with what was kept; one accepted update
    // of the whole payload under the one nonce.
    let nonce: String = up
        .envelope
        .header
        .nonce
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let interrupted = audit(&data, "update.interrupted");
    assert_eq!(interrupted.len(), CUTS, "{interrupted:#?}");
    for (i, e) in interrupted.iter().enumerate() {
        assert_eq!(e["nonce"], nonce.as_str());
        assert_eq!(e["kept_for_resume"], true, "{e}");
        assert_eq!(e["records_received"], cuts[i].0 as u64, "{e}");
        // What arrived of the cut record (its frame header and the
        // partial body) is all that was dropped.
        assert_eq!(
            e["partial_record_bytes_dropped"],
            (cuts[i].1 + fedlink_protocol::FRAME_HEADER_LEN) as u64,
            "{e}"
        );
    }
    let received = audit(&data, "update.received");
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_eq!(received[0]["accepted"], true);
    assert_eq!(received[0]["nonce"], nonce.as_str());
    assert_eq!(received[0]["payload_bytes"], payload_len);
    // Nothing left in the spool.
    let spool: Vec<_> = std::fs::read_dir(data.join("spool"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(spool.is_empty(), "spool not cleaned: {spool:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resumes_on_a_new_connection_after_the_old_one_is_lost() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&spec("reconnect"), &pki, dir.path()).await;
    let mut sites = vec![v6_site(&pki, coord.addr).await];
    let (offers, global) = join_round(&mut sites).await.unwrap();
    let up = sites[0]
        .prepare(&offers[0], &delta_for(&global), 40)
        .unwrap();
    let k = up.records.len() / 2;
    sites[0].upload_cut(&up, k, 3).await.unwrap();
    sites[0].vanish();
    // The site comes back: offered the same round again, it resumes the
    // same signed upload instead of training again.
    let mut site = v6_site(&pki, coord.addr).await;
    let offer = site.next_offer().await.unwrap();
    assert_eq!(
        (offer.round, offer.base_model),
        (offers[0].round, offers[0].base_model)
    );
    site.accept(&offer).await.unwrap();
    let (progress, _, r) = site.resume_upload(&up, None).await.unwrap();
    assert_eq!(progress.unwrap().records, k as u64);
    accepted_with(&r, &up);
    let out = coord.finished().await.unwrap();
    assert_completed(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_matches_no_kept_upload_is_refused_and_costs_nothing() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&spec("refused"), &pki, dir.path()).await;
    let data = coord.data_dir.clone();
    let mut sites = vec![v6_site(&pki, coord.addr).await];
    let (offers, global) = join_round(&mut sites).await.unwrap();
    let site = &sites[0];
    let delta = delta_for(&global);
    // Nothing was started with this envelope.
    let never = site.prepare(&offers[0], &delta, 40).unwrap();
    let (progress, _, r) = site.resume_upload(&never, None).await.unwrap();
    assert!(progress.is_none());
    let UploadResult::Reject { code, message } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(*code, RejectCode::Replay);
    assert!(message.contains("cannot be resumed"), "{message}");

    // An upload is cut; a resume with another signed header under the same
    // nonce (another payload) does not continue it.
    let up = site.prepare(&offers[0], &delta, 40).unwrap();
    site.upload_cut(&up, 4, 2).await.unwrap();
    let mut forged = site.prepare(&offers[0], &delta, 39).unwrap();
    forged.envelope.header.nonce = UpdateNonce(up.envelope.header.nonce.0);
    let key = pki.site_kit(0).unwrap();
    forged.envelope =
        fedlink_protocol::sign_update(key.update_signing_key().unwrap(), forged.envelope.header);
    let (progress, _, r) = site.resume_upload(&forged, None).await.unwrap();
    assert!(progress.is_none(), "{r:?}");
    let UploadResult::Reject { code, message } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(*code, RejectCode::Replay, "{message}");
    assert!(message.contains("another signed header"), "{message}");
    // The kept upload went with the refused resume; the original envelope
    // can no longer be resumed, but the site's round is not used up: a
    // fresh upload (new nonce) is accepted.
    let (progress, _, _) = site.resume_upload(&up, None).await.unwrap();
    assert!(progress.is_none());
    let fresh = site.prepare(&offers[0], &delta, 40).unwrap();
    let r = site.upload(&fresh, None).await.unwrap().unwrap();
    accepted_with(&r, &fresh);
    let out = coord.finished().await.unwrap();
    assert_completed(&out);
    let refused = audit(&data, "update.received")
        .into_iter()
        .filter(|e| e["accepted"] == false)
        .count();
    assert_eq!(refused, 3, "every refused resume is recorded");
}

/// A real agent over TLS on TCP whose connection is cut as it starts to
/// upload (the moment its `update.sent` is on disk): it reconnects and
/// finishes the round without training again — resuming the signed upload
/// where the coordinator kept part of it, or signing the same payload
/// again under a new nonce where the coordinator kept nothing. Which of
/// the two happens depends on how far the bytes got before the cut; both
/// must end with the round's update accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_while_uploading_finishes_the_round_without_training_again() {
    use fedlink_agent::audit::Recorded;
    use fedlink_agent::{Agent, SiteConfig};
    use fedlink_tests::fixture::wdbc_site_toml;
    use fedlink_tools::impair::{ImpairProxy, Impairment, ProxyConfig};
    use std::time::Duration;

    const LIMIT: Duration = Duration::from_secs(90);
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        id: "agent-cut".into(),
        rounds: 2,
        sites: 1,
        quorum: 1,
        deadline_secs: 60,
        inputs: 30,
        chunk_bytes: Some(16),
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data = coord.data_dir.clone();
    let proxy = ImpairProxy::start(ProxyConfig::new(coord.addr))
        .await
        .unwrap();
    // A slow uplink, so that the cut lands while the upload is under way.
    let slow = Impairment {
        rate: Some(4_000),
        queue_limit: Duration::from_secs(10),
        ..Impairment::default()
    };
    proxy
        .handle()
        .set_impairment(slow, Impairment::default())
        .unwrap();
    let mut text = wdbc_site_toml(&pki, 0, proxy.addr()).unwrap();
    text = text.replacen(
        "device = \"cpu\"\n",
        "device = \"cpu\"\ntransport = \"tcp\"\n",
        1,
    );
    let config = SiteConfig::parse(&text, std::path::Path::new("site.toml"), dir.path()).unwrap();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel::<Recorded>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config).with_events(tx).run(async {
        let _ = stopped.await;
    }));
    let mut seen = Vec::new();
    // Cut at the first upload.
    loop {
        let e = tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("the agent uploads")
            .expect("events");
        let sent = e.event == "update.sent";
        seen.push(e);
        if sent {
            // Once the header and a few records have got through the slow
            // uplink (bounded wait on the proxy's byte count).
            let base = proxy.handle().stats().tcp_bytes;
            tokio::time::timeout(LIMIT, async {
                while proxy.handle().stats().tcp_bytes < base + 900 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await
            .expect("the upload goes through the proxy");
            proxy.handle().cut();
            break;
        }
    }
    let outcome = tokio::time::timeout(LIMIT, coord.finished())
        .await
        .expect("the job finishes")
        .unwrap();
    assert_completed(&outcome);
    let _ = stop.send(());
    tokio::time::timeout(LIMIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert_eq!(proxy.handle().stats().cuts, 1);
    let of_round = |event: &str, round: u64| {
        seen.iter()
            .filter(|e| e.event == event && e.details["round"] == round)
            .collect::<Vec<_>>()
    };
    // Trained once for round 1, whatever the cut interrupted.
    assert_eq!(of_round("train.completed", 1).len(), 1, "{seen:#?}");
    let sent = of_round("update.sent", 1);
    let resumed = of_round("update.resumed", 1);
    let accepted: Vec<_> = of_round("update.result", 1)
        .into_iter()
        .filter(|e| e.details["accepted"] == true)
        .collect();
    // Every payload the site sent for round 1 is the same update.
    assert!(
        sent.iter()
            .all(|e| e.details["payload_hash"] == sent[0].details["payload_hash"]),
        "{sent:#?}"
    );
    // The cut reached the upload (it was resumed, or signed again), or the
    // coordinator had it whole before the cut (its round 1 then closed
    // without the answer reaching the site).
    let coordinator_accepted_round_1 = audit(&data, "update.received")
        .iter()
        .any(|e| e["round"] == 1 && e["accepted"] == true);
    assert!(coordinator_accepted_round_1, "{seen:#?}");
    assert!(
        !resumed.is_empty() || sent.len() == 2 || accepted.is_empty(),
        "{seen:#?}"
    );
    // The two audit logs agree: every update the site sent was received
    // unaltered, whatever the cut did.
    let site_log = dir.path().join("site-0/audit.jsonl");
    let site_key = pki
        .site_dir(0)
        .unwrap()
        .join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE);
    let out =
        std::process::Command::new(fedlink_tests::fixture::workspace_binary("fedlink").unwrap())
            .args(["audit", "reconcile", "--site"])
            .arg(&site_log)
            .arg("--site-key")
            .arg(&site_key)
            .arg("--coordinator")
            .arg(data.join("audit/audit.jsonl"))
            .arg("--coordinator-key")
            .arg(data.join("audit/audit-key.pub"))
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("CONSISTENT"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for r in &resumed {
        // The same envelope; what the coordinator held plus what went
        // again is the whole payload.
        let d = &r.details;
        assert_eq!(d["nonce"], sent[0].details["nonce"], "same envelope");
        assert_eq!(
            d["bytes_held"].as_u64().unwrap() + d["bytes_sent"].as_u64().unwrap(),
            sent[0].details["payload_bytes"].as_u64().unwrap(),
            "{d}"
        );
    }
}

/// A model download cut after some records resumes with `ModelFetchFrom`
/// on a new connection: only the missing records come, and the records
/// kept and fetched decode to the offered model (its hash checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_download_resumes_from_the_records_the_site_kept() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        // 2 000 002 parameters (8 MB): the lossless model spans 4 records.
        inputs: 1_000_000,
        ..spec("download")
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let mut site = v6_site(&pki, coord.addr).await;
    let offer = site.next_offer().await.unwrap();
    site.accept(&offer).await.unwrap();
    let (manifest, mut kept) = site.fetch_records(&offer, 0, 1).await.unwrap();
    assert!(manifest.num_chunks >= 3, "{manifest:?}");
    site.vanish();
    let mut site = v6_site(&pki, coord.addr).await;
    let again = site.next_offer().await.unwrap();
    assert_eq!(again.base_model, offer.base_model);
    site.accept(&again).await.unwrap();
    let (manifest2, rest) = site
        .fetch_records(&again, kept.len() as u64, usize::MAX)
        .await
        .unwrap();
    assert_eq!(manifest2, manifest, "the whole manifest again");
    assert_eq!(
        rest.len() as u64,
        manifest.num_chunks - 1,
        "only the missing records"
    );
    kept.extend(rest);
    let mut dec =
        fedlink_protocol::PayloadDecoder::new(manifest.spec.clone(), manifest.encoding).unwrap();
    let mut values = Vec::new();
    for r in &kept {
        values.extend(dec.decode_chunk(r).unwrap().values);
    }
    dec.finish().unwrap();
    let model = FlatModel::new(manifest.spec.clone(), values).unwrap();
    assert_eq!(model.hash(), offer.base_model);
    // A resume asking past the end gets the manifest and nothing else.
    let (_, none) = site
        .fetch_records(&again, manifest.num_chunks, usize::MAX)
        .await
        .unwrap();
    assert!(none.is_empty());
    coord.shutdown().await.unwrap();
}
