//! Kubernetes `Status` objects, shaped exactly like the API server's (see the
//! fixtures `status-*.body`), so kubectl and client libraries print chaperone's
//! refusals as they print the API server's own.

use serde_json::{Map, Value, json};

/// A `Status` failure: HTTP code, reason, message and details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    /// `Unauthorized`, `Forbidden`, `NotAcceptable`, `ServiceUnavailable`, ...
    pub reason: &'static str,
    pub message: String,
    /// `details.name`, `details.group`, `details.kind`.
    pub name: Option<String>,
    pub group: Option<String>,
    pub kind: Option<String>,
    /// `details.causes[]` as `(reason, message)`.
    pub causes: Vec<(String, String)>,
    /// `details.retryAfterSeconds`, and the response's `Retry-After`.
    pub retry_after_seconds: Option<u32>,
}

impl Status {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            name: None,
            group: None,
            kind: None,
            causes: Vec::new(),
            retry_after_seconds: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "Unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn not_acceptable(message: impl Into<String>) -> Self {
        Self::new(406, "NotAcceptable", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "RequestEntityTooLarge", message)
    }

    pub fn service_unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message)
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "InternalError", message)
    }

    pub fn with_details(
        mut self,
        group: impl Into<String>,
        kind: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        self.group = Some(group.into()).filter(|g: &String| !g.is_empty());
        self.kind = Some(kind.into()).filter(|k: &String| !k.is_empty());
        self.name = Some(name.into()).filter(|n: &String| !n.is_empty());
        self
    }

    pub fn with_cause(mut self, reason: impl Into<String>, message: impl Into<String>) -> Self {
        self.causes.push((reason.into(), message.into()));
        self
    }

    /// The JSON object, field order as the API server writes it.
    pub fn to_json(&self) -> Value {
        let mut details = Map::new();
        if let Some(name) = &self.name {
            details.insert("name".into(), json!(name));
        }
        if let Some(group) = &self.group {
            details.insert("group".into(), json!(group));
        }
        if let Some(kind) = &self.kind {
            details.insert("kind".into(), json!(kind));
        }
        if !self.causes.is_empty() {
            let causes: Vec<Value> = self
                .causes
                .iter()
                .map(|(reason, message)| json!({"reason": reason, "message": message}))
                .collect();
            details.insert("causes".into(), Value::Array(causes));
        }
        if let Some(seconds) = self.retry_after_seconds {
            details.insert("retryAfterSeconds".into(), json!(seconds));
        }
        let mut status = Map::new();
        status.insert("kind".into(), json!("Status"));
        status.insert("apiVersion".into(), json!("v1"));
        status.insert("metadata".into(), json!({}));
        status.insert("status".into(), json!("Failure"));
        status.insert("message".into(), json!(self.message));
        status.insert("reason".into(), json!(self.reason));
        if !details.is_empty() {
            status.insert("details".into(), Value::Object(details));
        }
        status.insert("code".into(), json!(self.code));
        Value::Object(status)
    }

    /// The body as the API server sends it (compact JSON and a newline).
    pub fn to_body(&self) -> Vec<u8> {
        let mut body = serde_json::to_vec(&self.to_json()).expect("a Status always serializes");
        body.push(b'\n');
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API server's own 403, captured from a real kube-apiserver and
    /// kept in the repository.
    fn fixture_403() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/kube-apiserver-v1.20.2/status-403.body");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn forbidden_has_the_api_servers_shape() {
        let fixture: Value = serde_json::from_str(&fixture_403()).unwrap();
        let ours = Status::forbidden(fixture["message"].as_str().unwrap())
            .with_details("", "secrets", "")
            .to_json();
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&ours), keys(&fixture));
        assert_eq!(ours, fixture);
    }
}
