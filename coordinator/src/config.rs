//! `coordinator.toml`: where the coordinator listens, which kit and CA files
//! it uses, where it keeps its data, and which job it runs.
//!
//! ```toml
//! listen = "127.0.0.1:7443"
//! tcp_listen = "same"            # TLS over TCP for sites whose network blocks UDP: "same"
//!                                # (the QUIC port number, on TCP), "off", or an address
//! congestion_control = "cubic"   # QUIC controller of what the coordinator sends: "cubic" | "bbr"
//! kit = "coordinator"            # the coordinator's kit directory
//! ca_dir = "ca"                  # public CA files: ca.pem, sites.toml, revoked.toml (never ca-key.pem)
//! data_dir = "data"
//! job = "jobs/breast-cancer.toml"  # optional: submitted at start if the store lacks it
//! heartbeat_interval_secs = 5
//! idle_timeout_secs = 30
//! max_concurrent_uploads = 4
//! max_concurrent_downloads = 4
//! audit_rotate_bytes = 67108864  # rotate <data_dir>/audit/audit.jsonl past this size
//! update_retention = "job"       # or a number of rounds of update archive to keep
//! refusal_summary_secs = 60      # failed handshakes: one audit entry per source per interval
//! max_handshakes_in_flight = 64  # more are refused before any cryptography
//! handshake_burst_per_source = 64      # handshakes one (validated) address may start at once
//! handshakes_per_source_per_sec = 16.0 # and then per second
//! min_free_disk_mib = 512        # below this free space: no new uploads or connections
//! max_connections = 1024         # open connections, sites and admins
//! max_connections_per_identity = 4
//! hello_timeout_secs = 10          # a new connection says Hello within this
//! control_frame_timeout_secs = 30  # a control message arrives whole within this of its first byte
//! stream_first_message_secs = 30   # a new stream says what it is for within this
//! upload_stall_secs = 60           # an upload holding a slot sends its next record within this
//! control_burst = 32               # control messages of a site at once ...
//! control_per_sec = 4.0            # ... and then per second; beyond: connection cut
//! audit_head_burst = 16            # audit heads of a site recorded at once ...
//! audit_head_per_sec = 1.0         # ... and then per second; beyond: ignored
//! ```
//!
//! Relative paths are resolved against the directory of the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a coordinator config was refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown / missing fields.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the field).
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn default_heartbeat() -> u64 {
    5
}
fn default_idle() -> u64 {
    30
}
fn default_uploads() -> usize {
    4
}
fn default_downloads() -> usize {
    4
}
fn default_audit_rotate() -> u64 {
    64 * 1024 * 1024
}
fn default_refusal_summary() -> u64 {
    60
}
fn default_handshakes() -> usize {
    64
}
fn default_hello_timeout() -> u64 {
    10
}
fn default_slow_timeout() -> u64 {
    30
}
fn default_upload_stall() -> u64 {
    60
}
fn default_control_burst() -> u32 {
    32
}
fn default_control_rate() -> f64 {
    4.0
}
fn default_head_burst() -> u32 {
    16
}
fn default_head_rate() -> f64 {
    1.0
}
fn default_handshake_burst() -> u32 {
    64
}
fn default_handshake_rate() -> f64 {
    16.0
}
fn default_min_free() -> u64 {
    512
}
fn default_connections() -> usize {
    1024
}
fn default_connections_per_identity() -> usize {
    4
}

/// How long the per-round update archive (`<data_dir>/updates/<job>/round-NNNNNN/`,
/// what `fedlink audit replay` recomputes a round from) is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdateRetention {
    /// Keep every round of the job (`"job"`, the default).
    #[default]
    Job,
    /// Keep the newest `n` completed rounds (`n` ≥ 1); older round
    /// directories are removed after each round.
    Rounds(u32),
}

