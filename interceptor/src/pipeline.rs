//! One request through chaperone's decisions: the [`Guard`] the node agent
//! runs. In order: parse the Kubernetes RequestInfo, authenticate the token
//! and bind it to the kernel-attested pod, evaluate policy, refuse (403
//! Status) or forward with the agent's credentials, mask what the response
//! must not reveal, and record + audit the exchange when it ends.
//!
//! Nothing here blocks on disk or network except the token check (cached;
//! bounded by the identity module's own timeouts): recording, audit and
//! metrics are handed to bounded queues.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    admin::Metrics,
    approval::{Approvals, Ask, HeldRequest, Outcome},
    audit::{Admission, AuditGate},
    exec,
    identity::{
        Authenticator, Caller, CredentialMode, PodRef, ProcessInfo, bearer_token,
        upstream_identity_headers,
    },
    kstatus::Status,
    limits::{LimitConfig, LimitKey, PodLimits, Slot},
    mask::{Masker, ResponseMask, Target, negotiate_accept},
    pods::PodTracker,
    policy::{
        Action, Decision, PolicyInput, PolicySet, PolicyStore, RecordLevel, deny::refusal_status,
    },
    protect::{self, Check, Protect},
    proxy::{
        ConnectionInfo, Forward, Guard, ResponseObserver, TunnelTap, Upstream, Verdict,
        body::{BodyError, BodyObserver, BodyTransform, RequestBody, WholeBody, status_response},
    },
    record::{
        DecisionRecord, Exchange, Recorder, ResponseStatus, Session, SessionMeta, Stage,
        capture::{BodyCapture, CaptureSlot},
    },
    request::{CanonicalTarget, RequestInfo},
};

/// Everything the pipeline consults.
pub struct Pipeline {
    pub node: Arc<str>,
    pub authenticator: Arc<Authenticator>,
    /// cgroup id -> pod; `None` when no pod tracker runs (local mode).
    pub pods: Option<Arc<PodTracker>>,
    pub policy: Arc<PolicyStore>,
    pub masker: Masker,
    pub credential_mode: CredentialMode,
    /// chaperone's own `Authorization` for impersonate mode.
    pub own_credentials: Option<Arc<dyn Fn() -> Option<HeaderValue> + Send + Sync>>,
    /// chaperone authenticates with a client certificate, which the
    /// upstream's own-credentials pools present (impersonate mode without
    /// a token). Agents' own requests never carry it.
    pub own_client_certificate: bool,
    pub recorder: Option<Recorder>,
    pub audit: Option<AuditGate>,
    pub metrics: Metrics,
    /// Holds `approve` requests for a person; without it they are refused.
    pub approvals: Option<Arc<Approvals>>,
    /// For the `dryRun=All` preview of a held request.
    pub upstream: Option<Upstream>,
    /// The built-in refusals evaluated before policy.
    pub protect: Protect,
    /// Per-pod connection and in-flight request limits.
    pub limits: Arc<PodLimits>,
    connections: Mutex<HashMap<Uuid, Arc<ConnectionState>>>,
}

