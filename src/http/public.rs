//! The public listener: click redirects, GET postbacks and the merchant API.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::ApiError;
use super::views::ConversionView;
use super::{json, json_bytes, parse_json, read_body, replayed, require_json, single_header, Body, Ctx, Route};
use crate::backend::BackendExt;
use crate::domain::click::{is_bot, reduce_ip, truncate, visitor_hash, ClickRecord, MAX_SUB_LEN, MAX_USER_AGENT_LEN};
use crate::domain::conversion::{ConversionBody, ConversionInput, ConversionRecord};
use crate::domain::entities::{ip_allowed, Status};
use crate::domain::ids::{LinkId, MerchantId, Ulid};
use crate::domain::link::{Link, MacroValues};
use crate::domain::FieldError;
use crate::engine::Catalog;
use crate::engine::ConversionOutcome;
use crate::signing::postback::Query;
use crate::signing::{self, ReplayGuard, SignatureFailure, WebhookHeaders};

type Answer = (Route, Result<Response<Body>, ApiError>);

/// Most conversions in one batch (SPEC 5.1).
pub const MAX_BATCH_ITEMS: usize = 1000;

pub(super) async fn handle(ctx: &Ctx, peer: SocketAddr, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let post = req.method() == Method::POST;
    match (req.method(), segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["c", link]) => (Route::Click, click(ctx, peer, link, &req).await),
        (_, ["c", _]) => (Route::Click, Err(ApiError::MethodNotAllowed)),
        (&Method::GET, ["pb", merchant]) => {
            let r = postback(ctx, peer, merchant, &req).await;
            (Route::Postback, count_conversion(ctx, r))
        }
        (_, ["pb", _]) => (Route::Postback, Err(ApiError::MethodNotAllowed)),
        (_, ["v1", "merchants", merchant, "conversions"]) if post => {
            let r = conversion(ctx, peer, merchant, req).await;
            (Route::Conversion, count_conversion(ctx, r))
        }
        (_, ["v1", "merchants", merchant, "conversions", "batch"]) if post => {
            (Route::ConversionBatch, batch(ctx, peer, merchant, req).await)
        }
        (_, ["v1", "merchants", merchant, "clicks"]) if post => {
            (Route::ServerClick, server_click(ctx, peer, merchant, req).await)
        }
        (_, ["v1", "merchants", merchant, "adjustments"]) if post => {
            (Route::Adjustment, super::b2b::adjust(ctx, peer, merchant, req).await)
        }
        (_, ["v1", "merchants", merchant, "touches"]) if post => {
            (Route::Touch, super::b2b::touch(ctx, peer, merchant, req).await)
        }
        (_, ["v1", "partners", partner, "deals"]) if post => {
            (Route::Deal, super::b2b::register_deal(ctx, peer, partner, req).await)
        }
        (&Method::GET, ["v1", "partners", partner, "conversions"]) => {
            (Route::PartnerConversions, super::partner::conversions(ctx, peer, partner, &req).await)
        }
        (&Method::GET, ["v1", "partners", partner, "statements", month]) => {
            (Route::PartnerStatement, super::partner::statement(ctx, peer, partner, month, &req).await)
        }
        (_, ["v1", "partners", _, "conversions"]) => (Route::PartnerConversions, Err(ApiError::MethodNotAllowed)),
        (_, ["v1", "partners", _, "statements", _]) => (Route::PartnerStatement, Err(ApiError::MethodNotAllowed)),
        (_, ["v1", "merchants", _, "adjustments" | "touches"] | ["v1", "partners", _, "deals"]) => {
            (Route::NotFound, Err(ApiError::MethodNotAllowed))
        }
        (_, ["v1", "merchants", _, "conversions" | "clicks"] | ["v1", "merchants", _, "conversions", "batch"]) => {
            (Route::NotFound, Err(ApiError::MethodNotAllowed))
        }
        _ => (Route::NotFound, Err(ApiError::NotFound)),
    }
}

/// Browsers announce speculative loads with one of these headers; they are redirected
/// but not recorded.
fn is_prefetch(headers: &HeaderMap) -> bool {
    use http::header::HeaderName;
    static PURPOSE: HeaderName = HeaderName::from_static("purpose");
    static SEC_PURPOSE: HeaderName = HeaderName::from_static("sec-purpose");
    static X_MOZ: HeaderName = HeaderName::from_static("x-moz");
    static X_PURPOSE: HeaderName = HeaderName::from_static("x-purpose");
    let has = |name: &HeaderName, needle: &[u8]| {
        headers.get_all(name).iter().any(|v| v.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle)))
    };
    has(&PURPOSE, b"prefetch")
        || has(&SEC_PURPOSE, b"prefetch")
        || has(&X_MOZ, b"prefetch")
        || has(&X_PURPOSE, b"preview")
}

