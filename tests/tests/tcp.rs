//! The protocol over TLS 1.3 on TCP, against the real coordinator: sites on
//! TCP and on QUIC in the same rounds, and the mutual-TLS refusal matrix
//! (no certificate, foreign CA, expired, revoked, wrong role, wrong ALPN)
//! on the TCP listener — the same checks as on QUIC (`mtls.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use fedlink_certs::{ALPN_ADMIN, ALPN_SITE, Kit};
use fedlink_protocol::admin::{AdminRequest, AdminResponse};
use fedlink_protocol::message::{Capabilities, Hello, UploadResult};
use fedlink_protocol::{FlatModel, Message, VersionRange};
use fedlink_test_util::TestPki;
use fedlink_tests::fixture::{JobSpec, RunningCoordinator, write_config, write_job};
use fedlink_tests::raw_site::RawSite;
use fedlink_tests::{bounded, raw_tls_config};
use fedlink_transport::TransportKind;

async fn start(spec: &JobSpec, pki: &TestPki, dir: &std::path::Path) -> RunningCoordinator {
    RunningCoordinator::start_job(spec, pki, dir).await.unwrap()
}

fn audit_text(data_dir: &std::path::Path) -> String {
    std::fs::read_to_string(data_dir.join("audit").join("audit.jsonl")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_on_tcp_and_on_quic_share_the_rounds() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 2,
        // Enough parameters for several chunk records per upload.
        inputs: 300_000,
        ..JobSpec::default()
    };
    let coord = start(&spec, &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let transports = [TransportKind::Tcp, TransportKind::Tcp, TransportKind::Quic];
    let mut sites = Vec::new();
    for (i, kind) in transports.into_iter().enumerate() {
        let site = RawSite::connect_over(pki.site_kit(i).unwrap(), coord.addr, kind)
            .await
            .unwrap();
        assert_eq!(site.conn.kind(), kind);
        sites.push(site);
    }
    // The operator sees how each site is connected (welcomed sites are
    // known to the engine before their Welcome: no waiting).
    // Over TLS on TCP too.
    let admin = fedlink_cli::admin::client::AdminClient::connect(
        pki.admin_dir(),
        Some(&coord.addr.to_string()),
        TransportKind::Tcp,
    )
    .await
    .unwrap();
    let AdminResponse::Sites(listed) = admin.request(&AdminRequest::SitesList).await.unwrap()
    else {
        panic!("expected the site list");
    };
    for (i, kind) in transports.iter().enumerate() {
        let info = listed
            .iter()
            .find(|s| s.name.as_str() == format!("site-{i}"))
            .unwrap();
        let link = info.link.as_ref().expect("a connected site has a link");
        assert_eq!(link.transport, kind.as_str(), "{info:?}");
        assert!(!link.via_proxy);
        assert!(link.rtt_ms >= 0.0 && link.rtt_ms < 10_000.0, "{link:?}");
    }
    let AdminResponse::Status(status) = admin.request(&AdminRequest::Status).await.unwrap() else {
        panic!("expected the status");
    };
    assert_eq!(status.links.len(), 3, "{status:?}");
    admin.close().await;
    let mut tasks = Vec::new();
    for (i, mut site) in sites.into_iter().enumerate() {
        let kind = transports[i];
        tasks.push(tokio::spawn(async move {
            for _ in 0..2 {
                let offer = site.next_offer().await.unwrap();
                site.accept(&offer).await.unwrap();
                let global = site.fetch_model(&offer).await.unwrap();
                let values = (0..global.values().len())
                    .map(|j| ((j % 5) as f32 - 2.0) * 0.01 * (i as f32 + 1.0))
                    .collect();
                let delta = FlatModel::new(global.spec().clone(), values).unwrap();
                let up = site.prepare(&offer, &delta, 10).unwrap();
                assert!(up.records.len() > 1, "several records");
                let r = site.upload(&up, None).await.unwrap().unwrap();
                assert!(
                    matches!(r, UploadResult::Ack { accepted: true, .. }),
                    "site {i} ({kind}) round {}: {r:?}",
                    offer.round
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    coord.finished().await.unwrap();
    let audit = audit_text(&data_dir);
    let accepted: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"conn.accepted\""))
        .collect();
    for (i, kind) in transports.iter().enumerate() {
        let needle = format!("site/site-{i}\"");
        let line = accepted
            .iter()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no conn.accepted for site-{i}"));
        assert!(
            line.contains(&format!("\"transport\":\"{kind}\"")),
            "site-{i}: {line}"
        );
    }
}

/// Connect over TCP from `source` (a loopback address of its own, so that
/// the coordinator's per-source refusal summary keeps each case apart) with
/// `tls`, say Hello, read the answer: the error text if the coordinator
/// refuses at any step.
async fn tcp_attempt(
    addr: std::net::SocketAddr,
    source: std::net::Ipv4Addr,
    tls: rustls::ClientConfig,
) -> Result<(), String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    // Every step bounded: a refused connection must fail the attempt, never
    // hang the test (one run in a stress loop under load hung here with
    // every thread parked; which step it was is not known).
    let stream = bounded("TCP connect", socket.connect(addr))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let conn = fedlink_transport::tcp::connect_over(
        stream,
        addr,
        Arc::new(tls),
        "localhost",
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = bounded("opening a stream", conn.open_bi())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    bounded(
        "sending Hello",
        send.message(&Message::Hello(Hello {
            versions: VersionRange::SUPPORTED,
            agent_version: "tcp-matrix".into(),
            capabilities: Capabilities::default(),
        })),
    )
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    match bounded("answer", recv.message()).await.unwrap() {
        Ok(Message::Welcome(_)) => {
            conn.close();
            Ok(())
        }
        Ok(other) => Err(format!("answered {}", other.name())),
        Err(e) => Err(e.to_string()),
    }
}

fn material(
    kit: &Kit,
) -> Option<(
    Vec<fedlink_certs::rustls_pki_types::CertificateDer<'static>>,
    fedlink_certs::rustls_pki_types::PrivateKeyDer<'static>,
)> {
    Some((kit.cert_chain().to_vec(), kit.private_key()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_refusal_matrix_holds_on_the_tcp_listener() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&JobSpec::default(), &pki, dir.path()).await;
    let data_dir = coord.data_dir.clone();
    let ca = pki.coordinator_kit().unwrap().ca_cert().clone();
    let foreign = Kit::load(pki.foreign_site_dir()).unwrap();
    let expired = Kit::load(pki.expired_site_dir()).unwrap();
    let revoked = Kit::load(pki.revoked_site_dir()).unwrap();
    let rogue = Kit::load(pki.rogue_coordinator_dir()).unwrap();
    let admin = pki.admin_kit().unwrap();
    let site = pki.site_kit(0).unwrap();

    // (case, client config, what the coordinator records as the reason)
    let cases: Vec<(&str, rustls::ClientConfig, &str)> = vec![
        (
            "no certificate",
            raw_tls_config(&ca, None, ALPN_SITE).unwrap(),
            "peer sent no certificates",
        ),
        (
            "foreign CA",
            raw_tls_config(&ca, material(&foreign), ALPN_SITE).unwrap(),
            "BadSignature",
        ),
        (
            "expired",
            raw_tls_config(&ca, material(&expired), ALPN_SITE).unwrap(),
            "certificate expired",
        ),
        (
            "revoked",
            raw_tls_config(&ca, material(&revoked), ALPN_SITE).unwrap(),
            "is revoked",
        ),
        (
            "coordinator role as a client",
            raw_tls_config(&ca, material(&rogue), ALPN_SITE).unwrap(),
            "has role coordinator",
        ),
        (
            "unknown ALPN",
            raw_tls_config(&ca, material(&site), b"h2").unwrap(),
            "peer doesn't support any known protocol",
        ),
    ];
    // What the client is told depends on TCP timing (the alert, or a
    // reset that overtook it); what counts is that it is refused, and that
    // the coordinator records why.
    let source = |i: usize| std::net::Ipv4Addr::new(127, 0, 0, 10 + u8::try_from(i).unwrap());
    for (i, (case, tls, _)) in cases.iter().enumerate() {
        let err = tcp_attempt(coord.addr, source(i), tls.clone())
            .await
            .expect_err(&format!("{case}: accepted over TCP"));
        eprintln!("{case}: {err}");
    }
    // A site certificate on the admin ALPN and an admin certificate on the
    // site ALPN: past the handshake, refused by the role check (the
    // connection ends without a Welcome).
    for (case, kit, alpn) in [
        ("site cert on the admin ALPN", &site, ALPN_ADMIN),
        ("admin cert on the site ALPN", &admin, ALPN_SITE),
    ] {
        let err = tcp_attempt(
            coord.addr,
            source(9),
            raw_tls_config(&ca, material(kit), alpn).unwrap(),
        )
        .await
        .expect_err(&format!("{case}: accepted over TCP"));
        eprintln!("{case}: {err}");
    }
    // The real site still gets in over TCP.
    let tls = fedlink_certs::client_tls_config(&site, ALPN_SITE).unwrap();
    tcp_attempt(coord.addr, std::net::Ipv4Addr::LOCALHOST, tls)
        .await
        .unwrap();

    coord.shutdown().await.unwrap();
    let audit = audit_text(&data_dir);
    // Failed handshakes: counted per source and recorded at shutdown, with
    // the transport named in the reason.
    let refused: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"conn.refused\""))
        .collect();
    for (i, (case, _, reason)) in cases.iter().enumerate() {
        let from = format!("\"{}\"", source(i));
        let line = refused
            .iter()
            .find(|l| l.contains(&from))
            .unwrap_or_else(|| panic!("{case}: no conn.refused entry from {from}: {refused:#?}"));
        assert!(
            line.contains("handshake failed (TLS over TCP)") && line.contains(reason),
            "{case}: expected {reason:?} in {line}"
        );
    }
    // Refusals after the handshake are individual entries naming the rule.
    for role in ["site", "admin"] {
        let expected = format!("with role {role} may not use ALPN");
        assert!(
            refused.iter().any(|l| l.contains(&expected)),
            "no conn.refused entry with {expected:?}: {refused:#?}"
        );
    }
}

/// `congestion_control = "bbr"` on the coordinator (what it sends: model
/// downloads) runs rounds like the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_bbr_runs_rounds() {
    let pki = TestPki::new(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        rounds: 1,
        sites: 2,
        quorum: 2,
        inputs: 300_000,
        ..JobSpec::default()
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("congestion_control = \"bbr\"\n");
    std::fs::write(&cfg, text).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..2 {
        let mut site = RawSite::connect(pki.site_kit(i).unwrap(), coord.addr)
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let offer = site.next_offer().await.unwrap();
            site.accept(&offer).await.unwrap();
            let global = site.fetch_model(&offer).await.unwrap();
            let delta =
                FlatModel::new(global.spec().clone(), vec![0.01; global.values().len()]).unwrap();
            let up = site.prepare(&offer, &delta, 10).unwrap();
            let r = site.upload(&up, None).await.unwrap().unwrap();
            assert!(
                matches!(r, UploadResult::Ack { accepted: true, .. }),
                "{r:?}"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    coord.finished().await.unwrap();
}

/// A configured port whose TCP side is taken is the operator's to see: the
/// coordinator stops before binding and says which listener failed (with
/// port 0 it would pick another port for both instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_tcp_port_is_named_when_the_port_is_configured() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), &JobSpec::default()).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    let cfg = write_config(&pki, dir.path(), &job, port).unwrap();
    let err = match RunningCoordinator::start(&cfg, true).await {
        Ok(_) => panic!("started with its TCP port taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("stopped before binding") && err.contains(&format!("binding TCP {port}")),
        "{err}"
    );
    drop(taken);
}
