//! The shapes the real API server answers with when something goes wrong: `Status` objects
//! with the reason, code, details and message text it uses, and the field errors of a 422.
//! Clients (kube-rs included) branch on `code` and `reason`, and people read `message`, so
//! all three follow the server's wording.

use serde_json::{json, Map, Value};

/// One resource as the server names it in errors: `ingresses.networking.k8s.io`, or just
/// `services` in the core group.
#[derive(Clone, Copy)]
pub struct Named<'a> {
    pub group: &'a str,
    pub plural: &'a str,
    pub kind: &'a str,
}

impl Named<'_> {
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    fn details(&self, name: &str, kind: &str) -> Map<String, Value> {
        let mut d = Map::new();
        if !name.is_empty() {
            d.insert("name".into(), name.into());
        }
        if !self.group.is_empty() {
            d.insert("group".into(), self.group.into());
        }
        d.insert("kind".into(), kind.into());
        d
    }
}

/// An error answer: an HTTP status and the `Status` object in its body.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Map<String, Value>>,
    /// Only on a 410 for an expired `continue` token: where the client may go on from.
    pub continue_token: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            continue_token: None,
        }
    }

    pub fn status(&self) -> Value {
        let mut metadata = Map::new();
        if let Some(c) = &self.continue_token {
            metadata.insert("continue".into(), c.clone().into());
        }
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": metadata,
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = Value::Object(d.clone());
        }
        s
    }

    pub fn not_found(r: Named<'_>, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        );
        e.details = Some(r.details(name, r.plural));
        e
    }

    /// What an API server answers while it cannot serve (starting, or its storage
    /// unreachable).
    pub fn unavailable() -> Self {
        Self::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
    }

    /// What the server says for a path it does not serve at all.
    pub fn no_route() -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        e.details = Some(Map::new());
        e
    }

    pub fn namespace_not_found(ns: &str) -> Self {
        Self::not_found(
            Named {
                group: "",
                plural: "namespaces",
                kind: "Namespace",
            },
            ns,
        )
    }

    pub fn already_exists(r: Named<'_>, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", r.qualified()),
        );
        e.details = Some(r.details(name, r.plural));
        e
    }

    /// The optimistic-concurrency failure of an update with a stale `resourceVersion`.
    pub fn conflict(r: Named<'_>, name: &str) -> Self {
        Self::conflict_because(
            r,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn conflict_because(r: Named<'_>, name: &str, why: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                r.qualified()
            ),
        );
        e.details = Some(r.details(name, r.plural));
        e
    }

    /// 422 with one cause per field error, worded like apimachinery's `field.ErrorList`.
    pub fn invalid(r: Named<'_>, name: &str, errs: &[FieldError]) -> Self {
        Self::invalid_kind(&r.qualified_kind(), r.group, r.kind, name, errs)
    }

    /// 422 for a kind that is not a stored resource (e.g. `ListOptions`).
    pub fn invalid_kind(
        qualified_kind: &str,
        group: &str,
        kind: &str,
        name: &str,
        errs: &[FieldError],
    ) -> Self {
        let joined = if errs.len() == 1 {
            errs[0].to_string()
        } else {
            format!(
                "[{}]",
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{qualified_kind} \"{name}\" is invalid: {joined}"),
        );
        let mut d = Map::new();
        if !name.is_empty() {
            d.insert("name".into(), name.into());
        }
        if !group.is_empty() {
            d.insert("group".into(), group.into());
        }
        d.insert("kind".into(), kind.into());
        d.insert(
            "causes".into(),
            errs.iter()
                .map(|e| json!({"reason": e.kind.reason(), "message": e.body(), "field": e.field}))
                .collect(),
        );
        e.details = Some(d);
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 410 for a resourceVersion older than the compaction point.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The server's answer to a resourceVersion it has not reached (after waiting ~3s for
    /// its cache, which here can never catch up, so it answers at once).
    pub fn too_large_rv(asked: u64, current: u64) -> Self {
        let mut e = Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {asked}, current: {current}"),
        );
        let mut d = Map::new();
        d.insert(
            "causes".into(),
            json!([{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]),
        );
        d.insert("retryAfterSeconds".into(), 1.into());
        e.details = Some(d);
        e
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn method_not_allowed() -> Self {
        let mut e = Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
        e.details = Some(Map::new());
        e
    }

    pub fn unsupported_media_type(accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    pub fn forbidden_terminating(r: Named<'_>, name: &str, ns: &str) -> Self {
        let mut e = Self::new(
            403,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                r.qualified()
            ),
        );
        e.details = Some(r.details(name, r.plural));
        e
    }
}

/// Which of apimachinery's field error types an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrKind {
    Required,
    Invalid,
    NotSupported,
    Forbidden,
    Duplicate,
    TooMany,
    TooLong,
}

impl ErrKind {
    fn reason(self) -> &'static str {
        match self {
            ErrKind::Required => "FieldValueRequired",
            ErrKind::Invalid => "FieldValueInvalid",
            ErrKind::NotSupported => "FieldValueNotSupported",
            ErrKind::Forbidden => "FieldValueForbidden",
            ErrKind::Duplicate => "FieldValueDuplicate",
            ErrKind::TooMany => "FieldValueTooMany",
            ErrKind::TooLong => "FieldValueTooLong",
        }
    }
}

/// One field error, printed as `path: Invalid value: "v": detail`.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    pub kind: ErrKind,
    /// The value as the server prints it (Go syntax: strings quoted, numbers bare).
    pub value: Option<String>,
    pub detail: String,
    /// For NotSupported: the values the server lists.
    pub supported: Vec<&'static str>,
}

