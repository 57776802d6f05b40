//! Models above 4 GiB of f32 (byte sizes beyond u32) stream through the payload encoder and decoder
//! with u64 sizes everywhere. Slow in debug: run it optimised, e.g.
//! `cargo test -p fedlink-protocol --profile bench --test large -- --ignored`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedlink_protocol::*;

/// Value `i` of the synthetic model (cheap, deterministic, varied).
fn value(i: u64) -> f32 {
    ((i.wrapping_mul(2_654_435_761) % 2001) as f32 - 1000.0) * 1e-4
}

#[test]
#[ignore = "streams 4 GiB + 12 bytes of f32 (about 20 s optimised); run with --ignored"]
fn four_gib_model_streams_chunk_by_chunk() {
    let n_big: u64 = 1 << 30; // 4 GiB of f32 in one tensor
    let spec = ModelSpec::new(vec![
        TensorSpec::f32("big.weight", vec![1 << 15, 1 << 15]),
        TensorSpec::f32("head.bias", vec![3]),
        TensorSpec::f32("a.first", vec![0]),
    ])
    .unwrap();
    assert_eq!(spec.num_params(), n_big + 3);
    assert!(spec.num_params() * 4 > u64::from(u32::MAX));
    let started = std::time::Instant::now();
    let encoding = Encoding::new(ValueCodec::F16, true, 1, 4 << 20).unwrap();

    // Site: encode without ever holding the model (one chunk at a time).
    let mut enc = PayloadEncoder::new(spec.clone(), encoding, 0).unwrap();
    let mut dec = PayloadDecoder::new(spec.clone(), encoding).unwrap();
    let mut buf = Vec::new();
    let mut max_err = 0f32;
    let mut records = 0u64;
    let mut hasher = blake3::Hasher::new();
    while let Some(r) = enc.next_chunk() {
        buf.clear();
        buf.extend((r.start..r.end).map(value));
        let record = enc.encode_chunk(&buf).unwrap();
        assert!(record.len() <= MAX_FRAME_LEN);
        hasher.update(&record);
        // Coordinator side, interleaved: decode the same record.
        let chunk = dec.decode_chunk(&record).unwrap();
        assert_eq!(chunk.offset, r.start);
        for (x, y) in buf.iter().zip(&chunk.values) {
            max_err = max_err.max((x - y).abs());
        }
        records += 1;
    }
    let summary = enc.finish().unwrap();
    let decoded = dec.finish().unwrap();
    assert_eq!(summary.num_chunks, records);
    assert_eq!(records, (n_big + 3).div_ceil(1 << 20));
    assert_eq!(decoded.payload_len, summary.payload_len);
    assert_eq!(summary.payload_hash.0, *hasher.finalize().as_bytes());
    assert!(summary.payload_len <= max_payload_len(&spec, &encoding));
    assert!(max_err <= 0.1 * 2f32.powi(-11), "max error {max_err}");
    println!(
        "{} params, {records} chunks, {} payload bytes, {:.1} s",
        spec.num_params(),
        summary.payload_len,
        started.elapsed().as_secs_f64()
    );
}
