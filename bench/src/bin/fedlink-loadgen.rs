//! `fedlink-loadgen`: round-time and coordinator-memory benchmark.
//!
//! Provisions a federation (`fedlink_test_util::TestPki`), writes a job with a
//! large logistic regression (default 1 000 000 inputs × 10 classes ≈ 10M
//! parameters), starts the real `fedlink-coordinator` binary as a separate
//! process, and runs N simulated sites in this process. The sites speak the
//! real protocol over QUIC + mTLS (Hello, offer, model download with hash
//! check, signed upload) but do not train: each sends a random delta that
//! was generated and encoded before the job started, so a round's wall time
//! is the federation's own overhead (download, upload + verification +
//! validation + fold, aggregation + model write, next offer).
//!
//! The coordinator's memory is read from `/proc/<pid>/status` (`VmRSS`
//! sampled during the run, `VmHWM` — the kernel's peak RSS, what
//! `/usr/bin/time -v` reports as "Maximum resident set size" — after the
//! job finished, before the coordinator is stopped).
//!
//! ```sh
//! cargo build --release --locked -p fedlink-bench -p fedlink-coordinator --bins
//! target/release/fedlink-loadgen --sites 8 --rounds 3 --codec f16
//! ```
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use fedlink_bench::{ImpairArgs, cpu_seconds, mem_kb};
use fedlink_certs::{ALPN_SITE, Kit};
use fedlink_coordinator::job::{
    CodecKind, DownlinkKind, InitSource, Job, RoundPolicy, Selection, StrategySection,
    TrainingConfig,
};
use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::backoff::Backoff;
use fedlink_protocol::downlink::UpdateApplier;
use fedlink_protocol::envelope::{UpdateHeader, UpdateNonce, sign_update};
use fedlink_protocol::message::{
    Capabilities, DeltaUpload, Hello, ModelFetch, ModelUpdateFetch, OfferDecision, OfferResponse,
    RejectCode, TaskOffer, UploadResult,
};
use fedlink_protocol::{
    Encoding, FlatModel, Message, ModelHash, ModelSpec, PROTOCOL_VERSION, PayloadDecoder,
    PayloadEncoder, PayloadHash, SiteId, VersionRange,
};
use fedlink_test_util::TestPki;
use fedlink_transport::{Conn, FramedRecv, FramedSend, TransportKind};
use rand::{Rng, SeedableRng};

/// Benchmark a federation round without training: N simulated sites
/// against the real coordinator binary.
#[derive(Debug, Parser)]
#[command(name = "fedlink-loadgen", version, about)]
struct Args {
    /// Number of simulated sites (all selected every round).
    #[arg(long, default_value_t = 8)]
    sites: usize,
    /// Rounds of the job.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Logistic regression inputs (parameters = inputs × classes + classes).
    #[arg(long, default_value_t = 1_000_000)]
    inputs: u32,
    /// Logistic regression classes.
    #[arg(long, default_value_t = 10)]
    classes: u32,
    /// Delta codec: f32 | f16 | bf16 | int8 | topk.
    #[arg(long, default_value = "f16")]
    codec: String,
    /// Chunk size of the job's encoding, KiB of f32 input (default: the
    /// job default).
    #[arg(long)]
    chunk_kib: Option<u32>,
    /// Top-k fraction (with `--codec topk`).
    #[arg(long, default_value_t = 0.1)]
    topk_fraction: f64,
    /// The coordinator executable (default: `fedlink-coordinator` next to
    /// this executable).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Timeout of any single wait (offer, download, upload answer, ...).
    #[arg(long, default_value_t = 300)]
    step_timeout_secs: u64,
    /// How often the coordinator's RSS is sampled, milliseconds.
    #[arg(long, default_value_t = 20)]
    sample_ms: u64,
    /// Spread of the uniform random delta values.
    #[arg(long, default_value_t = 1e-3)]
    delta_scale: f32,
    /// `max_concurrent_uploads` of the coordinator config (default: the
    /// coordinator's own default).
    #[arg(long)]
    max_concurrent_uploads: Option<usize>,
    /// `max_concurrent_downloads` of the coordinator config (default: the
    /// coordinator's own default).
    #[arg(long)]
    max_concurrent_downloads: Option<usize>,
    /// Write the coordinator's RSS samples and the round phases as CSV
    /// (`ms,rss_mb,event`) to this file.
    #[arg(long)]
    rss_trace: Option<PathBuf>,
    /// Also write the results as JSON to this file (what `bench/compare`
    /// reads): parameters, sites, codec, every round's wall time, the
    /// coordinator's peak RSS, bytes per site per round.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the work directory (configs, coordinator log, store).
    #[arg(long)]
    keep: bool,
    /// Transport of the simulated sites: `quic` or `tcp` (TLS 1.3 over TCP
    /// to the coordinator's TCP listener on the same port number).
    #[arg(long, default_value = "quic")]
    transport: String,
    /// Each site behind its own impairment proxy (fedlink-impair).
    #[command(flatten)]
    impair: ImpairArgs,
    /// QUIC congestion controller of the coordinator and the sites:
    /// `cubic` or `bbr`.
    #[arg(long, default_value = "cubic")]
    congestion: String,
    /// Cut every upload this many times: at seeded random points of the
    /// payload (part way into a record) the site drops its connection
    /// abruptly, reconnects, and resumes the same signed upload
    /// (`ResumeUpload`) from what the coordinator kept. Reports the bytes
    /// sent again and the time to resume.
    #[arg(long, default_value_t = 0)]
    cuts: u32,
    /// Keep the coordinator's default per-source handshake limits
    /// (`handshake_burst_per_source`, `handshakes_per_source_per_sec`,
    /// `max_handshakes_in_flight`). By default the loadgen raises them to at
    /// least the number of sites: every simulated site connects from
    /// 127.0.0.1, where a real federation's sites come from their own
    /// addresses. Either way a refused connection is retried with the
    /// agent's backoff.
    #[arg(long)]
    default_handshake_limits: bool,
    /// First delay of a site's reconnection backoff after a refused or
    /// failed connection, milliseconds (doubles per attempt up to 30 s, equal
    /// jitter: the site agent's policy, `fedlink_protocol::backoff`).
    #[arg(long, default_value_t = 500)]
    retry_initial_ms: u64,
    /// Sites always download the whole lossless model, as before protocol
    /// 7, instead of the round's global update applied to the model they
    /// hold (`ModelUpdateFetch`): to measure downlink updates against the
    /// same binaries. The job's `[encoding] downlink` is then `"model"`;
    /// otherwise it is the job's default, as a user gets it (updates for
    /// f16, bf16 and int8; whole models for f32 and top-k).
    #[arg(long, conflicts_with = "downlink_updates")]
    full_model_downloads: bool,
    /// The round's global update for sites that hold the previous model
    /// even where the job's default is the whole model (f32): to measure
    /// what updates would give there. Top-k never carries them.
    #[arg(long)]
    downlink_updates: bool,
}

