//! The engine's rules, table-driven, on the in-memory state: no RocksDB, no runtime.

use super::memory::Memory;
use super::*;
use crate::domain::account::TouchKind;
use crate::domain::conversion::{AdjustmentKind, AttributionKeys, ConversionInput, ConversionStatus, Credit, RuleKind};
use crate::domain::entities::{PartnerKind, Status};
use crate::domain::ids::PlanId;
use crate::domain::money::{Currency, Money};
use crate::domain::plan::PlanBody;
use crate::signing::WebhookSecret;

const T0: i64 = 1_790_000_000_000;
const DAY: i64 = 86_400_000;

fn m() -> MerchantId {
    MerchantId::parse("m").unwrap()
}

fn p(id: &str) -> PartnerId {
    PartnerId::parse(id).unwrap()
}

fn usd(cents: i64) -> Money {
    Money { minor: cents, currency: Currency::parse("USD").unwrap() }
}

fn entity(op: EntityOp) -> Command {
    Command::Entity(Box::new(op))
}

/// A merchant with a 20 % plan (5 % influence, 3-day hold) and partners alpha and beta.
fn program() -> Memory {
    let mut s = Memory::default();
    let secret = WebhookSecret::generate();
    let merchant = Merchant {
        id: m(),
        name: "M".into(),
        postback_token: false,
        allowed_ips: vec![],
        default_plan_id: Some(PlanId::parse("p").unwrap()),
        created_ms: T0,
    };
    let body: PlanBody = serde_json::from_str(
        r#"{"currency":"USD","influence_percent":"5","hold_days":3,"deal_ttl_days":30,"rules":[{"event":"sale","percent":"20"}]}"#,
    )
    .unwrap();
    let plan = body.into_plan(m(), PlanId::parse("p").unwrap(), 0).unwrap();
    let merchant_op = EntityOp::Merchant { merchant, secret: secret.clone(), token_hash: None };
    assert!(matches!(s.submit(entity(merchant_op)), Answer::Entity(Ok(Saved::Created))));
    assert!(matches!(s.submit(entity(EntityOp::Plan(plan))), Answer::Entity(Ok(Saved::Created))));
    for id in ["alpha", "beta"] {
        let partner = Partner {
            id: p(id),
            merchant_id: m(),
            name: id.into(),
            kind: PartnerKind::Reseller,
            tier: None,
            status: Status::Active,
            coupons: vec![],
            outbound: None,
            plan_id: None,
            created_ms: T0,
            own_accounts: vec![],
        };
        let op = EntityOp::Partner { partner, secret: secret.clone() };
        assert!(matches!(s.submit(entity(op)), Answer::Entity(Ok(Saved::Created))));
    }
    s
}

fn sale(txn: &str, cents: i64, keys: AttributionKeys) -> Command {
    let input = ConversionInput {
        txn_id: TxnId::parse(txn).unwrap(),
        event: "sale".into(),
        amount: Some(usd(cents)),
        occurred_ms: T0,
        keys,
        metadata: None,
    };
    Command::Conversion(Box::new(ConversionDraft {
        merchant: m(),
        input,
        received_ms: T0 + 1000,
        entropy: Entropy([7; 16]),
    }))
}

fn explicit(partner: &str) -> AttributionKeys {
    AttributionKeys { partner_id: Some(p(partner)), ..Default::default() }
}

fn outcome(a: Answer) -> ConversionOutcome {
    match a {
        Answer::Conversion(o) => o,
        other => panic!("not a conversion answer: {other:?}"),
    }
}

