//! Load benchmark: tally side by side with a bare hyper server that answers 204, driven
//! by the same client with the same connections and duration.
//!
//! `cargo bench --bench load -- [--duration SECS] [--connections N] [--workload NAME] [--open-loop]`
//! `cargo bench --bench load -- --scale 10000000 [--duration SECS]`: conversions attributed
//! by stored clicks with 10,000 against N stored clicks and N stored conversions, RSS, and
//! the restart time after kill -9 with 2 N stored events.
//! `cargo bench --bench load -- --outbound [--duration SECS]`: SPEC 13's outbound rows:
//! deliveries/s to a local sink answering 204 and their lag, and conversions/s with every
//! partner endpoint dead (never answering) against the same run without outbound.
//! `cargo bench --bench load -- --reports 10000000`: the 30-day partner report's latency
//! with N stored clicks against an empty store. `--export 10000000`: the ledger export's
//! entries/s and RSS growth. `--rollups-ab`: clicks and conversions with rollups on and
//! off, in interleaved pairs.
//! `--cluster DIR --nodes N` and `--cluster-single`: cluster mode's CPU per conversion and
//! throughput (run by `scripts/bench-cluster`). `--cluster DIR --log-floor [--entry-bytes
//! N] [--readers R] [--rate E]`: what JetStream alone costs per appended entry, without
//! tally (the log's floor, as the bare server is HTTP's).
//! Workloads: clicks, conversions (unique txn_ids, durability fsync), duplicates, mixed
//! (90 % clicks / 10 % conversions), all (default). Needs the release binary:
//! `cargo build --release` first (the bench target does not build it).
//! Prints a table and writes JSON to `$CARGO_TARGET_DIR/bench/load-<unix>.json`.

#![allow(clippy::disallowed_methods)] // the load client reads its own responses

mod cluster;
mod reports;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Clicks,
    Conversions,
    Duplicates,
    Mixed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Clicks => "clicks",
            Workload::Conversions => "conversions",
            Workload::Duplicates => "duplicates",
            Workload::Mixed => "mixed",
        }
    }
}

/// The workload of the cluster runs: clicks when asked for, else conversions.
fn cluster_workload(asked: &[Workload]) -> Workload {
    if asked == [Workload::Clicks] {
        Workload::Clicks
    } else {
        Workload::Conversions
    }
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    secret: Option<Arc<tally::signing::WebhookSecret>>,
    /// Stored click ids that conversions name (`--scale` runs); empty: explicit partner.
    clicks: Arc<Vec<String>>,
}

#[derive(serde::Serialize)]
struct Row {
    workload: &'static str,
    target: &'static str,
    requests: u64,
    errors: u64,
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    ratio_to_bare: Option<f64>,
    /// tally's user + system CPU over the run, per answered request (µs).
    cpu_us_per_request: Option<f64>,
}

/// True when the command line holds `name`.
fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Serves `204` to everything on `listener` with hyper 1.x: the bare server.
async fn serve_bare(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                let mut r = hyper::Response::new(Empty::<Bytes>::new());
                *r.status_mut() = hyper::StatusCode::NO_CONTENT;
                Ok::<_, std::convert::Infallible>(r)
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The bare server's process (`--bare-server`): prints its address, then serves until killed.
/// It runs on the same runtime shape as tally (a multi-thread runtime, one worker per core).
fn bare_server_process() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        serve_bare(listener).await;
    });
}

/// Starts the bare server: as its own process like tally (the default, so both servers pay
/// the same cross-process scheduling), or inside the client's runtime with
/// `--bare-in-process` (how runs before 2026-11-21 measured it).
async fn bare_server() -> (SocketAddr, Option<tokio::process::Child>) {
    if flag("--bare-in-process") {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_bare(listener));
        return (addr, None);
    }
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .arg("--bare-server")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the bare server");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    tokio::io::BufReader::new(stdout).read_line(&mut line).await.unwrap();
    (line.trim().parse().expect("the bare server's address"), Some(child))
}

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

const CONFIG: &str = r#"
public_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[log]
level = "error"
format = "json"
# One client IP drives the whole load: lift the per-IP and per-merchant limits so the
# limiter code still runs but never refuses.
[limits]
clicks_per_ip_per_second = 100000000
clicks_burst = 100000000
merchant_per_second = 100000000
merchant_burst = 100000000
[[merchants]]
id = "bench"
name = "Bench Shop"
secret_file = "SECRET_FILE"
default_plan_id = "std"
[[plans]]
merchant_id = "bench"
id = "std"
currency = "USD"
rules = [{ event = "sale", percent = "20" }]
[[partners]]
merchant_id = "bench"
id = "bp"
name = "Bench Partner"
kind = "affiliate"
[[links]]
merchant_id = "bench"
id = "bench-link"
partner_id = "bp"
destination = "https://shop.example.com/?ref={click_id}&s1={sub1}"
plan_id = "std"
"#;

