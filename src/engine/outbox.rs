//! The outbox rules (SPEC 10): which events notify which partner, the delivery each one
//! makes (its values frozen, written in the same command as the event), the order of a
//! conversion's deliveries to a partner, and what an attempt's outcome does to a
//! delivery: delivered, retried on the schedule, dead, or parked behind a `410`.
//!
//! A conversion's deliveries form a chain: the conversion names its newest delivery, and a
//! new one made while that one is unfinished waits behind it (`next`), so a partner never
//! hears `reversed` before `created`. When a delivery finishes (delivered or dead) the one
//! behind it becomes due. The chain costs intake nothing: the conversion record is written
//! with every event anyway.

use super::tx::Tx;
use super::{Effect, Entropy, Refusal, State};
use crate::domain::clock::UnixMillis;
use crate::domain::conversion::ConversionRecord;
use crate::domain::ids::{MerchantId, PartnerId, Ulid};
use crate::domain::money::Money;
use crate::domain::outbound::{AttemptLog, Delivery, DeliveryState, EndpointOff, OutboundEvent, KEPT_ATTEMPTS};
use crate::domain::retry;

/// A command about deliveries, from the delivery worker or an admin.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum OutboxOp {
    /// The worker made an attempt; `window_ms` is the retry window of the settings.
    Attempted { merchant: MerchantId, id: Ulid, attempt: AttemptLog, window_ms: i64, entropy: Entropy },
    /// The worker found the partner's endpoint disabled when the delivery came due.
    Park { merchant: MerchantId, id: Ulid, at: UnixMillis },
    /// An admin's `:retry`: due now, a new retry round.
    Retry { merchant: MerchantId, id: Ulid, at: UnixMillis },
    /// An admin's `outbound:enable`: the endpoint is on again and up to `limit` parked
    /// deliveries are due now (the rest with the next call).
    Enable { merchant: MerchantId, partner: PartnerId, at: UnixMillis, limit: usize },
    /// Forgets finished deliveries that finished before `before`, at most `limit`.
    Prune { before: UnixMillis, limit: usize },
}

/// The engine's answer to an [`OutboxOp`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum OutboxAnswer {
    Delivery(Box<Delivery>),
    /// The attempt or park found the delivery no longer pending (a retry raced it, or it
    /// was pruned): nothing changed.
    Stale,
    /// How many parked deliveries were made due.
    Resumed(u64),
    Pruned(u64),
    Refused(Refusal),
}

/// An index entry of the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutboxIndex {
    /// Pending and due at `at`: what the worker sends.
    Due { at: UnixMillis, merchant: MerchantId, id: Ulid },
    /// Parked behind its partner's `410`.
    Parked { partner: PartnerId, merchant: MerchantId, id: Ulid },
    /// Delivered or dead at `at`: what retention prunes.
    Finished { at: UnixMillis, merchant: MerchantId, id: Ulid },
}

/// Queues the delivery an event makes for the conversion's sourced partner, when that
/// partner's `outbound.on` names the event. `commission`: the commission (created,
/// approved) or its change (rejected, reversed). The caller stores `rec` after it: it
/// names its newest delivery.
pub(super) fn notify<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    rec: &mut ConversionRecord,
    trigger: OutboundEvent,
    commission: Option<Money>,
    at: UnixMillis,
    entropy: &Entropy,
) -> Result<(), S::Error> {
    let Some(attribution) = &rec.attribution else { return Ok(()) };
    let Some(partner) = tx.catalog().partner_of(&rec.merchant_id, &attribution.partner_id) else { return Ok(()) };
    let Some(outbound) = &partner.outbound else { return Ok(()) };
    if !outbound.fires(trigger) {
        return Ok(());
    }
    let partner_id = partner.id.clone();
    let id = tx.mint(at, entropy);
    // Behind the conversion's newest delivery while that one is unfinished.
    let behind = match rec.last_delivery {
        Some(prev) => match tx.delivery(&rec.merchant_id, &prev)? {
            Some(mut p) if !p.state.finished() => {
                p.next = Some(id);
                tx.put_delivery(p);
                true
            }
            _ => false,
        },
        None => false,
    };
    rec.last_delivery = Some(id);
    let delivery = Delivery {
        id,
        merchant_id: rec.merchant_id.clone(),
        partner_id,
        trigger,
        txn_id: rec.txn_id.clone(),
        conversion_id: rec.conversion_id,
        status: rec.status,
        commission,
        created_ms: at,
        state: DeliveryState::Pending,
        due_ms: (!behind).then_some(at),
        round_start_ms: None,
        failed: 0,
        attempt_count: 0,
        attempts: Vec::new(),
        finished_ms: None,
        next: None,
    };
    if !behind {
        tx.push(Effect::OutboxIndex(OutboxIndex::Due { at, merchant: rec.merchant_id.clone(), id }, true));
    }
    tx.new_delivery(delivery);
    Ok(())
}

