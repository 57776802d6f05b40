//! The one-command local federation demo (`./demo`, binary `fedlink-demo`).
//!
//! For each task it provisions a federation with the real `fedlink certs`
//! CLI, starts `fedlink-coordinator` and one `fedlink-agent` per hospital as
//! separate processes on 127.0.0.1 (each agent sees only its own CSV file),
//! follows the job round by round through the coordinator's `status.json`
//! and model files, evaluates every new global model on a held-out test set
//! that no site holds (standardised with the federation's feature scaling
//! from `status.json`, as the sites standardise their data), and ends with a
//! summary against a centrally trained baseline (standardised with the
//! pooled training data's statistics) and each hospital's local-only model.
//!
//! Tasks:
//! - breast cancer (WDBC), split non-IID across 3 hospitals;
//! - the OPT preterm-birth trial, split by its 4 real hospitals;
//! - nuclei segmentation (2018 Data Science Bowl image, 512×512): each of 4
//!   sites holds tiles of its own quadrant (non-IID), the bottom quarter of
//!   every quadrant is held out; a U-Net with seeded augmentation, judged by
//!   Dice, against the same U-Net trained centrally, each site's local-only
//!   U-Net and Otsu's threshold. `--full` trains the ≥ 10M-parameter U-Net.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod tabular_choice;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedlink_agent::data::Samples;
use fedlink_agent::data::segmentation::{
    SegmentationConfig, SegmentationSource, load_segmentation,
};
use fedlink_agent::data::tabular::{TabularConfig, load_tabular, load_tabular_test};
use fedlink_agent::metrics::{dice, otsu_threshold};
use fedlink_agent::train::{EvalMetrics, OptimizerKind, TrainConfig, evaluate, train_local};
use fedlink_coordinator::server::Status;
use fedlink_coordinator::server::status::RoundStatus;
use fedlink_coordinator::store::read_model_file;
use fedlink_protocol::admin::FederatedEvaluation;
use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::{FeatureScaling, FlatModel, ModelHash};

use fedlink_coordinator::job::{
    AugmentationConfig, ClassWeightConfig, CodecKind, InitSource, IntensityJitterConfig, Job,
    LocalOptimizer, RoundPolicy, Selection, StrategySection,
};
use indicatif::{ProgressBar, ProgressStyle};
use tabular_choice::{Server, Setting, TaskData, train_chunked};

/// One federated task of the demo.
#[derive(Clone, Debug)]
pub struct Task {
    /// Short name (also the federation name).
    pub name: &'static str,
    /// Human title.
    pub title: &'static str,
    /// Label column.
    pub label: &'static str,
    /// Columns the model must not see (ids, site codes, leaked outcomes).
    pub drop: &'static [&'static str],
    /// (hospital, training CSV relative to the repo's data dir).
    pub sites: Vec<(&'static str, &'static str)>,
    /// Held-out global test CSV (no site has it).
    pub test: &'static str,
    /// Rounds.
    pub rounds: u32,
    /// Local epochs per round.
    pub epochs: u32,
    /// Learning rate (SGD).
    pub lr: f64,
    /// Wire codec of the deltas: `f32`, `f16`, `bf16`, `int8`, or
    /// `topk:<fraction>` (e.g. `topk:0.1`).
    pub codec: &'static str,
    /// Sites always download the whole model (`[encoding] downlink =
    /// "model"`) instead of each round's global update encoded with
    /// `codec`: to compare the two.
    pub full_model_downloads: bool,
    /// What the sites hold and the model trains on.
    pub kind: TaskKind,
    /// Settings chosen on validation data (tabular tasks; `None`: the
    /// task's `lr`, SGD and FedAvg for every method, and baselines trained
    /// on each hospital's whole file).
    pub chosen: Option<Chosen>,
    /// The federation's server strategy, where it is not `chosen`'s
    /// (`None`: `chosen`'s, else FedAvg).
    pub server: Option<Server>,
    /// Train the central and local-only baselines (`false`: the federation
    /// alone, e.g. while choosing its settings on the sites' validation
    /// data; the summary then has no baselines to compare with).
    pub baselines: bool,
}

/// A tabular task's settings, each method's chosen on validation data by
/// `fedlink-opt-sweep` (see [`crate::tabular_choice`]). Every model trains
/// on the hospitals' 80 % training parts (the agents' split, seed 7); the
/// federation runs `Task::rounds` rounds of its setting's epochs, a
/// baseline its `rounds` chunks of its own setting's epochs.
#[derive(Clone, Debug)]
pub struct Chosen {
    /// The federation's site optimizer, learning rate, class weighting and
    /// server strategy (its rounds are `Task::rounds`).
    pub federated: Setting,
    /// The central baseline's setting and chunks.
    pub central: (Setting, u32),
    /// Each hospital's local-only setting and chunks, in `Task::sites`
    /// order.
    pub local: Vec<(Setting, u32)>,
}

/// The kind of data of a task.
#[derive(Clone, Debug)]
pub enum TaskKind {
    /// One CSV per hospital, logistic regression, judged by AUC.
    Tabular,
    /// Tiles of the nuclei image, U-Net, judged by Dice.
    Nuclei(NucleiSpec),
}

/// The nuclei task's model and training.
#[derive(Clone, Debug)]
pub struct NucleiSpec {
    /// Tile side (pixels).
    pub tile: u32,
    /// U-Net width.
    pub base_channels: u32,
    /// U-Net depth.
    pub depth: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Round deadline, seconds.
    pub deadline_secs: u64,
}

impl NucleiSpec {
    /// The U-Net.
    pub fn arch(&self) -> ArchSpec {
        ArchSpec::UNet {
            in_channels: 1,
            base_channels: self.base_channels,
            depth: self.depth,
            classes: 2,
        }
    }
}

/// The nuclei segmentation task: the default demo's small U-Net, or with
/// `full` the ≥ 10M-parameter one (base 20, depth 5: 12,155,322
/// parameters).
pub fn nuclei_task(full: bool) -> Task {
    let spec = if full {
        NucleiSpec {
            tile: 64,
            base_channels: 20,
            depth: 5,
            batch_size: 8,
            deadline_secs: 1800,
        }
    } else {
        NucleiSpec {
            tile: 32,
            base_channels: 8,
            depth: 3,
            batch_size: 8,
            deadline_secs: 300,
        }
    };
    Task {
        name: "nuclei",
        title: if full {
            "Nuclei segmentation (DSB 2018), 4 sites by region, U-Net 12.2M params (--full)"
        } else {
            "Nuclei segmentation (DSB 2018), 4 sites by region, small U-Net"
        },
        label: "",
        drop: &[],
        sites: vec![
            ("site-nw", "nw"),
            ("site-ne", "ne"),
            ("site-sw", "sw"),
            ("site-se", "se"),
        ],
        test: "held-out",
        // Chosen on the sites' validation tiles (the hospitals' federated
        // evaluation of the final model), never on the held-out tiles, among
        // FedAvg / FedAvgM / FedAdam and the local epochs per round (the
        // tables are in docs/PERFORMANCE.md): server momentum 0.5 and more
        // local epochs won at both sizes. Baselines train as many epochs as
        // a site does in all (--full 60, default 40).
        rounds: if full { 15 } else { 8 },
        epochs: if full { 4 } else { 5 },
        lr: 0.01,
        codec: "f16",
        full_model_downloads: false,
        kind: TaskKind::Nuclei(spec),
        chosen: None,
        server: Some(Server::FedAvgM {
            lr: 1.0,
            momentum: 0.5,
        }),
        baselines: true,
    }
}

