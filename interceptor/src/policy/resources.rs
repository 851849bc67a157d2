//! Resource names as kubectl reads them, for `chaperone policy explain`:
//! `deploy`, `deployment`, `Deployment`, `deployments` and
//! `deployments.apps` all name `apps/v1` `deployments`, as they do for
//! `kubectl get` and `kubectl auth can-i`. The names come from the API
//! server's discovery when a cluster is given, else from a built-in table
//! of the resources Kubernetes 1.20 serves (a test compares it with the
//! real kube-apiserver's discovery).
//!
//! Resolution follows kubectl's RESTMapper: `RESOURCE[.VERSION][.GROUP]`;
//! the resource word is matched, case-insensitively, against each
//! resource's plural, singular (its kind in lower case where discovery
//! leaves the singular empty) and short names; when several groups serve
//! the name, the first in discovery order wins (the core group first, so
//! `events` is `v1` `events`, not `events.k8s.io`), and within a group its
//! preferred version.

use std::fmt;

use serde::Serialize;

/// One resource a server serves in one group version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiResource {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    /// The plural, as in URLs and RBAC rules: `deployments`.
    pub name: String,
    /// Lower case: `deployment`.
    pub singular: String,
    pub kind: String,
    pub short_names: Vec<String>,
    pub namespaced: bool,
    /// `status`, `scale`, `exec`, ...
    pub subresources: Vec<String>,
}

/// Where the table of resources came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResourceSource {
    /// The built-in table of Kubernetes 1.20's resources.
    BuiltIn,
    /// The discovery documents of the server at this URL.
    Discovery(String),
}

impl fmt::Display for ResourceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceSource::BuiltIn => write!(
                f,
                "the built-in table of Kubernetes {BUILT_IN_VERSION} resources"
            ),
            ResourceSource::Discovery(url) => write!(f, "the discovery documents of {url}"),
        }
    }
}

/// The resources a server serves, in discovery order (groups in the
/// server's order, the core group first; within a group, its preferred
/// version first).
#[derive(Clone, Debug)]
pub struct ResourceTable {
    pub resources: Vec<ApiResource>,
    pub source: ResourceSource,
    /// The namespace of a namespaced request without `-n`: the kubeconfig
    /// context's, as for kubectl, else `default`.
    pub default_namespace: String,
}

/// A resource argument resolved against a [`ResourceTable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub resource: ApiResource,
    /// The subresource asked for (validated), or empty.
    pub subresource: String,
}

/// Why a resource argument names nothing the server serves.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "the server doesn't have a resource type \"{what}\" (looked up in {looked_in}); \
         write it as kubectl does, e.g. pods, deploy, deployments.apps or \
         agentpolicies.chaperone.dev{hint}"
    )]
    UnknownResource {
        what: String,
        looked_in: ResourceSource,
        hint: String,
    },
    #[error(
        "{resource} has no subresource \"{subresource}\"; it has {}",
        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
    )]
    UnknownSubresource {
        resource: String,
        subresource: String,
        known: Vec<String>,
    },
}

impl ResourceTable {
    /// The resources of Kubernetes [`BUILT_IN_VERSION`].
    pub fn built_in() -> ResourceTable {
        ResourceTable {
            resources: BUILT_IN
                .iter()
                .map(
                    |&(group, version, name, kind, short_names, namespaced, subresources)| {
                        ApiResource {
                            group: group.into(),
                            version: version.into(),
                            name: name.into(),
                            singular: kind.to_ascii_lowercase(),
                            kind: kind.into(),
                            short_names: words(short_names),
                            namespaced,
                            subresources: words(subresources),
                        }
                    },
                )
                .collect(),
            source: ResourceSource::BuiltIn,
            default_namespace: "default".into(),
        }
    }

    /// Resolves `RESOURCE[.VERSION][.GROUP]` (and an optional subresource)
    /// as kubectl does.
    pub fn resolve(&self, text: &str, subresource: &str) -> Result<Resolved, ResolveError> {
        let lower = text.to_ascii_lowercase();
        let found = self
            .find(&lower)
            .ok_or_else(|| ResolveError::UnknownResource {
                what: text.to_owned(),
                looked_in: self.source.clone(),
                hint: self.hint(&lower),
            })?;
        if !subresource.is_empty() && !found.subresources.iter().any(|s| s == subresource) {
            return Err(ResolveError::UnknownSubresource {
                resource: qualified(found),
                subresource: subresource.to_owned(),
                known: found.subresources.clone(),
            });
        }
        Ok(Resolved {
            resource: found.clone(),
            subresource: subresource.to_owned(),
        })
    }

