//! The impairment proxy on real loopback sockets: seeded loss is
//! reproducible, "drop all UDP" and cuts do what they say, TCP keeps bytes
//! whole and in order through delay, stalls and a rate limit. Timing is only
//! checked from below (a delay cannot make things faster), and every wait has
//! a generous hang guard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedlink_tools::impair::{ImpairProxy, Impairment, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

const HANG_GUARD: Duration = Duration::from_secs(20);

async fn guarded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, fut)
        .await
        .expect("hang guard")
}

/// A UDP socket that forwards every datagram it receives (as a u32 id).
async fn udp_sink() -> (SocketAddr, mpsc::UnboundedReceiver<u32>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok(n) = sock.recv(&mut buf).await {
            let id = u32::from_be_bytes(buf[..n.min(4)].try_into().unwrap());
            if tx.send(id).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

const MARKER: u32 = u32::MAX;

/// Send `batches` × 20 numbered datagrams through a proxy losing
/// `loss` of them; once the proxy has read a batch, a marker sent loss-free
/// tells the sink the batch is over. Returns the ids that arrived, and the proxy's counters.
async fn lossy_run(seed: u64, loss: f64, batches: u32) -> (BTreeSet<u32>, u64) {
    let (target, mut sink) = udp_sink().await;
    let mut cfg = ProxyConfig::new(target);
    cfg.tcp = false;
    cfg.seed = seed;
    let proxy = ImpairProxy::start(cfg).await.unwrap();
    let h = proxy.handle();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(proxy.addr()).await.unwrap();
    let lossy = Impairment {
        loss,
        ..Impairment::default()
    };
    let mut got = BTreeSet::new();
    for b in 0..batches {
        h.set_impairment(lossy.clone(), Impairment::default())
            .unwrap();
        for i in 0..20 {
            client.send(&(b * 20 + i).to_be_bytes()).await.unwrap();
        }
        guarded(h.udp_received(u64::from(b) * 21 + 20)).await;
        h.set_impairment(Impairment::default(), Impairment::default())
            .unwrap();
        client.send(&MARKER.to_be_bytes()).await.unwrap();
        loop {
            match guarded(sink.recv()).await.unwrap() {
                MARKER => break,
                id => {
                    got.insert(id);
                }
            }
        }
    }
    (got, h.stats().udp_dropped)
}

#[tokio::test]
async fn seeded_udp_loss_is_reproducible() {
    let (a, dropped) = lossy_run(7, 0.3, 15).await;
    let (b, _) = lossy_run(7, 0.3, 15).await;
    let (c, _) = lossy_run(8, 0.3, 15).await;
    assert_eq!(a, b, "same seed, same datagrams lost");
    assert_ne!(a, c, "another seed, other losses");
    let lost = 300 - a.len() as u64;
    assert_eq!(
        lost, dropped,
        "every missing datagram was dropped on purpose"
    );
    // 300 draws at p = 0.3: mean 90, sd ≈ 8.
    assert!((50..=130).contains(&lost), "{lost} lost");
}

#[tokio::test]
async fn drop_all_udp_blocks_both_ways_until_lifted() {
    let (target, mut sink) = udp_sink().await;
    let mut cfg = ProxyConfig::new(target);
    cfg.tcp = false;
    let proxy = ImpairProxy::start(cfg).await.unwrap();
    let h = proxy.handle();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(proxy.addr()).await.unwrap();
    h.drop_all_udp(true);
    for i in 0..10u32 {
        client.send(&i.to_be_bytes()).await.unwrap();
    }
    guarded(h.udp_received(10)).await;
    h.drop_all_udp(false);
    client.send(&MARKER.to_be_bytes()).await.unwrap();
    assert_eq!(guarded(sink.recv()).await, Some(MARKER), "only the marker");
    let s = h.stats();
    assert_eq!((s.udp_blocked, s.udp_forwarded), (10, 1));
}

/// A UDP echo server.
async fn udp_echo() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    addr
}

#[tokio::test]
async fn udp_round_trip_takes_the_delay_both_ways_and_a_cut_blackholes_the_flow() {
    let echo = udp_echo().await;
    let cfg = ProxyConfig::new(echo).both_ways(Impairment {
        delay: Duration::from_millis(15),
        ..Impairment::default()
    });
    let proxy = ImpairProxy::start(cfg).await.unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(proxy.addr()).await.unwrap();
    let start = Instant::now();
    client.send(b"ping").await.unwrap();
    let mut buf = [0u8; 16];
    let n = guarded(client.recv(&mut buf)).await.unwrap();
    assert_eq!(&buf[..n], b"ping");
    assert!(start.elapsed() >= Duration::from_millis(30));

    let h = proxy.handle();
    h.cut();
    // The old flow is black-holed; a new client port gets through.
    let fresh = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    fresh.connect(proxy.addr()).await.unwrap();
    fresh.send(b"new").await.unwrap();
    let n = guarded(fresh.recv(&mut buf)).await.unwrap();
    assert_eq!(&buf[..n], b"new");
    client.send(b"old").await.unwrap();
    fresh.send(b"new2").await.unwrap();
    let n = guarded(fresh.recv(&mut buf)).await.unwrap();
    assert_eq!(&buf[..n], b"new2");
    assert_eq!(h.stats().udp_blocked, 1, "the old flow's datagram");
}

/// A TCP server that reads everything and answers with an order-sensitive
/// checksum of it and its length.
async fn tcp_counter() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    let _ = s.write_all(&checksum(&all).to_be_bytes()).await;
                    let _ = s.write_all(&(all.len() as u64).to_be_bytes()).await;
                }
            });
        }
    });
    addr
}