#[test]
fn dedupe_is_exact_by_merchant_and_txn() {
    let mut s = program();
    assert!(matches!(outcome(s.submit(sale("t1", 10_000, explicit("alpha")))), ConversionOutcome::Created(_)));
    let cases = [
        ("the same content again", sale("t1", 10_000, explicit("alpha")), "duplicate"),
        ("another amount", sale("t1", 10_001, explicit("alpha")), "conflict"),
        ("another partner", sale("t1", 10_000, explicit("beta")), "conflict"),
        ("another txn", sale("t2", 10_000, explicit("alpha")), "created"),
    ];
    for (what, command, want) in cases {
        let got = match outcome(s.submit(command)) {
            ConversionOutcome::Created(_) => "created",
            ConversionOutcome::Duplicate(_) => "duplicate",
            ConversionOutcome::Conflict(_) => "conflict",
        };
        assert_eq!(got, want, "{what}");
    }
    assert_eq!(s.conversions.len(), 2);
    assert_eq!(s.ledger_of(&m(), &p("alpha")).len(), 2, "a duplicate or conflict credits nothing");
}

#[test]
fn the_same_state_and_command_give_the_same_effects_and_answer() {
    let mut s = program();
    s.submit(sale("t0", 5_000, explicit("beta")));
    for command in [
        sale("t1", 12_345, explicit("alpha")),
        Command::Adjust {
            merchant: m(),
            input: Box::new(AdjustmentInput {
                adjustment_id: "a".into(),
                txn_id: TxnId::parse("t0").unwrap(),
                kind: AdjustmentKind::Refund,
                amount_text: Some("10.00".into()),
            }),
            at: T0 + 5000,
            entropy: Entropy([3; 16]),
        },
        Command::SweepHolds { now: T0 + 10 * DAY, limit: 10, entropy: Entropy([9; 16]) },
    ] {
        let a = execute(&s, command.clone()).unwrap();
        let b = execute(&s.clone(), command).unwrap();
        assert_eq!(format!("{:?}", a.effects), format!("{:?}", b.effects));
        assert_eq!(format!("{:?}", a.answer), format!("{:?}", b.answer));
        assert!(!a.effects.is_empty());
    }
}

#[test]
fn adjustments_are_refused_with_a_code_and_no_status() {
    let mut s = program();
    s.submit(sale("t1", 10_000, explicit("alpha")));
    let adjust = |s: &mut Memory, id: &str, txn: &str, kind: AdjustmentKind, amount: Option<&str>| {
        let input = AdjustmentInput {
            adjustment_id: id.into(),
            txn_id: TxnId::parse(txn).unwrap(),
            kind,
            amount_text: amount.map(str::to_string),
        };
        match s.submit(Command::Adjust {
            merchant: m(),
            input: Box::new(input),
            at: T0 + 2000,
            entropy: Entropy([1; 16]),
        }) {
            Answer::Adjust(AdjustOutcome::Refused(r)) => Some((r.conflict, r.code, r.field)),
            Answer::Adjust(_) => None,
            other => panic!("{other:?}"),
        }
    };
    let cases = [
        ("unknown txn", "a1", "nope", AdjustmentKind::Reject, None, Some((false, "invalid_field", Some("txn_id")))),
        (
            "refund beyond the amount",
            "a2",
            "t1",
            AdjustmentKind::Refund,
            Some("100.01"),
            Some((false, "invalid_field", Some("amount"))),
        ),
        ("a partial refund", "a3", "t1", AdjustmentKind::Refund, Some("10.00"), None),
        ("the same id, the same adjustment", "a3", "t1", AdjustmentKind::Refund, Some("10.00"), None),
        (
            "the same id, another adjustment",
            "a3",
            "t1",
            AdjustmentKind::Reject,
            None,
            Some((true, "adjustment_conflict", Some("adjustment_id"))),
        ),
        ("reject, then approve", "a4", "t1", AdjustmentKind::Reject, None, None),
    ];
    for (what, id, txn, kind, amount, want) in cases {
        assert_eq!(adjust(&mut s, id, txn, kind, amount), want, "{what}");
    }
    assert_eq!(
        adjust(&mut s, "a5", "t1", AdjustmentKind::Approve, None),
        Some((true, "illegal_status_change", None)),
        "a rejected conversion cannot be approved"
    );
    let net: i64 = s.ledger_of(&m(), &p("alpha")).iter().map(|e| e.amount.minor).sum();
    assert_eq!(net, 0, "the rejection took back what the refund left");
}

