//! The money side of the writer: crediting a new conversion (commission, influence fees,
//! tiers and caps, customer binding, hold), adjustments (refund, chargeback, approve,
//! reject), the hold sweep, deal registrations, touches and reassignments. Every function
//! stages its writes in the writer's current batch, so each is atomic with the rest of it.

use serde::{Deserialize, Serialize};

use super::schema::Cf;
use super::writer::Pending;
use super::{keys, StoreError};
use crate::attribution;
use crate::commission::{self, History};
use crate::domain::account::{AccountRecord, Claim, CustomerBinding, PartnerMonth, Reassignment, Touch, TouchKind};
use crate::domain::clock::{format_rfc3339, month_of, UnixMillis};
use crate::domain::conversion::{
    AdjustmentInput, AdjustmentKind, AdjustmentRecord, ConversionRecord, ConversionStatus, Influencer, RuleKind,
    StatusChange,
};
use crate::domain::entities::Partner;
use crate::domain::ids::{MerchantId, PartnerId, Ulid};
use crate::domain::ledger::{LedgerEntry, LedgerKind};
use crate::domain::money::Money;
use crate::domain::plan::Plan;

const DAY_MS: i64 = 86_400_000;

fn append(
    pending: &mut Pending<'_>,
    rec: &ConversionRecord,
    partner: &PartnerId,
    kind: LedgerKind,
    amount: Money,
    at: UnixMillis,
) -> Result<Ulid, StoreError> {
    let entry = LedgerEntry {
        entry_id: pending.shared.next_entry_id(at),
        merchant_id: rec.merchant_id.clone(),
        partner_id: partner.clone(),
        kind,
        txn_id: rec.txn_id.clone(),
        conversion_id: rec.conversion_id,
        amount,
        at_ms: at,
    };
    pending.write(Cf::Ledger, keys::ledger(&rec.merchant_id, partner, &entry.entry_id), &entry)?;
    pending.ledger.push(kind);
    Ok(entry.entry_id)
}

fn partner_month(
    pending: &Pending<'_>,
    merchant: &MerchantId,
    partner: &PartnerId,
    month: u32,
) -> Result<PartnerMonth, StoreError> {
    Ok(pending.read(Cf::PartnerMonths, &keys::partner_month(merchant, partner, month))?.unwrap_or_default())
}

