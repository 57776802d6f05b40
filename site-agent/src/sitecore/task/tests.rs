//! The round's work with a deterministic [`Trainer`]: no burn, no network.

use std::cell::Cell;
use std::time::Duration;

use ed25519_dalek::{Signature, SigningKey};
use fedlink_protocol::{
    DpNoise, Encoding, FederationId, JobId, RoundId, SiteId, decode_payload, encode_payload,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::audit::site;
use crate::data::{Fingerprint, SampleShape, Samples, Targets};
use crate::policy::tests::offer;

/// Adds a seeded step in [-step, step) to every weight; evaluation reports
/// the mean absolute weight and counts its calls.
pub(crate) struct StepTrainer {
    step: f32,
    pub(crate) evaluations: Cell<usize>,
}

impl StepTrainer {
    pub(crate) fn new(step: f32) -> Self {
        Self {
            step,
            evaluations: Cell::new(0),
        }
    }

    fn step_of(&self, seed: u64, n: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
                self.step * (2.0 * u - 1.0)
            })
            .collect()
    }
}

fn mean_abs(v: &[f32]) -> f64 {
    v.iter().map(|x| f64::from(x.abs())).sum::<f64>() / v.len() as f64
}

impl Trainer for StepTrainer {
    fn evaluate(
        &self,
        _arch: &ArchSpec,
        model: &FlatModel,
        data: &Samples,
    ) -> Result<EvalMetrics, TrainError> {
        self.evaluations.set(self.evaluations.get() + 1);
        Ok(EvalMetrics {
            loss: mean_abs(model.values()),
            accuracy: 0.75,
            auc: Some(0.8),
            dice: None,
            n: data.len(),
        })
    }

    fn train_local(
        &self,
        _arch: &ArchSpec,
        global: &FlatModel,
        data: &Samples,
        cfg: &TrainConfig,
    ) -> Result<(FlatModel, TrainReport), TrainError> {
        let step = self.step_of(cfg.seed, global.values().len());
        let values = global
            .values()
            .iter()
            .zip(&step)
            .map(|(g, s)| g + s)
            .collect();
        let local = FlatModel::new(global.spec().clone(), values)
            .map_err(|e| TrainError::Backend(e.to_string()))?;
        let report = TrainReport {
            epoch_loss: vec![0.5; cfg.epochs],
            samples: data.len(),
            steps: cfg.epochs,
            duration: Duration::from_millis(7),
        };
        Ok((local, report))
    }
}

pub(crate) fn arch() -> ArchSpec {
    ArchSpec::Mlp {
        inputs: 4,
        hidden: vec![32],
        classes: 2,
    }
}

pub(crate) fn local_data(train: usize, validation: usize) -> LocalData {
    let n = train + validation;
    let x: Vec<f32> = (0..n * 4).map(|i| (i % 5) as f32).collect();
    let y: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
    let all = Samples::new(SampleShape::Features(4), x, Targets::Classes(y)).unwrap();
    LocalData {
        train: all.subset(&(0..train).collect::<Vec<_>>()),
        validation: all.subset(&(train..n).collect::<Vec<_>>()),
        fingerprint: Fingerprint("fp".into()),
    }
}

pub(crate) fn cfg(seed: u64) -> TrainConfig {
    TrainConfig::new().with_epochs(3).with_seed(seed)
}

pub(crate) fn privacy(clip: Option<f64>, z: Option<f64>) -> PrivacyRequirements {
    PrivacyRequirements {
        clip_norm: clip,
        dp: z.map(|noise_multiplier| DpNoise { noise_multiplier }),
        central_dp: None,
    }
}

pub(crate) fn seeded(seed: u64) -> impl FnOnce() -> Result<NoiseRng, AggregationError> {
    move || Ok(NoiseRng::with_fixed_seed_for_tests(seed))
}

/// A noise source that fails: an update that draws no noise never sees it.
fn never() -> impl FnOnce() -> Result<NoiseRng, AggregationError> {
    || Err(AggregationError::Rng("noise must not be drawn here".into()))
}

fn trained(seed: u64) -> (FlatModel, Trained) {
    let global = arch().init(1).unwrap();
    let t = train_round(
        &StepTrainer::new(0.05),
        &arch(),
        &global,
        &local_data(20, 6),
        &cfg(seed),
    )
    .unwrap();
    (global, t)
}