/// An active link whose partner is active, or `None`.
fn active_link<'c>(catalog: &'c Catalog, id: &LinkId) -> Option<&'c Link> {
    let link = catalog.links.get(id).filter(|l| l.status == Status::Active)?;
    catalog.partner_of(&link.merchant_id, &link.partner_id).filter(|p| p.status == Status::Active)?;
    Some(link)
}

/// What one click is made of, from a browser or from a merchant's server.
struct ClickInput {
    subs: [Option<String>; 5],
    ip: IpAddr,
    user_agent: String,
}

/// Mints a click id and stores the click; answers with the stored record.
async fn record_click(
    ctx: &Ctx,
    link: &Link,
    input: ClickInput,
    click_id: Ulid,
    now: i64,
) -> Result<ClickRecord, ApiError> {
    let s = &ctx.settings.clicks;
    let ua = truncate(&input.user_agent, MAX_USER_AGENT_LEN);
    let bot = is_bot(&ua, &s.bot_user_agents);
    let record = ClickRecord {
        click_id,
        link_id: link.id.clone(),
        partner_id: link.partner_id.clone(),
        merchant_id: link.merchant_id.clone(),
        at_ms: now,
        subs: input.subs,
        ip: reduce_ip(input.ip, s.ipv4_prefix, s.ipv6_prefix),
        visitor: visitor_hash(ctx.backend.visitor_salt(), &link.id, input.ip, &ua),
        user_agent: ua,
        bot,
        unique: false,
    };
    let unique_window_ms = ctx.settings.clicks.unique_window_hours * 3_600_000;
    let stored = ctx.backend.record_click(record, unique_window_ms).await?;
    ctx.metrics.clicks.with_label_values(&[if bot { "bot" } else { "recorded" }]).inc();
    Ok(stored)
}

fn location(link: &Link, click_id: &Ulid, subs: &[Option<String>; 5], deep_link: Option<&str>) -> String {
    let click_text = click_id.to_string();
    let values =
        MacroValues { click_id: &click_text, link_id: link.id.as_str(), partner_id: link.partner_id.as_str(), subs };
    link.redirect_location(&values, deep_link)
}

async fn click(
    ctx: &Ctx,
    peer: SocketAddr,
    link_raw: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if ctx.limits.enabled {
        if let Err(wait) = ctx.limits.clicks.check(&peer.ip()) {
            ctx.metrics.clicks.with_label_values(&["rate_limited"]).inc();
            return Err(ApiError::RateLimited(wait));
        }
    }
    let catalog = ctx.backend.catalog();
    let link = LinkId::parse(link_raw).ok().and_then(|id| active_link(&catalog, &id)).ok_or_else(|| {
        ctx.metrics.clicks.with_label_values(&["not_found"]).inc();
        ApiError::NotFound
    })?;
    let mut subs: [Option<String>; 5] = Default::default();
    let mut deep_link = None;
    for (name, value) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "url" if deep_link.is_none() => deep_link = Some(value.into_owned()),
            n => {
                let slot = n.strip_prefix("sub").and_then(|i| i.parse::<usize>().ok()).and_then(|i| i.checked_sub(1));
                if let Some(s) = slot.and_then(|i| subs.get_mut(i)) {
                    if s.is_none() {
                        *s = Some(truncate(&value, MAX_SUB_LEN));
                    }
                }
            }
        }
    }
    let now = ctx.clock.now_ms();
    let click_id = Ulid::mint(now);
    let location = location(link, &click_id, &subs, deep_link.as_deref());
    if req.method() == Method::GET && !is_prefetch(req.headers()) {
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        record_click(ctx, link, ClickInput { subs, ip: peer.ip(), user_agent }, click_id, now).await?;
    }
    let mut resp = Response::new(super::full(Bytes::new()));
    *resp.status_mut() = StatusCode::FOUND;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_str(&location).map_err(|_| ApiError::NotFound)?);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Who signs a request: a merchant (merchant API) or a partner (partner API).
#[derive(Clone, Copy)]
pub(super) enum Sender<'a> {
    Merchant(&'a str),
    Partner(&'a str),
}

impl Sender<'_> {
    /// The replay guard's scope: webhook ids are unique per sender.
    fn scope(self) -> String {
        match self {
            Sender::Merchant(raw) => format!("m:{raw}"),
            Sender::Partner(raw) => format!("p:{raw}"),
        }
    }
}

