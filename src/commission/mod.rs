//! Commission: a plan and an attributed conversion in, an exact amount and the rule
//! that produced it out. Pure: what it needs of the past comes in a [`History`].

use crate::domain::clock::{add_months, format_rfc3339, UnixMillis};
use crate::domain::conversion::Commission;
use crate::domain::entities::PartnerKind;
use crate::domain::money::{Money, Percent};
use crate::domain::plan::{Plan, Rule};

/// What the plan's tiers, caps and recurring rules need to know about the past.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// The partner's approved sales this calendar month, before this conversion.
    pub approved_sales_this_month: u32,
    /// Commission already credited to the partner this calendar month, in the plan's
    /// minor units.
    pub commission_this_month: i64,
    /// When the customer's first attributed sale occurred, if there was one.
    pub customer_first_sale_ms: Option<UnixMillis>,
    pub occurred_ms: UnixMillis,
}

/// A commission and, when less than the rule says is paid, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub commission: Commission,
    pub note: Option<String>,
}

/// Picks the rule for `event`: one for the partner's kind wins over a general one;
/// among equals, the first listed.
pub fn select_rule<'p>(plan: &'p Plan, event: &str, kind: PartnerKind) -> Option<&'p Rule> {
    let for_event = || plan.rules.iter().filter(move |r| r.event == event);
    for_event().find(|r| r.partner_kind == Some(kind)).or_else(|| for_event().find(|r| r.partner_kind.is_none()))
}

/// The percent a `sale` rule pays after tiers: the highest tier whose `min_sales` the
/// partner has reached (counting approved sales before this one), else the rule's own.
fn tiered_percent(plan: &Plan, rule: &Rule, approved: u32) -> (Option<Percent>, Option<u32>) {
    if rule.event != "sale" || rule.percent.is_none() {
        return (rule.percent, None);
    }
    match plan.tiers.iter().rev().find(|t| approved >= t.min_sales) {
        Some(t) => (Some(t.percent), Some(t.min_sales)),
        None => (rule.percent, None),
    }
}

/// The sourced partner's commission for a conversion under `plan`.
///
/// Order: the rule for the event (and partner kind); recurring limit; tier; percent of the
/// amount plus flat; then the monthly cap, which may cut the amount (to zero past it).
///
/// # Errors
/// A reason, in words, why no commission is due at all.
pub fn quote(
    plan: &Plan,
    event: &str,
    amount: Option<Money>,
    kind: PartnerKind,
    history: &History,
) -> Result<Quote, String> {
    let rule =
        select_rule(plan, event, kind).ok_or_else(|| format!("plan {} has no rule for event {event}", plan.id))?;
    if let Some(months) = rule.recurring_months {
        let first = history.customer_first_sale_ms.unwrap_or(history.occurred_ms);
        let until = add_months(first, months);
        if history.occurred_ms >= until {
            return Err(format!(
                "rule {} pays only within {months} months of the customer's first sale ({}); this conversion is after {}",
                rule.label(),
                format_rfc3339(first),
                format_rfc3339(until)
            ));
        }
    }
    let (percent, tier) = tiered_percent(plan, rule, history.approved_sales_this_month);
    let mut total = Money::zero(plan.currency);
    if let (Some(percent), Some(amount)) = (percent, amount) {
        if amount.currency != plan.currency {
            return Err(format!(
                "plan {} pays in {}, the conversion is in {}: tally does not convert currencies",
                plan.id, plan.currency, amount.currency
            ));
        }
        total.minor += amount.percent_of(percent).minor;
    }
    if let Some(flat) = rule.flat {
        total.minor += flat.minor;
    }
    let mut label = rule.label();
    if let (Some(min), Some(p)) = (tier, percent) {
        label = format!("{label} -> tier {}% from {min} approved sales this month", p.text());
    }
    let mut note = None;
    if let Some(cap) = plan.monthly_cap {
        let room = (cap.minor - history.commission_this_month).max(0);
        if total.minor > room {
            note = Some(format!(
                "monthly commission cap {} {} reached: {} of {} paid",
                cap.amount_text(),
                cap.currency,
                Money { minor: room, currency: plan.currency }.amount_text(),
                total.amount_text()
            ));
            total.minor = room;
        }
    }
    Ok(Quote { commission: Commission { amount: total, plan: plan.id.clone(), rule: label }, note })
}

