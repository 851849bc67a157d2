//! `kube-sim`: runs the Kubernetes API-server simulator by itself (for the
//! demo and for trying clients against it).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context;
use chaperone_tests::sim::{SimConfig, Simulator};
use clap::Parser;

/// A Kubernetes API-server simulator: HTTPS with its own cluster CA,
/// service-account tokens, discovery, a generic object store, watch, logs.
#[derive(Parser, Debug)]
#[command(name = "kube-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "KUBE_SIM_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Extra IP address for the serving certificate (repeatable).
    #[arg(long = "extra-ip")]
    extra_ips: Vec<IpAddr>,
    /// Extra DNS name for the serving certificate (repeatable).
    #[arg(long = "extra-name")]
    extra_names: Vec<String>,
    /// Use this admin token instead of a random one.
    #[arg(long, env = "KUBE_SIM_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Let every authenticated user do everything (the demo's preset);
    /// without it only system:masters (the admin token) may.
    #[arg(long)]
    permissive: bool,
    /// Service-account issuer (the `iss` of minted tokens).
    #[arg(long, default_value = "https://kubernetes.default.svc.cluster.local")]
    issuer: String,
    /// Write the cluster CA (PEM) here.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Write an admin kubeconfig here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Create the objects of this YAML file (multi-document) at start.
    #[arg(long)]
    seed: Vec<PathBuf>,
    /// Mint a projected service-account token for `NAMESPACE/NAME` (one
    /// hour) and write it to --token-out (load generators, benches).
    #[arg(long, requires = "token_out")]
    mint_token: Option<String>,
    /// Mint a pod-bound token for each of the first N pods of
    /// --pod-tokens-namespace (the pod's own service account, its name and
    /// uid claimed), one file per pod in --pod-tokens-out: many distinct
    /// agent pods for the bench.
    #[arg(long, requires = "pod_tokens_out")]
    mint_pod_tokens: Option<usize>,
    #[arg(long, default_value = "bench")]
    pod_tokens_namespace: String,
    /// Directory --mint-pod-tokens writes `pod-I.token` files to.
    #[arg(long)]
    pod_tokens_out: Option<PathBuf>,
    /// Where --mint-token writes the token.
    #[arg(long, requires = "mint_token")]
    token_out: Option<PathBuf>,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_seconds: u64,
    /// HTTP/2 streams a client may open per connection (kube-apiserver's
    /// `--http2-max-streams-per-connection`).
    #[arg(long, default_value_t = 1000)]
    http2_max_streams_per_connection: u32,
    /// The Kubernetes 1.x minor version to claim and answer as (20 is
    /// v1.20.2; 28 and later serve SelfSubjectReview).
    #[arg(long, default_value_t = chaperone_tests::sim::DEFAULT_MINOR_VERSION)]
    minor_version: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = SimConfig {
        listen: args.listen,
        extra_ips: args.extra_ips,
        extra_names: args.extra_names,
        issuer: args.issuer,
        admin_token: args.admin_token,
        bookmark_interval: Duration::from_secs(args.bookmark_seconds.max(1)),
        http2_max_streams: args.http2_max_streams_per_connection.max(1),
        minor_version: args.minor_version,
        ..SimConfig::default()
    };
    if args.permissive {
        config = config.permissive();
    }
    let sim = Simulator::start(config).await?;
    for path in &args.seed {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading seed objects from {}", path.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj = <serde_json::Value as serde::Deserialize>::deserialize(doc)
                .with_context(|| format!("parsing {} as YAML objects", path.display()))?;
            if obj.is_null() {
                continue;
            }
            sim.store().create(obj).map_err(|e| {
                anyhow::anyhow!("seeding from {}: {e} (are the objects' namespaces and CRDs created earlier in the file?)", path.display())
            })?;
        }
    }
    if let Some(path) = &args.ca_out {
        std::fs::write(path, sim.ca_pem())
            .with_context(|| format!("writing the CA to {}", path.display()))?;
    }
    if let Some(path) = &args.kubeconfig_out {
        sim.write_kubeconfig(path, &sim.admin_token())?;
    }
    if let (Some(account), Some(path)) = (&args.mint_token, &args.token_out) {
        let (namespace, name) = account
            .split_once('/')
            .with_context(|| format!("--mint-token {account:?}: expected NAMESPACE/NAME"))?;
        let token =
            sim.mint_service_account_token(namespace, name, None, None, Duration::from_secs(3600))?;
        std::fs::write(path, token)
            .with_context(|| format!("writing the token to {}", path.display()))?;
    }
    if let (Some(count), Some(dir)) = (args.mint_pod_tokens, &args.pod_tokens_out) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let namespace = &args.pod_tokens_namespace;
        for i in 0..count {
            let Some(pod) = sim
                .store()
                .get("pods", Some(namespace), &format!("pod-{i}"))
            else {
                anyhow::bail!(
                    "--mint-pod-tokens {count}: no pod pod-{i} in namespace {namespace} (seed pods pod-0..pod-{})",
                    count - 1
                );
            };
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
            let account = pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default");
            let token = sim.mint_service_account_token(
                namespace,
                account,
                Some((name, uid)),
                None,
                Duration::from_secs(3600),
            )?;
            let path = dir.join(format!("pod-{i}.token"));
            std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    println!("kube-sim listening on {}", sim.url());
    if let Some(path) = &args.kubeconfig_out {
        println!(
            "admin kubeconfig: {} (kubectl --kubeconfig {} get ns)",
            path.display(),
            path.display()
        );
    } else {
        println!("admin token: {}", sim.admin_token());
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    sim.shutdown().await;
    Ok(())
}