/// What the pipeline keeps per agent connection.
struct ConnectionState {
    pod: Option<PodRef>,
    process: Option<ProcessInfo>,
    session: Option<Session>,
    /// Whose per-pod limits this connection counts against (kernel
    /// attested; `None`: not limited).
    limit_key: Option<LimitKey>,
    /// The connection's place in its pod's connection limit, or the 429
    /// every request on it gets when the pod is over it.
    connection_slot: Result<Option<Slot>, Box<Status>>,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: impl Into<Arc<str>>,
        authenticator: Arc<Authenticator>,
        pods: Option<Arc<PodTracker>>,
        policy: Arc<PolicyStore>,
        masker: Masker,
        credential_mode: CredentialMode,
        recorder: Option<Recorder>,
        audit: Option<AuditGate>,
        metrics: Metrics,
    ) -> Self {
        Pipeline {
            node: node.into(),
            authenticator,
            pods,
            policy,
            masker,
            credential_mode,
            own_credentials: None,
            own_client_certificate: false,
            recorder,
            audit,
            metrics,
            approvals: None,
            upstream: None,
            protect: Protect::new([crate::approval::DEFAULT_NAMESPACE.to_owned()]),
            limits: PodLimits::new(LimitConfig::default()),
            connections: Mutex::new(HashMap::new()),
        }
    }

    fn connection(&self, conn: &Arc<ConnectionInfo>) -> Arc<ConnectionState> {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections
            .entry(conn.id)
            .or_insert_with(|| {
                let pod = conn.attested.as_ref().and_then(|attested| {
                    let pods = self.pods.as_ref()?;
                    pods.pod_for_cgroup(attested.agent_cgroup_id)
                        .or_else(|| pods.pod_for_cgroup(attested.cgroup_id))
                });
                // Read at the first request, while the process that dialed
                // is still there; a process that already exited is `None`.
                let process = conn
                    .attested
                    .as_ref()
                    .and_then(|attested| ProcessInfo::from_proc(attested.pid).ok());
                let session = self.recorder.as_ref().map(|recorder| {
                    recorder.session(SessionMeta {
                        pod: pod.clone(),
                        peer: conn.peer,
                        started: OffsetDateTime::from(conn.accepted_at),
                    })
                });
                let limit_key = match (&pod, &conn.attested) {
                    (Some(pod), _) if !pod.uid.is_empty() => {
                        Some(LimitKey::Pod(Arc::from(pod.uid.as_str())))
                    }
                    (_, Some(attested)) => Some(LimitKey::Cgroup(attested.agent_cgroup_id.0)),
                    _ => None,
                };
                let connection_slot = match &limit_key {
                    Some(key) => self.limits.connection(key.clone()).map(Some),
                    None => Ok(None),
                };
                Arc::new(ConnectionState {
                    pod,
                    process,
                    session,
                    limit_key,
                    connection_slot,
                })
            })
            .clone()
    }
}

impl Pipeline {
    /// The held request's effect as the API server computes it with
    /// `dryRun=All`, under the agent's own identity: what a delete would
    /// remove, the object a create would make, the changes an update or
    /// patch would apply (against a GET of the current object), or the
    /// error it would get. Masked like a response.
    async fn preview(
        &self,
        parts: &Parts,
        caller: &Caller,
        request: &RequestInfo,
        body: Option<&WholeBody>,
    ) -> Option<serde_json::Value> {
        use crate::approval::preview;
        let upstream = self.upstream.as_ref()?;
        let sent = match (&parts.method, body) {
            (&http::Method::DELETE, _) => None,
            (_, Some(WholeBody::Complete(bytes))) => Some(bytes.clone()),
            (_, Some(WholeBody::TooLarge { .. })) => {
                return Some(serde_json::json!({
                    "note": format!(
                        "the request body is larger than {} bytes: chaperone did not read it for a dry-run preview",
                        preview::BODY_READ_LIMIT
                    ),
                }));
            }
            _ => return None,
        };
        let mut headers = parts.headers.clone();
        let authorization = parts.headers.get(header::AUTHORIZATION).cloned();
        upstream_identity_headers(self.credential_mode, caller, authorization, &mut headers)
            .ok()?;
        if self.credential_mode == CredentialMode::Impersonate {
            match self.own_credentials.as_ref().and_then(|c| c()) {
                Some(own) => {
                    headers.insert(header::AUTHORIZATION, own);
                }
                None if self.own_client_certificate => {}
                None => return None,
            }
        }
        for name in [
            header::CONTENT_LENGTH,
            header::ACCEPT_ENCODING,
            header::TRANSFER_ENCODING,
            header::HOST,
            header::CONNECTION,
            header::EXPECT,
        ] {
            headers.remove(name);
        }
        // The body goes as the agent sent it (protobuf included); the
        // answer comes back as JSON.
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let query = match parts.uri.query() {
            Some(q) if !q.is_empty() => format!("{q}&dryRun=All"),
            _ => "dryRun=All".to_owned(),
        };
        let ask = |method: http::Method, path_and_query: String, body: Option<bytes::Bytes>| {
            let mut headers = headers.clone();
            if body.is_none() {
                headers.remove(header::CONTENT_TYPE);
            }
            async move {
                let path_and_query: http::uri::PathAndQuery = path_and_query.parse().ok()?;
                let mut request = http::Request::builder()
                    .method(method)
                    .uri(upstream.uri_for(Some(&path_and_query)))
                    .body(body.map_or_else(crate::proxy::body::empty, crate::proxy::body::full))
                    .ok()?;
                *request.headers_mut() = headers;
                let upstream = if self.credential_mode == CredentialMode::Impersonate {
                    upstream.with_own_credentials()
                } else {
                    upstream
                };
                let response = upstream.send(request, false).await.ok()?;
                let body = http_body_util::Limited::new(response.into_body(), 4 << 20);
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .ok()?
                    .to_bytes();
                serde_json::from_slice::<serde_json::Value>(&bytes).ok()
            }
        };
        let is_status = |v: &serde_json::Value| v["kind"] == "Status";
        let path = parts.uri.path();
        let effect = async {
            let dry_run = ask(
                parts.method.clone(),
                format!("{path}?{query}"),
                sent.clone(),
            )
            .await?;
            if is_status(&dry_run) {
                // The API server answers most deletes with a success Status:
                // what the delete would remove is the object itself.
                if parts.method == http::Method::DELETE
                    && dry_run["status"] == "Success"
                    && let Some(object) = ask(http::Method::GET, path.to_owned(), None).await
                {
                    return Some(preview::mask_object(&self.masker, request, object));
                }
                return Some(dry_run);
            }
            if matches!(parts.method, http::Method::PUT | http::Method::PATCH)
                && let Some(current) = ask(http::Method::GET, path.to_owned(), None).await
                && !is_status(&current)
            {
                return Some(preview::changes(&self.masker, request, &current, &dry_run));
            }
            // A create, or an update or apply that creates the object.
            Some(preview::mask_object(&self.masker, request, dry_run))
        };
        let value = tokio::time::timeout(std::time::Duration::from_secs(5), effect)
            .await
            .ok()??;
        Some(crate::approval::preview_summary(value))
    }
}

