//! `Table` responses (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`),
//! with the columns the real API server prints (fixture `secret-list-table`).

use serde_json::{Map, Value, json};

use super::resources::ResourceDef;

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: http://kubernetes.io/docs/user-guide/identifiers#names";
const AGE_DESC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

fn col(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

/// What a `Table` row carries in `object` (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// Kubernetes' `HumanDuration` (what `AGE` shows).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h) = (s / 60, s / 3600);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        }
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        let y = h / (24 * 365);
        let d = (h / 24) % 365;
        if d == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{d}d")
        }
    } else {
        format!("{}y", h / (24 * 365))
    }
}

fn age(obj: &Value) -> String {
    let Some(ts) = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
    else {
        return "<unknown>".into();
    };
    match time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339) {
        Ok(t) => human_duration((time::OffsetDateTime::now_utc() - t).whole_seconds()),
        Err(_) => "<unknown>".into(),
    }
}

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn count(obj: &Value, ptr: &str) -> i64 {
    obj.pointer(ptr)
        .and_then(Value::as_object)
        .map(|m| m.len() as i64)
        .unwrap_or(0)
}

fn int(obj: &Value, ptr: &str) -> i64 {
    obj.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn name(obj: &Value) -> Value {
    s(obj, "/metadata/name").into()
}

fn none_or(v: &str) -> Value {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.into()
    }
}

/// Evaluates the simple JSONPath of a CRD printer column (`.spec.x.y`).
fn json_path(obj: &Value, path: &str) -> Value {
    let mut cur = Some(obj);
    for seg in path.trim_start_matches('.').split('.') {
        if seg.is_empty() {
            continue;
        }
        cur = cur.and_then(|c| c.get(seg));
    }
    cur.cloned().unwrap_or(Value::Null)
}

