//! Medical volumes (DICOM series, NIfTI files) → 2D samples.
//!
//! The format readers ([`super::dicom`], [`super::nifti`]) each turn one
//! *entry* (a DICOM series folder, a NIfTI file) into a [`Volume`] of
//! rescaled `f32` values; this module turns volumes into training samples,
//! the same way for both formats.
//!
//! ```text
//!  root/images/<entry> ──▶ Volume ──▶ normalise ──▶ slices (axis) ──▶ tiles? ──▶ Samples
//!  root/masks/<entry>  ──▶ Volume (class indices) ───────┘                      (per-pixel)
//!  root/<class>/<entry> ─▶ Volume ──▶ … ──▶ one class label per slice/tile
//! ```
//!
//! * **Layout.** `task = "segmentation"`: `root/images/<entry>` with
//!   `root/masks/<entry>` of the same name; a mask volume holds integer class
//!   indices (0 = background) and must have the image's dimensions.
//!   `task = "classification"`: `root/<class>/<entry>`; every slice (or tile)
//!   of an entry gets the class's label. With `classes` set, label `i` is the
//!   folder `classes[i]` and any other folder is an error (every site of a
//!   federation must use the same list); without it, the sorted folder names.
//! * **Axes.** A volume is `x` (columns), `y` (rows), `z` (slices) in the
//!   order stored: DICOM slices sorted along the patient axis (see
//!   [`super::dicom`]), NIfTI voxels in file order. Nothing is reoriented or
//!   resampled. `axis = "z"` gives `y × x` slices, `"y"` gives `z × x`,
//!   `"x"` gives `z × y`.
//! * **Intensities.** Values are the format's rescaled values (DICOM
//!   `RescaleSlope`/`RescaleIntercept`, e.g. Hounsfield units for CT; NIfTI
//!   `scl_slope`/`scl_inter`). Then `normalize`: `"min-max"` (default) maps
//!   each volume's minimum..maximum to `[0, 1]` (a constant volume gives
//!   zeros); `"window"` clips to `window = [center, width]` (as a radiology
//!   window, e.g. `[40, 400]` for CT soft tissue) and maps it to `[0, 1]`;
//!   `"none"` keeps the rescaled values.
//! * **Size.** With `tile` set, each slice is cut into non-overlapping
//!   `tile × tile` squares from the top-left corner (a partial last row or
//!   column of tiles is dropped); otherwise every slice of the dataset must
//!   have the same size.
//! * **Split.** The train/validation split is by *entry* (series or file,
//!   i.e. usually by patient), never by slice, so that neighbouring slices of
//!   one patient do not land on both sides. With few entries the validation
//!   set may be empty.
//! * **Bounds.** Every size is checked before allocation against the
//!   limits below; a hostile header gives a [`DataError`] naming the file
//!   and field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::image::list_dir;
use super::{
    DataError, FingerprintBuilder, LocalData, MAX_CLASSES, MAX_VALUES, SampleShape, Samples,
    Targets, check_fraction, split_indices,
};

/// Longest side of a slice (rows, columns) or of a volume (slices).
pub const MAX_SIDE: usize = 8192;
/// Largest tile side.
pub const MAX_TILE: u32 = 1024;
/// Most entries (series or files) in a dataset.
pub const MAX_ENTRIES: usize = 100_000;

/// Which task the volumes serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeTask {
    /// `root/images/<entry>` + `root/masks/<entry>`.
    Segmentation,
    /// `root/<class>/<entry>`.
    Classification,
}

/// The axis slices are taken across.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SliceAxis {
    /// Sagittal for a usual NIfTI / DICOM axial series: `z × y` slices.
    X,
    /// Coronal for a usual axial series: `z × x` slices.
    Y,
    /// The stored slices (axial for an axial series): `y × x`.
    #[default]
    Z,
}

/// Intensity normalisation, after the format's rescale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalize {
    /// Each volume's minimum..maximum → `[0, 1]`.
    #[default]
    MinMax,
    /// `window = [center, width]` clipped and mapped to `[0, 1]`.
    Window,
    /// Rescaled values as they are.
    None,
}

fn default_validation_fraction() -> f64 {
    0.2
}

