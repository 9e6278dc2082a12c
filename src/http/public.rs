//! The public listener: click redirects and the merchant API.

use std::net::SocketAddr;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::problem::ApiError;
use super::views::ConversionView;
use super::{json, parse_json, read_body, require_json, single_header, Body, Ctx, Route};
use crate::domain::click::{is_bot, reduce_ip, truncate, visitor_hash, ClickRecord, MAX_SUB_LEN, MAX_USER_AGENT_LEN};
use crate::domain::conversion::ConversionBody;
use crate::domain::entities::Status;
use crate::domain::ids::{LinkId, MerchantId, Ulid};
use crate::domain::link::MacroValues;
use crate::signing::{self, ReplayGuard, SignatureFailure, WebhookHeaders};
use crate::store::ConversionOutcome;

type Answer = (Route, Result<Response<Body>, ApiError>);

pub(super) async fn handle(ctx: &Ctx, peer: SocketAddr, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["c", link]) => (Route::Click, click(ctx, peer, link, &req).await),
        (_, ["c", _]) => (Route::Click, Err(ApiError::MethodNotAllowed)),
        (&Method::POST, ["v1", "merchants", merchant, "conversions"]) => {
            (Route::Conversion, conversion(ctx, merchant, req).await)
        }
        (_, ["v1", "merchants", _, "conversions"]) => (Route::Conversion, Err(ApiError::MethodNotAllowed)),
        _ => (Route::NotFound, Err(ApiError::NotFound)),
    }
}

/// Browsers announce speculative loads with one of these headers; they are redirected
/// but not recorded.
fn is_prefetch(headers: &HeaderMap) -> bool {
    let has = |name: &str, needle: &str| {
        headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(|s| s.to_ascii_lowercase().contains(needle)))
    };
    has("purpose", "prefetch")
        || has("sec-purpose", "prefetch")
        || has("x-moz", "prefetch")
        || has("x-purpose", "preview")
}

async fn click(
    ctx: &Ctx,
    peer: SocketAddr,
    link_raw: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let not_found = || {
        ctx.metrics.clicks.with_label_values(&["not_found"]).inc();
        ApiError::NotFound
    };
    let link_id = LinkId::parse(link_raw).map_err(|_| not_found())?;
    let catalog = ctx.store.catalog();
    let link = catalog.links.get(&link_id).filter(|l| l.status == Status::Active).ok_or_else(not_found)?;
    catalog
        .partner_of(&link.merchant_id, &link.partner_id)
        .filter(|p| p.status == Status::Active)
        .ok_or_else(not_found)?;

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
    let click_text = click_id.to_string();
    let values = MacroValues {
        click_id: &click_text,
        link_id: link.id.as_str(),
        partner_id: link.partner_id.as_str(),
        subs: &subs,
    };
    let location = link.redirect_location(&values, deep_link.as_deref());

    if req.method() == Method::GET && !is_prefetch(req.headers()) {
        let ua = req
            .headers()
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let ua = truncate(&ua, MAX_USER_AGENT_LEN);
        let s = &ctx.settings.clicks;
        let bot = is_bot(&ua, &s.bot_user_agents);
        let ip = peer.ip();
        let record = ClickRecord {
            click_id,
            link_id: link.id.clone(),
            partner_id: link.partner_id.clone(),
            merchant_id: link.merchant_id.clone(),
            at_ms: now,
            subs,
            ip: reduce_ip(ip, s.ipv4_prefix, s.ipv6_prefix),
            visitor: visitor_hash(ctx.store.visitor_salt(), &link.id, ip, &ua),
            user_agent: ua,
            bot,
            unique: false,
        };
        ctx.store.record_click(record).await?;
        ctx.metrics.clicks.with_label_values(&[if bot { "bot" } else { "recorded" }]).inc();
    }

    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::FOUND;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_str(&location).map_err(|_| ApiError::NotFound)?);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Checks the Standard Webhooks signature against the merchant's active secrets, then
