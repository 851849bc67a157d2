//! `chaperone webhook`: the mutating admission webhook that makes agent pods
//! trust chaperone.
//!
//! The node agent terminates the agents' TLS with a certificate signed by the
//! chaperone CA. Agent pods trust it because this webhook points the CA part
//! of their service-account volume (the projected `kube-api-access-*`
//! volume's `ca.crt`, normally from the `kube-root-ca.crt` ConfigMap) at a
//! ConfigMap holding the cluster CA *and* the chaperone CA
//! (`chaperone-ca-bundle`, key `ca.crt`). In `impersonate` mode it also sets
//! the token projection's `audience` to chaperone's, so the token the agent
//! holds is useless to the API server without the gate.
//!
//! Scope. An `AdmissionReview` carries no namespace labels, so the
//! `MutatingWebhookConfiguration` (deploy/base/webhook) declares two webhooks
//! and the path says which one the API server called:
//!
//! - `POST /mutate`: pods labeled `chaperone.dev/intercept: "true"` in any
//!   namespace. The pod's own label is checked again here; an unlabeled pod
//!   is allowed unchanged.
//! - `POST /mutate/namespace`: every pod in a namespace labeled
//!   `chaperone.dev/intercept: "true"`. The API server's `namespaceSelector`
//!   did the scoping, so every pod arriving here is in scope, except one
//!   that opts out with the pod label `chaperone.dev/intercept: "false"`.
//!
//! - `POST /attest`: every CREATE and UPDATE of `approvalrequests` and
//!   `approvalrequests/status`: a decision is stamped with who the API
//!   server authenticated and signed ([`Injector::attest`],
//!   [`crate::approval::attest`]).
//!
//! [`Injector::mutate`] is the pure function behind both pod paths; the HTTPS
//! server around it ([`serve`]) only parses, routes and answers.
//!
//! Errors. A body that is not an `admission.k8s.io/v1` `AdmissionReview`
//! with a `request` is answered with HTTP 400 and a `Status` saying what is
//! wrong: the API server treats that as a failed call, and with
//! `failurePolicy: Fail` the pod is not created. A well-formed review whose
//! object is not a pod is denied (`allowed: false`, code 400) with a message
//! naming the misconfiguration. Injection itself is idempotent: a pod already
//! pointing at the bundle is allowed without a patch.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs,
    io::BufReader,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use k8s_openapi::api::core::v1::Pod;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::approval::{
    ApprovalRequest,
    attest::{Signer, UserInfo, attest_write},
};
use crate::kstatus;

/// The label that puts a pod (or, on the namespace, all its pods) under
/// chaperone's guard.
pub const INTERCEPT_LABEL: &str = "chaperone.dev/intercept";
/// The annotation the webhook leaves on a pod it patched; its value is the
/// credential mode the pod's token was projected for.
pub const INJECTED_ANNOTATION: &str = "chaperone.dev/injected";
/// The ConfigMap the API server publishes in every namespace with the
/// cluster CA (key `ca.crt`).
pub const CLUSTER_CA_CONFIGMAP: &str = "kube-root-ca.crt";
/// The ConfigMap with the cluster CA plus the chaperone CA (key `ca.crt`).
pub const DEFAULT_CA_BUNDLE_CONFIGMAP: &str = "chaperone-ca-bundle";
/// The token audience chaperone accepts in `impersonate` mode.
pub const DEFAULT_AUDIENCE: &str = "chaperone";
/// `admission.k8s.io/v1`, the only AdmissionReview version served.
pub const ADMISSION_V1: &str = "admission.k8s.io/v1";
/// The path of the webhook for labeled pods (see [`Scope::PodLabel`]).
pub const MUTATE_PATH: &str = "/mutate";
/// The path of the webhook for pods in labeled namespaces ([`Scope::Namespace`]).
pub const MUTATE_NAMESPACE_PATH: &str = "/mutate/namespace";
/// The path of the webhook that attests approval decisions
/// ([`crate::approval::attest`]).
pub const ATTEST_PATH: &str = "/attest";
/// A pod is at most ~1.5 MB in etcd; a review carries at most two of them.
pub const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;

// === AdmissionReview (admission.k8s.io/v1) ===

/// An `admission.k8s.io/v1` `AdmissionReview`, request or response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AdmissionRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<AdmissionResponse>,
}

