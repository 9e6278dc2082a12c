//! Reports and exports (SPEC 5.5): the partner report, program health and the ledger
//! export, as JSON or CSV. Reports read the rollups (never the events), one range read
//! per resolution and day; the export streams from one snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::csv;
use super::problem::ApiError;
use super::{json, Body, Ctx, Streamed};
use crate::backend::LedgerQuery;
use crate::domain::clock::{format_rfc3339, UnixMillis};
use crate::domain::ids::{MerchantId, PartnerId, Ulid};
use crate::domain::ledger::LedgerEntry;
use crate::domain::money::{Currency, Money};
use crate::domain::rollup::{self, Counters, Scope, Span, DAY_MS};
use crate::domain::FieldError;
use crate::engine::Catalog;

/// Most days one report or export covers (SPEC 5.5).
pub const MAX_DAYS: i64 = 400;
/// The trailing window of "active partners" (SPEC 5.5).
pub const ACTIVE_WINDOW_DAYS: i32 = 90;

/// `from`, `to` (inclusive) and `tz` of a report: local days and where each begins.
struct Days {
    from: Date,
    to: Date,
    tz_name: String,
    tz: TimeZone,
}

impl Days {
    /// Parses `from`, `to` and `tz`; `required` says whether the dates must be given.
    fn parse(query: &str, required: bool) -> Result<Option<Days>, ApiError> {
        let (mut from, mut to, mut tz) = (None, None, None);
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "from" => from = Some(date("from", &value)?),
                "to" => to = Some(date("to", &value)?),
                "tz" => tz = Some(value.into_owned()),
                _ => {}
            }
        }
        let tz_name = tz.unwrap_or_else(|| "UTC".into());
        let zone = TimeZone::get(&tz_name).map_err(|_| {
            FieldError::new("tz", format!("{tz_name:?} is not an IANA time zone name (for example Europe/Berlin)"))
        })?;
        let (from, to) = match (from, to) {
            (Some(f), Some(t)) => (f, t),
            (None, None) if !required => return Ok(None),
            (None, _) => return Err(FieldError::new("from", "is required: a date, YYYY-MM-DD").into()),
            (_, None) => return Err(FieldError::new("to", "is required: a date, YYYY-MM-DD").into()),
        };
        if to < from {
            return Err(FieldError::new("to", "must not be before from").into());
        }
        let days = from.until(to).map(|s| s.get_days()).unwrap_or(i32::MAX);
        if i64::from(days) + 1 > MAX_DAYS {
            return Err(FieldError::new("to", format!("at most {MAX_DAYS} days per call")).into());
        }
        Ok(Some(Days { from, to, tz_name, tz: zone }))
    }

    /// When local day `d` begins, in Unix milliseconds (its first instant: midnight, or
    /// later when midnight does not exist on a daylight-saving day).
    fn start(&self, d: Date) -> Result<UnixMillis, ApiError> {
        d.to_zoned(self.tz.clone())
            .and_then(|z| z.start_of_day())
            .map(|z| z.timestamp().as_millisecond())
            .map_err(|e| FieldError::new("to", format!("{d} cannot be placed in {}: {e}", self.tz_name)).into())
    }

    fn next(d: Date) -> Result<Date, ApiError> {
        d.tomorrow().map_err(|_| FieldError::new("to", "is past the last supported date").into())
    }

    /// Every day with where it begins and ends.
    fn each(&self) -> Result<Vec<(Date, UnixMillis, UnixMillis)>, ApiError> {
        let mut out = Vec::new();
        let mut d = self.from;
        let mut start = self.start(d)?;
        while d <= self.to {
            let next = Days::next(d)?;
            let end = self.start(next)?;
            out.push((d, start, end));
            (d, start) = (next, end);
        }
        Ok(out)
    }

    /// The spans that cover `from..until` as group `group`.
    fn spans(&self, group: u32, from: UnixMillis, until: UnixMillis) -> Result<Vec<(u32, Span)>, ApiError> {
        let spans = rollup::cover(from, until).map_err(|rollup::Misaligned(at)| {
            FieldError::new(
                "tz",
                format!(
                    "{} has a day boundary at {} that is not on a quarter hour (a historical offset); reports need offsets in whole quarter hours",
                    self.tz_name,
                    format_rfc3339(at)
                ),
            )
        })?;
        Ok(spans.into_iter().map(|s| (group, s)).collect())
    }
}

