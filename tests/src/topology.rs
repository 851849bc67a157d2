//! The test topology of DESIGN.md on one machine: an "agent pod" is a
//! network namespace joined by a veth pair to the host namespace, plus a
//! cgroup named the way the kubelet names pod cgroups. Processes enter the
//! cgroup first and the namespace second (`ip netns exec` remounts /sys, so
//! the cgroup files are not visible from inside; membership is inherited
//! across exec).
//!
//! Every fixture cleans up after itself on drop, and names are unique per
//! process and per fixture so tests can run in parallel.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(1);

/// A small number unique within this process, to derive names and subnets.
fn unique() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (_, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .context("no cgroup2 mount in /proc/mounts")
}

/// A cgroup directory that is removed (after killing what is left in it) on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        fs::create_dir_all(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// A fresh subtree under the cgroup v2 root: `chaperone-test-PID-N`.
    pub fn test_subtree() -> Result<Self> {
        let root = cgroup2_root()?;
        Cgroup::create(root.join(format!(
            "chaperone-test-{}-{}",
            std::process::id(),
            unique()
        )))
    }

    pub fn child(&self, relative: impl AsRef<Path>) -> Result<Cgroup> {
        Cgroup::create(self.path.join(relative))
    }

    /// The cgroup v2 id (directory inode).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0)
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children first (deepest paths first), killing stragglers.
        let mut dirs = Vec::new();
        collect_dirs(&self.path, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs.iter().chain(std::iter::once(&self.path)) {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: sending SIGKILL to a pid we placed in our test cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(entry.path());
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// A network namespace with a veth pair to the host namespace:
/// host side `HOST_V4/24` and `HOST_V6/64`, namespace side `.2` / `::2`,
/// default routes via the host side.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub host_v4: Ipv4Addr,
    pub agent_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
    pub agent_v6: Ipv6Addr,
}

impl Netns {
    pub fn create() -> Result<Self> {
        let n = unique();
        let pid = std::process::id();
        let tag = format!("{}x{}", pid % 100_000, n);
        // 10.(100 + pid % 100).(n).0/24 and fd00:c4a9:(pid % 100):(n)::/64
        let (b, c) = (100 + (pid % 100) as u8, (n % 250) as u8);
        let ns = Netns {
            name: format!("chp-{tag}"),
            host_if: format!("vh{tag}"),
            host_v4: Ipv4Addr::new(10, b, c, 1),
            agent_v4: Ipv4Addr::new(10, b, c, 2),
            host_v6: Ipv6Addr::new(0xfd00, 0xc4a9, (pid % 100) as u16, n as u16, 0, 0, 0, 1),
            agent_v6: Ipv6Addr::new(0xfd00, 0xc4a9, (pid % 100) as u16, n as u16, 0, 0, 0, 2),
        };
        let agent_if = format!("va{tag}");
        run("ip", &["netns", "add", &ns.name])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &agent_if,
            ],
        )?;
        run("ip", &["link", "set", &agent_if, "netns", &ns.name])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", ns.host_v4),
                "dev",
                &ns.host_if,
            ],
        )?;
        run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/64", ns.host_v6),
                "dev",
                &ns.host_if,
                "nodad",
            ],
        )?;
        run("ip", &["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| -> Result<()> {
            let mut full = vec!["netns", "exec", &ns.name, "ip"];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&[
            "addr",
            "add",
            &format!("{}/24", ns.agent_v4),
            "dev",
            &agent_if,
        ])?;
        inside(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", ns.agent_v6),
            "dev",
            &agent_if,
            "nodad",
        ])?;
        inside(&["link", "set", &agent_if, "up"])?;
        inside(&["route", "add", "default", "via", &ns.host_v4.to_string()])?;
        inside(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ns.host_v6.to_string(),
        ])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

/// A process placement: a cgroup to join, then a network namespace to enter.
pub struct Placement<'a> {
    pub cgroup: &'a Cgroup,
    pub netns: &'a Netns,
}

/// Where kubelet mounts a pod's service-account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What an in-cluster client finds in its pod: the API server's service
/// address in the environment and the service-account files.
pub struct InClusterCredentials {
    pub service_host: String,
    pub service_port: u16,
    /// Holds `token`, `ca.crt` and `namespace`; bind-mounted at
    /// [`SERVICE_ACCOUNT_DIR`] for the process only.
    pub dir: PathBuf,
    /// The pod's `/etc/hosts`: the `kubernetes.default.svc` names resolve
    /// to the service address, as cluster DNS resolves them in a pod.
    pub hosts: PathBuf,
}

