//! A partner's balance in one currency (SPEC 9.1), kept by the engine as the ledger
//! grows, in minor units:
//!
//! - `pending`: commission and fees of conversions not yet approved, net of what refunds
//!   took back meanwhile. A conversion rejected before approval leaves nothing here.
//! - `approved`: commission and fees of conversions once they are approved, gross.
//! - `reversed`: what refunds, chargebacks and rejections took back from approved
//!   conversions (and, at approval, what partial refunds took back while it was pending).
//! - `paid` and `in_runs`: payout lines confirmed paid, and lines of runs not yet confirmed.
//!
//! `payable = approved - reversed - paid - in_runs`; it can be negative (a clawback after a
//! payout), and is then carried forward and netted against later earnings.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub pending: i64,
    pub approved: i64,
    pub reversed: i64,
    pub paid: i64,
    #[serde(default)]
    pub in_runs: i64,
}

impl Balance {
    pub fn payable(&self) -> i64 {
        self.approved - self.reversed - self.paid - self.in_runs
    }
}
