//! Slow clients, endless bodies and malformed HTTP (SPEC 11): tally closes what abuses it
//! within its limits, stays bounded in memory, and keeps answering everyone else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{heavy_test, metric, start_binary, TestApp, BROWSER};

const HEADER_TIMEOUT_MS: u64 = 2_000;
const IDLE_TIMEOUT_MS: u64 = 3_000;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty HTTP/2 SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// How a slow client behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slow {
    /// Request headers, one byte per second, never finished.
    TrickledHeaders,
    /// Connects and sends nothing.
    Silent,
    /// One complete request, then an idle keep-alive connection.
    IdleKeepAlive,
    /// The HTTP/2 preface, one byte per second.
    TrickledPreface,
    /// A complete HTTP/2 preface and SETTINGS, then nothing.
    IdleHttp2,
}

impl Slow {
    /// The limit that must close this connection, counted from the moment it applies.
    fn limit(self) -> Duration {
        Duration::from_millis(if self == Slow::IdleHttp2 { IDLE_TIMEOUT_MS } else { HEADER_TIMEOUT_MS })
    }
}

/// Opens a slow connection; returns how long after the limit started the server closed it.
async fn slow_client(addr: std::net::SocketAddr, kind: Slow) -> Duration {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut started = Instant::now();
    let (mut rd, mut wr) = stream.split();
    if kind == Slow::IdleKeepAlive {
        wr.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = rd.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 404"), "{}", String::from_utf8_lossy(&buf[..n]));
        started = Instant::now();
    }
    if kind == Slow::IdleHttp2 {
        wr.write_all(H2_PREFACE).await.unwrap();
        wr.write_all(H2_SETTINGS).await.unwrap();
        started = Instant::now();
    }
    let trickle = async {
        match kind {
            Slow::TrickledHeaders | Slow::TrickledPreface => {
                let text: &[u8] = if kind == Slow::TrickledPreface {
                    H2_PREFACE
                } else {
                    b"GET /c/spring HTTP/1.1\r\nHost: tally\r\nUser-Agent: slowloris-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
                };
                for b in text {
                    if wr.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                std::future::pending::<()>().await;
            }
            Slow::Silent | Slow::IdleKeepAlive | Slow::IdleHttp2 => std::future::pending::<()>().await,
        }
    };
    let wait_for_close = async {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        () = wait_for_close => {}
        () = trickle => {}
        () = tokio::time::sleep(Duration::from_secs(30)) => panic!("{kind:?} connection still open after 30 s"),
    }
    started.elapsed().saturating_sub(kind.limit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_within_the_timeout_while_others_are_served() {
    let _heavy = heavy_test().await;
    let app = TestApp::spawn_with(
        |s| {
            s.http.header_read_timeout_ms = HEADER_TIMEOUT_MS;
            s.http.idle_timeout_ms = IDLE_TIMEOUT_MS;
            s.limits.enabled = false;
        },
        Arc::new(tally::domain::clock::SystemClock),
    )
    .await;
    app.demo().await;
    let mix =
        [(Slow::TrickledHeaders, 200), (Slow::Silent, 200), (Slow::IdleKeepAlive, 50), (Slow::TrickledPreface, 40)];
    let mix = mix.into_iter().chain([(Slow::IdleHttp2, 10)]);
    let mut slow = Vec::new();
    for (kind, n) in mix {
        for _ in 0..n {
            slow.push((kind, tokio::spawn(slow_client(app.public, kind))));
        }
    }
    assert_eq!(slow.len(), 500);

    // A normal client meanwhile: every click answered.
    let until = Instant::now() + Duration::from_millis(HEADER_TIMEOUT_MS + 1_500);
    let (mut served, mut errors) = (0, 0);
    while Instant::now() < until {
        let r = app.get("/c/spring", &[("user-agent", BROWSER.to_string())]).await;
        if r.status == 302 {
            served += 1;
        } else {
            errors += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served > 50 && errors == 0, "normal client: {served} served, {errors} errors");

    let mut worst = std::collections::HashMap::new();
    for (kind, task) in slow {
        let late = task.await.unwrap();
        let w = worst.entry(format!("{kind:?}")).or_insert(Duration::ZERO);
        *w = (*w).max(late);
    }
    println!("slowloris: 500 connections; latest close after its limit by kind: {worst:?}; normal client {served} clicks, 0 errors");
    for (kind, late) in &worst {
        assert!(*late <= Duration::from_secs(1), "{kind} connections were closed {late:?} after their limit");
    }
    assert!(metric(&app, "tally_http_connections_silent_total").await >= 240.0);
    // Once the abusers are gone only the test client's own pooled connections remain.
    let open = metric(&app, "tally_http_connections ").await;
    assert!(open < 10.0, "{open} connections still open");
}

const FLOOD_CONFIG: &str = r#"
public_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[log]
level = "warn"
format = "json"
[limits]
enabled = false
[[merchants]]
id = "crash"
name = "Flood Shop"
secret_file = "SECRET_FILE"
"#;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Uploads an endless chunked body; returns the status line the server answered with, if any.
async fn endless_upload(addr: String) -> Option<String> {
    let mut stream = TcpStream::connect(&addr).await.ok()?;
    let (mut rd, mut wr) = stream.split();
    let head = "POST /v1/merchants/crash/conversions HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = format!("4000\r\n{}\r\n", "7".repeat(0x4000));
    let pump = async {
        let _ = wr.write_all(head.as_bytes()).await;
        while wr.write_all(chunk.as_bytes()).await.is_ok() {}
        std::future::pending::<()>().await;
    };
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::select! {
        () = read => {}
        () = pump => {}
        () = tokio::time::sleep(Duration::from_secs(20)) => panic!("an endless upload was neither answered nor cut off in 20 s"),
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.lines().next().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bodies_get_413_and_memory_stays_bounded() {
    let _heavy = heavy_test().await;
    let dir = tempfile::tempdir().unwrap();
    let proc = start_binary(dir.path(), FLOOD_CONFIG).await;
    let pid = proc.child.id().unwrap();
    let before = rss_kib(pid);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let uploads: Vec<_> = (0..100).map(|_| tokio::spawn(endless_upload(proc.public.clone()))).collect();
    let mut statuses = std::collections::BTreeMap::new();
    for u in uploads {
        *statuses.entry(u.await.unwrap().unwrap_or_else(|| "cut off".into())).or_insert(0) += 1;
    }
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!("endless bodies: 100 uploads -> {statuses:?}; RSS {before} KiB before, peak {peak} KiB");
    for status in statuses.keys() {
        assert!(status.starts_with("HTTP/1.1 413") || status == "cut off", "an endless body got {status}");
    }
    assert!(statuses.keys().any(|s| s.starts_with("HTTP/1.1 413")), "{statuses:?}");
    assert!(peak - before < 64 * 1024, "RSS grew by {} KiB under the flood", peak - before);
    // Still serving.
    let r = crate::helpers::send(
        &crate::helpers::client(),
        http::Method::GET,
        format!("http://{}/healthz", proc.admin),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200);
}

/// Valid requests the generator starts from.
fn seeds(secret: &tally::signing::WebhookSecret) -> Vec<Vec<u8>> {
    let now = crate::helpers::unix_now();
    let body = r#"{"txn_id":"fuzz-1","event":"sale","amount":"10.00","currency":"USD","partner_id":"ann"}"#;
    let sig = tally::signing::sign(secret.key(), "msg_fuzz", now, body.as_bytes());
    vec![
        format!("GET /c/spring?s1=abc&url=https%3A%2F%2Fshop.example.com%2Fx HTTP/1.1\r\nHost: tally\r\nUser-Agent: {BROWSER}\r\n\r\n").into_bytes(),
        format!(
            "POST /v1/merchants/shop/conversions HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\nwebhook-id: msg_fuzz\r\nwebhook-timestamp: {now}\r\nwebhook-signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        format!(
            "POST /v1/merchants/shop/conversions HTTP/1.1\r\nHost: tally\r\nwebhook-id: msg_fuzz\r\nwebhook-timestamp: {now}\r\nwebhook-signature: {sig}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .into_bytes(),
        format!("GET /v1/merchants/shop/postbacks?txn_id=p1&event=lead&ts={now}&sig=abc HTTP/1.1\r\nHost: tally\r\n\r\n").into_bytes(),
        b"POST /v1/merchants/shop/conversions:batch HTTP/1.1\r\nHost: tally\r\nContent-Length: 2\r\n\r\n[]".to_vec(),
    ]
}

const SPECIALS: [&[u8]; 24] = [
    b"\0",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b":",
    b"%",
    b"%zz",
    b"%00",
    b"\xff\xfe",
    b"\x7f",
    b"\t",
    b"HTTP/1.1",
    b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 18446744073709551616\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b" folded\r\n",
    b"ffffffffffffffffff\r\n",
    b"zz\r\n",
    b"\xe2\x80\xae",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
];

/// One malformed request: a seed with one to three mutations.
fn malformed(rng: &mut rand::rngs::StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut req = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..=3) {
        let at = rng.gen_range(0..=req.len());
        match rng.gen_range(0..8) {
            0 => req.truncate(at),
            1 if !req.is_empty() => {
                let i = rng.gen_range(0..req.len());
                req[i] = rng.gen();
            }
            2 => {
                let s = SPECIALS[rng.gen_range(0..SPECIALS.len())];
                req.splice(at..at, s.iter().copied());
            }
            3 => {
                let end = rng.gen_range(at..=req.len().min(at + 64));
                let slice = req[at..end].to_vec();
                req.splice(at..at, slice);
            }
            4 => {
                let end = rng.gen_range(at..=req.len());
                req.drain(at..end);
            }
            5 => {
                let line = format!("X-Big: {}\r\n", "b".repeat(rng.gen_range(1..40_000)));
                let head_end = req.windows(2).position(|w| w == b"\r\n").map_or(0, |p| p + 2);
                req.splice(head_end..head_end, line.bytes());
            }
            6 => {
                let method: &[u8] =
                    [&b"GETT"[..], b"get", b"", b"G\0T", b"CONNECT", b"TRACE", b"PUT"][rng.gen_range(0..7)];
                let sp = req.iter().position(|b| *b == b' ').unwrap_or(0);
                req.splice(0..sp, method.iter().copied());
            }
            _ => {
                let junk: Vec<u8> = (0..rng.gen_range(1..32)).map(|_| rng.gen()).collect();
                req.splice(at..at, junk);
            }
        }
    }
    req
}

/// Writes `bytes`, half-closes, and reads what comes back until the server closes.
async fn raw_exchange(addr: &str, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await {
        Err(_) => Err("no answer and no close within 10 s".into()),
        Ok(_) => Ok(answer),
    }
}

const MALFORMED_CONFIG: &str = r#"
public_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
[log]
level = "warn"
format = "json"
[http]
header_read_timeout_ms = 2000
body_read_timeout_ms = 2000
[limits]
enabled = false
[[merchants]]
id = "shop"
name = "Shop"
secret_file = "SECRET_FILE"
[[partners]]
merchant_id = "shop"
id = "ann"
name = "Ann"
kind = "affiliate"
[[links]]
merchant_id = "shop"
id = "spring"
partner_id = "ann"
destination = "https://shop.example.com/spring?ref={click_id}"
deep_link_hosts = ["shop.example.com"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_requests_get_no_5xx_and_the_server_keeps_answering() {
    let _heavy = heavy_test().await;
    let cases: usize = std::env::var("TALLY_MALFORMED_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let seed: u64 =
        std::env::var("TALLY_MALFORMED_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    let dir = tempfile::tempdir().unwrap();
    let proc = start_binary(dir.path(), MALFORMED_CONFIG).await;
    let secret = std::fs::read_to_string(dir.path().join("crash.whsec")).unwrap();
    let secret = tally::signing::WebhookSecret::parse(secret.trim()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bases = seeds(&secret);
    let requests: Arc<Vec<Vec<u8>>> = Arc::new((0..cases).map(|_| malformed(&mut rng, &bases)).collect());

    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let answers = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (requests, failures, answers, next, addr) = (
                Arc::clone(&requests),
                Arc::clone(&failures),
                Arc::clone(&answers),
                Arc::clone(&next),
                proc.public.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(req) = requests.get(i) else { return };
                    let problem = match raw_exchange(&addr, req).await {
                        Err(e) => Some(e),
                        Ok(answer) => {
                            let first =
                                answer.get(9..12).map_or("none".into(), |s| String::from_utf8_lossy(s).into_owned());
                            *answers.lock().unwrap().entry(first).or_insert(0) += 1;
                            answer
                                .windows(10)
                                .any(|w| w.starts_with(b"HTTP/1.1 5"))
                                .then(|| String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned())
                        }
                    };
                    if let Some(p) = problem {
                        failures.lock().unwrap().push((i, p));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {cases} malformed requests failed; first: {:?} for {:?}",
        failures.len(),
        failures[0].1,
        String::from_utf8_lossy(&requests[failures[0].0][..requests[failures[0].0].len().min(300)])
    );

    let good = raw_exchange(&proc.public, &bases[0]).await.unwrap();
    assert!(good.starts_with(b"HTTP/1.1 302"), "{}", String::from_utf8_lossy(&good));
    let metrics = crate::helpers::send(
        &crate::helpers::client(),
        http::Method::GET,
        format!("http://{}/metrics", proc.admin),
        &[],
        Vec::new(),
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let server_errors: Vec<&str> =
        text.lines().filter(|l| l.starts_with("tally_http_requests_total") && l.contains("status=\"5")).collect();
    assert!(server_errors.is_empty(), "5xx answered: {server_errors:?}");
    let log = std::fs::read_to_string(&proc.log).unwrap();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    let answers = answers.lock().unwrap().clone();
    println!("malformed HTTP: {cases} requests (seed {seed}), first status {answers:?}; no 5xx, no panic, next good request answered 302");
    // The generator must reach the handlers, not only hyper's parser.
    assert!(
        answers.get("302").copied().unwrap_or(0) > 100 && answers.get("401").copied().unwrap_or(0) > 100,
        "{answers:?}"
    );
}