impl Pipeline {
    /// The [`protect`] stage: `Err` is the refusal to answer.
    async fn protect_stage(
        &self,
        parts: &Parts,
        body: &mut RequestBody,
        request: &RequestInfo,
        policy: &PolicySet,
        input: &PolicyInput<'_>,
    ) -> Result<(), Box<Status>> {
        match self.protect.check(request) {
            Check::Pass => Ok(()),
            Check::Refuse(status) => Err(status),
            Check::NeedsExplicitGrant => {
                if policy.grants_explicitly(input, &request.resource) {
                    Ok(())
                } else {
                    Err(Box::new(Protect::policy_write_refused(request)))
                }
            }
            Check::ReadBody => {
                let declared = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let whole = body.read_whole(protect::BODY_READ_LIMIT, declared).await;
                let content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                let current = self.pods.as_ref().and_then(|pods| {
                    if request.resource == "namespaces" {
                        pods.intercept_label("", &request.name)
                    } else {
                        pods.intercept_label(&request.namespace, &request.name)
                    }
                });
                self.protect
                    .check_body(request, content_type, &whole, current.as_deref())
            }
        }
    }
}

/// The decision recorded for a protect refusal: chaperone's own rule.
fn protect_decision(status: &Status) -> Decision {
    Decision {
        rule: Arc::from(protect::RULE),
        message: Some(Arc::from(status.message.as_str())),
        ..refused_before_policy()
    }
}

/// Whether a held request's body is read to summarize and preview it:
/// creates, updates and patches, not exec/attach streams or upgrades.
fn reads_body(parts: &Parts, request: &RequestInfo) -> bool {
    matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    ) && request.is_resource_request
        && !exec::is_exec(request)
        && !parts.headers.contains_key(header::UPGRADE)
}

