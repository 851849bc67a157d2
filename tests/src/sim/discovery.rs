//! Discovery documents (`/api`, `/api/v1`, `/apis`, `/apis/G`, `/apis/G/V`,
//! `/version`) in the shapes of the `discovery-*` and `version` fixtures, and
//! the OpenAPI v3 index kubectl consults before `create`/`apply`.

use serde_json::{Map, Value, json};
use sha2::Digest;

use super::resources::{Registry, ResourceDef};

/// `/version` of Kubernetes 1.`minor` (1.20: exactly the fixture's v1.20.2).
pub fn version(minor: u32) -> Value {
    let git_version = if minor == 20 {
        "v1.20.2".to_string()
    } else {
        format!("v1.{minor}.0")
    };
    json!({
        "major": "1",
        "minor": minor.to_string(),
        "gitVersion": git_version,
        "gitCommit": "faecb196815e248d3ecfb03c680a4507229c2a56",
        "gitTreeState": "clean",
        "buildDate": "2026-11-23T09:03:45Z",
        "goVersion": "go1.21.13",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

fn group_entry(registry: &Registry, group: &str) -> Value {
    let versions = registry.versions(group);
    let gv = |v: &str| json!({"groupVersion": format!("{group}/{v}"), "version": v});
    json!({
        "name": group,
        "versions": versions.iter().map(|v| gv(v)).collect::<Vec<_>>(),
        "preferredVersion": gv(versions.first().map(String::as_str).unwrap_or("v1")),
    })
}

pub fn api_group_list(registry: &Registry) -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": registry.groups().iter().map(|g| group_entry(registry, g)).collect::<Vec<_>>(),
    })
}

pub fn api_group(registry: &Registry, group: &str) -> Option<Value> {
    if registry.versions(group).is_empty() {
        return None;
    }
    let mut v = group_entry(registry, group);
    let m = v.as_object_mut().expect("object");
    let mut out = Map::new();
    out.insert("kind".into(), "APIGroup".into());
    out.insert("apiVersion".into(), "v1".into());
    out.append(m);
    Some(Value::Object(out))
}

fn resources_of<'a>(registry: &'a Registry, group: &str, version: &str) -> Vec<&'a ResourceDef> {
    let mut defs: Vec<&ResourceDef> = registry
        .all()
        .filter(|d| d.group == group && d.version == version)
        .collect();
    defs.sort_by(|a, b| a.plural.cmp(&b.plural));
    defs
}

/// `APIResourceList` of a group version (`group` empty: the core `/api/v1`,
/// which the API server writes without `apiVersion`).
pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let defs = resources_of(registry, group, version);
    if defs.is_empty() {
        return None;
    }
    let resources: Vec<Value> = defs.iter().flat_map(|d| d.discovery_entries()).collect();
    let mut out = Map::new();
    out.insert("kind".into(), "APIResourceList".into());
    if group.is_empty() {
        out.insert("groupVersion".into(), version.into());
    } else {
        out.insert("apiVersion".into(), "v1".into());
        out.insert("groupVersion".into(), format!("{group}/{version}").into());
    }
    out.insert("resources".into(), Value::Array(resources));
    Some(Value::Object(out))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: one entry per group version.
pub fn openapi_v3_root(registry: &Registry) -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<(String, String)> = Vec::new();
    for d in registry.all() {
        let gv = (d.group.clone(), d.version.clone());
        if !gvs.contains(&gv) {
            gvs.push(gv);
        }
    }
    for (g, v) in gvs {
        let doc = openapi_v3_group_version(registry, &g, &v).unwrap_or_default();
        let hash = hex_upper(&sha2::Sha512::digest(doc.to_string().as_bytes())[..32]);
        let path = gv_path(&g, &v);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
        );
    }
    json!({ "paths": paths })
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// `/openapi/v3/apis/G/V`: enough for kubectl to see that every kind accepts
/// the `fieldValidation` parameter (so it validates on the server instead
/// of downloading schemas) and to use its built-in strategic-merge metadata.
pub fn openapi_v3_group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let defs = resources_of(registry, group, version);
    if defs.is_empty() {
        return None;
    }
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let mut paths = Map::new();
    for d in defs {
        let gvk = json!({"group": d.group, "version": d.version, "kind": d.kind});
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        let item = if d.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", d.plural)
        } else {
            format!("{prefix}/{}/{{name}}", d.plural)
        };
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", d.kind),
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let mut p = Map::new();
        if d.has_verb("get") {
            p.insert("get".into(), op("get"));
        }
        if d.has_verb("update") {
            p.insert("put".into(), op("put"));
        }
        if d.has_verb("patch") {
            p.insert("patch".into(), op("patch"));
        }
        p.insert("parameters".into(), params.clone());
        paths.insert(item, Value::Object(p));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.20.2"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
