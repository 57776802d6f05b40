//! Upload intake, after the payload: an upload received whole waits here
//! while the round machine decides on it, then is counted or refused; an
//! upload cut short is kept for a resume or dropped.
//!
//! ```text
//!  connection task: payload spooled, pass 1 (check, or check and fold)
//!    ──▶ arrived(upload, pass 1, site still allowed?)
//!          ├─▶ an older upload of the same (site, round) waiting: refused (superseded, Replay)
//!          └─▶ Input::UpdateReceived{verdict} ──▶ round machine
//!  AckUpdate    ──▶ acked: Fold::Count (folded in its one pass) | Fold::Decode (pass 2)
//!                   | Fold::Refuse (no usable check) ──▶ [driver: fold, archive]
//!                   ──▶ accepted (update.received, round record, Ack) | fold_failed
//!  RejectUpdate ──▶ rejected: update.received (refused), round record,
//!                   RetractFold (a one-pass fold), spool dropped, the answer
//!  none of both once the machine's actions are done ──▶ undecided: the same, Internal
//!  cut short    ──▶ interrupted: kept for a resume (Partials) or dropped; update.interrupted
//! ```
//!
//! `T` is the driver's handle on a waiting upload (its spool, pass 1's
//! token, its uncounted fold, the site's answer channel); this module only
//! hands it back with what to do. The effects follow [`Effect`]'s rule:
//! the audit append first.

use std::collections::BTreeMap;

use fedlink_protocol::envelope::{PayloadVerifier, SignedEnvelope};
use fedlink_protocol::message::RejectCode;
use fedlink_protocol::{EvalMetrics, ModelHash, PayloadHash, RoundId, SiteId};

use super::Effect;
use super::actions::{self, Interruption, JobFacts, UploadFacts};
use super::intake::{reason_text, reject_code};
use super::registry::NotAllowed;
use super::resume::{Interrupted, Kept, Partials};
use crate::round::{JobRunner, RejectReason, UpdateReceived, Verdict};

/// What a superseded upload is told.
pub const SUPERSEDED: &str = "superseded by another upload of this site for this round";

/// What an upload the round machine left undecided is told.
pub const UNDECIDED: &str = "the coordinator did not decide on this upload";

/// What an acknowledged upload without a usable pass 1 is refused with
/// (the round machine acknowledged an invalid update).
pub const NO_TOKEN: &str = "update has no validation token";

/// An upload received whole: the facts of its signed header that its
/// decision needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival {
    /// Its site (the connection's identity, which its header names).
    pub site: SiteId,
    /// The round its header names.
    pub round: RoundId,
    /// The model it was trained on.
    pub base_model: ModelHash,
    /// blake3 of its payload.
    pub payload_hash: PayloadHash,
    /// How long receiving the payload took (milliseconds).
    pub upload_ms: u64,
    /// The evaluation metrics its header carries.
    pub metrics: Option<EvalMetrics>,
    /// What the audit log and the round's record say of it.
    pub facts: UploadFacts,
}

impl Arrival {
    /// The upload of `envelope`, `bytes` of payload received in
    /// `upload_ms`.
    pub fn of(envelope: &SignedEnvelope, bytes: u64, upload_ms: u64) -> Self {
        let h = &envelope.header;
        Self {
            site: h.site_id.clone(),
            round: h.round,
            base_model: h.base_model,
            payload_hash: h.payload_hash,
            upload_ms,
            metrics: h.metrics.clone(),
            facts: UploadFacts::of(envelope, bytes),
        }
    }
}

/// What pass 1 (the connection task's decode of the spool) found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassOne {
    /// The update is valid; `folded`: its one-pass fold is in the round's
    /// accumulator, uncounted (the ack counts it, a refusal takes it out).
    Valid {
        /// Folded already.
        folded: bool,
    },
    /// The update is invalid, and why.
    Invalid(String),
}

/// How an acknowledged update is folded into its round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fold {
    /// Folded in its one pass already: count it (no decode).
    Count,
    /// Pass 2: decode the spool again with pass 1's token and fold it.
    Decode,
    /// It cannot be folded (no valid pass 1, or its site was no longer
    /// allowed): refuse it as [`fold_failed`] with this reason.
    Refuse(&'static str),
}

