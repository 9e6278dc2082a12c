//! Wiring: open the store, seed the config's entities, bind both listeners, serve until
//! told to stop, then drain connections and close the store cleanly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::config::Loaded;
use crate::domain::clock::Clock;
use crate::http::{self, Ctx, Listener};
use crate::metrics::Metrics;
use crate::signing::ReplayGuard;
use crate::store::{Store, StoreOptions};

/// A running gateway.
pub struct App {
    public_addr: SocketAddr,
    admin_addr: SocketAddr,
    /// The single node's store; `None` in cluster mode.
    store: Option<Store>,
    /// The cluster node; `None` for the single node.
    node: Option<crate::cluster::Node>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    sweepers: Vec<JoinHandle<()>>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open storage in {dir}: {source}. Is another tally running on this data directory?")]
    Store { dir: String, source: crate::store::StoreError },
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind { what: &'static str, addr: String, source: std::io::Error },
    #[error("{0}")]
    Seed(String),
    #[error("cluster mode: {0}")]
    Cluster(String),
    #[error("cannot write {path}: {source}")]
    File { path: String, source: std::io::Error },
}

impl App {
    /// Builds and starts the gateway; it serves until [`App::shutdown`].
    ///
    /// # Errors
    /// Storage that will not open, an address that will not bind, a seed that is refused.
    pub async fn start(loaded: Loaded, clock: Arc<dyn Clock>) -> Result<App, StartError> {
        let settings = loaded.settings;
        private_data_dir(&settings.data_dir)
            .map_err(|source| StartError::File { path: settings.data_dir.display().to_string(), source })?;
        let metrics = Arc::new(Metrics::new());
        metrics.ratelimit_keys_max.set(i64::try_from(settings.limits.max_keys).unwrap_or(i64::MAX));
        let opts = store_options(&settings);
        let (store, node, backend): (Option<Store>, Option<crate::cluster::Node>, Arc<dyn Backend>) =
            if settings.cluster.enabled() {
                let node = crate::cluster::Node::start(&settings.cluster, &opts, Arc::clone(&metrics))
                    .await
                    .map_err(StartError::Cluster)?;
                (None, Some(node.clone()), Arc::new(node))
            } else {
                let store_metrics = Arc::clone(&metrics);
                let store = tokio::task::spawn_blocking(move || Store::open(&opts, store_metrics))
                    .await
                    .map_err(|e| StartError::Seed(format!("storage open task failed: {e}")))?
                    .map_err(|source| StartError::Store { dir: settings.data_dir.display().to_string(), source })?;
                (Some(store.clone()), None, Arc::new(store))
            };

        let seeds = crate::seed::parse(&settings).map_err(|p| StartError::Seed(format!("{p:?}")))?;
        crate::seed::apply(&*backend, seeds, &settings.data_dir, clock.now_ms(), settings.outbound.allow_private)
            .await
            .map_err(StartError::Seed)?;
        let admin_token = match loaded.admin_token {
            Some(t) => t,
            None => generated_admin_token(&settings.data_dir)?,
        };

        let backlog = settings.http.listen_backlog;
        let bind = |what: &'static str, addr: String| async move {
            listen(&addr, backlog).await.map_err(|source| StartError::Bind { what, addr, source })
        };
        let public = bind("public", settings.public_addr.clone()).await?;
        let admin = bind("admin", settings.admin_addr.clone()).await?;
        let local = |l: &TcpListener, what: &'static str| {
            l.local_addr().map_err(|source| StartError::Bind { what, addr: String::new(), source })
        };
        let (public_addr, admin_addr) = (local(&public, "public")?, local(&admin, "admin")?);
        if let Some(path) = &settings.addr_file {
            let text =
                serde_json::json!({"public": public_addr.to_string(), "admin": admin_addr.to_string()}).to_string();
            std::fs::write(path, text)
                .map_err(|source| StartError::File { path: path.display().to_string(), source })?;
        }
        tracing::info!(public = %public_addr, admin = %admin_addr, data_dir = %settings.data_dir.display(), "tally is listening");

