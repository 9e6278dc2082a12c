//! The single writer thread and the WAL syncer behind it.
//!
//! The writer drains the queue into one batch, decides dedupe, uniqueness and
//! attribution against the database plus the batch's own pending puts, and writes the
//! batch once to the WAL and memtables, without fsync. Clicks are answered at once. The
//! answers that promise durability (conversions, adjustments, deals, touches) go to the
//! syncer thread with the batch; it fsyncs the WAL once for every batch written since its
//! last sync, then answers them. So the writer prepares batch N+1 while batch N is being
//! fsynced, concurrent conversions share one fsync, and two identical conversions can
//! never both be created: one thread sees them in order.
//!
//! A batch read by the writer may be written but not yet synced. An answer that read
//! such data (a duplicate of a conversion whose batch is still syncing) waits for the
//! next sync too: a `2xx` never reports something that is not durable.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::money::{self, AdjustOutcome, DealAnswer, DealDraft};
use super::schema::Cf;
use super::{codec, keys, Durability, Refusal, Shared, StoreError, WriteError};
use crate::attribution::{self, ClickFacts, Decision, Facts};
use crate::domain::account::{AccountRecord, CustomerBinding, Reassignment, Touch};
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::{AdjustmentInput, ConversionInput, ConversionRecord, ConversionStatus};
use crate::domain::entities::{Merchant, Partner, Status};
use crate::domain::ids::{MerchantId, PartnerId, PlanId, Ulid};
use crate::domain::ledger::LedgerKind;
use crate::domain::link::{Link, DEFAULT_WINDOW_DAYS};
use crate::domain::plan::Plan;
use crate::signing::{SecretSet, WebhookSecret};
use crate::store::catalog::Catalog;

type Reply<T> = oneshot::Sender<T>;

pub(super) enum Op {
    Click(Box<ClickRecord>, Reply<Result<ClickRecord, StoreError>>),
    Conversion(Box<Draft>, Reply<Result<ConversionOutcome, StoreError>>),
    Batch(Vec<Draft>, Reply<Result<Vec<ConversionOutcome>, StoreError>>),
    Adjust(Box<(MerchantId, AdjustmentInput, UnixMillis)>, Reply<Result<AdjustOutcome, StoreError>>),
    Deal(Box<DealDraft>, Reply<Result<(DealAnswer, bool), StoreError>>),
    Touch(Box<(MerchantId, String, Touch)>, Reply<Result<(), StoreError>>),
    Reassign(Box<(MerchantId, String, Reassignment)>, Reply<Result<AccountRecord, StoreError>>),
    Sweep(UnixMillis, Reply<Result<u64, StoreError>>),
    Entity(Box<EntityOp>, Reply<Result<Saved, WriteError>>),
    Stop,
}

pub(super) struct Draft {
    pub merchant: MerchantId,
    pub input: ConversionInput,
    pub received_ms: UnixMillis,
}

/// What became of a conversion.
#[derive(Debug, Clone)]
pub enum ConversionOutcome {
    Created(ConversionRecord),
    Duplicate(ConversionRecord),
    Conflict(ConversionRecord),
}

/// Entity writes, checked against the catalog inside the writer.
pub enum EntityOp {
    /// Create or update; `secret` is used only when the merchant is new, `token_hash`
    /// only when the merchant is in token mode and has no token yet.
    Merchant {
        merchant: Merchant,
        secret: WebhookSecret,
        token_hash: Option<[u8; 32]>,
    },
    /// Replace the postback token of a merchant in token mode.
    RotatePostbackToken {
        merchant: MerchantId,
        token_hash: [u8; 32],
    },
    /// Make `secret` current; the previous one stays valid for `grace_ms`.
    RotateMerchantSecret {
        merchant: MerchantId,
        secret: WebhookSecret,
        now: UnixMillis,
        grace_ms: i64,
    },
    /// Create or update; `secret` (the partner API secret) is used only when the partner is new.
    Partner {
        partner: Partner,
        secret: WebhookSecret,
    },
    PausePartner {
        merchant: MerchantId,
        partner: PartnerId,
    },
    Link(Link),
    Plan(Plan),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Created,
    Updated,
}

type Done = Box<dyn FnOnce(&Result<(), StoreError>) + Send>;

/// Most holds approved by one sweep; the next sweep continues.
const SWEEP_LIMIT: usize = 10_000;