/// Column definitions and a row builder for a resource.
#[allow(clippy::type_complexity)]
fn columns(def: &ResourceDef) -> (Vec<Value>, Box<dyn Fn(&Value) -> Vec<Value>>) {
    let name_col = col("Name", "string", "name", NAME_DESC, 0);
    let age_col = col("Age", "string", "", AGE_DESC, 0);
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "secrets") => (
            vec![
                name_col,
                col(
                    "Type",
                    "string",
                    "",
                    "Used to facilitate programmatic handling of secret data.",
                    0,
                ),
                col(
                    "Data",
                    "string",
                    "",
                    "Data contains the secret data. Each key must consist of alphanumeric characters, '-', '_' or '.'. The serialized form of the secret data is a base64 encoded string, representing the arbitrary (possibly non-string) data value here. Described in https://tools.ietf.org/html/rfc4648#section-4",
                    0,
                ),
                age_col,
            ],
            Box::new(|o| {
                vec![
                    name(o),
                    s(o, "/type").into(),
                    count(o, "/data").into(),
                    age(o).into(),
                ]
            }),
        ),
        ("", "configmaps") => (
            vec![
                name_col,
                col(
                    "Data",
                    "string",
                    "",
                    "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'. Values with non-UTF-8 byte sequences must use the BinaryData field. The keys stored in Data must not overlap with the keys in the BinaryData field, this is enforced during validation process.",
                    0,
                ),
                age_col,
            ],
            Box::new(|o| {
                vec![
                    name(o),
                    (count(o, "/data") + count(o, "/binaryData")).into(),
                    age(o).into(),
                ]
            }),
        ),
        ("", "namespaces") => (
            vec![
                name_col,
                col("Status", "string", "", "The status of the namespace", 0),
                age_col,
            ],
            Box::new(|o| vec![name(o), s(o, "/status/phase").into(), age(o).into()]),
        ),
        ("", "pods") => (
            vec![
                name_col,
                col(
                    "Ready",
                    "string",
                    "",
                    "The aggregate readiness state of this pod for accepting traffic.",
                    0,
                ),
                col(
                    "Status",
                    "string",
                    "",
                    "The aggregate status of the containers in this pod.",
                    0,
                ),
                col(
                    "Restarts",
                    "string",
                    "",
                    "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
                    0,
                ),
                age_col,
                col(
                    "IP",
                    "string",
                    "",
                    "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
                    1,
                ),
                col(
                    "Node",
                    "string",
                    "",
                    "NodeName is a request to schedule this pod onto a specific node. If it is non-empty, the scheduler simply schedules this pod onto that node, assuming that it fits resource requirements.",
                    1,
                ),
                col(
                    "Nominated Node",
                    "string",
                    "",
                    "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods. This field does not guarantee that the pod will be scheduled on this node. Scheduler may decide to place the pod elsewhere if other nodes become available sooner. Scheduler may also decide to give the resources on this node to a higher priority pod that is created after preemption. As a result, this field may be different than PodSpec.nodeName when the pod is scheduled.",
                    1,
                ),
                col(
                    "Readiness Gates",
                    "string",
                    "",
                    "If specified, all readiness gates will be evaluated for pod readiness. A pod is ready when all its containers are ready AND all conditions specified in the readiness gates have status equal to \"True\" More info: https://git.k8s.io/enhancements/keps/sig-network/580-pod-readiness-gates",
                    1,
                ),
            ],
            Box::new(|o| {
                let total = o
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                let statuses = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array);
                let ready = statuses.map_or(0, |s| {
                    s.iter()
                        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                        .count()
                });
                let restarts: i64 = statuses.map_or(0, |s| {
                    s.iter()
                        .map(|c| c.get("restartCount").and_then(Value::as_i64).unwrap_or(0))
                        .sum()
                });
                vec![
                    name(o),
                    format!("{ready}/{total}").into(),
                    s(o, "/status/phase").into(),
                    restarts.to_string().into(),
                    age(o).into(),
                    none_or(s(o, "/status/podIP")),
                    none_or(s(o, "/spec/nodeName")),
                    "<none>".into(),
                    "<none>".into(),
                ]
            }),
        ),
        ("apps", "deployments") => (
            vec![
                name_col,
                col(
                    "Ready",
                    "string",
                    "",
                    "Number of the pod with ready state",
                    0,
                ),
                col(
                    "Up-to-date",
                    "string",
                    "",
                    "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
                    0,
                ),
                col(
                    "Available",
                    "string",
                    "",
                    "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
                    0,
                ),
                age_col,
                col(
                    "Containers",
                    "string",
                    "",
                    "Names of each container in the template.",
                    1,
                ),
                col(
                    "Images",
                    "string",
                    "",
                    "Images referenced by each container in the template.",
                    1,
                ),
                col(
                    "Selector",
                    "string",
                    "",
                    "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
                    1,
                ),
            ],
            Box::new(|o| {
                let containers = o
                    .pointer("/spec/template/spec/containers")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let join = |k: &str| {
                    containers
                        .iter()
                        .filter_map(|c| c.get(k).and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let selector = o
                    .pointer("/spec/selector/matchLabels")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                let desired = o
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                vec![
                    name(o),
                    format!("{}/{desired}", int(o, "/status/readyReplicas")).into(),
                    int(o, "/status/updatedReplicas").into(),
                    int(o, "/status/availableReplicas").into(),
                    age(o).into(),
                    join("name").into(),
                    join("image").into(),
                    none_or(&selector),
                ]
            }),
        ),
        _ if !def.builtin => {
            let mut cols = vec![name_col];
            let printer = def.printer_columns.clone();
            for pc in &printer {
                cols.push(col(&pc.name, &pc.type_, "", &pc.description, pc.priority));
            }
            let has_age = printer
                .iter()
                .any(|p| p.json_path == ".metadata.creationTimestamp");
            if !has_age {
                cols.push(col("Age", "date", "", AGE_DESC, 0));
            }
            (
                cols,
                Box::new(move |o| {
                    let mut row = vec![name(o)];
                    for pc in &printer {
                        let v = json_path(o, &pc.json_path);
                        row.push(if pc.type_ == "date" {
                            v.as_str().map(|_| age(o).into()).unwrap_or(Value::Null)
                        } else {
                            v
                        });
                    }
                    if !has_age {
                        row.push(s(o, "/metadata/creationTimestamp").into());
                    }
                    row
                }),
            )
        }
        _ => (
            vec![name_col, col("Created At", "date", "", AGE_DESC, 0)],
            Box::new(|o| vec![name(o), s(o, "/metadata/creationTimestamp").into()]),
        ),
    }
}

/// `PartialObjectMetadata` of an object (what a row's `object` is by default).
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// A `Table` of objects. `resource_version` goes into the table's metadata.
pub fn table(
    def: &ResourceDef,
    objects: &[Value],
    resource_version: &str,
    include: IncludeObject,
    with_headers: bool,
) -> Value {
    let (cols, row) = columns(def);
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut r = Map::new();
            r.insert("cells".into(), Value::Array(row(o)));
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    r.insert("object".into(), partial_metadata(o));
                }
                IncludeObject::Object => {
                    r.insert("object".into(), o.clone());
                }
            }
            Value::Object(r)
        })
        .collect();
    let mut t = Map::new();
    t.insert("kind".into(), "Table".into());
    t.insert("apiVersion".into(), "meta.k8s.io/v1".into());
    t.insert(
        "metadata".into(),
        json!({"resourceVersion": resource_version}),
    );
    if with_headers {
        t.insert("columnDefinitions".into(), Value::Array(cols));
    } else {
        t.insert("columnDefinitions".into(), Value::Null);
    }
    t.insert("rows".into(), Value::Array(rows));
    Value::Object(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_like_kubectl() {
        assert_eq!(human_duration(1), "1s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(86400 * 3), "3d");
    }
}
