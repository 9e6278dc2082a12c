//! Outbound partner postbacks (SPEC 10). Today: where a postback may be sent ([`ssrf`]),
//! checked when a partner's `outbound` is configured. The outbox and the delivery
//! worker come with the engine (issues 13 and 14).

pub mod ssrf;
