//! Just-in-time approval: a request whose rule says `approve` becomes an
//! [`ApprovalRequest`] and waits (asynchronously, up to the rule's hold
//! timeout) for a person to approve or deny it.
//!
//! # Where approvals live
//!
//! - Cluster mode: `ApprovalRequest` objects in one namespace
//!   (`chaperone-system` by default). Every node agent watches them, so an
//!   approval made anywhere releases the request held on any node, and a
//!   pending approval survives a node agent's restart.
//! - Local mode (`--approval-dir`): one JSON file per approval, same
//!   fields; people decide with `kubectl chaperone --local-dir DIR`.
//!
//! # Who may decide
//!
//! A decision is written on the object's status by `kubectl chaperone
//! approve|deny` with the approver's own credentials: `decidedBy` is who
//! the API server says they are (SelfSubjectReview). Each node checks every
//! decision before it acts on it: the decider is not the requester, and a
//! SubjectAccessReview says the decider may `approve` (or `deny`)
//! `approvalrequests.chaperone.dev` in that namespace. A decision that
//! fails the check is ignored and written back as `refusedDecision`. Agents
//! cannot write approvals at all: chaperone refuses any agent request that
//! changes an `ApprovalRequest`, whatever the policy says.
//!
//! # One request, one approval
//!
//! An approval lets the request it was made for through once (`usedAt`). A
//! retry of the same request by the same caller (same rule) finds the
//! pending or approved-but-unused approval by its request key label
//! instead of creating another. An approval may open a grant: for its
//! duration, the same caller's requests that the same rule holds go through
//! without a new approval (`kubectl chaperone grants`, `revoke`).

pub mod attest;
pub mod cli;
mod decide;
mod dry_run;
pub mod notify;
mod object;
pub mod preview;
mod refusal;
mod store;
#[cfg(test)]
mod tests;
mod whoami;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use time::OffsetDateTime;
use tokio::sync::watch;

pub use decide::{Refused, Ruling};
pub use dry_run::PreviewClient;
pub use object::{
    ApprovalRequest, ApprovalRequestSpec, ApprovalStatus, GRANT_KEY_LABEL, GrantScope, HeldRequest,
    REQUEST_KEY_LABEL, Requester, RequesterPod, State, format_time, grant_key, new_id, parse_time,
    request_key,
};
pub use refusal::{
    APPROVAL_CAUSE, agents_may_not_decide, preview_summary, refusal, writes_approvals,
};
pub use store::{Backend, LocalStore, StoreError};

use crate::identity::Caller;
use notify::Notifier;

/// The namespace approvals live in unless configured otherwise.
pub const DEFAULT_NAMESPACE: &str = "chaperone-system";
/// How long an approval can be decided and used after it is requested.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// What the guard asks for one held request.
pub struct Ask<'a> {
    pub caller: &'a Caller,
    pub request: HeldRequest,
    pub policy: &'a str,
    pub rule: &'a str,
}

/// A decision as the node accepted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub id: String,
    pub by: String,
    pub reason: Option<String>,
}

/// What became of a held request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Approved for this request: forward it (the approval is now used).
    Approved(Decided),
    /// A grant of an earlier approval covers it: forward it.
    Granted {
        decided: Decided,
        until: OffsetDateTime,
    },
    /// A person denied it.
    Denied(Decided),
    /// Nobody decided within the hold timeout; the approval stays pending
    /// (`created` is `false` when an earlier identical request made it).
    StillPending { id: String, created: bool },
    /// The approval expired before anyone decided.
    Expired { id: String },
    /// Approved, but another identical request (on this node or another)
    /// went through with it first: an approval lets one request through.
    UsedElsewhere { id: String },
    /// The approval could not be created or read.
    Unavailable(String),
}

