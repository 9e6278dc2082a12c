//! Clicks: the stored record, privacy reduction of the visitor's IP, the bot check and
//! the visitor fingerprint behind the `unique` flag (SPEC 11).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::binary::{put_text, Reader};
use super::clock::UnixMillis;
use super::ids::{LinkId, MerchantId, PartnerId, Ulid};

/// Longest `sub1..sub5` value kept, in bytes; longer values are cut at a character boundary.
pub const MAX_SUB_LEN: usize = 256;
/// Longest user agent kept, in bytes.
pub const MAX_USER_AGENT_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClickRecord {
    pub click_id: Ulid,
    pub link_id: LinkId,
    pub partner_id: PartnerId,
    pub merchant_id: MerchantId,
    pub at_ms: UnixMillis,
    pub subs: [Option<String>; 5],
    /// The visitor's IP reduced to its network (`203.0.113.0/24`), or in full when configured.
    pub ip: String,
    pub user_agent: String,
    pub bot: bool,
    /// Decided by the writer: no click of the same visitor on the same link in the window.
    pub unique: bool,
    /// Salted hash of the full IP and user agent; never leaves the store.
    pub visitor: [u8; 16],
}

impl ClickRecord {
    /// The compact binary encoding of a click (clicks are the bulk of the store, and JSON
    /// cost a tenth of a click's CPU): the click id, time, flags and visitor hash at fixed
    /// offsets, then the ids, IP, user agent and subs as texts ([`put_text`]; an absent
    /// sub is [`NO_TEXT`](super::binary::NO_TEXT)).
    pub fn encode_binary(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.click_id.0);
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.push(u8::from(self.bot) | (u8::from(self.unique) << 1));
        out.extend_from_slice(&self.visitor);
        for text in
            [self.link_id.as_str(), self.partner_id.as_str(), self.merchant_id.as_str(), &self.ip, &self.user_agent]
        {
            put_text(out, Some(text));
        }
        for sub in &self.subs {
            put_text(out, sub.as_deref());
        }
    }

    /// Reads [`ClickRecord::encode_binary`]'s output back.
    ///
    /// # Errors
    /// What is wrong with the bytes.
    pub fn decode_binary(bytes: &[u8]) -> Result<ClickRecord, String> {
        let mut r = Reader::new(bytes);
        let cut = || "click record is cut short".to_string();
        let click_id = Ulid(r.array().ok_or_else(cut)?);
        let at_ms = i64::from_be_bytes(r.array().ok_or_else(cut)?);
        let [flags] = r.array().ok_or_else(cut)?;
        let visitor: [u8; 16] = r.array().ok_or_else(cut)?;
        let mut text = || r.text().ok_or_else(|| "click record is cut short or a text is not UTF-8".to_string());
        let mut required = |what: &str| text()?.map(str::to_string).ok_or_else(|| format!("click {what} is missing"));
        let link_id = LinkId::parse(&required("link id")?)?;
        let partner_id = PartnerId::parse(&required("partner id")?)?;
        let merchant_id = MerchantId::parse(&required("merchant id")?)?;
        let ip = required("ip")?;
        let user_agent = required("user agent")?;
        let mut sub = || Ok::<_, String>(text()?.map(str::to_string));
        let subs = [sub()?, sub()?, sub()?, sub()?, sub()?];
        if !r.is_empty() {
            return Err("click record has trailing bytes".into());
        }
        Ok(ClickRecord {
            click_id,
            link_id,
            partner_id,
            merchant_id,
            at_ms,
            subs,
            ip,
            user_agent,
            bot: flags & 1 != 0,
            unique: flags & 2 != 0,
            visitor,
        })
    }
}

/// Cuts `text` to at most `max` bytes at a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The IP as stored: its network of `v4_prefix` / `v6_prefix` bits, in CIDR notation.
/// A prefix of 32 (128) keeps the address whole.
pub fn reduce_ip(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(48);
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (p, whole) = match ip {
        IpAddr::V6(v6) => {
            let p = v6_prefix.min(128);
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            let _ = write!(out, "{}", std::net::Ipv6Addr::from(u128::from(v6) & mask));
            (p, 128)
        }
        IpAddr::V4(v4) => {
            // The common case, by hand: `format!` through `Ipv4Addr`'s `Display` cost ~1,800 instructions a click.
            let p = v4_prefix.min(32);
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            for (i, octet) in (u32::from(v4) & mask).to_be_bytes().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(&mut out, octet);
            }
            (p, 32)
        }
    };
    if p != whole {
        out.push('/');
        push_decimal(&mut out, p);
    }
    out
}

fn push_decimal(out: &mut String, n: u8) {
    if n >= 100 {
        out.push(char::from(b'0' + n / 100));
    }
    if n >= 10 {
        out.push(char::from(b'0' + n / 10 % 10));
    }
    out.push(char::from(b'0' + n % 10));
}

/// The user-agent markers of bots (`clicks.bot_user_agents`), compiled once into one
/// ASCII-case-insensitive automaton: a click scans its user agent once, whatever the
/// number of markers. Configured as a list of strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct BotMarkers {
    markers: Vec<String>,
    matcher: aho_corasick::AhoCorasick,
}

impl TryFrom<Vec<String>> for BotMarkers {
    type Error = String;

