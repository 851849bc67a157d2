//! A real control plane for tests: etcd and kube-apiserver v1.20.2 from
//! `cargo xtask kube`'s cache, started on loopback the way
//! controller-runtime's envtest runs them (real binaries, no kubelet, no
//! controller-manager, no scheduler).
//!
//! ```no_run
//! use chaperone_tests::real_api::RealApiServer;
//! # fn demo() -> anyhow::Result<()> {
//! let server = RealApiServer::shared()?; // one per test process
//! let out = server.kubectl().args(["get", "namespaces"]).output()?;
//! # let _ = out; Ok(()) }
//! ```
//!
//! What it is like, compared with a cluster:
//! - TLS with a test CA (rcgen) that signs the serving certificate and is the
//!   `--client-ca-file`; service-account tokens signed with an RSA key
//!   (issuer `https://kubernetes.default.svc.cluster.local`, which is also the
//!   API audience); RBAC; a static admin token (`chaperone-test-admin`, in
//!   `system:masters`); a Metadata-level audit log.
//! - No controller-manager: nothing creates ServiceAccounts, their token
//!   Secrets, or the `default` ServiceAccount of a namespace.
//!   [`RealApiServer::mint_token`] creates the ServiceAccount it needs. The
//!   ServiceAccount admission plugin (on, as in every cluster) refuses a pod
//!   whose ServiceAccount does not exist, and one that would mount a token
//!   while the ServiceAccount has no token Secret: pods that tests create need
//!   an existing ServiceAccount (or `default`, created by hand) and
//!   `automountServiceAccountToken: false`.
//! - Without the controller-manager the aggregated ClusterRoles (`admin`,
//!   `edit`, `view`) have no rules: bind roles with explicit rules.
//! - No scheduler or kubelet: a pod is an object. Tests set `spec.nodeName`
//!   at creation and write its status with [`RealApiServer::patch_status`].
//! - TokenRequest refuses `expirationSeconds` below 600 (10 minutes) and a
//!   bound pod whose uid is not the given one.
//! - Child processes die with the test process (`PR_SET_PDEATHSIG`, set on
//!   one long-lived spawner thread because the signal follows the spawning
//!   thread, and cargo runs each test on a thread of its own); a server of
//!   one's own ([`RealApiServer::start`]) is also stopped on drop.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};

use crate::sim::client::{Client, Reply};

/// The Kubernetes version `cargo xtask kube` builds.
pub const VERSION: &str = "v1.20.2";
/// The environment variable naming the cache (`cargo xtask kube`'s).
pub const CACHE_ENV: &str = "CHAPERONE_KUBE_CACHE";
pub const DEFAULT_CACHE: &str = "/var/cache/chaperone/kube";
/// The service-account issuer, which is also the API audience.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The static admin's user name (in `system:masters`).
pub const ADMIN_USER: &str = "chaperone-test-admin";
/// The `kubernetes` service's ClusterIP range.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

/// A real control plane: etcd and kube-apiserver child processes.
pub struct RealApiServer {
    addr: SocketAddr,
    dir: PathBuf,
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
    admin_token: String,
    audit_log: PathBuf,
    kubeconfig: PathBuf,
    apiserver: Mutex<Child>,
    etcd: Mutex<Child>,
    log: Arc<Mutex<Vec<String>>>,
    etcd_dir: PathBuf,
    /// Dropped with the server (only servers of one's own have one).
    _temp: Option<tempfile::TempDir>,
}

// === where the binaries are ===

/// The cache `cargo xtask kube` fills.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// The directory holding `kube-apiserver` and `etcd`.
pub fn bin_dir() -> PathBuf {
    cache_dir().join(VERSION).join("bin")
}

