//! Cluster mode's click spool: clicks a node took, kept in a small RocksDB of its own until
//! they are in their partition's log. A click is answered (the redirect) once it is in the
//! spool's WAL, as a single node answers once the click is written; the forwarder sends the
//! spool's entries in order and deletes each once JetStream acknowledged it.
//!
//! Keys are a local sequence number (u64 BE), values the encoded entry; the next number
//! continues after the last key at open.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::StoreError;

/// A node-local queue of encoded entries, in the order they were pushed.
#[derive(Clone)]
pub struct Spool {
    db: Arc<rocksdb::DB>,
    next: Arc<AtomicU64>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`.
    ///
    /// # Errors
    /// When RocksDB cannot open the directory.
    pub fn open(dir: &Path) -> Result<Spool, StoreError> {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.set_max_background_jobs(1);
        o.set_write_buffer_size(4 << 20);
        let db = rocksdb::DB::open(&o, dir)?;
        let next = match db.iterator(rocksdb::IteratorMode::End).next() {
            Some(item) => key_seq(&item?.0)? + 1,
            None => 1,
        };
        Ok(Spool { db: Arc::new(db), next: Arc::new(AtomicU64::new(next)) })
    }

    /// Appends an entry; it is in the WAL (not fsynced) when this returns.
    ///
    /// # Errors
    /// A failed write.
    pub fn push(&self, value: &[u8]) -> Result<(), StoreError> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        Ok(self.db.put(seq.to_be_bytes(), value)?)
    }

    /// The oldest entries, at most `limit`, with their keys.
    ///
    /// # Errors
    /// A failed read.
    pub fn oldest(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::Start).take(limit) {
            let (k, v) = item?;
            out.push((key_seq(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    /// Forgets an entry that reached its log.
    ///
    /// # Errors
    /// A failed write.
    pub fn remove(&self, seq: u64) -> Result<(), StoreError> {
        Ok(self.db.delete(seq.to_be_bytes())?)
    }

    /// Fsyncs the WAL (shutdown).
    pub fn sync(&self) {
        let _ = self.db.flush_wal(true);
    }
}

fn key_seq(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key).map(u64::from_be_bytes).map_err(|_| StoreError::Corrupt("click spool key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for i in 0..300u32 {
            spool.push(format!("e{i}").as_bytes()).unwrap();
        }
        let first = spool.oldest(2).unwrap();
        assert_eq!(first.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), vec![b"e0".to_vec(), b"e1".to_vec()]);
        spool.remove(first[0].0).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        spool.push(b"last").unwrap();
        let all = spool.oldest(1000).unwrap();
        assert_eq!(all.len(), 300);
        assert_eq!(all[0].1, b"e1");
        assert_eq!(all.last().unwrap().1, b"last");
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
