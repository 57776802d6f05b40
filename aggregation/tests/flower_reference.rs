#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Numeric agreement with Flower 1.42's own aggregation code (reference
//! generated once by scripts/gen_flower_reference.py; no Python needed here).
//! Tolerance: |got − want| ≤ 1e-6·|want| + 1e-6.

use std::sync::Arc;

use fedlink_aggregation::{NoiseRng, RoundAggregator, ServerState, StrategyConfig};
use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn matches_flower_reference_outputs() {
    let data: Value = serde_json::from_str(include_str!("data/flower_reference.json")).unwrap();
    let spec = Arc::new(
        ModelSpec::new(vec![
            TensorSpec::f32("a", vec![3, 4]),
            TensorSpec::f32("b", vec![5]),
        ])
        .unwrap(),
    );
    let mut checked = 0;
    for case in data["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let params: Vec<(String, String)> = case["params"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let config = StrategyConfig::from_params(case["strategy"].as_str().unwrap(), params)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut state = ServerState::default();
        let mut rng = NoiseRng::with_fixed_seed_for_tests(0);
        for (r, round) in case["rounds"].as_array().unwrap().iter().enumerate() {
            let global = floats(&round["global"]);
            let updates = round["updates"].as_array().unwrap();
            let mut agg =
                RoundAggregator::new(&config, spec.clone(), updates.len(), &state).unwrap();
            for (i, u) in updates.iter().enumerate() {
                let w = floats(&u["weights"]);
                let delta: Vec<f32> = w.iter().zip(&global).map(|(w, g)| w - g).collect();
                let n = u["num_examples"].as_u64().unwrap();
                agg.fold(
                    &format!("site{i}"),
                    &FlatModel::new((*spec).clone(), delta).unwrap(),
                    n,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            let out = agg.finish(&mut state, &mut rng).unwrap();
            let mut model = FlatModel::new((*spec).clone(), global.clone()).unwrap();
            out.apply_to(&mut model).unwrap();
            let want = floats(&round["expected"]);
            for (j, (g, w)) in model.values().iter().zip(&want).enumerate() {
                let tol = 1e-6 * w.abs() + 1e-6;
                assert!(
                    (g - w).abs() <= tol,
                    "{name} round {} element {j}: got {g}, flower {w}",
                    r + 1
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} rounds checked");
}
