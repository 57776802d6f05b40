//! The site connections the coordinator holds, by site and connection id.
//!
//! One connection per site: a second connection of a site replaces the
//! first ([`CloseReason::Replaced`]); the end of a connection that was
//! already replaced is ignored (stale [`ConnId`]). The table outlives jobs:
//! the serve loop keeps it while no job runs and across job switches, and
//! [`Sites::hand_over`] gives every held site to the round machine of the
//! job that starts, the same way whether a job follows nothing or another
//! job.

use std::collections::BTreeMap;

use fedlink_protocol::{Encoding, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ValueCodec};

use super::effect::{CloseReason, Effect};
use crate::round::{ConnId, Input, SiteCapabilities, SiteId};

/// A connected site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Its current connection.
    pub conn: ConnId,
    /// What it told the coordinator about itself (compatibility is decided
    /// again against each job's encoding at [`Sites::hand_over`]).
    pub capabilities: SiteCapabilities,
    /// The codecs it announced in its Hello.
    pub codecs: Vec<ValueCodec>,
    /// The protocol version negotiated with it.
    pub protocol_version: u16,
}

/// What a job asks of a site before the site is offered its rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobNeeds {
    /// The job's delta encoding: the site must speak its codec family
    /// (`None`: any).
    pub encoding: Option<Encoding>,
    /// The oldest negotiated protocol version that can carry the job's
    /// offers (`Job::min_protocol_version`: 5 for a deep U-Net or
    /// augmentation).
    pub min_protocol_version: u16,
}

impl JobNeeds {
    /// No job, or a job that every site can take part in.
    pub const ANY: Self = Self {
        encoding: None,
        min_protocol_version: MIN_PROTOCOL_VERSION,
    };

    /// What `job` asks of its sites.
    pub fn of(job: &crate::job::Job) -> Self {
        Self {
            encoding: job.encoding.to_protocol().ok(),
            min_protocol_version: job.min_protocol_version(),
        }
    }
}

/// The connected sites (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Sites {
    held: BTreeMap<SiteId, Held>,
}

impl Sites {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// `site` completed its handshake on `held.conn`. A connection it had
    /// before is closed (returned as an effect).
    pub fn connect(&mut self, site: &SiteId, held: Held) -> Option<Effect> {
        let new = held.conn;
        let old = self.held.insert(site.clone(), held)?;
        (old.conn != new).then_some(Effect::Close {
            conn: old.conn,
            reason: CloseReason::Replaced,
        })
    }

    /// The connection `conn` of `site` ended. `true` if it was the site's
    /// current one (it is forgotten); `false` for a stale end (a connection
    /// already replaced), which changes nothing.
    pub fn disconnect(&mut self, site: &SiteId, conn: ConnId) -> bool {
        if self.conn_of(site) == Some(conn) {
            self.held.remove(site);
            true
        } else {
            false
        }
    }

    /// Close `conn` of `site` for `reason`, if it is still the site's
    /// current connection (the round machine's `Disconnect`, a revocation).
    pub fn close(&mut self, site: &SiteId, conn: ConnId, reason: CloseReason) -> Option<Effect> {
        self.disconnect(site, conn)
            .then_some(Effect::Close { conn, reason })
    }

    /// Close the connection of every site `allowed` refuses (revoked,
    /// removed or superseded certificates), with the reason it gives.
    /// Returns the sites cut off with their connections, and the effects.
    pub fn revoke_where<E: std::fmt::Display>(
        &mut self,
        mut allowed: impl FnMut(&SiteId, ConnId) -> Result<(), E>,
    ) -> (Vec<(SiteId, ConnId)>, Vec<Effect>) {
        let mut cut = Vec::new();
        let mut effects = Vec::new();
        self.held.retain(|site, h| match allowed(site, h.conn) {
            Ok(()) => true,
            Err(why) => {
                cut.push((site.clone(), h.conn));
                effects.push(Effect::Close {
                    conn: h.conn,
                    reason: CloseReason::Forbidden(why.to_string()),
                });
                false
            }
        });
        (cut, effects)
    }

    /// Close every connection (shutdown).
    pub fn close_all(&mut self, reason: &CloseReason) -> Vec<Effect> {
        std::mem::take(&mut self.held)
            .into_values()
            .map(|h| Effect::Close {
                conn: h.conn,
                reason: reason.clone(),
            })
            .collect()
    }

