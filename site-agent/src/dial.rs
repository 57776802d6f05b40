//! How the agent reaches the coordinator: QUIC, or TLS 1.3 over TCP —
//! directly or through an HTTP `CONNECT` proxy — and which one to try.
//!
//! ```text
//!  transport = "quic"  ─▶ QUIC (UDP)
//!  transport = "tcp"   ─▶ TCP [─▶ proxy CONNECT] ─▶ TLS 1.3 ─▶ yamux
//!  transport = "auto"  ─▶ QUIC first; TCP joins the race after
//!                         `quic_head_start_ms` (at once if QUIC fails);
//!                         the first mutually authenticated handshake wins.
//!                         A TCP win is remembered for `tcp_fallback_secs`
//!                         (no UDP probe meanwhile), then QUIC is tried again.
//! ```
//!
//! The choice is a small state machine ([`Selector`]) that takes `now` as
//! an argument, so tests drive it with a virtual clock; [`Dialer::dial`] runs what
//! it plans. Whichever transport carries it, the session is the same:
//! same certificates and checks, same ALPN, same frames and limits.
//!
//! Proxy: `proxy = "http://host:port"` in `site.toml`, with optional Basic
//! credentials (`user:password`, one line) in `proxy_credentials_file` —
//! never on the command line or in the URL. Without `proxy`, `HTTPS_PROXY`
//! (or `https_proxy`) applies unless `NO_PROXY` names the coordinator's
//! host. TLS runs end to end through the tunnel: the proxy relays
//! ciphertext, and a proxy that refuses gets an error naming its answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fedlink_transport::{Conn, TransportKind};
use quinn::Endpoint;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `transport` in `site.toml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC first, TLS over TCP when QUIC does not complete its handshake
    /// in time (the default).
    #[default]
    Auto,
    /// QUIC (UDP) only.
    Quic,
    /// TLS 1.3 over TCP only (through the proxy when one is set).
    Tcp,
}

/// What [`Selector::plan`] says to do for the next connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// QUIC only.
    Quic,
    /// TCP only, and why.
    Tcp {
        /// Why TCP (configured, or a remembered fallback).
        reason: String,
    },
    /// Race: QUIC now, TCP after `head_start` (or as soon as QUIC fails).
    Race {
        /// How long QUIC has alone.
        head_start: Duration,
    },
}

/// Chooses the transport of each connection attempt (sans-IO: `now` is an
/// argument).
#[derive(Clone, Debug)]
pub struct Selector {
    mode: TransportMode,
    head_start: Duration,
    remember: Duration,
    /// Until when TCP is used without probing QUIC, and since when.
    tcp_fallback: Option<(Instant, Instant)>,
}

impl Selector {
    /// A selector for `mode`; in `auto`, QUIC has `head_start` alone, and a
    /// TCP win is remembered for `remember`.
    pub fn new(mode: TransportMode, head_start: Duration, remember: Duration) -> Self {
        Self {
            mode,
            head_start,
            remember,
            tcp_fallback: None,
        }
    }

    /// What to do for an attempt starting at `now`.
    pub fn plan(&self, now: Instant) -> Plan {
        match self.mode {
            TransportMode::Quic => Plan::Quic,
            TransportMode::Tcp => Plan::Tcp {
                reason: "transport = \"tcp\" in site.toml".into(),
            },
            TransportMode::Auto => match self.tcp_fallback {
                Some((since, until)) if now < until => Plan::Tcp {
                    reason: format!(
                        "auto: QUIC did not connect {} s ago; TCP until QUIC is re-probed in {} s",
                        now.saturating_duration_since(since).as_secs(),
                        until.saturating_duration_since(now).as_secs()
                    ),
                },
                _ => Plan::Race {
                    head_start: self.head_start,
                },
            },
        }
    }

    /// A race run at `now` was won by `winner` (auto mode): a TCP win is
    /// remembered, a QUIC win forgets an earlier fallback.
    pub fn raced(&mut self, now: Instant, winner: TransportKind) {
        match winner {
            TransportKind::Tcp => self.tcp_fallback = Some((now, now + self.remember)),
            TransportKind::Quic => self.tcp_fallback = None,
        }
    }
}

/// An HTTP proxy for the TCP path.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// `user:password` for Basic authentication.
    credentials: Option<String>,
    /// Where it was configured (`site.toml`, `HTTPS_PROXY`).
    pub source: &'static str,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("source", &self.source)
            .finish()
    }
}

/// Why a proxy setting (its URL, its credentials file) is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// Not an `http://` URL.
    #[error("{url:?}: only http:// proxies are supported (the tunnel carries TLS 1.3 end to end)")]
    NotHttp {
        /// The URL given.
        url: String,
    },
    /// The URL carries `user:password@` (its password is not repeated).
    #[error(
        "{redacted}: credentials in the proxy URL are refused; put `user:password` in the file \
         named by proxy_credentials_file"
    )]
    CredentialsInUrl {
        /// The URL with its credentials replaced.
        redacted: String,
    },
    /// The URL has a path, a query or a fragment.
    #[error("{url:?}: expected http://host:port, with no path")]
    Path {
        /// The URL given.
        url: String,
    },
    /// The URL's `host:port` is not valid.
    #[error("{url:?}: {source}")]
    HostPort {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        source: crate::config::HostPortError,
    },
    /// The credentials file cannot be read.
    #[error("{}: {source}", path.display())]
    CredentialsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The credentials file is larger than 4 KiB.
    #[error("{}: larger than 4 KiB", path.display())]
    CredentialsTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Other users may read the credentials file.
    #[error(
        "{}: mode {mode:03o} lets other users read the proxy password; chmod 600 it",
        path.display()
    )]
    CredentialsMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The first line is not `user:password`.
    #[error("{}: expected `user:password` on the first line", path.display())]
    CredentialsFormat {
        /// The file.
        path: PathBuf,
    },
}

