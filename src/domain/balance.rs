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

use super::clock::UnixMillis;
use super::conversion::{ConversionRecord, ConversionStatus};
use super::ids::PartnerId;
use super::money::Currency;

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

/// What one stored conversion adds to a partner's balance and earnings, recomputed from
/// the record alone (a rebuild; the engine keeps the same figures as money moves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub partner: PartnerId,
    pub currency: Currency,
    pub balance: Balance,
    /// Approved minus reversed, counted on the day the conversion was received (the
    /// engine dates a reversal after approval on its own day: a rebuild cannot tell them
    /// apart, which matters only for a payout run's `through`).
    pub earned: i64,
    pub earned_at: UnixMillis,
}

/// The shares of every partner a conversion credited: approved (gross) and reversed when
/// it was ever approved, else the net credit as pending (nothing for a rejected one).
pub fn of_conversion(rec: &ConversionRecord) -> Vec<Share> {
    let total = rec.amount.map_or(0, |a| a.minor);
    let approved = rec.history.iter().any(|h| h.to == ConversionStatus::Approved);
    let finished = matches!(rec.status, ConversionStatus::Rejected | ConversionStatus::Reversed);
    rec.credited()
        .into_iter()
        .map(|(partner, gross)| {
            let taken = if finished {
                gross.minor
            } else if rec.refunded_minor == 0 {
                0
            } else {
                crate::commission::proportional(gross.minor, rec.refunded_minor, total)
            };
            let (balance, earned) = if approved {
                (Balance { approved: gross.minor, reversed: taken, ..Balance::default() }, gross.minor - taken)
            } else {
                (Balance { pending: gross.minor - taken, ..Balance::default() }, 0)
            };
            Share { partner, currency: gross.currency, balance, earned, earned_at: rec.received_ms }
        })
        .collect()
}
