//! `chaperone node`: the node agent. Wires the kernel redirect, the TLS
//! terminator, the upstream and the proxy together and runs until SIGTERM,
//! then drains.
//!
//! Order matters for failing closed: the proxy's listeners are bound before
//! the eBPF programs start redirecting, so an agent connection is never sent
//! to a port nobody listens on because of chaperone's own start-up.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket};

use crate::{
    admin::{AdminServer, Health, Metrics},
    audit::{
        AuditConfig, Auditor, SinkSpec,
        sink::{Endpoint, FileSinkConfig, SinkConfig, WebhookConfig},
    },
    config::NodeConfig,
    guard::{GuardParts, NodeGuard},
    identity::{Authenticator, OwnCredentials},
    mask::Masker,
    pods::PodTracker,
    policy::PolicyStore,
    proxy::{Proxy, ProxyConfig, Terminate, Upstream, UpstreamSpec},
    record::{RecordConfig, Recorder},
    redirect::{self, CgroupId, Lifetime, RedirectSpec, Redirector},
    tls::{ConnectorOptions, LeafCache, LeafConfig, LocalCa, TlsTerminator, UpstreamConfig},
};

impl Terminate for TlsTerminator {
    async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
        orig_dst: Option<std::net::IpAddr>,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        // Without a kernel record the certificate names the address the
        // client reached.
        let ip = match orig_dst {
            Some(ip) => ip,
            None => tcp.local_addr()?.ip(),
        };
        TlsTerminator::accept(self, tcp, ip).await
    }
}

// === inputs: everything checked before the host changes ===

/// One input `chaperone node` depends on, as `chaperone check` prints it.
#[derive(Clone, Debug)]
pub struct Finding {
    /// What was checked (`bpffs`, `policy`, `admin listener`, …).
    pub what: &'static str,
    /// What was found (`Ok`), or what is wrong and what to do (`Err`).
    pub outcome: std::result::Result<String, String>,
}

/// Everything `chaperone node` needs before it changes the host (binds a
/// port, attaches or re-points a program, writes a pin), read and checked.
/// `node` refuses to start while any finding is a problem, and `chaperone
/// check` prints the same findings: what `check` accepts, `node` does.
pub struct Inspection {
    pub findings: Vec<Finding>,
    inputs: Option<Inputs>,
}

impl Inspection {
    /// `true` when nothing is wrong: `chaperone node` would start.
    pub fn ready(&self) -> bool {
        self.findings.iter().all(|f| f.outcome.is_ok())
    }

    /// Every problem, one per line (empty when ready).
    pub fn problems(&self) -> Vec<String> {
        self.findings
            .iter()
            .filter_map(|f| f.outcome.as_ref().err().map(|e| format!("{}: {e}", f.what)))
            .collect()
    }

    fn into_inputs(self) -> Result<Inputs> {
        let problems = self.problems();
        match self.inputs {
            Some(inputs) if problems.is_empty() => Ok(inputs),
            _ => anyhow::bail!(
                "nothing was changed on this node, because:\n  {}",
                problems.join("\n  ")
            ),
        }
    }

    fn record<T>(&mut self, what: &'static str, result: Result<(T, String)>) -> Option<T> {
        match result {
            Ok((value, found)) => {
                self.findings.push(Finding {
                    what,
                    outcome: Ok(found),
                });
                Some(value)
            }
            Err(error) => {
                self.findings.push(Finding {
                    what,
                    outcome: Err(format!("{error:#}")),
                });
                None
            }
        }
    }
}

/// What [`inspect`] read, for [`run`] to use as it was checked.
struct Inputs {
    /// `None`: no CA in `--ca-dir` yet; it is created at start.
    ca: Option<LocalCa>,
    upstream_config: UpstreamConfig,
    client: kube::Client,
    authenticator: Authenticator,
    cgroup_root: std::path::PathBuf,
    agent_cgroups: Vec<(std::path::PathBuf, CgroupId)>,
    /// Loaded from the policy files (local mode); empty in cluster mode.
    policy: PolicyStore,
    masker: Masker,
    verifier: Option<crate::approval::attest::Verifier>,
}

