//! `chaperone gate`: the init container the webhook prepends to every agent
//! pod (`chaperone-gate`), so that an agent pod never runs unguarded.
//!
//! An agent pod that starts on a node where no node agent runs (a drain, a
//! DaemonSet rolling update, a crash loop) is in no agent map, so its
//! connections would reach the API server directly. The gate holds the
//! pod's containers back until they would not: it dials the API server the
//! way in-cluster clients do (`$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`,
//! the service IP as the TLS server name) and completes a TLS handshake
//! trusting **only chaperone's CA**. Only chaperone's proxy holds a
//! certificate signed by it, so a completed handshake proves the pod's
//! cgroup is redirected: exit 0 and the kubelet starts the containers.
//! Anything else (the real API server's certificate, a refused or silent
//! connection) means not guarded yet: one log line says what to check, the
//! gate retries every `--interval`, and after `--timeout` exits 1 (the
//! kubelet restarts the init container with back-off).

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The name of the init container the webhook injects.
pub const GATE_CONTAINER: &str = "chaperone-gate";
/// Where the gate container finds chaperone's CA.
pub const GATE_CA_DIR: &str = "/etc/chaperone/gate";
/// The file in [`GATE_CA_DIR`] (and the key of the CA-bundle ConfigMap)
/// holding chaperone's CA alone.
pub const GATE_CA_FILE: &str = "chaperone-ca.crt";

/// `chaperone gate`: wait until this pod's API connections reach
/// chaperone's proxy.
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// PEM file with chaperone's CA: the only CA the handshake trusts.
    #[arg(long, env = "CHAPERONE_GATE_CA", default_value_t = default_ca())]
    pub ca: String,
    /// The API server's address as the pod sees it (an IP, IPv6 without
    /// brackets, or a name).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub host: String,
    /// The API server's port as the pod sees it.
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", default_value_t = 443)]
    pub port: u16,
    /// Give up (exit 1) after this long; the kubelet then restarts the gate.
    #[arg(long, env = "CHAPERONE_GATE_TIMEOUT", default_value = "10m",
          value_parser = crate::config::parse_duration_with_unit)]
    pub timeout: Duration,
    /// Time between two attempts.
    #[arg(long, env = "CHAPERONE_GATE_INTERVAL", default_value = "1s",
          value_parser = crate::config::parse_duration_with_unit)]
    pub interval: Duration,
}

fn default_ca() -> String {
    format!("{GATE_CA_DIR}/{GATE_CA_FILE}")
}

/// Why one attempt did not prove the pod guarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotGuarded(pub String);

/// The client side of one attempt: chaperone's CA as the only root, the
/// server name in-cluster clients verify.
#[derive(Clone)]
pub struct Probe {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    attempt_timeout: Duration,
}

impl Probe {
    /// Reads chaperone's CA and resolves `host:port`. Errors are
    /// configuration mistakes that no retry fixes.
    pub async fn new(args: &GateArgs) -> anyhow::Result<Self> {
        let pem = std::fs::read(&args.ca).map_err(|e| {
            anyhow::anyhow!(
                "cannot read chaperone's CA {}: {e}; it comes from the `{GATE_CA_FILE}` key of \
                 the chaperone-ca-bundle ConfigMap in this namespace: run \
                 deploy/bootstrap-certs.sh NAMESPACE",
                args.ca
            )
        })?;
        let mut roots = RootCertStore::empty();
        for cert in crate::tls::parse_certificates(&args.ca, &pem)? {
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("chaperone's CA {}: {e}", args.ca))?;
        }
        let config = ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        if args.host.is_empty() {
            anyhow::bail!(
                "KUBERNETES_SERVICE_HOST is empty: run the gate in a pod, or pass --host"
            );
        }
        let (addr, server_name) = match args.host.parse::<IpAddr>() {
            Ok(ip) => (
                SocketAddr::new(ip, args.port),
                ServerName::IpAddress(ip.into()),
            ),
            Err(_) => {
                let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
                    .await
                    .ok()
                    .and_then(|mut addrs| addrs.next())
                    .ok_or_else(|| {
                        anyhow::anyhow!("cannot resolve the API server's name {}", args.host)
                    })?;
                let name = ServerName::try_from(args.host.clone()).map_err(|e| {
                    anyhow::anyhow!("{} is not a valid TLS server name: {e}", args.host)
                })?;
                (addr, name)
            }
        };
        Ok(Self {
            addr,
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            attempt_timeout: Duration::from_secs(5).min(args.timeout.max(args.interval)),
        })
    }

    /// The address dialed.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One attempt: `Ok` when the handshake completed with a certificate
    /// signed by chaperone's CA for the server name.
    pub async fn once(&self) -> Result<(), NotGuarded> {
        let attempt = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| NotGuarded(format!("cannot connect to {}: {e}", self.addr)))?;
            let mut tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| NotGuarded(describe_tls_error(self.addr, &e)))?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            Ok(())
        };
        match tokio::time::timeout(self.attempt_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(NotGuarded(format!(
                "no TLS handshake with {} within {:?}",
                self.addr, self.attempt_timeout
            ))),
        }
    }
}

fn describe_tls_error(addr: SocketAddr, error: &std::io::Error) -> String {
    let certificate = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
    if certificate {
        format!(
            "{addr} answered with a certificate not issued by chaperone's CA ({error}): \
             this is the API server itself, so this pod's connections are not redirected"
        )
    } else {
        format!("TLS handshake with {addr} failed: {error}")
    }
}

/// Retries [`Probe::once`] every `interval` until it succeeds (`Ok`) or
/// `timeout` has passed (`Err` with the last reason). Logs one line when
/// the reason changes and then every 30 attempts.
pub async fn wait(probe: &Probe, interval: Duration, timeout: Duration) -> Result<u32, NotGuarded> {
    let start = Instant::now();
    let mut last: Option<NotGuarded> = None;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match probe.once().await {
            Ok(()) => return Ok(attempts),
            Err(reason) => {
                if last.as_ref() != Some(&reason) || attempts.is_multiple_of(30) {
                    tracing::warn!(
                        "not guarded yet: {}; this pod waits in Init until chaperone's node \
                         agent on this node redirects it: check `kubectl chaperone status` and \
                         the chaperone-node pod on this node (kubectl -n chaperone-system get \
                         pods -o wide)",
                        reason.0
                    );
                }
                last = Some(reason);
            }
        }
        let Some(left) = timeout
            .checked_sub(start.elapsed())
            .filter(|l| !l.is_zero())
        else {
            return Err(last.expect("at least one attempt failed"));
        };
        tokio::time::sleep(interval.min(left)).await;
    }
}

/// Runs `chaperone gate`.
pub fn run(args: GateArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let probe = Probe::new(&args).await?;
        match wait(&probe, args.interval, args.timeout).await {
            Ok(attempts) => {
                tracing::info!(
                    addr = %probe.addr(),
                    attempts,
                    "guarded: the API server address is answered by chaperone's proxy"
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(reason) => {
                tracing::error!(
                    "still not guarded after {:?}: {}; giving up so the kubelet restarts this \
                     init container: check `kubectl chaperone status` and the chaperone-node \
                     pod on this node",
                    args.timeout,
                    reason.0
                );
                Ok(ExitCode::FAILURE)
            }
        }
    })
}
