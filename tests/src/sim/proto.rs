//! Reading the protobuf request bodies kubectl's typed commands send
//! (`kubectl create configmap|secret|namespace|serviceaccount`, `kubectl auth
//! can-i`). Responses are always JSON (kubectl accepts it); only the request
//! types listed in [`schema_for`] are understood, others get 415.

use base64::Engine;
use serde_json::{Map, Value};

/// The magic prefix of Kubernetes protobuf envelopes.
const MAGIC: &[u8] = b"k8s\x00";

#[derive(Clone, Copy)]
enum Ty {
    Str,
    /// `bytes`, rendered base64 as in JSON.
    Bytes,
    Bool,
    Int,
    Msg(&'static [Field]),
    /// `repeated` of a message type.
    RepeatedMsg(&'static [Field]),
    MapStr,
    MapBytes,
    RepeatedStr,
}

type Field = (u32, &'static str, Ty);

const OBJECT_META: &[Field] = &[
    (1, "name", Ty::Str),
    (2, "generateName", Ty::Str),
    (3, "namespace", Ty::Str),
    (6, "resourceVersion", Ty::Str),
    (11, "labels", Ty::MapStr),
    (12, "annotations", Ty::MapStr),
    (14, "finalizers", Ty::RepeatedStr),
];
const CONFIG_MAP: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "data", Ty::MapStr),
    (3, "binaryData", Ty::MapBytes),
    (4, "immutable", Ty::Bool),
];
const SECRET: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "data", Ty::MapBytes),
    (3, "type", Ty::Str),
    (4, "stringData", Ty::MapStr),
    (5, "immutable", Ty::Bool),
];
const METADATA_ONLY: &[Field] = &[(1, "metadata", Ty::Msg(OBJECT_META))];
const RESOURCE_ATTRIBUTES: &[Field] = &[
    (1, "namespace", Ty::Str),
    (2, "verb", Ty::Str),
    (3, "group", Ty::Str),
    (4, "version", Ty::Str),
    (5, "resource", Ty::Str),
    (6, "subresource", Ty::Str),
    (7, "name", Ty::Str),
];
const NON_RESOURCE_ATTRIBUTES: &[Field] = &[(1, "path", Ty::Str), (2, "verb", Ty::Str)];
const SSAR_SPEC: &[Field] = &[
    (1, "resourceAttributes", Ty::Msg(RESOURCE_ATTRIBUTES)),
    (2, "nonResourceAttributes", Ty::Msg(NON_RESOURCE_ATTRIBUTES)),
];
const SSAR: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(SSAR_SPEC)),
];
const BOUND_OBJECT_REFERENCE: &[Field] = &[
    (1, "kind", Ty::Str),
    (2, "apiVersion", Ty::Str),
    (3, "name", Ty::Str),
    (4, "uid", Ty::Str),
];
const TOKEN_REQUEST_SPEC: &[Field] = &[
    (1, "audiences", Ty::RepeatedStr),
    (3, "boundObjectRef", Ty::Msg(BOUND_OBJECT_REFERENCE)),
    (4, "expirationSeconds", Ty::Int),
];
const TOKEN_REQUEST: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(TOKEN_REQUEST_SPEC)),
];
// Workloads, as `kubectl create deployment|job|cronjob|service` send them.
// Field numbers are those of k8s.io/api's generated.proto.
const LABEL_SELECTOR: &[Field] = &[(1, "matchLabels", Ty::MapStr)];
const CONTAINER_PORT: &[Field] = &[
    (1, "name", Ty::Str),
    (2, "hostPort", Ty::Int),
    (3, "containerPort", Ty::Int),
    (4, "protocol", Ty::Str),
];
const ENV_VAR: &[Field] = &[(1, "name", Ty::Str), (2, "value", Ty::Str)];
const CONTAINER: &[Field] = &[
    (1, "name", Ty::Str),
    (2, "image", Ty::Str),
    (3, "command", Ty::RepeatedStr),
    (4, "args", Ty::RepeatedStr),
    (5, "workingDir", Ty::Str),
    (6, "ports", Ty::RepeatedMsg(CONTAINER_PORT)),
    (7, "env", Ty::RepeatedMsg(ENV_VAR)),
    (8, "resources", Ty::Msg(&[])),
    (13, "terminationMessagePath", Ty::Str),
    (14, "imagePullPolicy", Ty::Str),
];
const POD_SPEC: &[Field] = &[
    (2, "containers", Ty::RepeatedMsg(CONTAINER)),
    (3, "restartPolicy", Ty::Str),
    (4, "terminationGracePeriodSeconds", Ty::Int),
    (6, "dnsPolicy", Ty::Str),
    (7, "nodeSelector", Ty::MapStr),
    (8, "serviceAccountName", Ty::Str),
    (10, "nodeName", Ty::Str),
    (20, "initContainers", Ty::RepeatedMsg(CONTAINER)),
];
const POD_TEMPLATE_SPEC: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(POD_SPEC)),
];
const DEPLOYMENT_SPEC: &[Field] = &[
    (1, "replicas", Ty::Int),
    (2, "selector", Ty::Msg(LABEL_SELECTOR)),
    (3, "template", Ty::Msg(POD_TEMPLATE_SPEC)),
    (4, "strategy", Ty::Msg(&[(1, "type", Ty::Str)])),
    (5, "minReadySeconds", Ty::Int),
    (6, "revisionHistoryLimit", Ty::Int),
    (7, "paused", Ty::Bool),
    (9, "progressDeadlineSeconds", Ty::Int),
];
const DEPLOYMENT: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(DEPLOYMENT_SPEC)),
];
const JOB_SPEC: &[Field] = &[
    (1, "parallelism", Ty::Int),
    (2, "completions", Ty::Int),
    (3, "activeDeadlineSeconds", Ty::Int),
    (4, "selector", Ty::Msg(LABEL_SELECTOR)),
    (6, "template", Ty::Msg(POD_TEMPLATE_SPEC)),
    (7, "backoffLimit", Ty::Int),
];
const JOB: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(JOB_SPEC)),
];
const SERVICE_PORT: &[Field] = &[
    (1, "name", Ty::Str),
    (2, "protocol", Ty::Str),
    (3, "port", Ty::Int),
    (4, "targetPort", Ty::Msg(INT_OR_STRING)),
    (5, "nodePort", Ty::Int),
];
/// `IntOrString`, decoded as its parts; [`int_or_string`] folds it.
const INT_OR_STRING: &[Field] = &[
    (1, "type", Ty::Int),
    (2, "intVal", Ty::Int),
    (3, "strVal", Ty::Str),
];
const SERVICE_SPEC: &[Field] = &[
    (1, "ports", Ty::RepeatedMsg(SERVICE_PORT)),
    (2, "selector", Ty::MapStr),
    (3, "clusterIP", Ty::Str),
    (4, "type", Ty::Str),
    (7, "sessionAffinity", Ty::Str),
    (11, "externalName", Ty::Str),
];
const SERVICE: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(SERVICE_SPEC)),
];
const TYPE_META: &[Field] = &[(1, "apiVersion", Ty::Str), (2, "kind", Ty::Str)];
const UNKNOWN: &[Field] = &[(1, "typeMeta", Ty::Msg(TYPE_META)), (2, "raw", Ty::Bytes)];

