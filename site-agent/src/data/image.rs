//! Image classification data: one folder per class, PNG files.
//!
//! ```text
//! root/
//!   benign/     a.png b.png …
//!   malignant/  c.png …
//! ```
//!
//! * **Classes.** With `classes = ["benign", "malignant"]` set, label `i` is
//!   the folder named `classes[i]`, and a folder not in the list is an error.
//!   Every site of a federation must use the same list: a site that lacks a
//!   class would otherwise number the others differently. Without the list,
//!   the sorted folder names are the classes (fine for a single site).
//! * **Files.** `*.png` (any case) directly inside a class folder; other
//!   files and sub-folders are skipped (logged at debug level).
//! * **Pixels.** 8- or 16-bit grayscale, RGB, palette, with or without alpha;
//!   16-bit is reduced to 8-bit, alpha is dropped, RGB → gray uses
//!   `0.299 R + 0.587 G + 0.114 B`, gray → RGB replicates. Values are scaled
//!   to `[0, 1]`.
//! * **Size.** [`SizePolicy::Exact`] (default) requires every image to be
//!   `width × height`; [`SizePolicy::CenterCrop`] crops larger images around
//!   their centre and refuses smaller ones. Nothing is resampled.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    DataError, FingerprintBuilder, LocalData, MAX_FILE_BYTES, MAX_VALUES, SampleShape, Samples,
    Targets, check_fraction, read_limited, split,
};

/// Most images a dataset may hold.
pub const MAX_IMAGES: usize = 1_000_000;
/// Longest image side accepted by the decoder.
pub const MAX_SIDE: u32 = 16_384;
/// Largest decoded image, in bytes.
const MAX_DECODED_BYTES: usize = 256 << 20;

/// What to do with images whose size differs from the configured one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizePolicy {
    /// Refuse any image of another size.
    #[default]
    Exact,
    /// Crop larger images around their centre; refuse smaller ones.
    CenterCrop,
}

fn default_validation_fraction() -> f64 {
    0.2
}

fn default_channels() -> u32 {
    1
}

/// How to read an image-classification folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    /// Folder holding one sub-folder per class.
    pub root: PathBuf,
    /// Class folder names in label order (recommended; see module docs).
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// Channels fed to the model: 1 (gray) or 3 (RGB).
    #[serde(default = "default_channels")]
    pub channels: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Image width in pixels.
    pub width: u32,
    /// Size policy.
    #[serde(default)]
    pub resize: SizePolicy,
    /// Fraction held out for validation, `[0, 0.9]`.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Seed of the train/validation split.
    #[serde(default)]
    pub split_seed: u64,
}

impl ImageFolderConfig {
    /// Gray images of `width × height` under `root`, defaults elsewhere.
    pub fn new(root: impl Into<PathBuf>, height: u32, width: u32) -> Self {
        Self {
            root: root.into(),
            classes: None,
            channels: 1,
            height,
            width,
            resize: SizePolicy::Exact,
            validation_fraction: default_validation_fraction(),
            split_seed: 0,
        }
    }
}

/// A decoded 8-bit image, alpha removed: 1 (gray) or 3 (RGB) channels,
/// interleaved, row-major.
#[derive(Clone, Debug)]
pub(crate) struct Decoded {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) channels: u32,
    pub(crate) pixels: Vec<u8>,
}

