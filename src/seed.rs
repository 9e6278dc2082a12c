//! Entities seeded from the config file (`[[merchants]]`, `[[plans]]`, `[[partners]]`,
//! `[[links]]`), so a demo or a GitOps setup needs no API calls. Seeds go through the
//! same validation and the same store calls as the admin API; applying them again is
//! harmless (an unchanged plan adds no version, existing secrets are kept).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::backend::{Backend, BackendExt, WriteError};
use crate::config::{Problem, Settings};
use crate::domain::clock::UnixMillis;
use crate::domain::entities::{Merchant, MerchantBody, Partner, PartnerBody};
use crate::domain::ids::{LinkId, MerchantId, PartnerId, PlanId};
use crate::domain::link::{Link, LinkBody};
use crate::domain::plan::{Plan, PlanBody};
use crate::engine::Saved;
use crate::signing::WebhookSecret;

pub struct MerchantSeed {
    pub merchant: Merchant,
    /// Where the merchant's secret is read from, or written to when tally generates it.
    pub secret_file: Option<PathBuf>,
}

pub struct Seeds {
    pub merchants: Vec<MerchantSeed>,
    pub plans: Vec<Plan>,
    pub partners: Vec<Partner>,
    pub links: Vec<Link>,
}

fn take_id<T>(
    map: &mut Map<String, Value>,
    key: &str,
    at: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, Problem> {
    match map.remove(key) {
        Some(Value::String(s)) => parse(&s).map_err(|e| Problem { key: format!("{at}.{key}"), problem: e }),
        Some(_) => Err(Problem { key: format!("{at}.{key}"), problem: "must be a string".into() }),
        None => Err(Problem { key: format!("{at}.{key}"), problem: "is required".into() }),
    }
}

fn body<T: DeserializeOwned>(map: Map<String, Value>, at: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { at.to_string() } else { format!("{at}.{path}") };
        Problem { key, problem: e.into_inner().to_string() }
    })
}

fn field(at: &str, e: crate::domain::FieldError) -> Problem {
    Problem { key: format!("{at}.{}", e.field), problem: e.detail }
}

/// Parses the seeds of one merchant-scoped section (`merchant_id` and `id` plus the admin
/// body), collecting every problem.
fn scoped<I, B: DeserializeOwned, T>(
    raws: &[Map<String, Value>],
    section: &str,
    parse_id: fn(&str) -> Result<I, String>,
    build: fn(B, MerchantId, I, UnixMillis) -> Result<T, crate::domain::FieldError>,
    problems: &mut Vec<Problem>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let at = format!("{section}[{i}]");
        let mut map = raw.clone();
        let r = take_id(&mut map, "merchant_id", &at, MerchantId::parse).and_then(|m| {
            let id = take_id(&mut map, "id", &at, parse_id)?;
            build(body::<B>(map, &at)?, m, id, 0).map_err(|e| field(&at, e))
        });
        match r {
            Ok(t) => out.push(t),
            Err(p) => problems.push(p),
        }
    }
    out
}

/// Parses every seed; all problems are reported, each with its key.
///
/// # Errors
/// The list of problems.
pub fn parse(settings: &Settings) -> Result<Seeds, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut seeds = Seeds { merchants: Vec::new(), plans: Vec::new(), partners: Vec::new(), links: Vec::new() };
    for (i, raw) in settings.merchants.iter().enumerate() {
        let at = format!("merchants[{i}]");
        let mut map = raw.clone();
        let secret_file = map.remove("secret_file").and_then(|v| v.as_str().map(PathBuf::from));
        let r = take_id(&mut map, "id", &at, MerchantId::parse)
            .and_then(|id| body::<MerchantBody>(map, &at)?.into_merchant(id, 0).map_err(|e| field(&at, e)));
        match r {
            Ok(merchant) => seeds.merchants.push(MerchantSeed { merchant, secret_file }),
            Err(p) => problems.push(p),
        }
    }
    seeds.plans = scoped(&settings.plans, "plans", PlanId::parse, PlanBody::into_plan, &mut problems);
    seeds.partners = scoped(&settings.partners, "partners", PartnerId::parse, PartnerBody::into_partner, &mut problems);
    seeds.links = scoped(&settings.links, "links", LinkId::parse, LinkBody::into_link, &mut problems);
    check_refs(&seeds, &mut problems);
    if problems.is_empty() {
        Ok(seeds)
    } else {
        Err(problems)
    }
}

