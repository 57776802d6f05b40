//! Serial numbers, SHA-256 fingerprints and the facts we read from a
//! certificate.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::identity::{Identity, IdentityError};

/// Why a serial or fingerprint string is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HexError {
    /// Not hexadecimal (colons are allowed as separators).
    #[error("{0:?} is not hexadecimal")]
    NotHex(String),
    /// Wrong length.
    #[error("{what} must be {expected}, got {got} bytes")]
    Length {
        /// Serial or fingerprint.
        what: &'static str,
        /// Accepted length, for the message.
        expected: &'static str,
        /// Bytes found.
        got: usize,
    },
}

fn parse_hex(s: &str) -> Result<Vec<u8>, HexError> {
    let cleaned: String = s.chars().filter(|c| *c != ':').collect();
    hex::decode(&cleaned).map_err(|_| HexError::NotHex(s.chars().take(100).collect()))
}

/// A certificate serial number, normalised (no leading zero bytes), shown as
/// lower-case hex without separators.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// Longest serial RFC 5280 allows (20 bytes).
    pub const MAX_LEN: usize = 20;

    /// From the raw big-endian bytes of a certificate's serial.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HexError> {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        let trimmed = &bytes[start..];
        if trimmed.is_empty() || trimmed.len() > Self::MAX_LEN {
            return Err(HexError::Length {
                what: "serial",
                expected: "1 to 20 non-zero-prefixed bytes",
                got: trimmed.len(),
            });
        }
        Ok(Self(trimmed.to_vec()))
    }

    /// The normalised big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl FromStr for Serial {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(&parse_hex(s)?)
    }
}

/// SHA-256 of a certificate's DER encoding, shown as lower-case hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(Sha256::digest(cert.as_ref()).into())
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for Fingerprint {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_hex(s)?;
        let got = bytes.len();
        let arr: [u8; 32] = bytes.try_into().map_err(|_| HexError::Length {
            what: "SHA-256 fingerprint",
            expected: "32 bytes",
            got,
        })?;
        Ok(Self(arr))
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(Serial);
serde_via_str!(Fingerprint);
serde_via_str!(Identity);

/// Facts read from one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number.
    pub serial: Serial,
    /// SHA-256 of the DER.
    pub fingerprint: Fingerprint,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The fedlink identity (SAN URI).
    pub identity: Identity,
    /// DNS names and IP addresses in the SAN (coordinator certificates).
    pub server_names: Vec<String>,
}

impl CertInfo {
    /// Parse a DER certificate issued by a fedlink CA.
    pub fn from_der(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let identity = Identity::from_x509(&parsed)?;
        let serial = Serial::from_bytes(parsed.raw_serial())
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let mut server_names = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for gn in &san.value.general_names {
                match gn {
                    GeneralName::DNSName(d) => server_names.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        let ip: Option<std::net::IpAddr> = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(Into::into),
                            16 => <[u8; 16]>::try_from(*b).ok().map(Into::into),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            server_names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            serial,
            fingerprint: Fingerprint::of(cert),
            not_before: parsed.validity().not_before.to_datetime(),
            not_after: parsed.validity().not_after.to_datetime(),
            identity,
            server_names,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_normalisation() {
        let s: Serial = "00:0A:bc".parse().unwrap();
        assert_eq!(s.to_string(), "0abc");
        assert_eq!(s, Serial::from_bytes(&[0, 0, 0x0a, 0xbc]).unwrap());
        assert!("".parse::<Serial>().is_err());
        assert!("00".parse::<Serial>().is_err());
        assert!("zz".parse::<Serial>().is_err());
        assert!("01".repeat(21).parse::<Serial>().is_err());
    }

    #[test]
    fn fingerprint_parse() {
        let f = Fingerprint::of(&CertificateDer::from(vec![1, 2, 3]));
        assert_eq!(f.to_string().parse::<Fingerprint>().unwrap(), f);
        assert!("abcd".parse::<Fingerprint>().is_err());
    }
}
