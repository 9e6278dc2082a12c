//! `kill -9` under load: every acknowledged conversion is there after a restart (SPEC 7).

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::sync::Mutex;

use crate::helpers::{client, heavy_test, send, start_binary, ADMIN_TOKEN};

const CONFIG: &str = r#"
public_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[log]
level = "warn"
format = "json"
# This test is about durability, not limits: 32 clients on one merchant exceed the default.
[limits]
merchant_per_second = 1000000
merchant_burst = 1000000
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

#[tokio::test]
async fn kill_9_under_load_loses_no_acknowledged_conversion() {
    let _heavy = heavy_test().await;
    let dir = tempfile::tempdir().unwrap();
    let mut proc = start_binary(dir.path(), CONFIG).await;
    let secret = std::fs::read_to_string(dir.path().join("crash.whsec")).unwrap().trim().to_string();
    let key = Arc::new(tally::signing::WebhookSecret::parse(&secret).unwrap());
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let url = format!("http://{}/v1/merchants/crash/conversions", proc.public);

    let mut clients = Vec::new();
    for c in 0..32 {
        let (key, acked, url) = (Arc::clone(&key), Arc::clone(&acked), url.clone());
        clients.push(tokio::spawn(async move {
            let http = client();
            for i in 0.. {
                let txn = format!("c{c}-{i}");
                let body = format!(r#"{{"txn_id":"{txn}","event":"lead","partner_id":"cp"}}"#);
                let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
                let id = format!("msg_{txn}");
                let headers = vec![
                    ("webhook-id", id.clone()),
                    ("webhook-timestamp", ts.to_string()),
                    ("webhook-signature", tally::signing::sign(key.key(), &id, ts, body.as_bytes())),
                ];
                let req = send_checked(&http, url.clone(), headers, body);
                match tokio::time::timeout(Duration::from_secs(5), req).await {
                    Ok(Some(201)) => acked.lock().await.push(txn),
                    Ok(Some(s)) => panic!("unexpected status {s}"),
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proc.child.start_kill().unwrap();
    proc.child.wait().await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().await.clone();
    assert!(acked.len() > 100, "the load ran ({} acknowledged)", acked.len());

    let proc = start_binary(dir.path(), CONFIG).await;
    let http = client();
    let auth = vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))];
    let mut missing: Vec<&String> = Vec::new();
    for txn in &acked {
        let r = send(
            &http,
            Method::GET,
            format!("http://{}/admin/v1/merchants/crash/conversions/{txn}", proc.admin),
            &auth,
            Vec::new(),
        )
        .await;
        if r.status != 200 {
            missing.push(txn);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged conversions lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    println!("kill -9: {} acknowledged conversions, all found after restart", acked.len());
}

/// Sends one request; `None` when the connection failed (the server was killed).
async fn send_checked(
    http: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
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
