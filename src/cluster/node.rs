//! A tally node in cluster mode: the [`Backend`] that serves requests through the
//! partition logs (SPEC 14).
//!
//! - **Writes.** A state-changing command is queued to its partition's appender, which
//!   sends what was queued as one log entry (group commit: one command when the partition
//!   is idle, up to [`ENTRY_COMMANDS`] under load, at most [`IN_FLIGHT`] entries in flight;
//!   under load an entry waits up to `cluster.append_linger_us` for the partition's
//!   concurrent requests, [`gather`]) with a fresh message id and, in a header, which nodes'
//!   requests are at which indexes. JetStream acknowledges it once a quorum has it; an
//!   append that timed out is retried with the same message id, so the log holds it once.
//!   The answer is the engine's for that command's position.
//! - **Owner-routed appends.** Only a partition's owner appends to its log: another node
//!   forwards each batch it queued to the owner (core NATS request, [`forward_subject`]),
//!   which puts it in its next entry with the other nodes' batches and replies once, with
//!   the engine's answers, when it applied the entry (first `taken` when that takes over
//!   [`TAKEN_AFTER`]). Entries then carry every node's requests, and JetStream's cost
//!   per entry is shared by several times the commands. With no owner (none holds the
//!   lease, or it died) a node appends its batch itself: the log, not the lease, orders.
//! - **Positions.** A command's position is its entry's sequence and its index in the
//!   entry (`seq << INDEX_BITS | index`): the store keeps the position of the last command
//!   applied, so a node that stopped inside an entry resumes after the right command.
//! - **Apply.** A node applies a partition's log in order, through the same engine as a
//!   single node, into one RocksDB per partition (`data_dir/partitions/p0003`), writing the
//!   log position with the effects. The owner and (`followers = "standby"`) its standby
//!   keep it current as it grows ([`Inner::keeps_current`]); another node applies it only
//!   when it must: before a read ([`Inner::fresh`]), for a configuration entry
//!   ([`watch_config`]), for an append of its own. The owner answers the requests other
//!   nodes forwarded with the engine's answers, so they need not apply the log to answer;
//!   the engine is deterministic, so every node that applies it computes the same state.
//!   A node whose position the log no longer holds restores the snapshot while it runs
//!   ([`restore_running`]).
//! - **Leases.** Each partition has one owner, holding its key in the `tally_leases` bucket
//!   (renewed every other second, lost after [`LEASE_TTL`]), and one standby holding another
//!   key; a node takes a free partition only while it stands by for it, so the standby,
//!   current, takes over. Only the owner acts on its own: it sends the partition's
//!   outbound deliveries and appends its timer commands (hold sweeps, outbox retention).
//! - **Clicks** are answered once they are in the node's click spool (a local RocksDB), and
//!   forwarded to their partition's log in the background, in order, at least once, the
//!   clicks of each pass in one entry per partition ([`click_entries`]); a click applied
//!   twice changes nothing the second time.
//! - **Configuration** (merchants, partners, links, plans) is a command of its merchant's
//!   partition, in an entry on its own subject that every node watches, so every node
//!   applies it within milliseconds; the node serves the union of its partitions' catalogs.
//! - **Snapshots** ([`super::snapshot`]): the owner snapshots its partitions every
//!   `snapshot_every` entries and trims their logs; a starting node restores a snapshot
//!   when the log no longer holds what it needs, or when it holds nothing yet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, object_store};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::nats::{
    check_shape, cluster_bucket, connect, nodes_bucket, read_reports, read_shape, shape_of, timed, ClusterError,
    NodeReport, CALL_TIMEOUT,
};
use super::snapshot;
use super::{
    entry_of, lease_key, partition_of, position, standby_key, stream_name, INDEX_BITS, LEASES_BUCKET, LEASE_TTL,
    META_BUCKET,
};
use crate::backend::{
    Backend, BoxFuture, DeliveryFilter, DeliveryPage, DueDelivery, LedgerQuery, OutboxGauges, Settled, StoreError,
};
use crate::config::{ClusterSettings, Followers};
use crate::domain::account::AccountRecord;
use crate::domain::balance::Balance;
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::ConversionRecord;
use crate::domain::ids::{MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::LedgerEntry;
use crate::domain::money::Currency;
use crate::domain::outbound::{Delivery, EndpointOff};
use crate::domain::payout::PayoutRun;
use crate::domain::rollup::{Rows, Scope, Span};
use crate::engine::{Answer, Catalog, Command, EntityOp, OutboxAnswer, OutboxOp, PayoutOp};
use crate::metrics::{Metrics, StorageStats};
use crate::store::spool::Spool;
use crate::store::{SharedMemory, Store, StoreOptions};

/// How long a request waits for its append and its application before it is answered
/// `503` (a retry is then a duplicate or the creation, never a second conversion).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after its acknowledgement an entry may stay undelivered to this node before
/// the subscription is made again (spurious ones only cost a consumer's creation).
const UNDELIVERED: Duration = Duration::from_millis(500);

/// How long an append waits for JetStream's acknowledgement before it is retried (with
/// the same message id). Short, because an append sent while a log's leader is being
/// elected is never acknowledged: the retry after the election is what goes through, so
/// this is added to the election's 4-9 s. Under load an acknowledgement takes 5-15 ms.
const APPEND_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a batch forwarded to a partition's owner waits for its first reply (under
/// load, its answers come within 5-15 ms): as long as the owner's own append waits for
/// JetStream's acknowledgement. An owner killed with the batch in hand never replies: its
/// requests answer `503` after this (a retry is a duplicate or the creation), and the next
/// batch finds no owner, so writes resume without waiting for the lease to pass to another
/// node. With 2 s, the kill test's writes through the other nodes stopped for 1.9-2.0 s
/// after the owner's kill.
const FORWARD_TIMEOUT: Duration = APPEND_TIMEOUT;

/// An owner whose answers to a forwarded batch are not ready this long after it took it
/// (its append waits out a log leader's election) says `taken`, so that the sender keeps
/// waiting instead of taking it for dead. Under load the answers come first, alone: one
/// reply per batch instead of three (each NATS message cost the three servers about 0.2 ms
/// of CPU on the benchmark's box, BENCHMARKS.md).
const TAKEN_AFTER: Duration = Duration::from_millis(100);

/// How often, and how long, a node that does not keep a partition current asks again for
/// its owner while it has none (`followers = "standby"`). Longer, and clients pile up on
/// such a node during a takeover: with 10 s, the kill test's writes stopped for 5 s.
const NO_OWNER_RETRY: Duration = Duration::from_millis(100);
const NO_OWNER_WAIT: Duration = Duration::from_secs(1);

/// The most commands one log entry carries, and about the most bytes (NATS refuses
/// messages over 1 MiB by default).
const ENTRY_COMMANDS: usize = 256;
const ENTRY_BYTES: usize = 512 << 10;
/// An entry stops taking commands at [`ENTRY_BYTES`]; the last one taken (a request, or a
/// forwarded batch, itself at most this) may bring it to this, under NATS's 1 MiB.
const ENTRY_MAX_BYTES: usize = ENTRY_BYTES + (64 << 10);
const _: () = assert!(ENTRY_COMMANDS <= 1 << INDEX_BITS);

/// Log entries of one partition being appended at once by this node. Requests queued
/// while they are in flight go into the next entry: under load, entries grow instead of
/// multiplying, and JetStream's per-entry cost (receive, replicate, fsync, acknowledge)
/// is shared by the commands in them. One, as a single node's writer has one WAL write
/// at a time: with 4, entries carried 8 commands on average under the load bench and
/// NATS took 85 µs per conversion; with 1, 22 commands and 60 µs (BENCHMARKS.md).
const IN_FLIGHT: usize = 1;

/// A partition whose last entry was sent longer ago than this is idle: its next request
/// goes at once, without the append linger (`cluster.append_linger_us`).
const IDLE_AFTER: Duration = Duration::from_millis(50);

/// What a partition's appender puts in an entry: a request of this node (its command,
/// encoded, and where its answer goes), or a batch another node forwarded because this
/// node owns the partition.
enum Queued {
    /// The command encoded, where its answer goes, and whether it is configuration.
    Local(Box<RawValue>, Waiter, bool),
    Forwarded(Forwarded),
}

/// A batch of commands forwarded by another node to this partition's owner, which appends
/// it in its next entry, replies once the entry is acknowledged, and then again with the
/// engine's answers once it applied the entry.
struct Forwarded {
    node: String,
    batch: String,
    commands: Vec<Box<RawValue>>,
    reply: async_nats::Subject,
    config: bool,
    /// Set once the batch's last reply is sent (see [`TAKEN_AFTER`]).
    replied: Arc<AtomicBool>,
}

impl Queued {
    fn commands(&self) -> usize {
        match self {
            Queued::Local(..) => 1,
            Queued::Forwarded(f) => f.commands.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Queued::Local(c, ..) => c.get().len(),
            Queued::Forwarded(f) => f.commands.iter().map(|c| c.get().len()).sum(),
        }
    }

    fn config(&self) -> bool {
        match self {
            Queued::Local(_, _, config) => *config,
            Queued::Forwarded(f) => f.config,
        }
    }
}

/// How often a free partition (or standby lease) is tried, and a lease's renewal looked at.
const LEASE_EVERY: Duration = Duration::from_secs(1);

/// A lease held is renewed once its last renewal is this old: every other
/// [`LEASE_EVERY`], and a failed renewal is tried again at the next one, within the
/// lease's [`LEASE_TTL`]. Each renewal is a replicated, fsynced write on the three NATS
/// servers, as costly to them as a log entry: renewing 16 owner and 16 standby leases
/// every second took about a sixth of the servers' writes under the load benchmark.
const RENEW_AFTER: Duration = Duration::from_millis(1500);

/// How often the owner looks whether a partition is due for a snapshot or a trim.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(2);

/// The header of a log entry saying whose requests it carries: `node batch start count`
/// spans, comma-separated. The node named answers the requests it queued as `batch`, the
/// entry's commands `start..start + count`, from its own application of the entry.
const BATCHES_HEADER: &str = "Tally-Batches";

/// The header of the owner's answers to a forwarded batch: the entry that holds it.
const ENTRY_HEADER: &str = "Tally-Entry";

/// The headers of a forwarded batch: the node that sent it, the batch's id, and whether it
/// carries configuration (its entry then goes on the partition's `.cfg` subject).
const NODE_HEADER: &str = "Tally-Node";
const BATCH_HEADER: &str = "Tally-Batch";
const CONFIG_HEADER: &str = "Tally-Config";

/// The subject of partition `p`'s log entries: those carrying configuration on their own,
/// which nodes that do not own the partition watch (a configuration entry is applied on
/// every node within milliseconds; the rest only on the owner, and elsewhere when needed).
fn entry_subject(p: u16, config: bool) -> String {
    format!("tally.p.{p}.{}", if config { "cfg" } else { "cmd" })
}

/// Where a partition's owner replies to a forwarded batch of node `node`: when it takes
/// it, when the entry holding it is acknowledged, and with the engine's answers.
fn answer_subject(node: &str, batch: &str) -> String {
    format!("tally.ans.{node}.{batch}")
}

/// The subject a partition's owner takes forwarded batches on (queue group [`OWNERS`], so
/// that one subscriber gets each even while a lease changes hands).
fn forward_subject(p: u16) -> String {
    format!("tally.fwd.{p}")
}
const OWNERS: &str = "owner";

/// The replies to a forwarded batch: its answers ([`Answers`], with the entry holding it in
/// [`ENTRY_HEADER`]), refused because the node does not own the partition (nothing was
/// appended: the sender appends it itself), or failed. An owner whose answers take longer
/// than [`TAKEN_AFTER`] first says `taken`.
const REPLY_TAKEN: &str = "taken";
const REPLY_NOT_OWNER: &str = "not-owner";
const REPLY_FAILED: &str = "failed ";

/// The meta key holding the cluster-wide salt of visitor fingerprints.
const SALT_KEY: &str = "visitor_salt";

/// One log entry: commands applied in order, versioned with the cluster's wire format.
#[derive(Deserialize)]
struct Entry {
    commands: Vec<Command>,
}

/// An entry as a forwarded batch carries it: the commands left encoded.
#[derive(Deserialize)]
struct RawEntry {
    commands: Vec<Box<RawValue>>,
}

/// An entry of already encoded commands (each request encodes its own, in parallel).
fn encode_entry<'a>(commands: impl IntoIterator<Item = &'a RawValue>) -> Vec<u8> {
    let mut out = b"{\"commands\":[".to_vec();
    for (i, c) in commands.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(c.get().as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

/// The clicks of one partition that the click forwarder sends as one log entry: their
/// spool keys with when each was taken, their commands, and the first and last click's ids.
#[derive(Default)]
struct ClickEntry {
    partition: u16,
    spooled: Vec<(u64, UnixMillis)>,
    commands: Vec<Box<RawValue>>,
    first: String,
    last: String,
}

impl ClickEntry {
    /// The same clicks sent again together carry the same id (their first and last click
    /// ids, which are unique, and their count): JetStream keeps them once.
    fn message_id(&self) -> String {
        format!("clicks-{}-{}-{}", self.first, self.last, self.spooled.len())
    }
}

/// The click spool's oldest entries as log entries, one per partition, each with its
/// clicks in spool order; and the spool keys that do not decode.
fn click_entries(batch: Vec<(u64, Vec<u8>)>, node: &str) -> (Vec<ClickEntry>, Vec<u64>) {
    let mut entries: Vec<ClickEntry> = Vec::new();
    let mut unreadable = Vec::new();
    for (key, bytes) in batch {
        let spooled = serde_json::from_slice::<Spooled>(&bytes).ok();
        let Some((spooled, command)) =
            spooled.and_then(|s| serde_json::value::to_raw_value(&s.command).ok().map(|c| (s, c)))
        else {
            unreadable.push(key);
            continue;
        };
        let id = match &spooled.command {
            Command::Click { click, .. } => click.click_id.to_string(),
            _ => format!("{node}-{key}"),
        };
        let at = entries.iter().position(|e| e.partition == spooled.partition).unwrap_or_else(|| {
            entries.push(ClickEntry { partition: spooled.partition, ..ClickEntry::default() });
            entries.len() - 1
        });
        let e = &mut entries[at];
        if e.spooled.is_empty() {
            e.first.clone_from(&id);
        }
        e.last = id;
        e.spooled.push((key, spooled.taken_ms));
        e.commands.push(command);
    }
    (entries, unreadable)
}

/// One entry of the click spool: the partition and the click's command.
#[derive(Serialize, Deserialize)]
struct Spooled {
    partition: u16,
    /// When the click was taken (the forward lag is measured from it).
    taken_ms: UnixMillis,
    command: Command,
}

type Waiter = oneshot::Sender<Result<Answer, StoreError>>;

/// The answers to a forwarded batch, in its order, as its partition's owner applied it: a
/// storage failure is sent as its message (the sender answers it `503`).
type Answers = Vec<Result<Answer, String>>;

/// What the apply loop hands the completion loop, in log order.
enum Applying {
    /// A command queued to the partition store: where its answer comes, and who waits for it.
    Command(oneshot::Receiver<Result<Answer, StoreError>>, Option<Waiter>),
    /// Every command of this entry was queued before: once reached, the entry is written.
    Entry(u64),
    /// Everything queued before is written (or failed).
    Barrier(oneshot::Sender<()>),
}

/// How reading a partition's log ended without an error.
enum Consumed {
    /// The node is stopping, or the partition stopped on it.
    Stopped,
    /// A node that does not keep the partition current reached the entry it was asked for.
    CaughtUp,
    /// The log no longer holds this entry, the next this node needs.
    Trimmed(u64),
}

/// One partition as this node holds it.
struct Part {
    p: u16,
    /// Replaced while the node runs when the partition's snapshot is restored
    /// ([`restore_running`]): read it through [`Part::store`].
    store: std::sync::RwLock<Store>,
    opts: StoreOptions,
    /// Requests waiting to be appended (see [`append_entries`]).
    queue: mpsc::Sender<Queued>,
    /// Requests of this node waiting for their entry to be applied, by the entry's
    /// message id, in the entry's order.
    waiters: Mutex<HashMap<String, Vec<Waiter>>>,
    /// The position of the last command queued to the store ([`position`]).
    applied: AtomicU64,
    /// The last entry whose commands are all written to the store.
    written: watch::Sender<u64>,
    /// A node that does not keep the partition current applies its log up to this entry
    /// (raised by reads, configuration entries and this node's own appends).
    target: AtomicU64,
    /// Wakes the partition's apply loop: the target moved, or the node took the lease.
    wanted: Notify,
    /// The log's last position as last seen (for the apply lag).
    last_seen: AtomicU64,
    /// This node holds the partition's lease until this instant (monotonic ms), if it does.
    owned_until: AtomicU64,
    /// This node holds the partition's standby lease until this instant (monotonic ms).
    standby_until: AtomicU64,
    /// A storage failure while applying: the partition stops (see docs/cluster.md).
    failed: AtomicBool,
    /// An acknowledged append was not delivered in time: the subscription is made again.
    stuck: Notify,
    /// The position of the partition's newest snapshot, as last known.
    snapshot_at: AtomicU64,
    /// The log was trimmed below this position by this node.
    trimmed: AtomicU64,
}

struct Inner {
    settings: ClusterSettings,
    client: async_nats::Client,
    js: jetstream::Context,
    /// The same connection with [`APPEND_TIMEOUT`] for appends.
    appends: jetstream::Context,
    parts: Vec<Part>,
    spool: Spool,
    spool_wake: Notify,
    /// The bucket every node reports its positions to (`tally_nodes`).
    reports: kv::Store,
    snapshots: object_store::ObjectStore,
    /// Where snapshots are packed and unpacked (`data_dir/snapshots`).
    work: PathBuf,
    salt: [u8; 32],
    /// The union of the partitions' catalogs, and the catalogs it was made from.
    catalog: Mutex<(Vec<Arc<Catalog>>, Arc<Catalog>)>,
    metrics: Arc<Metrics>,
    /// Monotonic clock origin for lease deadlines.
    started: Instant,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    outbox_wake: Notify,
    /// This node's batches forwarded to partition owners, waiting for their replies, by
    /// batch id (see [`take_answers`]).
    forwarded: Mutex<HashMap<String, mpsc::Sender<async_nats::Message>>>,
}

/// A running cluster node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// The partition stores' options: one block cache and one memtable budget of the node's
/// `[storage]` sizes, shared by all of them (a busy partition uses what idle ones do not;
/// splitting them made 2 MiB memtables, and flushes and compactions took half of the
/// node's CPU). They answer after the write, not the fsync: the log is what is durable,
/// and a store that lost its tail replays it.
fn partition_options(base: &StoreOptions, dir: PathBuf, partitions: u16, shared: &SharedMemory) -> StoreOptions {
    let n = usize::from(partitions.max(1));
    StoreOptions {
        data_dir: dir,
        durability: crate::store::Durability::Buffered,
        recent_conversions: (base.recent_conversions / n).max(1024),
        shared: Some(shared.clone()),
        ..base.clone()
    }
}

/// The merchant whose partition a command belongs to; `None` for timer commands that
/// every owned partition runs (hold sweeps, outbox retention).
fn merchant_of(command: &Command) -> Option<&MerchantId> {
    match command {
        Command::Click { click, .. } => Some(&click.merchant_id),
        Command::Conversion(d) => Some(&d.merchant),
        Command::Batch(drafts) => drafts.first().map(|d| &d.merchant),
        Command::Adjust { merchant, .. }
        | Command::Touch { merchant, .. }
        | Command::Reassign { merchant, .. }
        | Command::Review { merchant, .. } => Some(merchant),
        Command::Deal(d) => Some(&d.merchant),
        Command::SweepHolds { .. } => None,
        Command::Entity(op) => Some(match &**op {
            EntityOp::Merchant { merchant, .. } => &merchant.id,
            EntityOp::RotatePostbackToken { merchant, .. }
            | EntityOp::RotateMerchantSecret { merchant, .. }
            | EntityOp::RotatePartnerSecret { merchant, .. }
            | EntityOp::PausePartner { merchant, .. } => merchant,
            EntityOp::Partner { partner, .. } => &partner.merchant_id,
            EntityOp::Link(link) => &link.merchant_id,
            EntityOp::Plan(plan) => &plan.merchant_id,
        }),
        Command::Outbox(op) => match &**op {
            OutboxOp::Attempted { merchant, .. }
            | OutboxOp::Park { merchant, .. }
            | OutboxOp::Retry { merchant, .. }
            | OutboxOp::Enable { merchant, .. } => Some(merchant),
            OutboxOp::Prune { .. } => None,
        },
        Command::Payout(op) => match &**op {
            PayoutOp::Run { merchant, .. } | PayoutOp::Settle { merchant, .. } => Some(merchant),
        },
    }
}

/// A header of a NATS message (a log entry or a forwarded batch), if it has it.
fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string())
}

