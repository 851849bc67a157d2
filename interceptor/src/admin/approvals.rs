//! The approvals admin API in local mode (`--approval-dir`): list the
//! approvals and approve or deny them over HTTP, for tools on the node.
//!
//! - `GET /approvals`: an `ApprovalRequestList` (JSON).
//! - `POST /approvals/{namespace}/{id}/approve` and `.../deny` with
//!   `{"by": "alice", "reason": "...", "grant": "15m"}`: the approval as it
//!   now stands, or a `Status` saying why not (404 no such approval, 409
//!   already decided or expired, 403 the requester deciding its own
//!   request, 400 a bad body).
//!
//! Only connections from the node itself (loopback) are answered, whatever
//! address the admin listener binds; agents run in their pods' network
//! namespaces and cannot reach it. Decisions go through the same code as
//! `kubectl chaperone --local-dir` ([`LocalStore::decide`]).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::approval::{LocalStore, Refused, Ruling, State};
use crate::kstatus::Status;

/// Largest decision body read.
const BODY_LIMIT: usize = 64 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    by: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    grant: Option<String>,
    /// `Object` (the default) or `Rule`.
    #[serde(default, rename = "grantScope")]
    grant_scope: Option<crate::approval::GrantScope>,
}

/// Whether `path` is the approvals API's.
pub fn is_approvals_path(path: &str) -> bool {
    path == "/approvals" || path.starts_with("/approvals/")
}

/// Answers one request under `/approvals`.
pub async fn handle<B>(
    request: Request<B>,
    peer: SocketAddr,
    store: Option<&LocalStore>,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if !peer.ip().is_loopback() {
        return status(&Status::forbidden(format!(
            "chaperone: the approvals API answers only the node itself (loopback), not {}",
            peer.ip()
        )));
    }
    let Some(store) = store else {
        return status(&Status::new(
            404,
            "NotFound",
            "chaperone: the approvals API serves local mode (--approval-dir) only; in a cluster \
             decide with `kubectl chaperone approve|deny`",
        ));
    };
    let path = request.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
    match (request.method(), parts.as_slice()) {
        (&Method::GET, []) => match store.list() {
            Ok(items) => json_response(
                StatusCode::OK,
                &json!({
                    "apiVersion": "chaperone.dev/v1alpha1",
                    "kind": "ApprovalRequestList",
                    "items": items,
                }),
            ),
            Err(why) => status(&Status::new(
                500,
                "InternalError",
                format!("chaperone: {why}"),
            )),
        },
        (&Method::POST, [namespace, id, verb @ ("approve" | "deny")]) => {
            if *namespace != store.namespace {
                return status(&Status::new(
                    404,
                    "NotFound",
                    format!(
                        "chaperone: local approvals are in namespace {:?}, not {namespace:?}",
                        store.namespace
                    ),
                ));
            }
            let body = match Limited::new(request.into_body(), BODY_LIMIT)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(error) => {
                    return status(&Status::bad_request(format!(
                        "chaperone: reading the decision failed: {error}"
                    )));
                }
            };
            let body: DecisionBody = match serde_json::from_slice(&body) {
                Ok(body) => body,
                Err(error) => {
                    return status(&Status::bad_request(format!(
                        "chaperone: the decision is {{\"by\": \"who\", \"reason\": \"why\", \"grant\": \"15m\"}} \
                         (by is required): {error}"
                    )));
                }
            };
            let decision = Ruling {
                state: if *verb == "approve" {
                    State::Approved
                } else {
                    State::Denied
                },
                by: body.by,
                groups: Vec::new(),
                reason: body.reason,
                grant: body.grant,
                grant_scope: body.grant_scope,
            };
            match store.decide(id, &decision) {
                Ok(approval) => {
                    tracing::info!(approval = id, by = %decision.by, verb, "decided through the admin API");
                    json_response(StatusCode::OK, &json!(approval))
                }
                Err(refused) => {
                    let message = format!("chaperone: {refused}");
                    status(&match refused {
                        Refused::NotFound(_) => Status::new(404, "NotFound", message),
                        Refused::Expired { .. } | Refused::Decided { .. } => {
                            Status::new(409, "Conflict", message)
                        }
                        Refused::OwnRequest { .. } => Status::forbidden(message),
                        Refused::Invalid(_) => Status::bad_request(message),
                        Refused::Store(_) => Status::new(500, "InternalError", message),
                    })
                }
            }
        }
        _ => status(&Status::new(
            404,
            "NotFound",
            "chaperone: the approvals API serves GET /approvals and \
             POST /approvals/{namespace}/{id}/approve|deny",
        )),
    }
}

fn json_response(code: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("static response parts are valid")
}

fn status(status: &Status) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status.code)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(status.to_body())))
        .expect("a Status response is always valid")
}
