//! `agent-watch`: many concurrent watches from one agent, as an in-cluster
//! client opens them: the API server from `KUBERNETES_SERVICE_HOST/PORT`,
//! the token and CA bundle from the service-account directory, and every
//! watch a stream of ONE HTTP/2 connection (as kubectl and client-go do).
//!
//! usage: agent-watch --watches N --name NAME [--path PATH] [--seconds S]
//!
//! Prints, one line each, on stdout:
//! - `open N` once all N watches were answered 200;
//! - `events N` once every watch received an event for the object NAME
//!   (then it exits 0);
//! - `failed I STATUS BODY` for a watch refused, `ended I REASON` for a
//!   stream that ended before its event; when no watch can still succeed it
//!   prints `summary ...` and exits 1 (2 after S seconds).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::sync::mpsc;

use chaperone_tests::topology::SERVICE_ACCOUNT_DIR;

#[derive(Parser)]
#[command(about = "Open many watches over one HTTP/2 connection as an in-cluster client")]
struct Args {
    /// Concurrent watches.
    #[arg(long, default_value_t = 1)]
    watches: usize,
    /// The object whose event every watch waits for.
    #[arg(long)]
    name: String,
    /// Path and query to watch (default: the pod namespace's configmaps).
    #[arg(long)]
    path: Option<String>,
    /// Give up after this long.
    #[arg(long, default_value_t = 45.0)]
    seconds: f64,
}

enum Report {
    Opened,
    Failed(usize, String),
    Event,
    Ended(usize, String),
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let host: IpAddr = std::env::var("KUBERNETES_SERVICE_HOST")
        .context("KUBERNETES_SERVICE_HOST is not set: run me as an in-cluster client")?
        .parse()
        .context("KUBERNETES_SERVICE_HOST is not an IP address")?;
    let port: u16 = std::env::var("KUBERNETES_SERVICE_PORT")
        .unwrap_or_else(|_| "443".into())
        .parse()
        .context("KUBERNETES_SERVICE_PORT")?;
    let sa = Path::new(SERVICE_ACCOUNT_DIR);
    let token = std::fs::read_to_string(sa.join("token"))
        .context("the service-account token")?
        .trim()
        .to_owned();
    let namespace = std::fs::read_to_string(sa.join("namespace"))
        .context("the service-account namespace")?
        .trim()
        .to_owned();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(sa.join("ca.crt")).context("the CA bundle")? {
        roots.add(cert?)?;
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];

    let addr = SocketAddr::new(host, port);
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::IpAddress(host.into()), tcp)
        .await
        .context("TLS handshake")?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        bail!("the server did not negotiate HTTP/2");
    }
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(connection);

    let path = args
        .path
        .unwrap_or_else(|| format!("/api/v1/namespaces/{namespace}/configmaps?watch=true"));
    let uri: http::Uri = format!("https://{addr}{path}").parse()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for index in 0..args.watches {
        let mut sender = sender.clone();
        let request = http::Request::get(uri.clone())
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())?;
        let tx = tx.clone();
        let name = args.name.clone();
        tokio::spawn(async move {
            if let Err(error) = sender.ready().await {
                let _ = tx.send(Report::Failed(index, format!("connection: {error}")));
                return;
            }
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(error) => {
                    let _ = tx.send(Report::Failed(index, format!("request: {error}")));
                    return;
                }
            };
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let text = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let _ = tx.send(Report::Failed(
                    index,
                    format!("{status} {}", String::from_utf8_lossy(&text)),
                ));
                return;
            }
            let _ = tx.send(Report::Opened);
            let mut pending = Vec::new();
            let mut seen = false;
            let reason = loop {
                match body.frame().await {
                    None => break "eof".to_owned(),
                    Some(Err(error)) => break format!("error: {error}"),
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        pending.extend_from_slice(&data);
                        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=end).collect();
                            let event: serde_json::Value =
                                serde_json::from_slice(&line).unwrap_or_default();
                            if !seen && event["object"]["metadata"]["name"] == name.as_str() {
                                seen = true;
                                let _ = tx.send(Report::Event);
                            }
                        }
                    }
                }
            };
            if !seen {
                let _ = tx.send(Report::Ended(index, reason));
            }
        });
    }
    drop(tx);

    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let (mut opened, mut events, mut lost) = (0, 0, 0);
    let code = loop {
        let report = match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Err(_) => break 2,
            Ok(None) => break 1,
            Ok(Some(report)) => report,
        };
        match report {
            Report::Opened => {
                opened += 1;
                if opened == args.watches {
                    println!("open {opened}");
                }
            }
            Report::Event => {
                events += 1;
                if events == args.watches {
                    println!("events {events}");
                    break 0;
                }
            }
            Report::Failed(index, why) => {
                lost += 1;
                println!("failed {index} {}", why.replace('\n', " "));
            }
            Report::Ended(index, why) => {
                lost += 1;
                println!("ended {index} {why}");
            }
        }
        if events + lost == args.watches {
            break 1;
        }
    };
    println!(
        "summary watches={} open={opened} events={events} lost={lost}",
        args.watches
    );
    std::process::exit(code);
}
