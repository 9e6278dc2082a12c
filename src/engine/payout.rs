//! Payout runs and their lines (SPEC 9.1): who is paid how much, written as `payout`
//! ledger entries in one command; a line confirmed paid, or failed (a `correction` entry
//! makes the amount payable again). tally records payments; it moves no money.

use super::tx::Tx;
use super::{Effect, Entropy, Refusal, State};
use crate::domain::clock::UnixMillis;
use crate::domain::ids::{MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::{LedgerEntry, LedgerKind};
use crate::domain::money::Money;
use crate::domain::payout::{LineState, PayoutLine, PayoutRequest, PayoutRun};
use crate::domain::rollup::DAY_MS;

/// A payout command.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum PayoutOp {
    /// Runs a payout, idempotent by its id.
    Run { merchant: MerchantId, request: PayoutRequest, at: UnixMillis, entropy: Entropy },
    /// Confirms one line of a run as paid, or failed.
    Settle {
        merchant: MerchantId,
        payout_id: String,
        partner: PartnerId,
        outcome: Settlement,
        at: UnixMillis,
        entropy: Entropy,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Settlement {
    Paid { reference: String },
    Failed { reason: String },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum PayoutAnswer {
    /// The run, and whether it replays an earlier one with the same id and body.
    Run(PayoutRun, bool),
    /// The run after a line was settled.
    Settled(PayoutRun),
    /// No such run, or no line of that partner in it.
    NotFound,
    Refused(Refusal),
}

/// The day bucket (UTC days since 1970) of an instant.
pub fn day_of(at: UnixMillis) -> u32 {
    u32::try_from(at.max(0) / DAY_MS).unwrap_or(u32::MAX)
}

pub(super) fn execute<S: State + ?Sized>(tx: &mut Tx<'_, S>, op: PayoutOp) -> Result<PayoutAnswer, S::Error> {
    match op {
        PayoutOp::Run { merchant, request, at, entropy } => run(tx, &merchant, request, at, &entropy),
        PayoutOp::Settle { merchant, payout_id, partner, outcome, at, entropy } => {
            settle(tx, &merchant, &payout_id, &partner, outcome, at, &entropy)
        }
    }
}

fn payout_entry(
    run: &PayoutRun,
    partner: &PartnerId,
    kind: LedgerKind,
    amount: Money,
    at: UnixMillis,
    note: String,
) -> LedgerEntry {
    let txn = TxnId::parse(&format!("payout:{}", run.request.payout_id)).unwrap_or_else(|_| unreachable_txn());
    LedgerEntry {
        entry_id: Ulid([0; 16]),
        merchant_id: run.merchant_id.clone(),
        partner_id: partner.clone(),
        kind,
        txn_id: txn,
        conversion_id: run.id,
        amount,
        at_ms: at,
        note: Some(note),
    }
}

/// `payout:` and a checked payout id is always a valid transaction id.
fn unreachable_txn() -> TxnId {
    TxnId::parse("payout").unwrap_or_else(|_| panic!("a constant transaction id"))
}

/// Takes every partner whose payable balance, from what it earned through the run's last
/// day, reaches `min_amount`: one `payout` entry each, and the amount moves to `in_runs`.
/// What was earned after `through` waits for a later run; what was taken back after it
/// is already out of the payable balance, so the amount is the smaller of the two.
fn run<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    request: PayoutRequest,
    at: UnixMillis,
    entropy: &Entropy,
) -> Result<PayoutAnswer, S::Error> {
    if let Some(existing) = tx.payout(merchant, &request.payout_id)? {
        if existing.request == request {
            return Ok(PayoutAnswer::Run(existing, true));
        }
        let detail = format!("payout {} was already run with another body", request.payout_id);
        return Ok(PayoutAnswer::Refused(Refusal::new(true, "payout_conflict", Some("payout_id"), detail)));
    }
    let currency = request.currency;
    let last_day = day_of(request.through_end_ms - 1);
    let mut earned = tx.earned(merchant, currency, last_day)?;
    earned.sort_by(|a, b| a.0.cmp(&b.0));
    let mut run = PayoutRun {
        id: tx.mint(at, entropy),
        merchant_id: merchant.clone(),
        request,
        created_ms: at,
        lines: Vec::new(),
    };
    for (partner, through) in earned {
        if tx.catalog().partner_of(merchant, &partner).is_none() {
            continue;
        }
        let balance = tx.balance(merchant, &partner, currency)?;
        let amount = (through - balance.paid - balance.in_runs).min(balance.payable());
        if amount <= 0 || amount < run.request.min_amount.minor {
            continue;
        }
        let money = Money { minor: amount, currency };
        let note = format!("payout {} through {}", run.request.payout_id, run.request.through);
        let entry = payout_entry(&run, &partner, LedgerKind::Payout, Money { minor: -amount, currency }, at, note);
        let entry_id = tx.append_ledger(entry, entropy)?;
        tx.update_balance(merchant, &partner, currency, |b| b.in_runs += amount)?;
        run.lines.push(PayoutLine { partner_id: partner, amount: money, entry_id, state: LineState::Pending });
    }
    tx.push(Effect::Payout(Box::new(run.clone())));
    Ok(PayoutAnswer::Run(run, false))
}

fn settle<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    payout_id: &str,
    partner: &PartnerId,
    outcome: Settlement,
    at: UnixMillis,
    entropy: &Entropy,
) -> Result<PayoutAnswer, S::Error> {
    let Some(mut run) = tx.payout(merchant, payout_id)? else { return Ok(PayoutAnswer::NotFound) };
    let Some(i) = run.lines.iter().position(|l| l.partner_id == *partner) else { return Ok(PayoutAnswer::NotFound) };
    let line = run.lines[i].clone();
    if line.state != LineState::Pending {
        let detail = format!("the line of partner {partner} in payout {payout_id} is already {}", line.state.as_str());
        return Ok(PayoutAnswer::Refused(Refusal::new(true, "line_settled", None, detail)));
    }
    let amount = line.amount;
    let state = match outcome {
        Settlement::Paid { reference } => {
            tx.update_balance(merchant, partner, amount.currency, |b| {
                b.in_runs -= amount.minor;
                b.paid += amount.minor;
            })?;
            LineState::Paid { reference, at_ms: at }
        }
        Settlement::Failed { reason } => {
            let note = format!("payout {payout_id} failed: {reason}");
            let entry = payout_entry(&run, partner, LedgerKind::Correction, amount, at, note);
            tx.append_ledger(entry, entropy)?;
            tx.update_balance(merchant, partner, amount.currency, |b| b.in_runs -= amount.minor)?;
            LineState::Failed { reason, at_ms: at }
        }
    };
    run.lines[i].state = state;
    tx.push(Effect::Payout(Box::new(run.clone())));
    Ok(PayoutAnswer::Settled(run))
}
