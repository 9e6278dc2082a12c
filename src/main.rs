//! The `tally` binary: parse the command line and run a subcommand. Nothing else.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = tally::cli::Cli::parse();
    let code = tally::cli::run(cli).await;
    std::process::exit(code);
}