fn unavailable(what: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("cluster: {what}"))
}

/// Answers every request of `waiters` with the failure `e`.
fn fail(waiters: impl IntoIterator<Item = Waiter>, e: &StoreError) {
    for w in waiters {
        let _ = w.send(Err(e.clone()));
    }
}

impl Node {
    /// Connects to the cluster, checks its shape, opens this node's partition stores and
    /// click spool under `base.data_dir`, and starts applying the logs, forwarding clicks
    /// and taking leases.
    ///
    /// # Errors
    /// NATS unreachable, a cluster never initialized or of another shape, a store that
    /// will not open.
    pub async fn start(settings: &ClusterSettings, base: &StoreOptions, metrics: Arc<Metrics>) -> Result<Node, String> {
        let (client, js) = connect(settings).await.map_err(|e| e.to_string())?;
        // An append sent to a stream leader that just died waits this long for its
        // acknowledgement before it is retried (same message id): JetStream's 5 s default
        // made writes stall for 8 s around a leader's kill -9. Other calls keep 5 s.
        let mut appends = js.clone();
        appends.set_timeout(APPEND_TIMEOUT);
        let meta = cluster_bucket(&js, META_BUCKET, CALL_TIMEOUT).await.map_err(|e| e.to_string())?;
        let shape =
            read_shape(&meta).await.map_err(|e| e.to_string())?.ok_or(ClusterError::NotInitialized.to_string())?;
        check_shape(&shape, &shape_of(settings)).map_err(|e| e.to_string())?;
        let salt = cluster_salt(&meta).await.map_err(|e| e.to_string())?;
        let leases = cluster_bucket(&js, LEASES_BUCKET, CALL_TIMEOUT).await.map_err(|e| e.to_string())?;
        let reports = nodes_bucket(&js, settings.replicas).await.map_err(|e| e.to_string())?;
        let snapshots = snapshot::bucket(&js, settings.replicas).await.map_err(|e| e.to_string())?;
        let work = base.data_dir.join("snapshots");

        let mut parts = Vec::with_capacity(usize::from(settings.partitions));
        let mut queues = Vec::with_capacity(usize::from(settings.partitions));
        let shared = SharedMemory::new(base.block_cache_bytes, base.memtable_budget_bytes.max(base.write_buffer_bytes));
        for p in 0..settings.partitions {
            let dir = base.data_dir.join("partitions").join(format!("p{p:04}"));
            let opts = partition_options(base, dir, settings.partitions, &shared);
            let (store, applied, snapshot_at) = open_partition(&js, &snapshots, &opts, &work, p, &metrics).await?;
            let (queue, queued) = mpsc::channel(4096);
            queues.push(queued);
            parts.push(Part {
                p,
                store: std::sync::RwLock::new(store),
                opts,
                queue,
                waiters: Mutex::new(HashMap::new()),
                applied: AtomicU64::new(applied),
                // The entry of the last command applied may have been left part-way.
                written: watch::Sender::new(entry_of(applied).saturating_sub(1)),
                target: AtomicU64::new(0),
                wanted: Notify::new(),
                last_seen: AtomicU64::new(entry_of(applied)),
                owned_until: AtomicU64::new(0),
                standby_until: AtomicU64::new(0),
                failed: AtomicBool::new(false),
                stuck: Notify::new(),
                snapshot_at: AtomicU64::new(snapshot_at.unwrap_or(0)),
                trimmed: AtomicU64::new(0),
            });
        }
        let spool_dir = base.data_dir.join("click-spool");
        let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_dir))
            .await
            .map_err(|e| format!("click spool open task: {e}"))?
            .map_err(|e| format!("click spool: {e}"))?;
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            settings: settings.clone(),
            client,
            js,
            appends,
            parts,
            spool,
            spool_wake: Notify::new(),
            reports,
            snapshots,
            work,
            salt,
            catalog: Mutex::new((Vec::new(), Arc::new(Catalog::default()))),
            metrics,
            started: Instant::now(),
            stop,
            tasks: Mutex::new(Vec::new()),
            outbox_wake: Notify::new(),
            forwarded: Mutex::new(HashMap::new()),
        });
        let answers = inner
            .client
            .subscribe(answer_subject(&settings.node_id, "*"))
            .await
            .map_err(|e| format!("cannot subscribe to this node's answers: {e}"))?;
        let mut tasks = vec![tokio::spawn(take_answers(Arc::clone(&inner), answers))];
        for (p, queued) in (0..settings.partitions).zip(queues) {
            tasks.push(tokio::spawn(apply_partition(Arc::clone(&inner), p)));
            tasks.push(tokio::spawn(append_entries(Arc::clone(&inner), p, queued)));
            if settings.followers != Followers::Warm {
                tasks.push(tokio::spawn(watch_config(Arc::clone(&inner), p)));
            }
        }
        tasks.push(tokio::spawn(forward_clicks(Arc::clone(&inner))));
        tasks.push(tokio::spawn(hold_leases(Arc::clone(&inner), leases)));
        tasks.push(tokio::spawn(snapshot_owned(Arc::clone(&inner))));
        *inner.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = tasks;
        tracing::info!(node = %settings.node_id, partitions = settings.partitions, "cluster node started");
        Ok(Node { inner })
    }

    /// Stops applying and forwarding, gives up this node's leases by letting them expire,
    /// and closes the partition stores. Blocks: call it off the reactor.
    pub fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        for t in self.inner.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            t.abort();
        }
        self.inner.spool.sync();
        for part in &self.inner.parts {
            part.store().shutdown();
        }
    }
}

