//! Where outbound postbacks may go (SPEC 10): a destination's addresses are vetted when
//! it is configured and at every send, and the connection goes to the vetted address
//! (the caller connects to what [`vet_url`] returns: no second resolution).
//!
//! Refused, for IP literals and for every address a name resolves to (one bad address
//! refuses the name): loopback, private, link-local, CGNAT, unique-local, multicast,
//! unspecified, broadcast and reserved ranges, IPv4-mapped and IPv4-compatible IPv6,
//! NAT64, 6to4, Teredo, and cloud metadata addresses. `allow_private` (tests, private
//! networks) lets loopback, private, CGNAT and unique-local addresses through; never
//! link-local, metadata or the embedded-IPv4 forms.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

/// Why an address may not be a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    Loopback,
    Private,
    LinkLocal,
    Cgnat,
    UniqueLocal,
    Multicast,
    Unspecified,
    Reserved,
    Ipv4Mapped,
    Nat64,
    SixToFour,
    Teredo,
    Metadata,
}

impl Blocked {
    pub fn as_str(self) -> &'static str {
        match self {
            Blocked::Loopback => "loopback",
            Blocked::Private => "private",
            Blocked::LinkLocal => "link-local",
            Blocked::Cgnat => "carrier-grade NAT",
            Blocked::UniqueLocal => "unique-local",
            Blocked::Multicast => "multicast",
            Blocked::Unspecified => "unspecified",
            Blocked::Reserved => "reserved",
            Blocked::Ipv4Mapped => "IPv4-mapped or IPv4-compatible IPv6",
            Blocked::Nat64 => "NAT64",
            Blocked::SixToFour => "6to4",
            Blocked::Teredo => "Teredo",
            Blocked::Metadata => "cloud metadata",
        }
    }

    /// Whether `allow_private` lets this kind through.
    fn private_network(self) -> bool {
        matches!(self, Blocked::Loopback | Blocked::Private | Blocked::Cgnat | Blocked::UniqueLocal)
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// Cloud metadata services (AWS, GCP, Azure at 169.254.169.254; Alibaba; Oracle; AWS IPv6).
const METADATA_V4: [[u8; 4]; 3] = [[169, 254, 169, 254], [100, 100, 100, 200], [192, 0, 0, 192]];
const METADATA_V6: [u16; 8] = [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254];

fn classify_v4(ip: Ipv4Addr) -> Option<Blocked> {
    if METADATA_V4.iter().any(|m| ip.octets() == *m) {
        return Some(Blocked::Metadata);
    }
    let table: [([u8; 4], u32, Blocked); 17] = [
        ([0, 0, 0, 0], 8, Blocked::Unspecified),
        ([127, 0, 0, 0], 8, Blocked::Loopback),
        ([10, 0, 0, 0], 8, Blocked::Private),
        ([172, 16, 0, 0], 12, Blocked::Private),
        ([192, 168, 0, 0], 16, Blocked::Private),
        ([169, 254, 0, 0], 16, Blocked::LinkLocal),
        ([100, 64, 0, 0], 10, Blocked::Cgnat),
        ([224, 0, 0, 0], 4, Blocked::Multicast),
        ([240, 0, 0, 0], 4, Blocked::Reserved),
        ([192, 0, 0, 0], 24, Blocked::Reserved),
        ([192, 0, 2, 0], 24, Blocked::Reserved),
        ([198, 18, 0, 0], 15, Blocked::Reserved),
        ([198, 51, 100, 0], 24, Blocked::Reserved),
        ([203, 0, 113, 0], 24, Blocked::Reserved),
        ([192, 88, 99, 0], 24, Blocked::Reserved),
        ([255, 255, 255, 255], 32, Blocked::Reserved),
        ([233, 252, 0, 0], 24, Blocked::Multicast),
    ];
    table.iter().find(|(net, prefix, _)| in_v4(ip, *net, *prefix)).map(|(_, _, why)| *why)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Blocked> {
    if ip == Ipv6Addr::from(METADATA_V6) {
        return Some(Blocked::Metadata);
    }
    if ip.is_unspecified() {
        return Some(Blocked::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Blocked::Loopback);
    }
    let table: [([u16; 8], u32, Blocked); 13] = [
        ([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, Blocked::Ipv4Mapped),
        ([0, 0, 0, 0, 0, 0, 0, 0], 96, Blocked::Ipv4Mapped),
        ([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, Blocked::Ipv4Mapped),
        ([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, Blocked::Nat64),
        ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, Blocked::Nat64),
        ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, Blocked::SixToFour),
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, Blocked::Teredo),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, Blocked::LinkLocal),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Blocked::Reserved),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Blocked::UniqueLocal),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Blocked::Multicast),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, Blocked::Reserved),
        ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, Blocked::Reserved),
    ];
    table.iter().find(|(net, prefix, _)| in_v6(ip, *net, *prefix)).map(|(_, _, why)| *why)
}

