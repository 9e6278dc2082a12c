//! Signed conversions: attribution, commission, dedupe (SPEC 5.1, 6, 8).

use std::sync::Arc;

use crate::helpers::TestApp;

#[tokio::test]
async fn click_then_conversion_is_attributed_with_the_plan_commission() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let click = app.click("spring").await;
    let body = format!(
        r#"{{"txn_id":"order-1001","amount":"149.90","currency":"USD","click_id":"{click}","metadata":{{"plan":"pro","n":1.50}}}}"#
    );
    let r = app.convert("shop", &secret, &body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["txn_id"], "order-1001");
    assert_eq!(j["duplicate"], false);
    assert_eq!(j["status"], "pending");
    assert_eq!(j["attribution"]["partner_id"], "ann");
    assert_eq!(j["attribution"]["credit"], "sourced");
    assert_eq!(j["attribution"]["rule"], "click");
    let reason = j["attribution"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("click {click} on link spring")) && reason.ends_with("inside the 30-day window"),
        "{reason}"
    );
    assert_eq!(j["commission"]["amount"], "29.98");
    assert_eq!(j["commission"]["currency"], "USD");
    assert_eq!(j["commission"]["plan"], "standard");
    assert_eq!(j["commission"]["rule"], "sale 20%");
    assert!(
        String::from_utf8_lossy(&r.body).contains(r#""metadata":{"plan":"pro","n":1.50}"#),
        "metadata comes back as sent"
    );

    let view = app.admin(http::Method::GET, "/admin/v1/merchants/shop/conversions/order-1001", None).await;
    assert_eq!(view.status, 200);
    let v = view.json();
    assert_eq!(v["conversion"]["conversion_id"], j["conversion_id"]);
    assert_eq!(v["ledger"][0]["kind"], "commission");
    assert_eq!(v["ledger"][0]["amount"], "29.98");
}

