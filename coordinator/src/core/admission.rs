//! A connection past its handshake, admitted or refused: the order of the
//! checks, the text each refusal sends and how it is recorded.
//!
//! The transport has verified the peer's certificate chain (the CA, the
//! validity, the revocation list, the role's extended key usage); the
//! driver (`crate::server`'s connection task) reads from it the facts
//! ([`Facts`]: the identity it carries, the negotiated ALPN, the
//! certificate's serial) and asks [`admit`], which checks in this order:
//!
//! ```text
//!  disk low? ───────────────── yes ─▶ LowOnDisk: closed (shutdown), no entry
//!  │                                   (`disk.low` records the state once)
//!  a fedlink identity? ──────── no ──▶ Refused: conn.refused, closed (forbidden)
//!  its role's ALPN? ─────────── no ──▶ Refused
//!  site: its registered certificate? (registry, asked only of sites) ─ no ─▶ Refused
//!  neither site nor admin ───────────▶ Refused
//!  connection caps (counted, asked last) ─ over ─▶ OverCaps: counted with
//!  │                                   the source's failed handshakes, closed
//!  ▼
//!  Accepted: conn.accepted by the peer, then its session
//! ```
//!
//! The registry's check ([`super::registry`]: the manifest as loaded) and
//! the connection caps ([`super::limits::OpenConnections`], held by the
//! driver: an admitted connection keeps its count until it ends) are asked
//! through the two closures, only when every check before them passed.
//! A refusal's text reaches the peer (its close) and, for [`Refusal::Refused`],
//! the `conn.refused` entry; it is made safe with
//! [`super::refusals::peer_text`] first.

use fedlink_audit::{CoordEvent, coord};
use fedlink_certs::{Identity, IdentityError, PeerRejected, Role, check_role_for_alpn};

use super::Effect;
use super::disk::LowOnDisk;
use super::limits::TooManyConnections;
use super::refusals::peer_text;
use super::registry::NotAllowed;

/// What the driver knows of a connection when its handshake is done.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The peer's address (`ip:port`).
    pub peer_addr: &'a str,
    /// The transport it came over (`quic`, `tcp`).
    pub transport: &'a str,
    /// The ALPN protocol negotiated, if any.
    pub alpn: Option<&'a [u8]>,
    /// The fedlink identity of its certificate, or why it has none.
    pub identity: Result<Identity, NoIdentity>,
    /// The serial of its end-entity certificate, if it parsed.
    pub cert_serial: Option<String>,
    /// The free-space guard's verdict ([`super::disk::DiskState::observe`]).
    pub disk: Result<(), LowOnDisk>,
    /// The coordinator's own identity (the actor of `conn.refused`).
    pub coordinator: &'a str,
}

/// Why a connection's certificate gives no fedlink identity, in the
/// transport's words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoIdentity {
    /// The certificate's error, read as the transport reads it (its text
    /// is the transport's `peer identity: …`).
    #[error("peer identity: {0}")]
    Certificate(IdentityError),
    /// Any other error of the transport while reading the identity (none
    /// today), with the transport's own text.
    #[error("{0}")]
    Transport(String),
}

/// Why a connection with a certificate is refused and recorded
/// (`conn.refused`). The text is the close reason and the entry's reason.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Refused {
    /// The certificate carries no fedlink identity.
    #[error("no fedlink identity: {0}")]
    NoIdentity(NoIdentity),
    /// The negotiated ALPN is not the identity's role's.
    #[error("role does not match the protocol: {0}")]
    RoleMismatch(PeerRejected),
    /// A site whose certificate is not the one its manifest entry
    /// registers (or that is not in the manifest).
    #[error("not a registered site certificate: {0}")]
    NotRegistered(NotAllowed),
    /// A peer neither site nor admin.
    #[error("only sites and admins may connect")]
    NotSiteOrAdmin,
}

/// How the driver closes a refused connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseAs {
    /// The coordinator cannot take the work (low on disk, audit log
    /// unwritable).
    Shutdown,
    /// The peer may not connect.
    Forbidden,
}

