//! `cargo xtask cluster up|down|status`: a real one-node Kubernetes cluster
//! on this machine, for the tests that need what only a real node has (the
//! kubelet's cgroups and projected tokens, exec and logs through a kubelet,
//! kube-proxy's iptables rules, a DaemonSet).
//!
//! - kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
//!   kube-proxy v1.20.2 built from Debian's source (`kube::CONTROL_PLANE`,
//!   `kube::NODE`), etcd from Debian;
//! - containerd, runc and the CNI plugins from Debian, containerd started
//!   with its own configuration and socket;
//! - images assembled here (no registry is reachable): the pause container
//!   compiled from the Kubernetes source, an agent image (busybox and a
//!   static kubectl), loaded with `ctr images import`.
//!
//! Everything lives under one directory ([`STATE`], or
//! `$CHAPERONE_CLUSTER_DIR`): certificates, kubeconfigs, etcd's data, the
//! kubelet's and containerd's roots, logs, pid files, and `host/`, what
//! `up` found on the host before it changed it, which `down` restores:
//! sysctls, iptables chains, network namespaces, the bridge, mounts,
//! cgroups, processes. Addresses stay clear of the tests': services in
//! 10.32.0.0/16, pods in 10.244.0.0/24 on the bridge `chap0` (whose
//! 10.244.0.1 is the node's address), the API server on 10.244.0.1:16443.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Subcommand;

use crate::{kube, setup};

/// Where all of the cluster's state lives.
pub const STATE: &str = "/var/lib/chaperone-cluster";
pub const STATE_ENV: &str = "CHAPERONE_CLUSTER_DIR";
/// The images, cached across `down` (rebuilt when their recipe changes).
const IMAGE_CACHE: &str = "/var/cache/chaperone/cluster-images";
/// The bridge the pods are on; its address is the node's.
const BRIDGE: &str = "chap0";
pub const NODE_IP: &str = "10.244.0.1";
const POD_SUBNET: &str = "10.244.0.0/24";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Clear of the tests' 10.96.0.0/12 and their netns subnets 10.100-199.x.
const SERVICE_CIDR: &str = "10.32.0.0/16";
pub const SERVICE_IP: &str = "10.32.0.1";
pub const API_PORT: u16 = 16443;
const ETCD_CLIENT: &str = "http://127.0.0.1:12379";
const ETCD_PEER: &str = "http://127.0.0.1:12380";
const FEATURE_GATES: &str = "BoundServiceAccountTokenVolume=true";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const PAUSE_IMAGE: &str = "chaperone.local/pause:3.2";
pub const AGENT_IMAGE: &str = "chaperone.local/agent:1";
/// Bump when an image's contents change (2: the agent image's /tmp is
/// writable by its user, as a real image's is).
const IMAGE_RECIPE: u32 = 2;
/// Debian packages the node needs.
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "busybox-static",
    "openssl",
    "gcc",
    "libc6-dev",
];
/// The host sysctls the kubelet and kube-proxy (or the CNI bridge) may
/// change: recorded before `up`, restored by `down`.
const SYSCTLS: &[&str] = &[
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
];
/// The iptables tables whose chains `down` compares with what `up` found.
const TABLES: &[&str] = &["filter", "nat", "mangle"];
/// Directories outside [`STATE`] that containerd, runc and the CNI plugins
/// create at fixed paths; `down` removes those `up` did not find. Not
/// /run/netns, where the pods' namespaces are: the tests make theirs there
/// too, and `down` removes only the `cni-*` ones `up` did not find.
/// /var/lib/chaperone is the node agent's hostPath (recordings, audit spool).
const FIXED_DIRS: &[&str] = &[
    "/run/containerd",
    "/var/lib/cni",
    "/opt/cni",
    "/opt/containerd",
    "/var/lib/chaperone",
];
/// Where a node has its BPF filesystem; the DaemonSet pins there.
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Subcommand, Clone, Copy)]
pub enum Action {
    /// Build (or find cached) everything, then start the cluster and wait
    /// for a Ready node running a pod; idempotent.
    Up,
    /// Stop the cluster and restore what `up` changed on the host.
    Down,
    /// Say what runs and what `up` changed.
    Status,
    /// Deploy chaperone as users do, on the running cluster: its image
    /// from the built binary, `kubectl apply -k` of deploy/ with the local
    /// image name as the only change, `deploy/bootstrap-certs.sh`, the
    /// labeled namespace `agents` and an agent Deployment there.
    Deploy {
        /// Use the debug binary (quicker to build) instead of the release one.
        #[arg(long)]
        debug: bool,
    },
    /// The real-cluster tier: up, deploy, `cargo test --test cluster`
    /// with CHAPERONE_CLUSTER=1, then down (even when a test fails).
    Test {
        /// Use the debug binary for chaperone's image.
        #[arg(long)]
        debug: bool,
        /// Leave the cluster up afterwards (for looking around).
        #[arg(long)]
        keep: bool,
    },
}

pub fn run(root: &Path, action: Action) -> Result<()> {
    match action {
        Action::Up => up(),
        Action::Down => down(),
        Action::Status => status(),
        Action::Deploy { debug } => deploy(root, debug),
        Action::Test { debug, keep } => tier(root, debug, keep),
    }
}

/// up, deploy, the tier, down: what `cargo xtask cluster test` runs, and
/// `cargo xtask test` (CI) after the rest of the suite. Down runs even
/// when a step failed, unless `keep`.
pub fn tier(root: &Path, debug: bool, keep: bool) -> Result<()> {
    let started = Instant::now();
    let mut tally = TierTally::default();
    let result = up().and_then(|()| deploy(root, debug)).and_then(|()| {
        // The tier's test binary, and the README's verify block runs
        // `kubectl chaperone`: the plugin the tests put on PATH
        // (target/debug, beside the test binary).
        crate::cargo(root, DEBUG_BUILD)?;
        println!("==> the real-cluster tier (tests/tests/cluster.rs)");
        // Known gaps, if any: tests that fail today and say why (run by
        // hand with `-- --include-ignored known_gap_`). Removal (`kubectl
        // delete -k`) ends chaperone on the cluster: it runs last, by itself.
        run_tier(
            root,
            &["--skip", "known_gap_", "--skip", "removal_"],
            &mut tally,
        )?;
        println!("==> the real-cluster tier, last: removing chaperone as users do");
        run_tier(root, &["removal_"], &mut tally)
    });
    if keep {
        println!("    --keep: the cluster stays up; `cargo xtask cluster down` when done");
    } else if let Err(e) = down() {
        println!("    cluster down failed: {e:#}");
    }
    println!(
        "xtask: real-cluster tier: {} passed, {} failed on a one-node Kubernetes {} cluster; {} \
         in {:.0} s (up, deploy, tier{})",
        tally.passed,
        tally.failed,
        kube::KUBE_VERSION,
        if result.is_ok() { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        if keep { "" } else { ", down" }
    );
    result
}

/// The debug build of what the tier runs: chaperone's binaries (built for
/// its integration test `gate`, as for every integration test of the
/// package) and the tier's test binary, selected from the whole workspace
/// as `cargo xtask test`'s `cargo test --workspace` selects them, so that
/// features unify alike and after the suite every unit is fresh (building
/// one package resolves other features: kube, chaperone and its eBPF
/// object were rebuilt, about 100 s in CI).
const DEBUG_BUILD: &[&str] = &[
    "test",
    "--workspace",
    "--no-run",
    "--test",
    "cluster",
    "--test",
    "gate",
];

/// `cargo test --test cluster` with the tier's environment, one test at a
/// time (the scenarios share one node and its agents: a pod another test is
/// creating would be "not guarded yet" in the status check), its output
/// passed through and counted.
fn run_tier(root: &Path, filter: &[&str], tally: &mut TierTally) -> Result<()> {
    let mut args = vec![
        "test",
        "--workspace",
        "--test",
        "cluster",
        "--",
        "--include-ignored",
        "--test-threads=1",
        // What passing tests measured (the rolling update's gap) is in
        // CI's log too.
        "--show-output",
    ];
    args.extend_from_slice(filter);
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .current_dir(root)
        .env("CHAPERONE_CLUSTER", "1")
        .env(STATE_ENV, state_dir())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        tally.count(&line);
    }
    let status = child.wait()?;
    ensure!(
        status.success(),
        "the real-cluster tier failed (cargo test's output is above)"
    );
    Ok(())
}

