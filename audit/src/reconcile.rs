//! Reconciliation (what `fedlink audit reconcile` prints): a site's audit
//! log against the coordinator's, both already read (and verified by the
//! caller). Pure: entries in, a [`Report`] out; no files, no clock. Entries
//! are matched by [`EventKind`]; names this version does not know are
//! skipped (a newer writer's log stays comparable). The coordinator's
//! details are read as the typed events it writes ([`coord`]), the site's
//! as the agent's ([`site`]): members they do not know are
//! ignored; an entry of a compared event that does not read is `malformed`
//! when it is the site's (every entry of the site log, and a coordinator
//! entry naming the site), skipped when it names another site.
//!
//! ```text
//!  site log                               coordinator log
//!  update.sent {job,round,nonce,hash} ◀──▶ update.received {job,round,site,nonce,hash}
//!  update.result (ack: must be received)   round.aggregated inputs {site,hash}
//!  round.outcome {job,round,model} ◀────▶ round.aggregated output_model / job.finished model
//!  coordinator.audit_head ───────────────▶ (coordinator log reaches that entry?)
//!  (site log reaches that entry?) ◀─────── site.audit_head
//! ```
//!
//! What counts as a **difference** (exit 3):
//! - `altered`: the coordinator recorded the site's (job, round, nonce) with
//!   another payload hash, byte count or example count than the site sent;
//! - `never_received`: the site sent an update the coordinator acknowledged
//!   (an `update.result` ack) but the coordinator log has no `update.received`;
//! - `not_sent_by_site`: the coordinator accepted an update attributed to the
//!   site that the site never sent;
//! - `acceptance_differs`: the site was told "accepted" and the coordinator
//!   recorded "refused", or the other way round;
//! - `aggregated_not_sent`: a `round.aggregated` input in the site's name
//!   matches no update the site sent;
//! - `outcome_differs`: the coordinator told the site that a round it
//!   contributed to produced one model (or that the job ended with one), and
//!   its own log records another, or no such aggregation at all;
//! - `site_log_truncated` / `site_log_diverged`: the coordinator holds a head
//!   of the site's log (`site.audit_head`) that the site log no longer
//!   reaches or contains; `coordinator_log_truncated` /
//!   `coordinator_log_diverged`: the same the other way round;
//! - `bad_head_signature`: a recorded head does not verify with its
//!   writer's key;
//! - `malformed`: an entry of a compared type (the site's, or the
//!   coordinator's naming the site) does not read as its event: a member
//!   missing or of the wrong type.
//!
//! Things that cannot be decided from the two logs (an upload the
//! coordinator refused before parsing it, a refused attempt in the site's
//! name, entries outside the range of a partial log) are **notes**.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::VerifyingKey;

use crate::event::{EventKind, site_of_actor};
use crate::{EntryHash, LocatedEntry, SignedHead};
use crate::{coord, site};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where an entry is: file, 1-based line, sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Loc {
    /// The log file.
    pub file: String,
    /// 1-based line in that file.
    pub line: u64,
    /// The entry's sequence number.
    pub seq: u64,
}

impl Loc {
    fn of(e: &LocatedEntry) -> Self {
        Self {
            file: e.file.display().to_string(),
            line: e.line,
            seq: e.entry.seq,
        }
    }
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} (seq {})", self.file, self.line, self.seq)
    }
}

/// What kind of difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The coordinator recorded the site's update with another payload
    /// hash, byte count or example count than the site sent.
    Altered,
    /// The site sent an update the coordinator acknowledged but never recorded.
    NeverReceived,
    /// The coordinator accepted an update in the site's name that the site never sent.
    NotSentBySite,
    /// The site was told "accepted" and the coordinator recorded "refused", or the reverse.
    AcceptanceDiffers,
    /// An aggregation input in the site's name matches no update the site sent.
    AggregatedNotSent,
    /// The site was told a round (or the job) produced another model than
    /// the coordinator's log records, or one it has no record of.
    OutcomeDiffers,
    /// The site log no longer reaches a head of it the coordinator holds.
    SiteLogTruncated,
    /// The site log holds another entry at a head the coordinator holds.
    SiteLogDiverged,
    /// The coordinator log no longer reaches a head of it the site holds.
    CoordinatorLogTruncated,
    /// The coordinator log holds another entry at a head the site holds.
    CoordinatorLogDiverged,
    /// A recorded head does not verify with its writer's key.
    BadHeadSignature,
    /// An entry of a compared type does not read as its event (a member
    /// missing or of the wrong type).
    Malformed,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Altered => "altered",
            Self::NeverReceived => "never received",
            Self::NotSentBySite => "not sent by the site",
            Self::AcceptanceDiffers => "acceptance differs",
            Self::AggregatedNotSent => "aggregated but not sent by the site",
            Self::OutcomeDiffers => "round outcome differs",
            Self::SiteLogTruncated => "site log truncated",
            Self::SiteLogDiverged => "site log diverged",
            Self::CoordinatorLogTruncated => "coordinator log truncated",
            Self::CoordinatorLogDiverged => "coordinator log diverged",
            Self::BadHeadSignature => "bad head signature",
            Self::Malformed => "malformed entry",
        }
    }
}

/// One difference between the logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// What kind of difference.
    pub kind: Kind,
    /// The job, where known.
    pub job: Option<String>,
    /// The round, where known.
    pub round: Option<u64>,
    /// The update's nonce (hex), where known.
    pub nonce: Option<String>,
    /// The payload hash the site recorded.
    pub site_payload_hash: Option<String>,
    /// The payload hash the coordinator recorded.
    pub coordinator_payload_hash: Option<String>,
    /// The entry in the site log.
    pub site_entry: Option<Loc>,
    /// The entry in the coordinator log.
    pub coordinator_entry: Option<Loc>,
    /// What differs, in words.
    pub detail: String,
}

impl Finding {
    fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            job: None,
            round: None,
            nonce: None,
            site_payload_hash: None,
            coordinator_payload_hash: None,
            site_entry: None,
            coordinator_entry: None,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind.label().to_uppercase())?;
        if let Some(job) = &self.job {
            write!(f, " job {job}")?;
        }
        if let Some(round) = self.round {
            write!(f, " round {round}")?;
        }
        if let Some(nonce) = &self.nonce {
            write!(f, " nonce {nonce}")?;
        }
        write!(f, ": {}", self.detail)?;
        if let Some(h) = &self.site_payload_hash {
            write!(f, "\n    site payload_hash:        {h}")?;
        }
        if let Some(h) = &self.coordinator_payload_hash {
            write!(f, "\n    coordinator payload_hash: {h}")?;
        }
        if let Some(l) = &self.site_entry {
            write!(f, "\n    site log:        {l}")?;
        }
        if let Some(l) = &self.coordinator_entry {
            write!(f, "\n    coordinator log: {l}")?;
        }
        Ok(())
    }
}

