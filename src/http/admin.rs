//! The admin listener: the admin API behind the bearer token, and the unauthenticated
//! operational endpoints (`/metrics`, `/healthz`, `/readyz`).

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use secrecy::ExposeSecret;
use serde::Serialize;
use subtle::ConstantTimeEq;

use super::problem::ApiError;
use super::views::{ConversionView, LedgerEntryView, PlanView};
use super::{json, parse_json, read_body, replayed, require_json, Body, Ctx, Route};
use crate::backend::{BackendExt, DeliveryFilter};
use crate::domain::account::{check_text_id, normalize_account, AccountRecord};
use crate::domain::clock::format_rfc3339;
use crate::domain::entities::{MerchantBody, Partner, PartnerBody};
use crate::domain::ids::{LinkId, MerchantId, PartnerId, PlanId, TxnId, Ulid};
use crate::domain::link::{Link, LinkBody};
use crate::domain::money::Money;
use crate::domain::outbound::{Delivery, DeliveryState, DeliveryValues};
use crate::domain::plan::PlanBody;
use crate::domain::FieldError;
use crate::engine::{Catalog, EntityOp, OutboxAnswer, OutboxOp, ReviewOutcome, Saved};
use crate::signing::WebhookSecret;

type Answer = (Route, Result<Response<Body>, ApiError>);

pub(super) async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["metrics"] if method == Method::GET => (Route::Metrics, Ok(metrics(ctx))),
        ["healthz"] if method == Method::GET => {
            (Route::Health, Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))))
        }
        ["readyz"] if method == Method::GET => (Route::Ready, Ok(ready(ctx))),
        ["metrics"] => (Route::Metrics, Err(ApiError::MethodNotAllowed)),
        ["healthz"] => (Route::Health, Err(ApiError::MethodNotAllowed)),
        ["readyz"] => (Route::Ready, Err(ApiError::MethodNotAllowed)),
        ["admin", "v1", "backups"] => {
            if let Err(e) = authorize(ctx, &req) {
                return (Route::AdminBackup, Err(e));
            }
            let answer = if method == Method::POST { backup(ctx, req).await } else { Err(ApiError::MethodNotAllowed) };
            (Route::AdminBackup, answer)
        }
        ["admin", "ui"] | ["admin", "ui", _] => {
            let name = segments.get(2).copied().unwrap_or("");
            let answer = match super::ui::asset(name) {
                Some(resp) if method == Method::GET => Ok(resp),
                Some(_) => Err(ApiError::MethodNotAllowed),
                None => Err(ApiError::NotFound),
            };
            (Route::AdminUi, answer)
        }
        ["admin", "v1", "merchants", rest @ ..] => {
            let route = route_of(rest);
            if let Err(e) = authorize(ctx, &req) {
                return (route, Err(e));
            }
            (route, admin(ctx, method, rest, req).await)
        }
        _ => (Route::NotFound, Err(ApiError::NotFound)),
    }
}

/// `GET /admin/v1/merchants/{m}/conversions/{txn_id}`.
#[derive(Serialize)]
struct AdminConversionView<'a> {
    conversion: ConversionView<'a>,
    keys: &'a crate::domain::conversion::AttributionKeys,
    received_at: String,
    approve_at: Option<String>,
    refunded: Option<String>,
    status_history: Vec<serde_json::Value>,
    ledger: Vec<LedgerEntryView>,
}

fn route_of(rest: &[&str]) -> Route {
    match rest {
        [_] => Route::AdminMerchant,
        [_, "secrets:rotate"] => Route::AdminSecretRotate,
        [_, "postback-token:rotate"] => Route::AdminTokenRotate,
        [_, "partners", _] => Route::AdminPartner,
        [_, "links", _] => Route::AdminLink,
        [_, "plans", _] => Route::AdminPlan,
        [_, "conversions"] => Route::AdminConversions,
        [_, "conversions", t] if t.ends_with(":review") => Route::AdminReview,
        [_, "conversions", _] => Route::AdminConversion,
        [_, "accounts", a] if a.ends_with(":reassign") => Route::AdminReassign,
        [_, "accounts", _] => Route::AdminAccount,
        [_, "deliveries"] => Route::AdminDeliveries,
        [_, "deliveries", d] if d.ends_with(":retry") => Route::AdminDeliveryRetry,
        [_, "deliveries", _] => Route::AdminDelivery,
        [_, "partners", _, "outbound:enable"] => Route::AdminOutboundEnable,
        [_, "partners", _, "secrets:rotate"] => Route::AdminPartnerSecretRotate,
        [_, "partners", _, "balance"] => Route::AdminPartnerBalance,
        [_, "payouts"] => Route::AdminPayouts,
        [_, "payouts", _] => Route::AdminPayout,
        [_, "payouts", _, "lines", l] if l.ends_with(":paid") || l.ends_with(":failed") => Route::AdminPayoutLine,
        [_, "partners", _, "statements", _] => Route::AdminStatement,
        [_, "reports", "partners"] => Route::AdminReportPartners,
        [_, "reports", "program"] => Route::AdminReportProgram,
        [_, "ledger"] => Route::AdminLedger,
        _ => Route::NotFound,
    }
}

