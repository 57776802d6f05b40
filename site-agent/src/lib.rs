//! fedlink site agent: the service a hospital installs. It connects outbound
//! to the coordinator, trains locally with burn and sends back signed,
//! compressed weight deltas. Patient data never leaves the site.
//!
//! ```text
//!  site.toml ─▶ config ─▶ agent (tokio/quinn driver, outbound QUIC + mTLS only)
//!                           │ control messages        ▲ OfferResponse, Heartbeat, Bye
//!                           ▼                         │
//!                        sitecore (sans-IO: policy, offers, cancels, heartbeats, backoff;
//!                                  the round's work; the global model's download)
//!                           │ accepted round
//!                           ▼
//!  modelcache (global model by hash) ─▶ train (burn: evaluate global, train_local)
//!                                           │ delta = local − global, clip, DP noise
//!                                           ▼
//!                         protocol: encode, sign_update ─▶ DeltaUpload ─▶ coordinator
//!  every step ─▶ audit (signed, hash-chained JSON Lines, fsync per entry,
//!                 before the action; heads exchanged with the coordinator)
//! ```
//!
//! What it does **not** do: listen on any port, send samples or per-sample
//! values, aggregate, or decide rounds (the coordinator does). Data is
//! loaded once at start ([`data`]); restart the agent to pick up new data.
//!
//! Modules: [`config`] (`site.toml`), [`policy`] (local consent rules, a
//! pure [`policy::evaluate`]), [`sitecore`] (sans-IO decisions),
//! [`agent`] (the driver and [`run`]), [`modelcache`], [`audit`], and the
//! training half: [`data`], [`device`], [`train`], [`weights`], [`metrics`].
//!
//! ```
//! use std::path::Path;
//! use fedlink_agent::SiteConfig;
//!
//! let cfg = SiteConfig::parse(
//!     r#"
//!     kit_dir = "kit"
//!     data_dir = "state"
//!     [dataset]
//!     kind = "csv"
//!     path = "cohort.csv"
//!     label_column = "outcome"
//!     [policy]
//!     federations = ["cardio"]
//!     architectures = ["logreg"]
//!     max_epochs = 5
//!     "#,
//!     Path::new("site.toml"),
//!     Path::new("/etc/fedlink"),
//! )?;
//! assert_eq!(cfg.kit_dir, Path::new("/etc/fedlink/kit"));
//! assert_eq!(cfg.policy.max_epochs, 5);
//! // `fedlink_agent::run(cfg, shutdown).await` would now run the agent.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
pub mod audit;
pub mod config;
pub mod data;
pub mod device;
pub mod dial;
pub mod metrics;
pub mod modelcache;
pub mod policy;
pub mod resume;
pub mod sitecore;
pub mod train;
pub mod weights;

pub use agent::{Agent, AgentError, CheckReport, check, run};
pub use config::SiteConfig;
