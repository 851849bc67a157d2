//! The node agent's configuration: every flag, environment variable and
//! config-file key has its name here and nowhere else. Precedence: flag >
//! environment > config file (`--config`, YAML with the flags' long names in
//! camelCase) > default.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

use crate::redirect::RefusedDestination;

/// `chaperone node` flags. Each can also be set by the environment variable
/// shown in `--help`, or in the `--config` file.
#[derive(Clone, Debug, Default, Args)]
pub struct NodeArgs {
    /// YAML config file; flags and environment override its values.
    #[arg(long, env = "CHAPERONE_CONFIG")]
    pub config: Option<PathBuf>,

    /// This node's name (DaemonSet: downward API `spec.nodeName`).
    #[arg(long, env = "CHAPERONE_NODE_NAME")]
    pub node_name: Option<String>,

    /// The node agent's own pod (DaemonSet: downward API `metadata.name`).
    /// With --pod-namespace: on exit, if the DaemonSet that owns this pod
    /// is gone or being deleted, the programs are detached and the pins
    /// removed; otherwise (upgrade, drain, restart) they stay.
    #[arg(long, env = "CHAPERONE_POD_NAME", requires = "pod_namespace")]
    pub pod_name: Option<String>,

    /// The node agent's pod's namespace (downward API `metadata.namespace`).
    #[arg(long, env = "CHAPERONE_POD_NAMESPACE", requires = "pod_name")]
    pub pod_namespace: Option<String>,

    /// The address agent pods reach the proxy at: the node's IP (downward API
    /// `status.hostIP`). Never 127.0.0.1: from a pod that is the pod itself.
    #[arg(long, env = "CHAPERONE_HOST_IP")]
    pub proxy_ip: Vec<IpAddr>,

    /// The proxy's port on the node.
    #[arg(long, env = "CHAPERONE_PROXY_PORT")]
    pub proxy_port: Option<u16>,

    /// Extra API-server addresses agents dial that are redirected (a
    /// public endpoint, a load balancer). The node finds the `kubernetes`
    /// Service's ClusterIPs, the `default/kubernetes` Endpoints and its own
    /// server's host by itself. Default: KUBERNETES_SERVICE_HOST:PORT.
    #[arg(long = "target", env = "CHAPERONE_TARGETS", value_delimiter = ',')]
    pub targets: Vec<SocketAddr>,

    /// Destinations agents may never dial (`:PORT`, `IP`, `IP:PORT`).
    /// Default: kubelet :10250 and :10255, etcd :2379 and :2380,
    /// 169.254.169.254. The admin port is always refused as well.
    #[arg(long = "refuse", env = "CHAPERONE_REFUSE", value_delimiter = ',')]
    pub refused: Vec<RefusedDestination>,

    /// cgroup v2 directory to attach the eBPF programs at. Default: the
    /// cgroup v2 mount from /proc/mounts.
    #[arg(long, env = "CHAPERONE_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Kubeconfig for chaperone's own API access and the upstream. Default:
    /// in-cluster config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Directory of chaperone's CA (ca.crt, ca.key).
    #[arg(long, env = "CHAPERONE_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Policy files (local mode). Without them, `AgentPolicy` objects are
    /// watched in the cluster.
    #[arg(long = "policy", env = "CHAPERONE_POLICY", value_delimiter = ',')]
    pub policy_files: Vec<PathBuf>,

    /// Directory of session recordings.
    #[arg(long, env = "CHAPERONE_RECORD_DIR")]
    pub record_dir: Option<PathBuf>,

    /// The node's secret that keys the recordings' hash chains, created
    /// (mode 0600) when missing (default: `record.key` beside the
    /// recordings directory). `chaperone verify` needs it to tell a
    /// session rewritten whole.
    #[arg(long, env = "CHAPERONE_RECORD_KEY")]
    pub record_key: Option<PathBuf>,

    /// Audit log file (audit.k8s.io/v1 Events, JSON lines); `-` for stdout.
    #[arg(long, env = "CHAPERONE_AUDIT_LOG")]
    pub audit_log: Option<String>,

    /// Audit webhook: an `https://` URL, or a kubeconfig-format file as the
    /// API server's `--audit-webhook-config-file` takes. Events go as
    /// `EventList` batches, spooled to disk while the webhook is down.
    #[arg(long, env = "CHAPERONE_AUDIT_WEBHOOK")]
    pub audit_webhook: Option<String>,

    /// Longest wait for an audit webhook batch to fill, in seconds (the API
    /// server's `--audit-webhook-batch-max-wait`; default 30).
    #[arg(long, env = "CHAPERONE_AUDIT_WEBHOOK_BATCH_SECONDS")]
    pub audit_webhook_batch_seconds: Option<u64>,

    /// When an audit spool is full: `block` refuses new requests with 503
    /// (fail closed; the default), `drop` drops events with a counter.
    #[arg(long, env = "CHAPERONE_AUDIT_FULL", value_enum)]
    pub audit_full: Option<crate::audit::FullMode>,

    /// `batched` (default): audit events gather in memory for up to 50 ms
    /// before they are spooled, so a crash loses at most those. `spooled`:
    /// every request waits, before it is forwarded, until its
    /// `RequestReceived` event is synced to disk (group commit).
    #[arg(long, env = "CHAPERONE_AUDIT_DURABILITY", value_enum)]
    pub audit_durability: Option<crate::audit::Durability>,