impl<'de> Deserialize<'de> for UpdateRetention {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Count(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Name(n) if n == "job" => Ok(Self::Job),
            Raw::Name(n) => Err(serde::de::Error::custom(format!(
                "update_retention: expected \"job\" or a number of rounds, got {n:?}"
            ))),
            Raw::Count(n) => u32::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .map(Self::Rounds)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "update_retention: a number of rounds must be 1..=4294967295, got {n}"
                    ))
                }),
        }
    }
}

/// Where the coordinator's TLS-over-TCP listener binds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum TcpListen {
    /// The QUIC endpoint's address and port number, on TCP (the default:
    /// one port number for the firewall to open, on both protocols).
    #[default]
    Same,
    /// No TCP listener: sites must reach the coordinator over UDP.
    Off,
    /// This address.
    At(SocketAddr),
}

/// A `tcp_listen` value that is neither `"same"`, `"off"` nor a socket
/// address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("tcp_listen: {value:?} is not \"same\", \"off\" or an address like \"0.0.0.0:443\"")]
pub struct TcpListenError {
    /// The value given.
    pub value: String,
    /// Why it is not an address.
    #[source]
    pub source: std::net::AddrParseError,
}

impl TryFrom<String> for TcpListen {
    type Error = TcpListenError;

    fn try_from(s: String) -> Result<Self, TcpListenError> {
        match s.as_str() {
            "same" => Ok(Self::Same),
            "off" => Ok(Self::Off),
            other => other
                .parse()
                .map(Self::At)
                .map_err(|source| TcpListenError {
                    value: other.to_owned(),
                    source,
                }),
        }
    }
}

impl TcpListen {
    /// The address to bind, given the QUIC endpoint's bound address
    /// (`None`: no TCP listener).
    pub fn resolve(self, quic: SocketAddr) -> Option<SocketAddr> {
        match self {
            Self::Same => Some(quic),
            Self::Off => None,
            Self::At(a) => Some(a),
        }
    }
}

