//! A deep link (`url=`) on a link that allows one host: the redirect goes to that host or
//! to the link's own destination, never anywhere else.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::domain::ids::{LinkId, MerchantId};
use tally::domain::link::{Link, LinkBody, MacroValues};

fn link() -> Link {
    let body: LinkBody = serde_json::from_str(
        r#"{"partner_id":"ann","destination":"https://shop.example.com/spring?ref={click_id}","deep_link_hosts":["shop.example.com"]}"#,
    )
    .expect("link body");
    body.into_link(MerchantId::parse("shop").unwrap(), LinkId::parse("spring").unwrap(), 0).expect("link")
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let link = link();
    let subs: [Option<String>; 5] = Default::default();
    let values = MacroValues { click_id: "c1", link_id: "spring", partner_id: "ann", subs: &subs };
    let location = link.redirect_location(&values, Some(raw));
    let url = url::Url::parse(&location).expect("the Location is a URL");
    assert!(matches!(url.scheme(), "https" | "http"), "{raw:?} -> {location}");
    assert_eq!(url.host_str(), Some("shop.example.com"), "{raw:?} -> {location}");
    assert!(url.username().is_empty() && url.password().is_none(), "{raw:?} -> {location}");
    assert!(!location.contains(['\r', '\n']), "{raw:?} -> {location}");
});
