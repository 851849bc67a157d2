//! `chaperone gate` against local TLS servers: one presenting a leaf from
//! chaperone's CA (what a redirected pod reaches: the node agent's proxy),
//! one presenting a leaf from another CA (what an unguarded pod reaches:
//! the API server itself).

use std::{net::IpAddr, path::Path, process::Output, sync::Arc, time::Duration};

use chaperone::tls::{LeafCache, LeafConfig, LocalCa};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A CA in `dir` (its `ca.crt` written there) and a TLS server on `ip`
/// presenting the leaf chaperone's proxy would present for that address.
async fn serve_leaf(dir: &Path, listener: TcpListener) {
    let ca = Arc::new(LocalCa::load_or_create(dir).unwrap());
    let ip = listener.local_addr().unwrap().ip();
    let leaf = LeafCache::new(ca, LeafConfig::default())
        .get(None, ip)
        .unwrap();
    let acceptor = TlsAcceptor::from(leaf.server_config.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
}

async fn listen(ip: IpAddr) -> TcpListener {
    TcpListener::bind((ip, 0)).await.unwrap()
}

async fn gate(args: &[&str], host: &str, port: u16) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .arg("gate")
        .args(args)
        // As in a pod: the kubelet sets these.
        .env("KUBERNETES_SERVICE_HOST", host)
        .env("KUBERNETES_SERVICE_PORT", port.to_string())
        .env_remove("CHAPERONE_LOG_FORMAT")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_pod_redirected_to_chaperone_passes_the_gate() {
    let chaperone = tempfile::tempdir().unwrap();
    let listener = listen([127, 0, 0, 1].into()).await;
    let port = listener.local_addr().unwrap().port();
    serve_leaf(chaperone.path(), listener).await;
    let ca = chaperone.path().join("ca.crt");
    let output = gate(
        &["--ca", ca.to_str().unwrap(), "--timeout", "10s"],
        "127.0.0.1",
        port,
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("guarded"), "{}", stderr(&output));
}

#[tokio::test]
async fn an_ipv6_service_address_is_dialed_and_verified_as_an_ip() {
    let chaperone = tempfile::tempdir().unwrap();
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        eprintln!("skipped: no IPv6 loopback on this host");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    serve_leaf(chaperone.path(), listener).await;
    let ca = chaperone.path().join("ca.crt");
    let output = gate(
        &["--ca", ca.to_str().unwrap(), "--timeout", "10s"],
        "::1",
        port,
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
}

#[tokio::test]
async fn a_pod_reaching_the_real_api_server_waits_then_gives_up_saying_what_to_check() {
    let chaperone = tempfile::tempdir().unwrap();
    LocalCa::load_or_create(chaperone.path()).unwrap();
    let cluster = tempfile::tempdir().unwrap();
    let listener = listen([127, 0, 0, 1].into()).await;
    let port = listener.local_addr().unwrap().port();
    serve_leaf(cluster.path(), listener).await;
    let ca = chaperone.path().join("ca.crt");
    let started = std::time::Instant::now();
    let output = gate(
        &[
            "--ca",
            ca.to_str().unwrap(),
            "--timeout",
            "3s",
            "--interval",
            "1s",
        ],
        "127.0.0.1",
        port,
    )
    .await;
    let text = stderr(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "kept waiting until --timeout, gave up after {:?}",
        started.elapsed()
    );
    assert!(text.contains("not guarded yet"), "{text}");
    assert!(text.contains("not issued by chaperone's CA"), "{text}");
    assert!(text.contains("kubectl chaperone status"), "{text}");
    assert!(text.contains("still not guarded after"), "{text}");
}

#[tokio::test]
async fn the_gate_opens_once_the_node_agent_is_back() {
    let chaperone = tempfile::tempdir().unwrap();
    LocalCa::load_or_create(chaperone.path()).unwrap();
    // Reserve a port, free it: refused until the "node agent" listens there.
    let port = listen([127, 0, 0, 1].into())
        .await
        .local_addr()
        .unwrap()
        .port();
    let ca = chaperone.path().join("ca.crt");
    let ca_arg = ca.to_str().unwrap().to_owned();
    let gate = tokio::spawn(async move {
        gate(
            &["--ca", &ca_arg, "--timeout", "20s", "--interval", "1s"],
            "127.0.0.1",
            port,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !gate.is_finished(),
        "the gate must wait while nothing guards the pod"
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    serve_leaf(chaperone.path(), listener).await;
    let output = tokio::time::timeout(Duration::from_secs(15), gate)
        .await
        .expect("the gate opens soon after")
        .unwrap();
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("cannot connect"), "{text}");
}

#[test]
fn a_missing_ca_is_a_configuration_error_that_says_where_the_ca_comes_from() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args([
            "gate",
            "--ca",
            "/nonexistent/chaperone-ca.crt",
            "--host",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        text.contains("/nonexistent/chaperone-ca.crt") && text.contains("bootstrap-certs.sh"),
        "{text}"
    );
}
