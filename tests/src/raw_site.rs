//! A scriptable site for end-to-end tests: speaks the real protocol over
//! real QUIC + mTLS with a real kit and real signatures, but lets a test
//! misbehave on purpose (tamper with a payload, replay an envelope, vanish in
//! the middle of an upload).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use fedlink_certs::{ALPN_SITE, Kit};
use fedlink_protocol::envelope::{UpdateHeader, UpdateNonce, sign_update};
use fedlink_protocol::message::{
    Capabilities, DeltaUpload, Hello, ModelFetch, OfferDecision, OfferResponse, TaskOffer,
    UploadResult,
};
use fedlink_protocol::{
    FeatureStats, FlatModel, Message, PROTOCOL_VERSION, PayloadDecoder, PayloadEncoder,
    PayloadHash, SignedEnvelope, VersionRange,
};
use fedlink_transport::{Conn, FramedRecv, FramedSend, TransportKind};

use crate::bounded;

/// A connected, welcomed site.
pub struct RawSite {
    kit: Kit,
    /// The connection (QUIC, or TLS over TCP).
    pub conn: Conn,
    _endpoint: Option<quinn::Endpoint>,
    control_send: FramedSend,
    control_recv: FramedRecv,
    site_id: fedlink_protocol::SiteId,
    /// The coordinator's audit heads received on the control stream so far
    /// (it pushes one after each round the site contributed to and at the
    /// job's end), as a real site would record them.
    pub coordinator_heads: Vec<fedlink_protocol::message::AuditHead>,
    /// Round outcomes the coordinator sent (the models this site's updates
    /// went into), in order.
    pub round_outcomes: Vec<fedlink_protocol::RoundOutcome>,
}

/// A signed update ready to send (kept so a test can send it twice).
#[derive(Clone, Debug)]
pub struct PreparedUpload {
    /// The signed envelope.
    pub envelope: SignedEnvelope,
    /// The payload chunk records.
    pub records: Vec<Vec<u8>>,
}

impl RawSite {
    /// Connect with `kit` to `addr` over QUIC, say Hello and expect Welcome.
    pub async fn connect(kit: Kit, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::connect_over(kit, addr, TransportKind::Quic).await
    }

