//! Integration tests: the real gateway on port 0 with a temporary RocksDB, spoken to
//! over HTTP and signed like a real merchant client.

#![allow(clippy::disallowed_methods)] // reading the server's responses, not untrusted input

mod abuse;
mod admin;
mod backup;
mod cli;
mod clicks;
mod cluster;
mod conversions;
mod crash;
mod engine;
mod faults;
mod fraud;
mod helpers;
mod hostile;
mod ledger_props;
mod limits;
mod model;
mod observability;
mod openapi;
mod operations;
mod outbound;
mod outbound_client;
mod payouts;
mod postbacks;
mod reports;
mod signatures;
