//! The end-to-end world of DESIGN.md's test topology: the API-server
//! simulator on the host, a `chaperone node` process attached at a test
//! cgroup subtree, and an agent pod (network namespace + kubelet-named
//! cgroup) whose real clients run exactly as in a cluster: in-cluster env,
//! service-account files, the `kubernetes` service IP that only the redirect
//! makes reachable.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    sim::{SimConfig, SimHandle, Simulator},
    topology::{BpffsMount, Cgroup, InClusterCredentials, Netns, Placement},
};

/// The `kubernetes.default` ClusterIP agents dial.
pub const SERVICE_IP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 443);

/// A built binary of this workspace (`cargo test --workspace` builds them all).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs as target/<profile>/deps/<test>, a binary (the demo) as
    // target/<profile>/<bin>; the workspace binaries sit in target/<profile>.
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A running `chaperone node`, killed (SIGTERM, then SIGKILL) on drop.
pub struct NodeAgent {
    child: Child,
    pub admin_port: u16,
    pub ca_dir: PathBuf,
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl NodeAgent {
    /// Starts `chaperone ARGS` and waits until it is ready.
    fn spawn(
        command: &[std::ffi::OsString],
        admin_port: u16,
        ca_dir: PathBuf,
        port: u16,
    ) -> Result<NodeAgent> {
        let mut child = Command::new(workspace_binary("chaperone"))
            .args(command)
            .env("CHAPERONE_LOG", "info,chaperone=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start chaperone node")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        {
            let stderr = child.stderr.take().expect("piped stderr");
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("node agent ready") {
                        let _ = ready_tx.send(());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let node = NodeAgent {
            child,
            admin_port,
            ca_dir,
            port,
            log,
        };
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            bail!("chaperone node did not become ready:\n{}", node.log_text());
        }
        Ok(node)
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_dir.join("ca.crt")).expect("chaperone's CA")
    }

    /// The process id (for /proc: memory, file descriptors).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM and wait (graceful drain).
    pub fn stop(&mut self) {
        self.signal_and_wait(libc::SIGTERM);
    }

    /// Sends `signal` and waits for the exit (SIGKILL after 30 s). `true`
    /// when the process exited by itself within that time.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// `true` while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Everything an end-to-end test needs.
pub struct World {
    pub runtime: tokio::runtime::Runtime,
    /// Shared by the worlds of several nodes ([`World::join`]).
    pub sim: Arc<SimHandle>,
    pub netns: Netns,
    pub agent_cgroup: Cgroup,
    pub node: NodeAgent,
    pub work: tempfile::TempDir,
    /// The agent's service-account token.
    pub token: String,
    pub credentials: InClusterCredentials,
    /// The agent pod's uid (its cgroup and its token carry it).
    pub pod_uid: String,
    /// The node agent's `--bpffs` directory (on this world's own bpffs).
    pub bpffs: PathBuf,
    /// With [`WorldSpec::direct_listener`]: a plain listener on the host
    /// side of the veth that chaperone also treats as an API-server target.
    /// Whatever it accepts from the agent reached "the API server" without
    /// chaperone.
    pub direct: Option<std::net::TcpListener>,
    node_command: Vec<std::ffi::OsString>,
    // After the node agent: detaches and unmounts what it left pinned.
    _bpffs_mount: BpffsMount,
    // Dropped last: the subtree the programs are attached at.
    _subtree: Cgroup,
}

/// How to build a [`World`].
pub struct WorldSpec {
    pub sim: SimConfig,
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    /// Extra `chaperone node` flags.
    pub node_args: Vec<String>,
    /// The AgentPolicy YAML the node enforces, as a file. Empty: cluster
    /// mode, the node watches `AgentPolicy` objects in the simulator.
    pub policy: String,
    /// Objects created in the simulator before chaperone starts (a CRD and
    /// its `AgentPolicy` objects for cluster mode).
    pub seed: Vec<serde_json::Value>,
    /// Create the agent pod in the simulator (labeled for interception, on
    /// the node, with the uid of the agent cgroup) so the pod tracker finds it.
    pub agent_pod_in_sim: bool,
    /// Guard the agent cgroup with `--agent-cgroup` (true), or leave it to
    /// the pod tracker to find from the labeled pod in the simulator.
    pub agent_cgroup_flag: bool,
    /// The audiences of the agent's token; `None`: the API server's own.
    pub token_audience: Option<Vec<String>>,
    /// Open [`World::direct`] and make it a redirect target.
    pub direct_listener: bool,
    /// The node's name (the agent pod's `spec.nodeName`).
    pub node_name: String,
    /// The agent pod's uid.
    pub pod_uid: String,
    /// Run the node agent as a pod of the DaemonSet
    /// `chaperone-system/chaperone-node`, both created in the simulator as
    /// a real cluster has them; `--pod-name/--pod-namespace` name the pod.
    pub node_pod: bool,
}

/// Lets every service account do everything, recording metadata: faithful
/// forwarding, as the proxy-only tests need.
pub const ALLOW_ALL: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: allow-all
spec:
  subjects:
    - groups: ["system:serviceaccounts"]
  defaultAction: allow
"#;

impl WorldSpec {
    /// For worlds where people decide approvals with `kubectl chaperone
    /// approve|deny`, which learns who the approver is from
    /// SelfSubjectReview (Kubernetes 1.28+): until the plugin has a
    /// fallback for older servers, their simulator claims 1.28.
    pub fn deciding_approvals() -> WorldSpec {
        WorldSpec {
            sim: SimConfig::default()
                .permissive()
                .with_minor_version(crate::sim::SELF_SUBJECT_REVIEW_MINOR_VERSION),
            ..WorldSpec::default()
        }
    }
}

impl Default for WorldSpec {
    fn default() -> Self {
        WorldSpec {
            sim: SimConfig::default().permissive(),
            namespace: "default".into(),
            service_account: "agent".into(),
            pod: "agent-0".into(),
            node_args: Vec::new(),
            policy: ALLOW_ALL.into(),
            seed: Vec::new(),
            agent_pod_in_sim: true,
            agent_cgroup_flag: true,
            token_audience: None,
            direct_listener: false,
            node_name: "e2e-node".into(),
            pod_uid: POD_UID.into(),
            node_pod: false,
        }
    }
}

pub const POD_UID: &str = "3f1c9a44-2b8e-4c1d-9a3e-5d2f7c8b9e10";

/// The `ApprovalRequest` CRD as deployed.
pub const APPROVAL_CRD: &str =
    include_str!("../../deploy/base/crds/approvalrequests.chaperone.dev.yaml");

/// Installs what a chaperone install puts in a cluster for approvals: the
/// `ApprovalRequest` CRD and the `chaperone-system` namespace.
pub fn install_approvals(sim: &SimHandle) -> Result<()> {
    let crd: serde_json::Value = serde_yaml::from_str(APPROVAL_CRD)?;
    sim.store()
        .create(crd)
        .map_err(|e| anyhow::anyhow!("install the ApprovalRequest CRD: {e:?}"))?;
    sim.store()
        .create(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "chaperone-system"},
        }))
        .map_err(|e| anyhow::anyhow!("create chaperone-system: {e:?}"))?;
    Ok(())
}