/// Credits a newly attributed conversion: the sourced partner's commission under `plan`
/// (tiers, caps, recurring limits from the partner's and customer's history), influence
/// fees, ledger entries, the customer's lifetime binding, the deal's `converted` mark and
/// the hold that approves it later.
pub(super) fn credit(
    pending: &mut Pending<'_>,
    rec: &mut ConversionRecord,
    partner: &Partner,
    plan: Result<&Plan, String>,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let merchant = rec.merchant_id.clone();
    let Some(attribution) = rec.attribution.clone() else { return Ok(()) };
    let month = month_of(rec.occurred_ms);
    let mut stats = partner_month(pending, &merchant, &partner.id, month)?;
    let binding: Option<CustomerBinding> = match &rec.keys.customer_id {
        Some(c) => pending.read(Cf::Customers, &keys::customer(&merchant, c))?,
        None => None,
    };
    let account: Option<AccountRecord> = match &rec.keys.account {
        Some(a) => pending.read(Cf::Accounts, &keys::account(&merchant, a))?,
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
        rec.approve_at_ms = Some(now + i64::from(plan.hold_days) * DAY_MS);
    } else {
        rec.approve_at_ms = Some(now);
    }

    let mut influencers = Vec::new();
    if let Some(acc) = &account {
        let window = plan.map_or(crate::domain::plan::DEFAULT_INFLUENCE_WINDOW_DAYS, |p| p.influence_window_days);
        for p in attribution::influencers(acc, &attribution.partner_id, rec.occurred_ms, window) {
            let by_deal = acc.claim.as_ref().is_some_and(|c| c.partner_id == p)
                || acc.touches.iter().any(|t| t.partner_id == p && t.kind == TouchKind::Deal);
            let fee = plan.and_then(|pl| commission::influence_fee(pl, rec.amount));
            influencers.push(Influencer {
                partner_id: p,
                rule: if by_deal { RuleKind::Deal } else { RuleKind::Touch },
                commission: fee,
            });
        }
    }

    if let Some(c) = rec.commission.clone().filter(|c| c.amount.minor != 0) {
        append(pending, rec, &attribution.partner_id, LedgerKind::Commission, c.amount, now)?;
        stats.commission_minor += c.amount.minor;
    }
    for i in &influencers {
        if let Some(fee) = i.commission {
            append(pending, rec, &i.partner_id, LedgerKind::InfluenceFee, fee, now)?;
        }
    }
    if let Some(a) = rec.attribution.as_mut() {
        a.influencers = influencers;
    }
    pending.write(Cf::PartnerMonths, keys::partner_month(&merchant, &partner.id, month), &stats)?;

    if let (Some(c), None) = (&rec.keys.customer_id, &binding) {
        let b = CustomerBinding {
            partner_id: attribution.partner_id.clone(),
            first_sale_ms: rec.occurred_ms,
            txn_id: rec.txn_id.clone(),
        };
        pending.write(Cf::Customers, keys::customer(&merchant, c), &b)?;
    }
    if let (RuleKind::Deal, Some(mut acc)) = (attribution.rule, account) {
        if let Some(claim) = acc.claim.as_mut() {
            claim.converted = true;
        }
        pending.write(Cf::Accounts, keys::account(&merchant, &acc.account.clone()), &acc)?;
    }
    if let Some(at) = rec.approve_at_ms {
        pending.put(Cf::Holds, keys::hold(at, &merchant, &rec.txn_id), Vec::new())?;
    }
    Ok(())
}

/// What became of an adjustment.
#[derive(Debug, Clone)]
pub enum AdjustOutcome {
    Applied(AdjustmentRecord, ConversionRecord),
    Replay(AdjustmentRecord, ConversionRecord),
    Refused {
        status: u16,
        code: &'static str,
        field: Option<&'static str>,
        detail: String,
        current: Option<ConversionStatus>,
    },
}

fn refuse(
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
    detail: String,
    current: Option<ConversionStatus>,
) -> AdjustOutcome {
    AdjustOutcome::Refused { status, code, field, detail, current }
}

fn move_status(rec: &mut ConversionRecord, to: ConversionStatus, at: UnixMillis, cause: String) {
    rec.history.push(StatusChange { from: rec.status, to, at_ms: at, cause });
    rec.status = to;
}

/// Counts an approved sale for the partner's tiers.
fn count_approval(pending: &mut Pending<'_>, rec: &ConversionRecord) -> Result<(), StoreError> {
    let Some(a) = &rec.attribution else { return Ok(()) };
    if rec.event != "sale" {
        return Ok(());
    }
    let month = month_of(rec.occurred_ms);
    let mut stats = partner_month(pending, &rec.merchant_id, &a.partner_id, month)?;
    stats.approved_sales += 1;
    pending.write(Cf::PartnerMonths, keys::partner_month(&rec.merchant_id, &a.partner_id, month), &stats)
}

/// The reversal entries that bring every credited partner's net for this conversion to
/// `share(commission)`: proportional to what is refunded, computed on the cumulative
/// refund so rounding never drifts and a full refund reverses exactly everything.
fn reverse_to(
    pending: &mut Pending<'_>,
    rec: &ConversionRecord,
    kind: LedgerKind,
    refunded_before: i64,
    refunded_after: i64,
    full: bool,
    at: UnixMillis,
) -> Result<Vec<Ulid>, StoreError> {
    let total = rec.amount.map_or(0, |a| a.minor);
    let Some(a) = &rec.attribution else { return Ok(Vec::new()) };
    let mut credited: Vec<(PartnerId, Money)> = Vec::new();
    if let Some(c) = rec.commission.as_ref().filter(|c| c.amount.minor != 0) {
        credited.push((a.partner_id.clone(), c.amount));
    }
    for i in &a.influencers {
        if let Some(fee) = i.commission {
            credited.push((i.partner_id.clone(), fee));
        }
    }
    let mut ids = Vec::new();
    for (partner, amount) in credited {
        // `before` is always the proportional share: `full` only decides the last step, so a
        // rejection after a partial refund takes back exactly what is left.
        let before =
            if refunded_before == 0 { 0 } else { commission::proportional(amount.minor, refunded_before, total) };
        let after = if full { amount.minor } else { commission::proportional(amount.minor, refunded_after, total) };
        let delta = after - before;
        if delta != 0 {
            ids.push(append(pending, rec, &partner, kind, Money { minor: -delta, currency: amount.currency }, at)?);
        }
    }
    Ok(ids)
}