#[test]
fn deal_registrations_answer_in_domain_terms() {
    let mut s = program();
    let deal = |partner: &str, id: &str, at: i64| {
        Command::Deal(Box::new(DealDraft {
            merchant: m(),
            partner: p(partner),
            deal_id: id.into(),
            account: "acme.com".into(),
            opportunity_id: None,
            registered_ms: at,
        }))
    };
    let cases = [
        ("first registration", deal("alpha", "D1", T0), DealOutcome::Registered, false),
        ("the same deal again", deal("alpha", "D1", T0 + 5), DealOutcome::Registered, true),
        ("the holder, another deal", deal("alpha", "D2", T0 + 10), DealOutcome::AlreadyHeld, false),
        ("another partner", deal("beta", "D3", T0 + 20), DealOutcome::Taken, false),
        ("another partner after expiry", deal("beta", "D4", T0 + 31 * DAY), DealOutcome::Registered, false),
    ];
    for (what, command, want, replay) in cases {
        match s.submit(command) {
            Answer::Deal(a, r) => assert_eq!((a.outcome, r), (want, replay), "{what}"),
            other => panic!("{other:?}"),
        }
    }
    let acc = &s.accounts[&(m(), "acme.com".to_string())];
    assert_eq!(acc.claim.as_ref().unwrap().partner_id, p("beta"));
    assert!(acc.touches.iter().any(|t| t.partner_id == p("beta") && t.kind == TouchKind::Deal), "the refused one");
    assert!(acc.touches.iter().any(|t| t.partner_id == p("alpha") && t.label.contains("expired")), "the expired one");
}

#[test]
fn influencers_are_credited_as_influenced_with_a_reason() {
    let mut s = program();
    s.submit(Command::Touch {
        merchant: m(),
        account: "acme.com".into(),
        touch: Touch { partner_id: p("beta"), kind: TouchKind::Crm, label: "webinar".into(), at_ms: T0 - DAY },
    });
    let keys = AttributionKeys { account: Some("acme.com".into()), partner_id: Some(p("alpha")), ..Default::default() };
    let ConversionOutcome::Created(rec) = outcome(s.submit(sale("t1", 10_000, keys))) else { panic!() };
    let a = rec.attribution.unwrap();
    assert_eq!((a.partner_id, a.credit), (p("alpha"), Credit::Sourced));
    let [i] = a.influencers.as_slice() else { panic!("one influencer: {:?}", a.influencers) };
    assert_eq!((&i.partner_id, i.credit, i.rule), (&p("beta"), Credit::Influenced, RuleKind::Touch));
    assert!(
        i.reason.contains("touched account acme.com (webinar)") && i.reason.contains("partner alpha sourced it"),
        "{}",
        i.reason
    );
    assert_eq!(i.commission, Some(usd(500)), "5 % influence fee");
}

#[test]
fn a_reassignment_reads_the_holder_it_replaces_and_explains_later_credit() {
    let mut s = program();
    s.submit(Command::Deal(Box::new(DealDraft {
        merchant: m(),
        partner: p("alpha"),
        deal_id: "D1".into(),
        account: "acme.com".into(),
        opportunity_id: None,
        registered_ms: T0 - DAY,
    })));
    let Answer::Reassigned(acc) = s.submit(Command::Reassign {
        merchant: m(),
        account: "acme.com".into(),
        to: p("beta"),
        by: "pm@m.example".into(),
        why: "alpha left".into(),
        at: T0 - 1000,
    }) else {
        panic!()
    };
    assert_eq!(acc.reassignments[0].from, Some(p("alpha")), "`from` is read by the engine");
    let keys = AttributionKeys { account: Some("acme.com".into()), ..Default::default() };
    let ConversionOutcome::Created(rec) = outcome(s.submit(sale("t1", 10_000, keys))) else { panic!() };
    let a = rec.attribution.unwrap();
    assert_eq!((a.partner_id.as_str(), a.rule), ("beta", RuleKind::Deal));
    for part in ["reassigned to partner beta", "by pm@m.example", "(alpha left)", "from partner alpha"] {
        assert!(a.reason.contains(part), "{part:?} in {}", a.reason);
    }
}

