//! Reports and exports over HTTP (SPEC 5.5): exact figures for a scripted history that
//! crosses UTC and Berlin day boundaries (a daylight-saving day among them), with a
//! refund, a reassignment, an influencer and a duplicate; the program report's shares,
//! active partners and median; the streamed ledger export as NDJSON and CSV.

use hyper::Method;
use serde_json::{json, Value};

use super::helpers::{manual_clock, TestApp, ADMIN_TOKEN};

const ANN_CREATED: i64 = 1_772_323_200_000; // 2026-03-01T00:00Z
const BOB_CREATED: i64 = 1_773_964_800_000; // 2026-03-20T00:00Z
const ANN_CLICKS: i64 = 1_774_692_000_000; // 2026-03-28T10:00Z (11:00 in Berlin)
const BOB_CLICK: i64 = 1_774_740_600_000; // 2026-03-28T23:30Z (03-29 00:30 in Berlin)
const ANN_SALE: i64 = 1_774_741_200_000; // 2026-03-28T23:40Z (03-29 00:40 in Berlin)
const BOB_DAY: i64 = 1_774_785_600_000; // 2026-03-29T12:00Z (14:00 CEST: DST began at 01:00Z)
const REFUND: i64 = 1_774_819_800_000; // 2026-03-29T21:30Z (23:30 CEST, still 03-29)
const REASSIGNED_SALE: i64 = 1_774_857_600_000; // 2026-03-30T08:00Z

/// The scripted history; returns the app, the merchant secret and the sale's txn body.
async fn history() -> (TestApp, String, String) {
    let (clock, shared) = manual_clock();
    clock.set_ms(ANN_CREATED);
    let app = TestApp::spawn_with(|_| {}, shared).await;
    let secret = app.demo().await; // merchant shop, partner ann (affiliate), link spring, plan standard
    clock.set_ms(BOB_CREATED);
    let bob =
        json!({"name": "Bob Resells", "kind": "reseller", "tier": "gold", "coupons": ["BOB10"], "plan_id": "standard"});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/bob", Some(bob)).await.status, 201);
    let link = json!({"partner_id": "bob", "destination": "https://shop.example.com/?ref={click_id}",
        "plan_id": "standard", "window_days": 30});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/links/autumn", Some(link)).await.status, 201);

    clock.set_ms(ANN_CLICKS);
    let ann_click = app.click("spring").await;
    clock.advance_ms(5 * 60_000);
    app.click("spring").await; // the same visitor within the window: not unique
    clock.set_ms(BOB_CLICK);
    let bob_click = app.click("autumn").await;

    clock.set_ms(ANN_SALE);
    let sale = format!(r#"{{"txn_id":"o-1","amount":"100.00","currency":"USD","click_id":"{ann_click}"}}"#);
    assert_eq!(app.convert("shop", &secret, &sale).await.status, 201);

    clock.set_ms(BOB_DAY);
    let lead = format!(r#"{{"txn_id":"l-1","event":"lead","click_id":"{bob_click}"}}"#);
    assert_eq!(app.convert("shop", &secret, &lead).await.status, 201);
    let coupon = r#"{"txn_id":"o-2","amount":"50.00","currency":"USD","coupon":"BOB10"}"#;
    assert_eq!(app.convert("shop", &secret, coupon).await.status, 201);
    let nobody = r#"{"txn_id":"o-3","amount":"30.00","currency":"USD"}"#;
    assert_eq!(app.convert("shop", &secret, nobody).await.status, 201);
    let touch = json!({"account": "acme.com", "partner_id": "ann", "kind": "webinar"}).to_string();
    assert_eq!(app.post_fresh("/v1/merchants/shop/touches", &touch, &secret).await.status, 201);

    clock.set_ms(REFUND);
    let refund = r#"{"adjustment_id":"r-1","txn_id":"o-1","kind":"refund","amount":"40.00"}"#;
    assert_eq!(app.adjust("shop", &secret, refund).await.status, 201);

    clock.set_ms(REASSIGNED_SALE - 60_000);
    let why = json!({"partner_id": "bob", "why": "bob took over the account", "by": "pm@shop.example"});
    assert_eq!(
        app.admin(Method::POST, "/admin/v1/merchants/shop/accounts/acme.com:reassign", Some(why)).await.status,
        200
    );
    clock.set_ms(REASSIGNED_SALE);
    let acme = r#"{"txn_id":"o-4","amount":"200.00","currency":"USD","account":"acme.com"}"#;
    let r = app.convert("shop", &secret, acme).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["attribution"]["partner_id"], "bob", "{}", r.json());
    (app, secret, sale)
}

async fn report(app: &TestApp, query: &str) -> Value {
    let r = app.admin(Method::GET, &format!("/admin/v1/merchants/shop/reports/partners?{query}"), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// `(day, partner, clicks, unique, conversions, revenue, commission, reversed, influenced)`.
type Row = (String, String, i64, i64, i64, String, String, String, String);

fn rows(v: &Value) -> Vec<Row> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["currency"], "USD", "{r}");
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            let n = |k: &str| r[k].as_i64().unwrap();
            (
                s("day"),
                s("partner_id"),
                n("clicks"),
                n("unique_clicks"),
                n("conversions"),
                s("revenue"),
                s("commission"),
                s("reversed"),
                s("influenced"),
            )
        })
        .collect()
}

