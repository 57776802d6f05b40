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

use fedlink_protocol::PayloadVerifier;

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
    map: BTreeMap<(String, u64), Interrupted<T>>,
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
        open_round: Option<u64>,
        site: &str,
        resumable: bool,
        it: Interrupted<T>,
    ) -> Kept<T> {
        let round = it.verifier.header().round.0;
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
                    .insert((site.to_owned(), round), it)
                    .map(|old| old.spool);
                Kept::Kept { replaced }
            }
        }
    }

    /// The interrupted upload of `site` in `round`, taken out (a resume
    /// either continues it or ends it).
    pub fn take(&mut self, site: &str, round: u64) -> Option<Interrupted<T>> {
        self.map.remove(&(site.to_owned(), round))
    }

    /// Drop what can no longer be resumed: uploads of another round than
    /// the open one, and of sites the round machine no longer expects an
    /// update from. Returns their spools, to delete.
    pub fn prune(&mut self, runner: &JobRunner, open_round: Option<u64>) -> Vec<T> {
        let stale: Vec<(String, u64)> = self
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
