//! Tells people an approval is waiting, and then what became of it
//! (approved, denied or expired, and by whom): a webhook with a
//! Slack-compatible payload (`text` + `attachments[].fields`) or a generic
//! JSON one. The data path only drops a message into a bounded queue
//! (dropped, with a warning, when full); a task posts it, retrying with
//! backoff. The node that created an approval announces its decision, so
//! each is announced once however many nodes watch it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{ApprovalRequest, State};

/// The payload shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// `{"text": ..., "attachments": [{"fields": [...]}]}`: Slack incoming
    /// webhooks and the many tools that accept their format.
    #[default]
    Slack,
    /// `{"kind": "ApprovalRequested", "approval": <the object>, "approve": ...}`,
    /// then `{"kind": "ApprovalDecided", "state": "Approved", "by": ...}`.
    Json,
}

/// A notification format chaperone does not send.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("notification format {0:?}: expected `slack` or `json`")]
pub struct UnknownFormat(String);

impl std::str::FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, UnknownFormat> {
        match s {
            "slack" => Ok(Format::Slack),
            "json" => Ok(Format::Json),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

/// The notification sender cannot start.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{0}")]
    Tls(rustls::Error),
    #[error("the system's CA certificates: {0}")]
    Roots(std::io::Error),
}

/// How many times a notification is tried, and the first pause between.
const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const QUEUE: usize = 256;

/// The sending side, cheap to clone; see the module docs.
#[derive(Clone)]
pub struct Notifier {
    format: Format,
    queue: mpsc::Sender<Value>,
}

impl Notifier {
    /// Starts the sender task on the current runtime.
    pub fn start(url: http::Uri, format: Format) -> Result<Self, NotifyError> {
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(NotifyError::Tls)?;
        let tls = hyper_rustls::ConfigBuilderExt::with_native_roots(tls)
            .map_err(NotifyError::Roots)?
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let (queue, mut receiver) = mpsc::channel::<Value>(QUEUE);
        tokio::spawn(async move {
            while let Some(payload) = receiver.recv().await {
                send_with_retries(&client, &url, &payload).await;
            }
        });
        Ok(Notifier { format, queue })
    }

    /// A new approval waits: say so (never blocks).
    pub fn requested(&self, approval: &ApprovalRequest) {
        self.queue(payload(self.format, approval), approval);
    }

    /// An approval was approved, denied or expired: say so (never blocks).
    pub fn decided(&self, approval: &ApprovalRequest) {
        self.queue(decision_payload(self.format, approval), approval);
    }

    fn queue(&self, payload: Value, approval: &ApprovalRequest) {
        if self.queue.try_send(payload).is_err() {
            tracing::warn!(
                approval = approval.name(),
                "the notification queue is full: this approval is not announced"
            );
        }
    }
}

async fn send_with_retries<C>(client: &Client<C, Full<Bytes>>, url: &http::Uri, payload: &Value)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let body = Bytes::from(serde_json::to_vec(payload).expect("JSON"));
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let request = http::Request::post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .expect("a valid request");
        let result = tokio::time::timeout(Duration::from_secs(10), client.request(request)).await;
        let why = match result {
            Ok(Ok(response)) if response.status().is_success() => {
                let _ = response.into_body().collect().await;
                return;
            }
            Ok(Ok(response)) => format!("HTTP {}", response.status()),
            Ok(Err(error)) => error.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(%url, attempt, %why, "approval notification failed");
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    tracing::error!(%url, "approval notification dropped after {ATTEMPTS} attempts");
}

/// The notification for a new approval.
pub fn payload(format: Format, approval: &ApprovalRequest) -> Value {
    let spec = &approval.spec;
    let id = approval.name();
    let namespace = approval.namespace();
    let approve = format!("kubectl chaperone approve {id} -n {namespace}");
    let deny = format!("kubectl chaperone deny {id} -n {namespace} --reason '...'");
    match format {
        Format::Json => json!({
            "kind": "ApprovalRequested",
            "id": id,
            "namespace": namespace,
            "approve": approve,
            "deny": deny,
            "approval": approval,
        }),
        Format::Slack => {
            let pod = spec
                .requester
                .pod
                .as_ref()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .unwrap_or_else(|| "-".into());
            let field = |title: &str, value: String, short: bool| json!({"title": title, "value": value, "short": short});
            json!({
                "text": format!(
                    "chaperone: {} asks to {}. Approve: `{approve}`",
                    spec.requester.username,
                    spec.request.describe()
                ),
                "attachments": [{
                    "fallback": format!("approval {id} waits"),
                    "fields": [
                        field("Approval", id.to_owned(), true),
                        field("Requester", spec.requester.username.clone(), true),
                        field("Pod", pod, true),
                        field("Rule", format!("{} / {}", spec.policy, spec.rule), true),
                        field("Request", spec.request.describe(), false),
                        field("Expires", spec.expires_at.clone(), true),
                        field("Deny", format!("`{deny}`"), false),
                    ],
                }],
            })
        }
    }
}

/// The notification for a decision (`Approved`, `Denied`) or an expiry.
pub fn decision_payload(format: Format, approval: &ApprovalRequest) -> Value {
    let spec = &approval.spec;
    let id = approval.name();
    let status = approval.status.clone().unwrap_or_default();
    let state = approval.state();
    let by = status.decided_by.clone().unwrap_or_default();
    let what = format!("{} to {}", spec.requester.username, spec.request.describe());
    match format {
        Format::Json => json!({
            "kind": "ApprovalDecided",
            "id": id,
            "namespace": approval.namespace(),
            "state": state,
            "by": status.decided_by,
            "reason": status.reason,
            "grant": status.grant,
            "grantExpiresAt": status.grant_expires_at,
            "approval": approval,
        }),
        Format::Slack => {
            let text = match state {
                State::Approved => format!("chaperone: {by} approved {id}: {what}"),
                State::Denied => format!("chaperone: {by} denied {id}: {what}"),
                _ => format!("chaperone: approval {id} expired before anyone decided: {what}"),
            };
            let field = |title: &str, value: String, short: bool| json!({"title": title, "value": value, "short": short});
            let mut fields = vec![
                field("Approval", id.to_owned(), true),
                field("Decision", state.to_string(), true),
            ];
            if !by.is_empty() {
                fields.push(field("By", by.clone(), true));
            }
            if let Some(reason) = &status.reason {
                fields.push(field("Reason", reason.clone(), false));
            }
            if let (Some(grant), Some(until)) = (&status.grant, &status.grant_expires_at) {
                fields.push(field("Grant", format!("{grant} (until {until})"), true));
            }
            fields.push(field("Requester", spec.requester.username.clone(), true));
            fields.push(field("Request", spec.request.describe(), false));
            json!({
                "text": text,
                "attachments": [{
                    "fallback": format!("approval {id}: {state}"),
                    "fields": fields,
                }],
            })
        }
    }
}
