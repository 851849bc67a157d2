//! Policies compiled into the matchers of [`super::evaluate`].
//! Compilation validates everything a schema cannot (patterns, selectors,
//! durations, rule shapes) and reports it with the field path.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::Action;
use super::evaluate::{
    CompiledPolicy, CompiledRule, CompiledSubject, DEFAULT_HOLD_TIMEOUT, Effect,
    NON_RESOURCE_VERBS, PolicySet, RESOURCE_VERBS, ResourcePattern, Selector, verb_bit,
};
use super::glob::Glob;
use super::spec::{AgentPolicy, LabelSelector, SelectorOperator, Subject};

/// A policy that failed to compile: which policy, where, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    pub policy: String,
    /// Field path, e.g. `spec.rules[2].holdTimeout`.
    pub path: String,
    pub message: String,
}

// === compile ===

struct Compiler<'a> {
    policy: &'a str,
    errors: Vec<PolicyError>,
}

impl Compiler<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError {
            policy: self.policy.to_owned(),
            path: path.into(),
            message: message.into(),
        });
    }

    fn globs(list: &[String]) -> Option<Vec<Glob>> {
        (!list.is_empty()).then(|| list.iter().map(|p| Glob::new(p)).collect())
    }

    fn selector(&mut self, path: &str, selector: &LabelSelector) -> Selector {
        let mut expressions = Vec::new();
        for (i, req) in selector.match_expressions.iter().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            match req.operator {
                SelectorOperator::In | SelectorOperator::NotIn if req.values.is_empty() => self
                    .error(
                        format!("{at}.values"),
                        format!(
                            "operator {} needs at least one value; list the values of \"{}\" to match",
                            req.operator, req.key
                        ),
                    ),
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !req.values.is_empty() =>
                {
                    self.error(
                        format!("{at}.values"),
                        format!(
                            "operator {} takes no values; remove them or use In/NotIn",
                            req.operator
                        ),
                    )
                }
                _ => {}
            }
            if req.key.is_empty() {
                self.error(format!("{at}.key"), "the label key is empty");
            }
            expressions.push((
                req.key.as_str().into(),
                req.operator,
                req.values.iter().map(|v| v.as_str().into()).collect(),
            ));
        }
        Selector {
            match_labels: selector
                .match_labels
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            expressions,
        }
    }

    fn subject(&mut self, i: usize, subject: &Subject) -> CompiledSubject {
        let path = format!("spec.subjects[{i}]");
        if subject == &Subject::default() {
            self.error(
                &path,
                "this subject selects nobody; set serviceAccounts, namespaces, users, groups or podLabels",
            );
        }
        let mut service_accounts = Vec::new();
        for (j, pattern) in subject.service_accounts.iter().enumerate() {
            match pattern.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    service_accounts.push((Glob::new(ns), Glob::new(name)));
                }
                _ => self.error(
                    format!("{path}.serviceAccounts[{j}]"),
                    format!(
                        "\"{pattern}\" is not NAMESPACE/NAME; write e.g. \"agents/{}\" or \"*/{}\"",
                        pattern.trim_matches('/'),
                        pattern.trim_matches('/')
                    ),
                ),
            }
        }
        let mut compiled = CompiledSubject {
            service_accounts,
            users: Self::globs(&subject.users).unwrap_or_default(),
            groups: Self::globs(&subject.groups).unwrap_or_default(),
            ..CompiledSubject::default()
        };
        if let Some(ns) = &subject.namespaces {
            if ns.names.is_empty() && ns.selector.is_none() {
                self.error(
                    format!("{path}.namespaces"),
                    "set names, selector or both (an empty namespaces entry selects nobody)",
                );
            }
            compiled.namespace_names = Self::globs(&ns.names).unwrap_or_default();
            compiled.namespace_selector = ns
                .selector
                .as_ref()
                .map(|s| self.selector(&format!("{path}.namespaces.selector"), s));
        }
        compiled.pod_labels = subject
            .pod_labels
            .as_ref()
            .map(|s| self.selector(&format!("{path}.podLabels"), s));
        compiled
    }

    fn rule(
        &mut self,
        i: usize,
        rule: &super::spec::Rule,
        names: &mut BTreeSet<String>,
    ) -> CompiledRule {
        let path = format!("spec.rules[{i}]");
        let name = rule.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
        if rule.name.as_deref() == Some("default") {
            self.error(
                format!("{path}.name"),
                "\"default\" names the policy's default; choose another rule name",
            );
        }
        if !names.insert(name.clone()) {
            self.error(
                format!("{path}.name"),
                format!(
                    "rule name \"{name}\" is used twice; rule names must be unique in a policy"
                ),
            );
        }
        let non_resource = !rule.non_resource_urls.is_empty();
        let allowed_verbs: &[&str] = if non_resource {
            &NON_RESOURCE_VERBS
        } else {
            &RESOURCE_VERBS
        };
        for (j, verb) in rule.verbs.iter().enumerate() {
            if verb != "*" && !allowed_verbs.contains(&verb.as_str()) {
                self.error(
                    format!("{path}.verbs[{j}]"),
                    format!(
                        "unknown verb \"{verb}\", expected one of {}{}",
                        allowed_verbs.join(", "),
                        if non_resource {
                            " (the lowercased HTTP method of a non-resource request)"
                        } else {
                            ", or *"
                        }
                    ),
                );
            }
        }
        if non_resource {
            for (field, set) in [
                ("apiGroups", !rule.api_groups.is_empty()),
                ("resources", !rule.resources.is_empty()),
                ("namespaces", !rule.namespaces.is_empty()),
                ("names", !rule.names.is_empty()),
                ("commands", !rule.commands.is_empty()),
            ] {
                if set {
                    self.error(
                        format!("{path}.{field}"),
                        format!(
                            "a rule with nonResourceURLs matches only non-resource requests and cannot have {field}; split it into two rules"
                        ),
                    );
                }
            }
            for (j, url) in rule.non_resource_urls.iter().enumerate() {
                if !url.starts_with('/') && url != "*" {
                    self.error(
                        format!("{path}.nonResourceURLs[{j}]"),
                        format!("\"{url}\" is not a URL path; write e.g. \"/{url}\""),
                    );
                }
            }
        }
        let mut resources = Vec::new();
        for (j, pattern) in rule.resources.iter().enumerate() {
            let (resource, subresource) = match pattern.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (pattern.as_str(), None),
            };
            if resource.is_empty() || subresource.is_some_and(|s| s.is_empty() || s.contains('/')) {
                self.error(
                    format!("{path}.resources[{j}]"),
                    format!(
                        "\"{pattern}\" is not RESOURCE or RESOURCE/SUBRESOURCE (e.g. pods, pods/exec, pods/*, *)"
                    ),
                );
                continue;
            }
            resources.push(ResourcePattern {
                source: pattern.as_str().into(),
                everything: pattern == "*",
                resource: Glob::new(resource),
                subresource: subresource.map(Glob::new),
            });
        }
        let hold_timeout = match (&rule.hold_timeout, rule.action) {
            (None, Action::Approve) => Some(DEFAULT_HOLD_TIMEOUT),
            (None, _) => None,
            (Some(text), Action::Approve) if text.trim().bytes().all(|b| b.is_ascii_digit()) => {
                self.error(
                    format!("{path}.holdTimeout"),
                    format!(
                        "\"{text}\" has no unit; write e.g. \"{}s\", \"5m\" or \"1h30m\"",
                        text.trim()
                    ),
                );
                None
            }
            (Some(text), Action::Approve) => match parse_duration(text) {
                Ok(d) => Some(d),
                Err(why) => {
                    self.error(format!("{path}.holdTimeout"), why.to_string());
                    None
                }
            },
            (Some(_), action) => {
                self.error(
                    format!("{path}.holdTimeout"),
                    format!("holdTimeout applies to action approve only, this rule's action is {action}; remove it"),
                );
                None
            }
        };
        CompiledRule {
            verbs: (!rule.verbs.is_empty() && !rule.verbs.iter().any(|v| v == "*")).then(|| {
                rule.verbs
                    .iter()
                    .fold(0, |mask, verb| mask | verb_bit(allowed_verbs, verb))
            }),
            verb_names: rule.verbs.iter().map(|v| v.as_str().into()).collect(),
            api_groups: Self::globs(&rule.api_groups),
            resources: (!resources.is_empty()).then_some(resources),
            namespaces: Self::globs(&rule.namespaces),
            names: Self::globs(&rule.names),
            urls: Self::globs(&rule.non_resource_urls),
            commands: Self::globs(&rule.commands),
            executables: Self::globs(&rule.executables),
            outcome: Effect {
                action: rule.action,
                record: rule.record.unwrap_or_default(),
                rule: name.into(),
                message: rule.message.as_deref().map(Arc::from),
                hold_timeout,
            },
        }
    }
}

