//! A seeded simulation of one site's whole task, driven like the agent's
//! driver drives the core, against an in-memory coordinator that answers
//! with real protocol messages and checks what it receives with the real
//! protocol functions (`verify_update`, the payload verifier, the replay
//! guard, `decode_payload`):
//!
//! offer (`SiteCore`) → download (`Download`: the whole model, or the
//! update of the model the site holds; cut and resumed) → train (the
//! deterministic trainer, no burn) → delta → clip/noise → `train.completed`
//! → seal → `update.sent` → upload (cut; resumed, or refused as `Replay`
//! by a coordinator that kept nothing and signed again) → the answer's
//! `update.result`.
//!
//! Around it, seeded: an older round of the job accepted first and
//! superseded by this offer, the offer repeated mid-task, another job's
//! offer declined as busy, a `Cancel` of another round, and a `Cancel` of
//! this round after its answer (the work not yet reported finished); each
//! handled as the driver handles it, with the records `SiteCore` returns.
//!
//! Checked after every step: an audit record precedes every send or action
//! it describes (`offer.received` and `offer.accepted` / `offer.declined`
//! the answer to the offer, with the same ids and decision;
//! `round.cancelled` with `dropped_work` exactly when the work on that
//! round is dropped, just before); only the work in progress is dropped;
//! no two signatures share a nonce; the model trained on is the one the
//! offer named (by hash); the payload the coordinator verified is the
//! sealed one (its hash); a resumed upload sends exactly the records the
//! coordinator lacks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use fedlink_protocol::downlink::apply_update;
use fedlink_protocol::{
    Cancel, Encoding, ExpectedUpdate, FlatModel, JobId, Message, ModelHash, ModelManifest,
    OfferDecision, OfferResponse, PROTOCOL_VERSION, PayloadHash, PayloadVerifier, Reject,
    RejectCode, ReplayGuard, RoundId, SignedEnvelope, TaskOffer, UpdateManifest, UpdateNonce,
    UploadProgress, UploadResult, ValueCodec, Welcome, decode_payload, encode_payload,
    max_payload_len, verify_update,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::tests::{StepTrainer, local_data, privacy, seeded};
use super::*;
use crate::audit::site;
use crate::policy::Policy;
use crate::resume::{KeptUpload, Transfers};
use crate::sitecore::download::{self, Cached, Download, Step};
use crate::sitecore::{Assignment, SiteCore, TaskKey, upload};

/// What the site did, in order: the audit records and the sends.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a test trace of a few entries
enum Trace {
    Audit(SiteEvent),
    /// A `DeltaUpload` with this envelope's nonce and payload hash.
    Open {
        nonce: String,
        payload: String,
    },
    /// A `ResumeUpload`; then the records from `from` on.
    Resume {
        nonce: String,
        from: u64,
    },
    /// An `OfferResponse`.
    Answer(OfferResponse),
    /// The work on this round dropped.
    Drop(TaskKey),
}

/// A message that arrives while the task runs.
enum Midway {
    /// The offer of the round in progress, again (accepted, nothing new).
    Repeated(TaskOffer),
    /// Another job's offer (declined: busy).
    Busy(TaskOffer),
    /// A `Cancel` of another round (recorded, nothing dropped).
    Stale(Cancel),
}

/// An offer handled as the driver handles it: its records, the answer,
/// the superseded round's record and its work dropped; the work started.
fn offer_step(
    core: &mut SiteCore,
    offer: &TaskOffer,
    working: &mut Option<TaskKey>,
    trace: &mut Vec<Trace>,
) -> Option<Assignment> {
    let out = core.on_offer(1_000, offer);
    trace.push(Trace::Audit(out.received));
    trace.push(Trace::Audit(out.decided));
    trace.push(Trace::Answer(out.response));
    if let Some(abort) = out.abort {
        trace.push(Trace::Audit(abort.cancelled));
        drop_work(working, abort.key, trace);
    }
    if let Some(a) = &out.start {
        *working = Some(a.key());
    }
    check_trace(trace);
    out.start
}

/// A `Cancel` handled as the driver handles it.
fn cancel_step(
    core: &mut SiteCore,
    cancel: &Cancel,
    working: &mut Option<TaskKey>,
    trace: &mut Vec<Trace>,
) {
    let out = core.on_cancel(cancel);
    trace.push(Trace::Audit(out.cancelled));
    if let Some(key) = out.drop {
        drop_work(working, key, trace);
    }
    check_trace(trace);
}

/// The core asks to drop exactly the work the driver holds.
fn drop_work(working: &mut Option<TaskKey>, key: TaskKey, trace: &mut Vec<Trace>) {
    assert_eq!(
        working.take(),
        Some(key.clone()),
        "drops the work in progress"
    );
    trace.push(Trace::Drop(key));
}

/// The coordinator's side: what it serves and what it verifies.
struct Coordinator {
    model: FlatModel,
    manifest: ModelManifest,
    records: Vec<Bytes>,
    update: Option<(ModelHash, UpdateManifest, Vec<Bytes>)>,
    keys: HashMap<fedlink_protocol::SiteId, ed25519_dalek::VerifyingKey>,
    expected: ExpectedUpdate,
    replay: ReplayGuard,
    /// The upload in progress (or cut): its envelope, verifier, records.
    partial: Option<(SignedEnvelope, PayloadVerifier, Vec<Bytes>)>,
    /// Records received on the current connection.
    received_now: usize,
    /// Accepted: the header's payload hash and the records.
    accepted: Option<(PayloadHash, Vec<Bytes>)>,
}

impl Coordinator {
    fn answer_fetch(&self, request: &Message) -> (Message, Vec<Bytes>) {
        match request {
            Message::ModelFetch(f) if f.hash == self.manifest.hash => (
                Message::ModelManifest(Box::new(self.manifest.clone())),
                self.records.clone(),
            ),
            Message::ModelFetchFrom(f) if f.hash == self.manifest.hash => (
                Message::ModelManifest(Box::new(self.manifest.clone())),
                self.records[f.from_record as usize..].to_vec(),
            ),
            Message::ModelUpdateFetch(f) => match &self.update {
                Some((base, m, r)) if *base == f.base && m.hash == f.hash => (
                    Message::UpdateManifest(Box::new(m.clone())),
                    r[f.from_record as usize..].to_vec(),
                ),
                _ => (
                    Message::ModelManifest(Box::new(self.manifest.clone())),
                    self.records.clone(),
                ),
            },
            _ => (
                Message::Reject(Reject {
                    code: RejectCode::Internal,
                    message: "no such model".into(),
                }),
                Vec::new(),
            ),
        }
    }

    fn reject(code: RejectCode) -> Message {
        Message::UploadResult(UploadResult::Reject {
            code,
            message: "refused".into(),
        })
    }

    /// A `DeltaUpload` or `ResumeUpload`: `None` when records may follow.
    fn on_opening(&mut self, msg: &Message) -> Option<Message> {
        self.received_now = 0;
        match msg {
            Message::DeltaUpload(d) => {
                match verify_update(
                    &d.envelope,
                    &d.envelope.header.site_id,
                    &self.keys,
                    &self.expected,
                    &mut self.replay,
                ) {
                    Ok(v) => {
                        self.partial = Some((d.envelope.clone(), v, Vec::new()));
                        None
                    }
                    Err(_) => Some(Self::reject(RejectCode::BadSignature)),
                }
            }
            Message::ResumeUpload(d) => match &self.partial {
                Some((env, _, recs)) if *env == d.envelope => {
                    Some(Message::UploadProgress(UploadProgress {
                        records: recs.len() as u64,
                        bytes: recs.iter().map(|r| r.len() as u64).sum(),
                    }))
                }
                _ => Some(Self::reject(RejectCode::Replay)),
            },
            _ => Some(Self::reject(RejectCode::Malformed)),
        }
    }

    fn on_record(&mut self, r: &Bytes) {
        let (_, v, recs) = self.partial.as_mut().expect("records follow an opening");
        v.update(r).expect("no more bytes than signed");
        recs.push(r.clone());
        self.received_now += 1;
    }

    /// The whole payload arrived: verified, decoded, committed.
    fn on_end(&mut self) -> Message {
        let (env, v, recs) = self.partial.take().expect("an upload in progress");
        let verified = v.finish().expect("the payload hashes to the signed hash");
        decode_payload(
            self.model.spec().clone(),
            env.header.encoding,
            recs.iter().map(|r| r.as_ref()),
        )
        .expect("the payload decodes to the model's layout");
        self.replay.commit(&verified);
        let hash = env.header.payload_hash;
        self.accepted = Some((hash, recs));
        Message::UploadResult(UploadResult::Ack {
            payload_hash: hash,
            accepted: true,
        })
    }
}

/// Every send or action is preceded by the record that describes it.
fn check_trace(trace: &[Trace]) {
    for (i, t) in trace.iter().enumerate() {
        let before = &trace[..i];
        let next = trace.get(i + 1);
        match t {
            Trace::Answer(r) => {
                let (job, round) = (&r.job_id, r.round);
                assert!(
                    matches!(before, [.., Trace::Audit(SiteEvent::OfferReceived(site::OfferReceived { job: j, round: n, .. })), Trace::Audit(_)] if j == job && *n == round),
                    "answer to {job} round {round} without its offer.received"
                );
                let decided = match before.last() {
                    Some(Trace::Audit(SiteEvent::OfferAccepted(site::OfferAccepted {
                        job: j,
                        round: n,
                    }))) if j == job && *n == round => OfferDecision::Accept,
                    Some(Trace::Audit(SiteEvent::OfferDeclined(site::OfferDeclined {
                        job: j,
                        round: n,
                        reason,
                    }))) if j == job && *n == round => OfferDecision::Decline {
                        reason: reason.clone(),
                    },
                    _ => panic!("answer to {job} round {round} sent before its decision's record"),
                };
                assert_eq!(r.decision, decided, "the record says what is sent");
            }
            Trace::Drop(key) => assert!(
                matches!(before.last(), Some(Trace::Audit(SiteEvent::RoundCancelled(site::RoundCancelled { job, round, dropped_work: true, .. }))) if *job == key.job_id && *round == key.round),
                "work on {key} dropped without its round.cancelled just before"
            ),
            Trace::Audit(SiteEvent::RoundCancelled(site::RoundCancelled {
                job,
                round,
                dropped_work,
                ..
            })) => {
                let dropped =
                    matches!(next, Some(Trace::Drop(k)) if k.job_id == *job && k.round == *round);
                // The last entry may await its action.
                if next.is_some() {
                    assert_eq!(
                        *dropped_work, dropped,
                        "round.cancelled of {job} round {round} says dropped_work {dropped_work}"
                    );
                }
            }
            Trace::Open { nonce, payload } => assert!(
                before.iter().rev().any(
                    |e| matches!(e, Trace::Audit(SiteEvent::UpdateSent(site::UpdateSent {
                    nonce: n, payload_hash: p, ..
                })) if n == nonce && p == payload)
                ),
                "upload {nonce} sent before its update.sent"
            ),
            Trace::Resume { nonce, from } => assert!(
                before.iter().rev().any(
                    |e| matches!(e, Trace::Audit(SiteEvent::UpdateResumed(site::UpdateResumed {
                    nonce: n, from_record: f, ..
                })) if n == nonce && f == from)
                ),
                "resumed records of {nonce} sent before their update.resumed"
            ),
            Trace::Audit(_) => {}
        }
    }
    let sent: Vec<_> = trace
        .iter()
        .filter_map(|e| match e {
            Trace::Audit(SiteEvent::UpdateSent(site::UpdateSent { nonce, .. })) => Some(nonce),
            _ => None,
        })
        .collect();
    let distinct: HashSet<_> = sent.iter().collect();
    assert_eq!(distinct.len(), sent.len(), "a nonce signed twice");
}

/// Which paths a run took.
#[derive(Default, Debug)]
struct Paths {
    by_update: usize,
    download_resumed: usize,
    upload_resumed: usize,
    signed_again: usize,
    uncut: usize,
    superseded: usize,
    midway: usize,
    cancelled: usize,
}

fn run(seed: u64, paths: &mut Paths) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let key = SigningKey::from_bytes(&[7; 32]);
    let arch = ArchSpec::Mlp {
        inputs: 4,
        hidden: vec![8 + rng.gen_range(0..24)],
        classes: 2,
    };
    // The previous global model (maybe held) and this round's.
    let previous = arch.init(seed).unwrap();
    let by_update = rng.gen_bool(0.5);
    let small = Encoding::default().with_chunk_bytes(64).unwrap();
    let (global, update) = if by_update {
        let values = (0..previous.values().len())
            .map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            .collect();
        let u = FlatModel::new(previous.spec().clone(), values).unwrap();
        let enc = Encoding::with_codec(ValueCodec::F16)
            .unwrap()
            .with_chunk_bytes(64)
            .unwrap();
        let (records, summary) = encode_payload(&u, enc, 0).unwrap();
        let decoded = decode_payload(
            previous.spec().clone(),
            enc,
            records.iter().map(Vec::as_slice),
        )
        .unwrap();
        let mut target = previous.clone();
        apply_update(target.values_mut(), 0, decoded.values()).unwrap();
        let m = UpdateManifest {
            base: previous.hash(),
            hash: target.hash(),
            spec: previous.spec().clone(),
            encoding: enc,
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
        };
        let records = records.into_iter().map(Bytes::from).collect();
        (target, Some((previous.hash(), m, records)))
    } else {
        (arch.init(seed + 1).unwrap(), None)
    };
    let (records, summary) = encode_payload(&global, small, 0).unwrap();
    let manifest = ModelManifest {
        hash: global.hash(),
        spec: global.spec().clone(),
        encoding: small,
        payload_len: summary.payload_len,
        num_chunks: summary.num_chunks,
    };

    // The offer and its acceptance by the site's core.
    let mut offer = crate::policy::tests::offer();
    offer.arch = arch.clone();
    offer.base_model = global.hash();
    offer.encoding = Encoding::default()
        .with_chunk_bytes(16 * (1 + rng.gen_range(0..8)))
        .unwrap();
    offer.privacy = privacy(
        Some(0.01 + rng.r#gen::<f64>()),
        rng.gen_bool(0.3).then_some(0.5),
    );
    let data = local_data(20, 5);
    let mut core = SiteCore::new(
        Policy::new(vec![offer.federation_id.clone()], vec!["mlp".into()]),
        Arc::new(data.clone().into()),
    );
    let session = core
        .on_welcome(
            Instant::now(),
            &Welcome {
                protocol_version: PROTOCOL_VERSION,
                site_id: fedlink_protocol::SiteId::new("site-a").unwrap(),
                federation_id: offer.federation_id.clone(),
                heartbeat_interval_ms: 1000,
            },
        )
        .unwrap()
        .clone();
    // Faults around the task, from their own stream (the task's own draws
    // stay as they were).
    let mut faults = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0ff3);
    let mut trace: Vec<Trace> = Vec::new();
    let mut working: Option<TaskKey> = None;
    offer.round = RoundId(2);
    if faults.gen_bool(0.4) {
        // An older round of the job, accepted, then superseded.
        let mut older = offer.clone();
        older.round = RoundId(1);
        assert!(offer_step(&mut core, &older, &mut working, &mut trace).is_some());
        paths.superseded += 1;
    }
    let a = offer_step(&mut core, &offer, &mut working, &mut trace).expect("the offer is accepted");
    let cancel = |round| Cancel {
        job_id: offer.job_id.clone(),
        round,
        reason: "operator".into(),
    };
    // Messages that arrive while the task runs (the driver handles them
    // between its steps; here, after the download).
    let mut midway: Vec<Midway> = Vec::new();
    if faults.gen_bool(0.3) {
        midway.push(Midway::Repeated(offer.clone()));
    }
    if faults.gen_bool(0.3) {
        let mut other = offer.clone();
        other.job_id = JobId::new("other-job").unwrap();
        midway.push(Midway::Busy(other));
    }
    if faults.gen_bool(0.3) {
        midway.push(Midway::Stale(cancel(RoundId(7))));
    }
    let cancelled_after_answer = faults.gen_bool(0.3);

    let mut coord = Coordinator {
        model: global.clone(),
        manifest,
        records: records.into_iter().map(Bytes::from).collect(),
        update,
        keys: HashMap::from([(session.site_id.clone(), key.verifying_key())]),
        expected: ExpectedUpdate {
            federation_id: offer.federation_id.clone(),
            job_id: offer.job_id.clone(),
            round: offer.round,
            base_model: offer.base_model,
            encoding: Some(offer.encoding),
            max_payload_len: max_payload_len(global.spec(), &offer.encoding),
        },
        replay: ReplayGuard::new(),
        partial: None,
        received_now: 0,
        accepted: None,
    };
    let mut cache: HashMap<ModelHash, FlatModel> = HashMap::new();
    let held = rng.gen_bool(0.8).then(|| previous.hash());
    if held.is_some() {
        cache.insert(previous.hash(), previous.clone());
    }

    // Download: cut once after a seeded number of records, then resumed.
    let mut transfers = Transfers::default();
    let mut cut_after = Some(rng.gen_range(0..4usize));
    let spec = offer.arch.spec().unwrap();
    let trained_on = 'download: loop {
        let request = download::Request {
            hash: offer.base_model,
            spec: spec.clone(),
            max_params: 1 << 20,
            protocol_version: session.protocol_version,
            held,
        };
        let mut dl = Download::new(request, transfers.download().cloned());
        let mut next = dl.on_cached(lookup(&cache, &offer.base_model));
        let mut stream: Vec<Bytes> = Vec::new();
        let mut pos = 0usize;
        loop {
            for e in dl.take_effects() {
                match e {
                    download::Effect::Uncache(h) => {
                        cache.remove(&h);
                    }
                    download::Effect::Record(ev) => trace.push(Trace::Audit(ev)),
                    download::Effect::Keep { hash, base, record } => {
                        transfers.downloaded(&hash, base.as_ref(), record);
                    }
                    download::Effect::Forget(h) => transfers.download_done(&h),
                }
            }
            next = match next.unwrap() {
                Step::LoadBase(b) => dl.on_base(lookup(&cache, &b)),
                Step::Ask(req) => {
                    let (answer, recs) = coord.answer_fetch(&req);
                    (stream, pos) = (recs, 0);
                    dl.on_answer(answer)
                }
                Step::Receive => {
                    if cut_after == Some(pos) {
                        cut_after = None;
                        continue 'download;
                    }
                    pos += 1;
                    dl.on_record(stream[pos - 1].clone())
                }
                Step::End => dl.on_end(false),
                Step::Done(o) => {
                    if let SiteEvent::ModelReceived(site::ModelReceived {
                        resumed_from_record,
                        as_update_of,
                        ..
                    }) = &o.received
                    {
                        paths.download_resumed += usize::from(resumed_from_record.is_some());
                        paths.by_update += usize::from(as_update_of.is_some());
                    }
                    trace.push(Trace::Audit(o.received));
                    cache.insert(o.model.hash(), o.model.clone());
                    break 'download o.model;
                }
            };
        }
    };
    assert_eq!(
        trained_on.hash(),
        offer.base_model,
        "the model trained on is the offered one"
    );
    assert_eq!(bits(&trained_on), bits(&global));
    for step in &midway {
        match step {
            Midway::Repeated(o) => {
                assert!(offer_step(&mut core, o, &mut working, &mut trace).is_none());
            }
            Midway::Busy(o) => {
                assert!(offer_step(&mut core, o, &mut working, &mut trace).is_none());
                assert!(matches!(
                    trace.last(),
                    Some(Trace::Answer(OfferResponse {
                        decision: OfferDecision::Decline { .. },
                        ..
                    }))
                ));
            }
            Midway::Stale(c) => cancel_step(&mut core, c, &mut working, &mut trace),
        }
        paths.midway += 1;
    }
    assert_eq!(working, Some(a.key()), "the task goes on");

    // Train → delta → clip/noise → train.completed → seal → update.sent.
    let trainer = StepTrainer::new(0.05);
    let t = train_round(&trainer, &offer.arch, &trained_on, &data, &a.train).unwrap();
    let u = make_update(&offer.privacy, &trained_on, &t.local, seeded(seed)).unwrap();
    if let Some(clip) = offer.privacy.clip_norm {
        assert!(u.clipped_norm <= clip * (1.0 + 1e-6));
    }
    let metrics = t.global_eval.as_ref().map(eval_to_protocol);
    trace.push(Trace::Audit(train_completed(
        &offer,
        "fp".into(),
        &t.report,
        metrics.as_ref(),
        &u,
        "none",
    )));
    let (records, summary) = encode_payload(&u.delta, offer.encoding, seed).unwrap();
    let nonce = |rng: &mut ChaCha8Rng| {
        let mut n = [0u8; 16];
        rng.fill_bytes(&mut n);
        UpdateNonce(n)
    };
    let claims = Claims {
        num_examples: t.report.samples as u64,
        metrics,
        feature_stats: None,
        nonce: nonce(&mut rng),
    };
    let sealed = seal_update(&session, &offer, &summary, claims, &key);
    trace.push(Trace::Audit(sealed.sent));
    let mut kept = KeptUpload {
        envelope: sealed.envelope,
        records: records.into_iter().map(Bytes::from).collect(),
    };
    let n = kept.records.len();

    // Upload: cut after a seeded number of records; the coordinator keeps
    // the partial upload, or (restarted) keeps nothing.
    let cut = rng.gen_range(0..=n);
    let restarted = rng.gen_bool(0.3);
    let open = |trace: &mut Vec<Trace>, coord: &mut Coordinator, kept: &KeptUpload| {
        let h = &kept.envelope.header;
        trace.push(Trace::Open {
            nonce: hex::encode(h.nonce.0),
            payload: h.payload_hash.to_hex(),
        });
        check_trace(trace);
        assert!(coord.on_opening(&upload::opening(&kept.envelope)).is_none());
    };
    open(&mut trace, &mut coord, &kept);
    for r in &kept.records[..cut.min(n)] {
        coord.on_record(r);
    }
    let answer = if cut < n {
        // The connection is lost; the next one resumes.
        if restarted {
            coord.partial = None;
        }
        let answer = coord
            .on_opening(&upload::resume_request(&kept.envelope))
            .expect("a resume is answered at once");
        match upload::on_resume_answer(&kept, &answer).unwrap() {
            upload::ResumeStep::SendRest { resumed, rest } => {
                assert!(!restarted);
                paths.upload_resumed += 1;
                let from = cut as u64;
                assert!(
                    matches!(&resumed, SiteEvent::UpdateResumed(site::UpdateResumed { from_record, .. }) if *from_record == from)
                );
                trace.push(Trace::Audit(resumed));
                trace.push(Trace::Resume {
                    nonce: hex::encode(kept.envelope.header.nonce.0),
                    from,
                });
                check_trace(&trace);
                for r in rest {
                    coord.on_record(r);
                }
                assert_eq!(coord.received_now, n - cut, "exactly the missing records");
                coord.on_end()
            }
            upload::ResumeStep::SignAgain { refused } => {
                assert!(restarted);
                paths.signed_again += 1;
                trace.push(Trace::Audit(refused));
                let (again, sent) = upload::sign_again(&kept, &key, nonce(&mut rng));
                trace.push(Trace::Audit(sent));
                kept = again;
                open(&mut trace, &mut coord, &kept);
                for r in &kept.records {
                    coord.on_record(r);
                }
                assert_eq!(coord.received_now, n);
                coord.on_end()
            }
            upload::ResumeStep::Answered { .. } => panic!("nothing was answered yet"),
        }
    } else {
        paths.uncut += 1;
        coord.on_end()
    };
    trace.push(Trace::Audit(
        upload::on_upload_answer(&kept.envelope, &answer).unwrap(),
    ));
    check_trace(&trace);
    if cancelled_after_answer {
        // The coordinator cancels the round before the driver has seen the
        // work end: recorded, and the (finished) work dropped.
        cancel_step(&mut core, &cancel(offer.round), &mut working, &mut trace);
        paths.cancelled += 1;
    }
    core.on_task_finished(&a.key());

    // The payload verified and accepted is the sealed one.
    let (hash, got) = coord.accepted.expect("the update was accepted");
    assert_eq!(hash, summary.payload_hash);
    assert_eq!(got, kept.records);
    assert!(trace.iter().any(|t| matches!(
        t,
        Trace::Audit(SiteEvent::UpdateResult(site::UpdateResult {
            accepted: true,
            ..
        }))
    )));
    assert_eq!(
        matches!(trace.last(), Some(Trace::Drop(k)) if *k == a.key()),
        cancelled_after_answer
    );
    assert!(core.active().is_none());
}

