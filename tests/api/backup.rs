//! Backups while tally serves and their restore (SPEC 15): every conversion acknowledged
//! before the backup began is in the restored store, with its ledger.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::sync::Mutex;

use crate::helpers::*;

fn config(backups: &std::path::Path) -> String {
    format!(
        r#"
public_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[log]
level = "warn"
format = "json"
[limits]
merchant_per_second = 1000000
merchant_burst = 1000000
[backup]
dir = "{}"
keep = 2
[[merchants]]
id = "crash"
name = "Backup Shop"
secret_file = "SECRET_FILE"
default_plan_id = "standard"
[[plans]]
merchant_id = "crash"
id = "standard"
currency = "USD"
rules = [{{ event = "lead", flat = "1.00" }}]
[[partners]]
merchant_id = "crash"
id = "cp"
name = "Backup Partner"
kind = "affiliate"
"#,
        backups.display()
    )
}

fn tally_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("tally runs")
}

/// 16 clients send conversions until `stop`; each `201` is recorded with when it came.
fn load(
    key: &Arc<tally::signing::WebhookSecret>,
    public: &str,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    acked: &Arc<Mutex<Vec<(String, Instant)>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..16)
        .map(|c| {
            let (key, stop, acked) = (Arc::clone(key), Arc::clone(stop), Arc::clone(acked));
            let url = format!("http://{public}/v1/merchants/crash/conversions");
            tokio::spawn(async move {
                let http = client();
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let txn = format!("b-{c}-{i}");
                    let body = format!(r#"{{"txn_id":"{txn}","event":"lead","partner_id":"cp"}}"#);
                    let mut headers = vec![("content-type", "application/json".to_string())];
                    headers.extend(webhook_headers(&key, &format!("msg_{txn}"), unix_now(), body.as_bytes()));
                    let r = send(&http, Method::POST, url.clone(), &headers, body.into_bytes()).await;
                    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
                    acked.lock().await.push((txn, Instant::now()));
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_acknowledged_conversion_with_its_ledger() {
    let _heavy = heavy_test().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir.path().join("backups"));
    let mut proc = start_binary(dir.path(), &config).await;
    let secret = std::fs::read_to_string(dir.path().join("crash.whsec")).unwrap().trim().to_string();
    let key = Arc::new(tally::signing::WebhookSecret::parse(&secret).unwrap());
    let (stop, acked) = (Arc::new(std::sync::atomic::AtomicBool::new(false)), Arc::default());
    let clients = load(&key, &proc.public, &stop, &acked);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // `tally backup` while tally serves: it asks the running tally.
    let began = Instant::now();
    let backup = dir.path().join("b1");
    let conf = dir.path().join("tally.toml");
    let (admin, conf_s, backup_s) =
        (proc.admin.clone(), conf.to_str().unwrap().to_string(), backup.to_str().unwrap().to_string());
    let out = tokio::task::spawn_blocking(move || {
        tally_cli(
            &["backup", "--config", &conf_s, "--to", &backup_s],
            &[("TALLY_ADMIN_ADDR", &admin), ("TALLY_ADMIN_TOKEN", ADMIN_TOKEN)],
        )
    })
    .await
    .unwrap();
    let backup_took = began.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("taken online"), "{}", String::from_utf8_lossy(&out.stdout));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().await.clone();
    let before: Vec<String> = acked.iter().filter(|(_, at)| *at < began).map(|(t, _)| t.clone()).collect();
    assert!(before.len() > 50, "the load ran before the backup ({})", before.len());
    assert!(acked.len() > before.len(), "and went on during and after it");

    // Restore into a new data directory and start tally on it.
    let restored = dir.path().join("restored");
    let out = tally_cli(
        &["restore", "--config", conf.to_str().unwrap(), "--from", backup.to_str().unwrap()],
        &[("TALLY_DATA_DIR", restored.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tally_cli(
        &["restore", "--config", conf.to_str().unwrap(), "--from", backup.to_str().unwrap()],
        &[("TALLY_DATA_DIR", restored.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(2), "a restore never overwrites a data directory");
    let second = tempfile::tempdir().unwrap();
    let copy = start_binary_on(second.path(), &restored, &config).await;
    let checkers: Vec<_> = before
        .chunks(before.len().div_ceil(8))
        .map(|chunk| {
            let (chunk, admin) = (chunk.to_vec(), copy.admin.clone());
            tokio::spawn(async move {
                let http = client();
                let auth = vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))];
                for txn in chunk {
                    let url = format!("http://{admin}/admin/v1/merchants/crash/conversions/{txn}");
                    let r = send(&http, Method::GET, url, &auth, Vec::new()).await;
                    assert_eq!(r.status, 200, "{txn} acknowledged before the backup is missing from it");
                    let ledger = r.json()["ledger"].as_array().cloned().unwrap_or_default();
                    assert_eq!(ledger.len(), 1, "{txn}: its commission entry");
                }
            })
        })
        .collect();
    for c in checkers {
        c.await.unwrap();
    }
    let http = client();
    let body = r#"{"txn_id":"after-restore","event":"lead","partner_id":"cp"}"#;
    let mut headers = vec![("content-type", "application/json".to_string())];
    headers.extend(webhook_headers(&key, "msg_after_restore", unix_now(), body.as_bytes()));
    let url = format!("http://{}/v1/merchants/crash/conversions", copy.public);
    let r = send(&http, Method::POST, url, &headers, body.as_bytes().to_vec()).await;
    assert_eq!(r.status, 201, "the restored tally takes new conversions: {}", String::from_utf8_lossy(&r.body));
    println!(
        "backup under load: {} conversions acknowledged before it, all restored with their ledger; `tally backup` took {backup_took:?}",
        before.len()
    );

    // With tally stopped, `tally backup` opens the store itself.
    proc.child.kill().await.unwrap();
    let offline = dir.path().join("b2");
    let out = tally_cli(
        &["backup", "--config", conf.to_str().unwrap(), "--to", offline.to_str().unwrap()],
        &[("TALLY_DATA_DIR", dir.path().join("db").to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"));
    assert!(offline.join("tally-backup.json").exists());
}

#[tokio::test]
async fn named_backups_over_the_admin_api_keep_the_newest() {
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().to_path_buf();
    let app = TestApp::spawn_with(
        move |s| {
            s.backup.dir = dir;
            s.backup.keep = 2;
        },
        Arc::new(tally::domain::clock::SystemClock),
    )
    .await;
    app.demo().await;
    let mut paths = Vec::new();
    for _ in 0..3 {
        let r = app.admin(Method::POST, "/admin/v1/backups", None).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        paths.push(r.json()["path"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!std::path::Path::new(&paths[0]).exists(), "the oldest is deleted beyond keep = 2");
    assert!(paths[1..].iter().all(|p| std::path::Path::new(p).join("tally-backup.json").exists()));
    let r = app.request(Method::POST, format!("http://{}/admin/v1/backups", app.admin), &[], Vec::new()).await;
    assert_eq!(r.status, 401, "backups need the admin token");
    let r = app.admin(Method::GET, "/admin/v1/backups", None).await;
    assert_eq!(r.status, 405);
}
