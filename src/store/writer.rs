//! The single writer thread and the WAL syncer behind it.
//!
//! The writer drains the queue into one batch and runs each command through the engine
//! against the database plus what the batch has staged ([`super::view`]), then stages the
//! command's effects ([`super::apply`]). It decides nothing itself: dedupe, uniqueness,
//! attribution and money are the engine's. It writes the batch once to the WAL and
//! memtables, without fsync. Clicks are answered at once. The answers that promise
//! durability (conversions, adjustments, deals, touches) go to the syncer thread with the
//! batch; it fsyncs the WAL once for every batch written since its last sync, then answers
//! them. So the writer prepares batch N+1 while batch N is being fsynced, concurrent
//! conversions share one fsync, and two identical conversions can never both be created:
//! one thread applies them in order.
//!
//! A batch read by the writer may be written but not yet synced. An answer that read
//! such data (a duplicate of a conversion whose batch is still syncing) waits for the
//! next sync too: a `2xx` never reports something that is not durable.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::schema::Cf;
use super::view::View;
use super::{codec, Durability, Shared, StoreError};
use crate::domain::conversion::ConversionRecord;
use crate::domain::ledger::LedgerKind;
use crate::engine::{self, Answer, Catalog, Command, ConversionOutcome, Effect, OutboxOp};

type Reply<T> = oneshot::Sender<T>;

pub(super) enum Op {
    /// A command, and the log position it comes from in cluster mode (kept with its effects).
    Command(Box<Command>, Option<u64>, Reply<Result<Answer, StoreError>>),
    /// Cluster mode: a checkpoint into the directory, taken between two batches, and the
    /// log position it holds.
    Checkpoint(std::path::PathBuf, Reply<Result<u64, StoreError>>),
    Stop,
}

type Done = Box<dyn FnOnce(&Result<(), StoreError>) + Send>;

/// One batch being built: the RocksDB batch, a view of its puts for reads inside the
/// batch, and the answers to send once it is written or once it is durable.
pub(super) struct Pending<'a> {
    pub(super) shared: &'a Shared,
    /// The database this batch reads and is written to; `None` while it cannot be opened
    /// (or after a failed write or sync, until the writer has reopened it).
    db: Option<Arc<rocksdb::DB>>,
    batch: WriteBatch,
    /// What this batch staged by key: a value, or `None` for a delete.
    puts: Staged,
    /// Some answer of this batch promises durability: `done` waits for the WAL sync.
    pub(super) sync: bool,
    /// Answers sent once the batch is durable.
    done: Vec<Done>,
    /// Answers sent once the batch is written (clicks: SPEC 7 syncs them within an interval).
    written: Vec<Done>,
    pub(super) ops: usize,
    pub(super) ledger: Vec<LedgerKind>,
    /// The newest ledger entry id this batch appended: the head its later commands read,
    /// and the writer's kept head once the batch is written (it is not stored: the ledger
    /// order holds it, see `view::newest_entry`).
    pub(super) ledger_head: Option<[u8; 16]>,
    /// Some delivery became due: the delivery worker is woken once the batch is written.
    pub(super) outbox_due: bool,
    /// Rollup increments, summed by cell; staged as merges when the batch is written.
    pub(super) rollups: super::rollups::Staged,
    /// Cluster mode: the last log position among this batch's commands, written with it.
    position: Option<u64>,
}

/// The keys and rollup cells a batch's maps start with room for: what one credited
/// conversion stages (its record, dedupe key, ledger entries, balance, partner month, pace,
/// outbox; six rollup cells).
const STAGED_KEYS: usize = 16;
const STAGED_CELLS: usize = 8;

impl<'a> Pending<'a> {
    fn new(shared: &'a Shared) -> Self {
        let usable = !shared.needs_reopen.load(Ordering::SeqCst);
        Pending {
            shared,
            db: shared.db().ok().filter(|_| usable),
            batch: WriteBatch::default(),
            // A conversion stages about ten keys: the map is made at that size, not grown
            // three times to it.
            puts: Staged::with_capacity_and_hasher(STAGED_KEYS, Default::default()),
            sync: false,
            done: Vec::new(),
            written: Vec::new(),
            ops: 0,
            ledger: Vec::new(),
            ledger_head: None,
            outbox_due: false,
            rollups: super::rollups::Staged::with_capacity(STAGED_CELLS),
            position: None,
        }
    }

