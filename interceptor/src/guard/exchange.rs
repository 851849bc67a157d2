//! [`ExchangeDraft`]: one request followed from the moment it arrives to its
//! end, then recorded, audited and counted as a finished
//! [`Exchange`](crate::exchange::Exchange). Every stage fills it in; a
//! refusal finishes it at once; a forwarded request finishes it when the
//! response (or the upgraded tunnel) ends; a request the agent abandons
//! finishes it on drop.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use http::{HeaderMap, StatusCode, header, request::Parts};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Connection, GuardParts};
use crate::{
    audit::Admission,
    exchange::{DecisionRecord, Exchange, ResponseStatus, Stage},
    exec,
    identity::Caller,
    kstatus::Status,
    limits::RequestSlot,
    mask::Masker,
    metrics::Metrics,
    policy::{Action, Decision, RecordLevel},
    proxy::{
        ResponseObserver, TunnelTap, Verdict,
        body::{BodyObserver, CutShort, status_response},
    },
    record::capture::{BodyCapture, CaptureSlot},
    request::RequestInfo,
};

/// The status recorded for a request the agent abandoned before any
/// response: nginx's 499, which log tooling knows as "client closed request".
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// One exchange being followed to its end, then recorded and audited.
pub(super) struct ExchangeDraft {
    pub(super) audit_id: Uuid,
    received: OffsetDateTime,
    request_uri: String,
    pub(super) request: Arc<RequestInfo>,
    /// The connection's identity until the token is verified, then the
    /// verified caller.
    pub(super) caller: Arc<Caller>,
    source_ip: IpAddr,
    user_agent: Option<String>,
    /// What decided the request; `None` while (and when refused) before policy.
    pub(super) decision: Option<Decision>,
    /// `(approval id, approver)` for a held request.
    pub(super) approval: Option<(Arc<str>, Arc<str>)>,
    connection: Arc<Connection>,
    /// How many values masking replaced.
    pub(super) masked: Arc<AtomicU32>,
    /// Its place in the audit pipeline.
    pub(super) admission: Option<Admission>,
    node: Arc<str>,
    metrics: Metrics,
    masker: Masker,
    query: Option<String>,
    /// An upgraded exec/attach: its end is the tunnel's end.
    upgrade_end: Option<Arc<Mutex<Option<BodyEnd>>>>,
    /// The request body (masked) when the record level keeps it.
    pub(super) request_body: CaptureSlot,
    /// A `ResponseComplete` was recorded. An exchange dropped without one
    /// was abandoned by the agent (it went away while the request was held
    /// or waiting for the API server): [`Drop`] records that, so every
    /// request reaches the audit log and the session.
    completed: bool,
    /// Its place in the pod's in-flight limit, held until it ends.
    pub(super) in_flight: Option<RequestSlot>,
}

impl ExchangeDraft {
    /// The draft of the request `parts` (its target already canonical)
    /// read as `request`, on `connection`.
    pub(super) fn begin(
        guard: &GuardParts,
        connection: &Arc<Connection>,
        parts: &Parts,
        request: RequestInfo,
    ) -> Self {
        ExchangeDraft {
            audit_id: Uuid::new_v4(),
            received: OffsetDateTime::now_utc(),
            request_uri: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            request: Arc::new(request),
            caller: Arc::new(Caller {
                pod: connection.pod.clone(),
                process: connection.process.clone(),
                cgroup_id: connection.cgroup_id,
                ..Caller::default()
            }),
            source_ip: connection.peer.ip(),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            decision: None,
            approval: None,
            connection: connection.clone(),
            masked: Arc::new(AtomicU32::new(0)),
            admission: None,
            node: guard.node.clone(),
            metrics: guard.metrics.clone(),
            masker: guard.masker.clone(),
            query: parts.uri.query().map(str::to_owned),
            upgrade_end: None,
            request_body: CaptureSlot::default(),
            completed: false,
            in_flight: None,
        }
    }

    /// Answers the agent with `status` and records the refusal.
    pub(super) fn refuse(mut self, status: Status) -> Verdict {
        let response = status_response(&status);
        let code = status.code;
        let response_status = ResponseStatus::failure(code, status.reason, status.message.clone());
        self.finish(response_status, Stage::ResponseComplete, None, None);
        Verdict::Respond(response)
    }

    /// Records `decision` as what refused the request with `status`.
    pub(super) fn refused_by(&mut self, decision: Decision, status: Box<Status>) -> Box<Status> {
        self.decision = Some(decision);
        status
    }

    /// The record level: the decision's, `Metadata` before policy.
    pub(super) fn level(&self) -> RecordLevel {
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
                action: Action::Deny,
                level: RecordLevel::Metadata,
                policy: Arc::from(""),
                rule: Arc::from("authentication"),
                ..DecisionRecord::from_decision(&refused_before_policy(), None)
            },
        }
    }

    /// The `RequestReceived` event written ahead of forwarding (audit
    /// durability `spooled`): the decision, no response yet.
    pub(super) fn request_received(&self) -> Arc<Exchange> {
        Arc::new(Exchange {
            audit_id: self.audit_id,
            stage: Stage::RequestReceived,
            received: self.received,
            response_started: None,
            completed: OffsetDateTime::now_utc(),
            request_uri: self.request_uri.clone(),
            request: (*self.request).clone(),
            caller: self.caller.clone(),
            impersonated_user: None,
            source_ips: vec![self.source_ip],
            user_agent: self.user_agent.clone(),
            decision: self.decision_record(),
            status: ResponseStatus::ok(0),
            request_body: None,
            response_body: None,
            masked_fields: 0,
            node: self.node.clone(),
        })
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
            request: (*self.request).clone(),
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
        let connection = (stage == Stage::ResponseComplete).then(|| self.connection.clone());
        let audit = self.admission.as_ref().map(Admission::gate);
        // Both wake another thread: after the response is on its way.
        crate::proxy::defer_until_idle(move || {
            if let Some(session) = connection.as_ref().and_then(|c| c.session.as_ref()) {
                session.exchange(exchange.clone());
            }
            if let Some(audit) = audit {
                audit.submit(exchange);
            }
        });
    }
}

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

/// The decision recorded for a request refused before policy: a deny by
/// chaperone itself.
pub(super) fn refused_before_policy() -> Decision {
    Decision {
        action: Action::Deny,
        enforce: Action::Deny,
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
        let recording = Some(self.connection.clone())
            .filter(|connection| connection.session.is_some())
            .filter(|_| self.decision_record().level != RecordLevel::None)
            .map(|connection| {
                let audit_id = self.audit_id;
                let start: exec::StartRecording = Box::new(move |info| {
                    let session = connection
                        .session
                        .as_ref()
                        .expect("only sessions are recorded");
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
            self.on_end(Err(CutShort::ResponseDropped));
        }
    }
}

impl BodyObserver for BodyEnd {
    fn on_data(&mut self, chunk: &[u8]) {
        if let Some(capture) = &mut self.capture {
            capture.push(chunk);
        }
    }

    fn on_end(&mut self, result: Result<(), CutShort>) {
        let status = match (result, self.code) {
            (Ok(()), code) if code < 400 => ResponseStatus::ok(code),
            (Ok(()), code) => ResponseStatus::failure(code, "", ""),
            (Err(reason), code) => ResponseStatus::failure(code, "StreamEnded", reason.to_string()),
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
