//! The download machine driven by a test loop that does what the agent's
//! driver does — cache lookups, one answer per request, records, the
//! stream's end, the effects executed against a real
//! [`Transfers`](crate::resume::Transfers) — with a coordinator that
//! serves prepared manifests and records, and can cut a stream.

use std::collections::HashMap;

use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::downlink::apply_update;
use fedlink_protocol::{
    Bye, Reject, RejectCode, UpdateManifest, ValueCodec, decode_payload, encode_payload,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::audit::site;
use crate::resume::Transfers;

/// A whole model as a coordinator serves it.
#[derive(Clone)]
struct Served {
    model: FlatModel,
    manifest: ModelManifest,
    records: Vec<Bytes>,
}

/// An update as a coordinator serves it: `base + decoded update = target`.
#[derive(Clone)]
struct ServedUpdate {
    base: FlatModel,
    target: FlatModel,
    manifest: UpdateManifest,
    records: Vec<Bytes>,
}

fn logreg(inputs: u32) -> ArchSpec {
    ArchSpec::LogReg { inputs, classes: 2 }
}

fn served(model: FlatModel, chunk_bytes: u32) -> Served {
    let enc = Encoding::default().with_chunk_bytes(chunk_bytes).unwrap();
    let (records, summary) = encode_payload(&model, enc, 0).unwrap();
    Served {
        manifest: ModelManifest {
            hash: model.hash(),
            spec: model.spec().clone(),
            encoding: enc,
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
        },
        records: records.into_iter().map(Bytes::from).collect(),
        model,
    }
}

/// The round's update of `base` as the coordinator makes it: seeded
/// values, encoded in f16, decoded back and added to the base.
fn update_of(base: &FlatModel, seed: u64, chunk_bytes: u32) -> ServedUpdate {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values = (0..base.values().len())
        .map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
        .collect();
    let update = FlatModel::new(base.spec().clone(), values).unwrap();
    let enc = Encoding::with_codec(ValueCodec::F16)
        .unwrap()
        .with_chunk_bytes(chunk_bytes)
        .unwrap();
    let (records, summary) = encode_payload(&update, enc, 0).unwrap();
    let decoded =
        decode_payload(base.spec().clone(), enc, records.iter().map(Vec::as_slice)).unwrap();
    let mut target = base.clone();
    apply_update(target.values_mut(), 0, decoded.values()).unwrap();
    ServedUpdate {
        manifest: UpdateManifest {
            base: base.hash(),
            hash: target.hash(),
            spec: base.spec().clone(),
            encoding: enc,
            payload_len: summary.payload_len,
            num_chunks: summary.num_chunks,
        },
        records: records.into_iter().map(Bytes::from).collect(),
        base: base.clone(),
        target,
    }
}

/// The coordinator's side of each request.
#[derive(Clone)]
struct Coordinator {
    model: Served,
    update: Option<ServedUpdate>,
    /// Cut the stream after this many records (of this stream).
    cut_after: Option<usize>,
    /// A frame after the last record.
    extra_frame: bool,
    /// Answer model requests with this instead.
    answer: Option<Message>,
    /// Requests seen.
    asked: Vec<Message>,
}

impl Coordinator {
    fn new(model: Served) -> Self {
        Self {
            model,
            update: None,
            cut_after: None,
            extra_frame: false,
            answer: None,
            asked: Vec::new(),
        }
    }

    /// The answer to `request` and the records that follow it.
    fn answer(&mut self, request: &Message) -> (Message, Vec<Bytes>) {
        self.asked.push(request.clone());
        if let Some(a) = self.answer.clone() {
            return (a, Vec::new());
        }
        let whole = |from: u64| {
            (
                Message::ModelManifest(Box::new(self.model.manifest.clone())),
                self.model.records[from as usize..].to_vec(),
            )
        };
        match request {
            Message::ModelFetch(f) if f.hash == self.model.model.hash() => whole(0),
            Message::ModelFetchFrom(f) if f.hash == self.model.model.hash() => whole(f.from_record),
            Message::ModelUpdateFetch(f) => match &self.update {
                Some(u) if u.base.hash() == f.base && u.target.hash() == f.hash => (
                    Message::UpdateManifest(Box::new(u.manifest.clone())),
                    u.records[f.from_record as usize..].to_vec(),
                ),
                _ => whole(0),
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
}

/// How a driven download ended.
#[derive(Debug)]
enum Ended {
    Done(Box<Outcome>),
    Failed(DownloadError),
    /// The stream was cut (a transport error in the driver).
    Cut,
}

/// What the test driver saw.
#[derive(Default)]
struct Site {
    cache: HashMap<ModelHash, FlatModel>,
    corrupt: Vec<ModelHash>,
    transfers: Transfers,
    /// Audit records appended, in order.
    audit: Vec<SiteEvent>,
    /// Every effect, in order, and the steps between (as text).
    log: Vec<String>,
}

impl Site {
    fn lookup(&self, hash: &ModelHash) -> Cached {
        if self.corrupt.contains(hash) {
            return Cached::Corrupt;
        }
        match self.cache.get(hash) {
            Some(m) => Cached::Hit {
                model: m.clone(),
                bytes: 1234,
            },
            None => Cached::Miss,
        }
    }

    fn execute(&mut self, dl: &mut Download) {
        for e in dl.take_effects() {
            self.log.push(format!("{e:?}"));
            match e {
                Effect::Uncache(h) => {
                    self.cache.remove(&h);
                    self.corrupt.retain(|c| *c != h);
                }
                Effect::Record(ev) => self.audit.push(ev),
                Effect::Keep { hash, base, record } => {
                    self.transfers.downloaded(&hash, base.as_ref(), record);
                }
                Effect::Forget(h) => self.transfers.download_done(&h),
            }
        }
    }

    /// Drive a download of `req` to its end, as the agent's driver does.
    fn drive(&mut self, req: Request, coord: &mut Coordinator) -> Ended {
        let hash = req.hash;
        let mut dl = Download::new(req, self.transfers.download().cloned());
        let mut next = dl.on_cached(self.lookup(&hash));
        let mut stream: Vec<Bytes> = Vec::new();
        let mut received = 0;
        loop {
            self.execute(&mut dl);
            let step = match next {
                Ok(s) => s,
                Err(e) => return Ended::Failed(e),
            };
            self.log
                .push(format!("{step:?}").chars().take(60).collect());
            next = match step {
                Step::LoadBase(base) => dl.on_base(self.lookup(&base)),
                Step::Ask(request) => {
                    let (answer, records) = coord.answer(&request);
                    stream = records;
                    stream.reverse();
                    received = 0;
                    dl.on_answer(answer)
                }
                Step::Receive => {
                    if coord.cut_after == Some(received) {
                        return Ended::Cut;
                    }
                    let Some(r) = stream.pop() else {
                        return Ended::Cut;
                    };
                    received += 1;
                    dl.on_record(r)
                }
                Step::End => dl.on_end(coord.extra_frame || !stream.is_empty()),
                Step::Done(outcome) => return Ended::Done(outcome),
            };
        }
    }
}

fn request(hash: ModelHash, spec: &ModelSpec, version: u16, held: Option<ModelHash>) -> Request {
    Request {
        hash,
        spec: spec.clone(),
        max_params: u64::MAX,
        protocol_version: version,
        held,
    }
}

fn done(ended: Ended) -> Outcome {
    match ended {
        Ended::Done(o) => *o,
        other => panic!("not done: {other:?}"),
    }
}

fn failed(ended: Ended) -> DownloadError {
    match ended {
        Ended::Failed(e) => e,
        other => panic!("not failed: {other:?}"),
    }
}

fn received(o: &Outcome) -> (bool, Option<u64>, Option<String>, u64) {
    match &o.received {
        SiteEvent::ModelReceived(site::ModelReceived {
            from_cache,
            resumed_from_record,
            as_update_of,
            bytes,
            ..
        }) => (
            *from_cache,
            *resumed_from_record,
            as_update_of.clone(),
            *bytes,
        ),
        other => panic!("{other:?}"),
    }
}

/// A site holding base B, a coordinator with the update B → T.
fn update_setup(seed: u64) -> (Site, Coordinator, ServedUpdate) {
    let base = logreg(30).init(seed).unwrap();
    let up = update_of(&base, seed + 100, 32);
    let mut coord = Coordinator::new(served(up.target.clone(), 64));
    coord.update = Some(up.clone());
    let mut site = Site::default();
    site.cache.insert(base.hash(), base);
    (site, coord, up)
}

#[test]
fn a_cached_model_is_the_answer_and_nothing_is_asked() {
    let m = logreg(30).init(1).unwrap();
    let mut coord = Coordinator::new(served(m.clone(), 64));
    let mut site = Site::default();
    site.cache.insert(m.hash(), m.clone());
    let o = done(site.drive(request(m.hash(), m.spec(), 7, None), &mut coord));
    assert_eq!(o.model, m);
    assert!(o.cache.is_none());
    assert_eq!(received(&o), (true, None, None, 1234));
    assert!(coord.asked.is_empty());
}

#[test]
fn a_corrupt_cached_model_goes_and_the_model_is_fetched_whole() {
    let m = logreg(30).init(1).unwrap();
    let mut coord = Coordinator::new(served(m.clone(), 64));
    let mut site = Site::default();
    site.corrupt.push(m.hash());
    let o = done(site.drive(request(m.hash(), m.spec(), 7, None), &mut coord));
    assert_eq!(o.model, m);
    assert_eq!(site.log[0], format!("{:?}", Effect::Uncache(m.hash())));
    assert!(matches!(coord.asked[..], [Message::ModelFetch(_)]));
    let Some(CacheForm::Received { manifest, records }) = &o.cache else {
        panic!("kept as received")
    };
    assert_eq!(manifest, &coord.model.manifest);
    assert_eq!(records, &coord.model.records);
    assert_eq!(received(&o), (false, None, None, manifest.payload_len));
    assert!(
        site.transfers.download().is_none(),
        "nothing kept once done"
    );
}

#[test]
fn the_update_of_the_base_held_gives_the_published_model() {
    let (mut site, mut coord, up) = update_setup(3);
    let req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
    let o = done(site.drive(req, &mut coord));
    assert_eq!(o.model, up.target, "bit-identical to the coordinator's");
    assert!(matches!(o.cache, Some(CacheForm::Reencode)));
    assert_eq!(
        received(&o),
        (
            false,
            None,
            Some(up.base.hash().to_hex()),
            up.manifest.payload_len
        )
    );
    assert!(
        matches!(&coord.asked[..], [Message::ModelUpdateFetch(f)] if f.from_record == 0 && f.base == up.base.hash())
    );
    assert!(site.audit.is_empty(), "no refusal");
    assert!(site.transfers.download().is_none());
    // The form the cache keeps decodes to the same model.
    let (manifest, records) = cache_form(&o.model, up.target.hash()).unwrap();
    let mut asm =
        ModelAssembler::new(manifest, up.target.hash(), up.base.spec(), u64::MAX).unwrap();
    for r in &records {
        asm.push(r).unwrap();
    }
    assert_eq!(asm.finish().unwrap(), up.target);
}

/// What the refusal of a bad update looks like: `model.refused` on record
/// before the whole model is asked for, the whole model obtained.
fn assert_refused_then_whole(
    site: &Site,
    coord: &Coordinator,
    o: &Outcome,
    up: &ServedUpdate,
    why: &str,
) {
    assert_eq!(o.model, up.target);
    assert!(matches!(o.cache, Some(CacheForm::Received { .. })));
    assert_eq!(received(o).2, None, "the whole model, not an update");
    let [
        SiteEvent::ModelRefused(site::ModelRefused {
            model,
            as_update_of,
            error,
        }),
    ] = &site.audit[..]
    else {
        panic!("one model.refused: {:?}", site.audit)
    };
    assert_eq!(model, &up.target.hash().to_hex());
    assert_eq!(
        as_update_of.as_deref(),
        Some(up.base.hash().to_hex().as_str())
    );
    assert!(error.contains(why), "{error} names {why}");
    let refused_at = site
        .log
        .iter()
        .position(|l| l.starts_with("Record(ModelRefused"))
        .unwrap();
    let whole_at = site
        .log
        .iter()
        .rposition(|l| l.starts_with("Ask(ModelFetch("))
        .unwrap();
    assert!(
        refused_at < whole_at,
        "on record before the fetch: {:?}",
        site.log
    );
    assert!(
        matches!(
            &coord.asked[..],
            [Message::ModelUpdateFetch(_), Message::ModelFetch(_)]
        ),
        "{:?}",
        coord.asked
    );
    assert!(site.transfers.download().is_none());
}

#[test]
fn an_update_that_does_not_give_the_announced_model_is_refused_and_the_whole_model_fetched() {
    let (mut site, mut coord, up) = update_setup(4);
    // The records of another update under the manifest of the real one.
    let other = update_of(&up.base, 999, 32);
    let mut bad = up.clone();
    bad.records = other.records;
    bad.manifest.payload_len = bad.records.iter().map(|r| r.len() as u64).sum();
    coord.update = Some(bad);
    let req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
    let o = done(site.drive(req, &mut coord));
    assert_refused_then_whole(&site, &coord, &o, &up, "hash mismatch");
}

#[test]
fn a_damaged_update_record_is_refused_and_the_whole_model_fetched() {
    let (mut site, mut coord, up) = update_setup(5);
    let mut bad = up.clone();
    let mut r = bad.records[1].to_vec();
    r.truncate(3);
    bad.records[1] = Bytes::from(r);
    coord.update = Some(bad);
    let req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
    let o = done(site.drive(req, &mut coord));
    assert_refused_then_whole(&site, &coord, &o, &up, "update payload");
    // The records of the refused update were kept while they came, and
    // went with the refusal.
    assert!(
        site.log
            .iter()
            .any(|l| l.starts_with("Keep") && l.contains("base: Some"))
    );
}

/// Every field of an update manifest is checked before anything is
/// decoded; a wrong one is refused (on record, naming it) and the whole
/// model fetched.
#[test]
fn each_wrong_field_of_an_update_manifest_is_refused_by_name() {
    type Mend = fn(&mut UpdateManifest);
    let cases: [(&str, Mend); 6] = [
        ("announces model", |m| m.hash = ModelHash([9; 32])),
        ("the base held is", |m| m.base = ModelHash([8; 32])),
        ("tensor layout", |m| m.spec = logreg(31).spec().unwrap()),
        ("does not carry downlink updates", |m| {
            m.encoding = Encoding::with_codec(ValueCodec::TopK {
                per_million: 10_000,
            })
            .unwrap();
        }),
        ("exceeds the bound", |m| m.payload_len = u64::MAX / 2),
        ("chunks announced", |m| m.num_chunks += 1),
    ];
    for (why, mend) in cases {
        let (mut site, mut coord, up) = update_setup(6);
        let mut bad = up.clone();
        mend(&mut bad.manifest);
        // Served as the update asked for (keyed by base and target).
        coord.update = Some(bad);
        let req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
        let o = done(site.drive(req, &mut coord));
        assert_refused_then_whole(&site, &coord, &o, &up, why);
        assert!(
            !site
                .log
                .iter()
                .any(|l| l.starts_with("Keep") && l.contains("base: Some")),
            "{why}: refused before any record of the update"
        );
    }
    // The site's limit, checked first.
    let (mut site, mut coord, up) = update_setup(6);
    let mut req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
    req.max_params = up.base.spec().num_params() - 1;
    let e = failed(site.drive(req, &mut coord));
    // Refused as an update, then the whole model is over the limit too.
    assert!(e.to_string().contains("max_model_params"), "{e}");
    let [SiteEvent::ModelRefused(site::ModelRefused { error, .. })] = &site.audit[..] else {
        panic!("{:?}", site.audit)
    };
    assert!(error.contains("the limit is"), "{error}");
}

/// Every field of a whole model's manifest is checked against what was
/// asked; a wrong one fails the download with a named error.
#[test]
fn each_wrong_field_of_a_model_manifest_is_a_named_error() {
    type Mend = fn(&mut ModelManifest);
    let cases: [(&str, Mend); 5] = [
        ("announces model", |m| m.hash = ModelHash([9; 32])),
        ("tensor layout differs", |m| {
            m.spec = logreg(31).spec().unwrap();
        }),
        ("is lossy", |m| {
            m.encoding = Encoding::with_codec(ValueCodec::F16).unwrap();
        }),
        ("exceeds the bound", |m| m.payload_len = u64::MAX / 2),
        ("chunks announced", |m| m.num_chunks += 1),
    ];
    let m = logreg(30).init(2).unwrap();
    for (why, mend) in cases {
        let mut coord = Coordinator::new(served(m.clone(), 64));
        let mut bad = coord.model.manifest.clone();
        mend(&mut bad);
        coord.answer = Some(Message::ModelManifest(Box::new(bad)));
        let mut site = Site::default();
        let e = failed(site.drive(request(m.hash(), m.spec(), 7, None), &mut coord));
        assert!(
            matches!(e, DownloadError::Model(ModelError::Manifest(_))),
            "{e:?}"
        );
        assert!(e.to_string().contains(why), "{e} names {why}");
    }
    let mut coord = Coordinator::new(served(m.clone(), 64));
    let mut req = request(m.hash(), m.spec(), 7, None);
    req.max_params = 10;
    let e = failed(Site::default().drive(req, &mut coord));
    assert!(e.to_string().contains("max_model_params is 10"), "{e}");
}

#[test]
fn an_answer_that_is_not_a_manifest_names_the_request() {
    let m = logreg(30).init(2).unwrap();
    let mut coord = Coordinator::new(served(m.clone(), 64));
    coord.answer = Some(Message::Reject(Reject {
        code: RejectCode::Busy,
        message: "no".into(),
    }));
    let e = failed(Site::default().drive(request(m.hash(), m.spec(), 7, None), &mut coord));
    assert_eq!(
        e.to_string(),
        format!("coordinator: model {} refused: Busy: no", m.hash())
    );
    coord.answer = Some(Message::Bye(Bye { reason: "x".into() }));
    let e = failed(Site::default().drive(request(m.hash(), m.spec(), 7, None), &mut coord));
    assert_eq!(
        e.to_string(),
        "coordinator: sent Bye in answer to ModelFetch"
    );
    // The same for the update request: not an update's refusal, the
    // round's failure.
    let (mut site, mut coord, up) = update_setup(7);
    coord.answer = Some(Message::Bye(Bye { reason: "x".into() }));
    let req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
    let e = failed(site.drive(req, &mut coord));
    assert_eq!(
        e.to_string(),
        "coordinator: sent Bye in answer to ModelUpdateFetch"
    );
    assert!(site.audit.is_empty());
}

#[test]
fn a_frame_after_the_last_record_fails_the_download() {
    let m = logreg(30).init(2).unwrap();
    let mut coord = Coordinator::new(served(m.clone(), 64));
    coord.extra_frame = true;
    let e = failed(Site::default().drive(request(m.hash(), m.spec(), 7, None), &mut coord));
    assert_eq!(
        e.to_string(),
        "coordinator: more model frames than the manifest announced"
    );
    let (mut site, mut coord, up) = update_setup(8);
    coord.extra_frame = true;
    let req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
    let e = failed(site.drive(req, &mut coord));
    assert!(matches!(
        e,
        DownloadError::Coordinator(ModelViolation::ExtraFrames)
    ));
}

#[test]
fn without_the_base_or_without_updates_the_whole_model_is_fetched() {
    let (site0, coord0, up) = update_setup(9);
    let whole = |site: &mut Site, coord: &mut Coordinator, version, held| {
        let o = done(site.drive(
            request(up.target.hash(), up.base.spec(), version, held),
            coord,
        ));
        assert_eq!(o.model, up.target);
        assert_eq!(received(&o).2, None);
    };
    // No base held.
    let (mut site, mut coord) = (Site::default(), coord0.clone());
    whole(&mut site, &mut coord, 7, None);
    assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
    // The base held is not in the cache.
    let (mut site, mut coord) = (Site::default(), coord0.clone());
    whole(&mut site, &mut coord, 7, Some(up.base.hash()));
    assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
    assert!(site.log.iter().any(|l| l.starts_with("LoadBase")));
    // Its cache file is corrupt: it goes.
    let (mut site, mut coord) = (Site::default(), coord0.clone());
    site.corrupt.push(up.base.hash());
    whole(&mut site, &mut coord, 7, Some(up.base.hash()));
    assert!(
        site.log
            .contains(&format!("{:?}", Effect::Uncache(up.base.hash())))
    );
    assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
    // A session below protocol 7 has no updates.
    let (mut site, mut coord) = (site0, coord0.clone());
    site.cache.insert(up.base.hash(), up.base.clone());
    whole(&mut site, &mut coord, 6, Some(up.base.hash()));
    assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
    assert!(!site.log.iter().any(|l| l.starts_with("LoadBase")));
    // The model held is the one asked for (and not cached).
    let mut coord = coord0.clone();
    let mut site = Site::default();
    whole(&mut site, &mut coord, 7, Some(up.target.hash()));
    assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
    // A coordinator without the update sends the whole model instead.
    let mut coord = coord0;
    coord.update = None;
    let mut site = Site::default();
    site.cache.insert(up.base.hash(), up.base.clone());
    whole(&mut site, &mut coord, 7, Some(up.base.hash()));
    assert!(matches!(&coord.asked[..], [Message::ModelUpdateFetch(_)]));
    assert!(site.audit.is_empty());
}

/// A download cut after k records resumes from record k — the whole
/// model (`ModelFetchFrom`) and an update (`ModelUpdateFetch` from k) —
/// and ends with the same model, for seeded models, chunk sizes and cut
/// points.
#[test]
fn a_cut_download_resumes_from_the_record_it_was_cut_at() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for seed in 0..40u64 {
        let inputs = 5 + rng.next_u32() % 60;
        let chunk = 16 * (1 + rng.next_u32() % 8);
        let base = logreg(inputs).init(seed).unwrap();
        let up = update_of(&base, seed + 500, chunk);
        let mut coord = Coordinator::new(served(up.target.clone(), chunk));
        let whole_n = coord.model.records.len();
        let update_n = up.records.len();

        // The whole model.
        let k = (rng.next_u32() as usize) % whole_n;
        let mut site = Site::default();
        coord.cut_after = Some(k);
        let req = request(up.target.hash(), base.spec(), 7, None);
        assert!(matches!(site.drive(req.clone(), &mut coord), Ended::Cut));
        assert_eq!(
            site.transfers.download().map(|d| (d.records.len(), d.base)),
            (k > 0).then_some((k, None)),
            "seed {seed}"
        );
        coord.cut_after = None;
        coord.asked.clear();
        let o = done(site.drive(req, &mut coord));
        assert_eq!(o.model, up.target, "seed {seed}");
        if k == 0 {
            assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
            assert_eq!(received(&o).1, None);
        } else {
            assert!(
                matches!(&coord.asked[..], [Message::ModelFetchFrom(f)] if f.from_record == k as u64),
                "seed {seed}: {:?}",
                coord.asked
            );
            assert_eq!(received(&o).1, Some(k as u64));
        }
        let Some(CacheForm::Received { records, .. }) = o.cache else {
            panic!("seed {seed}")
        };
        assert_eq!(
            records, coord.model.records,
            "seed {seed}: all of them, in order"
        );

        // The update.
        let k = (rng.next_u32() as usize) % update_n;
        let mut site = Site::default();
        site.cache.insert(base.hash(), base.clone());
        coord.update = Some(up.clone());
        coord.cut_after = Some(k);
        coord.asked.clear();
        let req = request(up.target.hash(), base.spec(), 7, Some(base.hash()));
        assert!(matches!(site.drive(req.clone(), &mut coord), Ended::Cut));
        coord.cut_after = None;
        coord.asked.clear();
        let o = done(site.drive(req, &mut coord));
        assert_eq!(o.model, up.target, "seed {seed}");
        assert!(
            matches!(&coord.asked[..], [Message::ModelUpdateFetch(f)] if f.from_record == k as u64),
            "seed {seed}: {:?}",
            coord.asked
        );
        assert_eq!(received(&o).1, (k > 0).then_some(k as u64));
        assert!(site.audit.is_empty(), "seed {seed}");
        assert!(site.transfers.download().is_none());
    }
}

#[test]
fn records_kept_of_another_model_or_form_are_dropped_and_not_used() {
    let (mut site, mut coord, up) = update_setup(10);
    // Records kept of the whole model; the update is asked for from 0.
    site.transfers
        .downloaded(&up.target.hash(), None, coord.model.records[0].clone());
    let req = request(up.target.hash(), up.base.spec(), 7, Some(up.base.hash()));
    let o = done(site.drive(req, &mut coord));
    assert_eq!(o.model, up.target);
    assert!(matches!(&coord.asked[..], [Message::ModelUpdateFetch(f)] if f.from_record == 0));
    let forget = format!("{:?}", Effect::Forget(up.target.hash()));
    let dropped = site.log.iter().position(|l| *l == forget).unwrap();
    let asked = site.log.iter().position(|l| l.starts_with("Ask(")).unwrap();
    assert!(dropped < asked, "{:?}", site.log);
    // Records kept of another model; the whole model from 0.
    let m = logreg(30).init(11).unwrap();
    let mut coord = Coordinator::new(served(m.clone(), 64));
    let mut site = Site::default();
    site.transfers
        .downloaded(&ModelHash([5; 32]), None, Bytes::from_static(b"x"));
    let o = done(site.drive(request(m.hash(), m.spec(), 7, None), &mut coord));
    assert_eq!(o.model, m);
    assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
    assert!(site.transfers.download().is_none());
}

#[test]
fn below_protocol_6_nothing_is_kept_and_nothing_resumed() {
    let m = logreg(30).init(13).unwrap();
    let mut coord = Coordinator::new(served(m.clone(), 64));
    coord.cut_after = Some(2);
    let mut site = Site::default();
    assert!(matches!(
        site.drive(request(m.hash(), m.spec(), 5, None), &mut coord),
        Ended::Cut
    ));
    assert!(site.transfers.download().is_none());
    assert!(!site.log.iter().any(|l| l.starts_with("Keep")));
    // Records kept (by a session of a newer version) are not used.
    site.transfers
        .downloaded(&m.hash(), None, coord.model.records[0].clone());
    coord.cut_after = None;
    coord.asked.clear();
    let o = done(site.drive(request(m.hash(), m.spec(), 5, None), &mut coord));
    assert_eq!(o.model, m);
    assert!(matches!(&coord.asked[..], [Message::ModelFetch(_)]));
}

#[test]
fn calls_out_of_order_are_errors_not_panics() {
    let m = logreg(30).init(2).unwrap();
    let mut dl = Download::new(request(m.hash(), m.spec(), 7, None), None);
    assert!(matches!(
        dl.on_record(Bytes::new()),
        Err(DownloadError::OutOfOrder(_))
    ));
    assert!(matches!(
        dl.on_end(false),
        Err(DownloadError::OutOfOrder(_))
    ));
    assert!(matches!(
        dl.on_base(Cached::Miss),
        Err(DownloadError::OutOfOrder(_))
    ));
    assert!(matches!(
        dl.on_answer(Message::Bye(Bye {
            reason: String::new()
        })),
        Err(DownloadError::OutOfOrder(_))
    ));
    assert!(matches!(dl.on_cached(Cached::Miss), Ok(Step::Ask(_))));
    assert!(matches!(
        dl.on_cached(Cached::Miss),
        Err(DownloadError::OutOfOrder(_))
    ));
}
