//! Federated evaluation of a given global model (protocol version
//! [`FEDERATED_EVAL_VERSION`]): the coordinator asks, each site evaluates the
//! model on its own validation split and answers with signed metrics.
//!
//! ```text
//!  coordinator ── EvalRequest {federation, job, round, model, arch, scaling} ──▶ site
//!                                  (control stream)   site: fetch/cache the model (hash-verified),
//!                                                     evaluate on its validation split
//!  coordinator ◀── EvalReport {report, signature} ── site (control stream; audited first)
//!      verify_eval_report: identity = TLS name, registered update key, signature,
//!      federation / job / round / model as asked
//! ```
//!
//! # Signed bytes
//!
//! [`EVAL_DOMAIN`] (`b"fedlink/eval/v1\0"`) followed by, integers
//! little-endian, strings as `u32` length + UTF-8:
//!
//! ```text
//! u16  protocol_version
//! str  federation_id
//! str  site_id
//! str  job_id
//! u64  round      (rounds completed when the model was made)
//! [32] model      (ModelHash)
//! ...  metrics    (as in the update header: u64 num_eval_examples;
//!                  4 × (u8 present, f64 bits); u32 n, n × (str, f64 bits))
//! ```
//!
//! The signature binds the metrics to one model of one job of one
//! federation and to the site; a report for another model, job or round is
//! refused whatever its signature. What the metrics may be (finite, in
//! range) is the coordinator's question after verification.
//!
//! ```
//! use ed25519_dalek::SigningKey;
//! use fedlink_protocol::evaluation::{EvalReport, ExpectedEval, sign_eval_report, verify_eval_report};
//! use fedlink_protocol::{EvalMetrics, FederationId, JobId, ModelHash, PROTOCOL_VERSION, RoundId, SiteId};
//! use std::collections::BTreeMap;
//!
//! let key = SigningKey::from_bytes(&[1; 32]);
//! let site = SiteId::new("st-mary")?;
//! let report = EvalReport {
//!     protocol_version: PROTOCOL_VERSION,
//!     federation_id: FederationId::new("fed")?,
//!     site_id: site.clone(),
//!     job_id: JobId::new("job-1")?,
//!     round: RoundId(3),
//!     model: ModelHash([9; 32]),
//!     metrics: EvalMetrics { num_eval_examples: 40, accuracy: Some(0.9), ..Default::default() },
//! };
//! let signed = sign_eval_report(&key, report);
//! let keys = BTreeMap::from([(site.clone(), key.verifying_key())]);
//! let want = ExpectedEval {
//!     federation_id: FederationId::new("fed")?,
//!     job_id: JobId::new("job-1")?,
//!     round: RoundId(3),
//!     model: ModelHash([9; 32]),
//! };
//! let metrics = verify_eval_report(&signed, &site, &keys, &want)?;
//! assert_eq!(metrics.num_eval_examples, 40);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use ed25519_dalek::{Signature, Signer, SigningKey};
use serde::{Deserialize, Serialize};

use crate::arch::ArchSpec;
use crate::envelope::{EvalMetrics, KeyDirectory, SignatureBytes, put_str};
use crate::ids::{FederationId, JobId, RoundId, SiteId};
use crate::message::VersionRange;
use crate::model::ModelHash;
use crate::scaling::FeatureScaling;

/// First protocol version that has [`crate::Message::EvalRequest`] and
/// [`crate::Message::EvalReport`].
pub const FEDERATED_EVAL_VERSION: u16 = 6;

/// Domain separation prefix of signed evaluation reports.
pub const EVAL_DOMAIN: &[u8] = b"fedlink/eval/v1\0";

/// Does a connection at negotiated protocol `version` carry evaluation
/// requests and reports?
pub fn supports_federated_eval(version: u16) -> bool {
    version >= FEDERATED_EVAL_VERSION
}

/// Coordinator → site: evaluate this global model on your validation split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRequest {
    /// Federation.
    pub federation_id: FederationId,
    /// Job.
    pub job_id: JobId,
    /// Rounds completed when the model was made.
    pub round: RoundId,
    /// The model (fetch it with `ModelFetch` unless cached).
    pub model: ModelHash,
    /// Its architecture.
    pub arch: ArchSpec,
    /// The federated standardisation of tabular features the job's offers
    /// carried last (`None`: local statistics, or not tabular).
    pub scaling: Option<FeatureScaling>,
}

