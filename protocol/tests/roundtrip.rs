//! Property tests: every message and every encoding round-trips (lossless
//! ones exactly, lossy ones within the documented bounds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::*;
use proptest::prelude::*;

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,24}"
}

fn site_id() -> impl Strategy<Value = SiteId> {
    id().prop_map(|s| SiteId::new(s).unwrap())
}

fn fed_id() -> impl Strategy<Value = FederationId> {
    id().prop_map(|s| FederationId::new(s).unwrap())
}

fn job_id() -> impl Strategy<Value = JobId> {
    id().prop_map(|s| JobId::new(s).unwrap())
}

fn hash() -> impl Strategy<Value = ModelHash> {
    any::<[u8; 32]>().prop_map(ModelHash)
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn finite() -> impl Strategy<Value = f64> {
    -1e6f64..1e6
}

fn codec() -> impl Strategy<Value = ValueCodec> {
    prop_oneof![
        Just(ValueCodec::F32),
        Just(ValueCodec::F16),
        Just(ValueCodec::Bf16),
        any::<bool>().prop_map(|stochastic| ValueCodec::Int8 { stochastic }),
        (1u32..=500_000).prop_map(|per_million| ValueCodec::TopK { per_million }),
    ]
}

fn encoding() -> impl Strategy<Value = Encoding> {
    (codec(), any::<bool>(), 1i32..=3, 4u32..=64)
        .prop_map(|(c, s, l, q)| Encoding::new(c, s, l, q * 4).unwrap())
}

fn spec() -> impl Strategy<Value = ModelSpec> {
    prop::collection::btree_map(
        "[a-z]{1,6}(\\.[a-z]{1,6})?",
        prop::collection::vec(0u64..6, 0..3),
        1..5,
    )
    .prop_map(|m| {
        ModelSpec::new(m.into_iter().map(|(p, s)| TensorSpec::f32(p, s)).collect()).unwrap()
    })
}

fn arch() -> impl Strategy<Value = ArchSpec> {
    prop_oneof![
        (1u32..100, 2u32..10).prop_map(|(inputs, classes)| ArchSpec::LogReg { inputs, classes }),
        (1u32..100, prop::collection::vec(1u32..64, 1..3), 2u32..10).prop_map(
            |(inputs, hidden, classes)| ArchSpec::Mlp {
                inputs,
                hidden,
                classes
            }
        ),
        (1u32..4, 1u32..16, 1u32..16, 2u32..10).prop_map(|(c, h, w, classes)| ArchSpec::Cnn {
            in_channels: c,
            height: h * 4,
            width: w * 4,
            classes
        }),
        (1u32..4, 1u32..16, 1u32..7, 2u32..5).prop_map(|(c, b, depth, classes)| {
            ArchSpec::UNet {
                in_channels: c,
                base_channels: b * 4,
                depth,
                classes,
            }
        }),
    ]
}

fn training() -> impl Strategy<Value = TrainingConfig> {
    (
        1u32..100,
        1u32..1024,
        prop_oneof![
            (0.0f64..0.99).prop_map(|momentum| Optimizer::Sgd { momentum }),
            (0.0f64..0.99, 0.0f64..0.999, 1e-9f64..1e-3).prop_map(|(beta1, beta2, epsilon)| {
                Optimizer::Adam {
                    beta1,
                    beta2,
                    epsilon,
                }
            }),
            (0.0f64..0.99, 0.0f64..0.999, 1e-9f64..1e-3, 0.0f64..0.1).prop_map(
                |(beta1, beta2, epsilon, weight_decay)| Optimizer::AdamW {
                    beta1,
                    beta2,
                    epsilon,
                    weight_decay
                }
            ),
        ],
        1e-6f64..1.0,
        0.0f64..1.0,
        any::<u64>(),
        prop::option::of((
            any::<bool>(),
            any::<bool>(),
            prop::option::of((0.0f64..0.5, 0.0f64..0.5)),
        )),
        any::<bool>(),
    )
        .prop_map(
            |(epochs, batch_size, optimizer, learning_rate, fedprox_mu, seed, aug, balanced)| {
                TrainingConfig {
                    epochs,
                    batch_size,
                    optimizer,
                    learning_rate,
                    fedprox_mu,
                    seed,
                    augmentation: aug.map(|(flips, rotate90, jitter)| Augmentation {
                        flips,
                        rotate90,
                        intensity_jitter: jitter
                            .map(|(scale, shift)| IntensityJitter { scale, shift }),
                    }),
                    class_weight: if balanced {
                        ClassWeight::Balanced
                    } else {
                        ClassWeight::None
                    },
                }
            },
        )
}

fn metrics() -> impl Strategy<Value = EvalMetrics> {
    (
        any::<u64>(),
        prop::option::of(finite()),
        prop::option::of(0.0f64..=1.0),
        prop::option::of(0.0f64..=1.0),
        prop::option::of(0.0f64..=1.0),
        prop::collection::vec((text(), finite()), 0..3),
    )
        .prop_map(
            |(num_eval_examples, loss, accuracy, auc, dice, extra)| EvalMetrics {
                num_eval_examples,
                loss,
                accuracy,
                auc,
                dice,
                extra,
            },
        )
}

/// Feature names and `n` values per feature.
fn feature_values(per_feature: usize) -> impl Strategy<Value = (Vec<String>, Vec<Vec<f64>>)> {
    prop::collection::vec((text(), prop::collection::vec(finite(), per_feature)), 1..6)
        .prop_map(|v| v.into_iter().unzip())
}

fn feature_stats() -> impl Strategy<Value = FeatureStats> {
    (1u64..1_000_000, feature_values(2)).prop_map(|(count, (features, v))| FeatureStats {
        features,
        count,
        sum: v.iter().map(|x| x[0]).collect(),
        sum_sq: v.iter().map(|x| x[1].abs()).collect(),
    })
}

fn feature_scaling() -> impl Strategy<Value = FeatureScaling> {
    feature_values(2).prop_map(|(features, v)| FeatureScaling {
        features,
        mean: v.iter().map(|x| x[0]).collect(),
        std: v.iter().map(|x| x[1].abs() + 1e-3).collect(),
    })
}

fn header() -> impl Strategy<Value = UpdateHeader> {
    (
        (fed_id(), site_id(), job_id(), any::<u64>(), hash()),
        (
            any::<u64>(),
            encoding(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            prop::option::of(metrics()),
            prop::option::of(feature_stats()),
        ),
    )
        .prop_map(
            |(
                (federation_id, site_id, job_id, round, base_model),
                (num_examples, encoding, payload_len, ph, nonce, metrics, feature_stats),
            )| UpdateHeader {
                protocol_version: PROTOCOL_VERSION,
                federation_id,
                site_id,
                job_id,
                round: RoundId(round),
                base_model,
                num_examples,
                encoding,
                payload_len,
                payload_hash: PayloadHash(ph),
                nonce: UpdateNonce(nonce),
                metrics,
                feature_stats,
            },
        )
}

fn envelope() -> impl Strategy<Value = SignedEnvelope> {
    (header(), any::<[u8; 32]>())
        .prop_map(|(h, seed)| sign_update(&ed25519_dalek::SigningKey::from_bytes(&seed), h))
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop::sample::select(RejectCode::ALL.to_vec())
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<(u16, u16)>(),
            text(),
            prop::collection::vec(codec(), 0..4),
            any::<u32>(),
            prop::collection::vec(text(), 0..3)
        )
            .prop_map(
                |((min, max), agent_version, codecs, max_chunk_bytes, features)| {
                    Message::Hello(Hello {
                        versions: VersionRange { min, max },
                        agent_version,
                        capabilities: Capabilities {
                            codecs,
                            max_chunk_bytes,
                            features,
                        },
                    })
                }
            ),
        (any::<u16>(), site_id(), fed_id(), any::<u64>()).prop_map(|(v, s, f, hb)| {
            Message::Welcome(Welcome {
                protocol_version: v,
                site_id: s,
                federation_id: f,
                heartbeat_interval_ms: hb,
            })
        }),
        (reject_code(), text())
            .prop_map(|(code, message)| Message::Reject(Reject { code, message })),
        (
            (fed_id(), job_id(), any::<u64>(), hash(), arch()),
            (
                training(),
                encoding(),
                prop::option::of(0.1f64..10.0),
                prop::option::of(0.0f64..5.0),
                any::<u64>(),
                prop::option::of(feature_scaling()),
                prop::option::of((0.1f64..5.0, prop::option::of(1e-9f64..0.5))),
                prop::sample::select(vec![
                    2u16,
                    CENTRAL_DP_VERSION,
                    TRAINING_V5_VERSION,
                    CLASS_WEIGHT_VERSION
                ]),
            )
        )
            .prop_map(
                |(
                    (federation_id, job_id, round, base_model, arch),
                    (
                        mut training,
                        encoding,
                        clip,
                        noise,
                        deadline_unix_ms,
                        scaling,
                        central,
                        version,
                    ),
                )| {
                    let v3 = version >= CENTRAL_DP_VERSION;
                    // only the version-5 variant carries augmentation
                    if version < TRAINING_V5_VERSION {
                        training.augmentation = None;
                    }
                    // only the version-6 variant carries class weighting
                    if version < CLASS_WEIGHT_VERSION {
                        training.class_weight = ClassWeight::None;
                    }
                    let offer = TaskOffer {
                        federation_id,
                        job_id,
                        round: RoundId(round),
                        base_model,
                        arch,
                        training,
                        encoding,
                        privacy: PrivacyRequirements {
                            clip_norm: clip,
                            dp: clip
                                .and(noise)
                                .map(|noise_multiplier| DpNoise { noise_multiplier }),
                            // only the version-3 variant carries central DP
                            central_dp: clip.and(central).filter(|_| v3).map(
                                |(noise_multiplier, target_delta)| CentralDp {
                                    noise_multiplier,
                                    target_delta,
                                },
                            ),
                        },
                        deadline_unix_ms,
                        scaling,
                    };
                    Message::task_offer(offer, version)
                }
            ),
        (job_id(), any::<u64>(), prop::option::of(text())).prop_map(|(job_id, r, d)| {
            Message::OfferResponse(OfferResponse {
                job_id,
                round: RoundId(r),
                decision: match d {
                    None => OfferDecision::Accept,
                    Some(reason) => OfferDecision::Decline { reason },
                },
            })
        }),
        hash().prop_map(|hash| Message::ModelFetch(ModelFetch { hash })),
        (hash(), spec(), encoding(), any::<u64>(), any::<u64>()).prop_map(
            |(hash, spec, encoding, payload_len, num_chunks)| {
                Message::ModelManifest(Box::new(ModelManifest {
                    hash,
                    spec,
                    encoding,
                    payload_len,
                    num_chunks,
                }))
            }
        ),
        envelope().prop_map(|envelope| Message::DeltaUpload(Box::new(DeltaUpload { envelope }))),
        prop_oneof![
            (any::<[u8; 32]>(), any::<bool>()).prop_map(|(h, accepted)| {
                UploadResult::Ack {
                    payload_hash: PayloadHash(h),
                    accepted,
                }
            }),
            (reject_code(), text())
                .prop_map(|(code, message)| UploadResult::Reject { code, message }),
        ]
        .prop_map(Message::UploadResult),
        (any::<u64>(), any::<u64>())
            .prop_map(|(seq, now_unix_ms)| Message::Heartbeat(Heartbeat { seq, now_unix_ms })),
        text().prop_map(|reason| Message::Bye(Bye { reason })),
        (job_id(), any::<u64>(), text()).prop_map(|(job_id, round, reason)| {
            Message::Cancel(Cancel {
                job_id,
                round: RoundId(round),
                reason,
            })
        }),
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<([u8; 32], [u8; 32])>()
        )
            .prop_map(|(seq, hash, ts_unix_ms, (r, s))| {
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&r);
                sig[32..].copy_from_slice(&s);
                Message::AuditHead(AuditHead {
                    seq,
                    hash,
                    ts_unix_ms,
                    sig,
                })
            }),
        envelope().prop_map(|envelope| Message::ResumeUpload(Box::new(DeltaUpload { envelope }))),
        any::<(u64, u64)>().prop_map(|(records, bytes)| Message::UploadProgress(UploadProgress {
            records,
            bytes
        })),
        (hash(), any::<u64>()).prop_map(|(hash, from_record)| {
            Message::ModelFetchFrom(ModelFetchFrom { hash, from_record })
        }),
        (
            fed_id(),
            job_id(),
            any::<u64>(),
            hash(),
            arch(),
            prop::option::of(feature_scaling())
        )
            .prop_map(|(federation_id, job_id, round, model, arch, scaling)| {
                Message::EvalRequest(Box::new(EvalRequest {
                    federation_id,
                    job_id,
                    round: RoundId(round),
                    model,
                    arch,
                    scaling,
                }))
            }),
        (
            fed_id(),
            site_id(),
            job_id(),
            any::<u64>(),
            hash(),
            metrics()
        )
            .prop_map(|(federation_id, site_id, job_id, round, model, metrics)| {
                Message::EvalReport(Box::new(sign_eval_report(
                    &ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
                    EvalReport {
                        protocol_version: PROTOCOL_VERSION,
                        federation_id,
                        site_id,
                        job_id,
                        round: RoundId(round),
                        model,
                        metrics,
                    },
                )))
            }),
    ]
}

