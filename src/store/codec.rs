//! Value encodings: one version byte, then the value. Entities, conversions and the
//! ledger are JSON (1): readable with `ldb`, and fields can be added with
//! `#[serde(default)]`. Clicks, the bulk of the store, are a compact binary record (2,
//! [`ClickRecord::encode_binary`]); clicks stored as JSON by earlier versions still read.
//! A delivery not yet attempted is a compact binary record (3, [`encode_fresh_delivery`])
//! kept as the value of its due key, not a record of its own: a conversion that notifies
//! a partner then writes about 60 bytes more, not 300. Ledger entries, balances and
//! partner months, which every conversion writes, are fixed-layout binary (4); their JSON
//! from earlier versions still reads.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;
use crate::domain::account::PartnerMonth;
use crate::domain::balance::Balance;
use crate::domain::binary::{put_text, Reader};
use crate::domain::click::ClickRecord;
use crate::domain::conversion::ConversionStatus;
use crate::domain::ids::{MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::{LedgerEntry, LedgerKind};
use crate::domain::money::{Currency, Money};
use crate::domain::outbound::{Delivery, DeliveryState, OutboundEvent};

const V1_JSON: u8 = 1;
const V2_CLICK: u8 = 2;
const V3_FRESH_DELIVERY: u8 = 3;
/// The records every conversion writes (ledger entries, balances, partner months) as
/// fixed-layout binary: JSON cost about a tenth of a conversion's CPU.
const V4_BINARY: u8 = 4;

/// Whether a new delivery can be kept in its due key only: pending, due when it was made,
/// never attempted, nothing waiting behind it. (Only at its creation: once it changes it
/// has a record, and a record is never turned back into a due key's value.)
pub fn is_fresh(d: &Delivery) -> bool {
    d.state == DeliveryState::Pending
        && d.due_ms == Some(d.created_ms)
        && d.created_ms == d.id.millis()
        && d.attempt_count == 0
        && d.attempts.is_empty()
        && d.failed == 0
        && d.round_start_ms.is_none()
        && d.finished_ms.is_none()
        && d.next.is_none()
}

fn status_byte(s: ConversionStatus) -> u8 {
    match s {
        ConversionStatus::Pending => 0,
        ConversionStatus::Approved => 1,
        ConversionStatus::Rejected => 2,
        ConversionStatus::Reversed => 3,
    }
}

fn event_byte(e: OutboundEvent) -> u8 {
    match e {
        OutboundEvent::Created => 0,
        OutboundEvent::Approved => 1,
        OutboundEvent::Rejected => 2,
        OutboundEvent::Reversed => 3,
    }
}

/// A fresh delivery ([`is_fresh`]): what its event decided and the conversion it is
/// about; its id, merchant and time are in the due key. `None` when it is not fresh.
pub fn encode_fresh_delivery(d: &Delivery) -> Option<Vec<u8>> {
    if !is_fresh(d) {
        return None;
    }
    let partner = d.partner_id.as_str().as_bytes();
    let txn = d.txn_id.as_str().as_bytes();
    let mut out = Vec::with_capacity(48 + partner.len() + txn.len());
    out.extend_from_slice(&[
        V3_FRESH_DELIVERY,
        event_byte(d.trigger),
        status_byte(d.status),
        u8::from(d.commission.is_some()),
    ]);
    out.extend_from_slice(&d.conversion_id.0);
    if let Some(c) = d.commission {
        out.extend_from_slice(&c.minor.to_be_bytes());
        out.extend_from_slice(c.currency.as_str().as_bytes());
    }
    out.push(u8::try_from(partner.len()).ok()?);
    out.extend_from_slice(partner);
    out.extend_from_slice(&u16::try_from(txn.len()).ok()?.to_be_bytes());
    out.extend_from_slice(txn);
    Some(out)
}

/// The delivery kept in the due key of `(merchant, id)`.
///
/// # Errors
/// `Corrupt` when the bytes are not a fresh delivery.
pub fn decode_fresh_delivery(merchant: &MerchantId, id: Ulid, bytes: &[u8]) -> Result<Delivery, StoreError> {
    let bad = || StoreError::Corrupt(format!("delivery {id}: a fresh delivery that does not decode"));
    let mut r = bytes;
    let mut take = |n: usize| -> Result<&[u8], StoreError> {
        let (head, rest) = r.split_at_checked(n).ok_or_else(bad)?;
        r = rest;
        Ok(head)
    };
    let head = take(4)?;
    if head[0] != V3_FRESH_DELIVERY {
        return Err(bad());
    }
    let trigger = [OutboundEvent::Created, OutboundEvent::Approved, OutboundEvent::Rejected, OutboundEvent::Reversed]
        .get(usize::from(head[1]))
        .copied()
        .ok_or_else(bad)?;
    let status =
        [ConversionStatus::Pending, ConversionStatus::Approved, ConversionStatus::Rejected, ConversionStatus::Reversed]
            .get(usize::from(head[2]))
            .copied()
            .ok_or_else(bad)?;
    let has_commission = head[3] == 1;
    let conversion_id = Ulid(take(16)?.try_into().map_err(|_| bad())?);
    let commission = if has_commission {
        let minor = i64::from_be_bytes(take(8)?.try_into().map_err(|_| bad())?);
        let code = std::str::from_utf8(take(3)?).map_err(|_| bad())?;
        Some(Money { minor, currency: Currency::parse(code).map_err(|_| bad())? })
    } else {
        None
    };
    let n = usize::from(take(1)?[0]);
    let partner = std::str::from_utf8(take(n)?).ok().and_then(|p| PartnerId::parse(p).ok()).ok_or_else(bad)?;
    let n = usize::from(u16::from_be_bytes(take(2)?.try_into().map_err(|_| bad())?));
    let txn = std::str::from_utf8(take(n)?).ok().and_then(|t| TxnId::parse(t).ok()).ok_or_else(bad)?;
    let at = id.millis();
    Ok(Delivery {
        id,
        merchant_id: merchant.clone(),
        partner_id: partner,
        trigger,
        txn_id: txn,
        conversion_id,
        status,
        commission,
        created_ms: at,
        state: DeliveryState::Pending,
        due_ms: Some(at),
        round_start_ms: None,
        failed: 0,
        attempt_count: 0,
        attempts: Vec::new(),
        finished_ms: None,
        next: None,
    })
}

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

/// A version-4 record read by `read`, which must consume it all; JSON (version 1) of
/// earlier versions is read as such.
fn binary<T: DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    read: impl FnOnce(&mut Reader<'_>) -> Option<T>,
) -> Result<T, StoreError> {
    let Some((&V4_BINARY, rest)) = bytes.split_first() else { return decode(bytes) };
    let mut r = Reader::new(rest);
    let value = read(&mut r);
    value
        .filter(|_| r.is_empty())
        .ok_or_else(|| StoreError::Corrupt(format!("{what}: a binary record that does not decode")))
}

/// A ledger entry: version, kind, the two ids, time, amount and currency, then merchant,
/// partner, txn id and note as texts.
pub fn encode_ledger(e: &LedgerEntry) -> Vec<u8> {
    let note = e.note.as_deref();
    let mut out = Vec::with_capacity(64 + e.txn_id.as_str().len() + note.map_or(0, str::len));
    let kind = LedgerKind::ALL.iter().position(|k| *k == e.kind).unwrap_or(0);
    out.extend_from_slice(&[V4_BINARY, u8::try_from(kind).unwrap_or(0)]);
    out.extend_from_slice(&e.entry_id.0);
    out.extend_from_slice(&e.conversion_id.0);
    out.extend_from_slice(&e.at_ms.to_le_bytes());
    out.extend_from_slice(&e.amount.minor.to_le_bytes());
    out.extend_from_slice(e.amount.currency.as_str().as_bytes());
    put_text(&mut out, Some(e.merchant_id.as_str()));
    put_text(&mut out, Some(e.partner_id.as_str()));
    put_text(&mut out, Some(e.txn_id.as_str()));
    put_text(&mut out, note);
    out
}

/// # Errors
/// `Corrupt` when the bytes are neither [`encode_ledger`]'s nor the JSON of earlier versions.
pub fn decode_ledger(bytes: &[u8]) -> Result<LedgerEntry, StoreError> {
    binary(bytes, "ledger entry", |r| {
        let kind = *LedgerKind::ALL.get(usize::from(r.array::<1>()?[0]))?;
        let entry_id = Ulid(r.array()?);
        let conversion_id = Ulid(r.array()?);
        let at_ms = r.i64()?;
        let minor = r.i64()?;
        let currency = Currency::parse(std::str::from_utf8(r.take(3)?).ok()?).ok()?;
        Some(LedgerEntry {
            entry_id,
            merchant_id: r.id(MerchantId::parse)?,
            partner_id: r.id(PartnerId::parse)?,
            kind,
            txn_id: r.id(TxnId::parse)?,
            conversion_id,
            amount: Money { minor, currency },
            at_ms,
            note: r.text()?.map(str::to_string),
        })
    })
}

/// A balance: version, then pending, approved, reversed, paid and in runs.
pub fn encode_balance(b: &Balance) -> Vec<u8> {
    let mut out = Vec::with_capacity(41);
    out.push(V4_BINARY);
    for v in [b.pending, b.approved, b.reversed, b.paid, b.in_runs] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// # Errors
/// `Corrupt` when the bytes are neither [`encode_balance`]'s nor JSON.
pub fn decode_balance(bytes: &[u8]) -> Result<Balance, StoreError> {
    binary(bytes, "balance", |r| {
        Some(Balance { pending: r.i64()?, approved: r.i64()?, reversed: r.i64()?, paid: r.i64()?, in_runs: r.i64()? })
    })
}

/// A partner's month: version, approved sales (`u32`), commission.
pub fn encode_month(m: &PartnerMonth) -> Vec<u8> {
    let mut out = Vec::with_capacity(13);
    out.push(V4_BINARY);
    out.extend_from_slice(&m.approved_sales.to_le_bytes());
    out.extend_from_slice(&m.commission_minor.to_le_bytes());
    out
}

/// # Errors
/// `Corrupt` when the bytes are neither [`encode_month`]'s nor JSON.
pub fn decode_month(bytes: &[u8]) -> Result<PartnerMonth, StoreError> {
    binary(bytes, "partner month", |r| {
        Some(PartnerMonth { approved_sales: u32::from_le_bytes(r.array()?), commission_minor: r.i64()? })
    })
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
    fn ledger_entries_balances_and_months_read_in_both_encodings() {
        let entry = LedgerEntry {
            entry_id: Ulid::from_parts(1_790_000_000_000, [3; 10]),
            merchant_id: MerchantId::parse("shop").unwrap(),
            partner_id: PartnerId::parse("ann").unwrap(),
            kind: LedgerKind::Clawback,
            txn_id: TxnId::parse("order #1/é").unwrap(),
            conversion_id: Ulid::from_parts(1_789_000_000_000, [4; 10]),
            amount: Money { minor: -1234, currency: Currency::parse("EUR").unwrap() },
            at_ms: 1_790_000_000_123,
            note: Some("refund r-1 on order #1/é".into()),
        };
        for e in [entry.clone(), LedgerEntry { note: None, kind: LedgerKind::Payout, ..entry.clone() }] {
            let binary = encode_ledger(&e);
            assert_eq!(binary[0], V4_BINARY);
            assert_eq!(decode_ledger(&binary).unwrap(), e);
            assert_eq!(decode_ledger(&encode(&e)).unwrap(), e, "JSON of earlier versions");
            // Cut short or with a byte too many: refused, never misread.
            assert!(decode_ledger(&binary[..binary.len() - 1]).is_err());
            assert!(decode_ledger(&[binary.as_slice(), &[0]].concat()).is_err());
        }
        let b = Balance { pending: 1, approved: -2, reversed: i64::MAX, paid: i64::MIN, in_runs: 5 };
        assert_eq!(decode_balance(&encode_balance(&b)).unwrap(), b);
        assert_eq!(decode_balance(&encode(&b)).unwrap(), b);
        assert!(decode_balance(&encode_balance(&b)[..40]).is_err());
        let m = PartnerMonth { approved_sales: 7, commission_minor: -9 };
        assert_eq!(decode_month(&encode_month(&m)).unwrap(), m);
        assert_eq!(decode_month(&encode(&m)).unwrap(), m);
    }

    proptest::proptest! {
        /// Any entry round-trips through the binary codec.
        #[test]
        fn ledger_entries_round_trip(minor: i64, at: i64, kind in 0usize..6, txn in "[a-zA-Z0-9#/._-][a-zA-Z0-9 #/._-]{0,63}", note in proptest::option::of(".{0,200}")) {
            let e = LedgerEntry {
                entry_id: Ulid::from_parts(1_790_000_000_000, [1; 10]),
                merchant_id: MerchantId::parse("m").unwrap(),
                partner_id: PartnerId::parse("p").unwrap(),
                kind: LedgerKind::ALL[kind],
                txn_id: TxnId::parse(&txn).unwrap(),
                conversion_id: Ulid::from_parts(1, [2; 10]),
                amount: Money { minor, currency: Currency::parse("USD").unwrap() },
                at_ms: at,
                note,
            };
            proptest::prop_assert_eq!(decode_ledger(&encode_ledger(&e)).unwrap(), e);
        }
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

    #[test]
    fn a_fresh_delivery_round_trips_and_a_changed_one_is_not_fresh() {
        let (m, id) = (MerchantId::parse("shop").unwrap(), Ulid::from_parts(1_790_000_000_000, [9; 10]));
        let fresh = Delivery {
            id,
            merchant_id: m.clone(),
            partner_id: PartnerId::parse("ann").unwrap(),
            trigger: OutboundEvent::Reversed,
            txn_id: TxnId::parse("order #1/é").unwrap(),
            conversion_id: Ulid::from_parts(1_789_999_999_000, [1; 10]),
            status: ConversionStatus::Approved,
            commission: Some(Money { minor: -1234, currency: Currency::parse("JPY").unwrap() }),
            created_ms: id.millis(),
            state: DeliveryState::Pending,
            due_ms: Some(id.millis()),
            round_start_ms: None,
            failed: 0,
            attempt_count: 0,
            attempts: Vec::new(),
            finished_ms: None,
            next: None,
        };
        let cases: Vec<(&str, Delivery, bool)> = vec![
            ("as made", fresh.clone(), true),
            ("without a commission", Delivery { commission: None, ..fresh.clone() }, true),
            ("waiting behind another", Delivery { due_ms: None, ..fresh.clone() }, false),
            ("something waits behind it", Delivery { next: Some(id), ..fresh.clone() }, false),
            ("attempted", Delivery { attempt_count: 1, ..fresh.clone() }, false),
            ("due later", Delivery { due_ms: Some(id.millis() + 5000), ..fresh.clone() }, false),
            ("parked", Delivery { state: DeliveryState::Parked, ..fresh.clone() }, false),
        ];
        for (what, d, want) in cases {
            let encoded = encode_fresh_delivery(&d);
            assert_eq!(encoded.is_some(), want, "{what}");
            if let Some(bytes) = encoded {
                assert!(bytes.len() < 80, "{what}: {} bytes", bytes.len());
                assert_eq!(decode_fresh_delivery(&m, id, &bytes).unwrap(), d, "{what}");
                assert!(decode_fresh_delivery(&m, id, &bytes[..bytes.len() - 1]).is_err(), "{what}: truncated");
            }
        }
    }
}
