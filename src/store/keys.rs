//! Key layouts. Components are joined with a 0x00 byte, which no id can contain (slugs
//! are `[A-Za-z0-9_-]`, `txn_id`s have no control characters), and 0x00 sorts before every
//! id byte, so all keys of one prefix are contiguous and in id order. Numbers are
//! big-endian so byte order is numeric order.

use crate::domain::ids::{LinkId, MerchantId, PartnerId, PlanId, TxnId, Ulid, MAX_SLUG_LEN};
use crate::domain::money::Currency;
use crate::domain::rollup::{Level, Scope};

const SEP: u8 = 0;

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len() + 1).sum();
    let mut key = Vec::with_capacity(len);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            key.push(SEP);
        }
        key.extend_from_slice(p);
    }
    key
}

pub const META_VISITOR_SALT: &[u8] = b"visitor_salt";
pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
/// Cluster mode: the last position of the partition's log applied to this store (u64 BE),
/// written in the batch of the commands it covers.
pub const META_APPLIED: &[u8] = b"applied_log_position";

pub fn merchant(id: &MerchantId) -> Vec<u8> {
    id.as_str().as_bytes().to_vec()
}

pub fn merchant_secrets(id: &MerchantId) -> Vec<u8> {
    join(&[b"m", id.as_str().as_bytes()])
}

pub fn postback_token(id: &MerchantId) -> Vec<u8> {
    join(&[b"t", id.as_str().as_bytes()])
}

pub fn partner_secrets(id: &PartnerId) -> Vec<u8> {
    join(&[b"p", id.as_str().as_bytes()])
}

pub fn partner(id: &PartnerId) -> Vec<u8> {
    id.as_str().as_bytes().to_vec()
}

pub fn link(id: &LinkId) -> Vec<u8> {
    id.as_str().as_bytes().to_vec()
}

pub fn plan(merchant: &MerchantId, plan: &PlanId, version_from_ms: i64) -> Vec<u8> {
    let version = u64::try_from(version_from_ms).unwrap_or(0).to_be_bytes();
    join(&[merchant.as_str().as_bytes(), plan.as_str().as_bytes(), &version])
}

pub fn click(id: &Ulid) -> Vec<u8> {
    id.0.to_vec()
}

pub fn visitor(link: &LinkId, hash: &[u8; 16]) -> Vec<u8> {
    join(&[link.as_str().as_bytes(), hash])
}

pub fn conversion(merchant: &MerchantId, txn: &TxnId) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), txn.as_str().as_bytes()])
}

pub fn ledger(merchant: &MerchantId, partner: &PartnerId, entry: &Ulid) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), partner.as_str().as_bytes(), &entry.0])
}

pub fn account(merchant: &MerchantId, account: &str) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), account.as_bytes()])
}

pub fn deal(partner: &PartnerId, deal_id: &str) -> Vec<u8> {
    join(&[partner.as_str().as_bytes(), deal_id.as_bytes()])
}

pub fn customer(merchant: &MerchantId, customer_id: &str) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), customer_id.as_bytes()])
}

pub fn partner_month(merchant: &MerchantId, partner: &PartnerId, month: u32) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), partner.as_str().as_bytes(), &month.to_be_bytes()])
}

/// Holds sort by the time they end, so the sweep reads only the due ones.
pub fn hold(approve_at_ms: i64, merchant: &MerchantId, txn: &TxnId) -> Vec<u8> {
    let at = u64::try_from(approve_at_ms).unwrap_or(0).to_be_bytes();
    join(&[&at, merchant.as_str().as_bytes(), txn.as_str().as_bytes()])
}

/// `(approve_at, merchant, txn)` of a hold key.
pub fn parse_hold(key: &[u8]) -> Option<(i64, MerchantId, TxnId)> {
    let at = i64::try_from(u64::from_be_bytes(key.get(..8)?.try_into().ok()?)).ok()?;
    let rest = std::str::from_utf8(key.get(9..)?).ok()?;
    let (m, t) = rest.split_once('\0')?;
    Some((at, MerchantId::parse(m).ok()?, TxnId::parse(t).ok()?))
}

pub fn adjustment(merchant: &MerchantId, adjustment_id: &str) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), adjustment_id.as_bytes()])
}

pub fn delivery(merchant: &MerchantId, id: &Ulid) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), &id.0])
}

/// The prefix of every key of one merchant in a family keyed by merchant first
/// (conversions, deliveries in id order, the ledger order).
pub fn merchant_prefix(merchant: &MerchantId) -> Vec<u8> {
    let mut p = merchant.as_str().as_bytes().to_vec();
    p.push(SEP);
    p
}

