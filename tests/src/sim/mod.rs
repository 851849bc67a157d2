//! kube-sim: a Kubernetes API-server simulator for chaperone's tests and demo.
//! Faithful where clients look (see `tests/fixtures/kube-apiserver-v1.20.2`),
//! small elsewhere.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use chaperone_tests::sim::{SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default()).await?;
//! let kubeconfig = sim.kubeconfig(&sim.admin_token());
//! # let _ = kubeconfig; Ok(()) }
//! ```

pub mod auth;
pub mod client;
pub mod discovery;
pub mod fields;
pub mod patch;
pub mod proto;
pub mod resources;
pub mod selectors;
mod server;
pub mod status;
pub mod store;
pub mod stream;
pub mod table;
pub mod tls;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::Context;
use base64::Engine;
use serde::Serialize;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use auth::{Attributes, Authorizer, Impersonation, Rule, Subject, TokenRequest, UserInfo};
pub use status::ApiError;
pub use store::Store;

/// How the simulator is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// Extra IPs in the serving certificate (127.0.0.1 and ::1 are always there).
    pub extra_ips: Vec<IpAddr>,
    /// Extra DNS names in the serving certificate (the `kubernetes.default…`
    /// names are always there).
    pub extra_names: Vec<String>,
    /// The service-account issuer (`iss` of tokens, OIDC discovery).
    pub issuer: String,
    /// Audiences the simulator accepts as an API server (`None`: the issuer).
    pub api_audiences: Option<Vec<String>>,
    /// A fixed admin token (`None`: a random one).
    pub admin_token: Option<String>,
    /// Who may do what besides `system:masters`.
    pub authorizer: Authorizer,
    /// How long a rotated-out signing key stays valid and published.
    pub key_retention: Duration,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection (kube-apiserver:
    /// `--http2-max-streams-per-connection`, 1000; Go's own default is 250).
    pub http2_max_streams: u32,
    /// The Kubernetes 1.x minor version it claims (`/version`) and answers
    /// as: APIs newer than it are absent, as on a real server of that
    /// version. Default [`DEFAULT_MINOR_VERSION`] (v1.20.2, the fixtures'
    /// and the real server's version); SelfSubjectReview needs 28.
    pub minor_version: u32,
    /// The address it publishes for itself, as kube-apiserver's
    /// `--advertise-address`: the `default/kubernetes` Endpoints and
    /// EndpointSlice name it with the port it listens on. `None`: the
    /// address it listens on (127.0.0.1 when that is unspecified).
    pub advertise_address: Option<IpAddr>,
}

/// The minor version the simulator claims by default: 20 (v1.20.2, like the
/// captured fixtures and the real server `cargo xtask kube` builds).
pub const DEFAULT_MINOR_VERSION: u32 = 20;
/// The first minor version serving `authentication.k8s.io/v1`
/// SelfSubjectReview (`kubectl auth whoami`).
pub const SELF_SUBJECT_REVIEW_MINOR_VERSION: u32 = 28;

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            extra_ips: Vec::new(),
            extra_names: Vec::new(),
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            api_audiences: None,
            admin_token: None,
            authorizer: Authorizer::strict(),
            key_retention: Duration::from_secs(3600),
            bookmark_interval: Duration::from_secs(5),
            http2_max_streams: 1000,
            minor_version: DEFAULT_MINOR_VERSION,
            advertise_address: None,
        }
    }
}

impl SimConfig {
    /// Everyone authenticated may do everything (for the demo).
    pub fn permissive(mut self) -> Self {
        self.authorizer = Authorizer::permissive();
        self
    }

    /// Claims to be Kubernetes 1.`minor` (see [`SimConfig::minor_version`]).
    pub fn with_minor_version(mut self, minor: u32) -> Self {
        self.minor_version = minor;
        self
    }
}

/// The first minor version serving `discovery.k8s.io/v1` EndpointSlices
/// (1.20 serves only `v1beta1`).
pub const ENDPOINT_SLICE_V1_MINOR_VERSION: u32 = 21;

/// The `kubernetes` ClusterIP the simulator's `default/kubernetes` Service
/// claims (the first address of a `10.96.0.0/12` service range).
pub const KUBERNETES_CLUSTER_IP: &str = "10.96.0.1";

