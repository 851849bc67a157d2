//! [`Metrics`]: the counters and gauges the data path updates, exposed as
//! Prometheus/OpenMetrics text on the admin listener's `/metrics`.
//!
//! Cloning is an [`Arc`] bump; every update is an atomic operation (a labeled
//! family looks its label set up under a read lock first, then is atomic).

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: String,
    resource: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

type IntGauge = Gauge<i64, AtomicI64>;

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<DecisionLabels, Histogram>,
    masked_fields: Counter,
    held_approvals: IntGauge,
    redirect_map_entries: Family<MapLabels, IntGauge>,
    unresolved_pods: IntGauge,
    audit_queue_depth: IntGauge,
    audit_refused: Counter,
    audit_spool_events: Family<SinkLabels, IntGauge>,
    audit_spool_bytes: Family<SinkLabels, IntGauge>,
    audit_dropped: Family<SinkLabels, Counter>,
    audit_delivered: Family<SinkLabels, Counter>,
    audit_delivery_failures: Family<SinkLabels, Counter>,
    record_dropped: Counter,
}

/// The proxy's metrics. Create one at startup, clone it into every task.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chaperone");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by Kubernetes verb, resource and policy decision",
            requests.clone(),
        );
        let latency = Family::<DecisionLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to completing its response, by decision",
            latency.clone(),
        );
        let masked_fields = Counter::default();
        registry.register(
            "masked_fields",
            "Values replaced by masking",
            masked_fields.clone(),
        );
        let held_approvals = IntGauge::default();
        registry.register(
            "approvals_held",
            "Requests currently held waiting for approval",
            held_approvals.clone(),
        );
        let redirect_map_entries = Family::<MapLabels, IntGauge>::default();
        registry.register(
            "redirect_map_entries",
            "Entries in the eBPF redirect maps",
            redirect_map_entries.clone(),
        );
        let unresolved_pods = IntGauge::default();
        registry.register(
            "unresolved_pods",
            "Agent cgroups whose pod could not be resolved",
            unresolved_pods.clone(),
        );
        let audit_queue_depth = IntGauge::default();
        registry.register(
            "audit_queue_depth",
            "Audit events admitted but not yet written to the spool",
            audit_queue_depth.clone(),
        );
        let audit_refused = Counter::default();
        registry.register(
            "audit_refused",
            "Requests refused with 503 because the audit spool was full (mode block)",
            audit_refused.clone(),
        );
        let audit_spool_events = Family::<SinkLabels, IntGauge>::default();
        registry.register(
            "audit_spool_events",
            "Audit events spooled on disk and not yet acknowledged by the sink",
            audit_spool_events.clone(),
        );
        let audit_spool_bytes = Family::<SinkLabels, IntGauge>::default();
        registry.register(
            "audit_spool_bytes",
            "Bytes of audit events spooled on disk and not yet acknowledged by the sink",
            audit_spool_bytes.clone(),
        );
        let audit_dropped = Family::<SinkLabels, Counter>::default();
        registry.register(
            "audit_dropped",
            "Audit events dropped because the spool was full (mode drop)",
            audit_dropped.clone(),
        );
        let audit_delivered = Family::<SinkLabels, Counter>::default();
        registry.register(
            "audit_delivered",
            "Audit events acknowledged by the sink",
            audit_delivered.clone(),
        );
        let audit_delivery_failures = Family::<SinkLabels, Counter>::default();
        registry.register(
            "audit_delivery_failures",
            "Failed attempts to deliver a batch of audit events (retried)",
            audit_delivery_failures.clone(),
        );
        let record_dropped = Counter::default();
        registry.register(
            "record_dropped",
            "Recording messages dropped because the recording queue was full",
            record_dropped.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                latency,
                masked_fields,
                held_approvals,
                redirect_map_entries,
                unresolved_pods,
                audit_queue_depth,
                audit_refused,
                audit_spool_events,
                audit_spool_bytes,
                audit_dropped,
                audit_delivered,
                audit_delivery_failures,
                record_dropped,
            }),
        }
    }

    /// One finished request: counted by verb, resource and decision, its
    /// latency observed. Every label value comes from a fixed vocabulary
    /// ([`vocabulary`]); anything else is counted as `other`, so no request
    /// (authenticated or not) can add a series.
    pub fn request(&self, verb: &str, resource: &str, decision: &str, latency: Duration) {
        let decision = vocabulary::decision(decision);
        self.inner
            .requests
            .get_or_create(&RequestLabels {
                verb: vocabulary::verb(verb).to_owned(),
                resource: vocabulary::resource_path(resource),
                decision: decision.to_owned(),
            })
            .inc();
        self.inner
            .latency
            .get_or_create(&DecisionLabels {
                decision: decision.to_owned(),
            })
            .observe(latency.as_secs_f64());
    }

    /// Counts one finished [`Exchange`](crate::exchange::Exchange): request,
    /// latency, masked fields.
    pub fn exchange(&self, exchange: &crate::exchange::Exchange) {
        let request = &exchange.request;
        let resource = if !request.is_resource_request {
            String::new()
        } else {
            vocabulary::resource(&request.resource, &request.subresource)
        };
        self.request(
            &request.verb,
            &resource,
            exchange.decision.verdict(),
            exchange.latency(),
        );
        self.masked(u64::from(exchange.masked_fields));
    }

    pub fn masked(&self, fields: u64) {
        if fields > 0 {
            self.inner.masked_fields.inc_by(fields);
        }
    }

    /// A request starts waiting for approval (`+1`) or stops (`-1`).
    pub fn held_approvals(&self, delta: i64) {
        self.inner.held_approvals.inc_by(delta);
    }

    pub fn redirect_map_entries(&self, map: &str, entries: i64) {
        self.inner
            .redirect_map_entries
            .get_or_create(&MapLabels {
                map: map.to_owned(),
            })
            .set(entries);
    }

    pub fn unresolved_pods(&self, count: i64) {
        self.inner.unresolved_pods.set(count);
    }

    pub(crate) fn audit_queue_depth(&self, depth: i64) {
        self.inner.audit_queue_depth.set(depth);
    }

    pub(crate) fn audit_refused(&self) {
        self.inner.audit_refused.inc();
    }

    pub(crate) fn audit_spool(&self, sink: &str, events: i64, bytes: i64) {
        let labels = SinkLabels {
            sink: sink.to_owned(),
        };
        self.inner
            .audit_spool_events
            .get_or_create(&labels)
            .set(events);
        self.inner
            .audit_spool_bytes
            .get_or_create(&labels)
            .set(bytes);
    }

    pub(crate) fn audit_dropped(&self, sink: &str) {
        self.inner
            .audit_dropped
            .get_or_create(&SinkLabels {
                sink: sink.to_owned(),
            })
            .inc();
    }

    pub(crate) fn audit_delivered(&self, sink: &str, events: u64) {
        self.inner
            .audit_delivered
            .get_or_create(&SinkLabels {
                sink: sink.to_owned(),
            })
            .inc_by(events);
    }

    pub(crate) fn audit_delivery_failed(&self, sink: &str) {
        self.inner
            .audit_delivery_failures
            .get_or_create(&SinkLabels {
                sink: sink.to_owned(),
            })
            .inc();
    }

    pub(crate) fn record_dropped(&self) {
        self.inner.record_dropped.inc();
    }

    /// Total audit events dropped for `sink` (for tests and diagnostics).
    pub fn audit_dropped_count(&self, sink: &str) -> u64 {
        self.inner
            .audit_dropped
            .get_or_create(&SinkLabels {
                sink: sink.to_owned(),
            })
            .get()
    }

    /// Total recording messages dropped.
    pub fn record_dropped_count(&self) -> u64 {
        self.inner.record_dropped.get()
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The label values metrics may carry: Kubernetes' built-in resources,
/// chaperone's own, their subresources, the request verbs and chaperone's
/// decisions. A request names whatever it likes; what it names outside
/// these is `other`, so the number of series is fixed by this file.
pub mod vocabulary {
    /// The label value for anything outside the vocabulary.
    pub const OTHER: &str = "other";

    const VERBS: [&str; 15] = [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
        "proxy",
        // Non-resource requests: the lowercased HTTP method.
        "post",
        "put",
        "head",
        "options",
        "connect",
        "trace",
    ];

    const RESOURCES: [&str; 66] = [
        // core
        "bindings",
        "componentstatuses",
        "configmaps",
        "endpoints",
        "events",
        "limitranges",
        "namespaces",
        "nodes",
        "persistentvolumeclaims",
        "persistentvolumes",
        "pods",
        "podtemplates",
        "replicationcontrollers",
        "resourcequotas",
        "secrets",
        "serviceaccounts",
        "services",
        // apps, autoscaling, batch, policy
        "controllerrevisions",
        "daemonsets",
        "deployments",
        "replicasets",
        "statefulsets",
        "horizontalpodautoscalers",
        "cronjobs",
        "jobs",
        "poddisruptionbudgets",
        "podsecuritypolicies",
        // networking, discovery, coordination, node, scheduling
        "ingresses",
        "ingressclasses",
        "networkpolicies",
        "endpointslices",
        "leases",
        "runtimeclasses",
        "priorityclasses",
        // rbac
        "clusterrolebindings",
        "clusterroles",
        "rolebindings",
        "roles",
        // storage
        "csidrivers",
        "csinodes",
        "csistoragecapacities",
        "storageclasses",
        "volumeattachments",
        // authentication, authorization, certificates
        "tokenreviews",
        "selfsubjectreviews",
        "localsubjectaccessreviews",
        "selfsubjectaccessreviews",
        "selfsubjectrulesreviews",
        "subjectaccessreviews",
        "certificatesigningrequests",
        // cluster extension points
        "customresourcedefinitions",
        "apiservices",
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
        "validatingadmissionpolicies",
        "validatingadmissionpolicybindings",
        "flowschemas",
        "prioritylevelconfigurations",
        "storageversions",
        "resourceclaims",
        "resourceslices",
        "deviceclasses",
        // metrics.k8s.io
        "podmetrics",
        "nodemetrics",
        // chaperone's own
        "agentpolicies",
        "approvalrequests",
    ];

    const SUBRESOURCES: [&str; 14] = [
        "status",
        "scale",
        "exec",
        "attach",
        "portforward",
        "proxy",
        "log",
        "eviction",
        "binding",
        "ephemeralcontainers",
        "token",
        "finalize",
        "approval",
        "resize",
    ];

    const DECISIONS: [&str; 5] = ["allow", "deny", "mask", "approve", "dry-run-deny"];

    fn known(list: &[&'static str], value: &str) -> &'static str {
        list.iter().copied().find(|v| *v == value).unwrap_or(OTHER)
    }

    pub fn verb(verb: &str) -> &'static str {
        known(&VERBS, verb)
    }

    pub fn decision(decision: &str) -> &'static str {
        known(&DECISIONS, decision)
    }

    /// `resource` or `resource/subresource`, each part collapsed to
    /// [`OTHER`] when unknown; empty for non-resource requests.
    pub fn resource(resource: &str, subresource: &str) -> String {
        if resource.is_empty() {
            return String::new();
        }
        let resource = known(&RESOURCES, resource);
        if subresource.is_empty() {
            resource.to_owned()
        } else {
            format!("{resource}/{}", known(&SUBRESOURCES, subresource))
        }
    }

    /// As [`resource`], from `resource[/subresource]`.
    pub fn resource_path(path: &str) -> String {
        match path.split_once('/') {
            Some((resource, subresource)) => self::resource(resource, subresource),
            None => self::resource(path, ""),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn unknown_names_collapse_to_other() {
            assert_eq!(resource("pods", "exec"), "pods/exec");
            assert_eq!(resource("secrets", ""), "secrets");
            assert_eq!(resource("secretz-8a7f", ""), "other");
            assert_eq!(resource("pods", "x9"), "pods/other");
            assert_eq!(resource_path("widgets.example/scale"), "other/scale");
            assert_eq!(resource("", ""), "");
            assert_eq!(verb("list"), "list");
            assert_eq!(verb("PROPFIND"), "other");
            assert_eq!(decision("mask"), "mask");
        }
    }
}