    /// The current connection of `site`.
    pub fn conn_of(&self, site: &SiteId) -> Option<ConnId> {
        self.held.get(site).map(|h| h.conn)
    }

    /// The protocol version negotiated on `site`'s current connection.
    pub fn protocol_version(&self, site: &SiteId) -> Option<u16> {
        self.held.get(site).map(|h| h.protocol_version)
    }

    /// The site whose current connection is `conn`.
    pub fn site_of(&self, conn: ConnId) -> Option<&SiteId> {
        self.held
            .iter()
            .find(|(_, h)| h.conn == conn)
            .map(|(s, _)| s)
    }

    /// Sites connected now, sorted.
    pub fn connected(&self) -> Vec<SiteId> {
        self.held.keys().cloned().collect()
    }

    /// How many sites are connected.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no site is connected.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Hand every held site to the job that starts now: its compatibility
    /// is decided against what the job `needs` (see [`compatibility`]), and
    /// the inputs that tell the job's round machine about the sites are
    /// returned in the order the sites connected (by [`ConnId`]). The sites
    /// stay held: the same table serves the next job too.
    pub fn hand_over(&mut self, needs: &JobNeeds) -> Vec<Input> {
        let mut held: Vec<(&SiteId, &mut Held)> = self.held.iter_mut().collect();
        held.sort_by_key(|(_, h)| h.conn);
        held.into_iter()
            .map(|(site, h)| {
                h.capabilities.compatible =
                    compatibility(&h.codecs, h.protocol_version, needs).is_ok();
                Input::SiteConnected {
                    site: site.clone(),
                    conn: h.conn,
                    capabilities: h.capabilities.clone(),
                }
            })
            .collect()
    }

    /// The held sites that cannot take part in a job that `needs` this,
    /// each with the reason (for the log).
    pub fn incompatible(&self, needs: &JobNeeds) -> Vec<(SiteId, Incompatible)> {
        self.held
            .iter()
            .filter_map(|(site, h)| {
                compatibility(&h.codecs, h.protocol_version, needs)
                    .err()
                    .map(|why| (site.clone(), why))
            })
            .collect()
    }
}

/// Whether a site that announced `codecs` can take part in a job that
/// uses `encoding`: it speaks the job's codec family (`None`: no job, or
/// a job without an encoding: yes).
pub fn compatible(codecs: &[ValueCodec], encoding: Option<Encoding>) -> bool {
    encoding.is_none_or(|enc| codecs.iter().any(|c| same_family(*c, enc.values())))
}

/// Why a connected site cannot take part in a job ([`compatibility`]);
/// logged when the site connects and when a job takes the sites over.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Incompatible {
    /// The site negotiated a protocol version older than the job's offers
    /// need.
    #[error(
        "the job needs protocol version {needs} (a U-Net of depth other than 2, or \
         augmentation) and the site negotiated {negotiated}: upgrade its agent \
         (this coordinator speaks up to {PROTOCOL_VERSION})"
    )]
    ProtocolVersion {
        /// The version the job's offers need.
        needs: u16,
        /// The version negotiated with the site.
        negotiated: u16,
    },
    /// The site did not announce the job's delta codec (family).
    #[error("the job's delta codec ({codec}) is not among the codecs the site announced")]
    Codec {
        /// The name of the job's encoding.
        codec: String,
    },
}

/// Whether a site that announced `codecs` and negotiated protocol
/// `version` can take part in a job that `needs` this; the error says
/// why not. A site below the job's protocol version would not even decode
/// its offers (a deep U-Net's `unet_deep` arch, augmentation), so it is
/// never offered one.
pub fn compatibility(
    codecs: &[ValueCodec],
    version: u16,
    needs: &JobNeeds,
) -> Result<(), Incompatible> {
    if version < needs.min_protocol_version {
        return Err(Incompatible::ProtocolVersion {
            needs: needs.min_protocol_version,
            negotiated: version,
        });
    }
    if !compatible(codecs, needs.encoding) {
        let codec = needs.encoding.map(|e| e.name()).unwrap_or_default();
        return Err(Incompatible::Codec { codec });
    }
    Ok(())
}

