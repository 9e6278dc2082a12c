//! Payout runs (SPEC 9.1): what a run asked for, and its lines. tally moves no money; a
//! run records what each partner is to be paid, and each line is later confirmed paid
//! (with the payment's reference) or failed (the amount is payable again).

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::ids::{MerchantId, PartnerId, Ulid};
use super::money::{Currency, Money};

/// `POST /admin/v1/merchants/{m}/payouts`, as validated: the run's identity for
/// idempotency is `payout_id`, and a repeat must ask for the same thing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutRequest {
    pub payout_id: String,
    pub currency: Currency,
    /// Partners whose payable balance is below this are left for a later run.
    pub min_amount: Money,
    /// The last day (UTC) whose earnings the run pays, as `YYYY-MM-DD`.
    pub through: String,
    /// The first instant after `through`.
    pub through_end_ms: UnixMillis,
}

/// A line's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum LineState {
    /// In the run, not yet confirmed: counted in the partner's `in_runs`.
    Pending,
    Paid {
        reference: String,
        at_ms: UnixMillis,
    },
    Failed {
        reason: String,
        at_ms: UnixMillis,
    },
}

impl LineState {
    pub fn as_str(&self) -> &'static str {
        match self {
            LineState::Pending => "pending",
            LineState::Paid { .. } => "paid",
            LineState::Failed { .. } => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutLine {
    pub partner_id: PartnerId,
    pub amount: Money,
    /// The run's `payout` ledger entry for this partner.
    pub entry_id: Ulid,
    pub state: LineState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutRun {
    /// Minted when the run was made; payout ledger entries name it as their conversion.
    pub id: Ulid,
    pub merchant_id: MerchantId,
    pub request: PayoutRequest,
    pub created_ms: UnixMillis,
    /// One per partner paid, by partner id.
    pub lines: Vec<PayoutLine>,
}

/// Payout ids: 1..64 of `[A-Za-z0-9_.-]` (`2026-11`, `nov-affiliates`).
pub fn check_payout_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    ok.then_some(()).ok_or_else(|| "must be 1..64 characters of [A-Za-z0-9_.-], such as 2026-11".into())
}
