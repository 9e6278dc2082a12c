//! The outbound client (SPEC 10) against local receivers: it connects only to vetted
//! addresses, never follows a redirect, bounds time and answer size, and speaks TLS with
//! the roots it is given.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tally::outbound::client::{Client, Failure, Outgoing, KEPT_ANSWER_BYTES};
use tally::outbound::ssrf::SystemResolver;

type Seen = Arc<Mutex<Vec<String>>>;

async fn answer(req: Request<Incoming>, seen: Seen) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    seen.lock().unwrap().push(format!("{} {target}", req.method()));
    let resp = match req.uri().path() {
        "/redirect" => {
            Response::builder().status(302).header("location", "http://169.254.169.254/").body(Full::default())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Response::builder().status(200).body(Full::default())
        }
        "/big" => Response::builder().status(200).body(Full::new(Bytes::from(vec![b'x'; 1 << 20]))),
        "/busy" => Response::builder().status(503).header("retry-after", "120").body(Full::default()),
        _ => Response::builder().status(200).body(Full::new(Bytes::from_static(b"thanks"))),
    };
    Ok(resp.unwrap())
}

/// A local receiver over plain TCP, or TLS with the test certificate for `localhost`.
async fn receiver(tls: bool) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let acceptor = tls.then(|| {
        use rustls::pki_types::pem::PemObject;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(format!("{dir}/localhost.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(format!("{dir}/localhost.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (seen, acceptor) = (Arc::clone(&s), acceptor.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(req, Arc::clone(&seen)));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn client(allow_private: bool, roots: rustls::RootCertStore) -> Client {
    Client::new(roots, Arc::new(SystemResolver), allow_private, Duration::from_secs(2), Duration::from_secs(2)).unwrap()
}

fn get(url: &str) -> Outgoing {
    Outgoing { method: Method::GET, url: url::Url::parse(url).unwrap(), headers: Vec::new(), body: Bytes::new() }
}

fn test_roots() -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test-ca.pem");
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    roots
}

#[tokio::test]
async fn answers_are_bounded_and_redirects_never_followed() {
    let (addr, seen) = receiver(false).await;
    let c = client(true, tally::outbound::client::default_roots());
    let a = c.send(&get(&format!("http://{addr}/pb?cid=01JD%20x&amt=7.50"))).await;
    let answer = a.result.unwrap();
    assert_eq!((answer.status, &answer.head[..]), (200, &b"thanks"[..]));

    let a = c.send(&get(&format!("http://{addr}/redirect"))).await;
    assert_eq!(a.result.unwrap().status, 302, "a redirect is an answer, not followed");

    let a = c.send(&get(&format!("http://{addr}/big"))).await;
    let answer = a.result.unwrap();
    assert_eq!(answer.head.len(), KEPT_ANSWER_BYTES, "the first 1 KiB is kept");

    let a = c.send(&get(&format!("http://{addr}/busy"))).await;
    assert_eq!(a.result.unwrap().retry_after.as_deref(), Some("120"));

    let a = c.send(&get(&format!("http://{addr}/slow"))).await;
    assert!(matches!(a.result, Err(Failure::Timeout(_))), "{:?}", a.result);
    assert!(a.duration < Duration::from_secs(3), "{:?}", a.duration);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], "GET /pb?cid=01JD%20x&amt=7.50");
    assert!(!seen.iter().any(|s| s.contains("latest")), "the redirect target was never asked for");
}

#[tokio::test]
async fn private_destinations_are_refused_before_connecting() {
    let (addr, seen) = receiver(false).await;
    let c = client(false, tally::outbound::client::default_roots());
    for url in [format!("http://{addr}/pb"), format!("http://localhost:{}/pb", addr.port())] {
        let a = c.send(&get(&url)).await;
        let Err(failure) = a.result else { panic!("{url} was sent") };
        assert_eq!(failure.kind(), "ssrf_blocked", "{url}: {failure}");
    }
    assert!(seen.lock().unwrap().is_empty(), "no connection reached the receiver");
}

#[tokio::test]
async fn tls_is_verified_against_the_roots() {
    let (addr, _) = receiver(true).await;
    let url = format!("https://localhost:{}/pb", addr.port());
    let trusting = client(true, test_roots());
    let answer = trusting.send(&get(&url)).await.result.unwrap();
    assert_eq!(answer.status, 200);
    let by_ip = trusting.send(&get(&format!("https://127.0.0.1:{}/pb", addr.port()))).await.result.unwrap();
    assert_eq!(by_ip.status, 200, "the certificate names 127.0.0.1 too");
    let mozilla = client(true, tally::outbound::client::default_roots());
    let failure = mozilla.send(&get(&url)).await.result.unwrap_err();
    assert_eq!(failure.kind(), "tls", "an unknown issuer is refused: {failure}");
}

/// What a partner's receiver runs: the Python `standardwebhooks` library verifies tally's
/// sender signature, with the old secret and with the new one during a rotation.
#[test]
fn a_partner_verifies_tally_signatures_with_the_standardwebhooks_library() {
    use tally::signing::WebhookSecret;
    let (old, new) = (WebhookSecret::generate(), WebhookSecret::generate());
    let body =
        r#"{"type":"conversion.created","data":{"txn_id":"o-1","commission":{"amount":"7.50","currency":"USD"}}}"#;
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let signature = tally::signing::sign_all([old.key(), new.key()], "msg_out_1", ts, body.as_bytes());
    let script = r#"
import sys
from standardwebhooks.webhooks import Webhook
secret, sig, ts, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
headers = {"webhook-id": "msg_out_1", "webhook-timestamp": ts, "webhook-signature": sig}
Webhook(secret).verify(body, headers)
try:
    Webhook(secret).verify(body + " ", headers)
    print("tampered body accepted")
    sys.exit(3)
except Exception:
    print("ok")
"#;
    for secret in [old.expose_text(), new.expose_text()] {
        let out = std::process::Command::new("python3")
            .args(["-c", script, &secret, &signature, &ts.to_string(), body])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "standardwebhooks refused tally's signature (pip install standardwebhooks): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
