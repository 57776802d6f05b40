#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! FedAvg fold throughput (GB/s of f32 delta) for a 25M-parameter model, on
//! 1 thread and on all cores, next to plain `acc[i] += w * x[i]` baselines
//! (f32 and f64 accumulators) measured in the same run.
//!
//! cargo bench -p fedlink-aggregation --bench fedavg

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedlink_aggregation::{FedAvgAccumulator, FedAvgOptions};
use fedlink_protocol::{ModelSpec, TensorSpec};
use rayon::prelude::*;

const N: usize = 25_000_000;
const CHUNK: usize = 1 << 18;

fn data() -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..N)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let spec = Arc::new(ModelSpec::new(vec![TensorSpec::f32("w", vec![N as u64])]).unwrap());
    let x = data();
    let w = 37.0f32;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("fedavg_fold_25M");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(4));
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.throughput(Throughput::Bytes((N * 4) as u64));
    for threads in [1, cores] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut acc = FedAvgAccumulator::new(spec.clone(), FedAvgOptions::default());
        let mut v = acc.validator("bench", 37);
        v.feed(0, &x).unwrap();
        let token = v.finish().unwrap();
        g.bench_function(format!("exact_fixed_point/{threads}t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    let mut f = acc.begin(&token).unwrap();
                    f.chunk(0, &x);
                    f.finish();
                })
            })
        });
        g.bench_function(format!("validate_pass/{threads}t"), |b| {
            b.iter(|| {
                let mut v = acc.validator("bench", 37);
                for (i, c) in x.chunks(CHUNK).enumerate() {
                    v.feed((i * CHUNK) as u64, c).unwrap();
                }
                v.finish().unwrap()
            })
        });
        let mut acc32 = vec![0f32; N];
        g.bench_function(format!("baseline_f32_acc/{threads}t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    acc32
                        .par_chunks_mut(CHUNK)
                        .zip(x.par_chunks(CHUNK))
                        .for_each(|(a, x)| {
                            for (a, x) in a.iter_mut().zip(x) {
                                *a += w * x;
                            }
                        })
                })
            })
        });
        let mut acc64 = vec![0f64; N];
        let w64 = f64::from(w);
        g.bench_function(format!("baseline_f64_acc/{threads}t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    acc64
                        .par_chunks_mut(CHUNK)
                        .zip(x.par_chunks(CHUNK))
                        .for_each(|(a, x)| {
                            for (a, x) in a.iter_mut().zip(x) {
                                *a += w64 * f64::from(*x);
                            }
                        })
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
