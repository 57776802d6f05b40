//! `fedlink-soak`: does anything leak over a long job with faults?
//!
//! Runs the real `fedlink-coordinator` binary as a separate process and N
//! simulated sites (default 100) in this process through a job of many
//! rounds (default 50) of a small model, with seeded faults: a site drops
//! its connection in the middle of an upload, or vanishes before answering
//! an offer, then reconnects; and the coordinator is killed (SIGKILL) once,
//! half way, and restarted from its data directory. After every completed
//! round it records the coordinator's resident memory (`VmRSS`), its open
//! file descriptors, and the disk use of the data directory's parts (spool,
//! update archive, audit log, models, database), and it checks the bounds
//! that must hold: the update archive keeps at most `update_retention`
//! rounds, every rotated audit file is at most `audit_rotate_bytes` plus one
//! entry, and the spool holds no finished upload.
//!
//! ```sh
//! cargo build --release -p fedlink-tests -p fedlink-coordinator --bins
//! target/release/fedlink-soak --sites 100 --rounds 50 --csv soak.csv
//! ```
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fedlink_certs::Kit;
use fedlink_protocol::FlatModel;
use fedlink_test_util::TestPki;
use fedlink_tests::raw_site::RawSite;
use rand::{Rng, SeedableRng};

/// Soak the coordinator: many rounds, many sites, drops, reconnects and a
/// crash, with memory, descriptors and disk recorded after every round.
#[derive(Debug, Parser)]
#[command(name = "fedlink-soak", version, about)]
struct Args {
    /// Simulated sites.
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// Rounds of the job.
    #[arg(long, default_value_t = 50)]
    rounds: u64,
    /// Logistic regression inputs (2 classes): the model is small on purpose.
    #[arg(long, default_value_t = 500)]
    inputs: u32,
    /// Probability that a site drops its connection in the middle of an
    /// upload (then reconnects).
    #[arg(long, default_value_t = 0.03)]
    p_drop_upload: f64,
    /// Probability that a site vanishes on receiving an offer (then
    /// reconnects).
    #[arg(long, default_value_t = 0.03)]
    p_vanish: f64,
    /// Kill the coordinator (SIGKILL) once this many rounds are complete,
    /// and restart it; 0: never.
    #[arg(long, default_value_t = 25)]
    restart_after: u64,
    /// `update_retention` of the coordinator (rounds of update archive).
    #[arg(long, default_value_t = 5)]
    update_retention: u64,
    /// `audit_rotate_bytes` of the coordinator.
    #[arg(long, default_value_t = 262_144)]
    audit_rotate_bytes: u64,
    /// Seed of the faults.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The coordinator executable (default: next to this executable).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Give up if no round completes within this many seconds.
    #[arg(long, default_value_t = 300)]
    stall_secs: u64,
    /// Write the per-round measurements as CSV to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Keep the work directory.
    #[arg(long)]
    keep: bool,
}

/// One row: the coordinator after a completed round.
#[derive(Debug, Clone)]
struct Row {
    round: u64,
    secs: f64,
    rss_kb: u64,
    anon_kb: u64,
    fds: usize,
    spool: u64,
    updates: u64,
    update_rounds: usize,
    audit: u64,
    audit_files: usize,
    models: u64,
    db: u64,
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
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("\nsoak FAILED: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Kills the coordinator if the soak stops early.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn job_toml(args: &Args) -> String {
    // Every site is offered every round; a round closes when all selected
    // sites have reported or at its deadline with 80 % of them.
    let quorum = (args.sites * 4 / 5).max(1);
    format!(
        r#"id = "soak"
rounds = {rounds}
seed = 3
arch = {{ kind = "logreg", inputs = {inputs}, classes = 2 }}
init = {{ seed = 11 }}

[strategy]
name = "fedavg"

[selection]
fraction = 1.0
min_sites = {quorum}
max_sites = {sites}
gather_secs = 1

[round]
deadline_secs = 10
quorum = {quorum}
extension_secs = 0
max_attempts = 3

[training]
epochs = 1
batch_size = 8
optimizer = "sgd"
learning_rate = 0.1

[encoding]
codec = "f16"
"#,
        rounds = args.rounds,
        inputs = args.inputs,
        sites = args.sites,
    )
}

fn start(bin: &Path, cfg: &Path, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(bin)
        .args(["serve", "--config"])
        .arg(cfg)
        // As the shipped systemd unit runs it (deploy/systemd): no malloc
        // variables, the binary's jemalloc is built with its options.
        .env("FEDLINK_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// `VmRSS`, and its anonymous part (`RssAnon`: the heap and stacks; the
/// rest is the mapped binary and files), kB.
fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Bytes of the regular files below `dir`, and how many there are.
fn du(dir: &Path) -> (u64, usize) {
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            let (b, n) = du(&e.path());
            total.0 += b;
            total.1 += n;
        } else {
            total.0 += meta.len();
            total.1 += 1;
        }
    }
    total
}

fn count_dirs(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count()
    })
}

