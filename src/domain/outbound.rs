//! A partner's outbound postback (SPEC 10) as configured: the URL template and its
//! macros, the method and the events that fire it. Pure: whether the URL's host may be
//! reached (SSRF) needs name resolution and lives in `outbound::ssrf`.

use serde::{Deserialize, Serialize};

use super::click::ClickRecord;
use super::clock::UnixMillis;
use super::conversion::{ConversionRecord, ConversionStatus, RuleKind};
use super::ids::{MerchantId, PartnerId, TxnId, Ulid};
use super::money::Money;
use super::FieldError;

/// The macros a GET template may use; each is replaced percent-encoded at send time.
pub const MACROS: [&str; 17] = [
    "click_id",
    "txn_id",
    "event",
    "amount",
    "currency",
    "commission",
    "status",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "conversion_id",
    "partner_id",
    "link_id",
    "occurred_at",
    "webhook_id",
];

/// Longest URL template accepted.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum OutboundEvent {
    Created,
    Approved,
    Rejected,
    Reversed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboundMethod {
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "POST")]
    Post,
}

/// `outbound` on a partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    pub url: String,
    pub method: OutboundMethod,
    /// Events that fire it; absent: `["created"]` for GET, all four for POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<OutboundEvent>>,
}

impl Outbound {
    /// Whether `event` fires this postback.
    pub fn fires(&self, event: OutboundEvent) -> bool {
        match (&self.on, self.method) {
            (Some(on), _) => on.contains(&event),
            (None, OutboundMethod::Get) => event == OutboundEvent::Created,
            (None, OutboundMethod::Post) => true,
        }
    }

