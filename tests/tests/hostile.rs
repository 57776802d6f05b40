//! What an unauthenticated or hostile peer can make the coordinator write
//! (issue 15, 1): failed handshakes are counted per source and recorded in
//! bulk, peer-supplied text is escaped and bounded before it reaches the
//! audit log, and a coordinator low on disk takes no new work and says so
//! once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use fedlink_certs::Kit;
use fedlink_test_util::TestPki;
use fedlink_tests::bounded;
use fedlink_tests::fixture::{JobSpec, RunningCoordinator, write_config, write_job};
use fedlink_tests::raw_site::RawSite;
use serde_json::Value;

fn entries(data_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(data_dir.join("audit/audit.jsonl"))
        .unwrap()
        .lines()
        // A line being written may be read half-way: skipped.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A coordinator with a job that waits for its sites, plus `extra` lines
/// in its config.
async fn start(pki: &TestPki, dir: &Path, extra: &str) -> RunningCoordinator {
    let job = write_job(dir, &JobSpec::default()).unwrap();
    let cfg = write_config(pki, dir, &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    if extra.contains("min_free_disk_mib") {
        // `extra` sets the reserve itself (a key may appear once).
        text = text
            .lines()
            .filter(|l| !l.starts_with("min_free_disk_mib"))
            .map(|l| format!("{l}\n"))
            .collect();
    }
    text.push_str(extra);
    std::fs::write(&cfg, text).unwrap();
    RunningCoordinator::start(&cfg, false).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_per_source_not_recorded_one_by_one() {
    const ATTEMPTS: usize = 40;
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&pki, dir.path(), "").await;
    let data_dir = coord.data_dir.clone();
    for _ in 0..ATTEMPTS {
        let revoked = Kit::load(pki.revoked_site_dir()).unwrap();
        assert!(RawSite::connect(revoked, coord.addr).await.is_err());
    }
    coord.shutdown().await.unwrap();
    let refused: Vec<Value> = entries(&data_dir)
        .into_iter()
        .filter(|e| e["event"] == "conn.refused")
        .collect();
    assert_eq!(refused.len(), 1, "one entry for the source: {refused:#?}");
    let d = &refused[0]["details"];
    assert_eq!(d["peer_addr"], "127.0.0.1");
    assert_eq!(d["stage"], "handshake");
    assert_eq!(d["count"], ATTEMPTS as u64);
    assert!(d["reason"].as_str().unwrap().contains("handshake"), "{d}");
    assert!(d["first_unix_ms"].as_u64() <= d["last_unix_ms"].as_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_close_reason_is_escaped_and_bounded_in_the_audit_log() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&pki, dir.path(), "").await;
    let data_dir = coord.data_dir.clone();
    let site = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
        .await
        .unwrap();
    let forged = format!(
        "bye\n{{\"event\":\"job.finished\"}}\u{1b}[2J{}",
        "x".repeat(10_000)
    );
    site.conn
        .close(quinn::VarInt::from_u32(0), forged.as_bytes());
    drop(site);
    // The coordinator records the end of the connection when it has seen
    // the site's close: wait for that entry (it always comes; the bound
    // only stops a hung test) before shutting down, which would otherwise
    // close the connection itself first.
    let closed = bounded("conn.closed of the site", async {
        loop {
            let closed: Vec<Value> = entries(&data_dir)
                .into_iter()
                .filter(|e| e["event"] == "conn.closed")
                .collect();
            if !closed.is_empty() {
                return closed;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    coord.shutdown().await.unwrap();
    assert_eq!(closed.len(), 1, "{closed:#?}");
    let reason = closed[0]["details"]["reason"].as_str().unwrap();
    assert!(reason.len() < 400, "{} bytes kept", reason.len());
    assert!(
        !reason.contains('\n') && !reason.contains('\u{1b}'),
        "{reason}"
    );
    assert!(reason.contains("bye\\n"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_on_disk_no_new_connections_and_one_audit_entry() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // More free space than any disk has: always "low".
    let coord = start(&pki, dir.path(), "min_free_disk_mib = 1000000000000\n").await;
    let data_dir = coord.data_dir.clone();
    for _ in 0..3 {
        let err = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
            .await
            .err()
            .expect("no connection while low on disk");
        assert!(format!("{err:#}").contains("disk space"), "{err:#}");
    }
    coord.shutdown().await.unwrap();
    let es = entries(&data_dir);
    let low: Vec<&Value> = es.iter().filter(|e| e["event"] == "disk.low").collect();
    assert_eq!(low.len(), 1, "{low:#?}");
    assert!(low[0]["details"]["free_bytes"].as_u64().is_some());
    // Nothing was accepted, so nothing else about the connections.
    assert!(!es.iter().any(|e| e["event"] == "conn.accepted"));
}

/// Issue 14 (2): a site with a valid certificate that floods its control
/// stream is cut off once it is past the budget (32 at once, 4 a second),
/// with the reason in the close and in `conn.closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_flooding_control_messages_is_cut_off() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&pki, dir.path(), "").await;
    let data_dir = coord.data_dir.clone();
    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
        .await
        .unwrap();
    let beat = |seq| {
        fedlink_protocol::Message::Heartbeat(fedlink_protocol::message::Heartbeat {
            seq,
            now_unix_ms: 0,
        })
    };
    let mut sent = 0u64;
    for seq in 0..100_000u64 {
        if site.send_control(&beat(seq)).await.is_err() {
            break;
        }
        sent += 1;
    }
    let reason = bounded("the coordinator cuts the flood", site.conn.closed())
        .await
        .unwrap();
    assert!(
        reason.to_string().contains("too many control messages"),
        "{reason}"
    );
    assert!(sent < 100_000, "all {sent} sent: never cut off");
    coord.shutdown().await.unwrap();
    let closed: Vec<Value> = entries(&data_dir)
        .into_iter()
        .filter(|e| e["event"] == "conn.closed")
        .collect();
    assert_eq!(closed.len(), 1, "{closed:#?}");
    assert!(
        closed[0]["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("too many control messages"),
        "{closed:#?}"
    );
}

/// Issue 14 (2): connections of one identity beyond
/// `max_connections_per_identity` are refused with a reason that says so,
/// counted with the source's refusals rather than recorded one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_identity_limit_are_refused() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&pki, dir.path(), "max_connections_per_identity = 1\n").await;
    let data_dir = coord.data_dir.clone();
    // Welcomed: counted (the count is taken before Hello is answered).
    let first = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
        .await
        .unwrap();
    for _ in 0..3 {
        let err = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
            .await
            .err()
            .expect("a second connection of site-0 is over the limit");
        assert!(
            format!("{err:#}").contains("max_connections_per_identity"),
            "{err:#}"
        );
    }
    drop(first);
    coord.shutdown().await.unwrap();
    let es = entries(&data_dir);
    assert_eq!(
        es.iter().filter(|e| e["event"] == "conn.accepted").count(),
        1
    );
    let refused: Vec<&Value> = es.iter().filter(|e| e["event"] == "conn.refused").collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(refused[0]["details"]["count"], 3);
}

/// A source address gets `handshake_burst_per_source` handshakes at once,
/// then `handshakes_per_source_per_sec`; beyond that its attempts are
/// refused before any cryptography (the client sees the refusal) and
/// counted with the source's refusals, not recorded one by one. The rate
/// here is one handshake per 1000 s, so the test does not depend on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_per_source_rate_are_refused() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(
        &pki,
        dir.path(),
        "handshake_burst_per_source = 3\nhandshakes_per_source_per_sec = 0.001\n",
    )
    .await;
    let data_dir = coord.data_dir.clone();
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(
            RawSite::connect(pki.site_kit(i).unwrap(), coord.addr)
                .await
                .unwrap(),
        );
    }
    for _ in 0..5 {
        let err = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
            .await
            .err()
            .expect("a fourth handshake from 127.0.0.1 is over the rate");
        assert!(format!("{err:#}").contains("refused"), "{err:#}");
    }
    drop(open);
    coord.shutdown().await.unwrap();
    let es = entries(&data_dir);
    assert_eq!(
        es.iter().filter(|e| e["event"] == "conn.accepted").count(),
        3
    );
    let refused: Vec<&Value> = es.iter().filter(|e| e["event"] == "conn.refused").collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    let d = &refused[0]["details"];
    assert_eq!(d["count"], 5);
    assert!(
        d.to_string().contains("handshakes_per_source_per_sec"),
        "{d}"
    );
}

/// A connection that completes its handshake and then says nothing is
/// closed after `hello_timeout_secs`, with the reason recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&pki, dir.path(), "hello_timeout_secs = 1\n").await;
    let data_dir = coord.data_dir.clone();
    let kit = pki.site_kit(0).unwrap();
    let tls = fedlink_certs::client_tls_config(&kit, fedlink_certs::ALPN_SITE).unwrap();
    let endpoint =
        fedlink_transport::client_endpoint(coord.addr, tls, std::time::Duration::from_secs(600))
            .unwrap();
    let conn = bounded(
        "handshake",
        endpoint
            .connect(coord.addr, kit.coordinator_server_name())
            .unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    // Silent: no control stream, no Hello. The coordinator ends it.
    let reason = bounded(
        "the coordinator closes the silent connection",
        conn.closed(),
    )
    .await
    .unwrap();
    coord.shutdown().await.unwrap();
    let closed: Vec<Value> = entries(&data_dir)
        .into_iter()
        .filter(|e| e["event"] == "conn.closed")
        .collect();
    assert_eq!(closed.len(), 1, "{reason}: {closed:#?}");
    assert!(
        closed[0]["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("hello_timeout_secs"),
        "{closed:#?}"
    );
}

/// A stream that starts a message and never finishes saying what it is for
/// is dropped after `stream_first_message_secs`; the connection lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_says_what_it_is_for_is_dropped() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&pki, dir.path(), "stream_first_message_secs = 1\n").await;
    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
        .await
        .unwrap();
    let (mut send, mut recv) = site.conn.quinn().unwrap().open_bi().await.unwrap();
    // One byte of a frame header: the stream exists, its message never comes.
    send.write_all(&[0x46]).await.unwrap();
    let end = bounded(
        "the coordinator drops the stream",
        recv.read_to_end(1 << 16),
    )
    .await
    .unwrap();
    assert!(
        end.as_ref().is_ok_and(Vec::is_empty) || end.is_err(),
        "the stream was answered: {end:?}"
    );
    // The connection itself is still served.
    site.send_control(&fedlink_protocol::Message::Heartbeat(
        fedlink_protocol::message::Heartbeat {
            seq: 1,
            now_unix_ms: 0,
        },
    ))
    .await
    .unwrap();
    assert!(
        site.conn.close_reason().is_none(),
        "{:?}",
        site.conn.close_reason()
    );
    coord.shutdown().await.unwrap();
}

/// A site may open 16 bidirectional streams at once (its control stream
/// among them); the next waits for the coordinator to grant more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_bounded() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(&pki, dir.path(), "").await;
    let site = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
        .await
        .unwrap();
    let mut open = Vec::new();
    for _ in 0..15 {
        let (mut send, recv) = bounded(
            "a stream within the limit",
            site.conn.quinn().unwrap().open_bi(),
        )
        .await
        .unwrap()
        .unwrap();
        send.write_all(&[0x46]).await.unwrap();
        open.push((send, recv));
    }
    // The 17th stream of the connection: no credit (waiting cannot make a
    // wrong answer right; it only delays a failure).
    let more = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        site.conn.quinn().unwrap().open_bi(),
    )
    .await;
    assert!(more.is_err(), "a 17th stream was opened");
    drop(open);
    coord.shutdown().await.unwrap();
}

/// Audit heads beyond `audit_head_burst` (then `audit_head_per_sec`) are
/// ignored: each recorded head is a signed, fsynced audit entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_heads_beyond_the_budget_are_ignored() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coord = start(
        &pki,
        dir.path(),
        "audit_head_burst = 3\naudit_head_per_sec = 0.001\n",
    )
    .await;
    let data_dir = coord.data_dir.clone();
    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), coord.addr)
        .await
        .unwrap();
    for seq in 0..10u64 {
        site.send_control(&fedlink_protocol::Message::AuditHead(
            fedlink_protocol::AuditHead {
                seq,
                hash: [1; 32],
                ts_unix_ms: 0,
                sig: [0; 64],
            },
        ))
        .await
        .unwrap();
    }
    // Then a message that is always recorded, to know the heads before it
    // were handled: a Bye ends the connection with its reason in conn.closed.
    site.send_control(&fedlink_protocol::Message::Bye(fedlink_protocol::Bye {
        reason: "done".into(),
    }))
    .await
    .unwrap();
    bounded("the coordinator ends the connection", site.conn.closed())
        .await
        .unwrap();
    coord.shutdown().await.unwrap();
    let heads = entries(&data_dir)
        .into_iter()
        .filter(|e| {
            e["event"]
                .as_str()
                .is_some_and(|ev| ev.starts_with("site.audit_head"))
        })
        .count();
    assert_eq!(heads, 3, "only the burst is recorded");
}

