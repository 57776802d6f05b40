use std::path::PathBuf;

use burn::prelude::Device;
use fedlink_protocol::arch::ArchSpec;

use super::*;
use crate::data::tabular::{TabularConfig, load_tabular};
use crate::data::{SampleShape, Samples, Targets};

fn repo_data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(rel)
}

fn wdbc() -> crate::data::tabular::TabularData {
    let mut cfg = TabularConfig::new(repo_data("breast_cancer_wisconsin/wdbc.csv"), "malignant");
    cfg.validation_fraction = 0.3;
    cfg.split_seed = 1;
    load_tabular(&cfg).unwrap()
}

fn logreg() -> ArchSpec {
    ArchSpec::LogReg {
        inputs: 30,
        classes: 2,
    }
}

/// Two Gaussian blobs in 4 dimensions.
fn blobs(n: usize, seed: u64) -> Samples {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in 0..n {
        let c = (i % 2) as u32;
        for _ in 0..4 {
            let noise: f32 = rand::Rng::gen_range(&mut rng, -1.0..1.0);
            x.push(noise + if c == 1 { 1.0 } else { -1.0 });
        }
        y.push(c);
    }
    Samples::new(SampleShape::Features(4), x, Targets::Classes(y)).unwrap()
}

#[test]
fn central_logistic_regression_on_wdbc_is_accurate() {
    let data = wdbc();
    let arch = logreg();
    let global = arch.init(0).unwrap();
    let device = Device::flex();
    let before = evaluate(&arch, &global, &data.data.validation, &device).unwrap();
    let cfg = TrainConfig::new()
        .with_epochs(30)
        .with_batch_size(16)
        .with_learning_rate(0.05)
        .with_seed(3);
    let (local, report) = train_local(&arch, &global, &data.data.train, &cfg, &device).unwrap();
    let after = evaluate(&arch, &local, &data.data.validation, &device).unwrap();
    eprintln!(
        "WDBC logreg: held-out n={} accuracy {:.4} auc {:.4} loss {:.4} (before: acc {:.4}); train loss {:.4} → {:.4}; {:?}",
        after.n,
        after.accuracy,
        after.auc.unwrap_or(f64::NAN),
        after.loss,
        before.accuracy,
        report.epoch_loss[0],
        report.epoch_loss[report.epoch_loss.len() - 1],
        report.duration
    );
    assert_eq!(report.samples, data.data.train.len());
    assert_eq!(report.epoch_loss.len(), 30);
    assert_eq!(report.steps, 30 * data.data.train.len().div_ceil(16));
    assert!(report.epoch_loss[29] < report.epoch_loss[0]);
    assert!(after.accuracy >= 0.96, "accuracy {}", after.accuracy);
    assert!(after.auc.unwrap() > 0.98);
    assert_eq!(after.n, data.data.validation.len());
}

#[test]
fn training_is_deterministic_on_cpu() {
    let data = blobs(64, 1);
    let arch = ArchSpec::Mlp {
        inputs: 4,
        hidden: vec![8],
        classes: 2,
    };
    let global = arch.init(5).unwrap();
    let device = Device::flex();
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adam] {
        let cfg = TrainConfig::new()
            .with_epochs(3)
            .with_batch_size(8)
            .with_optimizer(optimizer)
            .with_learning_rate(0.01)
            .with_seed(9);
        let (a, ra) = train_local(&arch, &global, &data, &cfg, &device).unwrap();
        let (b, rb) = train_local(&arch, &global, &data, &cfg, &device).unwrap();
        assert_eq!(a.hash(), b.hash(), "{optimizer:?}");
        assert_eq!(ra.epoch_loss, rb.epoch_loss);
        assert_ne!(a.hash(), global.hash());
        let (c, _) =
            train_local(&arch, &global, &data, &cfg.clone().with_seed(10), &device).unwrap();
        assert_ne!(a.hash(), c.hash(), "the seed changes the batch order");
        let m = evaluate(&arch, &a, &data, &device).unwrap();
        assert!(m.accuracy > 0.9, "{optimizer:?}: {m:?}");
    }
}