/// When a UTC day begins, in Unix milliseconds (months, payout days, partner reads).
pub(super) fn utc_start(d: Date) -> Option<UnixMillis> {
    d.to_zoned(TimeZone::UTC).ok().map(|z| z.timestamp().as_millisecond())
}

fn date(field: &'static str, value: &str) -> Result<Date, ApiError> {
    let bad = || FieldError::new(field, format!("{value:?} is not a date: YYYY-MM-DD"));
    if value.len() != 10 {
        return Err(bad().into());
    }
    value.parse::<Date>().map_err(|_| bad().into())
}

/// Whether the client asked for CSV.
pub(super) fn wants_csv(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/csv"))
}

fn money(minor: i64, currency: Option<Currency>) -> String {
    currency.map_or_else(|| "0".to_string(), |currency| Money { minor, currency }.amount_text())
}

/// One row of the partner report (SPEC 5.5).
#[derive(Serialize)]
struct PartnerRow {
    day: String,
    partner_id: PartnerId,
    currency: Option<Currency>,
    clicks: i64,
    unique_clicks: i64,
    conversions: i64,
    revenue: String,
    commission: String,
    reversed: String,
    /// Revenue of conversions the partner influenced without sourcing them.
    influenced: String,
    /// Of `conversions`, those credited by the customer's own answer.
    self_reported: i64,
    /// Of `conversions`, those that raised fraud signals, and their commission.
    flagged: i64,
    flagged_commission: String,
}

const PARTNER_COLUMNS: [&str; 13] = [
    "day",
    "partner_id",
    "currency",
    "clicks",
    "unique_clicks",
    "conversions",
    "revenue",
    "commission",
    "reversed",
    "influenced",
    "self_reported",
    "flagged",
    "flagged_commission",
];

/// The currency a partner's clicks are shown in: the currency of the partner's own plan
/// (the plan that pays its conversions without a link), else the plan of its first link
/// (by id) that names one, else the merchant's default plan.
fn plan_currency(catalog: &Catalog, merchant: &MerchantId, partner: &PartnerId, now: UnixMillis) -> Option<Currency> {
    let own = catalog.partner_of(merchant, partner).and_then(|p| p.plan_id.clone());
    let linked = || {
        let mut links: Vec<_> = catalog
            .links
            .values()
            .filter(|l| l.merchant_id == *merchant && l.partner_id == *partner && l.plan_id.is_some())
            .collect();
        links.sort_by(|a, b| a.id.cmp(&b.id));
        links.first().and_then(|l| l.plan_id.clone())
    };
    let default = || catalog.merchants.get(merchant).and_then(|m| m.default_plan_id.clone());
    let plan = own.or_else(linked).or_else(default)?;
    catalog.plan_at(merchant, &plan, now).map(|p| p.currency)
}

/// `GET /admin/v1/merchants/{m}/reports/partners?from=&to=&tz=`.
pub(super) async fn partners(
    ctx: &Ctx,
    merchant: &MerchantId,
    query: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let days = Days::parse(query, true)?.ok_or(ApiError::Internal)?;
    let each = days.each()?;
    let mut spans = Vec::new();
    for (i, (_, start, end)) in each.iter().enumerate() {
        spans.extend(days.spans(u32::try_from(i).unwrap_or(u32::MAX), *start, *end)?);
    }
    let cells = ctx.backend.rollups(merchant, Scope::Partner, spans).await?;
    let (catalog, now) = (ctx.backend.catalog(), ctx.clock.now_ms());
    let mut rows: BTreeMap<(u32, PartnerId, Option<Currency>), Counters> = BTreeMap::new();
    // Looked up once per partner (it scans the merchant's links), not once per cell.
    let mut plan_currencies: std::collections::HashMap<PartnerId, Option<Currency>> = Default::default();
    for ((day, partner, currency), c) in cells {
        let Some(partner) = partner else { continue };
        let currency = currency.or_else(|| {
            *plan_currencies.entry(partner.clone()).or_insert_with(|| plan_currency(&catalog, merchant, &partner, now))
        });
        rows.entry((day, partner, currency)).or_default().add(&c);
    }
    let rows: Vec<PartnerRow> = rows
        .into_iter()
        .filter(|(_, c)| !c.is_zero())
        .map(|((day, partner_id, currency), c)| PartnerRow {
            day: each.get(day as usize).map(|d| d.0.to_string()).unwrap_or_default(),
            partner_id,
            currency,
            clicks: c.clicks,
            unique_clicks: c.unique_clicks,
            conversions: c.conversions,
            revenue: money(c.revenue, currency),
            commission: money(c.commission, currency),
            reversed: money(c.reversed, currency),
            influenced: money(c.influenced, currency),
            self_reported: c.self_reported,
            flagged: c.flagged,
            flagged_commission: money(c.flagged_commission, currency),
        })
        .collect();
    if wants_csv(headers) {
        let mut out = String::new();
        csv::row(&mut out, PARTNER_COLUMNS);
        for r in &rows {
            let (clicks, unique, conversions) =
                (r.clicks.to_string(), r.unique_clicks.to_string(), r.conversions.to_string());
            let (self_reported, flagged) = (r.self_reported.to_string(), r.flagged.to_string());
            csv::row(
                &mut out,
                [
                    r.day.as_str(),
                    r.partner_id.as_str(),
                    r.currency.as_ref().map_or("", |c| c.as_str()),
                    &clicks,
                    &unique,
                    &conversions,
                    &r.revenue,
                    &r.commission,
                    &r.reversed,
                    &r.influenced,
                    &self_reported,
                    &flagged,
                    &r.flagged_commission,
                ],
            );
        }
        return Ok(csv::response(out, &format!("partners-{}-{}.csv", days.from, days.to)));
    }
    let body = serde_json::json!({
        "merchant_id": merchant,
        "from": days.from.to_string(),
        "to": days.to.to_string(),
        "tz": days.tz_name,
        "rows": rows,
    });
    Ok(json(StatusCode::OK, &body))
}