/// Opens partition `p`'s store, first restoring the partition's snapshot when the log no
/// longer holds the entries after the store's position (they were trimmed while this node
/// was away), or when the store is empty and a snapshot exists (quicker than replaying the
/// whole log). Returns the store, its position and the snapshot's position.
async fn open_partition(
    js: &jetstream::Context,
    snapshots: &object_store::ObjectStore,
    opts: &StoreOptions,
    work: &Path,
    p: u16,
    metrics: &Arc<Metrics>,
) -> Result<(Store, u64, Option<u64>), String> {
    let (store, applied) = open_store(opts, p, metrics).await?;
    let stream = timed(&format!("read stream {}", stream_name(p)), js.get_stream(stream_name(p)))
        .await
        .map_err(|e| e.to_string())?;
    let first = stream.cached_info().state.first_sequence;
    let latest = snapshot::latest(snapshots, p).await?;
    // The node resumes by reading its last command's entry again.
    let trimmed_past = first > entry_of(applied).max(1);
    let fresh = applied == 0 && latest.is_some_and(|s| s > 0);
    if !(trimmed_past || fresh) {
        return Ok((store, applied, latest));
    }
    if latest.is_none_or(|s| entry_of(s).max(1) < first) {
        return Err(format!(
            "partition {p}: its log starts at entry {first}, this node's store holds entry {}, and no snapshot covers the entries between (docs/cluster.md, operations)",
            entry_of(applied)
        ));
    }
    let (store, restored) = restore_snapshot(store, snapshots, opts, work, p, metrics).await?;
    Ok((store, restored, Some(restored)))
}

/// Opens partition `p`'s store: the store and the log position it holds.
async fn open_store(opts: &StoreOptions, p: u16, metrics: &Arc<Metrics>) -> Result<(Store, u64), String> {
    let (opts, m) = (opts.clone(), Arc::clone(metrics));
    let store = tokio::task::spawn_blocking(move || Store::open(&opts, m))
        .await
        .map_err(|e| format!("partition store open task: {e}"))?
        .map_err(|e| format!("partition {p}: {e}"))?;
    let applied = store.applied_position().map_err(|e| format!("partition {p}: {e}"))?;
    Ok((store, applied))
}

/// Closes partition `p`'s `store`, restores the partition's snapshot in its place and opens
/// it: the new store and the snapshot's position, which it holds.
async fn restore_snapshot(
    store: Store,
    snapshots: &object_store::ObjectStore,
    opts: &StoreOptions,
    work: &Path,
    p: u16,
    metrics: &Arc<Metrics>,
) -> Result<(Store, u64), String> {
    tokio::task::spawn_blocking(move || store.shutdown()).await.map_err(|e| format!("store close task: {e}"))?;
    let started = Instant::now();
    let restored = snapshot::restore(snapshots, p, &opts.data_dir, work)
        .await?
        .ok_or_else(|| format!("partition {p}: its snapshot disappeared while it was being restored"))?;
    let (store, applied) = open_store(opts, p, metrics).await?;
    if applied != restored {
        return Err(format!(
            "partition {p}: the restored snapshot holds position {applied}, its metadata says {restored}"
        ));
    }
    tracing::info!(
        partition = p,
        position = applied,
        ms = started.elapsed().as_millis() as u64,
        "restored the partition's snapshot"
    );
    Ok((store, applied))
}

impl Part {
    /// The partition's store as it is now.
    fn store(&self) -> Store {
        self.store.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The partition's catalog, read without a copy of the store's handle: the node's
    /// catalog is asked for on every request.
    fn catalog(&self) -> Arc<Catalog> {
        self.store.read().unwrap_or_else(std::sync::PoisonError::into_inner).catalog()
    }
}

impl Inner {
    fn part(&self, merchant: &MerchantId) -> &Part {
        &self.parts[usize::from(partition_of(merchant.as_str(), self.settings.partitions))]
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn owns(&self, part: &Part) -> bool {
        part.owned_until.load(Ordering::SeqCst) > self.now_ms()
    }

    fn owned_parts(&self) -> impl Iterator<Item = &Part> {
        self.parts.iter().filter(|p| self.owns(p))
    }

    /// Whether this node applies `part`'s log as it grows: it owns it, it stands by for it,
    /// or every node does (`followers = "warm"`). Otherwise it applies it only up to
    /// [`Part::target`].
    fn keeps_current(&self, part: &Part) -> bool {
        self.settings.followers == Followers::Warm
            || self.owns(part)
            || part.standby_until.load(Ordering::SeqCst) > self.now_ms()
    }

    /// Whether a request to `part` with no owner waits for one rather than be appended by
    /// this node: with standbys, a node that does not keep the partition current would
    /// first replay its log to answer.
    fn waits_for_owner(&self, part: &Part) -> bool {
        self.settings.followers == Followers::Standby && !self.keeps_current(part)
    }

    /// Waits until this node's store of `part` holds every entry its log held when asked:
    /// what any node acknowledged before the read can then be read here. The owner holds
    /// them already (it answers a request once it applied it); another node may first
    /// apply what it has not.
    async fn fresh(&self, part: &Part) -> Result<(), StoreError> {
        if part.failed.load(Ordering::SeqCst) {
            return Err(unavailable(format!("partition {} stopped after a storage failure on this node", part.p)));
        }
        if self.owns(part) {
            return Ok(());
        }
        let last = timed(&format!("read stream {}", stream_name(part.p)), self.js.get_stream(stream_name(part.p)))
            .await
            .map_err(|e| unavailable(format!("{e}; retry")))?
            .cached_info()
            .state
            .last_sequence;
        self.written(part, last).await
    }

    /// Waits until this node's store of `part` holds entry `seq` and those before it,
    /// asking the apply loop for them.
    async fn written(&self, part: &Part, seq: u64) -> Result<(), StoreError> {
        let mut written = part.written.subscribe();
        if *written.borrow() >= seq {
            return Ok(());
        }
        part.target.fetch_max(seq, Ordering::SeqCst);
        part.wanted.notify_one();
        let reached =
            tokio::time::timeout(ANSWER_TIMEOUT, written.wait_for(|w| *w >= seq)).await.is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(unavailable(format!(
                "partition {} did not reach entry {seq} of its log on this node within {ANSWER_TIMEOUT:?}; retry",
                part.p
            )))
        }
    }

    /// Appends `command` to partition `part`'s log (in the next entry its appender sends)
    /// and answers with the engine's answer for its position, as the partition's owner
    /// applied it (or this node, when it appended the entry itself).
    async fn append(&self, part: &Part, command: Command) -> Result<Answer, StoreError> {
        if part.failed.load(Ordering::SeqCst) {
            return Err(unavailable(format!("partition {} stopped after a storage failure on this node", part.p)));
        }
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let config = matches!(command, Command::Entity(_));
        let encoded = serde_json::value::to_raw_value(&command).map_err(|e| unavailable(format!("encode: {e}")))?;
        let (tx, rx) = oneshot::channel();
        let queued = Queued::Local(encoded, tx, config);
        if !matches!(tokio::time::timeout_at(deadline, part.queue.send(queued)).await, Ok(Ok(()))) {
            return Err(unavailable(format!("partition {}'s appender is not taking requests; retry", part.p)));
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(unavailable(format!(
                "partition {} was not applied on this node within {ANSWER_TIMEOUT:?}; retry",
                part.p
            ))),
        }
    }

    /// A timer command for every partition this node owns; the answers summed.
    async fn on_owned(&self, command: Command) -> Result<Answer, StoreError> {
        let mut swept = 0;
        let mut pruned = 0;
        for part in self.owned_parts() {
            // A sweep with nothing due would only lengthen the log (one entry per partition
            // per sweep interval): it is appended when the partition holds a due hold.
            if let Command::SweepHolds { now, .. } = &command {
                if part.store().first_hold_at()?.is_none_or(|at| at > *now) {
                    continue;
                }
            }
            match self.append(part, command.clone()).await? {
                Answer::Swept(n) => swept += n,
                Answer::Outbox(OutboxAnswer::Pruned(n)) => pruned += n,
                _ => {}
            }
        }
        Ok(match command {
            Command::SweepHolds { .. } => Answer::Swept(swept),
            _ => Answer::Outbox(OutboxAnswer::Pruned(pruned)),
        })
    }

    /// Spools a click; the forwarder sends it to its partition's log.
    fn spool_click(&self, command: Command, click: &ClickRecord) -> Result<Answer, StoreError> {
        let partition = partition_of(click.merchant_id.as_str(), self.settings.partitions);
        let entry = Spooled { partition, taken_ms: click.at_ms, command };
        let bytes = serde_json::to_vec(&entry).map_err(|e| unavailable(format!("encode: {e}")))?;
        self.spool.push(&bytes)?;
        self.spool_wake.notify_one();
        Ok(Answer::Click(std::sync::Arc::new(click.clone())))
    }
}

/// Sends the requests queued for partition `p` as log entries: each entry carries what
/// was queued while the entries before it were in flight (one request alone when the
/// partition is idle), plus, under load, what arrives within the linger until it holds the
/// partition's concurrent requests ([`gather`]); at most [`IN_FLIGHT`] are in flight at once.
///
/// On a node that does not own the partition, what was queued goes to the owner as one
/// forwarded batch instead, which the owner puts in its own next entry with the other
/// nodes' batches: every request of a partition then shares the owner's entries, which
/// carry several times the commands that one node's would (JetStream's cost is per entry).
async fn append_entries(inner: Arc<Inner>, p: u16, mut queue: mpsc::Receiver<Queued>) {
    let part = &inner.parts[usize::from(p)];
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let linger = Duration::from_micros(inner.settings.append_linger_us);
    // Commands in the entry (or forwarded batch) sent before, and when: the load this
    // node's requests put on the partition (a partition idle since then sends its next
    // request at once).
    let mut last = (0, Instant::now());
    // What did not fit in the entry before.
    let mut carried: Option<Queued> = None;
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { break };
        let waited = carried.is_some() || !queue.is_empty();
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        // Asked once the entry has its first command: an idle partition may change hands
        // while it waits for one.
        let owner = inner.owns(part);
        let (mut commands, mut bytes) = (first.commands(), first.bytes());
        let mut batch = vec![first];
        let loaded = last.1.elapsed() < IDLE_AFTER;
        let mut expect = None;
        while commands < ENTRY_COMMANDS && bytes < ENTRY_BYTES {
            let next = match queue.try_recv() {
                Ok(next) => next,
                Err(_) => {
                    // What was queued is in: `commands` waited for the slot (if any did).
                    let (expect, until) = *expect.get_or_insert_with(|| {
                        let queued = if waited { commands } else { 0 };
                        let (expect, window) = gather(loaded.then_some(last.0), queued, owner, linger);
                        (expect, tokio::time::Instant::now() + window)
                    });
                    if commands >= expect {
                        break;
                    }
                    match tokio::time::timeout_at(until, queue.recv()).await {
                        Ok(Some(next)) => next,
                        _ => break,
                    }
                }
            };
            // A forwarded batch is kept whole: one that would overfill the entry opens the next.
            let (more, more_bytes) = (next.commands(), next.bytes());
            if commands + more > ENTRY_COMMANDS || bytes + more_bytes > ENTRY_MAX_BYTES {
                carried = Some(next);
                break;
            }
            commands += more;
            bytes += more_bytes;
            batch.push(next);
        }
        last = (commands, Instant::now());
        tokio::spawn(append_entry(Arc::clone(&inner), p, batch, slot));
    }
}

