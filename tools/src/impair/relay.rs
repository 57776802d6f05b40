//! The tokio relays that apply [`Link`]s to real sockets.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::{DropReason, Impairment, Link, Verdict};

/// Why the proxy could not start or a setting was refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ImpairError {
    /// A setting is out of range.
    #[error("impairment setting: {0}")]
    Config(String),
    /// Binding a socket failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Most UDP flows (distinct client addresses) relayed at once; datagrams of
/// further new clients are dropped.
const MAX_FLOWS: usize = 4096;
/// Most datagrams waiting in one direction of one flow.
const MAX_QUEUED_DATAGRAMS: usize = 65_536;
/// TCP relay read size, bytes.
const TCP_CHUNK: usize = 16 * 1024;
/// Most TCP chunks waiting in one direction of one connection (4 MiB): more
/// than the bandwidth-delay product of the links benches emulate.
const MAX_QUEUED_CHUNKS: usize = 256;

/// Where and how to relay.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address to listen on (UDP and TCP on the same port; port 0 picks a
    /// free one).
    pub listen: SocketAddr,
    /// Where to relay to.
    pub target: SocketAddr,
    /// Relay UDP datagrams.
    pub udp: bool,
    /// Relay TCP connections.
    pub tcp: bool,
    /// Client → target.
    pub up: Impairment,
    /// Target → client.
    pub down: Impairment,
    /// Seed of every random choice.
    pub seed: u64,
}

impl ProxyConfig {
    /// A perfect UDP and TCP relay to `target` on a free loopback port.
    pub fn new(target: SocketAddr) -> Self {
        let listen = if target.is_ipv6() {
            SocketAddr::from((Ipv6Addr::LOCALHOST, 0))
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
        };
        Self {
            listen,
            target,
            udp: true,
            tcp: true,
            up: Impairment::default(),
            down: Impairment::default(),
            seed: 0,
        }
    }

    /// The same impairment both ways.
    pub fn both_ways(mut self, imp: Impairment) -> Self {
        self.up = imp.clone();
        self.down = imp;
        self
    }
}

/// Counters of what the proxy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams sent on (either way).
    pub udp_forwarded: u64,
    /// Datagrams lost on purpose (random loss, full queue).
    pub udp_dropped: u64,
    /// Datagrams dropped by "drop all UDP" or a cut.
    pub udp_blocked: u64,
    /// TCP connections accepted.
    pub tcp_connections: u64,
    /// TCP bytes relayed (either way).
    pub tcp_bytes: u64,
    /// Cuts made.
    pub cuts: u64,
}

#[derive(Debug, Default)]
struct Counters {
    udp_forwarded: AtomicU64,
    udp_dropped: AtomicU64,
    udp_blocked: AtomicU64,
    tcp_connections: AtomicU64,
    tcp_bytes: AtomicU64,
    cuts: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared {
    /// (up, down).
    impairment: Mutex<(Impairment, Impairment)>,
    drop_udp: AtomicBool,
    cut: watch::Sender<u64>,
    /// Datagrams received from clients and given their fate so far.
    udp_in: watch::Sender<u64>,
    counters: Counters,
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    Up,
    Down,
}

impl Shared {
    fn impairment(&self, dir: Dir) -> Impairment {
        let both = self
            .impairment
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match dir {
            Dir::Up => both.0.clone(),
            Dir::Down => both.1.clone(),
        }
    }
}

/// Controls of a running [`ImpairProxy`] (cheap to clone).
#[derive(Debug, Clone)]
pub struct ImpairHandle(Arc<Shared>);

impl ImpairHandle {
    /// Change the impairment of both directions, from the next packet on.
    pub fn set_impairment(&self, up: Impairment, down: Impairment) -> Result<(), ImpairError> {
        up.validate()?;
        down.validate()?;
        *self
            .0
            .impairment
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (up, down);
        Ok(())
    }

    /// Drop every UDP datagram, both ways (a firewall that blocks UDP), or
    /// stop doing so.
    pub fn drop_all_udp(&self, on: bool) {
        self.0.drop_udp.store(on, Ordering::Relaxed);
    }