/// `[dataset]` for `kind = "dicom"` and `kind = "nifti"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Segmentation or classification (decides the folder layout).
    pub task: VolumeTask,
    /// The dataset folder (see the module docs for the layout).
    pub root: PathBuf,
    /// Classification: class folder names in label order.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// Slice axis (default `z`).
    #[serde(default)]
    pub axis: SliceAxis,
    /// Intensity normalisation (default `min-max`).
    #[serde(default)]
    pub normalize: Normalize,
    /// `[center, width]` for `normalize = "window"`.
    #[serde(default)]
    pub window: Option<[f64; 2]>,
    /// Cut slices into `tile × tile` squares (multiple of 4, up to
    /// [`MAX_TILE`]); whole slices when unset.
    #[serde(default)]
    pub tile: Option<u32>,
    /// Fraction of entries held out for validation, `[0, 0.9]`.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Seed of the train/validation split.
    #[serde(default)]
    pub split_seed: u64,
}

impl VolumeConfig {
    /// A segmentation dataset under `root`, defaults elsewhere.
    pub fn segmentation(root: impl Into<PathBuf>) -> Self {
        Self {
            task: VolumeTask::Segmentation,
            root: root.into(),
            classes: None,
            axis: SliceAxis::Z,
            normalize: Normalize::MinMax,
            window: None,
            tile: None,
            validation_fraction: default_validation_fraction(),
            split_seed: 0,
        }
    }

