#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Peak memory of streaming FedAvg: K updates × P parameters, each update
//! generated chunk by chunk from a seed (validated, then regenerated and
//! folded), so the only large allocation is the accumulator.
//!
//! cargo bench -p fedlink-aggregation --bench fedavg_memory --no-run
//! /usr/bin/time -v target/release/deps/fedavg_memory-* [K] [P]
//! (defaults: K = 100, P = 10_000_000)

use std::sync::Arc;

use fedlink_aggregation::{FedAvgAccumulator, FedAvgOptions};
use fedlink_protocol::{ModelSpec, TensorSpec};

const CHUNK: usize = 1 << 16;

fn gen_chunk(seed: u64, offset: usize, out: &mut [f32]) {
    for (i, v) in out.iter_mut().enumerate() {
        let mut s = seed ^ ((offset + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        s ^= s >> 31;
        s = s.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        s ^= s >> 29;
        *v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2;
    }
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; ignore flags.
    let nums: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let k = nums.first().copied().unwrap_or(100);
    let p = nums.get(1).copied().unwrap_or(10_000_000);
    let spec = Arc::new(ModelSpec::new(vec![TensorSpec::f32("w", vec![p as u64])]).unwrap());
    let mut acc = FedAvgAccumulator::new(spec, FedAvgOptions::default());
    let mut buf = vec![0f32; CHUNK];
    let start = std::time::Instant::now();
    for site in 0..k {
        let seed = site as u64 + 1;
        let mut v = acc.validator(format!("site{site}"), 10 + site as u64);
        let mut off = 0;
        while off < p {
            let n = CHUNK.min(p - off);
            gen_chunk(seed, off, &mut buf[..n]);
            v.feed(off as u64, &buf[..n]).unwrap();
            off += n;
        }
        let token = v.finish().unwrap();
        let mut f = acc.begin(&token).unwrap();
        let mut off = 0;
        while off < p {
            let n = CHUNK.min(p - off);
            gen_chunk(seed, off, &mut buf[..n]);
            f.chunk(off as u64, &buf[..n]);
            off += n;
        }
        f.finish();
    }
    let out = acc.finish().unwrap();
    let model_mib = (p * 4) as f64 / (1 << 20) as f64;
    let hwm = vm_hwm_kib().unwrap_or(0) as f64 / 1024.0;
    println!(
        "K={k} P={p}: model {model_mib:.1} MiB, peak RSS (VmHWM) {hwm:.1} MiB = {:.2} x model, {:.1} s, checksum {}",
        hwm / model_mib,
        start.elapsed().as_secs_f64(),
        out.delta.hash()
    );
}
