//! NIfTI-1 volumes (`.nii`, `.nii.gz`), read with the `nifti` crate's
//! header parser.
//!
//! * **Files.** Single-file NIfTI-1 (`n+1` magic), plain or gzip-compressed
//!   (detected by content, not by name). Header/image pairs (`.hdr`/`.img`)
//!   and NIfTI-2 are refused with an error saying so.
//! * **Dimensions.** 2-D (one slice) or 3-D; a 4-D file is accepted only
//!   with one time point (`dim[4] = 1`). Each side at most
//!   [`super::volume::MAX_SIDE`], the voxel count at most
//!   [`super::MAX_VALUES`], checked from the header before the volume is
//!   read; the gzip stream is decompressed through a size cap.
//! * **Voxels.** `uint8`, `int8`, `uint16`, `int16`, `uint32`, `int32`,
//!   `int64`, `uint64`, `float32`, `float64`, either byte order; the data
//!   starts at `vox_offset` (352 when the header says less, as nibabel
//!   does), extensions are skipped unread. When `scl_slope` is finite and
//!   non-zero, `value · scl_slope + scl_inter` (the NIfTI rule); otherwise
//!   the stored value. NaN or infinite voxels are an error naming the file.
//! * **Axes.** `i, j, k` of the file are the volume's `x, y, z`; the
//!   affine (qform/sform) is not applied.

use std::io::Read;
use std::path::Path;

use nifti::{Endianness, NiftiHeader, NiftiType};

use super::volume::{Volume, VolumeReader, check_dims};
use super::{DataError, FingerprintBuilder, MAX_FILE_BYTES, read_limited};

/// Largest decompressed `.nii.gz` (header + extensions + voxels): the
/// largest volume ([`super::MAX_VALUES`] voxels of 8 bytes) plus 1 MiB.
pub const MAX_DECOMPRESSED_BYTES: u64 = ((super::MAX_VALUES as u64) * 8) + (1 << 20);

/// Header size of NIfTI-1, and the smallest `vox_offset` of a single file.
const HEADER_BYTES: usize = 348;
const MIN_VOX_OFFSET: usize = 352;

/// Reads NIfTI files.
pub(crate) struct Nifti;

impl VolumeReader for Nifti {
    const KIND: &'static str = "nifti";

    fn is_entry(name: &str, _path: &Path, is_dir: bool) -> bool {
        let n = name.to_ascii_lowercase();
        !is_dir && (n.ends_with(".nii") || n.ends_with(".nii.gz"))
    }

    fn read(path: &Path, name: &str, fp: &mut FingerprintBuilder) -> Result<Volume, DataError> {
        let bytes = read_limited(path, MAX_FILE_BYTES)?;
        fp.file(name, &bytes);
        decode_nifti(path, &bytes)
    }
}