/// The demo's tasks.
pub fn tasks() -> Vec<Task> {
    vec![
        Task {
            name: "wdbc",
            title: "Breast cancer (WDBC), 3 hospitals, non-IID",
            label: "malignant",
            drop: &[],
            sites: vec![
                (
                    "hospital-a",
                    "breast_cancer_wisconsin/splits/hospital_a.csv",
                ),
                (
                    "hospital-b",
                    "breast_cancer_wisconsin/splits/hospital_b.csv",
                ),
                (
                    "hospital-c",
                    "breast_cancer_wisconsin/splits/hospital_c.csv",
                ),
            ],
            test: "breast_cancer_wisconsin/splits/global_test.csv",
            // An averaged FedAvg round moves the model about as far as one
            // site's local epochs (≈ 9 SGD steps per epoch here) while the
            // central baseline takes ≈ 28 steps per epoch on the pooled
            // data: at 20 rounds × lr 0.05 the federated model is still
            // under-trained (held-out loss 0.041 vs 0.026). 30 rounds at
            // lr 0.1 converge; the baseline gets the same lr and 60 epochs.
            rounds: 30,
            epochs: 2,
            lr: 0.1,
            codec: "f16",
            full_model_downloads: false,
            kind: TaskKind::Tabular,
            chosen: None,
            server: None,
            baselines: true,
        },
        Task {
            name: "opt",
            title: "Preterm birth (OPT trial), 4 real hospitals",
            label: "preterm",
            drop: &["site", "pid", "gestational_age_days"],
            sites: vec![
                ("ky", "opt_preterm_4hospitals/splits/KY/train.csv"),
                ("mn", "opt_preterm_4hospitals/splits/MN/train.csv"),
                ("ms", "opt_preterm_4hospitals/splits/MS/train.csv"),
                ("ny", "opt_preterm_4hospitals/splits/NY/train.csv"),
            ],
            test: "opt_preterm_4hospitals/splits/global_test.csv",
            // Chosen on validation data, never on the test set:
            // `target/debug/fedlink-opt-sweep` after `./demo`'s build (60
            // candidates per method: weight decay and 1 or 2 local epochs
            // included, stopping point within 80 local epochs, mean
            // validation AUC over 10 seeded 80/20 splits of each hospital's
            // training file; the table is in docs/PERFORMANCE.md).
            rounds: 26,
            epochs: 1,
            lr: 0.01,
            codec: "f16",
            full_model_downloads: false,
            kind: TaskKind::Tabular,
            chosen: Some(opt_chosen()),
            server: None,
            baselines: true,
        },
        nuclei_task(false),
    ]
}

/// Apply local epochs, a learning rate and a server strategy
/// (`fedlink-demo --epochs`, `--lr`, `--server`) to the tasks without
/// validation-chosen settings (WDBC, nuclei). A task with chosen settings
/// (OPT) keeps them: its optimizer, learning rates, local epochs and
/// server strategy were chosen together on validation data, and one of
/// them replaced is a setting nobody chose. Returns the names of the tasks
/// left alone.
pub fn override_unchosen(
    tasks: &mut [Task],
    epochs: Option<u32>,
    lr: Option<f64>,
    server: Option<&Server>,
) -> Vec<&'static str> {
    let mut kept = Vec::new();
    for t in tasks {
        if t.chosen.is_some() {
            kept.push(t.name);
            continue;
        }
        if let Some(epochs) = epochs {
            t.epochs = epochs;
        }
        if let Some(lr) = lr {
            t.lr = lr;
        }
        if let Some(server) = server {
            t.server = Some(server.clone());
        }
    }
    kept
}

/// The OPT settings `fedlink-opt-sweep` chose (10 splits, 80 local epochs
/// at most).
fn opt_chosen() -> Chosen {
    use fedlink_agent::train::ClassWeighting::None as Unweighted;
    let s = |optimizer, lr, epochs, server| Setting {
        optimizer,
        lr,
        weighting: Unweighted,
        server,
        epochs,
    };
    let adamw = |weight_decay| OptimizerKind::AdamW { weight_decay };
    Chosen {
        federated: s(adamw(10.0), 0.01, 1, Some(Server::FedAvg)),
        central: (s(adamw(3.0), 0.01, 2, None), 15),
        local: vec![
            (s(adamw(10.0), 0.01, 1, None), 74),
            (s(adamw(10.0), 0.003, 1, None), 49),
            (s(OptimizerKind::Sgd, 0.1, 2, None), 2),
            (s(OptimizerKind::Adam, 0.001, 1, None), 3),
        ],
    }
}

/// What one task produced.
#[derive(Debug)]
pub struct TaskResult {
    /// Task name.
    pub name: &'static str,
    /// Rounds completed.
    pub rounds: u64,
    /// Federated model on the global test set.
    pub federated: EvalMetrics,
    /// Centrally trained model (pooled training data) on the global test
    /// set (`None`: the task ran without baselines).
    pub central: Option<EvalMetrics>,
    /// Per hospital: (name, local-only metrics on the global test set,
    /// bytes the hospital uploaded, updates it sent).
    pub hospitals: Vec<(String, EvalMetrics, u64, usize)>,
    /// Raw size of one f32 delta, bytes.
    pub raw_delta_bytes: u64,
    /// Wall time of the federated job.
    pub wall: Duration,
    /// The metric the task is judged by (`AUC`, `Dice`).
    pub judged_by: &'static str,
    /// The model's parameter count.
    pub params: u64,
    /// Mean bytes uploaded per round (all sites).
    pub bytes_per_round: f64,
    /// Mean time between consecutive global models, as the demo saw them
    /// appear (round 1 from the job's start).
    pub round_secs: f64,
    /// The classical baseline (Otsu's threshold) on the held-out tiles,
    /// segmentation only: Dice.
    pub otsu_dice: Option<f64>,
    /// The coordinator's newest federated evaluation: each hospital's
    /// metrics of a global model on its own validation split, and their
    /// example-weighted mean.
    pub federated_evaluation: Option<FederatedEvaluation>,
}

fn tabular(path: PathBuf, task: &Task, validation: f64) -> TabularConfig {
    TabularConfig {
        path,
        label_column: task.label.to_owned(),
        drop_columns: task.drop.iter().map(|s| (*s).to_owned()).collect(),
        missing: Default::default(),
        validation_fraction: validation,
        split_seed: 7,
    }
}

fn fmt_metrics(m: &EvalMetrics) -> String {
    let mut s = String::new();
    let _ = write!(s, "acc {:.4}", m.accuracy);
    if let Some(a) = m.auc {
        let _ = write!(s, "  AUC {a:.4}");
    }
    if let Some(d) = m.dice {
        let _ = write!(s, "  Dice {d:.4}");
    }
    let _ = write!(s, "  loss {:.4}", m.loss);
    s
}

/// Paths of the demo's executables (next to this one).
struct Bins {
    fedlink: PathBuf,
    coordinator: PathBuf,
    agent: PathBuf,
}

