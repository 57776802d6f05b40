//! Choosing a tabular task's training settings on validation data, the same
//! way for the federated model and its two baselines (central, local-only),
//! and training the baselines with what was chosen.
//!
//! ```text
//!  each hospital's train.csv ──split (seeded, as the site does)──▶ 80 % train │ 20 % validation
//!                                                                    │             │
//!  candidates × stopping points ── train on the train parts ─────────┘             │
//!                                └─ AUC on the pooled validation parts ◀───────────┘
//!  → best validation AUC per method (ties: fewer rounds/epochs)  → held-out test, once
//! ```
//!
//! * **Validation split.** Each hospital's training CSV is split exactly as
//!   its agent splits it (`validation_fraction` 0.2, `split_seed` 7:
//!   ChaCha8 shuffle of the rows, the first fifth is validation). Models
//!   train on the 80 % parts only; the validation parts are never trained
//!   on, and the global test set is never looked at while choosing.
//! * **One yardstick.** Every method — federated, central and each
//!   hospital's local-only model — is judged on the union of the four
//!   validation parts (standardised with that model's own scaling). For a
//!   local-only model this lends it the other hospitals' validation rows,
//!   which favours the baseline, not the federation.
//! * **Same budget.** Each method gets the same number of candidates
//!   (optimizer or server strategy × learning rate × class weighting, and
//!   the same block of AdamW candidates: learning rate × weight decay ×
//!   class weighting, each with 1 or 2 local epochs per round; see
//!   [`candidates`]) and the same epoch budget: a candidate of `e` epochs
//!   per round is judged after each of `epoch_budget / e` rounds, a
//!   baseline after each of as many `e`-epoch chunks (its optimizer
//!   restarts at each chunk, as a site's does each round).
//! * **The federation is simulated in process** for the sweep: each site
//!   trains with [`train_local`] on the round's seed (the coordinator's
//!   `seed ^ round · 0x9E3779B97F4A7C15`), the deltas are averaged weighted
//!   by sample count and passed through the server optimizer of
//!   [`fedlink_aggregation`] — the coordinator's arithmetic, without the
//!   wire codec (f16) and the fixed-point mean. Round 1 trains on each
//!   site's local standardisation, later rounds on the pooled one, as the
//!   real federation does.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};
use fedlink_agent::data::Samples;
use fedlink_agent::data::Targets;
use fedlink_agent::data::tabular::{TabularConfig, TabularData, load_tabular, load_tabular_test};
use fedlink_agent::train::{
    ClassWeighting, EvalMetrics, OptimizerKind, TrainConfig, evaluate, train_local,
};
use fedlink_aggregation::config::{Aggregation, StrategyConfig};
use fedlink_aggregation::optimizer::{OptimizerState, ServerOptimizer};
use fedlink_protocol::arch::ArchSpec;
use fedlink_protocol::{FeatureScaling, FlatModel};

/// Validation fraction of each hospital's training CSV (as in site.toml).
pub const VALIDATION_FRACTION: f64 = 0.2;
/// Seed of that split (as in site.toml).
pub const SPLIT_SEED: u64 = 7;
/// Seed of the initial model (the job's `init = { seed = 42 }`).
pub const INIT_SEED: u64 = 42;
/// The job's seed (per-round training seeds derive from it).
pub const JOB_SEED: u64 = 7;
/// Mini-batch size of every method.
pub const BATCH_SIZE: usize = 16;

/// The server side of a federated candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Server {
    /// FedAvg (the update is the averaged delta).
    FedAvg,
    /// FedAdam with this server learning rate (other parameters at
    /// Flower's defaults).
    FedAdam {
        /// Server learning rate `eta`.
        eta: f64,
    },
    /// FedAvg with server momentum (FedAvgM): the averaged delta feeds a
    /// momentum buffer, the model moves by `lr` × that buffer.
    FedAvgM {
        /// Server learning rate.
        lr: f64,
        /// Server momentum in `[0, 1)`.
        momentum: f64,
    },
}

