#![allow(clippy::unwrap_used, clippy::expect_used)]
//! FedAvg accumulator: hand-computed cases, streaming API, validation, and
//! order independence.

use std::sync::Arc;

use fedlink_aggregation::{
    AggregationError, Error, FedAvgAccumulator, FedAvgOptions, UpdateError, Weighting,
};
use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};
use proptest::prelude::*;

fn spec() -> Arc<ModelSpec> {
    Arc::new(
        ModelSpec::new(vec![
            TensorSpec::f32("fc1.weight", vec![2, 2]),
            TensorSpec::f32("fc1.bias", vec![2]),
        ])
        .unwrap(),
    )
}

fn model(values: Vec<f32>) -> FlatModel {
    FlatModel::new((*spec()).clone(), values).unwrap()
}

#[test]
fn weighted_mean_hand_computed() {
    let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    acc.fold("a", &model(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 1)
        .unwrap();
    acc.fold("b", &model(vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0]), 2)
        .unwrap();
    let out = acc.finish().unwrap();
    // (1·x_a + 2·x_b) / 3
    assert_eq!(out.delta.values(), &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(out.num_updates, 2);
    assert_eq!(out.total_weight, 3);
}

#[test]
fn uniform_weighting_ignores_num_examples() {
    let opts = FedAvgOptions {
        weighting: Weighting::Uniform,
        ..FedAvgOptions::default()
    };
    let mut acc = FedAvgAccumulator::new(spec(), opts);
    acc.fold("a", &model(vec![0.0; 6]), 100).unwrap();
    acc.fold("b", &model(vec![1.0; 6]), 1).unwrap();
    assert_eq!(acc.finish().unwrap().delta.values(), &[0.5; 6]);
}

#[test]
fn clipping_scales_the_update() {
    let opts = FedAvgOptions {
        clip_norm: Some(1.0),
        ..FedAvgOptions::default()
    };
    let mut acc = FedAvgAccumulator::new(spec(), opts);
    // norm 5 → scaled by 1/5
    let t = acc
        .fold("a", &model(vec![3.0, 4.0, 0.0, 0.0, 0.0, 0.0]), 1)
        .unwrap();
    assert!(t.was_clipped());
    assert_eq!(t.l2_norm(), 5.0);
    let out = acc.finish().unwrap();
    assert!((out.delta.values()[0] - 0.6).abs() < 1e-7);
    assert!((out.delta.values()[1] - 0.8).abs() < 1e-7);
}

#[test]
fn streaming_chunks_equal_whole_fold() {
    let vals = vec![0.25, -1.5, 3.0, 0.125, 7.0, -2.0];
    let mut a = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    a.fold("s", &model(vals.clone()), 3).unwrap();
    let mut b = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    let mut v = b.validator("s", 3);
    v.feed(0, &vals[..1]).unwrap();
    v.feed(1, &vals[1..4]).unwrap();
    v.feed(4, &vals[4..]).unwrap();
    let tok = v.finish().unwrap();
    let mut f = b.begin(&tok).unwrap();
    f.chunk(0, &vals[..5]);
    f.chunk(5, &vals[5..]);
    f.finish();
    assert_eq!(a.finish().unwrap(), b.finish().unwrap());
}

/// A chunk the payload decoder checked (finite, its max |x| found in the
/// decoder's pass) validates exactly as the plain values do: the same
/// statistics, and the same refusal when a value is over the limit.
#[test]
fn decoder_checked_chunks_validate_as_plain_values() {
    use fedlink_protocol::payload::{PayloadDecoder, encode_payload};
    use fedlink_protocol::{Encoding, ValueCodec};
    let vals = vec![0.25, -1.5, 3.0, 0.125, 7.0, -2.0];
    for shuffle in [false, true] {
        // 16-byte chunks (the smallest): four values, then two.
        let e = Encoding::new(ValueCodec::F32, shuffle, 1, 16).unwrap();
        let (records, _) = encode_payload(&model(vals.clone()), e, 0).unwrap();
        for limit in [f32::MAX, 5.0] {
            let opts = FedAvgOptions {
                max_abs_value: limit,
                ..FedAvgOptions::default()
            };
            let acc = FedAvgAccumulator::new(spec(), opts);
            let mut plain = acc.validator("s", 3);
            let mut checked = acc.validator("s", 3);
            let mut dec = PayloadDecoder::new((*spec()).clone(), e).unwrap();
            let mut buf = Vec::new();
            for r in &records {
                let c = dec.decode_chunk_checked(r, &mut buf).unwrap();
                let a = plain.feed(c.offset(), c.values());
                let b = checked.feed_checked(c);
                assert_eq!(a, b, "shuffle={shuffle} limit={limit}");
            }
            if limit == f32::MAX {
                assert_eq!(plain.finish().unwrap(), checked.finish().unwrap());
            }
        }
    }
}

#[test]
fn validation_errors_name_site_and_tensor() {
    let acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    // canonical order: fc1.bias (2 values) then fc1.weight (4 values)
    let mut v = acc.validator("hospital-7", 1);
    let err = v.feed(0, &[0.0, 0.0, 1.0, f32::NAN]).unwrap_err();
    assert!(matches!(
        &err,
        UpdateError::NonFinite { site, tensor, index: 1, value }
            if site == "hospital-7" && tensor == "fc1.weight" && value.is_nan()
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("hospital-7") && msg.contains("fc1.weight"),
        "{msg}"
    );

    let mut v = acc.validator("s", 0);
    v.feed(0, &[0.0; 6]).unwrap();
    assert!(matches!(v.finish(), Err(UpdateError::ZeroExamples { .. })));

    let mut v = acc.validator("s", u64::MAX);
    v.feed(0, &[0.0; 6]).unwrap();
    assert!(matches!(
        v.finish(),
        Err(UpdateError::TooManyExamples { .. })
    ));

    let mut v = acc.validator("s", 1);
    v.feed(0, &[0.0; 3]).unwrap();
    assert!(matches!(
        v.feed(4, &[0.0; 2]),
        Err(UpdateError::ChunkOutOfOrder { .. })
    ));
    assert!(matches!(
        v.feed(3, &[0.0; 4]),
        Err(UpdateError::ChunkPastEnd { .. })
    ));
    match v.finish() {
        Err(UpdateError::Incomplete {
            tensor, received, ..
        }) => {
            assert_eq!(tensor, "fc1.weight");
            assert_eq!(received, 3);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn magnitude_bound_of_exact_accumulator() {
    let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    // 2^26 examples × 2.0 × 2^24 = 2^51 > 2^50
    let err = acc
        .fold("big", &model(vec![0.0, 0.0, 0.0, 2.0, 0.0, 0.0]), 1 << 26)
        .unwrap_err();
    match err {
        Error::Update(UpdateError::MagnitudeTooLarge {
            site,
            tensor,
            index,
            ..
        }) => {
            assert_eq!(
                (site.as_str(), tensor.as_str(), index),
                ("big", "fc1.weight", 1)
            );
        }
        other => panic!("{other:?}"),
    }
    // The rejected update left the accumulator untouched.
    assert_eq!(acc.num_folded(), 0);
    acc.fold("ok", &model(vec![1.0; 6]), 1).unwrap();
    assert_eq!(acc.finish().unwrap().delta.values(), &[1.0; 6]);
}

#[test]
fn wrong_tensors_are_refused() {
    let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    let other = ModelSpec::new(vec![
        TensorSpec::f32("fc1.weight", vec![4]),
        TensorSpec::f32("fc1.bias", vec![2]),
    ])
    .unwrap();
    let err = acc
        .fold("s", &FlatModel::new(other, vec![0.0; 6]).unwrap(), 1)
        .unwrap_err();
    assert!(
        matches!(err, Error::Update(UpdateError::ShapeMismatch { ref tensor, .. }) if tensor == "fc1.weight")
    );
    let extra = ModelSpec::new(vec![
        TensorSpec::f32("fc1.weight", vec![2, 2]),
        TensorSpec::f32("fc2.bias", vec![2]),
    ])
    .unwrap();
    let err = acc
        .fold("s", &FlatModel::new(extra, vec![0.0; 6]).unwrap(), 1)
        .unwrap_err();
    assert!(
        matches!(err, Error::Update(UpdateError::UnknownTensor { ref tensor, .. }) if tensor == "fc2.bias")
    );
}

#[test]
fn abandoned_fold_poisons_and_foreign_token_is_refused() {
    let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    let other = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    let mut v = other.validator("x", 1);
    v.feed(0, &[0.0; 6]).unwrap();
    let foreign = v.finish().unwrap();
    assert!(matches!(
        acc.begin(&foreign),
        Err(AggregationError::ForeignToken { .. })
    ));

    let mut v = acc.validator("s", 1);
    v.feed(0, &[1.0; 6]).unwrap();
    let tok = v.finish().unwrap();
    {
        let mut f = acc.begin(&tok).unwrap();
        f.chunk(0, &[1.0; 3]);
        // dropped without finishing
    }
    assert!(matches!(
        acc.finish(),
        Err(AggregationError::Poisoned { folded: 3, .. })
    ));
}

#[test]
fn no_updates_is_an_error() {
    let acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    assert_eq!(acc.finish().unwrap_err(), AggregationError::NoUpdates);
}

fn big_spec(n: u64) -> Arc<ModelSpec> {
    Arc::new(
        ModelSpec::new(vec![
            TensorSpec::f32("a", vec![n / 2]),
            TensorSpec::f32("b", vec![n - n / 2]),
        ])
        .unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Bit-identical results for any arrival order.
    #[test]
    fn permutation_invariance(
        updates in prop::collection::vec(
            (prop::collection::vec(-1.0e3f32..1.0e3, 7), 1u64..10_000),
            1..9,
        ),
        perm_seed in any::<u64>(),
        uniform in any::<bool>(),
        clip in prop::option::of(0.1f32..100.0),
    ) {
        let spec = big_spec(7);
        let opts = FedAvgOptions {
            weighting: if uniform { Weighting::Uniform } else { Weighting::NumExamples },
            clip_norm: clip,
            ..FedAvgOptions::default()
        };
        let run = |order: &[usize]| {
            let mut acc = FedAvgAccumulator::new(spec.clone(), opts.clone());
            for &i in order {
                let (v, n) = &updates[i];
                acc.fold(&format!("s{i}"), &FlatModel::new((*spec).clone(), v.clone()).unwrap(), *n)
                    .unwrap();
            }
            acc.finish().unwrap()
        };
        let id: Vec<usize> = (0..updates.len()).collect();
        let mut perm = id.clone();
        // Fisher-Yates with a simple LCG driven by the seed.
        let mut s = perm_seed;
        for i in (1..perm.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            perm.swap(i, (s >> 33) as usize % (i + 1));
        }
        let a = run(&id);
        let b = run(&perm);
        let bits = |m: &FlatModel| m.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&a.delta), bits(&b.delta));
        prop_assert_eq!(a.delta.hash(), b.delta.hash());
    }

    /// FedAvg of identical updates is the identity (exact on the grid).
    #[test]
    fn identical_updates_identity(
        // multiples of 2^-20 are exactly representable on the 2^-24 grid
        ints in prop::collection::vec(-1_000_000i32..1_000_000, 7),
        ns in prop::collection::vec(1u64..1000, 1..6),
    ) {
        let spec = big_spec(7);
        let vals: Vec<f32> = ints.iter().map(|&i| i as f32 / (1 << 20) as f32).collect();
        let m = FlatModel::new((*spec).clone(), vals.clone()).unwrap();
        let mut acc = FedAvgAccumulator::new(spec, FedAvgOptions::default());
        for (i, n) in ns.iter().enumerate() {
            acc.fold(&format!("s{i}"), &m, *n).unwrap();
        }
        let out = acc.finish().unwrap();
        prop_assert_eq!(out.delta.values(), &vals[..]);
    }

    /// Arbitrary f32 inputs: identical updates average to themselves within
    /// the documented bound 2^-(k+1) (plus f32 rounding).
    #[test]
    fn identical_updates_within_bound(
        vals in prop::collection::vec(-30.0f32..30.0, 7),
        ns in prop::collection::vec(1u64..1000, 1..6),
    ) {
        let spec = big_spec(7);
        let m = FlatModel::new((*spec).clone(), vals.clone()).unwrap();
        let mut acc = FedAvgAccumulator::new(spec, FedAvgOptions::default());
        for (i, n) in ns.iter().enumerate() {
            acc.fold(&format!("s{i}"), &m, *n).unwrap();
        }
        let out = acc.finish().unwrap();
        for (o, v) in out.delta.values().iter().zip(&vals) {
            let tol = 2f64.powi(-25) + f64::from(v.abs()) * 1.2e-7;
            prop_assert!((f64::from(*o) - f64::from(*v)).abs() <= tol, "{o} vs {v}");
        }
    }
}

#[test]
fn multi_block_parallel_fold_matches_sequential() {
    // Spans several 2 MiB blocks so the rayon path runs.
    let n = 600_000u64;
    let spec = big_spec(n);
    let vals: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
    let m = FlatModel::new((*spec).clone(), vals.clone()).unwrap();
    let mut acc = FedAvgAccumulator::new(spec.clone(), FedAvgOptions::default());
    acc.fold("a", &m, 3).unwrap();
    // Same update in small uneven chunks.
    let mut v = acc.validator("b", 5);
    for (i, c) in vals.chunks(77_777).enumerate() {
        v.feed(i as u64 * 77_777, c).unwrap();
    }
    let tok = v.finish().unwrap();
    let mut f = acc.begin(&tok).unwrap();
    for (i, c) in vals.chunks(300_001).enumerate() {
        f.chunk(i as u64 * 300_001, c);
    }
    f.finish();
    let out = acc.finish().unwrap();
    for (o, v) in out.delta.values().iter().zip(&vals) {
        assert!((o - v).abs() <= 1e-7, "{o} vs {v}");
    }
}
