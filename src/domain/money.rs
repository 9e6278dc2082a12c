//! Money as exact integers of minor units, currencies with their ISO 4217 exponents,
//! and percentages as exact decimals. Never a float.
//!
//! Rounding: a commission is computed exactly in `i128` and rounded once, half away
//! from zero, to the currency's minor unit (USD 2.345 -> 2.35, JPY 0.5 -> 1).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest amount accepted, in major units (one trillion). Keeps every product of an
/// amount and a percentage far inside `i128` and every sum of a month inside `i64`.
pub const MAX_MAJOR_UNITS: i64 = 1_000_000_000_000;

/// ISO 4217 currencies with 0 minor digits.
const ZERO_DECIMALS: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF",
    "XPF",
];
/// ISO 4217 currencies with 3 minor digits.
const THREE_DECIMALS: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
/// ISO 4217 currencies with 4 minor digits.
const FOUR_DECIMALS: &[&str] = &["CLF", "UYW"];
/// The other active ISO 4217 codes (2 minor digits).
const TWO_DECIMALS: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB \
BRL BSD BTN BWP BYN BZD CAD CDF CHF CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP \
GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP \
LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB \
PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL \
THB TJS TMT TOP TRY TTD TWD TZS UAH USD UZS VED VES WST XCD XCG YER ZAR ZMW ZWG";

/// Every active code and its exponent, built once: a conversion parses its currency and
/// decodes stored amounts, and a scan of the code lists cost ~7,000 instructions each time.
fn exponents() -> &'static std::collections::HashMap<[u8; 3], u32> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<[u8; 3], u32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let lists = [
            (0, ZERO_DECIMALS.to_vec()),
            (3, THREE_DECIMALS.to_vec()),
            (4, FOUR_DECIMALS.to_vec()),
            (2, TWO_DECIMALS.split_ascii_whitespace().collect()),
        ];
        let mut table = std::collections::HashMap::new();
        for (exponent, codes) in lists {
            for code in codes {
                if let Ok(c) = <[u8; 3]>::try_from(code.as_bytes()) {
                    table.insert(c, exponent);
                }
            }
        }
        table
    })
}

/// An ISO 4217 currency code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// # Errors
    /// When the code is not an active ISO 4217 code in upper case.
    pub fn parse(code: &str) -> Result<Self, String> {
        let b = code.as_bytes();
        match <[u8; 3]>::try_from(b) {
            Ok(c) if exponents().contains_key(&c) => Ok(Currency(c)),
            _ => Err("must be an ISO 4217 currency code in upper case, such as USD".into()),
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }

    /// Number of digits after the decimal point of this currency's minor unit.
    pub fn exponent(&self) -> u32 {
        exponents().get(&self.0).copied().unwrap_or(2)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(code: String) -> Result<Self, String> {
        Currency::parse(&code)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_string()
    }
}

/// Parses a plain decimal (`"149.90"`, `"20"`, `"-3.5"`) into an integer scaled by
/// `10^scale`. No exponents, no `+`, no thousands separators, and no more fraction
/// digits than `scale`: `"1.005"` in USD is refused, not rounded.
fn parse_scaled(text: &str, scale: u32, allow_negative: bool) -> Result<i128, String> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) if allow_negative => (true, rest),
        Some(_) => return Err("must not be negative".into()),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let plain = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !plain(int) || !plain(frac) || (digits.contains('.') && frac.is_empty()) {
        return Err("must be a decimal number such as \"149.90\"".into());
    }
    if frac.len() > scale as usize {
        return Err(format!("has more than {scale} decimal places"));
    }
    let int = int.trim_start_matches('0');
    if int.len() > 13 {
        return Err(format!("must be at most {MAX_MAJOR_UNITS}"));
    }
    let int_value: i128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| "not a number")? };
    let mut frac_value: i128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| "not a number")? };
    frac_value *= 10i128.pow(scale - frac.len() as u32);
    let value = int_value * 10i128.pow(scale) + frac_value;
    if value > i128::from(MAX_MAJOR_UNITS) * 10i128.pow(scale) {
        return Err(format!("must be at most {MAX_MAJOR_UNITS}"));
    }
    Ok(if negative { -value } else { value })
}

