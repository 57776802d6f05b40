#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Robust rules, optimizers, DP, config, budgets, safetensors: hand-computed
//! cases and properties.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedlink_aggregation::robust::{self, RobustRule};
use fedlink_aggregation::{
    AggregationError, ConfigError, Error, NoiseRng, OptimizerState, RoundAggregator,
    ServerOptimizer, ServerState, StrategyConfig, StrategyTable, UpdateError, safetensors_io,
};
use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};
use proptest::prelude::*;

fn spec(n: u64) -> Arc<ModelSpec> {
    Arc::new(ModelSpec::new(vec![TensorSpec::f32("w", vec![n])]).unwrap())
}

#[test]
fn median_and_trimmed_mean_hand_computed() {
    let u = vec![
        vec![1.0, 10.0],
        vec![2.0, 20.0],
        vec![100.0, -5.0],
        vec![3.0, 0.0],
    ];
    let w = vec![1; 4];
    // even K: mean of the two middle values
    assert_eq!(
        robust::aggregate(&RobustRule::Median, &u, &w).unwrap(),
        vec![2.5, 5.0]
    );
    let u5 = [u.clone(), vec![vec![4.0, 1.0]]].concat();
    assert_eq!(
        robust::aggregate(&RobustRule::Median, &u5, &[1; 5]).unwrap(),
        vec![3.0, 1.0]
    );
    // beta 0.2 of 5 → cut 1 each side: mean of middle three
    let t = robust::aggregate(&RobustRule::TrimmedMean { beta: 0.2 }, &u5, &[1; 5]).unwrap();
    assert_eq!(t, vec![3.0, (1.0 + 10.0 + 0.0) / 3.0]);
}

#[test]
fn krum_multikrum_bulyan_hand_computed() {
    // Four honest points near 0, one far outlier.
    let u = vec![
        vec![0.0, 0.0],
        vec![1.0, 0.0],
        vec![0.0, 1.0],
        vec![1.0, 1.0],
        vec![100.0, 100.0],
    ];
    let w = vec![1, 1, 1, 1, 3];
    // f = 1: m = 5 - 1 - 2 = 2 closest. Scores: u0: 1+1=2, u1: 1+1=2, u2: 2, u3: 2 → first wins.
    let k = robust::aggregate(
        &RobustRule::Krum {
            num_malicious: 1,
            to_keep: 0,
        },
        &u,
        &w,
    )
    .unwrap();
    assert_eq!(k, vec![0.0, 0.0]);
    // Multi-Krum keeps the 2 lowest scores (u0, u1) and weights by num_examples.
    let mk = robust::aggregate(
        &RobustRule::Krum {
            num_malicious: 1,
            to_keep: 2,
        },
        &u,
        &w,
    )
    .unwrap();
    assert_eq!(mk, vec![0.5, 0.0]);
    // Bulyan needs 4f+3 updates.
    let err = robust::aggregate(&RobustRule::Bulyan { num_malicious: 1 }, &u, &w).unwrap_err();
    assert!(matches!(
        err,
        AggregationError::NotEnoughUpdates {
            needed: 7,
            got: 5,
            ..
        }
    ));
    let b = robust::aggregate(&RobustRule::Bulyan { num_malicious: 0 }, &u[..4], &w[..4]).unwrap();
    // f = 0: θ = 4 selected (all), β = 4: plain mean.
    assert_eq!(b, vec![0.5, 0.5]);
}

