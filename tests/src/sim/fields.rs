//! Managed fields: the `FieldsV1` sets the API server records per field
//! manager, computed from object shapes (good enough for kubectl's server-side
//! apply and for showing who touched what).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// Fields whose value is a string map (they get a `"."` entry, like the API
/// server's `map[string]string` fields do).
const MAP_FIELDS: &[&str] = &[
    "labels",
    "annotations",
    "data",
    "binaryData",
    "stringData",
    "matchLabels",
    "nodeSelector",
    "selector",
];

/// The key fields that identify list items for merging (strategic merge patch
/// and apply), by list field name.
pub fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "versions"
        | "additionalPrinterColumns" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "conditions" => Some("type"),
        "ports" => {
            let has = |k: &str| items.iter().any(|i| i.get(k).is_some());
            if has("containerPort") {
                Some("containerPort")
            } else if has("port") {
                Some("port")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// One path element of a field set, rendered as in `FieldsV1`
/// (`f:name`, `k:{"name":"app"}`, `.`).
pub type FieldPath = Vec<String>;

fn key_element(key: &str, item: &Value) -> Option<String> {
    let v = item.get(key)?;
    let mut m = Map::new();
    m.insert(key.to_string(), v.clone());
    Some(format!("k:{}", Value::Object(m)))
}

fn collect(value: &Value, field: &str, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            if MAP_FIELDS.contains(&field) {
                let mut p = prefix.clone();
                p.push(".".into());
                out.insert(p);
            }
            for (k, v) in map {
                prefix.push(format!("f:{k}"));
                out.insert(prefix.clone());
                collect(v, k, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            if let Some(key) = merge_key(field, items) {
                for item in items {
                    if let Some(el) = key_element(key, item) {
                        prefix.push(el);
                        out.insert(prefix.clone());
                        let mut dot = prefix.clone();
                        dot.push(".".into());
                        out.insert(dot);
                        if let Value::Object(m) = item {
                            for (k, v) in m {
                                prefix.push(format!("f:{k}"));
                                out.insert(prefix.clone());
                                collect(v, k, prefix, out);
                                prefix.pop();
                            }
                        }
                        prefix.pop();
                    }
                }
            }
        }
        _ => {}
    }
}

/// The field set an object (or an applied configuration) sets. Identity
/// fields (`kind`, `apiVersion`, name, namespace, uid, …) are not owned.
pub fn field_set(obj: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        if k == "kind" || k == "apiVersion" {
            continue;
        }
        if k == "metadata" {
            if let Some(meta) = v.as_object() {
                for (mk, mv) in meta {
                    if matches!(
                        mk.as_str(),
                        "labels" | "annotations" | "ownerReferences" | "finalizers"
                    ) {
                        let mut prefix = vec!["f:metadata".to_string(), format!("f:{mk}")];
                        out.insert(vec!["f:metadata".to_string()]);
                        out.insert(prefix.clone());
                        collect(mv, mk, &mut prefix, &mut out);
                    }
                }
            }
            continue;
        }
        let mut prefix = vec![format!("f:{k}")];
        out.insert(prefix.clone());
        collect(v, k, &mut prefix, &mut out);
    }
    out
}

/// Renders a field set as `FieldsV1` JSON.
pub fn to_fields_v1(set: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for el in path {
            node = node
                .entry(el.clone())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("field set nodes are objects");
        }
    }
    sort_dot_first(&mut root);
    Value::Object(root)
}

fn sort_dot_first(map: &mut Map<String, Value>) {
    map.sort_keys();
    if let Some(dot) = map.shift_remove(".") {
        map.shift_insert(0, ".".into(), dot);
    }
    for v in map.values_mut() {
        if let Value::Object(m) = v {
            sort_dot_first(m);
        }
    }
}

/// Parses `FieldsV1` JSON back into a set of leaf and inner paths.
pub fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        if let Value::Object(m) = v {
            for (k, child) in m {
                prefix.push(k.clone());
                out.insert(prefix.clone());
                walk(child, prefix, out);
                prefix.pop();
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The leaves of a field set (paths with no longer path below them), without `.` entries.
pub fn leaves(set: &BTreeSet<FieldPath>) -> Vec<FieldPath> {
    set.iter()
        .filter(|p| p.last().is_some_and(|l| l != "."))
        .filter(|p| {
            !set.iter().any(|q| {
                q.len() > p.len() && q.starts_with(p) && q.last().is_some_and(|l| l != ".")
            })
        })
        .cloned()
        .collect()
}

/// A path in the API server's conflict notation: `.data.k`,
/// `.spec.containers[name="app"].image`.
pub fn display_path(path: &FieldPath) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:")
            && let Ok(Value::Object(m)) = serde_json::from_str::<Value>(k)
        {
            let inner: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", inner.join(",")));
        }
    }
    s
}

/// The value at a field path in an object, if present.
pub fn value_at<'a>(obj: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    let mut cur = obj;
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            cur = cur.get(f)?;
        } else if let Some(k) = el.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur
                .as_array()?
                .iter()
                .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Removes the value at a field path; returns whether something was removed.
pub fn remove_at(obj: &mut Value, path: &FieldPath) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = obj;
    for el in parents {
        let next = if let Some(f) = el.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = el.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                return false;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        cur.as_object_mut()
            .and_then(|m| m.shift_remove(f))
            .is_some()
    } else if let Some(k) = last.strip_prefix("k:") {
        let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
            return false;
        };
        match cur.as_array_mut() {
            Some(a) => {
                let before = a.len();
                a.retain(|item| !key.iter().all(|(k, v)| item.get(k) == Some(v)));
                a.len() != before
            }
            None => false,
        }
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_fields_match_the_api_server() {
        let secret = json!({
            "kind": "Secret", "apiVersion": "v1",
            "metadata": {"name": "db", "namespace": "prod-a",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "data": {"password": "eA==", "url": "eQ=="},
            "type": "Opaque"
        });
        let v1 = to_fields_v1(&field_set(&secret));
        // The fixture secret-get's managedFields entry.
        let expected: Value = serde_json::from_str(r#"{"f:data":{".":{},"f:password":{},"f:url":{}},"f:metadata":{"f:annotations":{".":{},"f:kubectl.kubernetes.io/last-applied-configuration":{}},"f:labels":{".":{},"f:app":{}}},"f:type":{}}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&v1).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    #[test]
    fn containers_are_keyed_by_name() {
        let obj = json!({"spec": {"containers": [{"name": "app", "image": "nginx"}]}});
        let set = field_set(&obj);
        let leaf = leaves(&set);
        assert!(
            leaf.iter()
                .any(|p| display_path(p) == ".spec.containers[name=\"app\"].image")
        );
        assert_eq!(
            value_at(&obj, &leaf[0]).map(|v| v.is_string()),
            Some(true),
            "{leaf:?}"
        );
    }
}