impl std::str::FromStr for Server {
    type Err = anyhow::Error;

    /// `fedavg`, `fedadam:<eta>` or `fedavgm:<lr>:<momentum>`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let num = |v: &str, what: &str| -> anyhow::Result<f64> {
            let x: f64 = v
                .parse()
                .with_context(|| format!("{what} {v:?} in server strategy {s:?}"))?;
            if !x.is_finite() || x < 0.0 {
                bail!("{what} {v:?} in server strategy {s:?}: not a finite number ≥ 0");
            }
            Ok(x)
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["fedavg"] => Ok(Self::FedAvg),
            ["fedadam", eta] => Ok(Self::FedAdam {
                eta: num(eta, "eta")?,
            }),
            ["fedavgm", lr, momentum] => Ok(Self::FedAvgM {
                lr: num(lr, "server learning rate")?,
                momentum: num(momentum, "server momentum")?,
            }),
            _ => bail!(
                "server strategy {s:?}: expected fedavg, fedadam:<eta> or fedavgm:<lr>:<momentum>"
            ),
        }
    }
}

impl Server {
    /// The job file's `[strategy]` table.
    pub fn job_toml(&self) -> String {
        match self {
            Self::FedAvg => "name = \"fedavg\"\n".to_owned(),
            Self::FedAdam { eta } => {
                format!("name = \"fedadam\"\n[strategy.params]\neta = {eta}\n")
            }
            Self::FedAvgM { lr, momentum } => format!(
                "name = \"fedavgm\"\n[strategy.params]\nserver_learning_rate = {lr}\nserver_momentum = {momentum}\n"
            ),
        }
    }

    fn optimizer(&self) -> anyhow::Result<ServerOptimizer> {
        let cfg = match self {
            Self::FedAvg => StrategyConfig::from_key_values::<&str>("fedavg", &[])?,
            Self::FedAdam { eta } => {
                StrategyConfig::from_key_values("fedadam", &[format!("eta={eta}")])?
            }
            Self::FedAvgM { lr, momentum } => StrategyConfig::from_key_values(
                "fedavgm",
                &[
                    format!("server_learning_rate={lr}"),
                    format!("server_momentum={momentum}"),
                ],
            )?,
        };
        match cfg.aggregation {
            Aggregation::Mean(o) => Ok(o),
            other => bail!("not a mean strategy: {other:?}"),
        }
    }

    fn label(&self) -> String {
        match self {
            Self::FedAvg => "fedavg".to_owned(),
            Self::FedAdam { eta } => format!("fedadam(eta {eta})"),
            Self::FedAvgM { lr, momentum } => format!("fedavgm(lr {lr}, momentum {momentum})"),
        }
    }
}

/// One candidate setting.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    /// The optimizer of local steps (the sites', or the baseline's).
    pub optimizer: OptimizerKind,
    /// Its learning rate.
    pub lr: f64,
    /// Class weighting of the loss.
    pub weighting: ClassWeighting,
    /// The server strategy (federated candidates only).
    pub server: Option<Server>,
    /// Local epochs per round (federated), or per chunk (baselines).
    pub epochs: u32,
}

impl Setting {
    /// One line for tables.
    pub fn label(&self) -> String {
        let mut s = String::new();
        if let Some(server) = &self.server {
            let _ = write!(s, "{} + ", server.label());
        }
        let _ = write!(
            s,
            "{} lr {} weighting {}, {} epoch{}",
            self.optimizer.label(),
            self.lr,
            match self.weighting {
                ClassWeighting::None => "none",
                ClassWeighting::Balanced => "balanced",
            },
            self.epochs,
            if self.epochs == 1 { "" } else { "s" }
        );
        s
    }

