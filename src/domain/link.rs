//! Tracking links and the redirect they produce: destination templates with macros,
//! and the deep-link check that keeps tally from ever being an open redirect.

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::entities::Status;
use super::ids::{LinkId, MerchantId, PartnerId, PlanId};
use super::FieldError;

/// Default attribution window of a link (SPEC 8).
pub const DEFAULT_WINDOW_DAYS: u32 = 30;
/// Longest attribution window accepted.
pub const MAX_WINDOW_DAYS: u32 = 3650;
/// Longest destination template accepted.
pub const MAX_DESTINATION_LEN: usize = 2048;

/// Macros a destination template may use (SPEC 5.1).
pub const MACROS: [&str; 8] = ["click_id", "link_id", "partner_id", "sub1", "sub2", "sub3", "sub4", "sub5"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub id: LinkId,
    pub merchant_id: MerchantId,
    pub partner_id: PartnerId,
    pub destination: String,
    pub deep_link_hosts: Vec<String>,
    pub plan_id: Option<PlanId>,
    pub window_days: u32,
    pub min_ctit_seconds: u32,
    pub status: Status,
    pub created_ms: UnixMillis,
}

/// `PUT /admin/v1/merchants/{m}/links/{id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    pub partner_id: PartnerId,
    pub destination: String,
    #[serde(default)]
    pub deep_link_hosts: Vec<String>,
    #[serde(default)]
    pub plan_id: Option<PlanId>,
    #[serde(default = "default_window")]
    pub window_days: u32,
    #[serde(default)]
    pub min_ctit_seconds: u32,
    #[serde(default)]
    pub status: Status,
}

fn default_window() -> u32 {
    DEFAULT_WINDOW_DAYS
}

impl LinkBody {
    /// Validates the template and hosts. Whether the partner and plan exist is checked
    /// by the caller, which sees the catalog.
    ///
    /// # Errors
    /// The first field that is not valid.
    pub fn into_link(self, merchant_id: MerchantId, id: LinkId, created_ms: UnixMillis) -> Result<Link, FieldError> {
        check_template(&self.destination).map_err(|e| FieldError::new("destination", e))?;
        let mut hosts = Vec::with_capacity(self.deep_link_hosts.len());
        for (i, host) in self.deep_link_hosts.iter().enumerate() {
            hosts.push(normalize_host(host).ok_or_else(|| {
                FieldError::new(format!("deep_link_hosts[{i}]"), "must be a bare host name such as shop.example.com")
            })?);
        }
        if self.window_days == 0 || self.window_days > MAX_WINDOW_DAYS {
            return Err(FieldError::new("window_days", format!("must be 1..{MAX_WINDOW_DAYS}")));
        }
        Ok(Link {
            id,
            merchant_id,
            partner_id: self.partner_id,
            destination: self.destination,
            deep_link_hosts: hosts,
            plan_id: self.plan_id,
            window_days: self.window_days,
            min_ctit_seconds: self.min_ctit_seconds,
            status: self.status,
            created_ms,
        })
    }
}

/// Lower-cases a host name, drops one trailing dot and refuses anything that is not a
/// bare host (scheme, path, port, userinfo, wildcard).
fn normalize_host(host: &str) -> Option<String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let url = url::Url::parse(&format!("http://{h}/")).ok()?;
    let parsed = url.host_str()?.trim_end_matches('.').to_string();
    (parsed == h && !h.is_empty() && url.port().is_none()).then_some(parsed)
}

/// A template is valid when it names only known macros and, with them filled, is an
/// absolute http(s) URL with a host and no userinfo.
fn check_template(template: &str) -> Result<(), String> {
    if template.len() > MAX_DESTINATION_LEN {
        return Err(format!("must be at most {MAX_DESTINATION_LEN} bytes"));
    }
    if template.chars().any(|c| c.is_control() || c == '\\' || c == ' ') {
        return Err("must not contain spaces, backslashes or control characters".into());
    }
    let filled = fill(template, &|_| Some("x".to_string())).map_err(|m| format!("unknown macro {{{m}}}"))?;
    let url = url::Url::parse(&filled).map_err(|e| format!("must be an absolute URL ({e})"))?;
    safe_url(&url).then_some(()).ok_or_else(|| "must be an http or https URL with a host and no user:password@".into())
}

fn safe_url(url: &url::Url) -> bool {
    matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.username().is_empty()
        && url.password().is_none()
}

/// Replaces every `{name}` with `value(name)`, already encoded by the caller.
/// Fails with the first unknown macro name.
fn fill(template: &str, value: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        if !MACROS.contains(&name) {
            return Err(name.to_string());
        }
        out.push_str(&value(name).unwrap_or_default());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn encode_component(value: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::utf8_percent_encode(value, KEEP).to_string()
}

/// The values the macros of one click expand to.
pub struct MacroValues<'a> {
    pub click_id: &'a str,
    pub link_id: &'a str,
    pub partner_id: &'a str,
    pub subs: &'a [Option<String>; 5],
}

impl MacroValues<'_> {
    fn get(&self, name: &str) -> Option<String> {
        let raw = match name {
            "click_id" => self.click_id,
            "link_id" => self.link_id,
            "partner_id" => self.partner_id,
            _ => {
                let i = name.strip_prefix("sub")?.parse::<usize>().ok()?;
                self.subs.get(i.checked_sub(1)?)?.as_deref()?
            }
        };
        Some(encode_component(raw))
    }
}