    /// Where audit events wait for a sink (default: `audit-spool` beside
    /// the recordings directory).
    #[arg(long, env = "CHAPERONE_AUDIT_SPOOL_DIR")]
    pub audit_spool_dir: Option<PathBuf>,

    /// Admin listener (/metrics, /healthz, /readyz; /approvals in local
    /// mode). Default 127.0.0.1:17080: only the node's own users reach it.
    #[arg(long, env = "CHAPERONE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// Admin port on all addresses (the DaemonSet's probes use it).
    #[arg(long, env = "CHAPERONE_ADMIN_PORT", conflicts_with = "admin_addr")]
    pub admin_port: Option<u16>,

    /// chaperone's CA certificate (PEM) from a mounted Secret, instead of
    /// --ca-dir (cluster mode: every node signs with the same CA).
    #[arg(long, env = "CHAPERONE_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// The CA's private key (PKCS#8 PEM), with --ca-cert.
    #[arg(long, env = "CHAPERONE_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// cgroups (v2 directories) to guard besides the agent pods the pod
    /// tracker finds: a CI runner's systemd scope on a VM, a test cgroup.
    #[arg(
        long = "agent-cgroup",
        env = "CHAPERONE_AGENT_CGROUPS",
        value_delimiter = ','
    )]
    pub agent_cgroups: Vec<PathBuf>,

    /// The cluster's DNS domain, for `kubernetes.default.svc.<domain>`.
    #[arg(long, env = "CHAPERONE_CLUSTER_DOMAIN")]
    pub cluster_domain: Option<String>,

    /// `passthrough` forwards the agent's token; `impersonate` re-originates
    /// with chaperone's credentials and Impersonate-* headers.
    #[arg(long, env = "CHAPERONE_CREDENTIAL_MODE")]
    pub credential_mode: Option<String>,

    /// Audiences a service-account token may be minted for (impersonate
    /// mode: chaperone's own, which the webhook projects into agent pods).
    /// Empty: the API server's issuer, its default audience.
    #[arg(long = "audience", env = "CHAPERONE_AUDIENCE", value_delimiter = ',')]
    pub audiences: Vec<String>,

    /// What agent pods' API connections do while no node agent runs: with
    /// false (the default) the programs stay pinned under --bpffs and the
    /// connections are refused until an agent is back; with true the agent
    /// detaches its programs on exit and agents reach the API server
    /// directly, unguarded.
    #[arg(long, env = "CHAPERONE_FAIL_OPEN", num_args = 0..=1, default_missing_value = "true")]
    pub fail_open: Option<bool>,

    /// Where the programs' links and maps are pinned (a bpffs directory).
    #[arg(long, env = "CHAPERONE_BPFFS")]
    pub bpffs: Option<PathBuf>,

    /// Do not watch this node's pods (local mode: guard only --agent-cgroup).
    #[arg(long, env = "CHAPERONE_NO_POD_TRACKER")]
    pub no_pod_tracker: bool,

    /// Accept connections the kernel did not redirect (local mode, tests).
    #[arg(long, env = "CHAPERONE_ALLOW_UNATTESTED")]
    pub allow_unattested: bool,

    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, env = "CHAPERONE_DRAIN_SECONDS")]
    pub drain_seconds: Option<u64>,

    /// Long-lived upstream streams (watches, followed logs) per HTTP/2
    /// connection to the API server; past that, another connection. Keep it at
    /// or below the server's `--http2-max-streams-per-connection`.
    #[arg(long, env = "CHAPERONE_UPSTREAM_STREAMS_PER_CONNECTION")]
    pub upstream_streams_per_connection: Option<usize>,

    /// Short requests (everything but watches, followed logs and upgrades)
    /// in flight at once over pooled keep-alive HTTP/1.1 connections to the
    /// API server, per data-path thread, as nginx's proxy_pass sends them:
    /// less CPU per request on both ends, one connection per request in
    /// flight. Past that they share the pooled HTTP/2 connection. 0 sends
    /// them all over HTTP/2. Default: 4.
    #[arg(long, env = "CHAPERONE_UPSTREAM_HTTP1_CONNECTIONS")]
    pub upstream_http1_connections: Option<usize>,

    /// Threads that serve agent connections, each a single-threaded
    /// runtime with its own upstream connections (a request never changes
    /// threads). Default: the CPUs this process may run on.
    #[arg(long, env = "CHAPERONE_DATA_THREADS")]
    pub data_threads: Option<usize>,

    /// Connections one agent pod may hold through chaperone at once; past
    /// that its requests get 429 with Retry-After. 0: unlimited. Default:
    /// 256.
    #[arg(long, env = "CHAPERONE_MAX_CONNECTIONS_PER_POD")]
    pub max_connections_per_pod: Option<usize>,

    /// Requests one agent pod may have in flight through chaperone at once,
    /// watches and followed logs included; past that 429 with Retry-After.
    /// 0: unlimited. Default: 2048.
    #[arg(long, env = "CHAPERONE_MAX_REQUESTS_PER_POD")]
    pub max_requests_per_pod: Option<usize>,
    /// The namespace of `ApprovalRequest` objects (cluster mode). Default:
    /// chaperone-system.
    #[arg(long, env = "CHAPERONE_APPROVAL_NAMESPACE")]
    pub approval_namespace: Option<String>,

    /// Local mode: keep approvals as JSON files in this directory instead
    /// of `ApprovalRequest` objects (`kubectl chaperone --local-dir DIR`).
    #[arg(long, env = "CHAPERONE_APPROVAL_DIR")]
    pub approval_dir: Option<PathBuf>,

    /// How long an approval can be decided and used after it is requested
    /// (`30m`, `1h`). Default: 1h.
    #[arg(long, env = "CHAPERONE_APPROVAL_TTL")]
    pub approval_ttl: Option<String>,

    /// Cluster mode: PEM ed25519 public key(s) of chaperone's admission
    /// webhook. With it, a decision counts only when the webhook attested
    /// it (who decided, as the API server authenticated them); without it
    /// the node refuses every decision (see `--approval-trust-unattested`).
    #[arg(long, env = "CHAPERONE_APPROVAL_VERIFY_KEY")]
    pub approval_verify_key: Option<PathBuf>,

    /// Cluster mode without `--approval-verify-key`: trust `decidedBy` as
    /// written (anyone who may write approvalrequests/status can approve
    /// under any name). Without this flag such a node refuses every
    /// decision, and held requests stay held until they time out.
    #[arg(
        long,
        env = "CHAPERONE_APPROVAL_TRUST_UNATTESTED",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub approval_trust_unattested: Option<bool>,

    /// A webhook told about every new approval (http or https URL).
    #[arg(long, env = "CHAPERONE_NOTIFY_URL")]
    pub notify_url: Option<String>,

    /// The webhook's payload: `slack` (text + fields; default) or `json`.
    #[arg(long, env = "CHAPERONE_NOTIFY_FORMAT")]
    pub notify_format: Option<String>,
}

