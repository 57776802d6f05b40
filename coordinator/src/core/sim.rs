//! A seeded simulation of the whole job lifecycle at the core's level: N
//! virtual sites that connect, reconnect, drop, answer offers, upload
//! (valid, invalid, duplicated or replayed updates, signed with their
//! current or a rotated-out key); an admin that pauses, resumes, aborts
//! and submits jobs and approves, revokes and rotates sites
//! ([`super::admin::site_command`] on the registry files, its effects
//! executed as the driver does: the audit entry, `SaveRevocations`,
//! `SaveManifest` to in-memory files that survive a crash,
//! `ReloadRegistry` rebuilding the key directory with
//! [`super::admin::update_keys`] and cutting the connections no longer
//! allowed); and crashes at any effect boundary (a site command's
//! included) followed by a restart from what was persisted. It runs
//! the real [`Sites`] table, the real [`super::queue`] and the real
//! [`JobRunner`]s, and plays the driver's part: it executes the runner's
//! actions in order — offers, cancels, accepted and refused uploads,
//! closes, aggregated rounds and the end of a job through the same core
//! decisions as the driver
//! ([`super::actions`]), executing their effects —, persists checkpoints
//! to an in-memory log (the store's crash semantics: a checkpoint is
//! durable once executed, the round in flight is re-opened after a
//! restart), and folds/acks updates.
//!
//! After every step it checks:
//!
//! - no update is acknowledged twice (per job, round and site);
//! - an update is acknowledged only after its `UpdateAccepted` checkpoint
//!   is durable, and every acknowledged update of a round is in that
//!   round's aggregate (none lost, none added) unless a crash re-opened
//!   the round or its site was revoked since (then it is taken out, on
//!   record as `update.excluded`, and too few left fail the round);
//! - a job's round machine sees exactly the sites the core holds, so
//!   sites are held across job switches as after an empty start;
//! - an admin command's change (to the running job's machine or a queued
//!   job's checkpoint) follows its audit append, and so does every change
//!   the core decides for a round machine's action (a refused upload's
//!   record, the end of a job);
//! - an offer goes out only after its own `offer.sent` entry (a round's
//!   offers are one decision, their entries one audit batch) and after
//!   its round's `round.opened` (since the last restart), a model's hash
//!   or an evaluation request only after its audit append, and each
//!   names the running job; an acknowledged or refused upload is
//!   answered exactly once; a final model's signed evaluation reports
//!   (once, twice, for another model, from a site not asked) are each on
//!   record once, accepted or refused, and the evaluation counts exactly
//!   the accepted ones; a job ends exactly once, with the outcome its machine gave, and its sites are told
//!   `Bye` only when no job is queued behind it;
//! - a connection is closed only while it is a site's current one; a
//!   site the loaded registry does not allow (revoked, removed, its
//!   certificate superseded by a rotation) holds no connection and its
//!   accepted updates are taken out before the aggregation;
//! - an upload's signer is accepted at the header exactly when it is the
//!   site's key as last loaded (a rotated-out key refused, the new one
//!   accepted), an upload refused there is on record once
//!   ([`super::actions::refuse_upload`]) and never aggregated; an
//!   approved site is offered the next round it is connected for;
//! - a round's end is executed as [`super::round_end::plan`] orders it
//!   (a crash armed for the next action, and one in five round ends
//!   other than a job's last, crash between two of its steps at a seeded
//!   point; the restart re-opens the round): a model is published only
//!   once it is stored and its `round.json` and `round.aggregated` name
//!   it, and the model a restart recovers as the job's has all three;
//! - a site command's saves and reload follow its audit entry, a refused
//!   command changes nothing, and after a crash `sites.toml` and
//!   `revoked.toml` are what the last executed saves wrote (the restart
//!   loads them).
//!
//! Deterministic: the same seed gives the same run, step for step
//! ([`CoreSim::trace_hash`]). No sockets, no threads, no clock: the
//! virtual time starts at an `Instant` the caller passes in.
//!
//! ```
//! use std::time::Instant;
//! use fedlink_coordinator::core::sim::CoreSim;
//! let mut sim = CoreSim::new(7, Instant::now());
//! sim.run(300).map_err(|e| e.to_string())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fedlink_certs::{CertInfo, Fingerprint, Identity, RevokedFile, Role, Serial, SiteManifest};
use fedlink_protocol::admin::FederatedEvaluation;
use fedlink_protocol::evaluation::{EvalReport, sign_eval_report};
use fedlink_protocol::{EvalMetrics, FederationId, JobId, Message, ModelHash, RoundId, SiteId};

use super::actions::{
    self, Connected, FinalEvaluation, Finishing, JobFacts, OfferTerms, UnixClock, UploadFacts,
};
use super::admin::{
    Registry, SiteCert, SiteCommand, StoredJob, Target, job_command, site_command, update_keys,
};
use super::registry::NotAllowed;
use super::round_end;
use super::uploads::{self, Arrival, Fold, PassOne, Refused, Uploads};
use super::{Effect, Held, Sites, queue};
use crate::round::{
    Action, AdminCommand, Checkpoint, ConnId, Input, JobOutcome, JobRunner, RoundConfig,
    SiteCapabilities, Snapshot, UpdateReceived, Verdict,
};

/// SplitMix64's output function: the sim's draws.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The terms of the simulated jobs' offers (training, encoding, privacy):
/// the offers the core builds from them are what the virtual sites get.
const OFFER_JOB: &str = "id = \"sim\"\nrounds = 3\nseed = 5\n\
    arch = { kind = \"logreg\", inputs = 4, classes = 2 }\ninit = { seed = 1 }\n\
    [round]\ndeadline_secs = 30\n[strategy]\nname = \"fedavg\"\n";

/// Events shown with a violation.
const RECENT: usize = 40;

/// An invariant the simulation found broken, with the seed and step.
#[derive(Debug, thiserror::Error)]
#[error("seed {seed}, step {step}: {what}\nlast events:\n{recent}")]
pub struct Violation {
    /// The seed of the run (replay it with [`CoreSim::new`]).
    pub seed: u64,
    /// The step at which the invariant broke.
    pub step: usize,
    /// Which invariant, and how.
    pub what: String,
    /// The last events before it, one a line.
    pub recent: String,
}

/// What a run did (to check that the seeds explore the faults).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Rounds aggregated.
    pub rounds_aggregated: u64,
    /// Updates acknowledged.
    pub acks: u64,
    /// Duplicate or replayed uploads sent.
    pub replays: u64,
    /// Crashes (each followed by a restart).
    pub crashes: u64,
    /// Jobs started while sites were held (empty start or job switch).
    pub handovers_with_sites: u64,
    /// Job switches: a job started after another had finished.
    pub job_switches: u64,
    /// Revocations that cut a connected site off.
    pub revocations: u64,
    /// Jobs completed.
    pub jobs_completed: u64,
    /// Admin commands recorded in the audit log.
    pub admin_audited: u64,
    /// Uploads refused (audited, recorded and answered).
    pub rejections: u64,
    /// Final models whose evaluation the sites were asked for.
    pub evaluations_requested: u64,
    /// Offers of more than one site sent as one decision (their
    /// `offer.sent` entries one audit batch).
    pub offer_batches: u64,
    /// Accepted updates taken out of their round before its aggregation
    /// (their site revoked since; `update.excluded`).
    pub exclusions: u64,
    /// Signed evaluation reports of a final model counted
    /// (`eval.accepted`).
    pub eval_reports_accepted: u64,
    /// Signed evaluation reports refused (`eval.rejected`: a second
    /// report, another model's, a site not asked).
    pub eval_reports_refused: u64,
    /// `sites approve | revoke | rotate` executed to their reload.
    pub sites_approved: u64,
    /// See [`Stats::sites_approved`].
    pub sites_revoked: u64,
    /// See [`Stats::sites_approved`].
    pub sites_rotated: u64,
    /// Site commands refused (nothing recorded, nothing changed).
    pub site_commands_refused: u64,
    /// Crashes between a site command's effects.
    pub site_command_crashes: u64,
    /// Uploads signed with a site's replaced (rotated) key, refused at
    /// the header.
    pub old_key_refusals: u64,
    /// Uploads signed with a rotated key, accepted at the header.
    pub new_key_accepts: u64,
    /// Sites approved by a site command that were then offered a round.
    pub approved_joined: u64,
    /// Refused uploads whose one-pass fold was taken out
    /// ([`Effect::RetractFold`]).
    pub retractions: u64,
    /// Crashes between two of a round end's steps
    /// ([`super::round_end::plan`]).
    pub round_end_crashes: u64,
}

#[derive(Clone, Debug)]
struct VSite {
    name: SiteId,
    conn: Option<ConnId>,
    /// Connections it had before (their late ends are replayed as stale
    /// disconnects).
    old: Vec<ConnId>,
    /// Offers received on the current connection: (job, round, model).
    offers: Vec<(String, RoundId, ModelHash)>,
    /// Offers accepted, waiting to upload: (job, round, model).
    training: Vec<(String, RoundId, ModelHash)>,
    /// Uploads sent, with the number of the key that signed them
    /// (replayed as duplicates).
    sent: Vec<(String, UpdateReceived, u16)>,
    /// The number of the certificate it holds now (see [`site_cert`]).
    cert: u16,
    /// The certificate of its current connection.
    conn_cert: Option<u16>,
    /// The number of the update key it signs with now (see
    /// [`update_key`]).
    key: u16,
    /// Keys it signed with before a rotation (it may still use one).
    old_keys: Vec<u16>,
    /// Certificates and keys issued to it so far (the next is one more).
    issued: u16,
    /// Approved by a site command and not offered a round since.
    approved: bool,
}

impl VSite {
    /// A site that has not connected yet, holding nothing.
    fn new(name: SiteId) -> Self {
        Self {
            name,
            conn: None,
            old: Vec::new(),
            offers: Vec::new(),
            training: Vec::new(),
            sent: Vec::new(),
            cert: 0,
            conn_cert: None,
            key: 0,
            old_keys: Vec::new(),
            issued: 0,
            approved: false,
        }
    }
}

struct Job {
    id: String,
    cfg: RoundConfig,
    initial: ModelHash,
}

struct Running {
    job: usize,
    runner: JobRunner,
}

/// What the effects of one action did.
#[derive(Debug, Default)]
struct Sent {
    offers: u64,
    byes: u64,
    answers: u64,
    rejections: u64,
    finished: Vec<JobOutcome>,
    /// The offers whose `offer.sent` entry is on record so far: (site,
    /// round).
    on_record: BTreeSet<(String, u64)>,
}