fn row(day: &str, p: &str, (clicks, unique, conversions): (i64, i64, i64), money: [&str; 4]) -> Row {
    let [revenue, commission, reversed, influenced] = money.map(str::to_string);
    (day.into(), p.into(), clicks, unique, conversions, revenue, commission, reversed, influenced)
}

#[tokio::test]
async fn the_partner_report_gives_exact_figures_per_day_in_utc_and_in_berlin() {
    let (app, secret, sale) = history().await;
    let utc = rows(&report(&app, "from=2026-03-28&to=2026-03-30").await);
    assert_eq!(
        utc,
        vec![
            row("2026-03-28", "ann", (2, 1, 1), ["100.00", "20.00", "0.00", "0.00"]),
            row("2026-03-28", "bob", (1, 1, 0), ["0.00", "0.00", "0.00", "0.00"]),
            row("2026-03-29", "ann", (0, 0, 0), ["0.00", "0.00", "8.00", "0.00"]),
            row("2026-03-29", "bob", (0, 0, 2), ["50.00", "25.00", "0.00", "0.00"]),
            row("2026-03-30", "ann", (0, 0, 0), ["0.00", "0.00", "0.00", "200.00"]),
            row("2026-03-30", "bob", (0, 0, 1), ["200.00", "40.00", "0.00", "0.00"]),
        ]
    );
    // Berlin: 03-29 has 23 hours; bob's click and ann's sale of late 03-28 UTC fall on it.
    let berlin = report(&app, "from=2026-03-28&to=2026-03-30&tz=Europe%2FBerlin").await;
    assert_eq!(berlin["tz"], "Europe/Berlin");
    assert_eq!(
        rows(&berlin),
        vec![
            row("2026-03-28", "ann", (2, 1, 0), ["0.00", "0.00", "0.00", "0.00"]),
            row("2026-03-29", "ann", (0, 0, 1), ["100.00", "20.00", "8.00", "0.00"]),
            row("2026-03-29", "bob", (1, 1, 2), ["50.00", "25.00", "0.00", "0.00"]),
            row("2026-03-30", "ann", (0, 0, 0), ["0.00", "0.00", "0.00", "200.00"]),
            row("2026-03-30", "bob", (0, 0, 1), ["200.00", "40.00", "0.00", "0.00"]),
        ]
    );

    // A duplicate, a conflicting retry and a badly signed request change nothing.
    assert_eq!(app.convert("shop", &secret, &sale).await.status, 200);
    let conflict = sale.replace("100.00", "999.00");
    assert_eq!(app.convert("shop", &secret, &conflict).await.status, 409);
    let forged = app
        .post_signed(
            "/v1/merchants/shop/conversions",
            &sale.replace("o-1", "o-9"),
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "msg_x",
            app.now_secs(),
        )
        .await;
    assert_eq!(forged.status, 401);
    assert_eq!(rows(&report(&app, "from=2026-03-28&to=2026-03-30").await), utc);

    // CSV: the same rows, a header, formula-safe cells.
    let auth = [("authorization", format!("Bearer {ADMIN_TOKEN}")), ("accept", "text/csv".to_string())];
    let url = format!("http://{}/admin/v1/merchants/shop/reports/partners?from=2026-03-28&to=2026-03-30", app.admin);
    let r = app.request(Method::GET, url, &auth, Vec::new()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines[0],
        "day,partner_id,currency,clicks,unique_clicks,conversions,revenue,commission,reversed,influenced,self_reported,flagged,flagged_commission"
    );
    assert_eq!(lines[1], "2026-03-28,ann,USD,2,1,1,100.00,20.00,0.00,0.00,0,0,0.00");
    assert_eq!(lines.len(), 7);

    // Bad ranges name their field.
    for (q, field) in [
        ("from=2026-01-01&to=2027-02-05", "to"),
        ("from=2026-03-02&to=2026-03-01", "to"),
        ("from=2026-03-01&to=2026-03-02&tz=Nowhere%2FLand", "tz"),
        ("to=2026-03-02", "from"),
    ] {
        let r = app.admin(Method::GET, &format!("/admin/v1/merchants/shop/reports/partners?{q}"), None).await;
        assert_eq!((r.status, r.json()["field"].as_str().map(str::to_string)), (422, Some(field.to_string())), "{q}");
    }
    let r =
        app.admin(Method::GET, "/admin/v1/merchants/nope/reports/partners?from=2026-03-01&to=2026-03-02", None).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn the_program_report_gives_shares_active_partners_and_the_median_time_to_first_conversion() {
    let (app, _, _) = history().await;
    let r =
        app.admin(Method::GET, "/admin/v1/merchants/shop/reports/program?from=2026-03-28&to=2026-03-30", None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    // 100 + 50 + 200 sourced, 30 unattributed, the lead has no amount; 200 influenced by ann.
    assert_eq!(
        v["revenue"],
        json!([{"currency": "USD", "total": "380.00", "sourced": "350.00",
        "influenced": "200.00", "sourced_share": 0.9211, "influenced_share": 0.5263,
        "self_reported": 0, "flagged": 0, "flagged_commission": "0.00"}])
    );
    assert_eq!(
        v["active_partners"],
        json!({"as_of": "2026-03-30", "window_days": 90, "total": 2,
        "by_kind": {"affiliate": 1, "reseller": 1}, "by_tier": {"gold": 1, "none": 1}})
    );
    let t = &v["time_to_first_conversion"];
    // ann: created 03-01, first sale 03-28 23:40 (27.99 days); bob: 03-20 to 03-29 12:00 (9.5).
    assert_eq!(t["partners"][0]["partner_id"], "ann");
    assert_eq!(t["partners"][0]["days"], 27.99);
    assert_eq!(t["partners"][1]["days"], 9.5);
    // The median of the exact waits (27 d 23 h 40 min and 9 d 12 h), then rounded.
    assert_eq!(t["median_days"], 18.74, "{t}");
    // Before any conversion: nobody is active, no median.
    let r =
        app.admin(Method::GET, "/admin/v1/merchants/shop/reports/program?from=2026-03-01&to=2026-03-02", None).await;
    let v = r.json();
    assert_eq!(
        (v["active_partners"]["total"].as_i64(), v["time_to_first_conversion"]["median_days"].is_null()),
        (Some(0), true)
    );
    assert_eq!(v["revenue"], json!([]));
}

#[tokio::test]
async fn the_ledger_export_streams_every_entry_in_order_and_resumes_after_one() {
    let (app, _, _) = history().await;
    let get = |query: &'static str, csv: bool| {
        let mut headers = vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))];
        if csv {
            headers.push(("accept", "text/csv".to_string()));
        }
        let url = format!("http://{}/admin/v1/merchants/shop/ledger{query}", app.admin);
        let app = &app;
        async move { app.request(Method::GET, url, &headers, Vec::new()).await }
    };
    let r = get("", false).await;
    assert_eq!((r.status, r.header("content-type")), (200, Some("application/x-ndjson")));
    let lines: Vec<Value> =
        String::from_utf8(r.body.to_vec()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let shape: Vec<(String, String, String, String)> = lines
        .iter()
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap().to_string();
            (s("partner_id"), s("kind"), s("txn_id"), s("amount"))
        })
        .collect();
    let e = |p: &str, k: &str, t: &str, a: &str| (p.to_string(), k.to_string(), t.to_string(), a.to_string());
    assert_eq!(
        shape,
        vec![
            e("ann", "commission", "o-1", "20.00"),
            e("bob", "commission", "l-1", "15.00"),
            e("bob", "commission", "o-2", "10.00"),
            e("ann", "reversal", "o-1", "-8.00"),
            e("bob", "commission", "o-4", "40.00"),
        ]
    );
    let ids: Vec<&str> = lines.iter().map(|l| l["entry_id"].as_str().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "entry order");
    assert_eq!(lines[3]["at"], "2026-03-29T21:30:00.000Z");

    // Resume after the second entry; one partner only; a day range.
    let after = format!("?after={}", ids[1]);
    let r = get(Box::leak(after.into_boxed_str()), false).await;
    assert_eq!(String::from_utf8(r.body.to_vec()).unwrap().lines().count(), 3);
    let r = get("?partner_id=ann", false).await;
    assert_eq!(String::from_utf8(r.body.to_vec()).unwrap().lines().count(), 2);
    let r = get("?from=2026-03-29&to=2026-03-29", false).await;
    assert_eq!(String::from_utf8(r.body.to_vec()).unwrap().lines().count(), 3);

    // CSV: a header, and the negative amount defused for spreadsheets.
    let r = get("?partner_id=ann", true).await;
    assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let csv: Vec<&str> = text.split("\r\n").collect();
    assert_eq!(csv[0], "entry_id,at,partner_id,kind,txn_id,conversion_id,amount,currency");
    assert!(csv[2].ends_with(",reversal,o-1,") || csv[2].contains(",reversal,o-1,"), "{}", csv[2]);
    assert!(csv[2].ends_with(",'-8.00,USD"), "{}", csv[2]);

    for (q, field) in [("?partner_id=zed", "partner_id"), ("?after=nope", "after"), ("?from=2026-03-01", "to")] {
        let r = get(q, false).await;
        assert_eq!((r.status, r.json()["field"].as_str().map(str::to_string)), (422, Some(field.to_string())), "{q}");
    }
}

