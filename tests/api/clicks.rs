//! Click redirects (SPEC 5.1, 11).

use http::Method;

use crate::helpers::{click_id_of, TestApp, BROWSER};

#[tokio::test]
async fn click_redirects_with_a_fresh_click_id_and_records_it() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let r = app.get("/c/spring?sub1=news%20letter&sub2=a%26b", &[("user-agent", BROWSER.into())]).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let location = r.header("location").unwrap();
    assert!(location.starts_with("https://shop.example.com/spring?ref="), "{location}");
    assert!(location.ends_with("&s1=news%20letter"), "{location}");
    let id = click_id_of(location);
    assert_eq!(id.len(), 26);

    let stored = app.stored_click(&id).await.unwrap();
    assert_eq!(stored.subs[0].as_deref(), Some("news letter"));
    assert_eq!(stored.subs[1].as_deref(), Some("a&b"));
    assert_eq!(stored.ip, "127.0.0.0/24", "IPs are stored reduced");
    assert!(stored.unique && !stored.bot);

    let again = app.click("spring").await;
    assert_ne!(again, id, "every click gets its own id");
    let second = app.stored_click(&again).await.unwrap();
    assert!(!second.unique, "a repeat click of the same visitor inside 24 h is not unique");
}

#[tokio::test]
async fn unknown_or_paused_link_is_404() {
    let app = TestApp::spawn().await;
    app.demo().await;
    assert_eq!(app.get("/c/nope", &[]).await.status, 404);
    assert_eq!(app.get("/c/bad..id", &[]).await.status, 404);
    let l = serde_json::json!({"partner_id": "ann", "destination": "https://shop.example.com/", "status": "paused"});
    assert_eq!(app.admin(Method::PUT, "/admin/v1/merchants/shop/links/spring", Some(l)).await.status, 200);
    let r = app.get("/c/spring", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "not_found");
}

#[tokio::test]
async fn deep_links_go_only_to_allowed_hosts() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let ok = app.get("/c/spring?url=https%3A%2F%2Fshop.example.com%2Fitem%2F7", &[]).await;
    let loc = ok.header("location").unwrap();
    assert!(loc.starts_with("https://shop.example.com/item/7?ref="), "{loc}");
    for evil in [
        "https%3A%2F%2Fevil.example.net%2F",
        "%2F%2Fevil.example.net",
        "https%3A%2F%2Fshop.example.com%40evil.example.net%2F",
        "https%3A%2F%2Fshop.example.com.evil.example.net%2F",
        "javascript%3Aalert(1)",
        "https%3A%2F%2Fshop.example.com%0D%0ASet-Cookie%3A%20x",
    ] {
        let r = app.get(&format!("/c/spring?url={evil}"), &[]).await;
        assert_eq!(r.status, 302);
        let loc = r.header("location").unwrap();
        assert!(loc.starts_with("https://shop.example.com/spring?ref="), "{evil} -> {loc}");
    }
}

#[tokio::test]
async fn head_and_prefetch_redirect_without_recording() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let head = app.request(Method::HEAD, format!("http://{}/c/spring", app.public), &[], Vec::new()).await;
    assert_eq!(head.status, 302);
    let prefetch = app.get("/c/spring", &[("sec-purpose", "prefetch".into())]).await;
    assert_eq!(prefetch.status, 302);
    for loc in [head.header("location").unwrap(), prefetch.header("location").unwrap()] {
        assert!(app.stored_click(&click_id_of(loc)).await.is_none(), "HEAD and prefetch are not recorded");
    }
}

#[tokio::test]
async fn bots_are_redirected_but_flagged_and_never_unique() {
    let app = TestApp::spawn().await;
    app.demo().await;
    for ua in ["", "Googlebot/2.1 (+http://www.google.com/bot.html)"] {
        let r = app.get("/c/spring", &[("user-agent", ua.into())]).await;
        assert_eq!(r.status, 302);
        let c = app.stored_click(&click_id_of(r.header("location").unwrap())).await.unwrap();
        assert!(c.bot && !c.unique, "{ua:?}");
    }
}
