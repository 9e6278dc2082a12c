//! Property: for any sequence of conversions and adjustments, every partner's ledger
//! balance is the sum of its commissions minus what refunds, chargebacks and rejections
//! took back; no entry is ever changed; the same sequence gives the same ledger. The
//! report rollups kept as the events came equal the ones rebuilt from the stored events,
//! and a duplicate changes none of them. Payout runs and paid or failed lines keep every
//! balance equal to a model computed from the conversions and the runs alone, and the
//! ledger's sum equal to pending + payable.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use tally::backend::{Backend, BackendExt};
use tally::domain::account::{Touch, TouchKind};
use tally::domain::conversion::{
    AdjustmentInput, AdjustmentKind, AttributionKeys, ConversionInput, ConversionRecord, ConversionStatus,
};
use tally::domain::entities::{Merchant, Partner, PartnerKind, Status};
use tally::domain::ids::{MerchantId, PartnerId, PlanId, TxnId};
use tally::domain::ledger::{LedgerEntry, LedgerKind};
use tally::domain::money::{Currency, Money};
use tally::domain::plan::PlanBody;
use tally::engine::{DealDraft, EntityOp};
use tally::signing::WebhookSecret;
use tally::store::{Durability, Store, StoreOptions};

#[derive(Debug, Clone)]
enum Step {
    Convert {
        n: u8,
        cents: i64,
        via_account: bool,
    },
    Refund {
        n: u8,
        cents: i64,
    },
    Chargeback {
        n: u8,
    },
    Approve {
        n: u8,
    },
    Reject {
        n: u8,
    },
    Click {
        visitor: u8,
        beta: bool,
    },
    Reassign {
        to_beta: bool,
    },
    Duplicate {
        n: u8,
    },
    /// A payout run through today, or through yesterday (which pays nothing here).
    Payout {
        today: bool,
    },
    /// Settles the first pending line of the latest run: paid, or failed.
    Settle {
        paid: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..6, 1i64..50_000, any::<bool>()).prop_map(|(n, cents, via_account)| Step::Convert { n, cents, via_account }),
        3 => (0u8..6, 1i64..30_000).prop_map(|(n, cents)| Step::Refund { n, cents }),
        1 => (0u8..6).prop_map(|n| Step::Chargeback { n }),
        1 => (0u8..6).prop_map(|n| Step::Approve { n }),
        1 => (0u8..6).prop_map(|n| Step::Reject { n }),
        2 => (0u8..3, any::<bool>()).prop_map(|(visitor, beta)| Step::Click { visitor, beta }),
        1 => any::<bool>().prop_map(|to_beta| Step::Reassign { to_beta }),
        1 => (0u8..6).prop_map(|n| Step::Duplicate { n }),
        2 => prop_oneof![4 => Just(true), 1 => Just(false)].prop_map(|today| Step::Payout { today }),
        2 => any::<bool>().prop_map(|paid| Step::Settle { paid }),
    ]
}

const T0: i64 = 1_790_000_000_000;

fn m() -> MerchantId {
    MerchantId::parse("pm").unwrap()
}

fn usd(cents: i64) -> Money {
    Money { minor: cents, currency: Currency::parse("USD").unwrap() }
}

fn partner(id: &str) -> Partner {
    Partner {
        id: PartnerId::parse(id).unwrap(),
        merchant_id: m(),
        name: id.into(),
        kind: PartnerKind::Affiliate,
        tier: None,
        status: Status::Active,
        coupons: vec![],
        outbound: None,
        plan_id: None,
        created_ms: T0,
        own_accounts: vec![],
    }
}

