//! zstd's match-finder settings against the bodies the payload encoder
//! really compresses: each chunk's shuffled byte planes (f32 / f16 / bf16)
//! or int8 body, taken from `PayloadEncoder`'s own records (decompressed
//! back), then recompressed with every setting below. Prints, per data set
//! and encoding, the wire bytes and the compress / decompress MB/s (MB of
//! body, best of 5, one thread) of each setting, so the setting the encoder
//! uses can be chosen by measurement:
//! `cargo bench -p fedlink-protocol --bench zstd_params`.
//!
//! Data sets (8M parameters each, fixed seeds): a gaussian delta (σ 1e-3,
//! the other benches' shape), uniform weights (±0.05, a freshly
//! initialised layer), a sparse delta (90 % exact zeros: a pruned or
//! top-k-like update, where long matches do exist), a round's global
//! update as `fedlink-loadgen` makes it (the mean of 8 uniform deltas, the
//! values f16 / bf16 jobs send sites), and a trained-like
//! model (a few large tensors of mixed scales plus constant norm
//! parameters). `--file PATH` adds a file of little-endian f32 values (a
//! coordinator's `models/<hash>.bin`, say: the values end the file).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

use common::gaussian;

use fedlink_protocol::payload::{CHUNK_HEADER_LEN, ChunkHeader};
use fedlink_protocol::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zstd::zstd_safe::{CParameter, Strategy};

const N: usize = 8 * 1024 * 1024;

fn data_sets() -> Vec<(String, Vec<f32>)> {
    let mut sets = vec![("gaussian delta σ1e-3".to_string(), gaussian(2024, 1e-3, N))];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    sets.push((
        "uniform weights ±0.05".into(),
        (0..N).map(|_| rng.gen_range(-0.05f32..0.05)).collect(),
    ));
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let g = gaussian(9, 1e-3, N);
    sets.push((
        "sparse delta 90% zeros".into(),
        g.into_iter()
            .map(|v| if rng.gen_range(0..10) == 0 { v } else { 0.0 })
            .collect(),
    ));
    // A round's global update as `fedlink-loadgen` makes it: the mean of 8
    // sites' uniform ±1e-3 deltas (what f16 / bf16 jobs send sites).
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut mean = vec![0f32; N];
    for _ in 0..8 {
        for m in &mut mean {
            *m += rng.gen_range(-1e-3f32..1e-3) / 8.0;
        }
    }
    sets.push(("global update (mean of 8 uniform ±1e-3)".into(), mean));
    // Trained-like: conv/linear weights at a few scales, and norm layers'
    // weights (≈ 1) and biases (≈ 0) that training moved a little.
    let mut m = Vec::with_capacity(N);
    for (i, (len, std)) in [(N / 2, 0.02f32), (N / 4, 0.05), (N / 8, 0.1)]
        .into_iter()
        .enumerate()
    {
        m.extend(gaussian(100 + i as u64, std, len));
    }
    let rest = N - m.len();
    let g = gaussian(200, 1e-3, rest);
    m.extend(
        g.iter()
            .enumerate()
            .map(|(i, v)| if i % 2 == 0 { 1.0 + v } else { *v }),
    );
    sets.push(("trained-like model".into(), m));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--file" {
            let path = args.next().expect("--file PATH");
            let bytes = std::fs::read(&path).expect("read --file");
            // Aligned from the end: a coordinator's `models/<hash>.bin`
            // ends with its values (its short header is read as a few
            // values too, or dropped if not finite).
            let v: Vec<f32> = bytes[bytes.len() % 4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .filter(|v| v.is_finite())
                .collect();
            sets.push((format!("file {path}"), v));
        }
    }
    sets
}

/// The bodies zstd sees for `values` under `enc`: encode with the real
/// encoder, then decompress each record back.
fn bodies(values: &[f32], enc: Encoding) -> Vec<Vec<u8>> {
    let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![values.len() as u64])]).unwrap();
    let mut e = PayloadEncoder::new(spec, enc, 7).unwrap();
    let mut out = Vec::new();
    while let Some(r) = e.next_chunk() {
        let rec = e
            .encode_chunk(&values[r.start as usize..r.end as usize])
            .unwrap();
        let head: [u8; CHUNK_HEADER_LEN] = rec[..CHUNK_HEADER_LEN].try_into().unwrap();
        let raw_len = ChunkHeader::parse(&head).unwrap().raw_len as usize;
        out.push(zstd::bulk::decompress(&rec[CHUNK_HEADER_LEN..], raw_len).unwrap());
    }
    out
}