/// Whether two value codecs are of the same family (parameters such as
/// top-k's fraction aside).
pub fn same_family(a: ValueCodec, b: ValueCodec) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn sid(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    fn held(conn: u64, codecs: &[ValueCodec]) -> Held {
        Held {
            conn: ConnId(conn),
            capabilities: SiteCapabilities::compatible(),
            codecs: codecs.to_vec(),
            protocol_version: PROTOCOL_VERSION,
        }
    }

    #[test]
    fn a_second_connection_replaces_the_first_and_its_stale_end_is_ignored() {
        let mut s = Sites::new();
        assert_eq!(s.connect(&sid("a"), held(1, &[])), None);
        assert_eq!(
            s.connect(&sid("a"), held(2, &[])),
            Some(Effect::Close {
                conn: ConnId(1),
                reason: CloseReason::Replaced
            })
        );
        assert!(!s.disconnect(&sid("a"), ConnId(1)), "stale end");
        assert_eq!(s.conn_of(&sid("a")), Some(ConnId(2)));
        assert_eq!(s.site_of(ConnId(2)), Some(&sid("a")));
        assert!(s.disconnect(&sid("a"), ConnId(2)));
        assert!(s.is_empty());
        assert!(!s.disconnect(&sid("a"), ConnId(2)), "already gone");
    }

    #[test]
    fn close_applies_only_to_the_current_connection() {
        let mut s = Sites::new();
        s.connect(&sid("a"), held(1, &[]));
        s.connect(&sid("a"), held(2, &[]));
        assert_eq!(s.close(&sid("a"), ConnId(1), CloseReason::NotAllowed), None);
        assert_eq!(
            s.close(&sid("a"), ConnId(2), CloseReason::NotAllowed),
            Some(Effect::Close {
                conn: ConnId(2),
                reason: CloseReason::NotAllowed
            })
        );
        assert!(s.is_empty());
    }

    #[test]
    fn revocation_cuts_off_only_the_refused_sites_with_the_reason() {
        let mut s = Sites::new();
        for (i, site) in ["a", "b", "c"].iter().enumerate() {
            s.connect(&sid(site), held(i as u64, &[]));
        }
        let (cut, effects) = s.revoke_where(|site, _| {
            if site.as_str() == "b" {
                Err("certificate revoked")
            } else {
                Ok(())
            }
        });
        assert_eq!(cut, vec![(sid("b"), ConnId(1))]);
        assert_eq!(
            effects,
            vec![Effect::Close {
                conn: ConnId(1),
                reason: CloseReason::Forbidden("certificate revoked".into())
            }]
        );
        assert_eq!(s.connected(), vec![sid("a"), sid("c")]);
    }

    #[test]
    fn hand_over_keeps_the_sites_in_connection_order_and_decides_compatibility() {
        let mut s = Sites::new();
        s.connect(&sid("z"), held(1, &[ValueCodec::F16]));
        s.connect(&sid("a"), held(2, &[ValueCodec::F32]));
        let f16 = Encoding::with_codec(ValueCodec::F16).unwrap();
        let inputs = s.hand_over(&JobNeeds {
            encoding: Some(f16),
            min_protocol_version: MIN_PROTOCOL_VERSION,
        });
        let got: Vec<(SiteId, u64, bool)> = inputs
            .into_iter()
            .map(|i| match i {
                Input::SiteConnected {
                    site,
                    conn,
                    capabilities,
                } => (site, conn.0, capabilities.compatible),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(got, vec![(sid("z"), 1, true), (sid("a"), 2, false)]);
        let why = s.incompatible(&JobNeeds {
            encoding: Some(f16),
            min_protocol_version: MIN_PROTOCOL_VERSION,
        });
        assert_eq!(
            why,
            vec![(sid("a"), Incompatible::Codec { codec: f16.name() })]
        );
        assert!(why[0].1.to_string().contains("not among the codecs"));
        // Still held: the next job gets them too, with its own encoding.
        assert_eq!(s.len(), 2);
        let again = s.hand_over(&JobNeeds::ANY);
        assert!(again.iter().all(|i| matches!(
            i,
            Input::SiteConnected { capabilities, .. } if capabilities.compatible
        )));
    }

    /// A site that negotiated protocol 4 cannot decode a deep U-Net's
    /// offer (nor augmentation): it is not offered that job, and the reason
    /// says why; a depth-2 job without augmentation still is.
    #[test]
    fn a_version_4_site_is_not_offered_a_job_that_needs_version_5() {
        let mut s = Sites::new();
        s.connect(
            &sid("old"),
            Held {
                protocol_version: 4,
                ..held(1, &[ValueCodec::F32])
            },
        );
        s.connect(&sid("new"), held(2, &[ValueCodec::F32]));
        let deep: crate::job::Job = crate::job::Job::from_toml(
            r#"
id = "deep"
rounds = 1
arch = { kind = "unet", in_channels = 1, base_channels = 4, depth = 3, classes = 2 }
init = { seed = 1 }
[strategy]
name = "fedavg"
[round]
deadline_secs = 60
"#,
        )
        .unwrap();
        let needs = JobNeeds::of(&deep);
        assert_eq!(
            needs.min_protocol_version,
            fedlink_protocol::TRAINING_V5_VERSION
        );
        let compat: Vec<(SiteId, bool)> = s
            .hand_over(&needs)
            .into_iter()
            .map(|i| match i {
                Input::SiteConnected {
                    site, capabilities, ..
                } => (site, capabilities.compatible),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(compat, vec![(sid("old"), false), (sid("new"), true)]);
        let why = s.incompatible(&needs);
        assert_eq!(why.len(), 1);
        assert_eq!(why[0].0.as_str(), "old");
        assert_eq!(
            why[0].1,
            Incompatible::ProtocolVersion {
                needs: 5,
                negotiated: 4
            }
        );
        let text = why[0].1.to_string();
        assert!(
            text.contains("protocol version 5") && text.contains("negotiated 4"),
            "{text}"
        );

        // the same U-Net at depth 2 (the old encoding) is fine for both
        let mut shallow = deep.clone();
        shallow.arch = fedlink_protocol::arch::ArchSpec::UNet {
            in_channels: 1,
            base_channels: 4,
            depth: 2,
            classes: 2,
        };
        let needs = JobNeeds::of(&shallow);
        assert!(s.incompatible(&needs).is_empty());
        assert!(s.hand_over(&needs).iter().all(|i| matches!(
            i,
            Input::SiteConnected { capabilities, .. } if capabilities.compatible
        )));
        // augmentation on it needs version 5 again
        shallow.training.augmentation = Some(crate::job::AugmentationConfig {
            flips: true,
            ..Default::default()
        });
        assert_eq!(s.incompatible(&JobNeeds::of(&shallow)).len(), 1);
    }

    /// A job whose sites weigh classes ("balanced") needs protocol 6: a
    /// version-5 site is not offered it, with the reason; the same job
    /// without class weighting is offered to both.
    #[test]
    fn a_version_5_site_is_not_offered_a_class_weighted_job() {
        let mut s = Sites::new();
        s.connect(
            &sid("old"),
            Held {
                protocol_version: fedlink_protocol::TRAINING_V5_VERSION,
                ..held(1, &[ValueCodec::F32])
            },
        );
        s.connect(&sid("new"), held(2, &[ValueCodec::F32]));
        let mut job: crate::job::Job = crate::job::Job::from_toml(
            r#"
id = "weighted"
rounds = 1
arch = { kind = "logreg", inputs = 4, classes = 2 }
init = { seed = 1 }
[strategy]
name = "fedavg"
[round]
deadline_secs = 60
[training]
class_weight = "balanced"
"#,
        )
        .unwrap();
        let needs = JobNeeds::of(&job);
        assert_eq!(
            needs.min_protocol_version,
            fedlink_protocol::CLASS_WEIGHT_VERSION
        );
        let why = s.incompatible(&needs);
        assert_eq!(why.len(), 1);
        assert_eq!(why[0].0.as_str(), "old");
        assert_eq!(
            why[0].1,
            Incompatible::ProtocolVersion {
                needs: 6,
                negotiated: 5
            }
        );
        let text = why[0].1.to_string();
        assert!(
            text.contains("protocol version 6") && text.contains("negotiated 5"),
            "{text}"
        );
        job.training.class_weight = crate::job::ClassWeightConfig::None;
        assert!(s.incompatible(&JobNeeds::of(&job)).is_empty());
    }

    #[test]
    fn close_all_closes_every_connection() {
        let mut s = Sites::new();
        s.connect(&sid("a"), held(1, &[]));
        s.connect(&sid("b"), held(2, &[]));
        let effects = s.close_all(&CloseReason::Shutdown);
        assert_eq!(effects.len(), 2);
        assert!(s.is_empty());
    }
}
