//! The delivery worker (SPEC 10): off the request path, it sends due deliveries and
//! tells the engine what each attempt got. The engine decides what follows (delivered,
//! the next retry, dead, parked); the worker only sends.
//!
//! - It reads due deliveries from the outbox's due index when a write woke it and at
//!   least every `poll_interval_ms` (retries come due with time, not with writes).
//! - Bounded: at most `concurrency` attempts in flight, at most `per_partner` to one
//!   partner, and at most four times `concurrency` deliveries held in memory; the rest
//!   wait on disk.
//! - A conversion's deliveries go in order: the engine makes a delivery due only once the
//!   one before it about the same conversion has finished.
//! - At-least-once: a delivery leaves the due index only when the engine has recorded
//!   its attempt, so after a crash every delivery in flight is sent again, with the same
//!   `webhook-id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method};
use tokio::sync::{watch, Semaphore};

use super::client::{Attempt, Client, Outgoing};
use crate::backend::{Backend, BackendExt, StoreError};
use crate::config::OutboundSettings;
use crate::domain::clock::{format_rfc3339, Clock, UnixMillis};
use crate::domain::ids::{MerchantId, PartnerId, Ulid};
use crate::domain::outbound::{
    attributing_click, expand, AttemptLog, Delivery, DeliveryState, DeliveryValues, OutboundMethod,
};
use crate::engine::{Catalog, Entropy, OutboxAnswer, OutboxOp};
use crate::metrics::Metrics;

/// Most deliveries a retention pass deletes; the next pass goes on.
const PRUNE_LIMIT: usize = 10_000;
/// How far before the last scan's `now` the next scan of the due index starts.
const SCAN_SLACK_MS: i64 = 5_000;
/// How often the due index is scanned from its start.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(10);
/// How often the backlog gauges are read and retention runs.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

/// What the worker needs; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    pub backend: Arc<dyn Backend>,
    pub client: Client,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub settings: OutboundSettings,
}

/// What the worker holds in memory: deliveries in flight and each partner's slots.
#[derive(Default)]
struct Held {
    /// Deliveries being sent, and when each was due (they stay in the due index meanwhile).
    in_flight: HashMap<Ulid, UnixMillis>,
    partners: HashMap<PartnerId, Arc<Semaphore>>,
}

