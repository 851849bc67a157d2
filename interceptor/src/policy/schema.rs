//! The CRD's OpenAPI schema, run by `policy check` and by the file loader:
//! one source of truth for what an `AgentPolicy` may look like. The schema
//! is the deployed CRD's (`deploy/base/crds/agentpolicies.chaperone.dev.yaml`,
//! embedded), so a document `policy check` accepts is one the API server
//! accepts, and the other way round. What a 1.20 schema cannot say
//! (duplicate rule names, `holdTimeout` on a rule that does not approve, a
//! `nonResourceURLs` rule with `resources`, ...) is checked by
//! [`super::compile`]; the node agent reports it on the policy's `Accepted`
//! condition.
//!
//! The keywords checked are those the CRD uses: `type`, `properties`,
//! `required`, `items`, `additionalProperties`, `enum`, `pattern`,
//! `minLength`, `minItems`, `minProperties`. One difference is on purpose:
//! the API server silently drops (prunes) a field its schema does not
//! declare; here it is an error, so a misspelt field is not lost unseen.

use std::fmt;
use std::sync::OnceLock;

use serde_json::Value;

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A field path: `spec.rules[2].holdTimeout`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    pub fn parse(text: &str) -> FieldPath {
        let mut segments = Vec::new();
        for part in text.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_owned()));
            }
            while let Some(inner) = rest.strip_prefix('[') {
                let Some(end) = inner.find(']') else { break };
                if let Ok(i) = inner[..end].parse() {
                    segments.push(Segment::Index(i));
                }
                rest = &inner[end + 1..];
            }
        }
        FieldPath(segments)
    }

    fn child(&self, segment: Segment) -> FieldPath {
        let mut path = self.clone();
        path.0.push(segment);
        path
    }

    /// The nearest key: the field an item belongs to for `a.b[3]`.
    fn field(&self) -> &str {
        self.0
            .iter()
            .rev()
            .find_map(|s| match s {
                Segment::Key(k) => Some(k.as_str()),
                Segment::Index(_) => None,
            })
            .unwrap_or("")
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A violation of the schema, where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaError {
    pub path: FieldPath,
    pub message: String,
}

/// The `openAPIV3Schema` of the deployed AgentPolicy CRD.
pub fn agent_policy_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd: Value = serde_yaml::from_str(super::cli::CRD_YAML)
            .expect("the embedded CRD is YAML (a unit test parses it)");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    })
}

/// Every violation of `schema` by `value`, in document order.
pub fn validate(schema: &Value, value: &Value) -> Vec<SchemaError> {
    let mut errors = Vec::new();
    walk(schema, value, &FieldPath::default(), &mut errors);
    errors
}

/// What a field holds, in words, for messages that say how to write it.
fn expected(field: &str) -> Option<&'static str> {
    Some(match field {
        "holdTimeout" => "a duration with its unit, e.g. \"60s\", \"5m\" or \"1h30m\"",
        "serviceAccounts" => "NAMESPACE/NAME, e.g. \"agents/coder\" or \"*/coder\"",
        "resources" => "RESOURCE or RESOURCE/SUBRESOURCE, e.g. pods, pods/exec, pods/*, *",
        "nonResourceURLs" => "a URL path, e.g. \"/version\" or \"/apis*\"",
        _ => return None,
    })
}

/// Why `text` does not match a field's pattern, and what to write instead.
fn pattern_message(field: &str, text: &str, pattern: &str) -> String {
    let bare = text.trim_matches('/');
    match field {
        "holdTimeout" => format!(
            "\"{text}\" is not a duration with its unit; write e.g. \"{}\", \"5m\" or \"1h30m\"",
            if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                format!("{text}s")
            } else {
                "60s".to_owned()
            }
        ),
        "serviceAccounts" => format!(
            "\"{text}\" is not NAMESPACE/NAME; write e.g. \"agents/{bare}\" or \"*/{bare}\""
        ),
        "resources" => format!(
            "\"{text}\" is not RESOURCE or RESOURCE/SUBRESOURCE (e.g. pods, pods/exec, pods/*, *)"
        ),
        "nonResourceURLs" => format!("\"{text}\" is not a URL path; write e.g. \"/{bare}\""),
        _ => format!("\"{text}\" does not match the pattern {pattern}"),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a map".into(),
    }
}

