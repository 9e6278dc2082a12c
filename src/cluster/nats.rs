//! Talking to JetStream: creating the partition logs and buckets, checking an existing
//! cluster's shape, reading its state.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};

use super::{
    lease_key, stream_name, subjects, DUPLICATE_WINDOW, FORMAT_VERSION, LEASES_BUCKET, LEASE_TTL, META_BUCKET,
    NODES_BUCKET, NODE_REPORT_TTL, SNAPSHOTS_BUCKET,
};
use crate::config::ClusterSettings;

/// How long one call to NATS may take before the command gives up.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `status` waits for each thing it reads (a log, a bucket, a lease).
const STREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Why `status` shows something as unread when it got no answer within [`STREAM_TIMEOUT`].
fn electing() -> String {
    format!("no answer in {STREAM_TIMEOUT:?} (a leader election?)")
}

/// The meta key holding the cluster's fixed shape.
const SHAPE_KEY: &str = "shape";

/// What went wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `[cluster] nats_urls` is empty.
    #[error("cluster mode is off: set [cluster] nats_urls (and node_id) in the configuration")]
    Off,
    /// No NATS server answered.
    #[error("cannot reach NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    /// A JetStream call failed or timed out.
    #[error("{what}: {reason}")]
    Call { what: String, reason: String },
    /// The cluster exists with another shape than this node's configuration.
    #[error("{0}")]
    Shape(String),
    /// `tally cluster init` was never run against these servers.
    #[error("the cluster has no partition logs yet: run `tally cluster init` once")]
    NotInitialized,
}

/// The fixed shape of a cluster, kept in the meta bucket by the first `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub partitions: u16,
    pub replicas: u8,
    pub format: u32,
}

/// One partition's log and lease, as `tally cluster status` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: u16,
    pub stream: String,
    /// The JetStream server leading the stream's replication (`server_name`).
    pub leader: Option<String>,
    /// Every replica: its server, whether it is current, and how far behind it is.
    pub replicas: Vec<ReplicaStatus>,
    /// The log's first position still held (earlier ones were trimmed after a snapshot).
    pub first_seq: u64,
    /// The log's last position (0: empty).
    pub last_seq: u64,
    pub messages: u64,
    /// The log entry of the partition's newest snapshot (it holds that entry's commands
    /// up to some index), if it has one.
    pub snapshot: Option<u64>,
    /// The node holding the partition's lease, if any.
    pub owner: Option<String>,
    /// Why the log could not be read just now (e.g. its leader is being elected).
    pub unavailable: Option<String>,
    /// Why the lease could not be read just now (`owner` is then unknown, not absent).
    pub lease_unavailable: Option<String>,
}

/// One copy of a partition's log.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub server: String,
    pub current: bool,
    pub lag: u64,
}

/// What a running node reports every second (bucket `tally_nodes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    /// The partitions whose lease it holds.
    pub owned: Vec<u16>,
    /// Its applied log position of each partition.
    pub applied: Vec<u64>,
    /// Log entries it has not applied yet, summed over the partitions it keeps current.
    pub lag: u64,
    /// The partitions it keeps current (it owns them, or stands by for them); `None`: all
    /// of them (`followers = "warm"`). It applies the others only when it must, so their
    /// `applied` positions do not hold back the trimming of their logs.
    #[serde(default)]
    pub current: Option<Vec<u16>>,
    /// When it reported (Unix ms).
    pub at_ms: i64,
}

/// The whole cluster, as `tally cluster status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub shape: Shape,
    /// The NATS server this command is connected to.
    pub connected_to: String,
    pub partitions: Vec<PartitionStatus>,
    /// The nodes that reported within the last 30 s.
    pub nodes: Vec<NodeReport>,
    /// What could not be read just now (the cluster's recorded shape, leases, snapshots,
    /// node reports), each with why: right after a NATS server's death their streams may
    /// be electing leaders. The rest is shown; an unread shape is this node's
    /// configuration's.
    pub unavailable: Vec<String>,
}

fn call<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> ClusterError {
    let what = what.into();
    move |e| ClusterError::Call { what, reason: e.to_string() }
}

/// Waits at most [`CALL_TIMEOUT`] for one NATS call; what the call answered is the
/// caller's to read.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T, ClusterError> {
    within_for(CALL_TIMEOUT, what, f).await
}

/// [`within`], waiting at most `limit`.
async fn within_for<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, ClusterError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| ClusterError::Call { what: what.into(), reason: format!("no answer in {limit:?}") })
}

/// Runs one NATS call with [`CALL_TIMEOUT`]; its error is named by `what`.
pub(super) async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ClusterError> {
    within(what, f).await?.map_err(call(what))
}