/// The tier's `test NAME ... ok` and `... FAILED` lines.
#[derive(Default)]
struct TierTally {
    passed: usize,
    failed: usize,
}

impl TierTally {
    fn count(&mut self, line: &str) {
        let Some((_, outcome)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.split_once(" ... "))
        else {
            return;
        };
        match outcome.trim() {
            "ok" => self.passed += 1,
            "FAILED" => self.failed += 1,
            _ => {}
        }
    }
}

pub fn state_dir() -> PathBuf {
    std::env::var_os(STATE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(STATE))
}

/// The admin kubeconfig `up` writes.
pub fn kubeconfig() -> PathBuf {
    state_dir().join("admin.kubeconfig")
}

fn need_root(what: &str) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "`cargo xtask cluster {what}` needs root: it starts a kubelet and containerd and changes \
             iptables and sysctls. Run it as root (sudo -E cargo xtask cluster {what})"
        );
    }
    Ok(())
}

// === up ===

fn up() -> Result<()> {
    let started = Instant::now();
    need_root("up")?;
    let state = state_dir();
    println!(
        "==> cluster up: a one-node cluster, state in {} (override with ${STATE_ENV})",
        state.display()
    );
    let images = prepare()?;
    let bin = kube::bin_dir(&kube::cache_dir());

    fs::create_dir_all(state.join("host"))?;
    record_host(&state)?;
    let node = node_name()?;
    pki(&state, &node)?;
    write_configs(&state, &node)?;
    bridge()?;
    bpffs(&state)?;

    let p = Procs::new(&state, &bin);
    p.start("etcd", etcd_args(&state))?;
    p.start("kube-apiserver", apiserver_args(&state))?;
    wait_for("the API server to be ready", 60, || {
        Ok(kubectl(&["get", "--raw", "/readyz"])?.0)
    })?;
    p.start("kube-controller-manager", controller_manager_args(&state))?;
    p.start("kube-scheduler", scheduler_args(&state))?;
    p.start(
        "containerd",
        vec![
            "--config".into(),
            path(&state.join("containerd/config.toml")),
        ],
    )?;
    wait_for("containerd's socket", 30, || {
        Ok(ctr(&state, &["version"]).is_ok())
    })?;
    for image in &images {
        import_image(&state, image)?;
    }
    p.start("kubelet", kubelet_args(&state, &node))?;
    p.start(
        "kube-proxy",
        vec!["--config".into(), path(&state.join("kube-proxy.yaml"))],
    )?;
    wait_for("the node to be Ready", 120, || {
        let (ok, out) = kubectl(&[
            "get",
            "node",
            &node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])?;
        Ok(ok && out.trim() == "True")
    })?;
    wait_for("the default service account", 60, || {
        Ok(kubectl(&["get", "serviceaccount", "default", "-n", "default"])?.0)
    })?;
    smoke_pod()?;
    println!(
        "==> cluster up in {:.0} s: node {node} Ready, a pod reached the API server through \
         {SERVICE_IP}:443\n    export KUBECONFIG={}",
        started.elapsed().as_secs_f64(),
        kubeconfig().display()
    );
    Ok(())
}

/// Everything the cluster needs that is installed or built once, cached
/// and idempotent, each step saying what it installs or finds: the Debian
/// packages, the control plane and node binaries, the images. `up` runs it;
/// `cargo xtask test` runs it in its set-up, before the suite.
pub fn prepare() -> Result<Vec<Image>> {
    preflight()?;
    setup::apt_packages(PACKAGES)?;
    kube::ensure()?;
    kube::ensure_set(&kube::NODE)?;
    images()
}

/// What must hold before anything on the host changes.
fn preflight() -> Result<()> {
    ensure!(
        Path::new("/sys/fs/cgroup/memory").is_dir()
            || Path::new("/sys/fs/cgroup/cgroup.controllers").is_file(),
        "no cgroup hierarchy with the memory controller at /sys/fs/cgroup: the kubelet needs one"
    );
    ensure!(
        Path::new("/dev/kmsg").exists(),
        "/dev/kmsg is missing: the kubelet's OOM watcher reads it"
    );
    Ok(())
}

/// The node's name: the host name, as the kubelet would register it.
fn node_name() -> Result<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_lowercase();
    ensure!(!name.is_empty(), "this host has no host name");
    Ok(name)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

// === what `up` finds on the host, and `down` restores ===

/// Writes `host/` once: sysctls, iptables chains, network namespaces,
/// fixed directories. A second `up` (or one after a failed `up`) keeps the
/// first record: the host as it was before any `up`.
fn record_host(state: &Path) -> Result<()> {
    let host = state.join("host");
    let done = host.join("recorded");
    if done.exists() {
        println!(
            "    host state recorded by an earlier `up` ({}) kept",
            host.display()
        );
        return Ok(());
    }
    let mut sysctls = String::new();
    for key in SYSCTLS {
        if let Ok(v) = fs::read_to_string(Path::new("/proc/sys").join(key)) {
            sysctls.push_str(&format!("{key}={}\n", v.trim()));
        }
    }
    fs::write(host.join("sysctls"), sysctls)?;
    for (tool, tables) in iptables_tools() {
        let mut chains = String::new();
        for table in tables {
            for chain in iptables_chains(tool, table)? {
                chains.push_str(&format!("{table} {chain}\n"));
            }
        }
        fs::write(host.join(format!("{tool}-chains")), chains)?;
    }
    fs::write(host.join("nft-tables"), nft_tables().join("\n"))?;
    fs::write(host.join("netns"), netns_names().join("\n"))?;
    let existing: Vec<&str> = FIXED_DIRS
        .iter()
        .copied()
        .filter(|d| Path::new(d).exists())
        .collect();
    fs::write(host.join("dirs"), existing.join("\n"))?;
    fs::write(&done, "")?;
    println!(
        "    recorded the host's sysctls, iptables chains and directories in {}",
        host.display()
    );
    Ok(())
}

fn iptables_tools() -> Vec<(&'static str, &'static [&'static str])> {
    let mut tools = vec![("iptables", TABLES)];
    if Command::new("ip6tables")
        .arg("-L")
        .arg("-n")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        tools.push(("ip6tables", TABLES));
    }
    tools
}

