//! Reading a write's body for the intercept key: where a body holds it
//! ([`Holder`]), the forms a body comes in (a whole object in JSON, YAML or
//! protobuf; a JSON patch; a merge or strategic merge patch), and whether
//! the body would set, change or remove the key ([`touches`]).
//!
//! Bodies are read as the API server reads them: field names as Go's
//! decoder matches them (case and Unicode folded), and an object that names
//! one key twice refused, since Go merges both where a last-wins reader
//! would see one. What is refused, and the refusal's message, are the
//! protect stage's ([`super`]); this module only says what a body does.

use serde_json::Value;

use super::proto;
use crate::pods::INTERCEPT_LABEL as INTERCEPT_KEY;

/// Where a write's body holds the label and annotation that decide what
/// chaperone guards.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Holder {
    /// The object's own metadata: `pod` or `namespace`.
    Object(&'static str),
    /// A workload's pod template at `path` (`spec.template`): its
    /// controller makes pods with the template's labels.
    Template {
        kind: &'static str,
        path: &'static [&'static str],
        /// The same path as protobuf field numbers, to the template's
        /// `ObjectMeta`.
        fields: &'static [u32],
    },
    /// A custom resource: chaperone knows neither whether nor where it
    /// holds a pod template, so the key anywhere in the body counts.
    Custom,
}

impl Holder {
    fn path(self) -> &'static [&'static str] {
        match self {
            Holder::Template { path, .. } => path,
            Holder::Object(_) | Holder::Custom => &[],
        }
    }

    /// The kind a protobuf body must say it is and the protobuf field
    /// numbers from the object to the `ObjectMeta` that holds the key;
    /// `None` where the API server takes no protobuf (custom resources).
    fn protobuf(self) -> Option<(&'static str, &'static [u32])> {
        match self {
            Holder::Object("pod") => Some(("Pod", &[1])),
            Holder::Object(_) => Some(("Namespace", &[1])),
            Holder::Template { kind, fields, .. } => Some((kind, fields)),
            Holder::Custom => None,
        }
    }
}

/// Why a write's body may touch the intercept key: where it sets, changes
/// or removes it, or why chaperone cannot tell. The `Display` is the part
/// of the refusal that says why.
#[derive(Debug, thiserror::Error)]
pub enum Touch {
    #[error(
        "chaperone cannot read a {verb} body of type \"{media}\" to check it; send JSON or YAML"
    )]
    UnreadableType { verb: String, media: String },
    #[error("the body is unreadable: {0}")]
    Unreadable(#[from] Unreadable),
    #[error("chaperone cannot read this protobuf body ({0}); send JSON or YAML")]
    Protobuf(#[from] proto::Malformed),
    #[error("the body is not an object")]
    NotAnObject,
    /// `at`: where in the body; `value`: as the body says it.
    #[error("the body sets {at} to {value}")]
    Sets { at: String, value: String },
    #[error(
        "the object carries the label \"{current}\" and the body leaves it out (which removes it)"
    )]
    LeavesLabelOut { current: String },
    #[error("the patch replaces the whole object")]
    ReplacesObject,
    #[error("the patch replaces {0}")]
    Replaces(String),
    #[error("the patch has the directive {0}")]
    Directive(String),
    #[error("the patch has the directive {directive} in {at}")]
    DirectiveIn { directive: String, at: String },
    #[error("the patch sets {at} to {value}")]
    PatchSets { at: String, value: Value },
    #[error("a JSON patch is a list of operations")]
    NotAJsonPatch,
    #[error("operation {0} has no path")]
    NoPath(Value),
    #[error("operation {0} has a path that is not a string")]
    PathNotAString(Value),
    #[error("the operation {op} {pointer} reaches it")]
    Reaches { op: String, pointer: String },
}

/// Why a JSON or YAML body could not be read as the API server would.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
}

enum Form {
    JsonPatch,
    /// RFC 7386 merge patch, and strategic merge patch (its directives are
    /// refused wherever they could reach the label).
    MergePatch,
    /// A whole object: create, update, server-side apply.
    Object,
}

