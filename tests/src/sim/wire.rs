//! How responses look on the wire: JSON encoding (compact, or pretty for
//! curl as the API server does), headers, bodies, content negotiation.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::{status::ApiError, stream::Body};

/// Fixed flow-control ids, like the API server's `x-kubernetes-pf-*` headers.
const PF_FLOWSCHEMA: &str = "9d6e2f1a-b987-479a-96ee-ddbfccc93c2d";
const PF_PRIORITYLEVEL: &str = "68712bd8-30f4-4ee4-afdc-a854f5119f8c";

/// Encodes like the API server: compact with a trailing newline, or — for
/// curl — indented by two spaces with empty objects as `{\n  \n}` and raw
/// extensions (`fieldsV1`, a Table row's `object`) left compact.
pub fn encode(v: &Value, pretty: bool) -> Vec<u8> {
    if pretty {
        let mut out = String::new();
        write_pretty(v, 0, &mut out);
        out.into_bytes()
    } else {
        let mut out = serde_json::to_vec(v).expect("JSON values serialize");
        out.push(b'\n');
        out
    }
}

fn write_pretty(v: &Value, indent: usize, out: &mut String) {
    let pad = |n: usize| " ".repeat(n);
    match v {
        Value::Object(m) if m.is_empty() => {
            out.push_str(&format!("{{\n{}\n{}}}", pad(indent + 2), pad(indent)));
        }
        Value::Object(m) => {
            out.push_str("{\n");
            let mut first = true;
            for (k, child) in m {
                if !first {
                    out.push_str(",\n");
                }
                first = false;
                out.push_str(&pad(indent + 2));
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(": ");
                if k == "fieldsV1" || k == "object" {
                    out.push_str(&serde_json::to_string(child).expect("JSON"));
                } else {
                    write_pretty(child, indent + 2, out);
                }
            }
            out.push('\n');
            out.push_str(&pad(indent));
            out.push('}');
        }
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push_str("[\n");
            for (i, child) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                out.push_str(&pad(indent + 2));
                write_pretty(child, indent + 2, out);
            }
            out.push('\n');
            out.push_str(&pad(indent));
            out.push(']');
        }
        scalar => out.push_str(&serde_json::to_string(scalar).expect("JSON")),
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response with the API server's usual headers.
pub fn json_response(status: u16, v: &Value, pretty: bool) -> http::Response<Body> {
    let body = encode(v, pretty);
    let mut b = http::Response::builder()
        .status(status)
        .header("cache-control", "no-cache, private")
        .header("content-type", "application/json");
    if status == 403 {
        b = b.header("x-content-type-options", "nosniff");
    }
    if status != 401 {
        b = b
            .header("x-kubernetes-pf-flowschema-uid", PF_FLOWSCHEMA)
            .header("x-kubernetes-pf-prioritylevel-uid", PF_PRIORITYLEVEL);
    }
    b.header("content-length", body.len())
        .body(full(body))
        .expect("valid response")
}

/// kube-apiserver gzips an answer of at least this size for a client that
/// accepts gzip (`defaultGzipThresholdBytes`).
pub const GZIP_THRESHOLD: usize = 128 * 1024;

/// An object answer as the API server negotiates it: YAML when the client
/// prefers it, else JSON; gzip-compressed when it is large and the client
/// accepts gzip.
pub fn object_response(
    status: u16,
    v: &Value,
    pretty: bool,
    yaml: bool,
    gzip: bool,
) -> http::Response<Body> {
    let (content_type, body) = if yaml {
        let text = serde_yaml::to_string(&sorted(v)).unwrap_or_default();
        ("application/yaml", text.into_bytes())
    } else {
        ("application/json", encode(v, pretty))
    };
    if !gzip || body.len() < GZIP_THRESHOLD {
        if yaml {
            return http::Response::builder()
                .status(status)
                .header("cache-control", "no-cache, private")
                .header("content-type", content_type)
                .header("content-length", body.len())
                .body(full(body))
                .expect("valid response");
        }
        return json_response(status, v, pretty);
    }
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = encoder.write_all(&body);
    let compressed = encoder.finish().unwrap_or_default();
    http::Response::builder()
        .status(status)
        .header("cache-control", "no-cache, private")
        .header("content-type", content_type)
        .header("content-encoding", "gzip")
        .header("vary", "Accept-Encoding")
        .header("x-kubernetes-pf-flowschema-uid", PF_FLOWSCHEMA)
        .header("x-kubernetes-pf-prioritylevel-uid", PF_PRIORITYLEVEL)
        .body(full(compressed))
        .expect("valid response")
}