    fn train_config(&self, seed: u64) -> TrainConfig {
        TrainConfig::new()
            .with_epochs(self.epochs as usize)
            .with_batch_size(BATCH_SIZE)
            .with_optimizer(self.optimizer)
            .with_learning_rate(self.lr)
            .with_class_weighting(Some(self.weighting))
            .with_seed(seed)
    }
}

/// A chosen setting and its stopping point.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The setting.
    pub setting: Setting,
    /// Rounds (federated) or chunks of `setting.epochs` epochs (baselines).
    pub rounds: u32,
}

/// Decoupled weight decays of the AdamW candidates.
pub const WEIGHT_DECAYS: [f64; 3] = [0.3, 3.0, 10.0];
/// Learning rates of the Adam and AdamW candidates.
const ADAM_LRS: [f64; 3] = [0.001, 0.003, 0.01];

/// Local epochs per round (or per baseline chunk) of the candidates.
pub const EPOCHS: [u32; 2] = [1, 2];

/// The candidates of one method, 60 each: for each of [`EPOCHS`],
/// * federated: server strategy {FedAvg, FedAdam η 0.01} × site SGD lr
///   {0.01, 0.03, 0.1} × weighting (12), then FedAvg × site AdamW lr
///   {0.001, 0.003, 0.01} × weight decay [`WEIGHT_DECAYS`] × weighting (18);
/// * baselines: {SGD lr 0.01 / 0.03 / 0.1, Adam lr 0.001 / 0.003 / 0.01} ×
///   weighting (12), then the same AdamW block as the federation's (18).
///
/// The weight-decay block is the same for every method: the sites' (or
/// the baseline's) local optimizer is AdamW, with the same learning rates
/// and decays.
pub fn candidates(federated: bool) -> Vec<Setting> {
    EPOCHS
        .iter()
        .flat_map(|&epochs| {
            candidates_of(federated)
                .into_iter()
                .map(move |s| Setting { epochs, ..s })
        })
        .collect()
}

/// The 30 candidates of one method at one epoch count (`epochs` 1 here,
/// set by [`candidates`]).
fn candidates_of(federated: bool) -> Vec<Setting> {
    let mut out = Vec::new();
    for weighting in [ClassWeighting::None, ClassWeighting::Balanced] {
        if federated {
            for server in [Server::FedAvg, Server::FedAdam { eta: 0.01 }] {
                for lr in [0.01, 0.03, 0.1] {
                    out.push(Setting {
                        optimizer: OptimizerKind::Sgd,
                        lr,
                        weighting,
                        server: Some(server.clone()),
                        epochs: 1,
                    });
                }
            }
        } else {
            for (optimizer, lrs) in [
                (OptimizerKind::Sgd, [0.01, 0.03, 0.1]),
                (OptimizerKind::Adam, ADAM_LRS),
            ] {
                for lr in lrs {
                    out.push(Setting {
                        optimizer,
                        lr,
                        weighting,
                        server: None,
                        epochs: 1,
                    });
                }
            }
        }
    }
    for weighting in [ClassWeighting::None, ClassWeighting::Balanced] {
        for weight_decay in WEIGHT_DECAYS {
            for lr in ADAM_LRS {
                out.push(Setting {
                    optimizer: OptimizerKind::AdamW { weight_decay },
                    lr,
                    weighting,
                    server: federated.then_some(Server::FedAvg),
                    epochs: 1,
                });
            }
        }
    }
    out
}

/// The job file's `[training]` lines of a site optimizer: `optimizer`,
/// and `weight_decay` (AdamW) or `momentum` (SGD with momentum).
pub fn optimizer_toml(optimizer: OptimizerKind) -> String {
    match optimizer {
        OptimizerKind::Sgd => "optimizer = \"sgd\"\n".to_owned(),
        OptimizerKind::SgdMomentum { momentum } => {
            format!("optimizer = \"sgd\"\nmomentum = {momentum}\n")
        }
        OptimizerKind::Adam => "optimizer = \"adam\"\n".to_owned(),
        OptimizerKind::AdamW { weight_decay } => {
            format!("optimizer = \"adamw\"\nweight_decay = {weight_decay}\n")
        }
    }
}