impl InClusterCredentials {
    pub fn write(
        dir: impl Into<PathBuf>,
        service: std::net::SocketAddr,
        token: &str,
        ca_pem: &str,
        namespace: &str,
    ) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("token"), token)?;
        fs::write(dir.join("ca.crt"), ca_pem)?;
        fs::write(dir.join("namespace"), namespace)?;
        let hosts = dir.with_extension("hosts");
        fs::write(
            &hosts,
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost\n{}\tkubernetes kubernetes.default \
                 kubernetes.default.svc kubernetes.default.svc.cluster.local\n",
                service.ip()
            ),
        )?;
        Ok(InClusterCredentials {
            service_host: service.ip().to_string(),
            service_port: service.port(),
            dir,
            hosts,
        })
    }
}

impl Placement<'_> {
    /// Like [`Placement::command`], but the program also runs exactly as in a
    /// pod: `KUBERNETES_SERVICE_HOST/PORT` set, no kubeconfig, the
    /// service-account files bind-mounted at the real in-cluster path and
    /// the pod's hosts file over `/etc/hosts`, in a private mount namespace
    /// (the host's files are untouched).
    ///
    /// Do not pass kubectl `--request-timeout` (or any other connection
    /// override): it makes kubectl's merged config non-default, and kubectl
    /// then ignores the in-cluster config and dials localhost:8080. Bound
    /// the process's run time from the test instead.
    pub fn in_cluster_command(
        &self,
        credentials: &InClusterCredentials,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Command {
        // The mount point must exist; creating an empty directory on the host
        // is harmless (the bind mount is private to the process).
        let _ = fs::create_dir_all(SERVICE_ACCOUNT_DIR);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(
                r#"echo $$ > "$1" && ns="$2" && sa="$3" && hosts="$4" && shift 4 && exec ip netns exec "$ns" unshare --mount sh -c 'hosts="$1" && shift && mount --bind "$0" /var/run/secrets/kubernetes.io/serviceaccount && mount --bind "$hosts" /etc/hosts && exec "$@"' "$sa" "$hosts" "$@""#,
            )
            .arg("sh")
            .arg(self.cgroup.procs_file())
            .arg(&self.netns.name)
            .arg(&credentials.dir)
            .arg(&credentials.hosts)
            .arg(program)
            .env("KUBERNETES_SERVICE_HOST", &credentials.service_host)
            .env("KUBERNETES_SERVICE_PORT", credentials.service_port.to_string())
            .env_remove("KUBECONFIG")
            .env("HOME", &credentials.dir);
        cmd
    }

    /// A command that runs `program` inside the cgroup and the namespace,
    /// unchanged: `sh` joins the cgroup, then `ip netns exec` enters the
    /// namespace and execs the program (same pid throughout).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1" && shift && exec ip netns exec "$@""#)
            .arg("sh")
            .arg(self.cgroup.procs_file())
            .arg(&self.netns.name)
            .arg(program);
        cmd
    }
}

/// A private bpffs instance mounted on a fresh temporary directory, so a
/// test's pins are its own. On drop, every chaperone pin directory in it is
/// detached (links off their cgroups) and the instance is unmounted.
pub struct BpffsMount {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl BpffsMount {
    pub fn create() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        run("mount", &["-t", "bpf", "bpf", &path.to_string_lossy()])
            .context("mount a bpffs instance for the test's pins")?;
        Ok(BpffsMount { path, _dir: dir })
    }

    /// The entries at the top of the instance, other than the kernel's own
    /// `maps.debug` / `progs.debug` iterators.
    pub fn pins(&self) -> Vec<String> {
        let mut names = Vec::new();
        walk(&self.path, &self.path, &mut names);
        names.retain(|n| n != "maps.debug" && n != "progs.debug");
        names.sort();
        names
    }
}

fn walk(root: &Path, dir: &Path, names: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if let Ok(relative) = path.strip_prefix(root) {
            names.push(relative.to_string_lossy().into_owned());
        }
        if path.is_dir() {
            walk(root, &path, names);
        }
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.path) {
            for entry in entries.filter_map(Result::ok) {
                if entry.path().is_dir() {
                    match chaperone::redirect::detach_all(&entry.path()) {
                        Ok(report) => {
                            for problem in report.problems {
                                eprintln!("test teardown: {problem}");
                            }
                        }
                        Err(refusal) => eprintln!("test teardown: {refusal}"),
                    }
                }
            }
        }
        let _ = run("umount", &[&self.path.to_string_lossy()]);
    }
}
