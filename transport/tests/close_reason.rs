//! The reason the coordinator closes a connection with is visible to every
//! task that sees the connection closed (issue 9: the revoked admin's
//! `conn.closed` entry lost its reason when the task woken by the close read
//! it before the closer stored it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedlink_certs::{ALPN_SITE, Kit, RevocationList};
use fedlink_test_util::TestPki;
use fedlink_transport::{
    DEFAULT_IDLE_TIMEOUT, ServerConn, client_endpoint, close, server_endpoint,
};
use quinn::{Connection, Endpoint};

/// A coordinator endpoint and a site endpoint on loopback.
struct Pair {
    _pki: TestPki,
    server: Endpoint,
    client: Endpoint,
    kit: Kit,
}

impl Pair {
    fn new() -> Self {
        let pki = TestPki::new(1).unwrap();
        let revocations = RevocationList::load(pki.revoked_path()).unwrap();
        let server_tls =
            fedlink_certs::server_tls_config(&pki.coordinator_kit().unwrap(), revocations).unwrap();
        let server = server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            server_tls,
            DEFAULT_IDLE_TIMEOUT,
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let kit = pki.site_kit(0).unwrap();
        let client_tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE).unwrap();
        let client = client_endpoint(addr, client_tls, DEFAULT_IDLE_TIMEOUT).unwrap();
        Self {
            _pki: pki,
            server,
            client,
            kit,
        }
    }

    /// A new connection: (the site's end, the coordinator's end).
    async fn connect(&self) -> (Connection, ServerConn) {
        let addr = self.server.local_addr().unwrap();
        let connecting = self
            .client
            .connect(addr, self.kit.coordinator_server_name())
            .unwrap();
        let incoming = self.server.accept().await.unwrap();
        let (site, coord) = tokio::join!(connecting, incoming);
        (site.unwrap(), ServerConn::new(coord.unwrap()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_woken_by_the_close_reads_the_reason() {
    let pair = Pair::new();
    // Many connections, so that many interleavings of the closer and the
    // watcher on the two worker threads are tried; each must see the reason.
    for i in 0..50 {
        let (site, coord) = pair.connect().await;
        let watched = coord.clone();
        let watcher = tokio::spawn(async move {
            let e = watched.closed().await;
            watched.end_reason(e)
        });
        let closer = tokio::spawn(async move {
            coord.close(close::FORBIDDEN, b"the admin certificate has been revoked");
        });
        closer.await.unwrap();
        let reason = watcher.await.unwrap();
        assert_eq!(
            reason, "the admin certificate has been revoked",
            "connection {i}"
        );
        // The peer gets the same reason.
        let seen = site.closed().await;
        assert!(
            seen.to_string().contains("revoked"),
            "connection {i}: {seen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_close_is_reported_when_this_side_did_not_close() {
    let pair = Pair::new();
    let (site, coord) = pair.connect().await;
    site.close(close::NORMAL, b"bye from the site");
    let e = coord.closed().await;
    assert_eq!(coord.local_close_reason(), None);
    let reason = coord.end_reason(e);
    assert!(reason.contains("bye from the site"), "{reason}");
}

/// Issue 14 (2): a peer that starts a frame and then trickles (or stops)
/// does not hold the reader: with a frame timeout, the frame must arrive
/// whole within it of its first byte; waiting *for* a first byte is not
/// bounded (a control stream idles between messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_stalls_after_its_first_byte_times_out() {
    use std::time::Duration;

    use fedlink_transport::TransportError;

    let pair = Pair::new();
    let (site, coord) = pair.connect().await;
    let (mut send, _site_recv) = site.open_bi().await.unwrap();
    let header = fedlink_protocol::FrameHeader::new(fedlink_protocol::FrameKind::Message, 100)
        .unwrap()
        .to_bytes();
    // Three bytes of the header, then nothing.
    send.write_all(&header[..3]).await.unwrap();
    let (_coord_send, mut recv) = coord.accept_bi().await.unwrap();
    recv.set_frame_timeout(Duration::from_millis(200));
    let r = tokio::time::timeout(Duration::from_secs(10), recv.next_frame())
        .await
        .expect("the frame timeout fires long before the hang guard");
    assert!(matches!(r, Err(TransportError::SlowFrame(_))), "{r:?}");
}
