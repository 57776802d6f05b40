//! Strategy configuration: a serde-friendly [`StrategyConfig`], built from a
//! strategy name and `key=value` parameters (CLI `--set`, job TOML tables).
//!
//! ```toml
//! strategy = "fedadam"
//! [strategy_params]
//! eta = 0.05
//! clip_norm = 1.0
//! ```
//!
//! Strategy names and their parameters (Flower 1.x legacy
//! `flwr.server.strategy` names and defaults):
//!
//! | name | parameters (default) |
//! |---|---|
//! | `fedavg` | — |
//! | `fedavgm` | `server_learning_rate` (1.0), `server_momentum` (0.0) |
//! | `fedadagrad` | `eta` (0.1), `eta_l` (0.1), `tau` (1e-9) |
//! | `fedadam` | `eta` (0.1), `eta_l` (0.1), `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-9) |
//! | `fedyogi` | `eta` (0.01), `eta_l` (0.0316), `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-3) |
//! | `fedmedian` | — |
//! | `fedtrimmedavg` | `beta` (0.2) |
//! | `krum` | `num_malicious_clients` / `num_malicious` (0), `num_clients_to_keep` / `to_keep` (0) |
//! | `bulyan` | `num_malicious_clients` / `num_malicious` (0) |
//!
//! Parameters every strategy takes: `weighting` (`num_examples` | `uniform`),
//! `clip_norm` (fixed L2 clipping), `adaptive_clipping` (bool) with
//! `initial_clipping_norm` (0.1), `target_clipped_quantile` (0.5),
//! `clip_norm_lr` (0.2), `clipped_count_stddev`; `max_num_examples` (2^30),
//! `max_abs_value`, `memory_budget_bytes` (robust strategies, 4 GiB).
//! FedAvg-family strategies also take `frac_bits` (24) and central DP:
//! `noise_multiplier`, `num_sampled_sites`, `sampling_rate` (1.0).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dp::{AdaptiveClipping, CentralDp, Clipping};
use crate::error::ConfigError;
use crate::fedavg::{DEFAULT_FRAC_BITS, MAX_FRAC_BITS};
use crate::optimizer::ServerOptimizer;
use crate::robust::RobustRule;
use crate::validate::{DEFAULT_MAX_NUM_EXAMPLES, Weighting};

/// Default memory budget of robust strategies: 4 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 4 << 30;

/// Known strategy names.
pub const STRATEGY_NAMES: &str =
    "fedavg, fedavgm, fedadagrad, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum, bulyan";

/// How the round's updates are combined.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Aggregation {
    /// Streaming exact weighted mean, then a server optimizer.
    Mean(ServerOptimizer),
    /// A robust rule over buffered updates.
    Robust(RobustRule),
}

/// A complete, validated strategy configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    /// Strategy name as given (lower case).
    pub name: String,
    /// The aggregation rule.
    pub aggregation: Aggregation,
    /// Weighting of the mean.
    pub weighting: Weighting,
    /// Per-update clipping.
    pub clipping: Option<Clipping>,
    /// Central DP (mean strategies only; forces uniform weighting).
    pub dp: Option<CentralDp>,
    /// Fixed-point fractional bits of the exact mean.
    pub frac_bits: u32,
    /// Largest accepted `num_examples`.
    pub max_num_examples: u64,
    /// Largest accepted `|value|` of an update (`f32::MAX`: none).
    pub max_abs_value: f32,
    /// Memory budget of robust strategies, bytes.
    pub memory_budget_bytes: u64,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            name: "fedavg".into(),
            aggregation: Aggregation::Mean(ServerOptimizer::None),
            weighting: Weighting::NumExamples,
            clipping: None,
            dp: None,
            frac_bits: DEFAULT_FRAC_BITS,
            max_num_examples: DEFAULT_MAX_NUM_EXAMPLES,
            max_abs_value: f32::MAX,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET,
        }
    }
}

