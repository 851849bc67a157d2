//! The in-process harness: chaperone's guard, its proxy and kube-sim as
//! libraries in one test process. No eBPF, no network namespace, no root:
//! what the kernel would attest about a connection (the agent pod's cgroup,
//! the process that dialed) is injected through the proxy's [`Attestor`]
//! seam, and the pod tracker finds the agent pod's cgroup in a directory
//! tree named the way the kubelet names cgroups. Everything else is the
//! node agent's own wiring (`interceptor/src/node.rs`): the same
//! authenticator against kube-sim's keys, the same policy store, masker,
//! approvals on `ApprovalRequest` objects, recorder, audit pipeline, limits
//! and upstream.
//!
//! Real clients still speak to it where that is cheap ([`Harness::kubectl`]:
//! kubectl with a kubeconfig naming the proxy's address and chaperone's CA,
//! and the agent's pod-bound token from kube-sim); otherwise
//! [`Harness::send`], an HTTP/1.1 or HTTP/2 client in this process that
//! sends a path byte for byte.
//!
//! The root suite (`tests/tests/e2e_*.rs`) keeps proving the kernel path;
//! this one proves every decision, fast, on any machine. Its tests are
//! registered with [`in_process!`] so `cargo xtask test` counts them.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chaperone::{
    admin::Metrics,
    approval::{Approvals, Backend as ApprovalBackend, Ruling, State},
    audit::{AuditConfig, AuditGate, Auditor, FileSinkConfig, SinkConfig, SinkSpec},
    guard::NodeGuard,
    identity::{Authenticator, CredentialMode, IdentityConfig, OwnCredentials},
    limits::LimitConfig,
    mask::{MaskRules, Masker},
    pods::{AgentCgroupSink, PodTracker, SinkError},
    policy::PolicyStore,
    protect::Protect,
    proxy::{Attestor, Guard, Proxy, ProxyConfig, Upstream, UpstreamSpec},
    record::{RecordConfig, Recorder},
    redirect::{AgentAddr, AttestedConnection, CgroupId, OrigDst, ProxyAddr, cgroupfs::cgroup_id},
    tls::{ConnectorOptions, LeafCache, LeafConfig, LocalCa, TlsTerminator, UpstreamConfig},
};
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

use crate::{
    e2e::{ALLOW_ALL, ApiServer, NODE_NAMESPACE, POD_UID, SERVICE_IP, install_approvals, run_for},
    sim::{SimConfig, SimHandle, Simulator, UserInfo},
};

/// Registers in-process tests: `in_process!(NAME, …)` makes the test
/// `NAME::in_process` of the function `fn NAME()` in the same file, so that
/// `cargo xtask test` counts them (as it counts `::sim` and `::real`) and
/// `cargo test -p chaperone-tests -- ::in_process` runs them alone.
#[macro_export]
macro_rules! in_process {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn in_process() {
                    super::$name()
                }
            }
        )+
    };
}

/// How to build a [`Harness`].
#[derive(Clone)]
pub struct HarnessSpec {
    /// The AgentPolicy YAML the guard enforces (as `--policy FILE`).
    pub policy: String,
    pub sim: SimConfig,
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
    pub node_name: String,
    /// `--credential-mode`.
    pub credential_mode: CredentialMode,
    /// `--audience`, …: the identity section of the node's config.
    pub identity: IdentityConfig,
    /// The audiences of the agent's token; `None`: the API server's own.
    pub token_audience: Option<Vec<String>>,
    /// `--max-connections-per-pod`, `--max-requests-per-pod`.
    pub limits: LimitConfig,
    /// `--approval-ttl`.
    pub approval_ttl: Duration,
}

impl Default for HarnessSpec {
    fn default() -> Self {
        HarnessSpec {
            policy: ALLOW_ALL.into(),
            sim: SimConfig::default().permissive(),
            namespace: "default".into(),
            service_account: "agent".into(),
            pod: "agent-0".into(),
            pod_uid: POD_UID.into(),
            node_name: "inprocess-node".into(),
            credential_mode: CredentialMode::Passthrough,
            identity: IdentityConfig::default(),
            token_audience: None,
            limits: LimitConfig::default(),
            approval_ttl: chaperone::approval::DEFAULT_TTL,
        }
    }
}

