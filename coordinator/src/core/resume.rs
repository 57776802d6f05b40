//! Resumable uploads: what the coordinator keeps of an upload whose
//! connection was lost part way, so that its site can send the rest
//! (protocol version >= [`fedlink_protocol::RESUME_VERSION`]).
//!
//! ```text
//!  upload cut after k records ──▶ keep(site, round, Interrupted{verifier, k, spool})
//!                                  (only for the open round, a site that may still report)
//!  ResumeUpload{same envelope} ──▶ take(site, round) ──▶ intake::verify_resume
//!                                  ──▶ UploadProgress{k records, bytes} ──▶ records k.. appended
//!  round closes / site may no longer report ──▶ prune: the kept spools are dropped
//! ```
//!
//! At most one interrupted upload is kept per (site, round), and only for
//! the open round: what is kept is bounded by the round's participants.
//! The kept verifier carries the blake3 state and byte count of exactly
//! the records in the spool, so the payload hash checked at the end still
//! covers the whole payload. Kept uploads live in memory: after a
//! coordinator restart the round reopens and its sites report again.
//!
//! `T` is the driver's handle on the spool (a path); this module does not
//! touch it.

use std::collections::BTreeMap;

use fedlink_protocol::{PayloadVerifier, RoundId, SiteId};

use crate::round::JobRunner;

/// An upload cut short: the verifier over the records received, their
/// number, and the driver's spool holding them (fsynced).
#[derive(Debug)]
pub struct Interrupted<T> {
    /// Hash and count of the payload bytes received.
    pub verifier: PayloadVerifier,
    /// Whole chunk records received and spooled.
    pub records: u64,
    /// The spool holding them.
    pub spool: T,
}

/// What became of an interrupted upload handed to [`Partials::keep`].
#[derive(Debug, PartialEq, Eq)]
pub enum Kept<T> {
    /// Kept for resumption; `replaced` is the spool of an older interrupted
    /// upload of the same site and round, no longer needed.
    Kept {
        /// The older spool to delete.
        replaced: Option<T>,
    },
    /// Not kept (the spool is to be deleted), and why.
    Dropped {
        /// The spool to delete.
        spool: T,
        /// Why it is not kept.
        why: String,
    },
}

/// The interrupted uploads kept for resumption, by (site, round).
#[derive(Debug)]
pub struct Partials<T> {
    map: BTreeMap<(SiteId, RoundId), Interrupted<T>>,
}

impl<T> Default for Partials<T> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<T> Partials<T> {
    /// None kept.
    pub fn new() -> Self {
        Self::default()
    }

    /// An upload of `site` was cut short. It is kept when the site may
    /// resume it: `resumable` (the site's protocol version has
    /// resumption), its round is the open one (`open_round`) and the round
    /// machine still expects the site's update in it.
    pub fn keep(
        &mut self,
        runner: &JobRunner,
        open_round: Option<RoundId>,
        site: &SiteId,
        resumable: bool,
        it: Interrupted<T>,
    ) -> Kept<T> {
        let round = it.verifier.header().round;
        let why = if !resumable {
            Some("the site's protocol version cannot resume uploads".to_owned())
        } else if open_round != Some(round) {
            Some(format!("round {round} is no longer open"))
        } else if let Err(r) = runner.check_upload(site, round) {
            Some(crate::core::intake::reason_text(&r))
        } else {
            None
        };
        match why {
            Some(why) => Kept::Dropped {
                spool: it.spool,
                why,
            },
            None => {
                let replaced = self
                    .map
                    .insert((site.clone(), round), it)
                    .map(|old| old.spool);
                Kept::Kept { replaced }
            }
        }
    }

    /// The interrupted upload of `site` in `round`, taken out (a resume
    /// either continues it or ends it).
    pub fn take(&mut self, site: &SiteId, round: RoundId) -> Option<Interrupted<T>> {
        self.map.remove(&(site.clone(), round))
    }

    /// Drop what can no longer be resumed: uploads of another round than
    /// the open one, and of sites the round machine no longer expects an
    /// update from. Returns their spools, to delete.
    pub fn prune(&mut self, runner: &JobRunner, open_round: Option<RoundId>) -> Vec<T> {
        let stale: Vec<(SiteId, RoundId)> = self
            .map
            .keys()
            .filter(|(site, round)| {
                open_round != Some(*round) || runner.check_upload(site, *round).is_err()
            })
            .cloned()
            .collect();
        stale
            .into_iter()
            .filter_map(|k| self.map.remove(&k))
            .map(|it| it.spool)
            .collect()
    }