/// A connection refused: how it is closed, with which text, and how it is
/// on record.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// Low on disk: closed, no entry per connection.
    LowOnDisk(LowOnDisk),
    /// Refused after the handshake: its `conn.refused` entry (by the
    /// coordinator) first, then closed with its text.
    Refused(Box<Recorded>),
    /// Beyond the connection caps: counted with the failed handshakes of
    /// its source (not recorded one by one: an authenticated peer could
    /// otherwise flood the log too), then closed.
    OverCaps {
        /// The peer's identity.
        identity: Identity,
        /// Which cap.
        why: TooManyConnections,
    },
}

/// A refusal on record ([`Refusal::Refused`]).
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The peer's identity, if it has one.
    pub identity: Option<Identity>,
    /// Why.
    pub why: Refused,
    /// The close reason and the entry's reason (made safe).
    pub text: String,
    /// The `conn.refused` entry.
    pub audit: Effect,
}

impl Refusal {
    /// How the connection is closed.
    pub fn close_as(&self) -> CloseAs {
        match self {
            Self::LowOnDisk(_) => CloseAs::Shutdown,
            Self::Refused(_) | Self::OverCaps { .. } => CloseAs::Forbidden,
        }
    }

    /// The text the connection is closed with.
    pub fn text(&self) -> String {
        match self {
            Self::LowOnDisk(why) => why.to_string(),
            Self::Refused(r) => r.text.clone(),
            Self::OverCaps { why, .. } => why.to_string(),
        }
    }
}

/// A connection admitted: `audit` (`conn.accepted`, by the peer) is
/// appended before its session starts; if it cannot be, the connection is
/// closed ([`CloseAs::Shutdown`], [`AUDIT_UNWRITABLE`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// The peer's identity (its role picks the session: site or admin).
    pub identity: Identity,
    /// The `conn.accepted` entry.
    pub audit: Effect,
}

/// The close text of an admitted connection whose `conn.accepted` cannot
/// be written: nothing runs unaudited.
pub const AUDIT_UNWRITABLE: &str = "the coordinator cannot write its audit log";

/// Admit the connection described by `facts`, or refuse it, checking in
/// the order of the module's picture. `registered` is asked of a site's
/// identity only (its certificate against the manifest), `caps` last (it
/// counts the connection when it admits it).
pub fn admit(
    facts: Facts<'_>,
    registered: impl FnOnce(&Identity) -> Result<(), NotAllowed>,
    caps: impl FnOnce(&Identity) -> Result<(), TooManyConnections>,
) -> Result<Accepted, Refusal> {
    facts.disk.clone().map_err(Refusal::LowOnDisk)?;
    let identity = match &facts.identity {
        Ok(i) => i.clone(),
        Err(e) => return Err(refused(&facts, None, Refused::NoIdentity(e.clone()))),
    };
    if let Err(e) = check_role_for_alpn(&identity, facts.alpn) {
        return Err(refused(&facts, Some(identity), Refused::RoleMismatch(e)));
    }
    match identity.role() {
        Role::Site => {
            if let Err(e) = registered(&identity) {
                return Err(refused(&facts, Some(identity), Refused::NotRegistered(e)));
            }
        }
        Role::Admin => {}
        _ => return Err(refused(&facts, Some(identity), Refused::NotSiteOrAdmin)),
    }
    if let Err(why) = caps(&identity) {
        return Err(Refusal::OverCaps { identity, why });
    }
    let audit = Effect::AppendAudit {
        actor: identity.to_string(),
        event: CoordEvent::ConnAccepted(coord::ConnAccepted {
            peer_addr: facts.peer_addr.to_owned(),
            identity: identity.to_string(),
            alpn: alpn_text(facts.alpn),
            cert_serial: facts.cert_serial.clone(),
            transport: facts.transport.to_owned(),
        }),
    };
    Ok(Accepted { identity, audit })
}

