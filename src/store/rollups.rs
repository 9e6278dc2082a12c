//! Report rollups and the ledger's entry-order index in RocksDB: the merge operator and
//! its algebra, the operands an increment writes, range reads, the ledger export, and
//! the rebuild from the stored events.
//!
//! # The merge operator (`Cf::Rollups`)
//!
//! Every write to the family is a merge; nothing is ever put or read-modified-written, so
//! the writer never reads a rollup and concurrent increments never conflict.
//!
//! - Counter cells (`q h d Q H D` keys): values are [`Counters`]; merging is
//!   component-wise wrapping addition. It is associative and commutative with the zero
//!   vector as identity, so RocksDB may merge any subset of operands in any order, at a
//!   read, a flush or a compaction, and get the same value.
//! - First-conversion keys (`f`): values are 8-byte big-endian times; merging keeps the
//!   minimum. Also associative and commutative (identity: no value).
//! - A malformed operand (never written by tally) is skipped and logged, so one bad value
//!   cannot stop compaction; `tally rollups check` finds the cell it spoiled.

use std::collections::BTreeMap;

use rocksdb::{MergeOperands, WriteBatch, DB};

use super::schema::Cf;
use super::{cf_of, codec, keys, StoreError};
use crate::backend::LedgerQuery;
use crate::domain::balance::Balance;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::ConversionRecord;
use crate::domain::ids::{MerchantId, PartnerId, Ulid};
use crate::domain::ledger::LedgerEntry;
use crate::domain::payout::{LineState, PayoutRun};
use crate::domain::rollup::{self, Counters, Increment, Level, Rows, Scope, Span, QUARTER_MS};

/// The merge operator's name, stored in the OPTIONS file: never change it for another algebra.
pub(super) const MERGE_NAME: &str = "tally.rollups.v1";

fn first_of(bytes: &[u8]) -> Option<UnixMillis> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

/// The merge operator of `Cf::Rollups` (full and partial merges alike).
pub(super) fn merge(key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    Some(combine(key, existing.into_iter().chain(operands.iter())))
}

/// The operator's algebra over any values of one key: the sum of counters, or the
/// earliest first conversion.
fn combine<'v>(key: &[u8], values: impl Iterator<Item = &'v [u8]>) -> Vec<u8> {
    let malformed = || tracing::error!(key = %String::from_utf8_lossy(key), "malformed rollup operand skipped");
    if keys::rollup_kind(key) == Some(keys::ROLLUP_FIRST) {
        let mut min: Option<UnixMillis> = None;
        for v in values {
            match first_of(v) {
                Some(t) => min = Some(min.map_or(t, |m| m.min(t))),
                None => malformed(),
            }
        }
        return min.unwrap_or(i64::MAX).to_be_bytes().to_vec();
    }
    let mut sum = Counters::default();
    for v in values {
        match Counters::decode(v) {
            Some(c) => sum.add(&c),
            None => malformed(),
        }
    }
    sum.encode().to_vec()
}

/// The merge operator of `Cf::Earned`'s name.
pub(super) const ADD_NAME: &str = "tally.add_i64.v1";

/// The merge operator of `Cf::Earned`: 8-byte big-endian `i64`s, added (wrapping): a
/// commutative monoid with 0 as identity. A malformed operand is skipped and logged.
pub(super) fn add_i64(key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut sum = 0i64;
    for v in existing.into_iter().chain(operands.iter()) {
        match <[u8; 8]>::try_from(v) {
            Ok(b) => sum = sum.wrapping_add(i64::from_be_bytes(b)),
            Err(_) => tracing::error!(key = %String::from_utf8_lossy(key), "malformed earnings operand skipped"),
        }
    }
    Some(sum.to_be_bytes().to_vec())
}

