//! The admission webhook, called with real `AdmissionReview` requests.
//!
//! Golden files in `tests/golden/webhook/`: `<case>.request.json` is what the
//! API server sends, `<case>.response.json` what the webhook must answer,
//! `<case>.patch.json` the decoded JSON Patch (for reviewers; checked too).
//! `UPDATE_GOLDEN=1 cargo test -p chaperone --test webhook` rewrites the
//! expected files; review the diff before committing it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use chaperone::webhook::{
    AdmissionReview, CredentialMode, DEFAULT_AUDIENCE, DEFAULT_CA_BUNDLE_CONFIGMAP,
    INJECTED_ANNOTATION, Injector, Scope, serve, tls_config,
};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

struct Case {
    name: &'static str,
    scope: Scope,
    mode: CredentialMode,
}

const CASES: &[Case] = &[
    Case {
        name: "labeled-pod",
        scope: Scope::PodLabel,
        mode: CredentialMode::Passthrough,
    },
    Case {
        name: "unlabeled-pod",
        scope: Scope::PodLabel,
        mode: CredentialMode::Passthrough,
    },
    Case {
        name: "namespace-scoped-pod",
        scope: Scope::Namespace,
        mode: CredentialMode::Passthrough,
    },
    Case {
        name: "no-token-volume",
        scope: Scope::PodLabel,
        mode: CredentialMode::Passthrough,
    },
    Case {
        name: "already-patched",
        scope: Scope::PodLabel,
        mode: CredentialMode::Passthrough,
    },
    Case {
        name: "impersonate-pod",
        scope: Scope::PodLabel,
        mode: CredentialMode::Impersonate,
    },
    Case {
        name: "not-a-pod",
        scope: Scope::PodLabel,
        mode: CredentialMode::Passthrough,
    },
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/webhook")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn injector(mode: CredentialMode) -> Injector {
    Injector {
        mode,
        ..Injector::default()
    }
}

fn request(case: &Case) -> AdmissionReview {
    let path = golden_dir().join(format!("{}.request.json", case.name));
    serde_json::from_value(read_json(&path)).expect("a valid AdmissionReview")
}

/// Compares `actual` with a golden file, or rewrites it under UPDATE_GOLDEN.
fn check_golden(file: &str, actual: &Value) {
    let path = golden_dir().join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
        return;
    }
    let expected = read_json(&path);
    assert_eq!(
        &expected,
        actual,
        "{file} differs from the webhook's answer:\n{}",
        serde_json::to_string_pretty(actual).unwrap()
    );
}

fn decoded_patch(review: &AdmissionReview) -> Option<Value> {
    let response = review.response.as_ref().expect("a response");
    response
        .decoded_patch()
        .map(|p| p.expect("the patch is base64 JSON"))
}

#[test]
fn responses_match_the_golden_files() {
    for case in CASES {
        let answer = injector(case.mode).mutate(&request(case), case.scope);
        check_golden(
            &format!("{}.response.json", case.name),
            &serde_json::to_value(&answer).unwrap(),
        );
        let patch_file = format!("{}.patch.json", case.name);
        match decoded_patch(&answer) {
            Some(patch) => check_golden(&patch_file, &patch),
            None => assert!(
                !golden_dir().join(&patch_file).exists(),
                "{}: expected a patch ({patch_file} exists) but got none",
                case.name
            ),
        }
    }
}

#[test]
fn the_response_echoes_the_uid_and_speaks_admission_v1() {
    for case in CASES {
        let review = request(case);
        let answer = injector(case.mode).mutate(&review, case.scope);
        assert_eq!(answer.api_version, "admission.k8s.io/v1", "{}", case.name);
        assert_eq!(answer.kind, "AdmissionReview");
        assert!(answer.request.is_none());
        let response = answer.response.unwrap();
        assert_eq!(response.uid, review.request.unwrap().uid, "{}", case.name);
        if response.patch.is_some() {
            assert_eq!(response.patch_type.as_deref(), Some("JSONPatch"));
        }
    }
}