    /// Check the settings (not the files). Errors name the field
    /// (`dataset.<field>`) first.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: String| Err((format!("dataset.{f}"), m));
        if self.root.as_os_str().is_empty() {
            return bad("root", "must not be empty".to_owned());
        }
        let f = self.validation_fraction;
        if !(f.is_finite() && (0.0..=0.9).contains(&f)) {
            return bad("validation_fraction", format!("{f} is not within [0, 0.9]"));
        }
        if let Some(t) = self.tile
            && (t == 0 || !t.is_multiple_of(4) || t > MAX_TILE)
        {
            return bad(
                "tile",
                format!("{t} is not a multiple of 4 in 4..={MAX_TILE}"),
            );
        }
        match (self.normalize, self.window) {
            (Normalize::Window, None) => {
                return bad(
                    "window",
                    "normalize = \"window\" needs window = [center, width]".to_owned(),
                );
            }
            (Normalize::Window, Some([c, w])) if !(c.is_finite() && w.is_finite() && w > 0.0) => {
                return bad(
                    "window",
                    format!("[{c}, {w}]: the center must be finite and the width positive"),
                );
            }
            (Normalize::MinMax | Normalize::None, Some(_)) => {
                return bad(
                    "window",
                    "is only used with normalize = \"window\"".to_owned(),
                );
            }
            _ => {}
        }
        if self.task == VolumeTask::Segmentation && self.classes.is_some() {
            return bad(
                "classes",
                "is for task = \"classification\"; mask values are the classes".to_owned(),
            );
        }
        if let Some(c) = &self.classes {
            if c.is_empty() || c.len() > MAX_CLASSES as usize {
                return bad("classes", format!("needs 1..={MAX_CLASSES} names"));
            }
            for (i, name) in c.iter().enumerate() {
                if name.is_empty() || c[..i].contains(name) {
                    return bad(
                        &format!("classes[{i}]"),
                        format!("{name:?} is empty or repeated"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// One volume of rescaled values, `x` fastest: `values[x + nx·(y + ny·z)]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    /// `[nx, ny, nz]`: columns, rows, slices.
    pub dims: [usize; 3],
    /// `nx · ny · nz` values.
    pub values: Vec<f32>,
}

impl Volume {
    /// Value at `(x, y, z)` (callers stay within `dims`).
    fn at(&self, x: usize, y: usize, z: usize) -> f32 {
        let [nx, ny, _] = self.dims;
        self.values[x + nx * (y + ny * z)]
    }

    /// Slices across `axis`: `(height, width, values row-major)` each.
    fn slices(&self, axis: SliceAxis) -> (usize, usize, Vec<Vec<f32>>) {
        let [nx, ny, nz] = self.dims;
        match axis {
            SliceAxis::Z => (
                ny,
                nx,
                (0..nz)
                    .map(|z| self.values[z * nx * ny..(z + 1) * nx * ny].to_vec())
                    .collect(),
            ),
            SliceAxis::Y => (
                nz,
                nx,
                (0..ny)
                    .map(|y| {
                        (0..nz)
                            .flat_map(|z| (0..nx).map(move |x| (x, z)))
                            .map(|(x, z)| self.at(x, y, z))
                            .collect()
                    })
                    .collect(),
            ),
            SliceAxis::X => (
                nz,
                ny,
                (0..nx)
                    .map(|x| {
                        (0..nz)
                            .flat_map(|z| (0..ny).map(move |y| (y, z)))
                            .map(|(y, z)| self.at(x, y, z))
                            .collect()
                    })
                    .collect(),
            ),
        }
    }
}

/// Check `dims` against the limits before anything of that size is
/// allocated; `what` names the file and field in the error.
pub(crate) fn check_dims(path: &Path, what: &str, dims: [u64; 3]) -> Result<usize, DataError> {
    for (axis, d) in ["columns", "rows", "slices"].iter().zip(dims) {
        if d == 0 || d > MAX_SIDE as u64 {
            return Err(DataError::Header {
                path: path.to_path_buf(),
                message: format!("{what}: {d} {axis} is outside 1..={MAX_SIDE}"),
            });
        }
    }
    let n = dims.iter().product::<u64>();
    if n > MAX_VALUES as u64 {
        return Err(DataError::TooLarge {
            what: format!(
                "{}: {what} {}×{}×{}",
                path.display(),
                dims[0],
                dims[1],
                dims[2]
            ),
            size: n,
            limit: MAX_VALUES as u64,
        });
    }
    Ok(n as usize)
}

/// Apply the configured normalisation in place.
fn normalize(values: &mut [f32], how: Normalize, window: Option<[f64; 2]>) {
    match (how, window) {
        (Normalize::None, _) => {}
        (Normalize::MinMax, _) => {
            let (lo, hi) = values
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let range = hi - lo;
            for v in values.iter_mut() {
                *v = if range > 0.0 { (*v - lo) / range } else { 0.0 };
            }
        }
        (Normalize::Window, Some([c, w])) => {
            let lo = c - w / 2.0;
            for v in values.iter_mut() {
                *v = ((f64::from(*v) - lo) / w).clamp(0.0, 1.0) as f32;
            }
        }
        // Refused by `validate`; keep the values rather than guess.
        (Normalize::Window, None) => {}
    }
}

/// Reads one entry (a DICOM series folder or a NIfTI file) into a volume,
/// adding the bytes it read to the fingerprint under `name`.
pub(crate) trait VolumeReader {
    /// `dicom` or `nifti`.
    const KIND: &'static str;
    /// Whether `path` (named `name` in its folder) is an entry of this format.
    fn is_entry(name: &str, path: &Path, is_dir: bool) -> bool;
    /// Read the entry.
    fn read(path: &Path, name: &str, fp: &mut FingerprintBuilder) -> Result<Volume, DataError>;
}

/// Accumulates samples from volumes.
struct Builder<'a> {
    cfg: &'a VolumeConfig,
    /// `(height, width)` of every sample, fixed by the first one.
    size: Option<(usize, usize)>,
    x: Vec<f32>,
    masks: Vec<u8>,
    classes: Vec<u32>,
    /// Samples per entry, in order.
    per_entry: Vec<usize>,
}

impl Builder<'_> {
    fn push_patch(&mut self, path: &Path, h: usize, w: usize) -> Result<(), DataError> {
        match self.size {
            None => self.size = Some((h, w)),
            Some(s) if s == (h, w) => {}
            Some((sh, sw)) => {
                return Err(DataError::ImageSize {
                    path: path.to_path_buf(),
                    width: sw as u32,
                    height: sh as u32,
                    found_width: w as u32,
                    found_height: h as u32,
                });
            }
        }
        if self.x.len() + h * w > MAX_VALUES {
            return Err(DataError::TooLarge {
                what: "volume samples".to_owned(),
                size: (self.x.len() + h * w) as u64,
                limit: MAX_VALUES as u64,
            });
        }
        Ok(())
    }

    /// Add every slice (or tile) of `image`, with the mask's slices or a
    /// class label.
    fn add(
        &mut self,
        path: &Path,
        mut image: Volume,
        target: EntryTarget<'_>,
    ) -> Result<(), DataError> {
        normalize(&mut image.values, self.cfg.normalize, self.cfg.window);
        let (h, w, slices) = image.slices(self.cfg.axis);
        let mask_slices = match target {
            EntryTarget::Mask(m) => Some(m.slices(self.cfg.axis).2),
            EntryTarget::Class(_) => None,
        };
        let label = match target {
            EntryTarget::Class(c) => c,
            EntryTarget::Mask(_) => 0,
        };
        let mut count = 0;
        for (k, slice) in slices.iter().enumerate() {
            let mask = mask_slices.as_ref().and_then(|m| m.get(k));
            let t = self.cfg.tile.map(|t| t as usize);
            let (th, tw) = t.map_or((h, w), |t| (t, t));
            for ty in 0..h / th {
                for tx in 0..w / tw {
                    self.push_patch(path, th, tw)?;
                    for y in ty * th..(ty + 1) * th {
                        let row = y * w + tx * tw;
                        self.x.extend_from_slice(&slice[row..row + tw]);
                        if let Some(m) = mask {
                            // Mask values were checked to be integers in 0..=255.
                            self.masks.extend(m[row..row + tw].iter().map(|&v| v as u8));
                        }
                    }
                    if mask.is_none() {
                        self.classes.push(label);
                    }
                    count += 1;
                }
            }
        }
        self.per_entry.push(count);
        Ok(())
    }
}

enum EntryTarget<'a> {
    Mask(&'a Volume),
    Class(u32),
}

/// Check that a mask volume holds class indices and matches its image.
fn check_mask(
    image_path: &Path,
    mask_path: &Path,
    image: &Volume,
    mask: &Volume,
) -> Result<(), DataError> {
    if image.dims != mask.dims {
        return Err(DataError::MaskMismatch {
            image: image_path.to_path_buf(),
            mask: mask_path.to_path_buf(),
            detail: format!(
                "image is {:?} (columns, rows, slices), mask is {:?}",
                image.dims, mask.dims
            ),
        });
    }
    if let Some(v) = mask
        .values
        .iter()
        .find(|v| !(v.fract() == 0.0 && (0.0..=255.0).contains(*v) && **v < MAX_CLASSES as f32))
    {
        return Err(DataError::MaskMismatch {
            image: image_path.to_path_buf(),
            mask: mask_path.to_path_buf(),
            detail: format!(
                "mask value {v} is not a class index in 0..{}",
                MAX_CLASSES.min(256)
            ),
        });
    }
    Ok(())
}

/// The entries of `dir`, sorted by name.
fn entries<R: VolumeReader>(dir: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let list: Vec<(String, PathBuf)> = list_dir(dir)?
        .into_iter()
        .filter(|(n, p, is_dir)| !n.starts_with('.') && R::is_entry(n, p, *is_dir))
        .map(|(n, p, _)| (n, p))
        .collect();
    if list.len() > MAX_ENTRIES {
        return Err(DataError::TooLarge {
            what: format!("{} entries", dir.display()),
            size: list.len() as u64,
            limit: MAX_ENTRIES as u64,
        });
    }
    Ok(list)
}

/// Read, validate, slice and split a dataset of DICOM series.
pub fn load_dicom(cfg: &VolumeConfig) -> Result<LocalData, DataError> {
    load_volumes::<super::dicom::Dicom>(cfg)
}

/// Read, validate, slice and split a dataset of NIfTI files.
pub fn load_nifti(cfg: &VolumeConfig) -> Result<LocalData, DataError> {
    load_volumes::<super::nifti::Nifti>(cfg)
}

/// Read, validate, slice and split a DICOM or NIfTI dataset.
pub(crate) fn load_volumes<R: VolumeReader>(cfg: &VolumeConfig) -> Result<LocalData, DataError> {
    cfg.validate()
        .map_err(|(field, message)| DataError::Config(format!("{field}: {message}")))?;
    check_fraction(cfg.validation_fraction)?;
    let mut settings = cfg.clone();
    settings.root = PathBuf::new();
    let mut fp = FingerprintBuilder::new(R::KIND, &settings);
    let mut b = Builder {
        cfg,
        size: None,
        x: Vec::new(),
        masks: Vec::new(),
        classes: Vec::new(),
        per_entry: Vec::new(),
    };
    match cfg.task {
        VolumeTask::Segmentation => {
            let (images, masks) = (cfg.root.join("images"), cfg.root.join("masks"));
            let image_entries = entries::<R>(&images)?;
            let mask_entries = entries::<R>(&masks)?;
            for (name, path) in &mask_entries {
                if !image_entries.iter().any(|(n, _)| n == name) {
                    return Err(DataError::MaskMismatch {
                        image: images.join(name),
                        mask: path.clone(),
                        detail: "mask has no image of the same name".to_owned(),
                    });
                }
            }
            for (name, image_path) in &image_entries {
                let Some((_, mask_path)) = mask_entries.iter().find(|(n, _)| n == name) else {
                    return Err(DataError::MaskMismatch {
                        image: image_path.clone(),
                        mask: masks.join(name),
                        detail: "no mask of the same name".to_owned(),
                    });
                };
                let image = R::read(image_path, &format!("images/{name}"), &mut fp)?;
                let mask = R::read(mask_path, &format!("masks/{name}"), &mut fp)?;
                check_mask(image_path, mask_path, &image, &mask)?;
                b.add(image_path, image, EntryTarget::Mask(&mask))?;
            }
        }
        VolumeTask::Classification => {
            let folders: Vec<(String, PathBuf)> = list_dir(&cfg.root)?
                .into_iter()
                .filter(|(n, _, is_dir)| *is_dir && !n.starts_with('.'))
                .map(|(n, p, _)| (n, p))
                .collect();
            let classes: Vec<String> = match &cfg.classes {
                Some(c) => {
                    if let Some((n, _)) = folders.iter().find(|(n, _)| !c.contains(n)) {
                        return Err(DataError::Config(format!(
                            "{}: folder {n:?} is not in `classes`",
                            cfg.root.display()
                        )));
                    }
                    c.clone()
                }
                None => folders.iter().map(|(n, _)| n.clone()).collect(),
            };
            if classes.len() > MAX_CLASSES as usize {
                return Err(DataError::TooLarge {
                    what: format!("{} class folders", cfg.root.display()),
                    size: classes.len() as u64,
                    limit: u64::from(MAX_CLASSES),
                });
            }
            for (label, class) in classes.iter().enumerate() {
                let dir = cfg.root.join(class);
                if !dir.is_dir() {
                    // A class this site does not hold: nothing to read.
                    continue;
                }
                for (name, path) in entries::<R>(&dir)? {
                    let volume = R::read(&path, &format!("{class}/{name}"), &mut fp)?;
                    b.add(&path, volume, EntryTarget::Class(label as u32))?;
                }
            }
        }
    }
    let Some((height, width)) = b.size else {
        return Err(DataError::Empty(format!(
            "{}: no {} slice{} found",
            cfg.root.display(),
            R::KIND,
            cfg.tile
                .map_or(String::new(), |t| format!(" holding a {t}×{t} tile")),
        )));
    };
    let shape = SampleShape::Image {
        channels: 1,
        height,
        width,
    };
    let targets = match cfg.task {
        VolumeTask::Segmentation => Targets::Masks(b.masks),
        VolumeTask::Classification => Targets::Classes(b.classes),
    };
    let samples = Samples::new(shape, b.x, targets)?;
    // Split by entry: the samples of one series/file stay together.
    let (train_entries, valid_entries) =
        split_indices(b.per_entry.len(), cfg.validation_fraction, cfg.split_seed);
    let starts: Vec<usize> = b
        .per_entry
        .iter()
        .scan(0, |acc, &n| {
            let s = *acc;
            *acc += n;
            Some(s)
        })
        .collect();
    let gather = |entries: &[usize]| -> Vec<usize> {
        entries
            .iter()
            .flat_map(|&e| starts[e]..starts[e] + b.per_entry[e])
            .collect()
    };
    let train = gather(&train_entries);
    if train.is_empty() {
        return Err(DataError::Empty(format!(
            "no training samples left after the split ({} entries)",
            b.per_entry.len()
        )));
    }
    Ok(LocalData {
        train: samples.subset(&train),
        validation: samples.subset(&gather(&valid_entries)),
        fingerprint: fp.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> Volume {
        // 3 columns, 2 rows, 2 slices; value = 100 z + 10 y + x.
        let mut values = Vec::new();
        for z in 0..2 {
            for y in 0..2 {
                for x in 0..3 {
                    values.push((100 * z + 10 * y + x) as f32);
                }
            }
        }
        Volume {
            dims: [3, 2, 2],
            values,
        }
    }

    #[test]
    fn slices_along_each_axis() {
        let v = vol();
        let (h, w, s) = v.slices(SliceAxis::Z);
        assert_eq!((h, w, s.len()), (2, 3, 2));
        assert_eq!(s[1], vec![100.0, 101.0, 102.0, 110.0, 111.0, 112.0]);
        let (h, w, s) = v.slices(SliceAxis::Y);
        assert_eq!((h, w, s.len()), (2, 3, 2));
        assert_eq!(s[1], vec![10.0, 11.0, 12.0, 110.0, 111.0, 112.0]);
        let (h, w, s) = v.slices(SliceAxis::X);
        assert_eq!((h, w, s.len()), (2, 2, 3));
        assert_eq!(s[2], vec![2.0, 12.0, 102.0, 112.0]);
    }

    #[test]
    fn normalisations() {
        let mut v = vec![-1000.0, 40.0, 240.0, 3000.0];
        normalize(&mut v, Normalize::Window, Some([40.0, 400.0]));
        assert_eq!(v, vec![0.0, 0.5, 1.0, 1.0]);
        let mut v = vec![2.0, 4.0, 6.0];
        normalize(&mut v, Normalize::MinMax, None);
        assert_eq!(v, vec![0.0, 0.5, 1.0]);
        let mut v = vec![7.0, 7.0];
        normalize(&mut v, Normalize::MinMax, None);
        assert_eq!(v, vec![0.0, 0.0]);
        let mut v = vec![-3.5];
        normalize(&mut v, Normalize::None, None);
        assert_eq!(v, vec![-3.5]);
    }

    #[test]
    fn settings_are_validated_by_field() {
        let ok = VolumeConfig::segmentation("/d");
        ok.validate().unwrap();
        type Change = Box<dyn Fn(&mut VolumeConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.tile = Some(6)), "dataset.tile"),
            (Box::new(|c| c.tile = Some(2048)), "dataset.tile"),
            (
                Box::new(|c| c.normalize = Normalize::Window),
                "dataset.window",
            ),
            (
                Box::new(|c| {
                    c.normalize = Normalize::Window;
                    c.window = Some([40.0, 0.0]);
                }),
                "dataset.window",
            ),
            (
                Box::new(|c| c.window = Some([40.0, 400.0])),
                "dataset.window",
            ),
            (
                Box::new(|c| c.validation_fraction = 1.0),
                "dataset.validation_fraction",
            ),
            (Box::new(|c| c.root = PathBuf::new()), "dataset.root"),
            (
                Box::new(|c| c.classes = Some(vec!["a".into()])),
                "dataset.classes",
            ),
            (
                Box::new(|c| {
                    c.task = VolumeTask::Classification;
                    c.classes = Some(vec!["a".into(), "a".into()]);
                }),
                "dataset.classes[1]",
            ),
        ];
        for (change, field) in cases {
            let mut c = ok.clone();
            change(&mut c);
            assert_eq!(c.validate().unwrap_err().0, field);
        }
    }

    #[test]
    fn huge_dimensions_are_refused_before_allocation() {
        let p = Path::new("x.nii");
        assert!(matches!(
            check_dims(p, "dim", [8192, 8192, 8192]),
            Err(DataError::TooLarge { .. })
        ));
        let e = check_dims(p, "dim", [0, 1, 1]).unwrap_err().to_string();
        assert!(e.contains("x.nii") && e.contains("0 columns"), "{e}");
        assert_eq!(check_dims(p, "dim", [4, 5, 7]).unwrap(), 140);
    }
}
