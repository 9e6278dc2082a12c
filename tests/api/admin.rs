//! The admin API (SPEC 5.2, 5.3): bearer token, secrets returned once, validation.

use http::Method;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn admin_needs_the_bearer_token() {
    let app = TestApp::spawn().await;
    for auth in [None, Some("Bearer wrong-token-0123456789"), Some("Basic abc")] {
        let headers: Vec<(&str, String)> = auth.map(|a| ("authorization", a.to_string())).into_iter().collect();
        let r = app
            .request(Method::GET, format!("http://{}/admin/v1/merchants/shop", app.admin), &headers, Vec::new())
            .await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.json()["code"], "unauthorized");
    }
    assert_eq!(app.request(Method::GET, format!("http://{}/healthz", app.admin), &[], Vec::new()).await.status, 200);
    assert_eq!(app.request(Method::GET, format!("http://{}/readyz", app.admin), &[], Vec::new()).await.status, 200);
}

#[tokio::test]
async fn merchant_secret_is_returned_once() {
    let app = TestApp::spawn().await;
    let first = app.admin(Method::PUT, "/admin/v1/merchants/acme", Some(json!({"name": "Acme"}))).await;
    assert_eq!(first.status, 201);
    assert!(first.json()["secret"].as_str().unwrap().starts_with("whsec_"));
    let second = app.admin(Method::PUT, "/admin/v1/merchants/acme", Some(json!({"name": "Acme Inc"}))).await;
    assert_eq!(second.status, 200);
    assert!(second.json().get("secret").is_none());
    let got = app.admin(Method::GET, "/admin/v1/merchants/acme", None).await;
    assert_eq!(got.json()["name"], "Acme Inc");
    assert!(!String::from_utf8_lossy(&got.body).contains("whsec_"));
}

#[tokio::test]
async fn bad_admin_bodies_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let cases = [
        ("/admin/v1/merchants/shop/partners/p2", json!({"name": "P", "kind": "pirate"}), "kind"),
        ("/admin/v1/merchants/shop/partners/p2", json!({"name": "P", "kind": "affiliate", "extra": 1}), "extra"),
        (
            "/admin/v1/merchants/shop/links/l2",
            json!({"partner_id": "ann", "destination": "javascript:alert(1)"}),
            "destination",
        ),
        (
            "/admin/v1/merchants/shop/links/l2",
            json!({"partner_id": "nobody", "destination": "https://a.example/"}),
            "partner_id",
        ),
        (
            "/admin/v1/merchants/shop/links/l2",
            json!({"partner_id": "ann", "destination": "https://a.example/", "plan_id": "nope"}),
            "plan_id",
        ),
        (
            "/admin/v1/merchants/shop/plans/p",
            json!({"currency": "USD", "rules": [{"event": "sale", "percent": "120"}]}),
            "rules[0].percent",
        ),
        (
            "/admin/v1/merchants/shop/plans/p",
            json!({"currency": "USD", "rules": [{"event": "sale", "flat": "1.001"}]}),
            "rules[0].flat",
        ),
        (
            "/admin/v1/merchants/shop/plans/p",
            json!({"currency": "USD", "rules": [], "tiers": [{"min_sales": 5, "percent": "20"}, {"min_sales": 5, "percent": "25"}]}),
            "tiers",
        ),
        (
            "/admin/v1/merchants/shop/plans/p",
            json!({"currency": "USD", "rules": [], "caps": {"monthly_commission": "x"}}),
            "caps.monthly_commission",
        ),
    ];
    for (path, body, field) in cases {
        let r = app.admin(Method::PUT, path, Some(body.clone())).await;
        assert_eq!(r.status, 422, "{path} {body}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["field"], field, "{body}");
    }
}

#[tokio::test]
async fn link_ids_are_unique_across_merchants() {
    let app = TestApp::spawn().await;
    app.demo().await;
    app.demo_merchant("other", "bob", "bobs-link").await;
    let l = json!({"partner_id": "bob", "destination": "https://other.example/"});
    let r = app.admin(Method::PUT, "/admin/v1/merchants/other/links/spring", Some(l)).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["code"], "link_id_taken");
    let r = app.admin(Method::GET, "/admin/v1/merchants/other/links/spring", None).await;
    assert_eq!(r.status, 404, "merchant other cannot read merchant shop's link");
}

#[tokio::test]
async fn delete_pauses_a_partner_and_its_links_stop_redirecting() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let r = app.admin(Method::DELETE, "/admin/v1/merchants/shop/partners/ann", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "paused");
    assert_eq!(app.get("/c/spring", &[]).await.status, 404);
    assert_eq!(
        app.admin(Method::GET, "/admin/v1/merchants/shop/partners/ann", None).await.json()["name"],
        "Ann's Blog",
        "history stays"
    );
}
