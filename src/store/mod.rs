//! Storage: the only module that names RocksDB.
//!
//! - [`schema`] lists the column families, [`keys`] the key layouts, [`codec`] the value
//!   encodings.
//! - Every write goes through one writer thread ([`writer`]) that batches concurrent
//!   operations into one RocksDB write: conversions share one fsync (group commit), and
//!   dedupe is exact because one thread decides it.
//! - The writer decides nothing itself: it runs each command through the engine
//!   ([`crate::engine::execute`]) against a view of the database plus the batch being
//!   built ([`view`]), then applies the effects to the batch ([`apply`]).
//! - Configuration entities are mirrored in memory ([`catalog`]) so the hot paths
//!   (click redirect, signature check) never read disk.
//!
//! The rest of tally sees [`Store`] through [`crate::backend::Backend`].

mod apply;
mod backend;
pub mod catalog;
pub mod codec;
pub mod keys;
mod outbox;
pub mod rollups;
pub mod schema;
pub mod spool;
mod view;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use tokio::sync::mpsc;

pub use crate::backend::{Settled, StoreError, WriteError};
use crate::domain::conversion::ConversionRecord;
use crate::domain::entities::{Merchant, Partner};
use crate::domain::ids::MerchantId;
use crate::domain::link::Link;
use crate::domain::plan::Plan;
use crate::engine::{Answer, Catalog, Command};
use crate::metrics::{Metrics, StorageStats};
pub use catalog::CatalogCell;
use schema::Cf;

impl StoreError {
    /// Reads and writes while the writer reopens the database after a failed write.
    fn reopening() -> StoreError {
        StoreError::Io("storage is being reopened after a failed write".into())
    }
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        StoreError::Io(e.into_string())
    }
}

/// When a conversion's write is acknowledged (SPEC 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// After the batch holding it is in the WAL and fsynced (the default).
    Fsync,
    /// After the batch is in the WAL in the OS page cache; the WAL syncer fsyncs it
    /// within the sync interval. Survives a process crash, not a power loss.
    Buffered,
}

impl Durability {
    /// The config spelling (`fsync`, `buffered`).
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Buffered => "buffered",
        }
    }
}

/// How the store is opened; filled from the `[storage]` config section.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub wal_sync_interval: Duration,
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Conversion records kept decoded to answer retries ([`DEFAULT_RECENT_CONVERSIONS`]).
    pub recent_conversions: usize,
    /// All memtables together (a RocksDB write buffer manager); 0: no shared bound.
    pub memtable_budget_bytes: usize,
    /// Keep the report rollups (`reports.rollups`; off only to measure their cost).
    pub rollups: bool,
    /// A block cache and memtable budget shared with other stores (cluster mode's
    /// partition stores); `None`: this store's own, of the sizes above.
    pub shared: Option<SharedMemory>,
}

/// One block cache and one memtable budget for several stores of a process: cluster mode
/// keeps a store per partition, and a node's memory is bounded by `[storage]` as a whole,
/// while a busy partition may use what idle ones do not.
#[derive(Clone)]
pub struct SharedMemory {
    cache: rocksdb::Cache,
    write_buffers: rocksdb::WriteBufferManager,
}

impl SharedMemory {
    pub fn new(block_cache_bytes: usize, memtable_budget_bytes: usize) -> Self {
        SharedMemory {
            cache: rocksdb::Cache::new_lru_cache(block_cache_bytes),
            write_buffers: rocksdb::WriteBufferManager::new_write_buffer_manager(memtable_budget_bytes, false),
        }
    }
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedMemory")
    }
}

