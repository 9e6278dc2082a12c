//! Value encodings: one version byte, then JSON. JSON keeps stored data readable with
//! `ldb` and lets fields be added with `#[serde(default)]`; the version byte lets a
//! later encoding live beside this one.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;

const V1_JSON: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(V1_JSON);
    // Serializing our own plain structs to a Vec cannot fail.
    serde_json::to_writer(&mut out, value).unwrap_or_else(|e| unreachable!("encode: {e}"));
    out
}

/// # Errors
/// `Corrupt` when the bytes are not a known encoding of `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&V1_JSON, json)) => serde_json::from_slice(json).map_err(|e| StoreError::Corrupt(e.to_string())),
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown value encoding {v}"))),
        None => Err(StoreError::Corrupt("empty value".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown_version() {
        let bytes = encode(&vec![1u32, 2]);
        assert_eq!(bytes[0], 1);
        assert_eq!(decode::<Vec<u32>>(&bytes).unwrap(), vec![1, 2]);
        assert!(decode::<Vec<u32>>(&[9, b'[', b']']).is_err());
        assert!(decode::<Vec<u32>>(&[]).is_err());
    }
}
