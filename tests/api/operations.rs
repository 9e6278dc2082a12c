//! What an operator meets running tally: opaque metadata that never crashes a view,
//! stray `TALLY_*` variables, request ids in logs, metrics of what hyper refuses, a
//! private data directory and clients behind a proxy.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use tally::backend::BackendExt;

use http::Method;
use serde_json::json;

use crate::helpers::*;

fn nested(depth: usize) -> String {
    format!("{}\"x\"{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deep_metadata_is_refused_at_intake_and_stored_metadata_is_returned_as_is() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    // 128 levels (under 4 KiB) used to be stored and then crash every view of it.
    let body = format!(r#"{{"txn_id":"deep","event":"lead","metadata":{}}}"#, nested(128));
    let r = app.convert("shop", &secret, &body).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["field"], "metadata");
    assert_eq!(r.json()["code"], "invalid_field");
    assert_eq!(app.stored_conversions("shop").await, 0, "nothing is stored for a refused body");

    // The deepest accepted nesting, with odd spacing, comes back byte for byte.
    let metadata = format!("{{ \"plan\" :\"pro\",\"n\":{} }}", nested(31));
    let body = format!(r#"{{"txn_id":"ok","event":"lead","metadata":{metadata}}}"#);
    let r = app.convert("shop", &secret, &body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(text.contains(&format!("\"metadata\":{metadata}")), "{text}");

    let view = app.admin(Method::GET, "/admin/v1/merchants/shop/conversions/ok", None).await;
    assert_eq!(view.status, 200, "{}", String::from_utf8_lossy(&view.body));
    assert!(String::from_utf8_lossy(&view.body).contains(&format!("\"metadata\":{metadata}")));
    let approve = app.adjust("shop", &secret, r#"{"adjustment_id":"a1","txn_id":"ok","kind":"approve"}"#).await;
    assert_eq!(approve.status, 201, "{}", String::from_utf8_lossy(&approve.body));
    assert!(String::from_utf8_lossy(&approve.body).contains(&format!("\"metadata\":{metadata}")));
    assert_eq!(approve.json()["status"], "approved");
}

#[tokio::test]
async fn every_answer_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let r = app.get("/c/none", &[("x-request-id", "trace-42.a".to_string())]).await;
    assert_eq!(r.header("x-request-id"), Some("trace-42.a"));
    let r = app.get("/c/none", &[("x-request-id", "bad id with spaces".to_string())]).await;
    let minted = r.header("x-request-id").expect("minted");
    assert_eq!(minted.len(), 32, "{minted}");
    let r = app.admin(Method::GET, "/healthz", None).await;
    assert!(r.header("x-request-id").is_some());
}

#[tokio::test]
async fn metrics_count_routes_build_info_stalls_and_precise_cpu() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let r = app.admin(Method::GET, "/admin/v1/merchants/shop/accounts/acme.com", None).await;
    assert_ne!(r.status, 0);
    let r = app
        .admin(Method::POST, "/admin/v1/merchants/shop/accounts/acme.com:reassign", Some(json!({"partner_id": "ann"})))
        .await;
    assert_ne!(r.status, 0);
    let text = String::from_utf8_lossy(
        &app.request(Method::GET, format!("http://{}/metrics", app.admin), &[], Vec::new()).await.body,
    )
    .into_owned();
    assert!(text.contains("route=\"admin_account\""), "account reads have their route");
    assert!(text.contains("route=\"admin_reassign\""), "reassigns have their route");
    assert!(text.contains(&format!("tally_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
    assert!(text.contains("tally_storage_write_stalls_total{kind=\"delay\"} 0"));
    assert!(text.contains("tally_storage_write_stalls_total{kind=\"stop\"} 0"));
    assert!(text.contains("tally_ratelimit_keys_max "));
    assert!(text.contains("tally_ratelimit_fullest_table_keys "));
    let cpu: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .expect("process_cpu_seconds_total")
        .parse()
        .unwrap();
    assert!(cpu > 0.0 && cpu.fract() != 0.0, "CPU seconds are precise, not whole: {cpu}");
}

/// Sends raw bytes on a new connection and returns what came back.
fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn requests_hyper_refuses_by_itself_are_counted() {
    let app =
        TestApp::spawn_with(|s| s.http.header_read_timeout_ms = 300, Arc::new(tally::domain::clock::SystemClock)).await;
    let public = app.public;
    let answers = tokio::task::spawn_blocking(move || {
        let malformed = raw(public, b"GET /c/x HTTP/1.1\r\nHost x\r\n\r\n");
        let huge = format!("GET /c/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(40 * 1024));
        let too_large = raw(public, huge.as_bytes());
        // Half a head, then silence past the header read timeout.
        let slow = raw(public, b"GET /c/x HTTP/1.1\r\nHost: x\r\n");
        (malformed, too_large, slow)
    })
    .await
    .unwrap();
    assert!(answers.0.starts_with("HTTP/1.1 400"), "{}", answers.0);
    assert!(answers.1.starts_with("HTTP/1.1 431"), "{}", answers.1);
    assert!(answers.2.is_empty(), "a header timeout closes the connection: {}", answers.2);
    for (route, status) in
        [("http_malformed", "400"), ("http_headers_too_large", "431"), ("http_header_timeout", "408")]
    {
        let line = format!("tally_http_requests_total{{listener=\"public\",route=\"{route}\",status=\"{status}\"}}");
        assert_eq!(metric(&app, &line).await, 1.0, "{line}");
    }
}

#[tokio::test]
async fn the_data_directory_and_its_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");
    // What an earlier version left: a world-readable directory and file.
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("old-notes"), "x").unwrap();
    std::fs::set_permissions(data.join("old-notes"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut app = TestApp::spawn_with(
        {
            let data = data.clone();
            move |s| s.data_dir = data
        },
        Arc::new(tally::domain::clock::SystemClock),
    )
    .await;
    let secret = app.demo().await;
    let r = app.convert("shop", &secret, r#"{"txn_id":"perm-1","event":"lead"}"#).await;
    assert_eq!(r.status, 201);
    app.stop().await;
    let mut seen = 0;
    let mut stack = vec![data.clone()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", path.display());
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
            seen += 1;
        }
    }
    assert!(seen > 5, "RocksDB's files were checked ({seen})");
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_get_their_own_click_budget() {
    let clock = Arc::new(tally::domain::clock::SystemClock);
    let tight = |s: &mut tally::config::Settings| {
        s.limits.clicks_per_ip_per_second = 1;
        s.limits.clicks_burst = 1;
    };
    let behind_proxy = TestApp::spawn_with(
        move |s| {
            tight(s);
            s.http.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        },
        clock.clone(),
    )
    .await;
    behind_proxy.demo().await;
    assert_eq!(click(&behind_proxy, "203.0.113.1").await, 302);
    assert_eq!(click(&behind_proxy, "203.0.113.2").await, 302, "another client behind the same proxy");
    assert_eq!(click(&behind_proxy, "203.0.113.1").await, 429, "the same client is limited");
    // A client cannot escape its budget by prepending addresses of its own.
    assert_eq!(click(&behind_proxy, "198.51.100.7, 203.0.113.1").await, 429);

    let direct = TestApp::spawn_with(tight, clock).await;
    direct.demo().await;
    assert_eq!(click(&direct, "203.0.113.1").await, 302);
    assert_eq!(click(&direct, "203.0.113.2").await, 429, "untrusted X-Forwarded-For is ignored");
}

#[tokio::test]
async fn unknown_tier_fields_reassign_suffixes_and_backup_bodies_are_refused() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let plan = json!({"currency": "USD", "rules": [{"event": "sale", "percent": "10"}],
        "tiers": [{"min_sales": 1, "percent": "12", "bogus": true}]});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/p2", Some(plan)).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["field"], "tiers[0].bogus");

    // `:reassign` is one suffix: `crm-7:reassign:reassign` reassigns the account `crm-7:reassign`.
    let r = app
        .admin(
            Method::POST,
            "/admin/v1/merchants/shop/accounts/crm-7:reassign:reassign",
            Some(json!({"partner_id": "ann", "why": "moved"})),
        )
        .await;
    assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    let moved = app.admin(Method::GET, "/admin/v1/merchants/shop/accounts/crm-7:reassign", None).await;
    assert_eq!(moved.json()["source_of_record"]["partner_id"], "ann", "{}", String::from_utf8_lossy(&moved.body));
    let untouched = app.admin(Method::GET, "/admin/v1/merchants/shop/accounts/crm-7", None).await;
    assert!(untouched.json()["source_of_record"].is_null(), "{}", String::from_utf8_lossy(&untouched.body));

    let auth = |ct: &str| vec![("authorization", format!("Bearer {ADMIN_TOKEN}")), ("content-type", ct.to_string())];
    let url = format!("http://{}/admin/v1/backups", app.admin);
    let r = app.request(Method::POST, url.clone(), &auth("text/plain"), b"hello".to_vec()).await;
    assert_eq!(r.status, 415);
    let r = app.request(Method::POST, url, &auth("application/json"), b"{\"to\":\"/etc\"}".to_vec()).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
}

async fn click(app: &TestApp, xff: &str) -> u16 {
    let headers = vec![("user-agent", BROWSER.to_string()), ("x-forwarded-for", xff.to_string())];
    app.get("/c/spring", &headers).await.status
}

const EMPTY_CONFIG: &str = "[log]\nformat = \"json\"\nlevel = \"debug\"\n";

#[tokio::test]
async fn serve_ignores_stray_tally_variables_and_logs_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TALLY_PORT", "tcp://10.0.0.1:8080"),
        ("TALLY_SERVICE_HOST", "10.0.0.1"),
        ("TALLY_SERVICE_PORT", "8080"),
        ("TALLY_PORT_8080_TCP_ADDR", "10.0.0.1"),
        ("TALLY_PORT_8080_TCP", "tcp://10.0.0.1:8080"),
        // A known key still works.
        ("TALLY_HTTP__MAX_HEADERS", "50"),
    ];
    let mut proc = start_binary_env(dir.path(), &dir.path().join("db"), EMPTY_CONFIG, &[], &env).await;
    let client = client();
    let r = send(
        &client,
        Method::GET,
        format!("http://{}/healthz", proc.admin),
        &[("x-request-id", "req-77".to_string())],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("req-77"));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    proc.child.kill().await.unwrap();
    let log = std::fs::read_to_string(&proc.log).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("ignoring TALLY_* environment variables"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    for (name, _) in &env[..5] {
        assert!(warning.contains(name), "{name} not named in {warning}");
    }
    assert!(!warning.contains("TALLY_HTTP__MAX_HEADERS"));
    assert_eq!(log.matches("ignoring TALLY_*").count(), 1, "warned once");

    let start = log.lines().find(|l| l.contains("tally is starting")).expect("startup line");
    let start: serde_json::Value = serde_json::from_str(start).unwrap();
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    assert!(start["config"].as_str().unwrap().ends_with("tally.toml"));
    assert!(start["data_dir"].as_str().unwrap().ends_with("db"));
    assert_eq!(start["durability"], "fsync");

    let line = log.lines().find(|l| l.contains("req-77") && l.contains("\"request\"")).expect("request line");
    assert_eq!(line.matches("\"target\":").count(), 1, "one target key: {line}");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["path"], "/healthz");
    assert_eq!(v["span"]["request_id"], "req-77");
}

#[tokio::test]
async fn metadata_stored_by_an_earlier_version_never_crashes_a_view() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    // What the intake accepted before it bounded the depth: 128 levels, under 4 KiB.
    let metadata = nested(128);
    let body: tally::domain::conversion::ConversionBody =
        serde_json::from_str(r#"{"txn_id":"old-deep","event":"lead"}"#).unwrap();
    let mut input = body.into_input(app.clock.now_ms()).unwrap();
    input.metadata = Some(metadata.clone());
    let store = app.app.as_ref().unwrap().store().expect("single node");
    let merchant = tally::domain::ids::MerchantId::parse("shop").unwrap();
    store.convert(merchant, input, app.clock.now_ms()).await.unwrap();

    let view = app.admin(Method::GET, "/admin/v1/merchants/shop/conversions/old-deep", None).await;
    assert_eq!(view.status, 200, "{}", String::from_utf8_lossy(&view.body));
    assert!(String::from_utf8_lossy(&view.body).contains(&format!("\"metadata\":{metadata}")));
    for _ in 0..2 {
        // The approval and its retry are both answered, with the stored metadata.
        let r = app
            .post_signed(
                "/v1/merchants/shop/adjustments",
                r#"{"adjustment_id":"a-old","txn_id":"old-deep","kind":"approve"}"#,
                &secret,
                &format!("msg_{}", tally::domain::ids::Ulid::mint(0)),
                app.now_secs(),
            )
            .await;
        assert!(r.status == 201 || r.status == 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(String::from_utf8_lossy(&r.body).contains(&format!("\"metadata\":{metadata}")));
    }
    assert_eq!(metric(&app, "tally_http_handler_panics_total").await, 0.0);
}

#[tokio::test]
async fn outbound_destinations_are_vetted_when_configured() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let put = |url: &str| json!({"name": "Ann's Blog", "kind": "affiliate", "outbound": {"url": url, "method": "GET"}});
    for (url, why) in [
        ("http://127.0.0.1/pb?cid={click_id}", "loopback"),
        ("http://localhost:9/pb", "loopback"),
        ("http://169.254.169.254/latest", "metadata"),
        ("http://[::ffff:10.0.0.1]/pb", "IPv4-mapped"),
        ("http://0x7f000001/pb", "loopback"),
        ("https://tracker.example/pb?c={clickid}", "unknown macro"),
    ] {
        let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(put(url))).await;
        assert_eq!(r.status, 422, "{url}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["field"], "outbound.url", "{url}");
        assert!(r.json()["detail"].as_str().unwrap().contains(why), "{url}: {}", r.json()["detail"]);
    }
    let stored = app.admin(Method::GET, "/admin/v1/merchants/shop/partners/ann", None).await;
    assert!(stored.json()["outbound"].is_null(), "a refused destination is not stored");

    // allow_private lets a local receiver through (tests, private networks), never metadata.
    let private =
        TestApp::spawn_with(|s| s.outbound.allow_private = true, Arc::new(tally::domain::clock::SystemClock)).await;
    private.demo().await;
    let r = private
        .admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(put("http://127.0.0.1:9/pb?cid={click_id}")))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r =
        private.admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(put("http://169.254.169.254/"))).await;
    assert_eq!(r.status, 422);
}