/// The references between seeds that the store would refuse when applying them, so that
/// `check-config` refuses exactly what `serve` refuses. Seeds are self-contained: a
/// seeded link names a seeded partner and plan of its merchant, never one created
/// through the admin API (which `check-config` cannot see without opening the store).
fn check_refs(seeds: &Seeds, problems: &mut Vec<Problem>) {
    use std::collections::BTreeMap;
    let merchants: Vec<&MerchantId> = seeds.merchants.iter().map(|m| &m.merchant.id).collect();
    let mut report = |key: String, problem: String| problems.push(Problem { key, problem });
    let no_merchant = |m: &MerchantId| format!("merchant {m} is not among the seeded [[merchants]]");
    let plan_known =
        |m: &MerchantId, p: &PlanId| seeds.plans.iter().any(|plan| &plan.merchant_id == m && &plan.id == p);
    for (i, plan) in seeds.plans.iter().enumerate() {
        if !merchants.contains(&&plan.merchant_id) {
            report(format!("plans[{i}].merchant_id"), no_merchant(&plan.merchant_id));
        }
    }
    let mut partner_merchant: BTreeMap<&PartnerId, &MerchantId> = BTreeMap::new();
    let mut coupons: BTreeMap<(&MerchantId, &str), &PartnerId> = BTreeMap::new();
    for (i, p) in seeds.partners.iter().enumerate() {
        if !merchants.contains(&&p.merchant_id) {
            report(format!("partners[{i}].merchant_id"), no_merchant(&p.merchant_id));
        }
        if partner_merchant.insert(&p.id, &p.merchant_id).is_some_and(|m| m != &p.merchant_id) {
            report(format!("partners[{i}].id"), format!("partner id {} is taken by another merchant's partner", p.id));
        }
        for c in &p.coupons {
            if coupons.insert((&p.merchant_id, c.as_str()), &p.id).is_some_and(|owner| owner != &p.id) {
                report(format!("partners[{i}].coupons"), format!("coupon {c} belongs to another partner"));
            }
        }
        if let Some(plan) = p.plan_id.as_ref().filter(|plan| !plan_known(&p.merchant_id, plan)) {
            report(format!("partners[{i}].plan_id"), format!("plan {plan} is not a seeded plan of {}", p.merchant_id));
        }
    }
    let mut link_merchant: BTreeMap<&LinkId, &MerchantId> = BTreeMap::new();
    for (i, l) in seeds.links.iter().enumerate() {
        if !merchants.contains(&&l.merchant_id) {
            report(format!("links[{i}].merchant_id"), no_merchant(&l.merchant_id));
        }
        if partner_merchant.get(&l.partner_id) != Some(&&l.merchant_id) {
            report(
                format!("links[{i}].partner_id"),
                format!("partner {} is not a seeded partner of {}", l.partner_id, l.merchant_id),
            );
        }
        if let Some(plan) = l.plan_id.as_ref().filter(|plan| !plan_known(&l.merchant_id, plan)) {
            report(format!("links[{i}].plan_id"), format!("plan {plan} is not a seeded plan of {}", l.merchant_id));
        }
        if link_merchant.insert(&l.id, &l.merchant_id).is_some_and(|m| m != &l.merchant_id) {
            report(format!("links[{i}].id"), format!("link id {} is taken by another merchant's link", l.id));
        }
    }
}

