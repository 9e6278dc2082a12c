//! The engine: every rule that decides money or identity, as one deterministic state
//! machine. `execute(state, command) -> (effects, answer)`.
//!
//! - A [`Command`] carries everything that could vary between two runs: its time, its
//!   [`Entropy`] (ids are derived from it), and settings such as the unique-click window.
//! - The engine reads through [`State`]: point reads and one range read (due holds).
//!   A command reads its own writes through [`Tx`], so a sweep that approves two sales
//!   of one partner counts both.
//! - It answers with the [`Effect`]s to keep, typed records that a backend applies
//!   atomically, and an [`Answer`] in domain terms (created, duplicate, conflict, refused
//!   with a code). No HTTP status, no storage type, no runtime: the same state and the
//!   same command give the same effects and the same answer, ids included, on any
//!   backend and on any replay.
//!
//! [`memory::Memory`] is a complete backend in ordered maps: the model the RocksDB store
//! is tested against, and a replay target.

mod b2b;
mod catalog;
mod convert;
mod entity;
pub mod memory;
mod money;
mod outbox;
mod payout;
#[cfg(test)]
mod tests;
mod tx;

use serde::{Deserialize, Serialize};

pub use b2b::{DealAnswer, DealDraft, DealOutcome};
pub use catalog::Catalog;
pub use convert::{ConversionDraft, ConversionOutcome};
pub use entity::{id_taken, EntityOp, Saved};
pub use money::{AdjustOutcome, ReviewOutcome, SWEEP_LIMIT};
pub use outbox::{OutboxAnswer, OutboxIndex, OutboxOp};
pub use payout::{day_of, PayoutAnswer, PayoutOp, Settlement};
pub use tx::Tx;

use crate::domain::account::{AccountRecord, CustomerBinding, PartnerMonth, Touch};
use crate::domain::balance::Balance;
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::{AdjustmentInput, AdjustmentRecord, ConversionRecord};
use crate::domain::entities::{Merchant, Partner};
use crate::domain::fraud::{Pace, Recent, VisitorRecord};
use crate::domain::ids::{LinkId, MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::LedgerEntry;
use crate::domain::link::Link;
use crate::domain::money::Currency;
use crate::domain::outbound::{Delivery, EndpointOff};
use crate::domain::payout::PayoutRun;
use crate::domain::plan::Plan;
use crate::domain::rollup::Increment;
use crate::signing::SecretSet;

/// Randomness a command brings with it: ids minted while executing it are derived from
/// it, so a replayed command mints the same ids. Drivers fill it from the OS CSPRNG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entropy(pub [u8; 16]);

impl Entropy {
    /// Fresh randomness from the OS-seeded CSPRNG.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        Entropy(bytes)
    }

    /// The `n`th 80 random bits of this command: the entropy's first 80 bits for `n = 0`,
    /// then a mix of all of it with `n`.
    pub fn bits(&self, n: u32) -> [u8; 10] {
        if n == 0 {
            // The first id is the entropy itself: it reveals nothing the id does not.
            let mut out = [0u8; 10];
            out.copy_from_slice(&self.0[..10]);
            return out;
        }
        // Later ids mix all 128 bits with `n` (SplitMix64's finalizer): an id shows 80 of
        // them, so it does not give away the others. Ids are unguessable, not secret.
        let (hi, lo) = self.0.split_at(8);
        let hi = u64::from_be_bytes(hi.try_into().unwrap_or_default());
        let lo = u64::from_be_bytes(lo.try_into().unwrap_or_default());
        let a = mix(hi ^ mix(lo ^ u64::from(n)));
        let b = mix(lo ^ a);
        let mut out = [0u8; 10];
        out[..8].copy_from_slice(&a.to_be_bytes());
        out[8..].copy_from_slice(&b.to_be_bytes()[..2]);
        out
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An input to the state machine. It serializes (JSON) as cluster mode's log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Records a click; the engine decides its `unique` flag. `once`: the click may come
    /// again (cluster mode forwards clicks at least once); a click whose id is stored is
    /// then answered as stored and changes nothing.
    Click {
        click: Box<ClickRecord>,
        unique_window_ms: i64,
        #[serde(default)]
        once: bool,
    },
    /// Dedupes, attributes, credits and stores a conversion.
    Conversion(Box<ConversionDraft>),
    /// Many conversions, in order, all or nothing.
    Batch(Vec<ConversionDraft>),
    /// A refund, chargeback, approval or rejection, idempotent by its id.
    Adjust { merchant: MerchantId, input: Box<AdjustmentInput>, at: UnixMillis, entropy: Entropy },
    /// A deal registration by a partner.
    Deal(Box<DealDraft>),
    /// A CRM touch on an account.
    Touch { merchant: MerchantId, account: String, touch: Touch },
    /// An admin change of an account's source of record, audited.
    Reassign { merchant: MerchantId, account: String, to: PartnerId, by: String, why: String, at: UnixMillis },
    /// Approves the conversions whose hold ended by `now`, at most `limit` of them.
    SweepHolds { now: UnixMillis, limit: usize, entropy: Entropy },
    /// Creates or updates a configuration entity.
    Entity(Box<EntityOp>),
    /// An outbound delivery's attempt, park, retry, an endpoint's enable, or retention.
    Outbox(Box<OutboxOp>),
    /// A payout run, or a line of one confirmed paid or failed.
    Payout(Box<PayoutOp>),
    /// An admin settles a flagged conversion's fraud review.
    Review {
        merchant: MerchantId,
        txn: TxnId,
        approve: bool,
        by: String,
        note: Option<String>,
        at: UnixMillis,
        entropy: Entropy,
    },
}

/// A refusal on the merits: what the caller sent clashes with what is stored
/// (`conflict`) or is invalid against it. The HTTP layer picks the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// `true` for a clash with existing data, `false` for an invalid reference or value.
    pub conflict: bool,
    pub code: &'static str,
    pub field: Option<&'static str>,
    pub detail: String,
    /// The conversion's status, for a refused status change.
    pub current_status: Option<&'static str>,
}