/// Checks every input of `chaperone node` without changing the host: the
/// kernel and privileges, cgroups, the bpffs, the ports (bound for a moment
/// with the same options the node uses), the CA, the kubeconfig, the
/// identity, masking and policy configuration, keys and directories.
pub async fn inspect(config: &NodeConfig) -> Inspection {
    let mut report = Inspection {
        findings: Vec::new(),
        inputs: None,
    };
    let facts = redirect::preflight();
    report.record(
        "privileges",
        if facts.missing_capabilities.is_empty() {
            Ok((
                (),
                "CAP_BPF/CAP_SYS_ADMIN, CAP_PERFMON, CAP_NET_ADMIN".into(),
            ))
        } else {
            Err(anyhow::anyhow!(
                "missing {}: run as root, or give the node agent these capabilities (the \
                 DaemonSet in deploy/ does)",
                facts.missing_capabilities.join(", ")
            ))
        },
    );
    let cgroup_root = report.record(
        "cgroup root",
        (|| {
            let root = match &config.cgroup_root {
                // A hybrid host's tree (the DaemonSet's /host/sys/fs/cgroup):
                // its cgroup v2 hierarchy.
                Some(root) => {
                    let v2 = redirect::cgroup2_root_at(root);
                    if &v2 != root {
                        tracing::info!(
                            configured = %root.display(),
                            cgroup_v2 = %v2.display(),
                            "the configured cgroup root is a hybrid host's tree: using its cgroup v2 hierarchy"
                        );
                    }
                    v2
                }
                None => redirect::cgroup2_mount()?,
            };
            let is_cgroup2 = nix::sys::statfs::statfs(&root)
                .with_context(|| format!("{}", root.display()))?
                .filesystem_type()
                == nix::sys::statfs::CGROUP2_SUPER_MAGIC;
            if !is_cgroup2 {
                anyhow::bail!(
                    "{} is not a cgroup v2 directory: point --cgroup-root at the cgroup v2 \
                     mount (or a directory under it)",
                    root.display()
                );
            }
            let found = root.display().to_string();
            Ok((root, found))
        })(),
    );
    let agent_cgroups = report.record(
        "agent cgroups",
        config
            .agent_cgroups
            .iter()
            .map(|cgroup| {
                redirect::cgroupfs::cgroup_id(cgroup)
                    .map(|id| (cgroup.clone(), CgroupId(id.0)))
                    .with_context(|| format!("--agent-cgroup {}", cgroup.display()))
            })
            .collect::<Result<Vec<_>>>()
            .map(|ids| {
                let found = format!("{} besides the pod tracker's", ids.len());
                (ids, found)
            }),
    );
    report.record(
        "bpffs",
        if config.fail_open {
            Ok((
                (),
                format!(
                    "{} (failOpen: pins there are adopted, none are kept)",
                    config.bpffs.display()
                ),
            ))
        } else if config.bpffs.exists() && !config.bpffs.is_dir() {
            Err(anyhow::anyhow!(
                "{} is not a directory: point --bpffs at a directory on a BPF filesystem",
                config.bpffs.display()
            ))
        } else if !redirect::pin::on_bpffs(&config.bpffs) {
            Err(redirect::pin::PinDirError::NotBpffs {
                path: config.bpffs.clone(),
            }
            .into())
        } else {
            Ok(((), format!("{} (a BPF filesystem)", config.bpffs.display())))
        },
    );
    report.record(
        "proxy listener",
        (|| {
            if config.admin_addr.port() == config.proxy_port {
                anyhow::bail!(
                    "the proxy port {} is also the admin port: give --admin-addr or \
                     --admin-port another one",
                    config.proxy_port
                );
            }
            for ip in &config.proxy_ips {
                drop(
                    listen_std(SocketAddr::new(*ip, config.proxy_port)).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot listen on {}: {e}; is a program other than chaperone using the \
                         port, or is --proxy-ip not an address of this node?",
                            SocketAddr::new(*ip, config.proxy_port)
                        )
                    })?,
                );
            }
            Ok((
                (),
                format!("{:?} port {}", config.proxy_ips, config.proxy_port),
            ))
        })(),
    );
    report.record(
        "admin listener",
        listen_std(config.admin_addr)
            .map(|listener| {
                drop(listener);
                ((), config.admin_addr.to_string())
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {}: {e}; pick a free port with --admin-addr or --admin-port",
                    config.admin_addr
                )
            }),
    );
    let ca = report.record("CA", load_ca(config));
    let upstream_config = report.record(
        "upstream",
        upstream_config(config).map(|c| {
            let found = c.server.to_string();
            (c, found)
        }),
    );
    // (A kubeconfig the upstream could not read is reported once, there.)
    let client = match &upstream_config {
        Some(_) => report.record(
            "API client",
            kube_client(config)
                .await
                .map(|c| (c, "chaperone's own API access configured".into())),
        ),
        None => None,
    };
    let authenticator = match &client {
        Some(client) => report.record(
            "identity",
            Authenticator::from_client(&config.identity, client.clone())
                .map(|a| (a, "token verification configured".into()))
                .map_err(|e| anyhow::anyhow!("identity configuration: {e}")),
        ),
        None => None,
    };
    let policy = report.record("policy", load_policy(config));
    let masker = report.record(
        "masking",
        Masker::new(&config.masking)
            .map(|m| (m, "mask rules compile".into()))
            .map_err(|e| anyhow::anyhow!("mask rules: {e}")),
    );
    let verifier = report.record("approval key", approval_verifier(config));
    report.record("directories", writable_dirs(config));
    report.record(
        "audit",
        audit_sinks(config).map(|sinks| {
            let found = if sinks.is_empty() {
                "no sink (not audited)".to_owned()
            } else {
                sinks
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            ((), found)
        }),
    );
    if let (
        Some(ca),
        Some(upstream_config),
        Some(client),
        Some(authenticator),
        Some(cgroup_root),
        Some(agent_cgroups),
        Some(policy),
        Some(masker),
        Some(verifier),
    ) = (
        ca,
        upstream_config,
        client,
        authenticator,
        cgroup_root,
        agent_cgroups,
        policy,
        masker,
        verifier,
    ) {
        report.inputs = Some(Inputs {
            ca,
            upstream_config,
            client,
            authenticator,
            cgroup_root,
            agent_cgroups,
            policy,
            masker,
            verifier,
        });
    }
    report
}

