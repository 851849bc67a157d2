//! The live policy set: read lock-free on the data path, swapped whole when
//! files are (re)loaded or custom resources change. An invalid update of one
//! policy keeps that policy's last good version and says why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use super::schema::FieldPath;
use super::spec::{AgentPolicy, check_documents, locate, parse_documents};
use super::{Action, Decision, PolicyError, PolicyInput, PolicySet, RecordLevel};

/// Policies in force, hot-swappable.
pub struct PolicyStore {
    current: ArcSwap<PolicySet>,
    state: Mutex<State>,
}

struct State {
    /// The last good version of each policy, by name.
    good: BTreeMap<String, AgentPolicy>,
    unmatched: (Action, RecordLevel),
}

/// What became of one applied policy object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub name: String,
    /// The object's `metadata.generation`.
    pub generation: Option<i64>,
    /// `Err(why)` when the object is invalid; then the previous good version
    /// (if any) stays in force.
    pub result: Result<(), InvalidPolicy>,
    /// The generation in force after the apply, if the policy is in force.
    pub active_generation: Option<i64>,
}

/// Why an applied policy object is not in force: every problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidPolicy(pub Vec<PolicyError>);

/// Policy files that could not be loaded; nothing changed.
#[derive(Debug, thiserror::Error)]
#[error("{}", errors.join("\n"))]
pub struct LoadError {
    /// One line per problem, `FILE:LINE: what and where`.
    pub errors: Vec<String>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        PolicyStore::new()
    }
}

impl PolicyStore {
    /// No policies: every caller is denied until some are loaded.
    pub fn new() -> PolicyStore {
        PolicyStore {
            current: ArcSwap::from_pointee(PolicySet::new()),
            state: Mutex::new(State {
                good: BTreeMap::new(),
                unmatched: (Action::Deny, RecordLevel::Metadata),
            }),
        }
    }

    /// Sets the decision for callers no policy selects (`deny` by default).
    pub fn set_unmatched(&self, action: Action, record: RecordLevel) {
        let mut state = self.lock();
        state.unmatched = (action, record);
        self.rebuild(&state);
    }

