//! Test support: a deterministic simulation of one [`JobRunner`] with N
//! scripted fake sites and a virtual clock. No sockets, no threads, no
//! sleeps: the clock jumps from one scheduled event to the next.
//!
//! The simulation plays the driver's part too: it executes the runner's
//! actions (records checkpoints, delivers offers to the fake sites,
//! "aggregates" by hashing the accepted updates) and feeds the sites'
//! answers back as [`Input`]s after a fixed network delay.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use fedlink_coordinator::round::{RoundConfig, JobOutcome, SiteId};
//! use fedlink_coordinator::round::sim::{Sim, SiteScript};
//!
//! let cfg = RoundConfig {
//!     rounds: 3, seed: 1, fraction: 1.0, min_sites: 2, gather: Duration::from_secs(1),
//!     max_sites: 10, quorum: 2,
//!     deadline: Duration::from_secs(60), extension: Duration::ZERO, max_attempts: 1,
//!     evaluate_every: 1, allow: None,
//! };
//! let sites = vec![
//!     SiteScript::honest(SiteId::new("a")?, Duration::from_secs(5)),
//!     SiteScript::honest(SiteId::new("b")?, Duration::from_secs(7)),
//! ];
//! let mut sim = Sim::new(cfg, sites, Instant::now());
//! let outcome = sim.drive(Duration::from_secs(3600));
//! assert!(matches!(outcome, Some(JobOutcome::Completed { .. })));
//! assert_eq!(sim.aggregates().len(), 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fedlink_protocol::ModelHash;

use super::{
    AcceptedUpdate, Action, AdminCommand, Checkpoint, ConnId, Input, JobOutcome, JobRunner,
    RejectReason, RoundConfig, RoundId, SiteCapabilities, SiteId, UpdateReceived, Verdict,
};

/// What a fake site does. Times `at` are virtual times since the start of
/// the simulation; `train` is the time from receiving the model to
/// uploading.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Accepts every offer and uploads a valid update `train` later. A long
    /// `train` makes a straggler.
    Honest {
        /// Training time.
        train: Duration,
    },
    /// Like `Honest`, but ignores [`Action::CancelTask`] and a newer
    /// offer: it uploads every training it started, however late.
    Straggler {
        /// Training time.
        train: Duration,
    },
    /// Declines every offer.
    Decline,
    /// Accepts offers and never uploads.
    Silent,
    /// Honest, but disconnects for good at `at`.
    DropoutAt {
        /// Disconnection time.
        at: Duration,
        /// Training time.
        train: Duration,
    },
    /// Honest, but disconnects at `at` and reconnects `after` later
    /// (training in progress is lost).
    Reconnects {
        /// Disconnection time.
        at: Duration,
        /// Time offline.
        after: Duration,
        /// Training time.
        train: Duration,
    },
    /// Honest, then sends the same update again `again_after` later.
    Duplicate {
        /// Training time.
        train: Duration,
        /// Delay of the second upload.
        again_after: Duration,
    },
    /// Uploads an update the driver finds invalid.
    Invalid {
        /// Training time.
        train: Duration,
    },
    /// Uploads an update trained on a wrong base model.
    StaleModel {
        /// Training time.
        train: Duration,
    },
}

impl Behaviour {
    fn train(&self) -> Option<Duration> {
        match self {
            Self::Honest { train }
            | Self::Straggler { train }
            | Self::DropoutAt { train, .. }
            | Self::Reconnects { train, .. }
            | Self::Duplicate { train, .. }
            | Self::Invalid { train }
            | Self::StaleModel { train } => Some(*train),
            Self::Decline | Self::Silent => None,
        }
    }
}

/// A fake site: its id, behaviour and when it first connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteScript {
    /// Site id.
    pub id: SiteId,
    /// Behaviour.
    pub behaviour: Behaviour,
    /// First connection time.
    pub connect_at: Duration,
    /// Training examples it claims.
    pub num_examples: u64,
    /// Whether it reports itself compatible with the job.
    pub compatible: bool,
}

