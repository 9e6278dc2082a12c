//! Clicks: the stored record, privacy reduction of the visitor's IP, the bot check and
//! the visitor fingerprint behind the `unique` flag (SPEC 11).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    match ip {
        IpAddr::V4(v4) => {
            let p = v4_prefix.min(32);
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            let net = std::net::Ipv4Addr::from(u32::from(v4) & mask);
            if p == 32 {
                net.to_string()
            } else {
                format!("{net}/{p}")
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return reduce_ip(IpAddr::V4(v4), v4_prefix, v6_prefix);
            }
            let p = v6_prefix.min(128);
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            let net = std::net::Ipv6Addr::from(u128::from(v6) & mask);
            if p == 128 {
                net.to_string()
            } else {
                format!("{net}/{p}")
            }
        }
    }
}

/// True when the user agent is empty or contains one of `markers` (lower case).
pub fn is_bot(user_agent: &str, markers: &[String]) -> bool {
    let ua = user_agent.trim().to_ascii_lowercase();
    ua.is_empty() || markers.iter().any(|m| ua.contains(m.as_str()))
}

/// A salted fingerprint of one visitor on one link; the salt is per installation, so
/// the hash cannot be matched against a table of IPs computed elsewhere.
pub fn visitor_hash(salt: &[u8], link: &LinkId, ip: IpAddr, user_agent: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(link.as_str().as_bytes());
    h.update([0]);
    h.update(ip.to_string().as_bytes());
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
    }

    #[test]
    fn bots() {
        let markers = vec!["bot".to_string(), "spider".to_string()];
        assert!(is_bot("", &markers));
        assert!(is_bot("Googlebot/2.1", &markers));
        assert!(!is_bot("Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0", &markers));
    }

    #[test]
    fn truncation_keeps_chars_whole() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
