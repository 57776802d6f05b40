//! `site.toml`: the agent's configuration.
//!
//! ```toml
//! kit_dir  = "/etc/fedlink/kit"          # startup kit from `fedlink certs issue-site`
//! data_dir = "/var/lib/fedlink"          # state: model cache, audit log
//! # audit_log = "/var/lib/fedlink/audit.jsonl"     # default: <data_dir>/audit.jsonl
//! # audit_rotate_bytes = 67108864                  # default: never rotate
//! # log_file = "/var/log/fedlink/agent.log"        # diagnostics; default: stderr
//! device = "auto"                        # "auto" | "cpu" | "cuda" | "wgpu"
//! # coordinator_addr = "coord.example.org:4433"    # default: the kit's address
//! # transport = "auto"                  # "auto" (QUIC, else TLS over TCP) | "quic" | "tcp"
//! # proxy = "http://proxy.hospital.local:3128"   # HTTP CONNECT proxy for the TCP path
//! # proxy_credentials_file = "/etc/fedlink/proxy-credentials"  # `user:password`, mode 0600
//!
//! [connection]                           # all optional
//! backoff_initial_ms = 500
//! backoff_max_ms = 30000
//! connect_timeout_ms = 10000
//! idle_timeout_ms = 30000
//! quic_head_start_ms = 1500              # auto: QUIC alone this long, then TCP races it
//! tcp_fallback_secs = 600                # auto: a TCP win is kept this long, then QUIC re-probed
//! congestion_control = "cubic"           # QUIC controller of the uploads: "cubic" | "bbr"
//!
//! [dataset]
//! kind = "csv"                           # or "image-folder", "segmentation"
//! path = "/data/cohort.csv"
//! label_column = "outcome"
//! drop_columns = ["patient_id"]
//! validation_fraction = 0.2
//! split_seed = 7
//!
//! [policy]
//! federations = ["cardio-eu"]
//! architectures = ["logreg", "mlp"]
//! min_local_samples = 50
//! max_epochs = 20
//! encodings = ["f32", "f16", "int8"]
//! require_clipping = true
//! max_clip_norm = 5.0
//! ```
//!
//! Every table refuses unknown fields. Relative paths are resolved against
//! the directory of the `site.toml` file. Errors name the field at fault
//! ([`ConfigError`]).
//!
//! `[dataset]` variants, each with the loader's own fields:
//! * `kind = "csv"`: [`TabularConfig`] (`path`, `label_column`,
//!   `drop_columns`, `missing`, `validation_fraction`, `split_seed`);
//! * `kind = "image-folder"`: [`ImageFolderConfig`] (`root`, `classes`,
//!   `channels`, `height`, `width`, `resize`, `validation_fraction`,
//!   `split_seed`);
//! * `kind = "segmentation"`: [`SegmentationConfig`] (`tile`,
//!   `validation_fraction`, `split_seed`, and a `[dataset.source]` table
//!   with `format = "png_pairs"` + `images`, `masks`, or
//!   `format = "raw_u8"` + `dir`);
//! * `kind = "dicom"` / `kind = "nifti"`: [`VolumeConfig`] (`task`, `root`,
//!   `classes`, `axis`, `normalize`, `window`, `tile`,
//!   `validation_fraction`, `split_seed`; layout in [`crate::data::volume`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data::image::{ImageFolderConfig, load_image_folder};
use crate::data::segmentation::{SegmentationConfig, SegmentationSource, load_segmentation};
use crate::data::tabular::{TabularConfig, load_tabular};
use crate::data::volume::{VolumeConfig, load_dicom, load_nifti};
use crate::data::{DataError, SiteData};
use crate::device::DeviceChoice;
use crate::policy::Policy;

/// Largest `site.toml` read (1 MiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why `site.toml` could not be used.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed, a field is unknown, missing or of the wrong
    /// type (the message names it and its position).
    #[error("{path}: {message}")]
    Parse {
        /// The file (or `<string>`).
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field has an invalid value.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted field name, e.g. `connection.backoff_max_ms`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The dotted name of the invalid field, when the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    30_000
}
fn default_quic_head_start_ms() -> u64 {
    1_500
}
fn default_tcp_fallback_secs() -> u64 {
    600
}

