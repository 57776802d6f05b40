//! One decode per update: check and fold in the same pass, *tentatively*.
//!
//! The two-pass path ([`crate::UpdateValidator`], then
//! [`crate::RoundAggregator::begin`]) decodes every update twice: once to
//! check it, once to fold it. For a streaming mean without clipping nothing
//! in an update's fold depends on the whole update (the clip scale is 1), so
//! a [`TentativeFold`] checks each chunk (finite, within bounds, in order)
//! and folds it into the round's accumulator at once. The accumulator is
//! exact integer arithmetic ([`crate::fedavg`]): a contribution can be taken
//! out again exactly — the same integers, subtracted — so an update that is
//! not counted in the end (its whole-update checks fail, or the round machine
//! refuses it) leaves the accumulator bit-identical to never having folded
//! it, whatever else was folded meanwhile.
//!
//! # Life of a contribution
//! ```text
//!  tentative() ─► feed(chunk)… ─► finish() ─► Tentative ─► count (ack)
//!                     │               │           └─────► retract() ─► Removal ─► chunk… ─► done()
//!                     └─ error ───────┴─► Removal ─► chunk(same chunks again)… ─► done()
//! ```
//! Each contribution is *active* from its first fold until it is complete
//! ([`TentativeFold::finish`]) or removed ([`Removal::done`]); a complete
//! one is *uncounted* until the round counts it
//! ([`crate::RoundAggregator::count`]) or it is retracted.
//!
//! # The gate
//! Several uploads fold at once while the round may end. Each block of the
//! accumulator has its own lock (a chunk touches one or two blocks; no
//! atomics per element). The round's end *closes the gate*: it waits until
//! no contribution is active (each folds at most one more upload's decode),
//! after which no fold or removal writes any more (a contribution not yet
//! started is refused and its upload goes the two-pass way, or is refused
//! as late). [`crate::FedAvgAccumulator::finish`] then refuses to publish
//! while any contribution is neither counted nor removed
//! ([`crate::AggregationError::Uncounted`]): the caller rebuilds the round
//! from its counted updates instead. A removal that is dropped unfinished
//! leaves its contribution uncounted, never half-removed and forgotten.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use fedlink_protocol::payload::CheckedChunk;

use crate::error::{AggregationError, UpdateError};
use crate::fedavg::{Block, add_chunk};
use crate::validate::{UpdateValidator, ValidatedUpdate};

#[derive(Debug, Default)]
struct Gate {
    closed: bool,
    /// Contributions folding or being removed right now.
    active: usize,
    next_ticket: u64,
    /// Contributions with values in the blocks that are neither counted
    /// nor removed (active or complete).
    uncounted: BTreeSet<u64>,
}

/// The accumulator's blocks and the gate, shared between the round and the
/// uploads folding into it.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) n: u64,
    pub(crate) blocks: Vec<Mutex<Block>>,
    gate: Mutex<Gate>,
    settled: Condvar,
}

/// What closing the gate left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Left {
    pub(crate) uncounted: usize,
}