    /// Every kept upload's spool, emptying the set (the job ends).
    pub fn drain(&mut self) -> Vec<T> {
        std::mem::take(&mut self.map)
            .into_values()
            .map(|it| it.spool)
            .collect()
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use ed25519_dalek::SigningKey;
    use fedlink_protocol::{
        Encoding, ExpectedUpdate, FederationId, JobId, ModelHash, PROTOCOL_VERSION, PayloadHash,
        ReplayGuard, RoundId, SiteId, UpdateHeader, UpdateNonce, ValueCodec, sign_update,
        verify_update,
    };

    use crate::round::{ConnId, Input, RoundConfig, SiteCapabilities};

    const MODEL: ModelHash = ModelHash([3; 32]);

    /// A running job, round 1 open, sites `a` and `b` selected.
    fn runner() -> JobRunner {
        let cfg = RoundConfig {
            rounds: 2,
            seed: 1,
            fraction: 1.0,
            min_sites: 2,
            gather: Duration::ZERO,
            max_sites: 4,
            quorum: 2,
            deadline: Duration::from_secs(60),
            extension: Duration::ZERO,
            max_attempts: 1,
            evaluate_every: 0,
            allow: None,
        };
        let mut r = JobRunner::new(cfg, MODEL);
        for (i, s) in ["a", "b"].into_iter().enumerate() {
            r.handle(
                Instant::now(),
                Input::SiteConnected {
                    site: sid(s),
                    conn: ConnId(i as u64 + 1),
                    capabilities: SiteCapabilities::compatible(),
                },
            );
        }
        while r.poll_action().is_some() {}
        assert_eq!(r.selected_sites().len(), 2);
        r
    }

    /// A verifier of `site`'s update for `round` that has seen `bytes`.
    fn verifier(site: &str, round: u64, bytes: usize) -> PayloadVerifier {
        let key = SigningKey::from_bytes(&[7; 32]);
        let sid = SiteId::new(site).unwrap();
        let h = UpdateHeader {
            protocol_version: PROTOCOL_VERSION,
            federation_id: FederationId::new("fed").unwrap(),
            site_id: sid.clone(),
            job_id: JobId::new("job").unwrap(),
            round: RoundId(round),
            base_model: MODEL,
            num_examples: 10,
            encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
            payload_len: 100,
            payload_hash: PayloadHash([0; 32]),
            nonce: UpdateNonce([round as u8; 16]),
            metrics: None,
            feature_stats: None,
        };
        let env = sign_update(&key, h);
        let keys = BTreeMap::from([(sid, key.verifying_key())]);
        let want = ExpectedUpdate {
            federation_id: FederationId::new("fed").unwrap(),
            job_id: JobId::new("job").unwrap(),
            round: RoundId(round),
            base_model: MODEL,
            encoding: None,
            max_payload_len: 1000,
        };
        let mut v = verify_update(
            &env,
            &env.header.site_id,
            &keys,
            &want,
            &mut ReplayGuard::new(),
        )
        .unwrap();
        v.update(&vec![0u8; bytes]).unwrap();
        v
    }

    fn sid(site: &str) -> SiteId {
        SiteId::new(site).unwrap()
    }

    fn it(site: &str, round: u64, records: u64, spool: &'static str) -> Interrupted<&'static str> {
        Interrupted {
            verifier: verifier(site, round, records as usize * 10),
            records,
            spool,
        }
    }

    #[test]
    fn kept_for_the_open_round_of_a_site_that_may_still_report() {
        let r = runner();
        let mut p = Partials::new();
        assert_eq!(
            p.keep(&r, Some(RoundId(1)), &sid("a"), true, it("a", 1, 3, "a1")),
            Kept::Kept { replaced: None }
        );
        // A second cut of the same upload replaces the first: one kept
        // per (site, round).
        assert_eq!(
            p.keep(
                &r,
                Some(RoundId(1)),
                &sid("a"),
                true,
                it("a", 1, 5, "a1-again")
            ),
            Kept::Kept {
                replaced: Some("a1")
            }
        );
        assert_eq!(p.len(), 1);
        let kept = p.take(&sid("a"), RoundId(1)).unwrap();
        assert_eq!((kept.records, kept.spool), (5, "a1-again"));
        assert_eq!(kept.verifier.received(), 50);
        assert!(p.take(&sid("a"), RoundId(1)).is_none(), "taken once");
    }

    #[test]
    fn not_kept_when_it_cannot_be_resumed_and_the_reason_is_named() {
        let r = runner();
        let mut p = Partials::new();
        let dropped = |k: Kept<&'static str>| match k {
            Kept::Dropped { spool, why } => (spool, why),
            Kept::Kept { .. } => panic!("kept"),
        };
        let (spool, why) =
            dropped(p.keep(&r, Some(RoundId(1)), &sid("a"), false, it("a", 1, 1, "old")));
        assert_eq!(spool, "old");
        assert!(why.contains("protocol version"), "{why}");
        let (_, why) =
            dropped(p.keep(&r, Some(RoundId(2)), &sid("a"), true, it("a", 1, 1, "late")));
        assert!(why.contains("no longer open"), "{why}");
        let (_, why) = dropped(p.keep(
            &r,
            Some(RoundId(1)),
            &sid("zed"),
            true,
            it("zed", 1, 1, "stranger"),
        ));
        assert!(why.contains("unknown site"), "{why}");
        assert!(p.is_empty());
    }

    #[test]
    fn pruning_drops_what_the_round_no_longer_expects() {
        let r = runner();
        let mut p = Partials::new();
        p.keep(&r, Some(RoundId(1)), &sid("a"), true, it("a", 1, 1, "a1"));
        p.keep(&r, Some(RoundId(1)), &sid("b"), true, it("b", 1, 1, "b1"));
        assert!(
            p.prune(&r, Some(RoundId(1))).is_empty(),
            "both still expected"
        );
        let mut gone = p.prune(&r, Some(RoundId(2)));
        gone.sort_unstable();
        assert_eq!(gone, vec!["a1", "b1"], "round 1 closed");
        assert!(p.is_empty());
        p.keep(&r, Some(RoundId(1)), &sid("a"), true, it("a", 1, 1, "a1"));
        assert_eq!(p.drain(), vec!["a1"]);
    }
}
