//! The JSON shapes of answers (SPEC 5.1, 5.3). Built from stored records only, so a
//! duplicate answer repeats the original field for field.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::domain::clock::format_rfc3339;
use crate::domain::conversion::{Attribution, Commission, ConversionRecord};
use crate::domain::entities::PartnerKind;
use crate::domain::fraud::{FraudRules, Review, Signal};
use crate::domain::ledger::LedgerEntry;
use crate::domain::money::Money;
use crate::domain::plan::Plan;

#[derive(Serialize)]
pub struct MoneyView {
    pub amount: String,
    pub currency: String,
}

impl From<&Money> for MoneyView {
    fn from(m: &Money) -> Self {
        MoneyView { amount: m.amount_text(), currency: m.currency.to_string() }
    }
}

#[derive(Serialize)]
pub struct InfluencerView {
    pub partner_id: String,
    pub credit: &'static str,
    pub rule: &'static str,
    pub reason: String,
    pub commission: Option<MoneyView>,
}

#[derive(Serialize)]
pub struct AttributionView {
    pub partner_id: String,
    pub credit: &'static str,
    pub rule: &'static str,
    pub reason: String,
    pub influencers: Vec<InfluencerView>,
}

impl From<&Attribution> for AttributionView {
    fn from(a: &Attribution) -> Self {
        AttributionView {
            partner_id: a.partner_id.to_string(),
            credit: a.credit.as_str(),
            rule: a.rule.as_str(),
            reason: a.reason.clone(),
            influencers: a
                .influencers
                .iter()
                .map(|i| InfluencerView {
                    partner_id: i.partner_id.to_string(),
                    credit: i.credit.as_str(),
                    rule: i.rule.as_str(),
                    reason: i.reason.clone(),
                    commission: i.commission.as_ref().map(MoneyView::from),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub struct CommissionView {
    pub amount: String,
    pub currency: String,
    pub plan: String,
    pub rule: String,
}

impl From<&Commission> for CommissionView {
    fn from(c: &Commission) -> Self {
        CommissionView {
            amount: c.amount.amount_text(),
            currency: c.amount.currency.to_string(),
            plan: c.plan.to_string(),
            rule: c.rule.clone(),
        }
    }
}

/// The answer to a conversion (created, duplicate, or the GET postback).
#[derive(Serialize)]
pub struct ConversionView<'a> {
    pub conversion_id: String,
    pub txn_id: &'a str,
    pub duplicate: bool,
    pub status: &'static str,
    pub event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<MoneyView>,
    pub occurred_at: String,
    pub attribution: Option<AttributionView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    pub commission: Option<CommissionView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commission_note: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a RawValue>,
    /// Present when fraud signals flagged the conversion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewView<'a>>,
}

/// A flagged conversion's review (docs/fraud.md).
#[derive(Serialize)]
pub struct ReviewView<'a> {
    pub status: &'static str,
    pub signals: &'a [Signal],
    pub postbacks_held: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'a str>,
}

impl<'a> From<&'a Review> for ReviewView<'a> {
    fn from(r: &'a Review) -> Self {
        ReviewView {
            status: r.status.as_str(),
            signals: &r.signals,
            postbacks_held: r.postbacks_held,
            settled_by: r.settled_by.as_deref(),
            settled_at: r.settled_ms.map(format_rfc3339),
            note: r.note.as_deref(),
        }
    }
}

impl<'a> ConversionView<'a> {
    pub fn new(rec: &'a ConversionRecord, duplicate: bool) -> Self {
        ConversionView {
            conversion_id: rec.conversion_id.to_string(),
            txn_id: rec.txn_id.as_str(),
            duplicate,
            status: rec.status.as_str(),
            event: &rec.event,
            amount: rec.amount.as_ref().map(MoneyView::from),
            occurred_at: format_rfc3339(rec.occurred_ms),
            attribution: rec.attribution.as_ref().map(AttributionView::from),
            reason: rec.unattributed_reason.as_deref(),
            commission: rec.commission.as_ref().map(CommissionView::from),
            commission_note: rec.commission_note.as_deref(),
            metadata: rec.metadata.as_deref().and_then(|m| serde_json::from_str::<&RawValue>(m).ok()),
            review: rec.review.as_ref().map(ReviewView::from),
        }
    }
}

#[derive(Serialize)]
pub struct LedgerEntryView {
    pub entry_id: String,
    pub partner_id: String,
    pub kind: &'static str,
    pub amount: String,
    pub currency: String,
    pub at: String,
}

impl From<&LedgerEntry> for LedgerEntryView {
    fn from(e: &LedgerEntry) -> Self {
        LedgerEntryView {
            entry_id: e.entry_id.to_string(),
            partner_id: e.partner_id.to_string(),
            kind: e.kind.as_str(),
            amount: e.amount.amount_text(),
            currency: e.amount.currency.to_string(),
            at: format_rfc3339(e.at_ms),
        }
    }
}

#[derive(Serialize)]
pub struct RuleView {
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flat: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partner_kind: Option<PartnerKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recurring_months: Option<u32>,
}

#[derive(Serialize)]
pub struct PlanView {
    pub id: String,
    pub currency: String,
    /// Days, or `"manual"`.
    pub hold_days: serde_json::Value,
    pub influence_percent: String,
    pub deal_ttl_days: u32,
    pub influence_window_days: u32,
    pub version_from: String,
    pub rules: Vec<RuleView>,
    pub tiers: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caps: Option<serde_json::Value>,
    pub fraud: FraudRules,
    pub self_reported: &'static str,
}

impl From<&Plan> for PlanView {
    fn from(p: &Plan) -> Self {
        PlanView {
            id: p.id.to_string(),
            currency: p.currency.to_string(),
            hold_days: if p.manual_approval { "manual".into() } else { p.hold_days.into() },
            influence_percent: p.influence_percent.text(),
            deal_ttl_days: p.deal_ttl_days,
            influence_window_days: p.influence_window_days,
            version_from: format_rfc3339(p.version_from_ms),
            rules: p
                .rules
                .iter()
                .map(|r| RuleView {
                    event: r.event.clone(),
                    flat: r.flat.map(|f| f.amount_text()),
                    percent: r.percent.map(|x| x.text()),
                    partner_kind: r.partner_kind,
                    recurring_months: r.recurring_months,
                })
                .collect(),
            tiers: p
                .tiers
                .iter()
                .map(|t| serde_json::json!({"min_sales": t.min_sales, "percent": t.percent.text()}))
                .collect(),
            caps: p.monthly_cap.map(|c| serde_json::json!({"monthly_commission": c.amount_text()})),
            fraud: p.fraud,
            self_reported: p.self_reported.as_str(),
        }
    }
}
