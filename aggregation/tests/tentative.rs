//! One pass per update: tentative folds and their exact removal give the
//! same accumulator, bit for bit, as folding only the counted updates the
//! two-pass way — whatever the order, the interleaving, the threads, and
//! when the round's end closes the gate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::mpsc;

use fedlink_aggregation::{
    AggregationError, FedAvgAccumulator, FedAvgOptions, Removal, TentativeFold,
};
use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};

/// Two tensors over two accumulator blocks (a block is 2^18 values), so
/// that chunks cross a tensor and a block boundary.
const N: u64 = (1 << 18) + 20_000;

fn spec() -> Arc<ModelSpec> {
    Arc::new(
        ModelSpec::new(vec![
            TensorSpec::f32("a", vec![100_000]),
            TensorSpec::f32("b", vec![N - 100_000]),
        ])
        .unwrap(),
    )
}

/// splitmix64: a fixed-seed generator for the test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Values as the codecs produce them: f16 (a grid of 2^-14 steps with 11
/// significant bits), int8 (q · scale), or any f32.
fn values(rng: &mut Rng, pattern: u64) -> Vec<f32> {
    let scale = 0.01 + (rng.below(1000) as f32) * 1e-4;
    (0..N)
        .map(|_| match pattern % 3 {
            0 => ((rng.below(4096) as f32) - 2048.0) * 2f32.powi(-14),
            1 => ((rng.below(255) as i32 - 127) as f32) * scale,
            _ => (f64::from_bits(0x3FF0_0000_0000_0000 | (rng.next() >> 12)) - 1.5) as f32,
        })
        .collect()
}

/// Cut `0..N` into chunks of random sizes (1 to 70,000 values).
fn chunks(rng: &mut Rng) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < N {
        let len = (1 + rng.below(70_000)).min(N - at);
        out.push((at, at + len));
        at += len;
    }
    out
}

fn bits(m: &FlatModel) -> Vec<u32> {
    m.values().iter().map(|v| v.to_bits()).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    /// Checked, folded and counted.
    Count,
    /// A chunk fails its check (a NaN): what was folded is taken out.
    BadChunk,
    /// Fails the whole-update check at its end (0 examples): taken out.
    BadEnd,
    /// Complete, then refused by the round (late, superseded, revoked):
    /// retracted.
    Refused,
}

struct Update {
    values: Vec<f32>,
    num_examples: u64,
    fate: Fate,
    chunks: Vec<(u64, u64)>,
}

fn remove(mut r: Removal, u: &Update) -> bool {
    for &(a, b) in &u.chunks {
        r.chunk(a, &u.values[a as usize..b as usize]);
    }
    r.done()
}

/// Expected: only the counted updates, folded the two-pass way.
fn two_pass(updates: &[Update]) -> FlatModel {
    let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
    for (i, u) in updates.iter().enumerate() {
        if u.fate == Fate::Count {
            let d = FlatModel::new(spec().as_ref().clone(), u.values.clone()).unwrap();
            acc.fold(&format!("s{i}"), &d, u.num_examples).unwrap();
        }
    }
    acc.finish().unwrap().delta
}

fn make_updates(rng: &mut Rng, k: usize) -> Vec<Update> {
    (0..k)
        .map(|i| {
            let fate = match rng.below(5) {
                0 => Fate::BadChunk,
                1 => Fate::BadEnd,
                2 => Fate::Refused,
                _ => Fate::Count,
            };
            // At least one counted update per round.
            let fate = if i == 0 { Fate::Count } else { fate };
            let pattern = rng.below(3);
            let mut values = values(rng, pattern);
            let chunks = chunks(rng);
            if fate == Fate::BadChunk {
                let at = rng.below(N) as usize;
                values[at] = f32::NAN;
            }
            Update {
                values,
                num_examples: if fate == Fate::BadEnd {
                    0
                } else {
                    1 + rng.below(5000)
                },
                fate,
                chunks,
            }
        })
        .collect()
}