    fn find(&self, lower: &str) -> Option<&ApiResource> {
        // kubectl first reads `a.b.c` as RESOURCE.VERSION.GROUP, then as
        // RESOURCE.GROUP, then the whole text as a resource.
        let mut readings: Vec<(&str, Option<&str>, Option<&str>)> = Vec::new();
        if let Some((resource, rest)) = lower.split_once('.') {
            if let Some((version, group)) = rest.split_once('.') {
                readings.push((resource, Some(version), Some(group)));
            }
            readings.push((resource, None, Some(rest)));
        }
        readings.push((lower, None, None));
        readings.into_iter().find_map(|(resource, version, group)| {
            self.resources.iter().find(|r| {
                group.is_none_or(|g| r.group == g)
                    && version.is_none_or(|v| r.version == v)
                    && r.answers_to(resource)
            })
        })
    }

    /// A suggestion for a misspelt or group-qualified name: the resources
    /// whose names start like it.
    fn hint(&self, lower: &str) -> String {
        let word = lower.split('.').next().unwrap_or(lower);
        let stem = &word[..word.len().min(3)];
        let mut close: Vec<String> = self
            .resources
            .iter()
            .filter(|r| !stem.is_empty() && r.name.starts_with(stem))
            .map(qualified)
            .collect();
        close.dedup();
        close.truncate(5);
        if close.is_empty() {
            String::new()
        } else {
            format!("; did you mean {}?", close.join(", "))
        }
    }
}

impl ApiResource {
    fn answers_to(&self, word: &str) -> bool {
        self.name == word
            || self.singular == word
            || self.kind.eq_ignore_ascii_case(word)
            || self.short_names.iter().any(|s| s == word)
    }
}

/// `deployments.apps`, or `pods` for the core group.
pub fn qualified(resource: &ApiResource) -> String {
    if resource.group.is_empty() {
        resource.name.clone()
    } else {
        format!("{}.{}", resource.name, resource.group)
    }
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

// === discovery ===

/// Reads the resources of the cluster a kubeconfig (and context) names,
/// from its discovery documents.
pub async fn discover(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> anyhow::Result<ResourceTable> {
    use anyhow::Context as _;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).with_context(|| {
                format!(
                    "cannot read the kubeconfig {}; check the path (or leave out \
                     --kubeconfig to use the built-in table of resources)",
                    path.display()
                )
            })?;
            kube::Config::from_custom_kubeconfig(file, &options).await
        }
        None => kube::Config::from_kubeconfig(&options).await,
    }
    .context("cannot use the kubeconfig")?;
    let url = config.cluster_url.to_string();
    let default_namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).context("cannot build a client")?;
    let unreachable = |e: kube::Error| {
        anyhow::anyhow!(
            "cannot read the discovery documents of {url}: {e}; check that the server is \
             reachable and the credentials are valid (kubectl --kubeconfig ... api-resources), \
             or leave out --kubeconfig/--context to use the built-in table"
        )
    };
    let mut lists = Vec::new();
    let core = client.list_core_api_versions().await.map_err(unreachable)?;
    for version in &core.versions {
        lists.push(
            client
                .list_core_api_resources(version)
                .await
                .map_err(unreachable)?,
        );
    }
    let groups = client.list_api_groups().await.map_err(unreachable)?;
    for group in &groups.groups {
        // The preferred version first, then the others in the server's order.
        let preferred = group.preferred_version.as_ref().map(|v| &v.group_version);
        let mut versions: Vec<&String> = group.versions.iter().map(|v| &v.group_version).collect();
        versions.sort_by_key(|v| Some(*v) != preferred);
        for group_version in versions {
            match client.list_api_group_resources(group_version).await {
                Ok(list) => lists.push(list),
                // An aggregated API whose backend is down: kubectl warns and
                // goes on with the rest.
                Err(e) => tracing::warn!(%group_version, "discovery failed: {e}"),
            }
        }
    }
    Ok(ResourceTable {
        resources: from_discovery(&lists),
        source: ResourceSource::Discovery(url),
        default_namespace,
    })
}

