//! Audit sinks: a rotating JSON-lines file (like the API server's log
//! backend), stdout, and a webhook that POSTs `EventList` batches (like the
//! API server's webhook backend).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::AuditError;
use super::event::event_list;

/// Where one sink delivers.
#[derive(Clone, Debug)]
pub enum SinkConfig {
    File(FileSinkConfig),
    Stdout,
    Webhook(WebhookConfig),
}

/// The log backend's options (`--audit-log-path`, `--audit-log-maxsize`,
/// `--audit-log-maxbackup`, `--audit-log-maxage`).
#[derive(Clone, Debug)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    /// Rotate when the file would grow past this many megabytes (0: never).
    pub max_size_mb: u64,
    /// Keep at most this many rotated files (0: all).
    pub max_backups: usize,
    /// Delete rotated files older than this many days (0: never).
    pub max_age_days: u64,
}

/// The webhook backend's options (`--audit-webhook-config-file`,
/// `--audit-webhook-batch-max-size`, `--audit-webhook-batch-max-wait`,
/// `--audit-webhook-initial-backoff`).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub endpoint: Endpoint,
    /// Events per `EventList` POST.
    pub batch_max_size: usize,
    /// How long to wait for a batch to fill before sending what there is.
    pub batch_max_wait: Duration,
    /// First wait after a failed POST; doubled per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Timeout of one POST.
    pub timeout: Duration,
}

impl WebhookConfig {
    /// The API server's defaults: batches of 400, 30 s wait, 10 s backoff.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            batch_max_size: 400,
            batch_max_wait: Duration::from_secs(30),
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Where to POST, and how to authenticate.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: http::Uri,
    /// `Authorization: Bearer` token.
    pub token: Option<String>,
    /// PEM CA bundle that signs the server's certificate (https).
    pub ca_pem: Option<Vec<u8>>,
}

impl Endpoint {
    /// A plain URL, `http://` or `https://` (https needs a CA: use a
    /// kubeconfig).
    pub fn from_url(url: &str) -> Result<Self, AuditError> {
        let url: http::Uri = url
            .parse()
            .map_err(|e| AuditError::Config(format!("audit webhook URL {url:?}: {e}")))?;
        match url.scheme_str() {
            Some("http" | "https") if url.host().is_some() => {}
            _ => {
                return Err(AuditError::Config(format!(
                    "audit webhook URL {url} must be http://HOST[:PORT]/PATH or https://..."
                )));
            }
        }
        Ok(Self {
            url,
            token: None,
            ca_pem: None,
        })
    }

    /// A kubeconfig file as the API server's `--audit-webhook-config-file`
    /// takes it: the current (or first) context's cluster `server`,
    /// `certificate-authority(-data)`, and the user's `token`.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, AuditError> {
        let config_err = |m: String| AuditError::Config(format!("{}: {m}", path.display()));
        let text = fs::read_to_string(path).map_err(|e| config_err(e.to_string()))?;
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| config_err(e.to_string()))?;
        let named = |list: &str, name: Option<&str>| -> Option<serde_yaml::Value> {
            let items = doc.get(list)?.as_sequence()?;
            let item = match name {
                Some(name) => items
                    .iter()
                    .find(|i| i.get("name").and_then(|n| n.as_str()) == Some(name))?,
                None => items.first()?,
            };
            item.get(list.trim_end_matches('s')).cloned()
        };
        let context = doc
            .get("current-context")
            .and_then(|c| c.as_str())
            .and_then(|c| named("contexts", Some(c)));
        let cluster_name = context
            .as_ref()
            .and_then(|c| c.get("cluster"))
            .and_then(|c| c.as_str());
        let user_name = context
            .as_ref()
            .and_then(|c| c.get("user"))
            .and_then(|c| c.as_str());
        let cluster = named("clusters", cluster_name)
            .ok_or_else(|| config_err("no clusters[].cluster entry".into()))?;
        let server = cluster
            .get("server")
            .and_then(|s| s.as_str())
            .ok_or_else(|| config_err("the cluster has no server URL".into()))?;
        let mut endpoint = Self::from_url(server)?;
        if let Some(data) = cluster
            .get("certificate-authority-data")
            .and_then(|d| d.as_str())
        {
            use base64::Engine as _;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| config_err(format!("certificate-authority-data: {e}")))?;
            endpoint.ca_pem = Some(pem);
        } else if let Some(file) = cluster
            .get("certificate-authority")
            .and_then(|d| d.as_str())
        {
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            endpoint.ca_pem =
                Some(fs::read(&file).map_err(|e| config_err(format!("{}: {e}", file.display())))?);
        }
        endpoint.token = named("users", user_name)
            .and_then(|u| u.get("token").and_then(|t| t.as_str()).map(str::to_owned));
        Ok(endpoint)
    }
}