/// The strings a [`Refusal`] read back from another node names (codes, fields, statuses),
/// each kept once for the life of the process: they come from a fixed set, so this holds
/// as many as tally has codes and fields.
fn intern(s: &str) -> &'static str {
    static KEPT: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut kept = KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(k) = kept.get(s) {
        return k;
    }
    let k: &'static str = Box::leak(s.to_owned().into_boxed_str());
    kept.insert(k);
    k
}

/// A [`Refusal`] as another node sent it.
#[derive(Deserialize)]
struct RefusalRead {
    conflict: bool,
    code: String,
    field: Option<String>,
    detail: String,
    current_status: Option<String>,
}

impl<'de> Deserialize<'de> for Refusal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RefusalRead::deserialize(d)?;
        Ok(Refusal {
            conflict: r.conflict,
            code: intern(&r.code),
            field: r.field.as_deref().map(intern),
            detail: r.detail,
            current_status: r.current_status.as_deref().map(intern),
        })
    }
}

impl Refusal {
    pub fn new(conflict: bool, code: &'static str, field: Option<&'static str>, detail: String) -> Self {
        Refusal { conflict, code, field, detail, current_status: None }
    }
}

/// The engine's answer to a command, in domain terms. Serializable: in cluster mode a
/// partition's owner sends the answers to the node that took the requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    /// The click as stored: shared with its effect, not copied.
    Click(std::sync::Arc<ClickRecord>),
    Conversion(ConversionOutcome),
    Batch(Vec<ConversionOutcome>),
    Adjust(AdjustOutcome),
    /// The answer, and whether it replays an earlier registration.
    Deal(DealAnswer, bool),
    Touched,
    Reassigned(Box<AccountRecord>),
    /// How many conversions the sweep approved.
    Swept(u64),
    Entity(Result<Saved, Refusal>),
    Outbox(OutboxAnswer),
    Payout(PayoutAnswer),
    Review(ReviewOutcome),
}

/// A conversion's place in the hold index: approved at `at` unless adjusted first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hold {
    pub at: UnixMillis,
    pub merchant: MerchantId,
    pub txn: TxnId,
}