/// Tags of the outbox family's key kinds.
pub const OUTBOX_DUE: &[u8] = b"d";
pub const OUTBOX_FINISHED: &[u8] = b"f";
pub const OUTBOX_PARKED: &[u8] = b"p";
const OUTBOX_ENDPOINT: &[u8] = b"e";

/// Due and finished deliveries sort by time under their tag: `tag, at, merchant, id`.
pub fn outbox_timed(tag: &[u8], at: i64, merchant: &MerchantId, id: &Ulid) -> Vec<u8> {
    let at = u64::try_from(at).unwrap_or(0).to_be_bytes();
    join(&[tag, &at, merchant.as_str().as_bytes(), &id.0])
}

/// `(at, merchant, id)` of a key made by [`outbox_timed`].
pub fn parse_outbox_timed(key: &[u8]) -> Option<(i64, MerchantId, Ulid)> {
    let at = i64::try_from(u64::from_be_bytes(key.get(2..10)?.try_into().ok()?)).ok()?;
    let id_at = key.len().checked_sub(16)?;
    let merchant = std::str::from_utf8(key.get(11..id_at.checked_sub(1)?)?).ok()?;
    Some((at, MerchantId::parse(merchant).ok()?, Ulid(key.get(id_at..)?.try_into().ok()?)))
}

/// The first key of a tag's kind: every key of it is at or after this one.
pub fn outbox_tag(tag: &[u8]) -> Vec<u8> {
    let mut p = tag.to_vec();
    p.push(SEP);
    p
}

/// A parked delivery, under its partner (partner ids are unique across merchants):
/// `p, partner, id` -> merchant.
pub fn outbox_parked(partner: &PartnerId, id: &Ulid) -> Vec<u8> {
    join(&[OUTBOX_PARKED, partner.as_str().as_bytes(), &id.0])
}

pub fn outbox_parked_prefix(partner: &PartnerId) -> Vec<u8> {
    let mut p = join(&[OUTBOX_PARKED, partner.as_str().as_bytes()]);
    p.push(SEP);
    p
}

pub fn outbox_endpoint(partner: &PartnerId) -> Vec<u8> {
    join(&[OUTBOX_ENDPOINT, partner.as_str().as_bytes()])
}

/// The prefix of every key of one partner of one merchant in a family keyed by merchant,
/// partner first (the ledger, in entry order; balances, by currency).
pub fn merchant_partner_prefix(merchant: &MerchantId, partner: &PartnerId) -> Vec<u8> {
    let mut p = join(&[merchant.as_str().as_bytes(), partner.as_str().as_bytes()]);
    p.push(SEP);
    p
}

/// The ledger in entry order across partners, for the export: `merchant, entry_id` ->
/// partner id.
pub fn ledger_order(merchant: &MerchantId, entry: &Ulid) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), &entry.0])
}

pub fn balance(merchant: &MerchantId, partner: &PartnerId, currency: Currency) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), partner.as_str().as_bytes(), currency.as_str().as_bytes()])
}

/// Tags of the signals family's key kinds.
pub const SIGNALS_PACE: &[u8] = b"p";
pub const SIGNALS_RECENT: &[u8] = b"v";
pub const SIGNALS_REVIEW: &[u8] = b"r";

pub fn pace(merchant: &MerchantId, partner: &PartnerId) -> Vec<u8> {
    join(&[SIGNALS_PACE, merchant.as_str().as_bytes(), partner.as_str().as_bytes()])
}

pub fn recent(merchant: &MerchantId, partner: &PartnerId, visitor: &[u8; 16]) -> Vec<u8> {
    join(&[SIGNALS_RECENT, merchant.as_str().as_bytes(), partner.as_str().as_bytes(), visitor])
}

/// A conversion in open review; in conversion id (time) order within the merchant.
pub fn review(merchant: &MerchantId, conversion_id: &Ulid) -> Vec<u8> {
    join(&[SIGNALS_REVIEW, merchant.as_str().as_bytes(), &conversion_id.0])
}

pub fn reviews_prefix(merchant: &MerchantId) -> Vec<u8> {
    let mut p = join(&[SIGNALS_REVIEW, merchant.as_str().as_bytes()]);
    p.push(SEP);
    p
}

pub fn partner_conversion(partner: &PartnerId, conversion_id: &Ulid) -> Vec<u8> {
    join(&[partner.as_str().as_bytes(), &conversion_id.0])
}

pub fn partner_conversions_prefix(partner: &PartnerId) -> Vec<u8> {
    let mut p = partner.as_str().as_bytes().to_vec();
    p.push(SEP);
    p
}

pub fn payout(merchant: &MerchantId, payout_id: &str) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), payout_id.as_bytes()])
}

