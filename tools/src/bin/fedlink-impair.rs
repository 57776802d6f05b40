//! `fedlink-impair`: relay UDP (QUIC) and TCP from a listening address to a
//! target with delay, jitter, loss, reordering and a rate limit, for benches
//! and manual tests. Not for production.
//!
//! ```text
//! fedlink-impair --listen 127.0.0.1:7000 --target 127.0.0.1:7443 \
//!     --delay-ms 20 --loss 0.005 --rate-mbit 200
//! ```
//! Stop it with Ctrl-C; it prints its counters on exit.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fedlink_tools::impair::{ImpairProxy, Impairment, ProxyConfig};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "UDP/TCP impairment proxy for fedlink tests and benches"
)]
struct Args {
    /// Address to listen on (UDP and TCP, same port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to relay to.
    #[arg(long)]
    target: SocketAddr,
    /// One-way delay, each direction (RTT = 2 × this), milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Uniform extra delay, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Loss probability per datagram (TCP: per segment, as a retransmission stall).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Reordering probability per datagram (UDP).
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Rate limit per direction, Mbit/s.
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// Rate limiter queue, milliseconds of sending time.
    #[arg(long, default_value_t = 100.0)]
    queue_ms: f64,
    /// Drop every UDP datagram (a firewall that blocks UDP).
    #[arg(long)]
    drop_udp: bool,
    /// Do not relay UDP.
    #[arg(long)]
    no_udp: bool,
    /// Do not relay TCP.
    #[arg(long)]
    no_tcp: bool,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn millis(what: &str, ms: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(ms / 1000.0).with_context(|| format!("--{what}: {ms} ms"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rate = match args.rate_mbit {
        Some(m) if m.is_finite() && m > 0.0 => Some((m * 1_000_000.0 / 8.0) as u64),
        Some(m) => anyhow::bail!("--rate-mbit must be positive, got {m}"),
        None => None,
    };
    let imp = Impairment {
        delay: millis("delay-ms", args.delay_ms)?,
        jitter: millis("jitter-ms", args.jitter_ms)?,
        loss: args.loss,
        reorder: args.reorder,
        rate,
        queue_limit: millis("queue-ms", args.queue_ms)?,
    };
    let mut cfg = ProxyConfig::new(args.target).both_ways(imp);
    cfg.listen = args.listen;
    cfg.udp = !args.no_udp;
    cfg.tcp = !args.no_tcp;
    cfg.seed = args.seed;
    let proxy = ImpairProxy::start(cfg).await?;
    proxy.handle().drop_all_udp(args.drop_udp);
    println!("fedlink-impair: {} -> {}", proxy.addr(), args.target);
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("{:?}", proxy.handle().stats());
    Ok(())
}
