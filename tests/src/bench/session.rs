//! A whole agent session: a fixed script of real `kubectl` commands (get,
//! list, describe, apply, logs, label, delete) run against the simulator
//! directly and through chaperone, in alternating rounds, each with its own
//! kubeconfig and discovery cache; the wall time of the whole script,
//! through chaperone over direct.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::setup::NAMESPACE;

/// The script: 50 commands an agent investigating and changing a namespace
/// would run. The ConfigMap the script applies, labels and deletes leaves
/// the namespace as the session found it. Without `logs` (an upstream with
/// no kubelet), each `kubectl logs` becomes a `get events`.
pub fn script(logs: bool) -> Vec<Vec<String>> {
    let mut commands: Vec<Vec<String>> = Vec::new();
    let mut push = |args: &[&str]| commands.push(args.iter().map(|a| a.to_string()).collect());
    push(&["get", "namespaces"]);
    push(&["api-resources", "--namespaced=true", "-o", "name"]);
    for round in 0..5 {
        let pod = format!("pod-{}", round * 7 + 1);
        let other = format!("pod-{}", round * 7 + 2);
        let cm = format!("config-{round}");
        push(&["get", "pods", "-n", NAMESPACE]);
        push(&["get", "pod", &pod, "-n", NAMESPACE, "-o", "yaml"]);
        push(&["describe", "pod", &other, "-n", NAMESPACE]);
        if logs {
            push(&["logs", &pod, "-n", NAMESPACE, "-c", "web", "--tail", "20"]);
        } else {
            push(&["get", "events", "-n", NAMESPACE]);
        }
        push(&["get", "secrets", "-n", NAMESPACE]);
        push(&[
            "get",
            "secret",
            "db-credentials",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ]);
        push(&["get", "configmap", &cm, "-n", NAMESPACE, "-o", "yaml"]);
        push(&["apply", "-n", NAMESPACE, "-f", "{manifest}"]);
    }
    push(&["get", "configmaps", "-n", NAMESPACE]);
    push(&["get", "configmaps", "-n", NAMESPACE, "-o", "name"]);
    push(&["get", "secret", "secret-3", "-n", NAMESPACE, "-o", "yaml"]);
    push(&["describe", "configmap", "session-notes", "-n", NAMESPACE]);
    push(&[
        "label",
        "configmap",
        "session-notes",
        "-n",
        NAMESPACE,
        "reviewed=true",
        "--overwrite",
    ]);
    push(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app=web-3",
        "-o",
        "wide",
    ]);
    push(&["get", "pods", "-A", "--no-headers"]);
    push(&["delete", "configmap", "session-notes", "-n", NAMESPACE]);
    commands
}

/// The manifest the script applies (the same object each time: the first
/// apply creates it, the others find nothing to change).
const MANIFEST: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: session-notes
data:
  findings: "pods healthy; secret db-credentials present"
"#;

/// Where kubectl reaches one target.
pub struct SessionTarget {
    pub name: &'static str,
    pub url: String,
    pub ca: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct SessionResult {
    pub commands: usize,
    pub rounds: usize,
    /// Wall seconds of the whole script per round, direct and through
    /// chaperone.
    pub direct_seconds: Vec<f64>,
    pub chaperone_seconds: Vec<f64>,
    /// Median of chaperone / direct per round.
    pub ratio: f64,
    pub kubectl: String,
}

/// Runs the first `commands` of [`script`] against each target, `rounds`
/// times, alternating which goes first.
pub fn run(
    work: &Path,
    token: &Path,
    direct: &SessionTarget,
    chaperone: &SessionTarget,
    commands: usize,
    rounds: usize,
    logs: bool,
) -> Result<SessionResult> {
    let script: Vec<_> = script(logs).into_iter().take(commands).collect();
    std::fs::create_dir_all(work)?;
    let token = std::fs::read_to_string(token)?.trim().to_owned();
    let manifest = work.join("session-notes.yaml");
    std::fs::write(&manifest, MANIFEST)?;
    let mut prepared = Vec::new();
    for target in [direct, chaperone] {
        let dir = work.join(format!("kubectl-{}", target.name));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(target, &token))?;
        // Discovery cached once, as an agent's kubectl does after its first
        // command: the rounds measure the session, not a cold cache.
        let cache = dir.join("cache");
        run_one(&kubeconfig, &cache, &["api-resources".into()], &manifest)
            .with_context(|| format!("kubectl against {} ({})", target.name, target.url))?;
        prepared.push((kubeconfig, cache));
    }
    let (mut direct_seconds, mut chaperone_seconds) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for i in 0..2 {
            let which = (i + round) % 2;
            let (kubeconfig, cache) = &prepared[which];
            let started = Instant::now();
            for args in &script {
                run_one(kubeconfig, cache, args, &manifest).with_context(|| {
                    format!(
                        "the session's `kubectl {}` against {}",
                        args.join(" "),
                        [direct, chaperone][which].name
                    )
                })?;
            }
            let seconds = started.elapsed().as_secs_f64();
            if which == 0 {
                direct_seconds.push(seconds);
            } else {
                chaperone_seconds.push(seconds);
            }
        }
    }
    let mut ratios: Vec<f64> = direct_seconds
        .iter()
        .zip(&chaperone_seconds)
        .map(|(d, c)| c / d.max(1e-9))
        .collect();
    ratios.sort_by(|a, b| a.total_cmp(b));
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    Ok(SessionResult {
        commands: script.len(),
        rounds,
        direct_seconds,
        chaperone_seconds,
        ratio: ratios[ratios.len() / 2],
        kubectl,
    })
}

fn kubeconfig_yaml(target: &SessionTarget, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: agent\ncurrent-context: c\n",
        target.url,
        target.ca.display()
    )
}

fn run_one(kubeconfig: &Path, cache: &Path, args: &[String], manifest: &Path) -> Result<()> {
    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args.iter().map(|a| {
            if a == "{manifest}" {
                manifest.display().to_string()
            } else {
                a.clone()
            }
        }))
        .stdin(Stdio::null())
        .output()
        .context("cannot run kubectl (is it installed?)")?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_script_is_fifty_commands_and_cleans_up_after_itself() {
        let script = super::script(true);
        assert_eq!(script.len(), 50);
        assert_eq!(super::script(false).len(), 50);
        let applies = script.iter().filter(|c| c[0] == "apply").count();
        assert!(applies > 0);
        assert_eq!(script.last().map(|c| c[0].as_str()), Some("delete"));
    }
}