/// The body of `POST …/conversions/{txn_id}:review`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    decision: ReviewDecision,
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum ReviewDecision {
    Approve,
    Reject,
}

/// Most conversions in one page of the review list.
const MAX_REVIEW_PAGE: usize = 500;

/// A list's `after`: the id its page starts after.
fn after_param(value: &str) -> Result<Ulid, ApiError> {
    Ulid::parse(value).map_err(|e| ApiError::InvalidQuery(format!("after: {e}")))
}

/// A list's `limit`: 1 to `max`.
fn limit_param(value: &str, max: usize) -> Result<usize, ApiError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| ApiError::InvalidQuery(format!("limit must be 1..{max}")))
}

/// `review=open` (the only list there is), `after` and `limit`.
fn review_query(query: &str) -> Result<(Option<Ulid>, usize), ApiError> {
    let bad = |d: String| ApiError::InvalidQuery(d);
    let (mut after, mut limit, mut review) = (None, 100, false);
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "review" if value == "open" => review = true,
            "review" => return Err(bad(format!("review must be open, not {value:?}"))),
            "after" => after = Some(after_param(&value)?),
            "limit" => limit = limit_param(&value, MAX_REVIEW_PAGE)?,
            other => return Err(bad(format!("unknown parameter {other:?}; known: review, after, limit"))),
        }
    }
    if !review {
        return Err(bad("review=open is required: the list shows conversions in open fraud review".into()));
    }
    Ok((after, limit))
}

/// The body of `POST /admin/v1/backups`: none, or an empty JSON object.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupBody {}

/// `POST /admin/v1/backups`: a named backup in `backup.dir`, taken while tally serves.
async fn backup(ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    require_json(&parts.headers)?;
    let bytes = read_body(ctx, &parts.headers, body, 1024).await?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        let BackupBody {} = parse_json(&bytes)?;
    }
    let store = ctx.backend.clone();
    let (data_dir, dir, keep) =
        (ctx.settings.data_dir.clone(), ctx.settings.backup.dir.clone(), ctx.settings.backup.keep);
    let now = ctx.clock.now_ms();
    let taken = tokio::task::spawn_blocking(move || crate::backup::take_named(&*store, &data_dir, &dir, keep, now))
        .await
        .map_err(|_| ApiError::Internal)?;
    match taken {
        Ok(info) => {
            tracing::info!(path = %info.path.display(), bytes = info.bytes, "backup taken");
            Ok(json(StatusCode::CREATED, &info))
        }
        Err(crate::backup::BackupError::Store(e)) => Err(ApiError::Storage(e)),
        Err(e) => Err(ApiError::Storage(crate::store::StoreError::Io(e.to_string()))),
    }
}

fn authorize(ctx: &Ctx, req: &Request<Incoming>) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = ctx.admin_token.expose_secret().as_bytes();
    // ct_eq on slices of different lengths is false without comparing contents.
    if bool::from(given.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(ApiError::AdminUnauthorized)
    }
}

fn metrics(ctx: &Ctx) -> Response<Body> {
    ctx.metrics.set_storage(ctx.backend.stats());
    let mut resp = Response::new(super::full(ctx.metrics.render()));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}

fn ready(ctx: &Ctx) -> Response<Body> {
    if ctx.backend.is_ready() {
        json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
    } else {
        let mut resp = json(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({"status": "storage refuses writes"}));
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(super::problem::RETRY_AFTER_SECONDS));
        resp
    }
}

