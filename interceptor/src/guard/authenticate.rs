//! Stage `authenticate`: the bearer token verified (service-account JWT,
//! OIDC, TokenReview) and bound to the pod the kernel attested.

use std::sync::Arc;

use http::request::Parts;

use super::{Connection, Pass};
use crate::identity::{Authenticator, Caller, bearer_token};

/// The verified caller, or the 401/403 to answer. A refusal that looks
/// like an attack (a token replayed from another pod) is logged as one.
pub(super) async fn caller(
    authenticator: &Authenticator,
    connection: &Connection,
    parts: &Parts,
) -> Pass<Arc<Caller>> {
    let token = bearer_token(&parts.headers).map_err(|error| Box::new(error.to_status()))?;
    let caller = authenticator
        .authenticate(token, connection.pod.as_ref(), connection.process.clone())
        .await
        .map_err(|error| {
            if let Some(signal) = error.attack_signal() {
                tracing::warn!(
                    signal = signal.as_str(),
                    peer = %connection.peer,
                    pod = ?connection.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
                    %error,
                    "refused a token: attack signal"
                );
            }
            Box::new(error.to_status())
        })?;
    Ok(Arc::new(Caller {
        cgroup_id: connection.cgroup_id,
        ..caller
    }))
}
