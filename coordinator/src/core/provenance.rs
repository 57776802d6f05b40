//! A model's provenance, walked: from the round that produced it back,
//! round by round, to its job's initial model — each round's record must
//! name the model the walk expects as its output, and its base model is
//! what the round before must have produced.
//!
//! The driver (`crate::server`'s admin session, `provenance`) reads the
//! round records from its store through the closure [`walk`] takes and
//! builds the answer's steps (with each update's envelope signature) from
//! the records the walk returns.
//!
//! ```text
//!  model M of job J, produced by round N
//!  round N:   record? ── none ──▶ Missing      output == M? ── no ──▶ NotProduced
//!     │ want = base(N)
//!  round N-1: …                          (rounds strictly decrease: at most N records read)
//!  round 1:   want = base(1)
//!     ▼
//!  want == J's initial model? ── no ──▶ WrongStart
//!  the records, oldest first
//! ```

use fedlink_protocol::{ModelHash, RoundId};

/// What the walk reads of a round's record.
pub trait RoundLink {
    /// The model the round produced (`None`: it produced none).
    fn output(&self) -> Option<ModelHash>;
    /// The model the round started from.
    fn base(&self) -> ModelHash;
}

/// One round of a model's chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Link<R> {
    /// The round.
    pub round: RoundId,
    /// The model it produced (its record's output, as the walk checked).
    pub output: ModelHash,
    /// Its record.
    pub record: R,
}

/// Why a model's chain cannot be given. The texts are the admin's error
/// (an internal one: the store contradicts itself or cannot be read).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainBroken<E> {
    /// Reading a round's record failed.
    #[error("{0}")]
    Read(E),
    /// A round on the chain has no record.
    #[error("job {job} has no round {round} record")]
    Missing {
        /// The job.
        job: String,
        /// The round.
        round: RoundId,
    },
    /// A round's record names another output than the model the walk
    /// expects.
    #[error("round {round} of job {job} did not produce {want}")]
    NotProduced {
        /// The job.
        job: String,
        /// The round.
        round: RoundId,
        /// The model expected.
        want: ModelHash,
    },
    /// Round 1's base model is not the job's initial model.
    #[error("the chain ends at {end}, not at the job's initial model {initial}")]
    WrongStart {
        /// Where the walk ended.
        end: ModelHash,
        /// The job's initial model.
        initial: ModelHash,
    },
}

