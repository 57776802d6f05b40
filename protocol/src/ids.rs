//! Identifiers: sites, federations, jobs, rounds.
//!
//! String identifiers are validated on construction *and* on
//! deserialisation: 1 to [`MAX_ID_LEN`] bytes of ASCII letters, digits,
//! `.`, `_`, `-` and `:`, so they are safe in file names, logs and
//! certificate names, and cannot smuggle control characters.

use serde::{Deserialize, Serialize};

/// Longest identifier, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why an identifier was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty string.
    #[error("{kind} is empty")]
    Empty {
        /// Which identifier.
        kind: &'static str,
    },
    /// Longer than [`MAX_ID_LEN`].
    #[error("{kind} is {len} bytes long, more than {MAX_ID_LEN}")]
    TooLong {
        /// Which identifier.
        kind: &'static str,
        /// Its length.
        len: usize,
    },
    /// A character outside `[A-Za-z0-9._:-]`.
    #[error("{kind} {value:?} contains a character outside [A-Za-z0-9._:-]")]
    BadChar {
        /// Which identifier.
        kind: &'static str,
        /// The refused value (bounded by the length check above).
        value: String,
    },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len: s.len() });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err(IdError::BadChar {
            kind,
            value: s.to_owned(),
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        /// The identifier as a quoted string (`"hospital-a"`), as it is
        /// on the wire: what a struct holding one prints with `{:?}`.
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self.0.as_str(), f)
            }
        }

        impl $name {
            /// Validate and wrap.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate($kind, &s)?;
                Ok(Self(s))
            }

            /// The identifier.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A site (hospital) identity. The coordinator derives it from the
    /// site's TLS client certificate; a site's claims are checked against it.
    SiteId,
    "site id"
);
string_id!(
    /// A federation: a group of sites and one coordinator.
    FederationId,
    "federation id"
);
string_id!(
    /// A training job (one model being trained over many rounds).
    JobId,
    "job id"
);

/// A round number within a job, starting at 1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct RoundId(pub u64);

/// The bare number (`3`), as it is on the wire: what a struct holding one
/// prints with `{:?}` (`round: 3`).
impl std::fmt::Debug for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate() {
        assert!(SiteId::new("hospital-a.example:1").is_ok());
        assert!(matches!(SiteId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(SiteId::new("a b"), Err(IdError::BadChar { .. })));
        assert!(matches!(
            JobId::new("x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong { .. })
        ));
        let j: FederationId = serde_json::from_str("\"fed-1\"").unwrap();
        assert_eq!(j.as_str(), "fed-1");
        assert!(serde_json::from_str::<FederationId>("\"fed\\n1\"").is_err());
    }

    /// Ids print with `{:?}` as their wire form: a struct holding them
    /// reads `site: "a", round: 3`, not `SiteId("a")` / `RoundId(3)`.
    #[test]
    fn ids_debug_as_their_wire_form() {
        #[derive(Debug)]
        #[allow(dead_code, reason = "read by Debug only")]
        struct Held {
            site: SiteId,
            job: JobId,
            round: RoundId,
        }
        let held = Held {
            site: SiteId::new("site-a").unwrap(),
            job: JobId::new("j:1").unwrap(),
            round: RoundId(3),
        };
        assert_eq!(
            format!("{held:?}"),
            r#"Held { site: "site-a", job: "j:1", round: 3 }"#
        );
        assert_eq!(
            format!("{:?}", FederationId::new("fed").unwrap()),
            r#""fed""#
        );
        assert_eq!(format!("{:?}", RoundId(12)), "12");
        assert_eq!(
            format!("{:?}", held.round),
            serde_json::to_string(&held.round).unwrap()
        );
        assert_eq!(
            format!("{:?}", held.site),
            serde_json::to_string(&held.site).unwrap()
        );
    }
}
