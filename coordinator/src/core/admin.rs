//! The admin commands that change state, as effects in the order the
//! driver executes them: the audit append first, then the change — and
//! nothing if the append fails.
//!
//! - [`job_command`]: pause, resume, abort of the running job or a queued
//!   one. A command on a job that has finished changes nothing and is not
//!   recorded.
//! - [`submission`] and [`job_submitted`]: a submitted job file parsed,
//!   validated, its strategy built; once the driver has made or read its
//!   initial model, the strategy checked against it and the id against
//!   the store — the `job.submitted` entry, or a typed refusal.
//! - [`site_command`]: `sites approve | revoke | rotate`. The driver loads
//!   the site manifest and the revocation list, parses and verifies a
//!   presented certificate (chain, validity now: [`SiteCert`]) and hands
//!   them over as data; the decision — refused (typed, with the code the
//!   admin is sent) or the audit entry, the files to save and the reload
//!   that cuts the connections no longer allowed — is made here, without
//!   files.
//!
//! ```text
//!  driver: lock registry, parse + verify cert, load sites.toml + revoked.toml
//!     │ SiteCommand, Registry, actor, now
//!     ▼
//!  site_command ──▶ Err(AdminRefusal)                        (nothing recorded)
//!               └─▶ AppendAudit(site.approved | site.revoked | site.rotated)
//!                   [SaveRevocations] SaveManifest ReloadRegistry ──▶ driver executes in order
//! ```

use ed25519_dalek::VerifyingKey;
use ed25519_dalek::pkcs8::DecodePublicKey;
use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::{CertInfo, RevokedEntry, RevokedFile, Role, SiteEntry, SiteManifest};
use fedlink_protocol::admin::AdminErrorCode;

use super::Effect;
use crate::round::{AdminCommand, Checkpoint, Input, JobOutcome};

/// The job a command names, as the driver finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The job that runs now; `finished`: its round machine has ended it.
    Running {
        /// Whether it has finished.
        finished: bool,
    },
    /// A job in the store that does not run now (queued), if there is one
    /// by that id.
    Stored(Option<StoredJob>),
}

/// What the store says about a job that does not run now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredJob {
    /// Whether it has finished.
    pub finished: bool,
    /// Rounds it completed.
    pub completed_rounds: u64,
}

/// Why an admin command was refused: the code the admin is sent and what
/// is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdminRefusal {
    /// Sent to the admin.
    pub code: AdminErrorCode,
    /// What is wrong.
    pub message: String,
}

/// The audit event of a command on job `job`.
pub fn audit_event(cmd: AdminCommand, job: &str) -> CoordEvent {
    let job = coord::JobRef {
        job: job.to_owned(),
    };
    match cmd {
        AdminCommand::Pause => CoordEvent::JobPaused(job),
        AdminCommand::Resume => CoordEvent::JobResumed(job),
        AdminCommand::Abort => CoordEvent::JobAborted(job),
    }
}

/// What `cmd` on job `id` by `actor` does: the effects to execute in
/// order ([`Effect::AppendAudit`] first), and the answer for the admin
/// once they have all succeeded.
pub fn job_command(
    id: &str,
    cmd: AdminCommand,
    actor: &str,
    target: Target,
) -> (Vec<Effect>, Result<(), AdminRefusal>) {
    let finished = || {
        Err(AdminRefusal {
            code: AdminErrorCode::Refused,
            message: format!("job {id} has finished"),
        })
    };
    let audit = Effect::AppendAudit {
        actor: actor.to_owned(),
        event: audit_event(cmd, id),
    };
    match target {
        Target::Running { finished: true }
        | Target::Stored(Some(StoredJob { finished: true, .. })) => (Vec::new(), finished()),
        Target::Running { finished: false } => {
            (vec![audit, Effect::Apply(Input::Admin(cmd))], Ok(()))
        }
        // The attempt is on record even if no such job exists.
        Target::Stored(None) => (
            vec![audit],
            Err(AdminRefusal {
                code: AdminErrorCode::NotFound,
                message: format!("no job {id}"),
            }),
        ),
        Target::Stored(Some(StoredJob {
            completed_rounds, ..
        })) => {
            let checkpoint = match cmd {
                AdminCommand::Pause => Checkpoint::Paused(true),
                AdminCommand::Resume => Checkpoint::Paused(false),
                AdminCommand::Abort => {
                    Checkpoint::JobFinished(JobOutcome::Aborted { completed_rounds })
                }
            };
            (
                vec![
                    audit,
                    Effect::Persist {
                        job: id.to_owned(),
                        checkpoint,
                    },
                ],
                Ok(()),
            )
        }
    }
}