pub(super) async fn connect(
    settings: &ClusterSettings,
) -> Result<(async_nats::Client, jetstream::Context), ClusterError> {
    if !settings.enabled() {
        return Err(ClusterError::Off);
    }
    let urls = settings.nats_urls.join(", ");
    let name = if settings.node_id.is_empty() { "tally".to_string() } else { format!("tally {}", settings.node_id) };
    let options = async_nats::ConnectOptions::new().name(name).connection_timeout(Duration::from_secs(3));
    let client = tokio::time::timeout(CALL_TIMEOUT, options.connect(settings.nats_urls.clone()))
        .await
        .map_err(|_| ClusterError::Connect { urls: urls.clone(), reason: "timed out".into() })?
        .map_err(|e| ClusterError::Connect { urls, reason: e.to_string() })?;
    let js = jetstream::new(client.clone());
    Ok((client, js))
}

pub(super) fn shape_of(settings: &ClusterSettings) -> Shape {
    Shape { partitions: settings.partitions, replicas: settings.replicas, format: FORMAT_VERSION }
}

fn partition_stream(settings: &ClusterSettings, p: u16) -> stream::Config {
    stream::Config {
        name: stream_name(p),
        subjects: vec![subjects(p)],
        num_replicas: usize::from(settings.replicas),
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        deny_delete: true,
        ..Default::default()
    }
}

/// Opens one of the cluster's buckets: [`ClusterError::NotInitialized`] only when its
/// stream does not exist. Any other failure names the call: right after a NATS server's
/// death the bucket's stream may be electing a leader, and "run `tally cluster init`"
/// would then send an operator the wrong way. Waits at most `limit`.
pub(super) async fn cluster_bucket(
    js: &jetstream::Context,
    name: &str,
    limit: Duration,
) -> Result<kv::Store, ClusterError> {
    let what = format!("open bucket {name}");
    match within_for(limit, &what, js.get_key_value(name)).await? {
        Ok(bucket) => Ok(bucket),
        Err(e) if stream_missing(&e) => Err(ClusterError::NotInitialized),
        Err(e) => Err(call(what)(e)),
    }
}

/// Whether a bucket failed to open because JetStream has no stream for it.
fn stream_missing(e: &jetstream::context::KeyValueError) -> bool {
    let Some(source) = std::error::Error::source(e) else { return false };
    source.downcast_ref::<jetstream::context::GetStreamError>().is_some_and(no_such_stream)
}