/// State shared by the store handle, the writer and the WAL syncer.
struct Shared {
    /// The open database; `None` only while the writer reopens it after a failed write
    /// (RocksDB refuses every write after an I/O error such as a full disk until it is
    /// reopened: its own recovery needs an `SstFileManager`, which the Rust crate lacks).
    db: std::sync::RwLock<Option<Arc<DB>>>,
    /// Set by a failed write; the writer reopens the database before its next batch.
    needs_reopen: AtomicBool,
    data_dir: PathBuf,
    db_opts: Options,
    catalog: CatalogCell,
    ready: AtomicBool,
    /// Set after an unsynced write; cleared by the WAL syncer.
    unsynced: AtomicBool,
    /// Counts reopens: a WAL sync that failed condemns the writes of its generation.
    generation: AtomicU64,
    /// The last written batch (by the writer's sequence) that the syncer has fsynced.
    synced: AtomicU64,
    /// Conversion records the writer wrote or read lately (see [`RecentConversions`]).
    recent: std::sync::Mutex<RecentConversions>,
    /// Tests hold it to keep the syncer from syncing.
    #[cfg(test)]
    sync_hold: std::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// Woken after a write that made a delivery due.
    outbox_wake: tokio::sync::Notify,
    /// Whether rollup increments are written.
    rollups: bool,
    /// One of cluster mode's partition stores, sharing the node's memory (see [`open_db`]).
    shared_memory: bool,
}

/// A column family's handle.
fn cf_of(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(cf.name()).ok_or_else(|| StoreError::Corrupt(format!("column family {} missing", cf.name())))
}

/// Opens the database with `db_opts` and each column family's own options.
///
/// Memtable Bloom filters over whole keys: the writer's lookups that miss (every new
/// conversion's dedupe check, customers and accounts seen for the first time) skip the
/// skiplist walk, which was a sixth of the writer's time (BENCHMARKS.md). A filter is
/// allocated with its memtable (`write_buffer_bytes` x the ratio). `shared_memory` (one of
/// cluster mode's partition stores, sharing one memtable budget): with filters on every
/// family, 16 partitions' empty memtables alone exceeded the budget and RocksDB flushed
/// memtables of one or two entries without end (half of a node's CPU), so there only the
/// conversions family has one, at a fifth of the size (330 KiB with the default 32 MiB,
/// 5 MiB for 16 partitions; still over 30 bits per key for conversion records): each
/// applied conversion's dedupe check misses there, and without it the miss walked the
/// skiplist on every node.
fn open_db(data_dir: &std::path::Path, db_opts: &Options, shared_memory: bool) -> Result<DB, StoreError> {
    let cfs = Cf::ALL.iter().map(|&cf| {
        let mut o = db_opts.clone();
        let filter_ratio = match (shared_memory, cf) {
            (false, _) => Some(0.05),
            (true, Cf::Conversions) => Some(0.01),
            (true, _) => None,
        };
        if let Some(ratio) = filter_ratio {
            o.set_memtable_whole_key_filtering(true);
            o.set_memtable_prefix_bloom_ratio(ratio);
        }
        if cf == Cf::Rollups {
            o.set_merge_operator_associative(rollups::MERGE_NAME, rollups::merge);
        }
        if cf == Cf::Earned {
            o.set_merge_operator_associative(rollups::ADD_NAME, rollups::add_i64);
        }
        ColumnFamilyDescriptor::new(cf.name(), o)
    });
    Ok(DB::open_cf_descriptors(db_opts, data_dir, cfs)?)
}

/// The schema this version writes. 2: report rollups and the ledger's entry-order index;
/// 3: the partners' conversion index; 4: partners' balances and earnings. All built from
/// the stored events when an older store is opened.
const SCHEMA_VERSION: u32 = 4;
/// Set while a rollup rebuild runs: a store opened with it set rebuilds again.
const META_REBUILDING: &[u8] = b"rollups_rebuilding";

impl Shared {
    /// The open database, or `Io` while it is being reopened.
    fn db(&self) -> Result<Arc<DB>, StoreError> {
        let slot = self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.clone().ok_or_else(StoreError::reopening)
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        Ok(db.get_cf(cf_of(&db, cf)?, key)?)
    }