/// A submitted job file, parsed and validated ([`submission`]): the job
/// and its aggregation strategy.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The job.
    pub job: crate::job::Job,
    /// Its strategy ([`super::jobs::strategy_config`]).
    pub strategy: fedlink_aggregation::StrategyConfig,
}

/// The first half of `jobs submit`: the job file `job_toml` parsed, the
/// job validated and its strategy built — exactly as at start-up. Each
/// failure is an `Invalid` refusal with the error's text. The driver then
/// makes or reads the job's initial model (a file only from `init_dir`)
/// and asks [`job_submitted`].
pub fn submission(job_toml: &str) -> Result<Submission, AdminRefusal> {
    let invalid = |e: &dyn std::fmt::Display| refusal(AdminErrorCode::Invalid, e.to_string());
    let job = crate::job::Job::from_toml(job_toml).map_err(|e| invalid(&e))?;
    job.validate().map_err(|e| invalid(&e))?;
    let strategy = super::jobs::strategy_config(&job).map_err(|e| invalid(&e))?;
    Ok(Submission { job, strategy })
}

/// The second half of `jobs submit` by `actor`: the job's strategy must
/// fit its initial model (`initial`: the spec of the model the driver made
/// or read; `Invalid` otherwise), and no job with its id may exist
/// (`exists`: the store has one; `Refused`). Accepted: its `job.submitted`
/// entry (the job and the file's blake3), which the driver appends before
/// it stores and queues the job.
pub fn job_submitted(
    actor: &str,
    submitted: &Submission,
    job_toml: &str,
    initial: &fedlink_protocol::ModelSpec,
    exists: bool,
) -> Result<Effect, AdminRefusal> {
    let job = &submitted.job.id;
    super::jobs::check_fits(&submitted.strategy, &submitted.job, initial)
        .map_err(|e| refusal(AdminErrorCode::Invalid, e.to_string()))?;
    if exists {
        return Err(refusal(
            AdminErrorCode::Refused,
            format!("a job with id {job} exists already"),
        ));
    }
    Ok(Effect::AppendAudit {
        actor: actor.to_owned(),
        event: CoordEvent::JobSubmitted(coord::JobSubmitted {
            job: job.clone(),
            job_toml_blake3: blake3::hash(job_toml.as_bytes()).to_hex().to_string(),
            initial_model: None,
        }),
    })
}

/// A site certificate presented to `approve` or `rotate`, as the driver
/// found it: a PEM certificate that chains to the federation CA, is valid
/// now and is not on the TLS verifier's revocation list; its parsed facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteCert {
    /// Identity, serial and fingerprint.
    pub info: CertInfo,
}

/// A command that changes the site registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SiteCommand {
    /// Register a new site.
    Approve {
        /// Its certificate.
        cert: SiteCert,
        /// Its update public key (SPKI PEM or 64 hex digits).
        update_key: String,
        /// The most examples one of its updates may claim.
        max_examples: Option<u64>,
    },
    /// Remove a site and revoke its certificate and update key.
    Revoke {
        /// The site.
        name: String,
        /// Why (kept in the revocation list and the audit entry).
        reason: Option<String>,
    },
    /// Give a registered site a new certificate (and update key).
    Rotate {
        /// The site.
        name: String,
        /// Its new certificate.
        cert: SiteCert,
        /// Its new update key; `None` keeps the current one.
        update_key: Option<String>,
    },
}

/// The site registry as the driver loaded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    /// `sites.toml`.
    pub manifest: SiteManifest,
    /// `revoked.toml`.
    pub revoked: RevokedFile,
}

/// What a site command does: the effects to execute in order
/// ([`Effect::AppendAudit`] first), and the site's entry for the answer
/// (as registered now; for a revocation, as it was).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteChange {
    /// The effects.
    pub effects: Vec<Effect>,
    /// The site's entry.
    pub entry: SiteEntry,
}

fn refusal(code: AdminErrorCode, message: impl Into<String>) -> AdminRefusal {
    AdminRefusal {
        code,
        message: message.into(),
    }
}

/// Why the site manifest's update keys cannot be used.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A site's name is not a valid site id.
    #[error("site {site}: {source}")]
    SiteName {
        /// The site's name in the manifest.
        site: String,
        /// Why it is not a site id.
        source: fedlink_protocol::IdError,
    },
    /// A site's update key does not decode.
    #[error(transparent)]
    Key(#[from] fedlink_certs::Error),
}