    /// The set in force. Cheap: an atomic load and an `Arc` clone.
    pub fn snapshot(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Evaluates against the set in force, without allocating.
    pub fn evaluate(&self, input: &PolicyInput<'_>) -> Decision {
        self.current.load().evaluate(input)
    }

    /// Loads policy files (each may hold several YAML documents), replacing
    /// every policy in force. On any error nothing changes and every problem
    /// of every file is returned. Returns the number of policies loaded.
    pub fn load_files<P: AsRef<Path>>(&self, paths: &[P]) -> Result<usize, LoadError> {
        let mut policies = Vec::new();
        let mut errors = Vec::new();
        let mut sources = Vec::new();
        for path in paths {
            let path = path.as_ref();
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let (mut ok, mut bad) = check_text(&path.display().to_string(), &text);
                    policies.append(&mut ok);
                    errors.append(&mut bad);
                    sources.push((path.display().to_string(), text));
                }
                Err(e) => errors.push(format!(
                    "{}: cannot read the policy file: {e}; check the path and its permissions",
                    path.display()
                )),
            }
        }
        if let Err(compile_errors) = PolicySet::compile(&policies) {
            // Each policy compiled on its own in `check_text`; what is left
            // are clashes between documents (duplicate names).
            errors.extend(clash_lines(&sources, compile_errors));
        }
        if !errors.is_empty() {
            return Err(LoadError { errors });
        }
        let mut state = self.lock();
        state.good = policies
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect();
        let count = state.good.len();
        self.rebuild(&state);
        tracing::debug!(policies = count, "policy files loaded");
        Ok(count)
    }

    /// Adds or replaces one policy (a custom resource update). When it does
    /// not compile, the last good version stays in force.
    pub fn apply(&self, policy: &AgentPolicy) -> ApplyOutcome {
        let mut state = self.lock();
        let outcome = Self::apply_locked(&mut state, policy);
        self.rebuild(&state);
        outcome
    }

    /// Replaces the whole set with these objects (a watcher's initial list
    /// or relist): policies absent from `objects` are removed; invalid ones
    /// keep their last good version.
    pub fn replace_all(&self, objects: &[AgentPolicy]) -> Vec<ApplyOutcome> {
        let mut state = self.lock();
        state.good.retain(|name, _| {
            objects
                .iter()
                .any(|o| o.metadata.name.as_deref() == Some(name))
        });
        let outcomes = objects
            .iter()
            .map(|o| Self::apply_locked(&mut state, o))
            .collect();
        self.rebuild(&state);
        outcomes
    }

    /// Removes a policy (a custom resource deletion).
    pub fn remove(&self, name: &str) {
        let mut state = self.lock();
        if state.good.remove(name).is_some() {
            tracing::info!(policy = name, "policy removed");
            self.rebuild(&state);
        }
    }

    fn apply_locked(state: &mut State, policy: &AgentPolicy) -> ApplyOutcome {
        let name = policy.metadata.name.clone().unwrap_or_default();
        let generation = policy.metadata.generation;
        let result = match PolicySet::compile([policy]) {
            Ok(_) => {
                state.good.insert(name.clone(), policy.clone());
                tracing::info!(policy = %name, ?generation, "policy accepted");
                Ok(())
            }
            Err(errors) => {
                let why = InvalidPolicy(errors);
                let kept = state.good.get(&name).and_then(|p| p.metadata.generation);
                tracing::warn!(
                    policy = %name,
                    ?generation,
                    kept_generation = ?kept,
                    "policy rejected, keeping the last good version: {why}"
                );
                Err(why)
            }
        };
        ApplyOutcome {
            active_generation: state.good.get(&name).and_then(|p| p.metadata.generation),
            name,
            generation,
            result,
        }
    }

    fn rebuild(&self, state: &State) {
        let set = PolicySet::compile(state.good.values())
            .expect("every kept policy compiled on its own and names are unique")
            .with_unmatched(state.unmatched.0, state.unmatched.1);
        self.current.store(Arc::new(set));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves `good` consistent (it is only
        // changed by whole inserts and removals), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Parses, validates (the CRD's schema) and compiles the policies of one
/// file's text. Returns the valid policies and one line per problem:
/// `LABEL:LINE:COLUMN: message`, the line and column those of the field
/// at fault. A text without any document is a problem too.
pub(crate) fn check_text(label: &str, text: &str) -> (Vec<AgentPolicy>, Vec<String>) {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let at = |line: Option<usize>, column: Option<usize>| match (line, column) {
        (Some(line), Some(column)) => format!("{label}:{line}:{column}"),
        (Some(line), None) => format!("{label}:{line}"),
        _ => label.to_owned(),
    };
    let documents = check_documents(text);
    if documents.is_empty() {
        errors.push(format!(
            "{label}: no AgentPolicy in this file (it is empty or only comments); \
             write one, or remove the file"
        ));
    }
    for document in documents {
        match document {
            Err(problems) => errors.extend(
                problems
                    .into_iter()
                    .map(|e| format!("{}: {}", at(e.line, e.column), e.message)),
            ),
            Ok(doc) => match PolicySet::compile([&doc.policy]) {
                Ok(_) => ok.push(doc.policy),
                Err(compile_errors) => {
                    for e in compile_errors {
                        let (line, column) =
                            locate(text, doc.index - 1, &FieldPath::parse(&e.path))
                                .unwrap_or((doc.line, 0));
                        errors.push(format!(
                            "{}: policy \"{}\": {e}",
                            at(Some(line), (column > 0).then_some(column)),
                            e.policy
                        ));
                    }
                }
            },
        }
    }
    (ok, errors)
}

/// Clashes between documents (a name used twice), each at the
/// `metadata.name` of its second use: `LABEL:LINE:COLUMN: policy "p":
/// metadata.name: ... (first at LABEL:LINE)`. `sources` are the (label,
/// text) of every file read.
pub(crate) fn clash_lines(sources: &[(String, String)], errors: Vec<PolicyError>) -> Vec<String> {
    let name_path = FieldPath::parse("metadata.name");
    errors
        .into_iter()
        .map(|e| {
            let uses: Vec<String> = sources
                .iter()
                .flat_map(|(label, text)| {
                    parse_documents(text)
                        .into_iter()
                        .flatten()
                        .filter(|doc| doc.policy.metadata.name.as_deref() == Some(&e.policy))
                        .map(|doc| match locate(text, doc.index - 1, &name_path) {
                            Some((line, column)) => format!("{label}:{line}:{column}"),
                            None => format!("{label}:{}", doc.line),
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            match &uses[..] {
                [first, second, ..] => {
                    format!("{second}: policy \"{}\": {e} (first at {first})", e.policy)
                }
                _ => format!("policy \"{}\": {e}", e.policy),
            }
        })
        .collect()
}

/// The files of a directory that look like policies (`*.yaml`, `*.yml`),
/// sorted; a file path is returned as is.
pub fn policy_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}
