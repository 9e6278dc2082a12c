//! Every operation tally serves, as a table: listener, method, path template, route.
//!
//! The routers (`public::handle`, `admin::handle`) match paths by hand, for speed and
//! for precise 404/405 answers. This table is what `docs/openapi.yaml` is checked
//! against (`tests/api/openapi.rs`: the same operations, no more, no fewer), and the
//! same test sends each operation to a live tally and checks the router files it under
//! this route. A route added to the router but not here, or here but not in the
//! document, fails that test.

use super::{Listener, Route};

/// One operation.
#[derive(Debug, Clone, Copy)]
pub struct Operation {
    pub listener: Listener,
    /// Upper case, as in HTTP.
    pub method: &'static str,
    /// The OpenAPI path template (`/c/{link_id}`).
    pub path: &'static str,
    pub route: Route,
}

const fn public(method: &'static str, path: &'static str, route: Route) -> Operation {
    Operation { listener: Listener::Public, method, path, route }
}

const fn admin(method: &'static str, path: &'static str, route: Route) -> Operation {
    Operation { listener: Listener::Admin, method, path, route }
}

/// Every operation of both listeners.
pub const OPERATIONS: &[Operation] = &[
    public("GET", "/c/{link_id}", Route::Click),
    public("HEAD", "/c/{link_id}", Route::Click),
    public("GET", "/pb/{merchant_id}", Route::Postback),
    public("POST", "/v1/merchants/{merchant_id}/conversions", Route::Conversion),
    public("POST", "/v1/merchants/{merchant_id}/conversions/batch", Route::ConversionBatch),
    public("POST", "/v1/merchants/{merchant_id}/clicks", Route::ServerClick),
    public("POST", "/v1/merchants/{merchant_id}/adjustments", Route::Adjustment),
    public("POST", "/v1/merchants/{merchant_id}/touches", Route::Touch),
    public("POST", "/v1/partners/{partner_id}/deals", Route::Deal),
    public("GET", "/v1/partners/{partner_id}/conversions", Route::PartnerConversions),
    public("GET", "/v1/partners/{partner_id}/statements/{month}", Route::PartnerStatement),
    admin("GET", "/metrics", Route::Metrics),
    admin("GET", "/healthz", Route::Health),
    admin("GET", "/readyz", Route::Ready),
    admin("POST", "/admin/v1/backups", Route::AdminBackup),
    admin("PUT", "/admin/v1/merchants/{merchant_id}", Route::AdminMerchant),
    admin("GET", "/admin/v1/merchants/{merchant_id}", Route::AdminMerchant),
    admin("POST", "/admin/v1/merchants/{merchant_id}/secrets:rotate", Route::AdminSecretRotate),
    admin("POST", "/admin/v1/merchants/{merchant_id}/postback-token:rotate", Route::AdminTokenRotate),
    admin("PUT", "/admin/v1/merchants/{merchant_id}/partners/{partner_id}", Route::AdminPartner),
    admin("GET", "/admin/v1/merchants/{merchant_id}/partners/{partner_id}", Route::AdminPartner),
    admin("DELETE", "/admin/v1/merchants/{merchant_id}/partners/{partner_id}", Route::AdminPartner),
    admin("PUT", "/admin/v1/merchants/{merchant_id}/links/{link_id}", Route::AdminLink),
    admin("GET", "/admin/v1/merchants/{merchant_id}/links/{link_id}", Route::AdminLink),
    admin("PUT", "/admin/v1/merchants/{merchant_id}/plans/{plan_id}", Route::AdminPlan),
    admin("GET", "/admin/v1/merchants/{merchant_id}/plans/{plan_id}", Route::AdminPlan),
    admin("GET", "/admin/v1/merchants/{merchant_id}/conversions", Route::AdminConversions),
    admin("GET", "/admin/v1/merchants/{merchant_id}/conversions/{txn_id}", Route::AdminConversion),
    admin("POST", "/admin/v1/merchants/{merchant_id}/conversions/{txn_id}:review", Route::AdminReview),
    admin("POST", "/admin/v1/merchants/{merchant_id}/accounts/{account}:reassign", Route::AdminReassign),
    admin("GET", "/admin/v1/merchants/{merchant_id}/accounts/{account}", Route::AdminAccount),
    admin("GET", "/admin/v1/merchants/{merchant_id}/deliveries", Route::AdminDeliveries),
    admin("GET", "/admin/v1/merchants/{merchant_id}/deliveries/{delivery_id}", Route::AdminDelivery),
    admin("POST", "/admin/v1/merchants/{merchant_id}/deliveries/{delivery_id}:retry", Route::AdminDeliveryRetry),
    admin(
        "POST",
        "/admin/v1/merchants/{merchant_id}/partners/{partner_id}/outbound:enable",
        Route::AdminOutboundEnable,
    ),
    admin(
        "POST",
        "/admin/v1/merchants/{merchant_id}/partners/{partner_id}/secrets:rotate",
        Route::AdminPartnerSecretRotate,
    ),
    admin("GET", "/admin/v1/merchants/{merchant_id}/reports/partners", Route::AdminReportPartners),
    admin("GET", "/admin/v1/merchants/{merchant_id}/reports/program", Route::AdminReportProgram),
    admin("GET", "/admin/v1/merchants/{merchant_id}/ledger", Route::AdminLedger),
    admin("GET", "/admin/v1/merchants/{merchant_id}/partners/{partner_id}/balance", Route::AdminPartnerBalance),
    admin("POST", "/admin/v1/merchants/{merchant_id}/payouts", Route::AdminPayouts),
    admin("GET", "/admin/v1/merchants/{merchant_id}/payouts/{payout_id}", Route::AdminPayout),
    admin(
        "POST",
        "/admin/v1/merchants/{merchant_id}/payouts/{payout_id}/lines/{partner_id}:paid",
        Route::AdminPayoutLine,
    ),
    admin(
        "POST",
        "/admin/v1/merchants/{merchant_id}/payouts/{payout_id}/lines/{partner_id}:failed",
        Route::AdminPayoutLine,
    ),
    admin("GET", "/admin/v1/merchants/{merchant_id}/partners/{partner_id}/statements/{month}", Route::AdminStatement),
    admin("GET", "/admin/ui", Route::AdminUi),
    admin("GET", "/admin/ui/app.js", Route::AdminUi),
    admin("GET", "/admin/ui/app.css", Route::AdminUi),
];

