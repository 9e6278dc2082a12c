//! Clicks and conversions: the unique-click flag, the exact dedupe decision, attribution,
//! plan selection and crediting (commission, influence fees, tiers and caps, customer
//! binding, the deal's `converted` mark and the hold).

use super::tx::Tx;
use super::{Catalog, Effect, Entropy, Hold, State};
use crate::attribution::{self, ClickFacts, Decision, Facts};
use crate::commission::{self, History};
use crate::domain::account::{AccountRecord, CustomerBinding};
use crate::domain::click::ClickRecord;
use crate::domain::clock::{month_of, UnixMillis};
use crate::domain::conversion::{Commission, ConversionInput, ConversionRecord, ConversionStatus, Credit, RuleKind};
use crate::domain::entities::Partner;
use crate::domain::fraud::{self, FraudRules, Review, ReviewStatus};
use crate::domain::ids::{MerchantId, PartnerId, Ulid};
use crate::domain::ledger::{LedgerEntry, LedgerKind};
use crate::domain::link::{Link, DEFAULT_WINDOW_DAYS};
use crate::domain::money::Money;
use crate::domain::outbound::OutboundEvent;
use crate::domain::plan::{Plan, SelfReportedPay};
use crate::domain::rollup;

pub(super) const DAY_MS: i64 = 86_400_000;

/// A conversion as received, with its receipt time and the entropy its ids come from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConversionDraft {
    pub merchant: MerchantId,
    pub input: ConversionInput,
    pub received_ms: UnixMillis,
    pub entropy: Entropy,
}

/// What became of a conversion.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ConversionOutcome {
    Created(ConversionRecord),
    /// Stored before with the same content.
    Duplicate(ConversionRecord),
    /// Stored before with other content.
    Conflict(ConversionRecord),
}

/// A click is unique unless it is a bot's or its visitor clicked the link within the window.
/// Every click counts toward its visitor's and its partner's recent clicks (fraud signals).
pub(super) fn click<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    mut click: ClickRecord,
    unique_window_ms: i64,
    once: bool,
) -> Result<std::sync::Arc<ClickRecord>, S::Error> {
    if once {
        if let Some(stored) = tx.click(&click.click_id)? {
            return Ok(std::sync::Arc::new(stored));
        }
    }
    let mut visitor = tx.visitor(&click.link_id, &click.visitor)?;
    click.unique = !click.bot && visitor.last_unique_ms.is_none_or(|t| click.at_ms - t >= unique_window_ms);
    if click.unique {
        visitor.last_unique_ms = Some(click.at_ms);
    }
    visitor.click(click.at_ms);
    tx.put_visitor(click.link_id.clone(), click.visitor, visitor);
    let mut pace = tx.pace(&click.merchant_id, &click.partner_id)?;
    pace.count(click.at_ms, false);
    tx.put_pace(&click.merchant_id, &click.partner_id, pace);
    tx.push(Effect::Rollup(Box::new(rollup::of_click(&click))));
    let click = std::sync::Arc::new(click);
    tx.push(Effect::Click(std::sync::Arc::clone(&click)));
    Ok(click)
}

