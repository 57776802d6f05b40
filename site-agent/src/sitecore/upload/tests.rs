use std::time::Duration;

use ed25519_dalek::Signature;
use fedlink_protocol::{FederationId, FlatModel, SiteId, UploadProgress, encode_payload};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::audit::site;
use crate::policy::tests::offer;
use crate::sitecore::Session;
use crate::sitecore::task::{Claims, seal_update};

const CODES: [RejectCode; 14] = RejectCode::ALL;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[4; 32])
}

/// A signed envelope of a real (all-zero) payload of the test offer, and
/// `n` records of seeded lengths kept with it.
fn kept(n: usize, seed: u64) -> KeptUpload {
    let o = offer();
    let spec = o.arch.spec().unwrap();
    let (_, summary) = encode_payload(&FlatModel::zeros(spec), o.encoding, 1).unwrap();
    let session = Session {
        site_id: SiteId::new("site-a").unwrap(),
        federation_id: FederationId::new("fed").unwrap(),
        protocol_version: 6,
        heartbeat_interval: Duration::from_secs(1),
    };
    let claims = Claims {
        num_examples: 20,
        metrics: None,
        feature_stats: None,
        nonce: UpdateNonce([6; 16]),
    };
    let envelope = seal_update(&session, &o, &summary, claims, &key()).envelope;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let records = (0..n)
        .map(|_| Bytes::from(vec![0u8; rng.gen_range(1..64)]))
        .collect();
    KeptUpload { envelope, records }
}

fn result_event(k: &KeptUpload, result: &UploadResult) -> SiteEvent {
    task::upload_answered(&k.envelope, result).unwrap()
}

#[test]
fn the_opening_and_the_resume_request_carry_the_envelope_unchanged() {
    let k = kept(3, 1);
    let Message::DeltaUpload(d) = opening(&k.envelope) else {
        panic!("DeltaUpload expected")
    };
    assert_eq!(d.envelope, k.envelope);
    let Message::ResumeUpload(r) = resume_request(&k.envelope) else {
        panic!("ResumeUpload expected")
    };
    assert_eq!(r.envelope, k.envelope);
}

#[test]
fn an_accepted_or_declined_ack_is_recorded() {
    let k = kept(2, 2);
    for accepted in [true, false] {
        let result = UploadResult::Ack {
            payload_hash: k.envelope.header.payload_hash,
            accepted,
        };
        let event = on_upload_answer(&k.envelope, &Message::UploadResult(result.clone())).unwrap();
        assert_eq!(event, result_event(&k, &result));
        let SiteEvent::UpdateResult(site::UpdateResult { accepted: a, .. }) = event else {
            panic!("update.result expected")
        };
        assert_eq!(a, accepted);
    }
}

#[test]
fn an_ack_of_another_payload_is_a_wrong_ack() {
    let k = kept(2, 3);
    let other = kept(0, 0);
    let mut wrong = other.envelope.header.payload_hash;
    wrong.0[0] ^= 1;
    let answer = Message::UploadResult(UploadResult::Ack {
        payload_hash: wrong,
        accepted: true,
    });
    assert!(matches!(
        on_upload_answer(&k.envelope, &answer),
        Err(UploadError::WrongAck(_))
    ));
    assert!(matches!(
        on_resume_answer(&k, &answer),
        Err(UploadError::WrongAck(_))
    ));
}

#[test]
fn every_rejection_code_of_an_upload_is_recorded_and_ends_it() {
    let k = kept(2, 4);
    for code in CODES {
        let result = UploadResult::Reject {
            code,
            message: "no".into(),
        };
        let event = on_upload_answer(&k.envelope, &Message::UploadResult(result.clone())).unwrap();
        assert_eq!(event, result_event(&k, &result));
    }
}

#[test]
fn only_a_replay_refusal_of_a_resume_signs_again() {
    let k = kept(2, 5);
    for code in CODES {
        let result = UploadResult::Reject {
            code,
            message: "no".into(),
        };
        let step = on_resume_answer(&k, &Message::UploadResult(result.clone())).unwrap();
        let expected = result_event(&k, &result);
        match step {
            ResumeStep::SignAgain { refused } => {
                assert_eq!(code, RejectCode::Replay);
                assert_eq!(refused, expected);
            }
            ResumeStep::Answered { answered } => {
                assert_ne!(code, RejectCode::Replay);
                assert_eq!(answered, expected);
            }
            ResumeStep::SendRest { .. } => panic!("{code:?} resumed"),
        }
    }
}