/// What a site signs about one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Protocol version the report was made for.
    pub protocol_version: u16,
    /// Federation.
    pub federation_id: FederationId,
    /// The signing site (must equal its TLS identity).
    pub site_id: SiteId,
    /// Job.
    pub job_id: JobId,
    /// As in the request.
    pub round: RoundId,
    /// The evaluated model.
    pub model: ModelHash,
    /// The metrics on the site's validation split.
    pub metrics: EvalMetrics,
}

impl EvalReport {
    /// The exact bytes that are signed: [`EVAL_DOMAIN`] + canonical report.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(EVAL_DOMAIN);
        out.extend_from_slice(&self.protocol_version.to_le_bytes());
        put_str(&mut out, self.federation_id.as_str());
        put_str(&mut out, self.site_id.as_str());
        put_str(&mut out, self.job_id.as_str());
        out.extend_from_slice(&self.round.0.to_le_bytes());
        out.extend_from_slice(&self.model.0);
        self.metrics.canonical_bytes(&mut out);
        out
    }
}

/// Site → coordinator: a signed [`EvalReport`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedEvalReport {
    /// What is signed.
    pub report: EvalReport,
    /// ed25519 signature of [`EvalReport::signed_bytes`] with the site's
    /// update key.
    pub signature: SignatureBytes,
}

/// Sign a report with the site's update key (site side).
pub fn sign_eval_report(key: &SigningKey, report: EvalReport) -> SignedEvalReport {
    let sig = key.sign(&report.signed_bytes());
    SignedEvalReport {
        report,
        signature: SignatureBytes::from_bytes(&sig.to_bytes()),
    }
}

/// What the coordinator asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedEval {
    /// Federation.
    pub federation_id: FederationId,
    /// Job.
    pub job_id: JobId,
    /// Round, as in the request.
    pub round: RoundId,
    /// Model, as in the request.
    pub model: ModelHash,
}

/// Why a report was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalReportError {
    /// Unsupported protocol version in the report.
    #[error("report made for unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The report names another site than the TLS-authenticated one.
    #[error("report claims site {claimed} but the connection is authenticated as {authenticated}")]
    IdentityMismatch {
        /// From the certificate.
        authenticated: SiteId,
        /// From the report.
        claimed: SiteId,
    },
    /// No update key is registered for the site.
    #[error("no update key registered for site {0}")]
    UnknownSite(SiteId),
    /// The signature does not verify.
    #[error("report signature does not verify with the key registered for the site")]
    BadSignature,
    /// Not what was asked: another federation, job, round or model.
    #[error("report is for {field} {found}, the request was for {expected}")]
    ContextMismatch {
        /// Which field.
        field: &'static str,
        /// Asked.
        expected: String,
        /// In the report.
        found: String,
    },
}