/// How many commands a partition's next entry (or, on another node, its next forwarded
/// batch) waits for, and for how long, once what was queued is taken: `last` is what the
/// one before carried when it went under load (`None`: the partition was idle), `queued`
/// what queued while it was in flight.
///
/// Under load it waits for the partition's concurrent requests: those the entry before
/// carried, whose answers bring them back within a millisecond or two, and those that
/// queued meanwhile. Counting only the former, the requests settled into two groups
/// taking turns, each entry carrying about half of them (BENCHMARKS.md, "entries that
/// wait for every request"). The owner waits up to the whole linger; another node half
/// of it, so that its batch reaches the owner while the owner's entry still waits.
fn gather(last: Option<usize>, queued: usize, owner: bool, linger: Duration) -> (usize, Duration) {
    match last {
        Some(last) if last > 1 && !linger.is_zero() => (last + queued, if owner { linger } else { linger / 2 }),
        _ => (0, Duration::ZERO),
    }
}

/// Appends one entry (or, on a node that does not own the partition, forwards it to the
/// owner). This node's requests in it are answered as this node applies it, or with the
/// append's failure; the forwarded batches in it are replied to with their answers once
/// it is applied, or with the append's failure. A forwarded batch's requests are answered
/// with the owner's answers.
async fn append_entry(inner: Arc<Inner>, p: u16, batch: Vec<Queued>, slot: OwnedSemaphorePermit) {
    let part = &inner.parts[usize::from(p)];
    let id = Ulid::from_parts(0, crate::engine::Entropy::random().bits(0)).to_string();
    let node = &inner.settings.node_id;
    let config = batch.iter().any(Queued::config);
    // This node's requests first (one span, answered by `id`), then the forwarded batches.
    let mut commands = Vec::with_capacity(batch.iter().map(Queued::commands).sum());
    let mut waiters = Vec::new();
    let mut batches = Vec::new();
    for queued in batch {
        match queued {
            Queued::Local(command, waiter, _) => {
                commands.push(command);
                waiters.push(waiter);
            }
            Queued::Forwarded(f) => batches.push(f),
        }
    }
    let mut spans = if waiters.is_empty() { String::new() } else { span(node, &id, 0, waiters.len()) };
    // Each forwarded batch waits here for its commands' answers, by its own id.
    let mut replies = Vec::with_capacity(batches.len());
    for f in batches {
        if !spans.is_empty() {
            spans.push(',');
        }
        spans.push_str(&span(&f.node, &f.batch, commands.len(), f.commands.len()));
        let (answered, answers): (Vec<Waiter>, Vec<_>) = f.commands.iter().map(|_| oneshot::channel()).unzip();
        part.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(f.batch.clone(), answered);
        commands.extend(f.commands);
        replies.push((f.batch, f.reply, answers, f.replied));
    }
    let count = commands.len();
    let payload = Bytes::from(encode_entry(commands.iter().map(|c| &**c)));
    drop(commands);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let mut slot = Some(slot);
    if replies.is_empty() && !inner.owns(part) {
        let no_owner_until = tokio::time::Instant::now() + NO_OWNER_WAIT;
        let forwarding = loop {
            let forwarding =
                forward_batch(&inner, p, &id, config, payload.clone(), waiters.len(), &mut slot, deadline).await;
            // With standbys, a node that does not keep the partition current waits a moment
            // for an owner (at a cluster's start, the first node takes the partitions within
            // a second) rather than replay the log itself; then its requests answer `503`,
            // and their clients try another node (the standby takes the partition over
            // within the lease's life).
            let wait = matches!(forwarding, Forwarding::NoOwner)
                && inner.waits_for_owner(part)
                && tokio::time::Instant::now() + NO_OWNER_RETRY < no_owner_until;
            if !wait {
                break forwarding;
            }
            tokio::time::sleep(NO_OWNER_RETRY).await;
        };
        let outcome = match &forwarding {
            Forwarding::Answered(..) => "appended",
            Forwarding::NoOwner => "no_owner",
            Forwarding::Failed(_) => "failed",
        };
        inner.metrics.cluster_forwards.with_label_values(&[outcome]).inc();
        match forwarding {
            Forwarding::Answered(seq, answers) => {
                // Configuration is read from this node's catalog: it answers once it has
                // applied it too.
                if config {
                    if let Err(e) = inner.written(part, seq).await {
                        return fail(waiters, &e);
                    }
                }
                for (w, answer) in waiters.into_iter().zip(answers) {
                    let _ = w.send(answer.map_err(|e| unavailable(format!("partition {p}'s owner: {e}"))));
                }
                return;
            }
            Forwarding::Failed(e) => {
                tracing::warn!(partition = p, error = %e, "a batch forwarded to the partition's owner failed; its requests answer 503");
                return fail(waiters, &e);
            }
            // Still no owner: this node, not current, would first replay the log to answer.
            Forwarding::NoOwner if inner.waits_for_owner(part) => {
                let e = unavailable(format!(
                    "partition {p} has had no owner for {NO_OWNER_WAIT:?} (its standby takes it over within {LEASE_TTL:?}); retry"
                ));
                return fail(waiters, &e);
            }
            // Nothing was appended: this node appends its requests itself, and applies them.
            Forwarding::NoOwner => {}
        }
    }
    let own = !waiters.is_empty();
    if own {
        part.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.clone(), waiters);
    }
    let appended = publish(&inner.appends, &entry_subject(p, config), &id, &spans, payload, deadline).await;
    drop(slot);
    let mut waiting: Vec<String> = Vec::with_capacity(replies.len() + 1);
    for (batch, reply, answers, replied) in replies {
        match &appended {
            Ok(seq) => {
                tokio::spawn(reply_answers(Arc::clone(&inner), reply, *seq, answers, replied));
                waiting.push(batch);
            }
            Err(e) => {
                part.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&batch);
                replied.store(true, Ordering::SeqCst);
                if let Err(e) = inner.client.publish(reply, Bytes::from(format!("{REPLY_FAILED}{e}"))).await {
                    tracing::warn!(partition = p, error = %e, "could not reply to a forwarded batch; its sender answers 503");
                }
            }
        }
    }
    match appended {
        Ok(seq) => {
            inner.metrics.cluster_append_duration.observe(started.elapsed().as_secs_f64());
            inner.metrics.cluster_entry_commands.observe(count as f64);
            // Its requests wait for this node to apply the entry, whether or not it keeps
            // the partition current.
            part.target.fetch_max(seq, Ordering::SeqCst);
            part.wanted.notify_one();
            if own {
                waiting.push(id);
            }
            // The log has the entry but this node's subscription may not deliver it: after
            // a NATS server's kill -9 a subscription can hang without reporting missed
            // heartbeats.
            tokio::time::sleep(UNDELIVERED).await;
            let pending = part.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let waiting = waiting.iter().any(|w| pending.contains_key(w));
            drop(pending);
            if waiting && entry_of(part.applied.load(Ordering::SeqCst)) < seq {
                part.stuck.notify_one();
            }
        }
        Err(e) => {
            let waiters = part.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            fail(waiters.into_iter().flatten(), &e);
        }
    }
}

/// Sends a forwarded batch's answers to the node that forwarded it, once this node (its
/// partition's owner) applied them all, with the entry `seq` that holds them.
async fn reply_answers(
    inner: Arc<Inner>,
    reply: async_nats::Subject,
    seq: u64,
    answers: Vec<oneshot::Receiver<Result<Answer, StoreError>>>,
    replied: Arc<AtomicBool>,
) {
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let mut all: Answers = Vec::with_capacity(answers.len());
    for answer in answers {
        all.push(match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => answer.map_err(|e| e.to_string()),
            Ok(Err(_)) => Err(StoreError::Closed.to_string()),
            Err(_) => Err(format!("not applied by the owner within {ANSWER_TIMEOUT:?}; retry")),
        });
    }
    replied.store(true, Ordering::SeqCst);
    let payload = match serde_json::to_vec(&all) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "a forwarded batch's answers do not encode; its sender answers 503");
            return;
        }
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ENTRY_HEADER, seq.to_string().as_str());
    if let Err(e) = inner.client.publish_with_headers(reply, headers, Bytes::from(payload)).await {
        tracing::warn!(error = %e, "could not send a forwarded batch's answers; its sender answers 503");
    }
}

/// What became of a batch forwarded to a partition's owner.
enum Forwarding {
    /// The owner appended it in this entry and applied it: the answers, in the batch's order.
    Answered(u64, Answers),
    /// No node owns the partition, or the one asked no longer does: nothing was appended.
    NoOwner,
    /// The owner's append failed or went unanswered: the batch may be in the log or not
    /// (its requests answer `503`; a retry is a duplicate or the creation).
    Failed(StoreError),
}

/// Sends a batch of `count` requests of this node to partition `p`'s owner, which appends
/// it in its next entry (with the other nodes' batches) and replies with the answers once
/// it applied it (then `slot` is given back: the next batch may go), first saying `taken`
/// when that takes longer than [`TAKEN_AFTER`] (the slot is given back then).
#[allow(clippy::too_many_arguments)]
async fn forward_batch(
    inner: &Inner,
    p: u16,
    batch: &str,
    config: bool,
    payload: Bytes,
    count: usize,
    slot: &mut Option<OwnedSemaphorePermit>,
    deadline: tokio::time::Instant,
) -> Forwarding {
    let (tx, mut replies) = mpsc::channel(3);
    inner.forwarded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(batch.to_string(), tx);
    let forwarding = async {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NODE_HEADER, inner.settings.node_id.as_str());
        headers.insert(BATCH_HEADER, batch);
        if config {
            headers.insert(CONFIG_HEADER, "1");
        }
        let reply = answer_subject(&inner.settings.node_id, batch);
        if let Err(e) = inner.client.publish_with_reply_and_headers(forward_subject(p), reply, headers, payload).await {
            return Forwarding::Failed(unavailable(format!("partition {p}'s batch could not be sent: {e}; retry")));
        }
        // The owner answers within FORWARD_TIMEOUT, or says it took the batch: an owner
        // that does neither is gone.
        let first = deadline.min(tokio::time::Instant::now() + FORWARD_TIMEOUT);
        let Ok(Some(mut reply)) = tokio::time::timeout_at(first, replies.recv()).await else {
            return Forwarding::Failed(unavailable(format!("partition {p}'s owner did not answer; retry")));
        };
        if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS)
            || &reply.payload[..] == REPLY_NOT_OWNER.as_bytes()
        {
            return Forwarding::NoOwner;
        }
        if &reply.payload[..] == REPLY_TAKEN.as_bytes() {
            // It appends it, which may wait out a log leader's election: the next batch
            // goes meanwhile, so that an owner killed holding this one stalls the
            // partition's requests no longer.
            drop(slot.take());
            let Ok(Some(answers)) = tokio::time::timeout_at(deadline, replies.recv()).await else {
                return Forwarding::Failed(unavailable(format!(
                    "partition {p}'s owner took the batch but did not answer within {ANSWER_TIMEOUT:?}; retry"
                )));
            };
            reply = answers;
        }
        drop(slot.take());
        let Some(seq) = header(&reply, ENTRY_HEADER).and_then(|s| s.parse::<u64>().ok()) else {
            let text = String::from_utf8_lossy(&reply.payload);
            let why = text.strip_prefix(REPLY_FAILED).unwrap_or(&text);
            return Forwarding::Failed(unavailable(format!("partition {p}'s owner could not append: {why}")));
        };
        match serde_json::from_slice::<Answers>(&reply.payload) {
            Ok(answers) if answers.len() == count => Forwarding::Answered(seq, answers),
            Ok(answers) => Forwarding::Failed(unavailable(format!(
                "partition {p}'s owner answered {} of {count} requests of entry {seq}",
                answers.len()
            ))),
            Err(e) => Forwarding::Failed(unavailable(format!("partition {p}'s owner's answers do not decode: {e}"))),
        }
    }
    .await;
    inner.forwarded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(batch);
    forwarding
}

