//! Loading the public key that verifies a log.

use std::path::Path;

use ed25519_dalek::VerifyingKey;
use ed25519_dalek::pkcs8::DecodePublicKey;

use crate::entry::strict_hex;
use crate::error::Error;
use crate::log::read_small;

/// Parse an ed25519 public key given as SPKI PEM (`-----BEGIN PUBLIC KEY-----`,
/// as in a site kit's `update-key.pub.pem`) or as 64 hex digits.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, Error> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        return VerifyingKey::from_public_key_pem(text).map_err(|e| Error::BadKey(e.to_string()));
    }
    let lower = text.to_ascii_lowercase();
    let bytes = strict_hex::<32>(&lower).map_err(|e| Error::BadKey(e.to_string()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| Error::BadKey(e.to_string()))
}

/// Read an ed25519 public key from a file (PEM or hex, at most 64 KiB).
pub fn load_verifying_key(path: impl AsRef<Path>) -> Result<VerifyingKey, Error> {
    let path = path.as_ref();
    let text = read_small(path)?;
    parse_verifying_key(&text).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}
