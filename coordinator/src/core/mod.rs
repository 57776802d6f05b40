//! The coordinator's sans-IO core: the decisions around the round machine
//! that do not depend on sockets, files or the clock.
//!
//! The core holds the site connections by opaque [`ConnId`] ([`Sites`]),
//! decides which job runs next ([`queue`]) and hands the held sites to
//! each job that starts — after an empty start and after a job switch
//! alike ([`Sites::hand_over`]). It answers with [`Effect`]s that the
//! driver (`crate::server`: the async runtime, the transport, files)
//! executes in order; the
//! driver maps a `ConnId` to whatever transport carries it.
//!
//! ```text
//!  driver ── connect/disconnect/recheck ──▶ Sites ──▶ Effect::Close{conn, reason} ──▶ driver
//!     │                                       │
//!     └── job starts (empty → first, job switch) ── Sites::hand_over(needs)
//!                                             └──▶ Input::SiteConnected… ──▶ JobRunner::handle(now, …)
//! ```
//!
//! Nothing in this module names the async runtime, the transport, the
//! filesystem or the clock
//! (a unit test below reads its own sources to keep it so). Time, where
//! it matters, is an argument. [`sim`] drives the core and the round
//! machine together with seeded faults and checks invariants after every
//! step.
//!
//! [`intake`] decides whether an upload's signed header may stream its
//! payload (round machine, signature, context, size, replay, claimed
//! weight), before a payload byte is read.
//!
//! [`uploads`] decides on an upload received whole while the round
//! machine has it (pass 1's outcome and the site's standing → the
//! machine's input; a second upload of the same site and round supersedes
//! the first; the acknowledged one counted or folded again, the refused
//! one on record, its one-pass fold taken out, its spool dropped, its site
//! answered) and on an upload cut short (kept for a resume or dropped).
//!
//! [`idle`] decides what a site's event gets while no job runs (an
//! evaluation report or an upload refused on record, a spool dropped, an
//! admin command that may let a queued job start), with the entries of a
//! running job's refusals.
//!
//! [`resume`] keeps what arrived of an upload a lost connection cut short,
//! for the site to send the rest; [`intake::verify_resume`] admits the
//! resumed upload (the same signed envelope).
//! [`evaluation`] decides which global models are evaluated (the job's
//! `[evaluation] every_rounds`), which sites' reported metrics count and
//! their example-weighted mean.
//!
//! [`admin`] turns pause / resume / abort of the running or a queued job,
//! a submitted job ([`admin::submission`], then [`admin::job_submitted`]
//! once the driver has the initial model), and `sites approve | revoke |
//! rotate` on the registry as loaded, into effects, the audit append
//! first. [`jobs`] decides which job runs at start-up and after a job
//! has finished, and builds a job's strategy. [`recovery`] decides how a
//! stored job is taken up again (the re-opened round's `round.discarded`,
//! the strategy's fit, the stored optimizer, scaling and replay state:
//! missing or corrupt) and how the configured job is created at start-up;
//! [`scaling`] pools the sites' feature statistics into the scaling that
//! offers carry.
//! [`served`] decides which model versions are served for download (the
//! current one and the one before it), which files of `models/` are pruned
//! and whether a restarted coordinator serves the last round's update
//! again.
//!
//! [`round_end`] orders an aggregated round's end (the model stored, the
//! spool's fsync, `round.json`, `round.aggregated`, the round's times, the
//! publish, a due federated evaluation — on record before it is kept —,
//! the next state, retention's pruning) and computes the round's metrics.
//!
//! The driver's guards decide here too: [`limits`] (the control-message
//! and handshake budgets, the connection caps), [`refusals`] (failed
//! handshakes counted per source and flushed as one summary each per
//! interval), [`disk`] (the free-space guard and its `disk.low` /
//! `disk.ok` entry) and [`registry`] (whether a site or an open
//! connection is still allowed, over the manifest and the revocation list
//! as data, and when their changed files are taken up again).
//! [`audit_head`] verifies a site's signed audit head against the update
//! key its manifest entry registers and picks its entry
//! (`site.audit_head` or `site.audit_head_rejected`). [`admission`]
//! admits a connection past its handshake or refuses it (low on disk, no
//! identity, the role's ALPN, a site's registered certificate, the
//! connection caps, in that order) with its close text and entry.
//! [`session`] holds a site connection's negotiated version and decides
//! what that version allows: the `Hello` answered (or rejected), which
//! messages to the site are sent, downgraded or dropped, what each control
//! message leads to (handled, ignored over the head budget, or the
//! connection cut with its text), which streams the site may open, and
//! whether an interrupted upload is kept for a resume.
//! [`provenance`] walks a model's round records back to its job's initial
//! model (the admin's `provenance`). [`status`] builds the running job's
//! part of the admin's `status` (phase, round, each site's state) and says
//! which job a pause / resume / abort reaches.
//!
//! [`actions`] decides what the driver does for the round machine's
//! actions — offers (`offer.sent`, then the offer with the job's terms),
//! cancels, closes, accepted and refused uploads (`update.received`, the
//! round's record, the spool dropped, the one answer), an aggregated round
//! (`round.aggregated`, the new model's hash and the audit head to its
//! sites) and the end of a job (`round.discarded`, `job.finished`, the
//! final model's hash and the audit head to the sites, the final
//! evaluation asked for, `Bye`) — as ordered effects; and what a
//! checkpoint's commit carries and opens.
//!
//! What it does not do (yet): the payload records are checked by the
//! protocol's `PayloadVerifier` in the driver's connection task, and the
//! fold itself (count, pass 2's decode, a retraction's decode) and the
//! archive of an accepted update's files are the driver's; the
//! checkpoints' extras are serialized and committed by the driver (which
//! ones a checkpoint carries: [`actions::checkpoint_plan`]), the round's
//! opening (`state-before.json`, its noise seed; its `round.opened` is
//! [`actions::round_opened`]), the accumulator's lifecycle (open, fold on
//! ack, aggregate; the exclusion of withdrawn sites' updates is decided by
//! [`actions::exclude_withdrawn`]; the sweep of the uploads still queued
//! for the engine when a round ends, whose one-pass folds are taken out
//! before the gate closes, is the driver's: it owns the event queue) and
//! the round archive's files stay in the driver's engine
//! (`server::engine`), which executes [`round_end::plan`]'s steps in
//! order. The audit entries of
//! interrupted uploads (through [`uploads::interrupted`]), declined offers
//! and evaluation reports are [`actions`]' ([`actions::upload_interrupted`],
//! [`actions::offer_declined`], [`actions::eval_reported`]).
//!
//! ```
//! use fedlink_coordinator::core::{CloseReason, Effect, Held, JobNeeds, Sites};
//! use fedlink_coordinator::round::{ConnId, SiteCapabilities, SiteId};
//!
//! let site = SiteId::new("site-a")?;
//! let mut sites = Sites::new();
//! let held = |conn| Held {
//!     conn: ConnId(conn),
//!     capabilities: SiteCapabilities::compatible(),
//!     codecs: vec![],
//!     protocol_version: fedlink_protocol::PROTOCOL_VERSION,
//! };
//! assert_eq!(sites.connect(&site, held(1)), None);
//! // A second connection of the site replaces the first.
//! assert_eq!(
//!     sites.connect(&site, held(2)),
//!     Some(Effect::Close { conn: ConnId(1), reason: CloseReason::Replaced })
//! );
//! // The job that starts now learns of the held site.
//! assert_eq!(sites.hand_over(&JobNeeds::ANY).len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod actions;
pub mod admin;
pub mod admission;
pub mod audit_head;
pub mod disk;
mod effect;
pub mod evaluation;
pub mod idle;
pub mod intake;
pub mod jobs;
pub mod limits;
pub mod provenance;
pub mod queue;
pub mod recovery;
pub mod refusals;
pub mod registry;
pub mod resume;
pub mod round_end;
pub mod scaling;
pub mod served;
pub mod session;
pub mod sim;
mod sites;
pub mod status;
pub mod uploads;

