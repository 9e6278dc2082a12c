//! Report rollups: what each stored event adds to the pre-aggregated counters that the
//! partner and program reports read (SPEC 5.5), and how a time range is covered by them.
//!
//! - A [`Cell`] is one merchant, one 15-minute bucket, one partner (or the merchant as a
//!   whole) and one currency (or none). Fifteen minutes divide every UTC offset in use,
//!   so any local day is a whole number of buckets.
//! - Each event adds fixed [`Counters`] to a few cells. The functions here ([`of_click`],
//!   [`of_conversion`], [`of_ledger`]) are the only definition of what it adds: the engine
//!   calls them when the event happens, and a rebuild calls them over the stored events,
//!   so both give the same cells. They read only what never changes after the event.
//! - Counters form a commutative monoid under [`Counters::add`] (component-wise integer
//!   addition, identity zero): increments can be merged in any order and grouping, which
//!   is what lets storage keep them as merge operands. The first attributed conversion of
//!   a partner is kept by `min`, another commutative monoid (identity: none).
//! - Storage keeps every cell at three resolutions (quarter hour, hour, UTC day), so a
//!   range is read as a few day cells plus up to 23 hours and 3 quarters at each edge
//!   ([`cover`]), not as up to 96 quarters per day.

use super::click::ClickRecord;
use super::clock::UnixMillis;
use super::conversion::{ConversionRecord, RuleKind};
use super::ids::{MerchantId, PartnerId};
use super::ledger::{LedgerEntry, LedgerKind};
use super::money::Currency;

pub const QUARTER_MS: i64 = 900_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// A resolution of the rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Quarter,
    Hour,
    Day,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Quarter, Level::Hour, Level::Day];

    pub fn millis(self) -> i64 {
        match self {
            Level::Quarter => QUARTER_MS,
            Level::Hour => HOUR_MS,
            Level::Day => DAY_MS,
        }
    }

    /// The bucket of `at` at this resolution (times before 1970 fall in bucket 0).
    pub fn bucket(self, at: UnixMillis) -> u32 {
        u32::try_from(at.max(0) / self.millis()).unwrap_or(u32::MAX)
    }
}

/// Whether a cell counts one partner's share or the merchant's whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Partner,
    Merchant,
}

/// The counters of one cell. Money is in minor units of the cell's currency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Clicks recorded (bots included; they are flagged, not dropped).
    pub clicks: i64,
    pub unique_clicks: i64,
    /// Conversions that occurred: sourced by the partner (partner cells) or all of the
    /// merchant's, attributed or not (merchant cells).
    pub conversions: i64,
    /// The amount of those conversions.
    pub revenue: i64,
    /// Commission and influence fees credited on those conversions.
    pub commission: i64,
    /// Commission taken back (reversals and clawbacks) on the day it was taken back, as a
    /// positive amount.
    pub reversed: i64,
    /// Revenue of conversions a partner sourced.
    pub sourced: i64,
    /// Revenue of conversions a partner influenced (merchant cells: counted once per
    /// conversion, however many partners influenced it).
    pub influenced: i64,
    /// Conversions that raised fraud signals when they arrived (docs/fraud.md).
    pub flagged: i64,
    /// The commission credited on those conversions.
    pub flagged_commission: i64,
    /// Conversions credited by the customer's own answer (`self_reported`), counted apart
    /// as well as in `conversions`.
    pub self_reported: i64,
}

/// How many counters a cell has.
const FIELDS: usize = 11;
/// Encoded length: a version byte and eleven little-endian `i64`s.
pub const COUNTERS_LEN: usize = 1 + 8 * FIELDS;
/// Version 1 had the first eight counters; it reads with the others zero.
const COUNTERS_V1: u8 = 1;
const COUNTERS_V1_LEN: usize = 1 + 8 * 8;
const COUNTERS_V2: u8 = 2;

impl Counters {
    fn fields(&self) -> [i64; FIELDS] {
        [
            self.clicks,
            self.unique_clicks,
            self.conversions,
            self.revenue,
            self.commission,
            self.reversed,
            self.sourced,
            self.influenced,
            self.flagged,
            self.flagged_commission,
            self.self_reported,
        ]
    }

    fn from_fields(f: [i64; FIELDS]) -> Counters {
        Counters {
            clicks: f[0],
            unique_clicks: f[1],
            conversions: f[2],
            revenue: f[3],
            commission: f[4],
            reversed: f[5],
            sourced: f[6],
            influenced: f[7],
            flagged: f[8],
            flagged_commission: f[9],
            self_reported: f[10],
        }
    }