fn lookup(cache: &HashMap<ModelHash, FlatModel>, h: &ModelHash) -> Cached {
    match cache.get(h) {
        Some(m) => Cached::Hit {
            model: m.clone(),
            bytes: 1,
        },
        None => Cached::Miss,
    }
}

fn bits(m: &FlatModel) -> Vec<u32> {
    m.values().iter().map(|v| v.to_bits()).collect()
}

/// 300 seeded runs; every path is taken many times.
#[test]
fn seeded_runs_of_the_whole_task() {
    let mut paths = Paths::default();
    for seed in 0..300 {
        run(seed, &mut paths);
    }
    let Paths {
        by_update,
        download_resumed,
        upload_resumed,
        signed_again,
        uncut,
        superseded,
        midway,
        cancelled,
    } = paths;
    for (what, n) in [
        ("by update", by_update),
        ("download resumed", download_resumed),
        ("upload resumed", upload_resumed),
        ("signed again", signed_again),
        ("uncut", uncut),
        ("superseded", superseded),
        ("offers and cancels midway", midway),
        ("cancelled after the answer", cancelled),
    ] {
        assert!(n >= 20, "{what}: {n} of 300 runs");
    }
}

/// The invariant check itself catches a send before its record and a
/// nonce signed twice.
#[test]
fn the_trace_check_catches_a_send_before_its_record_and_a_reused_nonce() {
    let sent = |nonce: &str| {
        Trace::Audit(SiteEvent::UpdateSent(site::UpdateSent {
            job: JobId::new("j").unwrap(),
            round: RoundId(1),
            payload_hash: "ab".into(),
            payload_bytes: 1,
            num_examples: 1,
            nonce: nonce.into(),
            base_model: "cd".into(),
            encoding: "f32".into(),
            feature_stats: false,
        }))
    };
    let open = |nonce: &str| Trace::Open {
        nonce: nonce.into(),
        payload: "ab".into(),
    };
    check_trace(&[sent("01"), open("01")]);
    let early = std::panic::catch_unwind(|| check_trace(&[open("01"), sent("01")]));
    assert!(early.is_err());
    let twice =
        std::panic::catch_unwind(|| check_trace(&[sent("01"), open("01"), sent("01"), open("01")]));
    assert!(twice.is_err());
    let resumed = Trace::Resume {
        nonce: "01".into(),
        from: 2,
    };
    let early = std::panic::catch_unwind(|| check_trace(&[sent("01"), open("01"), resumed]));
    assert!(early.is_err());

    // An answer after its offer's records, with the decision they say.
    let o = crate::policy::tests::offer();
    let received = Trace::Audit(crate::sitecore::offer_received(&o));
    let accepted = Trace::Audit(SiteEvent::OfferAccepted(site::OfferAccepted {
        job: o.job_id.clone(),
        round: o.round,
    }));
    let answer = |decision| {
        Trace::Answer(OfferResponse {
            job_id: o.job_id.clone(),
            round: o.round,
            decision,
        })
    };
    check_trace(&[
        received.clone(),
        accepted.clone(),
        answer(OfferDecision::Accept),
    ]);
    for bad in [
        vec![
            answer(OfferDecision::Accept),
            received.clone(),
            accepted.clone(),
        ],
        vec![accepted.clone(), answer(OfferDecision::Accept)],
        vec![received.clone(), answer(OfferDecision::Accept)],
        vec![
            received.clone(),
            accepted.clone(),
            answer(OfferDecision::Decline { reason: "r".into() }),
        ],
    ] {
        assert!(std::panic::catch_unwind(|| check_trace(&bad)).is_err());
    }
    // Work dropped just after its round.cancelled, and only then.
    let key = TaskKey {
        job_id: o.job_id.clone(),
        round: o.round,
    };
    let cancelled = |dropped_work| {
        Trace::Audit(SiteEvent::RoundCancelled(site::RoundCancelled {
            job: o.job_id.clone(),
            round: o.round,
            reason: "r".into(),
            dropped_work,
        }))
    };
    check_trace(&[cancelled(true), Trace::Drop(key.clone())]);
    check_trace(&[cancelled(false), received.clone()]);
    for bad in [
        vec![Trace::Drop(key.clone()), cancelled(true)],
        vec![cancelled(false), Trace::Drop(key.clone())],
        vec![cancelled(true), received.clone()],
    ] {
        assert!(std::panic::catch_unwind(|| check_trace(&bad)).is_err());
    }
}
