//! Cluster mode on NATS JetStream (SPEC 14, `docs/cluster.md`): the only module that names
//! `async_nats`.
//!
//! Merchants are split into a fixed number of partitions, `partition_of(merchant)`; each
//! partition's commands go to a JetStream stream of its own (`TALLY_P0000`, ...), replicated
//! `replicas` times, so everything one merchant's money rules read and write lives in one
//! ordered log. Leases on partitions live in the KV bucket `tally_leases`; the cluster's
//! fixed shape (partitions, wire format) in `tally_meta`; each partition's newest snapshot
//! in the object store `tally_snapshots` ([`snapshot`]).
//!
//! [`init`] creates the logs and checks that an existing cluster has the shape this node's
//! configuration says (`tally cluster init`), [`status`] reads them (`tally cluster
//! status`), and [`Node`] is the backend `tally serve` runs on in cluster mode.

mod nats;
mod node;
mod snapshot;

use sha2::{Digest, Sha256};

pub use nats::{init, status, ClusterError, ClusterStatus, NodeReport, PartitionStatus};
pub use node::Node;

/// The wire format of the partition logs; a node refuses a cluster made with another one.
/// Format 2: an entry carries several commands (`{"commands": [...]}`). Format 3: an
/// entry carrying configuration is on the subject `tally.p.<p>.cfg` (nodes that do not own
/// a partition watch those alone), and a partition's owner answers forwarded batches with
/// the engine's answers.
pub const FORMAT_VERSION: u32 = 3;

/// The KV bucket holding each partition's lease (`p0003` → the owning node).
pub const LEASES_BUCKET: &str = "tally_leases";

/// The KV bucket where each running node reports its applied positions and leases every
/// second (`gw-1` → JSON), for `tally cluster status`; a report expires after 30 s.
pub const NODES_BUCKET: &str = "tally_nodes";

/// How long a node's report lives without a newer one.
pub const NODE_REPORT_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The object store bucket holding each partition's newest snapshot (`p0003`).
pub const SNAPSHOTS_BUCKET: &str = "tally_snapshots";

/// The KV bucket holding the cluster's fixed shape (`partitions`, `format`).
pub const META_BUCKET: &str = "tally_meta";

/// How long a lease lives without renewal: a dead owner's partitions are free after this.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long JetStream remembers a message id, so a retried append is stored once.
pub const DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

/// The partition of a merchant: the first 8 bytes of SHA-256 of its id, big-endian, modulo
/// `partitions`. Stable across processes, versions and machines (never `DefaultHasher`).
pub fn partition_of(merchant: &str, partitions: u16) -> u16 {
    let digest = Sha256::digest(merchant.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(head) % u64::from(partitions.max(1))) as u16
}

/// A command's position in its partition's log is `seq << INDEX_BITS | index`: the
/// entry's sequence and the command's index in it (an entry holds at most
/// `1 << INDEX_BITS` commands).
pub(crate) const INDEX_BITS: u32 = 10;

/// The position of command `index` of entry `seq`.
pub(crate) fn position(seq: u64, index: usize) -> u64 {
    (seq << INDEX_BITS) | index as u64
}

/// The entry a position is in.
pub(crate) fn entry_of(position: u64) -> u64 {
    position >> INDEX_BITS
}

/// The JetStream stream of partition `p`.
pub fn stream_name(p: u16) -> String {
    format!("TALLY_P{p:04}")
}

/// The subjects of partition `p`'s stream: `tally.p.<p>.cmd` (commands) and
/// `tally.p.<p>.click` (clicks forwarded from the node that took them).
pub fn subjects(p: u16) -> String {
    format!("tally.p.{p}.>")
}

/// The lease key of partition `p`.
pub fn lease_key(p: u16) -> String {
    format!("p{p:04}")
}

/// The key of partition `p`'s standby lease in [`LEASES_BUCKET`] (`followers = "standby"`).
pub fn standby_key(p: u16) -> String {
    format!("s{p:04}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_fixed_by_the_merchant_id_alone() {
        // Computed apart from this code (Python's hashlib: the first 8 bytes of SHA-256,
        // big-endian, mod P). A change here moves merchants between the partitions of a
        // running cluster, which must never happen silently.
        let cases = [("demo", 16, 4), ("bench", 16, 8), ("acme", 16, 0), ("demo", 1, 0), ("demo", 1024, 132)];
        for (merchant, partitions, want) in cases {
            assert_eq!(partition_of(merchant, partitions), want, "{merchant} of {partitions}");
        }
    }

    #[test]
    fn partitions_spread_merchants_evenly() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("merchant-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (850..=1150).contains(c)), "{counts:?}");
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(stream_name(3), "TALLY_P0003");
        assert_eq!(subjects(3), "tally.p.3.>");
        assert_eq!(lease_key(1023), "p1023");
    }
}