fn header_error(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Header {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Decompress gzip content through a size cap (plain content is returned
/// as it is).
fn maybe_gunzip<'a>(path: &Path, bytes: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, DataError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(MAX_DECOMPRESSED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| header_error(path, format!("gzip stream: {e}")))?;
    if out.len() as u64 > MAX_DECOMPRESSED_BYTES {
        return Err(DataError::TooLarge {
            what: format!("{} decompressed", path.display()),
            size: out.len() as u64,
            limit: MAX_DECOMPRESSED_BYTES,
        });
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Decode a whole NIfTI-1 file (plain or gzip) already in memory.
pub fn decode_nifti(path: &Path, bytes: &[u8]) -> Result<Volume, DataError> {
    let data = maybe_gunzip(path, bytes)?;
    if data.len() < HEADER_BYTES {
        return Err(header_error(
            path,
            format!(
                "{} bytes is shorter than a NIfTI-1 header ({HEADER_BYTES})",
                data.len()
            ),
        ));
    }
    let header = NiftiHeader::from_reader(&data[..HEADER_BYTES])
        .map_err(|e| header_error(path, format!("not a NIfTI-1 header: {e}")))?;
    if &header.magic != nifti::header::MAGIC_CODE_NIP1 {
        return Err(header_error(
            path,
            format!(
                "magic {:?}: only single-file NIfTI-1 (\"n+1\") is supported, not .hdr/.img pairs",
                String::from_utf8_lossy(&header.magic).trim_end_matches('\0')
            ),
        ));
    }
    let rank = header.dim[0];
    if !(2..=4).contains(&rank) {
        return Err(header_error(
            path,
            format!("dim[0] = {rank}: only 2-D and 3-D volumes are supported"),
        ));
    }
    let d = |i: usize| -> u64 {
        if i <= usize::from(rank) {
            u64::from(header.dim[i])
        } else {
            1
        }
    };
    if rank == 4 && d(4) != 1 {
        return Err(header_error(
            path,
            format!(
                "dim[4] = {}: 4-D volumes (time series) are not supported",
                d(4)
            ),
        ));
    }
    let voxels = check_dims(path, "dim[1..=3]", [d(1), d(2), d(3)])?;
    let datatype = header.data_type().map_err(|_| {
        header_error(
            path,
            format!("datatype {} is not a NIfTI type", header.datatype),
        )
    })?;
    let size = match datatype {
        NiftiType::Uint8 | NiftiType::Int8 => 1,
        NiftiType::Uint16 | NiftiType::Int16 => 2,
        NiftiType::Uint32 | NiftiType::Int32 | NiftiType::Float32 => 4,
        NiftiType::Uint64 | NiftiType::Int64 | NiftiType::Float64 => 8,
        other => {
            return Err(header_error(
                path,
                format!(
                    "datatype {other:?} is not supported (scalar integer or float voxels only)"
                ),
            ));
        }
    };
    let offset = if header.vox_offset.is_finite() && header.vox_offset >= 0.0 {
        (header.vox_offset as usize).max(MIN_VOX_OFFSET)
    } else {
        return Err(header_error(
            path,
            format!("vox_offset = {}", header.vox_offset),
        ));
    };
    let needed = voxels * size;
    let available = data.len().saturating_sub(offset);
    if available < needed {
        return Err(header_error(
            path,
            format!(
                "dim {}×{}×{} of {datatype:?} needs {needed} bytes from vox_offset {offset}, the file has {available}",
                d(1),
                d(2),
                d(3)
            ),
        ));
    }
    let raw = &data[offset..offset + needed];
    let big = header.endianness == Endianness::Big;
    let mut values = Vec::with_capacity(voxels);
    values.extend(
        raw.chunks_exact(size)
            .map(|c| decode_voxel(datatype, c, big)),
    );
    let slope = header.scl_slope;
    if slope.is_finite() && slope != 0.0 {
        let inter = if header.scl_inter.is_finite() {
            header.scl_inter
        } else {
            0.0
        };
        for v in &mut values {
            *v = (f64::from(*v) * f64::from(slope) + f64::from(inter)) as f32;
        }
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(header_error(
            path,
            format!("voxel {i} is {} (not finite)", values[i]),
        ));
    }
    Ok(Volume {
        dims: [d(1) as usize, d(2) as usize, d(3) as usize],
        values,
    })
}

/// One voxel as f32 (`c` has exactly the type's size).
fn decode_voxel(t: NiftiType, c: &[u8], big: bool) -> f32 {
    macro_rules! num {
        ($ty:ty) => {{
            let mut b = [0u8; std::mem::size_of::<$ty>()];
            b.copy_from_slice(c);
            if big {
                <$ty>::from_be_bytes(b)
            } else {
                <$ty>::from_le_bytes(b)
            }
        }};
    }
    match t {
        NiftiType::Uint8 => f32::from(c[0]),
        NiftiType::Int8 => f32::from(c[0] as i8),
        NiftiType::Uint16 => f32::from(num!(u16)),
        NiftiType::Int16 => f32::from(num!(i16)),
        NiftiType::Uint32 => num!(u32) as f32,
        NiftiType::Int32 => num!(i32) as f32,
        NiftiType::Uint64 => num!(u64) as f32,
        NiftiType::Int64 => num!(i64) as f32,
        NiftiType::Float32 => num!(f32),
        NiftiType::Float64 => num!(f64) as f32,
        // Refused before decoding.
        _ => f32::NAN,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::PathBuf;

    use super::super::volume::{VolumeConfig, VolumeTask, load_volumes};
    use super::super::{SampleShape, Targets};
    use super::*;

    fn sample(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../data/imaging_samples/nifti")
            .join(name)
    }

    fn read(name: &str) -> Volume {
        let p = sample(name);
        decode_nifti(&p, &std::fs::read(&p).unwrap()).unwrap()
    }

    // Expected values from nibabel 5.4.2 (`nib.load(f).get_fdata()`, numpy
    // indices [i, j, k] = our (x, y, z)), run in a venv in /tmp:
    //   standard.nii.gz  shape (4, 5, 7) uint8, min 0, max 255,
    //                    mean 54.642857142857146, a[1,2,3] = 255
    //   anatomical.nii   shape (33, 41, 25) big-endian int16, min -610,
    //                    max 30393, mean 8401.066725794532,
    //                    a[1,2,3] = 9798, a[3,4,6] = 9214
    fn at(v: &Volume, x: usize, y: usize, z: usize) -> f32 {
        v.values[x + v.dims[0] * (y + v.dims[1] * z)]
    }

    fn stats(v: &Volume) -> (f32, f32, f64) {
        let min = v.values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = v.values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mean = v.values.iter().map(|&x| f64::from(x)).sum::<f64>() / v.values.len() as f64;
        (min, max, mean)
    }

    #[test]
    fn reads_the_gzipped_uint8_sample() {
        let v = read("standard.nii.gz");
        assert_eq!(v.dims, [4, 5, 7]);
        let (min, max, mean) = stats(&v);
        assert_eq!((min, max), (0.0, 255.0));
        assert!((mean - 54.642857142857146).abs() < 1e-9, "{mean}");
        assert_eq!(at(&v, 1, 2, 3), 255.0);
    }

    #[test]
    fn reads_the_big_endian_int16_sample() {
        let v = read("anatomical.nii");
        assert_eq!(v.dims, [33, 41, 25]);
        let (min, max, mean) = stats(&v);
        assert_eq!((min, max), (-610.0, 30393.0));
        assert!((mean - 8401.066725794532).abs() < 1e-6, "{mean}");
        assert_eq!(at(&v, 1, 2, 3), 9798.0);
        assert_eq!(at(&v, 3, 4, 6), 9214.0);
    }

    #[test]
    fn loads_slices_for_segmentation_and_classification() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["images", "masks", "ct/a", "ct/b"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let anat = std::fs::read(sample("anatomical.nii")).unwrap();
        std::fs::write(dir.path().join("images/p1.nii"), &anat).unwrap();
        // A mask: the same file with every voxel set to 1 where the image
        // is above 10000 (big-endian int16 after the 352-byte header).
        let mut mask = anat.clone();
        for c in mask[352..].chunks_exact_mut(2) {
            let v = i16::from_be_bytes([c[0], c[1]]);
            c.copy_from_slice(&i16::from(v > 10_000).to_be_bytes());
        }
        std::fs::write(dir.path().join("masks/p1.nii"), &mask).unwrap();
        let mut cfg = VolumeConfig::segmentation(dir.path());
        cfg.validation_fraction = 0.0;
        let d = load_volumes::<Nifti>(&cfg).unwrap();
        // 25 axial slices of 41 rows × 33 columns.
        assert_eq!(d.train.len(), 25);
        assert_eq!(
            d.train.shape(),
            SampleShape::Image {
                channels: 1,
                height: 41,
                width: 33
            }
        );
        let Targets::Masks(m) = d.train.targets() else {
            panic!("masks expected")
        };
        let x = d.train.features();
        assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
        // Min-max: voxel (1, 2, 3) = 9798 → (9798 + 610) / (30393 + 610).
        let i = 3 * 41 * 33 + 2 * 33 + 1;
        assert!((x[i] - (9798.0 + 610.0) / 31003.0).abs() < 1e-6);
        assert_eq!(m[i], 0);
        let fg = m.iter().filter(|&&v| v == 1).count();
        assert!(fg > 0 && fg < m.len());
        // Sagittal slices, cut into 8×8 tiles: 33 slices of 25 × 41 → 3 × 5 tiles each.
        cfg.axis = super::super::volume::SliceAxis::X;
        cfg.tile = Some(8);
        let d = load_volumes::<Nifti>(&cfg).unwrap();
        assert_eq!(d.train.len(), 33 * 3 * 5);

        // Classification: two classes, one volume each; split by volume.
        std::fs::write(dir.path().join("ct/a/p1.nii"), &anat).unwrap();
        std::fs::copy(sample("standard.nii.gz"), dir.path().join("ct/b/s.nii.gz")).unwrap();
        let mut cls = VolumeConfig::segmentation(dir.path().join("ct"));
        cls.task = VolumeTask::Classification;
        cls.tile = Some(4);
        cls.validation_fraction = 0.5;
        let d = load_volumes::<Nifti>(&cls).unwrap();
        // anatomical: 25 slices × (41/4)·(33/4) = 25·80 tiles; standard: 7 × 1·1.
        assert_eq!(d.train.len() + d.validation.len(), 25 * 80 + 7);
        let sizes = [d.train.len(), d.validation.len()];
        assert!(sizes.contains(&7) && sizes.contains(&2000), "{sizes:?}");
    }

    #[test]
    fn hostile_headers_give_errors_naming_the_file_and_field() {
        let good = std::fs::read(sample("anatomical.nii")).unwrap();
        let p = Path::new("bad.nii");
        type Change = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Change, &str)> = vec![
            // dim[1] (big-endian i16 at byte 42) = 32767 and dim[2], dim[3] large: too many voxels.
            (
                Box::new(|b| {
                    for o in [42, 44, 46] {
                        b[o..o + 2].copy_from_slice(&8000i16.to_be_bytes());
                    }
                }),
                "too large",
            ),
            (
                Box::new(|b| b[42..44].copy_from_slice(&9000i16.to_be_bytes())),
                "9000 columns",
            ),
            (
                Box::new(|b| b[40..42].copy_from_slice(&7i16.to_be_bytes())),
                "dim[0] = 7",
            ),
            (Box::new(|b| b.truncate(1000)), "needs 67650 bytes"),
            (
                Box::new(|b| b[70..72].copy_from_slice(&32i16.to_be_bytes())),
                "Complex64",
            ),
            (
                Box::new(|b| b[70..72].copy_from_slice(&3i16.to_be_bytes())),
                "datatype 3",
            ),
            (Box::new(|b| b[344..348].copy_from_slice(b"ni1\0")), "pairs"),
            (Box::new(|b| b.truncate(100)), "shorter than"),
        ];
        for (change, needle) in cases {
            let mut b = good.clone();
            change(&mut b);
            let e = decode_nifti(p, &b).unwrap_err().to_string();
            assert!(e.contains("bad.nii") && e.contains(needle), "{needle}: {e}");
        }
        // A gzip bomb is cut at the cap rather than inflated without end:
        // here simply a corrupt gzip stream.
        let e = decode_nifti(p, &[0x1f, 0x8b, 8, 0, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gzip"), "{e}");
    }
}
