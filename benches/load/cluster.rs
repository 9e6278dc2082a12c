//! SPEC 13's cluster row: CPU per acknowledged conversion in cluster mode against the
//! single node, and conversions/s with 1, 2 and 3 tally nodes, on this one box.
//! `--workload clicks` measures clicks instead: a cluster run's CPU then runs until every
//! node forwarded the clicks it took to their partition logs.
//!
//! `load --cluster DIR --nodes N` expects the NATS servers of `scripts/cluster start DIR`
//! (with `TALLY_CLUSTER_NODES=0`: no tally node of its own) and a fresh `tally cluster
//! init`; `load --cluster-single` is the single-node reference with the same client.
//! `scripts/bench-cluster` runs them in interleaved rounds, each cluster run on fresh logs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{run, start_tally, start_tally_env, Target, Workload, CONFIG};

/// User + system CPU seconds of a process, all its threads (`/proc/<pid>/stat`, USER_HZ 100).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn total_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// What one run measured: acknowledged (created) conversions, errors (any other answer,
/// duplicates included), seconds, and latency p50 and p99 (µs).
#[derive(Clone, Copy)]
struct Driven {
    ok: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

/// One closed-loop run of `workload` spread over `targets`.
async fn drive(targets: &[Target], workload: Workload, connections: usize, duration: Duration) -> Driven {
    let per = (connections / targets.len()).max(1);
    let runs = targets.iter().map(|t| run(t, workload, per, duration, None));
    let results = futures_util::future::join_all(runs).await;
    let ok = results.iter().map(|r| r.0).sum();
    let errors = results.iter().map(|r| r.1).sum();
    let secs = results.iter().map(|r| r.3).fold(0.0, f64::max);
    let mut all = results[0].2.clone();
    for r in &results[1..] {
        let _ = all.add(&r.2);
    }
    Driven { ok, errors, secs, p50_us: all.value_at_quantile(0.5), p99_us: all.value_at_quantile(0.99) }
}

/// Prints one result line the script collects; `per_entry` is the mean number of commands
/// per log entry the nodes appended and `forwards` the batches they forwarded to owners
/// (0 for the single node), and `entry_bytes` the mean size of the partition logs' entries.
#[allow(clippy::too_many_arguments)]
fn report(
    mode: &str,
    workload: Workload,
    nodes: usize,
    run: &Driven,
    cpu: (f64, f64),
    per_entry: f64,
    forwards: f64,
    entry_bytes: f64,
) {
    let Driven { ok, errors, secs, p50_us, p99_us } = *run;
    let (tally_cpu, nats_cpu) = cpu;
    let per = |cpu: f64| if ok == 0 { f64::NAN } else { cpu * 1e6 / ok as f64 };
    let workload = workload.name();
    println!(
        "RESULT mode={mode} workload={workload} nodes={nodes} acknowledged={ok} errors={errors} per_second={:.0} tally_cpu_us={:.0} nats_cpu_us={:.0} total_cpu_us={:.0} per_entry={per_entry:.1} per_forward={:.1} entry_bytes={entry_bytes:.0} p50_us={p50_us} p99_us={p99_us}",
        ok as f64 / secs,
        per(tally_cpu),
        per(nats_cpu),
        per(tally_cpu + nats_cpu),
        if forwards > 0.0 { ok as f64 / forwards } else { 0.0 }
    );
}

/// Commands and entries the nodes appended, from their `tally_cluster_entry_commands`,
/// the batches they forwarded to owners (`tally_cluster_forwards_total`), and the clicks
/// they forwarded to partition logs (`tally_cluster_click_forward_lag_seconds`).
async fn entries(admins: &[std::net::SocketAddr]) -> (f64, f64, f64, f64) {
    let mut total = (0.0, 0.0, 0.0, 0.0);
    for admin in admins {
        let (_, body) = super::reports::admin_get(*admin, "/metrics").await;
        let text = String::from_utf8_lossy(&body).into_owned();
        // The sum of the samples whose line starts with `prefix` (a name and its space, or
        // a name and `{` for all its labels).
        let sum = |prefix: &str| {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum::<f64>()
        };
        total.0 += sum("tally_cluster_entry_commands_sum ");
        total.1 += sum("tally_cluster_entry_commands_count ");
        total.2 += sum("tally_cluster_forwards_total{");
        total.3 += sum("tally_cluster_click_forward_lag_seconds_count ");
    }
    total
}

/// Waits (up to 30 s) until the nodes forwarded `clicks` more clicks than `from` to their
/// partition logs, and returns the counters then.
async fn forwarded(admins: &[std::net::SocketAddr], from: f64, clicks: f64) -> (f64, f64, f64, f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = entries(admins).await;
        if now.3 - from >= clicks || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The single node with the bench config.
pub async fn single(dir: &Path, workload: Workload, duration: Duration, connections: usize) {
    let (child, addr, secret) = start_tally(dir).await;
    let pid = child.id().expect("tally's pid");
    let target = Target { name: "tally", addr, secret: Some(secret), clicks: Arc::default() };
    // A short warm-up, as in the cluster runs.
    drive(std::slice::from_ref(&target), workload, connections, Duration::from_secs(1)).await;
    let before = cpu_seconds(pid);
    let driven = drive(std::slice::from_ref(&target), workload, connections, duration).await;
    report("single", workload, 1, &driven, (cpu_seconds(pid) - before, 0.0), 0.0, 0.0, 0.0);
}

/// The NATS URLs and server pids of `scripts/cluster start <cluster_dir>`.
fn nats_of(cluster_dir: &Path) -> (String, Vec<u32>) {
    let gw = std::fs::read_to_string(cluster_dir.join("gw-1.toml")).expect("scripts/cluster start wrote gw-1.toml");
    let urls = gw.lines().find(|l| l.starts_with("nats_urls")).expect("nats_urls in gw-1.toml").to_string();
    let pids = (1..=3)
        .filter_map(|i| std::fs::read_to_string(cluster_dir.join(format!("n{i}.pid"))).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    (urls, pids)
}

/// A client of the NATS servers named by the `nats_urls` line of a node's config.
async fn nats_client(line: &str) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> =
        line.split('"').filter(|u| u.starts_with("nats://")).map(|u| u.parse().expect("a NATS URL")).collect();
    async_nats::connect(addrs).await.expect("NATS reachable")
}

/// The mean size of an entry over the partition logs (`TALLY_P*`), as JetStream stores it.
async fn log_entry_bytes(line: &str) -> f64 {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(nats_client(line).await);
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut streams = js.streams();
    while let Some(Ok(info)) = streams.next().await {
        if info.config.name.starts_with("TALLY_P") {
            bytes += info.state.bytes;
            entries += info.state.messages;
        }
    }
    if entries == 0 {
        0.0
    } else {
        bytes as f64 / entries as f64
    }
}

/// The log's floor: the NATS servers' CPU per appended entry with no tally node, one
/// entry of `bytes` in flight at a time (as a partition's owner appends) to a stream made
/// like a partition's (file storage, 3 replicas, a message id on every entry), read back
/// by `readers` consumers as a node's apply loop reads its log; `rate` entries/s (0: as fast
/// as they are acknowledged). What tally adds is the cluster run's CPU over this.
pub async fn log_floor(cluster_dir: &Path, bytes: usize, readers: usize, rate: u64, duration: Duration) {
    use async_nats::jetstream::{self, consumer, stream};
    use futures_util::StreamExt;
    let (line, nats_pids) = nats_of(cluster_dir);
    let js = jetstream::new(nats_client(&line).await);
    let _ = js.delete_stream("FLOOR").await;
    let config = stream::Config {
        name: "FLOOR".into(),
        subjects: vec!["floor.>".into()],
        num_replicas: 3,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let floor = js.create_stream(config).await.expect("stream FLOOR");
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..readers {
        let config = consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let c = floor.create_consumer(config).await.expect("consumer");
        let mut messages =
            c.stream().max_messages_per_batch(512).heartbeat(Duration::from_secs(1)).messages().await.unwrap();
        let read = Arc::clone(&read);
        tokio::spawn(async move {
            while let Some(Ok(_)) = messages.next().await {
                read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let payload = bytes::Bytes::from(vec![b'x'; bytes]);
    let append = |start: u64, until: std::time::Instant| {
        let (js, payload) = (js.clone(), payload.clone());
        let mut sent = 0u64;
        async move {
            let began = std::time::Instant::now();
            while std::time::Instant::now() < until {
                let message = jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("floor-{}", start + sent));
                js.send_publish("floor.cmd", message).await.unwrap().await.expect("acknowledged");
                sent += 1;
                if rate > 0 {
                    let due = began + Duration::from_secs_f64(sent as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            sent
        }
    };
    let warm = append(0, std::time::Instant::now() + Duration::from_secs(1)).await;
    let idle_for = Duration::from_secs(3);
    let i0 = total_cpu(&nats_pids);
    tokio::time::sleep(idle_for).await;
    let idle = (total_cpu(&nats_pids) - i0) / idle_for.as_secs_f64();
    let (c0, r0, t0) =
        (total_cpu(&nats_pids), read.load(std::sync::atomic::Ordering::Relaxed), std::time::Instant::now());
    let entries = append(warm, t0 + duration).await;
    let secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = total_cpu(&nats_pids) - c0;
    let delivered = read.load(std::sync::atomic::Ordering::Relaxed) - r0;
    let _ = js.delete_stream("FLOOR").await;
    println!(
        "RESULT mode=log-floor entry_bytes={bytes} readers={readers} entries={entries} delivered={delivered} per_second={:.0} nats_cpu_us_per_entry={:.0} nats_idle_ms_per_s={:.1}",
        entries as f64 / secs,
        cpu * 1e6 / entries.max(1) as f64,
        idle * 1e3
    );
}

/// `nodes` tally nodes on the NATS servers of `scripts/cluster start <cluster_dir>`.
pub async fn cluster(cluster_dir: &Path, nodes: usize, workload: Workload, duration: Duration, connections: usize) {
    let (urls, nats_pids) = nats_of(cluster_dir);
    let dirs: Vec<tempfile::TempDir> = (0..nodes).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut children = Vec::new();
    let mut targets = Vec::new();
    let mut admins = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        if i > 0 {
            // The merchant's secret is the first node's: the others import it.
            std::fs::copy(dirs[0].path().join("bench.whsec"), d.path().join("bench.whsec")).unwrap();
        }
        let config =
            format!("{CONFIG}\n[cluster]\n{urls}\nnode_id = \"bench-{}\"\npartitions = 16\nreplicas = 3\n", i + 1);
        let (child, addr, admin, secret) = start_tally_env(d.path(), &config, &[]).await;
        children.push(child);
        admins.push(admin);
        targets.push(Target { name: "tally", addr, secret: Some(secret), clicks: Arc::default() });
    }
    let tally_pids: Vec<u32> = children.iter().filter_map(tokio::process::Child::id).collect();
    let before = entries(&admins).await;
    let warm = drive(&targets, workload, connections, Duration::from_secs(1)).await;
    // Clicks are forwarded in the background: the warm-up's first.
    let e0 = match workload {
        Workload::Clicks => forwarded(&admins, before.3, warm.ok as f64).await,
        _ => entries(&admins).await,
    };
    let (t0, n0) = (total_cpu(&tally_pids), total_cpu(&nats_pids));
    let driven = drive(&targets, workload, connections, duration).await;
    let e1 = match workload {
        Workload::Clicks => forwarded(&admins, e0.3, driven.ok as f64).await,
        _ => entries(&admins).await,
    };
    let cpu = (total_cpu(&tally_pids) - t0, total_cpu(&nats_pids) - n0);
    let per_entry = if e1.1 > e0.1 { (e1.0 - e0.0) / (e1.1 - e0.1) } else { 0.0 };
    let entry_bytes = log_entry_bytes(&urls).await;
    report("cluster", workload, nodes, &driven, cpu, per_entry, e1.2 - e0.2, entry_bytes);
    drop(children);
}
