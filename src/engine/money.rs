//! The money rules after a conversion is stored: adjustments (refund, chargeback,
//! approve, reject) with proportional reversals, and the hold sweep.

use super::convert::append;
use super::outbox;
use super::tx::Tx;
use super::{Entropy, Refusal, State};
use crate::commission;
use crate::domain::clock::{month_of, UnixMillis};
use crate::domain::conversion::{
    AdjustmentInput, AdjustmentKind, AdjustmentRecord, ConversionRecord, ConversionStatus, StatusChange,
};
use crate::domain::fraud::ReviewStatus;
use crate::domain::ids::{MerchantId, PartnerId, Ulid};
use crate::domain::ledger::LedgerKind;
use crate::domain::money::Money;
use crate::domain::outbound::OutboundEvent;

/// What became of an adjustment.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum AdjustOutcome {
    Applied(AdjustmentRecord, ConversionRecord),
    Replay(AdjustmentRecord, ConversionRecord),
    Refused(Refusal),
}

/// `conflict`: the adjustment clashes with what is stored; else it is invalid.
fn refuse(
    conflict: bool,
    code: &'static str,
    field: Option<&'static str>,
    detail: String,
    current: Option<ConversionStatus>,
) -> AdjustOutcome {
    AdjustOutcome::Refused(Refusal { conflict, code, field, detail, current_status: current.map(|c| c.as_str()) })
}

fn move_status(rec: &mut ConversionRecord, to: ConversionStatus, at: UnixMillis, cause: String) {
    rec.history.push(StatusChange { from: rec.status, to, at_ms: at, cause });
    rec.status = to;
}

/// Counts an approved sale for the partner's tiers.
fn count_approval<S: State + ?Sized>(tx: &mut Tx<'_, S>, rec: &ConversionRecord) -> Result<(), S::Error> {
    let Some(a) = &rec.attribution else { return Ok(()) };
    if rec.event != "sale" {
        return Ok(());
    }
    let month = month_of(rec.occurred_ms);
    let mut stats = tx.partner_month(&rec.merchant_id, &a.partner_id, month)?;
    stats.approved_sales += 1;
    tx.put_partner_month(&rec.merchant_id, &a.partner_id, month, stats);
    Ok(())
}

/// The reversal entries that bring every credited partner's net for this conversion to
/// `share(commission)`: proportional to what is refunded, computed on the cumulative
/// refund so rounding never drifts and a full refund reverses exactly everything.
#[allow(clippy::too_many_arguments)] // the refund's before and after, its kind and its ids' entropy
fn reverse_to<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    rec: &ConversionRecord,
    kind: LedgerKind,
    refunded_before: i64,
    refunded_after: i64,
    full: bool,
    at: UnixMillis,
    cause: &str,
    entropy: &Entropy,
) -> Result<Reversed, S::Error> {
    let total = rec.amount.map_or(0, |a| a.minor);
    let Some(a) = &rec.attribution else { return Ok(Reversed::default()) };
    // Before approval a reversal only lowers what is pending; after, it is `reversed`.
    let approved = rec.status == ConversionStatus::Approved;
    let mut out = Reversed::default();
    for (partner, amount) in rec.credited() {
        // `before` is always the proportional share: `full` only decides the last step, so a
        // rejection after a partial refund takes back exactly what is left.
        let before =
            if refunded_before == 0 { 0 } else { commission::proportional(amount.minor, refunded_before, total) };
        let after = if full { amount.minor } else { commission::proportional(amount.minor, refunded_after, total) };
        let delta = after - before;
        let change = Money { minor: -delta, currency: amount.currency };
        if partner == a.partner_id {
            out.sourced = Some(change);
        }
        if delta != 0 {
            let note = format!("{cause} on {}", rec.txn_id);
            out.ids.push(append(tx, rec, &partner, kind, change, at, note, entropy)?);
            tx.update_balance(&rec.merchant_id, &partner, amount.currency, |b| {
                if approved {
                    b.reversed += delta;
                } else {
                    b.pending -= delta;
                }
            })?;
            if approved {
                earned(tx, rec, &partner, amount.currency, at, -delta);
            }
        }
    }
    Ok(out)
}

/// Moves an approved conversion's credit from `pending` to `approved` (gross), and what
/// partial refunds took back while it was pending to `reversed`.
fn settle_approval<S: State + ?Sized>(tx: &mut Tx<'_, S>, rec: &ConversionRecord) -> Result<(), S::Error> {
    let total = rec.amount.map_or(0, |a| a.minor);
    for (partner, gross) in rec.credited() {
        let taken =
            if rec.refunded_minor == 0 { 0 } else { commission::proportional(gross.minor, rec.refunded_minor, total) };
        tx.update_balance(&rec.merchant_id, &partner, gross.currency, |b| {
            b.pending -= gross.minor - taken;
            b.approved += gross.minor;
            b.reversed += taken;
        })?;
        // Earned on the day the commission was credited (its ledger entry's day).
        earned(tx, rec, &partner, gross.currency, rec.received_ms, gross.minor - taken);
    }
    Ok(())
}