/// The facts of a simulated upload (it has no signed envelope: its nonce
/// and signature are left empty).
fn sim_upload(job: &str, u: &UpdateReceived) -> UploadFacts {
    UploadFacts {
        job: job.to_owned(),
        round: u.round,
        site: u.site.as_str().to_owned(),
        payload_hash: u.payload_hash.to_hex(),
        bytes: u.bytes,
        num_examples: u.num_examples,
        nonce: String::new(),
        envelope_sig: String::new(),
    }
}

/// The federation of the simulated sites' certificates.
const FEDERATION: &str = "sim-federation";

/// Certificate `n` of virtual site `i` (`name`): its serial and
/// fingerprint are unique per (site, n), as a CA's are.
fn site_cert(i: usize, name: &str, n: u16) -> Option<SiteCert> {
    let tag = u8::try_from(i + 1).ok()?;
    let [hi, lo] = n.to_be_bytes();
    let fingerprint: Vec<u8> = [[tag; 16].as_slice(), [hi, lo].repeat(8).as_slice()].concat();
    Some(SiteCert {
        info: CertInfo {
            serial: Serial::from_bytes(&[tag, hi, lo]).ok()?,
            fingerprint: hex::encode(fingerprint).parse::<Fingerprint>().ok()?,
            not_before: fedlink_certs::time::OffsetDateTime::UNIX_EPOCH,
            not_after: fedlink_certs::time::OffsetDateTime::UNIX_EPOCH,
            identity: Identity::new(FEDERATION, Role::Site, name).ok()?,
            server_names: Vec::new(),
        },
    })
}

/// Update key `n` of site `name` in the run for `seed`.
fn new_update_key(seed: u64, name: &str, n: u16) -> ed25519_dalek::SigningKey {
    let secret = blake3::hash(format!("{seed}/{name}/{n}").as_bytes());
    ed25519_dalek::SigningKey::from_bytes(secret.as_bytes())
}

fn empty_registry() -> Registry {
    Registry {
        manifest: SiteManifest {
            format: fedlink_certs::MANIFEST_FORMAT,
            federation: FEDERATION.to_owned(),
            site: Vec::new(),
        },
        revoked: RevokedFile::default(),
    }
}

/// The effects of a site command still to execute, and what the sim
/// expects of them.
struct SiteCommandRun {
    /// The key the site is registered with once the manifest is saved
    /// (`None`: revoked).
    key: Option<u16>,
    /// Approve, revoke or rotate (0, 1, 2).
    which: u8,
}

/// A message's name, for the trace.
fn message_name(m: &Message) -> &'static str {
    match m {
        Message::TaskOfferV6(_) => "offer",
        Message::Cancel(_) => "cancel",
        Message::RoundOutcome(_) => "round outcome",
        Message::EvalRequest(_) => "eval request",
        Message::Bye(_) => "bye",
        _ => "other",
    }
}

/// Why a virtual site may not hold a connection with one of its
/// certificates ([`CoreSim::peer_allowed`]): the sim's account of the
/// driver's TLS verifier (the revocation list) and its manifest check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum PeerRefused {
    /// The site has no such certificate (never issued).
    #[error("{site} has no certificate {cert}")]
    NoCertificate {
        /// The site.
        site: SiteId,
        /// Which of its certificates.
        cert: u16,
    },
    /// The certificate is on the revocation list.
    #[error("certificate of {0} revoked")]
    Revoked(SiteId),
    /// The site is not in the manifest.
    #[error("{0} is not a registered site")]
    NotRegistered(SiteId),
    /// The manifest registers another certificate of the site.
    #[error("{0}'s certificate is superseded")]
    Superseded(SiteId),
}

/// The simulation (see the module docs).
pub struct CoreSim {
    seed: u64,
    rng: u64,
    now: Instant,
    step: usize,
    sites: Sites,
    vsites: Vec<VSite>,
    next_conn: u64,
    jobs: Vec<Job>,
    queue: Vec<String>,
    running: Option<Running>,
    /// The durable log of each job (what a restart recovers from).
    durable: BTreeMap<String, Vec<Checkpoint>>,
    /// Acknowledged updates not discarded by a restart: (job, round, site).
    acked: BTreeSet<(String, RoundId, SiteId)>,
    /// A crash is armed: it happens before the n-th next action executes.
    crash_in: Option<u32>,
    /// The offer terms' job (`None`: [`OFFER_JOB`] does not parse, a
    /// violation at the first offer).
    offer_job: Option<crate::job::Job>,
    /// Payloads refused at the header (never counted).
    refused_payloads: BTreeSet<ModelHash>,
    /// The uploads received whole that wait for the round machine's
    /// decision, by job, in the core's table as the driver keeps them
    /// ([`super::uploads::Uploads`]); each with whether its one-pass fold
    /// is in the round (the sim's own account, to check the core's fold
    /// and retraction decisions against).
    uploads: BTreeMap<String, Uploads<bool>>,
    /// The running job's open round (the driver's round record), from its
    /// `RoundStarted` checkpoint to its aggregation.
    open_round: Option<RoundId>,
    /// What a round's end left on disk (it survives a crash): the models
    /// stored, each round's `round.json` (job, round) → the model it
    /// names, and each `round.aggregated` entry on record (job, round) →
    /// its output model.
    models_stored: BTreeSet<ModelHash>,
    round_files: BTreeMap<(String, u64), ModelHash>,
    aggregated_on_record: BTreeMap<(String, u64), String>,
    /// The rounds on record as opened (`round.opened`) since the last
    /// restart: (job, round).
    rounds_opened: BTreeSet<(String, RoundId)>,
    /// Virtual time → the sites' Unix milliseconds.
    clock: UnixClock,
    /// `sites.toml` and `revoked.toml` on disk: what the site commands'
    /// saves wrote (they survive a crash).
    files: Registry,
    /// The registry the coordinator loaded (at start, at each
    /// `ReloadRegistry`, at a restart): which connections may stay and
    /// which sites' updates count.
    loaded: Registry,
    /// The update keys of the loaded manifest
    /// ([`super::admin::update_keys`]): uploads' and evaluation reports'
    /// signers are checked against it.
    keys: BTreeMap<SiteId, ed25519_dalek::VerifyingKey>,
    /// The sim's own account of each registered site's key number: as
    /// saved by the last executed `SaveManifest`, and as loaded.
    saved_keys: BTreeMap<String, u16>,
    loaded_keys: BTreeMap<String, u16>,
    /// The virtual sites' update keys made so far (making one is slow in
    /// a debug build).
    key_cache: std::cell::RefCell<BTreeMap<(String, u16), ed25519_dalek::SigningKey>>,
    /// And their certificates.
    cert_cache: std::cell::RefCell<BTreeMap<(usize, u16), SiteCert>>,
    /// [`CoreSim::peer_allowed`]'s answers by the registry as loaded
    /// (cleared at each reload).
    allowed_memo: std::cell::RefCell<BTreeMap<(usize, u16), Result<(), PeerRefused>>>,
    /// The manifest and revocation list the last executed saves wrote.
    last_saved: (Option<SiteManifest>, Option<RevokedFile>),
    stats: Stats,
    trace: blake3::Hasher,
    /// The last events (for the report of a violation).
    recent: std::collections::VecDeque<String>,
}

impl CoreSim {
    /// A run for `seed`, with its virtual clock starting at `start`.
    pub fn new(seed: u64, start: Instant) -> Self {
        let mut sim = Self {
            seed,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            now: start,
            step: 0,
            sites: Sites::new(),
            vsites: Vec::new(),
            next_conn: 1,
            jobs: Vec::new(),
            queue: Vec::new(),
            running: None,
            durable: BTreeMap::new(),
            acked: BTreeSet::new(),
            crash_in: None,
            models_stored: BTreeSet::new(),
            round_files: BTreeMap::new(),
            aggregated_on_record: BTreeMap::new(),
            offer_job: crate::job::Job::from_toml(OFFER_JOB).ok(),
            uploads: BTreeMap::new(),
            refused_payloads: BTreeSet::new(),
            open_round: None,
            rounds_opened: BTreeSet::new(),
            clock: UnixClock::new(start, 1_700_000_000_000),
            files: empty_registry(),
            loaded: empty_registry(),
            keys: BTreeMap::new(),
            saved_keys: BTreeMap::new(),
            loaded_keys: BTreeMap::new(),
            last_saved: (None, None),
            key_cache: Default::default(),
            cert_cache: Default::default(),
            allowed_memo: Default::default(),
            stats: Stats::default(),
            trace: blake3::Hasher::new(),
            recent: std::collections::VecDeque::new(),
        };
        let n_sites = 2 + sim.below(6) as usize;
        sim.vsites = (0..n_sites)
            // `site-{i}` is a valid site id: none is left out.
            .filter_map(|i| SiteId::new(format!("site-{i}")).ok().map(VSite::new))
            .collect();
        // The sites are registered (through the admin's approve); now and
        // then the last one is not yet, for a later approve.
        let unregistered = (n_sites > 2 && sim.below(3) == 0).then_some(n_sites - 1);
        for i in 0..n_sites {
            let name = sim.vsites[i].name.clone();
            sim.vsites[i].issued = 1;
            sim.vsites[i].cert = 1;
            sim.vsites[i].key = 1;
            if Some(i) == unregistered {
                continue;
            }
            let Some(cert) = site_cert(i, name.as_str(), 1) else {
                continue;
            };
            let cmd = SiteCommand::Approve {
                cert,
                update_key: hex::encode(
                    new_update_key(seed, name.as_str(), 1)
                        .verifying_key()
                        .as_bytes(),
                ),
                max_examples: None,
            };
            if let Ok(change) = site_command(cmd, "admin", sim.files.clone(), "t0") {
                for e in change.effects {
                    if let Effect::SaveManifest(m) = e {
                        sim.files.manifest = m;
                    }
                }
                sim.saved_keys.insert(name.into(), 1);
            }
        }
        sim.loaded = sim.files.clone();
        sim.loaded_keys = sim.saved_keys.clone();
        sim.keys = update_keys(&sim.loaded.manifest).unwrap_or_default();
        let n_jobs = 1 + sim.below(3) as usize;
        for j in 0..n_jobs {
            let min_sites = 1 + sim.below(2) as u32;
            let allow = (sim.below(5) == 0).then(|| {
                sim.vsites
                    .iter()
                    .filter(|s| s.name.as_str() != "site-0")
                    .map(|s| s.name.clone())
                    .collect()
            });
            let cfg = RoundConfig {
                rounds: 1 + sim.below(3),
                seed: sim.next(),
                fraction: 1.0,
                min_sites,
                gather: Duration::from_secs(sim.below(3)),
                max_sites: 8,
                quorum: min_sites,
                deadline: Duration::from_secs(30),
                extension: Duration::from_secs(sim.below(2) * 10),
                max_attempts: 1 + sim.below(2) as u32,
                evaluate_every: 1,
                allow,
            };
            sim.jobs.push(Job {
                id: format!("job-{j}"),
                cfg,
                initial: ModelHash(*blake3::hash(format!("init-{j}").as_bytes()).as_bytes()),
            });
        }
        // The first job is submitted at once, or later (an empty start).
        if sim.below(2) == 0 {
            sim.queue.push("job-0".into());
        }
        sim
    }

