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
    #[arg(long, global = true, env = "CHAPERONE_LOG", default_value = "info")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that this node can run chaperone: cgroup v2, kernel, privileges.
    Check,
    /// Run the node agent: eBPF redirect + proxy (the DaemonSet's command).
    Node(Box<crate::config::NodeArgs>),
    /// Detach every program chaperone pinned on this node and remove the
    /// pins: agent pods reach the API server directly again. For removing
    /// chaperone from a node (see deploy/README.md, "Removal").
    Detach(DetachArgs),
    /// Serve the mutating admission webhook that injects the CA bundle (and,
    /// in impersonate mode, the token audience) into agent pods.
    Webhook(webhook::WebhookArgs),
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
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Check => check(),
        Command::Node(args) => node(*args),
        Command::Detach(args) => detach(&args),
        Command::Webhook(args) => webhook::run(args),
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

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn node(args: crate::config::NodeArgs) -> anyhow::Result<ExitCode> {
    let config = crate::config::NodeConfig::resolve(
        args,
        (
            std::env::var("KUBERNETES_SERVICE_HOST").ok(),
            std::env::var("KUBERNETES_SERVICE_PORT").ok(),
        ),
    )?;
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
    let report = redirect::detach_all(&args.bpffs);
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

fn check() -> anyhow::Result<ExitCode> {
    let facts = redirect::preflight();
    println!("kernel:            {}", facts.kernel);
    match &facts.cgroup2_mount {
        Some(path) => println!("cgroup v2 mount:   {}", path.display()),
        None => println!("cgroup v2 mount:   MISSING (chaperone attaches to cgroup v2)"),
    }
    if facts.missing_capabilities.is_empty() {
        println!("privileges:        ok (CAP_BPF/CAP_SYS_ADMIN, CAP_PERFMON, CAP_NET_ADMIN)");
    } else {
        println!(
            "privileges:        MISSING {}",
            facts.missing_capabilities.join(", ")
        );
    }
    if facts.ready() {
        println!("ready:             yes");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("ready:             no");
        Ok(ExitCode::FAILURE)
    }
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