/// `[connection]`: reconnection and timeouts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// First reconnection delay (before jitter), milliseconds (default 500).
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Largest reconnection delay, milliseconds (default 30 000).
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Give up a connection attempt (handshake + `Welcome`) after this long,
    /// milliseconds (default 10 000).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// QUIC idle timeout: a silent coordinator is considered gone after this
    /// long, milliseconds (default 30 000; keep-alives every third of it).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// `transport = "auto"`: how long QUIC tries alone before TLS over TCP
    /// races it, milliseconds (default 1 500).
    #[serde(default = "default_quic_head_start_ms")]
    pub quic_head_start_ms: u64,
    /// `transport = "auto"`: after TCP won a race, how long TCP is used
    /// without probing QUIC, seconds (default 600).
    #[serde(default = "default_tcp_fallback_secs")]
    pub tcp_fallback_secs: u64,
    /// QUIC congestion controller of what the agent sends (its uploads):
    /// `cubic` (default) or `bbr` (much faster on lossy long-distance
    /// links; quinn marks it experimental).
    #[serde(default)]
    pub congestion_control: fedlink_transport::Congestion,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            quic_head_start_ms: default_quic_head_start_ms(),
            tcp_fallback_secs: default_tcp_fallback_secs(),
            congestion_control: fedlink_transport::Congestion::default(),
        }
    }
}

impl ConnectionConfig {
    /// First backoff delay.
    pub fn backoff_initial(&self) -> Duration {
        Duration::from_millis(self.backoff_initial_ms)
    }
    /// Backoff cap.
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
    /// Connection attempt timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// QUIC idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    /// How long QUIC tries alone in `auto`.
    pub fn quic_head_start(&self) -> Duration {
        Duration::from_millis(self.quic_head_start_ms)
    }
    /// How long a TCP fallback is remembered in `auto`.
    pub fn tcp_fallback(&self) -> Duration {
        Duration::from_secs(self.tcp_fallback_secs)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        const DAY_MS: u64 = 86_400_000;
        let range = |field: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    format!("connection.{field}"),
                    format!("{v} is not in {lo}..={hi}"),
                ))
            }
        };
        range("backoff_initial_ms", self.backoff_initial_ms, 1, DAY_MS)?;
        range(
            "backoff_max_ms",
            self.backoff_max_ms,
            self.backoff_initial_ms,
            DAY_MS,
        )?;
        range("connect_timeout_ms", self.connect_timeout_ms, 10, DAY_MS)?;
        // quinn's idle timeout is a 62-bit millisecond count; keep it sane.
        range("idle_timeout_ms", self.idle_timeout_ms, 100, DAY_MS)?;
        range("quic_head_start_ms", self.quic_head_start_ms, 0, 60_000)?;
        range("tcp_fallback_secs", self.tcp_fallback_secs, 1, 86_400)?;
        Ok(())
    }
}

/// `[dataset]`: the local data, tagged by `kind`.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DatasetConfig {
    /// A CSV file with a label column.
    Csv(TabularConfig),
    /// Classification images, one folder per class.
    ImageFolder(ImageFolderConfig),
    /// Image/mask pairs for segmentation.
    Segmentation(SegmentationConfig),
    /// DICOM series (folders of 2D slices).
    Dicom(VolumeConfig),
    /// NIfTI volumes (`.nii`, `.nii.gz`).
    Nifti(VolumeConfig),
}

impl DatasetConfig {
    /// Read, validate and split the data (CPU and disk heavy for images).
    pub fn load(&self) -> Result<SiteData, DataError> {
        match self {
            Self::Csv(c) => load_tabular(c).map(SiteData::from),
            Self::ImageFolder(c) => load_image_folder(c).map(|i| i.data.into()),
            Self::Segmentation(c) => load_segmentation(c).map(SiteData::from),
            Self::Dicom(c) => load_dicom(c).map(SiteData::from),
            Self::Nifti(c) => load_nifti(c).map(SiteData::from),
        }
    }