impl Worker {
    /// Sends due deliveries until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let held = Arc::new(Mutex::new(Held::default()));
        let global = Arc::new(Semaphore::new(self.settings.concurrency));
        let max_held = self.settings.concurrency.saturating_mul(4);
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let (finished_tx, mut finished) = tokio::sync::mpsc::unbounded_channel::<()>();
        let housekeeping = tokio::spawn(self.clone().housekeeping());
        // Where the next scan of the due index starts. Deliveries are due from when their
        // event was received, so a scan may start a little before the last one's `now`
        // (SCAN_SLACK covers a request received before it and committed after); a full
        // scan every FULL_SCAN_EVERY catches anything else (a clock that went back).
        let mut floor = i64::MIN;
        let mut full_scan = tokio::time::Instant::now();
        loop {
            let holding = lock(&held).in_flight.len();
            let room = max_held.saturating_sub(holding);
            if room > 0 {
                if full_scan.elapsed() >= FULL_SCAN_EVERY {
                    floor = i64::MIN;
                    full_scan = tokio::time::Instant::now();
                }
                let now = self.clock.now_ms();
                match self.backend.due_deliveries(floor, now, holding + room).await {
                    Ok(due) => {
                        let complete = due.len() < holding + room;
                        let mut untaken = None;
                        for (at, merchant, id) in due {
                            let mut h = lock(&held);
                            if h.in_flight.contains_key(&id) {
                                continue;
                            }
                            if h.in_flight.len() >= max_held {
                                untaken.get_or_insert(at);
                                break;
                            }
                            h.in_flight.insert(id, at);
                            drop(h);
                            let (w, held, global, tx) =
                                (self.clone(), Arc::clone(&held), Arc::clone(&global), finished_tx.clone());
                            tokio::spawn(async move {
                                w.deliver(&merchant, id, &held, global).await;
                                lock(&held).in_flight.remove(&id);
                                let _ = tx.send(());
                            });
                        }
                        // The next scan starts at the first delivery still to take: the
                        // earliest one in flight or not taken, or (when this scan took all
                        // that was due) a little before `now`. What finished before it is
                        // deleted keys that the scan does not walk again.
                        let earliest_held = lock(&held).in_flight.values().min().copied();
                        floor = match (untaken, complete) {
                            (Some(at), _) => earliest_held.map_or(at, |h| h.min(at)),
                            (None, true) => {
                                let slack = now.saturating_sub(SCAN_SLACK_MS);
                                earliest_held.map_or(slack, |h| h.min(slack))
                            }
                            (None, false) => earliest_held.unwrap_or(floor),
                        };
                    }
                    Err(e) => tracing::warn!(error = %e, "reading due deliveries failed; retrying"),
                }
            }
            // Full: only a finished attempt makes room, so a write that made a delivery due
            // need not wake the worker (the writer's wake-up then costs it one atomic).
            let full = lock(&held).in_flight.len() >= max_held;
            tokio::select! {
                () = self.backend.outbox_woken(), if !full => {}
                () = tokio::time::sleep(poll) => {}
                // A finished attempt frees room, and may have made the next delivery due.
                Some(()) = finished.recv() => {}
                _ = shutdown.changed() => break,
            }
            // Several finished at once: one scan covers them all.
            while finished.try_recv().is_ok() {}
        }
        housekeeping.abort();
    }

    /// One attempt of one due delivery, and the engine told what it got.
    async fn deliver(&self, merchant: &MerchantId, id: Ulid, held: &Mutex<Held>, global: Arc<Semaphore>) {
        let d = match self.backend.delivery(merchant, &id).await {
            Ok(Some(d)) if d.is_due() => d,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, delivery = %id, "reading a delivery failed; it stays due");
                return;
            }
        };
        match self.backend.endpoint(&d.partner_id).await {
            Ok(Some(_)) => {
                let at = self.clock.now_ms();
                if self.record(OutboxOp::Park { merchant: merchant.clone(), id, at }).await.is_some() {
                    self.metrics.outbound_deliveries.with_label_values(&["parked"]).inc();
                }
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, delivery = %id, "reading the partner's endpoint failed; it stays due");
                return;
            }
        }
        let partner_slots = {
            let mut h = lock(held);
            let per = self.settings.per_partner;
            Arc::clone(h.partners.entry(d.partner_id.clone()).or_insert_with(|| Arc::new(Semaphore::new(per))))
        };
        let Ok(partner_slot) = Arc::clone(&partner_slots).acquire_owned().await else { return };
        let Ok(slot) = global.acquire_owned().await else { return };
        let values = match values_of(self.backend.as_ref(), &d).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                tracing::error!(delivery = %id, txn = %d.txn_id, "a delivery's conversion is missing; it stays due");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, delivery = %id, "reading a delivery's conversion failed; it stays due");
                return;
            }
        };
        let catalog = self.backend.catalog();
        let at = self.clock.now_ms();
        let log = match outgoing(&catalog, &d, &values, at) {
            Ok(out) => attempt_log(at, self.client.send(&out).await),
            Err(why) => AttemptLog {
                at_ms: at,
                duration_ms: 0,
                status: None,
                error: Some(why),
                response: String::new(),
                retry_after_ms: None,
            },
        };
        self.metrics.outbound_attempt_duration.observe(log.duration_ms as f64 / 1000.0);
        let window_ms = i64::try_from(self.settings.retry_window_hours * 3_600_000).unwrap_or(i64::MAX);
        let op =
            OutboxOp::Attempted { merchant: merchant.clone(), id, attempt: log, window_ms, entropy: Entropy::random() };
        if let Some(after) = self.record(op).await {
            let outcome = match after.state {
                DeliveryState::Delivered => "delivered",
                DeliveryState::Dead => "dead",
                DeliveryState::Parked => "parked",
                DeliveryState::Pending => "failed",
            };
            self.metrics.outbound_deliveries.with_label_values(&[outcome]).inc();
        }
        drop((slot, partner_slot, partner_slots));
        // Forget the partner's slots once nobody holds them.
        let mut h = lock(held);
        if h.partners.get(&d.partner_id).is_some_and(|s| Arc::strong_count(s) == 1) {
            h.partners.remove(&d.partner_id);
        }
    }

    /// Submits an outbox command; the delivery after it, when it changed one.
    async fn record(&self, op: OutboxOp) -> Option<Delivery> {
        match self.backend.outbox(op).await {
            Ok(OutboxAnswer::Delivery(d)) => Some(*d),
            Ok(_) => None,
            Err(e) => {
                // The delivery stays due: it is sent again (at-least-once).
                tracing::warn!(error = %e, "recording a delivery attempt failed; it will be sent again");
                None
            }
        }
    }

    /// Every few seconds: the backlog gauges, and retention of finished deliveries.
    async fn housekeeping(self) {
        let retention_ms = i64::try_from(self.settings.retention_days * 86_400_000).unwrap_or(i64::MAX);
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = self.clock.now_ms();
            match self.backend.outbox_gauges().await {
                Ok(g) => {
                    let m = &self.metrics;
                    m.outbound_pending.set(i64::try_from(g.pending).unwrap_or(i64::MAX));
                    m.outbound_parked.set(i64::try_from(g.parked).unwrap_or(i64::MAX));
                    m.outbound_oldest_age.set(g.oldest_created_ms.map_or(0, |c| (now - c).max(0) / 1000));
                }
                Err(e) => tracing::warn!(error = %e, "reading the outbox backlog failed"),
            }
            let prune = OutboxOp::Prune { before: now.saturating_sub(retention_ms), limit: PRUNE_LIMIT };
            match self.backend.outbox(prune).await {
                Ok(OutboxAnswer::Pruned(n)) if n > 0 => {
                    tracing::info!(deleted = n, "finished deliveries past retention deleted")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "deleting finished deliveries failed; retrying later"),
            }
        }
    }
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the attempt log keeps of an attempt.
fn attempt_log(at: UnixMillis, attempt: Attempt) -> AttemptLog {
    let duration_ms = u64::try_from(attempt.duration.as_millis()).unwrap_or(u64::MAX);
    match attempt.result {
        Ok(answer) => {
            let retry_after_ms = answer
                .retry_after
                .filter(|_| matches!(answer.status, 429 | 503))
                .and_then(|v| crate::domain::retry::parse_retry_after(&v, at / 1000))
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            AttemptLog {
                at_ms: at,
                duration_ms,
                status: Some(answer.status),
                error: None,
                response: String::from_utf8_lossy(&answer.head).into_owned(),
                retry_after_ms,
            }
        }
        Err(failure) => AttemptLog {
            at_ms: at,
            duration_ms,
            status: None,
            error: Some(failure.to_string()),
            response: String::new(),
            retry_after_ms: None,
        },
    }
}

