//! The engine's two drivers must agree: the RocksDB store (writer thread, batches, view
//! over the database plus the batch, effects to a `WriteBatch`) and the in-memory model
//! (`engine::memory::Memory`, ordered maps) are fed the same generated commands and must
//! give the same answers, the same conversions and the same ledger. Commands go to the
//! store in groups sent without waiting, so that later commands of a batch read what
//! earlier ones staged.
//!
//! Replay: the commands of a run, applied again to an empty store, give byte-identical
//! conversions and ledger entries, ids included.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use tally::backend::Backend;
use tally::domain::account::{Touch, TouchKind};
use tally::domain::click::ClickRecord;
use tally::domain::conversion::{AdjustmentInput, AdjustmentKind, AttributionKeys, ConversionInput, RuleKind};
use tally::domain::entities::{Merchant, Partner, PartnerKind, Status};
use tally::domain::ids::{LinkId, MerchantId, PartnerId, PlanId, TxnId, Ulid};
use tally::domain::link::Link;
use tally::domain::money::{Currency, Money};
use tally::domain::outbound::{AttemptLog, DeliveryState, Outbound, OutboundMethod};
use tally::domain::plan::PlanBody;
use tally::engine::memory::Memory;
use tally::engine::{Command, ConversionDraft, DealDraft, EntityOp, Entropy, OutboxIndex, OutboxOp};
use tally::signing::WebhookSecret;
use tally::store::{Durability, Store, StoreOptions};

const T0: i64 = 1_790_000_000_000;
const DAY: i64 = 86_400_000;
const PARTNERS: [&str; 3] = ["alpha", "beta", "gamma"];
const ACCOUNTS: [&str; 3] = ["acme.com", "globex.com", "crm-7"];

fn m() -> MerchantId {
    MerchantId::parse("mm").unwrap()
}

fn pid(i: u8) -> PartnerId {
    PartnerId::parse(PARTNERS[usize::from(i) % PARTNERS.len()]).unwrap()
}

fn usd(cents: i64) -> Money {
    Money { minor: cents, currency: Currency::parse("USD").unwrap() }
}

fn entropy(seed: u64) -> Entropy {
    let mut e = [0u8; 16];
    e[..8].copy_from_slice(&seed.to_be_bytes());
    Entropy(e)
}

/// A generated step; turned into a command at a time the run decides.
#[derive(Debug, Clone)]
enum Step {
    Click {
        partner: u8,
        visitor: u8,
        bot: bool,
    },
    /// `key`: 0 explicit partner, 1 account, 2 customer, 3 click, 4 coupon, 5 none,
    /// 6 self-reported, 7 click and self-reported.
    Convert {
        txn: u8,
        key: u8,
        pick: u8,
        cents: i64,
        event: u8,
        variant: bool,
    },
    Batch {
        txns: Vec<(u8, u8, u8, i64)>,
    },
    Adjust {
        id: u8,
        txn: u8,
        kind: u8,
        cents: Option<i64>,
    },
    Deal {
        partner: u8,
        deal: u8,
        account: u8,
    },
    Touch {
        partner: u8,
        account: u8,
    },
    Reassign {
        partner: u8,
        account: u8,
    },
    Sweep,
    /// An admin settles a conversion's fraud review.
    Review {
        txn: u8,
        approve: bool,
    },
    PlanVersion {
        percent: u8,
    },
    Pause {
        partner: u8,
    },
    /// Moves the clock on by this many hours before the next step.
    Wait {
        hours: u16,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..3, 0u8..6, any::<bool>()).prop_map(|(partner, visitor, bot)| Step::Click { partner, visitor, bot }),
        8 => (0u8..24, 0u8..8, any::<u8>(), 1i64..80_000, 0u8..3, prop::bool::weighted(0.1))
            .prop_map(|(txn, key, pick, cents, event, variant)| Step::Convert { txn, key, pick, cents, event, variant }),
        1 => prop::collection::vec((0u8..24, 0u8..6, any::<u8>(), 1i64..80_000), 1..6).prop_map(|txns| Step::Batch { txns }),
        5 => (0u8..16, 0u8..24, 0u8..4, prop::option::of(1i64..40_000))
            .prop_map(|(id, txn, kind, cents)| Step::Adjust { id, txn, kind, cents }),
        2 => (0u8..3, 0u8..4, 0u8..3).prop_map(|(partner, deal, account)| Step::Deal { partner, deal, account }),
        2 => (0u8..3, 0u8..3).prop_map(|(partner, account)| Step::Touch { partner, account }),
        1 => (0u8..3, 0u8..3).prop_map(|(partner, account)| Step::Reassign { partner, account }),
        2 => Just(Step::Sweep),
        2 => (0u8..24, any::<bool>()).prop_map(|(txn, approve)| Step::Review { txn, approve }),
        1 => (5u8..40).prop_map(|percent| Step::PlanVersion { percent }),
        1 => (0u8..3).prop_map(|partner| Step::Pause { partner }),
        3 => (1u16..24 * 20).prop_map(|hours| Step::Wait { hours }),
    ]
}