/// What was compared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Entries in the site log.
    pub site_entries: u64,
    /// Entries in the coordinator log.
    pub coordinator_entries: u64,
    /// `update.sent` entries in the site log.
    pub updates_sent: u64,
    /// ... of which the coordinator recorded identically.
    pub updates_matched: u64,
    /// `update.received` entries attributed to the site.
    pub updates_received: u64,
    /// `round.aggregated` inputs in the site's name.
    pub aggregated_inputs: u64,
    /// `round.outcome` entries (site log) checked against the coordinator's
    /// `round.aggregated` / `job.finished`.
    pub round_outcomes: u64,
    /// `site.audit_head` entries (coordinator log) checked against the site log.
    pub site_heads: u64,
    /// `coordinator.audit_head` entries (site log) checked against the
    /// coordinator log.
    pub coordinator_heads: u64,
}

/// The outcome of a reconciliation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The site compared.
    pub site: String,
    /// What was compared.
    pub counts: Counts,
    /// Differences (the logs disagree when there is any).
    pub differences: Vec<Finding>,
    /// What cannot be decided from the two logs.
    pub notes: Vec<String>,
}

impl Report {
    /// No differences.
    pub fn consistent(&self) -> bool {
        self.differences.is_empty()
    }
}

/// The site's name, from its log: `agent.started` names it, and every
/// entry the site made has the actor `fedlink://<fed>/site/<name>`.
pub fn site_name(site: &[LocatedEntry]) -> Result<String, SiteNameError> {
    let mut names = BTreeSet::new();
    for e in site {
        if let Some(name) = site_of_actor(&e.entry.actor) {
            names.insert(name.to_owned());
        }
    }
    match names.len() {
        1 => Ok(names.into_iter().next().unwrap_or_default()),
        0 => Err(SiteNameError::NoSite),
        _ => Err(SiteNameError::SeveralSites(names)),
    }
}

/// Why a log's site cannot be named ([`site_name`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SiteNameError {
    /// No entry of the log was made by a site (a coordinator's log?).
    #[error("the site log has no entry made by a site (actor fedlink://<federation>/site/<name>)")]
    NoSite,
    /// Entries were made by more than one site.
    #[error("the site log names several sites: {0:?}")]
    SeveralSites(BTreeSet<String>),
}

type Key = (String, u64, String);

struct Sent<'a> {
    at: &'a LocatedEntry,
    payload_hash: String,
    payload_bytes: u64,
    num_examples: u64,
}

struct Received<'a> {
    at: &'a LocatedEntry,
    payload_hash: String,
    payload_bytes: u64,
    num_examples: u64,
    accepted: bool,
    reason: Option<String>,
}

struct SiteResult<'a> {
    at: &'a LocatedEntry,
    ack: bool,
    accepted: bool,
}

/// The member every coordinator event about a site has: read alone to
/// tell whether an entry that does not read as its event names the site.
#[derive(Deserialize)]
struct NamesSite {
    site: String,
}

fn malformed(e: &LocatedEntry, site_side: bool, what: &str) -> Finding {
    let mut f = Finding::new(
        Kind::Malformed,
        format!("{} entry lacks {what}", e.entry.event),
    );
    if site_side {
        f.site_entry = Some(Loc::of(e));
    } else {
        f.coordinator_entry = Some(Loc::of(e));
    }
    f
}

/// The coordinator's entry `d` (an event of type `T`) if it is about
/// `site`: `Ok(Some)` when it reads as a `T` naming `site`, `Ok(None)` when
/// it names another site (or none), `Err(())` when it names `site` but
/// does not read as a `T` (malformed).
fn about_site<'a, T: Deserialize<'a>>(
    d: &'a Value,
    site: &str,
    site_of: impl Fn(&T) -> &str,
) -> Result<Option<T>, ()> {
    match T::deserialize(d) {
        Ok(t) if site_of(&t) == site => Ok(Some(t)),
        Ok(_) => Ok(None),
        Err(_) => match NamesSite::deserialize(d) {
            Ok(n) if n.site == site => Err(()),
            _ => Ok(None),
        },
    }
}

/// A head of a site's log the coordinator recorded (`site.audit_head`);
/// `None` when its hash is not hex.
fn recorded_head(h: &coord::AuditHeadOf) -> Option<SignedHead> {
    Some(SignedHead {
        seq: h.seq,
        hash: h.hash.parse::<EntryHash>().ok()?,
        ts_unix_ms: h.ts_unix_ms,
        sig: h.sig.clone(),
    })
}

/// A head of the coordinator's log the site recorded
/// (`coordinator.audit_head`); `None` when its hash is not hex.
fn coordinator_head(h: site::CoordinatorAuditHead) -> Option<SignedHead> {
    Some(SignedHead {
        seq: h.seq,
        hash: h.hash.parse::<EntryHash>().ok()?,
        ts_unix_ms: h.ts_unix_ms,
        sig: h.sig,
    })
}

/// `seq → (hash, entry)` of one log, and its range.
struct SeqIndex<'a> {
    by_seq: BTreeMap<u64, &'a LocatedEntry>,
    first: Option<u64>,
    last: Option<u64>,
}

impl<'a> SeqIndex<'a> {
    fn new(entries: &'a [LocatedEntry]) -> Self {
        let by_seq: BTreeMap<u64, &LocatedEntry> =
            entries.iter().map(|e| (e.entry.seq, e)).collect();
        Self {
            first: by_seq.keys().next().copied(),
            last: by_seq.keys().next_back().copied(),
            by_seq,
        }
    }
}

