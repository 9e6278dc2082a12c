//! `spawn_app()` and a small HTTP client, in the manner of zero-to-production's helpers.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::SecretString;
use serde_json::Value;
use tally::app::App;
use tally::config::{Loaded, Settings};
use tally::domain::clock::{Clock, ManualClock, SystemClock};
use tally::signing::{sign, WebhookSecret};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub struct TestResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct TestApp {
    pub app: Option<App>,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub clock: Arc<dyn Clock>,
}

pub fn test_settings(dir: &std::path::Path) -> Settings {
    Settings {
        data_dir: dir.join("db"),
        public_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        ..Settings::default()
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(128).build_http()
}

/// A test that ends without [`TestApp::stop`] still closes its store: RocksDB's
/// background work must not outlive the test binary's exit.
impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(app) = self.app.take() {
            if let Some(store) = app.store() {
                store.shutdown_blocking_in_place();
            }
        }
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}, Arc::new(SystemClock)).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings), clock: Arc<dyn Clock>) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = test_settings(dir.path());
        tweak(&mut settings);
        let loaded = Loaded::new(settings, Some(SecretString::from(ADMIN_TOKEN)));
        let app = App::start(loaded, Arc::clone(&clock)).await.expect("app starts");
        TestApp { public: app.public_addr(), admin: app.admin_addr(), app: Some(app), dir, client: client(), clock }
    }

    pub async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }

    /// Stops `old` and starts tally again on its data, with the same clock.
    pub async fn reopen(mut old: TestApp) -> TestApp {
        old.stop().await;
        let dir = std::mem::replace(&mut old.dir, tempfile::tempdir().expect("tempdir"));
        let loaded = Loaded::new(test_settings(dir.path()), Some(SecretString::from(ADMIN_TOKEN)));
        let app = App::start(loaded, Arc::clone(&old.clock)).await.expect("app starts");
        let clock = Arc::clone(&old.clock);
        TestApp { public: app.public_addr(), admin: app.admin_addr(), app: Some(app), dir, client: client(), clock }
    }

    pub fn now_secs(&self) -> i64 {
        self.clock.now_ms() / 1000
    }

    pub async fn request(
        &self,
        method: Method,
        url: String,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> TestResponse {
        send(&self.client, method, url, headers, body).await
    }

    pub async fn get(&self, path: &str, headers: &[(&str, String)]) -> TestResponse {
        self.request(Method::GET, format!("http://{}{path}", self.public), headers, Vec::new()).await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> TestResponse {
        let auth =
            vec![("authorization", format!("Bearer {ADMIN_TOKEN}")), ("content-type", "application/json".to_string())];
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.request(method, format!("http://{}{path}", self.admin), &auth, body).await
    }

    /// POSTs `body` to a merchant path, signed with `secret` at `ts` under `id`.
    pub async fn post_signed(&self, path: &str, body: &str, secret: &str, id: &str, ts: i64) -> TestResponse {
        let key = WebhookSecret::parse(secret).expect("secret");
        let mut headers = vec![("content-type", "application/json".to_string())];
        headers.extend(webhook_headers(&key, id, ts, body.as_bytes()));
        self.request(Method::POST, format!("http://{}{path}", self.public), &headers, body.as_bytes().to_vec()).await
    }

    /// POSTs `body` to a merchant path, signed with a fresh webhook-id at the app's current time.
    pub async fn post_fresh(&self, path: &str, body: &str, secret: &str) -> TestResponse {
        let id = format!("msg_{}", tally::domain::ids::Ulid::mint(0));
        self.post_signed(path, body, secret, &id, self.now_secs()).await
    }

    /// A signed conversion with a fresh webhook-id at the app's current time.
    pub async fn convert(&self, merchant: &str, secret: &str, body: &str) -> TestResponse {
        self.post_fresh(&format!("/v1/merchants/{merchant}/conversions"), body, secret).await
    }

    /// A signed adjustment (refund, chargeback, approval, rejection), like [`TestApp::convert`].
    pub async fn adjust(&self, merchant: &str, secret: &str, body: &str) -> TestResponse {
        self.post_fresh(&format!("/v1/merchants/{merchant}/adjustments"), body, secret).await
    }

    /// Merchant `shop` (returns its secret), plan `standard` (sale 20%, lead 15.00),
    /// partner `ann`, link `spring` (30-day window, deep links to shop.example.com).
    pub async fn demo(&self) -> String {
        self.demo_merchant("shop", "ann", "spring").await
    }

    pub async fn demo_merchant(&self, merchant: &str, partner: &str, link: &str) -> String {
        let r = self
            .admin(Method::PUT, &format!("/admin/v1/merchants/{merchant}"), Some(serde_json::json!({"name": "Shop"})))
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let secret = r.json()["secret"].as_str().expect("secret returned once").to_string();
        let plan = serde_json::json!({"currency": "USD", "rules": [{"event": "lead", "flat": "15.00"}, {"event": "sale", "percent": "20"}]});
        let r = self.admin(Method::PUT, &format!("/admin/v1/merchants/{merchant}/plans/standard"), Some(plan)).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let p = serde_json::json!({"name": "Ann's Blog", "kind": "affiliate", "coupons": [format!("{partner}-10")]});
        let r = self.admin(Method::PUT, &format!("/admin/v1/merchants/{merchant}/partners/{partner}"), Some(p)).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let l = serde_json::json!({
            "partner_id": partner,
            "destination": "https://shop.example.com/spring?ref={click_id}&s1={sub1}",
            "deep_link_hosts": ["shop.example.com"],
            "plan_id": "standard",
            "window_days": 30
        });
        let r = self.admin(Method::PUT, &format!("/admin/v1/merchants/{merchant}/links/{link}"), Some(l)).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        secret
    }

    /// Clicks a link as a browser would and returns the click id from `ref=`.
    pub async fn click(&self, link: &str) -> String {
        let r = self.get(&format!("/c/{link}"), &[("user-agent", BROWSER.to_string())]).await;
        assert_eq!(r.status, 302);
        click_id_of(r.header("location").expect("location"))
    }

    /// The stored click with id `id`, if any (a single node's store reads it by id alone,
    /// whatever the merchant asked for).
    pub async fn stored_click(&self, id: &str) -> Option<tally::domain::click::ClickRecord> {
        let store = self.app.as_ref().expect("running").store().expect("single node");
        let any = tally::domain::ids::MerchantId::parse("any").unwrap();
        tally::backend::Backend::click(store, &any, &tally::domain::ids::Ulid::parse(id).unwrap()).await.unwrap()
    }

    pub async fn stored_conversions(&self, merchant: &str) -> u64 {
        let app = self.app.as_ref().expect("running");
        app.store()
            .expect("single node")
            .count_conversions(&tally::domain::ids::MerchantId::parse(merchant).unwrap())
            .await
            .unwrap()
    }
}

/// The three Standard Webhooks headers for `signed` (usually the body itself).
pub fn webhook_headers(key: &WebhookSecret, id: &str, ts: i64, signed: &[u8]) -> [(&'static str, String); 3] {
    [
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sign(key.key(), id, ts, signed)),
    ]
}

/// Seconds since the Unix epoch, by the system clock (for the real binary's signatures).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

pub const BROWSER: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";

pub fn click_id_of(location: &str) -> String {
    let query = location.split_once('?').map(|(_, q)| q).unwrap_or("");
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ref")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no ref= in {location}"))
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: String,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> TestResponse {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    TestResponse { status, headers, body }
}