        let sweeper = tokio::spawn(sweep_holds(
            Arc::clone(&backend),
            Arc::clone(&clock),
            Duration::from_millis(settings.holds.sweep_interval_ms),
        ));
        let replay = ReplayGuard::new(settings.signing.replay_window_seconds * 1000, settings.signing.replay_capacity);
        let limits = crate::limits::Limits::new(&settings.limits, governor::clock::DefaultClock::default());
        let sweep_every = Duration::from_millis(settings.limits.sweep_interval_ms);
        let settings_exports = settings.reports.max_exports;
        let ctx = Arc::new(Ctx {
            backend,
            metrics,
            clock,
            settings,
            admin_token,
            replay: Mutex::new(replay),
            limits,
            exports: Arc::new(tokio::sync::Semaphore::new(settings_exports)),
        });
        let limiter_sweeper = tokio::spawn(sweep_limiters(Arc::clone(&ctx), sweep_every));
        let (shutdown, rx) = watch::channel(false);
        let outbound = &ctx.settings.outbound;
        let client = crate::outbound::client::Client::new(
            crate::outbound::client::default_roots(),
            Arc::new(crate::outbound::ssrf::SystemResolver),
            outbound.allow_private,
            Duration::from_secs(outbound.connect_timeout_seconds),
            Duration::from_secs(outbound.attempt_timeout_seconds),
        )
        .map_err(|e| StartError::Seed(format!("the outbound HTTP client cannot be built: {e}")))?;
        let worker = crate::outbound::worker::Worker {
            backend: Arc::clone(&ctx.backend),
            client,
            clock: Arc::clone(&ctx.clock),
            metrics: Arc::clone(&ctx.metrics),
            settings: outbound.clone(),
        };
        let deliveries = tokio::spawn(worker.run(rx.clone()));
        let servers = vec![
            tokio::spawn(http::serve(public, Arc::clone(&ctx), Listener::Public, rx.clone())),
            tokio::spawn(http::serve(admin, ctx, Listener::Admin, rx)),
        ];
        Ok(App {
            public_addr,
            admin_addr,
            store,
            node,
            shutdown,
            servers,
            sweepers: vec![sweeper, limiter_sweeper, deliveries],
        })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The single node's store; `None` in cluster mode.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the shutdown grace),
    /// then stops the writer and syncs the WAL.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for s in &self.sweepers {
            s.abort();
        }
        for s in self.servers {
            let _ = s.await;
        }
        let (store, node) = (self.store.clone(), self.node.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(store) = store {
                store.shutdown();
            }
            if let Some(node) = node {
                node.shutdown();
            }
        })
        .await;
        tracing::info!("tally stopped cleanly");
    }

    /// Serves until SIGTERM or SIGINT, then shuts down.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        self.shutdown().await;
    }
}

/// Binds `addr` (the first address it resolves to) with an accept queue of `backlog`
/// connections. `TcpListener::bind` uses 128: a burst of new connections beyond that is
/// dropped by the kernel and costs those clients a one-second SYN retransmit.
async fn listen(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let resolved = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolves to nothing"))?;
    let socket = if resolved.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(resolved)?;
    socket.listen(backlog)
}

/// Approves conversions whose hold ended, every `interval`, with the app's clock.
async fn sweep_holds(backend: Arc<dyn Backend>, clock: Arc<dyn Clock>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match crate::backend::BackendExt::sweep_holds(&*backend, clock.now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(approved = n, "hold periods ended; conversions approved"),
            Err(e) => tracing::warn!(error = %e, "hold sweep failed; retrying at the next interval"),
        }
    }
}

/// Drops idle rate-limiter keys every `interval`, on a blocking thread (the sweep walks
/// whole tables), and publishes `tally_ratelimit_keys`.
async fn sweep_limiters(ctx: Arc<Ctx>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = Arc::clone(&ctx);
        if let Ok(keys) = tokio::task::spawn_blocking(move || c.limits.sweep()).await {
            ctx.metrics.ratelimit_keys.set(i64::try_from(keys.total).unwrap_or(i64::MAX));
            ctx.metrics.ratelimit_fullest.set(i64::try_from(keys.fullest).unwrap_or(i64::MAX));
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How the store is opened, from the `[storage]` and `[clicks]` settings.
pub fn store_options(settings: &crate::config::Settings) -> StoreOptions {
    let s = &settings.storage;
    StoreOptions {
        data_dir: settings.data_dir.clone(),
        durability: s.durability,
        wal_sync_interval: Duration::from_millis(s.wal_sync_interval_ms),
        queue_capacity: s.writer_queue,
        max_batch: s.max_batch,
        block_cache_bytes: s.block_cache_mb << 20,
        write_buffer_bytes: s.write_buffer_mb << 20,
        recent_conversions: s.recent_conversions,
        memtable_budget_bytes: s.memtable_budget_mb << 20,
        rollups: settings.reports.rollups,
        shared: None,
    }
}

/// Files tally creates from now on are readable by its user only (umask `077`).
pub fn private_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// SPEC 15: the data directory and its files are readable by tally's user only (the WAL
/// holds secrets). Sets the process umask to `077`, so every file RocksDB creates is
/// `0600`, creates the directory `0700`, and tightens what an earlier version left
/// readable by others.
fn private_data_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    private_files();
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fn tighten(path: &Path, depth: u32) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        let mode = meta.permissions().mode();
        if meta.is_dir() {
            if mode & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
            }
            if depth < 4 {
                for entry in std::fs::read_dir(path)? {
                    tighten(&entry?.path(), depth + 1)?;
                }
            }
        } else if meta.is_file() && mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
        Ok(())
    }
    tighten(dir, 0)
}

/// Without `TALLY_ADMIN_TOKEN`, tally makes a token once and keeps it in
/// `{data_dir}/admin-token` (mode 0600), so a demo works and nothing is open.
fn generated_admin_token(data_dir: &Path) -> Result<SecretString, StartError> {
    let path = data_dir.join("admin-token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let t = text.trim().to_string();
        if t.len() >= 16 {
            return Ok(SecretString::from(t));
        }
    }
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    crate::seed::write_private(&path, &token)
        .map_err(|source| StartError::File { path: path.display().to_string(), source })?;
    tracing::info!(path = %path.display(), "no TALLY_ADMIN_TOKEN set; generated an admin token in this file");
    Ok(SecretString::from(token))
}
