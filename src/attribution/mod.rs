//! Attribution (SPEC 8): which partner sourced a conversion, by which rule, and why.
//! A pure function over what the store knows, reached through [`Facts`].
//!
//! Rules, in order: `explicit` (partner_id), `deal` (the account's source of record),
//! `customer` (lifetime binding), `click`, `coupon`, `self_reported` (the customer's own
//! answer, the weakest evidence). Influencers: every other partner with
//! a registration or touch on the account inside the plan's influence window.

use crate::domain::account::{AccountRecord, Claim, CustomerBinding, TouchKind};
use crate::domain::clock::{format_rfc3339, human_duration, UnixMillis};
use crate::domain::conversion::{Attribution, AttributionKeys, Credit, Influencer, RuleKind};
use crate::domain::entities::{Partner, Status};
use crate::domain::ids::{LinkId, PartnerId, Ulid};

/// A stored click, as attribution sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickFacts {
    pub click_id: Ulid,
    pub link_id: LinkId,
    pub partner_id: PartnerId,
    pub at_ms: UnixMillis,
    /// The link's window and minimum click-to-conversion time, as the link says now.
    pub window_days: u32,
    pub min_ctit_seconds: u32,
    /// Flagged as a bot's when it was recorded.
    pub bot: bool,
    /// The visitor's fingerprint (fraud signals count by it).
    pub visitor: [u8; 16],
}

/// What attribution may ask the store, always within the conversion's merchant: another
/// merchant's partners, clicks and coupons do not exist for these lookups.
pub trait Facts {
    type Error;
    fn partner(&self, id: &PartnerId) -> Result<Option<Partner>, Self::Error>;
    fn click(&self, id: &Ulid) -> Result<Option<ClickFacts>, Self::Error>;
    fn coupon_owner(&self, coupon: &str) -> Result<Option<Partner>, Self::Error>;
    /// The account record of a normalized account.
    fn account(&self, account: &str) -> Result<Option<AccountRecord>, Self::Error>;
    fn customer(&self, customer_id: &str) -> Result<Option<CustomerBinding>, Self::Error>;
    /// The partner a customer named, by partner id or coupon, ignoring case (the text is
    /// already trimmed): an id before a coupon, the smallest when several match.
    fn named_partner(&self, text: &str) -> Result<Option<Partner>, Self::Error>;
}

/// The outcome: a sourced partner (and the link its click came through), or why nobody.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per conversion, consumed at once: boxing buys nothing
pub enum Decision {
    /// `click`: the attributing click, when the click rule decided.
    Attributed {
        attribution: Attribution,
        partner: Partner,
        click: Option<ClickFacts>,
    },
    Unattributed {
        reason: String,
    },
}

fn sourced(partner: Partner, rule: RuleKind, reason: String, click: Option<ClickFacts>) -> Decision {
    Decision::Attributed {
        attribution: Attribution {
            partner_id: partner.id.clone(),
            credit: Credit::Sourced,
            rule,
            reason,
            influencers: Vec::new(),
        },
        partner,
        click,
    }
}