    /// The database, or `Io` while it cannot be opened.
    pub(super) fn db(&self) -> Result<&rocksdb::DB, StoreError> {
        self.db.as_deref().ok_or_else(StoreError::reopening)
    }

    /// What this batch staged at `key`, not yet written: `Some(None)` for a delete.
    pub(super) fn staged(&self, cf: Cf, key: &[u8]) -> Option<Option<&Vec<u8>>> {
        self.puts.get(&StagedKey(cf, key)).map(Option::as_ref)
    }

    /// The value at `key` in the database, as written before this batch (see [`Self::staged`]
    /// for what the batch holds).
    pub(super) fn stored(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        Ok(db.get_cf(super::cf_of(db, cf)?, key)?)
    }

    /// Stages a put. Puts and deletes are kept by key and written to the batch when it is
    /// committed, so a key written by many commands of a batch (a partner's pace, balance
    /// or month figures; a flooding visitor) is written once, with its last value.
    pub(super) fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.stage(cf, key, Some(value))
    }

    pub(super) fn delete(&mut self, cf: Cf, key: Vec<u8>) -> Result<(), StoreError> {
        self.stage(cf, key, None)
    }

    fn stage(&mut self, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.db()?;
        if cf == Cf::Conversions {
            self.shared.recent().remove(&key);
        }
        self.puts.insert((cf, key), value);
        Ok(())
    }

    /// A merge operand (earnings): never read back within the batch.
    pub(super) fn merge(&mut self, cf: Cf, key: &[u8], operand: &[u8]) -> Result<(), StoreError> {
        let db = self.db.as_deref().ok_or_else(StoreError::reopening)?;
        self.batch.merge_cf(super::cf_of(db, cf)?, key, operand);
        Ok(())
    }

    /// Decodes the value at `key`, reading through the batch.
    pub(super) fn write<T: serde::Serialize>(&mut self, cf: Cf, key: Vec<u8>, value: &T) -> Result<(), StoreError> {
        self.put(cf, key, codec::encode(value))
    }
}

/// Values by column family and key, looked up by a borrowed [`StagedKey`].
type ByKey<V> = hashbrown::HashMap<(Cf, Vec<u8>), V, foldhash::fast::RandomState>;

/// A batch's staged puts and deletes, by column family and key.
type Staged = ByKey<Option<Vec<u8>>>;

/// A key looked up in a [`ByKey`] map without copying it: it hashes and compares as the
/// map's `(Cf, Vec<u8>)` (a tuple hashes its fields in order, a `Vec<u8>` as its slice).
#[derive(Hash)]
struct StagedKey<'k>(Cf, &'k [u8]);

impl hashbrown::Equivalent<(Cf, Vec<u8>)> for StagedKey<'_> {
    fn equivalent(&self, key: &(Cf, Vec<u8>)) -> bool {
        self.0 == key.0 && self.1 == key.1.as_slice()
    }
}

/// Writes the staged puts and deletes into the batch, one per key. Each family's handle
/// is looked up once (a lookup by name compares strings: 8 per conversion cost 2.6k
/// instructions).
fn stage_puts(db: &rocksdb::DB, batch: &mut WriteBatch, puts: &Staged) -> Result<(), StoreError> {
    let mut handles: [Option<&rocksdb::ColumnFamily>; Cf::ALL.len()] = [None; Cf::ALL.len()];
    for ((cf, key), value) in puts {
        let handle = match handles[cf.index()] {
            Some(h) => h,
            None => *handles[cf.index()].insert(super::cf_of(db, *cf)?),
        };
        match value {
            Some(v) => batch.put_cf(handle, key, v),
            None => batch.delete_cf(handle, key),
        }
    }
    Ok(())
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
    last_reopen: Cell<Option<Instant>>,
    /// The ledger head and records of the small families every conversion
    /// reads and rewrites, as the database holds them (see [`Hot`]).
    hot: RefCell<Hot>,
    /// The catalog as of its version: commands read it without taking the cell's lock or
    /// touching its `Arc` (shared with every request thread), reloaded once it is replaced.
    catalog: RefCell<(u64, Arc<Catalog>)>,
}