/// Check the heads of one log recorded in the other.
/// `heads`: (where recorded, head); `key`: the head writer's key;
/// `target`: the log the heads belong to.
fn check_heads(
    heads: &[(&LocatedEntry, SignedHead)],
    key: Option<&VerifyingKey>,
    target: &SeqIndex<'_>,
    heads_of_site: bool,
    out: &mut Report,
) {
    let (truncated_kind, diverged_kind, whose, other) = if heads_of_site {
        (
            Kind::SiteLogTruncated,
            Kind::SiteLogDiverged,
            "site",
            "coordinator",
        )
    } else {
        (
            Kind::CoordinatorLogTruncated,
            Kind::CoordinatorLogDiverged,
            "coordinator",
            "site",
        )
    };
    let place = |f: &mut Finding, recorded: &LocatedEntry, in_target: Option<&LocatedEntry>| {
        let (recorded_loc, target_loc) = (Some(Loc::of(recorded)), in_target.map(Loc::of));
        if heads_of_site {
            f.coordinator_entry = recorded_loc;
            f.site_entry = target_loc;
        } else {
            f.site_entry = recorded_loc;
            f.coordinator_entry = target_loc;
        }
    };
    let mut beyond: Option<(&LocatedEntry, &SignedHead)> = None;
    let mut unchecked_sigs = 0u64;
    for (recorded, head) in heads {
        match key {
            Some(k) if !head.signature_ok(k) => {
                let mut f = Finding::new(
                    Kind::BadHeadSignature,
                    format!(
                        "the {other} log records a head of the {whose} log (seq {}) whose signature \
                         does not verify with the {whose}'s key",
                        head.seq
                    ),
                );
                place(&mut f, recorded, None);
                out.differences.push(f);
                continue;
            }
            Some(_) => {}
            None => unchecked_sigs += 1,
        }
        match (target.first, target.last) {
            (Some(first), _) if head.seq < first => out.notes.push(format!(
                "a head of the {whose} log at seq {} (recorded at {}) lies before the first entry given \
                 (seq {first}); not checked",
                head.seq,
                Loc::of(recorded)
            )),
            (_, Some(last)) if head.seq <= last => match target.by_seq.get(&head.seq) {
                Some(e) if e.hash == head.hash => {}
                found => {
                    let mut f = Finding::new(
                        diverged_kind,
                        format!(
                            "the {other} log holds a head of the {whose} log at seq {} with hash {}, \
                             the {whose} log has {} there",
                            head.seq,
                            head.hash,
                            found.map_or_else(|| "no entry".to_owned(), |e| e.hash.to_string())
                        ),
                    );
                    place(&mut f, recorded, found.copied());
                    out.differences.push(f);
                }
            },
            _ => {
                if beyond.is_none_or(|(_, h)| head.seq > h.seq) {
                    beyond = Some((recorded, head));
                }
            }
        }
    }
    if let Some((recorded, head)) = beyond {
        let mut f = Finding::new(
            truncated_kind,
            format!(
                "the {other} log holds a signed head of the {whose} log at seq {} (hash {}), but the \
                 {whose} log ends at {}",
                head.seq,
                head.hash,
                target
                    .last
                    .map_or_else(|| "no entry at all".to_owned(), |l| format!("seq {l}"))
            ),
        );
        place(&mut f, recorded, None);
        out.differences.push(f);
    }
    if unchecked_sigs > 0 {
        out.notes.push(format!(
            "{unchecked_sigs} head(s) of the {whose} log recorded in the {other} log: signatures not \
             checked (no key for the {whose})"
        ));
    }
}

