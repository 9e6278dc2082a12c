//! Standard Webhooks verification over HTTP (SPEC 4.1): windows, hostile signatures,
//! rotation, cross-merchant use, body limit, and real third-party signers.

use std::process::Stdio;

use http::Method;
use tokio::io::AsyncWriteExt;

use crate::helpers::{manual_clock, metric, TestApp};

const BODY: &str = r#"{"txn_id":"sig-1","amount":"10.00","currency":"USD","partner_id":"ann"}"#;
const PATH: &str = "/v1/merchants/shop/conversions";

#[tokio::test]
async fn stale_future_and_hostile_signatures_are_401_and_store_nothing() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let now = app.now_secs();
    let stale = app.post_signed(PATH, BODY, &secret, "msg_a", now - 301).await;
    assert_eq!(stale.status, 401);
    assert_eq!(stale.json()["code"], "signature_invalid");
    assert_eq!(app.post_signed(PATH, BODY, &secret, "msg_b", now + 301).await.status, 401);
    assert_eq!(metric(&app, "tally_signature_failures_total{reason=\"stale\"}").await, 1.0);
    assert_eq!(metric(&app, "tally_signature_failures_total{reason=\"future\"}").await, 1.0);

    let key = tally::signing::WebhookSecret::parse(&secret).unwrap();
    let good = tally::signing::sign(key.key(), "msg_c", now, BODY.as_bytes());
    let truncated = good[..good.len() - 6].to_string();
    for sig in ["v1,".to_string(), truncated, format!("{good}AAAA"), "v1,".to_string() + &"A".repeat(43) + "="] {
        let headers = vec![
            ("webhook-id", "msg_c".to_string()),
            ("webhook-timestamp", now.to_string()),
            ("webhook-signature", sig.clone()),
        ];
        let r =
            app.request(Method::POST, format!("http://{}{PATH}", app.public), &headers, BODY.as_bytes().to_vec()).await;
        assert_eq!(r.status, 401, "{sig}");
    }
    let missing =
        app.request(Method::POST, format!("http://{}{PATH}", app.public), &[], BODY.as_bytes().to_vec()).await;
    assert_eq!(missing.status, 401);
    assert_eq!(metric(&app, "tally_signature_failures_total{reason=\"missing\"}").await, 1.0);
    assert_eq!(app.stored_conversions("shop").await, 0);
    assert_eq!(app.post_signed(PATH, BODY, &secret, "msg_c", now).await.status, 201, "the real signature still works");
}

#[tokio::test]
async fn same_webhook_id_with_another_body_is_a_replay() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let now = app.now_secs();
    assert_eq!(app.post_signed(PATH, BODY, &secret, "msg_r", now).await.status, 201);
    assert_eq!(app.post_signed(PATH, BODY, &secret, "msg_r", now).await.status, 200, "same body: a retry");
    let other = BODY.replace("sig-1", "sig-2");
    assert_eq!(app.post_signed(PATH, &other, &secret, "msg_r", now).await.status, 401);
    assert_eq!(metric(&app, "tally_signature_failures_total{reason=\"replay\"}").await, 1.0);
    assert_eq!(app.stored_conversions("shop").await, 1);
}

#[tokio::test]
async fn rotated_secret_works_during_grace_and_not_after() {
    let (clock, dyn_clock) = manual_clock();
    let app = TestApp::spawn_with(|s| s.signing.rotation_grace_seconds = 3600, dyn_clock).await;
    let old = app.demo().await;
    let r = app.admin(Method::POST, "/admin/v1/merchants/shop/secrets:rotate", None).await;
    assert_eq!(r.status, 200);
    let new = r.json()["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);

    clock.advance_ms(3_599_000);
    let body = |n: u32| format!(r#"{{"txn_id":"rot-{n}","event":"lead","partner_id":"ann"}}"#);
    assert_eq!(app.convert("shop", &old, &body(1)).await.status, 201, "old secret inside the grace period");
    assert_eq!(app.convert("shop", &new, &body(2)).await.status, 201);
    clock.advance_ms(2_000);
    assert_eq!(app.convert("shop", &old, &body(3)).await.status, 401, "old secret after the grace period");
    assert_eq!(app.convert("shop", &new, &body(4)).await.status, 201);
}

#[tokio::test]
async fn one_merchants_secret_cannot_post_to_another() {
    let app = TestApp::spawn().await;
    let secret_a = app.demo().await;
    app.demo_merchant("other", "bob", "bobs-link").await;
    let r = app.convert("other", &secret_a, r#"{"txn_id":"x","event":"lead"}"#).await;
    assert_eq!(r.status, 401);
    let r = app.convert("ghost", &secret_a, r#"{"txn_id":"x","event":"lead"}"#).await;
    assert_eq!(r.status, 401, "an unknown merchant looks like a wrong secret");
    assert_eq!(app.stored_conversions("other").await, 0);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_and_store_nothing() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let padding = "x".repeat(64 * 1024);
    let big = format!(r#"{{"txn_id":"big","event":"lead","metadata":{{"p":"{padding}"}}}}"#);
    let r = app.convert("shop", &secret, &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "payload_too_large");
    assert_eq!(app.stored_conversions("shop").await, 0);
}

#[tokio::test]
async fn the_python_standardwebhooks_library_and_tally_sign_are_accepted() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let now = app.now_secs();

    let body = r#"{"txn_id":"py-1","event":"lead","partner_id":"ann"}"#;
    let script = r#"
import sys, datetime
from standardwebhooks.webhooks import Webhook
secret, msg_id, ts, body = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
print(Webhook(secret).sign(msg_id, datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc), body))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &secret, "msg_python", &now.to_string(), body])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the standardwebhooks package is needed (scripts/test installs it: pip install standardwebhooks): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sig = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let headers = vec![
        ("content-type", "application/json".to_string()),
        ("webhook-id", "msg_python".to_string()),
        ("webhook-timestamp", now.to_string()),
        ("webhook-signature", sig),
    ];
    let r = app.request(Method::POST, format!("http://{}{PATH}", app.public), &headers, body.as_bytes().to_vec()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let body = r#"{"txn_id":"cli-1","event":"lead","partner_id":"ann"}"#;
    let secret_file = app.dir.path().join("shop.whsec");
    std::fs::write(&secret_file, &secret).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sign", "--secret-file", secret_file.to_str().unwrap(), "--id", "msg_cli"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let mut headers: Vec<(&str, String)> = printed
        .lines()
        .map(|l| l.split_once(": ").unwrap())
        .map(|(k, v)| {
            (
                match k {
                    "webhook-id" => "webhook-id",
                    "webhook-timestamp" => "webhook-timestamp",
                    _ => "webhook-signature",
                },
                v.to_string(),
            )
        })
        .collect();
    assert_eq!(headers.len(), 3, "{printed}");
    headers.push(("content-type", "application/json".to_string()));
    let r = app.request(Method::POST, format!("http://{}{PATH}", app.public), &headers, body.as_bytes().to_vec()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}