impl SiteScript {
    /// A site with this behaviour, connecting at time 0, 100 examples.
    pub fn new(id: SiteId, behaviour: Behaviour) -> Self {
        Self {
            id,
            behaviour,
            connect_at: Duration::ZERO,
            num_examples: 100,
            compatible: true,
        }
    }

    /// An honest site.
    pub fn honest(id: SiteId, train: Duration) -> Self {
        Self::new(id, Behaviour::Honest { train })
    }

    /// Same site, first connecting at `at`.
    #[must_use]
    pub fn connecting_at(mut self, at: Duration) -> Self {
        self.connect_at = at;
        self
    }
}

/// What happened to one fake site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteRecord {
    /// Rounds it was offered (one entry per offer received).
    pub offers: Vec<RoundId>,
    /// Rounds whose update was acknowledged.
    pub acked: Vec<RoundId>,
    /// Rejected uploads.
    pub rejected: Vec<(RoundId, RejectReason)>,
    /// Rounds it was told to cancel.
    pub cancelled: Vec<RoundId>,
    /// Uploads it sent.
    pub uploads: u32,
    /// Connections the coordinator closed.
    pub kicked: u32,
}

#[derive(Debug)]
struct SimSite {
    script: SiteScript,
    conn: Option<ConnId>,
    training: Option<(RoundId, u64)>,
    gen_counter: u64,
    record: SiteRecord,
}

#[derive(Clone, Debug)]
enum Event {
    Connect(SiteId),
    Disconnect(SiteId),
    ToCoordinator(Input),
    Upload {
        site: SiteId,
        round: RoundId,
        base: ModelHash,
        generation: u64,
        resend: bool,
    },
    Aggregated {
        round: RoundId,
        model: ModelHash,
    },
}

/// Lets a test replace parts of the simulated driver (e.g. persist into a
/// real [`crate::store::Store`], aggregate into real model files).
pub trait SimHooks {
    /// Called for every checkpoint, before the actions that follow it run.
    fn persist(&mut self, checkpoint: &Checkpoint) {
        let _ = checkpoint;
    }
    /// The model an aggregation produces; `None`: a fake hash of the inputs.
    fn aggregate(
        &mut self,
        round: RoundId,
        base_model: ModelHash,
        updates: &[AcceptedUpdate],
    ) -> Option<ModelHash> {
        let _ = (round, base_model, updates);
        None
    }
}

struct Hooks(Box<dyn SimHooks>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimHooks")
    }
}

/// One runner, N fake sites, a virtual clock.
#[derive(Debug)]
pub struct Sim {
    hooks: Option<Hooks>,
    runner: JobRunner,
    epoch: Instant,
    now: Instant,
    seq: u64,
    next_conn: u64,
    queue: BTreeMap<(Instant, u64), Event>,
    sites: BTreeMap<SiteId, SimSite>,
    log: Vec<(Duration, Action)>,
    aggregates: Vec<(RoundId, Vec<AcceptedUpdate>)>,
    /// One-way network delay of every message.
    pub net_delay: Duration,
    /// Time an aggregation takes.
    pub aggregation_time: Duration,
}

/// A deterministic stand-in for a content hash.
pub fn fake_hash(parts: &[&[u8]]) -> ModelHash {
    let mut h = blake3::Hasher::new_derive_key("fedlink 2025 sim fake hash");
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    ModelHash(*h.finalize().as_bytes())
}

/// The initial model hash [`Sim::new`] uses.
pub fn initial_model() -> ModelHash {
    fake_hash(&[b"initial"])
}

impl Sim {
    /// A simulation of a fresh job. `epoch` is only an origin: every time
    /// is `epoch` plus a virtual offset.
    pub fn new(cfg: RoundConfig, sites: Vec<SiteScript>, epoch: Instant) -> Self {
        Self::with_runner(JobRunner::new(cfg, initial_model()), sites, epoch)
    }