/// Runs an outbox command.
pub(super) fn execute<S: State + ?Sized>(tx: &mut Tx<'_, S>, op: OutboxOp) -> Result<OutboxAnswer, S::Error> {
    match op {
        OutboxOp::Attempted { merchant, id, attempt, window_ms, entropy } => {
            attempted(tx, &merchant, id, attempt, window_ms, &entropy)
        }
        OutboxOp::Park { merchant, id, at } => {
            let Some(mut d) = tx.delivery(&merchant, &id)?.filter(Delivery::is_due) else {
                return Ok(OutboxAnswer::Stale);
            };
            park(tx, &mut d, at);
            Ok(OutboxAnswer::Delivery(Box::new(d)))
        }
        OutboxOp::Retry { merchant, id, at } => retry_now(tx, &merchant, id, at),
        OutboxOp::Enable { merchant, partner, at, limit } => {
            if tx.catalog().partner_of(&merchant, &partner).is_none() {
                return Ok(OutboxAnswer::Refused(Refusal::new(
                    false,
                    "not_found",
                    None,
                    format!("merchant {merchant} has no partner {partner}"),
                )));
            }
            if tx.endpoint(&partner)?.is_some() {
                tx.push(Effect::Endpoint { partner: partner.clone(), off: None });
            }
            let mut resumed = 0;
            for (m, id) in tx.parked(&partner, limit)? {
                tx.push(Effect::OutboxIndex(
                    OutboxIndex::Parked { partner: partner.clone(), merchant: m.clone(), id },
                    false,
                ));
                if let Some(mut d) = tx.delivery(&m, &id)?.filter(|d| d.state == DeliveryState::Parked) {
                    // A new round: the time it spent parked does not count against it.
                    d.state = DeliveryState::Pending;
                    d.round_start_ms = None;
                    d.failed = 0;
                    due_at(tx, &mut d, at);
                    tx.put_delivery(d);
                    resumed += 1;
                }
            }
            Ok(OutboxAnswer::Resumed(resumed))
        }
        OutboxOp::Prune { before, limit } => {
            let mut pruned = 0;
            for (at, merchant, id) in tx.finished_before(before, limit)? {
                tx.push(Effect::OutboxIndex(OutboxIndex::Finished { at, merchant: merchant.clone(), id }, false));
                if tx.delivery(&merchant, &id)?.is_some_and(|d| d.state.finished()) {
                    tx.push(Effect::DeliveryGone { merchant, id });
                    pruned += 1;
                }
            }
            Ok(OutboxAnswer::Pruned(pruned))
        }
    }
}

/// Makes a delivery due at `at` (it was not in the due index).
fn due_at<S: State + ?Sized>(tx: &mut Tx<'_, S>, d: &mut Delivery, at: UnixMillis) {
    d.due_ms = Some(at);
    tx.push(Effect::OutboxIndex(OutboxIndex::Due { at, merchant: d.merchant_id.clone(), id: d.id }, true));
}

/// Takes a delivery out of the due index.
fn undue<S: State + ?Sized>(tx: &mut Tx<'_, S>, d: &mut Delivery) {
    if let Some(at) = d.due_ms.take() {
        tx.push(Effect::OutboxIndex(OutboxIndex::Due { at, merchant: d.merchant_id.clone(), id: d.id }, false));
    }
}

fn park<S: State + ?Sized>(tx: &mut Tx<'_, S>, d: &mut Delivery, _at: UnixMillis) {
    undue(tx, d);
    d.state = DeliveryState::Parked;
    tx.push(Effect::OutboxIndex(
        OutboxIndex::Parked { partner: d.partner_id.clone(), merchant: d.merchant_id.clone(), id: d.id },
        true,
    ));
    tx.put_delivery(d.clone());
}

/// Delivered or dead: into the finished index; the delivery waiting behind it is due.
fn finish<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    d: &mut Delivery,
    state: DeliveryState,
    at: UnixMillis,
) -> Result<(), S::Error> {
    undue(tx, d);
    d.state = state;
    d.finished_ms = Some(at);
    tx.push(Effect::OutboxIndex(OutboxIndex::Finished { at, merchant: d.merchant_id.clone(), id: d.id }, true));
    if let Some(next) = d.next {
        if let Some(mut n) = tx.delivery(&d.merchant_id, &next)? {
            if n.is_waiting() {
                due_at(tx, &mut n, at);
                tx.put_delivery(n);
            }
        }
    }
    Ok(())
}

