//! A site's signed audit head, decided: whether the head a site sends
//! (`AuditHead` on its control stream) is signed with the update key its
//! manifest entry registers, and which entry records it — `site.audit_head`
//! when it is, `site.audit_head_rejected` with the reason when it is not
//! (the connection stays either way).
//!
//! The driver (`crate::server`'s connection task) reads the manifest it
//! holds, asks [`site_head`], appends the entry and, once a verified head
//! is on record, answers with the coordinator's own signed head.
//!
//! ```text
//!  AuditHead{seq, hash, ts, sig} from site S
//!     │ manifest[S]? ── none ──▶ rejected "the site is not in the manifest"
//!     │ its update key parses? ── no ──▶ rejected "the site's registered key is unusable: …"
//!     │ signature valid (strict ed25519)? ── no ──▶ rejected "bad signature …"
//!     ▼
//!  AppendAudit(site.audit_head) ──▶ the driver answers with its own head
//! ```
//!
//! The head is not compared with an earlier one of the same site (a head
//! that goes backwards is recorded like any other: the site's log and
//! `reconcile` judge the sequence).

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::SiteManifest;
use fedlink_protocol::message::AuditHead;

use super::Effect;

/// Why a site's audit head is not recorded as verified. The text is the
/// `reason` of the `site.audit_head_rejected` entry and of the log line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadRejected {
    /// The site is not in the manifest (never registered, removed or
    /// revoked), or the driver could not read the manifest it holds.
    #[error("the site is not in the manifest")]
    NotInManifest,
    /// The manifest's `update_public_key` for the site does not parse.
    #[error("the site's registered key is unusable: {0}")]
    KeyUnusable(String),
    /// The signature is not valid for the site's registered key.
    #[error("bad signature (not made with the site's registered key)")]
    BadSignature,
}

/// What [`site_head`] decided: the verdict and the entry that records it
/// (appended first; the driver answers only after a verified head's entry
/// is written).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadDecision {
    /// Verified, or why not.
    pub verdict: Result<(), HeadRejected>,
    /// `site.audit_head` or `site.audit_head_rejected`, by the site.
    pub audit: Effect,
}

