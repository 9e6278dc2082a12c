//! A complete backend in ordered maps: the engine's [`State`] and the application of its
//! effects, nothing else. It is the model the RocksDB store is tested against (same
//! commands, same answers, same ledger) and the target of replay tests.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use super::{execute, Answer, Catalog, Command, DealAnswer, Effect, Hold, OutboxIndex, State};
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
use crate::domain::rollup::{Cell, Counters, Increment};

/// Everything the engine keeps, in memory.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    pub catalog: Catalog,
    pub conversions: BTreeMap<(MerchantId, TxnId), ConversionRecord>,
    pub clicks: BTreeMap<Ulid, ClickRecord>,
    pub visitors: BTreeMap<(LinkId, [u8; 16]), VisitorRecord>,
    pub paces: BTreeMap<(MerchantId, PartnerId), Pace>,
    pub recents: BTreeMap<(MerchantId, PartnerId, [u8; 16]), Recent>,
    /// Conversions in open fraud review, by merchant and conversion id.
    pub reviews: BTreeMap<(MerchantId, Ulid), TxnId>,
    pub accounts: BTreeMap<(MerchantId, String), AccountRecord>,
    pub customers: BTreeMap<(MerchantId, String), CustomerBinding>,
    pub months: BTreeMap<(MerchantId, PartnerId, u32), PartnerMonth>,
    pub adjustments: BTreeMap<(MerchantId, String), AdjustmentRecord>,
    pub deals: BTreeMap<(PartnerId, String), DealAnswer>,
    pub holds: BTreeSet<Hold>,
    /// `(merchant, partner, entry id)` -> entry: a partner's entries in append order.
    pub ledger: BTreeMap<(MerchantId, PartnerId, Ulid), LedgerEntry>,
    pub ledger_head: Option<Ulid>,
    pub deliveries: BTreeMap<(MerchantId, Ulid), Delivery>,
    pub outbox: BTreeSet<OutboxIndex>,
    pub endpoints: BTreeMap<PartnerId, EndpointOff>,
    /// Report rollups by quarter-hour cell, and each partner's first conversion.
    pub rollups: BTreeMap<Cell, Counters>,
    pub firsts: BTreeMap<(MerchantId, PartnerId), UnixMillis>,
    pub balances: BTreeMap<(MerchantId, PartnerId, Currency), Balance>,
    pub payouts: BTreeMap<(MerchantId, String), PayoutRun>,
    pub earned: BTreeMap<(MerchantId, Currency, PartnerId, u32), i64>,
    pub partner_conversions: BTreeMap<(PartnerId, Ulid), (MerchantId, TxnId)>,
}

impl Memory {
    /// Executes a command and applies its effects.
    pub fn submit(&mut self, command: Command) -> Answer {
        let Ok(outcome) = execute(&*self, command);
        for effect in outcome.effects {
            self.apply(effect);
        }
        outcome.answer
    }

