//! `agent-load`: a load generator replaying an agent's request mix against
//! an API server, for `cargo xtask bench`. Prints one JSON report.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use chaperone_tests::load::{LoadSpec, run};
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = run(LoadSpec {
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
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
