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

use std::borrow::Cow;

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
    /// Parses a request as the API server does.
    ///
    /// `path` is the URL path without the query; `query` the raw query string
    /// (without `?`), if any. Parsing never fails: anything that is not a
    /// resource URL is a non-resource request whose verb is the lowercased
    /// HTTP method, exactly as in the API server.
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
    /// value names the single object of the list. A field selector that does
    /// not parse fails the whole decoding, and then only `watch` counts.
    fn from_query(query: Option<&str>) -> ListOptions {
        let watch = query_values(query, "watch")
            .next()
            .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0"));
        let metadata_name = query_values(query, "fieldSelector")
            .next()
            .and_then(|selector| field_selector_exact_match(&selector, "metadata.name").ok())
            .flatten();
        ListOptions {
            watch,
            metadata_name,
        }
    }
}

/// `fields.ParseSelector(selector).RequiresExactMatch(field)`: `Err` when the
/// selector does not parse, `Ok(Some(value))` when one of its terms is
/// `field=value` or `field==value`.
fn field_selector_exact_match(selector: &str, field: &str) -> Result<Option<String>, ()> {
    let mut found = None;
    for term in split_unescaped(selector, ',') {
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

/// One field selector term: `lhs!=rhs`, `lhs==rhs` or `lhs=rhs`, the first
/// unescaped operator winning, as `fields.splitTerm` does.
fn split_term(term: &str) -> Option<(&str, &'static str, &str)> {
    let bytes = term.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        for op in ["!=", "==", "="] {
            if term[i..].starts_with(op) {
                return Some((&term[..i], op, &term[i + op.len()..]));
            }
        }
        i += 1;
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