/// Revenue by currency in the program report.
#[derive(Serialize)]
struct Revenue {
    currency: Option<Currency>,
    total: String,
    sourced: String,
    influenced: String,
    sourced_share: Option<f64>,
    influenced_share: Option<f64>,
    /// Conversions credited by the customer's own answer.
    self_reported: i64,
    /// Conversions that raised fraud signals, and their commission.
    flagged: i64,
    flagged_commission: String,
}

fn share(part: i64, total: i64) -> Option<f64> {
    // Shares of exact integers, rounded to four decimals for display.
    (total != 0).then(|| (part as f64 / total as f64 * 10_000.0).round() / 10_000.0)
}

fn kind_name(kind: crate::domain::entities::PartnerKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// The median of sorted milliseconds (the mean of the middle two for an even count),
/// computed exactly before it is rounded to days.
fn median(sorted: &[i64]) -> Option<i64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(sorted[n / 2 - 1] / 2 + sorted[n / 2] / 2 + (sorted[n / 2 - 1] % 2 + sorted[n / 2] % 2) / 2),
    }
}

/// Milliseconds as days, to two decimals.
fn in_days(ms: i64) -> f64 {
    (ms as f64 / DAY_MS as f64 * 100.0).round() / 100.0
}

/// `GET /admin/v1/merchants/{m}/reports/program?from=&to=&tz=`: the seeds' metrics.
pub(super) async fn program(ctx: &Ctx, merchant: &MerchantId, query: &str) -> Result<Response<Body>, ApiError> {
    let days = Days::parse(query, true)?.ok_or(ApiError::Internal)?;
    let (start, end) = (days.start(days.from)?, days.start(Days::next(days.to)?)?);
    let window_from = Days::next(days.to)?
        .checked_sub(jiff::Span::new().days(ACTIVE_WINDOW_DAYS))
        .map_err(|_| FieldError::new("to", "is too early"))?;
    let window_start = days.start(window_from)?;
    let range = days.spans(0, start, end)?;
    let totals = ctx.backend.rollups(merchant, Scope::Merchant, range.clone()).await?;
    let mut partner_spans = range;
    partner_spans.extend(days.spans(1, window_start, end)?);
    let partner_cells = ctx.backend.rollups(merchant, Scope::Partner, partner_spans).await?;

    let mut by_currency: BTreeMap<Option<Currency>, Counters> = BTreeMap::new();
    for ((_, _, currency), c) in totals {
        by_currency.entry(currency).or_default().add(&c);
    }
    let revenue: Vec<Revenue> = by_currency
        .into_iter()
        .filter(|(_, c)| c.revenue != 0 || c.conversions != 0)
        .map(|(currency, c)| Revenue {
            currency,
            total: money(c.revenue, currency),
            sourced: money(c.sourced, currency),
            influenced: money(c.influenced, currency),
            sourced_share: share(c.sourced, c.revenue),
            influenced_share: share(c.influenced, c.revenue),
            self_reported: c.self_reported,
            flagged: c.flagged,
            flagged_commission: money(c.flagged_commission, currency),
        })
        .collect();

    let converted = |group: u32| -> BTreeSet<PartnerId> {
        partner_cells
            .iter()
            .filter(|((g, p, _), c)| *g == group && p.is_some() && c.conversions > 0)
            .filter_map(|((_, p, _), _)| p.clone())
            .collect()
    };
    let catalog = ctx.backend.catalog();
    let active = converted(1);
    let (mut by_kind, mut by_tier) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
    for p in active.iter().filter_map(|p| catalog.partner_of(merchant, p)) {
        *by_kind.entry(kind_name(p.kind)).or_default() += 1;
        *by_tier.entry(p.tier.clone().unwrap_or_else(|| "none".into())).or_default() += 1;
    }

    let in_range: Vec<PartnerId> = converted(0).into_iter().collect();
    let firsts = ctx.backend.first_conversions(merchant, in_range.clone()).await?;
    let mut partners = Vec::new();
    let mut waits = Vec::new();
    for (p, first) in in_range.iter().zip(firsts) {
        let (Some(partner), Some(first)) = (catalog.partner_of(merchant, p), first) else { continue };
        // A conversion reported as having occurred before the partner existed counts as day 0.
        let wait = (first - partner.created_ms).max(0);
        waits.push(wait);
        partners.push(serde_json::json!({
            "partner_id": p,
            "created_at": format_rfc3339(partner.created_ms),
            "first_conversion_at": format_rfc3339(first),
            "days": in_days(wait),
        }));
    }
    waits.sort_unstable();
    let body = serde_json::json!({
        "merchant_id": merchant,
        "from": days.from.to_string(),
        "to": days.to.to_string(),
        "tz": days.tz_name,
        "revenue": revenue,
        "active_partners": {
            "as_of": days.to.to_string(),
            "window_days": ACTIVE_WINDOW_DAYS,
            "total": active.len(),
            "by_kind": by_kind,
            "by_tier": by_tier,
        },
        "time_to_first_conversion": {
            "partners": partners,
            "median_days": median(&waits).map(in_days),
        },
    });
    Ok(json(StatusCode::OK, &body))
}

