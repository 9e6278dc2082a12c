//! Merchants and partners as stored, and the admin bodies that create them (SPEC 5.3).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::ids::{MerchantId, PartnerId, PlanId};
use super::FieldError;

/// Longest display name accepted for any entity.
pub const MAX_NAME_LEN: usize = 200;

fn check_name(name: &str) -> Result<(), FieldError> {
    if name.trim().is_empty() || name.chars().count() > MAX_NAME_LEN {
        return Err(FieldError::new("name", format!("must be 1..{MAX_NAME_LEN} characters, not blank")));
    }
    if name.chars().any(char::is_control) {
        return Err(FieldError::new("name", "must not contain control characters"));
    }
    Ok(())
}

/// Active or paused; paused entities keep their history but take no new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Active,
    Paused,
}

/// A tenant. Its signing secrets live apart from it (see `signing::SecretSet`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merchant {
    pub id: MerchantId,
    pub name: String,
    pub postback_token: bool,
    pub allowed_ips: Vec<String>,
    /// Plan for conversions credited without a link (explicit `partner_id`), unless the
    /// partner names its own.
    pub default_plan_id: Option<PlanId>,
    pub created_ms: UnixMillis,
}

/// `PUT /admin/v1/merchants/{id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantBody {
    pub name: String,
    #[serde(default)]
    pub postback_token: bool,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub default_plan_id: Option<PlanId>,
}

impl MerchantBody {
    /// # Errors
    /// The first field that is not valid.
    pub fn into_merchant(self, id: MerchantId, created_ms: UnixMillis) -> Result<Merchant, FieldError> {
        check_name(&self.name)?;
        for (i, ip) in self.allowed_ips.iter().enumerate() {
            if !valid_cidr(ip) {
                return Err(FieldError::new(
                    format!("allowed_ips[{i}]"),
                    "must be an IP address or CIDR such as 203.0.113.0/24",
                ));
            }
        }
        Ok(Merchant {
            id,
            name: self.name,
            postback_token: self.postback_token,
            allowed_ips: self.allowed_ips,
            default_plan_id: self.default_plan_id,
            created_ms,
        })
    }
}

/// True when `ip` is inside one of `cidrs` (addresses or CIDR ranges, as validated by
/// [`MerchantBody::into_merchant`]). IPv4-mapped IPv6 addresses count as IPv4.
pub fn ip_allowed(ip: IpAddr, cidrs: &[String]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    cidrs.iter().any(|cidr| {
        let (addr, len) = cidr.split_once('/').unwrap_or((cidr, ""));
        let Ok(net) = addr.parse::<IpAddr>() else { return false };
        match (ip, net) {
            (IpAddr::V4(a), IpAddr::V4(n)) => {
                let len: u32 = len.parse().unwrap_or(32).min(32);
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(a) & mask == u32::from(n) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(n)) => {
                let len: u32 = len.parse().unwrap_or(128).min(128);
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
                u128::from(a) & mask == u128::from(n) & mask
            }
            _ => false,
        }
    })
}

fn valid_cidr(text: &str) -> bool {
    match text.split_once('/') {
        None => text.parse::<std::net::IpAddr>().is_ok(),
        Some((addr, len)) => match addr.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                len.parse::<u8>().is_ok_and(|l| l <= max)
            }
            Err(_) => false,
        },
    }
}

/// SPEC 2's partner kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartnerKind {
    Affiliate,
    Referral,
    Reseller,
    Technology,
    Agency,
}

pub use super::outbound::{Outbound, OutboundMethod};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partner {
    pub id: PartnerId,
    pub merchant_id: MerchantId,
    pub name: String,
    pub kind: PartnerKind,
    pub tier: Option<String>,
    pub status: Status,
    pub coupons: Vec<String>,
    pub outbound: Option<Outbound>,
    /// Plan for conversions credited to this partner without a link.
    pub plan_id: Option<PlanId>,
    pub created_ms: UnixMillis,
    /// The partner's own customer ids and accounts (normalized): a conversion of one of
    /// them credited to this partner raises the self-referral signal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub own_accounts: Vec<String>,
}