/// The update keys of the manifest's sites, by site id: the directory an
/// upload's signature and an evaluation report are checked against (built
/// at start, at every reload of `sites.toml`, and by [`super::sim`] at
/// each `ReloadRegistry` and restart).
pub fn update_keys(
    manifest: &SiteManifest,
) -> Result<std::collections::BTreeMap<fedlink_protocol::SiteId, VerifyingKey>, KeysError> {
    let mut keys = std::collections::BTreeMap::new();
    for s in &manifest.site {
        let id = fedlink_protocol::SiteId::new(&s.name).map_err(|source| KeysError::SiteName {
            site: s.name.clone(),
            source,
        })?;
        keys.insert(id, s.update_verifying_key()?);
    }
    Ok(keys)
}

/// An update public key given as SPKI PEM or 64 hex digits, as lower-case
/// hex; an `Invalid` refusal says what is wrong.
pub fn parse_update_key(text: &str) -> Result<String, AdminRefusal> {
    let invalid = |m: String| refusal(AdminErrorCode::Invalid, m);
    let t = text.trim();
    let key = if t.starts_with("-----BEGIN") {
        VerifyingKey::from_public_key_pem(t)
            .map_err(|e| invalid(format!("update key: not an ed25519 public key PEM: {e}")))?
    } else {
        let bytes =
            hex::decode(t).map_err(|_| invalid("update key: neither PEM nor hex".into()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| invalid("update key: must be 32 bytes".into()))?;
        VerifyingKey::from_bytes(&arr).map_err(|e| invalid(format!("update key: {e}")))?
    };
    Ok(hex::encode(key.as_bytes()))
}

/// The audit details of a site's registry entry.
pub fn entry_event(e: &SiteEntry) -> coord::SiteEntry {
    coord::SiteEntry {
        site: e.name.clone(),
        cert_serial: e.cert_serial.to_string(),
        cert_fingerprint: e.cert_fingerprint.to_string(),
        update_public_key: e.update_public_key.clone(),
        max_examples: e.max_examples,
    }
}

/// A presented certificate must be a site's and not revoked.
fn check_site_cert(cert: &SiteCert, revoked: &RevokedFile) -> Result<(), AdminRefusal> {
    let identity = &cert.info.identity;
    if identity.role() != Role::Site {
        return Err(refusal(
            AdminErrorCode::Invalid,
            format!(
                "{identity} is a {} certificate, not a site certificate",
                identity.role()
            ),
        ));
    }
    if revoked.lists(&cert.info.serial, &cert.info.fingerprint) {
        return Err(refusal(
            AdminErrorCode::Refused,
            format!("certificate {} is revoked", cert.info.serial),
        ));
    }
    Ok(())
}

/// An update key must not be a revoked site's.
fn check_key_not_revoked(key: &str, revoked: &RevokedFile) -> Result<(), AdminRefusal> {
    if revoked.is_update_key_revoked(key) {
        return Err(refusal(
            AdminErrorCode::Refused,
            "this update key belongs to a revoked site",
        ));
    }
    Ok(())
}

/// An update key for site `name` (`None`: a new site) must not be another
/// site's.
fn check_key_not_taken(
    key: &str,
    name: Option<&str>,
    manifest: &SiteManifest,
) -> Result<(), AdminRefusal> {
    match manifest
        .site
        .iter()
        .find(|s| Some(s.name.as_str()) != name && s.update_public_key.eq_ignore_ascii_case(key))
    {
        Some(other) => Err(refusal(
            AdminErrorCode::Refused,
            format!("site {} already uses this update key", other.name),
        )),
        None => Ok(()),
    }
}

/// What `cmd` by `actor` does to the site registry, decided on the
/// registry as loaded; `now`: the time to record (RFC 3339). Refused:
/// nothing is recorded or changed. Otherwise the audit entry, then the
/// files to save (a revocation's list before the manifest: even if the
/// manifest's write failed, the certificate is refused), then the reload
/// that re-checks every open connection.
pub fn site_command(
    cmd: SiteCommand,
    actor: &str,
    registry: Registry,
    now: &str,
) -> Result<SiteChange, AdminRefusal> {
    let Registry {
        mut manifest,
        mut revoked,
    } = registry;
    let audit = |event| Effect::AppendAudit {
        actor: actor.to_owned(),
        event,
    };
    let not_found = |name: &str| {
        refusal(
            AdminErrorCode::NotFound,
            format!("no registered site {name}"),
        )
    };
    match cmd {
        SiteCommand::Approve {
            cert,
            update_key,
            max_examples,
        } => {
            check_site_cert(&cert, &revoked)?;
            let key = parse_update_key(&update_key)?;
            if max_examples == Some(0) {
                return Err(refusal(
                    AdminErrorCode::Invalid,
                    "max examples: must be > 0 (0 would refuse every update of the site)",
                ));
            }
            let identity = cert.info.identity;
            check_key_not_revoked(&key, &revoked)?;
            if manifest.get(identity.name()).is_some() {
                return Err(refusal(
                    AdminErrorCode::Refused,
                    format!("site {} is already registered", identity.name()),
                ));
            }
            check_key_not_taken(&key, None, &manifest)?;
            let entry = SiteEntry {
                name: identity.name().to_owned(),
                identity,
                cert_serial: cert.info.serial,
                cert_fingerprint: cert.info.fingerprint,
                update_public_key: key,
                added_at: now.to_owned(),
                renewed_at: None,
                max_examples,
            };
            manifest.site.push(entry.clone());
            Ok(SiteChange {
                effects: vec![
                    audit(CoordEvent::SiteApproved(entry_event(&entry))),
                    Effect::SaveManifest(manifest),
                    Effect::ReloadRegistry,
                ],
                entry,
            })
        }
        SiteCommand::Revoke { name, reason } => {
            let entry = manifest.remove(&name).ok_or_else(|| not_found(&name))?;
            let event = CoordEvent::SiteRevoked(coord::SiteRevoked {
                entry: entry_event(&entry),
                reason: reason.clone(),
            });
            revoked.revoked.push(RevokedEntry {
                serial: Some(entry.cert_serial.clone()),
                fingerprint: Some(entry.cert_fingerprint),
                identity: Some(entry.identity.clone()),
                reason,
                revoked_at: Some(now.to_owned()),
                update_public_key: Some(entry.update_public_key.clone()),
            });
            Ok(SiteChange {
                effects: vec![
                    audit(event),
                    Effect::SaveRevocations(revoked),
                    Effect::SaveManifest(manifest),
                    Effect::ReloadRegistry,
                ],
                entry,
            })
        }
        SiteCommand::Rotate {
            name,
            cert,
            update_key,
        } => {
            check_site_cert(&cert, &revoked)?;
            let current = manifest.get(&name).ok_or_else(|| not_found(&name))?;
            let identity = &cert.info.identity;
            if *identity != current.identity {
                return Err(refusal(
                    AdminErrorCode::Invalid,
                    format!(
                        "the certificate is for {identity}, not {}",
                        current.identity
                    ),
                ));
            }
            if cert.info.fingerprint == current.cert_fingerprint {
                return Err(refusal(
                    AdminErrorCode::Refused,
                    "this certificate is already the site's current certificate",
                ));
            }
            let key = match update_key {
                Some(k) => {
                    let k = parse_update_key(&k)?;
                    check_key_not_revoked(&k, &revoked)?;
                    check_key_not_taken(&k, Some(&name), &manifest)?;
                    k
                }
                None => current.update_public_key.clone(),
            };
            let entry = manifest.get_mut(&name).ok_or_else(|| not_found(&name))?;
            entry.cert_serial = cert.info.serial;
            entry.cert_fingerprint = cert.info.fingerprint;
            entry.update_public_key = key;
            entry.renewed_at = Some(now.to_owned());
            let entry = entry.clone();
            Ok(SiteChange {
                effects: vec![
                    audit(CoordEvent::SiteRotated(entry_event(&entry))),
                    Effect::SaveManifest(manifest),
                    Effect::ReloadRegistry,
                ],
                entry,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_audit::EventKind;

    /// An audit append's event name and details, as written.
    fn written(e: &Effect) -> (EventKind, serde_json::Value) {
        let Effect::AppendAudit { event, .. } = e else {
            panic!("not an audit append: {e:?}")
        };
        (event.kind(), event.details().unwrap())
    }

    #[test]
    fn every_change_is_audited_first_and_finished_jobs_are_left_alone() {
        let queued = Target::Stored(Some(StoredJob {
            finished: false,
            completed_rounds: 2,
        }));
        for cmd in [
            AdminCommand::Pause,
            AdminCommand::Resume,
            AdminCommand::Abort,
        ] {
            let (e, r) = job_command("j", cmd, "admin", Target::Running { finished: false });
            assert_eq!(r, Ok(()));
            assert!(Effect::audited_first(&e), "{e:?}");
            assert_eq!(e.last(), Some(&Effect::Apply(Input::Admin(cmd))));
            let (e, r) = job_command("j", cmd, "admin", queued);
            assert_eq!(r, Ok(()));
            assert!(Effect::audited_first(&e), "{e:?}");
            assert!(matches!(e.last(), Some(Effect::Persist { job, .. }) if job == "j"));
            for done in [
                Target::Running { finished: true },
                Target::Stored(Some(StoredJob {
                    finished: true,
                    completed_rounds: 1,
                })),
            ] {
                let (e, r) = job_command("j", cmd, "admin", done);
                assert!(e.is_empty(), "{e:?}");
                assert_eq!(r.unwrap_err().code, AdminErrorCode::Refused);
            }
        }
        let (e, _) = job_command("j", AdminCommand::Abort, "admin", queued);
        assert_eq!(
            e[1],
            Effect::Persist {
                job: "j".into(),
                checkpoint: Checkpoint::JobFinished(JobOutcome::Aborted {
                    completed_rounds: 2
                })
            }
        );
        assert!(matches!(&e[0], Effect::AppendAudit { actor, .. } if actor == "admin"));
        assert_eq!(
            written(&e[0]),
            (EventKind::JobAborted, serde_json::json!({ "job": "j" }))
        );
    }

    #[test]
    fn an_unknown_job_is_refused_with_the_attempt_on_record() {
        let (e, r) = job_command("nope", AdminCommand::Pause, "admin", Target::Stored(None));
        assert!(matches!(e.as_slice(), [Effect::AppendAudit { .. }]));
        let err = r.unwrap_err();
        assert_eq!(err.code, AdminErrorCode::NotFound);
        assert_eq!(err.message, "no job nope");
    }

    /// A job file: `strategy` is the `[strategy]` section's body, `extra`
    /// top-level lines.
    fn job_toml(extra: &str, inputs: u32, strategy: &str) -> String {
        format!(
            "id = \"j\"\nrounds = 3\nseed = 5\n{extra}\
             arch = {{ kind = \"logreg\", inputs = {inputs}, classes = 2 }}\n\
             init = {{ seed = 1 }}\n[round]\ndeadline_secs = 30\n[strategy]\n{strategy}\n"
        )
    }

    #[test]
    fn a_submitted_job_is_recorded_with_its_file_hash_unless_its_id_exists() {
        let toml = job_toml("", 4, "name = \"fedavg\"");
        let submitted = submission(&toml).unwrap();
        assert_eq!(submitted.job.id, "j");
        let spec = submitted.job.arch.spec().unwrap();
        let e = job_submitted("admin", &submitted, &toml, &spec, false).unwrap();
        assert!(matches!(&e, Effect::AppendAudit { actor, .. } if actor == "admin"));
        assert_eq!(
            written(&e),
            (
                EventKind::JobSubmitted,
                serde_json::json!({
                    "job": "j",
                    "job_toml_blake3": blake3::hash(toml.as_bytes()).to_hex().to_string(),
                })
            )
        );
        assert!(Effect::audited_first(&[e]));
        assert_eq!(
            job_submitted("admin", &submitted, &toml, &spec, true).unwrap_err(),
            AdminRefusal {
                code: AdminErrorCode::Refused,
                message: "a job with id j exists already".into()
            }
        );
    }

    /// Each refusal of a submission carries the code and the text the
    /// driver sent before the decision moved here: `Invalid` with the
    /// failing step's error text.
    #[test]
    fn a_submission_is_refused_at_each_step_with_its_error_text() {
        let invalid = |message: String| AdminRefusal {
            code: AdminErrorCode::Invalid,
            message,
        };
        // Not a job file.
        let bad = "id = ";
        assert_eq!(
            submission(bad).unwrap_err(),
            invalid(crate::job::Job::from_toml(bad).unwrap_err().to_string())
        );
        // Parses as TOML, a value out of range (`Job::from_toml` checks
        // the values as `Job::validate` does).
        let zero = job_toml("", 4, "name = \"fedavg\"").replace("rounds = 3", "rounds = 0");
        let why = crate::job::Job::from_toml(&zero).unwrap_err().to_string();
        assert!(why.contains("rounds"), "{why}");
        assert_eq!(submission(&zero).unwrap_err(), invalid(why));
        // Validates, but names no strategy there is.
        let unknown = job_toml("", 4, "name = \"no-such-strategy\"");
        let job = crate::job::Job::from_toml(&unknown).unwrap();
        job.validate().unwrap();
        let why = super::super::jobs::strategy_config(&job)
            .unwrap_err()
            .to_string();
        assert_eq!(submission(&unknown).unwrap_err(), invalid(why));
        // The strategy does not fit the initial model (refused even when
        // the id is taken too: the model is checked first).
        let big = job_toml(
            "",
            1000,
            "name = \"fedmedian\"\n[strategy.params]\nmemory_budget_bytes = 1000",
        );
        let submitted = submission(&big).unwrap();
        let spec = submitted.job.arch.spec().unwrap();
        let why = super::super::jobs::check_fits(&submitted.strategy, &submitted.job, &spec)
            .unwrap_err()
            .to_string();
        for exists in [false, true] {
            assert_eq!(
                job_submitted("admin", &submitted, &big, &spec, exists).unwrap_err(),
                invalid(why.clone())
            );
        }
        // The same strategy fits a small model.
        let small = job_toml(
            "",
            4,
            "name = \"fedmedian\"\n[strategy.params]\nmemory_budget_bytes = 100000000",
        );
        let submitted = submission(&small).unwrap();
        let spec = submitted.job.arch.spec().unwrap();
        assert!(job_submitted("admin", &submitted, &small, &spec, false).is_ok());
    }

    mod sites {
        use fedlink_certs::time::OffsetDateTime;
        use fedlink_certs::{Fingerprint, Identity, Serial};

        use super::super::*;
        use super::written;
        use fedlink_audit::EventKind;

        const NOW: &str = "2026-12-06T12:00:00Z";

        fn key(n: u8) -> String {
            let sk = ed25519_dalek::SigningKey::from_bytes(&[n; 32]);
            hex::encode(sk.verifying_key().as_bytes())
        }

        fn cert(role: Role, name: &str, n: u8) -> SiteCert {
            SiteCert {
                info: CertInfo {
                    // Unique per (name, n), as a CA's certificates are.
                    serial: Serial::from_bytes(&[name.as_bytes()[0], n]).unwrap(),
                    fingerprint: hex::encode([[name.as_bytes()[0]; 16], [n; 16]].concat())
                        .parse::<Fingerprint>()
                        .unwrap(),
                    not_before: OffsetDateTime::UNIX_EPOCH,
                    not_after: OffsetDateTime::UNIX_EPOCH,
                    identity: Identity::new("fed", role, name).unwrap(),
                    server_names: Vec::new(),
                },
            }
        }

        fn empty() -> Registry {
            Registry {
                manifest: SiteManifest::new("fed").unwrap(),
                revoked: RevokedFile::default(),
            }
        }

        fn approve(
            registry: Registry,
            name: &str,
            n: u8,
            k: u8,
        ) -> Result<SiteChange, AdminRefusal> {
            site_command(
                SiteCommand::Approve {
                    cert: cert(Role::Site, name, n),
                    update_key: key(k),
                    max_examples: Some(100),
                },
                "admin-uri",
                registry,
                NOW,
            )
        }

        /// The registry after executing `change`'s saves.
        fn saved(mut registry: Registry, change: &SiteChange) -> Registry {
            for e in &change.effects {
                match e {
                    Effect::SaveManifest(m) => registry.manifest = m.clone(),
                    Effect::SaveRevocations(r) => registry.revoked = r.clone(),
                    _ => {}
                }
            }
            registry
        }

        /// Every change is the audit entry first, then the saves, then the
        /// reload that cuts connections no longer allowed.
        fn audited_then_saved(change: &SiteChange, kind: EventKind) {
            assert!(
                Effect::audited_first(&change.effects),
                "{:?}",
                change.effects
            );
            assert!(
                matches!(&change.effects[0], Effect::AppendAudit { event, actor } if event.kind() == kind && actor == "admin-uri"),
                "{:?}",
                change.effects[0]
            );
            assert_eq!(change.effects.last(), Some(&Effect::ReloadRegistry));
        }

        #[test]
        fn approve_registers_a_new_site_after_its_audit_entry() {
            let change = approve(empty(), "a", 1, 1).unwrap();
            audited_then_saved(&change, EventKind::SiteApproved);
            assert_eq!(change.entry.name, "a");
            assert_eq!(change.entry.update_public_key, key(1));
            assert_eq!(change.entry.added_at, NOW);
            assert_eq!(change.entry.max_examples, Some(100));
            let (_, details) = written(&change.effects[0]);
            assert_eq!(
                details,
                serde_json::json!({
                    "site": "a",
                    "cert_serial": change.entry.cert_serial.to_string(),
                    "cert_fingerprint": change.entry.cert_fingerprint.to_string(),
                    "update_public_key": key(1),
                    "max_examples": 100,
                })
            );
            assert_eq!(details["cert_serial"], change.entry.cert_serial.to_string());
            let after = saved(empty(), &change);
            assert_eq!(after.manifest.get("a"), Some(&change.entry));
            assert!(
                !change
                    .effects
                    .iter()
                    .any(|e| matches!(e, Effect::SaveRevocations(_))),
                "the revocation list is left alone"
            );
        }

        #[test]
        fn approve_refusals_name_what_is_wrong_and_record_nothing() {
            let one = saved(empty(), &approve(empty(), "a", 1, 1).unwrap());
            let cases: Vec<(Result<SiteChange, AdminRefusal>, AdminErrorCode, String)> = vec![
                (
                    site_command(
                        SiteCommand::Approve {
                            cert: cert(Role::Admin, "ops", 2),
                            update_key: key(2),
                            max_examples: None,
                        },
                        "admin-uri",
                        empty(),
                        NOW,
                    ),
                    AdminErrorCode::Invalid,
                    "fedlink://fed/admin/ops is a admin certificate, not a site certificate".into(),
                ),
                (
                    approve(one.clone(), "a", 3, 3),
                    AdminErrorCode::Refused,
                    "site a is already registered".into(),
                ),
                (
                    approve(one.clone(), "b", 3, 1),
                    AdminErrorCode::Refused,
                    "site a already uses this update key".into(),
                ),
                (
                    site_command(
                        SiteCommand::Approve {
                            cert: cert(Role::Site, "b", 3),
                            update_key: "zz".into(),
                            max_examples: None,
                        },
                        "admin-uri",
                        empty(),
                        NOW,
                    ),
                    AdminErrorCode::Invalid,
                    "update key: neither PEM nor hex".into(),
                ),
                (
                    site_command(
                        SiteCommand::Approve {
                            cert: cert(Role::Site, "b", 3),
                            update_key: "abcd".into(),
                            max_examples: None,
                        },
                        "admin-uri",
                        empty(),
                        NOW,
                    ),
                    AdminErrorCode::Invalid,
                    "update key: must be 32 bytes".into(),
                ),
                (
                    site_command(
                        SiteCommand::Approve {
                            cert: cert(Role::Site, "b", 3),
                            update_key: key(3),
                            max_examples: Some(0),
                        },
                        "admin-uri",
                        empty(),
                        NOW,
                    ),
                    AdminErrorCode::Invalid,
                    "max examples: must be > 0 (0 would refuse every update of the site)".into(),
                ),
            ];
            for (got, code, message) in cases {
                assert_eq!(got, Err(AdminRefusal { code, message }));
            }
            // A revoked site's certificate or update key.
            let revoked = saved(
                one.clone(),
                &site_command(
                    SiteCommand::Revoke {
                        name: "a".into(),
                        reason: Some("lost".into()),
                    },
                    "admin-uri",
                    one,
                    NOW,
                )
                .unwrap(),
            );
            let again = approve(revoked.clone(), "a", 1, 9).unwrap_err();
            assert_eq!(again.code, AdminErrorCode::Refused);
            assert_eq!(
                again.message,
                format!(
                    "certificate {} is revoked",
                    cert(Role::Site, "a", 1).info.serial
                )
            );
            let key_again = approve(revoked, "c", 4, 1).unwrap_err();
            assert_eq!(
                key_again.message,
                "this update key belongs to a revoked site"
            );
        }

        #[test]
        fn revoke_lists_the_certificate_and_key_before_it_removes_the_site() {
            let one = saved(empty(), &approve(empty(), "a", 1, 1).unwrap());
            let entry = one.manifest.get("a").unwrap().clone();
            let change = site_command(
                SiteCommand::Revoke {
                    name: "a".into(),
                    reason: Some("lost laptop".into()),
                },
                "admin-uri",
                one.clone(),
                NOW,
            )
            .unwrap();
            audited_then_saved(&change, EventKind::SiteRevoked);
            assert_eq!(change.entry, entry, "answered as it was");
            let (_, details) = written(&change.effects[0]);
            assert_eq!(details["reason"], "lost laptop");
            assert_eq!(details["site"], "a");
            // The revocation list is written before the manifest.
            assert!(matches!(change.effects[1], Effect::SaveRevocations(_)));
            assert!(matches!(change.effects[2], Effect::SaveManifest(_)));
            let after = saved(one, &change);
            assert!(after.manifest.get("a").is_none());
            let [listed] = &after.revoked.revoked[..] else {
                panic!("{:?}", after.revoked)
            };
            assert!(
                after
                    .revoked
                    .lists(&entry.cert_serial, &entry.cert_fingerprint)
            );
            assert!(after.revoked.is_update_key_revoked(&key(1)));
            assert_eq!(listed.reason.as_deref(), Some("lost laptop"));
            assert_eq!(listed.revoked_at.as_deref(), Some(NOW));
            assert_eq!(listed.identity.as_ref(), Some(&entry.identity));
            // An unknown site: nothing recorded.
            assert_eq!(
                site_command(
                    SiteCommand::Revoke {
                        name: "zz".into(),
                        reason: None
                    },
                    "admin-uri",
                    after,
                    NOW,
                ),
                Err(AdminRefusal {
                    code: AdminErrorCode::NotFound,
                    message: "no registered site zz".into()
                })
            );
        }

        #[test]
        fn rotate_replaces_the_certificate_and_optionally_the_key() {
            let two = {
                let one = saved(empty(), &approve(empty(), "a", 1, 1).unwrap());
                saved(one.clone(), &approve(one, "b", 2, 2).unwrap())
            };
            let rotate = |registry: &Registry, name: &str, c: SiteCert, k: Option<String>| {
                site_command(
                    SiteCommand::Rotate {
                        name: name.into(),
                        cert: c,
                        update_key: k,
                    },
                    "admin-uri",
                    registry.clone(),
                    NOW,
                )
            };
            // New certificate, same key.
            let change = rotate(&two, "a", cert(Role::Site, "a", 5), None).unwrap();
            audited_then_saved(&change, EventKind::SiteRotated);
            assert_eq!(
                change.entry.cert_serial,
                cert(Role::Site, "a", 5).info.serial
            );
            assert_eq!(change.entry.update_public_key, key(1));
            assert_eq!(change.entry.renewed_at.as_deref(), Some(NOW));
            let after = saved(two.clone(), &change);
            assert_eq!(after.manifest.get("a"), Some(&change.entry));
            assert_eq!(
                after.manifest.get("b"),
                two.manifest.get("b"),
                "the others stay"
            );
            // And a new key; its own old key may be given again.
            let change = rotate(&two, "a", cert(Role::Site, "a", 5), Some(key(7))).unwrap();
            assert_eq!(change.entry.update_public_key, key(7));
            assert!(rotate(&two, "a", cert(Role::Site, "a", 5), Some(key(1))).is_ok());
            // Refusals.
            let refused = |r: Result<SiteChange, AdminRefusal>| r.unwrap_err();
            let e = refused(rotate(&two, "a", cert(Role::Site, "b", 5), None));
            assert_eq!(
                (e.code, e.message.as_str()),
                (
                    AdminErrorCode::Invalid,
                    "the certificate is for fedlink://fed/site/b, not fedlink://fed/site/a"
                )
            );
            let e = refused(rotate(&two, "a", cert(Role::Site, "a", 1), None));
            assert_eq!(
                (e.code, e.message.as_str()),
                (
                    AdminErrorCode::Refused,
                    "this certificate is already the site's current certificate"
                )
            );
            let e = refused(rotate(&two, "a", cert(Role::Site, "a", 5), Some(key(2))));
            assert_eq!(
                (e.code, e.message.as_str()),
                (
                    AdminErrorCode::Refused,
                    "site b already uses this update key"
                )
            );
            let e = refused(rotate(&two, "zz", cert(Role::Site, "zz", 5), None));
            assert_eq!(
                (e.code, e.message.as_str()),
                (AdminErrorCode::NotFound, "no registered site zz")
            );
            let e = refused(rotate(&two, "a", cert(Role::Admin, "a", 5), None));
            assert_eq!(e.code, AdminErrorCode::Invalid);
        }

        /// Seeded sequences of approvals, rotations and revocations,
        /// executed on the registry as the driver does: the registry never
        /// holds two sites with one update key, never a site whose
        /// certificate or key is revoked, and every change has its audit
        /// entry first.
        #[test]
        fn seeded_command_sequences_keep_the_registry_consistent() {
            use rand::{Rng, SeedableRng};
            let mut done = [0usize; 3];
            for seed in 0..200u64 {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut registry = empty();
                let names = ["a", "b", "c", "d"];
                for step in 0..40u8 {
                    let name = names[rng.gen_range(0..names.len())];
                    let n = rng.gen_range(1..12u8);
                    let which = rng.gen_range(0..3);
                    let cmd = match which {
                        0 => SiteCommand::Approve {
                            cert: cert(Role::Site, name, n),
                            update_key: key(rng.gen_range(1..12)),
                            max_examples: None,
                        },
                        1 => SiteCommand::Rotate {
                            name: name.into(),
                            cert: cert(Role::Site, name, n),
                            update_key: rng.gen_bool(0.5).then(|| key(rng.gen_range(1..12))),
                        },
                        _ => SiteCommand::Revoke {
                            name: name.into(),
                            reason: None,
                        },
                    };
                    let Ok(change) = site_command(cmd, "admin-uri", registry.clone(), NOW) else {
                        continue;
                    };
                    assert!(
                        Effect::audited_first(&change.effects),
                        "seed {seed} step {step}"
                    );
                    done[which] += 1;
                    registry = saved(registry, &change);
                    let sites = &registry.manifest.site;
                    for (i, s) in sites.iter().enumerate() {
                        assert!(
                            !registry.revoked.lists(&s.cert_serial, &s.cert_fingerprint),
                            "seed {seed}"
                        );
                        assert!(
                            !registry.revoked.is_update_key_revoked(&s.update_public_key),
                            "seed {seed}"
                        );
                        assert!(
                            sites[i + 1..].iter().all(|t| t.name != s.name
                                && !t
                                    .update_public_key
                                    .eq_ignore_ascii_case(&s.update_public_key)),
                            "seed {seed}: {sites:?}"
                        );
                    }
                }
            }
            println!("approved, rotated, revoked: {done:?}");
            assert!(
                done.iter().all(|&n| n >= 100),
                "each kind happens: {done:?}"
            );
        }
    }
}
