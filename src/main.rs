//! The `tally` binary: parse the command line and run a subcommand. Nothing else.

use clap::Parser;

/// jemalloc for the whole process, RocksDB's C++ included: glibc's allocator kept memory
/// freed by flushed memtables and large batches, about 100 MiB of RSS after a bulk load
/// (BENCHMARKS.md, issue 18).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let cli = tally::cli::Cli::parse();
    let code = tally::cli::run(cli).await;
    std::process::exit(code);
}