/// Everything the guard is built from: the pieces `node.rs` wires, one
/// field each. [`build_guard`] is the one place they become a guard.
pub struct GuardParts {
    pub node: String,
    pub authenticator: Arc<Authenticator>,
    pub pods: Arc<PodTracker>,
    pub policy: Arc<PolicyStore>,
    pub masker: Masker,
    pub credential_mode: CredentialMode,
    pub recorder: Recorder,
    pub audit: AuditGate,
    pub metrics: Metrics,
    pub approvals: Arc<Approvals>,
    /// The approval previews' upstream.
    pub upstream: Upstream,
    pub protect: Protect,
    /// chaperone's own `Authorization` (impersonate mode).
    pub own_token: Option<HeaderValue>,
    pub limits: LimitConfig,
}

/// The guard the node agent runs, built from `parts` as `node.rs` builds
/// it. (The one function to change when the guard's constructor changes.)
pub fn build_guard(parts: GuardParts) -> impl Guard {
    NodeGuard::new(chaperone::guard::GuardParts {
        node: parts.node.into(),
        pods: Some(parts.pods),
        policy: parts.policy,
        masker: parts.masker,
        credential_mode: parts.credential_mode,
        own_credentials: OwnCredentials {
            token: parts.own_token.map(|token| {
                Arc::new(move || Some(token.clone()))
                    as Arc<dyn Fn() -> Option<HeaderValue> + Send + Sync>
            }),
            client_certificate: false,
        },
        recorder: Some(parts.recorder),
        audit: Some(parts.audit),
        metrics: parts.metrics,
        approvals: Some(parts.approvals),
        upstream: Some(parts.upstream),
        protect: parts.protect,
        limits: parts.limits,
        ..chaperone::guard::GuardParts::new(parts.authenticator)
    })
}

/// What the kernel would attest: connections to the agent pod's listener
/// come from the agent pod's container cgroup, dialed by this process (a
/// live pid, so the process lineage is read as in production); the other
/// listener's connections were not redirected at all.
struct InjectedAttestation {
    by_listener: HashMap<SocketAddr, AttestedConnection>,
}

impl Attestor for InjectedAttestation {
    fn attest(&self, _agent: AgentAddr, proxy: ProxyAddr) -> Option<AttestedConnection> {
        self.by_listener.get(&proxy.0).cloned()
    }
}

/// The pod tracker's sink: the eBPF `AGENT_CGROUPS` map in production;
/// here nothing is redirected, so it only has to accept.
struct NoRedirect;

impl AgentCgroupSink for NoRedirect {
    fn add(&self, _id: CgroupId) -> Result<(), SinkError> {
        Ok(())
    }
    fn remove(&self, _id: CgroupId) -> Result<(), SinkError> {
        Ok(())
    }
}

/// One answer as the agent received it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The `message` of a Kubernetes `Status` answer.
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// One request as an agent sends it through chaperone ([`Harness::send`]).
#[derive(Clone, Debug)]
pub struct AgentRequest {
    pub method: http::Method,
    /// Sent byte for byte (no normalisation).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<(String, Vec<u8>)>,
    pub http2: bool,
    /// The bearer token; `None`: the agent's own.
    pub token: Option<String>,
    /// Dial the listener whose connections the kernel did not redirect.
    pub unattested: bool,
}

impl AgentRequest {
    pub fn new(method: http::Method, path: impl Into<String>) -> Self {
        AgentRequest {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
            http2: false,
            token: None,
            unattested: false,
        }
    }

    pub fn get(path: impl Into<String>) -> Self {
        Self::new(http::Method::GET, path)
    }

    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(http::Method::DELETE, path)
    }

    pub fn post(path: impl Into<String>, body: &Value) -> Self {
        Self::new(http::Method::POST, path).body("application/json", body.to_string())
    }

    pub fn put(path: impl Into<String>, body: &Value) -> Self {
        Self::new(http::Method::PUT, path).body("application/json", body.to_string())
    }

    /// A patch of `content_type` (`application/merge-patch+json`, …).
    pub fn patch(path: impl Into<String>, content_type: &str, body: &Value) -> Self {
        Self::new(http::Method::PATCH, path).body(content_type, body.to_string())
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some((content_type.to_owned(), body.into()));
        self
    }

    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    pub fn unattested(mut self) -> Self {
        self.unattested = true;
        self
    }
}

