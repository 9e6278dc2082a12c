//! Every way a merchant sends events (SPEC 4.2, 5.1): signed GET postbacks, token mode,
//! batches and server-side clicks, with the same dedupe as the signed POST.

use http::Method;
use serde_json::json;

use crate::helpers::{client, send, start_binary, TestApp, ADMIN_TOKEN, BROWSER};

/// Signs a postback with an implementation independent of tally's: Python's `hmac`,
/// `hashlib`, `base64` and `urllib.parse`. Returns the query string, `sig` last.
fn python_signed_query(secret: &str, path: &str, params: &[(&str, String)]) -> String {
    let script = r#"
import sys, json, hmac, hashlib, base64, urllib.parse
secret, path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
key = base64.b64decode(secret[len("whsec_"):] if secret.startswith("whsec_") else secret)
q = lambda s: urllib.parse.quote(s, safe="")
canonical = "&".join(q(k) + "=" + q(v) for k, v in sorted(params))
mac = hmac.new(key, ("GET\n" + path + "\n" + canonical).encode(), hashlib.sha256).digest()
sig = "v1," + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
print(urllib.parse.urlencode([tuple(p) for p in params] + [("sig", sig)], quote_via=urllib.parse.quote))
"#;
    let pairs: Vec<[&str; 2]> = params.iter().map(|(k, v)| [*k, v.as_str()]).collect();
    let out = std::process::Command::new("python3")
        .args(["-c", script, secret, path, &serde_json::to_string(&pairs).unwrap()])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn sale(txn: &str, ts: i64, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("txn_id", txn.to_string()),
        ("amount", "49.90".into()),
        ("currency", "USD".into()),
        ("ts", ts.to_string()),
    ];
    p.extend_from_slice(extra);
    p
}

#[tokio::test]
async fn signed_get_postbacks_from_an_independent_signer() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let click = app.click("spring").await;
    let now = app.now_secs();

    let query = python_signed_query(
        &secret,
        "/pb/shop",
        &sale("pb-1", now, &[("click_id", click.clone()), ("event", "sale".into())]),
    );
    let r = app.get(&format!("/pb/shop?{query}"), &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["duplicate"], false);
    assert_eq!(j["attribution"]["rule"], "click");
    assert_eq!(j["commission"]["amount"], "9.98");

    let again = app.get(&format!("/pb/shop?{query}"), &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));

    let tampered = query.replace("amount=49.90", "amount=4990.00");
    assert_eq!(app.get(&format!("/pb/shop?{tampered}"), &[]).await.status, 401);

    let q2 = python_signed_query(&secret, "/pb/shop", &sale("pb-2", now, &[]));
    let mut pairs: Vec<&str> = q2.split('&').collect();
    pairs.reverse();
    let reordered = app.get(&format!("/pb/shop?{}", pairs.join("&")), &[]).await;
    assert_eq!(reordered.status, 200, "parameter order does not matter: {}", String::from_utf8_lossy(&reordered.body));

    let dup = app.get(&format!("/pb/shop?{q2}&txn_id=other"), &[]).await;
    assert_eq!(dup.status, 400);
    assert_eq!(dup.json()["code"], "invalid_query");

    let stale = python_signed_query(&secret, "/pb/shop", &sale("pb-3", now - 301, &[]));
    assert_eq!(app.get(&format!("/pb/shop?{stale}"), &[]).await.status, 401);
    let no_sig = stale.split("&sig=").next().unwrap().to_string();
    let missing = app.get(&format!("/pb/shop?{no_sig}"), &[]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["code"], "signature_invalid");

    let unknown = python_signed_query(&secret, "/pb/shop", &sale("pb-4", now, &[("colour", "red".into())]));
    let r = app.get(&format!("/pb/shop?{unknown}"), &[]).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["field"], "colour");
    assert_eq!(app.stored_conversions("shop").await, 2);
}

#[tokio::test]
async fn tally_sign_url_output_is_accepted() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let url = format!("http://{}/pb/shop?txn_id=cli-url-1&event=lead&partner_id=ann", app.public);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sign-url", "--secret", &secret, &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let signed = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let r = app.request(Method::GET, signed, &[], Vec::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["attribution"]["rule"], "explicit");
}