impl Pipeline {
    /// The refusal of a create, update or patch of a masked resource type
    /// whose body carries chaperone's masks (see `mask::writeback`).
    async fn masked_write(
        &self,
        parts: &Parts,
        body: &mut RequestBody,
        request: &RequestInfo,
    ) -> Option<Status> {
        use crate::mask::writeback;
        if !reads_body(parts, request)
            || !matches!(
                self.masker.target(request),
                Some(Target::Secret | Target::ConfigMap | Target::Workload)
            )
        {
            return None;
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        match body.read_whole(writeback::BODY_READ_LIMIT, declared).await {
            WholeBody::Complete(bytes) => {
                writeback::find_markers(&bytes).map(|fields| writeback::refusal(request, &fields))
            }
            WholeBody::TooLarge { .. } => Some(Status::too_large(format!(
                "chaperone: writes of {} are checked for masked values and may be at most {} bytes",
                request.resource,
                writeback::BODY_READ_LIMIT
            ))),
            // The agent went away: forwarding fails the same way.
            WholeBody::Failed(_) => None,
        }
    }
}

impl Guard for Pipeline {
    async fn check(
        &self,
        conn: &Arc<ConnectionInfo>,
        parts: &mut Parts,
        body: &mut RequestBody,
    ) -> Verdict {
        let received = OffsetDateTime::now_utc();
        // One reading: from here on `parts.uri` is the canonical target, the
        // one judged and the one forwarded (see `request`).
        let target = CanonicalTarget::parse(parts.uri.path(), parts.uri.query());
        let request = match &target {
            Ok(target) => {
                parts.uri = target.uri(&parts.uri);
                RequestInfo::from_target(&parts.method, target)
            }
            Err(_) => RequestInfo {
                path: parts.uri.path().to_owned(),
                verb: parts.method.as_str().to_ascii_lowercase(),
                ..RequestInfo::default()
            },
        };
        let state = self.connection(conn);
        let mut exchange = ExchangeDraft {
            audit_id: Uuid::new_v4(),
            received,
            request_uri: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            request,
            caller: Arc::new(Caller {
                pod: state.pod.clone(),
                process: state.process.clone(),
                cgroup_id: conn.attested.as_ref().map(|a| a.cgroup_id.0),
                ..Caller::default()
            }),
            source_ip: conn.peer.ip(),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            decision: None,
            approval: None,
            session: state.session.as_ref().map(|_| state.clone()),
            masked: Arc::new(AtomicU32::new(0)),
            admission: None,
            node: self.node.clone(),
            metrics: self.metrics.clone(),
            masker: self.masker.clone(),
            query: parts.uri.query().map(str::to_owned),
            upgrade_end: None,
            request_body: CaptureSlot::default(),
            completed: false,
            in_flight: None,
        };

        // Per-pod limits, before anything else is spent on the request.
        if let Err(status) = &state.connection_slot {
            return exchange.refuse((**status).clone());
        }
        if let Some(key) = &state.limit_key {
            match self.limits.request(key.clone()) {
                Ok(slot) => exchange.in_flight = Some(slot),
                Err(status) => return exchange.refuse(*status),
            }
        }

        if let Some(gate) = &self.audit {
            match gate.admit() {
                Ok(admission) => exchange.admission = Some(admission),
                Err(full) => return exchange.refuse(full.status()),
            }
        }
        if let Err(ambiguous) = target {
            return exchange.refuse(ambiguous.status());
        }

        let token = match bearer_token(&parts.headers) {
            Ok(token) => token.to_owned(),
            Err(error) => return exchange.refuse(error.to_status()),
        };
        let caller = match self
            .authenticator
            .authenticate(&token, state.pod.as_ref(), state.process.clone())
            .await
        {
            Ok(caller) => caller,
            Err(error) => {
                if let Some(signal) = error.attack_signal() {
                    tracing::warn!(
                        signal = signal.as_str(),
                        peer = %conn.peer,
                        pod = ?state.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
                        %error,
                        "refused a token: attack signal"
                    );
                }
                return exchange.refuse(error.to_status());
            }
        };
        let caller = Arc::new(Caller {
            cgroup_id: exchange.caller.cgroup_id,
            ..caller
        });
        exchange.caller = caller.clone();

        let policy = self.policy.snapshot();
        let input = PolicyInput::new(&exchange.request, &caller);
        // Built-in refusals before policy: no AgentPolicy lets an agent
        // lower its own guard (the intercept label, chaperone's namespace
        // and objects, approvals).
        if let Err(status) = self
            .protect_stage(parts, body, &exchange.request, &policy, &input)
            .await
        {
            exchange.decision = Some(protect_decision(&status));
            return exchange.refuse(*status);
        }
        let decision = policy.evaluate(&input);
        // Writes never store a mask: checked before a person is asked.
        if (!decision.refuses() || decision.enforce == Action::Approve)
            && let Some(status) = self.masked_write(parts, body, &exchange.request).await
        {
            exchange.decision = Some(decision);
            return exchange.refuse(status);
        }
        if decision.enforce == Action::Approve
            && let Some(approvals) = &self.approvals
        {
            let hold = decision
                .hold_timeout
                .unwrap_or(crate::policy::DEFAULT_HOLD_TIMEOUT);
            // Only a held request's body is read before it is forwarded
            // (bounded): the person sees it, masked, and the approval is
            // for this very body.
            let mut held = HeldRequest::from_info(&exchange.request);
            held.bind(&parts.method, &parts.uri);
            // A delete's body (DeleteOptions: dryRun, propagation) changes
            // what runs: it is bound to the approval too.
            let binds_body =
                reads_body(parts, &exchange.request) || parts.method == http::Method::DELETE;
            let whole = if binds_body {
                let declared = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let whole = body
                    .read_whole(crate::approval::preview::BODY_READ_LIMIT, declared)
                    .await;
                let content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                held.body_summary = crate::approval::preview::body_summary(
                    &self.masker,
                    &exchange.request,
                    content_type,
                    &whole,
                );
                if let WholeBody::Complete(bytes) = &whole {
                    held.body_sha256 = Some(hex::encode(Sha256::digest(bytes)));
                }
                Some(whole)
            } else {
                None
            };
            let ask = Ask {
                caller: &caller,
                request: held,
                policy: &decision.policy,
                rule: &decision.rule,
            };
            let preview = self.preview(parts, &caller, &exchange.request, whole.as_ref());
            // Set before the wait: an agent that gives up while held is
            // audited as a held request it abandoned.
            exchange.decision = Some(decision.clone());
            let outcome = approvals.hold(ask, hold, preview).await;
            match outcome {
                Outcome::Approved(decided) | Outcome::Granted { decided, .. } => {
                    tracing::info!(
                        audit_id = %exchange.audit_id,
                        approval = %decided.id,
                        by = %decided.by,
                        "approved: forwarding the held request"
                    );
                    exchange.approval = Some((Arc::from(decided.id), Arc::from(decided.by)));
                }
                other => {
                    if let Some(id) = other.id() {
                        exchange.approval = Some((Arc::from(id), Arc::from("")));
                    }
                    let approve = other
                        .id()
                        .map(|id| approvals.approve_command(id))
                        .unwrap_or_default();
                    let status = crate::approval::refusal(
                        &other,
                        &approve,
                        &decision,
                        &exchange.request,
                        hold,
                    );
                    return exchange.refuse(status);
                }
            }
        } else if decision.refuses() {
            let status = refusal_status(&policy, &input, &decision);
            exchange.decision = Some(decision);
            return exchange.refuse(status);
        }
        if decision.dry_run {
            tracing::info!(
                audit_id = %exchange.audit_id,
                policy = &*decision.policy,
                rule = &*decision.rule,
                would = %decision.action,
                "dry-run: would have refused"
            );
        }
        if exchange.decision.is_none() {
            exchange.decision = Some(decision);
        }

        // Credentials upstream: the agent's own (passthrough), or chaperone's
        // with impersonation headers. Agent-sent Impersonate-* never pass.
        // The node's mode, or impersonate where a policy selecting this
        // caller asks for it (credential modes per policy).
        let credential_mode = match policy.credential_mode(&input) {
            CredentialMode::Impersonate => CredentialMode::Impersonate,
            CredentialMode::Passthrough => self.credential_mode,
        };
        // The agent's Authorization (a shared-bytes clone, not a copy of
        // every header) before the identity headers are rewritten.
        let authorization = parts.headers.get(header::AUTHORIZATION).cloned();
        if let Err(error) =
            upstream_identity_headers(credential_mode, &caller, authorization, &mut parts.headers)
        {
            return exchange.refuse(Status::bad_request(format!("chaperone: {error}")));
        }
        if credential_mode == CredentialMode::Impersonate {
            match self
                .own_credentials
                .as_ref()
                .and_then(|credentials| credentials())
            {
                Some(value) => {
                    parts.headers.insert(header::AUTHORIZATION, value);
                }
                // The client certificate on the own-credentials pools.
                None if self.own_client_certificate => {}
                None => {
                    return exchange.refuse(Status::service_unavailable(
                        "chaperone: impersonate mode needs chaperone's own API credentials, which are not available",
                    ));
                }
            }
        }
        parts.headers.insert(
            "audit-id",
            HeaderValue::from_str(&exchange.audit_id.to_string()).expect("uuid"),
        );

        // An upgrade chaperone would not read (a watch or log over
        // WebSocket) never carries what must be masked or recorded.
        let masked = self.masker.target(&exchange.request).is_some()
            || exchange.decision.as_ref().map(|d| d.action) == Some(Action::Mask);
        let bodies_recorded = exchange.level() >= RecordLevel::Request;
        if let Err(status) =
            exec::refuse_unread_upgrade(&exchange.request, &parts.headers, masked, bodies_recorded)
        {
            return exchange.refuse(*status);
        }

        // Masking: negotiate a body we can mask before asking.
        let mut response_transform = None;
        if let Some(target) = self.masker.target(&exchange.request) {
            // Exec output is read over the protocols chaperone decodes only.
            if target == Target::ExecOutput
                && let Err(status) = exec::negotiate(&mut parts.headers)
            {
                return exchange.refuse(*status);
            }
            // A gzipped body could not be masked.
            parts.headers.remove(header::ACCEPT_ENCODING);
            if target.is_json() {
                match negotiate_accept(parts.headers.get(header::ACCEPT)) {
                    Ok(accept) => {
                        parts.headers.insert(header::ACCEPT, accept);
                    }
                    Err(not_acceptable) => return exchange.refuse(not_acceptable.status()),
                }
            }
            let masker = self.masker.clone();
            let request = exchange.request.clone();
            let masked = exchange.masked.clone();
            response_transform = Some(Box::new(move |headers: &HeaderMap| {
                let content_type = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                match masker.plan(&request, content_type) {
                    Ok(Some(mask)) => Ok(Some(
                        Box::new(MaskTransform { mask, masked }) as Box<dyn BodyTransform>
                    )),
                    Ok(None) => Ok(None),
                    Err(error) => Err(Box::new(error.status())),
                }
            }) as crate::proxy::guard::TransformFactory);
        }
        // Bodies for the record, at the levels that keep them.
        let request_observer = (exchange.level() >= RecordLevel::Request
            && !exec::is_exec(&exchange.request))
        .then(|| {
            let content_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            BodyCapture::request(&self.masker, &exchange.request, content_type)
                .into_observer(exchange.request_body.clone())
        });
        Verdict::Forward(Forward {
            response_transform,
            observer: Some(Box::new(exchange)),
            request_observer,
            own_credentials: credential_mode == CredentialMode::Impersonate,
        })
    }