#[test]
fn unique_clicks_follow_bots_and_the_window() {
    let mut s = program();
    let click = |at: i64, bot: bool, visitor: u8| click_at(at, visitor, bot).0;
    let cases = [
        ("a first click", click(T0, false, 1), true),
        ("the same visitor within the window", click(T0 + DAY - 1, false, 1), false),
        ("the same visitor after the window", click(T0 + DAY, false, 1), true),
        ("a bot", click(T0, true, 2), false),
        ("a human after the bot", click(T0 + 1, false, 2), true),
    ];
    for (what, command, want) in cases {
        let Answer::Click(c) = s.submit(command) else { panic!() };
        assert_eq!(c.unique, want, "{what}");
    }
}

#[test]
fn ledger_ids_increase_even_within_one_millisecond() {
    let mut s = program();
    for i in 0..20 {
        // Entropy that would mint smaller ids each time: the ledger head keeps them rising.
        let mut command = sale(&format!("t{i}"), 1000, explicit("alpha"));
        if let Command::Conversion(d) = &mut command {
            d.entropy = Entropy([255 - i as u8; 16]);
        }
        s.submit(command);
    }
    let ids: Vec<Ulid> = s.ledger_of(&m(), &p("alpha")).iter().map(|e| e.entry_id).collect();
    assert_eq!(ids.len(), 20);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let txns: Vec<String> = s.ledger_of(&m(), &p("alpha")).iter().map(|e| e.txn_id.to_string()).collect();
    assert_eq!(txns, (0..20).map(|i| format!("t{i}")).collect::<Vec<_>>(), "read back in append order");
}

/// `program()` with a POST webhook on alpha (every event).
fn program_with_webhook() -> Memory {
    use crate::domain::outbound::{Outbound, OutboundMethod};
    let mut s = program();
    let mut alpha = s.catalog.partners[&p("alpha")].clone();
    alpha.outbound =
        Some(Outbound { url: "https://alpha.example/hook".into(), method: OutboundMethod::Post, on: None });
    let op = EntityOp::Partner { partner: alpha, secret: WebhookSecret::generate() };
    assert!(matches!(s.submit(entity(op)), Answer::Entity(Ok(Saved::Updated))));
    s
}

fn adjust(id: &str, txn: &str, kind: AdjustmentKind, amount: Option<&str>, at: i64) -> Command {
    let input = AdjustmentInput {
        adjustment_id: id.into(),
        txn_id: TxnId::parse(txn).unwrap(),
        kind,
        amount_text: amount.map(str::to_string),
    };
    Command::Adjust { merchant: m(), input: Box::new(input), at, entropy: Entropy([3; 16]) }
}

fn attempt(s: &mut Memory, id: Ulid, status: Option<u16>, at: i64) -> crate::domain::outbound::Delivery {
    use crate::domain::outbound::AttemptLog;
    let attempt = AttemptLog {
        at_ms: at,
        duration_ms: 0,
        status,
        error: status.is_none().then(|| "timeout after 10s".into()),
        response: String::new(),
        retry_after_ms: None,
    };
    let op = OutboxOp::Attempted { merchant: m(), id, attempt, window_ms: 72 * 3_600_000, entropy: Entropy([0; 16]) };
    match s.submit(Command::Outbox(Box::new(op))) {
        Answer::Outbox(OutboxAnswer::Delivery(d)) => *d,
        other => panic!("{other:?}"),
    }
}