fn attempted<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    id: Ulid,
    attempt: AttemptLog,
    window_ms: i64,
    entropy: &Entropy,
) -> Result<OutboxAnswer, S::Error> {
    let Some(mut d) = tx.delivery(merchant, &id)?.filter(Delivery::is_due) else {
        return Ok(OutboxAnswer::Stale);
    };
    // Retries count from when the attempt ended: a 10 s timeout is not half of a 5 s wait.
    let at = attempt.at_ms.saturating_add(i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX));
    let status = attempt.status;
    let retry_after = attempt.retry_after_ms.map(std::time::Duration::from_millis);
    d.attempt_count = d.attempt_count.saturating_add(1);
    d.attempts.push(attempt);
    if d.attempts.len() > KEPT_ATTEMPTS {
        let extra = d.attempts.len() - KEPT_ATTEMPTS;
        d.attempts.drain(..extra);
    }
    let round_start = *d.round_start_ms.get_or_insert(at);
    match status {
        Some(s) if (200..300).contains(&s) => finish(tx, &mut d, DeliveryState::Delivered, at)?,
        Some(410) => {
            if tx.endpoint(&d.partner_id)?.is_none() {
                tx.push(Effect::Endpoint {
                    partner: d.partner_id.clone(),
                    off: Some(EndpointOff { since_ms: at, delivery_id: d.id }),
                });
            }
            park(tx, &mut d, at);
            return Ok(OutboxAnswer::Delivery(Box::new(d)));
        }
        _ => {
            d.failed = d.failed.saturating_add(1);
            let jitter = f64::from(u32::from_be_bytes([entropy.0[0], entropy.0[1], entropy.0[2], entropy.0[3]]))
                / (f64::from(u32::MAX) + 1.0);
            let window = std::time::Duration::from_millis(u64::try_from(window_ms).unwrap_or(0));
            let failed = usize::try_from(d.failed).unwrap_or(usize::MAX);
            match retry::next_attempt(round_start, failed, at, retry_after, jitter, window) {
                Some(next) => {
                    undue(tx, &mut d);
                    due_at(tx, &mut d, next);
                }
                None => finish(tx, &mut d, DeliveryState::Dead, at)?,
            }
        }
    }
    tx.put_delivery(d.clone());
    Ok(OutboxAnswer::Delivery(Box::new(d)))
}

/// An admin's `:retry`: a delivery is due now, in a new round of the retry schedule; not
/// one waiting behind an earlier delivery, nor one parked behind a disabled endpoint.
fn retry_now<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    id: Ulid,
    at: UnixMillis,
) -> Result<OutboxAnswer, S::Error> {
    let Some(mut d) = tx.delivery(merchant, &id)? else {
        return Ok(OutboxAnswer::Refused(Refusal::new(
            false,
            "not_found",
            None,
            format!("merchant {merchant} has no delivery {id}"),
        )));
    };
    if d.is_waiting() {
        return Ok(OutboxAnswer::Refused(Refusal::new(
            true,
            "delivery_waiting",
            None,
            "this delivery waits for an earlier delivery about the same conversion to finish; retry that one".into(),
        )));
    }
    if d.state == DeliveryState::Parked && tx.endpoint(&d.partner_id)?.is_some() {
        return Ok(OutboxAnswer::Refused(Refusal::new(
            true,
            "endpoint_disabled",
            None,
            format!(
                "partner {}'s endpoint answered 410 Gone and is disabled; enable it (outbound:enable) to send its parked deliveries",
                d.partner_id
            ),
        )));
    }
    match d.state {
        DeliveryState::Parked => tx.push(Effect::OutboxIndex(
            OutboxIndex::Parked { partner: d.partner_id.clone(), merchant: d.merchant_id.clone(), id: d.id },
            false,
        )),
        DeliveryState::Delivered | DeliveryState::Dead => {
            // Sent again on its own: what came after it was released when it finished.
            if let Some(f) = d.finished_ms.take() {
                tx.push(Effect::OutboxIndex(
                    OutboxIndex::Finished { at: f, merchant: d.merchant_id.clone(), id },
                    false,
                ));
            }
        }
        DeliveryState::Pending => {}
    }
    undue(tx, &mut d);
    d.state = DeliveryState::Pending;
    d.round_start_ms = None;
    d.failed = 0;
    due_at(tx, &mut d, at);
    tx.put_delivery(d.clone());
    Ok(OutboxAnswer::Delivery(Box::new(d)))
}
