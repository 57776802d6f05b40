//! The protocol over TLS 1.3 on TCP (`fedlink_transport::tcp`): the same
//! rustls configs and framed streams as QUIC, several streams at once on one
//! connection, identity and ALPN read the same way, large frames whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedlink_certs::{ALPN_SITE, RevocationList};
use fedlink_protocol::{Heartbeat, Message};
use fedlink_test_util::TestPki;
use fedlink_transport::tcp::{self, TcpServer};

const GUARD: Duration = Duration::from_secs(20);

fn ping(seq: u64) -> Message {
    Message::Heartbeat(Heartbeat {
        seq,
        now_unix_ms: 1_700_000_000_000,
    })
}

/// The coordinator's TLS-over-TCP listener on an ephemeral loopback port,
/// with `pki`'s coordinator kit and revocation list.
async fn tcp_server(pki: &TestPki) -> TcpServer {
    let revocations = RevocationList::load(pki.revoked_path()).unwrap();
    let server_tls =
        fedlink_certs::server_tls_config(&pki.coordinator_kit().unwrap(), revocations).unwrap();
    TcpServer::bind("127.0.0.1:0".parse().unwrap(), server_tls)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_and_streams_cross_a_tls_over_tcp_connection() {
    let pki = TestPki::new(1).unwrap();
    let server = tcp_server(&pki).await;
    let addr = server.local_addr().unwrap();
    let kit = pki.site_kit(0).unwrap();

    let record = Bytes::from(
        (0..3_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let expected = record.clone();
    let coordinator = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().handshake().await.unwrap();
        assert_eq!(conn.negotiated_alpn().as_deref(), Some(ALPN_SITE));
        let who = conn.peer_identity().unwrap();
        // Two streams at once: a control exchange and a big chunk upload.
        let (mut s1, mut r1) = conn.accept_bi().await.unwrap();
        let (mut s2, mut r2) = conn.accept_bi().await.unwrap();
        let Message::Heartbeat(hb) = r1.message().await.unwrap() else {
            panic!("expected a heartbeat");
        };
        s1.message(&ping(hb.seq + 1)).await.unwrap();
        s1.finish().unwrap();
        let got = r2.chunk().await.unwrap();
        assert!(r2.message_or_end().await.unwrap().is_none(), "clean end");
        s2.message(&ping(u64::try_from(got.len()).unwrap()))
            .await
            .unwrap();
        s2.finish().unwrap();
        assert_eq!(got, expected);
        // Wait for the site to close.
        let why = conn.closed().await;
        (who, why)
    });

    let client_tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE).unwrap();
    let conn = tcp::connect(
        addr,
        Arc::new(client_tls),
        kit.coordinator_server_name(),
        GUARD,
    )
    .await
    .unwrap();
    assert_eq!(conn.negotiated_alpn().as_deref(), Some(ALPN_SITE));
    assert_eq!(
        conn.peer_identity().unwrap().role(),
        fedlink_certs::Role::Coordinator
    );
    let (mut s1, mut r1) = conn.open_bi().await.unwrap();
    s1.message(&ping(1)).await.unwrap();
    let (mut s2, mut r2) = conn.open_bi().await.unwrap();
    // The upload is sent in pieces, as the agent does.
    s2.begin_chunk(record.len()).await.unwrap();
    for piece in record.chunks(100_000) {
        s2.chunk_body(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    s2.finish().unwrap();
    let reply = tokio::time::timeout(GUARD, r1.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, ping(2));
    let reply = tokio::time::timeout(GUARD, r2.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, ping(3_000_000));
    assert!(r1.message_or_end().await.unwrap().is_none());
    conn.close();
    let (who, why) = tokio::time::timeout(GUARD, coordinator)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&who, kit.identity());
    assert!(why.contains("closed"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_ours_is_refused_in_the_handshake() {
    let pki = TestPki::new(1).unwrap();
    let impostor = fedlink_certs::Kit::load(pki.foreign_coordinator_dir()).unwrap();
    let server_tls = fedlink_certs::server_tls_config(&impostor, RevocationList::empty()).unwrap();
    let server = TcpServer::bind("127.0.0.1:0".parse().unwrap(), server_tls)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn(async move { server.accept().await.unwrap().handshake().await });
    let kit = pki.site_kit(0).unwrap();
    let client_tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE).unwrap();
    let err = tcp::connect(
        addr,
        Arc::new(client_tls),
        kit.coordinator_server_name(),
        GUARD,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("BadSignature"), "{err}");
    assert!(err.is_connection_lost());
    let server_err = accept.await.unwrap().unwrap_err();
    assert!(
        server_err.to_string().contains("TLS handshake"),
        "{server_err}"
    );
}

/// `chunk_into` reads record after record into one caller's buffer (the
/// coordinator's pooled upload buffer): each record whole and exact, the
/// buffer's capacity reused, a message where a chunk belongs refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_into_reuses_one_buffer_for_many_records() {
    let pki = TestPki::new(1).unwrap();
    let server = tcp_server(&pki).await;
    let addr = server.local_addr().unwrap();
    let kit = pki.site_kit(0).unwrap();
    let record = |len: usize, salt: u32| -> Vec<u8> {
        (0..len as u32).map(|i| ((i ^ salt) % 253) as u8).collect()
    };
    let records = vec![record(1_000_000, 1), record(300_000, 2), record(700_001, 3)];
    let expected = records.clone();
    let coordinator = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().handshake().await.unwrap();
        let (_s, mut r) = conn.accept_bi().await.unwrap();
        let mut buf = Vec::new();
        let mut caps = Vec::new();
        for want in &expected {
            r.chunk_into(&mut buf).await.unwrap();
            assert_eq!(&buf, want, "each record whole, nothing of the one before");
            caps.push(buf.capacity());
        }
        // The first (largest) record's allocation serves the later ones.
        assert!(caps.iter().all(|&c| c == caps[0]), "{caps:?}");
        let err = r.chunk_into(&mut buf).await.unwrap_err();
        assert!(
            matches!(
                err,
                fedlink_transport::TransportError::UnexpectedFrame { .. }
            ),
            "{err}"
        );
        conn.close();
    });
    let client_tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE).unwrap();
    let conn = tcp::connect(
        addr,
        Arc::new(client_tls),
        kit.coordinator_server_name(),
        GUARD,
    )
    .await
    .unwrap();
    let (mut s, _r) = conn.open_bi().await.unwrap();
    for rec in records {
        s.chunk(Bytes::from(rec)).await.unwrap();
    }
    s.message(&ping(7)).await.unwrap();
    s.finish().unwrap();
    tokio::time::timeout(GUARD, coordinator)
        .await
        .unwrap()
        .unwrap();
}