impl Bins {
    fn locate() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the demo executable")?;
        let dir = exe.parent().context("executable has no directory")?;
        let bins = Self {
            fedlink: dir.join("fedlink"),
            coordinator: dir.join("fedlink-coordinator"),
            agent: dir.join("fedlink-agent"),
        };
        for b in [&bins.fedlink, &bins.coordinator, &bins.agent] {
            if !b.exists() {
                bail!(
                    "{} is missing: build all binaries first (`cargo build --bins`), or run ./demo",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// Process ids of the demo's running children (coordinator, agents), for
/// [`kill_children`]: when a signal ends the demo, destructors do not run,
/// so `fedlink-demo`'s signal handler kills what is listed here.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Kill every child process the demo has running (SIGKILL). For the
/// demo binary's Ctrl-C / SIGTERM handler: the demo never leaves strays.
pub fn kill_children() {
    let pids: Vec<u32> = match CHILDREN.lock() {
        Ok(mut c) => c.drain(..).collect(),
        Err(poisoned) => poisoned.into_inner().drain(..).collect(),
    };
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Kills its child processes when dropped (the demo never leaves strays;
/// on a signal, see [`kill_children`]).
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn push(&mut self, name: String, child: Child) {
        if let Ok(mut c) = CHILDREN.lock() {
            c.push(child.id());
        }
        self.0.push((name, child));
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
            if let Ok(mut list) = CHILDREN.lock() {
                list.retain(|&p| p != c.id());
            }
        }
    }
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn free_udp_port() -> anyhow::Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free UDP port")?;
    Ok(s.local_addr()?.port())
}

/// The task's job: what the coordinator runs (written with the
/// coordinator's own [`Job::to_toml`]).
fn demo_job(task: &Task, arch: &ArchSpec) -> anyhow::Result<Job> {
    let n = u32::try_from(task.sites.len()).context("number of sites")?;
    let (deadline_secs, batch_size) = match &task.kind {
        TaskKind::Tabular => (120, 16),
        TaskKind::Nuclei(n) => (n.deadline_secs, n.batch_size),
    };
    let server = task
        .server
        .clone()
        .or_else(|| {
            task.chosen
                .as_ref()
                .and_then(|c| c.federated.server.clone())
        })
        .unwrap_or(Server::FedAvg);
    let mut job = Job::new(
        format!("{}-demo", task.name),
        task.rounds,
        arch.clone(),
        InitSource::Seed(42),
        strategy_section(&server)?,
        RoundPolicy {
            quorum: n.saturating_sub(1).max(1),
            extension_secs: 60,
            max_attempts: 2,
            ..RoundPolicy::with_deadline(deadline_secs)
        },
    );
    job.name = Some(task.title.to_owned());
    job.seed = 7;
    job.selection = Selection::exactly(n, 1);
    let t = &mut job.training;
    // the chosen federated epochs and learning rate, when the settings
    // were chosen
    t.epochs = task
        .chosen
        .as_ref()
        .map_or(task.epochs, |c| c.federated.epochs);
    t.batch_size = batch_size;
    let optimizer = match (&task.kind, &task.chosen) {
        (TaskKind::Tabular, Some(c)) => c.federated.optimizer,
        (TaskKind::Tabular, None) => OptimizerKind::Sgd,
        (TaskKind::Nuclei(_), _) => OptimizerKind::Adam,
    };
    (t.optimizer, t.momentum, t.weight_decay) = match optimizer {
        OptimizerKind::Sgd => (LocalOptimizer::Sgd, None, None),
        OptimizerKind::SgdMomentum { momentum } => (LocalOptimizer::Sgd, Some(momentum), None),
        OptimizerKind::Adam => (LocalOptimizer::Adam, None, None),
        OptimizerKind::AdamW { weight_decay } => (LocalOptimizer::AdamW, None, Some(weight_decay)),
    };
    t.learning_rate = task.chosen.as_ref().map_or(task.lr, |c| c.federated.lr);
    t.fedprox_mu = 0.0;
    t.class_weight = match task.chosen.as_ref().map(|c| c.federated.weighting) {
        Some(fedlink_agent::train::ClassWeighting::Balanced) => ClassWeightConfig::Balanced,
        _ => ClassWeightConfig::None,
    };
    t.augmentation = match &task.kind {
        TaskKind::Tabular => None,
        TaskKind::Nuclei(_) => Some(NUCLEI_AUGMENTATION),
    };
    (job.encoding.codec, job.encoding.topk_fraction) = codec_of(task.codec)?;
    job.encoding.shuffle = true;
    job.encoding.zstd_level = 1;
    if task.full_model_downloads {
        job.encoding.downlink = Some(fedlink_coordinator::job::DownlinkKind::Model);
    }
    job.evaluation.every_rounds = 1;
    job.validate()
        .with_context(|| format!("the {} job", task.name))?;
    Ok(job)
}

/// The task's job file.
fn job_toml(task: &Task, arch: &ArchSpec) -> anyhow::Result<String> {
    Ok(demo_job(task, arch)?.to_toml()?)
}

/// The job's `[strategy]` for a server strategy, read from the `[strategy]`
/// lines [`Server::job_toml`] writes (one description of each strategy's
/// keys, next to the strategy's parser in [`tabular_choice`]).
fn strategy_section(server: &Server) -> anyhow::Result<StrategySection> {
    let table: toml::Table = format!("[strategy]\n{}", server.job_toml())
        .parse()
        .with_context(|| format!("server strategy {server:?}"))?;
    let section = table
        .get("strategy")
        .cloned()
        .context("no [strategy] table")?
        .try_into()
        .with_context(|| format!("server strategy {server:?}"))?;
    Ok(section)
}

/// The nuclei job's augmentation (and the central baseline's).
const NUCLEI_AUGMENTATION: AugmentationConfig = AugmentationConfig {
    flips: true,
    rotate90: true,
    intensity_jitter: Some(IntensityJitterConfig {
        scale: 0.1,
        shift: 0.05,
    }),
};

/// The codec of a task's `codec` (`f32`, `f16`, `bf16`, `int8` or
/// `topk:<fraction>`) and its top-k fraction.
fn codec_of(codec: &str) -> anyhow::Result<(CodecKind, Option<f64>)> {
    let (name, fraction) = match codec.split_once(':') {
        None => (codec, None),
        Some(("topk", f)) => {
            let f: f64 = f
                .parse()
                .with_context(|| format!("top-k fraction in codec {codec:?}"))?;
            ("topk", Some(f))
        }
        Some(_) => bail!("unknown codec {codec:?}"),
    };
    let kind = toml::Value::String(name.to_owned())
        .try_into()
        .with_context(|| format!("unknown codec {codec:?}"))?;
    Ok((kind, fraction))
}

fn site_toml(kit: &Path, state: &Path, csv: &Path, task: &Task) -> String {
    let drop = task
        .drop
        .iter()
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    // The nuclei sites hold 12 (--full, 64×64) or 48 (32×32) tiles.
    let min_samples = match &task.kind {
        TaskKind::Tabular => 20,
        TaskKind::Nuclei(_) => 8,
    };
    let (dataset, arch) = match &task.kind {
        TaskKind::Tabular => (
            format!(
                r#"kind = "csv"
path = {csv:?}
label_column = "{label}"
drop_columns = [{drop}]
validation_fraction = 0.2
split_seed = 7"#,
                label = task.label,
            ),
            "logreg",
        ),
        // `csv` is the site's raw_u8 folder; one tile in 8 is the site's
        // validation split (the federated evaluation's data), the rest
        // trains (the held-out test tiles are elsewhere).
        TaskKind::Nuclei(n) => (
            format!(
                r#"kind = "segmentation"
tile = {tile}
validation_fraction = {NUCLEI_VALIDATION}
split_seed = 7
source = {{ format = "raw_u8", dir = {csv:?} }}"#,
                tile = n.tile,
            ),
            "unet",
        ),
    };
    format!(
        r#"kit_dir = {kit:?}
data_dir = {state:?}
device = "cpu"

[connection]
backoff_initial_ms = 200
backoff_max_ms = 2000

[dataset]
{dataset}

[policy]
federations = ["{fed}"]
architectures = ["{arch}"]
min_local_samples = {min_samples}
max_epochs = 20
encodings = ["f32", "f16", "bf16", "int8", "topk"]
"#,
        fed = task.name,
    )
}

/// The data a task's sites hold and how its global models are judged.
enum Prepared {
    Tabular,
    Nuclei {
        /// Held-out tiles (no site holds them).
        test: Samples,
    },
}

/// Run one task end to end.
pub fn run_task(task: &Task, data_dir: &Path, work: &Path) -> anyhow::Result<TaskResult> {
    let bins = Bins::locate()?;
    let device = fedlink_agent::device::DeviceChoice::Cpu
        .resolve()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .device;
    let root = work.join(task.name);
    std::fs::create_dir_all(&root)?;
    let port = free_udp_port()?;
    let addr = format!("127.0.0.1:{port}");

    // 1. Provision the federation with the real CLI.
    let pki = root.join("pki");
    run(
        Command::new(&bins.fedlink)
            .args(["certs", "init", "--federation", task.name, "--out"])
            .arg(&pki)
            .args([
                "--san",
                "localhost",
                "--san",
                "127.0.0.1",
                "--coordinator-addr",
                &addr,
            ]),
        "fedlink certs init",
    )?;
    for (site, _) in &task.sites {
        run(
            Command::new(&bins.fedlink)
                .args(["certs", "issue-site", site, "--ca"])
                .arg(pki.join("ca")),
            "fedlink certs issue-site",
        )?;
    }

    // 2. The sites' data, the job and the coordinator config.
    let (arch, site_data, prepared) = match &task.kind {
        TaskKind::Tabular => {
            let first = load_tabular(&tabular(data_dir.join(task.sites[0].1), task, 0.0))?;
            let inputs = first.features().len() as u32;
            let arch: ArchSpec = toml::from_str(&format!(
                "kind = \"logreg\"\ninputs = {inputs}\nclasses = 2\n"
            ))?;
            let paths = task.sites.iter().map(|(_, p)| data_dir.join(p)).collect();
            (arch, paths, Prepared::Tabular)
        }
        TaskKind::Nuclei(n) => {
            let (paths, test) = split_nuclei(data_dir, &root.join("tiles"), task, n)?;
            (n.arch(), paths, Prepared::Nuclei { test })
        }
    };
    let params = arch
        .spec()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .num_params();
    if let TaskKind::Nuclei(n) = &task.kind {
        println!(
            "  U-Net base_channels {} depth {}: {params} parameters ({:.1} MB as f32); tiles {}×{}",
            n.base_channels,
            n.depth,
            params as f64 * 4.0 / 1e6,
            n.tile,
            n.tile
        );
    }
    let job_path = root.join("job.toml");
    let job_text = job_toml(task, &arch)?;
    std::fs::write(&job_path, &job_text)?;
    let coord_dir = root.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let coord_cfg = coord_dir.join("coordinator.toml");
    // The demo keeps 64 MiB free instead of the product's 512 MiB: its whole
    // run writes a few MiB, and it must run on a machine whose build left
    // little room. A hospital's coordinator keeps the default.
    std::fs::write(
        &coord_cfg,
        format!(
            "listen = \"{addr}\"\nkit = {:?}\nca_dir = {:?}\ndata_dir = {:?}\njob = {:?}\nheartbeat_interval_secs = 2\nidle_timeout_secs = 20\nmin_free_disk_mib = 64\n",
            pki.join("coordinator"),
            pki.join("ca"),
            coord_dir.join("data"),
            job_path
        ),
    )?;

    // 3. Start everything as separate processes.
    let mut procs = Procs(Vec::new());
    let log = |name: &str| -> anyhow::Result<Stdio> {
        Ok(Stdio::from(std::fs::File::create(
            root.join(format!("{name}.log")),
        )?))
    };
    let started = Instant::now();
    let coordinator = Command::new(&bins.coordinator)
        .args(["serve", "--exit-after-job", "--config"])
        .arg(&coord_cfg)
        .stdout(log("coordinator")?)
        .stderr(log("coordinator")?)
        .spawn()
        .context("starting fedlink-coordinator")?;
    procs.push("coordinator".into(), coordinator);
    for ((site, _), data) in task.sites.iter().zip(&site_data) {
        let dir = root.join(site);
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("site.toml");
        std::fs::write(
            &cfg,
            site_toml(
                &pki.join("sites").join(site),
                &dir.join("state"),
                data,
                task,
            ),
        )?;
        let child = Command::new(&bins.agent)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(log(site)?)
            .stderr(log(site)?)
            .spawn()
            .with_context(|| format!("starting fedlink-agent for {site}"))?;
        procs.push((*site).to_owned(), child);
    }

    // 4. Baselines on the same data, while the federation runs.
    let total_epochs = (task.rounds * task.epochs) as usize;
    let init = arch.init(42).map_err(|e| anyhow::anyhow!("{e}"))?;
    let test_path = data_dir.join(task.test);
    let mut local_only = Vec::new();
    let (central, otsu_dice) = match (&task.kind, &prepared) {
        (_, Prepared::Nuclei { test }) if !task.baselines => {
            println!("  baselines: skipped (--skip-baselines)");
            (None, Some(otsu_on(test)?))
        }
        _ if !task.baselines => {
            println!("  baselines: skipped (--skip-baselines)");
            (None, None)
        }
        (TaskKind::Nuclei(n), Prepared::Nuclei { test }) => {
            let cfg = TrainConfig::new()
                .with_epochs(total_epochs)
                .with_batch_size(n.batch_size as usize)
                .with_optimizer(OptimizerKind::Adam)
                .with_learning_rate(task.lr)
                .with_seed(7)
                .with_augmentation(job_augmentation(&job_text)?);
            let mut pooled: Option<Samples> = None;
            for ((site, _), dir) in task.sites.iter().zip(&site_data) {
                let d = load_segmentation(&tiles_config(dir, n))?.train;
                let t = Instant::now();
                let (m, _) = train_local(&arch, &init, &d, &cfg, &device)?;
                let metrics = evaluate(&arch, &m, test, &device)?;
                println!(
                    "  baseline: {site} local-only ({} tiles, {total_epochs} epochs) {} in {:.1} s",
                    d.len(),
                    fmt_metrics(&metrics),
                    t.elapsed().as_secs_f64()
                );
                local_only.push(((*site).to_owned(), metrics));
                pooled = Some(match pooled {
                    None => d,
                    Some(p) => concat(&p, &d)?,
                });
            }
            let pooled = pooled.context("no site data")?;
            let t = Instant::now();
            let (m, _) = train_local(&arch, &init, &pooled, &cfg, &device)?;
            let central = evaluate(&arch, &m, test, &device)?;
            println!(
                "  baseline: central ({} tiles, {total_epochs} epochs) {} in {:.1} s",
                pooled.len(),
                fmt_metrics(&central),
                t.elapsed().as_secs_f64()
            );
            (Some(central), Some(otsu_on(test)?))
        }
        _ if task.chosen.is_some() => {
            let Some(c) = &task.chosen else {
                bail!("no chosen settings");
            };
            (
                Some(chosen_baselines(
                    task,
                    c,
                    &site_data,
                    &test_path,
                    &mut local_only,
                )?),
                None,
            )
        }
        _ => {
            let pooled = root.join("pooled_train.csv");
            pool_csvs(site_data.iter().cloned(), &pooled)?;
            let central_data = load_tabular(&tabular(pooled, task, 0.0))?;
            let test_central = load_tabular_test(
                &tabular(test_path.clone(), task, 0.0),
                &central_data.scaling,
            )?;
            let cfg = TrainConfig::new()
                .with_epochs(total_epochs)
                .with_batch_size(16)
                .with_optimizer(OptimizerKind::Sgd)
                .with_learning_rate(task.lr)
                .with_seed(7);
            let (central_model, _) =
                train_local(&arch, &init, &central_data.data.train, &cfg, &device)?;
            let central = evaluate(&arch, &central_model, &test_central, &device)?;
            for ((site, _), csv) in task.sites.iter().zip(&site_data) {
                let d = load_tabular(&tabular(csv.clone(), task, 0.0))?;
                let t = load_tabular_test(&tabular(test_path.clone(), task, 0.0), &d.scaling)?;
                let (m, _) = train_local(&arch, &init, &d.data.train, &cfg, &device)?;
                local_only.push(((*site).to_owned(), evaluate(&arch, &m, &t, &device)?));
            }
            (Some(central), None)
        }
    };

    // 5. Follow the job.
    // The global test set standardised like the sites standardise their
    // data: with the federation's pooled scaling from status.json (the
    // central baseline keeps its own pooled-CSV statistics).
    let mut test_federated: Option<(FeatureScaling, Samples)> = None;
    let judge = |st: &Status, r: &RoundStatus, model: &FlatModel| -> anyhow::Result<EvalMetrics> {
        match &prepared {
            Prepared::Nuclei { test } => Ok(evaluate(&arch, model, test, &device)?),
            Prepared::Tabular => {
                // Round 1 trained on local statistics (no scaling existed);
                // every later round on the scaling in force now (the sites'
                // data does not change, so neither does the scaling).
                let Some(scaling) = &st.scaling else {
                    bail!(
                        "round {} completed but status.json has no federated feature scaling",
                        r.round
                    );
                };
                if test_federated.as_ref().is_none_or(|(s, _)| s != scaling) {
                    let t = load_tabular_test(&tabular(test_path.clone(), task, 0.0), scaling)?;
                    test_federated = Some((scaling.clone(), t));
                }
                let Some((_, test)) = &test_federated else {
                    bail!("no federated test set");
                };
                Ok(evaluate(&arch, model, test, &device)?)
            }
        }
    };
    let followed = follow(task, &mut procs, &root, &coord_dir, started, judge)?;
    let wall = started.elapsed();
    stop_agents(&mut procs);
    drop(procs);
    let final_status = followed.status;
    if !final_status.completed {
        bail!(
            "the job did not complete: {:?}; logs in {}",
            final_status.finished,
            root.display()
        );
    }
    let Some(federated) = followed.last else {
        bail!("no round completed");
    };

    // 6. What an auditor checks, with the real CLI: both sides' signed logs,
    // each site's log against the coordinator's, and the last round
    // recomputed from the archived signed updates.
    audit_checks(&bins, task, &root, &pki, final_status.completed_rounds)?;
    let mut hospitals = Vec::new();
    for (site, m) in local_only {
        let (mut bytes, mut n) = (0, 0);
        for r in &final_status.rounds {
            for u in r.updates.iter().filter(|u| u.0 == site) {
                bytes += u.1;
                n += 1;
            }
        }
        hospitals.push((site, m, bytes, n));
    }
    let done: Vec<&RoundStatus> = final_status
        .rounds
        .iter()
        .filter(|r| r.model.is_some())
        .collect();
    let total_bytes: u64 = done.iter().flat_map(|r| &r.updates).map(|u| u.1).sum();
    Ok(TaskResult {
        name: task.name,
        rounds: final_status.completed_rounds,
        federated,
        central,
        hospitals,
        raw_delta_bytes: init.values().len() as u64 * 4,
        wall,
        judged_by: match task.kind {
            TaskKind::Tabular => "AUC",
            TaskKind::Nuclei(_) => "Dice",
        },
        params,
        bytes_per_round: total_bytes as f64 / done.len().max(1) as f64,
        round_secs: followed.round_secs,
        otsu_dice,
        federated_evaluation: final_status.evaluation.clone(),
    })
}

/// The central and local-only baselines of a task with settings chosen on
/// validation data: each with its own chosen setting, trained on the
/// hospitals' 80 % training parts (the agents' split), judged on the
/// held-out test set standardised with its own training statistics.
fn chosen_baselines(
    task: &Task,
    c: &Chosen,
    site_data: &[PathBuf],
    test_path: &Path,
    local_only: &mut Vec<(String, EvalMetrics)>,
) -> anyhow::Result<EvalMetrics> {
    if c.local.len() != task.sites.len() {
        bail!(
            "{} local-only settings for {} hospitals",
            c.local.len(),
            task.sites.len()
        );
    }
    let sites: Vec<(String, PathBuf)> = task
        .sites
        .iter()
        .zip(site_data)
        .map(|((n, _), p)| ((*n).to_owned(), p.clone()))
        .collect();
    let drop: Vec<String> = task.drop.iter().map(|s| (*s).to_owned()).collect();
    let data = TaskData::load(
        &sites,
        test_path,
        task.label,
        &drop,
        tabular_choice::SPLIT_SEED,
    )?;
    let train = data.pooled_train(&data.pooled)?;
    let (s, k) = &c.central;
    let t = Instant::now();
    let m = train_chunked(&data.arch, &data.init, &train, s, *k, |_, _| Ok(()))?;
    let central = tabular_choice::metrics(&data.arch, &m, &data.test(&data.pooled)?)?;
    println!(
        "  baseline: central ({}; {} epochs on {} rows) {} in {:.1} s",
        s.label(),
        k * s.epochs,
        train.len(),
        fmt_metrics(&central),
        t.elapsed().as_secs_f64()
    );
    for ((name, d), (s, k)) in data.sites.iter().zip(&c.local) {
        let m = train_chunked(&data.arch, &data.init, &d.data.train, s, *k, |_, _| Ok(()))?;
        let metrics = tabular_choice::metrics(&data.arch, &m, &data.test(&d.scaling)?)?;
        println!(
            "  baseline: {name} local-only ({}; {} epochs on {} rows) {}",
            s.label(),
            k * s.epochs,
            d.data.train.len(),
            fmt_metrics(&metrics)
        );
        local_only.push((name.clone(), metrics));
    }
    Ok(central)
}

/// What following a job gave.
struct Followed {
    /// The coordinator's last status.
    status: Status,
    /// The last global model's held-out metrics.
    last: Option<EvalMetrics>,
    /// Mean seconds between consecutive global models.
    round_secs: f64,
}

/// Follow the job through `status.json` until the coordinator exits,
/// judging every new global model with `judge`.
fn follow(
    task: &Task,
    procs: &mut Procs,
    root: &Path,
    coord_dir: &Path,
    started: Instant,
    mut judge: impl FnMut(&Status, &RoundStatus, &FlatModel) -> anyhow::Result<EvalMetrics>,
) -> anyhow::Result<Followed> {
    let bar = ProgressBar::new(u64::from(task.rounds));
    bar.set_style(
        ProgressStyle::with_template("  {prefix:>6} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(task.name);
    let status_path = coord_dir
        .join("data")
        .join(fedlink_coordinator::server::STATUS_FILE);
    let models = coord_dir
        .join("data")
        .join(fedlink_coordinator::store::MODELS_DIR);
    let mut seen = 0u64;
    let mut last: Option<EvalMetrics> = None;
    let mut round_times = Vec::new();
    let mut prev = started;
    let limit = match &task.kind {
        TaskKind::Tabular => Duration::from_secs(600),
        TaskKind::Nuclei(n) => Duration::from_secs(n.deadline_secs * u64::from(task.rounds)),
    };
    let deadline = Instant::now() + limit;
    let final_status = loop {
        let status: Option<Status> = std::fs::read(&status_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(st) = &status {
            let fresh: Vec<_> = st
                .rounds
                .iter()
                .filter(|r| r.round > seen && r.model.is_some())
                .collect();
            for r in fresh {
                let Some(hash) = r.model.as_deref().and_then(ModelHash::from_hex) else {
                    continue;
                };
                let now = Instant::now();
                round_times.push(now.duration_since(prev).as_secs_f64());
                prev = now;
                let model = read_model_file(&models.join(format!("{hash}.bin")), &hash)?;
                let m = judge(st, r, &model)?;
                let bytes: u64 = r.updates.iter().map(|u| u.1).sum();
                say(
                    &bar,
                    format!(
                        "  {:>6} round {:>2}: global model {}…  held-out {}  ({} updates, {} B uploaded)",
                        task.name,
                        r.round,
                        &hash.to_hex()[..12],
                        fmt_metrics(&m),
                        r.updates.len(),
                        bytes
                    ),
                );
                bar.set_position(r.round);
                bar.set_message(fmt_metrics(&m));
                seen = r.round;
                last = Some(m);
            }
        }
        let exited = match procs.0.first_mut() {
            Some((_, c)) => c.try_wait()?,
            None => None,
        };
        if let Some(code) = exited {
            // Read the final status once more before deciding.
            let st: Status = serde_json::from_slice(&std::fs::read(&status_path)?)?;
            if st
                .rounds
                .iter()
                .any(|r| r.round > seen && r.model.is_some())
            {
                continue;
            }
            if !code.success() {
                bail!(
                    "the coordinator exited with {code}; see {}",
                    root.join("coordinator.log").display()
                );
            }
            break st;
        }
        if Instant::now() > deadline {
            bail!(
                "the job did not finish within {} s; logs in {}",
                limit.as_secs(),
                root.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    let round_secs = if round_times.is_empty() {
        0.0
    } else {
        round_times.iter().sum::<f64>() / round_times.len() as f64
    };
    Ok(Followed {
        status: final_status,
        last,
        round_secs,
    })
}

/// The augmentation the job file asks of the sites, read back through the
/// coordinator's own job parser (the central and local-only baselines train
/// with it too).
fn job_augmentation(job_text: &str) -> anyhow::Result<Option<fedlink_protocol::Augmentation>> {
    let job = Job::from_toml(job_text)?;
    Ok(job.training.augmentation.map(|a| a.to_protocol()))
}

fn tiles_config(dir: &Path, n: &NucleiSpec) -> SegmentationConfig {
    let mut cfg = SegmentationConfig::new(SegmentationSource::RawU8 {
        dir: dir.to_owned(),
    });
    cfg.tile = n.tile;
    // The agents' split (same fraction, same seed): baselines train on the
    // tiles the sites train on.
    cfg.validation_fraction = NUCLEI_VALIDATION;
    cfg.split_seed = 7;
    cfg
}

/// Fraction of each nuclei site's tiles kept for its validation split.
const NUCLEI_VALIDATION: f64 = 0.125;

/// Side of the nuclei image.
const NUCLEI_SIDE: usize = 512;

/// Cut the 512×512 nuclei image into the sites' regions and the held-out
/// set: site k holds the top three quarters of quadrant k (nw, ne, sw, se:
/// 192×256 pixels), the bottom quarter of every quadrant (4 × 64×256) is
/// held out. Each region is written as a `raw_u8` folder; returns the
/// sites' folders and the held-out tiles.
fn split_nuclei(
    data_dir: &Path,
    out: &Path,
    task: &Task,
    n: &NucleiSpec,
) -> anyhow::Result<(Vec<PathBuf>, Samples)> {
    let src = data_dir.join("nuclei_dsb2018");
    let image = std::fs::read(src.join("image_u8.bin"))
        .with_context(|| format!("reading {}", src.display()))?;
    let mask = std::fs::read(src.join("mask_u8.bin"))?;
    if image.len() != NUCLEI_SIDE * NUCLEI_SIDE || mask.len() != image.len() {
        bail!("{} is not a 512×512 image and mask", src.display());
    }
    let half = NUCLEI_SIDE / 2;
    let train_rows = half * 3 / 4;
    let crop = |buf: &[u8], y0: usize, x0: usize, h: usize| -> Vec<u8> {
        (y0..y0 + h)
            .flat_map(|y| {
                buf[y * NUCLEI_SIDE + x0..y * NUCLEI_SIDE + x0 + half]
                    .iter()
                    .copied()
            })
            .collect()
    };
    let write = |dir: &Path, h: usize, img: &[u8], msk: &[u8]| -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("header.json"),
            format!("{{\"height\": {h}, \"width\": {half}}}"),
        )?;
        std::fs::write(dir.join("image_u8.bin"), img)?;
        std::fs::write(dir.join("mask_u8.bin"), msk)?;
        Ok(())
    };
    let mut dirs = Vec::new();
    let (mut test_img, mut test_mask) = (Vec::new(), Vec::new());
    for (k, (_, region)) in task.sites.iter().enumerate() {
        let (y0, x0) = ((k / 2) * half, (k % 2) * half);
        let dir = out.join(region);
        write(
            &dir,
            train_rows,
            &crop(&image, y0, x0, train_rows),
            &crop(&mask, y0, x0, train_rows),
        )?;
        dirs.push(dir);
        test_img.extend(crop(&image, y0 + train_rows, x0, half - train_rows));
        test_mask.extend(crop(&mask, y0 + train_rows, x0, half - train_rows));
    }
    let test_dir = out.join("held-out");
    let test_rows = task.sites.len() * (half - train_rows);
    write(&test_dir, test_rows, &test_img, &test_mask)?;
    let test = load_segmentation(&tiles_config(&test_dir, n))?.train;
    Ok((dirs, test))
}

/// The tiles of `a` followed by those of `b` (same tile shape).
fn concat(a: &Samples, b: &Samples) -> anyhow::Result<Samples> {
    use fedlink_agent::data::Targets;
    let (Targets::Masks(ma), Targets::Masks(mb)) = (a.targets(), b.targets()) else {
        bail!("segmentation tiles without masks");
    };
    let x = [a.features(), b.features()].concat();
    let m = [ma.as_slice(), mb.as_slice()].concat();
    Ok(Samples::new(a.shape(), x, Targets::Masks(m))?)
}

/// Otsu's threshold, chosen on the held-out tiles' own pixels (it needs no
/// labels), against their masks: Dice of the nucleus class.
fn otsu_on(test: &Samples) -> anyhow::Result<f64> {
    let fedlink_agent::data::Targets::Masks(mask) = test.targets() else {
        bail!("held-out tiles have no masks");
    };
    // The tiles hold the raw u8 values scaled to [0, 1].
    let pixels: Vec<u8> = test
        .features()
        .iter()
        .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    let t = otsu_threshold(&pixels).context("held-out tiles have a single grey level")?;
    let labels: Vec<u8> = pixels.iter().map(|&v| u8::from(v > t)).collect();
    dice(&labels, mask, 1).context("no nucleus pixel in the held-out tiles")
}

/// Stop the agents with SIGTERM (they record `agent.stopped` and exit 0),
/// waiting a few seconds; whatever is still running is killed on drop.
fn stop_agents(procs: &mut Procs) {
    for (name, child) in procs.0.iter_mut().filter(|(n, _)| n != "coordinator") {
        if matches!(child.try_wait(), Ok(Some(_))) {
            continue;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("  {name}: did not stop on SIGTERM within 10 s; killing it");
        }
    }
}

/// Run a `fedlink audit …` command; its exit code must be 0.
fn audit_cmd(bins: &Bins, args: &[&std::ffi::OsStr], what: &str) -> anyhow::Result<String> {
    let out = Command::new(&bins.fedlink)
        .arg("audit")
        .args(args)
        .output()
        .with_context(|| format!("running fedlink audit for {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "audit check failed: {what} ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn audit_checks(
    bins: &Bins,
    task: &Task,
    root: &Path,
    pki: &Path,
    rounds: u64,
) -> anyhow::Result<()> {
    let data = root.join("coordinator").join("data");
    let coord_log = data.join("audit").join("audit.jsonl");
    // The key the CA recorded, not the copy next to the log.
    let ca_dir = pki.join("ca");
    let count = |log: &Path| -> anyhow::Result<usize> {
        Ok(std::fs::read_to_string(log)
            .with_context(|| format!("reading {}", log.display()))?
            .lines()
            .count())
    };
    audit_cmd(
        bins,
        &[
            "verify".as_ref(),
            coord_log.as_os_str(),
            "--rotated".as_ref(),
            "--ca".as_ref(),
            ca_dir.as_os_str(),
        ],
        "the coordinator's audit log",
    )?;
    println!(
        "  audit: coordinator log verified ({} signed entries, chain intact)",
        count(&coord_log)?
    );
    for (site, _) in &task.sites {
        let log = root.join(site).join("state").join("audit.jsonl");
        let key = pki.join("sites").join(site).join("update-key.pub.pem");
        audit_cmd(
            bins,
            &[
                "verify".as_ref(),
                log.as_os_str(),
                "--rotated".as_ref(),
                "--key".as_ref(),
                key.as_os_str(),
            ],
            &format!("{site}'s audit log"),
        )?;
        audit_cmd(
            bins,
            &[
                "reconcile".as_ref(),
                "--site".as_ref(),
                log.as_os_str(),
                "--site-key".as_ref(),
                key.as_os_str(),
                "--coordinator".as_ref(),
                coord_log.as_os_str(),
                "--ca".as_ref(),
                ca_dir.as_os_str(),
            ],
            &format!("reconciling {site} with the coordinator"),
        )?;
        println!(
            "  audit: {site}: log verified ({} entries), reconciled with the coordinator's",
            count(&log)?
        );
    }
    let round = rounds.to_string();
    let job = format!("{}-demo", task.name);
    audit_cmd(
        bins,
        &[
            "replay".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--job".as_ref(),
            job.as_ref(),
            "--round".as_ref(),
            round.as_ref(),
            "--ca-dir".as_ref(),
            pki.join("ca").as_os_str(),
        ],
        &format!("replaying round {rounds}"),
    )?;
    println!(
        "  audit: round {rounds} recomputed from the archived signed updates: same model hash, bit for bit"
    );
    Ok(())
}

/// Print above the progress bar, or plainly when there is no terminal.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// Concatenate CSV files that share a header.
fn pool_csvs(paths: impl Iterator<Item = PathBuf>, out: &Path) -> anyhow::Result<()> {
    let mut w = std::fs::File::create(out)?;
    let mut header: Option<String> = None;
    for p in paths {
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let mut lines = text.lines();
        let h = lines.next().unwrap_or_default().to_owned();
        match &header {
            None => {
                writeln!(w, "{h}")?;
                header = Some(h);
            }
            Some(prev) if *prev != h => bail!("{} has a different header", p.display()),
            Some(_) => {}
        }
        for l in lines.filter(|l| !l.trim().is_empty()) {
            writeln!(w, "{l}")?;
        }
    }
    Ok(())
}

/// Print the final summary.
pub fn summary(results: &[TaskResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n== fedlink demo summary ==");
    for r in results {
        let _ = writeln!(
            s,
            "\n{} — {} rounds in {:.1} s; judged by {}; model {} parameters",
            r.name,
            r.rounds,
            r.wall.as_secs_f64(),
            r.judged_by,
            r.params
        );
        let _ = writeln!(
            s,
            "  per round: {:.0} B uploaded by all sites ({:.2} MB), {:.1} s from one global model to the next",
            r.bytes_per_round,
            r.bytes_per_round / 1e6,
            r.round_secs
        );
        let _ = writeln!(s, "  held-out global test set (no hospital holds it):");
        let _ = writeln!(s, "    federated model       {}", fmt_metrics(&r.federated));
        match &r.central {
            Some(c) => {
                let _ = writeln!(s, "    central baseline      {}", fmt_metrics(c));
            }
            None => {
                let _ = writeln!(
                    s,
                    "    central baseline      not trained (--skip-baselines)"
                );
            }
        }
        if let Some(d) = r.otsu_dice {
            let _ = writeln!(s, "    Otsu threshold        Dice {d:.4}");
            if let (Some(f), Some(c)) = (r.federated.dice, r.central.as_ref().and_then(|c| c.dice))
            {
                let met = f >= c - 0.02 && f > d;
                let _ = writeln!(
                    s,
                    "    goal (federated ≥ central − 0.02 and > Otsu): {}",
                    if met { "met" } else { "NOT met" }
                );
            }
        }
        let judged = |m: &EvalMetrics| match r.judged_by {
            "Dice" => m.dice,
            _ => m.auc,
        };
        if let Some(central) = &r.central {
            if let (Some(f), Some(c)) = (judged(&r.federated), judged(central)) {
                let _ = writeln!(
                    s,
                    "    federated − central   {:+.4} {} ({:+.2} accuracy points)",
                    f - c,
                    r.judged_by,
                    (r.federated.accuracy - central.accuracy) * 100.0
                );
            }
            if let ("AUC", Some(f), Some(c)) = (r.judged_by, r.federated.auc, central.auc) {
                let beaten = r
                    .hospitals
                    .iter()
                    .filter(|(_, m, _, _)| m.auc.is_some_and(|l| f >= l))
                    .count();
                let n = r.hospitals.len();
                let need = n.saturating_sub(1).max(1);
                let met = f >= c - 0.02 && beaten >= need;
                let _ = writeln!(
                    s,
                    "    goal (AUC: federated ≥ central − 0.02, and ≥ local-only at ≥ {need} of {n} hospitals): {} (≥ local-only at {beaten} of {n})",
                    if met { "met" } else { "NOT met" }
                );
            }
        }
        if r.hospitals.is_empty() {
            let _ = writeln!(s, "  per hospital: no local-only models (--skip-baselines)");
        } else {
            let _ = writeln!(
                s,
                "  per hospital (local-only model vs federated, same test set; bytes uploaded):"
            );
        }
        for (name, m, bytes, n) in &r.hospitals {
            let _ = writeln!(
                s,
                "    {name:<11} local-only {}   | uploaded {n} updates, {bytes} B ({:.2}× smaller than raw f32)",
                fmt_metrics(m),
                if *bytes > 0 {
                    (r.raw_delta_bytes * *n as u64) as f64 / *bytes as f64
                } else {
                    0.0
                }
            );
        }
        if let Some(e) = &r.federated_evaluation {
            fmt_federated_evaluation(&mut s, e, r.rounds);
        }
    }
    s
}

/// The sites' federated evaluation: one line per hospital, then the
/// example-weighted mean.
fn fmt_federated_evaluation(s: &mut String, e: &FederatedEvaluation, rounds: u64) {
    let model = if e.after_round == 0 {
        "the initial model".to_owned()
    } else {
        format!("the model after round {} of {rounds}", e.after_round)
    };
    let _ = writeln!(
        s,
        "  federated evaluation by the hospitals ({model}, each on its own validation split; {}):",
        match e.reported_in_round {
            Some(r) => format!("reported in round {r}"),
            None => "asked for by the coordinator".to_owned(),
        }
    );
    let line =
        |n: u64, loss: Option<f64>, acc: Option<f64>, auc: Option<f64>, dice: Option<f64>| {
            let mut l = format!("n {n:>5}");
            for (name, v) in [("acc", acc), ("AUC", auc), ("Dice", dice), ("loss", loss)] {
                if let Some(v) = v {
                    let _ = write!(l, "  {name} {v:.4}");
                }
            }
            l
        };
    for x in &e.sites {
        let _ = writeln!(
            s,
            "    {:<21} {}",
            x.site,
            line(x.num_eval_examples, x.loss, x.accuracy, x.auc, x.dice)
        );
    }
    let w = &e.weighted;
    let _ = writeln!(
        s,
        "    {:<21} {}",
        format!("weighted ({} sites)", w.sites),
        line(w.num_eval_examples, w.loss, w.accuracy, w.auc, w.dice)
    );
    for x in &e.excluded {
        let _ = writeln!(s, "    left out: {} ({})", x.site, x.reason);
    }
}

/// Entry point of `fedlink-demo`: run every task; error if anything failed.
pub fn main_demo(data_dir: &Path, keep: bool) -> anyhow::Result<String> {
    run_tasks(tasks(), data_dir, keep)
}

/// Run the given tasks (e.g. one task, or another codec); error if anything
/// failed.
pub fn run_tasks(tasks: Vec<Task>, data_dir: &Path, keep: bool) -> anyhow::Result<String> {
    let work = tempfile::Builder::new().prefix("fedlink-demo-").tempdir()?;
    println!("fedlink demo: work directory {}", work.path().display());
    let mut results = Vec::new();
    let mut failed = None;
    for task in tasks {
        println!("\n== {} ({}) ==", task.title, task.codec);
        match run_task(&task, data_dir, work.path()) {
            Ok(r) => results.push(r),
            Err(e) => {
                failed = Some(e.context(format!("task {}", task.name)));
                break;
            }
        }
    }
    let report = summary(&results);
    if keep || failed.is_some() {
        let kept = work.keep();
        println!("(work directory kept: {})", kept.display());
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logreg() -> ArchSpec {
        ArchSpec::LogReg {
            inputs: 12,
            classes: 2,
        }
    }

    fn job_of(task: &Task) -> Job {
        let arch = match &task.kind {
            TaskKind::Tabular => logreg(),
            TaskKind::Nuclei(n) => n.arch(),
        };
        Job::from_toml(&job_toml(task, &arch).unwrap()).unwrap()
    }

    /// Each task's job file, read by the coordinator's own parser, is the
    /// job built, with the task's settings in it.
    #[test]
    fn the_demo_jobs_parse_with_the_coordinators_parser() {
        let mut all = tasks();
        all.push(nuclei_task(true));
        for t in &all {
            let job = job_of(t);
            assert_eq!(job, demo_job(t, &job.arch).unwrap(), "{}", t.name);
            assert_eq!(job.id, format!("{}-demo", t.name));
            assert_eq!(job.name.as_deref(), Some(t.title));
            assert_eq!(job.rounds, t.rounds, "{}", t.name);
            assert_eq!(job.training.epochs, t.epochs, "{}", t.name);
            let n = u32::try_from(t.sites.len()).unwrap();
            assert_eq!(job.selection.min_sites, Some(n), "{}", t.name);
            assert_eq!(job.selection.max_sites, Some(n), "{}", t.name);
            assert_eq!(job.round.quorum, n - 1, "{}", t.name);
            assert_eq!(job.encoding.codec, CodecKind::F16, "{}", t.name);
            assert_eq!(job.evaluation.every_rounds, 1, "{}", t.name);
            let tr = &job.training;
            match t.name {
                "wdbc" => {
                    assert_eq!(job.strategy, StrategySection::named("fedavg"));
                    assert_eq!(tr.optimizer, LocalOptimizer::Sgd);
                    assert_eq!(tr.learning_rate, t.lr);
                    assert_eq!(tr.augmentation, None);
                }
                "opt" => {
                    let chosen = opt_chosen().federated;
                    assert_eq!(job.strategy, StrategySection::named("fedavg"));
                    assert_eq!(tr.optimizer, LocalOptimizer::AdamW);
                    assert_eq!(
                        Some(OptimizerKind::AdamW {
                            weight_decay: tr.weight_decay.unwrap()
                        }),
                        Some(chosen.optimizer)
                    );
                    assert_eq!(tr.learning_rate, chosen.lr);
                    assert_eq!(tr.class_weight, ClassWeightConfig::None);
                }
                _ => {
                    assert_eq!(job.strategy.name, "fedavgm");
                    assert_eq!(
                        job.strategy.params_as_strings(),
                        [
                            ("server_learning_rate".to_owned(), "1".to_owned()),
                            ("server_momentum".to_owned(), "0.5".to_owned())
                        ]
                    );
                    assert_eq!(tr.optimizer, LocalOptimizer::Adam);
                    assert_eq!(tr.learning_rate, t.lr);
                    assert_eq!(tr.augmentation, Some(NUCLEI_AUGMENTATION));
                    let TaskKind::Nuclei(spec) = &t.kind else {
                        panic!("nuclei is not a nuclei task");
                    };
                    assert_eq!(tr.batch_size, spec.batch_size);
                    assert_eq!(job.round.deadline_secs, spec.deadline_secs);
                }
            }
        }
        // `--codec topk:<fraction>`.
        let mut t = tasks().swap_remove(0);
        t.codec = "topk:0.25";
        let job = job_of(&t);
        assert_eq!(
            (job.encoding.codec, job.encoding.topk_fraction),
            (CodecKind::Topk, Some(0.25))
        );
        t.codec = "zip";
        let arch = logreg();
        assert!(demo_job(&t, &arch).is_err());
    }

    /// `--epochs`, `--lr` and `--server` reach the jobs of WDBC and nuclei;
    /// OPT's job keeps the epochs, learning rate and strategy chosen on
    /// validation data.
    #[test]
    fn lr_and_server_overrides_leave_chosen_settings_alone() {
        let mut tasks = tasks();
        let server = Server::FedAdam { eta: 0.05 };
        let kept = override_unchosen(&mut tasks, Some(3), Some(0.25), Some(&server));
        assert_eq!(kept, ["opt"]);
        for t in &tasks {
            let job = job_of(t);
            if t.name == "opt" {
                let chosen = opt_chosen().federated;
                assert_eq!(job.training.learning_rate, chosen.lr, "opt");
                assert_eq!(job.training.epochs, chosen.epochs, "opt");
                assert_eq!(job.strategy.name, "fedavg", "opt");
            } else {
                assert_eq!(job.training.epochs, 3, "{}", t.name);
                assert_eq!(job.training.learning_rate, 0.25, "{}", t.name);
                assert_eq!(job.strategy.name, "fedadam", "{}", t.name);
                assert_eq!(
                    job.strategy.params_as_strings(),
                    [("eta".to_owned(), "0.05".to_owned())],
                    "{}",
                    t.name
                );
            }
        }
    }
}