    /// What the run did so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A hash of everything the run did, step by step: equal for equal
    /// seeds.
    pub fn trace_hash(&self) -> [u8; 32] {
        *self.trace.finalize().as_bytes()
    }

    /// Run `steps` steps, checking the invariants after each.
    pub fn run(&mut self, steps: usize) -> Result<(), Violation> {
        self.start_next()?;
        for _ in 0..steps {
            self.step += 1;
            self.one_step()?;
            // A restart may leave the resumed machine with work to do.
            self.drain()?;
            self.start_next()?;
            self.check()?;
        }
        Ok(())
    }

    // -- randomness (splitmix64: no dependency, stable across versions) --

    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.rng)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn violation(&self, what: impl Into<String>) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            what: what.into(),
            recent: self.recent.iter().cloned().collect::<Vec<_>>().join("\n"),
        }
    }

    fn note(&mut self, what: &str) {
        // Typed ids print bare with `{:?}` (`round: 3`, `site: "a"`, their
        // wire form), as the trace read before they were typed: every
        // seed's trace digest is the same.
        self.trace.update(&(self.step as u64).to_le_bytes());
        self.trace.update(what.as_bytes());
        self.trace.update(b"\n");
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(format!("{:>5} {what}", self.step));
    }

    fn job_id(&self) -> Option<String> {
        self.running.as_ref().map(|r| self.jobs[r.job].id.clone())
    }

    // -- one step of the world --

    fn one_step(&mut self) -> Result<(), Violation> {
        // Now and then a site whose update the open round has accepted is
        // revoked (its update is taken out before the aggregation).
        let accepted = self.accepted_in_open_round();
        if !accepted.is_empty() && self.below(20) == 0 {
            let k = self.below(accepted.len() as u64) as usize;
            return self.site_admin(accepted[k], true);
        }
        let i = self.below(self.vsites.len() as u64) as usize;
        match self.below(100) {
            0..=17 => self.connect(i),
            18..=23 => self.disconnect(i),
            24..=45 => self.answer_offer(i),
            46..=71 => self.upload(i),
            72..=85 => self.timeout(),
            86..=87 => self.site_admin(i, true),
            88..=91 => self.admin(),
            92 => {
                // Crash before one of the next few actions executes (or at
                // once if there are none).
                self.crash_in = Some(self.below(4) as u32);
                self.note("arm crash");
                if self.crash_in == Some(0) {
                    self.crash()?;
                }
                Ok(())
            }
            93..=95 => {
                self.submit();
                Ok(())
            }
            _ if self.below(3) == 0 => self.site_admin(i, false),
            _ => Ok(()),
        }
    }

    /// The virtual sites whose update the running job's open round has
    /// acknowledged.
    fn accepted_in_open_round(&self) -> Vec<usize> {
        let (Some(job), Some(round)) = (self.job_id(), self.open_round) else {
            return Vec::new();
        };
        self.vsites
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                self.may_contribute(&v.name).is_ok()
                    && self.acked.contains(&(job.clone(), round, v.name.clone()))
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn connect(&mut self, i: usize) -> Result<(), Violation> {
        let cert = self.vsites[i].cert;
        if let Err(why) = self.peer_allowed(i, cert) {
            // Refused at the TLS handshake (revoked) or at the manifest
            // check (unknown site, superseded certificate).
            self.note(&format!("connect refused {}: {why}", self.vsites[i].name));
            return Ok(());
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let name = self.vsites[i].name.clone();
        self.note(&format!("connect {name} {}", conn.0));
        let before = self.vsites[i].conn;
        let effect = self.sites.connect(
            &name,
            Held {
                conn,
                capabilities: SiteCapabilities::compatible(),
                codecs: Vec::new(),
                protocol_version: fedlink_protocol::PROTOCOL_VERSION,
            },
        );
        if let Some(Effect::Close { conn: old, .. }) = &effect
            && Some(*old) != before
        {
            return Err(self.violation(format!(
                "replacing {name} closed {old:?}, not its connection {before:?}"
            )));
        }
        if let Some(e) = effect {
            self.execute_effect(e)?;
        }
        let v = &mut self.vsites[i];
        v.conn = Some(conn);
        v.conn_cert = Some(cert);
        v.offers.clear();
        v.training.clear();
        self.feed(Input::SiteConnected {
            site: name,
            conn,
            capabilities: SiteCapabilities::compatible(),
        })
    }

    fn disconnect(&mut self, i: usize) -> Result<(), Violation> {
        let name = self.vsites[i].name.clone();
        // Sometimes the late end of an old connection (stale).
        let stale = !self.vsites[i].old.is_empty() && self.below(3) == 0;
        let conn = if stale {
            let k = self.below(self.vsites[i].old.len() as u64) as usize;
            self.vsites[i].old[k]
        } else {
            match self.vsites[i].conn.take() {
                Some(c) => {
                    self.vsites[i].old.push(c);
                    self.vsites[i].conn_cert = None;
                    c
                }
                None => return Ok(()),
            }
        };
        self.note(&format!("disconnect {name} {} stale={stale}", conn.0));
        let current = self.sites.disconnect(&name, conn);
        if stale && current {
            return Err(self.violation(format!(
                "the stale end of {name}'s {conn:?} removed its current connection"
            )));
        }
        self.vsites[i].offers.clear();
        self.vsites[i].training.clear();
        self.feed(Input::SiteDisconnected { site: name, conn })
    }

    fn answer_offer(&mut self, i: usize) -> Result<(), Violation> {
        if self.vsites[i].offers.is_empty() || self.vsites[i].conn.is_none() {
            return Ok(());
        }
        let (job, round, model) = self.vsites[i].offers.remove(0);
        if Some(&job) != self.job_id().as_ref() {
            return Ok(());
        }
        let name = self.vsites[i].name.clone();
        if self.below(6) == 0 {
            self.note(&format!("decline {name} {job} r{round}"));
            return self.feed(Input::OfferDeclined {
                site: name,
                round,
                reason: "busy".into(),
            });
        }
        self.note(&format!("accept {name} {job} r{round}"));
        self.vsites[i].training.push((job, round, model));
        self.feed(Input::OfferAccepted { site: name, round })
    }

    fn upload(&mut self, i: usize) -> Result<(), Violation> {
        if self.vsites[i].conn.is_none() {
            return Ok(());
        }
        let Some(job) = self.job_id() else {
            return Ok(());
        };
        let name = self.vsites[i].name.clone();
        // A duplicated or replayed envelope of an earlier upload.
        if !self.vsites[i].sent.is_empty() && self.below(4) == 0 {
            let k = self.below(self.vsites[i].sent.len() as u64) as usize;
            let (sent_job, u, key) = self.vsites[i].sent[k].clone();
            if sent_job == job {
                self.stats.replays += 1;
                self.note(&format!("replay {name} r{}", u.round));
                if !self.key_check(i, key, &u)? {
                    return Ok(());
                }
                return self.arrive(job, u);
            }
        }
        if self.vsites[i].training.is_empty() {
            return Ok(());
        }
        let (tjob, round, model) = self.vsites[i].training.remove(0);
        if tjob != job {
            return Ok(());
        }
        // Dropped mid-upload: the connection ends, nothing arrives.
        if self.below(8) == 0 {
            self.note(&format!("drop mid-upload {name} r{round}"));
            return self.disconnect_current(i);
        }
        let verdict = if self.below(10) == 0 {
            Verdict::Invalid("NaN in the update".into())
        } else {
            Verdict::Valid
        };
        let payload = blake3::hash(format!("{job}/{round}/{name}/{}", self.next()).as_bytes());
        let u = UpdateReceived {
            site: name.clone(),
            round,
            base_model: model,
            payload_hash: ModelHash(*payload.as_bytes()),
            num_examples: 1 + self.below(100),
            bytes: 1000,
            received_unix_ms: 0,
            verdict,
        };
        // Now and then signed with a key the site had before a rotation.
        let key = match self.vsites[i].old_keys.len() as u64 {
            0 => self.vsites[i].key,
            n if self.below(4) == 0 => {
                let k = self.below(n) as usize;
                self.vsites[i].old_keys[k]
            }
            _ => self.vsites[i].key,
        };
        self.vsites[i].sent.push((job.clone(), u.clone(), key));
        self.note(&format!("upload {name} r{round} key {key}"));
        if !self.key_check(i, key, &u)? {
            return Ok(());
        }
        self.arrive(job, u)
    }

    /// An upload of the running `job` arrives whole at the driver: through
    /// the core's intake ([`Uploads::arrived`], the site's standing as
    /// loaded now, one-pass folded or not) to the round machine,
    /// which must decide on it before the step ends: no upload is left
    /// waiting (unless the coordinator crashed meanwhile).
    fn arrive(&mut self, job: String, u: UpdateReceived) -> Result<(), Violation> {
        let site = SiteId::new(u.site.as_str())
            .map_err(|e| self.violation(format!("site name {}: {e}", u.site)))?;
        let arrival = Arrival {
            site,
            round: u.round,
            base_model: u.base_model,
            payload_hash: fedlink_protocol::PayloadHash(u.payload_hash.0),
            upload_ms: 0,
            metrics: None,
            facts: sim_upload(&job, &u),
        };
        let (pass, folded) = match &u.verdict {
            Verdict::Valid => {
                // Folded in one pass or not, by the payload's hash (the
                // seed's random stream is left as it was).
                let folded = u.payload_hash.0[0] & 1 == 0;
                (PassOne::Valid { folded }, folded)
            }
            Verdict::Invalid(why) => (PassOne::Invalid(why.clone()), false),
        };
        let allowed = self.may_contribute(&u.site);
        let revoked = allowed.is_err();
        let facts = self.facts(&job)?;
        let at = self.clock.unix_ms(self.now);
        let arrived = self
            .uploads
            .entry(job.clone())
            .or_default()
            .arrived(&facts, arrival, pass, allowed, folded, at);
        if revoked && arrived.input.verdict == Verdict::Valid {
            return Err(self.violation(format!(
                "{job}: an upload of {}, no longer allowed, went to the round machine as valid",
                u.site
            )));
        }
        if let Some(old) = arrived.superseded {
            self.refusal(&job, &u.site, u.round, old)?;
        }
        let crashes = self.stats.crashes;
        self.feed(Input::UpdateReceived(arrived.input))?;
        if self.stats.crashes != crashes {
            return Ok(());
        }
        let at = self.clock.unix_ms(self.now);
        let left = self
            .uploads
            .get_mut(&job)
            .map(|t| t.undecided(&facts, at))
            .unwrap_or_default();
        if !left.is_empty() {
            return Err(self.violation(format!(
                "{job}: {} upload(s) left undecided by the round machine",
                left.len()
            )));
        }
        Ok(())
    }

    /// Execute the core's refusal of a waiting upload of `site` in `round`:
    /// answered once, recorded once, its one-pass fold taken out exactly
    /// when it had one (after the refusal is on record, before its spool
    /// is dropped).
    fn refusal(
        &mut self,
        job: &str,
        site: &SiteId,
        round: RoundId,
        refused: Refused<bool>,
    ) -> Result<(), Violation> {
        let Refused {
            upload: folded,
            effects,
            ..
        } = refused;
        let retract = effects
            .iter()
            .position(|e| matches!(e, Effect::RetractFold { .. }));
        let discard = effects
            .iter()
            .position(|e| matches!(e, Effect::DiscardSpool { .. }));
        match (folded, retract, discard) {
            (false, None, Some(_)) => {}
            (true, Some(r), Some(d)) if r < d => self.stats.retractions += 1,
            _ => {
                return Err(self.violation(format!(
                    "{job}: refusing {site}'s upload in round {round} (folded: {folded}) \
                     retracts at {retract:?}, drops its spool at {discard:?}"
                )));
            }
        }
        let sent = self.run_effects(job, effects)?;
        if sent.answers != 1 || sent.rejections != 1 {
            return Err(self.violation(format!(
                "{job}: refusing {site}'s upload in round {round} answered it {} times \
                 and recorded it {} times",
                sent.answers, sent.rejections
            )));
        }
        self.stats.rejections += 1;
        Ok(())
    }

    fn disconnect_current(&mut self, i: usize) -> Result<(), Violation> {
        let Some(conn) = self.vsites[i].conn.take() else {
            return Ok(());
        };
        self.vsites[i].conn_cert = None;
        self.vsites[i].old.push(conn);
        self.vsites[i].offers.clear();
        self.vsites[i].training.clear();
        let name = self.vsites[i].name.clone();
        self.sites.disconnect(&name, conn);
        self.feed(Input::SiteDisconnected { site: name, conn })
    }

    fn timeout(&mut self) -> Result<(), Violation> {
        let Some(r) = &self.running else {
            return Ok(());
        };
        let Some(at) = r.runner.poll_timeout() else {
            return Ok(());
        };
        self.now = self.now.max(at);
        self.note("timeout");
        self.feed(Input::Timeout)
    }

    /// Certificate `n` of virtual site `i` ([`site_cert`]).
    fn cert(&self, i: usize, n: u16) -> Option<SiteCert> {
        if let Some(c) = self.cert_cache.borrow().get(&(i, n)) {
            return Some(c.clone());
        }
        let c = site_cert(i, self.vsites[i].name.as_str(), n)?;
        self.cert_cache.borrow_mut().insert((i, n), c.clone());
        Some(c)
    }

    /// Update key `n` of site `name`.
    fn update_key(&self, name: &str, n: u16) -> ed25519_dalek::SigningKey {
        self.key_cache
            .borrow_mut()
            .entry((name.to_owned(), n))
            .or_insert_with(|| new_update_key(self.seed, name, n))
            .clone()
    }

    /// Whether virtual site `i` may hold a connection with its certificate
    /// `cert`, by the loaded registry — the driver's TLS verifier (the
    /// revocation list) and its manifest check (the site's registered
    /// certificate).
    fn peer_allowed(&self, i: usize, cert: u16) -> Result<(), PeerRefused> {
        if let Some(r) = self.allowed_memo.borrow().get(&(i, cert)) {
            return r.clone();
        }
        let r = self.peer_allowed_now(i, cert);
        self.allowed_memo.borrow_mut().insert((i, cert), r.clone());
        r
    }

    fn peer_allowed_now(&self, i: usize, cert: u16) -> Result<(), PeerRefused> {
        let name = &self.vsites[i].name;
        let Some(c) = self.cert(i, cert) else {
            return Err(PeerRefused::NoCertificate {
                site: name.clone(),
                cert,
            });
        };
        if self
            .loaded
            .revoked
            .lists(&c.info.serial, &c.info.fingerprint)
        {
            return Err(PeerRefused::Revoked(name.clone()));
        }
        match self.loaded.manifest.get(name.as_str()) {
            None => Err(PeerRefused::NotRegistered(name.clone())),
            Some(e) if e.cert_fingerprint != c.info.fingerprint => {
                Err(PeerRefused::Superseded(name.clone()))
            }
            Some(_) => Ok(()),
        }
    }

    /// Whether `site`'s updates may count, by the loaded registry (the
    /// driver's `site_allowed`: [`super::registry::site_allowed`]):
    /// registered, its registered certificate not revoked.
    fn may_contribute(&self, site: &SiteId) -> Result<(), NotAllowed> {
        super::registry::site_allowed(&self.loaded.manifest, &self.loaded.revoked, site.as_str())
    }

    /// The header stage's key check of an upload of site `i` signed with
    /// its key `key`: the signer must be the site's key in the loaded key
    /// directory ([`super::admin::update_keys`]). The decision must agree
    /// with the sim's own account of the site's registered key: a key
    /// replaced by an executed rotation is refused, the new one accepted.
    /// Whether the upload goes on.
    fn key_check(&mut self, i: usize, key: u16, u: &UpdateReceived) -> Result<bool, Violation> {
        let name = self.vsites[i].name.clone();
        let signer = self.update_key(name.as_str(), key).verifying_key();
        let accepted = SiteId::new(name.as_str())
            .ok()
            .and_then(|id| self.keys.get(&id))
            .is_some_and(|k| *k == signer);
        let expected = self.loaded_keys.get(name.as_str()) == Some(&key);
        if accepted != expected {
            return Err(self.violation(format!(
                "{name}'s upload signed with key {key}: accepted {accepted}, but the key \
                 registered as loaded is {:?}",
                self.loaded_keys.get(name.as_str())
            )));
        }
        let rotated = !self.vsites[i].old_keys.is_empty();
        if accepted {
            if rotated && key == self.vsites[i].key {
                self.stats.new_key_accepts += 1;
            }
            return Ok(true);
        }
        if self.vsites[i].old_keys.contains(&key) && self.loaded_keys.contains_key(name.as_str()) {
            self.stats.old_key_refusals += 1;
        }
        self.note(&format!("header refused {name} r{} key {key}", u.round));
        self.refused_payloads.insert(u.payload_hash);
        // On record and in the round's record of refused updates, as the
        // driver's header refusal ([`actions::refuse_upload`]).
        if let Some(job) = self.job_id() {
            let effects = actions::refuse_upload(
                &self.facts(&job)?,
                &name,
                &sim_upload(&job, u),
                "the envelope's signature does not verify with the site's update key",
                self.clock.unix_ms(self.now),
            );
            let sent = self.run_effects(&job, effects)?;
            if sent.rejections != 1 {
                return Err(self.violation(format!(
                    "{job}: {name}'s upload refused at its header is recorded {} times",
                    sent.rejections
                )));
            }
        }
        Ok(false)
    }

    /// `sites approve | revoke | rotate` by the admin on virtual site `i`
    /// (`revoke`: revoke it if it is registered), decided by
    /// [`super::admin::site_command`] on the registry files, its effects
    /// executed in order as the driver does — the audit entry first, the
    /// saves to the files, the reload that cuts the connections no longer
    /// allowed — with now and then a crash between two of them.
    fn site_admin(&mut self, i: usize, revoke: bool) -> Result<(), Violation> {
        let name = self.vsites[i].name.clone();
        let registered = self.files.manifest.get(name.as_str()).is_some();
        let n = self.vsites[i].issued.saturating_add(1);
        let new_key =
            |sim: &Self| hex::encode(sim.update_key(name.as_str(), n).verifying_key().as_bytes());
        let Some(cert) = site_cert(i, name.as_str(), n) else {
            return Err(self.violation(format!("no certificate {n} for {name}")));
        };
        // Now and then a command the registry refuses: approving a
        // registered site, rotating to its current certificate, an
        // unknown site.
        if !revoke && self.below(10) == 0 {
            // The certificate registered in the files (not necessarily the
            // one the site holds: a crash may have lost its rotation).
            let current = self.files.manifest.get(name.as_str()).and_then(|e| {
                (1..=self.vsites[i].issued)
                    .filter_map(|k| site_cert(i, name.as_str(), k))
                    .find(|c| c.info.fingerprint == e.cert_fingerprint)
            });
            let cmd = match (registered, current) {
                (true, Some(current)) if self.below(2) == 0 => SiteCommand::Rotate {
                    name: name.as_str().to_owned(),
                    cert: current,
                    update_key: None,
                },
                (true, _) => SiteCommand::Approve {
                    cert,
                    update_key: new_key(self),
                    max_examples: None,
                },
                (false, _) => SiteCommand::Revoke {
                    name: name.as_str().to_owned(),
                    reason: None,
                },
            };
            self.note(&format!("site command (refused) {name}"));
            return match site_command(cmd, "admin", self.files.clone(), "t") {
                Ok(change) => Err(self.violation(format!(
                    "an invalid site command on {name} was accepted: {:?}",
                    change.effects
                ))),
                Err(_) => {
                    self.stats.site_commands_refused += 1;
                    Ok(())
                }
            };
        }
        let (cmd, run) = if !registered {
            let cmd = SiteCommand::Approve {
                cert,
                update_key: new_key(self),
                max_examples: None,
            };
            (
                cmd,
                SiteCommandRun {
                    key: Some(n),
                    which: 0,
                },
            )
        } else if revoke {
            let cmd = SiteCommand::Revoke {
                name: name.as_str().to_owned(),
                reason: Some("sim".into()),
            };
            (
                cmd,
                SiteCommandRun {
                    key: None,
                    which: 1,
                },
            )
        } else {
            let rekey = self.below(2) == 0;
            let cmd = SiteCommand::Rotate {
                name: name.as_str().to_owned(),
                cert,
                update_key: rekey.then(|| new_key(self)),
            };
            let key = if rekey {
                n
            } else {
                self.saved_keys
                    .get(name.as_str())
                    .copied()
                    .unwrap_or(self.vsites[i].key)
            };
            (
                cmd,
                SiteCommandRun {
                    key: Some(key),
                    which: 2,
                },
            )
        };
        self.note(&format!(
            "site command {} {name}",
            ["approve", "revoke", "rotate"][run.which as usize]
        ));
        let change = match site_command(cmd, "admin", self.files.clone(), "t") {
            Ok(change) => change,
            Err(refusal) => {
                return Err(self.violation(format!(
                    "a valid site command on {name} was refused: {refusal}"
                )));
            }
        };
        // The site holds what the admin issued it (a revoked site keeps
        // its own, now refused).
        if run.which != 1 {
            let v = &mut self.vsites[i];
            v.issued = n;
            v.cert = n;
            if run.key == Some(n) && v.key != n {
                v.old_keys.push(v.key);
                v.key = n;
            }
        }
        let crash_at =
            (self.below(12) == 0).then(|| self.below(change.effects.len() as u64) as usize);
        let mut audited = false;
        for (k, effect) in change.effects.into_iter().enumerate() {
            if crash_at == Some(k) {
                self.stats.site_command_crashes += 1;
                return self.crash();
            }
            if effect.changes_state() && !audited {
                return Err(self.violation(format!(
                    "site command on {name}: {effect:?} before its audit append"
                )));
            }
            match effect {
                Effect::AppendAudit { event, .. } => {
                    let (kind, details) = self.written(&event)?;
                    if details["site"] != name.as_str() {
                        return Err(
                            self.violation(format!("{kind} of {name} names {}", details["site"]))
                        );
                    }
                    self.note(&format!("audit {kind}"));
                    audited = true;
                }
                Effect::SaveRevocations(r) => {
                    self.note("save revoked.toml");
                    self.last_saved.1 = Some(r.clone());
                    self.files.revoked = r;
                }
                Effect::SaveManifest(m) => {
                    self.note("save sites.toml");
                    self.last_saved.0 = Some(m.clone());
                    self.files.manifest = m;
                    match run.key {
                        Some(k) => self.saved_keys.insert(name.as_str().to_owned(), k),
                        None => self.saved_keys.remove(name.as_str()),
                    };
                }
                Effect::ReloadRegistry => {
                    self.reload()?;
                    match run.which {
                        0 => {
                            self.stats.sites_approved += 1;
                            self.vsites[i].approved = true;
                        }
                        1 => self.stats.sites_revoked += 1,
                        _ => self.stats.sites_rotated += 1,
                    }
                }
                other => {
                    return Err(self.violation(format!("a site command emitted {other:?}")));
                }
            }
        }
        if self.loaded != self.files || self.loaded_keys != self.saved_keys {
            return Err(self.violation(format!(
                "after the site command on {name}, the loaded registry is not the files"
            )));
        }
        Ok(())
    }

    /// The coordinator (re)loads the registry files: the key directory
    /// from the manifest, then every connection the registry no longer
    /// allows is cut (the round machine is told).
    fn reload(&mut self) -> Result<(), Violation> {
        self.note("reload registry");
        self.allowed_memo.borrow_mut().clear();
        self.loaded = self.files.clone();
        self.loaded_keys = self.saved_keys.clone();
        self.keys = match update_keys(&self.loaded.manifest) {
            Ok(keys) => keys,
            Err(e) => return Err(self.violation(format!("the saved manifest's keys: {e}"))),
        };
        let refused: BTreeMap<SiteId, PeerRefused> = (0..self.vsites.len())
            .filter_map(|i| {
                let cert = self.vsites[i].conn_cert?;
                self.peer_allowed(i, cert)
                    .err()
                    .map(|why| (self.vsites[i].name.clone(), why))
            })
            .collect();
        let (cut, effects) = self.sites.revoke_where(|site, _| match refused.get(site) {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        });
        for e in effects {
            self.execute_effect(e)?;
        }
        for (site, conn) in cut {
            self.stats.revocations += 1;
            self.feed(Input::SiteDisconnected { site, conn })?;
        }
        Ok(())
    }

    /// An admin command on the running job or on a queued (or unknown)
    /// one, through [`super::admin::job_command`]: its effects run in
    /// order, and a change must follow its audit append.
    fn admin(&mut self) -> Result<(), Violation> {
        let cmd = match self.below(20) {
            0..=5 => AdminCommand::Pause,
            6..=18 => AdminCommand::Resume,
            _ => AdminCommand::Abort,
        };
        let pick = self.below(self.jobs.len() as u64 + 1) as usize;
        let running = self.running.as_ref().map(|r| r.job);
        let (id, target) = match (running, pick) {
            (Some(r), p) if p == r || p == self.jobs.len() => (
                self.jobs[r].id.clone(),
                Target::Running {
                    finished: self
                        .running
                        .as_ref()
                        .is_some_and(|r| r.runner.is_finished()),
                },
            ),
            (_, p) if p < self.jobs.len() && self.queue.contains(&self.jobs[p].id) => {
                let snap = self.snapshot(p);
                (
                    self.jobs[p].id.clone(),
                    Target::Stored(Some(StoredJob {
                        finished: snap.outcome.is_some(),
                        completed_rounds: snap.completed_rounds,
                    })),
                )
            }
            _ => ("no-such-job".to_owned(), Target::Stored(None)),
        };
        self.note(&format!("admin {cmd:?} {id}"));
        let (effects, _answer) = job_command(&id, cmd, "admin", target);
        let mut audited = false;
        for effect in effects {
            if effect.changes_state() && !audited {
                return Err(self.violation(format!(
                    "admin {cmd:?} on {id}: {effect:?} before its audit append"
                )));
            }
            match effect {
                Effect::AppendAudit { event, .. } => {
                    self.note(&format!("audit {}", event.kind()));
                    self.stats.admin_audited += 1;
                    audited = true;
                }
                Effect::Persist { job, checkpoint } => {
                    self.note(&format!("persist {job} {checkpoint:?}"));
                    self.durable.entry(job).or_default().push(checkpoint);
                }
                Effect::Apply(input) => self.feed(input)?,
                other => {
                    return Err(self.violation(format!("an admin command emitted {other:?}")));
                }
            }
        }
        Ok(())
    }

    fn submit(&mut self) {
        if let Some(j) = self.jobs.iter().find(|j| !self.queue.contains(&j.id)) {
            let id = j.id.clone();
            self.note(&format!("submit {id}"));
            self.queue.push(id);
        }
    }

    // -- the driver's part --

    /// Hand an input to the running job's machine and execute its actions.
    fn feed(&mut self, input: Input) -> Result<(), Violation> {
        let now = self.now;
        let Some(r) = self.running.as_mut() else {
            return Ok(());
        };
        r.runner.handle(now, input);
        self.drain()
    }

    fn drain(&mut self) -> Result<(), Violation> {
        // An action polled after a round's offers, not yet executed.
        let mut held = None;
        loop {
            let Some(r) = self.running.as_mut() else {
                return Ok(());
            };
            let Some(action) = held.take().or_else(|| r.runner.poll_action()) else {
                return Ok(());
            };
            match self.crash_in {
                Some(0) => return self.crash(),
                Some(n) => self.crash_in = Some(n - 1),
                None => {}
            }
            // A round's offers come in a row: the driver executes them as
            // one decision (their `offer.sent` entries one group commit).
            if let Action::SendOffer { site, offer } = action {
                let Some(r) = self.running.as_mut() else {
                    return Ok(());
                };
                let offers;
                (offers, held) = actions::offers_in_a_row(&mut r.runner, (site, offer));
                self.send_offers(offers)?;
                continue;
            }
            self.execute(action)?;
        }
    }

    /// A round's offers through the core ([`actions::send_offers`]): each
    /// offer must reach its site after its own `offer.sent` entry, and
    /// every offer must go out.
    fn send_offers(&mut self, offers: Vec<(SiteId, crate::round::Offer)>) -> Result<(), Violation> {
        let Some(job) = self.job_id() else {
            return Ok(());
        };
        for (site, offer) in &offers {
            self.note(&format!("offer {site} r{}", offer.round));
        }
        let facts = self.facts(&job)?;
        let Some(terms) = self.offer_job.as_ref().and_then(|j| {
            OfferTerms::of(
                j,
                &facts,
                &fedlink_aggregation::StrategyConfig::default(),
                None,
            )
            .ok()
        }) else {
            return Err(self.violation("the simulated job's offer terms do not build"));
        };
        let effects = actions::send_offers(&facts, &terms, &self.clock, &offers);
        if offers.len() > 1 {
            self.stats.offer_batches += 1;
        }
        let sent = self.run_effects(&job, effects)?;
        if sent.offers != offers.len() as u64 {
            return Err(self.violation(format!(
                "{job}: {} SendOffer actions sent {} offers",
                offers.len(),
                sent.offers
            )));
        }
        Ok(())
    }

    fn execute(&mut self, action: Action) -> Result<(), Violation> {
        let Some(job) = self.job_id() else {
            return Ok(());
        };
        match action {
            Action::Persist(cp) => {
                self.note(&format!("persist {cp:?}"));
                let opens = match (&cp, actions::checkpoint_plan(&cp).opens_round) {
                    // A later wave of the open round opens nothing.
                    (Checkpoint::RoundStarted { base_model, .. }, Some(round))
                        if self.open_round != Some(round) =>
                    {
                        Some((round, *base_model))
                    }
                    _ => None,
                };
                self.durable.entry(job.clone()).or_default().push(cp);
                if let Some((round, base_model)) = opens {
                    self.open_round = Some(round);
                    let effects = actions::round_opened(&self.facts(&job)?, round, base_model);
                    self.run_effects(&job, effects)?;
                    self.rounds_opened.insert((job, round));
                }
            }
            Action::SendOffer { site, offer } => self.send_offers(vec![(site, offer)])?,
            Action::CancelTask { site, round } => {
                self.note(&format!("cancel {site} r{round}"));
                let effects = actions::cancel_task(&self.facts(&job)?, &site, round);
                self.run_effects(&job, effects)?;
            }
            Action::RejectUpdate {
                site,
                round,
                reason,
            } => {
                self.note(&format!("reject {site} r{round} {reason:?}"));
                let facts = self.facts(&job)?;
                let at = self.clock.unix_ms(self.now);
                let refused = SiteId::new(site.as_str()).ok().and_then(|id| {
                    self.uploads
                        .get_mut(&job)?
                        .rejected(&facts, &id, round, &reason, at)
                });
                let Some(refused) = refused else {
                    return Err(self.violation(format!(
                        "{job}: rejected an upload of {site} in round {round} it never received"
                    )));
                };
                self.refusal(&job, &site, round, refused)?;
            }
            Action::AckUpdate { site, round } => {
                self.note(&format!("ack {site} r{round}"));
                let acked = SiteId::new(site.as_str())
                    .ok()
                    .and_then(|id| self.uploads.get_mut(&job)?.acked(&id, round));
                let Some(acked) = acked else {
                    return Err(self.violation(format!(
                        "{job}: acknowledged an upload of {site} in round {round} it never received"
                    )));
                };
                let persisted = self.durable.get(&job).is_some_and(|log| {
                    log.iter().rev().any(
                        |cp| matches!(cp, Checkpoint::UpdateAccepted(a) if a.site == site && a.round == round),
                    )
                });
                if !persisted {
                    return Err(self.violation(format!(
                        "{job}: the update of {site} in round {round} was acknowledged before \
                         its UpdateAccepted checkpoint was durable"
                    )));
                }
                if !self.acked.insert((job.clone(), round, site.clone())) {
                    return Err(self.violation(format!(
                        "{job}: the update of {site} in round {round} was acknowledged twice"
                    )));
                }
                // The round machine acknowledges valid updates only: the
                // core folds them as pass 1 left them.
                let want = if acked.upload {
                    Fold::Count
                } else {
                    Fold::Decode
                };
                if acked.fold != want {
                    return Err(self.violation(format!(
                        "{job}: the acknowledged update of {site} in round {round} (folded: {}) \
                         is to be folded as {:?}",
                        acked.upload, acked.fold
                    )));
                }
                let effects = uploads::accepted(
                    &self.facts(&job)?,
                    &acked.arrival,
                    self.clock.unix_ms(self.now),
                );
                let sent = self.run_effects(&job, effects)?;
                if sent.answers != 1 {
                    return Err(self.violation(format!(
                        "{job}: acknowledging {site}'s upload in round {round} answered it {} times",
                        sent.answers
                    )));
                }
                self.stats.acks += 1;
            }
            Action::Aggregate {
                round,
                base_model,
                updates,
            } => {
                self.note(&format!("aggregate r{round} {}", updates.len()));
                self.open_round = None;
                let got: BTreeSet<&str> = updates.iter().map(|u| u.site.as_str()).collect();
                if got.len() != updates.len() {
                    return Err(
                        self.violation(format!("{job}: round {round} aggregates an update twice"))
                    );
                }
                let want: BTreeSet<&str> = self
                    .acked
                    .iter()
                    .filter(|(j, r, _)| *j == job && *r == round)
                    .map(|(_, _, s)| s.as_str())
                    .collect();
                if got != want {
                    return Err(self.violation(format!(
                        "{job}: round {round} aggregates {got:?}, acknowledged were {want:?}"
                    )));
                }
                // Sites revoked since their update was accepted are taken
                // out, each on record; too few left fail the round.
                let mut inputs: Vec<_> = updates
                    .iter()
                    .map(|u| crate::round_archive::RoundInput {
                        site: u.site.as_str().to_owned(),
                        payload_hash: u.payload_hash.to_hex(),
                        num_examples: u.num_examples,
                        payload_file: String::new(),
                        envelope_file: String::new(),
                    })
                    .collect();
                if let Some(u) = updates
                    .iter()
                    .find(|u| self.refused_payloads.contains(&u.payload_hash))
                {
                    return Err(self.violation(format!(
                        "{job}: round {round} aggregates {}'s upload refused at its header",
                        u.site
                    )));
                }
                let revoked: BTreeMap<String, NotAllowed> = self
                    .vsites
                    .iter()
                    .filter_map(|v| {
                        self.may_contribute(&v.name)
                            .err()
                            .map(|why| (v.name.as_str().to_owned(), why))
                    })
                    .collect();
                let facts = self.facts(&job)?;
                let quorum = self.jobs[self.running.as_ref().map_or(0, |r| r.job)]
                    .cfg
                    .quorum as usize;
                let exclusion = actions::exclude_withdrawn(&facts, round, &inputs, quorum, |s| {
                    revoked.get(s).cloned()
                });
                let want_out: BTreeSet<&str> = got
                    .iter()
                    .copied()
                    .filter(|s| revoked.contains_key(*s))
                    .collect();
                let out: BTreeSet<&str> = exclusion
                    .excluded
                    .iter()
                    .map(|(i, _)| inputs[*i].site.as_str())
                    .collect();
                if out != want_out || exclusion.effects.len() != out.len() {
                    return Err(self.violation(format!(
                        "{job}: round {round} excludes {out:?} ({} entries), revoked are {want_out:?}",
                        exclusion.effects.len()
                    )));
                }
                self.stats.exclusions += out.len() as u64;
                let failed = exclusion.below_quorum;
                for (i, _) in &exclusion.excluded {
                    inputs.remove(*i);
                }
                self.run_effects(&job, exclusion.effects)?;
                let now = self.now;
                if let Some((left, quorum)) = failed {
                    // The round stays open until the job's end discards it.
                    self.open_round = Some(round);
                    if let Some(r) = self.running.as_mut() {
                        r.runner.handle(
                            now,
                            Input::AggregationFailed {
                                round,
                                reason: format!("{left} left, the quorum is {quorum}"),
                            },
                        );
                    }
                    return Ok(());
                }
                let mut h = blake3::Hasher::new();
                h.update(&base_model.0);
                for i in &inputs {
                    h.update(i.payload_hash.as_bytes());
                }
                let model = ModelHash(*h.finalize().as_bytes());
                self.stats.rounds_aggregated += 1;
                // The round's end as the core orders it; a crash armed to
                // happen before the next action happens between two of its
                // steps instead (seeded), and the restart re-opens the
                // round.
                let rounds = self.jobs[self.running.as_ref().map_or(0, |r| r.job)]
                    .cfg
                    .rounds;
                let end = round_end::plan(
                    &facts,
                    round_end::Aggregated {
                        round,
                        base_model,
                        output_model: model,
                        strategy: serde_json::Value::Null,
                        dp: None,
                        inputs: &inputs,
                        numbers: fedlink_aggregation::RoundNumbers {
                            num_updates: inputs.len(),
                            total_examples: inputs.iter().map(|i| u128::from(i.num_examples)).sum(),
                            ..Default::default()
                        },
                    },
                    round_end::EvaluationFacts {
                        every_rounds: 0,
                        rounds,
                        reports: Vec::new(),
                    },
                    (&super::scaling::FederatedScaling::default(), &[]),
                    &round_end::Retention {
                        keep: crate::config::UpdateRetention::Job,
                        archived: Vec::new(),
                    },
                );
                // Besides an armed crash, one round end in five crashes
                // (drawn from the round's own seed, so the rest of the run
                // draws as before); not a job's last round's, so that as
                // many jobs complete (and ask for their final evaluation)
                // as before.
                let own = splitmix(
                    self.seed ^ round.0.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ self.step as u64,
                );
                let crash_at = if self.crash_in == Some(0) {
                    Some(self.below(end.steps.len() as u64 + 1) as usize)
                } else {
                    (round.0 < rounds && own.is_multiple_of(5))
                        .then_some(((own >> 8) % end.steps.len() as u64) as usize)
                };
                for (k, step) in end.steps.into_iter().enumerate() {
                    if crash_at == Some(k) {
                        self.stats.round_end_crashes += 1;
                        self.note(&format!("crash in r{round}'s end before step {k}"));
                        return self.crash();
                    }
                    self.round_end_step(&job, round, model, step)?;
                }
                if let Some(r) = self.running.as_mut() {
                    r.runner.handle(
                        now,
                        Input::AggregationDone {
                            round,
                            model,
                            metrics: BTreeMap::new(),
                        },
                    );
                }
            }
            Action::Disconnect { site, conn, reason } => {
                self.note(&format!("runner disconnect {site} {}", conn.0));
                if let Some(e) = self
                    .sites
                    .close(&site, conn, actions::close_reason(&reason))
                {
                    self.execute_effect(e)?;
                }
            }
            Action::JobFinished(outcome) => {
                self.note(&format!("finished {outcome:?}"));
                if matches!(outcome, JobOutcome::Completed { .. }) {
                    self.stats.jobs_completed += 1;
                }
                self.job_finished(&job, outcome)?;
            }
            other @ (Action::SendModel { .. } | Action::Evaluate { .. }) => {
                self.note(&format!("{other:?}"))
            }
        }
        Ok(())
    }

    /// One step of a round's end, as the driver executes it: the model
    /// stored, `round.json` written, `round.aggregated` and its messages;
    /// at the publish, both must be there for the model, and the model
    /// stored.
    fn round_end_step(
        &mut self,
        job: &str,
        round: RoundId,
        model: ModelHash,
        step: round_end::Step,
    ) -> Result<(), Violation> {
        use round_end::Step;
        match step {
            Step::StoreModel { model } => {
                self.note("store model");
                self.models_stored.insert(model);
            }
            Step::WriteRoundFile { round } => {
                self.note(&format!("round.json r{}", round.0));
                self.round_files.insert((job.to_owned(), round.0), model);
            }
            Step::Record(effects) => {
                self.run_effects(job, effects)?;
            }
            Step::Publish { model: published } => {
                self.note(&format!("publish r{round}"));
                let key = (job.to_owned(), round.0);
                if published != model
                    || self.round_files.get(&key) != Some(&model)
                    || self.aggregated_on_record.get(&key) != Some(&model.to_hex())
                    || !self.models_stored.contains(&model)
                {
                    return Err(self.violation(format!(
                        "{job}: round {round}'s model published without its stored file, round.json \
                         and round.aggregated (round.json {:?}, on record {:?})",
                        self.round_files.get(&key),
                        self.aggregated_on_record.get(&key)
                    )));
                }
            }
            Step::AuditEvaluation { effects, .. } => {
                self.run_effects(job, effects)?;
            }
            Step::SyncSpool => self.note("SyncSpool"),
            Step::SetRoundTimes { round } => self.note(&format!("SetRoundTimes r{round}")),
            Step::RecordEvaluation { round, evaluation } => {
                self.note(&format!("RecordEvaluation r{round} {evaluation:?}"))
            }
            other @ Step::NextState { .. } => self.note(&format!("{other:?}")),
            Step::Prune { rounds } => {
                let rounds: Vec<String> = rounds.iter().map(|r| format!("r{r}")).collect();
                self.note(&format!("Prune {}", rounds.join(",")))
            }
        }
        Ok(())
    }

    /// The running job's facts for the core's decisions.
    fn facts(&self, job: &str) -> Result<JobFacts, Violation> {
        match (FederationId::new("sim-federation"), JobId::new(job)) {
            (Ok(federation), Ok(id)) => Ok(JobFacts {
                federation,
                job: id,
                actor: Identity::new(
                    FEDERATION,
                    Role::Coordinator,
                    fedlink_certs::COORDINATOR_NAME,
                )
                .map_err(|e| self.violation(format!("the coordinator identity: {e}")))?
                .to_uri(),
            }),
            _ => Err(self.violation(format!("{job} is not a valid job id"))),
        }
    }

    /// `JobFinished` through the core ([`actions::job_finished`]): the
    /// final evaluation, when the sites are asked for it, is answered at
    /// once ([`actions::evaluation_finished`]). The job must end exactly
    /// once, with its machine's outcome.
    fn job_finished(&mut self, job: &str, outcome: JobOutcome) -> Result<(), Violation> {
        let facts = self.facts(job)?;
        let Some(r) = self.running.as_ref() else {
            return Ok(());
        };
        let completed_rounds = r.runner.completed_rounds();
        let cfg = self.jobs[r.job].cfg.clone();
        let names = self.sites.connected();
        let sites = names
            .iter()
            .map(|s| Connected {
                site: s.clone(),
                protocol_version: self.sites.protocol_version(s),
            })
            .collect();
        let next_queued = queue::next_job(&self.queue, Some(job), |id| {
            self.jobs
                .iter()
                .position(|j| j.id == id)
                .is_some_and(|j| self.snapshot(j).outcome.is_none())
        })
        .is_some();
        let Some(arch) = self.offer_job.as_ref().map(|j| j.arch.clone()) else {
            return Err(self.violation("the simulated job's terms do not parse"));
        };
        let end = actions::job_finished(
            &facts,
            Finishing {
                outcome: outcome.clone(),
                open_round: self.open_round.take(),
                completed_rounds,
                sites,
                next_queued,
                evaluation: FinalEvaluation {
                    rounds: cfg.rounds,
                    every_rounds: cfg.evaluate_every,
                    arch,
                    scaling: None,
                    deadline: self.now + cfg.deadline,
                },
            },
        );
        let asked: Vec<SiteId> = end
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send {
                    site,
                    message: Message::EvalRequest(_),
                } => Some(site.clone()),
                _ => None,
            })
            .collect();
        let mut sent = self.run_effects(job, end.effects)?;
        if let Some(req) = end.requested {
            self.stats.evaluations_requested += 1;
            let evaluation = self.evaluate_final(job, &facts, req, &asked)?;
            let effects = actions::evaluation_finished(
                &facts,
                evaluation,
                outcome.clone(),
                &names,
                next_queued,
            );
            let more = self.run_effects(job, effects)?;
            sent.byes += more.byes;
            sent.finished.extend(more.finished);
        }
        if sent.finished != [outcome.clone()] {
            return Err(self.violation(format!(
                "{job}: ended {:?}, its machine's outcome is {outcome:?}",
                sent.finished
            )));
        }
        if next_queued && sent.byes > 0 {
            return Err(self.violation(format!(
                "{job}: told its sites Bye with a job queued behind it"
            )));
        }
        Ok(())
    }

    /// The final model's evaluation, answered by the virtual sites: each
    /// asked site reports once, twice, for another model or not at all, and
    /// a site not asked may report too; each report goes through the
    /// core's decisions ([`super::evaluation::RequestedEvaluation`],
    /// [`actions::eval_reported`]). Every report is on record exactly once
    /// (`eval.accepted` when it counts, else `eval.rejected`), the
    /// evaluation counts exactly the accepted reports, and every asked site
    /// is either counted or listed as left out.
    fn evaluate_final(
        &mut self,
        job: &str,
        facts: &JobFacts,
        mut req: super::evaluation::RequestedEvaluation,
        asked: &[SiteId],
    ) -> Result<FederatedEvaluation, Violation> {
        let expected = req.expected().clone();
        let mut reports: Vec<(SiteId, ModelHash)> = Vec::new();
        for site in asked {
            match self.below(6) {
                0 => {} // no report before the deadline
                1 => reports.push((site.clone(), ModelHash([0xee; 32]))),
                2 => {
                    reports.push((site.clone(), expected.model));
                    reports.push((site.clone(), expected.model));
                }
                _ => reports.push((site.clone(), expected.model)),
            }
        }
        if self.below(3) == 0
            && let Some(other) = self.vsites.iter().find(|v| !asked.contains(&v.name))
        {
            reports.push((other.name.clone(), expected.model));
        }
        let mut accepted = BTreeSet::new();
        for (site, model) in reports {
            let examples = 1 + self.below(100);
            let Some(v) = self.vsites.iter().find(|v| v.name == site) else {
                return Err(self.violation(format!("{site} is no virtual site")));
            };
            let site_id = site.clone();
            let key = self.update_key(site.as_str(), v.key);
            let report = EvalReport {
                protocol_version: fedlink_protocol::PROTOCOL_VERSION,
                federation_id: expected.federation_id.clone(),
                site_id,
                job_id: expected.job_id.clone(),
                round: expected.round,
                model,
                metrics: EvalMetrics {
                    num_eval_examples: examples,
                    loss: Some(0.25),
                    accuracy: Some(0.75),
                    ..EvalMetrics::default()
                },
            };
            let signed = sign_eval_report(&key, report);
            let verdict = req.handle_report(site.as_str(), &signed, &self.keys);
            let effects =
                actions::eval_reported(facts, &site, &signed.report, verdict.as_ref().map(|_| ()));
            let want = if verdict.is_ok() {
                fedlink_audit::EventKind::EvalAccepted
            } else {
                fedlink_audit::EventKind::EvalRejected
            };
            if !matches!(effects.as_slice(), [Effect::AppendAudit { event, .. }] if event.kind() == want)
            {
                return Err(self.violation(format!(
                    "{job}: the report of {site} ({verdict:?}) is on record as {effects:?}"
                )));
            }
            self.note(&format!("eval report {site} {verdict:?}"));
            self.run_effects(job, effects)?;
            if verdict.is_ok() {
                self.stats.eval_reports_accepted += 1;
                if !accepted.insert(site.as_str().to_owned()) {
                    return Err(self.violation(format!("{job}: {site}'s report counted twice")));
                }
            } else {
                self.stats.eval_reports_refused += 1;
            }
        }
        let evaluation = req.finish();
        let counted: BTreeSet<String> = evaluation.sites.iter().map(|s| s.site.clone()).collect();
        if counted != accepted {
            return Err(self.violation(format!(
                "{job}: the final evaluation counts {counted:?}, the accepted reports are {accepted:?}"
            )));
        }
        for site in asked {
            let left_out = evaluation.excluded.iter().any(|x| x.site == site.as_str());
            if counted.contains(site.as_str()) == left_out {
                return Err(self.violation(format!(
                    "{job}: asked site {site} is counted: {}, left out: {left_out}",
                    counted.contains(site.as_str())
                )));
            }
        }
        Ok(evaluation)
    }

    /// Execute what the core decided for one action, checking that every
    /// change follows an audit append, that the messages name the running
    /// job, and that an upload is answered at most once.
    fn run_effects(&mut self, job: &str, effects: Vec<Effect>) -> Result<Sent, Violation> {
        let mut sent = Sent::default();
        let mut audited = false;
        let mut answered = BTreeSet::new();
        for effect in effects {
            if effect.changes_state() && !audited {
                return Err(self.violation(format!("{effect:?} before its audit append")));
            }
            match effect {
                Effect::AppendAudit { event, .. } => {
                    let (kind, details) = self.written(&event)?;
                    self.on_record(job, kind, &details, &mut sent)?;
                    audited = true;
                }
                Effect::AppendAuditBatch { entries, .. } => {
                    self.note(&format!("audit batch of {}", entries.len()));
                    for event in &entries {
                        let (kind, details) = self.written(event)?;
                        self.on_record(job, kind, &details, &mut sent)?;
                    }
                    audited |= !entries.is_empty();
                }
                Effect::Send { site, message } => {
                    self.deliver(job, &site, message, audited, &mut sent)?
                }
                Effect::PushHead { sites } => {
                    let names: Vec<&str> = sites.iter().map(SiteId::as_str).collect();
                    self.note(&format!("head {}", names.join(",")));
                }
                Effect::RecordRejected { round, rejected } => {
                    self.note(&format!("record rejected {} r{round}", rejected.site));
                    sent.rejections += 1;
                }
                Effect::RecordAccepted { round, detail } => {
                    self.note(&format!("record accepted {} r{round}", detail.site));
                }
                Effect::DiscardSpool { site, round } => {
                    self.note(&format!("discard {site} r{round}"))
                }
                Effect::RetractFold { site, round } => {
                    self.note(&format!("retract {site} r{round}"))
                }
                Effect::AnswerUpload {
                    site,
                    round,
                    result,
                } => {
                    self.note(&format!("answer {site} r{round} {result:?}"));
                    if !answered.insert((site.clone(), round)) {
                        return Err(self.violation(format!(
                            "{job}: the upload of {site} in round {round} was answered twice"
                        )));
                    }
                    sent.answers += 1;
                }
                Effect::RecordFinalEvaluation { round, .. } => {
                    self.note(&format!("record final evaluation r{round}"));
                }
                Effect::Finish(outcome) => {
                    self.note(&format!("finish {outcome:?}"));
                    sent.finished.push(outcome);
                }
                other @ (Effect::Close { .. }
                | Effect::Persist { .. }
                | Effect::Apply(_)
                | Effect::SaveManifest(_)
                | Effect::SaveRevocations(_)
                | Effect::ReloadRegistry) => {
                    return Err(
                        self.violation(format!("a round action's decision emitted {other:?}"))
                    );
                }
            }
        }
        Ok(sent)
    }

    /// An audit entry of `job` appended: it names the job; an `offer.sent`
    /// puts its (site, round) on record for the offer that follows.
    /// An event's name and its details as the driver writes them.
    fn written(
        &mut self,
        event: &fedlink_audit::CoordEvent,
    ) -> Result<(fedlink_audit::EventKind, serde_json::Value), Violation> {
        match event.details() {
            Ok(details) => Ok((event.kind(), details)),
            Err(e) => Err(self.violation(format!("{} cannot be written: {e}", event.kind()))),
        }
    }

    fn on_record(
        &mut self,
        job: &str,
        kind: fedlink_audit::EventKind,
        details: &serde_json::Value,
        sent: &mut Sent,
    ) -> Result<(), Violation> {
        if details["job"] != job {
            return Err(self.violation(format!("{kind} of {job} names job {}", details["job"])));
        }
        self.note(&format!("audit {kind}"));
        if kind == fedlink_audit::EventKind::RoundAggregated
            && let (Some(round), Some(model)) =
                (details["round"].as_u64(), details["output_model"].as_str())
        {
            self.aggregated_on_record
                .insert((job.to_owned(), round), model.to_owned());
        }
        if kind == fedlink_audit::EventKind::OfferSent {
            match (details["site"].as_str(), details["round"].as_u64()) {
                (Some(site), Some(round)) => {
                    sent.on_record.insert((site.to_owned(), round));
                }
                _ => {
                    return Err(self.violation(format!(
                        "{job}: an offer.sent entry without its site or round: {details}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A message to `site`: dropped if it is not connected (as the driver
    /// does), else received by the virtual site.
    fn deliver(
        &mut self,
        job: &str,
        site: &SiteId,
        message: Message,
        audited: bool,
        sent: &mut Sent,
    ) -> Result<(), Violation> {
        let named = match &message {
            Message::TaskOfferV6(o) => Some(o.job_id.as_str()),
            Message::Cancel(c) => Some(c.job_id.as_str()),
            Message::RoundOutcome(o) => Some(o.job_id.as_str()),
            Message::EvalRequest(r) => Some(r.job_id.as_str()),
            _ => None,
        };
        if named.is_some_and(|n| n != job) {
            return Err(self.violation(format!("a message of {job} to {site} names {named:?}")));
        }
        let Some(v) = self
            .vsites
            .iter_mut()
            .find(|v| &v.name == site && v.conn.is_some())
        else {
            self.note(&format!("dropped: {site} is not connected"));
            return Ok(());
        };
        let name = message_name(&message);
        match message {
            Message::TaskOfferV6(o) => {
                if !sent
                    .on_record
                    .contains(&(site.as_str().to_owned(), o.round.0))
                {
                    return Err(self.violation(format!(
                        "{job}: an offer to {site} for round {} before its offer.sent append",
                        o.round.0
                    )));
                }
                if !self.rounds_opened.contains(&(job.to_owned(), o.round)) {
                    return Err(self.violation(format!(
                        "{job}: an offer to {site} for round {} before the round.opened entry",
                        o.round.0
                    )));
                }
                v.offers.push((job.to_owned(), o.round, o.base_model));
                if std::mem::take(&mut v.approved) {
                    self.stats.approved_joined += 1;
                }
                sent.offers += 1;
            }
            // The site stops working on the round.
            Message::Cancel(c) => v
                .training
                .retain(|(j, round, _)| j != job || *round != c.round),
            Message::RoundOutcome(_) | Message::EvalRequest(_) if !audited => {
                return Err(self.violation(format!(
                    "{job}: a model's hash or an evaluation request to {site} before its audit append"
                )));
            }
            Message::Bye(_) => sent.byes += 1,
            _ => {}
        }
        self.note(&format!("deliver {site} {name}"));
        Ok(())
    }

    fn execute_effect(&mut self, effect: Effect) -> Result<(), Violation> {
        match effect {
            other @ (Effect::AppendAudit { .. }
            | Effect::AppendAuditBatch { .. }
            | Effect::Persist { .. }
            | Effect::Apply(_)
            | Effect::Send { .. }
            | Effect::PushHead { .. }
            | Effect::RecordRejected { .. }
            | Effect::RecordAccepted { .. }
            | Effect::DiscardSpool { .. }
            | Effect::RetractFold { .. }
            | Effect::AnswerUpload { .. }
            | Effect::RecordFinalEvaluation { .. }
            | Effect::Finish(_)
            | Effect::SaveManifest(_)
            | Effect::SaveRevocations(_)
            | Effect::ReloadRegistry) => {
                return Err(self.violation(format!("the site table emitted {other:?}")));
            }
            Effect::Close { conn, reason } => {
                self.note(&format!("close {} {reason:?}", conn.0));
                if let Some(site) = self.sites.site_of(conn) {
                    return Err(self.violation(format!(
                        "{conn:?} was closed but is still {site}'s current connection"
                    )));
                }
                let Some(v) = self.vsites.iter_mut().find(|v| v.conn == Some(conn)) else {
                    return Err(self.violation(format!(
                        "{conn:?} was closed but is no site's current connection"
                    )));
                };
                v.conn = None;
                v.conn_cert = None;
                v.old.push(conn);
                v.offers.clear();
                v.training.clear();
            }
        }
        Ok(())
    }

    /// The process dies: connections end, the round machine's memory is
    /// lost. The restart recovers the running job from its durable log.
    fn crash(&mut self) -> Result<(), Violation> {
        self.crash_in = None;
        self.stats.crashes += 1;
        self.note("crash");
        for v in &mut self.vsites {
            if let Some(c) = v.conn.take() {
                v.old.push(c);
            }
            v.conn_cert = None;
            v.offers.clear();
            v.training.clear();
        }
        self.sites = Sites::new();
        // The restart loads the registry files: they are what the last
        // executed saves wrote.
        if let Some(m) = &self.last_saved.0
            && *m != self.files.manifest
        {
            return Err(self.violation("sites.toml after the crash is not the last one saved"));
        }
        if let Some(r) = &self.last_saved.1
            && *r != self.files.revoked
        {
            return Err(self.violation("revoked.toml after the crash is not the last one saved"));
        }
        self.reload()?;
        // The driver's memory is lost with it.
        self.open_round = None;
        self.rounds_opened.clear();
        self.uploads.clear();
        let Some(r) = self.running.take() else {
            return Ok(());
        };
        let job = self.jobs[r.job].id.clone();
        // The round in flight is re-opened: its acknowledged updates are
        // discarded (audited as round.discarded) and requested again.
        let snapshot = self.snapshot(r.job);
        // The model the restart takes as the job's (its last completed
        // round's) was published: its file, round.json and round.aggregated
        // are there.
        let key = (job.clone(), snapshot.completed_rounds);
        if snapshot.completed_rounds > 0
            && (!self.models_stored.contains(&snapshot.model)
                || self.round_files.get(&key) != Some(&snapshot.model)
                || self.aggregated_on_record.get(&key) != Some(&snapshot.model.to_hex()))
        {
            return Err(self.violation(format!(
                "{job}: the restart recovers round {}'s model without its file, round.json or round.aggregated",
                snapshot.completed_rounds
            )));
        }
        let completed = snapshot.completed_rounds;
        self.acked
            .retain(|(j, round, _)| *j != job || round.0 <= completed);
        if snapshot.outcome.is_none() {
            self.running = Some(Running {
                job: r.job,
                runner: JobRunner::resume(self.jobs[r.job].cfg.clone(), snapshot),
            });
        }
        Ok(())
    }

    /// What `Store::recover` makes of a job's durable log.
    fn snapshot(&self, job: usize) -> Snapshot {
        let mut s = Snapshot {
            completed_rounds: 0,
            model: self.jobs[job].initial,
            paused: false,
            outcome: None,
        };
        for cp in self.durable.get(&self.jobs[job].id).into_iter().flatten() {
            match cp {
                Checkpoint::RoundCompleted { round, model, .. } => {
                    s.completed_rounds = round.0;
                    s.model = *model;
                }
                Checkpoint::Paused(p) => s.paused = *p,
                Checkpoint::JobFinished(o) => s.outcome = Some(o.clone()),
                _ => {}
            }
        }
        s
    }

    /// Start the next queued job when none runs or the running one has
    /// finished, handing it every held site (the same way after an empty
    /// start and after a job switch).
    fn start_next(&mut self) -> Result<(), Violation> {
        let current = self.job_id();
        if self
            .running
            .as_ref()
            .is_some_and(|r| !r.runner.is_finished())
        {
            return Ok(());
        }
        let next = queue::next_job(&self.queue, current.as_deref(), |id| {
            self.jobs
                .iter()
                .position(|j| j.id == id)
                .is_some_and(|j| self.snapshot(j).outcome.is_none())
        })
        .map(str::to_owned);
        // A finished job hands over to the next queued one as the driver
        // decides it ([`super::jobs::after_finish`]; the simulated
        // coordinator never exits); with none running, the first queued
        // job starts.
        let next = match (current.is_some(), next) {
            (true, next) => match super::jobs::after_finish(next, false) {
                super::jobs::AfterFinish::Switch(id) => id,
                super::jobs::AfterFinish::Exit | super::jobs::AfterFinish::Stay => return Ok(()),
            },
            (false, Some(id)) => id,
            (false, None) => return Ok(()),
        };
        let Some(j) = self.jobs.iter().position(|x| x.id == next) else {
            return Ok(());
        };
        self.note(&format!("start {next}"));
        if current.is_some() {
            self.stats.job_switches += 1;
        }
        if !self.sites.is_empty() {
            self.stats.handovers_with_sites += 1;
        }
        let runner = JobRunner::resume(self.jobs[j].cfg.clone(), self.snapshot(j));
        self.running = Some(Running { job: j, runner });
        self.drain()?;
        for input in self.sites.hand_over(&super::JobNeeds::ANY) {
            // A crash during the hand-over ends the connections not yet
            // handed over.
            if let Input::SiteConnected { site, conn, .. } = &input
                && self.sites.conn_of(site) != Some(*conn)
            {
                continue;
            }
            self.feed(input)?;
        }
        Ok(())
    }

    /// The invariants that hold between steps.
    fn check(&self) -> Result<(), Violation> {
        for v in &self.vsites {
            if self.sites.conn_of(&v.name) != v.conn {
                return Err(self.violation(format!(
                    "{} holds {:?} but the core has {:?}",
                    v.name,
                    v.conn,
                    self.sites.conn_of(&v.name)
                )));
            }
            if v.conn.is_some() && self.may_contribute(&v.name).is_err() {
                return Err(self.violation(format!(
                    "{} is still connected but not allowed: {:?}",
                    v.name,
                    self.may_contribute(&v.name)
                )));
            }
            if let Some(cert) = v.conn_cert
                && let Some(i) = self.vsites.iter().position(|w| w.name == v.name)
                && let Err(why) = self.peer_allowed(i, cert)
            {
                return Err(self.violation(format!("{} holds a connection: {why}", v.name)));
            }
        }
        if let Some(r) = &self.running
            && !r.runner.is_finished()
        {
            let held = self.sites.connected();
            let seen = r.runner.connected_sites();
            if held != seen {
                return Err(self.violation(format!(
                    "{}: the core holds {held:?}, the job's round machine sees {seen:?}",
                    self.jobs[r.job].id
                )));
            }
        }
        Ok(())
    }
}