#[tokio::test]
async fn explicit_partner_and_unattributed_conversions_are_stored_with_reasons() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let m = serde_json::json!({"name": "Shop", "default_plan_id": "standard"});
    assert_eq!(app.admin(http::Method::PUT, "/admin/v1/merchants/shop", Some(m)).await.status, 200);
    let r = app.convert("shop", &secret, r#"{"txn_id":"lead-1","event":"lead","partner_id":"ann"}"#).await;
    assert_eq!(r.status, 201);
    let j = r.json();
    assert_eq!(j["attribution"]["rule"], "explicit");
    assert_eq!(j["commission"]["amount"], "15.00");

    let unknown_click = tally::domain::ids::Ulid::mint(0).to_string();
    let r = app
        .convert(
            "shop",
            &secret,
            &format!(r#"{{"txn_id":"o-2","amount":"10","currency":"USD","click_id":"{unknown_click}"}}"#),
        )
        .await;
    assert_eq!(r.status, 201);
    let j = r.json();
    assert!(j["attribution"].is_null());
    assert_eq!(j["reason"], format!("click {unknown_click} is unknown"));
    assert!(j["commission"].is_null());
}

#[tokio::test]
async fn a_click_of_another_merchant_does_not_attribute() {
    let app = TestApp::spawn().await;
    let secret_a = app.demo().await;
    app.demo_merchant("other", "bob", "bobs-link").await;
    let foreign = app.click("bobs-link").await;
    let r = app
        .convert(
            "shop",
            &secret_a,
            &format!(r#"{{"txn_id":"x","amount":"10","currency":"USD","click_id":"{foreign}"}}"#),
        )
        .await;
    assert_eq!(r.status, 201);
    assert!(r.json()["attribution"].is_null());
    assert_eq!(r.json()["reason"], format!("click {foreign} is unknown"), "no hint that it exists elsewhere");
}

#[tokio::test]
async fn duplicate_replays_the_original_answer_and_conflicts_are_409() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let click = app.click("spring").await;
    let body = format!(r#"{{"txn_id":"order-7","amount":"20.00","currency":"USD","click_id":"{click}"}}"#);
    let first = app.convert("shop", &secret, &body).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);

    let again = app.convert("shop", &secret, &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let mut expected = first.json();
    expected["duplicate"] = serde_json::Value::Bool(true);
    assert_eq!(again.json(), expected, "same fields, same values, duplicate: true");

    let changed = body.replace("20.00", "25.00");
    let conflict = app.convert("shop", &secret, &changed).await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.json()["code"], "duplicate_conflict");
    assert_eq!(conflict.json()["conversion_id"], first.json()["conversion_id"]);

    let other_event = body.replace(r#""amount""#, r#""event":"renewal","amount""#);
    assert_eq!(app.convert("shop", &secret, &other_event).await.status, 409);

    let after = app.admin(http::Method::GET, "/admin/v1/merchants/shop/conversions/order-7", None).await;
    assert_eq!(after.json()["conversion"]["amount"]["amount"], "20.00", "the stored conversion is unchanged");
    assert_eq!(app.stored_conversions("shop").await, 1);

    // Retries are answered from a recent answer kept in memory; a status move must show in
    // the next retry's answer, whether it is answered by the writer or from memory.
    let reject = r#"{"adjustment_id":"adj-7","txn_id":"order-7","kind":"reject"}"#;
    let r = app.adjust("shop", &secret, reject).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    for round in 0..3 {
        let again = app.convert("shop", &secret, &body).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.json()["status"], "rejected", "retry {round} after the rejection");
        assert_eq!(again.json()["conversion_id"], first.json()["conversion_id"]);
        // Another conversion's WAL sync makes the retried record durable in memory.
        let other = format!(r#"{{"txn_id":"order-7-{round}","amount":"1.00","currency":"USD"}}"#);
        assert_eq!(app.convert("shop", &secret, &other).await.status, 201);
    }
}

#[tokio::test]
async fn sixty_four_concurrent_identical_requests_create_exactly_one() {
    let app = Arc::new(TestApp::spawn().await);
    let secret = Arc::new(app.demo().await);
    let ts = app.now_secs();
    let body = r#"{"txn_id":"race-1","amount":"99.00","currency":"USD","partner_id":"ann"}"#;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (app, secret) = (Arc::clone(&app), Arc::clone(&secret));
        tasks.push(tokio::spawn(async move {
            // Half reuse one webhook-id (a retrying client), half use their own.
            let id = if i % 2 == 0 { "msg_race".to_string() } else { format!("msg_race_{i}") };
            app.post_signed("/v1/merchants/shop/conversions", body, &secret, &id, ts).await
        }));
    }
    let mut created = 0;
    let mut duplicates = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => created += 1,
            200 => {
                assert_eq!(r.header("idempotent-replayed"), Some("true"));
                duplicates += 1;
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
        ids.insert(r.json()["conversion_id"].as_str().unwrap().to_string());
    }
    assert_eq!((created, duplicates), (1, 63));
    assert_eq!(ids.len(), 1, "every answer names the one conversion");
    assert_eq!(app.stored_conversions("shop").await, 1);
}

#[tokio::test]
async fn invalid_bodies_are_422_naming_the_field_and_store_nothing() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let cases = [
        (r#"{"txn_id":"a","amount":"1.001","currency":"USD"}"#, 422, Some("amount")),
        (r#"{"txn_id":"a","amount":"1","currency":"usd"}"#, 422, Some("currency")),
        (r#"{"txn_id":"a","amount":"1","currency":"USD","colour":"red"}"#, 422, Some("colour")),
        (r#"{"txn_id":"a","amount":"1","amount":"2","currency":"USD"}"#, 422, Some("amount")),
        (r#"{"txn_id":7,"amount":"1","currency":"USD"}"#, 422, Some("txn_id")),
        (r#"{"amount":"1","currency":"USD"}"#, 422, Some("txn_id")),
        (r#"[1,2]"#, 422, Some("body")),
        (r#"{"txn_id":"a","#, 400, None),
        (r#"{"txn_id":"a","event":"lead"} trailing"#, 400, None),
    ];
    for (body, status, field) in cases {
        let r = app.convert("shop", &secret, body).await;
        assert_eq!(r.status, status, "{body}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        if let Some(f) = field {
            assert_eq!(r.json()["field"], f, "{body}");
            assert_eq!(r.json()["code"], "invalid_field");
        }
    }
    assert_eq!(app.stored_conversions("shop").await, 0);
    let ok = app.convert("shop", &secret, r#"{"txn_id":"a","amount":"1","currency":"USD"}"#).await;
    assert_eq!(ok.status, 201, "the same txn_id is still free after the rejections");
}