/// Hands the replies to this node's forwarded batches to the batches waiting for them.
async fn take_answers(inner: Arc<Inner>, mut replies: async_nats::Subscriber) {
    while let Some(reply) = replies.next().await {
        let batch = reply.subject.rsplit('.').next().unwrap_or_default();
        let waiting = inner.forwarded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(batch).cloned();
        if let Some(waiting) = waiting {
            let _ = waiting.try_send(reply);
        }
    }
}

/// Takes the batches other nodes forward to partition `p` while this node owns it, and
/// queues them to the partition's appender; ends (unsubscribing) when the lease is lost.
async fn serve_forwards(inner: Arc<Inner>, p: u16) {
    let part = &inner.parts[usize::from(p)];
    let mut forwards = match inner.client.queue_subscribe(forward_subject(p), OWNERS.to_string()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(partition = p, error = %e, "cannot take forwarded requests; the other nodes append their own");
            return;
        }
    };
    let mut stop = inner.stop.subscribe();
    let mut tick = tokio::time::interval(LEASE_EVERY);
    loop {
        let message = tokio::select! {
            m = forwards.next() => match m { Some(m) => m, None => break },
            _ = tick.tick() => if inner.owns(part) { continue } else { break },
            _ = stop.changed() => break,
        };
        let Some(reply) = message.reply.clone() else { continue };
        let entry = serde_json::from_slice::<RawEntry>(&message.payload);
        let answer = match (inner.owns(part), header(&message, NODE_HEADER), header(&message, BATCH_HEADER), entry) {
            (false, ..) => REPLY_NOT_OWNER.to_string(),
            (true, Some(node), Some(batch), Ok(entry)) => {
                let config = header(&message, CONFIG_HEADER).is_some();
                let replied = Arc::new(AtomicBool::new(false));
                tokio::spawn(say_taken(Arc::clone(&inner), reply.clone(), Arc::clone(&replied)));
                let forwarded =
                    Forwarded { node, batch, commands: entry.commands, reply: reply.clone(), config, replied };
                if part.queue.send(Queued::Forwarded(forwarded)).await.is_ok() {
                    continue;
                }
                format!("{REPLY_FAILED}this node is stopping")
            }
            _ => format!("{REPLY_FAILED}a forwarded batch without its node, its id or readable commands"),
        };
        let not_owner = answer == REPLY_NOT_OWNER;
        let _ = inner.client.publish(reply, Bytes::from(answer)).await;
        if not_owner {
            break;
        }
    }
    tracing::info!(partition = p, "no longer taking forwarded requests");
}

/// Says `taken` to the sender of a forwarded batch whose answers are not sent within
/// [`TAKEN_AFTER`] of its receipt.
async fn say_taken(inner: Arc<Inner>, reply: async_nats::Subject, replied: Arc<AtomicBool>) {
    tokio::time::sleep(TAKEN_AFTER).await;
    if !replied.load(Ordering::SeqCst) {
        let _ = inner.client.publish(reply, Bytes::from_static(REPLY_TAKEN.as_bytes())).await;
    }
}

/// Publishes with a message id until JetStream acknowledges it or `deadline` passes. A
/// timed-out acknowledgement is ambiguous (the entry may be stored): the retry carries the
/// same id, so JetStream keeps it once. "No responders" also means a stream leader is being
/// elected: retried too.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    spans: &str,
    payload: Bytes,
    deadline: tokio::time::Instant,
) -> Result<u64, StoreError> {
    let mut wait = Duration::from_millis(50);
    loop {
        let message = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(id)
            .header(BATCHES_HEADER, spans);
        let attempt = async {
            let ack = js.send_publish(subject.to_string(), message).await.map_err(|e| e.to_string())?;
            ack.await.map_err(|e| e.to_string())
        };
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(ack)) => return Ok(ack.sequence),
            Ok(Err(e)) => e,
            Err(_) => "no acknowledgement".to_string(),
        };
        if tokio::time::Instant::now() + wait >= deadline {
            return Err(unavailable(format!("the append to {subject} was not acknowledged: {error}; retry")));
        }
        tracing::debug!(subject, error, "append not acknowledged; retrying with the same message id");
        tokio::time::sleep(wait).await;
        // Capped at 250 ms: once a new leader is elected the entry goes within a quarter
        // second (one entry per partition retries, not every request).
        wait = (wait * 2).min(Duration::from_millis(250));
    }
}

/// The cluster-wide visitor salt: made by the first node, read by the others, so a
/// visitor has the same fingerprint on every node.
async fn cluster_salt(meta: &kv::Store) -> Result<[u8; 32], ClusterError> {
    let mut fresh = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut fresh);
    if timed("record the visitor salt", meta.create(SALT_KEY, Bytes::copy_from_slice(&fresh))).await.is_ok() {
        return Ok(fresh);
    }
    let stored = timed("read the visitor salt", meta.get(SALT_KEY)).await?;
    stored
        .and_then(|b| <[u8; 32]>::try_from(b.as_ref()).ok())
        .ok_or_else(|| ClusterError::Shape("the cluster's visitor salt is missing or malformed".into()))
}