/// A task's data: each hospital's split, the pooled scaling, the test set.
pub struct TaskData {
    /// (hospital, its split and statistics).
    pub sites: Vec<(String, TabularData)>,
    /// The federation's scaling: pooled statistics of the training parts.
    pub pooled: FeatureScaling,
    /// The logistic regression.
    pub arch: ArchSpec,
    /// The initial model.
    pub init: FlatModel,
    /// Path of the held-out test CSV.
    test: std::path::PathBuf,
    label: String,
    drop: Vec<String>,
}

fn config(path: &Path, label: &str, drop: &[String], validation: f64) -> TabularConfig {
    let mut c = TabularConfig::new(path, label);
    c.drop_columns = drop.to_vec();
    c.validation_fraction = validation;
    c.split_seed = SPLIT_SEED;
    c
}

impl TaskData {
    /// Load each hospital's CSV split as its agent splits it.
    pub fn load(
        sites: &[(String, std::path::PathBuf)],
        test: &Path,
        label: &str,
        drop: &[String],
        split_seed: u64,
    ) -> anyhow::Result<Self> {
        let mut loaded = Vec::new();
        for (name, path) in sites {
            let mut cfg = config(path, label, drop, VALIDATION_FRACTION);
            cfg.split_seed = split_seed;
            let d = load_tabular(&cfg).with_context(|| format!("loading {name}'s data"))?;
            loaded.push((name.clone(), d));
        }
        let first = loaded.first().context("no hospital")?;
        let pooled = FeatureScaling::pooled(loaded.iter().map(|(_, d)| &d.stats))?;
        let inputs = first.1.features().len() as u32;
        let arch: ArchSpec = toml::from_str(&format!(
            "kind = \"logreg\"\ninputs = {inputs}\nclasses = 2\n"
        ))?;
        let init = arch.init(INIT_SEED).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            sites: loaded,
            pooled,
            arch,
            init,
            test: test.to_owned(),
            label: label.to_owned(),
            drop: drop.to_vec(),
        })
    }

    /// Every hospital's validation part, standardised with `scaling`.
    pub fn validation(&self, scaling: &FeatureScaling) -> anyhow::Result<Samples> {
        let parts = self
            .sites
            .iter()
            .map(|(_, d)| Ok(d.standardize(scaling)?.validation))
            .collect::<anyhow::Result<Vec<_>>>()?;
        concat(&parts)
    }

    /// Every hospital's training part, standardised with `scaling`.
    pub fn pooled_train(&self, scaling: &FeatureScaling) -> anyhow::Result<Samples> {
        let parts = self
            .sites
            .iter()
            .map(|(_, d)| Ok(d.standardize(scaling)?.train))
            .collect::<anyhow::Result<Vec<_>>>()?;
        concat(&parts)
    }

    /// The held-out test set, standardised with `scaling`.
    pub fn test(&self, scaling: &FeatureScaling) -> anyhow::Result<Samples> {
        Ok(load_tabular_test(
            &config(&self.test, &self.label, &self.drop, 0.0),
            scaling,
        )?)
    }

    /// Simulate the federation for `rounds` rounds of `s.epochs` epochs;
    /// `on_round(round, model)` sees each global model.
    pub fn federate(
        &self,
        s: &Setting,
        rounds: u32,
        mut on_round: impl FnMut(u32, &FlatModel) -> anyhow::Result<()>,
    ) -> anyhow::Result<FlatModel> {
        let server = s.server.clone().unwrap_or(Server::FedAvg).optimizer()?;
        let mut state = OptimizerState::default();
        let local = self
            .sites
            .iter()
            .map(|(_, d)| d.data.train.clone())
            .collect::<Vec<_>>();
        let pooled = self
            .sites
            .iter()
            .map(|(_, d)| Ok(d.standardize(&self.pooled)?.train))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let device = cpu()?;
        let mut global = self.init.clone();
        for round in 1..=rounds {
            let seed = JOB_SEED ^ u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let cfg = s.train_config(seed);
            let data = if round == 1 { &local } else { &pooled };
            let mut sum = vec![0f64; global.values().len()];
            let mut n_total = 0f64;
            for d in data {
                let (m, _) = train_local(&self.arch, &global, d, &cfg, &device.device)?;
                let n = d.len() as f64;
                for ((acc, &l), &g) in sum.iter_mut().zip(m.values()).zip(global.values()) {
                    *acc += n * f64::from(l - g);
                }
                n_total += n;
            }
            let mut delta: Vec<f32> = sum.iter().map(|v| (v / n_total) as f32).collect();
            server.apply(&mut state, &mut delta)?;
            for (g, u) in global.values_mut().iter_mut().zip(&delta) {
                *g += u;
            }
            on_round(round, &global)?;
        }
        Ok(global)
    }
}

