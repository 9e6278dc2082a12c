//! `kill -9` under load, in a loop: every acknowledged conversion is there after a restart
//! and no rejected one is (SPEC 7).

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::sync::Mutex;

use crate::helpers::{client, heavy_test, send, start_binary, unix_now, webhook_headers, ADMIN_TOKEN};

const CONFIG: &str = r#"
public_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[log]
level = "warn"
format = "json"
# This test is about durability, not limits: 16 clients on one merchant, a tenth of them
# with bad signatures, exceed the defaults.
[limits]
merchant_per_second = 1000000
merchant_burst = 1000000
failures_per_ip_per_minute = 1000000
[[merchants]]
id = "crash"
name = "Crash Shop"
secret_file = "SECRET_FILE"
[[partners]]
merchant_id = "crash"
id = "cp"
name = "Crash Partner"
kind = "affiliate"
"#;

/// What the clients were told during one run.
#[derive(Default)]
struct Outcomes {
    /// Answered `201`: must be there after any crash.
    acked: Vec<String>,
    /// Answered `4xx`: must never be there.
    rejected: Vec<String>,
}

/// 16 clients send conversions (every 10th unsigned correctly, every 10th invalid) until
/// the server dies.
fn load(
    key: &Arc<tally::signing::WebhookSecret>,
    url: &str,
    cycle: usize,
    out: &Arc<Mutex<Outcomes>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..16)
        .map(|c| {
            let (key, out, url) = (Arc::clone(key), Arc::clone(out), url.to_string());
            tokio::spawn(async move {
                let http = client();
                for i in 0.. {
                    let txn = format!("k{cycle}-{c}-{i}");
                    let body = if i % 10 == 3 {
                        format!(r#"{{"txn_id":"{txn}","event":"sale","amount":"10.00","partner_id":"cp"}}"#)
                    } else {
                        format!(r#"{{"txn_id":"{txn}","event":"lead","partner_id":"cp"}}"#)
                    };
                    let signed = if i % 10 == 7 { "tampered" } else { body.as_str() };
                    let headers = webhook_headers(&key, &format!("msg_{txn}"), unix_now(), signed.as_bytes()).to_vec();
                    let req = send_checked(&http, url.clone(), headers, body);
                    match tokio::time::timeout(Duration::from_secs(5), req).await {
                        Ok(Some(201)) => out.lock().await.acked.push(txn),
                        Ok(Some(401 | 422)) => out.lock().await.rejected.push(txn),
                        Ok(Some(s)) => panic!("unexpected status {s} for {txn}"),
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// The txn ids of `txns` whose `GET` answers `status`.
async fn with_status(admin: &str, txns: &[String], status: u16) -> Vec<String> {
    let txns = Arc::new(txns.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let found: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (txns, next, found, admin) =
                (Arc::clone(&txns), Arc::clone(&next), Arc::clone(&found), admin.to_string());
            tokio::spawn(async move {
                let http = client();
                let auth = vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))];
                while let Some(txn) = txns.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    let url = format!("http://{admin}/admin/v1/merchants/crash/conversions/{txn}");
                    if send(&http, Method::GET, url, &auth, Vec::new()).await.status == status {
                        found.lock().await.push(txn.clone());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let found = found.lock().await.clone();
    found
}

/// `kill -9` at a random moment under load, again and again (20 cycles; set
/// `TALLY_KILL_CYCLES` for more): after every restart each acknowledged conversion is
/// there and no rejected one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_loses_no_acknowledged_conversion_and_stores_no_rejected_one() {
    let _heavy = heavy_test().await;
    let cycles: usize = std::env::var("TALLY_KILL_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut proc = start_binary(dir.path(), CONFIG).await;
    let secret = std::fs::read_to_string(dir.path().join("crash.whsec")).unwrap().trim().to_string();
    let key = Arc::new(tally::signing::WebhookSecret::parse(&secret).unwrap());
    let (mut total_acked, mut total_rejected) = (0, 0);
    let started = std::time::Instant::now();
    for cycle in 0..cycles {
        let out: Arc<Mutex<Outcomes>> = Arc::default();
        let url = format!("http://{}/v1/merchants/crash/conversions", proc.public);
        let clients = load(&key, &url, cycle, &out);
        let run_for = 300 + rand::random::<u64>() % 700;
        tokio::time::sleep(Duration::from_millis(run_for)).await;
        proc.child.start_kill().unwrap();
        proc.child.wait().await.unwrap();
        for c in clients {
            c.await.unwrap();
        }
        let out = std::mem::take(&mut *out.lock().await);
        assert!(out.acked.len() > 20, "cycle {cycle}: the load ran ({} acknowledged)", out.acked.len());

        proc = start_binary(dir.path(), CONFIG).await;
        let missing = with_status(&proc.admin, &out.acked, 404).await;
        assert!(
            missing.is_empty(),
            "cycle {cycle}: {} of {} acknowledged conversions lost: {:?}",
            missing.len(),
            out.acked.len(),
            &missing[..missing.len().min(10)]
        );
        let stored = with_status(&proc.admin, &out.rejected, 200).await;
        assert!(stored.is_empty(), "cycle {cycle}: rejected conversions stored: {stored:?}");
        total_acked += out.acked.len();
        total_rejected += out.rejected.len();
    }
    println!(
        "kill -9 loop: {cycles} cycles in {:.0?}, {total_acked} acknowledged conversions all found, {total_rejected} rejected ones all absent",
        started.elapsed()
    );
}

/// Sends one request; `None` when the connection failed (the server was killed).
async fn send_checked(
    http: &crate::helpers::HttpClient,
    url: String,
    headers: Vec<(&str, String)>,
    body: String,
) -> Option<u16> {
    let mut req = http::Request::builder().method(Method::POST).uri(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body))).ok()?;
    let resp = http.request(req).await.ok()?;
    Some(resp.status().as_u16())
}