/// Applies partition `p`'s log on this node for as long as the node runs; a broken
/// subscription is made again from the next position. A node that does not keep the
/// partition current ([`Inner::keeps_current`]) reads its log only while it is behind
/// [`Part::target`].
async fn apply_partition(inner: Arc<Inner>, p: u16) {
    let part = &inner.parts[usize::from(p)];
    let (done_tx, done_rx) = mpsc::channel(4096);
    let completion = tokio::spawn(complete(Arc::clone(&inner), p, done_rx));
    let mut stop = inner.stop.subscribe();
    'applying: loop {
        if *stop.borrow() || part.failed.load(Ordering::SeqCst) {
            break;
        }
        while !inner.keeps_current(part) && part.target.load(Ordering::SeqCst) <= *part.written.borrow() {
            tokio::select! {
                _ = part.wanted.notified() => {}
                // The lease may have come meanwhile.
                _ = tokio::time::sleep(LEASE_EVERY) => {}
                _ = stop.changed() => break 'applying,
            }
        }
        // The entry of the last command applied is read again: the node may have stopped
        // inside it.
        let from = entry_of(part.applied.load(Ordering::SeqCst)).max(1);
        tokio::select! {
            r = consume(&inner, part, from, &done_tx) => match r {
                Ok(Consumed::CaughtUp) => continue,
                Ok(Consumed::Stopped) => {}
                Ok(Consumed::Trimmed(expected)) => match restore_running(&inner, part, &done_tx).await {
                    Ok(at) => {
                        tracing::info!(partition = p, expected, position = at, "the log no longer held this node's next entry: restored the partition's snapshot");
                        continue;
                    }
                    Err(e) => {
                        part.failed.store(true, Ordering::SeqCst);
                        tracing::error!(partition = p, expected, error = %e, "the partition's log no longer holds the entries after this node's position and its snapshot could not be restored; the partition stops on this node (restart the node)");
                    }
                },
                Err(e) => {
                    tracing::warn!(partition = p, from, error = %e, "partition log subscription ended; subscribing again");
                }
            },
            _ = part.stuck.notified() => {
                tracing::warn!(partition = p, from, "an acknowledged entry was not delivered within {UNDELIVERED:?}; subscribing again");
            }
            _ = stop.changed() => break,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(done_tx);
    let _ = completion.await;
}

/// Replaces partition `part`'s store by the partition's snapshot while the node runs,
/// once everything queued to the old store is written: the log no longer holds the entries
/// after this node's position (trimmed while it did not apply the partition, or while it
/// was cut off). Returns the snapshot's position, from which the node applies the log.
async fn restore_running(inner: &Inner, part: &Part, done: &mpsc::Sender<Applying>) -> Result<u64, String> {
    let (reached, barrier) = oneshot::channel();
    done.send(Applying::Barrier(reached)).await.map_err(|_| "the node is stopping".to_string())?;
    barrier.await.map_err(|_| "the node is stopping".to_string())?;
    let have = part.applied.load(Ordering::SeqCst);
    match snapshot::latest(&inner.snapshots, part.p).await? {
        Some(at) if at > have => {}
        _ => return Err(format!("no snapshot of partition {} beyond this node's position {have}", part.p)),
    }
    let (store, applied) =
        restore_snapshot(part.store(), &inner.snapshots, &part.opts, &inner.work, part.p, &inner.metrics).await?;
    *part.store.write().unwrap_or_else(std::sync::PoisonError::into_inner) = store;
    part.applied.store(applied, Ordering::SeqCst);
    part.snapshot_at.fetch_max(applied, Ordering::SeqCst);
    Ok(applied)
}

/// Watches partition `p`'s configuration entries (`followers = "lazy"`): each one raises
/// the partition's target, so that a node that does not own it still applies its
/// configuration (and what came before it in the log) within milliseconds.
async fn watch_config(inner: Arc<Inner>, p: u16) {
    let part = &inner.parts[usize::from(p)];
    let mut stop = inner.stop.subscribe();
    loop {
        let from = *part.written.borrow() + 1;
        tokio::select! {
            r = config_entries(&inner, part, from) => {
                tracing::warn!(partition = p, from, error = %r.unwrap_err(), "configuration watch ended; watching again");
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A reader of partition `p`'s log from entry `from` (an ephemeral consumer, nothing
/// acknowledged): every entry, or (`config_only`) the headers of its configuration entries.
async fn read_log(inner: &Inner, p: u16, from: u64, config_only: bool) -> Result<consumer::pull::Stream, String> {
    let stream = inner.js.get_stream(stream_name(p)).await.map_err(|e| e.to_string())?;
    let mut config = consumer::pull::Config {
        deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
        ack_policy: consumer::AckPolicy::None,
        memory_storage: true,
        num_replicas: 1,
        inactive_threshold: Duration::from_secs(30),
        ..Default::default()
    };
    if config_only {
        config.filter_subject = entry_subject(p, true);
        config.headers_only = true;
    }
    let consumer = stream.create_consumer(config).await.map_err(|e| e.to_string())?;
    consumer
        .stream()
        .max_messages_per_batch(512)
        .heartbeat(Duration::from_secs(1))
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// Reads the positions of partition `part`'s configuration entries from `from` (their
/// headers only) and raises the partition's target to each.
async fn config_entries(inner: &Inner, part: &Part, from: u64) -> Result<(), String> {
    let mut messages = read_log(inner, part.p, from, true).await?;
    while let Some(message) = messages.next().await {
        let seq = message.map_err(|e| e.to_string())?.info().map_err(|e| e.to_string())?.stream_sequence;
        if part.target.fetch_max(seq, Ordering::SeqCst) < seq {
            part.wanted.notify_one();
        }
    }
    Err("the subscription ended".into())
}

/// Reads the log from `from` and queues each entry to the partition's store, in order,
/// until a node that does not keep the partition current has reached its target.
async fn consume(inner: &Inner, part: &Part, from: u64, done: &mpsc::Sender<Applying>) -> Result<Consumed, String> {
    let mut messages = read_log(inner, part.p, from, false).await?;
    // A subscription that hangs without reporting missed heartbeats (seen after a NATS
    // server's kill -9) is made again by `Part::stuck`, which `append_entry` raises.
    let store = part.store();
    let mut expected = from;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let (seq, pending) = {
            let info = message.info().map_err(|e| e.to_string())?;
            (info.stream_sequence, info.pending)
        };
        let applied = part.applied.load(Ordering::SeqCst);
        part.last_seen.store(seq + pending, Ordering::SeqCst);
        if seq < expected {
            continue;
        }
        if seq != expected {
            let first = inner.js.get_stream(stream_name(part.p)).await.map(|s| s.cached_info().state.first_sequence);
            if first.as_ref().is_ok_and(|first| *first > expected) {
                // The entries after this node's position were trimmed (after a snapshot,
                // while this node did not apply the partition or was cut off): applying
                // past the hole would diverge from every other node.
                return Ok(Consumed::Trimmed(expected));
            }
            // A delivery that skipped entries (seen around a NATS server's kill -9): the
            // subscription is made again from the next position.
            return Err(format!("gap in the delivery: expected entry {expected}, got {seq}"));
        }
        expected = seq + 1;
        let mut waiters = header(&message, BATCHES_HEADER).map(|spans| own_waiters(part, &spans)).unwrap_or_default();
        let commands = match serde_json::from_slice::<Entry>(&message.payload) {
            Ok(entry) => entry.commands,
            Err(e) => {
                // Every node skips the same unreadable entry: state stays the same everywhere.
                tracing::error!(partition = part.p, entry = seq, error = %e, "a log entry does not decode; skipped");
                part.applied.store(position(seq, (1 << INDEX_BITS) - 1), Ordering::SeqCst);
                fail(
                    waiters.into_iter().flatten(),
                    &StoreError::Corrupt(format!("log entry {seq} does not decode: {e}")),
                );
                if done.send(Applying::Entry(seq)).await.is_err() {
                    return Ok(Consumed::Stopped);
                }
                continue;
            }
        };
        for (index, command) in commands.into_iter().enumerate() {
            let waiter = waiters.get_mut(index).and_then(Option::take);
            let at = position(seq, index);
            if at <= applied {
                continue;
            }
            let rx = store.enqueue_at(command, at).await.map_err(|e| e.to_string())?;
            part.applied.store(at, Ordering::SeqCst);
            if done.send(Applying::Command(rx, waiter)).await.is_err() {
                return Ok(Consumed::Stopped);
            }
        }
        if done.send(Applying::Entry(seq)).await.is_err() {
            return Ok(Consumed::Stopped);
        }
        if !inner.keeps_current(part) && seq >= part.target.load(Ordering::SeqCst) {
            return Ok(Consumed::CaughtUp);
        }
    }
    Err("the log subscription ended".into())
}

/// One span of an entry's [`BATCHES_HEADER`]: `count` commands from `start` are the
/// batch `batch` of node `node`.
fn span(node: &str, batch: &str, start: usize, count: usize) -> String {
    format!("{node} {batch} {start} {count}")
}

/// The batches an entry's [`BATCHES_HEADER`] names, with the index of each batch's first
/// command; spans that do not parse are skipped (their requests answer `503` when their
/// wait ends).
fn spans_of(header: &str) -> impl Iterator<Item = (&str, usize)> + '_ {
    header.split(',').filter_map(move |span| {
        let mut fields = span.split(' ');
        let (_node, batch, start) = (fields.next()?, fields.next()?, fields.next()?.parse().ok()?);
        Some((batch, start))
    })
}

/// The requests waiting on this node for an entry's answers, by the entry's
/// [`BATCHES_HEADER`]: its own, and, on the partition's owner, the batches other nodes
/// forwarded (batch ids are unique); each waiter at its command's index.
fn own_waiters(part: &Part, header: &str) -> Vec<Option<Waiter>> {
    let mut at = Vec::new();
    for (batch, start) in spans_of(header) {
        let Some(waiters) = part.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(batch) else {
            continue;
        };
        for (index, w) in (start..1 << INDEX_BITS).zip(waiters) {
            if at.len() <= index {
                at.resize_with(index + 1, || None);
            }
            at[index] = Some(w);
        }
    }
    at
}

/// Routes each applied entry's answer to the request waiting for it, in log order. A
/// storage failure stops the partition on this node: its later entries must not be
/// applied over a hole.
async fn complete(inner: Arc<Inner>, p: u16, mut done: mpsc::Receiver<Applying>) {
    let part = &inner.parts[usize::from(p)];
    while let Some(applying) = done.recv().await {
        let (rx, waiter) = match applying {
            Applying::Command(rx, waiter) => (rx, waiter),
            Applying::Entry(seq) => {
                part.written.send_if_modified(|w| {
                    let later = seq > *w;
                    *w = (*w).max(seq);
                    later
                });
                continue;
            }
            Applying::Barrier(reached) => {
                let _ = reached.send(());
                continue;
            }
        };
        let result = rx.await.unwrap_or(Err(StoreError::Closed));
        if let Err(e) = &result {
            if !part.failed.swap(true, Ordering::SeqCst) {
                tracing::error!(partition = p, error = %e, "applying the partition's log failed; the partition stops on this node (restart the node; it replays from its last stored position)");
            }
        }
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    }
}

/// Sends spooled clicks to their partitions' logs, oldest first, and forgets each once
/// JetStream acknowledged it.
async fn forward_clicks(inner: Arc<Inner>) {
    loop {
        let batch = match inner.spool.oldest(256) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "click spool unreadable");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.spool_wake.notified()).await;
            continue;
        }
        // One entry per partition of the batch, its clicks in spool order: JetStream's cost
        // is per entry (each one replicated and fsynced on three servers), so a click of
        // its own per entry cost the servers as much as a log entry of 45 conversions
        // (BENCHMARKS.md). The entries are pipelined, then their acknowledgements read in
        // order; the first that fails leaves its clicks and those after it in the spool for
        // the next pass. A click appended twice (its entry re-sent with other clicks)
        // changes nothing the second time it is applied.
        let (entries, unreadable) = click_entries(batch, &inner.settings.node_id);
        for key in unreadable {
            tracing::error!(key, "a spooled click does not decode; dropped");
            let _ = inner.spool.remove(key);
        }
        let mut acks = Vec::with_capacity(entries.len());
        for e in entries {
            let payload = encode_entry(e.commands.iter().map(|c| &**c));
            let message =
                jetstream::message::PublishMessage::build().payload(Bytes::from(payload)).message_id(e.message_id());
            match inner.appends.send_publish(format!("tally.p.{}.click", e.partition), message).await {
                Ok(ack) => acks.push((e.spooled, ack)),
                Err(e) => {
                    tracing::warn!(error = %e, "click forward failed; retrying");
                    break;
                }
            }
        }
        let mut failed = acks.is_empty();
        for (spooled, ack) in acks {
            if failed {
                break;
            }
            match ack.await {
                Ok(_) => {
                    let now = crate::domain::clock::Clock::now_ms(&crate::domain::clock::SystemClock);
                    for (key, taken_ms) in spooled {
                        inner.metrics.cluster_forward_lag.observe((now - taken_ms).max(0) as f64 / 1000.0);
                        let _ = inner.spool.remove(key);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "click forward not acknowledged; retrying");
                    failed = true;
                }
            }
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Takes free partitions and renews the ones held, every [`LEASE_EVERY`]. A lease whose
/// renewal failed is given up at once; one not renewed for `LEASE_TTL - 1 s` is no longer
/// acted on, though JetStream keeps it until its TTL.
async fn hold_leases(inner: Arc<Inner>, leases: kv::Store) {
    let mut revisions: Vec<Option<u64>> = vec![None; inner.parts.len()];
    // The standby leases held (`followers = "standby"`).
    let mut standing: Vec<Option<u64>> = vec![None; inner.parts.len()];
    let standbys = inner.settings.followers == Followers::Standby;
    // Each owned partition's task taking forwarded batches ([`serve_forwards`]).
    let mut forwards: Vec<Option<JoinHandle<()>>> = (0..inner.parts.len()).map(|_| None).collect();
    let hold_for = u64::try_from((LEASE_TTL - Duration::from_secs(1)).as_millis()).unwrap_or(4000);
    let renew_after = u64::try_from(RENEW_AFTER.as_millis()).unwrap_or(1500);
    // A lease held whose last renewal (asked at `until - hold_for`) is recent is left as it is.
    let recent = |until: &AtomicU64, asked: u64| until.load(Ordering::SeqCst) + renew_after > asked + hold_for;
    let node = Bytes::from(inner.settings.node_id.clone());
    let mut tick = tokio::time::interval(LEASE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for part in &inner.parts {
            let i = usize::from(part.p);
            let asked = inner.now_ms();
            // With standbys, a partition is taken over by its standby: a node that neither
            // owns nor stands by for it first tries to become its standby, and asks for the
            // owner's lease only once it is (the owner's lease is free only when the owner
            // is gone, so the standby, current, takes it without replaying the log).
            if standbys && revisions[i].is_none() {
                let was = standing[i];
                let renewed = was.is_none() || !recent(&part.standby_until, asked);
                if renewed {
                    standing[i] = lease(&leases, &standby_key(part.p), &node, was).await;
                }
                match (was, standing[i]) {
                    // Held, not asked this time.
                    _ if !renewed => {}
                    (None, Some(rev)) => {
                        tracing::info!(partition = part.p, revision = rev, "standing by for the partition");
                        part.standby_until.store(asked + hold_for, Ordering::SeqCst);
                        part.wanted.notify_one();
                    }
                    (Some(_), Some(_)) => part.standby_until.store(asked + hold_for, Ordering::SeqCst),
                    (Some(_), None) => {
                        tracing::warn!(partition = part.p, "lost the partition's standby lease");
                        part.standby_until.store(0, Ordering::SeqCst);
                    }
                    (None, None) => {}
                }
                if standing[i].is_none() {
                    continue;
                }
            }
            if revisions[i].is_some() && recent(&part.owned_until, asked) {
                continue;
            }
            match lease(&leases, &lease_key(part.p), &node, revisions[i]).await {
                Some(rev) => {
                    let taken = revisions[i].is_none();
                    revisions[i] = Some(rev);
                    part.owned_until.store(asked + hold_for, Ordering::SeqCst);
                    if taken {
                        tracing::info!(partition = part.p, revision = rev, "took the partition's lease");
                        // It keeps the partition current from now on.
                        part.wanted.notify_one();
                        // Its deliveries are this node's to send now: the worker looks at once.
                        inner.outbox_wake.notify_waiters();
                        // Another node stands by for it now.
                        if standing[i].take().is_some() {
                            part.standby_until.store(0, Ordering::SeqCst);
                            let _ = tokio::time::timeout(LEASE_EVERY, leases.delete(standby_key(part.p))).await;
                        }
                    }
                    let serving = &mut forwards[i];
                    if serving.as_ref().is_none_or(JoinHandle::is_finished) {
                        *serving = Some(tokio::spawn(serve_forwards(Arc::clone(&inner), part.p)));
                    }
                }
                None => {
                    if revisions[i].take().is_some() {
                        tracing::warn!(partition = part.p, "lost the partition's lease");
                        part.owned_until.store(0, Ordering::SeqCst);
                    }
                }
            }
        }
        let owned: Vec<u16> = inner.owned_parts().map(|p| p.p).collect();
        inner.metrics.cluster_partitions_owned.set(i64::try_from(owned.len()).unwrap_or(i64::MAX));
        let lag: u64 = inner
            .parts
            .iter()
            .filter(|p| inner.keeps_current(p))
            .map(|p| p.last_seen.load(Ordering::SeqCst).saturating_sub(entry_of(p.applied.load(Ordering::SeqCst))))
            .sum();
        inner.metrics.cluster_apply_lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
        let report = NodeReport {
            node: inner.settings.node_id.clone(),
            owned,
            applied: inner.parts.iter().map(|p| entry_of(p.applied.load(Ordering::SeqCst))).collect(),
            lag,
            current: (inner.settings.followers != Followers::Warm)
                .then(|| inner.parts.iter().filter(|p| inner.keeps_current(p)).map(|p| p.p).collect()),
            at_ms: crate::domain::clock::Clock::now_ms(&crate::domain::clock::SystemClock),
        };
        if let Ok(bytes) = serde_json::to_vec(&report) {
            let put = inner.reports.put(&inner.settings.node_id, Bytes::from(bytes));
            let _ = tokio::time::timeout(LEASE_EVERY, put).await;
        }
    }
}

/// Renews the lease `key` held at revision `held`, or takes it when `held` is `None`: the
/// lease's revision, or `None` when another node holds it (or NATS did not answer in time).
async fn lease(leases: &kv::Store, key: &str, node: &Bytes, held: Option<u64>) -> Option<u64> {
    let asked = async {
        match held {
            Some(rev) => leases.update(key, node.clone(), rev).await.ok(),
            None => leases.create(key, node.clone()).await.ok(),
        }
    };
    tokio::time::timeout(LEASE_EVERY, asked).await.ok().flatten()
}

/// Snapshots each partition this node owns once `snapshot_every` entries were applied
/// since its newest snapshot, then trims its log below what every live node has applied.
async fn snapshot_owned(inner: Arc<Inner>) {
    let every = inner.settings.snapshot_every;
    if every == 0 {
        return;
    }
    let mut tick = tokio::time::interval(SNAPSHOT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for part in inner.owned_parts() {
            if part.failed.load(Ordering::SeqCst) {
                continue;
            }
            let due = || {
                entry_of(part.applied.load(Ordering::SeqCst))
                    >= entry_of(part.snapshot_at.load(Ordering::SeqCst)) + every
            };
            if due() {
                // Another owner may have taken one since (this node took the lease over).
                if let Ok(Some(at)) = snapshot::latest(&inner.snapshots, part.p).await {
                    part.snapshot_at.fetch_max(at, Ordering::SeqCst);
                }
            }
            if due() {
                let started = Instant::now();
                match snapshot::take(&part.store(), &inner.snapshots, part.p, &inner.work, &inner.settings.node_id)
                    .await
                {
                    Ok(taken) => {
                        inner.metrics.cluster_snapshots.with_label_values(&["ok"]).inc();
                        part.snapshot_at.fetch_max(taken.position, Ordering::SeqCst);
                        tracing::info!(
                            partition = part.p,
                            entry = entry_of(taken.position),
                            bytes = taken.bytes,
                            ms = started.elapsed().as_millis() as u64,
                            "snapshot taken"
                        );
                    }
                    Err(e) => {
                        inner.metrics.cluster_snapshots.with_label_values(&["failed"]).inc();
                        tracing::warn!(partition = part.p, error = %e, "snapshot failed; the log is kept whole until one succeeds");
                    }
                }
            }
            if entry_of(part.snapshot_at.load(Ordering::SeqCst)) > part.trimmed.load(Ordering::SeqCst) {
                trim(&inner, part).await;
            }
        }
    }
}

/// Purges partition `part`'s log below the entry of its snapshot and the entries every
/// live node reported (each node reads its last entry again when it resubscribes): a node
/// that is still applying keeps what it needs, and one away for longer than its report
/// lives restores the snapshot when it starts.
async fn trim(inner: &Inner, part: &Part) {
    let mut keep_from =
        entry_of(part.snapshot_at.load(Ordering::SeqCst)).min(entry_of(part.applied.load(Ordering::SeqCst)));
    let reports = match read_reports(&inner.reports).await {
        Ok(reports) => reports,
        Err(e) => {
            tracing::warn!(partition = part.p, error = %e, "the node reports could not be read; the log is not trimmed now");
            return;
        }
    };
    for report in reports {
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(partition = part.p, error = %e, "a node report does not decode; the log is not trimmed now");
                return;
            }
        };
        // A lazy node applies what it does not own when it must, restoring the snapshot if
        // the log no longer holds its position.
        if report.current.as_ref().is_some_and(|current| !current.contains(&part.p)) {
            continue;
        }
        if let Some(applied) = report.applied.get(usize::from(part.p)) {
            keep_from = keep_from.min(*applied);
        }
    }
    if keep_from <= part.trimmed.load(Ordering::SeqCst).max(1) {
        return;
    }
    let purged = async {
        let stream = inner.js.get_stream(stream_name(part.p)).await.map_err(|e| e.to_string())?;
        stream.purge().sequence(keep_from).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), purged).await {
        Ok(Ok(response)) => {
            part.trimmed.store(keep_from, Ordering::SeqCst);
            tracing::info!(
                partition = part.p,
                below = keep_from,
                purged = response.purged,
                "trimmed the partition's log"
            );
        }
        Ok(Err(e)) => tracing::warn!(partition = part.p, error = %e, "trimming the partition's log failed"),
        Err(_) => tracing::warn!(partition = part.p, "trimming the partition's log timed out"),
    }
}

impl Node {
    /// A read of partition `part`'s store, once this node holds what the partition's log
    /// held when the read came ([`Inner::fresh`]).
    fn read<'a, T: Send + 'a>(
        &'a self,
        part: &'a Part,
        read: impl FnOnce(Store) -> BoxFuture<'a, Result<T, StoreError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        Box::pin(async move {
            self.inner.fresh(part).await?;
            read(part.store()).await
        })
    }
}

