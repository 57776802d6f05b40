//! A small HTTP `CONNECT` proxy, as hospital networks run them (squid and
//! the like), for tests and benches of the agent's TCP path: it answers
//! `CONNECT host:port`, optionally demands Basic credentials (`407`),
//! refuses targets not on its allow list (`403`), then relays bytes both
//! ways without looking at them — the TLS session inside is end to end.
//!
//! It counts what it did ([`ConnectStats`]) so a test can check that a
//! connection really went through it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy accepts.
#[derive(Clone, Debug, Default)]
pub struct ConnectProxyConfig {
    /// `user:password` that requests must present (Basic); none: open.
    pub credentials: Option<String>,
    /// Targets (`host:port` as written in the request) it tunnels to; none:
    /// any.
    pub allow: Option<Vec<String>>,
}

/// What the proxy did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectStats {
    /// Tunnels opened (`200`).
    pub tunnels: u64,
    /// Requests refused for missing or wrong credentials (`407`).
    pub auth_refused: u64,
    /// Requests refused by the allow list (`403`) or malformed (`400`).
    pub refused: u64,
    /// Targets of the opened tunnels, in order.
    pub targets: Vec<String>,
    /// Bytes relayed in both directions through closed tunnels.
    pub bytes: u64,
}

/// A running `CONNECT` proxy on `127.0.0.1:<port>`; stops when dropped.
#[derive(Debug)]
pub struct ConnectProxy {
    addr: SocketAddr,
    stats: Arc<Mutex<ConnectStats>>,
    task: JoinHandle<()>,
}

impl ConnectProxy {
    /// Start on `listen` (port 0 for any).
    pub async fn start(listen: SocketAddr, cfg: ConnectProxyConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Mutex::new(ConnectStats::default()));
        let cfg = Arc::new(cfg);
        let task = {
            let stats = stats.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(serve(client, cfg.clone(), stats.clone()));
                }
            })
        };
        Ok(Self { addr, stats, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of what it did.
    pub fn stats(&self) -> ConnectStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;

fn count(stats: &Mutex<ConnectStats>, f: impl FnOnce(&mut ConnectStats)) {
    if let Ok(mut s) = stats.lock() {
        f(&mut s);
    }
}

async fn serve(
    mut client: TcpStream,
    cfg: Arc<ConnectProxyConfig>,
    stats: Arc<Mutex<ConnectStats>>,
) {
    let mut head = Vec::with_capacity(512);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return;
        }
        match client.read_u8().await {
            Ok(b) => head.push(b),
            Err(_) => return,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or("");
    let mut parts = request.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        count(&stats, |s| s.refused += 1);
        let _ = client
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    let target = target.to_owned();
    if let Some(creds) = &cfg.credentials {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds.as_bytes())
        );
        let given = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("proxy-authorization"))
            .map(|(_, v)| v.trim().to_owned());
        if given.as_deref() != Some(want.as_str()) {
            count(&stats, |s| s.auth_refused += 1);
            let _ = client
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
            return;
        }
    }
    if let Some(allow) = &cfg.allow
        && !allow.iter().any(|a| a == &target)
    {
        count(&stats, |s| s.refused += 1);
        let _ = client
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(&target).await else {
        count(&stats, |s| s.refused += 1);
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    count(&stats, |s| {
        s.tunnels += 1;
        s.targets.push(target);
    });
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if let Ok((a, b)) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        count(&stats, |s| s.bytes += a + b);
    }
}