/// A connection an agent holds open (for limits, held requests, streams).
pub enum AgentConnection {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl AgentConnection {
    /// Sends `request` on this connection; the response head, its body
    /// still streaming.
    pub async fn start(
        &mut self,
        request: &AgentRequest,
        default_token: &str,
    ) -> Result<http::Response<hyper::body::Incoming>> {
        let mut builder = http::Request::builder()
            .method(request.method.clone())
            .uri(request.path.as_str());
        if matches!(self, AgentConnection::Http1(_)) {
            builder = builder.header(http::header::HOST, "kubernetes.default.svc");
        }
        let token = request.token.as_deref().unwrap_or(default_token);
        if !token.is_empty() {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body = match &request.body {
            Some((content_type, bytes)) => {
                builder = builder.header(http::header::CONTENT_TYPE, content_type.as_str());
                Full::new(Bytes::from(bytes.clone()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder.body(body).context("an agent request")?;
        let response = match self {
            AgentConnection::Http1(send) => {
                send.ready().await?;
                send.send_request(request).await?
            }
            AgentConnection::Http2(send) => {
                send.ready().await?;
                send.send_request(request).await?
            }
        };
        Ok(response)
    }

    /// Sends `request` and reads the whole answer.
    pub async fn send(&mut self, request: &AgentRequest, default_token: &str) -> Result<Reply> {
        let response = self.start(request, default_token).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// chaperone (guard + proxy) and kube-sim in this process.
pub struct Harness {
    pub runtime: tokio::runtime::Runtime,
    pub sim: Arc<SimHandle>,
    pub work: tempfile::TempDir,
    /// The agent pod's listener: connections to it are attested as the
    /// agent pod's.
    pub addr: SocketAddr,
    /// A listener whose connections the "kernel" did not redirect.
    pub unattested_addr: SocketAddr,
    /// chaperone's CA (PEM), which the agent trusts.
    pub ca_pem: String,
    /// The agent's pod-bound service-account token.
    pub token: String,
    /// The agent pod's uid, as kube-sim stored it (its token and its
    /// cgroup carry it).
    pub pod_uid: String,
    pub spec: HarnessSpec,
    pub pods: Arc<PodTracker>,
    pub policy: Arc<PolicyStore>,
    client_tls: Arc<rustls::ClientConfig>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    recorder: Option<Recorder>,
    auditor: Option<Auditor>,
}

impl Harness {
    /// kube-sim, then chaperone with `spec`, ready for the agent: its pod
    /// exists (labeled, on this node) and the pod tracker has found its
    /// cgroup.
    pub fn start(spec: HarnessSpec) -> Result<Harness> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let work = tempfile::tempdir()?;
        let sim = Arc::new(runtime.block_on(Simulator::start(spec.sim.clone()))?);
        let api = ApiServer::Sim(sim.clone());
        install_approvals(&api)?;
        let _already_there = sim.store().create(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": spec.namespace},
        }));
        let created = sim
            .store()
            .create(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": spec.pod,
                    "namespace": spec.namespace,
                    "uid": spec.pod_uid,
                    "labels": {"chaperone.dev/intercept": "true", "app": "agent"},
                },
                "spec": {
                    "nodeName": spec.node_name,
                    "serviceAccountName": spec.service_account,
                    "containers": [{"name": "agent", "image": "agent:latest"}],
                },
            }))
            .map_err(|e| anyhow::anyhow!("seed the agent pod: {e:?}"))?;
        let pod_uid = created["metadata"]["uid"]
            .as_str()
            .unwrap_or(&spec.pod_uid)
            .to_owned();
        let token = sim.mint_service_account_token(
            &spec.namespace,
            &spec.service_account,
            Some((&spec.pod, &pod_uid)),
            spec.token_audience
                .as_ref()
                .map(|a| a.iter().map(String::as_str).collect::<Vec<_>>())
                .as_deref(),
            Duration::from_secs(3600),
        )?;
        // The cgroup tree as the kubelet names it, in a plain directory:
        // cgroup ids are directory inodes.
        let cgroup_root = work.path().join("cgroup");
        let pod_cgroup = cgroup_root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            pod_uid.replace('-', "_")
        ));
        let container_cgroup = pod_cgroup.join("cri-containerd-agent.scope");
        std::fs::create_dir_all(&container_cgroup)?;
        let attested = AttestedConnection {
            orig_dst: OrigDst(SERVICE_IP),
            cgroup_id: cgroup_id(&container_cgroup)?,
            agent_cgroup_id: cgroup_id(&pod_cgroup)?,
            pid: std::process::id(),
            uid: 0,
        };
        let kubeconfig = work.path().join("chaperone.kubeconfig");
        sim.write_kubeconfig(&kubeconfig, &sim.admin_token())?;
        let policy_file = work.path().join("policy.yaml");
        std::fs::write(&policy_file, &spec.policy)?;