impl Decoded {
    /// Convert to 1 or 3 channels.
    pub(crate) fn into_channels(self, channels: u32) -> Self {
        if channels == self.channels {
            return self;
        }
        let pixels = if channels == 1 {
            self.pixels
                .chunks_exact(3)
                .map(|p| {
                    (0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
                        .round()
                        .clamp(0.0, 255.0) as u8
                })
                .collect()
        } else {
            self.pixels.iter().flat_map(|&g| [g, g, g]).collect()
        };
        Self {
            channels,
            pixels,
            ..self
        }
    }
}

/// Decode a PNG held in memory, bounded in size.
pub(crate) fn decode_png(path: &Path, bytes: &[u8]) -> Result<Decoded, DataError> {
    let err = |message: String| DataError::Png {
        path: path.to_path_buf(),
        message,
    };
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits {
            bytes: MAX_DECODED_BYTES,
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| err(format!("not a readable PNG: {e}")))?;
    let (w, h) = (reader.info().width, reader.info().height);
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(err(format!("image size {w}×{h} outside 1..={MAX_SIDE}")));
    }
    let size = reader.output_buffer_size();
    if size > MAX_DECODED_BYTES {
        return Err(err(format!(
            "decoded image would take {size} bytes, more than {MAX_DECODED_BYTES}"
        )));
    }
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| err(format!("corrupt PNG data: {e}")))?;
    let (color, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight {
        return Err(err(format!("unsupported bit depth {depth:?}")));
    }
    let src_channels = color.samples();
    let data = buf
        .get(..frame.buffer_size())
        .ok_or_else(|| err("short frame".to_owned()))?;
    let (keep, channels) = match color {
        png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha => (1, 1),
        png::ColorType::Rgb | png::ColorType::Rgba => (3, 3),
        png::ColorType::Indexed => return Err(err("palette not expanded".to_owned())),
    };
    let row_bytes = frame.line_size;
    let mut pixels = Vec::with_capacity(w as usize * h as usize * keep);
    for row in data.chunks(row_bytes).take(h as usize) {
        for px in row.chunks_exact(src_channels).take(w as usize) {
            pixels.extend_from_slice(&px[..keep]);
        }
    }
    if pixels.len() != w as usize * h as usize * keep {
        return Err(err("truncated pixel data".to_owned()));
    }
    Ok(Decoded {
        width: w,
        height: h,
        channels,
        pixels,
    })
}

/// Crop (or check) `img` to `width × height` according to `policy`.
fn fit(
    path: &Path,
    img: Decoded,
    width: u32,
    height: u32,
    policy: SizePolicy,
) -> Result<Decoded, DataError> {
    if img.width == width && img.height == height {
        return Ok(img);
    }
    let size_err = || DataError::ImageSize {
        path: path.to_path_buf(),
        width,
        height,
        found_width: img.width,
        found_height: img.height,
    };
    if policy == SizePolicy::Exact || img.width < width || img.height < height {
        return Err(size_err());
    }
    let (x0, y0) = ((img.width - width) / 2, (img.height - height) / 2);
    let c = img.channels as usize;
    let mut pixels = Vec::with_capacity(width as usize * height as usize * c);
    for y in y0..y0 + height {
        let start = (y as usize * img.width as usize + x0 as usize) * c;
        pixels.extend_from_slice(&img.pixels[start..start + width as usize * c]);
    }
    Ok(Decoded {
        width,
        height,
        channels: img.channels,
        pixels,
    })
}

/// Interleaved HWC u8 → planar CHW f32 in `[0, 1]`, appended to `out`.
pub(crate) fn push_chw(img: &Decoded, out: &mut Vec<f32>) {
    let c = img.channels as usize;
    for ch in 0..c {
        out.extend(
            img.pixels
                .iter()
                .skip(ch)
                .step_by(c)
                .map(|&v| f32::from(v) / 255.0),
        );
    }
}

/// Sorted entries of a directory: `(name, path, is_dir)`.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            tracing::debug!(path = %path.display(), "skipping non-UTF-8 file name");
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
        if out.len() > MAX_IMAGES {
            return Err(DataError::TooLarge {
                what: format!("entries of {}", dir.display()),
                size: out.len() as u64,
                limit: MAX_IMAGES as u64,
            });
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn is_png(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".png")
}

/// Loaded classification images and the class names of the labels.
#[derive(Clone, Debug)]
pub struct ImageData {
    /// Train/validation samples and fingerprint.
    pub data: LocalData,
    /// `classes[label]` is the folder name of that label.
    pub classes: Vec<String>,
}