/// What kube-apiserver's own controllers write at start (seen on the real
/// v1.20.2): the `default/kubernetes` Service (ClusterIP, port 443 to its
/// secure port), its Endpoints (the advertise address, not mirrored into a
/// slice) and the EndpointSlice `kubernetes` it writes itself.
fn publish_own_addresses(
    store: &Store,
    config: &SimConfig,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let ip = config.advertise_address.unwrap_or(addr.ip());
    let port = addr.port();
    let slice_version = if config.minor_version < ENDPOINT_SLICE_V1_MINOR_VERSION {
        "v1beta1"
    } else {
        "v1"
    };
    let address_type = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let objects = [
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"},
            },
            "spec": {
                "clusterIP": KUBERNETES_CLUSTER_IP,
                "clusterIPs": [KUBERNETES_CLUSTER_IP],
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}],
                "sessionAffinity": "None",
                "type": "ClusterIP",
            },
            "status": {"loadBalancer": {}},
        }),
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
            },
            "subsets": [{
                "addresses": [{"ip": ip.to_string()}],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            }],
        }),
        serde_json::json!({
            "apiVersion": format!("discovery.k8s.io/{slice_version}"),
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": address_type,
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }),
    ];
    for object in objects {
        store
            .create(object)
            .map_err(|e| anyhow::anyhow!("publish the simulator's own addresses: {e:?}"))?;
    }
    Ok(())
}

/// A request the simulator received, for tests to inspect.
#[derive(Clone, Debug, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub http_version: String,
    /// Header names (lowercase) and values, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The bearer token presented, if any.
    pub token: Option<String>,
    /// The authenticated user (before impersonation).
    pub authenticated: Option<UserInfo>,
    /// The user the request acted as when it impersonated someone.
    pub impersonated: Option<UserInfo>,
    /// The client asked for protobuf (answered with JSON or 406).
    pub wanted_protobuf: bool,
    /// The HTTP status answered (0 while a stream is still open).
    pub status: u16,
}

impl RecordedRequest {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Shared state of a running simulator (kept across restarts).
pub(crate) struct State {
    pub config: SimConfig,
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    pub issuer: auth::Issuer,
    pub tls: tls::ClusterTls,
    pub admin_token: String,
    pub static_tokens: RwLock<HashMap<String, UserInfo>>,
    pub authorizer: RwLock<Authorizer>,
    pub requests: Mutex<Vec<RecordedRequest>>,
    pub pod_ports: Mutex<HashMap<(String, String), BTreeMap<u16, SocketAddr>>>,
    pub api_audiences: Vec<String>,
    /// Client connections being served now.
    pub open_connections: std::sync::atomic::AtomicUsize,
    /// Client connections served since start (TLS handshakes completed).
    pub served_connections: std::sync::atomic::AtomicUsize,
    /// Watches being served now, by the user they act as.
    pub watches_by_user: Mutex<HashMap<String, usize>>,
}

/// The simulator (see [`Simulator::start`]).
pub struct Simulator;

/// A running simulator: its address, credentials, state and controls.
pub struct SimHandle {
    state: Arc<State>,
    running: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl Simulator {
    /// Generates the CA and keys, binds `config.listen` and serves.
    pub async fn start(config: SimConfig) -> anyhow::Result<SimHandle> {
        let listener = bind(config.listen).await?;
        let mut addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            // Listening on every address: clients dial loopback.
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let tls = tls::ClusterTls::generate(&config.extra_ips, &config.extra_names)?;
        let jwks_uri = format!("https://{}/openid/v1/jwks", host_port(addr));
        let issuer = auth::Issuer::new(config.issuer.clone(), jwks_uri, config.key_retention)?;
        let admin_token = config.admin_token.clone().unwrap_or_else(random_token);
        let api_audiences = config
            .api_audiences
            .clone()
            .unwrap_or_else(|| vec![config.issuer.clone()]);
        let store = Arc::new(Store::new());
        if config.minor_version < SELF_SUBJECT_REVIEW_MINOR_VERSION {
            store.remove_builtin("authentication.k8s.io", "selfsubjectreviews");
        }
        if config.minor_version < ENDPOINT_SLICE_V1_MINOR_VERSION {
            store.set_builtin_version("discovery.k8s.io", "endpointslices", "v1beta1");
        }
        publish_own_addresses(&store, &config, addr)?;
        let state = Arc::new(State {
            authorizer: RwLock::new(config.authorizer.clone()),
            config,
            addr,
            store,
            issuer,
            tls,
            admin_token,
            static_tokens: RwLock::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            pod_ports: Mutex::new(HashMap::new()),
            api_audiences,
            open_connections: Default::default(),
            served_connections: Default::default(),
            watches_by_user: Default::default(),
        });
        let handle = SimHandle {
            state,
            running: Mutex::new(None),
        };
        handle.serve(listener);
        Ok(handle)
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| {
        format!("binding the simulator to {addr}: is another process listening there?")
    })?;
    Ok(socket.listen(1024)?)
}

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    format!(
        "sim-admin-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn host_port(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

impl SimHandle {
    fn serve(&self, listener: TcpListener) {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server::serve(self.state.clone(), listener, cancel.clone()));
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some((cancel, task));
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// `https://ADDR`.
    pub fn url(&self) -> String {
        format!("https://{}", host_port(self.state.addr))
    }

    /// The cluster CA (PEM) that signed the serving certificate.
    pub fn ca_pem(&self) -> String {
        self.state.tls.ca_pem.clone()
    }

    /// The serving certificate (PEM).
    pub fn serving_cert_pem(&self) -> String {
        self.state.tls.cert_pem.clone()
    }

    /// A token with full rights (`system:masters`).
    pub fn admin_token(&self) -> String {
        self.state.admin_token.clone()
    }

    /// Adds an opaque bearer token that authenticates as `user`.
    pub fn add_static_token(&self, token: &str, user: UserInfo) {
        self.state
            .static_tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.to_string(), user);
    }

    /// The object store (seed and inspect objects).
    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// The service-account issuer (`iss`).
    pub fn issuer(&self) -> String {
        self.state.config.issuer.clone()
    }

    /// Mints a projected service-account token. `audience` `None` is the
    /// API server's own audience (the issuer).
    pub fn mint_service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<(&str, &str)>,
        audience: Option<&[&str]>,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let req = TokenRequest {
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod: pod.map(|(n, u)| (n.to_string(), u.to_string())),
            audience: audience.map(|a| a.iter().map(|s| s.to_string()).collect()),
            ttl,
        };
        let uid = server::service_account_uid(&self.state, namespace, service_account);
        self.state.issuer.mint(&req, &uid)
    }

