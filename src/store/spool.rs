//! Cluster mode's click spool: clicks a node took, kept in a small RocksDB of its own until
//! they are in their partition's log. A click is answered (the redirect) once it is in the
//! spool's WAL, as a single node answers once the click is written; the forwarder sends the
//! spool's entries in order and deletes each once JetStream acknowledged it.
//!
//! Keys are a local sequence number (u64 BE), values the encoded entry; the next number
//! continues after the last key at open.
//!
//! Reading from the front of a queue kept in an LSM tree steps over the tombstones of the
//! entries deleted since the last compaction: reading the oldest entries from the first
//! key took a fifth of a cluster node's CPU under the load bench's clicks (BENCHMARKS.md).
//! So the spool remembers where its oldest live entry was ([`Spool::oldest`]) and reads
//! from there.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::StoreError;

/// A node-local queue of encoded entries, in the order they were pushed.
#[derive(Clone)]
pub struct Spool {
    db: Arc<rocksdb::DB>,
    /// The next key, taken and written under its lock: entries become readable in key
    /// order, so no entry below a readable one is still to come.
    next: Arc<Mutex<u64>>,
    /// No entry below this key is left: the oldest live entry last read.
    head: Arc<AtomicU64>,
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
        Ok(Spool { db: Arc::new(db), next: Arc::new(Mutex::new(next)), head: Arc::new(AtomicU64::new(0)) })
    }

    /// Appends an entry; it is in the WAL (not fsynced) when this returns.
    ///
    /// # Errors
    /// A failed write.
    pub fn push(&self, value: &[u8]) -> Result<(), StoreError> {
        let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.db.put(next.to_be_bytes(), value)?;
        *next += 1;
        Ok(())
    }

    /// The oldest entries, at most `limit`, with their keys.
    ///
    /// # Errors
    /// A failed read.
    pub fn oldest(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let from = self.head.load(Ordering::SeqCst).to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)).take(limit) {
            let (k, v) = item?;
            out.push((key_seq(&k)?, v.to_vec()));
        }
        // Every entry below the first one read was deleted (entries become readable in key
        // order): the next read starts there.
        if let Some((first, _)) = out.first() {
            self.head.fetch_max(*first, Ordering::SeqCst);
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

    #[test]
    fn the_oldest_entries_are_read_after_those_forgotten_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for i in 0..10u32 {
            spool.push(format!("e{i}").as_bytes()).unwrap();
        }
        let values =
            |got: Vec<(u64, Vec<u8>)>| got.into_iter().map(|(_, v)| String::from_utf8(v).unwrap()).collect::<Vec<_>>();
        let first = spool.oldest(4).unwrap();
        // Forgotten out of order (one partition's entry before another's), one left.
        for (k, _) in [&first[2], &first[0], &first[3]] {
            spool.remove(*k).unwrap();
        }
        assert_eq!(values(spool.oldest(3).unwrap()), ["e1", "e4", "e5"]);
        spool.remove(first[1].0).unwrap();
        assert_eq!(values(spool.oldest(2).unwrap()), ["e4", "e5"]);
        // Everything forgotten, then more pushed: read from where they start.
        for (k, _) in spool.oldest(100).unwrap() {
            spool.remove(k).unwrap();
        }
        assert!(spool.oldest(10).unwrap().is_empty());
        spool.push(b"later").unwrap();
        assert_eq!(values(spool.oldest(10).unwrap()), ["later"]);
    }
}