        let (served, stop, parts) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let unattested = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let addr = listener.local_addr()?;
            let unattested_addr = unattested.local_addr()?;
            let wired = wire(&spec, &work, &kubeconfig, &policy_file, &cgroup_root).await?;
            let attestor = InjectedAttestation {
                by_listener: HashMap::from([(addr, attested)]),
            };
            let proxy = Proxy::new(
                ProxyConfig {
                    require_attestation: true,
                    drain_timeout: Duration::from_secs(2),
                    data_threads: 1,
                    ..ProxyConfig::default()
                },
                build_guard(wired.guard),
                wired.upstream,
                wired.terminator,
                Arc::new(attestor),
            );
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(proxy.serve(vec![listener, unattested], async {
                let _ = stop_rx.await;
            }));
            // The first connection finds the agent pod: wait until the pod
            // tracker has seen it and its cgroup.
            let deadline = Instant::now() + Duration::from_secs(20);
            while wired.pods.guarded_count() == 0 {
                if Instant::now() > deadline {
                    bail!(
                        "the pod tracker did not find the agent pod's cgroup in 20 s: {:?}",
                        wired.pods.unresolved()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((
                served,
                stop_tx,
                (
                    addr,
                    unattested_addr,
                    wired.ca_pem,
                    wired.pods,
                    wired.policy,
                    wired.recorder,
                    wired.auditor,
                ),
            ))
        })?;
        let (addr, unattested_addr, ca_pem, pods, policy, recorder, auditor) = parts;
        let client_tls = Arc::new(agent_tls(&ca_pem)?);
        Ok(Harness {
            runtime,
            sim,
            work,
            addr,
            unattested_addr,
            ca_pem,
            token,
            pod_uid,
            spec,
            pods,
            policy,
            client_tls,
            stop: Some(stop),
            served: Some(served),
            recorder: Some(recorder),
            auditor: Some(auditor),
        })
    }

