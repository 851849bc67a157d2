//! What the webhook answers, as pure functions of a review: the CA bundle
//! (and, in `impersonate` mode, the token audience) injected into agent
//! pods, kept through later updates, and approval decisions attested.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use serde_json::{Value, json};

use super::review::{AdmissionRequest, AdmissionResponse, AdmissionReview, PatchOp};
use super::{
    ATTEST_PATH, CLUSTER_CA_CONFIGMAP, DEFAULT_AUDIENCE, DEFAULT_CA_BUNDLE_CONFIGMAP,
    INJECTED_ANNOTATION, INTERCEPT_LABEL,
};
use crate::approval::{
    ApprovalRequest,
    attest::{Signer, attest_write},
};
use crate::gate::{GATE_CA_DIR, GATE_CA_FILE, GATE_CONTAINER};
use crate::identity::CredentialMode;

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
    /// The image of the `chaperone-gate` init container prepended to every
    /// agent pod ([`crate::gate`]); `None` injects no gate (`chaperone
    /// webhook` always has one).
    pub gate_image: Option<String>,
}

impl Default for Injector {
    fn default() -> Self {
        Self {
            mode: CredentialMode::Passthrough,
            audience: DEFAULT_AUDIENCE.to_owned(),
            ca_bundle_configmap: DEFAULT_CA_BUNDLE_CONFIGMAP.to_owned(),
            attestor: None,
            gate_image: None,
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
                    "chaperone's {ATTEST_PATH} webhook only attests chaperone.dev ApprovalRequests, but was sent {}/{} {}: check the rules of the MutatingWebhookConfiguration",
                    kind.group, kind.version, kind.kind
                ),
            );
        }
        let Some(signer) = &self.attestor else {
            return AdmissionResponse::deny(
                uid,
                503,
                "ServiceUnavailable",
                "chaperone's webhook has no attestation key (--attestation-key), so it cannot attest approval decisions"
                    .to_owned(),
            );
        };
        let parse = |value: Option<&Value>| -> Result<Option<ApprovalRequest>, serde_json::Error> {
            value
                .filter(|v| !v.is_null())
                .map(|v| serde_json::from_value(v.clone()))
                .transpose()
        };
        let (new, old) = match (
            parse(request.object.as_ref()),
            parse(request.old_object.as_ref()),
        ) {
            (Ok(Some(new)), Ok(old)) => (new, old),
            (Ok(None), _) => return AdmissionResponse::allow(uid),
            (Err(why), _) | (_, Err(why)) => {
                return AdmissionResponse::deny(
                    uid,
                    400,
                    "BadRequest",
                    format!("not a valid ApprovalRequest: {why}"),
                );
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
        ops.extend(keep_gate(&new, &old));
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
        if let Some(image) = &self.gate_image {
            ops.extend(gate_ops(pod, image, &self.ca_bundle_configmap));
        }
        if !ops.is_empty() {
            ops.push(annotation_op(pod, self.mode.as_str()));
        }
        ops
    }
}

// === the gate ===

/// The volume holding chaperone's CA for the gate.
pub const GATE_VOLUME: &str = "chaperone-gate-ca";

/// The `chaperone-gate` init container, exactly as injected.
pub fn gate_container(image: &str) -> Container {
    serde_json::from_value(json!({
        "name": GATE_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["gate"],
        // Requests equal to limits for both resources: a Guaranteed pod
        // stays Guaranteed (the QoS class needs it of every container,
        // init containers included) and a namespace whose ResourceQuota
        // demands limits still admits the pod. An init container's request
        // adds to the pod's only when larger than its containers' sum.
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "50m", "memory": "64Mi"},
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": GATE_VOLUME, "mountPath": GATE_CA_DIR, "readOnly": true}],
    }))
    .expect("the gate container is a valid Container")
}

/// The volume with chaperone's CA alone (key `chaperone-ca.crt` of the
/// CA-bundle ConfigMap; a missing key keeps the pod in `ContainerCreating`,
/// never unguarded).
pub fn gate_volume(ca_bundle_configmap: &str) -> Volume {
    serde_json::from_value(json!({
        "name": GATE_VOLUME,
        "configMap": {
            "name": ca_bundle_configmap,
            "items": [{"key": GATE_CA_FILE, "path": GATE_CA_FILE}],
        },
    }))
    .expect("the gate volume is a valid Volume")
}

