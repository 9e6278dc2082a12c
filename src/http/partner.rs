//! Partners reading their own figures (SPEC 5.1): the conversions that credit them and
//! their monthly statements, over signed GET URLs keyed with the partner's secret (SPEC
//! 4.2: `ts` and `sig` over `"GET\n" + path + "\n" + canonical query`).
//!
//! A partner sees only its own data. A request signed with another partner's secret (a
//! partner asking for someone else's figures) is `404`, like an unknown partner; a missing,
//! stale or tampered signature is `401`. Reasons never name another partner.

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::problem::ApiError;
use super::{json, Body, Ctx};
use crate::domain::clock::format_rfc3339;
use crate::domain::conversion::ConversionRecord;
use crate::domain::entities::Partner;
use crate::domain::ids::{PartnerId, Ulid};
use crate::domain::FieldError;
use crate::signing::postback::{verify, Query};
use crate::signing::SignatureFailure;

/// Most conversions one page holds.
const MAX_PAGE: usize = 500;

/// The partner the URL names, once its signature holds.
fn authenticate(ctx: &Ctx, peer: SocketAddr, raw: &str, req: &Request<Incoming>) -> Result<(Partner, Query), ApiError> {
    let query = Query::parse(req.uri().query().unwrap_or("")).map_err(|e| ApiError::InvalidQuery(e.to_string()))?;
    ctx.limits.check_blocked(peer.ip()).map_err(ApiError::RateLimited)?;
    let (now, tolerance) = (ctx.clock.now_ms(), ctx.settings.signing.tolerance_seconds);
    let catalog = ctx.backend.catalog();
    let named = PartnerId::parse(raw).ok();
    let keys = named.as_ref().and_then(|p| catalog.partner_secrets.get(p)).into_iter().flat_map(|s| s.active_keys(now));
    let path = req.uri().path();
    match verify(keys, path, &query, now.div_euclid(1000), tolerance) {
        Ok(()) => {
            let partner = named.as_ref().and_then(|p| catalog.partners.get(p)).ok_or(ApiError::NotFound)?;
            Ok((partner.clone(), query))
        }
        Err(reason) => {
            // Signed by another partner: it asks for figures that are not its own.
            let by_another =
                reason == SignatureFailure::Mismatch
                    && catalog.partner_secrets.iter().filter(|(id, _)| Some(*id) != named.as_ref()).any(|(_, s)| {
                        verify(s.active_keys(now), path, &query, now.div_euclid(1000), tolerance).is_ok()
                    });
            if by_another {
                return Err(ApiError::NotFound);
            }
            Err(super::public::signature_failed(ctx, peer, reason))
        }
    }
}

/// `text` with every `partner <id>` other than `me` replaced by `another partner`.
fn only_me(text: &str, me: &PartnerId) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("partner ") {
        let (head, tail) = rest.split_at(at + "partner ".len());
        let id_len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).unwrap_or(tail.len());
        let id = &tail[..id_len];
        if id.is_empty() || id == me.as_str() {
            out.push_str(head);
            out.push_str(id);
        } else {
            out.push_str(&head[..at]);
            out.push_str("another partner");
        }
        rest = &tail[id_len..];
    }
    out.push_str(rest);
    out
}

/// A conversion as the partner it credits sees it: its own credit, rule, reason and
/// commission; nothing about other partners.
fn view(rec: &ConversionRecord, me: &PartnerId) -> Option<serde_json::Value> {
    let a = rec.attribution.as_ref()?;
    let (credit, rule, reason, commission) = if a.partner_id == *me {
        ("sourced", a.rule.as_str(), a.reason.as_str(), rec.commission.as_ref().map(|c| c.amount))
    } else {
        let i = a.influencers.iter().find(|i| i.partner_id == *me)?;
        ("influenced", i.rule.as_str(), i.reason.as_str(), i.commission)
    };
    Some(serde_json::json!({
        "conversion_id": rec.conversion_id.to_string(),
        "txn_id": rec.txn_id.as_str(),
        "event": rec.event,
        "amount": rec.amount.map(|m| serde_json::json!({"amount": m.amount_text(), "currency": m.currency})),
        "occurred_at": format_rfc3339(rec.occurred_ms),
        "received_at": format_rfc3339(rec.received_ms),
        "status": rec.status.as_str(),
        "credit": credit,
        "rule": rule,
        "reason": only_me(reason, me),
        "commission": commission.map(|m| serde_json::json!({"amount": m.amount_text(), "currency": m.currency})),
    }))
}

fn date_ms(field: &'static str, value: &str) -> Result<i64, ApiError> {
    let bad = || FieldError::new(field, format!("{value:?} is not a date: YYYY-MM-DD (UTC)"));
    let d: jiff::civil::Date = (value.len() == 10).then(|| value.parse().ok()).flatten().ok_or_else(bad)?;
    super::reports::utc_start(d).ok_or_else(|| bad().into())
}

/// `GET /v1/partners/{id}/conversions?from=&to=&after=&limit=`: received from `from` to
/// `to` (UTC days, `to` included), oldest first, paged by `after` (a conversion id).
pub(super) async fn conversions(
    ctx: &Ctx,
    peer: SocketAddr,
    raw: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (partner, query) = authenticate(ctx, peer, raw, req)?;
    let mut from = Ulid([0; 16]);
    let mut until = Ulid([0xff; 16]);
    let mut limit = 100;
    if let Some(v) = query.get("from") {
        from = Ulid::from_parts(date_ms("from", v)?, [0; 10]);
    }
    if let Some(v) = query.get("to") {
        until = Ulid::from_parts(date_ms("to", v)? + 86_400_000, [0; 10]);
    }
    if let Some(v) = query.get("after") {
        let after = Ulid::parse(v).map_err(|_| FieldError::new("after", "is not a conversion id"))?;
        from = from.max(Ulid(u128::from_be_bytes(after.0).saturating_add(1).to_be_bytes()));
    }
    if let Some(v) = query.get("limit") {
        limit = v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| FieldError::new("limit", format!("must be 1..{MAX_PAGE}")))?;
    }
    let records = ctx.backend.partner_conversions(&partner.id, from, until, limit).await?;
    let next = (records.len() == limit).then(|| records.last().map(|r| r.conversion_id.to_string())).flatten();
    let list: Vec<serde_json::Value> = records.iter().filter_map(|r| view(r, &partner.id)).collect();
    let body = serde_json::json!({"partner_id": partner.id, "conversions": list, "next_after": next});
    Ok(json(StatusCode::OK, &body))
}

/// `GET /v1/partners/{id}/statements/{YYYY-MM}`: the statement an admin reads, for the
/// partner itself.
pub(super) async fn statement(
    ctx: &Ctx,
    peer: SocketAddr,
    raw: &str,
    month: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (partner, _) = authenticate(ctx, peer, raw, req)?;
    super::payouts::statement(ctx, &partner.merchant_id, &partner.id, month, req.headers()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_never_name_another_partner() {
        let me = PartnerId::parse("beta").unwrap();
        let cases = [
            (
                "partner beta registered deal D-22 on account acme.com after another partner; partner alpha sourced it",
                "partner beta registered deal D-22 on account acme.com after another partner; another partner sourced it",
            ),
            (
                "account acme.com was reassigned to partner beta by ops, taking it from partner alpha-2",
                "account acme.com was reassigned to partner beta by ops, taking it from another partner",
            ),
            ("partner beta given explicitly", "partner beta given explicitly"),
            ("partner ", "partner "),
        ];
        for (input, want) in cases {
            assert_eq!(only_me(input, &me), want);
        }
    }
}