/// `merchant, currency, partner, day (4 bytes BE)`.
pub fn earned(merchant: &MerchantId, currency: Currency, partner: &PartnerId, day: u32) -> Vec<u8> {
    join(&[merchant.as_str().as_bytes(), currency.as_str().as_bytes(), partner.as_str().as_bytes(), &day.to_be_bytes()])
}

/// The prefix of one merchant's earnings in one currency.
pub fn earned_prefix(merchant: &MerchantId, currency: Currency) -> Vec<u8> {
    let mut p = join(&[merchant.as_str().as_bytes(), currency.as_str().as_bytes()]);
    p.push(SEP);
    p
}

/// `(partner, day)` of an earnings key after its prefix.
pub fn parse_earned(rest: &[u8]) -> Option<(PartnerId, u32)> {
    let day = u32::from_be_bytes(rest.get(rest.len().checked_sub(4)?..)?.try_into().ok()?);
    let partner = std::str::from_utf8(rest.get(..rest.len().checked_sub(5)?)?).ok()?;
    Some((PartnerId::parse(partner).ok()?, day))
}

/// The rollup family's tag for the first attributed conversion of a partner.
pub const ROLLUP_FIRST: u8 = b'f';

/// The rollup family's tag of a scope and resolution: partners `q`, `h`, `d`; the
/// merchant's whole `Q`, `H`, `D`.
fn rollup_tag(scope: Scope, level: Level) -> u8 {
    let tag = match level {
        Level::Quarter => b'q',
        Level::Hour => b'h',
        Level::Day => b'd',
    };
    match scope {
        Scope::Partner => tag,
        Scope::Merchant => tag.to_ascii_uppercase(),
    }
}

/// The start of a rollup range: `merchant, tag bucket` (the bucket as 4 bytes, big-endian).
/// Every cell of `bucket` and later buckets of that scope and level sorts at or after it.
pub fn rollup_from(merchant: &MerchantId, scope: Scope, level: Level, bucket: u32) -> Vec<u8> {
    // Sized for a cell key (`rollup` appends a partner and a currency): one allocation.
    let mut key = Vec::with_capacity(merchant.as_str().len() + 6 + MAX_SLUG_LEN + 1 + 3);
    key.extend_from_slice(merchant.as_str().as_bytes());
    key.push(SEP);
    key.push(rollup_tag(scope, level));
    key.extend_from_slice(&bucket.to_be_bytes());
    key
}

/// A rollup cell: `merchant, tag bucket partner, currency` (partner and currency empty
/// when absent).
pub fn rollup(
    merchant: &MerchantId,
    scope: Scope,
    level: Level,
    bucket: u32,
    partner: Option<&PartnerId>,
    currency: Option<Currency>,
) -> Vec<u8> {
    let mut key = rollup_from(merchant, scope, level, bucket);
    key.extend_from_slice(partner.map_or("", |p| p.as_str()).as_bytes());
    key.push(SEP);
    key.extend_from_slice(currency.as_ref().map_or("", |c| c.as_str()).as_bytes());
    key
}

/// `(bucket, partner, currency)` of a cell key whose merchant part is `merchant_len` bytes.
pub fn parse_rollup(key: &[u8], merchant_len: usize) -> Option<(u32, Option<PartnerId>, Option<Currency>)> {
    let rest = key.get(merchant_len + 2..)?;
    let bucket = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let (partner, currency) = std::str::from_utf8(rest.get(4..)?).ok()?.split_once('\0')?;
    let partner = if partner.is_empty() { None } else { Some(PartnerId::parse(partner).ok()?) };
    let currency = if currency.is_empty() { None } else { Some(Currency::parse(currency).ok()?) };
    Some((bucket, partner, currency))
}

/// A partner's first attributed conversion: `merchant, f partner` -> its time (min-merged).
pub fn rollup_first(merchant: &MerchantId, partner: &PartnerId) -> Vec<u8> {
    let mut key = Vec::with_capacity(merchant.as_str().len() + 2 + partner.as_str().len());
    key.extend_from_slice(merchant.as_str().as_bytes());
    key.push(SEP);
    key.push(ROLLUP_FIRST);
    key.extend_from_slice(partner.as_str().as_bytes());
    key
}

