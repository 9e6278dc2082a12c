//! Ledger entries: append-only money movements per partner. A correction is a new
//! entry, never an edit; a partner's balance is the sum of its entries.

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::ids::{MerchantId, PartnerId, TxnId, Ulid};
use super::money::Money;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerKind {
    Commission,
    InfluenceFee,
    Reversal,
    Clawback,
    Correction,
    /// Paid out by a payout run (negative); a failed line is corrected back.
    Payout,
}

impl LedgerKind {
    pub const ALL: [LedgerKind; 6] = [
        LedgerKind::Commission,
        LedgerKind::InfluenceFee,
        LedgerKind::Reversal,
        LedgerKind::Clawback,
        LedgerKind::Correction,
        LedgerKind::Payout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Commission => "commission",
            LedgerKind::InfluenceFee => "influence_fee",
            LedgerKind::Reversal => "reversal",
            LedgerKind::Clawback => "clawback",
            LedgerKind::Correction => "correction",
            LedgerKind::Payout => "payout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub entry_id: Ulid,
    pub merchant_id: MerchantId,
    pub partner_id: PartnerId,
    pub kind: LedgerKind,
    pub txn_id: TxnId,
    pub conversion_id: Ulid,
    pub amount: Money,
    pub at_ms: UnixMillis,
    /// Why, in words: the plan rule that paid it (`sale 20%`), or the adjustment that took
    /// it back (`refund r-1`). Entries written before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}
