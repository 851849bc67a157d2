//! `agent-load`: a load generator replaying an agent's request mix against
//! an API server, for `cargo xtask bench`. Prints one JSON report.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use chaperone_tests::load::{
    AgentsSpec, LoadSpec, Op, agents, create_secrets, idle_connections, idle_watches, run,
};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Replay an agent's request mix against an API server and report latencies")]
struct Args {
    /// `https://host:port` of the target.
    #[arg(long)]
    url: String,
    /// PEM CA bundle the target's certificate chains to.
    #[arg(long)]
    ca: PathBuf,
    /// File holding the bearer token.
    #[arg(long)]
    token_file: PathBuf,
    #[arg(long, default_value = "bench")]
    namespace: String,
    /// Use HTTP/1.1 instead of HTTP/2.
    #[arg(long)]
    http1: bool,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Open loop at this many requests per second (default: closed loop).
    #[arg(long)]
    rate: Option<u32>,
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 4)]
    watches: usize,
    /// Instead of the mix: open this many idle watch streams, print
    /// `{"idle_watches_open": N}` once they are open, and hold them until
    /// stdin closes (the caller measures the target meanwhile).
    #[arg(long)]
    idle_watches: Option<usize>,
    /// Instead of the mix: open this many connections, each sending one
    /// GET secret and then idle; print `{"idle_connections_open": N}` and
    /// hold them until stdin closes.
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Instead of the mix: many agents, one per token file in this
    /// directory (`*.token`), each on its own connection with
    /// --agent-watches idle watches (in --watch-namespace) and one GET
    /// every 1/--agent-rate s for --seconds; prints `{"agents_ready": N}`
    /// once the watches are open, the report when done, then holds
    /// everything until stdin closes.
    #[arg(long)]
    agents_tokens: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    agent_watches: usize,
    #[arg(long, default_value_t = 1.0)]
    agent_rate: f64,
    #[arg(long, default_value = "idle")]
    watch_namespace: String,
    /// Instead of the mix: create this many Secrets `big-N` of
    /// --secret-bytes base64 characters each in --namespace, then exit
    /// (the bench's 50 MB list).
    #[arg(long)]
    create_secrets: Option<usize>,
    #[arg(long, default_value_t = 1_000_000)]
    secret_bytes: usize,
    /// Only this operation instead of the mix (profiling one path).
    #[arg(long, value_enum)]
    only: Option<Op>,
    /// HTTP/2 connections the idle watches are spread over.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Closed loop: send this many operations (after the warm-up's),
    /// then stop, instead of running for --seconds.
    #[arg(long, conflicts_with = "rate")]
    requests: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = LoadSpec {
        base: args.url.trim_end_matches('/').to_owned(),
        ca_pem: std::fs::read(&args.ca)
            .with_context(|| format!("cannot read {}", args.ca.display()))?,
        token: std::fs::read_to_string(&args.token_file)
            .with_context(|| format!("cannot read {}", args.token_file.display()))?
            .trim()
            .to_owned(),
        namespace: args.namespace,
        http2: !args.http1,
        concurrency: args.concurrency,
        rate: args.rate,
        warmup: Duration::from_secs_f64(args.warmup_seconds),
        duration: Duration::from_secs_f64(args.seconds),
        watches: args.watches,
        only: args.only,
        requests: args.requests,
    };
    let hold = || async {
        // Held until the caller closes our stdin.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
    };
    if let Some(count) = args.create_secrets {
        return create_secrets(&spec, count, args.secret_bytes).await;
    }
    if let Some(count) = args.idle_connections {
        return idle_connections(
            &spec,
            count,
            |open| println!("{{\"idle_connections_open\": {open}}}"),
            hold(),
        )
        .await;
    }
    if let Some(dir) = &args.agents_tokens {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "token"))
            .collect();
        files.sort();
        let tokens = files
            .iter()
            .map(|f| std::fs::read_to_string(f).map(|t| t.trim().to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .context("reading the agents' tokens")?;
        if tokens.is_empty() {
            anyhow::bail!("no *.token file in {}", dir.display());
        }
        let agents_spec = AgentsSpec {
            tokens,
            watches: args.agent_watches,
            watch_namespace: args.watch_namespace.clone(),
            rate: args.agent_rate,
        };
        return agents(
            &spec,
            &agents_spec,
            |open| println!("{{\"agents_ready\": {open}}}"),
            |report| {
                println!(
                    "{{\"agents_done\": {}}}",
                    serde_json::to_string(report).unwrap_or_default()
                )
            },
            hold(),
        )
        .await;
    }
    if let Some(count) = args.idle_watches {
        let hold = async {
            // Held until the caller closes our stdin.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
        };
        return idle_watches(
            &spec,
            count,
            args.connections,
            Duration::from_secs(10),
            |open| println!("{{\"idle_watches_open\": {open}}}"),
            hold,
        )
        .await;
    }
    let report = run(spec).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
