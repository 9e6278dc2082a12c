//! [`Store`] as a [`Backend`]: commands go to the writer thread, queries are point reads
//! and prefix scans on a blocking thread, the catalog and the settled conversions are
//! in memory.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::schema::Cf;
use super::{blocking, cf_of, codec, keys, rollups, writer, Shared, Store, StoreError};
use crate::backend::{
    Backend, BoxFuture, DeliveryFilter, DeliveryPage, DueDelivery, LedgerQuery, OutboxGauges, Settled,
};
use crate::domain::account::AccountRecord;
use crate::domain::balance::Balance;
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::ConversionRecord;
use crate::domain::ids::{MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::LedgerEntry;
use crate::domain::money::Currency;
use crate::domain::outbound::{Delivery, EndpointOff};
use crate::domain::rollup::{Rows, Scope, Span};
use crate::engine::{Answer, Catalog, Command};
use crate::metrics::StorageStats;

/// Every ledger entry under `prefix` (one partner of one merchant) that `keep` keeps,
/// oldest first.
fn ledger_scan(
    shared: &Shared,
    prefix: &[u8],
    keep: impl Fn(&LedgerEntry) -> bool,
) -> Result<Vec<LedgerEntry>, StoreError> {
    let mut out = Vec::new();
    let db = shared.db()?;
    for item in db.prefix_iterator_cf(cf_of(&db, Cf::Ledger)?, prefix) {
        let (k, v) = item?;
        if !k.starts_with(prefix) {
            break;
        }
        let e = codec::decode_ledger(&v)?;
        if keep(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// Most delivery records one listing reads, whatever its filter keeps.
const LIST_SCAN_LIMIT: usize = 10_000;
/// Most keys counted for each outbox gauge; beyond it the gauge says "at least".
const GAUGE_CAP: usize = 1_000_000;

impl Store {
    /// One value read off the reactor and decoded.
    fn point<T: Send + 'static>(
        &self,
        cf: Cf,
        key: Vec<u8>,
        decode: fn(&[u8]) -> Result<T, StoreError>,
    ) -> BoxFuture<'static, Result<Option<T>, StoreError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(blocking(move || shared.get(cf, &key)?.map(|b| decode(&b)).transpose()))
    }
}

/// The conversions stored under `keys` (an index's values), in that order; a key whose
/// conversion is gone is skipped.
fn conversions_at(db: &rocksdb::DB, keys: &[Vec<u8>]) -> Result<Vec<ConversionRecord>, StoreError> {
    let conversions = cf_of(db, Cf::Conversions)?;
    let mut out = Vec::with_capacity(keys.len());
    for v in db.multi_get_cf(keys.iter().map(|k| (conversions, k.as_slice()))) {
        if let Some(bytes) = v? {
            out.push(codec::decode(&bytes)?);
        }
    }
    Ok(out)
}

impl Backend for Store {
    fn submit(&self, command: Command) -> BoxFuture<'_, Result<Answer, StoreError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.tx.send(writer::Op::Command(Box::new(command), None, tx)).await.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    /// The stored conversion of `txn` when the writer wrote or read it lately and its WAL
    /// sync is done: a duplicate is then answered on the request's own thread, without a
    /// round trip through the writer. A record changed since (an adjustment, a status
    /// move) is not here: the writer drops it when it stages the change.
    fn settled_conversion(&self, merchant: &MerchantId, txn: &TxnId) -> Option<Arc<Settled>> {
        let s = &*self.shared;
        let recent = s.recent();
        let entry = recent.get(&keys::conversion(merchant, txn))?;
        let durable = entry.durable_after <= s.synced.load(Ordering::SeqCst)
            && entry.generation == s.generation.load(Ordering::SeqCst)
            && !s.needs_reopen.load(Ordering::SeqCst);
        durable.then(|| Arc::clone(&entry.settled))
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog.snapshot()
    }

    fn visitor_salt(&self) -> &[u8] {
        self.salt.as_slice()
    }

    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

    fn conversion<'a>(
        &'a self,
        merchant: &'a MerchantId,
        txn: &'a TxnId,
    ) -> BoxFuture<'a, Result<Option<ConversionRecord>, StoreError>> {
        self.point(Cf::Conversions, keys::conversion(merchant, txn), codec::decode)
    }

    fn ledger_entries<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partner: &'a PartnerId,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>> {
        let prefix = keys::merchant_partner_prefix(merchant, partner);
        let shared = Arc::clone(&self.shared);
        Box::pin(blocking(move || ledger_scan(&shared, &prefix, |_| true)))
    }

    fn ledger_for_conversion<'a>(
        &'a self,
        rec: &'a ConversionRecord,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>> {
        let Some(a) = &rec.attribution else { return Box::pin(async { Ok(Vec::new()) }) };
        let mut prefixes = vec![keys::merchant_partner_prefix(&rec.merchant_id, &a.partner_id)];
        prefixes.extend(a.influencers.iter().map(|i| keys::merchant_partner_prefix(&rec.merchant_id, &i.partner_id)));
        let shared = Arc::clone(&self.shared);
        let txn = rec.txn_id.clone();
        Box::pin(blocking(move || {
            let mut out = Vec::new();
            for prefix in prefixes {
                out.extend(ledger_scan(&shared, &prefix, |e| e.txn_id == txn)?);
            }
            out.sort_by_key(|e| e.entry_id);
            Ok(out)
        }))
    }

    fn account<'a>(
        &'a self,
        merchant: &'a MerchantId,
        account: &'a str,
    ) -> BoxFuture<'a, Result<Option<AccountRecord>, StoreError>> {
        self.point(Cf::Accounts, keys::account(merchant, account), codec::decode)
    }

    fn click<'a>(
        &'a self,
        _merchant: &'a MerchantId,
        id: &'a Ulid,
    ) -> BoxFuture<'a, Result<Option<ClickRecord>, StoreError>> {
        self.point(Cf::Clicks, keys::click(id), codec::decode_click)
    }

    fn delivery<'a>(
        &'a self,
        merchant: &'a MerchantId,
        id: &'a Ulid,
    ) -> BoxFuture<'a, Result<Option<Delivery>, StoreError>> {
        let shared = Arc::clone(&self.shared);
        let (merchant, id) = (merchant.clone(), *id);
        Box::pin(blocking(move || super::outbox::read_delivery(&*shared.db()?, &merchant, &id)))
    }

    fn deliveries<'a>(
        &'a self,
        merchant: &'a MerchantId,
        filter: DeliveryFilter,
    ) -> BoxFuture<'a, Result<DeliveryPage, StoreError>> {
        let shared = Arc::clone(&self.shared);
        let merchant = merchant.clone();
        Box::pin(blocking(move || {
            let db = shared.db()?;
            super::outbox::list(&db, &merchant, &filter, LIST_SCAN_LIMIT)
        }))
    }

    fn due_deliveries(
        &self,
        from: UnixMillis,
        now: UnixMillis,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<DueDelivery>, StoreError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(blocking(move || {
            let db = shared.db()?;
            super::outbox::outbox_range(&db, keys::OUTBOX_DUE, from, now, limit)
        }))
    }

    fn endpoint<'a>(&'a self, partner: &'a PartnerId) -> BoxFuture<'a, Result<Option<EndpointOff>, StoreError>> {
        self.point(Cf::Outbox, keys::outbox_endpoint(partner), codec::decode)
    }

    fn outbox_gauges(&self) -> BoxFuture<'_, Result<OutboxGauges, StoreError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(blocking(move || {
            let db = shared.db()?;
            super::outbox::gauges(&db, GAUGE_CAP)
        }))
    }

    fn outbox_woken(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.outbox_wake.notified())
    }

    fn stats(&self) -> StorageStats {
        Store::stats(self)
    }

    fn backup_to(&self, dir: &Path) -> Result<(), StoreError> {
        self.checkpoint(dir)
    }

    fn partner_conversions<'a>(
        &'a self,
        partner: &'a PartnerId,
        from: Ulid,
        until: Ulid,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ConversionRecord>, StoreError>> {
        let shared = Arc::clone(&self.shared);
        let partner = partner.clone();
        Box::pin(blocking(move || {
            let db = shared.db()?;
            let prefix = keys::partner_conversions_prefix(&partner);
            let end = keys::partner_conversion(&partner, &until);
            let mut it = db.raw_iterator_cf(cf_of(&db, Cf::PartnerConversions)?);
            it.seek(keys::partner_conversion(&partner, &from));
            let mut wanted = Vec::new();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&prefix) || k >= end.as_slice() || wanted.len() >= limit {
                    break;
                }
                wanted.push(v.to_vec());
                it.next();
            }
            it.status()?;
            conversions_at(&db, &wanted)
        }))
    }

    fn open_reviews<'a>(
        &'a self,
        merchant: &'a MerchantId,
        after: Option<Ulid>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ConversionRecord>, StoreError>> {
        let shared = Arc::clone(&self.shared);
        let merchant = merchant.clone();
        Box::pin(blocking(move || {
            let db = shared.db()?;
            let prefix = keys::reviews_prefix(&merchant);
            let mut it = db.raw_iterator_cf(cf_of(&db, Cf::Signals)?);
            match after {
                // The first key after `after`'s own.
                Some(id) => {
                    let mut from = keys::review(&merchant, &id);
                    from.push(0);
                    it.seek(from);
                }
                None => it.seek(&prefix),
            }
            let mut wanted = Vec::new();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&prefix) || wanted.len() >= limit {
                    break;
                }
                let txn = std::str::from_utf8(v).ok().and_then(|t| TxnId::parse(t).ok());
                let txn = txn.ok_or_else(|| StoreError::Corrupt("review index value".into()))?;
                wanted.push(keys::conversion(&merchant, &txn));
                it.next();
            }
            it.status()?;
            conversions_at(&db, &wanted)
        }))
    }

    fn payout<'a>(
        &'a self,
        merchant: &'a MerchantId,
        payout_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<crate::domain::payout::PayoutRun>, StoreError>> {
        self.point(Cf::Payouts, keys::payout(merchant, payout_id), codec::decode)
    }

    fn balances<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partner: &'a PartnerId,
    ) -> BoxFuture<'a, Result<Vec<(Currency, Balance)>, StoreError>> {
        let shared = Arc::clone(&self.shared);
        let prefix = keys::merchant_partner_prefix(merchant, partner);
        Box::pin(blocking(move || {
            let db = shared.db()?;
            let mut out = Vec::new();
            for item in db.prefix_iterator_cf(cf_of(&db, Cf::Balances)?, &prefix) {
                let (k, v) = item?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let code = std::str::from_utf8(&k[prefix.len()..]).unwrap_or_default();
                let currency = Currency::parse(code).map_err(|e| StoreError::Corrupt(format!("balance key: {e}")))?;
                out.push((currency, codec::decode_balance(&v)?));
            }
            Ok(out)
        }))
    }

    fn rollups<'a>(
        &'a self,
        merchant: &'a MerchantId,
        scope: Scope,
        spans: Vec<(u32, Span)>,
    ) -> BoxFuture<'a, Result<Rows, StoreError>> {
        let (shared, merchant) = (Arc::clone(&self.shared), merchant.clone());
        Box::pin(blocking(move || rollups::scan(&*shared.db()?, &merchant, scope, &spans)))
    }

    fn first_conversions<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partners: Vec<PartnerId>,
    ) -> BoxFuture<'a, Result<Vec<Option<UnixMillis>>, StoreError>> {
        let (shared, merchant) = (Arc::clone(&self.shared), merchant.clone());
        Box::pin(blocking(move || rollups::firsts(&*shared.db()?, &merchant, &partners)))
    }

    fn ledger_export(&self, query: LedgerQuery) -> mpsc::Receiver<Result<Vec<LedgerEntry>, StoreError>> {
        // Two chunks in flight: memory stays bounded whatever the export's size.
        let (tx, rx) = mpsc::channel(2);
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || match shared.db() {
            Ok(db) => rollups::export(&db, &query, |chunk| tx.blocking_send(chunk).is_ok()),
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
            }
        });
        rx
    }
}
