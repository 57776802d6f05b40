//! Signed update envelopes: the happy path and one test per rejection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::SigningKey;
use fedlink_protocol::envelope::MAX_ATTEMPTS_PER_ROUND;
use fedlink_protocol::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Fixture {
    spec: ModelSpec,
    encoding: Encoding,
    records: Vec<Vec<u8>>,
    header: UpdateHeader,
    key: SigningKey,
    other_key: SigningKey,
    keys: BTreeMap<SiteId, ed25519_dalek::VerifyingKey>,
    expected: ExpectedUpdate,
}

fn site() -> SiteId {
    SiteId::new("site-a").unwrap()
}

fn stats() -> FeatureStats {
    FeatureStats {
        features: vec!["age".into(), "bmi".into()],
        count: 120,
        sum: vec![6000.0, 3000.0],
        sum_sq: vec![320_000.0, 80_000.0],
    }
}

fn fixture() -> Fixture {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let key = SigningKey::generate(&mut rng);
    let other_key = SigningKey::generate(&mut rng);
    let spec = ModelSpec::new(vec![
        TensorSpec::f32("a.weight", vec![6, 5]),
        TensorSpec::f32("a.bias", vec![5]),
    ])
    .unwrap();
    let encoding = Encoding::with_codec(ValueCodec::Int8 { stochastic: true })
        .unwrap()
        .with_chunk_bytes(64)
        .unwrap();
    let delta = FlatModel::new(
        spec.clone(),
        (0..35).map(|i| (i as f32 - 17.0) / 100.0).collect(),
    )
    .unwrap();
    let (records, summary) = encode_payload(&delta, encoding, 9).unwrap();
    let base = ModelHash([3; 32]);
    let header = UpdateHeader {
        protocol_version: PROTOCOL_VERSION,
        federation_id: FederationId::new("fed-1").unwrap(),
        site_id: site(),
        job_id: JobId::new("job-1").unwrap(),
        round: RoundId(4),
        base_model: base,
        num_examples: 120,
        encoding,
        payload_len: summary.payload_len,
        payload_hash: summary.payload_hash,
        nonce: UpdateNonce::random(&mut rng),
        metrics: Some(EvalMetrics {
            num_eval_examples: 30,
            loss: Some(0.4),
            accuracy: Some(0.9),
            auc: None,
            dice: None,
            extra: vec![("f1".into(), 0.8)],
        }),
        feature_stats: Some(stats()),
    };
    let keys = BTreeMap::from([
        (site(), key.verifying_key()),
        (SiteId::new("site-b").unwrap(), other_key.verifying_key()),
    ]);
    let expected = ExpectedUpdate {
        federation_id: FederationId::new("fed-1").unwrap(),
        job_id: JobId::new("job-1").unwrap(),
        round: RoundId(4),
        base_model: base,
        encoding: Some(encoding),
        max_payload_len: max_payload_len(&spec, &encoding),
    };
    Fixture {
        spec,
        encoding,
        records,
        header,
        key,
        other_key,
        keys,
        expected,
    }
}

fn verify(
    f: &Fixture,
    env: &SignedEnvelope,
    guard: &mut ReplayGuard,
) -> Result<PayloadVerifier, VerifyError> {
    verify_update(env, &site(), &f.keys, &f.expected, guard)
}

fn stream(mut v: PayloadVerifier, records: &[Vec<u8>]) -> Result<VerifiedUpdate, VerifyError> {
    for r in records {
        v.update(r)?;
    }
    v.finish()
}