fn alpn_text(alpn: Option<&[u8]>) -> Option<String> {
    alpn.map(|a| String::from_utf8_lossy(a).into_owned())
}

fn refused(facts: &Facts<'_>, identity: Option<Identity>, why: Refused) -> Refusal {
    let text = peer_text(&why.to_string());
    let audit = Effect::AppendAudit {
        actor: facts.coordinator.to_owned(),
        event: CoordEvent::ConnRefused(coord::ConnRefused {
            peer_addr: facts.peer_addr.to_owned(),
            identity: identity.as_ref().map(ToString::to_string),
            alpn: alpn_text(facts.alpn),
            reason: text.clone(),
        }),
    };
    Refusal::Refused(Box::new(Recorded {
        identity,
        why,
        text,
        audit,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlink_certs::{ALPN_ADMIN, ALPN_SITE};
    use std::cell::Cell;

    const COORD: &str = "fedlink://fed/coordinator/coord";

    fn id(role: Role, name: &str) -> Identity {
        Identity::new("fed", role, name).unwrap()
    }

    fn facts(
        identity: Result<Identity, NoIdentity>,
        alpn: Option<&'static [u8]>,
    ) -> Facts<'static> {
        Facts {
            peer_addr: "192.0.2.7:4433",
            transport: "quic",
            alpn,
            identity,
            cert_serial: Some("0a".into()),
            disk: Ok(()),
            coordinator: COORD,
        }
    }

    /// `admit` with the registry and the caps allowing, counting how often
    /// each was asked.
    fn run(f: Facts<'_>, asked: &Cell<(u32, u32)>) -> Result<Accepted, Refusal> {
        admit(
            f,
            |_| {
                let (r, c) = asked.get();
                asked.set((r + 1, c));
                Ok(())
            },
            |_| {
                let (r, c) = asked.get();
                asked.set((r, c + 1));
                Ok(())
            },
        )
    }

    fn refused_entry(r: &Refusal) -> &coord::ConnRefused {
        let Refusal::Refused(rec) = r else {
            panic!("not a recorded refusal: {r:?}");
        };
        let Effect::AppendAudit {
            actor,
            event: CoordEvent::ConnRefused(e),
        } = &rec.audit
        else {
            panic!("not a conn.refused entry: {rec:?}");
        };
        assert_eq!(actor, COORD);
        e
    }

    #[test]
    fn low_on_disk_is_refused_first_without_an_entry() {
        let asked = Cell::new((0, 0));
        let mut f = facts(
            Err(NoIdentity::Certificate(IdentityError::NoPeerCertificate)),
            None,
        );
        f.disk = Err(LowOnDisk {
            free: 1 << 20,
            min_free: 100 << 20,
        });
        let r = run(f, &asked).unwrap_err();
        assert!(matches!(r, Refusal::LowOnDisk(_)));
        assert_eq!(r.close_as(), CloseAs::Shutdown);
        assert!(
            r.text()
                .starts_with("the coordinator is low on disk space (1 MiB free")
        );
        assert_eq!(asked.get(), (0, 0));
    }

    #[test]
    fn no_identity_is_refused_and_recorded_without_one() {
        let asked = Cell::new((0, 0));
        let no_uri = NoIdentity::Certificate(IdentityError::NoIdentity);
        let r = run(facts(Err(no_uri), Some(ALPN_SITE)), &asked).unwrap_err();
        assert_eq!(r.close_as(), CloseAs::Forbidden);
        // The text the driver made from the transport's error when the
        // reason was a string: pinned.
        let text =
            "no fedlink identity: peer identity: certificate carries no fedlink:// identity URI";
        assert_eq!(r.text(), text);
        let e = refused_entry(&r);
        assert_eq!(e.identity, None);
        assert_eq!(e.alpn.as_deref(), Some("fedlink/1"));
        assert_eq!(e.peer_addr, "192.0.2.7:4433");
        assert_eq!(e.reason, text);
        assert_eq!(asked.get(), (0, 0));
    }

    #[test]
    fn a_role_on_the_other_roles_alpn_is_refused() {
        let asked = Cell::new((0, 0));
        for (role, alpn) in [
            (Role::Site, Some(ALPN_ADMIN)),
            (Role::Admin, Some(ALPN_SITE)),
            (Role::Site, None),
            (Role::Coordinator, Some(ALPN_SITE)),
        ] {
            let r = run(facts(Ok(id(role, "x")), alpn), &asked).unwrap_err();
            assert!(
                matches!(&r, Refusal::Refused(rec) if matches!(rec.why, Refused::RoleMismatch(_))),
                "{r:?}"
            );
            assert!(r.text().starts_with("role does not match the protocol: "));
            assert_eq!(
                refused_entry(&r).identity.as_deref(),
                Some(id(role, "x").to_string().as_str())
            );
        }
        assert_eq!(asked.get(), (0, 0));
    }

    #[test]
    fn a_site_without_its_registered_certificate_is_refused_before_the_caps() {
        let caps = Cell::new(0);
        let r = admit(
            facts(Ok(id(Role::Site, "site-a")), Some(ALPN_SITE)),
            |_| Err(NotAllowed::NotRegistered("site-a".into())),
            |_| {
                caps.set(caps.get() + 1);
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(
            r.text(),
            "not a registered site certificate: site-a is not a registered site (removed or revoked)"
        );
        assert_eq!(refused_entry(&r).reason, r.text());
        assert_eq!(caps.get(), 0);
    }

    #[test]
    fn an_admin_is_not_asked_of_the_registry() {
        let asked = Cell::new((0, 0));
        let a = run(facts(Ok(id(Role::Admin, "ops")), Some(ALPN_ADMIN)), &asked).unwrap();
        assert_eq!(a.identity, id(Role::Admin, "ops"));
        assert_eq!(asked.get(), (0, 1));
    }

    #[test]
    fn over_the_caps_is_refused_last_and_not_recorded() {
        let registry = Cell::new(0);
        let r = admit(
            facts(Ok(id(Role::Site, "site-a")), Some(ALPN_SITE)),
            |_| {
                registry.set(registry.get() + 1);
                Ok(())
            },
            |_| Err(TooManyConnections::Total { max: 3 }),
        )
        .unwrap_err();
        assert!(matches!(r, Refusal::OverCaps { .. }));
        assert_eq!(r.close_as(), CloseAs::Forbidden);
        assert_eq!(
            r.text(),
            "the coordinator has 3 connections open, its limit (max_connections)"
        );
        assert_eq!(registry.get(), 1);
    }

    #[test]
    fn an_accepted_site_is_recorded_by_itself() {
        let asked = Cell::new((0, 0));
        let a = run(facts(Ok(id(Role::Site, "site-a")), Some(ALPN_SITE)), &asked).unwrap();
        assert_eq!(asked.get(), (1, 1));
        let Effect::AppendAudit { actor, event } = &a.audit else {
            panic!("{:?}", a.audit);
        };
        assert_eq!(actor, &id(Role::Site, "site-a").to_string());
        assert_eq!(
            event,
            &CoordEvent::ConnAccepted(coord::ConnAccepted {
                peer_addr: "192.0.2.7:4433".into(),
                identity: id(Role::Site, "site-a").to_string(),
                alpn: Some("fedlink/1".into()),
                cert_serial: Some("0a".into()),
                transport: "quic".into(),
            })
        );
    }

    #[test]
    fn a_peer_supplied_reason_is_made_safe() {
        let asked = Cell::new((0, 0));
        let long = format!("bad\n{}", "x".repeat(4096));
        let why = NoIdentity::Certificate(IdentityError::BadCertificate(long));
        let r = run(facts(Err(why), Some(ALPN_SITE)), &asked).unwrap_err();
        assert!(!r.text().contains('\n'));
        assert!(r.text().len() < 4096);
        assert_eq!(refused_entry(&r).reason, r.text());
    }
}