/// Random orders, random interleavings of chunks, random rejects (a bad
/// chunk anywhere, a bad end, a refusal after completion): the tentative
/// result equals the counted-only two-pass result, bit for bit.
#[test]
fn tentative_folds_and_exact_removals_equal_counted_only() {
    let mut seen = Vec::new();
    for seed in 0..8u64 {
        let mut rng = Rng(0x5EED_0000 + seed);
        let updates = make_updates(&mut rng, 6);
        seen.extend(updates.iter().map(|u| u.fate));
        let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
        let mut folds: Vec<Option<(usize, usize, TentativeFold)>> = updates
            .iter()
            .enumerate()
            .map(|(i, u)| {
                Some((
                    i,
                    0,
                    acc.tentative(format!("s{i}"), u.num_examples).unwrap(),
                ))
            })
            .collect();
        let mut done = Vec::new();
        // Advance a random unfinished update by one chunk at a time.
        while folds.iter().any(Option::is_some) {
            let live: Vec<usize> = (0..folds.len()).filter(|&j| folds[j].is_some()).collect();
            let j = live[rng.below(live.len() as u64) as usize];
            let (i, next, mut f) = folds[j].take().unwrap();
            let u = &updates[i];
            let (a, b) = u.chunks[next];
            match f.feed(a, &u.values[a as usize..b as usize]) {
                Err(_) => {
                    assert_eq!(u.fate, Fate::BadChunk, "seed {seed}");
                    assert!(remove(f.abandon(), u));
                }
                Ok(()) if next + 1 < u.chunks.len() => folds[j] = Some((i, next + 1, f)),
                Ok(()) => match f.finish() {
                    Ok(t) => done.push((i, t)),
                    Err(rejected) => {
                        assert_eq!(u.fate, Fate::BadEnd, "seed {seed}");
                        assert!(remove(rejected.1, u));
                    }
                },
            }
        }
        // Count or refuse the complete ones, in a random order.
        while !done.is_empty() {
            let (i, t) = done.swap_remove(rng.below(done.len() as u64) as usize);
            match updates[i].fate {
                Fate::Count => acc.count(&t).unwrap(),
                Fate::Refused => assert!(remove(t.retract(), &updates[i])),
                other => panic!("seed {seed}: {other:?} completed"),
            }
        }
        assert_eq!(acc.close_tentative(), 0);
        let got = acc.finish().unwrap();
        let n_counted = updates.iter().filter(|u| u.fate == Fate::Count).count();
        assert_eq!(got.num_updates, n_counted);
        assert_eq!(bits(&got.delta), bits(&two_pass(&updates)), "seed {seed}");
    }
    for fate in [Fate::Count, Fate::BadChunk, Fate::BadEnd, Fate::Refused] {
        assert!(seen.contains(&fate), "no {fate:?} among the seeds");
    }
}