/// Whether `found` is the gate exactly as injected, but for what the API
/// server fills in (`terminationMessagePath`) or a LimitRange may set
/// (`resources`). Any other difference is a look-alike an agent wrote
/// itself (`command: [true]`, another host in `env`, `restartPolicy:
/// Always` that makes it a sidecar the pod does not wait for) and is
/// replaced.
fn is_our_gate(found: &Container, ours: &Container) -> bool {
    let mut normalized = found.clone();
    normalized
        .termination_message_path
        .clone_from(&ours.termination_message_path);
    normalized.resources.clone_from(&ours.resources);
    normalized == *ours
}

/// The patch that makes the pod's first init container the gate and gives
/// it its CA volume: nothing when both are already in place (a
/// reinvocation, a pod created from a spec this webhook already patched);
/// a look-alike of either is replaced, never trusted.
fn gate_ops(pod: &Pod, image: &str, ca_bundle_configmap: &str) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    let spec = pod.spec.as_ref();
    let ours = gate_container(image);
    let init = spec
        .and_then(|s| s.init_containers.clone())
        .unwrap_or_default();
    let first_is_ours = init.first().is_some_and(|c| is_our_gate(c, &ours));
    let others = init.iter().skip(usize::from(first_is_ours));
    if !first_is_ours || others.clone().any(|c| c.name == GATE_CONTAINER) {
        let rest: Vec<&Container> = others.filter(|c| c.name != GATE_CONTAINER).collect();
        let mut wanted = vec![json!(ours)];
        wanted.extend(rest.iter().map(|c| json!(c)));
        ops.push(PatchOp::Add {
            path: "/spec/initContainers".to_owned(),
            value: Value::Array(wanted),
        });
    }
    let volume = gate_volume(ca_bundle_configmap);
    let volumes = spec.and_then(|s| s.volumes.as_deref()).unwrap_or_default();
    match volumes.iter().position(|v| v.name == GATE_VOLUME) {
        Some(i) if volumes[i] == volume => {}
        Some(i) => ops.push(PatchOp::Replace {
            path: format!("/spec/volumes/{i}"),
            value: json!(volume),
        }),
        None if spec.is_some_and(|s| s.volumes.is_some()) => ops.push(PatchOp::Add {
            path: "/spec/volumes/-".to_owned(),
            value: json!(volume),
        }),
        None => ops.push(PatchOp::Add {
            path: "/spec/volumes".to_owned(),
            value: json!([volume]),
        }),
    }
    ops
}

/// On an UPDATE that sends the user's own manifest back without the gate
/// (`kubectl replace`), the gate and its volume are put back where they
/// were, so the update changes only what the user changed (init containers
/// and volumes are immutable).
fn keep_gate(new: &Pod, old: &Pod) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    let (Some(new_spec), Some(old_spec)) = (&new.spec, &old.spec) else {
        return ops;
    };
    let new_init = new_spec.init_containers.as_deref().unwrap_or_default();
    if let Some(gate) = old_spec
        .init_containers
        .as_deref()
        .and_then(<[Container]>::first)
        .filter(|c| c.name == GATE_CONTAINER)
        && !new_init.iter().any(|c| c.name == GATE_CONTAINER)
    {
        let mut wanted = vec![json!(gate)];
        wanted.extend(new_init.iter().map(|c| json!(c)));
        ops.push(PatchOp::Add {
            path: "/spec/initContainers".to_owned(),
            value: Value::Array(wanted),
        });
    }
    let new_volumes = new_spec.volumes.as_deref().unwrap_or_default();
    let old_volumes = old_spec.volumes.as_deref().unwrap_or_default();
    if let Some(i) = old_volumes.iter().position(|v| v.name == GATE_VOLUME)
        && !new_volumes.iter().any(|v| v.name == GATE_VOLUME)
    {
        // Inserted at its old index, after the ops that name the other
        // volumes by index (an add at index i shifts only what follows).
        ops.push(match new_spec.volumes {
            Some(_) => PatchOp::Add {
                path: format!("/spec/volumes/{}", i.min(new_volumes.len())),
                value: json!(old_volumes[i]),
            },
            None => PatchOp::Add {
                path: "/spec/volumes".to_owned(),
                value: json!([old_volumes[i]]),
            },
        });
    }
    ops
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

pub(super) fn annotation_op(pod: &Pod, value: &str) -> PatchOp {
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
