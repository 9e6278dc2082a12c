//! Conversions: the merchant's body as received, the validated input, and the stored
//! record with its attribution and commission (SPEC 5.1, 6, 8).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::clock::{parse_rfc3339, UnixMillis};
use super::fraud::Review;
use super::ids::{MerchantId, PartnerId, PlanId, TxnId, Ulid};
use super::money::{Currency, Money};
use super::plan::check_event;
use super::FieldError;

/// Oldest `occurred_at` accepted, in days before now.
pub const MAX_AGE_DAYS: i64 = 400;
/// How far `occurred_at` may lie ahead of now (clock skew), in seconds.
pub const MAX_AHEAD_SECONDS: i64 = 300;
/// Largest `metadata` accepted, in bytes of JSON.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Deepest nesting of arrays and objects accepted in `metadata` (`{"a":[1]}` is 2).
pub const MAX_METADATA_DEPTH: usize = 32;
/// Longest attribution key (`click_id`, `coupon`, `account`, `customer_id`).
pub const MAX_KEY_LEN: usize = 128;
/// Events that may come without an amount.
const EVENTS_WITHOUT_AMOUNT: [&str; 3] = ["lead", "signup", "trial"];

/// The JSON body of one conversion, exactly as the merchant may send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionBody {
    pub txn_id: String,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub amount: Option<serde_json::Value>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub occurred_at: Option<String>,
    #[serde(default)]
    pub click_id: Option<String>,
    #[serde(default)]
    pub coupon: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub partner_id: Option<String>,
    /// The customer's own answer to "how did you hear about us": a partner id or coupon.
    #[serde(default)]
    pub self_reported: Option<String>,
    #[serde(default)]
    pub metadata: Option<Box<RawValue>>,
}

/// What a conversion may be attributed by. Part of the dedupe identity: the same
/// `txn_id` with other keys is a conflict, not a duplicate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributionKeys {
    pub click_id: Option<String>,
    pub coupon: Option<String>,
    pub account: Option<String>,
    pub customer_id: Option<String>,
    pub partner_id: Option<PartnerId>,
    /// As the customer typed it (trimmed); matched ignoring case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_reported: Option<String>,
}

/// A validated conversion, ready for dedupe and attribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionInput {
    pub txn_id: TxnId,
    pub event: String,
    pub amount: Option<Money>,
    pub occurred_ms: UnixMillis,
    pub keys: AttributionKeys,
    pub metadata: Option<String>,
}

fn key(field: &str, value: Option<String>) -> Result<Option<String>, FieldError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_empty() || v.chars().count() > MAX_KEY_LEN || v.chars().any(char::is_control) => {
            Err(FieldError::new(field, format!("must be 1..{MAX_KEY_LEN} characters without control characters")))
        }
        Some(v) => Ok(Some(v)),
    }
}