/// Checks the Standard Webhooks signature against the sender's active secrets, then the
/// replay guard. An unknown sender fails like a wrong secret (no enumeration). Returns
/// the merchant the request acts for and, for the partner API, the partner.
fn verify_sender(
    ctx: &Ctx,
    sender: Sender<'_>,
    scope: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: i64,
) -> Result<(MerchantId, Option<crate::domain::ids::PartnerId>), SignatureFailure> {
    let get = |name| single_header(headers, name).map_err(|()| SignatureFailure::Malformed);
    let wh = WebhookHeaders {
        id: get("webhook-id")?,
        timestamp: get("webhook-timestamp")?,
        signature: get("webhook-signature")?,
    };
    let catalog = ctx.backend.catalog();
    let (secrets, acting) = match sender {
        Sender::Merchant(raw) => {
            let m = MerchantId::parse(raw).ok();
            let secrets = m.as_ref().and_then(|m| catalog.secrets.get(m));
            (secrets, m.map(|m| (m, None)))
        }
        Sender::Partner(raw) => {
            let p = crate::domain::ids::PartnerId::parse(raw).ok().and_then(|id| catalog.partners.get(&id));
            let secrets = p.and_then(|p| catalog.partner_secrets.get(&p.id));
            (secrets, p.map(|p| (p.merchant_id.clone(), Some(p.id.clone()))))
        }
    };
    let keys = secrets.into_iter().flat_map(|s| s.active_keys(now_ms));
    // No secrets (unknown sender) means no key can match: `Mismatch`, like a wrong secret.
    signing::verify(keys, wh, body, now_ms.div_euclid(1000), ctx.settings.signing.tolerance_seconds)?;
    let (Some(acting), Some(id)) = (acting, wh.id) else { return Err(SignatureFailure::Mismatch) };
    let mut guard = ctx.replay.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = guard.evicted_early;
    let r = guard.check(scope, id, ReplayGuard::body_hash(body), now_ms);
    ctx.metrics.replay_evictions.inc_by(guard.evicted_early - before);
    r.map_err(|_| SignatureFailure::Replay)?;
    Ok(acting)
}

/// A verified signed POST: who acts, the request head and the raw body.
pub(super) struct Signed {
    pub(super) merchant: MerchantId,
    pub(super) partner: Option<crate::domain::ids::PartnerId>,
    scope: String,
    pub(super) parts: Parts,
    pub(super) body: Bytes,
    pub(super) now: i64,
}

impl Signed {
    /// Releases the `webhook-id` of a request that stored nothing (`400`/`422`), so a
    /// corrected body may reuse it.
    pub(super) fn release(&self, ctx: &Ctx) {
        if let Ok(Some(id)) = single_header(&self.parts.headers, "webhook-id") {
            let mut guard = ctx.replay.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            guard.forget(&self.scope, id, ReplayGuard::body_hash(&self.body));
        }
    }

    /// Parses the body as JSON of `T`, releasing the `webhook-id` when it is refused.
    pub(super) fn parse<T: serde::de::DeserializeOwned>(&self, ctx: &Ctx) -> Result<T, ApiError> {
        let r = require_json(&self.parts.headers).and_then(|()| parse_json::<T>(&self.body));
        if r.is_err() {
            self.release(ctx);
        }
        r
    }

    /// `Err(e)` after releasing the `webhook-id`: for validation failures.
    pub(super) fn refuse<T>(&self, ctx: &Ctx, e: impl Into<ApiError>) -> Result<T, ApiError> {
        self.release(ctx);
        Err(e.into())
    }
}

/// A failed signature, whatever the request: counted by reason, charged to the client's
/// IP (repeated failures block it), answered `401`.
pub(super) fn signature_failed(ctx: &Ctx, peer: SocketAddr, reason: SignatureFailure) -> ApiError {
    ctx.metrics.signature_failures.with_label_values(&[reason.as_str()]).inc();
    ctx.limits.record_failure(peer.ip());
    ApiError::Signature(reason)
}

