//! Signing secrets (`whsec_` + base64 of 24..64 random bytes) and the set of secrets a
//! merchant or partner may sign with while a rotation's grace period runs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};

use crate::domain::clock::UnixMillis;

const PREFIX: &str = "whsec_";
/// Bytes of randomness in a secret tally generates.
pub const GENERATED_SECRET_BYTES: usize = 32;

/// A Standard Webhooks secret. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct WebhookSecret(SecretSlice<u8>);

impl WebhookSecret {
    /// A fresh secret from the OS-seeded CSPRNG.
    pub fn generate() -> Self {
        let mut key = vec![0u8; GENERATED_SECRET_BYTES];
        rand::thread_rng().fill_bytes(&mut key);
        WebhookSecret(key.into())
    }

    /// Parses `whsec_<base64>` (the prefix may be left out, as the reference libraries allow).
    ///
    /// # Errors
    /// When the text is not base64 of 24..64 bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text.trim().strip_prefix(PREFIX).unwrap_or(text.trim());
        let key = STANDARD.decode(b64).map_err(|_| "a secret is whsec_ followed by base64".to_string())?;
        if !(24..=64).contains(&key.len()) {
            return Err("a secret must decode to 24..64 bytes".into());
        }
        Ok(WebhookSecret(key.into()))
    }

    /// The HMAC key bytes.
    pub fn key(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// The `whsec_...` text, for the one answer that hands it out and for the store.
    pub fn expose_text(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(self.key()))
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

impl PartialEq for WebhookSecret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.key().ct_eq(other.key()).into()
    }
}

/// One secret and, once it was rotated out, when it stops being accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretEntry {
    pub secret: WebhookSecret,
    pub not_after_ms: Option<UnixMillis>,
}

/// The secrets one merchant or partner may sign with: the current one first, then
/// rotated-out ones until their grace period ends.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretSet {
    pub entries: Vec<SecretEntry>,
}

impl SecretSet {
    pub fn new(secret: WebhookSecret) -> Self {
        SecretSet { entries: vec![SecretEntry { secret, not_after_ms: None }] }
    }

    /// The keys accepted at `now`.
    pub fn active_keys(&self, now: UnixMillis) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().filter(move |e| e.not_after_ms.is_none_or(|t| now <= t)).map(|e| e.secret.key())
    }

    /// The secret new signatures should use.
    pub fn current(&self) -> Option<&WebhookSecret> {
        self.entries.first().map(|e| &e.secret)
    }

    /// Makes `secret` current; the previous current one stays valid for `grace_ms`.
    /// Entries whose grace ended are dropped.
    pub fn rotate(&mut self, secret: WebhookSecret, now: UnixMillis, grace_ms: i64) {
        self.entries.retain(|e| e.not_after_ms.is_none_or(|t| now <= t));
        for e in &mut self.entries {
            let until = now.saturating_add(grace_ms);
            e.not_after_ms = Some(e.not_after_ms.map_or(until, |t| t.min(until)));
        }
        self.entries.insert(0, SecretEntry { secret, not_after_ms: None });
    }
}

/// As text (`whsec_...`): a command that carries a secret is a log entry in cluster mode.
impl Serialize for WebhookSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.expose_text().serialize(s)
    }
}

impl<'de> Deserialize<'de> for WebhookSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WebhookSecret::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredEntry {
    secret: String,
    not_after_ms: Option<UnixMillis>,
}

impl Serialize for SecretSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let stored: Vec<StoredEntry> = self
            .entries
            .iter()
            .map(|e| StoredEntry { secret: e.secret.expose_text(), not_after_ms: e.not_after_ms })
            .collect();
        stored.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SecretSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = Vec::<StoredEntry>::deserialize(d)?;
        let entries = stored
            .into_iter()
            .map(|e| {
                let secret = WebhookSecret::parse(&e.secret).map_err(serde::de::Error::custom)?;
                Ok(SecretEntry { secret, not_after_ms: e.not_after_ms })
            })
            .collect::<Result<_, D::Error>>()?;
        Ok(SecretSet { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = WebhookSecret::generate();
        let shown = format!("{s:?} {:?}", SecretSet::new(s.clone()));
        assert!(!shown.contains(&s.expose_text()[6..12]), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn parse_accepts_reference_secret() {
        let s = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(s.key().len(), 24);
        assert!(WebhookSecret::parse("whsec_AAAA").is_err());
        assert!(WebhookSecret::parse("whsec_!!").is_err());
        let g = WebhookSecret::generate();
        assert_eq!(WebhookSecret::parse(&g.expose_text()).unwrap(), g);
    }

    #[test]
    fn rotation_grace() {
        let old = WebhookSecret::generate();
        let new = WebhookSecret::generate();
        let mut set = SecretSet::new(old.clone());
        set.rotate(new.clone(), 1000, 500);
        assert_eq!(set.active_keys(1500).count(), 2);
        assert_eq!(set.active_keys(1501).collect::<Vec<_>>(), vec![new.key()]);
        assert_eq!(set.current(), Some(&new));
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(serde_json::from_str::<SecretSet>(&json).unwrap(), set);
    }
}
