//! Rate limits over HTTP (SPEC 11): 429 with Retry-After, per IP on clicks and failed
//! signatures, per merchant only after the signature check, bounded and gauged.

use std::sync::Arc;
use std::time::Duration;

use crate::helpers::{metric, TestApp};

async fn limited_app() -> TestApp {
    TestApp::spawn_with(
        |s| {
            s.limits.clicks_per_ip_per_second = 1;
            s.limits.clicks_burst = 2;
            s.limits.failures_per_ip_per_minute = 3;
            s.limits.merchant_per_second = 1;
            s.limits.merchant_burst = 1;
            s.limits.sweep_interval_ms = 50;
        },
        Arc::new(tally::domain::clock::SystemClock),
    )
    .await
}

#[tokio::test]
async fn clicks_over_the_per_ip_rate_get_429_with_retry_after() {
    let app = limited_app().await;
    app.demo().await;
    assert_eq!(app.get("/c/spring", &[]).await.status, 302);
    assert_eq!(app.get("/c/spring", &[]).await.status, 302);
    let r = app.get("/c/spring", &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "rate_limited");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(metric(&app, "tally_clicks_total{outcome=\"rate_limited\"}").await, 1.0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.get("/c/spring", &[]).await.status, 302, "the bucket refills");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(metric(&app, "tally_ratelimit_keys").await >= 1.0, "the gauge counts the live keys");
}

#[tokio::test]
async fn failed_signatures_block_the_ip_and_never_spend_the_merchants_quota() {
    let app = limited_app().await;
    let secret = app.demo().await;
    let body = r#"{"txn_id":"q-1","event":"lead","partner_id":"ann"}"#;
    let wrong = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for i in 0..3 {
        let r = app
            .post_signed("/v1/merchants/shop/conversions", body, wrong, &format!("msg_bad_{i}"), app.now_secs())
            .await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    // Three failures spent the IP's budget but not the merchant's: a good request passes.
    assert_eq!(app.convert("shop", &secret, body).await.status, 201);
    let r = app.post_signed("/v1/merchants/shop/conversions", body, wrong, "msg_bad_4", app.now_secs()).await;
    assert_eq!(r.status, 401, "the fourth failure is counted and blocks");
    let blocked = app.convert("shop", &secret, r#"{"txn_id":"q-2","event":"lead","partner_id":"ann"}"#).await;
    assert_eq!(blocked.status, 429, "blocked until the failure budget refills");
    assert!(blocked.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(app.stored_conversions("shop").await, 1, "nothing stored for a 429");
}

#[tokio::test]
async fn the_merchant_quota_applies_after_verification() {
    let app = limited_app().await;
    let secret = app.demo().await;
    assert_eq!(app.convert("shop", &secret, r#"{"txn_id":"m-1","event":"lead"}"#).await.status, 201);
    let r = app.convert("shop", &secret, r#"{"txn_id":"m-2","event":"lead"}"#).await;
    assert_eq!(r.status, 429);
    assert_eq!(metric(&app, "tally_conversions_total{outcome=\"rate_limited\"}").await, 1.0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        app.convert("shop", &secret, r#"{"txn_id":"m-2","event":"lead"}"#).await.status,
        201,
        "the same txn_id after a 429"
    );
}
