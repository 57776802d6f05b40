//! Mutual TLS over real QUIC on loopback: who gets in, who does not, and
//! what each side is told.
//!
//! Every rejection is checked on BOTH sides: the server's handshake/accept
//! error (or post-handshake refusal) names the reason, and the client sees
//! the refusal as a closed connection carrying the TLS alert and reason —
//! with TLS 1.3 typically only on its first stream read, after `connect()`
//! already succeeded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedlink_certs::{ALPN_ADMIN, ALPN_SITE, Kit, RevocationList, Role};
use fedlink_protocol::{Heartbeat, Message};
use fedlink_test_util::TestPki;
use fedlink_tests::{
    CLOSE_FORBIDDEN, ClientError, ClientStage, ServerEvent, TestServer, client_endpoint, exchange,
    kit_client_config, raw_client_config,
};

// TLS alert numbers (RFC 8446 §6).
const ALERT_BAD_CERTIFICATE_UNSUPPORTED: u8 = 43; // unsupported_certificate
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_CERTIFICATE_UNKNOWN: u8 = 46;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;

fn ping(seq: u64) -> Message {
    Message::Heartbeat(Heartbeat {
        seq,
        now_unix_ms: 1_700_000_000_000,
    })
}

fn kit_material(
    kit: &Kit,
) -> (
    Vec<fedlink_certs::rustls_pki_types::CertificateDer<'static>>,
    fedlink_certs::rustls_pki_types::PrivateKeyDer<'static>,
) {
    (kit.cert_chain().to_vec(), kit.private_key())
}

struct Setup {
    pki: TestPki,
    server: TestServer,
    revocations: std::sync::Arc<RevocationList>,
    client: quinn::Endpoint,
}

fn setup() -> Setup {
    let pki = TestPki::new(2).unwrap();
    let revocations = RevocationList::load(pki.revoked_path()).unwrap();
    let server = TestServer::start(&pki.coordinator_kit().unwrap(), revocations.clone()).unwrap();
    Setup {
        pki,
        server,
        revocations,
        client: client_endpoint().unwrap(),
    }
}

impl Setup {
    /// Exchange with a kit's own (checked) client config; expect success.
    async fn accepted(&mut self, kit: &Kit, alpn: &[u8], seq: u64) {
        let cfg = kit_client_config(kit, alpn).unwrap();
        let reply = exchange(
            &self.client,
            cfg,
            self.server.addr().unwrap(),
            kit.coordinator_server_name(),
            &ping(seq),
        )
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{} refused: {e}", kit.identity()));
        assert_eq!(
            reply,
            ping(seq + 1),
            "the server answered through the frame"
        );
        match self.server.next_event().await.unwrap() {
            ServerEvent::Accepted {
                identity,
                alpn: got_alpn,
                received,
            } => {
                assert_eq!(&identity, kit.identity());
                assert_eq!(got_alpn, alpn);
                assert_eq!(received, ping(seq));
            }
            other => panic!("expected Accepted, got {other:?}"),
        }
    }

    /// Exchange with `cfg`; expect the client to fail and return both sides'
    /// errors.
    async fn refused(&mut self, cfg: quinn::ClientConfig) -> (ClientError, ServerEvent) {
        let result = exchange(
            &self.client,
            cfg,
            self.server.addr().unwrap(),
            "localhost",
            &ping(1),
        )
        .await
        .unwrap();
        let client_err = match result {
            Ok(reply) => panic!("client was accepted (got {reply:?})"),
            Err(e) => e,
        };
        let event = self.server.next_event().await.unwrap();
        eprintln!("refused:\n  server: {event:?}\n  client: {client_err}");
        (client_err, event)
    }
}

fn handshake_error(event: &ServerEvent) -> &str {
    match event {
        ServerEvent::HandshakeRefused { error } => error,
        other => panic!("expected the server handshake to fail, got {other:?}"),
    }
}

/// The TLS 1.3 pattern: the client's handshake finished, the refusal
/// arrived on the stream.
fn assert_refused_after_connect(err: &ClientError) {
    assert!(
        matches!(
            err.stage,
            ClientStage::Read | ClientStage::Write | ClientStage::Open
        ),
        "expected the refusal on the first stream operation, got {err}"
    );
}

