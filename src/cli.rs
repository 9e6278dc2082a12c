//! The command line: `serve`, `check-config`, `sign`.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::App;
use crate::config::{self, Settings};
use crate::domain::clock::{Clock, SystemClock};
use crate::signing::{self, WebhookSecret};

/// tally: a server-to-server conversion tracking gateway.
///
/// Records clicks behind affiliate links, takes conversions signed with Standard
/// Webhooks, dedupes them exactly, attributes them to partners and computes commissions.
/// Configuration: config/tally.toml, overridden by TALLY_* environment variables
/// (TALLY_DATA_DIR, TALLY_PUBLIC_ADDR, TALLY_ADMIN_ADDR, TALLY_ADMIN_TOKEN, TALLY_ADDR_FILE,
/// TALLY_HTTP__MAX_CONNECTIONS, ...). See README.md for every key.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Serve {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check the configuration (file and environment), list every problem, exit non-zero if any.
    CheckConfig {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Sign a request body read from stdin; prints the three Standard Webhooks headers.
    #[command(after_help = SIGN_EXAMPLE)]
    Sign {
        /// The secret (whsec_...). Prefer --secret-file: arguments are visible to other users.
        #[arg(long, env = "TALLY_SIGN_SECRET", hide_env_values = true, conflicts_with = "secret_file")]
        secret: Option<String>,
        /// A file holding the secret.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// The webhook-id: 1..128 of [A-Za-z0-9_-], unique per message.
        #[arg(long)]
        id: String,
        /// Unix seconds [default: now]
        #[arg(long)]
        timestamp: Option<i64>,
    },
    /// Take an online, consistent backup of the store into DIR (absent or empty).
    ///
    /// With tally running on this configuration, it asks it (POST /admin/v1/backups on
    /// the admin listener, with the admin token) and moves the backup to DIR; with tally
    /// stopped, it opens the store itself.
    #[command(
        after_help = "Example:\n  tally backup --config /etc/tally/tally.toml --to /var/backups/tally/$(date -u +%Y%m%dT%H%M%SZ)"
    )]
    Backup {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where to write the backup: a new or empty directory.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Restore a backup into the configured data directory, which must be absent or empty
    /// (tally stopped). Checks that the restored store opens.
    #[command(
        after_help = "Example:\n  TALLY_DATA_DIR=/var/lib/tally/data tally restore --from /var/backups/tally/20261128T101500Z"
    )]
    Restore {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A directory made by `tally backup` or `POST /admin/v1/backups`.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
    },
    /// Sign a GET postback URL: adds `ts` (unless present) and `sig`, prints the URL.
    #[command(after_help = SIGN_URL_EXAMPLE)]
    SignUrl {
        /// The secret (whsec_...). Prefer --secret-file.
        #[arg(long, env = "TALLY_SIGN_SECRET", hide_env_values = true, conflicts_with = "secret_file")]
        secret: Option<String>,
        /// A file holding the secret.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Unix seconds for `ts` when the URL has none [default: now]
        #[arg(long)]
        timestamp: Option<i64>,
        /// The unsigned URL (any `sig` in it is replaced).
        url: String,
    },
    /// Report rollups: recompute them from the stored events, or check them (tally stopped).
    Rollups {
        #[command(subcommand)]
        action: RollupsAction,
    },
    /// Cluster mode on NATS JetStream ([cluster] in the configuration; docs/cluster.md).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