    /// The agent's own service-account name, as the API server reports it.
    pub fn agent_user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.spec.namespace, self.spec.service_account
        )
    }

    /// Opens an agent connection (TLS, HTTP/1.1 or HTTP/2).
    pub async fn connect(&self, http2: bool, unattested: bool) -> Result<AgentConnection> {
        let addr = if unattested {
            self.unattested_addr
        } else {
            self.addr
        };
        let mut tls = (*self.client_tls).clone();
        tls.alpn_protocols = vec![if http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(
                rustls::pki_types::ServerName::IpAddress(IpAddr::from(Ipv4Addr::LOCALHOST).into()),
                tcp,
            )
            .await
            .context("TLS to chaperone")?;
        let io = TokioIo::new(stream);
        Ok(if http2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .context("HTTP/2 to chaperone")?;
            tokio::spawn(conn);
            AgentConnection::Http2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("HTTP/1.1 to chaperone")?;
            tokio::spawn(conn.with_upgrades());
            AgentConnection::Http1(send)
        })
    }

    /// Sends one request on a connection of its own; the whole answer.
    pub fn send(&self, request: AgentRequest) -> Reply {
        self.runtime
            .block_on(async {
                let mut conn = self.connect(request.http2, request.unattested).await?;
                tokio::time::timeout(Duration::from_secs(60), conn.send(&request, &self.token))
                    .await
                    .context("no answer in 60 s")?
            })
            .unwrap_or_else(|e| panic!("{} {}: {e:#}", request.method, request.path))
    }

    /// `GET path` as the agent.
    pub fn get(&self, path: &str) -> Reply {
        self.send(AgentRequest::get(path))
    }

    /// Writes a kubeconfig that reaches kube-sim through chaperone: the
    /// proxy's address, chaperone's CA, `token`.
    pub fn write_agent_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: chaperone\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: agent\n  context:\n    cluster: chaperone\n    user: agent\n    namespace: {}\ncurrent-context: agent\n",
                self.addr, self.spec.namespace
            ),
        )?;
        Ok(())
    }

    /// `kubectl ARGS` as the agent, through chaperone.
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let home = self.work.path().join("agent-home");
        let kubeconfig = home.join("config");
        if !kubeconfig.exists() {
            std::fs::create_dir_all(&home).expect("the agent's home");
            self.write_agent_kubeconfig(&kubeconfig, &self.token)
                .expect("the agent's kubeconfig");
        }
        let mut cmd = Command::new("kubectl");
        cmd.args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", &home)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    /// Runs `kubectl ARGS` as the agent (60 s at most).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.run_kubectl(&mut self.kubectl_command(args))
    }

    /// Runs a [`Harness::kubectl_command`] (60 s at most).
    pub fn run_kubectl(&self, cmd: &mut Command) -> Output {
        run_for(cmd, Duration::from_secs(60)).unwrap_or_else(|e| {
            let not_found = e
                .chain()
                .filter_map(|c| c.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == std::io::ErrorKind::NotFound);
            if not_found {
                panic!(
                    "kubectl is not on PATH: these tests run the real kubectl as the agent; \
                     install kubectl (1.20 or newer) and run them again"
                );
            }
            panic!("{cmd:?}: {e:#}")
        })
    }

    /// Waits (60 s at most) for a `kubectl` started with
    /// [`Harness::kubectl_command`] and piped output; what it printed.
    pub fn finish(&self, mut child: std::process::Child) -> Output {
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kubectl did not finish in 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("kubectl's output")
    }

    /// Where the guard writes the audit log (`--audit-log`).
    pub fn audit_log(&self) -> PathBuf {
        self.work.path().join("audit.log")
    }

    /// Where sessions are recorded (`--record-dir`).
    pub fn sessions_dir(&self) -> PathBuf {
        self.work.path().join("sessions")
    }

    /// The audit events written so far.
    pub fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The first audit event `matches`, once the audit thread wrote it.
    pub fn wait_for_audit(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(event) = self.audit_events().into_iter().find(&matches) {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "no audit event for {what} in 20 s:\n{:#?}",
                self.audit_events()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every recorded session line (JSON) of the agent pod.
    pub fn session_records(&self) -> Vec<Value> {
        let dir = self
            .sessions_dir()
            .join(&self.spec.namespace)
            .join(&self.spec.pod);
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect::<Vec<Value>>()
            })
            .collect()
    }

    /// The requests kube-sim answered with the agent's token.
    pub fn agent_requests_seen(&self) -> Vec<crate::sim::RecordedRequest> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| {
                r.authenticated
                    .as_ref()
                    .is_some_and(|u| u.username == self.agent_user())
                    || r.impersonated
                        .as_ref()
                        .is_some_and(|u| u.username == self.agent_user())
            })
            .collect()
    }

    /// The `ApprovalRequest` objects in chaperone's namespace.
    pub fn approvals(&self) -> Vec<Value> {
        self.sim
            .store()
            .list("approvalrequests.chaperone.dev", Some(NODE_NAMESPACE))
    }

    /// The id of the first pending approval `matches`, once the guard
    /// created it.
    pub fn wait_for_pending(&self, matches: impl Fn(&Value) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = self.approvals().into_iter().find(|a| {
                a["status"]["state"].as_str().unwrap_or("Pending") == "Pending" && matches(a)
            }) {
                return found["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no pending approval in 20 s: {:#?}",
                self.approvals()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A person decides approval `id` as `kubectl chaperone approve|deny`
    /// does: the status the plugin computes ([`Ruling::status_for`]),
    /// written on the `ApprovalRequest`'s status in kube-sim with the
    /// person's own credentials.
    pub fn decide(&self, id: &str, approve: bool, by: &str, reason: &str) -> Result<()> {
        use kube::api::{Api, Patch, PatchParams};
        let token = format!("person-{by}-{}", uuid::Uuid::new_v4().simple());
        self.sim.add_static_token(
            &token,
            UserInfo {
                username: by.into(),
                uid: String::new(),
                groups: vec!["system:authenticated".into()],
                extra: Default::default(),
            },
        );
        let kubeconfig = self.work.path().join(format!("{by}.kubeconfig"));
        self.sim.write_kubeconfig(&kubeconfig, &token)?;
        self.runtime.block_on(async {
            let client = kube_client(&kubeconfig).await?;
            let api: Api<chaperone::approval::ApprovalRequest> =
                Api::namespaced(client, NODE_NAMESPACE);
            let approval = api.get(id).await?;
            let decision = Ruling {
                state: if approve {
                    State::Approved
                } else {
                    State::Denied
                },
                by: by.into(),
                groups: Vec::new(),
                reason: Some(reason.into()).filter(|r: &String| !r.is_empty()),
                grant: None,
                grant_scope: None,
            };
            let status = decision.status_for(&approval, time::OffsetDateTime::now_utc())?;
            api.patch_status(
                id,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await?;
            Ok(())
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), served).await });
        }
        if let Some(recorder) = self.recorder.take() {
            recorder.shutdown();
        }
        if let Some(auditor) = self.auditor.take() {
            auditor.shutdown();
        }
    }
}