/// Decide on `head`, sent by `site` of `federation`, against `manifest`
/// (`None` when the driver cannot read the one it holds: treated as a site
/// not in the manifest, as before).
pub fn site_head(
    federation: &str,
    manifest: Option<&SiteManifest>,
    site: &str,
    head: &AuditHead,
) -> HeadDecision {
    let signed = fedlink_audit::SignedHead {
        seq: head.seq,
        hash: fedlink_audit::EntryHash(head.hash),
        ts_unix_ms: head.ts_unix_ms,
        sig: hex::encode(head.sig),
    };
    let verdict = match manifest
        .and_then(|m| m.get(site))
        .map(|e| e.update_verifying_key())
    {
        Some(Ok(key)) if signed.signature_ok(&key) => Ok(()),
        Some(Ok(_)) => Err(HeadRejected::BadSignature),
        Some(Err(e)) => Err(HeadRejected::KeyUnusable(e.to_string())),
        None => Err(HeadRejected::NotInManifest),
    };
    let recorded = coord::AuditHeadOf {
        site: site.to_owned(),
        seq: head.seq,
        hash: hex::encode(head.hash),
        ts_unix_ms: head.ts_unix_ms,
        sig: signed.sig,
    };
    let event = match &verdict {
        Ok(()) => CoordEvent::SiteAuditHead(recorded),
        Err(why) => CoordEvent::SiteAuditHeadRejected(coord::AuditHeadRejected {
            head: recorded,
            reason: why.to_string(),
        }),
    };
    HeadDecision {
        verdict,
        audit: Effect::AppendAudit {
            actor: fedlink_audit::event::site_actor(federation, site),
            event,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use fedlink_audit::EventKind;
    use fedlink_certs::{Identity, Role, Serial, SiteEntry};

    const FED: &str = "fed-test";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn manifest_with(site: &str, update_key_hex: &str) -> SiteManifest {
        let mut m = SiteManifest::new(FED).unwrap();
        m.site.push(SiteEntry {
            name: site.to_owned(),
            identity: Identity::new(FED, Role::Site, site).unwrap(),
            cert_serial: Serial::from_bytes(&[1]).unwrap(),
            cert_fingerprint: hex::encode([1u8; 32]).parse().unwrap(),
            update_public_key: update_key_hex.to_owned(),
            added_at: "2026-01-01T00:00:00Z".into(),
            renewed_at: None,
            max_examples: None,
        });
        m
    }

    /// A head signed by `signer` as the site's log writer signs it.
    fn head(signer: &SigningKey, seq: u64) -> AuditHead {
        let hash = [7u8; 32];
        let signed = fedlink_audit::SignedHead::sign(
            signer,
            fedlink_audit::EntryHead {
                seq,
                hash: fedlink_audit::EntryHash(hash),
            },
            1_700_000_000_000,
        );
        let sig: [u8; 64] = hex::decode(&signed.sig).unwrap().try_into().unwrap();
        AuditHead {
            seq,
            hash,
            ts_unix_ms: signed.ts_unix_ms,
            sig,
        }
    }

    fn event_of(d: &HeadDecision) -> (&str, &CoordEvent) {
        let Effect::AppendAudit { actor, event } = &d.audit else {
            panic!("not an audit append: {:?}", d.audit);
        };
        (actor, event)
    }

    #[test]
    fn a_head_signed_with_the_registered_key_is_recorded() {
        let k = key(1);
        let m = manifest_with("site-a", &hex::encode(k.verifying_key().as_bytes()));
        let h = head(&k, 42);
        let d = site_head(FED, Some(&m), "site-a", &h);
        assert_eq!(d.verdict, Ok(()));
        let (actor, event) = event_of(&d);
        assert_eq!(actor, fedlink_audit::event::site_actor(FED, "site-a"));
        assert_eq!(event.kind(), EventKind::SiteAuditHead);
        // The entry's details (as the driver serialises them, keys sorted).
        assert_eq!(
            serde_json::to_string(&event.details().unwrap()).unwrap(),
            format!(
                "{{\"hash\":\"{}\",\"seq\":42,\"sig\":\"{}\",\"site\":\"site-a\",\"ts_unix_ms\":1700000000000}}",
                hex::encode([7u8; 32]),
                hex::encode(h.sig)
            )
        );
    }

    #[test]
    fn a_head_signed_with_another_key_is_rejected_with_the_reason() {
        let m = manifest_with("site-a", &hex::encode(key(1).verifying_key().as_bytes()));
        let d = site_head(FED, Some(&m), "site-a", &head(&key(2), 42));
        assert_eq!(d.verdict, Err(HeadRejected::BadSignature));
        let (_, event) = event_of(&d);
        assert_eq!(event.kind(), EventKind::SiteAuditHeadRejected);
        let CoordEvent::SiteAuditHeadRejected(r) = event else {
            panic!("{event:?}");
        };
        assert_eq!(
            r.reason,
            "bad signature (not made with the site's registered key)"
        );
        assert_eq!(r.head.seq, 42);
    }

    #[test]
    fn a_tampered_head_is_rejected() {
        let k = key(1);
        let m = manifest_with("site-a", &hex::encode(k.verifying_key().as_bytes()));
        let mut h = head(&k, 42);
        h.seq = 43;
        let d = site_head(FED, Some(&m), "site-a", &h);
        assert_eq!(d.verdict, Err(HeadRejected::BadSignature));
    }

    #[test]
    fn a_site_not_in_the_manifest_is_rejected() {
        // Unknown, removed or revoked (`sites revoke` takes it out of the
        // manifest), or a manifest the driver cannot read.
        let k = key(1);
        let m = manifest_with("site-a", &hex::encode(k.verifying_key().as_bytes()));
        for manifest in [Some(&m), None] {
            let d = site_head(FED, manifest, "site-b", &head(&k, 1));
            assert_eq!(d.verdict, Err(HeadRejected::NotInManifest));
            let (actor, event) = event_of(&d);
            assert_eq!(actor, fedlink_audit::event::site_actor(FED, "site-b"));
            let CoordEvent::SiteAuditHeadRejected(r) = event else {
                panic!("{event:?}");
            };
            assert_eq!(r.reason, "the site is not in the manifest");
            assert_eq!(r.head.site, "site-b");
        }
    }

    #[test]
    fn an_unusable_registered_key_is_named() {
        // 32 bytes that are not a point on the curve are refused by
        // `VerifyingKey::from_bytes`; a short key by its length.
        let m = manifest_with("site-a", &"00".repeat(16));
        let d = site_head(FED, Some(&m), "site-a", &head(&key(1), 1));
        let Err(HeadRejected::KeyUnusable(why)) = &d.verdict else {
            panic!("{:?}", d.verdict);
        };
        assert!(why.contains("32 bytes"), "{why}");
        assert!(
            d.verdict
                .clone()
                .unwrap_err()
                .to_string()
                .starts_with("the site's registered key is unusable: ")
        );
    }

    #[test]
    fn a_head_that_goes_backwards_is_recorded_like_any_other() {
        let k = key(1);
        let m = manifest_with("site-a", &hex::encode(k.verifying_key().as_bytes()));
        assert_eq!(
            site_head(FED, Some(&m), "site-a", &head(&k, 9)).verdict,
            Ok(())
        );
        assert_eq!(
            site_head(FED, Some(&m), "site-a", &head(&k, 3)).verdict,
            Ok(())
        );
    }
}