/// The fields of an admission request the webhook reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<GroupVersionResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_object: Option<Value>,
    /// Who the API server authenticated as the writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_info: Option<UserInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub resource: String,
}

/// The webhook's answer. `patch` is the base64 of a JSON Patch (RFC 6902).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AdmissionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The `status` of a denied review, as the API server shows it to the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionStatus {
    pub code: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub message: String,
}

impl AdmissionResponse {
    fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            status: None,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
        }
    }

    fn deny(uid: &str, code: u16, reason: &str, message: String) -> Self {
        Self {
            allowed: false,
            status: Some(AdmissionStatus {
                code,
                reason: reason.to_owned(),
                message,
            }),
            ..Self::allow(uid)
        }
    }

    fn with_patch(mut self, ops: &[PatchOp]) -> Self {
        let json = serde_json::to_vec(ops).expect("a JSON Patch always serializes");
        self.patch_type = Some("JSONPatch".to_owned());
        self.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
        self
    }

    /// The decoded JSON Patch, if the response carries one.
    pub fn decoded_patch(&self) -> Option<Result<Value, String>> {
        let patch = self.patch.as_deref()?;
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(patch)
                .map_err(|e| format!("patch is not base64: {e}"))
                .and_then(|bytes| {
                    serde_json::from_slice(&bytes).map_err(|e| format!("patch is not JSON: {e}"))
                }),
        )
    }

    fn into_review(self) -> AdmissionReview {
        AdmissionReview {
            api_version: ADMISSION_V1.to_owned(),
            kind: "AdmissionReview".to_owned(),
            request: None,
            response: Some(self),
        }
    }
}

/// One JSON Patch operation; only the two the webhook emits.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum PatchOp {
    Add { path: String, value: Value },
    Replace { path: String, value: Value },
}

// === impl Injector ===

pub use crate::identity::CredentialMode;

/// Which of the two webhooks the API server called (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `/mutate`: only pods that carry `chaperone.dev/intercept: "true"`.
    PodLabel,
    /// `/mutate/namespace`: every pod, unless labeled `…/intercept: "false"`.
    Namespace,
    /// `/attest`: writes of `ApprovalRequest`s, whose decisions are signed
    /// ([`Injector::attest`]).
    Approvals,
}

/// What to inject into agent pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injector {
    pub mode: CredentialMode,
    /// The token audience set in `impersonate` mode.
    pub audience: String,
    /// The ConfigMap (key `ca.crt`) with the cluster CA + chaperone CA.
    pub ca_bundle_configmap: String,
    /// The key that signs approval decisions on [`ATTEST_PATH`]; without
    /// it that path denies every write it is sent.
    pub attestor: Option<Arc<Signer>>,
}

impl Default for Injector {
    fn default() -> Self {
        Self {
            mode: CredentialMode::Passthrough,
            audience: DEFAULT_AUDIENCE.to_owned(),
            ca_bundle_configmap: DEFAULT_CA_BUNDLE_CONFIGMAP.to_owned(),
            attestor: None,
        }
    }
}

impl Injector {
    /// Answers one admission review: allowed, with a JSON Patch for in-scope
    /// pods that still need one. Pure: same review in, same review out.
    pub fn mutate(&self, review: &AdmissionReview, scope: Scope) -> AdmissionReview {
        let Some(request) = &review.request else {
            return AdmissionResponse::deny(
                "",
                400,
                "BadRequest",
                "the AdmissionReview has no `request`".to_owned(),
            )
            .into_review();
        };
        self.respond(request, scope).into_review()
    }

    /// Answers one admission review of an `ApprovalRequest` write on
    /// [`ATTEST_PATH`]: allowed, with a patch that sets `status` when the
    /// decision's attestation must change ([`attest_write`]).
    pub fn attest(&self, review: &AdmissionReview) -> AdmissionReview {
        let Some(request) = &review.request else {
            return AdmissionResponse::deny(
                "",
                400,
                "BadRequest",
                "the AdmissionReview has no `request`".to_owned(),
            )
            .into_review();
        };
        self.attest_request(request, time::OffsetDateTime::now_utc())
            .into_review()
    }