/// `tally cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Create the partition logs and buckets on the NATS servers of [cluster], or check
    /// that an existing cluster has the configured partitions, replicas and wire format.
    /// Safe to run again; exit 1 on a mismatch.
    #[command(
        after_help = "Example:\n  scripts/cluster start   # 3 NATS servers on loopback; prints a config\n  tally cluster init --config /tmp/tally-cluster/gw-1.toml"
    )]
    Init {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show the cluster: each partition's log (its JetStream leader, replicas, last
    /// position) and the node holding its lease.
    Status {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `tally rollups ...`.
#[derive(Debug, Subcommand)]
pub enum RollupsAction {
    /// Recompute the report rollups and the ledger's entry-order index from the stored
    /// clicks, conversions and ledger entries. Stop tally first (the store is opened here).
    #[command(after_help = "Example:\n  systemctl stop tally && tally rollups rebuild --config /etc/tally/tally.toml")]
    Rebuild {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Compare the stored rollups with what the stored events give; exit 1 and list the
    /// cells that differ (at most --limit). Stop tally first.
    Check {
        /// Config file [default: config/tally.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Most differing cells listed.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// `tally sign --help`'s example, runnable as printed against `./scripts/demo`
/// (CI runs it: scripts/check-readme).
pub const SIGN_EXAMPLE: &str = "Example (the demo's merchant; paste all three lines):
  BODY='{\"txn_id\":\"order-'$RANDOM'\",\"amount\":\"49.90\",\"currency\":\"USD\"}'
  printf %s \"$BODY\" | tally sign --secret-file data/secrets/demo.whsec --id msg_$RANDOM > /tmp/tally-headers
  curl -s -H @/tmp/tally-headers -H 'content-type: application/json' --data-binary \"$BODY\" http://127.0.0.1:8080/v1/merchants/demo/conversions";

/// `tally sign-url --help`'s example, runnable as printed against `./scripts/demo`.
pub const SIGN_URL_EXAMPLE: &str = "Example (the demo's merchant):
  URL=$(tally sign-url --secret-file data/secrets/demo.whsec \"http://127.0.0.1:8080/pb/demo?txn_id=pb-$RANDOM&amount=49.90&currency=USD\")
  curl -s \"$URL\"";

/// Runs a subcommand; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Serve { config } => serve(config).await,
        Command::CheckConfig { config } => check_config(config).await,
        Command::Backup { config, to } => backup(config, to).await,
        Command::Restore { config, from } => restore(config, from).await,
        Command::Sign { secret, secret_file, id, timestamp } => sign(secret, secret_file, &id, timestamp),
        Command::SignUrl { secret, secret_file, timestamp, url } => sign_url(secret, secret_file, timestamp, &url),
        Command::Rollups { action } => rollups(action).await,
        Command::Cluster { action } => cluster(action).await,
    }
}

/// `tally cluster init|status`.
async fn cluster(action: ClusterAction) -> i32 {
    let (path, json) = match &action {
        ClusterAction::Init { config } => (config.clone(), false),
        ClusterAction::Status { config, json } => (config.clone(), *json),
    };
    let loaded = match load_quietly(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let settings = &loaded.settings.cluster;
    let result = match action {
        ClusterAction::Init { .. } => crate::cluster::init(settings).await,
        ClusterAction::Status { .. } => crate::cluster::status(settings).await,
    };
    let status = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tally cluster: {e}");
            return 1;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status).expect("a status encodes"));
        return 0;
    }
    let s = &status.shape;
    println!(
        "cluster: {} partitions, {} replicas, wire format {}; connected to {}",
        s.partitions, s.replicas, s.format, status.connected_to
    );
    for what in &status.unavailable {
        println!("not readable now: {what}");
    }
    println!(
        "{:<10} {:<12} {:<10} {:>10} {:>10} {:>10} {:<12} replicas (lag)",
        "partition", "stream", "leader", "first seq", "last seq", "snapshot", "owner"
    );
    for p in &status.partitions {
        if let Some(why) = &p.unavailable {
            println!("{:<10} {:<12} unavailable: {why}", p.partition, p.stream);
            continue;
        }
        let replicas: Vec<String> = p
            .replicas
            .iter()
            .map(|r| format!("{}{} ({})", r.server, if r.current { "" } else { " behind" }, r.lag))
            .collect();
        println!(
            "{:<10} {:<12} {:<10} {:>10} {:>10} {:>10} {:<12} {}",
            p.partition,
            p.stream,
            p.leader.as_deref().unwrap_or("none"),
            p.first_seq,
            p.last_seq,
            p.snapshot.map_or_else(|| "none".to_string(), |s| s.to_string()),
            match (&p.owner, &p.lease_unavailable) {
                (Some(owner), _) => owner.as_str(),
                (None, Some(_)) => "?",
                (None, None) => "none",
            },
            replicas.join(", ")
        );
    }
    let now = SystemClock.now_ms();
    println!("{:<12} {:>6} {:>9} {:<24} applied position by partition", "node", "lag", "reported", "owns");
    for n in &status.nodes {
        let owns: Vec<String> = n.owned.iter().map(u16::to_string).collect();
        let applied: Vec<String> = n.applied.iter().map(u64::to_string).collect();
        println!(
            "{:<12} {:>6} {:>8}s {:<24} {}",
            n.node,
            n.lag,
            (now - n.at_ms) / 1000,
            owns.join(","),
            applied.join(" ")
        );
    }
    if status.nodes.is_empty() {
        println!("no tally node has reported in the last 30 s");
    }
    0
}

/// `tally rollups rebuild|check`: opens the store (so tally must be stopped: RocksDB's
/// lock refuses a second opener) and runs the rebuild or the check on a blocking thread.
async fn rollups(action: RollupsAction) -> i32 {
    let (path, check) = match &action {
        RollupsAction::Rebuild { config } => (config.clone(), None),
        RollupsAction::Check { config, limit } => (config.clone(), Some(*limit)),
    };
    let loaded = match load_quietly(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    crate::app::private_files();
    let opts = crate::app::store_options(&loaded.settings);
    let data_dir = loaded.settings.data_dir.clone();
    let started = std::time::Instant::now();
    let done = tokio::task::spawn_blocking(move || {
        let store = crate::store::Store::open(&opts, Arc::new(crate::metrics::Metrics::new()))?;
        let result = match check {
            None => store
                .rebuild_rollups(&mut |n| {
                    eprint!(
                        "\rrebuilding: {} clicks, {} conversions, {} ledger entries read",
                        n.clicks, n.conversions, n.ledger_entries
                    )
                })
                .map(|n| (n, Vec::new())),
            Some(limit) => store.check_rollups(limit),
        };
        store.shutdown();
        result
    })
    .await;
    let (n, mismatches) = match done {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            eprintln!("\ntally rollups: {e} (is tally running on {}? stop it first)", data_dir.display());
            return 1;
        }
        Err(e) => {
            eprintln!("\ntally rollups: {e}");
            return 1;
        }
    };
    let read = format!("{} clicks, {} conversions, {} ledger entries", n.clicks, n.conversions, n.ledger_entries);
    let secs = started.elapsed().as_secs_f64();
    match check {
        None => {
            eprintln!();
            println!("rebuilt the report rollups and the ledger order from {read} in {secs:.1} s");
            0
        }
        Some(_) if mismatches.is_empty() => {
            println!("the report rollups match the stored events ({read}; {secs:.1} s)");
            0
        }
        Some(_) => {
            println!("the report rollups differ from the stored events in these cells (run `tally rollups rebuild`):");
            for m in &mismatches {
                println!("  {}: stored {}, events give {}", m.key, m.stored, m.expected);
            }
            1
        }
    }
}

fn print_problems(problems: &[config::Problem]) {
    eprintln!("tally: the configuration has {} problem(s):", problems.len());
    for p in problems {
        eprintln!("  - {p}");
    }
}

async fn serve(path: Option<PathBuf>) -> i32 {
    let loaded = match config::load(path.as_deref()) {
        Ok(l) => l,
        Err(problems) => {
            crate::telemetry::init(config::LogFormat::Auto, "info");
            print_problems(&problems);
            return 2;
        }
    };
    crate::telemetry::init(loaded.settings.log.format, &loaded.settings.log.level);
    warn_ignored_env(&loaded.ignored_env);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %loaded.config_file.as_ref().map_or_else(|| "none (built-in defaults)".to_string(), |p| p.display().to_string()),
        data_dir = %loaded.settings.data_dir.display(),
        durability = loaded.settings.storage.durability.as_str(),
        cluster = %if loaded.settings.cluster.enabled() { loaded.settings.cluster.node_id.as_str() } else { "off (single node)" },
        "tally is starting"
    );
    raise_open_files_limit(loaded.settings.http.max_connections);
    let example = loaded.settings.print_example.then(|| loaded.settings.clone());
    let app = match App::start(loaded, Arc::new(SystemClock)).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "tally could not start");
            eprintln!("tally: {e}");
            return 1;
        }
    };
    if let Some(settings) = example {
        println!("{}", example_text(&settings, app.public_addr()));
    }
    app.run_until_signal().await;
    0
}