/// Applies an adjustment, idempotent by `adjustment_id`.
pub(super) fn adjust(
    pending: &mut Pending<'_>,
    merchant: &MerchantId,
    input: AdjustmentInput,
    now: UnixMillis,
) -> Result<AdjustOutcome, StoreError> {
    let akey = keys::adjustment(merchant, &input.adjustment_id);
    let ckey = keys::conversion(merchant, &input.txn_id);
    if let Some(stored) = pending.read::<AdjustmentRecord>(Cf::Adjustments, &akey)? {
        let rec: Option<ConversionRecord> =
            pending.read(Cf::Conversions, &keys::conversion(merchant, &stored.input.txn_id))?;
        return Ok(match rec {
            Some(rec) if stored.input == input => AdjustOutcome::Replay(stored, rec),
            _ => refuse(
                409,
                "adjustment_conflict",
                Some("adjustment_id"),
                format!("adjustment {} was already used for another adjustment", input.adjustment_id),
                None,
            ),
        });
    }
    let Some(mut rec) = pending.read::<ConversionRecord>(Cf::Conversions, &ckey)? else {
        return Ok(refuse(
            422,
            "invalid_field",
            Some("txn_id"),
            format!("no conversion with txn_id {}", input.txn_id),
            None,
        ));
    };
    let current = rec.status;
    let illegal = |to: ConversionStatus| {
        refuse(
            409,
            "illegal_status_change",
            None,
            format!("the conversion is {}; it cannot become {}", current.as_str(), to.as_str()),
            Some(current),
        )
    };
    let cause = format!("{} {}", input.kind.as_str(), input.adjustment_id);
    let mut amount = None;
    let entries = match input.kind {
        AdjustmentKind::Approve => {
            if !current.can_move_to(ConversionStatus::Approved) {
                return Ok(illegal(ConversionStatus::Approved));
            }
            move_status(&mut rec, ConversionStatus::Approved, now, cause);
            count_approval(pending, &rec)?;
            Vec::new()
        }
        AdjustmentKind::Reject => {
            if !current.can_move_to(ConversionStatus::Rejected) {
                return Ok(illegal(ConversionStatus::Rejected));
            }
            let ids = reverse_to(
                pending,
                &rec,
                LedgerKind::Reversal,
                rec.refunded_minor,
                rec.amount.map_or(0, |a| a.minor),
                true,
                now,
            )?;
            move_status(&mut rec, ConversionStatus::Rejected, now, cause);
            ids
        }
        AdjustmentKind::Refund | AdjustmentKind::Chargeback => {
            let target = if current == ConversionStatus::Approved {
                ConversionStatus::Reversed
            } else {
                ConversionStatus::Rejected
            };
            if !matches!(current, ConversionStatus::Pending | ConversionStatus::Approved) {
                return Ok(illegal(target));
            }
            let Some(total) = rec.amount else {
                return Ok(refuse(
                    422,
                    "invalid_field",
                    Some("amount"),
                    "the conversion has no amount to refund; use reject".into(),
                    None,
                ));
            };
            let remaining = total.minor - rec.refunded_minor;
            let refund = match &input.amount_text {
                None => Money { minor: remaining, currency: total.currency },
                Some(text) => match Money::parse(text, total.currency) {
                    Ok(m) => m,
                    Err(e) => return Ok(refuse(422, "invalid_field", Some("amount"), format!("amount: {e}"), None)),
                },
            };
            if refund.minor == 0 || refund.minor > remaining {
                let left = Money { minor: remaining, currency: total.currency };
                return Ok(refuse(
                    422,
                    "invalid_field",
                    Some("amount"),
                    format!("must be more than 0 and at most the remaining {} {}", left.amount_text(), total.currency),
                    None,
                ));
            }
            let kind = if current == ConversionStatus::Approved { LedgerKind::Clawback } else { LedgerKind::Reversal };
            let after = rec.refunded_minor + refund.minor;
            let ids = reverse_to(pending, &rec, kind, rec.refunded_minor, after, after == total.minor, now)?;
            rec.refunded_minor = after;
            if after == total.minor {
                move_status(&mut rec, target, now, cause);
            }
            amount = Some(refund);
            ids
        }
    };
    let stored = AdjustmentRecord { input, amount, at_ms: now, status_after: rec.status, ledger_entries: entries };
    pending.write(Cf::Adjustments, akey, &stored)?;
    pending.write(Cf::Conversions, ckey, &rec)?;
    pending.sync = true;
    pending.ops += 1;
    Ok(AdjustOutcome::Applied(stored, rec))
}