#[test]
fn happy_path_then_decode() {
    let f = fixture();
    let env = sign_update(&f.key, f.header.clone());
    // The envelope survives its own codec.
    let env = SignedEnvelope::decode_exact(&env.to_vec()).unwrap();
    let mut guard = ReplayGuard::new();
    let v = verify(&f, &env, &mut guard).unwrap();
    assert_eq!(v.remaining(), f.header.payload_len);
    let verified = stream(v, &f.records).unwrap();
    let model = decode_payload(
        f.spec.clone(),
        f.encoding,
        f.records.iter().map(Vec::as_slice),
    )
    .unwrap();
    assert_eq!(model.values().len(), 35);
    guard.commit(&verified);
    assert!(guard.is_committed(
        &f.expected.federation_id,
        &f.expected.job_id,
        RoundId(4),
        &site()
    ));
    // HashMap directories work too.
    let hm: HashMap<_, _> = f.keys.clone().into_iter().collect();
    let env2 = sign_update(
        &f.key,
        UpdateHeader {
            round: RoundId(5),
            ..f.header.clone()
        },
    );
    let exp5 = ExpectedUpdate {
        round: RoundId(5),
        ..f.expected.clone()
    };
    verify_update(&env2, &site(), &hm, &exp5, &mut guard).unwrap();
}

#[test]
fn rejects_bad_signature() {
    let f = fixture();
    let mut env = sign_update(&f.key, f.header.clone());
    // Tamper with a signed field after signing.
    env.header.num_examples += 1;
    assert_eq!(
        verify(&f, &env, &mut ReplayGuard::new()).unwrap_err(),
        VerifyError::BadSignature
    );
    // Flip a signature bit.
    let env = sign_update(&f.key, f.header.clone());
    let mut sig = env.signature.to_bytes();
    sig[5] ^= 1;
    let env = SignedEnvelope {
        signature: SignatureBytes::from_bytes(&sig),
        ..env
    };
    assert_eq!(
        verify(&f, &env, &mut ReplayGuard::new()).unwrap_err(),
        VerifyError::BadSignature
    );
}

#[test]
fn rejects_key_not_bound_to_identity() {
    // Signed with site-b's (registered) key but claiming site-a over site-a's
    // connection: the key registered for site-a does not verify it.
    let f = fixture();
    let env = sign_update(&f.other_key, f.header.clone());
    assert_eq!(
        verify(&f, &env, &mut ReplayGuard::new()).unwrap_err(),
        VerifyError::BadSignature
    );
}

#[test]
fn rejects_unknown_site() {
    let f = fixture();
    let stranger = SiteId::new("site-z").unwrap();
    let env = sign_update(
        &f.key,
        UpdateHeader {
            site_id: stranger.clone(),
            ..f.header.clone()
        },
    );
    let err = verify_update(
        &env,
        &stranger,
        &f.keys,
        &f.expected,
        &mut ReplayGuard::new(),
    )
    .unwrap_err();
    assert_eq!(err, VerifyError::UnknownSite(stranger));
}

#[test]
fn rejects_identity_mismatch() {
    let f = fixture();
    let env = sign_update(&f.key, f.header.clone());
    let b = SiteId::new("site-b").unwrap();
    let err = verify_update(&env, &b, &f.keys, &f.expected, &mut ReplayGuard::new()).unwrap_err();
    assert!(matches!(err, VerifyError::IdentityMismatch { .. }), "{err}");
}

type IsExpected = fn(&VerifyError) -> bool;

#[test]
fn rejects_context_mismatches() {
    let f = fixture();
    let cases: Vec<(UpdateHeader, IsExpected)> = vec![
        (
            UpdateHeader {
                federation_id: FederationId::new("fed-2").unwrap(),
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::FederationMismatch { .. }),
        ),
        (
            UpdateHeader {
                job_id: JobId::new("job-2").unwrap(),
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::JobMismatch { .. }),
        ),
        (
            UpdateHeader {
                round: RoundId(3),
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::RoundMismatch { .. }),
        ),
        (
            UpdateHeader {
                base_model: ModelHash([4; 32]),
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::BaseModelMismatch { .. }),
        ),
        (
            UpdateHeader {
                encoding: Encoding::with_codec(ValueCodec::F16).unwrap(),
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::EncodingMismatch { .. }),
        ),
        (
            UpdateHeader {
                payload_len: f.expected.max_payload_len + 1,
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::PayloadTooLarge { .. }),
        ),
        (
            UpdateHeader {
                protocol_version: PROTOCOL_VERSION + 1,
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::UnsupportedVersion(_)),
        ),
        (
            UpdateHeader {
                feature_stats: Some(FeatureStats {
                    sum: vec![f64::NAN, 3000.0],
                    ..stats()
                }),
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::BadFeatureStats(_)),
        ),
        (
            UpdateHeader {
                feature_stats: Some(FeatureStats {
                    sum_sq: vec![320_000.0],
                    ..stats()
                }),
                ..f.header.clone()
            },
            |e| matches!(e, VerifyError::BadFeatureStats(_)),
        ),
    ];
    for (h, ok) in cases {
        let mut guard = ReplayGuard::new();
        let err = verify(&f, &sign_update(&f.key, h), &mut guard).unwrap_err();
        assert!(ok(&err), "unexpected error {err:?}");
        // Nothing was recorded for a refused header.
        assert!(guard.is_empty());
    }
}