/// A delivery's values as JSON, as the webhook's `data` and the admin view's `values`
/// show them (the webhook adds `partner_id`); subs as `{"sub1": ...}`, only those set.
pub fn values_json(v: &DeliveryValues) -> serde_json::Map<String, serde_json::Value> {
    let mut subs = serde_json::Map::new();
    for (i, s) in v.subs.iter().enumerate() {
        if let Some(s) = s {
            subs.insert(format!("sub{}", i + 1), serde_json::Value::String(s.clone()));
        }
    }
    use serde_json::json;
    [
        ("conversion_id", json!(v.conversion_id.to_string())),
        ("txn_id", json!(v.txn_id)),
        ("event", json!(v.event)),
        ("amount", json!(v.amount)),
        ("currency", json!(v.currency)),
        ("commission", json!(v.commission)),
        ("commission_currency", json!(v.commission_currency)),
        ("status", json!(v.status)),
        ("click_id", json!(v.click_id)),
        ("link_id", json!(v.link_id)),
        ("subs", serde_json::Value::Object(subs)),
        ("occurred_at", json!(format_rfc3339(v.occurred_ms))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The values a delivery sends: its own, and its conversion's facts; `None` when the
/// conversion is not stored (it always is: deliveries are written with it).
///
/// # Errors
/// Storage failures.
pub async fn values_of(backend: &dyn Backend, d: &Delivery) -> Result<Option<DeliveryValues>, StoreError> {
    let Some(rec) = backend.conversion(&d.merchant_id, &d.txn_id).await? else { return Ok(None) };
    let click = match attributing_click(&rec) {
        Some(id) => backend.click(&d.merchant_id, &id).await?,
        None => None,
    };
    Ok(Some(DeliveryValues::of(d, &rec, click.as_ref())))
}

/// The POST webhook's JSON body: the event and its values.
pub fn webhook_body(d: &Delivery, v: &DeliveryValues) -> Bytes {
    let mut data = values_json(v);
    data.insert("partner_id".into(), serde_json::Value::String(v.partner_id.clone()));
    let body = serde_json::json!({
        "type": format!("conversion.{}", d.trigger.as_str()),
        "timestamp": format_rfc3339(d.created_ms),
        "data": data,
    });
    Bytes::from(body.to_string())
}

/// The request of one attempt, to the partner's current endpoint; why there is none
/// when the partner no longer has one.
pub fn outgoing(catalog: &Catalog, d: &Delivery, v: &DeliveryValues, now: UnixMillis) -> Result<Outgoing, String> {
    let outbound = catalog
        .partner_of(&d.merchant_id, &d.partner_id)
        .and_then(|p| p.outbound.as_ref())
        .ok_or_else(|| "not_configured: the partner has no outbound endpoint now".to_string())?;
    let webhook_id = d.webhook_id();
    match outbound.method {
        OutboundMethod::Get => {
            let conversion_id = v.conversion_id.to_string();
            let occurred_at = format_rfc3339(v.occurred_ms);
            let values = [
                ("click_id", v.click_id.as_deref()),
                ("txn_id", Some(v.txn_id.as_str())),
                ("event", Some(v.event.as_str())),
                ("amount", v.amount.as_deref()),
                ("currency", v.currency.as_deref()),
                ("commission", v.commission.as_deref()),
                ("status", Some(v.status.as_str())),
                ("sub1", v.subs[0].as_deref()),
                ("sub2", v.subs[1].as_deref()),
                ("sub3", v.subs[2].as_deref()),
                ("sub4", v.subs[3].as_deref()),
                ("sub5", v.subs[4].as_deref()),
                ("conversion_id", Some(conversion_id.as_str())),
                ("partner_id", Some(v.partner_id.as_str())),
                ("link_id", v.link_id.as_deref()),
                ("occurred_at", Some(occurred_at.as_str())),
                ("webhook_id", Some(webhook_id.as_str())),
            ];
            let url = url::Url::parse(&expand(&outbound.url, &values))
                .map_err(|e| format!("invalid_url: the expanded URL does not parse: {e}"))?;
            Ok(Outgoing { method: Method::GET, url, headers: Vec::new(), body: Bytes::new() })
        }
        OutboundMethod::Post => {
            let url = url::Url::parse(&outbound.url).map_err(|e| format!("invalid_url: {e}"))?;
            let body = webhook_body(d, v);
            let ts = now.div_euclid(1000);
            let secrets = catalog.partner_secrets.get(&d.partner_id);
            let keys: Vec<&[u8]> = secrets.map(|s| s.active_keys(now).collect()).unwrap_or_default();
            if keys.is_empty() {
                return Err("no_secret: the partner has no signing secret".into());
            }
            let signature = crate::signing::sign_all(keys, &webhook_id, ts, &body);
            let value = |s: String| HeaderValue::try_from(s).map_err(|e| format!("header: {e}"));
            let headers = vec![
                (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (header::HeaderName::from_static("webhook-id"), value(webhook_id)?),
                (header::HeaderName::from_static("webhook-timestamp"), value(ts.to_string())?),
                (header::HeaderName::from_static("webhook-signature"), value(signature)?),
            ];
            Ok(Outgoing { method: Method::POST, url, headers, body })
        }
    }
}
