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
    protocol_seeds();
    update_seeds();
    // Disk inputs; pass a kept demo work directory (`./demo --keep --only
    // wdbc`) to harvest a real coordinator store, configs and logs too.
    let demo = std::env::args().nth(1).map(std::path::PathBuf::from);
    disk_seeds(demo.as_deref());
}

fn protocol_seeds() {
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
    let mut msgs = vec![
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
                augmentation: None,
                class_weight: Default::default(),
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
        Message::DeltaUpload(Box::new(DeltaUpload {
            envelope: env.clone(),
        })),
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
        Message::RoundOutcome(RoundOutcome {
            job_id: id("job-1"),
            round: RoundId(2),
            model: ModelHash([0x33; 32]),
            job_completed: true,
        }),
        Message::ResumeUpload(Box::new(DeltaUpload { envelope: env })),
        Message::UploadProgress(UploadProgress {
            records: 7,
            bytes: 7_340_032,
        }),
        Message::ModelFetchFrom(ModelFetchFrom {
            hash: model.hash(),
            from_record: 3,
        }),
        Message::EvalRequest(Box::new(EvalRequest {
            federation_id: id("fed-1"),
            job_id: id("job-1"),
            round: RoundId(3),
            model: model.hash(),
            arch: fedlink_protocol::arch::ArchSpec::LogReg {
                inputs: 4,
                classes: 2,
            },
            scaling: None,
        })),
        Message::EvalReport(Box::new(sign_eval_report(
            &ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            EvalReport {
                protocol_version: PROTOCOL_VERSION,
                federation_id: id("fed-1"),
                site_id: id("site-a"),
                job_id: id("job-1"),
                round: RoundId(3),
                model: model.hash(),
                metrics: EvalMetrics {
                    num_eval_examples: 20,
                    loss: Some(0.3),
                    accuracy: Some(0.9),
                    auc: Some(0.95),
                    dice: None,
                    extra: vec![],
                },
            },
        ))),
    ];
    // The offer in its version-5 and version-6 encodings too, with the
    // fields only they carry.
    if let Some(o) = msgs.get(2).and_then(Message::as_task_offer) {
        let mut o = o.clone();
        o.training.augmentation = Some(Augmentation {
            flips: true,
            rotate90: true,
            intensity_jitter: Some(IntensityJitter {
                scale: 0.1,
                shift: 0.1,
            }),
        });
        o.training.class_weight = ClassWeight::Balanced;
        msgs.push(Message::TaskOfferV5(Box::new(o.clone())));
        msgs.push(Message::TaskOfferV6(Box::new(o)));
    }
    msgs.push(Message::ModelUpdateFetch(ModelUpdateFetch {
        hash: model.hash(),
        base: ModelHash([0x44; 32]),
        from_record: 1,
    }));
    msgs.push(Message::UpdateManifest(Box::new(UpdateManifest {
        base: ModelHash([0x44; 32]),
        hash: model.hash(),
        spec: spec.clone(),
        encoding: Encoding::new(ValueCodec::F16, true, 1, 32).unwrap_or_else(|e| panic!("{e}")),
        payload_len: 120,
        num_chunks: 8,
    })));
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

/// Downlink update seeds: the update of `fedlink_protocol_fuzz::update_base`
/// in each encoding, with the right announced length and hash.
fn update_seeds() {
    let base = fedlink_protocol_fuzz::update_base();
    let update = FlatModel::new(
        base.spec().clone(),
        (0..63)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 1e-3)
            .collect(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for sel in [0u8, 1, 2, 3, 0x43, 0x81, 0x83] {
        let enc = fedlink_protocol_fuzz::update_encoding(sel).unwrap_or_else(|| panic!("{sel}"));
        let (records, summary) = encode_payload(&update, enc, 5).unwrap_or_else(|e| panic!("{e}"));
        let decoded = decode_payload(base.spec().clone(), enc, records.iter().map(Vec::as_slice))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut target = base.clone();
        downlink::apply_update(target.values_mut(), 0, decoded.values())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = vec![sel];
        bytes.extend_from_slice(&(summary.payload_len as u32).to_le_bytes());
        bytes.extend_from_slice(&target.hash().0);
        for r in &records {
            bytes.extend_from_slice(&(r.len() as u16).to_le_bytes());
            bytes.extend_from_slice(r);
        }
        write("update", &format!("{sel:02x}"), &bytes);
    }
}

fn read(path: &std::path::Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn disk_seeds(demo: Option<&std::path::Path>) {
    use ed25519_dalek::SigningKey;
    use fedlink_protocol_fuzz::disk::{self, StoreRecord};

    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));

    // audit_log: a log signed with the seed key, with its exported head.
    let key = SigningKey::from_bytes(&disk::AUDIT_SEED_KEY);
    let log_path = tmp.path().join("audit.jsonl");
    let mut log =
        fedlink_audit::AuditLog::open(&log_path, key.clone()).unwrap_or_else(|e| panic!("{e}"));
    let events = [
        (
            "system",
            "coordinator.started",
            serde_json::json!({"version": "0.1.0"}),
        ),
        (
            "fedlink://fuzz/site/hospital-a",
            "conn.accepted",
            serde_json::json!({"remote": "127.0.0.1:4000"}),
        ),
        (
            "system",
            "round.opened",
            serde_json::json!({"job": "job-1", "round": 1}),
        ),
        (
            "fedlink://fuzz/site/hospital-a",
            "update.received",
            serde_json::json!({"job": "job-1", "round": 1, "bytes": 4710, "accepted": true}),
        ),
        (
            "system",
            "round.aggregated",
            serde_json::json!({"job": "job-1", "round": 1, "inputs": 1}),
        ),
    ];
    for (i, (actor, event, details)) in events.iter().enumerate() {
        log.append(1_700_000_000_000 + i as u64, actor, event, details)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let head = log
        .signed_head(1_700_000_001_000)
        .unwrap_or_else(|e| panic!("{e}"));
    drop(log);
    let bytes = read(&log_path);
    write("audit_log", "signed-log", &bytes);
    write("audit_log", "torn-tail", &bytes[..bytes.len() - 7]);
    let head_path = tmp.path().join("head.json");
    fedlink_audit::write_head(&head_path, &head).unwrap_or_else(|e| panic!("{e}"));
    write("audit_log", "head", &read(&head_path));

    // model_file: a coordinator model file and a site's cache file.
    let model = disk::seed_model();
    let store = fedlink_coordinator::store::Store::open(&tmp.path().join("store"))
        .unwrap_or_else(|e| panic!("{e}"));
    let hash = store.put_model(model).unwrap_or_else(|e| panic!("{e}"));
    let mut seed = vec![0u8];
    seed.extend(read(&store.model_path(&hash)));
    write("model_file", "coordinator-model", &seed);
    let enc = Encoding::new(ValueCodec::F32, true, 1, 64).unwrap_or_else(|e| panic!("{e}"));
    let (records, summary) = encode_payload(model, enc, 0).unwrap_or_else(|e| panic!("{e}"));
    let manifest = ModelManifest {
        hash,
        spec: model.spec().clone(),
        encoding: enc,
        payload_len: summary.payload_len,
        num_chunks: records.len() as u64,
    };
    let cache = fedlink_agent::modelcache::ModelCache::open(tmp.path().join("cache"))
        .unwrap_or_else(|e| panic!("{e}"));
    let cached = cache
        .store(&manifest, &records)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut seed = vec![1u8];
    seed.extend(read(&cached));
    write("model_file", "site-cache", &seed);

    // config: example files in the repository, then each file of a valid kit.
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let with = |sel: u8, bytes: &[u8]| {
        let mut v = vec![sel];
        v.extend_from_slice(bytes);
        v
    };
    write(
        "config",
        "job-example",
        &with(
            1,
            &read(&repo.join("coordinator/examples/jobs/breast-cancer-logreg.toml")),
        ),
    );
    write(
        "config",
        "site-example",
        &with(2, &read(&repo.join("site-agent/examples/site.toml"))),
    );
    for (i, file) in disk::KIT_FILES.iter().enumerate() {
        let bytes = read(&disk::seed_kit().join(file));
        write("config", &format!("kit-{file}"), &with(5 + i as u8, &bytes));
    }

    // imaging: the DICOM and NIfTI sample files of data/imaging_samples.
    let samples = repo.join("data/imaging_samples");
    for (sel, name) in [
        (0u8, "dicom/CT_small.dcm"),
        (0, "dicom/MR_small_RLE.dcm"),
        (1, "nifti/standard.nii.gz"),
        (1, "nifti/anatomical.nii"),
    ] {
        let seed = name.rsplit('/').next().unwrap_or(name);
        write("imaging", seed, &with(sel, &read(&samples.join(name))));
    }

    let Some(demo) = demo else {
        return;
    };
    let w = demo.join("wdbc");
    write(
        "config",
        "demo-coordinator",
        &with(0, &read(&w.join("coordinator/coordinator.toml"))),
    );
    write("config", "demo-job", &with(1, &read(&w.join("job.toml"))));
    write(
        "config",
        "demo-site",
        &with(2, &read(&w.join("hospital-a/site.toml"))),
    );
    write(
        "config",
        "demo-sites",
        &with(3, &read(&w.join("pki/ca/sites.toml"))),
    );
    write(
        "config",
        "demo-revoked",
        &with(4, &read(&w.join("pki/ca/revoked.toml"))),
    );
    // The first entries of a real site log (signed with another key: the
    // parser and chain checks, not the signature path).
    let site_log = read(&w.join("hospital-a/state/audit.jsonl"));
    let cut = site_log
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(5)
        .map_or(site_log.len(), |(i, _)| i + 1);
    write("audit_log", "demo-site-log", &site_log[..cut]);

    // store: every record of the demo coordinator's database, its model
    // files and the last round's round.json.
    let data = w.join("coordinator/data");
    let db = redb::Database::open(data.join(fedlink_coordinator::store::DB_FILE))
        .unwrap_or_else(|e| panic!("{e}"));
    let txn = db.begin_read().unwrap_or_else(|e| panic!("{e}"));
    let mut recs = Vec::new();
    use redb::{ReadableTable, TableDefinition};
    let str_tables: [(u8, TableDefinition<'_, &str, &str>); 3] = [
        (0, TableDefinition::new("jobs")),
        (2, TableDefinition::new("sites")),
        (3, TableDefinition::new("models")),
    ];
    for (table, def) in str_tables {
        let t = txn.open_table(def).unwrap_or_else(|e| panic!("{e}"));
        for kv in t.iter().unwrap_or_else(|e| panic!("{e}")) {
            let (k, v) = kv.unwrap_or_else(|e| panic!("{e}"));
            recs.push(StoreRecord {
                table,
                key: k.value().to_owned(),
                value: v.value().as_bytes().to_vec(),
            });
        }
    }
    let rounds = txn
        .open_table(TableDefinition::<(&str, u64), &str>::new("rounds"))
        .unwrap_or_else(|e| panic!("{e}"));
    for kv in rounds.iter().unwrap_or_else(|e| panic!("{e}")) {
        let (k, v) = kv.unwrap_or_else(|e| panic!("{e}"));
        let (job, n) = k.value();
        recs.push(StoreRecord {
            table: 1,
            key: format!("{job}/{n}"),
            value: v.value().as_bytes().to_vec(),
        });
    }
    for (table, name) in [(4u8, "optimizer"), (5, "replay")] {
        let t = txn
            .open_table(TableDefinition::<&str, &[u8]>::new(name))
            .unwrap_or_else(|e| panic!("{e}"));
        for kv in t.iter().unwrap_or_else(|e| panic!("{e}")) {
            let (k, v) = kv.unwrap_or_else(|e| panic!("{e}"));
            recs.push(StoreRecord {
                table,
                key: k.value().to_owned(),
                value: v.value().to_vec(),
            });
        }
    }
    let models = data.join(fedlink_coordinator::store::MODELS_DIR);
    for entry in fs::read_dir(&models).unwrap_or_else(|e| panic!("{e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.extension().is_some_and(|e| e == "bin") {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            recs.push(StoreRecord {
                table: 6,
                key: stem,
                value: read(&path),
            });
        }
    }
    let mut round_files: Vec<_> = walk(&data.join("updates"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "round.json"))
        .collect();
    round_files.sort();
    if let Some(last) = round_files.last() {
        recs.push(StoreRecord {
            table: 7,
            key: String::new(),
            value: read(last),
        });
    }
    write("store", "demo-store", &disk::encode_store_records(&recs));
    // A smaller one: the job, its current round and the model files only.
    let small: Vec<_> = recs
        .iter()
        .filter(|r| r.table == 0 || r.table == 6 || r.table == 5)
        .cloned()
        .collect();
    write(
        "store",
        "demo-store-job-only",
        &disk::encode_store_records(&small),
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
