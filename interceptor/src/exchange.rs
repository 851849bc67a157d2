//! [`Exchange`]: everything the proxy knows about one finished request, filled
//! once per request and handed to the recorder, the auditor and the metrics.
//! It sits below all three (it imports none of them), so they read it
//! without importing each other.
//!
//! The guard builds one `Exchange` when a response completes (for watches and
//! streams: when the response started, then again when it completed; see
//! `guard/exchange.rs`), wraps it in an [`Arc`] and gives clones to
//! [`Session::exchange`](crate::record::Session::exchange) and
//! [`Admission::submit`](crate::audit::Admission::submit). Both only push
//! it onto a queue: no disk or network I/O happens on the data path.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::identity::Caller;
use crate::policy::{Action, RecordLevel};
use crate::request::RequestInfo;

/// A user as the audit log shows it (`authentication.k8s.io/v1` `UserInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl From<&Caller> for UserInfo {
    fn from(caller: &Caller) -> Self {
        Self {
            username: caller.username.clone(),
            uid: caller.uid.clone(),
            groups: caller.groups.clone(),
            extra: caller.extra.clone(),
        }
    }
}

/// What policy decided for the request, as recorded.
///
/// Built from [`crate::policy::Decision`] with [`DecisionRecord::from_decision`];
/// the strings are shared, so copying one per request costs reference counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionRecord {
    pub action: Action,
    pub level: RecordLevel,
    /// `namespace/name` of the policy, empty for the built-in default.
    pub policy: Arc<str>,
    /// The rule's name (or `rules[N]`), or `default`.
    pub rule: Arc<str>,
    /// The policy is in dry-run: a `deny` was recorded, not enforced.
    pub dry_run: bool,
    /// The `ApprovalRequest` id, for requests that were held for approval.
    pub approval: Option<Arc<str>>,
    /// Who approved it (or whose grant let it through).
    pub approved_by: Option<Arc<str>>,
}

impl DecisionRecord {
    pub fn from_decision(decision: &crate::policy::Decision, approval: Option<&str>) -> Self {
        Self {
            action: decision.action,
            level: decision.record,
            policy: Arc::from(&*decision.policy),
            rule: Arc::from(&*decision.rule),
            dry_run: decision.dry_run,
            approval: approval.map(Arc::from),
            approved_by: None,
        }
    }

    /// The word the recordings, the audit annotation and the metrics use:
    /// `allow`, `deny`, `mask`, `approve`, or `dry-run-deny` for a deny that
    /// was not enforced.
    pub fn verdict(&self) -> &'static str {
        match (self.action, self.dry_run) {
            (Action::Deny, true) => "dry-run-deny",
            (Action::Allow, _) => "allow",
            (Action::Deny, false) => "deny",
            (Action::Mask, _) => "mask",
            (Action::Approve, _) => "approve",
        }
    }
}

/// The response as the audit log's `responseStatus` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseStatus {
    /// HTTP status code.
    pub code: u16,
    /// For failures: the `Status` reason (`Forbidden`, `NotFound`, ...).
    pub reason: Option<String>,
    /// For failures: the `Status` message.
    pub message: Option<String>,
}

impl ResponseStatus {
    pub fn ok(code: u16) -> Self {
        Self {
            code,
            reason: None,
            message: None,
        }
    }

    pub fn failure(code: u16, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: Some(reason.into()),
            message: Some(message.into()),
        }
    }

    pub fn is_failure(&self) -> bool {
        self.code >= 400 || self.code < 100
    }
}

/// Which stage of a request an [`Exchange`] describes (audit `stage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The request was decided and is about to be forwarded: written ahead
    /// of it in audit durability mode `spooled`, never recorded.
    RequestReceived,
    /// Response headers were sent for a long-running request (watch, exec,
    /// attach, port-forward, log follow); the body goes on.
    ResponseStarted,
    /// The response body is complete.
    ResponseComplete,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::RequestReceived => "RequestReceived",
            Stage::ResponseStarted => "ResponseStarted",
            Stage::ResponseComplete => "ResponseComplete",
        }
    }
}

/// One request and its outcome, as the proxy saw it, with bodies already
/// masked and cut to the policy's record level.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// Stable per request; the `Audit-ID` the proxy also sends upstream.
    pub audit_id: Uuid,
    pub stage: Stage,
    pub received: OffsetDateTime,
    /// When the response headers were sent, if they were.
    pub response_started: Option<OffsetDateTime>,
    /// When the response completed (for [`Stage::ResponseStarted`]: when the
    /// headers were sent).
    pub completed: OffsetDateTime,
    /// The request URI as the client sent it (path and query).
    pub request_uri: String,
    pub request: RequestInfo,
    pub caller: Arc<Caller>,
    /// The identity chaperone asked the API server to act as (`impersonate`
    /// credential mode), or the one the agent itself asked to impersonate.
    pub impersonated_user: Option<UserInfo>,
    /// Client address first (and any forwarded-for addresses before it, as the
    /// API server lists them).
    pub source_ips: Vec<IpAddr>,
    pub user_agent: Option<String>,
    pub decision: DecisionRecord,
    pub status: ResponseStatus,
    /// The request body (masked), present only at `Request` level and above.
    pub request_body: Option<Value>,
    /// The response body (masked), present only at `RequestResponse` level.
    pub response_body: Option<Value>,
    /// How many values masking replaced in this exchange.
    pub masked_fields: u32,
    /// The node this proxy runs on.
    pub node: Arc<str>,
}