/// Applies the rules in order; the first that yields a partner decides. When none
/// does, the reason lists why each given key did not.
///
/// # Errors
/// Only a failed lookup.
pub fn decide<F: Facts>(keys: &AttributionKeys, occurred_ms: UnixMillis, facts: &F) -> Result<Decision, F::Error> {
    let mut misses: Vec<String> = Vec::new();

    if let Some(id) = &keys.partner_id {
        match facts.partner(id)? {
            Some(p) => {
                let reason = format!("partner_id {id} given explicitly by the merchant");
                return Ok(sourced(p, RuleKind::Explicit, reason, None));
            }
            None => misses.push(format!("partner_id {id} is not a partner of this merchant")),
        }
    }

    if let Some(account) = &keys.account {
        match facts.account(account)? {
            Some(rec) => match rec.holder_at(occurred_ms) {
                Some(claim) => match facts.partner(&claim.partner_id)? {
                    Some(p) => {
                        let reason = claim_reason(&rec, claim, account);
                        return Ok(sourced(p, RuleKind::Deal, reason, None));
                    }
                    None => misses.push(format!("account {account} is held by a partner that no longer exists")),
                },
                None if rec.claim.is_some() => misses.push(format!("the registration of account {account} expired")),
                None => misses.push(format!("account {account} has no deal registration")),
            },
            None => misses.push(format!("account {account} has no deal registration")),
        }
    }

    if let Some(customer) = &keys.customer_id {
        match facts.customer(customer)? {
            Some(b) => match facts.partner(&b.partner_id)? {
                Some(p) => {
                    let reason = format!(
                        "customer {customer} is bound to partner {} since its first attributed sale ({}, {})",
                        p.id,
                        b.txn_id,
                        format_rfc3339(b.first_sale_ms)
                    );
                    return Ok(sourced(p, RuleKind::Customer, reason, None));
                }
                None => misses.push(format!("customer {customer} is bound to a partner that no longer exists")),
            },
            None => misses.push(format!("customer {customer} is not bound to a partner yet")),
        }
    }

    if let Some(raw) = &keys.click_id {
        match click_rule(raw, occurred_ms, facts)? {
            Ok((click, reason)) => match facts.partner(&click.partner_id)? {
                Some(p) => return Ok(sourced(p, RuleKind::Click, reason, Some(click))),
                None => {
                    misses.push(format!("click {raw} belongs to partner {}, which no longer exists", click.partner_id))
                }
            },
            Err(miss) => misses.push(miss),
        }
    }

    if let Some(coupon) = &keys.coupon {
        match facts.coupon_owner(coupon)? {
            Some(p) if p.status == Status::Active => {
                let reason = format!("coupon {coupon} is assigned to partner {}", p.id);
                return Ok(sourced(p, RuleKind::Coupon, reason, None));
            }
            Some(p) => misses.push(format!("coupon {coupon} belongs to partner {}, which is paused", p.id)),
            None => misses.push(format!("coupon {coupon} is not assigned to any partner")),
        }
    }

    if let Some(text) = &keys.self_reported {
        match facts.named_partner(text)? {
            Some(p) if p.status == Status::Active => {
                let what = if p.id.as_str().eq_ignore_ascii_case(text) { "partner" } else { "a coupon of partner" };
                let reason = format!(
                    "the customer answered \"{text}\" when asked how they heard of us, which names {what} {}; no stronger rule applied",
                    p.id
                );
                return Ok(sourced(p, RuleKind::SelfReported, reason, None));
            }
            Some(p) => misses.push(format!("self_reported \"{text}\" names partner {}, which is paused", p.id)),
            None => misses.push(format!("self_reported \"{text}\" names no partner or coupon of this merchant")),
        }
    }

    if misses.is_empty() {
        misses.push(
            "no attribution key given (partner_id, click_id, coupon, account, customer_id or self_reported)".into(),
        );
    }
    Ok(Decision::Unattributed { reason: misses.join("; ") })
}

/// Why the holder of an account's claim is its source of record: its registration, or the
/// admin reassignment that made it the holder (who, when, why, and from whom).
fn claim_reason(rec: &AccountRecord, claim: &Claim, account: &str) -> String {
    let reassigned =
        rec.reassignments.iter().rev().find(|r| r.to == claim.partner_id && r.at_ms == claim.registered_ms);
    match reassigned {
        Some(r) => format!(
            "account {account} was reassigned to partner {} on {} by {} ({}){}; an admin reassignment is the source of record",
            r.to,
            format_rfc3339(r.at_ms),
            r.by,
            r.why,
            r.from.as_ref().map(|f| format!(", taking it from partner {f}")).unwrap_or_default()
        ),
        None => format!(
            "account {account} was registered by partner {} on {} (deal {}); the first accepted registration is the source of record",
            claim.partner_id,
            format_rfc3339(claim.registered_ms),
            claim.deal_id
        ),
    }
}

/// Partners other than `sourced` with a deal registration or touch on the account inside
/// `window_days` before the conversion, each once, in the order they first touched it.
pub fn influencers(
    account: &AccountRecord,
    sourced: &PartnerId,
    occurred_ms: UnixMillis,
    window_days: u32,
) -> Vec<PartnerId> {
    influence(account, sourced, occurred_ms, window_days).into_iter().map(|i| i.partner_id).collect()
}