#[test]
fn a_resume_sends_exactly_the_records_the_coordinator_lacks() {
    for seed in 0..200 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = rng.gen_range(0..40);
        let k = kept(n, seed);
        let held = rng.gen_range(0..=n);
        let bytes: u64 = k.records[..held].iter().map(|r| r.len() as u64).sum();
        let progress = UploadProgress {
            records: held as u64,
            bytes,
        };
        let Ok(ResumeStep::SendRest { resumed, rest }) =
            on_resume_answer(&k, &Message::UploadProgress(progress))
        else {
            panic!("seed {seed}: a resume expected")
        };
        assert_eq!(rest, &k.records[held..], "seed {seed}");
        let SiteEvent::UpdateResumed(site::UpdateResumed {
            from_record,
            bytes_held,
            bytes_sent,
            nonce,
            ..
        }) = resumed
        else {
            panic!("update.resumed expected")
        };
        assert_eq!((from_record, bytes_held), (held as u64, bytes));
        assert_eq!(
            bytes_sent,
            k.records[held..]
                .iter()
                .map(|r| r.len() as u64)
                .sum::<u64>()
        );
        assert_eq!(nonce, hex::encode(k.envelope.header.nonce.0));
    }
}

#[test]
fn a_resume_point_that_does_not_fit_is_named() {
    for seed in 0..100 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = rng.gen_range(1..30);
        let k = kept(n, seed);
        let beyond = UploadProgress {
            records: rng.gen_range(n as u64 + 1..u64::MAX),
            bytes: 0,
        };
        assert_eq!(
            on_resume_answer(&k, &Message::UploadProgress(beyond)).unwrap_err(),
            UploadError::ResumePoint(ProgressMismatch::Records {
                claimed: beyond.records,
                kept: n,
            })
        );
        let held = rng.gen_range(0..=n);
        let bytes: u64 = k.records[..held].iter().map(|r| r.len() as u64).sum();
        let off = UploadProgress {
            records: held as u64,
            bytes: bytes + rng.gen_range(1..10),
        };
        assert!(matches!(
            on_resume_answer(&k, &Message::UploadProgress(off)),
            Err(UploadError::ResumePoint(ProgressMismatch::Bytes { .. }))
        ));
    }
}

#[test]
fn other_messages_are_unexpected_answers() {
    let k = kept(2, 6);
    let stray = Message::UploadProgress(UploadProgress {
        records: 0,
        bytes: 0,
    });
    // A late resume point after the whole upload was sent.
    assert_eq!(
        on_upload_answer(&k.envelope, &stray).unwrap_err(),
        UploadError::Unexpected {
            sent: stray.name(),
            request: UPLOAD_REQUEST,
        }
    );
    let again = resume_request(&k.envelope);
    assert_eq!(
        on_resume_answer(&k, &again).unwrap_err(),
        UploadError::Unexpected {
            sent: again.name(),
            request: RESUME_REQUEST,
        }
    );
}

#[test]
fn signing_again_changes_the_nonce_only_and_verifies() {
    let k = kept(5, 7);
    let (again, sent) = sign_again(&k, &key(), UpdateNonce([9; 16]));
    assert_eq!(again.records, k.records);
    assert_eq!(again.envelope.header.nonce, UpdateNonce([9; 16]));
    let mut header = again.envelope.header.clone();
    header.nonce = k.envelope.header.nonce;
    assert_eq!(header, k.envelope.header);
    assert_ne!(again.envelope.signature, k.envelope.signature);
    assert_eq!(sent, task::update_sent(&again.envelope));
    let sig = Signature::from_bytes(&again.envelope.signature.to_bytes());
    assert!(
        key()
            .verifying_key()
            .verify_strict(&again.envelope.header.signed_bytes(), &sig)
            .is_ok()
    );
}