/// A parameter value in a TOML/JSON table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// Boolean.
    Bool(bool),
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// String.
    Str(String),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Float(x) => write!(f, "{x:?}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

/// The form a job file uses: a name and a table of parameters. Self-describing
/// formats only (TOML, JSON): `ParamValue` is untagged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyTable {
    /// Strategy name.
    pub strategy: String,
    /// Parameters.
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
}

impl TryFrom<&StrategyTable> for StrategyConfig {
    type Error = ConfigError;
    fn try_from(t: &StrategyTable) -> Result<Self, ConfigError> {
        Self::from_params(
            &t.strategy,
            t.params.iter().map(|(k, v)| (k.clone(), v.to_string())),
        )
    }
}

struct Params {
    strategy: &'static str,
    map: BTreeMap<String, String>,
    accepted: Vec<&'static str>,
}

impl Params {
    fn take<T: std::str::FromStr>(
        &mut self,
        keys: &[&'static str],
    ) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.accepted.extend_from_slice(keys);
        let mut found = None;
        for k in keys {
            if let Some(v) = self.map.remove(*k) {
                if found.is_some() {
                    return Err(ConfigError::DuplicateKey((*k).to_owned()));
                }
                let parsed = v.trim().parse::<T>().map_err(|e| ConfigError::BadValue {
                    strategy: self.strategy,
                    key: (*k).to_owned(),
                    value: v.clone(),
                    reason: e.to_string(),
                })?;
                found = Some((k, v, parsed));
            }
        }
        Ok(found.map(|(_, _, p)| p))
    }

    fn f64_in(
        &mut self,
        key: &'static str,
        default: f64,
        ok: impl Fn(f64) -> bool,
        what: &str,
    ) -> Result<f64, ConfigError> {
        let v = self.take::<f64>(&[key])?.unwrap_or(default);
        if !v.is_finite() || !ok(v) {
            return Err(self.bad(key, v, what));
        }
        Ok(v)
    }

    fn bad(&self, key: &str, v: impl std::fmt::Display, what: &str) -> ConfigError {
        ConfigError::BadValue {
            strategy: self.strategy,
            key: key.to_owned(),
            value: v.to_string(),
            reason: what.to_owned(),
        }
    }
}

fn static_name(name: &str) -> Option<&'static str> {
    STRATEGY_NAMES.split(", ").find(|n| *n == name)
}