/// A duration chaperone cannot read, with the forms it can.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("\"{0}\" is not a duration; write e.g. \"30s\", \"5m\" or \"1h30m\"")]
    Invalid(String),
    /// A bare number where a unit is required (see
    /// `config::parse_duration_with_unit`).
    #[error("\"{0}\" has no unit: write \"{0}s\", \"{0}m\" or \"{0}h\"")]
    NoUnit(String),
}

/// `30s`, `5m`, `1h30m`, `90` (seconds): Go-style durations, whole units.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError::Invalid(text.to_owned());
    let text = text.trim();
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

impl CompiledPolicy {
    fn compile(policy: &AgentPolicy) -> Result<CompiledPolicy, Vec<PolicyError>> {
        let name = policy.metadata.name.clone().unwrap_or_default();
        let mut c = Compiler {
            policy: &name,
            errors: Vec::new(),
        };
        if name.is_empty() {
            c.error("metadata.name", "a policy needs a name");
        }
        let spec = &policy.spec;
        if spec.subjects.is_empty() {
            c.error(
                "spec.subjects",
                "no subjects: this policy would select nobody; add e.g. `- serviceAccounts: [\"agents/*\"]`",
            );
        }
        let subjects = spec
            .subjects
            .iter()
            .enumerate()
            .map(|(i, s)| c.subject(i, s))
            .collect();
        let mut names = BTreeSet::new();
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| c.rule(i, r, &mut names))
            .collect();
        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        Ok(CompiledPolicy {
            name: name.as_str().into(),
            generation: policy.metadata.generation,
            dry_run: spec.dry_run,
            credential_mode: spec.credential_mode,
            subjects,
            rules,
            default: spec.default_action.map(|action| Effect {
                action,
                record: spec.default_record.unwrap_or_default(),
                rule: "default".into(),
                message: spec.default_message.as_deref().map(Arc::from),
                hold_timeout: (action == Action::Approve).then_some(DEFAULT_HOLD_TIMEOUT),
            }),
        })
    }
}

impl PolicySet {
    /// Compiles policies; every error of every policy is reported. Names
    /// must be unique.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a AgentPolicy>,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let mut compiled = Vec::new();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for policy in policies {
            let name = policy.metadata.name.clone().unwrap_or_default();
            if !name.is_empty() && !seen.insert(name.clone()) {
                errors.push(PolicyError {
                    policy: name.clone(),
                    path: "metadata.name".into(),
                    message: format!(
                        "a second policy is named \"{name}\"; policy names must be unique"
                    ),
                });
                continue;
            }
            match CompiledPolicy::compile(policy) {
                Ok(p) => compiled.push(p),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(PolicySet::from_compiled(compiled))
    }
}
