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
                out.insert(name, Value::Object(decode_message(r.bytes()?, inner)?));
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