/// The config file: the same settings as the flags, each under its flag's
/// long name in camelCase (`--proxy-ip` → `proxyIp`); a list takes one value
/// or a sequence (`proxyIp: 192.0.2.2` or `proxyIp: [192.0.2.2, fd00::2]`),
/// and the plural spellings released before (`targets`, `agentCgroups`,
/// `audiences`) are kept.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeFile {
    node_name: Option<String>,
    pod_name: Option<String>,
    pod_namespace: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    proxy_ip: Option<Vec<IpAddr>>,
    proxy_port: Option<u16>,
    #[serde(default, alias = "target", deserialize_with = "one_or_many")]
    targets: Option<Vec<SocketAddr>>,
    #[serde(default, deserialize_with = "one_or_many")]
    refuse: Option<Vec<String>>,
    cgroup_root: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    #[serde(default, deserialize_with = "one_or_many")]
    policy: Option<Vec<PathBuf>>,
    record_dir: Option<PathBuf>,
    record_key: Option<PathBuf>,
    audit_log: Option<String>,
    audit_webhook: Option<String>,
    audit_webhook_batch_seconds: Option<u64>,
    audit_full: Option<String>,
    audit_durability: Option<String>,
    audit_spool_dir: Option<PathBuf>,
    admin_addr: Option<SocketAddr>,
    admin_port: Option<u16>,
    allow_unattested: Option<bool>,
    drain_seconds: Option<u64>,
    upstream_streams_per_connection: Option<usize>,
    upstream_http1_connections: Option<usize>,
    data_threads: Option<usize>,
    max_connections_per_pod: Option<usize>,
    max_requests_per_pod: Option<usize>,
    #[serde(default, alias = "agentCgroup", deserialize_with = "one_or_many")]
    agent_cgroups: Option<Vec<PathBuf>>,
    cluster_domain: Option<String>,
    credential_mode: Option<String>,
    no_pod_tracker: Option<bool>,
    #[serde(default, alias = "audience", deserialize_with = "one_or_many")]
    audiences: Option<Vec<String>>,
    fail_open: Option<bool>,
    bpffs: Option<PathBuf>,
    approval_namespace: Option<String>,
    approval_dir: Option<PathBuf>,
    approval_ttl: Option<String>,
    approval_verify_key: Option<PathBuf>,
    approval_trust_unattested: Option<bool>,
    notify_url: Option<String>,
    notify_format: Option<String>,
    /// Token verification: issuers, OIDC providers, algorithms.
    identity: Option<crate::identity::IdentityConfig>,
    /// What is masked, and extra patterns.
    masking: Option<crate::mask::MaskRules>,
}

