//! Local-training speed of the U-Net: images/s of one epoch, and the loss
//! curve, on the CPU (`flex`) or the GPU (`wgpu`) backend.
//!
//! Used by `scripts/gpu-check` (CPU vs GPU with the same seed) and by
//! `bench/run` (burn vs PyTorch on the CPU). Not part of CI's measurements:
//! `cargo test` only builds it.
//!
//! ```sh
//! cargo run --release -p fedlink-agent --example unet_bench -- \
//!     --device cpu --base-channels 150 --depth 2 --tile 64 --batch 8 --tiles 32 --epochs 2
//! ```
//!
//! Data: tiles of the real nuclei image (`data/nuclei_dsb2018`), repeated
//! when more tiles are asked for than the image holds. Weights: the
//! architecture's seeded initialisation (`ArchSpec::init(seed)`), identical
//! on every device. Each epoch is one `train_local` call (SGD, so no
//! optimizer state is lost between calls; the shuffle seed is `seed +
//! epoch`), timed separately: the first includes the backend's warm-up
//! (kernel compilation on a GPU), so images/s is reported for the later
//! epochs too. Output: one JSON object on stdout.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedlink_agent::data::SampleShape;
use fedlink_agent::data::segmentation::{
    SegmentationConfig, SegmentationSource, load_segmentation,
};
use fedlink_agent::device::DeviceChoice;
use fedlink_agent::train::{TrainConfig, train_local};
use fedlink_protocol::arch::ArchSpec;

struct Args {
    device: DeviceChoice,
    base_channels: u32,
    depth: u32,
    tile: u32,
    batch: usize,
    tiles: usize,
    epochs: usize,
    seed: u64,
    lr: f64,
    data: PathBuf,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        device: DeviceChoice::Cpu,
        base_channels: 150,
        depth: 2,
        tile: 64,
        batch: 8,
        tiles: 32,
        epochs: 2,
        seed: 7,
        lr: 0.05,
        // Baked in at build time: a binary run from another checkout (the
        // GPU machine) passes `--data`.
        data: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/nuclei_dsb2018"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--device" => {
                a.device = match value.as_str() {
                    "cpu" => DeviceChoice::Cpu,
                    "wgpu" => DeviceChoice::Wgpu,
                    other => bail!("--device {other}: cpu or wgpu"),
                }
            }
            "--base-channels" => a.base_channels = value.parse()?,
            "--depth" => a.depth = value.parse()?,
            "--tile" => a.tile = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--tiles" => a.tiles = value.parse()?,
            "--epochs" => a.epochs = value.parse()?,
            "--seed" => a.seed = value.parse()?,
            "--lr" => a.lr = value.parse()?,
            "--data" => a.data = PathBuf::from(value),
            other => bail!("unknown flag {other}"),
        }
    }
    if a.tiles == 0 || a.epochs == 0 {
        bail!("--tiles and --epochs must be positive");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse()?;
    let arch = ArchSpec::UNet {
        in_channels: 1,
        base_channels: a.base_channels,
        depth: a.depth,
        classes: 2,
    };
    arch.validate().context("architecture")?;
    let params = arch.spec().context("architecture")?.num_params();
    let device = a.device.resolve().context("device")?;

    let mut cfg = SegmentationConfig::new(SegmentationSource::RawU8 {
        dir: a.data.clone(),
    });
    cfg.tile = a.tile;
    cfg.validation_fraction = 0.0;
    let all = load_segmentation(&cfg).context("nuclei data")?.train;
    let idx: Vec<usize> = (0..a.tiles).map(|i| i % all.len()).collect();
    let data = all.subset(&idx);
    let SampleShape::Image { height, width, .. } = data.shape() else {
        bail!("image tiles expected");
    };

    let mut model = arch.init(a.seed).context("init")?;
    let mut epochs = Vec::new();
    for e in 0..a.epochs {
        let tc = TrainConfig::new()
            .with_epochs(1)
            .with_batch_size(a.batch)
            .with_learning_rate(a.lr)
            .with_seed(a.seed + e as u64);
        let start = Instant::now();
        let (next, report) = train_local(&arch, &model, &data, &tc, &device.device)
            .map_err(|err| anyhow::anyhow!("training epoch {e}: {err}"))?;
        let secs = start.elapsed().as_secs_f64();
        model = next;
        let loss = report.epoch_loss.first().copied().unwrap_or(f64::NAN);
        eprintln!(
            "{} epoch {e}: {secs:.2} s, {:.2} images/s, loss {loss:.6}",
            device.name,
            data.len() as f64 / secs
        );
        epochs.push(serde_json::json!({ "seconds": secs, "loss": loss }));
    }
    let secs: Vec<f64> = epochs
        .iter()
        .filter_map(|e| e["seconds"].as_f64())
        .collect();
    let steady = if secs.len() > 1 {
        &secs[1..]
    } else {
        &secs[..]
    };
    let mean = steady.iter().sum::<f64>() / steady.len() as f64;
    let out = serde_json::json!({
        "device": device.name,
        "arch": { "unet_base_channels": a.base_channels, "params": params },
        "tile": [height, width],
        "batch": a.batch,
        "images_per_epoch": data.len(),
        "seed": a.seed,
        "learning_rate": a.lr,
        "epochs": epochs,
        "steady_seconds_per_epoch": mean,
        "steady_images_per_second": data.len() as f64 / mean,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    println!("{out}");
    Ok(())
}
