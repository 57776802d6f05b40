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
//! A third case runs `--parallel` connections at once (default 8, as many
//! as the round benchmark's sites), each from its own client endpoint to
//! one server endpoint, each with one stream of `--mb / --parallel`
//! megabytes: the aggregate rate of many sites on the same cores.
//!
//! Every run also reports the CPU time the process used (both endpoints
//! are in it), per megabyte moved: the transport's own CPU cost, to put
//! against the CPU a federation round spends per megabyte
//! (`fedlink-loadgen` reports that).
//!
//! Each direction runs with quinn's default transport settings (`raw`), the
//! ceiling, and with fedlink's own (`fedlink`: its endpoints, framed 1 MiB
//! chunk records as uploads and models are sent, and the coordinator's
//! flow-control windows — `open_download_window` for downloads,
//! `open_upload_window` for uploads, both sized to the path's
//! bandwidth-delay product within the global budget), so the cost of
//! fedlink's framing and flow-control choices is visible on its own.
//! `--repeats` runs per case; every run is printed, and the median is
//! reported. `--impair-*` puts every connection behind the impairment proxy
//! (an emulated WAN), `--warm-mb` warms each connection up first.
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
use bytes::Bytes;
use clap::Parser;
use fedlink_bench::{ImpairArgs, cpu_seconds};
use fedlink_certs::{ALPN_SITE, RevocationList};
use fedlink_test_util::TestPki;
use fedlink_tools::impair::{ImpairProxy, Impairment, ProxyConfig};
use fedlink_transport::{
    Congestion, DEFAULT_IDLE_TIMEOUT, FramedRecv, FramedSend, client_endpoint_with,
    close_upload_window, open_download_window, open_upload_window, server_endpoint_with,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};

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
    /// Connections of the parallel case (0: skip it).
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Each connection behind its own impairment proxy (the one
    /// `fedlink-loadgen` uses): the same transfer through the same emulated
    /// WAN as a federation round's.
    #[command(flatten)]
    impair: ImpairArgs,
    /// Megabytes each connection moves in the same direction before the
    /// timed transfer (not timed): a warm connection, as a federation's
    /// second and later rounds have (its congestion controller has found
    /// the path). 0: time a fresh connection's first transfer.
    #[arg(long, default_value_t = 0)]
    warm_mb: u64,
    /// QUIC congestion controller of both ends: cubic (quinn's default) or
    /// bbr.
    #[arg(long, default_value = "cubic")]
    congestion: String,
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
    let cc = match args.congestion.as_str() {
        "cubic" => Congestion::Cubic,
        "bbr" => Congestion::Bbr,
        other => bail!("--congestion {other:?}: expected cubic or bbr"),
    };
    let impair = args.impair.impairment();
    if let Some(imp) = &impair {
        imp.validate().context("the impairment")?;
        println!(
            "  each connection behind an impairment proxy: one-way delay {} ms, loss {}, rate {} per link, congestion {}",
            imp.delay.as_millis(),
            args.impair.impair_loss,
            args.impair
                .impair_rate_mbit
                .map_or_else(|| "unlimited".to_owned(), |m| format!("{m} Mbit/s")),
            args.congestion
        );
    }
    let path = PathSetup {
        cc,
        impair,
        warm_bytes: args.warm_mb * 1_000_000,
    };
    println!(
        "fedlink-quinn-bulk: one stream of {} MB per run, 127.0.0.1, mTLS (TLS 1.3), {} runs per case",
        args.mb, args.repeats
    );
    let mut results = Vec::new();
    let mut cases = vec![(Settings::Raw, 1), (Settings::Fedlink, 1)];
    if args.parallel > 1 {
        cases.push((Settings::Raw, args.parallel));
    }
    for (settings, connections) in cases {
        for direction in [Direction::Upload, Direction::Download] {
            let mut runs = Vec::new();
            let mut cpu_per_mb = Vec::new();
            for _ in 0..args.repeats {
                let (secs, cpu) =
                    one_run(&pki, &path, settings, direction, bytes, connections).await?;
                if let Some(cpu) = cpu {
                    cpu_per_mb.push(1e3 * cpu / (bytes as f64 / 1e6));
                }
                runs.push(bytes as f64 / 1e6 / secs);
            }
            let mid = median(&runs);
            let cpu_median = (!cpu_per_mb.is_empty()).then(|| median(&cpu_per_mb));
            let settings_name = format!("{settings:?}").to_lowercase();
            let label = if connections > 1 {
                format!("{settings_name} x{connections}")
            } else {
                settings_name.clone()
            };
            println!(
                "  {label:<8} {:<9} MB/s: median {mid:>7.1}; runs {}; CPU ms per MB: {}",
                format!("{direction:?}").to_lowercase(),
                runs.iter()
                    .map(|r| format!("{r:.1}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                cpu_median.map_or_else(|| "-".into(), |c| format!("{c:.2}")),
            );
            results.push(serde_json::json!({
                "congestion": args.congestion,
                "impair_delay_ms": args.impair.impair_delay_ms,
                "impair_loss": args.impair.impair_loss,
                "impair_rate_mbit": args.impair.impair_rate_mbit,
                "warm_mb": args.warm_mb,
                "settings": settings_name,
                "connections": connections,
                "direction": format!("{direction:?}").to_lowercase(),
                "mb_per_s_runs": runs,
                "mb_per_s_median": mid,
                "cpu_ms_per_mb_runs": cpu_per_mb,
                "cpu_ms_per_mb_median": cpu_median,
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

fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The path between the two ends: the congestion controller and, if any,
/// the emulated WAN each connection goes through.
struct PathSetup {
    cc: Congestion,
    impair: Option<Impairment>,
    /// Bytes each connection moves, untimed, before the timed transfer.
    warm_bytes: u64,
}

/// quinn's default transport settings, with the congestion controller `cc`.
fn raw_transport(cc: Congestion) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if cc == Congestion::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    Arc::new(t)
}

/// The endpoints and connections of one run; the proxies live as long as it.
struct Links {
    _server: Endpoint,
    _proxies: Vec<ImpairProxy>,
    /// (client endpoint, the site's side, the coordinator's side).
    conns: Vec<(Endpoint, Connection, Connection)>,
}

/// A server endpoint, `n` client endpoints, and one connection from each,
/// each through its own impairment proxy when `path` has one.
async fn connect(
    pki: &TestPki,
    path: &PathSetup,
    settings: Settings,
    n: usize,
) -> anyhow::Result<Links> {
    let revocations = RevocationList::load(pki.revoked_path())?;
    let server_tls = fedlink_certs::server_tls_config(&pki.coordinator_kit()?, revocations)?;
    let kit = pki.site_kit(0)?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let server = match settings {
        Settings::Fedlink => server_endpoint_with(any, server_tls, DEFAULT_IDLE_TIMEOUT, path.cc)?,
        Settings::Raw => {
            let crypto = QuicServerConfig::try_from(server_tls)?;
            let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
            cfg.transport_config(raw_transport(path.cc));
            Endpoint::server(cfg, any)?
        }
    };
    let server_addr = server.local_addr()?;
    let mut proxies = Vec::new();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let addr = match &path.impair {
            Some(imp) => {
                let cfg = ProxyConfig {
                    seed: i as u64 + 1,
                    ..ProxyConfig::new(server_addr).both_ways(imp.clone())
                };
                let proxy = ImpairProxy::start(cfg).await?;
                let addr = proxy.addr();
                proxies.push(proxy);
                addr
            }
            None => server_addr,
        };
        let client_tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE)?;
        let client = match settings {
            Settings::Fedlink => {
                client_endpoint_with(addr, client_tls, DEFAULT_IDLE_TIMEOUT, path.cc)?
            }
            Settings::Raw => {
                let mut client = Endpoint::client(any)?;
                let mut cfg =
                    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
                cfg.transport_config(raw_transport(path.cc));
                client.set_default_client_config(cfg);
                client
            }
        };
        let connecting = client.connect(addr, kit.coordinator_server_name())?;
        let accepting = async {
            let incoming = server
                .accept()
                .await
                .context("the server endpoint closed")?;
            anyhow::Ok(incoming.await?)
        };
        let (site, coord) = tokio::join!(connecting, accepting);
        conns.push((client, site?, coord?));
    }
    Ok(Links {
        _server: server,
        _proxies: proxies,
        conns,
    })
}

/// One run: `bytes` in all, split over `connections` connections that
/// transfer at the same time; seconds from the first stream's open to the
/// last transfer's end, and the CPU seconds the process used meanwhile
/// (the handshakes before are not counted).
async fn one_run(
    pki: &TestPki,
    path: &PathSetup,
    settings: Settings,
    direction: Direction,
    bytes: u64,
    connections: usize,
) -> anyhow::Result<(f64, Option<f64>)> {
    let run = connect(pki, path, settings, connections.max(1)).await?;
    let links = &run.conns;
    let per = bytes / links.len() as u64;
    if path.warm_bytes > 0 {
        transfer_all(links, settings, direction, |_| path.warm_bytes).await?;
    }
    let cpu0 = cpu_seconds("self");
    let start = Instant::now();
    transfer_all(links, settings, direction, |i| {
        if i == 0 {
            per + bytes % links.len() as u64
        } else {
            per
        }
    })
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu0.zip(cpu_seconds("self")).map(|(a, b)| b - a);
    for (_, site, coord) in links {
        site.close(0u32.into(), b"done");
        coord.close(0u32.into(), b"done");
    }
    Ok((secs, cpu))
}

/// Bytes per record in the `fedlink` case (framed chunk records, as an
/// upload's or a model's).
const RECORD: usize = 1 << 20;

/// One transfer in `direction` on every connection at once, `bytes(i)` on
/// the `i`-th; returns when all have ended.
async fn transfer_all(
    links: &[(Endpoint, Connection, Connection)],
    settings: Settings,
    direction: Direction,
    bytes: impl Fn(usize) -> u64,
) -> anyhow::Result<()> {
    let mut tasks = Vec::with_capacity(links.len());
    for (i, (_, site, coord)) in links.iter().enumerate() {
        let (site, coord, n) = (site.clone(), coord.clone(), bytes(i));
        tasks.push(tokio::spawn(async move {
            match direction {
                Direction::Upload => upload(&site, &coord, settings, n).await,
                Direction::Download => download(&site, &coord, settings, n).await,
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The site writes `bytes` on a stream and finishes it; the coordinator
/// reads them to the end and answers one byte. `raw`: plain stream bytes;
/// `fedlink`: framed chunk records, read with the coordinator's own upload
/// window (`fedlink_transport::open_upload_window`: sized to the path's
/// bandwidth-delay product within the global budget).
async fn upload(
    site: &Connection,
    coord: &Connection,
    settings: Settings,
    bytes: u64,
) -> anyhow::Result<()> {
    let coord_side = {
        let coord = coord.clone();
        tokio::spawn(async move {
            let (mut send, recv) = coord.accept_bi().await?;
            let got = receive_all(recv, settings, bytes, Some(&coord)).await?;
            send.write_all(&[1]).await?;
            send.finish()?;
            anyhow::Ok(got)
        })
    };
    let (send, mut recv) = site.open_bi().await?;
    send_filler(send, settings, bytes, false).await?;
    let ack = recv.read_to_end(8).await?;
    let got = coord_side.await??;
    if got != bytes || ack != [1] {
        bail!("upload: {got} of {bytes} bytes arrived");
    }
    Ok(())
}

/// The site asks; the coordinator writes `bytes` and finishes; the site
/// reads them to the end. `fedlink`: framed chunk records, sent with the
/// coordinator's own download window (`open_download_window`).
async fn download(
    site: &Connection,
    coord: &Connection,
    settings: Settings,
    bytes: u64,
) -> anyhow::Result<()> {
    let coord_side = {
        let coord = coord.clone();
        tokio::spawn(async move {
            let (send, mut recv) = coord.accept_bi().await?;
            let _ask = recv.read_to_end(8).await?;
            let _window =
                matches!(settings, Settings::Fedlink).then(|| open_download_window(&coord));
            send_filler(send, settings, bytes, true).await
        })
    };
    let (mut send, recv) = site.open_bi().await?;
    send.write_all(&[1]).await?;
    send.finish()?;
    let got = receive_all(recv, settings, bytes, None).await?;
    coord_side.await??;
    if got != bytes {
        bail!("download: {got} of {bytes} bytes arrived");
    }
    Ok(())
}

/// Write `bytes` of filler on `send` in [`RECORD`]-sized pieces (`raw`:
/// stream bytes; `fedlink`: framed chunk records) and finish the stream;
/// with `until_read`, keep it (and its connection) until the peer has read
/// it all.
async fn send_filler(
    send: SendStream,
    settings: Settings,
    bytes: u64,
    until_read: bool,
) -> anyhow::Result<()> {
    let block = Bytes::from(vec![0x5au8; RECORD]);
    let pieces = (0..bytes.div_ceil(RECORD as u64)).map(|k| {
        let n = (bytes - k * RECORD as u64).min(RECORD as u64) as usize;
        block.slice(..n)
    });
    let wait = Duration::from_secs(600);
    match settings {
        Settings::Raw => {
            let mut send = send;
            for piece in pieces {
                send.write_all(&piece).await?;
            }
            send.finish()?;
            if until_read {
                let _ = tokio::time::timeout(wait, send.stopped()).await;
            }
        }
        Settings::Fedlink => {
            let mut send = FramedSend::new(send);
            for piece in pieces {
                send.chunk(piece).await?;
            }
            send.finish()?;
            if until_read {
                let _ = tokio::time::timeout(wait, send.stopped()).await;
            }
        }
    }
    Ok(())
}

/// Read what [`send_filler`] sent, to the end of the stream; the bytes
/// received. `fedlink`: `bytes` of framed records, nothing after them;
/// with `upload_window`, read with the coordinator's upload window opened
/// on that connection for them (`open_upload_window`), then closed.
async fn receive_all(
    recv: RecvStream,
    settings: Settings,
    bytes: u64,
    upload_window: Option<&Connection>,
) -> anyhow::Result<u64> {
    let mut got = 0u64;
    match settings {
        Settings::Raw => {
            let mut recv = recv;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                got += chunk.bytes.len() as u64;
            }
        }
        Settings::Fedlink => {
            let mut recv = FramedRecv::new(recv);
            let share = upload_window.map(|c| open_upload_window(c, &mut recv, bytes));
            let mut record = Vec::new();
            while got < bytes {
                recv.chunk_into(&mut record).await?;
                got += record.len() as u64;
            }
            if recv.next_frame().await?.is_some() {
                bail!("a frame after the last record");
            }
            if let Some(c) = upload_window {
                close_upload_window(c);
            }
            drop(share);
        }
    }
    Ok(got)
}
