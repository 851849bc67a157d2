//! The way to the real API server: pooled HTTP/2 (HTTP/1.1 when the server
//! does not offer h2) over rustls trusting the cluster CA, on sockets that
//! carry chaperone's `SO_MARK` so the eBPF programs never redirect them.
//! Upgrades (exec, attach, port-forward) need HTTP/1.1, so they use a second
//! pool that only offers `http/1.1`.

use std::{sync::Arc, time::Duration};

use http::{Uri, uri::Authority};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::pki_types::ServerName;

use super::body::ProxyBody;
use crate::tls::{ConnectorOptions, connect::marked_http_connector};

/// Where the API server is and how to talk to it.
#[derive(Clone)]
pub struct UpstreamSpec {
    /// `https://host:port` of the API server.
    pub base: Uri,
    /// Trusts the cluster CA (and carries a client certificate, if any).
    pub tls: rustls::ClientConfig,
    /// The name to verify the server certificate against when it differs
    /// from the URL's host (kubeconfig `tls-server-name`).
    pub tls_server_name: Option<String>,
    /// Socket options, including chaperone's `SO_MARK`.
    pub connector: ConnectorOptions,
}

/// Pooled clients to the API server.
#[derive(Clone)]
pub struct Upstream {
    base: Uri,
    authority: Authority,
    pooled: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    upgrades: Client<HttpsConnector<HttpConnector>, ProxyBody>,
}

impl Upstream {
    pub fn new(spec: UpstreamSpec) -> Result<Self, String> {
        let authority = spec
            .base
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream URL {} has no host:port", spec.base))?;
        if spec.base.scheme_str() != Some("https") {
            return Err(format!(
                "upstream URL {} must be https: chaperone only re-originates over TLS",
                spec.base
            ));
        }
        let server_name = match &spec.tls_server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| format!("tls-server-name {name:?} is not a valid name"))?,
            ),
            None => None,
        };
        let tcp = marked_http_connector(&spec.connector);
        // hyper-rustls sets ALPN from the versions enabled below: h2 and
        // http/1.1 for the pool, http/1.1 alone for upgrades.
        let mut h1_tls = spec.tls.clone();
        h1_tls.alpn_protocols.clear();
        let mut any_tls = spec.tls;
        any_tls.alpn_protocols.clear();

        let pooled = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_adaptive_window(true)
            .build(https(any_tls, &server_name, true, tcp.clone()));
        let upgrades = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(https(h1_tls, &server_name, false, tcp));
        Ok(Upstream {
            base: spec.base,
            authority,
            pooled,
            upgrades,
        })
    }

    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// The upstream URI for an agent's request path and query.
    pub fn uri_for(&self, path_and_query: Option<&http::uri::PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).expect("scheme, authority and path make a URI")
    }

    pub async fn send(
        &self,
        request: http::Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        if upgrade {
            self.upgrades.request(request).await
        } else {
            self.pooled.request(request).await
        }
    }
}

/// hyper-rustls over the marked TCP connector; `h2` offers HTTP/2 as well
/// as HTTP/1.1 (ALPN is set by hyper-rustls from these choices).
fn https(
    tls: rustls::ClientConfig,
    server_name: &Option<ServerName<'static>>,
    h2: bool,
    tcp: HttpConnector,
) -> HttpsConnector<HttpConnector> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    match (server_name, h2) {
        (Some(name), true) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name.clone()))
            .enable_all_versions()
            .wrap_connector(tcp),
        (Some(name), false) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name.clone()))
            .enable_http1()
            .wrap_connector(tcp),
        (None, true) => builder.enable_all_versions().wrap_connector(tcp),
        (None, false) => builder.enable_http1().wrap_connector(tcp),
    }
}

/// A rustls client config trusting exactly the given PEM CA bundle.
pub fn client_tls_trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| format!("the CA bundle is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA bundle holds a certificate rustls refuses: {e}"))?;
        found += 1;
    }
    if found == 0 {
        return Err("the CA bundle holds no certificate".into());
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}
