//! Fraud signals and self-reported attribution (docs/fraud.md), over HTTP: scripted
//! patterns raise exactly their signals with readable reasons; a flagged conversion waits
//! for an admin (no hold approves it, its postback waits too); a clean workload raises
//! nothing; `self_reported` is the weakest rule and pays what the plan says.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};

use crate::helpers::{click_id_of, manual_clock, metric, TestApp, TestResponse};
use crate::outbound::{outbound_settings, wait_deliveries, with_outbound, Receiver};

const T0: i64 = 1_790_000_000_000;
const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;

/// A click on `spring` with this user agent (the visitor), returning the click id.
async fn click_as(app: &TestApp, user_agent: &str) -> String {
    let r = app.get("/c/spring", &[("user-agent", user_agent.to_string())]).await;
    assert_eq!(r.status, 302, "{}", String::from_utf8_lossy(&r.body));
    click_id_of(r.header("location").unwrap())
}

async fn sale(app: &TestApp, secret: &str, txn: &str, extra: Value) -> TestResponse {
    let mut body = json!({"txn_id": txn, "amount": "100.00", "currency": "USD"});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let r = app.convert("shop", secret, &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r
}

/// `(signal, reason)` of each raised signal.
fn signals(r: &Value) -> Vec<(String, String)> {
    r["review"]["signals"]
        .as_array()
        .map(|a| {
            a.iter().map(|s| (s["signal"].as_str().unwrap().into(), s["reason"].as_str().unwrap().into())).collect()
        })
        .unwrap_or_default()
}

fn one(signal: &str, reason: &str) -> Vec<(String, String)> {
    vec![(signal.to_string(), reason.to_string())]
}

async fn admin_view(app: &TestApp, txn: &str) -> Value {
    let r = app.admin(Method::GET, &format!("/admin/v1/merchants/shop/conversions/{txn}"), None).await;
    assert_eq!(r.status, 200);
    r.json()
}

async fn open_reviews(app: &TestApp, query: &str) -> Value {
    let r = app.admin(Method::GET, &format!("/admin/v1/merchants/shop/conversions?review=open{query}"), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn review(app: &TestApp, txn: &str, decision: &str) -> TestResponse {
    let body = json!({"decision": decision, "by": "risk@shop.example", "note": "looked at the order"});
    app.admin(Method::POST, &format!("/admin/v1/merchants/shop/conversions/{txn}:review"), Some(body)).await
}

/// Every click of these tests comes from one IP: no per-IP click limit.
fn unlimited(s: &mut tally::config::Settings) {
    s.limits.clicks_per_ip_per_second = 1_000_000;
    s.limits.clicks_burst = 1_000_000;
}

#[tokio::test]
async fn scripted_patterns_raise_exactly_their_signals_with_reasons() {
    let (clock, shared) = manual_clock();
    clock.set_ms(T0);
    let app = TestApp::spawn_with(unlimited, shared).await;
    let secret = app.demo().await;
    let ann = json!({"name": "Ann's Blog", "kind": "affiliate", "coupons": ["ann-10"], "own_accounts": ["cus-ann", "https://www.Ann-Blog.example/"]});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(ann)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["own_accounts"], json!(["cus-ann", "https://www.Ann-Blog.example/", "ann-blog.example"]));

    // A 2-second click injection.
    let click = click_as(&app, "Mozilla/5.0 injected").await;
    clock.advance_ms(2000);
    let r = sale(&app, &secret, "inject", json!({"click_id": click})).await.json();
    assert_eq!(
        signals(&r),
        one("click_injection", "click 2 seconds before the conversion, under the plan's 10 seconds")
    );
    assert_eq!(r["review"]["status"], "open");
    assert_eq!(r["status"], "pending");
    assert_eq!(r["commission"]["amount"], "20.00", "priced as usual");
    assert!(admin_view(&app, "inject").await["approve_at"].is_null(), "no hold approves it");

    // One visitor clicking 50 times, then converting.
    let mut last = String::new();
    for _ in 0..50 {
        last = click_as(&app, "Mozilla/5.0 flooder").await;
        clock.advance_ms(MINUTE);
    }
    let r = sale(&app, &secret, "flood", json!({"click_id": last})).await.json();
    assert_eq!(
        signals(&r),
        one(
            "click_flooding",
            "the visitor clicked link spring 50 times in the 24 h before the conversion, over the plan's 20"
        )
    );

    // One visitor converting 10 times in a day: the sixth and later are flagged.
    for i in 1..=10 {
        let click = click_as(&app, "Mozilla/5.0 regular").await;
        clock.advance_ms(30 * MINUTE);
        let r = sale(&app, &secret, &format!("repeat-{i}"), json!({"click_id": click})).await.json();
        let want = if i <= 5 {
            vec![]
        } else {
            one(
                "repeat_converter",
                &format!("the visitor converted {i} times for partner ann in 24 h, over the plan's 5"),
            )
        };
        assert_eq!(signals(&r), want, "conversion {i}");
    }

    // A bot's click converting.
    let click = click_as(&app, "Googlebot/2.1").await;
    clock.advance_ms(10 * MINUTE);
    let r = sale(&app, &secret, "bot", json!({"click_id": click})).await.json();
    assert_eq!(signals(&r), one("bot_click", "the click on link spring was flagged as a bot's"));

    // A partner's own account: by customer id, and by account however it is written.
    clock.advance_ms(1000);
    let r = sale(&app, &secret, "own-1", json!({"partner_id": "ann", "customer_id": "cus-ann"})).await.json();
    assert_eq!(signals(&r), one("self_referral", "cus-ann is on partner ann's own accounts"));
    clock.advance_ms(1000);
    let r = sale(&app, &secret, "own-2", json!({"partner_id": "ann", "account": "ANN-BLOG.example"})).await.json();
    assert_eq!(signals(&r), one("self_referral", "ann-blog.example is on partner ann's own accounts"));
    clock.advance_ms(1000);
    let r = sale(&app, &secret, "clean", json!({"partner_id": "ann", "customer_id": "cus-9"})).await.json();
    assert!(r.get("review").is_none(), "a clean answer has no review: {r}");

    // A duplicate answers the review as stored.
    let dup = app.convert("shop", &secret, &json!({"txn_id": "inject", "amount": "100.00", "currency": "USD", "click_id": click_id_of_txn(&app, "inject").await}).to_string()).await;
    assert_eq!(dup.status, 200);
    assert_eq!(signals(&dup.json())[0].0, "click_injection");

    // Counted by signal; listed for review, oldest first, paged.
    for (signal, n) in [
        ("click_injection", 1.0),
        ("click_flooding", 1.0),
        ("repeat_converter", 5.0),
        ("bot_click", 1.0),
        ("self_referral", 2.0),
    ] {
        assert_eq!(metric(&app, &format!("tally_fraud_flags_total{{signal=\"{signal}\"}}")).await, n, "{signal}");
    }
    let all: Vec<String> = open_reviews(&app, "").await["conversions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["txn_id"].as_str().unwrap().to_string())
        .collect();
    let want =
        ["inject", "flood", "repeat-6", "repeat-7", "repeat-8", "repeat-9", "repeat-10", "bot", "own-1", "own-2"];
    assert_eq!(all, want);
    let page = open_reviews(&app, "&limit=4").await;
    assert_eq!(page["conversions"].as_array().unwrap().len(), 4);
    let after = page["next_after"].as_str().unwrap().to_string();
    let rest = open_reviews(&app, &format!("&limit=100&after={after}")).await;
    assert_eq!(rest["conversions"][0]["txn_id"], "repeat-8");
    assert!(rest["next_after"].is_null());
    let r = app.admin(Method::GET, "/admin/v1/merchants/shop/conversions", None).await;
    assert_eq!(r.status, 400, "review=open is required");
    assert_eq!(r.json()["code"], "invalid_query");

    // The partner report counts them apart.
    let r =
        app.admin(Method::GET, "/admin/v1/merchants/shop/reports/partners?from=2026-09-21&to=2026-09-23", None).await;
    let rows = r.json()["rows"].as_array().unwrap().clone();
    let flagged: i64 = rows.iter().map(|r| r["flagged"].as_i64().unwrap()).sum();
    let conversions: i64 = rows.iter().map(|r| r["conversions"].as_i64().unwrap()).sum();
    assert_eq!((flagged, conversions), (10, 16), "{rows:#?}");
    let commission: f64 = rows.iter().map(|r| r["flagged_commission"].as_str().unwrap().parse::<f64>().unwrap()).sum();
    // Eight flagged sales came through the link's 20 % plan; the two self-referrals named
    // the partner explicitly, and no plan pays a partner without a link here.
    assert_eq!(commission, 160.0);
}

/// The click id stored with a conversion, for a byte-identical retry.
async fn click_id_of_txn(app: &TestApp, txn: &str) -> String {
    admin_view(app, txn).await["keys"]["click_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn flagged_conversions_wait_for_an_admin_and_so_do_their_postbacks() {
    let (clock, shared) = manual_clock();
    clock.set_ms(T0);
    let app = TestApp::spawn_with(
        |s| {
            outbound_settings(s);
            s.holds.sweep_interval_ms = 20;
        },
        shared,
    )
    .await;
    let rx = Receiver::start(200).await;
    let secret = with_outbound(&app, json!({"url": rx.url("/pb?t={txn_id}&st={status}"), "method": "GET"})).await;
    // A clean conversion's postback goes at once: the worker is running.
    let click = click_as(&app, "Mozilla/5.0 clean").await;
    clock.advance_ms(5 * MINUTE);
    sale(&app, &secret, "clean", json!({"click_id": click})).await;
    assert_eq!(rx.wait_for(1).await[0].target, "/pb?t=clean&st=pending");

    for txn in ["fast-1", "fast-2"] {
        let click = click_as(&app, &format!("Mozilla/5.0 {txn}")).await;
        clock.advance_ms(1000);
        let r = sale(&app, &secret, txn, json!({"click_id": click})).await.json();
        assert_eq!(r["review"]["postbacks_held"], true);
    }
    // A month passes with the sweep running every 20 ms: nothing approves them, nothing is sent.
    clock.advance_ms(40 * DAY);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for txn in ["fast-1", "fast-2"] {
        let v = admin_view(&app, txn).await;
        assert_eq!(v["conversion"]["status"], "pending", "{v}");
        assert!(v["approve_at"].is_null());
    }
    assert_eq!(admin_view(&app, "clean").await["conversion"]["status"], "approved", "the clean one's hold ended");
    assert_eq!(rx.seen().len(), 1);

    // The merchant's own approval does not settle a fraud review.
    let r = app.adjust("shop", &secret, r#"{"adjustment_id":"a-1","txn_id":"fast-1","kind":"approve"}"#).await;
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "review_open");

    // An admin approves: approved at once, and the postback that waited is sent.
    let r = review(&app, "fast-1", "approve").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!((v["status"].as_str(), v["review"]["status"].as_str()), (Some("approved"), Some("approved")));
    assert_eq!(v["review"]["settled_by"], "risk@shop.example");
    assert_eq!(rx.wait_for(2).await[1].target, "/pb?t=fast-1&st=pending");
    wait_deliveries(&app, "?state=delivered", 2).await;
    let bal = app.admin(Method::GET, "/admin/v1/merchants/shop/partners/ann/balance", None).await.json();
    assert_eq!(bal["balances"][0]["approved"], "40.00", "{bal}");
    // The same decision replays; the other is refused.
    let again = review(&app, "fast-1", "approve").await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (200, Some("true")));
    let r = review(&app, "fast-1", "reject").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (409, Some("review_settled")));

    // An admin rejects the other: its credit is reversed, and the partner hears nothing.
    let r = review(&app, "fast-2", "reject").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "rejected");
    let ledger = admin_view(&app, "fast-2").await["ledger"].clone();
    let amounts: Vec<&str> = ledger.as_array().unwrap().iter().map(|e| e["amount"].as_str().unwrap()).collect();
    assert_eq!(amounts, ["20.00", "-20.00"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.seen().len(), 2);
    assert!(open_reviews(&app, "").await["conversions"].as_array().unwrap().is_empty());

    // Unknown conversions, and conversions without a review.
    assert_eq!(review(&app, "nope", "approve").await.status, 404);
    let r = review(&app, "clean", "approve").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (409, Some("no_review")));
    let bad = app
        .admin(Method::POST, "/admin/v1/merchants/shop/conversions/fast-1:review", Some(json!({"decision": "maybe"})))
        .await;
    assert_eq!(bad.status, 422);
}

/// A plan that does not hold postbacks sends them at once; the review still waits.
#[tokio::test]
async fn a_plan_may_send_postbacks_of_flagged_conversions_at_once() {
    let app = TestApp::spawn_with(outbound_settings, Arc::new(tally::domain::clock::SystemClock)).await;
    let rx = Receiver::start(200).await;
    let secret = with_outbound(&app, json!({"url": rx.url("/pb?t={txn_id}"), "method": "GET"})).await;
    let plan =
        json!({"currency": "USD", "fraud": {"hold_postbacks": false}, "rules": [{"event": "sale", "percent": "20"}]});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(plan)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["fraud"]["hold_postbacks"], false);
    assert_eq!(r.json()["fraud"]["flag_ctit_below_seconds"], 10, "the other thresholds keep their defaults");
    let click = click_as(&app, "Mozilla/5.0 quick").await;
    let r = sale(&app, &secret, "quick", json!({"click_id": click})).await.json();
    assert_eq!(r["review"]["postbacks_held"], false);
    assert_eq!(rx.wait_for(1).await[0].target, "/pb?t=quick");
    // A threshold of 0 switches the signal off.
    let plan = json!({"currency": "USD", "fraud": {"flag_ctit_below_seconds": 0}, "rules": [{"event": "sale", "percent": "20"}]});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(plan)).await.status, 200);
    let click = click_as(&app, "Mozilla/5.0 quick again").await;
    let r = sale(&app, &secret, "quick-2", json!({"click_id": click})).await.json();
    assert!(r.get("review").is_none(), "{r}");
    let bad = json!({"currency": "USD", "fraud": {"flag_visitor_clicks_per_day": -1}, "rules": [{"event": "sale", "percent": "20"}]});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(bad)).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let bad = json!({"currency": "USD", "fraud": {"flag_clicks": 3}, "rules": [{"event": "sale", "percent": "20"}]});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(bad)).await;
    assert_eq!(r.status, 422, "an unknown threshold is refused: {}", String::from_utf8_lossy(&r.body));
}

