//! The attribution and commission engine over HTTP (SPEC 8, 9): B2B deals and
//! influencers, lifetime customers, adjustments, holds, reassignment, tenant isolation.

use std::time::Duration;

use http::Method;
use serde_json::{json, Value};

use crate::helpers::{manual_clock, TestApp};

const DAY_MS: i64 = 86_400_000;

async fn merchant_with_plan(app: &TestApp, merchant: &str, plan: Value) -> String {
    let r = app.admin(Method::PUT, &format!("/admin/v1/merchants/{merchant}"), Some(json!({"name": merchant}))).await;
    assert_eq!(r.status, 201);
    let secret = r.json()["secret"].as_str().unwrap().to_string();
    let r = app.admin(Method::PUT, &format!("/admin/v1/merchants/{merchant}/plans/main"), Some(plan)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = app
        .admin(
            Method::PUT,
            &format!("/admin/v1/merchants/{merchant}"),
            Some(json!({"name": merchant, "default_plan_id": "main"})),
        )
        .await;
    assert_eq!(r.status, 200);
    secret
}

/// Creates a partner and returns its partner-API secret.
async fn partner(app: &TestApp, merchant: &str, id: &str) -> String {
    let body = json!({"name": id, "kind": "reseller"});
    let r = app.admin(Method::PUT, &format!("/admin/v1/merchants/{merchant}/partners/{id}"), Some(body)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["secret"].as_str().unwrap().to_string()
}

async fn register(
    app: &TestApp,
    partner: &str,
    secret: &str,
    deal: &str,
    account: &str,
) -> crate::helpers::TestResponse {
    let body = json!({"deal_id": deal, "account": account, "opportunity_id": format!("opp-{deal}")}).to_string();
    app.post_signed(
        &format!("/v1/partners/{partner}/deals"),
        &body,
        secret,
        &format!("msg_{partner}_{deal}"),
        app.now_secs(),
    )
    .await
}

async fn adjust(app: &TestApp, secret: &str, body: Value) -> crate::helpers::TestResponse {
    app.adjust("shop", secret, &body.to_string()).await
}

async fn view(app: &TestApp, merchant: &str, txn: &str) -> Value {
    let r = app.admin(Method::GET, &format!("/admin/v1/merchants/{merchant}/conversions/{txn}"), None).await;
    assert_eq!(r.status, 200);
    r.json()
}

fn ledger_sum(view: &Value, partner: &str) -> i64 {
    view["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["partner_id"] == partner)
        .map(|e| (e["amount"].as_str().unwrap().parse::<f64>().unwrap() * 100.0).round() as i64)
        .sum()
}

const B2B_PLAN: &str = r#"{"currency": "USD", "influence_percent": "5", "hold_days": 30,
    "rules": [{"event": "sale", "percent": "20"}, {"event": "renewal", "percent": "10", "recurring_months": 12}]}"#;

#[tokio::test]
async fn b2b_story_first_registration_sources_later_one_influences() {
    let (clock, dyn_clock) = manual_clock();
    let app = TestApp::spawn_with(|_| {}, dyn_clock).await;
    let secret = merchant_with_plan(&app, "shop", serde_json::from_str(B2B_PLAN).unwrap()).await;
    let a = partner(&app, "shop", "alpha").await;
    let b = partner(&app, "shop", "beta").await;

    let r = register(&app, "alpha", &a, "D-1", "acme.com").await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["source_of_record"], true);

    clock.advance_ms(DAY_MS);
    let r = register(&app, "beta", &b, "D-9", "https://www.ACME.com/pricing").await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["code"], "account_already_registered");
    assert!(!String::from_utf8_lossy(&r.body).contains("alpha"), "the holder is never revealed");
    let replay = register(&app, "beta", &b, "D-9", "https://www.ACME.com/pricing").await;
    assert_eq!(replay.status, 409);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(register(&app, "alpha", &a, "D-1", "acme.com").await.header("idempotent-replayed"), Some("true"));

    clock.advance_ms(90 * DAY_MS);
    let r = app
        .convert("shop", &secret, r#"{"txn_id":"acme-1","amount":"150.00","currency":"USD","account":"Acme.com"}"#)
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["attribution"]["partner_id"], "alpha");
    assert_eq!(j["attribution"]["rule"], "deal");
    assert_eq!(j["attribution"]["credit"], "sourced");
    assert!(j["attribution"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("account acme.com was registered by partner alpha"));
    assert_eq!(j["commission"]["amount"], "30.00");
    // Issue 13 added `credit` and `reason` to each influencer: the old fields are checked
    // as before, the new ones beside them.
    let influencers = j["attribution"]["influencers"].as_array().unwrap();
    assert_eq!(influencers.len(), 1);
    let i = &influencers[0];
    assert_eq!(
        (&i["partner_id"], &i["rule"], &i["commission"]),
        (&json!("beta"), &json!("deal"), &json!({"amount": "7.50", "currency": "USD"}))
    );
    assert_eq!(i["credit"], "influenced");
    let reason = i["reason"].as_str().unwrap();
    assert!(reason.starts_with("partner beta registered") && reason.contains("partner alpha sourced it"), "{reason}");

    let v = view(&app, "shop", "acme-1").await;
    assert_eq!(ledger_sum(&v, "alpha"), 3000);
    assert_eq!(ledger_sum(&v, "beta"), 750);
    assert_eq!(v["ledger"].as_array().unwrap().len(), 2);

    // A CRM touch makes a third partner an influencer of the next sale.
    partner(&app, "shop", "gamma").await;
    let touch = json!({"account": "acme.com", "partner_id": "gamma", "kind": "webinar"}).to_string();
    let r = app.post_signed("/v1/merchants/shop/touches", &touch, &secret, "msg_touch_1", app.now_secs()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = app
        .convert("shop", &secret, r#"{"txn_id":"acme-2","amount":"100.00","currency":"USD","account":"acme.com"}"#)
        .await;
    let j = r.json();
    let inf: Vec<&str> =
        j["attribution"]["influencers"].as_array().unwrap().iter().map(|i| i["partner_id"].as_str().unwrap()).collect();
    assert_eq!(inf, ["beta", "gamma"]);
}

#[tokio::test]
async fn registrations_expire_unless_a_conversion_happened() {
    let (clock, dyn_clock) = manual_clock();
    let app = TestApp::spawn_with(|_| {}, dyn_clock).await;
    let plan = json!({"currency": "USD", "deal_ttl_days": 10, "rules": [{"event": "sale", "percent": "20"}]});
    let secret = merchant_with_plan(&app, "shop", plan).await;
    let a = partner(&app, "shop", "alpha").await;
    let b = partner(&app, "shop", "beta").await;
    assert_eq!(register(&app, "alpha", &a, "D-1", "expiring.com").await.status, 201);
    clock.advance_ms(11 * DAY_MS);
    let r = app
        .convert("shop", &secret, r#"{"txn_id":"e-1","amount":"10.00","currency":"USD","account":"expiring.com"}"#)
        .await;
    assert!(r.json()["attribution"].is_null());
    assert_eq!(r.json()["reason"], "the registration of account expiring.com expired");
    assert_eq!(
        register(&app, "beta", &b, "D-2", "expiring.com").await.status,
        201,
        "an expired account can be registered again"
    );

    assert_eq!(register(&app, "alpha", &a, "D-3", "kept.com").await.status, 201);
    assert_eq!(
        app.convert("shop", &secret, r#"{"txn_id":"k-1","amount":"10.00","currency":"USD","account":"kept.com"}"#)
            .await
            .json()["attribution"]["rule"],
        "deal"
    );
    clock.advance_ms(30 * DAY_MS);
    let r = app
        .convert("shop", &secret, r#"{"txn_id":"k-2","amount":"10.00","currency":"USD","account":"kept.com"}"#)
        .await;
    assert_eq!(r.json()["attribution"]["partner_id"], "alpha", "a converted registration does not expire");
}

#[tokio::test]
async fn lifetime_customer_renewals_within_recurring_months_only() {
    let (clock, dyn_clock) = manual_clock();
    let app = TestApp::spawn_with(|_| {}, dyn_clock).await;
    let secret = app.demo().await;
    let plan: Value = serde_json::from_str(B2B_PLAN).unwrap();
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(plan)).await.status, 200);
    let click = app.click("spring").await;
    let first = format!(
        r#"{{"txn_id":"sub-1","amount":"100.00","currency":"USD","click_id":"{click}","customer_id":"cus_1"}}"#
    );
    let r = app.convert("shop", &secret, &first).await;
    assert_eq!(r.json()["attribution"]["rule"], "click");
    assert_eq!(r.json()["commission"]["amount"], "20.00");

    clock.advance_ms(30 * DAY_MS);
    let renewal = |n: u32| {
        format!(
            r#"{{"txn_id":"renew-{n}","event":"renewal","amount":"100.00","currency":"USD","customer_id":"cus_1"}}"#
        )
    };
    let r = app.convert("shop", &secret, &renewal(1)).await;
    assert_eq!(r.json()["attribution"]["rule"], "customer");
    assert_eq!(r.json()["attribution"]["partner_id"], "ann");
    assert!(r.json()["commission"].is_null(), "no plan on a customer credit without a link: {}", r.json());

    // Give the partner a plan so customer credits are paid; then check the month limit.
    let p = json!({"name": "Ann's Blog", "kind": "affiliate", "plan_id": "standard", "coupons": ["ann-10"]});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(p)).await.status, 200);
    let r = app.convert("shop", &secret, &renewal(2)).await;
    assert_eq!(r.json()["commission"]["amount"], "10.00");
    clock.advance_ms(370 * DAY_MS);
    let r = app.convert("shop", &secret, &renewal(3)).await;
    assert_eq!(r.json()["attribution"]["rule"], "customer", "the binding is for life");
    assert!(r.json()["commission"].is_null());
    assert!(r.json()["commission_note"].as_str().unwrap().contains("only within 12 months"), "{}", r.json());
}

#[tokio::test]
async fn refunds_chargebacks_and_status_moves() {
    let app = TestApp::spawn().await;
    let secret = merchant_with_plan(&app, "shop", serde_json::from_str(B2B_PLAN).unwrap()).await;
    partner(&app, "shop", "alpha").await;
    let sale = |txn: &str| format!(r#"{{"txn_id":"{txn}","amount":"100.00","currency":"USD","partner_id":"alpha"}}"#);
    assert_eq!(app.convert("shop", &secret, &sale("r-1")).await.json()["commission"]["amount"], "20.00");

    let half =
        adjust(&app, &secret, json!({"adjustment_id": "adj-1", "txn_id": "r-1", "kind": "refund", "amount": "50.00"}))
            .await;
    assert_eq!(half.status, 201, "{}", String::from_utf8_lossy(&half.body));
    assert_eq!(half.json()["status"], "pending");
    assert_eq!(
        half.json()["ledger"],
        json!([{"entry_id": half.json()["ledger"][0]["entry_id"], "partner_id": "alpha", "kind": "reversal", "amount": "-10.00", "currency": "USD", "at": half.json()["ledger"][0]["at"]}])
    );
    let replay =
        adjust(&app, &secret, json!({"adjustment_id": "adj-1", "txn_id": "r-1", "kind": "refund", "amount": "50.00"}))
            .await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let too_much =
        adjust(&app, &secret, json!({"adjustment_id": "adj-2", "txn_id": "r-1", "kind": "refund", "amount": "50.01"}))
            .await;
    assert_eq!(too_much.status, 422);
    assert_eq!(too_much.json()["field"], "amount");
    let v = view(&app, "shop", "r-1").await;
    assert_eq!(ledger_sum(&v, "alpha"), 1000, "half the commission remains; the original entry is untouched");
    assert_eq!(v["ledger"][0]["amount"], "20.00");

    assert_eq!(app.convert("shop", &secret, &sale("c-1")).await.status, 201);
    let ok = adjust(&app, &secret, json!({"adjustment_id": "adj-3", "txn_id": "c-1", "kind": "approve"})).await;
    assert_eq!(ok.json()["status"], "approved");
    let cb = adjust(&app, &secret, json!({"adjustment_id": "adj-4", "txn_id": "c-1", "kind": "chargeback"})).await;
    assert_eq!(cb.status, 201);
    assert_eq!(cb.json()["status"], "reversed");
    assert_eq!(cb.json()["ledger"][0]["kind"], "clawback");
    assert_eq!(cb.json()["ledger"][0]["amount"], "-20.00");
    let again = adjust(&app, &secret, json!({"adjustment_id": "adj-5", "txn_id": "c-1", "kind": "approve"})).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["current_status"], "reversed");
    let v = view(&app, "shop", "c-1").await;
    assert_eq!(ledger_sum(&v, "alpha"), 0);
    let moves: Vec<&str> = v["status_history"].as_array().unwrap().iter().map(|h| h["to"].as_str().unwrap()).collect();
    assert_eq!(moves, ["approved", "reversed"]);

    assert_eq!(app.convert("shop", &secret, &sale("j-1")).await.status, 201);
    let rej = adjust(&app, &secret, json!({"adjustment_id": "adj-6", "txn_id": "j-1", "kind": "reject"})).await;
    assert_eq!(rej.json()["status"], "rejected");
    assert_eq!(ledger_sum(&view(&app, "shop", "j-1").await, "alpha"), 0);
    // Found by the ledger property test: a rejection after a partial refund takes back the rest.
    assert_eq!(app.convert("shop", &secret, &sale("k-1")).await.status, 201);
    adjust(&app, &secret, json!({"adjustment_id": "adj-8", "txn_id": "k-1", "kind": "refund", "amount": "0.01"})).await;
    adjust(&app, &secret, json!({"adjustment_id": "adj-9", "txn_id": "k-1", "kind": "reject"})).await;
    assert_eq!(ledger_sum(&view(&app, "shop", "k-1").await, "alpha"), 0);
    let unknown = adjust(&app, &secret, json!({"adjustment_id": "adj-7", "txn_id": "nope", "kind": "approve"})).await;
    assert_eq!(unknown.status, 422);
}

#[tokio::test]
async fn holds_end_in_automatic_approval() {
    let (clock, dyn_clock) = manual_clock();
    let app = TestApp::spawn_with(|s| s.holds.sweep_interval_ms = 20, dyn_clock).await;
    let secret = merchant_with_plan(&app, "shop", serde_json::from_str(B2B_PLAN).unwrap()).await;
    partner(&app, "shop", "alpha").await;
    let r = app
        .convert("shop", &secret, r#"{"txn_id":"h-1","amount":"10.00","currency":"USD","partner_id":"alpha"}"#)
        .await;
    assert_eq!(r.json()["status"], "pending");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(view(&app, "shop", "h-1").await["conversion"]["status"], "pending", "inside the hold");
    clock.advance_ms(30 * DAY_MS + 1000);
    let mut status = Value::Null;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = view(&app, "shop", "h-1").await["conversion"]["status"].clone();
        if status == "approved" {
            break;
        }
    }
    assert_eq!(status, "approved");
    assert_eq!(view(&app, "shop", "h-1").await["status_history"][0]["cause"], "hold period ended");
}

#[tokio::test]
async fn reassignment_is_audited_and_only_changes_later_conversions() {
    let app = TestApp::spawn().await;
    let secret = merchant_with_plan(&app, "shop", serde_json::from_str(B2B_PLAN).unwrap()).await;
    let a = partner(&app, "shop", "alpha").await;
    partner(&app, "shop", "beta").await;
    assert_eq!(register(&app, "alpha", &a, "D-1", "acme.com").await.status, 201);
    let sale = |txn: &str| format!(r#"{{"txn_id":"{txn}","amount":"10.00","currency":"USD","account":"acme.com"}}"#);
    assert_eq!(app.convert("shop", &secret, &sale("before")).await.json()["attribution"]["partner_id"], "alpha");

    let body = json!({"partner_id": "beta", "why": "alpha left the program; beta took over the account", "by": "pm@shop.example"});
    let r = app.admin(Method::POST, "/admin/v1/merchants/shop/accounts/acme.com:reassign", Some(body)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let audit = &r.json()["reassignments"][0];
    assert_eq!(
        (audit["from"].as_str(), audit["to"].as_str(), audit["by"].as_str()),
        (Some("alpha"), Some("beta"), Some("pm@shop.example"))
    );
    assert!(audit["at"].is_string() && audit["why"].as_str().unwrap().contains("took over"));

    assert_eq!(app.convert("shop", &secret, &sale("after")).await.json()["attribution"]["partner_id"], "beta");
    assert_eq!(
        view(&app, "shop", "before").await["conversion"]["attribution"]["partner_id"],
        "alpha",
        "history is not rewritten"
    );
}

#[tokio::test]
async fn merchants_never_see_each_others_deals_touches_or_conversions() {
    let app = TestApp::spawn().await;
    let shop = merchant_with_plan(&app, "shop", serde_json::from_str(B2B_PLAN).unwrap()).await;
    let other = merchant_with_plan(&app, "other", serde_json::from_str(B2B_PLAN).unwrap()).await;
    let a = partner(&app, "shop", "alpha").await;
    partner(&app, "other", "omega").await;
    assert_eq!(register(&app, "alpha", &a, "D-1", "acme.com").await.status, 201);
    assert_eq!(
        app.convert("shop", &shop, r#"{"txn_id":"x-1","amount":"10.00","currency":"USD","account":"acme.com"}"#)
            .await
            .status,
        201
    );

    let r = app
        .convert("other", &other, r#"{"txn_id":"x-1","amount":"10.00","currency":"USD","account":"acme.com"}"#)
        .await;
    assert_eq!(r.status, 201, "the same txn_id is another merchant's own");
    assert!(r.json()["attribution"].is_null());
    assert_eq!(r.json()["reason"], "account acme.com has no deal registration");

    let touch = json!({"account": "acme.com", "partner_id": "alpha"}).to_string();
    let r = app.post_signed("/v1/merchants/other/touches", &touch, &other, "msg_t_x", app.now_secs()).await;
    assert_eq!(r.status, 422, "another merchant's partner");
    assert_eq!(app.admin(Method::GET, "/admin/v1/merchants/other/accounts/acme.com", None).await.status, 404);
    assert_eq!(app.admin(Method::GET, "/admin/v1/merchants/shop/accounts/acme.com", None).await.status, 200);
    let adj = json!({"adjustment_id": "steal", "txn_id": "x-1", "kind": "reject"}).to_string();
    let r = app.post_signed("/v1/merchants/shop/adjustments", &adj, &other, "msg_steal", app.now_secs()).await;
    assert_eq!(r.status, 401, "merchant other cannot sign for shop");
}

/// Influencers are counted with `credit="influenced"`, and after an admin reassignment the
/// next conversion's reason names it: who, when, why and from whom.
#[tokio::test]
async fn influence_is_counted_and_a_reassignment_explains_later_credit() {
    let app = TestApp::spawn().await;
    let secret = merchant_with_plan(&app, "shop", serde_json::from_str(B2B_PLAN).unwrap()).await;
    let a = partner(&app, "shop", "alpha").await;
    let b = partner(&app, "shop", "beta").await;
    assert_eq!(register(&app, "alpha", &a, "D-1", "acme.com").await.status, 201);
    assert_eq!(register(&app, "beta", &b, "D-2", "acme.com").await.status, 409);
    let sale = |txn: &str| format!(r#"{{"txn_id":"{txn}","amount":"10.00","currency":"USD","account":"acme.com"}}"#);
    let j = app.convert("shop", &secret, &sale("s1")).await.json();
    assert_eq!(j["attribution"]["influencers"][0]["credit"], "influenced");
    let influenced =
        crate::helpers::metric(&app, "tally_attributions_total{credit=\"influenced\",rule=\"deal\"}").await;
    assert_eq!(influenced, 1.0, "the influencer is counted");

    let body = json!({"partner_id": "beta", "why": "territory moved to beta", "by": "pm@shop.example"});
    let r = app.admin(Method::POST, "/admin/v1/merchants/shop/accounts/acme.com:reassign", Some(body)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reassignments"][0]["from"], "alpha", "the engine read the holder it replaced");
    let j = app.convert("shop", &secret, &sale("s2")).await.json();
    assert_eq!(j["attribution"]["partner_id"], "beta");
    let reason = j["attribution"]["reason"].as_str().unwrap();
    for part in ["reassigned to partner beta", "by pm@shop.example", "territory moved to beta", "from partner alpha"] {
        assert!(reason.contains(part), "{part:?} missing from {reason}");
    }
}
