//! A command's transaction: the state it reads, overlaid with what it has written so far,
//! and the effects in the order they were made.

use std::collections::{HashMap, HashSet};

use super::{Catalog, DealAnswer, Effect, Entropy, Hold, State};
use crate::domain::account::{AccountRecord, CustomerBinding, PartnerMonth};
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::{AdjustmentRecord, ConversionRecord};
use crate::domain::ids::{LinkId, MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::LedgerEntry;

/// Reads through a command's own writes; collects its effects.
pub struct Tx<'s, S: State + ?Sized> {
    base: &'s S,
    /// Where in `effects` the latest record of each conversion written is.
    conversions: HashMap<(MerchantId, TxnId), usize>,
    accounts: HashMap<(MerchantId, String), AccountRecord>,
    customers: HashMap<(MerchantId, String), CustomerBinding>,
    months: HashMap<(MerchantId, PartnerId, u32), PartnerMonth>,
    adjustments: HashMap<(MerchantId, String), AdjustmentRecord>,
    deals: HashMap<(PartnerId, String), DealAnswer>,
    visitors: HashMap<(LinkId, [u8; 16]), UnixMillis>,
    holds_done: HashSet<Hold>,
    head: Option<Option<Ulid>>,
    /// Ids derived from entropy so far: 0 is the conversion's own, ledger entries count on.
    minted: u32,
    effects: Vec<Effect>,
}

impl<'s, S: State + ?Sized> Tx<'s, S> {
    pub fn new(base: &'s S) -> Self {
        Tx {
            base,
            conversions: HashMap::new(),
            accounts: HashMap::new(),
            customers: HashMap::new(),
            months: HashMap::new(),
            adjustments: HashMap::new(),
            deals: HashMap::new(),
            visitors: HashMap::new(),
            holds_done: HashSet::new(),
            head: None,
            minted: 0,
            effects: Vec::new(),
        }
    }

    /// What this command wrote under a key; the key is built only when it wrote any of
    /// that kind (most commands write none, and building it allocates).
    fn staged<'m, K: std::hash::Hash + Eq, V>(&self, map: &'m HashMap<K, V>, key: impl FnOnce() -> K) -> Option<&'m V> {
        if map.is_empty() {
            None
        } else {
            map.get(&key())
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
        self.effects.push(effect);
    }

    pub fn conversion(&self, m: &MerchantId, txn: &TxnId) -> Result<Option<ConversionRecord>, S::Error> {
        let staged =
            self.staged(&self.conversions, || (m.clone(), txn.clone())).and_then(|i| match &self.effects[*i] {
                Effect::Conversion(rec) => Some((**rec).clone()),
                _ => None,
            });
        match staged {
            Some(rec) => Ok(Some(rec)),
            None => self.base.conversion(m, txn),
        }
    }

    pub fn put_conversion(&mut self, rec: ConversionRecord) {
        self.conversions.insert((rec.merchant_id.clone(), rec.txn_id.clone()), self.effects.len());
        self.effects.push(Effect::Conversion(Box::new(rec)));
    }

    pub fn click(&self, id: &Ulid) -> Result<Option<ClickRecord>, S::Error> {
        self.base.click(id)
    }

    pub fn visitor(&self, link: &LinkId, visitor: &[u8; 16]) -> Result<Option<UnixMillis>, S::Error> {
        match self.staged(&self.visitors, || (link.clone(), *visitor)) {
            Some(at) => Ok(Some(*at)),
            None => self.base.visitor(link, visitor),
        }
    }

    pub fn put_visitor(&mut self, link: LinkId, visitor: [u8; 16], at_ms: UnixMillis) {
        self.visitors.insert((link.clone(), visitor), at_ms);
        self.effects.push(Effect::Visitor { link, visitor, at_ms });
    }

    pub fn account(&self, m: &MerchantId, account: &str) -> Result<Option<AccountRecord>, S::Error> {
        match self.staged(&self.accounts, || (m.clone(), account.to_string())) {
            Some(a) => Ok(Some(a.clone())),
            None => self.base.account(m, account),
        }
    }

    pub fn put_account(&mut self, m: &MerchantId, record: AccountRecord) {
        self.accounts.insert((m.clone(), record.account.clone()), record.clone());
        self.effects.push(Effect::Account { merchant: m.clone(), record: Box::new(record) });
    }

    pub fn customer(&self, m: &MerchantId, customer: &str) -> Result<Option<CustomerBinding>, S::Error> {
        match self.staged(&self.customers, || (m.clone(), customer.to_string())) {
            Some(b) => Ok(Some(b.clone())),
            None => self.base.customer(m, customer),
        }
    }

    pub fn put_customer(&mut self, m: &MerchantId, customer: &str, binding: CustomerBinding) {
        self.customers.insert((m.clone(), customer.to_string()), binding.clone());
        self.effects.push(Effect::Customer { merchant: m.clone(), customer: customer.to_string(), binding });
    }

    /// The partner's figures for a month; zero when none are stored.
    pub fn partner_month(&self, m: &MerchantId, p: &PartnerId, month: u32) -> Result<PartnerMonth, S::Error> {
        match self.staged(&self.months, || (m.clone(), p.clone(), month)) {
            Some(s) => Ok(*s),
            None => Ok(self.base.partner_month(m, p, month)?.unwrap_or_default()),
        }
    }

    pub fn put_partner_month(&mut self, m: &MerchantId, p: &PartnerId, month: u32, stats: PartnerMonth) {
        self.months.insert((m.clone(), p.clone(), month), stats);
        self.effects.push(Effect::PartnerMonth { merchant: m.clone(), partner: p.clone(), month, stats });
    }

    pub fn adjustment(&self, m: &MerchantId, id: &str) -> Result<Option<AdjustmentRecord>, S::Error> {
        match self.staged(&self.adjustments, || (m.clone(), id.to_string())) {
            Some(a) => Ok(Some(a.clone())),
            None => self.base.adjustment(m, id),
        }
    }

    pub fn put_adjustment(&mut self, m: &MerchantId, record: AdjustmentRecord) {
        self.adjustments.insert((m.clone(), record.input.adjustment_id.clone()), record.clone());
        self.effects.push(Effect::Adjustment { merchant: m.clone(), record: Box::new(record) });
    }

    pub fn deal(&self, p: &PartnerId, deal_id: &str) -> Result<Option<DealAnswer>, S::Error> {
        match self.staged(&self.deals, || (p.clone(), deal_id.to_string())) {
            Some(d) => Ok(Some(d.clone())),
            None => self.base.deal(p, deal_id),
        }
    }

    pub fn put_deal(&mut self, p: &PartnerId, deal_id: &str, answer: DealAnswer) {
        self.deals.insert((p.clone(), deal_id.to_string()), answer.clone());
        self.effects.push(Effect::Deal { partner: p.clone(), deal_id: deal_id.to_string(), answer: Box::new(answer) });
    }

    /// Due holds not yet done by this command.
    pub fn due_holds(&self, now: UnixMillis, limit: usize) -> Result<Vec<Hold>, S::Error> {
        let mut due = self.base.due_holds(now, limit)?;
        due.retain(|h| !self.holds_done.contains(h));
        Ok(due)
    }

    pub fn hold_done(&mut self, hold: Hold) {
        self.holds_done.insert(hold.clone());
        self.effects.push(Effect::HoldDone(hold));
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
        self.effects.push(Effect::Ledger(Box::new(entry)));
        Ok(id)
    }
}