/// Per-source handshake limits the loadgen's coordinator config sets for
/// `sites` simulated sites on one address (`None`: the coordinator's
/// defaults, which already allow that many). Each is at least the number of
/// sites and never below the coordinator's default.
fn loopback_handshake_limits(sites: usize) -> Option<(u32, f64, usize)> {
    const DEFAULT_BURST: u32 = 64;
    const DEFAULT_RATE: f64 = 16.0;
    const DEFAULT_IN_FLIGHT: usize = 64;
    let n = u32::try_from(sites).unwrap_or(u32::MAX).min(100_000);
    (n > DEFAULT_BURST).then(|| {
        (
            n,
            f64::from(n).max(DEFAULT_RATE),
            (n as usize).max(DEFAULT_IN_FLIGHT),
        )
    })
}

/// When a site saw each step of one round.
#[derive(Clone, Copy, Debug)]
struct RoundTimes {
    offer: Instant,
    fetched: Instant,
    upload_start: Instant,
    /// When the site's QUIC stack had every byte of the upload
    /// acknowledged by the coordinator's (the transfer's end, before the
    /// coordinator's verification and durable acceptance; over TCP, when
    /// the end was handed to the connection).
    sent: Instant,
    acked: Instant,
}

/// What one simulated site measured.
#[derive(Debug)]
struct SiteReport {
    rounds: Vec<RoundTimes>,
    /// When the coordinator's `Bye` (job finished) arrived.
    bye: Instant,
    /// Bytes of the upload payload (chunk records).
    upload_bytes: u64,
    /// Bytes of the model (or global update) payload downloaded, per round.
    download_bytes: Vec<u64>,
    /// Every cut of an upload (`--cuts`).
    cuts: Vec<CutReport>,
    /// Connection attempts that failed or were refused and were retried.
    retries: u32,
}

/// One forced drop of an upload and its resume.
#[derive(Clone, Copy, Debug)]
struct CutReport {
    /// Payload bytes written on the cut connection that the coordinator
    /// did not keep (sent again after the resume): the partial record, and
    /// whatever was still in flight or in the send buffer.
    resent: u64,
    /// From the drop to the coordinator's `UploadProgress` on the new
    /// connection (reconnect, TLS handshake, Hello, re-offer, resume).
    to_resume: Duration,
}

/// A site's connection: the control stream and who it is.
struct SiteConn {
    conn: Conn,
    endpoint: Option<quinn::Endpoint>,
    control_send: FramedSend,
    control_recv: FramedRecv,
    site_id: SiteId,
}

/// Connect, say Hello, expect Welcome.
async fn connect_site(
    kit: &Kit,
    addr: SocketAddr,
    transport: TransportKind,
    cc: fedlink_transport::Congestion,
    limit: Duration,
) -> anyhow::Result<SiteConn> {
    let tls = fedlink_certs::client_tls_config(kit, ALPN_SITE)?;
    let fedlink_transport::Dialed { conn, endpoint } = fedlink_transport::dial(
        transport,
        addr,
        tls,
        kit.coordinator_server_name(),
        Duration::from_secs(30),
        cc,
        limit,
    )
    .await
    .with_context(|| format!("connecting to {addr}"))?;
    let (mut control_send, mut control_recv) = conn.open_bi().await?;
    control_send
        .message(&Message::Hello(Hello {
            versions: VersionRange::SUPPORTED,
            agent_version: "fedlink-loadgen".into(),
            capabilities: Capabilities::default(),
        }))
        .await?;
    let site_id: SiteId = match step("Welcome", limit, control_recv.message()).await?? {
        Message::Welcome(w) => w.site_id,
        other => bail!("expected Welcome, got {}", other.name()),
    };
    Ok(SiteConn {
        conn,
        endpoint,
        control_send,
        control_recv,
        site_id,
    })
}

impl SiteConn {
    /// The next offer (other control messages skipped).
    async fn next_offer(&mut self, limit: Duration) -> anyhow::Result<TaskOffer> {
        loop {
            match step("offer", limit, self.control_recv.message()).await?? {
                Message::TaskOffer(o)
                | Message::TaskOfferV3(o)
                | Message::TaskOfferV5(o)
                | Message::TaskOfferV6(o) => {
                    return Ok(*o);
                }
                // Heads and round outcomes are recorded by real sites;
                // the benchmark has no log to keep them in.
                Message::Heartbeat(_)
                | Message::Cancel(_)
                | Message::AuditHead(_)
                | Message::RoundOutcome(_) => {}
                other => bail!("waiting for an offer, got {}", other.name()),
            }
        }
    }

    async fn accept(&mut self, offer: &TaskOffer) -> anyhow::Result<()> {
        self.control_send
            .message(&Message::OfferResponse(OfferResponse {
                job_id: offer.job_id.clone(),
                round: offer.round,
                decision: OfferDecision::Accept,
            }))
            .await?;
        Ok(())
    }

    /// Drop the connection abruptly (no Bye): a lost link. The site does
    /// not wait for the close to drain (a dead link gives it nothing to
    /// wait for); the old endpoint drains in the background.
    fn drop_abruptly(self) {
        self.conn
            .close(fedlink_transport::close::NORMAL, b"loadgen: forced drop");
        if let Some(e) = self.endpoint {
            tokio::spawn(async move { e.wait_idle().await });
        }
    }
}

