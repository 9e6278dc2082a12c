//! Commission plans (SPEC 9) as stored: versioned, one currency, a list of rules.

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::entities::PartnerKind;
use super::fraud::{FraudBody, FraudRules};
use super::ids::{MerchantId, PlanId};
use super::money::{Currency, Money, Percent};
use super::FieldError;

pub const DEFAULT_HOLD_DAYS: u32 = 30;
pub const DEFAULT_DEAL_TTL_DAYS: u32 = 180;
pub const DEFAULT_INFLUENCE_WINDOW_DAYS: u32 = 180;
/// Most rules a plan may have.
pub const MAX_RULES: usize = 100;

/// One version of a plan. A `PUT` adds a version in force from that moment; the version
/// in force when a conversion occurred governs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: PlanId,
    pub merchant_id: MerchantId,
    pub version_from_ms: UnixMillis,
    pub currency: Currency,
    pub hold_days: u32,
    /// `hold_days = "manual"`: nothing approves by itself; the merchant's `approve`
    /// (sent when the customer paid) does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual_approval: bool,
    pub influence_percent: Percent,
    pub deal_ttl_days: u32,
    pub influence_window_days: u32,
    pub rules: Vec<Rule>,
    /// Ascending by `min_sales`.
    #[serde(default)]
    pub tiers: Vec<Tier>,
    #[serde(default)]
    pub monthly_cap: Option<Money>,
    /// Fraud-signal thresholds (docs/fraud.md); the defaults for plans stored before them.
    #[serde(default)]
    pub fraud: FraudRules,
    /// What a conversion credited by the customer's own answer (`self_reported`) earns.
    #[serde(default)]
    pub self_reported: SelfReportedPay,
}

/// What the `self_reported` rule pays: the weakest evidence earns the influence fee unless
/// the plan says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelfReportedPay {
    /// The commission its rules give any sourced conversion.
    Full,
    /// The plan's `influence_percent` of the amount.
    #[default]
    Influence,
    /// Credited, and reported, but no commission.
    None,
}

impl SelfReportedPay {
    pub fn as_str(self) -> &'static str {
        match self {
            SelfReportedPay::Full => "full",
            SelfReportedPay::Influence => "influence",
            SelfReportedPay::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub event: String,
    pub flat: Option<Money>,
    pub percent: Option<Percent>,
    pub partner_kind: Option<PartnerKind>,
    /// Pays only within this many months of the customer's first sale.
    #[serde(default)]
    pub recurring_months: Option<u32>,
}

/// From `min_sales` approved sales this calendar month (before this one), percent rules of
/// `sale` events pay `percent` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub min_sales: u32,
    pub percent: Percent,
}

impl Rule {
    /// How the rule reads in answers: `sale 20%`, `lead 15.00`, `sale 10% + 5.00 (reseller)`.
    pub fn label(&self) -> String {
        use std::fmt::Write;
        // One allocation: the label goes into every credited conversion's answer and record.
        let mut label = String::with_capacity(64);
        let _ = write!(label, "{} ", self.event);
        if let Some(p) = self.percent {
            label.push_str(&p.text());
            label.push('%');
        }
        if let Some(f) = self.flat {
            if self.percent.is_some() {
                label.push_str(" + ");
            }
            label.push_str(&f.amount_text());
        }
        if let Some(k) = self.partner_kind {
            let _ = write!(label, " ({})", kind_name(k));
        }
        label
    }
}

pub fn kind_name(kind: PartnerKind) -> &'static str {
    match kind {
        PartnerKind::Affiliate => "affiliate",
        PartnerKind::Referral => "referral",
        PartnerKind::Reseller => "reseller",
        PartnerKind::Technology => "technology",
        PartnerKind::Agency => "agency",
    }
}

/// A plan's hold: days until automatic approval, or `"manual"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HoldDays {
    Days(u32),
    Manual(ManualWord),
}

/// The word `manual`, the only text `hold_days` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManualWord {
    Manual,
}

/// `PUT /admin/v1/merchants/{m}/plans/{id}` and `[[plans]]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    pub currency: Currency,
    /// Days, or `"manual"`.
    #[serde(default)]
    pub hold_days: Option<HoldDays>,
    #[serde(default)]
    pub influence_percent: Option<Percent>,
    #[serde(default)]
    pub deal_ttl_days: Option<u32>,
    #[serde(default)]
    pub influence_window_days: Option<u32>,
    pub rules: Vec<RuleBody>,
    #[serde(default)]
    pub tiers: Vec<Tier>,
    #[serde(default)]
    pub caps: Option<CapsBody>,
    #[serde(default)]
    pub fraud: Option<FraudBody>,
    #[serde(default)]
    pub self_reported: Option<SelfReportedPay>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapsBody {
    pub monthly_commission: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    pub event: String,
    #[serde(default)]
    pub flat: Option<String>,
    #[serde(default)]
    pub percent: Option<Percent>,
    #[serde(default)]
    pub partner_kind: Option<PartnerKind>,
    #[serde(default)]
    pub recurring_months: Option<u32>,
}

