//! Host and path matching: request -> route.
//!
//! Lookup cost depends on the request, never on the number of routes: one hash probe for the
//! host (exact, then the single-label wildcard suffix), then one probe per path element for
//! prefixes, longest first. Precedence follows the Kubernetes Ingress rules: exact host beats
//! wildcard host beats any host; within a host, Exact path beats Prefix, longest prefix wins,
//! and among routes on the same path, those with more method/header conditions are tried
//! first, then configuration order. A host that has routes does not fall through to less
//! specific hosts: an unmatched path there goes to the listener's default route.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// Conditions beyond host and path.
#[derive(Debug, Default, Clone)]
pub struct Conditions {
    /// Allowed methods; empty means any.
    pub methods: Vec<Method>,
    /// Header name and optional exact value.
    pub headers: Vec<(HeaderName, Option<HeaderValue>)>,
    /// The port the request's host (Host header or `:authority`) must name.
    pub port: Option<u16>,
}

impl Conditions {
    fn weight(&self) -> usize {
        usize::from(!self.methods.is_empty())
            + self.headers.len()
            + usize::from(self.port.is_some())
    }

    fn accepts(&self, port: Option<u16>, method: &Method, headers: &HeaderMap) -> bool {
        self.port.is_none_or(|p| port == Some(p))
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|(name, want)| match want {
                None => headers.contains_key(name),
                Some(v) => headers.get_all(name).iter().any(|have| have == v),
            })
    }
}

/// How a route's path is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path equals this.
    Exact(String),
    /// The path starts with these elements.
    Prefix(String),
}

impl PathMatch {
    /// Prefix keys ignore a trailing slash (`/foo/` and `/foo` are the same prefix), as the
    /// Ingress specification says.
    fn key(&self) -> (&str, bool) {
        match self {
            Self::Exact(p) => (p.as_str(), true),
            Self::Prefix(p) => {
                let t = p.trim_end_matches('/');
                (if t.is_empty() { "/" } else { t }, false)
            }
        }
    }
}

/// Host part of a match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Any host.
    Any,
    /// Exactly this host (lowercase, no port).
    Exact(String),
    /// `*.suffix`: exactly one label before `suffix`.
    Wildcard(String),
}

type Candidates<R> = Vec<(Conditions, R)>;

#[derive(Debug)]
struct PathTable<R> {
    exact: HashMap<Box<str>, Candidates<R>>,
    prefix: HashMap<Box<str>, Candidates<R>>,
}

impl<R> Default for PathTable<R> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            prefix: HashMap::new(),
        }
    }
}

impl<R> PathTable<R> {
    fn insert(&mut self, path: &PathMatch, cond: Conditions, route: R) {
        let (key, exact) = path.key();
        let map = if exact {
            &mut self.exact
        } else {
            &mut self.prefix
        };
        let list = map.entry(key.into()).or_default();
        // Stable insert by descending specificity keeps configuration order among equals.
        let w = cond.weight();
        let at = list.partition_point(|(c, _)| c.weight() >= w);
        list.insert(at, (cond, route));
    }

    fn find(
        &self,
        port: Option<u16>,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<&R> {
        fn pick<'a, R>(
            list: &'a Candidates<R>,
            port: Option<u16>,
            method: &Method,
            headers: &HeaderMap,
        ) -> Option<&'a R> {
            list.iter()
                .find(|(c, _)| c.accepts(port, method, headers))
                .map(|(_, r)| r)
        }
        let pick = |list| pick(list, port, method, headers);
        if let Some(r) = self.exact.get(path).and_then(pick) {
            return Some(r);
        }
        if self.prefix.is_empty() {
            return None;
        }
        let mut cand = path.trim_end_matches('/');
        loop {
            let key = if cand.is_empty() { "/" } else { cand };
            if let Some(r) = self.prefix.get(key).and_then(pick) {
                return Some(r);
            }
            if cand.is_empty() {
                return None;
            }
            cand = &cand[..cand.rfind('/').unwrap_or(0)];
        }
    }
}

/// The routes of one listener, indexed for lookup.
#[derive(Debug)]
pub struct Router<R> {
    exact_hosts: HashMap<Box<str>, PathTable<R>>,
    wildcard_hosts: HashMap<Box<str>, PathTable<R>>,
    any_host: Option<PathTable<R>>,
    default: Option<R>,
}

impl<R> Default for Router<R> {
    fn default() -> Self {
        Self {
            exact_hosts: HashMap::new(),
            wildcard_hosts: HashMap::new(),
            any_host: None,
            default: None,
        }
    }
}

