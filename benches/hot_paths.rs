//! Micro-benchmarks of the hot pure paths: `cargo bench --bench hot_paths`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tally::domain::conversion::ConversionBody;
use tally::domain::ids::{MerchantId, TxnId, Ulid};
use tally::signing::{sign, verify, WebhookHeaders, WebhookSecret};

fn signature(c: &mut Criterion) {
    let secret = WebhookSecret::generate();
    let body = format!(
        r#"{{"txn_id":"order-1001","amount":"149.90","currency":"USD","click_id":"{}","metadata":{{"p":"{}"}}}}"#,
        Ulid::mint(0),
        "x".repeat(300)
    );
    let ts = 1_790_000_000;
    let sig = sign(secret.key(), "msg_1", ts, body.as_bytes());
    let ts_text = ts.to_string();
    let mut g = c.benchmark_group("signing");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("verify_400_byte_body", |b| {
        b.iter(|| {
            let h = WebhookHeaders { id: Some("msg_1"), timestamp: Some(&ts_text), signature: Some(&sig) };
            verify([secret.key()], h, black_box(body.as_bytes()), ts, 300)
        })
    });
    g.finish();
}

fn ids_and_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("ids");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mint_click_id", |b| b.iter(|| Ulid::mint(black_box(1_790_000_000_000)).to_string()));
    let m = MerchantId::parse("acme").unwrap();
    let t = TxnId::parse("order-1001").unwrap();
    g.bench_function("conversion_key", |b| b.iter(|| tally::store::keys::conversion(black_box(&m), black_box(&t))));
    g.finish();
}

fn parse_conversion(c: &mut Criterion) {
    let body = br#"{"txn_id":"order-1001","event":"sale","amount":"149.90","currency":"USD","click_id":"01JD0000000000000000000000","coupon":"SPRING25","metadata":{"plan":"pro"}}"#;
    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_and_validate_conversion", |b| {
        b.iter(|| {
            let parsed: ConversionBody = serde_json::from_slice(black_box(body)).unwrap();
            parsed.into_input(1_790_000_000_000).unwrap()
        })
    });
    g.finish();
}

fn canonical_query(c: &mut Criterion) {
    let raw = "txn_id=order-1001&amount=149.90&currency=USD&click_id=01JD0000000000000000000000&event=sale&coupon=SPRING%2025&ts=1790000000&sig=v1,abc";
    let mut g = c.benchmark_group("postback");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("parse_and_canonicalize_query", |b| {
        b.iter(|| tally::signing::postback::Query::parse(black_box(raw)).unwrap().canonical())
    });
    g.finish();
}

fn attribution_decision(c: &mut Criterion) {
    use std::convert::Infallible;
    use tally::attribution::{decide, ClickFacts, Facts};
    use tally::domain::account::{AccountRecord, CustomerBinding};
    use tally::domain::conversion::AttributionKeys;
    use tally::domain::entities::{Partner, PartnerKind, Status};
    use tally::domain::ids::{LinkId, PartnerId};

    struct One(Partner, ClickFacts);
    impl Facts for One {
        type Error = Infallible;
        fn partner(&self, _: &PartnerId) -> Result<Option<Partner>, Infallible> {
            Ok(Some(self.0.clone()))
        }
        fn click(&self, _: &Ulid) -> Result<Option<ClickFacts>, Infallible> {
            Ok(Some(self.1.clone()))
        }
        fn coupon_owner(&self, _: &str) -> Result<Option<Partner>, Infallible> {
            Ok(None)
        }
        fn account(&self, _: &str) -> Result<Option<AccountRecord>, Infallible> {
            Ok(None)
        }
        fn customer(&self, _: &str) -> Result<Option<CustomerBinding>, Infallible> {
            Ok(None)
        }
        fn named_partner(&self, _: &str) -> Result<Option<Partner>, Infallible> {
            Ok(None)
        }
    }
    let t0 = 1_790_000_000_000;
    let click_id = Ulid::mint(t0);
    let partner = Partner {
        id: PartnerId::parse("ann").unwrap(),
        merchant_id: MerchantId::parse("m").unwrap(),
        name: "Ann".into(),
        kind: PartnerKind::Affiliate,
        tier: None,
        status: Status::Active,
        coupons: vec![],
        outbound: None,
        plan_id: None,
        created_ms: 0,
        own_accounts: vec![],
    };
    let click = ClickFacts {
        click_id,
        link_id: LinkId::parse("spring").unwrap(),
        partner_id: partner.id.clone(),
        at_ms: t0,
        window_days: 30,
        min_ctit_seconds: 0,
        bot: false,
        visitor: [7; 16],
    };
    let facts = One(partner, click);
    let keys = AttributionKeys { click_id: Some(click_id.to_string()), ..Default::default() };
    let mut g = c.benchmark_group("attribution");
    g.throughput(Throughput::Elements(1));
    g.bench_function("click_rule_decision", |b| b.iter(|| decide(black_box(&keys), t0 + 86_400_000, &facts).unwrap()));
    g.finish();
}

criterion_group!(benches, signature, ids_and_keys, parse_conversion, canonical_query, attribution_decision);
criterion_main!(benches);
