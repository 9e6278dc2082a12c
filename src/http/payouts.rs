//! What each partner is owed (SPEC 9.1): balances per currency and monthly statements.
//! Balances are kept by the engine as money moves; a statement is read from the ledger.

use std::collections::BTreeMap;

use http::{HeaderMap, Response, StatusCode};
use jiff::civil::Date;

use super::csv;
use super::problem::ApiError;
use super::reports::wants_csv;
use super::{json, Body, Ctx};
use crate::domain::clock::{format_rfc3339, UnixMillis};
use crate::domain::ids::{MerchantId, PartnerId};
use crate::domain::ledger::LedgerEntry;
use crate::domain::money::{Currency, Money};

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

/// The first instant of a `YYYY-MM` month (UTC) and of the next one.
fn month_bounds(month: &str) -> Result<(UnixMillis, UnixMillis), ApiError> {
    let parsed = (month.len() == 7 && month.as_bytes()[4] == b'-')
        .then(|| format!("{month}-01").parse::<Date>().ok())
        .flatten()
        .ok_or(ApiError::NotFound)?;
    let start = |d: Date| {
        d.to_zoned(jiff::tz::TimeZone::UTC).map(|z| z.timestamp().as_millisecond()).map_err(|_| ApiError::NotFound)
    };
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