/// Dedupes by `(merchant, txn_id)`, then attributes and credits a new conversion.
pub(super) fn conversion<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    d: ConversionDraft,
) -> Result<ConversionOutcome, S::Error> {
    if let Some(rec) = tx.conversion(&d.merchant, &d.input.txn_id)? {
        return Ok(if rec.same_content(&d.input) {
            ConversionOutcome::Duplicate(rec)
        } else {
            ConversionOutcome::Conflict(rec)
        });
    }
    let catalog = tx.catalog();
    let decision = attribution::decide(&d.input.keys, d.input.occurred_ms, &TxFacts { tx, merchant: &d.merchant })?;
    let mut rec = ConversionRecord {
        conversion_id: tx.conversion_id(d.received_ms, &d.entropy),
        merchant_id: d.merchant.clone(),
        txn_id: d.input.txn_id,
        event: d.input.event,
        amount: d.input.amount,
        occurred_ms: d.input.occurred_ms,
        received_ms: d.received_ms,
        keys: d.input.keys,
        metadata: d.input.metadata,
        status: ConversionStatus::Pending,
        attribution: None,
        unattributed_reason: None,
        commission: None,
        commission_note: None,
        refunded_minor: 0,
        approve_at_ms: None,
        history: Vec::new(),
        last_delivery: None,
        review: None,
    };
    match decision {
        Decision::Unattributed { reason } => rec.unattributed_reason = Some(reason),
        Decision::Attributed { attribution, partner, click } => {
            let link = click.as_ref().and_then(|c| catalog.links.get(&c.link_id));
            let plan = plan_for(catalog, &d.merchant, link, &partner, rec.occurred_ms);
            rec.attribution = Some(attribution);
            let rules = plan.as_ref().map_or_else(|_| FraudRules::default(), |p| p.fraud);
            rec.review = review(tx, &rec, &partner, click.as_ref(), &rules)?;
            credit(tx, &mut rec, &partner, plan, d.received_ms, &d.entropy)?;
            // A held postback is sent when an admin approves the review.
            if !rec.review.as_ref().is_some_and(|r| r.postbacks_held) {
                let commission = rec.commission.as_ref().map(|c| c.amount);
                super::outbox::notify(tx, &mut rec, OutboundEvent::Created, commission, d.received_ms, &d.entropy)?;
            }
        }
    }
    for increment in rollup::of_conversion(&rec) {
        tx.push(Effect::Rollup(Box::new(increment)));
    }
    for partner in rec.credited_partners() {
        tx.push(Effect::PartnerConversion {
            partner: partner.clone(),
            conversion_id: rec.conversion_id,
            merchant: rec.merchant_id.clone(),
            txn: rec.txn_id.clone(),
        });
    }
    tx.put_conversion(rec.clone());
    Ok(ConversionOutcome::Created(rec))
}

/// Counts the conversion toward its partner's pace and (after a click) its visitor's
/// recent conversions, then judges the fraud signals: the review it opens, if any.
fn review<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    rec: &ConversionRecord,
    partner: &Partner,
    click: Option<&ClickFacts>,
    rules: &FraudRules,
) -> Result<Option<Review>, S::Error> {
    let merchant = &rec.merchant_id;
    let mut pace = tx.pace(merchant, &partner.id)?;
    pace.count(rec.received_ms, true);
    tx.put_pace(merchant, &partner.id, pace);
    let side = match click {
        Some(c) => {
            let clicks = tx.visitor(&c.link_id, &c.visitor)?.clicks_within_day(rec.occurred_ms);
            let mut recent = tx.recent(merchant, &partner.id, &c.visitor)?;
            let conversions = recent.add(rec.occurred_ms);
            tx.put_recent(merchant, &partner.id, c.visitor, recent);
            Some(fraud::ClickSide {
                at_ms: c.at_ms,
                bot: c.bot,
                visitor_clicks_day: clicks,
                visitor_conversions_day: conversions,
            })
        }
        None => None,
    };
    let facts = fraud::Facts {
        occurred_ms: rec.occurred_ms,
        link: click.map_or("", |c| c.link_id.as_str()),
        partner: partner.id.as_str(),
        click: side,
        partner_day: pace.day(rec.received_ms),
        own: partner.owns(rec.keys.customer_id.as_deref(), rec.keys.account.as_deref()),
    };
    let signals = fraud::judge(rules, &facts);
    if signals.is_empty() {
        return Ok(None);
    }
    tx.push(Effect::Review {
        merchant: merchant.clone(),
        conversion_id: rec.conversion_id,
        txn: rec.txn_id.clone(),
        open: true,
    });
    Ok(Some(Review {
        status: ReviewStatus::Open,
        signals,
        postbacks_held: rules.hold_postbacks,
        settled_by: None,
        settled_ms: None,
        note: None,
    }))
}

/// The plan that pays a credited partner: the link's, else the partner's, else the
/// merchant's default; the version in force when the conversion occurred.
fn plan_for<'c>(
    catalog: &'c Catalog,
    merchant: &MerchantId,
    link: Option<&Link>,
    partner: &Partner,
    at: UnixMillis,
) -> Result<&'c Plan, String> {
    let id = link
        .and_then(|l| l.plan_id.as_ref())
        .or(partner.plan_id.as_ref())
        .or_else(|| catalog.merchants.get(merchant).and_then(|m| m.default_plan_id.as_ref()))
        .ok_or_else(|| {
            "no commission plan applies: set plan_id on the link or the partner, or default_plan_id on the merchant"
                .to_string()
        })?;
    catalog.plan_at(merchant, id, at).ok_or_else(|| format!("plan {id} does not exist"))
}

/// A ledger note from its parts, in one allocation of its final size (`format!` grows its
/// string as it goes: 1.8k instructions per conversion for the commission's note).
fn concat(parts: &[&str]) -> String {
    let mut note = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    parts.iter().for_each(|p| note.push_str(p));
    note
}

