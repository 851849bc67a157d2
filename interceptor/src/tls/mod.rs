//! TLS on both sides of the proxy.
//!
//! - [`ca`]: chaperone's own CA ([`LocalCa`]), created once and kept on disk
//!   (`ca.crt`, `ca.key` 0600 in a 0700 directory), or read from a
//!   Kubernetes Secret in cluster mode. Agent pods trust it through the bundle
//!   `chaperone ca export` prints.
//! - [`leaf`]: short-lived leaf certificates for the API-server names and the
//!   address an agent dialed, issued on demand, cached and renewed
//!   ([`LeafCache`]).
//! - [`server`]: the TLS terminator for redirected agent connections
//!   ([`TlsTerminator`]); the certificate is chosen per connection from the
//!   SNI and the original destination, because kubectl sends no SNI when the
//!   server is an IP address.
//! - [`upstream`]: how chaperone reaches the real API server
//!   ([`UpstreamConfig`]: in-cluster or kubeconfig, cluster CA, credentials).
//! - [`connect`]: the connector for hyper-util's client. Upstream sockets
//!   carry no mark: the eBPF programs leave them alone because chaperone's
//!   cgroup is not an agent cgroup.
//! - [`reload`]: a serving certificate re-read from its files after a
//!   rotation ([`reload::ReloadingCert`]; the admission webhook's).
//! - [`cli`]: `chaperone ca init|show|export`.

pub mod ca;
pub mod cli;
pub mod connect;
pub mod leaf;
pub mod reload;
pub mod server;
pub mod upstream;

use std::{io, path::PathBuf};

pub use ca::{CaInfo, CaOpened, LocalCa};
pub use connect::{
    ConnectorOptions, UpstreamConnector, socket_mark, upstream_client, upstream_connector,
};
pub use leaf::{Clock, Leaf, LeafCache, LeafConfig};
pub use server::{Alpn, TlsTerminator, negotiated_alpn};
pub use upstream::{BearerToken, ClientIdentity, UpstreamConfig};

/// Everything that can go wrong with certificates, keys and upstream trust.
/// Each message names the file or setting to check.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); a CA key must be private: \
         run `chmod 600 {path}` (and check who could have read it)"
    )]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error(
        "{path} is writable by group or others (mode {mode:o}); anyone could replace the CA: \
         run `chmod 700 {path}`"
    )]
    DirTooOpen { path: PathBuf, mode: u32 },
    #[error(
        "{present} exists but {missing} does not; refusing to create a new CA over half of an \
         old one: restore {missing}, or move {present} away to start over"
    )]
    HalfCa { present: PathBuf, missing: PathBuf },
    #[error("{what} is not a usable certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("{what} is not a usable private key: {reason}")]
    BadKey { what: String, reason: String },
    #[error(
        "the CA key in {key} does not belong to the certificate in {cert}; restore the matching \
         pair (chaperone never overwrites an existing CA)"
    )]
    KeyMismatch { cert: String, key: String },
    #[error("{what} expired at {not_after}; move it away and run `chaperone ca init` for a new CA")]
    Expired { what: String, not_after: String },
    #[error("issuing a certificate failed: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("upstream configuration: {0}")]
    Upstream(String),
}

impl TlsError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        TlsError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// The crypto provider chaperone uses on both sides (ring), chosen
/// explicitly so no process-wide default has to be installed.
pub(crate) fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Every PEM `CERTIFICATE` block in `pem`, in order.
pub(crate) fn parse_certificates(
    what: &str,
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            what: what.into(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadCertificate {
            what: what.into(),
            reason: "no `-----BEGIN CERTIFICATE-----` block found".into(),
        });
    }
    Ok(certs)
}