/// An upload that will not be counted: the driver's handle and what to do,
/// in order.
#[derive(Debug)]
pub struct Refused<T> {
    /// Its site.
    pub site: SiteId,
    /// The round its header names.
    pub round: RoundId,
    /// The driver's handle.
    pub upload: T,
    /// Its refusal on record, in its round's record, its one-pass fold
    /// taken out, its spool dropped, its site answered.
    pub effects: Vec<Effect>,
}

/// An upload handed to [`Uploads::arrived`].
#[derive(Debug)]
pub struct Arrived<T> {
    /// An older upload of the same site and round that was still waiting:
    /// refused as superseded (the round machine decides on the newer).
    pub superseded: Option<Refused<T>>,
    /// For the round machine (`Input::UpdateReceived`).
    pub input: UpdateReceived,
}

/// An upload the round machine acknowledged, taken out of the waiting ones.
#[derive(Debug)]
pub struct Acked<T> {
    /// The driver's handle.
    pub upload: T,
    /// The upload.
    pub arrival: Arrival,
    /// How it is folded.
    pub fold: Fold,
}

#[derive(Debug)]
struct Waiting<T> {
    arrival: Arrival,
    /// Pass 1 valid and its site allowed when it arrived: it may be folded.
    usable: bool,
    /// Folded in its one pass, uncounted.
    folded: bool,
    upload: T,
}

/// The uploads received whole that the round machine has not decided on,
/// at most one per (site, round).
#[derive(Debug)]
pub struct Uploads<T> {
    waiting: BTreeMap<(SiteId, RoundId), Waiting<T>>,
}

impl<T> Default for Uploads<T> {
    fn default() -> Self {
        Self {
            waiting: BTreeMap::new(),
        }
    }
}

impl<T> Uploads<T> {
    /// None waiting.
    pub fn new() -> Self {
        Self::default()
    }

    /// An upload arrived whole and went through pass 1. `allowed`: whether
    /// its site may still contribute now (it may have been revoked or
    /// removed while its upload was received and checked): if not, its
    /// update is invalid whatever its signature says. It waits for the
    /// round machine's decision on the returned input; an older upload of
    /// the same site and round that still waits is refused (`Replay`).
    pub fn arrived(
        &mut self,
        facts: &JobFacts,
        arrival: Arrival,
        pass: PassOne,
        allowed: Result<(), NotAllowed>,
        upload: T,
        received_unix_ms: u64,
    ) -> Arrived<T> {
        let (verdict, usable, folded) = match (allowed, pass) {
            (Err(why), PassOne::Valid { folded }) => (
                Verdict::Invalid(format!("the site is no longer allowed: {why}")),
                false,
                folded,
            ),
            (Err(why), PassOne::Invalid(_)) => (
                Verdict::Invalid(format!("the site is no longer allowed: {why}")),
                false,
                false,
            ),
            (Ok(()), PassOne::Valid { folded }) => (Verdict::Valid, true, folded),
            (Ok(()), PassOne::Invalid(why)) => (Verdict::Invalid(why), false, false),
        };
        let input = UpdateReceived {
            site: arrival.site.clone(),
            round: arrival.round,
            base_model: arrival.base_model,
            payload_hash: ModelHash(arrival.payload_hash.0),
            num_examples: arrival.facts.num_examples,
            bytes: arrival.facts.bytes,
            received_unix_ms,
            verdict,
        };
        let key = (arrival.site.clone(), arrival.round);
        let superseded = self
            .waiting
            .insert(
                key,
                Waiting {
                    arrival,
                    usable,
                    folded,
                    upload,
                },
            )
            .map(|old| refuse(facts, old, SUPERSEDED, RejectCode::Replay, received_unix_ms));
        Arrived { superseded, input }
    }

