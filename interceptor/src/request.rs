//! Kubernetes RequestInfo: what an HTTP request means to the API server
//! (verb, API group, version, resource, subresource, namespace, name), parsed
//! with the API server's own rules (k8s.io/apiserver `RequestInfoFactory`).
//!
//! The parser itself is built by the request issue (#3); this file fixes the
//! type every later stage (policy, mask, record, audit) consumes.

/// The API server's view of one request.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// `true` for `/api/...` and `/apis/...` resource requests; `false` for
    /// non-resource URLs such as `/version`, `/healthz` or `/openapi/v2`.
    pub is_resource_request: bool,
    /// The URL path, without the query.
    pub path: String,
    /// Kubernetes verb: `get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`, or for non-resource URLs the lowercased
    /// HTTP method (`get`, `post`, ...).
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
}