/// A deterministic xorshift: the workload is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// False positives: 10,000 conversions of distinct visitors, click-to-conversion times
/// spread log-uniformly from 2 minutes to 3 weeks, among 20,000 clicks that never convert,
/// all in time order over six weeks, raise no flag under the default thresholds.
#[tokio::test]
async fn a_clean_workload_raises_no_flag_with_the_default_thresholds() {
    let _heavy = crate::helpers::heavy_test().await;
    let (clock, shared) = manual_clock();
    clock.set_ms(T0);
    let app = TestApp::spawn_with(unlimited, shared).await;
    let secret = app.demo().await;
    const BUYERS: u64 = 10_000;
    const BROWSERS: u64 = 20_000;
    let span = 42 * DAY;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // (time, is a conversion, visitor): clicks spread over six weeks; a buyer converts after
    // a log-uniform delay between 2 minutes and 21 days.
    let mut events: Vec<(i64, bool, u64)> = Vec::new();
    let (lo, hi) = ((2.0 * 60_000.0f64).ln(), (21.0 * DAY as f64).ln());
    for v in 0..BUYERS + BROWSERS {
        let at = T0 + (rng.next() % (span as u64 - 21 * DAY as u64)) as i64;
        events.push((at, false, v));
        if v < BUYERS {
            let u = (rng.next() % 1_000_000) as f64 / 1_000_000.0;
            events.push((at + (lo + u * (hi - lo)).exp() as i64, true, v));
        }
    }
    events.sort();
    let mut clicks = std::collections::HashMap::new();
    let (mut shortest, mut longest) = (i64::MAX, 0);
    for (at, conversion, v) in events {
        clock.set_ms(at);
        let ua = format!("Mozilla/5.0 (visitor {v})");
        if !conversion {
            clicks.insert(v, (click_as(&app, &ua).await, at));
            continue;
        }
        let (click, clicked) = clicks[&v].clone();
        shortest = shortest.min(at - clicked);
        longest = longest.max(at - clicked);
        let r = sale(&app, &secret, &format!("o-{v}"), json!({"click_id": click})).await.json();
        assert_eq!(r["attribution"]["rule"], "click", "{r}");
        assert!(r.get("review").is_none(), "visitor {v}: {r}");
    }
    assert!(shortest < 3 * MINUTE && longest > 20 * DAY, "{shortest} .. {longest}");
    let flags: f64 = {
        let mut n = 0.0;
        for s in ["click_injection", "bot_click", "click_flooding", "repeat_converter", "self_referral"] {
            n += metric(&app, &format!("tally_fraud_flags_total{{signal=\"{s}\"}}")).await;
        }
        n
    };
    assert_eq!(flags, 0.0);
    assert!(open_reviews(&app, "").await["conversions"].as_array().unwrap().is_empty());
    assert_eq!(app.stored_conversions("shop").await, BUYERS);
}