/// The conversion a hold key points at.
type HoldTarget = (MerchantId, crate::domain::ids::TxnId);

/// Approves pending conversions whose hold ended at or before `now`; at most `limit`
/// per call. Returns how many were approved.
pub(super) fn sweep(pending: &mut Pending<'_>, now: UnixMillis, limit: usize) -> Result<u64, StoreError> {
    let mut due: Vec<(Vec<u8>, Option<HoldTarget>)> = Vec::new();
    let db = pending.db()?;
    for item in db.iterator_cf(super::cf_of(db, Cf::Holds)?, rocksdb::IteratorMode::Start) {
        let (k, _) = item?;
        match keys::parse_hold(&k) {
            Some((at, _, _)) if at > now => break,
            Some((_, m, t)) => due.push((k.to_vec(), Some((m, t)))),
            // A key that does not parse is dropped rather than blocking the sweep.
            None => due.push((k.to_vec(), None)),
        }
        if due.len() >= limit {
            break;
        }
    }
    let mut approved = 0;
    for (key, target) in due {
        if let Some((merchant, txn)) = target {
            let ckey = keys::conversion(&merchant, &txn);
            if let Some(mut rec) = pending.read::<ConversionRecord>(Cf::Conversions, &ckey)? {
                if rec.status == ConversionStatus::Pending {
                    move_status(&mut rec, ConversionStatus::Approved, now, "hold period ended".into());
                    count_approval(pending, &rec)?;
                    pending.write(Cf::Conversions, ckey, &rec)?;
                    approved += 1;
                }
            }
        }
        pending.delete(Cf::Holds, key)?;
        pending.ops += 1;
    }
    if approved > 0 {
        pending.sync = true;
    }
    Ok(approved)
}

/// A deal registration as received, the account normalized.
#[derive(Debug, Clone)]
pub struct DealDraft {
    pub merchant: MerchantId,
    pub partner: PartnerId,
    pub deal_id: String,
    pub account: String,
    pub opportunity_id: Option<String>,
    pub registered_ms: UnixMillis,
    pub ttl_days: u32,
}

/// The stored answer to a registration; a replay returns it unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealAnswer {
    pub status: u16,
    pub deal_id: String,
    pub account: String,
    pub source_of_record: bool,
    pub expires_ms: Option<UnixMillis>,
}

