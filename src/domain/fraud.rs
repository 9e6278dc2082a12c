//! Fraud signals (docs/fraud.md): the plan's thresholds, the facts a signal is judged on,
//! the pure judgement, and the review a flagged conversion carries until an admin settles it.
//!
//! A signal never refuses anything: a flagged conversion is stored, attributed and priced
//! as usual, but it is not approved by its hold and (by default) its partner postbacks wait
//! until an admin approves it. Every signal comes with a reason a person can check.
//!
//! The facts are kept by the engine as small fixed-size records of hourly counts
//! ([`Hours`]: a flood of one visitor costs no more to keep than one click):
//! - [`VisitorRecord`]: per link and visitor, the last unique click (the `unique` flag) and
//!   the visitor's clicks in each of the last 24 UTC hours;
//! - [`Pace`]: per merchant and partner, clicks and attributed conversions in each of the
//!   last 24 UTC hours;
//! - [`Recent`]: per merchant, partner and visitor, the visitor's conversions credited to
//!   the partner in each of the last 24 UTC hours.
//!
//! "The trailing day" of a conversion is the 24 hourly buckets ending with its hour: a
//! window between 23 and 24 hours long.

use serde::{Deserialize, Serialize};

use super::clock::{human_duration, UnixMillis};

pub const DAY_MS: i64 = 86_400_000;
pub const HOUR_MS: i64 = 3_600_000;

pub const DEFAULT_FLAG_CTIT_BELOW_SECONDS: u32 = 10;
pub const DEFAULT_VISITOR_CLICKS_PER_DAY: u32 = 20;
pub const DEFAULT_CLICKS_PER_CONVERSION: u32 = 1000;
pub const DEFAULT_CONVERSIONS_PER_VISITOR_DAY: u32 = 5;

/// A plan's `fraud` table. A threshold of 0 (or `false`) switches its signal off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FraudRules {
    /// Click injection: the attributing click came less than this many seconds before the
    /// conversion.
    pub flag_ctit_below_seconds: u32,
    /// Bot click: the attributing click was flagged as a bot's.
    pub flag_bot_clicks: bool,
    /// Click flooding: the attributing click's visitor clicked the link more than this many
    /// times in the 24 hours before the conversion.
    pub flag_visitor_clicks_per_day: u32,
    /// Click flooding: the partner's clicks over the trailing day, per attributed
    /// conversion over the same day, exceed this.
    pub flag_clicks_per_conversion: u32,
    /// Repeat converter: the visitor converted for this partner more than this many times
    /// in the 24 hours up to this conversion.
    pub flag_conversions_per_visitor_day: u32,
    /// Self-referral: the customer or account is on the partner's `own_accounts`.
    pub flag_self_referral: bool,
    /// Whether partner postbacks of a flagged conversion wait until an admin approves it.
    pub hold_postbacks: bool,
}

impl Default for FraudRules {
    fn default() -> Self {
        FraudRules {
            flag_ctit_below_seconds: DEFAULT_FLAG_CTIT_BELOW_SECONDS,
            flag_bot_clicks: true,
            flag_visitor_clicks_per_day: DEFAULT_VISITOR_CLICKS_PER_DAY,
            flag_clicks_per_conversion: DEFAULT_CLICKS_PER_CONVERSION,
            flag_conversions_per_visitor_day: DEFAULT_CONVERSIONS_PER_VISITOR_DAY,
            flag_self_referral: true,
            hold_postbacks: true,
        }
    }
}

/// The `fraud` table of a plan's body: every field optional, unknown fields refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudBody {
    pub flag_ctit_below_seconds: Option<u32>,
    pub flag_bot_clicks: Option<bool>,
    pub flag_visitor_clicks_per_day: Option<u32>,
    pub flag_clicks_per_conversion: Option<u32>,
    pub flag_conversions_per_visitor_day: Option<u32>,
    pub flag_self_referral: Option<bool>,
    pub hold_postbacks: Option<bool>,
}