/// SPEC 15: `TALLY_*` variables that name no key are ignored, and said so once.
fn warn_ignored_env(names: &[String]) {
    if !names.is_empty() {
        tracing::warn!(
            variables = %names.join(", "),
            "ignoring TALLY_* environment variables that name no configuration key (container platforms inject some, e.g. TALLY_PORT for a Service named tally); `tally check-config` lists the keys"
        );
    }
}

/// Raises the soft limit on open files to the hard limit: both listeners may hold
/// `max_connections` sockets each, next to RocksDB's files. Warns when that is not enough.
fn raise_open_files_limit(max_connections: usize) {
    let wanted = 2 * max_connections as u64 + 1024;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => tracing::warn!(
            open_files = got,
            wanted,
            "the open-files limit is below what http.max_connections needs; raise it (ulimit -n, LimitNOFILE=) or lower http.max_connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-files limit"),
    }
}

async fn check_config(path: Option<PathBuf>) -> i32 {
    let loaded = config::load(path.as_deref()).and_then(|loaded| Ok((crate::seed::parse(&loaded.settings)?, loaded)));
    let loaded = match loaded {
        Ok((seeds, loaded)) => match crate::seed::vet_outbound(&seeds, loaded.settings.outbound.allow_private).await {
            Ok(()) => Ok(loaded),
            Err(problem) => Err(vec![problem]),
        },
        Err(problems) => Err(problems),
    };
    match loaded {
        Ok(loaded) => {
            for name in &loaded.ignored_env {
                eprintln!("tally: warning: ignoring {name}: it names no configuration key");
            }
            let s = &loaded.settings;
            println!(
                "configuration ok: public {}, admin {}, data_dir {}, {} merchant(s), {} partner(s), {} link(s), {} plan(s); admin token {}",
                s.public_addr,
                s.admin_addr,
                s.data_dir.display(),
                s.merchants.len(),
                s.partners.len(),
                s.links.len(),
                s.plans.len(),
                if loaded.admin_token.is_some() { "set" } else { "not set (one is generated in data_dir/admin-token)" }
            );
            0
        }
        Err(problems) => {
            print_problems(&problems);
            2
        }
    }
}

