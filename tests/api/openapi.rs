//! `docs/openapi.yaml` is true to the code: it documents exactly the operations of the
//! route table (`tally::http::routes::OPERATIONS`), and the routers file each of those
//! operations under its route.

use std::collections::BTreeSet;

use http::Method;
use tally::http::routes::OPERATIONS;
use tally::http::Listener;

use crate::helpers::*;

const METHODS: [&str; 7] = ["get", "put", "post", "delete", "head", "patch", "options"];

fn documented() -> BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
    let doc: serde_json::Value = serde_norway::from_str(&text).expect("docs/openapi.yaml is YAML");
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..4]), Some("3.1."), "an OpenAPI 3.1 document");
    let paths = doc["paths"].as_object().expect("paths");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        for method in METHODS {
            if item.get(method).is_some() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

#[test]
fn the_openapi_document_has_exactly_the_operations_of_the_route_table() {
    let doc = documented();
    let code: BTreeSet<(String, String)> =
        OPERATIONS.iter().map(|o| (o.method.to_string(), o.path.to_string())).collect();
    let undocumented: Vec<_> = code.difference(&doc).collect();
    let unrouted: Vec<_> = doc.difference(&code).collect();
    assert!(undocumented.is_empty(), "served but not in docs/openapi.yaml: {undocumented:?}");
    assert!(unrouted.is_empty(), "in docs/openapi.yaml but not served: {unrouted:?}");
    println!("openapi: {} operations documented, {} in the route table, equal", doc.len(), code.len());
}

/// A request path for a template, naming the entities of [`TestApp::demo`].
fn concrete(template: &str) -> String {
    [
        ("{merchant_id}", "shop"),
        ("{partner_id}", "ann"),
        ("{link_id}", "spring"),
        ("{plan_id}", "standard"),
        ("{txn_id}", "t1"),
        ("{account}", "acme.com"),
        ("{delivery_id}", "01JD0000000000000000000000"),
        ("{month}", "2026-11"),
        ("{payout_id}", "2026-11"),
    ]
    .iter()
    .fold(template.to_string(), |path, (name, value)| path.replace(name, value))
}

/// The sum of `tally_http_requests_total` for one listener and route.
async fn requests(app: &TestApp, listener: &str, route: &str) -> f64 {
    let r = app.request(Method::GET, format!("http://{}/metrics", app.admin), &[], Vec::new()).await;
    let prefix = format!("tally_http_requests_total{{listener=\"{listener}\",route=\"{route}\",");
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_routers_file_every_operation_under_its_route() {
    let app = TestApp::spawn().await;
    for op in OPERATIONS {
        let path = concrete(op.path);
        let (listener, addr) = match op.listener {
            Listener::Public => ("public", app.public),
            Listener::Admin => ("admin", app.admin),
        };
        let route = op.route.as_str();
        let before = requests(&app, listener, route).await;
        // No credentials: nothing is written (a backup or a merchant), the route is still counted.
        let method = Method::from_bytes(op.method.as_bytes()).unwrap();
        let r = app.request(method, format!("http://{addr}{path}"), &[], Vec::new()).await;
        let after = requests(&app, listener, route).await;
        // Reading /metrics counts itself once the text is rendered.
        let expected = if route == "metrics" { 2.0 } else { 1.0 };
        assert_eq!(
            after - before,
            expected,
            "{} {} answered {} but was not counted as route {route}",
            op.method,
            op.path,
            r.status
        );
        assert_ne!(r.status, 405, "{} {} is not routed", op.method, op.path);
    }
}

#[tokio::test]
async fn every_path_answers_other_methods_405_with_allow() {
    let app = TestApp::spawn().await;
    app.demo().await;
    let auth = [("authorization", format!("Bearer {ADMIN_TOKEN}"))];
    for op in OPERATIONS {
        let path = concrete(op.path);
        let addr = match op.listener {
            Listener::Public => app.public,
            Listener::Admin => app.admin,
        };
        let r = app.request(Method::TRACE, format!("http://{addr}{path}"), &auth, Vec::new()).await;
        assert_eq!(r.status, 405, "TRACE {path}: {}", String::from_utf8_lossy(&r.body));
        let allow = r.header("allow").unwrap_or_else(|| panic!("TRACE {path}: no Allow header"));
        let listed: BTreeSet<&str> = allow.split(", ").collect();
        let expected: BTreeSet<&str> =
            OPERATIONS.iter().filter(|o| o.listener == op.listener && o.path == op.path).map(|o| o.method).collect();
        assert!(expected.is_subset(&listed), "TRACE {path}: Allow {allow} lacks one of {expected:?}");
    }
}