/// The resources of discovery documents (`APIResourceList`s), in order,
/// subresources folded into their resources.
pub fn from_discovery(
    lists: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList],
) -> Vec<ApiResource> {
    let mut out: Vec<ApiResource> = Vec::new();
    for list in lists {
        let (group, version) = match list.group_version.split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), list.group_version.clone()),
        };
        let first = out.len();
        for r in &list.resources {
            match r.name.split_once('/') {
                Some((parent, sub)) => {
                    if let Some(p) = out[first..].iter_mut().find(|p| p.name == parent) {
                        p.subresources.push(sub.to_owned());
                    }
                }
                None => out.push(ApiResource {
                    group: group.clone(),
                    version: version.clone(),
                    name: r.name.clone(),
                    singular: if r.singular_name.is_empty() {
                        r.kind.to_ascii_lowercase()
                    } else {
                        r.singular_name.clone()
                    },
                    kind: r.kind.clone(),
                    short_names: r.short_names.clone().unwrap_or_default(),
                    namespaced: r.namespaced,
                    subresources: Vec::new(),
                }),
            }
        }
        for r in &mut out[first..] {
            r.subresources.sort();
        }
    }
    out
}

// === the built-in table ===

/// The Kubernetes version whose resources [`BUILT_IN`] lists: the oldest
/// chaperone supports, the real server of the tests.
pub const BUILT_IN_VERSION: &str = "1.20";