pub use crate::round::ConnId;
pub use effect::{CloseReason, Effect};
pub use sites::{Held, Incompatible, JobNeeds, Sites, compatibility, compatible, same_family};

#[cfg(test)]
mod purity {
    //! The core stays sans-IO: no code in its files names the async
    //! runtime, the transport, the filesystem or the clock.

    const SOURCES: &[(&str, &str)] = &[
        ("mod.rs", include_str!("mod.rs")),
        ("actions.rs", include_str!("actions.rs")),
        ("sites.rs", include_str!("sites.rs")),
        ("effect.rs", include_str!("effect.rs")),
        ("queue.rs", include_str!("queue.rs")),
        ("jobs.rs", include_str!("jobs.rs")),
        ("intake.rs", include_str!("intake.rs")),
        ("resume.rs", include_str!("resume.rs")),
        ("round_end.rs", include_str!("round_end.rs")),
        ("admin.rs", include_str!("admin.rs")),
        ("evaluation.rs", include_str!("evaluation.rs")),
        ("sim.rs", include_str!("sim.rs")),
        ("uploads.rs", include_str!("uploads.rs")),
        ("recovery.rs", include_str!("recovery.rs")),
        ("scaling.rs", include_str!("scaling.rs")),
        ("served.rs", include_str!("served.rs")),
        ("limits.rs", include_str!("limits.rs")),
        ("refusals.rs", include_str!("refusals.rs")),
        ("disk.rs", include_str!("disk.rs")),
        ("registry.rs", include_str!("registry.rs")),
        ("audit_head.rs", include_str!("audit_head.rs")),
        ("admission.rs", include_str!("admission.rs")),
        ("provenance.rs", include_str!("provenance.rs")),
        ("status.rs", include_str!("status.rs")),
        ("session.rs", include_str!("session.rs")),
        ("idle.rs", include_str!("idle.rs")),
    ];

    #[test]
    fn the_core_names_no_runtime_no_socket_no_file_and_no_clock() {
        // Built from pieces, so that this list does not trip itself.
        let banned = [
            ["tok", "io"].concat(),
            ["qui", "nn"].concat(),
            ["std", "::fs"].concat(),
            ["std", "::net"].concat(),
            ["Instant", "::now"].concat(),
            ["SystemTime", "::now"].concat(),
            ["fedlink_", "transport"].concat(),
            ["std", "::thread"].concat(),
        ];
        // Code only, up to its unit tests: a doc example or a test may
        // read the clock as the driver does.
        for (file, text) in SOURCES {
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in code.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for word in &banned {
                    assert!(
                        !line.contains(word.as_str()),
                        "core/{file}:{} names {word}",
                        n + 1
                    );
                }
            }
        }
    }

    #[test]
    fn every_file_of_the_core_is_checked() {
        let listed: Vec<&str> = SOURCES.iter().map(|(f, _)| *f).collect();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/core");
        let mut on_disk: Vec<String> = std::path::Path::new(dir)
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".rs"))
            .collect();
        on_disk.sort();
        let mut listed_sorted: Vec<String> = listed.iter().map(|s| (*s).to_owned()).collect();
        listed_sorted.sort();
        assert_eq!(on_disk, listed_sorted, "add new core files to SOURCES");
    }
}