    fn connection_closed(&self, conn: &Arc<ConnectionInfo>) {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn.id);
    }
}

/// A masking transform that counts what it masked for audit and metrics.
struct MaskTransform {
    mask: ResponseMask,
    masked: Arc<AtomicU32>,
}

impl MaskTransform {
    fn count(&self) {
        let stats = self.mask.stats();
        let total = stats.values_masked + stats.pattern_matches;
        self.masked
            .store(u32::try_from(total).unwrap_or(u32::MAX), Ordering::Relaxed);
    }
}

impl BodyTransform for MaskTransform {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BodyError> {
        self.mask
            .push(chunk, out)
            .map_err(|e| Box::new(e) as BodyError)?;
        // Logs and exec: send what is complete now (a prompt, a line).
        self.mask.flush(out);
        self.count();
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), BodyError> {
        self.mask
            .finish(out)
            .map_err(|e| Box::new(e) as BodyError)?;
        self.count();
        Ok(())
    }
}

/// One exchange being followed to its end, then recorded and audited.
struct ExchangeDraft {
    audit_id: Uuid,
    received: OffsetDateTime,
    request_uri: String,
    request: RequestInfo,
    caller: Arc<Caller>,
    source_ip: IpAddr,
    user_agent: Option<String>,
    decision: Option<Decision>,
    /// `(approval id, approver)` for a held request.
    approval: Option<(Arc<str>, Arc<str>)>,
    session: Option<Arc<ConnectionState>>,
    masked: Arc<AtomicU32>,
    admission: Option<Admission>,
    node: Arc<str>,
    metrics: Metrics,
    masker: Masker,
    query: Option<String>,
    /// An upgraded exec/attach: its end is the tunnel's end.
    upgrade_end: Option<Arc<Mutex<Option<BodyEnd>>>>,
    /// The request body (masked) when the record level keeps it.
    request_body: CaptureSlot,
    /// A `ResponseComplete` was recorded. An exchange dropped without one
    /// was abandoned by the agent (it went away while the request was held
    /// or waiting for the API server): [`Drop`] records that, so every
    /// request reaches the audit log and the session.
    completed: bool,
    /// Its place in the pod's in-flight limit, held until it ends.
    in_flight: Option<Slot>,
}