fn earned<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    rec: &ConversionRecord,
    partner: &PartnerId,
    currency: crate::domain::money::Currency,
    at: UnixMillis,
    delta: i64,
) {
    if delta != 0 {
        tx.push(super::Effect::Earned {
            merchant: rec.merchant_id.clone(),
            partner: partner.clone(),
            currency,
            day: super::day_of(at),
            delta,
        });
    }
}

/// The entries a reversal appended, and the change to the sourced partner's commission.
#[derive(Default)]
struct Reversed {
    ids: Vec<Ulid>,
    sourced: Option<Money>,
}

/// Applies an adjustment, idempotent by `adjustment_id`.
pub(super) fn adjust<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    input: AdjustmentInput,
    now: UnixMillis,
    entropy: &Entropy,
) -> Result<AdjustOutcome, S::Error> {
    if let Some(stored) = tx.adjustment(merchant, &input.adjustment_id)? {
        let rec = tx.conversion(merchant, &stored.input.txn_id)?;
        return Ok(match rec {
            Some(rec) if stored.input == input => AdjustOutcome::Replay(stored, rec),
            _ => refuse(
                true,
                "adjustment_conflict",
                Some("adjustment_id"),
                format!("adjustment {} was already used for another adjustment", input.adjustment_id),
                None,
            ),
        });
    }
    let Some(mut rec) = tx.conversion(merchant, &input.txn_id)? else {
        return Ok(refuse(
            false,
            "invalid_field",
            Some("txn_id"),
            format!("no conversion with txn_id {}", input.txn_id),
            None,
        ));
    };
    let current = rec.status;
    let illegal = |to: ConversionStatus| {
        refuse(
            true,
            "illegal_status_change",
            None,
            format!("the conversion is {}; it cannot become {}", current.as_str(), to.as_str()),
            Some(current),
        )
    };
    let cause = format!("{} {}", input.kind.as_str(), input.adjustment_id);
    let mut amount = None;
    let (entries, trigger, change) = match input.kind {
        AdjustmentKind::Approve => {
            if !current.can_move_to(ConversionStatus::Approved) {
                return Ok(illegal(ConversionStatus::Approved));
            }
            if rec.review.as_ref().is_some_and(|r| r.status == ReviewStatus::Open) {
                return Ok(refuse(
                    true,
                    "review_open",
                    None,
                    format!(
                        "conversion {} is in fraud review; an admin approves or rejects it with POST /admin/v1/merchants/{merchant}/conversions/{}:review",
                        rec.txn_id, rec.txn_id
                    ),
                    Some(current),
                ));
            }
            move_status(&mut rec, ConversionStatus::Approved, now, cause);
            count_approval(tx, &rec)?;
            settle_approval(tx, &rec)?;
            (Vec::new(), OutboundEvent::Approved, rec.commission.as_ref().map(|c| c.amount))
        }
        AdjustmentKind::Reject => {
            if !current.can_move_to(ConversionStatus::Rejected) {
                return Ok(illegal(ConversionStatus::Rejected));
            }
            let r = reverse_to(
                tx,
                &rec,
                LedgerKind::Reversal,
                rec.refunded_minor,
                rec.amount.map_or(0, |a| a.minor),
                true,
                now,
                &cause,
                entropy,
            )?;
            move_status(&mut rec, ConversionStatus::Rejected, now, cause);
            (r.ids, OutboundEvent::Rejected, r.sourced)
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
                    false,
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
                    Err(e) => return Ok(refuse(false, "invalid_field", Some("amount"), format!("amount: {e}"), None)),
                },
            };
            if refund.minor == 0 || refund.minor > remaining {
                let left = Money { minor: remaining, currency: total.currency };
                return Ok(refuse(
                    false,
                    "invalid_field",
                    Some("amount"),
                    format!("must be more than 0 and at most the remaining {} {}", left.amount_text(), total.currency),
                    None,
                ));
            }
            let kind = if current == ConversionStatus::Approved { LedgerKind::Clawback } else { LedgerKind::Reversal };
            let after = rec.refunded_minor + refund.minor;
            let full = after == total.minor;
            let r = reverse_to(tx, &rec, kind, rec.refunded_minor, after, full, now, &cause, entropy)?;
            rec.refunded_minor = after;
            if after == total.minor {
                move_status(&mut rec, target, now, cause);
            }
            amount = Some(refund);
            (r.ids, OutboundEvent::Reversed, r.sourced)
        }
    };
    let held = rec.review.as_ref().is_some_and(|r| r.postbacks_held && r.status == ReviewStatus::Open);
    if rec.status != ConversionStatus::Pending && rec.status != ConversionStatus::Approved {
        // Rejected or refunded in full by the merchant: nothing is left to review.
        settle_review(tx, &mut rec, false, format!("merchant ({})", input.adjustment_id), None, now);
    }
    if !held {
        // A partner that never heard of a held conversion hears nothing of its refunds.
        outbox::notify(tx, &mut rec, trigger, change, now, entropy)?;
    }
    let stored = AdjustmentRecord { input, amount, at_ms: now, status_after: rec.status, ledger_entries: entries };
    tx.put_adjustment(merchant, stored.clone());
    tx.put_conversion(rec.clone());
    Ok(AdjustOutcome::Applied(stored, rec))
}

