//! Which peer addresses the relay may talk to.
//!
//! A TURN relay sends datagrams wherever an authenticated client asks, from inside the
//! server's network. Without a filter any caller holding credentials (every Duet user gets
//! them in `welcome`) can reach the server's loopback services, the cloud metadata address
//! (169.254.169.254) or the private network behind it: the class of SSRF bugs coturn's
//! `denied-peer-ip` exists for. So these ranges are refused unless an `--turn-allow-peer`
//! range covers the address.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Ranges refused by default: "this network", loopback, private (RFC 1918 and IPv6 unique
/// local), carrier-grade NAT, link-local, multicast, reserved and broadcast, and the IPv6
/// forms that embed or translate IPv4 addresses (so a denied IPv4 address cannot be reached
/// through one).
pub const DENIED_BY_DEFAULT: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// A CIDR range given on the command line, such as `127.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRange(pub IpNet);

impl FromStr for PeerRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(PeerRange(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| PeerRange(IpNet::from(ip)))
            .map_err(|_| format!("`{s}` is not an IP address or CIDR range (e.g. 127.0.0.0/8)"))
    }
}

impl std::fmt::Display for PeerRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The deny list with its explicit exceptions.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    denied: Vec<IpNet>,
    allowed: Vec<IpNet>,
}

impl PeerPolicy {
    /// The default deny list plus `own` (this server's addresses: a client must not use
    /// the relay to reach the server's other services, or the relay itself, from
    /// inside; its live relay addresses are allowed apart from this), with `allowed`
    /// ranges exempt from both.
    pub fn new(allowed: &[PeerRange], own: &[IpAddr]) -> PeerPolicy {
        let denied = DENIED_BY_DEFAULT
            .iter()
            .filter_map(|s| s.parse::<IpNet>().ok())
            .chain(
                own.iter()
                    .filter(|ip| !ip.is_unspecified())
                    .map(|&ip| IpNet::from(ip)),
            )
            .collect();
        PeerPolicy {
            denied,
            allowed: allowed.iter().map(|r| r.0).collect(),
        }
    }

    /// Whether the relay may exchange datagrams with `ip`. IPv4-mapped and IPv4-compatible
    /// IPv6 addresses are judged as the IPv4 address they carry.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4() {
                // `to_ipv4` also maps `::1` and `::`; keep those as IPv6 (both are denied).
                Some(v4) if !v6.is_loopback() && !v6.is_unspecified() => IpAddr::V4(v4),
                _ => ip,
            },
            IpAddr::V4(_) => ip,
        };
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return true;
        }
        !self.denied.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_policy_refuses_internal_ranges() {
        let p = PeerPolicy::new(&[], &[]);
        for denied in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "224.0.0.251",
            "255.255.255.255",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
        ] {
            assert!(!p.permits(ip(denied)), "{denied} should be denied");
        }
        for public in [
            "8.8.8.8",
            "203.0.114.7",
            "2001:4860:4860::8888",
            "::ffff:1.1.1.1",
        ] {
            assert!(p.permits(ip(public)), "{public} should be permitted");
        }
    }

    #[test]
    fn the_servers_own_public_address_is_denied_unless_allowed() {
        let own = ip("203.0.113.5");
        let p = PeerPolicy::new(&[], &[own, ip("0.0.0.0")]);
        assert!(!p.permits(own));
        assert!(p.permits(ip("203.0.113.6")));
        let allow: PeerRange = "203.0.113.0/24".parse().unwrap();
        assert!(PeerPolicy::new(&[allow], &[own]).permits(own));
    }

    #[test]
    fn allow_ranges_override_the_deny_list() {
        let allow: PeerRange = "127.0.0.0/8".parse().unwrap();
        let single: PeerRange = "10.0.0.7".parse().unwrap();
        let p = PeerPolicy::new(&[allow, single], &[]);
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("::ffff:127.0.0.2")));
        assert!(p.permits(ip("10.0.0.7")));
        assert!(!p.permits(ip("10.0.0.8")));
        assert!("nonsense".parse::<PeerRange>().is_err());
        assert_eq!(
            "10.1.2.3/8".parse::<PeerRange>().unwrap().to_string(),
            "10.0.0.0/8"
        );
    }
}
