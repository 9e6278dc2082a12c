//! The engine's [`State`] over the database plus the batch being built: a command sees
//! what earlier commands of the same batch staged. The view also tells the writer whether
//! a command read anything staged (then its answer waits for the batch to be durable).

use std::borrow::Cow;
use std::cell::Cell;

use super::schema::Cf;
use super::writer::{Pending, Writer};
use super::{cf_of, codec, keys, StoreError};
use crate::domain::account::{AccountRecord, CustomerBinding, PartnerMonth};
use crate::domain::balance::Balance;
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::{AdjustmentRecord, ConversionRecord};
use crate::domain::fraud::{Pace, Recent, VisitorRecord};
use crate::domain::ids::{LinkId, MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::money::Currency;
use crate::domain::outbound::{Delivery, EndpointOff};
use crate::domain::payout::PayoutRun;
use crate::engine::{Catalog, DealAnswer, Hold, State};

pub(super) struct View<'v, 'a> {
    pending: &'v Pending<'a>,
    catalog: &'v Catalog,
    writer: &'v Writer,
    /// Set when a read was answered from the batch, not from the database.
    read_staged: Cell<bool>,
}

impl<'v, 'a> View<'v, 'a> {
    pub(super) fn new(pending: &'v Pending<'a>, catalog: &'v Catalog, writer: &'v Writer) -> Self {
        View { pending, catalog, writer, read_staged: Cell::new(false) }
    }

    /// Whether some read was answered from the batch being built.
    pub(super) fn read_staged(&self) -> bool {
        self.read_staged.get()
    }

    /// Reads through the batch: what it staged (a staged value is borrowed, not copied),
    /// else what the writer keeps, else the database.
    fn bytes(&self, cf: Cf, key: &[u8]) -> Result<Option<Cow<'_, [u8]>>, StoreError> {
        match self.pending.staged(cf, key) {
            Some(Some(v)) => {
                self.read_staged.set(true);
                return Ok(Some(Cow::Borrowed(v.as_slice())));
            }
            Some(None) => return Ok(None),
            None => {}
        }
        if Writer::keeps(cf) {
            if let Some(kept) = self.writer.hot_record(cf, key) {
                return Ok(Some(Cow::Owned(kept)));
            }
        }
        let stored = self.pending.stored(cf, key)?;
        if let Some(v) = &stored {
            self.writer.keep_read(cf, key, v);
        }
        Ok(stored.map(Cow::Owned))
    }

    fn read<T: serde::de::DeserializeOwned>(&self, cf: Cf, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.bytes(cf, key)?.map(|v| codec::decode(&v)).transpose()
    }
}

impl State for View<'_, '_> {
    type Error = StoreError;

    fn catalog(&self) -> &Catalog {
        self.catalog
    }

    fn conversion(&self, m: &MerchantId, txn: &TxnId) -> Result<Option<ConversionRecord>, StoreError> {
        let key = keys::conversion(m, txn);
        if let Some(staged) = self.pending.staged(Cf::Conversions, &key) {
            self.read_staged.set(true);
            return staged.map(|bytes| codec::decode(bytes)).transpose();
        }
        self.writer.stored_conversion(self.pending, &key)
    }

    fn click(&self, id: &Ulid) -> Result<Option<ClickRecord>, StoreError> {
        self.bytes(Cf::Clicks, &keys::click(id))?.map(|b| codec::decode_click(&b)).transpose()
    }

    fn visitor(&self, link: &LinkId, visitor: &[u8; 16]) -> Result<Option<VisitorRecord>, StoreError> {
        let bytes = self.bytes(Cf::Visitors, &keys::visitor(link, visitor))?;
        bytes.map(|b| VisitorRecord::decode(&b).ok_or_else(|| StoreError::Corrupt("visitor record".into()))).transpose()
    }

    fn pace(&self, m: &MerchantId, p: &PartnerId) -> Result<Option<Pace>, StoreError> {
        let bytes = self.bytes(Cf::Signals, &keys::pace(m, p))?;
        bytes.map(|b| Pace::decode(&b).ok_or_else(|| StoreError::Corrupt("partner pace".into()))).transpose()
    }

    fn recent(&self, m: &MerchantId, p: &PartnerId, visitor: &[u8; 16]) -> Result<Option<Recent>, StoreError> {
        let bytes = self.bytes(Cf::Signals, &keys::recent(m, p, visitor))?;
        bytes.map(|b| Recent::decode(&b).ok_or_else(|| StoreError::Corrupt("recent conversions".into()))).transpose()
    }

