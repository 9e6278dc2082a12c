//! What partners are owed (SPEC 9.1) over HTTP: a manual-approval plan pays only after
//! the merchant's `approve`; balances move from pending to approved, refunds before and
//! after approval land where they should; monthly statements chain from month to month.

use hyper::Method;
use serde_json::{json, Value};

use super::helpers::{manual_clock, TestApp, ADMIN_TOKEN};

const MARCH: i64 = 1_773_878_400_000; // 2026-03-19T00:00Z
const APRIL: i64 = 1_775_606_400_000; // 2026-04-08T00:00Z

async fn balance(app: &TestApp, partner: &str) -> Value {
    let r = app.admin(Method::GET, &format!("/admin/v1/merchants/shop/partners/{partner}/balance"), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["balances"][0].clone()
}

fn figures(b: &Value) -> [&str; 6] {
    ["pending", "approved", "reversed", "paid", "in_payout_runs", "payable"].map(|k| b[k].as_str().unwrap_or("-"))
}

#[tokio::test]
async fn a_manual_plan_pays_after_approve_and_statements_chain_month_to_month() {
    let (clock, shared) = manual_clock();
    clock.set_ms(MARCH);
    let app = TestApp::spawn_with(|s| s.holds.sweep_interval_ms = 20, shared).await;
    let secret = app.demo().await;
    let plan = json!({"currency": "USD", "hold_days": "manual", "rules": [{"event": "sale", "percent": "20"}]});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/on-payment", Some(plan)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["hold_days"], "manual");
    let partner = json!({"name": "Ann", "kind": "referral", "plan_id": "on-payment"});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(partner)).await.status, 200);

    let sale = r#"{"txn_id":"o-1","amount":"100.00","currency":"USD","partner_id":"ann"}"#;
    let r = app.convert("shop", &secret, sale).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["commission"]["amount"], "20.00");
    // A partial refund while pending lowers what is pending.
    let refund = r#"{"adjustment_id":"r-1","txn_id":"o-1","kind":"refund","amount":"40.00"}"#;
    assert_eq!(app.adjust("shop", &secret, refund).await.status, 201);
    assert_eq!(figures(&balance(&app, "ann").await), ["12.00", "0.00", "0.00", "0.00", "0.00", "0.00"]);

    // Months pass; the hold sweep runs every 20 ms; nothing approves a manual plan's sale.
    clock.set_ms(APRIL);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let view = app.admin(Method::GET, "/admin/v1/merchants/shop/conversions/o-1", None).await.json();
    assert_eq!(view["conversion"]["status"], "pending", "{view}");
    assert!(view["approve_at"].is_null());

    // The customer paid: the merchant approves, and the commission is payable.
    let approve = r#"{"adjustment_id":"a-1","txn_id":"o-1","kind":"approve"}"#;
    assert_eq!(app.adjust("shop", &secret, approve).await.status, 201);
    assert_eq!(figures(&balance(&app, "ann").await), ["0.00", "20.00", "8.00", "0.00", "0.00", "12.00"]);
    // A refund after approval is a clawback: reversed, no longer payable.
    let rest = r#"{"adjustment_id":"r-2","txn_id":"o-1","kind":"refund"}"#;
    assert_eq!(app.adjust("shop", &secret, rest).await.status, 201);
    assert_eq!(figures(&balance(&app, "ann").await), ["0.00", "20.00", "20.00", "0.00", "0.00", "0.00"]);

    // March: opening 0, the commission and the pending refund, closing 12.00.
    let march = app.admin(Method::GET, "/admin/v1/merchants/shop/partners/ann/statements/2026-03", None).await;
    assert_eq!(march.status, 200, "{}", String::from_utf8_lossy(&march.body));
    let s = &march.json()["statements"][0];
    assert_eq!(
        (s["currency"].as_str(), s["opening"].as_str(), s["closing"].as_str()),
        (Some("USD"), Some("0.00"), Some("12.00"))
    );
    let lines: Vec<(String, String, String)> = s["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().into(),
                e["amount"].as_str().unwrap().into(),
                e["note"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            ("commission".into(), "20.00".into(), "sale 20% on o-1 (plan on-payment)".into()),
            ("reversal".into(), "-8.00".into(), "refund r-1 on o-1".into()),
        ]
    );
    // April opens where March closed, and the clawback brings it to 0.
    let april = app.admin(Method::GET, "/admin/v1/merchants/shop/partners/ann/statements/2026-04", None).await.json();
    let s = &april["statements"][0];
    assert_eq!((s["opening"].as_str(), s["closing"].as_str()), (Some("12.00"), Some("0.00")));
    assert_eq!(s["entries"][0]["kind"], "clawback");
    assert_eq!(s["entries"][0]["note"], "refund r-2 on o-1");

    // CSV: opening, entries with the running balance, closing.
    let auth = [("authorization", format!("Bearer {ADMIN_TOKEN}")), ("accept", "text/csv".to_string())];
    let url = format!("http://{}/admin/v1/merchants/shop/partners/ann/statements/2026-03", app.admin);
    let csv = String::from_utf8(app.request(Method::GET, url, &auth, Vec::new()).await.body.to_vec()).unwrap();
    let rows: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(rows[0], "line,currency,entry_id,at,kind,txn_id,conversion_id,amount,balance,note");
    assert_eq!(rows[1], "opening,USD,,,,,,,0.00,");
    assert!(
        rows[2].starts_with("entry,USD,") && rows[2].ends_with(",20.00,20.00,sale 20% on o-1 (plan on-payment)"),
        "{}",
        rows[2]
    );
    assert!(rows[3].ends_with(",'-8.00,12.00,refund r-1 on o-1"), "{}", rows[3]);
    assert_eq!(rows[4], "closing,USD,,,,,,,12.00,");

    for path in ["partners/zed/balance", "partners/ann/statements/2026-13", "partners/zed/statements/2026-03"] {
        let r = app.admin(Method::GET, &format!("/admin/v1/merchants/shop/{path}"), None).await;
        assert_eq!(r.status, 404, "{path}");
    }
}

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value, Option<String>) {
    let r = app.admin(Method::POST, &format!("/admin/v1/merchants/shop/{path}"), Some(body)).await;
    let replay = r.header("idempotent-replayed").map(str::to_string);
    (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null), replay)
}

