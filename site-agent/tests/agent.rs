//! The agent against an in-test fake coordinator: real QUIC, real mutual TLS
//! (TestPki kits) on 127.0.0.1, real signatures, real training.
//!
//! The fake plays the coordinator's side of the conversation exactly:
//! Hello → Welcome, TaskOffer → OfferResponse, ModelFetch → ModelManifest +
//! chunks, DeltaUpload + chunks → UploadResult, Bye. Progress is observed
//! through the agent's audit-log events (a channel), never by sleeping;
//! timeouts are only safety nets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ed25519_dalek::VerifyingKey;
use ed25519_dalek::pkcs8::DecodePublicKey;
use fedlink_agent::audit::{Recorded, from_wire};
use fedlink_agent::data::tabular::{TabularConfig, load_tabular};
use fedlink_agent::device::DeviceChoice;
use fedlink_agent::{Agent, SiteConfig, sitecore, train};
use fedlink_certs::{RevocationList, server_tls_config};
use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::{
    Encoding, ExpectedUpdate, FeatureScaling, FederationId, FlatModel, JobId, Message,
    ModelManifest, OfferDecision, OfferResponse, Optimizer, PayloadDecoder, PrivacyRequirements,
    ReplayGuard, RoundId, SignedEnvelope, SiteId, TaskOffer, TrainingConfig, UploadResult,
    ValueCodec, Welcome, encode_payload, max_payload_len, verify_update,
};
use fedlink_test_util::TestPki;
use fedlink_transport::{FramedRecv, FramedSend, accept_bi, close, peer_identity, server_endpoint};
use quinn::{Connection, Endpoint};
use tokio::sync::{mpsc, oneshot};

/// Safety net for every wait (never reached when things work).
const LIMIT: Duration = Duration::from_secs(120);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------- the fake

struct FakeCoordinator {
    endpoint: Endpoint,
}

impl FakeCoordinator {
    fn try_bind(
        pki: &TestPki,
        addr: SocketAddr,
    ) -> Result<Self, fedlink_transport::TransportError> {
        let kit = pki.coordinator_kit().unwrap();
        let revocations = RevocationList::load(pki.revoked_path()).unwrap();
        let tls = server_tls_config(&kit, revocations).unwrap();
        let endpoint = server_endpoint(addr, tls, Duration::from_secs(10))?;
        Ok(Self { endpoint })
    }

    fn bind(pki: &TestPki, addr: SocketAddr) -> Self {
        Self::try_bind(pki, addr).unwrap()
    }

    fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap()
    }

    /// Accept one site: Hello → Welcome (protocol version 1).
    async fn accept(&self, heartbeat_ms: u64) -> SiteConn {
        self.accept_version(heartbeat_ms, 1).await
    }

    /// Accept one site: Hello → Welcome at protocol `version`.
    async fn accept_version(&self, heartbeat_ms: u64, version: u16) -> SiteConn {
        let incoming = within("a connection", self.endpoint.accept())
            .await
            .expect("endpoint closed");
        let conn = within("the handshake", incoming.into_future())
            .await
            .unwrap();
        let site = SiteId::new(peer_identity(&conn).unwrap().name()).unwrap();
        let (mut send, mut recv) = within("the control stream", accept_bi(&conn))
            .await
            .unwrap();
        let Message::Hello(hello) = within("Hello", recv.message()).await.unwrap() else {
            panic!("expected Hello")
        };
        assert!(hello.versions.contains(1));
        assert!(hello.agent_version.starts_with("fedlink-agent "));
        assert!(hello.versions.contains(version));
        send.message(&Message::Welcome(Welcome {
            protocol_version: version,
            site_id: site.clone(),
            federation_id: FederationId::new("testfed").unwrap(),
            heartbeat_interval_ms: heartbeat_ms,
        }))
        .await
        .unwrap();
        SiteConn {
            conn,
            site,
            send,
            recv,
            heartbeats: 0,
        }
    }
}

struct SiteConn {
    conn: Connection,
    site: SiteId,
    send: FramedSend,
    recv: FramedRecv,
    heartbeats: u64,
}

impl SiteConn {
    /// The next control message that is not a heartbeat.
    async fn next_control(&mut self) -> Message {
        loop {
            match within("a control message", self.recv.message())
                .await
                .unwrap()
            {
                Message::Heartbeat(_) => self.heartbeats += 1,
                other => return other,
            }
        }
    }

