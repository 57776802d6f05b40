//! A real coordinator (the library's `serve`, real QUIC + mTLS, real store)
//! on `127.0.0.1:0` for end-to-end tests, with its job and config written
//! into a temporary directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use fedlink_coordinator::config::CoordinatorConfig;
use fedlink_coordinator::server::{ServeError, ServeOptions, ServeOutcome, Status, serve};
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
    pub codec: String,
    /// TOML appended to the job file (e.g. a `[privacy]` table).
    pub extra: String,
    /// TOML lines added to the `[strategy]` table (e.g.
    /// `max_examples_per_site = 100`).
    pub strategy: String,
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
            codec: "f32".into(),
            extra: String::new(),
            strategy: String::new(),
        }
    }
}

/// Write the job file.
pub fn write_job(dir: &Path, spec: &JobSpec) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{}.toml", spec.id));
    std::fs::write(
        &path,
        format!(
            r#"id = "{id}"
rounds = {rounds}
seed = 3
arch = {{ kind = "logreg", inputs = {inputs}, classes = 2 }}
init = {{ seed = 11 }}

[strategy]
name = "fedavg"
{strategy}

[selection]
fraction = 1.0
min_sites = {sites}
max_sites = {sites}
gather_secs = 0

[round]
deadline_secs = {deadline}
quorum = {quorum}
extension_secs = 0
max_attempts = 1

[training]
epochs = 1
batch_size = 8
optimizer = "sgd"
learning_rate = 0.1

[encoding]
codec = "{codec}"
shuffle = true
zstd_level = 1
{extra}
"#,
            id = spec.id,
            rounds = spec.rounds,
            inputs = spec.inputs,
            sites = spec.sites,
            deadline = spec.deadline_secs,
            quorum = spec.quorum,
            codec = spec.codec,
            extra = spec.extra,
            strategy = spec.strategy,
        ),
    )?;
    Ok(path)
}

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
            "listen = \"{listen}\"\nkit = {:?}\nca_dir = {:?}\ndata_dir = {:?}\njob = {:?}\nheartbeat_interval_secs = 1\nidle_timeout_secs = 10\n",
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
