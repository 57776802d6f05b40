//! Evaluation metrics on host data: accuracy, binary ROC AUC, Dice.
//!
//! All functions return `None` when the metric is undefined (no samples,
//! mismatched lengths, a single class for AUC) instead of a made-up number.

/// Fraction of positions where `predicted == truth`.
pub fn accuracy<T: PartialEq>(predicted: &[T], truth: &[T]) -> Option<f64> {
    if predicted.is_empty() || predicted.len() != truth.len() {
        return None;
    }
    let hits = predicted.iter().zip(truth).filter(|(p, t)| p == t).count();
    Some(hits as f64 / predicted.len() as f64)
}

/// Area under the ROC curve of `scores` for the binary labels `positive`,
/// computed from ranks (Mann–Whitney U): ties get their average rank, so a
/// tie between a positive and a negative counts one half. `None` without at
/// least one positive and one negative, or on a length mismatch or a NaN
/// score.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    if scores.len() != positive.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        let pos_in_group = order[i..=j].iter().filter(|&&k| positive[k]).count();
        rank_sum_pos += avg_rank * pos_in_group as f64;
        i = j + 1;
    }
    let n_pos_f = n_pos as f64;
    let u = rank_sum_pos - n_pos_f * (n_pos_f + 1.0) / 2.0;
    Some(u / (n_pos_f * n_neg as f64))
}

/// Running Dice counts for one class over many pixels (accumulate batch by
/// batch, then read [`DiceCounts::dice`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiceCounts {
    /// Pixels predicted and true.
    pub intersection: u64,
    /// Pixels predicted.
    pub predicted: u64,
    /// Pixels true.
    pub truth: u64,
}

impl DiceCounts {
    /// Add the pixels of `predicted` / `truth` (same length) for `class`.
    /// Extra elements of the longer slice are ignored.
    pub fn add(&mut self, predicted: &[u8], truth: &[u8], class: u8) {
        for (&p, &t) in predicted.iter().zip(truth) {
            let (p, t) = (p == class, t == class);
            self.intersection += u64::from(p && t);
            self.predicted += u64::from(p);
            self.truth += u64::from(t);
        }
    }

    /// `2 |P ∩ T| / (|P| + |T|)`; `None` when the class appears in neither.
    pub fn dice(&self) -> Option<f64> {
        let denom = self.predicted + self.truth;
        (denom > 0).then(|| 2.0 * self.intersection as f64 / denom as f64)
    }
}

/// Dice coefficient of `class` between two label maps of equal length.
pub fn dice(predicted: &[u8], truth: &[u8], class: u8) -> Option<f64> {
    if predicted.len() != truth.len() {
        return None;
    }
    let mut c = DiceCounts::default();
    c.add(predicted, truth, class);
    c.dice()
}

/// Otsu's threshold of an 8-bit image: the grey level `t` that maximises the
/// between-class variance of `{v ≤ t}` and `{v > t}` (Otsu 1979). `None`
/// for an empty image or one with a single grey level (no split exists).
/// Pixels `> t` are the foreground of the classical baseline.
pub fn otsu_threshold(pixels: &[u8]) -> Option<u8> {
    let mut hist = [0u64; 256];
    for &v in pixels {
        hist[usize::from(v)] += 1;
    }
    let total = pixels.len() as f64;
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(v, &n)| v as f64 * n as f64)
        .sum();
    let (mut w0, mut sum0) = (0.0f64, 0.0f64);
    let mut best: Option<(u8, f64)> = None;
    for (t, &n) in hist.iter().enumerate() {
        w0 += n as f64;
        sum0 += t as f64 * n as f64;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let (m0, m1) = (sum0 / w0, (sum_all - sum0) / w1);
        let between = w0 * w1 * (m0 - m1) * (m0 - m1);
        if best.is_none_or(|(_, b)| between > b) {
            best = u8::try_from(t).ok().map(|t| (t, between));
        }
    }
    best.map(|(t, _)| t)
}