/// Train one model on `data` in `chunks` chunks of `s.epochs` epochs (the
/// optimizer restarts at each chunk, like a site's each round; chunk `k`
/// shuffles with seed `JOB_SEED ^ k · 0x9E37…`); `on_chunk` sees each.
pub fn train_chunked(
    arch: &ArchSpec,
    init: &FlatModel,
    data: &Samples,
    s: &Setting,
    chunks: u32,
    mut on_chunk: impl FnMut(u32, &FlatModel) -> anyhow::Result<()>,
) -> anyhow::Result<FlatModel> {
    let device = cpu()?;
    let mut model = init.clone();
    for k in 1..=chunks {
        let seed = JOB_SEED ^ u64::from(k).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        model = train_local(arch, &model, data, &s.train_config(seed), &device.device)?.0;
        on_chunk(k, &model)?;
    }
    Ok(model)
}

fn cpu() -> anyhow::Result<fedlink_agent::device::SelectedDevice> {
    fedlink_agent::device::DeviceChoice::Cpu
        .resolve()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// AUC of `model` on `data` (0 when undefined).
pub fn auc(arch: &ArchSpec, model: &FlatModel, data: &Samples) -> anyhow::Result<f64> {
    Ok(evaluate(arch, model, data, &cpu()?.device)?
        .auc
        .unwrap_or(0.0))
}

/// Evaluate on `data`.
pub fn metrics(arch: &ArchSpec, model: &FlatModel, data: &Samples) -> anyhow::Result<EvalMetrics> {
    Ok(evaluate(arch, model, data, &cpu()?.device)?)
}

/// Concatenate class-labelled samples.
pub fn concat(parts: &[Samples]) -> anyhow::Result<Samples> {
    let first = parts.first().context("nothing to concatenate")?;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for p in parts {
        let Targets::Classes(c) = p.targets() else {
            bail!("samples without class labels");
        };
        x.extend_from_slice(p.features());
        y.extend_from_slice(c);
    }
    Ok(Samples::new(first.shape(), x, Targets::Classes(y))?)
}

/// The best stopping point of one candidate: (validation AUC, round), the
/// earliest round among equals.
fn best_of(curve: &[f64]) -> (f64, u32) {
    let mut best = (f64::MIN, 0);
    for (i, &a) in curve.iter().enumerate() {
        if a > best.0 {
            best = (a, i as u32 + 1);
        }
    }
    best
}

/// One row of the validation table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Method: `federated`, `central`, `local <site>`.
    pub method: String,
    /// The candidate.
    pub setting: Setting,
    /// Validation AUC after each round / chunk (mean over the splits).
    pub curve: Vec<f64>,
}

impl Row {
    /// (best validation AUC, its round).
    pub fn best(&self) -> (f64, u32) {
        best_of(&self.curve)
    }
}

