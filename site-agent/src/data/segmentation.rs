//! 2D segmentation data: images with per-pixel class masks, cut into square
//! tiles (the samples).
//!
//! Two sources:
//!
//! * [`SegmentationSource::PngPairs`]: `images/x.png` pairs with
//!   `masks/x.png` (same file name). Images are read as gray (see
//!   [`super::image`] for the conversions). Masks must be gray PNGs holding
//!   class indices; a mask whose only values are 0 and 255 is read as a
//!   binary mask (255 → 1). An image without a mask, a mask without an image,
//!   or a size mismatch between the two is an error.
//! * [`SegmentationSource::RawU8`]: a folder with `header.json`
//!   (`{"height": H, "width": W, …}`), `image_u8.bin` and `mask_u8.bin`,
//!   each exactly `H · W` bytes, row-major — the format of
//!   `data/nuclei_dsb2018`.
//!
//! Tiles are non-overlapping `tile × tile` squares from the top-left corner;
//! pixels of a last partial row or column of tiles are not used. Image
//! values are scaled to `[0, 1]`. The train/validation split is by tile, so
//! neighbouring tiles of one image can land on both sides (fine for a
//! pipeline test, optimistic as a generalisation estimate).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::image::{Decoded, decode_png, is_png, list_dir};
use super::{
    DataError, FingerprintBuilder, LocalData, MAX_FILE_BYTES, MAX_VALUES, SampleShape, Samples,
    Targets, check_fraction, read_limited, split,
};

/// Largest tile side.
pub const MAX_TILE: u32 = 1024;
/// Largest raw image side.
pub const MAX_RAW_SIDE: u32 = 16_384;

/// Where image/mask pairs come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum SegmentationSource {
    /// Two folders of PNG files matched by file name.
    PngPairs {
        /// Folder of images.
        images: PathBuf,
        /// Folder of masks.
        masks: PathBuf,
    },
    /// `header.json` + `image_u8.bin` + `mask_u8.bin` in one folder.
    RawU8 {
        /// The folder.
        dir: PathBuf,
    },
}

fn default_validation_fraction() -> f64 {
    0.2
}

fn default_tile() -> u32 {
    64
}

/// How to read a segmentation dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentationConfig {
    /// The files.
    pub source: SegmentationSource,
    /// Tile side in pixels (multiple of 4, up to [`MAX_TILE`]).
    #[serde(default = "default_tile")]
    pub tile: u32,
    /// Fraction of tiles held out for validation, `[0, 0.9]`.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Seed of the train/validation split.
    #[serde(default)]
    pub split_seed: u64,
}

impl SegmentationConfig {
    /// 64×64 tiles, 20 % validation, seed 0.
    pub fn new(source: SegmentationSource) -> Self {
        Self {
            source,
            tile: default_tile(),
            validation_fraction: default_validation_fraction(),
            split_seed: 0,
        }
    }
}

/// Accumulates tiles of gray images and their masks.
struct Tiler {
    tile: usize,
    x: Vec<f32>,
    masks: Vec<u8>,
}

