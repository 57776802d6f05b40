//! Writes the seed corpus (`corpus/<target>/seed-*`) from valid protocol
//! values: `cargo run --example make_corpus` in `fuzz/`.
use std::fs;

use fedlink_protocol::*;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = format!("corpus/{target}");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    fs::write(format!("{dir}/seed-{name}"), bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap_or_else(|e| panic!("{s}: {e:?}"))
}

fn main() {
    let spec = ModelSpec::new(vec![
        TensorSpec::f32("a", vec![7]),
        TensorSpec::f32("b", vec![3, 5]),
        TensorSpec::f32("c", vec![0]),
        TensorSpec::f32("d", vec![]),
        TensorSpec::f32("e", vec![40]),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let model = FlatModel::new(
        spec.clone(),
        (0..63).map(|i| (i as f32 - 30.0) / 17.0).collect(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // chunk: selector byte, then u16-length-prefixed records
    let codecs = [
        (0u8, ValueCodec::F32),
        (1, ValueCodec::F16),
        (2, ValueCodec::Bf16),
        (3, ValueCodec::Int8 { stochastic: false }),
        (
            4,
            ValueCodec::TopK {
                per_million: 250_000,
            },
        ),
    ];
    for (sel, codec) in codecs {
        for shuffle in [false, true] {
            let enc = Encoding::new(codec, shuffle, 1, 32).unwrap_or_else(|e| panic!("{e}"));
            let (records, _) = encode_payload(&model, enc, 3).unwrap_or_else(|e| panic!("{e}"));
            let mut bytes = vec![sel | if shuffle { 0x80 } else { 0 }];
            for r in records.iter().take(3) {
                bytes.extend_from_slice(&(r.len() as u16).to_le_bytes());
                bytes.extend_from_slice(r);
            }
            write("chunk", &format!("{}-{shuffle}", codec.tag()), &bytes);
        }
    }
    // messages and frames
    let enc = Encoding::default();
    let header = UpdateHeader {
        protocol_version: PROTOCOL_VERSION,
        federation_id: id("fed-1"),
        site_id: id("site-a"),
        job_id: id("job-1"),
        round: RoundId(2),
        base_model: model.hash(),
        num_examples: 100,
        encoding: enc,
        payload_len: 64,
        payload_hash: PayloadHash([5; 32]),
        nonce: UpdateNonce([6; 16]),
        metrics: Some(EvalMetrics {
            num_eval_examples: 20,
            loss: Some(0.3),
            accuracy: Some(0.9),
            auc: Some(0.95),
            dice: None,
            extra: vec![("f1".into(), 0.7)],
        }),
        feature_stats: Some(FeatureStats {
            features: vec!["age".into(), "bmi".into()],
            count: 100,
            sum: vec![5000.0, 2500.0],
            sum_sq: vec![260_000.0, 64_000.0],
        }),
    };
    let env = sign_update(&ed25519_dalek::SigningKey::from_bytes(&[1; 32]), header);
    write("envelope", "signed", &env.to_vec());
    let msgs = [
        Message::Hello(Hello {
            versions: VersionRange::SUPPORTED,
            agent_version: "fedlink-agent 0.1.0".into(),
            capabilities: Capabilities::default(),
        }),
        Message::Welcome(Welcome {
            protocol_version: 1,
            site_id: id("site-a"),
            federation_id: id("fed-1"),
            heartbeat_interval_ms: 5000,
        }),
        Message::TaskOffer(Box::new(TaskOffer {
            federation_id: id("fed-1"),
            job_id: id("job-1"),
            round: RoundId(2),
            base_model: model.hash(),
            arch: arch::ArchSpec::Mlp {
                inputs: 30,
                hidden: vec![16, 8],
                classes: 2,
            },
            training: TrainingConfig {
                epochs: 1,
                batch_size: 32,
                optimizer: Optimizer::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    epsilon: 1e-8,
                },
                learning_rate: 1e-3,
                fedprox_mu: 0.01,
                seed: 7,
            },
            encoding: enc,
            privacy: PrivacyRequirements {
                clip_norm: Some(1.0),
                dp: Some(DpNoise {
                    noise_multiplier: 0.5,
                }),
                central_dp: None,
            },
            deadline_unix_ms: 1_800_000_000_000,
            scaling: Some(FeatureScaling {
                features: vec!["age".into(), "bmi".into()],
                mean: vec![50.0, 25.0],
                std: vec![10.0, 4.0],
            }),
        })),
        Message::ModelManifest(Box::new(ModelManifest {
            hash: model.hash(),
            spec: spec.clone(),
            encoding: enc,
            payload_len: 1234,
            num_chunks: 1,
        })),
        Message::DeltaUpload(Box::new(DeltaUpload { envelope: env })),
        Message::UploadResult(UploadResult::Reject {
            code: RejectCode::Replay,
            message: "nonce reused".into(),
        }),
        Message::Heartbeat(Heartbeat {
            seq: 9,
            now_unix_ms: 1_700_000_000_000,
        }),
        Message::Bye(Bye {
            reason: "shutdown".into(),
        }),
        Message::Cancel(Cancel {
            job_id: id("job-1"),
            round: RoundId(2),
            reason: "round closed".into(),
        }),
        Message::AuditHead(AuditHead {
            seq: 42,
            hash: [0x11; 32],
            ts_unix_ms: 1_700_000_000_000,
            sig: [0x22; 64],
        }),
    ];
    let mut stream = vec![0u8]; // frame target: first byte = split point
    for (i, m) in msgs.iter().enumerate() {
        write("message", &format!("{i}-{}", m.name()), &m.to_vec());
        encode_message_frame(m, &mut stream).unwrap_or_else(|e| panic!("{e}"));
    }
    let (records, _) = encode_payload(&model, enc, 0).unwrap_or_else(|e| panic!("{e}"));
    encode_frame(FrameKind::Chunk, &records[0], &mut stream).unwrap_or_else(|e| panic!("{e}"));
    stream[0] = 37;
    write("frame", "conversation", &stream);
}
