//! The one interface between tally and its storage: submit a command to the engine and
//! get its answer once its effects are kept, read the few queries the API needs, and
//! read the catalog. `http` holds an `Arc<dyn Backend>`; the RocksDB [`Store`] implements
//! it today, and a clustered backend (SPEC 14) implements the same trait.
//!
//! [`BackendExt`] adds typed calls (`convert`, `adjust`, ...) that build the command and
//! unpack the answer, for every backend alike.
//!
//! [`Store`]: crate::store::Store

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::domain::account::{AccountRecord, Touch};
use crate::domain::balance::Balance;
use crate::domain::click::ClickRecord;
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::{AdjustmentInput, ConversionInput, ConversionRecord};
use crate::domain::entities::{Merchant, Partner};
use crate::domain::ids::{MerchantId, PartnerId, TxnId, Ulid};
use crate::domain::ledger::LedgerEntry;
use crate::domain::link::Link;
use crate::domain::money::Currency;
use crate::domain::outbound::{Delivery, DeliveryState, EndpointOff};
use crate::domain::plan::Plan;
use crate::domain::rollup::{Rows, Scope, Span};
use crate::engine::{
    AdjustOutcome, Answer, Catalog, Command, ConversionDraft, ConversionOutcome, DealAnswer, DealDraft, EntityOp,
    Entropy, OutboxAnswer, OutboxOp, PayoutAnswer, PayoutOp, Refusal, ReviewOutcome, Saved,
};
use crate::metrics::StorageStats;
use crate::signing::WebhookSecret;

/// A boxed future, so that the trait can be used as `dyn Backend`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Failures of the storage behind a backend. Every one of them answers `503` upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the storage writer has stopped")]
    Closed,
}

/// An entity write that failed: storage, or a refusal on its merits.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}", .0.detail)]
    Refused(Refusal),
}

/// A stored conversion that is durable, kept by the backend to answer retries without
/// asking the engine; `rendered` is a slot the caller may fill with its rendering of it.
#[derive(Debug)]
pub struct Settled {
    pub record: ConversionRecord,
    pub rendered: OnceLock<Bytes>,
}

/// Storage as the rest of tally sees it.
pub trait Backend: Send + Sync + 'static {
    /// Executes a command in the engine and keeps its effects; answers once they are as
    /// durable as the command promises (conversions and money: fsynced; clicks: written).
    fn submit(&self, command: Command) -> BoxFuture<'_, Result<Answer, StoreError>>;

    /// The conversion `(merchant, txn)` when the backend holds it durable and unchanged
    /// in memory; `None` means "ask the engine".
    fn settled_conversion(&self, merchant: &MerchantId, txn: &TxnId) -> Option<Arc<Settled>>;

    /// The configuration entities as of the last committed entity write.
    fn catalog(&self) -> Arc<Catalog>;

    /// The per-installation salt of visitor fingerprints.
    fn visitor_salt(&self) -> &[u8];

    /// False while writes fail.
    fn is_ready(&self) -> bool;

    fn conversion<'a>(
        &'a self,
        merchant: &'a MerchantId,
        txn: &'a TxnId,
    ) -> BoxFuture<'a, Result<Option<ConversionRecord>, StoreError>>;

    /// Every ledger entry of one partner, oldest first.
    fn ledger_entries<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partner: &'a PartnerId,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>>;

    /// The conversions crediting a partner (sourced or influenced) with ids in
    /// `from..until`, oldest first, at most `limit`.
    fn partner_conversions<'a>(
        &'a self,
        partner: &'a PartnerId,
        from: Ulid,
        until: Ulid,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ConversionRecord>, StoreError>>;

    /// A merchant's conversions in open fraud review with ids after `after`, oldest first,
    /// at most `limit`.
    fn open_reviews<'a>(
        &'a self,
        merchant: &'a MerchantId,
        after: Option<Ulid>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<ConversionRecord>, StoreError>>;

    /// A payout run of a merchant.
    fn payout<'a>(
        &'a self,
        merchant: &'a MerchantId,
        payout_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<crate::domain::payout::PayoutRun>, StoreError>>;

    /// A partner's balances, one per currency it was ever credited in (SPEC 9.1).
    fn balances<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partner: &'a PartnerId,
    ) -> BoxFuture<'a, Result<Vec<(Currency, Balance)>, StoreError>>;

    /// Every ledger entry of a conversion: its sourced partner's and its influencers'.
    fn ledger_for_conversion<'a>(
        &'a self,
        rec: &'a ConversionRecord,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>>;

    fn account<'a>(
        &'a self,
        merchant: &'a MerchantId,
        account: &'a str,
    ) -> BoxFuture<'a, Result<Option<AccountRecord>, StoreError>>;

    /// A click of `merchant` by id (in cluster mode, read from that merchant's partition only).
    fn click<'a>(
        &'a self,
        merchant: &'a MerchantId,
        id: &'a Ulid,
    ) -> BoxFuture<'a, Result<Option<ClickRecord>, StoreError>>;

    /// Figures for `/metrics`.
    fn stats(&self) -> StorageStats;

    /// A delivery of a merchant.
    fn delivery<'a>(
        &'a self,
        merchant: &'a MerchantId,
        id: &'a Ulid,
    ) -> BoxFuture<'a, Result<Option<Delivery>, StoreError>>;

    /// A merchant's deliveries matching `filter`, oldest first, and the id to continue
    /// after when there may be more.
    fn deliveries<'a>(
        &'a self,
        merchant: &'a MerchantId,
        filter: DeliveryFilter,
    ) -> BoxFuture<'a, Result<DeliveryPage, StoreError>>;

    /// Due deliveries with `from <= due_at <= now`, soonest first, at most `limit`:
    /// `(due, merchant, id)`. `from` lets the worker skip what it has already taken (a
    /// queue's front is full of deleted keys that a scan would otherwise walk).
    fn due_deliveries(
        &self,
        from: UnixMillis,
        now: UnixMillis,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<DueDelivery>, StoreError>>;

    /// Whether a partner's endpoint is disabled by a `410`.
    fn endpoint<'a>(&'a self, partner: &'a PartnerId) -> BoxFuture<'a, Result<Option<EndpointOff>, StoreError>>;

    /// The outbox backlog, for `/metrics`.
    fn outbox_gauges(&self) -> BoxFuture<'_, Result<OutboxGauges, StoreError>>;

    /// Resolves when deliveries may have become due (a write staged one); the worker
    /// also polls, so a missed wake-up only delays.
    fn outbox_woken(&self) -> BoxFuture<'_, ()>;

    /// Report rollups of `scope` summed over each span, by the span's group, partner and
    /// currency (SPEC 5.5: reports read these, never the events).
    fn rollups<'a>(
        &'a self,
        merchant: &'a MerchantId,
        scope: Scope,
        spans: Vec<(u32, Span)>,
    ) -> BoxFuture<'a, Result<Rows, StoreError>>;

    /// When each partner's first attributed conversion occurred, if it has one.
    fn first_conversions<'a>(
        &'a self,
        merchant: &'a MerchantId,
        partners: Vec<PartnerId>,
    ) -> BoxFuture<'a, Result<Vec<Option<UnixMillis>>, StoreError>>;

    /// Streams the ledger entries `query` selects, in entry order, from one snapshot, a
    /// chunk at a time; a storage error is the last item. Dropping the receiver stops it.
    fn ledger_export(&self, query: LedgerQuery) -> tokio::sync::mpsc::Receiver<Result<Vec<LedgerEntry>, StoreError>>;

    /// A consistent online copy of the data in `dir` (which must not exist). Blocks.
    ///
    /// # Errors
    /// When the copy cannot be made.
    fn backup_to(&self, dir: &Path) -> Result<(), StoreError>;
}

