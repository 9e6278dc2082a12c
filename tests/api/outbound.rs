//! Outbound partner postbacks (SPEC 10) end to end: conversions and adjustments over
//! HTTP, deliveries to a local receiver (`allow_private = true`), retries on the schedule
//! with an injected clock, parking behind a `410`, and no delivery lost to `kill -9`.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tally::domain::clock::{Clock, ManualClock, SystemClock};

use crate::helpers::*;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// What the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A local partner endpoint: answers the queued statuses in order, then `default`.
#[derive(Clone, Default)]
pub struct Receiver {
    pub addr: Option<SocketAddr>,
    pub seen: Arc<Mutex<Vec<Received>>>,
    pub script: Arc<Mutex<VecDeque<u16>>>,
    pub default: Arc<Mutex<u16>>,
    /// Held this long before answering.
    pub delay: Arc<Mutex<Duration>>,
    /// Requests whose head arrived, answered or not yet.
    pub arrived: Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    pub async fn start(default: u16) -> Receiver {
        Self::start_on("127.0.0.1:0", default).await
    }

    pub async fn start_on(addr: &str, default: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let r = Receiver { addr: Some(listener.local_addr().unwrap()), ..Receiver::default() };
        *r.default.lock().unwrap() = default;
        let me = r.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, std::convert::Infallible>(me.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        r
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        let method = req.method().to_string();
        let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        let headers =
            req.headers().iter().map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string())).collect();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        tokio::time::sleep(delay).await;
        let status = self.script.lock().unwrap().pop_front().unwrap_or(*self.default.lock().unwrap());
        self.seen.lock().unwrap().push(Received { method, target, headers, body, status });
        Response::builder().status(status).body(Full::new(Bytes::from_static(b"ok"))).unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr.unwrap())
    }

    pub fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until the receiver has seen `n` requests (at most 20 s).
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let started = std::time::Instant::now();
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{} of {n} requests arrived: {seen:#?}", seen.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub(crate) fn outbound_settings(s: &mut tally::config::Settings) {
    s.outbound.allow_private = true;
    s.outbound.poll_interval_ms = 20;
}

/// `demo()` plus an `outbound` on partner `ann`; returns the merchant's secret.
pub(crate) async fn with_outbound(app: &TestApp, outbound: Value) -> String {
    let secret = app.demo().await;
    let p = json!({"name": "Ann's Blog", "kind": "affiliate", "coupons": ["ann-10"], "outbound": outbound});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/ann", Some(p)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    secret
}

/// A partner `bob` with `outbound`, created now: its signing secret is in the answer.
async fn partner_with_outbound(app: &TestApp, outbound: Value) -> String {
    let p =
        json!({"name": "Bob", "kind": "affiliate", "coupons": ["bob-10"], "plan_id": "standard", "outbound": outbound});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/bob", Some(p)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["secret"].as_str().expect("partner secret").to_string()
}

