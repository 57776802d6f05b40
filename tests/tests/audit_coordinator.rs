//! The coordinator's audit trail end to end: a real federation (real QUIC,
//! mTLS, store, aggregation with server state and DP noise) with scripted
//! sites, then `fedlink audit verify` of the coordinator's signed log and
//! `fedlink audit replay` of every round from the archive — and of a
//! tampered archive.
//!
//! Needs the `fedlink` binary: `cargo build -p fedlink-cli --bins`
//! (`cargo test --workspace` builds it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use fedlink_certs::Kit;
use fedlink_coordinator::job::{ParamValue, Privacy, StrategySection};
use fedlink_coordinator::round::JobOutcome;
use fedlink_coordinator::round_archive::{ROUND_FILE, RoundFile};
use fedlink_protocol::FlatModel;
use fedlink_protocol::message::{RejectCode, UploadResult};
use fedlink_test_util::TestPki;
use fedlink_tests::fixture::{
    JobSpec, RunningCoordinator, workspace_binary, write_config, write_job_file,
};
use fedlink_tests::raw_site::RawSite;
use serde_json::Value;

fn delta_for(global: &FlatModel, site: usize, round: u64) -> FlatModel {
    let values = (0..global.values().len())
        .map(|j| ((j % 5) as f32 - 2.0) * 0.02 * (site as f32 + 1.0) + round as f32 * 0.003)
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

fn fedlink(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_binary("fedlink").unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn entries(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn replay(data: &Path, ca: &Path, job: &str, round: u64) -> (i32, String, String) {
    fedlink(&[
        "audit",
        "replay",
        "--data-dir",
        data.to_str().unwrap(),
        "--job",
        job,
        "--round",
        &round.to_string(),
        "--ca-dir",
        ca.to_str().unwrap(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_log_and_bit_exact_replay_with_server_state_and_dp() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        id: "audited".into(),
        rounds: 2,
        ..JobSpec::default()
    };
    // FedAdam (server moments carried between rounds) and central DP
    // (clipping + Gaussian noise from the per-round seed).
    let mut audited = spec.job();
    audited.strategy = StrategySection::named("fedadam");
    audited
        .strategy
        .params
        .insert("eta".into(), ParamValue::Float(0.05));
    audited.privacy = Privacy {
        clip_norm: Some(1.0),
        noise_multiplier: 0.5,
        target_delta: None,
    };
    let job = write_job_file(dir.path(), &audited).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let data = coord.data_dir.clone();
    let ca = pki.manifest_path().parent().unwrap().to_owned();

    // A revoked certificate is refused at the handshake: recorded.
    let revoked = Kit::load(pki.revoked_site_dir()).unwrap();
    assert!(RawSite::connect(revoked, coord.addr).await.is_err());

    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(
            RawSite::connect(pki.site_kit(i).unwrap(), coord.addr)
                .await
                .unwrap(),
        );
    }
    let mut tampered_hash = None;
    for round in 1..=2u64 {
        let mut offers = Vec::new();
        let mut global = None;
        for s in &mut sites {
            let o = s.next_offer().await.unwrap();
            assert_eq!(o.round.0, round);
            s.accept(&o).await.unwrap();
            global = Some(s.fetch_model(&o).await.unwrap());
            offers.push(o);
        }
        let global = global.unwrap();
        if round == 1 {
            // Site 2 alters its payload after signing: refused, with a reason.
            let mut bad = sites[2]
                .prepare(&offers[2], &delta_for(&global, 2, round), 30)
                .unwrap();
            let last = bad.records[0].len() - 1;
            bad.records[0][last] ^= 0x01;
            tampered_hash = Some(bad.envelope.header.payload_hash.to_hex());
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
        }
        for (i, s) in sites.iter().enumerate() {
            let up = s
                .prepare(
                    &offers[i],
                    &delta_for(&global, i, round),
                    10 * (i as u64 + 1),
                )
                .unwrap();
            let r = s.upload(&up, None).await.unwrap().unwrap();
            assert!(
                matches!(r, UploadResult::Ack { accepted: true, .. }),
                "{r:?}"
            );
        }
    }
    let out = coord.finished().await.unwrap();
    let Some(JobOutcome::Completed { model }) = out.outcome else {
        panic!("job did not complete: {:?}", out.outcome);
    };

    // The log verifies with the exported key.
    let log = data.join("audit/audit.jsonl");
    let key = data.join("audit/audit-key.pub");
    let (code, stdout, stderr) = fedlink(&[
        "audit",
        "verify",
        log.to_str().unwrap(),
        "--rotated",
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "verify: {stdout}\n{stderr}");

    let es = entries(&log);
    let of = |event: &str| -> Vec<&Value> { es.iter().filter(|e| e["event"] == event).collect() };
    let started = of("coordinator.started");
    assert_eq!(started.len(), 1);
    assert_eq!(
        started[0]["details"]["audit_public_key"].as_str().unwrap(),
        std::fs::read_to_string(&key).unwrap().trim()
    );
    assert_eq!(of("job.submitted").len(), 1);
    assert!(
        of("conn.refused").iter().any(|e| e["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("handshake")),
        "{:?}",
        of("conn.refused")
    );
    assert_eq!(of("conn.accepted").len(), 3);
    assert_eq!(of("round.opened").len(), 2);
    assert_eq!(of("offer.sent").len(), 6);
    let updates = of("update.received");
    let accepted: Vec<_> = updates
        .iter()
        .filter(|e| e["details"]["accepted"] == true)
        .collect();
    assert_eq!(accepted.len(), 6);
    let rejected: Vec<_> = updates
        .iter()
        .filter(|e| e["details"]["accepted"] == false)
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(
        rejected[0]["details"]["payload_hash"].as_str(),
        tampered_hash.as_deref()
    );
    assert!(
        !rejected[0]["details"]["reason"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(
        rejected[0]["actor"]
            .as_str()
            .unwrap()
            .ends_with("/site/site-2")
    );
    let finished = of("job.finished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["details"]["outcome"]["result"], "completed");

    // round.aggregated names exactly the accepted inputs, and round.json agrees.
    let aggregated = of("round.aggregated");
    assert_eq!(aggregated.len(), 2);
    for agg in &aggregated {
        let d = &agg["details"];
        let round = d["round"].as_u64().unwrap();
        assert_eq!(d["strategy"]["name"], "fedadam");
        assert!(d["dp"].is_object(), "{d}");
        let file = RoundFile::load(
            &fedlink_coordinator::round_archive::round_dir(&data, "audited", round)
                .join(ROUND_FILE),
        )
        .unwrap();
        assert_eq!(d["output_model"].as_str().unwrap(), file.output_model);
        let mut from_log: Vec<(String, String)> = d["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["site"].as_str().unwrap().to_owned(),
                    i["payload_hash"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        from_log.sort();
        let mut from_updates: Vec<(String, String)> = accepted
            .iter()
            .filter(|e| e["details"]["round"].as_u64() == Some(round))
            .map(|e| {
                (
                    e["details"]["site"].as_str().unwrap().to_owned(),
                    e["details"]["payload_hash"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        from_updates.sort();
        assert_eq!(from_log, from_updates, "round {round}");
        assert_eq!(from_log.len(), 3);
    }
    assert_eq!(
        aggregated[1]["details"]["output_model"].as_str().unwrap(),
        model.to_hex()
    );

    // Every completed round reproduces bit for bit.
    for round in 1..=2 {
        let (code, stdout, stderr) = replay(&data, &ca, "audited", round);
        assert_eq!(code, 0, "round {round}: {stdout}\n{stderr}");
        assert!(stdout.contains("REPRODUCED"), "{stdout}");
    }
    // Without the sites' keys the arithmetic still reproduces, but the exit
    // code says the signatures were not checked.
    let (code, stdout, stderr) = fedlink(&[
        "audit",
        "replay",
        "--data-dir",
        data.to_str().unwrap(),
        "--job",
        "audited",
        "--round",
        "1",
    ]);
    assert_eq!(code, 4, "{stdout}\n{stderr}");
    // Another seed changes the noise: the aggregation step is named.
    let r2 = fedlink_coordinator::round_archive::round_dir(&data, "audited", 2);
    let original = std::fs::read(r2.join(ROUND_FILE)).unwrap();
    let mut f: RoundFile = serde_json::from_slice(&original).unwrap();
    f.dp_seed = "ab".repeat(32);
    std::fs::write(r2.join(ROUND_FILE), serde_json::to_vec(&f).unwrap()).unwrap();
    let (code, stdout, _) = replay(&data, &ca, "audited", 2);
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("aggregation step differs"), "{stdout}");
    std::fs::write(r2.join(ROUND_FILE), &original).unwrap();

    // One altered byte of an archived payload: named, exit 3.
    let r1 = fedlink_coordinator::round_archive::round_dir(&data, "audited", 1);
    let file = RoundFile::load(&r1.join(ROUND_FILE)).unwrap();
    let victim = r1.join(&file.inputs[1].payload_file);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    let (code, stdout, stderr) = replay(&data, &ca, "audited", 1);
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&file.inputs[1].payload_file) && stdout.contains("altered"),
        "{stdout}"
    );

    // A malformed round.json cannot be checked: exit 1, no panic.
    std::fs::write(r1.join(ROUND_FILE), b"{\"format\": 1, \"inputs\": [").unwrap();
    let (code, _, stderr) = replay(&data, &ca, "audited", 1);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("round.json"), "{stderr}");
}
