//! What both binaries (`chaperone`, `kubectl-chaperone`) say about
//! themselves: an example on every help page, `version`, and shell
//! completion.
//!
//! The examples of `chaperone`'s subcommands live in one table here
//! ([`CHAPERONE_EXAMPLES`]) rather than beside each module's flags, so
//! that a module's owner changes its flags without touching the help of
//! the others; [`missing_examples`] (a unit test walks both binaries) says
//! which help page has none.

use std::io::Write;

use clap::{Command, CommandFactory};

/// `chaperone` subcommand path (space-separated) → its examples.
pub const CHAPERONE_EXAMPLES: &[(&str, &str)] = &[
    (
        "",
        "  # Is this node ready to run the agent?\n  chaperone check\n\n  \
         # What would the policy do with a request?\n  chaperone policy explain -f deploy/policies \
         --as system:serviceaccount:agents:coder delete deployments.apps web -n prod-a\n\n  \
         # Approvers use the kubectl plugin\n  kubectl chaperone list",
    ),
    ("check", "  chaperone check"),
    (
        "node",
        "  # As the DaemonSet runs it (deploy/base/node)\n  chaperone node --policy /etc/chaperone/policy.yaml",
    ),
    (
        "detach",
        "  # Remove chaperone from this node: agent pods reach the API server directly again\n  \
         chaperone detach --bpffs /sys/fs/bpf/chaperone",
    ),
    (
        "webhook",
        "  chaperone webhook --tls-cert /tls/tls.crt --tls-key /tls/tls.key",
    ),
    (
        "gate",
        "  # As the webhook injects it into agent pods (init container chaperone-gate)\n  \
         chaperone gate --ca /etc/chaperone/gate/chaperone-ca.crt --timeout 10m",
    ),
    (
        "sessions",
        "  chaperone sessions --dir /var/lib/chaperone/sessions\n  \
         chaperone sessions --pod agents/coder-0",
    ),
    (
        "replay",
        "  chaperone replay SESSION_ID\n  chaperone replay SESSION_ID --json",
    ),
    (
        "verify",
        "  chaperone verify SESSION_ID\n  chaperone verify /var/lib/chaperone/sessions/agents/coder-0/SESSION_ID.jsonl",
    ),
    (
        "ca",
        "  chaperone ca init --dir /var/lib/chaperone/ca\n  chaperone ca show",
    ),
    ("ca init", "  chaperone ca init --dir /var/lib/chaperone/ca"),
    ("ca show", "  chaperone ca show --dir /var/lib/chaperone/ca"),
    (
        "ca export",
        "  # The bundle agent pods trust: the cluster CA, then chaperone's\n  \
         chaperone ca export --cluster-ca /etc/kubernetes/pki/ca.crt > bundle.pem",
    ),
    (
        "policy",
        "  chaperone policy check deploy/policies/\n  \
         chaperone policy explain -f deploy/policies --as system:serviceaccount:agents:coder get secrets -n prod-a",
    ),
    (
        "policy check",
        "  chaperone policy check deploy/policies/\n  chaperone policy check my-policy.yaml",
    ),
    (
        "policy explain",
        "  chaperone policy explain -f deploy/policies --as system:serviceaccount:agents:coder \
         delete deployments.apps web -n prod-a",
    ),
    (
        "policy crd",
        "  chaperone policy crd > agentpolicies.chaperone.dev.yaml",
    ),
    ("version", "  chaperone version"),
    (
        "completion",
        "  # bash, for this shell\n  source <(chaperone completion bash)\n\n  \
         # zsh, for every shell\n  chaperone completion zsh > \"${fpath[1]}/_chaperone\"",
    ),
];

/// `command` with `examples` as the `Examples:` section of each page.
pub fn with_examples(command: Command, examples: &[(&str, &str)]) -> Command {
    attach(command, "", examples)
}

