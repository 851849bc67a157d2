//! The `dryRun=All` preview of a held request: what the API server says
//! the request would do, asked under the agent's own identity (or, in
//! impersonate mode, chaperone's credentials impersonating the agent) and
//! masked like a response before a person sees it ([`super::preview`]).

use http::{HeaderValue, header, request::Parts};
use serde_json::Value;

use super::preview;
use crate::identity::{Caller, CredentialMode, OwnCredentials, upstream_identity_headers};
use crate::mask::Masker;
use crate::proxy::{Upstream, body::WholeBody};
use crate::request::RequestInfo;

/// How long a preview may take before the approval is created without one.
const PREVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest answer read from the API server for a preview.
const ANSWER_LIMIT: usize = 4 << 20;

/// Asks the API server for previews of held requests.
#[derive(Clone)]
pub struct PreviewClient {
    pub upstream: Upstream,
    pub masker: Masker,
    /// The node's credential mode.
    pub credential_mode: CredentialMode,
    pub own_credentials: OwnCredentials,
}

impl PreviewClient {
    /// The held request's effect as the API server computes it with
    /// `dryRun=All`, under the agent's own identity: what a delete would
    /// remove, the object a create would make, the changes an update or
    /// patch would apply (against a GET of the current object), or the
    /// error it would get. Masked like a response; `None` when there is
    /// nothing to show or the API server did not answer in time.
    pub async fn preview(
        &self,
        parts: &Parts,
        caller: &Caller,
        request: &RequestInfo,
        body: Option<&WholeBody>,
    ) -> Option<Value> {
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
        let headers = self.headers(parts, caller)?;
        let query = match parts.uri.query() {
            Some(q) if !q.is_empty() => format!("{q}&dryRun=All"),
            _ => "dryRun=All".to_owned(),
        };
        let ask = |method: http::Method, path_and_query: String, body: Option<bytes::Bytes>| {
            let mut headers = headers.clone();
            if body.is_none() {
                headers.remove(header::CONTENT_TYPE);
            }
            self.ask(method, path_and_query, headers, body)
        };
        let is_status = |v: &Value| v["kind"] == "Status";
        let path = parts.uri.path();
        let masker = &self.masker;
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
                    return Some(preview::mask_object(masker, request, object));
                }
                return Some(dry_run);
            }
            if matches!(parts.method, http::Method::PUT | http::Method::PATCH)
                && let Some(current) = ask(http::Method::GET, path.to_owned(), None).await
                && !is_status(&current)
            {
                return Some(preview::changes(masker, request, &current, &dry_run));
            }
            // A create, or an update or apply that creates the object.
            Some(preview::mask_object(masker, request, dry_run))
        };
        let value = tokio::time::timeout(PREVIEW_TIMEOUT, effect).await.ok()??;
        Some(super::preview_summary(value))
    }

    /// The agent's headers with the identity the preview is asked under;
    /// `None` when that identity cannot be sent.
    fn headers(&self, parts: &Parts, caller: &Caller) -> Option<http::HeaderMap> {
        let mut headers = parts.headers.clone();
        let authorization = parts.headers.get(header::AUTHORIZATION).cloned();
        upstream_identity_headers(self.credential_mode, caller, authorization, &mut headers)
            .ok()?;
        // Impersonate: chaperone's token, or its client certificate
        // (`None`), or no preview.
        if self.credential_mode == CredentialMode::Impersonate
            && let Some(own) = self.own_credentials.authorization().ok()?
        {
            headers.insert(header::AUTHORIZATION, own);
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
        Some(headers)
    }

    /// One request to the API server; its answer as JSON.
    async fn ask(
        &self,
        method: http::Method,
        path_and_query: String,
        headers: http::HeaderMap,
        body: Option<bytes::Bytes>,
    ) -> Option<Value> {
        let path_and_query: http::uri::PathAndQuery = path_and_query.parse().ok()?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(self.upstream.uri_for(Some(&path_and_query)))
            .body(body.map_or_else(crate::proxy::body::empty, crate::proxy::body::full))
            .ok()?;
        *request.headers_mut() = headers;
        let upstream = if self.credential_mode == CredentialMode::Impersonate {
            self.upstream.with_own_credentials()
        } else {
            &self.upstream
        };
        let response = upstream.send(request, false).await.ok()?;
        let body = http_body_util::Limited::new(response.into_body(), ANSWER_LIMIT);
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice::<Value>(&bytes).ok()
    }
}