impl ExchangeDraft {
    /// Answers the agent with `status` and records the refusal.
    fn refuse(mut self, status: Status) -> Verdict {
        let response = status_response(&status);
        let code = status.code;
        let response_status = ResponseStatus::failure(code, status.reason, status.message.clone());
        self.finish(response_status, Stage::ResponseComplete, None, None);
        Verdict::Respond(response)
    }

    fn level(&self) -> RecordLevel {
        self.decision
            .as_ref()
            .map_or(RecordLevel::Metadata, |d| d.record)
    }

    fn decision_record(&self) -> DecisionRecord {
        match &self.decision {
            Some(decision) => {
                let mut record = DecisionRecord::from_decision(
                    decision,
                    self.approval.as_ref().map(|(id, _)| &**id),
                );
                record.approved_by = self
                    .approval
                    .as_ref()
                    .map(|(_, by)| by.clone())
                    .filter(|by| !by.is_empty());
                record
            }
            // Refused before policy (token, audit gate): recorded as a deny
            // by chaperone itself.
            None => DecisionRecord {
                action: crate::policy::Action::Deny,
                level: RecordLevel::Metadata,
                policy: Arc::from(""),
                rule: Arc::from("authentication"),
                ..DecisionRecord::from_decision(&refused_before_policy(), None)
            },
        }
    }

