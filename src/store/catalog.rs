//! The published catalog: loaded at open and replaced whole, under a lock held only to
//! swap an `Arc`, after each committed entity write; readers never touch disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::engine::Catalog;

/// The shared, swappable catalog, and how many times it was replaced.
#[derive(Debug, Default)]
pub struct CatalogCell(RwLock<Arc<Catalog>>, AtomicU64);

impl CatalogCell {
    pub fn new(catalog: Catalog) -> Self {
        CatalogCell(RwLock::new(Arc::new(catalog)), AtomicU64::new(0))
    }

    /// The catalog if it was replaced since `version` (with its new version); `None`: a
    /// snapshot taken at `version` is current. One atomic load, for a reader that keeps
    /// its snapshot (the writer thread, for every command).
    pub fn newer_than(&self, version: u64) -> Option<(u64, Arc<Catalog>)> {
        (self.1.load(Ordering::Acquire) != version).then(|| self.versioned())
    }

    /// The catalog and its version, read together.
    pub fn versioned(&self) -> (u64, Arc<Catalog>) {
        let guard = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.1.load(Ordering::Acquire), Arc::clone(&guard))
    }

    pub fn snapshot(&self) -> Arc<Catalog> {
        self.versioned().1
    }

    pub fn replace(&self, catalog: Catalog) {
        let mut guard = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = Arc::new(catalog);
        // Under the lock: a reader that sees this version reads this catalog.
        self.1.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::CatalogCell;
    use crate::engine::Catalog;

    /// A kept snapshot is current until the catalog is replaced; then the reload brings
    /// the new catalog and its version.
    #[test]
    fn a_kept_snapshot_is_reloaded_only_after_a_replacement() {
        let cell = CatalogCell::new(Catalog::default());
        let (version, kept) = cell.versioned();
        assert!(cell.newer_than(version).is_none(), "nothing replaced");
        cell.replace(Catalog::default());
        let (newer, reloaded) = cell.newer_than(version).expect("replaced");
        assert_ne!(newer, version);
        assert!(!std::sync::Arc::ptr_eq(&kept, &reloaded), "the new catalog");
        assert!(cell.newer_than(newer).is_none(), "current again");
    }
}