/// Read, validate and split an image-classification folder.
pub fn load_image_folder(cfg: &ImageFolderConfig) -> Result<ImageData, DataError> {
    check_fraction(cfg.validation_fraction)?;
    if cfg.channels != 1 && cfg.channels != 3 {
        return Err(DataError::Config(format!(
            "channels = {} (must be 1 or 3)",
            cfg.channels
        )));
    }
    if cfg.width == 0 || cfg.height == 0 || cfg.width > MAX_SIDE || cfg.height > MAX_SIDE {
        return Err(DataError::Config(format!(
            "image size {}×{} outside 1..={MAX_SIDE}",
            cfg.width, cfg.height
        )));
    }
    let folders: Vec<(String, PathBuf)> = list_dir(&cfg.root)?
        .into_iter()
        .filter(|(_, _, is_dir)| *is_dir)
        .map(|(n, p, _)| (n, p))
        .collect();
    let classes: Vec<String> = match &cfg.classes {
        Some(list) => {
            if list.is_empty() || list.len() > super::MAX_CLASSES as usize {
                return Err(DataError::Config(format!(
                    "classes must list 1..={} names",
                    super::MAX_CLASSES
                )));
            }
            for (name, _) in &folders {
                if !list.contains(name) {
                    return Err(DataError::Config(format!(
                        "{}: folder {name:?} is not one of the configured classes {list:?}",
                        cfg.root.display()
                    )));
                }
            }
            list.clone()
        }
        None => folders.iter().map(|(n, _)| n.clone()).collect(),
    };
    if folders.is_empty() {
        return Err(DataError::Empty(format!(
            "{}: no class folders",
            cfg.root.display()
        )));
    }
    let per = (cfg.channels * cfg.height * cfg.width) as usize;
    let mut settings = cfg.clone();
    settings.root = PathBuf::new();
    let mut fp = FingerprintBuilder::new("image_folder", &settings);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (name, dir) in &folders {
        let label = classes.iter().position(|c| c == name).unwrap_or(0) as u32;
        for (file, path, is_dir) in list_dir(dir)? {
            if is_dir || !is_png(&file) {
                tracing::debug!(path = %path.display(), "skipping non-PNG entry");
                continue;
            }
            if x.len() + per > MAX_VALUES || y.len() >= MAX_IMAGES {
                return Err(DataError::TooLarge {
                    what: format!("images under {}", cfg.root.display()),
                    size: (y.len() + 1) as u64,
                    limit: MAX_IMAGES.min(MAX_VALUES / per.max(1)) as u64,
                });
            }
            let bytes = read_limited(&path, MAX_FILE_BYTES)?;
            fp.file(&format!("{name}/{file}"), &bytes);
            let img = decode_png(&path, &bytes)?;
            let img =
                fit(&path, img, cfg.width, cfg.height, cfg.resize)?.into_channels(cfg.channels);
            push_chw(&img, &mut x);
            y.push(label);
        }
    }
    if y.is_empty() {
        return Err(DataError::Empty(format!(
            "{}: no PNG images in the class folders",
            cfg.root.display()
        )));
    }
    let samples = Samples::new(
        SampleShape::Image {
            channels: cfg.channels as usize,
            height: cfg.height as usize,
            width: cfg.width as usize,
        },
        x,
        Targets::Classes(y),
    )?;
    Ok(ImageData {
        data: split(
            &samples,
            cfg.validation_fraction,
            cfg.split_seed,
            fp.finish(),
        )?,
        classes,
    })
}