    fn try_from(markers: Vec<String>) -> Result<Self, String> {
        if let Some(empty) = markers.iter().position(|m| m.trim().is_empty()) {
            return Err(format!("marker {} is empty: it would flag every user agent as a bot", empty + 1));
        }
        let matcher = aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(&markers)
            .map_err(|e| format!("bot markers: {e}"))?;
        Ok(BotMarkers { markers, matcher })
    }
}

impl From<BotMarkers> for Vec<String> {
    fn from(b: BotMarkers) -> Self {
        b.markers
    }
}

impl BotMarkers {
    /// The markers as configured.
    pub fn markers(&self) -> &[String] {
        &self.markers
    }
}

/// True when the user agent is empty (or blank) or contains one of the markers, in any
/// ASCII case.
pub fn is_bot(user_agent: &str, markers: &BotMarkers) -> bool {
    user_agent.trim().is_empty() || markers.matcher.is_match(user_agent)
}

/// A salted fingerprint of one visitor on one link; the salt is per installation, so
/// the hash cannot be matched against a table of IPs computed elsewhere.
pub fn visitor_hash(salt: &[u8], link: &LinkId, ip: IpAddr, user_agent: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(link.as_str().as_bytes());
    h.update([0]);
    match ip {
        IpAddr::V4(v4) => h.update(v4.octets()),
        IpAddr::V6(v6) => h.update(v6.octets()),
    }
    h.update([0]);
    h.update(user_agent.as_bytes());
    let full: [u8; 32] = h.finalize().into();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_reduction() {
        let v4: IpAddr = "203.0.113.77".parse().unwrap();
        assert_eq!(reduce_ip(v4, 24, 48), "203.0.113.0/24");
        assert_eq!(reduce_ip(v4, 32, 48), "203.0.113.77");
        let v6: IpAddr = "2001:db8:abcd:12::1".parse().unwrap();
        assert_eq!(reduce_ip(v6, 24, 48), "2001:db8:abcd::/48");
        let mapped: IpAddr = "::ffff:198.51.100.9".parse().unwrap();
        assert_eq!(reduce_ip(mapped, 24, 48), "198.51.100.0/24");
        assert_eq!(reduce_ip(v6, 24, 128), "2001:db8:abcd:12::1");
        assert_eq!(reduce_ip("0.0.0.0".parse().unwrap(), 0, 0), "0.0.0.0/0");
        assert_eq!(reduce_ip("10.200.7.255".parse().unwrap(), 31, 48), "10.200.7.254/31");
        for text in ["1.2.3.4", "255.255.255.255", "100.10.0.9", "192.168.100.1"] {
            assert_eq!(reduce_ip(text.parse().unwrap(), 32, 128), text);
        }
    }

    #[test]
    fn bots() {
        let markers = BotMarkers::try_from(vec!["bot".to_string(), "spider".to_string(), "curl/".into()]).unwrap();
        assert!(is_bot("", &markers));
        assert!(is_bot("   ", &markers));
        assert!(is_bot("Googlebot/2.1", &markers));
        assert!(is_bot("BaiduSPIDER", &markers), "any ASCII case");
        assert!(is_bot("curl/8.5.0", &markers));
        assert!(!is_bot("curl", &markers), "a marker matches whole, slash included");
        assert!(!is_bot("Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0", &markers));
        assert!(BotMarkers::try_from(vec!["bot".to_string(), " ".into()]).is_err(), "an empty marker matches all");
        let json = serde_json::to_string(&markers).unwrap();
        assert_eq!(json, r#"["bot","spider","curl/"]"#, "configured and shown as a list");
    }

    #[test]
    fn visitor_hash_separates_ip_versions_and_links() {
        let link = LinkId::parse("l1").unwrap();
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        let ua = "Mozilla/5.0";
        assert_eq!(visitor_hash(b"salt", &link, v4, ua), visitor_hash(b"salt", &link, v4, ua));
        assert_ne!(visitor_hash(b"salt", &link, v4, ua), visitor_hash(b"salt", &link, mapped, ua));
        assert_ne!(visitor_hash(b"salt", &link, v4, ua), visitor_hash(b"pepper", &link, v4, ua));
        let other = LinkId::parse("l2").unwrap();
        assert_ne!(visitor_hash(b"salt", &link, v4, ua), visitor_hash(b"salt", &other, v4, ua));
    }

    fn sample() -> ClickRecord {
        ClickRecord {
            click_id: Ulid::mint(1_800_000_000_000),
            link_id: LinkId::parse("spring-sale").unwrap(),
            partner_id: PartnerId::parse("ann").unwrap(),
            merchant_id: MerchantId::parse("shop").unwrap(),
            at_ms: 1_800_000_000_123,
            subs: [Some("c1".into()), None, Some(String::new()), None, Some("é".repeat(128))],
            ip: "203.0.113.0/24".into(),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0".into(),
            bot: false,
            unique: true,
            visitor: [7; 16],
        }
    }

    #[test]
    fn binary_encoding_round_trips_and_refuses_damage() {
        let mut bot = sample();
        (bot.bot, bot.unique, bot.subs) = (true, false, Default::default());
        for click in [sample(), bot] {
            let mut bytes = Vec::new();
            click.encode_binary(&mut bytes);
            assert_eq!(ClickRecord::decode_binary(&bytes).unwrap(), click);
            for cut in 0..bytes.len() {
                assert!(ClickRecord::decode_binary(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            bytes.push(0);
            assert!(ClickRecord::decode_binary(&bytes).is_err(), "trailing byte");
        }
    }

    #[test]
    fn truncation_keeps_chars_whole() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