/// Plan versions alternate strict and default fraud thresholds, held postbacks or not, and
/// what self-reported attribution earns.
fn plan_command(percent: u8, from: i64) -> Command {
    let fraud = if percent % 2 == 1 {
        // Strict; postbacks of flagged conversions held in half of these versions.
        if percent % 4 == 1 {
            r#""fraud":{"flag_ctit_below_seconds":150,"flag_visitor_clicks_per_day":3,"flag_clicks_per_conversion":4,
                "flag_conversions_per_visitor_day":2,"hold_postbacks":true},"self_reported":"full","#
        } else {
            r#""fraud":{"flag_ctit_below_seconds":150,"flag_visitor_clicks_per_day":3,"flag_clicks_per_conversion":4,
                "flag_conversions_per_visitor_day":2,"hold_postbacks":false},"self_reported":"full","#
        }
    } else {
        r#""fraud":{"hold_postbacks":false},"self_reported":"influence","#
    };
    let body: PlanBody = serde_json::from_str(&format!(
        r#"{{"currency":"USD","influence_percent":"5","hold_days":3,"deal_ttl_days":30,{fraud}
            "tiers":[{{"min_sales":1,"percent":"{}"}}],
            "caps":{{"monthly_commission":"2500.00"}},
            "rules":[{{"event":"sale","percent":"{percent}","flat":"0.99"}},{{"event":"lead","flat":"2.50"}},
                     {{"event":"renewal","percent":"10","recurring_months":2}}]}}"#,
        u32::from(percent) + 5
    ))
    .unwrap();
    Command::Entity(Box::new(EntityOp::Plan(body.into_plan(m(), PlanId::parse("p").unwrap(), from).unwrap())))
}

/// The merchant, its plan, three partners (one with coupons) and a link per partner.
fn setup() -> Vec<Command> {
    let merchant = Merchant {
        id: m(),
        name: "Model".into(),
        postback_token: false,
        allowed_ips: vec![],
        default_plan_id: None,
        created_ms: T0,
    };
    let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let mut out = vec![
        Command::Entity(Box::new(EntityOp::Merchant {
            merchant: merchant.clone(),
            secret: secret.clone(),
            token_hash: None,
        })),
        // Strict thresholds without held postbacks: short runs raise signals and still
        // make deliveries.
        plan_command(23, 0),
        Command::Entity(Box::new(EntityOp::Merchant {
            merchant: Merchant { default_plan_id: Some(PlanId::parse("p").unwrap()), ..merchant },
            secret: secret.clone(),
            token_hash: None,
        })),
    ];
    for (i, p) in PARTNERS.iter().enumerate() {
        let partner = Partner {
            id: PartnerId::parse(p).unwrap(),
            merchant_id: m(),
            name: (*p).into(),
            kind: if i == 2 { PartnerKind::Reseller } else { PartnerKind::Affiliate },
            tier: None,
            status: Status::Active,
            coupons: if i == 1 { vec!["SAVE10".into(), "BETA".into()] } else { vec![] },
            // alpha: a signed webhook on every event; beta: a GET on `created`; gamma: none.
            outbound: match i {
                0 => {
                    Some(Outbound { url: "https://alpha.example/hook".into(), method: OutboundMethod::Post, on: None })
                }
                1 => Some(Outbound {
                    url: "https://beta.example/pb?c={click_id}&t={txn_id}".into(),
                    method: OutboundMethod::Get,
                    on: None,
                }),
                _ => None,
            },
            plan_id: None,
            created_ms: T0,
            // gamma refers itself: its own customer and account raise the self-referral signal.
            own_accounts: if i == 2 { vec!["cust-1".into(), "acme.com".into()] } else { vec![] },
        };
        out.push(Command::Entity(Box::new(EntityOp::Partner { partner, secret: secret.clone() })));
        let link = Link {
            id: LinkId::parse(&format!("l-{p}")).unwrap(),
            merchant_id: m(),
            partner_id: PartnerId::parse(p).unwrap(),
            destination: "https://shop.example/".into(),
            deep_link_hosts: vec![],
            plan_id: None,
            window_days: 7,
            min_ctit_seconds: if i == 2 { 60 } else { 0 },
            status: Status::Active,
            created_ms: T0,
        };
        out.push(Command::Entity(Box::new(EntityOp::Link(link))));
    }
    out
}