impl<S: State + ?Sized> State for Tx<'_, S> {
    type Error = S::Error;
    fn catalog(&self) -> &Catalog {
        self.base.catalog()
    }
    fn conversion(&self, m: &MerchantId, txn: &TxnId) -> Result<Option<ConversionRecord>, S::Error> {
        Tx::conversion(self, m, txn)
    }
    fn click(&self, id: &Ulid) -> Result<Option<ClickRecord>, S::Error> {
        self.base.click(id)
    }
    fn visitor(&self, link: &LinkId, visitor: &[u8; 16]) -> Result<Option<UnixMillis>, S::Error> {
        Tx::visitor(self, link, visitor)
    }
    fn account(&self, m: &MerchantId, account: &str) -> Result<Option<AccountRecord>, S::Error> {
        Tx::account(self, m, account)
    }
    fn customer(&self, m: &MerchantId, customer: &str) -> Result<Option<CustomerBinding>, S::Error> {
        Tx::customer(self, m, customer)
    }
    fn partner_month(&self, m: &MerchantId, p: &PartnerId, month: u32) -> Result<Option<PartnerMonth>, S::Error> {
        Tx::partner_month(self, m, p, month).map(Some)
    }
    fn adjustment(&self, m: &MerchantId, id: &str) -> Result<Option<AdjustmentRecord>, S::Error> {
        Tx::adjustment(self, m, id)
    }
    fn deal(&self, p: &PartnerId, deal_id: &str) -> Result<Option<DealAnswer>, S::Error> {
        Tx::deal(self, p, deal_id)
    }
    fn due_holds(&self, now: UnixMillis, limit: usize) -> Result<Vec<Hold>, S::Error> {
        Tx::due_holds(self, now, limit)
    }
    fn ledger_head(&self) -> Result<Option<Ulid>, S::Error> {
        match self.head {
            Some(h) => Ok(h),
            None => self.base.ledger_head(),
        }
    }
}
