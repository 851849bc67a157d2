//! Stages `plan_response` and `plan_record`: how the forwarded request's
//! response is handled. Masking asks the API server for a body it can
//! mask (JSON, no gzip, exec over the protocols it decodes) and masks it
//! as it streams; upgrades it would not read are refused where masking or
//! recording applies; bodies are captured, masked, at the record levels
//! that keep them; with audit durability `spooled`, the request's
//! `RequestReceived` event is on disk before the request is forwarded.

use http::{HeaderValue, request::Parts};

use super::{NodeGuard, Pass, content_type, exchange::ExchangeDraft};
use crate::{
    audit::Durability,
    exec,
    mask::{self, Target, negotiate_accept},
    policy::{Action, RecordLevel},
    proxy::{body::BodyObserver, guard::TransformFactory},
    record::capture::BodyCapture,
};

impl NodeGuard {
    /// Refuses what could not be masked or recorded; rewrites `Accept`
    /// and `Accept-Encoding` where masking applies; the response body
    /// transform that masks.
    pub(super) fn plan_response(
        &self,
        x: &ExchangeDraft,
        parts: &mut Parts,
    ) -> Pass<Option<TransformFactory>> {
        let masker = &self.parts.masker;
        let target = masker.target(&x.request);
        // An upgrade chaperone would not read (a watch or log over
        // WebSocket) never carries what must be masked or recorded.
        let masked =
            target.is_some() || x.decision.as_ref().map(|d| d.action) == Some(Action::Mask);
        let bodies_recorded = x.level() >= RecordLevel::Request;
        exec::refuse_unread_upgrade(&x.request, &parts.headers, masked, bodies_recorded)?;

        // Masking: negotiate a body we can mask before asking.
        let Some(target) = target else {
            return Ok(None);
        };
        // Exec output is read over the protocols chaperone decodes only.
        if target == Target::ExecOutput {
            exec::negotiate(&mut parts.headers)?;
        }
        // A gzipped body could not be masked.
        parts.headers.remove(http::header::ACCEPT_ENCODING);
        if target.is_json() {
            let accept = negotiate_accept(parts.headers.get(http::header::ACCEPT))
                .map_err(|not_acceptable| Box::new(not_acceptable.status()))?;
            parts.headers.insert(http::header::ACCEPT, accept);
        }
        Ok(Some(mask::response_transform(
            masker.clone(),
            x.request.clone(),
            x.masked.clone(),
        )))
    }

    /// The request's `Audit-ID` for the API server (its audit log and
    /// chaperone's name the same request), and the observer that captures
    /// the request body (masked) for the record, at the levels that keep it.
    pub(super) fn plan_record(
        &self,
        x: &ExchangeDraft,
        parts: &mut Parts,
    ) -> Option<Box<dyn BodyObserver>> {
        parts.headers.insert(
            "audit-id",
            HeaderValue::from_str(&x.audit_id.to_string()).expect("a uuid is a header value"),
        );
        (x.level() >= RecordLevel::Request && !exec::is_exec(&x.request)).then(|| {
            BodyCapture::request(&self.parts.masker, &x.request, content_type(parts))
                .into_observer(x.request_body.clone())
        })
    }

    /// `--audit-durability spooled`: the request is forwarded only once its
    /// `RequestReceived` event is synced to every sink's spool; when it
    /// cannot be written, the agent gets the audit pipeline's 503.
    pub(super) async fn write_ahead(&self, x: &ExchangeDraft) -> Pass {
        let Some(gate) = &self.parts.audit else {
            return Ok(());
        };
        if gate.durability() != Durability::Spooled || x.level() == RecordLevel::None {
            return Ok(());
        }
        gate.write_ahead(x.request_received())
            .await
            .map_err(|full| Box::new(full.status()))
    }
}