async fn open(dir: &std::path::Path) -> Store {
    let opts = StoreOptions {
        data_dir: dir.to_path_buf(),
        durability: Durability::Buffered,
        wal_sync_interval: std::time::Duration::from_millis(100),
        queue_capacity: 64,
        max_batch: 64,
        block_cache_bytes: 8 << 20,
        write_buffer_bytes: 4 << 20,
        recent_conversions: tally::store::DEFAULT_RECENT_CONVERSIONS,
        memtable_budget_bytes: 64 << 20,
        rollups: true,
        shared: None,
    };
    let store = Store::open(&opts, Arc::new(tally::metrics::Metrics::new())).unwrap();
    let merchant = Merchant {
        id: m(),
        name: "Prop".into(),
        postback_token: false,
        allowed_ips: vec![],
        default_plan_id: Some(PlanId::parse("p").unwrap()),
        created_ms: T0,
    };
    store.apply(EntityOp::Merchant { merchant, secret: WebhookSecret::generate(), token_hash: None }).await.unwrap();
    let body: PlanBody = serde_json::from_str(
        r#"{"currency":"USD","influence_percent":"5","rules":[{"event":"sale","percent":"12.5","flat":"0.99"}]}"#,
    )
    .unwrap();
    store.put_plan(body.into_plan(m(), PlanId::parse("p").unwrap(), 0).unwrap()).await.unwrap();
    for p in ["alpha", "beta"] {
        store.put_partner(partner(p), WebhookSecret::generate()).await.unwrap();
    }
    let draft = DealDraft {
        merchant: m(),
        partner: PartnerId::parse("alpha").unwrap(),
        deal_id: "D".into(),
        account: "acme.com".into(),
        opportunity_id: None,
        registered_ms: T0,
    };
    store.register_deal(draft).await.unwrap();
    let touch =
        Touch { partner_id: PartnerId::parse("beta").unwrap(), kind: TouchKind::Crm, label: "crm".into(), at_ms: T0 };
    store.touch(m(), "acme.com".into(), touch).await.unwrap();
    store
}

/// Runs the steps; returns every partner's entries, checking after each step that no
/// entry seen before was changed or removed.
async fn run(steps: &[Step], dir: &std::path::Path) -> (Store, BTreeMap<String, Vec<LedgerEntry>>) {
    let store = open(dir).await;
    let mut inputs: BTreeMap<u8, ConversionInput> = BTreeMap::new();
    let mut runs: Vec<String> = Vec::new();
    let mut seen: BTreeMap<String, LedgerEntry> = BTreeMap::new();
    for (i, s) in steps.iter().enumerate() {
        let now = T0 + 1000 * (i as i64 + 1);
        let txn = |n: &u8| TxnId::parse(&format!("t{n}")).unwrap();
        let adjust = |n: &u8, kind: AdjustmentKind, amount: Option<i64>| AdjustmentInput {
            adjustment_id: format!("a{i}"),
            txn_id: txn(n),
            kind,
            amount_text: amount.map(|c| usd(c).amount_text()),
        };
        match s {
            Step::Convert { n, cents, via_account } => {
                let keys = if *via_account {
                    AttributionKeys { account: Some("acme.com".into()), ..Default::default() }
                } else {
                    AttributionKeys { partner_id: Some(PartnerId::parse("beta").unwrap()), ..Default::default() }
                };
                // Some conversions occurred days before they arrive: they count on their own day.
                let occurred_ms = now - i64::from(*n) * 86_400_000;
                let input = ConversionInput {
                    txn_id: txn(n),
                    event: "sale".into(),
                    amount: Some(usd(*cents)),
                    occurred_ms,
                    keys,
                    metadata: None,
                };
                inputs.entry(*n).or_insert_with(|| input.clone());
                store.convert(m(), input, now).await.unwrap();
            }
            Step::Click { visitor, beta } => {
                let click = tally::domain::click::ClickRecord {
                    click_id: tally::domain::ids::Ulid::mint(now),
                    link_id: tally::domain::ids::LinkId::parse("l").unwrap(),
                    partner_id: PartnerId::parse(if *beta { "beta" } else { "alpha" }).unwrap(),
                    merchant_id: m(),
                    at_ms: now,
                    subs: Default::default(),
                    ip: "203.0.113.0/24".into(),
                    user_agent: "test".into(),
                    bot: false,
                    unique: false,
                    visitor: [*visitor; 16],
                };
                store.record_click(click, 3_600_000).await.unwrap();
            }
            Step::Reassign { to_beta } => {
                let to = PartnerId::parse(if *to_beta { "beta" } else { "alpha" }).unwrap();
                store.reassign(m(), "acme.com".into(), to, "ops".into(), "contract".into(), now).await.unwrap();
            }
            Step::Payout { today } => {
                let day = tally::engine::day_of(now) - u32::from(!*today);
                let request = tally::domain::payout::PayoutRequest {
                    payout_id: format!("run-{i}"),
                    currency: Currency::parse("USD").unwrap(),
                    min_amount: usd(1),
                    through: format!("day {day}"),
                    through_end_ms: (i64::from(day) + 1) * 86_400_000,
                };
                let op = tally::engine::PayoutOp::Run {
                    merchant: m(),
                    request,
                    at: now,
                    entropy: tally::engine::Entropy::random(),
                };
                store.payout_op(op).await.unwrap();
                runs.push(format!("run-{i}"));
            }
            Step::Settle { paid } => {
                if let Some(id) = runs.last() {
                    let run = store.payout(&m(), id).await.unwrap().unwrap();
                    if let Some(line) = run.lines.iter().find(|l| l.state == tally::domain::payout::LineState::Pending)
                    {
                        let outcome = if *paid {
                            tally::engine::Settlement::Paid { reference: "ref".into() }
                        } else {
                            tally::engine::Settlement::Failed { reason: "bounced".into() }
                        };
                        let op = tally::engine::PayoutOp::Settle {
                            merchant: m(),
                            payout_id: id.clone(),
                            partner: line.partner_id.clone(),
                            outcome,
                            at: now,
                            entropy: tally::engine::Entropy::random(),
                        };
                        store.payout_op(op).await.unwrap();
                    }
                }
            }
            Step::Duplicate { n } => {
                if let Some(input) = inputs.get(n) {
                    let before = store.rollups_dump().unwrap();
                    store.convert(m(), input.clone(), now).await.unwrap();
                    assert_eq!(store.rollups_dump().unwrap(), before, "a duplicate changed the rollups");
                }
            }
            Step::Refund { n, cents } => {
                store.adjust(m(), adjust(n, AdjustmentKind::Refund, Some(*cents)), now).await.unwrap();
            }
            Step::Chargeback { n } => {
                store.adjust(m(), adjust(n, AdjustmentKind::Chargeback, None), now).await.unwrap();
            }
            Step::Approve { n } => {
                store.adjust(m(), adjust(n, AdjustmentKind::Approve, None), now).await.unwrap();
            }
            Step::Reject { n } => {
                store.adjust(m(), adjust(n, AdjustmentKind::Reject, None), now).await.unwrap();
            }
        }
        check_balances(&store, &runs).await;
        for p in ["alpha", "beta"] {
            let entries = store.ledger_entries(&m(), &PartnerId::parse(p).unwrap()).await.unwrap();
            let ids: Vec<String> = entries.iter().map(|e| e.entry_id.to_string()).collect();
            for (id, old) in seen.iter().filter(|(_, e)| e.partner_id.as_str() == p) {
                assert!(ids.contains(id), "entry {id} disappeared");
                assert_eq!(entries.iter().find(|e| e.entry_id.to_string() == *id), Some(old), "entry {id} changed");
            }
            for e in entries {
                seen.insert(e.entry_id.to_string(), e);
            }
        }
    }
    let mut by_partner = BTreeMap::new();
    for p in ["alpha", "beta"] {
        by_partner.insert(p.to_string(), store.ledger_entries(&m(), &PartnerId::parse(p).unwrap()).await.unwrap());
    }
    (store, by_partner)
}