impl World {
    pub fn start(spec: WorldSpec) -> Result<World> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let sim = Arc::new(runtime.block_on(Simulator::start(spec.sim.clone()))?);
        install_approvals(&sim)?;
        Self::assemble(runtime, sim, spec)
    }

    /// Another node's world on the same simulator: its own node agent,
    /// cgroup subtree and agent pod (give it another `node_name`, `pod` and
    /// `pod_uid`).
    pub fn join(other: &World, spec: WorldSpec) -> Result<World> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        Self::assemble(runtime, other.sim.clone(), spec)
    }

    fn assemble(
        runtime: tokio::runtime::Runtime,
        sim: Arc<SimHandle>,
        spec: WorldSpec,
    ) -> Result<World> {
        let work = tempfile::tempdir()?;
        let mut pod_uid = spec.pod_uid.clone();
        if spec.agent_pod_in_sim {
            // The agent's namespace exists in any real cluster (the sim starts
            // with default and kube-system only).
            let _already_there = sim.store().create(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": spec.namespace},
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
            pod_uid = created["metadata"]["uid"]
                .as_str()
                .unwrap_or(&spec.pod_uid)
                .to_owned();
        }
        for object in spec.seed {
            sim.store()
                .create(object)
                .map_err(|e| anyhow::anyhow!("seed the simulator: {e:?}"))?;
        }
        let node_pod = if spec.node_pod {
            Some(create_node_pod(&sim, &spec.node_name)?)
        } else {
            None
        };
        let subtree = Cgroup::test_subtree()?;
        let agent_cgroup = subtree.child(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-agent.scope",
            pod_uid.replace('-', "_")
        ))?;
        let netns = Netns::create()?;

        let kubeconfig = work.path().join("chaperone.kubeconfig");
        sim.write_kubeconfig(&kubeconfig, &sim.admin_token())?;
        let policy = work.path().join("policy.yaml");
        std::fs::write(&policy, &spec.policy)?;
        let port = free_port(netns.host_v4)?;
        let admin_port = free_port(Ipv4Addr::LOCALHOST)?;
        let ca_dir = work.path().join("ca");
        // Each world pins into its own bpffs instance: parallel worlds never
        // see each other's pins, and teardown removes everything.
        let bpffs_mount = BpffsMount::create()?;
        let bpffs = bpffs_mount.path.join("chaperone");
        let direct = if spec.direct_listener {
            let listener = std::net::TcpListener::bind((netns.host_v4, 0))?;
            listener.set_nonblocking(true)?;
            Some(listener)
        } else {
            None
        };
        let mut cmd = Command::new("chaperone");
        cmd.arg("node")
            .args(["--node-name", &spec.node_name])
            .args(["--proxy-ip", &netns.host_v4.to_string()])
            .args(["--proxy-port", &port.to_string()])
            .args(["--target", &SERVICE_IP.to_string()])
            .arg("--cgroup-root")
            .arg(&subtree.path)
            .args(
                spec.agent_cgroup_flag
                    .then(|| ["--agent-cgroup".as_ref(), agent_cgroup.path.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--drain-seconds", "3"]);
        if !spec.policy.is_empty() {
            cmd.arg("--policy").arg(&policy);
        }
        cmd.args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .arg("--record-dir")
            .arg(work.path().join("sessions"))
            .arg("--audit-log")
            .arg(work.path().join("audit.log"))
            .arg("--bpffs")
            .arg(&bpffs);
        if let Some(direct) = &direct {
            cmd.args(["--target", &direct.local_addr()?.to_string()]);
        }
        if let Some(pod) = &node_pod {
            cmd.args(["--pod-name", pod, "--pod-namespace", NODE_NAMESPACE]);
        }
        cmd.args(&spec.node_args);
        let node_command: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let node = NodeAgent::spawn(&node_command, admin_port, ca_dir, port)?;
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
        let bundle = format!("{}{}", sim.ca_pem(), node.ca_pem());
        let credentials = InClusterCredentials::write(
            work.path().join("serviceaccount"),
            SERVICE_IP,
            &token,
            &bundle,
            &spec.namespace,
        )?;
        Ok(World {
            runtime,
            sim,
            netns,
            agent_cgroup,
            node,
            work,
            token,
            credentials,
            pod_uid,
            bpffs,
            direct,
            node_command,
            _bpffs_mount: bpffs_mount,
            _subtree: subtree,
        })
    }

    /// Stops the node agent (SIGTERM, drain; a no-op when it already
    /// exited) and starts it again with the same flags, CA and state
    /// directories.
    pub fn restart_node(&mut self) -> Result<()> {
        self.node.stop();
        let node = NodeAgent::spawn(
            &self.node_command,
            self.node.admin_port,
            self.node.ca_dir.clone(),
            self.node.port,
        )?;
        self.node = node;
        Ok(())
    }

    /// A second node agent beside the running one on this node (the surge
    /// pod of a rolling update, or a re-created DaemonSet's pod): the same
    /// flags, bpffs and proxy port, its own admin port, and `--pod-name
    /// pod` when given.
    pub fn node_beside(&self, pod: Option<&str>) -> Result<NodeAgent> {
        let admin_port = free_port(Ipv4Addr::LOCALHOST)?;
        let mut command = self.node_command.clone();
        let mut i = 0;
        while i + 1 < command.len() {
            if command[i] == "--admin-addr" {
                command[i + 1] = format!("127.0.0.1:{admin_port}").into();
            }
            if command[i] == "--pod-name"
                && let Some(pod) = pod
            {
                command[i + 1] = pod.into();
            }
            i += 1;
        }
        NodeAgent::spawn(
            &command,
            admin_port,
            self.node.ca_dir.clone(),
            self.node.port,
        )
    }

    /// A person (not an agent) with a static token: `kubectl` on the host
    /// with their own kubeconfig, and the `kubectl-chaperone` plugin on
    /// PATH. `groups` come on top of `system:authenticated`.
    pub fn person(&self, username: &str, groups: &[&str]) -> Result<Person> {
        let token = format!("person-{username}-{}", uuid::Uuid::new_v4().simple());
        let mut all: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        all.push("system:authenticated".into());
        self.sim.add_static_token(
            &token,
            crate::sim::UserInfo {
                username: username.into(),
                uid: String::new(),
                groups: all,
                extra: Default::default(),
            },
        );
        let home = self.work.path().join(format!("person-{username}"));
        std::fs::create_dir_all(&home)?;
        let kubeconfig = home.join("config");
        self.sim.write_kubeconfig(&kubeconfig, &token)?;
        Ok(Person { home, kubeconfig })
    }

    pub fn agent(&self) -> Placement<'_> {
        Placement {
            cgroup: &self.agent_cgroup,
            netns: &self.netns,
        }
    }

    /// Everything pinned in this world's bpffs instance (relative paths).
    pub fn bpffs_pins(&self) -> Vec<String> {
        self._bpffs_mount.pins()
    }

    /// A cgroup of this node that is not an agent's (a system service).
    pub fn unlabeled_cgroup(&self, name: &str) -> Result<Cgroup> {
        self._subtree.child(format!("system.slice/{name}.scope"))
    }

    /// Starts a new node agent with the same arguments plus `extra` (the
    /// previous one must have exited) and waits until it is ready.
    pub fn restart_node_with(&mut self, extra: &[&str]) -> Result<()> {
        self.node_command.extend(extra.iter().map(Into::into));
        self.restart_node()
    }

    /// `kubectl ARGS` inside the agent pod, as an in-cluster client.
    pub fn agent_kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = self
            .agent()
            .in_cluster_command(&self.credentials, "kubectl");
        cmd.args(args);
        cmd
    }

    /// `kubectl ARGS` straight at the simulator with the same token (the
    /// reference a proxied run must match).
    pub fn direct_kubectl(&self, args: &[&str]) -> Command {
        let home = self.work.path().join("direct-home");
        let _ = std::fs::create_dir_all(&home);
        let kubeconfig = home.join("config");
        if !kubeconfig.exists() {
            self.sim
                .write_kubeconfig(&kubeconfig, &self.token)
                .expect("write the direct kubeconfig");
        }
        let mut cmd = Command::new("kubectl");
        cmd.args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", &home)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }
}

/// A person at a terminal on the host, with their own kubeconfig.
pub struct Person {
    pub home: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Person {
    /// `kubectl ARGS` (so `kubectl chaperone ...` runs the plugin).
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let plugin_dir = workspace_binary("kubectl-chaperone")
            .parent()
            .expect("target dir")
            .to_path_buf();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![plugin_dir];
        paths.extend(std::env::split_paths(&path));
        let mut cmd = Command::new("kubectl");
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .env("PATH", std::env::join_paths(paths).expect("PATH"))
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }
}

/// Runs a command with a deadline; the output, or the timeout as an error.
pub fn run_for(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output()?;
            bail!(
                "{cmd:?} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where the node agent's DaemonSet and pods live.
pub const NODE_NAMESPACE: &str = "chaperone-system";
/// The node agent's DaemonSet.
pub const NODE_DAEMONSET: &str = "chaperone-node";

/// Creates the DaemonSet `chaperone-system/chaperone-node` and, as its
/// controller would, its pod on `node`: the pod's name.
pub fn create_node_pod(sim: &SimHandle, node: &str) -> Result<String> {
    let labels = serde_json::json!({"app.kubernetes.io/name": NODE_DAEMONSET});
    let template_spec = serde_json::json!({
        "containers": [{"name": "chaperone", "image": "ghcr.io/chaperone-dev/chaperone:0.1.0", "args": ["node"]}],
        "hostNetwork": true,
        "serviceAccountName": "chaperone-node",
    });
    let daemonset = sim
        .store()
        .create(serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": NODE_DAEMONSET, "namespace": NODE_NAMESPACE, "labels": labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": template_spec},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            },
        }))
        .map_err(|e| anyhow::anyhow!("create the node agent's DaemonSet: {e:?}"))?;
    let uid = daemonset["metadata"]["uid"].as_str().unwrap_or_default();
    let mut spec = template_spec;
    spec["nodeName"] = node.into();
    let pod = sim
        .store()
        .create(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": format!("{NODE_DAEMONSET}-"),
                "namespace": NODE_NAMESPACE,
                "labels": labels,
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "name": NODE_DAEMONSET,
                    "uid": uid,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": spec,
        }))
        .map_err(|e| anyhow::anyhow!("create the node agent's pod: {e:?}"))?;
    Ok(pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0))?;
    Ok(listener.local_addr()?.port())
}

/// What a [`json_receiver`] got: every JSON body it accepted, in order.
pub type Received = Arc<Mutex<Vec<serde_json::Value>>>;

/// An HTTP webhook on 127.0.0.1 (audit sink, notification receiver) that
/// answers 503 to its first `fail_first` posts, then 200, keeping every
/// JSON body it accepted. Returns its port.
pub fn json_receiver(runtime: &tokio::runtime::Runtime, fail_first: usize) -> (u16, Received) {
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let received: Received = Arc::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a webhook receiver on 127.0.0.1");
    let port = listener.local_addr().expect("a bound port").port();
    let store = received.clone();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            let attempts = attempts.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    let attempts = attempts.clone();
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        let code = if attempts.fetch_add(1, Ordering::SeqCst) < fail_first {
                            503
                        } else {
                            let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                                panic!("the webhook got no JSON ({e}): {body:?}")
                            });
                            store.lock().unwrap_or_else(|p| p.into_inner()).push(value);
                            200
                        };
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(code)
                                .body(Full::new(Bytes::new()))
                                .expect("a bodiless response"),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, received)
}
