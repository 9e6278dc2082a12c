//! Outbound partner postbacks (SPEC 10). Built so far: where a postback may be sent
//! ([`ssrf`], checked when a partner's `outbound` is configured), when a failed one is
//! tried again ([`schedule`]); the template expansion is `domain::outbound::expand` and
//! the sender's signature `signing::sign_all`. The outbox and the delivery worker come
//! with the engine (issues 13 and 14).

pub mod client;
pub mod schedule;
pub mod ssrf;