/// The configuration for an operator command, or the exit code after printing why not.
fn load_quietly(path: Option<PathBuf>) -> Result<config::Loaded, i32> {
    config::load(path.as_deref()).map_err(|problems| {
        print_problems(&problems);
        2
    })
}

/// Where a running tally's admin listener answers on this machine.
fn admin_target(settings: &Settings) -> Option<std::net::SocketAddr> {
    let mut addr: std::net::SocketAddr = settings.admin_addr.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    (addr.port() != 0).then_some(addr)
}

async fn backup(path: Option<PathBuf>, to: PathBuf) -> i32 {
    let loaded = match load_quietly(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    crate::app::private_files();
    let settings = &loaded.settings;
    match crate::backup::empty_or_absent(&to) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("tally backup: {}", crate::backup::BackupError::TargetNotEmpty(to.display().to_string()));
            return 2;
        }
        Err(e) => {
            eprintln!("tally backup: {e}");
            return 2;
        }
    }
    let token =
        loaded.admin_token.as_ref().map(|t| secrecy::ExposeSecret::expose_secret(t).to_string()).or_else(|| {
            std::fs::read_to_string(settings.data_dir.join("admin-token")).ok().map(|t| t.trim().to_string())
        });
    let online = match (admin_target(settings), token) {
        (Some(addr), Some(token)) => {
            let asked = crate::http::client::admin_request(
                addr,
                &token,
                http::Method::POST,
                "/admin/v1/backups",
                std::time::Duration::from_secs(3600),
            )
            .await;
            match asked {
                Err(crate::http::client::ClientError::NotListening(_)) => None,
                Err(e) => {
                    eprintln!("tally backup: the running tally did not answer: {e}");
                    return 1;
                }
                Ok((201, body)) => Some(body),
                Ok((status, body)) => {
                    eprintln!("tally backup: the running tally answered {status}: {}", String::from_utf8_lossy(&body));
                    return 1;
                }
            }
        }
        _ => None,
    };
    let result = match online {
        Some(body) => move_online_backup(&body, &to),
        None => offline_backup(settings, &to).await,
    };
    match result {
        Ok(how) => {
            println!("backup written to {} ({how})", to.display());
            0
        }
        Err(e) => {
            eprintln!("tally backup: {e}");
            1
        }
    }
}