/// The node agent's typed configuration, defaults applied and validated.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_name: String,
    /// `(namespace, name)` of the node agent's own pod: its DaemonSet's
    /// removal detaches the programs on exit.
    pub own_pod: Option<(String, String)>,
    pub proxy_ips: Vec<IpAddr>,
    pub proxy_port: u16,
    pub targets: Vec<SocketAddr>,
    pub refused: Vec<RefusedDestination>,
    pub cgroup_root: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub ca_dir: PathBuf,
    pub policy_files: Vec<PathBuf>,
    pub record_dir: PathBuf,
    pub record_key: PathBuf,
    pub audit_log: Option<String>,
    pub audit_webhook: Option<String>,
    pub audit_webhook_batch_wait: Duration,
    pub audit_full: crate::audit::FullMode,
    pub audit_durability: crate::audit::Durability,
    pub audit_spool_dir: PathBuf,
    pub admin_addr: SocketAddr,
    /// `(cert, key)` files of a CA mounted from a Secret.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    pub require_attestation: bool,
    pub drain_timeout: Duration,
    /// Long-lived streams per upstream HTTP/2 connection.
    pub upstream_streams_per_connection: usize,
    /// Short requests in flight over pooled HTTP/1.1 at once, per data-path
    /// thread (0: HTTP/2 only).
    pub upstream_http1_connections: usize,
    /// Threads serving agent connections (at least 1).
    pub data_threads: usize,
    /// Per-pod connection and in-flight request limits.
    pub limits: crate::limits::LimitConfig,
    pub agent_cgroups: Vec<PathBuf>,
    pub cluster_domain: String,
    pub credential_mode: crate::identity::CredentialMode,
    pub pod_tracker: bool,
    pub identity: crate::identity::IdentityConfig,
    pub masking: crate::mask::MaskRules,
    pub fail_open: bool,
    pub bpffs: PathBuf,
    pub approval_namespace: String,
    /// Local mode approvals (files) instead of `ApprovalRequest` objects.
    pub approval_dir: Option<PathBuf>,
    pub approval_ttl: Duration,
    /// The admission webhook's public key(s) that attest decisions.
    pub approval_verify_key: Option<PathBuf>,
    /// Without a verify key, trust `decidedBy` as written (else refuse).
    pub approval_trust_unattested: bool,
    /// Where and how new approvals are announced.
    pub notify: Option<(http::Uri, crate::approval::notify::Format)>,
}

impl NodeConfig {
    /// Every destination agents are refused: the configured ones, and
    /// always chaperone's admin listener (its metrics name every agent's
    /// verbs and resources; its approvals API exists in local mode).
    pub fn refusals(&self) -> Vec<RefusedDestination> {
        let mut refusals = self.refused.clone();
        let admin = RefusedDestination::listener(self.admin_addr);
        if !refusals.contains(&admin) {
            refusals.push(admin);
        }
        refusals
    }
}

pub const DEFAULT_PROXY_PORT: u16 = 17443;
pub const DEFAULT_ADMIN_PORT: u16 = 17080;
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/chaperone";

