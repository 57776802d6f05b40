//! Throughput of the update pipeline per encoding, on a 25M-parameter
//! (100 MB) gaussian delta: encode + compress + sign (site) and
//! verify + decompress + decode (coordinator). Sizes and errors:
//! `cargo bench -p fedlink-protocol --bench wire_report`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
