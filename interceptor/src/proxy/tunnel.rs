//! The byte tunnel of an upgraded connection (exec, attach, port-forward
//! over WebSocket or SPDY): both directions pumped independently, each
//! half-closed when its source ends, with an optional tap that sees the
//! agent's bytes and may rewrite the API server's (exec output masking).

use std::sync::{Arc, Mutex};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::guard::{TapError, TunnelTap};

const BUFFER: usize = 16 * 1024;

type SharedTap = Arc<Mutex<Box<dyn TunnelTap>>>;

fn lock(tap: &SharedTap) -> std::sync::MutexGuard<'_, Box<dyn TunnelTap>> {
    tap.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) async fn pump(
    conn: uuid::Uuid,
    agent: Upgraded,
    upstream: Upgraded,
    tap: Option<Box<dyn TunnelTap>>,
) {
    let (agent_read, agent_write) = tokio::io::split(TokioIo::new(agent));
    let (upstream_read, upstream_write) = tokio::io::split(TokioIo::new(upstream));
    let tap = tap.map(|t| Arc::new(Mutex::new(t)));
    let up = copy_up(agent_read, upstream_write, tap.clone());
    let down = copy_down(upstream_read, agent_write, tap.clone());
    let (up, down) = tokio::join!(up, down);
    tracing::debug!(%conn, agent_to_upstream = ?up, upstream_to_agent = ?down, "tunnel closed");
    if let Some(tap) = tap {
        lock(&tap).closed();
    }
}

/// `bytes` as the other side gets them: unchanged without a tap, else
/// what the tap's `rewrite` writes to `out`. A tap that cannot read the
/// stream is an error that closes the tunnel.
fn through<'a>(
    tap: &Option<SharedTap>,
    bytes: &'a [u8],
    out: &'a mut Vec<u8>,
    rewrite: impl FnOnce(&mut dyn TunnelTap, &[u8], &mut Vec<u8>) -> Result<(), TapError>,
) -> std::io::Result<&'a [u8]> {
    let Some(tap) = tap else {
        return Ok(bytes);
    };
    out.clear();
    if let Err(error) = rewrite(lock(tap).as_mut(), bytes, out) {
        tracing::warn!(%error, "closing a tunnel whose stream cannot be read");
        return Err(std::io::Error::other(error));
    }
    Ok(&out[..])
}

/// Agent to API server: through the tap (which watches, and may rewrite
/// flow control).
async fn copy_up(
    mut from: ReadHalf<TokioIo<Upgraded>>,
    mut to: WriteHalf<TokioIo<Upgraded>>,
    tap: Option<SharedTap>,
) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; BUFFER];
    let mut out = Vec::with_capacity(BUFFER);
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => {
                let _ = to.shutdown().await;
                return Err(error);
            }
        };
        let chunk = match through(&tap, &buffer[..n], &mut out, |tap, bytes, out| {
            tap.agent_rewrite(bytes, out)
        }) {
            Ok(chunk) => chunk,
            Err(error) => {
                let _ = to.shutdown().await;
                return Err(error);
            }
        };
        to.write_all(chunk).await?;
        total += chunk.len() as u64;
    }
    to.shutdown().await?;
    Ok(total)
}

/// API server to agent: through the tap's rewrite, releasing what it holds
/// back when the API server goes idle, so a prompt without a newline shows.
async fn copy_down(
    mut from: ReadHalf<TokioIo<Upgraded>>,
    mut to: WriteHalf<TokioIo<Upgraded>>,
    tap: Option<SharedTap>,
) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; BUFFER];
    let mut out = Vec::with_capacity(BUFFER);
    let mut total = 0u64;
    loop {
        let wait = tap.as_ref().and_then(|tap| lock(tap).held_back());
        let read = match wait {
            None => from.read(&mut buffer).await,
            Some(wait) => match tokio::time::timeout(wait, from.read(&mut buffer)).await {
                Ok(read) => read,
                Err(_idle) => {
                    out.clear();
                    if let Some(tap) = &tap {
                        lock(tap).upstream_idle(&mut out);
                    }
                    to.write_all(&out).await?;
                    to.flush().await?;
                    total += out.len() as u64;
                    continue;
                }
            },
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => {
                let _ = to.shutdown().await;
                return Err(error);
            }
        };
        let chunk = match through(&tap, &buffer[..n], &mut out, |tap, bytes, out| {
            tap.upstream_sent(bytes, out)
        }) {
            Ok(chunk) => chunk,
            Err(error) => {
                let _ = to.shutdown().await;
                return Err(error);
            }
        };
        to.write_all(chunk).await?;
        total += chunk.len() as u64;
    }
    if let Some(tap) = &tap {
        out.clear();
        lock(tap).upstream_idle(&mut out);
        to.write_all(&out).await?;
        total += out.len() as u64;
    }
    to.shutdown().await?;
    Ok(total)
}