fn due(s: &Memory) -> Vec<(i64, Ulid)> {
    s.outbox
        .iter()
        .filter_map(|e| match e {
            OutboxIndex::Due { at, id, .. } => Some((*at, *id)),
            _ => None,
        })
        .collect()
}

#[test]
fn deliveries_go_in_order_and_retry_on_the_schedule() {
    use crate::domain::outbound::{DeliveryState, OutboundEvent};
    let mut s = program_with_webhook();
    s.submit(sale("t1", 10_000, explicit("alpha")));
    s.submit(sale("t2", 10_000, explicit("beta")));
    let created = due(&s);
    assert_eq!(created.len(), 1, "alpha has a webhook, beta none");
    let (at, first) = created[0];
    assert_eq!(at, T0 + 1000, "due when the conversion was received");
    // A refund while `created` is unfinished waits behind it.
    s.submit(adjust("r1", "t1", AdjustmentKind::Refund, Some("25.00"), T0 + 2000));
    assert_eq!(due(&s), created, "the reversal waits");
    let reversed = s.deliveries.values().find(|d| d.trigger == OutboundEvent::Reversed).unwrap().clone();
    assert_eq!(reversed.commission, Some(usd(-500)), "the negative change: 20 % of 25.00");
    assert_eq!(reversed.due_ms, None);

    // Failures: 5 s, then 5 min after the 2nd (no jitter with zero entropy).
    let cases = [(Some(500), T0 + 10_000, T0 + 15_000), (None, T0 + 15_000, T0 + 315_000)];
    for (status, at, next) in cases {
        let d = attempt(&mut s, first, status, at);
        assert_eq!((d.state, d.due_ms), (DeliveryState::Pending, Some(next)), "{status:?}");
    }
    // Delivered: the reversal is due at once, at the time the attempt ended.
    let d = attempt(&mut s, first, Some(204), T0 + 315_000);
    assert_eq!(d.state, DeliveryState::Delivered);
    assert_eq!(due(&s), vec![(T0 + 315_000, reversed.id)]);

    // A 410 parks it and disables the endpoint; enable resumes it in a new round.
    let d = attempt(&mut s, reversed.id, Some(410), T0 + 320_000);
    assert_eq!(d.state, DeliveryState::Parked);
    assert!(s.endpoints.contains_key(&p("alpha")));
    let retry = OutboxOp::Retry { merchant: m(), id: reversed.id, at: T0 + 321_000 };
    assert!(matches!(
        s.submit(Command::Outbox(Box::new(retry))),
        Answer::Outbox(OutboxAnswer::Refused(Refusal { code: "endpoint_disabled", .. }))
    ));
    let enable = OutboxOp::Enable { merchant: m(), partner: p("alpha"), at: T0 + 400_000, limit: 10 };
    assert!(matches!(s.submit(Command::Outbox(Box::new(enable))), Answer::Outbox(OutboxAnswer::Resumed(1))));
    assert!(s.endpoints.is_empty());
    let d = &s.deliveries[&(m(), reversed.id)];
    assert_eq!((d.state, d.due_ms, d.failed, d.round_start_ms), (DeliveryState::Pending, Some(T0 + 400_000), 0, None));
}

