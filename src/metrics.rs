//! Every metric tally exports (SPEC 12), on one explicit registry. Label values come
//! from closed sets (`&'static str` from enums), never from ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::domain::ledger::LedgerKind;
use crate::signing::SignatureFailure;

/// `outcome` values of `tally_clicks_total`.
pub const CLICK_OUTCOMES: [&str; 4] = ["recorded", "bot", "not_found", "rate_limited"];
/// `outcome` values of `tally_conversions_total`.
/// What an outbound attempt led to.
pub const OUTBOUND_OUTCOMES: [&str; 4] = ["delivered", "failed", "dead", "parked"];

pub const CONVERSION_OUTCOMES: [&str; 7] =
    ["created", "duplicate", "conflict", "invalid", "unauthorized", "rate_limited", "error"];

/// Figures read from the storage engine at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct StorageStats {
    pub sst_bytes: u64,
    pub memtable_bytes: u64,
    /// What the shared block cache holds (data, index and filter blocks, pinned ones too).
    pub block_cache_bytes: u64,
    /// Memory of the open SST files' readers outside the block cache.
    pub table_readers_bytes: u64,
    pub estimated_keys: u64,
    pub write_stopped: bool,
    pub delayed_write_rate: u64,
    pub pending_compaction_bytes: u64,
    /// Write stalls RocksDB counted since it opened: (delays, stops), summed over column families.
    pub stalls: (u64, u64),
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub clicks: IntCounterVec,
    pub conversions: IntCounterVec,
    pub signature_failures: IntCounterVec,
    pub attributions: IntCounterVec,
    /// Fraud signals raised by new conversions, by signal.
    pub fraud_flags: IntCounterVec,
    pub ledger_entries: IntCounterVec,
    pub write_batch_size: Histogram,
    pub fsync_duration: Histogram,
    pub storage_errors: IntCounter,
    pub storage_ready: IntGauge,
    pub replay_evictions: IntCounter,
    pub ratelimit_keys: IntGauge,
    pub connections_open: IntGauge,
    pub connections_silent: IntCounter,
    /// Handlers that panicked; each was answered `500`.
    pub handler_panics: IntCounter,
    pub ratelimit_keys_max: IntGauge,
    pub ratelimit_fullest: IntGauge,
    pub outbound_deliveries: IntCounterVec,
    pub outbound_pending: IntGauge,
    pub outbound_parked: IntGauge,
    pub outbound_oldest_age: IntGauge,
    pub outbound_attempt_duration: Histogram,
    /// Ledger entries sent by exports.
    pub exported_entries: IntCounter,
    /// Cluster mode (SPEC 14): partitions whose lease this node holds.
    pub cluster_partitions_owned: IntGauge,
    /// Cluster mode: log entries this node has not applied yet, summed over partitions.
    pub cluster_apply_lag: IntGauge,
    /// Cluster mode: from a click taken to its acknowledgement in its partition's log.
    pub cluster_forward_lag: Histogram,
    /// Cluster mode: from an append to JetStream's acknowledgement.
    pub cluster_append_duration: Histogram,
    /// Cluster mode: commands per log entry this node appended (group commit).
    pub cluster_entry_commands: Histogram,
    /// Cluster mode: partition snapshots this node took, by outcome (`ok`, `failed`).
    pub cluster_snapshots: IntCounterVec,
    pub cluster_forwards: IntCounterVec,
    write_stalls: IntCounterVec,
    sst_bytes: IntGauge,
    memtable_bytes: IntGauge,
    block_cache_bytes: IntGauge,
    table_readers_bytes: IntGauge,
    estimated_keys: IntGauge,
    write_stopped: IntGauge,
    delayed_write_rate: IntGauge,
    pending_compaction_bytes: IntGauge,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone())).unwrap_or_else(|e| panic!("register {name}: {e}"));
    h
}

