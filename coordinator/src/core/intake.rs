//! Upload intake, header stage: whether a signed update envelope may
//! stream its payload, decided before a payload byte is read.
//!
//! ```text
//!  envelope ──▶ round machine: this site, this round? (check_upload)
//!           ──▶ a round is open?
//!           ──▶ verify_update: identity, key, signature, context, size,
//!               replay (the nonce is recorded in the guard)
//!           ──▶ [driver: persist the replay state — durable before any payload byte]
//!           ──▶ check_num_examples: the claimed weight within the site's and the job's bounds
//!           ──▶ payload records: protocol::envelope::PayloadVerifier (length + blake3)
//! ```
//!
//! Every refusal carries the code the site is sent and a reason naming
//! what is wrong.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use fedlink_protocol::envelope::{
    ExpectedUpdate, PayloadVerifier, SignedEnvelope, UpdateHeader, verify_resumed_update,
    verify_update,
};
use fedlink_protocol::message::RejectCode;
use fedlink_protocol::{
    Encoding, FederationId, JobId, ModelSpec, ReplayGuard, RoundId, SiteId, VerifyError,
};

use crate::round::{JobRunner, RejectReason};

/// Why an upload is refused: the code the site is sent, and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// Sent to the site.
    pub code: RejectCode,
    /// What is wrong.
    pub reason: String,
}

impl Refusal {
    fn new(code: RejectCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// What an update must match in the running job.
#[derive(Clone, Debug)]
pub struct Expected<'a> {
    /// The federation.
    pub federation: &'a FederationId,
    /// The running job.
    pub job: &'a JobId,
    /// The round whose accumulator is open, if any.
    pub open_round: Option<RoundId>,
    /// The job's encoding (`None`: any).
    pub encoding: Option<Encoding>,
    /// The global model's spec (bounds the payload length).
    pub spec: &'a ModelSpec,
    /// The sites' update keys (from the manifest).
    pub keys: &'a BTreeMap<SiteId, VerifyingKey>,
}

/// The header stage of an upload by `site` (its TLS identity): the round
/// machine's view, then the envelope (signature, context, size, replay).
/// On success the nonce is recorded in `replay` — the driver persists the
/// guard before reading the payload — and the payload verifier is
/// returned.
pub fn verify_header(
    runner: &JobRunner,
    expected: &Expected<'_>,
    replay: &mut ReplayGuard,
    site: &SiteId,
    envelope: &SignedEnvelope,
) -> Result<PayloadVerifier, Refusal> {
    let (authenticated, want) = round_view(runner, expected, site, envelope)?;
    verify_update(envelope, &authenticated, expected.keys, &want, replay)
        .map_err(|e| Refusal::new(verify_code(&e), e.to_string()))
}

/// The header stage of a resumed upload ([`super::resume`]): the same
/// checks as [`verify_header`] against the job as it is now, then that the
/// envelope is the very one of the interrupted upload whose verifier
/// (`partial`) the coordinator kept. No new attempt is recorded in
/// `replay`; the returned verifier continues after the kept records.
pub fn verify_resume(
    runner: &JobRunner,
    expected: &Expected<'_>,
    replay: &ReplayGuard,
    site: &SiteId,
    envelope: &SignedEnvelope,
    partial: PayloadVerifier,
) -> Result<PayloadVerifier, Refusal> {
    let (authenticated, want) = round_view(runner, expected, site, envelope)?;
    verify_resumed_update(
        envelope,
        &authenticated,
        expected.keys,
        &want,
        replay,
        partial,
    )
    .map_err(|e| Refusal::new(verify_code(&e), e.to_string()))
}

/// The round machine's view of an upload of `site`, and what its envelope
/// must match.
fn round_view(
    runner: &JobRunner,
    expected: &Expected<'_>,
    site: &SiteId,
    envelope: &SignedEnvelope,
) -> Result<(SiteId, ExpectedUpdate), Refusal> {
    let h = &envelope.header;
    runner
        .check_upload(site, h.round)
        .map_err(|r| Refusal::new(reject_code(&r), reason_text(&r)))?;
    let round = expected
        .open_round
        .ok_or_else(|| Refusal::new(RejectCode::UnexpectedMessage, "no round is open"))?;
    let authenticated = site.clone();
    let want = ExpectedUpdate {
        federation_id: expected.federation.clone(),
        job_id: expected.job.clone(),
        round,
        base_model: runner.current_model(),
        encoding: expected.encoding,
        max_payload_len: fedlink_protocol::payload::max_payload_len(expected.spec, &h.encoding),
    };
    Ok((authenticated, want))
}

/// Why an update's claimed weight (`num_examples` of its signed header) is
/// refused before its payload is read ([`check_num_examples`]). Sent to
/// the site and recorded in the audit log: the text names both numbers and
/// where the bound comes from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// More examples than the site declared (`max_examples` in
    /// `sites.toml`).
    #[error(
        "num_examples = {claimed} exceeds the {declared} examples declared for site {site} \
         (max_examples in sites.toml)"
    )]
    AboveDeclared {
        /// The site.
        site: String,
        /// What its header claims.
        claimed: u64,
        /// What `sites.toml` declares for it.
        declared: u64,
    },
    /// More examples than the job allows one site
    /// (`strategy.max_examples_per_site`).
    #[error(
        "num_examples = {claimed} exceeds the job's limit of {limit} examples per site \
         (strategy.max_examples_per_site)"
    )]
    AboveJobLimit {
        /// What the header claims.
        claimed: u64,
        /// The job's per-site limit.
        limit: u64,
    },
}