fn id<T>(raw: &str, parse: fn(&str) -> Result<T, String>) -> Result<T, ApiError> {
    parse(raw).map_err(|_| ApiError::NotFound)
}

async fn body<T: serde::de::DeserializeOwned>(ctx: &Ctx, req: Request<Incoming>) -> Result<T, ApiError> {
    let (parts, body) = req.into_parts();
    require_json(&parts.headers)?;
    let bytes = read_body(ctx, &parts.headers, body, ctx.settings.http.max_body_bytes).await?;
    parse_json(&bytes)
}

fn saved_status(saved: Saved) -> StatusCode {
    match saved {
        Saved::Created => StatusCode::CREATED,
        Saved::Updated => StatusCode::OK,
    }
}

#[derive(Serialize)]
struct WithSecret<'a, T: Serialize> {
    #[serde(flatten)]
    entity: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReassignBody {
    partner_id: PartnerId,
    why: String,
    #[serde(default)]
    by: Option<String>,
}

/// An account as the merchant's program manager sees it: holder, touches, audit trail.
fn account_view(acc: &AccountRecord, now: i64) -> serde_json::Value {
    let holder = acc.holder_at(now);
    serde_json::json!({
        "account": acc.account,
        "source_of_record": holder.map(|c| serde_json::json!({
            "partner_id": c.partner_id,
            "deal_id": c.deal_id,
            "registered_at": format_rfc3339(c.registered_ms),
            "expires_at": (!c.converted).then(|| format_rfc3339(c.expires_ms)),
        })),
        "touches": acc.touches.iter().map(|t| serde_json::json!({
            "partner_id": t.partner_id, "kind": t.label, "at": format_rfc3339(t.at_ms)
        })).collect::<Vec<_>>(),
        "reassignments": acc.reassignments.iter().map(|r| serde_json::json!({
            "at": format_rfc3339(r.at_ms), "from": r.from, "to": r.to, "by": r.by, "why": r.why
        })).collect::<Vec<_>>(),
    })
}

/// A delivery as the admin API shows it, with the values it sends.
async fn delivery_view(ctx: &Ctx, d: &Delivery) -> Result<serde_json::Value, ApiError> {
    let v = crate::outbound::worker::values_of(ctx.backend.as_ref(), d).await?.ok_or_else(|| {
        ApiError::Storage(crate::backend::StoreError::Corrupt(format!("delivery {} has no conversion", d.id)))
    })?;
    Ok(delivery_json(d, &v))
}

fn delivery_json(d: &Delivery, v: &DeliveryValues) -> serde_json::Value {
    serde_json::json!({
        "id": d.id.to_string(),
        "webhook_id": d.webhook_id(),
        "partner_id": d.partner_id.as_str(),
        "event": d.trigger.as_str(),
        "state": d.state.as_str(),
        "created_at": format_rfc3339(d.created_ms),
        "next_attempt_at": d.due_ms.map(format_rfc3339),
        "finished_at": d.finished_ms.map(format_rfc3339),
        "attempt_count": d.attempt_count,
        "attempts": d.attempts.iter().map(|a| serde_json::json!({
            "at": format_rfc3339(a.at_ms),
            "duration_ms": a.duration_ms,
            "status": a.status,
            "error": a.error,
            "response": a.response,
            "retry_after_ms": a.retry_after_ms,
        })).collect::<Vec<_>>(),
        "values": crate::outbound::worker::values_json(v),
    })
}

/// Most deliveries one listing page holds.
const MAX_DELIVERY_PAGE: usize = 500;

/// `?partner_id=&state=&after=&limit=` of a delivery listing.
fn delivery_filter(query: &str, catalog: &Catalog, merchant: &MerchantId) -> Result<DeliveryFilter, ApiError> {
    let mut f = DeliveryFilter { limit: 100, ..DeliveryFilter::default() };
    let bad = |d: String| ApiError::InvalidQuery(d);
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "partner_id" => {
                let p = PartnerId::parse(&value).map_err(|e| bad(format!("partner_id: {e}")))?;
                if catalog.partner_of(merchant, &p).is_none() {
                    return Err(FieldError::new("partner_id", "is not a partner of this merchant").into());
                }
                f.partner = Some(p);
            }
            "state" => {
                f.state =
                    Some(DeliveryState::parse(&value).ok_or_else(|| {
                        bad(format!("state must be pending, parked, delivered or dead, not {value:?}"))
                    })?);
            }
            "after" => f.after = Some(after_param(&value)?),
            "limit" => f.limit = limit_param(&value, MAX_DELIVERY_PAGE)?,
            other => return Err(bad(format!("unknown parameter {other:?}; known: partner_id, state, after, limit"))),
        }
    }
    Ok(f)
}