impl NodeConfig {
    /// Flags and environment (already merged by clap) over the config file
    /// over defaults. `service_env` is `(KUBERNETES_SERVICE_HOST, _PORT)`.
    pub fn resolve(
        args: NodeArgs,
        service_env: (Option<String>, Option<String>),
    ) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the config file {}", path.display()))?;
                serde_yaml::from_str::<NodeFile>(&text)
                    .with_context(|| format!("{}: invalid config", path.display()))?
            }
            None => NodeFile::default(),
        };
        let node_name = args
            .node_name
            .or(file.node_name)
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .context("no node name: set --node-name or CHAPERONE_NODE_NAME")?;
        let proxy_ips = first_non_empty(args.proxy_ip, file.proxy_ip.unwrap_or_default());
        if proxy_ips.is_empty() {
            bail!(
                "no proxy address: set --proxy-ip (or CHAPERONE_HOST_IP) to this node's IP; the \
                 DaemonSet sets it from the downward API status.hostIP"
            );
        }
        if let Some(loopback) = proxy_ips.iter().find(|ip| ip.is_loopback()) {
            bail!(
                "--proxy-ip {loopback} is a loopback address: from an agent pod's network namespace \
                 that is the pod itself, so redirected connections would never reach chaperone. \
                 Use the node's IP"
            );
        }
        let mut targets = first_non_empty(args.targets, file.targets.unwrap_or_default());
        if targets.is_empty()
            && let (Some(host), Some(port)) = service_env
        {
            let addr: SocketAddr = format!("{host}:{port}")
                .parse()
                .or_else(|_| format!("[{host}]:{port}").parse())
                .with_context(|| {
                    format!("KUBERNETES_SERVICE_HOST/PORT {host}:{port} is not an address")
                })?;
            targets.push(addr);
        }
        if targets.is_empty() {
            bail!(
                "no API-server address to redirect: set --target (the kubernetes.default \
                 ClusterIP:443 and the API-server endpoints), or run in-cluster"
            );
        }
        let refused = if !args.refused.is_empty() {
            args.refused
        } else if let Some(list) = file.refuse {
            list.iter()
                .map(|s| s.parse::<RefusedDestination>().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?
        } else {
            RefusedDestination::defaults()
        };
        let record_dir = args
            .record_dir
            .or(file.record_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/chaperone/sessions"));
        let own_pod = match (
            args.pod_namespace.or(file.pod_namespace),
            args.pod_name.or(file.pod_name),
        ) {
            (Some(namespace), Some(name)) => Some((namespace, name)),
            (None, None) => None,
            _ => bail!(
                "set both the pod name and namespace (CHAPERONE_POD_NAME and \
                 CHAPERONE_POD_NAMESPACE; the DaemonSet sets them from the downward API) or neither"
            ),
        };
        Ok(NodeConfig {
            node_name,
            own_pod,
            proxy_ips,
            proxy_port: args
                .proxy_port
                .or(file.proxy_port)
                .unwrap_or(DEFAULT_PROXY_PORT),
            targets,
            refused,
            cgroup_root: args.cgroup_root.or(file.cgroup_root),
            kubeconfig: args.kubeconfig.or(file.kubeconfig),
            ca_dir: args
                .ca_dir
                .or(file.ca_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/chaperone/ca")),
            policy_files: first_non_empty(args.policy_files, file.policy.unwrap_or_default()),
            record_key: args
                .record_key
                .or(file.record_key)
                .unwrap_or_else(|| crate::record::cli::default_key_path(&record_dir)),
            record_dir: record_dir.clone(),
            audit_log: args.audit_log.or(file.audit_log),
            audit_webhook: args.audit_webhook.or(file.audit_webhook),
            audit_webhook_batch_wait: Duration::from_secs(
                args.audit_webhook_batch_seconds
                    .or(file.audit_webhook_batch_seconds)
                    .unwrap_or(30),
            ),
            audit_full: match (args.audit_full, file.audit_full.as_deref()) {
                (Some(mode), _) => mode,
                (None, None | Some("block")) => crate::audit::FullMode::Block,
                (None, Some("drop")) => crate::audit::FullMode::Drop,
                (None, Some(other)) => bail!("auditFull {other:?}: expected `block` or `drop`"),
            },
            audit_durability: match (args.audit_durability, file.audit_durability.as_deref()) {
                (Some(mode), _) => mode,
                (None, None | Some("batched")) => crate::audit::Durability::Batched,
                (None, Some("spooled")) => crate::audit::Durability::Spooled,
                (None, Some(other)) => {
                    bail!("auditDurability {other:?}: expected `batched` or `spooled`")
                }
            },
            audit_spool_dir: args
                .audit_spool_dir
                .or(file.audit_spool_dir)
                .unwrap_or_else(|| record_dir.with_file_name("audit-spool")),
            admin_addr: match (args.admin_addr, args.admin_port) {
                (Some(addr), _) => addr,
                (None, Some(port)) => SocketAddr::from(([0, 0, 0, 0], port)),
                (None, None) => match (file.admin_addr, file.admin_port) {
                    (Some(_), Some(_)) => {
                        bail!("the config file sets both adminAddr and adminPort: keep one")
                    }
                    (Some(addr), None) => addr,
                    (None, Some(port)) => SocketAddr::from(([0, 0, 0, 0], port)),
                    (None, None) => SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT)),
                },
            },
            ca_files: match (args.ca_cert.or(file.ca_cert), args.ca_key.or(file.ca_key)) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => {
                    bail!("set both the CA certificate and key (--ca-cert and --ca-key) or neither")
                }
            },
            require_attestation: !(args.allow_unattested || file.allow_unattested.unwrap_or(false)),
            drain_timeout: Duration::from_secs(
                args.drain_seconds.or(file.drain_seconds).unwrap_or(20),
            ),
            upstream_streams_per_connection: args
                .upstream_streams_per_connection
                .or(file.upstream_streams_per_connection)
                .unwrap_or(crate::proxy::upstream::DEFAULT_STREAMS_PER_CONNECTION)
                .max(1),
            upstream_http1_connections: args
                .upstream_http1_connections
                .or(file.upstream_http1_connections)
                .unwrap_or(crate::proxy::upstream::DEFAULT_HTTP1_CONNECTIONS),
            limits: crate::limits::LimitConfig {
                connections_per_pod: args
                    .max_connections_per_pod
                    .or(file.max_connections_per_pod)
                    .unwrap_or(crate::limits::DEFAULT_CONNECTIONS_PER_POD),
                requests_per_pod: args
                    .max_requests_per_pod
                    .or(file.max_requests_per_pod)
                    .unwrap_or(crate::limits::DEFAULT_REQUESTS_PER_POD),
            },
            data_threads: match args.data_threads.or(file.data_threads) {
                Some(0) => bail!(
                    "--data-threads 0: at least one thread serves agents (leave it unset for one per CPU)"
                ),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, usize::from),
            },
            agent_cgroups: first_non_empty(
                args.agent_cgroups,
                file.agent_cgroups.unwrap_or_default(),
            ),
            cluster_domain: args
                .cluster_domain
                .or(file.cluster_domain)
                .unwrap_or_else(|| "cluster.local".into()),
            credential_mode: match args.credential_mode.or(file.credential_mode).as_deref() {
                None | Some("passthrough") => crate::identity::CredentialMode::Passthrough,
                Some("impersonate") => crate::identity::CredentialMode::Impersonate,
                Some(other) => {
                    bail!("--credential-mode {other:?}: expected `passthrough` or `impersonate`")
                }
            },
            pod_tracker: !(args.no_pod_tracker || file.no_pod_tracker.unwrap_or(false)),
            identity: {
                let mut identity = file.identity.unwrap_or_default();
                let audiences = first_non_empty(args.audiences, file.audiences.unwrap_or_default());
                if !audiences.is_empty() {
                    identity.service_accounts.audiences = audiences;
                }
                identity
            },
            masking: file.masking.unwrap_or_default(),
            fail_open: args.fail_open.or(file.fail_open).unwrap_or(false),
            bpffs: args
                .bpffs
                .or(file.bpffs)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS)),
            approval_namespace: args
                .approval_namespace
                .or(file.approval_namespace)
                .unwrap_or_else(|| crate::approval::DEFAULT_NAMESPACE.to_owned()),
            approval_dir: args.approval_dir.or(file.approval_dir),
            approval_verify_key: args.approval_verify_key.or(file.approval_verify_key),
            approval_trust_unattested: args
                .approval_trust_unattested
                .or(file.approval_trust_unattested)
                .unwrap_or(false),
            approval_ttl: match args.approval_ttl.or(file.approval_ttl) {
                None => crate::approval::DEFAULT_TTL,
                Some(text) => parse_duration_with_unit(&text)
                    .map_err(|why| anyhow::anyhow!("--approval-ttl: {why}"))?,
            },
            notify: match args.notify_url.or(file.notify_url) {
                None => None,
                Some(url) => {
                    let uri: http::Uri = url
                        .parse()
                        .with_context(|| format!("--notify-url {url:?} is not a URL"))?;
                    if !matches!(uri.scheme_str(), Some("http" | "https")) {
                        bail!("--notify-url {url:?}: expected an http or https URL");
                    }
                    let format = args
                        .notify_format
                        .or(file.notify_format)
                        .as_deref()
                        .unwrap_or("slack")
                        .parse()
                        .map_err(anyhow::Error::msg)?;
                    Some((uri, format))
                }
            },
        })
    }
}

