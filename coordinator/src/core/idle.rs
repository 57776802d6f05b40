//! The "no job running" state: what the driver does with a site's event
//! while no job runs (the coordinator started empty, or its last job
//! ended with nothing queued), as typed effects.
//!
//! | event | effects |
//! |---|---|
//! | an evaluation report | [`eval_report`]: `eval.rejected` by the site, "no job is running" |
//! | an upload's signed header | [`upload`]: `update.received` (refused) by the site, then the refusal before its payload (`UnexpectedMessage`); if the entry cannot be written, the site is told so ([`unrecorded`], `Internal`) |
//! | an upload cut short | [`interrupted`]: its spool (if any) removed; nothing to resume into |
//! | an upload received whole | [`ready`]: its spool removed, the site answered `UnexpectedMessage` (only a running job's ticket leads there) |
//! | an admin command that may let a job run (submitted, resumed, …) | [`admin_done`]: look for the next queued job |
//!
//! The entries are built by the same functions as a running job's
//! refusals ([`actions::UploadFacts::details`], [`actions::eval_rejected`]),
//! so each refusal has one entry and one text.

use fedlink_protocol::envelope::SignedEnvelope;
use fedlink_protocol::evaluation::EvalReport;
use fedlink_protocol::message::{RejectCode, UploadResult};
use fedlink_protocol::{FederationId, SiteId};

use super::Effect;
use super::actions::{self, UploadFacts};

/// Why uploads and evaluation reports are refused while no job runs.
pub const NO_JOB: &str = "no job is running";

/// What the driver does for an event while no job runs, in order. An
/// [`IdleEffect::Audit`] that fails stops the run (see each function for
/// what the site is told then).
#[derive(Clone, Debug, PartialEq)]
pub enum IdleEffect {
    /// Append an entry ([`Effect::AppendAudit`]).
    Audit(Effect),
    /// Refuse an upload before its payload with `code` and `message`.
    RefuseUpload {
        /// The code.
        code: RejectCode,
        /// The text.
        message: String,
    },
    /// Remove the event's spool file (if it has one).
    RemoveSpool,
    /// Answer an upload received whole.
    AnswerUpload(UploadResult),
    /// Look for the next queued job (and start it if there is one).
    StartNextQueued,
}

/// `site`'s evaluation report: refused, on record as `eval.rejected`.
pub fn eval_report(
    federation: &FederationId,
    site: &SiteId,
    report: &EvalReport,
) -> Vec<IdleEffect> {
    vec![IdleEffect::Audit(actions::eval_rejected(
        federation, site, report, NO_JOB,
    ))]
}

/// `site`'s upload (its signed `envelope`): `update.received` refused
/// with its declared length, then refused before its payload.
pub fn upload(
    federation: &FederationId,
    site: &SiteId,
    envelope: &SignedEnvelope,
) -> Vec<IdleEffect> {
    let facts = UploadFacts::of(envelope, envelope.header.payload_len);
    vec![
        IdleEffect::Audit(Effect::AppendAudit {
            actor: fedlink_audit::event::site_actor(federation.as_str(), site.as_str()),
            event: facts.details(Some(NO_JOB)),
        }),
        IdleEffect::RefuseUpload {
            code: RejectCode::UnexpectedMessage,
            message: NO_JOB.to_owned(),
        },
    ]
}

/// The refusal of an upload whose `update.received` could not be written
/// (`cause`: the audit log's error).
pub fn unrecorded(cause: &str) -> IdleEffect {
    IdleEffect::RefuseUpload {
        code: RejectCode::Internal,
        message: format!("the coordinator cannot write its audit log: {cause}"),
    }
}

/// An upload cut short: its job ended while it was received; nothing to
/// resume into.
pub fn interrupted() -> Vec<IdleEffect> {
    vec![IdleEffect::RemoveSpool]
}

/// An upload received whole (its ticket was a running job's): its spool
/// removed, the site told no job runs.
pub fn ready() -> Vec<IdleEffect> {
    vec![
        IdleEffect::RemoveSpool,
        IdleEffect::AnswerUpload(UploadResult::Reject {
            code: RejectCode::UnexpectedMessage,
            message: NO_JOB.into(),
        }),
    ]
}