/// The influence fee for a conversion's amount under `plan`: `influence_percent` of it.
pub fn influence_fee(plan: &Plan, amount: Option<Money>) -> Option<Money> {
    let amount = amount.filter(|a| a.currency == plan.currency)?;
    let fee = amount.percent_of(plan.influence_percent);
    (fee.minor != 0).then_some(fee)
}

/// The share of `commission` that a refund of `refund` out of `total` takes back,
/// rounded half away from zero: proportional reversal.
pub fn proportional(commission: i64, refund: i64, total: i64) -> i64 {
    if total == 0 {
        return commission;
    }
    let exact = i128::from(commission) * i128::from(refund);
    let t = i128::from(total);
    let rounded = (exact.abs() + t / 2) / t * exact.signum();
    i64::try_from(rounded).unwrap_or(commission)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::clock::parse_rfc3339;
    use crate::domain::ids::{MerchantId, PlanId};
    use crate::domain::money::Currency;
    use crate::domain::plan::PlanBody;

    fn plan(json: &str) -> Plan {
        let body: PlanBody = serde_json::from_str(json).unwrap();
        body.into_plan(MerchantId::parse("m").unwrap(), PlanId::parse("standard").unwrap(), 0).unwrap()
    }

    fn usd(text: &str) -> Option<Money> {
        Some(Money::parse(text, Currency::parse("USD").unwrap()).unwrap())
    }

    fn at(text: &str) -> History {
        History { occurred_ms: parse_rfc3339(text).unwrap(), ..History::default() }
    }

    const STANDARD: &str = r#"{"currency":"USD","influence_percent":"5","rules":[
        {"event":"lead","flat":"15.00"},
        {"event":"sale","percent":"20"},
        {"event":"sale","percent":"10","flat":"5.00","partner_kind":"reseller"},
        {"event":"renewal","percent":"10","recurring_months":12}],
        "tiers":[{"min_sales":10,"percent":"25"},{"min_sales":50,"percent":"30"}],
        "caps":{"monthly_commission":"100.00"}}"#;

    fn amount_of(q: Result<Quote, String>) -> String {
        q.map(|q| q.commission.amount.amount_text()).unwrap_or_else(|e| e)
    }

    #[test]
    fn rules_by_event_and_kind() {
        let p = plan(STANDARD);
        let h = at("2026-11-20T10:00:00Z");
        let cases = [
            ("sale", usd("149.90"), PartnerKind::Affiliate, "29.98", "sale 20%"),
            ("sale", usd("149.90"), PartnerKind::Reseller, "19.99", "sale 10% + 5.00 (reseller)"),
            ("lead", None, PartnerKind::Affiliate, "15.00", "lead 15.00"),
            ("sale", usd("0.02"), PartnerKind::Affiliate, "0.00", "sale 20%"),
            ("sale", usd("0.03"), PartnerKind::Affiliate, "0.01", "sale 20%"),
        ];
        for (event, amount, kind, want, rule) in cases {
            let q = quote(&p, event, amount, kind, &h).unwrap();
            assert_eq!(
                (q.commission.amount.amount_text().as_str(), q.commission.rule.as_str()),
                (want, rule),
                "{event} {kind:?}"
            );
        }
    }

    #[test]
    fn tiers_at_exactly_min_sales() {
        let p = plan(STANDARD);
        let mut h = at("2026-11-20T10:00:00Z");
        for (approved, want) in [(0, "20.00"), (9, "20.00"), (10, "25.00"), (49, "25.00"), (50, "30.00")] {
            h.approved_sales_this_month = approved;
            assert_eq!(
                amount_of(quote(&p, "sale", usd("100"), PartnerKind::Affiliate, &h)),
                want,
                "{approved} approved"
            );
        }
        h.approved_sales_this_month = 10;
        let q = quote(&p, "sale", usd("100"), PartnerKind::Affiliate, &h).unwrap();
        assert_eq!(q.commission.rule, "sale 20% -> tier 25% from 10 approved sales this month");
        assert_eq!(
            amount_of(quote(&p, "lead", None, PartnerKind::Affiliate, &h)),
            "15.00",
            "tiers change sale percentages only"
        );
    }

    #[test]
    fn cap_reached_mid_conversion() {
        let p = plan(STANDARD);
        let mut h = at("2026-11-20T10:00:00Z");
        h.commission_this_month = 9_000;
        let q = quote(&p, "sale", usd("100"), PartnerKind::Affiliate, &h).unwrap();
        assert_eq!(q.commission.amount.amount_text(), "10.00");
        assert_eq!(q.note.unwrap(), "monthly commission cap 100.00 USD reached: 10.00 of 20.00 paid");
        h.commission_this_month = 10_000;
        assert_eq!(amount_of(quote(&p, "sale", usd("100"), PartnerKind::Affiliate, &h)), "0.00");
        h.commission_this_month = 7_999;
        let q = quote(&p, "sale", usd("100"), PartnerKind::Affiliate, &h).unwrap();
        assert_eq!((q.commission.amount.amount_text().as_str(), q.note), ("20.00", None), "exactly up to the cap");
    }

    #[test]
    fn recurring_month_boundaries() {
        let p = plan(STANDARD);
        let first = parse_rfc3339("2026-01-31T12:00:00Z").unwrap();
        let mut h = at("2027-01-31T11:59:59Z");
        h.customer_first_sale_ms = Some(first);
        assert_eq!(amount_of(quote(&p, "renewal", usd("100"), PartnerKind::Affiliate, &h)), "10.00");
        h.occurred_ms = parse_rfc3339("2027-01-31T12:00:00Z").unwrap();
        assert!(quote(&p, "renewal", usd("100"), PartnerKind::Affiliate, &h).unwrap_err().contains("within 12 months"));
        h.customer_first_sale_ms = None;
        assert_eq!(
            amount_of(quote(&p, "renewal", usd("100"), PartnerKind::Affiliate, &h)),
            "10.00",
            "no earlier sale: this one is the first"
        );
    }

    #[test]
    fn no_rule_or_other_currency() {
        let p = plan(STANDARD);
        let h = at("2026-11-20T10:00:00Z");
        assert!(quote(&p, "upsell", usd("10"), PartnerKind::Affiliate, &h)
            .unwrap_err()
            .contains("no rule for event upsell"));
        let eur = Some(Money::parse("10", Currency::parse("EUR").unwrap()).unwrap());
        assert!(quote(&p, "sale", eur, PartnerKind::Affiliate, &h).unwrap_err().contains("does not convert"));
    }

    #[test]
    fn jpy_and_bhd_exponents() {
        let h = at("2026-11-20T10:00:00Z");
        let p = plan(r#"{"currency":"JPY","rules":[{"event":"sale","percent":"12.5"}]}"#);
        let amount = Some(Money::parse("1004", Currency::parse("JPY").unwrap()).unwrap());
        assert_eq!(amount_of(quote(&p, "sale", amount, PartnerKind::Affiliate, &h)), "126");
        let p = plan(r#"{"currency":"BHD","rules":[{"event":"sale","percent":"10"}]}"#);
        let amount = Some(Money::parse("1.235", Currency::parse("BHD").unwrap()).unwrap());
        assert_eq!(amount_of(quote(&p, "sale", amount, PartnerKind::Affiliate, &h)), "0.124");
    }

    #[test]
    fn influence_fee_and_proportional_reversal() {
        let p = plan(STANDARD);
        assert_eq!(influence_fee(&p, usd("150.00")).unwrap().amount_text(), "7.50");
        assert_eq!(proportional(2998, 7495, 14990), 1499);
        assert_eq!(proportional(2998, 14990, 14990), 2998);
        assert_eq!(proportional(1, 1, 2), 1, "half away from zero");
        assert_eq!(proportional(500, 0, 0), 500, "a conversion without amount is reversed whole");
    }
}
