//! Federated feature standardisation end to end against the real
//! coordinator (real QUIC, mTLS, store, signatures): the sites' signed
//! feature statistics of round 1 become the pooled scaling that every
//! round-2 offer carries, it survives a coordinator restart, and bad or
//! mismatched reports do not enter it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedlink_protocol::message::{RejectCode, TaskOffer, UploadResult};
use fedlink_protocol::{FeatureScaling, FeatureStats, FlatModel};
use fedlink_test_util::TestPki;
use fedlink_tests::assert_completed;
use fedlink_tests::fixture::{JobSpec, RunningCoordinator, read_status, write_config, write_job};
use fedlink_tests::raw_site::RawSite;

const FEATURES: [&str; 3] = ["age", "bmi", "marker"];

fn examples(site: usize) -> u64 {
    10 * (site as u64 + 1)
}

/// Count, Σx, Σx² of `examples(site)` synthetic rows of site `site` in
/// `round` (the sites' distributions differ: non-IID).
fn stats_of(site: usize, round: u64, features: &[&str]) -> FeatureStats {
    let n = features.len();
    let (mut sum, mut sum_sq) = (vec![0.0; n], vec![0.0; n]);
    for r in 0..examples(site) {
        for j in 0..n {
            let x = 40.0 * j as f64
                + 7.5 * site as f64
                + ((r * (j as u64 + 3) + round) % 11) as f64 * (1.0 + site as f64);
            sum[j] += x;
            sum_sq[j] += x * x;
        }
    }
    FeatureStats {
        features: features.iter().map(|s| (*s).to_owned()).collect(),
        count: examples(site),
        sum,
        sum_sq,
    }
}

/// The pooled standardisation, written out independently of the library.
fn expected_scaling(reports: &[FeatureStats]) -> FeatureScaling {
    let n = reports[0].features.len();
    let total: f64 = reports.iter().map(|r| r.count as f64).sum();
    let mut mean = Vec::new();
    let mut std = Vec::new();
    for j in 0..n {
        let m = reports.iter().map(|r| r.sum[j]).sum::<f64>() / total;
        let ex2 = reports.iter().map(|r| r.sum_sq[j]).sum::<f64>() / total;
        mean.push(m);
        std.push((ex2 - m * m).sqrt());
    }
    FeatureScaling {
        features: reports[0].features.clone(),
        mean,
        std,
    }
}

fn assert_scaling(actual: &FeatureScaling, expected: &FeatureScaling) {
    assert_eq!(actual.features, expected.features);
    for (a, e) in actual
        .mean
        .iter()
        .chain(&actual.std)
        .zip(expected.mean.iter().chain(&expected.std))
    {
        assert!((a - e).abs() <= 1e-12 * e.abs().max(1.0), "{a} vs {e}");
    }
}

fn delta_for(global: &FlatModel, site: usize) -> FlatModel {
    let values = (0..global.values().len())
        .map(|j| ((j % 5) as f32 - 2.0) * 0.01 * (site as f32 + 1.0))
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

async fn connect_all(pki: &TestPki, c: &RunningCoordinator) -> Vec<RawSite> {
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(
            RawSite::connect(pki.site_kit(i).unwrap(), c.addr)
                .await
                .unwrap(),
        );
    }
    sites
}

/// Every site takes its next offer and downloads the model.
async fn take_offers(sites: &mut [RawSite]) -> (Vec<TaskOffer>, FlatModel) {
    let mut offers = Vec::new();
    let mut global = None;
    for s in sites.iter_mut() {
        let o = s.next_offer().await.unwrap();
        s.accept(&o).await.unwrap();
        global = Some(s.fetch_model(&o).await.unwrap());
        offers.push(o);
    }
    (offers, global.unwrap())
}

async fn upload(
    site: &RawSite,
    i: usize,
    offer: &TaskOffer,
    global: &FlatModel,
    stats: Option<FeatureStats>,
) -> UploadResult {
    let up = site
        .prepare_with_stats(offer, &delta_for(global, i), examples(i), stats)
        .unwrap();
    site.upload(&up, None).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_two_offers_carry_the_scaling_pooled_from_round_one_reports() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        id: "scaling".into(),
        rounds: 2,
        ..JobSpec::default()
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, false).await.unwrap();
    let data_dir = coord.data_dir.clone();

    // Round 1: no federated scaling yet; every site reports its raw sums.
    let mut sites = connect_all(&pki, &coord).await;
    let (offers, global) = take_offers(&mut sites).await;
    assert!(offers.iter().all(|o| o.scaling.is_none()));
    let round1: Vec<FeatureStats> = (0..3).map(|i| stats_of(i, 1, &FEATURES)).collect();
    for (i, s) in sites.iter().enumerate() {
        let r = upload(s, i, &offers[i], &global, Some(round1[i].clone())).await;
        assert!(
            matches!(r, UploadResult::Ack { accepted: true, .. }),
            "{r:?}"
        );
    }

    // Round 2: every offer carries the exact pooled scaling, and so does
    // status.json.
    let want = expected_scaling(&round1);
    for s in &mut sites {
        let o = s.next_offer().await.unwrap();
        assert_eq!(o.round.0, 2);
        assert_scaling(
            o.scaling.as_ref().expect("round 2 carries a scaling"),
            &want,
        );
        o.validate().unwrap();
    }
    let status = coord.status().unwrap();
    assert_scaling(status.scaling.as_ref().unwrap(), &want);

    // The scaling survives a coordinator restart (persisted with round 1).
    drop(sites);
    coord.shutdown().await.unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let mut sites = connect_all(&pki, &coord).await;
    let (offers, global) = take_offers(&mut sites).await;
    for o in &offers {
        assert_eq!(o.round.0, 2);
        assert_scaling(o.scaling.as_ref().unwrap(), &want);
    }

    // Round 2 reports: malformed statistics are refused before the payload;
    // statistics of other features are ignored (and drop that site's
    // earlier report); the others replace their site's round-1 report.
    let mut nan = stats_of(0, 2, &FEATURES);
    nan.sum[1] = f64::NAN;
    let r = upload(&sites[0], 0, &offers[0], &global, Some(nan)).await;
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
    let round2 = [stats_of(0, 2, &FEATURES), stats_of(2, 2, &FEATURES)];
    let other = stats_of(1, 2, &["age", "bmi", "weight"]);
    for (i, stats) in [(0, round2[0].clone()), (1, other), (2, round2[1].clone())] {
        let r = upload(&sites[i], i, &offers[i], &global, Some(stats)).await;
        assert!(
            matches!(r, UploadResult::Ack { accepted: true, .. }),
            "site {i}: {r:?}"
        );
    }
    let out = coord.finished().await.unwrap();
    assert_completed(&out);
    let status = read_status(&data_dir).unwrap();
    assert_scaling(status.scaling.as_ref().unwrap(), &expected_scaling(&round2));
}