// === impl FileSink ===

/// The rotating log file.
pub struct FileSink {
    config: FileSinkConfig,
    file: Option<File>,
    size: u64,
}

impl FileSink {
    pub fn new(config: FileSinkConfig) -> Self {
        Self {
            config,
            file: None,
            size: 0,
        }
    }

    /// Appends events as JSON lines, rotating before a line would take the
    /// file past `max_size_mb`; syncs before returning.
    pub fn write(&mut self, events: &[Vec<u8>]) -> std::io::Result<()> {
        let max = self.config.max_size_mb.saturating_mul(1 << 20);
        if self.file.is_none() {
            if let Some(dir) = self
                .config
                .path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.config.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        let mut buf = Vec::new();
        for event in events {
            let len = event.len() as u64 + 1;
            if max > 0
                && self.size + buf.len() as u64 > 0
                && self.size + buf.len() as u64 + len > max
            {
                self.flush_buf(&mut buf)?;
                self.rotate()?;
            }
            buf.extend_from_slice(event);
            buf.push(b'\n');
        }
        self.flush_buf(&mut buf)
    }

    fn flush_buf(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let file = self.file.as_mut().expect("opened before writing");
        if !buf.is_empty() {
            file.write_all(buf)?;
            self.size += buf.len() as u64;
            buf.clear();
        }
        file.sync_data()
    }

    /// `audit.log` → `audit-2026-11-23T11-17-02.123.log`, as lumberjack names
    /// backups (UTC), then removes backups over the count and age limits.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let path = &self.config.path;
        let dir = path.parent().unwrap_or(Path::new("."));
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let now = time::OffsetDateTime::now_utc();
        let mut backup = dir.join(format!(
            "{stem}-{:04}-{:02}-{:02}T{:02}-{:02}-{:02}.{:03}{ext}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.millisecond()
        ));
        let mut n = 1;
        while backup.exists() {
            backup.set_file_name(format!(
                "{stem}-{:04}-{:02}-{:02}T{:02}-{:02}-{:02}.{:03}-{n}{ext}",
                now.year(),
                u8::from(now.month()),
                now.day(),
                now.hour(),
                now.minute(),
                now.second(),
                now.millisecond()
            ));
            n += 1;
        }
        fs::rename(path, &backup)?;
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        self.size = 0;
        self.file = Some(file);
        self.cleanup(dir, &stem, &ext)
    }