/// The Otsu baseline's label map: 1 where the pixel is above
/// [`otsu_threshold`], else 0 (all 0 when no threshold exists).
pub fn otsu_labels(pixels: &[u8]) -> Vec<u8> {
    match otsu_threshold(pixels) {
        Some(t) => pixels.iter().map(|&v| u8::from(v > t)).collect(),
        None => vec![0; pixels.len()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_by_hand() {
        assert_eq!(accuracy(&[1u32, 0, 1, 1], &[1, 1, 1, 0]), Some(0.5));
        assert_eq!(accuracy::<u32>(&[], &[]), None);
        assert_eq!(accuracy(&[1u32], &[1, 2]), None);
    }

    #[test]
    fn auc_by_hand() {
        // Perfect separation.
        assert_eq!(
            roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        // Perfectly wrong.
        assert_eq!(
            roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        // Pairs (pos, neg): positives 0.35, 0.8; negatives 0.1, 0.4.
        // (0.35 > 0.1) yes, (0.35 > 0.4) no, (0.8 > both) yes yes → 3/4.
        assert_eq!(
            roc_auc(&[0.1, 0.35, 0.4, 0.8], &[false, true, false, true]),
            Some(0.75)
        );
        // A tie between a positive and a negative counts 1/2:
        // pos 0.5 vs neg 0.5 → 0.5, pos 0.5 vs neg 0.2 → 1 → (1.5)/2.
        assert_eq!(roc_auc(&[0.5, 0.5, 0.2], &[true, false, false]), Some(0.75));
        // All scores equal → 0.5.
        assert_eq!(roc_auc(&[0.3; 4], &[true, false, true, false]), Some(0.5));
        assert_eq!(roc_auc(&[0.3, 0.4], &[true, true]), None);
        assert_eq!(roc_auc(&[f32::NAN, 0.4], &[true, false]), None);
    }

    #[test]
    fn dice_by_hand() {
        // P = {0,1,2}, T = {1,2,3}: 2·2 / (3+3) = 2/3.
        let p = [1u8, 1, 1, 0, 0];
        let t = [0u8, 1, 1, 1, 0];
        assert!((dice(&p, &t, 1).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // Background class: P = {3,4}, T = {0,4}: 2·1/4.
        assert_eq!(dice(&p, &t, 0), Some(0.5));
        assert_eq!(dice(&[0u8, 0], &[0, 0], 1), None);
        assert_eq!(dice(&[1u8], &[1], 1), Some(1.0));
        // Accumulating two halves equals the whole.
        let mut c = DiceCounts::default();
        c.add(&p[..2], &t[..2], 1);
        c.add(&p[2..], &t[2..], 1);
        assert_eq!(c.dice(), dice(&p, &t, 1));
    }

    #[test]
    fn otsu_by_hand() {
        // Two clusters {10, 12} and {200, 202}: any t in 12..200 separates
        // them with the same variance; the first maximum is kept.
        assert_eq!(otsu_threshold(&[10, 12, 200, 202, 10, 202]), Some(12));
        assert_eq!(otsu_labels(&[10, 12, 200, 202]), vec![0, 0, 1, 1]);
        // Unequal clusters: 3 at 0, 1 at 100, 1 at 110 → split below 100.
        assert_eq!(otsu_threshold(&[0, 0, 0, 100, 110]), Some(0));
        assert_eq!(otsu_threshold(&[]), None);
        assert_eq!(otsu_threshold(&[7, 7, 7]), None);
        assert_eq!(otsu_labels(&[7, 7]), vec![0, 0]);
    }

    /// The classical baseline on the real nuclei image (512×512, stardist /
    /// DSB 2018): Otsu's foreground against the expert mask. Printed for the
    /// demo's table; asserted only to be a working segmentation.
    #[test]
    fn otsu_dice_on_nuclei_image() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/nuclei_dsb2018");
        let image = std::fs::read(dir.join("image_u8.bin")).unwrap();
        let mask = std::fs::read(dir.join("mask_u8.bin")).unwrap();
        assert_eq!(image.len(), 512 * 512);
        assert_eq!(mask.len(), image.len());
        let t = otsu_threshold(&image).unwrap();
        let d = dice(&otsu_labels(&image), &mask, 1).unwrap();
        println!("Otsu on nuclei 512x512: threshold {t}, Dice {d:.4}");
        assert!(d > 0.5 && d <= 1.0, "Otsu Dice {d}");
    }
}