impl Shared {
    pub(crate) fn new(id: u64, n: u64, blocks: Vec<Mutex<Block>>) -> Self {
        Self {
            id,
            n,
            blocks,
            gate: Mutex::new(Gate::default()),
            settled: Condvar::new(),
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Register a new active contribution; `None` once the gate is closed.
    fn enter(&self) -> Option<u64> {
        let mut g = self.gate();
        if g.closed {
            return None;
        }
        let t = g.next_ticket;
        g.next_ticket += 1;
        g.active += 1;
        g.uncounted.insert(t);
        Some(t)
    }

    /// Make an uncounted, complete contribution active again (to remove
    /// it); false if the gate is closed or it is not uncounted.
    fn reenter(&self, ticket: u64) -> bool {
        let mut g = self.gate();
        if g.closed || !g.uncounted.contains(&ticket) {
            return false;
        }
        g.active += 1;
        true
    }

    /// An active contribution settles: complete (`removed == false`) or
    /// taken out whole.
    fn settle(&self, ticket: u64, removed: bool) {
        let mut g = self.gate();
        g.active = g.active.saturating_sub(1);
        if removed {
            g.uncounted.remove(&ticket);
        }
        drop(g);
        self.settled.notify_all();
    }

    /// Count a complete contribution: it leaves the uncounted set.
    fn count(&self, ticket: u64) -> bool {
        let mut g = self.gate();
        !g.closed && g.uncounted.remove(&ticket)
    }

    /// Close the gate: wait until nothing is active; from then on nothing
    /// writes the blocks. Idempotent.
    pub(crate) fn close(&self) -> Left {
        let mut g = self.gate();
        g.closed = true;
        while g.active > 0 {
            g = self.settled.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        Left {
            uncounted: g.uncounted.len(),
        }
    }
}

/// One update's single pass: each chunk is checked, then folded. Made by
/// [`crate::RoundAggregator::tentative`] (streaming mean, no clipping).
#[derive(Debug)]
pub struct TentativeFold {
    shared: Arc<Shared>,
    /// `None` only once consumed by `finish`.
    validator: Option<UpdateValidator>,
    c: f64,
    /// `None`: nothing folded yet; `Some(None)`: the gate was closed at the
    /// first chunk, so nothing is folded (the update is only checked).
    ticket: Option<Option<u64>>,
    folded: u64,
}

impl TentativeFold {
    pub(crate) fn new(shared: Arc<Shared>, validator: UpdateValidator, c: f64) -> Self {
        Self {
            shared,
            validator: Some(validator),
            c,
            ticket: None,
            folded: 0,
        }
    }

    /// Site of the update.
    pub fn site(&self) -> &str {
        self.validator.as_ref().map_or("", UpdateValidator::site)
    }

    /// Check the next chunk (as [`UpdateValidator::feed`]) and, if it
    /// passes, fold it. On an error nothing of this chunk is folded; take
    /// out what was with [`Self::abandon`].
    pub fn feed(&mut self, offset: u64, values: &[f32]) -> Result<(), UpdateError> {
        let Some(validator) = self.validator.as_mut() else {
            return Ok(());
        };
        validator.feed(offset, values)?;
        self.fold(offset, values);
        Ok(())
    }

    /// [`Self::feed`] for a chunk the payload decoder checked (see
    /// [`UpdateValidator::feed_checked`]: no second finiteness scan).
    pub fn feed_checked(&mut self, chunk: CheckedChunk<'_>) -> Result<(), UpdateError> {
        let Some(validator) = self.validator.as_mut() else {
            return Ok(());
        };
        validator.feed_checked(chunk)?;
        self.fold(chunk.offset(), chunk.values());
        Ok(())
    }

    fn fold(&mut self, offset: u64, values: &[f32]) {
        let ticket = *self.ticket.get_or_insert_with(|| self.shared.enter());
        if ticket.is_some() {
            let s = &self.shared;
            self.folded += add_chunk(&s.blocks, s.n, offset, values, self.c, false);
        }
    }

    /// Values folded so far (from element 0, contiguous).
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// The whole-update checks. `Ok`: the update is complete and valid,
    /// its values are in the accumulator, uncounted until the round counts
    /// it. `Err`: the error, and the removal of what was folded.
    pub fn finish(mut self) -> Result<Tentative, Box<(UpdateError, Removal)>> {
        let ticket = self.ticket.take().flatten();
        let removal = |this: &Self| Removal {
            shared: this.shared.clone(),
            ticket,
            c: this.c,
            folded: this.folded,
            removed: 0,
            done: false,
        };
        let Some(validator) = self.validator.take() else {
            return Err(Box::new((
                UpdateError::ZeroExamples {
                    site: String::new(),
                },
                removal(&self),
            )));
        };
        match validator.finish() {
            Ok(token) => {
                if let Some(t) = ticket {
                    self.shared.settle(t, false);
                }
                Ok(Tentative {
                    shared: self.shared.clone(),
                    ticket,
                    c: self.c,
                    token,
                })
            }
            Err(e) => Err(Box::new((e, removal(&self)))),
        }
    }

    /// Give up on the update (a chunk failed its check, or could not be
    /// read): the removal of what was folded.
    pub fn abandon(mut self) -> Removal {
        let ticket = self.ticket.take().flatten();
        Removal {
            shared: self.shared.clone(),
            ticket,
            c: self.c,
            folded: self.folded,
            removed: 0,
            done: false,
        }
    }
}

impl Drop for TentativeFold {
    fn drop(&mut self) {
        // Dropped while active without `finish`/`abandon` (a panic): the
        // contribution stays uncounted (the round then rebuilds), and the
        // gate no longer waits for it.
        if let Some(Some(t)) = self.ticket.take() {
            self.shared.settle(t, false);
        }
    }
}

/// An update checked and folded whole, not yet counted: count it with
/// [`crate::RoundAggregator::count`] or take it out with [`Self::retract`].
/// Dropping it leaves it uncounted (the round then rebuilds from its
/// counted updates).
#[derive(Debug)]
pub struct Tentative {
    shared: Arc<Shared>,
    /// `None`: the gate was closed before the first chunk; nothing folded.
    ticket: Option<u64>,
    c: f64,
    token: ValidatedUpdate,
}

impl Tentative {
    /// The validated update's token.
    pub fn token(&self) -> &ValidatedUpdate {
        &self.token
    }

    /// Whether its values are in the accumulator (false if the round's
    /// gate had closed before its first chunk).
    pub fn is_folded(&self) -> bool {
        self.ticket.is_some()
    }

    /// Count it: its values leave the uncounted set; the caller then adds
    /// its weight. An error if it belongs to another accumulator, is not
    /// folded, or the gate is closed.
    pub(crate) fn count(&self, acc_id: u64) -> Result<(), AggregationError> {
        let counted = self.shared.id == acc_id
            && self.token.clip_scale == 1.0
            && self.ticket.is_some_and(|t| self.shared.count(t));
        if counted {
            Ok(())
        } else {
            Err(AggregationError::ForeignToken {
                site: self.token.site.clone(),
            })
        }
    }

    /// Take it out of the accumulator: feed the removal the same chunks
    /// again. If the gate is closed the removal does nothing (the round
    /// has already been rebuilt, or finished refusing it).
    pub fn retract(self) -> Removal {
        let ticket = self.ticket.filter(|&t| self.shared.reenter(t));
        Removal {
            shared: self.shared.clone(),
            ticket,
            c: self.c,
            folded: if ticket.is_some() {
                self.token.num_params
            } else {
                0
            },
            removed: 0,
            done: false,
        }
    }
}

/// Taking a contribution out: feed it the chunks that were folded (the
/// same values at the same offsets, in order), then [`Self::done`]. Only
/// elements below [`Self::folded`] are subtracted.
#[derive(Debug)]
pub struct Removal {
    shared: Arc<Shared>,
    /// `None`: nothing to remove.
    ticket: Option<u64>,
    c: f64,
    folded: u64,
    removed: u64,
    done: bool,
}

impl Removal {
    /// Elements to take out (from element 0).
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Whether every folded element has been taken out.
    pub fn is_complete(&self) -> bool {
        self.removed >= self.folded
    }

    /// Subtract the chunk starting at `offset` (must continue where the
    /// last one ended); anything past [`Self::folded`] is ignored.
    pub fn chunk(&mut self, offset: u64, values: &[f32]) {
        if self.ticket.is_none() || offset != self.removed || self.removed >= self.folded {
            return;
        }
        let take = (self.folded - self.removed).min(values.len() as u64) as usize;
        let s = &self.shared;
        self.removed += add_chunk(&s.blocks, s.n, offset, &values[..take], self.c, true);
    }

    /// Finish: the contribution is gone if every folded element was taken
    /// out; otherwise it stays uncounted (the round then rebuilds). Returns
    /// whether it is gone.
    pub fn done(mut self) -> bool {
        self.settle()
    }

    fn settle(&mut self) -> bool {
        if self.done {
            return self.removed >= self.folded;
        }
        self.done = true;
        let complete = self.removed >= self.folded;
        if let Some(t) = self.ticket {
            self.shared.settle(t, complete);
        }
        complete
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        self.settle();
    }
}