/// Event names: 1..64 of `[A-Za-z0-9_.-]` (`lead`, `sale`, or the merchant's own).
pub fn check_event(event: &str) -> Result<(), String> {
    let ok = !event.is_empty()
        && event.len() <= 64
        && event.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    ok.then_some(()).ok_or_else(|| "must be 1..64 characters of [A-Za-z0-9_.-], such as sale".into())
}

impl PlanBody {
    /// # Errors
    /// The first field that is not valid.
    pub fn into_plan(
        self,
        merchant_id: MerchantId,
        id: PlanId,
        version_from_ms: UnixMillis,
    ) -> Result<Plan, FieldError> {
        let mut tiers = self.tiers;
        tiers.sort_by_key(|t| t.min_sales);
        if tiers.windows(2).any(|w| w[0].min_sales == w[1].min_sales) {
            return Err(FieldError::new("tiers", "two tiers have the same min_sales"));
        }
        let monthly_cap = self
            .caps
            .map(|c| Money::parse(&c.monthly_commission, self.currency))
            .transpose()
            .map_err(|e| FieldError::new("caps.monthly_commission", e))?;
        if self.rules.len() > MAX_RULES {
            return Err(FieldError::new("rules", format!("at most {MAX_RULES} rules")));
        }
        let fraud = self.fraud.unwrap_or_default().into_rules();
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.into_iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            check_event(&r.event).map_err(|e| FieldError::new(at("event"), e))?;
            if r.recurring_months == Some(0) {
                return Err(FieldError::new(at("recurring_months"), "must be at least 1"));
            }
            let flat = r
                .flat
                .as_deref()
                .map(|f| Money::parse(f, self.currency))
                .transpose()
                .map_err(|e| FieldError::new(at("flat"), e))?;
            if flat.is_none() && r.percent.is_none() {
                return Err(FieldError::new(at("percent"), "a rule needs flat, percent or both"));
            }
            rules.push(Rule {
                event: r.event,
                flat,
                percent: r.percent,
                partner_kind: r.partner_kind,
                recurring_months: r.recurring_months,
            });
        }
        Ok(Plan {
            id,
            merchant_id,
            version_from_ms,
            currency: self.currency,
            hold_days: match self.hold_days {
                Some(HoldDays::Days(d)) => d,
                Some(HoldDays::Manual(_)) => 0,
                None => DEFAULT_HOLD_DAYS,
            },
            manual_approval: matches!(self.hold_days, Some(HoldDays::Manual(_))),
            influence_percent: self.influence_percent.unwrap_or(Percent::ZERO),
            deal_ttl_days: self.deal_ttl_days.unwrap_or(DEFAULT_DEAL_TTL_DAYS),
            influence_window_days: self.influence_window_days.unwrap_or(DEFAULT_INFLUENCE_WINDOW_DAYS),
            rules,
            tiers,
            monthly_cap,
            fraud,
            self_reported: self.self_reported.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_reads_as_its_event_rate_flat_fee_and_partner_kind() {
        let usd = Currency::parse("USD").unwrap();
        let rule = |percent: Option<&str>, flat: Option<i64>, kind: Option<PartnerKind>| Rule {
            event: "sale".into(),
            flat: flat.map(|minor| Money { minor, currency: usd }),
            percent: percent.map(|p| Percent::parse(p).unwrap()),
            partner_kind: kind,
            recurring_months: None,
        };
        let cases = [
            (rule(Some("20"), None, None), "sale 20%"),
            (rule(Some("12.5"), None, None), "sale 12.5%"),
            (rule(Some("0.000001"), None, None), "sale 0.000001%"),
            (rule(None, Some(1500), None), "sale 15.00"),
            (rule(Some("10"), Some(500), Some(PartnerKind::Reseller)), "sale 10% + 5.00 (reseller)"),
            (rule(None, Some(1), Some(PartnerKind::Affiliate)), "sale 0.01 (affiliate)"),
            (rule(None, None, None), "sale "),
        ];
        for (rule, want) in cases {
            assert_eq!(rule.label(), want);
        }
    }
}
