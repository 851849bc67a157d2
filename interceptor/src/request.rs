//! Kubernetes RequestInfo: what an HTTP request means to the API server
//! (verb, API group, version, resource, subresource, namespace, name), parsed
//! with the API server's own rules (k8s.io/apiserver
//! `pkg/endpoints/request/requestinfo.go`, `RequestInfoFactory` with the API
//! prefixes `api` and `apis`, `api` being the groupless one).
//!
//! Every later stage (policy, mask, record, audit) consumes [`RequestInfo`],
//! so the rules here must match the API server's exactly: a request the API
//! server sees as `delete` on `pods` in `prod` must never look like something
//! else to chaperone.
//!
//! # One reading: the canonical request target
//!
//! The API server does not read the bytes of the request line: Go's
//! `net/http` parses them into `url.URL`, whose `Path` is percent-decoded
//! once (`%2F` included, upper or lower case hex; an invalid escape is a 400
//! before any handler), and `RequestInfo` (then go-restful's router, which
//! tokenizes the same decoded `URL.Path`) splits that decoded path on `/`.
//! The query is read with `url.ParseQuery`, which decodes keys as well as
//! values (`w%61tch=true` is `watch`).
//!
//! Chaperone does not try to predict, from the raw bytes, what the server
//! will make of them and then forward those bytes unchanged: two parsers of
//! one string always end up disagreeing somewhere (the server's Go version
//! decides whether `;` separates query parameters, for one). Instead
//! [`CanonicalTarget::parse`] decodes the target once, as Go does, judges the
//! decoded form, and the proxy forwards that decoded form re-encoded
//! unambiguously (every byte that Go's own `EscapedPath` would escape is
//! escaped, and nothing else; the query re-serialized pair by pair). What the
//! API server decodes from the forwarded target is, byte for byte, what
//! chaperone judged, whatever encoding the agent chose. Forwarding the
//! canonical form rather than refusing every non-canonical target keeps
//! ordinary clients working (a field selector's `%3D`, a `+` for a space)
//! while removing the ambiguity.
//!
//! A few targets have no single reading, or only one that some layer after
//! `RequestInfo` may read differently; those are refused with a 400 `Status`
//! instead (no client chaperone knows of sends them):
//! - an invalid escape (`%zz`, a lone `%`) in the path or query: Go refuses
//!   it in the path and silently drops the whole parameter in the query;
//! - a decoded path or query that is not UTF-8, or a decoded path with a
//!   control byte (`%00`, `%0A`): no Kubernetes name contains one;
//! - dot segments (`/./`, `/../`, encoded or not) and empty segments inside
//!   the path (`//`): the API server itself does not clean them (it is not
//!   behind Go's `ServeMux`), but an aggregated API server or a proxy behind
//!   it may, and then it would serve another object than the one judged;
//! - a raw `;` in the query: Go before 1.17 splits parameters on it, later
//!   versions drop the parameter.

use std::borrow::Cow;

use crate::kstatus::Status;

/// The API server's view of one request.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// `true` for `/api/...` and `/apis/...` resource requests; `false` for
    /// non-resource URLs such as `/version`, `/healthz` or `/openapi/v2`.
    pub is_resource_request: bool,
    /// The URL path, without the query.
    pub path: String,
    /// Kubernetes verb: `get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`, `proxy`, or for non-resource URLs the
    /// lowercased HTTP method (`get`, `post`, `head`, ...).
    pub verb: String,
    /// `api` or `apis`.
    pub api_prefix: String,
    /// Empty for the core group.
    pub api_group: String,
    pub api_version: String,
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    /// `path.split('/')` of the part after the prefix, as the API server keeps it.
    pub parts: Vec<String>,
    /// For `pods/exec` and `pods/attach`: the repeated `command` query
    /// parameters, URL-decoded, in order (the argv of the command to run).
    /// Empty otherwise.
    pub command: Vec<String>,
}

/// A request target (path and query) as the API server reads it, and the
/// form chaperone forwards so that the API server reads exactly that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalTarget {
    /// The decoded path: Go's `url.URL.Path`, what `RequestInfo` splits.
    pub path: String,
    /// The query re-encoded from its decoded parameters, in order; `None`
    /// when there are none.
    pub query: Option<String>,
    /// `path` re-encoded, and `?query`: what is forwarded.
    pub path_and_query: http::uri::PathAndQuery,
}

/// Why a request target has no single reading: a 400 for the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmbiguousTarget(String);

impl AmbiguousTarget {
    pub fn status(&self) -> Status {
        Status::bad_request(format!(
            "chaperone: {}; send the path and query the way kubectl and client libraries do",
            self.0
        ))
    }
}

impl std::fmt::Display for AmbiguousTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl CanonicalTarget {
    /// Decodes `path` and `query` (raw, as received) the way the API server
    /// does, or says why the target has no single reading.
    pub fn parse(path: &str, query: Option<&str>) -> Result<CanonicalTarget, AmbiguousTarget> {
        // An authority-form (`version`, `host:443`) or asterisk-form (`*`)
        // target has no path for the API server (Go answers 400); hyper
        // hands it over with an empty path, which would be forwarded as `/`.
        if !path.starts_with('/') {
            return Err(AmbiguousTarget(
                "the request target is not an absolute path".into(),
            ));
        }
        let path = decode_path(path)?;
        let pairs = decode_query(query.unwrap_or(""))?;
        let query = (!pairs.is_empty()).then(|| {
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&pairs)
                .finish()
        });
        let mut target = encode_path(&path);
        if let Some(query) = &query {
            target.push('?');
            target.push_str(query);
        }
        let path_and_query = target
            .parse()
            .map_err(|_| AmbiguousTarget("the request target cannot be re-encoded".into()))?;
        Ok(CanonicalTarget {
            path,
            query,
            path_and_query,
        })
    }

    /// The target as forwarded: `uri` with its path and query replaced by
    /// the canonical ones (scheme and authority, if any, kept).
    pub fn uri(&self, uri: &http::Uri) -> http::Uri {
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = Some(self.path_and_query.clone());
        http::Uri::from_parts(parts).unwrap_or_else(|_| {
            http::Uri::from_maybe_shared(self.path_and_query.as_str().to_owned().into_bytes())
                .expect("a path and query is a URI")
        })
    }
}

/// The value of one hex digit, as Go's `unhex` (either case).
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A `%` not followed by two hex digits (the bytes from the `%`, at most 3).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid escape {0:?}")]
struct InvalidEscape(String);