    /// `csv`, `image-folder`, `segmentation`, `dicom` or `nifti`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Csv(_) => "csv",
            Self::ImageFolder(_) => "image-folder",
            Self::Segmentation(_) => "segmentation",
            Self::Dicom(_) => "dicom",
            Self::Nifti(_) => "nifti",
        }
    }

    fn validation_fraction(&self) -> f64 {
        match self {
            Self::Csv(c) => c.validation_fraction,
            Self::ImageFolder(c) => c.validation_fraction,
            Self::Segmentation(c) => c.validation_fraction,
            Self::Dicom(c) | Self::Nifti(c) => c.validation_fraction,
        }
    }

    fn resolve(&mut self, base: &Path) {
        match self {
            Self::Csv(c) => resolve(base, &mut c.path),
            Self::ImageFolder(c) => resolve(base, &mut c.root),
            Self::Segmentation(c) => match &mut c.source {
                SegmentationSource::PngPairs { images, masks } => {
                    resolve(base, images);
                    resolve(base, masks);
                }
                SegmentationSource::RawU8 { dir } => resolve(base, dir),
            },
            Self::Dicom(c) | Self::Nifti(c) => resolve(base, &mut c.root),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let f = self.validation_fraction();
        if !(f.is_finite() && (0.0..=0.9).contains(&f)) {
            return Err(ConfigError::invalid(
                "dataset.validation_fraction",
                format!("{f} is not within [0, 0.9]"),
            ));
        }
        let empty = |field: &str, p: &Path| {
            if p.as_os_str().is_empty() {
                Err(ConfigError::invalid(
                    format!("dataset.{field}"),
                    "must not be empty",
                ))
            } else {
                Ok(())
            }
        };
        match self {
            Self::Csv(c) => {
                empty("path", &c.path)?;
                if c.label_column.is_empty() {
                    return Err(ConfigError::invalid(
                        "dataset.label_column",
                        "must not be empty",
                    ));
                }
                if let Some(i) = c.drop_columns.iter().position(|d| *d == c.label_column) {
                    return Err(ConfigError::invalid(
                        format!("dataset.drop_columns[{i}]"),
                        format!("drops the label column {:?}", c.label_column),
                    ));
                }
            }
            Self::ImageFolder(c) => {
                empty("root", &c.root)?;
                if !matches!(c.channels, 1 | 3) {
                    return Err(ConfigError::invalid(
                        "dataset.channels",
                        format!("{} is not 1 (gray) or 3 (RGB)", c.channels),
                    ));
                }
                for (field, v) in [("height", c.height), ("width", c.width)] {
                    if v == 0 || v > crate::data::image::MAX_SIDE {
                        return Err(ConfigError::invalid(
                            format!("dataset.{field}"),
                            format!("{v} is not in 1..={}", crate::data::image::MAX_SIDE),
                        ));
                    }
                }
            }
            Self::Segmentation(c) => {
                match &c.source {
                    SegmentationSource::PngPairs { images, masks } => {
                        empty("source.images", images)?;
                        empty("source.masks", masks)?;
                    }
                    SegmentationSource::RawU8 { dir } => empty("source.dir", dir)?,
                }
                let max = crate::data::segmentation::MAX_TILE;
                if c.tile == 0 || !c.tile.is_multiple_of(4) || c.tile > max {
                    return Err(ConfigError::invalid(
                        "dataset.tile",
                        format!("{} is not a multiple of 4 in 4..={max}", c.tile),
                    ));
                }
            }
            Self::Dicom(c) | Self::Nifti(c) => {
                c.validate()
                    .map_err(|(field, message)| ConfigError::invalid(field, message))?;
            }
        }
        Ok(())
    }
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() && !p.as_os_str().is_empty() {
        *p = base.join(&*p);
    }
}

