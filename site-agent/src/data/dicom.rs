//! DICOM series: a folder of single-frame 2D slices → one volume, read
//! with dicom-rs (`dicom-object` to parse, `dicom-pixeldata` to decode).
//!
//! * **Files.** Every regular file in the series folder (names starting
//!   with `.` and a `DICOMDIR` are skipped) must be a DICOM file (Part 10,
//!   with or without the 128-byte preamble) of the same series
//!   (`SeriesInstanceUID`, when present) and the same `Rows` × `Columns`.
//!   Transfer syntaxes: the uncompressed ones (implicit/explicit VR, little
//!   or big endian). Compressed pixel data (RLE, JPEG, JPEG-LS, JPEG 2000)
//!   is refused with an error naming the file: dicom-rs 0.10.1's RLE decoder
//!   panics on a malformed stream (found by this project's fuzz corpus), so
//!   no codec is compiled in; decompress first (`gdcmconv --raw`,
//!   `dcmdjpeg`).
//! * **Pixels.** One sample per pixel (`MONOCHROME2`; `MONOCHROME1` and
//!   colour are refused), one frame per file, 8, 16 or 32 bits allocated.
//!   Stored values become `stored · RescaleSlope + RescaleIntercept` (slope
//!   1 and intercept 0 when absent) — Hounsfield units for CT. Windowing
//!   (`WindowCenter`/`WindowWidth` in the file) is *not* applied: choose it
//!   in `site.toml` (`normalize = "window"`), so that every site uses the
//!   same one.
//! * **Order.** Slices are sorted along the patient axis: by the
//!   projection of `ImagePositionPatient` on the slice normal
//!   (`ImageOrientationPatient` row × column cosines) when every file has
//!   both, else by `InstanceNumber` when every file has it; else (more than
//!   one slice) it is an error. Two slices at the same position or number
//!   are an error naming both files.
//! * **Bounds.** Files are read up to [`super::MAX_FILE_BYTES`]; rows,
//!   columns and slice count are checked against
//!   [`super::volume::MAX_SIDE`], the total against [`super::MAX_VALUES`],
//!   before pixel data is decoded.
//!
//! A segmentation mask series is a folder of DICOM slices of the same
//! geometry whose (rescaled) pixel values are class indices, sorted the
//! same way (see [`super::volume`] for the folder layout).

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};

use super::volume::{MAX_SIDE, Volume, VolumeReader, check_dims};
use super::{DataError, FingerprintBuilder, MAX_FILE_BYTES, MAX_VALUES, read_limited};

/// Reads DICOM series folders.
pub(crate) struct Dicom;

impl VolumeReader for Dicom {
    const KIND: &'static str = "dicom";

    fn is_entry(_name: &str, _path: &Path, is_dir: bool) -> bool {
        is_dir
    }

    fn read(path: &Path, name: &str, fp: &mut FingerprintBuilder) -> Result<Volume, DataError> {
        read_series(path, name, fp)
    }
}

fn field_error(path: &Path, field: &str, message: impl std::fmt::Display) -> DataError {
    DataError::Header {
        path: path.to_path_buf(),
        message: format!("{field}: {message}"),
    }
}

/// One decoded slice and what orders it.
#[derive(Debug)]
pub struct Slice {
    /// Columns, rows.
    pub size: (usize, usize),
    /// Rescaled values, row-major.
    pub values: Vec<f32>,
    /// `SeriesInstanceUID`.
    pub series: Option<String>,
    /// `InstanceNumber`.
    pub instance: Option<i64>,
    /// Position along the slice normal (from `ImagePositionPatient` and
    /// `ImageOrientationPatient`).
    pub position: Option<f64>,
}