/// A config-file list given as one value or as a sequence, like its flag
/// (which may be repeated).
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    let value = Option::<serde_yaml::Value>::deserialize(deserializer)?;
    match value {
        None | Some(serde_yaml::Value::Null) => Ok(None),
        Some(value @ serde_yaml::Value::Sequence(_)) => serde_yaml::from_value(value)
            .map(Some)
            .map_err(D::Error::custom),
        Some(value) => serde_yaml::from_value(value)
            .map(|one| Some(vec![one]))
            .map_err(D::Error::custom),
    }
}

/// A duration with its unit (`30s`, `15m`, `1h`, `1h30m`): a bare number
/// is refused rather than guessed to be seconds.
pub fn parse_duration_with_unit(text: &str) -> Result<Duration, crate::policy::DurationError> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(crate::policy::DurationError::NoUnit(trimmed.to_owned()));
    }
    crate::policy::parse_duration(trimmed)
}

fn first_non_empty<T>(preferred: Vec<T>, fallback: Vec<T>) -> Vec<T> {
    if preferred.is_empty() {
        fallback
    } else {
        preferred
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn args() -> NodeArgs {
        NodeArgs {
            node_name: Some("node-a".into()),
            proxy_ip: vec!["10.0.0.5".parse().unwrap()],
            ..NodeArgs::default()
        }
    }

    #[test]
    fn defaults_come_from_the_in_cluster_environment() {
        let config =
            NodeConfig::resolve(args(), (Some("10.96.0.1".into()), Some("443".into()))).unwrap();
        assert_eq!(config.targets, vec!["10.96.0.1:443".parse().unwrap()]);
        assert_eq!(config.proxy_port, DEFAULT_PROXY_PORT);
        assert_eq!(config.refused, RefusedDestination::defaults());
        assert!(
            config
                .refusals()
                .contains(&RefusedDestination::SocketAddr(SocketAddr::from((
                    [127, 0, 0, 1],
                    DEFAULT_ADMIN_PORT
                )))),
            "the admin listener is refused even with the default address"
        );
        assert!(config.require_attestation);
    }

    #[test]
    fn the_admin_port_listens_on_all_addresses_and_audiences_reach_identity() {
        let mut a = args();
        a.admin_port = Some(9090);
        a.audiences = vec!["chaperone".into()];
        let config =
            NodeConfig::resolve(a, (Some("10.96.0.1".into()), Some("443".into()))).unwrap();
        assert_eq!(config.admin_addr, "0.0.0.0:9090".parse().unwrap());
        assert!(
            config.refusals().contains(&RefusedDestination::Port(9090)),
            "agents are refused the admin port on every address"
        );
        assert_eq!(config.identity.service_accounts.audiences, ["chaperone"]);
        assert!(!config.fail_open, "fail closed unless asked");
        assert_eq!(config.own_pod, None, "no pod: nothing to tell removal by");
        assert_eq!(config.bpffs, PathBuf::from(DEFAULT_BPFFS));
    }

    /// The DaemonSet sets the node agent's environment; a name `chaperone
    /// node` does not know would be silently ignored in production.
    #[test]
    fn every_variable_the_daemonset_sets_is_one_the_node_reads() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            node: NodeArgs,
        }
        let known: Vec<String> = Wrapper::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .chain(["CHAPERONE_LOG".to_owned()])
            .collect();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut checked = 0;
        for file in [
            "base/node/daemonset.yaml",
            "overlays/impersonate/credential-mode.yaml",
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let daemonset = text
                .split("\n---")
                .find(|d| d.contains("kind: DaemonSet"))
                .unwrap();
            for line in daemonset.lines() {
                if let Some(name) = line.trim().strip_prefix("- name: CHAPERONE_") {
                    let name = format!("CHAPERONE_{}", name.trim());
                    assert!(
                        known.contains(&name),
                        "{file} sets {name}, which `chaperone node` ignores"
                    );
                    checked += 1;
                }
            }
        }
        assert!(
            checked >= 10,
            "only {checked} variables found: did the manifests move?"
        );
    }

    #[test]
    fn the_record_key_and_audit_durability_have_defaults_flags_and_file_keys() {
        let service = || (Some("10.96.0.1".into()), Some("443".into()));
        let config = NodeConfig::resolve(args(), service()).unwrap();
        assert_eq!(
            config.record_key,
            PathBuf::from("/var/lib/chaperone/record.key")
        );
        assert_eq!(config.audit_durability, crate::audit::Durability::Batched);
        let mut a = args();
        a.record_dir = Some("/data/rec".into());
        a.audit_durability = Some(crate::audit::Durability::Spooled);
        let config = NodeConfig::resolve(a, service()).unwrap();
        assert_eq!(config.record_key, PathBuf::from("/data/record.key"));
        assert_eq!(config.audit_durability, crate::audit::Durability::Spooled);

        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("node.yaml");
        std::fs::write(
            &file,
            "recordKey: /keys/rec.key\nauditDurability: spooled\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(file.clone());
        let config = NodeConfig::resolve(a, service()).unwrap();
        assert_eq!(config.record_key, PathBuf::from("/keys/rec.key"));
        assert_eq!(config.audit_durability, crate::audit::Durability::Spooled);
        std::fs::write(&file, "auditDurability: sometimes\n").unwrap();
        let mut a = args();
        a.config = Some(file);
        let error = NodeConfig::resolve(a, service()).unwrap_err().to_string();
        assert!(error.contains("expected `batched` or `spooled`"), "{error}");
    }

    #[test]
    fn an_ipv6_service_host_is_understood() {
        let config =
            NodeConfig::resolve(args(), (Some("fd00::1".into()), Some("443".into()))).unwrap();
        assert_eq!(config.targets, vec!["[fd00::1]:443".parse().unwrap()]);
    }

    #[test]
    fn a_loopback_proxy_address_is_refused_with_the_reason() {
        let mut a = args();
        a.proxy_ip = vec!["127.0.0.1".parse().unwrap()];
        let error =
            NodeConfig::resolve(a, (Some("10.96.0.1".into()), Some("443".into()))).unwrap_err();
        assert!(error.to_string().contains("the pod itself"), "{error}");
    }

    #[test]
    fn data_threads_default_to_the_cpus_and_zero_is_refused() {
        let service = || (Some("10.96.0.1".into()), Some("443".into()));
        let config = NodeConfig::resolve(args(), service()).unwrap();
        assert_eq!(
            config.data_threads,
            std::thread::available_parallelism().unwrap().get()
        );
        let mut a = args();
        a.data_threads = Some(3);
        assert_eq!(NodeConfig::resolve(a, service()).unwrap().data_threads, 3);
        let mut a = args();
        a.data_threads = Some(0);
        let error = NodeConfig::resolve(a, service()).unwrap_err();
        assert!(error.to_string().contains("--data-threads 0"), "{error}");
    }

    #[test]
    fn without_targets_the_error_says_what_to_set() {
        let error = NodeConfig::resolve(args(), (None, None)).unwrap_err();
        assert!(error.to_string().contains("--target"), "{error}");
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "proxyPort: 7000\nrecordDir: /tmp/rec\ntargets: [\"10.96.0.1:443\"]\nrefuse: [\":10250\"]").unwrap();
        let mut a = args();
        a.config = Some(file.path().into());
        a.proxy_port = Some(8000);
        let config = NodeConfig::resolve(a, (None, None)).unwrap();
        assert_eq!(config.proxy_port, 8000);
        assert_eq!(config.record_dir, PathBuf::from("/tmp/rec"));
        assert_eq!(config.refused, vec![RefusedDestination::Port(10250)]);
    }

    #[test]
    fn per_pod_limits_have_defaults_and_can_be_set() {
        let env = || (Some("10.96.0.1".into()), Some("443".into()));
        let config = NodeConfig::resolve(args(), env()).unwrap();
        assert_eq!(config.limits, crate::limits::LimitConfig::default());
        assert_eq!(config.limits.connections_per_pod, 256);
        assert_eq!(config.limits.requests_per_pod, 2048);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "targets: [\"10.96.0.1:443\"]\nmaxConnectionsPerPod: 8\nmaxRequestsPerPod: 0"
        )
        .unwrap();
        let mut a = args();
        a.config = Some(file.path().into());
        let config = NodeConfig::resolve(a, (None, None)).unwrap();
        assert_eq!(config.limits.connections_per_pod, 8);
        assert_eq!(config.limits.requests_per_pod, 0);
    }

    #[test]
    fn short_requests_use_four_http1_connections_unless_the_flag_or_the_file_says() {
        let env = || (Some("10.96.0.1".into()), Some("443".into()));
        let config = NodeConfig::resolve(args(), env()).unwrap();
        assert_eq!(config.upstream_http1_connections, 4);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "targets: [\"10.96.0.1:443\"]\nupstreamHttp1Connections: 0"
        )
        .unwrap();
        let mut a = args();
        a.config = Some(file.path().into());
        let config = NodeConfig::resolve(a, (None, None)).unwrap();
        assert_eq!(config.upstream_http1_connections, 0);
        let mut a = args();
        a.config = Some(file.path().into());
        a.upstream_http1_connections = Some(16);
        let config = NodeConfig::resolve(a, (None, None)).unwrap();
        assert_eq!(
            config.upstream_http1_connections, 16,
            "the flag wins over the file"
        );
    }

    #[test]
    fn identity_and_masking_come_from_the_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "targets: [\"10.96.0.1:443\"]\nidentity:\n  serviceAccounts:\n    audiences: [chaperone]\n\
             masking:\n  patterns:\n  - name: ticket\n    regex: 'TKT-[0-9]+'\n"
        )
        .unwrap();
        let mut a = args();
        a.config = Some(file.path().into());
        let config = NodeConfig::resolve(a, (None, None)).unwrap();
        assert_eq!(config.identity.service_accounts.audiences, ["chaperone"]);
        assert_eq!(config.masking.patterns[0].name, "ticket");
        crate::mask::Masker::new(&config.masking).unwrap();
    }

    #[test]
    fn an_unknown_config_key_is_an_error_naming_it() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "proxyPrt: 7000").unwrap();
        let mut a = args();
        a.config = Some(file.path().into());
        let error = format!("{:#}", NodeConfig::resolve(a, (None, None)).unwrap_err());
        assert!(error.contains("proxyPrt"), "{error}");
    }

    /// `proxyIp: 192.0.2.2` used to fail with `expected a sequence`: a list
    /// key takes one value as its flag does, and the flag's own name works
    /// beside the plural spelling.
    #[test]
    fn config_keys_take_what_their_flags_take() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "proxyIp: 192.0.2.2\ntarget: 10.96.0.1:443\nrefuse: \":10250\"\n\
             agentCgroup: /sys/fs/cgroup/ci.scope\naudience: chaperone\npolicy: /etc/policies\n\
             adminPort: 9090\ncaCert: /ca/tls.crt\ncaKey: /ca/tls.key"
        )
        .unwrap();
        let config = NodeConfig::resolve(
            NodeArgs {
                config: Some(file.path().into()),
                node_name: Some("node-a".into()),
                ..NodeArgs::default()
            },
            (None, None),
        )
        .unwrap();
        assert_eq!(config.proxy_ips, ["192.0.2.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(config.targets, ["10.96.0.1:443".parse().unwrap()]);
        assert_eq!(config.refused, [RefusedDestination::Port(10250)]);
        assert_eq!(
            config.agent_cgroups,
            [PathBuf::from("/sys/fs/cgroup/ci.scope")]
        );
        assert_eq!(config.identity.service_accounts.audiences, ["chaperone"]);
        assert_eq!(config.policy_files, [PathBuf::from("/etc/policies")]);
        assert_eq!(config.admin_addr, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(
            config.ca_files,
            Some(("/ca/tls.crt".into(), "/ca/tls.key".into()))
        );

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "proxyIp: [192.0.2.2, \"fd00::2\"]\ntargets: [10.96.0.1:443]"
        )
        .unwrap();
        let mut a = args();
        a.proxy_ip.clear();
        a.config = Some(file.path().into());
        let config = NodeConfig::resolve(a, (None, None)).unwrap();
        assert_eq!(config.proxy_ips.len(), 2);

        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "proxyIp: not-an-address").unwrap();
        let mut a = args();
        a.config = Some(file.path().into());
        let error = format!("{:#}", NodeConfig::resolve(a, (None, None)).unwrap_err());
        assert!(
            error.contains("proxyIp") || error.contains("IP address"),
            "{error}"
        );
    }

    /// Every `chaperone node` flag has its config-file key (its long name in
    /// camelCase): `adminPort`, `caCert`, `caKey` were missing.
    #[test]
    fn every_flag_has_a_config_key() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            node: NodeArgs,
        }
        let mut checked = 0;
        for arg in Wrapper::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "config" | "help") {
                continue;
            }
            let mut key = String::new();
            let mut upper = false;
            for c in long.chars() {
                if c == '-' {
                    upper = true;
                } else if upper {
                    key.push(c.to_ascii_uppercase());
                    upper = false;
                } else {
                    key.push(c);
                }
            }
            let parsed: Result<NodeFile, _> = serde_yaml::from_str(&format!("{key}: null"));
            assert!(
                parsed.is_ok(),
                "--{long} has no config key {key}: {}",
                parsed.unwrap_err()
            );
            checked += 1;
        }
        assert!(checked > 40, "only {checked} flags");
    }

    /// `--grant 15` silently meant 15 seconds; durations need their unit.
    #[test]
    fn a_duration_without_a_unit_is_refused() {
        let error = parse_duration_with_unit("15").unwrap_err().to_string();
        assert!(error.contains("\"15m\""), "{error}");
        assert_eq!(
            parse_duration_with_unit("15m").unwrap(),
            Duration::from_secs(900)
        );
        assert_eq!(
            parse_duration_with_unit("1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        let mut a = args();
        a.approval_ttl = Some("30".into());
        let error = NodeConfig::resolve(a, (Some("10.96.0.1".into()), Some("443".into())))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--approval-ttl") && error.contains("no unit"),
            "{error}"
        );
    }
}