/// Compare a site's log with the coordinator's (both already verified).
/// `coordinator_key`: the coordinator's audit key, to check the heads the
/// site recorded (without it they are only located).
pub fn reconcile(
    site_name: &str,
    site: &[LocatedEntry],
    coordinator: &[LocatedEntry],
    site_key: &VerifyingKey,
    coordinator_key: Option<&VerifyingKey>,
) -> Report {
    let mut out = Report {
        site: site_name.to_owned(),
        counts: Counts {
            site_entries: site.len() as u64,
            coordinator_entries: coordinator.len() as u64,
            ..Counts::default()
        },
        differences: Vec::new(),
        notes: Vec::new(),
    };

    // ---- the site's side
    let mut sent: BTreeMap<Key, Sent<'_>> = BTreeMap::new();
    let mut results: BTreeMap<Key, SiteResult<'_>> = BTreeMap::new();
    let mut coordinator_heads = Vec::new();
    let mut outcomes: Vec<(&LocatedEntry, String, u64, String, bool)> = Vec::new();
    // The site's entries are read as the typed events the agent writes
    // (`site`): members they do not know are ignored. Every entry of the
    // site log is the reconciled site's, so one of a compared event that
    // does not read is malformed.
    for e in site {
        let d = &e.entry.details;
        match EventKind::from_name(&e.entry.event) {
            Some(EventKind::UpdateSent) => match site::UpdateSent::deserialize(d) {
                Ok(u) => {
                    let k = (String::from(u.job), u.round.0, u.nonce);
                    let v = Sent {
                        at: e,
                        payload_hash: u.payload_hash,
                        payload_bytes: u.payload_bytes,
                        num_examples: u.num_examples,
                    };
                    if let Some(old) = sent.insert(k, v) {
                        out.notes.push(format!(
                            "the site log has two update.sent with the same nonce ({} and {})",
                            Loc::of(old.at),
                            Loc::of(e)
                        ));
                    }
                }
                Err(_) => out.differences.push(malformed(
                    e,
                    true,
                    "job, round, nonce, payload_hash, payload_bytes, num_examples, base_model or encoding",
                )),
            },
            Some(EventKind::UpdateResult) => match site::UpdateResult::deserialize(d) {
                Ok(r) => {
                    results.insert(
                        (String::from(r.job), r.round.0, r.nonce),
                        SiteResult {
                            at: e,
                            ack: r.outcome == "ack",
                            accepted: r.accepted,
                        },
                    );
                }
                Err(_) => out.differences.push(malformed(
                    e,
                    true,
                    "job, round, payload_hash, nonce, outcome or accepted",
                )),
            },
            Some(EventKind::RoundOutcome) => match site::RoundOutcome::deserialize(d) {
                Ok(o) => outcomes.push((e, String::from(o.job), o.round.0, o.model, o.job_completed)),
                Err(_) => out
                    .differences
                    .push(malformed(e, true, "job, round, model or job_completed")),
            },
            Some(EventKind::CoordinatorAuditHead) => {
                match site::CoordinatorAuditHead::deserialize(d) {
                    Ok(h) => match coordinator_head(h) {
                        Some(head) => coordinator_heads.push((e, head)),
                        None => out.differences.push(malformed(e, true, "a hex hash")),
                    },
                    Err(_) => out
                        .differences
                        .push(malformed(e, true, "seq, hash, ts_unix_ms or sig")),
                }
            }
            _ => {}
        }
    }
    out.counts.updates_sent = sent.len() as u64;

    // ---- the coordinator's side, for this site
    let mut received: BTreeMap<Key, Vec<Received<'_>>> = BTreeMap::new();
    let mut site_heads = Vec::new();
    let mut aggregated: Vec<(&LocatedEntry, String, u64, String, Option<u64>)> = Vec::new();
    // Every round's output and every job's final model (any site's).
    let mut produced: BTreeMap<(String, u64), (&LocatedEntry, String)> = BTreeMap::new();
    let mut finished: BTreeMap<String, (&LocatedEntry, Option<String>)> = BTreeMap::new();
    // The coordinator's entries are read as the typed events it writes
    // (`coord`): members they do not know are ignored.
    for e in coordinator {
        let d = &e.entry.details;
        match EventKind::from_name(&e.entry.event) {
            Some(EventKind::UpdateReceived) => {
                match about_site(d, site_name, |r: &coord::UpdateReceived| &r.site) {
                    Ok(Some(r)) => {
                        out.counts.updates_received += 1;
                        received
                            .entry((r.job, r.round, r.nonce))
                            .or_default()
                            .push(Received {
                                at: e,
                                payload_hash: r.payload_hash,
                                payload_bytes: r.payload_bytes,
                                num_examples: r.num_examples,
                                accepted: r.accepted,
                                reason: r.reason,
                            });
                    }
                    Ok(None) => {}
                    Err(()) => out.differences.push(malformed(
                        e,
                        false,
                        "job, round, nonce, payload_hash, payload_bytes, num_examples or accepted",
                    )),
                }
            }
            Some(EventKind::SiteAuditHead) => {
                match about_site(d, site_name, |h: &coord::AuditHeadOf| &h.site) {
                    Ok(Some(h)) => match recorded_head(&h) {
                        Some(head) => site_heads.push((e, head)),
                        None => out.differences.push(malformed(e, false, "a hex hash")),
                    },
                    Ok(None) => {}
                    Err(()) => {
                        out.differences
                            .push(malformed(e, false, "seq, hash, ts_unix_ms or sig"))
                    }
                }
            }
            Some(EventKind::RoundAggregated) => {
                let Ok(agg) = coord::RoundAggregated::deserialize(d) else {
                    out.differences.push(malformed(
                        e,
                        false,
                        "job, round, output_model or inputs (site, payload_hash)",
                    ));
                    continue;
                };
                for input in agg.inputs.iter().filter(|i| i.site == site_name) {
                    aggregated.push((
                        e,
                        agg.job.clone(),
                        agg.round,
                        input.payload_hash.clone(),
                        input.num_examples,
                    ));
                }
                produced.insert((agg.job, agg.round), (e, agg.output_model));
            }
            Some(EventKind::JobFinished) => {
                // An outcome this version does not know (a newer writer's)
                // still names the job, with no model.
                let end = match coord::JobFinished::deserialize(d) {
                    Ok(f) => Some((
                        f.job,
                        match f.outcome {
                            coord::JobOutcome::Completed { model } => Some(model),
                            _ => None,
                        },
                    )),
                    Err(_) => coord::JobRef::deserialize(d).ok().map(|j| (j.job, None)),
                };
                if let Some((job, model)) = end {
                    finished.insert(job, (e, model));
                }
            }
            _ => {}
        }
    }
    out.counts.aggregated_inputs = aggregated.len() as u64;

    // Partial logs (rotated files not given): entries older than the other
    // log's first entry cannot be compared.
    let site_partial_from = site
        .first()
        .filter(|e| e.entry.seq > 0)
        .map(|e| e.entry.ts_unix_ms);
    let coord_partial_from = coordinator
        .first()
        .filter(|e| e.entry.seq > 0)
        .map(|e| e.entry.ts_unix_ms);

    // ---- every update the site sent
    for (key, snt) in &sent {
        let (job, round, nonce) = key;
        let base = |kind, detail: String| {
            let mut f = Finding::new(kind, detail);
            f.job = Some(job.clone());
            f.round = Some(*round);
            f.nonce = Some(nonce.clone());
            f.site_payload_hash = Some(snt.payload_hash.clone());
            f.site_entry = Some(Loc::of(snt.at));
            f
        };
        let result = results.get(key);
        let Some(recs) = received.get(key) else {
            match result {
                _ if coord_partial_from.is_some_and(|t| snt.at.entry.ts_unix_ms < t) => {
                    out.notes.push(format!(
                        "update.sent at {} predates the coordinator log given; not compared",
                        Loc::of(snt.at)
                    ));
                }
                Some(r) if r.ack => {
                    let mut f = base(
                        Kind::NeverReceived,
                        "the site sent this update and the coordinator acknowledged it, but the \
                         coordinator log has no update.received for it"
                            .into(),
                    );
                    f.detail.push_str(&format!(" (ack at {})", Loc::of(r.at)));
                    out.differences.push(f);
                }
                Some(r) => out.notes.push(format!(
                    "update.sent at {}: refused ({}) with no update.received on the coordinator \
                     (refused before the upload was parsed?)",
                    Loc::of(snt.at),
                    Loc::of(r.at)
                )),
                None => out.notes.push(format!(
                    "update.sent at {}: no result on the site and no update.received on the \
                     coordinator (upload interrupted?)",
                    Loc::of(snt.at)
                )),
            }
            continue;
        };
        let mut identical = false;
        for rec in recs {
            if rec.payload_hash == snt.payload_hash
                && rec.payload_bytes == snt.payload_bytes
                && rec.num_examples == snt.num_examples
            {
                identical = true;
                continue;
            }
            let mut f = base(
                Kind::Altered,
                format!(
                    "the coordinator recorded this upload with payload_bytes {} / num_examples {}, \
                     the site sent payload_bytes {} / num_examples {}",
                    rec.payload_bytes, rec.num_examples, snt.payload_bytes, snt.num_examples
                ),
            );
            f.coordinator_payload_hash = Some(rec.payload_hash.clone());
            f.coordinator_entry = Some(Loc::of(rec.at));
            out.differences.push(f);
        }
        if identical {
            out.counts.updates_matched += 1;
        }
        if let Some(r) = result
            && r.ack
            && !recs.iter().any(|rec| rec.accepted == r.accepted)
        {
            let mut f = base(
                Kind::AcceptanceDiffers,
                format!(
                    "the site was told accepted={} ({}), the coordinator recorded accepted={}{}",
                    r.accepted,
                    Loc::of(r.at),
                    !r.accepted,
                    recs.iter()
                        .find_map(|rec| rec.reason.as_deref())
                        .map(|why| format!(" ({why})"))
                        .unwrap_or_default()
                ),
            );
            f.coordinator_entry = recs.first().map(|rec| Loc::of(rec.at));
            out.differences.push(f);
        }
    }

    // ---- every update the coordinator attributes to the site
    for (key, recs) in &received {
        if sent.contains_key(key) {
            continue;
        }
        let (job, round, nonce) = key;
        for rec in recs {
            if site_partial_from.is_some_and(|t| rec.at.entry.ts_unix_ms < t) {
                out.notes.push(format!(
                    "update.received at {} predates the site log given; not compared",
                    Loc::of(rec.at)
                ));
                continue;
            }
            if !rec.accepted {
                out.notes.push(format!(
                    "the coordinator refused an upload in the site's name that the site never sent \
                     (job {job} round {round} nonce {nonce}, {}: {})",
                    Loc::of(rec.at),
                    rec.reason.as_deref().unwrap_or("no reason")
                ));
                continue;
            }
            let mut f = Finding::new(
                Kind::NotSentBySite,
                "the coordinator accepted an update in the site's name that the site log never sent"
                    .to_owned(),
            );
            f.job = Some(job.clone());
            f.round = Some(*round);
            f.nonce = Some(nonce.clone());
            f.coordinator_payload_hash = Some(rec.payload_hash.clone());
            f.coordinator_entry = Some(Loc::of(rec.at));
            out.differences.push(f);
        }
    }

    // ---- every aggregation input in the site's name
    for (at, job, round, hash, examples) in &aggregated {
        let from_site = sent.iter().find(|((j, r, _), snt)| {
            j == job
                && r == round
                && snt.payload_hash == *hash
                && examples.is_none_or(|n| n == snt.num_examples)
        });
        let accepted_received = received.iter().any(|((j, r, _), recs)| {
            j == job && r == round && recs.iter().any(|x| x.accepted && x.payload_hash == *hash)
        });
        if from_site.is_some() && accepted_received {
            continue;
        }
        if from_site.is_none() && site_partial_from.is_some_and(|t| at.entry.ts_unix_ms < t) {
            continue;
        }
        let detail = match (from_site.is_some(), accepted_received) {
            (false, true) => "aggregated an update in the site's name that the site never sent",
            (false, false) => {
                "aggregated an update in the site's name that the site never sent and the \
                 coordinator never recorded as accepted"
            }
            _ => "aggregated an update of the site with no accepted update.received",
        };
        let mut f = Finding::new(Kind::AggregatedNotSent, detail);
        f.job = Some(job.clone());
        f.round = Some(*round);
        f.coordinator_payload_hash = Some(hash.clone());
        f.coordinator_entry = Some(Loc::of(at));
        if let Some(((_, _, nonce), snt)) = from_site {
            f.nonce = Some(nonce.clone());
            f.site_payload_hash = Some(snt.payload_hash.clone());
            f.site_entry = Some(Loc::of(snt.at));
        }
        out.differences.push(f);
    }

    // ---- the models the site was told its rounds produced
    out.counts.round_outcomes = outcomes.len() as u64;
    for (at, job, round, model, done) in &outcomes {
        let recorded = if *done {
            finished
                .get(job)
                .map(|(e, m)| (*e, m.clone(), EventKind::JobFinished))
        } else {
            produced
                .get(&(job.clone(), *round))
                .map(|(e, m)| (*e, Some(m.clone()), EventKind::RoundAggregated))
        };
        let detail = match &recorded {
            Some((_, Some(m), _)) if m == model => continue,
            Some((_, m, what)) => format!(
                "the site was told the {} model {model}; the coordinator's {what} records {}",
                if *done { "job's final" } else { "round's" },
                m.as_deref().unwrap_or("no model")
            ),
            None if coord_partial_from.is_some_and(|t| at.entry.ts_unix_ms < t) => {
                out.notes.push(format!(
                    "round.outcome at {} predates the coordinator log given; not compared",
                    Loc::of(at)
                ));
                continue;
            }
            None => format!(
                "the site was told the {} model {model}; the coordinator log has no {}",
                if *done { "job's final" } else { "round's" },
                if *done {
                    EventKind::JobFinished.to_string()
                } else {
                    format!("{} for it", EventKind::RoundAggregated)
                }
            ),
        };
        let mut f = Finding::new(Kind::OutcomeDiffers, detail);
        f.job = Some(job.clone());
        f.round = Some(*round);
        f.site_entry = Some(Loc::of(at));
        f.coordinator_entry = recorded.map(|(e, _, _)| Loc::of(e));
        out.differences.push(f);
    }

    // ---- heads each side holds of the other
    out.counts.site_heads = site_heads.len() as u64;
    out.counts.coordinator_heads = coordinator_heads.len() as u64;
    check_heads(
        &site_heads,
        Some(site_key),
        &SeqIndex::new(site),
        true,
        &mut out,
    );
    check_heads(
        &coordinator_heads,
        coordinator_key,
        &SeqIndex::new(coordinator),
        false,
        &mut out,
    );
    out.differences.sort_by(|a, b| {
        (a.job.as_deref(), a.round, a.kind).cmp(&(b.job.as_deref(), b.round, b.kind))
    });
    out
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use ed25519_dalek::SigningKey;

    use crate::{AuditLog, EntryReader};
    use serde_json::json;

    use super::*;

    const SITE: &str = "fedlink://fed/site/st-mary";
    const COORD: &str = "fedlink://fed/coordinator/coordinator";

    fn site_key() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    fn coord_key() -> SigningKey {
        SigningKey::from_bytes(&[2; 32])
    }

    fn hash(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn nonce(i: u64) -> String {
        format!("{i:032x}")
    }

    /// A pair of logs written the way the agent and the coordinator write
    /// them, for rounds `1..=rounds`; `tweak` may change what the
    /// coordinator writes per round (payload hash, nonce, whether at all).
    struct Pair {
        _dir: tempfile::TempDir,
        site: AuditLog,
        coord: AuditLog,
        site_path: PathBuf,
        coord_path: PathBuf,
        t: u64,
    }

    impl Pair {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let site_path = dir.path().join("site.jsonl");
            let coord_path = dir.path().join("coord.jsonl");
            let mut site = AuditLog::open(&site_path, site_key()).unwrap();
            let mut coord = AuditLog::open(&coord_path, coord_key()).unwrap();
            site.append(1, SITE, "agent.started", &json!({"site": "st-mary"}))
                .unwrap();
            coord
                .append(1, COORD, "coordinator.started", &json!({}))
                .unwrap();
            Self {
                _dir: dir,
                site,
                coord,
                site_path,
                coord_path,
                t: 10,
            }
        }

        fn tick(&mut self) -> u64 {
            self.t += 1;
            self.t
        }

        fn site_sends(&mut self, round: u64, h: &str, n: &str) {
            let t = self.tick();
            self.site
                .append(
                    t,
                    SITE,
                    "update.sent",
                    &json!({"job": "j", "round": round, "payload_hash": h, "payload_bytes": 100,
                        "num_examples": 7, "nonce": n, "base_model": hash('b'), "encoding": "f32"}),
                )
                .unwrap();
        }

        fn coord_receives(&mut self, round: u64, h: &str, n: &str, accepted: bool) {
            let t = self.tick();
            self.coord
                .append(
                    t,
                    SITE,
                    "update.received",
                    &json!({"job": "j", "round": round, "site": "st-mary", "payload_hash": h,
                        "payload_bytes": 100, "num_examples": 7, "nonce": n,
                        "envelope_sig": "00", "accepted": accepted,
                        "reason": if accepted { Value::Null } else { json!("too late") }}),
                )
                .unwrap();
        }

        fn site_result(&mut self, round: u64, h: &str, n: &str, accepted: bool) {
            let t = self.tick();
            self.site
                .append(
                    t,
                    COORD,
                    "update.result",
                    &json!({"job": "j", "round": round, "payload_hash": h, "nonce": n,
                        "outcome": "ack", "accepted": accepted, "reason": null}),
                )
                .unwrap();
        }

        fn aggregate(&mut self, round: u64, hashes: &[&str]) {
            let t = self.tick();
            let inputs: Vec<Value> = hashes
                .iter()
                .map(|h| json!({"site": "st-mary", "payload_hash": h, "num_examples": 7}))
                .chain([json!({"site": "other", "payload_hash": hash('9'), "num_examples": 1})])
                .collect();
            self.coord
                .append(
                    t,
                    COORD,
                    "round.aggregated",
                    &json!({"job": "j", "round": round, "base_model": hash('b'),
                        "output_model": hash('c'), "strategy": {}, "dp": null, "inputs": inputs}),
                )
                .unwrap();
        }

        /// The site sends its head, the coordinator records it and answers
        /// with its own, which the site records.
        fn exchange_heads(&mut self) {
            let t = self.tick();
            let sh = self.site.signed_head(t).unwrap();
            self.coord
                .append(
                    t,
                    SITE,
                    "site.audit_head",
                    &json!({"site": "st-mary", "seq": sh.seq, "hash": sh.hash.to_string(),
                        "ts_unix_ms": sh.ts_unix_ms, "sig": sh.sig}),
                )
                .unwrap();
            let ch = self.coord.signed_head(t).unwrap();
            self.site
                .append(
                    t,
                    COORD,
                    "coordinator.audit_head",
                    &json!({"seq": ch.seq, "hash": ch.hash.to_string(),
                        "ts_unix_ms": ch.ts_unix_ms, "sig": ch.sig}),
                )
                .unwrap();
        }

        /// The coordinator tells the site what a round (or the job)
        /// produced, and the site records it.
        fn site_told(&mut self, round: u64, model: &str, job_completed: bool) {
            let t = self.tick();
            self.site
                .append(
                    t,
                    COORD,
                    "round.outcome",
                    &json!({"job": "j", "round": round, "model": model,
                        "job_completed": job_completed}),
                )
                .unwrap();
        }

        fn job_finished(&mut self, model: &str) {
            let t = self.tick();
            self.coord
                .append(
                    t,
                    COORD,
                    "job.finished",
                    &json!({"job": "j", "outcome": {"result": "completed", "model": model}}),
                )
                .unwrap();
        }

        /// One honest round.
        fn round(&mut self, round: u64) {
            let (h, n) = (hash(char::from(b'0' + round as u8)), nonce(round));
            self.site_sends(round, &h, &n);
            self.coord_receives(round, &h, &n, true);
            self.site_result(round, &h, &n, true);
            self.exchange_heads();
            self.aggregate(round, &[&h]);
        }

        fn run(&self) -> Report {
            run_paths(&self.site_path, &self.coord_path)
        }
    }

    fn read(path: &Path) -> Vec<LocatedEntry> {
        EntryReader::new(&[path]).map(|e| e.unwrap()).collect()
    }

    fn run_paths(site_path: &Path, coord_path: &Path) -> Report {
        let site = read(site_path);
        let coord = read(coord_path);
        let name = site_name(&site).unwrap();
        reconcile(
            &name,
            &site,
            &coord,
            &site_key().verifying_key(),
            Some(&coord_key().verifying_key()),
        )
    }

    fn kinds(r: &Report) -> Vec<Kind> {
        r.differences.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn a_consistent_pair_is_consistent() {
        let mut p = Pair::new();
        for round in 1..=3 {
            p.round(round);
        }
        let r = p.run();
        assert!(r.consistent(), "{:#?}", r.differences);
        assert_eq!(r.site, "st-mary");
        assert_eq!(r.counts.updates_sent, 3);
        assert_eq!(r.counts.updates_matched, 3);
        assert_eq!(r.counts.updates_received, 3);
        assert_eq!(r.counts.aggregated_inputs, 3);
        assert_eq!((r.counts.site_heads, r.counts.coordinator_heads), (3, 3));
        assert!(r.notes.is_empty(), "{:?}", r.notes);
    }

    #[test]
    fn the_models_the_site_was_told_are_checked_against_the_coordinator_log() {
        // Honest: each round's output (hash('c') in `aggregate`) and the
        // final model, as recorded by the coordinator.
        let mut p = Pair::new();
        for round in 1..=2 {
            p.round(round);
            p.site_told(round, &hash('c'), false);
        }
        p.job_finished(&hash('c'));
        p.site_told(2, &hash('c'), true);
        let r = p.run();
        assert!(r.consistent(), "{:#?}", r.differences);
        assert_eq!(r.counts.round_outcomes, 3);

        // Equivocation: the site was told another model than the one the
        // coordinator logged, for a round and for the job's end.
        let mut p = Pair::new();
        p.round(1);
        p.site_told(1, &hash('d'), false);
        p.job_finished(&hash('c'));
        p.site_told(1, &hash('e'), true);
        let r = p.run();
        assert_eq!(
            kinds(&r),
            vec![Kind::OutcomeDiffers, Kind::OutcomeDiffers],
            "{:#?}",
            r.differences
        );
        assert!(
            r.differences[0].detail.contains(&hash('d')),
            "{}",
            r.differences[0]
        );
        assert!(
            r.differences
                .iter()
                .all(|f| f.site_entry.is_some() && f.coordinator_entry.is_some())
        );

        // A round outcome with no aggregation in the coordinator's log.
        let mut p = Pair::new();
        p.round(1);
        p.site_told(2, &hash('c'), false);
        let r = p.run();
        assert_eq!(kinds(&r), vec![Kind::OutcomeDiffers]);
        assert!(
            r.differences[0].detail.contains("no round.aggregated"),
            "{}",
            r.differences[0]
        );
    }

    /// Entries with event names this version does not know (a newer
    /// writer's) are read and skipped, on both sides.
    #[test]
    fn unknown_event_names_are_read_and_skipped() {
        let mut p = Pair::new();
        p.round(1);
        let t = p.tick();
        p.site
            .append(t, SITE, "future.site_event", &json!({"job": "j"}))
            .unwrap();
        p.coord
            .append(t, COORD, "future.coordinator_event", &json!({"x": 1}))
            .unwrap();
        p.round(2);
        let r = p.run();
        assert!(r.consistent(), "{:#?}", r.differences);
        assert_eq!(r.counts.updates_matched, 2);
        assert_eq!(
            (r.counts.site_entries, r.counts.coordinator_entries),
            (8, 8)
        );
    }

    /// The coordinator's entries are read as its typed events: members
    /// this version does not know are ignored, an entry of another site
    /// that does not read is skipped, one of this site is malformed, and a
    /// `job.finished` with an outcome this version does not know still
    /// names its job (with no model).
    #[test]
    fn coordinator_entries_of_other_versions_are_read_as_far_as_needed() {
        let mut p = Pair::new();
        let (h, n) = (hash('1'), nonce(1));
        p.site_sends(1, &h, &n);
        let t = p.tick();
        p.coord
            .append(
                t,
                SITE,
                "update.received",
                &json!({"job": "j", "round": 1, "site": "st-mary", "payload_hash": h,
                    "payload_bytes": 100, "num_examples": 7, "nonce": n, "accepted": true,
                    "reason": null, "future_member": {"x": 1}}),
            )
            .unwrap();
        p.site_result(1, &h, &n, true);
        p.coord
            .append(
                t,
                SITE,
                "update.received",
                &json!({"job": "j", "round": 1, "site": "other", "accepted": "maybe"}),
            )
            .unwrap();
        p.coord
            .append(
                t,
                COORD,
                "job.finished",
                &json!({"job": "j", "outcome": {"result": "handed_over", "to": "x"}}),
            )
            .unwrap();
        p.site_told(1, &hash('c'), true);
        let r = p.run();
        assert_eq!(r.counts.updates_matched, 1);
        assert_eq!(
            kinds(&r),
            vec![Kind::OutcomeDiffers],
            "{:#?}",
            r.differences
        );
        assert!(
            r.differences[0].detail.contains("records no model"),
            "{}",
            r.differences[0]
        );

        let mut p = Pair::new();
        let t = p.tick();
        p.coord
            .append(
                t,
                SITE,
                "update.received",
                &json!({"job": "j", "round": 1, "site": "st-mary", "accepted": "maybe"}),
            )
            .unwrap();
        assert_eq!(kinds(&p.run()), vec![Kind::Malformed]);
    }

    /// The site's entries are read as the agent's typed events: members
    /// this version does not know are ignored, members added in later
    /// versions may be missing (`feature_stats`, not written in these
    /// logs), and an entry of a compared event with a member missing or of
    /// the wrong type is malformed (every entry of the site log is the
    /// site's).
    #[test]
    fn site_entries_of_other_versions_are_read_as_far_as_needed() {
        let mut p = Pair::new();
        let (h, n) = (hash('1'), nonce(1));
        let t = p.tick();
        p.site
            .append(
                t,
                SITE,
                "update.sent",
                &json!({"job": "j", "round": 1, "payload_hash": h, "payload_bytes": 100,
                    "num_examples": 7, "nonce": n, "base_model": hash('b'), "encoding": "f32",
                    "future_member": {"x": 1}}),
            )
            .unwrap();
        p.coord_receives(1, &h, &n, true);
        p.site
            .append(
                t,
                COORD,
                "update.result",
                &json!({"job": "j", "round": 1, "payload_hash": h, "nonce": n,
                    "outcome": "ack", "accepted": true, "reason": null, "future": true}),
            )
            .unwrap();
        p.exchange_heads();
        p.aggregate(1, &[&h]);
        p.site
            .append(
                t,
                COORD,
                "round.outcome",
                &json!({"job": "j", "round": 1, "model": hash('c'), "job_completed": false,
                    "future": [1]}),
            )
            .unwrap();
        let r = p.run();
        assert!(r.consistent(), "{:#?}", r.differences);
        assert_eq!(r.counts.updates_matched, 1);
        assert_eq!(r.counts.coordinator_heads, 1);

        // Wrong types and missing members: one malformed finding each, and
        // the entries are not compared.
        let bad = [
            (
                "update.sent",
                json!({"job": "j", "round": "2", "payload_hash": h, "payload_bytes": 100,
                    "num_examples": 7, "nonce": nonce(2), "base_model": hash('b'),
                    "encoding": "f32"}),
            ),
            (
                "update.result",
                json!({"job": "j", "round": 2, "payload_hash": h, "nonce": nonce(2),
                    "outcome": "ack", "accepted": "yes", "reason": null}),
            ),
            (
                "round.outcome",
                json!({"job": "j", "round": 2, "job_completed": false}),
            ),
            (
                "coordinator.audit_head",
                json!({"seq": 1, "hash": hash('a'), "ts_unix_ms": 5}),
            ),
            (
                "coordinator.audit_head",
                json!({"seq": 1, "hash": "not hex", "ts_unix_ms": 5, "sig": "00"}),
            ),
        ];
        for (event, details) in bad {
            let mut p = Pair::new();
            p.round(1);
            let t = p.tick();
            p.site.append(t, COORD, event, &details).unwrap();
            let r = p.run();
            assert_eq!(
                kinds(&r),
                vec![Kind::Malformed],
                "{event}: {:#?}",
                r.differences
            );
            // agent.started, update.sent, update.result, coordinator.audit_head, then it
            assert_eq!(r.differences[0].site_entry.as_ref().map(|l| l.seq), Some(4));
            assert_eq!(r.counts.updates_matched, 1, "{event}");
        }
    }

    #[test]
    fn a_substituted_update_is_altered() {
        let mut p = Pair::new();
        p.round(1);
        // the coordinator records (and aggregates) another payload under the
        // site's nonce
        let (h, n) = (hash('a'), nonce(2));
        p.site_sends(2, &h, &n);
        p.coord_receives(2, &hash('e'), &n, true);
        p.site_result(2, &h, &n, true);
        p.aggregate(2, &[&hash('e')]);
        let r = p.run();
        assert_eq!(
            kinds(&r),
            vec![Kind::Altered, Kind::AggregatedNotSent],
            "{:#?}",
            r.differences
        );
        let f = &r.differences[0];
        assert_eq!((f.round, f.nonce.as_deref()), (Some(2), Some(n.as_str())));
        assert_eq!(f.site_payload_hash.as_deref(), Some(h.as_str()));
        assert_eq!(
            f.coordinator_payload_hash.as_deref(),
            Some(hash('e').as_str())
        );
        assert!(f.site_entry.as_ref().unwrap().line > 1);
        assert!(f.coordinator_entry.as_ref().unwrap().line > 1);
        let text = f.to_string();
        assert!(text.contains("ALTERED job j round 2"), "{text}");
        assert!(text.contains(&hash('e')) && text.contains(&h), "{text}");
    }

    #[test]
    fn an_update_the_site_never_sent_is_found() {
        let mut p = Pair::new();
        p.round(1);
        p.coord_receives(2, &hash('f'), &nonce(99), true);
        p.aggregate(2, &[&hash('f')]);
        // a refused impostor attempt is only a note
        p.coord_receives(2, &hash('d'), &nonce(98), false);
        let r = p.run();
        assert_eq!(
            kinds(&r),
            vec![Kind::NotSentBySite, Kind::AggregatedNotSent],
            "{:#?}",
            r.differences
        );
        assert_eq!(r.differences[0].nonce.as_deref(), Some(nonce(99).as_str()));
        assert!(
            r.notes.iter().any(|n| n.contains("refused an upload")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn a_dropped_update_is_never_received() {
        let mut p = Pair::new();
        p.round(1);
        let (h, n) = (hash('a'), nonce(2));
        p.site_sends(2, &h, &n);
        p.site_result(2, &h, &n, true);
        let r = p.run();
        assert_eq!(kinds(&r), vec![Kind::NeverReceived], "{:#?}", r.differences);
        assert!(r.differences[0].coordinator_entry.is_none());
        // an interrupted upload (no result) is a note, not a difference
        let mut p = Pair::new();
        p.site_sends(1, &hash('a'), &nonce(1));
        let r = p.run();
        assert!(r.consistent() && r.notes.len() == 1, "{r:#?}");
    }

    #[test]
    fn acceptance_must_agree() {
        let mut p = Pair::new();
        let (h, n) = (hash('a'), nonce(1));
        p.site_sends(1, &h, &n);
        p.coord_receives(1, &h, &n, false);
        p.site_result(1, &h, &n, true);
        assert_eq!(kinds(&p.run()), vec![Kind::AcceptanceDiffers]);
    }

    #[test]
    fn a_truncated_site_log_is_found_through_the_coordinators_head() {
        let mut p = Pair::new();
        p.round(1);
        p.round(2);
        p.site
            .append(99, SITE, "agent.stopped", &json!({}))
            .unwrap();
        // cut the site log back to before round 2 (a valid prefix: verify
        // alone cannot tell)
        let text = std::fs::read_to_string(&p.site_path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let cut = lines
            .iter()
            .rposition(|l| l.contains("\"round\":2") && l.contains("update.sent"))
            .unwrap();
        std::fs::write(&p.site_path, lines[..cut].join("\n") + "\n").unwrap();
        crate::verify(&[&p.site_path], &site_key().verifying_key(), None).unwrap();
        let r = p.run();
        let k = kinds(&r);
        assert!(k.contains(&Kind::SiteLogTruncated), "{:#?}", r.differences);
        let f = r
            .differences
            .iter()
            .find(|f| f.kind == Kind::SiteLogTruncated)
            .unwrap();
        assert!(f.detail.contains("ends at seq"), "{}", f.detail);
        assert!(f.coordinator_entry.is_some());
        // the coordinator's update.received of round 2 now has no sender
        assert!(k.contains(&Kind::NotSentBySite), "{k:?}");
    }

    #[test]
    fn a_truncated_coordinator_log_and_forged_heads_are_found() {
        let mut p = Pair::new();
        p.round(1);
        p.round(2);
        let text = std::fs::read_to_string(&p.coord_path).unwrap();
        let keep: Vec<&str> = text.lines().take(3).collect();
        std::fs::write(&p.coord_path, keep.join("\n") + "\n").unwrap();
        let r = p.run();
        assert!(
            kinds(&r).contains(&Kind::CoordinatorLogTruncated),
            "{:#?}",
            r.differences
        );

        // a site.audit_head whose signature is not the site's
        let mut p = Pair::new();
        p.round(1);
        let forged = SignedHead::sign(
            &coord_key(),
            crate::EntryHead {
                seq: 0,
                hash: EntryHash([0; 32]),
            },
            5,
        );
        p.coord
            .append(
                50,
                SITE,
                "site.audit_head",
                &json!({"site": "st-mary", "seq": 0, "hash": forged.hash.to_string(),
                    "ts_unix_ms": 5, "sig": forged.sig}),
            )
            .unwrap();
        assert_eq!(kinds(&p.run()), vec![Kind::BadHeadSignature]);
    }

    #[test]
    fn the_site_name_comes_from_the_site_log() {
        let p = Pair::new();
        assert_eq!(site_name(&read(&p.site_path)).unwrap(), "st-mary");
        assert_eq!(site_name(&read(&p.coord_path)), Err(SiteNameError::NoSite));
    }
}