#[test]
fn which_pods_are_patched() {
    let patched: Vec<&str> = CASES
        .iter()
        .filter(|case| {
            let answer = injector(case.mode).mutate(&request(case), case.scope);
            decoded_patch(&answer).is_some()
        })
        .map(|case| case.name)
        .collect();
    assert_eq!(
        patched,
        ["labeled-pod", "namespace-scoped-pod", "impersonate-pod"]
    );
    let denied: Vec<&str> = CASES
        .iter()
        .filter(|case| {
            let answer = injector(case.mode).mutate(&request(case), case.scope);
            !answer.response.unwrap().allowed
        })
        .map(|case| case.name)
        .collect();
    assert_eq!(denied, ["not-a-pod"]);
}

/// Applies the patch the way the API server does and checks the result is
/// still a Pod, now trusting the bundle, and that a second pass is a no-op.
#[test]
fn patched_pods_are_valid_pods_that_trust_chaperone_and_are_not_patched_twice() {
    for case in CASES {
        let review = request(case);
        let injector = injector(case.mode);
        let answer = injector.mutate(&review, case.scope);
        let Some(patch) = decoded_patch(&answer) else {
            continue;
        };
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        let mut object = review.request.as_ref().unwrap().object.clone().unwrap();
        json_patch::patch(&mut object, &patch)
            .unwrap_or_else(|e| panic!("{}: the patch does not apply: {e}", case.name));

        let pod: Pod = serde_json::from_value(object.clone())
            .unwrap_or_else(|e| panic!("{}: the patched object is not a Pod: {e}", case.name));
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get(INJECTED_ANNOTATION).map(String::as_str),
            Some(case.mode.as_str()),
            "{}",
            case.name
        );
        let volume = pod
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name.starts_with("kube-api-access-"))
            .unwrap();
        let sources = volume.projected.as_ref().unwrap().sources.as_ref().unwrap();
        let config_maps: Vec<&str> = sources
            .iter()
            .filter_map(|s| s.config_map.as_ref())
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(config_maps, [DEFAULT_CA_BUNDLE_CONFIGMAP], "{}", case.name);
        let audiences: Vec<Option<&str>> = sources
            .iter()
            .filter_map(|s| s.service_account_token.as_ref())
            .map(|t| t.audience.as_deref())
            .collect();
        let expected_audience = match case.mode {
            CredentialMode::Passthrough => None,
            CredentialMode::Impersonate => Some(DEFAULT_AUDIENCE),
        };
        assert_eq!(audiences, [expected_audience], "{}", case.name);
        // Everything else is untouched: the containers are byte-for-byte the same.
        assert_eq!(
            object["spec"]["containers"],
            review.request.as_ref().unwrap().object.as_ref().unwrap()["spec"]["containers"]
        );

        let mut again = review.clone();
        again.request.as_mut().unwrap().object = Some(object);
        let second = injector.mutate(&again, case.scope);
        let response = second.response.unwrap();
        assert!(response.allowed, "{}", case.name);
        assert!(
            response.patch.is_none(),
            "{}: patched twice: {:?}",
            case.name,
            response.decoded_patch()
        );
    }
}

// === over HTTPS, as the API server calls it ===

struct Served {
    addr: std::net::SocketAddr,
    ca: rustls::pki_types::CertificateDer<'static>,
    stop: tokio::sync::oneshot::Sender<()>,
    dir: tempfile::TempDir,
}

/// A fresh CA and a serving certificate for the webhook's Service name,
/// written to `dir` as `tls.crt`/`tls.key`; returns the CA certificate.
fn issue_certificate(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["chaperone-webhook.chaperone-system.svc".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
    std::fs::write(dir.join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), leaf_key.serialize_pem()).unwrap();
    ca_cert.der().clone()
}

async fn start_webhook(injector: Injector) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let ca = issue_certificate(dir.path());
    let tls = tls_config(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        tls,
        Arc::new(injector),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    Served {
        addr,
        ca,
        stop,
        dir,
    }
}