/// The families whose records the writer keeps once it has read them: every credited
/// conversion reads and rewrites its partner's month figures, balance and pace: three
/// database reads of values this thread wrote itself.
const HOT_FAMILIES: [Cf; 3] = [Cf::PartnerMonths, Cf::Balances, Cf::Signals];
/// At most this many are kept per store (about 1.3 MiB; cluster mode has one store per
/// partition); past it they are all forgotten at once.
const HOT_MAX: usize = 8_192;

/// Values only the writer thread writes, as the database of `generation` holds them, so
/// they are read from here instead of the database:
/// - the ledger head, the newest entry id (the engine reads it for every command that
///   appends to the ledger): derived from the database once, then advanced by each written
///   batch that appended entries;
/// - records of [`HOT_FAMILIES`]: kept when the writer reads one from the database,
///   replaced when a written batch rewrote it, dropped when one deleted it.
///
/// A failed write forgets them all; so does a reopen (after a failed WAL sync, which may
/// lose the write), which starts a new generation.
#[derive(Default)]
struct Hot {
    generation: u64,
    head: Option<[u8; 16]>,
    records: ByKey<Vec<u8>>,
}

impl Hot {
    /// What is kept for `generation`: emptied when it was kept for another one.
    fn current(&mut self, generation: u64) -> &mut Self {
        if self.generation != generation {
            self.forget();
            self.generation = generation;
        }
        self
    }

    fn forget(&mut self) {
        self.head = None;
        self.records.clear();
    }

    /// The kept record at `key` in `generation`.
    fn get(&mut self, generation: u64, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
        self.current(generation).records.get(&StagedKey(cf, key)).cloned()
    }

    /// Keeps a record of a kept family just read from the database of `generation`.
    fn read(&mut self, generation: u64, cf: Cf, key: &[u8], value: &[u8]) {
        if !HOT_FAMILIES.contains(&cf) {
            return;
        }
        let records = &mut self.current(generation).records;
        if records.len() >= HOT_MAX {
            records.clear();
        }
        records.insert((cf, key.to_vec()), value.to_vec());
    }

    /// After a batch's write to `generation`: its ledger head (if it appended entries) and the
    /// kept records it rewrote take their new values, and deleted ones go; a failed write
    /// forgets everything.
    fn written(&mut self, generation: u64, ok: bool, puts: Staged, head: Option<[u8; 16]>) {
        let this = self.current(generation);
        if !ok {
            this.forget();
            return;
        }
        this.head = head.or(this.head);
        let records = &mut this.records;
        for ((cf, key), value) in puts {
            match (records.get_mut(&StagedKey(cf, &key)), value) {
                (Some(kept), Some(value)) => *kept = value,
                (Some(_), None) => {
                    records.remove(&StagedKey(cf, &key));
                }
                (None, _) => {}
            }
        }
    }
}

/// Whether a command reads a range of an index, which sees the database only.
fn reads_ranges(command: &Command) -> bool {
    match command {
        Command::SweepHolds { .. } => true,
        Command::Outbox(op) => matches!(**op, OutboxOp::Enable { .. } | OutboxOp::Prune { .. }),
        Command::Payout(op) => matches!(**op, crate::engine::PayoutOp::Run { .. }),
        _ => false,
    }
}