    /// Checks the template: an absolute `http`/`https` URL, every `{macro}` known, no macro
    /// in the scheme, host or port (where it points must be known when it is configured),
    /// no macro at all in a POST URL, and a non-empty `on` without repeats.
    ///
    /// # Errors
    /// A [`FieldError`] naming `outbound.url` or `outbound.on`.
    pub fn check(&self) -> Result<url::Url, FieldError> {
        let bad = |detail: String| FieldError::new("outbound.url", detail);
        if self.url.len() > MAX_URL_LEN {
            return Err(bad(format!("must be at most {MAX_URL_LEN} characters")));
        }
        let mut plain = String::with_capacity(self.url.len());
        let mut rest = self.url.as_str();
        while let Some(open) = rest.find(['{', '}']) {
            plain.push_str(&rest[..open]);
            let after = &rest[open..];
            if after.starts_with('}') {
                return Err(bad("has a `}` without its `{`".into()));
            }
            let Some(close) = after.find('}') else { return Err(bad("has a `{` without its `}`".into())) };
            let name = &after[1..close];
            if !MACROS.contains(&name) {
                return Err(bad(format!("uses the unknown macro {{{name}}}; known: {}", MACROS.join(", "))));
            }
            if self.method == OutboundMethod::Post {
                return Err(bad("a POST webhook URL takes no macros: the values are in the signed JSON body".into()));
            }
            plain.push('x');
            rest = &after[close + 1..];
        }
        plain.push_str(rest);
        let parsed = url::Url::parse(&plain).map_err(|e| bad(format!("is not an absolute URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(bad("must be an absolute http or https URL".into()));
        }
        let authority_end = self
            .url
            .find("://")
            .map(|i| i + 3)
            .and_then(|start| self.url[start..].find(['/', '?', '#']).map(|e| start + e).or(Some(self.url.len())));
        if authority_end.is_some_and(|end| self.url[..end].contains('{')) {
            return Err(bad("must not have a macro in its scheme, host or port".into()));
        }
        if let Some(on) = &self.on {
            if on.is_empty() {
                return Err(FieldError::new(
                    "outbound.on",
                    "must name at least one event (created, approved, rejected, reversed)",
                ));
            }
            let mut sorted = on.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != on.len() {
                return Err(FieldError::new("outbound.on", "names an event twice"));
            }
        }
        Ok(parsed)
    }
}

/// The values of one delivery, frozen when its event happened. A macro whose value is
/// absent (a conversion without a click has no `{sub1}`) expands to nothing.
pub type MacroValues<'a> = [(&'a str, Option<&'a str>)];

/// Characters kept as they are in an expanded macro: RFC 3986's unreserved set.
const ENCODE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Expands a GET template (checked by [`Outbound::check`]): each `{macro}` becomes its
/// value, percent-encoded, so a value can never add a parameter or change the path.
pub fn expand(template: &str, values: &MacroValues<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        if let Some(value) = values.iter().find(|(n, _)| *n == name).and_then(|(_, v)| *v) {
            out.extend(percent_encoding::utf8_percent_encode(value, ENCODE));
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// To be sent: due at `due_ms`, or waiting behind an earlier delivery about the same
    /// conversion (`due_ms` is then `None`).
    Pending,
    /// The partner's endpoint answered `410 Gone`: kept until `outbound:enable`.
    Parked,
    /// A `2xx` was received.
    Delivered,
    /// Every attempt of the retry window failed; an admin's `:retry` sends it again.
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Parked => "parked",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    /// Delivered or dead: nothing more is sent unless an admin asks.
    pub fn finished(self) -> bool {
        matches!(self, DeliveryState::Delivered | DeliveryState::Dead)
    }

    pub fn parse(text: &str) -> Option<Self> {
        [DeliveryState::Pending, DeliveryState::Parked, DeliveryState::Delivered, DeliveryState::Dead]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl OutboundEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundEvent::Created => "created",
            OutboundEvent::Approved => "approved",
            OutboundEvent::Rejected => "rejected",
            OutboundEvent::Reversed => "reversed",
        }
    }
}

/// The values a delivery sends: what its event decided (the status after it, the
/// commission or its change), frozen in the delivery, and the conversion's facts, which
/// never change (read from the conversion and its click when it is sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryValues {
    pub conversion_id: Ulid,
    pub txn_id: String,
    /// The conversion's event (`sale`, `lead`, ...).
    pub event: String,
    /// The conversion's amount, as a decimal string.
    pub amount: Option<String>,
    pub currency: Option<String>,
    /// The partner's commission: on `created` and `approved` the commission; on `rejected`
    /// and `reversed` the change to it (negative).
    pub commission: Option<String>,
    pub commission_currency: Option<String>,
    /// The conversion's status after the event.
    pub status: String,
    pub click_id: Option<String>,
    pub link_id: Option<String>,
    pub partner_id: String,
    /// The attributing click's `sub1`..`sub5`.
    pub subs: [Option<String>; 5],
    pub occurred_ms: UnixMillis,
}

impl DeliveryValues {
    /// The values of `d`, from the conversion it is about and that conversion's click
    /// (when a click attributed it).
    pub fn of(d: &Delivery, rec: &ConversionRecord, click: Option<&ClickRecord>) -> DeliveryValues {
        DeliveryValues {
            conversion_id: rec.conversion_id,
            txn_id: rec.txn_id.to_string(),
            event: rec.event.clone(),
            amount: rec.amount.map(|a| a.amount_text()),
            currency: rec.amount.map(|a| a.currency.to_string()),
            commission: d.commission.map(|c| c.amount_text()),
            commission_currency: d.commission.map(|c| c.currency.to_string()),
            status: d.status.as_str().to_string(),
            click_id: click.map(|c| c.click_id.to_string()),
            link_id: click.map(|c| c.link_id.to_string()),
            partner_id: d.partner_id.to_string(),
            subs: click.map(|c| c.subs.clone()).unwrap_or_default(),
            occurred_ms: rec.occurred_ms,
        }
    }
}

/// The click that attributed a conversion, when a click did: its `{click_id}`,
/// `{link_id}` and subs are a delivery's.
pub fn attributing_click(rec: &ConversionRecord) -> Option<Ulid> {
    let by_click = rec.attribution.as_ref().is_some_and(|a| a.rule == RuleKind::Click);
    rec.keys.click_id.as_deref().filter(|_| by_click).and_then(|c| Ulid::parse(c).ok())
}

/// Most attempts kept with a delivery; older ones are counted, not kept.
pub const KEPT_ATTEMPTS: usize = 20;

/// One attempt to send a delivery, as the worker saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLog {
    pub at_ms: UnixMillis,
    pub duration_ms: u64,
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// Why no answer came (`timeout`, `connect`, `ssrf_blocked`, ...), with the detail.
    pub error: Option<String>,
    /// The first KiB of the answer's body (lossy UTF-8).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub response: String,
    /// The answer's `Retry-After`, in milliseconds from `at_ms`, on `429` and `503`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A durable notification to a partner about one event of one conversion (SPEC 10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Time-ordered; the `webhook-id` is `msg_` and this id, the same on every attempt.
    pub id: Ulid,
    pub merchant_id: MerchantId,
    pub partner_id: PartnerId,
    /// What happened: `created`, `approved`, `rejected`, `reversed`.
    pub trigger: OutboundEvent,
    /// The conversion it is about.
    pub txn_id: TxnId,
    pub conversion_id: Ulid,
    /// The conversion's status after the event.
    pub status: ConversionStatus,
    /// The commission (created, approved) or its change (rejected, reversed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commission: Option<Money>,
    pub created_ms: UnixMillis,
    pub state: DeliveryState,
    /// When it is tried next; `None` while it waits behind an earlier delivery, is parked
    /// or is finished.
    pub due_ms: Option<UnixMillis>,
    /// The first attempt of the current round: the retry window counts from it. An admin's
    /// `:retry` starts a new round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_start_ms: Option<UnixMillis>,
    /// Failed attempts in the current round.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed: u32,
    /// Attempts ever made.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt_count: u32,
    /// The last [`KEPT_ATTEMPTS`] attempts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptLog>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<UnixMillis>,
    /// The next delivery about the same conversion, waiting for this one to finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Ulid>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Delivery {
    /// Pending and due: the worker sends it.
    pub fn is_due(&self) -> bool {
        self.state == DeliveryState::Pending && self.due_ms.is_some()
    }