fn schema_for(api_version: &str, kind: &str) -> Option<&'static [Field]> {
    match (api_version, kind) {
        ("v1", "ConfigMap") => Some(CONFIG_MAP),
        ("v1", "Secret") => Some(SECRET),
        ("v1", "Namespace")
        | ("v1", "ServiceAccount")
        | ("authentication.k8s.io/v1", "SelfSubjectReview") => Some(METADATA_ONLY),
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => Some(SSAR),
        ("authentication.k8s.io/v1", "TokenRequest") => Some(TOKEN_REQUEST),
        ("apps/v1", "Deployment") => Some(DEPLOYMENT),
        ("batch/v1", "Job") => Some(JOB),
        ("v1", "Service") => Some(SERVICE),
        _ => None,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
        if n > self.buf.len() {
            return Err("truncated field".into());
        }
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }

    fn skip(&mut self, wire: u64) -> Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8),
            2 => self.bytes().map(drop),
            5 => self.take(4),
            w => Err(format!("unsupported wire type {w}")),
        }
    }

    fn take(&mut self, n: usize) -> Result<(), String> {
        if n > self.buf.len() {
            return Err("truncated field".into());
        }
        self.buf = &self.buf[n..];
        Ok(())
    }
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut r = Reader { buf: b };
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    while !r.buf.is_empty() {
        let tag = r.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 2) => k = utf8(r.bytes()?)?,
            (2, 2) => {
                let raw = r.bytes()?;
                v = if bytes_value {
                    base64::engine::general_purpose::STANDARD.encode(raw).into()
                } else {
                    utf8(raw)?.into()
                };
            }
            (_, w) => r.skip(w)?,
        }
    }
    Ok((k, v))
}

