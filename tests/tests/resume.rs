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
use fedlink_tests::fixture::{JobSpec, RunningCoordinator, write_config, write_job};
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
        extra: "chunk_bytes = 16".into(),
        ..JobSpec::default()
    }
}

async fn start(spec: &JobSpec, pki: &TestPki, dir: &std::path::Path) -> RunningCoordinator {
    let job = write_job(dir, spec).unwrap();
    let cfg = write_config(pki, dir, &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    RunningCoordinator::start(&cfg, true).await.unwrap()
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
    let mut sites = vec![
        RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
            .await
            .unwrap(),
    ];
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
    let mut sites = vec![
        RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
            .await
            .unwrap(),
    ];
    let (offers, global) = join_round(&mut sites).await.unwrap();
    let up = sites[0]
        .prepare(&offers[0], &delta_for(&global), 40)
        .unwrap();
    let k = up.records.len() / 2;
    sites[0].upload_cut(&up, k, 3).await.unwrap();
    sites[0].vanish();
    // The site comes back: offered the same round again, it resumes the
    // same signed upload instead of training again.
    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
        .await
        .unwrap();
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
    assert!(
        matches!(out.outcome, Some(JobOutcome::Completed { .. })),
        "{:?}",
        out.outcome
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_matches_no_kept_upload_is_refused_and_costs_nothing() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&spec("refused"), &pki, dir.path()).await;
    let data = coord.data_dir.clone();
    let mut sites = vec![
        RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
            .await
            .unwrap(),
    ];
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
    assert!(
        matches!(out.outcome, Some(JobOutcome::Completed { .. })),
        "{:?}",
        out.outcome
    );
    let refused = audit(&data, "update.received")
        .into_iter()
        .filter(|e| e["accepted"] == false)
        .count();
    assert_eq!(refused, 3, "every refused resume is recorded");
}