    /// The round machine acknowledged the update of `site` in `round`:
    /// taken out, with how to fold it. `None`: no such upload waits.
    pub fn acked(&mut self, site: &SiteId, round: RoundId) -> Option<Acked<T>> {
        let w = self.waiting.remove(&(site.clone(), round))?;
        let fold = match (w.usable, w.folded) {
            (false, _) => Fold::Refuse(NO_TOKEN),
            (true, true) => Fold::Count,
            (true, false) => Fold::Decode,
        };
        Some(Acked {
            upload: w.upload,
            arrival: w.arrival,
            fold,
        })
    }

    /// The round machine refused the update of `site` in `round` for
    /// `reason`: taken out and refused with its code. `None`: no such
    /// upload waits.
    pub fn rejected(
        &mut self,
        facts: &JobFacts,
        site: &SiteId,
        round: RoundId,
        reason: &RejectReason,
        at_unix_ms: u64,
    ) -> Option<Refused<T>> {
        let w = self.waiting.remove(&(site.clone(), round))?;
        Some(refuse(
            facts,
            w,
            &reason_text(reason),
            reject_code(reason),
            at_unix_ms,
        ))
    }

    /// Every upload still waiting once the round machine's actions are
    /// done, refused (`Internal`): none may hang its site. (The round
    /// machine decides on every update it is given; this is the guard.)
    pub fn undecided(&mut self, facts: &JobFacts, at_unix_ms: u64) -> Vec<Refused<T>> {
        std::mem::take(&mut self.waiting)
            .into_values()
            .map(|w| refuse(facts, w, UNDECIDED, RejectCode::Internal, at_unix_ms))
            .collect()
    }