/// The whole `site.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The site's startup kit directory (certificate, keys, CA, coordinator
    /// address). Loaded with `fedlink_certs::Kit::load`, which refuses key
    /// files readable by group or others.
    pub kit_dir: PathBuf,
    /// Directory for the agent's state: `models/` (content-addressed model
    /// cache) and, by default, the audit log. Created (mode 0700) if missing.
    pub data_dir: PathBuf,
    /// The site's signed audit log (default `<data_dir>/audit.jsonl`; see
    /// [`crate::audit`]). Rotated files are kept next to it. Replaces the old
    /// unsigned `site_log`, which is refused with an error naming this field.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Rotate the audit log once its current file reaches this many bytes
    /// (at least [`crate::audit::MIN_ROTATE_BYTES`]); never when unset.
    #[serde(default)]
    pub audit_rotate_bytes: Option<u64>,
    /// Diagnostic log file (tracing output, appended); stderr when unset.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// Where training runs.
    #[serde(default)]
    pub device: DeviceChoice,
    /// `host:port` of the coordinator, overriding the kit's address (e.g.
    /// behind a hospital proxy). The TLS server name stays the kit's.
    #[serde(default)]
    pub coordinator_addr: Option<String>,
    /// How to reach the coordinator: `auto` (QUIC, falling back to TLS over
    /// TCP when QUIC does not connect), `quic` or `tcp`.
    #[serde(default)]
    pub transport: crate::dial::TransportMode,
    /// HTTP `CONNECT` proxy for the TCP path (`http://host:port`); when
    /// unset, `HTTPS_PROXY` / `NO_PROXY` apply.
    #[serde(default)]
    pub proxy: Option<String>,
    /// File holding `user:password` for the proxy's Basic authentication
    /// (mode 0600; never on the command line).
    #[serde(default)]
    pub proxy_credentials_file: Option<PathBuf>,
    /// Reconnection and timeouts.
    #[serde(default)]
    pub connection: ConnectionConfig,
    /// The local data.
    pub dataset: DatasetConfig,
    /// What the site agrees to.
    pub policy: Policy,
}

impl SiteConfig {
    /// Read, parse, resolve relative paths against the file's directory, and
    /// validate.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let io = |source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("file is {len} bytes, more than {MAX_CONFIG_BYTES}"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parse `text` (shown as `origin` in errors), resolve relative paths
    /// against `base`, and validate.
    pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<Self, ConfigError> {
        // The old unsigned site log: say what replaced it instead of a bare
        // "unknown field".
        if let Ok(table) = text.parse::<toml::Table>()
            && table.contains_key("site_log")
        {
            return Err(ConfigError::invalid(
                "site_log",
                "the unsigned site log was replaced by the signed audit log: use `audit_log` \
                 (default <data_dir>/audit.jsonl); the old file is not read or changed",
            ));
        }
        let mut cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.kit_dir);
        resolve(base, &mut self.data_dir);
        if let Some(p) = &mut self.audit_log {
            resolve(base, p);
        }
        if let Some(p) = &mut self.log_file {
            resolve(base, p);
        }
        if let Some(p) = &mut self.proxy_credentials_file {
            resolve(base, p);
        }
        self.dataset.resolve(base);
    }

    /// Check every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, p) in [("kit_dir", &self.kit_dir), ("data_dir", &self.data_dir)] {
            if p.as_os_str().is_empty() {
                return Err(ConfigError::invalid(field, "must not be empty"));
            }
        }
        if let Some(p) = &self.audit_log
            && p.as_os_str().is_empty()
        {
            return Err(ConfigError::invalid("audit_log", "must not be empty"));
        }
        if let Some(n) = self.audit_rotate_bytes
            && n < crate::audit::MIN_ROTATE_BYTES
        {
            return Err(ConfigError::invalid(
                "audit_rotate_bytes",
                format!("must be at least {}", crate::audit::MIN_ROTATE_BYTES),
            ));
        }
        if let Some(addr) = &self.coordinator_addr {
            check_host_port(addr)
                .map_err(|m| ConfigError::invalid("coordinator_addr", m.to_string()))?;
        }
        if let Some(url) = &self.proxy {
            crate::dial::Proxy::parse(url, "site.toml")
                .map_err(|m| ConfigError::invalid("proxy", m.to_string()))?;
        }
        if self.proxy_credentials_file.is_some() && self.proxy.is_none() {
            return Err(ConfigError::invalid(
                "proxy_credentials_file",
                "set without `proxy` (credentials are only sent to a configured proxy)",
            ));
        }
        if self.transport == crate::dial::TransportMode::Quic && self.proxy.is_some() {
            return Err(ConfigError::invalid(
                "proxy",
                "an HTTP proxy carries TCP only; it cannot be used with transport = \"quic\"",
            ));
        }
        self.connection.validate()?;
        self.dataset.validate()?;
        self.policy
            .validate()
            .map_err(|e| ConfigError::invalid(format!("policy.{}", e.field), e.message))?;
        Ok(())
    }

    /// The audit log's current file.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.data_dir.join(crate::audit::DEFAULT_FILE))
    }

    /// The model cache directory.
    pub fn model_cache_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }
}