/// Why the node does not act on a decision written on an approval; the
/// decision is put back to `Pending` with this reason, and audited.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecisionRefused {
    #[error("refused as a possible forgery: {0}")]
    Forgery(attest::Unattested),
    #[error(
        "node {node} has no --approval-verify-key, so it cannot tell who made this decision \
         and acts on none: give it chaperone's webhook public key (ConfigMap \
         chaperone-attestation-public, see deploy/README.md), or start it with \
         --approval-trust-unattested to trust decidedBy as written"
    )]
    NoVerifyKey { node: String },
    #[error("the decision does not say who made it (decidedBy)")]
    NoDecider,
    #[error("{by} requested this approval and cannot decide it: a requester never approves itself")]
    Requester { by: String },
    #[error(
        "{by} is one of chaperone's own service accounts (namespace {namespace}): chaperone never decides its own approvals"
    )]
    OwnServiceAccount { by: String, namespace: String },
    /// The SubjectAccessReview said no, or could not be made.
    #[error("{0}")]
    MayNotDecide(String),
}

/// The hold manager: a cache of approvals kept current by the backend,
/// and the waiting held requests.
pub struct Approvals {
    backend: Backend,
    node: String,
    ttl: Duration,
    notifier: Option<Notifier>,
    /// Cluster mode: only decisions attested by chaperone's admission
    /// webhook count ([`attest`]).
    verifier: Option<attest::Verifier>,
    cache: Mutex<BTreeMap<String, ApprovalRequest>>,
    /// Bumped on every cache change; held requests wait on it.
    changed: watch::Sender<u64>,
    /// `true` once the backend's first list is in the cache.
    synced: watch::Sender<bool>,
    /// Checked decisions by `(name, resourceVersion)`: `Err(why)` when the
    /// decision is refused.
    checked: Mutex<HashMap<(String, String), Result<(), DecisionRefused>>>,
    /// Where held requests are counted (`chaperone_approvals_held`).
    metrics: std::sync::OnceLock<crate::admin::Metrics>,
    /// Where refused forgeries are audited (the node's audit pipeline).
    audit: std::sync::OnceLock<crate::audit::AuditGate>,
    /// Cluster mode without a verifier: refuse every decision (the node
    /// agent's default; `--approval-trust-unattested` leaves it unset).
    refuse_unattested: std::sync::atomic::AtomicBool,
}

/// One request waiting for a decision, counted in
/// `chaperone_approvals_held` until it stops waiting (decided, timed out,
/// or the agent went away).
struct Waiting<'a>(Option<&'a crate::admin::Metrics>);

impl<'a> Waiting<'a> {
    fn new(metrics: Option<&'a crate::admin::Metrics>) -> Self {
        if let Some(metrics) = metrics {
            metrics.held_approvals(1);
        }
        Waiting(metrics)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(metrics) = self.0 {
            metrics.held_approvals(-1);
        }
    }
}

impl Approvals {
    /// Starts the backend's feed (watch or directory poll) and the expiry
    /// sweep on the current runtime.
    pub fn start(
        backend: Backend,
        node: impl Into<String>,
        ttl: Duration,
        notifier: Option<Notifier>,
    ) -> Arc<Self> {
        Self::start_attested(backend, node, ttl, notifier, None)
    }