async fn call(served: &Served, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    call_trusting(served, &served.ca, method, path, body)
        .await
        .expect("TLS handshake with the webhook")
}

async fn call_trusting(
    served: &Served,
    ca: &rustls::pki_types::CertificateDer<'static>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(served.addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from("chaperone-webhook.chaperone-system.svc").unwrap();
    let tls = connector.connect(name, tcp).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "chaperone-webhook.chaperone-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok((status, body.to_vec()))
}

#[tokio::test]
async fn the_https_server_answers_reviews_health_and_malformed_bodies() {
    let served = start_webhook(Injector::default()).await;

    let labeled = std::fs::read(golden_dir().join("labeled-pod.request.json")).unwrap();
    let (status, body) = call(&served, "POST", "/mutate", labeled).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer,
        read_json(&golden_dir().join("labeled-pod.response.json"))
    );

    // The namespace-scoped path patches an unlabeled pod; /mutate does not.
    let unlabeled = std::fs::read(golden_dir().join("unlabeled-pod.request.json")).unwrap();
    let (_, body) = call(&served, "POST", "/mutate", unlabeled.clone()).await;
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    let (_, body) = call(&served, "POST", "/mutate/namespace", unlabeled).await;
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["patchType"], "JSONPatch", "{answer}");

    let (status, body) = call(&served, "POST", "/mutate", b"{\"kind\":".to_vec()).await;
    assert_eq!(status, 400);
    let status_body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status_body["kind"], "Status");
    assert_eq!(status_body["reason"], "BadRequest");

    for path in ["/healthz", "/readyz"] {
        let (status, body) = call(&served, "GET", path, Vec::new()).await;
        assert_eq!((status, body.as_slice()), (200, b"ok\n".as_slice()));
    }
    assert_eq!(call(&served, "GET", "/mutate", Vec::new()).await.0, 405);
    assert_eq!(call(&served, "POST", "/elsewhere", Vec::new()).await.0, 404);

    served.stop.send(()).unwrap();
}

#[tokio::test]
async fn a_rotated_serving_certificate_is_picked_up_without_a_restart() {
    let served = start_webhook(Injector::default()).await;
    assert_eq!(call(&served, "GET", "/readyz", Vec::new()).await.0, 200);

    // The Secret is rotated: new files, signed by a new CA. Kubernetes swaps
    // a symlink, so the files' modification time changes; make sure it does
    // even on a coarse-grained filesystem clock.
    let old_ca = served.ca.clone();
    let new_ca = issue_certificate(served.dir.path());
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    for file in ["tls.crt", "tls.key"] {
        std::fs::File::options()
            .write(true)
            .open(served.dir.path().join(file))
            .unwrap()
            .set_modified(later)
            .unwrap();
    }

    let (status, _) = call_trusting(&served, &new_ca, "GET", "/readyz", Vec::new())
        .await
        .expect("the new certificate is served");
    assert_eq!(status, 200);
    assert!(
        call_trusting(&served, &old_ca, "GET", "/readyz", Vec::new())
            .await
            .is_err(),
        "the old certificate is no longer served"
    );

    // A broken pair (half-written rotation) keeps the last good certificate.
    std::fs::write(served.dir.path().join("tls.key"), "not a key").unwrap();
    std::fs::File::options()
        .write(true)
        .open(served.dir.path().join("tls.key"))
        .unwrap()
        .set_modified(later + Duration::from_secs(5))
        .unwrap();
    let (status, _) = call_trusting(&served, &new_ca, "GET", "/readyz", Vec::new())
        .await
        .expect("the last good certificate is still served");
    assert_eq!(status, 200);
    served.stop.send(()).unwrap();
}