/// Why `ip` may not be a destination, or `None` for a public address.
pub fn classify(ip: IpAddr) -> Option<Blocked> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Whether `ip` may be a destination under `allow_private`.
pub fn allowed(ip: IpAddr, allow_private: bool) -> Result<(), Blocked> {
    match classify(ip) {
        None => Ok(()),
        Some(why) if allow_private && why.private_network() => Ok(()),
        Some(why) => Err(why),
    }
}

/// Resolves a host name to its addresses; injectable so tests control DNS.
pub trait Resolve: Send + Sync {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system resolver (`getaddrinfo` on a blocking thread, through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.map(|a| a.ip()).collect()) })
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{host} is a {} address ({ip}); set outbound.allow_private only for private networks and tests", .why.as_str())]
    Address { host: String, ip: IpAddr, why: Blocked },
    #[error("{host} resolves to {ip}, a {} address: a name with any forbidden address is refused whole", .why.as_str())]
    Resolved { host: String, ip: IpAddr, why: Blocked },
    #[error("{host} cannot be resolved: {detail}")]
    Unresolvable { host: String, detail: String },
    #[error("{0}")]
    Url(String),
}

/// Vets an `http`/`https` URL: its host's addresses (the literal, or every address the
/// name resolves to) must all be allowed. Returns the addresses to connect to.
///
/// # Errors
/// [`Refused`], naming the host and why.
pub async fn vet_url(url: &url::Url, allow_private: bool, resolver: &dyn Resolve) -> Result<Vec<SocketAddr>, Refused> {
    let port = url.port_or_known_default().ok_or_else(|| Refused::Url("the URL has no port".into()))?;
    match url.host() {
        Some(url::Host::Ipv4(v4)) => vet_literal(IpAddr::V4(v4), port, allow_private),
        Some(url::Host::Ipv6(v6)) => vet_literal(IpAddr::V6(v6), port, allow_private),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.');
            let addrs = resolver
                .resolve(name, port)
                .await
                .map_err(|e| Refused::Unresolvable { host: name.to_string(), detail: e.to_string() })?;
            if addrs.is_empty() {
                return Err(Refused::Unresolvable { host: name.to_string(), detail: "no addresses".into() });
            }
            for ip in &addrs {
                allowed(*ip, allow_private).map_err(|why| Refused::Resolved {
                    host: name.to_string(),
                    ip: *ip,
                    why,
                })?;
            }
            Ok(addrs.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
        }
        None => Err(Refused::Url("the URL has no host".into())),
    }
}

/// Most time a configuration-time name lookup may take.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Vets a partner's configured `outbound` (its template checked first): SPEC 10's check
/// at configuration time.
///
/// # Errors
/// A message for a `422` naming `outbound.url`.
pub async fn vet_outbound(
    outbound: &crate::domain::outbound::Outbound,
    allow_private: bool,
    resolver: &dyn Resolve,
) -> Result<(), String> {
    let url = outbound.check().map_err(|e| e.detail)?;
    match tokio::time::timeout(RESOLVE_TIMEOUT, vet_url(&url, allow_private, resolver)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(refused)) => Err(format!("is refused: {refused}")),
        Err(_) => Err(format!("is refused: {} did not resolve within 5 s", url.host_str().unwrap_or("?"))),
    }
}