/// What [`wire`] built.
struct Wired {
    guard: GuardParts,
    upstream: Upstream,
    terminator: Arc<TlsTerminator>,
    ca_pem: String,
    pods: Arc<PodTracker>,
    policy: Arc<PolicyStore>,
    recorder: Recorder,
    auditor: Auditor,
}

/// `node.rs`'s wiring, piece for piece, without the kernel: the CA and its
/// leaves, the upstream from chaperone's kubeconfig, the identity, policy
/// from a file, masking, recording, audit to a file, the pod tracker
/// watching kube-sim, approvals as `ApprovalRequest` objects, limits.
async fn wire(
    spec: &HarnessSpec,
    work: &tempfile::TempDir,
    kubeconfig: &Path,
    policy_file: &Path,
    cgroup_root: &Path,
) -> Result<Wired> {
    let ca = Arc::new(LocalCa::load_or_create(&work.path().join("ca"))?);
    let ca_pem = ca.bundle_pem().to_owned();
    let leaves = Arc::new(LeafCache::new(
        ca,
        LeafConfig {
            ips: vec![IpAddr::from(Ipv4Addr::LOCALHOST), SERVICE_IP.ip()],
            ..LeafConfig::default()
        },
    ));
    let terminator = Arc::new(TlsTerminator::new(leaves));

    let upstream_config = UpstreamConfig::from_kubeconfig(kubeconfig, None)?;
    let upstream = Upstream::new(UpstreamSpec {
        base: upstream_config.server.clone(),
        tls: upstream_config.client_config()?,
        tls_server_name: upstream_config.tls_server_name.clone(),
        connector: ConnectorOptions::default(),
        streams_per_connection: 100,
        http1_connections: 4,
    })
    .map_err(anyhow::Error::msg)?;
    let client = kube_client(kubeconfig).await?;

    let metrics = Metrics::new();
    let authenticator = Arc::new(
        Authenticator::from_client(&spec.identity, client.clone())
            .map_err(|e| anyhow::anyhow!("identity configuration: {e}"))?,
    );
    let policy = Arc::new(PolicyStore::new());
    policy
        .load_files(&[policy_file])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let masker =
        Masker::new(&MaskRules::default()).map_err(|e| anyhow::anyhow!("mask rules: {e}"))?;
    let recorder = Recorder::start(
        RecordConfig::new(work.path().join("sessions"), &spec.node_name),
        metrics.clone(),
    )?;
    let auditor = Auditor::start(
        AuditConfig::new(
            work.path().join("audit-spool"),
            vec![SinkSpec {
                name: "log".into(),
                config: SinkConfig::File(FileSinkConfig {
                    path: work.path().join("audit.log"),
                    max_size_mb: 100,
                    max_backups: 1,
                    max_age_days: 1,
                }),
                spool_max_bytes: 64 << 20,
            }],
        ),
        metrics.clone(),
    )?;
    let pods = Arc::new(
        PodTracker::new(Arc::new(NoRedirect), cgroup_root)
            .with_retry_interval(Duration::from_millis(100)),
    );
    tokio::spawn({
        let (pods, client, node) = (pods.clone(), client.clone(), spec.node_name.clone());
        async move {
            if let Err(error) = pods.run(client, &node).await {
                tracing::error!(%error, "the pod tracker stopped");
            }
        }
    });
    let approvals = Approvals::start_attested(
        ApprovalBackend::Cluster {
            client: client.clone(),
            namespace: NODE_NAMESPACE.into(),
        },
        spec.node_name.clone(),
        spec.approval_ttl,
        None,
        None,
    );
    let own_token = upstream_config
        .token
        .as_ref()
        .and_then(|t| t.header_value().ok());
    Ok(Wired {
        guard: GuardParts {
            node: spec.node_name.clone(),
            authenticator,
            pods: pods.clone(),
            policy: policy.clone(),
            masker,
            credential_mode: spec.credential_mode,
            recorder: recorder.clone(),
            audit: auditor.gate(),
            metrics,
            approvals,
            upstream: upstream.clone(),
            protect: Protect::new([NODE_NAMESPACE.to_owned()]),
            own_token,
            limits: spec.limits,
        },
        upstream,
        terminator,
        ca_pem,
        pods,
        policy,
        recorder,
        auditor,
    })
}

async fn kube_client(kubeconfig: &Path) -> Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// The agent's TLS: it trusts chaperone's CA (the bundle in its pod).
fn agent_tls(ca_pem: &str) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}