/// Most holds approved by one sweep; the next sweep continues.
pub const SWEEP_LIMIT: usize = 10_000;

/// Approves pending conversions whose hold ended at or before `now`; at most `limit`
/// per call. Returns how many were approved.
pub(super) fn sweep<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    now: UnixMillis,
    limit: usize,
    entropy: &Entropy,
) -> Result<u64, S::Error> {
    let mut approved = 0;
    for hold in tx.due_holds(now, limit)? {
        if let Some(mut rec) = tx.conversion(&hold.merchant, &hold.txn)? {
            // A conversion in fraud review has no hold; the check keeps it so whatever the index says.
            let in_review = rec.review.as_ref().is_some_and(|r| r.status == ReviewStatus::Open);
            if rec.status == ConversionStatus::Pending && !in_review {
                move_status(&mut rec, ConversionStatus::Approved, now, "hold period ended".into());
                count_approval(tx, &rec)?;
                settle_approval(tx, &rec)?;
                let commission = rec.commission.as_ref().map(|c| c.amount);
                outbox::notify(tx, &mut rec, OutboundEvent::Approved, commission, now, entropy)?;
                tx.put_conversion(rec);
                approved += 1;
            }
        }
        tx.hold_done(hold);
    }
    Ok(approved)
}

/// What became of a review decision.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ReviewOutcome {
    Settled(ConversionRecord),
    /// The review was already settled the same way.
    Replay(ConversionRecord),
    NotFound,
    Refused(Refusal),
}

/// Closes an open review: approved or rejected, by whom, when and why; off the open list.
fn settle_review(
    tx: &mut Tx<'_, impl State + ?Sized>,
    rec: &mut ConversionRecord,
    approve: bool,
    by: String,
    note: Option<String>,
    now: UnixMillis,
) {
    let Some(r) = rec.review.as_mut().filter(|r| r.status == ReviewStatus::Open) else { return };
    r.status = if approve { ReviewStatus::Approved } else { ReviewStatus::Rejected };
    r.settled_by = Some(by);
    r.settled_ms = Some(now);
    r.note = note;
    tx.push(super::Effect::Review {
        merchant: rec.merchant_id.clone(),
        conversion_id: rec.conversion_id,
        txn: rec.txn_id.clone(),
        open: false,
    });
}

/// An admin's decision on a flagged conversion. Approving approves the conversion (its
/// review replaced the hold) and sends the partner postbacks that waited; rejecting
/// reverses its credit like the merchant's `reject`. The same decision again replays.
#[allow(clippy::too_many_arguments)] // the decision, who took it and why, and its ids' entropy
pub(super) fn review<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    txn: &crate::domain::ids::TxnId,
    approve: bool,
    by: String,
    note: Option<String>,
    now: UnixMillis,
    entropy: &Entropy,
) -> Result<ReviewOutcome, S::Error> {
    let Some(mut rec) = tx.conversion(merchant, txn)? else { return Ok(ReviewOutcome::NotFound) };
    let wanted = if approve { ReviewStatus::Approved } else { ReviewStatus::Rejected };
    let refused = |code, detail| ReviewOutcome::Refused(Refusal::new(true, code, None, detail));
    let Some(status) = rec.review.as_ref().map(|r| r.status) else {
        let detail =
            format!("conversion {txn} raised no fraud signal: the merchant approves or rejects it with an adjustment");
        return Ok(refused("no_review", detail));
    };
    if status == wanted {
        return Ok(ReviewOutcome::Replay(rec));
    }
    if status != ReviewStatus::Open {
        return Ok(refused(
            "review_settled",
            format!("the review of conversion {txn} was already {}", status.as_str()),
        ));
    }
    let held = rec.review.as_ref().is_some_and(|r| r.postbacks_held);
    let cause = format!("review {} by {by}", wanted.as_str());
    let pending = rec.status == ConversionStatus::Pending;
    settle_review(tx, &mut rec, approve, by, note, now);
    if approve {
        let commission = rec.commission.as_ref().map(|c| c.amount);
        if held {
            outbox::notify(tx, &mut rec, OutboundEvent::Created, commission, now, entropy)?;
        }
        if pending {
            move_status(&mut rec, ConversionStatus::Approved, now, cause);
            count_approval(tx, &rec)?;
            settle_approval(tx, &rec)?;
            outbox::notify(tx, &mut rec, OutboundEvent::Approved, commission, now, entropy)?;
        }
    } else if pending {
        let total = rec.amount.map_or(0, |a| a.minor);
        // The ledger note, which the partner reads, does not name the reviewer.
        let note = "rejected in fraud review";
        let r = reverse_to(tx, &rec, LedgerKind::Reversal, rec.refunded_minor, total, true, now, note, entropy)?;
        move_status(&mut rec, ConversionStatus::Rejected, now, cause);
        if !held {
            outbox::notify(tx, &mut rec, OutboundEvent::Rejected, r.sourced, now, entropy)?;
        }
    }
    tx.put_conversion(rec.clone());
    Ok(ReviewOutcome::Settled(rec))
}