#[test]
fn burn_trainer_gives_the_models_and_metrics_of_the_functions() {
    let data = blobs(48, 4);
    let validation = blobs(16, 5);
    let arch = ArchSpec::Mlp {
        inputs: 4,
        hidden: vec![8],
        classes: 2,
    };
    let global = arch.init(6).unwrap();
    let device = Device::flex();
    let trainer = BurnTrainer::new(device.clone());
    let cfg = TrainConfig::new()
        .with_epochs(2)
        .with_batch_size(8)
        .with_learning_rate(0.05)
        .with_seed(11);
    let (direct, direct_report) = train_local(&arch, &global, &data, &cfg, &device).unwrap();
    let (via, via_report) = Trainer::train_local(&trainer, &arch, &global, &data, &cfg).unwrap();
    assert_ne!(direct.hash(), global.hash());
    assert_eq!(via.spec(), direct.spec());
    let bits = |m: &FlatModel| m.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&via), bits(&direct), "bit-identical weights");
    assert_eq!(via_report.epoch_loss, direct_report.epoch_loss);
    assert_eq!(via_report.steps, direct_report.steps);
    assert_eq!(via_report.samples, direct_report.samples);
    let direct_eval = evaluate(&arch, &direct, &validation, &device).unwrap();
    let via_eval = Trainer::evaluate(&trainer, &arch, &direct, &validation).unwrap();
    assert_eq!(via_eval, direct_eval);
}

#[test]
fn adamw_decay_shrinks_each_parameter_by_lr_times_decay() {
    // One full-batch step: AdamW(λ) takes the same Adam step as AdamW(0)
    // from a parameter first scaled by 1 − lr·λ, so the two results differ
    // by exactly −lr·λ·w0 in every parameter (biases included).
    let data = blobs(32, 3);
    let arch = ArchSpec::Mlp {
        inputs: 4,
        hidden: vec![8],
        classes: 2,
    };
    let global = arch.init(6).unwrap();
    let device = Device::flex();
    let (lr, decay) = (0.05, 0.8);
    let one_step = |weight_decay| {
        let cfg = TrainConfig::new()
            .with_epochs(1)
            .with_batch_size(32)
            .with_optimizer(OptimizerKind::AdamW { weight_decay })
            .with_learning_rate(lr)
            .with_seed(1);
        let (m, r) = train_local(&arch, &global, &data, &cfg, &device).unwrap();
        assert_eq!(r.steps, 1);
        m
    };
    let plain = one_step(0.0);
    let decayed = one_step(decay);
    for ((&d, &p), &w0) in decayed
        .values()
        .iter()
        .zip(plain.values())
        .zip(global.values())
    {
        let expected = -(lr * decay) as f32 * w0;
        assert!(
            (d - p - expected).abs() <= 1e-6 + 1e-5 * expected.abs(),
            "w0 {w0}: decayed {d} plain {p} (difference {}, expected {expected})",
            d - p
        );
    }
    assert_ne!(decayed.hash(), plain.hash());
    // Over many steps the decay keeps the weights smaller; with λ = 0
    // AdamW takes Adam's steps (burn places ε slightly differently).
    let run = |optimizer| {
        let cfg = TrainConfig::new()
            .with_epochs(20)
            .with_batch_size(8)
            .with_optimizer(optimizer)
            .with_learning_rate(lr)
            .with_seed(2);
        train_local(&arch, &global, &data, &cfg, &device).unwrap().0
    };
    let norm = |m: &FlatModel| {
        m.values()
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
    };
    let adam = run(OptimizerKind::Adam);
    let adamw0 = run(OptimizerKind::AdamW { weight_decay: 0.0 });
    let adamw = run(OptimizerKind::AdamW { weight_decay: 0.8 });
    assert!(
        distance(&adam, &adamw0) < 1e-3,
        "{}",
        distance(&adam, &adamw0)
    );
    assert!(
        norm(&adamw) < 0.9 * norm(&adam),
        "{} vs {}",
        norm(&adamw),
        norm(&adam)
    );
}

#[test]
fn sgd_momentum_takes_plain_steps_first_then_accumulates() {
    let data = blobs(32, 4);
    let arch = logreg_4();
    let global = arch.init(2).unwrap();
    let device = Device::flex();
    let run = |optimizer, epochs| {
        let cfg = TrainConfig::new()
            .with_epochs(epochs)
            .with_batch_size(32)
            .with_optimizer(optimizer)
            .with_learning_rate(0.1)
            .with_seed(1);
        train_local(&arch, &global, &data, &cfg, &device).unwrap().0
    };
    let momentum = OptimizerKind::SgdMomentum { momentum: 0.9 };
    // the velocity starts at the first gradient: step 1 is plain SGD
    assert_eq!(run(momentum, 1).hash(), run(OptimizerKind::Sgd, 1).hash());
    // later steps add 0.9 × the previous velocity: they go further
    let plain = run(OptimizerKind::Sgd, 5);
    let heavy = run(momentum, 5);
    assert!(distance(&heavy, &global) > distance(&plain, &global) * 1.5);
}