/// Appends one ledger entry for `partner` on this conversion, with why.
#[allow(clippy::too_many_arguments)] // the entry's fields, its note and its id's entropy
pub(super) fn append<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    rec: &ConversionRecord,
    partner: &PartnerId,
    kind: LedgerKind,
    amount: Money,
    at: UnixMillis,
    note: String,
    entropy: &Entropy,
) -> Result<Ulid, S::Error> {
    let entry = LedgerEntry {
        entry_id: Ulid([0; 16]),
        merchant_id: rec.merchant_id.clone(),
        partner_id: partner.clone(),
        kind,
        txn_id: rec.txn_id.clone(),
        conversion_id: rec.conversion_id,
        amount,
        at_ms: at,
        note: Some(note),
    };
    tx.append_ledger(entry, entropy)
}

/// Credits a newly attributed conversion: the sourced partner's commission under `plan`
/// (tiers, caps, recurring limits from the partner's and customer's history), influence
/// fees, ledger entries, the customer's lifetime binding, the deal's `converted` mark and
/// the hold that approves it later.
fn credit<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    rec: &mut ConversionRecord,
    partner: &Partner,
    plan: Result<&Plan, String>,
    now: UnixMillis,
    entropy: &Entropy,
) -> Result<(), S::Error> {
    let merchant = rec.merchant_id.clone();
    let Some(attribution) = rec.attribution.clone() else { return Ok(()) };
    let month = month_of(rec.occurred_ms);
    let mut stats = tx.partner_month(&merchant, &partner.id, month)?;
    let binding: Option<CustomerBinding> = match &rec.keys.customer_id {
        Some(c) => tx.customer(&merchant, c)?,
        None => None,
    };
    let account: Option<AccountRecord> = match &rec.keys.account {
        Some(a) => tx.account(&merchant, a)?,
        None => None,
    };

    let plan = match plan {
        Ok(p) => Some(p),
        Err(note) => {
            rec.commission_note = Some(note);
            None
        }
    };
    if let Some(plan) = plan {
        let history = History {
            approved_sales_this_month: stats.approved_sales,
            commission_this_month: stats.commission_minor,
            customer_first_sale_ms: binding.as_ref().map(|b| b.first_sale_ms),
            occurred_ms: rec.occurred_ms,
        };
        match commission::quote(plan, &rec.event, rec.amount, partner.kind, &history) {
            Ok(q) => {
                rec.commission_note = q.note;
                rec.commission = Some(q.commission);
            }
            Err(note) => rec.commission_note = Some(note),
        }
        if attribution.rule == RuleKind::SelfReported {
            self_reported_pay(rec, plan);
        }
        // A manual plan sets no hold: only the merchant's `approve` approves.
        rec.approve_at_ms = (!plan.manual_approval).then(|| now + i64::from(plan.hold_days) * DAY_MS);
    } else {
        rec.approve_at_ms = Some(now);
    }
    if rec.review.is_some() {
        // In fraud review: only an admin's decision approves it.
        rec.approve_at_ms = None;
    }

    let mut influencers = Vec::new();
    if let Some(acc) = &account {
        let window = plan.map_or(crate::domain::plan::DEFAULT_INFLUENCE_WINDOW_DAYS, |p| p.influence_window_days);
        for mut i in attribution::influence(acc, &attribution.partner_id, rec.occurred_ms, window) {
            i.commission = plan.and_then(|pl| commission::influence_fee(pl, rec.amount));
            debug_assert_eq!(i.credit, Credit::Influenced);
            influencers.push(i);
        }
    }

    if let Some(c) = rec.commission.as_ref().filter(|c| c.amount.minor != 0) {
        let (amount, note) =
            (c.amount, concat(&[c.rule.as_str(), " on ", rec.txn_id.as_str(), " (plan ", c.plan.as_str(), ")"]));
        append(tx, rec, &attribution.partner_id, LedgerKind::Commission, amount, now, note, entropy)?;
        tx.update_balance(&merchant, &attribution.partner_id, amount.currency, |b| b.pending += amount.minor)?;
        stats.commission_minor += amount.minor;
    }
    for i in &influencers {
        if let Some(fee) = i.commission {
            let note =
                concat(&["influence fee on ", rec.txn_id.as_str(), " (", i.rule.as_str(), " ", i.credit.as_str(), ")"]);
            append(tx, rec, &i.partner_id, LedgerKind::InfluenceFee, fee, now, note, entropy)?;
            tx.update_balance(&merchant, &i.partner_id, fee.currency, |b| b.pending += fee.minor)?;
        }
    }
    if let Some(a) = rec.attribution.as_mut() {
        a.influencers = influencers;
    }
    tx.put_partner_month(&merchant, &partner.id, month, stats);

    // The customer's own answer is too weak to bind the customer to a partner for life.
    let binds = attribution.rule != RuleKind::SelfReported;
    if let (Some(c), None, true) = (&rec.keys.customer_id, &binding, binds) {
        let b = CustomerBinding {
            partner_id: attribution.partner_id.clone(),
            first_sale_ms: rec.occurred_ms,
            txn_id: rec.txn_id.clone(),
        };
        tx.put_customer(&merchant, c, b);
    }
    if let (RuleKind::Deal, Some(mut acc)) = (attribution.rule, account) {
        if let Some(claim) = acc.claim.as_mut() {
            claim.converted = true;
        }
        tx.put_account(&merchant, acc);
    }
    if let Some(at) = rec.approve_at_ms {
        tx.push(Effect::HoldSet(Hold { at, merchant, txn: rec.txn_id.clone() }));
    }
    Ok(())
}

