//! A command's transaction: the state it reads, overlaid with what it has written so far,
//! and the effects in the order they were made.

use super::{Catalog, DealAnswer, Effect, Entropy, Hold, OutboxIndex, State};
use crate::domain::account::{AccountRecord, CustomerBinding, PartnerMonth};
use crate::domain::balance::Balance;
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::{AdjustmentRecord, ConversionRecord};
use crate::domain::fraud::{Pace, Recent, VisitorRecord};
use crate::domain::ids::{LinkId, MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::LedgerEntry;
use crate::domain::money::Currency;
use crate::domain::outbound::{Delivery, EndpointOff};
use crate::domain::payout::PayoutRun;
use crate::domain::FastMap;

/// What an effect is stored under, for reading a command's own writes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key<'a> {
    Conversion(&'a MerchantId, &'a TxnId),
    Visitor(&'a LinkId, &'a [u8; 16]),
    Pace(&'a MerchantId, &'a PartnerId),
    Recent(&'a MerchantId, &'a PartnerId, &'a [u8; 16]),
    Account(&'a MerchantId, &'a str),
    Customer(&'a MerchantId, &'a str),
    Month(&'a MerchantId, &'a PartnerId, u32),
    Balance(&'a MerchantId, &'a PartnerId, Currency),
    Payout(&'a MerchantId, &'a str),
    Adjustment(&'a MerchantId, &'a str),
    Deal(&'a PartnerId, &'a str),
    Delivery(&'a MerchantId, &'a Ulid),
    Endpoint(&'a PartnerId),
}

impl Key<'_> {
    fn of(effect: &Effect) -> Option<Key<'_>> {
        Some(match effect {
            Effect::Conversion(r) => Key::Conversion(&r.merchant_id, &r.txn_id),
            Effect::Visitor { link, visitor, .. } => Key::Visitor(link, visitor),
            Effect::Pace { merchant, partner, .. } => Key::Pace(merchant, partner),
            Effect::Recent { merchant, partner, visitor, .. } => Key::Recent(merchant, partner, visitor),
            Effect::Account { merchant, record } => Key::Account(merchant, &record.account),
            Effect::Customer { merchant, customer, .. } => Key::Customer(merchant, customer),
            Effect::PartnerMonth { merchant, partner, month, .. } => Key::Month(merchant, partner, *month),
            Effect::Balance { merchant, partner, currency, .. } => Key::Balance(merchant, partner, *currency),
            Effect::Payout(run) => Key::Payout(&run.merchant_id, &run.request.payout_id),
            Effect::Adjustment { merchant, record } => Key::Adjustment(merchant, &record.input.adjustment_id),
            Effect::Deal { partner, deal_id, .. } => Key::Deal(partner, deal_id),
            Effect::Delivery(d) | Effect::NewDelivery(d) => Key::Delivery(&d.merchant_id, &d.id),
            Effect::DeliveryGone { merchant, id } => Key::Delivery(merchant, id),
            Effect::Endpoint { partner, .. } => Key::Endpoint(partner),
            _ => return None,
        })
    }

    /// A fixed hash (not seeded per process: the index must not make runs differ).
    fn digest(self) -> u64 {
        use std::hash::Hasher;
        #[allow(deprecated)] // SipHash with fixed keys: deterministic, and this is no hash-flooding surface
        let mut h = std::hash::SipHasher::new();
        std::hash::Hash::hash(&self, &mut h);
        h.finish()
    }
}

/// Commands with more effects than this index them by key hash; smaller ones are scanned.
const SCAN_LIMIT: usize = 16;

/// Reads through a command's own writes; collects its effects.
///
/// A read of something the command wrote is answered from its effects: a backwards scan
/// while there are few (most commands write under ten), an index by key hash for large
/// batches. No key is copied for it: a conversion pays nothing for the overlay.
pub struct Tx<'s, S: State + ?Sized> {
    base: &'s S,
    /// Key hash -> positions in `effects`, built once the command has many effects.
    index: FastMap<u64, Vec<usize>>,
    head: Option<Option<Ulid>>,
    /// Ids derived from entropy so far: 0 is the conversion's own, ledger entries count on.
    minted: u32,
    effects: Vec<Effect>,
}