/// The coordinator executable refuses what restarting will not fix with
/// its own exit codes: a job file it cannot use with 2, a kit it cannot
/// read with 3, each naming what is wrong.
#[test]
fn unusable_job_and_kit_exit_with_their_codes() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = JobSpec::default().job();
    spec.rounds = 0;
    let job = fedlink_tests::fixture::write_job_file(dir.path(), &spec).unwrap();
    let cfg = write_config(&pki, dir.path(), &job, "127.0.0.1:0".parse().unwrap()).unwrap();
    let bin = fedlink_tests::fixture::workspace_binary("fedlink-coordinator").unwrap();
    let run = |cfg: &Path| {
        std::process::Command::new(&bin)
            .args(["serve", "--config"])
            .arg(cfg)
            .output()
            .unwrap()
    };
    let out = run(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("job: ") && err.contains("rounds"), "{err}");

    let text = std::fs::read_to_string(&cfg).unwrap();
    let kit = format!("kit = {:?}", pki.coordinator_dir());
    assert!(text.contains(&kit), "{text}");
    let no_kit = dir.path().join("no-kit");
    std::fs::write(&cfg, text.replace(&kit, &format!("kit = {no_kit:?}"))).unwrap();
    let out = run(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("TLS / kit: ") && err.contains("no-kit"),
        "{err}"
    );
}
