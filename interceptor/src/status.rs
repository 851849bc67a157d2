//! `kubectl chaperone status`: is chaperone working in this cluster, in
//! the spirit of `linkerd check`. Each check says what it found and, when
//! it fails, what to do; the command exits non-zero when any check fails.
//!
//! What is checked, with the API server's answers only (no kubelet, no
//! node access): the CRDs and the versions they serve; the admission
//! webhook's configuration, its CA bundle and the ready pods behind its
//! Service; the node agents' DaemonSet and the readiness of each of its
//! pods (their readiness probe is the agent's `/readyz`: programs
//! attached, proxy listening, CA loaded); the AgentPolicies and whether
//! the node agents accepted them; every pod that asks to be guarded
//! (labeled `chaperone.dev/intercept=true`, or in a namespace so
//! labeled), guarded or not and why; and, in each agent namespace, the CA
//! bundle ConfigMap the webhook mounts into agent pods.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
};

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::gate::GATE_CA_FILE;
use crate::kubectl::{self, Cluster};
use crate::webhook::{DEFAULT_CA_BUNDLE_CONFIGMAP, INJECTED_ANNOTATION, INTERCEPT_LABEL};

/// The CRDs a chaperone install puts in the cluster.
pub const CRDS: &[&str] = &[
    "agentpolicies.chaperone.dev",
    "approvalrequests.chaperone.dev",
];
/// The MutatingWebhookConfiguration of `deploy/base/webhook`.
pub const WEBHOOK_CONFIGURATION: &str = "chaperone";
/// The node agents' DaemonSet and its pods' label.
pub const NODE_DAEMONSET: &str = "chaperone-node";

