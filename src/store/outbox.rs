//! The outbox as the delivery worker and the admin API read it: due deliveries in time
//! order, a merchant's deliveries by id, and the backlog gauges. Reads only; every change
//! is an engine effect applied by the writer.

use rocksdb::{Direction, IteratorMode, DB};

use super::schema::Cf;
use super::{cf_of, codec, keys, StoreError};
use crate::backend::{DeliveryFilter, OutboxGauges};
use crate::domain::clock::UnixMillis;
use crate::domain::ids::{MerchantId, Ulid};
use crate::domain::outbound::Delivery;

/// The entries of a timed outbox index (`tag`: due or finished) from `from` to `until`
/// (`< until` for `finished`, whose callers ask for "before"), soonest first, at most
/// `limit`. A key that does not parse is skipped and logged.
pub(super) fn outbox_range(
    db: &DB,
    tag: &[u8],
    from: UnixMillis,
    until: UnixMillis,
    limit: usize,
) -> Result<Vec<(UnixMillis, MerchantId, Ulid)>, StoreError> {
    let prefix = keys::outbox_tag(tag);
    let mut start = prefix.clone();
    start.extend_from_slice(&u64::try_from(from).unwrap_or(0).to_be_bytes());
    let mut out = Vec::new();
    let inclusive = tag == keys::OUTBOX_DUE;
    for item in db.iterator_cf(cf_of(db, Cf::Outbox)?, IteratorMode::From(&start, Direction::Forward)) {
        let (k, _) = item?;
        if !k.starts_with(&prefix) || out.len() >= limit {
            break;
        }
        match keys::parse_outbox_timed(&k) {
            Some((at, ..)) if at > until || (!inclusive && at == until) => break,
            Some(entry) => out.push(entry),
            None => tracing::warn!(key = ?k, "an outbox key that does not parse is skipped"),
        }
    }
    Ok(out)
}

/// A delivery: its record, else the fresh delivery kept in its due key.
pub(super) fn read_delivery(db: &DB, merchant: &MerchantId, id: &Ulid) -> Result<Option<Delivery>, StoreError> {
    if let Some(v) = db.get_pinned_cf(cf_of(db, Cf::Deliveries)?, keys::delivery(merchant, id))? {
        return codec::decode(&v).map(Some);
    }
    let due = keys::outbox_timed(keys::OUTBOX_DUE, id.millis(), merchant, id);
    match db.get_pinned_cf(cf_of(db, Cf::Outbox)?, due)? {
        Some(v) if !v.is_empty() => codec::decode_fresh_delivery(merchant, *id, &v).map(Some),
        _ => Ok(None),
    }
}

/// A merchant's deliveries after `filter.after`, oldest first, that match the filter; at
/// most `filter.limit`, reading at most `scan_limit` deliveries (a filter that matches
/// little answers a short page and where to go on).
///
/// Two sources in id order, merged: the records, and the fresh deliveries kept in due
/// keys (due when they were made, so in id order too). A delivery in both is its record.
pub(super) fn list(
    db: &DB,
    merchant: &MerchantId,
    filter: &DeliveryFilter,
    scan_limit: usize,
) -> Result<(Vec<Delivery>, Option<Ulid>), StoreError> {
    let prefix = keys::merchant_prefix(merchant);
    let start = match &filter.after {
        Some(after) => {
            let mut k = keys::delivery(merchant, after);
            k.push(0);
            k
        }
        None => prefix.clone(),
    };
    let mut records: Vec<Delivery> = Vec::new();
    for item in db.iterator_cf(cf_of(db, Cf::Deliveries)?, IteratorMode::From(&start, Direction::Forward)) {
        let (k, v) = item?;
        if !k.starts_with(&prefix) || records.len() >= scan_limit {
            break;
        }
        records.push(codec::decode(&v)?);
    }
    let after = filter.after.unwrap_or(Ulid([0; 16]));
    let mut due_start = keys::outbox_tag(keys::OUTBOX_DUE);
    due_start.extend_from_slice(&u64::try_from(after.millis()).unwrap_or(0).to_be_bytes());
    let due_prefix = keys::outbox_tag(keys::OUTBOX_DUE);
    let mut fresh: Vec<Delivery> = Vec::new();
    // The due index holds every merchant's: bound the keys read, not the matches.
    let mut scanned = 0;
    let mut fresh_stop = None;
    for item in db.iterator_cf(cf_of(db, Cf::Outbox)?, IteratorMode::From(&due_start, Direction::Forward)) {
        let (k, v) = item?;
        if !k.starts_with(&due_prefix) {
            break;
        }
        let parsed = keys::parse_outbox_timed(&k);
        scanned += 1;
        if scanned > scan_limit {
            // Every fresh delivery made before this key's time has been seen.
            fresh_stop = parsed.map(|(at, ..)| Ulid::from_parts(at, [0; 10]));
            break;
        }
        if v.is_empty() {
            continue;
        }
        match parsed {
            Some((_, m, id)) if m == *merchant && id > after => fresh.push(codec::decode_fresh_delivery(&m, id, &v)?),
            _ => {}
        }
    }
    // The records are complete up to the last one read when they stopped at the limit.
    let records_stop = if records.len() >= scan_limit { records.last().map(|d| d.id) } else { None };
    let stop = match (records_stop, fresh_stop) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut all: Vec<Delivery> = records;
    let known: std::collections::HashSet<Ulid> = all.iter().map(|d| d.id).collect();
    all.extend(fresh.into_iter().filter(|d| !known.contains(&d.id)));
    all.sort_by_key(|d| d.id);
    let mut out = Vec::new();
    for d in all {
        if stop.is_some_and(|s| d.id > s) {
            return Ok((out, stop));
        }
        let wanted =
            filter.partner.as_ref().is_none_or(|p| *p == d.partner_id) && filter.state.is_none_or(|s| s == d.state);
        let id = d.id;
        if wanted {
            out.push(d);
        }
        if out.len() >= filter.limit {
            return Ok((out, Some(id)));
        }
    }
    Ok((out, stop))
}

/// The backlog: pending deliveries due (and the oldest one's creation) and parked ones,
/// counting at most `cap` of each.
pub(super) fn gauges(db: &DB, cap: usize) -> Result<OutboxGauges, StoreError> {
    let cf = cf_of(db, Cf::Outbox)?;
    let mut g = OutboxGauges::default();
    let due = keys::outbox_tag(keys::OUTBOX_DUE);
    for item in db.iterator_cf(cf, IteratorMode::From(&due, Direction::Forward)) {
        let (k, _) = item?;
        if !k.starts_with(&due) || g.pending >= cap as u64 {
            break;
        }
        g.pending += 1;
        if let Some((_, _, id)) = keys::parse_outbox_timed(&k) {
            let created = id.millis();
            g.oldest_created_ms = Some(g.oldest_created_ms.map_or(created, |o: i64| o.min(created)));
        }
    }
    let parked = keys::outbox_tag(keys::OUTBOX_PARKED);
    for item in db.iterator_cf(cf, IteratorMode::From(&parked, Direction::Forward)) {
        let (k, _) = item?;
        if !k.starts_with(&parked) || g.parked >= cap as u64 {
            break;
        }
        g.parked += 1;
    }
    Ok(g)
}