#[test]
fn rejects_replayed_nonce() {
    let f = fixture();
    let env = sign_update(&f.key, f.header.clone());
    let mut guard = ReplayGuard::new();
    verify(&f, &env, &mut guard).unwrap();
    assert_eq!(
        verify(&f, &env, &mut guard).unwrap_err(),
        VerifyError::NonceReplayed(site())
    );
    // The guard survives persistence (JSON and the protocol codec).
    let json = serde_json::to_string(&guard).unwrap();
    let mut restored: ReplayGuard = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, guard);
    assert_eq!(
        verify(&f, &env, &mut restored).unwrap_err(),
        VerifyError::NonceReplayed(site())
    );
    let mut restored = ReplayGuard::decode_exact(&guard.to_vec()).unwrap();
    assert!(verify(&f, &env, &mut restored).is_err());
}

#[test]
fn rejects_replayed_round() {
    let f = fixture();
    let mut guard = ReplayGuard::new();
    let v = verify(&f, &sign_update(&f.key, f.header.clone()), &mut guard).unwrap();
    guard.commit(&stream(v, &f.records).unwrap());
    // Same round, fresh nonce: refused.
    let again = sign_update(
        &f.key,
        UpdateHeader {
            nonce: UpdateNonce([9; 16]),
            ..f.header.clone()
        },
    );
    assert_eq!(
        verify(&f, &again, &mut guard).unwrap_err(),
        VerifyError::RoundReplayed {
            site: site(),
            round: RoundId(4)
        }
    );
    // Pruning past rounds keeps the current one.
    guard.prune_before(&f.expected.federation_id, &f.expected.job_id, RoundId(4));
    assert!(verify(&f, &again, &mut guard).is_err());
    guard.prune_before(&f.expected.federation_id, &f.expected.job_id, RoundId(5));
    assert!(guard.is_empty());
}

/// A coordinator that keeps only the verified header until it decides
/// commits by the header: the same effect as committing the verified update,
/// and it survives serialisation (the coordinator persists it).
#[test]
fn commit_by_header_refuses_the_round_after_a_restart() {
    let f = fixture();
    let mut guard = ReplayGuard::new();
    let env = sign_update(&f.key, f.header.clone());
    verify(&f, &env, &mut guard).unwrap();
    guard.commit_header(&env.header);
    let json = serde_json::to_string(&guard).unwrap();
    let mut restored: ReplayGuard = serde_json::from_str(&json).unwrap();
    let again = sign_update(
        &f.key,
        UpdateHeader {
            nonce: UpdateNonce([7; 16]),
            ..f.header.clone()
        },
    );
    assert_eq!(
        verify(&f, &again, &mut restored).unwrap_err(),
        VerifyError::RoundReplayed {
            site: site(),
            round: RoundId(4)
        }
    );
    // The round opened again from scratch: a fresh nonce is welcome, the
    // envelope already seen is still a replay.
    restored.reopen_round(&f.expected.federation_id, &f.expected.job_id, RoundId(4));
    assert_eq!(
        verify(&f, &env, &mut restored).unwrap_err(),
        VerifyError::NonceReplayed(site())
    );
    verify(&f, &again, &mut restored).unwrap();
}