/// Whether the body of a create, update or patch (`verb`) of
/// `content_type` would set, change or remove the intercept label or
/// annotation where `holder` holds it. `current_label` is the object's
/// label value as chaperone knows it, `None` when unknown or absent.
pub fn touches(
    verb: &str,
    content_type: Option<&str>,
    bytes: &[u8],
    holder: Holder,
    current_label: Option<&str>,
) -> Result<(), Touch> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        // Nothing to apply; the API server refuses it.
        return Ok(());
    }
    let media = content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let form = match (verb, media.as_str(), holder.protobuf()) {
        ("patch", "application/json-patch+json", _) => Form::JsonPatch,
        ("patch", "application/merge-patch+json", _) => Form::MergePatch,
        ("patch", "application/strategic-merge-patch+json", _) => Form::MergePatch,
        ("patch", "application/apply-patch+yaml" | "application/apply-patch+json", _) => {
            Form::Object
        }
        ("create" | "update", "application/json" | "application/yaml" | "", _) => Form::Object,
        ("create" | "update", proto::MEDIA_TYPE, Some((kind, fields))) => {
            // kubectl's typed clients (`kubectl create deployment`,
            // `kubectl create job`) send protobuf.
            return protobuf_object_touches(bytes, kind, fields, holder.path(), current_label);
        }
        _ => {
            return Err(Touch::UnreadableType {
                verb: verb.to_owned(),
                media,
            });
        }
    };
    let value = parse(bytes)?;
    match (holder, form) {
        (Holder::Custom, Form::JsonPatch) => json_patch_names_key(&value),
        (Holder::Custom, Form::MergePatch | Form::Object) => key_anywhere(&value, ""),
        (_, Form::JsonPatch) => json_patch_touches(&value, holder.path()),
        (_, Form::MergePatch) => merge_patch_touches(&value, holder.path()),
        (_, Form::Object) => object_touches(&value, holder.path(), current_label),
    }
}

/// The protobuf form of [`object_touches`]: the metadata at `fields` (at
/// `path` in JSON) of a body of `kind`.
fn protobuf_object_touches(
    body: &[u8],
    kind: &str,
    fields: &[u32],
    path: &[&str],
    current_label: Option<&str>,
) -> Result<(), Touch> {
    let keys = proto::intercept_keys(body, kind, fields)?;
    let at = path
        .iter()
        .chain(["metadata"].iter())
        .copied()
        .collect::<Vec<_>>()
        .join(".");
    let mut label = None;
    for (map, value) in keys {
        if value != "true" {
            return Err(Touch::Sets {
                at: format!("{at}.{}[{INTERCEPT_KEY}]", map.name()),
                value: format!("\"{value}\""),
            });
        }
        if map == proto::Map::Labels {
            label = Some(value);
        }
    }
    if let Some(current) = current_label
        && label.is_none()
    {
        return Err(Touch::LeavesLabelOut {
            current: current.to_owned(),
        });
    }
    Ok(())
}

/// JSON, or YAML (with merge keys applied, as the API server's YAML reader
/// does). An object that names one key twice (also as Go folds case) is
/// refused: chaperone's reader keeps the last, Go's decoder merges both
/// into one field, so the two would read different objects.
fn parse(bytes: &[u8]) -> Result<Value, Unreadable> {
    match serde_json::from_slice::<OneReading>(bytes) {
        Ok(OneReading) => {
            return Ok(serde_json::from_slice::<Value>(bytes)?);
        }
        Err(e) if e.is_data() => return Err(e.into()),
        Err(_) => {}
    }
    let mut yaml: serde_yaml::Value = serde_yaml::from_slice(bytes)?;
    yaml.apply_merge()?;
    let value = serde_json::to_value(yaml)?;
    serde_json::from_value::<OneReading>(value.clone())?;
    Ok(value)
}

/// A JSON document whose objects name no key twice, as Go folds field
/// names (`fold`): what deserializing it proves.
struct OneReading;

impl<'de> serde::Deserialize<'de> for OneReading {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OneReadingVisitor)
    }
}

struct OneReadingVisitor;

impl<'de> serde::de::Visitor<'de> for OneReadingVisitor {
    type Value = OneReading;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_i64<E>(self, _: i64) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_u64<E>(self, _: u64) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_f64<E>(self, _: f64) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_str<E>(self, _: &str) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_unit<E>(self) -> Result<OneReading, E> {
        Ok(OneReading)
    }
    fn visit_none<E>(self) -> Result<OneReading, E> {
        Ok(OneReading)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneReading, A::Error> {
        while seq.next_element::<OneReading>()?.is_some() {}
        Ok(OneReading)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OneReading, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(fold(&key)) {
                return Err(serde::de::Error::custom(format!(
                    "the key \"{key}\" appears twice in one object (keys differing only in \
                     case count as one, as the API server reads them)"
                )));
            }
            map.next_value::<OneReading>()?;
        }
        Ok(OneReading)
    }
}