fn attach(mut command: Command, path: &str, examples: &[(&str, &str)]) -> Command {
    if let Some((_, text)) = examples.iter().find(|(p, _)| *p == path) {
        command = command.after_help(format!("Examples:\n{text}"));
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in names {
        let child = if path.is_empty() {
            name.clone()
        } else {
            format!("{path} {name}")
        };
        command = command.mut_subcommand(&name, |sub| attach(sub, &child, examples));
    }
    command
}

/// Parses the command line of `C` with `examples` on its help pages.
pub fn parse<C: clap::Parser>(examples: &[(&str, &str)]) -> C {
    let matches = with_examples(C::command(), examples).get_matches();
    C::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// Every help page of `command` (its own and each subcommand's, but not
/// clap's `help`) without an example naming `binary`.
pub fn missing_examples(command: &mut Command, binary: &str) -> Vec<String> {
    command.build();
    let mut missing = Vec::new();
    walk(command, binary, &mut Vec::new(), &mut missing);
    missing
}

fn walk(command: &Command, binary: &str, path: &mut Vec<String>, missing: &mut Vec<String>) {
    let help = command.clone().render_long_help().to_string();
    let example = help
        .split_once("Examples:")
        .map(|(_, rest)| rest)
        .is_some_and(|rest| rest.lines().any(|l| l.trim_start().starts_with(binary)));
    if !example {
        missing.push(format!("{binary} {}", path.join(" ")).trim().to_owned());
    }
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        path.push(sub.get_name().to_owned());
        walk(sub, binary, path, missing);
        path.pop();
    }
}

/// `version`: the binary's name and version.
pub fn print_version(binary: &str, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "{binary} v{}", env!("CARGO_PKG_VERSION"))
}

/// `completion SHELL`: the script for `binary`. A closed pipe
/// (`| head`) ends it quietly; clap_complete would panic on it.
pub fn print_completion<C: CommandFactory>(
    shell: clap_complete::Shell,
    binary: &str,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut command = C::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, binary, &mut script);
    match out.write_all(&script) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::cli::PluginCli;

    #[test]
    fn every_help_page_of_chaperone_has_an_example() {
        let mut command = with_examples(crate::cli::Cli::command(), CHAPERONE_EXAMPLES);
        let missing = missing_examples(&mut command, "chaperone");
        assert!(
            missing.is_empty(),
            "help pages without an example: {missing:?}"
        );
    }

    #[test]
    fn every_help_page_of_the_plugin_has_an_example() {
        let mut command = PluginCli::command();
        let missing = missing_examples(&mut command, "kubectl");
        assert!(
            missing.is_empty(),
            "help pages without an example: {missing:?}"
        );
    }

    #[test]
    fn the_walk_notices_a_page_without_an_example() {
        let mut command = with_examples(
            crate::cli::Cli::command(),
            &CHAPERONE_EXAMPLES[..CHAPERONE_EXAMPLES.len() - 1],
        );
        assert_eq!(
            missing_examples(&mut command, "chaperone"),
            vec!["chaperone completion"]
        );
    }

    #[test]
    fn every_example_names_a_real_page() {
        let command = crate::cli::Cli::command();
        for (path, _) in CHAPERONE_EXAMPLES {
            let mut at = &command;
            for name in path.split_whitespace() {
                at = at
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("no page `chaperone {path}`"));
            }
        }
    }

    #[test]
    fn a_closed_pipe_ends_the_completion_script_quietly() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        print_completion::<crate::cli::Cli>(clap_complete::Shell::Bash, "chaperone", &mut Closed)
            .unwrap();
    }

    #[test]
    fn completion_scripts_name_the_subcommands() {
        let mut out = Vec::new();
        print_completion::<crate::cli::Cli>(clap_complete::Shell::Bash, "chaperone", &mut out)
            .unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("complete -F") && script.contains("detach"),
            "{script}"
        );
        let mut out = Vec::new();
        print_completion::<PluginCli>(clap_complete::Shell::Zsh, "kubectl-chaperone", &mut out)
            .unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("#compdef kubectl-chaperone") && script.contains("approve"));
    }
}