#[test]
fn a_delivery_is_dead_after_the_window_and_retry_starts_a_new_round() {
    use crate::domain::outbound::DeliveryState;
    let mut s = program_with_webhook();
    s.submit(sale("t1", 10_000, explicit("alpha")));
    let (_, id) = due(&s)[0];
    let mut at = T0 + 2000;
    let mut attempts = 0;
    loop {
        let d = attempt(&mut s, id, Some(503), at);
        attempts += 1;
        match d.due_ms {
            Some(next) => at = next,
            None => {
                assert_eq!(d.state, DeliveryState::Dead);
                break;
            }
        }
    }
    assert_eq!(attempts, 10, "SPEC 10: 8 scheduled retries and a last one at the window's end");
    assert_eq!(at - (T0 + 2000), 72 * 3_600_000, "the last attempt at the end of the 72 h window");
    let retry = OutboxOp::Retry { merchant: m(), id, at: at + 1 };
    match s.submit(Command::Outbox(Box::new(retry))) {
        Answer::Outbox(OutboxAnswer::Delivery(d)) => {
            assert_eq!((d.state, d.due_ms, d.failed), (DeliveryState::Pending, Some(at + 1), 0));
            assert_eq!(d.attempt_count, 10, "the attempts are kept");
        }
        other => panic!("{other:?}"),
    }
}

/// A click of alpha's link `l` by `visitor` at `at`.
fn click_at(at: i64, visitor: u8, bot: bool) -> (Command, Ulid) {
    let click = ClickRecord {
        click_id: Ulid::from_parts(at, [visitor ^ (at as u8); 10]),
        link_id: LinkId::parse("l").unwrap(),
        partner_id: p("alpha"),
        merchant_id: m(),
        at_ms: at,
        subs: Default::default(),
        ip: "203.0.113.0/24".into(),
        user_agent: "UA".into(),
        bot,
        unique: false,
        visitor: [visitor; 16],
    };
    let id = click.click_id;
    (Command::Click { click: Box::new(click), unique_window_ms: DAY, once: false }, id)
}

fn by_click(id: Ulid) -> AttributionKeys {
    AttributionKeys { click_id: Some(id.to_string()), ..Default::default() }
}

fn signals_of(o: &ConversionOutcome) -> Vec<&'static str> {
    let ConversionOutcome::Created(rec) = o else { panic!("not created: {o:?}") };
    rec.review.as_ref().map(|r| r.signals.iter().map(|s| s.signal.as_str()).collect()).unwrap_or_default()
}

/// Each scripted pattern raises exactly its signals; a clean conversion raises none.
#[test]
fn fraud_signals_follow_the_facts() {
    let mut s = program();
    // A click 2 s before the conversion.
    let (c, id) = click_at(T0 - 2000, 1, false);
    s.submit(c);
    assert_eq!(signals_of(&outcome(s.submit(sale("inject", 1000, by_click(id))))), ["click_injection"]);
    // A bot's click, an hour before.
    let (c, id) = click_at(T0 - 3_600_000, 2, true);
    s.submit(c);
    assert_eq!(signals_of(&outcome(s.submit(sale("bot", 1000, by_click(id))))), ["bot_click"]);
    // 50 clicks of one visitor, then a conversion.
    let mut last = Ulid::from_parts(0, [0; 10]);
    for i in 0..50 {
        let (c, id) = click_at(T0 - 7_200_000 + i * 60_000, 3, false);
        s.submit(c);
        last = id;
    }
    assert_eq!(signals_of(&outcome(s.submit(sale("flood", 1000, by_click(last))))), ["click_flooding"]);
    // A clean one: a new visitor, an hour before.
    let (c, id) = click_at(T0 - 3_600_000, 4, false);
    s.submit(c);
    assert_eq!(signals_of(&outcome(s.submit(sale("clean", 1000, by_click(id))))), Vec::<&str>::new());
}

fn review_command(txn: &str, approve: bool, at: i64) -> Command {
    Command::Review {
        merchant: m(),
        txn: TxnId::parse(txn).unwrap(),
        approve,
        by: "risk".into(),
        note: None,
        at,
        entropy: Entropy([5; 16]),
    }
}

fn review_answer(a: Answer) -> &'static str {
    match a {
        Answer::Review(ReviewOutcome::Settled(_)) => "settled",
        Answer::Review(ReviewOutcome::Replay(_)) => "replay",
        Answer::Review(ReviewOutcome::NotFound) => "not found",
        Answer::Review(ReviewOutcome::Refused(r)) => r.code,
        other => panic!("not a review answer: {other:?}"),
    }
}

