//! How chaperone reaches the real API server: its address, the cluster CA
//! that vouches for it, and chaperone's own credentials (a bearer token or a
//! client certificate).
//!
//! Two sources: the in-cluster configuration of the DaemonSet's pod
//! (`KUBERNETES_SERVICE_HOST`/`PORT` and the projected service-account
//! volume; the token file is re-read whenever the kubelet rotates it), or a
//! kubeconfig file for local mode (read with the kube crate's types).

use std::{
    fmt, fs,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use base64::Engine as _;
use http::{HeaderValue, Uri};
use kube::config::{AuthInfo, Kubeconfig};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer},
};
use secrecy::ExposeSecret as _;

use super::{TlsError, crypto_provider, leaf::ALPN_PROTOCOLS, parse_certificates};

/// The service-account volume every pod gets.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where and how to reach the API server.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// `https://host:port` of the API server.
    pub server: Uri,
    /// The name to verify the server's certificate against, when it differs
    /// from the host in `server` (kubeconfig `tls-server-name`).
    pub tls_server_name: Option<String>,
    /// The CA certificates that sign the API server's certificate.
    pub cluster_ca: Vec<CertificateDer<'static>>,
    /// The PEM the cluster CA was read from, for the agents' bundle.
    pub cluster_ca_pem: Vec<u8>,
    /// Chaperone's bearer token, if it authenticates with one.
    pub token: Option<BearerToken>,
    /// Chaperone's client certificate, if it authenticates with one.
    pub client_identity: Option<ClientIdentity>,
}

/// A client certificate chain and its key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A bearer token: fixed, or read from a file and re-read when the file
/// changes (the kubelet rotates projected tokens by swapping a symlink).
#[derive(Clone)]
pub struct BearerToken(Arc<TokenSource>);

enum TokenSource {
    Fixed(String),
    File {
        path: PathBuf,
        cached: Mutex<(FileStamp, Arc<str>)>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

// === impl BearerToken ===

impl BearerToken {
    pub fn fixed(token: impl Into<String>) -> Self {
        BearerToken(Arc::new(TokenSource::Fixed(token.into())))
    }

    /// A token read from `path` now and again whenever the file changes.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let path = path.into();
        let (stamp, token) = read_token(&path)?;
        Ok(BearerToken(Arc::new(TokenSource::File {
            path,
            cached: Mutex::new((stamp, token)),
        })))
    }

    /// The token to send now.
    pub fn current(&self) -> Result<Arc<str>, TlsError> {
        match &*self.0 {
            TokenSource::Fixed(token) => Ok(Arc::from(token.as_str())),
            TokenSource::File { path, cached } => {
                let stamp = stamp_of(path)?;
                {
                    let guard = cached.lock().unwrap_or_else(|e| e.into_inner());
                    if guard.0 == stamp {
                        return Ok(guard.1.clone());
                    }
                }
                let (stamp, token) = read_token(path)?;
                tracing::debug!(path = %path.display(), "re-read rotated token");
                let mut guard = cached.lock().unwrap_or_else(|e| e.into_inner());
                *guard = (stamp, token.clone());
                Ok(token)
            }
        }
    }

    /// `Authorization: Bearer …`, marked sensitive so it is never logged.
    pub fn header_value(&self) -> Result<HeaderValue, TlsError> {
        let token = self.current()?;
        let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
            TlsError::Upstream(
                "the bearer token contains characters not allowed in an HTTP header".into(),
            )
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            TokenSource::Fixed(_) => f.write_str("BearerToken(fixed, redacted)"),
            TokenSource::File { path, .. } => write!(f, "BearerToken(file {})", path.display()),
        }
    }
}