/// The tag of a rollup key: the byte after the merchant.
pub fn rollup_kind(key: &[u8]) -> Option<u8> {
    let at = key.iter().position(|b| *b == SEP)?;
    key.get(at + 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MerchantId {
        MerchantId::parse(s).unwrap()
    }

    fn t(s: &str) -> TxnId {
        TxnId::parse(s).unwrap()
    }

    #[test]
    fn a_merchant_prefix_never_captures_a_longer_merchant_id() {
        // "a" and "a-b": every key of "a" sorts before every key of "a-b".
        let last_of_a = conversion(&m("a"), &t("~~~~"));
        let first_of_ab = conversion(&m("a-b"), &t("!"));
        assert!(last_of_a < first_of_ab);
        assert!(!first_of_ab.starts_with(&join(&[b"a", b""])));
    }

    #[test]
    fn plan_versions_sort_numerically() {
        let (mm, p) = (m("m"), PlanId::parse("std").unwrap());
        assert!(plan(&mm, &p, 9) < plan(&mm, &p, 10));
        assert!(plan(&mm, &p, 255) < plan(&mm, &p, 256));
        assert!(plan(&mm, &p, i64::MAX) < plan(&mm, &PlanId::parse("std2").unwrap(), 0));
    }

    #[test]
    fn ledger_entries_sort_by_time_within_partner() {
        let (mm, p) = (m("m"), PartnerId::parse("ann").unwrap());
        let a = ledger(&mm, &p, &Ulid::mint(1));
        let b = ledger(&mm, &p, &Ulid::mint(2));
        assert!(a < b);
        let prefix = merchant_partner_prefix(&mm, &p);
        assert!(a.starts_with(&prefix) && b.starts_with(&prefix));
        assert!(!ledger(&mm, &PartnerId::parse("ann2").unwrap(), &Ulid::mint(0)).starts_with(&prefix));
    }

    #[test]
    fn holds_sort_by_time_and_parse_back() {
        let (mm, t1) = (m("shop"), t("o-1"));
        assert!(hold(255, &mm, &t1) < hold(256, &mm, &t("a")));
        assert_eq!(parse_hold(&hold(1_790_000_000_000, &mm, &t1)), Some((1_790_000_000_000, mm, t1)));
    }

    #[test]
    fn outbox_keys_sort_by_time_and_parse_back() {
        let (mm, id) = (m("shop"), Ulid::mint(7));
        let due = outbox_timed(OUTBOX_DUE, 1_790_000_000_000, &mm, &id);
        assert_eq!(parse_outbox_timed(&due), Some((1_790_000_000_000, mm.clone(), id)));
        assert!(outbox_timed(OUTBOX_DUE, 255, &mm, &id) < outbox_timed(OUTBOX_DUE, 256, &m("a"), &Ulid::mint(0)));
        assert!(due.starts_with(&outbox_tag(OUTBOX_DUE)));
        assert!(!outbox_timed(OUTBOX_FINISHED, 0, &mm, &id).starts_with(&outbox_tag(OUTBOX_DUE)));
        let p = PartnerId::parse("ann").unwrap();
        assert!(outbox_parked(&p, &id).starts_with(&outbox_parked_prefix(&p)));
        assert!(!outbox_parked(&PartnerId::parse("ann2").unwrap(), &id).starts_with(&outbox_parked_prefix(&p)));
    }

    #[test]
    fn rollup_cells_sort_by_bucket_within_scope_and_level_and_parse_back() {
        let (mm, ann) = (m("shop"), PartnerId::parse("ann").unwrap());
        let usd = Currency::parse("USD").ok();
        let (p, q) = (Scope::Partner, Level::Quarter);
        let cell = rollup(&mm, p, q, 256, Some(&ann), usd);
        assert_eq!(parse_rollup(&cell, 4), Some((256, Some(ann.clone()), usd)));
        assert_eq!(parse_rollup(&rollup(&mm, Scope::Merchant, q, 7, None, None), 4), Some((7, None, None)));
        assert!(rollup_from(&mm, p, q, 256) <= cell && cell < rollup_from(&mm, p, q, 257));
        assert!(rollup(&mm, p, q, 255, Some(&ann), usd) < rollup_from(&mm, p, q, 256));
        // Levels and scopes never interleave; the first-conversion keys are apart too.
        // Each scope and level has its own tag byte, so their ranges never interleave.
        let tags: std::collections::BTreeSet<_> = [Scope::Partner, Scope::Merchant]
            .into_iter()
            .flat_map(|s| Level::ALL.map(|l| rollup_kind(&rollup_from(&mm, s, l, 0))))
            .chain([Some(ROLLUP_FIRST)])
            .collect();
        assert_eq!(tags.len(), 7);
        assert_eq!(rollup_kind(&rollup_first(&mm, &ann)), Some(ROLLUP_FIRST));
        assert_eq!(rollup_kind(&cell), Some(b'q'));
        assert!(ledger_order(&mm, &Ulid::mint(1)) < ledger_order(&mm, &Ulid::mint(2)));
    }

    #[test]
    fn clicks_sort_by_time() {
        assert!(click(&Ulid::mint(1000)) < click(&Ulid::mint(1001)));
    }
}