/// What the ledger export reads: one merchant, optionally one partner, entries whose id
/// is after `after` and whose id time is in `from..until`.
#[derive(Debug, Clone)]
pub struct LedgerQuery {
    pub merchant: MerchantId,
    pub partner: Option<PartnerId>,
    pub from: UnixMillis,
    pub until: UnixMillis,
    pub after: Option<Ulid>,
}

/// A page of deliveries, and the id to continue after when there may be more.
pub type DeliveryPage = (Vec<Delivery>, Option<Ulid>);

/// A due delivery in the outbox: when it is due, its merchant and its id.
pub type DueDelivery = (UnixMillis, MerchantId, Ulid);

/// Which deliveries a listing wants.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub partner: Option<PartnerId>,
    pub state: Option<DeliveryState>,
    pub after: Option<Ulid>,
    pub limit: usize,
}

/// The outbox backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxGauges {
    /// Deliveries in the due index (sent now or retried later).
    pub pending: u64,
    /// When the oldest of them was created.
    pub oldest_created_ms: Option<UnixMillis>,
    /// Deliveries parked behind a `410`.
    pub parked: u64,
}

fn unexpected(answer: &Answer) -> StoreError {
    StoreError::Corrupt(format!("the engine answered {answer:?} to another command"))
}

/// Typed calls over [`Backend::submit`].
pub trait BackendExt: Backend {
    /// Records a click; the answer carries its `unique` flag.
    fn record_click(
        &self,
        click: ClickRecord,
        unique_window_ms: i64,
    ) -> impl Future<Output = Result<ClickRecord, StoreError>> + Send {
        let command = Command::Click { click: Box::new(click), unique_window_ms, once: false };
        async move {
            match self.submit(command).await? {
                // The writer has dropped the effect sharing it: no copy.
                Answer::Click(c) => Ok(std::sync::Arc::unwrap_or_clone(c)),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Dedupes, attributes and stores a conversion; `Created` once durable.
    fn convert(
        &self,
        merchant: MerchantId,
        input: ConversionInput,
        received_ms: UnixMillis,
    ) -> impl Future<Output = Result<ConversionOutcome, StoreError>> + Send {
        let draft = ConversionDraft { merchant, input, received_ms, entropy: Entropy::random() };
        async move {
            match self.submit(Command::Conversion(Box::new(draft))).await? {
                Answer::Conversion(o) => Ok(o),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Many conversions in one all-or-nothing command; a `txn_id` repeated inside the
    /// batch is a duplicate of its first occurrence.
    fn convert_batch(
        &self,
        merchant: MerchantId,
        inputs: Vec<ConversionInput>,
        received_ms: UnixMillis,
    ) -> impl Future<Output = Result<Vec<ConversionOutcome>, StoreError>> + Send {
        let drafts = inputs
            .into_iter()
            .map(|input| ConversionDraft { merchant: merchant.clone(), input, received_ms, entropy: Entropy::random() })
            .collect();
        async move {
            match self.submit(Command::Batch(drafts)).await? {
                Answer::Batch(o) => Ok(o),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// A refund, chargeback, approval or rejection, idempotent by its id.
    fn adjust(
        &self,
        merchant: MerchantId,
        input: AdjustmentInput,
        at: UnixMillis,
    ) -> impl Future<Output = Result<AdjustOutcome, StoreError>> + Send {
        let command = Command::Adjust { merchant, input: Box::new(input), at, entropy: Entropy::random() };
        async move {
            match self.submit(command).await? {
                Answer::Adjust(o) => Ok(o),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Registers a deal; `true` with the answer when it replays an earlier registration.
    fn register_deal(&self, draft: DealDraft) -> impl Future<Output = Result<(DealAnswer, bool), StoreError>> + Send {
        async move {
            match self.submit(Command::Deal(Box::new(draft))).await? {
                Answer::Deal(a, replay) => Ok((a, replay)),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Records a CRM touch on a normalized account.
    fn touch(
        &self,
        merchant: MerchantId,
        account: String,
        touch: Touch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move {
            match self.submit(Command::Touch { merchant, account, touch }).await? {
                Answer::Touched => Ok(()),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Makes `to` the account's source of record, audited with who, why and when.
    fn reassign(
        &self,
        merchant: MerchantId,
        account: String,
        to: PartnerId,
        by: String,
        why: String,
        at: UnixMillis,
    ) -> impl Future<Output = Result<AccountRecord, StoreError>> + Send {
        async move {
            match self.submit(Command::Reassign { merchant, account, to, by, why, at }).await? {
                Answer::Reassigned(a) => Ok(*a),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Approves the conversions whose hold ended by `now`; returns how many.
    fn sweep_holds(&self, now: UnixMillis) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move {
            let command = Command::SweepHolds { now, limit: crate::engine::SWEEP_LIMIT, entropy: Entropy::random() };
            match self.submit(command).await? {
                Answer::Swept(n) => Ok(n),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// An outbox command (attempt, park, retry, enable, prune).
    fn outbox(&self, op: OutboxOp) -> impl Future<Output = Result<OutboxAnswer, StoreError>> + Send {
        async move {
            match self.submit(Command::Outbox(Box::new(op))).await? {
                Answer::Outbox(a) => Ok(a),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// A payout run, or a line's confirmation.
    fn payout_op(&self, op: PayoutOp) -> impl Future<Output = Result<PayoutAnswer, StoreError>> + Send {
        async move {
            match self.submit(Command::Payout(Box::new(op))).await? {
                Answer::Payout(a) => Ok(a),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// An admin's decision on a conversion's fraud review.
    #[allow(clippy::too_many_arguments)] // the conversion, the decision, who and why, and when
    fn review(
        &self,
        merchant: MerchantId,
        txn: TxnId,
        approve: bool,
        by: String,
        note: Option<String>,
        at: UnixMillis,
    ) -> impl Future<Output = Result<ReviewOutcome, StoreError>> + Send {
        let command = Command::Review { merchant, txn, approve, by, note, at, entropy: Entropy::random() };
        async move {
            match self.submit(command).await? {
                Answer::Review(o) => Ok(o),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Creates or updates an entity.
    fn apply(&self, op: EntityOp) -> impl Future<Output = Result<Saved, WriteError>> + Send {
        async move {
            match self.submit(Command::Entity(Box::new(op))).await? {
                Answer::Entity(r) => r.map_err(WriteError::Refused),
                other => Err(WriteError::Store(unexpected(&other))),
            }
        }
    }

    fn put_merchant(
        &self,
        merchant: Merchant,
        secret: WebhookSecret,
    ) -> impl Future<Output = Result<Saved, WriteError>> + Send {
        self.apply(EntityOp::Merchant { merchant, secret, token_hash: None })
    }

    fn put_partner(
        &self,
        partner: Partner,
        secret: WebhookSecret,
    ) -> impl Future<Output = Result<Saved, WriteError>> + Send {
        self.apply(EntityOp::Partner { partner, secret })
    }

    fn put_link(&self, link: Link) -> impl Future<Output = Result<Saved, WriteError>> + Send {
        self.apply(EntityOp::Link(link))
    }

    fn put_plan(&self, plan: Plan) -> impl Future<Output = Result<Saved, WriteError>> + Send {
        self.apply(EntityOp::Plan(plan))
    }
}

impl<B: Backend + ?Sized> BackendExt for B {}
