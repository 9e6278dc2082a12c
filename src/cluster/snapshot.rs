//! Partition snapshots: a partition store as of one log position, kept in JetStream's
//! object store, so that a new node (or one whose entries were trimmed from the log)
//! restores it and replays only the log after it, and the logs need not be kept whole.
//!
//! - **Taking one** (the partition's owner, every `cluster.snapshot_every` applied
//!   entries): the store's writer makes a RocksDB checkpoint between two batches and says
//!   which log position it holds; the checkpoint is packed as one tar archive and put in
//!   the bucket [`SNAPSHOTS_BUCKET`] as `p0003`, replicated like the logs, its position in
//!   the object's metadata. A newer snapshot replaces the older one whole: a reader sees
//!   one or the other, never a mix.
//! - **Trimming**: after a snapshot at position S, the owner purges the partition's log
//!   below the smallest of S and the positions every live node reported (`tally_nodes`),
//!   so no running node loses an entry it has still to apply.
//! - **Restoring** (a node starting): when the log no longer holds the entries after the
//!   node's own position, or the node holds nothing yet, the snapshot is downloaded (its
//!   digest checked by the object store), unpacked beside the partition's directory and
//!   moved into place; the store opened on it must hold the snapshot's position.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, object_store};
use tokio::io::AsyncWriteExt;

use super::nats::{timed, ClusterError};
use super::{lease_key, FORMAT_VERSION, SNAPSHOTS_BUCKET};
use crate::store::Store;

/// Object metadata: the log position the snapshot holds.
const POSITION: &str = "position";

/// Chunks of 512 KiB: under NATS's default 1 MiB message limit.
const CHUNK: usize = 512 << 10;

/// The snapshots bucket (made by `init`, or by the first node of an older cluster).
pub(super) async fn bucket(js: &jetstream::Context, replicas: u8) -> Result<object_store::ObjectStore, ClusterError> {
    if let Ok(store) = timed("open bucket tally_snapshots", js.get_object_store(SNAPSHOTS_BUCKET)).await {
        return Ok(store);
    }
    let config = object_store::Config {
        bucket: SNAPSHOTS_BUCKET.into(),
        description: Some("tally partition snapshots (one per partition, the newest)".into()),
        num_replicas: usize::from(replicas),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    timed("create bucket tally_snapshots", js.create_object_store(config)).await
}

/// The log position of partition `p`'s snapshot, if it has one.
pub(super) async fn latest(bucket: &object_store::ObjectStore, p: u16) -> Result<Option<u64>, String> {
    match bucket.info(lease_key(p)).await {
        Ok(info) if info.deleted => Ok(None),
        Ok(info) => position_of(&info.metadata).map(Some),
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("read the snapshot of partition {p}: {e}")),
    }
}

fn position_of(metadata: &HashMap<String, String>) -> Result<u64, String> {
    metadata
        .get(POSITION)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "a snapshot without a readable position".to_string())
}

/// A finished snapshot.
pub(super) struct Taken {
    pub position: u64,
    pub bytes: u64,
}