impl FraudBody {
    /// Every field left out takes its default.
    pub fn into_rules(self) -> FraudRules {
        let d = FraudRules::default();
        FraudRules {
            flag_ctit_below_seconds: self.flag_ctit_below_seconds.unwrap_or(d.flag_ctit_below_seconds),
            flag_bot_clicks: self.flag_bot_clicks.unwrap_or(d.flag_bot_clicks),
            flag_visitor_clicks_per_day: self.flag_visitor_clicks_per_day.unwrap_or(d.flag_visitor_clicks_per_day),
            flag_clicks_per_conversion: self.flag_clicks_per_conversion.unwrap_or(d.flag_clicks_per_conversion),
            flag_conversions_per_visitor_day: self
                .flag_conversions_per_visitor_day
                .unwrap_or(d.flag_conversions_per_visitor_day),
            flag_self_referral: self.flag_self_referral.unwrap_or(d.flag_self_referral),
            hold_postbacks: self.hold_postbacks.unwrap_or(d.hold_postbacks),
        }
    }
}

/// The kinds of signal, as named in answers, metrics and the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    ClickInjection,
    BotClick,
    ClickFlooding,
    RepeatConverter,
    SelfReferral,
}

impl SignalKind {
    pub const ALL: [SignalKind; 5] = [
        SignalKind::ClickInjection,
        SignalKind::BotClick,
        SignalKind::ClickFlooding,
        SignalKind::RepeatConverter,
        SignalKind::SelfReferral,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::ClickInjection => "click_injection",
            SignalKind::BotClick => "bot_click",
            SignalKind::ClickFlooding => "click_flooding",
            SignalKind::RepeatConverter => "repeat_converter",
            SignalKind::SelfReferral => "self_referral",
        }
    }
}

/// One raised signal and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub signal: SignalKind,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    Open,
    Approved,
    Rejected,
}

impl ReviewStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewStatus::Open => "open",
            ReviewStatus::Approved => "approved",
            ReviewStatus::Rejected => "rejected",
        }
    }
}

/// A flagged conversion's review: its signals, and who settled it, when and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub status: ReviewStatus,
    pub signals: Vec<Signal>,
    /// The partner's `created` postback was held back, to be sent on approval.
    #[serde(default)]
    pub postbacks_held: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_ms: Option<UnixMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The attributing click, as the signals see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClickSide {
    pub at_ms: UnixMillis,
    pub bot: bool,
    /// The visitor's clicks on the link in the 24 hours up to the conversion.
    pub visitor_clicks_day: u32,
    /// The visitor's conversions for the partner in the 24 hours up to and including this one.
    pub visitor_conversions_day: u32,
}

/// What the signals of one conversion are judged on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts<'a> {
    pub occurred_ms: UnixMillis,
    pub link: &'a str,
    pub partner: &'a str,
    /// Present when a click attributed the conversion.
    pub click: Option<ClickSide>,
    /// The partner's clicks and attributed conversions (this one included) over the trailing day.
    pub partner_day: (u64, u64),
    /// The customer id or account found on the partner's own list.
    pub own: Option<&'a str>,
}

/// The signals `facts` raise under `rules`, in [`SignalKind::ALL`] order.
pub fn judge(rules: &FraudRules, f: &Facts<'_>) -> Vec<Signal> {
    let mut out = Vec::new();
    let mut raise = |signal, reason: String| out.push(Signal { signal, reason });
    if let Some(c) = f.click {
        let ctit = f.occurred_ms - c.at_ms;
        let below = i64::from(rules.flag_ctit_below_seconds) * 1000;
        if ctit < below {
            raise(
                SignalKind::ClickInjection,
                format!(
                    "click {} before the conversion, under the plan's {} seconds",
                    human_duration(ctit.max(0)),
                    rules.flag_ctit_below_seconds
                ),
            );
        }
        if rules.flag_bot_clicks && c.bot {
            raise(SignalKind::BotClick, format!("the click on link {} was flagged as a bot's", f.link));
        }
        let limit = rules.flag_visitor_clicks_per_day;
        if limit > 0 && c.visitor_clicks_day > limit {
            raise(
                SignalKind::ClickFlooding,
                format!(
                    "the visitor clicked link {} {} times in the 24 h before the conversion, over the plan's {limit}",
                    f.link, c.visitor_clicks_day
                ),
            );
        }
    }
    let (clicks, conversions) = f.partner_day;
    let ratio = rules.flag_clicks_per_conversion;
    if f.click.is_some() && ratio > 0 && clicks > u64::from(ratio) * conversions.max(1) {
        raise(
            SignalKind::ClickFlooding,
            format!(
                "partner {} had {clicks} clicks for {conversions} conversions over the trailing day, over the plan's {ratio} per conversion",
                f.partner
            ),
        );
    }
    if let Some(c) = f.click {
        let limit = rules.flag_conversions_per_visitor_day;
        if limit > 0 && c.visitor_conversions_day > limit {
            raise(
                SignalKind::RepeatConverter,
                format!(
                    "the visitor converted {} times for partner {} in 24 h, over the plan's {limit}",
                    c.visitor_conversions_day, f.partner
                ),
            );
        }
    }
    if rules.flag_self_referral {
        if let Some(own) = f.own {
            raise(SignalKind::SelfReferral, format!("{own} is on partner {}'s own accounts", f.partner));
        }
    }
    out
}