/// The answer to a retry or an enable.
async fn outbox_answer(ctx: &Ctx, answer: OutboxAnswer) -> Result<Response<Body>, ApiError> {
    match answer {
        OutboxAnswer::Delivery(d) => Ok(json(StatusCode::OK, &delivery_view(ctx, &d).await?)),
        OutboxAnswer::Refused(r) if r.code == "not_found" => Err(ApiError::NotFound),
        OutboxAnswer::Refused(r) => Err(ApiError::Refused(r)),
        OutboxAnswer::Stale | OutboxAnswer::Resumed(_) | OutboxAnswer::Pruned(_) => Err(ApiError::Internal),
    }
}

/// A postback token (`pbt_` + 32 random bytes, base64url) and its SHA-256, which is all
/// tally keeps.
fn new_postback_token() -> (String, [u8; 32]) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    let token = format!("pbt_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = sha2::Sha256::digest(token.as_bytes()).into();
    (token, hash)
}

async fn admin(ctx: &Ctx, method: Method, rest: &[&str], req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let now = ctx.clock.now_ms();
    let merchant = id(rest.first().copied().unwrap_or(""), MerchantId::parse)?;
    let catalog = ctx.backend.catalog();
    let known = catalog.merchants.contains_key(&merchant);
    match (&method, rest) {
        (&Method::PUT, [_]) => {
            let merchant = body::<MerchantBody>(ctx, req).await?.into_merchant(merchant, now)?;
            let secret = WebhookSecret::generate();
            let (token, token_hash) = new_postback_token();
            let op =
                EntityOp::Merchant { merchant: merchant.clone(), secret: secret.clone(), token_hash: Some(token_hash) };
            let saved = ctx.backend.apply(op).await?;
            let catalog = ctx.backend.catalog();
            let stored = catalog.merchants.get(&merchant.id).cloned().unwrap_or(merchant);
            let secret = (saved == Saved::Created).then(|| secret.expose_text());
            // The token is shown only by the call that set it.
            let token = (catalog.postback_tokens.get(&stored.id) == Some(&token_hash)).then_some(token);
            Ok(json(saved_status(saved), &WithSecret { entity: &stored, secret, token }))
        }
        (&Method::GET, [_]) => {
            catalog.merchants.get(&merchant).map(|m| json(StatusCode::OK, m)).ok_or(ApiError::NotFound)
        }
        (&Method::POST, [_, "secrets:rotate"]) => {
            let secret = WebhookSecret::generate();
            let grace_ms = ctx.settings.signing.rotation_grace_seconds.saturating_mul(1000);
            ctx.backend
                .apply(EntityOp::RotateMerchantSecret {
                    merchant: merchant.clone(),
                    secret: secret.clone(),
                    now,
                    grace_ms,
                })
                .await?;
            let body = serde_json::json!({
                "id": merchant.as_str(),
                "secret": secret.expose_text(),
                "previous_valid_until": crate::domain::clock::format_rfc3339(now.saturating_add(grace_ms)),
            });
            Ok(json(StatusCode::OK, &body))
        }
        (&Method::POST, [_, "postback-token:rotate"]) => {
            let (token, token_hash) = new_postback_token();
            ctx.backend.apply(EntityOp::RotatePostbackToken { merchant: merchant.clone(), token_hash }).await?;
            Ok(json(StatusCode::OK, &serde_json::json!({ "id": merchant.as_str(), "token": token })))
        }
        _ if !known => Err(ApiError::NotFound),
        (&Method::PUT, [_, "partners", pid]) => {
            let pid = id(pid, PartnerId::parse)?;
            let partner: Partner =
                body::<PartnerBody>(ctx, req).await?.into_partner(merchant.clone(), pid.clone(), now)?;
            if let Some(outbound) = &partner.outbound {
                let allow_private = ctx.settings.outbound.allow_private;
                crate::outbound::ssrf::vet_outbound(outbound, allow_private, &crate::outbound::ssrf::SystemResolver)
                    .await
                    .map_err(|detail| FieldError::new("outbound.url", detail))?;
            }
            let secret = WebhookSecret::generate();
            let saved = ctx.backend.put_partner(partner, secret.clone()).await?;
            let stored = ctx.backend.catalog().partner_of(&merchant, &pid).cloned().ok_or(ApiError::NotFound)?;
            let secret = (saved == Saved::Created).then(|| secret.expose_text());
            Ok(json(saved_status(saved), &WithSecret { entity: &stored, secret, token: None }))
        }
        (&Method::GET, [_, "partners", pid]) => {
            let pid = id(pid, PartnerId::parse)?;
            catalog.partner_of(&merchant, &pid).map(|p| json(StatusCode::OK, p)).ok_or(ApiError::NotFound)
        }
        (&Method::DELETE, [_, "partners", pid]) => {
            let pid = id(pid, PartnerId::parse)?;
            ctx.backend.apply(EntityOp::PausePartner { merchant: merchant.clone(), partner: pid.clone() }).await?;
            let stored = ctx.backend.catalog().partner_of(&merchant, &pid).cloned().ok_or(ApiError::NotFound)?;
            Ok(json(StatusCode::OK, &stored))
        }
        (&Method::PUT, [_, "links", lid]) => {
            let lid = id(lid, LinkId::parse)?;
            let link: Link = body::<LinkBody>(ctx, req).await?.into_link(merchant.clone(), lid.clone(), now)?;
            let saved = ctx.backend.put_link(link).await?;
            let stored = ctx.backend.catalog().link_of(&merchant, &lid).cloned().ok_or(ApiError::NotFound)?;
            Ok(json(saved_status(saved), &stored))
        }
        (&Method::GET, [_, "links", lid]) => {
            let lid = id(lid, LinkId::parse)?;
            catalog.link_of(&merchant, &lid).map(|l| json(StatusCode::OK, l)).ok_or(ApiError::NotFound)
        }
        (&Method::PUT, [_, "plans", pid]) => {
            let pid = id(pid, PlanId::parse)?;
            let plan = body::<PlanBody>(ctx, req).await?.into_plan(merchant.clone(), pid.clone(), now)?;
            let saved = ctx.backend.put_plan(plan).await?;
            let catalog = ctx.backend.catalog();
            let stored = catalog.current_plan(&merchant, &pid).ok_or(ApiError::NotFound)?;
            Ok(json(saved_status(saved), &PlanView::from(stored)))
        }
        (&Method::GET, [_, "plans", pid]) => {
            let pid = id(pid, PlanId::parse)?;
            catalog
                .current_plan(&merchant, &pid)
                .map(|p| json(StatusCode::OK, &PlanView::from(p)))
                .ok_or(ApiError::NotFound)
        }
        (&Method::GET, [_, "conversions"]) => {
            let (after, limit) = review_query(req.uri().query().unwrap_or(""))?;
            // One more than asked: whether there is a next page.
            let mut page = ctx.backend.open_reviews(&merchant, after, limit + 1).await?;
            let next = (page.len() > limit).then(|| page[limit - 1].conversion_id.to_string());
            page.truncate(limit);
            let views: Vec<_> = page.iter().map(|rec| ConversionView::new(rec, false)).collect();
            Ok(json(StatusCode::OK, &serde_json::json!({ "conversions": views, "next_after": next })))
        }
        (&Method::POST, [_, "conversions", target]) if target.ends_with(":review") => {
            let raw = target.strip_suffix(":review").unwrap_or(target);
            let decoded = percent_encoding::percent_decode_str(raw).decode_utf8().map_err(|_| ApiError::NotFound)?;
            let txn = id(&decoded, TxnId::parse)?;
            let b: ReviewBody = body(ctx, req).await?;
            let by = b.by.unwrap_or_else(|| "admin".into());
            check_text_id("by", &by)?;
            if let Some(note) = &b.note {
                check_text_id("note", note)?;
            }
            let approve = b.decision == ReviewDecision::Approve;
            match ctx.backend.review(merchant.clone(), txn, approve, by, b.note, now).await? {
                ReviewOutcome::Settled(rec) => Ok(json(StatusCode::OK, &ConversionView::new(&rec, false))),
                ReviewOutcome::Replay(rec) => Ok(replayed(json(StatusCode::OK, &ConversionView::new(&rec, false)))),
                ReviewOutcome::NotFound => Err(ApiError::NotFound),
                ReviewOutcome::Refused(r) => Err(ApiError::Refused(r)),
            }
        }
        (&Method::GET, [_, "conversions", txn]) => {
            let decoded = percent_encoding::percent_decode_str(txn).decode_utf8().map_err(|_| ApiError::NotFound)?;
            let txn = id(&decoded, TxnId::parse)?;
            let rec = ctx.backend.conversion(&merchant, &txn).await?.ok_or(ApiError::NotFound)?;
            let ledger = ctx.backend.ledger_for_conversion(&rec).await?;
            let history: Vec<_> = rec
                .history
                .iter()
                .map(|h| {
                    serde_json::json!({"from": h.from.as_str(), "to": h.to.as_str(), "at": format_rfc3339(h.at_ms), "cause": h.cause})
                })
                .collect();
            // Typed, not `json!`: the metadata is written as stored, never parsed again.
            let body = AdminConversionView {
                conversion: ConversionView::new(&rec, false),
                keys: &rec.keys,
                received_at: format_rfc3339(rec.received_ms),
                approve_at: rec.approve_at_ms.map(format_rfc3339),
                refunded: rec.amount.map(|a| Money { minor: rec.refunded_minor, currency: a.currency }.amount_text()),
                status_history: history,
                ledger: ledger.iter().map(LedgerEntryView::from).collect(),
            };
            Ok(json(StatusCode::OK, &body))
        }
        (&Method::POST, [_, "accounts", target]) if target.ends_with(":reassign") => {
            let raw = percent_encoding::percent_decode_str(target.strip_suffix(":reassign").unwrap_or(target))
                .decode_utf8()
                .map_err(|_| ApiError::NotFound)?;
            let account = normalize_account(&raw).map_err(|e| FieldError::new("account", e))?;
            let b: ReassignBody = body(ctx, req).await?;
            if catalog.partner_of(&merchant, &b.partner_id).is_none() {
                return Err(FieldError::new("partner_id", "is not a partner of this merchant").into());
            }
            check_text_id("why", &b.why)?;
            let by = b.by.unwrap_or_else(|| "admin".into());
            check_text_id("by", &by)?;
            let acc = ctx.backend.reassign(merchant.clone(), account, b.partner_id, by, b.why, now).await?;
            Ok(json(StatusCode::OK, &account_view(&acc, now)))
        }
        (&Method::GET, [_, "accounts", raw]) => {
            let raw = percent_encoding::percent_decode_str(raw).decode_utf8().map_err(|_| ApiError::NotFound)?;
            let account = normalize_account(&raw).map_err(|_| ApiError::NotFound)?;
            let acc = ctx.backend.account(&merchant, &account).await?.ok_or(ApiError::NotFound)?;
            Ok(json(StatusCode::OK, &account_view(&acc, now)))
        }
        (&Method::POST, [_, "payouts"]) => {
            let b: super::payouts::PayoutBody = body(ctx, req).await?;
            super::payouts::run(ctx, &merchant, b).await
        }
        (&Method::GET, [_, "payouts", id]) => super::payouts::get(ctx, &merchant, id, req.headers()).await,
        (&Method::POST, [_, "payouts", id, "lines", line]) if line.ends_with(":paid") || line.ends_with(":failed") => {
            let (p, paid) = match line.strip_suffix(":paid") {
                Some(p) => (p, true),
                None => (line.strip_suffix(":failed").unwrap_or(line), false),
            };
            let p = self::id(p, PartnerId::parse)?;
            let (id, b) = (id.to_string(), body::<super::payouts::SettleBody>(ctx, req).await?);
            super::payouts::settle(ctx, &merchant, &id, p, paid, b).await
        }
        (&Method::GET, [_, "partners", p, "balance"]) => {
            let p = id(p, PartnerId::parse)?;
            catalog.partner_of(&merchant, &p).ok_or(ApiError::NotFound)?;
            super::payouts::balance(ctx, &merchant, &p).await
        }
        (&Method::GET, [_, "partners", p, "statements", month]) => {
            let p = id(p, PartnerId::parse)?;
            catalog.partner_of(&merchant, &p).ok_or(ApiError::NotFound)?;
            super::payouts::statement(ctx, &merchant, &p, month, req.headers()).await
        }
        (&Method::GET, [_, "reports", "partners"]) => {
            super::reports::partners(ctx, &merchant, req.uri().query().unwrap_or(""), req.headers()).await
        }
        (&Method::GET, [_, "reports", "program"]) => {
            super::reports::program(ctx, &merchant, req.uri().query().unwrap_or("")).await
        }
        (&Method::GET, [_, "ledger"]) => {
            super::reports::ledger(ctx, &merchant, req.uri().query().unwrap_or(""), req.headers()).await
        }
        (&Method::GET, [_, "deliveries"]) => {
            let filter = delivery_filter(req.uri().query().unwrap_or(""), &catalog, &merchant)?;
            let (page, next) = ctx.backend.deliveries(&merchant, filter).await?;
            let mut views = Vec::with_capacity(page.len());
            for d in &page {
                views.push(delivery_view(ctx, d).await?);
            }
            let body = serde_json::json!({
                "deliveries": views,
                "next_after": next.map(|n| n.to_string()),
            });
            Ok(json(StatusCode::OK, &body))
        }
        (&Method::POST, [_, "deliveries", target]) if target.ends_with(":retry") => {
            let did = id(target.strip_suffix(":retry").unwrap_or(target), Ulid::parse)?;
            let op = OutboxOp::Retry { merchant: merchant.clone(), id: did, at: now };
            outbox_answer(ctx, ctx.backend.outbox(op).await?).await
        }
        (&Method::GET, [_, "deliveries", did]) => {
            let did = id(did, Ulid::parse)?;
            let d = ctx.backend.delivery(&merchant, &did).await?.ok_or(ApiError::NotFound)?;
            Ok(json(StatusCode::OK, &delivery_view(ctx, &d).await?))
        }
        (&Method::POST, [_, "partners", pid, "outbound:enable"]) => {
            let pid = id(pid, PartnerId::parse)?;
            if catalog.partner_of(&merchant, &pid).is_none() {
                return Err(ApiError::NotFound);
            }
            let was_off = ctx.backend.endpoint(&pid).await?;
            let mut resumed = 0;
            // Every parked delivery, a bounded number per command.
            loop {
                let op = OutboxOp::Enable { merchant: merchant.clone(), partner: pid.clone(), at: now, limit: 10_000 };
                match ctx.backend.outbox(op).await? {
                    OutboxAnswer::Resumed(0) => break,
                    OutboxAnswer::Resumed(n) => resumed += n,
                    other => return outbox_answer(ctx, other).await,
                }
            }
            let body = serde_json::json!({
                "partner_id": pid.as_str(),
                "was_disabled_since": was_off.map(|o| format_rfc3339(o.since_ms)),
                "resumed": resumed,
            });
            Ok(json(StatusCode::OK, &body))
        }
        (&Method::POST, [_, "partners", pid, "secrets:rotate"]) => {
            let pid = id(pid, PartnerId::parse)?;
            if catalog.partner_of(&merchant, &pid).is_none() {
                return Err(ApiError::NotFound);
            }
            let secret = WebhookSecret::generate();
            let grace_ms = ctx.settings.signing.rotation_grace_seconds.saturating_mul(1000);
            let op = EntityOp::RotatePartnerSecret {
                merchant: merchant.clone(),
                partner: pid.clone(),
                secret: secret.clone(),
                now,
                grace_ms,
            };
            ctx.backend.apply(op).await?;
            let body = serde_json::json!({
                "id": pid.as_str(),
                "secret": secret.expose_text(),
                "previous_valid_until": format_rfc3339(now.saturating_add(grace_ms)),
            });
            Ok(json(StatusCode::OK, &body))
        }
        (
            _,
            [_]
            | [_, "secrets:rotate" | "postback-token:rotate" | "deliveries" | "ledger" | "payouts" | "conversions"]
            | [_, "payouts", _]
            | [_, "payouts", _, "lines", _]
            | [_, "reports", "partners" | "program"]
            | [_, "partners" | "links" | "plans" | "conversions" | "accounts" | "deliveries", _]
            | [_, "partners", _, "outbound:enable" | "secrets:rotate" | "balance"]
            | [_, "partners", _, "statements", _],
        ) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    }
}
