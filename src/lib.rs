//! tally: a server-to-server conversion tracking gateway.
//!
//! # Layout
//!
//! Read in this order; dependencies point down the list only.
//!
//! - [`domain`]: validated types (ids, money, clicks, conversions, links, plans). No I/O.
//! - [`signing`]: Standard Webhooks verify/sign, secrets with rotation, the replay guard.
//! - [`attribution`]: SPEC 8's rules as a pure function over [`attribution::Facts`].
//! - [`commission`]: plans to money, pure.
//! - [`store`]: the only module that names RocksDB: schema, keys, codecs, the batching
//!   writer (group commit, exact dedupe) and the in-memory catalog of entities.
//! - [`http`]: the only module that names hyper: accept loop, routing, handlers,
//!   errors as problem+json.
//! - [`outbound`]: partner postbacks; today where they may be sent (SSRF vetting).
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