    /// Cut every relayed connection now: open TCP connections are closed;
    /// the UDP flows seen so far are black-holed for good (their QUIC
    /// connections time out), while new client ports get through.
    pub fn cut(&self) {
        bump(&self.0.counters.cuts, 1);
        self.0.cut.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Wait until the proxy has received `n` datagrams from clients in all
    /// and decided each one's fate (settings apply to a datagram when the
    /// proxy reads it, not when it was sent: a test that changes settings
    /// between datagrams waits here first).
    pub async fn udp_received(&self, n: u64) {
        let mut rx = self.0.udp_in.subscribe();
        // The sender lives as long as this handle: this cannot fail.
        let _ = rx.wait_for(|seen| *seen >= n).await;
    }

    /// What the proxy has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.0.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            udp_forwarded: get(&c.udp_forwarded),
            udp_dropped: get(&c.udp_dropped),
            udp_blocked: get(&c.udp_blocked),
            tcp_connections: get(&c.tcp_connections),
            tcp_bytes: get(&c.tcp_bytes),
            cuts: get(&c.cuts),
        }
    }
}

/// Aborts its task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running impairment proxy; dropping it stops every relay.
#[derive(Debug)]
pub struct ImpairProxy {
    addr: SocketAddr,
    handle: ImpairHandle,
    _tasks: Vec<AbortOnDrop>,
}

impl ImpairProxy {
    /// Bind and start relaying. With both UDP and TCP on, both listen on the
    /// same port number.
    pub async fn start(cfg: ProxyConfig) -> Result<Self, ImpairError> {
        cfg.up.validate()?;
        cfg.down.validate()?;
        if !cfg.udp && !cfg.tcp {
            return Err(ImpairError::Config("relay UDP, TCP or both".into()));
        }
        let (tcp, udp) = bind_pair(cfg.listen, cfg.tcp, cfg.udp).await?;
        let addr = match (&tcp, &udp) {
            (Some(t), _) => t.local_addr(),
            (None, Some(u)) => u.local_addr(),
            (None, None) => return Err(ImpairError::Config("nothing bound".into())),
        }
        .map_err(|source| ImpairError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            impairment: Mutex::new((cfg.up.clone(), cfg.down.clone())),
            drop_udp: AtomicBool::new(false),
            cut: watch::channel(0).0,
            udp_in: watch::channel(0).0,
            counters: Counters::default(),
        });
        let mut tasks = Vec::new();
        if let Some(listener) = tcp {
            tasks.push(AbortOnDrop(tokio::spawn(tcp_main(
                listener,
                cfg.target,
                shared.clone(),
                cfg.seed,
            ))));
        }
        if let Some(sock) = udp {
            tasks.push(AbortOnDrop(tokio::spawn(udp_main(
                Arc::new(sock),
                cfg.target,
                shared.clone(),
                cfg.seed,
            ))));
        }
        Ok(Self {
            addr,
            handle: ImpairHandle(shared),
            _tasks: tasks,
        })
    }

    /// The address clients connect to (UDP and/or TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its controls.
    pub fn handle(&self) -> ImpairHandle {
        self.handle.clone()
    }
}

/// Bind TCP and UDP on one port number (retrying when port 0 picked a TCP
/// port whose UDP twin is taken).
async fn bind_pair(
    listen: SocketAddr,
    tcp: bool,
    udp: bool,
) -> Result<(Option<TcpListener>, Option<UdpSocket>), ImpairError> {
    let bind_err = |addr| move |source| ImpairError::Bind { addr, source };
    let mut last = None;
    for _ in 0..20 {
        let t = if tcp {
            Some(TcpListener::bind(listen).await.map_err(bind_err(listen))?)
        } else {
            None
        };
        let port = match &t {
            Some(t) => t.local_addr().map_err(bind_err(listen))?.port(),
            None => listen.port(),
        };
        if !udp {
            return Ok((t, None));
        }
        let uaddr = SocketAddr::new(listen.ip(), port);
        match UdpSocket::bind(uaddr).await {
            Ok(u) => return Ok((t, Some(u))),
            Err(e) if listen.port() == 0 && t.is_some() => last = Some(e),
            Err(e) => return Err(bind_err(uaddr)(e)),
        }
    }
    Err(ImpairError::Bind {
        addr: listen,
        source: last.unwrap_or_else(|| std::io::Error::other("no free port pair")),
    })
}

