//! The webhook over HTTPS: routes, body limits, graceful shutdown, and
//! `chaperone webhook` (its flags and start-up).

use std::{
    convert::Infallible, fs, net::SocketAddr, path::Path, path::PathBuf, process::ExitCode,
    sync::Arc, time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::review::AdmissionReview;
use super::{
    ADMISSION_V1, ATTEST_PATH, DEFAULT_AUDIENCE, DEFAULT_CA_BUNDLE_CONFIGMAP, Injector,
    MAX_REVIEW_BYTES, MUTATE_NAMESPACE_PATH, MUTATE_PATH, Scope,
};
use crate::approval::attest::Signer;
use crate::identity::CredentialMode;
use crate::kstatus;
use crate::tls::reload::{ReloadingCert, ServingCertError};

// === HTTP ===

/// The HTTP answer to one request body on a mutate path: status code and
/// JSON body (an `AdmissionReview`, or a `Status` for a 400).
pub fn review_http(injector: &Injector, body: &[u8], scope: Scope) -> (StatusCode, Vec<u8>) {
    let review: AdmissionReview = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return bad_request(format!(
                "the body is not an admission.k8s.io/v1 AdmissionReview: {error}"
            ));
        }
    };
    if review.api_version != ADMISSION_V1 || review.kind != "AdmissionReview" {
        return bad_request(format!(
            "expected apiVersion {ADMISSION_V1}, kind AdmissionReview, got {} {}: \
             set admissionReviewVersions: [\"v1\"] in the MutatingWebhookConfiguration",
            review.api_version, review.kind
        ));
    }
    if review.request.is_none() {
        return bad_request("the AdmissionReview has no `request`".to_owned());
    }
    let answer = match scope {
        Scope::Approvals => injector.attest(&review),
        _ => injector.mutate(&review, scope),
    };
    if let (Some(request), Some(response)) = (&review.request, &answer.response) {
        let pod = request
            .object
            .as_ref()
            .and_then(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .or(o["metadata"]["generateName"].as_str())
            })
            .unwrap_or_default();
        let namespace = request.namespace.as_deref().unwrap_or_default();
        match (&response.patch, &response.status) {
            (Some(_), _) => {
                tracing::info!(uid = %request.uid, namespace, pod, ?scope, "injected the CA bundle")
            }
            (None, Some(status)) if !response.allowed => {
                tracing::warn!(uid = %request.uid, namespace, pod, message = %status.message, "denied")
            }
            _ => tracing::debug!(uid = %request.uid, namespace, pod, ?scope, "allowed unchanged"),
        }
    }
    let body = serde_json::to_vec(&answer).expect("an AdmissionReview always serializes");
    (StatusCode::OK, body)
}

fn bad_request(message: String) -> (StatusCode, Vec<u8>) {
    tracing::warn!(%message, "malformed admission request");
    (
        StatusCode::BAD_REQUEST,
        kstatus::Status::bad_request(message).to_body(),
    )
}

async fn handle(
    injector: Arc<Injector>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let scope = match (request.method(), path) {
        (&Method::GET, "/healthz" | "/readyz") => return Ok(plain(StatusCode::OK, "ok\n")),
        (&Method::POST, MUTATE_PATH) => Scope::PodLabel,
        (&Method::POST, MUTATE_NAMESPACE_PATH) => Scope::Namespace,
        (&Method::POST, ATTEST_PATH) => Scope::Approvals,
        _ if [
            MUTATE_PATH,
            MUTATE_NAMESPACE_PATH,
            ATTEST_PATH,
            "/healthz",
            "/readyz",
        ]
        .contains(&path) =>
        {
            return Ok(plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
            ));
        }
        _ => return Ok(plain(StatusCode::NOT_FOUND, "not found\n")),
    };
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            let status = if error.is::<http_body_util::LengthLimitError>() {
                kstatus::Status::too_large(format!(
                    "an AdmissionReview is at most {MAX_REVIEW_BYTES} bytes"
                ))
            } else {
                kstatus::Status::bad_request(format!("cannot read the request body: {error}"))
            };
            let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_REQUEST);
            return Ok(json_response(code, status.to_body()));
        }
    };
    let (code, body) = review_http(&injector, &body, scope);
    Ok(json_response(code, body))
}

fn plain(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().expect("valid"));
    response
}

fn json_response(code: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid"),
    );
    response
}

/// Serves the webhook on `listener` until `shutdown` completes, then lets
/// in-flight reviews finish (at most `drain`).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    injector: Arc<Injector>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let injector = injector.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service =
                hyper::service::service_fn(move |request| handle(injector.clone(), request));
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: draining in-flight admission reviews");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some admission reviews did not finish within {drain:?}");
    }
}