/// The parsed, validated coordinator configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// UDP address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// Where the TLS-over-TCP listener binds (the same protocol, mutual TLS
    /// and checks, for sites whose network blocks UDP).
    #[serde(default)]
    pub tcp_listen: TcpListen,
    /// QUIC congestion controller of what the coordinator sends (model
    /// downloads): `cubic` (default) or `bbr` (much faster on lossy
    /// long-distance links; quinn marks it experimental).
    #[serde(default)]
    pub congestion_control: fedlink_transport::Congestion,
    /// The coordinator's kit directory (server certificate and key).
    pub kit: PathBuf,
    /// Directory with the federation's public CA files: `ca.pem`,
    /// `sites.toml` (the provisioning manifest) and `revoked.toml`.
    pub ca_dir: PathBuf,
    /// Data directory (embedded store, model versions, update archive).
    pub data_dir: PathBuf,
    /// The only directory from which jobs submitted over the admin API may
    /// read an initial-model file (`init = { file = … }`, relative to it).
    /// Unset: submitted jobs must use `init = { seed = … }`. The job file
    /// given here in `job` is the operator's own and is not restricted.
    #[serde(default)]
    pub init_dir: Option<PathBuf>,
    /// Job file submitted at start if the store does not know its id yet.
    #[serde(default)]
    pub job: Option<PathBuf>,
    /// How often sites send heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: u64,
    /// A connection silent for this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// Uploads received and validated at the same time, at most (others
    /// wait). Each costs a few MiB of buffers; keep it near the core count.
    #[serde(default = "default_uploads")]
    pub max_concurrent_uploads: usize,
    /// Model downloads served at the same time, at most (others wait).
    /// Bounds memory when many sites fetch a new model together.
    #[serde(default = "default_downloads")]
    pub max_concurrent_downloads: usize,
    /// The audit log (`<data_dir>/audit/audit.jsonl`) is rotated once it is
    /// larger than this many bytes; rotation keeps the hash chain.
    #[serde(default = "default_audit_rotate")]
    pub audit_rotate_bytes: u64,
    /// How much of the update archive to keep (`"job"` or a number of rounds).
    #[serde(default)]
    pub update_retention: UpdateRetention,
    /// Failed handshakes are counted per source address and recorded as
    /// one `conn.refused` entry per source every this many seconds (and at
    /// shutdown), not one entry each.
    #[serde(default = "default_refusal_summary")]
    pub refusal_summary_secs: u64,
    /// Handshakes in progress at the same time, at most; more are refused
    /// at once (QUIC `CONNECTION_REFUSED`), before any cryptography.
    #[serde(default = "default_handshakes")]
    pub max_handshakes_in_flight: usize,
    /// Handshakes one source address may start at once (after QUIC has
    /// validated the address); beyond it, `handshakes_per_source_per_sec`.
    /// More are refused before any cryptography and counted with the
    /// failed handshakes. Several sites behind one NAT share the budget.
    #[serde(default = "default_handshake_burst")]
    pub handshake_burst_per_source: u32,
    /// Handshakes per second one source address may start after its burst.
    #[serde(default = "default_handshake_rate")]
    pub handshakes_per_source_per_sec: f64,
    /// Free space, in MiB, that the data directory's file system must keep:
    /// below it the coordinator takes no new uploads and no new connections
    /// (the audit log must always be writable), and says so in its log and
    /// audit log.
    #[serde(default = "default_min_free")]
    pub min_free_disk_mib: u64,
    /// Connections open at the same time, at most (sites and admins).
    #[serde(default = "default_connections")]
    pub max_connections: usize,
    /// Connections of one certificate identity open at the same time, at
    /// most. A site's new connection replaces its old one once it says
    /// Hello, so a few are enough for reconnections.
    #[serde(default = "default_connections_per_identity")]
    pub max_connections_per_identity: usize,
    /// Seconds a new connection has to open its control stream and say Hello.
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout_secs: u64,
    /// Seconds a control message has to arrive whole once its first byte
    /// has (a site trickling bytes holds nothing for long).
    #[serde(default = "default_slow_timeout")]
    pub control_frame_timeout_secs: u64,
    /// Seconds a new stream has to send its first message.
    #[serde(default = "default_slow_timeout")]
    pub stream_first_message_secs: u64,
    /// Seconds an upload holding one of the upload slots may go without
    /// sending a payload record (then it is refused, `TooLate`). A record is
    /// at most ≈ 5 MiB: 60 s allows links down to ≈ 0.7 Mbit/s.
    #[serde(default = "default_upload_stall")]
    pub upload_stall_secs: u64,
    /// Control messages a site may send at once; beyond it,
    /// `control_per_sec`; beyond that the connection is cut.
    #[serde(default = "default_control_burst")]
    pub control_burst: u32,
    /// Control messages per second a site may send after its burst.
    #[serde(default = "default_control_rate")]
    pub control_per_sec: f64,
    /// Audit heads of a site recorded at once; beyond it,
    /// `audit_head_per_sec`; beyond that they are ignored.
    #[serde(default = "default_head_burst")]
    pub audit_head_burst: u32,
    /// Audit heads per second of a site recorded after its burst.
    #[serde(default = "default_head_rate")]
    pub audit_head_per_sec: f64,
}

