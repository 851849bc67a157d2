//! The `chaperone` command line. Each subcommand is a thin layer over the
//! module that owns the work.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{redirect, webhook};

/// Chaperone guards the Kubernetes API connections of AI agents.
///
/// Agents (coding agents, in-cluster CI runners) are handed a service-account
/// token and kubectl. Chaperone sits on their data path without any change on
/// the agent's side: eBPF programs attached to the node's cgroup v2 hierarchy
/// transparently redirect the API-server connections of labeled agent pods to
/// a node-local proxy. The proxy knows from the kernel which pod and process
/// dialed, verifies the agent's token, applies policy, and then masks secrets
/// in responses, blocks dangerous requests, holds risky ones for a human's
/// just-in-time approval, and records every session for replay and audit.
///
/// Deploy the DaemonSet, label agent pods `chaperone.dev/intercept=true`, and
/// change nothing else.
#[derive(Debug, Parser)]
#[command(
    name = "chaperone",
    version,
    about,
    long_about,
    propagate_version = true
)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `chaperone=debug`.
    /// A filter that does not parse is refused.
    #[arg(long, global = true, env = "CHAPERONE_LOG", default_value = "info")]
    pub log: String,

    /// Log lines as `text` (colour only on a terminal) or `json` (one object
    /// per line, for log pipelines).
    #[arg(
        long,
        global = true,
        env = "CHAPERONE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: crate::logs::LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, changing nothing, whether `chaperone node` with the same
    /// flags, environment and config file would start on this node: kernel,
    /// privileges, cgroups, bpffs, ports, CA, kubeconfig, policies, keys,
    /// directories. Exit 1 and what to fix when it would not.
    ///
    /// Example, in the DaemonSet's pod (same environment as the node agent):
    /// `kubectl -n chaperone-system exec ds/chaperone-node -- chaperone check`
    Check(Box<crate::config::NodeArgs>),
    /// Run the node agent: eBPF redirect + proxy (the DaemonSet's command).
    Node(Box<crate::config::NodeArgs>),
    /// Detach every program chaperone pinned on this node and remove the
    /// pins: agent pods reach the API server directly again. For removing
    /// chaperone from a node (see deploy/README.md, "Removal").
    Detach(DetachArgs),
    /// Serve the mutating admission webhook that injects the CA bundle (and,
    /// in impersonate mode, the token audience) into agent pods.
    Webhook(webhook::WebhookArgs),
    /// Wait until this pod's API connections reach chaperone's proxy (a TLS
    /// handshake trusting only chaperone's CA), then exit 0: the init
    /// container `chaperone-gate` the webhook adds to agent pods, so none
    /// starts unguarded while no node agent runs on its node.
    Gate(crate::gate::GateArgs),
    /// List recorded sessions: pod, caller, start, duration, decisions.
    Sessions(crate::record::cli::SessionsArgs),
    /// Print a recorded session as a timeline (or JSON with --json).
    Replay(crate::record::cli::ReplayArgs),
    /// Check a recorded session's hash chain; exit 1 at the first broken record.
    Verify(crate::record::cli::VerifyArgs),
    /// Manage chaperone's CA: the certificate authority agent pods must trust.
    #[command(subcommand)]
    Ca(crate::tls::cli::CaCommand),
    /// Validate and explain AgentPolicy files, print the CRD.
    #[command(subcommand)]
    Policy(crate::policy::cli::PolicyCommand),
    /// Print chaperone's version.
    Version,
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    Completion { shell: clap_complete::Shell },
}

