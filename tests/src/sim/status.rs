//! `Status` objects exactly as the API server writes them (see the fixtures
//! `status-401` … `status-422`, `status-410-watch` and `delete-dryrun`).

use serde_json::{Map, Value, json};

/// An API error: an HTTP status code and the `Status` body that goes with it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` in the order the API server writes them (name, group, kind,
    /// uid, causes); `None` omits the field.
    pub details: Option<Map<String, Value>>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn details(name: Option<&str>, group: &str, kind: &str) -> Map<String, Value> {
    let mut d = Map::new();
    if let Some(name) = name.filter(|n| !n.is_empty()) {
        d.insert("name".into(), name.into());
    }
    if !group.is_empty() {
        d.insert("group".into(), group.into());
    }
    d.insert("kind".into(), kind.into());
    d
}

/// `resource` or `resource.group`, as the API server names a resource in messages.
pub fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

impl ApiError {
    /// The `Status` body.
    pub fn to_status(&self) -> Value {
        let mut s = Map::new();
        s.insert("kind".into(), "Status".into());
        s.insert("apiVersion".into(), "v1".into());
        s.insert("metadata".into(), json!({}));
        s.insert("status".into(), "Failure".into());
        s.insert("message".into(), self.message.clone().into());
        s.insert("reason".into(), self.reason.into());
        if let Some(d) = &self.details {
            s.insert("details".into(), Value::Object(d.clone()));
        }
        s.insert("code".into(), self.code.into());
        Value::Object(s)
    }

    /// 401: a missing, unknown, expired or tampered bearer token.
    pub fn unauthorized() -> Self {
        Self {
            code: 401,
            reason: "Unauthorized",
            message: "Unauthorized".into(),
            details: None,
        }
    }

    /// 403 for a resource request, worded like the RBAC authorizer.
    pub fn forbidden(
        user: &str,
        verb: &str,
        group: &str,
        resource: &str,
        subresource: &str,
        namespace: &str,
        name: &str,
    ) -> Self {
        let full = if subresource.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}/{subresource}")
        };
        let subject = if name.is_empty() {
            format!("{} is forbidden", qualified(resource, group))
        } else {
            format!("{} \"{name}\" is forbidden", qualified(resource, group))
        };
        let scope = if namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{namespace}\"")
        };
        Self {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "{subject}: User \"{user}\" cannot {verb} resource \"{full}\" in API group \"{group}\" {scope}"
            ),
            details: Some(details(Some(name), group, resource)),
        }
    }

    /// 403 for a non-resource URL (`/healthz`, `/version`, …).
    pub fn forbidden_path(user: &str, verb: &str, path: &str) -> Self {
        Self {
            code: 403,
            reason: "Forbidden",
            message: format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\""),
            details: Some(Map::new()),
        }
    }

    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", qualified(resource, group)),
            details: Some(details(Some(name), group, resource)),
        }
    }

    /// 404 for a path the server does not serve at all.
    pub fn no_such_path() -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: Some(Map::new()),
        }
    }

    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        Self {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} \"{name}\" already exists", qualified(resource, group)),
            details: Some(details(Some(name), group, resource)),
        }
    }

    /// 409 for an update carrying a stale `resourceVersion`.
    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Self {
        Self {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(resource, group)
            ),
            details: Some(details(Some(name), group, resource)),
        }
    }

    /// 409 for a server-side apply that would take fields another manager owns.
    pub fn apply_conflict(conflicts: &[(String, String)], api_version: &str) -> Self {
        let n = conflicts.len();
        let mut message = format!(
            "Apply failed with {n} conflict{}: ",
            if n == 1 { "" } else { "s" }
        );
        let parts: Vec<String> = conflicts
            .iter()
            .map(|(manager, path)| {
                format!("conflict with \"{manager}\" using {api_version}: {path}")
            })
            .collect();
        message.push_str(&parts.join("\n"));
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(manager, path)| {
                json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with \"{manager}\" using {api_version}"),
                    "field": path,
                })
            })
            .collect();
        let mut d = Map::new();
        d.insert("causes".into(), Value::Array(causes));
        Self {
            code: 409,
            reason: "Conflict",
            message,
            details: Some(d),
        }
    }

    /// 422 with one field cause, as validation reports it.
    pub fn invalid(
        group: &str,
        kind: &str,
        name: &str,
        field: &str,
        cause_reason: &str,
        detail: &str,
    ) -> Self {
        let mut d = details(Some(name), group, kind);
        d.insert(
            "causes".into(),
            json!([{ "reason": cause_reason, "message": detail, "field": field }]),
        );
        let qualified_kind = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        Self {
            code: 422,
            reason: "Invalid",
            message: format!("{qualified_kind} \"{name}\" is invalid: {field}: {detail}"),
            details: Some(d),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            details: None,
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self {
            code: 405,
            reason: "MethodNotAllowed",
            message: message.into(),
            details: Some(Map::new()),
        }
    }

    /// 406: the client accepts only media types this simulator cannot write.
    pub fn not_acceptable() -> Self {
        Self {
            code: 406,
            reason: "NotAcceptable",
            message: "only the following media types are accepted: application/json, application/json;as=Table;v=v1;g=meta.k8s.io".into(),
            details: None,
        }
    }

    /// 406 from the API server's route selection (go-restful): no route
    /// produces a type the client accepts (`/openid/v1/jwks` for
    /// `Accept: application/json`, any object for `Accept: text/html`).
    pub fn route_not_acceptable() -> Self {
        Self {
            code: 406,
            reason: "NotAcceptable",
            message: "406: Not Acceptable".into(),
            details: Some(Map::new()),
        }
    }

    /// 415: a request body in a media type this simulator cannot read.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"
            ),
            details: None,
        }
    }

    /// 410 for a watch or list from a compacted resourceVersion.
    pub fn expired(requested: u64, current: u64) -> Self {
        Self {
            code: 410,
            reason: "Expired",
            message: format!("too old resource version: {requested} ({current})"),
            details: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            code: 500,
            reason: "InternalError",
            message: message.into(),
            details: None,
        }
    }
}

/// The `Status` a delete returns when the object itself is not returned
/// (fixture `delete-dryrun`).
pub fn delete_success(group: &str, resource: &str, name: &str, uid: &str) -> Value {
    let mut d = details(Some(name), group, resource);
    d.insert("uid".into(), uid.into());
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": Value::Object(d),
    })
}