fn vet_literal(ip: IpAddr, port: u16, allow_private: bool) -> Result<Vec<SocketAddr>, Refused> {
    allowed(ip, allow_private).map_err(|why| Refused::Address { host: ip.to_string(), ip, why })?;
    Ok(vec![SocketAddr::new(ip, port)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that answers from a table (names absent from it do not resolve).
    struct Table(Vec<(&'static str, Vec<IpAddr>)>);

    impl Resolve for Table {
        fn resolve<'a>(
            &'a self,
            host: &'a str,
            _port: u16,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
            let found = self.0.iter().find(|(h, _)| *h == host).map(|(_, a)| a.clone());
            Box::pin(async move { found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "NXDOMAIN")) })
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn resolver() -> Table {
        Table(vec![
            ("public.example", vec![ip("93.184.215.14"), ip("2606:2800:21f:cb07:6820:80da:af6b:8b2c")]),
            ("mixed.example", vec![ip("93.184.215.14"), ip("10.0.0.5")]),
            ("mixed6.example", vec![ip("2606:2800:21f:cb07::1"), ip("fd00::5")]),
            ("rebind.example", vec![ip("127.0.0.1")]),
            ("metadata.example", vec![ip("169.254.169.254")]),
            ("lan.example", vec![ip("192.168.1.20"), ip("10.1.2.3")]),
            ("empty.example", vec![]),
        ])
    }

    /// (URL, allowed without allow_private, allowed with it). At least 60 rows, covering
    /// every range of SPEC 10, the spellings of IPv4 that URL parsers accept, and names
    /// whose addresses mix public and private.
    const CASES: &[(&str, bool, bool)] = &[
        // Public addresses and names.
        ("http://93.184.215.14/pb", true, true),
        ("https://8.8.8.8/", true, true),
        ("http://[2606:4700:4700::1111]/", true, true),
        ("https://public.example/pb?x=1", true, true),
        ("https://public.example./pb", true, true),
        // Loopback, in every spelling.
        ("http://127.0.0.1/", false, true),
        ("http://127.1.2.3:8080/", false, true),
        ("http://2130706433/", false, true),
        ("http://0x7f000001/", false, true),
        ("http://0x7f.0.0.1/", false, true),
        ("http://017700000001/", false, true),
        ("http://0177.0.0.1/", false, true),
        ("http://127.1/", false, true),
        ("http://[::1]/", false, true),
        ("http://[0:0:0:0:0:0:0:1]/", false, true),
        ("http://rebind.example/", false, true),
        // Private (RFC 1918).
        ("http://10.0.0.1/", false, true),
        ("http://10.255.255.255/", false, true),
        ("http://172.16.0.1/", false, true),
        ("http://172.31.255.254/", false, true),
        ("http://192.168.0.1/", false, true),
        ("http://0xc0a80001/", false, true),
        ("http://3232235521/", false, true),
        ("http://lan.example/", false, true),
        // Just outside the private ranges: public.
        ("http://172.15.255.255/", true, true),
        ("http://172.32.0.1/", true, true),
        ("http://11.0.0.1/", true, true),
        // CGNAT.
        ("http://100.64.0.1/", false, true),
        ("http://100.127.255.254/", false, true),
        ("http://100.128.0.1/", true, true),
        // Link-local and metadata: never, even with allow_private.
        ("http://169.254.0.1/", false, false),
        ("http://169.254.169.254/latest/meta-data/", false, false),
        ("http://0xa9fea9fe/", false, false),
        ("http://2852039166/", false, false),
        ("http://metadata.example/", false, false),
        ("http://100.100.100.200/", false, false),
        ("http://192.0.0.192/", false, false),
        ("http://[fd00:ec2::254]/", false, false),
        ("http://[fe80::1]/", false, false),
        // Unique-local IPv6.
        ("http://[fc00::1]/", false, true),
        ("http://[fd12:3456:789a::1]/", false, true),
        // Unspecified, broadcast, multicast, reserved.
        ("http://0.0.0.0/", false, false),
        ("http://0/", false, false),
        ("http://0.1.2.3/", false, false),
        ("http://[::]/", false, false),
        ("http://255.255.255.255/", false, false),
        ("http://224.0.0.1/", false, false),
        ("http://239.255.255.250/", false, false),
        ("http://[ff02::1]/", false, false),
        ("http://240.0.0.1/", false, false),
        ("http://192.0.2.10/", false, false),
        ("http://198.51.100.7/", false, false),
        ("http://203.0.113.9/", false, false),
        ("http://198.18.0.1/", false, false),
        ("http://[2001:db8::1]/", false, false),
        ("http://[fec0::1]/", false, false),
        // Embedded IPv4: mapped, compatible, NAT64, 6to4, Teredo. Never allowed.
        ("http://[::ffff:127.0.0.1]/", false, false),
        ("http://[::ffff:7f00:1]/", false, false),
        ("http://[::ffff:10.0.0.1]/", false, false),
        ("http://[::ffff:8.8.8.8]/", false, false),
        ("http://[::127.0.0.1]/", false, false),
        ("http://[64:ff9b::7f00:1]/", false, false),
        ("http://[64:ff9b::a9fe:a9fe]/", false, false),
        ("http://[64:ff9b:1::a00:1]/", false, false),
        ("http://[2002:7f00:1::]/", false, false),
        ("http://[2002:a9fe:a9fe::]/", false, false),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", false, false),
        // Names with a mix of public and private addresses are refused whole.
        ("http://mixed.example/", false, true),
        ("http://mixed6.example/", false, true),
        // Names that do not resolve.
        ("http://nowhere.example/", false, false),
        ("http://empty.example/", false, false),
    ];

    #[tokio::test]
    async fn the_ssrf_table() {
        assert!(CASES.len() >= 60, "{} cases", CASES.len());
        let r = resolver();
        for (text, public_ok, private_ok) in CASES {
            let url = url::Url::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            for (allow_private, want) in [(false, *public_ok), (true, *private_ok)] {
                let got = vet_url(&url, allow_private, &r).await;
                assert_eq!(got.is_ok(), want, "{text} (allow_private = {allow_private}): {got:?}");
            }
        }
    }

    #[tokio::test]
    async fn the_addresses_vetted_are_the_ones_to_connect_to() {
        let url = url::Url::parse("https://public.example:8443/pb").unwrap();
        let addrs = vet_url(&url, false, &resolver()).await.unwrap();
        assert_eq!(
            addrs,
            [
                SocketAddr::new(ip("93.184.215.14"), 8443),
                SocketAddr::new(ip("2606:2800:21f:cb07:6820:80da:af6b:8b2c"), 8443)
            ]
        );
        let refused =
            vet_url(&url::Url::parse("http://mixed.example/").unwrap(), false, &resolver()).await.unwrap_err();
        assert!(refused.to_string().contains("10.0.0.5"), "{refused}");
    }
}
