//! Random and mutated bytes into every decoder: errors, never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use fedlink_protocol::*;
use proptest::prelude::*;

fn spec() -> ModelSpec {
    ModelSpec::new(vec![
        TensorSpec::f32("a", vec![7]),
        TensorSpec::f32("b", vec![3, 5]),
    ])
    .unwrap()
}

fn encodings() -> Vec<Encoding> {
    let mk = |c| Encoding::new(c, true, 1, 32).unwrap();
    vec![
        mk(ValueCodec::F32),
        mk(ValueCodec::F16),
        mk(ValueCodec::Bf16),
        mk(ValueCodec::Int8 { stochastic: true }),
        mk(ValueCodec::TopK {
            per_million: 250_000,
        }),
        Encoding::new(ValueCodec::F32, false, 1, 32).unwrap(),
    ]
}

/// Valid first chunk records, one per encoding (mutation seeds).
fn valid_records() -> &'static Vec<(Encoding, Vec<u8>)> {
    static R: OnceLock<Vec<(Encoding, Vec<u8>)>> = OnceLock::new();
    R.get_or_init(|| {
        let model =
            FlatModel::new(spec(), (0..22).map(|i| i as f32 / 7.0 - 1.0).collect()).unwrap();
        encodings()
            .into_iter()
            .map(|e| (e, encode_payload(&model, e, 1).unwrap().0.remove(0)))
            .collect()
    })
}

fn valid_envelope() -> Vec<u8> {
    let h = UpdateHeader {
        protocol_version: PROTOCOL_VERSION,
        federation_id: FederationId::new("f").unwrap(),
        site_id: SiteId::new("s").unwrap(),
        job_id: JobId::new("j").unwrap(),
        round: RoundId(1),
        base_model: ModelHash([0; 32]),
        num_examples: 1,
        encoding: Encoding::default(),
        payload_len: 10,
        payload_hash: PayloadHash([0; 32]),
        nonce: UpdateNonce([0; 16]),
        metrics: Some(EvalMetrics::default()),
        feature_stats: Some(FeatureStats {
            features: vec!["a".into()],
            count: 2,
            sum: vec![1.0],
            sum_sq: vec![1.0],
        }),
    };
    sign_update(&ed25519_dalek::SigningKey::from_bytes(&[1; 32]), h).to_vec()
}

fn mutate(base: &[u8], flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(i, x) in flips {
        if !v.is_empty() {
            let n = v.len();
            v[i % n] ^= x;
        }
    }
    if let Some(c) = cut {
        v.truncate(c % (base.len() + 1));
    }
    v
}

fn feed_envelope(bytes: &[u8]) {
    if let Ok(env) = SignedEnvelope::decode_exact(bytes) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let keys = BTreeMap::from([(env.header.site_id.clone(), key)]);
        let expected = ExpectedUpdate {
            federation_id: env.header.federation_id.clone(),
            job_id: env.header.job_id.clone(),
            round: env.header.round,
            base_model: env.header.base_model,
            encoding: None,
            max_payload_len: u64::MAX,
        };
        let site = env.header.site_id.clone();
        let _ = verify_update(&env, &site, &keys, &expected, &mut ReplayGuard::new());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frame_decoder_survives_garbage(data in prop::collection::vec(any::<u8>(), 0..512), split in 0usize..512) {
        let mut dec = FrameDecoder::new();
        let (a, b) = data.split_at(split.min(data.len()));
        dec.push(a);
        while let Ok(Some(f)) = dec.pop() { let _ = f.into_message(); }
        dec.push(b);
        while let Ok(Some(f)) = dec.pop() { let _ = f.into_message(); }
        let _ = dec.finish();
        // valid magic/version prefix with a random rest reaches deeper
        let mut w = vec![b'F', b'L', 1];
        w.extend_from_slice(&data);
        let mut dec = FrameDecoder::new();
        dec.push(&w);
        while let Ok(Some(f)) = dec.pop() { let _ = f.into_message(); }
    }

    #[test]
    fn message_decode_survives_garbage(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::decode_exact(&data);
        let mut buf = &data[..];
        let _ = Message::decode(&mut buf);
        let _ = FrameHeader::decode_exact(&data);
    }

    #[test]
    fn chunk_decoder_survives_garbage(
        data in prop::collection::vec(any::<u8>(), 0..256),
        which in 0usize..6,
        flips in prop::collection::vec((any::<usize>(), 1u8..), 0..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let (enc, rec) = &valid_records()[which];
        let mut d = PayloadDecoder::new(spec(), *enc).unwrap();
        let _ = d.decode_chunk(&data);
        let mut d = PayloadDecoder::new(spec(), *enc).unwrap();
        let _ = d.decode_chunk(&mutate(rec, &flips, cut));
        // random body behind a plausible header
        let mut d = PayloadDecoder::new(spec(), *enc).unwrap();
        let mut r = rec[..24].to_vec();
        r.extend_from_slice(&data);
        let _ = d.decode_chunk(&r);
    }

    #[test]
    fn envelope_decode_and_verify_survive_garbage(
        data in prop::collection::vec(any::<u8>(), 0..512),
        flips in prop::collection::vec((any::<usize>(), 1u8..), 1..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        feed_envelope(&data);
        feed_envelope(&mutate(&valid_envelope(), &flips, cut));
        let _ = ReplayGuard::decode_exact(&data);
    }
}

#[test]
fn mutated_envelopes_never_verify() {
    // Any single-byte change of a signed envelope either fails to decode or
    // fails verification.
    let base = valid_envelope();
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
    for i in 0..base.len() {
        let mut m = base.clone();
        m[i] ^= 0x01;
        let Ok(env) = SignedEnvelope::decode_exact(&m) else {
            continue;
        };
        let keys = BTreeMap::from([(env.header.site_id.clone(), key)]);
        let expected = ExpectedUpdate {
            federation_id: env.header.federation_id.clone(),
            job_id: env.header.job_id.clone(),
            round: env.header.round,
            base_model: env.header.base_model,
            encoding: None,
            max_payload_len: u64::MAX,
        };
        let site = env.header.site_id.clone();
        assert!(
            verify_update(&env, &site, &keys, &expected, &mut ReplayGuard::new()).is_err(),
            "byte {i} changed and still verified"
        );
    }
}