impl<R: Clone> Router<R> {
    /// Adds a route under each of its hosts.
    pub fn insert(&mut self, hosts: &[HostMatch], path: &PathMatch, cond: &Conditions, route: R) {
        for host in hosts {
            let table = match host {
                HostMatch::Any => self.any_host.get_or_insert_with(PathTable::default),
                HostMatch::Exact(h) => self.exact_hosts.entry(h.as_str().into()).or_default(),
                HostMatch::Wildcard(s) => self.wildcard_hosts.entry(s.as_str().into()).or_default(),
            };
            table.insert(path, cond.clone(), route.clone());
        }
    }
}

impl<R> Router<R> {
    /// Sets the route taken when nothing else matches.
    pub fn set_default(&mut self, route: R) {
        self.default = Some(route);
    }

    /// Finds the route for a request. `host` must already be normalized (see [`normalize_host`]).
    /// The route for a request: `host` normalized ([`normalize_host`]), `port` the one its
    /// host named, if any ([`host_port`]).
    pub fn find(
        &self,
        host: &str,
        port: Option<u16>,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<&R> {
        let table = self
            .exact_hosts
            .get(host)
            .or_else(|| {
                // A wildcard covers one non-empty label.
                let dot = host.find('.').filter(|&d| d > 0)?;
                self.wildcard_hosts.get(&host[dot + 1..])
            })
            .or(self.any_host.as_ref());
        table
            .and_then(|t| t.find(port, path, method, headers))
            .or(self.default.as_ref())
    }
}

/// Normalizes a request path before matching, as RFC 3986 section 6.2.2 does: percent-encoded
/// unreserved characters are decoded (`/%61dmin` is `/admin`), then dot segments are removed
/// (section 5.2.4), so `/public/../admin` cannot match a `/public` prefix and reach `/admin`
/// upstream. Encoded slashes (`%2F`) stay encoded. `None` when nothing changes (the common case
/// allocates nothing).
pub fn normalize_path(path: &str) -> Option<String> {
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return None;
    }
    let decoded = decode_unreserved(path);
    let text = decoded.as_deref().unwrap_or(path);
    if !text.split('/').any(|seg| seg == "." || seg == "..") {
        return decoded;
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in text.split('/').skip(1) {
        trailing = seg == "." || seg == "..";
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    let mut s = String::with_capacity(text.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing || s.is_empty() {
        s.push('/');
    }
    Some(s)
}

/// Decodes `%XX` escapes of unreserved characters (letters, digits, `-._~`); `None` when
/// there are none.
fn decode_unreserved(path: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut changed = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h * 16 + l;
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    out.push(c);
                    i += 3;
                    changed = true;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII bytes replaced ASCII escapes, so the text stays UTF-8.
    changed.then(|| String::from_utf8(out).ok()).flatten()
}

/// Longest host name we look up; longer ones cannot be valid DNS names and match nothing
/// but the any-host routes.
pub const MAX_HOST_LEN: usize = 253;

/// Lowercases `host` and strips a port, writing into `buf` only when lowercasing is needed,
/// so the common case allocates nothing.
pub fn normalize_host<'a>(host: &'a str, buf: &'a mut [u8; MAX_HOST_LEN]) -> &'a str {
    // `example.com.` is the same name as `example.com`.
    let host = strip_port(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    if !host.bytes().any(|b| b.is_ascii_uppercase()) {
        return host;
    }
    if host.len() > MAX_HOST_LEN {
        return "";
    }
    let out = &mut buf[..host.len()];
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    // Lowercasing ASCII letters keeps the text valid UTF-8.
    std::str::from_utf8(out).unwrap_or("")
}

/// The port a Host header or `:authority` names (`svc.ns:8080`, `[::1]:8080`), if any.
pub fn host_port(host: &str) -> Option<u16> {
    let i = last_colon(host)?;
    if last_colon(&host[..i]).is_some() && !host[..i].ends_with(']') {
        // A bare IPv6 address, no port.
        return None;
    }
    host[i + 1..].parse().ok()
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: keep the brackets off, they never appear in route hosts.
        return rest.split(']').next().unwrap_or(rest);
    }
    match last_colon(host) {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// Where the last `:` is. A plain byte loop: host names are short, and `str::rfind` with a
/// `char` goes through the generic searcher and `memrchr`, about 320 instructions a request
/// for the two calls (callgrind).
fn last_colon(host: &str) -> Option<usize> {
    host.bytes().rposition(|b| b == b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, PathMatch, &'static str)]) -> Router<&'static str> {
        let mut r = Router::default();
        for (host, path, name) in routes {
            let h = match *host {
                "" => HostMatch::Any,
                h if h.starts_with("*.") => HostMatch::Wildcard(h[2..].to_owned()),
                h => HostMatch::Exact(h.to_owned()),
            };
            r.insert(&[h], path, &Conditions::default(), *name);
        }
        r
    }

    fn find<'a>(r: &'a Router<&'static str>, host: &str, path: &str) -> Option<&'a str> {
        r.find(host, None, path, &Method::GET, &HeaderMap::new())
            .copied()
    }

    #[test]
    fn host_normalization() {
        let mut buf = [0; MAX_HOST_LEN];
        assert_eq!(normalize_host("Example.COM:8080", &mut buf), "example.com");
        let mut buf = [0; MAX_HOST_LEN];
        assert_eq!(normalize_host("example.com", &mut buf), "example.com");
        let mut buf = [0; MAX_HOST_LEN];
        assert_eq!(normalize_host("[::1]:80", &mut buf), "::1");
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(normalize_path("/a/b"), None);
        assert_eq!(normalize_path("/a/v1.2/x"), None);
        assert_eq!(
            normalize_path("/public/../admin").as_deref(),
            Some("/admin")
        );
        assert_eq!(
            normalize_path("/public/%2E%2e/admin").as_deref(),
            Some("/admin")
        );
        assert_eq!(normalize_path("/a/./b/.").as_deref(), Some("/a/b/"));
        assert_eq!(normalize_path("/../../x").as_deref(), Some("/x"));
        assert_eq!(normalize_path("/a/..").as_deref(), Some("/"));
        assert_eq!(
            normalize_path("/%61dmin/%7Eme").as_deref(),
            Some("/admin/~me")
        );
        assert_eq!(normalize_path("/a%2Fb"), None, "encoded slash kept");
        assert_eq!(normalize_path("/a%2"), None, "truncated escape kept");
        assert_eq!(normalize_path("/%"), None);
    }

    #[test]
    fn trailing_and_leading_dots_in_hosts() {
        let mut buf = [0; MAX_HOST_LEN];
        assert_eq!(normalize_host("Example.COM.:80", &mut buf), "example.com");
        let r = router(&[("*.example.com", PathMatch::Prefix("/".into()), "wild")]);
        assert_eq!(find(&r, ".example.com", "/"), None);
    }

    #[test]
    fn wildcard_covers_exactly_one_label() {
        let r = router(&[("*.example.com", PathMatch::Prefix("/".into()), "wild")]);
        assert_eq!(find(&r, "a.example.com", "/"), Some("wild"));
        assert_eq!(find(&r, "a.b.example.com", "/"), None);
        assert_eq!(find(&r, "example.com", "/"), None);
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any() {
        let r = router(&[
            ("", PathMatch::Prefix("/".into()), "any"),
            ("*.example.com", PathMatch::Prefix("/".into()), "wild"),
            ("a.example.com", PathMatch::Prefix("/".into()), "exact"),
        ]);
        assert_eq!(find(&r, "a.example.com", "/x"), Some("exact"));
        assert_eq!(find(&r, "b.example.com", "/x"), Some("wild"));
        assert_eq!(find(&r, "other.org", "/x"), Some("any"));
    }

    #[test]
    fn conditions_are_tried_most_specific_first() {
        let mut r = Router::default();
        let plain = Conditions::default();
        let post = Conditions {
            methods: vec![Method::POST],
            headers: vec![],
            port: None,
        };
        let p = PathMatch::Prefix("/".into());
        r.insert(&[HostMatch::Any], &p, &plain, "plain");
        r.insert(&[HostMatch::Any], &p, &post, "post");
        let h = HeaderMap::new();
        assert_eq!(r.find("h", None, "/", &Method::POST, &h), Some(&"post"));
        assert_eq!(r.find("h", None, "/", &Method::GET, &h), Some(&"plain"));
    }

    #[test]
    fn a_port_condition_takes_requests_naming_that_port() {
        let mut r = Router::default();
        let p = PathMatch::Prefix("/".into());
        let on = |port| Conditions {
            port: Some(port),
            ..Conditions::default()
        };
        r.insert(&[HostMatch::Any], &p, &on(8080), "8080");
        r.insert(&[HostMatch::Any], &p, &on(9090), "9090");
        r.insert(&[HostMatch::Any], &p, &Conditions::default(), "no port");
        let h = HeaderMap::new();
        let find = |port| r.find("svc.ns", port, "/", &Method::GET, &h).copied();
        assert_eq!(find(Some(8080)), Some("8080"));
        assert_eq!(find(Some(9090)), Some("9090"));
        assert_eq!(find(Some(7000)), Some("no port"));
        assert_eq!(find(None), Some("no port"));
    }

    #[test]
    fn host_port_reads_the_port_of_names_and_bracketed_ipv6_only() {
        assert_eq!(host_port("svc.ns:8080"), Some(8080));
        assert_eq!(host_port("svc.ns"), None);
        assert_eq!(host_port("[::1]:8080"), Some(8080));
        assert_eq!(host_port("[::1]"), None);
        assert_eq!(host_port("::1"), None);
        assert_eq!(host_port("svc:notaport"), None);
        assert_eq!(host_port("svc:70000"), None);
    }
}