#[test]
fn failed_upload_may_retry_with_fresh_nonce_but_not_forever() {
    let f = fixture();
    let mut guard = ReplayGuard::new();
    for i in 0..MAX_ATTEMPTS_PER_ROUND {
        let env = sign_update(
            &f.key,
            UpdateHeader {
                nonce: UpdateNonce([i as u8; 16]),
                ..f.header.clone()
            },
        );
        verify(&f, &env, &mut guard).unwrap();
    }
    let env = sign_update(
        &f.key,
        UpdateHeader {
            nonce: UpdateNonce([0xEE; 16]),
            ..f.header.clone()
        },
    );
    assert_eq!(
        verify(&f, &env, &mut guard).unwrap_err(),
        VerifyError::TooManyAttempts(site())
    );
}

#[test]
fn rejects_payload_length_and_hash_mismatch() {
    let f = fixture();
    let mut guard = ReplayGuard::new();
    let env = sign_update(&f.key, f.header.clone());
    // Short payload.
    let v = verify(&f, &env, &mut guard).unwrap();
    let err = stream(v, &f.records[..f.records.len() - 1]).unwrap_err();
    assert!(
        matches!(err, VerifyError::PayloadLengthMismatch { .. }),
        "{err}"
    );
    // Long payload: refused as soon as it overflows.
    let env = sign_update(
        &f.key,
        UpdateHeader {
            nonce: UpdateNonce([1; 16]),
            ..f.header.clone()
        },
    );
    let mut v = verify(&f, &env, &mut guard).unwrap();
    for r in &f.records {
        v.update(r).unwrap();
    }
    assert!(matches!(
        v.update(&[0]),
        Err(VerifyError::PayloadLengthMismatch { .. })
    ));
    // Same length, one byte changed.
    let env = sign_update(
        &f.key,
        UpdateHeader {
            nonce: UpdateNonce([2; 16]),
            ..f.header.clone()
        },
    );
    let v = verify(&f, &env, &mut guard).unwrap();
    let mut tampered = f.records.clone();
    let last = tampered[0].len() - 1;
    tampered[0][last] ^= 0x40;
    assert_eq!(
        stream(v, &tampered).unwrap_err(),
        VerifyError::PayloadHashMismatch
    );
}

#[test]
fn signed_bytes_are_domain_separated_and_cover_every_field() {
    let f = fixture();
    let base = f.header.signed_bytes();
    assert!(base.starts_with(UPDATE_DOMAIN));
    let variants = [
        UpdateHeader {
            num_examples: 121,
            ..f.header.clone()
        },
        UpdateHeader {
            payload_hash: PayloadHash([0; 32]),
            ..f.header.clone()
        },
        UpdateHeader {
            nonce: UpdateNonce([0; 16]),
            ..f.header.clone()
        },
        UpdateHeader {
            metrics: None,
            ..f.header.clone()
        },
        UpdateHeader {
            feature_stats: None,
            ..f.header.clone()
        },
        UpdateHeader {
            feature_stats: Some(FeatureStats {
                count: 121,
                ..stats()
            }),
            ..f.header.clone()
        },
        UpdateHeader {
            feature_stats: Some(FeatureStats {
                features: vec!["age".into(), "bmj".into()],
                ..stats()
            }),
            ..f.header.clone()
        },
        UpdateHeader {
            feature_stats: Some(FeatureStats {
                sum_sq: vec![320_000.0, 80_000.5],
                ..stats()
            }),
            ..f.header.clone()
        },
        UpdateHeader {
            encoding: f.encoding.shuffled(false),
            ..f.header.clone()
        },
    ];
    for v in variants {
        assert_ne!(v.signed_bytes(), base);
    }
}

