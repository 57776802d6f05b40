//! A real coordinator (the library's `serve`, real QUIC + mTLS, real store)
//! on `127.0.0.1:0` for end-to-end tests, with its job and config written
//! into a temporary directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use fedlink_coordinator::config::CoordinatorConfig;
use fedlink_coordinator::job::{
    CodecKind, InitSource, Job, Privacy, RoundPolicy, Selection, StrategySection, TrainingConfig,
};
use fedlink_coordinator::server::{ServeError, ServeOptions, ServeOutcome, Status, serve};
use fedlink_protocol::arch::ArchSpec;
use fedlink_test_util::TestPki;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::bounded;

/// Knobs of the test job (a tiny logistic regression).
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// Job id.
    pub id: String,
    /// Rounds.
    pub rounds: u32,
    /// Sites per round (min = max).
    pub sites: u32,
    /// Updates needed to close a round.
    pub quorum: u32,
    /// Round deadline, seconds.
    pub deadline_secs: u64,
    /// Features of the logistic regression.
    pub inputs: u32,
    /// Wire codec.
    pub codec: CodecKind,
    /// `[encoding] chunk_bytes` (`None`: the default).
    pub chunk_bytes: Option<u32>,
    /// `[evaluation] every_rounds` (0: never). Default 1.
    pub evaluation_every_rounds: u32,
    /// `[privacy]`: clipping and central noise. Default none.
    pub privacy: Privacy,
    /// `[strategy] max_examples_per_site` (`None`: the default).
    pub max_examples_per_site: Option<u64>,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            id: "e2e".into(),
            rounds: 3,
            sites: 3,
            quorum: 3,
            deadline_secs: 30,
            inputs: 4,
            codec: CodecKind::F32,
            chunk_bytes: None,
            evaluation_every_rounds: 1,
            privacy: Privacy::default(),
            max_examples_per_site: None,
        }
    }
}

impl JobSpec {
    /// The job: FedAvg, every site in every round, one epoch of SGD (batch
    /// 8, lr 0.1) per round.
    pub fn job(&self) -> Job {
        let mut strategy = StrategySection::named("fedavg");
        strategy.max_examples_per_site = self.max_examples_per_site;
        let mut job = Job::new(
            self.id.clone(),
            self.rounds,
            ArchSpec::LogReg {
                inputs: self.inputs,
                classes: 2,
            },
            InitSource::Seed(11),
            strategy,
            RoundPolicy {
                quorum: self.quorum,
                ..RoundPolicy::with_deadline(self.deadline_secs)
            },
        );
        job.seed = 3;
        job.selection = Selection::exactly(self.sites, 0);
        job.training = TrainingConfig::sgd(1, 8, 0.1);
        job.encoding.codec = self.codec;
        job.encoding.shuffle = true;
        job.encoding.zstd_level = 1;
        if let Some(chunk) = self.chunk_bytes {
            job.encoding.chunk_bytes = chunk;
        }
        job.privacy = self.privacy.clone();
        job.evaluation.every_rounds = self.evaluation_every_rounds;
        job
    }
}

/// Write the job file of `spec` (`<id>.toml`, validated first).
pub fn write_job(dir: &Path, spec: &JobSpec) -> anyhow::Result<PathBuf> {
    let job = spec.job();
    job.validate()?;
    write_job_file(dir, &job)
}

/// Write `job` as `<id>.toml` in `dir` with the coordinator's own
/// [`Job::to_toml`] (not validated: a test may write a job the coordinator
/// must refuse).
pub fn write_job_file(dir: &Path, job: &Job) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{}.toml", job.id));
    std::fs::write(&path, job.to_toml()?)?;
    Ok(path)
}

/// The free disk space the tests' coordinators keep (`min_free_disk_mib`).
///
/// The product's default, 512 MiB, keeps room for a hospital's audit log.
/// A test's data directory holds a few MiB, and a CI machine whose build
/// left a few hundred MiB free must still run the tests: one such run had
/// 162 MiB free and every coordinator refused its admin client as "low on
/// disk space". The guard itself is tested with a reserve no disk meets
/// (`hostile.rs`).
pub const TEST_MIN_FREE_DISK_MIB: u64 = 8;