/// Hours in a trailing day.
pub const DAY_HOURS: usize = 24;

fn hour_of(at: UnixMillis) -> u32 {
    u32::try_from(at.max(0) / HOUR_MS).unwrap_or(u32::MAX)
}

/// Counts of something in each of the last 24 UTC hours: a fixed 100 bytes however many
/// events there were, and no sorting. "The trailing day" of a time is the 24 hourly
/// buckets ending with the hour of that time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hours {
    /// The newest hour counted (hours since 1970).
    pub hour: u32,
    /// Slot `h % 24` holds hour `h`, for the 24 hours ending at `hour`.
    pub counts: [u32; DAY_HOURS],
}

impl Hours {
    pub const LEN: usize = 4 + 4 * DAY_HOURS;

    /// Moves the window to end at `hour` when that is later, clearing the hours it leaves.
    fn advance(&mut self, hour: u32) {
        if hour <= self.hour {
            return;
        }
        let gap = (hour - self.hour).min(DAY_HOURS as u32);
        for h in 0..gap {
            self.counts[(hour - h) as usize % DAY_HOURS] = 0;
        }
        self.hour = hour;
    }

    /// Counts one event at `at`; an event older than the window is not counted.
    pub fn count(&mut self, at: UnixMillis) {
        let hour = hour_of(at);
        self.advance(hour);
        if self.hour - hour < DAY_HOURS as u32 {
            let c = &mut self.counts[hour as usize % DAY_HOURS];
            *c = c.saturating_add(1);
        }
    }

    /// The events of the trailing day of `at`: the 24 hours ending with its hour, as far
    /// as they are kept.
    pub fn day(&self, at: UnixMillis) -> u64 {
        let end = hour_of(at);
        (0..DAY_HOURS as u32)
            .filter_map(|k| end.checked_sub(k))
            .filter(|&h| h <= self.hour && self.hour - h < DAY_HOURS as u32)
            .map(|h| u64::from(self.counts[h as usize % DAY_HOURS]))
            .sum()
    }

    /// The hour, then the 24 counts, little-endian `u32`s.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hour.to_le_bytes());
        for v in &self.counts {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Hours> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap_or_default());
        Some(Hours { hour: word(0), counts: std::array::from_fn(|i| word(1 + i)) })
    }
}

/// A visitor on a link: its last unique click and its clicks of the trailing day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VisitorRecord {
    pub last_unique_ms: Option<UnixMillis>,
    pub clicks: Hours,
}

/// Marks "no unique click yet" in the encoding.
const NONE_MS: i64 = i64::MIN;

impl VisitorRecord {
    /// Counts a click at `at`.
    pub fn click(&mut self, at: UnixMillis) {
        self.clicks.count(at);
    }

    /// The visitor's clicks in the trailing day of `at`.
    pub fn clicks_within_day(&self, at: UnixMillis) -> u32 {
        u32::try_from(self.clicks.day(at)).unwrap_or(u32::MAX)
    }