/// Whether JetStream answered that the stream does not exist.
fn no_such_stream(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

pub(super) async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, ClusterError> {
    let name = config.bucket.clone();
    if let Ok(store) = timed(&format!("open bucket {name}"), js.get_key_value(name.clone())).await {
        return Ok(store);
    }
    timed(&format!("create bucket {name}"), js.create_key_value(config)).await
}

/// Creates the cluster's partition logs and buckets, or checks that those already there
/// have the shape `settings` gives (partitions, replicas, wire format); idempotent.
///
/// # Errors
/// NATS unreachable, JetStream refusing (too few servers for the replicas), or an existing
/// cluster of another shape.
pub async fn init(settings: &ClusterSettings) -> Result<ClusterStatus, ClusterError> {
    let (_client, js) = connect(settings).await?;
    let want = shape_of(settings);
    let meta = bucket(
        &js,
        kv::Config {
            bucket: META_BUCKET.into(),
            history: 1,
            num_replicas: usize::from(settings.replicas),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    let encoded = serde_json::to_vec(&want).expect("a shape encodes");
    let created = within("record the cluster's shape", meta.create(SHAPE_KEY, encoded.into())).await?;
    match created {
        Ok(_) => {}
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let have = read_shape(&meta).await?.ok_or(ClusterError::NotInitialized)?;
            check_shape(&have, &want)?;
        }
        Err(e) => return Err(call("record the cluster's shape")(e)),
    }
    for p in 0..settings.partitions {
        let config = partition_stream(settings, p);
        match within(&format!("read stream {}", config.name), js.get_stream(&config.name)).await? {
            Ok(existing) => {
                // get_stream has just read the stream's info: no second request.
                let info = existing.cached_info();
                if info.config.num_replicas != config.num_replicas || info.config.subjects != config.subjects {
                    return Err(ClusterError::Shape(format!(
                        "stream {} exists with {} replicas on {:?}; this cluster needs {} on {:?}",
                        config.name,
                        info.config.num_replicas,
                        info.config.subjects,
                        config.num_replicas,
                        config.subjects
                    )));
                }
            }
            Err(_) => {
                timed(&format!("create stream {}", config.name), js.create_stream(config.clone())).await?;
            }
        }
    }
    bucket(
        &js,
        kv::Config {
            bucket: LEASES_BUCKET.into(),
            history: 1,
            max_age: LEASE_TTL,
            num_replicas: usize::from(settings.replicas),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    nodes_bucket(&js, settings.replicas).await?;
    super::snapshot::bucket(&js, settings.replicas).await?;
    status(settings).await
}

/// The bucket of node reports (made by `init`, or by the first node of an older cluster).
pub(super) async fn nodes_bucket(js: &jetstream::Context, replicas: u8) -> Result<kv::Store, ClusterError> {
    bucket(
        js,
        kv::Config {
            bucket: NODES_BUCKET.into(),
            history: 1,
            max_age: NODE_REPORT_TTL,
            num_replicas: usize::from(replicas),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
}

/// Every node report in `bucket`, by node id, each decoded or why not. Fails when the
/// bucket cannot be read whole: the owner's trim must not mistake a missed report for
/// a node that is gone.
pub(super) async fn read_reports(bucket: &kv::Store) -> Result<Vec<Result<NodeReport, String>>, ClusterError> {
    let mut keys = timed("list the node reports", bucket.keys()).await?;
    let mut names = Vec::new();
    while let Some(key) = within("list the node reports", futures_util::StreamExt::next(&mut keys)).await? {
        names.push(key.map_err(call("list the node reports"))?);
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if let Some(bytes) = timed("read a node report", bucket.get(&name)).await? {
            out.push(serde_json::from_slice::<NodeReport>(&bytes).map_err(|e| format!("the report of {name}: {e}")));
        }
    }
    Ok(out)
}

/// The node reports that can be read now, for `status` (none when the bucket is absent),
/// or why they cannot (read within [`STREAM_TIMEOUT`]).
async fn node_reports(js: &jetstream::Context) -> Result<Vec<NodeReport>, String> {
    let read = async {
        let bucket = match cluster_bucket(js, NODES_BUCKET, STREAM_TIMEOUT).await {
            Ok(bucket) => bucket,
            // A cluster made before node reports: none to show.
            Err(ClusterError::NotInitialized) => return Ok(Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        read_reports(&bucket).await.map(|all| all.into_iter().flatten().collect()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(STREAM_TIMEOUT, read).await.unwrap_or_else(|_| Err(electing()))
}

pub(super) async fn read_shape(meta: &kv::Store) -> Result<Option<Shape>, ClusterError> {
    let Some(bytes) = timed("read the cluster's shape", meta.get(SHAPE_KEY)).await? else { return Ok(None) };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ClusterError::Shape(format!("the cluster's recorded shape does not read: {e}")))
}

pub(super) fn check_shape(have: &Shape, want: &Shape) -> Result<(), ClusterError> {
    if have.format != want.format {
        return Err(ClusterError::Shape(format!(
            "the cluster's logs use wire format {}; this tally writes format {}",
            have.format, want.format
        )));
    }
    if have.partitions != want.partitions || have.replicas != want.replicas {
        return Err(ClusterError::Shape(format!(
            "the cluster was created with {} partitions and {} replicas; this node's [cluster] says {} and {} (partitions are fixed when the cluster is created)",
            have.partitions, have.replicas, want.partitions, want.replicas
        )));
    }
    Ok(())
}

/// The cluster's shape, each partition's log (leader, replicas, last position) and lease.
///
/// # Errors
/// NATS unreachable, or the cluster not initialized.
pub async fn status(settings: &ClusterSettings) -> Result<ClusterStatus, ClusterError> {
    let (client, js) = connect(settings).await?;
    let mut unavailable = Vec::new();
    let mut shape_unread = false;
    let configured = shape_of(settings);
    // Asked together: right after a NATS server's death each may wait out its stream's
    // election (up to JetStream's 5 s request timeout).
    let shape_read = async {
        match cluster_bucket(&js, META_BUCKET, STREAM_TIMEOUT).await {
            Ok(meta) => read_shape(&meta).await,
            Err(e) => Err(e),
        }
    };
    let snapshots_open = async {
        tokio::time::timeout(STREAM_TIMEOUT, js.get_object_store(SNAPSHOTS_BUCKET)).await.ok().and_then(Result::ok)
    };
    // The logs this node's configuration names: a recorded shape that differs is refused.
    let logs = futures_util::future::join_all(
        (0..configured.partitions).map(|p| tokio::time::timeout(STREAM_TIMEOUT, js.get_stream(stream_name(p)))),
    );
    let (recorded, leases, snapshots, nodes, logs) = tokio::join!(
        shape_read,
        cluster_bucket(&js, LEASES_BUCKET, STREAM_TIMEOUT),
        snapshots_open,
        node_reports(&js),
        logs
    );
    let nodes = nodes.unwrap_or_else(|why| {
        unavailable.push(format!("the node reports ({why})"));
        Vec::new()
    });
    let shape = match recorded {
        Ok(Some(shape)) => {
            check_shape(&shape, &configured)?;
            shape
        }
        Ok(None) | Err(ClusterError::NotInitialized) => return Err(ClusterError::NotInitialized),
        Err(e @ ClusterError::Shape(_)) => return Err(e),
        Err(e) => {
            unavailable.push(format!("the cluster's recorded shape ({e}): shown as this node's configuration says"));
            shape_unread = true;
            configured
        }
    };
    let leases = match leases {
        Ok(leases) => Some(leases),
        Err(ClusterError::NotInitialized) => return Err(ClusterError::NotInitialized),
        Err(e) => {
            unavailable.push(format!("the leases ({e}): owners unknown"));
            None
        }
    };
    // Every partition's lease and snapshot at once, as the logs.
    let n = shape.partitions;
    let owners = futures_util::future::join_all(leases.iter().flat_map(|bucket| {
        (0..n).map(move |p| async move {
            match tokio::time::timeout(STREAM_TIMEOUT, bucket.get(lease_key(p))).await {
                Ok(Ok(owner)) => Ok(owner.map(|v| String::from_utf8_lossy(&v).into_owned())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(electing()),
            }
        })
    }));
    let latest = futures_util::future::join_all(snapshots.iter().flat_map(|bucket| {
        (0..n).map(move |p| async move {
            tokio::time::timeout(STREAM_TIMEOUT, super::snapshot::latest(bucket, p))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        })
    }));
    let (owners, latest) = tokio::join!(owners, latest);
    if let Some(why) = owners.iter().find_map(|o| o.as_ref().err()) {
        let unread = owners.iter().filter(|o| o.is_err()).count();
        unavailable.push(format!("the leases of {unread} partitions ({why}): their owners unknown"));
    }
    let mut partitions = Vec::with_capacity(usize::from(n));
    for (p, log) in (0..n).zip(logs) {
        let name = stream_name(p);
        // One partition's log may be electing a leader (a NATS server just died): it is
        // shown as unavailable, with the reason, and the others are still read.
        let mut row = PartitionStatus {
            partition: p,
            stream: name.clone(),
            leader: None,
            replicas: Vec::new(),
            first_seq: 0,
            last_seq: 0,
            messages: 0,
            snapshot: latest.get(usize::from(p)).copied().flatten().map(super::entry_of),
            owner: None,
            unavailable: None,
            lease_unavailable: None,
        };
        match owners.get(usize::from(p)) {
            Some(Ok(owner)) => row.owner.clone_from(owner),
            Some(Err(why)) => row.lease_unavailable = Some(why.clone()),
            None => row.lease_unavailable = Some("the leases could not be read".into()),
        }
        match log {
            Ok(Ok(stream)) => {
                let info = stream.cached_info().clone();
                row.leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                row.replicas = info.cluster.map(copies).unwrap_or_default();
                row.first_seq = info.state.first_sequence;
                row.last_seq = info.state.last_sequence;
                row.messages = info.state.messages;
            }
            // A log that does not exist: `init` never ran (or did not finish).
            Ok(Err(e)) if no_such_stream(&e) => return Err(ClusterError::NotInitialized),
            Ok(Err(e)) => row.unavailable = Some(e.to_string()),
            Err(_) => row.unavailable = Some(electing()),
        }
        partitions.push(row);
    }
    if shape_unread && partitions.iter().all(|p| p.unavailable.is_some()) {
        return Err(ClusterError::Call {
            what: "read the cluster".into(),
            reason: "JetStream answered nothing (its servers may be electing leaders); retry in a few seconds".into(),
        });
    }
    let connected_to = client.server_info().server_name;
    Ok(ClusterStatus { shape, connected_to, partitions, nodes, unavailable })
}

/// Every copy of a stream: JetStream lists the leader apart from its followers.
fn copies(cluster: jetstream::stream::ClusterInfo) -> Vec<ReplicaStatus> {
    let leader = cluster.leader.map(|server| ReplicaStatus { server, current: true, lag: 0 });
    let followers = cluster.replicas.into_iter().map(|r| ReplicaStatus {
        server: r.name,
        current: r.current,
        lag: r.lag.unwrap_or(0),
    });
    leader.into_iter().chain(followers).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_of_another_shape_is_named_in_the_refusal() {
        let want = Shape { partitions: 16, replicas: 3, format: FORMAT_VERSION };
        assert!(check_shape(&want, &want).is_ok());
        let other = Shape { partitions: 8, ..want.clone() };
        let e = check_shape(&other, &want).unwrap_err().to_string();
        assert!(e.contains("created with 8 partitions") && e.contains("says 16"), "{e}");
        let newer = Shape { format: FORMAT_VERSION + 1, ..want.clone() };
        assert!(check_shape(&newer, &want).unwrap_err().to_string().contains("wire format"));
    }
}