/// What the plan pays a conversion credited by the customer's own answer: the full
/// commission, the influence fee, or nothing (docs/attribution.md).
fn self_reported_pay(rec: &mut ConversionRecord, plan: &Plan) {
    match plan.self_reported {
        SelfReportedPay::Full => {}
        SelfReportedPay::Influence => {
            let fee = commission::influence_fee(plan, rec.amount);
            rec.commission = fee.map(|amount| Commission {
                amount,
                plan: plan.id.clone(),
                rule: format!("self-reported: influence fee {}%", plan.influence_percent.text()),
            });
            rec.commission_note = fee.is_none().then(|| {
                format!(
                    "self-reported attribution earns the influence fee ({}%), which is nothing here",
                    plan.influence_percent.text()
                )
            });
        }
        SelfReportedPay::None => {
            rec.commission = None;
            rec.commission_note =
                Some(format!("plan {} pays nothing for self-reported attribution (self_reported = none)", plan.id));
        }
    }
}

/// Attribution's view of the state within one command, limited to one merchant.
struct TxFacts<'t, 's, S: State + ?Sized> {
    tx: &'t Tx<'s, S>,
    merchant: &'t MerchantId,
}

impl<S: State + ?Sized> Facts for TxFacts<'_, '_, S> {
    type Error = S::Error;

    fn partner(&self, id: &PartnerId) -> Result<Option<Partner>, S::Error> {
        Ok(self.tx.catalog().partner_of(self.merchant, id).cloned())
    }

    fn click(&self, id: &Ulid) -> Result<Option<ClickFacts>, S::Error> {
        let Some(click) = self.tx.click(id)? else { return Ok(None) };
        if click.merchant_id != *self.merchant {
            return Ok(None);
        }
        let link = self.tx.catalog().links.get(&click.link_id);
        Ok(Some(ClickFacts {
            click_id: click.click_id,
            window_days: link.map_or(DEFAULT_WINDOW_DAYS, |l| l.window_days),
            min_ctit_seconds: link.map_or(0, |l| l.min_ctit_seconds),
            link_id: click.link_id,
            partner_id: click.partner_id,
            at_ms: click.at_ms,
            bot: click.bot,
            visitor: click.visitor,
        }))
    }

    fn coupon_owner(&self, coupon: &str) -> Result<Option<Partner>, S::Error> {
        Ok(self.tx.catalog().coupon_owner(self.merchant, coupon).cloned())
    }

    fn account(&self, account: &str) -> Result<Option<AccountRecord>, S::Error> {
        self.tx.account(self.merchant, account)
    }

    fn customer(&self, customer_id: &str) -> Result<Option<CustomerBinding>, S::Error> {
        self.tx.customer(self.merchant, customer_id)
    }

    fn named_partner(&self, text: &str) -> Result<Option<Partner>, S::Error> {
        let catalog = self.tx.catalog();
        let mine = || catalog.partners.values().filter(|p| p.merchant_id == *self.merchant);
        let by_id = mine().filter(|p| p.id.as_str().eq_ignore_ascii_case(text)).min_by(|a, b| a.id.cmp(&b.id));
        let by_coupon =
            || mine().filter(|p| p.coupons.iter().any(|c| c.eq_ignore_ascii_case(text))).min_by(|a, b| a.id.cmp(&b.id));
        Ok(by_id.or_else(by_coupon).cloned())
    }
}