struct Setting {
    name: &'static str,
    params: Vec<CParameter>,
}

fn settings() -> Vec<Setting> {
    let fast = |h: u32, m: u32| {
        vec![
            CParameter::Strategy(Strategy::ZSTD_fast),
            CParameter::HashLog(h),
            CParameter::MinMatch(m),
        ]
    };
    vec![
        Setting {
            name: "level 1 (zstd's own)",
            params: vec![],
        },
        Setting {
            name: "fast hlog 13 mml 7",
            params: fast(13, 7),
        },
        Setting {
            name: "fast hlog 10 mml 6",
            params: fast(10, 6),
        },
        Setting {
            name: "fast hlog 10 mml 7",
            params: fast(10, 7),
        },
        Setting {
            name: "fast hlog 9 mml 7",
            params: fast(9, 7),
        },
        Setting {
            name: "fast hlog 8 mml 5",
            params: fast(8, 5),
        },
        Setting {
            name: "fast hlog 8 mml 6",
            params: fast(8, 6),
        },
        Setting {
            name: "fast hlog 8 mml 7",
            params: fast(8, 7),
        },
        Setting {
            name: "fast hlog 7 mml 7 (fedlink's level 1)",
            params: fast(7, 7),
        },
        Setting {
            name: "fast hlog 6 mml 7",
            params: fast(6, 7),
        },
    ]
}

fn measure(bodies: &[Vec<u8>], s: &Setting) -> (usize, f64, f64) {
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    for p in &s.params {
        c.set_parameter(*p).unwrap();
    }
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let total: usize = bodies.iter().map(Vec::len).sum();
    let mut frames: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| vec![0u8; zstd::zstd_safe::compress_bound(b.len())])
        .collect();
    let mut sizes = vec![0usize; bodies.len()];
    let mut back = vec![0u8; bodies.iter().map(Vec::len).max().unwrap_or(0)];
    let (mut tc, mut td) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        let t = Instant::now();
        for ((b, f), n) in bodies.iter().zip(&mut frames).zip(&mut sizes) {
            *n = c
                .compress_to_buffer(b.as_slice(), f.as_mut_slice())
                .unwrap();
        }
        tc = tc.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for ((b, f), n) in bodies.iter().zip(&frames).zip(&sizes) {
            let got = d
                .decompress_to_buffer(&f[..*n], &mut back[..b.len()])
                .unwrap();
            assert_eq!(got, b.len());
        }
        td = td.min(t.elapsed().as_secs_f64());
    }
    // The round trip is exact for every setting (checked once).
    for ((b, f), n) in bodies.iter().zip(&frames).zip(&sizes) {
        assert_eq!(&zstd::bulk::decompress(&f[..*n], b.len()).unwrap(), b);
    }
    let mb = total as f64 / 1e6;
    (sizes.iter().sum(), mb / tc, mb / td)
}

fn main() {
    let encodings = [
        Encoding::default(),
        Encoding::default().with_chunk_bytes(512 * 1024).unwrap(),
        Encoding::with_codec(ValueCodec::F16)
            .unwrap()
            .with_chunk_bytes(512 * 1024)
            .unwrap(),
        Encoding::with_codec(ValueCodec::Bf16)
            .unwrap()
            .with_chunk_bytes(512 * 1024)
            .unwrap(),
        Encoding::default().with_chunk_bytes(256 * 1024).unwrap(),
        Encoding::default().with_chunk_bytes(64 * 1024).unwrap(),
        Encoding::with_codec(ValueCodec::F16).unwrap(),
        Encoding::with_codec(ValueCodec::Bf16).unwrap(),
        Encoding::with_codec(ValueCodec::Int8 { stochastic: false })
            .unwrap()
            .shuffled(false),
    ];
    println!("| data | encoding | setting | wire MB | ratio | compress MB/s | decompress MB/s |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for (name, values) in data_sets() {
        for enc in encodings {
            let b = bodies(&values, enc);
            let total: usize = b.iter().map(Vec::len).sum();
            for s in settings() {
                let (wire, c, d) = measure(&b, &s);
                println!(
                    "| {name} | {} {} KiB | {} | {:.2} | {:.3} | {:.0} | {:.0} |",
                    enc.name(),
                    enc.chunk_bytes() / 1024,
                    s.name,
                    wire as f64 / 1e6,
                    total as f64 / wire as f64,
                    c,
                    d
                );
            }
        }
    }
}
