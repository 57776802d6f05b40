//! Seeded data augmentation of training batches (image and segmentation
//! tasks), as an offer's `training.augmentation` asks.
//!
//! ```text
//!  sample i of a mini-batch: image [c, h, w] (f32), mask [h, w] (class ids)
//!     │ flips (each axis, p = ½)        ── image and mask alike
//!     │ rotate90 (k ∈ 0..4, square)      ── image and mask alike
//!     │ intensity jitter x·a + b         ── image only
//!     ▼ a ~ U(1 − scale, 1 + scale), b ~ U(−shift, shift)
//! ```
//!
//! The random draws come from one ChaCha8 stream per epoch, keyed by the
//! round's training seed (which the coordinator derives from the job seed
//! and the round), the site's stream (from its id) and the epoch: the same
//! round on the same site gives the same batches, bit for bit; another site,
//! round or epoch gives others. Samples take their draws in batch order.
//! Evaluation data is never augmented. Values are not clamped after the
//! jitter (the half-ranges are bounded by the offer instead).

use fedlink_protocol::Augmentation;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Augments the samples of one epoch (see the module docs).
#[derive(Clone, Debug)]
pub struct Augmenter {
    aug: Augmentation,
    rng: ChaCha8Rng,
    scratch: Vec<f32>,
    scratch_mask: Vec<u8>,
}

/// The augmentation stream of a site: a stable 64-bit FNV-1a hash of its id.
pub fn site_stream(site: &str) -> u64 {
    site.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Augmenter {
    /// The augmenter of `epoch` (0-based) of a round trained with `seed` on
    /// the site whose stream is `stream` ([`site_stream`]).
    pub fn new(aug: Augmentation, seed: u64, stream: u64, epoch: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&stream.to_le_bytes());
        key[16..24].copy_from_slice(&epoch.to_le_bytes());
        key[24..].copy_from_slice(b"augment1");
        Self {
            aug,
            rng: ChaCha8Rng::from_seed(key),
            scratch: Vec::new(),
            scratch_mask: Vec::new(),
        }
    }

    /// Augment one sample in place: `image` is `channels × height × width`
    /// (row-major), `mask` (if any) `height × width`. Rotations other than
    /// 0° need a square sample and are skipped otherwise. Slices of the
    /// wrong length are left as they are.
    pub fn apply(
        &mut self,
        image: &mut [f32],
        mask: Option<&mut [u8]>,
        channels: usize,
        height: usize,
        width: usize,
    ) {
        let px = height * width;
        if image.len() != channels * px || mask.as_ref().is_some_and(|m| m.len() != px) {
            return;
        }
        let (flip_h, flip_v) = if self.aug.flips {
            (self.rng.gen_bool(0.5), self.rng.gen_bool(0.5))
        } else {
            (false, false)
        };
        let quarter_turns = if self.aug.rotate90 {
            self.rng.gen_range(0..4u8)
        } else {
            0
        };
        let quarter_turns = if height == width { quarter_turns } else { 0 };
        let jitter = self.aug.intensity_jitter.map(|j| {
            let a = 1.0 + uniform(&mut self.rng, j.scale);
            let b = uniform(&mut self.rng, j.shift);
            (a as f32, b as f32)
        });
        if flip_h || flip_v || quarter_turns > 0 {
            for plane in image.chunks_exact_mut(px) {
                transform(
                    plane,
                    &mut self.scratch,
                    height,
                    width,
                    flip_h,
                    flip_v,
                    quarter_turns,
                );
            }
            if let Some(m) = mask {
                transform(
                    m,
                    &mut self.scratch_mask,
                    height,
                    width,
                    flip_h,
                    flip_v,
                    quarter_turns,
                );
            }
        }
        if let Some((a, b)) = jitter {
            for x in image.iter_mut() {
                *x = *x * a + b;
            }
        }
    }
}

/// Uniform in `[-half, half]` (0 for a zero half-range).
fn uniform(rng: &mut ChaCha8Rng, half: f64) -> f64 {
    if half > 0.0 {
        rng.gen_range(-half..=half)
    } else {
        0.0
    }
}