/// The merge operands an increment writes: a counter cell at each resolution, or the
/// partner's first conversion.
pub(super) fn operands(inc: &Increment) -> Vec<(Vec<u8>, Vec<u8>)> {
    match inc {
        Increment::Add(cell, counters) => {
            let at = i64::from(cell.quarter) * QUARTER_MS;
            let value = counters.encode().to_vec();
            Level::ALL
                .iter()
                .map(|&level| {
                    let key = keys::rollup(
                        &cell.merchant,
                        cell.scope(),
                        level,
                        level.bucket(at),
                        cell.partner.as_ref(),
                        cell.currency,
                    );
                    (key, value.clone())
                })
                .collect()
        }
        Increment::First { merchant, partner, at } => {
            vec![(keys::rollup_first(merchant, partner), at.to_be_bytes().to_vec())]
        }
    }
}

/// A batch's rollup increments, summed before they are written: one merge per cell and
/// resolution per batch, however many of the batch's events add to it. (Under load a
/// batch holds hundreds of clicks of a few partners: a merge per event cost a quarter of
/// the click rate, BENCHMARKS.md.) Summing first is exact: the merge operator adds.
#[derive(Default)]
pub(super) struct Staged {
    cells: crate::domain::FastMap<rollup::Cell, Counters>,
    firsts: crate::domain::FastMap<(MerchantId, PartnerId), UnixMillis>,
}

impl Staged {
    pub(super) fn with_capacity(cells: usize) -> Self {
        Staged {
            cells: crate::domain::FastMap::with_capacity_and_hasher(cells, Default::default()),
            firsts: Default::default(),
        }
    }