/// Four threads fold at once (one of them also takes an update out): the
/// same result as the sequential two-pass fold.
#[test]
fn concurrent_folds_equal_sequential() {
    let mut rng = Rng(0xC0C0);
    let mut updates = make_updates(&mut rng, 8);
    for u in &mut updates[..7] {
        if u.fate != Fate::Count {
            *u = Update {
                values: u
                    .values
                    .iter()
                    .map(|v| if v.is_nan() { 0.5 } else { *v })
                    .collect(),
                num_examples: 1 + u.num_examples,
                fate: Fate::Count,
                chunks: u.chunks.clone(),
            };
        }
    }
    updates[7].fate = Fate::Refused;
    updates[7].num_examples = 7;
    updates[7].values.iter_mut().for_each(|v| {
        if v.is_nan() {
            *v = 1.0;
        }
    });
    for threads in [2usize, 4] {
        let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
        let folds: Vec<_> = updates
            .iter()
            .enumerate()
            .map(|(i, u)| acc.tentative(format!("s{i}"), u.num_examples).unwrap())
            .collect();
        let mut results = Vec::new();
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            let mut per: Vec<Vec<(usize, TentativeFold)>> =
                (0..threads).map(|_| Vec::new()).collect();
            for (i, f) in folds.into_iter().enumerate() {
                per[i % threads].push((i, f));
            }
            for mine in per {
                let updates = &updates;
                handles.push(s.spawn(move || {
                    let mut out = Vec::new();
                    for (i, mut f) in mine {
                        let u = &updates[i];
                        for &(a, b) in &u.chunks {
                            f.feed(a, &u.values[a as usize..b as usize]).unwrap();
                        }
                        let t = f.finish().unwrap();
                        if u.fate == Fate::Refused {
                            assert!(remove(t.retract(), u));
                        } else {
                            out.push(t);
                        }
                    }
                    out
                }));
            }
            for h in handles {
                results.extend(h.join().unwrap());
            }
        });
        for t in &results {
            acc.count(t).unwrap();
        }
        assert_eq!(acc.close_tentative(), 0);
        let got = acc.finish().unwrap();
        assert_eq!(got.num_updates, 7);
        assert_eq!(
            bits(&got.delta),
            bits(&two_pass(&updates)),
            "{threads} threads"
        );
    }
}

/// The round ends while an update is half folded: the end waits for it;
/// taken out, the result is the counted-only one; left complete and
/// uncounted, the accumulator refuses to finish (the round rebuilds). A
/// fold that starts after the end writes nothing.
#[test]
fn round_end_during_a_half_applied_fold() {
    let mut rng = Rng(0x6A7E);
    let mut updates = make_updates(&mut rng, 2);
    updates[0].fate = Fate::Count;
    updates[1].fate = Fate::Refused;
    updates[1].num_examples = 3;
    updates[1].values.iter_mut().for_each(|v| {
        if v.is_nan() {
            *v = 0.0;
        }
    });
    for take_out in [true, false] {
        let mut acc = FedAvgAccumulator::new(spec(), FedAvgOptions::default());
        let u0 = &updates[0];
        let mut f0 = acc.tentative("s0", u0.num_examples).unwrap();
        for &(a, b) in &u0.chunks {
            f0.feed(a, &u0.values[a as usize..b as usize]).unwrap();
        }
        acc.count(&f0.finish().unwrap()).unwrap();
        let u1 = &updates[1];
        let mut f1 = acc.tentative("s1", u1.num_examples).unwrap();
        let half = u1.chunks.len() / 2;
        let (half_tx, half_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let left = std::thread::scope(|s| {
            s.spawn(move || {
                for &(a, b) in &u1.chunks[..half] {
                    f1.feed(a, &u1.values[a as usize..b as usize]).unwrap();
                }
                half_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                if take_out {
                    // It fails its check now: what was folded goes.
                    assert!(remove(f1.abandon(), u1));
                } else {
                    for &(a, b) in &u1.chunks[half..] {
                        f1.feed(a, &u1.values[a as usize..b as usize]).unwrap();
                    }
                    let t = f1.finish().unwrap();
                    // Too late to take out once the gate is closed: left
                    // uncounted.
                    drop(t);
                }
            });
            half_rx.recv().unwrap();
            let closer = s.spawn(|| acc.close_tentative());
            go_tx.send(()).unwrap();
            closer.join().unwrap()
        });
        // After the end, a new fold is refused at its first chunk.
        let mut late = acc.tentative("late", 5).unwrap();
        late.feed(0, &u0.values[..1000]).unwrap();
        assert_eq!(late.folded(), 0);
        drop(late);
        if take_out {
            assert_eq!(left, 0);
            let got = acc.finish().unwrap();
            let expected = two_pass(&updates);
            assert_eq!(bits(&got.delta), bits(&expected));
        } else {
            assert_eq!(left, 1);
            assert_eq!(
                acc.finish().unwrap_err(),
                AggregationError::Uncounted { uncounted: 1 }
            );
        }
    }
}