const INSTALL: &str = "kubectl apply -k deploy/ (Kubernetes 1.20 and 1.21: kubectl apply -k deploy/overlays/k8s-1.20)";

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckOutcome {
    Ok,
    Warning,
    Failed,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub section: &'static str,
    pub outcome: CheckOutcome,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The whole report (`-o json` prints it).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub server: String,
    pub namespace: String,
    pub ok: bool,
    pub checks: Vec<Check>,
    /// Every pod that asks to be guarded: `namespace/name` → why it is or
    /// is not.
    pub pods: BTreeMap<String, PodGuard>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodGuard {
    pub guarded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub reason: String,
}

struct Checks {
    section: &'static str,
    list: Vec<Check>,
}

impl Checks {
    fn push(&mut self, outcome: CheckOutcome, message: impl Into<String>, fix: Option<String>) {
        self.list.push(Check {
            section: self.section,
            outcome,
            message: message.into(),
            fix,
        });
    }
    fn ok(&mut self, message: impl Into<String>) {
        self.push(CheckOutcome::Ok, message, None);
    }
    fn warn(&mut self, message: impl Into<String>, fix: impl Into<String>) {
        self.push(CheckOutcome::Warning, message, Some(fix.into()));
    }
    fn fail(&mut self, message: impl Into<String>, fix: impl Into<String>) {
        self.push(CheckOutcome::Failed, message, Some(fix.into()));
    }
}

/// GET `path`; `None` on 404.
async fn get(cluster: &Cluster, path: &str) -> Result<Option<Value>> {
    let request = http::Request::get(path).body(Vec::new())?;
    match cluster.client.request::<Value>(request).await {
        Ok(value) => Ok(Some(value)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(error) => Err(kubectl::explain(
            error,
            &cluster.server,
            &format!("reading {path}"),
        )),
    }
}

async fn items(cluster: &Cluster, path: &str) -> Result<Vec<Value>> {
    Ok(get(cluster, path)
        .await?
        .and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default())
}

fn str_of<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Checks the cluster `cluster` points at; chaperone's components in
/// `namespace`.
pub async fn check(cluster: &Cluster, namespace: &str) -> Result<Report> {
    let mut checks = Vec::new();
    crds(cluster, &mut checks).await?;
    webhook(cluster, &mut checks).await?;
    let ready_nodes = node_agents(cluster, namespace, &mut checks).await?;
    policies(cluster, &mut checks).await?;
    let (pods, agent_namespaces) =
        guarded_pods(cluster, namespace, &ready_nodes, &mut checks).await?;
    ca_bundles(cluster, &agent_namespaces, &mut checks).await?;
    Ok(Report {
        server: cluster.server.clone(),
        namespace: namespace.to_owned(),
        ok: checks.iter().all(|c| c.outcome != CheckOutcome::Failed),
        checks,
        pods,
    })
}

async fn crds(cluster: &Cluster, out: &mut Vec<Check>) -> Result<()> {
    let mut checks = Checks {
        section: "CustomResourceDefinitions",
        list: Vec::new(),
    };
    for name in CRDS {
        let path = format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}");
        match get(cluster, &path).await? {
            None => checks.fail(format!("{name} is not installed"), INSTALL),
            Some(crd) => {
                let served: Vec<&str> = crd["spec"]["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["served"] == true)
                    .filter_map(|v| v["name"].as_str())
                    .collect();
                let established = condition(&crd, "Established");
                if established.is_some_and(|c| c["status"] == "True") {
                    checks.ok(format!("{name} installed, serving {}", served.join(", ")));
                } else {
                    checks.fail(
                        format!(
                            "{name} is not established: {}",
                            established
                                .map(|c| str_of(c, "/message"))
                                .unwrap_or("no Established condition yet")
                        ),
                        format!("kubectl describe crd {name}"),
                    );
                }
            }
        }
    }
    out.extend(checks.list);
    Ok(())
}

async fn webhook(cluster: &Cluster, out: &mut Vec<Check>) -> Result<()> {
    let mut checks = Checks {
        section: "Admission webhook",
        list: Vec::new(),
    };
    let path = format!(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOK_CONFIGURATION}"
    );
    let Some(config) = get(cluster, &path).await? else {
        checks.fail(
            format!(
                "the MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} is missing: agent pods \
                 are created without chaperone's CA and cannot talk through it"
            ),
            INSTALL,
        );
        out.extend(checks.list);
        return Ok(());
    };
    checks.ok(format!(
        "MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} present"
    ));
    let mut services = BTreeSet::new();
    for hook in config["webhooks"].as_array().into_iter().flatten() {
        let name = str_of(hook, "/name");
        let bundle = str_of(hook, "/clientConfig/caBundle");
        match ca_bundle_problem(bundle) {
            None => checks.ok(format!("{name}: CA bundle injected")),
            Some(problem) => checks.fail(
                format!("{name}: {problem}: the API server cannot call the webhook"),
                "run deploy/bootstrap-certs.sh (it creates the webhook's certificate and \
                 injects its CA; see deploy/README.md)",
            ),
        }
        let service = &hook["clientConfig"]["service"];
        if service.is_object() {
            services.insert((
                str_of(service, "/namespace").to_owned(),
                str_of(service, "/name").to_owned(),
            ));
        }
    }
    for (namespace, name) in services {
        let service = get(
            cluster,
            &format!("/api/v1/namespaces/{namespace}/services/{name}"),
        )
        .await?;
        if service.is_none() {
            checks.fail(
                format!("the webhook's Service {namespace}/{name} is missing"),
                INSTALL,
            );
            continue;
        }
        let endpoints = get(
            cluster,
            &format!("/api/v1/namespaces/{namespace}/endpoints/{name}"),
        )
        .await?;
        let ready = endpoints
            .as_ref()
            .and_then(|e| e["subsets"].as_array())
            .into_iter()
            .flatten()
            .map(|s| s["addresses"].as_array().map_or(0, Vec::len))
            .sum::<usize>();
        if ready == 0 {
            checks.fail(
                format!(
                    "no ready webhook pod behind the Service {namespace}/{name}: with \
                     failurePolicy Fail, agent pods cannot be created"
                ),
                format!(
                    "kubectl -n {namespace} get pods -l app.kubernetes.io/name={name}; \
                     kubectl -n {namespace} logs deploy/{name}"
                ),
            );
        } else {
            checks.ok(format!(
                "Service {namespace}/{name} has {ready} ready webhook pod(s)"
            ));
        }
    }
    out.extend(checks.list);
    Ok(())
}

/// Why a webhook's `caBundle` cannot work, if it cannot.
fn ca_bundle_problem(bundle: &str) -> Option<String> {
    use base64::Engine as _;
    if bundle.trim().is_empty() {
        return Some("the CA bundle is empty".to_owned());
    }
    let Ok(pem) = base64::engine::general_purpose::STANDARD.decode(bundle.trim()) else {
        return Some("the CA bundle is not base64".to_owned());
    };
    pem_problem("the CA bundle", &pem)
}

/// Whether `pem` holds at least one certificate that has not expired.
fn pem_problem(what: &str, pem: &[u8]) -> Option<String> {
    let certificates = match crate::tls::parse_certificates(what, pem) {
        Ok(certificates) if !certificates.is_empty() => certificates,
        _ => return Some(format!("{what} holds no PEM certificate")),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let all_expired = certificates.iter().all(|der| {
        x509_parser::parse_x509_certificate(der.as_ref())
            .map(|(_, c)| c.validity().not_after.timestamp() < now)
            .unwrap_or(true)
    });
    all_expired.then(|| format!("every certificate in {what} has expired"))
}

/// Checks the node agents; the nodes whose agent is ready.
async fn node_agents(
    cluster: &Cluster,
    namespace: &str,
    out: &mut Vec<Check>,
) -> Result<BTreeSet<String>> {
    let mut checks = Checks {
        section: "Node agents",
        list: Vec::new(),
    };
    let mut ready_nodes = BTreeSet::new();
    let path = format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/{NODE_DAEMONSET}");
    let Some(daemonset) = get(cluster, &path).await? else {
        checks.fail(
            format!(
                "the DaemonSet {namespace}/{NODE_DAEMONSET} is missing: nothing redirects agent \
                 pods' API connections"
            ),
            format!("{INSTALL}; with another namespace, pass -n"),
        );
        out.extend(checks.list);
        return Ok(ready_nodes);
    };
    let desired = daemonset["status"]["desiredNumberScheduled"]
        .as_u64()
        .unwrap_or(0);
    if desired == 0 {
        checks.fail(
            format!("the DaemonSet {namespace}/{NODE_DAEMONSET} schedules no pod on any node"),
            format!(
                "kubectl -n {namespace} describe daemonset {NODE_DAEMONSET} (node selector, \
                 tolerations, pod security)"
            ),
        );
    }
    let pods = items(
        cluster,
        &format!(
            "/api/v1/namespaces/{namespace}/pods?labelSelector=app.kubernetes.io%2Fname%3D{NODE_DAEMONSET}"
        ),
    )
    .await?;
    for pod in &pods {
        let name = str_of(pod, "/metadata/name");
        let node = str_of(pod, "/spec/nodeName");
        let ready = condition(pod, "Ready").is_some_and(|c| c["status"] == "True");
        if ready && !node.is_empty() {
            ready_nodes.insert(node.to_owned());
            checks.ok(format!(
                "{name} on node {node} is ready (its /readyz: programs attached, proxy listening)"
            ));
        } else {
            checks.fail(
                format!(
                    "{name} on node {} is not ready{}: agent pods there are not guarded",
                    if node.is_empty() { "(none yet)" } else { node },
                    container_problem(pod)
                ),
                format!(
                    "kubectl -n {namespace} logs {name}; kubectl -n {namespace} describe pod {name}"
                ),
            );
        }
    }
    if desired > 0 && (pods.len() as u64) < desired {
        checks.fail(
            format!("{} of {desired} node agent pods exist", pods.len()),
            format!("kubectl -n {namespace} describe daemonset {NODE_DAEMONSET}"),
        );
    }
    out.extend(checks.list);
    Ok(ready_nodes)
}

/// `: CrashLoopBackOff (...)` from a pod's container statuses.
fn container_problem(pod: &Value) -> String {
    for status in pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let waiting = &status["state"]["waiting"];
        if waiting.is_object() {
            let message = str_of(waiting, "/message");
            return format!(
                " ({}{})",
                str_of(waiting, "/reason"),
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            );
        }
    }
    String::new()
}

async fn policies(cluster: &Cluster, out: &mut Vec<Check>) -> Result<()> {
    let mut checks = Checks {
        section: "Policies",
        list: Vec::new(),
    };
    let Some(list) = get(cluster, "/apis/chaperone.dev/v1alpha1/agentpolicies").await? else {
        // The CRD check already says what to do.
        out.extend(checks.list);
        return Ok(());
    };
    let policies = list["items"].as_array().cloned().unwrap_or_default();
    if policies.is_empty() {
        checks.warn(
            "no AgentPolicy: no rule applies to any agent",
            "write one (deploy/policies/ has examples; chaperone policy check FILE), then \
             kubectl apply -f FILE",
        );
    }
    for policy in &policies {
        let name = str_of(policy, "/metadata/name");
        match condition(policy, crate::policy::watch::ACCEPTED) {
            Some(c) if c["status"] == "True" => {
                checks.ok(format!("AgentPolicy {name} accepted"));
            }
            Some(c) => checks.fail(
                format!(
                    "AgentPolicy {name} is not accepted: {} (the last accepted generation stays in force)",
                    str_of(c, "/message")
                ),
                format!(
                    "fix it (chaperone policy check FILE), then kubectl apply -f FILE; \
                     kubectl get agentpolicy {name} -o yaml shows the condition"
                ),
            ),
            None => checks.warn(
                format!("AgentPolicy {name} has no Accepted condition: no node agent has read it yet"),
                "check that the node agents are ready (above)",
            ),
        }
    }
    out.extend(checks.list);
    Ok(())
}

/// Namespaces chaperone never guards (the webhook excludes them).
const NEVER_GUARDED: &[&str] = &["kube-system"];

async fn guarded_pods(
    cluster: &Cluster,
    namespace: &str,
    ready_nodes: &BTreeSet<String>,
    out: &mut Vec<Check>,
) -> Result<(BTreeMap<String, PodGuard>, BTreeSet<String>)> {
    let mut agent_namespaces = BTreeSet::new();
    let mut checks = Checks {
        section: "Agent pods",
        list: Vec::new(),
    };
    let selector = format!("{}%3Dtrue", INTERCEPT_LABEL.replace('/', "%2F"));
    let mut candidates: BTreeMap<String, Value> = BTreeMap::new();
    for pod in items(cluster, &format!("/api/v1/pods?labelSelector={selector}")).await? {
        let key = format!(
            "{}/{}",
            str_of(&pod, "/metadata/namespace"),
            str_of(&pod, "/metadata/name")
        );
        candidates.insert(key, pod);
    }
    for labeled in items(
        cluster,
        &format!("/api/v1/namespaces?labelSelector={selector}"),
    )
    .await?
    {
        let ns = str_of(&labeled, "/metadata/name");
        if ns == namespace || NEVER_GUARDED.contains(&ns) {
            continue;
        }
        agent_namespaces.insert(ns.to_owned());
        for pod in items(cluster, &format!("/api/v1/namespaces/{ns}/pods")).await? {
            if pod["metadata"]["labels"][INTERCEPT_LABEL] == "false" {
                continue;
            }
            let key = format!("{ns}/{}", str_of(&pod, "/metadata/name"));
            candidates.insert(key, pod);
        }
    }
    let mut pods = BTreeMap::new();
    for (key, pod) in candidates {
        let phase = str_of(&pod, "/status/phase");
        let terminating = pod["metadata"]["deletionTimestamp"].is_string();
        if phase == "Succeeded" || phase == "Failed" || terminating {
            continue;
        }
        let (ns, name) = key.split_once('/').unwrap_or_default();
        if ns != namespace {
            agent_namespaces.insert(ns.to_owned());
        }
        let node = str_of(&pod, "/spec/nodeName");
        let injected = pod["metadata"]["annotations"][INJECTED_ANNOTATION].is_string();
        let (guarded, reason, fix) = if !injected {
            (
                false,
                "created without the webhook (before it was installed, or while it was \
                 down): it does not trust chaperone's CA"
                    .to_owned(),
                Some(format!(
                    "recreate it: kubectl -n {ns} delete pod {name} (its controller makes a new one)"
                )),
            )
        } else if node.is_empty() {
            (false, "not scheduled on a node yet".to_owned(), None)
        } else if !ready_nodes.contains(node) {
            (
                false,
                format!(
                    "on node {node}, where no node agent is ready: its API calls are not guarded"
                ),
                Some(format!(
                    "see the node agents above; kubectl -n {namespace} get pods -o wide \
                     -l app.kubernetes.io/name={NODE_DAEMONSET} --field-selector spec.nodeName={node}"
                )),
            )
        } else {
            (true, format!("guarded by the node agent on {node}"), None)
        };
        match (guarded, fix) {
            (true, _) => {}
            (false, Some(fix)) => checks.fail(format!("pod {key} is not guarded: {reason}"), fix),
            (false, None) => checks.warn(format!("pod {key} is not guarded yet: {reason}"), "wait"),
        }
        pods.insert(
            key,
            PodGuard {
                guarded,
                node: (!node.is_empty()).then(|| node.to_owned()),
                reason,
            },
        );
    }
    let guarded = pods.values().filter(|p| p.guarded).count();
    if pods.is_empty() {
        checks.warn(
            format!(
                "no pod asks to be guarded (label {INTERCEPT_LABEL}=true on a pod or its namespace)"
            ),
            format!("label the agent pods' template or namespace {INTERCEPT_LABEL}=true"),
        );
    } else {
        checks.list.insert(
            0,
            Check {
                section: "Agent pods",
                outcome: CheckOutcome::Ok,
                message: format!("{guarded} of {} labeled pods guarded", pods.len()),
                fix: None,
            },
        );
    }
    out.extend(checks.list);
    Ok((pods, agent_namespaces))
}

/// The CA bundle ConfigMap in each agent namespace (`bootstrap-certs.sh
/// NAMESPACE` makes it): key `ca.crt` is what the webhook puts in agent
/// pods' service-account volume (the cluster CA and chaperone's), key
/// `chaperone-ca.crt` chaperone's CA alone, which the gate trusts. Without
/// either, agent pods wait in `ContainerCreating`: never unguarded, but
/// never running either.
async fn ca_bundles(
    cluster: &Cluster,
    namespaces: &BTreeSet<String>,
    out: &mut Vec<Check>,
) -> Result<()> {
    let mut checks = Checks {
        section: "CA bundles",
        list: Vec::new(),
    };
    let name = DEFAULT_CA_BUNDLE_CONFIGMAP;
    for ns in namespaces {
        let fix = format!("deploy/bootstrap-certs.sh {ns}");
        let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
        let Some(configmap) = get(cluster, &path).await? else {
            checks.fail(
                format!(
                    "namespace {ns} has no ConfigMap {name}: its agent pods wait in \
                     ContainerCreating"
                ),
                fix,
            );
            continue;
        };
        match bundle_problem(&configmap["data"]) {
            None => checks.ok(format!("{ns}/{name} holds chaperone's CA")),
            Some(problem) => checks.fail(
                format!("{ns}/{name}: {problem}: new agent pods wait in ContainerCreating"),
                fix,
            ),
        }
    }
    out.extend(checks.list);
    Ok(())
}

/// What is wrong with a CA bundle ConfigMap's `data`, if anything.
fn bundle_problem(data: &Value) -> Option<String> {
    let key = |k: &str| data[k].as_str().filter(|v| !v.trim().is_empty());
    let Some(bundle) = key("ca.crt") else {
        return Some("no key ca.crt".to_owned());
    };
    let Some(ours) = key(GATE_CA_FILE) else {
        return Some(format!(
            "no key {GATE_CA_FILE} (made by a bootstrap-certs.sh older than the gate)"
        ));
    };
    if let Some(problem) = pem_problem(GATE_CA_FILE, ours.as_bytes()) {
        return Some(format!("{GATE_CA_FILE}: {problem}"));
    }
    if let Some(problem) = pem_problem("ca.crt", bundle.as_bytes()) {
        return Some(format!("ca.crt: {problem}"));
    }
    let der = |pem: &str| crate::tls::parse_certificates("the CA bundle", pem.as_bytes()).ok();
    let in_bundle = match (der(ours), der(bundle)) {
        (Some(ours), Some(bundle)) => ours.iter().all(|c| bundle.contains(c)),
        _ => false,
    };
    (!in_bundle).then(|| {
        format!("ca.crt does not include {GATE_CA_FILE}: agent pods would not trust chaperone")
    })
}

/// Prints the report as `linkerd check` does: sections, one line per
/// check, the fix under each failure.
pub fn print(report: &Report, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "chaperone status of {} ({})",
        report.server, report.namespace
    )?;
    let mut section = "";
    for check in &report.checks {
        if check.section != section {
            section = check.section;
            writeln!(out, "\n{section}")?;
            writeln!(out, "{}", "-".repeat(section.len()))?;
        }
        let mark = match check.outcome {
            CheckOutcome::Ok => "√",
            CheckOutcome::Warning => "‼",
            CheckOutcome::Failed => "×",
        };
        writeln!(out, "{mark} {}", check.message)?;
        if check.outcome != CheckOutcome::Ok
            && let Some(fix) = &check.fix
        {
            writeln!(out, "    fix: {fix}")?;
        }
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.outcome == CheckOutcome::Failed)
        .count();
    let warned = report
        .checks
        .iter()
        .filter(|c| c.outcome == CheckOutcome::Warning)
        .count();
    writeln!(out)?;
    if failed == 0 {
        writeln!(out, "Status check results are √ ({warned} warning(s))")?;
    } else {
        writeln!(
            out,
            "Status check results are × ({failed} failed, {warned} warning(s))"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_ca_bundle_must_be_a_current_certificate() {
        use base64::Engine as _;
        assert!(ca_bundle_problem("").unwrap().contains("empty"));
        assert!(ca_bundle_problem("!!").unwrap().contains("base64"));
        let not_pem = base64::engine::general_purpose::STANDARD.encode("hello");
        assert!(ca_bundle_problem(&not_pem).unwrap().contains("no PEM"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = base64::engine::general_purpose::STANDARD.encode(cert.pem());
        assert_eq!(ca_bundle_problem(&good), None);
    }

    fn self_signed(name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec![name.into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem()
    }

    #[test]
    fn an_agent_namespaces_ca_bundle_needs_chaperones_ca_under_both_keys() {
        let (cluster, ours) = (self_signed("cluster"), self_signed("chaperone"));
        let both = format!("{cluster}{ours}");
        let data = |bundle: &str, alone: Option<&str>| {
            let mut data = json!({"ca.crt": bundle});
            if let Some(alone) = alone {
                data["chaperone-ca.crt"] = json!(alone);
            }
            data
        };
        assert_eq!(bundle_problem(&data(&both, Some(&ours))), None);
        // The key an older bootstrap-certs.sh did not write.
        assert!(
            bundle_problem(&data(&both, None))
                .unwrap()
                .contains("no key chaperone-ca.crt (made by a bootstrap-certs.sh older")
        );
        assert!(
            bundle_problem(&json!({"chaperone-ca.crt": ours}))
                .unwrap()
                .contains("no key ca.crt")
        );
        // A bundle that left chaperone's CA out: agents would not trust it.
        assert!(
            bundle_problem(&data(&cluster, Some(&ours)))
                .unwrap()
                .contains("ca.crt does not include chaperone-ca.crt")
        );
        assert!(
            bundle_problem(&data(&both, Some("not a certificate")))
                .unwrap()
                .contains("chaperone-ca.crt: chaperone-ca.crt holds no PEM certificate")
        );
    }
}
