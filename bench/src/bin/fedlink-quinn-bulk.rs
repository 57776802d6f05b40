//! `fedlink-quinn-bulk`: raw quinn bulk throughput on this machine — the
//! ceiling fedlink's rounds are compared with (issue #10: bytes moved per
//! second of round ≥ 80 % of raw quinn measured in the same run).
//!
//! One endpoint pair on 127.0.0.1, the federation's own mutual-TLS configs
//! (a test PKI, TLS 1.3, the same cipher suites fedlink negotiates), and one
//! stream of `--mb` megabytes in each direction:
//!
//! * **upload** (site → coordinator): the client writes the bytes on a
//!   bidirectional stream and finishes it; the server reads them to the end
//!   and answers one byte; timed from the stream's open to that answer;
//! * **download** (coordinator → site): the client asks, the server writes
//!   the bytes and finishes; timed from the request to the last byte read.
//!
//! Each direction runs with quinn's default transport settings (`raw`), the
//! ceiling, and with fedlink's own endpoint settings (`fedlink`: the
//! coordinator's send window and the site's defaults for downloads; for
//! uploads the coordinator's stream window, opened the way the coordinator
//! opens it for an upload it reads), so the cost of fedlink's flow-control
//! choices is visible on its own. `--repeats` runs per case; every run is
//! printed, and the median is reported.
//!
//! ```sh
//! cargo build --release --locked -p fedlink-bench --bins
//! target/release/fedlink-quinn-bulk --mb 100 --repeats 3
//! ```
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fedlink_certs::{ALPN_SITE, RevocationList};
use fedlink_test_util::TestPki;
use fedlink_transport::{DEFAULT_IDLE_TIMEOUT, client_endpoint, server_endpoint};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Raw quinn bulk throughput on this machine (the ceiling for fedlink's rounds)"
)]
struct Args {
    /// Megabytes (10^6 bytes) per stream.
    #[arg(long, default_value_t = 100)]
    mb: u64,
    /// Runs of each case.
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug)]
enum Settings {
    /// quinn's default transport config on both ends.
    Raw,
    /// fedlink's endpoints (`fedlink_transport::{server,client}_endpoint`).
    Fedlink,
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Upload,
    Download,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.mb == 0 || args.repeats == 0 {
        bail!("--mb and --repeats must be at least 1");
    }
    let bytes = args.mb * 1_000_000;
    let pki = TestPki::new(1).context("creating a test PKI")?;
    println!(
        "fedlink-quinn-bulk: one stream of {} MB per run, 127.0.0.1, mTLS (TLS 1.3), {} runs per case",
        args.mb, args.repeats
    );
    let mut results = Vec::new();
    for settings in [Settings::Raw, Settings::Fedlink] {
        for direction in [Direction::Upload, Direction::Download] {
            let mut runs = Vec::new();
            for _ in 0..args.repeats {
                let secs = one_run(&pki, settings, direction, bytes).await?;
                runs.push(bytes as f64 / 1e6 / secs);
            }
            let mut sorted = runs.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            println!(
                "  {:<8} {:<9} MB/s: median {median:>7.1}; runs {}",
                format!("{settings:?}").to_lowercase(),
                format!("{direction:?}").to_lowercase(),
                runs.iter()
                    .map(|r| format!("{r:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            results.push(serde_json::json!({
                "settings": format!("{settings:?}").to_lowercase(),
                "direction": format!("{direction:?}").to_lowercase(),
                "mb_per_s_runs": runs,
                "mb_per_s_median": median,
            }));
        }
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "tool": "fedlink-quinn-bulk",
            "mb_per_stream": args.mb,
            "results": results,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// An endpoint pair and a connection between them.
async fn connect(
    pki: &TestPki,
    settings: Settings,
) -> anyhow::Result<(Endpoint, Endpoint, Connection, Connection)> {
    let revocations = RevocationList::load(pki.revoked_path())?;
    let server_tls = fedlink_certs::server_tls_config(&pki.coordinator_kit()?, revocations)?;
    let kit = pki.site_kit(0)?;
    let client_tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE)?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let (server, client) = match settings {
        Settings::Fedlink => {
            let server = server_endpoint(any, server_tls, DEFAULT_IDLE_TIMEOUT)?;
            let client = client_endpoint(server.local_addr()?, client_tls, DEFAULT_IDLE_TIMEOUT)?;
            (server, client)
        }
        Settings::Raw => {
            let crypto = QuicServerConfig::try_from(server_tls)?;
            let server = Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), any)?;
            let mut client = Endpoint::client(any)?;
            client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
                QuicClientConfig::try_from(client_tls)?,
            )));
            (server, client)
        }
    };
    let addr = server.local_addr()?;
    let connecting = client.connect(addr, kit.coordinator_server_name())?;
    let accepting = async {
        let incoming = server
            .accept()
            .await
            .context("the server endpoint closed")?;
        anyhow::Ok(incoming.await?)
    };
    let (site, coord) = tokio::join!(connecting, accepting);
    Ok((server, client, site?, coord?))
}

