//! What each partner is owed and was paid (SPEC 9.1): balances per currency, payout runs
//! and their lines, monthly statements. Balances and runs are kept by the engine as money
//! moves; a statement is read from the ledger.

use std::collections::BTreeMap;

use http::{HeaderMap, Response, StatusCode};
use jiff::civil::Date;

use super::csv;
use super::problem::ApiError;
use super::reports::{utc_start, wants_csv};
use super::{json, Body, Ctx};
use crate::backend::BackendExt;
use crate::domain::clock::{format_rfc3339, UnixMillis};
use crate::domain::ids::{MerchantId, PartnerId};
use crate::domain::ledger::LedgerEntry;
use crate::domain::money::{Currency, Money};
use crate::domain::payout::{check_payout_id, LineState, PayoutRequest, PayoutRun};
use crate::domain::FieldError;
use crate::engine::{Entropy, PayoutAnswer, PayoutOp, Settlement};

fn text(minor: i64, currency: Currency) -> String {
    Money { minor, currency }.amount_text()
}

/// `GET /admin/v1/merchants/{m}/partners/{p}/balance`.
pub(super) async fn balance(ctx: &Ctx, merchant: &MerchantId, partner: &PartnerId) -> Result<Response<Body>, ApiError> {
    let balances = ctx.backend.balances(merchant, partner).await?;
    let rows: Vec<serde_json::Value> = balances
        .iter()
        .map(|(c, b)| {
            serde_json::json!({
                "currency": c,
                "pending": text(b.pending, *c),
                "approved": text(b.approved, *c),
                "reversed": text(b.reversed, *c),
                "paid": text(b.paid, *c),
                "in_payout_runs": text(b.in_runs, *c),
                "payable": text(b.payable(), *c),
            })
        })
        .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({"partner_id": partner, "balances": rows})))
}

/// `POST /admin/v1/merchants/{m}/payouts`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PayoutBody {
    payout_id: String,
    currency: Currency,
    #[serde(default)]
    min_amount: Option<String>,
    through: String,
}

/// Parses and checks a payout run's body.
fn payout_request(body: PayoutBody) -> Result<PayoutRequest, ApiError> {
    check_payout_id(&body.payout_id).map_err(|e| FieldError::new("payout_id", e))?;
    let min_amount = Money::parse(body.min_amount.as_deref().unwrap_or("0.01"), body.currency)
        .map_err(|e| FieldError::new("min_amount", e))?;
    let day = (body.through.len() == 10)
        .then(|| body.through.parse::<Date>().ok())
        .flatten()
        .ok_or_else(|| FieldError::new("through", "must be a date, YYYY-MM-DD (UTC)"))?;
    let next = day.tomorrow().map_err(|_| FieldError::new("through", "is past the last supported date"))?;
    let through_end_ms = utc_start(next).ok_or_else(|| FieldError::new("through", "cannot be placed in time"))?;
    Ok(PayoutRequest {
        payout_id: body.payout_id,
        currency: body.currency,
        min_amount,
        through: body.through,
        through_end_ms,
    })
}