/// A flagged conversion has no hold; only an admin settles it, once; the sweep skips it.
#[test]
fn a_review_replaces_the_hold_and_is_settled_once() {
    let mut s = program();
    let (c, id) = click_at(T0 - 1000, 1, false);
    s.submit(c);
    s.submit(sale("flagged", 10_000, by_click(id)));
    s.submit(sale("clean", 10_000, explicit("alpha")));
    let flagged = &s.conversions[&(m(), TxnId::parse("flagged").unwrap())];
    assert!(flagged.approve_at_ms.is_none() && flagged.review.is_some());
    assert!(s.holds.iter().all(|h| h.txn.as_str() == "clean"), "only the clean one has a hold");
    assert_eq!(s.reviews.len(), 1);
    let Answer::Swept(n) = s.submit(Command::SweepHolds { now: T0 + 40 * DAY, limit: 100, entropy: Entropy([1; 16]) })
    else {
        panic!()
    };
    assert_eq!(n, 1, "the sweep approves the clean one only");
    let cases = [
        ("an unknown conversion", review_command("nope", true, T0), "not found"),
        ("a conversion without signals", review_command("clean", true, T0), "no_review"),
        ("approve", review_command("flagged", true, T0 + DAY), "settled"),
        ("approve again", review_command("flagged", true, T0 + 2 * DAY), "replay"),
        ("reject after approve", review_command("flagged", false, T0 + 2 * DAY), "review_settled"),
    ];
    for (what, command, want) in cases {
        assert_eq!(review_answer(s.submit(command)), want, "{what}");
    }
    let rec = &s.conversions[&(m(), TxnId::parse("flagged").unwrap())];
    assert_eq!(rec.status, ConversionStatus::Approved);
    assert_eq!(rec.review.as_ref().unwrap().settled_ms, Some(T0 + DAY));
    assert!(s.reviews.is_empty(), "settled reviews leave the open list");
    assert_eq!(s.balances[&(m(), p("alpha"), Currency::parse("USD").unwrap())].approved, 4_000);
}

/// What the plan's `self_reported` pays, and that the rule binds no customer.
#[test]
fn self_reported_pays_what_the_plan_says_and_binds_nobody() {
    let pays = |pay: &str| {
        let mut s = program();
        let body: PlanBody = serde_json::from_str(&format!(
            r#"{{"currency":"USD","influence_percent":"5","self_reported":"{pay}","rules":[{{"event":"sale","percent":"20"}}]}}"#
        ))
        .unwrap();
        let plan = body.into_plan(m(), PlanId::parse("p").unwrap(), T0 - 1).unwrap();
        s.submit(entity(EntityOp::Plan(plan)));
        let keys = AttributionKeys {
            self_reported: Some("ALPHA".into()),
            customer_id: Some("cus-1".into()),
            ..Default::default()
        };
        let ConversionOutcome::Created(rec) = outcome(s.submit(sale("sr", 10_000, keys))) else { panic!() };
        assert_eq!(rec.attribution.as_ref().unwrap().rule, RuleKind::SelfReported);
        assert!(s.customers.is_empty(), "no lifetime binding from a self-reported answer");
        rec.commission.map(|c| c.amount.minor)
    };
    assert_eq!(pays("full"), Some(2_000));
    assert_eq!(pays("influence"), Some(500));
    assert_eq!(pays("none"), None);
}

/// Effects are moved around by the dozen per command: a large variant would make every
/// one of them large. Big records are boxed.
#[test]
fn effects_stay_small() {
    // 104: `Customer` (two strings and a binding), as before the fraud records came.
    assert!(std::mem::size_of::<Effect>() <= 104, "Effect is {} bytes", std::mem::size_of::<Effect>());
}
