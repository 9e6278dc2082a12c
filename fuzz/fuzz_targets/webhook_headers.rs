//! The three Standard Webhooks headers, as hostile strings: verify never panics, and only a
//! signature made with the key over this id, timestamp and body is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::signing::{sign, verify, WebhookHeaders};

const KEY: &[u8] = b"fuzz-key-0123456789abcdef";
const NOW: i64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // id \n timestamp \n signature \n body
    let mut parts = text.splitn(4, '\n');
    let (id, ts, sig, body) = (parts.next(), parts.next(), parts.next(), parts.next().unwrap_or(""));
    let headers = WebhookHeaders { id, timestamp: ts, signature: sig };
    let result = verify([KEY], headers, body.as_bytes(), NOW, 300);
    if result.is_ok() {
        // Accepted: one of its entries must be the real signature.
        let (id, ts) = (id.unwrap(), ts.unwrap().parse::<i64>().unwrap());
        let real = sign(KEY, id, ts, body.as_bytes());
        assert!(sig.unwrap().split(' ').any(|e| e == real), "accepted a signature that is not the real one");
    }
    // The real signature is accepted exactly when the id and timestamp are well formed
    // (SPEC 4.1: 1-128 of [A-Za-z0-9_-]; up to 10 digits, within the tolerance).
    if let (Some(id), Some(ts)) = (id, ts) {
        if let Ok(t) = ts.parse::<i64>() {
            let real = sign(KEY, id, t, body.as_bytes());
            let with_real = WebhookHeaders { id: Some(id), timestamp: Some(ts), signature: Some(&real) };
            let well_formed = !id.is_empty()
                && id.len() <= 128
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                && !ts.is_empty()
                && ts.len() <= 10
                && ts.bytes().all(|b| b.is_ascii_digit())
                && (NOW - 300..=NOW + 300).contains(&t);
            assert_eq!(verify([KEY], with_real, body.as_bytes(), NOW, 300).is_ok(), well_formed, "{id:?} {ts:?}");
        }
    }
});