/// Runs `f` on the batch; its answer is sent once the batch is durable (or at once when
/// `f` fails, having staged nothing that matters: the caller retries).
fn defer<T: Send + 'static>(
    pending: &mut Pending<'_>,
    reply: Reply<Result<T, StoreError>>,
    f: impl FnOnce(&mut Pending<'_>) -> Result<T, StoreError>,
) {
    match f(pending) {
        Ok(value) => pending.done.push(Box::new(move |r| {
            let _ = reply.send(r.clone().map(|()| value));
        })),
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

/// One batch being built: the RocksDB batch, a view of its puts for reads inside the
/// batch, and the answers to send once it is written or once it is durable.
pub(super) struct Pending<'a> {
    pub(super) shared: &'a Shared,
    /// The database this batch reads and is written to; `None` while it cannot be opened
    /// (or after a failed write or sync, until the writer has reopened it).
    db: Option<Arc<rocksdb::DB>>,
    batch: WriteBatch,
    puts: HashMap<(Cf, Vec<u8>), Vec<u8>>,
    /// Some answer of this batch promises durability: `done` waits for the WAL sync.
    pub(super) sync: bool,
    /// Answers sent once the batch is durable.
    done: Vec<Done>,
    /// Answers sent once the batch is written (clicks: SPEC 7 syncs them within an interval).
    written: Vec<Done>,
    pub(super) ops: usize,
    pub(super) ledger: Vec<LedgerKind>,
}

impl<'a> Pending<'a> {
    fn new(shared: &'a Shared) -> Self {
        let usable = !shared.needs_reopen.load(Ordering::SeqCst);
        Pending {
            shared,
            db: shared.db().ok().filter(|_| usable),
            batch: WriteBatch::default(),
            puts: HashMap::new(),
            sync: false,
            done: Vec::new(),
            written: Vec::new(),
            ops: 0,
            ledger: Vec::new(),
        }
    }

    /// The database, or `Io` while it cannot be opened.
    pub(super) fn db(&self) -> Result<&rocksdb::DB, StoreError> {
        self.db.as_deref().ok_or_else(StoreError::reopening)
    }

    /// A value staged by this batch, not yet written.
    fn staged(&self, cf: Cf, key: &[u8]) -> Option<&Vec<u8>> {
        self.puts.get(&(cf, key.to_vec()))
    }

    /// Reads through the batch: `(value, true)` when the value is only in this batch.
    pub(super) fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        if let Some(v) = self.staged(cf, key) {
            return Ok(Some((v.clone(), true)));
        }
        let db = self.db()?;
        Ok(db.get_cf(super::cf_of(db, cf)?, key)?.map(|v| (v, false)))
    }

    pub(super) fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        let db = self.db.as_deref().ok_or_else(StoreError::reopening)?;
        self.batch.put_cf(super::cf_of(db, cf)?, &key, &value);
        if cf == Cf::Conversions {
            self.shared.recent().remove(&key);
        }
        self.puts.insert((cf, key), value);
        Ok(())
    }

    pub(super) fn delete(&mut self, cf: Cf, key: Vec<u8>) -> Result<(), StoreError> {
        let db = self.db.as_deref().ok_or_else(StoreError::reopening)?;
        self.batch.delete_cf(super::cf_of(db, cf)?, &key);
        if cf == Cf::Conversions {
            self.shared.recent().remove(&key);
        }
        self.puts.remove(&(cf, key));
        Ok(())
    }

    /// Decodes the value at `key`, reading through the batch.
    pub(super) fn read<T: serde::de::DeserializeOwned>(&self, cf: Cf, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.get(cf, key)?.map(|(v, _)| codec::decode(&v)).transpose()
    }

    pub(super) fn write<T: serde::Serialize>(&mut self, cf: Cf, key: Vec<u8>, value: &T) -> Result<(), StoreError> {
        self.put(cf, key, codec::encode(value))
    }
}

/// A written batch whose answers wait for the WAL sync.
pub(super) struct Unsynced {
    db: Arc<rocksdb::DB>,
    /// The database generation it was written to (see `Shared::generation`).
    generation: u64,
    /// The writer's sequence number of this batch.
    seq: u64,
    done: Vec<Done>,
    ledger: Vec<LedgerKind>,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    /// Written batches to the syncer.
    syncer: Sender<Unsynced>,
    /// The sequence number of the last batch handed to the syncer.
    sent: Cell<u64>,
    durability: Durability,
    max_batch: usize,
    unique_window_ms: i64,
    last_reopen: Cell<Option<Instant>>,
}