/// What each partner must hold: for every live conversion, what was credited minus the
/// proportional share of what was refunded; nothing for rejected or reversed ones.
async fn expected(store: &Store) -> BTreeMap<String, i64> {
    let mut want = BTreeMap::from([("alpha".to_string(), 0), ("beta".to_string(), 0)]);
    for n in 0..6 {
        let Some(rec): Option<ConversionRecord> =
            store.conversion(&m(), &TxnId::parse(&format!("t{n}")).unwrap()).await.unwrap()
        else {
            continue;
        };
        if matches!(rec.status, ConversionStatus::Rejected | ConversionStatus::Reversed) {
            continue;
        }
        let total = rec.amount.unwrap().minor;
        let a = rec.attribution.as_ref().unwrap();
        let mut credited = vec![(a.partner_id.to_string(), rec.commission.as_ref().map_or(0, |c| c.amount.minor))];
        credited.extend(a.influencers.iter().map(|i| (i.partner_id.to_string(), i.commission.map_or(0, |c| c.minor))));
        for (p, amount) in credited {
            let kept = amount - tally::commission::proportional(amount, rec.refunded_minor, total);
            *want.get_mut(&p).unwrap() += if rec.refunded_minor == 0 { amount } else { kept };
        }
    }
    want
}

/// The balances the engine keeps equal the ones computed from the conversions alone:
/// a conversion ever approved counts its gross credit as approved and what was taken back
/// as reversed; a pending one counts its net credit as pending; one rejected before
/// approval counts nothing. And payable = approved - reversed - paid - in runs.
async fn check_balances(store: &Store, runs: &[String]) {
    let mut want: BTreeMap<String, tally::domain::balance::Balance> = BTreeMap::new();
    for n in 0..6 {
        let Some(rec) = store.conversion(&m(), &TxnId::parse(&format!("t{n}")).unwrap()).await.unwrap() else {
            continue;
        };
        let total = rec.amount.unwrap().minor;
        let ever_approved = rec.history.iter().any(|h| h.to == ConversionStatus::Approved);
        let finished = matches!(rec.status, ConversionStatus::Rejected | ConversionStatus::Reversed);
        let a = rec.attribution.as_ref().unwrap();
        let mut credited = vec![(a.partner_id.to_string(), rec.commission.as_ref().map_or(0, |c| c.amount.minor))];
        credited.extend(a.influencers.iter().map(|i| (i.partner_id.to_string(), i.commission.map_or(0, |c| c.minor))));
        for (p, gross) in credited.into_iter().filter(|(_, g)| *g != 0) {
            let taken = if finished {
                gross
            } else if rec.refunded_minor == 0 {
                0
            } else {
                tally::commission::proportional(gross, rec.refunded_minor, total)
            };
            let b = want.entry(p).or_default();
            if ever_approved {
                b.approved += gross;
                b.reversed += taken;
            } else {
                b.pending += gross - taken;
            }
        }
    }
    // Paid and in runs: from the runs' lines.
    for id in runs {
        for line in store.payout(&m(), id).await.unwrap().unwrap().lines {
            let b = want.entry(line.partner_id.to_string()).or_default();
            match line.state {
                tally::domain::payout::LineState::Pending => b.in_runs += line.amount.minor,
                tally::domain::payout::LineState::Paid { .. } => b.paid += line.amount.minor,
                tally::domain::payout::LineState::Failed { .. } => {}
            }
        }
    }
    for p in ["alpha", "beta"] {
        let pid = PartnerId::parse(p).unwrap();
        let got = store.balances(&m(), &pid).await.unwrap();
        let got = got.first().map(|(_, b)| *b).unwrap_or_default();
        let w = want.get(p).copied().unwrap_or_default();
        assert_eq!(got, w, "balance of {p}");
        assert_eq!(got.payable(), got.approved - got.reversed - got.paid - got.in_runs);
        // The ledger agrees: its sum is what was earned (pending included) minus what was
        // paid or is in a run.
        let sum: i64 = store.ledger_entries(&m(), &pid).await.unwrap().iter().map(|e| e.amount.minor).sum();
        assert_eq!(sum, got.pending + got.payable(), "ledger of {p}");
    }
}

