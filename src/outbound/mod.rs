//! Outbound partner postbacks (SPEC 10): where a postback may be sent ([`ssrf`], checked
//! when a partner's `outbound` is configured and at every send), the client that sends
//! it ([`client`]) and the worker that sends due deliveries and tells the engine what
//! each attempt got ([`worker`]). The rules (which events notify whom, the order, the
//! retry schedule, parking) are the engine's (`engine::outbox`); the template expansion
//! is `domain::outbound::expand` and the sender's signature `signing::sign_all`.

pub mod client;
pub mod ssrf;
pub mod worker;