impl Partner {
    /// The customer id or account of a conversion that is on the partner's own list.
    pub fn owns<'k>(&self, customer_id: Option<&'k str>, account: Option<&'k str>) -> Option<&'k str> {
        let listed = |v: &&str| self.own_accounts.iter().any(|o| o == v);
        customer_id.filter(listed).or_else(|| account.filter(listed))
    }
}

/// Most entries in a partner's `own_accounts`.
pub const MAX_OWN_ACCOUNTS: usize = 1000;

/// `PUT /admin/v1/merchants/{m}/partners/{id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerBody {
    pub name: String,
    pub kind: PartnerKind,
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub coupons: Vec<String>,
    #[serde(default)]
    pub outbound: Option<Outbound>,
    #[serde(default)]
    pub plan_id: Option<PlanId>,
    /// Customer ids and accounts of the partner's own (self-referral signal).
    #[serde(default)]
    pub own_accounts: Vec<String>,
}

impl PartnerBody {
    /// # Errors
    /// The first field that is not valid.
    pub fn into_partner(
        self,
        merchant_id: MerchantId,
        id: PartnerId,
        created_ms: UnixMillis,
    ) -> Result<Partner, FieldError> {
        check_name(&self.name)?;
        for (i, coupon) in self.coupons.iter().enumerate() {
            if coupon.is_empty() || coupon.len() > 64 || coupon.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(FieldError::new(format!("coupons[{i}]"), "must be 1..64 characters without spaces"));
            }
        }
        if let Some(outbound) = &self.outbound {
            outbound.check()?;
        }
        if self.own_accounts.len() > MAX_OWN_ACCOUNTS {
            return Err(FieldError::new("own_accounts", format!("at most {MAX_OWN_ACCOUNTS} entries")));
        }
        let mut own_accounts = Vec::with_capacity(self.own_accounts.len());
        for (i, raw) in self.own_accounts.iter().enumerate() {
            let field = || format!("own_accounts[{i}]");
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.chars().count() > 128 || trimmed.chars().any(char::is_control) {
                return Err(FieldError::new(field(), "must be 1..128 characters without control characters"));
            }
            // Kept as given (a customer id) and, when it reads as an account, normalized too.
            own_accounts.push(trimmed.to_string());
            if let Ok(account) = super::account::normalize_account(trimmed) {
                if account != trimmed {
                    own_accounts.push(account);
                }
            }
        }
        Ok(Partner {
            id,
            merchant_id,
            name: self.name,
            kind: self.kind,
            tier: self.tier,
            status: self.status,
            coupons: self.coupons,
            outbound: self.outbound,
            plan_id: self.plan_id,
            created_ms,
            own_accounts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let list = vec!["203.0.113.0/24".to_string(), "2001:db8::/32".to_string(), "198.51.100.7".to_string()];
        let yes = ["203.0.113.255", "2001:db8:1::1", "198.51.100.7", "::ffff:203.0.113.9"];
        let no = ["203.0.114.1", "2001:db9::1", "198.51.100.8", "127.0.0.1"];
        for ip in yes {
            assert!(ip_allowed(ip.parse().unwrap(), &list), "{ip}");
        }
        for ip in no {
            assert!(!ip_allowed(ip.parse().unwrap(), &list), "{ip}");
        }
        assert!(!ip_allowed("127.0.0.1".parse().unwrap(), &[]), "an empty list allows nobody");
    }

    #[test]
    fn cidrs() {
        for ok in ["203.0.113.7", "203.0.113.0/24", "2001:db8::/32", "::1"] {
            assert!(valid_cidr(ok), "{ok}");
        }
        for bad in ["203.0.113.0/33", "x", "10.0.0.0/", "2001:db8::/129", ""] {
            assert!(!valid_cidr(bad), "{bad}");
        }
    }
}