/// Completed rounds from `status.json` (absent or half-written: `None`).
fn completed_rounds(status: &Path) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(status).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((
        v.get("completed_rounds")?.as_u64()?,
        v.get("completed").and_then(serde_json::Value::as_bool) == Some(true),
    ))
}

/// Faults seen by the sites.
#[derive(Debug, Default)]
struct Faults {
    drops: AtomicU64,
    vanishes: AtomicU64,
    reconnects: AtomicU64,
    uploads: AtomicU64,
}

/// One simulated site: connect (again after any failure, with a short
/// back-off), then answer offers, with the seeded faults.
async fn site(kit_dir: PathBuf, addr: SocketAddr, seed: u64, args: Arc<Args>, faults: Arc<Faults>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut first = true;
    loop {
        if !first {
            faults.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1200))).await;
        }
        first = false;
        let Ok(kit) = Kit::load(&kit_dir) else {
            return;
        };
        let Ok(mut s) = RawSite::connect(kit, addr).await else {
            continue;
        };
        loop {
            let Ok(offer) = s.next_offer().await else {
                break;
            };
            if rng.gen_bool(args.p_vanish) {
                faults.vanishes.fetch_add(1, Ordering::Relaxed);
                s.vanish();
                break;
            }
            if s.accept(&offer).await.is_err() {
                break;
            }
            let Ok(model) = s.fetch_model(&offer).await else {
                break;
            };
            let values = (0..model.values().len())
                .map(|_| rng.gen_range(-1e-3f32..1e-3))
                .collect();
            let Ok(delta) = FlatModel::new(model.spec().clone(), values) else {
                break;
            };
            let Ok(up) = s.prepare(&offer, &delta, 100) else {
                break;
            };
            if rng.gen_bool(args.p_drop_upload) {
                faults.drops.fetch_add(1, Ordering::Relaxed);
                let _ = s.upload(&up, Some(1)).await;
                s.vanish();
                break;
            }
            match s.upload(&up, None).await {
                Ok(Some(_)) => {
                    faults.uploads.fetch_add(1, Ordering::Relaxed);
                }
                _ => break,
            }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.sites == 0 || args.rounds == 0 {
        bail!("--sites and --rounds must be at least 1");
    }
    let bin = match &args.coordinator {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("fedlink-coordinator"),
    };
    if !bin.exists() {
        bail!(
            "{} is missing: build it (`cargo build --release -p fedlink-coordinator --bins`) or pass --coordinator",
            bin.display()
        );
    }
    let pki = tokio::task::spawn_blocking({
        let n = args.sites;
        move || TestPki::new(n)
    })
    .await??;
    let work = tempfile::Builder::new().prefix("fedlink-soak-").tempdir()?;
    let job = work.path().join("job.toml");
    std::fs::write(&job, job_toml(&args))?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let data = work.path().join("data");
    let ca_dir = pki
        .manifest_path()
        .parent()
        .context("manifest has no directory")?
        .to_owned();
    let cfg = work.path().join("coordinator.toml");
    // All simulated sites share 127.0.0.1: lift the per-address handshake
    // budget, which real sites each have for themselves.
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{addr}\"\nkit = {:?}\nca_dir = {:?}\ndata_dir = {:?}\njob = {:?}\n\
             heartbeat_interval_secs = 5\nidle_timeout_secs = 30\n\
             update_retention = {}\naudit_rotate_bytes = {}\n\
             handshake_burst_per_source = 100000\nhandshakes_per_source_per_sec = 100000\n",
            pki.coordinator_dir(),
            ca_dir,
            data,
            job,
            args.update_retention,
            args.audit_rotate_bytes,
        ),
    )?;
    let log = work.path().join("coordinator.log");
    let status = data.join(fedlink_coordinator::server::STATUS_FILE);
    println!(
        "fedlink-soak: {} sites, {} rounds of a {}-parameter model, faults p_drop_upload {} p_vanish {} (seed {}), coordinator killed after round {}; work dir {}",
        args.sites,
        args.rounds,
        u64::from(args.inputs) * 2 + 2,
        args.p_drop_upload,
        args.p_vanish,
        args.seed,
        args.restart_after,
        work.path().display()
    );
    let mut proc = Proc(Some(start(&bin, &cfg, &log)?));
    let args = Arc::new(args);
    let faults = Arc::new(Faults::default());
    let mut sites = Vec::new();
    for i in 0..args.sites {
        sites.push(tokio::spawn(site(
            pki.site_dir(i)?.to_path_buf(),
            addr,
            args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
            args.clone(),
            faults.clone(),
        )));
    }

    let t0 = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut seen = 0u64;
    let mut restarted = false;
    let mut last_progress = Instant::now();
    let mut violations = Vec::new();
    println!(
        "\n  round |  time s | RSS MB (anon) | fds | spool KB | updates KB (rounds) | audit KB (files) | models KB | db KB"
    );
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(c) = proc.0.as_mut() else {
            bail!("no coordinator");
        };
        if let Some(code) = c.try_wait()? {
            bail!("the coordinator exited with {code}; see {}", log.display());
        }
        let pid = c.id();
        let Some((done, finished)) = completed_rounds(&status) else {
            continue;
        };
        if done > seen {
            seen = done;
            last_progress = Instant::now();
            let (spool, spool_files) = du(&data.join("spool"));
            let (updates, _) = du(&data.join("updates"));
            let update_rounds = std::fs::read_dir(data.join("updates"))
                .map_or(0, |d| d.flatten().map(|e| count_dirs(&e.path())).sum());
            let (audit, audit_files) = du(&data.join("audit"));
            let (models, _) = du(&data.join("models"));
            let db = std::fs::metadata(data.join(fedlink_coordinator::store::DB_FILE))
                .map_or(0, |m| m.len());
            let (rss, anon) = rss_kb(pid).unwrap_or((0, 0));
            let row = Row {
                round: done,
                secs: t0.elapsed().as_secs_f64(),
                rss_kb: rss,
                anon_kb: anon,
                fds: fds(pid),
                spool,
                updates,
                update_rounds,
                audit,
                audit_files,
                models,
                db,
            };
            println!(
                "  {:>5} | {:>7.1} | {:>6.1} ({:>5.1}) | {:>3} | {:>8.1} | {:>10.1} ({:>4}) | {:>8.1} ({:>3}) | {:>9.1} | {:>5.0}",
                row.round,
                row.secs,
                row.rss_kb as f64 / 1024.0,
                row.anon_kb as f64 / 1024.0,
                row.fds,
                row.spool as f64 / 1024.0,
                row.updates as f64 / 1024.0,
                row.update_rounds,
                row.audit as f64 / 1024.0,
                row.audit_files,
                row.models as f64 / 1024.0,
                row.db as f64 / 1024.0,
            );
            // The bounds that must hold after every round.
            if row.update_rounds as u64 > args.update_retention + 1 {
                violations.push(format!(
                    "round {done}: update archive holds {} rounds (update_retention {}, + the round in flight)",
                    row.update_rounds, args.update_retention
                ));
            }
            if spool_files > args.sites {
                violations.push(format!(
                    "round {done}: {spool_files} spool files for {} sites",
                    args.sites
                ));
            }
            for f in std::fs::read_dir(data.join("audit"))?.flatten() {
                let len = f.metadata().map_or(0, |m| m.len());
                let rotated = f.file_name() != "audit.jsonl"
                    && f.file_name().to_string_lossy().ends_with(".jsonl");
                if rotated && len > args.audit_rotate_bytes + 64 * 1024 {
                    violations.push(format!(
                        "round {done}: rotated audit file {} is {len} bytes (audit_rotate_bytes {})",
                        f.file_name().to_string_lossy(),
                        args.audit_rotate_bytes
                    ));
                }
            }
            rows.push(row);
            if args.restart_after > 0 && done >= args.restart_after && !restarted {
                restarted = true;
                println!("  -- coordinator killed (SIGKILL) after round {done}, restarted --");
                if let Some(mut c) = proc.0.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                proc.0 = Some(start(&bin, &cfg, &log)?);
            }
        }
        if finished || seen >= args.rounds {
            break;
        }
        if last_progress.elapsed() > Duration::from_secs(args.stall_secs) {
            bail!(
                "no round completed for {} s (at round {seen}); see {}",
                args.stall_secs,
                log.display()
            );
        }
    }
    let total = t0.elapsed();
    for s in &sites {
        s.abort();
    }
    // A clean stop (SIGTERM), then the auditor's check: the coordinator's
    // whole log, across the crash and every rotation, verifies with its key.
    if let Some(mut c) = proc.0.take() {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let by = Instant::now() + Duration::from_secs(15);
        while c.try_wait()?.is_none() {
            if Instant::now() > by {
                let _ = c.kill();
                let _ = c.wait();
                violations.push("the coordinator did not stop within 15 s of SIGTERM".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let key = fedlink_audit::load_verifying_key(data.join("audit/audit-key.pub"))?;
    let files = fedlink_audit::segments(data.join("audit/audit.jsonl"))?;
    match fedlink_audit::verify(&files, &key, None) {
        Ok(r) => println!(
            "  coordinator audit log verified after the crash and the stop: {} entries in {} files",
            r.entries,
            files.len()
        ),
        Err(e) => violations.push(format!("the coordinator's audit log does not verify: {e}")),
    }
    println!(
        "\n  {} rounds in {:.0} s; site uploads acknowledged {}, uploads dropped mid-way {}, offers vanished from {}, reconnections {}",
        seen,
        total.as_secs_f64(),
        faults.uploads.load(Ordering::Relaxed),
        faults.drops.load(Ordering::Relaxed),
        faults.vanishes.load(Ordering::Relaxed),
        faults.reconnects.load(Ordering::Relaxed),
    );
    summarize(&rows, args.restart_after);
    if let Some(path) = &args.csv {
        let mut csv = String::from(
            "round,secs,rss_kb,anon_kb,fds,spool_bytes,updates_bytes,update_rounds,audit_bytes,audit_files,models_bytes,db_bytes\n",
        );
        for r in &rows {
            csv.push_str(&format!(
                "{},{:.1},{},{},{},{},{},{},{},{},{},{}\n",
                r.round,
                r.secs,
                r.rss_kb,
                r.anon_kb,
                r.fds,
                r.spool,
                r.updates,
                r.update_rounds,
                r.audit,
                r.audit_files,
                r.models,
                r.db
            ));
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
        println!("  per-round CSV written to {}", path.display());
    }
    if args.keep {
        println!("  (work directory kept: {})", work.keep().display());
    }
    if violations.is_empty() {
        println!(
            "  bounds held after every round: update archive ≤ update_retention rounds, rotated audit files ≤ audit_rotate_bytes + one entry, spool ≤ one file per site"
        );
        Ok(true)
    } else {
        for v in &violations {
            println!("  BOUND VIOLATED: {v}");
        }
        Ok(false)
    }
}

/// Growth per round of each quantity, fitted by least squares over the
/// steady part of each process's life (from its 5th round on).
fn summarize(rows: &[Row], restart_after: u64) {
    let mut lives: BTreeMap<bool, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        lives
            .entry(restart_after > 0 && r.round > restart_after)
            .or_default()
            .push(r);
    }
    for (after, rows) in lives {
        let first = rows.first().map_or(0, |r| r.round);
        let steady: Vec<&&Row> = rows.iter().filter(|r| r.round >= first + 4).collect();
        if steady.len() < 3 {
            continue;
        }
        let slope = |f: &dyn Fn(&Row) -> f64| {
            let n = steady.len() as f64;
            let xs: Vec<f64> = steady.iter().map(|r| r.round as f64).collect();
            let ys: Vec<f64> = steady.iter().map(|r| f(r)).collect();
            let mx = xs.iter().sum::<f64>() / n;
            let my = ys.iter().sum::<f64>() / n;
            let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
            let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
            if sxx == 0.0 { 0.0 } else { sxy / sxx }
        };
        let (lo, hi) = (
            steady.first().map_or(0, |r| r.round),
            steady.last().map_or(0, |r| r.round),
        );
        println!(
            "  {} (rounds {lo}..={hi}), growth per round: RSS {:+.1} KB (anonymous {:+.1} KB), round time {:+.1} ms, fds {:+.2}, spool {:+.1} KB, update archive {:+.1} KB, audit {:+.1} KB, models {:+.1} KB, db {:+.1} KB",
            if after {
                "after the restart"
            } else {
                "first process"
            },
            slope(&|r| r.rss_kb as f64),
            slope(&|r| r.anon_kb as f64),
            slope_of_round_time(&steady),
            slope(&|r| r.fds as f64),
            slope(&|r| r.spool as f64 / 1024.0),
            slope(&|r| r.updates as f64 / 1024.0),
            slope(&|r| r.audit as f64 / 1024.0),
            slope(&|r| r.models as f64 / 1024.0),
            slope(&|r| r.db as f64 / 1024.0),
        );
    }
}

/// Change of the round time per round (ms), by least squares over the
/// time each round took (the gap between consecutive rows).
fn slope_of_round_time(rows: &[&&Row]) -> f64 {
    let pts: Vec<(f64, f64)> = rows
        .windows(2)
        .map(|w| (w[1].round as f64, (w[1].secs - w[0].secs) * 1e3))
        .collect();
    let n = pts.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}