#[test]
fn optimizer_parameters_are_validated() {
    let bad = |optimizer, lr| {
        TrainConfig::new()
            .with_optimizer(optimizer)
            .with_learning_rate(lr)
            .validate()
            .unwrap_err()
            .to_string()
    };
    assert!(bad(OptimizerKind::AdamW { weight_decay: -0.1 }, 0.01).contains("weight_decay"));
    assert!(
        bad(
            OptimizerKind::AdamW {
                weight_decay: f64::NAN
            },
            0.01
        )
        .contains("weight_decay")
    );
    assert!(bad(OptimizerKind::AdamW { weight_decay: 15.0 }, 0.01).contains("weight_decay"));
    assert!(bad(OptimizerKind::AdamW { weight_decay: 0.5 }, 2.0).contains("below 1"));
    assert!(bad(OptimizerKind::SgdMomentum { momentum: 1.0 }, 0.01).contains("momentum"));
    assert!(bad(OptimizerKind::SgdMomentum { momentum: -0.1 }, 0.01).contains("momentum"));
    // the serialized names of the old variants did not change
    for (k, json) in [
        (OptimizerKind::Sgd, r#""sgd""#),
        (OptimizerKind::Adam, r#""adam""#),
        (
            OptimizerKind::AdamW { weight_decay: 0.1 },
            r#"{"adamw":{"weight_decay":0.1}}"#,
        ),
        (
            OptimizerKind::SgdMomentum { momentum: 0.9 },
            r#"{"sgdmomentum":{"momentum":0.9}}"#,
        ),
    ] {
        assert_eq!(serde_json::to_string(&k).unwrap(), json);
        assert_eq!(serde_json::from_str::<OptimizerKind>(json).unwrap(), k);
    }
}

fn logreg_4() -> ArchSpec {
    ArchSpec::LogReg {
        inputs: 4,
        classes: 2,
    }
}

fn distance(a: &FlatModel, b: &FlatModel) -> f64 {
    a.values()
        .iter()
        .zip(b.values())
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn fedprox_term_pulls_towards_the_global_model() {
    let data = blobs(64, 2);
    let arch = ArchSpec::LogReg {
        inputs: 4,
        classes: 2,
    };
    let global = arch.init(1).unwrap();
    let device = Device::flex();
    let cfg = TrainConfig::new()
        .with_epochs(5)
        .with_batch_size(8)
        .with_learning_rate(0.1);
    let (plain, plain_report) = train_local(&arch, &global, &data, &cfg, &device).unwrap();
    let (prox, prox_report) = train_local(
        &arch,
        &global,
        &data,
        &cfg.clone().with_fedprox_mu(1.0),
        &device,
    )
    .unwrap();
    assert_ne!(plain.hash(), prox.hash());
    let (d_plain, d_prox) = (distance(&plain, &global), distance(&prox, &global));
    eprintln!("distance to global: mu=0 {d_plain:.4}, mu=1 {d_prox:.4}");
    assert!(d_prox < d_plain * 0.9, "{d_prox} vs {d_plain}");
    // The first batch sees the same weights, so the first epoch losses are close.
    assert!((plain_report.epoch_loss[0] - prox_report.epoch_loss[0]).abs() < 0.2);
}

#[test]
fn incompatible_inputs_are_refused() {
    let data = blobs(8, 3);
    let arch = logreg();
    let device = Device::flex();
    let global = arch.init(0).unwrap();
    let cfg = TrainConfig::new();
    assert!(matches!(
        train_local(&arch, &global, &data, &cfg, &device),
        Err(TrainError::DataMismatch { .. })
    ));
    let arch4 = ArchSpec::LogReg {
        inputs: 4,
        classes: 2,
    };
    assert!(matches!(
        train_local(&arch4, &global, &data, &cfg, &device),
        Err(TrainError::Weights(WeightsError::SpecMismatch { .. }))
    ));
    let three = Samples::new(
        SampleShape::Features(4),
        vec![0.0; 8],
        Targets::Classes(vec![0, 2]),
    )
    .unwrap();
    let g4 = arch4.init(0).unwrap();
    assert!(matches!(
        train_local(&arch4, &g4, &three, &cfg, &device),
        Err(TrainError::DataMismatch { .. })
    ));
    for bad in [
        cfg.clone().with_epochs(0),
        cfg.clone().with_batch_size(0),
        cfg.clone().with_learning_rate(f64::NAN),
        cfg.clone().with_learning_rate(-1.0),
        cfg.clone().with_fedprox_mu(-0.5),
    ] {
        assert!(matches!(
            train_local(&arch4, &g4, &data, &bad, &device),
            Err(TrainError::Config(_))
        ));
    }
}

#[test]
fn train_config_reads_from_toml_and_json() {
    let cfg: TrainConfig = toml::from_str(
        "epochs = 2\nbatch_size = 8\noptimizer = \"adam\"\nlearning_rate = 0.001\nfedprox_mu = 0.01\nseed = 4\n",
    )
    .unwrap();
    assert_eq!(cfg.optimizer, OptimizerKind::Adam);
    assert_eq!(cfg.epochs, 2);
    let json = serde_json::to_string(&cfg).unwrap();
    let back: TrainConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    // The architecture uses the `kind` tag in TOML.
    #[derive(serde::Deserialize)]
    struct Job {
        arch: ArchSpec,
    }
    let job: Job =
        toml::from_str("[arch]\nkind = \"mlp\"\ninputs = 30\nhidden = [16]\nclasses = 2\n")
            .unwrap();
    assert_eq!(
        job.arch,
        ArchSpec::Mlp {
            inputs: 30,
            hidden: vec![16],
            classes: 2
        }
    );
    assert!(toml::from_str::<Job>("[arch]\nkind = \"transformer\"\n").is_err());
}

/// Bars: class 0 horizontal, class 1 vertical, at a random position, with noise.
fn bar_images(dir: &std::path::Path, per_class: usize, side: u32, seed: u64) {
    use crate::data::image::write_png;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (class, name) in ["horizontal", "vertical"].iter().enumerate() {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let s = side as usize;
            let mut px: Vec<u8> = (0..s * s)
                .map(|_| rand::Rng::gen_range(&mut rng, 0..60u8))
                .collect();
            let at = rand::Rng::gen_range(&mut rng, 2..s - 2);
            for k in 0..s {
                let (x, y) = if class == 0 { (k, at) } else { (at, k) };
                px[y * s + x] = 220;
            }
            write_png(&d.join(format!("{i:03}.png")), side, side, 1, &px).unwrap();
        }
    }
}

#[test]
fn cnn_learns_a_generated_png_folder() {
    use crate::data::image::{ImageFolderConfig, load_image_folder};
    let dir = tempfile::tempdir().unwrap();
    bar_images(dir.path(), 40, 16, 11);
    let mut cfg = ImageFolderConfig::new(dir.path(), 16, 16);
    cfg.classes = Some(vec!["horizontal".into(), "vertical".into()]);
    cfg.validation_fraction = 0.25;
    cfg.split_seed = 2;
    let data = load_image_folder(&cfg).unwrap().data;
    let arch = ArchSpec::Cnn {
        in_channels: 1,
        height: 16,
        width: 16,
        classes: 2,
    };
    let global = arch.init(3).unwrap();
    let device = Device::flex();
    let train_cfg = TrainConfig::new()
        .with_epochs(6)
        .with_batch_size(8)
        .with_optimizer(OptimizerKind::Adam)
        .with_learning_rate(0.003)
        .with_seed(1);
    let (local, report) = train_local(&arch, &global, &data.train, &train_cfg, &device).unwrap();
    let m = evaluate(&arch, &local, &data.validation, &device).unwrap();
    eprintln!(
        "CNN bars: validation n={} accuracy {:.3} auc {:.3}; loss {:?}; {:?}",
        m.n,
        m.accuracy,
        m.auc.unwrap_or(f64::NAN),
        report.epoch_loss,
        report.duration
    );
    assert_eq!(m.n, 20);
    assert!(m.accuracy >= 0.8, "{m:?}");
}

#[test]
fn unet_improves_dice_on_nuclei_tiles() {
    use crate::data::segmentation::{SegmentationConfig, SegmentationSource, load_segmentation};
    let mut cfg = SegmentationConfig::new(SegmentationSource::RawU8 {
        dir: repo_data("nuclei_dsb2018"),
    });
    cfg.tile = 32;
    cfg.validation_fraction = 0.0;
    let all = load_segmentation(&cfg).unwrap().train;
    // 24 tiles spread over the image keep the test to a few seconds.
    let idx: Vec<usize> = (0..all.len()).step_by(all.len() / 24).take(24).collect();
    let tiles = all.subset(&idx);
    let arch = ArchSpec::UNet {
        in_channels: 1,
        base_channels: 8,
        depth: 2,
        classes: 2,
    };
    let global = arch.init(4).unwrap();
    let device = Device::flex();
    let before = evaluate(&arch, &global, &tiles, &device).unwrap();
    let train_cfg = TrainConfig::new()
        .with_epochs(8)
        .with_batch_size(8)
        .with_optimizer(OptimizerKind::Adam)
        .with_learning_rate(0.01)
        .with_seed(2);
    let (local, report) = train_local(&arch, &global, &tiles, &train_cfg, &device).unwrap();
    let after = evaluate(&arch, &local, &tiles, &device).unwrap();
    eprintln!(
        "U-Net nuclei ({} tiles 32×32): dice {:.3} → {:.3}, pixel acc {:.3} → {:.3}; loss {:?}; {:?}",
        tiles.len(),
        before.dice.unwrap_or(0.0),
        after.dice.unwrap_or(0.0),
        before.accuracy,
        after.accuracy,
        report.epoch_loss,
        report.duration
    );
    assert!(after.dice.unwrap() > before.dice.unwrap_or(0.0) + 0.1);
    assert!(after.dice.unwrap() > 0.6);
    assert!(report.epoch_loss[7] < report.epoch_loss[0]);
}

#[test]
fn committed_demo_splits_load_and_train() {
    use crate::data::tabular::load_tabular_test;
    let device = Device::flex();
    let cfg = TrainConfig::new()
        .with_epochs(20)
        .with_batch_size(16)
        .with_learning_rate(0.05);
    // WDBC: each skewed hospital alone, scored on the global test set.
    let arch = logreg();
    let global = arch.init(0).unwrap();
    for site in ["hospital_a", "hospital_b", "hospital_c"] {
        let mut c = TabularConfig::new(
            repo_data(&format!("breast_cancer_wisconsin/splits/{site}.csv")),
            "malignant",
        );
        c.validation_fraction = 0.0;
        let d = load_tabular(&c).unwrap();
        let test_cfg = TabularConfig::new(
            repo_data("breast_cancer_wisconsin/splits/global_test.csv"),
            "malignant",
        );
        let test = load_tabular_test(&test_cfg, &d.scaling).unwrap();
        let (local, _) = train_local(&arch, &global, &d.data.train, &cfg, &device).unwrap();
        let m = evaluate(&arch, &local, &test, &device).unwrap();
        eprintln!(
            "WDBC {site} alone (n={}): global test n={} accuracy {:.3} auc {:.3}",
            d.data.train.len(),
            m.n,
            m.accuracy,
            m.auc.unwrap_or(f64::NAN)
        );
        assert_eq!(m.n, 113);
        assert!(m.accuracy > 0.85, "{site}: {m:?}");
    }
    // OPT: every real hospital loads with identifiers and the leaked outcome dropped.
    let arch = ArchSpec::LogReg {
        inputs: 30,
        classes: 2,
    };
    let global = arch.init(0).unwrap();
    for site in ["KY", "MN", "MS", "NY"] {
        let mut c = TabularConfig::new(
            repo_data(&format!("opt_preterm_4hospitals/splits/{site}/train.csv")),
            "preterm",
        );
        c.drop_columns = vec!["site".into(), "pid".into(), "gestational_age_days".into()];
        c.validation_fraction = 0.0;
        let d = load_tabular(&c).unwrap();
        let mut t = c.clone();
        t.path = repo_data(&format!("opt_preterm_4hospitals/splits/{site}/test.csv"));
        let test = load_tabular_test(&t, &d.scaling).unwrap();
        let (local, _) = train_local(&arch, &global, &d.data.train, &cfg, &device).unwrap();
        let m = evaluate(&arch, &local, &test, &device).unwrap();
        eprintln!(
            "OPT {site} alone (n={}): local test n={} accuracy {:.3} auc {:.3}",
            d.data.train.len(),
            m.n,
            m.accuracy,
            m.auc.unwrap_or(f64::NAN)
        );
        assert!(m.auc.is_some());
    }
}

/// 3:1 imbalanced blobs in 4 dimensions (class 1 every fourth sample),
/// and the subsets of each class.
fn imbalanced(n: usize, seed: u64) -> (Samples, Samples, Samples) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut per: [(Vec<f32>, Vec<u32>); 2] = Default::default();
    for i in 0..n {
        let c = u32::from(i % 4 == 3);
        let row: Vec<f32> = (0..4)
            .map(|_| rand::Rng::gen_range(&mut rng, -1.0f32..1.0) + if c == 1 { 0.5 } else { -0.5 })
            .collect();
        x.extend_from_slice(&row);
        y.push(c);
        per[c as usize].0.extend_from_slice(&row);
        per[c as usize].1.push(c);
    }
    let s = |x: Vec<f32>, y: Vec<u32>| {
        Samples::new(SampleShape::Features(4), x, Targets::Classes(y)).unwrap()
    };
    let [(x0, y0), (x1, y1)] = per;
    (s(x, y), s(x0, y0), s(x1, y1))
}

#[test]
fn balanced_class_weights_follow_the_local_label_counts() {
    let (all, _, _) = imbalanced(40, 1);
    assert_eq!(class_weights(ClassWeighting::None, &all, 2), None);
    // 30 negatives, 10 positives: n / (K · n_c).
    let w = class_weights(ClassWeighting::Balanced, &all, 2).unwrap();
    assert!((w[0] - 40.0 / 60.0).abs() < 1e-6, "{w:?}");
    assert!((w[1] - 2.0).abs() < 1e-6, "{w:?}");
    // A class the site does not hold weighs 1.
    let w = class_weights(ClassWeighting::Balanced, &all, 3).unwrap();
    assert!((w[0] - 40.0 / 90.0).abs() < 1e-6 && (w[1] - 40.0 / 30.0).abs() < 1e-6);
    assert_eq!(w[2], 1.0);
}

#[test]
fn balanced_weighting_gives_each_class_half_the_loss() {
    let arch = ArchSpec::LogReg {
        inputs: 4,
        classes: 2,
    };
    let device = Device::flex();
    let (all, neg, pos) = imbalanced(40, 2);
    let global = arch.init(5).unwrap();
    // Mean unweighted cross-entropy of each class at the initial model.
    let l0 = evaluate(&arch, &global, &neg, &device).unwrap().loss;
    let l1 = evaluate(&arch, &global, &pos, &device).unwrap().loss;
    // One epoch of one full batch: the reported loss is the loss before
    // the step, i.e. at the initial model.
    let cfg = TrainConfig::new()
        .with_epochs(1)
        .with_batch_size(40)
        .with_learning_rate(0.01);
    let (_, plain) = train_local(&arch, &global, &all, &cfg, &device).unwrap();
    let (_, balanced) = train_local(
        &arch,
        &global,
        &all,
        &cfg.clone()
            .with_class_weighting(Some(ClassWeighting::Balanced)),
        &device,
    )
    .unwrap();
    let expect_plain = (30.0 * l0 + 10.0 * l1) / 40.0;
    let expect_balanced = (l0 + l1) / 2.0;
    assert!(
        (plain.epoch_loss[0] - expect_plain).abs() < 1e-4,
        "{plain:?} vs {expect_plain}"
    );
    assert!(
        (balanced.epoch_loss[0] - expect_balanced).abs() < 1e-4,
        "{balanced:?} vs {expect_balanced}"
    );
    assert!(
        (expect_plain - expect_balanced).abs() > 1e-3,
        "the init must tell them apart"
    );

    // Trained a while, the balanced model leans towards the minority class.
    let cfg = cfg
        .with_epochs(50)
        .with_batch_size(8)
        .with_learning_rate(0.1);
    let (m_plain, _) = train_local(&arch, &global, &all, &cfg, &device).unwrap();
    let (m_bal, _) = train_local(
        &arch,
        &global,
        &all,
        &cfg.clone()
            .with_class_weighting(Some(ClassWeighting::Balanced)),
        &device,
    )
    .unwrap();
    // Mean (unweighted) cross-entropy of each class under each model.
    let loss = |m: &FlatModel, d: &Samples| evaluate(&arch, m, d, &device).unwrap().loss;
    assert!(
        loss(&m_bal, &pos) < loss(&m_plain, &pos) && loss(&m_bal, &neg) > loss(&m_plain, &neg),
        "balanced fits the minority class better and the majority worse: \
         positives {} vs {}, negatives {} vs {}",
        loss(&m_bal, &pos),
        loss(&m_plain, &pos),
        loss(&m_bal, &neg),
        loss(&m_plain, &neg)
    );
}