fn iptables_chains(tool: &str, table: &str) -> Result<Vec<String>> {
    let out = Command::new(format!("{tool}-save"))
        .args(["-t", table])
        .output()
        .with_context(|| format!("cannot run {tool}-save (Debian: iptables)"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

fn netns_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// === certificates and configuration ===

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("cannot run openssl (Debian: openssl)")?;
    ensure!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The cluster's CA, the service-account key and one certificate per
/// component; made once, kept across `down` and `up`.
fn pki(state: &Path, node: &str) -> Result<()> {
    let dir = state.join("pki");
    fs::create_dir_all(&dir)?;
    let p = |name: &str| path(&dir.join(name));
    if !dir.join("ca.crt").is_file() {
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-subj",
            "/CN=chaperone-cluster-ca",
            "-days",
            "3650",
            "-out",
            &p("ca.crt"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ])?;
    }
    if !dir.join("sa.key").is_file() {
        openssl(&["genrsa", "-out", &p("sa.key"), "2048"])?;
        openssl(&["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])?;
    }
    let server_sans = format!(
        "IP:{NODE_IP},IP:{SERVICE_IP},IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:{node}"
    );
    let kubelet_sans = format!("IP:{NODE_IP},IP:127.0.0.1,DNS:{node},DNS:localhost");
    let node_cn = format!("system:node:{node}");
    let certs: [(&str, &str, Option<&str>, Option<&str>); 8] = [
        ("apiserver", "kube-apiserver", None, Some(&server_sans)),
        (
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            None,
        ),
        ("admin", "kubernetes-admin", Some("system:masters"), None),
        (
            "controller-manager",
            "system:kube-controller-manager",
            None,
            None,
        ),
        ("scheduler", "system:kube-scheduler", None, None),
        ("kubelet-client", &node_cn, Some("system:nodes"), None),
        ("kubelet", node, None, Some(&kubelet_sans)),
        ("kube-proxy", "system:kube-proxy", None, None),
    ];
    let mut made = 0;
    for (name, cn, org, sans) in certs {
        let crt = dir.join(format!("{name}.crt"));
        let stamp = dir.join(format!("{name}.subject"));
        let want = format!("{cn} {org:?} {sans:?}");
        if crt.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
            continue;
        }
        let subj = match org {
            Some(o) => format!("/O={o}/CN={cn}"),
            None => format!("/CN={cn}"),
        };
        let mut ext = String::from(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        );
        match sans {
            Some(s) => ext.push_str(&format!(
                "extendedKeyUsage=serverAuth\nsubjectAltName={s}\n"
            )),
            None => ext.push_str("extendedKeyUsage=clientAuth\n"),
        }
        let ext_file = dir.join(format!("{name}.ext"));
        fs::write(&ext_file, ext)?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p(&format!("{name}.key")),
            "-subj",
            &subj,
            "-out",
            &p(&format!("{name}.csr")),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-set_serial",
            &format!("0x{:x}", rand_serial()),
            "-days",
            "365",
            "-extfile",
            &path(&ext_file),
            "-out",
            &path(&crt),
        ])?;
        fs::write(&stamp, want)?;
        made += 1;
    }
    if made > 0 {
        println!("    made {made} certificates in {}", dir.display());
    }
    Ok(())
}

fn rand_serial() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
}

fn kubeconfig_text(state: &Path, user: &str) -> String {
    let pki = state.join("pki");
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: chaperone-cluster\n  cluster:\n    \
         certificate-authority: {ca}\n    server: https://{NODE_IP}:{API_PORT}\nusers:\n- name: {user}\n  \
         user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: chaperone-cluster\n  \
         context:\n    cluster: chaperone-cluster\n    user: {user}\ncurrent-context: chaperone-cluster\n",
        ca = pki.join("ca.crt").display(),
        crt = pki.join(format!("{user}.crt")).display(),
        key = pki.join(format!("{user}.key")).display(),
    )
}

fn write_configs(state: &Path, node: &str) -> Result<()> {
    let pki = state.join("pki");
    let pk = |n: &str| path(&pki.join(n));
    for user in [
        "admin",
        "controller-manager",
        "scheduler",
        "kubelet-client",
        "kube-proxy",
    ] {
        write_if_changed(
            state.join(format!("{user}.kubeconfig")),
            kubeconfig_text(state, user),
        )?;
    }
    // containerd: its own root, state and socket; runc through the v2 shim
    // with cgroupfs (no systemd here); the sandbox image assembled locally.
    // restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and the
    // sandbox's oomScoreAdj -998 would make runc fail ("can't get final
    // child's PID from pipe: EOF").
    let ctrd = state.join("containerd");
    fs::create_dir_all(&ctrd)?;
    let cni_conf = state.join("cni/net.d");
    fs::create_dir_all(&cni_conf)?;
    write_if_changed(
        ctrd.join("config.toml"),
        format!(
            r#"version = 2
root = "{root}"
state = "{run}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{sock}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            root = ctrd.join("root").display(),
            run = ctrd.join("state").display(),
            sock = ctrd.join("containerd.sock").display(),
            cni = cni_conf.display(),
        ),
    )?;
    // The pods' network: the bridge chap0 (made by `up`, its address the
    // pods' gateway), addresses from host-local kept under the state
    // directory, no masquerading (pods reach nothing but this host), and
    // not `isGateway`, which would turn on the host's ip_forward: pods
    // reach the node's own addresses, and the API server reaches them.
    write_if_changed(
        cni_conf.join("10-chaperone.conflist"),
        format!(
            r#"{{
  "cniVersion": "0.4.0",
  "name": "chaperone-cluster",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{ipam}",
        "ranges": [[{{"subnet": "{POD_SUBNET}", "rangeStart": "10.244.0.10", "gateway": "{NODE_IP}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}},
    {{"type": "loopback"}}
  ]
}}
"#,
            ipam = state.join("cni/ipam").display(),
        ),
    )?;
    // The kubelet: x509 and webhook authentication (not anonymous), webhook
    // authorization, as kubeadm configures it.
    write_if_changed(
        state.join("kubelet.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: {crt}
tlsPrivateKeyFile: {key}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: cluster.local
podCIDR: {POD_SUBNET}
resolvConf: /etc/resolv.conf
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
serializeImagePulls: false
fileCheckFrequency: 5s
syncFrequency: 10s
"#,
            crt = pk("kubelet.crt"),
            key = pk("kubelet.key"),
            ca = pk("ca.crt"),
        ),
    )?;
    // kube-proxy in iptables mode; conntrack settings left as the host has
    // them (0: do not change).
    write_if_changed(
        state.join("kube-proxy.yaml"),
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kc}
hostnameOverride: {node}
bindAddress: {NODE_IP}
clusterCIDR: {CLUSTER_CIDR}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  masqueradeBit: 14
  masqueradeAll: false
"#,
            kc = path(&state.join("kube-proxy.kubeconfig")),
        ),
    )?;
    Ok(())
}

/// Writes `text` unless the file already says it: kube-proxy exits when
/// its configuration file changes, so an idempotent `up` leaves it alone.
fn write_if_changed(file: impl AsRef<Path>, text: impl AsRef<str>) -> Result<()> {
    let file = file.as_ref();
    if fs::read_to_string(file).is_ok_and(|t| t == text.as_ref()) {
        return Ok(());
    }
    fs::write(file, text.as_ref()).with_context(|| format!("writing {}", file.display()))
}

/// /sys/fs/bpf as a node has it (systemd mounts it there): the node agent
/// pins its programs in it. Mounted when it is not; `down` unmounts it.
fn bpffs(state: &Path) -> Result<()> {
    let mounted = fs::read_to_string("/proc/mounts")?.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    setup::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    // Shared, as systemd mounts it: the DaemonSet's HostToContainer
    // propagation needs a shared or slave mount ("path /sys/fs/bpf is
    // mounted on /sys/fs/bpf but it is not a shared or slave mount").
    setup::run(Command::new("mount").args(["--make-shared", BPFFS]))?;
    fs::write(state.join("host/bpffs-mounted"), "")?;
    println!("    mounted a BPF filesystem at {BPFFS} (`down` unmounts it)");
    Ok(())
}