    fn attest_request(
        &self,
        request: &AdmissionRequest,
        now: time::OffsetDateTime,
    ) -> AdmissionResponse {
        let uid = request.uid.as_str();
        let kind = &request.kind;
        if !(kind.group == "chaperone.dev" && kind.kind == "ApprovalRequest") {
            return AdmissionResponse::deny(
                uid,
                400,
                "BadRequest",
                format!(
                    "chaperone's {ATTEST_PATH} webhook only attests chaperone.dev ApprovalRequests,                      but was sent {}/{} {}: check the rules of the MutatingWebhookConfiguration",
                    kind.group, kind.version, kind.kind
                ),
            );
        }
        let Some(signer) = &self.attestor else {
            return AdmissionResponse::deny(
                uid,
                503,
                "ServiceUnavailable",
                "chaperone's webhook has no attestation key (--attestation-key), so it cannot                  attest approval decisions"
                    .to_owned(),
            );
        };
        let parse = |value: Option<&Value>| -> Result<Option<ApprovalRequest>, String> {
            value
                .filter(|v| !v.is_null())
                .map(|v| serde_json::from_value(v.clone()))
                .transpose()
                .map_err(|e| format!("not a valid ApprovalRequest: {e}"))
        };
        let (new, old) = match (
            parse(request.object.as_ref()),
            parse(request.old_object.as_ref()),
        ) {
            (Ok(Some(new)), Ok(old)) => (new, old),
            (Ok(None), _) => return AdmissionResponse::allow(uid),
            (Err(why), _) | (_, Err(why)) => {
                return AdmissionResponse::deny(uid, 400, "BadRequest", why);
            }
        };
        let user = request.user_info.clone().unwrap_or_default();
        match attest_write(signer, old.as_ref(), &new, &user, now) {
            None => AdmissionResponse::allow(uid),
            Some(status) => {
                if status.attestation.is_some() {
                    tracing::info!(
                        approval = new.name(),
                        by = %user.username,
                        state = ?status.state,
                        "attested an approval decision"
                    );
                }
                let value = serde_json::to_value(&status).expect("a status always serializes");
                AdmissionResponse::allow(uid).with_patch(&[PatchOp::Add {
                    path: "/status".to_owned(),
                    value,
                }])
            }
        }
    }

    fn respond(&self, request: &AdmissionRequest, scope: Scope) -> AdmissionResponse {
        let uid = request.uid.as_str();
        let kind = &request.kind;
        if !(kind.group.is_empty() && kind.version == "v1" && kind.kind == "Pod") {
            return AdmissionResponse::deny(
                uid,
                400,
                "BadRequest",
                format!(
                    "chaperone's webhook only mutates v1 Pods, but was sent {}/{} {}: \
                     check the rules of the MutatingWebhookConfiguration",
                    kind.group, kind.version, kind.kind
                ),
            );
        }
        if request
            .sub_resource
            .as_deref()
            .is_some_and(|s| !s.is_empty())
        {
            return AdmissionResponse::allow(uid);
        }
        if request.operation == "UPDATE" {
            return self.keep_injected(request);
        }
        if request.operation != "CREATE" {
            // Volumes are immutable after creation; nothing to inject.
            return AdmissionResponse::allow(uid);
        }
        let Some(object) = &request.object else {
            return AdmissionResponse::deny(
                uid,
                400,
                "BadRequest",
                "the admission request for a pod CREATE has no `object`".to_owned(),
            );
        };
        let pod: Pod = match serde_json::from_value(object.clone()) {
            Ok(pod) => pod,
            Err(error) => {
                return AdmissionResponse::deny(
                    uid,
                    400,
                    "BadRequest",
                    format!("the admission request's object is not a valid Pod: {error}"),
                );
            }
        };
        if !in_scope(&pod, scope) {
            return AdmissionResponse::allow(uid);
        }
        let ops = self.patch_for(&pod);
        if ops.is_empty() {
            let mut response = AdmissionResponse::allow(uid);
            if !has_token_volume(&pod) {
                response.warnings.push(
                    "chaperone: this pod mounts no service-account token volume, so no CA bundle \
                     was injected; its API connections will not trust chaperone"
                        .to_owned(),
                );
            }
            return response;
        }
        AdmissionResponse::allow(uid).with_patch(&ops)
    }