/// Moves the backup a running tally took into `backup.dir` to `to`.
fn move_online_backup(answer: &[u8], to: &std::path::Path) -> Result<String, String> {
    let info: serde_json::Value = serde_json::from_slice(answer).map_err(|e| format!("unexpected answer: {e}"))?;
    let from = PathBuf::from(info["path"].as_str().ok_or("the answer names no path")?);
    crate::backup::relocate(&from, to).map_err(|e| e.to_string())?;
    Ok(format!("taken online by the running tally at {}", info["created_at"].as_str().unwrap_or("?")))
}

/// No tally is running on this configuration: open the store and back it up directly.
async fn offline_backup(settings: &Settings, to: &std::path::Path) -> Result<String, String> {
    let opts = crate::app::store_options(settings);
    let (data_dir, to) = (settings.data_dir.clone(), to.to_path_buf());
    if !data_dir.exists() {
        return Err(format!("no data directory at {} and no tally answering on admin_addr", data_dir.display()));
    }
    tokio::task::spawn_blocking(move || {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let store = crate::store::Store::open(&opts, metrics).map_err(|e| {
            format!(
                "cannot open the store in {} ({e}); if tally is running, set TALLY_ADMIN_ADDR to its admin listener",
                data_dir.display()
            )
        })?;
        let taken = crate::backup::take(&store, &data_dir, &to, SystemClock.now_ms());
        store.shutdown();
        taken.map(|info| format!("tally was not running; {} bytes", info.bytes)).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn restore(path: Option<PathBuf>, from: PathBuf) -> i32 {
    let loaded = match load_quietly(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    crate::app::private_files();
    let settings = loaded.settings;
    let manifest = match crate::backup::restore(&from, &settings.data_dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("tally restore: {e}");
            return 2;
        }
    };
    let opts = crate::app::store_options(&settings);
    let opened = tokio::task::spawn_blocking(move || {
        let store = crate::store::Store::open(&opts, Arc::new(crate::metrics::Metrics::new()))?;
        let merchants = crate::backend::Backend::catalog(&store).merchants.len();
        store.shutdown();
        Ok::<_, crate::store::StoreError>(merchants)
    })
    .await;
    match opened {
        Ok(Ok(merchants)) => {
            println!(
                "restored the backup of {} (tally {}) into {}; the store opens ({merchants} merchant(s)). Start tally on it.",
                manifest.created_at,
                manifest.tally_version,
                settings.data_dir.display()
            );
            0
        }
        Ok(Err(e)) => {
            eprintln!("tally restore: the files were copied but the store does not open: {e}");
            1
        }
        Err(e) => {
            eprintln!("tally restore: {e}");
            1
        }
    }
}

/// The secret from `--secret`/`TALLY_SIGN_SECRET` or `--secret-file`, or a message.
fn read_secret(secret: Option<String>, secret_file: Option<PathBuf>) -> Result<WebhookSecret, String> {
    let text = match (secret, secret_file) {
        (Some(s), _) => s,
        (None, Some(path)) => {
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
        }
        (None, None) => return Err("give --secret-file FILE (or --secret / TALLY_SIGN_SECRET)".into()),
    };
    WebhookSecret::parse(&text)
}

fn sign_url(secret: Option<String>, secret_file: Option<PathBuf>, timestamp: Option<i64>, raw: &str) -> i32 {
    let secret = match read_secret(secret, secret_file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tally sign-url: {e}");
            return 2;
        }
    };
    let (base, query) = raw.split_once('?').unwrap_or((raw, ""));
    let path_start = base.find("://").map_or(0, |i| base[i + 3..].find('/').map_or(base.len(), |p| i + 3 + p));
    let path = if path_start >= base.len() { "/" } else { &base[path_start..] };
    let kept: Vec<&str> = query.split('&').filter(|p| !p.is_empty() && !p.starts_with("sig=")).collect();
    let mut query_text = kept.join("&");
    let mut parsed = match signing::postback::Query::parse(&query_text) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("tally sign-url: {e}");
            return 2;
        }
    };
    if parsed.get("ts").is_none() {
        let ts = timestamp.unwrap_or_else(|| SystemClock.now_ms() / 1000);
        parsed.0.push(("ts".into(), ts.to_string()));
        query_text = if query_text.is_empty() { format!("ts={ts}") } else { format!("{query_text}&ts={ts}") };
    }
    let sig = signing::postback::sign(secret.key(), path, &parsed);
    println!("{base}?{query_text}&sig={sig}");
    0
}