#[tokio::test]
async fn the_admin_page_is_served_from_the_binary_with_a_strict_policy() {
    let app = TestApp::spawn().await;
    for (path, kind) in
        [("/admin/ui", "text/html"), ("/admin/ui/app.js", "text/javascript"), ("/admin/ui/app.css", "text/css")]
    {
        let r = app.request(Method::GET, format!("http://{}{path}", app.admin), &[], Vec::new()).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap().starts_with(kind), "{path}");
        let csp = r.header("content-security-policy").unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
    }
    let html = app.request(Method::GET, format!("http://{}/admin/ui", app.admin), &[], Vec::new()).await;
    let html = String::from_utf8(html.body.to_vec()).unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page loads nothing from elsewhere");
    let r = app.request(Method::GET, format!("http://{}/admin/ui/other.js", app.admin), &[], Vec::new()).await;
    assert_eq!(r.status, 404);
}

/// The admin page in headless Chromium (Debian's, driven by playwright-core) against a
/// tally holding the scripted history: every figure it shows equals the API's, the token
/// is kept nowhere but in the tab's memory, the CSV download works, and a screenshot is
/// taken (`admin-ui.png` under cargo's test temp directory).
#[tokio::test]
async fn the_admin_page_shows_the_api_figures_in_a_real_browser() {
    let browser_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::path::Path::new("/usr/bin/chromium");
    if !chromium.exists() || !browser_dir.join("node_modules/playwright-core").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the browser test: scripts/ensure-deps test installs Chromium and playwright-core"
        );
        eprintln!("skipped: no Chromium or playwright-core here (scripts/ensure-deps test installs them)");
        return;
    }
    let _one_at_a_time = super::helpers::heavy_test().await;
    let (app, _, _) = history().await;
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-ui.png");
    let _ = std::fs::remove_file(&shot);
    let out = tokio::process::Command::new("node")
        .arg("ui.mjs")
        .current_dir(&browser_dir)
        .env("TALLY_ADMIN", format!("http://{}", app.admin))
        .env("TALLY_TOKEN", ADMIN_TOKEN)
        .env("TALLY_MERCHANT", "shop")
        .env("TALLY_FROM", "2026-03-27")
        .env("TALLY_TO", "2026-03-31")
        .env("TALLY_TZ", "Europe/Berlin")
        .env("SCREENSHOT", &shot)
        .env("CHROMIUM", chromium)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser test failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON summary");
    assert_eq!(summary["rows"], 5, "{summary}");
    assert_eq!(summary["program_ok"], true);
    assert!(summary["checked_cells"].as_u64().unwrap() >= 45, "{summary}");
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "a screenshot at {}", shot.display());
    eprintln!("admin page screenshot: {}", shot.display());
}

