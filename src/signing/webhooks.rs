//! Standard Webhooks v1 (standardwebhooks.com), unchanged, so merchants can sign with the
//! `standardwebhooks` and `svix` libraries:
//! `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Longest `webhook-id` accepted.
pub const MAX_ID_LEN: usize = 128;
/// Most signature entries read from one `webhook-signature` header.
pub const MAX_SIGNATURE_ENTRIES: usize = 8;
/// Longest `webhook-signature` header read.
pub const MAX_SIGNATURE_HEADER_LEN: usize = 1024;

/// Why a signature was refused: the `reason` label of `tally_signature_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFailure {
    #[error("a webhook-id, webhook-timestamp or webhook-signature header is missing")]
    Missing,
    #[error("a webhook header is malformed")]
    Malformed,
    #[error("the timestamp is too old")]
    Stale,
    #[error("the timestamp is in the future")]
    Future,
    #[error("no signature matches")]
    Mismatch,
    #[error("the webhook-id was already used with another body")]
    Replay,
}

impl SignatureFailure {
    pub const ALL: [SignatureFailure; 6] = [
        SignatureFailure::Missing,
        SignatureFailure::Malformed,
        SignatureFailure::Stale,
        SignatureFailure::Future,
        SignatureFailure::Mismatch,
        SignatureFailure::Replay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignatureFailure::Missing => "missing",
            SignatureFailure::Malformed => "malformed",
            SignatureFailure::Stale => "stale",
            SignatureFailure::Future => "future",
            SignatureFailure::Mismatch => "mismatch",
            SignatureFailure::Replay => "replay",
        }
    }
}

/// The three headers as received. `None` means absent; a header sent more than once
/// is reported by the caller as `Malformed` before it gets here.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_timestamp(ts: &str) -> Option<i64> {
    if ts.is_empty() || ts.len() > 10 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ts.parse().ok()
}

fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// The `webhook-signature` value for a message: `v1,<base64>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", STANDARD.encode(mac(key, id, &timestamp.to_string(), body)))
}

/// The `webhook-signature` value a sender puts on a message: one `v1,<base64>` entry per
/// key, space-separated. During a secret rotation the sender signs with every active key
/// (SPEC 10), so a receiver that knows either secret verifies it.
pub fn sign_all<'k>(keys: impl IntoIterator<Item = &'k [u8]>, id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    keys.into_iter().map(|key| format!("v1,{}", STANDARD.encode(mac(key, id, &ts, body)))).collect::<Vec<_>>().join(" ")
}

/// Verifies a request against every key in `keys` (current and rotated-out secrets).
///
/// Checks, in order: all three headers present; id and timestamp well formed; the
/// timestamp within `tolerance_secs` of `now_secs`; at least one `v1` entry of exactly
/// 32 bytes matching in constant time.
///
/// # Errors
/// The first check that failed.
pub fn verify<'k>(
    keys: impl IntoIterator<Item = &'k [u8]>,
    headers: WebhookHeaders<'_>,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureFailure> {
    let (Some(id), Some(ts_text), Some(sig_header)) = (headers.id, headers.timestamp, headers.signature) else {
        return Err(SignatureFailure::Missing);
    };
    if !valid_id(id) || sig_header.len() > MAX_SIGNATURE_HEADER_LEN {
        return Err(SignatureFailure::Malformed);
    }
    let ts = parse_timestamp(ts_text).ok_or(SignatureFailure::Malformed)?;
    if now_secs - ts > tolerance_secs {
        return Err(SignatureFailure::Stale);
    }
    if ts - now_secs > tolerance_secs {
        return Err(SignatureFailure::Future);
    }
    let candidates: Vec<[u8; 32]> = sig_header
        .split(' ')
        .filter(|e| !e.is_empty())
        .take(MAX_SIGNATURE_ENTRIES)
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter_map(|raw| <[u8; 32]>::try_from(raw.as_slice()).ok())
        .collect();
    if candidates.is_empty() {
        return Err(SignatureFailure::Malformed);
    }
    super::any_match(keys.into_iter().map(|key| mac(key, id, ts_text, body)), &candidates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::WebhookSecret;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1_649_367_553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const EXPECTED: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn check(sig: &str, now: i64) -> Result<(), SignatureFailure> {
        let secret = WebhookSecret::parse(SECRET).unwrap();
        let ts = TS.to_string();
        let h = WebhookHeaders { id: Some(ID), timestamp: Some(&ts), signature: Some(sig) };
        verify([secret.key()], h, BODY, now, 300)
    }

    #[test]
    fn reference_vector() {
        let secret = WebhookSecret::parse(SECRET).unwrap();
        assert_eq!(sign(secret.key(), ID, TS, BODY), EXPECTED);
        assert_eq!(check(EXPECTED, TS), Ok(()));
    }

    #[test]
    fn window_edges() {
        assert_eq!(check(EXPECTED, TS + 300), Ok(()));
        assert_eq!(check(EXPECTED, TS - 300), Ok(()));
        assert_eq!(check(EXPECTED, TS + 301), Err(SignatureFailure::Stale));
        assert_eq!(check(EXPECTED, TS - 301), Err(SignatureFailure::Future));
    }

    #[test]
    fn hostile_signatures() {
        let truncated = &EXPECTED[..EXPECTED.len() - 4];
        assert_eq!(check("v1,", TS), Err(SignatureFailure::Malformed));
        assert_eq!(check(truncated, TS), Err(SignatureFailure::Malformed));
        assert_eq!(check(&format!("{EXPECTED}AAAA"), TS), Err(SignatureFailure::Malformed));
        assert_eq!(check("v2,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=", TS), Err(SignatureFailure::Malformed));
        assert_eq!(check("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", TS), Err(SignatureFailure::Mismatch));
        assert_eq!(check(&format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {EXPECTED}"), TS), Ok(()));
    }

    #[test]
    fn malformed_headers() {
        let secret = WebhookSecret::parse(SECRET).unwrap();
        let run = |id: Option<&str>, ts: Option<&str>| {
            let h = WebhookHeaders { id, timestamp: ts, signature: Some(EXPECTED) };
            verify([secret.key()], h, BODY, TS, 300)
        };
        let ts = TS.to_string();
        assert_eq!(run(None, Some(&ts)), Err(SignatureFailure::Missing));
        assert_eq!(run(Some("a.b"), Some(&ts)), Err(SignatureFailure::Malformed));
        assert_eq!(run(Some(ID), Some("+1649367553")), Err(SignatureFailure::Malformed));
        assert_eq!(run(Some(ID), Some("1649367553.0")), Err(SignatureFailure::Malformed));
        assert_eq!(run(Some(ID), Some("16493675530")), Err(SignatureFailure::Malformed));
    }

    #[test]
    fn a_sender_signs_with_every_active_key() {
        let old = WebhookSecret::parse(SECRET).unwrap();
        let new = WebhookSecret::generate();
        let body = br#"{"event":"created"}"#;
        let header = sign_all([old.key(), new.key()], ID, 1_700_000_000, body);
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.starts_with(&sign(old.key(), ID, 1_700_000_000, body)));
        for key in [old.key(), new.key()] {
            let h = WebhookHeaders { id: Some(ID), timestamp: Some("1700000000"), signature: Some(&header) };
            assert_eq!(verify([key], h, body, 1_700_000_000, 300), Ok(()), "either secret verifies it");
        }
    }
}