    fn finish(
        &mut self,
        status: ResponseStatus,
        stage: Stage,
        started: Option<OffsetDateTime>,
        response_body: Option<serde_json::Value>,
    ) {
        let decision = self.decision_record();
        let request_body = self
            .request_body
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let exchange = Arc::new(Exchange {
            audit_id: self.audit_id,
            stage,
            received: self.received,
            response_started: started,
            completed: OffsetDateTime::now_utc(),
            request_uri: self.request_uri.clone(),
            request: self.request.clone(),
            caller: self.caller.clone(),
            impersonated_user: None,
            source_ips: vec![self.source_ip],
            user_agent: self.user_agent.clone(),
            decision,
            status,
            request_body,
            response_body,
            masked_fields: self.masked.load(Ordering::Relaxed),
            node: self.node.clone(),
        });
        if stage == Stage::ResponseComplete {
            self.completed = true;
            // Counted whatever the record level.
            self.metrics.exchange(&exchange);
        }
        if exchange.decision.level == RecordLevel::None {
            return;
        }
        let session = (stage == Stage::ResponseComplete)
            .then(|| self.session.clone())
            .flatten();
        let audit = self.admission.as_ref().map(Admission::gate);
        // Both wake another thread: after the response is on its way.
        crate::proxy::defer_until_idle(move || {
            if let Some(session) = session.as_ref().and_then(|s| s.session.as_ref()) {
                session.exchange(exchange.clone());
            }
            if let Some(audit) = audit {
                audit.submit(exchange);
            }
        });
    }
}

/// The status recorded for a request the agent abandoned before any
/// response: nginx's 499, which log tooling knows as "client closed request".
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Drop for ExchangeDraft {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        let held = self.decision.as_ref().map(|d| d.enforce) == Some(Action::Approve)
            && self.approval.is_none();
        let message = if held {
            "the agent went away while the request was held for approval"
        } else {
            "the agent went away before the API server answered"
        };
        self.finish(
            ResponseStatus::failure(CLIENT_CLOSED_REQUEST, "ClientClosedRequest", message),
            Stage::ResponseComplete,
            None,
            None,
        );
    }
}