#[test]
fn memory_budget_refused_before_allocating() {
    let config =
        StrategyConfig::from_key_values("fedmedian", &["memory_budget_bytes=1000000"]).unwrap();
    let spec = spec(100_000);
    let err = fedlink_aggregation::would_fit(&config, 10, &spec).unwrap_err();
    assert!(
        matches!(
            err,
            AggregationError::MemoryBudgetExceeded {
                needed_bytes: 4_400_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(RoundAggregator::new(&config, spec.clone(), 10, &ServerState::default()).is_err());
    assert!(fedlink_aggregation::would_fit(&config, 1, &spec).is_ok());
    // Streaming strategies always fit.
    let avg = StrategyConfig::from_key_values("fedavg", &[] as &[&str]).unwrap();
    assert!(fedlink_aggregation::would_fit(&avg, 100_000, &spec).is_ok());
}

#[test]
fn robust_round_capacity_and_rejection() {
    let config = StrategyConfig::from_key_values("fedmedian", &[] as &[&str]).unwrap();
    let spec = spec(3);
    let mut r = RoundAggregator::new(&config, spec.clone(), 2, &ServerState::default()).unwrap();
    let m = |v: Vec<f32>| FlatModel::new((*spec).clone(), v).unwrap();
    r.fold("a", &m(vec![1.0, 2.0, 3.0]), 1).unwrap();
    let err = r
        .fold("bad", &m(vec![1.0, f32::INFINITY, 3.0]), 1)
        .unwrap_err();
    assert!(matches!(err, Error::Update(UpdateError::NonFinite { .. })));
    r.fold("b", &m(vec![3.0, 2.0, 1.0]), 1).unwrap();
    let err = r.fold("c", &m(vec![0.0; 3]), 1).unwrap_err();
    assert!(matches!(
        err,
        Error::Aggregation(AggregationError::CapacityExceeded { capacity: 2 })
    ));
    let out = r
        .finish(
            &mut ServerState::default(),
            &mut NoiseRng::with_fixed_seed_for_tests(1),
        )
        .unwrap();
    assert_eq!(out.update.values(), &[2.0, 2.0, 2.0]);
}

#[test]
fn fedavgm_hand_computed_and_state_roundtrip() {
    let opt = ServerOptimizer::FedAvgM {
        server_learning_rate: 1.0,
        server_momentum: 0.5,
    };
    let mut st = OptimizerState::default();
    let mut d = vec![1.0f32, -2.0];
    opt.apply(&mut st, &mut d).unwrap();
    assert_eq!(d, vec![1.0, -2.0]); // round 1: momentum = -Δ, u = Δ
    let json = serde_json::to_string(&st).unwrap();
    let mut st2: OptimizerState = serde_json::from_str(&json).unwrap();
    let mut d2 = vec![1.0f32, 0.0];
    opt.apply(&mut st2, &mut d2).unwrap();
    // mom = 0.5·(−1, 2) + (−1, 0) = (−1.5, 1); u = −mom
    assert_eq!(d2, vec![1.5, -1.0]);
    assert_eq!(st2.round, 2);
    // Wrong-size state is refused without touching it.
    let mut d3 = vec![0.0f32; 3];
    assert!(matches!(
        opt.apply(&mut st2, &mut d3),
        Err(AggregationError::StateMismatch { .. })
    ));
    assert_eq!(st2.round, 2);
}

#[test]
fn fedadagrad_first_step_is_eta_sign() {
    let opt = ServerOptimizer::FedAdagrad {
        eta: 0.1,
        eta_l: 0.1,
        tau: 1e-9,
    };
    let mut st = OptimizerState::default();
    let mut d = vec![0.5f32, -2.0];
    opt.apply(&mut st, &mut d).unwrap();
    // u = η·Δ/(|Δ| + τ) ≈ ±η
    assert!((d[0] - 0.1).abs() < 1e-7 && (d[1] + 0.1).abs() < 1e-7);
}

#[test]
fn dp_round_adds_seeded_noise_and_accounts() {
    let config = StrategyConfig::from_key_values(
        "fedavg",
        &[
            "clip_norm=1.0",
            "noise_multiplier=1.0",
            "num_sampled_sites=4",
            "sampling_rate=0.1",
        ],
    )
    .unwrap();
    let spec = spec(1000);
    let run = |seed| {
        let mut st = ServerState::default();
        let mut r = RoundAggregator::new(&config, spec.clone(), 4, &st).unwrap();
        for i in 0..4 {
            r.fold(
                &format!("s{i}"),
                &FlatModel::new((*spec).clone(), vec![10.0; 1000]).unwrap(),
                1 + i,
            )
            .unwrap();
        }
        let out = r
            .finish(&mut st, &mut NoiseRng::with_fixed_seed_for_tests(seed))
            .unwrap();
        (out, st)
    };
    let (a, st) = run(7);
    let (b, _) = run(7);
    let (c, _) = run(8);
    assert_eq!(a.update, b.update);
    assert_ne!(a.update, c.update);
    assert_eq!(a.numbers.num_clipped, 4);
    // std = z·C/m = 0.25; clipped mean = 1/sqrt(1000) per coordinate.
    assert!((a.numbers.noise_std - 0.25).abs() < 1e-12);
    let vals = a.update.values();
    let mean = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / 1000.0;
    let var = vals
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / 999.0;
    assert!((mean - 1.0 / 1000f64.sqrt()).abs() < 0.05, "{mean}");
    assert!((var.sqrt() - 0.25).abs() < 0.03, "{}", var.sqrt());
    let (eps, _) = a.numbers.privacy.unwrap();
    assert!((eps - fedlink_aggregation::accountant::epsilon(0.1, 1.0, 1, 1e-5)).abs() < 1e-12);
    assert_eq!(st.accountant.unwrap().rounds(), 1);
}

#[test]
fn adaptive_clipping_moves_towards_target_quantile() {
    let config = StrategyConfig::from_key_values(
        "fedavg",
        &[
            "adaptive_clipping=true",
            "initial_clipping_norm=1.0",
            "clip_norm_lr=0.2",
        ],
    )
    .unwrap();
    let spec = spec(4);
    let mut st = ServerState::default();
    let mut rng = NoiseRng::with_fixed_seed_for_tests(3);
    for _ in 0..2 {
        let mut r = RoundAggregator::new(&config, spec.clone(), 4, &st).unwrap();
        for i in 0..4 {
            // every update has norm 20: all clipped → unclipped fraction 0 < 0.5 → C grows
            r.fold(
                &format!("s{i}"),
                &FlatModel::new((*spec).clone(), vec![10.0; 4]).unwrap(),
                1,
            )
            .unwrap();
        }
        r.finish(&mut st, &mut rng).unwrap();
    }
    let c = st.clip_norm.unwrap();
    assert!((c - (0.2f64 * 0.5).exp().powi(2)).abs() < 1e-12, "{c}");
}

#[test]
fn config_errors_are_clear() {
    assert!(matches!(
        StrategyConfig::from_key_values("fedsgd", &[] as &[&str]),
        Err(ConfigError::UnknownStrategy { .. })
    ));
    let e = StrategyConfig::from_key_values("fedadam", &["etaa=1"]).unwrap_err();
    assert!(matches!(&e, ConfigError::UnknownKey { key, .. } if key == "etaa"));
    assert!(e.to_string().contains("beta_1"), "{e}");
    assert!(matches!(
        StrategyConfig::from_key_values("fedadam", &["eta=fast"]),
        Err(ConfigError::BadValue { .. })
    ));
    assert!(matches!(
        StrategyConfig::from_key_values("fedtrimmedavg", &["beta=0.5"]),
        Err(ConfigError::BadValue { .. })
    ));
    assert!(matches!(
        StrategyConfig::from_key_values("fedavg", &["x"]),
        Err(ConfigError::NotKeyValue(_))
    ));
    // DP needs clipping; robust strategies take no DP keys.
    assert!(
        StrategyConfig::from_key_values("fedavg", &["noise_multiplier=1", "num_sampled_sites=3"])
            .is_err()
    );
    assert!(StrategyConfig::from_key_values("krum", &["noise_multiplier=1"]).is_err());
    // Adaptive clipping with too little count noise is refused.
    assert!(
        StrategyConfig::from_key_values(
            "fedavg",
            &[
                "adaptive_clipping=true",
                "noise_multiplier=1",
                "num_sampled_sites=10"
            ]
        )
        .is_err()
    );
}

#[test]
fn strategy_table_from_toml_like_values() {
    let mut params = BTreeMap::new();
    params.insert(
        "eta".to_owned(),
        fedlink_aggregation::ParamValue::Float(0.05),
    );
    params.insert(
        "adaptive_clipping".to_owned(),
        fedlink_aggregation::ParamValue::Bool(true),
    );
    let t = StrategyTable {
        strategy: "fedyogi".into(),
        params,
    };
    let c = StrategyConfig::try_from(&t).unwrap();
    assert!(matches!(
        c.aggregation,
        fedlink_aggregation::Aggregation::Mean(ServerOptimizer::FedYogi { eta, .. }) if eta == 0.05
    ));
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<StrategyConfig>(&json).unwrap(), c);
}

#[test]
fn safetensors_roundtrip_and_checks() {
    let spec = ModelSpec::new(vec![
        TensorSpec::f32("fc1.weight", vec![2, 3]),
        TensorSpec::f32("fc1.bias", vec![2]),
    ])
    .unwrap();
    let m = FlatModel::new(spec.clone(), (0..8).map(|i| i as f32 * 0.5).collect()).unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("fedlink.kind".to_owned(), "delta".to_owned());
    let bytes = safetensors_io::serialize(&m, &meta).unwrap();
    let p = safetensors_io::parse("x", &bytes).unwrap();
    assert_eq!(p.model, m);
    assert_eq!(p.metadata, meta);
    let other = ModelSpec::new(vec![
        TensorSpec::f32("fc1.weight", vec![3, 2]),
        TensorSpec::f32("fc1.bias", vec![2]),
    ])
    .unwrap();
    let err = safetensors_io::parse_as("site-x", &bytes, &other).unwrap_err();
    assert!(
        err.to_string().contains("site-x") && err.to_string().contains("fc1.weight"),
        "{err}"
    );
    assert!(safetensors_io::parse("junk", b"not a safetensors file").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Median and trimmed mean stay within the coordinate-wise min and max.
    #[test]
    fn median_trimmed_within_bounds(
        u in prop::collection::vec(prop::collection::vec(-1e6f32..1e6, 5), 1..12),
        beta in 0.0f64..0.49,
    ) {
        let w = vec![1u64; u.len()];
        for rule in [RobustRule::Median, RobustRule::TrimmedMean { beta }] {
            let out = robust::aggregate(&rule, &u, &w).unwrap();
            for (j, o) in out.iter().enumerate() {
                let lo = u.iter().map(|x| x[j]).fold(f32::INFINITY, f32::min);
                let hi = u.iter().map(|x| x[j]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(*o >= lo && *o <= hi, "{o} not in [{lo}, {hi}]");
            }
        }
    }

    /// Median and trimmed mean are invariant under permutation of the inputs
    /// (Krum and Bulyan break exact ties by arrival index, like Flower).
    #[test]
    fn robust_permutation_invariance(
        u in prop::collection::vec(prop::collection::vec(-10f32..10.0, 6), 7..10),
        rot in 1usize..6,
    ) {
        let w = vec![1u64; u.len()];
        let mut p = u.clone();
        p.rotate_left(rot % u.len());
        for rule in [RobustRule::Median, RobustRule::TrimmedMean { beta: 0.2 }] {
            prop_assert_eq!(robust::aggregate(&rule, &u, &w).unwrap(), robust::aggregate(&rule, &p, &w).unwrap());
        }
    }

    /// Krum selects an honest update when f < (n − 2)/2 updates are far outliers.
    #[test]
    fn krum_selects_honest(
        honest in prop::collection::vec(prop::collection::vec(-1f32..1.0, 8), 5..10),
        f in 1usize..4,
        far in 1e3f32..1e5,
    ) {
        let n = honest.len() + f;
        prop_assume!(2 * f + 2 < n);
        let mut all = honest.clone();
        for i in 0..f {
            all.insert(i * 2 % (all.len() + 1), vec![far * (1.0 + i as f32); 8]);
        }
        let out = robust::aggregate(&RobustRule::Krum { num_malicious: f, to_keep: 0 }, &all, &vec![1; n]).unwrap();
        prop_assert!(honest.contains(&out));
    }
}