impl Backend for Node {
    fn submit(&self, command: Command) -> BoxFuture<'_, Result<Answer, StoreError>> {
        Box::pin(async move {
            let inner = &*self.inner;
            if let Command::Click { click, unique_window_ms, .. } = &command {
                let forwarded =
                    Command::Click { click: click.clone(), unique_window_ms: *unique_window_ms, once: true };
                return inner.spool_click(forwarded, click);
            }
            if let Command::Entity(op) = &command {
                if let Some(refusal) = crate::engine::id_taken(&self.catalog(), op) {
                    return Ok(Answer::Entity(Err(refusal)));
                }
            }
            match merchant_of(&command) {
                Some(merchant) => {
                    let part = inner.part(merchant);
                    inner.append(part, command).await
                }
                None => inner.on_owned(command).await,
            }
        })
    }

    /// Only on the partition's owner: another node's copy may be behind the log.
    fn settled_conversion(&self, merchant: &MerchantId, txn: &TxnId) -> Option<Arc<Settled>> {
        let part = self.inner.part(merchant);
        if !self.inner.owns(part) {
            return None;
        }
        part.store().settled_conversion(merchant, txn)
    }

    fn catalog(&self) -> Arc<Catalog> {
        let current: Vec<Arc<Catalog>> = self.inner.parts.iter().map(Part::catalog).collect();
        let mut cached = self.inner.catalog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = cached.0.len() == current.len() && cached.0.iter().zip(&current).all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            let mut merged = Catalog::default();
            for c in &current {
                merged.extend(c);
            }
            *cached = (current, Arc::new(merged));
        }
        Arc::clone(&cached.1)
    }

    fn visitor_salt(&self) -> &[u8] {
        &self.inner.salt
    }

    fn is_ready(&self) -> bool {
        self.inner.parts.iter().all(|p| !p.failed.load(Ordering::SeqCst) && p.store().is_ready())
    }

    fn conversion<'a>(
        &'a self,
        merchant: &'a MerchantId,
        txn: &'a TxnId,
    ) -> BoxFuture<'a, Result<Option<ConversionRecord>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.conversion(merchant, txn).await })
        })
    }

    fn ledger_entries<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partner: &'a PartnerId,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.ledger_entries(merchant, partner).await })
        })
    }

    fn partner_conversions<'a>(
        &'a self,
        partner: &'a PartnerId,
        from: Ulid,
        until: Ulid,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ConversionRecord>, StoreError>> {
        Box::pin(async move {
            let Some(merchant) = self.catalog().partners.get(partner).map(|p| p.merchant_id.clone()) else {
                return Ok(Vec::new());
            };
            let part = self.inner.part(&merchant);
            self.inner.fresh(part).await?;
            part.store().partner_conversions(partner, from, until, limit).await
        })
    }

    fn open_reviews<'a>(
        &'a self,
        merchant: &'a MerchantId,
        after: Option<Ulid>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ConversionRecord>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.open_reviews(merchant, after, limit).await })
        })
    }

    fn payout<'a>(
        &'a self,
        merchant: &'a MerchantId,
        payout_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<PayoutRun>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.payout(merchant, payout_id).await })
        })
    }

    fn balances<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partner: &'a PartnerId,
    ) -> BoxFuture<'a, Result<Vec<(Currency, Balance)>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.balances(merchant, partner).await })
        })
    }

    fn ledger_for_conversion<'a>(
        &'a self,
        rec: &'a ConversionRecord,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>> {
        self.read(self.inner.part(&rec.merchant_id), move |store| {
            Box::pin(async move { store.ledger_for_conversion(rec).await })
        })
    }

    fn account<'a>(
        &'a self,
        merchant: &'a MerchantId,
        account: &'a str,
    ) -> BoxFuture<'a, Result<Option<AccountRecord>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.account(merchant, account).await })
        })
    }

    /// Read from the merchant's partition only (a click still in this node's spool is not
    /// found yet): a click is routed by its merchant, and a conversion's attributing click
    /// is one of its merchant's (its partition's owner sends the deliveries that ask for
    /// it, and has it at hand without asking the log).
    fn click<'a>(
        &'a self,
        merchant: &'a MerchantId,
        id: &'a Ulid,
    ) -> BoxFuture<'a, Result<Option<ClickRecord>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| Box::pin(async move { store.click(merchant, id).await }))
    }

    fn stats(&self) -> StorageStats {
        let mut total = StorageStats::default();
        for part in &self.inner.parts {
            let s = part.store().stats();
            total.sst_bytes += s.sst_bytes;
            total.memtable_bytes += s.memtable_bytes;
            // One cache shared by every partition store: each reports all of it.
            total.block_cache_bytes = total.block_cache_bytes.max(s.block_cache_bytes);
            total.table_readers_bytes += s.table_readers_bytes;
            total.estimated_keys += s.estimated_keys;
            total.write_stopped |= s.write_stopped;
            total.delayed_write_rate = total.delayed_write_rate.max(s.delayed_write_rate);
            total.pending_compaction_bytes += s.pending_compaction_bytes;
            total.stalls = (total.stalls.0 + s.stalls.0, total.stalls.1 + s.stalls.1);
        }
        total
    }

    fn delivery<'a>(
        &'a self,
        merchant: &'a MerchantId,
        id: &'a Ulid,
    ) -> BoxFuture<'a, Result<Option<Delivery>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| Box::pin(async move { store.delivery(merchant, id).await }))
    }

    fn deliveries<'a>(
        &'a self,
        merchant: &'a MerchantId,
        filter: DeliveryFilter,
    ) -> BoxFuture<'a, Result<DeliveryPage, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.deliveries(merchant, filter).await })
        })
    }

    /// Only the partitions this node owns: their owner sends their deliveries.
    fn due_deliveries(
        &self,
        from: UnixMillis,
        now: UnixMillis,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<DueDelivery>, StoreError>> {
        Box::pin(async move {
            let mut all = Vec::new();
            for part in self.inner.owned_parts() {
                all.extend(part.store().due_deliveries(from, now, limit).await?);
            }
            all.sort_by_key(|(due, _, _)| *due);
            all.truncate(limit);
            Ok(all)
        })
    }

    fn endpoint<'a>(&'a self, partner: &'a PartnerId) -> BoxFuture<'a, Result<Option<EndpointOff>, StoreError>> {
        Box::pin(async move {
            let Some(merchant) = self.catalog().partners.get(partner).map(|p| p.merchant_id.clone()) else {
                return Ok(None);
            };
            let part = self.inner.part(&merchant);
            self.inner.fresh(part).await?;
            part.store().endpoint(partner).await
        })
    }

    /// The backlog of the partitions this node owns.
    fn outbox_gauges(&self) -> BoxFuture<'_, Result<OutboxGauges, StoreError>> {
        Box::pin(async move {
            let mut total = OutboxGauges::default();
            for part in self.inner.owned_parts() {
                let g = part.store().outbox_gauges().await?;
                total.pending += g.pending;
                total.parked += g.parked;
                total.oldest_created_ms = match (total.oldest_created_ms, g.oldest_created_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Ok(total)
        })
    }

    /// Wakes when an owned partition's store made a delivery due, or this node took a
    /// partition over. Not on every applied entry: the worker's scan reads every owned
    /// partition, and scanning after each entry took 5.8 % of a node's CPU under load.
    fn outbox_woken(&self) -> BoxFuture<'_, ()> {
        let stores: Vec<Store> = self.inner.owned_parts().map(Part::store).collect();
        Box::pin(async move {
            let mut waits: Vec<BoxFuture<'_, ()>> = stores.iter().map(|s| s.outbox_woken()).collect();
            waits.push(Box::pin(self.inner.outbox_wake.notified()));
            futures_util::future::select_all(waits).await;
        })
    }

    fn rollups<'a>(
        &'a self,
        merchant: &'a MerchantId,
        scope: Scope,
        spans: Vec<(u32, Span)>,
    ) -> BoxFuture<'a, Result<Rows, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.rollups(merchant, scope, spans).await })
        })
    }

    fn first_conversions<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partners: Vec<PartnerId>,
    ) -> BoxFuture<'a, Result<Vec<Option<UnixMillis>>, StoreError>> {
        self.read(self.inner.part(merchant), move |store| {
            Box::pin(async move { store.first_conversions(merchant, partners).await })
        })
    }

    fn ledger_export(&self, query: LedgerQuery) -> mpsc::Receiver<Result<Vec<LedgerEntry>, StoreError>> {
        let (tx, rx) = mpsc::channel(2);
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let part = inner.part(&query.merchant);
            if let Err(e) = inner.fresh(part).await {
                let _ = tx.send(Err(e)).await;
                return;
            }
            let mut pages = part.store().ledger_export(query);
            while let Some(page) = pages.recv().await {
                if tx.send(page).await.is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// A cluster node's state is a copy of the logs: back up the JetStream servers (and
    /// rebuild a node by starting it with an empty data directory).
    fn backup_to(&self, _dir: &Path) -> Result<(), StoreError> {
        Err(StoreError::Io(
            "a cluster node has no backup of its own: its state is rebuilt from the partition logs; back up the JetStream servers"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::conversion::{AttributionKeys, ConversionInput};
    use crate::domain::entities::Merchant;
    use crate::domain::money::Money;
    use crate::engine::{ConversionDraft, Entropy};
    use crate::signing::WebhookSecret;

    fn shop(id: &MerchantId) -> Merchant {
        Merchant {
            id: id.clone(),
            name: "Shop".into(),
            postback_token: false,
            allowed_ips: Vec::new(),
            default_plan_id: None,
            created_ms: 1,
        }
    }

    fn round_trip(command: Command) -> Command {
        let encoded = serde_json::value::to_raw_value(&command).unwrap();
        let mut commands = serde_json::from_slice::<Entry>(&encode_entry([&*encoded, &*encoded])).unwrap().commands;
        assert_eq!(commands.len(), 2);
        commands.remove(1)
    }

    /// A spooled click of merchant `shop`, at `at`, for partition `partition`.
    fn spooled(partition: u16, at: i64) -> Vec<u8> {
        let click = ClickRecord {
            click_id: Ulid::from_parts(at, [7; 10]),
            link_id: crate::domain::ids::LinkId::parse("l").unwrap(),
            partner_id: PartnerId::parse("ann").unwrap(),
            merchant_id: MerchantId::parse("shop").unwrap(),
            at_ms: at,
            subs: Default::default(),
            ip: "203.0.113.0/24".into(),
            user_agent: "UA".into(),
            bot: false,
            unique: false,
            visitor: [1; 16],
        };
        let command = Command::Click { click: Box::new(click), unique_window_ms: 1, once: true };
        serde_json::to_vec(&Spooled { partition, taken_ms: at, command }).unwrap()
    }

    #[test]
    fn the_click_spool_goes_to_the_logs_as_one_entry_per_partition_in_spool_order() {
        let id = |at: i64| Ulid::from_parts(at, [7; 10]).to_string();
        let batch = vec![
            (10, spooled(3, 100)),
            (11, spooled(5, 101)),
            (12, b"not a click".to_vec()),
            (13, spooled(3, 102)),
            (14, spooled(3, 103)),
        ];
        let (entries, unreadable) = click_entries(batch, "gw-1");
        assert_eq!(unreadable, vec![12]);
        let got: Vec<_> = entries.iter().map(|e| (e.partition, e.spooled.clone(), e.message_id())).collect();
        assert_eq!(
            got,
            vec![
                (3, vec![(10, 100), (13, 102), (14, 103)], format!("clicks-{}-{}-3", id(100), id(103))),
                (5, vec![(11, 101)], format!("clicks-{}-{}-1", id(101), id(101))),
            ]
        );
        // Each entry decodes as the log's entries do, its clicks in spool order.
        let entry = encode_entry(entries[0].commands.iter().map(|c| &**c));
        let at: Vec<i64> = serde_json::from_slice::<Entry>(&entry)
            .unwrap()
            .commands
            .iter()
            .map(|c| match c {
                Command::Click { click, .. } => click.at_ms,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(at, vec![100, 102, 103]);
        // The same clicks sent again make the same message id; other clicks another.
        let again = click_entries(vec![(10, spooled(3, 100)), (13, spooled(3, 102)), (14, spooled(3, 103))], "gw-1");
        assert_eq!(again.0[0].message_id(), entries[0].message_id());
        let more = click_entries(vec![(10, spooled(3, 100)), (13, spooled(3, 102))], "gw-1");
        assert_ne!(more.0[0].message_id(), entries[0].message_id());
    }

    #[test]
    fn an_entry_names_each_nodes_batches_by_their_first_command() {
        let header = [span("gw-1", "01A", 0, 3), span("gw-2", "01B", 3, 5), span("gw-1", "01C", 8, 1)].join(",");
        assert_eq!(header, "gw-1 01A 0 3,gw-2 01B 3 5,gw-1 01C 8 1");
        let cases: [(&str, Vec<(&str, usize)>); 4] = [
            // Every node's batches: the owner answers the ones other nodes forwarded.
            (&header, vec![("01A", 0), ("01B", 3), ("01C", 8)]),
            ("gw-10 01D 0 2", vec![("01D", 0)]),
            // Unreadable spans are skipped, readable ones kept.
            ("gw-1 01E x 2,gw-1,gw-1 01F 4 1", vec![("01F", 4)]),
            ("", vec![]),
        ];
        for (header, want) in cases {
            assert_eq!(spans_of(header).collect::<Vec<_>>(), want, "{header}");
        }
    }

    /// The owner sends a forwarded batch's answers as JSON: each decodes as it was, a
    /// refusal's code, field and status included (the HTTP layer picks statuses from them).
    #[test]
    fn answers_sent_to_a_forwarding_node_decode_as_they_were() {
        let mut memory = crate::engine::memory::Memory::default();
        let merchant = MerchantId::parse("shop").unwrap();
        let m = shop(&merchant);
        let secret = WebhookSecret::generate();
        let sale = |minor, entropy| {
            Command::Conversion(Box::new(ConversionDraft {
                merchant: merchant.clone(),
                input: ConversionInput {
                    txn_id: TxnId::parse("order-1").unwrap(),
                    event: "sale".into(),
                    amount: Some(Money { minor, currency: Currency::parse("USD").unwrap() }),
                    occurred_ms: 5,
                    keys: AttributionKeys::default(),
                    metadata: Some(r#"{"n":1.50}"#.into()),
                },
                received_ms: 10,
                entropy: Entropy([entropy; 16]),
            }))
        };
        let commands = [
            Command::Entity(Box::new(EntityOp::Merchant {
                merchant: m.clone(),
                secret: secret.clone(),
                token_hash: None,
            })),
            Command::Entity(Box::new(EntityOp::Merchant { merchant: m, secret, token_hash: None })),
            sale(1000, 1),
            sale(1000, 2),
            sale(2000, 3),
            Command::Review {
                merchant: merchant.clone(),
                txn: TxnId::parse("nowhere").unwrap(),
                approve: true,
                by: "ops".into(),
                note: None,
                at: 11,
                entropy: Entropy([4; 16]),
            },
            Command::SweepHolds { now: 12, limit: 10, entropy: Entropy([5; 16]) },
        ];
        let mut answers: Answers = commands.into_iter().map(|c| Ok(memory.submit(c))).collect();
        let mut refusal = crate::engine::Refusal::new(true, "not_adjustable", Some("status"), "no".into());
        refusal.current_status = Some("approved");
        answers.push(Ok(Answer::Entity(Err(refusal.clone()))));
        answers.push(Err(StoreError::Closed.to_string()));
        let wire = serde_json::to_vec(&answers).unwrap();
        let back: Answers = serde_json::from_slice(&wire).unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), wire, "{}", String::from_utf8_lossy(&wire));
        use crate::engine::{ConversionOutcome as C, ReviewOutcome, Saved};
        let kinds: Vec<&str> = back
            .iter()
            .map(|a| match a {
                Ok(Answer::Entity(Ok(Saved::Created))) => "created",
                Ok(Answer::Entity(Ok(Saved::Updated))) => "updated",
                Ok(Answer::Conversion(C::Created(_))) => "conversion",
                Ok(Answer::Conversion(C::Duplicate(_))) => "duplicate",
                Ok(Answer::Conversion(C::Conflict(_))) => "conflict",
                Ok(Answer::Review(ReviewOutcome::NotFound)) => "not found",
                Ok(Answer::Swept(0)) => "swept",
                Ok(Answer::Entity(Err(r))) if *r == refusal => "refusal",
                Err(e) if *e == StoreError::Closed.to_string() => "failure",
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["created", "updated", "conversion", "duplicate", "conflict", "not found", "swept", "refusal", "failure"]
        );
        let (Ok(Answer::Conversion(C::Created(a))), Ok(Answer::Conversion(C::Duplicate(b)))) = (&back[2], &back[3])
        else {
            unreachable!()
        };
        assert_eq!(a, b, "a duplicate is the stored conversion, to the byte");
    }

    #[test]
    fn an_entry_under_load_waits_for_every_concurrent_request_and_an_idle_one_for_none() {
        let linger = Duration::from_millis(2);
        let half = Duration::from_millis(1);
        // (last entry under load, queued while it was in flight, owner, linger) -> (commands, window)
        let cases = [
            (None, 0, true, linger, (0, Duration::ZERO)),
            (None, 30, true, linger, (0, Duration::ZERO)),
            (Some(1), 0, true, linger, (0, Duration::ZERO)),
            (Some(1), 5, true, linger, (0, Duration::ZERO)),
            (Some(30), 0, true, linger, (30, linger)),
            // Two groups taking turns: the entry waits for both.
            (Some(30), 34, true, linger, (64, linger)),
            (Some(12), 9, false, linger, (21, half)),
            (Some(30), 34, true, Duration::ZERO, (0, Duration::ZERO)),
        ];
        for (last, queued, owner, linger, want) in cases {
            assert_eq!(gather(last, queued, owner, linger), want, "{last:?} {queued} {owner} {linger:?}");
        }
    }

    #[test]
    fn positions_order_entries_then_commands() {
        assert_eq!(entry_of(position(7, 0)), 7);
        assert_eq!(entry_of(position(7, ENTRY_COMMANDS - 1)), 7);
        assert!(position(7, ENTRY_COMMANDS - 1) < position(8, 0));
        assert_eq!(entry_of(0), 0);
    }

    #[test]
    fn log_entries_carry_the_whole_command_and_route_by_merchant() {
        let merchant = MerchantId::parse("shop").unwrap();
        let input = ConversionInput {
            txn_id: TxnId::parse("order-1").unwrap(),
            event: "sale".into(),
            amount: Some(Money { minor: 14_990, currency: Currency::parse("USD").unwrap() }),
            occurred_ms: 1_795_000_000_123,
            keys: AttributionKeys { partner_id: Some(PartnerId::parse("ann").unwrap()), ..Default::default() },
            metadata: Some(r#"{"plan":"pro","n":1.50}"#.into()),
        };
        let draft = ConversionDraft {
            merchant: merchant.clone(),
            input,
            received_ms: 1_795_000_000_456,
            entropy: Entropy([7; 16]),
        };
        let back = round_trip(Command::Conversion(Box::new(draft.clone())));
        let Command::Conversion(got) = &back else { panic!("{back:?}") };
        assert_eq!(got.input, draft.input);
        assert_eq!((got.received_ms, got.entropy, &got.merchant), (draft.received_ms, draft.entropy, &draft.merchant));
        assert_eq!(merchant_of(&back), Some(&merchant));

        // A secret travels whole: every node must verify with the same key.
        let secret = WebhookSecret::generate();
        let m = shop(&merchant);
        let op = EntityOp::Merchant { merchant: m, secret: secret.clone(), token_hash: Some([9; 32]) };
        let back = round_trip(Command::Entity(Box::new(op)));
        let Command::Entity(op) = &back else { panic!("{back:?}") };
        let EntityOp::Merchant { secret: got, token_hash, .. } = &**op else { panic!("{op:?}") };
        assert_eq!((got.expose_text(), *token_hash), (secret.expose_text(), Some([9; 32])));
        assert_eq!(merchant_of(&back), Some(&merchant));

        // Timer commands belong to no merchant: each owner runs them on its partitions.
        let sweep = round_trip(Command::SweepHolds { now: 5, limit: 10, entropy: Entropy([1; 16]) });
        assert_eq!(merchant_of(&sweep), None);
    }
}