/// Verify a report, signature first, then that it answers `expected`;
/// returns its metrics (not yet checked for range: the caller's job).
pub fn verify_eval_report<'a>(
    signed: &'a SignedEvalReport,
    authenticated: &SiteId,
    keys: &impl KeyDirectory,
    expected: &ExpectedEval,
) -> Result<&'a EvalMetrics, EvalReportError> {
    let r = &signed.report;
    if !VersionRange::SUPPORTED.contains(r.protocol_version)
        || r.protocol_version < FEDERATED_EVAL_VERSION
    {
        return Err(EvalReportError::UnsupportedVersion(r.protocol_version));
    }
    if &r.site_id != authenticated {
        return Err(EvalReportError::IdentityMismatch {
            authenticated: authenticated.clone(),
            claimed: r.site_id.clone(),
        });
    }
    let key = keys
        .update_key(authenticated)
        .ok_or_else(|| EvalReportError::UnknownSite(authenticated.clone()))?;
    let sig = Signature::from_bytes(&signed.signature.to_bytes());
    key.verify_strict(&r.signed_bytes(), &sig)
        .map_err(|_| EvalReportError::BadSignature)?;
    let mismatch = |field, expected: String, found: String| {
        Err(EvalReportError::ContextMismatch {
            field,
            expected,
            found,
        })
    };
    if r.federation_id != expected.federation_id {
        return mismatch(
            "federation",
            expected.federation_id.to_string(),
            r.federation_id.to_string(),
        );
    }
    if r.job_id != expected.job_id {
        return mismatch("job", expected.job_id.to_string(), r.job_id.to_string());
    }
    if r.round != expected.round {
        return mismatch("round", expected.round.to_string(), r.round.to_string());
    }
    if r.model != expected.model {
        return mismatch("model", expected.model.to_hex(), r.model.to_hex());
    }
    Ok(&r.metrics)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeMap;

    use super::*;
    use crate::PROTOCOL_VERSION;

    fn report() -> EvalReport {
        EvalReport {
            protocol_version: PROTOCOL_VERSION,
            federation_id: FederationId::new("fed").unwrap(),
            site_id: SiteId::new("a").unwrap(),
            job_id: JobId::new("j").unwrap(),
            round: RoundId(5),
            model: ModelHash([4; 32]),
            metrics: EvalMetrics {
                num_eval_examples: 12,
                loss: Some(0.5),
                accuracy: Some(0.75),
                auc: None,
                dice: None,
                extra: vec![("f1".into(), 0.5)],
            },
        }
    }

    fn expected() -> ExpectedEval {
        ExpectedEval {
            federation_id: FederationId::new("fed").unwrap(),
            job_id: JobId::new("j").unwrap(),
            round: RoundId(5),
            model: ModelHash([4; 32]),
        }
    }

    #[test]
    fn a_signed_report_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let site = SiteId::new("a").unwrap();
        let keys = BTreeMap::from([(site.clone(), key.verifying_key())]);
        let signed = sign_eval_report(&key, report());
        assert_eq!(
            verify_eval_report(&signed, &site, &keys, &expected()).unwrap(),
            &report().metrics
        );
        // Tampered metrics: the signature no longer verifies.
        let mut t = signed.clone();
        t.report.metrics.accuracy = Some(1.0);
        assert_eq!(
            verify_eval_report(&t, &site, &keys, &expected()),
            Err(EvalReportError::BadSignature)
        );
        // Another site's connection.
        let b = SiteId::new("b").unwrap();
        assert!(matches!(
            verify_eval_report(&signed, &b, &keys, &expected()),
            Err(EvalReportError::IdentityMismatch { .. })
        ));
        // Signed by another key.
        let other = sign_eval_report(&SigningKey::from_bytes(&[4; 32]), report());
        assert_eq!(
            verify_eval_report(&other, &site, &keys, &expected()),
            Err(EvalReportError::BadSignature)
        );
        // Unknown site.
        assert_eq!(
            verify_eval_report(&signed, &site, &BTreeMap::new(), &expected()),
            Err(EvalReportError::UnknownSite(site.clone()))
        );
    }

    #[test]
    fn a_report_for_another_model_round_or_job_is_refused() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let site = SiteId::new("a").unwrap();
        let keys = BTreeMap::from([(site.clone(), key.verifying_key())]);
        let signed = sign_eval_report(&key, report());
        let mut e = expected();
        e.model = ModelHash([5; 32]);
        let err = verify_eval_report(&signed, &site, &keys, &e).unwrap_err();
        assert!(
            err.to_string().starts_with("report is for model 0404"),
            "{err}"
        );
        let mut e = expected();
        e.round = RoundId(4);
        assert_eq!(
            verify_eval_report(&signed, &site, &keys, &e)
                .unwrap_err()
                .to_string(),
            "report is for round 5, the request was for 4"
        );
        let mut e = expected();
        e.job_id = JobId::new("k").unwrap();
        assert!(matches!(
            verify_eval_report(&signed, &site, &keys, &e),
            Err(EvalReportError::ContextMismatch { field: "job", .. })
        ));
        // A version before evaluation reports existed.
        let mut old = report();
        old.protocol_version = FEDERATED_EVAL_VERSION - 1;
        let old = sign_eval_report(&key, old);
        assert_eq!(
            verify_eval_report(&old, &site, &keys, &expected()),
            Err(EvalReportError::UnsupportedVersion(
                FEDERATED_EVAL_VERSION - 1
            ))
        );
    }

    #[test]
    fn signed_bytes_are_domain_separated_from_update_headers() {
        let b = report().signed_bytes();
        assert!(b.starts_with(EVAL_DOMAIN));
        assert_ne!(EVAL_DOMAIN, crate::UPDATE_DOMAIN);
    }
}