    pub(super) fn add(&mut self, inc: &Increment) {
        match inc {
            Increment::Add(cell, c) => match self.cells.get_mut(cell) {
                Some(sum) => sum.add(c),
                None => {
                    self.cells.insert(cell.clone(), *c);
                }
            },
            Increment::First { merchant, partner, at } => {
                let first = self.firsts.entry((merchant.clone(), partner.clone())).or_insert(*at);
                *first = (*first).min(*at);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.cells.is_empty() && self.firsts.is_empty()
    }

    /// Stages the sums as merge operands in `batch`.
    pub(super) fn write(self, db: &DB, batch: &mut WriteBatch) -> Result<(), StoreError> {
        let cf = cf_of(db, Cf::Rollups)?;
        let mut sums: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let increments =
            self.cells.into_iter().map(|(cell, c)| Increment::Add(cell, c)).chain(
                self.firsts.into_iter().map(|((merchant, partner), at)| Increment::First { merchant, partner, at }),
            );
        for inc in increments {
            for (k, v) in operands(&inc) {
                let merged = match sums.remove(&k) {
                    Some(old) => fold(&k, &old, &v),
                    None => v,
                };
                sums.insert(k, merged);
            }
        }
        for (k, v) in sums {
            batch.merge_cf(cf, k, v);
        }
        Ok(())
    }
}

/// Sums the cells of `scope` in each span, by the span's group, partner and currency.
pub(super) fn scan(db: &DB, merchant: &MerchantId, scope: Scope, spans: &[(u32, Span)]) -> Result<Rows, StoreError> {
    let mut rows = Rows::new();
    let mlen = merchant.as_str().len();
    let mut it = db.raw_iterator_cf(cf_of(db, Cf::Rollups)?);
    for (group, span) in spans {
        let end = keys::rollup_from(merchant, scope, span.level, span.until);
        it.seek(keys::rollup_from(merchant, scope, span.level, span.from));
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k >= end.as_slice() {
                break;
            }
            let (_, partner, currency) = keys::parse_rollup(k, mlen)
                .ok_or_else(|| StoreError::Corrupt(format!("rollup key {}", String::from_utf8_lossy(k))))?;
            let c = Counters::decode(v).ok_or_else(|| StoreError::Corrupt("rollup counters".into()))?;
            rows.entry((*group, partner, currency)).or_default().add(&c);
            it.next();
        }
        it.status()?;
    }
    Ok(rows)
}

/// The first attributed conversion of each partner, if any.
pub(super) fn firsts(
    db: &DB,
    merchant: &MerchantId,
    partners: &[PartnerId],
) -> Result<Vec<Option<UnixMillis>>, StoreError> {
    let cf = cf_of(db, Cf::Rollups)?;
    db.multi_get_cf(partners.iter().map(|p| (cf, keys::rollup_first(merchant, p))))
        .into_iter()
        .map(|r| Ok(r?.as_deref().and_then(first_of).filter(|t| *t != i64::MAX)))
        .collect()
}

/// Entries sent to the export stream at a time.
pub const EXPORT_CHUNK: usize = 1024;

/// Streams the entries `q` selects, in entry order, from one snapshot, `EXPORT_CHUNK` at a
/// time; stops when the receiver is gone. A storage error is sent as the last item.
pub(super) fn export(db: &DB, q: &LedgerQuery, mut send: impl FnMut(Result<Vec<LedgerEntry>, StoreError>) -> bool) {
    if let Err(e) = export_inner(db, q, &mut send) {
        send(Err(e));
    }
}

fn export_inner(
    db: &DB,
    q: &LedgerQuery,
    send: &mut impl FnMut(Result<Vec<LedgerEntry>, StoreError>) -> bool,
) -> Result<(), StoreError> {
    let snapshot = db.snapshot();
    let read = || {
        let mut o = rocksdb::ReadOptions::default();
        o.set_snapshot(&snapshot);
        // A long scan must not push the hot working set out of the block cache.
        o.fill_cache(false);
        o
    };
    let start = Ulid::from_parts(q.from, [0; 10]);
    let start = match q.after {
        Some(a) if a >= start => Ulid(u128::from_be_bytes(a.0).saturating_add(1).to_be_bytes()),
        _ => start,
    };
    let in_range = |id: &Ulid| id.millis() < q.until;
    let ledger = cf_of(db, Cf::Ledger)?;
    let mut chunk = Vec::with_capacity(EXPORT_CHUNK);
    let mut flush = |chunk: &mut Vec<LedgerEntry>| send(Ok(std::mem::replace(chunk, Vec::with_capacity(EXPORT_CHUNK))));
    match &q.partner {
        Some(partner) => {
            let prefix = keys::merchant_partner_prefix(&q.merchant, partner);
            let mut it = db.raw_iterator_cf_opt(ledger, read());
            it.seek(keys::ledger(&q.merchant, partner, &start));
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&prefix) {
                    break;
                }
                let e = codec::decode_ledger(v)?;
                if !in_range(&e.entry_id) {
                    break;
                }
                chunk.push(e);
                if chunk.len() == EXPORT_CHUNK && !flush(&mut chunk) {
                    return Ok(());
                }
                it.next();
            }
            it.status()?;
        }
        None => {
            let prefix = keys::merchant_prefix(&q.merchant);
            let mut it = db.raw_iterator_cf_opt(cf_of(db, Cf::LedgerOrder)?, read());
            it.seek(keys::ledger_order(&q.merchant, &start));
            let mut wanted = Vec::with_capacity(EXPORT_CHUNK);
            loop {
                let next = match (it.key(), it.value()) {
                    (Some(k), Some(v)) if k.starts_with(&prefix) => {
                        let id = Ulid(
                            k[prefix.len()..].try_into().map_err(|_| StoreError::Corrupt("ledger order key".into()))?,
                        );
                        let partner = std::str::from_utf8(v).ok().and_then(|p| PartnerId::parse(p).ok());
                        let partner = partner.ok_or_else(|| StoreError::Corrupt("ledger order value".into()))?;
                        in_range(&id).then_some((id, partner))
                    }
                    _ => None,
                };
                let done = next.is_none();
                if let Some((id, partner)) = next {
                    wanted.push(keys::ledger(&q.merchant, &partner, &id));
                    it.next();
                }
                if wanted.len() == EXPORT_CHUNK || (done && !wanted.is_empty()) {
                    let got = db.batched_multi_get_cf_opt(ledger, &wanted, false, &read());
                    for v in got {
                        let v = v?.ok_or_else(|| StoreError::Corrupt("ledger order names a missing entry".into()))?;
                        chunk.push(codec::decode_ledger(&v)?);
                    }
                    wanted.clear();
                    if !flush(&mut chunk) {
                        return Ok(());
                    }
                }
                if done {
                    break;
                }
            }
            it.status()?;
        }
    }
    if !chunk.is_empty() {
        flush(&mut chunk);
    }
    Ok(())
}

