//! fedlink site agent: the service a hospital installs. It connects outbound
//! to the coordinator, trains locally with burn and sends back signed,
//! compressed weight deltas. Patient data never leaves the site.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
pub mod config;
pub mod sitecore;
pub mod data;
pub mod device;
pub mod metrics;
pub mod modelcache;
pub mod policy;
pub mod sitelog;
pub mod train;
pub mod weights;

pub use agent::{Agent, AgentError, run};
pub use config::SiteConfig;