fn stamp_of(path: &Path) -> Result<FileStamp, TlsError> {
    let meta = fs::metadata(path).map_err(|e| TlsError::io("read metadata of", path, e))?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

fn read_token(path: &Path) -> Result<(FileStamp, Arc<str>), TlsError> {
    let stamp = stamp_of(path)?;
    let text = fs::read_to_string(path).map_err(|e| TlsError::io("read token file", path, e))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TlsError::Upstream(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    Ok((stamp, Arc::from(token)))
}

// === impl UpstreamConfig ===

impl UpstreamConfig {
    /// The configuration of a pod: `KUBERNETES_SERVICE_HOST`,
    /// `KUBERNETES_SERVICE_PORT` and the service-account volume.
    pub fn in_cluster() -> Result<Self, TlsError> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| {
                TlsError::Upstream(format!(
                    "{name} is not set: not running in a pod? Use a kubeconfig (--kubeconfig) instead"
                ))
            })
        };
        Self::in_cluster_from(
            &var("KUBERNETES_SERVICE_HOST")?,
            &var("KUBERNETES_SERVICE_PORT")?,
            Path::new(SERVICE_ACCOUNT_DIR),
        )
    }

    /// In-cluster configuration from explicit parts: the service host and
    /// port, and the directory holding `token` and `ca.crt`.
    pub fn in_cluster_from(host: &str, port: &str, sa_dir: &Path) -> Result<Self, TlsError> {
        let port: u16 = port.parse().map_err(|_| {
            TlsError::Upstream(format!("KUBERNETES_SERVICE_PORT={port:?} is not a port"))
        })?;
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => host.to_string(),
        };
        let server = parse_server(&format!("https://{host}:{port}"))?;
        let ca_path = sa_dir.join("ca.crt");
        let cluster_ca_pem =
            fs::read(&ca_path).map_err(|e| TlsError::io("read the cluster CA", &ca_path, e))?;
        let cluster_ca = parse_certificates(&ca_path.display().to_string(), &cluster_ca_pem)?;
        Ok(UpstreamConfig {
            server,
            tls_server_name: None,
            cluster_ca,
            cluster_ca_pem,
            token: Some(BearerToken::from_file(sa_dir.join("token"))?),
            client_identity: None,
        })
    }

    /// The configuration of `context` (or the current context) in the
    /// kubeconfig file at `path`.
    pub fn from_kubeconfig(path: &Path, context: Option<&str>) -> Result<Self, TlsError> {
        let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
            TlsError::Upstream(format!("cannot read kubeconfig {}: {e}", path.display()))
        })?;
        Self::from_kubeconfig_value(&kubeconfig, context)
            .map_err(|e| TlsError::Upstream(format!("kubeconfig {}: {e}", path.display())))
    }

    /// As [`UpstreamConfig::from_kubeconfig`], from parsed kubeconfig
    /// (relative file paths must already be absolute, as
    /// `Kubeconfig::read_from` makes them).
    pub fn from_kubeconfig_value(
        kubeconfig: &Kubeconfig,
        context: Option<&str>,
    ) -> Result<Self, TlsError> {
        let up = |m: String| TlsError::Upstream(m);
        let context_name = context
            .map(str::to_owned)
            .or_else(|| kubeconfig.current_context.clone())
            .ok_or_else(|| up("no context given and no current-context set".into()))?;
        let context = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.as_ref())
            .ok_or_else(|| up(format!("context {context_name:?} not found")))?;
        let cluster = kubeconfig
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.as_ref())
            .ok_or_else(|| up(format!("cluster {:?} not found", context.cluster)))?;
        if cluster.insecure_skip_tls_verify == Some(true) {
            return Err(up(format!(
                "cluster {:?} sets insecure-skip-tls-verify; chaperone must verify the API \
                 server: give it certificate-authority(-data)",
                context.cluster
            )));
        }
        let server = parse_server(
            cluster
                .server
                .as_deref()
                .ok_or_else(|| up(format!("cluster {:?} has no server", context.cluster)))?,
        )?;
        let (ca_what, cluster_ca_pem) = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => (
                format!(
                    "certificate-authority-data of cluster {:?}",
                    context.cluster
                ),
                decode_base64(data, "certificate-authority-data")?,
            ),
            (None, Some(file)) => (
                file.clone(),
                fs::read(file).map_err(|e| TlsError::io("read the cluster CA", file, e))?,
            ),
            (None, None) => {
                return Err(up(format!(
                    "cluster {:?} has no certificate-authority(-data); chaperone trusts only \
                     the cluster CA it is given",
                    context.cluster
                )));
            }
        };
        let cluster_ca = parse_certificates(&ca_what, &cluster_ca_pem)?;

        let (token, client_identity) = match &context.user {
            None => (None, None),
            Some(user) => {
                let auth = kubeconfig
                    .auth_infos
                    .iter()
                    .find(|a| &a.name == user)
                    .and_then(|a| a.auth_info.as_ref())
                    .ok_or_else(|| up(format!("user {user:?} not found")))?;
                credentials(user, auth)?
            }
        };
        Ok(UpstreamConfig {
            server,
            tls_server_name: cluster.tls_server_name.clone(),
            cluster_ca,
            cluster_ca_pem,
            token,
            client_identity,
        })
    }

    /// A rustls client configuration trusting only the cluster CA, offering
    /// h2 and http/1.1, with the client certificate if there is one.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.cluster_ca {
            roots.add(cert.clone())?;
        }
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match &self.client_identity {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("server", &self.server)
            .field("tls_server_name", &self.tls_server_name)
            .field("cluster_ca", &self.cluster_ca.len())
            .field("token", &self.token)
            .field("client_identity", &self.client_identity)
            .finish()
    }
}