/// The bridge, made before the API server binds the node's address on it.
fn bridge() -> Result<()> {
    let exists = Command::new("ip")
        .args(["link", "show", BRIDGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if !exists {
        setup::run(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
    }
    let addrs = setup::output(Command::new("ip").args(["-4", "addr", "show", "dev", BRIDGE]))?;
    if !addrs.contains(&format!("inet {NODE_IP}/")) {
        setup::run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            BRIDGE,
        ]))?;
    }
    setup::run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))
}

// === the processes ===

fn etcd_args(state: &Path) -> Vec<String> {
    vec![
        "--name=chaperone-cluster".into(),
        format!("--data-dir={}", state.join("etcd").display()),
        format!("--listen-client-urls={ETCD_CLIENT}"),
        format!("--advertise-client-urls={ETCD_CLIENT}"),
        format!("--listen-peer-urls={ETCD_PEER}"),
        format!("--initial-advertise-peer-urls={ETCD_PEER}"),
        format!("--initial-cluster=chaperone-cluster={ETCD_PEER}"),
        "--logger=zap".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(state: &Path) -> Vec<String> {
    let pk = |n: &str| path(&state.join("pki").join(n));
    vec![
        format!("--etcd-servers={ETCD_CLIENT}"),
        format!("--bind-address={NODE_IP}"),
        format!("--advertise-address={NODE_IP}"),
        format!("--secure-port={API_PORT}"),
        "--insecure-port=0".into(),
        format!(
            "--cert-dir={}",
            state.join("pki/apiserver-generated").display()
        ),
        format!("--tls-cert-file={}", pk("apiserver.crt")),
        format!("--tls-private-key-file={}", pk("apiserver.key")),
        format!("--client-ca-file={}", pk("ca.crt")),
        format!(
            "--kubelet-client-certificate={}",
            pk("apiserver-kubelet-client.crt")
        ),
        format!(
            "--kubelet-client-key={}",
            pk("apiserver-kubelet-client.key")
        ),
        format!("--kubelet-certificate-authority={}", pk("ca.crt")),
        "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
        format!("--service-account-issuer={ISSUER}"),
        format!("--service-account-key-file={}", pk("sa.pub")),
        format!("--service-account-signing-key-file={}", pk("sa.key")),
        format!("--api-audiences={ISSUER}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        format!("--feature-gates={FEATURE_GATES}"),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        "--v=0".into(),
    ]
}

fn controller_manager_args(state: &Path) -> Vec<String> {
    let pk = |n: &str| path(&state.join("pki").join(n));
    let kc = path(&state.join("controller-manager.kubeconfig"));
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        "--port=0".into(),
        "--leader-elect=false".into(),
        "--use-service-account-credentials=true".into(),
        format!("--service-account-private-key-file={}", pk("sa.key")),
        format!("--root-ca-file={}", pk("ca.crt")),
        format!("--cluster-signing-cert-file={}", pk("ca.crt")),
        format!("--cluster-signing-key-file={}", pk("ca.key")),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        format!("--feature-gates={FEATURE_GATES}"),
        "--profiling=false".into(),
    ]
}

fn scheduler_args(state: &Path) -> Vec<String> {
    let kc = path(&state.join("scheduler.kubeconfig"));
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        "--port=0".into(),
        "--leader-elect=false".into(),
        "--profiling=false".into(),
    ]
}

fn kubelet_args(state: &Path, node: &str) -> Vec<String> {
    vec![
        format!("--config={}", state.join("kubelet.yaml").display()),
        format!(
            "--kubeconfig={}",
            state.join("kubelet-client.kubeconfig").display()
        ),
        "--container-runtime=remote".into(),
        format!(
            "--container-runtime-endpoint=unix://{}",
            state.join("containerd/containerd.sock").display()
        ),
        format!("--root-dir={}", state.join("kubelet").display()),
        format!("--node-ip={NODE_IP}"),
        format!("--hostname-override={node}"),
        "--v=1".into(),
    ]
}

/// The cluster's processes: started detached (`setsid`), each with a log
/// and a pid file under the state directory.
struct Procs {
    run: PathBuf,
    logs: PathBuf,
    bin: PathBuf,
}

/// Every process `up` starts, in the order `down` stops them.
const STOP_ORDER: &[&str] = &[
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubelet",
    "containerd",
    "kube-apiserver",
    "etcd",
];

impl Procs {
    fn new(state: &Path, bin: &Path) -> Procs {
        Procs {
            run: state.join("run"),
            logs: state.join("logs"),
            bin: bin.to_path_buf(),
        }
    }

    fn program(&self, name: &str) -> PathBuf {
        if name == "containerd" {
            PathBuf::from("/usr/bin/containerd")
        } else {
            self.bin.join(name)
        }
    }

    fn start(&self, name: &str, args: Vec<String>) -> Result<()> {
        fs::create_dir_all(&self.run)?;
        fs::create_dir_all(&self.logs)?;
        let program = self.program(name);
        if let Some(pid) = running(&self.run, name) {
            println!("    ok: {name} runs (pid {pid})");
            return Ok(());
        }
        let log_path = self.logs.join(format!("{name}.log"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new("setsid")
            .arg(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id();
        fs::write(self.run.join(format!("{name}.pid")), pid.to_string())?;
        fs::write(self.run.join(format!("{name}.exe")), path(&program))?;
        sleep(Duration::from_millis(300));
        if running(&self.run, name).is_none() {
            bail!(
                "{name} exited right after it started: its log {} says why (last lines:\n{})",
                log_path.display(),
                tail(&log_path, 15)
            );
        }
        println!("    started {name} (pid {pid}, log {})", log_path.display());
        Ok(())
    }
}

/// The pid of `name` if the process its pid file names still runs the
/// program `up` started.
fn running(run: &Path, name: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(run.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let exe = fs::read_to_string(run.join(format!("{name}.exe"))).ok()?;
    let actual = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    (actual == Path::new(exe.trim()) && !zombie).then_some(pid)
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop_pid(pid: u32, grace: Duration) {
    signal(pid, "-TERM");
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        signal(pid, "-KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
        }
    }
}

fn wait_for(what: &str, seconds: u64, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    loop {
        if check()? {
            println!("    ok: {what} ({:.1} s)", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(seconds) {
            bail!(
                "timed out after {seconds} s waiting for {what}: the logs in {} say why",
                state_dir().join("logs").display()
            );
        }
        sleep(Duration::from_millis(500));
    }
}

/// Runs kubectl with the admin kubeconfig: (succeeded, stdout).
pub fn kubectl(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .arg("--request-timeout=10s")
        .args(args)
        .output()
        .context("cannot run kubectl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

fn ctr(state: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(state.join("containerd/containerd.sock"))
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()
        .context("cannot run ctr (Debian: containerd)")?;
    ensure!(
        out.status.success(),
        "ctr {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod from the agent image reaches the API server through the service
/// address (kube-proxy's rules) with its projected token: the cluster
/// works end to end.
fn smoke_pod() -> Result<()> {
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: cluster-smoke
  namespace: default
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 0
  containers:
  - name: kubectl
    image: {AGENT_IMAGE}
    command: ["kubectl", "get", "--raw", "/version"]
"#
    );
    let _ = kubectl(&[
        "delete",
        "pod",
        "cluster-smoke",
        "-n",
        "default",
        "--wait=true",
        "--ignore-not-found",
    ]);
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig())
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = cmd.spawn()?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(manifest.as_bytes())?;
    ensure!(
        child.wait()?.success(),
        "kubectl apply of the smoke pod failed"
    );
    wait_for(
        "a pod to run and reach the API server from inside",
        90,
        || {
            let (_, phase) = kubectl(&[
                "get",
                "pod",
                "cluster-smoke",
                "-n",
                "default",
                "-o",
                "jsonpath={.status.phase}",
            ])?;
            match phase.trim() {
                "Succeeded" => Ok(true),
                "Failed" => {
                    let (_, logs) = kubectl(&["logs", "cluster-smoke", "-n", "default"])?;
                    bail!("the smoke pod failed; its log:\n{logs}")
                }
                _ => Ok(false),
            }
        },
    )?;
    let (ok, logs) = kubectl(&["logs", "cluster-smoke", "-n", "default"])?;
    ensure!(
        ok && logs.contains("v1.20.2"),
        "kubectl logs through the kubelet failed, or the pod's kubectl did not reach the API server: {logs}"
    );
    // BoundServiceAccountTokenVolume: the projected, pod-bound token.
    let (_, volumes) = kubectl(&[
        "get",
        "pod",
        "cluster-smoke",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.volumes[*].name}",
    ])?;
    ensure!(
        volumes.contains("kube-api-access-"),
        "the pod got volumes {volumes:?}, not the projected kube-api-access-* token volume: the \
         BoundServiceAccountTokenVolume feature gate is not in effect"
    );
    println!(
        "    ok: the pod's kubectl reached the API server with its projected token (volume {}); \
         its log read through the kubelet",
        volumes.trim()
    );
    let _ = kubectl(&[
        "delete",
        "pod",
        "cluster-smoke",
        "-n",
        "default",
        "--wait=false",
    ]);
    Ok(())
}

// === images ===

pub struct Image {
    name: &'static str,
    tarball: PathBuf,
}

/// The pause and agent images, built once into [`IMAGE_CACHE`].
fn images() -> Result<Vec<Image>> {
    let cache = PathBuf::from(IMAGE_CACHE);
    fs::create_dir_all(&cache)?;
    let stamp = cache.join("stamp");
    let want = format!("recipe {IMAGE_RECIPE}\n{PAUSE_IMAGE}\n{AGENT_IMAGE}\n");
    let pause = cache.join("pause.tar");
    let agent = cache.join("agent.tar");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == want) && pause.is_file() && agent.is_file() {
        println!("    ok: images cached in {}", cache.display());
    } else {
        let _ = fs::remove_file(&stamp);
        let work = cache.join("work");
        if work.exists() {
            fs::remove_dir_all(&work)?;
        }
        fs::create_dir_all(&work)?;
        build_pause(&work, &pause)?;
        build_agent(&work, &agent)?;
        fs::remove_dir_all(&work)?;
        fs::write(&stamp, want)?;
    }
    Ok(vec![
        Image {
            name: PAUSE_IMAGE,
            tarball: pause,
        },
        Image {
            name: AGENT_IMAGE,
            tarball: agent,
        },
    ])
}

/// The pause container from the Kubernetes source (build/pause/linux),
/// compiled static as upstream's Dockerfile does.
fn build_pause(work: &Path, out: &Path) -> Result<()> {
    let cache = kube::cache_dir().join("src");
    let tarball = fs::read_dir(&cache)
        .with_context(|| format!("{} missing: run `cargo xtask kube` first", cache.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".orig.tar.gz"))
        .context("the Kubernetes source tarball is missing: run `cargo xtask kube`")?;
    let src = work.join("pause-src");
    fs::create_dir_all(&src)?;
    setup::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .args([
                "--strip-components=4",
                "kubernetes-1.20.2/build/pause/linux/pause.c",
            ]),
    )?;
    let rootfs = work.join("pause-rootfs");
    fs::create_dir_all(&rootfs)?;
    setup::run(
        Command::new("gcc")
            .args([
                "-Os",
                "-Wall",
                "-Werror",
                "-static",
                "-DVERSION=v3.2-chaperone",
                "-o",
            ])
            .arg(rootfs.join("pause"))
            .arg(src.join("pause.c")),
    )
    .context("compiling pause.c failed (Debian: gcc libc6-dev)")?;
    let _ = Command::new("strip").arg(rootfs.join("pause")).status();
    docker_archive(
        work,
        &rootfs,
        PAUSE_IMAGE,
        r#"{"Entrypoint":["/pause"],"User":"65535:65535"}"#,
        out,
    )?;
    println!("    built {PAUSE_IMAGE} from the Kubernetes source's pause.c");
    Ok(())
}

/// A static kubectl next to the one on PATH: the oldest release the
/// machine has (closest to the 1.20 server), or the one on PATH itself.
fn static_kubectl() -> Result<PathBuf> {
    let on_path = setup::output(Command::new("sh").args(["-c", "command -v kubectl"]))?;
    let real = fs::canonicalize(on_path.trim()).context("kubectl is not installed")?;
    let dir = real.parent().context("kubectl's directory")?;
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let minor = name.strip_prefix("kubectl.1.")?.parse().ok()?;
            Some((minor, e.path()))
        })
        .collect();
    versioned.sort();
    let candidates = versioned.into_iter().map(|(_, p)| p).chain([real]);
    for c in candidates {
        let file = setup::output(Command::new("file").arg("-L").arg(&c)).unwrap_or_default();
        if file.contains("statically linked") {
            return Ok(c);
        }
    }
    bail!("no statically linked kubectl found next to the one on PATH: the agent image needs one")
}

/// busybox (sh and the usual tools) and a static kubectl.
fn build_agent(work: &Path, out: &Path) -> Result<()> {
    let rootfs = work.join("agent-rootfs");
    for d in ["bin", "usr/local/bin", "etc", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    // The agent's HOME (kubectl's cache) and the tier's scratch files: the
    // agent user writes there, as in any image.
    fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("/bin/busybox missing (Debian: busybox-static)")?;
    for applet in [
        "sh", "cat", "ls", "sleep", "echo", "env", "grep", "head", "tail", "wc", "id", "ps", "nc",
        "wget", "timeout", "true", "false", "test", "sed", "date", "mkdir", "rm",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    let kubectl = static_kubectl()?;
    fs::copy(&kubectl, rootfs.join("usr/local/bin/kubectl"))?;
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/tmp:/bin/sh\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nagent:x:1000:\n")?;
    docker_archive(
        work,
        &rootfs,
        AGENT_IMAGE,
        r#"{"Cmd":["sleep","infinity"],"Env":["PATH=/usr/local/bin:/bin","HOME=/tmp"],"User":"1000:1000","WorkingDir":"/tmp"}"#,
        out,
    )?;
    println!("    built {AGENT_IMAGE} (busybox, {})", kubectl.display());
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String> {
    let out = setup::output(Command::new("sha256sum").arg(p))?;
    Ok(out.split_whitespace().next().unwrap_or("").to_string())
}

/// A one-layer image in the format `docker save` writes, which `ctr images
/// import` reads: `manifest.json`, the config, the layer tar.
pub fn docker_archive(
    work: &Path,
    rootfs: &Path,
    name: &str,
    config: &str,
    out: &Path,
) -> Result<()> {
    let dir = work.join(format!("archive-{}", name.replace(['/', ':'], "_")));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let layer = dir.join("layer.tar");
    setup::run(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "-cf",
            ])
            .arg(&layer)
            .arg("-C")
            .arg(rootfs)
            .arg("."),
    )?;
    let diff_id = sha256_file(&layer)?;
    fs::create_dir_all(dir.join(&diff_id))?;
    fs::rename(&layer, dir.join(&diff_id).join("layer.tar"))?;
    let config_json = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{config},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}},"history":[{{"created_by":"chaperone cargo xtask cluster"}}]}}"#
    );
    let config_path = dir.join("config.json");
    fs::write(&config_path, &config_json)?;
    let config_id = sha256_file(&config_path)?;
    fs::rename(&config_path, dir.join(format!("{config_id}.json")))?;
    fs::write(
        dir.join("manifest.json"),
        format!(
            r#"[{{"Config":"{config_id}.json","RepoTags":["{name}"],"Layers":["{diff_id}/layer.tar"]}}]"#
        ),
    )?;
    setup::run(
        Command::new("tar")
            .arg("-cf")
            .arg(out)
            .arg("-C")
            .arg(&dir)
            .args(["manifest.json", &format!("{config_id}.json"), &diff_id]),
    )?;
    fs::remove_dir_all(&dir)?;
    Ok(())
}