/// A proxy's answer to `CONNECT` that opens no tunnel
/// ([`check_connect_response`]); each carries the status line, made
/// printable and bounded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectRefused {
    /// Not an HTTP/1.x answer.
    #[error("the proxy did not answer in HTTP/1.x: {0:?}")]
    NotHttp(String),
    /// 407: the proxy wants credentials.
    #[error("the proxy requires authentication ({0:?}): set proxy_credentials_file")]
    AuthRequired(String),
    /// Any other non-2xx status.
    #[error("the proxy refused the tunnel: {0:?}")]
    Refused(String),
    /// No status code.
    #[error("the proxy sent no status code: {0:?}")]
    NoStatus(String),
}

/// Why the agent could not connect to the coordinator ([`Dialer::dial`],
/// [`http_connect`]); the text is the reason in the log and the site's
/// audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// No TCP connection to the proxy.
    #[error("connecting to the proxy {addr}: {source}")]
    ProxyConnect {
        /// The proxy's `host:port`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection to the proxy has no peer address.
    #[error("proxy {addr}: {source}")]
    ProxyPeer {
        /// The proxy's `host:port`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Sending `CONNECT` failed.
    #[error("proxy {addr}: sending CONNECT: {source}")]
    ProxySend {
        /// The proxy's `host:port`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The proxy's answer head is longer than the agent reads.
    #[error("proxy {addr}: answer to CONNECT longer than {MAX_PROXY_RESPONSE} bytes")]
    ProxyAnswerTooLong {
        /// The proxy's `host:port`.
        addr: String,
    },
    /// Reading the proxy's answer failed.
    #[error("proxy {addr}: reading its answer to CONNECT: {source}")]
    ProxyRead {
        /// The proxy's `host:port`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The proxy answered, but opened no tunnel.
    #[error("proxy {addr}: {source}")]
    ProxyRefused {
        /// The proxy's `host:port`.
        addr: String,
        /// Its answer.
        source: ConnectRefused,
    },
    /// No tunnel within the connect timeout.
    #[error("proxy {addr}: no tunnel within {timeout:?}")]
    ProxyTimeout {
        /// The proxy's `host:port`.
        addr: String,
        /// The bound.
        timeout: Duration,
    },
    /// TLS through the proxy's tunnel failed.
    #[error("through proxy {addr}: {source}")]
    OverProxy {
        /// The proxy's `host:port`.
        addr: String,
        /// Why.
        source: fedlink_transport::TransportError,
    },
    /// TLS over a direct TCP connection failed.
    #[error(transparent)]
    Tcp(fedlink_transport::TransportError),
    /// The QUIC client endpoint could not be made.
    #[error("QUIC: client endpoint: {0}")]
    QuicEndpoint(#[source] fedlink_transport::TransportError),
    /// The QUIC connection could not be started.
    #[error("QUIC to {remote}: {source}")]
    QuicConnect {
        /// The coordinator's address.
        remote: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The QUIC handshake failed.
    #[error("QUIC to {remote}: {source}")]
    QuicHandshake {
        /// The coordinator's address.
        remote: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// Both transports of a race failed.
    #[error("{quic}; and {tcp}")]
    Both {
        /// Why QUIC failed.
        quic: Box<Self>,
        /// Why TLS over TCP failed.
        tcp: Box<Self>,
    },
}

impl Proxy {
    /// Parse `http://host:port` (a trailing `/` allowed). No `https://`
    /// proxies (TLS to the proxy itself), and no credentials in the URL.
    pub fn parse(url: &str, source: &'static str) -> Result<Self, ProxyError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| ProxyError::NotHttp {
                url: url.to_owned(),
            })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(ProxyError::CredentialsInUrl {
                redacted: redact(url),
            });
        }
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(ProxyError::Path {
                url: url.to_owned(),
            });
        }
        crate::config::check_host_port(rest).map_err(|source| ProxyError::HostPort {
            url: url.to_owned(),
            source,
        })?;
        Ok(Self {
            addr: rest.to_owned(),
            credentials: None,
            source,
        })
    }

    /// Read Basic credentials (`user:password` on the first line) from
    /// `path`. The file must not be readable by group or others.
    pub fn with_credentials_file(mut self, path: &Path) -> Result<Self, ProxyError> {
        let io = |source| ProxyError::CredentialsFile {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > 4096 {
            return Err(ProxyError::CredentialsTooLarge {
                path: path.to_owned(),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ProxyError::CredentialsMode {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if !line.contains(':') || line.starts_with(':') {
            return Err(ProxyError::CredentialsFormat {
                path: path.to_owned(),
            });
        }
        self.credentials = Some(line.to_owned());
        Ok(self)
    }

    /// Whether Basic credentials are set.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}<credentials>{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// The proxy from the environment for a connection to `host`: `HTTPS_PROXY`
/// (or `https_proxy`), unless `NO_PROXY` (or `no_proxy`) names the host.
/// `env` reads a variable (the process environment in the agent; a map in
/// tests).
pub fn proxy_from_env(
    host: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, ProxyError> {
    let get =
        |upper: &str, lower: &str| env(upper).or_else(|| env(lower)).filter(|v| !v.is_empty());
    let Some(url) = get("HTTPS_PROXY", "https_proxy") else {
        return Ok(None);
    };
    if let Some(list) = get("NO_PROXY", "no_proxy")
        && no_proxy_matches(&list, host)
    {
        return Ok(None);
    }
    Proxy::parse(&url, "HTTPS_PROXY").map(Some)
}

/// Whether a `NO_PROXY` list (comma separated: `*`, host names, `.domain`
/// suffixes, IP addresses; an optional `:port` is ignored) covers `host`.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let entry = entry.to_ascii_lowercase();
            // `host:port` entries: compare the host part (IPv6 in brackets).
            let entry = match entry.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or("").to_owned(),
                None => match entry.rsplit_once(':') {
                    Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => {
                        h.to_owned()
                    }
                    _ => entry,
                },
            };
            let bare = entry.trim_start_matches('.');
            host == bare || host.ends_with(&format!(".{bare}"))
        })
}

/// Largest HTTP response head read from a proxy.
const MAX_PROXY_RESPONSE: usize = 8 * 1024;

/// Check a proxy's answer to `CONNECT` (its head, up to the blank line):
/// `2xx` opens the tunnel; anything else is an error quoting the status
/// line (made printable and bounded — it comes from the network).
pub fn check_connect_response(head: &[u8]) -> Result<(), ConnectRefused> {
    let text = String::from_utf8_lossy(head);
    let status_line = text.lines().next().unwrap_or("");
    let shown: String = status_line
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(200)
        .collect();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let code = parts.next().and_then(|c| c.parse::<u16>().ok());
    if !version.starts_with("HTTP/1.") {
        return Err(ConnectRefused::NotHttp(shown));
    }
    match code {
        Some(200..=299) => Ok(()),
        Some(407) => Err(ConnectRefused::AuthRequired(shown)),
        Some(_) => Err(ConnectRefused::Refused(shown)),
        None => Err(ConnectRefused::NoStatus(shown)),
    }
}

/// Open a tunnel to `target` (`host:port`) through `proxy` with HTTP
/// `CONNECT`, within `timeout`. Returns the stream (positioned after the
/// proxy's answer) and the proxy's address.
pub async fn http_connect(
    proxy: &Proxy,
    target: &str,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let addr = || proxy.addr.clone();
    let work = async {
        let mut stream =
            TcpStream::connect(&proxy.addr)
                .await
                .map_err(|source| DialError::ProxyConnect {
                    addr: addr(),
                    source,
                })?;
        let peer = stream.peer_addr().map_err(|source| DialError::ProxyPeer {
            addr: addr(),
            source,
        })?;
        let mut request =
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: fedlink-agent\r\n");
        if let Some(c) = &proxy.credentials {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_bytes());
            request.push_str(&format!("Proxy-Authorization: Basic {b64}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|source| DialError::ProxySend {
                addr: addr(),
                source,
            })?;
        // Read the answer's head byte by byte up to the blank line, so that
        // nothing of the TLS stream behind it is consumed.
        let mut head = Vec::with_capacity(256);
        loop {
            if head.len() >= MAX_PROXY_RESPONSE {
                return Err(DialError::ProxyAnswerTooLong { addr: addr() });
            }
            let b = stream
                .read_u8()
                .await
                .map_err(|source| DialError::ProxyRead {
                    addr: addr(),
                    source,
                })?;
            head.push(b);
            if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
                break;
            }
        }
        check_connect_response(&head).map_err(|source| DialError::ProxyRefused {
            addr: addr(),
            source,
        })?;
        Ok((stream, peer))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DialError::ProxyTimeout {
            addr: addr(),
            timeout,
        })?
}

/// How a connection was made: which transport, through which proxy, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The transport.
    pub kind: TransportKind,
    /// The proxy (`host:port`) when the TCP path went through one.
    pub proxy: Option<String>,
    /// Why this transport (for the log and the audit log).
    pub reason: String,
}

/// What [`Dialer::dial`] needs.
pub struct Dialer<'a> {
    /// The coordinator's `host:port` as configured (sent to a proxy).
    pub target: &'a str,
    /// Its resolved address (QUIC, and TCP without a proxy).
    pub remote: SocketAddr,
    /// TLS server name.
    pub server_name: &'a str,
    /// The client TLS config (ALPN already set).
    pub tls: &'a rustls::ClientConfig,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// QUIC congestion controller of the uploads.
    pub congestion: fedlink_transport::Congestion,
    /// Bound for each TCP/TLS step.
    pub timeout: Duration,
    /// The proxy for the TCP path, if any.
    pub proxy: Option<&'a Proxy>,
}

/// A mutually authenticated connection, and its QUIC endpoint when it is
/// QUIC (kept so that the agent can wait for it to drain).
pub struct Dialed {
    /// The connection.
    pub conn: Conn,
    /// The QUIC endpoint.
    pub endpoint: Option<Endpoint>,
    /// How.
    pub route: Route,
}

impl Dialer<'_> {
    async fn quic(&self) -> Result<(Conn, Endpoint), DialError> {
        let remote = self.remote;
        let endpoint = fedlink_transport::client_endpoint_with(
            self.remote,
            self.tls.clone(),
            self.idle_timeout,
            self.congestion,
        )
        .map_err(DialError::QuicEndpoint)?;
        let conn = endpoint
            .connect(self.remote, self.server_name)
            .map_err(|source| DialError::QuicConnect { remote, source })?
            .await
            .map_err(|source| DialError::QuicHandshake { remote, source })?;
        Ok((Conn::from(conn), endpoint))
    }

    async fn tcp(&self) -> Result<Conn, DialError> {
        let tls = Arc::new(self.tls.clone());
        let conn = match self.proxy {
            Some(p) => {
                let (stream, peer) = http_connect(p, self.target, self.timeout).await?;
                fedlink_transport::tcp::connect_over(
                    stream,
                    peer,
                    tls,
                    self.server_name,
                    self.timeout,
                )
                .await
                .map_err(|source| DialError::OverProxy {
                    addr: p.addr.clone(),
                    source,
                })?
            }
            None => {
                fedlink_transport::tcp::connect(self.remote, tls, self.server_name, self.timeout)
                    .await
                    .map_err(DialError::Tcp)?
            }
        };
        Ok(Conn::from(conn))
    }

    fn tcp_route(&self, reason: String) -> Route {
        Route {
            kind: TransportKind::Tcp,
            proxy: self.proxy.map(|p| p.addr.clone()),
            reason,
        }
    }

    /// Connect as `plan` says. The error names what each transport tried
    /// answered.
    pub async fn dial(&self, plan: &Plan) -> Result<Dialed, DialError> {
        match plan {
            Plan::Quic => {
                let (conn, endpoint) = self.quic().await?;
                Ok(Dialed {
                    conn,
                    endpoint: Some(endpoint),
                    route: Route {
                        kind: TransportKind::Quic,
                        proxy: None,
                        reason: "transport = \"quic\" in site.toml".into(),
                    },
                })
            }
            Plan::Tcp { reason } => Ok(Dialed {
                conn: self.tcp().await?,
                endpoint: None,
                route: self.tcp_route(reason.clone()),
            }),
            Plan::Race { head_start } => self.race(*head_start).await,
        }
    }

    async fn race(&self, head_start: Duration) -> Result<Dialed, DialError> {
        let quic = self.quic();
        let tcp = self.tcp();
        let head = tokio::time::sleep(head_start);
        tokio::pin!(quic, tcp, head);
        let mut quic_failed: Option<DialError> = None;
        let mut tcp_failed: Option<DialError> = None;
        let mut tcp_running = false;
        loop {
            tokio::select! {
                r = &mut quic, if quic_failed.is_none() => match r {
                    Ok((conn, endpoint)) => return Ok(Dialed {
                        conn,
                        endpoint: Some(endpoint),
                        route: Route {
                            kind: TransportKind::Quic,
                            proxy: None,
                            reason: "auto: QUIC connected".into(),
                        },
                    }),
                    Err(e) => {
                        if let Some(t) = tcp_failed {
                            return Err(DialError::Both { quic: Box::new(e), tcp: Box::new(t) });
                        }
                        quic_failed = Some(e);
                        tcp_running = true;
                    }
                },
                () = &mut head, if !tcp_running => tcp_running = true,
                r = &mut tcp, if tcp_running && tcp_failed.is_none() => match r {
                    Ok(conn) => {
                        let why = match &quic_failed {
                            Some(e) => format!("auto: QUIC failed ({e}); TLS over TCP connected"),
                            None => format!(
                                "auto: no QUIC handshake within {} ms (UDP blocked?); TLS over TCP connected",
                                head_start.as_millis()
                            ),
                        };
                        return Ok(Dialed { conn, endpoint: None, route: self.tcp_route(why) });
                    }
                    Err(e) => {
                        if let Some(q) = quic_failed {
                            return Err(DialError::Both { quic: Box::new(q), tcp: Box::new(e) });
                        }
                        tcp_failed = Some(e);
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_races_then_remembers_a_tcp_win_and_reprobes_later() {
        let t0 = Instant::now();
        let mut s = Selector::new(
            TransportMode::Auto,
            Duration::from_millis(1500),
            Duration::from_secs(600),
        );
        assert_eq!(
            s.plan(t0),
            Plan::Race {
                head_start: Duration::from_millis(1500)
            }
        );
        s.raced(t0, TransportKind::Tcp);
        let later = t0 + Duration::from_secs(60);
        match s.plan(later) {
            Plan::Tcp { reason } => assert!(reason.contains("re-probed in 540 s"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // After the remembered period: race again.
        assert!(matches!(
            s.plan(t0 + Duration::from_secs(600)),
            Plan::Race { .. }
        ));
        // A QUIC win forgets the fallback at once.
        s.raced(t0 + Duration::from_secs(600), TransportKind::Tcp);
        s.raced(t0 + Duration::from_secs(601), TransportKind::Quic);
        assert!(matches!(
            s.plan(t0 + Duration::from_secs(602)),
            Plan::Race { .. }
        ));
    }

    #[test]
    fn fixed_modes_ignore_the_race_history() {
        let t0 = Instant::now();
        let mut q = Selector::new(TransportMode::Quic, Duration::ZERO, Duration::from_secs(1));
        q.raced(t0, TransportKind::Tcp);
        assert_eq!(q.plan(t0), Plan::Quic);
        let t = Selector::new(TransportMode::Tcp, Duration::ZERO, Duration::from_secs(1));
        assert!(matches!(t.plan(t0), Plan::Tcp { .. }));
    }

    #[test]
    fn proxy_urls_are_checked() {
        let p = Proxy::parse("http://proxy.hospital.local:3128/", "site.toml").unwrap();
        assert_eq!(p.addr, "proxy.hospital.local:3128");
        assert!(!p.has_credentials());
        let e = Proxy::parse("https://proxy:3128", "site.toml").unwrap_err();
        assert!(matches!(e, ProxyError::NotHttp { .. }), "{e:?}");
        assert!(e.to_string().contains("only http://"), "{e}");
        let e = Proxy::parse("http://bob:secret@proxy:3128", "site.toml").unwrap_err();
        assert!(matches!(e, ProxyError::CredentialsInUrl { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("credentials in the proxy URL"), "{e}");
        assert!(
            !e.contains("secret"),
            "the password must not be echoed: {e}"
        );
        assert!(matches!(
            Proxy::parse("http://proxy", "site.toml"),
            Err(ProxyError::HostPort {
                source: crate::config::HostPortError::NoPort(_),
                ..
            })
        ));
        assert!(matches!(
            Proxy::parse("http://proxy:3128/path", "site.toml"),
            Err(ProxyError::Path { .. })
        ));
    }

    #[test]
    fn no_proxy_lists_match_hosts_domains_and_ips() {
        assert!(no_proxy_matches("*", "coord.example.org"));
        assert!(no_proxy_matches(
            "localhost, .example.org",
            "coord.example.org"
        ));
        assert!(no_proxy_matches("example.org", "coord.example.org"));
        assert!(no_proxy_matches("example.org", "example.org"));
        assert!(!no_proxy_matches("example.org", "badexample.org"));
        assert!(no_proxy_matches("10.0.0.5:4433", "10.0.0.5"));
        assert!(no_proxy_matches("[::1]", "::1"));
        assert!(!no_proxy_matches("", "coord"));
        assert!(!no_proxy_matches("other.org", "coord.example.org"));
    }

    #[test]
    fn the_environment_proxy_honours_no_proxy() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        let p = proxy_from_env(
            "coord.example.org",
            env(&[("https_proxy", "http://p:8080")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.addr, "p:8080");
        assert_eq!(p.source, "HTTPS_PROXY");
        assert!(
            proxy_from_env(
                "coord.example.org",
                env(&[
                    ("HTTPS_PROXY", "http://p:8080"),
                    ("NO_PROXY", ".example.org")
                ])
            )
            .unwrap()
            .is_none()
        );
        assert!(proxy_from_env("coord", env(&[])).unwrap().is_none());
        assert!(proxy_from_env("coord", env(&[("HTTPS_PROXY", "socks5://p:1")])).is_err());
    }

    #[test]
    fn connect_answers_are_judged_by_status_code() {
        assert!(check_connect_response(b"HTTP/1.1 200 Connection established\r\n\r\n").is_ok());
        assert!(check_connect_response(b"HTTP/1.0 200 OK\r\n\r\n").is_ok());
        let e = check_connect_response(b"HTTP/1.1 403 Forbidden\r\nX: y\r\n\r\n").unwrap_err();
        assert_eq!(e, ConnectRefused::Refused("HTTP/1.1 403 Forbidden".into()));
        let e = e.to_string();
        assert!(
            e.contains("refused the tunnel") && e.contains("403 Forbidden"),
            "{e}"
        );
        let e = check_connect_response(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            .unwrap_err();
        assert!(matches!(e, ConnectRefused::AuthRequired(_)), "{e:?}");
        assert!(e.to_string().contains("proxy_credentials_file"), "{e}");
        let e = check_connect_response(b"SSH-2.0-OpenSSH\r\n\r\n").unwrap_err();
        assert!(matches!(e, ConnectRefused::NotHttp(_)), "{e:?}");
        assert!(e.to_string().contains("HTTP/1.x"), "{e}");
        // Control characters from the network are not echoed raw.
        let e = check_connect_response(b"HTTP/1.1 502 \x1b[31mBad\r\n\r\n").unwrap_err();
        assert!(!e.to_string().contains('\x1b'), "{e}");
    }

    #[test]
    fn credentials_files_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy-credentials");
        std::fs::write(&path, "alice:s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = Proxy::parse("http://p:3128", "site.toml").unwrap();
        let e = p.clone().with_credentials_file(&path).unwrap_err();
        assert!(
            matches!(e, ProxyError::CredentialsMode { mode: 0o644, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = p.clone().with_credentials_file(&path).unwrap();
        assert!(with.has_credentials());
        assert!(!format!("{with:?}").contains("s3cret"));
        std::fs::write(&path, "no-colon\n").unwrap();
        assert!(matches!(
            p.with_credentials_file(&path),
            Err(ProxyError::CredentialsFormat { .. })
        ));
    }
}