/// A record to keep. Applying the effects of one command is atomic; later effects of the
/// same kind and key replace earlier ones.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Shared with the command's answer.
    Click(std::sync::Arc<ClickRecord>),
    /// A visitor on a link: its last unique click and its clicks of the trailing day.
    Visitor {
        link: LinkId,
        visitor: [u8; 16],
        record: Box<VisitorRecord>,
    },
    /// A partner's clicks and conversions of the last 24 hours (fraud signals).
    Pace {
        merchant: MerchantId,
        partner: PartnerId,
        pace: Box<Pace>,
    },
    /// A visitor's conversions for a partner in the trailing day (fraud signals).
    Recent {
        merchant: MerchantId,
        partner: PartnerId,
        visitor: [u8; 16],
        recent: Box<Recent>,
    },
    /// A conversion in fraud review, listed (`true`) or settled.
    Review {
        merchant: MerchantId,
        conversion_id: Ulid,
        txn: TxnId,
        open: bool,
    },
    Conversion(Box<ConversionRecord>),
    /// Appended; never changed or removed.
    Ledger(Box<LedgerEntry>),
    /// The newest ledger entry id: later entries get larger ids.
    LedgerHead(Ulid),
    Account {
        merchant: MerchantId,
        record: Box<AccountRecord>,
    },
    Customer {
        merchant: MerchantId,
        customer: String,
        binding: CustomerBinding,
    },
    PartnerMonth {
        merchant: MerchantId,
        partner: PartnerId,
        month: u32,
        stats: PartnerMonth,
    },
    Adjustment {
        merchant: MerchantId,
        record: Box<AdjustmentRecord>,
    },
    Deal {
        partner: PartnerId,
        deal_id: String,
        answer: Box<DealAnswer>,
    },
    HoldSet(Hold),
    HoldDone(Hold),
    Merchant(Box<Merchant>),
    MerchantSecrets {
        merchant: MerchantId,
        secrets: Box<SecretSet>,
    },
    PostbackToken {
        merchant: MerchantId,
        hash: [u8; 32],
    },
    Partner(Box<Partner>),
    PartnerSecrets {
        partner: PartnerId,
        secrets: Box<SecretSet>,
    },
    Link(Box<Link>),
    Plan(Box<Plan>),
    /// An outbound delivery as its event made it.
    NewDelivery(Box<Delivery>),
    /// An outbound delivery changed.
    Delivery(Box<Delivery>),
    /// A finished delivery past its retention.
    DeliveryGone {
        merchant: MerchantId,
        id: Ulid,
    },
    /// An outbox index entry, put (`true`) or removed.
    OutboxIndex(OutboxIndex, bool),
    /// A partner's endpoint disabled by a `410`, or enabled again (`None`).
    Endpoint {
        partner: PartnerId,
        off: Option<EndpointOff>,
    },
    /// What an event adds to the report rollups; merged, never read back by the engine.
    Rollup(Box<Increment>),
    /// A payout run as it now stands.
    Payout(Box<PayoutRun>),
    /// A conversion credited to a partner (sourced or influenced): the index the partner's
    /// own reads list.
    PartnerConversion {
        partner: PartnerId,
        conversion_id: Ulid,
        merchant: MerchantId,
        txn: TxnId,
    },
    /// What a partner earned (approved minus reversed) changes by `delta` on UTC day `day`
    /// (the day of the ledger entry): summed by storage, read by payout runs.
    Earned {
        merchant: MerchantId,
        partner: PartnerId,
        currency: Currency,
        day: u32,
        delta: i64,
    },
    /// A partner's balance in one currency.
    Balance {
        merchant: MerchantId,
        partner: PartnerId,
        currency: Currency,
        balance: Balance,
    },
}