impl Metrics {
    /// Builds the registry. Panics only on a programming error (a bad metric name),
    /// which every test run would show.
    pub fn new() -> Self {
        let r = Registry::new();
        let http_requests =
            counter_vec(&r, "tally_http_requests_total", "HTTP requests answered.", &["listener", "route", "status"]);
        let http_duration = HistogramVec::new(
            HistogramOpts::new("tally_http_request_duration_seconds", "Time from request head to response head.")
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]),
            &["route"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(http_duration.clone())).unwrap_or_else(|e| panic!("{e}"));
        let clicks = counter_vec(&r, "tally_clicks_total", "Click requests by outcome.", &["outcome"]);
        let conversions = counter_vec(&r, "tally_conversions_total", "Conversion requests by outcome.", &["outcome"]);
        let signature_failures =
            counter_vec(&r, "tally_signature_failures_total", "Refused signatures by reason.", &["reason"]);
        let attributions = counter_vec(
            &r,
            "tally_attributions_total",
            "Attribution decisions of new conversions.",
            &["rule", "credit"],
        );
        let ledger_entries = counter_vec(&r, "tally_ledger_entries_total", "Ledger entries written.", &["kind"]);
        let fraud_flags =
            counter_vec(&r, "tally_fraud_flags_total", "Fraud signals raised by new conversions.", &["signal"]);
        for s in crate::domain::fraud::SignalKind::ALL {
            fraud_flags.with_label_values(&[s.as_str()]);
        }
        for o in CLICK_OUTCOMES {
            clicks.with_label_values(&[o]);
        }
        for o in CONVERSION_OUTCOMES {
            conversions.with_label_values(&[o]);
        }
        for f in SignatureFailure::ALL {
            signature_failures.with_label_values(&[f.as_str()]);
        }
        for k in LedgerKind::ALL {
            ledger_entries.with_label_values(&[k.as_str()]);
        }
        let batch_buckets = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
        let fsync_buckets = vec![0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];
        let m = Metrics {
            http_requests,
            http_duration,
            clicks,
            conversions,
            signature_failures,
            attributions,
            fraud_flags,
            ledger_entries,
            write_batch_size: histogram(
                &r,
                "tally_storage_write_batch_size",
                "Operations per storage write batch.",
                batch_buckets,
            ),
            fsync_duration: histogram(
                &r,
                "tally_storage_fsync_duration_seconds",
                "Duration of WAL fsyncs.",
                fsync_buckets,
            ),
            storage_errors: counter(&r, "tally_storage_write_errors_total", "Storage writes that failed."),
            connections_open: gauge(&r, "tally_http_connections", "Open client connections, both listeners."),
            connections_silent: counter(
                &r,
                "tally_http_connections_silent_total",
                "Connections closed because no request started within the header read timeout.",
            ),
            storage_ready: gauge(&r, "tally_storage_ready", "1 while storage accepts writes."),
            replay_evictions: counter(
                &r,
                "tally_replay_guard_evictions_total",
                "Webhook ids forgotten before their window ended because the replay guard was full.",
            ),
            ratelimit_keys: gauge(
                &r,
                "tally_ratelimit_keys",
                "Keys held by the rate limiters (IPs, merchants, partners).",
            ),
            handler_panics: counter(
                &r,
                "tally_http_handler_panics_total",
                "Requests whose handler panicked; each was answered 500 (a bug: report it).",
            ),
            ratelimit_keys_max: gauge(
                &r,
                "tally_ratelimit_keys_max",
                "Most keys the rate limiters hold (limits.max_keys); new keys are refused beyond it.",
            ),
            ratelimit_fullest: gauge(
                &r,
                "tally_ratelimit_fullest_table_keys",
                "Keys held by the fullest rate-limiter table; it refuses new keys at tally_ratelimit_keys_max.",
            ),
            write_stalls: counter_vec(
                &r,
                "tally_storage_write_stalls_total",
                "RocksDB write stalls since tally started, by kind (delay: writes slowed, stop: writes stopped).",
                &["kind"],
            ),
            sst_bytes: gauge(&r, "tally_storage_sst_bytes", "Bytes of RocksDB SST files."),
            memtable_bytes: gauge(&r, "tally_storage_memtable_bytes", "Bytes of RocksDB memtables."),
            block_cache_bytes: gauge(
                &r,
                "tally_storage_block_cache_bytes",
                "Bytes in RocksDB's block cache (bounded by storage.block_cache_mb; pinned index and filter blocks may exceed it).",
            ),
            table_readers_bytes: gauge(
                &r,
                "tally_storage_table_readers_bytes",
                "Bytes RocksDB's open SST file readers hold outside the block cache.",
            ),
            estimated_keys: gauge(&r, "tally_storage_estimated_keys", "RocksDB's estimate of stored keys."),
            write_stopped: gauge(&r, "tally_storage_write_stopped", "1 while RocksDB stops writes (stall)."),
            delayed_write_rate: gauge(
                &r,
                "tally_storage_delayed_write_rate_bytes",
                "RocksDB's delayed write rate while it slows writes (bytes/s), 0 otherwise.",
            ),
            pending_compaction_bytes: gauge(
                &r,
                "tally_storage_pending_compaction_bytes",
                "Bytes RocksDB estimates compaction must rewrite.",
            ),
            outbound_deliveries: counter_vec(
                &r,
                "tally_outbound_deliveries_total",
                "Outbound delivery attempts by outcome (delivered, failed, dead, parked).",
                &["outcome"],
            ),
            outbound_pending: gauge(&r, "tally_outbound_pending", "Outbound deliveries waiting to be sent or retried."),
            outbound_parked: gauge(
                &r,
                "tally_outbound_parked",
                "Outbound deliveries parked behind an endpoint that answered 410 (outbound:enable resumes them).",
            ),
            outbound_oldest_age: gauge(
                &r,
                "tally_outbound_oldest_pending_age_seconds",
                "Age of the oldest outbound delivery waiting to be sent or retried; 0 when none waits.",
            ),
            outbound_attempt_duration: histogram(
                &r,
                "tally_outbound_attempt_duration_seconds",
                "Duration of outbound delivery attempts, answered or not.",
                vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            exported_entries: counter(
                &r,
                "tally_ledger_exported_entries_total",
                "Ledger entries streamed by ledger exports.",
            ),
            cluster_partitions_owned: gauge(
                &r,
                "tally_cluster_partitions_owned",
                "Cluster mode: partitions whose lease this node holds (it sends their deliveries and runs their timers).",
            ),
            cluster_apply_lag: gauge(
                &r,
                "tally_cluster_apply_lag_entries",
                "Cluster mode: partition log entries this node has not applied yet, summed over the partitions it keeps current (owns or stands by for).",
            ),
            cluster_forward_lag: histogram(
                &r,
                "tally_cluster_click_forward_lag_seconds",
                "Cluster mode: time from a click taken to its acknowledgement in its partition's log.",
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0],
            ),
            cluster_append_duration: histogram(
                &r,
                "tally_cluster_append_duration_seconds",
                "Cluster mode: time from an append to its acknowledgement by JetStream (a quorum has it).",
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            ),
            cluster_entry_commands: histogram(
                &r,
                "tally_cluster_entry_commands",
                "Cluster mode: commands carried by each log entry this node appended (requests queued while earlier appends were in flight share one entry).",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            cluster_snapshots: counter_vec(
                &r,
                "tally_cluster_snapshots_total",
                "Cluster mode: partition snapshots this node took as their owner, by outcome (ok, failed).",
                &["outcome"],
            ),
            cluster_forwards: counter_vec(
                &r,
                "tally_cluster_forwards_total",
                "Cluster mode: batches of requests this node forwarded to their partition's owner, by outcome (appended; no_owner: appended by this node itself; failed: answered 503).",
                &["outcome"],
            ),
            registry: r,
        };
        for o in OUTBOUND_OUTCOMES {
            m.outbound_deliveries.with_label_values(&[o]);
        }
        for o in ["ok", "failed"] {
            m.cluster_snapshots.with_label_values(&[o]);
        }
        m.storage_ready.set(1);
        for kind in ["delay", "stop"] {
            m.write_stalls.with_label_values(&[kind]);
        }
        let build =
            IntGaugeVec::new(Opts::new("tally_build_info", "1, labelled with the running version."), &["version"])
                .unwrap_or_else(|e| panic!("tally_build_info: {e}"));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(build)).unwrap_or_else(|e| panic!("register tally_build_info: {e}"));
        #[cfg(target_os = "linux")]
        {
            let _ = m.registry.register(Box::new(process::Process::new()));
        }
        m
    }

    pub fn set_storage(&self, s: StorageStats) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.sst_bytes.set(g(s.sst_bytes));
        self.memtable_bytes.set(g(s.memtable_bytes));
        self.block_cache_bytes.set(g(s.block_cache_bytes));
        self.table_readers_bytes.set(g(s.table_readers_bytes));
        self.estimated_keys.set(g(s.estimated_keys));
        self.write_stopped.set(i64::from(s.write_stopped));
        self.delayed_write_rate.set(g(s.delayed_write_rate));
        self.pending_compaction_bytes.set(g(s.pending_compaction_bytes));
        for (kind, total) in [("delay", s.stalls.0), ("stop", s.stalls.1)] {
            let c = self.write_stalls.with_label_values(&[kind]);
            // RocksDB's counts start at zero with the database; a reopen starts them again.
            c.inc_by(total.saturating_sub(c.get()));
        }
    }

    /// Counts a new conversion's credits: the sourced partner's (or `none`), and each
    /// influencer's with `credit="influenced"` and its own rule; and the fraud signals it raised.
    pub fn count_attribution(&self, rec: &crate::domain::conversion::ConversionRecord) {
        for s in rec.review.iter().flat_map(|r| &r.signals) {
            self.fraud_flags.with_label_values(&[s.signal.as_str()]).inc();
        }
        let Some(a) = &rec.attribution else {
            self.attributions.with_label_values(&["none", "none"]).inc();
            return;
        };
        self.attributions.with_label_values(&[a.rule.as_str(), a.credit.as_str()]).inc();
        for i in &a.influencers {
            self.attributions.with_label_values(&[i.rule.as_str(), i.credit.as_str()]).inc();
        }
    }

    /// Counts the ledger entries of a batch once it is durable.
    pub fn count_ledger(&self, kinds: &[LedgerKind]) {
        for kind in kinds {
            self.ledger_entries.with_label_values(&[kind.as_str()]).inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process metrics of Prometheus's client (`process_*`), with `process_cpu_seconds_total`
/// read from the process CPU clock: the library's whole seconds left a dashboard's CPU
/// rate at 0 under light load.
#[cfg(target_os = "linux")]
mod process {
    use prometheus::core::{Collector, Desc};
    use prometheus::process_collector::ProcessCollector;
    use prometheus::proto::MetricFamily;
    use prometheus::{Counter, Opts};

    const CPU: &str = "process_cpu_seconds_total";

    pub struct Process {
        inner: ProcessCollector,
        cpu: Counter,
        descs: Vec<Desc>,
    }

    impl Process {
        pub fn new() -> Process {
            let inner = ProcessCollector::for_self();
            let cpu = Counter::with_opts(Opts::new(CPU, "Total user and system CPU time spent in seconds."))
                .unwrap_or_else(|e| panic!("{CPU}: {e}"));
            let mut descs: Vec<Desc> = inner.desc().into_iter().filter(|d| d.fq_name != CPU).cloned().collect();
            descs.extend(cpu.desc().into_iter().cloned());
            Process { inner, cpu, descs }
        }
    }

    /// CPU seconds of the whole process, to the nanosecond.
    pub fn cpu_seconds() -> f64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
    }

    impl Collector for Process {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let now = cpu_seconds();
            let before = self.cpu.get();
            if now > before {
                self.cpu.inc_by(now - before);
            }
            let mut out: Vec<MetricFamily> = self.inner.collect().into_iter().filter(|f| f.name() != CPU).collect();
            out.extend(self.cpu.collect());
            out
        }
    }
}
