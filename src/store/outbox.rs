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

/// A merchant's deliveries after `filter.after`, oldest first, that match the filter; at
/// most `filter.limit`, reading at most `scan_limit` records (a filter that matches little
/// answers a short page and where to go on).
pub(super) fn list(
    db: &DB,
    merchant: &MerchantId,
    filter: &DeliveryFilter,
    scan_limit: usize,
) -> Result<(Vec<Delivery>, Option<Ulid>), StoreError> {
    let prefix = keys::delivery_prefix(merchant);
    let start = match &filter.after {
        Some(after) => {
            let mut k = keys::delivery(merchant, after);
            k.push(0);
            k
        }
        None => prefix.clone(),
    };
    let mut out = Vec::new();
    let mut scanned = 0;
    for item in db.iterator_cf(cf_of(db, Cf::Deliveries)?, IteratorMode::From(&start, Direction::Forward)) {
        let (k, v) = item?;
        if !k.starts_with(&prefix) {
            return Ok((out, None));
        }
        let d: Delivery = codec::decode(&v)?;
        let last = Some(d.id);
        scanned += 1;
        let wanted =
            filter.partner.as_ref().is_none_or(|p| *p == d.partner_id) && filter.state.is_none_or(|s| s == d.state);
        if wanted {
            out.push(d);
        }
        if out.len() >= filter.limit || scanned >= scan_limit {
            return Ok((out, last));
        }
    }
    Ok((out, None))
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
