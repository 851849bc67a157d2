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
        sink::{FileSinkConfig, SinkConfig},
    },
    config::NodeConfig,
    identity::Authenticator,
    mask::{MaskRules, Masker},
    pipeline::Pipeline,
    pods::PodTracker,
    policy::PolicyStore,
    proxy::{Proxy, ProxyConfig, Terminate, Upstream, UpstreamSpec},
    record::{RecordConfig, Recorder},
    redirect::{self, CgroupId, RedirectSpec, Redirector},
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
        connector: ConnectorOptions {
            mark: config.socket_mark,
            ..ConnectorOptions::default()
        },
    })
    .map_err(anyhow::Error::msg)?;

    let mut listeners = Vec::new();
    for ip in &config.proxy_ips {
        listeners.push(bind(SocketAddr::new(*ip, config.proxy_port))?);
    }

    let cgroup_root = match &config.cgroup_root {
        Some(root) => root.clone(),
        None => redirect::cgroup2_mount()?,
    };
    let redirector = Arc::new(
        Redirector::attach(RedirectSpec {
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
            mark: config.socket_mark,
        })
        .context("attaching the eBPF redirect")?,
    );
    for target in &config.targets {
        redirector.add_target(*target)?;
    }
    for destination in &config.refused {
        redirector.refuse(*destination)?;
    }
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

    let metrics = Metrics::new();
    let health = Health::new();
    let admin = AdminServer::start(config.admin_addr, metrics.clone(), health.clone())
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
    let masker =
        Masker::new(&MaskRules::default()).map_err(|e| anyhow::anyhow!("mask rules: {e}"))?;
    let recorder = Recorder::start(
        RecordConfig::new(&config.record_dir, &config.node_name),
        metrics.clone(),
    )
    .with_context(|| format!("recordings in {}", config.record_dir.display()))?;
    let auditor = match &config.audit_log {
        Some(target) => {
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
            let spool = config.record_dir.with_file_name("audit-spool");
            Some(
                Auditor::start(
                    AuditConfig::new(
                        spool,
                        vec![SinkSpec {
                            name: "log".into(),
                            config: sink,
                            spool_max_bytes: 1 << 30,
                        }],
                    ),
                    metrics.clone(),
                )
                .context("audit pipeline")?,
            )
        }
        None => None,
    };

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
    let approval_backend = match &config.approval_dir {
        Some(dir) => crate::approval::Backend::Local(
            crate::approval::LocalStore::new(dir)
                .with_context(|| format!("approvals in {}", dir.display()))?,
        ),
        None => crate::approval::Backend::Cluster {
            client: client.clone(),
            namespace: config.approval_namespace.clone(),
        },
    };
    let approvals = crate::approval::Approvals::start(
        approval_backend,
        config.node_name.clone(),
        config.approval_ttl,
        notifier,
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
    if let Some(token) = upstream_config.token.clone() {
        pipeline.own_credentials = Some(Arc::new(move || token.header_value().ok()));
    }
    let proxy = Proxy::new(
        ProxyConfig {
            require_attestation: config.require_attestation,
            drain_timeout: config.drain_timeout,
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
    tracing::info!("drained; detaching the eBPF programs");
    drop(redirector);
    recorder.shutdown();
    if let Some(auditor) = auditor {
        auditor.shutdown();
    }
    admin.shutdown();
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}: is another chaperone running, or is --proxy-ip not an address of this node?"))?;
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
