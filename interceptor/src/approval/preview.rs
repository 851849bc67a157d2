//! What a person sees of a held create, update or patch before deciding:
//! a masked summary of the body the agent sent (`request.bodySummary`),
//! and the effect the API server computed with `dryRun=All`
//! (`preview`): the object a create would make, or the changes an update
//! or patch would apply, as JSON paths with their old and new values.
//!
//! Everything here is masked with the same rules as responses (a
//! Secret's values, ConfigMap and env values, pattern rules): an approver
//! sees what an agent reading the object through chaperone would see.

use serde_json::{Map, Value, json};

use crate::mask::{Masker, marker};
use crate::proxy::body::WholeBody;
use crate::request::RequestInfo;

/// Largest body read to summarize and preview a held request. A larger
/// one is held and forwarded all the same, without either.
pub const BODY_READ_LIMIT: usize = 1 << 20;
/// Largest `bodySummary` (bytes of text).
const SUMMARY_LIMIT: usize = 4 << 10;
/// Most changes listed in a preview.
const MAX_CHANGES: usize = 50;
/// A changed value longer than this (as JSON) is shortened.
const MAX_VALUE: usize = 256;

/// Fields every write changes, or that only repeat the object: not shown.
const NOISE: [&[&str]; 4] = [
    &["metadata", "resourceVersion"],
    &["metadata", "managedFields"],
    &["metadata", "generation"],
    &[
        "metadata",
        "annotations",
        "kubectl.kubernetes.io/last-applied-configuration",
    ],
];

/// `value` (an object of `request`'s resource) masked as the response to
/// `request` would be. An object that cannot be masked is replaced by a
/// note: never shown unmasked.
pub fn mask_object(masker: &Masker, request: &RequestInfo, value: Value) -> Value {
    let Some(mut mask) = masker
        .target(request)
        .and_then(|target| masker.json_response(target, false))
    else {
        return value;
    };
    let unmasked = || {
        json!({
            "kind": value["kind"],
            "note": "chaperone could not mask this object, so it is not shown",
        })
    };
    let Ok(bytes) = serde_json::to_vec(&value) else {
        return unmasked();
    };
    let mut out = Vec::with_capacity(bytes.len());
    if mask
        .push(&bytes, &mut out)
        .and_then(|()| mask.finish(&mut out))
        .is_err()
    {
        return unmasked();
    }
    serde_json::from_slice(&out).unwrap_or_else(|_| unmasked())
}

/// The masked summary of a held request's body, for `request.bodySummary`.
pub fn body_summary(
    masker: &Masker,
    request: &RequestInfo,
    content_type: Option<&str>,
    body: &WholeBody,
) -> Option<String> {
    let bytes = match body {
        WholeBody::Complete(bytes) if bytes.is_empty() => return None,
        WholeBody::Complete(bytes) => bytes,
        WholeBody::TooLarge { .. } => {
            return Some(format!(
                "body larger than {BODY_READ_LIMIT} bytes: not read for a summary"
            ));
        }
        WholeBody::Failed(why) => return Some(format!("body could not be read: {why}")),
    };
    let media = content_type
        .and_then(|c| c.split(';').next())
        .unwrap_or("application/json")
        .trim()
        .to_ascii_lowercase();
    let parsed: Option<Value> = if media == "application/json" || media.ends_with("+json") {
        serde_json::from_slice(bytes).ok()
    } else if media.ends_with("yaml") {
        serde_yaml::from_slice(bytes).ok()
    } else {
        None
    };
    let masked_kind = masker.target(request).is_some_and(|t| t.is_json());
    let text = match parsed {
        Some(Value::Object(object)) => {
            let mut value = mask_object(masker, request, Value::Object(object));
            drop_noise(&mut value);
            value.to_string()
        }
        // A JSON patch: a list of operations. Their values cannot be told
        // apart by the object's schema, so on a masked kind they are
        // masked whole.
        Some(Value::Array(mut operations)) if masked_kind => {
            for operation in &mut operations {
                if let Some(value) = operation.get_mut("value") {
                    *value = json!(marker::sized(value.to_string().len() as u64));
                }
            }
            Value::Array(operations).to_string()
        }
        Some(other) => mask_text(masker, &other.to_string()),
        None if media.contains("protobuf") => format!("protobuf body, {} bytes", bytes.len()),
        None if masked_kind => format!(
            "{media} body, {} bytes (not shown: it could not be read to mask it)",
            bytes.len()
        ),
        None => mask_text(masker, &String::from_utf8_lossy(bytes)),
    };
    Some(bounded(text, bytes.len()))
}

fn mask_text(masker: &Masker, text: &str) -> String {
    match masker.mask_text(text.as_bytes()) {
        Some(masked) => String::from_utf8_lossy(&masked).into_owned(),
        None => text.to_owned(),
    }
}