/// `tally rollups check` finds rollups that miss events (here: kept with rollups off),
/// `tally rollups rebuild` recomputes them, and the reports then show the events.
#[tokio::test]
async fn rollups_check_finds_missing_cells_and_rebuild_restores_them() {
    let mut app =
        TestApp::spawn_with(|s| s.reports.rollups = false, std::sync::Arc::new(tally::domain::clock::SystemClock))
            .await;
    let secret = app.demo().await;
    let click = app.click("spring").await;
    let sale = format!(r#"{{"txn_id":"o-1","amount":"10.00","currency":"USD","click_id":"{click}"}}"#);
    let r = app.convert("shop", &secret, &sale).await;
    assert_eq!(r.status, 201);
    app.stop().await;
    let data_dir = app.dir.path().join("db");
    let run = |action: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["rollups", action])
            .current_dir(app.dir.path())
            .env("TALLY_DATA_DIR", &data_dir)
            .output()
            .expect("tally runs")
    };
    let out = run("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("differ") && text.contains("shop/"), "{text}");
    let out = run("rebuild");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 clicks, 1 conversions, 1 ledger entries"));
    let out = run("check");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));

    let app = TestApp::reopen(app).await;
    let today = tally::domain::clock::format_rfc3339(app.clock.now_ms())[..10].to_string();
    let v = report(&app, &format!("from={today}&to={today}")).await;
    assert_eq!(v["rows"][0]["clicks"], 1, "{v}");
    assert_eq!(v["rows"][0]["commission"], "2.00", "{v}");
}

