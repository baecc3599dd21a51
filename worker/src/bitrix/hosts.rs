//! `B24_ALLOWED_HOSTS`: the only endpoints the worker ever calls. An endpoint taken from
//! an event is attacker input (SSRF), so every URL, redirects included, is checked here
//! before a request leaves. Plain http is refused unless the pattern says `http://`.

use url::Url;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.bitrix24.com`: any host ending in `.bitrix24.com` (not the bare domain).
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PortPattern {
    /// No port in the pattern: only the scheme's default port.
    Default,
    Any,
    Exact(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    allow_http: bool,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHosts(Vec<Pattern>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad host pattern `{0}`")]
pub struct PatternError(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("endpoint is not a valid absolute URL")]
    Invalid,
    #[error("endpoint host `{0}` is not in B24_ALLOWED_HOSTS")]
    NotAllowed(String),
}

impl AllowedHosts {
    /// Comma-separated patterns: `*.bitrix24.com`, `portal.example.com:8443`,
    /// `http://127.0.0.1:*`.
    pub fn parse(list: &str) -> Result<Self, PatternError> {
        let mut out = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let err = || PatternError(raw.to_string());
            let (allow_http, rest) = match raw.strip_prefix("http://") {
                Some(r) => (true, r),
                None => (false, raw.strip_prefix("https://").unwrap_or(raw)),
            };
            let rest = rest.trim_end_matches('/');
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, "*")) => (h, PortPattern::Any),
                Some((h, p)) => (h, PortPattern::Exact(p.parse().map_err(|_| err())?)),
                None => (rest, PortPattern::Default),
            };
            let host = host.to_ascii_lowercase();
            let valid = |h: &str| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            };
            let host = match host.strip_prefix("*.") {
                Some(suffix) if valid(suffix) => HostPattern::Suffix(format!(".{suffix}")),
                None if valid(&host) => HostPattern::Exact(host),
                _ => return Err(err()),
            };
            out.push(Pattern {
                allow_http,
                host,
                port,
            });
        }
        Ok(Self(out))
    }

    /// Parses `endpoint` and checks it against the patterns.
    pub fn check(&self, endpoint: &str) -> Result<Url, EndpointError> {
        let url = Url::parse(endpoint).map_err(|_| EndpointError::Invalid)?;
        if self.allows(&url) {
            Ok(url)
        } else {
            Err(EndpointError::NotAllowed(
                url.host_str().unwrap_or("").chars().take(100).collect(),
            ))
        }
    }

    pub fn allows(&self, url: &Url) -> bool {
        if !url.username().is_empty() || url.password().is_some() {
            return false;
        }
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return false,
        };
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        let port = url.port();
        self.0.iter().any(|p| {
            let scheme_ok = https || p.allow_http;
            let host_ok = match &p.host {
                HostPattern::Exact(h) => *h == host,
                HostPattern::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
            };
            let port_ok = match p.port {
                PortPattern::Default => port.is_none(),
                PortPattern::Any => true,
                PortPattern::Exact(n) => url.port_or_known_default() == Some(n),
            };
            scheme_ok && host_ok && port_ok
        })
    }
}

/// A portal's domain as Bitrix24 writes it (`some-domain.bitrix24.com`): the host of
/// its `client_endpoint`, with the port when one is given (local test portals).
pub fn domain_of(url: &Url) -> Option<String> {
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BITRIX24_CLOUD_HOSTS;

    #[test]
    fn cloud_defaults_allow_portals_over_https_only() {
        let a = AllowedHosts::parse(BITRIX24_CLOUD_HOSTS).unwrap();
        assert!(a.check("https://some-domain.bitrix24.com/rest/").is_ok());
        assert!(a.check("https://x.bitrix24.de/rest/").is_ok());
        assert!(a.check("http://some-domain.bitrix24.com/rest/").is_err());
        assert!(a.check("https://bitrix24.com.evil.io/rest/").is_err());
        assert!(a.check("https://evilbitrix24.com/rest/").is_err());
        assert!(a
            .check("https://some-domain.bitrix24.com:8443/rest/")
            .is_err());
        assert!(a
            .check("https://user:pw@some-domain.bitrix24.com/rest/")
            .is_err());
        assert!(a.check("https://169.254.169.254/latest/").is_err());
        assert!(a.check("file:///etc/passwd").is_err());
        assert!(a.check("not a url").is_err());
    }

    #[test]
    fn http_patterns_allow_local_test_portals() {
        let a = AllowedHosts::parse("http://127.0.0.1:*, portal.example.com:8443").unwrap();
        assert!(a.check("http://127.0.0.1:45123/rest/").is_ok());
        assert!(a.check("https://127.0.0.1:45123/rest/").is_ok());
        assert!(a.check("http://127.0.0.2:45123/rest/").is_err());
        assert!(a.check("https://portal.example.com:8443/rest/").is_ok());
        assert!(a.check("http://portal.example.com:8443/rest/").is_err());
        assert_eq!(
            a.check("http://10.0.0.1/rest/"),
            Err(EndpointError::NotAllowed("10.0.0.1".into()))
        );
    }

    #[test]
    fn a_domain_is_the_endpoints_host_and_port() {
        let u = Url::parse("https://Some-Domain.bitrix24.com/rest/").unwrap();
        assert_eq!(domain_of(&u).as_deref(), Some("some-domain.bitrix24.com"));
        let u = Url::parse("http://127.0.0.1:4567/rest/").unwrap();
        assert_eq!(domain_of(&u).as_deref(), Some("127.0.0.1:4567"));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        assert!(AllowedHosts::parse("*.").is_err());
        assert!(AllowedHosts::parse("a b").is_err());
        assert!(AllowedHosts::parse("host:notaport").is_err());
    }
}