    /// A simulation around an existing runner (e.g. a resumed one).
    pub fn with_runner(runner: JobRunner, sites: Vec<SiteScript>, epoch: Instant) -> Self {
        Self::build(runner, sites, epoch, None)
    }

    /// A simulation around an existing runner, with driver hooks.
    pub fn with_hooks(
        runner: JobRunner,
        sites: Vec<SiteScript>,
        epoch: Instant,
        hooks: Box<dyn SimHooks>,
    ) -> Self {
        Self::build(runner, sites, epoch, Some(Hooks(hooks)))
    }

    fn build(
        runner: JobRunner,
        sites: Vec<SiteScript>,
        epoch: Instant,
        hooks: Option<Hooks>,
    ) -> Self {
        let mut sim = Self {
            hooks,
            runner,
            epoch,
            now: epoch,
            seq: 0,
            next_conn: 1,
            queue: BTreeMap::new(),
            sites: BTreeMap::new(),
            log: Vec::new(),
            aggregates: Vec::new(),
            net_delay: Duration::from_millis(5),
            aggregation_time: Duration::from_millis(50),
        };
        for s in sites {
            let id = s.id.clone();
            sim.schedule_at(s.connect_at, Event::Connect(id.clone()));
            match s.behaviour {
                Behaviour::DropoutAt { at, .. } => {
                    sim.schedule_at(at, Event::Disconnect(id.clone()))
                }
                Behaviour::Reconnects { at, after, .. } => {
                    sim.schedule_at(at, Event::Disconnect(id.clone()));
                    sim.schedule_at(at + after, Event::Connect(id.clone()));
                }
                _ => {}
            }
            sim.sites.insert(
                id,
                SimSite {
                    script: s,
                    conn: None,
                    training: None,
                    gen_counter: 0,
                    record: SiteRecord::default(),
                },
            );
        }
        // A resumed runner may have actions already.
        sim.drain();
        sim
    }

    /// The runner.
    pub fn runner(&self) -> &JobRunner {
        &self.runner
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.epoch
    }

    /// The instant at virtual time `at`.
    pub fn instant(&self, at: Duration) -> Instant {
        self.epoch + at
    }

    /// Every action the runner emitted, with its virtual time.
    pub fn actions(&self) -> &[(Duration, Action)] {
        &self.log
    }