/// Write an 8-bit PNG (gray when `channels == 1`, RGB when 3). For tests and
/// tools that generate data; errors only on I/O.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    channels: u32,
    pixels: &[u8],
) -> Result<(), DataError> {
    let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(if channels == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    enc.set_depth(png::BitDepth::Eight);
    let to_err = |e: png::EncodingError| DataError::Png {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut writer = enc.write_header().map_err(to_err)?;
    writer.write_image_data(pixels).map_err(to_err)?;
    writer.finish().map_err(to_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(dir: &Path, class: &str, n: usize, w: u32, h: u32, value: u8) {
        let d = dir.join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..n {
            let px = vec![value.wrapping_add(i as u8); (w * h) as usize];
            write_png(&d.join(format!("{i}.png")), w, h, 1, &px).unwrap();
        }
    }

    #[test]
    fn loads_classes_in_configured_order() {
        let dir = tempfile::tempdir().unwrap();
        folder(dir.path(), "a", 3, 4, 4, 0);
        folder(dir.path(), "b", 2, 4, 4, 255);
        std::fs::write(dir.path().join("a/notes.txt"), "skip me").unwrap();
        let mut cfg = ImageFolderConfig::new(dir.path(), 4, 4);
        cfg.validation_fraction = 0.0;
        cfg.classes = Some(vec!["b".into(), "a".into()]);
        let d = load_image_folder(&cfg).unwrap();
        assert_eq!(d.classes, vec!["b", "a"]);
        assert_eq!(d.data.train.len(), 5);
        assert_eq!(
            d.data.train.targets(),
            &Targets::Classes(vec![1, 1, 1, 0, 0])
        );
        assert_eq!(d.data.train.features()[0], 0.0);
        assert_eq!(d.data.train.features()[16 * 3], 1.0);
        // RGB output replicates gray.
        cfg.channels = 3;
        let rgb = load_image_folder(&cfg).unwrap();
        assert_eq!(rgb.data.train.features().len(), 5 * 3 * 16);
    }

    #[test]
    fn center_crop_and_size_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c");
        std::fs::create_dir_all(&d).unwrap();
        // 4×4 with a bright 2×2 centre.
        let mut px = vec![0u8; 16];
        for (x, y) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
            px[y * 4 + x] = 255;
        }
        write_png(&d.join("x.png"), 4, 4, 1, &px).unwrap();
        let mut cfg = ImageFolderConfig::new(dir.path(), 2, 2);
        cfg.validation_fraction = 0.0;
        let err = load_image_folder(&cfg).unwrap_err();
        assert!(
            matches!(err, DataError::ImageSize { found_width: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("x.png"));
        cfg.resize = SizePolicy::CenterCrop;
        let ok = load_image_folder(&cfg).unwrap();
        assert_eq!(ok.data.train.features(), &[1.0; 4]);
        cfg.height = 8;
        cfg.width = 8;
        assert!(matches!(
            load_image_folder(&cfg),
            Err(DataError::ImageSize { .. })
        ));
    }

    #[test]
    fn rejects_bad_folders() {
        let dir = tempfile::tempdir().unwrap();
        folder(dir.path(), "a", 1, 4, 4, 0);
        folder(dir.path(), "b", 1, 6, 4, 0);
        let mut cfg = ImageFolderConfig::new(dir.path(), 4, 4);
        cfg.validation_fraction = 0.0;
        assert!(matches!(
            load_image_folder(&cfg),
            Err(DataError::ImageSize { found_width: 6, .. })
        ));
        std::fs::write(dir.path().join("b/0.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let err = load_image_folder(&cfg).unwrap_err();
        assert!(matches!(err, DataError::Png { .. }), "{err}");
        cfg.classes = Some(vec!["a".into()]);
        assert!(matches!(load_image_folder(&cfg), Err(DataError::Config(_))));
        cfg.classes = None;
        cfg.channels = 2;
        assert!(matches!(load_image_folder(&cfg), Err(DataError::Config(_))));
        let empty = tempfile::tempdir().unwrap();
        let cfg = ImageFolderConfig::new(empty.path(), 4, 4);
        assert!(matches!(load_image_folder(&cfg), Err(DataError::Empty(_))));
        let cfg = ImageFolderConfig::new(empty.path().join("missing"), 4, 4);
        assert!(matches!(load_image_folder(&cfg), Err(DataError::Io { .. })));
    }
}
