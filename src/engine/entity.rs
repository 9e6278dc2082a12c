//! Configuration entities: the invariants of merchants, partners, links and plans (ids
//! unique across merchants, references that exist, coupons owned once, plan versions),
//! and how their effects change the catalog.

use super::tx::Tx;
use super::{Catalog, Effect, Refusal, State};
use crate::domain::clock::UnixMillis;
use crate::domain::entities::{Merchant, Partner, Status};
use crate::domain::ids::{MerchantId, PartnerId, PlanId};
use crate::domain::link::Link;
use crate::domain::plan::Plan;
use crate::signing::{SecretSet, WebhookSecret};

/// Entity writes, checked against the catalog.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum EntityOp {
    /// Create or update; `secret` is used only when the merchant is new, `token_hash`
    /// only when the merchant is in token mode and has no token yet.
    Merchant {
        merchant: Merchant,
        secret: WebhookSecret,
        token_hash: Option<[u8; 32]>,
    },
    /// Replace the postback token of a merchant in token mode.
    RotatePostbackToken {
        merchant: MerchantId,
        token_hash: [u8; 32],
    },
    /// Make `secret` current; the previous one stays valid for `grace_ms`.
    RotateMerchantSecret {
        merchant: MerchantId,
        secret: WebhookSecret,
        now: UnixMillis,
        grace_ms: i64,
    },
    /// Make `secret` the partner's current secret (its API and its signed postbacks); the
    /// previous one stays valid, and postbacks are signed with both, for `grace_ms`.
    RotatePartnerSecret {
        merchant: MerchantId,
        partner: PartnerId,
        secret: WebhookSecret,
        now: UnixMillis,
        grace_ms: i64,
    },
    /// Create or update; `secret` (the partner API secret) is used only when the partner is new.
    Partner {
        partner: Partner,
        secret: WebhookSecret,
    },
    PausePartner {
        merchant: MerchantId,
        partner: PartnerId,
    },
    Link(Link),
    Plan(Plan),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Saved {
    Created,
    Updated,
}

fn refused(conflict: bool, code: &'static str, field: Option<&'static str>, detail: String) -> Refusal {
    Refusal::new(conflict, code, field, detail)
}

/// Partner and link ids are unique across merchants: the refusal when another merchant
/// holds the id `op` writes. Cluster mode also asks it of a node's whole catalog before
/// appending, since a partition's catalog holds its own merchants only.
pub fn id_taken(catalog: &Catalog, op: &EntityOp) -> Option<Refusal> {
    match op {
        EntityOp::Partner { partner, .. } => partner_taken(catalog, partner),
        EntityOp::Link(link) => link_taken(catalog, link),
        _ => None,
    }
}

fn partner_taken(catalog: &Catalog, partner: &Partner) -> Option<Refusal> {
    let other = catalog.partners.get(&partner.id).is_some_and(|p| p.merchant_id != partner.merchant_id);
    other.then(|| {
        let detail = format!("partner id {} is taken; partner ids are unique across merchants", partner.id);
        refused(true, "partner_id_taken", None, detail)
    })
}

fn link_taken(catalog: &Catalog, link: &Link) -> Option<Refusal> {
    let other = catalog.links.get(&link.id).is_some_and(|l| l.merchant_id != link.merchant_id);
    other.then(|| {
        let detail = format!("link id {} is taken; link ids are unique across merchants", link.id);
        refused(true, "link_id_taken", None, detail)
    })
}

