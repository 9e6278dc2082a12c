//! A conversion body as the merchant sends it: parse, validate, and check that a valid
//! one keeps its exact amount.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::domain::conversion::ConversionBody;
use tally::domain::json::{parse_object, JsonError};

fuzz_target!(|data: &[u8]| {
    match parse_object::<ConversionBody>(data) {
        Ok(body) => {
            if let Ok(input) = body.into_input(1_700_000_000_000) {
                assert!(!input.txn_id.as_str().is_empty());
                if let Some(m) = input.amount {
                    // The stored amount prints back to a decimal that parses to itself.
                    let again = tally::domain::money::Money::parse(&m.amount_text(), m.currency).expect("round trip");
                    assert_eq!(again, m);
                }
            }
        }
        Err(JsonError::Invalid(e)) => assert!(!e.field.is_empty(), "an invalid field is named"),
        Err(JsonError::Malformed(_)) => {}
    }
});