/// Reads a body of at most `limit` bytes and verifies its signature; counts failures.
pub(super) async fn signed(
    ctx: &Ctx,
    peer: SocketAddr,
    sender: Sender<'_>,
    req: Request<Incoming>,
    limit: usize,
) -> Result<Signed, ApiError> {
    ctx.limits.check_blocked(peer.ip()).map_err(ApiError::RateLimited)?;
    let (parts, body) = req.into_parts();
    let body = read_body(ctx, &parts.headers, body, limit).await?;
    let now = ctx.clock.now_ms();
    let scope = sender.scope();
    match verify_sender(ctx, sender, &scope, &parts.headers, &body, now) {
        Ok((merchant, partner)) => {
            spend_quota(ctx, &merchant, partner.as_ref())?;
            Ok(Signed { merchant, partner, scope, parts, body, now })
        }
        Err(reason) => Err(signature_failed(ctx, peer, reason)),
    }
}

/// A verified signed POST of at most `http.max_body_bytes`, and its body parsed as `T`.
pub(super) async fn signed_json<T: serde::de::DeserializeOwned>(
    ctx: &Ctx,
    peer: SocketAddr,
    sender: Sender<'_>,
    req: Request<Incoming>,
) -> Result<(Signed, T), ApiError> {
    let s = signed(ctx, peer, sender, req, ctx.settings.http.max_body_bytes).await?;
    let body = s.parse(ctx)?;
    Ok((s, body))
}

/// Spends one cell of the verified sender's quota: the partner's for the partner API, the
/// merchant's otherwise. Only called after the signature check.
fn spend_quota(
    ctx: &Ctx,
    merchant: &MerchantId,
    partner: Option<&crate::domain::ids::PartnerId>,
) -> Result<(), ApiError> {
    if !ctx.limits.enabled {
        return Ok(());
    }
    let r = match partner {
        Some(p) => ctx.limits.partners.check(&p.to_string()),
        None => ctx.limits.merchants.check(&merchant.to_string()),
    };
    r.map_err(ApiError::RateLimited)
}

/// Counts a single-conversion answer in `tally_conversions_total{outcome}`.
fn count_conversion(ctx: &Ctx, result: Result<Response<Body>, ApiError>) -> Result<Response<Body>, ApiError> {
    let outcome = match &result {
        Ok(r) if r.headers().contains_key("idempotent-replayed") => "duplicate",
        Ok(_) => "created",
        Err(ApiError::DuplicateConflict { .. }) => "conflict",
        Err(ApiError::Signature(_) | ApiError::TokenIpNotAllowed) => "unauthorized",
        Err(ApiError::RateLimited(_)) => "rate_limited",
        Err(ApiError::Storage(_)) => "error",
        Err(_) => "invalid",
    };
    ctx.metrics.conversions.with_label_values(&[outcome]).inc();
    result
}

async fn conversion(
    ctx: &Ctx,
    peer: SocketAddr,
    merchant_raw: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (s, body) = signed_json::<ConversionBody>(ctx, peer, Sender::Merchant(merchant_raw), req).await?;
    let input = body.into_input(s.now);
    let input = match input {
        Ok(i) => i,
        Err(e) => return s.refuse(ctx, e),
    };
    convert_one(ctx, s.merchant, input, s.now, StatusCode::CREATED).await
}

/// Stores one conversion and answers it; `created` is `201` for the POST, `200` for the
/// GET postback. A retry of a recent conversion whose WAL sync is done is answered here,
/// from its answer rendered once, without a round trip through the writer: with a
/// retrying merchant that is most duplicates. Everything else goes to the writer, which
/// decides exactly.
async fn convert_one(
    ctx: &Ctx,
    merchant: MerchantId,
    input: ConversionInput,
    now: i64,
    created: StatusCode,
) -> Result<Response<Body>, ApiError> {
    if let Some(settled) = ctx.backend.settled_conversion(&merchant, &input.txn_id) {
        let rec = &settled.record;
        if !rec.same_content(&input) {
            return Err(conflict(rec));
        }
        let body = settled.rendered.get_or_init(|| duplicate_body(rec));
        return Ok(replayed(json_bytes(StatusCode::OK, body.clone())));
    }
    let outcome = ctx.backend.convert(merchant, input, now).await?;
    answer(ctx, outcome, created)
}

/// The body of a duplicate's answer: the stored conversion with `duplicate: true`. The
/// writer's answer and the one kept in memory are both this.
fn duplicate_body(rec: &ConversionRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(&ConversionView::new(rec, true)).unwrap_or_default())
}

/// The `409` for a `txn_id` stored with other content.
fn conflict(rec: &ConversionRecord) -> ApiError {
    ApiError::DuplicateConflict { txn_id: rec.txn_id.to_string(), conversion_id: rec.conversion_id.to_string() }
}