fn decode_message(buf: &[u8], schema: &[Field]) -> Result<Map<String, Value>, String> {
    let mut r = Reader { buf };
    let mut out = Map::new();
    while !r.buf.is_empty() {
        let tag = r.varint()?;
        let (num, wire) = (tag >> 3, tag & 7);
        let Some((_, name, ty)) = schema.iter().find(|(n, _, _)| u64::from(*n) == num) else {
            r.skip(wire)?;
            continue;
        };
        let name = (*name).to_string();
        match (*ty, wire) {
            (Ty::Str, 2) => {
                // Go writes unset strings as empty ones; JSON omits them.
                let v = utf8(r.bytes()?)?;
                if !v.is_empty() {
                    out.insert(name, v.into());
                }
            }
            (Ty::Bytes, 2) => {
                out.insert(
                    name,
                    base64::engine::general_purpose::STANDARD
                        .encode(r.bytes()?)
                        .into(),
                );
            }
            (Ty::Bool, 0) => {
                out.insert(name, (r.varint()? != 0).into());
            }
            (Ty::Int, 0) => {
                out.insert(name, (r.varint()? as i64).into());
            }
            (Ty::Msg(inner), 2) => {
                let mut message = decode_message(r.bytes()?, inner)?;
                if std::ptr::eq(inner, INT_OR_STRING) {
                    out.insert(name, int_or_string(&mut message));
                } else {
                    out.insert(name, Value::Object(message));
                }
            }
            (Ty::RepeatedMsg(inner), 2) => {
                let message = decode_message(r.bytes()?, inner)?;
                out.entry(name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                    .expect("repeated field")
                    .push(Value::Object(message));
            }
            (Ty::MapStr | Ty::MapBytes, 2) => {
                let (k, v) = map_entry(r.bytes()?, matches!(ty, Ty::MapBytes))?;
                out.entry(name)
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                    .expect("map field")
                    .insert(k, v);
            }
            (Ty::RepeatedStr, 2) => {
                let s = utf8(r.bytes()?)?;
                out.entry(name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                    .expect("repeated field")
                    .push(s.into());
            }
            (_, w) => r.skip(w)?,
        }
    }
    Ok(out)
}

/// JSON writes an `IntOrString` as the bare number or string (type 0 = int).
fn int_or_string(parts: &mut Map<String, Value>) -> Value {
    match parts.get("type").and_then(Value::as_i64) {
        Some(1) => parts.remove("strVal").unwrap_or_else(|| "".into()),
        _ => parts.remove("intVal").unwrap_or_else(|| 0.into()),
    }
}

/// Decodes a Kubernetes protobuf envelope into the JSON object it carries.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let inner = body
        .strip_prefix(MAGIC)
        .ok_or("not a Kubernetes protobuf envelope (missing the k8s\\0 prefix)")?;
    let unknown = decode_message(inner, UNKNOWN)?;
    let tm = unknown.get("typeMeta").cloned().unwrap_or_default();
    let api_version = tm.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = tm.get("kind").and_then(Value::as_str).unwrap_or("");
    let schema = schema_for(api_version, kind).ok_or_else(|| {
        format!("protobuf bodies of {api_version} {kind} are not understood by this simulator; send JSON")
    })?;
    let raw = unknown
        .get("raw")
        .and_then(Value::as_str)
        .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
        .transpose()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let mut out = Map::new();
    out.insert("kind".into(), kind.into());
    out.insert("apiVersion".into(), api_version.into());
    out.append(&mut decode_message(&raw, schema)?);
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((num << 3) | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    fn varint_field(num: u32, v: u8) -> Vec<u8> {
        vec![(num << 3) as u8, v]
    }

    #[test]
    fn decodes_a_deployment_with_repeated_containers() {
        let labels = field(11, &[field(1, b"app"), field(2, b"web")].concat());
        let meta = [field(1, b"web"), labels.clone()].concat();
        let container = |name: &[u8], image: &[u8]| {
            let port = varint_field(3, 80);
            field(
                2,
                &[
                    field(1, name),
                    field(2, image),
                    field(6, &port),
                    field(8, b""),
                ]
                .concat(),
            )
        };
        let pod_spec = [container(b"app", b"web:2"), container(b"side", b"proxy:1")].concat();
        let template = [
            field(
                1,
                &field(11, &[field(1, b"app"), field(2, b"web")].concat()),
            ),
            field(2, &pod_spec),
        ]
        .concat();
        let spec = [
            varint_field(1, 3),
            field(2, &field(1, &[field(1, b"app"), field(2, b"web")].concat())),
            field(3, &template),
            field(4, b""),
        ]
        .concat();
        let deployment = [field(1, &meta), field(2, &spec)].concat();
        let tm = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        let body = [MAGIC, &[field(1, &tm), field(2, &deployment)].concat()].concat();
        assert_eq!(
            decode(&body).unwrap(),
            serde_json::json!({
                "kind": "Deployment", "apiVersion": "apps/v1",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [
                            {"name": "app", "image": "web:2", "ports": [{"containerPort": 80}], "resources": {}},
                            {"name": "side", "image": "proxy:1", "ports": [{"containerPort": 80}], "resources": {}},
                        ]},
                    },
                    "strategy": {},
                },
            })
        );
    }

    #[test]
    fn decodes_service_target_ports_as_int_or_string() {
        let port = |target: Vec<u8>| {
            field(
                1,
                &[field(1, b"http"), varint_field(3, 80), field(4, &target)].concat(),
            )
        };
        let spec = [
            port(varint_field(2, 8)),
            port([varint_field(1, 1), field(3, b"web")].concat()),
        ]
        .concat();
        let svc = [field(1, &field(1, b"web")), field(2, &spec)].concat();
        let tm = [field(1, b"v1"), field(2, b"Service")].concat();
        let body = [MAGIC, &[field(1, &tm), field(2, &svc)].concat()].concat();
        let v = decode(&body).unwrap();
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 8);
        assert_eq!(v["spec"]["ports"][1]["targetPort"], "web");
    }

    #[test]
    fn decodes_a_configmap_envelope() {
        let meta = field(1, b"cfg");
        let entry = [field(1, b"k"), field(2, b"v")].concat();
        let cm = [field(1, &meta), field(2, &entry)].concat();
        let tm = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let unknown = [field(1, &tm), field(2, &cm)].concat();
        let body = [MAGIC, &unknown].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "cfg"}, "data": {"k": "v"}})
        );
    }
}