    /// The monoid's operation. Wrapping, so that it stays associative and commutative on
    /// every input; no real program comes near `i64` overflow in minor units.
    pub fn add(&mut self, other: &Counters) {
        let (a, b) = (self.fields(), other.fields());
        *self = Counters::from_fields(std::array::from_fn(|i| a[i].wrapping_add(b[i])));
    }

    pub fn is_zero(&self) -> bool {
        self.fields() == [0; FIELDS]
    }

    pub fn encode(&self) -> [u8; COUNTERS_LEN] {
        let mut out = [0u8; COUNTERS_LEN];
        out[0] = COUNTERS_V2;
        for (i, v) in self.fields().iter().enumerate() {
            out[1 + i * 8..9 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `None` for anything but a version-1 or version-2 encoding.
    pub fn decode(bytes: &[u8]) -> Option<Counters> {
        let n = match (bytes.first(), bytes.len()) {
            (Some(&COUNTERS_V2), COUNTERS_LEN) => FIELDS,
            (Some(&COUNTERS_V1), COUNTERS_V1_LEN) => 8,
            _ => return None,
        };
        let field = |i: usize| {
            if i < n {
                i64::from_le_bytes(bytes[1 + i * 8..9 + i * 8].try_into().unwrap_or_default())
            } else {
                0
            }
        };
        Some(Counters::from_fields(std::array::from_fn(field)))
    }
}

/// Summed counters by a caller's group (a day, say), partner and currency.
pub type Rows = std::collections::BTreeMap<(u32, Option<PartnerId>, Option<Currency>), Counters>;

/// One merchant, quarter hour, partner (none: the merchant's whole) and currency.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    pub merchant: MerchantId,
    /// The quarter-hour bucket ([`Level::Quarter`]).
    pub quarter: u32,
    pub partner: Option<PartnerId>,
    pub currency: Option<Currency>,
}

impl Cell {
    pub fn scope(&self) -> Scope {
        if self.partner.is_some() {
            Scope::Partner
        } else {
            Scope::Merchant
        }
    }
}

/// What one event adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Increment {
    Add(Cell, Counters),
    /// A partner's attributed conversion that occurred at `at`: the earliest is kept.
    First {
        merchant: MerchantId,
        partner: PartnerId,
        at: UnixMillis,
    },
}

/// Increments merged by cell, in the order cells first appear.
#[derive(Default)]
struct Adds(Vec<(Cell, Counters)>);

impl Adds {
    fn add(&mut self, cell: Cell, f: impl FnOnce(&mut Counters)) {
        let i = match self.0.iter().position(|(c, _)| *c == cell) {
            Some(i) => i,
            None => {
                self.0.push((cell, Counters::default()));
                self.0.len() - 1
            }
        };
        f(&mut self.0[i].1);
    }