/// the replay guard. An unknown merchant fails like a wrong secret (no enumeration).
fn verify_merchant(
    ctx: &Ctx,
    merchant: Option<&MerchantId>,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: i64,
) -> Result<(), SignatureFailure> {
    let get = |name| single_header(headers, name).map_err(|()| SignatureFailure::Malformed);
    let wh = WebhookHeaders {
        id: get("webhook-id")?,
        timestamp: get("webhook-timestamp")?,
        signature: get("webhook-signature")?,
    };
    let catalog = ctx.store.catalog();
    let secrets = merchant.and_then(|m| catalog.secrets.get(m));
    let keys = secrets.into_iter().flat_map(|s| s.active_keys(now_ms));
    // No secrets (unknown merchant) means no key can match: `Mismatch`, like a wrong secret.
    signing::verify(keys, wh, body, now_ms.div_euclid(1000), ctx.settings.signing.tolerance_seconds)?;
    let (Some(m), Some(id)) = (merchant, wh.id) else { return Err(SignatureFailure::Missing) };
    let mut guard = ctx.replay.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = guard.evicted_early;
    let r = guard.check(m.as_str(), id, ReplayGuard::body_hash(body), now_ms);
    ctx.metrics.replay_evictions.inc_by(guard.evicted_early - before);
    r.map_err(|_| SignatureFailure::Replay)
}

fn forget_webhook_id(ctx: &Ctx, merchant: &MerchantId, headers: &HeaderMap, body: &[u8]) {
    if let Ok(Some(id)) = single_header(headers, "webhook-id") {
        let mut guard = ctx.replay.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.forget(merchant.as_str(), id, ReplayGuard::body_hash(body));
    }
}

async fn conversion(ctx: &Ctx, merchant_raw: &str, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let count = |outcome: &str| ctx.metrics.conversions.with_label_values(&[outcome]).inc();
    let result = conversion_inner(ctx, merchant_raw, req).await;
    match &result {
        Ok(r) if r.status() == StatusCode::CREATED => count("created"),
        Ok(_) => count("duplicate"),
        Err(ApiError::DuplicateConflict { .. }) => count("conflict"),
        Err(ApiError::Signature(reason)) => {
            count("unauthorized");
            ctx.metrics.signature_failures.with_label_values(&[reason.as_str()]).inc();
        }
        Err(ApiError::Storage(_)) => count("error"),
        Err(_) => count("invalid"),
    }
    result
}

async fn conversion_inner(ctx: &Ctx, merchant_raw: &str, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let merchant = MerchantId::parse(merchant_raw).ok();
    let (parts, body) = req.into_parts();
    let body = read_body(ctx, &parts.headers, body, ctx.settings.http.max_body_bytes).await?;
    let now = ctx.clock.now_ms();
    verify_merchant(ctx, merchant.as_ref(), &parts.headers, &body, now).map_err(ApiError::Signature)?;
    let Some(merchant) = merchant else { return Err(ApiError::Signature(SignatureFailure::Mismatch)) };
    let input = require_json(&parts.headers)
        .and_then(|()| parse_json::<ConversionBody>(&body))
        .and_then(|b| b.into_input(now).map_err(ApiError::from));
    let input = match input {
        Ok(i) => i,
        Err(e) => {
            forget_webhook_id(ctx, &merchant, &parts.headers, &body);
            return Err(e);
        }
    };
    let outcome = ctx.store.convert(merchant, input, now).await?;
    conversion_answer(ctx, outcome)
}

fn conversion_answer(ctx: &Ctx, outcome: ConversionOutcome) -> Result<Response<Body>, ApiError> {
    match outcome {
        ConversionOutcome::Created(rec) => {
            if let Some(a) = &rec.attribution {
                ctx.metrics.attributions.with_label_values(&[a.rule.as_str(), a.credit.as_str()]).inc();
            } else {
                ctx.metrics.attributions.with_label_values(&["none", "none"]).inc();
            }
            Ok(json(StatusCode::CREATED, &ConversionView::new(&rec, false)))
        }
        ConversionOutcome::Duplicate(rec) => {
            let mut resp = json(StatusCode::OK, &ConversionView::new(&rec, true));
            resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(resp)
        }
        ConversionOutcome::Conflict(rec) => Err(ApiError::DuplicateConflict {
            txn_id: rec.txn_id.to_string(),
            conversion_id: rec.conversion_id.to_string(),
        }),
    }
}