// === TLS ===

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Cert(#[from] ServingCertError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The TLS server configuration: HTTP/2 and HTTP/1.1, the certificate from
/// `cert`/`key`, reloaded when they change.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, WebhookError> {
    let resolver = ReloadingCert::new(cert.to_owned(), key.to_owned())?;
    let mut config = ServerConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// === CLI ===

/// `chaperone webhook`: serve the mutating admission webhook over HTTPS.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address to listen on (the Service in deploy/base/webhook targets 8443).
    #[arg(long, env = "CHAPERONE_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM serving certificate (chain), for the Service's DNS name.
    #[arg(long, env = "CHAPERONE_WEBHOOK_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of the serving certificate.
    #[arg(long, env = "CHAPERONE_WEBHOOK_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Credential mode: `impersonate` also sets the token audience.
    #[arg(
        long,
        env = "CHAPERONE_CREDENTIAL_MODE",
        value_enum,
        default_value_t = CredentialMode::Passthrough
    )]
    pub credential_mode: CredentialMode,
    /// The token audience chaperone accepts in impersonate mode.
    #[arg(long, env = "CHAPERONE_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// The ConfigMap (key `ca.crt`, in each agent namespace) holding the
    /// cluster CA and the chaperone CA.
    #[arg(long, env = "CHAPERONE_CA_BUNDLE_CONFIGMAP", default_value = DEFAULT_CA_BUNDLE_CONFIGMAP)]
    pub ca_bundle_configmap: String,
    /// PEM ed25519 private key (PKCS#8) that signs approval decisions on
    /// `/attest`; the node agents hold its public key
    /// (`--approval-verify-key`). Mounted only into the webhook.
    #[arg(long, env = "CHAPERONE_ATTESTATION_KEY")]
    pub attestation_key: Option<PathBuf>,
    /// The image of the `chaperone-gate` init container added to agent
    /// pods. Default: this webhook's own image, read from its Pod
    /// (`CHAPERONE_POD_NAME`, `CHAPERONE_POD_NAMESPACE`).
    #[arg(long, env = "CHAPERONE_GATE_IMAGE")]
    pub gate_image: Option<String>,
    /// This webhook's Pod (downward API), to read its own image from.
    #[arg(long, env = "CHAPERONE_POD_NAME")]
    pub pod_name: Option<String>,
    /// This webhook's namespace (downward API).
    #[arg(long, env = "CHAPERONE_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// How long to keep accepting after SIGTERM, while the API server still
    /// routes to this replica (endpoint removal is not instant).
    #[arg(
        long,
        env = "CHAPERONE_WEBHOOK_SHUTDOWN_DELAY_SECONDS",
        default_value_t = 5
    )]
    pub shutdown_delay_seconds: u64,
    /// How long in-flight reviews may take to finish after that.
    #[arg(long, env = "CHAPERONE_WEBHOOK_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,
}

impl WebhookArgs {
    pub fn injector(&self) -> anyhow::Result<Injector> {
        let attestor = match &self.attestation_key {
            None => None,
            Some(path) => {
                let pem = fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read the attestation key {}: {e}", path.display())
                })?;
                let signer = Signer::from_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("attestation key {}: {e}", path.display()))?;
                Some(Arc::new(signer))
            }
        };
        Ok(Injector {
            mode: self.credential_mode,
            audience: self.audience.clone(),
            ca_bundle_configmap: self.ca_bundle_configmap.clone(),
            attestor,
            gate_image: self.gate_image.clone(),
        })
    }

    /// The gate's image: `--gate-image`, else the image of this webhook's
    /// own container, read from its Pod. An error says what to set.
    pub async fn resolve_gate_image(&self) -> anyhow::Result<String> {
        if let Some(image) = self.gate_image.as_ref().filter(|i| !i.is_empty()) {
            return Ok(image.clone());
        }
        let (Some(name), Some(namespace)) = (&self.pod_name, &self.pod_namespace) else {
            anyhow::bail!(
                "chaperone webhook needs the image of the chaperone-gate init container it adds \
                 to agent pods: pass --gate-image (CHAPERONE_GATE_IMAGE), or set CHAPERONE_POD_NAME and \
                 CHAPERONE_POD_NAMESPACE from the downward API so it reads its own image \
                 (deploy/base/webhook/deployment.yaml)"
            );
        };
        let what_to_check = "check the webhook's Role and RoleBinding (deploy/base/rbac/webhook.yaml: \
                             get pods in its namespace) and that its token is mounted, or pass \
                             --gate-image";
        let client = kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!("cannot reach the API server to read this webhook's Pod {namespace}/{name}: {e}; {what_to_check}")
        })?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client, namespace);
        let pod = pods.get(name).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot read this webhook's Pod {namespace}/{name}: {e}; {what_to_check}"
            )
        })?;
        let containers = pod.spec.map(|s| s.containers).unwrap_or_default();
        containers
            .iter()
            .find(|c| {
                c.args
                    .as_ref()
                    .and_then(|a| a.first())
                    .is_some_and(|a| a == "webhook")
            })
            .or(containers.first())
            .and_then(|c| c.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "this webhook's Pod {namespace}/{name} names no image; pass --gate-image"
                )
            })
    }
}

/// Runs `chaperone webhook` until SIGTERM or SIGINT.
pub fn run(args: WebhookArgs) -> anyhow::Result<ExitCode> {
    let tls = tls_config(&args.tls_cert, &args.tls_key)?;
    let mut injector = args.injector()?;
    if injector.attestor.is_none() {
        tracing::warn!("no --attestation-key: approval decisions sent to {ATTEST_PATH} are denied");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let gate_image = args.resolve_gate_image().await?;
        tracing::info!(image = %gate_image, "agent pods get the chaperone-gate init container");
        injector.gate_image = Some(gate_image);
        let injector = Arc::new(injector);
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| WebhookError::Listen {
                    addr: args.listen,
                    source,
                })?;
        tracing::info!(
            listen = %args.listen,
            mode = args.credential_mode.as_str(),
            bundle = %args.ca_bundle_configmap,
            "serving the admission webhook"
        );
        serve(
            listener,
            tls,
            injector,
            async {
                shutdown_signal().await;
                let delay = Duration::from_secs(args.shutdown_delay_seconds);
                tracing::info!(
                    ?delay,
                    "terminating: still accepting while endpoints update"
                );
                tokio::time::sleep(delay).await;
            },
            Duration::from_secs(args.drain_seconds),
        )
        .await;
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