fn bits(m: &FlatModel) -> Vec<u32> {
    m.values().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn l2_clipping_scales_to_the_norm() {
    let mut v = vec![3.0f32, 4.0];
    assert!((l2_norm(&v) - 5.0).abs() < 1e-12);
    assert!(!clip_l2(&mut v, 10.0));
    assert_eq!(v, vec![3.0, 4.0]);
    assert!(clip_l2(&mut v, 1.0));
    assert!((l2_norm(&v) - 1.0).abs() < 1e-6);
    assert!((v[0] - 0.6).abs() < 1e-6);
    let mut zero = vec![0.0f32; 3];
    assert!(!clip_l2(&mut zero, 1.0));
}

#[test]
fn evaluation_runs_on_the_validation_samples_and_is_skipped_without_them() {
    let global = arch().init(1).unwrap();
    let trainer = StepTrainer::new(0.05);
    let t = train_round(&trainer, &arch(), &global, &local_data(20, 6), &cfg(2)).unwrap();
    assert_eq!(trainer.evaluations.get(), 1);
    let eval = t.global_eval.unwrap();
    assert_eq!(eval.n, 6, "evaluated on the validation samples");
    assert_eq!(eval.loss, mean_abs(global.values()), "the global model");
    assert_eq!(t.report.samples, 20, "trained on the training samples");
    assert_eq!(t.report.epoch_loss.len(), 3);

    let trainer = StepTrainer::new(0.05);
    let t = train_round(&trainer, &arch(), &global, &local_data(20, 0), &cfg(2)).unwrap();
    assert_eq!(trainer.evaluations.get(), 0);
    assert_eq!(t.global_eval, None);
    assert_eq!(t.report.samples, 20);
}

#[test]
fn delta_is_local_minus_global_exactly() {
    let (global, t) = trained(3);
    let u = make_update(&privacy(None, None), &global, &t.local, never()).unwrap();
    let expected: Vec<f32> = t
        .local
        .values()
        .iter()
        .zip(global.values())
        .map(|(l, g)| l - g)
        .collect();
    assert_eq!(u.delta.values(), &expected[..]);
    assert_eq!(u.delta.spec(), global.spec());
    // The step the trainer took, to the f32 rounding of (g + s) − g.
    let step = StepTrainer::new(0.05).step_of(3, expected.len());
    for (d, s) in u.delta.values().iter().zip(&step) {
        assert!((d - s).abs() <= 1e-6, "{d} vs {s}");
    }
    assert_eq!(u.norm, l2_norm(&expected));
    assert!(u.norm > 0.0);
    assert_eq!(u.clipped_norm, u.norm);
    assert!(!u.clipped);
    assert!(!u.dp_noise);
}

#[test]
fn clipping_scales_to_the_offer_norm_and_keeps_the_direction() {
    let (global, t) = trained(4);
    let raw = make_update(&privacy(None, None), &global, &t.local, never()).unwrap();
    let clip = raw.norm / 4.0;
    let u = make_update(&privacy(Some(clip), None), &global, &t.local, never()).unwrap();
    assert!(u.clipped);
    assert!(!u.dp_noise);
    assert_eq!(u.norm, raw.norm, "the norm before clipping is kept");
    assert!(
        u.clipped_norm <= clip * (1.0 + 1e-6),
        "{} > {clip}",
        u.clipped_norm
    );
    assert!(u.clipped_norm >= clip * (1.0 - 1e-6));
    assert_eq!(u.clipped_norm, l2_norm(u.delta.values()));
    let dot: f64 = u
        .delta
        .values()
        .iter()
        .zip(raw.delta.values())
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let cosine = dot / (u.clipped_norm * raw.norm);
    assert!(
        (cosine - 1.0).abs() < 1e-9,
        "direction kept: cosine {cosine}"
    );
    for (c, r) in u.delta.values().iter().zip(raw.delta.values()) {
        assert!((f64::from(*c) - f64::from(*r) / 4.0).abs() < 1e-7);
    }

    // A clip norm above the delta's norm leaves it as it is.
    let loose = make_update(
        &privacy(Some(raw.norm * 2.0), None),
        &global,
        &t.local,
        never(),
    )
    .unwrap();
    assert!(!loose.clipped);
    assert_eq!(loose.delta, raw.delta);
}

#[test]
fn dp_noise_needs_a_clip_norm_and_is_reproducible_for_a_seeded_source() {
    let (global, t) = trained(5);
    let raw = make_update(&privacy(None, None), &global, &t.local, never()).unwrap();
    let clip = raw.norm / 2.0;

    // A noise multiplier without a clip norm: no noise, none drawn.
    let u = make_update(&privacy(None, Some(1.0)), &global, &t.local, never()).unwrap();
    assert!(!u.dp_noise);
    assert_eq!(u.delta, raw.delta);

    let clipped_only = make_update(&privacy(Some(clip), None), &global, &t.local, never()).unwrap();
    let z = 0.5;
    let dp = privacy(Some(clip), Some(z));
    let a = make_update(&dp, &global, &t.local, seeded(7)).unwrap();
    let b = make_update(&dp, &global, &t.local, seeded(7)).unwrap();
    let c = make_update(&dp, &global, &t.local, seeded(8)).unwrap();
    assert!(a.clipped && a.dp_noise);
    assert_eq!(bits(&a.delta), bits(&b.delta), "same seed, same noise");
    assert_ne!(bits(&a.delta), bits(&c.delta), "another seed, other noise");
    assert_eq!(
        a.clipped_norm, clipped_only.clipped_norm,
        "noise after clipping"
    );

    // The noise is N(0, (z·C)²): its sample standard deviation is near z·C.
    let noise: Vec<f64> = a
        .delta
        .values()
        .iter()
        .zip(clipped_only.delta.values())
        .map(|(n, c)| f64::from(*n) - f64::from(*c))
        .collect();
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let sd = (noise.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    assert!(noise.len() > 150, "{} parameters", noise.len());
    assert!(
        (sd / (z * clip) - 1.0).abs() < 0.2,
        "sd {sd} vs {}",
        z * clip
    );

    // A zero multiplier adds nothing and is not reported as noise.
    let zero = make_update(
        &privacy(Some(clip), Some(0.0)),
        &global,
        &t.local,
        seeded(7),
    )
    .unwrap();
    assert!(!zero.dp_noise);
    assert_eq!(zero.delta, clipped_only.delta);

    // A noise source that cannot be seeded is a typed error.
    let err = make_update(&dp, &global, &t.local, never()).unwrap_err();
    assert!(matches!(err, UpdateError::Noise(_)), "{err:?}");
    assert!(err.to_string().starts_with("noise source: "), "{err}");
}

#[test]
fn a_local_model_of_another_layout_is_a_typed_error() {
    let global = arch().init(1).unwrap();
    let other = ArchSpec::Mlp {
        inputs: 4,
        hidden: vec![16],
        classes: 2,
    }
    .init(1)
    .unwrap();
    let err = make_update(&privacy(Some(1.0), Some(1.0)), &global, &other, never()).unwrap_err();
    assert!(matches!(err, UpdateError::LayoutMismatch), "{err:?}");
    assert_eq!(
        err.to_string(),
        "trained model layout differs from the global model"
    );
}

pub(crate) fn session() -> Session {
    Session {
        site_id: SiteId::new("site-a").unwrap(),
        federation_id: FederationId::new("fed").unwrap(),
        protocol_version: 6,
        heartbeat_interval: Duration::from_secs(1),
    }
}

#[test]
fn the_audit_records_carry_what_the_envelope_carries() {
    let (global, t) = trained(6);
    let mut o = offer();
    o.arch = arch();
    o.base_model = global.hash();
    o.encoding = Encoding::default();
    o.privacy = privacy(Some(0.01), Some(0.5));
    let u = make_update(&o.privacy, &global, &t.local, seeded(9)).unwrap();
    let metrics = t.global_eval.as_ref().map(eval_to_protocol);

    let SiteEvent::TrainCompleted(site::TrainCompleted {
        job,
        round,
        base_model,
        dataset_fingerprint,
        num_examples,
        metrics: m,
        clipped,
        dp_noise,
        feature_scaling,
    }) = train_completed(&o, "fp".into(), &t.report, metrics.as_ref(), &u, "local")
    else {
        panic!("a TrainCompleted record expected")
    };
    assert_eq!((job.as_str(), round), ("job", RoundId(1)));
    assert_eq!(base_model, global.hash().to_hex());
    assert_eq!(dataset_fingerprint, "fp");
    assert_eq!(num_examples, 20);
    assert_eq!(m["delta_norm"], serde_json::json!(u.norm));
    assert_eq!(m["epochs"], serde_json::json!(3));
    assert_eq!(m["duration_ms"], serde_json::json!(7));
    assert_eq!(m["global_eval"]["n"], serde_json::json!(6));
    assert_eq!(m["global_eval"]["auc"], serde_json::json!(0.8));
    assert!(clipped && dp_noise);
    assert_eq!(feature_scaling, "local");

    let (records, summary) = encode_payload(&u.delta, o.encoding, 11).unwrap();
    let key = SigningKey::from_bytes(&[4; 32]);
    let nonce = UpdateNonce([5; 16]);
    let sealed = seal_update(
        &session(),
        &o,
        &summary,
        Claims {
            num_examples: t.report.samples as u64,
            metrics: metrics.clone(),
            feature_stats: None,
            nonce,
        },
        &key,
    );
    let h = &sealed.envelope.header;
    // The header names the session, the offer, the payload and the claims.
    assert_eq!(h.site_id, session().site_id);
    assert_eq!(h.federation_id, session().federation_id);
    assert_eq!(h.protocol_version, 6);
    assert_eq!((&h.job_id, h.round), (&o.job_id, o.round));
    assert_eq!(h.base_model, o.base_model);
    assert_eq!(h.encoding, o.encoding);
    assert_eq!(h.payload_len, summary.payload_len);
    assert_eq!(h.payload_hash, summary.payload_hash);
    assert_eq!(h.num_examples, 20);
    assert_eq!(h.metrics, metrics);
    assert_eq!(h.nonce, nonce);
    // Signed with the site key over the header.
    let sig = Signature::from_bytes(&sealed.envelope.signature.to_bytes());
    key.verifying_key()
        .verify_strict(&h.signed_bytes(), &sig)
        .unwrap();
    // The payload is the (lossless) delta.
    let decoded = decode_payload(
        u.delta.spec().clone(),
        o.encoding,
        records.iter().map(Vec::as_slice),
    )
    .unwrap();
    assert_eq!(bits(&decoded), bits(&u.delta));

    assert_eq!(sealed.sent, update_sent(&sealed.envelope));
    let SiteEvent::UpdateSent(site::UpdateSent {
        job,
        round,
        payload_hash,
        payload_bytes,
        num_examples,
        nonce: logged_nonce,
        base_model,
        encoding,
        feature_stats,
    }) = sealed.sent
    else {
        panic!("an UpdateSent record expected")
    };
    assert_eq!(job, h.job_id);
    assert_eq!(round, h.round);
    assert_eq!(payload_hash, h.payload_hash.to_hex());
    assert_eq!(payload_bytes, h.payload_len);
    assert_eq!(num_examples, h.num_examples);
    assert_eq!(logged_nonce, hex::encode([5u8; 16]));
    assert_eq!(base_model, h.base_model.to_hex());
    assert_eq!(encoding, h.encoding.name());
    assert!(!feature_stats);
}

#[test]
fn the_coordinator_answer_is_recorded_and_a_wrong_ack_refused() {
    let (global, t) = trained(7);
    let o = offer();
    let u = make_update(&o.privacy, &global, &t.local, never()).unwrap();
    let (_, summary) = encode_payload(&u.delta, o.encoding, 1).unwrap();
    let claims = Claims {
        num_examples: 20,
        metrics: None,
        feature_stats: None,
        nonce: UpdateNonce([6; 16]),
    };
    let envelope = seal_update(
        &session(),
        &o,
        &summary,
        claims,
        &SigningKey::from_bytes(&[4; 32]),
    )
    .envelope;
    let expected = |outcome: &str, accepted, reason: Option<&str>| {
        SiteEvent::UpdateResult(site::UpdateResult {
            job: JobId::new("job").unwrap(),
            round: RoundId(1),
            payload_hash: summary.payload_hash.to_hex(),
            nonce: hex::encode([6u8; 16]),
            outcome: outcome.into(),
            accepted,
            reason: reason.map(str::to_owned),
        })
    };
    for accepted in [true, false] {
        let ack = UploadResult::Ack {
            payload_hash: summary.payload_hash,
            accepted,
        };
        assert_eq!(
            upload_answered(&envelope, &ack).unwrap(),
            expected("ack", accepted, None)
        );
    }
    let reject = UploadResult::Reject {
        code: RejectCode::Malformed,
        message: "bad chunk".into(),
    };
    assert_eq!(
        upload_answered(&envelope, &reject).unwrap(),
        expected("reject", false, Some("Malformed: bad chunk"))
    );
    let other = PayloadHash([0xee; 32]);
    let wrong = UploadResult::Ack {
        payload_hash: other,
        accepted: true,
    };
    let err = upload_answered(&envelope, &wrong).unwrap_err();
    assert_eq!(
        err,
        WrongAck {
            acknowledged: other,
            sent: summary.payload_hash
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "acknowledged payload {other}, sent {}",
            summary.payload_hash
        )
    );
}

#[test]
fn long_coordinator_text_is_truncated_on_a_char_boundary() {
    let s = "é".repeat(600);
    let t = truncate(&s);
    assert!(t.len() <= MAX_LOGGED_TEXT + '…'.len_utf8());
    assert!(t.ends_with('…'));
    assert!(t.trim_end_matches('…').chars().all(|c| c == 'é'));
    assert_eq!(truncate("short"), "short");
}

#[test]
fn a_sealed_update_passes_the_coordinators_verification() {
    use std::collections::HashMap;

    use fedlink_protocol::{ExpectedUpdate, ReplayGuard, max_payload_len, verify_update};

    let (global, t) = trained(8);
    let mut o = offer();
    o.arch = arch();
    o.base_model = global.hash();
    o.privacy = privacy(Some(0.02), None);
    let u = make_update(&o.privacy, &global, &t.local, never()).unwrap();
    let (records, summary) = encode_payload(&u.delta, o.encoding, 3).unwrap();
    let key = SigningKey::from_bytes(&[8; 32]);
    let claims = Claims {
        num_examples: t.report.samples as u64,
        metrics: t.global_eval.as_ref().map(eval_to_protocol),
        feature_stats: None,
        nonce: UpdateNonce([1; 16]),
    };
    let sealed = seal_update(&session(), &o, &summary, claims, &key);

    let keys = HashMap::from([(session().site_id, key.verifying_key())]);
    let expected = ExpectedUpdate {
        federation_id: o.federation_id.clone(),
        job_id: o.job_id.clone(),
        round: o.round,
        base_model: o.base_model,
        encoding: Some(o.encoding),
        max_payload_len: max_payload_len(u.delta.spec(), &o.encoding),
    };
    let mut verifier = verify_update(
        &sealed.envelope,
        &session().site_id,
        &keys,
        &expected,
        &mut ReplayGuard::new(),
    )
    .unwrap();
    for r in &records {
        verifier.update(r).unwrap();
    }
    let verified = verifier.finish().unwrap();
    assert_eq!(verified.header(), &sealed.envelope.header);

    // Another site's key does not verify it.
    let other = HashMap::from([(
        session().site_id,
        SigningKey::from_bytes(&[9; 32]).verifying_key(),
    )]);
    assert!(
        verify_update(
            &sealed.envelope,
            &session().site_id,
            &other,
            &expected,
            &mut ReplayGuard::new(),
        )
        .is_err()
    );
}

#[test]
fn an_evaluation_report_is_signed_and_recorded_as_sent() {
    use std::collections::HashMap;

    use fedlink_protocol::evaluation::ExpectedEval;
    use fedlink_protocol::{EvalRequest, verify_eval_report};

    let (global, t) = trained(9);
    let req = EvalRequest {
        federation_id: FederationId::new("fed").unwrap(),
        job_id: JobId::new("job").unwrap(),
        round: RoundId(4),
        model: global.hash(),
        arch: arch(),
        scaling: None,
    };
    let key = SigningKey::from_bytes(&[2; 32]);
    let keys = HashMap::from([(session().site_id, key.verifying_key())]);
    let expected = ExpectedEval {
        federation_id: req.federation_id.clone(),
        job_id: req.job_id.clone(),
        round: req.round,
        model: req.model,
    };
    let eval = t.global_eval.unwrap();
    let sealed = seal_eval_report(&session(), &req, Some(&eval), &key);
    let m = verify_eval_report(&sealed.report, &session().site_id, &keys, &expected).unwrap();
    assert_eq!(m, &eval_to_protocol(&eval));
    assert_eq!(m.num_eval_examples, 6);
    assert_eq!(
        sealed.reported,
        SiteEvent::EvalReported(site::EvalReported {
            job: JobId::new("job").unwrap(),
            round: RoundId(4),
            model: global.hash().to_hex(),
            num_eval_examples: 6,
            loss: Some(eval.loss),
            accuracy: Some(0.75),
            auc: Some(0.8),
            dice: None,
        })
    );

    // No validation samples: 0 examples, no metrics, still signed.
    let none = seal_eval_report(&session(), &req, None, &key);
    let m = verify_eval_report(&none.report, &session().site_id, &keys, &expected).unwrap();
    assert_eq!(m.num_eval_examples, 0);
    let SiteEvent::EvalReported(site::EvalReported {
        num_eval_examples,
        loss,
        ..
    }) = none.reported
    else {
        panic!("an EvalReported record expected")
    };
    assert_eq!((num_eval_examples, loss), (0, None));
}