pub(crate) async fn deliveries(app: &TestApp, query: &str) -> Vec<Value> {
    let r = app.admin(Method::GET, &format!("/admin/v1/merchants/shop/deliveries{query}"), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["deliveries"].as_array().unwrap().clone()
}

/// Waits until `query` lists `n` deliveries.
pub(crate) async fn wait_deliveries(app: &TestApp, query: &str, n: usize) -> Vec<Value> {
    let started = std::time::Instant::now();
    loop {
        let d = deliveries(app, query).await;
        if d.len() >= n {
            return d;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{query}: {} of {n}: {d:#?}", d.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_get_postback_gets_its_macros_filled_and_percent_encoded() {
    let app = TestApp::spawn_with(outbound_settings, Arc::new(SystemClock)).await;
    let rx = Receiver::start(200).await;
    let url = rx.url("/pb?cid={click_id}&t={txn_id}&e={event}&amt={amount}&cur={currency}&c={commission}&st={status}&s1={sub1}&s2={sub2}&p={partner_id}&l={link_id}&w={webhook_id}");
    let secret = with_outbound(&app, json!({"url": url, "method": "GET"})).await;
    let r = app.get("/c/spring?sub1=a%20b%26c%3Dd%2F%C3%A9", &[("user-agent", BROWSER.to_string())]).await;
    assert_eq!(r.status, 302);
    let click = click_id_of(r.header("location").unwrap());
    // A minute after the click: a sale in the same instant would be flagged as click injection.
    let occurred = tally::domain::clock::format_rfc3339({
        use tally::domain::clock::Clock;
        SystemClock.now_ms() + 60_000
    });
    let body = json!({"txn_id": "order#1?x", "event": "sale", "amount": "50.00", "currency": "USD", "click_id": click, "occurred_at": occurred});
    let r = app.convert("shop", &secret, &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let conversion_id = r.json()["conversion_id"].as_str().unwrap().to_string();

    let got = rx.wait_for(1).await;
    assert_eq!(got[0].method, "GET");
    let delivery = &wait_deliveries(&app, "?state=delivered", 1).await[0];
    let webhook_id = delivery["webhook_id"].as_str().unwrap();
    let want = format!(
        "/pb?cid={click}&t=order%231%3Fx&e=sale&amt=50.00&cur=USD&c=10.00&st=pending&s1=a%20b%26c%3Dd%2F%C3%A9&s2=&p=ann&l=spring&w={webhook_id}"
    );
    assert_eq!(got[0].target, want);
    assert_eq!(delivery["values"]["conversion_id"], conversion_id);
    assert_eq!(delivery["attempts"][0]["status"], 200);
    assert_eq!(delivery["attempt_count"], 1);

    // GET fires on `created` only by default: an approval sends nothing.
    let r = app.adjust("shop", &secret, r#"{"adjustment_id":"a-1","txn_id":"order#1?x","kind":"approve"}"#).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.seen().len(), 1);
    assert_eq!(metric(&app, "tally_outbound_deliveries_total{outcome=\"delivered\"}").await, 1.0);
}

#[tokio::test]
async fn a_post_webhook_is_verified_by_the_standardwebhooks_library() {
    let app = TestApp::spawn_with(outbound_settings, Arc::new(SystemClock)).await;
    let rx = Receiver::start(204).await;
    let secret = app.demo().await;
    let partner_secret = partner_with_outbound(&app, json!({"url": rx.url("/hooks/tally"), "method": "POST"})).await;
    let body = json!({"txn_id": "o-1", "event": "sale", "amount": "80.00", "currency": "USD", "partner_id": "bob"});
    assert_eq!(app.convert("shop", &secret, &body.to_string()).await.status, 201);
    let r =
        app.adjust("shop", &secret, r#"{"adjustment_id":"r-1","txn_id":"o-1","kind":"refund","amount":"20.00"}"#).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let got = rx.wait_for(2).await;
    let script = r#"
import sys, json
from standardwebhooks.webhooks import Webhook
secret, headers, body = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
print(json.dumps(Webhook(secret).verify(body, headers)))
"#;
    let mut events = Vec::new();
    for g in &got {
        assert_eq!(g.method, "POST");
        assert_eq!(g.header("content-type"), Some("application/json"));
        let headers: serde_json::Map<String, Value> =
            g.headers.iter().map(|(n, v)| (n.clone(), Value::String(v.clone()))).collect();
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                script,
                &partner_secret,
                &Value::Object(headers).to_string(),
                &String::from_utf8_lossy(&g.body),
            ])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "standardwebhooks refused tally's webhook (scripts/ensure-deps test installs the package): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
        events.push(verified);
    }
    // In order per partner and conversion: created, then the reversal with its negative delta.
    assert_eq!(events[0]["type"], "conversion.created");
    assert_eq!(events[0]["data"]["commission"], "16.00");
    assert_eq!(events[0]["data"]["txn_id"], "o-1");
    assert_eq!(events[1]["type"], "conversion.reversed");
    assert_eq!(events[1]["data"]["commission"], "-4.00");
    assert_eq!(events[1]["data"]["status"], "pending", "a partial refund leaves the status");
    assert_ne!(got[0].header("webhook-id"), got[1].header("webhook-id"));

    // During a secret rotation a webhook carries both signatures: either secret verifies it.
    let r = app.admin(Method::POST, "/admin/v1/merchants/shop/partners/bob/secrets:rotate", None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let new_secret = r.json()["secret"].as_str().unwrap().to_string();
    let r = app.adjust("shop", &secret, r#"{"adjustment_id":"a-2","txn_id":"o-1","kind":"approve"}"#).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let got = rx.wait_for(3).await;
    let approved = &got[2];
    assert_eq!(approved.header("webhook-signature").unwrap().split(' ').count(), 2, "two signatures");
    let headers: serde_json::Map<String, Value> =
        approved.headers.iter().map(|(n, v)| (n.clone(), Value::String(v.clone()))).collect();
    for key in [&partner_secret, &new_secret] {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                script,
                key,
                &Value::Object(headers.clone()).to_string(),
                &String::from_utf8_lossy(&approved.body),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    // A tampered body fails the same verification.
    let g = &got[0];
    let headers: serde_json::Map<String, Value> =
        g.headers.iter().map(|(n, v)| (n.clone(), Value::String(v.clone()))).collect();
    let tampered = String::from_utf8_lossy(&g.body).replace("16.00", "99.00");
    let out = std::process::Command::new("python3")
        .args(["-c", script, &partner_secret, &Value::Object(headers).to_string(), &tampered])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a tampered body must not verify");
}

#[tokio::test]
async fn failures_are_retried_on_the_schedule_with_the_same_webhook_id_and_fresh_signatures() {
    let (clock, shared): (ManualClock, Arc<dyn Clock>) = manual_clock();
    let app = TestApp::spawn_with(outbound_settings, shared).await;
    let rx = Receiver::start(200).await;
    rx.script.lock().unwrap().extend([500, 500, 500]);
    let secret = app.demo().await;
    partner_with_outbound(&app, json!({"url": rx.url("/hook"), "method": "POST"})).await;
    let body = json!({"txn_id": "r-1", "event": "lead", "partner_id": "bob"});
    assert_eq!(app.convert("shop", &secret, &body.to_string()).await.status, 201);

    // SPEC 10: 5 s, 5 min, 30 min after the 1st, 2nd, 3rd failure, plus at most 10 % jitter.
    let waits = [5_000, 300_000, 1_800_000];
    rx.wait_for(1).await;
    for (i, wait) in waits.iter().enumerate() {
        // Not before its time: 1 ms short of the earliest moment, nothing is sent.
        clock.advance_ms(wait - 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(rx.seen().len(), i + 1, "attempt {} came early", i + 2);
        clock.advance_ms(wait / 10 + 1);
        rx.wait_for(i + 2).await;
    }
    let got = wait_deliveries(&app, "?state=delivered", 1).await;
    let d = &got[0];
    assert_eq!(d["attempt_count"], 4);
    let statuses: Vec<_> = d["attempts"].as_array().unwrap().iter().map(|a| a["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    let seen = rx.seen();
    let ids: HashSet<_> = seen.iter().map(|r| r.header("webhook-id").unwrap().to_string()).collect();
    assert_eq!(ids.len(), 1, "one webhook-id on every attempt");
    assert_eq!(ids.iter().next().unwrap(), d["webhook_id"].as_str().unwrap());
    let sigs: HashSet<_> = seen.iter().map(|r| r.header("webhook-signature").unwrap().to_string()).collect();
    assert_eq!(sigs.len(), 4, "a fresh timestamp and signature on every attempt");
    let times: Vec<i64> = seen.iter().map(|r| r.header("webhook-timestamp").unwrap().parse().unwrap()).collect();
    for (i, wait) in waits.iter().enumerate() {
        let gap = (times[i + 1] - times[i]) * 1000;
        assert!(gap >= wait - 1000 && gap <= wait + wait / 10 + 1000, "gap {i}: {gap} ms for {wait} ms");
    }
    assert_eq!(metric(&app, "tally_outbound_deliveries_total{outcome=\"failed\"}").await, 3.0);
}

#[tokio::test]
async fn a_410_parks_the_endpoint_and_enabling_it_delivers_what_was_parked() {
    let app = TestApp::spawn_with(outbound_settings, Arc::new(SystemClock)).await;
    let rx = Receiver::start(410).await;
    let secret = app.demo().await;
    partner_with_outbound(&app, json!({"url": rx.url("/gone"), "method": "POST"})).await;
    for i in 0..3 {
        let body = json!({"txn_id": format!("g-{i}"), "event": "lead", "partner_id": "bob"});
        assert_eq!(app.convert("shop", &secret, &body.to_string()).await.status, 201);
    }
    let parked = wait_deliveries(&app, "?state=parked", 3).await;
    assert_eq!(parked.len(), 3);
    // Those in flight together each got the 410; once parked, nothing more is sent.
    let sent = rx.seen().len();
    assert!((1..=3).contains(&sent), "{sent}");
    let body = json!({"txn_id": "g-3", "event": "lead", "partner_id": "bob"});
    assert_eq!(app.convert("shop", &secret, &body.to_string()).await.status, 201);
    wait_deliveries(&app, "?state=parked", 4).await;
    assert_eq!(rx.seen().len(), sent, "a delivery to a parked endpoint is parked, not sent");
    assert_eq!(deliveries(&app, "?state=pending").await.len(), 0);
    assert_eq!(metric(&app, "tally_outbound_deliveries_total{outcome=\"parked\"}").await, 4.0);

    *rx.default.lock().unwrap() = 200;
    let r = app.admin(Method::POST, "/admin/v1/merchants/shop/partners/bob/outbound:enable", None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["resumed"], 4);
    assert!(r.json()["was_disabled_since"].is_string());
    let delivered = wait_deliveries(&app, "?state=delivered&partner_id=bob", 4).await;
    assert_eq!(delivered.len(), 4);
    assert_eq!(rx.seen().len(), sent + 4);

    // :retry sends a delivered one again, with its webhook-id.
    let id = delivered[0]["id"].as_str().unwrap();
    let r = app.admin(Method::POST, &format!("/admin/v1/merchants/shop/deliveries/{id}:retry"), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let again = rx.wait_for(sent + 5).await;
    assert_eq!(again[sent + 4].header("webhook-id"), delivered[0]["webhook_id"].as_str());

    // Unknown ids and bad filters are clear errors.
    let r = app.admin(Method::POST, "/admin/v1/merchants/shop/deliveries/01JD0000000000000000000000:retry", None).await;
    assert_eq!(r.status, 404);
    let r = app.admin(Method::GET, "/admin/v1/merchants/shop/deliveries?state=lost", None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "invalid_query");
    let r = app.admin(Method::POST, "/admin/v1/merchants/shop/partners/nobody/outbound:enable", None).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn no_delivery_is_lost_to_kill_9() {
    let _heavy = heavy_test().await;
    let dir = tempfile::tempdir().unwrap();
    // Each answer takes 300 ms: with 4 in flight, 200 deliveries take about 15 s, so the
    // kill finds most of them pending and some in flight.
    let rx = Receiver::start(200).await;
    *rx.delay.lock().unwrap() = Duration::from_millis(300);
    let config = format!(
        "[limits]\nmerchant_per_second = 1000000\nmerchant_burst = 1000000\n\n\
         [outbound]\nallow_private = true\nconcurrency = 4\npoll_interval_ms = 50\n\n\
         [[merchants]]\nid = \"shop\"\nname = \"Shop\"\nsecret_file = \"SECRET_FILE\"\n\n\
         [[plans]]\nmerchant_id = \"shop\"\nid = \"std\"\ncurrency = \"USD\"\nrules = [{{ event = \"lead\", flat = \"1.00\" }}]\n\n\
         [[partners]]\nmerchant_id = \"shop\"\nid = \"ann\"\nname = \"Ann\"\nkind = \"affiliate\"\nplan_id = \"std\"\n\
         outbound = {{ url = \"{}\", method = \"GET\" }}\n",
        rx.url("/pb?t={txn_id}&w={webhook_id}")
    );
    let secret = tally::signing::WebhookSecret::generate();
    std::fs::write(dir.path().join("crash.whsec"), secret.expose_text()).unwrap();
    let mut proc = start_binary(dir.path(), &config).await;
    let client = client();
    for i in 0..200 {
        let body = json!({"txn_id": format!("k-{i}"), "event": "lead", "partner_id": "ann"}).to_string();
        let id = format!("msg_k{i}");
        let mut headers = vec![("content-type", "application/json".to_string())];
        headers.extend(webhook_headers(&secret, &id, unix_now(), body.as_bytes()));
        let url = format!("http://{}/v1/merchants/shop/conversions", proc.public);
        let r = send(&client, Method::POST, url, &headers, body.into_bytes()).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    rx.wait_for(12).await;
    proc.child.kill().await.unwrap();
    let before = rx.seen().len();
    let in_flight = rx.arrived.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(before < 200, "the kill came after every delivery ({before})");
    assert!(in_flight >= 1, "no delivery was in flight at the kill");

    *rx.delay.lock().unwrap() = Duration::ZERO;
    let proc = start_binary(dir.path(), &config).await;
    let started = std::time::Instant::now();
    let txn = |r: &Received| r.target.split('&').next().unwrap().trim_start_matches("/pb?t=").to_string();
    loop {
        let answered: HashSet<String> = rx.seen().iter().filter(|r| r.status == 200).map(txn).collect();
        if answered.len() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of 200 delivered after the restart; log:\n{}",
            answered.len(),
            std::fs::read_to_string(&proc.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At least once, and with the same webhook-id when twice.
    let mut ids: std::collections::HashMap<String, HashSet<String>> = Default::default();
    for r in rx.seen() {
        let w = r.target.rsplit("w=").next().unwrap().to_string();
        ids.entry(txn(&r)).or_default().insert(w);
    }
    assert!(ids.values().all(|w| w.len() == 1), "a delivery sent twice kept its webhook-id");
    let resent = rx.seen().len() - 200;
    eprintln!("kill -9: {before} answered and {in_flight} in flight at the kill; {resent} sent twice in all");
}

#[tokio::test]
async fn a_private_destination_is_refused_without_allow_private() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let p = json!({"name": "Bob", "kind": "affiliate", "outbound": {"url": "http://127.0.0.1/pb?c={click_id}", "method": "GET"}});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/shop/partners/bob", Some(p)).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["field"], "outbound.url");
}