impl CoordinatorConfig {
    /// Read, parse and validate a config file; relative paths are made
    /// relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, path, base)
    }

    /// Parse and validate TOML text (`path` only names the source in errors).
    pub fn from_toml(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut cfg.kit);
        abs(&mut cfg.ca_dir);
        abs(&mut cfg.data_dir);
        if let Some(j) = cfg.job.as_mut() {
            abs(j);
        }
        if let Some(d) = cfg.init_dir.as_mut() {
            abs(d);
        }
        let invalid = |field, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message: message.to_owned(),
        };
        if !(1..=3600).contains(&cfg.heartbeat_interval_secs) {
            return Err(invalid("heartbeat_interval_secs", "must be 1..=3600"));
        }
        if !(2..=3600).contains(&cfg.idle_timeout_secs) {
            return Err(invalid("idle_timeout_secs", "must be 2..=3600"));
        }
        if cfg.idle_timeout_secs <= cfg.heartbeat_interval_secs {
            return Err(invalid(
                "idle_timeout_secs",
                "must be longer than heartbeat_interval_secs",
            ));
        }
        if !(1..=10_000).contains(&cfg.max_concurrent_uploads) {
            return Err(invalid("max_concurrent_uploads", "must be 1..=10000"));
        }
        if !(1..=10_000).contains(&cfg.max_concurrent_downloads) {
            return Err(invalid("max_concurrent_downloads", "must be 1..=10000"));
        }
        if cfg.audit_rotate_bytes < 64 * 1024 {
            return Err(invalid("audit_rotate_bytes", "must be at least 65536"));
        }
        if !(1..=3600).contains(&cfg.refusal_summary_secs) {
            return Err(invalid("refusal_summary_secs", "must be 1..=3600"));
        }
        if !(1..=100_000).contains(&cfg.max_handshakes_in_flight) {
            return Err(invalid("max_handshakes_in_flight", "must be 1..=100000"));
        }
        if !(1..=100_000).contains(&cfg.handshake_burst_per_source) {
            return Err(invalid("handshake_burst_per_source", "must be 1..=100000"));
        }
        if !(cfg.handshakes_per_source_per_sec >= 0.001
            && cfg.handshakes_per_source_per_sec <= 100_000.0)
        {
            return Err(invalid(
                "handshakes_per_source_per_sec",
                "must be a number in 0.001..=100000",
            ));
        }
        for (key, v) in [
            ("hello_timeout_secs", cfg.hello_timeout_secs),
            ("control_frame_timeout_secs", cfg.control_frame_timeout_secs),
            ("stream_first_message_secs", cfg.stream_first_message_secs),
            ("upload_stall_secs", cfg.upload_stall_secs),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, "must be 1..=3600"));
            }
        }
        for (key, burst, rate) in [
            ("control", cfg.control_burst, cfg.control_per_sec),
            ("audit_head", cfg.audit_head_burst, cfg.audit_head_per_sec),
        ] {
            if !(1..=100_000).contains(&burst) {
                return Err(invalid(
                    if key == "control" {
                        "control_burst"
                    } else {
                        "audit_head_burst"
                    },
                    "must be 1..=100000",
                ));
            }
            if !(0.001..=100_000.0).contains(&rate) {
                return Err(invalid(
                    if key == "control" {
                        "control_per_sec"
                    } else {
                        "audit_head_per_sec"
                    },
                    "must be a number in 0.001..=100000",
                ));
            }
        }
        if !(1..=1_000_000).contains(&cfg.max_connections) {
            return Err(invalid("max_connections", "must be 1..=1000000"));
        }
        if !(1..=1000).contains(&cfg.max_connections_per_identity) {
            return Err(invalid("max_connections_per_identity", "must be 1..=1000"));
        }
        Ok(cfg)
    }

    /// What one connection may make the coordinator wait for or spend.
    pub(crate) fn peer_limits(&self) -> crate::server::PeerLimits {
        crate::server::PeerLimits {
            hello_timeout: Duration::from_secs(self.hello_timeout_secs),
            control_frame_timeout: Duration::from_secs(self.control_frame_timeout_secs),
            first_message_timeout: Duration::from_secs(self.stream_first_message_secs),
            upload_stall_timeout: Duration::from_secs(self.upload_stall_secs),
            control: (self.control_burst, self.control_per_sec),
            heads: (self.audit_head_burst, self.audit_head_per_sec),
        }
    }

    /// Heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_secs)
    }

    /// Idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The provisioning manifest.
    pub fn manifest_path(&self) -> PathBuf {
        self.ca_dir.join(fedlink_certs::SITES_FILE)
    }

    /// The revocation list.
    pub fn revoked_path(&self) -> PathBuf {
        self.ca_dir.join(fedlink_certs::REVOKED_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves_paths() {
        let cfg = CoordinatorConfig::from_toml(
            "listen = \"127.0.0.1:7443\"\nkit = \"coordinator\"\nca_dir = \"/etc/fedlink/ca\"\ndata_dir = \"data\"\n",
            Path::new("c.toml"),
            Path::new("/srv/fl"),
        )
        .unwrap();
        assert_eq!(cfg.kit, PathBuf::from("/srv/fl/coordinator"));
        assert_eq!(cfg.ca_dir, PathBuf::from("/etc/fedlink/ca"));
        assert_eq!(cfg.heartbeat_interval_secs, 5);
        assert!(cfg.job.is_none());
        assert_eq!(cfg.update_retention, UpdateRetention::Job);
        assert_eq!(cfg.audit_rotate_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn tcp_listener_and_congestion_control_are_configurable() {
        let base = "listen = \"127.0.0.1:7443\"\nkit = \"k\"\nca_dir = \"c\"\ndata_dir = \"d\"\n";
        let parse = |extra: &str| {
            CoordinatorConfig::from_toml(
                &format!("{base}{extra}"),
                Path::new("c.toml"),
                Path::new("."),
            )
        };
        let quic: SocketAddr = "127.0.0.1:7443".parse().unwrap();
        let cfg = parse("").unwrap();
        assert_eq!(cfg.tcp_listen.resolve(quic), Some(quic));
        assert_eq!(cfg.congestion_control, fedlink_transport::Congestion::Cubic);
        assert_eq!(
            parse("tcp_listen = \"off\"\n")
                .unwrap()
                .tcp_listen
                .resolve(quic),
            None
        );
        assert_eq!(
            parse("tcp_listen = \"0.0.0.0:443\"\n")
                .unwrap()
                .tcp_listen
                .resolve(quic),
            Some("0.0.0.0:443".parse().unwrap())
        );
        let err = parse("tcp_listen = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tcp_listen") && err.contains("sometimes"),
            "{err}"
        );
        let err = TcpListen::try_from("sometimes".to_owned()).unwrap_err();
        assert_eq!(err.value, "sometimes");
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(
            parse("congestion_control = \"bbr\"\n")
                .unwrap()
                .congestion_control,
            fedlink_transport::Congestion::Bbr
        );
        let err = parse("congestion_control = \"reno\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reno"), "{err}");
    }

    #[test]
    fn update_retention_job_or_rounds() {
        let parse = |extra: &str| {
            CoordinatorConfig::from_toml(
                &format!(
                    "listen = \"127.0.0.1:7443\"\nkit = \"k\"\nca_dir = \"c\"\ndata_dir = \"d\"\n{extra}"
                ),
                Path::new("c.toml"),
                Path::new("."),
            )
        };
        assert_eq!(
            parse("update_retention = \"job\"")
                .unwrap()
                .update_retention,
            UpdateRetention::Job
        );
        assert_eq!(
            parse("update_retention = 3").unwrap().update_retention,
            UpdateRetention::Rounds(3)
        );
        for bad in [
            "update_retention = 0",
            "update_retention = -1",
            "update_retention = \"all\"",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.to_string().contains("update_retention"), "{bad}: {err}");
        }
        assert!(parse("audit_rotate_bytes = 10").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = CoordinatorConfig::from_toml(
            "listen = \"127.0.0.1:7443\"\nkit = \"k\"\nca_dir = \"c\"\ndata_dir = \"d\"\nplaintext = true\n",
            Path::new("c.toml"),
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.to_string().contains("plaintext"), "{err}");
        let err = CoordinatorConfig::from_toml(
            "listen = \"127.0.0.1:7443\"\nkit = \"k\"\nca_dir = \"c\"\ndata_dir = \"d\"\nheartbeat_interval_secs = 40\n",
            Path::new("c.toml"),
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.to_string().contains("idle_timeout_secs"), "{err}");
        let err =
            CoordinatorConfig::from_toml("listen = \"nope\"", Path::new("c.toml"), Path::new("."))
                .unwrap_err();
        assert!(err.to_string().contains("c.toml"), "{err}");
    }
}
