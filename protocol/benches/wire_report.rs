//! Wire size, reconstruction error and single-thread throughput per
//! encoding on a 25M-parameter (100 MB) gaussian delta (seed 2024,
//! std 1e-3). Prints a Markdown table (the one in docs/PERFORMANCE.md):
//! `cargo bench -p fedlink-protocol --bench wire_report`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let delta = common::delta();
    let ctx = common::ctx();
    let raw = (common::PARAMS * 4) as f64;
    let mean = delta.values().iter().map(|&v| f64::from(v)).sum::<f64>() / common::PARAMS as f64;
    let std = (delta
        .values()
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / common::PARAMS as f64)
        .sqrt();
    let mut out = vec![0f32; delta.values().len()];
    println!(
        "| encoding | wire MB | ratio vs f32 | RMSE / std | max abs err / std | encode+sign MB/s | verify+decode MB/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for enc in common::encodings() {
        let mut t_enc = f64::INFINITY;
        let mut t_dec = f64::INFINITY;
        let mut wire = 0u64;
        for _ in 0..3 {
            let t = Instant::now();
            let (env, records) = common::encode_and_sign(&ctx, &delta, enc, 0);
            t_enc = t_enc.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            common::verify_and_decode(&ctx, delta.spec(), &env, &records, &mut out);
            t_dec = t_dec.min(t.elapsed().as_secs_f64());
            wire = env.header.payload_len;
        }
        let (mut se, mut max) = (0f64, 0f64);
        for (x, y) in delta.values().iter().zip(&out) {
            let e = f64::from(x - y).abs();
            se += e * e;
            max = max.max(e);
        }
        let rmse = (se / common::PARAMS as f64).sqrt();
        println!(
            "| {} | {:.1} | {:.2}x | {:.2e} | {:.2e} | {:.0} | {:.0} |",
            enc.name(),
            wire as f64 / 1e6,
            raw / wire as f64,
            rmse / std,
            max / std,
            raw / 1e6 / t_enc,
            raw / 1e6 / t_dec,
        );
    }
}