fn run_json(run: &PayoutRun, catalog: &crate::engine::Catalog) -> serde_json::Value {
    let c = run.request.currency;
    let total: i64 = run.lines.iter().map(|l| l.amount.minor).sum();
    serde_json::json!({
        "payout_id": run.request.payout_id,
        "currency": c,
        "min_amount": run.request.min_amount.amount_text(),
        "through": run.request.through,
        "created_at": format_rfc3339(run.created_ms),
        "total": text(total, c),
        "lines": run.lines.iter().map(|l| {
            let (reference, reason, settled) = match &l.state {
                LineState::Pending => (None, None, None),
                LineState::Paid { reference, at_ms } => (Some(reference.as_str()), None, Some(format_rfc3339(*at_ms))),
                LineState::Failed { reason, at_ms } => (None, Some(reason.as_str()), Some(format_rfc3339(*at_ms))),
            };
            serde_json::json!({
                "partner_id": l.partner_id,
                "name": catalog.partner_of(&run.merchant_id, &l.partner_id).map(|p| p.name.as_str()),
                "amount": l.amount.amount_text(),
                "state": l.state.as_str(),
                "reference": reference,
                "reason": reason,
                "settled_at": settled,
                "entry_id": l.entry_id.to_string(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// The answer to a payout command, as HTTP.
fn payout_answer(ctx: &Ctx, answer: PayoutAnswer, created: StatusCode) -> Result<Response<Body>, ApiError> {
    let catalog = ctx.backend.catalog();
    match answer {
        PayoutAnswer::Run(run, false) => Ok(json(created, &run_json(&run, &catalog))),
        PayoutAnswer::Run(run, true) => Ok(super::replayed(json(StatusCode::OK, &run_json(&run, &catalog)))),
        PayoutAnswer::Settled(run) => Ok(json(StatusCode::OK, &run_json(&run, &catalog))),
        PayoutAnswer::NotFound => Err(ApiError::NotFound),
        PayoutAnswer::Refused(r) => Err(ApiError::Refused(r)),
    }
}

/// `POST /admin/v1/merchants/{m}/payouts`: `201` with the run, `200` replaying it for
/// the same body, `409 payout_conflict` for another body under the same id.
pub(super) async fn run(ctx: &Ctx, merchant: &MerchantId, body: PayoutBody) -> Result<Response<Body>, ApiError> {
    let request = payout_request(body)?;
    let op = PayoutOp::Run { merchant: merchant.clone(), request, at: ctx.clock.now_ms(), entropy: Entropy::random() };
    let answer = ctx.backend.payout_op(op).await?;
    payout_answer(ctx, answer, StatusCode::CREATED)
}

const PAYMENT_COLUMNS: [&str; 6] = ["partner_id", "name", "amount", "currency", "payout_id", "reference"];

/// `GET /admin/v1/merchants/{m}/payouts/{id}`: the run, or its payment file as CSV.
pub(super) async fn get(
    ctx: &Ctx,
    merchant: &MerchantId,
    payout_id: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let run = ctx.backend.payout(merchant, payout_id).await?.ok_or(ApiError::NotFound)?;
    let catalog = ctx.backend.catalog();
    if !wants_csv(headers) {
        return Ok(json(StatusCode::OK, &run_json(&run, &catalog)));
    }
    let mut out = String::new();
    csv::row(&mut out, PAYMENT_COLUMNS);
    for l in &run.lines {
        let name = catalog.partner_of(merchant, &l.partner_id).map_or("", |p| p.name.as_str());
        let reference = match &l.state {
            LineState::Paid { reference, .. } => reference.as_str(),
            _ => "",
        };
        let amount = l.amount.amount_text();
        csv::row(&mut out, [l.partner_id.as_str(), name, &amount, l.amount.currency.as_str(), payout_id, reference]);
    }
    Ok(csv::response(out, &format!("payout-{payout_id}.csv")))
}

/// `:paid {"reference"}` and `:failed {"reason"}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SettleBody {
    #[serde(default)]
    reference: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /admin/v1/merchants/{m}/payouts/{id}/lines/{p}:paid` or `:failed`.
pub(super) async fn settle(
    ctx: &Ctx,
    merchant: &MerchantId,
    payout_id: &str,
    partner: PartnerId,
    paid: bool,
    body: SettleBody,
) -> Result<Response<Body>, ApiError> {
    let (field, value) = if paid { ("reference", body.reference) } else { ("reason", body.reason) };
    let value = value.ok_or_else(|| FieldError::new(field, "is required"))?;
    crate::domain::account::check_text_id(field, &value)?;
    let outcome = if paid { Settlement::Paid { reference: value } } else { Settlement::Failed { reason: value } };
    let op = PayoutOp::Settle {
        merchant: merchant.clone(),
        payout_id: payout_id.to_string(),
        partner,
        outcome,
        at: ctx.clock.now_ms(),
        entropy: Entropy::random(),
    };
    let answer = ctx.backend.payout_op(op).await?;
    payout_answer(ctx, answer, StatusCode::OK)
}

/// The first instant of a `YYYY-MM` month (UTC) and of the next one.
fn month_bounds(month: &str) -> Result<(UnixMillis, UnixMillis), ApiError> {
    let parsed = (month.len() == 7 && month.as_bytes()[4] == b'-')
        .then(|| format!("{month}-01").parse::<Date>().ok())
        .flatten()
        .ok_or(ApiError::NotFound)?;
    let start = |d: Date| utc_start(d).ok_or(ApiError::NotFound);
    let next = parsed.checked_add(jiff::Span::new().months(1)).map_err(|_| ApiError::NotFound)?;
    Ok((start(parsed)?, start(next)?))
}

/// One currency's statement.
struct Statement<'a> {
    currency: Currency,
    opening: i64,
    entries: Vec<&'a LedgerEntry>,
}

impl Statement<'_> {
    fn closing(&self) -> i64 {
        self.opening + self.entries.iter().map(|e| e.amount.minor).sum::<i64>()
    }
}

/// The statements of a month from a partner's entries (oldest first): per currency, the
/// sum of every earlier entry, the month's entries, and their sum.
fn statements(entries: &[LedgerEntry], from: UnixMillis, until: UnixMillis) -> Vec<Statement<'_>> {
    let mut by: BTreeMap<Currency, Statement<'_>> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.at_ms < until) {
        let s = by.entry(e.amount.currency).or_insert_with(|| Statement {
            currency: e.amount.currency,
            opening: 0,
            entries: Vec::new(),
        });
        if e.at_ms < from {
            s.opening += e.amount.minor;
        } else {
            s.entries.push(e);
        }
    }
    by.into_values().collect()
}

const STATEMENT_COLUMNS: [&str; 10] =
    ["line", "currency", "entry_id", "at", "kind", "txn_id", "conversion_id", "amount", "balance", "note"];

/// `GET /admin/v1/merchants/{m}/partners/{p}/statements/{YYYY-MM}`: opening balance, every
/// entry of the month with its conversion and why, closing balance; per currency. The
/// balance here is the ledger's: earned, minus reversed, minus paid, pending included.
pub(super) async fn statement(
    ctx: &Ctx,
    merchant: &MerchantId,
    partner: &PartnerId,
    month: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let (from, until) = month_bounds(month)?;
    let entries = ctx.backend.ledger_entries(merchant, partner).await?;
    let list = statements(&entries, from, until);
    if wants_csv(headers) {
        let mut out = String::new();
        csv::row(&mut out, STATEMENT_COLUMNS);
        for s in &list {
            let (cur, mut running) = (s.currency.as_str(), s.opening);
            let opening = text(s.opening, s.currency);
            csv::row(&mut out, ["opening", cur, "", "", "", "", "", "", &opening, ""]);
            for e in &s.entries {
                running += e.amount.minor;
                let (id, at, conv) = (e.entry_id.to_string(), format_rfc3339(e.at_ms), e.conversion_id.to_string());
                let (amount, balance) = (e.amount.amount_text(), text(running, s.currency));
                let note = e.note.as_deref().unwrap_or("");
                csv::row(
                    &mut out,
                    ["entry", cur, &id, &at, e.kind.as_str(), e.txn_id.as_str(), &conv, &amount, &balance, note],
                );
            }
            let closing = text(s.closing(), s.currency);
            csv::row(&mut out, ["closing", cur, "", "", "", "", "", "", &closing, ""]);
        }
        return Ok(csv::response(out, &format!("statement-{partner}-{month}.csv")));
    }
    let body: Vec<serde_json::Value> = list
        .iter()
        .map(|s| {
            serde_json::json!({
                "currency": s.currency,
                "opening": text(s.opening, s.currency),
                "entries": s.entries.iter().map(|e| serde_json::json!({
                    "entry_id": e.entry_id.to_string(),
                    "at": format_rfc3339(e.at_ms),
                    "kind": e.kind.as_str(),
                    "txn_id": e.txn_id.as_str(),
                    "conversion_id": e.conversion_id.to_string(),
                    "amount": e.amount.amount_text(),
                    "note": e.note,
                })).collect::<Vec<_>>(),
                "closing": text(s.closing(), s.currency),
            })
        })
        .collect();
    let answer = serde_json::json!({
        "partner_id": partner,
        "month": month,
        "from": format_rfc3339(from),
        "until": format_rfc3339(until),
        "statements": body,
    });
    Ok(json(StatusCode::OK, &answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{TxnId, Ulid};
    use crate::domain::ledger::LedgerKind;
    use proptest::prelude::*;

    #[test]
    fn months_run_from_the_first_to_the_next_first_in_utc() {
        let (a, b) = month_bounds("2026-02").unwrap();
        assert_eq!(
            (format_rfc3339(a).as_str(), format_rfc3339(b).as_str()),
            ("2026-02-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z")
        );
        assert_eq!(format_rfc3339(month_bounds("2026-12").unwrap().1), "2027-01-01T00:00:00.000Z");
        for bad in ["2026-13", "2026-1", "202602", "2026-02-01", "x"] {
            assert!(month_bounds(bad).is_err(), "{bad}");
        }
    }

    fn entry(at_ms: i64, minor: i64) -> LedgerEntry {
        LedgerEntry {
            entry_id: Ulid::from_parts(at_ms, [1; 10]),
            merchant_id: MerchantId::parse("m").unwrap(),
            partner_id: PartnerId::parse("p").unwrap(),
            kind: if minor >= 0 { LedgerKind::Commission } else { LedgerKind::Reversal },
            txn_id: TxnId::parse("t").unwrap(),
            conversion_id: Ulid::from_parts(at_ms, [2; 10]),
            amount: Money { minor, currency: Currency::parse("USD").unwrap() },
            at_ms,
            note: None,
        }
    }

    proptest! {
        /// Opening + entries = closing, and one month's closing is the next month's opening.
        #[test]
        fn statements_chain_from_month_to_month(amounts in proptest::collection::vec((0i64..90, -5_000i64..10_000), 0..40)) {
            let day = 86_400_000;
            let base = month_bounds("2026-01").unwrap().0;
            let mut entries: Vec<LedgerEntry> = amounts.iter().map(|(d, a)| entry(base + d * day, *a)).collect();
            entries.sort_by_key(|e| e.at_ms);
            let months = ["2026-01", "2026-02", "2026-03"];
            let mut last_closing = 0;
            for m in months {
                let (from, until) = month_bounds(m).unwrap();
                let list = statements(&entries, from, until);
                let (opening, closing) = list.first().map_or((last_closing, last_closing), |s| (s.opening, s.closing()));
                prop_assert_eq!(opening, last_closing);
                let month_sum: i64 = entries.iter().filter(|e| e.at_ms >= from && e.at_ms < until).map(|e| e.amount.minor).sum();
                prop_assert_eq!(closing, opening + month_sum);
                last_closing = closing;
            }
            prop_assert_eq!(last_closing, entries.iter().filter(|e| e.at_ms < month_bounds("2026-03").unwrap().1).map(|e| e.amount.minor).sum::<i64>());
        }
    }
}
