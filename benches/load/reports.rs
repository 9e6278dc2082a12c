//! SPEC 13's report rows: the 30-day partner report's latency with many stored clicks
//! against an empty store, the ledger export's rate and memory, and what keeping the
//! rollups costs clicks and conversions (interleaved pairs, rollups on and off).

use super::*;

/// One admin GET on a fresh connection; the status and the whole body.
pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> (u16, Bytes) {
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", admin.to_string())
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// `YYYY-MM-DD` of a time.
fn day(ms: i64) -> String {
    tally::domain::clock::format_rfc3339(ms)[..10].to_string()
}

fn bench_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(std::env::var("TALLY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap()
}

/// The 30-day partner report in `Europe/Berlin` (every day read as hours and quarters),
/// 20 warm-up and 300 timed requests one after another: with no clicks stored, with
/// `n / 1000` clicks and with `n` clicks, both spread over the last 20 days (so the two
/// answer the same rows from the same number of cells: only the events differ).
pub async fn partner_report(n: u64) {
    let now = now_secs() * 1000;
    let path = format!(
        "/admin/v1/merchants/bench/reports/partners?from={}&to={}&tz=Europe%2FBerlin",
        day(now - 29 * 86_400_000),
        day(now)
    );
    let mut p99s = Vec::new();
    for clicks in [0, n / 1000, n] {
        let dir = bench_dir();
        if clicks > 0 {
            load_clicks(&dir.path().join("db"), clicks).await;
        }
        let (mut child, _, admin, _) = start_tally_full(dir.path()).await;
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut rows = 0;
        for i in 0..320 {
            let t0 = Instant::now();
            let (status, body) = admin_get(admin, &path).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            if i >= 20 {
                h.record(t0.elapsed().as_micros() as u64).unwrap();
            }
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            rows = v["rows"].as_array().map_or(0, Vec::len);
            if clicks > 0 && i == 0 {
                let total: i64 = v["rows"].as_array().unwrap().iter().map(|r| r["clicks"].as_i64().unwrap()).sum();
                assert_eq!(total as u64, clicks, "the report counts every stored click");
            }
        }
        println!(
            "30-day partner report, {clicks} stored clicks: {rows} rows, p50 {} µs, p99 {} µs, max {} µs",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
        p99s.push(h.value_at_quantile(0.99));
        child.start_kill().unwrap();
        let _ = child.wait().await;
        if clicks == n {
            // What an upgrade or `tally rollups rebuild` costs on this store.
            let started = Instant::now();
            let out = std::process::Command::new(tally_binary())
                .args(["rollups", "rebuild"])
                .current_dir(dir.path())
                .env("TALLY_DATA_DIR", dir.path().join("db"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            println!(
                "tally rollups rebuild over {clicks} clicks: {:.1} s ({})",
                started.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    println!(
        "p99 with {n} clicks / p99 with {} clicks (same rows): {:.2}; / p99 empty: {:.2} (SPEC: p99 <= 50 ms, the same within noise)",
        n / 1000,
        p99s[2] as f64 / p99s[1].max(1) as f64,
        p99s[2] as f64 / p99s[0].max(1) as f64
    );
}

/// Stores `n` conversions of partner `bp` (one commission entry each), then streams the
/// whole ledger once, sampling tally's RSS.
pub async fn export(n: u64) {
    let dir = bench_dir();
    let (mut child, public, admin, secret) = start_tally_full(dir.path()).await;
    let pid = child.id().unwrap();
    store_conversions(public, &secret, n).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, metrics) = admin_get(admin, "/metrics").await;
    let storage: Vec<String> = String::from_utf8_lossy(&metrics)
        .lines()
        .filter(|l| {
            ["tally_storage_memtable_bytes", "tally_storage_block_cache_bytes", "tally_storage_table_readers_bytes"]
                .iter()
                .any(|m| l.starts_with(m))
        })
        .map(|l| {
            let (name, v) = l.split_once(' ').unwrap_or((l, "0"));
            format!(
                "{} {} MiB",
                name.trim_start_matches("tally_storage_"),
                v.parse::<f64>().unwrap_or(0.0) as u64 >> 20
            )
        })
        .collect();
    println!("after the load: {}", storage.join(", "));
    let before = rss_mib(pid).map_or(0, |r| r.0);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                if let Some((rss, _)) = rss_mib(pid) {
                    peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/admin/v1/merchants/bench/ledger")
        .header("host", admin.to_string())
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("the export completes").into_data() {
            lines += data.iter().filter(|b| **b == b'\n').count() as u64;
            bytes += data.len() as u64;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    sampling.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(lines, n, "every entry exported once");
    println!(
        "ledger export: {lines} entries ({} MiB) in {secs:.1} s = {:.0} entries/s (SPEC >= 200,000); RSS {before} MiB before, peak {peak} MiB during: growth {} MiB (SPEC <= 32)",
        bytes >> 20,
        lines as f64 / secs,
        peak.saturating_sub(before)
    );
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// Clicks and conversions with rollups on and off, four pairs, the order alternating
/// within each pair (on-off, off-on, ...) so drift on a shared machine cancels out.
pub async fn rollups_ab(duration: Duration, connections: usize) {
    let mut ratios: Vec<(f64, f64)> = Vec::new();
    println!("{:<5} {:<8} {:>12} {:>16}", "pair", "rollups", "clicks/s", "conversions/s");
    for pair in 0..4 {
        let order = if pair % 2 == 0 { ["true", "false"] } else { ["false", "true"] };
        let mut got = std::collections::BTreeMap::new();
        for setting in order {
            let dir = bench_dir();
            let (mut child, public, _, secret) =
                start_tally_env(dir.path(), CONFIG, &[("TALLY_REPORTS__ROLLUPS", setting)]).await;
            let t = Target { name: "tally", addr: public, secret: Some(secret), clicks: Arc::new(Vec::new()) };
            let (clicks, _, _, s1) = run(&t, Workload::Clicks, connections, duration, None).await;
            let (convs, _, _, s2) = run(&t, Workload::Conversions, connections, duration, None).await;
            let (c, v) = (clicks as f64 / s1, convs as f64 / s2);
            println!("{pair:<5} {setting:<8} {c:>12.0} {v:>16.0}");
            got.insert(setting, (c, v));
            child.start_kill().unwrap();
            let _ = child.wait().await;
        }
        let (on, off) = (got["true"], got["false"]);
        ratios.push((on.0 / off.0, on.1 / off.1));
    }
    let mean = |f: fn(&(f64, f64)) -> f64| ratios.iter().map(f).sum::<f64>() / ratios.len() as f64;
    println!(
        "rollups on / off, mean of {} pairs: clicks {:.1} %, conversions {:.1} %",
        ratios.len(),
        mean(|r| r.0) * 100.0,
        mean(|r| r.1) * 100.0
    );
}