/// The click a conversion names: the newest for an even `pick`, else any.
fn click_of(pick: u8, clicks: &[Ulid]) -> Option<String> {
    let i =
        if pick.is_multiple_of(2) { clicks.len().saturating_sub(1) } else { usize::from(pick) % clicks.len().max(1) };
    clicks.get(i).map(|c| c.to_string())
}

/// Turns steps into commands with times and entropy; `groups` says which commands are
/// sent together.
fn commands(steps: &[Step]) -> Vec<Vec<Command>> {
    let mut now = T0 + 1000;
    let mut clicks: Vec<Ulid> = Vec::new();
    let mut groups: Vec<Vec<Command>> = setup().into_iter().map(|c| vec![c]).collect();
    let mut group: Vec<Command> = Vec::new();
    let mut seed = 0u64;
    let convert_input =
        |txn: u8, key: u8, pick: u8, cents: i64, event: u8, variant: bool, now: i64, clicks: &[Ulid]| {
            let keys = match key {
                0 => AttributionKeys { partner_id: Some(pid(pick)), ..Default::default() },
                1 => AttributionKeys { account: Some(ACCOUNTS[usize::from(pick) % 3].into()), ..Default::default() },
                2 => AttributionKeys {
                    customer_id: Some(format!("cust-{}", pick % 4)),
                    partner_id: pick.is_multiple_of(2).then(|| pid(pick)),
                    ..Default::default()
                },
                // Half of them name the newest click: a short click-to-conversion time.
                3 => AttributionKeys { click_id: click_of(pick, clicks), ..Default::default() },
                4 => AttributionKeys {
                    coupon: Some(["SAVE10", "BETA", "NOPE"][usize::from(pick) % 3].into()),
                    ..Default::default()
                },
                6 | 7 => AttributionKeys {
                    self_reported: Some(["ALPHA", "save10", "Gamma", "a friend"][usize::from(pick) % 4].into()),
                    click_id: (key == 7).then(|| click_of(pick, clicks)).flatten(),
                    ..Default::default()
                },
                _ => AttributionKeys::default(),
            };
            // The same txn always carries the same content unless `variant`: retries are duplicates.
            let amount =
                if event == 1 { None } else { Some(usd(cents % 50_000 + 100 + i64::from(txn) + i64::from(variant))) };
            ConversionInput {
                txn_id: TxnId::parse(&format!("t{txn}")).unwrap(),
                event: ["sale", "lead", "renewal"][usize::from(event) % 3].into(),
                amount,
                occurred_ms: now - 1000,
                keys,
                metadata: variant.then(|| r#"{"variant":true}"#.to_string()),
            }
        };
    // Every run starts with a sale on a bot's click (flagged whatever the plan version) and
    // its review, so that each case compares signals, reviews and held postbacks.
    let prefix = [
        Step::Click { partner: 0, visitor: 1, bot: true },
        Step::Convert { txn: 23, key: 3, pick: 0, cents: 5_000, event: 0, variant: false },
        Step::Review { txn: 23, approve: true },
    ];
    for s in prefix.iter().chain(steps) {
        seed += 1;
        // Every third command shares the previous one's millisecond, as concurrent requests do.
        now += if seed.is_multiple_of(3) { 0 } else { 1000 };
        let command = match s {
            Step::Wait { hours } => {
                now += i64::from(*hours) * 3_600_000;
                groups.push(std::mem::take(&mut group));
                continue;
            }
            Step::Click { partner, visitor, bot } => {
                let p = PARTNERS[usize::from(*partner)];
                let click = ClickRecord {
                    click_id: Ulid::from_parts(now, entropy(seed).bits(0)),
                    link_id: LinkId::parse(&format!("l-{p}")).unwrap(),
                    partner_id: PartnerId::parse(p).unwrap(),
                    merchant_id: m(),
                    at_ms: now - 120_000,
                    subs: Default::default(),
                    ip: "203.0.113.0/24".into(),
                    user_agent: "Mozilla/5.0".into(),
                    bot: *bot,
                    unique: false,
                    visitor: [*visitor; 16],
                };
                clicks.push(click.click_id);
                Command::Click { click: Box::new(click), unique_window_ms: DAY, once: false }
            }
            Step::Convert { txn, key, pick, cents, event, variant } => {
                let input = convert_input(*txn, *key, *pick, *cents, *event, *variant, now, &clicks);
                Command::Conversion(Box::new(ConversionDraft {
                    merchant: m(),
                    input,
                    received_ms: now,
                    entropy: entropy(seed),
                }))
            }
            Step::Batch { txns } => Command::Batch(
                txns.iter()
                    .enumerate()
                    .map(|(i, (txn, key, pick, cents))| ConversionDraft {
                        merchant: m(),
                        input: convert_input(*txn, *key, *pick, *cents, 0, false, now, &clicks),
                        received_ms: now,
                        entropy: entropy(seed * 100 + i as u64),
                    })
                    .collect(),
            ),
            Step::Adjust { id, txn, kind, cents } => {
                let kind = [
                    AdjustmentKind::Refund,
                    AdjustmentKind::Chargeback,
                    AdjustmentKind::Approve,
                    AdjustmentKind::Reject,
                ][usize::from(*kind)];
                let input = AdjustmentInput {
                    adjustment_id: format!("a{id}"),
                    txn_id: TxnId::parse(&format!("t{txn}")).unwrap(),
                    kind,
                    amount_text: cents.map(|c| usd(c).amount_text()),
                };
                Command::Adjust { merchant: m(), input: Box::new(input), at: now, entropy: entropy(seed) }
            }
            Step::Deal { partner, deal, account } => Command::Deal(Box::new(DealDraft {
                merchant: m(),
                partner: pid(*partner),
                deal_id: format!("D-{deal}"),
                account: ACCOUNTS[usize::from(*account)].into(),
                opportunity_id: None,
                registered_ms: now,
            })),
            Step::Touch { partner, account } => Command::Touch {
                merchant: m(),
                account: ACCOUNTS[usize::from(*account)].into(),
                touch: Touch { partner_id: pid(*partner), kind: TouchKind::Crm, label: "webinar".into(), at_ms: now },
            },
            Step::Reassign { partner, account } => Command::Reassign {
                merchant: m(),
                account: ACCOUNTS[usize::from(*account)].into(),
                to: pid(*partner),
                by: "pm@model.example".into(),
                why: "territory change".into(),
                at: now,
            },
            Step::Sweep => Command::SweepHolds { now, limit: 10_000, entropy: entropy(seed) },
            Step::Review { txn, approve } => Command::Review {
                merchant: m(),
                txn: TxnId::parse(&format!("t{txn}")).unwrap(),
                approve: *approve,
                by: "risk@model.example".into(),
                note: approve.then(|| "checked the order".into()),
                at: now,
                entropy: entropy(seed),
            },
            Step::PlanVersion { percent } => plan_command(*percent, now),
            Step::Pause { partner } => {
                Command::Entity(Box::new(EntityOp::PausePartner { merchant: m(), partner: pid(*partner) }))
            }
        };
        group.push(command);
        if group.len() >= 8 {
            groups.push(std::mem::take(&mut group));
        }
    }
    groups.push(group);
    groups
}

fn open(dir: &std::path::Path) -> Store {
    let opts = StoreOptions {
        data_dir: dir.to_path_buf(),
        durability: Durability::Buffered,
        wal_sync_interval: std::time::Duration::from_millis(100),
        queue_capacity: 256,
        max_batch: 256,
        block_cache_bytes: 8 << 20,
        write_buffer_bytes: 4 << 20,
        recent_conversions: 64,
        memtable_budget_bytes: 64 << 20,
        rollups: true,
        shared: None,
    };
    Store::open(&opts, Arc::new(tally::metrics::Metrics::new())).unwrap()
}

/// Sends a group of commands without waiting between them (one writer batch, in order),
/// then collects the answers in order. The test runs on a current-thread runtime, so the
/// tasks send in the order they were spawned.
async fn submit_group(store: &Arc<Store>, group: Vec<Command>) -> Vec<String> {
    let mut tasks = Vec::new();
    for c in group {
        let store = Arc::clone(store);
        tasks.push(tokio::spawn(async move { format!("{:?}", store.submit(c).await.unwrap()) }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Everything the store holds of conversions and the ledger, encoded as JSON bytes.
async fn contents(store: &Store) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>) {
    let mut conversions = BTreeMap::new();
    for t in 0..24 {
        let txn = TxnId::parse(&format!("t{t}")).unwrap();
        if let Some(rec) = store.conversion(&m(), &txn).await.unwrap() {
            conversions.insert(txn.to_string(), serde_json::to_vec(&rec).unwrap());
        }
    }
    let mut ledger = BTreeMap::new();
    for p in PARTNERS {
        let entries = store.ledger_entries(&m(), &PartnerId::parse(p).unwrap()).await.unwrap();
        ledger.insert(p.to_string(), serde_json::to_vec(&entries).unwrap());
    }
    (conversions, ledger)
}

fn model_contents(model: &Memory) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>) {
    let conversions =
        model.conversions.iter().map(|((_, t), rec)| (t.to_string(), serde_json::to_vec(rec).unwrap())).collect();
    let ledger = PARTNERS
        .iter()
        .map(|p| (p.to_string(), serde_json::to_vec(&model.ledger_of(&m(), &PartnerId::parse(p).unwrap())).unwrap()))
        .collect();
    (conversions, ledger)
}

/// The delivery worker's part, decided from the model's state after a group: attempts
/// on up to three due deliveries (answered `2xx`, `500`, `503` with `Retry-After`, or
/// `410`), sometimes an admin's `:retry` of a finished one and an endpoint's enable.
fn outbox_round(model: &Memory, g: usize, salt: u64) -> Vec<Command> {
    let mut x = (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let now = model.conversions.values().map(|c| c.received_ms).max().unwrap_or(T0) + 1;
    let mut out = Vec::new();
    let due: Vec<_> = model
        .outbox
        .iter()
        .filter_map(|e| match e {
            OutboxIndex::Due { merchant, id, .. } => Some((merchant.clone(), *id)),
            _ => None,
        })
        .collect();
    for (merchant, id) in due.into_iter().take(3) {
        let status = match next() % 8 {
            0..=3 => Some(200),
            4 => Some(500),
            5 => Some(503),
            6 => Some(410),
            _ => None,
        };
        // Sometimes in the very millisecond a waiting delivery was made: it is then released
        // at the time it was made, as if it had never waited.
        let waiting = model.deliveries.values().filter(|d| d.due_ms.is_none()).map(|d| d.created_ms).max();
        let instant = waiting.filter(|_| next() % 2 == 0);
        let attempt = AttemptLog {
            at_ms: instant.unwrap_or(now),
            duration_ms: if instant.is_some() { 0 } else { 12 },
            status,
            error: status.is_none().then(|| "timeout after 10s".into()),
            response: String::new(),
            retry_after_ms: (status == Some(503)).then_some(600_000),
        };
        let op = OutboxOp::Attempted { merchant, id, attempt, window_ms: 72 * 3_600_000, entropy: entropy(next()) };
        out.push(Command::Outbox(Box::new(op)));
    }
    if next() % 4 == 0 {
        let finished = model.deliveries.values().find(|d| d.state.finished() || d.state == DeliveryState::Parked);
        if let Some(d) = finished {
            out.push(Command::Outbox(Box::new(OutboxOp::Retry { merchant: m(), id: d.id, at: now })));
        }
    }
    if next() % 5 == 0 {
        let partner = pid((next() % 3) as u8);
        out.push(Command::Outbox(Box::new(OutboxOp::Enable { merchant: m(), partner, at: now, limit: 2 })));
    }
    out
}

/// Every delivery the store holds, as JSON, by id.
async fn store_deliveries(store: &Store) -> BTreeMap<String, Vec<u8>> {
    let filter = tally::backend::DeliveryFilter { limit: 100_000, ..Default::default() };
    let (all, _) = store.deliveries(&m(), filter).await.unwrap();
    all.iter().map(|d| (d.id.to_string(), serde_json::to_vec(d).unwrap())).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// Same commands, same answers, same conversions, same ledger: RocksDB store and model.
    #[test]
    fn the_store_and_the_model_agree(steps in prop::collection::vec(step(), 200..400)) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(open(dir.path()));
            let mut model = Memory::default();
            for (g, group) in commands(&steps).into_iter().enumerate() {
                let want: Vec<String> = group.iter().cloned().map(|c| format!("{:?}", model.submit(c))).collect();
                let got = submit_group(&store, group).await;
                for (i, (w, g2)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(g2, w, "group {g}, command {i}: the store answered differently from the model");
                }
                let round = outbox_round(&model, g, steps.len() as u64);
                let want: Vec<String> = round.iter().cloned().map(|c| format!("{:?}", model.submit(c))).collect();
                let got = submit_group(&store, round).await;
                assert_eq!(got, want, "group {g}: the outbox round answered differently");
            }
            let (conversions, ledger) = contents(&store).await;
            let (want_conversions, want_ledger) = model_contents(&model);
            assert_eq!(conversions, want_conversions, "conversions differ");
            assert_eq!(ledger, want_ledger, "ledgers differ");
            let want_deliveries: BTreeMap<String, Vec<u8>> =
                model.deliveries.values().map(|d| (d.id.to_string(), serde_json::to_vec(d).unwrap())).collect();
            assert_eq!(store_deliveries(&store).await, want_deliveries, "deliveries differ");
            let due: Vec<_> = store.due_deliveries(0, i64::MAX, 100_000).await.unwrap();
            let want_due: Vec<_> = model.outbox.iter().filter_map(|e| match e {
                OutboxIndex::Due { at, merchant, id } => Some((*at, merchant.clone(), *id)),
                _ => None,
            }).collect();
            assert_eq!(due, want_due, "due indexes differ");
            let open: Vec<String> = store.open_reviews(&m(), None, 100_000).await.unwrap()
                .iter().map(|r| r.txn_id.to_string()).collect();
            let want_open: Vec<String> = model.reviews.values().map(|t| t.to_string()).collect();
            assert_eq!(open, want_open, "open reviews differ");
            assert!(!model.deliveries.is_empty() || steps.len() < 250, "a long run makes deliveries");
            let first = &model.conversions[&(m(), TxnId::parse("t23").unwrap())];
            assert_eq!(first.attribution.as_ref().map(|a| a.rule), Some(RuleKind::Click), "the opening sale is attributed by its click");
            assert!(first.review.is_some(), "the opening sale on a bot's click is flagged");
            assert!(!model.ledger.is_empty() || steps.len() < 250, "a long run credits somebody");
            store.shutdown_blocking_in_place();
        });
    }

    /// Replaying the commands of a run into an empty store gives the same bytes.
    #[test]
    fn a_replay_gives_byte_identical_conversions_and_ledger(steps in prop::collection::vec(step(), 200..300)) {
        runtime().block_on(async {
            let groups = commands(&steps);
            let first_dir = tempfile::tempdir().unwrap();
            let first = Arc::new(open(first_dir.path()));
            for group in groups.clone() {
                submit_group(&first, group).await;
            }
            let original = contents(&first).await;
            first.shutdown_blocking_in_place();

            // One command at a time this time: batching must not change the result either.
            let replay_dir = tempfile::tempdir().unwrap();
            let replay = Arc::new(open(replay_dir.path()));
            for c in groups.into_iter().flatten() {
                replay.submit(c).await.unwrap();
            }
            let replayed = contents(&replay).await;
            assert!(!original.0.is_empty(), "the run stored conversions");
            assert_eq!(replayed.0, original.0, "replayed conversions differ");
            assert_eq!(replayed.1, original.1, "replayed ledger differs");
            replay.shutdown_blocking_in_place();
        });
    }
}

/// The engine is the state machine only: it names no storage, no runtime, no HTTP.
#[test]
fn the_engine_names_no_storage_runtime_or_http() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for word in ["rocksdb", "tokio", "hyper", "StatusCode", "status: u16"] {
            assert!(!text.contains(word), "{} names {word}", path.display());
        }
        files += 1;
    }
    assert!(files >= 8, "the engine's files were read");
}