    /// Keeps one effect.
    pub fn apply(&mut self, effect: Effect) {
        self.catalog.apply(&effect);
        match effect {
            Effect::Click(c) => {
                self.clicks.insert(c.click_id, std::sync::Arc::unwrap_or_clone(c));
            }
            Effect::Visitor { link, visitor, record } => {
                self.visitors.insert((link, visitor), *record);
            }
            Effect::Pace { merchant, partner, pace } => {
                self.paces.insert((merchant, partner), *pace);
            }
            Effect::Recent { merchant, partner, visitor, recent } => {
                self.recents.insert((merchant, partner, visitor), *recent);
            }
            Effect::Review { merchant, conversion_id, txn, open: true } => {
                self.reviews.insert((merchant, conversion_id), txn);
            }
            Effect::Review { merchant, conversion_id, open: false, .. } => {
                self.reviews.remove(&(merchant, conversion_id));
            }
            Effect::Conversion(rec) => {
                self.conversions.insert((rec.merchant_id.clone(), rec.txn_id.clone()), *rec);
            }
            Effect::Ledger(e) => {
                self.ledger.insert((e.merchant_id.clone(), e.partner_id.clone(), e.entry_id), *e);
            }
            Effect::LedgerHead(id) => self.ledger_head = Some(id),
            Effect::Account { merchant, record } => {
                self.accounts.insert((merchant, record.account.clone()), *record);
            }
            Effect::Customer { merchant, customer, binding } => {
                self.customers.insert((merchant, customer), binding);
            }
            Effect::PartnerMonth { merchant, partner, month, stats } => {
                self.months.insert((merchant, partner, month), stats);
            }
            Effect::Adjustment { merchant, record } => {
                self.adjustments.insert((merchant, record.input.adjustment_id.clone()), *record);
            }
            Effect::Deal { partner, deal_id, answer } => {
                self.deals.insert((partner, deal_id), *answer);
            }
            Effect::HoldSet(h) => {
                self.holds.insert(h);
            }
            Effect::HoldDone(h) => {
                self.holds.remove(&h);
            }
            Effect::Delivery(d) | Effect::NewDelivery(d) => {
                self.deliveries.insert((d.merchant_id.clone(), d.id), *d);
            }
            Effect::DeliveryGone { merchant, id } => {
                self.deliveries.remove(&(merchant, id));
            }
            Effect::OutboxIndex(entry, true) => {
                self.outbox.insert(entry);
            }
            Effect::OutboxIndex(entry, false) => {
                self.outbox.remove(&entry);
            }
            Effect::Endpoint { partner, off: Some(off) } => {
                self.endpoints.insert(partner, off);
            }
            Effect::Endpoint { partner, off: None } => {
                self.endpoints.remove(&partner);
            }
            Effect::PartnerConversion { partner, conversion_id, merchant, txn } => {
                self.partner_conversions.insert((partner, conversion_id), (merchant, txn));
            }
            Effect::Payout(run) => {
                self.payouts.insert((run.merchant_id.clone(), run.request.payout_id.clone()), *run);
            }
            Effect::Earned { merchant, partner, currency, day, delta } => {
                *self.earned.entry((merchant, currency, partner, day)).or_default() += delta;
            }
            Effect::Balance { merchant, partner, currency, balance } => {
                self.balances.insert((merchant, partner, currency), balance);
            }
            Effect::Rollup(inc) => match *inc {
                Increment::Add(cell, c) => self.rollups.entry(cell).or_default().add(&c),
                Increment::First { merchant, partner, at } => {
                    let first = self.firsts.entry((merchant, partner)).or_insert(at);
                    *first = (*first).min(at);
                }
            },
            Effect::Merchant(_)
            | Effect::MerchantSecrets { .. }
            | Effect::PostbackToken { .. }
            | Effect::Partner(_)
            | Effect::PartnerSecrets { .. }
            | Effect::Link(_)
            | Effect::Plan(_) => {}
        }
    }

    /// A partner's ledger entries, oldest first.
    pub fn ledger_of(&self, merchant: &MerchantId, partner: &PartnerId) -> Vec<LedgerEntry> {
        self.ledger.iter().filter(|((m, p, _), _)| m == merchant && p == partner).map(|(_, e)| e.clone()).collect()
    }
}

