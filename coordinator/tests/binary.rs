//! The `fedlink-coordinator` executable as an operator (or systemd) runs it:
//! a config it cannot use is refused with exit code 2 (no restart loop) and
//! an error naming the file; `--version` answers. (Being an integration test
//! of this package also makes `cargo test --workspace` build the executable,
//! which the end-to-end tests in `tests/` start as a separate process.)

use std::process::Command;

fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedlink-coordinator"))
}

#[test]
fn version_answers() {
    let out = coordinator()
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
}

#[test]
fn a_config_it_cannot_read_is_refused_with_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let missing = dir.path().join("no-such-coordinator.toml");
    let out = coordinator()
        .args(["serve", "--config"])
        .arg(&missing)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-coordinator.toml"), "{err}");

    let bad = dir.path().join("coordinator.toml");
    std::fs::write(&bad, "listen = 42\n").unwrap_or_else(|e| panic!("{e}"));
    let out = coordinator()
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("coordinator.toml"), "{err}");
}