/// Skips the calling test (returns early) with a clear line when the real
/// control plane is not built; under CI (`CI=true`) the test fails instead,
/// because CI runs `cargo xtask test`, which builds it.
#[macro_export]
macro_rules! require_real_api {
    () => {
        if !$crate::real_api::RealApiServer::binaries_present() {
            let why = format!(
                "the real kube-apiserver is not built in {}: run `cargo xtask kube`",
                $crate::real_api::bin_dir().display()
            );
            $crate::skip!(ci_fails, "{why}");
        }
    };
}

/// `true` under CI (`CI=true`), where missing prerequisites fail tests.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

// === child processes that die with the test process ===

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` on the one long-lived spawner thread with
/// `PR_SET_PDEATHSIG(SIGKILL)`: the kernel kills the child when that
/// thread's process exits, however the test process ends. (The signal is
/// tied to the spawning *thread*; cargo's test threads are short-lived.)
fn spawn_tied_to_process(cmd: Command) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("real-api-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: prctl and getppid are async-signal-safe; nothing
                    // else runs between fork and exec.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    let program = cmd.get_program().to_string_lossy().into_owned();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, tx))
        .map_err(|_| anyhow::anyhow!("the spawner thread is gone"))?;
    rx.recv()
        .context("the spawner thread is gone")?
        .with_context(|| format!("cannot start {program}"))
}

fn stop(child: &Mutex<Child>) {
    let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
    if let Ok(None) = child.try_wait() {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Keeps the last lines of a child's output (for error messages).
fn collect_output(child: &mut Child, name: &'static str, log: &Arc<Mutex<Vec<String>>>) {
    let streams: Vec<Box<dyn std::io::Read + Send>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for stream in streams {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                if log.len() >= 400 {
                    log.drain(..100);
                }
                log.push(format!("{name}: {line}"));
            }
        });
    }
}

// === certificates and keys ===

/// A serving certificate for loopback, the `kubernetes` service IP and names.
fn serving_cert(ca: &Issuer<'static, KeyPair>) -> Result<(String, String)> {
    let mut names: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "10.96.0.1".into()];
    names.extend(crate::sim::tls::SERVICE_NAMES.iter().map(|s| s.to_string()));
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A client certificate: CN = user, one O per group (at most two: rcgen
/// keeps one value per attribute type, so the second group is written
/// under the same OID as a custom attribute type).
fn client_cert(
    ca: &Issuer<'static, KeyPair>,
    username: &str,
    groups: &[&str],
) -> Result<(String, String)> {
    if groups.len() > 2 {
        bail!(
            "a person's client certificate carries at most 2 groups here (rcgen writes one \
             attribute per type); bind RBAC roles to the user name instead"
        );
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, username);
    if let Some(g) = groups.first() {
        dn.push(DnType::OrganizationName, *g);
    }
    if let Some(g) = groups.get(1) {
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 10]), *g);
    }
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The service-account signing key (RSA 2048, as clusters use): private
/// key (PKCS#1 PEM) and public key (SPKI PEM).
fn service_account_keys() -> Result<(String, String)> {
    use rsa::{pkcs1::EncodeRsaPrivateKey, pkcs8::EncodePublicKey};
    let private = rsa::RsaPrivateKey::new(&mut crate::sim::auth::Rng06, 2048)?;
    let private_pem = private.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)?;
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)?;
    Ok((private_pem.to_string(), public_pem))
}

const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
";

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn kubeconfig_yaml(url: &str, ca_pem: &str, user: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: real-api\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: real-api-user\n  user:\n{user}contexts:\n- name: real-api\n  context:\n    cluster: real-api\n    user: real-api-user\n    namespace: default\ncurrent-context: real-api\n"
    )
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Runs `f` on a runtime of its own on a helper thread: the synchronous
/// API works from plain tests and from inside a tokio runtime alike.
fn block_on<T: Send>(f: impl std::future::Future<Output = Result<T>> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(f)
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the request thread panicked")))
    })
}

/// Directories of shared servers whose test process has exited.
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("chaperone-real-api-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// etcd's data directory: in /dev/shm when there is one (named after this
/// process, so a later run removes what a killed one left), else in `dir`.
fn etcd_data_dir(dir: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        remove_stale_dirs(shm);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shm.join(format!("chaperone-real-api-{}-{n}", std::process::id()))
    } else {
        dir.join("etcd")
    }
}

// === impl RealApiServer ===

impl RealApiServer {
    /// The binaries from `cargo xtask kube`'s cache are there.
    pub fn binaries_present() -> bool {
        let bin = bin_dir();
        bin.join("kube-apiserver").is_file() && bin.join("etcd").is_file()
    }

    /// One server per test process, started on first use (tests isolate by
    /// namespace). Its processes die with the test process.
    pub fn shared() -> Result<&'static RealApiServer> {
        static SHARED: OnceLock<std::result::Result<RealApiServer, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let parent = std::env::temp_dir();
                remove_stale_dirs(&parent);
                let dir = parent.join(format!("chaperone-real-api-{}", std::process::id()));
                Self::start_in(dir, None, None).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("the shared real API server did not start: {e}"))
    }

    /// A server of one's own (for tests that restart or reconfigure it),
    /// stopped on drop.
    pub fn start() -> Result<RealApiServer> {
        let temp = tempfile::Builder::new()
            .prefix("chaperone-real-api-own-")
            .tempdir()?;
        Self::start_in(temp.path().to_path_buf(), Some(temp), None)
    }

    /// A server of one's own that advertises `address`
    /// (`--advertise-address`: what it writes into the `default/kubernetes`
    /// Endpoints and EndpointSlice, with its secure port) and listens on
    /// every address, so that a client reaches it there once `address` is
    /// one of this host's. Clients of [`Self::url`] still dial loopback.
    pub fn start_advertising(address: std::net::IpAddr) -> Result<RealApiServer> {
        let temp = tempfile::Builder::new()
            .prefix("chaperone-real-api-own-")
            .tempdir()?;
        Self::start_in(temp.path().to_path_buf(), Some(temp), Some(address))
    }

    fn start_in(
        dir: PathBuf,
        temp: Option<tempfile::TempDir>,
        advertise: Option<std::net::IpAddr>,
    ) -> Result<RealApiServer> {
        let started = Instant::now();
        let bin = bin_dir();
        if !Self::binaries_present() {
            bail!(
                "the real kube-apiserver and etcd are not in {}: run `cargo xtask kube`",
                bin.display()
            );
        }
        std::fs::create_dir_all(&dir)?;
        let log = Arc::new(Mutex::new(Vec::new()));

        // etcd on loopback ports of its own, its data in memory when it can
        // be (/dev/shm: no fsync cost on a busy disk), else in `dir`.
        let etcd_dir = etcd_data_dir(&dir);
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_cmd = Command::new(bin.join("etcd"));
        etcd_cmd
            .arg("--name=test")
            .arg(format!("--data-dir={}", etcd_dir.display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut etcd = spawn_tied_to_process(etcd_cmd)?;
        collect_output(&mut etcd, "etcd", &log);

        // Credentials and configuration.
        let (ca_pem, ca_key, ca_params) = crate::sim::tls::cluster_ca("chaperone test cluster CA")?;
        let ca = Issuer::new(ca_params, ca_key);
        let (cert_pem, key_pem) = serving_cert(&ca)?;
        let (sa_private, sa_public) = service_account_keys()?;
        let admin_token = random_token();
        let files = [
            ("ca.crt", ca_pem.as_str()),
            ("apiserver.crt", cert_pem.as_str()),
            ("apiserver.key", key_pem.as_str()),
            ("sa.key", sa_private.as_str()),
            ("sa.pub", sa_public.as_str()),
            ("audit-policy.yaml", AUDIT_POLICY),
        ];
        for (name, text) in files {
            write_private(&dir.join(name), text)?;
        }
        write_private(
            &dir.join("tokens.csv"),
            &format!("{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n"),
        )?;
        let audit_log = dir.join("audit.log");
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let url = format!("https://{addr}");

        let mut api_cmd = Command::new(bin.join("kube-apiserver"));
        let path = |name: &str| dir.join(name).display().to_string();
        api_cmd
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(match advertise {
                Some(_) => "--bind-address=0.0.0.0",
                None => "--bind-address=127.0.0.1",
            })
            .arg(format!(
                "--advertise-address={}",
                advertise.unwrap_or(Ipv4Addr::LOCALHOST.into())
            ))
            .arg(format!("--secure-port={port}"))
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", path("certs")))
            .arg(format!("--tls-cert-file={}", path("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", path("apiserver.key")))
            .arg(format!("--client-ca-file={}", path("ca.crt")))
            .arg(format!("--token-auth-file={}", path("tokens.csv")))
            .arg(format!("--service-account-issuer={ISSUER}"))
            .arg(format!("--service-account-key-file={}", path("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                path("sa.key")
            ))
            .arg(format!("--service-account-jwks-uri={url}/openid/v1/jwks"))
            .arg(format!("--api-audiences={ISSUER}"))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--audit-log-path={}", audit_log.display()))
            .arg(format!("--audit-policy-file={}", path("audit-policy.yaml")))
            .arg("--audit-log-format=json")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--v=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut apiserver = spawn_tied_to_process(api_cmd)?;
        collect_output(&mut apiserver, "kube-apiserver", &log);

        let kubeconfig = dir.join("admin.kubeconfig");
        std::fs::create_dir_all(dir.join("home"))?;
        let server = RealApiServer {
            addr,
            dir,
            ca_pem,
            ca,
            admin_token,
            audit_log,
            kubeconfig,
            apiserver: Mutex::new(apiserver),
            etcd: Mutex::new(etcd),
            log,
            etcd_dir,
            _temp: temp,
        };
        server.write_kubeconfig(&server.kubeconfig, &server.admin_token)?;
        server.wait_ready(started)?;
        eprintln!(
            "real API server {VERSION} ready at {} in {:.1} s (etcd + kube-apiserver, {})",
            server.url(),
            started.elapsed().as_secs_f64(),
            server.dir.display()
        );
        Ok(server)
    }

    /// Polls `/readyz` until it answers 200, failing early when a process exits.
    fn wait_ready(&self, started: Instant) -> Result<()> {
        let mut last = String::from("no answer yet");
        while started.elapsed() < STARTUP_TIMEOUT {
            for (name, child) in [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)] {
                if let Ok(Some(status)) = child.lock().unwrap_or_else(|p| p.into_inner()).try_wait()
                {
                    bail!(
                        "{name} exited during start-up ({status}):\n{}",
                        self.log_text()
                    );
                }
            }
            match self.request("GET", "/readyz", &[], Vec::new()) {
                Ok(reply) if reply.status == 200 => return Ok(()),
                Ok(reply) => last = format!("HTTP {}: {}", reply.status, reply.text()),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "kube-apiserver was not ready within {} s (last /readyz: {last}):\n{}",
            STARTUP_TIMEOUT.as_secs(),
            self.log_text()
        )
    }

    /// A serving certificate and key for 127.0.0.1 signed by this server's
    /// CA, whose PEM ([`Self::ca_pem`]) is then the `caBundle` that trusts
    /// it: for a webhook the server calls on loopback.
    pub fn loopback_serving_cert(&self) -> Result<(String, String)> {
        serving_cert(&self.ca)
    }

    /// The last lines etcd and kube-apiserver printed.
    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The cluster CA that signed the serving certificate (and that is the
    /// `--client-ca-file`).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The static admin token (user `chaperone-test-admin`, `system:masters`).
    pub fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    pub fn version(&self) -> &'static str {
        VERSION
    }

    /// The server's working directory (certificates, keys, audit log, etcd data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig ([`RealApiServer::kubectl`] uses it).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig (YAML) with a bearer token.
    pub fn kubeconfig(&self, token: &str) -> String {
        kubeconfig_yaml(&self.url(), &self.ca_pem, &format!("    token: {token}\n"))
    }

    /// Writes [`RealApiServer::kubeconfig`] to `path` (mode 0600).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        write_private(path, &self.kubeconfig(token))
    }

    /// Writes a kubeconfig that authenticates with a client certificate
    /// (CN = `username`, O = each of `groups`, at most two) signed by the
    /// server's `--client-ca-file`: a "person" whose groups are chosen at
    /// run time.
    pub fn write_person_kubeconfig(
        &self,
        path: &Path,
        username: &str,
        groups: &[&str],
    ) -> Result<()> {
        let (cert, key) = client_cert(&self.ca, username, groups)?;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let user = format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&cert),
            b64(&key)
        );
        write_private(path, &kubeconfig_yaml(&self.url(), &self.ca_pem, &user))
    }

    /// `kubectl` as admin: KUBECONFIG set, HOME isolated (its own cache).
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.join("home"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT");
        cmd
    }

    /// One HTTP/2 request as admin (a connection of its own).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Reply> {
        self.request_as(&self.admin_token, method, path, headers, body)
    }

    /// One HTTP/2 request with a bearer token (`""`: anonymous).
    pub fn request_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Reply> {
        block_on(async {
            let mut client = Client::connect(self.addr, &self.ca_pem, true).await?;
            if !token.is_empty() {
                client = client.with_token(token);
            }
            client.call(method, path, headers, body).await
        })
    }

    fn json_call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> Result<Value> {
        let reply = self.request(
            method,
            path,
            &[
                ("content-type", content_type),
                ("accept", "application/json"),
            ],
            serde_json::to_vec(body)?,
        )?;
        if !(200..300).contains(&reply.status) {
            bail!(
                "{method} {path}: HTTP {}: {}",
                reply.status,
                reply.text().trim()
            );
        }
        serde_json::from_slice(&reply.body)
            .with_context(|| format!("{method} {path}: the answer is not JSON"))
    }

    /// The collection path of `kind` in `api_version`, from discovery
    /// (CRs included once their CRD is served).
    fn collection_path(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<String> {
        let base = if api_version.contains('/') {
            format!("/apis/{api_version}")
        } else {
            format!("/api/{api_version}")
        };
        let reply = self.request("GET", &base, &[("accept", "application/json")], Vec::new())?;
        if reply.status != 200 {
            bail!(
                "discovery of {api_version} answered HTTP {} (is its CRD installed and established?): {}",
                reply.status,
                reply.text().trim()
            );
        }
        let list = reply.json();
        let resource = list["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["kind"] == kind && !r["name"].as_str().unwrap_or("/").contains('/'))
            .with_context(|| format!("{api_version} serves no kind {kind}"))?;
        let plural = resource["name"].as_str().unwrap_or_default();
        Ok(match (resource["namespaced"].as_bool(), namespace) {
            (Some(true), Some(ns)) => format!("{base}/namespaces/{ns}/{plural}"),
            (Some(true), None) => format!("{base}/namespaces/default/{plural}"),
            _ => format!("{base}/{plural}"),
        })
    }

    /// Creates an object (POST to its collection, JSON) and returns what
    /// the server stored. Built-in kinds, and CRs once their CRD is
    /// established ([`RealApiServer::install_crds`] waits for that).
    pub fn create(&self, object: Value) -> Result<Value> {
        let api_version = object["apiVersion"]
            .as_str()
            .context("the object has no apiVersion")?;
        let kind = object["kind"].as_str().context("the object has no kind")?;
        let namespace = object["metadata"]["namespace"].as_str();
        let path = self.collection_path(api_version, kind, namespace)?;
        self.json_call("POST", &path, "application/json", &object)
    }

    /// Creates the object unless one of that name exists (HTTP 409).
    pub fn ensure(&self, object: Value) -> Result<()> {
        match self.create(object) {
            Ok(_) => Ok(()),
            Err(e) if format!("{e}").contains("HTTP 409") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Installs CRDs from YAML (several documents allowed; existing ones are
    /// kept) and waits until each is Established and served.
    pub fn install_crds(&self, yaml: &str) -> Result<()> {
        let mut names = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let crd: Value = serde::Deserialize::deserialize(doc)?;
            if crd.is_null() {
                continue;
            }
            let name = crd["metadata"]["name"]
                .as_str()
                .context("a CRD without metadata.name")?
                .to_owned();
            let group = crd["spec"]["group"].as_str().unwrap_or_default().to_owned();
            let version = crd["spec"]["versions"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["served"] == true))
                .and_then(|v| v["name"].as_str())
                .unwrap_or_default()
                .to_owned();
            let plural = crd["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            self.ensure(crd)?;
            names.push((name, format!("/apis/{group}/{version}"), plural));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (name, discovery, plural) in names {
            loop {
                let crd = self.request(
                    "GET",
                    &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
                    &[],
                    Vec::new(),
                )?;
                let established = crd.status == 200
                    && crd.json()["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Established" && c["status"] == "True");
                let served = established && {
                    let d = self.request("GET", &discovery, &[], Vec::new())?;
                    d.status == 200
                        && d.json()["resources"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|r| r["name"] == plural.as_str())
                };
                if served {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the CRD {name} was not established and served within 60 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Patches the status subresource of the object at `api_path` (merge
    /// patch), e.g. a pod's `containerStatuses[].containerID` and `podIP`.
    pub fn patch_status(&self, api_path: &str, patch: Value) -> Result<Value> {
        let path = format!("{}/status", api_path.trim_end_matches('/'));
        self.json_call("PATCH", &path, "application/merge-patch+json", &patch)
    }

    /// A service-account token from the TokenRequest API (the namespace and
    /// the ServiceAccount are created when missing), bound to a pod (name,
    /// uid) when given; audiences `None`: the API server's own. The server
    /// refuses a `ttl` below 10 minutes.
    pub fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        bound_pod: Option<(&str, &str)>,
        audiences: Option<&[&str]>,
        ttl: Duration,
    ) -> Result<String> {
        self.ensure(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        )?;
        self.ensure(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": service_account, "namespace": namespace},
        }))?;
        let mut spec = json!({
            "audiences": audiences.map(|a| a.to_vec()).unwrap_or_default(),
            "expirationSeconds": ttl.as_secs(),
        });
        if let Some((name, uid)) = bound_pod {
            spec["boundObjectRef"] =
                json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
        }
        let review = self.json_call(
            "POST",
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"),
            "application/json",
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
        )?;
        review["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .context("the TokenRequest answer has no status.token")
    }

    /// The audit events the server wrote so far (audit.k8s.io/v1 `Event`s,
    /// Metadata level, one JSON object per line).
    pub fn audit_events(&self) -> Result<Vec<Value>> {
        let text = match std::fs::read_to_string(&self.audit_log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context("reading the audit log"),
        };
        // The last line may be half written.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// The process ids of kube-apiserver and etcd (for `/proc` readings).
    pub fn pids(&self) -> (u32, u32) {
        let id = |child: &Mutex<Child>| child.lock().unwrap_or_else(|p| p.into_inner()).id();
        (id(&self.apiserver), id(&self.etcd))
    }

    /// Stops kube-apiserver and etcd (a server of one's own also stops on drop).
    pub fn stop(&self) {
        stop(&self.apiserver);
        stop(&self.etcd);
    }
}

impl Drop for RealApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.etcd_dir);
    }
}
