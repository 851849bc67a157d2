//! Stage `admit`: the request is counted before anything is spent on it,
//! against its pod's limits (429) and the audit pipeline's capacity (503).

use super::{Connection, Pass};
use crate::{
    audit::{Admission, AuditGate},
    limits::RequestSlot,
};

/// The request's place in its pod's in-flight limit (`None`: the
/// connection is not limited), or the 429 when the pod is over a limit.
/// No lock: the pod's counter was taken when the connection was accepted.
pub(super) fn within_limits(connection: &Connection) -> Pass<Option<RequestSlot>> {
    match &connection.limit {
        Err(status) => Err(status.clone()),
        Ok(None) => Ok(None),
        Ok(Some(slot)) => slot.request().map(Some),
    }
}

/// The request's place in the audit pipeline, or the 503 when a full
/// pipeline refuses requests (mode `block`).
pub(super) fn to_audit(gate: Option<&AuditGate>) -> Pass<Option<Admission>> {
    gate.map(|gate| gate.admit().map_err(|full| Box::new(full.status())))
        .transpose()
}
