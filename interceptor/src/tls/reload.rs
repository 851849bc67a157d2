//! A serving certificate that follows its files: [`ReloadingCert`] answers
//! each handshake with the pair on disk, re-read after a rotation (a Secret
//! update, a cert-manager renewal). The admission webhook serves with it.

use std::{
    fs,
    io::BufReader,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Why a certificate and key pair on disk cannot be served. Each message
/// names the file to check.
#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error(
        "cannot read the webhook's TLS {what} {path}: {source}. \
         Mount the serving certificate Secret (deploy/base/webhook) or pass --tls-cert/--tls-key"
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the webhook's TLS key {key} does not fit its certificate {cert}: {source}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Reads a PEM certificate chain and private key into a rustls key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, ServingCertError> {
    let read = |what, path: &Path| {
        fs::read(path).map_err(|source| ServingCertError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read("certificate", cert)?;
    let key_pem = read("key", key)?;
    let chain = rustls_pemfile::certs(&mut BufReader::new(cert_pem.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ServingCertError::Read {
            what: "certificate",
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(ServingCertError::Empty {
            what: "certificate",
            path: cert.to_owned(),
        });
    }
    let private_key = rustls_pemfile::private_key(&mut BufReader::new(key_pem.as_slice()))
        .map_err(|source| ServingCertError::Read {
            what: "key",
            path: key.to_owned(),
            source,
        })?
        .ok_or_else(|| ServingCertError::Empty {
            what: "private key",
            path: key.to_owned(),
        })?;
    CertifiedKey::from_der(chain, private_key, &super::crypto_provider()).map_err(|source| {
        ServingCertError::Key {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        }
    })
}

/// Serves the certificate in two files and picks up a rotated pair (a
/// Secret update, cert-manager renewal) on the next handshake after the
/// files change; a broken pair keeps the last good one and says so.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, ServingCertError> {
        let loaded = load_certified_key(&cert, &key)?;
        let stamp = stamp(&cert, &key);
        Ok(Self {
            cert,
            key,
            current: Mutex::new((stamp, Arc::new(loaded))),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamp(&self.cert, &self.key);
        if now.is_some() && now != current.0 {
            match load_certified_key(&self.cert, &self.key) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert.display(), "reloaded the serving certificate");
                    *current = (now, Arc::new(key));
                }
                Err(error) => {
                    tracing::warn!(%error, "keeping the previous serving certificate");
                    current.0 = now;
                }
            }
        }
        current.1.clone()
    }
}

/// The later of the two files' modification times.
fn stamp(cert: &Path, key: &Path) -> Option<SystemTime> {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    Some(modified(cert)?.max(modified(key)?))
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}
