//! Test support: the field paths of a CRD's schema, to check that a
//! hand-written CRD under `deploy/` and the Rust type it stores agree.

use std::collections::BTreeSet;

use serde_json::Value;

/// Every property path of the first version's `openAPIV3Schema`, below the
/// object's own `apiVersion`/`kind`/`metadata`: `.spec.rules[].verbs`.
pub(crate) fn of_crd(crd: &Value) -> BTreeSet<String> {
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut paths = BTreeSet::new();
    walk(schema, "", &mut paths);
    paths.retain(|p| !matches!(p.as_str(), ".apiVersion" | ".kind" | ".metadata"));
    paths
}

fn walk(node: &Value, prefix: &str, paths: &mut BTreeSet<String>) {
    if let Some(properties) = node["properties"].as_object() {
        for (name, child) in properties {
            let path = format!("{prefix}.{name}");
            walk(child, &path, paths);
            paths.insert(path);
        }
    }
    if node["items"].is_object() {
        walk(&node["items"], &format!("{prefix}[]"), paths);
    }
    if node["additionalProperties"].is_object() {
        walk(
            &node["additionalProperties"],
            &format!("{prefix}{{}}"),
            paths,
        );
    }
    for alternatives in ["anyOf", "oneOf", "allOf"] {
        for alternative in node[alternatives].as_array().into_iter().flatten() {
            walk(alternative, prefix, paths);
        }
    }
}
