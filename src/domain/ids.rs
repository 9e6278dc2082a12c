//! Identifiers: path slugs (merchant, partner, link, plan), the merchant's `txn_id`,
//! and the time-ordered unguessable ids tally mints (click, conversion, ledger entry).

use std::fmt;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;

/// Longest slug id accepted in a path (SPEC 5.3).
pub const MAX_SLUG_LEN: usize = 64;
/// Longest merchant transaction id (SPEC 5.1).
pub const MAX_TXN_ID_LEN: usize = 128;

fn check_slug(text: &str) -> Result<(), String> {
    if text.is_empty() || text.len() > MAX_SLUG_LEN {
        return Err(format!("must be 1..{MAX_SLUG_LEN} characters of [A-Za-z0-9_-]"));
    }
    if !text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(format!("must be 1..{MAX_SLUG_LEN} characters of [A-Za-z0-9_-]"));
    }
    Ok(())
}

/// Serialization of an id kept as `Arc<str>`: written as its text without a copy, read
/// from text through `$parse` (one allocation, no intermediate `String`).
macro_rules! text_serde {
    ($name:ident, $parse:path) => {
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " as a string"))
                    }
                    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<$name, E> {
                        $parse(text).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Text)
            }
        }
    };
}

/// A slug id. Kept as `Arc<str>`: ids are cloned into records, effects, keys' owners and
/// answers many times per conversion, and a clone is then a count, not an allocation
/// and a copy (BENCHMARKS.md, instructions per conversion).
macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses a slug of 1..64 `[A-Za-z0-9_-]`.
            ///
            /// # Errors
            /// Says what a valid id looks like.
            pub fn parse(text: &str) -> Result<Self, String> {
                check_slug(text)?;
                Ok($name(Arc::from(text)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        text_serde!($name, $name::parse);


        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

slug_id!(
    /// A merchant (tenant).
    MerchantId
);
slug_id!(
    /// A partner; unique across merchants because the partner API has no merchant in its path.
    PartnerId
);
slug_id!(
    /// A tracking link; unique across merchants because `/c/{link_id}` has no merchant in its path.
    LinkId
);
slug_id!(
    /// A commission plan, unique within its merchant.
    PlanId
);

/// The merchant's own unique id for a conversion: the dedupe key within the merchant.
/// Kept as `Arc<str>`, like the slug ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(Arc<str>);

text_serde!(TxnId, TxnId::parse);

impl TxnId {
    /// # Errors
    /// Says why the text is not a valid transaction id.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.chars().count() > MAX_TXN_ID_LEN {
            return Err(format!("must be 1..{MAX_TXN_ID_LEN} characters"));
        }
        if text.trim().is_empty() {
            return Err("must not be blank".into());
        }
        if text.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(TxnId(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A 128-bit id: 48 bits of milliseconds, then 80 random bits from the OS-seeded CSPRNG
/// (the ULID layout). Byte order is big-endian, so ids sort by creation time, in keys
/// and in their 26-character Crockford base32 text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ulid(pub [u8; 16]);

impl Ulid {
    /// Mints a new id at `now`. 80 random bits make ids unguessable: an attacker who
    /// knows the millisecond still has 2^80 candidates.
    pub fn mint(now: UnixMillis) -> Self {
        let mut bytes = [0u8; 16];
        let ms = u64::try_from(now).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        rand::thread_rng().fill_bytes(&mut bytes[6..]);
        Ulid(bytes)
    }

    /// The id at `now` whose 80 random bits are given: the engine derives them from a
    /// command's entropy, so replaying the command gives the same id.
    pub fn from_parts(now: UnixMillis, random: [u8; 10]) -> Self {
        let mut bytes = [0u8; 16];
        let ms = u64::try_from(now).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[6..].copy_from_slice(&random);
        Ulid(bytes)
    }

    /// The millisecond the id was minted at.
    pub fn millis(&self) -> UnixMillis {
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&self.0[..6]);
        i64::try_from(u64::from_be_bytes(ms)).unwrap_or(0)
    }

    /// Parses the 26-character text form (case-insensitive, as Crockford base32 allows).
    ///
    /// # Errors
    /// When the text is not 26 base32 characters or overflows 128 bits.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = text.as_bytes();
        if bytes.len() != 26 {
            return Err("must be a 26-character id".into());
        }
        let mut value: u128 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let digit = CROCKFORD
                .iter()
                .position(|&c| c == b.to_ascii_uppercase())
                .ok_or_else(|| "must be a 26-character id".to_string())?;
            if i == 0 && digit > 7 {
                return Err("must be a 26-character id".into());
            }
            value = (value << 5) | digit as u128;
        }
        Ok(Ulid(value.to_be_bytes()))
    }
}

impl fmt::Display for Ulid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = u128::from_be_bytes(self.0);
        let mut out = [0u8; 26];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (25 - i);
            *slot = CROCKFORD[((value >> shift) & 0x1F) as usize];
        }
        f.write_str(std::str::from_utf8(&out).unwrap_or_default())
    }
}

impl fmt::Debug for Ulid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ulid({self})")
    }
}

impl TryFrom<String> for Ulid {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Ulid::parse(&text)
    }
}

impl From<Ulid> for String {
    fn from(id: Ulid) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert!(MerchantId::parse("acme_1-x").is_ok());
        assert!(MerchantId::parse("").is_err());
        assert!(MerchantId::parse("a/b").is_err());
        assert!(MerchantId::parse("a.b").is_err());
        assert!(MerchantId::parse(&"a".repeat(65)).is_err());
        assert!(MerchantId::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn txn_ids() {
        assert!(TxnId::parse("order-1001").is_ok());
        assert!(TxnId::parse("   ").is_err());
        assert!(TxnId::parse("a\nb").is_err());
        assert!(TxnId::parse(&"é".repeat(128)).is_ok());
        assert!(TxnId::parse(&"é".repeat(129)).is_err());
    }

    #[test]
    fn ulid_round_trip_and_order() {
        let a = Ulid::mint(1_700_000_000_000);
        let b = Ulid::mint(1_700_000_000_001);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(a.millis(), 1_700_000_000_000);
        assert_eq!(Ulid::parse(&a.to_string()).unwrap(), a);
        assert_eq!(Ulid::parse(&a.to_string().to_lowercase()).unwrap(), a);
        assert!(Ulid::parse("8ZZZZZZZZZZZZZZZZZZZZZZZZZ").is_err());
        assert!(Ulid::parse("short").is_err());
    }

    #[test]
    fn ulid_random_part_differs() {
        let a = Ulid::mint(5);
        let b = Ulid::mint(5);
        assert_ne!(a, b);
        assert_eq!(a.0[..6], b.0[..6]);
    }
}