/// The influencers of [`influencers`] with their credit: `influenced`, by `deal` when the
/// partner registered a deal on the account, else by `touch`, and the reason naming the
/// registration or touch that counts. No commission: the plan decides that.
pub fn influence(
    account: &AccountRecord,
    sourced: &PartnerId,
    occurred_ms: UnixMillis,
    window_days: u32,
) -> Vec<Influencer> {
    let window = i64::from(window_days) * 86_400_000;
    let name = &account.account;
    let claim = account.claim.iter().map(|c| {
        let what = format!("registered deal {} on account {name}", c.deal_id);
        (&c.partner_id, c.registered_ms, true, what)
    });
    let touches = account.touches.iter().map(|t| {
        let deal = t.kind == TouchKind::Deal;
        let what = if let Some(deal_id) = t.label.strip_prefix("expired deal ") {
            format!("registered deal {deal_id} on account {name} (the registration expired)")
        } else if deal {
            format!("registered {} on account {name} after another partner", t.label)
        } else {
            format!("touched account {name} ({})", t.label)
        };
        (&t.partner_id, t.at_ms, deal, what)
    });
    let mut all: Vec<(&PartnerId, UnixMillis, bool, String)> = claim.chain(touches).collect();
    all.sort_by_key(|(_, at, _, _)| *at);
    let mut out: Vec<Influencer> = Vec::new();
    for (p, at, deal, what) in &all {
        let age = occurred_ms - at;
        if *p == sourced || !(0..=window).contains(&age) || out.iter().any(|i| i.partner_id == **p) {
            continue;
        }
        // A registration anywhere in the account's history makes the credit a deal's.
        let by_deal = *deal || all.iter().any(|(q, _, d, _)| q == p && *d);
        out.push(Influencer {
            partner_id: (*p).clone(),
            credit: Credit::Influenced,
            rule: if by_deal { RuleKind::Deal } else { RuleKind::Touch },
            reason: format!(
                "partner {p} {what} on {}, {} before the conversion, inside the {window_days}-day influence window; partner {sourced} sourced it",
                format_rfc3339(*at),
                human_duration(age)
            ),
            commission: None,
        });
    }
    out
}

