//! B2B accounts: deal registrations (the source of record), touches, customer bindings
//! and adjustments of earlier conversions (SPEC 8, 9).

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::ids::{PartnerId, TxnId};
use super::FieldError;

/// Longest account accepted, in bytes, after normalization.
pub const MAX_ACCOUNT_LEN: usize = 253;

/// Normalizes an account: lower case; for domains, no scheme, no `www.`, no path, port,
/// query or trailing dot (`https://www.Acme.com/about` -> `acme.com`). CRM ids (no dot)
/// are only lower-cased and trimmed.
///
/// # Errors
/// When nothing is left or the result is too long.
pub fn normalize_account(raw: &str) -> Result<String, String> {
    let mut a = raw.trim().to_lowercase();
    if let Some(i) = a.find("://") {
        a = a[i + 3..].to_string();
    }
    if a.contains('.') {
        let end = a.find(['/', '?', '#', ':']).unwrap_or(a.len());
        a.truncate(end);
        if let Some(rest) = a.strip_prefix("www.") {
            a = rest.to_string();
        }
        while a.ends_with('.') {
            a.pop();
        }
    }
    if a.is_empty() || a.len() > MAX_ACCOUNT_LEN || a.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must be a domain such as acme.com or a CRM account id".into());
    }
    Ok(a)
}

/// How a partner came to be on an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TouchKind {
    /// A deal registration that was not first.
    Deal,
    /// Reported by the merchant's CRM (any kind string is kept in `label`).
    Crm,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    pub partner_id: PartnerId,
    pub kind: TouchKind,
    pub label: String,
    pub at_ms: UnixMillis,
}

/// The accepted registration that makes a partner the account's source of record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub partner_id: PartnerId,
    pub deal_id: String,
    pub opportunity_id: Option<String>,
    pub registered_ms: UnixMillis,
    /// Registrations expire unless a conversion happened (then they never do).
    pub expires_ms: UnixMillis,
    pub converted: bool,
}

/// An audited change of the source of record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reassignment {
    pub at_ms: UnixMillis,
    pub from: Option<PartnerId>,
    pub to: PartnerId,
    pub by: String,
    pub why: String,
}

/// Everything known about one account of one merchant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub account: String,
    pub claim: Option<Claim>,
    pub touches: Vec<Touch>,
    pub reassignments: Vec<Reassignment>,
}

/// Most touches kept per account; the oldest are dropped first.
pub const MAX_TOUCHES: usize = 1000;

impl AccountRecord {
    /// The claim in force at `at`: not expired, or converted.
    pub fn holder_at(&self, at: UnixMillis) -> Option<&Claim> {
        self.claim.as_ref().filter(|c| c.converted || at <= c.expires_ms)
    }

    pub fn add_touch(&mut self, touch: Touch) {
        self.touches.push(touch);
        if self.touches.len() > MAX_TOUCHES {
            self.touches.remove(0);
        }
    }
}

/// The body of `POST /v1/partners/{id}/deals`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DealBody {
    pub deal_id: String,
    pub account: String,
    #[serde(default)]
    pub opportunity_id: Option<String>,
    #[serde(default)]
    pub registered_at: Option<String>,
}

/// The body of `POST /v1/merchants/{id}/touches`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouchBody {
    pub account: String,
    pub partner_id: PartnerId,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub occurred_at: Option<String>,
}

/// Checks a short free-text id (deal, opportunity, adjustment): 1..128, no control chars.
///
/// # Errors
/// Names the field.
pub fn check_text_id(field: &str, text: &str) -> Result<(), FieldError> {
    if text.trim().is_empty() || text.chars().count() > 128 || text.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must be 1..128 characters without control characters"));
    }
    Ok(())
}

/// The lifetime binding of a customer to the partner of its first attributed conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerBinding {
    pub partner_id: PartnerId,
    pub first_sale_ms: UnixMillis,
    pub txn_id: TxnId,
}

/// Per partner and calendar month: what tiers and caps count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerMonth {
    pub approved_sales: u32,
    pub commission_minor: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_normalize() {
        for (raw, want) in [
            ("acme.com", "acme.com"),
            ("https://www.Acme.com/about?x=1", "acme.com"),
            ("ACME.COM.", "acme.com"),
            ("http://acme.com:8080", "acme.com"),
            ("  CRM-0042 ", "crm-0042"),
            ("sub.acme.co.uk/", "sub.acme.co.uk"),
        ] {
            assert_eq!(normalize_account(raw).unwrap(), want, "{raw}");
        }
        assert!(normalize_account("   ").is_err());
        assert!(normalize_account("https://").is_err());
    }

    #[test]
    fn claims_expire_unless_converted() {
        let mut rec = AccountRecord {
            claim: Some(Claim {
                partner_id: PartnerId::parse("a").unwrap(),
                deal_id: "d".into(),
                opportunity_id: None,
                registered_ms: 0,
                expires_ms: 100,
                converted: false,
            }),
            ..Default::default()
        };
        assert!(rec.holder_at(100).is_some());
        assert!(rec.holder_at(101).is_none());
        rec.claim.as_mut().unwrap().converted = true;
        assert!(rec.holder_at(10_000).is_some());
    }
}