#[tokio::test]
async fn the_same_txn_id_by_get_then_post_is_a_duplicate_or_a_conflict() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let now = app.now_secs();
    let query = python_signed_query(&secret, "/pb/shop", &sale("cross-1", now, &[]));
    assert_eq!(app.get(&format!("/pb/shop?{query}"), &[]).await.status, 200);
    let same = app.convert("shop", &secret, r#"{"txn_id":"cross-1","amount":"49.90","currency":"USD"}"#).await;
    assert_eq!(same.status, 200);
    assert_eq!(same.json()["duplicate"], true);
    let other = app.convert("shop", &secret, r#"{"txn_id":"cross-1","amount":"50.00","currency":"USD"}"#).await;
    assert_eq!(other.status, 409);
    assert_eq!(app.stored_conversions("shop").await, 1);
}

const TOKEN_CONFIG: &str = r#"
public_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[log]
level = "debug"
format = "json"
[[merchants]]
id = "tok"
name = "Token Shop"
secret_file = "SECRET_FILE"
[[partners]]
merchant_id = "tok"
id = "tp"
name = "Token Partner"
kind = "affiliate"
"#;

#[tokio::test]
async fn token_mode_only_from_allowed_ips_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let proc = start_binary(dir.path(), TOKEN_CONFIG).await;
    let http = client();
    let auth =
        vec![("authorization", format!("Bearer {ADMIN_TOKEN}")), ("content-type", "application/json".to_string())];
    let admin = |path: &str| format!("http://{}{path}", proc.admin);

    let body = json!({"name": "Token Shop", "postback_token": true, "allowed_ips": ["127.0.0.1/32"]}).to_string();
    let r = send(&http, Method::PUT, admin("/admin/v1/merchants/tok"), &auth, body.into_bytes()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("the token is shown once").to_string();
    let r = send(
        &http,
        Method::PUT,
        admin("/admin/v1/merchants/tok"),
        &auth,
        json!({"name": "Token Shop", "postback_token": true, "allowed_ips": ["127.0.0.1/32"]}).to_string().into_bytes(),
    )
    .await;
    assert!(r.json().get("token").is_none(), "only once");

    let url = |txn: &str, token: &str| {
        format!("http://{}/pb/tok?txn_id={txn}&event=lead&partner_id=tp&token={token}", proc.public)
    };
    let ok = send(&http, Method::GET, url("t-1", &token), &[], Vec::new()).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let wrong = send(&http, Method::GET, url("t-2", "pbt_wrong"), &[], Vec::new()).await;
    assert_eq!(wrong.status, 401);

    let body = json!({"name": "Token Shop", "postback_token": true, "allowed_ips": ["10.20.0.0/16"]}).to_string();
    assert_eq!(send(&http, Method::PUT, admin("/admin/v1/merchants/tok"), &auth, body.into_bytes()).await.status, 200);
    let refused = send(&http, Method::GET, url("t-3", &token), &[], Vec::new()).await;
    assert_eq!(refused.status, 403, "from an IP outside the allow-list");
    assert_eq!(refused.json()["code"], "ip_not_allowed");

    let rotated =
        send(&http, Method::POST, admin("/admin/v1/merchants/tok/postback-token:rotate"), &auth, Vec::new()).await;
    assert_eq!(rotated.status, 200);
    let new_token = rotated.json()["token"].as_str().unwrap().to_string();
    assert_ne!(new_token, token);

    let logs = std::fs::read_to_string(&proc.log).unwrap();
    assert!(logs.contains("token=REDACTED"), "request logs are written at debug level:\n{logs}");
    for secret in [&token, &new_token] {
        assert!(!logs.contains(secret.as_str()), "a postback token reached the logs");
    }
}

#[tokio::test]
async fn a_batch_stores_the_valid_items_and_reports_the_others() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let items: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            if i % 100 == 7 {
                json!({"txn_id": format!("b-{i}"), "amount": "1.001", "currency": "USD"})
            } else {
                json!({"txn_id": format!("b-{i}"), "amount": "10.00", "currency": "USD", "partner_id": "ann"})
            }
        })
        .collect();
    let body = json!({ "conversions": items }).to_string();
    let id = "msg_batch_1";
    let r = app.post_signed("/v1/merchants/shop/conversions/batch", &body, &secret, id, app.now_secs()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 1000);
    for (i, item) in results.iter().enumerate() {
        assert_eq!(item["index"], i);
        if i % 100 == 7 {
            assert_eq!(item["status"], 422);
            assert_eq!(item["problem"]["field"], "amount");
        } else {
            assert_eq!(item["status"], 201);
            assert_eq!(item["conversion"]["attribution"]["rule"], "explicit");
        }
    }
    assert_eq!(app.stored_conversions("shop").await, 990);
}

#[tokio::test]
async fn a_txn_id_twice_in_one_batch_is_stored_once() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let one = json!({"txn_id": "twice", "amount": "5.00", "currency": "USD", "partner_id": "ann"});
    let changed = json!({"txn_id": "twice", "amount": "6.00", "currency": "USD", "partner_id": "ann"});
    let body = json!({ "conversions": [one, one, changed] }).to_string();
    let r = app.post_signed("/v1/merchants/shop/conversions/batch", &body, &secret, "msg_twice", app.now_secs()).await;
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results[0]["status"], 201);
    assert_eq!(results[1]["status"], 200);
    assert_eq!(results[1]["conversion"]["duplicate"], true);
    assert_eq!(results[1]["conversion"]["conversion_id"], results[0]["conversion"]["conversion_id"]);
    assert_eq!(results[2]["status"], 409);
    assert_eq!(results[2]["problem"]["code"], "duplicate_conflict");
    assert_eq!(app.stored_conversions("shop").await, 1);
}

#[tokio::test]
async fn a_server_side_click_attributes_like_a_redirect() {
    let app = TestApp::spawn().await;
    let secret = app.demo().await;
    let body = json!({"link_id": "spring", "sub1": "app", "ip": "198.51.100.23", "user_agent": BROWSER}).to_string();
    let r = app.post_signed("/v1/merchants/shop/clicks", &body, &secret, "msg_click_1", app.now_secs()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let click_id = r.json()["click_id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["destination"], format!("https://shop.example.com/spring?ref={click_id}&s1=app"));
    let stored = app.stored_click(&click_id).await.unwrap();
    assert_eq!(stored.ip, "198.51.100.0/24");

    let conv = app
        .convert(
            "shop",
            &secret,
            &format!(r#"{{"txn_id":"app-1","amount":"100.00","currency":"USD","click_id":"{click_id}"}}"#),
        )
        .await;
    assert_eq!(conv.status, 201);
    assert_eq!(conv.json()["attribution"]["rule"], "click");
    assert_eq!(conv.json()["commission"]["amount"], "20.00");

    app.demo_merchant("other", "bob", "bobs-link").await;
    let foreign = json!({"link_id": "bobs-link"}).to_string();
    let r = app.post_signed("/v1/merchants/shop/clicks", &foreign, &secret, "msg_click_2", app.now_secs()).await;
    assert_eq!(r.status, 422, "another merchant's link");
    assert_eq!(r.json()["field"], "link_id");
}