    /// [`Approvals::start`], accepting in cluster mode only decisions that
    /// `verifier` finds attested.
    pub fn start_attested(
        backend: Backend,
        node: impl Into<String>,
        ttl: Duration,
        notifier: Option<Notifier>,
        verifier: Option<attest::Verifier>,
    ) -> Arc<Self> {
        let approvals = Arc::new(Approvals {
            backend,
            node: node.into(),
            ttl,
            notifier,
            verifier,
            cache: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            synced: watch::channel(false).0,
            checked: Mutex::new(HashMap::new()),
            metrics: std::sync::OnceLock::new(),
            audit: std::sync::OnceLock::new(),
            refuse_unattested: std::sync::atomic::AtomicBool::new(false),
        });
        store::spawn_feed(approvals.clone());
        if approvals.notifier.is_some() {
            tokio::spawn(announce_decisions(Arc::downgrade(&approvals)));
        }
        let sweeper = Arc::downgrade(&approvals);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let Some(approvals) = sweeper.upgrade() else {
                    return;
                };
                approvals.expire_overdue().await;
            }
        });
        approvals
    }

    pub fn namespace(&self) -> &str {
        self.backend.namespace()
    }

    /// Counts the requests waiting for a decision in `metrics`
    /// (`chaperone_approvals_held`).
    pub fn report_to(&self, metrics: crate::admin::Metrics) {
        let _ = self.metrics.set(metrics);
    }

    /// Without a verifier in cluster mode, refuse every decision instead of
    /// trusting `decidedBy` as written.
    pub fn refuse_unattested_decisions(&self) {
        self.refuse_unattested
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Audits every decision refused as a forgery through `gate` (the
    /// node's audit pipeline, `audit.k8s.io/v1`).
    pub fn audit_to(&self, gate: crate::audit::AuditGate) {
        let _ = self.audit.set(gate);
    }

    /// One audit event for a decision refused as a forgery: an `update` of
    /// the approval's status, answered 403 with why. Who wrote it is not
    /// known (it is unattested), so `user` is empty and `impersonatedUser`
    /// is whom the status claimed; `chaperone.dev/rule` is
    /// `approval-forgery`, `chaperone.dev/approval` the approval.
    /// `why: None`: an unattested decision trusted because of
    /// `--approval-trust-unattested`, answered 200 under the rule
    /// `approval-trusted-unattested`.
    fn audit_unattested(
        &self,
        approval: &ApprovalRequest,
        status: &ApprovalStatus,
        why: Option<&str>,
    ) {
        let id = approval.name();
        let refusal = why.map(|why| {
            format!(
                "{:?} decision on approval {id} claiming {} refused as a possible forgery: {why}",
                status.state,
                status.decided_by.as_deref().unwrap_or("nobody"),
            )
        });
        let rule = if why.is_some() {
            "approval-forgery"
        } else {
            "approval-trusted-unattested"
        };
        self.audit_decision(approval, status, rule, refusal);
    }

    /// One audit event for a decision the node refused for any reason other
    /// than a missing or bad attestation (the decider may not decide, is
    /// the requester, is one of chaperone's own service accounts): rule
    /// `approval-decision-refused`, 403 with why, `impersonatedUser` the
    /// decider the status names (attested by the webhook when the node has
    /// the verify key).
    fn audit_refused_decision(
        &self,
        approval: &ApprovalRequest,
        status: &ApprovalStatus,
        why: &str,
    ) {
        let refusal = format!(
            "{:?} decision on approval {} by {} refused: {why}",
            status.state,
            approval.name(),
            status.decided_by.as_deref().unwrap_or("nobody"),
        );
        self.audit_decision(approval, status, "approval-decision-refused", Some(refusal));
    }

    /// The audit event of a decision the node judged: `refusal: None` is
    /// one it acted on (200), `Some` one it refused (403, the message).
    fn audit_decision(
        &self,
        approval: &ApprovalRequest,
        status: &ApprovalStatus,
        rule: &'static str,
        refusal: Option<String>,
    ) {
        use crate::exchange::{DecisionRecord, Exchange, ResponseStatus, Stage, UserInfo};
        let Some(gate) = self.audit.get() else {
            return;
        };
        let namespace = self.backend.namespace().to_owned();
        let id = approval.name().to_owned();
        let uri = format!(
            "/apis/chaperone.dev/v1alpha1/namespaces/{namespace}/approvalrequests/{id}/status"
        );
        let now = OffsetDateTime::now_utc();
        let claimed = UserInfo {
            username: status.decided_by.clone().unwrap_or_default(),
            groups: status.decided_by_groups.clone(),
            ..UserInfo::default()
        };
        gate.submit(Arc::new(Exchange {
            audit_id: uuid::Uuid::new_v4(),
            stage: Stage::ResponseComplete,
            received: now,
            response_started: None,
            completed: now,
            request_uri: uri.clone(),
            request: crate::request::RequestInfo {
                is_resource_request: true,
                path: uri,
                verb: "update".into(),
                api_prefix: "apis".into(),
                api_group: "chaperone.dev".into(),
                api_version: "v1alpha1".into(),
                namespace,
                resource: "approvalrequests".into(),
                subresource: "status".into(),
                name: id.clone(),
                ..Default::default()
            },
            caller: Arc::new(Caller::default()),
            impersonated_user: Some(claimed),
            source_ips: Vec::new(),
            user_agent: None,
            decision: DecisionRecord {
                action: if refusal.is_some() {
                    crate::policy::Action::Deny
                } else {
                    crate::policy::Action::Allow
                },
                level: crate::policy::RecordLevel::Metadata,
                policy: Arc::from(""),
                rule: Arc::from(rule),
                dry_run: false,
                approval: Some(Arc::from(id.as_str())),
                approved_by: None,
            },
            status: match refusal {
                Some(message) => ResponseStatus::failure(403, "Forbidden", message),
                None => ResponseStatus::ok(200),
            },
            request_body: None,
            response_body: None,
            masked_fields: 0,
            node: Arc::from(self.node.as_str()),
        }));
    }

    /// The command a person runs to approve `id`.
    pub fn approve_command(&self, id: &str) -> String {
        match &self.backend {
            Backend::Local(local) => format!(
                "kubectl chaperone --local-dir {} approve {id}",
                local.dir.display()
            ),
            Backend::Cluster { namespace, .. } if namespace == DEFAULT_NAMESPACE => {
                format!("kubectl chaperone approve {id}")
            }
            Backend::Cluster { namespace, .. } => {
                format!("kubectl chaperone approve {id} -n {namespace}")
            }
        }
    }

    /// Replaces the whole cache (a relist).
    pub(crate) fn replace_all(&self, objects: Vec<ApprovalRequest>) {
        let mut cache = self.lock_cache();
        cache.clear();
        for object in objects {
            cache.insert(object.name().to_owned(), object);
        }
        drop(cache);
        self.synced.send_replace(true);
        self.bump();
    }

    pub(crate) fn upsert(&self, object: ApprovalRequest) {
        self.lock_cache().insert(object.name().to_owned(), object);
        self.bump();
    }

    pub(crate) fn remove(&self, name: &str) {
        self.lock_cache().remove(name);
        self.bump();
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ApprovalRequest>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of every cached approval.
    pub fn list(&self) -> Vec<ApprovalRequest> {
        self.lock_cache().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<ApprovalRequest> {
        self.lock_cache().get(name).cloned()
    }

    /// Waits (bounded) for the backend's first list, so a retry after a
    /// restart finds its approval instead of making a duplicate.
    async fn wait_synced(&self, limit: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        tokio::time::timeout(limit, synced.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The approval a held request is waiting on, or the decision that
    /// lets it through: grants first, then this request's own approval
    /// (found by its key), else a new one. Then waits up to `hold`.
    /// `preview` is asked for only when a new approval is created.
    pub async fn hold<F>(&self, ask: Ask<'_>, hold: Duration, preview: F) -> Outcome
    where
        F: Future<Output = Option<serde_json::Value>>,
    {
        if !self.wait_synced(Duration::from_secs(5)).await {
            return Outcome::Unavailable(format!(
                "the approvals in namespace {:?} could not be read yet",
                self.namespace()
            ));
        }
        let now = OffsetDateTime::now_utc();
        if let Some(outcome) = self.granted(&ask, now).await {
            return outcome;
        }
        let key = request_key(ask.caller, &ask.request, ask.policy, ask.rule);
        let existing = self
            .list()
            .into_iter()
            .filter(|a| a.label(REQUEST_KEY_LABEL) == Some(key.as_str()))
            // The label is a shortened hash: what the person approved must
            // be this very request (method, target and query, body).
            .filter(|a| a.spec.request.is_same_request(&ask.request))
            .filter(|a| !a.is_used() && !a.is_expired(now))
            .max_by(|a, b| a.spec.expires_at.cmp(&b.spec.expires_at));
        let (id, created) = match existing {
            Some(found) => {
                tracing::info!(
                    approval = found.name(),
                    requester = %ask.caller.username,
                    request = %ask.request.describe(),
                    "held a request: it waits on an existing approval"
                );
                (found.name().to_owned(), false)
            }
            None => {
                let object = self.new_object(&ask, &key, now, hold, preview.await);
                let id = object.name().to_owned();
                if let Err(why) = self.backend.create(&object).await {
                    return Outcome::Unavailable(why.to_string());
                }
                tracing::info!(
                    approval = %id,
                    requester = %ask.caller.username,
                    request = %ask.request.describe(),
                    policy = ask.policy,
                    rule = ask.rule,
                    "held a request for approval"
                );
                if let Some(notifier) = &self.notifier {
                    notifier.requested(&object);
                }
                self.upsert(object);
                (id, true)
            }
        };
        let _waiting = Waiting::new(self.metrics.get());
        self.wait(&id, created, hold).await
    }

    fn new_object(
        &self,
        ask: &Ask<'_>,
        key: &str,
        now: OffsetDateTime,
        hold: Duration,
        preview: Option<serde_json::Value>,
    ) -> ApprovalRequest {
        let mut object = ApprovalRequest::new(
            &new_id(),
            ApprovalRequestSpec {
                requester: Requester::from_caller(ask.caller),
                request: ask.request.clone(),
                policy: ask.policy.to_owned(),
                rule: ask.rule.to_owned(),
                preview,
                expires_at: format_time(now + self.ttl),
                hold_seconds: Some(hold.as_secs()),
                node: Some(self.node.clone()),
            },
        );
        object.metadata.namespace = Some(self.namespace().to_owned());
        object.metadata.labels = Some(BTreeMap::from([
            (REQUEST_KEY_LABEL.to_owned(), key.to_owned()),
            (
                GRANT_KEY_LABEL.to_owned(),
                grant_key(&ask.caller.username, ask.policy, ask.rule),
            ),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "chaperone".to_owned(),
            ),
        ]));
        object.status = Some(ApprovalStatus::default());
        object
    }

    /// A grant that covers this caller and rule now, if any.
    async fn granted(&self, ask: &Ask<'_>, now: OffsetDateTime) -> Option<Outcome> {
        let key = grant_key(&ask.caller.username, ask.policy, ask.rule);
        let candidates: Vec<_> = self
            .list()
            .into_iter()
            .filter(|a| a.label(GRANT_KEY_LABEL) == Some(key.as_str()))
            .filter(|a| a.spec.requester.username == ask.caller.username)
            .filter(|a| a.grant_until().is_some_and(|until| until > now))
            .filter(|a| a.grant_covers(&ask.request))
            .collect();
        for approval in candidates {
            if self.check_decision(&approval).await.is_ok() {
                let status = approval.status.clone().unwrap_or_default();
                return Some(Outcome::Granted {
                    decided: Decided {
                        id: approval.name().to_owned(),
                        by: status.decided_by.unwrap_or_default(),
                        reason: status.reason,
                    },
                    until: approval.grant_until()?,
                });
            }
        }
        None
    }

    /// Waits for a decision on `id` up to `hold`.
    async fn wait(&self, id: &str, created: bool, hold: Duration) -> Outcome {
        let deadline = tokio::time::Instant::now() + hold;
        let mut changed = self.changed.subscribe();
        loop {
            changed.mark_unchanged();
            let Some(approval) = self.get(id) else {
                return Outcome::Unavailable(format!("approval {id} was deleted"));
            };
            let now = OffsetDateTime::now_utc();
            match approval.state() {
                State::Approved | State::Denied => match self.check_decision(&approval).await {
                    Ok(decided) if approval.state() == State::Approved => {
                        if approval.is_used() || !self.claim(id) {
                            return Outcome::UsedElsewhere { id: id.to_owned() };
                        }
                        match self.backend.mark_used(&approval, now).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::info!(
                                    approval = id,
                                    "the approval changed before it was used (another node?); not using it"
                                );
                                return Outcome::UsedElsewhere { id: id.to_owned() };
                            }
                            // Fail closed: an approval that cannot be marked
                            // used could let a second request through.
                            Err(why) => return Outcome::Unavailable(why.to_string()),
                        }
                        return Outcome::Approved(decided);
                    }
                    Ok(decided) => return Outcome::Denied(decided),
                    Err(_) => {}
                },
                State::Expired => return Outcome::Expired { id: id.to_owned() },
                State::Pending if approval.is_expired(now) => {
                    return Outcome::Expired { id: id.to_owned() };
                }
                State::Pending => {}
            }
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        return Outcome::Unavailable("chaperone is shutting down".into());
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Outcome::StillPending { id: id.to_owned(), created };
                }
            }
        }
    }

    /// Takes an approved approval for one request: `false` when this node
    /// already let a request through with it (the cache may not show
    /// `usedAt` yet). Marks it used in the cache at once.
    fn claim(&self, id: &str) -> bool {
        let mut cache = self.lock_cache();
        let Some(approval) = cache.get_mut(id) else {
            return false;
        };
        let status = approval.status.get_or_insert_with(Default::default);
        if status.used_at.is_some() {
            return false;
        }
        status.used_at = Some(format_time(OffsetDateTime::now_utc()));
        true
    }

    /// Checks a decision before acting on it: a decider that is not the
    /// requester, with the right to decide (SubjectAccessReview in cluster
    /// mode). Results are cached per object version; a refused decision is
    /// written back on the object.
    async fn check_decision(&self, approval: &ApprovalRequest) -> Result<Decided, DecisionRefused> {
        let status = approval.status.clone().unwrap_or_default();
        let decided = Decided {
            id: approval.name().to_owned(),
            by: status.decided_by.clone().unwrap_or_default(),
            reason: status.reason.clone(),
        };
        let version = (
            approval.name().to_owned(),
            approval
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default(),
        );
        let cached = self
            .checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&version)
            .cloned();
        let result = match cached {
            Some(result) => result,
            None => {
                let result = self.judge(approval, &status).await;
                if let Err(why) = &result {
                    tracing::warn!(approval = %decided.id, %why, "refused a decision");
                    if let Err(error) = self
                        .backend
                        .refuse_decision(approval, &why.to_string())
                        .await
                    {
                        tracing::warn!(approval = %decided.id, %error, "could not write the refused decision back");
                    }
                }
                self.checked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(version, result.clone());
                result
            }
        };
        result.map(|()| decided)
    }

    /// Whether the node acts on this decision; every refusal is audited
    /// (a forgery where it is found, any other one here).
    async fn judge(
        &self,
        approval: &ApprovalRequest,
        status: &ApprovalStatus,
    ) -> Result<(), DecisionRefused> {
        self.verify_attestation(approval, status)?;
        let decided_by = self.verify_decider(approval, status).await;
        if let Err(why) = &decided_by {
            self.audit_refused_decision(approval, status, &why.to_string());
        }
        decided_by
    }

    /// A decision without a valid attestation from chaperone's webhook
    /// (when this node has the verify key) is refused as a possible
    /// forgery, and audited as one.
    fn verify_attestation(
        &self,
        approval: &ApprovalRequest,
        status: &ApprovalStatus,
    ) -> Result<(), DecisionRefused> {
        if let (Backend::Cluster { .. }, Some(verifier)) = (&self.backend, &self.verifier)
            && let Err(why) = verifier.verify(approval, status)
        {
            tracing::warn!(
                signal = "approval-forgery",
                approval = approval.name(),
                claimed_by = status.decided_by.as_deref().unwrap_or(""),
                claimed_groups = ?status.decided_by_groups,
                state = ?status.state,
                %why,
                "refused an unattested approval decision: an attempted forgery, or written while chaperone's webhook was bypassed"
            );
            self.audit_unattested(approval, status, Some(&why.to_string()));
            return Err(DecisionRefused::Forgery(why));
        }
        Ok(())
    }

    /// Whether the (attested, or trusted) decider may make this decision.
    async fn verify_decider(
        &self,
        approval: &ApprovalRequest,
        status: &ApprovalStatus,
    ) -> Result<(), DecisionRefused> {
        if matches!(self.backend, Backend::Cluster { .. })
            && self.verifier.is_none()
            && self
                .refuse_unattested
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(DecisionRefused::NoVerifyKey {
                node: self.node.clone(),
            });
        }
        if matches!(self.backend, Backend::Cluster { .. }) && self.verifier.is_none() {
            // --approval-trust-unattested: trusted, and audited as such.
            self.audit_unattested(approval, status, None);
        }
        let by = status.decided_by.as_deref().unwrap_or("");
        if by.is_empty() {
            return Err(DecisionRefused::NoDecider);
        }
        if by == approval.spec.requester.username {
            return Err(DecisionRefused::Requester { by: by.to_owned() });
        }
        // chaperone's own service accounts (node agents, webhook) live in
        // the approvals' namespace and never decide.
        if let Backend::Cluster { namespace, .. } = &self.backend
            && (by.starts_with(&format!("system:serviceaccount:{namespace}:"))
                || status
                    .decided_by_groups
                    .iter()
                    .any(|g| *g == format!("system:serviceaccounts:{namespace}")))
        {
            return Err(DecisionRefused::OwnServiceAccount {
                by: by.to_owned(),
                namespace: namespace.clone(),
            });
        }
        let verb = match status.state {
            State::Denied => "deny",
            _ => "approve",
        };
        self.backend
            .may_decide(by, &status.decided_by_groups, verb, approval)
            .await
            .map_err(|why| DecisionRefused::MayNotDecide(why.to_string()))
    }

    /// Marks pending approvals past `expiresAt` as `Expired`.
    async fn expire_overdue(&self) {
        let now = OffsetDateTime::now_utc();
        let overdue: Vec<_> = self
            .list()
            .into_iter()
            .filter(|a| a.state() == State::Pending && a.is_expired(now))
            .collect();
        for approval in overdue {
            if let Err(why) = self.backend.expire(&approval).await {
                tracing::debug!(approval = approval.name(), %why, "could not mark expired");
            }
        }
    }
}