    /// An UPDATE of a pod this webhook injected: a client that re-applies
    /// its own manifest (`kubectl apply` of a pod that names
    /// `kube-root-ca.crt` itself) sends back the field this webhook
    /// rewrote, and the API server refuses any change to a pod's volumes.
    /// Each source that said chaperone's bundle (or audience) before and
    /// says the original again is patched back, so the update changes only
    /// what the user changed. Pods this webhook did not inject are left
    /// alone.
    fn keep_injected(&self, request: &AdmissionRequest) -> AdmissionResponse {
        let uid = request.uid.as_str();
        let parse =
            |v: &Option<Value>| -> Option<Pod> { serde_json::from_value(v.as_ref()?.clone()).ok() };
        let (Some(new), Some(old)) = (parse(&request.object), parse(&request.old_object)) else {
            return AdmissionResponse::allow(uid);
        };
        let injected = old
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
        if !injected {
            return AdmissionResponse::allow(uid);
        }
        let volumes = |pod: &Pod| {
            pod.spec
                .as_ref()
                .and_then(|spec| spec.volumes.clone())
                .unwrap_or_default()
        };
        let (new_volumes, old_volumes) = (volumes(&new), volumes(&old));
        let mut ops = Vec::new();
        for (v, (now, before)) in new_volumes.iter().zip(&old_volumes).enumerate() {
            let sources = |vol: &k8s_openapi::api::core::v1::Volume| {
                vol.projected
                    .as_ref()
                    .and_then(|p| p.sources.clone())
                    .unwrap_or_default()
            };
            for (s, (now, before)) in sources(now).iter().zip(&sources(before)).enumerate() {
                let base = format!("/spec/volumes/{v}/projected/sources/{s}");
                if let (Some(now), Some(before)) = (&now.config_map, &before.config_map)
                    && now.name == CLUSTER_CA_CONFIGMAP
                    && before.name == self.ca_bundle_configmap
                {
                    ops.push(PatchOp::Replace {
                        path: format!("{base}/configMap/name"),
                        value: json!(self.ca_bundle_configmap),
                    });
                }
                if let (Some(now), Some(before)) =
                    (&now.service_account_token, &before.service_account_token)
                    && now.audience.as_deref().is_none_or(str::is_empty)
                    && before.audience.as_deref() == Some(self.audience.as_str())
                {
                    ops.push(PatchOp::Add {
                        path: format!("{base}/serviceAccountToken/audience"),
                        value: json!(self.audience),
                    });
                }
            }
        }
        if ops.is_empty() {
            AdmissionResponse::allow(uid)
        } else {
            AdmissionResponse::allow(uid).with_patch(&ops)
        }
    }

    /// The JSON Patch that points the pod's service-account volumes at the
    /// bundle (and, in impersonate mode, at chaperone's audience). Empty when
    /// there is nothing left to do.
    fn patch_for(&self, pod: &Pod) -> Vec<PatchOp> {
        let mut ops = Vec::new();
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.volumes.as_deref())
            .unwrap_or_default();
        for (v, volume) in volumes.iter().enumerate() {
            let Some(sources) = volume.projected.as_ref().and_then(|p| p.sources.as_deref()) else {
                continue;
            };
            // Only volumes that project an API-server token are the
            // service-account volume (kube-api-access-*, or a hand-written
            // equivalent); other projected volumes are left alone.
            if !sources.iter().any(|s| s.service_account_token.is_some()) {
                continue;
            }
            for (s, source) in sources.iter().enumerate() {
                let base = format!("/spec/volumes/{v}/projected/sources/{s}");
                if let Some(config_map) = &source.config_map
                    && config_map.name == CLUSTER_CA_CONFIGMAP
                {
                    ops.push(PatchOp::Replace {
                        path: format!("{base}/configMap/name"),
                        value: json!(self.ca_bundle_configmap),
                    });
                }
                if self.mode == CredentialMode::Impersonate
                    && let Some(token) = &source.service_account_token
                    && token.audience.as_deref().is_none_or(str::is_empty)
                {
                    // No audience means the API server's own: that is the
                    // token the agent talks to Kubernetes with. Tokens for
                    // other audiences (Vault, a cloud) are not ours to touch.
                    ops.push(PatchOp::Add {
                        path: format!("{base}/serviceAccountToken/audience"),
                        value: json!(self.audience),
                    });
                }
            }
        }
        if !ops.is_empty() {
            ops.push(annotation_op(pod, self.mode.as_str()));
        }
        ops
    }
}