    fn account(&self, m: &MerchantId, account: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.read(Cf::Accounts, &keys::account(m, account))
    }

    fn customer(&self, m: &MerchantId, customer: &str) -> Result<Option<CustomerBinding>, StoreError> {
        self.read(Cf::Customers, &keys::customer(m, customer))
    }

    fn partner_month(&self, m: &MerchantId, p: &PartnerId, month: u32) -> Result<Option<PartnerMonth>, StoreError> {
        self.bytes(Cf::PartnerMonths, &keys::partner_month(m, p, month))?.map(|b| codec::decode_month(&b)).transpose()
    }

    fn balance(&self, m: &MerchantId, p: &PartnerId, currency: Currency) -> Result<Option<Balance>, StoreError> {
        self.bytes(Cf::Balances, &keys::balance(m, p, currency))?.map(|b| codec::decode_balance(&b)).transpose()
    }

    fn payout(&self, m: &MerchantId, payout_id: &str) -> Result<Option<PayoutRun>, StoreError> {
        self.read(Cf::Payouts, &keys::payout(m, payout_id))
    }

    /// Reads the database only: the writer runs a payout run on a batch of its own.
    fn earned(&self, m: &MerchantId, currency: Currency, last_day: u32) -> Result<Vec<(PartnerId, i64)>, StoreError> {
        let db = self.pending.db()?;
        let prefix = keys::earned_prefix(m, currency);
        let mut sums: std::collections::BTreeMap<PartnerId, i64> = std::collections::BTreeMap::new();
        for item in db.prefix_iterator_cf(cf_of(db, Cf::Earned)?, &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let (partner, day) = keys::parse_earned(&k[prefix.len()..])
                .ok_or_else(|| StoreError::Corrupt(format!("earnings key {}", String::from_utf8_lossy(&k))))?;
            let value = <[u8; 8]>::try_from(&*v).map_err(|_| StoreError::Corrupt("earnings value".into()))?;
            if day <= last_day {
                *sums.entry(partner).or_default() += i64::from_be_bytes(value);
            }
        }
        Ok(sums.into_iter().collect())
    }

    fn adjustment(&self, m: &MerchantId, id: &str) -> Result<Option<AdjustmentRecord>, StoreError> {
        self.read(Cf::Adjustments, &keys::adjustment(m, id))
    }

    fn deal(&self, p: &PartnerId, deal_id: &str) -> Result<Option<DealAnswer>, StoreError> {
        self.read(Cf::Deals, &keys::deal(p, deal_id))
    }

    /// Reads the database only: the writer runs a sweep on a batch of its own, so nothing
    /// about holds is staged. A key that does not parse is skipped (and logged).
    fn due_holds(&self, now: UnixMillis, limit: usize) -> Result<Vec<Hold>, StoreError> {
        let db = self.pending.db()?;
        let mut due = Vec::new();
        for item in db.iterator_cf(cf_of(db, Cf::Holds)?, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            match keys::parse_hold(&k) {
                Some((at, _, _)) if at > now => break,
                Some((at, merchant, txn)) => due.push(Hold { at, merchant, txn }),
                None => tracing::warn!(key = ?k, "a hold key that does not parse is skipped"),
            }
            if due.len() >= limit {
                break;
            }
        }
        Ok(due)
    }

    fn ledger_head(&self) -> Result<Option<Ulid>, StoreError> {
        if let Some(head) = self.pending.ledger_head {
            self.read_staged.set(true);
            return Ok(Some(Ulid(head)));
        }
        if let Some(head) = self.writer.kept_head() {
            return Ok(Some(Ulid(head)));
        }
        let head = newest_entry(self.pending.db()?)?;
        if let Some(head) = head {
            self.writer.keep_head(head);
        }
        Ok(head.map(Ulid))
    }

    /// Its record, else the fresh delivery kept in its due key.
    fn delivery(&self, m: &MerchantId, id: &Ulid) -> Result<Option<Delivery>, StoreError> {
        if let Some(d) = self.read(Cf::Deliveries, &keys::delivery(m, id))? {
            return Ok(Some(d));
        }
        let due = self.bytes(Cf::Outbox, &keys::outbox_timed(keys::OUTBOX_DUE, id.millis(), m, id))?;
        due.filter(|v| !v.is_empty()).map(|v| codec::decode_fresh_delivery(m, *id, &v)).transpose()
    }