/// Upload `envelope` with `payload`, dropping the connection at each byte
/// offset of `cut_at` (increasing) and resuming on a new one. Returns the
/// connection the upload finished on and the cuts made.
#[allow(clippy::too_many_arguments)]
async fn upload_with_cuts(
    mut sc: SiteConn,
    kit: &Kit,
    addr: SocketAddr,
    transport: TransportKind,
    cc: fedlink_transport::Congestion,
    mut envelope: fedlink_protocol::SignedEnvelope,
    payload: &Payload,
    cut_at: &[u64],
    link: Option<&fedlink_tools::impair::ImpairHandle>,
    limit: Duration,
    retry: &mut Retry,
) -> anyhow::Result<(SiteConn, Vec<CutReport>, Instant)> {
    let mut cuts = Vec::new();
    let mut from = 0usize;
    let mut dropped: Option<(Instant, u64)> = None;
    for attempt in 0..=cut_at.len() {
        let (mut send, mut recv) = sc.conn.open_bi().await?;
        if let Some((at, written)) = dropped.take() {
            send.message(&Message::ResumeUpload(Box::new(DeltaUpload {
                envelope: envelope.clone(),
            })))
            .await?;
            match step("upload progress", limit, recv.message()).await?? {
                Message::UploadProgress(p) => {
                    cuts.push(CutReport {
                        resent: written.saturating_sub(p.bytes),
                        to_resume: at.elapsed(),
                    });
                    from = usize::try_from(p.records)?;
                }
                // The coordinator kept nothing of it (the cut came before
                // the upload's opening reached it): as the agent does, the
                // same update signed again under a new nonce, sent whole.
                Message::UploadResult(UploadResult::Reject {
                    code: RejectCode::Replay,
                    ..
                }) => {
                    let key = kit
                        .update_signing_key()
                        .context("the site kit has no update signing key")?;
                    let mut header = envelope.header.clone();
                    header.nonce = UpdateNonce::random(&mut rand::rngs::OsRng);
                    envelope = sign_update(key, header);
                    cuts.push(CutReport {
                        resent: written,
                        to_resume: at.elapsed(),
                    });
                    from = 0;
                    (send, recv) = sc.conn.open_bi().await?;
                    send.message(&Message::DeltaUpload(Box::new(DeltaUpload {
                        envelope: envelope.clone(),
                    })))
                    .await?;
                }
                other => bail!("expected UploadProgress, got {other:?}"),
            }
        } else {
            send.message(&Message::DeltaUpload(Box::new(DeltaUpload {
                envelope: envelope.clone(),
            })))
            .await?;
        }
        let mut written: u64 = payload.records[..from].iter().map(|r| r.len() as u64).sum();
        let Some(&target) = cut_at.get(attempt) else {
            for r in &payload.records[from..] {
                step("sending a chunk", limit, send.chunk(r.clone())).await??;
            }
            send.finish()?;
            // The transfer's end, apart from the acknowledgement (which
            // also waits for verification and durable acceptance).
            let sent = tokio::spawn(async move {
                send.stopped().await;
                Instant::now()
            });
            match step("upload result", limit, recv.message()).await?? {
                Message::UploadResult(UploadResult::Ack { accepted: true, .. }) => {}
                Message::UploadResult(r) => bail!("upload not accepted after resuming: {r:?}"),
                other => bail!("expected an upload result, got {}", other.name()),
            }
            let sent = step("the upload's last acknowledgement", limit, sent).await??;
            return Ok((sc, cuts, sent));
        };
        // Send up to the cut point, part way into a record, then drop.
        for r in &payload.records[from..] {
            let len = r.len() as u64;
            if written + len > target {
                let part = usize::try_from(target.saturating_sub(written))?.min(r.len() - 1);
                send.begin_chunk(r.len()).await?;
                send.chunk_body(r.slice(..part)).await?;
                written += part as u64;
                break;
            }
            step("sending a chunk", limit, send.chunk(r.clone())).await??;
            written += len;
        }
        let at = Instant::now();
        // Over TCP behind an impairment proxy, the proxy cuts the link
        // (what was in its buffers is lost, as on a real drop); a clean
        // close would deliver everything written first. Over QUIC a cut at
        // the proxy would only be noticed at the idle timeout: the site
        // closes at once instead (QUIC drops what was not yet delivered).
        if let (TransportKind::Tcp, Some(link)) = (transport, link) {
            link.cut();
        }
        sc.drop_abruptly();
        dropped = Some((at, written));
        // Back: the coordinator offers the round again; resume it.
        sc = retry.connect(kit, addr, transport, cc, limit).await?;
        let offer = sc.next_offer(limit).await?;
        if offer.round != envelope.header.round {
            bail!(
                "re-offered round {} after a drop in round {}",
                offer.round,
                envelope.header.round
            );
        }
        sc.accept(&offer).await?;
    }
    bail!("unreachable: the last attempt returns")
}

/// A site's reconnection state: the first backoff delay, its seeded jitter
/// source, and how many attempts failed.
struct Retry {
    initial: Duration,
    rng: rand::rngs::StdRng,
    count: u32,
}