/// `host:port` with a non-empty host and a port in 1..=65535.
pub(crate) fn check_host_port(addr: &str) -> Result<(), HostPortError> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(HostPortError::NoPort(addr.to_owned()));
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(HostPortError::Host(addr.to_owned()));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(HostPortError::Port(addr.to_owned())),
    }
}

/// Why an address is not `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostPortError {
    /// No `:` at all.
    #[error("{0:?} is not host:port")]
    NoPort(String),
    /// The host is empty or has white space.
    #[error("{0:?} has no valid host")]
    Host(String),
    /// The port is not a number in 1..=65535.
    #[error("{0:?} has no valid port")]
    Port(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
kit_dir = "kit"
data_dir = "/var/lib/fedlink"
device = "cpu"

[connection]
backoff_initial_ms = 10

[dataset]
kind = "csv"
path = "data/cohort.csv"
label_column = "y"
drop_columns = ["id"]
validation_fraction = 0.25
split_seed = 3

[policy]
federations = ["fed"]
architectures = ["logreg"]
encodings = ["f32", "f16"]
"#;

    fn parse(text: &str) -> Result<SiteConfig, ConfigError> {
        SiteConfig::parse(text, Path::new("site.toml"), Path::new("/etc/fedlink"))
    }

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.kit_dir, Path::new("/etc/fedlink/kit"));
        assert_eq!(c.data_dir, Path::new("/var/lib/fedlink"));
        assert_eq!(
            c.audit_log_path(),
            Path::new("/var/lib/fedlink/audit.jsonl")
        );
        assert_eq!(c.audit_rotate_bytes, None);
        assert_eq!(c.device, DeviceChoice::Cpu);
        assert_eq!(c.connection.backoff_initial_ms, 10);
        assert_eq!(c.connection.backoff_max_ms, 30_000);
        let DatasetConfig::Csv(t) = &c.dataset else {
            panic!("csv expected")
        };
        assert_eq!(t.path, Path::new("/etc/fedlink/data/cohort.csv"));
        assert_eq!(t.drop_columns, vec!["id".to_owned()]);
        assert_eq!(t.split_seed, 3);
        assert_eq!(c.policy.encodings, vec!["f32".to_owned(), "f16".to_owned()]);
        assert_eq!(c.policy.max_epochs, 50);
    }

    #[test]
    fn the_old_site_log_field_is_refused_by_name() {
        let text = GOOD.replace(
            "device = \"cpu\"",
            "device = \"cpu\"\nsite_log = \"x.jsonl\"",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("site_log") && e.contains("audit_log"), "{e}");
        let text = GOOD.replace(
            "device = \"cpu\"",
            "device = \"cpu\"\naudit_log = \"log/a.jsonl\"\naudit_rotate_bytes = 1048576",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.audit_log_path(), Path::new("/etc/fedlink/log/a.jsonl"));
        assert_eq!(c.audit_rotate_bytes, Some(1 << 20));
        let text = GOOD.replace(
            "device = \"cpu\"",
            "device = \"cpu\"\naudit_rotate_bytes = 10",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("audit_rotate_bytes"), "{e}");
    }

    #[test]
    fn transport_proxy_and_congestion_settings_are_checked() {
        use crate::dial::TransportMode;
        let top =
            |extra: &str| GOOD.replace("device = \"cpu\"", &format!("device = \"cpu\"\n{extra}"));
        let c = parse(GOOD).unwrap();
        assert_eq!(c.transport, TransportMode::Auto);
        assert_eq!(c.connection.quic_head_start_ms, 1_500);
        assert_eq!(c.connection.tcp_fallback_secs, 600);
        assert_eq!(
            c.connection.congestion_control,
            fedlink_transport::Congestion::Cubic
        );
        let c = parse(&top(
            "transport = \"tcp\"\nproxy = \"http://proxy:3128\"\nproxy_credentials_file = \"creds\"",
        ))
        .unwrap();
        assert_eq!(c.transport, TransportMode::Tcp);
        assert_eq!(
            c.proxy_credentials_file.as_deref(),
            Some(Path::new("/etc/fedlink/creds"))
        );
        for (extra, field) in [
            ("transport = \"udp\"", "transport"),
            ("proxy = \"https://proxy:3128\"", "proxy"),
            ("proxy = \"http://u:p@proxy:3128\"", "proxy"),
            (
                "proxy_credentials_file = \"creds\"",
                "proxy_credentials_file",
            ),
            (
                "transport = \"quic\"\nproxy = \"http://proxy:3128\"",
                "proxy",
            ),
        ] {
            let e = parse(&top(extra)).unwrap_err().to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let bbr = GOOD.replace(
            "[connection]\n",
            "[connection]\ncongestion_control = \"bbr\"\nquic_head_start_ms = 0\n",
        );
        let c = parse(&bbr).unwrap();
        assert_eq!(
            c.connection.congestion_control,
            fedlink_transport::Congestion::Bbr
        );
        assert_eq!(c.connection.quic_head_start_ms, 0);
    }

    #[test]
    fn the_example_site_toml_parses() {
        let text = include_str!("../examples/site.toml");
        parse(text).unwrap();
    }

    #[test]
    fn other_dataset_kinds_parse() {
        let base = GOOD.split("[dataset]").next().unwrap();
        let policy = "[policy]\nfederations = [\"fed\"]\narchitectures = [\"cnn\", \"unet\"]\n";
        let img = format!(
            "{base}[dataset]\nkind = \"image-folder\"\nroot = \"imgs\"\nheight = 28\nwidth = 28\n{policy}"
        );
        let c = parse(&img).unwrap();
        assert!(
            matches!(&c.dataset, DatasetConfig::ImageFolder(i) if i.root == Path::new("/etc/fedlink/imgs"))
        );
        let seg = format!(
            "{base}[dataset]\nkind = \"segmentation\"\ntile = 32\n[dataset.source]\nformat = \"raw_u8\"\ndir = \"nuclei\"\n{policy}"
        );
        let c = parse(&seg).unwrap();
        assert_eq!(c.dataset.kind(), "segmentation");
        let pairs = format!(
            "{base}[dataset]\nkind = \"segmentation\"\n[dataset.source]\nformat = \"png_pairs\"\nimages = \"i\"\nmasks = \"m\"\n{policy}"
        );
        parse(&pairs).unwrap();
        let dicom = format!(
            "{base}[dataset]\nkind = \"dicom\"\ntask = \"segmentation\"\nroot = \"ct\"\nnormalize = \"window\"\nwindow = [40, 400]\ntile = 128\n{policy}"
        );
        let c = parse(&dicom).unwrap();
        assert_eq!(c.dataset.kind(), "dicom");
        assert!(
            matches!(&c.dataset, DatasetConfig::Dicom(v) if v.root == Path::new("/etc/fedlink/ct"))
        );
        let nifti = format!(
            "{base}[dataset]\nkind = \"nifti\"\ntask = \"classification\"\nroot = \"mri\"\nclasses = [\"a\", \"b\"]\naxis = \"x\"\n{policy}"
        );
        assert_eq!(parse(&nifti).unwrap().dataset.kind(), "nifti");
        // Volume settings are validated by field.
        let e = parse(&dicom.replace("tile = 128", "tile = 130")).unwrap_err();
        assert_eq!(e.field(), Some("dataset.tile"), "{e}");
        let e = parse(&dicom.replace("window = [40, 400]\n", "")).unwrap_err();
        assert_eq!(e.field(), Some("dataset.window"), "{e}");
        let e = parse(&nifti.replace("axis = \"x\"", "axis = \"w\"")).unwrap_err();
        // (serde's internally tagged enums lose the field name; the value and
        // the allowed ones are shown.)
        assert!(e.to_string().contains("unknown variant `w`"), "{e}");
    }

    #[test]
    fn unknown_fields_are_refused_everywhere() {
        for (from, to, name) in [
            ("device = \"cpu\"", "device = \"cpu\"\ncolour = 1", "colour"),
            (
                "backoff_initial_ms = 10",
                "backoff_initial_ms = 10\nretries = 3",
                "retries",
            ),
            (
                "split_seed = 3",
                "split_seed = 3\nshuffle = true",
                "shuffle",
            ),
            (
                "encodings = [\"f32\", \"f16\"]",
                "encodings = [\"f32\"]\nallow_all = true",
                "allow_all",
            ),
        ] {
            let text = GOOD.replace(from, to);
            let e = parse(&text).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Parse { message, .. } if message.contains(name)),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let cases = [
            (GOOD.replace("device = \"cpu\"", "device = \"tpu\""), "tpu"),
            (
                GOOD.replace("kind = \"csv\"", "kind = \"parquet\""),
                "parquet",
            ),
            (GOOD.replace("kit_dir = \"kit\"\n", ""), "kit_dir"),
            (GOOD.replace("label_column = \"y\"\n", ""), "label_column"),
            (
                GOOD.replace("federations = [\"fed\"]", "federations = [\"bad fed\"]"),
                "bad fed",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            (
                GOOD.replace("backoff_initial_ms = 10", "backoff_initial_ms = 0"),
                "connection.backoff_initial_ms",
            ),
            (
                GOOD.replace(
                    "backoff_initial_ms = 10",
                    "backoff_initial_ms = 10\nbackoff_max_ms = 5",
                ),
                "connection.backoff_max_ms",
            ),
            (
                GOOD.replace(
                    "backoff_initial_ms = 10",
                    "backoff_initial_ms = 10\nidle_timeout_ms = 1",
                ),
                "connection.idle_timeout_ms",
            ),
            (
                GOOD.replace("validation_fraction = 0.25", "validation_fraction = 0.95"),
                "dataset.validation_fraction",
            ),
            (
                GOOD.replace("drop_columns = [\"id\"]", "drop_columns = [\"id\", \"y\"]"),
                "dataset.drop_columns[1]",
            ),
            (
                GOOD.replace(
                    "encodings = [\"f32\", \"f16\"]",
                    "encodings = [\"f32\", \"f12\"]",
                ),
                "policy.encodings[1]",
            ),
            (
                GOOD.replace(
                    "architectures = [\"logreg\"]",
                    "architectures = [\"logreg\", \"gpt\"]",
                ),
                "policy.architectures[1]",
            ),
            (
                GOOD.replace("device = \"cpu\"", "coordinator_addr = \"nohost\""),
                "coordinator_addr",
            ),
            (
                GOOD.replace("device = \"cpu\"", "coordinator_addr = \"h:0\""),
                "coordinator_addr",
            ),
            (
                GOOD.replace("kit_dir = \"kit\"", "kit_dir = \"\""),
                "kit_dir",
            ),
        ];
        for (text, field) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.field(), Some(field), "{e}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
    }

    #[test]
    fn load_reports_missing_file() {
        let e = SiteConfig::load("/nonexistent/site.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }));
        assert!(e.to_string().contains("/nonexistent/site.toml"));
    }
}