/// Values of a model with `spec`, in `[-scale, scale]`.
fn values_for(spec: ModelSpec) -> impl Strategy<Value = FlatModel> {
    let n = spec.num_params() as usize;
    (prop::collection::vec(-1.0f32..1.0, n), 1e-3f32..100.0).prop_map(move |(v, s)| {
        FlatModel::new(spec.clone(), v.into_iter().map(|x| x * s).collect()).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn messages_roundtrip(msg in message()) {
        let bytes = msg.to_vec();
        prop_assert_eq!(Message::decode_exact(&bytes).unwrap(), msg.clone());
        // and through a frame
        let frame = Frame::message(&msg).unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&frame.to_vec());
        prop_assert_eq!(dec.pop().unwrap().unwrap().into_message().unwrap(), msg);
    }

    #[test]
    fn generated_offers_and_stats_are_valid(
        scaling in feature_scaling(),
        stats in feature_stats(),
    ) {
        prop_assert_eq!(scaling.validate(), Ok(()));
        // sum_sq ≥ 0 is not enough for a report: Σx² ≥ (Σx)²/n must hold.
        let c = stats.count as f64;
        let consistent = stats.sum.iter().zip(&stats.sum_sq).all(|(s, q)| s * s <= c * q * (1.0 + 1e-9));
        prop_assert_eq!(stats.validate().is_ok(), consistent);
        if consistent {
            let pooled = FeatureScaling::pooled([&stats, &stats]).unwrap();
            prop_assert_eq!(pooled.validate(), Ok(()));
            prop_assert_eq!(&pooled.features, &stats.features);
            for (m, s) in pooled.mean.iter().zip(&stats.sum) {
                prop_assert!((m - s / c).abs() <= 1e-9 * (s / c).abs().max(1.0));
            }
        }
    }

    #[test]
    fn envelopes_roundtrip_and_verify(env in envelope()) {
        let back = SignedEnvelope::decode_exact(&env.to_vec()).unwrap();
        prop_assert_eq!(back.header.signed_bytes(), env.header.signed_bytes());
        prop_assert_eq!(back, env);
    }

    #[test]
    fn payloads_roundtrip(
        (model, enc) in (spec(), encoding()).prop_flat_map(|(s, e)| (values_for(s), Just(e))),
        seed in any::<u64>(),
    ) {
        let (records, summary) = encode_payload(&model, enc, seed).unwrap();
        prop_assert_eq!(summary.payload_len, records.iter().map(|r| r.len() as u64).sum::<u64>());
        prop_assert!(summary.payload_len <= max_payload_len(model.spec(), &enc));
        // deterministic for a given seed
        let (again, _) = encode_payload(&model, enc, seed).unwrap();
        prop_assert_eq!(&again, &records);
        let back = decode_payload(model.spec().clone(), enc, records.iter().map(Vec::as_slice)).unwrap();
        check_bounds(&model, back.values(), enc)?;
    }
}

/// The documented error bounds of each codec (see `encoding` module docs).
fn check_bounds(model: &FlatModel, y: &[f32], enc: Encoding) -> Result<(), TestCaseError> {
    let x = model.values();
    prop_assert_eq!(x.len(), y.len());
    match enc.values() {
        ValueCodec::F32 => {
            for (a, b) in x.iter().zip(y) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
        }
        ValueCodec::F16 => {
            for (a, b) in x.iter().zip(y) {
                let bound = if a.abs() >= 2f32.powi(-14) {
                    a.abs() * 2f32.powi(-11)
                } else {
                    2f32.powi(-25)
                };
                prop_assert!((a - b).abs() <= bound, "f16 {} -> {}", a, b);
            }
        }
        ValueCodec::Bf16 => {
            for (a, b) in x.iter().zip(y) {
                prop_assert!(
                    (a - b).abs() <= a.abs() * 2f32.powi(-8),
                    "bf16 {} -> {}",
                    a,
                    b
                );
            }
        }
        ValueCodec::Int8 { stochastic } => {
            let ce = enc.chunk_elems();
            let spec = model.spec();
            let mut start = 0u64;
            while start < spec.num_params() {
                let end = (start + ce).min(spec.num_params());
                for (_, r) in spec.segments(start, end) {
                    let seg = &x[r.start as usize..r.end as usize];
                    let s = seg.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    let bound = if stochastic { s * 1.0001 } else { s * 0.5001 };
                    for i in r {
                        let (a, b) = (x[i as usize], y[i as usize]);
                        prop_assert!(
                            (a - b).abs() <= bound + 1e-30,
                            "int8 {} -> {} (s={})",
                            a,
                            b,
                            s
                        );
                    }
                }
                start = end;
            }
        }
        ValueCodec::TopK { .. } => {
            let ce = enc.chunk_elems() as usize;
            for (xc, yc) in x.chunks(ce).zip(y.chunks(ce)) {
                let k = enc.values().kept(xc.len() as u64) as usize;
                let kept: Vec<f32> = yc
                    .iter()
                    .zip(xc)
                    .filter(|(b, a)| a == b && **b != 0.0)
                    .map(|(_, a)| a.abs())
                    .collect();
                let min_kept = kept.iter().copied().fold(f32::INFINITY, f32::min);
                let mut nonzero = 0;
                for (a, b) in xc.iter().zip(yc) {
                    if *b != 0.0 {
                        nonzero += 1;
                        prop_assert_eq!(a, b);
                    } else {
                        prop_assert!(
                            a.abs() <= min_kept || kept.is_empty(),
                            "dropped {} > kept {}",
                            a,
                            min_kept
                        );
                    }
                }
                prop_assert!(nonzero <= k);
            }
        }
        _ => prop_assert!(false, "codec not covered"),
    }
    Ok(())
}

#[test]
fn stochastic_int8_is_unbiased() {
    // Mean of many independent stochastic encodings converges to the value.
    let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![64])]).unwrap();
    let mut v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 40.0).collect();
    v[0] = 1.0; // scale = 1/127
    let model = FlatModel::new(spec.clone(), v.clone()).unwrap();
    let enc = Encoding::with_codec(ValueCodec::Int8 { stochastic: true }).unwrap();
    let mut sum = vec![0f64; 64];
    let trials = 400;
    for seed in 0..trials {
        let (records, _) = encode_payload(&model, enc, seed).unwrap();
        let back = decode_payload(spec.clone(), enc, records.iter().map(Vec::as_slice)).unwrap();
        for (s, y) in sum.iter_mut().zip(back.values()) {
            *s += f64::from(*y);
        }
    }
    let s: f64 = 1.0 / 127.0;
    for (m, x) in sum.iter().zip(&v) {
        let mean = m / trials as f64;
        // std of one draw ≤ s/2; of the mean ≤ s/2/sqrt(400) = s/40; allow 5σ
        assert!((mean - f64::from(*x)).abs() < s / 8.0, "{mean} vs {x}");
    }
}
