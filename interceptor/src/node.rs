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
    identity::Authenticator,
    mask::Masker,
    pipeline::Pipeline,
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

pub async fn run(config: NodeConfig) -> Result<()> {
    let ca = Arc::new(match &config.ca_files {
        Some((cert, key)) => {
            let read = |path: &std::path::PathBuf| {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            };
            LocalCa::from_secret_data("chaperone-ca", &read(cert)?, &read(key)?).with_context(
                || {
                    format!(
                        "chaperone's CA from {} and {}",
                        cert.display(),
                        key.display()
                    )
                },
            )?
        }
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

    let upstream_config = match &config.kubeconfig {
        Some(path) => UpstreamConfig::from_kubeconfig(path, None)
            .with_context(|| format!("upstream from kubeconfig {}", path.display()))?,
        None => UpstreamConfig::in_cluster().context(
            "upstream from the in-cluster service account (outside a cluster, pass --kubeconfig)",
        )?,
    };
    let upstream = Upstream::new(UpstreamSpec {
        base: upstream_config.server.clone(),
        tls: upstream_config.client_config()?,
        tls_server_name: upstream_config.tls_server_name.clone(),
        connector: ConnectorOptions::default(),
        streams_per_connection: config.upstream_streams_per_connection,
        http1_connections: config.upstream_http1_connections,
    })
    .map_err(anyhow::Error::msg)?;
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

    let cgroup_root = match &config.cgroup_root {
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
    for cgroup in &config.agent_cgroups {
        let id = redirect::cgroupfs::cgroup_id(cgroup)
            .with_context(|| format!("agent cgroup {}", cgroup.display()))?;
        redirector.add_agent_cgroup(CgroupId(id.0))?;
        tracing::info!(cgroup = %cgroup.display(), id = %id, "guarding cgroup");
    }

    // chaperone's own API access (pods, policies, JWKS, TokenReview).
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
    let client = kube::Client::try_from(kube_config).context("kube client")?;
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

    let metrics = Metrics::new();
    let health = Health::new();
    // Local mode: approvals are files, and the admin API decides them too.
    let local_approvals = match &config.approval_dir {
        Some(dir) => Some(
            crate::approval::LocalStore::new(dir)
                .with_context(|| format!("approvals in {}", dir.display()))?,
        ),
        None => None,
    };
    let admin = AdminServer::start_with(
        config.admin_addr,
        metrics.clone(),
        health.clone(),
        local_approvals.clone(),
    )
    .with_context(|| format!("admin listener on {}", config.admin_addr))?;
    health.readiness("ebpf-attached").set_ok();
    health.readiness("ca-loaded").set_ok();

    let authenticator = Arc::new(
        Authenticator::from_client(&config.identity, client.clone())
            .map_err(|e| anyhow::anyhow!("identity configuration: {e}"))?,
    );
    let policy = Arc::new(PolicyStore::new());
    if config.policy_files.is_empty() {
        let (client, policy) = (client.clone(), policy.clone());
        tokio::spawn(async move {
            if let Err(error) = crate::policy::watch::watch_crds(client, &policy).await {
                tracing::error!(%error, "watching AgentPolicy objects stopped");
            }
        });
    } else {
        let count = policy
            .load_files(&config.policy_files)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::info!(policies = count, "loaded policy files");
    }
    let masker = Masker::new(&config.masking).map_err(|e| anyhow::anyhow!("mask rules: {e}"))?;
    let recorder = Recorder::start(
        RecordConfig::new(&config.record_dir, &config.node_name),
        metrics.clone(),
    )
    .with_context(|| format!("recordings in {}", config.record_dir.display()))?;
    let auditor = start_auditor(&config, &metrics)?;

    let pods = if config.pod_tracker {
        let tracker = Arc::new(PodTracker::new(
            redirector.clone() as Arc<dyn crate::pods::AgentCgroupSink>,
            redirector.spec().cgroup.clone(),
        ));
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
    let verifier = match &config.approval_verify_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--approval-verify-key {}: {e}", path.display()))?;
            Some(
                crate::approval::attest::Verifier::from_pem(&pem).map_err(|e| {
                    anyhow::anyhow!("--approval-verify-key {}: {e}", path.display())
                })?,
            )
        }
        None => {
            if matches!(approval_backend, crate::approval::Backend::Cluster { .. }) {
                tracing::warn!(
                    "no --approval-verify-key: approval decisions are not attested, and anyone \
                     who may write approvalrequests/status can approve under any name \
                     (see deploy/README.md)"
                );
            }
            None
        }
    };
    let approvals = crate::approval::Approvals::start_attested(
        approval_backend,
        config.node_name.clone(),
        config.approval_ttl,
        notifier,
        verifier,
    );

    let mut pipeline = Pipeline::new(
        config.node_name.clone(),
        authenticator,
        pods,
        policy,
        masker,
        config.credential_mode,
        Some(recorder.clone()),
        auditor.as_ref().map(|a| a.gate()),
        metrics,
    );
    pipeline.approvals = Some(approvals);
    pipeline.upstream = Some(upstream.clone());
    // chaperone's own namespace: where its pod runs, and its approvals.
    pipeline.protect = crate::protect::Protect::new(
        config
            .own_pod
            .iter()
            .map(|(namespace, _)| namespace.clone())
            .chain([config.approval_namespace.clone()]),
    );
    if let Some(token) = upstream_config.token.clone() {
        pipeline.own_credentials = Some(Arc::new(move || token.header_value().ok()));
    }
    pipeline.own_client_certificate = upstream_config.client_identity.is_some();
    pipeline.limits = crate::limits::PodLimits::new(config.limits);
    let proxy = Proxy::new(
        ProxyConfig {
            require_attestation: config.require_attestation,
            drain_timeout: config.drain_timeout,
            data_threads: config.data_threads,
            ..ProxyConfig::default()
        },
        pipeline,
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
fn on_exit(verdict: &crate::removal::Verdict, redirector: &Redirector, config: &NodeConfig) {
    use crate::removal::Verdict;
    let bpffs = config.bpffs.display();
    match verdict {
        Verdict::Present(why) => tracing::info!(
            %bpffs,
            "drained; {why}: the eBPF programs stay pinned (failOpen: false) and agents' API \
             connections are refused until the next node agent adopts them"
        ),
        Verdict::Unknown(why) => tracing::warn!(
            %bpffs,
            "drained; {why}. The eBPF programs stay pinned (fail closed): agent pods' API \
             connections on this node are refused until a node agent runs again. If chaperone \
             is being removed, run `chaperone detach --bpffs {bpffs}` on this node as root, or \
             next time set CHAPERONE_FAIL_OPEN=true and roll it out before deleting the \
             DaemonSet (deploy/README.md, \"Removal\")"
        ),
        Verdict::Removed(why) => match redirector.remove_pins() {
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

/// The audit pipeline for the configured sinks (none: no auditing).
fn start_auditor(config: &NodeConfig, metrics: &Metrics) -> anyhow::Result<Option<Auditor>> {
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
    if sinks.is_empty() {
        return Ok(None);
    }
    let mut audit = AuditConfig::new(&config.audit_spool_dir, sinks);
    audit.full = config.audit_full;
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