pub fn manual_clock() -> (ManualClock, Arc<dyn Clock>) {
    let c = ManualClock::new(SystemClock.now_ms());
    (c.clone(), Arc::new(c))
}

/// The real `tally` binary, started with a config file.
pub struct Proc {
    pub child: tokio::process::Child,
    pub public: String,
    pub admin: String,
    /// Where its stderr (the logs) goes.
    pub log: std::path::PathBuf,
}

/// Starts the binary with `config` (where `SECRET_FILE` becomes `{dir}/crash.whsec`), data in
/// `{dir}/db`, and waits until it has bound its listeners.
pub async fn start_binary(dir: &std::path::Path, config: &str) -> Proc {
    start_binary_on(dir, &dir.join("db"), config).await
}

/// [`start_binary`] with the data directory at `data_dir`.
pub async fn start_binary_on(dir: &std::path::Path, data_dir: &std::path::Path, config: &str) -> Proc {
    start_binary_via(dir, data_dir, config, &[]).await
}

/// [`start_binary_on`], run by `wrapper` (such as `strace -f -o …`) when it is not empty.
pub async fn start_binary_via(
    dir: &std::path::Path,
    data_dir: &std::path::Path,
    config: &str,
    wrapper: &[&str],
) -> Proc {
    start_binary_env(dir, data_dir, config, wrapper, &[]).await
}

/// [`start_binary_via`] with extra environment variables.
pub async fn start_binary_env(
    dir: &std::path::Path,
    data_dir: &std::path::Path,
    config: &str,
    wrapper: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let addr_file = dir.join("addr.json");
    let _ = std::fs::remove_file(&addr_file);
    let path = dir.join("tally.toml");
    std::fs::write(&path, config.replace("SECRET_FILE", dir.join("crash.whsec").to_str().unwrap())).unwrap();
    let log = dir.join(format!("tally-{}.log", tally::domain::ids::Ulid::mint(0)));
    let mut command = match wrapper {
        [] => tokio::process::Command::new(env!("CARGO_BIN_EXE_tally")),
        [program, args @ ..] => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_tally"));
            c
        }
    };
    let mut child = command
        .args(["serve", "--config", path.to_str().unwrap()])
        .env("TALLY_DATA_DIR", data_dir)
        .env("TALLY_ADDR_FILE", &addr_file)
        .env("TALLY_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("tally binary starts");
    let started = std::time::Instant::now();
    loop {
        if let Ok(Ok(v)) = std::fs::read_to_string(&addr_file).map(|t| serde_json::from_str::<serde_json::Value>(&t)) {
            let public = v["public"].as_str().unwrap().to_string();
            let admin = v["admin"].as_str().unwrap().to_string();
            return Proc { child, public, admin, log };
        }
        let exited = child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && started.elapsed() < std::time::Duration::from_secs(30),
            "tally did not start within 30 s ({exited:?}); its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of the first `/metrics` line starting with `line_start` (0 when absent).
pub async fn metric(app: &TestApp, line_start: &str) -> f64 {
    let r = app.request(Method::GET, format!("http://{}/metrics", app.admin), &[], Vec::new()).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Held by the tests that load the machine or measure time (floods, slow clients, kill -9
/// loops), so that they do not run at the same time and skew each other's timings.
pub async fn heavy_test() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}