impl Tiler {
    fn add(
        &mut self,
        width: usize,
        height: usize,
        image: &[u8],
        mask: &[u8],
    ) -> Result<(), DataError> {
        let t = self.tile;
        let tiles = (width / t) * (height / t);
        if self.x.len() + tiles * t * t > MAX_VALUES {
            return Err(DataError::TooLarge {
                what: "segmentation tiles".to_owned(),
                size: (self.x.len() + tiles * t * t) as u64,
                limit: MAX_VALUES as u64,
            });
        }
        for ty in 0..height / t {
            for tx in 0..width / t {
                for y in ty * t..(ty + 1) * t {
                    let row = y * width + tx * t;
                    self.x
                        .extend(image[row..row + t].iter().map(|&v| f32::from(v) / 255.0));
                    self.masks.extend_from_slice(&mask[row..row + t]);
                }
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawHeader {
    height: u32,
    width: u32,
}

fn load_raw(dir: &Path, tiler: &mut Tiler, fp: &mut FingerprintBuilder) -> Result<(), DataError> {
    let header_path = dir.join("header.json");
    let header_bytes = read_limited(&header_path, 1 << 20)?;
    fp.file("header.json", &header_bytes);
    let header: RawHeader =
        serde_json::from_slice(&header_bytes).map_err(|e| DataError::Header {
            path: header_path.clone(),
            message: e.to_string(),
        })?;
    for (name, v) in [("height", header.height), ("width", header.width)] {
        if v == 0 || v > MAX_RAW_SIDE {
            return Err(DataError::Header {
                path: header_path.clone(),
                message: format!("{name} = {v} outside 1..={MAX_RAW_SIDE}"),
            });
        }
    }
    let (w, h) = (header.width as usize, header.height as usize);
    let expected = (w * h) as u64;
    let mut read = |name: &str| -> Result<Vec<u8>, DataError> {
        let path = dir.join(name);
        let bytes = read_limited(&path, MAX_FILE_BYTES)?;
        if bytes.len() as u64 != expected {
            return Err(DataError::Header {
                path: header_path.clone(),
                message: format!(
                    "{name} has {} bytes, the header's {w}×{h} needs {expected}",
                    bytes.len()
                ),
            });
        }
        fp.file(name, &bytes);
        Ok(bytes)
    };
    let image = read("image_u8.bin")?;
    let mask = read("mask_u8.bin")?;
    tiler.add(w, h, &image, &mask)
}

fn read_mask(path: &Path, bytes: &[u8]) -> Result<Decoded, DataError> {
    let mut m = decode_png(path, bytes)?;
    if m.channels != 1 {
        return Err(DataError::Png {
            path: path.to_path_buf(),
            message: "mask must be a grayscale PNG of class indices".to_owned(),
        });
    }
    if m.pixels.iter().all(|&v| v == 0 || v == 255) {
        for v in &mut m.pixels {
            *v = u8::from(*v == 255);
        }
    }
    Ok(m)
}

fn load_pairs(
    images: &Path,
    masks: &Path,
    tiler: &mut Tiler,
    fp: &mut FingerprintBuilder,
) -> Result<(), DataError> {
    let image_files: Vec<(String, PathBuf)> = list_dir(images)?
        .into_iter()
        .filter(|(n, _, d)| !d && is_png(n))
        .map(|(n, p, _)| (n, p))
        .collect();
    let mask_files: Vec<(String, PathBuf)> = list_dir(masks)?
        .into_iter()
        .filter(|(n, _, d)| !d && is_png(n))
        .map(|(n, p, _)| (n, p))
        .collect();
    for (name, path) in &mask_files {
        if !image_files.iter().any(|(n, _)| n == name) {
            return Err(DataError::MaskMismatch {
                image: images.join(name),
                mask: path.clone(),
                detail: "mask has no image of the same name".to_owned(),
            });
        }
    }
    for (name, image_path) in &image_files {
        let Some((_, mask_path)) = mask_files.iter().find(|(n, _)| n == name) else {
            return Err(DataError::MaskMismatch {
                image: image_path.clone(),
                mask: masks.join(name),
                detail: "no mask of the same name".to_owned(),
            });
        };
        let image_bytes = read_limited(image_path, MAX_FILE_BYTES)?;
        let mask_bytes = read_limited(mask_path, MAX_FILE_BYTES)?;
        fp.file(&format!("images/{name}"), &image_bytes);
        fp.file(&format!("masks/{name}"), &mask_bytes);
        let image = decode_png(image_path, &image_bytes)?.into_channels(1);
        let mask = read_mask(mask_path, &mask_bytes)?;
        if (image.width, image.height) != (mask.width, mask.height) {
            return Err(DataError::MaskMismatch {
                image: image_path.clone(),
                mask: mask_path.clone(),
                detail: format!(
                    "image is {}×{}, mask is {}×{}",
                    image.width, image.height, mask.width, mask.height
                ),
            });
        }
        tiler.add(
            image.width as usize,
            image.height as usize,
            &image.pixels,
            &mask.pixels,
        )?;
    }
    Ok(())
}

/// Read, validate, tile and split a segmentation dataset.
pub fn load_segmentation(cfg: &SegmentationConfig) -> Result<LocalData, DataError> {
    check_fraction(cfg.validation_fraction)?;
    if cfg.tile < 4 || cfg.tile > MAX_TILE || !cfg.tile.is_multiple_of(4) {
        return Err(DataError::Config(format!(
            "tile = {} must be a multiple of 4 within 4..={MAX_TILE}",
            cfg.tile
        )));
    }
    let mut tiler = Tiler {
        tile: cfg.tile as usize,
        x: Vec::new(),
        masks: Vec::new(),
    };
    let mut settings = cfg.clone();
    settings.source = match &cfg.source {
        SegmentationSource::RawU8 { .. } => SegmentationSource::RawU8 {
            dir: PathBuf::new(),
        },
        SegmentationSource::PngPairs { .. } => SegmentationSource::PngPairs {
            images: PathBuf::new(),
            masks: PathBuf::new(),
        },
    };
    let mut fp = FingerprintBuilder::new("segmentation", &settings);
    match &cfg.source {
        SegmentationSource::RawU8 { dir } => load_raw(dir, &mut tiler, &mut fp)?,
        SegmentationSource::PngPairs { images, masks } => {
            load_pairs(images, masks, &mut tiler, &mut fp)?;
        }
    }
    if tiler.x.is_empty() {
        return Err(DataError::Empty(format!(
            "no {0}×{0} tile fits in the images",
            cfg.tile
        )));
    }
    let t = cfg.tile as usize;
    let samples = Samples::new(
        SampleShape::Image {
            channels: 1,
            height: t,
            width: t,
        },
        tiler.x,
        Targets::Masks(tiler.masks),
    )?;
    split(
        &samples,
        cfg.validation_fraction,
        cfg.split_seed,
        fp.finish(),
    )
}

#[cfg(test)]
mod tests {
    use super::super::image::write_png;
    use super::*;

    fn nuclei() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/nuclei_dsb2018")
    }

    #[test]
    fn tiles_the_nuclei_image() {
        let mut cfg = SegmentationConfig::new(SegmentationSource::RawU8 { dir: nuclei() });
        cfg.validation_fraction = 0.25;
        let d = load_segmentation(&cfg).unwrap();
        assert_eq!(d.train.len() + d.validation.len(), 64);
        assert_eq!(d.validation.len(), 16);
        let Targets::Masks(m) = d.train.targets() else {
            panic!("masks expected");
        };
        let fg = m.iter().filter(|&&v| v == 1).count() as f64 / m.len() as f64;
        assert!(fg > 0.05 && fg < 0.5, "foreground fraction {fg}");
        assert!(m.iter().all(|&v| v <= 1));
        // Tile (0, 0) of the image is the first 64 bytes of each of the first 64 rows.
        cfg.validation_fraction = 0.0;
        let all = load_segmentation(&cfg).unwrap();
        let raw = std::fs::read(nuclei().join("image_u8.bin")).unwrap();
        assert_eq!(all.train.features()[64], f32::from(raw[512]) / 255.0);
    }

    fn raw_dir(header: &str, image_len: usize, mask_len: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("header.json"), header).unwrap();
        std::fs::write(dir.path().join("image_u8.bin"), vec![0u8; image_len]).unwrap();
        std::fs::write(dir.path().join("mask_u8.bin"), vec![0u8; mask_len]).unwrap();
        dir
    }

    #[test]
    fn raw_format_is_validated() {
        let cases = [
            (
                raw_dir("{\"height\": 8, \"width\": 8}", 64, 63),
                "mask_u8.bin has 63",
            ),
            (
                raw_dir("{\"height\": 8, \"width\": 8}", 65, 64),
                "image_u8.bin has 65",
            ),
            (raw_dir("{\"height\": 8}", 64, 64), "width"),
            (raw_dir("{\"height\": 0, \"width\": 8}", 0, 0), "height = 0"),
            (raw_dir("not json", 64, 64), "expected"),
        ];
        for (dir, needle) in cases {
            let mut cfg = SegmentationConfig::new(SegmentationSource::RawU8 {
                dir: dir.path().to_path_buf(),
            });
            cfg.tile = 4;
            let err = load_segmentation(&cfg).unwrap_err();
            assert!(matches!(err, DataError::Header { .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err} / {needle}");
        }
        let ok = raw_dir("{\"height\": 8, \"width\": 8}", 64, 64);
        let mut cfg = SegmentationConfig::new(SegmentationSource::RawU8 {
            dir: ok.path().to_path_buf(),
        });
        cfg.tile = 6;
        assert!(matches!(load_segmentation(&cfg), Err(DataError::Config(_))));
        cfg.tile = 16;
        assert!(matches!(load_segmentation(&cfg), Err(DataError::Empty(_))));
    }

    #[test]
    fn png_pairs_match_by_name_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let (images, masks) = (dir.path().join("images"), dir.path().join("masks"));
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&masks).unwrap();
        write_png(&images.join("a.png"), 8, 8, 3, &[200u8; 192]).unwrap();
        let mut mask = vec![0u8; 64];
        mask[..32].fill(255);
        write_png(&masks.join("a.png"), 8, 8, 1, &mask).unwrap();
        let source = SegmentationSource::PngPairs {
            images: images.clone(),
            masks: masks.clone(),
        };
        let mut cfg = SegmentationConfig::new(source);
        cfg.tile = 4;
        cfg.validation_fraction = 0.0;
        let d = load_segmentation(&cfg).unwrap();
        assert_eq!(d.train.len(), 4);
        assert_eq!(d.train.num_classes_seen(), 2);
        assert!((d.train.features()[0] - 200.0 / 255.0).abs() < 1e-6);

        // Mask of another size.
        write_png(&masks.join("a.png"), 8, 4, 1, &[0u8; 32]).unwrap();
        let err = load_segmentation(&cfg).unwrap_err();
        assert!(matches!(err, DataError::MaskMismatch { .. }), "{err}");
        assert!(err.to_string().contains("8×4"), "{err}");
        // Image without a mask.
        std::fs::remove_file(masks.join("a.png")).unwrap();
        let err = load_segmentation(&cfg).unwrap_err();
        assert!(err.to_string().contains("no mask"), "{err}");
        // Mask without an image.
        write_png(&masks.join("a.png"), 8, 8, 1, &mask).unwrap();
        write_png(&masks.join("b.png"), 8, 8, 1, &mask).unwrap();
        let err = load_segmentation(&cfg).unwrap_err();
        assert!(err.to_string().contains("no image"), "{err}");
        // RGB mask.
        std::fs::remove_file(masks.join("b.png")).unwrap();
        write_png(&masks.join("a.png"), 8, 8, 3, &[0u8; 192]).unwrap();
        let err = load_segmentation(&cfg).unwrap_err();
        assert!(err.to_string().contains("grayscale"), "{err}");
    }
}