async fn one_run(
    pki: &TestPki,
    settings: Settings,
    direction: Direction,
    bytes: u64,
) -> anyhow::Result<f64> {
    let (_server, _client, site, coord) = connect(pki, settings).await?;
    let block = vec![0x5au8; 1 << 20];
    let secs = match direction {
        Direction::Upload => {
            let coord_side = {
                let coord = coord.clone();
                tokio::spawn(async move {
                    let (mut send, mut recv) = coord.accept_bi().await?;
                    if let Settings::Fedlink = settings {
                        // What the coordinator does for an upload it reads
                        // (`open_upload_window`: the idle window plus one
                        // stream window; it closes again only at the end).
                        coord.set_receive_window(quinn::VarInt::from_u32(
                            fedlink_transport::SERVER_IDLE_RECEIVE_WINDOW
                                + fedlink_transport::SERVER_STREAM_WINDOW,
                        ));
                    }
                    let mut got = 0u64;
                    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                        got += chunk.bytes.len() as u64;
                    }
                    send.write_all(&[1]).await?;
                    send.finish()?;
                    anyhow::Ok(got)
                })
            };
            let start = Instant::now();
            let (mut send, mut recv) = site.open_bi().await?;
            let mut left = bytes;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                send.write_all(&block[..n]).await?;
                left -= n as u64;
            }
            send.finish()?;
            let ack = recv.read_to_end(8).await?;
            let secs = start.elapsed().as_secs_f64();
            let got = coord_side.await??;
            if got != bytes || ack != [1] {
                bail!("upload: {got} of {bytes} bytes arrived");
            }
            secs
        }
        Direction::Download => {
            let coord_side = {
                let coord = coord.clone();
                let block = block.clone();
                tokio::spawn(async move {
                    let (mut send, mut recv) = coord.accept_bi().await?;
                    let _ask = recv.read_to_end(8).await?;
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(block.len() as u64) as usize;
                        send.write_all(&block[..n]).await?;
                        left -= n as u64;
                    }
                    send.finish()?;
                    // Keep the stream's connection until the site has read it.
                    let _ = tokio::time::timeout(Duration::from_secs(600), send.stopped()).await;
                    anyhow::Ok(())
                })
            };
            let start = Instant::now();
            let (mut send, mut recv) = site.open_bi().await?;
            send.write_all(&[1]).await?;
            send.finish()?;
            let mut got = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                got += chunk.bytes.len() as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            drop(recv);
            coord_side.await??;
            if got != bytes {
                bail!("download: {got} of {bytes} bytes arrived");
            }
            secs
        }
    };
    site.close(0u32.into(), b"done");
    coord.close(0u32.into(), b"done");
    Ok(secs)
}