pub fn main() -> ExitCode {
    let cli = crate::usage::parse::<Cli>(crate::usage::CHAPERONE_EXAMPLES);
    if let Err(error) = crate::logs::init(&cli.log, cli.log_format) {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Check(args) => check(*args),
        Command::Node(args) => node(*args),
        Command::Detach(args) => detach(&args),
        Command::Webhook(args) => webhook::run(args),
        Command::Gate(args) => crate::gate::run(args),
        Command::Sessions(args) => crate::record::cli::sessions(&args, &mut std::io::stdout()),
        Command::Replay(args) => crate::record::cli::replay(&args, &mut std::io::stdout()),
        Command::Verify(args) => crate::record::cli::verify(&args, &mut std::io::stdout()),
        Command::Ca(command) => crate::tls::cli::run(command),
        Command::Policy(cmd) => crate::policy::cli::run(cmd),
        Command::Version => crate::usage::print_version("chaperone", &mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
        Command::Completion { shell } => {
            crate::usage::print_completion::<Cli>(shell, "chaperone", &mut std::io::stdout())
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn node(args: crate::config::NodeArgs) -> anyhow::Result<ExitCode> {
    let config = crate::config::NodeConfig::resolve(args, service_env())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chaperone-data")
        .build()?;
    runtime.block_on(crate::node::run(config))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The bpffs directory the node agent pinned its links and maps in.
    #[arg(long, env = "CHAPERONE_BPFFS", default_value = crate::config::DEFAULT_BPFFS)]
    pub bpffs: std::path::PathBuf,
}

fn detach(args: &DetachArgs) -> anyhow::Result<ExitCode> {
    let report = redirect::detach_all(&args.bpffs)?;
    for link in &report.links {
        println!("detached and unpinned link {link}");
    }
    for map in &report.maps {
        println!("unpinned map {map}");
    }
    for problem in &report.problems {
        eprintln!("problem: {problem}");
    }
    if report.links.is_empty() && report.maps.is_empty() && report.problems.is_empty() {
        println!(
            "nothing pinned under {}: chaperone is not attached here",
            args.bpffs.display()
        );
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check(args: crate::config::NodeArgs) -> anyhow::Result<ExitCode> {
    let facts = redirect::preflight();
    let line = |what: &str, text: &str| println!("{:<19}{text}", format!("{what}:"));
    line("kernel", &facts.kernel);
    match &facts.cgroup2_mount {
        Some(path) => line("cgroup v2 mount", &path.display().to_string()),
        None => line(
            "cgroup v2 mount",
            "MISSING (chaperone attaches to cgroup v2)",
        ),
    }
    // The same resolution and the same inspection as `chaperone node`.
    let ready = match crate::config::NodeConfig::resolve(args, service_env()) {
        Err(error) => {
            line("configuration", &format!("PROBLEM: {error:#}"));
            false
        }
        Ok(config) => {
            line("configuration", "ok");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let inspection = runtime.block_on(crate::node::inspect(&config));
            for finding in &inspection.findings {
                match &finding.outcome {
                    Ok(found) => line(finding.what, &format!("ok ({found})")),
                    Err(problem) => line(finding.what, &format!("PROBLEM: {problem}")),
                }
            }
            inspection.ready()
        }
    };
    line(
        "ready",
        if ready {
            "yes: `chaperone node` with these flags would start"
        } else {
            "no: `chaperone node` with these flags refuses to start (fix each PROBLEM above)"
        },
    );
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `(KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT)`.
fn service_env() -> (Option<String>, Option<String>) {
    (
        std::env::var("KUBERNETES_SERVICE_HOST").ok(),
        std::env::var("KUBERNETES_SERVICE_PORT").ok(),
    )
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn recording_commands_parse() {
        let cli =
            Cli::try_parse_from(["chaperone", "sessions", "--dir", "/r", "--pod", "a/b"]).unwrap();
        assert!(matches!(cli.command, Command::Sessions(ref a) if a.pod.as_deref() == Some("a/b")));
        // The node agent's own flag name works everywhere; `--dir` stays.
        let cli = Cli::try_parse_from(["chaperone", "sessions", "--record-dir", "/r"]).unwrap();
        assert!(
            matches!(cli.command, Command::Sessions(ref a) if a.read.dir == std::path::Path::new("/r"))
        );
        let cli = Cli::try_parse_from(["chaperone", "verify", "--record-dir", "/r", "S1"]).unwrap();
        assert!(
            matches!(cli.command, Command::Verify(ref a) if a.read.dir == std::path::Path::new("/r"))
        );
        for spelling in ["--ca-dir", "--dir"] {
            Cli::try_parse_from(["chaperone", "ca", "show", spelling, "/ca"]).unwrap();
        }
        let cli = Cli::try_parse_from(["chaperone", "replay", "S1", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Replay(ref a) if a.json && a.session == "S1"));
        let cli = Cli::try_parse_from(["chaperone", "verify", "/r/a/b/S1.jsonl"]).unwrap();
        assert!(matches!(cli.command, Command::Verify(ref a) if a.session == "/r/a/b/S1.jsonl"));
        assert!(Cli::try_parse_from(["chaperone", "verify"]).is_err());
    }

    #[test]
    fn help_explains_the_product() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("redirect"), "{help}");
        assert!(help.contains("chaperone.dev/intercept=true"), "{help}");
    }
}