/// The click rule: a click of this merchant, not after the conversion, no younger than
/// the link's minimum click-to-conversion time, inside the link's window (both edges
/// inclusive). `Ok(Err(reason))` is a miss.
fn click_rule<F: Facts>(
    raw: &str,
    occurred_ms: UnixMillis,
    facts: &F,
) -> Result<Result<(ClickFacts, String), String>, F::Error> {
    let Ok(id) = Ulid::parse(raw) else {
        return Ok(Err(format!("click_id {raw} is not a tally click id")));
    };
    let Some(click) = facts.click(&id)? else {
        return Ok(Err(format!("click {raw} is unknown")));
    };
    let elapsed = occurred_ms - click.at_ms;
    let window_ms = i64::from(click.window_days) * 86_400_000;
    let min_ms = i64::from(click.min_ctit_seconds) * 1000;
    let on = format!("click {id} on link {}", click.link_id);
    let miss = if elapsed < 0 {
        Some(format!("{on} happened {} after the conversion", human_duration(-elapsed)))
    } else if elapsed < min_ms {
        Some(format!(
            "{on} came {} before the conversion, less than the link's minimum of {} seconds",
            human_duration(elapsed),
            click.min_ctit_seconds
        ))
    } else if elapsed > window_ms {
        Some(format!(
            "{on} came {} before the conversion, outside the {}-day window",
            human_duration(elapsed),
            click.window_days
        ))
    } else {
        None
    };
    Ok(match miss {
        Some(m) => Err(m),
        None => {
            let reason = format!(
                "{on}, {} before the conversion, inside the {}-day window",
                human_duration(elapsed),
                click.window_days
            );
            Ok((click, reason))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::entities::PartnerKind;
    use crate::domain::ids::MerchantId;
    use std::collections::HashMap;
    use std::convert::Infallible;

    const DAY: i64 = 86_400_000;

    struct Fake {
        partners: HashMap<String, Partner>,
        clicks: HashMap<Ulid, ClickFacts>,
        accounts: HashMap<String, AccountRecord>,
        customers: HashMap<String, CustomerBinding>,
    }

    impl Facts for Fake {
        type Error = Infallible;
        fn partner(&self, id: &PartnerId) -> Result<Option<Partner>, Infallible> {
            Ok(self.partners.get(id.as_str()).cloned())
        }
        fn click(&self, id: &Ulid) -> Result<Option<ClickFacts>, Infallible> {
            Ok(self.clicks.get(id).cloned())
        }
        fn coupon_owner(&self, coupon: &str) -> Result<Option<Partner>, Infallible> {
            Ok(self.partners.values().find(|p| p.coupons.iter().any(|c| c == coupon)).cloned())
        }
        fn account(&self, account: &str) -> Result<Option<AccountRecord>, Infallible> {
            Ok(self.accounts.get(account).cloned())
        }
        fn customer(&self, customer_id: &str) -> Result<Option<CustomerBinding>, Infallible> {
            Ok(self.customers.get(customer_id).cloned())
        }
        fn named_partner(&self, text: &str) -> Result<Option<Partner>, Infallible> {
            let by_id = self
                .partners
                .values()
                .filter(|p| p.id.as_str().eq_ignore_ascii_case(text))
                .min_by_key(|p| p.id.clone());
            let by_coupon = || {
                self.partners
                    .values()
                    .filter(|p| p.coupons.iter().any(|c| c.eq_ignore_ascii_case(text)))
                    .min_by_key(|p| p.id.clone())
            };
            Ok(by_id.or_else(by_coupon).cloned())
        }
    }

    fn partner(id: &str, coupons: &[&str], status: Status) -> Partner {
        Partner {
            id: PartnerId::parse(id).unwrap(),
            merchant_id: MerchantId::parse("m").unwrap(),
            name: id.into(),
            kind: PartnerKind::Affiliate,
            tier: None,
            status,
            coupons: coupons.iter().map(|c| c.to_string()).collect(),
            outbound: None,
            plan_id: None,
            created_ms: 0,
            own_accounts: vec![],
        }
    }

    fn world(click_at: i64, window_days: u32, min_ctit_seconds: u32) -> (Fake, Ulid) {
        let click_id = Ulid::mint(click_at);
        let click = ClickFacts {
            click_id,
            link_id: LinkId::parse("spring").unwrap(),
            partner_id: PartnerId::parse("ann").unwrap(),
            at_ms: click_at,
            window_days,
            min_ctit_seconds,
            bot: false,
            visitor: [7; 16],
        };
        let partners = [
            partner("ann", &[], Status::Active),
            partner("bob", &["BOB10"], Status::Active),
            partner("pia", &["PIA"], Status::Paused),
        ]
        .into_iter()
        .map(|p| (p.id.to_string(), p))
        .collect();
        let claim = crate::domain::account::Claim {
            partner_id: PartnerId::parse("bob").unwrap(),
            deal_id: "D-1".into(),
            opportunity_id: None,
            registered_ms: click_at - 10 * DAY,
            expires_ms: click_at + 5 * DAY,
            converted: false,
        };
        let touch = crate::domain::account::Touch {
            partner_id: PartnerId::parse("ann").unwrap(),
            kind: crate::domain::account::TouchKind::Crm,
            label: "webinar".into(),
            at_ms: click_at - 20 * DAY,
        };
        let acme = AccountRecord {
            account: "acme.com".into(),
            claim: Some(claim),
            touches: vec![touch],
            reassignments: vec![],
        };
        let binding = CustomerBinding {
            partner_id: PartnerId::parse("bob").unwrap(),
            first_sale_ms: click_at - DAY,
            txn_id: crate::domain::ids::TxnId::parse("first").unwrap(),
        };
        let fake = Fake {
            partners,
            clicks: HashMap::from([(click_id, click)]),
            accounts: HashMap::from([("acme.com".to_string(), acme)]),
            customers: HashMap::from([("cus_1".to_string(), binding)]),
        };
        (fake, click_id)
    }

    fn keys(partner: Option<&str>, click: Option<String>, coupon: Option<&str>) -> AttributionKeys {
        AttributionKeys {
            partner_id: partner.map(|p| PartnerId::parse(p).unwrap()),
            click_id: click,
            coupon: coupon.map(String::from),
            ..Default::default()
        }
    }

    fn rule_of(d: &Decision) -> Option<(RuleKind, String)> {
        match d {
            Decision::Attributed { attribution, .. } => Some((attribution.rule, attribution.partner_id.to_string())),
            Decision::Unattributed { .. } => None,
        }
    }

    /// Keys, time of the conversion, expected (rule, partner).
    type Case = (AttributionKeys, i64, Option<(RuleKind, &'static str)>);

    #[test]
    fn rule_table() {
        let t0 = 1_790_000_000_000;
        let (f, click) = world(t0, 30, 60);
        let c = Some(click.to_string());
        let cases: Vec<Case> = vec![
            (keys(Some("bob"), c.clone(), None), t0 + DAY, Some((RuleKind::Explicit, "bob"))),
            (keys(Some("nobody"), c.clone(), None), t0 + DAY, Some((RuleKind::Click, "ann"))),
            (keys(None, c.clone(), Some("BOB10")), t0 + DAY, Some((RuleKind::Click, "ann"))),
            (keys(None, c.clone(), None), t0 + 30 * DAY, Some((RuleKind::Click, "ann"))),
            (keys(None, c.clone(), None), t0 + 30 * DAY + 1, None),
            (keys(None, c.clone(), None), t0 + 60_000, Some((RuleKind::Click, "ann"))),
            (keys(None, c.clone(), None), t0 + 59_999, None),
            (keys(None, c.clone(), None), t0 - 1, None),
            (keys(None, c.clone(), Some("BOB10")), t0 - 1, Some((RuleKind::Coupon, "bob"))),
            (keys(None, None, Some("PIA")), t0, None),
            (keys(None, Some(Ulid::mint(t0).to_string()), None), t0, None),
            (keys(None, Some("garbage".into()), None), t0, None),
            (AttributionKeys::default(), t0, None),
        ];
        for (k, at, want) in cases {
            let got = decide(&k, at, &f).unwrap();
            assert_eq!(rule_of(&got), want.map(|(r, p)| (r, p.to_string())), "{k:?} at +{}", at - t0);
        }
    }

    #[test]
    fn deal_and_customer_rules_come_before_clicks() {
        let t0 = 1_790_000_000_000;
        let (f, click) = world(t0, 30, 0);
        let c = Some(click.to_string());
        let with = |account: Option<&str>, customer: Option<&str>| AttributionKeys {
            click_id: c.clone(),
            account: account.map(String::from),
            customer_id: customer.map(String::from),
            ..Default::default()
        };
        let cases = [
            (with(Some("acme.com"), Some("cus_1")), t0 + DAY, Some((RuleKind::Deal, "bob"))),
            (with(Some("acme.com"), None), t0 + 5 * DAY, Some((RuleKind::Deal, "bob"))),
            (with(Some("acme.com"), None), t0 + 5 * DAY + 1, Some((RuleKind::Click, "ann"))),
            (with(Some("other.com"), Some("cus_1")), t0 + DAY, Some((RuleKind::Customer, "bob"))),
            (with(None, Some("cus_2")), t0 + DAY, Some((RuleKind::Click, "ann"))),
        ];
        for (k, at, want) in cases {
            let got = decide(&k, at, &f).unwrap();
            assert_eq!(rule_of(&got), want.map(|(r, p)| (r, p.to_string())), "{k:?} at +{}", at - t0);
        }
    }

    /// `self_reported` is the last rule: it credits only when no stronger key does, matches
    /// a partner id or coupon ignoring case, and never a paused partner.
    #[test]
    fn self_reported_is_the_weakest_rule() {
        let t0 = 1_790_000_000_000;
        let (f, click) = world(t0, 30, 0);
        let said = |text: &str, base: AttributionKeys| AttributionKeys { self_reported: Some(text.into()), ..base };
        let cases: Vec<Case> = vec![
            (said("ANN", AttributionKeys::default()), t0, Some((RuleKind::SelfReported, "ann"))),
            (said("bob10", AttributionKeys::default()), t0, Some((RuleKind::SelfReported, "bob"))),
            (said("bob", keys(Some("ann"), None, None)), t0, Some((RuleKind::Explicit, "ann"))),
            (said("ann", keys(None, Some(click.to_string()), None)), t0 + DAY, Some((RuleKind::Click, "ann"))),
            (said("bob", keys(None, Some(click.to_string()), None)), t0 + DAY, Some((RuleKind::Click, "ann"))),
            (said("ann", keys(None, None, Some("BOB10"))), t0, Some((RuleKind::Coupon, "bob"))),
            (
                said("ann", AttributionKeys { account: Some("acme.com".into()), ..Default::default() }),
                t0,
                Some((RuleKind::Deal, "bob")),
            ),
            (
                said("ann", AttributionKeys { customer_id: Some("cus_1".into()), ..Default::default() }),
                t0,
                Some((RuleKind::Customer, "bob")),
            ),
            (said("ann", keys(None, Some("garbage".into()), None)), t0, Some((RuleKind::SelfReported, "ann"))),
            (said("pia", AttributionKeys::default()), t0, None),
            (said("a friend", AttributionKeys::default()), t0, None),
        ];
        for (k, at, want) in cases {
            let got = decide(&k, at, &f).unwrap();
            assert_eq!(rule_of(&got), want.map(|(r, p)| (r, p.to_string())), "{k:?}");
        }
        let Decision::Attributed { attribution, .. } =
            decide(&said("bob10", AttributionKeys::default()), t0, &f).unwrap()
        else {
            panic!("attributed")
        };
        assert_eq!(
            attribution.reason,
            "the customer answered \"bob10\" when asked how they heard of us, which names a coupon of partner bob; no stronger rule applied"
        );
    }

    #[test]
    fn influencers_inside_the_window_only() {
        let t0 = 1_790_000_000_000;
        let (f, _) = world(t0, 30, 0);
        let acme = f.accounts.get("acme.com").unwrap();
        let bob = PartnerId::parse("bob").unwrap();
        let ann = PartnerId::parse("ann").unwrap();
        assert_eq!(influencers(acme, &bob, t0, 180), vec![ann.clone()]);
        assert_eq!(influencers(acme, &bob, t0 - 20 * DAY + 180 * DAY, 180), vec![ann.clone()], "window edge inclusive");
        assert!(influencers(acme, &bob, t0 - 20 * DAY + 180 * DAY + 1, 180).is_empty());
        assert_eq!(
            influencers(acme, &ann, t0, 180),
            vec![bob],
            "the registering partner influences when another sources"
        );
    }

    #[test]
    fn reasons_read_well() {
        let t0 = 1_790_000_000_000;
        let (f, click) = world(t0, 30, 0);
        let Decision::Attributed { attribution, click: facts, .. } =
            decide(&keys(None, Some(click.to_string()), None), t0 + 2 * DAY, &f).unwrap()
        else {
            panic!("attributed");
        };
        assert_eq!(
            attribution.reason,
            format!("click {click} on link spring, 2 days before the conversion, inside the 30-day window")
        );
        assert_eq!(facts.unwrap().link_id.as_str(), "spring");
        let Decision::Unattributed { reason } =
            decide(&keys(Some("zed"), Some(click.to_string()), None), t0 + 31 * DAY, &f).unwrap()
        else {
            panic!("unattributed");
        };
        assert_eq!(
            reason,
            format!("partner_id zed is not a partner of this merchant; click {click} on link spring came 31 days before the conversion, outside the 30-day window")
        );
        let Decision::Unattributed { reason } = decide(&AttributionKeys::default(), t0, &f).unwrap() else { panic!() };
        assert!(reason.starts_with("no attribution key given"));
    }
}
