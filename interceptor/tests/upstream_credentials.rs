//! Agents never borrow chaperone's credentials: with a kubeconfig that
//! authenticates chaperone by client certificate, an agent's request
//! forwarded in passthrough mode reaches the API server with the agent's
//! token and no client certificate (an API server prefers the certificate,
//! so the agent would act as chaperone). Only requests sent with
//! chaperone's own credentials present it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use chaperone::{
    proxy::{Passthrough, Proxy, ProxyConfig, StaticTls, Upstream, UpstreamSpec},
    tls::UpstreamConfig,
};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    client_cert_pem: String,
    client_key_pem: String,
}

fn pki() -> Pki {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cluster ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "system:serviceaccount:chaperone-system:chaperone",
    );
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_chain: vec![server.der().clone()],
        server_key: server_key.serialize_der(),
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// `(client certificate presented, Authorization)` per request.
type Seen = Arc<Mutex<Vec<(bool, Option<String>)>>>;

/// An API server stand-in that asks for (but does not require) a client
/// certificate, as kube-apiserver does, and records what it got.
async fn api_server(pki: &Pki, seen: Seen) -> SocketAddr {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pki.server_chain.clone(),
            PrivateKeyDer::Pkcs8(pki.server_key.clone().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let presented = tls.get_ref().1.peer_certificates().is_some();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let authorization = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    seen.lock().unwrap().push((presented, authorization));
                    async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn kubeconfig(pki: &Pki, server: SocketAddr) -> tempfile::NamedTempFile {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: chaperone\n\
             clusters:\n- name: c\n  cluster:\n    server: https://{server}\n    certificate-authority-data: {}\n\
             users:\n- name: chaperone\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
             contexts:\n- name: chaperone\n  context: {{cluster: c, user: chaperone}}\n",
            b64(&pki.ca_pem),
            b64(&pki.client_cert_pem),
            b64(&pki.client_key_pem),
        ),
    )
    .unwrap();
    file
}

#[tokio::test]
async fn agent_requests_never_carry_chaperones_client_certificate() {
    let pki = pki();
    let seen: Seen = Arc::default();
    let server = api_server(&pki, seen.clone()).await;
    let kubeconfig = kubeconfig(&pki, server);
    let config = UpstreamConfig::from_kubeconfig(kubeconfig.path(), None).unwrap();
    assert!(
        config.client_identity.is_some(),
        "the kubeconfig has a client certificate"
    );
    for http1_connections in [0, 4] {
        let upstream = Upstream::new(UpstreamSpec {
            base: config.server.clone(),
            tls: config.client_config().unwrap(),
            tls_server_name: None,
            connector: chaperone::tls::ConnectorOptions {
                connect_timeout: Duration::from_secs(2),
                keepalive: None,
            },
            streams_per_connection: 2,
            http1_connections,
        })
        .unwrap();

        // An agent's request through the proxy, passthrough mode.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let mut proxy_tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                pki.server_chain.clone(),
                PrivateKeyDer::Pkcs8(pki.server_key.clone().into()),
            )
            .unwrap();
        proxy_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let terminator = Arc::new(StaticTls(tokio_rustls::TlsAcceptor::from(Arc::new(
            proxy_tls,
        ))));
        let proxy = Proxy::new(
            ProxyConfig {
                require_attestation: false,
                ..ProxyConfig::default()
            },
            Passthrough,
            upstream.clone(),
            terminator,
            Arc::new(()),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(proxy.serve(vec![listener], async {
            let _ = stopped.await;
        }));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(
                    chaperone::proxy::upstream::client_tls_trusting(pki.ca_pem.as_bytes()).unwrap(),
                )
                .https_only()
                .enable_http1()
                .enable_http2()
                .build(),
        );
        for path in ["/api/v1/namespaces/default/pods", "/api/v1/pods?watch=true"] {
            let response = client
                .request(
                    Request::get(format!("https://localhost:{}{path}", proxy_addr.port()))
                        .header("authorization", "Bearer agent-token")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let _ = response.into_body().collect().await;
        }
        {
            let mut seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 2);
            for (presented, authorization) in seen.drain(..) {
                assert!(
                    !presented,
                    "an agent's request carried chaperone's client certificate upstream"
                );
                assert_eq!(authorization.as_deref(), Some("Bearer agent-token"));
            }
        }

        // chaperone's own requests (impersonate mode) present it.
        let own = upstream.with_own_credentials();
        let response = own
            .send(
                Request::get(own.uri_for(Some(&"/version".parse().unwrap())))
                    .body(chaperone::proxy::body::empty())
                    .unwrap(),
                false,
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            seen.lock().unwrap().drain(..).collect::<Vec<_>>(),
            [(true, None)]
        );

        let _ = stop.send(());
        let _ = served.await;
    }
}