fn walk(schema: &Value, value: &Value, path: &FieldPath, errors: &mut Vec<SchemaError>) {
    fn error(errors: &mut Vec<SchemaError>, path: &FieldPath, message: String) {
        errors.push(SchemaError {
            path: path.clone(),
            message,
        })
    }
    let field = path.field().to_owned();
    if let Some(ty) = schema["type"].as_str() {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            _ => true,
        };
        if !ok {
            let want = match (ty, expected(&field)) {
                ("string", Some(words)) => words.to_owned(),
                ("object", _) => "a map".to_owned(),
                ("array", _) => "a list".to_owned(),
                (ty, _) => format!("a {ty}"),
            };
            error(
                errors,
                path,
                format!("invalid type: {}, expected {want}", describe(value)),
            );
            return;
        }
    }
    if let Some(choices) = schema["enum"].as_array()
        && !choices.contains(value)
    {
        let names: Vec<String> = choices
            .iter()
            .map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_owned))
            .collect();
        let what = match field.as_str() {
            "defaultAction" => "action",
            "record" | "defaultRecord" => "record level",
            "credentialMode" => "credential mode",
            "verbs" => "verb",
            other => other,
        };
        error(
            errors,
            path,
            format!(
                "unknown {what} {}, expected one of {}",
                value
                    .as_str()
                    .map_or_else(|| value.to_string(), |s| format!("\"{s}\"")),
                names.join(", ")
            ),
        );
    }
    if let Some(text) = value.as_str() {
        if let Some(min) = schema["minLength"].as_u64()
            && (text.chars().count() as u64) < min
        {
            error(errors, path, "must not be empty".to_owned());
        }
        if let Some(pattern) = schema["pattern"].as_str()
            && !regex::Regex::new(pattern).is_ok_and(|re| re.is_match(text))
        {
            error(errors, path, pattern_message(&field, text, pattern));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(min) = schema["minItems"].as_u64()
            && (items.len() as u64) < min
        {
            error(
                errors,
                path,
                match field.as_str() {
                    "subjects" => "no subjects: this policy would select nobody; add e.g. \
                               `- serviceAccounts: [\"agents/*\"]`"
                        .to_owned(),
                    _ => format!("needs at least {min} item(s)"),
                },
            );
        }
        if schema["items"].is_object() {
            for (i, item) in items.iter().enumerate() {
                walk(
                    &schema["items"],
                    item,
                    &path.child(Segment::Index(i)),
                    errors,
                );
            }
        }
    }
    if let Some(map) = value.as_object() {
        if let Some(min) = schema["minProperties"].as_u64()
            && (map.len() as u64) < min
        {
            error(
                errors,
                path,
                match field.as_str() {
                    "subjects" => "this subject selects nobody; set serviceAccounts, namespaces, \
                               users, groups or podLabels"
                        .to_owned(),
                    _ => format!("needs at least {min} field(s)"),
                },
            );
        }
        for name in schema["required"].as_array().into_iter().flatten() {
            if let Some(name) = name.as_str()
                && !map.contains_key(name)
            {
                error(errors, path, format!("missing field `{name}`"));
            }
        }
        let properties = schema["properties"].as_object();
        for (key, child) in map {
            let child_path = path.child(Segment::Key(key.clone()));
            match properties.and_then(|p| p.get(key)) {
                Some(child_schema) => walk(child_schema, child, &child_path, errors),
                None if schema["additionalProperties"].is_object() => {
                    walk(&schema["additionalProperties"], child, &child_path, errors)
                }
                None if properties.is_some() && !is_free_form(schema, path) => {
                    let known: Vec<String> = properties
                        .into_iter()
                        .flat_map(|p| p.keys())
                        .map(|k| format!("`{k}`"))
                        .collect();
                    errors.push(SchemaError {
                        path: child_path,
                        message: format!(
                            "unknown field `{key}`, expected one of {} (the API server would \
                             drop it silently)",
                            known.join(", ")
                        ),
                    });
                }
                None => {}
            }
        }
    }
}

/// `metadata` is the API server's to check, not the schema's.
fn is_free_form(schema: &Value, path: &FieldPath) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || path.0 == [Segment::Key("metadata".into())]
}

/// `metadata.name` as the API server checks it for a custom resource: a
/// DNS subdomain (lower-case letters, digits, `-` and `.`, starting and
/// ending with a letter or digit, at most 253 characters).
pub fn check_name(name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(InvalidName(name.to_owned()))
    }
}

/// A `metadata.name` the API server would refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "\"{0}\" is not a valid name: use lower-case letters, digits, '-' and '.', \
     starting and ending with a letter or digit (e.g. \"read-only-agents\")"
)]
pub struct InvalidName(pub String);