/// Walk the chain of `model`, produced by round `round` of `job` whose
/// initial model is `initial`, reading round `r`'s record with `record`
/// (rounds `round`, `round - 1`, …, 1: each once). Returns the rounds, the
/// models they produced and their records, oldest first; round 0 (the initial model itself) has an
/// empty chain.
pub fn walk<R: RoundLink, E>(
    job: &str,
    model: ModelHash,
    round: RoundId,
    initial: ModelHash,
    mut record: impl FnMut(RoundId) -> Result<Option<R>, E>,
) -> Result<Vec<Link<R>>, ChainBroken<E>> {
    let mut chain = Vec::new();
    let mut want = model;
    for r in (1..=round.0).rev().map(RoundId) {
        let rec = record(r)
            .map_err(ChainBroken::Read)?
            .ok_or_else(|| ChainBroken::Missing {
                job: job.to_owned(),
                round: r,
            })?;
        if rec.output() != Some(want) {
            return Err(ChainBroken::NotProduced {
                job: job.to_owned(),
                round: r,
                want,
            });
        }
        let base = rec.base();
        chain.push(Link {
            round: r,
            output: want,
            record: rec,
        });
        want = base;
    }
    if want != initial {
        return Err(ChainBroken::WrongStart { end: want, initial });
    }
    chain.reverse();
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug, PartialEq)]
    struct Rec {
        base: ModelHash,
        output: Option<ModelHash>,
    }

    impl RoundLink for Rec {
        fn output(&self) -> Option<ModelHash> {
            self.output
        }
        fn base(&self) -> ModelHash {
            self.base
        }
    }

    fn m(n: u8) -> ModelHash {
        ModelHash([n; 32])
    }

    /// Rounds 1..=n, round r turning m(r-1) into m(r).
    fn store(n: u8) -> BTreeMap<RoundId, Rec> {
        (1..=n)
            .map(|r| {
                (
                    RoundId(u64::from(r)),
                    Rec {
                        base: m(r - 1),
                        output: Some(m(r)),
                    },
                )
            })
            .collect()
    }

    fn read(s: &BTreeMap<RoundId, Rec>) -> impl FnMut(RoundId) -> Result<Option<Rec>, String> + '_ {
        |r| Ok(s.get(&r).cloned())
    }

    #[test]
    fn a_chain_runs_back_to_the_initial_model_oldest_first() {
        let s = store(3);
        let mut asked = Vec::new();
        let chain = walk("j", m(3), RoundId(3), m(0), |r| {
            asked.push(r);
            Ok::<_, String>(s.get(&r).cloned())
        })
        .unwrap();
        assert_eq!(asked, [RoundId(3), RoundId(2), RoundId(1)]);
        let rounds: Vec<(RoundId, ModelHash)> = chain.iter().map(|l| (l.round, l.output)).collect();
        assert_eq!(
            rounds,
            [(RoundId(1), m(1)), (RoundId(2), m(2)), (RoundId(3), m(3))]
        );
        assert_eq!(chain[0].record.base, m(0));
    }

    #[test]
    fn the_initial_model_has_an_empty_chain() {
        let s = store(0);
        assert_eq!(walk("j", m(0), RoundId(0), m(0), read(&s)).unwrap(), vec![]);
        assert_eq!(
            walk("j", m(9), RoundId(0), m(0), read(&s)).unwrap_err(),
            ChainBroken::WrongStart {
                end: m(9),
                initial: m(0)
            }
        );
    }

    #[test]
    fn a_missing_record_breaks_the_chain() {
        let mut s = store(3);
        s.remove(&RoundId(2));
        let e = walk("j", m(3), RoundId(3), m(0), read(&s)).unwrap_err();
        assert_eq!(e.to_string(), "job j has no round 2 record");
    }

    #[test]
    fn a_round_that_produced_another_model_breaks_the_chain() {
        let s = store(3);
        let e = walk("j", m(7), RoundId(3), m(0), read(&s)).unwrap_err();
        assert_eq!(
            e,
            ChainBroken::NotProduced {
                job: "j".into(),
                round: RoundId(3),
                want: m(7)
            }
        );
        assert_eq!(
            e.to_string(),
            format!("round 3 of job j did not produce {}", m(7))
        );
        // A round that produced nothing.
        let mut s = store(2);
        s.get_mut(&RoundId(1)).unwrap().output = None;
        assert!(matches!(
            walk("j", m(2), RoundId(2), m(0), read(&s)),
            Err(ChainBroken::NotProduced {
                round: RoundId(1),
                ..
            })
        ));
    }

    #[test]
    fn a_chain_that_starts_elsewhere_is_refused() {
        let s = store(2);
        let e = walk("j", m(2), RoundId(2), m(5), read(&s)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the chain ends at {}, not at the job's initial model {}",
                m(0),
                m(5)
            )
        );
    }

    #[test]
    fn a_read_error_is_passed_on_and_stops_the_walk() {
        let mut asked = 0;
        let e = walk::<Rec, _>("j", m(3), RoundId(3), m(0), |_| {
            asked += 1;
            Err("disk on fire".to_owned())
        })
        .unwrap_err();
        assert_eq!(e, ChainBroken::Read("disk on fire".into()));
        assert_eq!(asked, 1);
    }

    #[test]
    fn a_self_referencing_record_cannot_loop() {
        // Every round claims to turn m(1) into m(1): the walk still reads
        // each round once and stops at round 1.
        let s: BTreeMap<RoundId, Rec> = (1..=4)
            .map(|r| {
                (
                    RoundId(r),
                    Rec {
                        base: m(1),
                        output: Some(m(1)),
                    },
                )
            })
            .collect();
        let mut asked = 0;
        let e = walk("j", m(1), RoundId(4), m(0), |r| {
            asked += 1;
            Ok::<_, String>(s.get(&r).cloned())
        })
        .unwrap_err();
        assert_eq!(asked, 4);
        assert!(matches!(e, ChainBroken::WrongStart { .. }));
    }
}
