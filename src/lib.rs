//! tally: a server-to-server conversion tracking gateway.
//!
//! # Layout
//!
//! Read in this order; dependencies point down the list only. How a request flows
//! through them, and where each rule lives: `docs/architecture.md`.
//!
//! - [`domain`]: validated types (ids, money, clicks, conversions, links, plans). No I/O.
//! - [`signing`]: Standard Webhooks verify/sign, secrets with rotation, the replay guard.
//! - [`attribution`]: SPEC 8's rules as a pure function over [`attribution::Facts`].
//! - [`commission`]: plans to money, pure.
//! - [`engine`]: the state machine, `command + state view -> effects + answer`, where
//!   every money and identity decision is taken. Deterministic (time and entropy come in
//!   the command); no I/O, no HTTP status. [`engine::memory`] is an in-memory backend.
//! - [`backend`]: the [`backend::Backend`] trait (submit a command, a few queries) that
//!   `http` talks to; the store (single node) and `cluster::Node` implement it.
//! - [`store`]: the only module that names RocksDB, and it decides nothing: schema, keys,
//!   codecs, the batching writer (group commit), the engine's state view over the
//!   database, effects to write batches, the published catalog.
//! - [`cluster`]: the only module that names NATS: cluster mode (SPEC 14). Commands go
//!   to per-merchant partition logs on JetStream, appended by each partition's owner
//!   (other nodes forward their batches to it and get the engine's answers back); each
//!   partition's owner and standby apply its log through the engine into a store per
//!   partition, other nodes when they must (`docs/cluster.md`).
//! - [`http`]: the only module that names hyper: accept loop, routing, handlers,
//!   statuses and errors as problem+json.
//! - [`outbound`]: partner postbacks: where they may be sent (SSRF vetting), the client,
//!   and the delivery worker, which sends due deliveries and submits what each attempt
//!   got to the engine (whose `outbox` rules decide retries, order and parking).
//! - [`limits`]: rate limits (governor), bounded.
//! - [`metrics`], [`telemetry`], [`config`], [`seed`], [`backup`]: operations and configuration.
//! - [`app`]: wiring; [`cli`]: subcommands. `main.rs` only calls [`cli::run`].
#![forbid(unsafe_code)]

#[cfg(feature = "server")]
pub mod app;
pub mod attribution;
#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "server")]
pub mod backup;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod cluster;
pub mod commission;
#[cfg(feature = "server")]
pub mod config;
pub mod domain;
pub mod engine;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod outbound;
#[cfg(feature = "server")]
pub mod seed;
pub mod signing;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod telemetry;
