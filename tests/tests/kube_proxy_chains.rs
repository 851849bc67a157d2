//! chaperone's upstream connections on a node with kube-proxy's iptables
//! chains (issue 24, item 3). kube-proxy reads packet mark bit `0x4000` as
//! "masquerade this packet" (`KUBE-MARK-MASQ` sets it, `KUBE-POSTROUTING`
//! masquerades what carries it) and drops what carries `0x8000`
//! (`KUBE-FIREWALL`). chaperone once marked its upstream sockets
//! `0x43485031`, which carries `0x4000`: on such a node every upstream
//! connection to a loopback API server timed out.
//!
//! The chains are installed in a network namespace of the test's own (the
//! host's rules are never touched) that has only a loopback interface, the
//! "API server" listens on its 127.0.0.1, and chaperone's real upstream
//! connector dials it from a thread that entered the namespace. There a
//! masqueraded loopback packet finds no source address and is dropped, as
//! it was on the measured node. Needs root and iptables.

use std::{
    net::{Ipv4Addr, TcpListener},
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

use chaperone::tls::{ConnectorOptions, LocalCa, UpstreamConfig, upstream_connector};
use chaperone_tests::require_root;

/// A network namespace with nothing but `lo` (up), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> anyhow::Result<Netns> {
        let netns = Netns {
            name: format!("chp-kp-{}", std::process::id()),
        };
        for args in [
            &["netns", "add", &netns.name][..],
            &[
                "netns",
                "exec",
                &netns.name,
                "ip",
                "link",
                "set",
                "lo",
                "up",
            ][..],
        ] {
            let output = Command::new("ip").args(args).output()?;
            anyhow::ensure!(
                output.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
use tower_service::Service as _;

/// kube-proxy's chains as it installs them (iptables mode), in `netns`.
fn install_kube_proxy_chains(netns: &Netns) -> anyhow::Result<()> {
    let rules: &[&[&str]] = &[
        &["-t", "nat", "-N", "KUBE-MARK-MASQ"],
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-MARK-MASQ",
            "-j",
            "MARK",
            "--set-xmark",
            "0x4000/0x4000",
        ],
        &["-t", "nat", "-N", "KUBE-POSTROUTING"],
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-POSTROUTING",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x4000/0x4000",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-POSTROUTING",
            "-j",
            "MARK",
            "--set-xmark",
            "0x4000/0x0",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-POSTROUTING",
            "-j",
            "MASQUERADE",
            "--random-fully",
        ],
        &["-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"],
        &["-N", "KUBE-FIREWALL"],
        &[
            "-A",
            "KUBE-FIREWALL",
            "-m",
            "mark",
            "--mark",
            "0x8000/0x8000",
            "-j",
            "DROP",
        ],
        &["-A", "OUTPUT", "-j", "KUBE-FIREWALL"],
        &["-A", "INPUT", "-j", "KUBE-FIREWALL"],
    ];
    for rule in rules {
        let output = Command::new("ip")
            .args(["netns", "exec", &netns.name, "iptables"])
            .args(*rule)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "iptables {}: {}",
            rule.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a thread that has entered `netns`: sockets it opens live
/// there.
fn in_netns<T: Send + 'static>(netns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{}", netns.name))
        .expect("the namespace's file");
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace file we hold.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the namespace")
}

#[test]
fn chaperones_upstream_connections_pass_kube_proxys_chains() {
    require_root!();
    if Command::new("iptables").arg("--version").output().is_err() {
        chaperone_tests::skip!(
            ci_fails,
            "iptables is not installed (`cargo xtask setup` installs it)"
        );
    }
    let netns = Netns::create().expect("network namespace");
    install_kube_proxy_chains(&netns).expect("kube-proxy's chains");

    let work = tempfile::tempdir().unwrap();
    let ca = LocalCa::load_or_create(work.path()).unwrap();
    let kubeconfig = work.path().join("kubeconfig");

    let accepted = in_netns(&netns, move || {
        // A loopback API server, as on a control-plane node.
        let apiserver = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        apiserver.set_nonblocking(true).unwrap();
        let port = apiserver.local_addr().unwrap().port();
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
                 https://127.0.0.1:{port}\n    certificate-authority-data: {}\nusers:\n- name: \
                 u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    \
                 user: u\ncurrent-context: c\n",
                base64_pem(ca.bundle_pem())
            ),
        )
        .unwrap();
        let upstream = UpstreamConfig::from_kubeconfig(&kubeconfig, None).expect("kubeconfig");
        // The connector the node agent's upstream uses, as it configures it.
        let mut connector = upstream_connector(&upstream, &ConnectorOptions::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            // The TLS handshake cannot finish (nobody answers it); the TCP
            // connection reaching the listener is what matters.
            let dial = tokio::spawn(connector.call(upstream.server.clone()));
            let deadline = Instant::now() + Duration::from_secs(5);
            let accepted = loop {
                match apiserver.accept() {
                    Ok((stream, _)) => break Some(stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            break None;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            dial.abort();
            accepted.is_some()
        })
    });
    assert!(
        accepted,
        "chaperone's upstream connection to a loopback API server never arrived through \
         kube-proxy's chains: does it carry a mark with bit 0x4000 (masquerade) or 0x8000 (drop)?"
    );
}

fn base64_pem(pem: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(pem)
}
