//! Backups and restores (SPEC 15): an online, consistent copy of the store taken while
//! tally serves (a RocksDB checkpoint, see [`crate::store::Store::checkpoint`]), and its restore into
//! an empty data directory with tally stopped.
//!
//! A backup is a directory: `db/` (the checkpoint), `files/` (the generated admin token
//! and the seeded merchants' secret files, when present) and `tally-backup.json` (what
//! it is and when it was taken). Named backups (`POST /admin/v1/backups`) go into
//! `backup.dir` as `tally-<UTC time>`, and only the newest `backup.keep` are kept.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, StoreError};
use crate::domain::clock::{format_rfc3339, UnixMillis};

/// The manifest's file name, inside a backup.
pub const MANIFEST: &str = "tally-backup.json";
/// The prefix of named backups in `backup.dir`; retention only ever deletes these.
pub const NAME_PREFIX: &str = "tally-";
const FORMAT: u32 = 1;
/// Files of the data directory that are not RocksDB's, copied beside the checkpoint.
const EXTRA_FILES: [&str; 2] = ["admin-token", "secrets"];

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists and is not empty: back up into a new directory")]
    TargetNotEmpty(String),
    #[error("{0} is not a tally backup (no {MANIFEST}); give the directory `tally backup` made")]
    NotABackup(String),
    #[error("the data directory {0} is not empty: restore into a new or empty directory, with tally stopped")]
    DataDirNotEmpty(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
    move |e| BackupError::Io(format!("{what} {}: {e}", path.display()))
}

/// What a backup holds, written last: a directory without it is an incomplete backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tally_version: String,
    pub created_at: String,
    pub bytes: u64,
}

/// A finished backup.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub created_at: String,
    pub bytes: u64,
}

/// Whether `dir` is absent or an empty directory: where a backup or a restore may go.
///
/// # Errors
/// `Io` when it cannot be read.
pub fn empty_or_absent(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io("read", dir)(e)),
    }
}

/// Syncs a file or a directory to disk.
pub(crate) fn sync(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io("sync", path))
}

/// Moves a backup to `to` (absent or empty): a rename, or across file systems a copy
/// (synced) and then the removal of the original.
///
/// # Errors
/// `Io` when it can be neither renamed nor copied and removed.
pub fn relocate(from: &Path, to: &Path) -> Result<(), BackupError> {
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    let _ = std::fs::remove_dir(to);
    if std::fs::rename(from, to).is_err() {
        copy_tree(from, to)?;
        std::fs::remove_dir_all(from).map_err(io("remove", from))?;
    }
    Ok(())
}

/// Copies a file or a directory tree (regular files and directories only).
fn copy_tree(from: &Path, to: &Path) -> Result<u64, BackupError> {
    let meta = std::fs::symlink_metadata(from).map_err(io("read", from))?;
    if meta.is_dir() {
        std::fs::create_dir_all(to).map_err(io("create", to))?;
        let mut bytes = 0;
        for entry in std::fs::read_dir(from).map_err(io("read", from))? {
            let entry = entry.map_err(io("read", from))?;
            bytes += copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(bytes)
    } else if meta.is_file() {
        let bytes = std::fs::copy(from, to).map_err(io("copy to", to))?;
        sync(to)?;
        Ok(bytes)
    } else {
        Ok(0)
    }
}

fn tree_bytes(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            std::fs::read_dir(path).map(|d| d.flatten().map(|e| tree_bytes(&e.path())).sum()).unwrap_or(0)
        }
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// Takes a backup of the running `store` into `to`, which must be absent or empty.
/// Blocks (the checkpoint flushes and links files): call it off the reactor.
///
/// # Errors
/// A `to` that is not empty, storage and file-system errors. A failed backup leaves
/// no manifest, so it is never taken for a complete one.
pub fn take(store: &dyn Backend, data_dir: &Path, to: &Path, now: UnixMillis) -> Result<BackupInfo, BackupError> {
    if !empty_or_absent(to)? {
        return Err(BackupError::TargetNotEmpty(to.display().to_string()));
    }
    std::fs::create_dir_all(to).map_err(io("create", to))?;
    store.backup_to(&to.join("db"))?;
    for name in EXTRA_FILES {
        let from = data_dir.join(name);
        if from.exists() {
            copy_tree(&from, &to.join("files").join(name))?;
        }
    }
    let created_at = format_rfc3339(now);
    let bytes = tree_bytes(to);
    let manifest = Manifest {
        format: FORMAT,
        tally_version: env!("CARGO_PKG_VERSION").into(),
        created_at: created_at.clone(),
        bytes,
    };
    let path = to.join(MANIFEST);
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Io(e.to_string()))?;
    std::fs::write(&path, text).map_err(io("write", &path))?;
    sync(&path)?;
    sync(to)?;
    Ok(BackupInfo { path: to.to_path_buf(), created_at, bytes })
}

/// One backup at a time: two at the same millisecond would pick the same name.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes a named backup into `backup_dir` (`tally-20261128T101500.123Z`), then deletes
/// the oldest named backups beyond `keep`.
///
/// # Errors
/// As [`take`].
pub fn take_named(
    store: &dyn Backend,
    data_dir: &Path,
    backup_dir: &Path,
    keep: usize,
    now: UnixMillis,
) -> Result<BackupInfo, BackupError> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // The answer names an absolute path: tally's working directory is not the caller's.
    let absolute = std::path::absolute(backup_dir).map_err(io("resolve", backup_dir))?;
    let backup_dir = absolute.as_path();
    let stamp: String = format_rfc3339(now).chars().filter(|c| !matches!(c, '-' | ':')).collect();
    let info = take(store, data_dir, &backup_dir.join(format!("{NAME_PREFIX}{stamp}")), now)?;
    let mut named: Vec<PathBuf> = std::fs::read_dir(backup_dir)
        .map_err(io("read", backup_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(NAME_PREFIX))
                && p.join(MANIFEST).exists()
        })
        .collect();
    // The names sort by time.
    named.sort();
    let excess = named.len().saturating_sub(keep.max(1));
    for old in &named[..excess] {
        if let Err(e) = std::fs::remove_dir_all(old) {
            tracing::warn!(path = %old.display(), error = %e, "could not delete an old backup");
        }
    }
    Ok(info)
}

/// Reads a backup's manifest.
///
/// # Errors
/// `NotABackup` when `from` has no readable manifest.
pub fn manifest(from: &Path) -> Result<Manifest, BackupError> {
    let not = || BackupError::NotABackup(from.display().to_string());
    let text = std::fs::read(from.join(MANIFEST)).map_err(|_| not())?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|_| not())?;
    if m.format != FORMAT || !from.join("db").is_dir() {
        return Err(not());
    }
    Ok(m)
}

/// Restores the backup in `from` into `data_dir`, which must be absent or empty (tally
/// stopped). The files are synced before this returns.
///
/// # Errors
/// `NotABackup`, `DataDirNotEmpty`, file-system errors.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Manifest, BackupError> {
    let m = manifest(from)?;
    if !empty_or_absent(data_dir)? {
        return Err(BackupError::DataDirNotEmpty(data_dir.display().to_string()));
    }
    copy_tree(&from.join("db"), data_dir)?;
    for name in EXTRA_FILES {
        let saved = from.join("files").join(name);
        if saved.exists() {
            copy_tree(&saved, &data_dir.join(name))?;
        }
    }
    sync(data_dir)?;
    Ok(m)
}