fn unspecified_like(target: SocketAddr) -> SocketAddr {
    if target.is_ipv6() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    }
}

fn sleep_until(at: Instant) -> tokio::time::Sleep {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at))
}

/// A datagram waiting for its delivery time.
#[derive(Debug, PartialEq, Eq)]
struct Scheduled {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest first out of a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Where a flow direction sends its datagrams.
#[derive(Debug)]
enum UdpOut {
    /// The flow's own socket, connected to the target.
    Connected(Arc<UdpSocket>),
    /// The listening socket, to the client.
    To(Arc<UdpSocket>, SocketAddr),
}

/// Send datagrams at their delivery times.
async fn deliver_datagrams(mut rx: mpsc::Receiver<Scheduled>, out: UdpOut, shared: Arc<Shared>) {
    let mut heap = BinaryHeap::new();
    let mut open = true;
    loop {
        let next = heap.peek().map(|s: &Scheduled| s.at);
        if !open && next.is_none() {
            return;
        }
        tokio::select! {
            m = rx.recv(), if open => match m {
                Some(s) => heap.push(s),
                None => open = false,
            },
            () = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|s: &Scheduled| s.at <= now) {
                    let Some(s) = heap.pop() else { break };
                    if shared.drop_udp.load(Ordering::Relaxed) {
                        bump(&shared.counters.udp_blocked, 1);
                        continue;
                    }
                    let sent = match &out {
                        UdpOut::Connected(sock) => sock.send(&s.data).await,
                        UdpOut::To(sock, to) => sock.send_to(&s.data, *to).await,
                    };
                    match sent {
                        Ok(_) => bump(&shared.counters.udp_forwarded, 1),
                        Err(_) => bump(&shared.counters.udp_dropped, 1),
                    }
                }
            }
        }
    }
}

/// Decide a datagram's fate and queue it.
fn schedule(
    link: &mut Link,
    shared: &Shared,
    dir: Dir,
    tx: &mpsc::Sender<Scheduled>,
    seq: &mut u64,
    data: &[u8],
) {
    if shared.drop_udp.load(Ordering::Relaxed) {
        bump(&shared.counters.udp_blocked, 1);
        return;
    }
    let cfg = shared.impairment(dir);
    match link.on_packet(&cfg, Instant::now(), data.len()) {
        Verdict::Deliver(at) => {
            *seq += 1;
            let s = Scheduled {
                at,
                seq: *seq,
                data: data.to_vec(),
            };
            if tx.try_send(s).is_err() {
                bump(&shared.counters.udp_dropped, 1);
            }
        }
        Verdict::Drop(DropReason::Loss | DropReason::QueueFull) => {
            bump(&shared.counters.udp_dropped, 1);
        }
    }
}

/// One client address's relay state.
#[derive(Debug)]
struct Flow {
    up: Link,
    up_seq: u64,
    up_tx: mpsc::Sender<Scheduled>,
    _tasks: [AbortOnDrop; 2],
}

async fn open_flow(
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
    shared: &Arc<Shared>,
    seed: u64,
) -> std::io::Result<Flow> {
    let upstream = UdpSocket::bind(unspecified_like(target)).await?;
    upstream.connect(target).await?;
    let upstream = Arc::new(upstream);
    let (up_tx, up_rx) = mpsc::channel(MAX_QUEUED_DATAGRAMS);
    let up_task = tokio::spawn(deliver_datagrams(
        up_rx,
        UdpOut::Connected(upstream.clone()),
        shared.clone(),
    ));
    let (down_tx, down_rx) = mpsc::channel(MAX_QUEUED_DATAGRAMS);
    let down_sender = tokio::spawn(deliver_datagrams(
        down_rx,
        UdpOut::To(listen.clone(), client),
        shared.clone(),
    ));
    let down_shared = shared.clone();
    let down_task = tokio::spawn(async move {
        // The sender task dies with the reader.
        let _sender = AbortOnDrop(down_sender);
        let mut link = Link::datagrams(seed.wrapping_add(1));
        let mut seq = 0;
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok(n) = upstream.recv(&mut buf).await else {
                // ICMP port unreachable and the like: the target may come
                // back; keep the flow.
                continue;
            };
            let data = buf.get(..n).unwrap_or_default();
            schedule(&mut link, &down_shared, Dir::Down, &down_tx, &mut seq, data);
        }
    });
    Ok(Flow {
        up: Link::datagrams(seed),
        up_seq: 0,
        up_tx,
        _tasks: [AbortOnDrop(up_task), AbortOnDrop(down_task)],
    })
}