impl StrategyConfig {
    /// Build from a strategy name and `(key, value)` pairs; unknown names,
    /// unknown keys and bad values are errors.
    pub fn from_params<K, V>(
        name: &str,
        params: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let lname = name.trim().to_ascii_lowercase();
        let strategy = static_name(&lname).ok_or_else(|| ConfigError::UnknownStrategy {
            name: name.to_owned(),
            known: STRATEGY_NAMES,
        })?;
        let mut map = BTreeMap::new();
        for (k, v) in params {
            let k = k.into();
            if map.insert(k.clone(), v.into()).is_some() {
                return Err(ConfigError::DuplicateKey(k));
            }
        }
        let mut p = Params {
            strategy,
            map,
            accepted: Vec::new(),
        };
        let pos = |x: f64| x > 0.0;
        let unit = |x: f64| (0.0..1.0).contains(&x);
        let aggregation = match strategy {
            "fedavg" => Aggregation::Mean(ServerOptimizer::None),
            "fedavgm" => Aggregation::Mean(ServerOptimizer::FedAvgM {
                server_learning_rate: p.f64_in("server_learning_rate", 1.0, pos, "must be > 0")?,
                server_momentum: p.f64_in("server_momentum", 0.0, unit, "must be in [0, 1)")?,
            }),
            "fedadagrad" => Aggregation::Mean(ServerOptimizer::FedAdagrad {
                eta: p.f64_in("eta", 1e-1, pos, "must be > 0")?,
                eta_l: p.f64_in("eta_l", 1e-1, pos, "must be > 0")?,
                tau: p.f64_in("tau", 1e-9, pos, "must be > 0")?,
            }),
            "fedadam" => Aggregation::Mean(ServerOptimizer::FedAdam {
                eta: p.f64_in("eta", 1e-1, pos, "must be > 0")?,
                eta_l: p.f64_in("eta_l", 1e-1, pos, "must be > 0")?,
                beta_1: p.f64_in("beta_1", 0.9, unit, "must be in [0, 1)")?,
                beta_2: p.f64_in("beta_2", 0.99, unit, "must be in [0, 1)")?,
                tau: p.f64_in("tau", 1e-9, pos, "must be > 0")?,
            }),
            "fedyogi" => Aggregation::Mean(ServerOptimizer::FedYogi {
                eta: p.f64_in("eta", 1e-2, pos, "must be > 0")?,
                eta_l: p.f64_in("eta_l", 0.0316, pos, "must be > 0")?,
                beta_1: p.f64_in("beta_1", 0.9, unit, "must be in [0, 1)")?,
                beta_2: p.f64_in("beta_2", 0.99, unit, "must be in [0, 1)")?,
                tau: p.f64_in("tau", 1e-3, pos, "must be > 0")?,
            }),
            "fedmedian" => Aggregation::Robust(RobustRule::Median),
            "fedtrimmedavg" => Aggregation::Robust(RobustRule::TrimmedMean {
                beta: p.f64_in(
                    "beta",
                    0.2,
                    |b| (0.0..0.5).contains(&b),
                    "must be in [0, 0.5)",
                )?,
            }),
            "krum" => Aggregation::Robust(RobustRule::Krum {
                num_malicious: p
                    .take::<usize>(&["num_malicious_clients", "num_malicious"])?
                    .unwrap_or(0),
                to_keep: p
                    .take::<usize>(&["num_clients_to_keep", "to_keep"])?
                    .unwrap_or(0),
            }),
            _ => Aggregation::Robust(RobustRule::Bulyan {
                num_malicious: p
                    .take::<usize>(&["num_malicious_clients", "num_malicious"])?
                    .unwrap_or(0),
            }),
        };
        let is_mean = matches!(aggregation, Aggregation::Mean(_));

        let weighting = match p.take::<String>(&["weighting"])?.as_deref() {
            None | Some("num_examples") => Weighting::NumExamples,
            Some("uniform") => Weighting::Uniform,
            Some(other) => {
                return Err(p.bad("weighting", other, "expected num_examples or uniform"));
            }
        };
        let fixed = p.take::<f64>(&["clip_norm"])?;
        let adaptive = p.take::<bool>(&["adaptive_clipping"])?.unwrap_or(false);
        let mut ad = AdaptiveClipping::default();
        let has_adaptive_keys;
        {
            let before = p.map.len();
            ad.initial_clipping_norm = p.f64_in(
                "initial_clipping_norm",
                ad.initial_clipping_norm,
                pos,
                "must be > 0",
            )?;
            ad.target_clipped_quantile = p.f64_in(
                "target_clipped_quantile",
                ad.target_clipped_quantile,
                |x| (0.0..=1.0).contains(&x),
                "must be in [0, 1]",
            )?;
            ad.clip_norm_lr = p.f64_in("clip_norm_lr", ad.clip_norm_lr, pos, "must be > 0")?;
            ad.clipped_count_stddev = p.take::<f64>(&["clipped_count_stddev"])?;
            if let Some(s) = ad.clipped_count_stddev
                && !(s.is_finite() && s >= 0.0)
            {
                return Err(p.bad("clipped_count_stddev", s, "must be >= 0"));
            }
            has_adaptive_keys = p.map.len() != before;
        }
        if has_adaptive_keys && !adaptive {
            return Err(p.bad(
                "adaptive_clipping",
                false,
                "adaptive clipping parameters need adaptive_clipping = true",
            ));
        }
        let clipping = match (fixed, adaptive) {
            (Some(_), true) => {
                return Err(p.bad(
                    "clip_norm",
                    "set",
                    "give either clip_norm or adaptive_clipping, not both",
                ));
            }
            (Some(c), false) => {
                if !(c.is_finite() && c > 0.0) {
                    return Err(p.bad("clip_norm", c, "must be > 0"));
                }
                Some(Clipping::Fixed { clip_norm: c })
            }
            (None, true) => Some(Clipping::Adaptive(ad)),
            (None, false) => None,
        };

        let mut frac_bits = DEFAULT_FRAC_BITS;
        let mut dp = None;
        if is_mean {
            if let Some(k) = p.take::<u32>(&["frac_bits"])? {
                if k > MAX_FRAC_BITS {
                    return Err(p.bad("frac_bits", k, &format!("must be <= {MAX_FRAC_BITS}")));
                }
                frac_bits = k;
            }
            let z = p.take::<f64>(&["noise_multiplier"])?;
            let m = p.take::<usize>(&["num_sampled_sites"])?;
            let q = p.f64_in(
                "sampling_rate",
                1.0,
                |q| q > 0.0 && q <= 1.0,
                "must be in (0, 1]",
            )?;
            match (z, m) {
                (Some(z), Some(m)) => {
                    if !(z.is_finite() && z >= 0.0) {
                        return Err(p.bad("noise_multiplier", z, "must be >= 0"));
                    }
                    if m == 0 {
                        return Err(p.bad("num_sampled_sites", m, "must be > 0"));
                    }
                    if clipping.is_none() {
                        return Err(p.bad(
                            "noise_multiplier",
                            z,
                            "central DP needs clip_norm or adaptive_clipping",
                        ));
                    }
                    let cdp = CentralDp {
                        noise_multiplier: z,
                        num_sampled_sites: m,
                        sampling_rate: q,
                    };
                    if let Some(Clipping::Adaptive(a)) = &clipping {
                        let sb = crate::dp::count_stddev(a, Some(&cdp));
                        if crate::dp::update_noise_multiplier(z, sb).is_none() {
                            return Err(p.bad(
                                "noise_multiplier",
                                z,
                                &format!("must be < 2 × clipped_count_stddev ({sb}); raise clipped_count_stddev"),
                            ));
                        }
                    }
                    dp = Some(cdp);
                }
                (None, None) => {}
                (Some(_), None) => {
                    return Err(p.bad(
                        "num_sampled_sites",
                        "missing",
                        "noise_multiplier needs num_sampled_sites",
                    ));
                }
                (None, Some(_)) => {
                    return Err(p.bad(
                        "noise_multiplier",
                        "missing",
                        "num_sampled_sites needs noise_multiplier",
                    ));
                }
            }
        }
        let max_num_examples = p
            .take::<u64>(&["max_num_examples"])?
            .unwrap_or(DEFAULT_MAX_NUM_EXAMPLES);
        if max_num_examples == 0 {
            return Err(p.bad("max_num_examples", 0, "must be > 0"));
        }
        let max_abs_value = p.take::<f32>(&["max_abs_value"])?.unwrap_or(f32::MAX);
        if max_abs_value.is_nan() || max_abs_value <= 0.0 {
            return Err(p.bad("max_abs_value", max_abs_value, "must be > 0"));
        }
        let memory_budget_bytes = if is_mean {
            DEFAULT_MEMORY_BUDGET
        } else {
            p.take::<u64>(&["memory_budget_bytes"])?
                .unwrap_or(DEFAULT_MEMORY_BUDGET)
        };
        if let Some(k) = p.map.keys().next() {
            let mut accepted = p.accepted.clone();
            accepted.sort_unstable();
            accepted.dedup();
            return Err(ConfigError::UnknownKey {
                strategy,
                key: k.clone(),
                accepted: accepted.join(", "),
            });
        }
        Ok(Self {
            name: strategy.to_owned(),
            aggregation,
            // DP-FedAvg's sensitivity bound needs uniform weights.
            weighting: if dp.is_some() {
                Weighting::Uniform
            } else {
                weighting
            },
            clipping,
            dp,
            frac_bits,
            max_num_examples,
            max_abs_value,
            memory_budget_bytes,
        })
    }

    /// Parse `key=value` strings (the CLI's `--set`).
    pub fn from_key_values<S: AsRef<str>>(name: &str, kvs: &[S]) -> Result<Self, ConfigError> {
        let mut pairs = Vec::with_capacity(kvs.len());
        for kv in kvs {
            let kv = kv.as_ref();
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(kv.to_owned()))?;
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Self::from_params(name, pairs)
    }
}
