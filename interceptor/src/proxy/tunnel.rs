//! The byte tunnel of an upgraded connection (exec, attach, port-forward
//! over WebSocket or SPDY): both directions pumped independently, each
//! half-closed when its source ends, with an optional tap for recording.

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::guard::TunnelTap;

const BUFFER: usize = 16 * 1024;

pub(super) async fn pump(
    conn: uuid::Uuid,
    agent: Upgraded,
    upstream: Upgraded,
    tap: Option<Box<dyn TunnelTap>>,
) {
    let (agent_read, agent_write) = tokio::io::split(TokioIo::new(agent));
    let (upstream_read, upstream_write) = tokio::io::split(TokioIo::new(upstream));
    let tap = tap.map(|t| std::sync::Arc::new(std::sync::Mutex::new(t)));
    let up_tap = tap.clone();
    let down_tap = tap.clone();
    let up = copy_half(agent_read, upstream_write, move |bytes| {
        if let Some(tap) = &up_tap {
            tap.lock()
                .unwrap_or_else(|p| p.into_inner())
                .agent_sent(bytes);
        }
    });
    let down = copy_half(upstream_read, agent_write, move |bytes| {
        if let Some(tap) = &down_tap {
            tap.lock()
                .unwrap_or_else(|p| p.into_inner())
                .upstream_sent(bytes);
        }
    });
    let (up, down) = tokio::join!(up, down);
    tracing::debug!(%conn, agent_to_upstream = ?up, upstream_to_agent = ?down, "tunnel closed");
    if let Some(tap) = tap {
        tap.lock().unwrap_or_else(|p| p.into_inner()).closed();
    }
}

/// Copies until EOF or error, then shuts the destination's write side so
/// the far end sees the half-close.
async fn copy_half(
    mut from: ReadHalf<TokioIo<Upgraded>>,
    mut to: WriteHalf<TokioIo<Upgraded>>,
    mut observe: impl FnMut(&[u8]),
) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; BUFFER];
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
        observe(&buffer[..n]);
        to.write_all(&buffer[..n]).await?;
        total += n as u64;
    }
    to.shutdown().await?;
    Ok(total)
}