    /// The driver's handle on the waiting upload of `site` in `round`.
    pub fn get(&self, site: &SiteId, round: RoundId) -> Option<&T> {
        self.waiting.get(&(site.clone(), round)).map(|w| &w.upload)
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// A waiting upload refused: [`actions::reject_pending`]'s effects, with
/// its one-pass fold taken out after the refusal is on record and before
/// its spool (which the removal decodes again) is dropped.
fn refuse<T>(
    facts: &JobFacts,
    w: Waiting<T>,
    why: &str,
    code: RejectCode,
    at_unix_ms: u64,
) -> Refused<T> {
    let mut effects = actions::reject_pending(
        facts,
        &w.arrival.site,
        &w.arrival.facts,
        why,
        code,
        at_unix_ms,
    );
    if w.folded {
        let at = effects
            .iter()
            .position(|e| matches!(e, Effect::DiscardSpool { .. }))
            .unwrap_or(effects.len());
        effects.insert(
            at,
            Effect::RetractFold {
                site: w.arrival.site.clone(),
                round: w.arrival.round,
            },
        );
    }
    Refused {
        site: w.arrival.site,
        round: w.arrival.round,
        upload: w.upload,
        effects,
    }
}

/// An acknowledged update folded and archived by the driver: its
/// acceptance on record, its details in the round's record, its site's
/// acknowledgement ([`actions::accept_upload`]).
pub fn accepted(facts: &JobFacts, arrival: &Arrival, at_unix_ms: u64) -> Vec<Effect> {
    actions::accept_upload(
        facts,
        &arrival.site,
        &arrival.facts,
        arrival.payload_hash,
        arrival.upload_ms,
        arrival.metrics.clone(),
        at_unix_ms,
    )
}

/// An acknowledged update that could not be folded (`why`): refused on
/// record and answered as an internal error; its spool is kept
/// ([`actions::fold_failed`]).
pub fn fold_failed(facts: &JobFacts, arrival: &Arrival, why: &str, at_unix_ms: u64) -> Vec<Effect> {
    actions::fold_failed(facts, &arrival.site, &arrival.facts, why, at_unix_ms)
}

/// What arrived of an upload before its connection was lost (or its site
/// stalled).
#[derive(Debug)]
pub struct Cut<T> {
    /// Hash and count of the payload bytes of the whole records received.
    pub verifier: PayloadVerifier,
    /// Those records.
    pub records: u64,
    /// The spool holding them, fsynced (`None`: they could not be made
    /// durable).
    pub spool: Option<T>,
    /// Whether the site's protocol version can resume.
    pub resumable: bool,
    /// For its `update.interrupted` entry.
    pub what: Interruption,
}

/// What becomes of an upload cut short ([`interrupted`]).
#[derive(Debug)]
pub struct CutShort<T> {
    /// Spools to delete: the cut upload's if it is not kept, or an older
    /// kept upload of the same site and round it replaces.
    pub discard: Vec<T>,
    /// Why it is not kept for a resume (`None`: kept).
    pub not_kept: Option<String>,
    /// Its `update.interrupted` entry.
    pub effects: Vec<Effect>,
}

/// An upload of `site` (its signed `envelope`) was cut short: kept in
/// `partials` for the site to resume when it may
/// ([`Partials::keep`]: resumable, its round open, the site still
/// expected), dropped otherwise; on record either way.
pub fn interrupted<T>(
    partials: &mut Partials<T>,
    runner: &JobRunner,
    open_round: Option<RoundId>,
    facts: &JobFacts,
    site: &SiteId,
    envelope: &SignedEnvelope,
    cut: Cut<T>,
) -> CutShort<T> {
    let kept = match cut.spool {
        Some(spool) => partials.keep(
            runner,
            open_round,
            site,
            cut.resumable,
            Interrupted {
                verifier: cut.verifier,
                records: cut.records,
                spool,
            },
        ),
        None => {
            let why = "the received records could not be made durable".to_owned();
            let effects = actions::upload_interrupted(facts, site, envelope, &cut.what, Err(&why));
            return CutShort {
                discard: Vec::new(),
                not_kept: Some(why),
                effects,
            };
        }
    };
    let (discard, not_kept) = match kept {
        Kept::Kept { replaced } => (replaced.into_iter().collect(), None),
        Kept::Dropped { spool, why } => (vec![spool], Some(why)),
    };
    let effects = actions::upload_interrupted(
        facts,
        site,
        envelope,
        &cut.what,
        not_kept.as_deref().map_or(Ok(()), Err),
    );
    CutShort {
        discard,
        not_kept,
        effects,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn sid(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    use std::time::{Duration, Instant};

    use fedlink_audit::CoordEvent;
    use fedlink_protocol::envelope::UpdateHeader;
    use fedlink_protocol::message::UploadResult;
    use fedlink_protocol::{
        Encoding, FederationId, JobId, PROTOCOL_VERSION, UpdateNonce, ValueCodec, sign_update,
    };

    use crate::round::{Action, ConnId, Input, RoundConfig, SiteCapabilities};

    const MODEL: ModelHash = ModelHash([3; 32]);

    /// A running job whose round 1 is open with `sites` selected, each of
    /// which must report (quorum: all).
    fn runner(sites: &[&str]) -> (JobRunner, Instant) {
        runner_with_quorum(sites, sites.len() as u32)
    }

    /// A round of `sites`, all selected, that may close at its deadline
    /// with `quorum` of them.
    fn runner_with_quorum(sites: &[&str], quorum: u32) -> (JobRunner, Instant) {
        let now = Instant::now();
        let cfg = RoundConfig {
            rounds: 2,
            seed: 1,
            fraction: 1.0,
            min_sites: sites.len() as u32,
            gather: Duration::ZERO,
            max_sites: 4,
            quorum,
            deadline: Duration::from_secs(60),
            extension: Duration::ZERO,
            max_attempts: 1,
            evaluate_every: 0,
            allow: None,
        };
        let mut runner = JobRunner::new(cfg, MODEL);
        for (i, site) in sites.iter().enumerate() {
            runner.handle(
                now,
                Input::SiteConnected {
                    site: sid(site),
                    conn: ConnId(i as u64 + 1),
                    capabilities: SiteCapabilities::compatible(),
                },
            );
        }
        while runner.poll_action().is_some() {}
        assert_eq!(runner.selected_sites().len(), sites.len());
        (runner, now)
    }

    fn facts() -> JobFacts {
        JobFacts {
            federation: FederationId::new("fed").unwrap(),
            job: JobId::new("job-1").unwrap(),
            actor: "urn:fedlink:coordinator".into(),
        }
    }

    fn envelope(site: &str, round: u64, nonce: u8) -> SignedEnvelope {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        sign_update(
            &key,
            UpdateHeader {
                protocol_version: PROTOCOL_VERSION,
                federation_id: FederationId::new("fed").unwrap(),
                site_id: SiteId::new(site).unwrap(),
                job_id: JobId::new("job-1").unwrap(),
                round: RoundId(round),
                base_model: MODEL,
                num_examples: 10,
                encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
                payload_len: 16,
                payload_hash: PayloadHash([nonce; 32]),
                nonce: UpdateNonce([nonce; 16]),
                metrics: None,
                feature_stats: None,
            },
        )
    }

    fn arrival(site: &str, round: u64, nonce: u8) -> Arrival {
        Arrival::of(&envelope(site, round, nonce), 16, 5)
    }

    /// An upload of `site` for `round` whose pass 1 found it valid (and
    /// `folded` it or not), from a site still allowed; its handle `upload`.
    fn arrive_valid(
        uploads: &mut Uploads<u8>,
        site: &str,
        round: u64,
        nonce: u8,
        folded: bool,
        upload: u8,
    ) -> Arrived<u8> {
        uploads.arrived(
            &facts(),
            arrival(site, round, nonce),
            PassOne::Valid { folded },
            Ok(()),
            upload,
            1,
        )
    }

    /// What became of an upload: the round machine's decision through the
    /// core.
    #[derive(Debug)]
    enum Decided {
        Acked(Box<Acked<u8>>),
        Refused(Refused<u8>),
    }

    /// Feed `input` to the round machine and execute its decision on the
    /// waiting upload through `uploads` (the driver's part).
    fn decide(
        runner: &mut JobRunner,
        now: Instant,
        uploads: &mut Uploads<u8>,
        input: UpdateReceived,
    ) -> Decided {
        runner.handle(now, Input::UpdateReceived(input));
        let mut decided = None;
        while let Some(action) = runner.poll_action() {
            match action {
                Action::AckUpdate { site, round } => {
                    let site = SiteId::new(site).unwrap();
                    let acked = uploads.acked(&site, round).unwrap();
                    assert!(decided.replace(Decided::Acked(Box::new(acked))).is_none());
                }
                Action::RejectUpdate {
                    site,
                    round,
                    reason,
                } => {
                    let site = SiteId::new(site).unwrap();
                    let refused = uploads
                        .rejected(&facts(), &site, round, &reason, 9)
                        .unwrap();
                    assert!(decided.replace(Decided::Refused(refused)).is_none());
                }
                _ => {}
            }
        }
        assert!(uploads.is_empty(), "an upload was left waiting");
        decided.expect("the round machine decided nothing")
    }

    /// The code and message a refusal answers with, after checking its
    /// order: on record first, then the round's record, the retraction
    /// (exactly when `folded`) before the spool is dropped, the answer
    /// last.
    fn refusal(r: &Refused<u8>, folded: bool) -> (RejectCode, String) {
        assert!(Effect::audited_first(&r.effects), "{:?}", r.effects);
        let names: Vec<&str> = r
            .effects
            .iter()
            .map(|e| match e {
                Effect::AppendAudit {
                    event: CoordEvent::UpdateReceived(_),
                    ..
                } => "audit",
                Effect::RecordRejected { .. } => "record",
                Effect::RetractFold { .. } => "retract",
                Effect::DiscardSpool { .. } => "discard",
                Effect::AnswerUpload { .. } => "answer",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let want: &[&str] = if folded {
            &["audit", "record", "retract", "discard", "answer"]
        } else {
            &["audit", "record", "discard", "answer"]
        };
        assert_eq!(names, want);
        match r.effects.last() {
            Some(Effect::AnswerUpload {
                result: UploadResult::Reject { code, message },
                ..
            }) => (*code, message.clone()),
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn a_valid_upload_is_acknowledged_and_folded_as_its_first_pass_left_it() {
        for (folded, fold) in [(true, Fold::Count), (false, Fold::Decode)] {
            let (mut runner, now) = runner(&["a"]);
            let mut uploads = Uploads::new();
            let arrived = uploads.arrived(
                &facts(),
                arrival("a", 1, 1),
                PassOne::Valid { folded },
                Ok(()),
                7u8,
                1,
            );
            assert!(arrived.superseded.is_none());
            assert_eq!(arrived.input.verdict, Verdict::Valid);
            assert_eq!(
                (arrived.input.site.as_str(), arrived.input.round),
                ("a", RoundId(1))
            );
            assert_eq!(
                uploads.get(&SiteId::new("a").unwrap(), RoundId(1)),
                Some(&7)
            );
            let Decided::Acked(acked) = decide(&mut runner, now, &mut uploads, arrived.input)
            else {
                panic!("refused");
            };
            assert_eq!((acked.upload, &acked.fold), (7, &fold));
            let effects = accepted(&facts(), &acked.arrival, 2);
            assert!(Effect::audited_first(&effects));
            assert!(matches!(
                effects.last(),
                Some(Effect::AnswerUpload {
                    result: UploadResult::Ack { accepted: true, payload_hash },
                    ..
                }) if *payload_hash == PayloadHash([1; 32])
            ));
            // A fold that failed: refused on record, an internal error.
            let effects = fold_failed(&facts(), &acked.arrival, "spool gone", 2);
            assert!(Effect::audited_first(&effects));
            assert!(matches!(
                effects.last(),
                Some(Effect::AnswerUpload {
                    result: UploadResult::Reject { code: RejectCode::Internal, message },
                    ..
                }) if message == "the coordinator could not fold the update: spool gone"
            ));
        }
    }

    #[test]
    fn a_second_upload_of_a_site_is_a_replay_while_waiting_and_after_its_ack() {
        let (mut runner, now) = runner(&["a", "b"]);
        let mut uploads = Uploads::new();
        // Two uploads of a for round 1 race: the older, folded, is refused
        // (its fold taken out); the round machine decides on the newer.
        let first = arrive_valid(&mut uploads, "a", 1, 1, true, 1);
        assert!(first.superseded.is_none());
        let second = arrive_valid(&mut uploads, "a", 1, 2, false, 2);
        let old = second.superseded.expect("the older upload is refused");
        assert_eq!(
            (old.site.as_str(), old.round, old.upload),
            ("a", RoundId(1), 1)
        );
        assert_eq!(
            refusal(&old, true),
            (RejectCode::Replay, SUPERSEDED.to_owned())
        );
        let Decided::Acked(acked) = decide(&mut runner, now, &mut uploads, second.input) else {
            panic!("refused");
        };
        assert_eq!((acked.upload, acked.fold), (2, Fold::Decode));
        // The same site again in the same round, b not yet reported: the
        // round machine refuses a duplicate.
        let third = arrive_valid(&mut uploads, "a", 1, 3, true, 3);
        let Decided::Refused(r) = decide(&mut runner, now, &mut uploads, third.input) else {
            panic!("counted twice");
        };
        assert_eq!(r.upload, 3);
        assert_eq!(
            refusal(&r, true),
            (
                RejectCode::Replay,
                "this site already reported in this round".to_owned()
            )
        );
    }

    #[test]
    fn an_upload_for_a_closed_round_is_too_late() {
        let (mut runner, now) = runner(&["a"]);
        let mut uploads = Uploads::new();
        let up = arrive_valid(&mut uploads, "a", 1, 1, true, 1);
        assert!(matches!(
            decide(&mut runner, now, &mut uploads, up.input),
            Decided::Acked(_)
        ));
        // The quorum is met: round 1 is being aggregated, closed to uploads.
        let late = arrive_valid(&mut uploads, "a", 1, 2, false, 2);
        let Decided::Refused(r) = decide(&mut runner, now, &mut uploads, late.input) else {
            panic!("counted after the round closed");
        };
        assert_eq!(
            refusal(&r, false),
            (RejectCode::TooLate, "the round is closed".to_owned())
        );
    }

    #[test]
    fn a_one_pass_upload_still_queued_when_the_deadline_closes_the_round_is_taken_out() {
        // The driver's sweep before a round's end (`server::engine`'s
        // `take_queued_uploads`): b's upload was folded in one pass and
        // waits in the engine's queue while the deadline closes the round
        // with a's update. Decided now, before the aggregation closes the
        // gate of one-pass folds, it is refused as late and its fold is
        // taken out exactly (no refold of the round).
        let (mut runner, now) = runner_with_quorum(&["a", "b"], 1);
        let mut uploads = Uploads::new();
        let up = arrive_valid(&mut uploads, "a", 1, 1, true, 1);
        assert!(matches!(
            decide(&mut runner, now, &mut uploads, up.input),
            Decided::Acked(_)
        ));
        let deadline = runner.poll_timeout().expect("the round's deadline");
        runner.handle(deadline, Input::Timeout);
        let mut aggregating = Vec::new();
        while let Some(action) = runner.poll_action() {
            if let Action::Aggregate { round, updates, .. } = action {
                aggregating.push((round, updates.len()));
            }
        }
        assert_eq!(
            aggregating,
            [(RoundId(1), 1)],
            "the deadline closes round 1 with a"
        );
        let queued = arrive_valid(&mut uploads, "b", 1, 2, true, 2);
        let Decided::Refused(r) = decide(&mut runner, deadline, &mut uploads, queued.input) else {
            panic!("counted after the round closed");
        };
        assert_eq!(r.upload, 2);
        assert_eq!(
            refusal(&r, true),
            (RejectCode::TooLate, "the round is closed".to_owned())
        );
    }

    #[test]
    fn an_upload_of_a_site_revoked_meanwhile_is_invalid_and_its_fold_taken_out() {
        let (mut runner, now) = runner(&["a"]);
        let mut uploads = Uploads::new();
        let up = uploads.arrived(
            &facts(),
            arrival("a", 1, 1),
            PassOne::Valid { folded: true },
            Err(NotAllowed::Revoked {
                site: "a".into(),
                by: fedlink_certs::RevokedBy::Serial,
            }),
            1u8,
            1,
        );
        let why = "the site is no longer allowed: the certificate of a is revoked (Serial)";
        assert_eq!(up.input.verdict, Verdict::Invalid(why.into()));
        let Decided::Refused(r) = decide(&mut runner, now, &mut uploads, up.input) else {
            panic!("a revoked site's update was counted");
        };
        assert_eq!(
            refusal(&r, true),
            (RejectCode::Malformed, format!("invalid update: {why}"))
        );
        // Were it acknowledged anyway, it could not be folded.
        let up = uploads.arrived(
            &facts(),
            arrival("a", 1, 2),
            PassOne::Valid { folded: false },
            Err(NotAllowed::NotRegistered("a".into())),
            2u8,
            1,
        );
        assert!(up.superseded.is_none());
        let acked = uploads
            .acked(&SiteId::new("a").unwrap(), RoundId(1))
            .unwrap();
        assert_eq!(acked.fold, Fold::Refuse(NO_TOKEN));
    }

    #[test]
    fn an_upload_that_failed_its_check_is_refused_with_the_reason() {
        let (mut runner, now) = runner(&["a"]);
        let mut uploads = Uploads::new();
        let up = uploads.arrived(
            &facts(),
            arrival("a", 1, 1),
            PassOne::Invalid("NaN at value 3".into()),
            Ok(()),
            1u8,
            1,
        );
        assert_eq!(up.input.verdict, Verdict::Invalid("NaN at value 3".into()));
        let Decided::Refused(r) = decide(&mut runner, now, &mut uploads, up.input) else {
            panic!("an invalid update was counted");
        };
        assert_eq!(
            refusal(&r, false),
            (
                RejectCode::Malformed,
                "invalid update: NaN at value 3".into()
            )
        );
        // One report per site and round, valid or not: another upload of
        // the site in the round is a duplicate, its fold taken out.
        let up = arrive_valid(&mut uploads, "a", 1, 2, true, 2);
        let Decided::Refused(r) = decide(&mut runner, now, &mut uploads, up.input) else {
            panic!("a second report of the site was counted");
        };
        assert_eq!(refusal(&r, true).0, RejectCode::Replay);
    }

    #[test]
    fn uploads_left_undecided_are_refused_as_internal() {
        let mut uploads = Uploads::new();
        for (site, folded) in [("a", true), ("b", false)] {
            let _ = uploads.arrived(
                &facts(),
                arrival(site, 1, 1),
                PassOne::Valid { folded },
                Ok(()),
                0u8,
                1,
            );
        }
        assert_eq!(uploads.len(), 2);
        let left = uploads.undecided(&facts(), 3);
        assert!(uploads.is_empty());
        let answers: Vec<_> = left
            .iter()
            .zip([true, false])
            .map(|(r, folded)| refusal(r, folded))
            .collect();
        assert_eq!(
            answers,
            vec![(RejectCode::Internal, UNDECIDED.to_owned()); 2]
        );
    }

    fn verifier(env: &SignedEnvelope) -> PayloadVerifier {
        let keys = BTreeMap::from([(
            SiteId::new("a").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
        )]);
        let expected = fedlink_protocol::envelope::ExpectedUpdate {
            federation_id: FederationId::new("fed").unwrap(),
            job_id: JobId::new("job-1").unwrap(),
            round: RoundId(1),
            base_model: MODEL,
            encoding: Some(Encoding::with_codec(ValueCodec::F32).unwrap()),
            max_payload_len: 1 << 20,
        };
        let mut v = fedlink_protocol::envelope::verify_update(
            env,
            &SiteId::new("a").unwrap(),
            &keys,
            &expected,
            &mut fedlink_protocol::ReplayGuard::new(),
        )
        .unwrap();
        v.update(&[0u8; 8]).unwrap();
        v
    }

    fn cut(
        env: &SignedEnvelope,
        spool: Option<&'static str>,
        resumable: bool,
    ) -> Cut<&'static str> {
        Cut {
            verifier: verifier(env),
            records: 1,
            spool,
            resumable,
            what: Interruption {
                records: 1,
                bytes: 8,
                partial_bytes: 3,
                cause: "connection lost".into(),
            },
        }
    }

    fn kept_for_resume(effects: &[Effect]) -> serde_json::Value {
        match effects {
            [
                Effect::AppendAudit {
                    event: event @ CoordEvent::UpdateInterrupted(_),
                    ..
                },
            ] => event.details().unwrap()["kept_for_resume"].clone(),
            other => panic!("not one update.interrupted: {other:?}"),
        }
    }

    #[test]
    fn an_interrupted_upload_is_kept_for_its_resume_while_its_site_may_still_report() {
        let (runner, _) = runner(&["a"]);
        let site = SiteId::new("a").unwrap();
        let env = envelope("a", 1, 1);
        let mut partials = Partials::new();
        let open = Some(RoundId(1));
        let out = interrupted(
            &mut partials,
            &runner,
            open,
            &facts(),
            &site,
            &env,
            cut(&env, Some("spool-1"), true),
        );
        assert_eq!((out.discard.len(), out.not_kept), (0, None));
        assert_eq!(kept_for_resume(&out.effects), serde_json::json!(true));
        assert_eq!(partials.len(), 1);
        // Cut again: the newer is kept, the older's spool goes.
        let out = interrupted(
            &mut partials,
            &runner,
            open,
            &facts(),
            &site,
            &env,
            cut(&env, Some("spool-2"), true),
        );
        assert_eq!(out.discard, vec!["spool-1"]);
        assert_eq!(
            partials.take(&site, RoundId(1)).map(|i| i.spool),
            Some("spool-2")
        );
        // A site that cannot resume, a round no longer open, records not
        // durable: dropped, on record with why.
        for (spool, resumable, open, why) in [
            (
                Some("s"),
                false,
                open,
                "the site's protocol version cannot resume uploads",
            ),
            (Some("s"), true, None, "round 1 is no longer open"),
            (
                None,
                true,
                open,
                "the received records could not be made durable",
            ),
        ] {
            let out = interrupted(
                &mut partials,
                &runner,
                open,
                &facts(),
                &site,
                &env,
                cut(&env, spool, resumable),
            );
            assert_eq!(out.not_kept.as_deref(), Some(why));
            assert_eq!(out.discard, spool.into_iter().collect::<Vec<_>>());
            assert_eq!(kept_for_resume(&out.effects), serde_json::json!(false));
            assert!(partials.is_empty());
        }
    }
}