impl<'s, S: State + ?Sized> Tx<'s, S> {
    pub fn new(base: &'s S) -> Self {
        // A credited conversion makes about a dozen effects (the record, its dedupe key,
        // ledger entries, balance, partner month, pace, rollups, outbox): one allocation
        // for them all (with 8 the vector grew once per conversion).
        let effects = Vec::with_capacity(16);
        Tx { base, index: FastMap::default(), head: None, minted: 0, effects }
    }

    /// The latest effect this command wrote under `key`.
    fn staged(&self, key: Key<'_>) -> Option<&Effect> {
        if self.effects.len() <= SCAN_LIMIT {
            return self.effects.iter().rev().find(|e| Key::of(e) == Some(key));
        }
        let positions = self.index.get(&key.digest())?;
        positions.iter().rev().map(|&i| &self.effects[i]).find(|e| Key::of(e) == Some(key))
    }

    /// Keeps an effect, indexing it once the command has many.
    fn keep(&mut self, effect: Effect) {
        self.effects.push(effect);
        let n = self.effects.len();
        if n == SCAN_LIMIT + 1 {
            for i in 0..n {
                if let Some(k) = Key::of(&self.effects[i]) {
                    self.index.entry(k.digest()).or_default().push(i);
                }
            }
        } else if n > SCAN_LIMIT + 1 {
            if let Some(k) = Key::of(&self.effects[n - 1]) {
                self.index.entry(k.digest()).or_default().push(n - 1);
            }
        }
    }

    /// The effects, with the ledger head once at the end when entries were appended.
    pub fn into_effects(mut self) -> Vec<Effect> {
        if let Some(Some(head)) = self.head {
            self.effects.push(Effect::LedgerHead(head));
        }
        self.effects
    }