/// The release build, or `TALLY_BIN` (another build, for A/B runs).
fn tally_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TALLY_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    let bin = target.join("release").join("tally");
    assert!(bin.exists(), "{} is missing: run `cargo build --release` first", bin.display());
    bin
}

async fn start_tally(dir: &std::path::Path) -> (tokio::process::Child, SocketAddr, Arc<tally::signing::WebhookSecret>) {
    let (child, public, _, secret) = start_tally_full(dir).await;
    (child, public, secret)
}

/// Starts tally on `dir/db` and waits for its address file: the child, public and admin
/// addresses and the merchant secret.
async fn start_tally_full(
    dir: &std::path::Path,
) -> (tokio::process::Child, SocketAddr, SocketAddr, Arc<tally::signing::WebhookSecret>) {
    start_tally_with(dir, CONFIG).await
}

/// [`start_tally_full`] with another config text (`SECRET_FILE` is replaced).
async fn start_tally_with(
    dir: &std::path::Path,
    config_text: &str,
) -> (tokio::process::Child, SocketAddr, SocketAddr, Arc<tally::signing::WebhookSecret>) {
    start_tally_env(dir, config_text, &[]).await
}

/// [`start_tally_with`] and environment variables (`TALLY_REPORTS__ROLLUPS=false`).
async fn start_tally_env(
    dir: &std::path::Path,
    config_text: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, SocketAddr, SocketAddr, Arc<tally::signing::WebhookSecret>) {
    let config = dir.join("tally.toml");
    let secret_file = dir.join("bench.whsec");
    std::fs::write(&config, config_text.replace("SECRET_FILE", secret_file.to_str().unwrap())).unwrap();
    let addr_file = dir.join("addr.json");
    // `BENCH_WRAP="valgrind --tool=callgrind"` runs tally under a profiler.
    let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    let mut command: Vec<String> = wrap.split_whitespace().map(str::to_string).collect();
    command.push(tally_binary().to_string_lossy().into_owned());
    let child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("TALLY_DATA_DIR", dir.join("db"))
        .env("TALLY_ADDR_FILE", &addr_file)
        .env("TALLY_ADMIN_TOKEN", ADMIN_TOKEN)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .spawn()
        .expect("start tally");
    let _ = std::fs::remove_file(&addr_file);
    let started = Instant::now();
    let (public, admin) = loop {
        if let Ok(Ok(v)) = std::fs::read_to_string(&addr_file).map(|t| serde_json::from_str::<serde_json::Value>(&t)) {
            break (v["public"].as_str().unwrap().parse().unwrap(), v["admin"].as_str().unwrap().parse().unwrap());
        }
        assert!(started.elapsed() < Duration::from_secs(120), "tally did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secret = tally::signing::WebhookSecret::parse(&std::fs::read_to_string(secret_file).unwrap()).unwrap();
    (child, public, admin, Arc::new(secret))
}

/// Current and peak resident memory of a process, in MiB (Linux `/proc`).
fn rss_mib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb / 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// One request of `workload` number `n` from connection `conn`.
fn request(target: &Target, workload: Workload, conn: usize, n: u64, ts: i64) -> hyper::Request<Full<Bytes>> {
    let click = workload == Workload::Clicks || (workload == Workload::Mixed && !n.is_multiple_of(10));
    let builder = hyper::Request::builder().header("host", target.addr.to_string());
    if click {
        return builder
            .method("GET")
            .uri(format!("/c/bench-link?sub1=c{conn}"))
            .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    // Unique across targets too: a cluster run drives every node with connections 0..k
    // at the same second, and without the port their txn_ids were each other's duplicates.
    let txn = if workload == Workload::Duplicates {
        format!("dup-{}", n % 100)
    } else {
        format!("t{ts}-{}-{conn}-{n}", target.addr.port())
    };
    let body = if target.clicks.is_empty() {
        format!(r#"{{"txn_id":"{txn}","amount":"49.90","currency":"USD","partner_id":"bp"}}"#)
    } else {
        // Attributed by a stored click: the click rule reads it from the store.
        let click = &target.clicks[(n as usize * 7919 + conn * 104_729) % target.clicks.len()];
        format!(r#"{{"txn_id":"{txn}","amount":"49.90","currency":"USD","click_id":"{click}"}}"#)
    };
    let id = format!("msg_{txn}_{conn}_{n}");
    let sig =
        target.secret.as_ref().map(|s| tally::signing::sign(s.key(), &id, ts, body.as_bytes())).unwrap_or_default();
    builder
        .method("POST")
        .uri("/v1/merchants/bench/conversions")
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Drives `target`. `rate: None` is closed loop (each connection sends as soon as its
/// previous answer arrived); `Some(r)` is open loop at `r` requests/s in total, spread
/// over the connections, with latency measured from each request's *scheduled* time, so
/// a slow answer is charged to every request it delayed (no coordinated omission).
async fn run(
    target: &Target,
    workload: Workload,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> (u64, u64, hdrhistogram::Histogram<u64>, f64) {
    let ts = now_secs();
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for conn in 0..connections {
        let target = Target {
            name: target.name,
            addr: target.addr,
            secret: target.secret.clone(),
            clicks: Arc::clone(&target.clicks),
        };
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut ok, mut errors) = (0u64, 0u64);
            let stream = TcpStream::connect(target.addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn_task) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn_task);
            let mut n = 0u64;
            let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
            let first = started + interval.map_or(Duration::ZERO, |i| i.mul_f64(conn as f64 / connections as f64));
            while Instant::now() < deadline {
                let req = request(&target, workload, conn, n, ts);
                let t0 = match interval {
                    None => Instant::now(),
                    Some(i) => {
                        let scheduled = first + i.mul_f64(n as f64);
                        if scheduled >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(scheduled.into()).await;
                        scheduled
                    }
                };
                n += 1;
                match sender.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let _ = resp.into_body().collect().await;
                        hist.record(t0.elapsed().as_micros() as u64).ok();
                        // A unique conversion answered as a duplicate (200, not 201) means
                        // the run measured something else: counted as an error.
                        let duplicate = workload == Workload::Conversions && status == 200;
                        if (200..400).contains(&status) && !duplicate {
                            ok += 1;
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (ok, errors, hist)
        }));
    }
    let mut total = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (o, e, h) = t.await.unwrap();
        ok += o;
        errors += e;
        total.add(h).unwrap();
    }
    (ok, errors, total, started.elapsed().as_secs_f64())
}

fn main() {
    if flag("--bare-server") {
        return bare_server_process();
    }
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(client());
}

async fn client() {
    let asked = arg("--workload").is_some()
        || arg("--scale").is_some()
        || arg("--soak").is_some()
        || arg("--reports").is_some()
        || arg("--export").is_some()
        || flag("--rollups-ab")
        || flag("--outbound")
        || arg("--cluster").is_some()
        || flag("--cluster-single")
        || std::env::var("TALLY_LOAD").is_ok();
    if flag("--bench") && !asked {
        // `cargo bench` without arguments runs every bench target; keep this one opt-in.
        eprintln!("load: skipped (run `cargo bench --bench load -- --workload all`, or set TALLY_LOAD=1)");
        return;
    }
    let duration = Duration::from_secs(arg("--duration").and_then(|d| d.parse().ok()).unwrap_or(10));
    let connections: usize = arg("--connections").and_then(|c| c.parse().ok()).unwrap_or(64);
    let workloads = match arg("--workload").as_deref().unwrap_or("all") {
        "clicks" => vec![Workload::Clicks],
        "conversions" => vec![Workload::Conversions],
        "duplicates" => vec![Workload::Duplicates],
        "mixed" => vec![Workload::Mixed],
        _ => vec![Workload::Clicks, Workload::Conversions, Workload::Duplicates, Workload::Mixed],
    };
    let dir = tempfile::tempdir().unwrap();
    if let Some(secs) = arg("--soak").and_then(|n| n.parse::<u64>().ok()) {
        soak(dir.path(), Duration::from_secs(secs), connections).await;
        return;
    }
    if let Some(n) = arg("--scale").and_then(|n| n.parse::<u64>().ok()) {
        scale(n, duration, connections).await;
        return;
    }
    if let Some(n) = arg("--reports").and_then(|n| n.parse::<u64>().ok()) {
        reports::partner_report(n).await;
        return;
    }
    if let Some(n) = arg("--export").and_then(|n| n.parse::<u64>().ok()) {
        reports::export(n).await;
        return;
    }
    if flag("--rollups-ab") {
        reports::rollups_ab(duration, connections).await;
        return;
    }
    if flag("--outbound") {
        outbound(duration, connections).await;
        return;
    }
    if let Some(cluster_dir) = arg("--cluster").filter(|_| flag("--log-floor")) {
        let bytes = arg("--entry-bytes").and_then(|n| n.parse().ok()).unwrap_or(18_000);
        let readers = arg("--readers").and_then(|n| n.parse().ok()).unwrap_or(1);
        let rate = arg("--rate").and_then(|n| n.parse().ok()).unwrap_or(0);
        cluster::log_floor(std::path::Path::new(&cluster_dir), bytes, readers, rate, duration).await;
        return;
    }
    if let Some(cluster_dir) = arg("--cluster") {
        let nodes = arg("--nodes").and_then(|n| n.parse().ok()).unwrap_or(3);
        let workload = cluster_workload(&workloads);
        cluster::cluster(std::path::Path::new(&cluster_dir), nodes, workload, duration, connections).await;
        return;
    }
    if flag("--cluster-single") {
        cluster::single(dir.path(), cluster_workload(&workloads), duration, connections).await;
        return;
    }
    let (bare_addr, _bare_child) = bare_server().await;
    let bare = Target { name: "bare-hyper", addr: bare_addr, secret: None, clicks: Arc::default() };
    // `TALLY_BENCH_DEAD_OUTBOUND=1`: partner `bp` has a postback to an endpoint that never
    // answers (to profile the dead-endpoint row of `--outbound`).
    let (child, tally_addr, secret) = if std::env::var("TALLY_BENCH_DEAD_OUTBOUND").is_ok() {
        let hole = black_hole().await;
        let (c, a, _, s) =
            start_tally_with(dir.path(), &outbound_config(&format!("http://{hole}/pb?t={{txn_id}}"))).await;
        (c, a, s)
    } else {
        start_tally(dir.path()).await
    };
    let tally_pid = child.id();
    let tally = Target { name: "tally", addr: tally_addr, secret: Some(secret), clicks: Arc::default() };

    let open_loop = flag("--open-loop");
    println!(
        "{connections} connections, {}s per run, {}",
        duration.as_secs(),
        if open_loop { "open loop at half the bare server's closed-loop maximum" } else { "closed loop" }
    );
    println!(
        "{:<12} {:<11} {:>10} {:>7} {:>10} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "workload", "target", "requests", "errors", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "ratio", "cpu µs"
    );
    let mut rows = Vec::new();
    for w in workloads {
        let mut bare_rps = None;
        let rate = if open_loop {
            let (ok, _, _, secs) = run(&bare, w, connections, duration, None).await;
            Some(ok as f64 / secs / 2.0)
        } else {
            None
        };
        for target in [&bare, &tally] {
            // tally's own CPU per answered request: steadier than req/s on a shared box,
            // where the load generator and other tenants take cores from run to run.
            let cpu_before = tally_pid.filter(|_| target.name == "tally").map(cluster::cpu_seconds);
            let (ok, errors, h, secs) = run(target, w, connections, duration, rate).await;
            let cpu_us = cpu_before
                .zip(tally_pid)
                .map(|(before, pid)| (cluster::cpu_seconds(pid) - before) * 1e6 / ok.max(1) as f64);
            let rps = ok as f64 / secs;
            let ratio = bare_rps.map(|b: f64| rps / b);
            if target.name == "bare-hyper" {
                bare_rps = Some(rps);
            }
            let row = Row {
                workload: w.name(),
                target: target.name,
                requests: ok,
                errors,
                rps,
                p50_us: h.value_at_quantile(0.5),
                p99_us: h.value_at_quantile(0.99),
                p999_us: h.value_at_quantile(0.999),
                ratio_to_bare: ratio,
                cpu_us_per_request: cpu_us,
            };
            println!(
                "{:<12} {:<11} {:>10} {:>7} {:>10.0} {:>8} {:>8} {:>9} {:>8} {:>8}",
                row.workload,
                row.target,
                row.requests,
                row.errors,
                row.rps,
                row.p50_us,
                row.p99_us,
                row.p999_us,
                row.ratio_to_bare.map(|r| format!("{:.0}%", r * 100.0)).unwrap_or_else(|| "-".into()),
                row.cpu_us_per_request.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into())
            );
            rows.push(row);
        }
    }
    if let Some((rss, peak)) = tally_pid.and_then(rss_mib) {
        println!("tally RSS after the runs: {rss} MiB (peak {peak} MiB; SPEC: <= 256 MiB)");
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    let out = target.join("bench");
    let _ = std::fs::create_dir_all(&out);
    let mode = if open_loop { "open" } else { "closed" };
    let path = out.join(format!("load-{mode}-{}.json", now_secs()));
    let _ = std::fs::write(&path, serde_json::to_vec_pretty(&rows).unwrap());
    println!("written to {}", path.display());
    if let Some(pid) = tally_pid.filter(|_| std::env::var("BENCH_WRAP").is_ok()) {
        // A profiler writes its output only when tally stops cleanly.
        let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
        let mut child = child;
        let _ = child.wait().await;
    }
}

/// SPEC 13's memory row: the mixed workload (90 % clicks, 10 % conversions), closed loop,
/// against tally with the default config for `total`, its RSS sampled every 10 s.
async fn soak(dir: &std::path::Path, total: Duration, connections: usize) {
    let (child, addr, secret) = start_tally(dir).await;
    let pid = child.id().expect("tally's pid");
    let tally = Target { name: "tally", addr, secret: Some(secret), clicks: Arc::default() };
    let slice = Duration::from_secs(10).min(total);
    let started = std::time::Instant::now();
    let (mut requests, mut errors, mut peak_rss) = (0u64, 0u64, 0u64);
    let mut samples = Vec::new();
    println!("soak: mixed workload, {connections} connections, {}s, RSS every {}s", total.as_secs(), slice.as_secs());
    while started.elapsed() < total {
        let (ok, errs, _, secs) = run(&tally, Workload::Mixed, connections, slice, None).await;
        requests += ok;
        errors += errs;
        let (rss, hwm) = rss_mib(pid).unwrap_or((0, 0));
        peak_rss = peak_rss.max(hwm);
        samples
            .push(serde_json::json!({"at_s": started.elapsed().as_secs(), "rss_mib": rss, "req_s": ok as f64 / secs}));
        println!(
            "  {:>4}s  {:>8.0} req/s  RSS {rss} MiB (peak {hwm} MiB)",
            started.elapsed().as_secs(),
            ok as f64 / secs
        );
    }
    let rss: Vec<u64> = samples.iter().filter_map(|s| s["rss_mib"].as_u64()).collect();
    let (first, last) = (rss.first().copied().unwrap_or(0), rss.last().copied().unwrap_or(0));
    println!(
        "soak: {requests} requests ({errors} errors) in {}s; RSS {first} MiB after the first slice, {last} MiB at the end, peak {peak_rss} MiB (SPEC: <= 256 MiB)",
        started.elapsed().as_secs()
    );
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    let out = target.join("bench");
    let _ = std::fs::create_dir_all(&out);
    let path = out.join(format!("soak-{}.json", now_secs()));
    let body =
        serde_json::json!({"requests": requests, "errors": errors, "peak_rss_mib": peak_rss, "samples": samples});
    let _ = std::fs::write(&path, serde_json::to_vec_pretty(&body).unwrap());
    println!("written to {}", path.display());
}

/// Writes `n` clicks on `bench-link` into a new store at `data_dir` through tally's own
/// store (the writer thread, batched, WAL without fsync, as the click handler does), with a
/// distinct visitor each. Returns every 1000th click id (at least 100) for conversions.
async fn load_clicks(data_dir: &std::path::Path, n: u64) -> Vec<String> {
    use tally::domain::click::ClickRecord;
    use tally::domain::ids::{LinkId, MerchantId, PartnerId, Ulid};
    let store = open_bench_store(data_dir);
    let tasks = 1024u64;
    let every = (n / 100).clamp(1, 1000);
    let started = Instant::now();
    let now_ms = now_secs() * 1000;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut sample = Vec::new();
            let (link, partner, merchant) = (
                LinkId::parse("bench-link").unwrap(),
                PartnerId::parse("bp").unwrap(),
                MerchantId::parse("bench").unwrap(),
            );
            let mut i = t;
            while i < n {
                // Spread evenly over the last 20 days, whatever `n`.
                let at_ms = now_ms - (i as i64 * 20 * 86_400_000) / n as i64;
                let mut visitor = [0u8; 16];
                visitor[..8].copy_from_slice(&i.to_be_bytes());
                let click = ClickRecord {
                    click_id: Ulid::mint(at_ms),
                    link_id: link.clone(),
                    partner_id: partner.clone(),
                    merchant_id: merchant.clone(),
                    at_ms,
                    subs: [Some(format!("s{}", i % 977)), None, None, None, None],
                    ip: "203.0.113.0".into(),
                    user_agent: "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0".into(),
                    bot: false,
                    unique: false,
                    visitor,
                };
                let id = click.click_id.to_string();
                tally::backend::BackendExt::record_click(&store, click, 86_400_000).await.expect("click stored");
                if i % every == 0 {
                    sample.push(id);
                }
                i += tasks;
            }
            sample
        }));
    }
    let mut sample = Vec::new();
    for h in handles {
        sample.extend(h.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    println!("loaded {n} clicks in {secs:.1} s ({:.0} clicks/s)", n as f64 / secs);
    compact(store).await;
    sample
}

/// The store at `data_dir` opened in this process, as tally opens it (WAL without fsync).
fn open_bench_store(data_dir: &std::path::Path) -> tally::store::Store {
    let opts = tally::store::StoreOptions {
        data_dir: data_dir.to_path_buf(),
        durability: tally::store::Durability::Buffered,
        wal_sync_interval: Duration::from_millis(100),
        queue_capacity: 8192,
        max_batch: 1024,
        block_cache_bytes: 64 << 20,
        write_buffer_bytes: 32 << 20,
        recent_conversions: tally::store::DEFAULT_RECENT_CONVERSIONS,
        memtable_budget_bytes: 64 << 20,
        rollups: true,
        shared: None,
    };
    tally::store::Store::open(&opts, Arc::new(tally::metrics::Metrics::new())).expect("open the store")
}

/// Compacts the whole store and closes it: a store that grew over days has been compacted
/// as it grew; a bulk load has not.
async fn compact(store: tally::store::Store) {
    let compacting = Instant::now();
    tokio::task::spawn_blocking(move || {
        store.compact_all().expect("compaction");
        store.shutdown();
    })
    .await
    .unwrap();
    println!("compacted in {:.1} s", compacting.elapsed().as_secs_f64());
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

/// Waits until `/readyz` answers 200; the time from `since`.
async fn ready_after(admin: SocketAddr, since: Instant) -> Duration {
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return since.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stores `n` conversions of partner `bp` (one commission entry each) through signed
/// batches of 1,000 on 8 connections, as a merchant's backfill would; prints the rate.
async fn store_conversions(public: SocketAddr, secret: &Arc<tally::signing::WebhookSecret>, n: u64) {
    let loading = Instant::now();
    let batches = n.div_ceil(1000);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (next, secret) = (Arc::clone(&next), Arc::clone(secret));
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(public).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    break;
                }
                let items: Vec<String> = (0..1000.min(n - b * 1000))
                    .map(|i| format!(r#"{{"txn_id":"x{b}-{i}","amount":"49.90","currency":"USD","partner_id":"bp"}}"#))
                    .collect();
                let body = format!(r#"{{"conversions":[{}]}}"#, items.join(","));
                let (id, ts) = (format!("msg_b{b}"), now_secs());
                let sig = tally::signing::sign(secret.key(), &id, ts, body.as_bytes());
                let req = hyper::Request::post("/v1/merchants/bench/conversions/batch")
                    .header("host", public.to_string())
                    .header("content-type", "application/json")
                    .header("webhook-id", id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", sig)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = loading.elapsed().as_secs_f64();
    println!("stored {n} conversions in {secs:.0} s ({:.0}/s)", n as f64 / secs);
}

/// SPEC 13's scale and restart rows. Two stores: 10,000 clicks and 10,000 conversions,
/// and `n` of each. Each is loaded (clicks through the store, conversions through signed
/// batches to a running tally), tally is killed with `kill -9` right after the load (its
/// WAL holds the newest writes: the slow case) and restarted, and the time to `/readyz`
/// 200 is taken: the restart row, with `2 n` stored events. Then each store is compacted
/// offline, as a store that grew over days was compacted while it grew, and tally runs on
/// both at once: the conversions workload (each conversion naming a stored click) runs
/// against the small and the large store in two interleaved pairs, the order alternating.
async fn scale(n: u64, duration: Duration, connections: usize) {
    let mut stores = Vec::new();
    for events in [10_000u64, n] {
        let dir = tempfile::tempdir_in(std::env::var("TALLY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
        let sample = load_clicks(&dir.path().join("db"), events).await;
        let (mut loader, public, _, secret) = start_tally_full(dir.path()).await;
        store_conversions(public, &secret, events).await;
        let loaded_rss = loader.id().and_then(rss_mib);
        loader.start_kill().unwrap();
        loader.wait().await.unwrap();
        let restarted = Instant::now();
        let (mut again, _, admin, _) = start_tally_full(dir.path()).await;
        let ready = ready_after(admin, restarted).await;
        println!(
            "{events} clicks + {events} conversions stored (RSS after the load {loaded_rss:?} MiB): ready {:.2} s after a restart that followed kill -9",
            ready.as_secs_f64()
        );
        again.start_kill().unwrap();
        let _ = again.wait().await;
        compact(open_bench_store(&dir.path().join("db"))).await;
        stores.push((events, dir, sample, ready, loaded_rss));
    }
    let mut targets = Vec::new();
    for (_, dir, sample, _, _) in &stores {
        let (child, public, _, secret) = start_tally_full(dir.path()).await;
        targets.push((
            child,
            Target { name: "tally", addr: public, secret: Some(secret), clicks: Arc::new(sample.clone()) },
        ));
    }
    let mut runs: Vec<Vec<(f64, u64, u64)>> = vec![Vec::new(), Vec::new()];
    for pair in 0..2 {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (ok, errors, h, secs) = run(&targets[i].1, Workload::Conversions, connections, duration, None).await;
            assert_eq!(errors, 0, "no conversion refused");
            runs[i].push((ok as f64 / secs, h.value_at_quantile(0.5), h.value_at_quantile(0.99)));
            println!(
                "pair {pair}: {} stored events: {:.0} conversions/s, p50 {} µs, p99 {} µs",
                2 * stores[i].0,
                ok as f64 / secs,
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99)
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let ratios: Vec<f64> = (0..2).map(|p| runs[1][p].0 / runs[0][p].0).collect();
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let mut rows = Vec::new();
    for (i, (events, dir, _, ready, loaded_rss)) in stores.iter().enumerate() {
        let rss = targets[i].0.id().and_then(rss_mib);
        println!(
            "{events} clicks + {events} conversions: {} conversions/s; RSS {rss:?} MiB (now, peak); store {} MiB",
            runs[i].iter().map(|r| format!("{:.0}", r.0)).collect::<Vec<_>>().join(", "),
            dir_size(&dir.path().join("db")) >> 20
        );
        rows.push(serde_json::json!({
            "clicks": events, "conversions": events,
            "runs": runs[i].iter().map(|r| serde_json::json!({"conversions_per_s": r.0, "p50_us": r.1, "p99_us": r.2})).collect::<Vec<_>>(),
            "rss_mib": rss.map(|r| r.0), "peak_rss_mib": rss.map(|r| r.1),
            "load_rss_mib": loaded_rss.map(|r| r.0), "load_peak_rss_mib": loaded_rss.map(|r| r.1),
            "restart_ready_s": ready.as_secs_f64(),
        }));
    }
    println!(
        "scale: the large store's rate is {} of the small store's (mean {:.0} %; SPEC >= 90 %); restart with {} events: {:.2} s (SPEC <= 2 s)",
        ratios.iter().map(|r| format!("{:.0} %", r * 100.0)).collect::<Vec<_>>().join(", "),
        mean * 100.0,
        2 * n,
        stores[1].3.as_secs_f64()
    );
    for (mut child, _) in targets {
        child.start_kill().unwrap();
        let _ = child.wait().await;
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    let out = target.join("bench");
    let _ = std::fs::create_dir_all(&out);
    let path = out.join(format!("load-scale-{}.json", now_secs()));
    let _ = std::fs::write(
        &path,
        serde_json::to_vec_pretty(&serde_json::json!({"stores": rows, "ratios": ratios, "mean_ratio": mean})).unwrap(),
    );
    println!("written to {}", path.display());
}

/// The bench config with partner `bp` sending a GET postback to `url` on `created`.
fn outbound_config(url: &str) -> String {
    let with_private = CONFIG.replace("[[merchants]]", "[outbound]\nallow_private = true\n[[merchants]]");
    with_private.replace(
        "kind = \"affiliate\"\n[[links]]",
        &format!("kind = \"affiliate\"\noutbound = {{ url = \"{url}\", method = \"GET\" }}\n[[links]]"),
    )
}

/// A local partner endpoint answering 204 to everything; records when each request came
/// and its lag: the conversion id it carries is a ULID whose time is the conversion's
/// receipt.
async fn sink() -> (SocketAddr, Arc<std::sync::Mutex<Vec<(Instant, i64)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<(Instant, i64)>>> = Arc::default();
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let at = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("cid="))
                        .and_then(|t| tally::domain::ids::Ulid::parse(t).ok())
                        .map(|id| id.millis());
                    let lag_ms = at.map_or(-1, |at| {
                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                        now.as_millis() as i64 - at
                    });
                    s.lock().unwrap().push((Instant::now(), lag_ms));
                    async {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder().status(204).body(Empty::<Bytes>::new()).unwrap(),
                        )
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, seen)
}

/// A partner endpoint that accepts connections and never answers.
async fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        }
    });
    addr
}

/// SPEC 13's outbound rows.
async fn outbound(duration: Duration, connections: usize) {
    println!("outbound: {connections} connections, {}s of conversions per run", duration.as_secs());
    // 1. Deliveries to a sink answering 204: conversions for `duration`, then the backlog
    // drains; deliveries/s over the whole time the sink received them.
    let (sink_addr, seen) = sink().await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, _, secret) =
        start_tally_with(dir.path(), &outbound_config(&format!("http://{sink_addr}/pb?cid={{conversion_id}}"))).await;
    let target = Target { name: "tally", addr, secret: Some(secret), clicks: Arc::default() };
    let (ok, errors, _, secs) = run(&target, Workload::Conversions, connections, duration, None).await;
    let started = Instant::now();
    while seen.lock().unwrap().len() < ok as usize && started.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(child);
    let got = seen.lock().unwrap().clone();
    let (first, last) = (got.first().map(|g| g.0), got.last().map(|g| g.0));
    let span = match (first, last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.001),
        _ => f64::NAN,
    };
    let mut lag = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).unwrap();
    for (_, l) in &got {
        if *l >= 0 {
            lag.record(*l as u64).ok();
        }
    }
    println!(
        "sink (204): {ok} conversions ({:.0}/s, {errors} errors); {} deliveries in {span:.1}s = {:.0} deliveries/s (SPEC: >= 5000); lag p50 {} ms, p99 {} ms, max {} ms",
        ok as f64 / secs,
        got.len(),
        got.len() as f64 / span,
        lag.value_at_quantile(0.5),
        lag.value_at_quantile(0.99),
        lag.max()
    );

    // 1b. The lag when deliveries keep up: conversions at a steady 2,000/s (open loop).
    let (sink_addr, seen) = sink().await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, _, secret) =
        start_tally_with(dir.path(), &outbound_config(&format!("http://{sink_addr}/pb?cid={{conversion_id}}"))).await;
    let target = Target { name: "tally", addr, secret: Some(secret), clicks: Arc::default() };
    let (ok, _, _, _) = run(&target, Workload::Conversions, connections, duration, Some(2000.0)).await;
    let started = Instant::now();
    while seen.lock().unwrap().len() < ok as usize && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(child);
    let mut lag = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).unwrap();
    for (_, l) in seen.lock().unwrap().iter().filter(|(_, l)| *l >= 0) {
        lag.record(*l as u64).ok();
    }
    println!(
        "sink (204) at 2000 conversions/s: {ok} conversions, {} delivered; lag p50 {} ms, p99 {} ms, max {} ms",
        lag.len(),
        lag.value_at_quantile(0.5),
        lag.value_at_quantile(0.99),
        lag.max()
    );

    // 2. Every endpoint dead: conversions/s against the same run without outbound, in
    // interleaved pairs (the order alternates: the second run of a pair pays for the first
    // one's page-cache writeback).
    let hole = black_hole().await;
    let configs = [CONFIG.to_string(), outbound_config(&format!("http://{hole}/pb?t={{txn_id}}"))];
    let mut ratios = Vec::new();
    for round in 0..4 {
        let mut rps = [0.0; 2];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let _ = std::process::Command::new("sync").status();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let dir = tempfile::tempdir().unwrap();
            let (child, addr, _, secret) = start_tally_with(dir.path(), &configs[i]).await;
            let target = Target { name: "tally", addr, secret: Some(secret), clicks: Arc::default() };
            let (ok, _, _, secs) = run(&target, Workload::Conversions, connections, duration, None).await;
            rps[i] = ok as f64 / secs;
            drop(child);
        }
        println!(
            "dead endpoints, pair {}: without outbound {:.0}/s, with every endpoint dead {:.0}/s: {:.0}% (SPEC: >= 95%)",
            round + 1,
            rps[0],
            rps[1],
            rps[1] / rps[0] * 100.0
        );
        ratios.push(rps[1] / rps[0]);
    }
    println!("dead endpoints: mean ratio {:.0}%", ratios.iter().sum::<f64>() / ratios.len() as f64 * 100.0);
}
