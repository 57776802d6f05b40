//! Fuzz target bodies, shared by the libFuzzer binaries (`fuzz_targets/`)
//! and the stable-toolchain corpus replay test (`tests/corpus.rs`).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use fedlink_protocol::*;

pub mod disk;

/// Frames: arbitrary bytes pushed in two pieces into a [`FrameDecoder`];
/// message frames are decoded further.
pub fn frame(data: &[u8]) {
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (a, b) = data.split_at(split);
    let mut dec = FrameDecoder::with_max_len(1 << 16);
    for part in [a, b] {
        dec.push(part);
        while let Ok(Some(f)) = dec.pop() {
            if let Ok(msg) = f.into_message() {
                // A decoded message must re-encode to a decodable frame.
                let again = Frame::message(&msg).map(|f| f.to_vec());
                if let Ok(bytes) = again {
                    let mut d = FrameDecoder::new();
                    d.push(&bytes);
                    assert!(
                        matches!(d.pop(), Ok(Some(_))),
                        "re-encoded frame does not decode"
                    );
                }
            }
        }
    }
    let _ = dec.finish();
}

/// Messages: arbitrary bytes into [`Message::decode_exact`]; anything that
/// decodes must round-trip.
pub fn message(data: &[u8]) {
    let Ok(msg) = Message::decode_exact(data) else {
        return;
    };
    // Compare encodings, not values: floats may be NaN (NaN != NaN), which
    // TaskOffer::validate refuses but decoding must carry faithfully.
    let bytes = msg.to_vec();
    let again = Message::decode_exact(&bytes).map(|m| m.to_vec());
    assert_eq!(again.ok(), Some(bytes), "message does not round-trip");
    if let Some(o) = msg.as_task_offer()
        && o.validate().is_ok()
    {
        let _ = o.arch.spec();
    }
}

fn spec() -> ModelSpec {
    // Segments of many sizes, an empty tensor, a scalar.
    match ModelSpec::new(vec![
        TensorSpec::f32("a", vec![7]),
        TensorSpec::f32("b", vec![3, 5]),
        TensorSpec::f32("c", vec![0]),
        TensorSpec::f32("d", vec![]),
        TensorSpec::f32("e", vec![40]),
    ]) {
        Ok(s) => s,
        Err(e) => panic!("fixed spec is valid: {e}"),
    }
}

/// Payload chunks: first byte picks the encoding, the rest is a sequence of
/// records (u16 LE length prefix each) fed to a [`PayloadDecoder`].
pub fn chunk(data: &[u8]) {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    let codec = match sel % 6 {
        0 => ValueCodec::F32,
        1 => ValueCodec::F16,
        2 => ValueCodec::Bf16,
        3 => ValueCodec::Int8 { stochastic: false },
        4 => ValueCodec::TopK {
            per_million: 250_000,
        },
        _ => ValueCodec::TopK { per_million: 1 },
    };
    let Ok(enc) = Encoding::new(codec, sel & 0x80 != 0, 1, 32) else {
        return;
    };
    let Ok(mut dec) = PayloadDecoder::new(spec(), enc) else {
        return;
    };
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let rec = &rest[..len.min(rest.len())];
        rest = &rest[rec.len()..];
        match dec.decode_chunk(rec) {
            Ok(c) => assert!(c.values.iter().all(|v| v.is_finite())),
            Err(_) => return,
        }
    }
    let _ = dec.finish();
}

/// The base model of [`update`] (and of its seeds): [`spec`]'s 63 values.
pub fn update_base() -> FlatModel {
    match FlatModel::new(spec(), (0..63).map(|i| (i as f32 - 30.0) / 17.0).collect()) {
        Ok(m) => m,
        Err(e) => panic!("fixed model is valid: {e}"),
    }
}

/// The downlink encoding [`update`]'s first byte selects.
pub fn update_encoding(sel: u8) -> Option<Encoding> {
    let codec = match sel % 4 {
        0 => ValueCodec::F32,
        1 => ValueCodec::F16,
        2 => ValueCodec::Bf16,
        _ => ValueCodec::Int8 {
            stochastic: sel & 0x40 != 0,
        },
    };
    Encoding::new(codec, sel & 0x80 != 0, 1, 32).ok()
}

/// Downlink updates: byte 0 picks the encoding ([`update_encoding`]), bytes
/// 1..5 the announced payload length (u32 LE), bytes 5..37 the announced
/// model hash, the rest is a sequence of records (u16 LE length prefix
/// each) applied to [`update_base`] by a [`downlink::UpdateApplier`].
/// Whatever it accepts is a finite model that hashes to the announced hash.
pub fn update(data: &[u8]) {
    let (Some(&sel), Some(len), Some(hash)) = (data.first(), data.get(1..5), data.get(5..37))
    else {
        return;
    };
    let Some(enc) = update_encoding(sel) else {
        return;
    };
    let mut h = [0u8; 32];
    h.copy_from_slice(hash);
    let mut l = [0u8; 4];
    l.copy_from_slice(len);
    let base = update_base();
    let manifest = UpdateManifest {
        base: base.hash(),
        hash: ModelHash(h),
        spec: spec(),
        encoding: enc,
        payload_len: u64::from(u32::from_le_bytes(l)),
        num_chunks: spec().num_params().div_ceil(enc.chunk_elems()),
    };
    let Ok(mut applier) = downlink::UpdateApplier::new(manifest, base, 1 << 20) else {
        return;
    };
    let mut rest = data.get(37..).unwrap_or_default();
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let rec = &rest[..len.min(rest.len())];
        rest = &rest[rec.len()..];
        if applier.push(rec).is_err() {
            return;
        }
    }
    if let Ok(model) = applier.finish() {
        assert!(model.values().iter().all(|v| v.is_finite()));
        assert_eq!(model.hash(), ModelHash(h));
    }
}

/// Envelopes: arbitrary bytes into [`SignedEnvelope::decode_exact`] and, if
/// that works, into [`verify_update`] with a fixed key; nothing may verify
/// unless it was signed with that key (which the fuzzer cannot do).
pub fn envelope(data: &[u8]) {
    let Ok(env) = SignedEnvelope::decode_exact(data) else {
        return;
    };
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
    let mut guard = ReplayGuard::new();
    if let Ok(mut v) = verify_update(&env, &site, &keys, &expected, &mut guard) {
        // Only possible for a seed signed with key [1; 32]: the signed bytes
        // must then be exactly the seed's.
        let _ = v.update(data);
        let _ = v.finish();
    }
}

/// Admin API documents: arbitrary bytes into [`admin::AdminRequest::from_json`]
/// and [`admin::AdminResponse::from_json`] (what the coordinator and the CLI
/// read off the wire); anything that parses must re-encode to the same value.
pub fn admin(data: &[u8]) {
    if let Ok(req) = admin::AdminRequest::from_json(data) {
        let _ = req.command();
        let _ = req.args();
        let bytes = req
            .to_json()
            .unwrap_or_else(|e| panic!("re-encoding a request: {e}"));
        let again = admin::AdminRequest::from_json(&bytes);
        assert_eq!(again.ok(), Some(req), "admin request does not round-trip");
    }
    if let Ok(resp) = admin::AdminResponse::from_json(data) {
        let _ = resp.is_error();
        let bytes = resp
            .to_json()
            .unwrap_or_else(|e| panic!("re-encoding a response: {e}"));
        assert!(
            admin::AdminResponse::from_json(&bytes).is_ok(),
            "admin response does not re-parse"
        );
    }
}