    fn endpoint(&self, p: &PartnerId) -> Result<Option<EndpointOff>, StoreError> {
        self.read(Cf::Outbox, &keys::outbox_endpoint(p))
    }

    /// Reads the database only: the writer runs an enable on a batch of its own.
    fn parked(&self, p: &PartnerId, limit: usize) -> Result<Vec<(MerchantId, Ulid)>, StoreError> {
        let db = self.pending.db()?;
        let prefix = keys::outbox_parked_prefix(p);
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(cf_of(db, Cf::Outbox)?, &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let id = k.get(prefix.len()..).and_then(|b| <[u8; 16]>::try_from(b).ok()).map(Ulid);
            let merchant = std::str::from_utf8(&v).ok().and_then(|m| MerchantId::parse(m).ok());
            match (merchant, id) {
                (Some(m), Some(id)) => out.push((m, id)),
                _ => tracing::warn!(key = ?k, "a parked-delivery key that does not parse is skipped"),
            }
        }
        Ok(out)
    }

    /// Reads the database only: the writer runs a prune on a batch of its own.
    fn finished_before(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<Vec<(UnixMillis, MerchantId, Ulid)>, StoreError> {
        let db = self.pending.db()?;
        super::outbox::outbox_range(db, keys::OUTBOX_FINISHED, i64::MIN, before, limit)
    }
}

/// The newest ledger entry id the database holds: the largest of each merchant's last
/// entry in the ledger order (two seeks per merchant). The head is not stored: the
/// writer derives it once per database generation and advances it with each batch.
fn newest_entry(db: &rocksdb::DB) -> Result<Option<[u8; 16]>, StoreError> {
    const ENTRY: usize = 16;
    let mut it = db.raw_iterator_cf(cf_of(db, Cf::LedgerOrder)?);
    let mut newest: Option<[u8; 16]> = None;
    it.seek_to_first();
    while let Some(key) = it.key() {
        // `merchant, 0x00, entry`: `merchant, 0x01` sorts after all of the merchant's
        // entries and before the next merchant (slugs have no byte below 0x2d).
        let merchant =
            key.len().checked_sub(ENTRY + 1).ok_or_else(|| StoreError::Corrupt("ledger order key".into()))?;
        let mut after = key[..=merchant].to_vec();
        after[merchant] = 1;
        it.seek_for_prev(&after);
        // At least the entry just seen: the merchant's last one.
        let last = it.key().filter(|k| k.len() == merchant + 1 + ENTRY && k[..merchant] == after[..merchant]);
        if let Some(entry) = last.and_then(|k| <[u8; ENTRY]>::try_from(&k[merchant + 1..]).ok()) {
            newest = newest.max(Some(entry));
        }
        it.seek(&after);
    }
    it.status()?;
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::{newest_entry, Cf};
    use crate::domain::ids::{MerchantId, Ulid};
    use crate::store::keys;

    /// The derived head is the newest entry of any merchant, whatever the merchants' names
    /// (one a prefix of another) and the entries' bytes (0x00, 0x01 and 0xff included).
    #[test]
    fn the_ledger_head_is_the_newest_entry_of_any_merchant() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = super::super::open_db(dir.path(), &opts, false).unwrap();
        assert_eq!(newest_entry(&db).unwrap(), None, "an empty ledger has no head");
        let order = db.cf_handle(Cf::LedgerOrder.name()).unwrap();
        let entry = |first: u8, fill: u8| {
            let mut id = [fill; 16];
            id[0] = first;
            Ulid(id)
        };
        let entries = [
            ("a", entry(1, 0xff)),
            ("a", entry(2, 0x00)),
            ("ab", entry(3, 0x01)),
            ("ab", entry(9, 0x00)), // the newest
            ("ab-c", entry(4, 0xff)),
            ("b", entry(0, 0xff)),
            ("z", entry(8, 0x01)),
        ];
        for (m, id) in &entries {
            db.put_cf(order, keys::ledger_order(&MerchantId::parse(m).unwrap(), id), b"p").unwrap();
        }
        assert_eq!(newest_entry(&db).unwrap(), Some(entry(9, 0x00).0));
        db.put_cf(order, keys::ledger_order(&MerchantId::parse("zz").unwrap(), &entry(10, 0)), b"p").unwrap();
        assert_eq!(newest_entry(&db).unwrap(), Some(entry(10, 0).0), "the last merchant's too");
    }
}