/// An admin command was handled; `may_start`: it may have let a job run
/// (one submitted, resumed, a blocking one aborted).
pub fn admin_done(may_start: bool) -> Vec<IdleEffect> {
    if may_start {
        vec![IdleEffect::StartNextQueued]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use fedlink_audit::CoordEvent;
    use fedlink_protocol::envelope::UpdateHeader;
    use fedlink_protocol::{
        Encoding, EvalMetrics, JobId, ModelHash, PROTOCOL_VERSION, PayloadHash, RoundId,
        UpdateNonce, ValueCodec, sign_update,
    };

    use super::*;

    fn sample_envelope() -> SignedEnvelope {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        sign_update(
            &key,
            UpdateHeader {
                protocol_version: PROTOCOL_VERSION,
                federation_id: fed(),
                site_id: site(),
                job_id: JobId::new("job-1").unwrap(),
                round: RoundId(2),
                base_model: ModelHash([3; 32]),
                num_examples: 10,
                encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
                payload_len: 4096,
                payload_hash: PayloadHash([5; 32]),
                nonce: UpdateNonce([6; 16]),
                metrics: None,
                feature_stats: None,
            },
        )
    }

    fn sample_report() -> EvalReport {
        EvalReport {
            protocol_version: PROTOCOL_VERSION,
            federation_id: fed(),
            site_id: site(),
            job_id: JobId::new("job-1").unwrap(),
            round: RoundId(3),
            model: ModelHash([9; 32]),
            metrics: EvalMetrics {
                num_eval_examples: 40,
                ..EvalMetrics::default()
            },
        }
    }

    fn fed() -> FederationId {
        FederationId::new("fed").unwrap()
    }

    fn site() -> SiteId {
        SiteId::new("site-a").unwrap()
    }

    #[test]
    fn an_eval_report_is_refused_on_record_by_its_site() {
        let report = sample_report();
        let effects = eval_report(&fed(), &site(), &report);
        let [IdleEffect::Audit(Effect::AppendAudit { actor, event })] = effects.as_slice() else {
            panic!("{effects:?}");
        };
        assert_eq!(actor, &fedlink_audit::event::site_actor("fed", "site-a"));
        let CoordEvent::EvalRejected(r) = event else {
            panic!("{event:?}");
        };
        assert_eq!(r.reason, NO_JOB);
        assert_eq!(r.report, actions::eval_report_details(&site(), &report));
    }

    #[test]
    fn an_upload_is_refused_on_record_then_answered() {
        let envelope = sample_envelope();
        let effects = upload(&fed(), &site(), &envelope);
        let [
            IdleEffect::Audit(Effect::AppendAudit { actor, event }),
            refuse,
        ] = effects.as_slice()
        else {
            panic!("{effects:?}");
        };
        assert_eq!(actor, &fedlink_audit::event::site_actor("fed", "site-a"));
        assert_eq!(
            event,
            &actions::update_received_details(&envelope, envelope.header.payload_len, Some(NO_JOB))
        );
        let CoordEvent::UpdateReceived(u) = event else {
            panic!("{event:?}");
        };
        assert!(!u.accepted);
        assert_eq!(u.payload_bytes, envelope.header.payload_len);
        assert_eq!(
            refuse,
            &IdleEffect::RefuseUpload {
                code: RejectCode::UnexpectedMessage,
                message: "no job is running".into()
            }
        );
    }

    #[test]
    fn an_unrecorded_upload_is_told_the_audit_log_failed() {
        assert_eq!(
            unrecorded("disk full"),
            IdleEffect::RefuseUpload {
                code: RejectCode::Internal,
                message: "the coordinator cannot write its audit log: disk full".into()
            }
        );
    }

    #[test]
    fn uploads_cut_short_or_whole_drop_their_spool() {
        assert_eq!(interrupted(), vec![IdleEffect::RemoveSpool]);
        assert_eq!(
            ready(),
            vec![
                IdleEffect::RemoveSpool,
                IdleEffect::AnswerUpload(UploadResult::Reject {
                    code: RejectCode::UnexpectedMessage,
                    message: NO_JOB.into()
                })
            ]
        );
    }

    #[test]
    fn only_an_admin_command_that_may_start_a_job_looks_for_one() {
        assert_eq!(admin_done(true), vec![IdleEffect::StartNextQueued]);
        assert!(admin_done(false).is_empty());
    }
}