fn in_scope(pod: &Pod, scope: Scope) -> bool {
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(INTERCEPT_LABEL))
        .map(String::as_str);
    match scope {
        Scope::PodLabel => label == Some("true"),
        Scope::Namespace => label != Some("false"),
        Scope::Approvals => false,
    }
}

fn has_token_volume(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.volumes.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.projected.as_ref()?.sources.as_deref())
        .flatten()
        .any(|s| s.service_account_token.is_some())
}

fn annotation_op(pod: &Pod, value: &str) -> PatchOp {
    match &pod.metadata.annotations {
        Some(_) => PatchOp::Add {
            path: format!(
                "/metadata/annotations/{}",
                INJECTED_ANNOTATION.replace('~', "~0").replace('/', "~1")
            ),
            value: json!(value),
        },
        None => PatchOp::Add {
            path: "/metadata/annotations".to_owned(),
            value: json!(BTreeMap::from([(INJECTED_ANNOTATION, value)])),
        },
    }
}

// === HTTP ===

/// The HTTP answer to one request body on a mutate path: status code and
/// JSON body (an `AdmissionReview`, or a `Status` for a 400).
pub fn review_http(injector: &Injector, body: &[u8], scope: Scope) -> (StatusCode, Vec<u8>) {
    let review: AdmissionReview = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return bad_request(format!(
                "the body is not an admission.k8s.io/v1 AdmissionReview: {error}"
            ));
        }
    };
    if review.api_version != ADMISSION_V1 || review.kind != "AdmissionReview" {
        return bad_request(format!(
            "expected apiVersion {ADMISSION_V1}, kind AdmissionReview, got {} {}: \
             set admissionReviewVersions: [\"v1\"] in the MutatingWebhookConfiguration",
            review.api_version, review.kind
        ));
    }
    if review.request.is_none() {
        return bad_request("the AdmissionReview has no `request`".to_owned());
    }
    let answer = match scope {
        Scope::Approvals => injector.attest(&review),
        _ => injector.mutate(&review, scope),
    };
    if let (Some(request), Some(response)) = (&review.request, &answer.response) {
        let pod = request
            .object
            .as_ref()
            .and_then(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .or(o["metadata"]["generateName"].as_str())
            })
            .unwrap_or_default();
        let namespace = request.namespace.as_deref().unwrap_or_default();
        match (&response.patch, &response.status) {
            (Some(_), _) => {
                tracing::info!(uid = %request.uid, namespace, pod, ?scope, "injected the CA bundle")
            }
            (None, Some(status)) if !response.allowed => {
                tracing::warn!(uid = %request.uid, namespace, pod, message = %status.message, "denied")
            }
            _ => tracing::debug!(uid = %request.uid, namespace, pod, ?scope, "allowed unchanged"),
        }
    }
    let body = serde_json::to_vec(&answer).expect("an AdmissionReview always serializes");
    (StatusCode::OK, body)
}

fn bad_request(message: String) -> (StatusCode, Vec<u8>) {
    tracing::warn!(%message, "malformed admission request");
    (
        StatusCode::BAD_REQUEST,
        kstatus::Status::bad_request(message).to_body(),
    )
}

async fn handle(
    injector: Arc<Injector>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let scope = match (request.method(), path) {
        (&Method::GET, "/healthz" | "/readyz") => return Ok(plain(StatusCode::OK, "ok\n")),
        (&Method::POST, MUTATE_PATH) => Scope::PodLabel,
        (&Method::POST, MUTATE_NAMESPACE_PATH) => Scope::Namespace,
        (&Method::POST, ATTEST_PATH) => Scope::Approvals,
        _ if [
            MUTATE_PATH,
            MUTATE_NAMESPACE_PATH,
            ATTEST_PATH,
            "/healthz",
            "/readyz",
        ]
        .contains(&path) =>
        {
            return Ok(plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
            ));
        }
        _ => return Ok(plain(StatusCode::NOT_FOUND, "not found\n")),
    };
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            let status = if error.is::<http_body_util::LengthLimitError>() {
                kstatus::Status::too_large(format!(
                    "an AdmissionReview is at most {MAX_REVIEW_BYTES} bytes"
                ))
            } else {
                kstatus::Status::bad_request(format!("cannot read the request body: {error}"))
            };
            let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_REQUEST);
            return Ok(json_response(code, status.to_body()));
        }
    };
    let (code, body) = review_http(&injector, &body, scope);
    Ok(json_response(code, body))
}