    /// Signs new tokens with a fresh key; old keys stay valid (and in JWKS)
    /// for `key_retention`. Returns the new key id.
    pub fn rotate_signing_key(&self) -> anyhow::Result<String> {
        self.state.issuer.rotate()
    }

    /// The key id new tokens carry.
    pub fn signing_key_id(&self) -> String {
        self.state.issuer.current_kid()
    }

    /// Changes who may do what (takes effect for the next request).
    pub fn set_authorizer(&self, authorizer: Authorizer) {
        *self
            .state
            .authorizer
            .write()
            .unwrap_or_else(|p| p.into_inner()) = authorizer;
    }

    /// Grants rules to a subject.
    pub fn grant(&self, subject: Subject, rules: Vec<Rule>) {
        self.state
            .authorizer
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .grant(subject, rules);
    }

    /// Port-forward targets of a pod: pod port -> a real address on this machine.
    pub fn set_pod_port(&self, namespace: &str, pod: &str, port: u16, target: SocketAddr) {
        self.state
            .pod_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((namespace.into(), pod.into()))
            .or_default()
            .insert(port, target);
    }

    /// A kubeconfig (YAML) for this simulator with a bearer token.
    pub fn kubeconfig(&self, token: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: kube-sim-user\n  user:\n    token: {token}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim-user\n    namespace: default\ncurrent-context: kube-sim\n",
            self.url()
        )
    }

    /// Writes [`SimHandle::kubeconfig`] to `path` (mode 0600).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing a kubeconfig to {}", path.display()))?;
        f.write_all(self.kubeconfig(token).as_bytes())?;
        Ok(())
    }

    /// The requests received so far (oldest first).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Stops listening and drops every open connection (watches and log
    /// streams end). State, keys and CA are kept for [`SimHandle::restart`].
    pub async fn shutdown(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((cancel, task)) = running {
            cancel.cancel();
            let _ = task.await;
        }
    }

    /// Shuts down (if running) and listens again on the same address with the
    /// same state, as an API server restart looks to clients.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.shutdown().await;
        let mut last = None;
        for _ in 0..50 {
            match bind(self.state.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.expect("tried at least once"))
    }

    /// Watches being served now (each holds a subscription to the store's
    /// events until its client goes away or the watch ends).
    pub fn open_watches(&self) -> usize {
        self.state.store.watchers()
    }

    /// Watches being served now that act as `username` (after
    /// impersonation): one client's watches, whatever else is watching.
    pub fn open_watches_of(&self, username: &str) -> usize {
        self.state
            .watches_by_user
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(username)
            .copied()
            .unwrap_or(0)
    }

    /// Client connections (TCP, after TLS) being served now.
    pub fn open_connections(&self) -> usize {
        self.state
            .open_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Client connections served since start (TLS handshakes completed).
    pub fn served_connections(&self) -> usize {
        self.state
            .served_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether it is serving.
    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some((cancel, task)) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            cancel.cancel();
            task.abort();
        }
    }
}