fn bounded(mut text: String, body_bytes: usize) -> String {
    if text.len() <= SUMMARY_LIMIT {
        return text;
    }
    let mut cut = SUMMARY_LIMIT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&format!("… (cut; the body is {body_bytes} bytes)"));
    text
}

fn drop_noise(value: &mut Value) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(notes) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            notes.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
}

/// The preview of an update or patch: what it changes in the current
/// object `before` to make the dry run's `after`, masked:
///
/// ```json
/// {"apiVersion": "apps/v1", "kind": "Deployment",
///  "metadata": {"name": "web", "namespace": "prod-a"},
///  "changes": [{"path": "spec.replicas", "old": 2, "new": 5}]}
/// ```
///
/// A path that is added has no `old`, one removed no `new`. A value that
/// differs only where it is masked shows as masked on both sides.
pub fn changes(masker: &Masker, request: &RequestInfo, before: &Value, after: &Value) -> Value {
    let masked_before = mask_object(masker, request, before.clone());
    let masked_after = mask_object(masker, request, after.clone());
    let mut found = Vec::new();
    let mut omitted = 0;
    walk(
        &mut Vec::new(),
        [before, after],
        [Some(&masked_before), Some(&masked_after)],
        &mut found,
        &mut omitted,
    );
    let mut preview = json!({
        "apiVersion": after["apiVersion"],
        "kind": after["kind"],
        "metadata": {
            "name": after["metadata"]["name"],
            "namespace": after["metadata"]["namespace"],
        },
        "changes": found,
    });
    if omitted > 0 {
        preview["changesOmitted"] = json!(omitted);
    }
    preview
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn walk<'a>(
    path: &mut Vec<Step>,
    [old, new]: [&'a Value; 2],
    [masked_old, masked_new]: [Option<&'a Value>; 2],
    found: &mut Vec<Value>,
    omitted: &mut usize,
) {
    if old == new || is_noise(path) {
        return;
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                path.push(Step::Key(key.clone()));
                let child = |v: Option<&'a Value>| v.and_then(|v| v.get(key.as_str()));
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(
                        path,
                        [x, y],
                        [child(masked_old), child(masked_new)],
                        found,
                        omitted,
                    ),
                    (x, y) => {
                        if !is_noise(path) {
                            record(
                                path,
                                x.map(|_| child(masked_old)),
                                y.map(|_| child(masked_new)),
                                found,
                                omitted,
                            );
                        }
                    }
                }
                path.pop();
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                path.push(Step::Index(i));
                let child = |v: Option<&'a Value>| v.and_then(|v| v.get(i));
                walk(
                    path,
                    [x, y],
                    [child(masked_old), child(masked_new)],
                    found,
                    omitted,
                );
                path.pop();
            }
        }
        _ => record(path, Some(masked_old), Some(masked_new), found, omitted),
    }
}

/// One change: `Some(masked)` for a side that has the path (`masked` is
/// `None` where the masked copy lacks it: shown as masked, never raw).
fn record(
    path: &[Step],
    old: Option<Option<&Value>>,
    new: Option<Option<&Value>>,
    found: &mut Vec<Value>,
    omitted: &mut usize,
) {
    if found.len() >= MAX_CHANGES {
        *omitted += 1;
        return;
    }
    let mut change = Map::new();
    change.insert("path".into(), json!(render(path)));
    for (side, value) in [("old", old), ("new", new)] {
        if let Some(value) = value {
            let shown = value.map_or_else(|| json!(marker::PREFIX.to_owned() + "value>"), shorten);
            change.insert(side.into(), shown);
        }
    }
    found.push(Value::Object(change));
}

fn shorten(value: &Value) -> Value {
    let text = value.to_string();
    if text.len() <= MAX_VALUE {
        return value.clone();
    }
    match value {
        Value::String(s) => {
            let mut cut = MAX_VALUE;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            json!(format!("{}… ({} bytes)", &s[..cut], s.len()))
        }
        _ => json!(format!("<{} bytes of JSON>", text.len())),
    }
}

fn is_noise(path: &[Step]) -> bool {
    NOISE.iter().any(|noise| {
        noise.len() == path.len()
            && noise
                .iter()
                .zip(path)
                .all(|(n, p)| matches!(p, Step::Key(k) if k == n))
    })
}

/// `spec.template.spec.containers[0].image`,
/// `metadata.labels["app.kubernetes.io/name"]`.
fn render(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Index(i) => out.push_str(&format!("[{i}]")),
            Step::Key(key)
                if !key.is_empty()
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Step::Key(key) => out.push_str(&format!("[{}]", json!(key))),
        }
    }
    out
}