/// `value / 10^scale` as decimal text, every fractional digit written. Built in one
/// allocation, with 64-bit integer formatting whenever the parts fit (money always does):
/// this runs several times per conversion.
fn format_scaled(value: i128, scale: u32) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(48);
    if value < 0 {
        out.push('-');
    }
    let abs = value.unsigned_abs();
    let div = 10u128.pow(scale);
    let (whole, fraction) = (abs / div, abs % div);
    let width = scale as usize;
    let _ = match (u64::try_from(whole), u64::try_from(fraction)) {
        (Ok(w), _) if scale == 0 => write!(out, "{w}"),
        (Ok(w), Ok(f)) => write!(out, "{w}.{f:0width$}"),
        _ if scale == 0 => write!(out, "{whole}"),
        _ => write!(out, "{whole}.{fraction:0width$}"),
    };
    out
}

/// An exact amount of a currency, in minor units (cents for USD, yen for JPY, fils for BHD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    /// Parses a decimal amount in `currency`; negative amounts are refused.
    ///
    /// # Errors
    /// Says what is wrong with the text.
    pub fn parse(text: &str, currency: Currency) -> Result<Self, String> {
        let minor = parse_scaled(text, currency.exponent(), false)?;
        let minor = i64::try_from(minor).map_err(|_| "out of range".to_string())?;
        Ok(Money { minor, currency })
    }

    pub fn zero(currency: Currency) -> Self {
        Money { minor: 0, currency }
    }

    /// The decimal text with exactly the currency's number of decimals (`"29.98"`).
    pub fn amount_text(&self) -> String {
        format_scaled(i128::from(self.minor), self.currency.exponent())
    }

    /// `percent` of this amount, rounded half away from zero to the minor unit.
    pub fn percent_of(&self, percent: Percent) -> Money {
        let exact = i128::from(self.minor) * i128::from(percent.micros);
        let div = 100 * i128::from(Percent::SCALE_FACTOR);
        let rounded = (exact.abs() + div / 2) / div * exact.signum();
        Money { minor: i64::try_from(rounded).unwrap_or(i64::MAX), currency: self.currency }
    }
}

/// A percentage with up to six decimals, stored exactly (`"12.5"` -> 12_500_000 micros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Percent {
    micros: i64,
}

impl Percent {
    pub const ZERO: Percent = Percent { micros: 0 };
    const SCALE: u32 = 6;
    const SCALE_FACTOR: i64 = 1_000_000;

    /// Parses `"0".."100"` with up to six decimals.
    ///
    /// # Errors
    /// When the text is not a decimal between 0 and 100.
    pub fn parse(text: &str) -> Result<Self, String> {
        let micros = parse_scaled(text, Self::SCALE, false)?;
        if micros > 100 * i128::from(Self::SCALE_FACTOR) {
            return Err("must be between 0 and 100".into());
        }
        Ok(Percent { micros: i64::try_from(micros).map_err(|_| "out of range".to_string())? })
    }

    /// The shortest decimal text (`"20"`, `"12.5"`).
    pub fn text(&self) -> String {
        let mut text = format_scaled(i128::from(self.micros), Self::SCALE);
        let kept = text.trim_end_matches('0').trim_end_matches('.').len();
        text.truncate(kept);
        text
    }
}

impl TryFrom<String> for Percent {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Percent::parse(&text)
    }
}