    async fn offer(&mut self, offer: &TaskOffer) -> OfferResponse {
        self.send
            .message(&Message::TaskOffer(Box::new(offer.clone())))
            .await
            .unwrap();
        match self.next_control().await {
            Message::OfferResponse(r) => {
                assert_eq!((&r.job_id, r.round), (&offer.job_id, offer.round));
                r
            }
            other => panic!("expected OfferResponse, got {other:?}"),
        }
    }

    /// Accept the next stream and return its first message.
    async fn next_stream(&self) -> (FramedSend, FramedRecv, Message) {
        let (send, mut recv) = within("a stream", accept_bi(&self.conn)).await.unwrap();
        let first = within("a request", recv.message()).await.unwrap();
        (send, recv, first)
    }

    /// Serve a ModelFetch for `model` (several chunks).
    async fn serve_model(mut send: FramedSend, request: &Message, model: &FlatModel) {
        let Message::ModelFetch(f) = request else {
            panic!("expected ModelFetch, got {request:?}")
        };
        assert_eq!(f.hash, model.hash());
        let enc = Encoding::default().with_chunk_bytes(16).unwrap();
        let (records, summary) = encode_payload(model, enc, 0).unwrap();
        assert!(records.len() > 1, "exercise several chunks");
        send.message(&Message::ModelManifest(Box::new(ModelManifest {
            hash: model.hash(),
            spec: model.spec().clone(),
            encoding: enc,
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
        })))
        .await
        .unwrap();
        for r in records {
            send.chunk(r).await.unwrap();
        }
        send.finish().unwrap();
    }

    /// Read a DeltaUpload's payload (after its first message).
    async fn read_upload(recv: &mut FramedRecv, request: Message) -> (SignedEnvelope, Vec<Bytes>) {
        let Message::DeltaUpload(up) = request else {
            panic!("expected DeltaUpload, got {request:?}")
        };
        let mut records = Vec::new();
        let mut len = 0;
        while len < up.envelope.header.payload_len {
            let r = within("a chunk", recv.chunk()).await.unwrap();
            len += r.len() as u64;
            records.push(r);
        }
        assert_eq!(len, up.envelope.header.payload_len);
        assert!(
            within("the end of the upload", recv.next_frame())
                .await
                .unwrap()
                .is_none(),
            "the site finishes its stream after the payload"
        );
        (up.envelope, records)
    }
}

// ---------------------------------------------------------------- fixtures

const DISTINCTIVE: &str = "123.4567";

/// 80 rows, 4 features, an id column, a label that depends on the features.
fn write_csv(dir: &Path) -> PathBuf {
    let mut text = String::from("id,a,b,c,d,y\n");
    for i in 0..80u32 {
        let a = if i == 0 {
            DISTINCTIVE.to_owned()
        } else {
            format!("{:.3}", f64::from(i % 13) * 0.7)
        };
        let b = f64::from((i * 7) % 11) - 5.0;
        let c = f64::from(i % 5) * 0.3;
        let d = f64::from((i * 3) % 17) / 4.0;
        let y = u32::from(b + c > -0.5);
        text.push_str(&format!("p{i},{a},{b},{c},{d},{y}\n"));
    }
    let path = dir.join("cohort.csv");
    std::fs::write(&path, text).unwrap();
    path
}

struct Site {
    _dir: tempfile::TempDir,
    config: SiteConfig,
    tabular: TabularConfig,
}

fn site(pki: &TestPki, addr: SocketAddr, connect_timeout_ms: u64) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path());
    let text = format!(
        r#"
kit_dir = "{kit}"
data_dir = "state"
device = "cpu"
coordinator_addr = "{addr}"

[connection]
backoff_initial_ms = 10
backoff_max_ms = 50
connect_timeout_ms = {connect_timeout_ms}
idle_timeout_ms = 10000

[dataset]
kind = "csv"
path = "{csv}"
label_column = "y"
drop_columns = ["id"]
validation_fraction = 0.25
split_seed = 3

[policy]
federations = ["testfed"]
architectures = ["logreg"]
min_local_samples = 10
max_epochs = 5
encodings = ["f32", "f16"]
"#,
        kit = pki.site_dir(0).unwrap().display(),
        csv = csv.display(),
    );
    // Also on disk, for the `fedlink-agent` binary.
    std::fs::write(dir.path().join("site.toml"), &text).unwrap();
    let config = SiteConfig::parse(&text, Path::new("site.toml"), dir.path()).unwrap();
    let fedlink_agent::config::DatasetConfig::Csv(tabular) = config.dataset.clone() else {
        panic!("csv")
    };
    Site {
        _dir: dir,
        config,
        tabular,
    }
}