/// SPEC 10's configuration-time check of every seeded partner's `outbound` destination
/// (it resolves names, so it runs at start and in `check-config`, not in `parse`).
///
/// # Errors
/// The first refused destination, with its key.
pub async fn vet_outbound(seeds: &Seeds, allow_private: bool) -> Result<(), Problem> {
    for (i, p) in seeds.partners.iter().enumerate() {
        if let Some(o) = &p.outbound {
            crate::outbound::ssrf::vet_outbound(o, allow_private, &crate::outbound::ssrf::SystemResolver)
                .await
                .map_err(|problem| Problem { key: format!("partners[{i}].outbound.url"), problem })?;
        }
    }
    Ok(())
}

/// Where a seeded merchant's generated secret is written when no `secret_file` is set.
pub fn default_secret_path(data_dir: &Path, merchant: &MerchantId) -> PathBuf {
    data_dir.join("secrets").join(format!("{merchant}.whsec"))
}

/// Writes a secret file readable by its owner only.
///
/// # Errors
/// File system errors.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(path)?, format!("{text}\n").as_bytes())
}

/// How long seeding retries a write that storage did not take: a cluster's partition logs
/// may still be electing their leaders when its nodes start (a refusal is not retried).
const SEED_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// `write`, again every 200 ms while storage does not take it, for up to [`SEED_PATIENCE`]
/// (a seed written twice is an update with the same content).
async fn patiently<T, F: std::future::Future<Output = Result<T, WriteError>>>(
    mut write: impl FnMut() -> F,
) -> Result<T, WriteError> {
    let until = std::time::Instant::now() + SEED_PATIENCE;
    loop {
        match write().await {
            Err(WriteError::Store(e)) if std::time::Instant::now() < until => {
                tracing::warn!(error = %e, "a seed was not stored yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            done => return done,
        }
    }
}

/// Applies the seeds in dependency order: merchants, plans, partners, links.
///
/// # Errors
/// A message naming the seed that could not be applied.
pub async fn apply<B: Backend + ?Sized>(
    store: &B,
    seeds: Seeds,
    data_dir: &Path,
    now: UnixMillis,
    allow_private: bool,
) -> Result<(), String> {
    vet_outbound(&seeds, allow_private).await.map_err(|p| p.to_string())?;
    let ctx = |what: String| move |e: WriteError| format!("seeding {what}: {e}");
    for MerchantSeed { mut merchant, secret_file } in seeds.merchants {
        merchant.created_ms = now;
        let path = secret_file.clone().unwrap_or_else(|| default_secret_path(data_dir, &merchant.id));
        let imported = match std::fs::read_to_string(&path) {
            Ok(text) if secret_file.is_some() => {
                Some(WebhookSecret::parse(&text).map_err(|e| format!("secret_file {}: {e}", path.display()))?)
            }
            _ => None,
        };
        let secret = imported.clone().unwrap_or_else(WebhookSecret::generate);
        let id = merchant.id.clone();
        let saved = patiently(|| store.put_merchant(merchant.clone(), secret.clone()))
            .await
            .map_err(ctx(format!("merchant {id}")))?;
        if saved == Saved::Created && imported.is_none() {
            write_private(&path, &secret.expose_text()).map_err(|e| format!("write {}: {e}", path.display()))?;
            tracing::info!(merchant = %id, path = %path.display(), "generated the merchant's signing secret");
        }
    }
    for mut plan in seeds.plans {
        plan.version_from_ms = now;
        let what = format!("plan {}", plan.id);
        patiently(|| store.put_plan(plan.clone())).await.map_err(ctx(what))?;
    }
    for mut partner in seeds.partners {
        partner.created_ms = now;
        let what = format!("partner {}", partner.id);
        let secret = WebhookSecret::generate();
        patiently(|| store.put_partner(partner.clone(), secret.clone())).await.map_err(ctx(what))?;
    }
    for mut link in seeds.links {
        link.created_ms = now;
        let what = format!("link {}", link.id);
        patiently(|| store.put_link(link.clone())).await.map_err(ctx(what))?;
    }
    Ok(())
}
