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
    EvalMetrics, EvalReport, EvalRequest, FEDERATED_EVAL_VERSION, FeatureStats, FlatModel, Message,
    ModelHash, PROTOCOL_VERSION, PayloadDecoder, PayloadEncoder, PayloadHash, SignedEnvelope,
    SignedEvalReport, VersionRange, sign_eval_report,
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
        // Up to the version before evaluation requests: a raw site never
        // answers one unless its test does (the coordinator would wait for
        // it until the job's deadline), so it does not announce them.
        let versions = VersionRange {
            min: VersionRange::SUPPORTED.min,
            max: FEDERATED_EVAL_VERSION - 1,
        };
        Self::connect_speaking(kit, addr, transport, versions).await
    }

    /// Connect over QUIC speaking every version this build has, evaluation
    /// requests included: the test answers them
    /// ([`RawSite::next_eval_request`], [`RawSite::sign_eval`]).
    pub async fn connect_evaluating(kit: Kit, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::connect_speaking(kit, addr, TransportKind::Quic, VersionRange::SUPPORTED).await
    }

    /// Connect over `transport` speaking every version this build has
    /// (resumable transfers, evaluation requests): a job with evaluation on
    /// asks such a site to evaluate its final model and waits for the
    /// answer, so its test answers or turns `[evaluation] every_rounds` off.
    pub async fn connect_latest(
        kit: Kit,
        addr: SocketAddr,
        transport: TransportKind,
    ) -> anyhow::Result<Self> {
        Self::connect_speaking(kit, addr, transport, VersionRange::SUPPORTED).await
    }

    async fn connect_speaking(
        kit: Kit,
        addr: SocketAddr,
        transport: TransportKind,
        versions: VersionRange,
    ) -> anyhow::Result<Self> {
        let tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE)?;
        let fedlink_transport::Dialed { conn, endpoint } = fedlink_transport::dial(
            transport,
            addr,
            tls,
            kit.coordinator_server_name(),
            Duration::from_secs(10),
            fedlink_transport::Congestion::default(),
            Duration::from_secs(60),
        )
        .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.message(&Message::Hello(Hello {
            versions,
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

    /// Wait for the next evaluation request (other control messages are
    /// skipped).
    pub async fn next_eval_request(&mut self) -> anyhow::Result<EvalRequest> {
        loop {
            match bounded("evaluation request", self.control_recv.message()).await?? {
                Message::EvalRequest(r) => return Ok(*r),
                Message::Heartbeat(_) | Message::Cancel(_) => {}
                Message::AuditHead(h) => self.coordinator_heads.push(h),
                Message::RoundOutcome(o) => self.round_outcomes.push(o),
                other => bail!("expected an evaluation request, got {}", other.name()),
            }
        }
    }

    /// A report of `metrics` (any values) for `model` of `req`'s job,
    /// signed with this site's update key.
    pub fn sign_eval(
        &self,
        req: &EvalRequest,
        model: ModelHash,
        metrics: EvalMetrics,
    ) -> anyhow::Result<SignedEvalReport> {
        let key = self
            .kit
            .update_signing_key()
            .context("kit has no update key")?;
        Ok(sign_eval_report(
            key,
            EvalReport {
                protocol_version: PROTOCOL_VERSION,
                federation_id: req.federation_id.clone(),
                site_id: self.site_id.clone(),
                job_id: req.job_id.clone(),
                round: req.round,
                model,
                metrics,
            },
        ))
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

    /// Ask for model `hash` as the global update of `base`
    /// (`ModelUpdateFetch`, protocol >= 7): the first answer (an
    /// `UpdateManifest`, or a `ModelManifest` when the coordinator has no
    /// such update, or a `Reject`) and the chunk records it announces.
    pub async fn fetch_update(
        &self,
        hash: ModelHash,
        base: ModelHash,
    ) -> anyhow::Result<(Message, Vec<bytes::Bytes>)> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.message(&Message::ModelUpdateFetch(
            fedlink_protocol::ModelUpdateFetch {
                hash,
                base,
                from_record: 0,
            },
        ))
        .await?;
        send.finish()?;
        let first = bounded("manifest", recv.message()).await??;
        let n = match &first {
            Message::UpdateManifest(m) => m.num_chunks,
            Message::ModelManifest(m) => m.num_chunks,
            _ => 0,
        };
        let mut records = Vec::new();
        for _ in 0..n {
            records.push(bounded("chunk", recv.chunk()).await??);
        }
        Ok((first, records))
    }

    /// Fetch the offered model's chunk records from record `from` on
    /// (`ModelFetch` when `from` is 0, else `ModelFetchFrom`), at most
    /// `max` of them: the manifest and the records received.
    pub async fn fetch_records(
        &self,
        offer: &TaskOffer,
        from: u64,
        max: usize,
    ) -> anyhow::Result<(fedlink_protocol::ModelManifest, Vec<bytes::Bytes>)> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let msg = if from == 0 {
            Message::ModelFetch(ModelFetch {
                hash: offer.base_model,
            })
        } else {
            Message::ModelFetchFrom(fedlink_protocol::ModelFetchFrom {
                hash: offer.base_model,
                from_record: from,
            })
        };
        send.message(&msg).await?;
        send.finish()?;
        let manifest = match bounded("manifest", recv.message()).await?? {
            Message::ModelManifest(m) => *m,
            other => bail!("expected a manifest, got {other:?}"),
        };
        let left = manifest.num_chunks.saturating_sub(from);
        let n = usize::try_from(left)?.min(max);
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            records.push(bounded("model chunk", recv.chunk()).await??);
        }
        Ok((manifest, records))
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
        self.prepare_signed(offer, delta, num_examples, feature_stats, None)
    }

    /// Encode and sign `delta` for `offer`, with evaluation `metrics` (any
    /// values, valid or not) in the signed header.
    pub fn prepare_with_metrics(
        &self,
        offer: &TaskOffer,
        delta: &FlatModel,
        num_examples: u64,
        metrics: EvalMetrics,
    ) -> anyhow::Result<PreparedUpload> {
        self.prepare_signed(offer, delta, num_examples, None, Some(metrics))
    }

    fn prepare_signed(
        &self,
        offer: &TaskOffer,
        delta: &FlatModel,
        num_examples: u64,
        feature_stats: Option<FeatureStats>,
        metrics: Option<EvalMetrics>,
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
            metrics,
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

    /// Send the header, the first `records` records of `up` whole and the
    /// first `partial` bytes of the next one, then end the stream (what a
    /// connection cut mid-record leaves the coordinator), and return the
    /// coordinator's answer.
    pub async fn upload_cut(
        &self,
        up: &PreparedUpload,
        records: usize,
        partial: usize,
    ) -> anyhow::Result<UploadResult> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.message(&Message::DeltaUpload(Box::new(DeltaUpload {
            envelope: up.envelope.clone(),
        })))
        .await?;
        for r in up.records.iter().take(records) {
            send.chunk(r.clone()).await?;
        }
        let next = up.records.get(records).context("no record to cut")?;
        send.begin_chunk(next.len()).await?;
        send.chunk_body(next.get(..partial).unwrap_or(next).to_vec().into())
            .await?;
        send.finish_cut()?;
        match bounded("upload result of a cut upload", recv.message()).await?? {
            Message::UploadResult(r) => Ok(r),
            other => bail!("expected an upload result, got {other:?}"),
        }
    }

    /// Resume `up` (`ResumeUpload` with its envelope): the coordinator's
    /// progress (`None` if it refused at once), the bytes sent on this
    /// attempt, and its answer. With `cut = Some((k, partial))` the attempt
    /// sends the records up to (not including) `k` whole and `partial`
    /// bytes of record `k`, then ends the stream (a connection cut
    /// mid-record), as [`Self::upload_cut`] does.
    pub async fn resume_upload(
        &self,
        up: &PreparedUpload,
        cut: Option<(usize, usize)>,
    ) -> anyhow::Result<(Option<fedlink_protocol::UploadProgress>, u64, UploadResult)> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.message(&Message::ResumeUpload(Box::new(DeltaUpload {
            envelope: up.envelope.clone(),
        })))
        .await?;
        let progress = match bounded("upload progress", recv.message()).await?? {
            Message::UploadProgress(p) => p,
            Message::UploadResult(r) => return Ok((None, 0, r)),
            other => bail!("expected upload progress, got {other:?}"),
        };
        let from = usize::try_from(progress.records)?;
        let held: u64 = up.records.iter().take(from).map(|r| r.len() as u64).sum();
        anyhow::ensure!(
            held == progress.bytes,
            "progress {progress:?} vs {held} bytes"
        );
        let end = cut.map_or(up.records.len(), |(k, _)| k);
        let mut sent = 0u64;
        for r in up.records.get(from..end).unwrap_or_default() {
            sent += r.len() as u64;
            send.chunk(r.clone()).await?;
        }
        if let Some((k, partial)) = cut {
            let next = up.records.get(k).context("no record to cut")?;
            let piece = next.get(..partial).unwrap_or(next).to_vec();
            sent += piece.len() as u64;
            send.begin_chunk(next.len()).await?;
            send.chunk_body(piece.into()).await?;
        }
        send.finish_cut()?;
        match bounded("upload result", recv.message()).await?? {
            Message::UploadResult(r) => Ok((Some(progress), sent, r)),
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