fn import_image(state: &Path, image: &Image) -> Result<()> {
    let listed = ctr(state, &["images", "ls", "-q"])?;
    let stamp = state
        .join("run")
        .join(format!("image-{}", image.name.replace(['/', ':'], "_")));
    let digest = sha256_file(&image.tarball)?;
    if listed.lines().any(|l| l == image.name)
        && fs::read_to_string(&stamp).is_ok_and(|s| s == digest)
    {
        println!("    ok: {} loaded", image.name);
        return Ok(());
    }
    ctr(state, &["images", "import", &path(&image.tarball)])?;
    fs::write(&stamp, digest)?;
    println!("    loaded {} into containerd", image.name);
    Ok(())
}

// === chaperone, deployed as users deploy it ===

/// The namespace the agents run in (labeled for interception).
pub const AGENT_NAMESPACE: &str = "agents";
/// The agent Deployment: its service account is one the shipped
/// read-only policy selects (`agents/reader`).
pub const AGENT_DEPLOYMENT: &str = "reader";
/// The image name in deploy/base/kustomization.yaml that overlays rename.
const CHAPERONE_IMAGE: &str = "chaperone.local/chaperone";

fn deploy(root: &Path, debug: bool) -> Result<()> {
    need_root("deploy")?;
    let started = Instant::now();
    let state = state_dir();
    ensure!(
        running(&state.join("run"), "kubelet").is_some()
            && kubectl(&["get", "--raw", "/readyz"])?.0,
        "the cluster is not up: run `cargo xtask cluster up` first"
    );
    println!("==> cluster deploy: chaperone as users deploy it (kubectl apply -k deploy/...)");
    // 1. The binary and its image (the local equivalent of deploy/Dockerfile).
    let profile = if debug { "debug" } else { "release" };
    if debug {
        crate::cargo(root, DEBUG_BUILD)?;
    } else {
        crate::cargo(
            root,
            &[
                "build",
                "--release",
                "--package",
                "chaperone",
                "--bin",
                "chaperone",
            ],
        )?;
    }
    let binary = root.join("target").join(profile).join("chaperone");
    let tag = sha256_file(&binary)?[..12].to_string();
    let name: &'static str = Box::leak(format!("{CHAPERONE_IMAGE}:{tag}").into_boxed_str());
    let images = state.join("images");
    fs::create_dir_all(&images)?;
    let tarball = images.join(format!("chaperone-{tag}.tar"));
    if !tarball.is_file() {
        build_chaperone_image(&images, &binary, name, &tarball)?;
    }
    import_image(
        &state,
        &Image {
            name,
            tarball: tarball.clone(),
        },
    )?;
    // 2. The images the manifests name (the shipped chaperone image, the
    //    README's example agent), loaded under those very names: no
    //    registry is reachable, and nothing else in the manifests changes.
    for (source, wanted) in [
        (name, manifest_chaperone_image(root)?),
        (AGENT_IMAGE, manifest_agent_image(root)?),
    ] {
        ctr(&state, &["images", "tag", "--force", source, &wanted])?;
        println!("    {wanted} is {source} (loaded, not pulled)");
    }
    // 3. What `down` deletes first (`kubectl delete -k`, as users remove
    //    chaperone), written before anything is applied: the overlay the
    //    quickstart applies.
    let overlay = state.join("deploy");
    fs::create_dir_all(&overlay)?;
    write_if_changed(
        overlay.join("kustomization.yaml"),
        format!(
            "# Written by `cargo xtask cluster deploy`: what the README's quickstart applied, for\n\
             # `cargo xtask cluster down` to delete first.\n\
             apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n",
            relative_from(&overlay, &root.join("deploy/overlays/k8s-1.20"))
        ),
    )?;
    // 4. The README's quickstart, line by line, as a newcomer runs it.
    for line in readme_block(root, QUICKSTART_INSTALL)? {
        run_readme_line(root, &line)?;
    }
    println!(
        "==> chaperone deployed in {:.0} s by the README's quickstart (image {name}); agent pods: \
         kubectl -n {AGENT_NAMESPACE} get pods -l app={AGENT_DEPLOYMENT}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `to` as a path relative to the directory `from` (both absolute):
/// kustomize refuses absolute resource paths.
fn relative_from(from: &Path, to: &Path) -> String {
    let up = from.components().count().saturating_sub(1);
    let mut rel = "../".repeat(up);
    rel.push_str(to.to_string_lossy().trim_start_matches('/'));
    rel
}

/// The README's marked quickstart blocks (`<!-- quickstart:NAME ... -->`
/// before a fenced block): `deploy` runs the install block, the tier's
/// `the_readme_quickstart_verifies_as_written` the verify block.
pub const QUICKSTART_INSTALL: &str = "install";

/// The lines of the README's fenced block marked `<!-- quickstart:NAME`.
pub fn readme_block(root: &Path, name: &str) -> Result<Vec<String>> {
    let readme = fs::read_to_string(root.join("README.md"))?;
    let marker = format!("<!-- quickstart:{name}");
    let at = readme
        .find(&marker)
        .with_context(|| format!("README.md has no block marked {marker}"))?;
    let lines: Vec<String> = readme[at..]
        .lines()
        .skip_while(|l| !l.starts_with("```"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(!lines.is_empty(), "README.md's {marker} block is empty");
    Ok(lines)
}

/// The command of a README line (its `# comment` dropped), as this 1.20
/// cluster needs it: `kubectl apply -k deploy/` is the 1.20 overlay, as
/// the line's comment says.
pub fn readme_command(line: &str) -> String {
    let command = line.split(" #").next().unwrap_or(line).trim();
    if command == "kubectl apply -k deploy/" {
        "kubectl apply -k deploy/overlays/k8s-1.20".into()
    } else {
        command.into()
    }
}

/// One line of the README's install block, run by `sh` in the checkout
/// with the admin kubeconfig. `kubectl create namespace` of one that is
/// there already (a second `deploy`) is what the line's comment allows.
fn run_readme_line(root: &Path, line: &str) -> Result<()> {
    let command = readme_command(line);
    println!("    README$ {command}");
    let out = Command::new("sh")
        .args(["-c", &command])
        .current_dir(root)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .context("cannot run sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stdout.lines().chain(stderr.lines()) {
        println!("      {l}");
    }
    if !out.status.success() {
        ensure!(
            command.starts_with("kubectl create namespace") && stderr.contains("AlreadyExists"),
            "the README's quickstart line `{command}` failed ({}): fix the README or the code, \
             they must agree",
            out.status
        );
    }
    Ok(())
}

/// The chaperone image `deploy/base/kustomization.yaml` names.
fn manifest_chaperone_image(root: &Path) -> Result<String> {
    let text = fs::read_to_string(root.join("deploy/base/kustomization.yaml"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().trim_matches('"').to_string())
            .with_context(|| format!("deploy/base/kustomization.yaml has no `{key}`"))
    };
    Ok(format!("{}:{}", field("newName:")?, field("newTag:")?))
}

/// The image of the README's example agent.
fn manifest_agent_image(root: &Path) -> Result<String> {
    let text = fs::read_to_string(root.join("deploy/examples/reader-agent.yaml"))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("image:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("deploy/examples/reader-agent.yaml names no image")
}

/// chaperone's image: the binary, the shared libraries it links (as
/// distroless/cc provides them), and the nonroot user, as deploy/Dockerfile
/// builds it for registries.
fn build_chaperone_image(work: &Path, binary: &Path, name: &str, out: &Path) -> Result<()> {
    let rootfs = work.join("chaperone-rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs)?;
    }
    for d in ["usr/local/bin", "etc", "tmp"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::copy(binary, rootfs.join("usr/local/bin/chaperone"))?;
    let ldd = setup::output(Command::new("ldd").arg(binary))?;
    for lib in ldd
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let target = rootfs.join(lib.trim_start_matches('/'));
        fs::create_dir_all(target.parent().expect("a library's directory"))?;
        fs::copy(fs::canonicalize(lib)?, &target)?;
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n")?;
    docker_archive(
        work,
        &rootfs,
        name,
        r#"{"Entrypoint":["/usr/local/bin/chaperone"],"User":"65532:65532"}"#,
        out,
    )?;
    fs::remove_dir_all(&rootfs)?;
    println!("    built {name} from {}", binary.display());
    Ok(())
}

// === down ===

fn down() -> Result<()> {
    need_root("down")?;
    let started = Instant::now();
    let state = state_dir();
    println!(
        "==> cluster down: stopping the cluster in {}, restoring the host",
        state.display()
    );
    if !state.join("host/recorded").exists() && !state.join("run").exists() {
        println!("    nothing to do: no cluster was brought up here");
        return Ok(());
    }
    let run = state.join("run");
    let bin = kube::bin_dir(&kube::cache_dir());
    // 0. chaperone, removed as users remove it: the node agent sees its
    //    DaemonSet go and detaches its programs.
    let overlay = state.join("deploy");
    if overlay.join("kustomization.yaml").is_file()
        && running(&run, "kube-apiserver").is_some()
        && running(&run, "kubelet").is_some()
    {
        let (ok, out) = kubectl(&[
            "delete",
            "-k",
            &path(&overlay),
            "--ignore-not-found",
            "--wait=true",
            "--timeout=100s",
        ])?;
        println!(
            "    kubectl delete -k {}: {}",
            overlay.display(),
            if ok { "done" } else { out.trim() }
        );
    }
    // 1. No controller recreates what is deleted; the pods go through the
    //    kubelet, which stops their containers and tears their network down.
    for name in ["kube-controller-manager", "kube-scheduler"] {
        stop(&run, name, Duration::from_secs(10));
    }
    if running(&run, "kube-apiserver").is_some() && running(&run, "kubelet").is_some() {
        let _ = kubectl(&[
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]);
        let drained = wait_for("the kubelet to stop every pod", 60, || {
            let out = ctr(&state, &["tasks", "ls", "-q"]).unwrap_or_default();
            Ok(out.trim().is_empty())
        });
        if let Err(e) = drained {
            println!("    {e:#}; stopping what is left by hand");
        }
    }
    for name in ["kube-proxy", "kubelet"] {
        stop(&run, name, Duration::from_secs(10));
    }
    // 2. What the kubelet left (or every container, when it was not
    //    running): killed through containerd, then its shims.
    if running(&run, "containerd").is_some()
        && let Ok(tasks) = ctr(&state, &["tasks", "ls", "-q"])
    {
        for id in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = ctr(&state, &["tasks", "kill", "--signal", "SIGKILL", id]);
        }
        sleep(Duration::from_secs(1));
        for id in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = ctr(&state, &["tasks", "delete", "--force", id]);
        }
    }
    stop(&run, "containerd", Duration::from_secs(10));
    let sock = path(&state.join("containerd/containerd.sock"));
    for pid in pids_with_arg(&sock) {
        println!("    stopping leftover containerd shim (pid {pid})");
        stop_pid(pid, Duration::from_secs(5));
    }
    stop(&run, "kube-apiserver", Duration::from_secs(10));
    stop(&run, "etcd", Duration::from_secs(10));
    // 3. kube-proxy's own clean-up of its rules, then every chain `up` did
    //    not find, and the rules that jump to them.
    let proxy = bin.join("kube-proxy");
    if proxy.is_file() {
        let _ = Command::new(&proxy)
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    restore_iptables(&state)?;
    remove_added_tables(&state)?;
    // 4. Network: the pods' namespaces, the bridge and its veths.
    let known: BTreeSet<String> = fs::read_to_string(state.join("host/netns"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    for ns in netns_names() {
        if ns.starts_with("cni-") && !known.contains(&ns) {
            let file = Path::new("/var/run/netns").join(&ns);
            let _ = Command::new("umount")
                .arg(&file)
                .stderr(Stdio::null())
                .status();
            let _ = fs::remove_file(&file);
            println!("    removed network namespace {ns}");
        }
    }
    if Command::new("ip")
        .args(["link", "show", BRIDGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success()
    {
        setup::run(Command::new("ip").args(["link", "del", BRIDGE]))?;
        println!("    removed the bridge {BRIDGE}");
    }
    // 5. Mounts under the state directory and containerd's fixed paths,
    //    and the BPF filesystem if `up` mounted it (pins with it).
    unmount_under(&[state.as_path(), Path::new("/run/containerd")])?;
    if state.join("host/bpffs-mounted").exists() {
        let _ = Command::new("umount").arg(BPFFS).status();
        println!("    unmounted the BPF filesystem at {BPFFS}");
    }
    // 6. The pods' cgroups (kubepods), deepest first, in every hierarchy.
    remove_cgroups()?;
    // 7. Sysctls.
    restore_sysctls(&state)?;
    // 8. Directories that containerd and the CNI plugins made.
    let kept: BTreeSet<String> = fs::read_to_string(state.join("host/dirs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    for dir in FIXED_DIRS {
        if !kept.contains(*dir) && Path::new(dir).exists() && !Path::new(dir).is_symlink() {
            let _ = fs::remove_dir_all(dir);
            println!("    removed {dir}");
        }
    }
    // 9. The state, except the certificates (kept so a later `up` is quick
    //    and kubeconfigs handed out stay valid) and the logs.
    for sub in [
        "etcd",
        "kubelet",
        "containerd/root",
        "containerd/state",
        "cni/ipam",
        "run",
        "host",
    ] {
        let p = state.join(sub);
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| {
                format!(
                    "cannot remove {}: something is still mounted there (see `mount`)",
                    p.display()
                )
            })?;
        }
    }
    println!(
        "==> cluster down in {:.0} s: host restored (logs kept in {})",
        started.elapsed().as_secs_f64(),
        state.join("logs").display()
    );
    Ok(())
}

fn stop(run: &Path, name: &str, grace: Duration) {
    if let Some(pid) = running(run, name) {
        stop_pid(pid, grace);
        println!("    stopped {name} (pid {pid})");
    }
    let _ = fs::remove_file(run.join(format!("{name}.pid")));
}

/// Processes whose command line has `arg` as one argument.
fn pids_with_arg(arg: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

fn restore_iptables(state: &Path) -> Result<()> {
    for (tool, tables) in iptables_tools() {
        let Ok(recorded) = fs::read_to_string(state.join(format!("host/{tool}-chains"))) else {
            continue;
        };
        let known: BTreeSet<&str> = recorded.lines().collect();
        for table in tables {
            let chains = iptables_chains(tool, table)?;
            let added: Vec<&String> = chains
                .iter()
                .filter(|c| !known.contains(format!("{table} {c}").as_str()))
                .collect();
            if added.is_empty() {
                continue;
            }
            // Rules in chains `up` found that jump to an added chain.
            let save = setup::output(Command::new(format!("{tool}-save")).args(["-t", table]))?;
            for rule in save.lines().filter_map(|l| l.strip_prefix("-A ")) {
                let chain = rule.split_whitespace().next().unwrap_or("");
                if !known.contains(format!("{table} {chain}").as_str()) {
                    continue;
                }
                let words: Vec<&str> = rule.split_whitespace().collect();
                let jumps_to_added = words.windows(2).any(|w| {
                    (w[0] == "-j" || w[0] == "-g") && added.iter().any(|a| a.as_str() == w[1])
                });
                if jumps_to_added {
                    let args = shell_words(rule);
                    let _ = Command::new(tool)
                        .args(["-t", table, "-D"])
                        .args(&args)
                        .status();
                }
            }
            for chain in &added {
                let _ = Command::new(tool).args(["-t", table, "-F", chain]).status();
            }
            for chain in &added {
                let _ = Command::new(tool).args(["-t", table, "-X", chain]).status();
            }
            println!(
                "    {tool} {table}: removed {} chains up added ({})",
                added.len(),
                added
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    Ok(())
}

/// The nftables tables (`ip filter`, ...): with iptables' nf_tables
/// backend, the first rule in a table creates it.
fn nft_tables() -> Vec<String> {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table "))
        .map(str::to_string)
        .collect()
}

/// Deletes the iptables tables (nf_tables backend) that `up` brought into
/// being, once they hold nothing but their built-in chains and no rule.
fn remove_added_tables(state: &Path) -> Result<()> {
    let Ok(recorded) = fs::read_to_string(state.join("host/nft-tables")) else {
        return Ok(());
    };
    let known: BTreeSet<&str> = recorded.lines().collect();
    for table in nft_tables() {
        if known.contains(table.as_str()) {
            continue;
        }
        let Some((family, name)) = table.split_once(' ') else {
            continue;
        };
        let tool = match family {
            "ip" => "iptables",
            "ip6" => "ip6tables",
            _ => continue,
        };
        if !TABLES.contains(&name) {
            continue;
        }
        let save = setup::output(Command::new(format!("{tool}-save")).args(["-t", name]))?;
        let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
        let empty = !save.lines().any(|l| l.starts_with("-A "))
            && save
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split_whitespace().next())
                .all(|c| builtin.contains(&c));
        if empty {
            let _ = Command::new("nft")
                .args(["delete", "table", family, name])
                .status();
            println!("    removed the empty nftables table {table} (created by the first rule)");
        }
    }
    Ok(())
}

/// Splits an iptables-save rule into arguments (quoted comments kept whole).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ' ' if !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Unmounts every mount point under `roots`, deepest first.
fn unmount_under(roots: &[&Path]) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| roots.iter().any(|r| Path::new(p).starts_with(r)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in &points {
        let ok = Command::new("umount")
            .arg(p)
            .stderr(Stdio::null())
            .status()?
            .success();
        if !ok {
            let _ = Command::new("umount").args(["-l", p]).status();
        }
    }
    if !points.is_empty() {
        println!(
            "    unmounted {} mounts (pod volumes, container filesystems)",
            points.len()
        );
    }
    Ok(())
}

fn remove_cgroups() -> Result<()> {
    let root = Path::new("/sys/fs/cgroup");
    let mut hierarchies = vec![root.to_path_buf()];
    for entry in fs::read_dir(root)?.flatten() {
        if entry.path().is_dir() && !entry.path().is_symlink() {
            hierarchies.push(entry.path());
        }
    }
    let mut removed = 0;
    for h in hierarchies {
        let kubepods = h.join("kubepods");
        if kubepods.is_dir() {
            let mut dirs = Vec::new();
            collect_dirs(&kubepods, &mut dirs);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                if fs::remove_dir(&d).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    if removed > 0 {
        println!("    removed {removed} pod cgroups (kubepods)");
    }
    Ok(())
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn restore_sysctls(state: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(state.join("host/sysctls")) else {
        return Ok(());
    };
    let mut changed = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let file = Path::new("/proc/sys").join(key);
        let now = fs::read_to_string(&file).unwrap_or_default();
        if now.trim() != value {
            fs::write(&file, value).with_context(|| format!("restoring {key} to {value}"))?;
            changed.push(format!("{key}={value}"));
        }
    }
    if !changed.is_empty() {
        println!("    sysctls restored: {}", changed.join(" "));
    }
    Ok(())
}

// === status ===

fn status() -> Result<()> {
    let state = state_dir();
    let run = state.join("run");
    println!("==> cluster status ({})", state.display());
    let mut any = false;
    for name in STOP_ORDER.iter().rev() {
        match running(&run, name) {
            Some(pid) => {
                any = true;
                println!("    {name}: running (pid {pid})")
            }
            None => println!("    {name}: not running"),
        }
    }
    if state.join("host/recorded").exists() {
        println!(
            "    host changes recorded in {} (`down` restores them)",
            state.join("host").display()
        );
    }
    if any {
        let (_, nodes) = kubectl(&["get", "nodes", "-o", "wide"])?;
        println!("{nodes}");
        println!("    export KUBECONFIG={}", kubeconfig().display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tier_counts_its_passed_and_failed_tests() {
        let mut tally = TierTally::default();
        for line in [
            "running 3 tests",
            "test the_readme_quickstart_verifies_as_written ... ok",
            "test a_write_is_denied_and_never_reaches_the_api_server ... FAILED",
            "test an_agents_attach_streams_masked_through_the_real_kubelet ... ok",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored",
        ] {
            tally.count(line);
        }
        assert_eq!((tally.passed, tally.failed), (2, 1));
    }

    #[test]
    fn the_readme_quickstart_is_read_as_a_newcomer_runs_it() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let commands: Vec<String> = readme_block(root, QUICKSTART_INSTALL)
            .unwrap()
            .iter()
            .map(|l| readme_command(l))
            .collect();
        // The cluster is 1.20: deploy/ is its overlay, as the line says.
        assert_eq!(commands[0], "kubectl apply -k deploy/overlays/k8s-1.20");
        assert!(commands.iter().all(|c| !c.contains('#') && !c.is_empty()));
        for file in [
            "deploy/examples/reader-agent.yaml",
            "deploy/bootstrap-certs.sh",
        ] {
            assert!(
                commands.iter().any(|c| c.contains(file)),
                "{file} not in {commands:?}"
            );
        }
        assert!(readme_block(root, "no-such-block").is_err());
    }

    #[test]
    fn iptables_rules_split_with_their_quoted_comments() {
        assert_eq!(
            shell_words(
                r#"OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
            ),
            [
                "OUTPUT",
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES"
            ]
        );
    }

    #[test]
    fn the_cluster_stays_clear_of_the_tests_addresses() {
        // The e2e tests use 10.96.0.0/12 for services and 10.100-199.x.0/24
        // for their network namespaces.
        for cidr in [SERVICE_CIDR, CLUSTER_CIDR] {
            let second: u8 = cidr.split('.').nth(1).unwrap().parse().unwrap();
            assert!(
                !(96..112).contains(&second) && !(100..200).contains(&second),
                "{cidr}"
            );
        }
    }
}