/// How often the writer tries to reopen the database while writes fail.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Writer {
    pub(super) fn new(shared: Arc<Shared>, syncer: Sender<Unsynced>, durability: Durability, max_batch: usize) -> Self {
        let catalog = RefCell::new(shared.catalog.versioned());
        Writer {
            shared,
            syncer,
            sent: Cell::new(0),
            durability,
            max_batch: max_batch.max(1),
            last_reopen: Default::default(),
            hot: RefCell::default(),
            catalog,
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
            let (command, position, reply) = match op {
                Op::Command(command, position, reply) => (*command, position, reply),
                Op::Stop => {
                    stop = true;
                    continue;
                }
                Op::Checkpoint(dir, reply) => {
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                    let _ = reply.send(self.checkpoint(&dir));
                    continue;
                }
            };
            match command {
                // Entity writes change the catalog every later command reads: each is
                // written on its own, synced, and the catalog published after it.
                Command::Entity(_) => {
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                    let _ = reply.send(self.entity(command, position));
                }
                // A sweep reads the hold index, an enable the parked deliveries and a prune
                // the finished ones, from the database: nothing may be staged.
                Command::SweepHolds { .. } | Command::Outbox(_) | Command::Payout(_) if reads_ranges(&command) => {
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                    self.execute(&mut pending, command, reply);
                    pending.position = position.or(pending.position);
                    self.commit(std::mem::replace(&mut pending, Pending::new(shared)));
                }
                _ => {
                    self.execute(&mut pending, command, reply);
                    pending.position = position.or(pending.position);
                }
            }
        }
        self.commit(pending);
        stop
    }

    /// A checkpoint of the database as every batch written so far left it, and the log
    /// position stored with the last of them: nothing is written while it is taken.
    fn checkpoint(&self, dir: &std::path::Path) -> Result<u64, StoreError> {
        super::checkpoint_into(&*self.shared.db()?, dir)?;
        super::stored_position(self.shared.get(Cf::Meta, super::keys::META_APPLIED)?)
    }

    /// Runs one command through the engine against the database plus the batch, stages
    /// its effects and queues its answer: clicks once the batch is written; answers that
    /// changed nothing and read only durable data at once; everything else once the batch
    /// is durable.
    fn execute(&self, pending: &mut Pending<'_>, command: Command, reply: Reply<Result<Answer, StoreError>>) {
        // Clicks are synced within an interval (SPEC 7); a delivery's attempt or park that
        // is lost in a crash only sends the delivery once more (at-least-once).
        let is_click = matches!(command, Command::Click { .. })
            || matches!(&command, Command::Outbox(op) if matches!(**op, OutboxOp::Attempted { .. } | OutboxOp::Park { .. }));
        let catalog = self.catalog();
        let view = View::new(pending, &catalog, self);
        let outcome = engine::execute(&view, command);
        let read_staged = view.read_staged();
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let wrote = !outcome.effects.is_empty();
        if let Err(e) = super::apply::apply(pending, &outcome.effects) {
            let _ = reply.send(Err(e));
            return;
        }
        let answer = outcome.answer;
        if wrote {
            pending.ops += 1;
            self.remember_created(&answer, outcome.effects);
        }
        let send = move |r: &Result<(), StoreError>| {
            let _ = reply.send(r.clone().map(|()| answer));
        };
        if is_click {
            pending.written.push(Box::new(send));
        } else if !wrote && !read_staged && !self.syncing() {
            send(&Ok(()));
        } else {
            pending.sync |= wrote;
            pending.done.push(Box::new(send));
        }
    }

    /// The kept catalog, reloaded first if it was replaced since it was kept.
    fn catalog(&self) -> std::cell::Ref<'_, Arc<Catalog>> {
        let version = self.catalog.borrow().0;
        if let Some(newer) = self.shared.catalog.newer_than(version) {
            *self.catalog.borrow_mut() = newer;
        }
        std::cell::Ref::map(self.catalog.borrow(), |(_, catalog)| catalog)
    }

    /// Keeps the conversions a command created among the recent ones, moved out of its
    /// applied effects (a conversion command writes no other conversion record).
    fn remember_created(&self, answer: &Answer, effects: Vec<Effect>) {
        let created = |o: &ConversionOutcome| matches!(o, ConversionOutcome::Created(_));
        let any = match answer {
            Answer::Conversion(o) => created(o),
            Answer::Batch(all) => all.iter().any(created),
            _ => false,
        };
        if !any {
            return;
        }
        for effect in effects {
            if let Effect::Conversion(rec) = effect {
                self.remember(super::keys::conversion(&rec.merchant_id, &rec.txn_id), *rec);
            }
        }
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
        let Pending {
            db,
            mut batch,
            puts,
            sync,
            done,
            written,
            ops,
            ledger,
            ledger_head,
            outbox_due,
            rollups,
            position,
            ..
        } = pending;
        // A batch that cannot hold its puts is not written at all: its answers get the error.
        let staged = db.as_deref().map_or(Ok(()), |db| stage_puts(db, &mut batch, &puts));
        if let (Some(position), Some(db), true) = (position, db.as_deref(), ops > 0) {
            match super::cf_of(db, Cf::Meta) {
                Ok(cf) => batch.put_cf(cf, super::keys::META_APPLIED, position.to_be_bytes()),
                Err(e) => tracing::error!(error = %e, "log position not written"),
            }
        }
        if let (false, Some(db)) = (rollups.is_empty(), db.as_deref()) {
            if let Err(e) = rollups.write(db, &mut batch) {
                tracing::error!(error = %e, "rollups not written");
            }
        }
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let result = match staged {
            Err(e) => Err(e),
            Ok(()) if ops == 0 => Ok(()),
            Ok(()) => self.write(db.as_deref(), batch, ops),
        };
        self.hot.borrow_mut().written(generation, result.is_ok(), puts, ledger_head.filter(|_| ops > 0));
        if result.is_err() {
            // It may hold records of this batch, which is not stored.
            self.shared.recent().clear();
        } else if outbox_due {
            self.shared.outbox_wake.notify_one();
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

    /// The newest ledger entry id the database of the current generation holds, if this
    /// thread has derived it (`None`: derive it from the database, then [`Self::keep_head`]).
    pub(super) fn kept_head(&self) -> Option<[u8; 16]> {
        self.hot.borrow_mut().current(self.shared.generation.load(Ordering::SeqCst)).head
    }

    /// Keeps the ledger head just derived from the database.
    pub(super) fn keep_head(&self, head: [u8; 16]) {
        let mut hot = self.hot.borrow_mut();
        let kept = &mut hot.current(self.shared.generation.load(Ordering::SeqCst)).head;
        *kept = (*kept).max(Some(head));
    }

    /// A record of a kept family as the database of the current generation holds it, if
    /// this thread keeps it; `None`: read the database.
    pub(super) fn hot_record(&self, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
        self.hot.borrow_mut().get(self.shared.generation.load(Ordering::SeqCst), cf, key)
    }

    /// Whether this thread keeps the records of `cf` it reads ([`HOT_FAMILIES`]).
    pub(super) fn keeps(cf: Cf) -> bool {
        HOT_FAMILIES.contains(&cf)
    }

    /// Keeps a record of a kept family just read from the database.
    pub(super) fn keep_read(&self, cf: Cf, key: &[u8], value: &[u8]) {
        self.hot.borrow_mut().read(self.shared.generation.load(Ordering::SeqCst), cf, key, value);
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
    pub(super) fn stored_conversion(
        &self,
        pending: &Pending<'_>,
        key: &[u8],
    ) -> Result<Option<ConversionRecord>, StoreError> {
        let db = pending.db()?;
        let recent = self.shared.recent().get(key).map(|e| e.settled.record.clone());
        if recent.is_some() {
            return Ok(recent);
        }
        let Some(bytes) = db.get_pinned_cf(super::cf_of(db, Cf::Conversions)?, key)? else { return Ok(None) };
        let rec: ConversionRecord = codec::decode(&bytes)?;
        self.remember(key.to_vec(), rec.clone());
        Ok(Some(rec))
    }

    /// Executes an entity command on a batch of its own, written synced; publishes the
    /// catalog its effects make.
    fn entity(&self, command: Command, position: Option<u64>) -> Result<Answer, StoreError> {
        let shared = &*self.shared;
        let catalog = self.catalog();
        let mut pending = Pending::new(shared);
        let outcome = engine::execute(&View::new(&pending, &catalog, self), command)?;
        if outcome.effects.is_empty() {
            return Ok(outcome.answer);
        }
        let mut next: Catalog = (**catalog).clone();
        for e in &outcome.effects {
            next.apply(e);
        }
        super::apply::apply(&mut pending, &outcome.effects)?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let Pending { db, mut batch, puts, .. } = pending;
        let generation = shared.generation.load(Ordering::SeqCst);
        let written = db.as_deref().ok_or_else(StoreError::reopening).and_then(|db| {
            stage_puts(db, &mut batch, &puts)?;
            if let Some(position) = position {
                batch.put_cf(super::cf_of(db, Cf::Meta)?, super::keys::META_APPLIED, position.to_be_bytes());
            }
            Ok(db.write_opt(batch, &opts)?)
        });
        self.hot.borrow_mut().written(generation, written.is_ok(), puts, None);
        if let Err(e) = written {
            tracing::error!(error = %e, "entity write failed");
            shared.failed();
            return Err(e);
        }
        shared.catalog.replace(next);
        Ok(outcome.answer)
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
mod hot_tests {
    use super::{Hot, Staged, HOT_MAX};
    use crate::store::schema::Cf;

    fn puts(entries: &[(Cf, &str, Option<&str>)]) -> Staged {
        entries.iter().map(|(cf, k, v)| ((*cf, k.as_bytes().to_vec()), v.map(|v| v.as_bytes().to_vec()))).collect()
    }

    /// What is kept follows what the database holds: records replaced by a written batch,
    /// dropped by a delete, the ledger head set by a batch that appended entries; everything
    /// forgotten by a failed write or another generation; keys only written are not kept
    /// (a read finds them in the database), nor other families.
    #[test]
    fn kept_records_follow_the_database() {
        let get = |hot: &mut Hot, g, key: &str| {
            hot.get(g, Cf::Balances, key.as_bytes()).map(|v| String::from_utf8(v).unwrap())
        };
        let mut hot = Hot::default();
        hot.read(0, Cf::Balances, b"b1", b"10");
        hot.read(0, Cf::PartnerMonths, b"m1", b"1");
        hot.read(0, Cf::Conversions, b"c1", b"rec");
        assert_eq!(get(&mut hot, 0, "b1").as_deref(), Some("10"));
        assert_eq!(hot.get(0, Cf::Conversions, b"c1"), None, "only the kept families");

        hot.written(0, true, puts(&[(Cf::Balances, "b1", Some("15")), (Cf::Balances, "b2", Some("5"))]), Some([7; 16]));
        assert_eq!(hot.current(0).head, Some([7; 16]), "the ledger head of the batch's entries");
        assert_eq!(get(&mut hot, 0, "b1").as_deref(), Some("15"), "replaced by the written value");
        assert_eq!(get(&mut hot, 0, "b2"), None, "written, never read: the database answers");

        hot.written(0, true, puts(&[(Cf::PartnerMonths, "m1", None)]), None);
        assert_eq!(hot.current(0).head, Some([7; 16]), "a batch without ledger entries keeps the head");
        assert_eq!(hot.get(0, Cf::PartnerMonths, b"m1"), None, "a delete drops it");

        hot.written(0, false, puts(&[(Cf::Balances, "b1", Some("99"))]), Some([9; 16]));
        assert_eq!(get(&mut hot, 0, "b1"), None, "a failed write forgets everything");
        assert_eq!(hot.current(0).head, None, "the head too");

        hot.read(0, Cf::Balances, b"b1", b"15");
        hot.written(0, true, Staged::default(), Some([8; 16]));
        assert_eq!(get(&mut hot, 1, "b1"), None, "another generation (a reopen) starts empty");
        assert_eq!(hot.current(1).head, None, "with no head");
        assert_eq!(get(&mut hot, 0, "b1"), None, "and the old generation's records are gone");

        for i in 0..HOT_MAX {
            hot.read(2, Cf::Signals, format!("p{i}").as_bytes(), b"x");
        }
        assert!(hot.get(2, Cf::Signals, b"p0").is_some());
        hot.read(2, Cf::Signals, b"one-more", b"y");
        assert_eq!(hot.get(2, Cf::Signals, b"p0"), None, "past HOT_MAX all are forgotten");
        assert_eq!(hot.get(2, Cf::Signals, b"one-more").as_deref(), Some(b"y".as_slice()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::backend::{Backend, BackendExt};
    use crate::domain::conversion::ConversionBody;
    use crate::domain::ids::MerchantId;
    use crate::engine::ConversionOutcome;
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
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            recent_conversions: crate::store::DEFAULT_RECENT_CONVERSIONS,
            memtable_budget_bytes: 64 << 20,
            rollups: true,
            shared: None,
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