/// Binds `addr` the way the node agent does (`SO_REUSEADDR`,
/// `SO_REUSEPORT`: another chaperone on the port is fine, another program
/// is not).
fn listen_std(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)?;
    Ok(socket.into())
}

fn load_ca(config: &NodeConfig) -> Result<(Option<LocalCa>, String)> {
    match &config.ca_files {
        Some((cert, key)) => {
            let read = |path: &std::path::PathBuf| {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            };
            let ca = LocalCa::from_secret_data("chaperone-ca", &read(cert)?, &read(key)?)
                .with_context(|| {
                    format!(
                        "chaperone's CA from {} and {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            Ok((Some(ca), format!("from {}", cert.display())))
        }
        None => match LocalCa::load(&config.ca_dir)
            .with_context(|| format!("chaperone's CA in {}", config.ca_dir.display()))?
        {
            Some(ca) => Ok((Some(ca), format!("in {}", config.ca_dir.display()))),
            None => {
                creatable_dir(&config.ca_dir)?;
                Ok((
                    None,
                    format!("none yet: created in {}", config.ca_dir.display()),
                ))
            }
        },
    }
}

fn upstream_config(config: &NodeConfig) -> Result<UpstreamConfig> {
    let upstream = match &config.kubeconfig {
        Some(path) => UpstreamConfig::from_kubeconfig(path, None)
            .with_context(|| format!("upstream from kubeconfig {}", path.display()))?,
        None => UpstreamConfig::in_cluster().context(
            "upstream from the in-cluster service account (outside a cluster, pass --kubeconfig)",
        )?,
    };
    upstream.client_config().context("TLS to the API server")?;
    Ok(upstream)
}

/// chaperone's own API access (pods, policies, JWKS, TokenReview).
async fn kube_client(config: &NodeConfig) -> Result<kube::Client> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .context("kubeconfig")?
        }
        None => kube::Config::incluster().context("in-cluster config")?,
    };
    kube::Client::try_from(kube_config).context("kube client")
}