fn shape(ledger: &BTreeMap<String, Vec<LedgerEntry>>) -> Vec<(String, String, String, i64)> {
    let mut rows: Vec<_> = ledger
        .values()
        .flatten()
        .map(|e| (e.partner_id.to_string(), e.txn_id.to_string(), e.kind.as_str().to_string(), e.amount.minor))
        .collect();
    rows.sort();
    rows
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ledger_balances_are_commissions_minus_reversals(steps in proptest::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (store, ledger) = run(&steps, dir.path()).await;
            let want = expected(&store).await;
            for (p, entries) in &ledger {
                let earned = entries.iter().filter(|e| !matches!(e.kind, LedgerKind::Payout | LedgerKind::Correction));
                let balance: i64 = earned.map(|e| e.amount.minor).sum();
                assert_eq!(balance, want[p], "partner {p}: {entries:#?}");
                assert!(balance >= 0, "a partner never owes more than it was credited");
            }
            // The rollups kept as events came equal the ones rebuilt from the stored events.
            let kept = store.rollups_dump().unwrap();
            let (_, mismatches) = store.check_rollups(10).unwrap();
            assert!(mismatches.is_empty(), "{mismatches:#?}");
            let balances = |store: &Store| {
                let store = store.clone();
                async move {
                    let mut all = Vec::new();
                    for p in ["alpha", "beta"] {
                        all.push(store.balances(&m(), &PartnerId::parse(p).unwrap()).await.unwrap());
                    }
                    all
                }
            };
            let kept_balances = balances(&store).await;
            store.rebuild_rollups(&mut |_| {}).unwrap();
            assert_eq!(store.rollups_dump().unwrap(), kept, "rebuild differs from the incremental rollups");
            assert_eq!(balances(&store).await, kept_balances, "rebuilt balances differ from the kept ones");
            store.shutdown_blocking_in_place();

            let again = tempfile::tempdir().unwrap();
            let (store2, ledger2) = run(&steps, again.path()).await;
            assert_eq!(shape(&ledger), shape(&ledger2), "the same sequence gives the same ledger");
            store2.shutdown_blocking_in_place();
        });
    }
}
