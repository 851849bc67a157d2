//! `cargo xtask demo`: what chaperone does today, on this machine, with real
//! tools. Sets up an agent "pod" (network namespace + kubelet-named cgroup),
//! attaches chaperone's eBPF redirect, and lets a real `curl` inside the pod
//! dial the API server's service IP. Needs root.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use chaperone::redirect::{CgroupId, RedirectSpec, Redirector, RefusedDestination};
use chaperone_tests::topology::{Cgroup, Netns, Placement};

const SERVICE_IP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 443);

fn main() -> Result<()> {
    if !chaperone_tests::is_root() {
        anyhow::bail!("the demo needs root (eBPF, network namespaces, cgroups)");
    }
    let mut step = 0;
    let mut say = |text: &str| {
        step += 1;
        println!("\n[{step}] {text}");
    };

    say("Create an agent pod: a network namespace and a cgroup named like the kubelet's");
    let subtree = Cgroup::test_subtree()?;
    let agent = subtree.child(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d3c0f5e_demo.slice/cri-containerd-agent.scope",
    )?;
    let other = subtree.child("system.slice/ci-runner-unlabeled.scope")?;
    let netns = Netns::create()?;
    println!(
        "    namespace {} (agent {}, node {})",
        netns.name, netns.agent_v4, netns.host_v4
    );
    println!(
        "    agent cgroup {} (id {})",
        agent.path.display(),
        agent.id()
    );

    say(
        "Start a node-local listener where chaperone's proxy will run (the proxy itself comes with issue #3)",
    );
    let listener = TcpListener::bind((netns.host_v4, 0))?;
    let port = listener.local_addr()?.port();
    println!("    listening on {}:{port}", netns.host_v4);

    say("Attach chaperone's eBPF programs and guard the agent cgroup");
    let redirector = Redirector::attach(RedirectSpec {
        cgroup: subtree.path.clone(),
        proxy_v4: Some(netns.host_v4),
        proxy_v6: None,
        proxy_port: port,
        mark: chaperone::DEFAULT_SOCKET_MARK,
    })?;
    redirector.add_target(SERVICE_IP)?;
    redirector.add_agent_cgroup(CgroupId(agent.id()))?;
    for destination in RefusedDestination::defaults() {
        redirector.refuse(destination)?;
    }
    println!("    target {SERVICE_IP}; refused: kubelet :10250, etcd :2379-2380, 169.254.169.254");

    let server = thread::spawn(move || -> Result<String> {
        let (mut stream, peer) = listener.accept()?;
        let local = stream.local_addr()?;
        let attested = redirector
            .take_connection(peer, local)
            .context("the kernel did not record the connection")?;
        let mut request = [0u8; 1024];
        let n = stream.read(&mut request)?;
        let first_line = String::from_utf8_lossy(&request[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        let body = format!(
            "node-local listener here. You dialed {}; the kernel says you are pid {} (uid {}) in cgroup {}.\n",
            attested.orig_dst, attested.pid, attested.uid, attested.cgroup_id
        );
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        Ok(first_line)
    });

    say(
        "The agent runs a real curl against the API server's service IP (nothing answers it without chaperone)",
    );
    let agent_pod = Placement {
        cgroup: &agent,
        netns: &netns,
    };
    let out = agent_pod
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{SERVICE_IP}/version"),
        ])
        .output()?;
    println!("    $ curl http://{SERVICE_IP}/version");
    print_indented(&out.stdout, &out.stderr);
    let request_line = server.join().expect("listener thread")?;
    println!("    the listener received: {request_line}");

    say("The agent tries to bypass the API server: the kubelet port and the metadata service");
    for url in [
        format!("https://{}:10250/pods", netns.host_v4),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let out = agent_pod
            .command("curl")
            .args(["-sS", "--max-time", "3", &url])
            .output()?;
        println!("    $ curl {url}");
        print_indented(&out.stdout, &out.stderr);
    }

    say("A process outside the agent cgroup is left alone");
    let unguarded = Placement {
        cgroup: &other,
        netns: &netns,
    };
    let out = unguarded
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "2",
            &format!("http://{SERVICE_IP}/version"),
        ])
        .output()?;
    println!("    $ curl http://{SERVICE_IP}/version   (not redirected: nothing answers)");
    print_indented(&out.stdout, &out.stderr);

    println!("\nDone. Everything the demo created is removed.");
    thread::sleep(Duration::from_millis(100));
    Ok(())
}

fn print_indented(stdout: &[u8], stderr: &[u8]) {
    for line in String::from_utf8_lossy(stdout)
        .lines()
        .chain(String::from_utf8_lossy(stderr).lines())
    {
        println!("      {line}");
    }
}