/// The HTTP answer to one conversion outcome; `created` is `201` for the POST, `200` for
/// the GET postback.
fn answer(ctx: &Ctx, outcome: ConversionOutcome, created: StatusCode) -> Result<Response<Body>, ApiError> {
    match outcome {
        ConversionOutcome::Created(rec) => {
            ctx.metrics.count_attribution(&rec);
            Ok(json(created, &ConversionView::new(&rec, false)))
        }
        ConversionOutcome::Duplicate(rec) => Ok(replayed(json_bytes(StatusCode::OK, duplicate_body(&rec)))),
        ConversionOutcome::Conflict(rec) => Err(conflict(&rec)),
    }
}

/// `GET /pb/{merchant}`: a signed postback URL, or token mode from an allowed IP.
async fn postback(
    ctx: &Ctx,
    peer: SocketAddr,
    merchant_raw: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(req.uri().query().unwrap_or("")).map_err(|e| ApiError::InvalidQuery(e.to_string()))?;
    let merchant = MerchantId::parse(merchant_raw).ok();
    let now = ctx.clock.now_ms();
    ctx.limits.check_blocked(peer.ip()).map_err(ApiError::RateLimited)?;
    let fail = |reason: SignatureFailure| signature_failed(ctx, peer, reason);
    let catalog = ctx.backend.catalog();
    let merchant_rec = merchant.as_ref().and_then(|m| catalog.merchants.get(m));
    if let Some(token) = query.get("token") {
        let m = merchant_rec.filter(|m| m.postback_token).ok_or_else(|| fail(SignatureFailure::Mismatch))?;
        if !ip_allowed(peer.ip(), &m.allowed_ips) {
            return Err(ApiError::TokenIpNotAllowed);
        }
        let stored = catalog.postback_tokens.get(&m.id).ok_or_else(|| fail(SignatureFailure::Mismatch))?;
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if !bool::from(given.ct_eq(stored)) {
            return Err(fail(SignatureFailure::Mismatch));
        }
    } else {
        let keys = merchant.as_ref().and_then(|m| catalog.secrets.get(m)).into_iter().flat_map(|s| s.active_keys(now));
        signing::postback::verify(
            keys,
            req.uri().path(),
            &query,
            now.div_euclid(1000),
            ctx.settings.signing.tolerance_seconds,
        )
        .map_err(fail)?;
    }
    let merchant = merchant.ok_or_else(|| fail(SignatureFailure::Mismatch))?;
    spend_quota(ctx, &merchant, None)?;
    let input = postback_input(&query, now)?;
    convert_one(ctx, merchant, input, now, StatusCode::OK).await
}

/// The conversion fields of a postback query, validated like a JSON body.
fn postback_input(query: &Query, now: i64) -> Result<ConversionInput, ApiError> {
    let mut fields = serde_json::Map::new();
    for (name, value) in &query.0 {
        match name.as_str() {
            "ts" | "sig" | "token" => {}
            "metadata" => {
                return Err(FieldError::new("metadata", "is not available in postback URLs; use the POST API").into())
            }
            _ => {
                fields.insert(name.clone(), serde_json::Value::String(value.clone()));
            }
        }
    }
    let body: ConversionBody = serde_path_to_error::deserialize(serde_json::Value::Object(fields)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let named = message.split('`').nth(1).unwrap_or("");
        let field = if path == "." { named.to_string() } else { path };
        ApiError::Invalid(FieldError::new(field, message))
    })?;
    Ok(body.into_input(now)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    conversions: Vec<Box<RawValue>>,
}

#[derive(Serialize)]
struct BatchItem<'a> {
    index: usize,
    status: u16,
    /// The single answer; nested because its own `status` (the conversion's) would
    /// clash with the item's HTTP status.
    #[serde(rename = "conversion", skip_serializing_if = "Option::is_none")]
    answer: Option<ConversionView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<serde_json::Value>,
}

