//! A small HTTPS client for tests that talk to the simulator (or to anything
//! that serves with a given CA) over HTTP/1.1 or HTTP/2.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio_rustls::TlsConnector;

enum Sender {
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One connection (HTTP/2 multiplexes; HTTP/1.1 sends one request at a time).
pub struct Client {
    sender: Sender,
    authority: String,
    token: Option<String>,
    user_agent: String,
}

/// A buffered response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A rustls client configuration trusting only `ca_pem`.
pub fn tls_config(ca_pem: &str, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn pem_certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use base64::Engine;
    let mut out = Vec::new();
    let mut in_cert = false;
    let mut b64 = String::new();
    for line in pem.lines() {
        match line.trim() {
            "-----BEGIN CERTIFICATE-----" => {
                in_cert = true;
                b64.clear();
            }
            "-----END CERTIFICATE-----" => {
                in_cert = false;
                let der = base64::engine::general_purpose::STANDARD
                    .decode(&b64)
                    .context("decoding a PEM certificate")?;
                out.push(CertificateDer::from(der));
            }
            l if in_cert => b64.push_str(l),
            _ => {}
        }
    }
    anyhow::ensure!(!out.is_empty(), "no certificate found in the CA bundle");
    Ok(out)
}

impl Client {
    /// Connects to the simulator (or anything serving with `ca_pem`).
    pub async fn connect(addr: SocketAddr, ca_pem: &str, http2: bool) -> anyhow::Result<Self> {
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let connector = TlsConnector::from(Arc::new(tls_config(ca_pem, alpn)?));
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let tls = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .context("TLS handshake")?;
        let io = TokioIo::new(tls);
        let sender = if http2 {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Sender::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn.with_upgrades());
            Sender::H1(tokio::sync::Mutex::new(send))
        };
        Ok(Self {
            sender,
            authority: addr.to_string(),
            token: None,
            user_agent: "chaperone-tests".into(),
        })
    }

    /// Sends `Authorization: Bearer TOKEN` on every request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// The User-Agent to send (`curl/8` makes the API server pretty-print).
    pub fn with_user_agent(mut self, ua: &str) -> Self {
        self.user_agent = ua.to_string();
        self
    }

    /// Sends a request (adding authority, token and User-Agent) and returns
    /// the streaming response.
    pub async fn send(&self, mut req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>> {
        let uri = format!("https://{}{}", self.authority, req.uri());
        *req.uri_mut() = uri.parse()?;
        let h = req.headers_mut();
        if let Some(t) = &self.token
            && !h.contains_key(http::header::AUTHORIZATION)
        {
            h.insert(http::header::AUTHORIZATION, format!("Bearer {t}").parse()?);
        }
        h.entry(http::header::USER_AGENT)
            .or_insert(self.user_agent.parse()?);
        match &self.sender {
            Sender::H2(s) => Ok(s.clone().send_request(req).await?),
            Sender::H1(s) => {
                *req.version_mut() = http::Version::HTTP_11;
                req.headers_mut()
                    .entry(http::header::HOST)
                    .or_insert(self.authority.parse()?);
                let mut s = s.lock().await;
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
        }
    }

    /// Sends a request and reads the whole body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self.send(b.body(Full::new(body.into()))?).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.call("GET", path, &[], Bytes::new()).await
    }

    /// POST/PUT/PATCH a JSON body with a content type.
    pub async fn send_json(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> anyhow::Result<Reply> {
        self.call(
            method,
            path,
            &[("content-type", content_type)],
            serde_json::to_vec(body)?,
        )
        .await
    }
}

/// Reads a streaming body line by line (watch events, followed logs).
pub struct Lines {
    body: Incoming,
    buf: Vec<u8>,
}

impl Lines {
    pub fn new(resp: Response<Incoming>) -> Self {
        Self {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next line (without the newline), or `None` at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    let rest = std::mem::take(&mut self.buf);
                    return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
                }
            }
        }
    }

    /// The next line parsed as JSON (a watch event).
    pub async fn next_json(&mut self) -> anyhow::Result<Option<Value>> {
        match self.next().await? {
            Some(l) => Ok(Some(
                serde_json::from_str(&l).with_context(|| format!("not JSON: {l}"))?,
            )),
            None => Ok(None),
        }
    }
}
