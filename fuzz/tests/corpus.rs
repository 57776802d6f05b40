//! Replays the committed corpus through every target body on the stable
//! toolchain (no libFuzzer needed): `cargo test` in `fuzz/`.
use std::fs;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = format!("{}/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f(&data);
        // also every prefix and a few bit flips of each input
        for cut in (0..data.len()).step_by(data.len() / 16 + 1) {
            f(&data[..cut]);
        }
        for i in (0..data.len()).step_by(data.len() / 32 + 1) {
            let mut m = data.clone();
            m[i] ^= 0x5a;
            f(&m);
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus for {target}");
}

#[test]
fn corpus_frame() {
    replay("frame", fedlink_protocol_fuzz::frame);
}

#[test]
fn corpus_message() {
    replay("message", fedlink_protocol_fuzz::message);
}

#[test]
fn corpus_chunk() {
    replay("chunk", fedlink_protocol_fuzz::chunk);
}

#[test]
fn corpus_admin() {
    replay("admin", fedlink_protocol_fuzz::admin);
}

#[test]
fn corpus_envelope() {
    replay("envelope", fedlink_protocol_fuzz::envelope);
}