#[test]
fn certificate_problems_are_reported_with_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let missing = tls_config(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("tls.crt") && missing.contains("--tls-cert"),
        "{missing}"
    );

    issue_certificate(dir.path());
    let other = tempfile::tempdir().unwrap();
    issue_certificate(other.path());
    let mismatched = tls_config(&dir.path().join("tls.crt"), &other.path().join("tls.key"))
        .unwrap_err()
        .to_string();
    assert!(mismatched.contains("does not fit"), "{mismatched}");

    std::fs::write(dir.path().join("empty.crt"), "").unwrap();
    let empty = tls_config(&dir.path().join("empty.crt"), &dir.path().join("tls.key"))
        .unwrap_err()
        .to_string();
    assert!(empty.contains("holds no PEM certificate"), "{empty}");
}

#[test]
fn chaperone_webhook_flags_configure_the_injector() {
    use chaperone::cli::{Cli, Command};
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "chaperone",
        "webhook",
        "--tls-cert",
        "/certs/tls.crt",
        "--tls-key",
        "/certs/tls.key",
        "--credential-mode",
        "impersonate",
        "--audience",
        "gate.example.com",
        "--gate-image",
        "registry.example/chaperone:1.2",
    ])
    .unwrap();
    let Command::Webhook(args) = cli.command else {
        panic!("parsed as another command");
    };
    assert_eq!(args.listen.port(), 8443);
    assert_eq!(
        args.injector().unwrap(),
        Injector {
            mode: CredentialMode::Impersonate,
            audience: "gate.example.com".to_owned(),
            ca_bundle_configmap: DEFAULT_CA_BUNDLE_CONFIGMAP.to_owned(),
            attestor: None,
            gate_image: Some("registry.example/chaperone:1.2".to_owned()),
        }
    );
    let error = Cli::try_parse_from([
        "chaperone",
        "webhook",
        "--tls-cert",
        "c",
        "--tls-key",
        "k",
        "--credential-mode",
        "sudo",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("passthrough") && error.contains("impersonate"),
        "{error}"
    );
}

/// The API server's webhook client (Go's net/http) negotiates HTTP/2.
#[tokio::test]
async fn reviews_are_answered_over_http2() {
    let served = start_webhook(Injector::default()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(served.ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let name =
        rustls::pki_types::ServerName::try_from("chaperone-webhook.chaperone-system.svc").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let body = std::fs::read(golden_dir().join("impersonate-pod.request.json")).unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri("https://chaperone-webhook.chaperone-system.svc/mutate")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    // Served in passthrough mode: the CA bundle, no audience.
    let patch = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            answer["response"]["patch"].as_str().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        patch.contains(DEFAULT_CA_BUNDLE_CONFIGMAP) && !patch.contains("audience"),
        "{patch}"
    );
    served.stop.send(()).unwrap();
}

// === the `chaperone webhook` process ===

#[tokio::test]
async fn chaperone_webhook_serves_until_sigterm_then_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = issue_certificate(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(["webhook", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .args(["--shutdown-delay-seconds", "2", "--drain-seconds", "1"])
        .args(["--gate-image", "chaperone:test"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (stop, _stopped) = tokio::sync::oneshot::channel();
    let served = Served {
        addr: ([127, 0, 0, 1], port).into(),
        ca,
        stop,
        dir,
    };
    let ready = async {
        loop {
            if let Ok((200, _)) =
                call_trusting(&served, &served.ca, "GET", "/readyz", Vec::new()).await
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .expect("chaperone webhook became ready");

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // Still answering while the API server may route to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let labeled = std::fs::read(golden_dir().join("labeled-pod.request.json")).unwrap();
    assert_eq!(call(&served, "POST", "/mutate", labeled).await.0, 200);

    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after the delay and the drain")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn chaperone_webhook_without_its_certificate_says_what_to_mount() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args([
            "webhook",
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/tls.crt") && stderr.contains("Secret"),
        "{stderr}"
    );
}

#[test]
fn chaperone_webhook_without_a_gate_image_refuses_to_start_and_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    issue_certificate(dir.path());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(["webhook", "--listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .env_remove("CHAPERONE_GATE_IMAGE")
        .env_remove("CHAPERONE_POD_NAME")
        .env_remove("CHAPERONE_POD_NAMESPACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--gate-image") && stderr.contains("POD_NAME"),
        "{stderr}"
    );
}
