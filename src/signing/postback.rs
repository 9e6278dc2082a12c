//! Signed GET postback URLs (SPEC 4.2):
//! `sig=v1,<base64url(HMAC-SHA256(key, "GET\n" + path + "\n" + canonical_query))>` where the
//! canonical query is every parameter but `sig`, percent-decoded, sorted by name (then by
//! value bytes, though names are unique), re-encoded per RFC 3986 and joined with `&`.
//! `+` is a literal plus, not a space (RFC 3986, not HTML forms): encode spaces as `%20`.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::SignatureFailure;

/// Most parameters read from one postback URL.
pub const MAX_PARAMS: usize = 64;

/// Why a query could not be read at all (before any signature check): `400`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("parameter {0} is repeated")]
    Repeated(String),
    #[error("parameter {0} is not valid percent-encoded UTF-8")]
    Encoding(String),
    #[error("more than {MAX_PARAMS} parameters")]
    TooMany,
}

/// A parsed query: unique names, decoded values, in the order received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    /// Parses `a=1&b=2`. Empty pairs (`&&`) are skipped; a name without `=` has an empty value.
    ///
    /// # Errors
    /// A repeated name, invalid encoding, or too many parameters.
    pub fn parse(raw: &str) -> Result<Query, QueryError> {
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| QueryError::Encoding(name.to_string()))
            };
            let (name, value) = (decode(name)?, decode(value)?);
            if params.iter().any(|(n, _)| *n == name) {
                return Err(QueryError::Repeated(name));
            }
            if params.len() == MAX_PARAMS {
                return Err(QueryError::TooMany);
            }
            params.push((name, value));
        }
        Ok(Query(params))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The canonical form: all parameters but `sig`, sorted by name, RFC 3986-encoded.
    pub fn canonical(&self) -> String {
        let mut params: Vec<&(String, String)> = self.0.iter().filter(|(n, _)| n != "sig").collect();
        params.sort();
        params.iter().map(|(n, v)| format!("{}={}", encode(n), encode(v))).collect::<Vec<_>>().join("&")
    }
}

/// RFC 3986: everything but unreserved characters percent-encoded, hex upper case.
pub fn encode(text: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::utf8_percent_encode(text, KEEP).to_string()
}

fn mac(key: &[u8], path: &str, canonical: &str) -> [u8; 32] {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(b"GET\n");
    m.update(path.as_bytes());
    m.update(b"\n");
    m.update(canonical.as_bytes());
    m.finalize().into_bytes().into()
}

/// The `sig` value for a postback: `v1,<base64url without padding>`.
pub fn sign(key: &[u8], path: &str, query: &Query) -> String {
    format!("v1,{}", URL_SAFE_NO_PAD.encode(mac(key, path, &query.canonical())))
}

/// Verifies `ts` (within `tolerance_secs` of `now_secs`) and `sig` against every key.
///
/// # Errors
/// The first check that failed, as for signed POSTs.
pub fn verify<'k>(
    keys: impl IntoIterator<Item = &'k [u8]>,
    path: &str,
    query: &Query,
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureFailure> {
    let (Some(ts), Some(sig)) = (query.get("ts"), query.get("sig")) else {
        return Err(SignatureFailure::Missing);
    };
    if ts.is_empty() || ts.len() > 10 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureFailure::Malformed);
    }
    let ts: i64 = ts.parse().map_err(|_| SignatureFailure::Malformed)?;
    if now_secs - ts > tolerance_secs {
        return Err(SignatureFailure::Stale);
    }
    if ts - now_secs > tolerance_secs {
        return Err(SignatureFailure::Future);
    }
    let b64 = sig.strip_prefix("v1,").ok_or(SignatureFailure::Malformed)?;
    let raw = URL_SAFE_NO_PAD.decode(b64).or_else(|_| URL_SAFE.decode(b64)).map_err(|_| SignatureFailure::Malformed)?;
    let given = <[u8; 32]>::try_from(raw.as_slice()).map_err(|_| SignatureFailure::Malformed)?;
    let canonical = query.canonical();
    super::any_match(keys.into_iter().map(|key| mac(key, path, &canonical)), &[given])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_decodes_and_reencodes() {
        let q = Query::parse("txn_id=o%201&amount=9.90&sig=v1,x&a=%7e+b&empty").unwrap();
        assert_eq!(q.canonical(), "a=~%2Bb&amount=9.90&empty=&txn_id=o%201");
        assert_eq!(Query::parse("b=1&a=2").unwrap().canonical(), Query::parse("a=2&b=1").unwrap().canonical());
    }

    #[test]
    fn repeated_or_broken_parameters_are_refused() {
        assert_eq!(Query::parse("a=1&a=2"), Err(QueryError::Repeated("a".into())));
        assert_eq!(Query::parse("a=1&%61=2"), Err(QueryError::Repeated("a".into())));
        assert!(matches!(Query::parse("a=%ff"), Err(QueryError::Encoding(_))));
        let many: Vec<String> = (0..65).map(|i| format!("p{i}=1")).collect();
        assert_eq!(Query::parse(&many.join("&")), Err(QueryError::TooMany));
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let key = b"0123456789abcdef0123456789abcdef";
        let mut q = Query::parse("txn_id=o1&amount=10.00&currency=USD&ts=1000").unwrap();
        let sig = sign(key, "/pb/m", &q);
        q.0.push(("sig".into(), sig.clone()));
        assert_eq!(verify([&key[..]], "/pb/m", &q, 1000, 300), Ok(()));
        assert_eq!(verify([&key[..]], "/pb/other", &q, 1000, 300), Err(SignatureFailure::Mismatch));
        assert_eq!(verify([&key[..]], "/pb/m", &q, 1301, 300), Err(SignatureFailure::Stale));
        q.0[1].1 = "99.00".into();
        assert_eq!(verify([&key[..]], "/pb/m", &q, 1000, 300), Err(SignatureFailure::Mismatch));
        let no_sig = Query::parse("txn_id=o1&ts=1000").unwrap();
        assert_eq!(verify([&key[..]], "/pb/m", &no_sig, 1000, 300), Err(SignatureFailure::Missing));
    }
}