/// The policy files (a directory stands for its `*.yaml`/`*.yml`), loaded;
/// without files, policies come from the cluster.
fn load_policy(config: &NodeConfig) -> Result<(PolicyStore, String)> {
    let store = PolicyStore::new();
    if config.policy_files.is_empty() {
        return Ok((store, "AgentPolicy objects in the cluster".into()));
    }
    let files = policy_files(config)?;
    let count = store
        .load_files(&files)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((
        store,
        format!("{count} policies from {} files", files.len()),
    ))
}

/// `--policy` with each directory replaced by its policy files.
fn policy_files(config: &NodeConfig) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for path in &config.policy_files {
        let found = crate::policy::policy_files(path)
            .with_context(|| format!("--policy {}", path.display()))?;
        if found.is_empty() {
            anyhow::bail!(
                "--policy {}: the directory holds no *.yaml or *.yml policy file",
                path.display()
            );
        }
        files.extend(found);
    }
    Ok(files)
}

fn approval_verifier(
    config: &NodeConfig,
) -> Result<(Option<crate::approval::attest::Verifier>, String)> {
    match &config.approval_verify_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--approval-verify-key {}: {e}", path.display()))?;
            let verifier = crate::approval::attest::Verifier::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("--approval-verify-key {}: {e}", path.display()))?;
            Ok((Some(verifier), format!("{}", path.display())))
        }
        None => Ok((None, "none (decisions not attested)".into())),
    }
}

/// `path` is a directory chaperone may write, or can be created as one.
fn creatable_dir(path: &std::path::Path) -> Result<()> {
    let mut probe = Some(path);
    while let Some(candidate) = probe {
        if candidate.exists() {
            if !candidate.is_dir() {
                anyhow::bail!(
                    "{} is not a directory, so {} cannot be one",
                    candidate.display(),
                    path.display()
                );
            }
            nix::unistd::access(candidate, nix::unistd::AccessFlags::W_OK).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not writable ({e}), so {} cannot be written",
                    candidate.display(),
                    path.display()
                )
            })?;
            return Ok(());
        }
        probe = candidate.parent();
    }
    Ok(())
}

