//! Stage `interpret`: the one reading of the request, as the API server
//! will read it (`request.rs`). The canonical target replaces the URI, so
//! what is judged is what is forwarded.

use http::request::Parts;

use crate::request::{AmbiguousTarget, CanonicalTarget, RequestInfo};

/// Rewrites `parts.uri` to the canonical target and reads its
/// [`RequestInfo`]. An ambiguous target is kept as is, read only for the
/// record, and comes back as the refusal to answer once the request is
/// counted (limits, audit).
pub(super) fn interpret(parts: &mut Parts) -> (RequestInfo, Result<(), AmbiguousTarget>) {
    match CanonicalTarget::parse(parts.uri.path(), parts.uri.query()) {
        Ok(target) => {
            parts.uri = target.uri(&parts.uri);
            (RequestInfo::from_target(&parts.method, &target), Ok(()))
        }
        Err(ambiguous) => (
            RequestInfo {
                path: parts.uri.path().to_owned(),
                verb: parts.method.as_str().to_ascii_lowercase(),
                ..RequestInfo::default()
            },
            Err(ambiguous),
        ),
    }
}
