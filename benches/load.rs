//! Load benchmark: tally side by side with a bare hyper server that answers 204, driven
//! by the same client with the same connections and duration.
//!
//! `cargo bench --bench load -- [--duration SECS] [--connections N] [--workload NAME] [--open-loop]`
//! Workloads: clicks, conversions (unique txn_ids, durability fsync), duplicates, mixed
//! (90 % clicks / 10 % conversions), all (default). Needs the release binary:
//! `cargo build --release` first (the bench target does not build it).
//! Prints a table and writes JSON to `$CARGO_TARGET_DIR/bench/load-<unix>.json`.

#![allow(clippy::disallowed_methods)] // the load client reads its own responses

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

struct Target {
    name: &'static str,
    addr: SocketAddr,
    secret: Option<Arc<tally::signing::WebhookSecret>>,
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
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

async fn bare_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
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
    });
    addr
}

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

fn tally_binary() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    let bin = target.join("release").join("tally");
    assert!(bin.exists(), "{} is missing: run `cargo build --release` first", bin.display());
    bin
}

async fn start_tally(dir: &std::path::Path) -> (tokio::process::Child, SocketAddr, Arc<tally::signing::WebhookSecret>) {
    let config = dir.join("tally.toml");
    let secret_file = dir.join("bench.whsec");
    std::fs::write(&config, CONFIG.replace("SECRET_FILE", secret_file.to_str().unwrap())).unwrap();
    let addr_file = dir.join("addr.json");
    let child = tokio::process::Command::new(tally_binary())
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("TALLY_DATA_DIR", dir.join("db"))
        .env("TALLY_ADDR_FILE", &addr_file)
        .env("TALLY_ADMIN_TOKEN", "bench-admin-token-0123456789")
        .kill_on_drop(true)
        .spawn()
        .expect("start tally");
    let started = Instant::now();
    let public = loop {
        if let Ok(Ok(v)) = std::fs::read_to_string(&addr_file).map(|t| serde_json::from_str::<serde_json::Value>(&t)) {
            break v["public"].as_str().unwrap().parse().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "tally did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secret = tally::signing::WebhookSecret::parse(&std::fs::read_to_string(secret_file).unwrap()).unwrap();
    (child, public, Arc::new(secret))
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
    let click = workload == Workload::Clicks || (workload == Workload::Mixed && n % 10 != 0);
    let builder = hyper::Request::builder().header("host", target.addr.to_string());
    if click {
        return builder
            .method("GET")
            .uri(format!("/c/bench-link?sub1=c{conn}"))
            .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let txn = if workload == Workload::Duplicates { format!("dup-{}", n % 100) } else { format!("t{ts}-{conn}-{n}") };
    let body = format!(r#"{{"txn_id":"{txn}","amount":"49.90","currency":"USD","partner_id":"bp"}}"#);
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
        let target = Target { name: target.name, addr: target.addr, secret: target.secret.clone() };
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
                        if (200..400).contains(&status) {
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--bench") && arg("--workload").is_none() && std::env::var("TALLY_LOAD").is_err() {
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
    let bare = Target { name: "bare-hyper", addr: bare_server().await, secret: None };
    let (child, tally_addr, secret) = start_tally(dir.path()).await;
    let tally_pid = child.id();
    let tally = Target { name: "tally", addr: tally_addr, secret: Some(secret) };

    let open_loop = std::env::args().any(|a| a == "--open-loop");
    println!(
        "{connections} connections, {}s per run, {}",
        duration.as_secs(),
        if open_loop { "open loop at half the bare server's closed-loop maximum" } else { "closed loop" }
    );
    println!(
        "{:<12} {:<11} {:>10} {:>7} {:>10} {:>8} {:>8} {:>9} {:>8}",
        "workload", "target", "requests", "errors", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "ratio"
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
            let (ok, errors, h, secs) = run(target, w, connections, duration, rate).await;
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
            };
            println!(
                "{:<12} {:<11} {:>10} {:>7} {:>10.0} {:>8} {:>8} {:>9} {:>8}",
                row.workload,
                row.target,
                row.requests,
                row.errors,
                row.rps,
                row.p50_us,
                row.p99_us,
                row.p999_us,
                row.ratio_to_bare.map(|r| format!("{:.0}%", r * 100.0)).unwrap_or_else(|| "-".into())
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
}
