//! A signed GET postback's query: parse, canonicalize, sign and verify. The canonical form
//! is stable (parsing it again gives the same form) and what tally signs, it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::signing::postback::{sign, verify, Query};

const KEY: &[u8] = b"fuzz-key-0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(query) = Query::parse(text) else { return };
    let canonical = query.canonical();
    let again = Query::parse(&canonical).expect("the canonical form parses");
    assert_eq!(again.canonical(), canonical, "canonical form is stable");
    let _ = verify([KEY], "/v1/merchants/m/postbacks", &query, 1_700_000_000, 300);
    if let Some(ts) =
        query.get("ts").and_then(|t| t.parse::<i64>().ok()).filter(|t| (1_699_999_700..=1_700_000_300).contains(t))
    {
        if query.get("ts").is_some_and(|t| t.len() <= 10 && t.bytes().all(|b| b.is_ascii_digit())) {
            let sig = sign(KEY, "/v1/merchants/m/postbacks", &query);
            let mut signed = Query(query.0.into_iter().filter(|(n, _)| n != "sig").collect());
            signed.0.push(("sig".into(), sig));
            assert_eq!(verify([KEY], "/v1/merchants/m/postbacks", &signed, ts, 300), Ok(()));
        }
    }
});