    /// Closes and reopens the database (the writer calls this, between batches, after a
    /// failed write). Readers get `Io` meanwhile. When reads keep the old handle for over
    /// five seconds, or the reopen fails (the disk is still full), the next batch tries again.
    fn reopen(&self) -> Result<(), StoreError> {
        let taken = self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(mut old) = taken {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if std::time::Instant::now() < deadline => {
                        old = still_shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still_shared) => {
                        *self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(still_shared);
                        return Err(StoreError::Io("reads kept the storage busy; reopen postponed".into()));
                    }
                }
            }
        }
        let db = open_db(&self.data_dir, &self.db_opts, self.shared_memory)?;
        *self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(db));
        self.generation.fetch_add(1, Ordering::SeqCst);
        // The reopened database lacks whatever a failed write or sync lost.
        self.recent().clear();
        self.needs_reopen.store(false, Ordering::SeqCst);
        tracing::warn!("storage reopened after a failed write");
        Ok(())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentConversions> {
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.storage_ready.set(i64::from(ready));
    }

    /// Books a failed write or WAL sync: counted, `/readyz` false (503s) and the database
    /// reopened by the writer before its next batch.
    fn failed(&self) {
        self.metrics.storage_errors.inc();
        self.set_ready(false);
        self.needs_reopen.store(true, Ordering::SeqCst);
    }
}

/// Conversion records kept decoded by [`RecentConversions`] unless
/// `storage.recent_conversions` says otherwise (about 2 KiB each with their rendered answer).
pub const DEFAULT_RECENT_CONVERSIONS: usize = 4096;

/// A conversion record the writer wrote or read lately, and from when it is durable.
#[derive(Debug)]
struct RecentConversion {
    settled: Arc<Settled>,
    /// The writer's batch sequence after which it is durable: the batch that stores it, or
    /// for a record read back from the database, the next batch (whose WAL sync covers
    /// everything written before). 0 with `buffered` durability, which promises no fsync.
    durable_after: u64,
    /// The database generation it was written to or read from.
    generation: u64,
}

/// Conversion records the writer wrote or decoded lately, by key, so that a retried
/// conversion (a duplicate, usually soon after the original) is answered without reading
/// and decoding its JSON again (18 % of a duplicate's instructions), and, once durable,
/// without the writer at all ([`Store::settled_conversion`]). Only the writer writes
/// conversion records, so it keeps this exact: a staged put or delete of a key drops it,
/// and a failed write or a reopen drops everything. The oldest entries go first.
struct RecentConversions {
    records: crate::domain::FastMap<Vec<u8>, RecentConversion>,
    order: std::collections::VecDeque<Vec<u8>>,
    capacity: usize,
}

impl RecentConversions {
    fn new(capacity: usize) -> Self {
        RecentConversions { records: Default::default(), order: Default::default(), capacity }
    }

    fn get(&self, key: &[u8]) -> Option<&RecentConversion> {
        self.records.get(key)
    }

    fn insert(&mut self, key: Vec<u8>, record: ConversionRecord, durable_after: u64, generation: u64) {
        let settled = Arc::new(Settled { record, rendered: Default::default() });
        let entry = RecentConversion { settled, durable_after, generation };
        if self.records.insert(key.clone(), entry).is_none() {
            self.order.push_back(key);
        }
        // `order` may hold keys dropped since; bounding it bounds both.
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.records.remove(&old);
            }
        }
    }

    fn remove(&mut self, key: &[u8]) {
        self.records.remove(key);
    }

    fn clear(&mut self) {
        self.records.clear();
        self.order.clear();
    }
}

/// The store: cheap to clone, one writer thread behind it.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    tx: mpsc::Sender<writer::Op>,
    salt: Arc<[u8; 32]>,
    threads: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

