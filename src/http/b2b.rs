//! The partner API (deal registration) and the merchant's money and CRM calls:
//! adjustments and touches (SPEC 5.1, 8, 9).

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::problem::ApiError;
use super::public::{signed_json, Sender};
use super::views::{ConversionView, LedgerEntryView, MoneyView};
use super::{json, replayed, Body, Ctx};
use crate::backend::BackendExt;
use crate::domain::account::{check_text_id, normalize_account, DealBody, Touch, TouchBody, TouchKind};
use crate::domain::clock::{format_rfc3339, parse_rfc3339};
use crate::domain::conversion::{AdjustmentBody, MAX_AGE_DAYS, MAX_AHEAD_SECONDS};
use crate::domain::FieldError;
use crate::engine::{AdjustOutcome, DealDraft, DealOutcome, Refusal};

/// A time given by the caller: at most 400 days old, at most 5 minutes ahead.
fn past_time(field: &str, text: Option<&str>, now: i64) -> Result<i64, FieldError> {
    let Some(text) = text else { return Ok(now) };
    let at = parse_rfc3339(text).map_err(|e| FieldError::new(field, e))?;
    if at < now - MAX_AGE_DAYS * 86_400_000 || at > now + MAX_AHEAD_SECONDS * 1000 {
        return Err(FieldError::new(field, "must be within the last 400 days and not in the future"));
    }
    Ok(at)
}

/// `POST /v1/partners/{partner_id}/deals`, signed with the partner's secret.
pub(super) async fn register_deal(
    ctx: &Ctx,
    peer: SocketAddr,
    partner_raw: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (s, body) = signed_json::<DealBody>(ctx, peer, Sender::Partner(partner_raw), req).await?;
    let Some(partner) = s.partner.clone() else { return Err(ApiError::NotFound) };
    if let Err(e) = check_text_id("deal_id", &body.deal_id) {
        return s.refuse(ctx, e);
    }
    if let Some(o) = &body.opportunity_id {
        if let Err(e) = check_text_id("opportunity_id", o) {
            return s.refuse(ctx, e);
        }
    }
    let account = match normalize_account(&body.account) {
        Ok(a) => a,
        Err(e) => return s.refuse(ctx, FieldError::new("account", e)),
    };
    let registered_ms = match past_time("registered_at", body.registered_at.as_deref(), s.now) {
        Ok(t) => t,
        Err(e) => return s.refuse(ctx, e),
    };
    let draft = DealDraft {
        merchant: s.merchant.clone(),
        partner,
        deal_id: body.deal_id,
        account,
        opportunity_id: body.opportunity_id,
        registered_ms,
    };
    let (answer, replay) = ctx.backend.register_deal(draft).await?;
    let resp = if answer.outcome == DealOutcome::Taken {
        // Never says who holds the account.
        let e = ApiError::Refused(Refusal {
            conflict: true,
            code: "account_already_registered",
            field: Some("account"),
            detail: format!(
                "account {} is already registered by another partner; your registration is recorded as a touch",
                answer.account
            ),
            current_status: None,
        });
        e.into_response()
    } else {
        let status = if answer.outcome == DealOutcome::Registered { StatusCode::CREATED } else { StatusCode::OK };
        json(
            status,
            &json!({
                "deal_id": answer.deal_id,
                "account": answer.account,
                "status": "accepted",
                "source_of_record": answer.source_of_record,
                "expires_at": answer.expires_ms.map(format_rfc3339),
            }),
        )
    };
    Ok(if replay { replayed(resp) } else { resp })
}

/// The answer to an adjustment.
#[derive(serde::Serialize)]
struct AdjustmentView<'a> {
    adjustment_id: &'a str,
    txn_id: &'a str,
    kind: &'static str,
    amount: Option<MoneyView>,
    status: &'static str,
    ledger: Vec<LedgerEntryView>,
    conversion: ConversionView<'a>,
}

/// `POST /v1/merchants/{id}/touches`: a partner influenced an account (from the CRM).
pub(super) async fn touch(
    ctx: &Ctx,
    peer: SocketAddr,
    merchant_raw: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (s, body) = signed_json::<TouchBody>(ctx, peer, Sender::Merchant(merchant_raw), req).await?;
    let account = match normalize_account(&body.account) {
        Ok(a) => a,
        Err(e) => return s.refuse(ctx, FieldError::new("account", e)),
    };
    if ctx.backend.catalog().partner_of(&s.merchant, &body.partner_id).is_none() {
        return s.refuse(ctx, FieldError::new("partner_id", "is not a partner of this merchant"));
    }
    let label = body.kind.unwrap_or_else(|| "crm".into());
    if let Err(e) = check_text_id("kind", &label) {
        return s.refuse(ctx, e);
    }
    let at_ms = match past_time("occurred_at", body.occurred_at.as_deref(), s.now) {
        Ok(t) => t,
        Err(e) => return s.refuse(ctx, e),
    };
    let touch = Touch { partner_id: body.partner_id.clone(), kind: TouchKind::Crm, label: label.clone(), at_ms };
    ctx.backend.touch(s.merchant.clone(), account.clone(), touch).await?;
    let answer =
        json!({"account": account, "partner_id": body.partner_id, "kind": label, "occurred_at": format_rfc3339(at_ms)});
    Ok(json(StatusCode::CREATED, &answer))
}

/// `POST /v1/merchants/{id}/adjustments`: refund, chargeback, approve, reject.
pub(super) async fn adjust(
    ctx: &Ctx,
    peer: SocketAddr,
    merchant_raw: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (s, body) = signed_json::<AdjustmentBody>(ctx, peer, Sender::Merchant(merchant_raw), req).await?;
    let input = match body.into_input() {
        Ok(i) => i,
        Err(e) => return s.refuse(ctx, e),
    };
    let (stored, rec, replay) = match ctx.backend.adjust(s.merchant.clone(), input, s.now).await? {
        AdjustOutcome::Applied(a, r) => (a, r, false),
        AdjustOutcome::Replay(a, r) => (a, r, true),
        AdjustOutcome::Refused(refusal) => {
            s.release(ctx);
            return Err(ApiError::Refused(refusal));
        }
    };
    let ledger = match &rec.attribution {
        Some(_) => {
            let all = ctx.backend.ledger_for_conversion(&rec).await?;
            all.into_iter().filter(|e| stored.ledger_entries.contains(&e.entry_id)).collect()
        }
        None => Vec::new(),
    };
    // A typed body, not `json!`: the conversion's metadata is written as the stored text,
    // never parsed again (parsing it into a `Value` could fail and panic inside `json!`).
    let body = AdjustmentView {
        adjustment_id: &stored.input.adjustment_id,
        txn_id: stored.input.txn_id.as_str(),
        kind: stored.input.kind.as_str(),
        amount: stored.amount.as_ref().map(MoneyView::from),
        status: stored.status_after.as_str(),
        ledger: ledger.iter().map(LedgerEntryView::from).collect(),
        conversion: ConversionView::new(&rec, false),
    };
    let status = if replay { StatusCode::OK } else { StatusCode::CREATED };
    let resp = json(status, &body);
    Ok(if replay { replayed(resp) } else { resp })
}