#[tokio::test]
async fn valid_site_and_admin_are_accepted() {
    let mut s = setup();
    let site0 = s.pki.site_kit(0).unwrap();
    let site1 = s.pki.site_kit(1).unwrap();
    let admin = s.pki.admin_kit().unwrap();
    s.accepted(&site0, ALPN_SITE, 10).await;
    s.accepted(&site1, ALPN_SITE, 20).await;
    s.accepted(&admin, ALPN_ADMIN, 30).await;
    // The manifest knows the site with this exact certificate and its update key.
    let manifest = fedlink_certs::SiteManifest::load(&s.pki.manifest_path()).unwrap();
    let entry = manifest.check_peer(&site0.cert_chain()[0]).unwrap();
    assert_eq!(
        entry.update_verifying_key().unwrap(),
        site0.update_signing_key().unwrap().verifying_key()
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let mut s = setup();
    let ca = s.pki.coordinator_kit().unwrap().ca_cert().clone();
    let (client, server) = s
        .refused(raw_client_config(&ca, None, ALPN_SITE).unwrap())
        .await;
    let server_err = handshake_error(&server);
    assert!(
        server_err.contains("peer sent no certificates"),
        "server: {server_err}"
    );
    assert_refused_after_connect(&client);
    assert_eq!(
        client.tls_alert(),
        Some(ALERT_CERTIFICATE_REQUIRED),
        "client: {client}"
    );
    assert!(
        client.message.contains("peer sent no certificates"),
        "client: {client}"
    );
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let mut s = setup();
    let ca = s.pki.coordinator_kit().unwrap().ca_cert().clone();
    let foreign = Kit::load(s.pki.foreign_site_dir()).unwrap();
    // Same federation name and site role: only the pinned CA tells it apart.
    assert_eq!(foreign.identity().federation(), s.pki.federation());
    let (client, server) = s
        .refused(raw_client_config(&ca, Some(kit_material(&foreign)), ALPN_SITE).unwrap())
        .await;
    let server_err = handshake_error(&server);
    // Same issuer name as our CA, different key: the signature does not verify.
    assert!(
        server_err.contains("invalid peer certificate: BadSignature"),
        "server: {server_err}"
    );
    assert_refused_after_connect(&client);
    assert_eq!(
        client.tls_alert(),
        Some(ALERT_DECRYPT_ERROR),
        "client: {client}"
    );
    assert!(client.message.contains("BadSignature"), "client: {client}");
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let mut s = setup();
    // The kit loads (expiry is for the peer to judge) and builds a config.
    let expired = Kit::load(s.pki.expired_site_dir()).unwrap();
    let (client, server) = s
        .refused(kit_client_config(&expired, ALPN_SITE).unwrap())
        .await;
    let server_err = handshake_error(&server);
    assert!(
        server_err.contains("certificate expired"),
        "server: {server_err}"
    );
    assert_refused_after_connect(&client);
    assert_eq!(
        client.tls_alert(),
        Some(ALERT_CERTIFICATE_EXPIRED),
        "client: {client}"
    );
    assert!(
        client.message.contains("certificate expired"),
        "client: {client}"
    );
}

#[tokio::test]
async fn revoked_certificate_is_refused_and_revocation_applies_without_restart() {
    let mut s = setup();
    // Revoked at provisioning time.
    let revoked = Kit::load(s.pki.revoked_site_dir()).unwrap();
    let (client, server) = s
        .refused(kit_client_config(&revoked, ALPN_SITE).unwrap())
        .await;
    let server_err = handshake_error(&server);
    assert!(
        server_err.contains("fedlink://testfed/site/revoked-site")
            && server_err.contains("is revoked"),
        "server: {server_err}"
    );
    assert_refused_after_connect(&client);
    assert_eq!(
        client.tls_alert(),
        Some(ALERT_CERTIFICATE_UNKNOWN),
        "client: {client}"
    );
    assert!(client.message.contains("is revoked"), "client: {client}");

    // A good site, revoked while the server runs.
    let site1 = s.pki.site_kit(1).unwrap();
    s.accepted(&site1, ALPN_SITE, 1).await;
    let added = s
        .pki
        .ca()
        .revoke(
            "site-1",
            Some(Role::Site),
            Some("test"),
            fedlink_certs::time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    assert_eq!(added.len(), 1);
    // Written to disk, not yet loaded: still accepted.
    s.accepted(&site1, ALPN_SITE, 2).await;
    // Reload (what a SIGHUP / admin command triggers), same server, same config.
    assert_eq!(s.revocations.reload().unwrap(), 2);
    let (client, server) = s
        .refused(kit_client_config(&site1, ALPN_SITE).unwrap())
        .await;
    let server_err = handshake_error(&server);
    assert!(
        server_err.contains("fedlink://testfed/site/site-1") && server_err.contains("is revoked"),
        "server: {server_err}"
    );
    assert_refused_after_connect(&client);
    assert!(client.message.contains("is revoked"), "client: {client}");
    // Other sites are unaffected.
    s.accepted(&s.pki.site_kit(0).unwrap(), ALPN_SITE, 3).await;
}

#[tokio::test]
async fn coordinator_role_certificate_is_refused_as_client() {
    let mut s = setup();
    let coordinator = s.pki.coordinator_kit().unwrap();
    let ca = coordinator.ca_cert().clone();

    // The real coordinator certificate has no clientAuth usage.
    let (client, server) = s
        .refused(raw_client_config(&ca, Some(kit_material(&coordinator)), ALPN_SITE).unwrap())
        .await;
    let server_err = handshake_error(&server);
    assert!(
        server_err.contains("extended key usage"),
        "server: {server_err}"
    );
    assert_refused_after_connect(&client);
    assert_eq!(
        client.tls_alert(),
        Some(ALERT_BAD_CERTIFICATE_UNSUPPORTED),
        "client: {client}"
    );

    // A coordinator-role certificate that *does* allow clientAuth: the role
    // check refuses it.
    let rogue = Kit::load(s.pki.rogue_coordinator_dir()).unwrap();
    let (client, server) = s
        .refused(raw_client_config(&ca, Some(kit_material(&rogue)), ALPN_SITE).unwrap())
        .await;
    let server_err = handshake_error(&server);
    assert!(
        server_err.contains("fedlink://testfed/coordinator/rogue-coordinator has role coordinator"),
        "server: {server_err}"
    );
    assert_refused_after_connect(&client);
    assert_eq!(
        client.tls_alert(),
        Some(ALERT_CERTIFICATE_UNKNOWN),
        "client: {client}"
    );
    assert!(
        client.message.contains("role coordinator"),
        "client: {client}"
    );

    // And the checked client builder will not even build such a config.
    assert!(kit_client_config(&rogue, ALPN_SITE).is_err());
}

#[tokio::test]
async fn role_must_match_alpn() {
    let mut s = setup();
    let admin = s.pki.admin_kit().unwrap();
    let site = s.pki.site_kit(0).unwrap();
    let ca = admin.ca_cert().clone();

    for (kit, alpn, role) in [(&admin, ALPN_SITE, "admin"), (&site, ALPN_ADMIN, "site")] {
        // The checked builder refuses the combination...
        assert!(kit_client_config(kit, alpn).is_err());
        // ...and the server refuses it when a client forces it.
        let (client, server) = s
            .refused(raw_client_config(&ca, Some(kit_material(kit)), alpn).unwrap())
            .await;
        let expected = format!("with role {role} may not use ALPN");
        match &server {
            ServerEvent::Forbidden { error } => {
                assert!(error.contains(&expected), "server: {error}")
            }
            other => panic!("expected Forbidden, got {other:?}"),
        }
        assert_refused_after_connect(&client);
        assert_eq!(
            client.application_code(),
            Some(u64::from(CLOSE_FORBIDDEN)),
            "client: {client}"
        );
        assert!(
            client.peer_reason().unwrap_or_default().contains(&expected),
            "client: {client}"
        );
    }
    // The right combinations still work.
    s.accepted(&admin, ALPN_ADMIN, 1).await;
    s.accepted(&site, ALPN_SITE, 2).await;
}

#[tokio::test]
async fn site_refuses_an_impostor_coordinator() {
    // A coordinator from another CA, same federation name and server name.
    let pki = TestPki::new(1).unwrap();
    let impostor = Kit::load(pki.foreign_coordinator_dir()).unwrap();
    let mut server = TestServer::start(&impostor, RevocationList::empty()).unwrap();
    let site = pki.site_kit(0).unwrap();
    let client = client_endpoint().unwrap();
    let result = exchange(
        &client,
        kit_client_config(&site, ALPN_SITE).unwrap(),
        server.addr().unwrap(),
        site.coordinator_server_name(),
        &ping(1),
    )
    .await
    .unwrap();
    let err = result.expect_err("the site must not talk to an impostor");
    // The client refuses during its own handshake: connect() fails.
    assert_eq!(err.stage, ClientStage::Connect, "client: {err}");
    assert!(err.message.contains("BadSignature"), "client: {err}");
    let server_err = match server.next_event().await.unwrap() {
        ServerEvent::HandshakeRefused { error } => error,
        other => panic!("expected HandshakeRefused, got {other:?}"),
    };
    // The site's alert reaches the impostor with the site's reason.
    assert!(
        server_err.contains("aborted by peer")
            && server_err.contains(&format!("error {ALERT_DECRYPT_ERROR}"))
            && server_err.contains("BadSignature"),
        "server: {server_err}"
    );
}