    fn done(self) -> impl Iterator<Item = Increment> {
        self.0.into_iter().filter(|(_, c)| !c.is_zero()).map(|(cell, c)| Increment::Add(cell, c))
    }
}

/// A recorded click: one click (and one unique click) for its partner. Clicks carry no
/// currency; the report shows them in the row of the partner's plan currency.
pub fn of_click(c: &ClickRecord) -> Increment {
    let cell = Cell {
        merchant: c.merchant_id.clone(),
        quarter: Level::Quarter.bucket(c.at_ms),
        partner: Some(c.partner_id.clone()),
        currency: None,
    };
    Increment::Add(cell, Counters { clicks: 1, unique_clicks: i64::from(c.unique), ..Counters::default() })
}

/// A new conversion, on the day it occurred: the merchant's totals, the sourced partner's
/// conversion, revenue and commission, each influencer's fee and influenced revenue, and
/// the sourced partner's first conversion.
pub fn of_conversion(rec: &ConversionRecord) -> Vec<Increment> {
    let quarter = Level::Quarter.bucket(rec.occurred_ms);
    let cell = |partner: Option<&PartnerId>, currency: Option<Currency>| Cell {
        merchant: rec.merchant_id.clone(),
        quarter,
        partner: partner.cloned(),
        currency,
    };
    let revenue = rec.amount.map_or(0, |a| a.minor);
    let commission = rec.commission.as_ref().filter(|c| c.amount.minor != 0).map(|c| c.amount);
    // A conversion counts in its amount's currency, else its commission's.
    let currency = rec.amount.map(|a| a.currency).or(commission.map(|c| c.currency));
    let mut adds = Adds::default();
    let attribution = rec.attribution.as_ref();
    let influencers = attribution.map_or(&[][..], |a| &a.influencers[..]);
    adds.add(cell(None, currency), |c| {
        c.conversions = 1;
        c.revenue = revenue;
        if attribution.is_some() {
            c.sourced = revenue;
        }
        if !influencers.is_empty() {
            c.influenced = revenue;
        }
    });
    let Some(a) = attribution else { return adds.done().collect() };
    let flagged = rec.review.is_some();
    let self_reported = a.rule == RuleKind::SelfReported;
    adds.add(cell(None, currency), |c| {
        c.flagged = i64::from(flagged);
        c.self_reported = i64::from(self_reported);
    });
    adds.add(cell(Some(&a.partner_id), currency), |c| {
        c.conversions = 1;
        c.revenue = revenue;
        c.sourced = revenue;
        c.flagged = i64::from(flagged);
        c.self_reported = i64::from(self_reported);
    });
    if flagged {
        if let Some(money) = commission {
            adds.add(cell(Some(&a.partner_id), Some(money.currency)), |c| c.flagged_commission += money.minor);
            adds.add(cell(None, Some(money.currency)), |c| c.flagged_commission += money.minor);
        }
    }
    let fees = influencers.iter().filter_map(|i| i.commission.map(|fee| (&i.partner_id, fee)));
    for (partner, money) in commission.map(|c| (&a.partner_id, c)).into_iter().chain(fees) {
        adds.add(cell(Some(partner), Some(money.currency)), |c| c.commission += money.minor);
        adds.add(cell(None, Some(money.currency)), |c| c.commission += money.minor);
    }
    for i in influencers {
        adds.add(cell(Some(&i.partner_id), currency), |c| c.influenced += revenue);
    }
    let first =
        Increment::First { merchant: rec.merchant_id.clone(), partner: a.partner_id.clone(), at: rec.occurred_ms };
    adds.done().chain(std::iter::once(first)).collect()
}

/// A ledger entry: reversals and clawbacks count on the day they were made, for the
/// partner and the merchant. Commission and influence fees are counted from the
/// conversion ([`of_conversion`]), on the day it occurred.
pub fn of_ledger(e: &LedgerEntry) -> Vec<Increment> {
    if !matches!(e.kind, LedgerKind::Reversal | LedgerKind::Clawback) || e.amount.minor == 0 {
        return Vec::new();
    }
    let quarter = Level::Quarter.bucket(e.at_ms);
    let taken = Counters { reversed: -e.amount.minor, ..Counters::default() };
    [Some(e.partner_id.clone()), None]
        .into_iter()
        .map(|partner| {
            let cell = Cell { merchant: e.merchant_id.clone(), quarter, partner, currency: Some(e.amount.currency) };
            Increment::Add(cell, taken)
        })
        .collect()
}

/// Buckets `from..until` (end excluded) at one resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub level: Level,
    pub from: u32,
    pub until: u32,
}

/// Why a range cannot be read from the rollups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misaligned(pub UnixMillis);

