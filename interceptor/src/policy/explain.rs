//! `chaperone policy explain`: evaluation again, saying why, policy by
//! policy and rule by rule.

use std::fmt::{self, Write as _};

use super::evaluate::{CompiledRule, Mismatch, PolicySet, Prepared, effective_verb};
use super::glob::Glob;
use super::{Action, Decision, PolicyInput};

impl PolicySet {
    /// Evaluates like [`Self::evaluate`] and says why, policy by policy
    /// and rule by rule, for `chaperone policy explain`.
    pub fn explain(&self, input: &PolicyInput<'_>) -> Explanation {
        let prepared = Prepared::new(input);
        let mut policies = Vec::new();
        for policy in &self.policies {
            let mut trace = PolicyTrace {
                name: policy.name.to_string(),
                generation: policy.generation,
                dry_run: policy.dry_run,
                selected: policy.selects(input),
                rules: Vec::new(),
                outcome: None,
            };
            if trace.selected {
                for rule in &policy.rules {
                    match rule.check(&prepared) {
                        Ok(()) => {
                            trace.rules.push(RuleTrace {
                                name: rule.outcome.rule.to_string(),
                                matched: true,
                                reason: format!("matches; action {}", rule.outcome.action),
                            });
                            trace.outcome =
                                Some((rule.outcome.rule.to_string(), rule.outcome.action));
                            break;
                        }
                        Err(m) => trace.rules.push(RuleTrace {
                            name: rule.outcome.rule.to_string(),
                            matched: false,
                            reason: rule.describe(m, input),
                        }),
                    }
                }
                if trace.outcome.is_none() {
                    trace.outcome = policy
                        .default
                        .as_ref()
                        .map(|d| ("default".into(), d.action));
                }
            }
            policies.push(trace);
        }
        Explanation {
            decision: self.evaluate(input),
            policies,
        }
    }
}

impl CompiledRule {
    /// Says why [`Self::check`] failed, in words for `policy explain`.
    fn describe(&self, mismatch: Mismatch, input: &PolicyInput<'_>) -> String {
        let req = input.request;
        let list = |globs: &Option<Vec<Glob>>| -> String {
            globs
                .iter()
                .flatten()
                .map(|g| format!("\"{g}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match mismatch {
            Mismatch::ResourceRuleOnNonResource => format!(
                "{} is a non-resource URL; this rule matches resource requests (use nonResourceURLs)",
                req.path
            ),
            Mismatch::NonResourceRuleOnResource => {
                "this rule matches non-resource URLs only; the request is a resource request".into()
            }
            Mismatch::Verb => format!(
                "verb \"{}\" is not one of {}",
                effective_verb(req),
                self.verb_names
                    .iter()
                    .map(|v| format!("\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Mismatch::Url => format!("path \"{}\" does not match {}", req.path, list(&self.urls)),
            Mismatch::ApiGroup => format!(
                "API group \"{}\" does not match {}",
                req.api_group,
                list(&self.api_groups)
            ),
            Mismatch::Resource => format!(
                "resource \"{}\" does not match {}",
                req.resource_path(),
                self.resources
                    .iter()
                    .flatten()
                    .map(|r| format!("\"{}\"", r.source))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Mismatch::Namespace => {
                if req.namespace.is_empty() {
                    format!(
                        "the request is not in a namespace; namespaces are {}",
                        list(&self.namespaces)
                    )
                } else {
                    format!(
                        "namespace \"{}\" does not match {}",
                        req.namespace,
                        list(&self.namespaces)
                    )
                }
            }
            Mismatch::Name => {
                if req.name.is_empty() {
                    format!(
                        "the request names no object; names are {}",
                        list(&self.names)
                    )
                } else {
                    format!("name \"{}\" does not match {}", req.name, list(&self.names))
                }
            }
            Mismatch::NoCommand => format!(
                "the request carries no exec command; commands are {}",
                list(&self.commands)
            ),
            Mismatch::Command => format!(
                "command \"{}\" does not match {}",
                input.exec_command.unwrap_or_default().join(" "),
                list(&self.commands)
            ),
            Mismatch::NoProcess => format!(
                "chaperone does not know the executable of the calling process; executables are {}",
                list(&self.executables)
            ),
            Mismatch::Executable => format!(
                "executable \"{}\" does not match {}",
                input
                    .caller
                    .process
                    .as_ref()
                    .map_or("", |p| p.executable.as_str()),
                list(&self.executables)
            ),
        }
    }
}

/// Why a request got its decision.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub decision: Decision,
    /// Every policy in force, sorted by name.
    pub policies: Vec<PolicyTrace>,
}

#[derive(Clone, Debug)]
pub struct PolicyTrace {
    pub name: String,
    pub generation: Option<i64>,
    pub dry_run: bool,
    /// Whether the policy's subjects select the caller.
    pub selected: bool,
    /// The rules tried in order, up to and including the first match.
    pub rules: Vec<RuleTrace>,
    /// The rule (or `default`) that decided within this policy; `None` when
    /// the policy does not select the caller or abstains (no rule matched
    /// and it has no `defaultAction`).
    pub outcome: Option<(String, Action)>,
}

#[derive(Clone, Debug)]
pub struct RuleTrace {
    pub name: String,
    pub matched: bool,
    pub reason: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        let mut line = String::new();
        if d.policy.is_empty() {
            let _ = write!(
                line,
                "decision: {} (no policy selects this caller)",
                d.action
            );
        } else {
            let _ = write!(
                line,
                "decision: {} by policy \"{}\" rule \"{}\"",
                d.action, d.policy, d.rule
            );
        }
        if d.dry_run {
            let _ = write!(line, " (dry run: enforced {})", d.enforce);
        }
        let _ = write!(line, ", record {}", d.record);
        if let Some(t) = d.hold_timeout {
            let _ = write!(line, ", hold {}s", t.as_secs());
        }
        writeln!(f, "{line}")?;
        if let Some(message) = &d.message {
            writeln!(f, "message: {message}")?;
        }
        for p in &self.policies {
            let dry = if p.dry_run { " (dry run)" } else { "" };
            if !p.selected {
                writeln!(f, "policy \"{}\"{dry}: does not select this caller", p.name)?;
                continue;
            }
            writeln!(f, "policy \"{}\"{dry}: selects this caller", p.name)?;
            for r in &p.rules {
                let mark = if r.matched { "MATCH" } else { "skip " };
                writeln!(f, "  {mark} rule \"{}\": {}", r.name, r.reason)?;
            }
            match &p.outcome {
                Some((rule, action)) if rule == "default" => {
                    writeln!(f, "  no rule matches: default action {action}")?;
                }
                None => writeln!(
                    f,
                    "  no rule matches and there is no defaultAction: this policy abstains"
                )?,
                Some(_) => {}
            }
        }
        Ok(())
    }
}