const LEDGER_COLUMNS: [&str; 8] =
    ["entry_id", "at", "partner_id", "kind", "txn_id", "conversion_id", "amount", "currency"];

#[derive(Serialize)]
struct LedgerLine<'a> {
    entry_id: String,
    at: String,
    partner_id: &'a PartnerId,
    kind: &'static str,
    txn_id: &'a str,
    conversion_id: String,
    amount: String,
    currency: Currency,
}

impl<'a> LedgerLine<'a> {
    fn of(e: &'a LedgerEntry) -> Self {
        LedgerLine {
            entry_id: e.entry_id.to_string(),
            at: format_rfc3339(e.at_ms),
            partner_id: &e.partner_id,
            kind: e.kind.as_str(),
            txn_id: e.txn_id.as_str(),
            conversion_id: e.conversion_id.to_string(),
            amount: e.amount.amount_text(),
            currency: e.amount.currency,
        }
    }
}

/// The entries of a chunk as NDJSON lines, or CSV rows.
fn encode(entries: &[LedgerEntry], as_csv: bool) -> Bytes {
    let mut out = String::with_capacity(entries.len() * 200);
    for e in entries {
        let l = LedgerLine::of(e);
        if as_csv {
            csv::row(
                &mut out,
                [
                    l.entry_id.as_str(),
                    &l.at,
                    l.partner_id.as_str(),
                    l.kind,
                    l.txn_id,
                    &l.conversion_id,
                    &l.amount,
                    l.currency.as_str(),
                ],
            );
        } else if let Ok(line) = serde_json::to_string(&l) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    Bytes::from(out)
}

/// `GET /admin/v1/merchants/{m}/ledger?from=&to=&tz=&partner_id=&after=`: every ledger
/// entry in entry order, streamed from one snapshot.
pub(super) async fn ledger(
    ctx: &Ctx,
    merchant: &MerchantId,
    query: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let days = Days::parse(query, false)?;
    let (from, until) = match &days {
        Some(d) => (d.start(d.from)?, d.start(Days::next(d.to)?)?),
        None => (0, i64::MAX),
    };
    let (mut partner, mut after) = (None, None);
    let catalog = ctx.backend.catalog();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "partner_id" => {
                let p = PartnerId::parse(&value)
                    .ok()
                    .filter(|p| catalog.partner_of(merchant, p).is_some())
                    .ok_or_else(|| FieldError::new("partner_id", "is not a partner of this merchant"))?;
                partner = Some(p);
            }
            "after" => {
                after = Some(Ulid::parse(&value).map_err(|_| FieldError::new("after", "is not an entry_id"))?);
            }
            _ => {}
        }
    }
    // A bounded number of exports at once: each holds a snapshot and a blocking thread.
    let permit = Arc::clone(&ctx.exports)
        .try_acquire_owned()
        .map_err(|_| ApiError::RateLimited(std::time::Duration::from_secs(1)))?;
    let as_csv = wants_csv(headers);
    let mut entries =
        ctx.backend.ledger_export(LedgerQuery { merchant: merchant.clone(), partner, from, until, after });
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let metrics = Arc::clone(&ctx.metrics);
    tokio::spawn(async move {
        let _permit = permit;
        if as_csv {
            let mut header = String::new();
            csv::row(&mut header, LEDGER_COLUMNS);
            if tx.send(Ok(Bytes::from(header))).await.is_err() {
                return;
            }
        }
        while let Some(chunk) = entries.recv().await {
            let item = match chunk {
                Ok(list) => {
                    metrics.exported_entries.inc_by(list.len() as u64);
                    Ok(encode(&list, as_csv))
                }
                Err(e) => {
                    tracing::error!(error = %e, "ledger export cut short by a storage error");
                    Err(e.to_string())
                }
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    let mut resp = Response::new(Streamed::new(rx));
    let content_type = if as_csv { "text/csv; charset=utf-8" } else { "application/x-ndjson" };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if as_csv {
        let name = match &days {
            Some(d) => format!("attachment; filename=\"ledger-{}-{}.csv\"", d.from, d.to),
            None => "attachment; filename=\"ledger.csv\"".into(),
        };
        if let Ok(v) = HeaderValue::from_str(&name) {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(q: &str) -> Result<Option<Days>, ApiError> {
        Days::parse(q, true)
    }

    #[test]
    fn days_follow_the_zone_through_daylight_saving() {
        // Europe/Berlin springs forward on 2026-03-29: that day has 23 hours.
        let d = days("from=2026-03-28&to=2026-03-30&tz=Europe%2FBerlin").unwrap().unwrap();
        let each = d.each().unwrap();
        let hours: Vec<i64> = each.iter().map(|(_, s, e)| (e - s) / 3_600_000).collect();
        assert_eq!(hours, [24, 23, 24]);
        // 2026-03-28 00:00 in Berlin is 2026-03-27 23:00 UTC.
        assert_eq!(format_rfc3339(each[0].1), "2026-03-27T23:00:00.000Z");
        // Asia/Kathmandu is +05:45: days start at 18:15 UTC, on a quarter hour.
        let k = days("from=2026-01-01&to=2026-01-01&tz=Asia/Kathmandu").unwrap().unwrap();
        assert_eq!(format_rfc3339(k.each().unwrap()[0].1), "2025-12-31T18:15:00.000Z");
    }

    #[test]
    fn bad_ranges_name_their_field() {
        let field = |q: &str| match days(q) {
            Err(ApiError::Invalid(f)) => f.field,
            other => panic!("{q}: {:?}", other.map(|d| d.map(|d| d.tz_name))),
        };
        assert_eq!(field("from=2026-01-01&to=2027-02-05"), "to");
        assert_eq!(field("from=2026-01-02&to=2026-01-01"), "to");
        assert_eq!(field("from=2026-1-2&to=2026-01-01"), "from");
        assert_eq!(field("from=2026-01-01&to=2026-01-01&tz=Mars/Olympus"), "tz");
        assert_eq!(field("to=2026-01-01"), "from");
        assert!(days("from=2026-01-01&to=2027-02-04").is_ok());
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3]), Some(3));
        assert_eq!(median(&[1, 2, 10, 11]), Some(6));
        assert_eq!(median(&[1, 2]), Some(1));
        assert_eq!(median(&[3, 5]), Some(4));
        assert_eq!(median(&[i64::MAX - 1, i64::MAX]), Some(i64::MAX - 1));
        assert_eq!(in_days(2_418_000_000), 27.99);
    }
}
