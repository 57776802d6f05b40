//! The evaluation request's decisions with the deterministic trainer of the
//! task tests (no burn), and the report checked with the coordinator's own
//! verification (`verify_eval_report`).

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::evaluation::ExpectedEval;
use fedlink_protocol::{EvalRequest, FederationId, JobId, RoundId, verify_eval_report};

use super::*;
use crate::audit::{SiteEvent, site};
use crate::sitecore::task::eval_to_protocol;
use crate::sitecore::task::tests::{StepTrainer, arch, local_data, session};

fn request(model: &FlatModel) -> EvalRequest {
    EvalRequest {
        federation_id: FederationId::new("fed").unwrap(),
        job_id: JobId::new("job").unwrap(),
        round: RoundId(5),
        model: model.hash(),
        arch: arch(),
        scaling: None,
    }
}

fn expected(req: &EvalRequest) -> ExpectedEval {
    ExpectedEval {
        federation_id: req.federation_id.clone(),
        job_id: req.job_id.clone(),
        round: req.round,
        model: req.model,
    }
}

/// check → evaluate → answer: the report verifies with the coordinator's
/// function and carries the trainer's metrics; the record describes the
/// report that is sent.
#[test]
fn a_request_is_evaluated_on_the_validation_split_and_answered_signed() {
    let model = arch().init(3).unwrap();
    let req = request(&model);
    let spec = check_request(&session(), &req).unwrap();
    assert_eq!(&spec, model.spec());
    let trainer = StepTrainer::new(0.05);
    let metrics = evaluate(
        || Ok::<_, EvalError>(&trainer),
        &req,
        &model,
        &local_data(20, 7),
    )
    .unwrap()
    .unwrap();
    assert_eq!(trainer.evaluations.get(), 1);
    assert_eq!(metrics.n, 7, "the validation split, not the training data");
    let key = SigningKey::from_bytes(&[8; 32]);
    let sealed = answer(&session(), &req, Some(&metrics), &key);
    let keys = HashMap::from([(session().site_id, key.verifying_key())]);
    let m = verify_eval_report(&sealed.report, &session().site_id, &keys, &expected(&req)).unwrap();
    assert_eq!(m, &eval_to_protocol(&metrics));
    assert_eq!(
        sealed.reported,
        SiteEvent::EvalReported(site::EvalReported {
            job: req.job_id.clone(),
            round: req.round,
            model: req.model.to_hex(),
            num_eval_examples: 7,
            loss: m.loss,
            accuracy: m.accuracy,
            auc: m.auc,
            dice: m.dice,
        })
    );
    // Another site's key does not verify it: the signature is real.
    let other = HashMap::from([(
        session().site_id,
        SigningKey::from_bytes(&[9; 32]).verifying_key(),
    )]);
    assert!(
        verify_eval_report(&sealed.report, &session().site_id, &other, &expected(&req)).is_err()
    );
}

#[test]
fn a_site_without_validation_samples_reports_zero_examples_without_evaluating() {
    let model = arch().init(4).unwrap();
    let req = request(&model);
    let trainer = StepTrainer::new(0.05);
    let metrics = evaluate(
        || Ok::<_, EvalError>(&trainer),
        &req,
        &model,
        &local_data(20, 0),
    )
    .unwrap();
    assert!(metrics.is_none());
    assert_eq!(trainer.evaluations.get(), 0);
    let key = SigningKey::from_bytes(&[8; 32]);
    let sealed = answer(&session(), &req, metrics.as_ref(), &key);
    let keys = HashMap::from([(session().site_id, key.verifying_key())]);
    let m = verify_eval_report(&sealed.report, &session().site_id, &keys, &expected(&req)).unwrap();
    assert_eq!(m.num_eval_examples, 0);
    assert!(matches!(
        sealed.reported,
        SiteEvent::EvalReported(site::EvalReported {
            num_eval_examples: 0,
            loss: None,
            ..
        })
    ));
}

#[test]
fn a_request_of_another_federation_or_an_unbuildable_arch_is_refused() {
    let model = arch().init(5).unwrap();
    let mut req = request(&model);
    req.federation_id = FederationId::new("elsewhere").unwrap();
    let err = check_request(&session(), &req).unwrap_err();
    assert!(
        matches!(&err, EvalError::OtherFederation { asked, ours }
            if asked.as_str() == "elsewhere" && ours.as_str() == "fed"),
        "{err}"
    );
    let mut req = request(&model);
    req.arch = ArchSpec::Mlp {
        inputs: 0,
        hidden: vec![32],
        classes: 2,
    };
    assert!(matches!(
        check_request(&session(), &req),
        Err(EvalError::Architecture(_))
    ));
}

/// The model evaluated is the one the request names, by hash: another
/// model (a stale cache entry, a driver bug) is refused before the trainer
/// sees it.
#[test]
fn a_model_other_than_the_requested_one_is_not_evaluated() {
    let asked = arch().init(6).unwrap();
    let other = arch().init(7).unwrap();
    let req = request(&asked);
    let trainer = StepTrainer::new(0.05);
    let err = evaluate(
        || Ok::<_, EvalError>(&trainer),
        &req,
        &other,
        &local_data(20, 7),
    )
    .unwrap_err();
    assert!(
        matches!(&err, EvalError::WrongModel { asked: a, got }
            if *a == asked.hash() && *got == other.hash()),
        "{err}"
    );
    assert_eq!(trainer.evaluations.get(), 0);
}
