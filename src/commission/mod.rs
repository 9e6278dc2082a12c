//! Commission: a plan and an attributed conversion in, an exact amount and the rule
//! that produced it out. Pure.

use crate::domain::conversion::Commission;
use crate::domain::entities::PartnerKind;
use crate::domain::money::Money;
use crate::domain::plan::{Plan, Rule};

/// Picks the rule for `event`: one for the partner's kind wins over a general one;
/// among equals, the first listed.
pub fn select_rule<'p>(plan: &'p Plan, event: &str, kind: PartnerKind) -> Option<&'p Rule> {
    let for_event = || plan.rules.iter().filter(move |r| r.event == event);
    for_event().find(|r| r.partner_kind == Some(kind)).or_else(|| for_event().find(|r| r.partner_kind.is_none()))
}

/// The sourced partner's commission for a conversion under `plan`.
///
/// # Errors
/// A reason, in words, why no commission is due (no rule for the event, or a
/// percentage of an amount in another currency than the plan's).
pub fn quote(plan: &Plan, event: &str, amount: Option<Money>, kind: PartnerKind) -> Result<Commission, String> {
    let rule =
        select_rule(plan, event, kind).ok_or_else(|| format!("plan {} has no rule for event {event}", plan.id))?;
    let mut total = Money::zero(plan.currency);
    if let (Some(percent), Some(amount)) = (rule.percent, amount) {
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
    Ok(Commission { amount: total, plan: plan.id.clone(), rule: rule.label() })
}

#[cfg(test)]
mod tests {
    use super::*;
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

    const STANDARD: &str = r#"{"currency":"USD","rules":[
        {"event":"lead","flat":"15.00"},
        {"event":"sale","percent":"20"},
        {"event":"sale","percent":"10","flat":"5.00","partner_kind":"reseller"}]}"#;

    #[test]
    fn table() {
        let p = plan(STANDARD);
        let cases = [
            ("sale", usd("149.90"), PartnerKind::Affiliate, "29.98", "sale 20%"),
            ("sale", usd("149.90"), PartnerKind::Reseller, "19.99", "sale 10% + 5.00 (reseller)"),
            ("lead", None, PartnerKind::Affiliate, "15.00", "lead 15.00"),
            ("sale", usd("0.02"), PartnerKind::Affiliate, "0.00", "sale 20%"),
            ("sale", usd("0.03"), PartnerKind::Affiliate, "0.01", "sale 20%"),
        ];
        for (event, amount, kind, want, rule) in cases {
            let c = quote(&p, event, amount, kind).unwrap();
            assert_eq!((c.amount.amount_text().as_str(), c.rule.as_str()), (want, rule), "{event} {kind:?}");
        }
    }

    #[test]
    fn no_rule_or_other_currency() {
        let p = plan(STANDARD);
        assert!(quote(&p, "renewal", usd("10"), PartnerKind::Affiliate)
            .unwrap_err()
            .contains("no rule for event renewal"));
        let eur = Some(Money::parse("10", Currency::parse("EUR").unwrap()).unwrap());
        assert!(quote(&p, "sale", eur, PartnerKind::Affiliate).unwrap_err().contains("does not convert"));
    }

    #[test]
    fn zero_decimal_currency() {
        let p = plan(r#"{"currency":"JPY","rules":[{"event":"sale","percent":"12.5"}]}"#);
        let amount = Some(Money::parse("1004", Currency::parse("JPY").unwrap()).unwrap());
        assert_eq!(quote(&p, "sale", amount, PartnerKind::Affiliate).unwrap().amount.amount_text(), "126");
    }
}
