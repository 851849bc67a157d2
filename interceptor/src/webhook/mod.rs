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
//!
//! Files: [`review`] the `admission.k8s.io/v1` wire types; [`inject`] the
//! pure answers ([`Injector::mutate`], [`Injector::attest`]); [`serve`] the
//! HTTPS server, its routes and `chaperone webhook` itself. The serving
//! certificate follows its files through [`crate::tls::reload`].

mod inject;
mod review;
mod serve;
#[cfg(test)]
mod tests;

pub use crate::identity::CredentialMode;
pub use inject::{GATE_VOLUME, Injector, Scope, gate_container, gate_volume};
pub use review::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, AdmissionStatus, GroupVersionKind,
    GroupVersionResource,
};
pub use serve::{WebhookArgs, WebhookError, review_http, run, serve, tls_config};

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
