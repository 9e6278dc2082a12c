//! The configuration entities (merchants, their secrets, partners, links, plans) as the
//! engine reads them: every backend keeps them in memory and publishes a new catalog
//! after each committed entity write, built by [`Catalog::apply`] from the write's effects.

use crate::domain::clock::UnixMillis;
use crate::domain::entities::{Merchant, Partner};
use crate::domain::ids::{LinkId, MerchantId, PartnerId, PlanId};
use crate::domain::link::Link;
use crate::domain::plan::Plan;
use crate::domain::FastMap;
use crate::signing::SecretSet;

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    pub merchants: FastMap<MerchantId, Merchant>,
    pub secrets: FastMap<MerchantId, SecretSet>,
    /// SHA-256 of each merchant's postback token (token mode, SPEC 4.2).
    pub postback_tokens: FastMap<MerchantId, [u8; 32]>,
    pub partners: FastMap<PartnerId, Partner>,
    pub partner_secrets: FastMap<PartnerId, SecretSet>,
    pub links: FastMap<LinkId, Link>,
    /// Versions of each plan, oldest first.
    pub plans: FastMap<(MerchantId, PlanId), Vec<Plan>>,
    /// `(merchant, coupon)` -> partner.
    pub coupons: FastMap<(MerchantId, String), PartnerId>,
}

impl Catalog {
    /// Adds `other`'s entities (cluster mode: each partition keeps its merchants' catalog;
    /// a node serves their union).
    pub fn extend(&mut self, other: &Catalog) {
        self.merchants.extend(other.merchants.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.secrets.extend(other.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.postback_tokens.extend(other.postback_tokens.iter().map(|(k, v)| (k.clone(), *v)));
        self.partners.extend(other.partners.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.partner_secrets.extend(other.partner_secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.links.extend(other.links.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.plans.extend(other.plans.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.coupons.extend(other.coupons.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// A partner of this merchant; another merchant's partner does not exist here.
    pub fn partner_of(&self, merchant: &MerchantId, id: &PartnerId) -> Option<&Partner> {
        self.partners.get(id).filter(|p| p.merchant_id == *merchant)
    }

    /// A link of this merchant.
    pub fn link_of(&self, merchant: &MerchantId, id: &LinkId) -> Option<&Link> {
        self.links.get(id).filter(|l| l.merchant_id == *merchant)
    }

    /// The version of a plan in force at `at`; the oldest version for earlier times.
    pub fn plan_at(&self, merchant: &MerchantId, id: &PlanId, at: UnixMillis) -> Option<&Plan> {
        let versions = self.plans.get(&(merchant.clone(), id.clone()))?;
        versions.iter().rev().find(|p| p.version_from_ms <= at).or_else(|| versions.first())
    }

    /// The newest version of a plan.
    pub fn current_plan(&self, merchant: &MerchantId, id: &PlanId) -> Option<&Plan> {
        self.plans.get(&(merchant.clone(), id.clone()))?.last()
    }

    pub fn coupon_owner(&self, merchant: &MerchantId, coupon: &str) -> Option<&Partner> {
        let id = self.coupons.get(&(merchant.clone(), coupon.to_string()))?;
        self.partners.get(id)
    }

    pub(crate) fn insert_partner(&mut self, partner: Partner) {
        self.coupons.retain(|_, owner| *owner != partner.id);
        for c in &partner.coupons {
            self.coupons.insert((partner.merchant_id.clone(), c.clone()), partner.id.clone());
        }
        self.partners.insert(partner.id.clone(), partner);
    }

    pub(crate) fn insert_plan(&mut self, plan: Plan) {
        let versions = self.plans.entry((plan.merchant_id.clone(), plan.id.clone())).or_default();
        versions.push(plan);
        versions.sort_by_key(|p| p.version_from_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::PlanBody;

    #[test]
    fn the_plan_in_force_when_the_conversion_occurred_governs() {
        let m = MerchantId::parse("m").unwrap();
        let id = PlanId::parse("std").unwrap();
        let version = |percent: &str, from: i64| {
            let body: PlanBody = serde_json::from_str(&format!(
                r#"{{"currency":"USD","rules":[{{"event":"sale","percent":"{percent}"}}]}}"#
            ))
            .unwrap();
            body.into_plan(m.clone(), id.clone(), from).unwrap()
        };
        let mut c = Catalog::default();
        c.insert_plan(version("20", 1000));
        c.insert_plan(version("25", 2000));
        let pct = |at: i64| c.plan_at(&m, &id, at).unwrap().rules[0].percent.unwrap().text();
        assert_eq!(pct(999), "20", "before the first version: the first version");
        assert_eq!(pct(1999), "20");
        assert_eq!(pct(2000), "25", "a version is in force from its start");
        assert_eq!(c.current_plan(&m, &id).unwrap().version_from_ms, 2000);
    }
}