fn amount_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        // With serde_json's arbitrary_precision the number keeps its exact text.
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl ConversionBody {
    /// Validates every field against `now`.
    ///
    /// # Errors
    /// The first invalid field, named.
    pub fn into_input(self, now: UnixMillis) -> Result<ConversionInput, FieldError> {
        let txn_id = TxnId::parse(&self.txn_id).map_err(|e| FieldError::new("txn_id", e))?;
        let event = self.event.unwrap_or_else(|| "sale".to_string());
        check_event(&event).map_err(|e| FieldError::new("event", e))?;
        let currency =
            self.currency.as_deref().map(Currency::parse).transpose().map_err(|e| FieldError::new("currency", e))?;
        let amount = match (&self.amount, currency) {
            (None | Some(serde_json::Value::Null), _) => None,
            (Some(_), None) => return Err(FieldError::new("currency", "is required with amount")),
            (Some(v), Some(c)) => {
                let text = amount_text(v)
                    .ok_or_else(|| FieldError::new("amount", "must be a decimal string such as \"149.90\""))?;
                Some(Money::parse(&text, c).map_err(|e| FieldError::new("amount", e))?)
            }
        };
        if amount.is_none() && !EVENTS_WITHOUT_AMOUNT.contains(&event.as_str()) {
            return Err(FieldError::new(
                "amount",
                format!("is required for event {event} (only lead, signup and trial may omit it)"),
            ));
        }
        let occurred_ms = match self.occurred_at.as_deref() {
            None => now,
            Some(text) => {
                let at = parse_rfc3339(text).map_err(|e| FieldError::new("occurred_at", e))?;
                if at < now - MAX_AGE_DAYS * 86_400_000 {
                    return Err(FieldError::new("occurred_at", format!("must be at most {MAX_AGE_DAYS} days old")));
                }
                if at > now + MAX_AHEAD_SECONDS * 1000 {
                    return Err(FieldError::new("occurred_at", "must not be more than 5 minutes in the future"));
                }
                at
            }
        };
        let partner_id = self
            .partner_id
            .as_deref()
            .map(PartnerId::parse)
            .transpose()
            .map_err(|e| FieldError::new("partner_id", e))?;
        let metadata = self.metadata.map(|raw| raw.get().to_string());
        if metadata.as_ref().is_some_and(|m| m.len() > MAX_METADATA_BYTES) {
            return Err(FieldError::new("metadata", format!("must be at most {MAX_METADATA_BYTES} bytes of JSON")));
        }
        if metadata.as_deref().is_some_and(|m| json_depth(m) > MAX_METADATA_DEPTH) {
            return Err(FieldError::new(
                "metadata",
                format!("must not nest arrays and objects more than {MAX_METADATA_DEPTH} levels deep"),
            ));
        }
        Ok(ConversionInput {
            txn_id,
            event,
            amount,
            occurred_ms,
            keys: AttributionKeys {
                click_id: key("click_id", self.click_id)?,
                coupon: key("coupon", self.coupon)?,
                account: key("account", self.account)?
                    .map(|a| super::account::normalize_account(&a))
                    .transpose()
                    .map_err(|e| FieldError::new("account", e))?,
                customer_id: key("customer_id", self.customer_id)?,
                partner_id,
                self_reported: key("self_reported", self.self_reported.map(|s| s.trim().to_string()))?,
            },
            metadata,
        })
    }
}

/// Which rule of SPEC 8 credited a partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Explicit,
    Deal,
    Customer,
    Click,
    Coupon,
    Touch,
    /// The customer named the partner (or its coupon) when asked how they heard of us.
    SelfReported,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Explicit => "explicit",
            RuleKind::Deal => "deal",
            RuleKind::Customer => "customer",
            RuleKind::Click => "click",
            RuleKind::Coupon => "coupon",
            RuleKind::Touch => "touch",
            RuleKind::SelfReported => "self_reported",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credit {
    Sourced,
    Influenced,
}

impl Credit {
    fn influenced() -> Credit {
        Credit::Influenced
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Credit::Sourced => "sourced",
            Credit::Influenced => "influenced",
        }
    }
}

/// A partner that influenced the conversion without sourcing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Influencer {
    pub partner_id: PartnerId,
    /// Always `influenced`; stored so that every credit reads the same way.
    #[serde(default = "Credit::influenced")]
    pub credit: Credit,
    pub rule: RuleKind,
    /// Why this partner is credited with influence (empty for records of earlier versions).
    #[serde(default)]
    pub reason: String,
    pub commission: Option<Money>,
}

/// The decision of SPEC 8, stored with the conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    pub partner_id: PartnerId,
    pub credit: Credit,
    pub rule: RuleKind,
    pub reason: String,
    pub influencers: Vec<Influencer>,
}

/// The sourced partner's commission and the plan rule that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commission {
    pub amount: Money,
    pub plan: PlanId,
    pub rule: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionStatus {
    Pending,
    Approved,
    Rejected,
    Reversed,
}

impl ConversionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversionStatus::Pending => "pending",
            ConversionStatus::Approved => "approved",
            ConversionStatus::Rejected => "rejected",
            ConversionStatus::Reversed => "reversed",
        }
    }
}