fn lines(run: &Value) -> Vec<(String, String, String)> {
    run["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["partner_id"].as_str().unwrap().into(),
                l["amount"].as_str().unwrap().into(),
                l["state"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// Payout runs: idempotent by id, `409` for another body; `min_amount` and `through`; a
/// failed line is payable again; a clawback after a payout is a negative payable that the
/// next earnings net off; the CSV payment file matches the run; a line settles once.
#[tokio::test]
async fn payout_runs_pay_what_is_payable_and_lines_settle_once() {
    let (clock, shared) = manual_clock();
    clock.set_ms(MARCH);
    let app = TestApp::spawn_with(|_| {}, shared).await;
    let secret = app.demo().await;
    let plan = json!({"currency": "USD", "hold_days": 0, "rules": [{"event": "sale", "percent": "10"}]});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/now", Some(plan)).await.status, 201);
    for p in ["ann", "bob", "cy"] {
        let body = json!({"name": format!("Partner {p}"), "kind": "affiliate", "plan_id": "now"});
        assert!(
            app.admin(Method::PUT, &format!("/admin/v1/merchants/shop/partners/{p}"), Some(body)).await.status < 300
        );
    }
    let sale = |txn: &str, amount: &str, p: &str| {
        format!(r#"{{"txn_id":"{txn}","amount":"{amount}","currency":"USD","partner_id":"{p}"}}"#)
    };
    let approve = |id: &str, txn: &str| format!(r#"{{"adjustment_id":"{id}","txn_id":"{txn}","kind":"approve"}}"#);
    for (txn, amount, p) in [("s1", "500.00", "ann"), ("s2", "300.00", "bob"), ("s3", "20.00", "cy")] {
        assert_eq!(app.convert("shop", &secret, &sale(txn, amount, p)).await.status, 201);
        assert_eq!(app.adjust("shop", &secret, &approve(&format!("a-{txn}"), txn)).await.status, 201);
    }
    // Earned in April: not part of a run through March.
    clock.set_ms(APRIL);
    assert_eq!(app.convert("shop", &secret, &sale("s4", "100.00", "ann")).await.status, 201);
    assert_eq!(app.adjust("shop", &secret, &approve("a-s4", "s4")).await.status, 201);

    let body = json!({"payout_id": "2026-03", "currency": "USD", "min_amount": "5.00", "through": "2026-03-31"});
    let (status, run, _) = post(&app, "payouts", body.clone()).await;
    assert_eq!(status, 201, "{run}");
    // cy's 2.00 is under the minimum and waits; ann's April 10.00 is after `through`.
    assert_eq!(
        lines(&run),
        vec![("ann".into(), "50.00".into(), "pending".into()), ("bob".into(), "30.00".into(), "pending".into())]
    );
    assert_eq!(run["total"], "80.00");
    assert_eq!(figures(&balance(&app, "ann").await), ["0.00", "60.00", "0.00", "0.00", "50.00", "10.00"]);

    // The same id and body: the same run; another body under the id: 409.
    let (status, again, replay) = post(&app, "payouts", body.clone()).await;
    assert_eq!((status, replay.as_deref()), (200, Some("true")));
    assert_eq!(lines(&again), lines(&run));
    let mut other = body.clone();
    other["min_amount"] = json!("1.00");
    let (status, problem, _) = post(&app, "payouts", other).await;
    assert_eq!((status, problem["code"].as_str()), (409, Some("payout_conflict")));

    // The payment file matches the run.
    let auth = [("authorization", format!("Bearer {ADMIN_TOKEN}")), ("accept", "text/csv".to_string())];
    let url = format!("http://{}/admin/v1/merchants/shop/payouts/2026-03", app.admin);
    let csv = String::from_utf8(app.request(Method::GET, url.clone(), &auth, Vec::new()).await.body.to_vec()).unwrap();
    assert_eq!(csv, "partner_id,name,amount,currency,payout_id,reference\r\nann,Partner ann,50.00,USD,2026-03,\r\nbob,Partner bob,30.00,USD,2026-03,\r\n");

    // ann is paid; bob's transfer bounced: his 30.00 is payable again.
    let (status, _, _) = post(&app, "payouts/2026-03/lines/ann:paid", json!({"reference": "SEPA-7781"})).await;
    assert_eq!(status, 200);
    let (status, problem, _) = post(&app, "payouts/2026-03/lines/ann:failed", json!({"reason": "late"})).await;
    assert_eq!((status, problem["code"].as_str()), (409, Some("line_settled")));
    let (status, settled, _) = post(&app, "payouts/2026-03/lines/bob:failed", json!({"reason": "IBAN closed"})).await;
    assert_eq!((status, settled["lines"][1]["state"].as_str()), (200, Some("failed")));
    assert_eq!(figures(&balance(&app, "bob").await), ["0.00", "30.00", "0.00", "0.00", "0.00", "30.00"]);
    assert_eq!(figures(&balance(&app, "ann").await), ["0.00", "60.00", "0.00", "50.00", "0.00", "10.00"]);
    let csv = String::from_utf8(app.request(Method::GET, url, &auth, Vec::new()).await.body.to_vec()).unwrap();
    assert!(csv.contains("ann,Partner ann,50.00,USD,2026-03,SEPA-7781\r\n"), "{csv}");
    assert_eq!(post(&app, "payouts/nope/lines/ann:paid", json!({"reference": "x"})).await.0, 404);
    assert_eq!(post(&app, "payouts/2026-03/lines/cy:paid", json!({"reference": "x"})).await.0, 404);

    // A full refund of ann's paid March sale: a clawback after the payout, payable -40.00
    // (10.00 of April minus 50.00 taken back), carried forward, never hidden.
    let refund = r#"{"adjustment_id":"r-s1","txn_id":"s1","kind":"refund"}"#;
    assert_eq!(app.adjust("shop", &secret, refund).await.status, 201);
    assert_eq!(figures(&balance(&app, "ann").await), ["0.00", "60.00", "50.00", "50.00", "0.00", "-40.00"]);
    // The next earnings net it off: a run pays only what is payable beyond it.
    assert_eq!(app.convert("shop", &secret, &sale("s5", "700.00", "ann")).await.status, 201);
    assert_eq!(app.adjust("shop", &secret, &approve("a-s5", "s5")).await.status, 201);
    let (status, run, _) =
        post(&app, "payouts", json!({"payout_id": "2026-04", "currency": "USD", "through": "2026-04-30"})).await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(
        lines(&run),
        vec![
            ("ann".into(), "30.00".into(), "pending".into()),
            ("bob".into(), "30.00".into(), "pending".into()),
            ("cy".into(), "2.00".into(), "pending".into()),
        ]
    );
}

/// `tally sign-url` with a partner's secret: the signed URL's path and query.
fn signed(secret: &str, url: &str, ts: i64) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sign-url", "--secret", secret, "--timestamp", &ts.to_string(), url])
        .output()
        .expect("tally runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let full = String::from_utf8(out.stdout).unwrap().trim().to_string();
    full.split_once("127.0.0.1").and_then(|(_, rest)| rest.split_once('/')).map(|(_, p)| format!("/{p}")).unwrap()
}

/// Partners read their own conversions and statements with URLs signed by their secret
/// (made here by `tally sign-url`); another partner's data is `404`, a tampered or
/// stale signature `401`; an influencer's reason does not name the partner that sourced.
#[tokio::test]
async fn partners_read_only_their_own_figures_with_signed_urls() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let plan = json!({"currency": "USD", "influence_percent": "5", "rules": [{"event": "sale", "percent": "10"}]});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/plans/p", Some(plan)).await.status, 201);
    let mut secrets = std::collections::BTreeMap::new();
    for p in ["pa", "pb"] {
        let body = json!({"name": p, "kind": "reseller", "plan_id": "p"});
        let r = app.admin(Method::PUT, &format!("/admin/v1/merchants/shop/partners/{p}"), Some(body)).await;
        secrets.insert(p, r.json()["secret"].as_str().unwrap().to_string());
    }
    for (txn, p) in [("s1", "pa"), ("s2", "pb")] {
        let sale = format!(r#"{{"txn_id":"{txn}","amount":"100.00","currency":"USD","partner_id":"{p}"}}"#);
        assert_eq!(app.convert("shop", &secret, &sale).await.status, 201);
    }
    let touch = json!({"account": "acme.com", "partner_id": "pb", "kind": "webinar"}).to_string();
    assert_eq!(app.post_fresh("/v1/merchants/shop/touches", &touch, &secret).await.status, 201);
    let why = json!({"partner_id": "pa", "why": "pa owns the account"});
    assert_eq!(
        app.admin(Method::POST, "/admin/v1/merchants/shop/accounts/acme.com:reassign", Some(why)).await.status,
        200
    );
    let acme = r#"{"txn_id":"acme-1","amount":"200.00","currency":"USD","account":"acme.com"}"#;
    assert_eq!(app.convert("shop", &secret, acme).await.status, 201);

    let now = app.now_secs();
    let base = format!("http://{}", app.public);
    let app = &app;
    let get = |path: String| async move { app.get(&path, &[]).await };
    let own = |p: &str| format!("{base}/v1/partners/{p}/conversions?from=2020-01-01");
    let r = get(signed(&secrets["pa"], &own("pa"), now)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    // In id order; two conversions received in the same millisecond may come either way.
    let find = |v: &Value, txn: &str| -> Value {
        v["conversions"].as_array().unwrap().iter().find(|c| c["txn_id"] == txn).cloned().unwrap_or(Value::Null)
    };
    let mut txns: Vec<&str> =
        v["conversions"].as_array().unwrap().iter().map(|c| c["txn_id"].as_str().unwrap()).collect();
    txns.sort_unstable();
    assert_eq!(txns, ["acme-1", "s1"]);
    assert_eq!(find(&v, "acme-1")["commission"]["amount"], "20.00");

    let r = get(signed(&secrets["pb"], &own("pb"), now)).await;
    let v = r.json();
    let acme = &find(&v, "acme-1");
    assert_eq!((acme["txn_id"].as_str(), acme["credit"].as_str()), (Some("acme-1"), Some("influenced")));
    assert_eq!(acme["commission"]["amount"], "10.00");
    let reason = acme["reason"].as_str().unwrap();
    let names_pa = reason.split_whitespace().any(|w| w.trim_matches(|c: char| !c.is_alphanumeric()) == "pa");
    assert!(!names_pa && reason.ends_with("another partner sourced it"), "{reason}");

    // pa asks for pb's figures with its own key: 404, as for a partner that does not exist.
    assert_eq!(get(signed(&secrets["pa"], &own("pb"), now)).await.status, 404);
    assert_eq!(get(signed(&secrets["pa"], &own("nobody"), now)).await.status, 404);
    let good = signed(&secrets["pa"], &own("pa"), now);
    assert_eq!(get(good.replace("from=2020-01-01", "from=2020-01-02")).await.status, 401, "tampered");
    assert_eq!(get(good.split("&sig=").next().unwrap().to_string()).await.status, 401, "unsigned");
    assert_eq!(get(signed(&secrets["pa"], &own("pa"), now - 3600)).await.status, 401, "stale");

    // Statements: its own, and not another's.
    let month = &tally::domain::clock::format_rfc3339(app.clock.now_ms())[..7];
    let statement = |p: &str| format!("{base}/v1/partners/{p}/statements/{month}");
    let r = get(signed(&secrets["pb"], &statement("pb"), now)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let s = &r.json()["statements"][0];
    assert_eq!((s["opening"].as_str(), s["closing"].as_str()), (Some("0.00"), Some("20.00")));
    assert_eq!(get(signed(&secrets["pb"], &statement("pa"), now)).await.status, 404);
}