/// Checks an entity write against the catalog and stages its effects; a backend
/// publishes the new catalog ([`Catalog::apply`]) once they are written.
pub(super) fn stage<S: State + ?Sized>(tx: &mut Tx<'_, S>, op: EntityOp) -> Result<Saved, Refusal> {
    let catalog = tx.catalog();
    let no_merchant =
        |id: &MerchantId| refused(false, "merchant_not_found", None, format!("merchant {id} does not exist"));
    match op {
        EntityOp::Merchant { mut merchant, secret, token_hash } => {
            if let Some(hash) = token_hash.filter(|_| merchant.postback_token) {
                if !catalog.postback_tokens.contains_key(&merchant.id) {
                    tx.push(Effect::PostbackToken { merchant: merchant.id.clone(), hash });
                }
            }
            let saved = match catalog.merchants.get(&merchant.id) {
                Some(existing) => {
                    merchant.created_ms = existing.created_ms;
                    Saved::Updated
                }
                None => {
                    let secrets = SecretSet::new(secret);
                    tx.push(Effect::MerchantSecrets { merchant: merchant.id.clone(), secrets: Box::new(secrets) });
                    Saved::Created
                }
            };
            tx.push(Effect::Merchant(Box::new(merchant)));
            Ok(saved)
        }
        EntityOp::RotateMerchantSecret { merchant, secret, now, grace_ms } => {
            let mut set = catalog.secrets.get(&merchant).cloned().ok_or_else(|| no_merchant(&merchant))?;
            set.rotate(secret, now, grace_ms);
            tx.push(Effect::MerchantSecrets { merchant, secrets: Box::new(set) });
            Ok(Saved::Updated)
        }
        EntityOp::RotatePartnerSecret { merchant, partner, secret, now, grace_ms } => {
            if catalog.partner_of(&merchant, &partner).is_none() {
                return Err(refused(false, "not_found", None, format!("merchant {merchant} has no partner {partner}")));
            }
            let mut set =
                catalog.partner_secrets.get(&partner).cloned().unwrap_or_else(|| SecretSet::new(secret.clone()));
            set.rotate(secret, now, grace_ms);
            tx.push(Effect::PartnerSecrets { partner, secrets: Box::new(set) });
            Ok(Saved::Updated)
        }
        EntityOp::RotatePostbackToken { merchant, token_hash } => {
            let m = catalog.merchants.get(&merchant).ok_or_else(|| no_merchant(&merchant))?;
            if !m.postback_token {
                return Err(refused(
                    true,
                    "token_mode_off",
                    None,
                    format!("merchant {merchant} does not use postback tokens; set postback_token: true first"),
                ));
            }
            tx.push(Effect::PostbackToken { merchant, hash: token_hash });
            Ok(Saved::Updated)
        }
        EntityOp::Partner { mut partner, secret } => {
            if !catalog.merchants.contains_key(&partner.merchant_id) {
                return Err(no_merchant(&partner.merchant_id));
            }
            if let Some(r) = partner_taken(catalog, &partner) {
                return Err(r);
            }
            let saved = match catalog.partners.get(&partner.id) {
                Some(p) => {
                    partner.created_ms = p.created_ms;
                    Saved::Updated
                }
                None => {
                    let secrets = SecretSet::new(secret);
                    tx.push(Effect::PartnerSecrets { partner: partner.id.clone(), secrets: Box::new(secrets) });
                    Saved::Created
                }
            };
            for c in &partner.coupons {
                if catalog.coupon_owner(&partner.merchant_id, c).is_some_and(|o| o.id != partner.id) {
                    return Err(refused(
                        true,
                        "coupon_taken",
                        Some("coupons"),
                        format!("coupon {c} belongs to another partner"),
                    ));
                }
            }
            check_plan_ref(catalog, &partner.merchant_id, partner.plan_id.as_ref())?;
            tx.push(Effect::Partner(Box::new(partner)));
            Ok(saved)
        }
        EntityOp::PausePartner { merchant, partner } => {
            let mut p = catalog
                .partner_of(&merchant, &partner)
                .cloned()
                .ok_or_else(|| refused(false, "not_found", None, format!("partner {partner} does not exist")))?;
            p.status = Status::Paused;
            tx.push(Effect::Partner(Box::new(p)));
            Ok(Saved::Updated)
        }
        EntityOp::Link(mut link) => {
            if !catalog.merchants.contains_key(&link.merchant_id) {
                return Err(no_merchant(&link.merchant_id));
            }
            if catalog.partner_of(&link.merchant_id, &link.partner_id).is_none() {
                return Err(refused(
                    false,
                    "invalid_field",
                    Some("partner_id"),
                    format!("partner {} is not a partner of this merchant", link.partner_id),
                ));
            }
            check_plan_ref(catalog, &link.merchant_id, link.plan_id.as_ref())?;
            if let Some(r) = link_taken(catalog, &link) {
                return Err(r);
            }
            let saved = match catalog.links.get(&link.id) {
                Some(l) => {
                    link.created_ms = l.created_ms;
                    Saved::Updated
                }
                None => Saved::Created,
            };
            tx.push(Effect::Link(Box::new(link)));
            Ok(saved)
        }
        EntityOp::Plan(plan) => {
            if !catalog.merchants.contains_key(&plan.merchant_id) {
                return Err(no_merchant(&plan.merchant_id));
            }
            let saved = match catalog.current_plan(&plan.merchant_id, &plan.id) {
                Some(current) if same_terms(current, &plan) => return Ok(Saved::Updated),
                Some(_) => Saved::Updated,
                None => Saved::Created,
            };
            tx.push(Effect::Plan(Box::new(plan)));
            Ok(saved)
        }
    }
}

/// Two versions with the same terms: a re-applied config adds no version.
fn same_terms(a: &Plan, b: &Plan) -> bool {
    Plan { version_from_ms: 0, ..a.clone() } == Plan { version_from_ms: 0, ..b.clone() }
}

fn check_plan_ref(catalog: &Catalog, merchant: &MerchantId, plan: Option<&PlanId>) -> Result<(), Refusal> {
    match plan {
        Some(p) if catalog.current_plan(merchant, p).is_none() => {
            Err(refused(false, "invalid_field", Some("plan_id"), format!("plan {p} does not exist for this merchant")))
        }
        _ => Ok(()),
    }
}

impl Catalog {
    /// Applies the catalog part of a command's effects (entity writes); other effects
    /// leave it as it is.
    pub fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::Merchant(m) => {
                self.merchants.insert(m.id.clone(), (**m).clone());
            }
            Effect::MerchantSecrets { merchant, secrets } => {
                self.secrets.insert(merchant.clone(), (**secrets).clone());
            }
            Effect::PostbackToken { merchant, hash } => {
                self.postback_tokens.insert(merchant.clone(), *hash);
            }
            Effect::Partner(p) => self.insert_partner((**p).clone()),
            Effect::PartnerSecrets { partner, secrets } => {
                self.partner_secrets.insert(partner.clone(), (**secrets).clone());
            }
            Effect::Link(l) => {
                self.links.insert(l.id.clone(), (**l).clone());
            }
            Effect::Plan(p) => self.insert_plan((**p).clone()),
            _ => {}
        }
    }
}