async fn udp_main(sock: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shared>, seed: u64) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut blackholed: HashSet<SocketAddr> = HashSet::new();
    let mut cut = shared.cut.subscribe();
    let mut buf = vec![0u8; 65_536];
    let mut flow_no: u64 = 0;
    loop {
        tokio::select! {
            // A cut applies to every datagram read after it was made.
            biased;
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                blackholed.extend(flows.drain().map(|(a, _)| a));
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let data = buf.get(..n).unwrap_or_default();
                if blackholed.contains(&from) {
                    bump(&shared.counters.udp_blocked, 1);
                    shared.udp_in.send_modify(|n| *n += 1);
                    continue;
                }
                if !flows.contains_key(&from) {
                    if flows.len() >= MAX_FLOWS {
                        bump(&shared.counters.udp_dropped, 1);
                        shared.udp_in.send_modify(|n| *n += 1);
                        continue;
                    }
                    flow_no += 1;
                    // Each flow's directions get their own stream of choices.
                    let flow_seed = seed.wrapping_add(flow_no.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    match open_flow(&sock, from, target, &shared, flow_seed).await {
                        Ok(f) => {
                            flows.insert(from, f);
                        }
                        Err(_) => {
                            bump(&shared.counters.udp_dropped, 1);
                            shared.udp_in.send_modify(|n| *n += 1);
                            continue;
                        }
                    }
                }
                if let Some(f) = flows.get_mut(&from) {
                    schedule(&mut f.up, &shared, Dir::Up, &f.up_tx, &mut f.up_seq, data);
                }
                shared.udp_in.send_modify(|n| *n += 1);
            }
        }
    }
}

async fn tcp_main(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>, seed: u64) {
    let mut conns = JoinSet::new();
    let mut cut = shared.cut.subscribe();
    let mut conn_no: u64 = 0;
    loop {
        tokio::select! {
            biased;
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                conns.abort_all();
            }
            a = listener.accept() => {
                let Ok((client, _)) = a else { continue };
                conn_no += 1;
                bump(&shared.counters.tcp_connections, 1);
                let conn_seed = seed.wrapping_add(conn_no.wrapping_mul(0xD1B5_4A32_D192_ED03));
                conns.spawn(relay_tcp(client, target, shared.clone(), conn_seed));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay_tcp(client: TcpStream, target: SocketAddr, shared: Arc<Shared>, seed: u64) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    // Small frames must not wait for Nagle on top of the emulated delay.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(
        pump(cr, sw, Link::stream(seed), &shared, Dir::Up),
        pump(
            sr,
            cw,
            Link::stream(seed.wrapping_add(1)),
            &shared,
            Dir::Down
        ),
    );
}

/// Relay one direction of a TCP connection through `link`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut link: Link,
    shared: &Shared,
    dir: Dir,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(MAX_QUEUED_CHUNKS);
    let read = async move {
        let mut buf = vec![0u8; TCP_CHUNK];
        loop {
            let cfg = shared.impairment(dir);
            // A bottleneck buffer of `queue_limit`: stop reading (TCP pushes
            // back on the sender) while more than that is queued.
            if let Some(busy) = link.busy_until()
                && cfg.rate.is_some()
                && let Some(resume) = busy.checked_sub(cfg.queue_limit)
                && resume > Instant::now()
            {
                sleep_until(resume).await;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let Verdict::Deliver(at) = link.on_packet(&cfg, Instant::now(), n) else {
                // A stream link never drops.
                return;
            };
            let data = buf.get(..n).unwrap_or_default().to_vec();
            if tx.send((at, data)).await.is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, data)) = rx.recv().await {
            sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
            bump(&shared.counters.tcp_bytes, data.len() as u64);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