fn refused_before_policy() -> Decision {
    Decision {
        action: crate::policy::Action::Deny,
        enforce: crate::policy::Action::Deny,
        record: RecordLevel::Metadata,
        policy: Arc::from(""),
        rule: Arc::from("authentication"),
        message: None,
        dry_run: false,
        hold_timeout: None,
    }
}

impl ResponseObserver for ExchangeDraft {
    fn on_response(
        mut self: Box<Self>,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Box<dyn BodyObserver>> {
        let long_running = self.request.verb == "watch"
            || matches!(
                self.request.subresource.as_str(),
                "exec" | "attach" | "portforward"
            )
            || status == StatusCode::SWITCHING_PROTOCOLS;
        let started = OffsetDateTime::now_utc();
        if long_running {
            self.finish(
                ResponseStatus::ok(status.as_u16()),
                Stage::ResponseStarted,
                Some(started),
                None,
            );
            if let Some(admission) = &mut self.admission {
                admission.release_slot();
            }
        }
        let mut draft = *self;
        let upgrade_end = draft.upgrade_end.take();
        let capture = (draft.level() >= RecordLevel::RequestResponse && upgrade_end.is_none())
            .then(|| {
                let content_type = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                BodyCapture::response(&draft.masker, content_type)
            });
        let end = BodyEnd {
            draft,
            code: status.as_u16(),
            started,
            capture,
        };
        match upgrade_end {
            // Completed when the tunnel closes.
            Some(slot) if status == StatusCode::SWITCHING_PROTOCOLS => {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(end);
                None
            }
            _ => Some(Box::new(end)),
        }
    }

    fn on_upgrade(&mut self, headers: &HeaderMap) -> Option<Box<dyn TunnelTap>> {
        if !exec::is_exec(&self.request) {
            return None;
        }
        let slot: Arc<Mutex<Option<BodyEnd>>> = Arc::new(Mutex::new(None));
        self.upgrade_end = Some(slot.clone());
        let recording = self
            .session
            .clone()
            .filter(|_| self.decision_record().level != RecordLevel::None)
            .map(|state| {
                let audit_id = self.audit_id;
                let start: exec::StartRecording = Box::new(move |info| {
                    let session = state.session.as_ref().expect("only sessions are recorded");
                    session.stream(audit_id, info, OffsetDateTime::now_utc())
                });
                (
                    exec::stream_info(&self.request, self.query.as_deref()),
                    start,
                )
            });
        let on_closed: exec::OnClosed = Box::new(move || {
            let end = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut end) = end {
                end.on_end(Ok(()));
            }
        });
        Some(exec::tap(
            &self.masker,
            &self.request,
            headers,
            recording,
            self.masked.clone(),
            on_closed,
        ))
    }
}

struct BodyEnd {
    draft: ExchangeDraft,
    /// The response body as the agent received it, at `RequestResponse`.
    capture: Option<BodyCapture>,
    code: u16,
    started: OffsetDateTime,
}

impl Drop for BodyEnd {
    /// A response whose end was never observed (its body dropped unpolled):
    /// still completed in the record, as cut short.
    fn drop(&mut self) {
        if !self.draft.completed {
            self.on_end(Err("the response was dropped before its end".into()));
        }
    }
}

impl BodyObserver for BodyEnd {
    fn on_data(&mut self, chunk: &[u8]) {
        if let Some(capture) = &mut self.capture {
            capture.push(chunk);
        }
    }

    fn on_end(&mut self, result: Result<(), String>) {
        let status = match (result, self.code) {
            (Ok(()), code) if code < 400 => ResponseStatus::ok(code),
            (Ok(()), code) => ResponseStatus::failure(code, "", ""),
            (Err(reason), code) => ResponseStatus::failure(code, "StreamEnded", reason),
        };
        let response_body = self.capture.take().and_then(BodyCapture::finish);
        self.draft.finish(
            status,
            Stage::ResponseComplete,
            Some(self.started),
            response_body,
        );
    }
}