/// The deepest nesting of arrays and objects in a JSON text (brackets inside strings do
/// not count). The text is known to be JSON: it was parsed as a raw value.
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A stored conversion: the input, when it arrived, and the decisions taken then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionRecord {
    pub conversion_id: Ulid,
    pub merchant_id: MerchantId,
    pub txn_id: TxnId,
    pub event: String,
    pub amount: Option<Money>,
    pub occurred_ms: UnixMillis,
    pub received_ms: UnixMillis,
    pub keys: AttributionKeys,
    pub metadata: Option<String>,
    pub status: ConversionStatus,
    pub attribution: Option<Attribution>,
    /// Why nobody was credited, when `attribution` is `None`.
    pub unattributed_reason: Option<String>,
    pub commission: Option<Commission>,
    /// Why there is no commission (or less than the rule says) although a partner was credited.
    pub commission_note: Option<String>,
    /// Refunded and charged-back amount so far, in minor units.
    #[serde(default)]
    pub refunded_minor: i64,
    /// When the hold period ends and a pending conversion is approved.
    #[serde(default)]
    pub approve_at_ms: Option<UnixMillis>,
    #[serde(default)]
    pub history: Vec<StatusChange>,
    /// The newest outbound delivery about this conversion (SPEC 10): a later one waits
    /// behind it while it is unfinished, so the partner hears of events in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery: Option<Ulid>,
    /// Fraud signals raised when it was attributed, and their review (docs/fraud.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<Review>,
}

/// One move of a conversion's status, with what caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub from: ConversionStatus,
    pub to: ConversionStatus,
    pub at_ms: UnixMillis,
    pub cause: String,
}

impl ConversionStatus {
    /// SPEC 9: `pending -> approved | rejected`, `approved -> reversed`; never back.
    pub fn can_move_to(self, to: ConversionStatus) -> bool {
        matches!(
            (self, to),
            (ConversionStatus::Pending, ConversionStatus::Approved | ConversionStatus::Rejected)
                | (ConversionStatus::Approved, ConversionStatus::Reversed)
        )
    }
}

/// `refund | chargeback | approve | reject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustmentKind {
    Refund,
    Chargeback,
    Approve,
    Reject,
}

impl AdjustmentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AdjustmentKind::Refund => "refund",
            AdjustmentKind::Chargeback => "chargeback",
            AdjustmentKind::Approve => "approve",
            AdjustmentKind::Reject => "reject",
        }
    }
}

/// The body of `POST /v1/merchants/{id}/adjustments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentBody {
    pub adjustment_id: String,
    pub txn_id: String,
    pub kind: AdjustmentKind,
    #[serde(default)]
    pub amount: Option<serde_json::Value>,
}

/// A validated adjustment; the amount is parsed against the conversion's currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentInput {
    pub adjustment_id: String,
    pub txn_id: TxnId,
    pub kind: AdjustmentKind,
    pub amount_text: Option<String>,
}

impl AdjustmentBody {
    /// # Errors
    /// The first invalid field, named.
    pub fn into_input(self) -> Result<AdjustmentInput, FieldError> {
        super::account::check_text_id("adjustment_id", &self.adjustment_id)?;
        let txn_id = TxnId::parse(&self.txn_id).map_err(|e| FieldError::new("txn_id", e))?;
        let amount_text = match &self.amount {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                amount_text(v)
                    .ok_or_else(|| FieldError::new("amount", "must be a decimal string such as \"10.00\""))?,
            ),
        };
        if amount_text.is_some() && matches!(self.kind, AdjustmentKind::Approve | AdjustmentKind::Reject) {
            return Err(FieldError::new("amount", "is only for refund and chargeback"));
        }
        Ok(AdjustmentInput { adjustment_id: self.adjustment_id, txn_id, kind: self.kind, amount_text })
    }
}

/// A stored adjustment: the answer its `adjustment_id` replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentRecord {
    pub input: AdjustmentInput,
    pub amount: Option<Money>,
    pub at_ms: UnixMillis,
    pub status_after: ConversionStatus,
    pub ledger_entries: Vec<Ulid>,
}

impl ConversionRecord {
    /// The partners it credits, with or without a commission: its source and every
    /// influencer (the index of partners' own reads).
    pub fn credited_partners(&self) -> impl Iterator<Item = &PartnerId> {
        self.attribution
            .iter()
            .flat_map(|a| std::iter::once(&a.partner_id).chain(a.influencers.iter().map(|i| &i.partner_id)))
    }

    /// What each partner was credited: the source's commission (when not zero) and each
    /// influencer's fee, as appended when the conversion was created.
    pub fn credited(&self) -> Vec<(PartnerId, Money)> {
        let Some(a) = &self.attribution else { return Vec::new() };
        let mut out = Vec::new();
        if let Some(c) = self.commission.as_ref().filter(|c| c.amount.minor != 0) {
            out.push((a.partner_id.clone(), c.amount));
        }
        for i in &a.influencers {
            if let Some(fee) = i.commission {
                out.push((i.partner_id.clone(), fee));
            }
        }
        out
    }