impl Link {
    /// The `Location` for a click: the default destination with macros filled or, when
    /// `deep_link` names an allow-listed host, that URL with the template's tracking
    /// parameters appended. Anything else falls back to the default destination.
    pub fn redirect_location(&self, values: &MacroValues<'_>, deep_link: Option<&str>) -> String {
        if let Some(url) = deep_link.and_then(|raw| self.allowed_deep_link(raw)) {
            return self.with_tracking_params(url, values);
        }
        fill(&self.destination, &|name| values.get(name)).unwrap_or_else(|_| self.destination.clone())
    }

    /// Parses a deep link and accepts it only when its parsed host is on the allow-list.
    /// The accepted URL carries the allow-listed spelling of the host: `SHOP.example.com.`
    /// becomes `shop.example.com`, because browsers treat a trailing dot as another origin
    /// (the shopper's cookies for the shop would not be sent).
    pub fn allowed_deep_link(&self, raw: &str) -> Option<url::Url> {
        if self.deep_link_hosts.is_empty() || raw.len() > MAX_DESTINATION_LEN {
            return None;
        }
        if raw.chars().any(|c| c.is_control() || c == '\\' || c.is_whitespace()) {
            return None;
        }
        let url = url::Url::parse(raw).ok()?;
        if !safe_url(&url) {
            return None;
        }
        let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
        if !self.deep_link_hosts.contains(&host) {
            return None;
        }
        let mut url = url;
        if url.host_str() != Some(host.as_str()) {
            url.set_host(Some(&host)).ok()?;
        }
        Some(url)
    }

    /// Appends the template's query parameters that carry macros (e.g. `ref={click_id}`)
    /// to a deep link, or `click_id=` when the template carries none.
    fn with_tracking_params(&self, mut url: url::Url, values: &MacroValues<'_>) -> String {
        let query = self.destination.split_once('?').map_or("", |(_, q)| q);
        let query = query.split('#').next().unwrap_or("");
        let tracking: Vec<String> = query
            .split('&')
            .filter(|pair| pair.contains('{'))
            .filter_map(|pair| fill(pair, &|name| values.get(name)).ok())
            .collect();
        let extra = if tracking.is_empty() {
            format!("click_id={}", encode_component(values.click_id))
        } else {
            tracking.join("&")
        };
        let joined = match url.query() {
            Some(q) if !q.is_empty() => format!("{q}&{extra}"),
            _ => extra,
        };
        url.set_query(Some(&joined));
        url.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(hosts: &[&str]) -> Link {
        LinkBody {
            partner_id: PartnerId::parse("ann").unwrap(),
            destination: "https://shop.example.com/spring?ref={click_id}&s1={sub1}".into(),
            deep_link_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            plan_id: None,
            window_days: 30,
            min_ctit_seconds: 0,
            status: Status::Active,
        }
        .into_link(MerchantId::parse("m").unwrap(), LinkId::parse("l").unwrap(), 0)
        .unwrap()
    }

    fn values<'a>(subs: &'a [Option<String>; 5]) -> MacroValues<'a> {
        MacroValues { click_id: "01ABC", link_id: "l", partner_id: "ann", subs }
    }

    #[test]
    fn macros_are_filled_and_encoded() {
        let subs = [Some("a b&c=d\r\n".to_string()), None, None, None, None];
        let loc = link(&[]).redirect_location(&values(&subs), None);
        assert_eq!(loc, "https://shop.example.com/spring?ref=01ABC&s1=a%20b%26c%3Dd%0D%0A");
    }

    #[test]
    fn templates_are_checked() {
        for bad in [
            "javascript:alert(1)",
            "https://shop.example.com/{nope}",
            "/relative",
            "https://user:pw@shop.example.com/",
            "https://shop.example.com/a b",
        ] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
        assert!(check_template("https://shop.example.com/?c={click_id}").is_ok());
    }

    #[test]
    fn deep_links_only_to_allowed_hosts() {
        let l = link(&["shop.example.com"]);
        let subs = Default::default();
        let v = values(&subs);
        let ok = l.redirect_location(&v, Some("https://shop.example.com/item/7?x=1"));
        assert_eq!(ok, "https://shop.example.com/item/7?x=1&ref=01ABC&s1=");
        let ok = l.redirect_location(&v, Some("https://SHOP.example.com./item"));
        assert!(ok.starts_with("https://shop.example.com/item?ref=01ABC"), "{ok}");
        let ok = l.redirect_location(&v, Some("https://shop.example.com.?x#1"));
        assert_eq!(ok, "https://shop.example.com/?x&ref=01ABC&s1=#1");
        let default = "https://shop.example.com/spring?ref=01ABC&s1=";
        for evil in [
            "https://evil.com/",
            "//evil.com",
            "\\\\evil.com",
            "https://shop.example.com@evil.com/",
            "https://good@shop.example.com/",
            "https://shop.example.com.evil.com/",
            "javascript:alert(1)",
            "https://evil.com\r\nSet-Cookie: x",
            "https://shop.example.com\\@evil.com",
            "ftp://shop.example.com/",
            "https://xn--shp-example-7ib.com/",
            "https://[::1]/",
        ] {
            assert_eq!(l.redirect_location(&v, Some(evil)), default, "{evil}");
        }
    }

    #[test]
    fn no_deep_links_without_hosts() {
        let l = link(&[]);
        let subs = Default::default();
        assert_eq!(
            l.redirect_location(&values(&subs), Some("https://shop.example.com/x")),
            "https://shop.example.com/spring?ref=01ABC&s1="
        );
    }
}