fn db_options(opts: &StoreOptions) -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_max_background_jobs(2);
    o.set_bytes_per_sync(1 << 20);
    o.set_write_buffer_size(opts.write_buffer_bytes);
    // One budget for the memtables of every column family together: each may grow to
    // `write_buffer_bytes`, and with half a dozen busy ones (clicks, visitors, conversions,
    // ledger, holds, partner months) plus those being flushed, a 10-minute soak reached
    // 322 MiB of RSS without it (BENCHMARKS.md). Past the budget RocksDB flushes the
    // largest memtable; writes never stall on it.
    match &opts.shared {
        Some(shared) => o.set_write_buffer_manager(&shared.write_buffers),
        None if opts.memtable_budget_bytes > 0 => o.set_write_buffer_manager(
            &rocksdb::WriteBufferManager::new_write_buffer_manager(opts.memtable_budget_bytes, false),
        ),
        None => {}
    }
    // Memtable Bloom filters are set per column family ([`open_db`]).
    o.set_max_total_wal_size(256 << 20);
    o.set_keep_log_file_num(5);
    o.set_recycle_log_file_num(4);
    let mut table = rocksdb::BlockBasedOptions::default();
    let cache = match &opts.shared {
        Some(shared) => shared.cache.clone(),
        None => rocksdb::Cache::new_lru_cache(opts.block_cache_bytes),
    };
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);
    // Index and filter blocks live in the block cache (memory stays bounded as data grows),
    // partitioned so that a point lookup loads one small partition, not a whole file's
    // filter; the top levels stay pinned. Without this a lookup among 10 million clicks
    // re-read a file's whole filter and index whenever data blocks had evicted them, and
    // attributed conversions fell to 10 % of their small-store rate (BENCHMARKS.md).
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_metadata_block_size(4096);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    o.set_block_based_table_factory(&table);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o
}

impl Store {
    /// Opens (or creates) the database, loads the catalog and starts the writer and the
    /// WAL syncer.
    ///
    /// # Errors
    /// When RocksDB cannot open the directory or stored entities do not decode.
    pub fn open(opts: &StoreOptions, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|e| StoreError::Io(format!("create {}: {e}", opts.data_dir.display())))?;
        let db_opts = db_options(opts);
        let db = open_db(&opts.data_dir, &db_opts, opts.shared.is_some())?;
        let shared = Arc::new(Shared {
            db: std::sync::RwLock::new(Some(Arc::new(db))),
            needs_reopen: AtomicBool::new(false),
            data_dir: opts.data_dir.clone(),
            db_opts,
            catalog: CatalogCell::default(),
            ready: AtomicBool::new(true),
            unsynced: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            recent: std::sync::Mutex::new(RecentConversions::new(opts.recent_conversions)),
            #[cfg(test)]
            sync_hold: std::sync::Mutex::new(()),
            metrics,
            outbox_wake: tokio::sync::Notify::new(),
            rollups: opts.rollups,
            shared_memory: opts.shared.is_some(),
        });
        let salt = load_or_create_salt(&shared)?;
        migrate(&shared)?;
        shared.catalog.replace(load_catalog(&shared)?);
        shared.set_ready(true);

        let (tx, rx) = mpsc::channel(opts.queue_capacity);
        let (written_tx, written_rx) = std::sync::mpsc::channel();
        let syncer_shared = Arc::clone(&shared);
        let interval = opts.wal_sync_interval;
        let syncer = std::thread::Builder::new()
            .name("tally-wal-sync".into())
            .spawn(move || writer::wal_syncer(&syncer_shared, &written_rx, interval))
            .map_err(|e| StoreError::Io(format!("spawn WAL syncer: {e}")))?;
        let w = writer::Writer::new(Arc::clone(&shared), written_tx, opts.durability, opts.max_batch);
        let writer = std::thread::Builder::new()
            .name("tally-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| StoreError::Io(format!("spawn writer: {e}")))?;
        Ok(Store { shared, tx, salt: Arc::new(salt), threads: Arc::new(std::sync::Mutex::new(vec![writer, syncer])) })
    }