    /// The last unique click (a big-endian `i64`), then the hourly clicks. The 8-byte
    /// encoding of earlier versions (the last unique click alone) reads as such.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + Hours::LEN);
        out.extend_from_slice(&self.last_unique_ms.unwrap_or(NONE_MS).to_be_bytes());
        self.clicks.encode_into(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<VisitorRecord> {
        let (head, rest) = bytes.split_at_checked(8)?;
        let last = i64::from_be_bytes(head.try_into().ok()?);
        let clicks = if rest.is_empty() { Hours::default() } else { Hours::decode(rest)? };
        Some(VisitorRecord { last_unique_ms: (last != NONE_MS).then_some(last), clicks })
    }
}

/// A visitor's conversions for one partner, by hour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent(pub Hours);

impl Recent {
    /// Counts a conversion at `at`; returns how many fall in its trailing day.
    pub fn add(&mut self, at: UnixMillis) -> u32 {
        self.0.count(at);
        u32::try_from(self.0.day(at)).unwrap_or(u32::MAX)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Hours::LEN);
        self.0.encode_into(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Recent> {
        Hours::decode(bytes).map(Recent)
    }
}

/// A partner's clicks and attributed conversions in each of the last 24 UTC hours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pace {
    pub clicks: Hours,
    pub conversions: Hours,
}

impl Pace {
    /// Adds a click (`conversion` false) or a conversion at `at`.
    pub fn count(&mut self, at: UnixMillis, conversion: bool) {
        if conversion {
            self.conversions.count(at)
        } else {
            self.clicks.count(at)
        }
    }