/// The coordinator archives envelopes as JSON and `fedlink audit replay`
/// re-checks their signatures from that JSON: floats with long decimal
/// expansions (raw feature sums, losses) must come back bit for bit.
#[test]
fn json_round_trip_keeps_the_signed_bytes() {
    let f = fixture();
    let mut header = f.header.clone();
    let awkward = [
        2_350.335_999_488_830_6,
        0.1 + 0.2,
        1e-300,
        f64::MIN_POSITIVE / 3.0,
        123_456_789.123_456_78,
        -0.0,
    ];
    header.feature_stats = Some(FeatureStats {
        features: (0..awkward.len()).map(|i| format!("x{i}")).collect(),
        count: 184,
        sum: awkward.to_vec(),
        sum_sq: awkward.iter().map(|v| v * v * 7.3).collect(),
    });
    if let Some(m) = header.metrics.as_mut() {
        m.loss = Some(0.022_455_511_125_637_175);
    }
    let env = sign_update(&f.key, header);
    let json = serde_json::to_vec_pretty(&env).unwrap();
    let back: SignedEnvelope = serde_json::from_slice(&json).unwrap();
    assert_eq!(back.header.signed_bytes(), env.header.signed_bytes());
    assert_eq!(back.signature, env.signature);
}

/// serde_json's default float parser can be one ULP off; the workspace
/// enables `float_roundtrip` so archived envelopes keep their signed bytes.
/// Many seeded values with long decimal expansions, like raw feature sums.
#[test]
fn json_floats_round_trip_exactly() {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut bad = 0;
    for _ in 0..200_000 {
        let x: f64 = rng.r#gen::<f64>() * 10f64.powi(rng.gen_range(-6..9));
        let s = serde_json::to_string(&x).unwrap();
        let y: f64 = serde_json::from_str(&s).unwrap();
        if x.to_bits() != y.to_bits() {
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of 200000 f64 values changed through JSON");
}

/// An upload cut after some records resumes with the same envelope: the
/// kept verifier continues, the hash covers the whole payload; anything
/// else is refused.
#[test]
fn a_resumed_upload_continues_the_kept_verifier() {
    let f = fixture();
    assert!(f.records.len() >= 2, "{} records", f.records.len());
    let env = sign_update(&f.key, f.header.clone());
    let mut guard = ReplayGuard::new();
    let mut v = verify(&f, &env, &mut guard).unwrap();
    v.update(&f.records[0]).unwrap();
    let kept = v.clone();
    // The same envelope again, as a new upload: a replay.
    assert!(matches!(
        verify(&f, &env, &mut guard),
        Err(VerifyError::NonceReplayed(_))
    ));
    // As a resume: admitted, continuing after the kept record.
    let resumed =
        verify_resumed_update(&env, &site(), &f.keys, &f.expected, &guard, kept.clone()).unwrap();
    assert_eq!(resumed.received(), f.records[0].len() as u64);
    let verified = stream(resumed, &f.records[1..]).unwrap();
    assert_eq!(verified.header(), &f.header);

    // Another signed header under the same nonce does not continue it.
    let mut other = f.header.clone();
    other.num_examples += 1;
    let forged = sign_update(&f.key, other);
    let err = verify_resumed_update(&forged, &site(), &f.keys, &f.expected, &guard, kept.clone())
        .unwrap_err();
    assert!(matches!(err, VerifyError::NotResumable(_)), "{err}");
    // A nonce the guard never recorded: nothing to resume.
    let mut fresh = f.header.clone();
    fresh.nonce = UpdateNonce([9; 16]);
    let fresh_env = sign_update(&f.key, fresh.clone());
    let mut fresh_v = verify(&f, &fresh_env, &mut ReplayGuard::new()).unwrap();
    fresh_v.update(&f.records[0]).unwrap();
    let err = verify_resumed_update(&fresh_env, &site(), &f.keys, &f.expected, &guard, fresh_v)
        .unwrap_err();
    assert!(
        err.to_string().contains("no upload with this nonce"),
        "{err}"
    );
    // A bad signature is refused before anything else.
    let bad = sign_update(&f.other_key, f.header.clone());
    let err = verify_resumed_update(&bad, &site(), &f.keys, &f.expected, &guard, kept.clone())
        .unwrap_err();
    assert_eq!(err, VerifyError::BadSignature);
    // Once the site's update of the round is committed, no resume.
    guard.commit_header(&f.header);
    let err = verify_resumed_update(&env, &site(), &f.keys, &f.expected, &guard, kept).unwrap_err();
    assert!(matches!(err, VerifyError::RoundReplayed { .. }), "{err}");
}