/// Registers a deal: the first accepted registration of an account is its source of
/// record; a later one by another partner becomes a touch and is refused (409) without
/// naming the holder. The same partner and `deal_id` again replays the first answer.
pub(super) fn register_deal(pending: &mut Pending<'_>, d: DealDraft) -> Result<(DealAnswer, bool), StoreError> {
    let dkey = keys::deal(&d.partner, &d.deal_id);
    if let Some(answer) = pending.read::<DealAnswer>(Cf::Deals, &dkey)? {
        return Ok((answer, true));
    }
    let akey = keys::account(&d.merchant, &d.account);
    let mut acc: AccountRecord = pending
        .read(Cf::Accounts, &akey)?
        .unwrap_or_else(|| AccountRecord { account: d.account.clone(), ..Default::default() });
    let holder = acc.holder_at(d.registered_ms).cloned();
    let answer = match holder {
        Some(c) if c.partner_id != d.partner => {
            acc.add_touch(Touch {
                partner_id: d.partner.clone(),
                kind: TouchKind::Deal,
                label: format!("deal {}", d.deal_id),
                at_ms: d.registered_ms,
            });
            DealAnswer {
                status: 409,
                deal_id: d.deal_id.clone(),
                account: d.account.clone(),
                source_of_record: false,
                expires_ms: None,
            }
        }
        Some(c) => DealAnswer {
            status: 200,
            deal_id: d.deal_id.clone(),
            account: d.account.clone(),
            source_of_record: true,
            expires_ms: (!c.converted).then_some(c.expires_ms),
        },
        None => {
            if let Some(old) = acc.claim.take() {
                acc.add_touch(Touch {
                    partner_id: old.partner_id,
                    kind: TouchKind::Deal,
                    label: format!("expired deal {}", old.deal_id),
                    at_ms: old.registered_ms,
                });
            }
            let expires_ms = d.registered_ms + i64::from(d.ttl_days) * DAY_MS;
            acc.claim = Some(Claim {
                partner_id: d.partner.clone(),
                deal_id: d.deal_id.clone(),
                opportunity_id: d.opportunity_id.clone(),
                registered_ms: d.registered_ms,
                expires_ms,
                converted: false,
            });
            DealAnswer {
                status: 201,
                deal_id: d.deal_id.clone(),
                account: d.account.clone(),
                source_of_record: true,
                expires_ms: Some(expires_ms),
            }
        }
    };
    pending.write(Cf::Accounts, akey, &acc)?;
    pending.write(Cf::Deals, dkey, &answer)?;
    pending.sync = true;
    pending.ops += 1;
    Ok((answer, false))
}

/// Records a touch from the merchant's CRM.
pub(super) fn touch(
    pending: &mut Pending<'_>,
    merchant: &MerchantId,
    account: &str,
    t: Touch,
) -> Result<(), StoreError> {
    let akey = keys::account(merchant, account);
    let mut acc: AccountRecord = pending
        .read(Cf::Accounts, &akey)?
        .unwrap_or_else(|| AccountRecord { account: account.to_string(), ..Default::default() });
    acc.add_touch(t);
    pending.write(Cf::Accounts, akey, &acc)?;
    pending.sync = true;
    pending.ops += 1;
    Ok(())
}

/// Changes an account's source of record; the change is kept in the account's audit
/// list. Later conversions follow the new holder; past ones are not rewritten.
pub(super) fn reassign(
    pending: &mut Pending<'_>,
    merchant: &MerchantId,
    account: &str,
    r: Reassignment,
) -> Result<AccountRecord, StoreError> {
    let akey = keys::account(merchant, account);
    let mut acc: AccountRecord = pending
        .read(Cf::Accounts, &akey)?
        .unwrap_or_else(|| AccountRecord { account: account.to_string(), ..Default::default() });
    let claim = Claim {
        partner_id: r.to.clone(),
        deal_id: format!("reassigned {}", format_rfc3339(r.at_ms)),
        opportunity_id: acc.claim.as_ref().and_then(|c| c.opportunity_id.clone()),
        registered_ms: r.at_ms,
        expires_ms: r.at_ms,
        converted: true,
    };
    acc.claim = Some(claim);
    acc.reassignments.push(r);
    pending.write(Cf::Accounts, akey, &acc)?;
    pending.sync = true;
    pending.ops += 1;
    Ok(acc)
}