    /// Clicks and conversions in the trailing day of `at`.
    pub fn day(&self, at: UnixMillis) -> (u64, u64) {
        (self.clicks.day(at), self.conversions.day(at))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 * Hours::LEN);
        self.clicks.encode_into(&mut out);
        self.conversions.encode_into(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Pace> {
        if bytes.len() != 2 * Hours::LEN {
            return None;
        }
        let (a, b) = bytes.split_at(Hours::LEN);
        Some(Pace { clicks: Hours::decode(a)?, conversions: Hours::decode(b)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: i64 = 1_790_000_000_000;

    fn facts(click: Option<ClickSide>, partner_day: (u64, u64), own: Option<&str>) -> Facts<'_> {
        Facts { occurred_ms: T, link: "spring", partner: "ann", click, partner_day, own }
    }

    fn side(ctit_s: i64, bot: bool, clicks: u32, conversions: u32) -> Option<ClickSide> {
        Some(ClickSide {
            at_ms: T - ctit_s * 1000,
            bot,
            visitor_clicks_day: clicks,
            visitor_conversions_day: conversions,
        })
    }

    #[test]
    fn signal_table() {
        let d = FraudRules::default();
        let off = FraudRules {
            flag_ctit_below_seconds: 0,
            flag_bot_clicks: false,
            flag_visitor_clicks_per_day: 0,
            flag_clicks_per_conversion: 0,
            flag_conversions_per_visitor_day: 0,
            flag_self_referral: false,
            hold_postbacks: false,
        };
        use SignalKind::*;
        let cases: Vec<(FraudRules, Facts<'_>, Vec<SignalKind>)> = vec![
            (d, facts(side(600, false, 1, 1), (10, 1), None), vec![]),
            (d, facts(None, (100_000, 1), None), vec![]),
            (d, facts(side(2, false, 1, 1), (1, 1), None), vec![ClickInjection]),
            (d, facts(side(10, false, 1, 1), (1, 1), None), vec![]),
            (d, facts(side(9, false, 1, 1), (1, 1), None), vec![ClickInjection]),
            (d, facts(side(600, true, 1, 1), (1, 1), None), vec![BotClick]),
            (d, facts(side(600, false, 21, 1), (21, 1), None), vec![ClickFlooding]),
            (d, facts(side(600, false, 20, 1), (20, 1), None), vec![]),
            (d, facts(side(600, false, 1, 1), (1001, 1), None), vec![ClickFlooding]),
            (d, facts(side(600, false, 1, 1), (2000, 2), None), vec![]),
            (d, facts(side(600, false, 1, 6), (6, 6), None), vec![RepeatConverter]),
            (d, facts(side(600, false, 1, 5), (6, 5), None), vec![]),
            (d, facts(None, (0, 1), Some("acme.com")), vec![SelfReferral]),
            (
                d,
                facts(side(1, true, 50, 9), (5000, 1), Some("c1")),
                vec![ClickInjection, BotClick, ClickFlooding, ClickFlooding, RepeatConverter, SelfReferral],
            ),
            (off, facts(side(1, true, 50, 9), (5000, 1), Some("c1")), vec![]),
        ];
        for (i, (rules, f, want)) in cases.iter().enumerate() {
            let got: Vec<SignalKind> = judge(rules, f).iter().map(|s| s.signal).collect();
            assert_eq!(&got, want, "case {i}");
        }
    }

    #[test]
    fn reasons_read_as_documented() {
        let d = FraudRules::default();
        let s = judge(&d, &facts(side(3, false, 1, 1), (1, 1), None));
        assert_eq!(s[0].reason, "click 3 seconds before the conversion, under the plan's 10 seconds");
        let s = judge(&d, &facts(side(600, false, 50, 1), (50, 1), None));
        assert_eq!(
            s[0].reason,
            "the visitor clicked link spring 50 times in the 24 h before the conversion, over the plan's 20"
        );
    }

    #[test]
    fn body_defaults() {
        assert_eq!(FraudBody::default().into_rules(), FraudRules::default());
        let body = FraudBody { flag_visitor_clicks_per_day: Some(500), ..Default::default() };
        assert_eq!(body.into_rules().flag_visitor_clicks_per_day, 500);
    }

    #[test]
    fn old_visitor_values_read_as_the_last_unique_click() {
        let old = T.to_be_bytes();
        assert_eq!(
            VisitorRecord::decode(&old),
            Some(VisitorRecord { last_unique_ms: Some(T), clicks: Hours::default() })
        );
        let mut v = VisitorRecord::default();
        v.click(T);
        v.click(T + 5);
        assert_eq!(VisitorRecord::decode(&v.encode()), Some(v));
        assert_eq!(v.encode().len(), 8 + Hours::LEN, "a fixed size");
        assert_eq!(VisitorRecord::decode(&[1, 2, 3]), None);
        assert_eq!(VisitorRecord::decode(&[0; 9]), None);
    }

    proptest! {
        /// An hourly count's day equals a direct count over the events it kept: those in
        /// the 24 hours ending with the newest event's hour, and within the asked day.
        #[test]
        fn hours_count_the_trailing_day(hours in proptest::collection::vec(0i64..200, 0..200), ask in 0i64..220) {
            let mut h = Hours::default();
            let mut newest = 0u32;
            for x in &hours {
                let at = T + x * HOUR_MS;
                h.count(at);
                newest = newest.max(hour_of(at));
            }
            let asked = hour_of(T + ask * HOUR_MS);
            // Kept: not older than 24 hours before the newest when it arrived (so also now).
            let mut kept_newest = 0u32;
            let mut kept: Vec<u32> = Vec::new();
            for x in &hours {
                let hr = hour_of(T + x * HOUR_MS);
                kept_newest = kept_newest.max(hr);
                if kept_newest - hr < 24 { kept.push(hr); }
            }
            let want = kept.iter().filter(|&&hr| newest - hr < 24 && hr <= asked && asked - hr < 24).count() as u64;
            prop_assert_eq!(h.day(T + ask * HOUR_MS), want);
            prop_assert_eq!(Hours::decode(&{ let mut b = Vec::new(); h.encode_into(&mut b); b }), Some(h));
        }

        #[test]
        fn pace_round_trips(clicks in proptest::collection::vec(0i64..100, 0..50), conv in proptest::collection::vec(0i64..100, 0..50)) {
            let mut p = Pace::default();
            for c in clicks { p.count(T + c * HOUR_MS / 2, false); }
            for c in conv { p.count(T + c * HOUR_MS / 2, true); }
            prop_assert_eq!(Pace::decode(&p.encode()), Some(p));
        }
    }
}
