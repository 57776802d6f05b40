//! `fedlink aggregate` end to end: the real binary on safetensors files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use fedlink_aggregation::safetensors_io;
use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};

fn spec() -> ModelSpec {
    ModelSpec::new(vec![
        TensorSpec::f32("fc.weight", vec![3, 2]),
        TensorSpec::f32("fc.bias", vec![2]),
    ])
    .unwrap()
}

fn write(path: &Path, values: Vec<f32>) {
    let m = FlatModel::new(spec(), values).unwrap();
    std::fs::write(
        path,
        safetensors_io::serialize(&m, &BTreeMap::new()).unwrap(),
    )
    .unwrap();
}

fn read(path: &Path) -> FlatModel {
    safetensors_io::parse("out", &std::fs::read(path).unwrap())
        .unwrap()
        .model
}

fn fedlink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedlink"))
}

fn arg(d: &Path, file: &str, n: u64) -> String {
    format!("{}:{n}", d.join(file).display())
}

#[test]
fn fedavg_and_median_recompute_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let g: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let d1: Vec<f32> = (0..8).map(|i| 0.5 * i as f32).collect();
    let d2: Vec<f32> = (0..8).map(|i| -0.25 * i as f32).collect();
    write(&d.join("g.safetensors"), g.clone());
    write(&d.join("a.safetensors"), d1.clone());
    write(&d.join("b.safetensors"), d2.clone());
    write(&d.join("c.safetensors"), vec![10.0; 8]);

    // Weighted FedAvg with the global model: g + (1·d1 + 3·d2) / 4.
    let out = fedlink()
        .args(["aggregate", "--strategy", "fedavg", "--global"])
        .arg(d.join("g.safetensors"))
        .arg("--out")
        .arg(d.join("new.safetensors"))
        .arg(arg(d, "a.safetensors", 1))
        .arg(arg(d, "b.safetensors", 3))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = read(&d.join("new.safetensors"));
    let expect: Vec<f32> = g
        .iter()
        .zip(&d1)
        .zip(&d2)
        .map(|((x, a), b)| x + (a + 3.0 * b) / 4.0)
        .collect();
    for (a, e) in new.values().iter().zip(&expect) {
        assert!((a - e).abs() <= 1e-6, "{a} vs {e}");
    }

    // An existing output is never overwritten without --force.
    let again = fedlink()
        .args(["aggregate", "--strategy", "fedavg", "--out"])
        .arg(d.join("new.safetensors"))
        .arg(arg(d, "a.safetensors", 1))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(read(&d.join("new.safetensors")).values(), new.values());

    // Coordinate-wise median of three deltas ignores the outlier.
    let med = fedlink()
        .args(["aggregate", "--strategy", "fedmedian", "--out"])
        .arg(d.join("median.safetensors"))
        .arg(arg(d, "a.safetensors", 1))
        .arg(arg(d, "b.safetensors", 1))
        .arg(arg(d, "c.safetensors", 1))
        .output()
        .unwrap();
    assert!(
        med.status.success(),
        "{}",
        String::from_utf8_lossy(&med.stderr)
    );
    assert_eq!(read(&d.join("median.safetensors")).values(), d1.as_slice());
}

#[test]
fn mismatched_update_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("a.safetensors"), vec![1.0; 8]);
    let other = FlatModel::new(
        ModelSpec::new(vec![TensorSpec::f32("fc.weight", vec![4])]).unwrap(),
        vec![1.0; 4],
    )
    .unwrap();
    std::fs::write(
        d.join("bad.safetensors"),
        safetensors_io::serialize(&other, &BTreeMap::new()).unwrap(),
    )
    .unwrap();
    let out = fedlink()
        .args(["aggregate", "--strategy", "fedavg", "--out"])
        .arg(d.join("o.safetensors"))
        .arg(arg(d, "a.safetensors", 1))
        .arg(arg(d, "bad.safetensors", 1))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.safetensors"), "{err}");
    assert!(!d.join("o.safetensors").exists());
}
