//! The patch types kubectl sends: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386), strategic merge patch (with the directives kubectl's
//! three-way patches use) and the merge step of server-side apply.

use serde_json::{Map, Value};

use super::fields::merge_key;

/// A PATCH request's media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    json_patch::patch(doc, &ops).map_err(|e| e.to_string())
}

/// Applies an RFC 7386 merge patch.
pub fn merge_patch(doc: &mut Value, patch: &Value) {
    json_patch::merge(doc, patch);
}

/// Applies a strategic merge patch: maps merge, `null` deletes, lists of
/// known keyed items (containers, env, ports, volumes, …) merge by key, other
/// lists are replaced, and the directives `$patch` (replace/delete/merge),
/// `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>` and
/// `$retainKeys` are honoured.
pub fn strategic_merge(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *doc = patch.clone();
        return Ok(());
    };
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    merge_map(doc.as_object_mut().expect("object"), p)
}

fn merge_map(doc: &mut Map<String, Value>, patch: &Map<String, Value>) -> Result<(), String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut clean = patch.clone();
            clean.shift_remove("$patch");
            *doc = clean;
            return Ok(());
        }
        Some("delete") => {
            doc.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch type {other:?} in $patch")),
    }
    if let Some(keys) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
        doc.retain(|k, _| keep.contains(&k.as_str()));
    }
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (key, pv) in patch {
        if key == "$patch" || key == "$retainKeys" {
            continue;
        }
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            if let Some(order) = pv.as_array() {
                orders.push((list.to_string(), order.clone()));
            }
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(remove)) = (doc.get_mut(list), pv.as_array()) {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        match pv {
            Value::Null => {
                doc.shift_remove(key);
            }
            Value::Object(pm) => match doc.get_mut(key) {
                Some(Value::Object(dm)) => merge_map(dm, pm)?,
                _ => {
                    let mut fresh = Map::new();
                    merge_map(&mut fresh, pm)?;
                    doc.insert(key.clone(), Value::Object(fresh));
                }
            },
            Value::Array(pa) => {
                let merged = match (doc.get(key), merge_key(key, pa)) {
                    (Some(Value::Array(da)), Some(mk)) => merge_list(da, pa, mk)?,
                    (_, Some(mk)) => merge_list(&[], pa, mk)?,
                    _ => pa
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .cloned()
                        .collect(),
                };
                doc.insert(key.clone(), Value::Array(merged));
            }
            other => {
                doc.insert(key.clone(), other.clone());
            }
        }
    }
    for (list, order) in orders {
        if let Some(Value::Array(items)) = doc.get_mut(&list) {
            reorder(items, &order, merge_key(&list, items));
        }
    }
    Ok(())
}

fn merge_list(doc: &[Value], patch: &[Value], key: &str) -> Result<Vec<Value>, String> {
    let mut out: Vec<Value> = doc.to_vec();
    for item in patch {
        let directive = item.get("$patch").and_then(Value::as_str);
        let id = item.get(key);
        if directive == Some("replace") {
            let mut clean = item.clone();
            if let Some(m) = clean.as_object_mut() {
                m.shift_remove("$patch");
            }
            return Ok(vec![clean]);
        }
        let pos = id.and_then(|id| out.iter().position(|d| d.get(key) == Some(id)));
        match (directive, pos) {
            (Some("delete"), Some(i)) => {
                out.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => {
                if let (Some(dm), Some(pm)) = (out[i].as_object_mut(), item.as_object()) {
                    merge_map(dm, pm)?;
                } else {
                    out[i] = item.clone();
                }
            }
            (_, None) => {
                let mut fresh = Map::new();
                if let Some(pm) = item.as_object() {
                    merge_map(&mut fresh, pm)?;
                }
                out.push(Value::Object(fresh));
            }
        }
    }
    Ok(out)
}

fn reorder(items: &mut Vec<Value>, order: &[Value], key: Option<&str>) {
    let id = |v: &Value| -> Value {
        match key {
            Some(k) => v.get(k).cloned().unwrap_or(Value::Null),
            None => v.clone(),
        }
    };
    let wanted: Vec<Value> = order.iter().map(&id).collect();
    let mut sorted: Vec<Value> = Vec::with_capacity(items.len());
    for w in &wanted {
        if let Some(pos) = items.iter().position(|i| &id(i) == w) {
            sorted.push(items.remove(pos));
        }
    }
    sorted.append(items);
    *items = sorted;
}

/// Server-side apply's merge of an applied configuration into the live
/// object: maps merge recursively, keyed lists merge by key, other lists and
/// scalars are replaced.
pub fn apply_merge(live: &mut Value, applied: &Value) {
    match (live, applied) {
        (Value::Object(lm), Value::Object(am)) => {
            for (k, av) in am {
                match lm.get_mut(k) {
                    Some(lv) => match (lv, av) {
                        (lv @ Value::Array(_), Value::Array(aa)) => {
                            if let (Some(key), Value::Array(la)) = (merge_key(k, aa), &mut *lv) {
                                for item in aa {
                                    let id = item.get(key);
                                    match la.iter_mut().find(|l| id.is_some() && l.get(key) == id) {
                                        Some(existing) => apply_merge(existing, item),
                                        None => la.push(item.clone()),
                                    }
                                }
                            } else {
                                *lv = av.clone();
                            }
                        }
                        (lv, av) => apply_merge(lv, av),
                    },
                    None => {
                        lm.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (live, applied) => *live = applied.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strategic_merge_merges_containers_by_name_and_deletes() {
        let mut doc = json!({"spec": {"containers": [
            {"name": "app", "image": "nginx:1", "env": [{"name": "A", "value": "1"}]},
            {"name": "side", "image": "busybox"}
        ]}, "metadata": {"labels": {"a": "1", "b": "2"}}});
        let patch = json!({
            "metadata": {"labels": {"b": null, "c": "3"}},
            "spec": {"containers": [
                {"name": "app", "image": "nginx:2", "env": [{"name": "B", "value": "2"}]},
                {"name": "side", "$patch": "delete"}
            ]}
        });
        strategic_merge(&mut doc, &patch).unwrap();
        assert_eq!(
            doc,
            json!({"spec": {"containers": [
                {"name": "app", "image": "nginx:2", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
            ]}, "metadata": {"labels": {"a": "1", "c": "3"}}})
        );
    }

    #[test]
    fn strategic_merge_replaces_plain_lists_and_honours_element_order() {
        let mut doc =
            json!({"spec": {"args": ["a", "b"], "containers": [{"name": "x"}, {"name": "y"}]}});
        let patch = json!({"spec": {
            "args": ["c"],
            "$setElementOrder/containers": [{"name": "y"}, {"name": "x"}],
            "containers": [{"name": "y", "image": "i"}]
        }});
        strategic_merge(&mut doc, &patch).unwrap();
        assert_eq!(
            doc,
            json!({"spec": {"args": ["c"], "containers": [{"name": "y", "image": "i"}, {"name": "x"}]}})
        );
    }

    #[test]
    fn json_and_merge_patches() {
        let mut doc = json!({"data": {"a": "1"}});
        json_patch(
            &mut doc,
            &json!([{"op": "add", "path": "/data/b", "value": "2"}]),
        )
        .unwrap();
        merge_patch(&mut doc, &json!({"data": {"a": null}}));
        assert_eq!(doc, json!({"data": {"b": "2"}}));
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "test", "path": "/data/b", "value": "3"}])
            )
            .is_err()
        );
    }
}
