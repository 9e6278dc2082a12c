//! Validated domain types: ids, money, time and the entities of SPEC 2.
//!
//! Nothing here does I/O or knows about HTTP or RocksDB. Raw input is turned
//! into these types at the boundary (`http/`), and everything inside works on them.

pub mod account;
pub mod balance;
pub mod binary;
pub mod click;
pub mod clock;
pub mod conversion;
pub mod entities;
pub mod fraud;
pub mod ids;
pub mod json;
pub mod ledger;
pub mod link;
pub mod money;
pub mod outbound;
pub mod payout;
pub mod plan;
pub mod retry;
pub mod rollup;

use std::fmt;

/// A hash map with a fast, per-process randomly seeded hasher (foldhash), for the maps
/// every request touches: the catalog, the writer's staged keys, the engine's overlay,
/// the replay guard. SipHash, std's default, was 2.5 % of a conversion's CPU (issue 13).
/// Their keys are configuration, ids from signed requests, ids tally mints, or digests
/// (the replay guard's, visitors'): no unauthenticated client chooses what they hash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A value that failed validation, naming the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct FieldError {
    /// Dotted path of the offending field, e.g. `rules[1].percent`.
    pub field: String,
    /// What is wrong and what is expected, in words a client developer can act on.
    pub detail: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, detail: impl fmt::Display) -> Self {
        FieldError { field: field.into(), detail: detail.to_string() }
    }

    /// Prefixes the field path, for errors raised inside nested values.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}