/// (group, version, plural, kind, short names, namespaced, subresources),
/// in discovery order. Generated from the real kube-apiserver v1.20.2's
/// discovery; `policy_real_api::the_built_in_resource_table_is_the_real_servers`
/// prints it again when they differ.
#[rustfmt::skip]
const BUILT_IN: &[(&str, &str, &str, &str, &str, bool, &str)] = &[
    ("", "v1", "bindings", "Binding", "", true, ""),
    ("", "v1", "componentstatuses", "ComponentStatus", "cs", false, ""),
    ("", "v1", "configmaps", "ConfigMap", "cm", true, ""),
    ("", "v1", "endpoints", "Endpoints", "ep", true, ""),
    ("", "v1", "events", "Event", "ev", true, ""),
    ("", "v1", "limitranges", "LimitRange", "limits", true, ""),
    ("", "v1", "namespaces", "Namespace", "ns", false, "finalize status"),
    ("", "v1", "nodes", "Node", "no", false, "proxy status"),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", "pvc", true, "status"),
    ("", "v1", "persistentvolumes", "PersistentVolume", "pv", false, "status"),
    ("", "v1", "pods", "Pod", "po", true, "attach binding eviction exec log portforward proxy status"),
    ("", "v1", "podtemplates", "PodTemplate", "", true, ""),
    ("", "v1", "replicationcontrollers", "ReplicationController", "rc", true, "scale status"),
    ("", "v1", "resourcequotas", "ResourceQuota", "quota", true, "status"),
    ("", "v1", "secrets", "Secret", "", true, ""),
    ("", "v1", "serviceaccounts", "ServiceAccount", "sa", true, "token"),
    ("", "v1", "services", "Service", "svc", true, "proxy status"),
    ("apiregistration.k8s.io", "v1", "apiservices", "APIService", "", false, "status"),
    ("apiregistration.k8s.io", "v1beta1", "apiservices", "APIService", "", false, "status"),
    ("apps", "v1", "controllerrevisions", "ControllerRevision", "", true, ""),
    ("apps", "v1", "daemonsets", "DaemonSet", "ds", true, "status"),
    ("apps", "v1", "deployments", "Deployment", "deploy", true, "scale status"),
    ("apps", "v1", "replicasets", "ReplicaSet", "rs", true, "scale status"),
    ("apps", "v1", "statefulsets", "StatefulSet", "sts", true, "scale status"),
    ("events.k8s.io", "v1", "events", "Event", "ev", true, ""),
    ("events.k8s.io", "v1beta1", "events", "Event", "ev", true, ""),
    ("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", "", false, ""),
    ("authentication.k8s.io", "v1beta1", "tokenreviews", "TokenReview", "", false, ""),
    ("authorization.k8s.io", "v1", "localsubjectaccessreviews", "LocalSubjectAccessReview", "", true, ""),
    ("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", "", false, ""),
    ("authorization.k8s.io", "v1", "selfsubjectrulesreviews", "SelfSubjectRulesReview", "", false, ""),
    ("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", "", false, ""),
    ("authorization.k8s.io", "v1beta1", "localsubjectaccessreviews", "LocalSubjectAccessReview", "", true, ""),
    ("authorization.k8s.io", "v1beta1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", "", false, ""),
    ("authorization.k8s.io", "v1beta1", "selfsubjectrulesreviews", "SelfSubjectRulesReview", "", false, ""),
    ("authorization.k8s.io", "v1beta1", "subjectaccessreviews", "SubjectAccessReview", "", false, ""),
    ("autoscaling", "v1", "horizontalpodautoscalers", "HorizontalPodAutoscaler", "hpa", true, "status"),
    ("autoscaling", "v2beta1", "horizontalpodautoscalers", "HorizontalPodAutoscaler", "hpa", true, "status"),
    ("autoscaling", "v2beta2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", "hpa", true, "status"),
    ("batch", "v1", "jobs", "Job", "", true, "status"),
    ("batch", "v1beta1", "cronjobs", "CronJob", "cj", true, "status"),
    ("certificates.k8s.io", "v1", "certificatesigningrequests", "CertificateSigningRequest", "csr", false, "approval status"),
    ("certificates.k8s.io", "v1beta1", "certificatesigningrequests", "CertificateSigningRequest", "csr", false, "approval status"),
    ("networking.k8s.io", "v1", "ingressclasses", "IngressClass", "", false, ""),
    ("networking.k8s.io", "v1", "ingresses", "Ingress", "ing", true, "status"),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", "netpol", true, ""),
    ("networking.k8s.io", "v1beta1", "ingressclasses", "IngressClass", "", false, ""),
    ("networking.k8s.io", "v1beta1", "ingresses", "Ingress", "ing", true, "status"),
    ("extensions", "v1beta1", "ingresses", "Ingress", "ing", true, "status"),
    ("policy", "v1beta1", "poddisruptionbudgets", "PodDisruptionBudget", "pdb", true, "status"),
    ("policy", "v1beta1", "podsecuritypolicies", "PodSecurityPolicy", "psp", false, ""),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", "", false, ""),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", "", false, ""),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", "", true, ""),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", "", true, ""),
    ("rbac.authorization.k8s.io", "v1beta1", "clusterrolebindings", "ClusterRoleBinding", "", false, ""),
    ("rbac.authorization.k8s.io", "v1beta1", "clusterroles", "ClusterRole", "", false, ""),
    ("rbac.authorization.k8s.io", "v1beta1", "rolebindings", "RoleBinding", "", true, ""),
    ("rbac.authorization.k8s.io", "v1beta1", "roles", "Role", "", true, ""),
    ("storage.k8s.io", "v1", "csidrivers", "CSIDriver", "", false, ""),
    ("storage.k8s.io", "v1", "csinodes", "CSINode", "", false, ""),
    ("storage.k8s.io", "v1", "storageclasses", "StorageClass", "sc", false, ""),
    ("storage.k8s.io", "v1", "volumeattachments", "VolumeAttachment", "", false, "status"),
    ("storage.k8s.io", "v1beta1", "csidrivers", "CSIDriver", "", false, ""),
    ("storage.k8s.io", "v1beta1", "csinodes", "CSINode", "", false, ""),
    ("storage.k8s.io", "v1beta1", "storageclasses", "StorageClass", "sc", false, ""),
    ("storage.k8s.io", "v1beta1", "volumeattachments", "VolumeAttachment", "", false, ""),
    ("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", "", false, ""),
    ("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations", "ValidatingWebhookConfiguration", "", false, ""),
    ("admissionregistration.k8s.io", "v1beta1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", "", false, ""),
    ("admissionregistration.k8s.io", "v1beta1", "validatingwebhookconfigurations", "ValidatingWebhookConfiguration", "", false, ""),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", "crd crds", false, "status"),
    ("apiextensions.k8s.io", "v1beta1", "customresourcedefinitions", "CustomResourceDefinition", "crd crds", false, "status"),
    ("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", "pc", false, ""),
    ("scheduling.k8s.io", "v1beta1", "priorityclasses", "PriorityClass", "pc", false, ""),
    ("coordination.k8s.io", "v1", "leases", "Lease", "", true, ""),
    ("coordination.k8s.io", "v1beta1", "leases", "Lease", "", true, ""),
    ("node.k8s.io", "v1", "runtimeclasses", "RuntimeClass", "", false, ""),
    ("node.k8s.io", "v1beta1", "runtimeclasses", "RuntimeClass", "", false, ""),
    ("discovery.k8s.io", "v1beta1", "endpointslices", "EndpointSlice", "", true, ""),
    ("flowcontrol.apiserver.k8s.io", "v1beta1", "flowschemas", "FlowSchema", "", false, "status"),
    ("flowcontrol.apiserver.k8s.io", "v1beta1", "prioritylevelconfigurations", "PriorityLevelConfiguration", "", false, "status"),
];
