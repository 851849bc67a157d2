//! A minimal TCP client for the redirect tests: connects, reports what the
//! socket says about itself as one JSON line on stdout, then holds the
//! connection until the peer closes it (or 10 s pass).
//!
//! usage: agent-probe ADDR:PORT [--mark N] [--v6-socket] [--mptcp] [--repeat-ms MS]
//!   --mark N         set SO_MARK on the socket before connecting
//!   --fastopen       connect with TCP Fast Open: `sendto(MSG_FASTOPEN)`
//!                    carrying one byte instead of `connect()`
//!   --mptcp          open an MPTCP socket (`IPPROTO_MPTCP`); if `socket()`
//!                    itself fails the report says `"stage": "socket"`
//!   --v6-socket      use an AF_INET6 socket (IPv4 targets become ::ffff:a.b.c.d)
//!   --repeat-ms MS   connect again and again for MS milliseconds (one JSON
//!                    line per attempt, each connection closed at once):
//!                    what an agent sees across a node agent restart

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV6},
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const IPPROTO_MPTCP: i32 = 262;

fn main() {
    let mut args = std::env::args().skip(1);
    let target: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: agent-probe ADDR:PORT [--mark N] [--v6-socket]");
    let mut mark = None;
    let mut v6_socket = false;
    let mut repeat_ms = None;
    let mut protocol = None;
    let mut fastopen = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mark" => mark = args.next().and_then(|m| m.parse::<u32>().ok()),
            "--repeat-ms" => repeat_ms = args.next().and_then(|m| m.parse::<u64>().ok()),
            "--v6-socket" => v6_socket = true,
            "--fastopen" => fastopen = true,
            "--mptcp" => protocol = Some(Protocol::from(IPPROTO_MPTCP)),
            other => panic!("unknown argument {other}"),
        }
    }
    let (domain, target) = match (v6_socket, target) {
        (true, SocketAddr::V4(v4)) => (
            Domain::IPV6,
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)),
        ),
        (true, v6 @ SocketAddr::V6(_)) | (false, v6 @ SocketAddr::V6(_)) => (Domain::IPV6, v6),
        (false, v4) => (Domain::IPV4, v4),
    };
    if let Some(ms) = repeat_ms {
        let start = std::time::Instant::now();
        let until = start + Duration::from_millis(ms);
        let mut stdout = std::io::stdout();
        while std::time::Instant::now() < until {
            let socket = Socket::new(domain, Type::STREAM, None).expect("socket");
            let result = socket.connect_timeout(&SockAddr::from(target), Duration::from_secs(1));
            let line = match result {
                Ok(()) => {
                    serde_json::json!({"t_ms": start.elapsed().as_millis() as u64, "connected": true})
                }
                Err(error) => serde_json::json!({
                    "t_ms": start.elapsed().as_millis() as u64,
                    "connected": false,
                    "errno": error.raw_os_error(),
                }),
            };
            writeln!(stdout, "{line}").unwrap();
            drop(socket);
            std::thread::sleep(Duration::from_millis(5));
        }
        return;
    }
    let pid = std::process::id();
    let socket = match Socket::new(domain, Type::STREAM, protocol) {
        Ok(socket) => socket,
        Err(error) => {
            let report = serde_json::json!({
                "pid": pid,
                "connected": false,
                "stage": "socket",
                "errno": error.raw_os_error(),
                "error": error.to_string(),
            });
            println!("{report}");
            return;
        }
    };
    if let Some(mark) = mark {
        socket
            .set_mark(mark)
            .expect("SO_MARK (needs CAP_NET_ADMIN)");
    }
    let result = if fastopen {
        fastopen_connect(&socket, &SockAddr::from(target))
    } else {
        socket.connect_timeout(&SockAddr::from(target), Duration::from_secs(3))
    };
    let report = match &result {
        Ok(()) => serde_json::json!({
            "pid": pid,
            "connected": true,
            "peer": socket.peer_addr().ok().and_then(|a| a.as_socket()).map(|a| a.to_string()),
            "local": socket.local_addr().ok().and_then(|a| a.as_socket()).map(|a| a.to_string()),
        }),
        Err(error) => serde_json::json!({
            "pid": pid,
            "connected": false,
            "errno": error.raw_os_error(),
            "error": error.to_string(),
        }),
    };
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{report}").unwrap();
    stdout.flush().unwrap();
    if result.is_ok() {
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Opens the connection the way TCP Fast Open clients do: the destination
/// and the first byte in one `sendto(MSG_FASTOPEN)`, no `connect()`.
fn fastopen_connect(socket: &Socket, target: &SockAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    socket.set_write_timeout(Some(Duration::from_secs(3)))?;
    // SAFETY: a valid socket, a one-byte buffer, and a sockaddr of the
    // length it says.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            b"x".as_ptr().cast(),
            1,
            libc::MSG_FASTOPEN,
            target.as_ptr().cast(),
            target.len(),
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