/// Snapshots partition `p`'s store into the bucket, using `work` for the checkpoint and
/// the archive (both removed afterwards).
pub(super) async fn take(
    store: &Store,
    bucket: &object_store::ObjectStore,
    p: u16,
    work: &Path,
    node: &str,
) -> Result<Taken, String> {
    let checkpoint = work.join(format!("p{p:04}.checkpoint"));
    let archive = work.join(format!("p{p:04}.tar"));
    clear(&[&checkpoint, &archive]).await?;
    tokio::fs::create_dir_all(work).await.map_err(|e| format!("create {}: {e}", work.display()))?;
    let position = store.checkpoint_applied(checkpoint.clone()).await.map_err(|e| format!("checkpoint: {e}"))?;
    let (from, to) = (checkpoint.clone(), archive.clone());
    let bytes =
        tokio::task::spawn_blocking(move || pack(&from, &to)).await.map_err(|e| format!("pack task: {e}"))??;
    clear(&[&checkpoint]).await?;
    let mut file = tokio::fs::File::open(&archive).await.map_err(|e| format!("open {}: {e}", archive.display()))?;
    let meta = object_store::ObjectMetadata {
        name: lease_key(p),
        description: Some(format!("partition {p} at log position {position}")),
        chunk_size: Some(CHUNK),
        metadata: HashMap::from([
            (POSITION.to_string(), position.to_string()),
            ("format".to_string(), FORMAT_VERSION.to_string()),
            ("node".to_string(), node.to_string()),
            ("tally".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]),
        headers: None,
    };
    let put = bucket.put(meta, &mut file).await;
    clear(&[&archive]).await?;
    put.map_err(|e| format!("store the snapshot of partition {p}: {e}"))?;
    Ok(Taken { position, bytes })
}

/// Restores partition `p`'s snapshot into `dir` (replaced whole), using `work` for the
/// download; the position it holds, or `None` when the partition has no snapshot.
pub(super) async fn restore(
    bucket: &object_store::ObjectStore,
    p: u16,
    dir: &Path,
    work: &Path,
) -> Result<Option<u64>, String> {
    let mut object = match bucket.get(lease_key(p)).await {
        Ok(object) => object,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("read the snapshot of partition {p}: {e}")),
    };
    let position = position_of(&object.info().metadata)?;
    tokio::fs::create_dir_all(work).await.map_err(|e| format!("create {}: {e}", work.display()))?;
    let archive = work.join(format!("p{p:04}.restore.tar"));
    let mut file = tokio::fs::File::create(&archive).await.map_err(|e| format!("create {}: {e}", archive.display()))?;
    // The object store checks the object's digest as the last chunk is read.
    tokio::io::copy(&mut object, &mut file)
        .await
        .map_err(|e| format!("download the snapshot of partition {p}: {e}"))?;
    file.flush().await.map_err(|e| format!("write {}: {e}", archive.display()))?;
    drop(file);
    let (from, to) = (archive.clone(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || unpack_into(&from, &to)).await.map_err(|e| format!("unpack task: {e}"))??;
    clear(&[&archive]).await?;
    Ok(Some(position))
}

/// Removes files or directories, absent ones included.
async fn clear(paths: &[&PathBuf]) -> Result<(), String> {
    for path in paths {
        let removed = match tokio::fs::metadata(path).await {
            Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(path).await,
            Ok(_) => tokio::fs::remove_file(path).await,
            Err(_) => Ok(()),
        };
        removed.map_err(|e| format!("remove {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Packs the (flat) checkpoint directory into one tar archive; its size.
fn pack(checkpoint: &Path, archive: &Path) -> Result<u64, String> {
    let file = std::fs::File::create(archive).map_err(|e| format!("create {}: {e}", archive.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let entries = std::fs::read_dir(checkpoint).map_err(|e| format!("read {}: {e}", checkpoint.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", checkpoint.display()))?;
        tar.append_path_with_name(entry.path(), entry.file_name())
            .map_err(|e| format!("pack {}: {e}", entry.path().display()))?;
    }
    let mut out = tar.into_inner().map_err(|e| format!("pack {}: {e}", archive.display()))?;
    std::io::Write::flush(&mut out).map_err(|e| format!("write {}: {e}", archive.display()))?;
    std::fs::metadata(archive).map(|m| m.len()).map_err(|e| format!("read {}: {e}", archive.display()))
}

/// Unpacks an archive beside `dir` and moves it into place, synced; what was in `dir`
/// is removed only once the unpacked copy is whole.
fn unpack_into(archive: &Path, dir: &Path) -> Result<(), String> {
    let staging = dir.with_extension("restoring");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| format!("create {}: {e}", staging.display()))?;
    let file = std::fs::File::open(archive).map_err(|e| format!("open {}: {e}", archive.display()))?;
    // `unpack` refuses entries that would land outside `staging` (`..`, absolute paths).
    tar::Archive::new(std::io::BufReader::new(file))
        .unpack(&staging)
        .map_err(|e| format!("unpack {}: {e}", archive.display()))?;
    for entry in std::fs::read_dir(&staging).map_err(|e| format!("read {}: {e}", staging.display()))? {
        let path = entry.map_err(|e| format!("read {}: {e}", staging.display()))?.path();
        crate::backup::sync(&path).map_err(|e| e.to_string())?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| format!("move {} into place: {e}", staging.display()))?;
    if let Some(parent) = dir.parent() {
        crate::backup::sync(parent).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_unpacks_into_place_replacing_what_was_there() {
        let root = tempfile::tempdir().unwrap();
        let from = root.path().join("checkpoint");
        std::fs::create_dir_all(&from).unwrap();
        std::fs::write(from.join("000012.sst"), b"table bytes").unwrap();
        std::fs::write(from.join("CURRENT"), b"MANIFEST-000005\n").unwrap();
        let archive = root.path().join("p0001.tar");
        let bytes = pack(&from, &archive).unwrap();
        assert!(bytes >= 3 * 512, "{bytes}");

        let dir = root.path().join("partitions").join("p0001");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stale.log"), b"old").unwrap();
        unpack_into(&archive, &dir).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["000012.sst", "CURRENT"]);
        assert_eq!(std::fs::read(dir.join("000012.sst")).unwrap(), b"table bytes");
        assert!(!dir.with_extension("restoring").exists());
    }

    #[test]
    fn a_snapshot_names_its_position() {
        let meta = HashMap::from([(POSITION.to_string(), "4242".to_string())]);
        assert_eq!(position_of(&meta), Ok(4242));
        assert!(position_of(&HashMap::new()).is_err());
    }
}