/// How often the writer tries to reopen the database while writes fail.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        syncer: Sender<Unsynced>,
        durability: Durability,
        max_batch: usize,
        unique_window_ms: i64,
    ) -> Self {
        Writer {
            shared,
            syncer,
            sent: Cell::new(0),
            durability,
            max_batch: max_batch.max(1),
            unique_window_ms,
            last_reopen: Default::default(),
        }
    }

    /// True while a batch handed to the syncer is not yet fsynced: what the writer reads
    /// from the database may then not be durable yet.
    fn syncing(&self) -> bool {
        self.durability == Durability::Fsync && self.shared.synced.load(Ordering::SeqCst) < self.sent.get()
    }

    pub(super) fn run(self, mut rx: mpsc::Receiver<Op>) {
        let mut ops = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            ops.push(first);
            while ops.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let stop = self.process(ops.drain(..));
            if stop {
                break;
            }
        }
        // Answer what is still queued: the store is closing.
        rx.close();
        while let Ok(op) = rx.try_recv() {
            drop(op);
        }
    }

    /// Applies a drained run of operations; returns true when told to stop.
    fn process(&self, ops: impl Iterator<Item = Op>) -> bool {
        let shared = &*self.shared;
        if shared.needs_reopen.load(Ordering::SeqCst) {
            self.reopen();
        }
        let mut pending = Pending::new(shared);
        let mut stop = false;
        for op in ops {
            match op {
                Op::Click(click, reply) => match self.click(&mut pending, *click) {
                    Ok(rec) => pending.written.push(Box::new(move |r| {
                        let _ = reply.send(r.clone().map(|()| rec));
                    })),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Op::Conversion(draft, reply) => match self.conversion(&mut pending, *draft) {
                    Ok((outcome, false)) if !self.syncing() => {
                        let _ = reply.send(Ok(outcome));
                    }
                    Ok((outcome, _)) => {
                        // Created, or read from a batch that is not durable yet.
                        pending.sync = true;
                        pending.done.push(Box::new(move |r| {
                            let _ = reply.send(r.clone().map(|()| outcome));
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Op::Batch(drafts, reply) => {
                    // A batch is written on its own so that a failure part-way stores none of it.
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                    let mut own = Pending::new(shared);
                    let outcomes: Result<Vec<_>, _> =
                        drafts.into_iter().map(|d| self.conversion(&mut own, d).map(|(o, _)| o)).collect();
                    match outcomes {
                        Ok(outcomes) => {
                            own.done.push(Box::new(move |r| {
                                let _ = reply.send(r.clone().map(|()| outcomes));
                            }));
                            self.commit(own);
                        }
                        Err(e) => {
                            // Its records may be among the recent ones; it is not stored.
                            shared.recent().clear();
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Op::Adjust(a, reply) => {
                    let (merchant, input, now) = *a;
                    defer(&mut pending, reply, |p| money::adjust(p, &merchant, input, now));
                }
                Op::Deal(d, reply) => defer(&mut pending, reply, |p| money::register_deal(p, *d)),
                Op::Touch(t, reply) => {
                    let (merchant, account, touch) = *t;
                    defer(&mut pending, reply, |p| money::touch(p, &merchant, &account, touch));
                }
                Op::Reassign(r, reply) => {
                    let (merchant, account, change) = *r;
                    defer(&mut pending, reply, |p| money::reassign(p, &merchant, &account, change));
                }
                Op::Sweep(now, reply) => {
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                    defer(&mut pending, reply, |p| money::sweep(p, now, SWEEP_LIMIT));
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                }
                Op::Entity(op, reply) => {
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                    let _ = reply.send(self.entity(*op));
                }
                Op::Stop => stop = true,
            }
        }
        self.commit(pending);
        stop
    }

    /// Reopens the database after a failed write, at most every [`REOPEN_EVERY`]; until
    /// it succeeds every write answers `Io` (503).
    fn reopen(&self) {
        if self.last_reopen.get().is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return;
        }
        self.last_reopen.set(Some(Instant::now()));
        if let Err(e) = self.shared.reopen() {
            tracing::error!(error = %e, "storage could not be reopened yet; retrying");
        }
    }

    /// Writes the batch without fsync and answers what needs only the write; hands the
    /// answers that promise durability to the syncer (with `fsync` durability).
    fn commit(&self, pending: Pending<'_>) {
        let Pending { db, batch, sync, done, written, ops, ledger, .. } = pending;
        let result = if ops == 0 { Ok(()) } else { self.write(db.as_deref(), batch, ops) };
        if result.is_err() {
            // It may hold records of this batch, which is not stored.
            self.shared.recent().clear();
        }
        for d in written {
            d(&result);
        }
        let wait = result.is_ok() && self.durability == Durability::Fsync && (sync || self.syncing());
        match db.filter(|_| wait && !done.is_empty()) {
            Some(db) => {
                let seq = self.sent.get() + 1;
                self.sent.set(seq);
                let generation = self.shared.generation.load(Ordering::SeqCst);
                if let Err(unsent) = self.syncer.send(Unsynced { db, generation, seq, done, ledger }) {
                    for d in unsent.0.done {
                        d(&Err(StoreError::Closed));
                    }
                }
            }
            None => {
                if result.is_ok() {
                    self.shared.metrics.count_ledger(&ledger);
                }
                for d in done {
                    d(&result);
                }
            }
        }
    }

    /// One unsynced write of a batch; a failure makes the store unready and reopens it.
    fn write(&self, db: Option<&rocksdb::DB>, batch: WriteBatch, ops: usize) -> Result<(), StoreError> {
        let m = &self.shared.metrics;
        m.write_batch_size.observe(ops as f64);
        let result = match db {
            Some(db) => db.write_opt(batch, &WriteOptions::default()).map_err(StoreError::from),
            None => Err(StoreError::reopening()),
        };
        match &result {
            Ok(()) => {
                self.shared.unsynced.store(true, Ordering::SeqCst);
                if !self.shared.ready.load(Ordering::SeqCst) {
                    tracing::warn!("storage accepts writes again");
                    self.shared.set_ready(true);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops, "storage write failed; answering 503 until a write succeeds");
                self.shared.failed();
            }
        }
        result
    }

    fn click(&self, pending: &mut Pending<'_>, mut click: ClickRecord) -> Result<ClickRecord, StoreError> {
        let vkey = keys::visitor(&click.link_id, &click.visitor);
        let last = pending.get(Cf::Visitors, &vkey)?.and_then(|(v, _)| <[u8; 8]>::try_from(v.as_slice()).ok());
        let last = last.map(i64::from_be_bytes);
        click.unique = !click.bot && last.is_none_or(|t| click.at_ms - t >= self.unique_window_ms);
        if click.unique {
            pending.put(Cf::Visitors, vkey, click.at_ms.to_be_bytes().to_vec())?;
        }
        pending.put(Cf::Clicks, keys::click(&click.click_id), codec::encode_click(&click))?;
        pending.ops += 1;
        Ok(click)
    }

    /// Keeps a record among the recent ones, durable once the next batch handed to the
    /// syncer is synced: the one being built, which stores it or comes after its read.
    fn remember(&self, key: Vec<u8>, rec: ConversionRecord) {
        let durable_after = if self.durability == Durability::Fsync { self.sent.get() + 1 } else { 0 };
        let generation = self.shared.generation.load(Ordering::SeqCst);
        self.shared.recent().insert(key, rec, durable_after, generation);
    }

    /// A conversion record written by an earlier batch: from the recent ones, else read
    /// from the database and kept as recent.
    fn stored_conversion(&self, pending: &Pending<'_>, key: &[u8]) -> Result<Option<ConversionRecord>, StoreError> {
        let db = pending.db()?;
        let recent = self.shared.recent().get(key).map(|e| e.record.clone());
        if recent.is_some() {
            return Ok(recent);
        }
        let Some(bytes) = db.get_pinned_cf(super::cf_of(db, Cf::Conversions)?, key)? else { return Ok(None) };
        let rec: ConversionRecord = codec::decode(&bytes)?;
        self.remember(key.to_vec(), rec.clone());
        Ok(Some(rec))
    }

    /// Returns the outcome and whether it must wait for this batch's write.
    fn conversion(&self, pending: &mut Pending<'_>, d: Draft) -> Result<(ConversionOutcome, bool), StoreError> {
        let key = keys::conversion(&d.merchant, &d.input.txn_id);
        let found = match pending.staged(Cf::Conversions, &key) {
            Some(bytes) => Some((codec::decode::<ConversionRecord>(bytes)?, true)),
            None => self.stored_conversion(pending, &key)?.map(|rec| (rec, false)),
        };
        if let Some((rec, in_batch)) = found {
            let outcome = if rec.same_content(&d.input) {
                ConversionOutcome::Duplicate(rec)
            } else {
                ConversionOutcome::Conflict(rec)
            };
            return Ok((outcome, in_batch));
        }
        let catalog = self.shared.catalog.snapshot();
        let facts = BatchFacts { pending: &*pending, catalog: &catalog, merchant: &d.merchant };
        let decision = attribution::decide(&d.input.keys, d.input.occurred_ms, &facts)?;
        let mut rec = ConversionRecord {
            conversion_id: Ulid::mint(d.received_ms),
            merchant_id: d.merchant.clone(),
            txn_id: d.input.txn_id,
            event: d.input.event,
            amount: d.input.amount,
            occurred_ms: d.input.occurred_ms,
            received_ms: d.received_ms,
            keys: d.input.keys,
            metadata: d.input.metadata,
            status: ConversionStatus::Pending,
            attribution: None,
            unattributed_reason: None,
            commission: None,
            commission_note: None,
            refunded_minor: 0,
            approve_at_ms: None,
            history: Vec::new(),
        };
        match decision {
            Decision::Unattributed { reason } => rec.unattributed_reason = Some(reason),
            Decision::Attributed { attribution, partner, link_id } => {
                let link = link_id.as_ref().and_then(|l| catalog.links.get(l));
                let plan = plan_for(&catalog, &d.merchant, link, &partner, rec.occurred_ms);
                rec.attribution = Some(attribution);
                super::money::credit(pending, &mut rec, &partner, plan, d.received_ms)?;
            }
        }
        pending.put(Cf::Conversions, key.clone(), codec::encode(&rec))?;
        self.remember(key, rec.clone());
        pending.sync = true;
        pending.ops += 1;
        Ok((ConversionOutcome::Created(rec), true))
    }

    /// Writes one entity on its own synced batch, then swaps the catalog.
    fn entity(&self, op: EntityOp) -> Result<Saved, WriteError> {
        let shared = &*self.shared;
        let mut catalog: Catalog = (*shared.catalog.snapshot()).clone();
        let mut batch = WriteBatch::default();
        let saved = stage_entity(shared, &mut catalog, &mut batch, op)?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        if let Err(e) = shared.db().and_then(|db| Ok(db.write_opt(batch, &opts)?)) {
            tracing::error!(error = %e, "entity write failed");
            shared.failed();
            return Err(WriteError::Store(e));
        }
        shared.catalog.replace(catalog);
        Ok(saved)
    }
}

fn refused(conflict: bool, code: &'static str, field: Option<&'static str>, detail: String) -> WriteError {
    WriteError::Refused(Refusal { conflict, code, field, detail, current_status: None })
}

/// Checks an entity write against the catalog, puts it in `batch` and applies it to
/// `catalog` (which is only published if the batch is written).
fn stage_entity(
    shared: &Shared,
    catalog: &mut Catalog,
    batch: &mut WriteBatch,
    op: EntityOp,
) -> Result<Saved, WriteError> {
    let db = shared.db()?;
    let put = |batch: &mut WriteBatch, cf: Cf, key: Vec<u8>, value: Vec<u8>| -> Result<(), WriteError> {
        batch.put_cf(super::cf_of(&db, cf)?, key, value);
        Ok(())
    };
    let no_merchant =
        |id: &MerchantId| refused(false, "merchant_not_found", None, format!("merchant {id} does not exist"));
    match op {
        EntityOp::Merchant { mut merchant, secret, token_hash } => {
            if let Some(hash) = token_hash.filter(|_| merchant.postback_token) {
                if !catalog.postback_tokens.contains_key(&merchant.id) {
                    put(batch, Cf::Secrets, keys::postback_token(&merchant.id), codec::encode(&hash))?;
                    catalog.postback_tokens.insert(merchant.id.clone(), hash);
                }
            }
            let saved = match catalog.merchants.get(&merchant.id) {
                Some(existing) => {
                    merchant.created_ms = existing.created_ms;
                    Saved::Updated
                }
                None => {
                    let secrets = SecretSet::new(secret);
                    put(batch, Cf::Secrets, keys::merchant_secrets(&merchant.id), codec::encode(&secrets))?;
                    catalog.secrets.insert(merchant.id.clone(), secrets);
                    Saved::Created
                }
            };
            put(batch, Cf::Merchants, keys::merchant(&merchant.id), codec::encode(&merchant))?;
            catalog.merchants.insert(merchant.id.clone(), merchant);
            Ok(saved)
        }
        EntityOp::RotateMerchantSecret { merchant, secret, now, grace_ms } => {
            let set = catalog.secrets.get_mut(&merchant).ok_or_else(|| no_merchant(&merchant))?;
            set.rotate(secret, now, grace_ms);
            let encoded = codec::encode(&*set);
            put(batch, Cf::Secrets, keys::merchant_secrets(&merchant), encoded)?;
            Ok(Saved::Updated)
        }
        EntityOp::RotatePostbackToken { merchant, token_hash } => {
            let m = catalog.merchants.get(&merchant).ok_or_else(|| no_merchant(&merchant))?;
            if !m.postback_token {
                return Err(refused(
                    true,
                    "token_mode_off",
                    None,
                    format!("merchant {merchant} does not use postback tokens; set postback_token: true first"),
                ));
            }
            put(batch, Cf::Secrets, keys::postback_token(&merchant), codec::encode(&token_hash))?;
            catalog.postback_tokens.insert(merchant, token_hash);
            Ok(Saved::Updated)
        }
        EntityOp::Partner { mut partner, secret } => {
            if !catalog.merchants.contains_key(&partner.merchant_id) {
                return Err(no_merchant(&partner.merchant_id));
            }
            let saved = match catalog.partners.get(&partner.id) {
                Some(p) if p.merchant_id != partner.merchant_id => {
                    return Err(refused(
                        true,
                        "partner_id_taken",
                        None,
                        format!("partner id {} is taken; partner ids are unique across merchants", partner.id),
                    ));
                }
                Some(p) => {
                    partner.created_ms = p.created_ms;
                    Saved::Updated
                }
                None => {
                    let secrets = SecretSet::new(secret);
                    put(batch, Cf::Secrets, keys::partner_secrets(&partner.id), codec::encode(&secrets))?;
                    catalog.partner_secrets.insert(partner.id.clone(), secrets);
                    Saved::Created
                }
            };
            for c in &partner.coupons {
                if catalog.coupon_owner(&partner.merchant_id, c).is_some_and(|o| o.id != partner.id) {
                    return Err(refused(
                        true,
                        "coupon_taken",
                        Some("coupons"),
                        format!("coupon {c} belongs to another partner"),
                    ));
                }
            }
            check_plan_ref(catalog, &partner.merchant_id, partner.plan_id.as_ref())?;
            put(batch, Cf::Partners, keys::partner(&partner.id), codec::encode(&partner))?;
            catalog.insert_partner(partner);
            Ok(saved)
        }
        EntityOp::PausePartner { merchant, partner } => {
            let mut p = catalog
                .partner_of(&merchant, &partner)
                .cloned()
                .ok_or_else(|| refused(false, "not_found", None, format!("partner {partner} does not exist")))?;
            p.status = Status::Paused;
            put(batch, Cf::Partners, keys::partner(&p.id), codec::encode(&p))?;
            catalog.insert_partner(p);
            Ok(Saved::Updated)
        }
        EntityOp::Link(mut link) => {
            if !catalog.merchants.contains_key(&link.merchant_id) {
                return Err(no_merchant(&link.merchant_id));
            }
            if catalog.partner_of(&link.merchant_id, &link.partner_id).is_none() {
                return Err(refused(
                    false,
                    "invalid_field",
                    Some("partner_id"),
                    format!("partner {} is not a partner of this merchant", link.partner_id),
                ));
            }
            check_plan_ref(catalog, &link.merchant_id, link.plan_id.as_ref())?;
            let saved = match catalog.links.get(&link.id) {
                Some(l) if l.merchant_id != link.merchant_id => {
                    return Err(refused(
                        true,
                        "link_id_taken",
                        None,
                        format!("link id {} is taken; link ids are unique across merchants", link.id),
                    ));
                }
                Some(l) => {
                    link.created_ms = l.created_ms;
                    Saved::Updated
                }
                None => Saved::Created,
            };
            put(batch, Cf::Links, keys::link(&link.id), codec::encode(&link))?;
            catalog.links.insert(link.id.clone(), link);
            Ok(saved)
        }
        EntityOp::Plan(plan) => {
            if !catalog.merchants.contains_key(&plan.merchant_id) {
                return Err(no_merchant(&plan.merchant_id));
            }
            let saved = match catalog.current_plan(&plan.merchant_id, &plan.id) {
                Some(current) if same_terms(current, &plan) => return Ok(Saved::Updated),
                Some(_) => Saved::Updated,
                None => Saved::Created,
            };
            put(batch, Cf::Plans, keys::plan(&plan.merchant_id, &plan.id, plan.version_from_ms), codec::encode(&plan))?;
            catalog.insert_plan(plan);
            Ok(saved)
        }
    }
}

/// Two versions with the same terms: a re-applied config adds no version.
fn same_terms(a: &Plan, b: &Plan) -> bool {
    Plan { version_from_ms: 0, ..a.clone() } == Plan { version_from_ms: 0, ..b.clone() }
}

fn check_plan_ref(catalog: &Catalog, merchant: &MerchantId, plan: Option<&PlanId>) -> Result<(), WriteError> {
    match plan {
        Some(p) if catalog.current_plan(merchant, p).is_none() => {
            Err(refused(false, "invalid_field", Some("plan_id"), format!("plan {p} does not exist for this merchant")))
        }
        _ => Ok(()),
    }
}

/// The plan that pays a credited partner: the link's, else the partner's, else the
/// merchant's default; the version in force when the conversion occurred.
fn plan_for<'c>(
    catalog: &'c Catalog,
    merchant: &MerchantId,
    link: Option<&Link>,
    partner: &Partner,
    at: UnixMillis,
) -> Result<&'c Plan, String> {
    let id = link
        .and_then(|l| l.plan_id.as_ref())
        .or(partner.plan_id.as_ref())
        .or_else(|| catalog.merchants.get(merchant).and_then(|m| m.default_plan_id.as_ref()))
        .ok_or_else(|| {
            "no commission plan applies: set plan_id on the link or the partner, or default_plan_id on the merchant"
                .to_string()
        })?;
    catalog.plan_at(merchant, id, at).ok_or_else(|| format!("plan {id} does not exist"))
}

/// Attribution's view of the store inside one batch, limited to one merchant.
struct BatchFacts<'p, 'a> {
    pending: &'p Pending<'a>,
    catalog: &'p Catalog,
    merchant: &'p MerchantId,
}

impl Facts for BatchFacts<'_, '_> {
    type Error = StoreError;

    fn partner(&self, id: &PartnerId) -> Result<Option<Partner>, StoreError> {
        Ok(self.catalog.partner_of(self.merchant, id).cloned())
    }

    fn click(&self, id: &Ulid) -> Result<Option<ClickFacts>, StoreError> {
        let Some((bytes, _)) = self.pending.get(Cf::Clicks, &keys::click(id))? else {
            return Ok(None);
        };
        let click = codec::decode_click(&bytes)?;
        if click.merchant_id != *self.merchant {
            return Ok(None);
        }
        let link = self.catalog.links.get(&click.link_id);
        Ok(Some(ClickFacts {
            click_id: click.click_id,
            window_days: link.map_or(DEFAULT_WINDOW_DAYS, |l| l.window_days),
            min_ctit_seconds: link.map_or(0, |l| l.min_ctit_seconds),
            link_id: click.link_id,
            partner_id: click.partner_id,
            at_ms: click.at_ms,
        }))
    }

    fn coupon_owner(&self, coupon: &str) -> Result<Option<Partner>, StoreError> {
        Ok(self.catalog.coupon_owner(self.merchant, coupon).cloned())
    }

    fn account(&self, account: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.pending.read(Cf::Accounts, &keys::account(self.merchant, account))
    }

    fn customer(&self, customer_id: &str) -> Result<Option<CustomerBinding>, StoreError> {
        self.pending.read(Cf::Customers, &keys::customer(self.merchant, customer_id))
    }
}

/// The WAL syncer: fsyncs the WAL once for every batch the writer handed over since the
/// last sync, then sends their answers; between batches it syncs unsynced writes (clicks,
/// `buffered` durability) every `interval` (SPEC 7). After a failed sync, every batch
/// written to the same database generation answers an error too (after a failed fsync a
/// later one may succeed without the lost pages), and the writer reopens the database.
pub(super) fn wal_syncer(shared: &Shared, rx: &Receiver<Unsynced>, interval: Duration) {
    let mut failed_generation = None;
    loop {
        let mut batches = match rx.recv_timeout(interval) {
            Ok(first) => vec![first],
            Err(RecvTimeoutError::Timeout) => {
                if shared.unsynced.load(Ordering::SeqCst) {
                    let generation = shared.generation.load(Ordering::SeqCst);
                    if let Ok(db) = shared.db() {
                        if sync_wal(shared, &db).is_err() {
                            failed_generation = Some(generation);
                        }
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        batches.extend(rx.try_iter());
        // Normally one generation; after a reopen the older batches come first.
        let mut synced: Option<(u64, Result<(), StoreError>)> = None;
        for b in batches {
            let result = match &synced {
                Some((generation, r)) if *generation == b.generation => r.clone(),
                _ if failed_generation == Some(b.generation) => {
                    Err(StoreError::Io("an earlier WAL sync failed; the storage is being reopened".into()))
                }
                _ => {
                    let r = sync_wal(shared, &b.db);
                    if r.is_err() {
                        failed_generation = Some(b.generation);
                    }
                    synced = Some((b.generation, r.clone()));
                    r
                }
            };
            drop(b.db);
            if result.is_ok() {
                shared.synced.fetch_max(b.seq, Ordering::SeqCst);
                shared.metrics.count_ledger(&b.ledger);
            }
            for d in b.done {
                d(&result);
            }
        }
    }
}

/// Fsyncs the WAL of `db`; a failure makes the store unready until the writer reopens it.
fn sync_wal(shared: &Shared, db: &rocksdb::DB) -> Result<(), StoreError> {
    #[cfg(test)]
    drop(shared.sync_hold.lock());
    shared.unsynced.store(false, Ordering::SeqCst);
    let started = Instant::now();
    match db.flush_wal(true) {
        Ok(()) => {
            shared.metrics.fsync_duration.observe(started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            shared.unsynced.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "WAL sync failed; answering 503 until the storage is reopened");
            shared.failed();
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::ConversionOutcome;
    use crate::domain::conversion::ConversionBody;
    use crate::domain::ids::MerchantId;
    use crate::store::{Durability, Store, StoreOptions};

    async fn convert(store: &Store, txn: &str) -> ConversionOutcome {
        let body: ConversionBody = serde_json::from_str(&format!(r#"{{"txn_id":"{txn}","event":"lead"}}"#)).unwrap();
        let input = body.into_input(1_800_000_000_000).unwrap();
        store.convert(MerchantId::parse("m").unwrap(), input, 1_800_000_000_000).await.unwrap()
    }

    fn open(dir: &std::path::Path) -> Store {
        let opts = StoreOptions {
            data_dir: dir.to_path_buf(),
            durability: Durability::Fsync,
            wal_sync_interval: Duration::from_secs(60),
            queue_capacity: 64,
            max_batch: 64,
            unique_window_ms: 86_400_000,
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            recent_conversions: crate::store::DEFAULT_RECENT_CONVERSIONS,
            memtable_budget_bytes: 64 << 20,
        };
        Store::open(&opts, Arc::new(crate::metrics::Metrics::new())).unwrap()
    }

    /// Duplicates are answered from the writer's recent records; an adjustment must show
    /// in the next duplicate's answer, and a restart must not change it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_duplicate_after_an_adjustment_shows_the_adjusted_record() {
        use crate::domain::conversion::{AdjustmentBody, ConversionStatus};
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert!(matches!(convert(&store, "t-adj").await, ConversionOutcome::Created(_)));
        let ConversionOutcome::Duplicate(before) = convert(&store, "t-adj").await else { panic!("not a duplicate") };
        assert_eq!(before.status, ConversionStatus::Pending);
        let body: AdjustmentBody =
            serde_json::from_str(r#"{"adjustment_id":"a1","txn_id":"t-adj","kind":"reject"}"#).unwrap();
        let merchant = MerchantId::parse("m").unwrap();
        store.adjust(merchant.clone(), body.into_input().unwrap(), 1_800_000_001_000).await.unwrap();
        let txn = crate::domain::ids::TxnId::parse("t-adj").unwrap();
        assert!(store.settled_conversion(&merchant, &txn).is_none(), "the adjustment dropped the recent record");
        let ConversionOutcome::Duplicate(after) = convert(&store, "t-adj").await else { panic!("not a duplicate") };
        assert_eq!(after.status, ConversionStatus::Rejected, "the duplicate shows the rejection");
        // Read back from the database, the record is answered in place once a later batch
        // has been synced, and shows the rejection too.
        assert!(matches!(convert(&store, "t-later").await, ConversionOutcome::Created(_)));
        let settled = store.settled_conversion(&merchant, &txn).expect("durable and recent");
        assert_eq!(settled.record.status, ConversionStatus::Rejected);
        store.shutdown_blocking_in_place();
        drop(store);
        let store = open(dir.path());
        let ConversionOutcome::Duplicate(stored) = convert(&store, "t-adj").await else { panic!("not a duplicate") };
        assert_eq!(stored.status, after.status);
        assert_eq!(stored.history.len(), after.history.len());
        store.shutdown_blocking_in_place();
    }

    /// The pipelined writer reads batches that are written but not yet fsynced. A duplicate
    /// of such a conversion must wait for the sync like the original does: answering it at
    /// once would report a conversion that a power loss could still take away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock)] // holding the syncer back across awaits is the point
    async fn a_duplicate_of_a_conversion_still_syncing_waits_for_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let hold = store.shared.sync_hold.lock().unwrap();
        let first = tokio::spawn({
            let store = store.clone();
            async move { convert(&store, "t-1").await }
        });
        // Let the writer write the first batch and hand it to the (held) syncer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = tokio::spawn({
            let store = store.clone();
            async move { convert(&store, "t-1").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!first.is_finished(), "the original was answered before its sync");
        assert!(!second.is_finished(), "the duplicate was answered before the original's sync");
        let (merchant, txn) = (MerchantId::parse("m").unwrap(), crate::domain::ids::TxnId::parse("t-1").unwrap());
        assert!(store.settled_conversion(&merchant, &txn).is_none(), "a record not yet synced is not settled");
        drop(hold);
        assert!(matches!(first.await.unwrap(), ConversionOutcome::Created(_)));
        assert!(matches!(second.await.unwrap(), ConversionOutcome::Duplicate(_)));
        assert!(store.settled_conversion(&merchant, &txn).is_some(), "a synced record is settled");
        // Once everything is synced, a duplicate is answered without waiting for another sync.
        let hold = store.shared.sync_hold.lock().unwrap();
        let third = tokio::time::timeout(Duration::from_secs(5), convert(&store, "t-1")).await;
        drop(hold);
        assert!(matches!(third, Ok(ConversionOutcome::Duplicate(_))), "a duplicate of a synced conversion waited");
        store.shutdown_blocking_in_place();
    }
}