fn opt_str(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn required_int(
    obj: &DefaultDicomObject,
    path: &Path,
    field: &str,
    tag: dicom_object::Tag,
) -> Result<u32, DataError> {
    let e = obj
        .get(tag)
        .ok_or_else(|| field_error(path, field, "missing"))?;
    e.to_int::<u32>()
        .map_err(|err| field_error(path, field, format!("not an unsigned integer: {err}")))
}

fn opt_float(
    obj: &DefaultDicomObject,
    path: &Path,
    field: &str,
    tag: dicom_object::Tag,
) -> Result<Option<f64>, DataError> {
    match obj.get(tag) {
        None => Ok(None),
        Some(e) => match e.to_float64() {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            Ok(v) => Err(field_error(path, field, format!("{v} is not finite"))),
            Err(err) => Err(field_error(path, field, format!("not a number: {err}"))),
        },
    }
}

/// Position along the slice normal, when both attributes are present and
/// sane.
fn normal_position(obj: &DefaultDicomObject, path: &Path) -> Result<Option<f64>, DataError> {
    let (Some(pos), Some(ori)) = (
        obj.get(tags::IMAGE_POSITION_PATIENT),
        obj.get(tags::IMAGE_ORIENTATION_PATIENT),
    ) else {
        return Ok(None);
    };
    let pos = pos
        .to_multi_float64()
        .map_err(|e| field_error(path, "ImagePositionPatient (0020,0032)", e))?;
    let ori = ori
        .to_multi_float64()
        .map_err(|e| field_error(path, "ImageOrientationPatient (0020,0037)", e))?;
    if pos.len() != 3 || ori.len() != 6 || pos.iter().chain(&ori).any(|v| !v.is_finite()) {
        return Err(field_error(
            path,
            "ImagePositionPatient/ImageOrientationPatient",
            format!("need 3 and 6 finite numbers, got {pos:?} and {ori:?}"),
        ));
    }
    let (r, c) = (&ori[..3], &ori[3..]);
    let n = [
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    ];
    Ok(Some(pos[0] * n[0] + pos[1] * n[1] + pos[2] * n[2]))
}

/// Parse and decode one DICOM slice already in memory. `budget` is how
/// many more values the caller accepts; a slice larger than that is
/// refused before its pixel data is decoded.
pub fn decode_slice(path: &Path, bytes: &[u8], budget: usize) -> Result<Slice, DataError> {
    let obj = OpenFileOptions::new()
        .from_reader(bytes)
        .map_err(|e| field_error(path, "DICOM file", format!("cannot be parsed: {e}")))?;
    let rows = required_int(&obj, path, "Rows (0028,0010)", tags::ROWS)? as u64;
    let cols = required_int(&obj, path, "Columns (0028,0011)", tags::COLUMNS)? as u64;
    let n = check_dims(path, "Columns × Rows", [cols, rows, 1])?;
    if n > budget {
        return Err(DataError::TooLarge {
            what: format!("{}: {cols}×{rows} slice", path.display()),
            size: n as u64,
            limit: budget as u64,
        });
    }
    let spp = match obj.get(tags::SAMPLES_PER_PIXEL) {
        None => 1,
        Some(_) => required_int(
            &obj,
            path,
            "SamplesPerPixel (0028,0002)",
            tags::SAMPLES_PER_PIXEL,
        )?,
    };
    if spp != 1 {
        return Err(field_error(
            path,
            "SamplesPerPixel (0028,0002)",
            format!("{spp}: only single-sample (grayscale) images are supported"),
        ));
    }
    let photometric = opt_str(&obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    if photometric != "MONOCHROME2" {
        return Err(field_error(
            path,
            "PhotometricInterpretation (0028,0004)",
            format!("{photometric:?}: only MONOCHROME2 is supported"),
        ));
    }
    if let Some(frames) = opt_str(&obj, tags::NUMBER_OF_FRAMES)
        && frames != "1"
    {
        return Err(field_error(
            path,
            "NumberOfFrames (0028,0008)",
            format!("{frames}: only single-frame files (one slice per file) are supported"),
        ));
    }
    let bits = required_int(
        &obj,
        path,
        "BitsAllocated (0028,0100)",
        tags::BITS_ALLOCATED,
    )?;
    if !matches!(bits, 8 | 16 | 32) {
        return Err(field_error(
            path,
            "BitsAllocated (0028,0100)",
            format!("{bits}: only 8, 16 or 32 are supported"),
        ));
    }
    let slope =
        opt_float(&obj, path, "RescaleSlope (0028,1053)", tags::RESCALE_SLOPE)?.unwrap_or(1.0);
    if slope == 0.0 {
        return Err(field_error(
            path,
            "RescaleSlope (0028,1053)",
            "0 would erase the image",
        ));
    }
    let intercept = opt_float(
        &obj,
        path,
        "RescaleIntercept (0028,1052)",
        tags::RESCALE_INTERCEPT,
    )?
    .unwrap_or(0.0);
    let instance = match obj.get(tags::INSTANCE_NUMBER) {
        None => None,
        Some(e) => Some(
            e.to_int::<i64>()
                .map_err(|err| field_error(path, "InstanceNumber (0020,0013)", err))?,
        ),
    };
    let position = normal_position(&obj, path)?;
    let series = opt_str(&obj, tags::SERIES_INSTANCE_UID);

    let decoded = obj.decode_pixel_data().map_err(|e| {
        field_error(
            path,
            "PixelData (7FE0,0010)",
            format!("cannot be decoded: {e}"),
        )
    })?;
    let stored: Vec<f32> = decoded
        .to_vec_with_options(&ConvertOptions::new().with_modality_lut(ModalityLutOption::None))
        .map_err(|e| {
            field_error(
                path,
                "PixelData (7FE0,0010)",
                format!("cannot be converted: {e}"),
            )
        })?;
    if stored.len() != n {
        return Err(field_error(
            path,
            "PixelData (7FE0,0010)",
            format!("{} values decoded, Rows × Columns is {n}", stored.len()),
        ));
    }
    let values = stored
        .into_iter()
        .map(|v| (f64::from(v) * slope + intercept) as f32)
        .collect();
    Ok(Slice {
        size: (cols as usize, rows as usize),
        values,
        series,
        instance,
        position,
    })
}

/// Read a series folder into a volume (slices sorted, see the module docs).
fn read_series(dir: &Path, name: &str, fp: &mut FingerprintBuilder) -> Result<Volume, DataError> {
    let files: Vec<(String, PathBuf)> = super::image::list_dir(dir)?
        .into_iter()
        .filter(|(n, _, is_dir)| !is_dir && !n.starts_with('.') && n != "DICOMDIR")
        .map(|(n, p, _)| (n, p))
        .collect();
    if files.is_empty() {
        return Err(DataError::Empty(format!(
            "{}: no DICOM files",
            dir.display()
        )));
    }
    if files.len() > MAX_SIDE {
        return Err(DataError::TooLarge {
            what: format!("{}: slices", dir.display()),
            size: files.len() as u64,
            limit: MAX_SIDE as u64,
        });
    }
    let mut slices: Vec<(PathBuf, Slice)> = Vec::with_capacity(files.len());
    let mut total = 0usize;
    for (file, path) in files {
        let bytes = read_limited(&path, MAX_FILE_BYTES)?;
        fp.file(&format!("{name}/{file}"), &bytes);
        let s = decode_slice(&path, &bytes, MAX_VALUES - total)?;
        total += s.values.len();
        if let Some((first_path, first)) = slices.first() {
            if s.size != first.size {
                return Err(DataError::ImageSize {
                    path,
                    width: first.size.0 as u32,
                    height: first.size.1 as u32,
                    found_width: s.size.0 as u32,
                    found_height: s.size.1 as u32,
                });
            }
            if let (Some(a), Some(b)) = (&first.series, &s.series)
                && a != b
            {
                return Err(field_error(
                    &path,
                    "SeriesInstanceUID (0020,000E)",
                    format!(
                        "{b} differs from {a} in {}: one series per folder",
                        first_path.display()
                    ),
                ));
            }
        }
        slices.push((path, s));
    }
    sort_slices(dir, &mut slices)?;
    let (nx, ny) = slices[0].1.size;
    let mut values = Vec::with_capacity(total);
    for (_, s) in &slices {
        values.extend_from_slice(&s.values);
    }
    Ok(Volume {
        dims: [nx, ny, slices.len()],
        values,
    })
}

/// Sort by position along the normal, else by instance number.
fn sort_slices(dir: &Path, slices: &mut [(PathBuf, Slice)]) -> Result<(), DataError> {
    if slices.len() < 2 {
        return Ok(());
    }
    let key: fn(&Slice) -> Option<f64> = if slices.iter().all(|(_, s)| s.position.is_some()) {
        |s| s.position
    } else if slices.iter().all(|(_, s)| s.instance.is_some()) {
        |s| s.instance.map(|i| i as f64)
    } else {
        return Err(DataError::Header {
            path: dir.to_path_buf(),
            message: "cannot order the slices: neither ImagePositionPatient + \
                      ImageOrientationPatient nor InstanceNumber is present in every file"
                .to_owned(),
        });
    };
    slices.sort_by(|a, b| {
        key(&a.1)
            .partial_cmp(&key(&b.1))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for w in slices.windows(2) {
        if let (Some(a), Some(b)) = (key(&w[0].1), key(&w[1].1))
            && (a - b).abs() < 1e-6
        {
            return Err(DataError::Header {
                path: w[1].0.clone(),
                message: format!(
                    "same slice position/number ({b}) as {}: two slices of one place",
                    w[0].0.display()
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use dicom_core::{PrimitiveValue, VR};
    use dicom_object::mem::InMemElement;

    use super::super::volume::{Normalize, VolumeConfig, VolumeTask, load_volumes};
    use super::super::{SampleShape, Targets};
    use super::*;

    fn sample(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../data/imaging_samples/dicom")
            .join(name)
    }

    fn decode(name: &str) -> Slice {
        let p = sample(name);
        decode_slice(&p, &std::fs::read(&p).unwrap(), MAX_VALUES).unwrap()
    }

    // Expected values from pydicom 3.0.2 (`ds.pixel_array * RescaleSlope +
    // RescaleIntercept`, numpy [row, column]), run in a venv in /tmp:
    //   CT_small.dcm  128×128, slope 1, intercept -1024, InstanceNumber 1;
    //                 [0, 0..4] = -849 -844 -858 -881, [10, 20] = -839,
    //                 min -896, max 1167, mean -119.0738525390625
    //   MR_small.dcm  64×64, no rescale; [0, 0..4] = 905 1019 1227 1259,
    //                 [10, 20] = 316, min 127, max 2145, mean 518.88134765625
    //   MR_small_RLE.dcm: the same pixels, RLE Lossless (refused: no codec).
    fn check(s: &Slice, w: usize, first: [f32; 4], at_10_20: f32, min: f32, max: f32, mean: f64) {
        assert_eq!(s.values[..4], first);
        assert_eq!(s.values[10 * w + 20], at_10_20);
        let lo = s.values.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = s.values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let m = s.values.iter().map(|&v| f64::from(v)).sum::<f64>() / s.values.len() as f64;
        assert_eq!((lo, hi), (min, max));
        assert!((m - mean).abs() < 1e-9, "{m}");
    }

    #[test]
    fn decodes_the_ct_sample_with_its_rescale() {
        let s = decode("CT_small.dcm");
        assert_eq!(s.size, (128, 128));
        assert_eq!(s.instance, Some(1));
        assert!(s.position.is_some());
        check(
            &s,
            128,
            [-849.0, -844.0, -858.0, -881.0],
            -839.0,
            -896.0,
            1167.0,
            -119.0738525390625,
        );
    }

    #[test]
    fn decodes_the_mr_sample_and_refuses_compressed_pixel_data() {
        let s = decode("MR_small.dcm");
        assert_eq!(s.size, (64, 64));
        check(
            &s,
            64,
            [905.0, 1019.0, 1227.0, 1259.0],
            316.0,
            127.0,
            2145.0,
            518.88134765625,
        );
        let p = sample("MR_small_RLE.dcm");
        let e = decode_slice(&p, &std::fs::read(&p).unwrap(), MAX_VALUES)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MR_small_RLE.dcm") && e.contains("Unsupported TransferSyntax"),
            "{e}"
        );
    }

    /// Write CT_small to `path` with InstanceNumber `n`, the position moved
    /// `n` mm along the normal, and the intercept shifted by `shift`
    /// (so that each slice is recognisable), or the pixels replaced.
    fn write_variant(path: &Path, n: i32, shift: f64, pixels: Option<Vec<u16>>) {
        let mut obj = dicom_object::open_file(sample("CT_small.dcm")).unwrap();
        obj.put(InMemElement::new(
            tags::INSTANCE_NUMBER,
            VR::IS,
            PrimitiveValue::from(n.to_string()),
        ));
        let ori = obj
            .get(tags::IMAGE_ORIENTATION_PATIENT)
            .unwrap()
            .to_multi_float64()
            .unwrap();
        let (r, c) = (&ori[..3], &ori[3..]);
        let normal = [
            r[1] * c[2] - r[2] * c[1],
            r[2] * c[0] - r[0] * c[2],
            r[0] * c[1] - r[1] * c[0],
        ];
        let pos = obj
            .get(tags::IMAGE_POSITION_PATIENT)
            .unwrap()
            .to_multi_float64()
            .unwrap();
        let moved: Vec<String> = (0..3)
            .map(|i| format!("{:.4}", pos[i] + f64::from(n) * normal[i]))
            .collect();
        obj.put(InMemElement::new(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            PrimitiveValue::from(moved.join("\\")),
        ));
        obj.put(InMemElement::new(
            tags::RESCALE_INTERCEPT,
            VR::DS,
            PrimitiveValue::from(format!("{}", -1024.0 + shift)),
        ));
        if let Some(px) = pixels {
            obj.put(InMemElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(px.into()),
            ));
            obj.put(InMemElement::new(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(0u16),
            ));
        }
        obj.write_to_file(path).unwrap();
    }

    #[test]
    fn orders_a_series_and_pairs_it_with_a_mask_series() {
        let dir = tempfile::tempdir().unwrap();
        let (images, masks) = (dir.path().join("images/p1"), dir.path().join("masks/p1"));
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&masks).unwrap();
        // File names deliberately out of slice order.
        for (file, n) in [("b.dcm", 0), ("a.dcm", 2), ("c.dcm", 1)] {
            write_variant(&images.join(file), n, 1000.0 * f64::from(n), None);
            // Mask: class 1 in the top half of slice n ≥ 1, 0 elsewhere.
            let px: Vec<u16> = (0..128 * 128)
                .map(|i| u16::from(n >= 1 && i < 64 * 128))
                .collect();
            write_variant(&masks.join(file), n, 1024.0, Some(px));
        }
        let mut cfg = VolumeConfig::segmentation(dir.path());
        cfg.normalize = Normalize::None;
        cfg.validation_fraction = 0.0;
        let d = load_volumes::<Dicom>(&cfg).unwrap();
        assert_eq!(d.train.len(), 3);
        assert_eq!(
            d.train.shape(),
            SampleShape::Image {
                channels: 1,
                height: 128,
                width: 128
            }
        );
        let x = d.train.features();
        // Slice k is CT_small shifted by 1000 k (pixel [0,0] = -849 HU).
        for k in 0..3 {
            assert_eq!(x[k * 128 * 128], -849.0 + 1000.0 * k as f32, "slice {k}");
        }
        let Targets::Masks(m) = d.train.targets() else {
            panic!("masks expected")
        };
        assert_eq!(m[0], 0);
        assert_eq!(m[128 * 128], 1);
        assert_eq!(m[128 * 128 + 64 * 128], 0);
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), 2 * 64 * 128);

        // Windowed to CT soft tissue [40, 400]: -849 HU → 0.
        cfg.normalize = Normalize::Window;
        cfg.window = Some([40.0, 400.0]);
        let d = load_volumes::<Dicom>(&cfg).unwrap();
        assert_eq!(d.train.features()[0], 0.0);

        // Two slices at one place are refused, naming both files.
        write_variant(&images.join("d.dcm"), 1, 0.0, None);
        let e = load_volumes::<Dicom>(&cfg).unwrap_err().to_string();
        assert!(e.contains("c.dcm") && e.contains("d.dcm"), "{e}");
        // A mask series with a different slice count.
        std::fs::remove_file(images.join("d.dcm")).unwrap();
        std::fs::remove_file(masks.join("a.dcm")).unwrap();
        let e = load_volumes::<Dicom>(&cfg).unwrap_err().to_string();
        assert!(e.contains("mask") && e.contains("[128, 128, 2]"), "{e}");
    }

    #[test]
    fn classification_series_per_class_folder() {
        let dir = tempfile::tempdir().unwrap();
        for (class, series, src) in [
            ("ct", "s1", "CT_small.dcm"),
            ("mr", "s2", "MR_small.dcm"),
            ("mr", "s3", "MR_small.dcm"),
        ] {
            let d = dir.path().join(class).join(series);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(sample(src), d.join("1.dcm")).unwrap();
        }
        let mut cfg = VolumeConfig::segmentation(dir.path());
        cfg.task = VolumeTask::Classification;
        cfg.classes = Some(vec!["mr".into(), "ct".into()]);
        cfg.tile = Some(64);
        cfg.validation_fraction = 0.0;
        let d = load_volumes::<Dicom>(&cfg).unwrap();
        // Read in label order: each MR series 1 tile, label 0; CT 4 tiles of 64×64, label 1.
        assert_eq!(d.train.targets(), &Targets::Classes(vec![0, 0, 1, 1, 1, 1]));
        cfg.tile = None;
        let e = load_volumes::<Dicom>(&cfg).unwrap_err().to_string();
        assert!(e.contains("64×64") || e.contains("128×128"), "{e}");
    }

    #[test]
    fn hostile_or_unsupported_files_give_errors_naming_file_and_field() {
        let good = std::fs::read(sample("CT_small.dcm")).unwrap();
        let p = Path::new("evil.dcm");
        let e = decode_slice(p, b"not dicom at all", MAX_VALUES)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("evil.dcm") && e.contains("cannot be parsed"),
            "{e}"
        );
        let e = decode_slice(p, &good[..good.len() / 2], MAX_VALUES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("evil.dcm"), "{e}");
        // A budget smaller than the slice: refused before decoding.
        let e = decode_slice(p, &good, 100).unwrap_err();
        assert!(matches!(e, DataError::TooLarge { .. }), "{e}");
        // Rows = 65535 (US at a fixed place in the file): the declared size is
        // refused by the bound, not allocated.
        let mut obj = dicom_object::open_file(sample("CT_small.dcm")).unwrap();
        obj.put(InMemElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(65535u16),
        ));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rows.dcm");
        obj.write_to_file(&f).unwrap();
        let e = decode_slice(&f, &std::fs::read(&f).unwrap(), MAX_VALUES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rows.dcm") && e.contains("65535 rows"), "{e}");
        obj.put(InMemElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(128u16),
        ));
        obj.put(InMemElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("RGB"),
        ));
        obj.write_to_file(&f).unwrap();
        let e = decode_slice(&f, &std::fs::read(&f).unwrap(), MAX_VALUES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PhotometricInterpretation"), "{e}");
        obj.put(InMemElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("MONOCHROME2"),
        ));
        obj.put(InMemElement::new(
            tags::RESCALE_SLOPE,
            VR::DS,
            PrimitiveValue::from("0"),
        ));
        obj.write_to_file(&f).unwrap();
        let e = decode_slice(&f, &std::fs::read(&f).unwrap(), MAX_VALUES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("RescaleSlope"), "{e}");
    }
}