/// Go's `unescape`: every `%XX` decoded once; `+` stays `+` in a path and is
/// a space in a query component. An invalid escape is an error.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<Vec<u8>, InvalidEscape> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => {
                        // By bytes: the escape may end inside a multi-byte
                        // character (found by the `request` fuzz target).
                        let bad = String::from_utf8_lossy(&bytes[i..(i + 3).min(bytes.len())]);
                        return Err(InvalidEscape(bad.into_owned()));
                    }
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The decoded path (Go's `URL.Path`), refused where its reading is not
/// unique (see the module documentation).
fn decode_path(raw: &str) -> Result<String, AmbiguousTarget> {
    let bytes = percent_decode(raw, false)
        .map_err(|e| AmbiguousTarget(format!("the request path has an {e}")))?;
    let path = String::from_utf8(bytes)
        .map_err(|_| AmbiguousTarget("the decoded request path is not UTF-8".into()))?;
    if path.chars().any(char::is_control) {
        return Err(AmbiguousTarget(
            "the decoded request path contains a control character".into(),
        ));
    }
    // Interior segments only: `splitPath` trims `/` at both ends, so a
    // trailing slash (`/api/v1/pods/`) reads as the same request.
    let trimmed = path.trim_matches('/');
    if !trimmed.is_empty() {
        for segment in trimmed.split('/') {
            match segment {
                "" => {
                    return Err(AmbiguousTarget(
                        "the decoded request path has an empty segment (\"//\")".into(),
                    ));
                }
                "." | ".." => {
                    return Err(AmbiguousTarget(format!(
                        "the decoded request path has a {segment:?} segment"
                    )));
                }
                _ => {}
            }
        }
    }
    Ok(path)
}

/// The query's parameters as `url.ParseQuery` reads them (split on `&`,
/// keys and values decoded, `+` a space, empty pairs skipped), refused where
/// Go versions or parameters would disagree (see the module documentation).
fn decode_query(raw: &str) -> Result<Vec<(String, String)>, AmbiguousTarget> {
    if raw.contains(';') {
        return Err(AmbiguousTarget(
            "the query contains a raw \";\" (escape it as %3B)".into(),
        ));
    }
    let mut pairs = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| -> Result<String, AmbiguousTarget> {
            let bytes = percent_decode(s, true)
                .map_err(|e| AmbiguousTarget(format!("the query has an {e}")))?;
            String::from_utf8(bytes)
                .map_err(|_| AmbiguousTarget("a decoded query parameter is not UTF-8".into()))
        };
        pairs.push((decode(key)?, decode(value)?));
    }
    Ok(pairs)
}

/// Go's `shouldEscape(c, encodePath)` is false: unreserved characters and
/// the reserved ones a path may carry as they are.
fn path_byte_is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.~$&+,/:;=@".contains(&b)
}

/// The decoded path re-encoded as Go's `EscapedPath` would encode it: the
/// API server decodes it back to exactly `path`.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if path_byte_is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Verbs that may appear as a path segment before the resource
/// (`/api/v1/watch/pods`, `/api/v1/proxy/namespaces/x/pods/y`). Both are
/// deprecated URL forms the API server still serves.
const SPECIAL_VERBS: [&str; 2] = ["proxy", "watch"];
/// Special verbs whose trailing path is never a subresource.
const SPECIAL_VERBS_NO_SUBRESOURCES: [&str; 1] = ["proxy"];
/// Subresources of a namespace (`/api/v1/namespaces/x/status`); any other
/// segment after `namespaces/x` is a namespaced resource.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

impl RequestInfo {
    /// Parses a request from its canonical target, as the API server does.
    pub fn from_target(method: &http::Method, target: &CanonicalTarget) -> RequestInfo {
        RequestInfo::parse(method, &target.path, target.query.as_deref())
    }

    /// Parses a request as the API server does.
    ///
    /// `path` is the *decoded* URL path without the query (Go's
    /// `URL.Path`; see [`CanonicalTarget`]), never the raw one; `query` the
    /// encoded query string (without `?`), if any. Parsing never fails:
    /// anything that is not a resource URL is a non-resource request whose
    /// verb is the lowercased HTTP method, exactly as in the API server.
    pub fn parse(method: &http::Method, path: &str, query: Option<&str>) -> RequestInfo {
        let mut info = RequestInfo {
            is_resource_request: false,
            path: path.to_owned(),
            verb: method.as_str().to_ascii_lowercase(),
            ..RequestInfo::default()
        };

        let parts = split_path(path);
        if parts.len() < 3 {
            return info;
        }
        let prefix = parts[0];
        if prefix != "api" && prefix != "apis" {
            return info;
        }
        let mut current = &parts[1..];
        let mut api_group = "";
        if prefix != "api" {
            // One part (the prefix) is consumed: "do we have four parts?"
            if current.len() < 3 {
                return info;
            }
            api_group = current[0];
            current = &current[1..];
        }

        info.is_resource_request = true;
        info.api_prefix = prefix.to_owned();
        info.api_group = api_group.to_owned();
        info.api_version = current[0].to_owned();
        current = &current[1..];

        // `/{specialVerb}/...`
        if SPECIAL_VERBS.contains(&current[0]) {
            if current.len() < 2 {
                // The API server refuses this URL ("unable to determine kind
                // and namespace"); keep the verb so policy can still deny it.
                info.verb = current[0].to_owned();
                return info;
            }
            info.verb = current[0].to_owned();
            current = &current[1..];
        } else {
            info.verb = match *method {
                http::Method::POST => "create",
                http::Method::GET | http::Method::HEAD => "get",
                http::Method::PUT => "update",
                http::Method::PATCH => "patch",
                http::Method::DELETE => "delete",
                _ => "",
            }
            .to_owned();
        }

        // `/namespaces/{namespace}/{resource}/...`: parts become relative to
        // the resource, unless the namespace itself is the resource.
        if current[0] == "namespaces" && current.len() > 1 {
            info.namespace = current[1].to_owned();
            if current.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&current[2]) {
                current = &current[2..];
            }
        }
        info.parts = current.iter().map(|p| (*p).to_owned()).collect();

        // resource/name/subresource/other/stuff/we/do/not/interpret
        let parts = &info.parts;
        if parts.len() >= 3 && !SPECIAL_VERBS_NO_SUBRESOURCES.contains(&info.verb.as_str()) {
            info.subresource = parts[2].clone();
        }
        if parts.len() >= 2 {
            info.name = parts[1].clone();
        }
        if !parts.is_empty() {
            info.resource = parts[0].clone();
        }

        // No name and a get: it is a list or a watch.
        if info.name.is_empty() && info.verb == "get" {
            let options = ListOptions::from_query(query);
            info.verb = if options.watch { "watch" } else { "list" }.to_owned();
            if let Some(name) = options.metadata_name
                && is_valid_path_segment_name(&name)
            {
                info.name = name;
            }
        }
        // No name and a delete: it is a deletecollection.
        if info.name.is_empty() && info.verb == "delete" {
            info.verb = "deletecollection".to_owned();
        }

