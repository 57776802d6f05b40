//! The coordinator's connection receive window: a site's upload that waits
//! for a slot gets no more than the idle window of credit; the window opens
//! while the upload is read and is back to the idle size once it has been
//! read, so the site's next waiting upload again parks no more than that.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use fedlink_certs::{ALPN_SITE, RevocationList};
use fedlink_protocol::{FrameHeader, FrameKind};
use fedlink_test_util::TestPki;
use fedlink_transport::{
    DEFAULT_IDLE_TIMEOUT, FramedRecv, SERVER_IDLE_RECEIVE_WINDOW, client_endpoint,
    open_upload_window, server_endpoint,
};

/// Body of each chunk frame: several times the idle window.
const BODY: usize = 1 << 20;

/// Write `data` until the peer's flow control stops it: returns how many
/// bytes were accepted. No credit beyond what the peer granted can ever be
/// used, so the count is an upper bound whatever the timing.
async fn write_until_blocked(send: &mut quinn::SendStream, data: &[u8]) -> usize {
    let mut sent = 0;
    while sent < data.len() {
        match tokio::time::timeout(Duration::from_millis(300), send.write(&data[sent..])).await {
            Ok(r) => sent += r.unwrap(),
            Err(_) => break,
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_uploads_get_only_the_idle_window_before_and_after_an_upload() {
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
    let addr: SocketAddr = server.local_addr().unwrap();
    let kit = pki.site_kit(0).unwrap();
    let client_tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE).unwrap();
    let client = client_endpoint(addr, client_tls, DEFAULT_IDLE_TIMEOUT).unwrap();
    let connecting = client.connect(addr, kit.coordinator_server_name()).unwrap();
    let incoming = server.accept().await.unwrap();
    let (site, coord) = tokio::join!(connecting, incoming);
    let (site, coord) = (site.unwrap(), coord.unwrap());

    let header = FrameHeader::new(FrameKind::Chunk, BODY).unwrap().to_bytes();
    let body: Vec<u8> = (0..BODY).map(|i| (i % 251) as u8).collect();
    let idle = SERVER_IDLE_RECEIVE_WINDOW as usize;

    for upload in 0..2 {
        // The site starts an upload that nobody reads yet (no slot).
        let (mut send, _recv) = site.open_bi().await.unwrap();
        send.write_all(&header).await.unwrap();
        let parked = header.len() + write_until_blocked(&mut send, &body).await;
        assert!(
            parked <= idle,
            "upload {upload}: {parked} bytes in flight before the slot, idle window {idle}"
        );
        // The slot is granted: the window opens and the whole upload is read.
        let (_s, recv) = coord.accept_bi().await.unwrap();
        let mut recv = FramedRecv::new(recv);
        let _share = open_upload_window(&coord, &mut recv, (header.len() + BODY) as u64);
        let reader = tokio::spawn(async move { recv.chunk().await.unwrap() });
        send.write_all(&body[parked - header.len()..])
            .await
            .unwrap();
        send.finish().unwrap();
        let got = reader.await.unwrap();
        assert_eq!(&got[..], &body[..], "upload {upload}");
    }
    site.close(0u32.into(), b"done");
}
