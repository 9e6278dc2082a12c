//! B2B rules: deal registration (the first accepted registration is the source of
//! record), CRM touches, and audited reassignment.

use serde::{Deserialize, Serialize};

use super::convert::DAY_MS;
use super::tx::Tx;
use super::{Catalog, State};
use crate::domain::account::{AccountRecord, Claim, Reassignment, Touch, TouchKind};
use crate::domain::clock::{format_rfc3339, UnixMillis};
use crate::domain::ids::{MerchantId, PartnerId};
use crate::domain::plan::DEFAULT_DEAL_TTL_DAYS;

/// A deal registration as received, the account normalized.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DealDraft {
    pub merchant: MerchantId,
    pub partner: PartnerId,
    pub deal_id: String,
    pub account: String,
    pub opportunity_id: Option<String>,
    pub registered_ms: UnixMillis,
}

/// What a registration achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DealOutcome {
    /// The partner is now the account's source of record.
    Registered,
    /// The partner already held the account (another `deal_id`): accepted, nothing changes.
    AlreadyHeld,
    /// Another partner holds the account: refused, recorded as a touch.
    Taken,
}

/// The stored answer to a registration; a replay returns it unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredDealAnswer")]
pub struct DealAnswer {
    pub outcome: DealOutcome,
    pub deal_id: String,
    pub account: String,
    pub source_of_record: bool,
    pub expires_ms: Option<UnixMillis>,
}

/// Registers a deal: the first accepted registration of an account is its source of
/// record; a later one by another partner becomes a touch and is refused (409) without
/// naming the holder. The same partner and `deal_id` again replays the first answer.
pub(super) fn register_deal<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    d: DealDraft,
) -> Result<(DealAnswer, bool), S::Error> {
    if let Some(answer) = tx.deal(&d.partner, &d.deal_id)? {
        return Ok((answer, true));
    }
    let mut acc: AccountRecord = tx
        .account(&d.merchant, &d.account)?
        .unwrap_or_else(|| AccountRecord { account: d.account.clone(), ..Default::default() });
    let ttl_days = deal_ttl_days(tx.catalog(), &d);
    let holder = acc.holder_at(d.registered_ms).cloned();
    let answer = match holder {
        Some(c) if c.partner_id != d.partner => {
            acc.add_touch(Touch {
                partner_id: d.partner.clone(),
                kind: TouchKind::Deal,
                label: format!("deal {}", d.deal_id),
                at_ms: d.registered_ms,
            });
            DealAnswer {
                outcome: DealOutcome::Taken,
                deal_id: d.deal_id.clone(),
                account: d.account.clone(),
                source_of_record: false,
                expires_ms: None,
            }
        }
        Some(c) => DealAnswer {
            outcome: DealOutcome::AlreadyHeld,
            deal_id: d.deal_id.clone(),
            account: d.account.clone(),
            source_of_record: true,
            expires_ms: (!c.converted).then_some(c.expires_ms),
        },
        None => {
            if let Some(old) = acc.claim.take() {
                acc.add_touch(Touch {
                    partner_id: old.partner_id,
                    kind: TouchKind::Deal,
                    label: format!("expired deal {}", old.deal_id),
                    at_ms: old.registered_ms,
                });
            }
            let expires_ms = d.registered_ms + i64::from(ttl_days) * DAY_MS;
            acc.claim = Some(Claim {
                partner_id: d.partner.clone(),
                deal_id: d.deal_id.clone(),
                opportunity_id: d.opportunity_id.clone(),
                registered_ms: d.registered_ms,
                expires_ms,
                converted: false,
            });
            DealAnswer {
                outcome: DealOutcome::Registered,
                deal_id: d.deal_id.clone(),
                account: d.account.clone(),
                source_of_record: true,
                expires_ms: Some(expires_ms),
            }
        }
    };
    tx.put_account(&d.merchant, acc);
    tx.put_deal(&d.partner, &d.deal_id, answer.clone());
    Ok((answer, false))
}

/// How long a registration holds the account: `deal_ttl_days` of the plan that would pay
/// the partner (its own, else the merchant's default), in the version in force when the
/// deal was registered; [`DEFAULT_DEAL_TTL_DAYS`] without a plan.
fn deal_ttl_days(catalog: &Catalog, d: &DealDraft) -> u32 {
    let plan_id = catalog
        .partner_of(&d.merchant, &d.partner)
        .and_then(|p| p.plan_id.as_ref())
        .or_else(|| catalog.merchants.get(&d.merchant).and_then(|m| m.default_plan_id.as_ref()));
    plan_id
        .and_then(|id| catalog.plan_at(&d.merchant, id, d.registered_ms))
        .map_or(DEFAULT_DEAL_TTL_DAYS, |p| p.deal_ttl_days)
}

/// Records a touch from the merchant's CRM.
pub(super) fn touch<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    account: &str,
    t: Touch,
) -> Result<(), S::Error> {
    let mut acc: AccountRecord = tx
        .account(merchant, account)?
        .unwrap_or_else(|| AccountRecord { account: account.to_string(), ..Default::default() });
    acc.add_touch(t);
    tx.put_account(merchant, acc);
    Ok(())
}

/// Changes an account's source of record; the change, with the holder it replaces (read
/// here, atomically with the change), is kept in the account's audit list. Later
/// conversions follow the new holder, and their reason names the reassignment; past ones
/// are not rewritten.
pub(super) fn reassign<S: State + ?Sized>(
    tx: &mut Tx<'_, S>,
    merchant: &MerchantId,
    account: &str,
    to: PartnerId,
    by: String,
    why: String,
    at: UnixMillis,
) -> Result<AccountRecord, S::Error> {
    let mut acc: AccountRecord = tx
        .account(merchant, account)?
        .unwrap_or_else(|| AccountRecord { account: account.to_string(), ..Default::default() });
    let from = acc.holder_at(at).map(|c| c.partner_id.clone());
    let claim = Claim {
        partner_id: to.clone(),
        deal_id: format!("reassigned {}", format_rfc3339(at)),
        opportunity_id: acc.claim.as_ref().and_then(|c| c.opportunity_id.clone()),
        registered_ms: at,
        expires_ms: at,
        converted: true,
    };
    acc.claim = Some(claim);
    acc.reassignments.push(Reassignment { at_ms: at, from, to, by, why });
    tx.put_account(merchant, acc.clone());
    Ok(acc)
}

/// A stored answer as any version wrote it: earlier versions kept an HTTP status.
#[derive(Deserialize)]
struct StoredDealAnswer {
    #[serde(default)]
    outcome: Option<DealOutcome>,
    #[serde(default)]
    status: Option<u16>,
    deal_id: String,
    account: String,
    source_of_record: bool,
    expires_ms: Option<UnixMillis>,
}

impl From<StoredDealAnswer> for DealAnswer {
    fn from(s: StoredDealAnswer) -> Self {
        let outcome = s.outcome.unwrap_or(match s.status {
            Some(409) => DealOutcome::Taken,
            Some(201) => DealOutcome::Registered,
            _ if !s.source_of_record => DealOutcome::Taken,
            _ => DealOutcome::AlreadyHeld,
        });
        DealAnswer {
            outcome,
            deal_id: s.deal_id,
            account: s.account,
            source_of_record: s.source_of_record,
            expires_ms: s.expires_ms,
        }
    }
}