/// Flip `plane` (`height × width`) horizontally and/or vertically, then
/// rotate it by `quarter_turns` × 90° counter-clockwise (square only).
fn transform<T: Copy>(
    plane: &mut [T],
    scratch: &mut Vec<T>,
    height: usize,
    width: usize,
    flip_h: bool,
    flip_v: bool,
    quarter_turns: u8,
) {
    if flip_h {
        for row in plane.chunks_exact_mut(width) {
            row.reverse();
        }
    }
    if flip_v {
        for y in 0..height / 2 {
            let (top, bottom) = plane.split_at_mut((height - 1 - y) * width);
            top[y * width..(y + 1) * width].swap_with_slice(&mut bottom[..width]);
        }
    }
    if !quarter_turns.is_multiple_of(4) && height == width {
        let n = width;
        for _ in 0..quarter_turns % 4 {
            scratch.clear();
            scratch.extend_from_slice(plane);
            // counter-clockwise: out[y][x] = in[x][n − 1 − y]
            for y in 0..n {
                for x in 0..n {
                    plane[y * n + x] = scratch[x * n + (n - 1 - y)];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use fedlink_protocol::IntensityJitter;

    use super::*;

    const N: usize = 16;

    fn all() -> Augmentation {
        Augmentation {
            flips: true,
            rotate90: true,
            intensity_jitter: Some(IntensityJitter {
                scale: 0.2,
                shift: 0.1,
            }),
        }
    }

    /// A batch of `b` images with a structure that no transform leaves
    /// unchanged (distinct values), and masks = image > 0.5.
    fn batch(b: usize) -> (Vec<f32>, Vec<u8>) {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let img: Vec<f32> = (0..b * N * N).map(|_| rng.gen_range(0.0..1.0)).collect();
        let mask = img.iter().map(|&x| u8::from(x > 0.5)).collect();
        (img, mask)
    }

    fn run(aug: Augmentation, seed: u64, stream: u64, epoch: u64) -> (Vec<f32>, Vec<u8>) {
        let (mut img, mut mask) = batch(8);
        let mut a = Augmenter::new(aug, seed, stream, epoch);
        for (x, m) in img
            .chunks_exact_mut(N * N)
            .zip(mask.chunks_exact_mut(N * N))
        {
            a.apply(x, Some(m), 1, N, N);
        }
        (img, mask)
    }

    #[test]
    fn same_seed_gives_identical_batches_another_seed_others() {
        let a = run(all(), 7, site_stream("site-a"), 0);
        assert_eq!(a, run(all(), 7, site_stream("site-a"), 0));
        assert_ne!(a.0, batch(8).0, "augmentation changed nothing");
        for other in [
            run(all(), 8, site_stream("site-a"), 0),
            run(all(), 7, site_stream("site-b"), 0),
            run(all(), 7, site_stream("site-a"), 1),
        ] {
            assert_ne!(a.0, other.0);
        }
    }

    /// The mask is the image thresholded at 0.5 before augmentation; after
    /// it, it is still the image thresholded (at 0.5·a + b, the jitter being
    /// monotone): every masked pixel is brighter than every unmasked one of
    /// the same sample. Misaligned geometry would break this at once.
    #[test]
    fn image_and_mask_stay_aligned() {
        let (img, mask) = run(all(), 3, 1, 0);
        let (orig_img, orig_mask) = batch(8);
        for ((x, m), (ox, om)) in img.chunks_exact(N * N).zip(mask.chunks_exact(N * N)).zip(
            orig_img
                .chunks_exact(N * N)
                .zip(orig_mask.chunks_exact(N * N)),
        ) {
            let lo_in = x
                .iter()
                .zip(m)
                .filter(|(_, m)| **m == 1)
                .map(|(x, _)| *x)
                .fold(f32::INFINITY, f32::min);
            let hi_out = x
                .iter()
                .zip(m)
                .filter(|(_, m)| **m == 0)
                .map(|(x, _)| *x)
                .fold(f32::NEG_INFINITY, f32::max);
            assert!(hi_out < lo_in, "mask no longer a threshold of the image");
            // the mask is a permutation of the original one (geometry only)
            assert_eq!(
                m.iter().filter(|v| **v == 1).count(),
                om.iter().filter(|v| **v == 1).count()
            );
            assert_eq!(x.len(), ox.len());
        }
    }

    #[test]
    fn geometry_without_jitter_permutes_the_pixels_and_jitter_alone_keeps_them_in_place() {
        let geo = Augmentation {
            intensity_jitter: None,
            ..all()
        };
        let (img, _) = run(geo, 5, 0, 0);
        let (orig, _) = batch(8);
        let mut changed = 0;
        for (x, o) in img.chunks_exact(N * N).zip(orig.chunks_exact(N * N)) {
            let mut a = x.to_vec();
            let mut b = o.to_vec();
            a.sort_by(f32::total_cmp);
            b.sort_by(f32::total_cmp);
            assert_eq!(a, b, "geometry must only move pixels");
            changed += usize::from(x != o);
        }
        assert!(changed >= 4, "only {changed} of 8 samples moved");

        let jitter = Augmentation {
            flips: false,
            rotate90: false,
            ..all()
        };
        let (img, mask) = run(jitter, 5, 0, 0);
        assert_eq!(mask, batch(8).1, "jitter must not touch the mask");
        for (x, o) in img.chunks_exact(N * N).zip(orig.chunks_exact(N * N)) {
            // x = o·a + b with a in [0.8, 1.2], b in [-0.1, 0.1]
            let a = (x[1] - x[0]) / (o[1] - o[0]);
            let b = x[0] - o[0] * a;
            assert!((0.8 - 1e-3..=1.2 + 1e-3).contains(&a), "a = {a}");
            assert!((-0.1 - 1e-3..=0.1 + 1e-3).contains(&b), "b = {b}");
            for (xi, oi) in x.iter().zip(o) {
                assert!((xi - (oi * a + b)).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn transforms_are_the_expected_permutations() {
        // 2×2: [1 2; 3 4]
        let mut s = Vec::new();
        let mut p = [1, 2, 3, 4];
        transform(&mut p, &mut s, 2, 2, true, false, 0);
        assert_eq!(p, [2, 1, 4, 3]);
        let mut p = [1, 2, 3, 4];
        transform(&mut p, &mut s, 2, 2, false, true, 0);
        assert_eq!(p, [3, 4, 1, 2]);
        let mut p = [1, 2, 3, 4];
        transform(&mut p, &mut s, 2, 2, false, false, 1);
        assert_eq!(p, [2, 4, 1, 3], "90° counter-clockwise");
        let mut p = [1, 2, 3, 4];
        transform(&mut p, &mut s, 2, 2, false, false, 4);
        assert_eq!(p, [1, 2, 3, 4]);
        // odd height: the middle row stays
        let mut p = [1, 2, 3, 4, 5, 6];
        transform(&mut p, &mut s, 3, 2, false, true, 0);
        assert_eq!(p, [5, 6, 3, 4, 1, 2]);
        // a non-square sample is not rotated
        let mut p = [1, 2, 3, 4, 5, 6];
        transform(&mut p, &mut s, 3, 2, false, false, 1);
        assert_eq!(p, [1, 2, 3, 4, 5, 6]);
    }
}