struct Running {
    events: mpsc::UnboundedReceiver<Recorded>,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), fedlink_agent::AgentError>>,
}

impl Running {
    fn start(config: SiteConfig) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(Agent::new(config).with_events(tx).run(async {
            let _ = stopped.await;
        }));
        Self {
            events,
            stop: Some(stop),
            handle,
        }
    }

    /// The next audit-log entry named `event` (earlier ones are skipped).
    async fn wait_for(&mut self, event: &str) -> Recorded {
        loop {
            let e = within(event, self.events.recv())
                .await
                .unwrap_or_else(|| panic!("agent stopped before {event}"));
            if e.event == event {
                return e;
            }
        }
    }

    /// Request shutdown; the coordinator side must see `Bye`, the agent
    /// must return `Ok`.
    async fn stop_and_expect_bye(mut self, sc: &mut SiteConn) {
        let _ = self.stop.take().unwrap().send(());
        match sc.next_control().await {
            Message::Bye(b) => assert!(b.reason.contains("shutting down")),
            other => panic!("expected Bye, got {other:?}"),
        }
        within("the agent to stop", self.handle)
            .await
            .unwrap()
            .unwrap();
        let _ = self.events;
    }
}

fn arch() -> ArchSpec {
    ArchSpec::LogReg {
        inputs: 4,
        classes: 2,
    }
}

fn offer(round: u64, base: &FlatModel) -> TaskOffer {
    TaskOffer {
        federation_id: FederationId::new("testfed").unwrap(),
        job_id: JobId::new("job-1").unwrap(),
        round: RoundId(round),
        base_model: base.hash(),
        arch: arch(),
        training: TrainingConfig {
            epochs: 2,
            batch_size: 8,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            learning_rate: 0.1,
            fedprox_mu: 0.0,
            seed: 5,
            augmentation: None,
            class_weight: Default::default(),
        },
        encoding: Encoding::default().with_chunk_bytes(16).unwrap(),
        privacy: PrivacyRequirements::default(),
        deadline_unix_ms: unix_ms() + 600_000,
        scaling: None,
    }
}

fn update_public_key(pki: &TestPki) -> VerifyingKey {
    let kit = pki.site_kit(0).unwrap();
    let file = kit.info().update_public_key.clone().unwrap();
    VerifyingKey::from_public_key_pem(&std::fs::read_to_string(kit.dir().join(file)).unwrap())
        .unwrap()
}

/// Verify the envelope as the coordinator would and decode the delta.
fn verify_and_decode(
    pki: &TestPki,
    site: &SiteId,
    offer: &TaskOffer,
    envelope: &SignedEnvelope,
    records: &[Bytes],
) -> Vec<f32> {
    let keys = BTreeMap::from([(site.clone(), update_public_key(pki))]);
    let spec = offer.arch.spec().unwrap();
    let expected = ExpectedUpdate {
        federation_id: offer.federation_id.clone(),
        job_id: offer.job_id.clone(),
        round: offer.round,
        base_model: offer.base_model,
        encoding: Some(offer.encoding),
        max_payload_len: max_payload_len(&spec, &offer.encoding),
    };
    let mut replay = ReplayGuard::new();
    let mut verifier = verify_update(envelope, site, &keys, &expected, &mut replay).unwrap();
    let mut decoder = PayloadDecoder::new(spec, offer.encoding).unwrap();
    let mut values = Vec::new();
    for r in records {
        verifier.update(r).unwrap();
        values.extend(decoder.decode_chunk(r).unwrap().values);
    }
    verifier.finish().unwrap();
    decoder.finish().unwrap();
    values
}