        if info.resource == "pods" && (info.subresource == "exec" || info.subresource == "attach") {
            info.command = query_values(query, "command").collect();
        }
        info
    }

    /// `resource` or `resource/subresource`, as RBAC and policies name it.
    pub fn resource_path(&self) -> Cow<'_, str> {
        if self.subresource.is_empty() {
            Cow::Borrowed(&self.resource)
        } else {
            Cow::Owned(format!("{}/{}", self.resource, self.subresource))
        }
    }
}

/// The API server's `splitPath`: trim `/` at both ends, split on `/`; the
/// empty path has no parts.
fn split_path(path: &str) -> Vec<&str> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    }
}

/// All values of one query parameter, URL-decoded (`+` is a space), in order.
fn query_values<'q>(query: Option<&'q str>, key: &'q str) -> impl Iterator<Item = String> + 'q {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(move |(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The two list options that change the RequestInfo of a collection GET.
struct ListOptions {
    watch: bool,
    metadata_name: Option<String>,
}

impl ListOptions {
    /// As the API server's parameter codec decodes them: `watch` is true for
    /// any first value other than `false` or `0` (so `?watch`, `?watch=1`,
    /// `?watch=true`); a `fieldSelector` requiring `metadata.name` to equal a
    /// value names the single object of the list. When any list option does
    /// not decode (a field or label selector that does not parse, a `limit`
    /// or `timeoutSeconds` that is not an integer), the whole decoding fails,
    /// and then only `watch` counts.
    fn from_query(query: Option<&str>) -> ListOptions {
        let first = |key| query_values(query, key).next();
        let watch = first("watch")
            .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0"));
        let integers_decode = ["limit", "timeoutSeconds"]
            .into_iter()
            .all(|key| first(key).is_none_or(|v| v.parse::<i64>().is_ok()));
        let labels_decode = first("labelSelector").is_none_or(|s| label_selector_parses(&s));
        let metadata_name = match first("fieldSelector") {
            Some(selector) if integers_decode && labels_decode => {
                field_selector_exact_match(&selector, "metadata.name")
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        ListOptions {
            watch,
            metadata_name,
        }
    }
}

/// `fields.ParseSelector(selector).RequiresExactMatch(field)`: `Err` when the
/// selector does not parse, `Ok(Some(value))` when one of its terms is
/// `field=value` or `field==value` (the first such term once the terms are
/// sorted, as `fields.parseSelector` sorts them).
fn field_selector_exact_match(selector: &str, field: &str) -> Result<Option<String>, ()> {
    let mut terms = split_unescaped(selector, ',');
    terms.sort_unstable();
    let mut found = None;
    for term in terms {
        if term.is_empty() {
            // `fields.ParseSelector` skips empty terms.
            continue;
        }
        let (lhs, op, rhs) = split_term(term).ok_or(())?;
        let value = unescape_field_value(rhs)?;
        if found.is_none() && lhs == field && (op == "=" || op == "==") {
            found = Some(value);
        }
    }
    Ok(found)
}

/// Splits on `sep` where it is not escaped with a backslash.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// One field selector term: `lhs!=rhs`, `lhs==rhs` or `lhs=rhs`, at the first
/// operator, as `fields.splitTerm` does (which does not skip escaped
/// characters: in `a\=b=c` the operator is the first `=`).
fn split_term(term: &str) -> Option<(&str, &'static str, &str)> {
    for (i, _) in term.char_indices() {
        for op in ["!=", "==", "="] {
            if term[i..].starts_with(op) {
                return Some((&term[..i], op, &term[i + op.len()..]));
            }
        }
    }
    None
}

/// `fields.UnescapeValue`: `\\`, `\,` and `\=` are the only escapes.
fn unescape_field_value(value: &str) -> Result<String, ()> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                _ => return Err(()),
            }
        } else if c == ',' || c == '=' {
            return Err(());
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// `path.IsValidPathSegmentName`: not `.` or `..`, no `/` or `%`.
fn is_valid_path_segment_name(name: &str) -> bool {
    name != "." && name != ".." && !name.contains('/') && !name.contains('%')
}

/// `labels.Parse(selector)` succeeds: a port of the API server's label
/// selector lexer and parser (k8s.io/apimachinery `pkg/labels/selector.go`),
/// byte for byte, with its key and value validation. Only whether it parses
/// matters here: a selector that does not fails the decoding of every list
/// option (see [`ListOptions::from_query`]).
fn label_selector_parses(selector: &str) -> bool {
    LabelParser::new(selector).parse().is_some()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LabelToken {
    End,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

/// `string2token`.
fn label_keyword(s: &[u8]) -> Option<LabelToken> {
    Some(match s {
        b")" => LabelToken::ClosedPar,
        b"," => LabelToken::Comma,
        b"!" => LabelToken::DoesNotExist,
        b"==" => LabelToken::DoubleEquals,
        b"=" => LabelToken::Equals,
        b">" => LabelToken::GreaterThan,
        b"in" => LabelToken::In,
        b"<" => LabelToken::LessThan,
        b"!=" => LabelToken::NotEquals,
        b"notin" => LabelToken::NotIn,
        b"(" => LabelToken::OpenPar,
        _ => return None,
    })
}

fn label_special(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

fn label_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

struct LabelParser<'s> {
    items: Vec<(LabelToken, &'s [u8])>,
    position: usize,
}

impl<'s> LabelParser<'s> {
    /// Lexes all of `s` (`Parser.scan`).
    fn new(s: &'s str) -> LabelParser<'s> {
        let s = s.as_bytes();
        let mut pos = 0;
        // `Lexer.read`: a NUL byte reads as the end of the string.
        let read = |pos: &mut usize| -> u8 {
            if *pos < s.len() {
                *pos += 1;
                s[*pos - 1]
            } else {
                0
            }
        };
        let mut items = Vec::new();
        loop {
            let mut ch = read(&mut pos);
            while label_whitespace(ch) {
                ch = read(&mut pos);
            }
            let item = if ch == 0 {
                (LabelToken::End, &s[..0])
            } else if label_special(ch) {
                pos -= 1;
                let start = pos;
                let mut last = None;
                loop {
                    let ch = read(&mut pos);
                    if ch == 0 {
                        break;
                    }
                    if !label_special(ch) {
                        pos -= 1;
                        break;
                    }
                    match label_keyword(&s[start..pos]) {
                        Some(token) => last = Some((token, &s[start..pos])),
                        None if last.is_some() => {
                            pos -= 1;
                            break;
                        }
                        None => {}
                    }
                }
                // Every special symbol is a token of its own.
                last.unwrap_or((LabelToken::End, &s[..0]))
            } else {
                pos -= 1;
                let start = pos;
                let mut end;
                loop {
                    end = pos;
                    let ch = read(&mut pos);
                    if ch == 0 {
                        break;
                    }
                    if label_special(ch) || label_whitespace(ch) {
                        pos -= 1;
                        end = pos;
                        break;
                    }
                }
                let word = &s[start..end];
                (label_keyword(word).unwrap_or(LabelToken::Identifier), word)
            };
            items.push(item);
            if item.0 == LabelToken::End {
                break;
            }
        }
        LabelParser { items, position: 0 }
    }

    /// `lookahead(Values)`: `in` and `notin` are identifiers there.
    fn lookahead_value(&self) -> (LabelToken, &'s [u8]) {
        let (token, literal) = self.items[self.position.min(self.items.len() - 1)];
        match token {
            LabelToken::In | LabelToken::NotIn => (LabelToken::Identifier, literal),
            _ => (token, literal),
        }
    }

    fn consume_value(&mut self) -> (LabelToken, &'s [u8]) {
        let item = self.lookahead_value();
        self.position += 1;
        item
    }

    /// `consume(KeyAndOperator)`: keywords stay keywords.
    fn consume_operator(&mut self) -> LabelToken {
        let (token, _) = self.items[self.position.min(self.items.len() - 1)];
        self.position += 1;
        token
    }

    fn parse(&mut self) -> Option<()> {
        loop {
            match self.lookahead_value().0 {
                LabelToken::Identifier | LabelToken::DoesNotExist => {
                    self.requirement()?;
                    match self.consume_value().0 {
                        LabelToken::End => return Some(()),
                        LabelToken::Comma => {
                            if !matches!(
                                self.lookahead_value().0,
                                LabelToken::Identifier | LabelToken::DoesNotExist
                            ) {
                                return None;
                            }
                        }
                        _ => return None,
                    }
                }
                LabelToken::End => return Some(()),
                _ => return None,
            }
        }
    }

    fn requirement(&mut self) -> Option<()> {
        let (mut token, mut key) = self.consume_value();
        let mut unary = false;
        if token == LabelToken::DoesNotExist {
            unary = true;
            (token, key) = self.consume_value();
        }
        if token != LabelToken::Identifier || !label_key_is_valid(key) {
            return None;
        }
        if matches!(
            self.lookahead_value().0,
            LabelToken::End | LabelToken::Comma
        ) {
            unary = true;
        }
        if unary {
            return Some(());
        }
        let values: Vec<&[u8]> = match self.consume_operator() {
            LabelToken::In | LabelToken::NotIn => self.set_values()?,
            LabelToken::GreaterThan | LabelToken::LessThan => {
                let value = self.exact_value()?;
                std::str::from_utf8(value).ok()?.parse::<i64>().ok()?;
                vec![value]
            }
            LabelToken::Equals | LabelToken::DoubleEquals | LabelToken::NotEquals => {
                vec![self.exact_value()?]
            }
            _ => return None,
        };
        values.iter().all(|v| label_value_is_valid(v)).then_some(())
    }

    /// `parseValues`: `(a,b)`, `()`, `(,)` and the like.
    fn set_values(&mut self) -> Option<Vec<&'s [u8]>> {
        if self.consume_value().0 != LabelToken::OpenPar {
            return None;
        }
        match self.lookahead_value().0 {
            LabelToken::Identifier | LabelToken::Comma => {
                let mut values = Vec::new();
                loop {
                    match self.consume_value() {
                        (LabelToken::Identifier, value) => {
                            values.push(value);
                            match self.lookahead_value().0 {
                                LabelToken::Comma => {}
                                LabelToken::ClosedPar => break,
                                _ => return None,
                            }
                        }
                        (LabelToken::Comma, _) => {
                            values.push(b"");
                            match self.lookahead_value().0 {
                                LabelToken::ClosedPar => break,
                                LabelToken::Comma => {
                                    self.consume_value();
                                }
                                _ => {}
                            }
                        }
                        _ => return None,
                    }
                }
                (self.consume_value().0 == LabelToken::ClosedPar).then_some(values)
            }
            LabelToken::ClosedPar => {
                self.consume_value();
                Some(vec![b""])
            }
            _ => None,
        }
    }

    /// `parseExactValue`: one identifier, or nothing before `,` or the end.
    fn exact_value(&mut self) -> Option<&'s [u8]> {
        if matches!(
            self.lookahead_value().0,
            LabelToken::End | LabelToken::Comma
        ) {
            return Some(b"");
        }
        match self.consume_value() {
            (LabelToken::Identifier, value) => Some(value),
            _ => None,
        }
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 bytes, not empty.
fn label_name_is_valid(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name[0].is_ascii_alphanumeric()
        && name[name.len() - 1].is_ascii_alphanumeric()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `validation.IsQualifiedName`: `[prefix/]name`, the prefix a DNS-1123
/// subdomain.
fn label_key_is_valid(key: &[u8]) -> bool {
    let parts: Vec<&[u8]> = key.split(|b| *b == b'/').collect();
    match parts.as_slice() {
        [name] => label_name_is_valid(name),
        [prefix, name] => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split(|b| *b == b'.').all(|label| {
                    !label.is_empty()
                        && label[0].is_ascii_alphanumeric()
                        && label[label.len() - 1].is_ascii_alphanumeric()
                        && label
                            .iter()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                        && !label.iter().any(u8::is_ascii_uppercase)
                })
                && label_name_is_valid(name)
        }
        _ => false,
    }
}

/// `validation.IsValidLabelValue`: empty, or a valid name.
fn label_value_is_valid(value: &[u8]) -> bool {
    value.is_empty() || label_name_is_valid(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: &str, url: &str) -> RequestInfo {
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        RequestInfo::parse(&method, path, query)
    }

    /// `TestGetAPIRequestInfo` success cases from requestinfo_test.go:
    /// method, url, verb, prefix, group, version, namespace, resource,
    /// subresource, name, parts.
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    );
    #[rustfmt::skip]
    const API_SERVER_CASES: &[Case] = &[
        // resource paths
        ("GET", "/api/v1/namespaces", "list", "api", "", "v1", "", "namespaces", "", "", &["namespaces"]),
        ("GET", "/api/v1/namespaces/other", "get", "api", "", "v1", "other", "namespaces", "", "other", &["namespaces", "other"]),
        ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("HEAD", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        // special verbs
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo", "subpath", "not", "a", "subresource"]),
        ("GET", "/api/v1/watch/pods", "watch", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/pods?watch=true", "watch", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/pods?watch=false", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        // subresource identification
        ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "api", "", "v1", "other", "pods", "status", "foo", &["pods", "foo", "status"]),
        ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "api", "", "v1", "other", "pods", "proxy", "foo", &["pods", "foo", "proxy", "subpath"]),
        ("PUT", "/api/v1/namespaces/other/finalize", "update", "api", "", "v1", "other", "namespaces", "finalize", "other", &["namespaces", "other", "finalize"]),
        ("PUT", "/api/v1/namespaces/other/status", "update", "api", "", "v1", "other", "namespaces", "status", "other", &["namespaces", "other", "status"]),
        // verb identification
        ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("POST", "/api/v1/namespaces/other/pods", "create", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        // deletecollection verb identification
        ("DELETE", "/api/v1/nodes", "deletecollection", "api", "", "v1", "", "nodes", "", "", &["nodes"]),
        ("DELETE", "/api/v1/namespaces", "deletecollection", "api", "", "v1", "", "namespaces", "", "", &["namespaces"]),
        ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "apis", "extensions", "v1", "other", "pods", "", "", &["pods"]),
        // api group identification
        ("POST", "/apis/extensions/v1/namespaces/other/pods", "create", "apis", "extensions", "v1", "other", "pods", "", "", &["pods"]),
        // api version identification
        ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "apis", "extensions", "v1beta3", "other", "pods", "", "", &["pods"]),
        // what kubectl and client libraries send every day
        ("GET", "/apis/apps/v1/namespaces/prod-a/deployments/web", "get", "apis", "apps", "v1", "prod-a", "deployments", "", "web", &["deployments", "web"]),
        ("PUT", "/apis/apps/v1/namespaces/prod-a/deployments/web/scale", "update", "apis", "apps", "v1", "prod-a", "deployments", "scale", "web", &["deployments", "web", "scale"]),
        ("GET", "/apis/apps/v1/deployments?limit=500", "list", "apis", "apps", "v1", "", "deployments", "", "", &["deployments"]),
        ("GET", "/api/v1/namespaces/default/pods/web-0/log?follow=true&container=app", "get", "api", "", "v1", "default", "pods", "log", "web-0", &["pods", "web-0", "log"]),
        ("POST", "/api/v1/namespaces/default/pods/web-0/exec?command=ls", "create", "api", "", "v1", "default", "pods", "exec", "web-0", &["pods", "web-0", "exec"]),
        ("GET", "/api/v1/namespaces/default/pods/web-0/exec?command=ls", "get", "api", "", "v1", "default", "pods", "exec", "web-0", &["pods", "web-0", "exec"]),
        ("POST", "/api/v1/namespaces/default/pods/web-0/portforward", "create", "api", "", "v1", "default", "pods", "portforward", "web-0", &["pods", "web-0", "portforward"]),
        ("PATCH", "/api/v1/namespaces/default/configmaps/c?fieldManager=kubectl", "patch", "api", "", "v1", "default", "configmaps", "", "c", &["configmaps", "c"]),
        ("GET", "/apis/apps/v1/namespaces/default/deployments?watch", "watch", "apis", "apps", "v1", "default", "deployments", "", "", &["deployments"]),
        ("GET", "/api/v1/namespaces/default/pods/foo?watch=true", "get", "api", "", "v1", "default", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/namespaces/default/pods?watch=True", "watch", "api", "", "v1", "default", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/default/pods?watch=FALSE", "list", "api", "", "v1", "default", "pods", "", "", &["pods"]),
        ("DELETE", "/api/v1/namespaces/prod-a", "delete", "api", "", "v1", "prod-a", "namespaces", "", "prod-a", &["namespaces", "prod-a"]),
        ("POST", "/api/v1/namespaces", "create", "api", "", "v1", "", "namespaces", "", "", &["namespaces"]),
        ("GET", "/apis/chaperone.dev/v1alpha1/agentpolicies/p1/status", "get", "apis", "chaperone.dev", "v1alpha1", "", "agentpolicies", "status", "p1", &["agentpolicies", "p1", "status"]),
        ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", "create", "apis", "authorization.k8s.io", "v1", "", "selfsubjectaccessreviews", "", "", &["selfsubjectaccessreviews"]),
        ("OPTIONS", "/api/v1/namespaces/other/pods", "", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods/", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
    ];

    #[test]
    fn resource_requests_parse_as_the_api_server_does() {
        for &(method, url, verb, prefix, group, version, ns, resource, sub, name, parts) in
            API_SERVER_CASES
        {
            let info = parse(method, url);
            let want = RequestInfo {
                is_resource_request: true,
                path: url.split('?').next().unwrap().to_owned(),
                verb: verb.into(),
                api_prefix: prefix.into(),
                api_group: group.into(),
                api_version: version.into(),
                namespace: ns.into(),
                resource: resource.into(),
                subresource: sub.into(),
                name: name.into(),
                parts: parts.iter().map(|p| p.to_string()).collect(),
                command: info.command.clone(),
            };
            assert_eq!(info, want, "{method} {url}");
        }
    }

    /// `TestGetAPIRequestInfo` error cases and `TestGetNonAPIRequestInfo`:
    /// these are non-resource requests.
    #[test]
    fn short_or_foreign_paths_are_non_resource_requests() {
        for (url, resource) in [
            ("/", false),
            ("", false),
            ("/api/version/", false),
            ("/apis/group/version/", false),
            ("/badprefix/version/resource", false),
            ("/apis/version/resource", false),
            ("/not-api/version/resource", false),
            ("/apis/extensions/v1beta1", false),
            ("/apis/extensions/v1beta1/", false),
            ("/api/version", false),
            ("/api/", false),
            ("/api/version/resource", true),
            ("/apis/group/version/resource/name/subresource", true),
            ("/api/version/resource/name/subresource", true),
            ("/apis/batch/v1/job", true),
            ("/apis/batch/v1/job/foo", true),
            ("/apis/batch/v1/job/foo/scale", true),
        ] {
            assert_eq!(parse("GET", url).is_resource_request, resource, "{url}");
        }
    }

    #[test]
    fn non_resource_urls_keep_the_lowercased_method_as_verb() {
        for (method, url, verb) in [
            ("GET", "/version", "get"),
            ("GET", "/api", "get"),
            ("GET", "/api/v1", "get"),
            ("GET", "/apis", "get"),
            ("GET", "/apis/apps", "get"),
            ("GET", "/apis/apps/v1", "get"),
            ("GET", "/openapi/v2", "get"),
            ("GET", "/openapi/v3/apis/apps/v1", "get"),
            ("GET", "/healthz", "get"),
            ("GET", "/livez", "get"),
            ("GET", "/readyz", "get"),
            ("GET", "/metrics", "get"),
            ("GET", "/.well-known/openid-configuration", "get"),
            ("GET", "/openid/v1/jwks", "get"),
            ("HEAD", "/healthz", "head"),
            ("POST", "/logs", "post"),
        ] {
            let info = parse(method, url);
            assert!(!info.is_resource_request, "{url}");
            assert_eq!(info.verb, verb, "{method} {url}");
            assert_eq!(info.path, url);
            assert_eq!(info.resource, "", "{url}");
            assert_eq!(info.api_group, "", "{url}");
        }
    }

    /// `TestFieldSelectorParsing` from requestinfo_test.go plus encodings
    /// clients use: the verb stays list/watch, the name is set.
    #[test]
    fn a_metadata_name_field_selector_names_the_single_item() {
        for (url, verb, name) in [
            ("/apis/group/version/resource", "list", ""),
            (
                "/apis/group/version/resource?fieldSelector=metadata.name=name1",
                "list",
                "name1",
            ),
            (
                "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1",
                "watch",
                "name1",
            ),
            (
                "/apis/group/version/resource?fieldSelector=foo=bar",
                "list",
                "",
            ),
            (
                "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo",
                "list",
                "",
            ),
            (
                "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=true",
                "watch",
                "",
            ),
            (
                "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=false",
                "list",
                "",
            ),
            (
                "/api/v1/namespaces/a/secrets?fieldSelector=metadata.name%3Dtoken&watch=1",
                "watch",
                "token",
            ),
            (
                "/api/v1/namespaces/a/secrets?fieldSelector=metadata.name%3D%3Dtoken",
                "list",
                "token",
            ),
            (
                "/api/v1/namespaces/a/secrets?fieldSelector=type%3Dopaque%2Cmetadata.name%3Dtoken",
                "list",
                "token",
            ),
            (
                "/api/v1/namespaces/a/secrets?fieldSelector=metadata.name!%3Dtoken",
                "list",
                "",
            ),
            // not a valid path segment name: ignored as the API server does
            (
                "/api/v1/namespaces/a/secrets?fieldSelector=metadata.name%3D..",
                "list",
                "",
            ),
        ] {
            let info = parse("GET", url);
            assert_eq!(
                (info.verb.as_str(), info.name.as_str()),
                (verb, name),
                "{url}"
            );
        }
    }

    #[test]
    fn exec_commands_are_url_decoded_in_order() {
        let info = parse(
            "POST",
            "/api/v1/namespaces/prod/pods/web-0/exec?command=sh&command=-c&command=rm+-rf+%2Fdata&container=app&stdin=true&tty=true",
        );
        assert_eq!(info.subresource, "exec");
        assert_eq!(info.command, ["sh", "-c", "rm -rf /data"]);

        let attach = parse(
            "POST",
            "/api/v1/namespaces/prod/pods/web-0/attach?container=app&stdin=true",
        );
        assert!(attach.command.is_empty());

        // `command` on anything but exec/attach is not a command.
        let list = parse("GET", "/api/v1/namespaces/prod/pods?command=ls");
        assert!(list.command.is_empty());
    }

    /// What the API server reads (and chaperone forwards) for a raw target.
    fn canonical(method: &str, url: &str) -> (RequestInfo, String) {
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        let target = CanonicalTarget::parse(path, query).unwrap_or_else(|e| panic!("{url}: {e}"));
        (
            RequestInfo::from_target(&method, &target),
            target.path_and_query.to_string(),
        )
    }

    fn refused(url: &str) -> String {
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        match CanonicalTarget::parse(path, query) {
            Ok(target) => panic!("{url} was not refused: read as {target:?}"),
            Err(e) => {
                let status = e.status();
                assert_eq!(status.code, 400, "{url}");
                status.message
            }
        }
    }

    /// Percent-encoded paths are read as the API server decodes them (once,
    /// `%2F` included, either hex case) and forwarded in the one form that
    /// decodes to the same thing.
    #[test]
    fn encoded_paths_are_read_and_forwarded_as_the_api_server_decodes_them() {
        for (url, ns, resource, name, sub, forwarded) in [
            (
                "/api/v1/namespaces/prod/secr%65ts",
                "prod",
                "secrets",
                "",
                "",
                "/api/v1/namespaces/prod/secrets",
            ),
            (
                "/api/v1/namespaces/prod/secr%65ts/db",
                "prod",
                "secrets",
                "db",
                "",
                "/api/v1/namespaces/prod/secrets/db",
            ),
            (
                "/api/v1/namespaces/prod/SECR%45TS/db",
                "prod",
                "SECRETS",
                "db",
                "",
                "/api/v1/namespaces/prod/SECRETS/db",
            ),
            (
                "/api/v1/namespaces/prod/secrets%2Fdb",
                "prod",
                "secrets",
                "db",
                "",
                "/api/v1/namespaces/prod/secrets/db",
            ),
            (
                "/api/v1/namespaces/prod/secrets%2fdb",
                "prod",
                "secrets",
                "db",
                "",
                "/api/v1/namespaces/prod/secrets/db",
            ),
            (
                "/api/v1/namespaces%2Fprod%2Fsecrets",
                "prod",
                "secrets",
                "",
                "",
                "/api/v1/namespaces/prod/secrets",
            ),
            (
                "/api/v1/namespaces%2fprod%2fsecrets%2fdb",
                "prod",
                "secrets",
                "db",
                "",
                "/api/v1/namespaces/prod/secrets/db",
            ),
            (
                "/%61pi/v1/namespaces/prod/secrets/db",
                "prod",
                "secrets",
                "db",
                "",
                "/api/v1/namespaces/prod/secrets/db",
            ),
            (
                "/api/v1/n%61mespaces/prod/pods/web/%65xec",
                "prod",
                "pods",
                "web",
                "exec",
                "/api/v1/namespaces/prod/pods/web/exec",
            ),
            (
                "/api/v1/namespaces/pr%6Fd/secrets/db",
                "prod",
                "secrets",
                "db",
                "",
                "/api/v1/namespaces/prod/secrets/db",
            ),
            // Go decodes once: `%252F` is the three characters `%2F`, a name.
            (
                "/api/v1/namespaces/prod/secrets/a%252Fb",
                "prod",
                "secrets",
                "a%2Fb",
                "",
                "/api/v1/namespaces/prod/secrets/a%252Fb",
            ),
            // `+` is not a space in a path.
            (
                "/api/v1/namespaces/prod/secrets/a+b",
                "prod",
                "secrets",
                "a+b",
                "",
                "/api/v1/namespaces/prod/secrets/a+b",
            ),
            // A trailing slash is trimmed by the API server as by chaperone.
            (
                "/api/v1/namespaces/prod/secrets/",
                "prod",
                "secrets",
                "",
                "",
                "/api/v1/namespaces/prod/secrets/",
            ),
            (
                "/api/v1/namespaces/prod/secrets%2F",
                "prod",
                "secrets",
                "",
                "",
                "/api/v1/namespaces/prod/secrets/",
            ),
            // Characters Go escapes in a path are forwarded escaped.
            (
                "/api/v1/namespaces/prod/secrets/a%20b",
                "prod",
                "secrets",
                "a b",
                "",
                "/api/v1/namespaces/prod/secrets/a%20b",
            ),
            (
                "/api/v1/namespaces/prod/secrets/a%3Fb",
                "prod",
                "secrets",
                "a?b",
                "",
                "/api/v1/namespaces/prod/secrets/a%3Fb",
            ),
            (
                "/api/v1/namespaces/prod/secrets/caf%C3%A9",
                "prod",
                "secrets",
                "café",
                "",
                "/api/v1/namespaces/prod/secrets/caf%C3%A9",
            ),
            // What Go leaves as it is stays as it is.
            (
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:aggregate-to-admin",
                "",
                "clusterroles",
                "system:aggregate-to-admin",
                "",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:aggregate-to-admin",
            ),
        ] {
            let (info, sent) = canonical("GET", url);
            assert_eq!(
                (
                    info.namespace.as_str(),
                    info.resource.as_str(),
                    info.name.as_str(),
                    info.subresource.as_str()
                ),
                (ns, resource, name, sub),
                "{url}"
            );
            assert_eq!(sent, forwarded, "{url}");
            // The forwarded form is canonical: read again, it is unchanged.
            let (again, resent) = canonical("GET", &sent);
            assert_eq!((again, resent), (info, sent.clone()), "{url}");
        }
    }

    #[test]
    fn legacy_watch_and_proxy_forms_are_read_after_decoding() {
        let (info, sent) = canonical("GET", "/api/v1/%77atch/namespaces/prod/secrets");
        assert_eq!(
            (info.verb.as_str(), info.resource.as_str()),
            ("watch", "secrets")
        );
        assert_eq!(sent, "/api/v1/watch/namespaces/prod/secrets");
        let (info, _) = canonical("GET", "/api/v1/watch%2Fnamespaces%2Fprod%2Fsecrets%2Fdb");
        assert_eq!(
            (
                info.verb.as_str(),
                info.namespace.as_str(),
                info.name.as_str()
            ),
            ("watch", "prod", "db")
        );
        let (info, sent) = canonical("GET", "/api/v1/pr%6Fxy/namespaces/prod/pods/web/a%2Fb");
        assert_eq!(
            (
                info.verb.as_str(),
                info.resource.as_str(),
                info.name.as_str()
            ),
            ("proxy", "pods", "web")
        );
        assert_eq!(info.parts, ["pods", "web", "a", "b"]);
        assert_eq!(sent, "/api/v1/proxy/namespaces/prod/pods/web/a/b");
    }

    /// The query is read as `url.ParseQuery` reads it (keys decoded too) and
    /// forwarded re-encoded from that reading.
    #[test]
    fn query_forms_are_read_as_go_decodes_them() {
        for (url, verb, name, query) in [
            (
                "/api/v1/namespaces/a/secrets?w%61tch=true",
                "watch",
                "",
                "watch=true",
            ),
            (
                "/api/v1/namespaces/a/secrets?%77%61%74%63%68=1",
                "watch",
                "",
                "watch=1",
            ),
            ("/api/v1/namespaces/a/secrets?watch", "watch", "", "watch="),
            ("/api/v1/namespaces/a/secrets?watch=", "watch", "", "watch="),
            (
                "/api/v1/namespaces/a/secrets?watch=0",
                "list",
                "",
                "watch=0",
            ),
            (
                "/api/v1/namespaces/a/secrets?watch=fals%65",
                "list",
                "",
                "watch=false",
            ),
            // Repeated: the first value counts, as in the parameter codec.
            (
                "/api/v1/namespaces/a/secrets?watch=false&watch=true",
                "list",
                "",
                "watch=false&watch=true",
            ),
            (
                "/api/v1/namespaces/a/secrets?watch=1&watch=0",
                "watch",
                "",
                "watch=1&watch=0",
            ),
            (
                "/api/v1/namespaces/a/secrets?fieldSelector=metadata.name%3Ddb",
                "list",
                "db",
                "fieldSelector=metadata.name%3Ddb",
            ),
            (
                "/api/v1/namespaces/a/secrets?fieldSelector=metadata.name=db",
                "list",
                "db",
                "fieldSelector=metadata.name%3Ddb",
            ),
            (
                "/api/v1/namespaces/a/secrets?field%53elector=metadata.name%3ddb&watch=true",
                "watch",
                "db",
                "fieldSelector=metadata.name%3Ddb&watch=true",
            ),
            (
                "/api/v1/namespaces/a/secrets?dry%52un=All&&",
                "list",
                "",
                "dryRun=All",
            ),
            (
                "/api/v1/namespaces/a/secrets?labelSelector=app+in+(a,b)",
                "list",
                "",
                "labelSelector=app+in+%28a%2Cb%29",
            ),
            ("/api/v1/namespaces/a/secrets?", "list", "", ""),
        ] {
            let (info, sent) = canonical("GET", url);
            assert_eq!(
                (info.verb.as_str(), info.name.as_str()),
                (verb, name),
                "{url}"
            );
            let sent_query = sent.split_once('?').map_or("", |(_, q)| q);
            assert_eq!(sent_query, query, "{url}");
        }
    }

    #[test]
    fn exec_commands_are_read_from_the_decoded_query() {
        let (info, sent) = canonical(
            "POST",
            "/api/v1/namespaces/prod/pods/web-0/%65xec?c%6Fmmand=rm&command=-rf+%2Fdata&container=app",
        );
        assert_eq!(info.subresource, "exec");
        assert_eq!(info.command, ["rm", "-rf /data"]);
        assert_eq!(
            sent,
            "/api/v1/namespaces/prod/pods/web-0/exec?command=rm&command=-rf+%2Fdata&container=app"
        );
        let (attach, _) = canonical(
            "POST",
            "/api/v1/namespaces/prod/pods/web-0%2Fattach?command=sh",
        );
        assert_eq!(
            (attach.subresource.as_str(), attach.command.as_slice()),
            ("attach", ["sh".to_owned()].as_slice())
        );
    }

    /// Targets without one reading are refused with a 400 that says why.
    #[test]
    fn ambiguous_targets_are_refused() {
        for (url, why) in [
            ("/api/v1/namespaces/prod/secr%zzts", "invalid escape"),
            ("/api/v1/namespaces/prod/secrets%", "invalid escape"),
            ("/api/v1/namespaces/prod/secrets%2", "invalid escape"),
            (
                "/api/v1/namespaces/prod/secrets/db?watch=%zz",
                "invalid escape",
            ),
            (
                "/api/v1/namespaces/prod/secrets/db?w%zatch=1",
                "invalid escape",
            ),
            // Found by the `request` fuzz target: an invalid escape ending
            // inside a multi-byte character (hyper passes such bytes in a
            // query) panicked slicing the message.
            ("/api/v1/naect?rt=a%3\u{11d}Senl.%3Db", "invalid escape"),
            ("/api/v1/namespaces/prod/secrets/%\u{11d}", "invalid escape"),
            ("/api/v1/namespaces/prod/secrets/%ff", "not UTF-8"),
            (
                "/api/v1/namespaces/prod/secrets?fieldSelector=metadata.name%3D%ff",
                "not UTF-8",
            ),
            ("/api/v1/namespaces/prod/secrets/a%00", "control"),
            ("/api/v1/namespaces/prod/secrets/a%0Ab", "control"),
            ("/api/v1/namespaces/prod/pods/../secrets/db", "\"..\""),
            ("/api/v1/namespaces/prod/pods/%2E%2E/secrets/db", "\"..\""),
            ("/api/v1/namespaces/prod/pods%2F..%2Fsecrets", "\"..\""),
            ("/api/v1/namespaces/prod/./secrets/db", "\".\""),
            ("/api/v1/namespaces/prod/%2e/secrets", "\".\""),
            ("/api/v1/namespaces//secrets", "empty segment"),
            ("/api/v1/namespaces/prod%2F%2Fsecrets", "empty segment"),
            ("/api/v1/namespaces/prod/secrets?a=1;watch=true", "\";\""),
            // Found by the oracle: not a path (hyper's `Uri::path()` is ""
            // for an authority-form target, which was forwarded as `/`).
            ("version", "not an absolute path"),
            ("*", "not an absolute path"),
            ("", "not an absolute path"),
            // Go refuses a target that is not rooted (400) before decoding.
            (
                "%2Fapi%2Fv1%2Fnamespaces%2Fprod%2Fsecrets",
                "not an absolute path",
            ),
        ] {
            let message = refused(url);
            assert!(message.contains(why), "{url}: {message}");
            assert!(message.starts_with("chaperone: "), "{url}: {message}");
        }
    }

    /// Found by the real API server as oracle (tests/tests/request_oracle.rs):
    /// when any list option does not decode, the API server's parameter
    /// codec fails as a whole and the field selector names no object.
    #[test]
    fn list_options_that_do_not_decode_name_no_object() {
        let named = "fieldSelector=metadata.name%3Ddb";
        for (query, verb, name) in [
            ("labelSelector=!!bad", "list", ""),
            ("labelSelector=a%3D%3D%3Db", "list", ""),
            ("labelSelector=app%3Dweb%3Dx", "list", ""),
            ("labelSelector=Example.com/app", "list", ""),
            ("limit=abc", "list", ""),
            ("limit=", "list", ""),
            ("limit=1.5", "list", ""),
            ("timeoutSeconds=x", "list", ""),
            ("watch=1&limit=x", "watch", ""),
            // these decode: the selector names the object
            ("limit=5", "list", "db"),
            ("limit=-1&timeoutSeconds=%2B3", "list", "db"),
            ("labelSelector=app+in+(a,b),!x,y%3Dz", "list", "db"),
            (
                "labelSelector=example.com/app%3D%3Dweb,tier!%3Dfe",
                "list",
                "db",
            ),
            ("labelSelector=", "list", "db"),
            ("resourceVersion=0&allowWatchBookmarks=maybe", "list", "db"),
        ] {
            let url = format!("/api/v1/namespaces/a/secrets?{query}&{named}");
            let info = parse("GET", &url);
            assert_eq!(
                (info.verb.as_str(), info.name.as_str()),
                (verb, name),
                "{url}"
            );
        }
    }

    /// Found by the oracle: `fields.ParseSelector` sorts the terms before
    /// `RequiresExactMatch` picks one, and `fields.splitTerm` splits at the
    /// first operator, escaped or not.
    #[test]
    fn field_selector_terms_are_sorted_and_split_at_the_first_operator() {
        for (selector, name) in [
            ("metadata.name%3Ddb,metadata.name%3Dcm", "cm"),
            ("metadata.name%3Dcm,metadata.name%3Ddb", "cm"),
            ("metadata.namespace%3Dprod,metadata.name%3Dcm", "cm"),
            // `x\` = `y=z`: an unescaped `=` in the value, no selector
            ("x%5C%3Dy%3Dz,metadata.name%3Ddb", ""),
            ("metadata.name%3Dd%5C%2Cb", "d,b"),
        ] {
            let url = format!("/api/v1/namespaces/a/secrets?fieldSelector={selector}");
            assert_eq!(parse("GET", &url).name, name, "{url}");
        }
    }

    #[test]
    fn label_selectors_parse_as_the_api_server_parses_them() {
        for selector in [
            "",
            "a",
            "!a",
            " a = b ",
            "a==b",
            "a!=b",
            "a=",
            "a in (b,c)",
            "a notin (b)",
            "a in ()",
            "a in (,)",
            "a in (b,,c)",
            "a>1",
            "a<1",
            "a,b,!c",
            "x.io/a=b",
            "in in (in)",
            // a NUL byte where a token starts ends the selector
            "a=\0junk",
        ] {
            assert!(label_selector_parses(selector), "{selector:?}");
        }
        for selector in [
            "!!a",
            "a===b",
            "a=b=c",
            "a>b",
            "a>",
            "a in b",
            "a in (b c)",
            "a in (b",
            "a,",
            ",a",
            "X.io/a",
            "/a",
            "a/b/c",
            "-a",
            "a=-b",
            "a b",
            "!a=b",
            "a=(b)",
            // an integer, but not a label value
            "a<-1",
            // a NUL byte inside a word ends the word only
            "a=b\0junk",
        ] {
            assert!(!label_selector_parses(selector), "{selector:?}");
        }
    }

    #[test]
    fn resource_path_joins_the_subresource() {
        assert_eq!(
            parse("POST", "/api/v1/namespaces/a/pods/p/exec").resource_path(),
            "pods/exec"
        );
        assert_eq!(
            parse("GET", "/api/v1/namespaces/a/pods").resource_path(),
            "pods"
        );
    }
}