#[tokio::test]
async fn self_reported_is_the_weakest_rule_and_pays_what_the_plan_says() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let plan = |pay: &str| {
        json!({"currency": "USD", "influence_percent": "5", "self_reported": pay,
               "rules": [{"event": "sale", "percent": "20"}]})
    };
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(plan("influence"))).await;
    assert_eq!(r.json()["self_reported"], "influence");
    let bob = json!({"name": "Bob", "kind": "affiliate", "coupons": ["BOB-10"], "plan_id": "standard"});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/bob", Some(bob)).await.status, 201);
    let ann = json!({"name": "Ann's Blog", "kind": "affiliate", "coupons": ["ann-10"], "plan_id": "standard"});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(ann)).await.status, 200);

    // By coupon as typed, ignoring case and spaces: the influence fee (the default).
    let r = sale(&app, &secret, "s-1", json!({"self_reported": "  Bob-10 "})).await.json();
    assert_eq!(r["attribution"]["rule"], "self_reported");
    assert_eq!(r["attribution"]["partner_id"], "bob");
    assert_eq!(
        r["attribution"]["reason"],
        "the customer answered \"Bob-10\" when asked how they heard of us, which names a coupon of partner bob; no stronger rule applied"
    );
    assert_eq!(r["commission"]["amount"], "5.00");
    assert_eq!(r["commission"]["rule"], "self-reported: influence fee 5%");
    // By partner id; the plan's choice: full, then none.
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(plan("full"))).await.status, 200);
    let r = sale(&app, &secret, "s-2", json!({"self_reported": "ANN"})).await.json();
    assert_eq!(
        (r["attribution"]["partner_id"].as_str(), r["commission"]["amount"].as_str()),
        (Some("ann"), Some("20.00"))
    );
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/standard", Some(plan("none"))).await.status, 200);
    let r = sale(&app, &secret, "s-3", json!({"self_reported": "ann"})).await.json();
    assert!(r["commission"].is_null());
    assert_eq!(r["commission_note"], "plan standard pays nothing for self-reported attribution (self_reported = none)");

    // Never over a stronger rule: partner_id, click, coupon, customer.
    let click = app.click("spring").await;
    let cases = [
        (json!({"partner_id": "ann", "self_reported": "bob"}), "explicit", "ann"),
        (json!({"click_id": click, "self_reported": "bob"}), "click", "ann"),
        (json!({"coupon": "ann-10", "self_reported": "bob"}), "coupon", "ann"),
        (json!({"customer_id": "c-1", "partner_id": "ann"}), "explicit", "ann"),
        (json!({"customer_id": "c-1", "self_reported": "bob"}), "customer", "ann"),
    ];
    for (i, (keys, rule, partner)) in cases.into_iter().enumerate() {
        let r = sale(&app, &secret, &format!("k-{i}"), keys.clone()).await.json();
        assert_eq!(
            (r["attribution"]["rule"].as_str(), r["attribution"]["partner_id"].as_str()),
            (Some(rule), Some(partner)),
            "{keys}"
        );
    }
    // Weak evidence binds no customer for life: the next sale of c-9 is judged afresh.
    let r = sale(&app, &secret, "s-5", json!({"customer_id": "c-9", "self_reported": "bob"})).await.json();
    assert_eq!(r["attribution"]["rule"], "self_reported");
    let r = sale(&app, &secret, "s-6", json!({"customer_id": "c-9", "self_reported": "ann"})).await.json();
    assert_eq!(
        (r["attribution"]["rule"].as_str(), r["attribution"]["partner_id"].as_str()),
        (Some("self_reported"), Some("ann"))
    );
    // Nobody by that name: unattributed, and said why.
    let r = sale(&app, &secret, "s-4", json!({"self_reported": "a podcast"})).await.json();
    assert!(r["attribution"].is_null());
    assert_eq!(r["reason"], "self_reported \"a podcast\" names no partner or coupon of this merchant");
    // Counted apart: in metrics and in the report.
    assert_eq!(metric(&app, "tally_attributions_total{credit=\"sourced\",rule=\"self_reported\"}").await, 5.0);
    let today = tally::domain::clock::format_rfc3339(crate::helpers::unix_now() * 1000)[..10].to_string();
    let r = app
        .admin(Method::GET, &format!("/admin/v1/merchants/shop/reports/partners?from={today}&to={today}"), None)
        .await;
    let rows = r.json()["rows"].as_array().unwrap().clone();
    let sr: Vec<(String, i64)> = rows
        .iter()
        .map(|r| (r["partner_id"].as_str().unwrap().to_string(), r["self_reported"].as_i64().unwrap()))
        .collect();
    assert_eq!(sr, [("ann".to_string(), 3), ("bob".to_string(), 2)], "{rows:#?}");
}