/// Whether an update of `site` may claim `claimed` training examples: at
/// most the site's declared maximum (`max_examples` in `sites.toml`) and at
/// most the job's per-site limit (`max_num_examples` of the strategy, from
/// `strategy.max_examples_per_site`). The reason names both numbers.
pub fn check_num_examples(
    site: &str,
    claimed: u64,
    job_limit: u64,
    declared: Option<u64>,
) -> Result<(), ClaimError> {
    if let Some(max) = declared
        && claimed > max
    {
        return Err(ClaimError::AboveDeclared {
            site: site.to_owned(),
            claimed,
            declared: max,
        });
    }
    if claimed > job_limit {
        return Err(ClaimError::AboveJobLimit {
            claimed,
            limit: job_limit,
        });
    }
    Ok(())
}

/// A number of a signed header that has no JSON form
/// ([`check_header_numbers`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderNumberError {
    /// One of the named metrics (loss, accuracy, auc, dice) is NaN or
    /// infinite.
    #[error("the signed header's metric {0} is not finite")]
    Metric(&'static str),
    /// A metric of the header's `extra` list is NaN or infinite.
    #[error("the signed header's metric {0:?} is not finite")]
    ExtraMetric(String),
    /// A feature statistic (a sum or a sum of squares) is NaN or infinite.
    #[error("the signed header's feature statistics are not finite")]
    FeatureStats,
}

/// Whether every number a signed header carries besides the payload — its
/// evaluation metrics and feature statistics — is finite. A NaN or an
/// infinity has no JSON form, so the envelope could not be archived as
/// signed (the archive is what `fedlink audit replay` checks); such an
/// update is refused before its payload is read, the reason naming the
/// value. (Whether finite metrics are usable is
/// [`super::evaluation::check_report`]'s question.)
pub fn check_header_numbers(h: &UpdateHeader) -> Result<(), HeaderNumberError> {
    if let Some(m) = &h.metrics {
        for (name, v) in [
            ("loss", m.loss),
            ("accuracy", m.accuracy),
            ("auc", m.auc),
            ("dice", m.dice),
        ] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(HeaderNumberError::Metric(name));
            }
        }
        if let Some((name, _)) = m.extra.iter().find(|(_, v)| !v.is_finite()) {
            return Err(HeaderNumberError::ExtraMetric(name.clone()));
        }
    }
    if let Some(f) = &h.feature_stats
        && f.sum.iter().chain(&f.sum_sq).any(|v| !v.is_finite())
    {
        return Err(HeaderNumberError::FeatureStats);
    }
    Ok(())
}