/// What the engine may read. Every read is within what the command names; no read
/// depends on a clock, a counter or the order of a hash map.
pub trait State {
    /// A storage failure; the engine passes it on and the command has no effect.
    type Error;
    fn catalog(&self) -> &Catalog;
    fn conversion(&self, merchant: &MerchantId, txn: &TxnId) -> Result<Option<ConversionRecord>, Self::Error>;
    fn click(&self, id: &Ulid) -> Result<Option<ClickRecord>, Self::Error>;
    /// What is kept of `visitor` on `link`: its last unique click and its recent clicks.
    fn visitor(&self, link: &LinkId, visitor: &[u8; 16]) -> Result<Option<VisitorRecord>, Self::Error>;
    fn pace(&self, merchant: &MerchantId, partner: &PartnerId) -> Result<Option<Pace>, Self::Error>;
    fn recent(
        &self,
        merchant: &MerchantId,
        partner: &PartnerId,
        visitor: &[u8; 16],
    ) -> Result<Option<Recent>, Self::Error>;
    fn account(&self, merchant: &MerchantId, account: &str) -> Result<Option<AccountRecord>, Self::Error>;
    fn customer(&self, merchant: &MerchantId, customer: &str) -> Result<Option<CustomerBinding>, Self::Error>;
    fn partner_month(
        &self,
        merchant: &MerchantId,
        partner: &PartnerId,
        month: u32,
    ) -> Result<Option<PartnerMonth>, Self::Error>;
    fn adjustment(&self, merchant: &MerchantId, id: &str) -> Result<Option<AdjustmentRecord>, Self::Error>;
    fn deal(&self, partner: &PartnerId, deal_id: &str) -> Result<Option<DealAnswer>, Self::Error>;
    fn balance(
        &self,
        merchant: &MerchantId,
        partner: &PartnerId,
        currency: Currency,
    ) -> Result<Option<Balance>, Self::Error>;
    fn payout(&self, merchant: &MerchantId, payout_id: &str) -> Result<Option<PayoutRun>, Self::Error>;
    /// What each partner of a merchant earned in `currency` on days up to `last_day`
    /// included (approved minus reversed), by partner.
    fn earned(
        &self,
        merchant: &MerchantId,
        currency: Currency,
        last_day: u32,
    ) -> Result<Vec<(PartnerId, i64)>, Self::Error>;
    /// The holds that end at or before `now`, soonest first, at most `limit`.
    fn due_holds(&self, now: UnixMillis, limit: usize) -> Result<Vec<Hold>, Self::Error>;
    fn ledger_head(&self) -> Result<Option<Ulid>, Self::Error>;
    fn delivery(&self, merchant: &MerchantId, id: &Ulid) -> Result<Option<Delivery>, Self::Error>;
    /// Whether a partner's endpoint is disabled, and since when.
    fn endpoint(&self, partner: &PartnerId) -> Result<Option<EndpointOff>, Self::Error>;
    /// A partner's parked deliveries, oldest first, at most `limit`.
    fn parked(&self, partner: &PartnerId, limit: usize) -> Result<Vec<(MerchantId, Ulid)>, Self::Error>;
    /// Deliveries that finished before `before`, soonest first, at most `limit`.
    fn finished_before(
        &self,
        before: UnixMillis,
        limit: usize,
    ) -> Result<Vec<(UnixMillis, MerchantId, Ulid)>, Self::Error>;
}

/// The effects of a command and its answer.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub effects: Vec<Effect>,
    pub answer: Answer,
}

/// Executes one command against `state`.
///
/// # Errors
/// Only a failed read of `state`; then nothing is to be applied.
pub fn execute<S: State + ?Sized>(state: &S, command: Command) -> Result<Outcome, S::Error> {
    let mut tx = Tx::new(state);
    let answer = match command {
        Command::Click { click, unique_window_ms, once } => {
            Answer::Click(convert::click(&mut tx, *click, unique_window_ms, once)?)
        }
        Command::Conversion(draft) => Answer::Conversion(convert::conversion(&mut tx, *draft)?),
        Command::Batch(drafts) => {
            let mut out = Vec::with_capacity(drafts.len());
            for d in drafts {
                out.push(convert::conversion(&mut tx, d)?);
            }
            Answer::Batch(out)
        }
        Command::Adjust { merchant, input, at, entropy } => {
            Answer::Adjust(money::adjust(&mut tx, &merchant, *input, at, &entropy)?)
        }
        Command::Deal(d) => {
            let (answer, replay) = b2b::register_deal(&mut tx, *d)?;
            Answer::Deal(answer, replay)
        }
        Command::Touch { merchant, account, touch } => {
            b2b::touch(&mut tx, &merchant, &account, touch)?;
            Answer::Touched
        }
        Command::Reassign { merchant, account, to, by, why, at } => {
            Answer::Reassigned(Box::new(b2b::reassign(&mut tx, &merchant, &account, to, by, why, at)?))
        }
        Command::SweepHolds { now, limit, entropy } => Answer::Swept(money::sweep(&mut tx, now, limit, &entropy)?),
        Command::Entity(op) => Answer::Entity(entity::stage(&mut tx, *op)),
        Command::Outbox(op) => Answer::Outbox(outbox::execute(&mut tx, *op)?),
        Command::Payout(op) => Answer::Payout(payout::execute(&mut tx, *op)?),
        Command::Review { merchant, txn, approve, by, note, at, entropy } => {
            Answer::Review(money::review(&mut tx, &merchant, &txn, approve, by, note, at, &entropy)?)
        }
    };
    Ok(Outcome { effects: tx.into_effects(), answer })
}