/// Go's `encoding/json` matches field names case-insensitively, with
/// Unicode simple folding (`ſ` is `s`, the Kelvin sign `k`): the API
/// server (before 1.23) reads `"Labels"` or `"labelſ"` as `labels`.
fn field_is(key: &str, field: &str) -> bool {
    fold(key) == field.to_ascii_lowercase()
}

/// A field name as Go's decoder matches it.
fn fold(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '\u{17F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Every value of `object` whose key reads as `field`.
fn fields<'v>(
    object: &'v serde_json::Map<String, Value>,
    field: &'static str,
) -> impl Iterator<Item = &'v Value> {
    object
        .iter()
        .filter(move |(k, _)| field_is(k, field))
        .map(|(_, v)| v)
}

const MAPS: [&str; 2] = ["labels", "annotations"];

/// The strategic merge patch directives that only order lists; every other
/// (`$patch`, `$retainKeys`, ...) can replace or drop the map below it.
fn is_harmless_directive(key: &str) -> bool {
    key.starts_with("$setElementOrder/")
}

fn directive(object: &serde_json::Map<String, Value>) -> Option<&String> {
    object
        .keys()
        .find(|k| k.starts_with('$') && !is_harmless_directive(k))
}

/// A merge or strategic merge patch: only setting the key to `"true"` is
/// allowed; removing it (`null`), replacing the whole object, the template,
/// its metadata or map, and directives (`$patch`, `$retainKeys`, ...) on the
/// way to it are refused. `path` leads from the root to the metadata that
/// holds the key (empty for a pod or namespace).
fn merge_patch_touches(patch: &Value, path: &[&'static str]) -> Result<(), Touch> {
    let Some(root) = patch.as_object() else {
        return Err(Touch::ReplacesObject);
    };
    if let Some(directive) = directive(root) {
        return Err(Touch::Directive(directive.clone()));
    }
    let mut level = vec![root];
    let mut walked: Vec<&str> = Vec::new();
    for step in path.iter().chain(["metadata"].iter()) {
        walked.push(step);
        let at = walked.join(".");
        let mut next = Vec::new();
        for object in &level {
            for value in fields(object, step) {
                let Some(value) = value.as_object() else {
                    return Err(Touch::Replaces(at));
                };
                if let Some(directive) = directive(value) {
                    return Err(Touch::DirectiveIn {
                        directive: directive.clone(),
                        at,
                    });
                }
                next.push(value);
            }
        }
        level = next;
    }
    let at = walked.join(".");
    for metadata in level {
        for map in MAPS {
            for value in fields(metadata, map) {
                let Some(entries) = value.as_object() else {
                    return Err(Touch::Replaces(format!("{at}.{map}")));
                };
                if let Some(directive) = directive(entries) {
                    return Err(Touch::DirectiveIn {
                        directive: directive.clone(),
                        at: format!("{at}.{map}"),
                    });
                }
                if let Some(set) = entries.get(INTERCEPT_KEY)
                    && set != "true"
                {
                    return Err(Touch::PatchSets {
                        at: format!("{at}.{map}[{INTERCEPT_KEY}]"),
                        value: set.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// A JSON patch (RFC 6902): no operation may write at or above
/// `<path>/metadata/labels/chaperone.dev~1intercept` (or the annotation),
/// nor move it away.
fn json_patch_touches(patch: &Value, path: &[&'static str]) -> Result<(), Touch> {
    let Some(ops) = patch.as_array() else {
        return Err(Touch::NotAJsonPatch);
    };
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        if kind == "test" {
            continue;
        }
        let mut pointers = vec![op.get("path")];
        if kind == "move" {
            pointers.push(op.get("from"));
        }
        for pointer in pointers {
            let Some(pointer) = pointer.and_then(Value::as_str) else {
                return Err(Touch::NoPath(op.clone()));
            };
            if reaches_key(pointer, path) {
                // Adding "true" exactly at the key itself is the one harmless write.
                let sets_true = matches!(kind, "add" | "replace")
                    && op.get("value").is_some_and(|v| v == "true")
                    && tokens(pointer).len() == path.len() + 3;
                if !sets_true {
                    return Err(Touch::Reaches {
                        op: kind.to_owned(),
                        pointer: pointer.to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The JSON pointer's reference tokens, unescaped.
fn tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Whether a pointer is the intercept key under `path`, one of its
/// ancestors, or below it.
fn reaches_key(pointer: &str, path: &[&'static str]) -> bool {
    let tokens = tokens(pointer);
    tokens.iter().enumerate().all(|(i, token)| {
        let depth = path.len();
        match i.cmp(&depth) {
            std::cmp::Ordering::Less => field_is(token, path[i]),
            std::cmp::Ordering::Equal => field_is(token, "metadata"),
            std::cmp::Ordering::Greater if i == depth + 1 => {
                MAPS.iter().any(|m| field_is(token, m))
            }
            std::cmp::Ordering::Greater if i == depth + 2 => token == INTERCEPT_KEY,
            std::cmp::Ordering::Greater => true,
        }
    })
}

/// A whole object (create, update, apply): the key under `path`, where
/// present, must say `"true"`; a label chaperone knows the object carries
/// must be kept.
fn object_touches(
    object: &Value,
    path: &[&'static str],
    current_label: Option<&str>,
) -> Result<(), Touch> {
    let Some(root) = object.as_object() else {
        return Err(Touch::NotAnObject);
    };
    let mut level = vec![root];
    for step in path.iter().chain(["metadata"].iter()) {
        level = level
            .into_iter()
            .flat_map(|object| fields(object, step))
            .filter_map(Value::as_object)
            .collect();
    }
    let at = path
        .iter()
        .chain(["metadata"].iter())
        .copied()
        .collect::<Vec<_>>()
        .join(".");
    let mut label = None;
    for metadata in level {
        for map in MAPS {
            for entries in fields(metadata, map) {
                let Some(set) = entries.as_object().and_then(|e| e.get(INTERCEPT_KEY)) else {
                    continue;
                };
                if set != "true" {
                    return Err(Touch::Sets {
                        at: format!("{at}.{map}[{INTERCEPT_KEY}]"),
                        value: set.to_string(),
                    });
                }
                if map == "labels" {
                    label = Some(set);
                }
            }
        }
    }
    if let Some(current) = current_label
        && label.is_none()
    {
        return Err(Touch::LeavesLabelOut {
            current: current.to_owned(),
        });
    }
    Ok(())
}

/// A custom resource's body (object or merge patch): the key anywhere,
/// with any value but `"true"` (`null` removes it), is refused.
fn key_anywhere(value: &Value, at: &str) -> Result<(), Touch> {
    match value {
        Value::Object(object) => {
            for (key, value) in object {
                let here = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                if key == INTERCEPT_KEY && value != "true" {
                    return Err(Touch::Sets {
                        at: here,
                        value: value.to_string(),
                    });
                }
                key_anywhere(value, &here)?;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| key_anywhere(item, &format!("{at}[{i}]"))),
        _ => Ok(()),
    }
}

/// A custom resource's JSON patch: no operation may name the key in its
/// path or source but to add `"true"`, nor carry it in its value.
fn json_patch_names_key(patch: &Value) -> Result<(), Touch> {
    let Some(ops) = patch.as_array() else {
        return Err(Touch::NotAJsonPatch);
    };
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        if kind == "test" {
            continue;
        }
        for pointer in [op.get("path"), op.get("from")].into_iter().flatten() {
            let Some(pointer) = pointer.as_str() else {
                return Err(Touch::PathNotAString(op.clone()));
            };
            let tokens = tokens(pointer);
            if let Some(i) = tokens.iter().position(|t| t == INTERCEPT_KEY) {
                let sets_true = matches!(kind, "add" | "replace")
                    && i + 1 == tokens.len()
                    && op.get("from").is_none()
                    && op.get("value").is_some_and(|v| v == "true");
                if !sets_true {
                    return Err(Touch::Reaches {
                        op: kind.to_owned(),
                        pointer: pointer.to_owned(),
                    });
                }
            }
        }
        if let Some(value) = op.get("value") {
            key_anywhere(value, "value")?;
        }
    }
    Ok(())
}
