//! The site connections the driver holds: the core's site table
//! ([`crate::core::Sites`], by opaque [`ConnId`]) plus the transport
//! handles of each connection id. The table and the handles live as long
//! as the serve loop: held while no job runs, used by the running job's
//! engine, and handed to the next job after a job switch exactly as after
//! an empty start ([`Links::hand_over`]).

use std::collections::HashMap;

use fedlink_protocol::{Message, SiteId};
use fedlink_transport::ServerConn;
use tokio::sync::mpsc;

use super::event::SiteConnected;
use super::limits;
use super::shared::Shared;
use crate::core::{CloseReason, Effect, Held, JobNeeds, Sites};
use crate::round::{ConnId, Input, SiteCapabilities};

/// The transport side of one connection.
#[derive(Debug)]
struct Io {
    conn: ServerConn,
    /// The connection's control-stream queue.
    control: mpsc::Sender<Message>,
}

/// The connected sites and their connections.
#[derive(Debug, Default)]
pub(crate) struct Links {
    sites: Sites,
    io: HashMap<ConnId, Io>,
}

impl Links {
    /// A site completed Hello/Welcome: its connection is held (one it had
    /// before is closed). Gives back its name, connection and capabilities
    /// for the round machine's `SiteConnected`.
    pub(crate) fn connect(&mut self, c: SiteConnected) -> (SiteId, ConnId, SiteCapabilities) {
        let SiteConnected {
            site,
            conn_id,
            conn,
            control,
            capabilities,
            codecs,
            protocol_version,
        } = c;
        self.io.insert(conn_id, Io { conn, control });
        let held = Held {
            conn: conn_id,
            capabilities: capabilities.clone(),
            codecs,
            protocol_version,
        };
        if let Some(e) = self.sites.connect(&site, held) {
            self.execute(e);
        }
        (site, conn_id, capabilities)
    }

    /// The connection `conn_id` of `site` ended: `true` if it was the
    /// site's current one.
    pub(crate) fn disconnect(&mut self, site: &SiteId, conn_id: ConnId) -> bool {
        self.io.remove(&conn_id);
        self.sites.disconnect(site, conn_id)
    }

    /// Close `conn_id` of `site` if it is still the site's current
    /// connection.
    pub(crate) fn close(&mut self, site: &SiteId, conn_id: ConnId, reason: CloseReason) {
        if let Some(e) = self.sites.close(site, conn_id, reason) {
            self.execute(e);
        }
    }

    /// Close every connection that is no longer allowed (revoked, removed
    /// or superseded certificate); returns the sites cut off.
    pub(crate) fn recheck(&mut self, shared: &Shared) -> Vec<(SiteId, ConnId)> {
        let io = &self.io;
        let (cut, effects) = self
            .sites
            .revoke_where(|_, conn_id| match io.get(&conn_id) {
                Some(c) => shared.check_open_peer(&c.conn),
                None => Ok(()),
            });
        for (site, _) in &cut {
            tracing::warn!(site = %site, "closing the connection of a site that is no longer allowed");
        }
        for e in effects {
            self.execute(e);
        }
        cut
    }

    /// Close every connection (shutdown).
    pub(crate) fn close_all(&mut self) {
        for e in self.sites.close_all(&CloseReason::Shutdown) {
            self.execute(e);
        }
        self.io.clear();
    }

    /// Sites connected now, sorted.
    pub(crate) fn connected(&self) -> Vec<SiteId> {
        self.sites.connected()
    }

    /// The inputs that give every held site to the job that starts now
    /// (see [`Sites::hand_over`]); each site that cannot take part is
    /// logged with the reason.
    pub(crate) fn hand_over(&mut self, needs: &JobNeeds) -> Vec<Input> {
        for (site, why) in self.sites.incompatible(needs) {
            tracing::warn!(site = %site, reason = %why, "site is not compatible with the job: it is not offered its rounds");
        }
        self.sites.hand_over(needs)
    }

    /// The protocol version negotiated on `site`'s current connection.
    pub(crate) fn protocol_version(&self, site: &SiteId) -> Option<u16> {
        self.sites.protocol_version(site)
    }

    /// Queue `msg` on `site`'s control stream. A site whose queue is full
    /// is not reading what it is sent: its connection is cut (it
    /// reconnects and starts afresh) rather than letting the queue grow.
    pub(crate) fn send(&self, site: &SiteId, msg: Message) {
        let Some(io) = self.sites.conn_of(site).and_then(|c| self.io.get(&c)) else {
            tracing::debug!(site = site.as_str(), "site not connected; message dropped");
            return;
        };
        match limits::deliver(&io.control, msg) {
            limits::Delivery::Queued => {}
            limits::Delivery::Gone => {
                tracing::debug!(site = site.as_str(), "site's control stream is gone")
            }
            limits::Delivery::Full(why) => {
                tracing::warn!(site = site.as_str(), reason = %why, "closing a site's connection");
                io.conn
                    .close(fedlink_transport::close::PROTOCOL, why.as_bytes());
            }
        }
    }

    /// Execute one of the core's effects.
    fn execute(&mut self, effect: Effect) {
        let Effect::Close { conn, reason } = effect else {
            tracing::error!(?effect, "not a connection effect; ignored");
            return;
        };
        let code = match reason {
            CloseReason::Replaced => fedlink_transport::close::REPLACED,
            CloseReason::Shutdown => fedlink_transport::close::SHUTDOWN,
            _ => fedlink_transport::close::FORBIDDEN,
        };
        if let Some(io) = self.io.remove(&conn) {
            io.conn.close(code, reason.text().as_bytes());
        }
    }
}