/// How many events a rebuild read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    pub clicks: u64,
    pub conversions: u64,
    pub ledger_entries: u64,
}

/// Merge operands are written in batches of this many.
const REBUILD_BATCH: usize = 50_000;

/// A stored record that an index is rebuilt from.
enum Indexed<'a> {
    Conversion(&'a ConversionRecord),
    Entry(&'a LedgerEntry),
}

/// Every increment the stored events make, in the order clicks, conversions, ledger
/// entries; `each` gets them with a running count of events read.
fn replay(
    db: &DB,
    mut each: impl FnMut(Option<Indexed<'_>>, Vec<Increment>, &Rebuilt) -> Result<(), StoreError>,
) -> Result<Rebuilt, StoreError> {
    let mut n = Rebuilt::default();
    for item in db.iterator_cf(cf_of(db, Cf::Clicks)?, rocksdb::IteratorMode::Start) {
        let (_, v) = item?;
        n.clicks += 1;
        each(None, vec![rollup::of_click(&codec::decode_click(&v)?)], &n)?;
    }
    for item in db.iterator_cf(cf_of(db, Cf::Conversions)?, rocksdb::IteratorMode::Start) {
        let (_, v) = item?;
        let rec: ConversionRecord = codec::decode(&v)?;
        n.conversions += 1;
        each(Some(Indexed::Conversion(&rec)), rollup::of_conversion(&rec), &n)?;
    }
    for item in db.iterator_cf(cf_of(db, Cf::Ledger)?, rocksdb::IteratorMode::Start) {
        let (_, v) = item?;
        let e = codec::decode_ledger(&v)?;
        n.ledger_entries += 1;
        let incs = rollup::of_ledger(&e);
        each(Some(Indexed::Entry(&e)), incs, &n)?;
    }
    Ok(n)
}

/// Recomputes the rollups, the ledger's entry-order index, the partners' conversion index,
/// and the partners' balances and earnings (from the conversions and payout runs) from the
/// stored events. Nothing else may write meanwhile (tally stopped, or
/// the store being opened). `progress` is called every `REBUILD_BATCH` writes.
pub(super) fn rebuild(db: &DB, progress: &mut dyn FnMut(&Rebuilt)) -> Result<Rebuilt, StoreError> {
    let (rollups, order) = (cf_of(db, Cf::Rollups)?, cf_of(db, Cf::LedgerOrder)?);
    let credits = cf_of(db, Cf::PartnerConversions)?;
    let (balances_cf, earned_cf) = (cf_of(db, Cf::Balances)?, cf_of(db, Cf::Earned)?);
    let mut balances: BTreeMap<Vec<u8>, Balance> = BTreeMap::new();
    let mut earned: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    let mut wipe = WriteBatch::default();
    for cf in [rollups, order, credits, balances_cf, earned_cf] {
        wipe.delete_range_cf(cf, b"".as_slice(), b"\xff".as_slice());
    }
    db.write(wipe)?;
    let mut batch = WriteBatch::default();
    let n = replay(db, |record, incs, n| {
        match record {
            Some(Indexed::Entry(e)) => {
                batch.put_cf(order, keys::ledger_order(&e.merchant_id, &e.entry_id), e.partner_id.as_str());
            }
            Some(Indexed::Conversion(rec)) => {
                for p in rec.credited_partners() {
                    let value = keys::conversion(&rec.merchant_id, &rec.txn_id);
                    batch.put_cf(credits, keys::partner_conversion(p, &rec.conversion_id), value);
                }
                for s in crate::domain::balance::of_conversion(rec) {
                    let b = balances.entry(keys::balance(&rec.merchant_id, &s.partner, s.currency)).or_default();
                    b.pending += s.balance.pending;
                    b.approved += s.balance.approved;
                    b.reversed += s.balance.reversed;
                    if s.earned != 0 {
                        let day = crate::engine::day_of(s.earned_at);
                        *earned.entry(keys::earned(&rec.merchant_id, s.currency, &s.partner, day)).or_default() +=
                            s.earned;
                    }
                }
            }
            None => {}
        }
        for inc in &incs {
            for (k, v) in operands(inc) {
                batch.merge_cf(rollups, k, v);
            }
        }
        if batch.len() >= REBUILD_BATCH {
            db.write(std::mem::take(&mut batch))?;
            progress(n);
        }
        Ok(())
    })?;
    // What payout runs took: in runs until confirmed, paid once confirmed.
    for item in db.iterator_cf(cf_of(db, Cf::Payouts)?, rocksdb::IteratorMode::Start) {
        let (_, v) = item?;
        let run: PayoutRun = codec::decode(&v)?;
        for line in &run.lines {
            let b =
                balances.entry(keys::balance(&run.merchant_id, &line.partner_id, line.amount.currency)).or_default();
            match line.state {
                LineState::Pending => b.in_runs += line.amount.minor,
                LineState::Paid { .. } => b.paid += line.amount.minor,
                LineState::Failed { .. } => {}
            }
        }
    }
    for (k, b) in &balances {
        batch.put_cf(balances_cf, k, codec::encode_balance(b));
    }
    for (k, e) in &earned {
        batch.put_cf(earned_cf, k, e.to_be_bytes());
    }
    db.write(batch)?;
    db.flush_wal(true)?;
    Ok(n)
}

/// A cell whose stored value differs from what the events give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub key: String,
    pub stored: String,
    pub expected: String,
}

fn show(key: &[u8], v: Option<&[u8]>) -> String {
    match v {
        None => "absent".into(),
        Some(v) if keys::rollup_kind(key) == Some(keys::ROLLUP_FIRST) => format!("{:?}", first_of(v)),
        Some(v) => format!("{:?}", Counters::decode(v)),
    }
}

/// Every stored rollup, merged: `key -> value`.
pub(super) fn dump(db: &DB) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StoreError> {
    let mut out = BTreeMap::new();
    for item in db.iterator_cf(cf_of(db, Cf::Rollups)?, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        out.insert(k.to_vec(), v.to_vec());
    }
    Ok(out)
}

/// Compares the stored rollups with what the events give; at most `limit` mismatches.
/// Holds every expected cell in memory: for maintenance, not for serving.
pub(super) fn check(db: &DB, limit: usize) -> Result<(Rebuilt, Vec<Mismatch>), StoreError> {
    let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let n = replay(db, |_, incs, _| {
        for inc in &incs {
            for (k, v) in operands(inc) {
                let merged = match expected.get(&k) {
                    None => v,
                    Some(old) => fold(&k, old, &v),
                };
                expected.insert(k, merged);
            }
        }
        Ok(())
    })?;
    let stored = dump(db)?;
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&Vec<u8>> = expected.keys().chain(stored.keys()).collect();
    for k in keys {
        let (s, e) = (stored.get(k).map(Vec::as_slice), expected.get(k).map(Vec::as_slice));
        let zero = |v: Option<&[u8]>| v.is_none_or(|v| Counters::decode(v).is_some_and(|c| c.is_zero()));
        if s != e && !(zero(s) && zero(e)) && out.len() < limit {
            out.push(Mismatch {
                key: String::from_utf8_lossy(k).replace('\0', "/"),
                stored: show(k, s),
                expected: show(k, e),
            });
        }
    }
    Ok((n, out))
}

/// Two values of one key merged as the operator would.
fn fold(key: &[u8], a: &[u8], b: &[u8]) -> Vec<u8> {
    combine(key, [a, b].into_iter())
}