impl From<Percent> for String {
    fn from(p: Percent) -> String {
        p.text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    #[test]
    fn scaled_values_are_written_with_every_fractional_digit() {
        let big = i128::from(u64::MAX) * 1000 + 7;
        let cases: [(i128, u32, &str); 10] = [
            (0, 2, "0.00"),
            (5, 2, "0.05"),
            (-5, 2, "-0.05"),
            (12_345, 2, "123.45"),
            (100, 0, "100"),
            (-7, 0, "-7"),
            (1_500_000, 6, "1.500000"),
            (-1_234_567, 3, "-1234.567"),
            (big, 3, "18446744073709551615.007"),
            (-big, 0, "-18446744073709551615007"),
        ];
        for (value, scale, want) in cases {
            assert_eq!(format_scaled(value, scale), want, "{value} at scale {scale}");
        }
        for (text, want) in [("20", "20"), ("12.5", "12.5"), ("0", "0"), ("100", "100"), ("0.000001", "0.000001")] {
            assert_eq!(Percent::parse(text).unwrap().text(), want);
        }
    }

    #[test]
    fn exponents() {
        assert_eq!(Currency::parse("JPY").unwrap().exponent(), 0);
        assert_eq!(usd().exponent(), 2);
        assert_eq!(Currency::parse("BHD").unwrap().exponent(), 3);
        assert!(Currency::parse("usd").is_err());
        assert_eq!(Currency::parse("CLF").unwrap().exponent(), 4);
        assert_eq!(Currency::parse("ZWG").unwrap().exponent(), 2, "the last code of the list");
        for bad in ["", "US", "USDX", "XXX", "ÜSD"] {
            assert!(Currency::parse(bad).is_err(), "{bad}");
        }
        assert!(Currency::parse("XYZ").is_err());
        assert!(Currency::parse("US").is_err());
    }

    #[test]
    fn parse_amounts() {
        assert_eq!(Money::parse("149.90", usd()).unwrap().minor, 14990);
        assert_eq!(Money::parse("149.9", usd()).unwrap().minor, 14990);
        assert_eq!(Money::parse("149", usd()).unwrap().minor, 14900);
        assert_eq!(Money::parse("0.01", usd()).unwrap().minor, 1);
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Money::parse("1500", jpy).unwrap().minor, 1500);
        assert!(Money::parse("1500.5", jpy).is_err());
        let bhd = Currency::parse("BHD").unwrap();
        assert_eq!(Money::parse("1.234", bhd).unwrap().minor, 1234);
        for bad in ["", "-1", "1.005", "1e3", "+1", "1.", ".5", "1,5", "abc", " 1", "NaN"] {
            assert!(Money::parse(bad, usd()).is_err(), "{bad:?} must be refused");
        }
        assert!(Money::parse("1000000000000", usd()).is_ok());
        assert!(Money::parse("1000000000000.01", usd()).is_err());
        assert!(Money::parse("99999999999999999999999", usd()).is_err());
    }

    #[test]
    fn format_amounts() {
        assert_eq!(Money::parse("29.98", usd()).unwrap().amount_text(), "29.98");
        assert_eq!(Money::zero(usd()).amount_text(), "0.00");
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Money::parse("1500", jpy).unwrap().amount_text(), "1500");
        let bhd = Currency::parse("BHD").unwrap();
        assert_eq!(Money::parse("0.005", bhd).unwrap().amount_text(), "0.005");
        let neg = Money { minor: -5, currency: usd() };
        assert_eq!(neg.amount_text(), "-0.05");
    }

    #[test]
    fn percent_rounding_half_away_from_zero() {
        let p = Percent::parse("20").unwrap();
        assert_eq!(Money::parse("149.90", usd()).unwrap().percent_of(p).minor, 2998);
        // 2.345 -> 2.35 (half up), 2.344 -> 2.34
        let ten = Percent::parse("10").unwrap();
        assert_eq!(Money { minor: 2345, currency: usd() }.percent_of(ten).minor, 235);
        assert_eq!(Money { minor: 2344, currency: usd() }.percent_of(ten).minor, 234);
        assert_eq!(Money { minor: -2345, currency: usd() }.percent_of(ten).minor, -235);
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Money { minor: 5, currency: jpy }.percent_of(ten).minor, 1);
        assert_eq!(Money { minor: 4, currency: jpy }.percent_of(ten).minor, 0);
    }

    #[test]
    fn percents() {
        assert_eq!(Percent::parse("12.5").unwrap().text(), "12.5");
        assert_eq!(Percent::parse("100").unwrap().text(), "100");
        assert_eq!(Percent::parse("0").unwrap().text(), "0");
        assert!(Percent::parse("100.000001").is_err());
        assert!(Percent::parse("-1").is_err());
        assert!(Percent::parse("0.0000001").is_err());
    }
}