    /// Counts the stored conversions of a merchant (admin and tests; a full scan of its range).
    ///
    /// # Errors
    /// Storage failures.
    pub async fn count_conversions(&self, merchant: &MerchantId) -> Result<u64, StoreError> {
        let prefix = keys::merchant_prefix(merchant);
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut n = 0;
            let db = shared.db()?;
            for item in db.prefix_iterator_cf(cf_of(&db, Cf::Conversions)?, &prefix) {
                let (k, _) = item?;
                if !k.starts_with(&prefix) {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    /// Compacts every column family fully and waits for it (maintenance and the scale
    /// benchmark's loader: a bulk load leaves many level-0 files behind). Blocks: call it
    /// from a blocking thread.
    ///
    /// # Errors
    /// Storage failures.
    pub fn compact_all(&self) -> Result<(), StoreError> {
        let db = self.shared.db()?;
        for cf in Cf::ALL {
            db.compact_range_cf(cf_of(&db, cf)?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Recomputes the report rollups and the ledger's entry-order index from the stored
    /// events (`tally rollups rebuild`). Nothing may write meanwhile: the command opens
    /// the store itself, so tally must be stopped. Blocks.
    ///
    /// # Errors
    /// Storage failures; an interrupted rebuild is finished at the next open.
    pub fn rebuild_rollups(&self, progress: &mut dyn FnMut(&rollups::Rebuilt)) -> Result<rollups::Rebuilt, StoreError> {
        rebuild_rollups(&self.shared, progress)
    }

    /// Compares the stored rollups with the events (`tally rollups check`): at most
    /// `limit` differing cells. Blocks.
    ///
    /// # Errors
    /// Storage failures.
    pub fn check_rollups(&self, limit: usize) -> Result<(rollups::Rebuilt, Vec<rollups::Mismatch>), StoreError> {
        rollups::check(&*self.shared.db()?, limit)
    }

    /// Every stored rollup value, merged (tests and diagnostics). Blocks.
    ///
    /// # Errors
    /// Storage failures.
    pub fn rollups_dump(&self) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>, StoreError> {
        rollups::dump(&*self.shared.db()?)
    }

    /// An online, consistent copy of the database in `dir` (which must not exist): a
    /// RocksDB checkpoint. The WAL is synced first and the memtables flushed, so every
    /// write answered before the call is in the copy. SST files are hard-linked when `dir`
    /// is on the same file system, else copied. Blocks: call it off the reactor.
    ///
    /// # Errors
    /// `Io` when RocksDB cannot create the checkpoint (an existing `dir`, a full disk).
    pub fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StoreError> {
        checkpoint_into(&*self.shared.db()?, dir)
    }

    /// Figures for `/metrics`.
    pub fn stats(&self) -> StorageStats {
        let Ok(db) = self.shared.db() else { return StorageStats::default() };
        let sum = |name: &str| -> u64 {
            Cf::ALL
                .iter()
                .filter_map(|cf| db.cf_handle(cf.name()))
                .filter_map(|h| db.property_int_value_cf(h, name).ok().flatten())
                .sum()
        };
        StorageStats {
            sst_bytes: sum("rocksdb.total-sst-files-size"),
            memtable_bytes: sum("rocksdb.cur-size-all-mem-tables"),
            // One cache shared by every column family: read through one of them.
            block_cache_bytes: db
                .cf_handle(Cf::Conversions.name())
                .and_then(|h| db.property_int_value_cf(h, "rocksdb.block-cache-usage").ok().flatten())
                .unwrap_or(0),
            table_readers_bytes: sum("rocksdb.estimate-table-readers-mem"),
            estimated_keys: sum("rocksdb.estimate-num-keys"),
            write_stopped: db.property_int_value("rocksdb.is-write-stopped").ok().flatten().unwrap_or(0) > 0,
            delayed_write_rate: db.property_int_value("rocksdb.actual-delayed-write-rate").ok().flatten().unwrap_or(0),
            pending_compaction_bytes: sum("rocksdb.estimate-pending-compaction-bytes"),
            stalls: Cf::ALL
                .iter()
                .filter_map(|cf| db.cf_handle(cf.name()))
                .filter_map(|h| db.property_value_cf(h, "rocksdb.cf-write-stall-stats").ok().flatten())
                .map(|text| (stall_count(&text, "total-delays"), stall_count(&text, "total-stops")))
                .fold((0, 0), |(d, s), (d1, s1)| (d + d1, s + s1)),
        }
    }

    /// Stops the writer after the operations already queued, syncs the WAL and joins the
    /// threads. Other clones of the store see `Closed` afterwards. Blocks: call it from a
    /// blocking thread, not from the async runtime.
    pub fn shutdown(&self) {
        let _ = self.tx.blocking_send(writer::Op::Stop);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        if let Err(e) = self.shared.db().and_then(|db| Ok(db.flush_wal(true)?)) {
            tracing::error!(error = %e, "final WAL sync failed");
        }
        // Close the database once the last reader lets go of it: RocksDB then stops its
        // background work (flushes, compactions) before the process exits, instead of
        // having it cut short by the exit (which can abort in RocksDB's thread pool).
        self.shared.set_ready(false);
        let _ = self.shared.db.write().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    }
}

impl Store {
    /// Cluster mode: queues the command at `position` of the partition's log and returns
    /// where its answer will come. The position is written in the same batch as the
    /// command's effects, so after a crash [`Store::applied_position`] is exactly what the
    /// database holds. Commands are applied in the order they are queued, so a caller may
    /// queue the next before this one is answered.
    ///
    /// # Errors
    /// `Closed` when the writer has stopped.
    pub async fn enqueue_at(
        &self,
        command: Command,
        position: u64,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Answer, StoreError>>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(writer::Op::Command(Box::new(command), Some(position), tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Cluster mode: the last log position whose effects this store holds (0: none). A
    /// command without effects leaves no position behind; applying it again changes
    /// nothing either.
    ///
    /// # Errors
    /// Storage failures, a malformed stored position.
    pub fn applied_position(&self) -> Result<u64, StoreError> {
        stored_position(self.shared.get(Cf::Meta, keys::META_APPLIED)?)
    }

    /// Cluster mode: a checkpoint of the store in `dir` (which must not exist), taken by
    /// the writer between two batches, and the log position it holds: a partition
    /// snapshot. See [`Store::checkpoint`] for what the copy is.
    ///
    /// # Errors
    /// `Closed` when the writer has stopped; `Io` when RocksDB cannot create the checkpoint.
    pub async fn checkpoint_applied(&self, dir: std::path::PathBuf) -> Result<u64, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(writer::Op::Checkpoint(dir, tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// When the soonest hold ends, if any conversion is held (cluster mode appends a hold
    /// sweep to a partition's log only when one is due). Blocks briefly: one seek.
    ///
    /// # Errors
    /// Storage failures.
    pub fn first_hold_at(&self) -> Result<Option<crate::domain::clock::UnixMillis>, StoreError> {
        let db = self.shared.db()?;
        let first = db.iterator_cf(cf_of(&db, Cf::Holds)?, rocksdb::IteratorMode::Start).next().transpose()?;
        Ok(first.and_then(|(k, _)| keys::parse_hold(&k)).map(|(at, _, _)| at))
    }

    /// [`Store::shutdown`] from inside an async context (tests): runs it on a blocking thread.
    pub fn shutdown_blocking_in_place(&self) {
        let store = self.clone();
        let _ = std::thread::spawn(move || store.shutdown()).join();
    }
}

/// A RocksDB checkpoint of `db` in `dir`, its WAL synced first.
fn checkpoint_into(db: &DB, dir: &std::path::Path) -> Result<(), StoreError> {
    db.flush_wal(true)?;
    rocksdb::checkpoint::Checkpoint::new(db)?.create_checkpoint(dir)?;
    Ok(())
}

/// A stored log position (absent: 0).
fn stored_position(value: Option<Vec<u8>>) -> Result<u64, StoreError> {
    match value {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("applied log position".into())),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| StoreError::Closed)?
}

fn load_or_create_salt(shared: &Shared) -> Result<[u8; 32], StoreError> {
    if let Some(v) = shared.get(Cf::Meta, keys::META_VISITOR_SALT)? {
        return <[u8; 32]>::try_from(v.as_slice()).map_err(|_| StoreError::Corrupt("visitor salt".into()));
    }
    let mut salt = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    let mut batch = rocksdb::WriteBatch::default();
    let db = shared.db()?;
    batch.put_cf(cf_of(&db, Cf::Meta)?, keys::META_VISITOR_SALT, salt);
    batch.put_cf(cf_of(&db, Cf::Meta)?, keys::META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes());
    db.write_opt(batch, &opts)?;
    Ok(salt)
}

/// Brings an older store up to [`SCHEMA_VERSION`], and finishes an interrupted rebuild.
fn migrate(shared: &Shared) -> Result<(), StoreError> {
    let version = match shared.get(Cf::Meta, keys::META_SCHEMA_VERSION)? {
        Some(v) => {
            u32::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt("schema version".into()))?)
        }
        None => 1,
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the store has schema version {version}, newer than this tally's {SCHEMA_VERSION}: run a newer tally"
        )));
    }
    let interrupted = shared.get(Cf::Meta, META_REBUILDING)?.is_some();
    if version < SCHEMA_VERSION || interrupted {
        tracing::info!(version, interrupted, "building report rollups and the ledger order from the stored events");
        let n = rebuild_rollups(shared, &mut |_| {})?;
        tracing::info!(
            clicks = n.clicks,
            conversions = n.conversions,
            ledger_entries = n.ledger_entries,
            "rollups built"
        );
    }
    if version < SCHEMA_VERSION {
        let db = shared.db()?;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        db.put_cf_opt(cf_of(&db, Cf::Meta)?, keys::META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes(), &opts)?;
    }
    Ok(())
}

/// [`rollups::rebuild`] under the `rollups_rebuilding` mark, so that an interrupted
/// rebuild is finished at the next open.
fn rebuild_rollups(
    shared: &Shared,
    progress: &mut dyn FnMut(&rollups::Rebuilt),
) -> Result<rollups::Rebuilt, StoreError> {
    let db = shared.db()?;
    let meta = cf_of(&db, Cf::Meta)?;
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.put_cf_opt(meta, META_REBUILDING, b"1", &opts)?;
    let n = rollups::rebuild(&db, progress)?;
    db.delete_cf_opt(meta, META_REBUILDING, &opts)?;
    Ok(n)
}

fn load_all<T: serde::de::DeserializeOwned>(shared: &Shared, cf: Cf) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
    let mut out = Vec::new();
    let db = shared.db()?;
    for item in db.iterator_cf(cf_of(&db, cf)?, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        out.push((k.to_vec(), codec::decode(&v)?));
    }
    Ok(out)
}

fn load_catalog(shared: &Shared) -> Result<Catalog, StoreError> {
    let mut c = Catalog::default();
    for (_, m) in load_all::<Merchant>(shared, Cf::Merchants)? {
        if let Some(s) = shared.get(Cf::Secrets, &keys::merchant_secrets(&m.id))? {
            c.secrets.insert(m.id.clone(), codec::decode(&s)?);
        }
        if let Some(t) = shared.get(Cf::Secrets, &keys::postback_token(&m.id))? {
            c.postback_tokens.insert(m.id.clone(), codec::decode(&t)?);
        }
        c.merchants.insert(m.id.clone(), m);
    }
    for (_, p) in load_all::<Partner>(shared, Cf::Partners)? {
        if let Some(s) = shared.get(Cf::Secrets, &keys::partner_secrets(&p.id))? {
            c.partner_secrets.insert(p.id.clone(), codec::decode(&s)?);
        }
        c.insert_partner(p);
    }
    for (_, l) in load_all::<Link>(shared, Cf::Links)? {
        c.links.insert(l.id.clone(), l);
    }
    for (_, p) in load_all::<Plan>(shared, Cf::Plans)? {
        c.insert_plan(p);
    }
    Ok(c)
}

/// One count of RocksDB's write-stall statistics text
/// (`Write Stall (count): total-delays: 3, total-stops: 0, ...`).
fn stall_count(text: &str, name: &str) -> u64 {
    text.split([',', '\n'])
        .filter_map(|part| part.trim().rsplit_once(": "))
        .find(|(key, _)| key.trim().ends_with(name))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod stall_tests {
    #[test]
    fn stall_counts_are_read_from_rocksdb_text() {
        let text = "Write Stall (count): cf-l0-file-count-limit-delays: 2, total-delays: 5, total-stops: 1\n";
        assert_eq!(super::stall_count(text, "total-delays"), 5);
        assert_eq!(super::stall_count(text, "total-stops"), 1);
        assert_eq!(super::stall_count("", "total-stops"), 0);
    }
}