fn checksum(data: &[u8]) -> u64 {
    // Order-sensitive (FNV-1a).
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[tokio::test]
async fn tcp_arrives_whole_and_in_order_through_delay_stalls_and_rate() {
    let target = tcp_counter().await;
    let mut cfg = ProxyConfig::new(target).both_ways(Impairment {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(3),
        loss: 0.05,
        reorder: 0.5,
        rate: Some(10_000_000),
        queue_limit: Duration::from_millis(20),
    });
    cfg.udp = false;
    cfg.seed = 3;
    let proxy = ImpairProxy::start(cfg).await.unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    guarded(s.write_all(&data)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = Vec::new();
    guarded(s.read_to_end(&mut reply)).await.unwrap();
    assert_eq!(reply.len(), 16);
    assert_eq!(reply[..8], checksum(&data).to_be_bytes());
    assert_eq!(reply[8..], (data.len() as u64).to_be_bytes());
    // 1 MB at 10 MB/s cannot take less than 100 ms.
    assert!(start.elapsed() >= Duration::from_millis(100));
    let st = proxy.handle().stats();
    assert_eq!(st.tcp_connections, 1);
    assert_eq!(st.tcp_bytes, 1_000_016);
}

#[tokio::test]
async fn a_cut_closes_open_tcp_connections_and_new_ones_still_work() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut cfg = ProxyConfig::new(target);
    cfg.udp = false;
    let proxy = ImpairProxy::start(cfg).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    guarded(s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"hello");

    proxy.handle().cut();
    let mut rest = Vec::new();
    // The relay closes its end: the client reads an end of stream (or a
    // reset), not a hang.
    let _ = guarded(s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());

    let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
    s2.write_all(b"again").await.unwrap();
    guarded(s2.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"again");
    assert_eq!(proxy.handle().stats().cuts, 1);
}

#[tokio::test]
async fn udp_and_tcp_share_one_port() {
    let cfg = ProxyConfig::new("127.0.0.1:9".parse().unwrap());
    let proxy = ImpairProxy::start(cfg).await.unwrap();
    let port = proxy.addr().port();
    // Both are bound: binding either again on that port fails.
    assert!(UdpSocket::bind(("127.0.0.1", port)).await.is_err());
    assert!(TcpListener::bind(("127.0.0.1", port)).await.is_err());
}
