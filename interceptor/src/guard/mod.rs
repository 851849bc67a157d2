//! The guard: one agent request through chaperone's decisions, as named
//! stages. `NodeGuard::stages` is the whole per-request path, top to
//! bottom; each stage passes the request on (`Ok`) or answers it with a
//! Kubernetes `Status` (`Err`), which `ExchangeDraft::refuse` sends and
//! records. A forwarded request is recorded and audited when it ends
//! (`exchange.rs`).
//!
//! Per connection, [`Connection`] holds what the kernel attested (the pod,
//! the process, the cgroup), the recording session and the pod's limit
//! counter: made once when the proxy accepts the connection, owned by it.
//! Nothing on the per-request path takes a lock shared between connections.
//!
//! Nothing here blocks on disk or network except the token check (cached;
//! bounded by the identity module's own timeouts) and a held request's
//! wait for a person: recording, audit and metrics go to bounded queues.
//!
//! Build one with [`NodeGuard::new`] from [`GuardParts`].

mod admit;
mod authenticate;
mod authorize;
mod connection;
mod credentials;
mod exchange;
mod hold;
mod interpret;
mod plan;
mod protect;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use http::request::Parts;

pub use connection::Connection;
pub use exchange::CLIENT_CLOSED_REQUEST;

use self::exchange::ExchangeDraft;
use crate::{
    approval::{Approvals, PreviewClient},
    audit::AuditGate,
    identity::{Authenticator, CredentialMode, OwnCredentials},
    kstatus::Status,
    limits::{LimitConfig, PodLimits},
    mask::{MaskRules, Masker},
    metrics::Metrics,
    pods::PodTracker,
    policy::{PolicyInput, PolicyStore},
    protect::Protect,
    proxy::{ConnectionInfo, Forward, Guard, Upstream, Verdict, body::RequestBody},
    record::Recorder,
    request::AmbiguousTarget,
};

/// What a stage says: `Ok` passes the request on, `Err` is the `Status`
/// the agent gets instead.
type Pass<T = ()> = Result<T, Box<Status>>;

impl Guard for NodeGuard {
    type Connection = Connection;

    fn connect(&self, info: &Arc<ConnectionInfo>) -> Connection {
        Connection::open(&self.parts, &self.limits, info)
    }

    async fn check(
        &self,
        _info: &Arc<ConnectionInfo>,
        connection: &Arc<Connection>,
        parts: &mut Parts,
        body: &mut RequestBody,
    ) -> Verdict {
        // One reading: from here on `parts.uri` is the canonical target, the
        // one judged and the one forwarded (see `request`).
        let (request, target) = interpret::interpret(parts);
        let mut exchange = ExchangeDraft::begin(&self.parts, connection, parts, request);
        match self
            .stages(&mut exchange, connection, parts, body, target)
            .await
        {
            Ok(forward) => Verdict::Forward(Forward {
                observer: Some(Box::new(exchange)),
                ..forward
            }),
            Err(status) => exchange.refuse(*status),
        }
    }
}

impl NodeGuard {
    /// The per-request path. Every stage either passes the request on or
    /// refuses it; `x` is the exchange as recorded, filled in as it goes.
    async fn stages(
        &self,
        x: &mut ExchangeDraft,
        connection: &Connection,
        parts: &mut Parts,
        body: &mut RequestBody,
        target: Result<(), AmbiguousTarget>,
    ) -> Pass<Forward> {
        // Per-pod limits, before anything else is spent on the request.
        x.in_flight = admit::within_limits(connection)?;
        x.admission = admit::to_audit(self.parts.audit.as_ref())?;
        target.map_err(|ambiguous| Box::new(ambiguous.status()))?;

        let caller = authenticate::caller(&self.parts.authenticator, connection, parts).await?;
        x.caller = caller.clone();

        let request = x.request.clone();
        let policy = self.parts.policy.snapshot();
        let input = PolicyInput::new(&request, &caller);
        // Built-in refusals no AgentPolicy can lift: an agent may not lower
        // its own guard (the intercept label, chaperone's namespace and
        // objects, approvals).
        self.protect(parts, body, &request, &policy, &input)
            .await
            .map_err(|status| x.refused_by(protect::decision(&status), status))?;

        let decision = policy.evaluate(&input);
        // Writes never store a mask: checked before a person is asked.
        self.refuse_masked_write(parts, body, &request, &decision)
            .await
            .map_err(|status| x.refused_by(decision.clone(), status))?;
        authorize::refuse_denied(&policy, &input, &decision, self.parts.approvals.is_some())
            .map_err(|status| x.refused_by(decision.clone(), status))?;
        self.hold(x, parts, body, &caller, &decision).await?;
        authorize::log_dry_run(x.audit_id, &decision);
        x.decision.get_or_insert(decision);

        let own_credentials = self.credentials(parts, &policy, &input, &caller)?;
        let response_transform = self.plan_response(x, parts)?;
        let request_observer = self.plan_record(x, parts);
        self.write_ahead(x).await?;
        Ok(Forward {
            response_transform,
            observer: None,
            request_observer,
            own_credentials,
        })
    }
}