/// Whether a request path matches a template: `{name}` takes one segment, and a
/// segment `{name}:action` one that ends with `:action`.
fn matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) => {
                let ok = match ts.split_once('}') {
                    Some((open, "")) if open.starts_with('{') => !ps.is_empty(),
                    Some((open, action)) if open.starts_with('{') => {
                        ps.strip_suffix(action).is_some_and(|head| !head.is_empty())
                    }
                    _ => ts == ps,
                };
                if !ok {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// The methods `path` takes on `listener`, for the `Allow` header of a `405`
/// (`GET, HEAD`); empty when no operation has that path.
pub fn allowed_methods(listener: Listener, path: &str) -> String {
    let mut methods: Vec<&str> =
        OPERATIONS.iter().filter(|o| o.listener == listener && matches(o.path, path)).map(|o| o.method).collect();
    methods.dedup();
    methods.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_methods_follow_the_table() {
        let cases = [
            (Listener::Public, "/c/spring", "GET, HEAD"),
            (Listener::Public, "/v1/merchants/m/conversions", "POST"),
            (Listener::Public, "/v1/merchants/m/conversions/batch", "POST"),
            (Listener::Admin, "/metrics", "GET"),
            (Listener::Admin, "/admin/v1/merchants/m", "PUT, GET"),
            (Listener::Admin, "/admin/v1/merchants/m/partners/p", "PUT, GET, DELETE"),
            (Listener::Admin, "/admin/v1/merchants/m/accounts/acme.com", "GET"),
            (Listener::Admin, "/admin/v1/merchants/m/accounts/acme.com:reassign", "POST, GET"),
            (Listener::Admin, "/admin/v1/merchants/m/accounts/:reassign", "GET"),
            (Listener::Admin, "/admin/v1/merchants/m/secrets:rotate", "POST"),
            (Listener::Public, "/metrics", ""),
            (Listener::Public, "/c/", ""),
            (Listener::Public, "/c/a/b", ""),
        ];
        for (listener, path, want) in cases {
            assert_eq!(allowed_methods(listener, path), want, "{path}");
        }
    }

    #[test]
    fn every_route_but_not_found_has_an_operation_and_no_operation_repeats() {
        for route in Route::ALL.iter().filter(|r| **r != Route::NotFound) {
            assert!(OPERATIONS.iter().any(|o| o.route == *route), "{route:?} has no operation in the table");
        }
        for (i, a) in OPERATIONS.iter().enumerate() {
            assert!(
                !OPERATIONS[i + 1..].iter().any(|b| a.method == b.method && a.path == b.path),
                "{} {} is listed twice",
                a.method,
                a.path
            );
        }
    }
}