/// Validation AUC after each of `rounds` rounds / chunks of one candidate
/// of `method` on one split.
fn curve(data: &TaskData, method: &str, s: &Setting, rounds: u32) -> anyhow::Result<Vec<f64>> {
    let mut curve = Vec::new();
    if method == "federated" {
        let val = data.validation(&data.pooled)?;
        data.federate(s, rounds, |_, m| {
            curve.push(auc(&data.arch, m, &val)?);
            Ok(())
        })?;
    } else if method == "central" {
        let val = data.validation(&data.pooled)?;
        let train = data.pooled_train(&data.pooled)?;
        train_chunked(&data.arch, &data.init, &train, s, rounds, |_, m| {
            curve.push(auc(&data.arch, m, &val)?);
            Ok(())
        })?;
    } else {
        let (_, d) = data
            .sites
            .iter()
            .find(|(n, _)| format!("local {n}") == method)
            .with_context(|| format!("no method {method:?}"))?;
        let val = data.validation(&d.scaling)?;
        train_chunked(&data.arch, &data.init, &d.data.train, s, rounds, |_, m| {
            curve.push(auc(&data.arch, m, &val)?);
            Ok(())
        })?;
    }
    Ok(curve)
}

/// The methods: `federated`, `central`, then `local <site>` for each site.
pub fn methods(data: &TaskData) -> Vec<String> {
    let mut m = vec!["federated".to_owned(), "central".to_owned()];
    m.extend(data.sites.iter().map(|(n, _)| format!("local {n}")));
    m
}