impl State for Memory {
    type Error = Infallible;
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }
    fn conversion(&self, m: &MerchantId, txn: &TxnId) -> Result<Option<ConversionRecord>, Infallible> {
        Ok(self.conversions.get(&(m.clone(), txn.clone())).cloned())
    }
    fn click(&self, id: &Ulid) -> Result<Option<ClickRecord>, Infallible> {
        Ok(self.clicks.get(id).cloned())
    }
    fn visitor(&self, link: &LinkId, visitor: &[u8; 16]) -> Result<Option<VisitorRecord>, Infallible> {
        Ok(self.visitors.get(&(link.clone(), *visitor)).cloned())
    }
    fn pace(&self, m: &MerchantId, p: &PartnerId) -> Result<Option<Pace>, Infallible> {
        Ok(self.paces.get(&(m.clone(), p.clone())).copied())
    }
    fn recent(&self, m: &MerchantId, p: &PartnerId, visitor: &[u8; 16]) -> Result<Option<Recent>, Infallible> {
        Ok(self.recents.get(&(m.clone(), p.clone(), *visitor)).cloned())
    }
    fn account(&self, m: &MerchantId, account: &str) -> Result<Option<AccountRecord>, Infallible> {
        Ok(self.accounts.get(&(m.clone(), account.to_string())).cloned())
    }
    fn customer(&self, m: &MerchantId, customer: &str) -> Result<Option<CustomerBinding>, Infallible> {
        Ok(self.customers.get(&(m.clone(), customer.to_string())).cloned())
    }
    fn partner_month(&self, m: &MerchantId, p: &PartnerId, month: u32) -> Result<Option<PartnerMonth>, Infallible> {
        Ok(self.months.get(&(m.clone(), p.clone(), month)).copied())
    }
    fn adjustment(&self, m: &MerchantId, id: &str) -> Result<Option<AdjustmentRecord>, Infallible> {
        Ok(self.adjustments.get(&(m.clone(), id.to_string())).cloned())
    }
    fn deal(&self, p: &PartnerId, deal_id: &str) -> Result<Option<DealAnswer>, Infallible> {
        Ok(self.deals.get(&(p.clone(), deal_id.to_string())).cloned())
    }
    fn balance(&self, m: &MerchantId, p: &PartnerId, currency: Currency) -> Result<Option<Balance>, Infallible> {
        Ok(self.balances.get(&(m.clone(), p.clone(), currency)).copied())
    }
    fn payout(&self, m: &MerchantId, payout_id: &str) -> Result<Option<PayoutRun>, Infallible> {
        Ok(self.payouts.get(&(m.clone(), payout_id.to_string())).cloned())
    }
    fn earned(&self, m: &MerchantId, currency: Currency, last_day: u32) -> Result<Vec<(PartnerId, i64)>, Infallible> {
        let mut sums: BTreeMap<PartnerId, i64> = BTreeMap::new();
        for ((mm, c, p, day), delta) in &self.earned {
            if mm == m && *c == currency && *day <= last_day {
                *sums.entry(p.clone()).or_default() += delta;
            }
        }
        Ok(sums.into_iter().collect())
    }
    fn due_holds(&self, now: UnixMillis, limit: usize) -> Result<Vec<Hold>, Infallible> {
        Ok(self.holds.iter().take_while(|h| h.at <= now).take(limit).cloned().collect())
    }
    fn ledger_head(&self) -> Result<Option<Ulid>, Infallible> {
        Ok(self.ledger_head)
    }
    fn delivery(&self, m: &MerchantId, id: &Ulid) -> Result<Option<Delivery>, Infallible> {
        Ok(self.deliveries.get(&(m.clone(), *id)).cloned())
    }
    fn endpoint(&self, p: &PartnerId) -> Result<Option<EndpointOff>, Infallible> {
        Ok(self.endpoints.get(p).cloned())
    }
    fn parked(&self, p: &PartnerId, limit: usize) -> Result<Vec<(MerchantId, Ulid)>, Infallible> {
        let mut out: Vec<(MerchantId, Ulid)> = self
            .outbox
            .iter()
            .filter_map(|e| match e {
                OutboxIndex::Parked { partner, merchant, id } if partner == p => Some((merchant.clone(), *id)),
                _ => None,
            })
            .collect();
        // The store keeps them by (partner, id): oldest first.
        out.sort_by_key(|(_, id)| *id);
        out.truncate(limit);
        Ok(out)
    }
    fn finished_before(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<Vec<(UnixMillis, MerchantId, Ulid)>, Infallible> {
        Ok(self
            .outbox
            .iter()
            .filter_map(|e| match e {
                OutboxIndex::Finished { at, merchant, id } if *at < before => Some((*at, merchant.clone(), *id)),
                _ => None,
            })
            .take(limit)
            .collect())
    }
}