/// A storage error in the middle of an export ends the response without its terminating
/// chunk: the client can tell the file is incomplete (and resume with `after=`). The
/// error is real: data blocks of the store's large files are overwritten on disk.
#[tokio::test]
async fn a_storage_error_mid_export_cuts_the_response_visibly() {
    let mut app = TestApp::spawn().await;
    let secret = app.demo().await;
    let click = app.click("spring").await;
    for b in 0..4 {
        let items: Vec<Value> = (0..1000)
            .map(|i| json!({"txn_id": format!("b{b}-{i}"), "amount": "10.00", "currency": "USD", "click_id": click}))
            .collect();
        let body = json!({ "conversions": items }).to_string();
        let r = app.post_fresh("/v1/merchants/shop/conversions/batch", &body, &secret).await;
        assert_eq!(r.status, 200);
    }
    let store = app.app.as_ref().unwrap().store().expect("single node").clone();
    tokio::task::spawn_blocking(move || store.compact_all().unwrap()).await.unwrap();
    app.stop().await;
    // Overwrite the middle of every large table file: data blocks, not the index or
    // footer at the end, so the store still opens and fails only when the blocks are read.
    let db = app.dir.path().join("db");
    let mut spoiled = 0;
    for entry in std::fs::read_dir(&db).unwrap() {
        let path = entry.unwrap().path();
        let len = std::fs::metadata(&path).unwrap().len();
        if path.extension().is_some_and(|e| e == "sst") && len > 64 << 10 {
            let mut bytes = std::fs::read(&path).unwrap();
            let mid = bytes.len() / 3;
            bytes[mid..mid + 4096].fill(0xA5);
            std::fs::write(&path, bytes).unwrap();
            spoiled += 1;
        }
    }
    assert!(spoiled > 0, "no large table file to spoil");
    let app = TestApp::reopen(app).await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(app.admin).await.unwrap();
    let request = format!(
        "GET /admin/v1/merchants/shop/ledger?partner_id=ann HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(300)]);
    assert!(text.contains("transfer-encoding: chunked"), "streamed");
    let lines = text.matches("\"kind\":\"commission\"").count();
    assert!(lines > 0 && lines < 4000, "cut somewhere in the middle: {lines} entries arrived");
    assert!(!text.ends_with("0\r\n\r\n"), "the response must not end like a complete one");
}