/// Announces what became of the approvals this node created: approved or
/// denied (once the decision is checked), or expired. What was decided
/// before this node agent started is not announced again.
async fn announce_decisions(approvals: std::sync::Weak<Approvals>) {
    let Some(mut changed) = approvals.upgrade().map(|a| a.changed.subscribe()) else {
        return;
    };
    let mut seen: Option<HashMap<String, State>> = None;
    loop {
        {
            let Some(approvals) = approvals.upgrade() else {
                return;
            };
            if *approvals.synced.borrow() {
                let mine: Vec<_> = approvals
                    .list()
                    .into_iter()
                    .filter(|a| a.spec.node.as_deref() == Some(approvals.node.as_str()))
                    .collect();
                match &mut seen {
                    None => {
                        seen = Some(
                            mine.iter()
                                .map(|a| (a.name().to_owned(), a.state()))
                                .collect(),
                        );
                    }
                    Some(seen) => {
                        for approval in mine {
                            let state = approval.state();
                            let before = seen.insert(approval.name().to_owned(), state);
                            if before == Some(state) {
                                continue;
                            }
                            let announce = match state {
                                State::Pending => false,
                                State::Expired => true,
                                State::Approved | State::Denied => {
                                    approvals.check_decision(&approval).await.is_ok()
                                }
                            };
                            if announce && let Some(notifier) = &approvals.notifier {
                                notifier.decided(&approval);
                            }
                        }
                    }
                }
            }
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}