    /// True when `input` is the same conversion as this one for dedupe purposes
    /// (SPEC 6: amount, currency, event and attribution keys must match).
    pub fn same_content(&self, input: &ConversionInput) -> bool {
        self.event == input.event && self.amount == input.amount && self.keys == input.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000_000;

    fn parse(json: &str) -> Result<ConversionInput, FieldError> {
        let body: ConversionBody = serde_json::from_str(json).map_err(|e| FieldError::new("?", e))?;
        body.into_input(NOW)
    }

    #[test]
    fn minimal_sale() {
        let c = parse(r#"{"txn_id":"o1","amount":"149.90","currency":"USD"}"#).unwrap();
        assert_eq!(c.event, "sale");
        assert_eq!(c.amount.unwrap().minor, 14990);
        assert_eq!(c.occurred_ms, NOW);
    }

    #[test]
    fn json_number_amount_is_exact() {
        let c = parse(r#"{"txn_id":"o1","amount":0.3,"currency":"USD"}"#).unwrap();
        assert_eq!(c.amount.unwrap().minor, 30);
        let err = parse(r#"{"txn_id":"o1","amount":1e2,"currency":"USD"}"#).unwrap_err();
        assert_eq!(err.field, "amount");
    }

    #[test]
    fn fields_are_named() {
        let cases = [
            (r#"{"txn_id":"","amount":"1","currency":"USD"}"#, "txn_id"),
            (r#"{"txn_id":"o","amount":"1"}"#, "currency"),
            (r#"{"txn_id":"o","amount":"1.001","currency":"USD"}"#, "amount"),
            (r#"{"txn_id":"o","amount":true,"currency":"USD"}"#, "amount"),
            (r#"{"txn_id":"o","currency":"USD"}"#, "amount"),
            (r#"{"txn_id":"o","amount":"1","currency":"usd"}"#, "currency"),
            (r#"{"txn_id":"o","event":"bad event","amount":"1","currency":"USD"}"#, "event"),
            (r#"{"txn_id":"o","amount":"1","currency":"USD","occurred_at":"2020-01-01T00:00:00Z"}"#, "occurred_at"),
            (r#"{"txn_id":"o","amount":"1","currency":"USD","partner_id":"a b"}"#, "partner_id"),
            (r#"{"txn_id":"o","amount":"1","currency":"USD","coupon":""}"#, "coupon"),
        ];
        for (json, field) in cases {
            assert_eq!(parse(json).unwrap_err().field, field, "{json}");
        }
    }

    #[test]
    fn leads_need_no_amount() {
        assert!(parse(r#"{"txn_id":"o","event":"lead"}"#).unwrap().amount.is_none());
    }

    #[test]
    fn occurred_at_bounds() {
        let ahead = super::super::clock::format_rfc3339(NOW + 300_000);
        assert!(parse(&format!(r#"{{"txn_id":"o","event":"lead","occurred_at":"{ahead}"}}"#)).is_ok());
        let ahead = super::super::clock::format_rfc3339(NOW + 301_000);
        assert!(parse(&format!(r#"{{"txn_id":"o","event":"lead","occurred_at":"{ahead}"}}"#)).is_err());
    }

    #[test]
    fn metadata_depth_is_bounded() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let body = |m: &str| format!(r#"{{"txn_id":"o","event":"lead","metadata":{m}}}"#);
        assert!(parse(&body(&nested(MAX_METADATA_DEPTH))).is_ok());
        assert_eq!(parse(&body(&nested(MAX_METADATA_DEPTH + 1))).unwrap_err().field, "metadata");
        assert_eq!(parse(&body(&nested(128))).unwrap_err().field, "metadata");
        // Brackets inside strings are text, and escaped quotes do not end a string.
        assert!(parse(&body(&format!(r#"{{"note":"{}\"]]"}}"#, "[".repeat(100)))).is_ok());
    }

    #[test]
    fn json_depth_counts_structure_only() {
        let cases = [("1", 0), ("[]", 1), (r#"{"a":[1,{"b":2}]}"#, 3), (r#"["[[[", "\"[["]"#, 1), (r#"{"a":{}}"#, 2)];
        for (text, depth) in cases {
            assert_eq!(json_depth(text), depth, "{text}");
        }
    }
}