fn writable_dirs(config: &NodeConfig) -> Result<((), String)> {
    let mut dirs = vec![("--record-dir", &config.record_dir)];
    if config.audit_log.is_some() || config.audit_webhook.is_some() {
        dirs.push(("--audit-spool-dir", &config.audit_spool_dir));
    }
    if let Some(dir) = &config.approval_dir {
        dirs.push(("--approval-dir", dir));
    }
    for (flag, dir) in &dirs {
        creatable_dir(dir).with_context(|| format!("{flag} {}", dir.display()))?;
    }
    Ok((
        (),
        dirs.iter()
            .map(|(_, d)| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

pub async fn run(config: NodeConfig) -> Result<()> {
    // Every input first: a mistake changes nothing on the host (no port
    // bound, no program attached, no pin re-pointed).
    let Inputs {
        ca,
        upstream_config,
        client,
        authenticator,
        cgroup_root,
        agent_cgroups,
        policy,
        masker,
        verifier,
    } = inspect(&config).await.into_inputs()?;
    let ca = Arc::new(match ca {
        Some(ca) => ca,
        None => LocalCa::load_or_create(&config.ca_dir)
            .with_context(|| format!("chaperone's CA in {}", config.ca_dir.display()))?,
    });
    let mut leaf_ips: Vec<_> = config.targets.iter().map(|t| t.ip()).collect();
    leaf_ips.extend(config.proxy_ips.iter().copied());
    let leaves = Arc::new(LeafCache::new(
        ca.clone(),
        LeafConfig {
            cluster_domain: config.cluster_domain.clone(),
            ips: leaf_ips,
            ..LeafConfig::default()
        },
    ));
    let terminator = Arc::new(TlsTerminator::new(leaves));

    let upstream = Upstream::new(UpstreamSpec {
        base: upstream_config.server.clone(),
        tls: upstream_config.client_config()?,
        tls_server_name: upstream_config.tls_server_name.clone(),
        connector: ConnectorOptions::default(),
        streams_per_connection: config.upstream_streams_per_connection,
        http1_connections: config.upstream_http1_connections,
    })?;
    // Say at start-up whether the API server answers. (Agents are served by
    // the data-path threads, which warm their own pools the same way; this
    // pool carries the approval previews.)
    tokio::spawn({
        let upstream = upstream.clone();
        async move {
            match upstream.warm_up().await {
                Ok(version) => tracing::debug!(?version, "the API server answered"),
                Err(error) => tracing::warn!(
                    upstream = %upstream.base(),
                    %error,
                    "the API server did not answer /version yet (agents' requests will retry it)"
                ),
            }
        }
    });

    let mut listeners = Vec::new();
    for ip in &config.proxy_ips {
        listeners.push(bind(SocketAddr::new(*ip, config.proxy_port))?);
    }
    let metrics = Metrics::new();
    let health = Health::new();
    let ebpf_attached = health.readiness("ebpf-attached");
    let ca_loaded = health.readiness("ca-loaded");
    // Local mode: approvals are files, and the admin API decides them too.
    let local_approvals = match &config.approval_dir {
        Some(dir) => Some(
            crate::approval::LocalStore::new(dir)
                .with_context(|| format!("approvals in {}", dir.display()))?,
        ),
        None => None,
    };
    // The admin listener before the programs: a busy port must not leave
    // the pins pointing at a proxy that never starts.
    let admin = AdminServer::start_with(
        config.admin_addr,
        metrics.clone(),
        health.clone(),
        local_approvals.clone(),
    )
    .with_context(|| format!("admin listener on {}", config.admin_addr))?;
    let mut record_config = RecordConfig::new(&config.record_dir, &config.node_name);
    record_config.key = Some(
        crate::record::chain::ChainKey::load_or_create(&config.record_key).with_context(|| {
            format!(
                "the record key {}: it must be a file only chaperone reads, holding 64 hex characters (a missing one is created); point --record-key elsewhere or remove a damaged one (older recordings then need the old key to verify)",
                config.record_key.display()
            )
        })?,
    );
    let recorder = Recorder::start(record_config, metrics.clone())
        .with_context(|| format!("recordings in {}", config.record_dir.display()))?;
    let auditor = start_auditor(&config, &metrics)?;

    // failOpen decides what outlives this process: pinned programs keep
    // redirecting to this (then dead) proxy address, so agents' connections
    // are refused until the next node agent adopts the pins.
    let lifetime = if config.fail_open {
        Lifetime::AdoptThenRelease {
            bpffs: config.bpffs.clone(),
        }
    } else {
        Lifetime::Pinned {
            bpffs: config.bpffs.clone(),
        }
    };
    let redirector = Arc::new(
        Redirector::attach_with(
            RedirectSpec {
                cgroup: cgroup_root,
                proxy_v4: config.proxy_ips.iter().find_map(|ip| match ip {
                    std::net::IpAddr::V4(v4) => Some(*v4),
                    _ => None,
                }),
                proxy_v6: config.proxy_ips.iter().find_map(|ip| match ip {
                    std::net::IpAddr::V6(v6) => Some(*v6),
                    _ => None,
                }),
                proxy_port: config.proxy_port,
            },
            lifetime,
        )
        .context("attaching the eBPF redirect")?,
    );
    redirector.set_targets(&config.targets)?;
    redirector.set_refused(&config.refusals())?;
    for (cgroup, id) in &agent_cgroups {
        redirector.add_agent_cgroup(*id)?;
        tracing::info!(cgroup = %cgroup.display(), id = %id, "guarding cgroup");
    }

    // Every address the API server answers on, not only the configured
    // ones: the `kubernetes` Service's ClusterIPs, its Endpoints, and the
    // host chaperone itself dials, kept in step as they change.
    let targets = Arc::new(
        crate::targets::TargetTracker::new(
            redirector.clone() as Arc<dyn crate::targets::TargetSink>,
            &config.targets,
        )
        .map_err(|e| anyhow::anyhow!("redirect targets: {e}"))?,
    );
    tokio::spawn({
        let (targets, client, server) = (
            targets.clone(),
            client.clone(),
            upstream_config.server.clone(),
        );
        async move { targets.run(client, server).await }
    });
    // Fail closed keeps the pins on exit, unless chaperone is being removed.
    let removal = match (&config.own_pod, config.fail_open) {
        (Some((namespace, pod)), false) => Some(crate::removal::RemovalWatch::start(
            client.clone(),
            namespace,
            pod,
        )),
        _ => None,
    };
    ebpf_attached.set_ok();
    ca_loaded.set_ok();
    redirector.report_to(metrics.clone());
    // Ready only once the pod tracker and the policies have synced: before
    // that an agent pod may not be guarded yet, or be judged by no policy.
    let policies_synced = health.readiness("policies-synced");
    let pods_synced = config.pod_tracker.then(|| health.readiness("pods-synced"));

    let authenticator = Arc::new(authenticator);
    let policy = Arc::new(policy);
    if config.policy_files.is_empty() {
        let (client, policy) = (client.clone(), policy.clone());
        tokio::spawn(async move {
            if let Err(error) =
                crate::policy::watch::watch_crds(client, &policy, policies_synced).await
            {
                tracing::error!(%error, "watching AgentPolicy objects stopped");
            }
        });
    } else {
        tracing::info!(files = ?config.policy_files, "loaded policy files");
        policies_synced.set_ok();
    }

    let pods = if config.pod_tracker {
        let tracker = Arc::new(
            PodTracker::new(
                redirector.clone() as Arc<dyn crate::pods::AgentCgroupSink>,
                redirector.spec().cgroup.clone(),
            )
            .reporting(
                metrics.clone(),
                pods_synced.expect("registered with the pod tracker"),
            ),
        );
        let (run, client, node) = (tracker.clone(), client.clone(), config.node_name.clone());
        tokio::spawn(async move {
            if let Err(error) = run.run(client, &node).await {
                tracing::error!(%error, "the pod tracker stopped: new agent pods are not guarded");
            }
        });
        Some(tracker)
    } else {
        None
    };

    let notifier = match &config.notify {
        Some((url, format)) => Some(
            crate::approval::notify::Notifier::start(url.clone(), *format)
                .map_err(|e| anyhow::anyhow!("approval notifications: {e}"))?,
        ),
        None => None,
    };
    let approval_backend = match local_approvals {
        Some(local) => crate::approval::Backend::Local(local),
        None => crate::approval::Backend::Cluster {
            client: client.clone(),
            namespace: config.approval_namespace.clone(),
        },
    };
    let refuse_unattested = verifier.is_none()
        && matches!(approval_backend, crate::approval::Backend::Cluster { .. })
        && !config.approval_trust_unattested;
    if verifier.is_none() && matches!(approval_backend, crate::approval::Backend::Cluster { .. }) {
        if refuse_unattested {
            tracing::error!(
                "no --approval-verify-key: this node cannot tell who approved, so it refuses \
                 every approval decision (held requests stay held): give it the webhook's \
                 public key (ConfigMap chaperone-attestation-public, see deploy/README.md), \
                 or pass --approval-trust-unattested to trust decidedBy as written"
            );
        } else {
            tracing::warn!(
                signal = "approval-trust-unattested",
                "--approval-trust-unattested: approval decisions are not attested, and anyone \
                 who may write approvalrequests/status can approve under any name \
                 (see deploy/README.md)"
            );
        }
    }
    let approvals = crate::approval::Approvals::start_attested(
        approval_backend,
        config.node_name.clone(),
        config.approval_ttl,
        notifier,
        verifier,
    );

    approvals.report_to(metrics.clone());
    if refuse_unattested {
        approvals.refuse_unattested_decisions();
    }
    if let Some(auditor) = &auditor {
        approvals.audit_to(auditor.gate());
    }
    let guard = NodeGuard::new(GuardParts {
        node: config.node_name.as_str().into(),
        authenticator,
        pods,
        policy,
        masker,
        credential_mode: config.credential_mode,
        own_credentials: OwnCredentials {
            token: upstream_config.token.clone().map(|token| {
                Arc::new(move || token.header_value().ok())
                    as Arc<dyn Fn() -> Option<http::HeaderValue> + Send + Sync>
            }),
            client_certificate: upstream_config.client_identity.is_some(),
        },
        recorder: Some(recorder.clone()),
        audit: auditor.as_ref().map(|a| a.gate()),
        metrics,
        approvals: Some(approvals),
        upstream: Some(upstream.clone()),
        // chaperone's own namespace: where its pod runs, and its approvals.
        protect: crate::protect::Protect::new(
            config
                .own_pod
                .iter()
                .map(|(namespace, _)| namespace.clone())
                .chain([config.approval_namespace.clone()]),
        ),
        limits: config.limits,
    });
    let proxy = Proxy::new(
        ProxyConfig {
            require_attestation: config.require_attestation,
            drain_timeout: config.drain_timeout,
            data_threads: config.data_threads,
            ..ProxyConfig::default()
        },
        guard,
        upstream,
        terminator,
        redirector.clone(),
    );
    tracing::info!(
        node = %config.node_name,
        listen = ?config.proxy_ips,
        port = config.proxy_port,
        targets = ?config.targets,
        upstream = %upstream_config.server,
        "chaperone node agent ready"
    );
    proxy.serve(listeners, shutdown_signal()).await;
    if config.fail_open {
        tracing::info!("drained; detaching the eBPF programs (failOpen: agents go direct)");
    } else if let Some(removal) = &removal {
        let verdict = removal.check(REMOVAL_CHECK_LIMIT).await;
        on_exit(&verdict, &redirector, &config);
    } else {
        tracing::info!(
            bpffs = %config.bpffs.display(),
            "drained; the eBPF programs stay pinned (failOpen: false): agents' API \
             connections are refused until a node agent runs again"
        );
    }
    drop(removal);
    drop(redirector);
    recorder.shutdown();
    if let Some(auditor) = auditor {
        auditor.shutdown();
    }
    admin.shutdown();
    Ok(())
}

/// How long the exit waits for the API server to say whether the
/// DaemonSet still exists.
const REMOVAL_CHECK_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps or removes the pins as `verdict` says, and tells the operator.
fn on_exit(verdict: &crate::removal::PinsOnExit, redirector: &Redirector, config: &NodeConfig) {
    use crate::removal::PinsOnExit;
    let bpffs = config.bpffs.display();
    match verdict {
        PinsOnExit::Present(why) => tracing::info!(
            %bpffs,
            "drained; {why}: the eBPF programs stay pinned (failOpen: false) and agents' API \
             connections are refused until the next node agent adopts them"
        ),
        PinsOnExit::Unknown(why) => tracing::warn!(
            %bpffs,
            "drained; {why}. The eBPF programs stay pinned (fail closed): agent pods' API \
             connections on this node are refused until a node agent runs again. If chaperone \
             is being removed, run `chaperone detach --bpffs {bpffs}` on this node as root, or \
             next time set CHAPERONE_FAIL_OPEN=true and roll it out before deleting the \
             DaemonSet (deploy/README.md, \"Removal\")"
        ),
        PinsOnExit::Removed(why) => match redirector.remove_pins() {
            Ok(Some(report)) => {
                tracing::info!(
                    %bpffs,
                    links = ?report.links,
                    maps = ?report.maps,
                    "drained; {why}: chaperone is being removed from this node, so the eBPF \
                     programs were detached and their pins removed (as `chaperone detach` does): \
                     agent pods reach the API server directly"
                );
                for problem in &report.problems {
                    tracing::warn!(
                        %bpffs,
                        "{problem}; finish with `chaperone detach --bpffs {bpffs}` on this node"
                    );
                }
            }
            Ok(None) => tracing::info!(
                %bpffs,
                "drained; {why}, but another node agent on this node holds the pinned \
                 programs (a DaemonSet created again): they stay pinned for it"
            ),
            Err(error) => tracing::warn!(
                %bpffs,
                %error,
                "drained; {why}, but the pins could not be removed: agents' API connections \
                 stay refused; run `chaperone detach --bpffs {bpffs}` on this node as root"
            ),
        },
    }
}

/// Binds a proxy listener with `SO_REUSEPORT`: during a rolling update the
/// new node agent listens beside the old one, so agents' connections always
/// find a listener; the old one closes its socket when told to stop, then
/// drains. (Both must run as the same user, as the DaemonSet's pods do.)
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr).with_context(|| {
        format!(
            "cannot listen on {addr}: is a program other than chaperone using the port, or is \
             --proxy-ip not an address of this node?"
        )
    })?;
    Ok(socket.listen(4096)?)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}

/// The audit sinks `config` asks for (none: no auditing).
fn audit_sinks(config: &NodeConfig) -> anyhow::Result<Vec<SinkSpec>> {
    let mut sinks = Vec::new();
    if let Some(target) = &config.audit_log {
        let sink = if target == "-" {
            SinkConfig::Stdout
        } else {
            SinkConfig::File(FileSinkConfig {
                path: target.into(),
                max_size_mb: 100,
                max_backups: 10,
                max_age_days: 30,
            })
        };
        sinks.push(SinkSpec {
            name: "log".into(),
            config: sink,
            spool_max_bytes: 1 << 30,
        });
    }
    if let Some(webhook) = &config.audit_webhook {
        let endpoint = if webhook.starts_with("https://") || webhook.starts_with("http://") {
            Endpoint::from_url(webhook)
        } else {
            Endpoint::from_kubeconfig(std::path::Path::new(webhook))
        }
        .with_context(|| format!("audit webhook {webhook}"))?;
        sinks.push(SinkSpec {
            name: "webhook".into(),
            config: SinkConfig::Webhook(WebhookConfig {
                batch_max_wait: config.audit_webhook_batch_wait,
                ..WebhookConfig::new(endpoint)
            }),
            spool_max_bytes: 1 << 30,
        });
    }
    Ok(sinks)
}

/// The audit pipeline for the configured sinks (none: no auditing).
fn start_auditor(config: &NodeConfig, metrics: &Metrics) -> anyhow::Result<Option<Auditor>> {
    let sinks = audit_sinks(config)?;
    if sinks.is_empty() {
        return Ok(None);
    }
    let mut audit = AuditConfig::new(&config.audit_spool_dir, sinks);
    audit.full = config.audit_full;
    audit.durability = config.audit_durability;
    Ok(Some(
        Auditor::start(audit, metrics.clone()).context("audit pipeline")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rolling-update hand-over: a second node agent binds the same
    /// proxy port while the first still listens, and after the first closes
    /// its socket the second gets every connection.
    #[tokio::test]
    async fn a_second_agent_listens_beside_the_first() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr).unwrap();
        drop(first);
        let dial = tokio::net::TcpStream::connect(addr);
        let (dialed, accepted) = tokio::join!(dial, second.accept());
        dialed.unwrap();
        accepted.unwrap();
    }
}