/// What a site is told when the round machine refuses its update.
pub fn reason_text(r: &RejectReason) -> String {
    match r {
        RejectReason::Duplicate => "this site already reported in this round".into(),
        RejectReason::RoundClosed => "the round is closed".into(),
        RejectReason::WrongRound => "no such round is open".into(),
        RejectReason::NotSelected => "this site was not selected for the round".into(),
        RejectReason::UnknownSite => "unknown site".into(),
        RejectReason::StaleModel => "the update was trained on another model".into(),
        RejectReason::JobNotRunning => "the job is not running".into(),
        RejectReason::Invalid(why) => format!("invalid update: {why}"),
    }
}

/// The wire code of a round-machine refusal.
pub fn reject_code(r: &RejectReason) -> RejectCode {
    match r {
        RejectReason::Duplicate => RejectCode::Replay,
        RejectReason::RoundClosed => RejectCode::TooLate,
        RejectReason::WrongRound | RejectReason::StaleModel => RejectCode::ContextMismatch,
        RejectReason::NotSelected => RejectCode::NotAuthorized,
        RejectReason::UnknownSite => RejectCode::UnknownSite,
        RejectReason::JobNotRunning => RejectCode::UnexpectedMessage,
        _ => RejectCode::Malformed,
    }
}

/// The wire code of a failed envelope or payload check.
pub fn verify_code(e: &VerifyError) -> RejectCode {
    match e {
        VerifyError::UnsupportedVersion(_) => RejectCode::UnsupportedVersion,
        VerifyError::IdentityMismatch { .. } | VerifyError::UnknownSite(_) => {
            RejectCode::UnknownSite
        }
        VerifyError::BadSignature => RejectCode::BadSignature,
        VerifyError::FederationMismatch { .. } => RejectCode::WrongFederation,
        VerifyError::NonceReplayed(_)
        | VerifyError::RoundReplayed { .. }
        | VerifyError::TooManyAttempts(_)
        | VerifyError::NotResumable(_) => RejectCode::Replay,
        VerifyError::PayloadLengthMismatch { .. }
        | VerifyError::PayloadHashMismatch
        | VerifyError::PayloadTooLarge { .. } => RejectCode::PayloadMismatch,
        VerifyError::BadFeatureStats(_) => RejectCode::Malformed,
        _ => RejectCode::ContextMismatch,
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

    use ed25519_dalek::SigningKey;
    use fedlink_protocol::{
        ModelHash, PROTOCOL_VERSION, PayloadHash, TensorSpec, UpdateHeader, UpdateNonce,
        ValueCodec, sign_update,
    };

    use crate::round::{ConnId, Input, RoundConfig, SiteCapabilities};

    struct World {
        runner: JobRunner,
        fed: FederationId,
        job: JobId,
        spec: ModelSpec,
        keys: BTreeMap<SiteId, VerifyingKey>,
        key: SigningKey,
        model: ModelHash,
    }

    /// A running job whose round 1 is open with site `a` selected.
    fn world() -> World {
        let model = ModelHash([3; 32]);
        let cfg = RoundConfig {
            rounds: 2,
            seed: 1,
            fraction: 1.0,
            min_sites: 1,
            gather: Duration::ZERO,
            max_sites: 4,
            quorum: 1,
            deadline: Duration::from_secs(60),
            extension: Duration::ZERO,
            max_attempts: 1,
            evaluate_every: 0,
            allow: None,
        };
        let mut runner = JobRunner::new(cfg, model);
        runner.handle(
            Instant::now(),
            Input::SiteConnected {
                site: sid("a"),
                conn: ConnId(1),
                capabilities: SiteCapabilities::compatible(),
            },
        );
        while runner.poll_action().is_some() {}
        assert_eq!(runner.selected_sites(), vec![sid("a")]);
        let key = SigningKey::from_bytes(&[7; 32]);
        let keys = BTreeMap::from([(SiteId::new("a").unwrap(), key.verifying_key())]);
        World {
            runner,
            fed: FederationId::new("fed").unwrap(),
            job: JobId::new("job-1").unwrap(),
            spec: ModelSpec::new(vec![TensorSpec::f32("w", vec![4])]).unwrap(),
            keys,
            key,
            model,
        }
    }

    impl World {
        fn expected(&self, open_round: Option<u64>) -> Expected<'_> {
            Expected {
                federation: &self.fed,
                job: &self.job,
                open_round: open_round.map(RoundId),
                encoding: Some(Encoding::with_codec(ValueCodec::F32).unwrap()),
                spec: &self.spec,
                keys: &self.keys,
            }
        }

        fn header(&self, nonce: u8) -> UpdateHeader {
            UpdateHeader {
                protocol_version: PROTOCOL_VERSION,
                federation_id: self.fed.clone(),
                site_id: SiteId::new("a").unwrap(),
                job_id: self.job.clone(),
                round: RoundId(1),
                base_model: self.model,
                num_examples: 10,
                encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
                payload_len: 16,
                payload_hash: PayloadHash([0; 32]),
                nonce: UpdateNonce([nonce; 16]),
                metrics: None,
                feature_stats: None,
            }
        }

        fn check(
            &self,
            replay: &mut ReplayGuard,
            site: &SiteId,
            h: UpdateHeader,
        ) -> Result<PayloadVerifier, Refusal> {
            let env = sign_update(&self.key, h);
            verify_header(&self.runner, &self.expected(Some(1)), replay, site, &env)
        }
    }

    #[test]
    fn a_good_header_is_admitted_once_and_its_replay_refused() {
        let w = world();
        let mut replay = ReplayGuard::new();
        let v = w.check(&mut replay, &sid("a"), w.header(1)).unwrap();
        assert_eq!(v.remaining(), 16);
        // The same signed envelope again: a replay.
        let err = w.check(&mut replay, &sid("a"), w.header(1)).unwrap_err();
        assert_eq!(err.code, RejectCode::Replay, "{err}");
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let w = world();
        let mut replay = ReplayGuard::new();
        // Another TLS identity than the signed site, unknown to the job.
        let err = w.check(&mut replay, &sid("b"), w.header(2)).unwrap_err();
        assert_eq!(err.code, RejectCode::UnknownSite, "{err}");
        assert_eq!(err.reason, "unknown site");
        // A wrong round: the round machine says so first.
        let mut h = w.header(3);
        h.round = RoundId(2);
        let err = w.check(&mut replay, &sid("a"), h).unwrap_err();
        assert_eq!(err.code, RejectCode::ContextMismatch, "{err}");
        // A header trained on another model.
        let mut h = w.header(4);
        h.base_model = ModelHash([9; 32]);
        let err = w.check(&mut replay, &sid("a"), h).unwrap_err();
        assert_eq!(err.code, RejectCode::ContextMismatch, "{err}");
        // A payload larger than the model can need.
        let mut h = w.header(5);
        h.payload_len = 1 << 40;
        let err = w.check(&mut replay, &sid("a"), h).unwrap_err();
        assert_eq!(err.code, RejectCode::PayloadMismatch, "{err}");
        assert!(err.reason.contains("payload bytes"), "{err}");
        // A bad signature: signed by another key.
        let other = SigningKey::from_bytes(&[8; 32]);
        let env = sign_update(&other, w.header(6));
        let err = verify_header(
            &w.runner,
            &w.expected(Some(1)),
            &mut replay,
            &sid("a"),
            &env,
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::BadSignature, "{err}");
        // No accumulator open (the driver's view) although the machine collects.
        let env = sign_update(&w.key, w.header(7));
        let err =
            verify_header(&w.runner, &w.expected(None), &mut replay, &sid("a"), &env).unwrap_err();
        assert_eq!(err.code, RejectCode::UnexpectedMessage, "{err}");
        assert_eq!(err.reason, "no round is open");
        // None of the refusals used up the site's round: a good one passes.
        w.check(&mut replay, &sid("a"), w.header(8)).unwrap();
    }
    #[test]
    fn a_resume_continues_the_kept_upload_against_the_job_as_it_is_now() {
        let w = world();
        let mut replay = ReplayGuard::new();
        let h = w.header(1);
        let env = sign_update(&w.key, h.clone());
        let mut v = verify_header(
            &w.runner,
            &w.expected(Some(1)),
            &mut replay,
            &sid("a"),
            &env,
        )
        .unwrap();
        v.update(&[0u8; 8]).unwrap();
        // The same envelope resumes, without a new attempt in the guard.
        let before = replay.clone();
        let resumed = verify_resume(
            &w.runner,
            &w.expected(Some(1)),
            &replay,
            &sid("a"),
            &env,
            v.clone(),
        )
        .unwrap();
        assert_eq!((resumed.received(), resumed.remaining()), (8, 8));
        assert_eq!(replay, before);
        // Another site's identity cannot resume it.
        let err = verify_resume(
            &w.runner,
            &w.expected(Some(1)),
            &replay,
            &sid("b"),
            &env,
            v.clone(),
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::UnknownSite, "{err}");
        // No round open any more: refused as any upload would be.
        let err = verify_resume(
            &w.runner,
            &w.expected(None),
            &replay,
            &sid("a"),
            &env,
            v.clone(),
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::UnexpectedMessage, "{err}");
        // Another header under the same nonce: not this upload.
        let mut other = h;
        other.payload_len = 12;
        let forged = sign_update(&w.key, other);
        let err = verify_resume(
            &w.runner,
            &w.expected(Some(1)),
            &replay,
            &sid("a"),
            &forged,
            v,
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::Replay, "{err}");
        assert!(err.reason.contains("cannot be resumed"), "{err}");
    }

    #[test]
    fn header_numbers_without_a_json_form_are_refused() {
        let w = world();
        let mut h = w.header(1);
        assert_eq!(check_header_numbers(&h), Ok(()));
        h.metrics = Some(fedlink_protocol::EvalMetrics {
            num_eval_examples: 5,
            loss: Some(0.5),
            accuracy: Some(2.0), // finite: usable or not is for the evaluation
            ..Default::default()
        });
        assert_eq!(check_header_numbers(&h), Ok(()));
        let mut nan = h.clone();
        if let Some(m) = nan.metrics.as_mut() {
            m.loss = Some(f64::NAN);
        }
        let err = check_header_numbers(&nan).unwrap_err();
        assert_eq!(err, HeaderNumberError::Metric("loss"));
        assert_eq!(
            err.to_string(),
            "the signed header's metric loss is not finite"
        );
        let mut inf = h.clone();
        if let Some(m) = inf.metrics.as_mut() {
            m.extra = vec![("f1".into(), f64::NEG_INFINITY)];
        }
        let err = check_header_numbers(&inf).unwrap_err();
        assert_eq!(err, HeaderNumberError::ExtraMetric("f1".into()));
        assert_eq!(
            err.to_string(),
            "the signed header's metric \"f1\" is not finite"
        );
        let mut stats = w.header(2);
        stats.feature_stats = Some(fedlink_protocol::FeatureStats {
            features: vec!["x".into()],
            count: 1,
            sum: vec![1.0],
            sum_sq: vec![f64::INFINITY],
        });
        let err = check_header_numbers(&stats).unwrap_err();
        assert_eq!(err, HeaderNumberError::FeatureStats);
        assert_eq!(
            err.to_string(),
            "the signed header's feature statistics are not finite"
        );
    }

    #[test]
    fn claimed_examples_are_checked_against_the_site_and_the_job() {
        assert_eq!(check_num_examples("a", 100, 1_000, None), Ok(()));
        assert_eq!(check_num_examples("a", 1_000, 1_000, Some(1_000)), Ok(()));
        // Over the site's declared size, under the job's cap.
        let err = check_num_examples("site-2", 1_001, 1_000_000, Some(1_000)).unwrap_err();
        assert_eq!(
            err,
            ClaimError::AboveDeclared {
                site: "site-2".into(),
                claimed: 1_001,
                declared: 1_000
            }
        );
        let why = err.to_string();
        assert!(
            why.contains("1001") && why.contains("1000") && why.contains("site-2"),
            "{why}"
        );
        assert!(why.contains("max_examples"), "{why}");
        // Over the job's cap, the site declaring nothing or more.
        for declared in [None, Some(u64::MAX)] {
            let err = check_num_examples("a", 1 << 30, 1_000_000, declared).unwrap_err();
            assert_eq!(
                err,
                ClaimError::AboveJobLimit {
                    claimed: 1 << 30,
                    limit: 1_000_000
                }
            );
            let why = err.to_string();
            assert!(
                why.contains(&(1u64 << 30).to_string()) && why.contains("1000000"),
                "{why}"
            );
            assert!(why.contains("max_examples_per_site"), "{why}");
        }
    }
}