fn sign(secret: Option<String>, secret_file: Option<PathBuf>, id: &str, timestamp: Option<i64>) -> i32 {
    let secret = match read_secret(secret, secret_file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tally sign: {e}");
            return 2;
        }
    };
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        eprintln!("tally sign: --id must be 1..128 of [A-Za-z0-9_-]");
        return 2;
    }
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("tally sign: cannot read the body from stdin: {e}");
        return 2;
    }
    let ts = timestamp.unwrap_or_else(|| SystemClock.now_ms() / 1000);
    println!("webhook-id: {id}");
    println!("webhook-timestamp: {ts}");
    println!("webhook-signature: {}", signing::sign(secret.key(), id, ts, &body));
    0
}

/// A copy-paste walk-through for the first seeded link: a click, then a signed
/// conversion carrying its click id. Shows the path of the secret, never the secret.
fn example_text(settings: &Settings, public: std::net::SocketAddr) -> String {
    let Some(seeds) = crate::seed::parse(settings).ok() else { return String::new() };
    let Some(link) = seeds.links.first() else { return String::new() };
    let secret_path = seeds
        .merchants
        .iter()
        .find(|m| m.merchant.id == link.merchant_id)
        .and_then(|m| m.secret_file.clone())
        .unwrap_or_else(|| crate::seed::default_secret_path(&settings.data_dir, &link.merchant_id));
    let param = link.destination.split(['?', '&']).find_map(|kv| kv.strip_suffix("={click_id}")).unwrap_or("click_id");
    let host = if public.ip().is_unspecified() { format!("127.0.0.1:{}", public.port()) } else { public.to_string() };
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "tally".into());
    format!(
        r#"
tally is running (public http://{host}). Try it from another terminal:

  # 1. A visitor clicks the demo link: tally records the click and redirects with a click id.
  curl -si 'http://{host}/c/{link}?sub1=newsletter' | grep -i '^location'

  # 2. The merchant's backend reports a sale with that click id, signed with its secret.
  CLICK=$(curl -s -o /dev/null -w '%{{redirect_url}}' 'http://{host}/c/{link}' | sed 's/.*[?&]{param}=\([^&]*\).*/\1/')
  BODY='{{"txn_id":"order-'$RANDOM'","amount":"49.90","currency":"USD","click_id":"'$CLICK'"}}'
  printf %s "$BODY" | {exe} sign --secret-file {secret} --id msg_$RANDOM > /tmp/tally-headers
  curl -s -H @/tmp/tally-headers -H 'content-type: application/json' --data-binary "$BODY" http://{host}/v1/merchants/{merchant}/conversions

  #    Seconds after its click, the sale is flagged for review as possible click injection
  #    ("review" in the answer; docs/fraud.md): priced as usual, approved by an admin.

  # 3. Send the same request again: 200, "duplicate": true, header Idempotent-Replayed: true.
"#,
        link = link.id,
        merchant = link.merchant_id,
        secret = secret_path.display(),
    )
}