    pub fn catalog(&self) -> &'s Catalog {
        self.base.catalog()
    }

    pub fn push(&mut self, effect: Effect) {
        self.keep(effect);
    }

    pub fn conversion(&self, m: &MerchantId, txn: &TxnId) -> Result<Option<ConversionRecord>, S::Error> {
        match self.staged(Key::Conversion(m, txn)) {
            Some(Effect::Conversion(rec)) => Ok(Some((**rec).clone())),
            _ => self.base.conversion(m, txn),
        }
    }

    pub fn put_conversion(&mut self, rec: ConversionRecord) {
        self.keep(Effect::Conversion(Box::new(rec)));
    }

    pub fn click(&self, id: &Ulid) -> Result<Option<ClickRecord>, S::Error> {
        self.base.click(id)
    }

    /// What is kept of a visitor on a link; empty when nothing is.
    pub fn visitor(&self, link: &LinkId, visitor: &[u8; 16]) -> Result<VisitorRecord, S::Error> {
        match self.staged(Key::Visitor(link, visitor)) {
            Some(Effect::Visitor { record, .. }) => Ok(**record),
            _ => Ok(self.base.visitor(link, visitor)?.unwrap_or_default()),
        }
    }

    pub fn put_visitor(&mut self, link: LinkId, visitor: [u8; 16], record: VisitorRecord) {
        self.keep(Effect::Visitor { link, visitor, record: Box::new(record) });
    }

    /// A partner's clicks and conversions of the last 24 hours; zero when none are kept.
    pub fn pace(&self, m: &MerchantId, p: &PartnerId) -> Result<Pace, S::Error> {
        match self.staged(Key::Pace(m, p)) {
            Some(Effect::Pace { pace, .. }) => Ok(**pace),
            _ => Ok(self.base.pace(m, p)?.unwrap_or_default()),
        }
    }

    pub fn put_pace(&mut self, m: &MerchantId, p: &PartnerId, pace: Pace) {
        self.keep(Effect::Pace { merchant: m.clone(), partner: p.clone(), pace: Box::new(pace) });
    }

    /// A visitor's recent conversions for a partner; empty when none are kept.
    pub fn recent(&self, m: &MerchantId, p: &PartnerId, visitor: &[u8; 16]) -> Result<Recent, S::Error> {
        match self.staged(Key::Recent(m, p, visitor)) {
            Some(Effect::Recent { recent, .. }) => Ok(**recent),
            _ => Ok(self.base.recent(m, p, visitor)?.unwrap_or_default()),
        }
    }

    pub fn put_recent(&mut self, m: &MerchantId, p: &PartnerId, visitor: [u8; 16], recent: Recent) {
        self.keep(Effect::Recent { merchant: m.clone(), partner: p.clone(), visitor, recent: Box::new(recent) });
    }

    pub fn account(&self, m: &MerchantId, account: &str) -> Result<Option<AccountRecord>, S::Error> {
        match self.staged(Key::Account(m, account)) {
            Some(Effect::Account { record, .. }) => Ok(Some((**record).clone())),
            _ => self.base.account(m, account),
        }
    }

    pub fn put_account(&mut self, m: &MerchantId, record: AccountRecord) {
        self.keep(Effect::Account { merchant: m.clone(), record: Box::new(record) });
    }

    pub fn customer(&self, m: &MerchantId, customer: &str) -> Result<Option<CustomerBinding>, S::Error> {
        match self.staged(Key::Customer(m, customer)) {
            Some(Effect::Customer { binding, .. }) => Ok(Some(binding.clone())),
            _ => self.base.customer(m, customer),
        }
    }

    pub fn put_customer(&mut self, m: &MerchantId, customer: &str, binding: CustomerBinding) {
        self.keep(Effect::Customer { merchant: m.clone(), customer: customer.to_string(), binding });
    }

    /// The partner's figures for a month; zero when none are stored.
    pub fn partner_month(&self, m: &MerchantId, p: &PartnerId, month: u32) -> Result<PartnerMonth, S::Error> {
        match self.staged(Key::Month(m, p, month)) {
            Some(Effect::PartnerMonth { stats, .. }) => Ok(*stats),
            _ => Ok(self.base.partner_month(m, p, month)?.unwrap_or_default()),
        }
    }

    pub fn put_partner_month(&mut self, m: &MerchantId, p: &PartnerId, month: u32, stats: PartnerMonth) {
        self.keep(Effect::PartnerMonth { merchant: m.clone(), partner: p.clone(), month, stats });
    }

    pub fn balance(&self, m: &MerchantId, p: &PartnerId, currency: Currency) -> Result<Balance, S::Error> {
        match self.staged(Key::Balance(m, p, currency)) {
            Some(Effect::Balance { balance, .. }) => Ok(*balance),
            _ => Ok(self.base.balance(m, p, currency)?.unwrap_or_default()),
        }
    }

    pub fn payout(&self, m: &MerchantId, payout_id: &str) -> Result<Option<PayoutRun>, S::Error> {
        match self.staged(Key::Payout(m, payout_id)) {
            Some(Effect::Payout(run)) => Ok(Some((**run).clone())),
            _ => self.base.payout(m, payout_id),
        }
    }

    /// Earnings through `last_day` as stored (a run executes on a batch of its own).
    pub fn earned(&self, m: &MerchantId, currency: Currency, last_day: u32) -> Result<Vec<(PartnerId, i64)>, S::Error> {
        self.base.earned(m, currency, last_day)
    }

    /// Changes a partner's balance in `currency` by `f`.
    pub fn update_balance(
        &mut self,
        m: &MerchantId,
        p: &PartnerId,
        currency: Currency,
        f: impl FnOnce(&mut Balance),
    ) -> Result<(), S::Error> {
        let mut balance = self.balance(m, p, currency)?;
        f(&mut balance);
        self.keep(Effect::Balance { merchant: m.clone(), partner: p.clone(), currency, balance });
        Ok(())
    }

    pub fn adjustment(&self, m: &MerchantId, id: &str) -> Result<Option<AdjustmentRecord>, S::Error> {
        match self.staged(Key::Adjustment(m, id)) {
            Some(Effect::Adjustment { record, .. }) => Ok(Some((**record).clone())),
            _ => self.base.adjustment(m, id),
        }
    }

    pub fn put_adjustment(&mut self, m: &MerchantId, record: AdjustmentRecord) {
        self.keep(Effect::Adjustment { merchant: m.clone(), record: Box::new(record) });
    }

    pub fn deal(&self, p: &PartnerId, deal_id: &str) -> Result<Option<DealAnswer>, S::Error> {
        match self.staged(Key::Deal(p, deal_id)) {
            Some(Effect::Deal { answer, .. }) => Ok(Some((**answer).clone())),
            _ => self.base.deal(p, deal_id),
        }
    }

    pub fn put_deal(&mut self, p: &PartnerId, deal_id: &str, answer: DealAnswer) {
        self.keep(Effect::Deal { partner: p.clone(), deal_id: deal_id.to_string(), answer: Box::new(answer) });
    }

    /// Due holds not yet done by this command.
    pub fn due_holds(&self, now: UnixMillis, limit: usize) -> Result<Vec<Hold>, S::Error> {
        let mut due = self.base.due_holds(now, limit)?;
        due.retain(|h| !self.effects.iter().any(|e| matches!(e, Effect::HoldDone(done) if done == h)));
        Ok(due)
    }

    pub fn hold_done(&mut self, hold: Hold) {
        self.keep(Effect::HoldDone(hold));
    }

    /// A fresh id at `at`, unguessable, from this command's entropy.
    pub fn mint(&mut self, at: UnixMillis, entropy: &Entropy) -> Ulid {
        self.minted += 1;
        Ulid::from_parts(at, entropy.bits(self.minted))
    }

    pub fn delivery(&self, m: &MerchantId, id: &Ulid) -> Result<Option<Delivery>, S::Error> {
        match self.staged(Key::Delivery(m, id)) {
            Some(Effect::Delivery(d) | Effect::NewDelivery(d)) => Ok(Some((**d).clone())),
            Some(_) => Ok(None),
            None => self.base.delivery(m, id),
        }
    }

    pub fn put_delivery(&mut self, d: Delivery) {
        self.keep(Effect::Delivery(Box::new(d)));
    }

    /// A delivery its event has just made.
    pub fn new_delivery(&mut self, d: Delivery) {
        self.keep(Effect::NewDelivery(Box::new(d)));
    }

    pub fn endpoint(&self, p: &PartnerId) -> Result<Option<EndpointOff>, S::Error> {
        match self.staged(Key::Endpoint(p)) {
            Some(Effect::Endpoint { off, .. }) => Ok(off.clone()),
            _ => self.base.endpoint(p),
        }
    }

    /// Parked deliveries not yet resumed by this command.
    pub fn parked(&self, p: &PartnerId, limit: usize) -> Result<Vec<(MerchantId, Ulid)>, S::Error> {
        let mut parked = self.base.parked(p, limit)?;
        parked.retain(|(m, id)| {
            !self.effects.iter().any(|e| {
                matches!(e, Effect::OutboxIndex(OutboxIndex::Parked { partner, merchant, id: i }, false)
                    if partner == p && merchant == m && i == id)
            })
        });
        Ok(parked)
    }

    pub fn finished_before(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<Vec<(UnixMillis, MerchantId, Ulid)>, S::Error> {
        self.base.finished_before(before, limit)
    }

    /// The id of this command's conversion: its receipt time and the first bits of its entropy.
    pub fn conversion_id(&self, at: UnixMillis, entropy: &Entropy) -> Ulid {
        Ulid::from_parts(at, entropy.bits(0))
    }

    /// Appends a ledger entry whose id is after every earlier entry's: time-ordered,
    /// unguessable, never equal, so a partner's entries read back in append order.
    pub fn append_ledger(&mut self, mut entry: LedgerEntry, entropy: &Entropy) -> Result<Ulid, S::Error> {
        let head = match self.head {
            Some(h) => h,
            None => self.base.ledger_head()?,
        };
        self.minted += 1;
        let minted = u128::from_be_bytes(Ulid::from_parts(entry.at_ms, entropy.bits(self.minted)).0);
        let last = head.map_or(0, |h| u128::from_be_bytes(h.0));
        let id = Ulid(if minted > last { minted } else { last.saturating_add(1) }.to_be_bytes());
        self.head = Some(Some(id));
        entry.entry_id = id;
        for increment in crate::domain::rollup::of_ledger(&entry) {
            self.keep(Effect::Rollup(Box::new(increment)));
        }
        self.keep(Effect::Ledger(Box::new(entry)));
        Ok(id)
    }
}