impl FieldError {
    fn make(field: &str, kind: ErrKind, value: Option<String>, detail: &str) -> Self {
        Self {
            field: field.to_owned(),
            kind,
            value,
            detail: detail.to_owned(),
            supported: Vec::new(),
        }
    }

    pub fn required(field: &str, detail: &str) -> Self {
        Self::make(field, ErrKind::Required, None, detail)
    }

    pub fn invalid(field: &str, value: impl Into<Value>, detail: &str) -> Self {
        Self::make(
            field,
            ErrKind::Invalid,
            Some(go_value(&value.into())),
            detail,
        )
    }

    /// Invalid with the value already printed the way the server prints it (a Go type
    /// literal such as `[]networking.IngressRule(nil)`).
    pub fn invalid_raw(field: &str, printed: &str, detail: &str) -> Self {
        Self::make(field, ErrKind::Invalid, Some(printed.to_owned()), detail)
    }

    pub fn forbidden(field: &str, detail: &str) -> Self {
        Self::make(field, ErrKind::Forbidden, None, detail)
    }

    pub fn duplicate(field: &str, value: impl Into<Value>) -> Self {
        Self::make(field, ErrKind::Duplicate, Some(go_value(&value.into())), "")
    }

    pub fn too_many(field: &str, actual: usize, max: usize) -> Self {
        Self::make(
            field,
            ErrKind::TooMany,
            Some(actual.to_string()),
            &format!("must have at most {max} items"),
        )
    }

    pub fn too_long(field: &str, max: usize) -> Self {
        Self::make(
            field,
            ErrKind::TooLong,
            None,
            &format!("may not be more than {max} bytes"),
        )
    }

    pub fn not_supported(field: &str, value: impl Into<Value>, supported: &[&'static str]) -> Self {
        let mut e = Self::make(
            field,
            ErrKind::NotSupported,
            Some(go_value(&value.into())),
            "",
        );
        e.supported = supported.to_vec();
        e
    }

    /// The text after `field: `, which is also a cause's `message`.
    pub fn body(&self) -> String {
        let value = self.value.clone().unwrap_or_default();
        let mut s = match self.kind {
            ErrKind::Required => "Required value".to_owned(),
            ErrKind::Invalid => format!("Invalid value: {value}"),
            ErrKind::NotSupported => {
                let list = self
                    .supported
                    .iter()
                    .map(|v| format!("\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("Unsupported value: {value}: supported values: {list}")
            }
            ErrKind::Forbidden => "Forbidden".to_owned(),
            ErrKind::Duplicate => format!("Duplicate value: {value}"),
            ErrKind::TooMany => format!("Too many: {value}"),
            ErrKind::TooLong => "Too long".to_owned(),
        };
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// Go's `%#v`-ish rendering the server uses for simple values: strings quoted, numbers bare.
fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".to_owned(),
        other => other.to_string(),
    }
}

// ---- names ------------------------------------------------------------------------------

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn label_chars_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Problems with `s` as an RFC 1123 label (at most 63 characters); empty when it is one.
pub fn dns1123_label(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_owned());
    }
    if !label_chars_ok(s) {
        out.push(DNS1123_LABEL_MSG.to_owned());
    }
    out
}

/// Problems with `s` as an RFC 1123 subdomain (at most 253 characters).
pub fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 253 {
        out.push("must be no more than 253 characters".to_owned());
    }
    if s.is_empty() || !s.split('.').all(label_chars_ok) {
        out.push(DNS1123_SUBDOMAIN_MSG.to_owned());
    }
    out
}

/// Problems with `s` as an RFC 1035 label: what Service names must be.
pub fn dns1035_label(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_owned());
    }
    if !label_chars_ok(s) || !s.as_bytes()[0].is_ascii_lowercase() {
        out.push(DNS1035_LABEL_MSG.to_owned());
    }
    out
}

const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

fn name_part_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Problems with `s` as a qualified name (`prefix/name` or `name`): label keys, annotation
/// keys, `reportingController`.
pub fn qualified_name(s: &str) -> Vec<String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let mut out = Vec::new();
    if let Some(p) = prefix {
        if p.is_empty() {
            out.push("prefix part must be non-empty".to_owned());
        } else {
            for m in dns1123_subdomain(p) {
                out.push(format!("prefix part {m}"));
            }
        }
    }
    if name.is_empty() {
        out.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        out.push("name part must be no more than 63 characters".to_owned());
    } else if !name_part_ok(name) {
        out.push(QUALIFIED_NAME_MSG.to_owned());
    }
    out
}

/// Problems with `s` as a label value (may be empty).
pub fn label_value(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_owned());
    }
    if !name_part_ok(s) {
        out.push("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".to_owned());
    }
    out
}

// ---- small helpers ------------------------------------------------------------------------

/// Now as the server writes `metav1.Time`: RFC 3339, whole seconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// A random version-4 UUID, as the server puts in `metadata.uid`.
pub fn new_uid() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// The five characters `generateName` gets, from the server's alphabet (no vowels, so no
/// words).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
            r /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (Secret `data`).
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// URL-safe base64 without padding, as the server encodes `continue` tokens.
pub fn base64url_encode(bytes: &[u8]) -> String {
    base64_encode(bytes)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// Decodes URL-safe base64 without padding; `None` when it is not that.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | v as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
}
