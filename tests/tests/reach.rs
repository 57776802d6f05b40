//! Reaching the coordinator from a hospital network that blocks UDP: a real
//! agent with `transport = "auto"` finds QUIC silent (the impairment proxy
//! drops every datagram), falls back to TLS over TCP through an HTTP
//! `CONNECT` proxy that demands credentials, and takes part in the rounds;
//! the choice and its reason are in the site's audit log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use fedlink_agent::audit::Recorded;
use fedlink_agent::{Agent, SiteConfig};
use fedlink_coordinator::round::JobOutcome;
use fedlink_test_util::TestPki;
use fedlink_tests::fixture::{
    JobSpec, RunningCoordinator, wdbc_site_toml, write_config, write_job,
};
use fedlink_tools::connect_proxy::{ConnectProxy, ConnectProxyConfig};
use fedlink_tools::impair::{ImpairProxy, ProxyConfig};
use tokio::sync::{mpsc, oneshot};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_agent_with_udp_blocked_joins_over_tcp_through_a_connect_proxy() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        id: "reach".into(),
        rounds: 2,
        sites: 1,
        quorum: 1,
        inputs: 30,
        ..JobSpec::default()
    };
    let job = write_job(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let coord = RunningCoordinator::start(&cfg, true).await.unwrap();

    // The hospital's network: UDP to the coordinator is dropped; TCP goes
    // through its CONNECT proxy only.
    let firewall = ImpairProxy::start(ProxyConfig::new(coord.addr))
        .await
        .unwrap();
    firewall.handle().drop_all_udp(true);
    let coordinator_seen_as = firewall.addr();
    let proxy = ConnectProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        ConnectProxyConfig {
            credentials: Some("hospital-it:pr0xy-pass".into()),
            allow: Some(vec![coordinator_seen_as.to_string()]),
        },
    )
    .await
    .unwrap();
    let creds = dir.path().join("proxy-credentials");
    std::fs::write(&creds, "hospital-it:pr0xy-pass\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    let mut text = wdbc_site_toml(&pki, 0, coordinator_seen_as).unwrap();
    // Top-level keys go before the first table.
    let settings = format!(
        "transport = \"auto\"\nproxy = \"http://{}\"\nproxy_credentials_file = {:?}\n",
        proxy.addr(),
        creds
    );
    text = text.replacen(
        "device = \"cpu\"\n",
        &format!("device = \"cpu\"\n{settings}"),
        1,
    );
    text = text.replacen(
        "connect_timeout_ms = 1000\n",
        "connect_timeout_ms = 5000\nquic_head_start_ms = 300\n",
        1,
    );
    let config = SiteConfig::parse(&text, Path::new("site.toml"), dir.path()).unwrap();
    assert_eq!(config.transport, fedlink_agent::dial::TransportMode::Auto);

    let (tx, mut events) = mpsc::unbounded_channel::<Recorded>();
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(Agent::new(config).with_events(tx).run(async {
        let _ = stopped.await;
    }));

    let outcome = tokio::time::timeout(LIMIT, coord.finished())
        .await
        .expect("the job finishes")
        .unwrap();
    assert!(
        matches!(outcome.outcome, Some(JobOutcome::Completed { .. })),
        "{outcome:?}"
    );
    let _ = stop.send(());
    tokio::time::timeout(LIMIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    let established: Vec<&Recorded> = seen
        .iter()
        .filter(|e| e.event == "conn.established")
        .collect();
    assert!(!established.is_empty(), "{seen:#?}");
    let first = &established[0].details;
    assert_eq!(first["transport"], "tcp", "{first}");
    assert_eq!(first["proxy"], proxy.addr().to_string(), "{first}");
    let reason = first["transport_reason"].as_str().unwrap();
    assert!(reason.contains("no QUIC handshake"), "{reason}");
    let updates = seen.iter().filter(|e| e.event == "update.result").count();
    assert_eq!(updates, 2, "one accepted update per round: {seen:#?}");

    // QUIC was tried (and dropped); TCP went through the proxy, with
    // credentials, to the coordinator's address.
    let fw = firewall.handle().stats();
    assert!(fw.udp_blocked > 0, "{fw:?}");
    assert!(fw.tcp_connections >= 1, "{fw:?}");
    let px = proxy.stats();
    assert!(px.tunnels >= 1, "{px:?}");
    assert_eq!(px.auth_refused, 0, "{px:?}");
    assert!(
        px.targets
            .iter()
            .all(|t| *t == coordinator_seen_as.to_string()),
        "{px:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_proxy_is_named_with_its_answer() {
    use fedlink_agent::dial::{Proxy, http_connect};
    let proxy = ConnectProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        ConnectProxyConfig {
            credentials: Some("it:secret".into()),
            allow: Some(vec!["coordinator.example:4433".into()]),
        },
    )
    .await
    .unwrap();
    let url = format!("http://{}", proxy.addr());
    // No credentials: 407, and the agent says what to configure.
    let p = Proxy::parse(&url, "site.toml").unwrap();
    let err = http_connect(&p, "coordinator.example:4433", LIMIT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            fedlink_agent::dial::DialError::ProxyRefused {
                source: fedlink_agent::dial::ConnectRefused::AuthRequired(_),
                ..
            }
        ),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("407") && err.contains("proxy_credentials_file"),
        "{err}"
    );
    // Credentials, but a target the proxy does not allow: its 403, quoted.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(&creds, "it:secret\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let p = p.with_credentials_file(&creds).unwrap();
    let err = http_connect(&p, "elsewhere.example:4433", LIMIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refused the tunnel") && err.contains("403 Forbidden"),
        "{err}"
    );
    let stats = proxy.stats();
    assert_eq!(
        (stats.auth_refused, stats.refused, stats.tunnels),
        (1, 1, 0)
    );
}
