#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Robust aggregators: K = 10 and 50 sites × 1M parameters.
//!
//! cargo bench -p fedlink-aggregation --bench robust

use criterion::{Criterion, criterion_group, criterion_main};
use fedlink_aggregation::robust::{self, RobustRule};

const N: usize = 1_000_000;

fn updates(k: usize) -> Vec<Vec<f32>> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..k)
        .map(|_| {
            (0..N)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("robust_1M");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(3));
    for k in [10usize, 50] {
        let u = updates(k);
        let w = vec![1u64; k];
        let f = (k - 3) / 4;
        let rules = [
            ("median", RobustRule::Median),
            ("trimmed_mean_b0.2", RobustRule::TrimmedMean { beta: 0.2 }),
            (
                "krum",
                RobustRule::Krum {
                    num_malicious: f,
                    to_keep: 0,
                },
            ),
            ("bulyan", RobustRule::Bulyan { num_malicious: f }),
        ];
        for (name, rule) in rules {
            g.bench_function(format!("{name}/K{k}"), |b| {
                b.iter(|| robust::aggregate(&rule, &u, &w).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