fn plain(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().expect("valid"));
    response
}

fn json_response(code: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid"),
    );
    response
}

/// Serves the webhook on `listener` until `shutdown` completes, then lets
/// in-flight reviews finish (at most `drain`).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    injector: Arc<Injector>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let injector = injector.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service =
                hyper::service::service_fn(move |request| handle(injector.clone(), request));
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: draining in-flight admission reviews");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some admission reviews did not finish within {drain:?}");
    }
}

// === TLS: a serving certificate that follows its files ===

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "cannot read the webhook's TLS {what} {path}: {source}. \
         Mount the serving certificate Secret (deploy/base/webhook) or pass --tls-cert/--tls-key"
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the webhook's TLS key {key} does not fit its certificate {cert}: {source}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key into a rustls key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, WebhookError> {
    let read = |what, path: &Path| {
        fs::read(path).map_err(|source| WebhookError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read("certificate", cert)?;
    let key_pem = read("key", key)?;
    let chain = rustls_pemfile::certs(&mut BufReader::new(cert_pem.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| WebhookError::Read {
            what: "certificate",
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(WebhookError::Empty {
            what: "certificate",
            path: cert.to_owned(),
        });
    }
    let private_key = rustls_pemfile::private_key(&mut BufReader::new(key_pem.as_slice()))
        .map_err(|source| WebhookError::Read {
            what: "key",
            path: key.to_owned(),
            source,
        })?
        .ok_or_else(|| WebhookError::Empty {
            what: "private key",
            path: key.to_owned(),
        })?;
    CertifiedKey::from_der(chain, private_key, &provider()).map_err(|source| WebhookError::Key {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    })
}

/// Serves the certificate in two files and picks up a rotated pair (a
/// Secret update, cert-manager renewal) on the next handshake after the
/// files change; a broken pair keeps the last good one and says so.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, WebhookError> {
        let loaded = load_certified_key(&cert, &key)?;
        let stamp = stamp(&cert, &key);
        Ok(Self {
            cert,
            key,
            current: Mutex::new((stamp, Arc::new(loaded))),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamp(&self.cert, &self.key);
        if now.is_some() && now != current.0 {
            match load_certified_key(&self.cert, &self.key) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert.display(), "reloaded the serving certificate");
                    *current = (now, Arc::new(key));
                }
                Err(error) => {
                    tracing::warn!(%error, "keeping the previous serving certificate");
                    current.0 = now;
                }
            }
        }
        current.1.clone()
    }
}

/// The later of the two files' modification times.
fn stamp(cert: &Path, key: &Path) -> Option<SystemTime> {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    Some(modified(cert)?.max(modified(key)?))
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The TLS server configuration: HTTP/2 and HTTP/1.1, the certificate from
/// `cert`/`key`, reloaded when they change.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, WebhookError> {
    let resolver = ReloadingCert::new(cert.to_owned(), key.to_owned())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// === CLI ===

/// `chaperone webhook`: serve the mutating admission webhook over HTTPS.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address to listen on (the Service in deploy/base/webhook targets 8443).
    #[arg(long, env = "CHAPERONE_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM serving certificate (chain), for the Service's DNS name.
    #[arg(long, env = "CHAPERONE_WEBHOOK_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of the serving certificate.
    #[arg(long, env = "CHAPERONE_WEBHOOK_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Credential mode: `impersonate` also sets the token audience.
    #[arg(
        long,
        env = "CHAPERONE_CREDENTIAL_MODE",
        value_enum,
        default_value_t = CredentialMode::Passthrough
    )]
    pub credential_mode: CredentialMode,
    /// The token audience chaperone accepts in impersonate mode.
    #[arg(long, env = "CHAPERONE_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// The ConfigMap (key `ca.crt`, in each agent namespace) holding the
    /// cluster CA and the chaperone CA.
    #[arg(long, env = "CHAPERONE_CA_BUNDLE_CONFIGMAP", default_value = DEFAULT_CA_BUNDLE_CONFIGMAP)]
    pub ca_bundle_configmap: String,
    /// PEM ed25519 private key (PKCS#8) that signs approval decisions on
    /// `/attest`; the node agents hold its public key
    /// (`--approval-verify-key`). Mounted only into the webhook.
    #[arg(long, env = "CHAPERONE_ATTESTATION_KEY")]
    pub attestation_key: Option<PathBuf>,
    /// How long to keep accepting after SIGTERM, while the API server still
    /// routes to this replica (endpoint removal is not instant).
    #[arg(
        long,
        env = "CHAPERONE_WEBHOOK_SHUTDOWN_DELAY_SECONDS",
        default_value_t = 5
    )]
    pub shutdown_delay_seconds: u64,
    /// How long in-flight reviews may take to finish after that.
    #[arg(long, env = "CHAPERONE_WEBHOOK_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,
}