/// Write `coordinator.toml` for `pki`, listening on `listen`.
pub fn write_config(
    pki: &TestPki,
    dir: &Path,
    job: &Path,
    listen: SocketAddr,
) -> anyhow::Result<PathBuf> {
    let ca_dir = pki
        .manifest_path()
        .parent()
        .context("manifest has no directory")?
        .to_owned();
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"{listen}\"\nkit = {:?}\nca_dir = {:?}\ndata_dir = {:?}\njob = {:?}\nheartbeat_interval_secs = 1\nidle_timeout_secs = 10\nmin_free_disk_mib = {TEST_MIN_FREE_DISK_MIB}\n",
            pki.coordinator_dir(),
            ca_dir,
            dir.join("data"),
            job
        ),
    )?;
    Ok(path)
}

/// A coordinator running in this process.
pub struct RunningCoordinator {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<ServeOutcome, ServeError>>,
}

impl RunningCoordinator {
    /// A coordinator on a free loopback port in `dir`, running the job of
    /// `spec` (written there) for `pki`'s federation, exiting after it.
    pub async fn start_job(spec: &JobSpec, pki: &TestPki, dir: &Path) -> anyhow::Result<Self> {
        let job = write_job(dir, spec)?;
        let cfg = write_config(pki, dir, &job, "127.0.0.1:0".parse()?)?;
        Self::start(&cfg, true).await
    }