    /// Pending behind an earlier delivery about the same conversion.
    pub fn is_waiting(&self) -> bool {
        self.state == DeliveryState::Pending && self.due_ms.is_none()
    }

    /// The `webhook-id` of every attempt.
    pub fn webhook_id(&self) -> String {
        format!("msg_{}", self.id)
    }
}

/// A partner endpoint that answered `410 Gone`: its deliveries are parked until
/// `outbound:enable`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointOff {
    pub since_ms: UnixMillis,
    /// The delivery whose attempt got the `410`.
    pub delivery_id: Ulid,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_expand_percent_encoded() {
        let values: &MacroValues<'_> = &[
            ("click_id", Some("01JD0")),
            ("commission", Some("7.50")),
            ("sub1", Some("a b&c=d/é")),
            ("txn_id", Some("order#1?x")),
            ("sub2", None),
        ];
        let url = expand("https://t.example/pb?cid={click_id}&amt={commission}&s1={sub1}&s2={sub2}&t={txn_id}", values);
        assert_eq!(url, "https://t.example/pb?cid=01JD0&amt=7.50&s1=a%20b%26c%3Dd%2F%C3%A9&s2=&t=order%231%3Fx");
        assert_eq!(
            expand("https://t.example/{partner_id}", values),
            "https://t.example/",
            "unknown values expand to nothing"
        );
    }

    fn get(url: &str) -> Outbound {
        Outbound { url: url.into(), method: OutboundMethod::Get, on: None }
    }

    #[test]
    fn templates_are_checked() {
        let ok = [
            "https://ann.example/pb?cid={click_id}&amt={commission}&s={sub1}",
            "http://tracker.example:8443/p/{partner_id}/{txn_id}",
            "https://t.example/pb",
        ];
        for url in ok {
            assert!(get(url).check().is_ok(), "{url}");
        }
        let bad = [
            ("ftp://ann.example/x", "http or https"),
            ("/relative/{click_id}", "absolute"),
            ("https://{partner_id}.example/pb", "host"),
            ("https://ann.example:{sub1}/pb", "not an absolute URL"),
            ("https://ann.example/pb?c={clickid}", "unknown macro"),
            ("https://ann.example/pb?c={click_id", "without its `}`"),
            ("https://ann.example/pb?c=}", "without its `{`"),
        ];
        for (url, why) in bad {
            let e = get(url).check().unwrap_err();
            assert_eq!(e.field, "outbound.url");
            assert!(e.detail.contains(why), "{url}: {}", e.detail);
        }
        let post =
            Outbound { url: "https://ann.example/hook?c={click_id}".into(), method: OutboundMethod::Post, on: None };
        assert!(post.check().unwrap_err().detail.contains("POST"));
    }

    #[test]
    fn events_default_by_method_and_are_checked() {
        let all = [OutboundEvent::Created, OutboundEvent::Approved, OutboundEvent::Rejected, OutboundEvent::Reversed];
        let firing = |o: &Outbound| all.into_iter().filter(|e| o.fires(*e)).collect::<Vec<_>>();
        assert_eq!(firing(&get("https://a.example/")), [OutboundEvent::Created]);
        let post = Outbound { url: "https://a.example/".into(), method: OutboundMethod::Post, on: None };
        assert_eq!(firing(&post), all);
        let chosen = Outbound { on: Some(vec![OutboundEvent::Reversed]), ..get("https://a.example/") };
        assert_eq!(firing(&chosen), [OutboundEvent::Reversed]);
        let empty = Outbound { on: Some(vec![]), ..get("https://a.example/") };
        assert_eq!(empty.check().unwrap_err().field, "outbound.on");
        let twice =
            Outbound { on: Some(vec![OutboundEvent::Created, OutboundEvent::Created]), ..get("https://a.example/") };
        assert_eq!(twice.check().unwrap_err().field, "outbound.on");
    }
}