/// The fewest spans whose buckets exactly cover `from..until`: quarters up to the first
/// whole hour, hours up to the first whole UTC day, days, then hours and quarters to the
/// end. Both ends must fall on a quarter hour.
///
/// # Errors
/// The first end that does not fall on a quarter hour.
pub fn cover(from: UnixMillis, until: UnixMillis) -> Result<Vec<Span>, Misaligned> {
    for t in [from, until] {
        if t.rem_euclid(QUARTER_MS) != 0 || t < 0 {
            return Err(Misaligned(t));
        }
    }
    let mut spans = Vec::new();
    let mut push = |level: Level, a: i64, b: i64| {
        if a < b {
            spans.push(Span { level, from: level.bucket(a), until: level.bucket(b) });
        }
    };
    let up = |t: i64, unit: i64| (t + unit - 1).div_euclid(unit) * unit;
    let down = |t: i64, unit: i64| t.div_euclid(unit) * unit;
    if from >= until {
        return Ok(spans);
    }
    let (h0, h1) = (up(from, HOUR_MS), down(until, HOUR_MS));
    if h0 >= h1 {
        push(Level::Quarter, from, until);
        return Ok(spans);
    }
    let (d0, d1) = (up(h0, DAY_MS), down(h1, DAY_MS));
    push(Level::Quarter, from, h0);
    if d0 < d1 {
        push(Level::Hour, h0, d0);
        push(Level::Day, d0, d1);
        push(Level::Hour, d1, h1);
    } else {
        push(Level::Hour, h0, h1);
    }
    push(Level::Quarter, h1, until);
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn covered(spans: &[Span]) -> Vec<(i64, i64)> {
        spans.iter().map(|s| (i64::from(s.from) * s.level.millis(), i64::from(s.until) * s.level.millis())).collect()
    }

    #[test]
    fn a_utc_day_is_one_day_cell_and_a_shifted_day_is_hours_and_quarters() {
        let d = 20_000 * DAY_MS;
        assert_eq!(cover(d, d + DAY_MS).unwrap(), vec![Span { level: Level::Day, from: 20_000, until: 20_001 }]);
        // Asia/Kathmandu (+05:45): 00:00 local is 18:15 UTC the day before.
        let a = d - 5 * HOUR_MS - 45 * 60_000;
        let spans = cover(a, a + DAY_MS).unwrap();
        assert_eq!(spans.iter().map(|s| s.level).collect::<Vec<_>>(), [Level::Quarter, Level::Hour, Level::Quarter]);
        assert_eq!(spans.iter().map(|s| s.until - s.from).collect::<Vec<_>>(), [3, 23, 1]);
        // Two shifted days: the whole UTC day between them is one day cell.
        let levels: Vec<Level> = cover(a, a + 2 * DAY_MS).unwrap().iter().map(|s| s.level).collect();
        assert_eq!(levels, [Level::Quarter, Level::Hour, Level::Day, Level::Hour, Level::Quarter]);
        assert_eq!(cover(a + 60_000, a + DAY_MS), Err(Misaligned(a + 60_000)));
    }

    #[test]
    fn counters_round_trip_and_add() {
        let mut a = Counters { clicks: 3, revenue: -7, influenced: i64::MAX, ..Counters::default() };
        assert_eq!(Counters::decode(&a.encode()), Some(a));
        a.add(&Counters { clicks: 1, revenue: 7, ..Counters::default() });
        assert_eq!((a.clicks, a.revenue), (4, 0));
        assert_eq!(Counters::decode(&[3; COUNTERS_LEN]), None);
        assert_eq!(Counters::decode(&[2; COUNTERS_V1_LEN]), None);
        // A version-1 value (eight counters) reads with the newer counters zero.
        let mut v1 = vec![COUNTERS_V1];
        for i in 1..=8i64 {
            v1.extend_from_slice(&i.to_le_bytes());
        }
        let c = Counters::decode(&v1).unwrap();
        assert_eq!((c.clicks, c.influenced, c.flagged, c.self_reported), (1, 8, 0, 0));
    }

    proptest! {
        /// The spans are contiguous, in order, exactly `from..until`, and small: at most five
        /// spans, six quarters and 46 hours, however long the range.
        #[test]
        fn cover_is_exact_and_small(a in 0i64..200_000, len in 0i64..20_000) {
            let (from, until) = (a * QUARTER_MS, (a + len) * QUARTER_MS);
            let spans = cover(from, until).unwrap();
            let mut at = from;
            for (s, e) in covered(&spans) {
                prop_assert_eq!(s, at);
                prop_assert!(e > s);
                at = e;
            }
            prop_assert_eq!(at, from.max(until));
            let quarters: u32 = spans.iter().filter(|s| s.level == Level::Quarter).map(|s| s.until - s.from).sum();
            let hours: u32 = spans.iter().filter(|s| s.level == Level::Hour).map(|s| s.until - s.from).sum();
            prop_assert!(quarters <= 6 && hours <= 46 && spans.len() <= 5);
        }

        /// Merging in any grouping gives the same counters.
        #[test]
        fn add_is_associative_and_commutative(v in proptest::collection::vec((any::<[i64; 8]>(), any::<[i64; 3]>()), 1..6)) {
            let cs: Vec<Counters> =
                v.into_iter().map(|(a, b)| Counters::from_fields(std::array::from_fn(|i| if i < 8 { a[i] } else { b[i - 8] }))).collect();
            let mut fwd = Counters::default();
            cs.iter().for_each(|c| fwd.add(c));
            let mut back = Counters::default();
            cs.iter().rev().for_each(|c| back.add(c));
            let mut halves = Counters::default();
            let (l, r) = cs.split_at(cs.len() / 2);
            let (mut lsum, mut rsum) = (Counters::default(), Counters::default());
            l.iter().for_each(|c| lsum.add(c));
            r.iter().for_each(|c| rsum.add(c));
            halves.add(&rsum);
            halves.add(&lsum);
            prop_assert_eq!(fwd, back);
            prop_assert_eq!(fwd, halves);
        }
    }
}