    /// Start `serve` with `config` (exits after the job when asked).
    pub async fn start(config: &Path, exit_after_job: bool) -> anyhow::Result<Self> {
        let cfg = CoordinatorConfig::load(config)?;
        let data_dir = cfg.data_dir.clone();
        let (bound_tx, mut bound_rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(
            cfg,
            ServeOptions {
                exit_after_job,
                bound: Some(bound_tx),
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let Some(addr) = bounded("coordinator bind", bound_rx.recv()).await? else {
            // Say why: a test that fails here must show the coordinator's
            // own error, not only that it stopped.
            let why = match bounded("coordinator stop", handle).await? {
                Ok(Ok(outcome)) => format!("serve returned {outcome:?}"),
                Ok(Err(e)) => format!("{e}"),
                Err(join) => format!("serve task: {join}"),
            };
            anyhow::bail!("the coordinator stopped before binding: {why}");
        };
        Ok(Self {
            addr,
            data_dir,
            stop: Some(stop),
            handle,
        })
    }

    /// The status file as it is now.
    pub fn status(&self) -> anyhow::Result<Status> {
        read_status(&self.data_dir)
    }

    /// Wait for the coordinator to stop by itself (job finished), failing
    /// after `limit` (a safety net for jobs that train for real).
    pub async fn finished_within(self, limit: Duration) -> anyhow::Result<ServeOutcome> {
        let Self { handle, stop, .. } = self;
        let out = tokio::time::timeout(limit, handle)
            .await
            .with_context(|| format!("the job did not finish within {limit:?}"))??;
        drop(stop);
        Ok(out?)
    }

    /// Wait for the coordinator to stop by itself (job finished), failing
    /// after [`crate::JOB_TIMEOUT`] (a hung job is a failure, not a wait).
    pub async fn finished(self) -> anyhow::Result<ServeOutcome> {
        self.finished_within(crate::JOB_TIMEOUT).await
    }

    /// Stop it (graceful shutdown) and return what it says.
    pub async fn shutdown(mut self) -> anyhow::Result<ServeOutcome> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        Ok(bounded("shutdown", self.handle).await???)
    }
}

/// Read `status.json` of a data directory.
pub fn read_status(data_dir: &Path) -> anyhow::Result<Status> {
    let path = data_dir.join(fedlink_coordinator::server::STATUS_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Poll `status.json` of `data_dir` (every 10 ms) until `done` holds for
/// it, failing after `limit`. A missing or half-written file counts as "not
/// yet" (the coordinator may not have started).
pub async fn wait_for_status(
    data_dir: &Path,
    what: &str,
    limit: Duration,
    mut done: impl FnMut(&Status) -> bool,
) -> anyhow::Result<Status> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        if let Ok(s) = read_status(data_dir) {
            if done(&s) {
                return Ok(s);
            }
            last = Some(s);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{what}: not reached within {limit:?}; last status: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A loopback UDP address that was free a moment ago (bound to port 0 and
/// released), for a coordinator that must come up later or come back on
/// the same port.
pub fn free_udp_addr() -> anyhow::Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?)
}

/// A binary of this workspace, from the target directory of the running
/// test (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} has no target directory", exe.display()))?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        anyhow::bail!(
            "{} does not exist: run `cargo build --bins` first (`cargo test --workspace` builds it too)",
            path.display()
        );
    }
    Ok(path)
}

/// The WDBC hospital split `i` (a, b, c, then again) shipped in `data/`.
pub fn wdbc_hospital_csv(i: usize) -> PathBuf {
    let name = ["a", "b", "c"][i % 3];
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/breast_cancer_wisconsin/splits")
        .join(format!("hospital_{name}.csv"))
}

/// `site.toml` text for a real agent of site `i` of `pki` (kit `site-i`,
/// state in `site-i/` next to the file, WDBC hospital split `i`), pointed
/// at `coordinator`, with short reconnection delays and a policy that
/// allows the test federation's logistic-regression jobs (f32 deltas, one
/// epoch).
pub fn wdbc_site_toml(pki: &TestPki, i: usize, coordinator: SocketAddr) -> anyhow::Result<String> {
    Ok(format!(
        r#"
kit_dir = {kit:?}
data_dir = "site-{i}"
device = "cpu"
coordinator_addr = "{coordinator}"

[connection]
backoff_initial_ms = 20
backoff_max_ms = 200
connect_timeout_ms = 1000
idle_timeout_ms = 3000

[dataset]
kind = "csv"
path = {csv:?}
label_column = "malignant"
validation_fraction = 0.2
split_seed = 7

[policy]
federations = ["{federation}"]
architectures = ["logreg"]
min_local_samples = 20
max_epochs = 1
encodings = ["f32"]
"#,
        kit = pki.site_dir(i)?,
        csv = wdbc_hospital_csv(i),
        federation = fedlink_test_util::FEDERATION,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedlink_coordinator::job::{DeltaEncoding, LocalOptimizer};

    /// The job file the fixture writes is read by the coordinator's own
    /// parser (from disk, as `serve` does) with every knob set in it.
    #[test]
    fn the_fixture_job_file_parses_with_the_coordinators_parser() {
        let dir = tempfile::tempdir().unwrap();
        let spec = JobSpec {
            id: "knobs".into(),
            rounds: 2,
            sites: 4,
            quorum: 3,
            deadline_secs: 45,
            inputs: 7,
            codec: CodecKind::F16,
            chunk_bytes: Some(16),
            evaluation_every_rounds: 0,
            privacy: Privacy {
                clip_norm: Some(5.0),
                noise_multiplier: 0.5,
                target_delta: Some(1e-5),
            },
            max_examples_per_site: Some(1000),
        };
        let job = Job::from_file(&write_job(dir.path(), &spec).unwrap()).unwrap();
        assert_eq!(job, spec.job());
        assert_eq!((job.id.as_str(), job.rounds), ("knobs", 2));
        assert_eq!(
            job.arch,
            ArchSpec::LogReg {
                inputs: 7,
                classes: 2
            }
        );
        assert_eq!(job.strategy.name, "fedavg");
        assert_eq!(job.max_examples_per_site(), 1000);
        assert_eq!((job.min_sites(), job.max_sites()), (4, 4));
        assert_eq!((job.round.quorum, job.round.deadline_secs), (3, 45));
        assert_eq!(job.training.optimizer, LocalOptimizer::Sgd);
        assert_eq!(job.training.learning_rate, 0.1);
        assert_eq!(
            (job.encoding.codec, job.encoding.chunk_bytes),
            (CodecKind::F16, 16)
        );
        assert_eq!(job.privacy, spec.privacy);
        assert_eq!(job.evaluation.every_rounds, 0);
        // The defaults: what the tests wrote by hand before.
        let job = JobSpec::default().job();
        assert_eq!(
            job.encoding.chunk_bytes,
            DeltaEncoding::default().chunk_bytes
        );
        assert_eq!(job.evaluation.every_rounds, 1);
        assert_eq!(job.privacy, Privacy::default());
        assert_eq!(job.strategy.max_examples_per_site, None);
    }
}