impl WebhookArgs {
    pub fn injector(&self) -> anyhow::Result<Injector> {
        let attestor = match &self.attestation_key {
            None => None,
            Some(path) => {
                let pem = fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read the attestation key {}: {e}", path.display())
                })?;
                let signer = Signer::from_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("attestation key {}: {e}", path.display()))?;
                Some(Arc::new(signer))
            }
        };
        Ok(Injector {
            mode: self.credential_mode,
            audience: self.audience.clone(),
            ca_bundle_configmap: self.ca_bundle_configmap.clone(),
            attestor,
        })
    }
}

/// Runs `chaperone webhook` until SIGTERM or SIGINT.
pub fn run(args: WebhookArgs) -> anyhow::Result<ExitCode> {
    let tls = tls_config(&args.tls_cert, &args.tls_key)?;
    let injector = Arc::new(args.injector()?);
    if injector.attestor.is_none() {
        tracing::warn!("no --attestation-key: approval decisions sent to {ATTEST_PATH} are denied");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| WebhookError::Listen {
                    addr: args.listen,
                    source,
                })?;
        tracing::info!(
            listen = %args.listen,
            mode = args.credential_mode.as_str(),
            bundle = %args.ca_bundle_configmap,
            "serving the admission webhook"
        );
        serve(
            listener,
            tls,
            injector,
            async {
                shutdown_signal().await;
                let delay = Duration::from_secs(args.shutdown_delay_seconds);
                tracing::info!(
                    ?delay,
                    "terminating: still accepting while endpoints update"
                );
                tokio::time::sleep(delay).await;
            },
            Duration::from_secs(args.drain_seconds),
        )
        .await;
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(pod: Value) -> AdmissionReview {
        serde_json::from_value(json!({
            "apiVersion": ADMISSION_V1,
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "agents",
                "operation": "CREATE",
                "object": pod,
            }
        }))
        .unwrap()
    }

    fn sa_pod(labels: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "labels": labels},
            "spec": {
                "containers": [{"name": "c", "image": "i"}],
                "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
                ]}}]
            }
        })
    }

    fn response(review: &AdmissionReview) -> &AdmissionResponse {
        review.response.as_ref().unwrap()
    }

    #[test]
    fn namespace_scope_patches_unlabeled_pods_but_honours_an_opt_out() {
        let injector = Injector::default();
        let unlabeled = injector.mutate(&review(sa_pod(json!({}))), Scope::Namespace);
        assert!(response(&unlabeled).patch.is_some());
        let opted_out = injector.mutate(
            &review(sa_pod(json!({INTERCEPT_LABEL: "false"}))),
            Scope::Namespace,
        );
        assert!(response(&opted_out).allowed);
        assert!(response(&opted_out).patch.is_none());
    }

    #[test]
    fn pod_scope_needs_the_label_set_to_true() {
        let injector = Injector::default();
        for labels in [json!({}), json!({INTERCEPT_LABEL: "yes"})] {
            let out = injector.mutate(&review(sa_pod(labels)), Scope::PodLabel);
            assert!(response(&out).allowed);
            assert!(response(&out).patch.is_none());
        }
    }

    #[test]
    fn a_token_for_another_audience_is_left_alone_in_impersonate_mode() {
        let injector = Injector {
            mode: CredentialMode::Impersonate,
            ..Injector::default()
        };
        let mut pod = sa_pod(json!({INTERCEPT_LABEL: "true"}));
        pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"] =
            json!("vault");
        let out = injector.mutate(&review(pod), Scope::PodLabel);
        let patch = response(&out).decoded_patch().unwrap().unwrap();
        let text = patch.to_string();
        assert!(!text.contains("audience"), "{text}");
        assert!(text.contains(DEFAULT_CA_BUNDLE_CONFIGMAP), "{text}");
    }

    #[test]
    fn reapplying_a_manifest_that_names_kube_root_ca_keeps_the_injected_bundle() {
        // `kubectl apply` of the same pod manifest again: the client's
        // three-way merge sends kube-root-ca.crt back; without the webhook's
        // patch the API server refuses the update (pod volumes are
        // immutable), as it did on the real 1.20 server.
        let injector = Injector::default();
        let mut old = sa_pod(json!({INTERCEPT_LABEL: "true"}));
        old["spec"]["volumes"][0]["projected"]["sources"][1]["configMap"]["name"] =
            json!(DEFAULT_CA_BUNDLE_CONFIGMAP);
        old["metadata"]["annotations"] = json!({INJECTED_ANNOTATION: "passthrough"});
        let mut new = sa_pod(json!({INTERCEPT_LABEL: "true", "changed": "yes"}));
        new["metadata"]["annotations"] = json!({INJECTED_ANNOTATION: "passthrough"});
        let mut r = review(new.clone());
        let request = r.request.as_mut().unwrap();
        request.operation = "UPDATE".into();
        request.old_object = Some(old.clone());
        let out = injector.mutate(&r, Scope::PodLabel);
        let patch = response(&out).decoded_patch().unwrap().unwrap();
        assert_eq!(
            patch,
            json!([{"op": "replace",
                    "path": "/spec/volumes/0/projected/sources/1/configMap/name",
                    "value": DEFAULT_CA_BUNDLE_CONFIGMAP}])
        );
        // A pod the webhook never injected is left as its writer sent it.
        old["metadata"]["annotations"] = json!({});
        r.request.as_mut().unwrap().old_object = Some(old);
        let out = injector.mutate(&r, Scope::PodLabel);
        assert!(response(&out).allowed && response(&out).patch.is_none());
    }

    #[test]
    fn updates_and_subresources_are_allowed_unchanged() {
        let mut r = review(sa_pod(json!({INTERCEPT_LABEL: "true"})));
        r.request.as_mut().unwrap().operation = "UPDATE".into();
        let out = Injector::default().mutate(&r, Scope::PodLabel);
        assert!(response(&out).allowed && response(&out).patch.is_none());
    }

    #[test]
    fn a_review_for_another_kind_is_denied_with_a_hint() {
        let mut r = review(json!({}));
        r.request.as_mut().unwrap().kind.kind = "Deployment".into();
        r.request.as_mut().unwrap().kind.group = "apps".into();
        let out = Injector::default().mutate(&r, Scope::PodLabel);
        let status = response(&out).status.clone().unwrap();
        assert!(!response(&out).allowed);
        assert_eq!(status.code, 400);
        assert!(status.message.contains("MutatingWebhookConfiguration"));
    }

    #[test]
    fn malformed_bodies_get_http_400_with_a_status() {
        let injector = Injector::default();
        let (code, body) = review_http(&injector, b"{not json", Scope::PodLabel);
        assert_eq!(code, StatusCode::BAD_REQUEST);
        let status: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["code"], 400);
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("AdmissionReview")
        );

        let v1beta1 = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                             "request": {"uid": "x", "kind": {"version": "v1", "kind": "Pod"},
                                         "operation": "CREATE"}});
        let (code, body) = review_http(&injector, v1beta1.to_string().as_bytes(), Scope::PodLabel);
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("admissionReviewVersions"));

        let no_request = json!({"apiVersion": ADMISSION_V1, "kind": "AdmissionReview"});
        let (code, _) = review_http(
            &injector,
            no_request.to_string().as_bytes(),
            Scope::PodLabel,
        );
        assert_eq!(code, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn annotation_keys_are_escaped_as_json_pointers() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"annotations": {}}})).unwrap();
        let PatchOp::Add { path, .. } = annotation_op(&pod, "passthrough") else {
            panic!("expected add");
        };
        assert_eq!(path, "/metadata/annotations/chaperone.dev~1injected");
    }
}