    /// Every checkpoint, in order.
    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Persist(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every aggregation requested: round and updates.
    pub fn aggregates(&self) -> &[(RoundId, Vec<AcceptedUpdate>)] {
        &self.aggregates
    }

    /// What happened to a site.
    pub fn site(&self, id: &SiteId) -> Option<&SiteRecord> {
        self.sites.get(id).map(|s| &s.record)
    }

    /// The job outcome, once finished.
    pub fn outcome(&self) -> Option<JobOutcome> {
        self.log.iter().find_map(|(_, a)| match a {
            Action::JobFinished(o) => Some(o.clone()),
            _ => None,
        })
    }

    /// Deliver `input` to the runner at virtual time `at`.
    pub fn inject(&mut self, at: Duration, input: Input) {
        self.schedule_at(at, Event::ToCoordinator(input));
    }

    /// An admin command at virtual time `at`.
    pub fn admin(&mut self, at: Duration, cmd: AdminCommand) {
        self.inject(at, Input::Admin(cmd));
    }

    fn schedule_at(&mut self, at: Duration, ev: Event) {
        let t = (self.epoch + at).max(self.now);
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn schedule_in(&mut self, delay: Duration, ev: Event) {
        let at = self.elapsed() + delay;
        self.schedule_at(at, ev);
    }

    /// Process the next event (or the runner's timeout, whichever is
    /// earlier) and execute the resulting actions. `false` when nothing is
    /// left to do.
    pub fn step(&mut self) -> bool {
        let next = self.queue.keys().next().copied();
        let timeout = self.runner.poll_timeout();
        let event = match (next, timeout) {
            (None, None) => return false,
            (Some(key), Some(t)) if key.0 < t => Some(key),
            (Some(key), None) => Some(key),
            (_, Some(_)) => None,
        };
        match (event, timeout) {
            (Some(key), _) => {
                let Some(ev) = self.queue.remove(&key) else {
                    return false;
                };
                self.now = self.now.max(key.0);
                self.process(ev);
            }
            (None, Some(t)) => {
                self.now = self.now.max(t);
                self.runner.handle(self.now, Input::Timeout);
            }
            (None, None) => return false,
        }
        self.drain();
        true
    }

    /// Step until nothing is left or virtual time passes `limit`; the
    /// outcome if the job finished.
    pub fn drive(&mut self, limit: Duration) -> Option<JobOutcome> {
        let mut steps = 0u32;
        while self.elapsed() <= limit && steps < 1_000_000 && self.step() {
            steps += 1;
        }
        self.outcome()
    }

    /// Step until virtual time would pass `until` (events at `until` run).
    pub fn run_until(&mut self, until: Duration) {
        let limit = self.epoch + until;
        loop {
            let next = self.queue.keys().next().map(|k| k.0);
            let timeout = self.runner.poll_timeout();
            let earliest = match (next, timeout) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => break,
            };
            if earliest > limit || !self.step() {
                break;
            }
        }
        self.now = self.now.max(limit);
    }

    fn handle(&mut self, input: Input) {
        self.runner.handle(self.now, input);
    }

    fn process(&mut self, ev: Event) {
        match ev {
            Event::Connect(id) => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                let Some(s) = self.sites.get_mut(&id) else {
                    return;
                };
                s.conn = Some(conn);
                let capabilities = SiteCapabilities {
                    compatible: s.script.compatible,
                    num_examples: Some(s.script.num_examples),
                };
                self.handle(Input::SiteConnected {
                    site: id,
                    conn,
                    capabilities,
                });
            }
            Event::Disconnect(id) => {
                let Some(s) = self.sites.get_mut(&id) else {
                    return;
                };
                s.training = None;
                if let Some(conn) = s.conn.take() {
                    self.handle(Input::SiteDisconnected { site: id, conn });
                }
            }
            Event::ToCoordinator(input) => self.handle(input),
            Event::Upload {
                site,
                round,
                base,
                generation,
                resend,
            } => self.upload(site, round, base, generation, resend),
            Event::Aggregated { round, model } => self.handle(Input::AggregationDone {
                round,
                model,
                metrics: BTreeMap::from([("updates".to_owned(), 1.0)]),
            }),
        }
    }

    fn upload(
        &mut self,
        site: SiteId,
        round: RoundId,
        base: ModelHash,
        generation: u64,
        resend: bool,
    ) {
        let now_ms = self.elapsed().as_millis() as u64;
        let Some(s) = self.sites.get_mut(&site) else {
            return;
        };
        if s.conn.is_none() {
            return; // the connection died with the upload
        }
        let stubborn = matches!(s.script.behaviour, Behaviour::Straggler { .. });
        if !resend && !stubborn {
            if s.training != Some((round, generation)) {
                return; // cancelled or superseded
            }
            s.training = None;
        }
        s.record.uploads += 1;
        let verdict = match s.script.behaviour {
            Behaviour::Invalid { .. } => Verdict::Invalid("update norm is not finite".into()),
            _ => Verdict::Valid,
        };
        let base_model = match s.script.behaviour {
            Behaviour::StaleModel { .. } => fake_hash(&[b"stale"]),
            _ => base,
        };
        let again = match s.script.behaviour {
            Behaviour::Duplicate { again_after, .. } if !resend => Some(again_after),
            _ => None,
        };
        let update = UpdateReceived {
            site: site.clone(),
            round,
            base_model,
            payload_hash: fake_hash(&[
                site.as_str().as_bytes(),
                &round.0.to_le_bytes(),
                &generation.to_le_bytes(),
            ]),
            num_examples: s.script.num_examples,
            bytes: 1000,
            received_unix_ms: now_ms,
            verdict,
        };
        if let Some(after) = again {
            self.schedule_in(
                after,
                Event::Upload {
                    site: site.clone(),
                    round,
                    base,
                    generation,
                    resend: true,
                },
            );
        }
        self.handle(Input::UpdateReceived(update));
    }

