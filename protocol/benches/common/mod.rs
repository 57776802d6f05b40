//! Shared fixture of the payload benchmarks: a 25M-parameter gaussian delta,
//! the encodings compared, and the full site / coordinator pipelines.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use fedlink_protocol::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// 25M parameters = 100 MB of f32.
pub const PARAMS: u64 = 25_000_000;
/// Standard deviation of the synthetic delta.
pub const STD: f32 = 1e-3;

/// The encodings compared (zstd level 1, 2 MiB chunks).
pub fn encodings() -> Vec<Encoding> {
    let e = |c, s| Encoding::with_codec(c).unwrap().shuffled(s);
    vec![
        e(ValueCodec::F32, false),
        e(ValueCodec::F32, true),
        e(ValueCodec::F16, false),
        e(ValueCodec::F16, true),
        e(ValueCodec::Bf16, true),
        e(ValueCodec::Int8 { stochastic: false }, false),
        e(ValueCodec::Int8 { stochastic: true }, false),
        e(
            ValueCodec::TopK {
                per_million: 10_000,
            },
            true,
        ),
        e(
            ValueCodec::TopK {
                per_million: 100_000,
            },
            true,
        ),
    ]
}

/// A delta shaped like a small vision model: a few big tensors and biases.
pub fn delta() -> FlatModel {
    let spec = ModelSpec::new(vec![
        TensorSpec::f32("conv.weight", vec![64, 64, 3, 3]),
        TensorSpec::f32("conv.bias", vec![64]),
        TensorSpec::f32("fc1.weight", vec![4096, 4096]),
        TensorSpec::f32("fc1.bias", vec![4096]),
        TensorSpec::f32(
            "fc2.weight",
            vec![PARAMS - 64 * 64 * 9 - 64 - 4096 * 4096 - 4096],
        ),
    ])
    .unwrap();
    assert_eq!(spec.num_params(), PARAMS);
    FlatModel::new(spec, gaussian(2024, STD, PARAMS as usize)).unwrap()
}

/// `n` values drawn from N(0, `std`²), ChaCha8 seeded with `seed`.
pub fn gaussian(seed: u64, std: f32, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| normal.sample(&mut rng)).collect()
}

/// Everything the coordinator knows.
pub struct Ctx {
    pub key: SigningKey,
    pub site: SiteId,
    pub keys: BTreeMap<SiteId, ed25519_dalek::VerifyingKey>,
    pub base: ModelHash,
}

pub fn ctx() -> Ctx {
    let key = SigningKey::from_bytes(&[42; 32]);
    let site = SiteId::new("site-a").unwrap();
    let keys = BTreeMap::from([(site.clone(), key.verifying_key())]);
    Ctx {
        key,
        site,
        keys,
        base: ModelHash([1; 32]),
    }
}

/// Site side: encode + compress every chunk, then sign the header.
pub fn encode_and_sign(
    ctx: &Ctx,
    delta: &FlatModel,
    enc: Encoding,
    nonce: u8,
) -> (SignedEnvelope, Vec<Vec<u8>>) {
    let mut e = PayloadEncoder::new(delta.spec().clone(), enc, 7).unwrap();
    let mut records = Vec::new();
    while let Some(r) = e.next_chunk() {
        records.push(
            e.encode_chunk(&delta.values()[r.start as usize..r.end as usize])
                .unwrap(),
        );
    }
    let s = e.finish().unwrap();
    let header = UpdateHeader {
        protocol_version: PROTOCOL_VERSION,
        federation_id: FederationId::new("fed").unwrap(),
        site_id: ctx.site.clone(),
        job_id: JobId::new("job").unwrap(),
        round: RoundId(1),
        base_model: ctx.base,
        num_examples: 1000,
        encoding: enc,
        payload_len: s.payload_len,
        payload_hash: s.payload_hash,
        nonce: UpdateNonce([nonce; 16]),
        metrics: None,
        feature_stats: None,
    };
    (sign_update(&ctx.key, header), records)
}

/// Coordinator side: verify the header, stream hash + decompress + decode
/// every chunk into `out`.
pub fn verify_and_decode(
    ctx: &Ctx,
    spec: &ModelSpec,
    env: &SignedEnvelope,
    records: &[Vec<u8>],
    out: &mut [f32],
) {
    let enc = env.header.encoding;
    let expected = ExpectedUpdate {
        federation_id: FederationId::new("fed").unwrap(),
        job_id: JobId::new("job").unwrap(),
        round: RoundId(1),
        base_model: ctx.base,
        encoding: Some(enc),
        max_payload_len: max_payload_len(spec, &enc),
    };
    let mut guard = ReplayGuard::new();
    let mut v = verify_update(env, &ctx.site, &ctx.keys, &expected, &mut guard).unwrap();
    let mut d = PayloadDecoder::new(spec.clone(), enc).unwrap();
    for r in records {
        v.update(r).unwrap();
        let c = d.decode_chunk(r).unwrap();
        out[c.offset as usize..c.offset as usize + c.values.len()].copy_from_slice(&c.values);
    }
    v.finish().unwrap();
    d.finish().unwrap();
}
