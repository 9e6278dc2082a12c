//! The RocksDB schema as code: one column family per entity of SPEC 2.
//! Adding a family is adding a variant here; nothing else names families by string.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Installation facts: schema version, the visitor-hash salt.
    Meta,
    /// `merchant_id` -> `Merchant`.
    Merchants,
    /// `owner kind + id` -> `SecretSet` (kept apart so entity reads never carry keys).
    Secrets,
    /// `partner_id` -> `Partner` (partner ids are unique across merchants).
    Partners,
    /// `link_id` -> `Link` (link ids are unique across merchants).
    Links,
    /// `merchant, plan_id, version_from` -> `Plan`.
    Plans,
    /// `click_id` (16 bytes, time-ordered) -> `ClickRecord`.
    Clicks,
    /// `link_id, visitor hash` -> `VisitorRecord`: the last unique click (the `unique` flag)
    /// and the clicks of the trailing day (fraud signals).
    Visitors,
    /// `merchant, txn_id` -> `ConversionRecord`. The key is the dedupe key.
    Conversions,
    /// `merchant, partner, entry_id` -> `LedgerEntry`. Append-only.
    Ledger,
    /// `merchant, account` -> `AccountRecord` (claim, touches, reassignments).
    Accounts,
    /// `partner, deal_id` -> the answer to that registration, for idempotent replays.
    Deals,
    /// `merchant, customer_id` -> `CustomerBinding`.
    Customers,
    /// `merchant, partner, YYYYMM` -> `PartnerMonth` (tiers and caps).
    PartnerMonths,
    /// `approve_at (8 bytes BE), merchant, txn_id` -> empty: the hold-period index.
    Holds,
    /// `merchant, adjustment_id` -> `AdjustmentRecord`.
    Adjustments,
    /// `merchant, delivery_id` -> `Delivery` (outbound postbacks, SPEC 10).
    Deliveries,
    /// The outbox's indexes, by a leading tag: `d, due_at, merchant, id` (due), `f,
    /// finished_at, merchant, id` (retention), `p, partner, id` -> merchant (parked), `e,
    /// partner` -> `EndpointOff`.
    Outbox,
    /// Report rollups (SPEC 5.5), merge-only: `merchant, tag bucket partner, currency` ->
    /// counters, and `merchant, f partner` -> the first attributed conversion's time. The
    /// merge operator and its algebra are in [`super::rollups`].
    Rollups,
    /// `merchant, entry_id` -> partner id: the ledger in entry order, for the export.
    LedgerOrder,
    /// `merchant, partner, currency` -> `Balance` (SPEC 9.1).
    Balances,
    /// `merchant, payout_id` -> `PayoutRun`.
    Payouts,
    /// `merchant, currency, partner, day` -> what the partner earned that day (approved
    /// minus reversed, minor units, 8 bytes big-endian), merge-only: the merge operator adds
    /// (`i64` wrapping addition, a commutative monoid). Payout runs sum it up to `through`.
    Earned,
    /// `partner, conversion_id` -> `merchant, txn_id`: every conversion that credits a
    /// partner (sourced or influenced), in time order, for the partner's own reads.
    PartnerConversions,
    /// Fraud-signal facts and the review list, by a leading tag: `p, merchant, partner` ->
    /// `Pace`, `v, merchant, partner, visitor` -> `Recent`, `r, merchant, conversion_id` ->
    /// txn id (a conversion in open review). Encodings in [`crate::domain::fraud`].
    Signals,
}

// `Cf::index` is a family's place in `Cf::ALL`: the list is in declaration order.
const _: () = {
    let mut i = 0;
    while i < Cf::ALL.len() {
        assert!(Cf::ALL[i] as usize == i);
        i += 1;
    }
};

impl Cf {
    pub const ALL: [Cf; 25] = [
        Cf::Meta,
        Cf::Merchants,
        Cf::Secrets,
        Cf::Partners,
        Cf::Links,
        Cf::Plans,
        Cf::Clicks,
        Cf::Visitors,
        Cf::Conversions,
        Cf::Ledger,
        Cf::Accounts,
        Cf::Deals,
        Cf::Customers,
        Cf::PartnerMonths,
        Cf::Holds,
        Cf::Adjustments,
        Cf::Deliveries,
        Cf::Outbox,
        Cf::Rollups,
        Cf::LedgerOrder,
        Cf::Balances,
        Cf::Payouts,
        Cf::Earned,
        Cf::PartnerConversions,
        Cf::Signals,
    ];

    /// The family's place in [`Cf::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Merchants => "merchants",
            Cf::Secrets => "secrets",
            Cf::Partners => "partners",
            Cf::Links => "links",
            Cf::Plans => "plans",
            Cf::Clicks => "clicks",
            Cf::Visitors => "visitors",
            Cf::Conversions => "conversions",
            Cf::Ledger => "ledger",
            Cf::Accounts => "accounts",
            Cf::Deals => "deals",
            Cf::Customers => "customers",
            Cf::PartnerMonths => "partner_months",
            Cf::Holds => "holds",
            Cf::Adjustments => "adjustments",
            Cf::Deliveries => "deliveries",
            Cf::Outbox => "outbox",
            Cf::Rollups => "rollups",
            Cf::LedgerOrder => "ledger_order",
            Cf::Balances => "balances",
            Cf::Payouts => "payouts",
            Cf::Earned => "earned",
            Cf::PartnerConversions => "partner_conversions",
            Cf::Signals => "signals",
        }
    }
}