/// Keys in sorted order at every level (Go's YAML encoding of an object).
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Go's `http.NotFound`: what the API server answers for a path no handler
/// serves (a group or version that does not exist).
pub fn page_not_found() -> http::Response<Body> {
    http::Response::builder()
        .status(404)
        .header("content-type", "text/plain; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .header("cache-control", "no-cache, private")
        .body(full("404 page not found\n".to_string()))
        .expect("valid response")
}

pub fn error_response(e: &ApiError, pretty: bool) -> http::Response<Body> {
    json_response(e.code, &e.to_status(), pretty)
}

/// What the client accepts, as far as the simulator cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accept {
    /// `as=Table;v=v1;g=meta.k8s.io` is among the acceptable types.
    pub table: bool,
    /// `as=PartialObjectMetadata[List];v=v1;g=meta.k8s.io` (metadata-only clients).
    pub metadata_only: bool,
    /// Protobuf was asked for.
    pub protobuf: bool,
    /// Something this simulator writes (JSON, `*/*`) is acceptable.
    pub json: bool,
    /// The JWKS document's type, `application/jwk-set+json`, is acceptable
    /// (also `*/*`, `application/*` or no Accept at all).
    pub jwk_set: bool,
    /// `application/yaml` comes before any JSON type: answer in YAML.
    pub yaml: bool,
}

impl Accept {
    pub fn parse(header: Option<&str>) -> Self {
        let Some(h) = header.filter(|h| !h.trim().is_empty()) else {
            return Self {
                json: true,
                jwk_set: true,
                ..Self::default()
            };
        };
        let mut a = Self::default();
        for part in h.split(',') {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or("");
            let params: Vec<&str> = params.collect();
            if matches!(media, "application/jwk-set+json" | "*/*" | "application/*") {
                a.jwk_set = true;
            }
            if media == "application/yaml" && !a.json && !a.table && !a.metadata_only {
                a.yaml = true;
            }
            match media {
                "application/vnd.kubernetes.protobuf" => a.protobuf = true,
                "application/json" | "*/*" | "application/*" | "application/yaml" => {
                    if params.contains(&"as=Table") {
                        a.table = true;
                    } else if params.contains(&"as=PartialObjectMetadataList")
                        || params.contains(&"as=PartialObjectMetadata")
                    {
                        a.metadata_only = true;
                    } else if !params.iter().any(|p| p.starts_with("as=")) {
                        a.json = true;
                    }
                }
                _ => {}
            }
        }
        if a.table || a.metadata_only {
            a.json = true;
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn accept_negotiation() {
        let a = Accept::parse(Some(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
        ));
        assert!(a.table && a.json && !a.protobuf);
        let a = Accept::parse(Some("application/vnd.kubernetes.protobuf"));
        assert!(a.protobuf && !a.json);
        let a = Accept::parse(Some("application/vnd.kubernetes.protobuf, */*"));
        assert!(a.protobuf && a.json);
    }

    #[test]
    fn pretty_like_the_api_server() {
        let v = json!({"kind": "Status", "metadata": {}, "code": 401});
        assert_eq!(
            String::from_utf8(encode(&v, true)).unwrap(),
            "{\n  \"kind\": \"Status\",\n  \"metadata\": {\n    \n  },\n  \"code\": 401\n}"
        );
    }
}