    /// Connect with `kit` to `addr` over `transport` (QUIC, or TLS over TCP
    /// to the same port number), say Hello and expect Welcome.
    pub async fn connect_over(
        kit: Kit,
        addr: SocketAddr,
        transport: TransportKind,
    ) -> anyhow::Result<Self> {
        let tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE)?;
        let (conn, endpoint) = match transport {
            TransportKind::Quic => {
                let endpoint =
                    fedlink_transport::client_endpoint(addr, tls, Duration::from_secs(10))?;
                let conn = bounded(
                    "connect",
                    endpoint.connect(addr, kit.coordinator_server_name())?,
                )
                .await??;
                (Conn::from(conn), Some(endpoint))
            }
            TransportKind::Tcp => {
                let conn = fedlink_transport::tcp::connect(
                    addr,
                    std::sync::Arc::new(tls),
                    kit.coordinator_server_name(),
                    Duration::from_secs(10),
                )
                .await?;
                (Conn::from(conn), None)
            }
        };
        let (mut send, mut recv) = conn.open_bi().await?;
        send.message(&Message::Hello(Hello {
            versions: VersionRange::SUPPORTED,
            agent_version: "raw-test-site".into(),
            capabilities: Capabilities::default(),
        }))
        .await?;
        let site_id = match bounded("welcome", recv.message()).await?? {
            Message::Welcome(w) => w.site_id,
            other => bail!("expected Welcome, got {other:?}"),
        };
        Ok(Self {
            kit,
            conn,
            _endpoint: endpoint,
            control_send: send,
            control_recv: recv,
            site_id,
            coordinator_heads: Vec::new(),
            round_outcomes: Vec::new(),
        })
    }

    /// Wait for the next task offer (other control messages are skipped).
    pub async fn next_offer(&mut self) -> anyhow::Result<TaskOffer> {
        loop {
            match bounded("offer", self.control_recv.message()).await?? {
                Message::TaskOffer(o)
                | Message::TaskOfferV3(o)
                | Message::TaskOfferV5(o)
                | Message::TaskOfferV6(o) => {
                    return Ok(*o);
                }
                Message::Heartbeat(_) | Message::Cancel(_) => {}
                Message::AuditHead(h) => self.coordinator_heads.push(h),
                Message::RoundOutcome(o) => self.round_outcomes.push(o),
                other => bail!("expected an offer, got {}", other.name()),
            }
        }
    }

    /// Accept an offer.
    pub async fn accept(&mut self, offer: &TaskOffer) -> anyhow::Result<()> {
        self.control_send
            .message(&Message::OfferResponse(OfferResponse {
                job_id: offer.job_id.clone(),
                round: offer.round,
                decision: OfferDecision::Accept,
            }))
            .await?;
        Ok(())
    }

    /// Send any message on the control stream (a misbehaving site).
    pub async fn send_control(&mut self, msg: &Message) -> anyhow::Result<()> {
        self.control_send.message(msg).await?;
        Ok(())
    }

    /// Decline an offer with `reason`.
    pub async fn decline(&mut self, offer: &TaskOffer, reason: &str) -> anyhow::Result<()> {
        self.control_send
            .message(&Message::OfferResponse(OfferResponse {
                job_id: offer.job_id.clone(),
                round: offer.round,
                decision: OfferDecision::Decline {
                    reason: reason.to_owned(),
                },
            }))
            .await?;
        Ok(())
    }

    /// Download and verify the offered global model.
    pub async fn fetch_model(&self, offer: &TaskOffer) -> anyhow::Result<FlatModel> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.message(&Message::ModelFetch(ModelFetch {
            hash: offer.base_model,
        }))
        .await?;
        send.finish()?;
        let manifest = match bounded("manifest", recv.message()).await?? {
            Message::ModelManifest(m) => *m,
            other => bail!("expected a manifest, got {other:?}"),
        };
        let mut dec = PayloadDecoder::new(manifest.spec.clone(), manifest.encoding)?;
        let mut values = Vec::new();
        for _ in 0..manifest.num_chunks {
            let rec = bounded("model chunk", recv.chunk()).await??;
            values.extend(dec.decode_chunk(&rec)?.values);
        }
        dec.finish()?;
        let model = FlatModel::new(manifest.spec, values)?;
        if model.hash() != offer.base_model {
            bail!("downloaded model does not match the offered hash");
        }
        Ok(model)
    }

    /// Encode and sign `delta` for `offer`.
    pub fn prepare(
        &self,
        offer: &TaskOffer,
        delta: &FlatModel,
        num_examples: u64,
    ) -> anyhow::Result<PreparedUpload> {
        self.prepare_with_stats(offer, delta, num_examples, None)
    }

    /// Encode and sign `delta` for `offer`, with `feature_stats` (any
    /// values, valid or not) in the signed header.
    pub fn prepare_with_stats(
        &self,
        offer: &TaskOffer,
        delta: &FlatModel,
        num_examples: u64,
        feature_stats: Option<FeatureStats>,
    ) -> anyhow::Result<PreparedUpload> {
        let mut enc = PayloadEncoder::new(delta.spec().clone(), offer.encoding, 1)?;
        let mut records = Vec::new();
        while let Some(r) = enc.next_chunk() {
            let values = delta
                .values()
                .get(r.start as usize..r.end as usize)
                .context("delta shorter than its spec")?;
            records.push(enc.encode_chunk(values)?);
        }
        enc.finish()?;
        let mut hasher = blake3::Hasher::new();
        let mut len = 0u64;
        for r in &records {
            hasher.update(r);
            len += r.len() as u64;
        }
        let header = UpdateHeader {
            protocol_version: PROTOCOL_VERSION,
            federation_id: offer.federation_id.clone(),
            site_id: self.site_id.clone(),
            job_id: offer.job_id.clone(),
            round: offer.round,
            base_model: offer.base_model,
            num_examples,
            encoding: offer.encoding,
            payload_len: len,
            payload_hash: PayloadHash(*hasher.finalize().as_bytes()),
            nonce: UpdateNonce::random(&mut rand::rngs::OsRng),
            metrics: None,
            feature_stats,
        };
        let key = self
            .kit
            .update_signing_key()
            .context("kit has no update key")?;
        Ok(PreparedUpload {
            envelope: sign_update(key, header),
            records,
        })
    }

    /// Send an upload; send only the first `send_records` records if given
    /// (then reset the stream: a site vanishing mid-upload), and return the
    /// coordinator's answer (`None` if the stream was abandoned).
    pub async fn upload(
        &self,
        up: &PreparedUpload,
        send_records: Option<usize>,
    ) -> anyhow::Result<Option<UploadResult>> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.message(&Message::DeltaUpload(Box::new(DeltaUpload {
            envelope: up.envelope.clone(),
        })))
        .await?;
        let n = send_records.unwrap_or(up.records.len());
        if send_records.is_some() {
            for r in up.records.iter().take(n) {
                send.chunk(r.clone()).await?;
            }
            send.reset(quinn::VarInt::from_u32(1));
            return Ok(None);
        }
        // The coordinator may refuse on the header alone and stop the
        // stream while chunks are still going out: then its answer is
        // already on the way, read it.
        let mut sent = Ok(());
        for r in &up.records {
            if let Err(e) = send.chunk(r.clone()).await {
                sent = Err(e);
                break;
            }
        }
        if sent.is_ok() {
            sent = send.finish();
        }
        match bounded("upload result", recv.message()).await? {
            Ok(Message::UploadResult(r)) => Ok(Some(r)),
            Ok(other) => bail!("expected an upload result, got {other:?}"),
            Err(e) => {
                sent?;
                Err(e.into())
            }
        }
    }

    /// Send the header and the first `records` records of `up`, then stall
    /// (neither more records nor the end of the stream) and wait for the
    /// coordinator's answer: a slow or stuck sender.
    pub async fn upload_stalling(
        &self,
        up: &PreparedUpload,
        records: usize,
    ) -> anyhow::Result<UploadResult> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.message(&Message::DeltaUpload(Box::new(DeltaUpload {
            envelope: up.envelope.clone(),
        })))
        .await?;
        for r in up.records.iter().take(records) {
            send.chunk(r.clone()).await?;
        }
        let answer = bounded("upload result of a stalled upload", recv.message()).await??;
        drop(send);
        match answer {
            Message::UploadResult(r) => Ok(r),
            other => bail!("expected an upload result, got {other:?}"),
        }
    }

    /// Close the connection abruptly (no Bye).
    pub fn vanish(&self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"gone");
    }
}

/// Every site takes its next offer, accepts it and fetches the model it
/// names: the offers (in the sites' order) and the global model.
pub async fn join_round(sites: &mut [RawSite]) -> anyhow::Result<(Vec<TaskOffer>, FlatModel)> {
    let mut offers = Vec::with_capacity(sites.len());
    let mut global = None;
    for s in sites.iter_mut() {
        let offer = s.next_offer().await?;
        s.accept(&offer).await?;
        global = Some(s.fetch_model(&offer).await?);
        offers.push(offer);
    }
    let global = global.context("no site to join the round")?;
    Ok((offers, global))
}

/// `local − global`, element-wise, with the same spec.
pub fn delta_of(local: &FlatModel, global: &FlatModel) -> anyhow::Result<FlatModel> {
    let values = local
        .values()
        .iter()
        .zip(global.values())
        .map(|(a, b)| a - b)
        .collect();
    Ok(FlatModel::new(global.spec().clone(), values)?)
}