fn parse_server(server: &str) -> Result<Uri, TlsError> {
    let uri: Uri = server
        .parse()
        .map_err(|e| TlsError::Upstream(format!("server {server:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(TlsError::Upstream(format!(
            "server {server:?} must be an https:// URL with a host"
        )));
    }
    Ok(uri)
}

fn decode_base64(data: &str, what: &str) -> Result<Vec<u8>, TlsError> {
    let compact: String = data.split_ascii_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| TlsError::Upstream(format!("{what} is not valid base64: {e}")))
}

fn credentials(
    user: &str,
    auth: &AuthInfo,
) -> Result<(Option<BearerToken>, Option<ClientIdentity>), TlsError> {
    if auth.exec.is_some() || auth.auth_provider.is_some() {
        return Err(TlsError::Upstream(format!(
            "user {user:?} uses an exec or auth-provider plugin, which chaperone does not run; \
             give it a token, token-file or client certificate"
        )));
    }
    if auth.username.is_some() || auth.password.is_some() {
        return Err(TlsError::Upstream(format!(
            "user {user:?} uses basic auth, which Kubernetes removed; use a token or client \
             certificate"
        )));
    }
    let token = match (&auth.token, &auth.token_file) {
        (Some(token), _) => Some(BearerToken::fixed(token.expose_secret())),
        (None, Some(file)) => Some(BearerToken::from_file(file)?),
        (None, None) => None,
    };
    let cert_pem = match (&auth.client_certificate_data, &auth.client_certificate) {
        (Some(data), _) => Some(decode_base64(data, "client-certificate-data")?),
        (None, Some(file)) => {
            Some(fs::read(file).map_err(|e| TlsError::io("read client certificate", file, e))?)
        }
        (None, None) => None,
    };
    let key_pem = match (&auth.client_key_data, &auth.client_key) {
        (Some(data), _) => Some(decode_base64(data.expose_secret(), "client-key-data")?),
        (None, Some(file)) => {
            Some(fs::read(file).map_err(|e| TlsError::io("read client key", file, e))?)
        }
        (None, None) => None,
    };
    let identity = match (cert_pem, key_pem) {
        (Some(cert), Some(key)) => {
            let chain = parse_certificates(&format!("client certificate of user {user:?}"), &cert)?;
            let key = rustls_pemfile::private_key(&mut &key[..])
                .ok()
                .flatten()
                .ok_or_else(|| TlsError::BadKey {
                    what: format!("client key of user {user:?}"),
                    reason: "no PEM private key found".into(),
                })?;
            Some(ClientIdentity { chain, key })
        }
        (None, None) => None,
        _ => {
            return Err(TlsError::Upstream(format!(
                "user {user:?} has a client certificate or a client key but not both"
            )));
        }
    };
    Ok((token, identity))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::{LocalCa, ca::LeafRequest};

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    #[test]
    fn a_kubeconfig_gives_server_trust_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("cluster-ca")).unwrap();
        fs::write(dir.path().join("ca.pem"), ca.bundle_pem()).unwrap();
        fs::write(dir.path().join("token"), "file-token\n").unwrap();
        let client = ca.issue(&LeafRequest::default()).unwrap();
        let client_cert_pem = crate::tls::ca::pem_of(&client.cert_der);
        let client_key_pem = crate::tls::ca::pem_of(client.key_der.secret_pkcs8_der())
            .replace("CERTIFICATE", "PRIVATE KEY");
        let kubeconfig = format!(
            r#"
apiVersion: v1
kind: Config
current-context: ops
clusters:
- name: prod
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority: ca.pem
    tls-server-name: api.prod.internal
- name: dev
  cluster:
    server: https://dev.example:443
    certificate-authority-data: {ca_data}
contexts:
- name: ops
  context: {{cluster: prod, user: robot}}
- name: dev
  context: {{cluster: dev, user: dev-admin}}
users:
- name: robot
  user:
    tokenFile: token
- name: dev-admin
  user:
    token: static-token
    client-certificate-data: {cert_data}
    client-key-data: {key_data}
"#,
            ca_data = b64(ca.bundle_pem().as_bytes()),
            cert_data = b64(client_cert_pem.as_bytes()),
            key_data = b64(client_key_pem.as_bytes()),
        );
        let path = dir.path().join("kubeconfig");
        fs::write(&path, kubeconfig).unwrap();

        let ops = UpstreamConfig::from_kubeconfig(&path, None).unwrap();
        assert_eq!(ops.server, "https://10.0.0.1:6443");
        assert_eq!(ops.tls_server_name.as_deref(), Some("api.prod.internal"));
        assert_eq!(ops.cluster_ca, [ca.certificate_der().clone()]);
        assert_eq!(
            &*ops.token.as_ref().unwrap().current().unwrap(),
            "file-token"
        );
        assert!(ops.client_identity.is_none());
        let config = ops.client_config().unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(!config.client_auth_cert_resolver.has_certs());

        let dev = UpstreamConfig::from_kubeconfig(&path, Some("dev")).unwrap();
        assert_eq!(dev.server, "https://dev.example:443/");
        assert_eq!(
            dev.token.as_ref().unwrap().header_value().unwrap(),
            "Bearer static-token"
        );
        assert!(
            dev.token
                .as_ref()
                .unwrap()
                .header_value()
                .unwrap()
                .is_sensitive()
        );
        assert_eq!(
            dev.client_identity.as_ref().unwrap().chain,
            [client.cert_der]
        );
        assert!(
            dev.client_config()
                .unwrap()
                .client_auth_cert_resolver
                .has_certs()
        );
        // Debug output never shows secrets.
        assert!(!format!("{dev:?}").contains("static-token"));

        let err = UpstreamConfig::from_kubeconfig(&path, Some("nope")).unwrap_err();
        assert!(
            err.to_string().contains("context \"nope\" not found"),
            "{err}"
        );
    }

    #[test]
    fn insecure_and_plugin_kubeconfigs_are_refused_with_reasons() {
        let insecure = Kubeconfig::from_yaml(
            r#"
current-context: c
clusters: [{name: k, cluster: {server: "https://1.2.3.4", insecure-skip-tls-verify: true}}]
contexts: [{name: c, context: {cluster: k}}]
"#,
        )
        .unwrap();
        let err = UpstreamConfig::from_kubeconfig_value(&insecure, None).unwrap_err();
        assert!(
            err.to_string().contains("insecure-skip-tls-verify"),
            "{err}"
        );

        let exec = Kubeconfig::from_yaml(&format!(
            r#"
current-context: c
clusters: [{{name: k, cluster: {{server: "https://1.2.3.4", certificate-authority-data: {ca}}}}}]
contexts: [{{name: c, context: {{cluster: k, user: u}}}}]
users: [{{name: u, user: {{exec: {{command: aws, apiVersion: client.authentication.k8s.io/v1}}}}}}]
"#,
            ca = b64(test_ca_pem().as_bytes())
        ))
        .unwrap();
        let err = UpstreamConfig::from_kubeconfig_value(&exec, None).unwrap_err();
        assert!(err.to_string().contains("exec"), "{err}");
    }

    fn test_ca_pem() -> String {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path())
            .unwrap()
            .bundle_pem()
            .to_string()
    }

    #[test]
    fn in_cluster_config_reads_the_service_account_and_follows_token_rotation() {
        let sa = tempfile::tempdir().unwrap();
        fs::write(sa.path().join("ca.crt"), test_ca_pem()).unwrap();
        fs::write(sa.path().join("token"), "first\n").unwrap();
        let config = UpstreamConfig::in_cluster_from("fd00::1", "443", sa.path()).unwrap();
        assert_eq!(config.server, "https://[fd00::1]:443/");
        let token = config.token.clone().unwrap();
        assert_eq!(&*token.current().unwrap(), "first");

        // The kubelet swaps in a new file; the next request uses it.
        std::thread::sleep(Duration::from_millis(20));
        let next = sa.path().join("token.new");
        fs::write(&next, "second-token\n").unwrap();
        fs::rename(&next, sa.path().join("token")).unwrap();
        assert_eq!(&*token.current().unwrap(), "second-token");
        assert_eq!(token.header_value().unwrap(), "Bearer second-token");

        let err = UpstreamConfig::in_cluster_from("10.96.0.1", "https", sa.path()).unwrap_err();
        assert!(err.to_string().contains("KUBERNETES_SERVICE_PORT"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = UpstreamConfig::in_cluster_from("10.96.0.1", "443", empty.path()).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }
}