    fn drain(&mut self) {
        while let Some(a) = self.runner.poll_action() {
            let at = self.elapsed();
            self.log.push((at, a.clone()));
            self.execute(a);
        }
    }

    fn execute(&mut self, a: Action) {
        let net = self.net_delay;
        match a {
            Action::Persist(c) => {
                if let Some(h) = &mut self.hooks {
                    h.0.persist(&c);
                }
            }
            Action::Evaluate { .. } | Action::JobFinished(_) => {}
            Action::SendOffer { site, offer } => {
                let Some(s) = self.sites.get_mut(&site) else {
                    return;
                };
                if s.conn.is_none() {
                    return;
                }
                s.record.offers.push(offer.round);
                let answer = match s.script.behaviour {
                    Behaviour::Decline => Input::OfferDeclined {
                        site,
                        round: offer.round,
                        reason: "busy".into(),
                    },
                    _ => Input::OfferAccepted {
                        site,
                        round: offer.round,
                    },
                };
                self.schedule_in(net, Event::ToCoordinator(answer));
            }
            Action::SendModel { site, round, model } => {
                let Some(s) = self.sites.get_mut(&site) else {
                    return;
                };
                if s.conn.is_none() {
                    return;
                }
                s.gen_counter += 1;
                let generation = s.gen_counter;
                s.training = Some((round, generation));
                if let Some(train) = s.script.behaviour.train() {
                    self.schedule_in(
                        net + train + net,
                        Event::Upload {
                            site,
                            round,
                            base: model,
                            generation,
                            resend: false,
                        },
                    );
                }
            }
            Action::AckUpdate { site, round } => {
                if let Some(s) = self.sites.get_mut(&site) {
                    s.record.acked.push(round);
                }
            }
            Action::RejectUpdate {
                site,
                round,
                reason,
            } => {
                if let Some(s) = self.sites.get_mut(&site) {
                    s.record.rejected.push((round, reason));
                }
            }
            Action::CancelTask { site, round } => {
                if let Some(s) = self.sites.get_mut(&site) {
                    s.record.cancelled.push(round);
                    if s.training.is_some_and(|(r, _)| r == round) {
                        s.training = None;
                    }
                }
            }
            Action::Aggregate {
                round,
                base_model,
                updates,
            } => {
                let mut parts: Vec<Vec<u8>> = vec![base_model.0.to_vec()];
                for u in &updates {
                    parts.push(u.site.as_str().as_bytes().to_vec());
                    parts.push(u.payload_hash.0.to_vec());
                }
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                let real = match &mut self.hooks {
                    Some(h) => h.0.aggregate(round, base_model, &updates),
                    None => None,
                };
                let model = real.unwrap_or_else(|| fake_hash(&refs));
                self.aggregates.push((round, updates));
                let t = self.aggregation_time;
                self.schedule_in(t, Event::Aggregated { round, model });
            }
            Action::Disconnect { site, conn, .. } => {
                if let Some(s) = self.sites.get_mut(&site) {
                    s.record.kicked += 1;
                    if s.conn == Some(conn) {
                        s.conn = None;
                        s.training = None;
                    }
                }
                // The driver reports the closed connection back.
                self.schedule_in(
                    Duration::ZERO,
                    Event::ToCoordinator(Input::SiteDisconnected { site, conn }),
                );
            }
        }
    }
}
