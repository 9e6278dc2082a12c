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

criterion_group!(benches, signature, ids_and_keys, parse_conversion);
criterion_main!(benches);
