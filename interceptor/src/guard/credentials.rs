//! Stage `credentials`: the identity the request carries upstream. The
//! agent's own token (passthrough), or chaperone's credentials with
//! `Impersonate-*` headers naming the verified caller (impersonate: the
//! node's mode, or a policy selecting this caller asks for it).
//! Agent-sent `Impersonate-*` headers never pass.

use http::{header, request::Parts};

use super::{NodeGuard, Pass};
use crate::{
    identity::{Caller, CredentialMode, upstream_identity_headers},
    kstatus::Status,
    policy::{PolicyInput, PolicySet},
};

impl NodeGuard {
    /// Rewrites the identity headers of `parts`; `Ok(true)` when the
    /// request now carries chaperone's own credentials.
    pub(super) fn credentials(
        &self,
        parts: &mut Parts,
        policy: &PolicySet,
        input: &PolicyInput<'_>,
        caller: &Caller,
    ) -> Pass<bool> {
        let credential_mode = match policy.credential_mode(input) {
            CredentialMode::Impersonate => CredentialMode::Impersonate,
            CredentialMode::Passthrough => self.parts.credential_mode,
        };
        // The agent's Authorization (a shared-bytes clone, not a copy of
        // every header) before the identity headers are rewritten.
        let authorization = parts.headers.get(header::AUTHORIZATION).cloned();
        upstream_identity_headers(credential_mode, caller, authorization, &mut parts.headers)
            .map_err(|error| Box::new(Status::bad_request(format!("chaperone: {error}"))))?;
        if credential_mode == CredentialMode::Impersonate {
            // `None`: the client certificate on the own-credentials pools.
            let own = self
                .parts
                .own_credentials
                .authorization()
                .map_err(|missing| {
                    Box::new(Status::service_unavailable(format!("chaperone: {missing}")))
                })?;
            if let Some(value) = own {
                parts.headers.insert(header::AUTHORIZATION, value);
            }
        }
        Ok(credential_mode == CredentialMode::Impersonate)
    }
}
