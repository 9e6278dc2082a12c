//! Metrics (SPEC 12), health, and graceful shutdown.

use std::io::Write;
use std::process::{Command, Stdio};

use http::Method;

use crate::helpers::TestApp;

#[tokio::test]
async fn metrics_pass_promtool_and_count_what_happened() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let click = app.click("spring").await;
    let body = format!(r#"{{"txn_id":"m-1","amount":"5","currency":"USD","click_id":"{click}"}}"#);
    assert_eq!(app.convert("shop", &secret, &body).await.status, 201);
    assert_eq!(app.convert("shop", &secret, &body).await.status, 200);
    assert_eq!(app.get("/c/missing", &[]).await.status, 404);

    let r = app.request(Method::GET, format!("http://{}/metrics", app.admin), &[], Vec::new()).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for expected in [
        "tally_clicks_total{outcome=\"recorded\"} 1",
        "tally_clicks_total{outcome=\"not_found\"} 1",
        "tally_conversions_total{outcome=\"created\"} 1",
        "tally_conversions_total{outcome=\"duplicate\"} 1",
        "tally_attributions_total{credit=\"sourced\",rule=\"click\"} 1",
        "tally_ledger_entries_total{kind=\"commission\"} 1",
        "tally_http_requests_total{listener=\"public\",route=\"click\",status=\"302\"} 1",
        "tally_storage_fsync_duration_seconds_count",
        "tally_storage_write_batch_size_count",
        "tally_storage_sst_bytes",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(text.contains(expected), "missing {expected}");
    }
    assert!(!text.contains("spring") && !text.contains("ann"), "no ids as label values");

    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/grafana-dashboard.json")).unwrap();
    let names: std::collections::BTreeSet<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tally_") || w.starts_with("process_"))
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        assert!(text.contains(&format!("# TYPE {base} ")), "the dashboard uses {name}, which /metrics does not export");
    }

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed: apt-get install -y prometheus (scripts/test installs it)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn shutdown_finishes_and_data_survives_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let clock: std::sync::Arc<dyn tally::domain::clock::Clock> = std::sync::Arc::new(tally::domain::clock::SystemClock);
    let mut app = TestApp::spawn_with(|s| s.data_dir = data.join("db"), clock.clone()).await;
    let secret = app.demo().await;
    assert_eq!(
        app.convert("shop", &secret, r#"{"txn_id":"keep-1","event":"lead","partner_id":"ann"}"#).await.status,
        201
    );
    app.stop().await;

    let again = TestApp::spawn_with(|s| s.data_dir = data.join("db"), clock).await;
    assert_eq!(
        again.convert("shop", &secret, r#"{"txn_id":"keep-1","event":"lead","partner_id":"ann"}"#).await.status,
        200
    );
    assert_eq!(again.get("/c/spring", &[]).await.status, 302, "entities are reloaded from RocksDB");
}