impl Exchange {
    /// Time from receiving the request to completing the response.
    pub fn latency(&self) -> Duration {
        let d = self.completed - self.received;
        d.try_into().unwrap_or(Duration::ZERO)
    }

    /// Drops what the record level does not keep: bodies below `Request`,
    /// the response body below `RequestResponse`. The proxy should not have
    /// captured them in the first place; this makes sure.
    pub fn trim_to_level(&mut self) {
        if self.decision.level < RecordLevel::Request {
            self.request_body = None;
        }
        if self.decision.level < RecordLevel::RequestResponse {
            self.response_body = None;
        }
    }
}

/// `2026-11-23T11:17:02.123456Z`: RFC 3339 in UTC with microseconds, as the
/// API server writes `metav1.MicroTime`.
pub fn micro_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Parses what [`micro_time`] writes (and any RFC 3339 time).
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Exchanges for tests.
    use super::*;
    use crate::identity::PodRef;

    pub fn pod() -> PodRef {
        PodRef {
            namespace: "agents".into(),
            name: "coder-7f9c".into(),
            uid: "6a1e2d3c-0000-4000-8000-000000000001".into(),
            service_account: "coder".into(),
            labels: Default::default(),
        }
    }

    pub fn caller() -> Arc<Caller> {
        Arc::new(Caller {
            username: "system:serviceaccount:agents:coder".into(),
            uid: "b7d5c3a1-0000-4000-8000-000000000002".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:agents".into(),
                "system:authenticated".into(),
            ],
            extra: [
                (
                    "authentication.kubernetes.io/pod-name".to_string(),
                    vec!["coder-7f9c".to_string()],
                ),
                (
                    "authentication.kubernetes.io/pod-uid".to_string(),
                    vec![pod().uid.to_string()],
                ),
            ]
            .into(),
            pod: Some(pod()),
            process: None,
            cgroup_id: Some(crate::redirect::CgroupId(4242)),
        })
    }

    /// A finished exchange: `verb` on `resource` `namespace/name`.
    pub fn exchange(
        verb: &str,
        resource: &str,
        name: &str,
        action: Action,
        level: RecordLevel,
        code: u16,
    ) -> Exchange {
        let received = OffsetDateTime::now_utc();
        let namespace = "agents";
        let mut uri = format!("/api/v1/namespaces/{namespace}/{resource}");
        if !name.is_empty() {
            uri.push('/');
            uri.push_str(name);
        }
        let status = if code >= 400 {
            ResponseStatus::failure(
                code,
                "Forbidden",
                format!("{resource} \"{name}\" is forbidden: {verb} is not allowed for agents"),
            )
        } else {
            ResponseStatus::ok(code)
        };
        let mut exchange = Exchange {
            audit_id: Uuid::new_v4(),
            stage: Stage::ResponseComplete,
            received,
            response_started: Some(received + Duration::from_millis(3)),
            completed: received + Duration::from_millis(4),
            request_uri: uri.clone(),
            request: RequestInfo {
                is_resource_request: true,
                path: uri,
                verb: verb.into(),
                api_prefix: "api".into(),
                api_group: String::new(),
                api_version: "v1".into(),
                namespace: namespace.into(),
                resource: resource.into(),
                subresource: String::new(),
                name: name.into(),
                ..RequestInfo::default()
            },
            caller: caller(),
            impersonated_user: None,
            source_ips: vec!["10.244.1.7".parse().unwrap()],
            user_agent: Some("kubectl/v1.31.0 (linux/amd64) kubernetes/abcdef".into()),
            decision: DecisionRecord {
                action,
                level,
                policy: Arc::from("agents/coder-policy"),
                rule: Arc::from(format!("{verb}-{resource}")),
                dry_run: false,
                approval: (action == Action::Approve).then(|| Arc::from("apr-0001")),
                approved_by: (action == Action::Approve).then(|| Arc::from("alice")),
            },
            status,
            request_body: None,
            response_body: None,
            masked_fields: if action == Action::Mask { 2 } else { 0 },
            node: Arc::from("node-a"),
        };
        if level >= RecordLevel::RequestResponse && code < 400 {
            exchange.response_body = Some(serde_json::json!({
                "kind": "Secret", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace},
                "data": {"password": "KioqKio="}
            }));
        }
        exchange
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_time_has_six_fraction_digits_and_z() {
        let t = time::macros::datetime!(2026-11-23 11:17:02.123456789 +02:00);
        assert_eq!(micro_time(t), "2026-11-23T09:17:02.123456Z");
        let t = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        assert_eq!(micro_time(t), "2026-01-02T03:04:05.000000Z");
        assert_eq!(parse_time(&micro_time(t)), Some(t));
    }
}
