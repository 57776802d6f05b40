//! Throughput of the update pipeline per encoding, on a 25M-parameter
//! (100 MB) gaussian delta: encode + compress + sign (site) and
//! verify + decompress + decode (coordinator). Sizes and errors:
//! `cargo bench -p fedlink-protocol --bench wire_report`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedlink_protocol::PayloadDecoder;

fn bench(c: &mut Criterion) {
    let delta = common::delta();
    let ctx = common::ctx();
    let mut out = vec![0f32; delta.values().len()];
    let mut g = c.benchmark_group("update");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(common::PARAMS * 4));
    for enc in common::encodings() {
        let name = enc.name();
        g.bench_function(format!("encode+sign/{name}"), |b| {
            b.iter(|| common::encode_and_sign(&ctx, &delta, enc, 0))
        });
        let (env, records) = common::encode_and_sign(&ctx, &delta, enc, 0);
        g.bench_function(format!("verify+decode/{name}"), |b| {
            b.iter(|| common::verify_and_decode(&ctx, delta.spec(), &env, &records, &mut out))
        });
    }
    g.finish();

    // The coordinator's spool pass over an update (validation, then the
    // fold): decode every chunk record. "values-hash+fresh" is how it ran
    // before: a ModelHash of the decoded values that nobody used and fresh
    // buffers per chunk; "no-hash+reuse" is `without_model_hash` and
    // `decode_chunk_into` with one buffer, as it runs now.
    let mut g = c.benchmark_group("spool_pass");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(common::PARAMS * 4));
    for enc in common::encodings()
        .into_iter()
        .filter(|e| matches!(e.name().as_str(), "f32+shuffle/zstd1" | "f16+shuffle/zstd1"))
    {
        let name = enc.name();
        let (env, records) = common::encode_and_sign(&ctx, &delta, enc, 0);
        let encoding = env.header.encoding;
        g.bench_function(format!("values-hash+fresh/{name}"), |b| {
            b.iter(|| {
                let mut d = PayloadDecoder::new(delta.spec().clone(), encoding).unwrap();
                let mut sum = 0f32;
                for r in &records {
                    let c = d.decode_chunk(r).unwrap();
                    sum += c.values.first().copied().unwrap_or(0.0);
                }
                d.finish().unwrap();
                sum
            })
        });
        g.bench_function(format!("no-hash+reuse/{name}"), |b| {
            let mut values = Vec::new();
            b.iter(|| {
                let mut d = PayloadDecoder::new(delta.spec().clone(), encoding)
                    .unwrap()
                    .without_model_hash();
                let mut sum = 0f32;
                for r in &records {
                    d.decode_chunk_into(r, &mut values).unwrap();
                    sum += values.first().copied().unwrap_or(0.0);
                }
                d.finish().unwrap();
                sum
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