/// `POST /v1/merchants/{id}/conversions/batch`: up to 1,000 conversions, one result each,
/// in order; valid items are stored in one write even when others fail.
async fn batch(
    ctx: &Ctx,
    peer: SocketAddr,
    merchant_raw: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let s = signed(ctx, peer, Sender::Merchant(merchant_raw), req, ctx.settings.http.max_batch_body_bytes).await?;
    let body: BatchBody = s.parse(ctx)?;
    if body.conversions.len() > MAX_BATCH_ITEMS {
        s.release(ctx);
        return Err(FieldError::new("conversions", format!("at most {MAX_BATCH_ITEMS} items")).into());
    }
    let mut problems: Vec<(usize, ApiError)> = Vec::new();
    let mut valid: Vec<(usize, ConversionInput)> = Vec::new();
    for (i, raw) in body.conversions.iter().enumerate() {
        let item = parse_json::<ConversionBody>(raw.get().as_bytes()).and_then(|b| Ok(b.into_input(s.now)?));
        match item {
            Ok(input) => valid.push((i, input)),
            Err(e) => problems.push((i, e)),
        }
    }
    let (indexes, inputs): (Vec<usize>, Vec<ConversionInput>) = valid.into_iter().unzip();
    let outcomes = if inputs.is_empty() {
        Vec::new()
    } else {
        ctx.backend.convert_batch(s.merchant.clone(), inputs, s.now).await?
    };

    let mut items: Vec<(usize, u16, Option<ConversionOutcome>, Option<ApiError>)> =
        Vec::with_capacity(body.conversions.len());
    let count = |o: &str| ctx.metrics.conversions.with_label_values(&[o]).inc();
    for (i, outcome) in indexes.into_iter().zip(outcomes) {
        match outcome {
            ConversionOutcome::Created(rec) => {
                count("created");
                ctx.metrics.count_attribution(&rec);
                items.push((i, 201, Some(ConversionOutcome::Created(rec)), None));
            }
            ConversionOutcome::Duplicate(rec) => {
                count("duplicate");
                items.push((i, 200, Some(ConversionOutcome::Duplicate(rec)), None));
            }
            ConversionOutcome::Conflict(rec) => {
                count("conflict");
                let e = ApiError::DuplicateConflict {
                    txn_id: rec.txn_id.to_string(),
                    conversion_id: rec.conversion_id.to_string(),
                };
                items.push((i, 409, None, Some(e)));
            }
        }
    }
    for (i, e) in problems {
        count("invalid");
        items.push((i, e.status().as_u16(), None, Some(e)));
    }
    items.sort_by_key(|(i, ..)| *i);
    let results: Vec<BatchItem> = items
        .iter()
        .map(|(index, status, outcome, problem)| BatchItem {
            index: *index,
            status: *status,
            answer: outcome.as_ref().map(|o| match o {
                ConversionOutcome::Created(r) => ConversionView::new(r, false),
                ConversionOutcome::Duplicate(r) | ConversionOutcome::Conflict(r) => ConversionView::new(r, true),
            }),
            problem: problem.as_ref().map(ApiError::problem_json),
        })
        .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "results": results })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerClickBody {
    link_id: String,
    #[serde(default)]
    sub1: Option<String>,
    #[serde(default)]
    sub2: Option<String>,
    #[serde(default)]
    sub3: Option<String>,
    #[serde(default)]
    sub4: Option<String>,
    #[serde(default)]
    sub5: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    user_agent: Option<String>,
}

/// `POST /v1/merchants/{id}/clicks`: a click registered by the merchant's server (app
/// flows); counted like a redirect, answered with the click id and the destination.
async fn server_click(
    ctx: &Ctx,
    peer: SocketAddr,
    merchant_raw: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (s, body) = signed_json::<ServerClickBody>(ctx, peer, Sender::Merchant(merchant_raw), req).await?;
    let invalid = |field: &str, detail: &str| {
        s.release(ctx);
        ApiError::Invalid(FieldError::new(field, detail))
    };
    let catalog = ctx.backend.catalog();
    let link = LinkId::parse(&body.link_id)
        .ok()
        .and_then(|id| active_link(&catalog, &id))
        .filter(|l| l.merchant_id == s.merchant)
        .ok_or_else(|| invalid("link_id", "is not an active link of this merchant"))?;
    let ip = match body.ip.as_deref() {
        Some(text) => text.parse::<IpAddr>().map_err(|_| invalid("ip", "must be an IPv4 or IPv6 address"))?,
        None => peer.ip(),
    };
    let subs = [body.sub1, body.sub2, body.sub3, body.sub4, body.sub5].map(|s| s.map(|v| truncate(&v, MAX_SUB_LEN)));
    let click_id = Ulid::mint(s.now);
    let destination = location(link, &click_id, &subs, None);
    let input = ClickInput { subs, ip, user_agent: body.user_agent.unwrap_or_default() };
    record_click(ctx, link, input, click_id, s.now).await?;
    Ok(json(StatusCode::CREATED, &serde_json::json!({ "click_id": click_id.to_string(), "destination": destination })))
}