impl Retry {
    /// [`connect_site`] until it succeeds, waiting between attempts as the
    /// site agent does (`fedlink_protocol::backoff::Backoff`, from
    /// `initial` up to 30 s, equal jitter from the site's seeded `rng`). A
    /// coordinator refuses handshakes beyond its per-source rate, and all
    /// simulated sites share one source address. Gives up when `limit` has
    /// passed since the first attempt; `count` counts the failed attempts.
    async fn connect(
        &mut self,
        kit: &Kit,
        addr: SocketAddr,
        transport: TransportKind,
        cc: fedlink_transport::Congestion,
        limit: Duration,
    ) -> anyhow::Result<SiteConn> {
        let give_up = Instant::now() + limit;
        let mut backoff = Backoff::new(self.initial, Duration::from_secs(30));
        loop {
            match connect_site(kit, addr, transport, cc, limit).await {
                Ok(sc) => return Ok(sc),
                Err(e) => {
                    let delay = backoff.next_delay(self.rng.r#gen::<f64>());
                    if Instant::now() + delay > give_up {
                        return Err(e.context(format!(
                            "giving up after {} attempts within {limit:?}",
                            self.count + 1
                        )));
                    }
                    self.count += 1;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// A site's precomputed, encoded delta.
struct Payload {
    records: Vec<Bytes>,
    len: u64,
    hash: PayloadHash,
}

/// One sample taken while the job runs.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    /// The coordinator's `VmRSS`, kB.
    rss_kb: u64,
    /// CPU seconds (user + system) the coordinator has used so far.
    coordinator_cpu: f64,
    /// CPU seconds this process (the simulated sites, and the impairment
    /// proxies when there are any) has used so far.
    loadgen_cpu: f64,
}

/// The samples of the coordinator's memory and both processes' CPU time.
type Samples = Arc<Mutex<Vec<Sample>>>;

/// CPU seconds used by the coordinator and by this process between the
/// last sample at or before `from` and the first at or after `to`, and the
/// wall time between those two samples.
fn cpu_between(samples: &[Sample], from: Instant, to: Instant) -> Option<(f64, f64, f64)> {
    let a = samples
        .iter()
        .rev()
        .find(|s| s.at <= from)
        .or_else(|| samples.first())?;
    let b = samples
        .iter()
        .find(|s| s.at >= to)
        .or_else(|| samples.last())?;
    let wall = b.at.checked_duration_since(a.at)?.as_secs_f64();
    Some((
        b.coordinator_cpu - a.coordinator_cpu,
        b.loadgen_cpu - a.loadgen_cpu,
        wall,
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nloadgen FAILED: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Kills the coordinator if the benchmark stops early.
struct CoordinatorProc(Option<Child>);

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn locate_coordinator(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match arg {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("executable has no directory")?
            .join("fedlink-coordinator"),
    };
    if !path.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p fedlink-coordinator --bins`) or pass --coordinator",
            path.display()
        );
    }
    Ok(path)
}

fn free_udp_port() -> anyhow::Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free UDP port")?;
    Ok(s.local_addr()?.port())
}

/// The loadgen's job: FedAVG over every site each round, one local epoch,
/// no evaluation (the simulated sites do not evaluate), the codec and chunk
/// size asked for.
fn loadgen_job(args: &Args) -> anyhow::Result<Job> {
    let sites = u32::try_from(args.sites).context("--sites")?;
    let mut job = Job::new(
        "loadgen",
        args.rounds,
        ArchSpec::LogReg {
            inputs: args.inputs,
            classes: args.classes,
        },
        InitSource::Seed(11),
        StrategySection::named("fedavg"),
        RoundPolicy {
            quorum: sites,
            extension_secs: 0,
            max_attempts: 1,
            ..RoundPolicy::with_deadline(3600)
        },
    );
    job.seed = 3;
    job.selection = Selection::exactly(sites, 0);
    job.training = TrainingConfig::sgd(1, 8, 0.1);
    job.evaluation.every_rounds = 0;
    let e = &mut job.encoding;
    (e.codec, e.topk_fraction) = match args.codec.as_str() {
        "f32" => (CodecKind::F32, None),
        "f16" => (CodecKind::F16, None),
        "bf16" => (CodecKind::Bf16, None),
        "int8" => (CodecKind::Int8, None),
        "topk" => (CodecKind::Topk, Some(args.topk_fraction)),
        other => bail!("unknown codec {other:?}: f32 | f16 | bf16 | int8 | topk"),
    };
    e.shuffle = true;
    e.zstd_level = 1;
    if let Some(k) = args.chunk_kib {
        e.chunk_bytes = k.checked_mul(1024).context("--chunk-kib too large")?;
    }
    // The job's default (what a user gets) unless whole models are asked
    // for: benchmarks of f32 jobs measure whole models, as they run.
    e.downlink = if args.full_model_downloads {
        Some(DownlinkKind::Model)
    } else if args.downlink_updates && e.codec != CodecKind::Topk {
        Some(DownlinkKind::Update)
    } else {
        None
    };
    job.validate().map_err(|e| anyhow::anyhow!("job: {e}"))?;
    Ok(job)
}

/// The coordinator's config file: `paths` are its kit, CA directory, data
/// directory and job file; `handshake_limits` (burst, rate, in flight) are
/// written when given.
fn coordinator_config(
    args: &Args,
    addr: SocketAddr,
    paths: [&std::path::Path; 4],
    handshake_limits: Option<(u32, f64, usize)>,
) -> String {
    let [kit, ca_dir, data_dir, job] = paths;
    format!(
        "listen = \"{addr}\"\nkit = {kit:?}\nca_dir = {ca_dir:?}\ndata_dir = {data_dir:?}\njob = {job:?}\nheartbeat_interval_secs = 5\nidle_timeout_secs = 60\n{}",
        [
            args.max_concurrent_uploads
                .map(|n| format!("max_concurrent_uploads = {n}\n")),
            args.max_concurrent_downloads
                .map(|n| format!("max_concurrent_downloads = {n}\n")),
            Some(format!("congestion_control = \"{}\"\n", args.congestion)),
            handshake_limits.map(|(burst, rate, in_flight)| {
                format!(
                    "handshake_burst_per_source = {burst}\nhandshakes_per_source_per_sec = {rate:.1}\nmax_handshakes_in_flight = {in_flight}\n"
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect::<String>(),
    )
}

fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

/// Generate and encode one site's random delta.
fn make_payload(
    spec: &ModelSpec,
    encoding: Encoding,
    seed: u64,
    scale: f32,
) -> anyhow::Result<Payload> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = usize::try_from(spec.num_params()).context("model too large for this machine")?;
    let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
    let delta = FlatModel::new(spec.clone(), values)?;
    let mut enc = PayloadEncoder::new(spec.clone(), encoding, seed)?;
    let mut records = Vec::new();
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    while let Some(r) = enc.next_chunk() {
        let values = delta
            .values()
            .get(r.start as usize..r.end as usize)
            .context("delta shorter than its spec")?;
        let rec = enc.encode_chunk(values)?;
        hasher.update(&rec);
        len += rec.len() as u64;
        records.push(Bytes::from(rec));
    }
    enc.finish()?;
    Ok(Payload {
        records,
        len,
        hash: PayloadHash(*hasher.finalize().as_bytes()),
    })
}

async fn step<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .with_context(|| format!("{what}: nothing within {limit:?}"))
}

/// One simulated site: connect, then for each round accept the offer,
/// download and verify the model, upload the precomputed delta; finally
/// wait for the coordinator's Bye.
#[allow(clippy::too_many_arguments)]
async fn run_site(
    kit: Kit,
    addr: SocketAddr,
    transport: TransportKind,
    cc: fedlink_transport::Congestion,
    rounds: u32,
    payload: Arc<Payload>,
    limit: Duration,
    cuts: u32,
    seed: u64,
    link: Option<fedlink_tools::impair::ImpairHandle>,
    retry_initial: Duration,
    updates: bool,
) -> anyhow::Result<SiteReport> {
    let mut retry = Retry {
        initial: retry_initial,
        rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x005e_ed0f_7e7a),
        count: 0,
    };
    let mut sc = retry.connect(&kit, addr, transport, cc, limit).await?;
    let key = kit
        .update_signing_key()
        .context("the site kit has no update signing key")?
        .clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut times = Vec::new();
    let mut cut_reports = Vec::new();
    let mut download_bytes = Vec::new();
    // The global model this site holds (with `updates`): the next one
    // comes as the update of it.
    let mut held: Option<(ModelHash, FlatModel)> = None;
    for _ in 0..rounds {
        let offer = sc.next_offer(limit).await?;
        let t_offer = Instant::now();
        sc.accept(&offer).await?;
        let (bytes, model) = fetch_model(&sc.conn, &offer, limit, held.take(), updates).await?;
        download_bytes.push(bytes);
        held = model.map(|m| (offer.base_model, m));
        let t_fetched = Instant::now();
        let header = UpdateHeader {
            protocol_version: PROTOCOL_VERSION,
            federation_id: offer.federation_id.clone(),
            site_id: sc.site_id.clone(),
            job_id: offer.job_id.clone(),
            round: offer.round,
            base_model: offer.base_model,
            num_examples: 100,
            encoding: offer.encoding,
            payload_len: payload.len,
            payload_hash: payload.hash,
            nonce: UpdateNonce::random(&mut rand::rngs::OsRng),
            metrics: None,
            feature_stats: None,
        };
        let t_upload = Instant::now();
        let envelope = sign_update(&key, header);
        // Seeded cut points, increasing, strictly inside the payload.
        let mut cut_at: Vec<u64> = (0..cuts)
            .map(|_| rng.gen_range(1..payload.len.max(2)))
            .collect();
        cut_at.sort_unstable();
        let (back, made, sent) = upload_with_cuts(
            sc,
            &kit,
            addr,
            transport,
            cc,
            envelope,
            &payload,
            &cut_at,
            link.as_ref(),
            limit,
            &mut retry,
        )
        .await?;
        sc = back;
        cut_reports.extend(made);
        times.push(RoundTimes {
            offer: t_offer,
            fetched: t_fetched,
            upload_start: t_upload,
            sent,
            acked: Instant::now(),
        });
    }
    loop {
        match step("Bye after the last round", limit, sc.control_recv.message()).await?? {
            Message::Bye(_) => break,
            Message::Heartbeat(_)
            | Message::Cancel(_)
            | Message::AuditHead(_)
            | Message::RoundOutcome(_) => {}
            other => bail!("waiting for Bye, got {}", other.name()),
        }
    }
    let bye = Instant::now();
    sc.conn
        .close(fedlink_transport::close::NORMAL, b"loadgen done");
    match &sc.endpoint {
        Some(e) => e.wait_idle().await,
        None => {
            let _ = sc.conn.closed().await;
        }
    }
    Ok(SiteReport {
        rounds: times,
        bye,
        upload_bytes: payload.len,
        download_bytes,
        cuts: cut_reports,
        retries: retry.count,
    })
}

/// Download the offered model, decode it chunk by chunk and check its
/// hash; with `held` (the previous global model and its hash), ask for the
/// round's global update instead and apply it ([`UpdateApplier`], which
/// checks the result's hash). Returns the payload bytes and, with `keep`,
/// the model (otherwise values are hashed as they arrive, not kept).
async fn fetch_model(
    conn: &Conn,
    offer: &TaskOffer,
    limit: Duration,
    held: Option<(ModelHash, FlatModel)>,
    keep: bool,
) -> anyhow::Result<(u64, Option<FlatModel>)> {
    let (mut send, mut recv): (FramedSend, FramedRecv) = conn.open_bi().await?;
    let ask = match &held {
        Some((base, _)) => Message::ModelUpdateFetch(ModelUpdateFetch {
            hash: offer.base_model,
            base: *base,
            from_record: 0,
        }),
        None => Message::ModelFetch(ModelFetch {
            hash: offer.base_model,
        }),
    };
    send.message(&ask).await?;
    send.finish()?;
    let manifest = match step("model manifest", limit, recv.message()).await?? {
        Message::ModelManifest(m) => *m,
        Message::UpdateManifest(m) => {
            let (_, base) = held.context("an update manifest answered a ModelFetch")?;
            if m.hash != offer.base_model {
                bail!("the update manifest names another model than the offer");
            }
            let mut applier = UpdateApplier::new(*m, base, u64::MAX)?;
            let mut bytes = 0u64;
            // One record buffer for the whole download, as the coordinator's.
            let mut rec = Vec::new();
            while applier.remaining() > 0 {
                step("update chunk", limit, recv.chunk_into(&mut rec)).await??;
                bytes += rec.len() as u64;
                applier.push(&rec)?;
            }
            let model = applier.finish()?;
            return Ok((bytes, keep.then_some(model)));
        }
        other => bail!("expected a model manifest, got {}", other.name()),
    };
    // The decoder hashes the values as it decodes them (one hash per
    // byte); each chunk is decoded into one reused buffer.
    let mut dec = PayloadDecoder::new(manifest.spec.clone(), manifest.encoding)?;
    let mut bytes = 0u64;
    let mut values = Vec::new();
    let mut chunk = Vec::new();
    let mut rec = Vec::new();
    for _ in 0..manifest.num_chunks {
        step("model chunk", limit, recv.chunk_into(&mut rec)).await??;
        bytes += rec.len() as u64;
        dec.decode_chunk_into(&rec, &mut chunk)?;
        if keep {
            values.extend_from_slice(&chunk);
        }
    }
    let summary = dec.finish()?;
    if bytes != manifest.payload_len {
        bail!(
            "model payload is {bytes} bytes, the manifest said {}",
            manifest.payload_len
        );
    }
    if summary.model_hash != Some(offer.base_model) {
        bail!("downloaded model does not match the offered hash");
    }
    let model = if keep {
        Some(FlatModel::new(manifest.spec, values)?)
    } else {
        None
    };
    Ok((bytes, model))
}

fn stats(xs: impl Iterator<Item = Duration>) -> (f64, f64, f64) {
    let v: Vec<f64> = xs.map(|d| d.as_secs_f64() * 1e3).collect();
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    (min, v.iter().sum::<f64>() / v.len() as f64, max)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.sites == 0 || args.rounds == 0 {
        bail!("--sites and --rounds must be at least 1");
    }
    let limit = Duration::from_secs(args.step_timeout_secs.max(1));
    let coordinator_bin = locate_coordinator(args.coordinator.clone())?;

    // 1. Federation, job, config.
    let t0 = Instant::now();
    let pki = tokio::task::spawn_blocking({
        let n = args.sites;
        move || TestPki::new(n)
    })
    .await??;
    // With --keep the directory stays whatever happens, a failed run
    // included (its coordinator log and audit log say why).
    let work = tempfile::Builder::new()
        .prefix("fedlink-loadgen-")
        .disable_cleanup(args.keep)
        .tempdir()?;
    let job_path = work.path().join("job.toml");
    let job_text = loadgen_job(&args)?.to_toml()?;
    std::fs::write(&job_path, job_text)?;
    let job = Job::from_file(&job_path).map_err(|e| anyhow::anyhow!("job: {e}"))?;
    let spec = job.arch.spec().map_err(|e| anyhow::anyhow!("arch: {e}"))?;
    let encoding = job
        .encoding
        .to_protocol()
        .map_err(|e| anyhow::anyhow!("encoding: {e}"))?;
    let params = spec.num_params();
    let model_mb = params as f64 * 4.0 / 1e6;
    let port = free_udp_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let ca_dir = pki
        .manifest_path()
        .parent()
        .context("manifest has no directory")?
        .to_owned();
    let data_dir = work.path().join("data");
    let cfg_path = work.path().join("coordinator.toml");
    let handshake_limits = if args.default_handshake_limits {
        None
    } else {
        loopback_handshake_limits(args.sites)
    };
    std::fs::write(
        &cfg_path,
        coordinator_config(
            &args,
            addr,
            [pki.coordinator_dir(), &ca_dir, &data_dir, &job_path],
            handshake_limits,
        ),
    )?;
    println!(
        "fedlink-loadgen: {} sites × {} parameters ({model_mb:.1} MB f32), {} rounds, codec {}{}; work dir {}",
        args.sites,
        params,
        args.rounds,
        args.codec,
        if args.codec == "topk" {
            format!(" {}", args.topk_fraction)
        } else {
            String::new()
        },
        work.path().display()
    );

    if let Some((burst, rate, in_flight)) = handshake_limits {
        println!(
            "  coordinator config: per-source handshake limits raised for a loopback simulation (every site connects from 127.0.0.1): handshake_burst_per_source = {burst}, handshakes_per_source_per_sec = {rate:.1}, max_handshakes_in_flight = {in_flight} (defaults 64, 16.0, 64; --default-handshake-limits keeps them)"
        );
    }

    // 2. Precompute every site's encoded delta (not part of the round time).
    let mut payloads = Vec::with_capacity(args.sites);
    for i in 0..args.sites {
        let spec = spec.clone();
        let scale = args.delta_scale;
        payloads.push(Arc::new(
            tokio::task::spawn_blocking(move || {
                make_payload(&spec, encoding, 1000 + i as u64, scale)
            })
            .await??,
        ));
    }
    println!(
        "  setup: PKI + {} encoded deltas in {:.1} s",
        args.sites,
        t0.elapsed().as_secs_f64()
    );

    // 3. The coordinator, as its own process.
    let log = std::fs::File::create(work.path().join("coordinator.log"))?;
    let child = Command::new(&coordinator_bin)
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .env(
            "FEDLINK_LOG",
            std::env::var("FEDLINK_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {}", coordinator_bin.display()))?;
    let pid = child.id();
    let mut proc = CoordinatorProc(Some(child));
    let status_path = data_dir.join(fedlink_coordinator::server::STATUS_FILE);
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !status_path.exists() {
        if let Some(c) = proc.0.as_mut()
            && let Some(code) = c.try_wait()?
        {
            bail!(
                "the coordinator exited with {code} before listening; see {}",
                work.path().join("coordinator.log").display()
            );
        }
        if Instant::now() > ready_by {
            bail!("the coordinator did not start within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (idle_rss, idle_hwm) = mem_kb(pid).context("reading the coordinator's memory")?;
    println!(
        "  coordinator pid {pid} listening on {addr}: RSS {:.1} MB, peak so far {:.1} MB",
        mb(idle_rss),
        mb(idle_hwm)
    );

    // 4. Sample its RSS while the job runs.
    let samples: Samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn({
        let samples = samples.clone();
        let every = Duration::from_millis(args.sample_ms.max(1));
        async move {
            let pid_text = pid.to_string();
            while let Some((rss_kb, _)) = mem_kb(pid) {
                let sample = Sample {
                    at: Instant::now(),
                    rss_kb,
                    coordinator_cpu: cpu_seconds(&pid_text).unwrap_or(f64::NAN),
                    loadgen_cpu: cpu_seconds("self").unwrap_or(f64::NAN),
                };
                if let Ok(mut s) = samples.lock() {
                    s.push(sample);
                }
                tokio::time::sleep(every).await;
            }
        }
    });

    // 5. The sites.
    let cc = match args.congestion.as_str() {
        "cubic" => fedlink_transport::Congestion::Cubic,
        "bbr" => fedlink_transport::Congestion::Bbr,
        other => bail!("--congestion {other:?}: expected cubic or bbr"),
    };
    let transport = match args.transport.as_str() {
        "quic" => TransportKind::Quic,
        "tcp" => TransportKind::Tcp,
        other => bail!("--transport {other:?}: expected quic or tcp"),
    };
    // Each site on a link of its own, when asked.
    let mut links = Vec::new();
    if let Some(imp) = args.impair.impairment() {
        for i in 0..args.sites {
            let cfg = fedlink_tools::impair::ProxyConfig {
                seed: i as u64 + 1,
                ..fedlink_tools::impair::ProxyConfig::new(addr).both_ways(imp.clone())
            };
            links.push(fedlink_tools::impair::ImpairProxy::start(cfg).await?);
        }
    }
    let payloads_max_record = payloads
        .iter()
        .flat_map(|p| p.records.iter().map(|r| r.len() as u64))
        .max()
        .unwrap_or(0);
    let retry_initial = Duration::from_millis(args.retry_initial_ms.max(1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.sites);
    for (i, payload) in payloads.into_iter().enumerate() {
        let kit = pki.site_kit(i)?;
        let rounds = args.rounds;
        let cuts = args.cuts;
        let updates = job.encoding.downlink_encoding().is_some();
        let site_addr = links.get(i).map_or(addr, |l| l.addr());
        let link = links.get(i).map(|l| l.handle());
        tasks.push(tokio::spawn(async move {
            run_site(
                kit,
                site_addr,
                transport,
                cc,
                rounds,
                payload,
                limit,
                cuts,
                i as u64 + 1,
                link,
                retry_initial,
                updates,
            )
            .await
            .with_context(|| format!("site-{i}"))
        }));
    }
    // Every site's outcome: a site that fails early leaves the others
    // waiting for a round that never closes, so the first site's timeout
    // alone would hide the cause. Report every failure.
    let mut reports = Vec::with_capacity(tasks.len());
    let mut failed: Vec<anyhow::Error> = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(anyhow::Error::new(e)),
        }
    }
    if !failed.is_empty() {
        let all: Vec<String> = failed.iter().map(|e| format!("{e:#}")).collect();
        bail!(
            "{} of {} sites failed: {}",
            all.len(),
            args.sites,
            all.join("; ")
        );
    }
    let total = started.elapsed();

    // 6. Peak memory, before the coordinator stops.
    tokio::time::sleep(Duration::from_millis(args.sample_ms.max(1) * 2)).await;
    let (end_rss, hwm) = mem_kb(pid).context("reading the coordinator's peak memory")?;
    sampler.abort();
    let mut c = proc.0.take().context("coordinator handle")?;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let stop_by = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(code) = c.try_wait()? {
            break Some(code);
        }
        if Instant::now() > stop_by {
            let _ = c.kill();
            let _ = c.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // 7. Report.
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let peak_in = |from: Instant, to: Instant| {
        samples
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .map(|s| s.rss_kb)
            .max()
            .unwrap_or(0)
    };
    let upload_mb = reports.first().map_or(0, |r| r.upload_bytes) as f64 / 1e6;
    // Per site per round, over every round (round 1 is always the whole
    // model: no site holds a previous one).
    let per_round: Vec<u64> = reports
        .first()
        .map_or(Vec::new(), |r| r.download_bytes.clone());
    let download_mb = per_round.iter().sum::<u64>() as f64 / per_round.len().max(1) as f64 / 1e6;
    let later_mb = per_round.iter().skip(1).sum::<u64>() as f64
        / per_round.len().saturating_sub(1).max(1) as f64
        / 1e6;
    println!(
        "  wire: download {download_mb:.2} MB per site per round ({}; round 1 {:.2} MB, rounds 2+ {later_mb:.2} MB each), upload {upload_mb:.2} MB per site per round ({}; {:.2}x smaller than raw f32)",
        if job.encoding.downlink_encoding().is_none() {
            "the whole model, lossless f32+shuffle/zstd1"
        } else {
            "round 1 the whole model, then the global update"
        },
        per_round.first().copied().unwrap_or(0) as f64 / 1e6,
        args.codec,
        model_mb / upload_mb.max(1e-9)
    );
    println!(
        "\n  round | wall ms | download ms (min/mean/max) | upload→ack ms (min/mean/max) | last ack→next offer ms | coord. peak RSS in round MB"
    );
    let mut walls = Vec::new();
    // Per round, each site's mean download, upload-sent and upload→ack ms.
    let mut rates: Vec<(f64, f64, f64)> = Vec::new();
    let mut events: Vec<(Instant, String)> = Vec::new();
    // Per round: CPU seconds of the coordinator and of this process, and
    // the sampled wall time they were measured over.
    let mut cpu: Vec<Option<(f64, f64, f64)>> = Vec::new();
    for r in 0..args.rounds as usize {
        let first_offer = reports
            .iter()
            .filter_map(|s| s.rounds.get(r).map(|t| t.offer))
            .min()
            .context("no offer times")?;
        let next = if r + 1 < args.rounds as usize {
            reports
                .iter()
                .filter_map(|s| s.rounds.get(r + 1).map(|t| t.offer))
                .min()
        } else {
            reports.iter().map(|s| s.bye).min()
        }
        .context("no end time")?;
        let last_ack = reports
            .iter()
            .filter_map(|s| s.rounds.get(r).map(|t| t.acked))
            .max()
            .context("no ack times")?;
        let dl = stats(
            reports
                .iter()
                .filter_map(|s| s.rounds.get(r).map(|t| t.fetched - t.offer)),
        );
        let up = stats(
            reports
                .iter()
                .filter_map(|s| s.rounds.get(r).map(|t| t.acked - t.upload_start)),
        );
        let sent = stats(
            reports
                .iter()
                .filter_map(|s| s.rounds.get(r).map(|t| t.sent - t.upload_start)),
        );
        rates.push((dl.1, sent.1, up.1));
        let wall = next - first_offer;
        cpu.push(cpu_between(&samples, first_offer, next));
        walls.push(ms(wall));
        let round = r + 1;
        let of = |f: fn(&RoundTimes) -> Instant| {
            reports.iter().filter_map(move |s| s.rounds.get(r).map(f))
        };
        events.push((first_offer, format!("round {round}: first offer")));
        if let Some(t) = of(|t| t.fetched).max() {
            events.push((t, format!("round {round}: last download done")));
        }
        if let Some(t) = of(|t| t.upload_start).min() {
            events.push((t, format!("round {round}: first upload starts")));
        }
        events.push((last_ack, format!("round {round}: last ack")));
        println!(
            "  {:>5} | {:>7.0} | {:>7.0} / {:>6.0} / {:>6.0}    | {:>7.0} / {:>6.0} / {:>6.0}      | {:>22.0} | {:>6.1}{}",
            r + 1,
            ms(wall),
            dl.0,
            dl.1,
            dl.2,
            up.0,
            up.1,
            up.2,
            ms(next.saturating_duration_since(last_ack)),
            mb(peak_in(first_offer, next)),
            if r + 1 == args.rounds as usize {
                "   (last round: ends at the job-finished Bye)"
            } else {
                ""
            }
        );
    }
    // Transfer rates per site: the upload apart from its acknowledgement
    // ("sent" = every byte acknowledged by the coordinator's QUIC stack;
    // "→ack" adds verification and durable acceptance).
    let link_mb_s = args.impair.link_mb_per_s();
    println!(
        "\n  round | download MB/s | upload sent MB/s | upload→ack MB/s   (per site, means{})",
        link_mb_s.map_or(String::new(), |l| format!("; % of the {l:.1} MB/s link"))
    );
    let rate = |bytes: f64, ms: f64| bytes / 1e6 / (ms / 1e3).max(1e-9);
    let pct = |v: f64| link_mb_s.map_or(String::new(), |l| format!(" ({:.0} %)", 100.0 * v / l));
    for (r, (dl, sent, up)) in rates.iter().enumerate() {
        let (d, s, a) = (
            rate(download_mb * 1e6, *dl),
            rate(upload_mb * 1e6, *sent),
            rate(upload_mb * 1e6, *up),
        );
        println!(
            "  {:>5} | {:>7.1}{:<6} | {:>7.1}{:<8} | {:>7.1}{}",
            r + 1,
            d,
            pct(d),
            s,
            pct(s),
            a,
            pct(a)
        );
    }
    // Where the round's time goes on this machine: CPU seconds per round
    // of the coordinator and of the simulated sites, against what the
    // cores could give in the same wall time. A round whose CPU use is
    // close to all cores is CPU-bound: it gets faster only with less work
    // per byte, not with more overlap.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "\n  round | coordinator CPU s | sites (this process) CPU s | CPU busy, % of {cores:.0} cores | CPU ms per MB moved (MB moved)"
    );
    let mut cpu_json = Vec::new();
    for (r, c) in cpu.iter().enumerate() {
        let moved =
            args.sites as f64 * (upload_mb + per_round.get(r).copied().unwrap_or(0) as f64 / 1e6);
        match c {
            Some((coord, sites, wall)) if wall.is_finite() && *wall > 0.0 => {
                let busy = (coord + sites) / (wall * cores);
                let per_mb = 1e3 * (coord + sites) / moved.max(1e-9);
                println!(
                    "  {:>5} | {coord:>17.2} | {sites:>26.2} | {:>26.0} % | {per_mb:>6.2} ({moved:.0})",
                    r + 1,
                    100.0 * busy
                );
                cpu_json.push(serde_json::json!({
                    "round": r + 1,
                    "coordinator_cpu_s": coord,
                    "loadgen_cpu_s": sites,
                    "sampled_wall_s": wall,
                    "busy_fraction_of_cores": busy,
                    "moved_mb": moved,
                    "cpu_ms_per_mb": per_mb,
                }));
            }
            _ => println!("  {:>5} | (no CPU samples)", r + 1),
        }
    }
    let mean = walls.iter().sum::<f64>() / walls.len().max(1) as f64;
    println!(
        "\n  mean round wall time {mean:.0} ms; whole job {:.2} s",
        total.as_secs_f64()
    );
    let all_cuts: Vec<CutReport> = reports.iter().flat_map(|r| r.cuts.clone()).collect();
    let max_record = payloads_max_record;
    // What the coordinator recorded of each drop: the bytes of a record
    // the drop left incomplete that had arrived (and were dropped).
    let dropped_at_coordinator: Vec<u64> =
        std::fs::read_to_string(data_dir.join("audit").join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "update.interrupted")
            .filter_map(|e| e["details"]["partial_record_bytes_dropped"].as_u64())
            .collect();
    if !all_cuts.is_empty() {
        println!(
            "  forced drops, at the coordinator: {} recorded (update.interrupted); bytes of a cut record that had arrived and were dropped, per drop: mean {:.0}, max {} (largest record {} B)",
            dropped_at_coordinator.len(),
            dropped_at_coordinator.iter().sum::<u64>() as f64
                / dropped_at_coordinator.len().max(1) as f64,
            dropped_at_coordinator.iter().max().copied().unwrap_or(0),
            max_record,
        );
        let resent: Vec<u64> = all_cuts.iter().map(|c| c.resent).collect();
        let to_resume = stats(all_cuts.iter().map(|c| c.to_resume));
        println!(
            "  forced drops, at the sites: {} (every upload cut {} times); payload bytes written on the dropped connection and sent again per drop (the partial record, plus what was still in flight or buffered): mean {:.0}, max {} (largest record {} B: {:.2} records); time to resume (drop → UploadProgress on a new connection) min/mean/max {:.0} / {:.0} / {:.0} ms",
            all_cuts.len(),
            args.cuts,
            resent.iter().sum::<u64>() as f64 / resent.len() as f64,
            resent.iter().max().copied().unwrap_or(0),
            max_record,
            resent.iter().max().copied().unwrap_or(0) as f64 / max_record.max(1) as f64,
            to_resume.0,
            to_resume.1,
            to_resume.2,
        );
    }
    let retries: u32 = reports.iter().map(|r| r.retries).sum();
    println!(
        "  connection attempts refused or failed and retried (backoff from {} ms): {retries} by {} of {} sites",
        args.retry_initial_ms,
        reports.iter().filter(|r| r.retries > 0).count(),
        args.sites
    );
    let max_sampled = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);
    println!(
        "  coordinator memory: VmHWM (peak RSS) {:.1} MB = {:.2}x the model ({model_mb:.1} MB); max sampled VmRSS {:.1} MB; RSS at start {:.1} MB, at end {:.1} MB",
        mb(hwm),
        mb(hwm) / model_mb,
        mb(max_sampled),
        mb(idle_rss),
        mb(end_rss),
    );
    if let Some(path) = &args.json {
        let mut sorted = walls.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        let doc = serde_json::json!({
            "tool": "fedlink-loadgen",
            "params": params,
            "sites": args.sites,
            "transport": args.transport,
            "congestion": args.congestion,
            "impair_delay_ms": args.impair.impair_delay_ms,
            "impair_loss": args.impair.impair_loss,
            "impair_rate_mbit": args.impair.impair_rate_mbit,
            "rounds": args.rounds,
            "codec": args.codec,
            "round_wall_ms": walls,
            "cores": cores,
            "cpu_per_round": cpu_json,
            "per_round_mean_ms_download_upload_sent_upload_ack": rates,
            "mean_round_s": mean / 1e3,
            "median_round_s": median / 1e3,
            "job_s": total.as_secs_f64(),
            "coordinator_peak_rss_mb": mb(hwm),
            "model_mb": model_mb,
            "upload_mb_per_site_round": upload_mb,
            "download_mb_per_site_round": download_mb,
            "cuts_per_upload": args.cuts,
            "connection_retries": retries,
            "handshake_limits_raised": handshake_limits.is_some(),
            "largest_record_bytes": max_record,
            "resent_bytes_per_cut": all_cuts.iter().map(|c| c.resent).collect::<Vec<_>>(),
            "arrived_and_dropped_bytes_per_cut": dropped_at_coordinator,
            "time_to_resume_ms": all_cuts.iter().map(|c| ms(c.to_resume)).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.rss_trace {
        events.push((
            reports.iter().map(|s| s.bye).min().unwrap_or(started),
            "job finished (Bye)".into(),
        ));
        let rel = |t: Instant| t.saturating_duration_since(started).as_secs_f64() * 1e3;
        let mut rows: Vec<(f64, String)> = samples
            .iter()
            .map(|s| (rel(s.at), format!("{:.1},", mb(s.rss_kb))))
            .chain(events.iter().map(|(t, e)| (rel(*t), format!(",{e}"))))
            .collect();
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut csv = String::from("ms,rss_mb,event\n");
        for (t, rest) in rows {
            csv.push_str(&format!("{t:.0},{rest}\n"));
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
        println!("  RSS trace written to {}", path.display());
    }
    match exit {
        Some(code) => println!("  coordinator stopped on SIGTERM: {code}"),
        None => println!("  coordinator did not stop within 15 s of SIGTERM: killed"),
    }
    if args.keep {
        let kept = work.keep();
        println!("  (work directory kept: {})", kept.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The job written to the coordinator reads back (with the
    /// coordinator's own parser) as the job built, with what the flags set.
    #[test]
    fn the_job_file_is_the_job_the_flags_describe() {
        for (codec, chunk) in [("f16", None), ("f32", Some(256)), ("topk", None)] {
            let mut args = Args::parse_from(["fedlink-loadgen", "--sites", "5", "--rounds", "2"]);
            args.codec = codec.to_owned();
            args.chunk_kib = chunk;
            let job = loadgen_job(&args).unwrap();
            let back = Job::from_toml(&job.to_toml().unwrap()).unwrap();
            assert_eq!(back, job, "{codec}");
            assert_eq!(back.rounds, 2);
            assert_eq!(back.selection.min_sites, Some(5));
            assert_eq!(back.round.quorum, 5);
            assert_eq!(back.evaluation.every_rounds, 0);
            assert_eq!(
                back.encoding.topk_fraction.is_some(),
                codec == "topk",
                "{codec}"
            );
            if let Some(k) = chunk {
                assert_eq!(back.encoding.chunk_bytes, k * 1024);
            }
        }
        let mut args = Args::parse_from(["fedlink-loadgen"]);
        args.codec = "zip".to_owned();
        assert!(loadgen_job(&args).unwrap_err().to_string().contains("zip"));
    }

    /// Up to the coordinator's defaults the config is left alone; beyond,
    /// every per-source handshake limit covers all sites at once, and the
    /// config file passes the coordinator's own parser and checks with them.
    #[test]
    fn handshake_limits_cover_every_simulated_site() {
        assert_eq!(loopback_handshake_limits(8), None);
        assert_eq!(loopback_handshake_limits(64), None);
        assert_eq!(loopback_handshake_limits(256), Some((256, 256.0, 256)));
        let (burst, rate, in_flight) = loopback_handshake_limits(1_000_000).unwrap();
        assert_eq!((burst, in_flight), (100_000, 100_000));
        assert!((rate - 100_000.0).abs() < 1e-9);
        let args = Args::parse_from(["fedlink-loadgen", "--sites", "256"]);
        let p = std::path::Path::new("/x");
        let addr = SocketAddr::from(([127, 0, 0, 1], 7443));
        let text = coordinator_config(&args, addr, [p, p, p, p], loopback_handshake_limits(256));
        let cfg = fedlink_coordinator::config::CoordinatorConfig::from_toml(&text, p, p).unwrap();
        assert_eq!(cfg.handshake_burst_per_source, 256);
        assert!((cfg.handshakes_per_source_per_sec - 256.0).abs() < 1e-9);
        assert_eq!(cfg.max_handshakes_in_flight, 256);
        let text = coordinator_config(&args, addr, [p, p, p, p], None);
        let cfg = fedlink_coordinator::config::CoordinatorConfig::from_toml(&text, p, p).unwrap();
        assert_eq!(cfg.handshake_burst_per_source, 64);
    }
}
