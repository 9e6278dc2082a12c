//! Value encodings: one version byte, then the value. Entities, conversions and the
//! ledger are JSON (1): readable with `ldb`, and fields can be added with
//! `#[serde(default)]`. Clicks, the bulk of the store, are a compact binary record (2,
//! [`ClickRecord::encode_binary`]); clicks stored as JSON by earlier versions still read.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;
use crate::domain::click::ClickRecord;

const V1_JSON: u8 = 1;
const V2_CLICK: u8 = 2;

pub fn encode_click(click: &ClickRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + click.user_agent.len());
    out.push(V2_CLICK);
    click.encode_binary(&mut out);
    out
}

/// # Errors
/// `Corrupt` when the bytes are not a known encoding of a click.
pub fn decode_click(bytes: &[u8]) -> Result<ClickRecord, StoreError> {
    match bytes.split_first() {
        Some((&V2_CLICK, rest)) => ClickRecord::decode_binary(rest).map_err(StoreError::Corrupt),
        _ => decode(bytes),
    }
}

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

    #[test]
    fn clicks_read_in_both_encodings() {
        let click = ClickRecord {
            click_id: crate::domain::ids::Ulid::mint(1_800_000_000_000),
            link_id: crate::domain::ids::LinkId::parse("l").unwrap(),
            partner_id: crate::domain::ids::PartnerId::parse("p").unwrap(),
            merchant_id: crate::domain::ids::MerchantId::parse("m").unwrap(),
            at_ms: 1_800_000_000_000,
            subs: Default::default(),
            ip: "203.0.113.0/24".into(),
            user_agent: "Mozilla/5.0".into(),
            bot: false,
            unique: true,
            visitor: [1; 16],
        };
        let binary = encode_click(&click);
        assert_eq!(binary[0], V2_CLICK);
        assert_eq!(decode_click(&binary).unwrap(), click);
        assert_eq!(decode_click(&encode(&click)).unwrap(), click, "a click stored as JSON by an earlier version");
        assert!(decode::<ClickRecord>(&binary).is_err());
    }
}