// === construction ===

/// Everything the guard consults, given once to [`NodeGuard::new`].
/// [`GuardParts::new`] fills in the defaults: no pod tracker (local mode),
/// no policies (every caller denied), the built-in mask rules, passthrough
/// credentials, no recording, audit or approvals, the default limits.
///
/// ```text
/// let guard = NodeGuard::new(GuardParts {
///     policy: Arc::new(store),
///     recorder: Some(recorder),
///     approvals: Some(approvals),
///     ..GuardParts::new(authenticator)
/// });
/// let proxy = Proxy::new(ProxyConfig::default(), guard, upstream, tls, attestor);
/// ```
pub struct GuardParts {
    /// This node's name, in every recorded exchange.
    pub node: Arc<str>,
    pub authenticator: Arc<Authenticator>,
    /// cgroup id → pod; `None` when no pod tracker runs (local mode).
    pub pods: Option<Arc<PodTracker>>,
    pub policy: Arc<PolicyStore>,
    pub masker: Masker,
    /// The node's credential mode (a policy may ask for impersonation).
    pub credential_mode: CredentialMode,
    /// chaperone's own credentials, for impersonation.
    pub own_credentials: OwnCredentials,
    pub recorder: Option<Recorder>,
    pub audit: Option<AuditGate>,
    pub metrics: Metrics,
    /// Holds `approve` requests for a person; without it they are refused.
    pub approvals: Option<Arc<Approvals>>,
    /// The API server, for the `dryRun=All` preview of a held request;
    /// without it approvals carry no preview.
    pub upstream: Option<Upstream>,
    /// The built-in refusals evaluated before policy.
    pub protect: Protect,
    /// Per-pod connection and in-flight request limits.
    pub limits: LimitConfig,
}

impl GuardParts {
    /// The defaults around `authenticator`, the one part without one.
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        GuardParts {
            node: Arc::from(""),
            authenticator,
            pods: None,
            policy: Arc::new(PolicyStore::new()),
            masker: Masker::new(&MaskRules::default()).expect("the built-in mask rules compile"),
            credential_mode: CredentialMode::Passthrough,
            own_credentials: OwnCredentials::default(),
            recorder: None,
            audit: None,
            metrics: Metrics::new(),
            approvals: None,
            upstream: None,
            protect: Protect::new([crate::approval::DEFAULT_NAMESPACE.to_owned()]),
            limits: LimitConfig::default(),
        }
    }
}

/// The node agent's [`Guard`]: chaperone's decisions for every agent request.
pub struct NodeGuard {
    parts: GuardParts,
    limits: Arc<PodLimits>,
    preview: Option<PreviewClient>,
}

impl NodeGuard {
    pub fn new(parts: GuardParts) -> Self {
        let preview = parts.upstream.clone().map(|upstream| PreviewClient {
            upstream,
            masker: parts.masker.clone(),
            credential_mode: parts.credential_mode,
            own_credentials: parts.own_credentials.clone(),
        });
        NodeGuard {
            limits: PodLimits::new(parts.limits),
            preview,
            parts,
        }
    }

    /// The live per-pod usage.
    pub fn limits(&self) -> &Arc<PodLimits> {
        &self.limits
    }
}

// === helpers of the stages ===

/// The request body when it is at most `limit` bytes (its declared
/// `Content-Length` first): stages that judge a body read it through here,
/// and what they read is forwarded unchanged.
async fn read_body(
    parts: &Parts,
    body: &mut RequestBody,
    limit: usize,
) -> crate::proxy::body::WholeBody {
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    body.read_whole(limit, declared).await
}

/// The request's `Content-Type`, when it is readable.
fn content_type(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}