/// Run every candidate of every method on every split (`splits`: the same
/// hospitals split with different seeds), each for `epoch_budget` local
/// epochs in all (`epoch_budget / s.epochs` rounds or chunks); a row's
/// curve is the mean validation AUC over the splits.
pub fn sweep(
    splits: &[TaskData],
    epoch_budget: u32,
    mut progress: impl FnMut(&Row),
) -> anyhow::Result<Vec<Row>> {
    let first = splits.first().context("no split")?;
    let mut rows = Vec::new();
    for method in methods(first) {
        for s in candidates(method == "federated") {
            let rounds = epoch_budget / s.epochs.max(1);
            let mut mean = vec![0f64; rounds as usize];
            for data in splits {
                for (m, a) in mean.iter_mut().zip(curve(data, &method, &s, rounds)?) {
                    *m += a / splits.len() as f64;
                }
            }
            let row = Row {
                method: method.clone(),
                setting: s,
                curve: mean,
            };
            progress(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The chosen setting of `method`: the best validation AUC over every
/// candidate and stopping point (ties: the earlier candidate, then fewer
/// rounds).
pub fn choose(rows: &[Row], method: &str) -> Option<(Choice, f64)> {
    let mut best: Option<(Choice, f64)> = None;
    for r in rows.iter().filter(|r| r.method == method) {
        let (a, round) = r.best();
        if best.as_ref().is_none_or(|(_, b)| a > *b) {
            best = Some((
                Choice {
                    setting: r.setting.clone(),
                    rounds: round,
                },
                a,
            ));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, lr: f64, curve: &[f64]) -> Row {
        Row {
            method: method.into(),
            setting: Setting {
                optimizer: OptimizerKind::Sgd,
                lr,
                weighting: ClassWeighting::None,
                server: None,
                epochs: 1,
            },
            curve: curve.to_vec(),
        }
    }

    #[test]
    fn the_best_stopping_point_is_the_earliest_maximum() {
        assert_eq!(best_of(&[0.5, 0.7, 0.6, 0.7]), (0.7, 2));
        assert_eq!(row("central", 0.1, &[0.4]).best(), (0.4, 1));
    }

    #[test]
    fn each_method_is_chosen_among_its_own_rows_only() {
        let rows = vec![
            row("central", 0.01, &[0.55, 0.60]),
            row("central", 0.1, &[0.62, 0.58]),
            // ties keep the earlier candidate
            row("central", 0.3, &[0.62, 0.62]),
            row("federated", 0.03, &[0.70, 0.71]),
        ];
        let (c, v) = choose(&rows, "central").unwrap();
        assert_eq!((c.setting.lr, c.rounds, v), (0.1, 1, 0.62));
        let (f, v) = choose(&rows, "federated").unwrap();
        assert_eq!((f.setting.lr, f.rounds, v), (0.03, 2, 0.71));
        assert!(choose(&rows, "local ky").is_none());
    }

    #[test]
    fn every_method_gets_the_same_number_of_candidates() {
        let fed = candidates(true);
        let base = candidates(false);
        assert_eq!(fed.len(), 60);
        assert_eq!(base.len(), fed.len());
        assert!(fed.iter().all(|s| s.server.is_some()));
        assert!(base.iter().all(|s| s.server.is_none()));
        // the weight-decay block is the same for every method
        let decayed = |c: &[Setting]| {
            c.iter()
                .filter(|s| matches!(s.optimizer, OptimizerKind::AdamW { .. }))
                .map(|s| (s.optimizer, s.lr.to_bits(), s.weighting, s.epochs))
                .collect::<Vec<_>>()
        };
        assert_eq!(decayed(&fed).len(), 36);
        assert_eq!(decayed(&fed), decayed(&base));
        // each candidate's job lines parse as the coordinator's [training]
        for s in fed.iter().chain(&base) {
            let job = format!(
                "id = \"j\"\nrounds = 1\narch = {{ kind = \"logreg\", inputs = 4, classes = 2 }}\ninit = {{ seed = 1 }}\n[strategy]\nname = \"fedavg\"\n[round]\ndeadline_secs = 60\n[training]\nlearning_rate = {}\n{}",
                s.lr,
                optimizer_toml(s.optimizer)
            );
            let t = fedlink_coordinator::job::Job::from_toml(&job)
                .unwrap()
                .training;
            let offered = fedlink_protocol::TrainingConfig {
                epochs: 1,
                batch_size: 16,
                optimizer: t.optimizer_to_protocol(),
                learning_rate: t.learning_rate,
                fedprox_mu: 0.0,
                seed: 1,
                augmentation: None,
                class_weight: fedlink_protocol::ClassWeight::None,
            };
            let at_site = fedlink_agent::sitecore::train_config(&offered).unwrap();
            assert_eq!(at_site.optimizer, s.optimizer, "{}", s.label());
        }
        // the job file's strategy table parses as the coordinator's
        let t = Server::FedAdam { eta: 0.01 }.job_toml();
        assert!(t.contains("name = \"fedadam\"") && t.contains("eta = 0.01"));
        assert!(matches!(
            Server::FedAdam { eta: 0.01 }.optimizer().unwrap(),
            ServerOptimizer::FedAdam { eta, .. } if eta == 0.01
        ));
    }

    #[test]
    fn server_strategies_parse_from_the_command_line() {
        assert_eq!("fedavg".parse::<Server>().unwrap(), Server::FedAvg);
        assert_eq!(
            "fedadam:0.05".parse::<Server>().unwrap(),
            Server::FedAdam { eta: 0.05 }
        );
        let m: Server = "fedavgm:1:0.9".parse().unwrap();
        assert_eq!(
            m,
            Server::FedAvgM {
                lr: 1.0,
                momentum: 0.9
            }
        );
        // the job file's table and the aggregation crate agree on it
        let t = m.job_toml();
        assert!(t.contains("server_momentum = 0.9"), "{t}");
        assert!(matches!(
            m.optimizer().unwrap(),
            ServerOptimizer::FedAvgM { server_learning_rate, server_momentum }
                if server_learning_rate == 1.0 && server_momentum == 0.9
        ));
        for bad in [
            "fedadam",
            "fedavgm:1",
            "fedadam:nan",
            "fedavgm:1:-0.5",
            "krum",
        ] {
            let e = bad.parse::<Server>().unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