    fn cleanup(&self, dir: &Path, stem: &str, ext: &str) -> std::io::Result<()> {
        let prefix = format!("{stem}-");
        let mut backups: Vec<(SystemTime, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(ext) {
                backups.push((entry.metadata()?.modified()?, entry.path()));
            }
        }
        backups.sort();
        let now = SystemTime::now();
        let max_age = Duration::from_secs(self.config.max_age_days * 24 * 3600);
        let excess = if self.config.max_backups > 0 {
            backups.len().saturating_sub(self.config.max_backups)
        } else {
            0
        };
        for (i, (modified, path)) in backups.iter().enumerate() {
            let old = self.config.max_age_days > 0
                && now.duration_since(*modified).unwrap_or_default() > max_age;
            if i < excess || old {
                fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

// === impl WebhookSink ===

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// POSTs `EventList` batches over one kept-alive HTTP/1.1 connection.
pub struct WebhookSink {
    config: WebhookConfig,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl WebhookSink {
    pub fn new(config: WebhookConfig) -> Result<Self, AuditError> {
        let tls = if config.endpoint.url.scheme_str() == Some("https") {
            let pem = config.endpoint.ca_pem.as_ref().ok_or_else(|| {
                AuditError::Config(format!(
                    "audit webhook {} is https but no CA is configured: use a kubeconfig with certificate-authority(-data)",
                    config.endpoint.url
                ))
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| AuditError::Config(format!("audit webhook CA: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| AuditError::Config(format!("audit webhook CA: {e}")))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let client = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| AuditError::Config(format!("TLS: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let host = config.endpoint.url.host().unwrap_or_default().to_owned();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| AuditError::Config(format!("audit webhook host: {e}")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(client)), name))
        } else {
            None
        };
        Ok(Self {
            config,
            tls,
            sender: None,
        })
    }

    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, DeliveryError> {
        let url = &self.config.endpoint.url;
        let host = url.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| DeliveryError::Connect {
                to: format!("{host}:{port}"),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => {
                Box::new(connector.connect(name.clone(), tcp).await.map_err(|e| {
                    DeliveryError::Tls {
                        with: format!("{host}:{port}"),
                        reason: e.to_string(),
                    }
                })?)
            }
            None => Box::new(tcp),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| DeliveryError::Handshake {
                with: format!("{host}:{port}"),
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One POST of `events` as an `EventList`; `Ok` only for a 2xx answer.
    pub async fn post(&mut self, events: &[Vec<u8>]) -> Result<(), DeliveryError> {
        let timeout = self.config.timeout;
        let attempt = async {
            let cached = match self.sender.take() {
                Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
                None => None,
            };
            let mut sender = match cached {
                Some(sender) => sender,
                None => self.connect().await?,
            };
            let url = &self.config.endpoint.url;
            let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let mut request = hyper::Request::post(path)
                .header(
                    hyper::header::HOST,
                    url.authority().map(|a| a.as_str()).unwrap_or(""),
                )
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::USER_AGENT, "chaperone-audit");
            if let Some(token) = &self.config.endpoint.token {
                request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request
                .body(Full::new(Bytes::from(event_list(events))))
                .map_err(|e| DeliveryError::Request(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| DeliveryError::Post {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
            let status = response.status();
            let body = response.into_body().collect().await.map(|b| b.to_bytes());
            if status.is_success() {
                self.sender = Some(sender);
                Ok(())
            } else {
                let body = body.unwrap_or_default();
                Err(DeliveryError::Refused {
                    url: url.to_string(),
                    status,
                    body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
                })
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(DeliveryError::Timeout {
                url: self.config.endpoint.url.to_string(),
                timeout,
            }),
        }
    }
}

/// Why a batch of events did not reach its sink; it stays spooled and is
/// delivered again after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("connect {to}: {reason}")]
    Connect { to: String, reason: String },
    #[error("TLS handshake with {with}: {reason}")]
    Tls { with: String, reason: String },
    #[error("HTTP handshake with {with}: {reason}")]
    Handshake { with: String, reason: String },
    #[error("{0}")]
    Request(String),
    #[error("POST {url}: {reason}")]
    Post { url: String, reason: String },
    #[error("POST {url}: {status}: {body}")]
    Refused {
        url: String,
        status: http::StatusCode,
        body: String,
    },
    #[error("POST {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The file or stdout sink could not be written.
    #[error(transparent)]
    Write(#[from] std::io::Error),
}
