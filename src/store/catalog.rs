//! The published catalog: loaded at open and replaced whole, under a lock held only to
//! swap an `Arc`, after each committed entity write; readers never touch disk.

use std::sync::{Arc, RwLock};

use crate::engine::Catalog;

/// The shared, swappable catalog.
#[derive(Debug, Default)]
pub struct CatalogCell(RwLock<Arc<Catalog>>);

impl CatalogCell {
    pub fn new(catalog: Catalog) -> Self {
        CatalogCell(RwLock::new(Arc::new(catalog)))
    }

    pub fn snapshot(&self) -> Arc<Catalog> {
        match self.0.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn replace(&self, catalog: Catalog) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(catalog),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(catalog),
        }
    }
}