/// What the site should have computed: local − global, trained the same way
/// (on its data standardised with the offer's scaling, if any).
fn expected_delta(tabular: &TabularConfig, offer: &TaskOffer, global: &FlatModel) -> Vec<f32> {
    let loaded = load_tabular(tabular).unwrap();
    let data = match &offer.scaling {
        Some(s) => loaded.standardize(s).unwrap(),
        None => loaded.data,
    };
    let cfg = sitecore::train_config(&offer.training).unwrap();
    let device = DeviceChoice::Cpu.resolve().unwrap().device;
    let (local, _) = train::train_local(&offer.arch, global, &data.train, &cfg, &device).unwrap();
    local
        .values()
        .iter()
        .zip(global.values())
        .map(|(l, g)| l - g)
        .collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_by_policy_then_trains_uploads_and_uses_the_model_cache() {
    let pki = TestPki::new(1).unwrap();
    let fake = FakeCoordinator::bind(&pki, "127.0.0.1:0".parse().unwrap());
    let site_cfg = site(&pki, fake.addr(), 10_000);
    let log_path = site_cfg.config.audit_log_path();
    let cache_dir = site_cfg.config.model_cache_dir();
    let mut agent = Running::start(site_cfg.config.clone());

    let mut sc = fake.accept(50).await;
    assert_eq!(sc.site.as_str(), "site-0");
    agent.wait_for("conn.established").await;
    let global = arch().init(7).unwrap();

    // 1. Policy refusals: wrong architecture, too many epochs, encoding.
    let mut mlp = offer(1, &global);
    mlp.arch = ArchSpec::Mlp {
        inputs: 4,
        hidden: vec![3],
        classes: 2,
    };
    let r = sc.offer(&mlp).await;
    let OfferDecision::Decline { reason } = r.decision else {
        panic!("mlp must be declined")
    };
    assert!(reason.contains("mlp"), "{reason}");
    let logged = agent.wait_for("offer.declined").await;
    assert_eq!(logged.details["reason"], reason.as_str());

    let mut long = offer(1, &global);
    long.training.epochs = 10;
    let OfferDecision::Decline { reason } = sc.offer(&long).await.decision else {
        panic!("10 epochs must be declined")
    };
    assert!(reason.contains("10 epochs"), "{reason}");

    let mut int8 = offer(1, &global);
    int8.encoding = Encoding::with_codec(ValueCodec::Int8 { stochastic: false }).unwrap();
    let OfferDecision::Decline { reason } = sc.offer(&int8).await.decision else {
        panic!("int8 must be declined")
    };
    assert!(reason.contains("int8"), "{reason}");

    // 2. A good offer: accept, fetch, train, upload.
    let good = offer(1, &global);
    assert_eq!(sc.offer(&good).await.decision, OfferDecision::Accept);
    let (send, _recv, request) = sc.next_stream().await;
    SiteConn::serve_model(send, &request, &global).await;
    let model = agent.wait_for("model.received").await;
    assert_eq!(model.details["from_cache"], false);
    assert_eq!(model.details["model"], global.hash().to_hex());
    assert!(
        cache_dir
            .join(format!("{}.fedmodel", global.hash().to_hex()))
            .is_file()
    );

    let (mut up_send, mut up_recv, request) = sc.next_stream().await;
    let (envelope, records) = SiteConn::read_upload(&mut up_recv, request).await;
    let h = &envelope.header;
    assert_eq!(h.site_id, sc.site);
    assert_eq!(h.round, RoundId(1));
    assert_eq!(h.base_model, global.hash());
    assert_eq!(h.encoding, good.encoding);
    let data = load_tabular(&site_cfg.tabular).unwrap().data;
    assert_eq!(h.num_examples, data.train.len() as u64);
    let metrics = h.metrics.as_ref().expect("global-model metrics are sent");
    assert_eq!(metrics.num_eval_examples, data.validation.len() as u64);
    assert!(metrics.loss.unwrap().is_finite());
    assert!(metrics.auc.is_some(), "binary task: AUC");
    let delta = verify_and_decode(&pki, &sc.site, &good, &envelope, &records);
    let want = expected_delta(&site_cfg.tabular, &good, &global);
    assert_eq!(delta, want, "decoded delta = local − global (lossless f32)");
    assert!(delta.iter().any(|v| *v != 0.0));
    up_send
        .message(&Message::UploadResult(UploadResult::Ack {
            payload_hash: h.payload_hash,
            accepted: true,
        }))
        .await
        .unwrap();
    up_send.finish().unwrap();
    let sent = agent.wait_for("update.sent").await;
    assert_eq!(sent.details["payload_hash"], h.payload_hash.to_hex());
    assert_eq!(sent.details["payload_bytes"], h.payload_len);
    assert_eq!(sent.details["nonce"], hex::encode(h.nonce.0));
    assert_eq!(sent.details["num_examples"], h.num_examples);
    assert_eq!(sent.details["base_model"], global.hash().to_hex());
    let result = agent.wait_for("update.result").await;
    assert_eq!(result.details["outcome"], "ack");
    assert_eq!(result.details["accepted"], true);
    assert_eq!(result.details["nonce"], sent.details["nonce"]);

    // 3. Round 2 on the same global model: served from the cache, so the
    //    next stream is the upload, not a fetch. The coordinator rejects it.
    let mut again = offer(2, &global);
    again.encoding = Encoding::with_codec(ValueCodec::F16).unwrap();
    assert_eq!(sc.offer(&again).await.decision, OfferDecision::Accept);
    let cached = agent.wait_for("model.received").await;
    assert_eq!(cached.details["from_cache"], true);
    let (mut up_send, mut up_recv, request) = sc.next_stream().await;
    assert!(
        matches!(request, Message::DeltaUpload(_)),
        "cached model must not be fetched again, got {request:?}"
    );
    let (envelope, records) = SiteConn::read_upload(&mut up_recv, request).await;
    assert_eq!(envelope.header.round, RoundId(2));
    let f16_delta = verify_and_decode(&pki, &sc.site, &again, &envelope, &records);
    let want = expected_delta(&site_cfg.tabular, &again, &global);
    let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (got, w) in f16_delta.iter().zip(&want) {
        assert!((got - w).abs() <= 1e-3 * spread.max(1e-6), "{got} vs {w}");
    }
    up_send
        .message(&Message::UploadResult(UploadResult::Reject {
            code: fedlink_protocol::RejectCode::TooLate,
            message: "round closed".into(),
        }))
        .await
        .unwrap();
    let result = agent.wait_for("update.result").await;
    assert_eq!(result.details["outcome"], "reject");
    assert_eq!(result.details["accepted"], false);
    assert!(
        result.details["reason"]
            .as_str()
            .unwrap()
            .contains("round closed")
    );

    // Heartbeats flowed at the 50 ms interval meanwhile; wait for one more.
    let before = sc.heartbeats;
    match within("a heartbeat", sc.recv.message()).await.unwrap() {
        Message::Heartbeat(hb) => assert!(hb.seq > before, "seq counts up"),
        other => panic!("unexpected {other:?}"),
    }

    // 4. Shutdown: the agent says Bye and stops cleanly.
    agent.stop_and_expect_bye(&mut sc).await;

    // The audit log verifies with the kit's update key, tells the story in
    // order, and holds no data values.
    let report = fedlink_audit::verify(&[&log_path], &update_public_key(&pki), None).unwrap();
    let log: Vec<fedlink_audit::Entry> = fedlink_audit::EntryReader::new(&[&log_path])
        .map(|e| e.unwrap().entry)
        .collect();
    assert_eq!(report.entries, log.len() as u64);
    let names: Vec<&str> = log.iter().map(|e| e.event.as_str()).collect();
    let order = [
        "agent.started",
        "conn.established",
        "offer.received",
        "offer.declined",
        "offer.accepted",
        "model.received",
        "train.completed",
        "update.sent",
        "update.result",
        "model.received",
        "update.result",
        "agent.stopped",
    ];
    let mut pos = 0;
    for want in order {
        pos += names[pos..]
            .iter()
            .position(|n| *n == want)
            .unwrap_or_else(|| panic!("{want} missing after position {pos} in {names:?}"));
        pos += 1;
    }
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !text.contains(DISTINCTIVE),
        "no data values in the audit log"
    );
    let trained = log.iter().find(|e| e.event == "train.completed").unwrap();
    assert_eq!(
        trained.details["dataset_fingerprint"],
        data.fingerprint.to_string()
    );
    assert_eq!(trained.details["metrics"]["epochs"], 2);
    assert_eq!(trained.details["num_examples"], data.train.len());
    // the offer's optimizer and learning rate are on record
    let received = log.iter().find(|e| e.event == "offer.received").unwrap();
    assert_eq!(received.details["optimizer"]["Sgd"]["momentum"], 0.0);
    assert_eq!(received.details["learning_rate"], 0.1);
    // who caused what
    let site_uri = "fedlink://testfed/site/site-0";
    let actor = |name: &str| log.iter().find(|e| e.event == name).unwrap().actor.clone();
    assert_eq!(actor("update.sent"), site_uri);
    assert_eq!(actor("offer.declined"), site_uri);
    assert!(actor("offer.received").contains("/coordinator/"));
    assert!(actor("update.result").contains("/coordinator/"));
    // version 1: no audit heads were exchanged
    assert!(!names.contains(&"coordinator.audit_head"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_protocol_2_audit_heads_are_exchanged_after_each_upload_result() {
    let pki = TestPki::new(1).unwrap();
    let fake = FakeCoordinator::bind(&pki, "127.0.0.1:0".parse().unwrap());
    let site_cfg = site(&pki, fake.addr(), 10_000);
    let log_path = site_cfg.config.audit_log_path();
    let mut agent = Running::start(site_cfg.config.clone());
    let mut sc = fake.accept_version(60_000, 2).await;
    let global = arch().init(3).unwrap();

    let good = offer(1, &global);
    assert_eq!(sc.offer(&good).await.decision, OfferDecision::Accept);
    let (send, _recv, request) = sc.next_stream().await;
    SiteConn::serve_model(send, &request, &global).await;
    let (mut up_send, mut up_recv, request) = sc.next_stream().await;
    let (envelope, _records) = SiteConn::read_upload(&mut up_recv, request).await;
    up_send
        .message(&Message::UploadResult(UploadResult::Ack {
            payload_hash: envelope.header.payload_hash,
            accepted: true,
        }))
        .await
        .unwrap();
    assert_eq!(envelope.header.protocol_version, 2);
    let result = agent.wait_for("update.result").await;

    // The site's head follows the result and vouches for it.
    let Message::AuditHead(head) = sc.next_control().await else {
        panic!("expected the site's AuditHead")
    };
    assert_eq!(head.seq, result.seq);
    let key = update_public_key(&pki);
    assert!(from_wire(&head).signature_ok(&key));

    // The coordinator answers with its own head: recorded as received.
    let coord_key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    let coord_head = fedlink_audit::SignedHead::sign(
        &coord_key,
        fedlink_audit::EntryHead {
            seq: 41,
            hash: fedlink_audit::EntryHash([6; 32]),
        },
        unix_ms(),
    );
    let wire = fedlink_agent::audit::to_wire(&coord_head).unwrap();
    sc.send.message(&Message::AuditHead(wire)).await.unwrap();
    let recorded = agent.wait_for("coordinator.audit_head").await;
    assert_eq!(recorded.details["seq"], 41);
    assert_eq!(recorded.details["hash"], "06".repeat(32));
    assert_eq!(recorded.details["sig"], coord_head.sig);
    assert!(recorded.actor.contains("/coordinator/"));
    agent.stop_and_expect_bye(&mut sc).await;

    // The head the site sent is one the whole log still contains.
    fedlink_audit::verify(&[&log_path], &key, Some(&from_wire(&head))).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_dropped_connection_and_a_coordinator_restart() {
    let pki = TestPki::new(1).unwrap();
    let fake = FakeCoordinator::bind(&pki, "127.0.0.1:0".parse().unwrap());
    let addr = fake.addr();
    let site_cfg = site(&pki, addr, 2_000);
    let mut agent = Running::start(site_cfg.config.clone());

    let sc = fake.accept(1_000).await;
    agent.wait_for("conn.established").await;
    // The coordinator drops the connection: the agent notices, backs off,
    // and says Hello again on a new connection.
    sc.conn.close(close::SHUTDOWN, b"restarting");
    drop(sc);
    let lost = agent.wait_for("conn.lost").await;
    assert!(lost.details["retry_in_ms"].as_u64().unwrap() <= 50);
    let sc2 = fake.accept(1_000).await;
    agent.wait_for("conn.established").await;

    // The whole coordinator goes away and comes back on the same port.
    sc2.conn.close(close::SHUTDOWN, b"stopping");
    fake.endpoint.close(close::SHUTDOWN, b"stopping");
    within("the old endpoint to go idle", fake.endpoint.wait_idle()).await;
    drop(sc2);
    drop(fake);
    agent.wait_for("conn.lost").await;
    let fake = within("the port to be free again", async {
        loop {
            // The old socket is released once its driver task ends.
            match FakeCoordinator::try_bind(&pki, addr) {
                Ok(f) => break f,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    let mut sc3 = fake.accept(1_000).await;
    agent.wait_for("conn.established").await;
    agent.stop_and_expect_bye(&mut sc3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_the_coordinator_connects_when_it_comes_up() {
    let pki = TestPki::new(1).unwrap();
    // A free port on which nothing listens yet.
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let site_cfg = site(&pki, addr, 200);
    let mut agent = Running::start(site_cfg.config.clone());
    // At least one attempt failed (connect timeout) before the coordinator
    // exists.
    let first = agent.wait_for("conn.lost").await;
    assert!(
        first.details["reason"]
            .as_str()
            .unwrap()
            .contains("Welcome")
            || first.details["reason"]
                .as_str()
                .unwrap()
                .contains("connect"),
        "{first:?}"
    );
    let fake = FakeCoordinator::bind(&pki, addr);
    let mut sc = fake.accept(1_000).await;
    let connected = agent.wait_for("conn.established").await;
    assert_eq!(connected.details["site_id"], "site-0");
    assert_eq!(connected.details["federation"], "testfed");
    agent.stop_and_expect_bye(&mut sc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_round_is_dropped_and_the_site_takes_the_next_offer() {
    let pki = TestPki::new(1).unwrap();
    let fake = FakeCoordinator::bind(&pki, "127.0.0.1:0".parse().unwrap());
    let site_cfg = site(&pki, fake.addr(), 10_000);
    let mut agent = Running::start(site_cfg.config.clone());
    let mut sc = fake.accept(1_000).await;
    let global = arch().init(11).unwrap();

    // Accept round 1, then cancel it before serving the model.
    let r1 = offer(1, &global);
    assert_eq!(sc.offer(&r1).await.decision, OfferDecision::Accept);
    let (_fetch_send, _fetch_recv, request) = sc.next_stream().await;
    assert!(matches!(request, Message::ModelFetch(_)));
    sc.send
        .message(&Message::Cancel(fedlink_protocol::Cancel {
            job_id: r1.job_id.clone(),
            round: r1.round,
            reason: "round closed".into(),
        }))
        .await
        .unwrap();
    let cancelled = agent.wait_for("round.cancelled").await;
    assert_eq!(cancelled.details["dropped_work"], true);

    // Another job is not refused as "busy": the site is free again.
    let mut r2 = offer(1, &global);
    r2.job_id = JobId::new("job-2").unwrap();
    assert_eq!(sc.offer(&r2).await.decision, OfferDecision::Accept);
    let (send, _recv, request) = sc.next_stream().await;
    SiteConn::serve_model(send, &request, &global).await;
    let (mut up_send, mut up_recv, request) = sc.next_stream().await;
    let (envelope, _records) = SiteConn::read_upload(&mut up_recv, request).await;
    assert_eq!(envelope.header.job_id, r2.job_id);
    up_send
        .message(&Message::UploadResult(UploadResult::Ack {
            payload_hash: envelope.header.payload_hash,
            accepted: true,
        }))
        .await
        .unwrap();
    agent.wait_for("update.result").await;
    agent.stop_and_expect_bye(&mut sc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offered_scaling_is_applied_and_raw_feature_sums_are_signed() {
    let pki = TestPki::new(1).unwrap();
    let fake = FakeCoordinator::bind(&pki, "127.0.0.1:0".parse().unwrap());
    let site_cfg = site(&pki, fake.addr(), 10_000);
    let loaded = load_tabular(&site_cfg.tabular).unwrap();
    let mut agent = Running::start(site_cfg.config.clone());
    let mut sc = fake.accept(1_000).await;
    let global = arch().init(5).unwrap();

    // A scaling of other columns is declined with a clear reason.
    let mut wrong = offer(1, &global);
    wrong.scaling = Some(FeatureScaling {
        features: vec!["a".into(), "b".into(), "d".into(), "c".into()],
        mean: vec![0.0; 4],
        std: vec![1.0; 4],
    });
    let OfferDecision::Decline { reason } = sc.offer(&wrong).await.decision else {
        panic!("a scaling of other columns must be declined")
    };
    assert!(reason.contains("feature scaling"), "{reason}");
    assert!(reason.contains(r#"["a", "b", "c", "d"]"#), "{reason}");

    // The federation's scaling (far from the local statistics) is applied.
    let mut good = offer(1, &global);
    let scaling = FeatureScaling {
        features: loaded.features().to_vec(),
        mean: vec![3.0, -1.0, 0.2, 2.5],
        std: vec![2.5, 4.0, 0.5, 1.5],
    };
    assert_ne!(scaling.mean, loaded.scaling.mean);
    good.scaling = Some(scaling);
    assert_eq!(sc.offer(&good).await.decision, OfferDecision::Accept);
    let (send, _recv, request) = sc.next_stream().await;
    SiteConn::serve_model(send, &request, &global).await;
    let (mut up_send, mut up_recv, request) = sc.next_stream().await;
    let (envelope, records) = SiteConn::read_upload(&mut up_recv, request).await;

    // The signed header carries the raw sums of the training split, and the
    // global model was evaluated on the validation split as standardised
    // with the offered scaling.
    let h = &envelope.header;
    let stats = h
        .feature_stats
        .as_ref()
        .expect("tabular sites report stats");
    assert_eq!(stats, &loaded.stats);
    assert_eq!(stats.count, h.num_examples);
    assert_eq!(stats.features, vec!["a", "b", "c", "d"]);
    let raw_a: f64 = {
        let text = std::fs::read_to_string(&site_cfg.tabular.path).unwrap();
        let rows: Vec<f32> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        let (train, _) = fedlink_agent::data::split_indices(rows.len(), 0.25, 3);
        train.iter().map(|&i| f64::from(rows[i])).sum()
    };
    assert!(
        (stats.sum[0] - raw_a).abs() < 1e-9 * raw_a.abs(),
        "{} vs {raw_a}",
        stats.sum[0]
    );
    let standardized = loaded.standardize(good.scaling.as_ref().unwrap()).unwrap();
    let device = DeviceChoice::Cpu.resolve().unwrap().device;
    let on_fed = train::evaluate(&good.arch, &global, &standardized.validation, &device).unwrap();
    let metrics = h.metrics.as_ref().unwrap();
    assert_eq!(metrics.loss, Some(on_fed.loss));
    let delta = verify_and_decode(&pki, &sc.site, &good, &envelope, &records);
    assert_eq!(delta, expected_delta(&site_cfg.tabular, &good, &global));
    let mut local_offer = good.clone();
    local_offer.scaling = None;
    assert_ne!(
        delta,
        expected_delta(&site_cfg.tabular, &local_offer, &global),
        "the offered scaling made a difference"
    );
    up_send
        .message(&Message::UploadResult(UploadResult::Ack {
            payload_hash: h.payload_hash,
            accepted: true,
        }))
        .await
        .unwrap();
    let trained = agent.wait_for("train.completed").await;
    assert_eq!(trained.details["feature_scaling"], "federated");
    let sent = agent.wait_for("update.sent").await;
    assert_eq!(sent.details["feature_stats"], true);
    agent.wait_for("update.result").await;
    agent.stop_and_expect_bye(&mut sc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_readable_kit_key_is_refused_with_a_kit_error() {
    let pki = TestPki::new(1).unwrap();
    let site_cfg = site(&pki, "127.0.0.1:9".parse().unwrap(), 200);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let kit = pki.site_dir(0).unwrap();
        let key = kit.join(fedlink_certs::KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = fedlink_agent::run(site_cfg.config.clone(), std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 3, "{err}");
        assert!(err.to_string().contains("key.pem"), "{err}");
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_data_dir_is_made_owner_only_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    let pki = TestPki::new(1).unwrap();
    let site_cfg = site(&pki, "127.0.0.1:9".parse().unwrap(), 200);
    let data = site_cfg.config.data_dir.clone();
    let models = site_cfg.config.model_cache_dir();
    std::fs::create_dir_all(&models).unwrap();
    let old = models.join("left-over");
    std::fs::write(&old, b"x").unwrap();
    chmod(&data, 0o755);
    chmod(&models, 0o755);
    chmod(&old, 0o644);
    // Shut down at once: only the start-up (kit, data_dir, data) runs.
    within(
        "the agent to start and stop",
        fedlink_agent::run(site_cfg.config.clone(), std::future::ready(())),
    )
    .await
    .unwrap();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&models), 0o700);
    assert_eq!(mode(&old), 0o600);
    assert_eq!(mode(&site_cfg.config.audit_log_path()), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dataset_is_a_config_error_not_restarted() {
    let pki = TestPki::new(1).unwrap();
    let site_cfg = site(&pki, "127.0.0.1:9".parse().unwrap(), 200);
    let fedlink_agent::config::DatasetConfig::Csv(t) = &site_cfg.config.dataset else {
        panic!("csv")
    };
    std::fs::remove_file(&t.path).unwrap();
    let err = within(
        "the agent to fail",
        fedlink_agent::run(site_cfg.config.clone(), std::future::pending()),
    )
    .await
    .unwrap_err();
    // 2: the systemd unit's RestartPreventExitStatus (a fix is needed).
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("cohort.csv"), "{err}");
}

#[test]
fn check_config_loads_the_kit_and_the_dataset() {
    let pki = TestPki::new(1).unwrap();
    let site_cfg = site(&pki, "127.0.0.1:9".parse().unwrap(), 200);
    let toml = site_cfg._dir.path().join("site.toml");
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedlink-agent"))
            .args(["check-config", "--config"])
            .arg(&toml)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = check();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("60 training + 20 validation samples"),
        "{stdout}"
    );
    assert!(stdout.contains("fedlink://testfed/site/"), "{stdout}");
    // Nothing is written: no data_dir, no audit log.
    assert!(!site_cfg.config.data_dir.exists());

    // A missing dataset: exit 2, naming the file.
    std::fs::remove_file(&site_cfg.tabular.path).unwrap();
    let (code, stdout, stderr) = check();
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("cohort.csv"), "{stderr}");

    // A world-readable kit key: exit 3.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = pki.site_dir(0).unwrap().join(fedlink_certs::KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, stdout, stderr) = check();
        assert_eq!(code, Some(3), "{stdout}{stderr}");
        assert!(stderr.contains("key.pem"), "{stderr}");
    }
}
