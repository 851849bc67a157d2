//! Writes never store a mask.
//!
//! Masking changes what an agent reads. An agent that writes back what it
//! read (`kubectl get secret s -o yaml > f; kubectl replace -f f`, client-go
//! `Update`, the Python client's `replace_namespaced_secret`, a server-side
//! apply of the read YAML, a client-side apply whose last-applied
//! annotation repeats the masked values) would store chaperone's markers in
//! place of the credential, and the next read would be masked again: the
//! agent would never notice that it destroyed the value.
//!
//! So a create, update or patch (POST, PUT, PATCH) of a resource type
//! chaperone masks ([`super::Masker::target`]: Secrets, ConfigMaps, pods and
//! workloads) is read (at most [`BODY_READ_LIMIT`], the API server's own
//! request limit) and refused with a 422 `Status` when it carries any
//! marker chaperone writes ([`find_markers`]).
//!
//! **Refuse, not restore.** Restoring the stored values for the fields the
//! agent left unchanged would need a GET of the live object, a per-format
//! (JSON, YAML, protobuf, merge/strategic/JSON/apply patches) and per-field
//! correlation of masked and stored values (env entries by name, keys in
//! the last-applied JSON), and a race against concurrent writers between the
//! GET and the write; a mistake there silently writes something nobody
//! sent. A refusal cannot go wrong that way, and its message tells the
//! agent the one thing to do: send only the fields it changes (`kubectl
//! patch`). Not an apply of a partial file: apply prunes the fields its
//! earlier applies set and the file leaves out.
//!
//! **What is found.** The body is searched as bytes, whatever its format:
//! - the marker text `masked by chaperone: ` itself, so `stringData`, the
//!   last-applied annotation, pattern-masked ConfigMap and env values, in
//!   JSON (also with `<` and `>` escaped as `\u003c`/`\u003e`, as Go's
//!   encoder writes them), YAML, and protobuf: a protobuf Secret carries
//!   `data` values as raw bytes, and a client that read a masked Secret (as
//!   JSON: chaperone negotiates JSON where it masks) holds the decoded
//!   marker text there, which is found as is;
//! - the base64 of `<masked by chaperone: ` at each of the three byte
//!   alignments: Secret `data` values (aligned: the whole value is the
//!   marker) and ConfigMap `binaryData` with a pattern marker inside.
//!
//! A body chaperone cannot read whole within the limit is refused (413):
//! it cannot be checked. A request body with a `Content-Encoding` is not
//! decoded: the API server does not decode request bodies either, so such
//! a write fails there. This guards against accidents, not against an
//! agent that spells the marker with JSON escapes on purpose: such an
//! agent could as well write any other wrong value.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use memchr::memmem::Finder;
use serde_json::Value;

use super::marker::PREFIX;
use crate::kstatus::Status;
use crate::request::RequestInfo;

/// The most chaperone reads of a write to check it: the API server's own
/// limit on a request body (3 MiB).
pub const BODY_READ_LIMIT: usize = 3 << 20;

/// The part of every marker that no encoder escapes.
const PLAIN: &str = "masked by chaperone: ";

/// The needles searched for: [`PLAIN`], and the base64 of [`PREFIX`] at
/// byte offsets 0, 1 and 2 (only the characters that do not depend on the
/// bytes around it).
fn needles() -> &'static [Finder<'static>] {
    static NEEDLES: std::sync::OnceLock<Vec<Finder<'static>>> = std::sync::OnceLock::new();
    NEEDLES.get_or_init(|| {
        let mut needles = vec![Finder::new(PLAIN.as_bytes()).into_owned()];
        for offset in 0..3 {
            let mut bytes = vec![0u8; offset];
            bytes.extend_from_slice(PREFIX.as_bytes());
            let encoded = STANDARD.encode(&bytes);
            // A first group holding filler bytes, and a last group that
            // would hold the bytes after the prefix, depend on them.
            let start = if offset == 0 { 0 } else { 4 };
            let end = if bytes.len() % 3 == 0 {
                encoded.len()
            } else {
                encoded.len() - 4
            };
            needles.push(Finder::new(&encoded.as_bytes()[start..end]).into_owned());
        }
        needles
    })
}

/// Whether `bytes` carry a marker chaperone writes, in any of its forms.
pub fn carries_marker(bytes: &[u8]) -> bool {
    needles().iter().any(|n| n.find(bytes).is_some())
}

/// Where a write body carries chaperone's markers: `None` when it carries
/// none; otherwise the fields that do (`data.password`,
/// `metadata.annotations.kubectl.kubernetes.io/last-applied-configuration`,
/// `spec.containers[0].env[1].value`) when the body is JSON or YAML, or an
/// empty list when it is not (protobuf).
pub fn find_markers(body: &[u8]) -> Option<Vec<String>> {
    if !carries_marker(body) {
        return None;
    }
    let parsed = serde_json::from_slice::<Value>(body)
        .ok()
        .or_else(|| serde_yaml::from_slice::<Value>(body).ok());
    let mut fields = Vec::new();
    if let Some(value) = parsed {
        collect(&value, &mut String::new(), &mut fields);
    }
    Some(fields)
}

fn collect(value: &Value, path: &mut String, fields: &mut Vec<String>) {
    let len = path.len();
    match value {
        Value::String(s)
            if !path.is_empty()
                && (carries_marker(s.as_bytes())
                    || STANDARD
                        .decode(s.as_bytes())
                        .is_ok_and(|decoded| carries_marker(&decoded))) =>
        {
            fields.push(path.clone());
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                collect(item, path, fields);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                collect(item, path, fields);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The 422 for a write that carries markers in `fields` (see
/// [`find_markers`]).
pub fn refusal(request: &RequestInfo, fields: &[String]) -> Status {
    let what = if request.name.is_empty() {
        request.resource.clone()
    } else {
        format!("{} {:?}", request.resource, request.name)
    };
    let at = if fields.is_empty() {
        String::new()
    } else {
        format!(" (in {})", fields.join(", "))
    };
    // No `details`: kubectl prints an `Invalid` Status with details as
    // "The Secret "db" is invalid" plus its causes, dropping the message
    // that says what to do; without them it prints "The request is
    // invalid: MESSAGE".
    Status::new(
        422,
        "Invalid",
        format!(
            "chaperone: this write of {what} carries values masked by chaperone{at}; \
             forwarding it would replace the stored values with the masks. Nothing was written. \
             Send only the fields you change, with their real values: kubectl patch (for a Secret: \
             kubectl patch secret NAME -p '{{\"stringData\":{{\"KEY\":\"new value\"}}}}'); never a body \
             or file made from what you read, including its last-applied-configuration annotation"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::super::marker;
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn clean_bodies_carry_no_marker() {
        for body in [
            r#"{"apiVersion":"v1","kind":"Secret","data":{"password":"czNjcjN0"}}"#,
            "apiVersion: v1\nkind: Secret\nstringData:\n  password: hunter2\n",
            "masked by chaperone",
            "",
        ] {
            assert_eq!(find_markers(body.as_bytes()), None, "{body}");
        }
        // The word "masked" and base64 of unrelated text.
        assert!(!carries_marker(b64("masked values are fine").as_bytes()));
    }

    #[test]
    fn a_secret_data_value_read_back_is_found() {
        for len in [0, 7, 14, 1 << 20] {
            let value = b64(&marker::sized(len));
            let body = format!(
                r#"{{"apiVersion":"v1","kind":"Secret","metadata":{{"name":"db"}},"data":{{"user":"YWRtaW4=","password":"{value}"}}}}"#
            );
            assert_eq!(
                find_markers(body.as_bytes()),
                Some(vec!["data.password".to_owned()]),
                "{len}"
            );
        }
    }

    #[test]
    fn string_data_and_its_go_escaped_form_are_found() {
        let plain = marker::sized(12);
        let body = serde_json::json!({"stringData": {"token": plain}}).to_string();
        assert_eq!(
            find_markers(body.as_bytes()),
            Some(vec!["stringData.token".to_owned()])
        );
        // Go's encoder (kubectl replace converts YAML with it) escapes <>.
        let escaped = r#"{"stringData":{"token":"\u003cmasked by chaperone: 12 bytes\u003e"}}"#;
        assert_eq!(
            find_markers(escaped.as_bytes()),
            Some(vec!["stringData.token".to_owned()])
        );
    }

    #[test]
    fn the_last_applied_annotation_is_found_nested() {
        let last_applied = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "data": {"password": b64(&marker::sized(9))},
        })
        .to_string();
        let body = serde_json::json!({
            "metadata": {"name": "db", "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": last_applied,
            }},
            "data": {"password": "cmVhbA=="},
        })
        .to_string();
        assert_eq!(
            find_markers(body.as_bytes()),
            Some(vec![
                "metadata.annotations.kubectl.kubernetes.io/last-applied-configuration".to_owned()
            ])
        );
    }

    #[test]
    fn yaml_as_kubectl_get_writes_it_is_found() {
        let yaml = format!(
            "apiVersion: v1\ndata:\n  password: {}\n  user: YWRtaW4=\nkind: Secret\nmetadata:\n  name: db\n  namespace: default\ntype: Opaque\n",
            b64(&marker::sized(27))
        );
        assert_eq!(
            find_markers(yaml.as_bytes()),
            Some(vec!["data.password".to_owned()])
        );
        let quoted = "stringData:\n  token: '<masked by chaperone: 5 bytes>'\n";
        assert_eq!(
            find_markers(quoted.as_bytes()),
            Some(vec!["stringData.token".to_owned()])
        );
    }

    #[test]
    fn pattern_markers_in_env_and_configmaps_are_found() {
        let pod = serde_json::json!({"spec": {"containers": [{"name": "app", "env": [
            {"name": "A", "value": "x"},
            {"name": "DB_URL", "value": "postgres://u:<masked by chaperone: password-in-url>@db"},
        ]}]}})
        .to_string();
        assert_eq!(
            find_markers(pod.as_bytes()),
            Some(vec!["spec.containers[0].env[1].value".to_owned()])
        );
        // binaryData: a pattern marker anywhere in the decoded bytes, so at
        // any base64 alignment.
        for lead in ["", "a", "ab", "abc", "abcd"] {
            let data = b64(&format!("{lead}key=<masked by chaperone: jwt>\nrest"));
            let cm = serde_json::json!({"binaryData": {"conf": data}}).to_string();
            assert_eq!(
                find_markers(cm.as_bytes()),
                Some(vec!["binaryData.conf".to_owned()]),
                "lead {lead:?}"
            );
        }
    }

    #[test]
    fn protobuf_bodies_carry_the_decoded_marker_and_are_found() {
        // k8s\0 magic, then a Secret whose data value is raw bytes: the
        // marker text a client decoded from the masked base64.
        let mut body = b"k8s\x00\x0a\x0c\x0a\x02v1\x12\x06Secret\x12".to_vec();
        body.extend_from_slice(marker::sized(14).as_bytes());
        assert_eq!(find_markers(&body), Some(vec![]));
    }

    #[test]
    fn the_refusal_is_a_422_that_says_what_to_do() {
        let request = RequestInfo::parse(
            &http::Method::PUT,
            "/api/v1/namespaces/default/secrets/db",
            None,
        );
        let status = refusal(&request, &["data.password".to_owned()]);
        assert_eq!(status.code, 422);
        assert_eq!(status.reason, "Invalid");
        assert!(status.name.is_none() && status.kind.is_none());
        assert!(
            status.message.contains("data.password"),
            "{}",
            status.message
        );
        assert!(
            status.message.contains("kubectl patch"),
            "{}",
            status.message
        );
        assert!(status.causes.is_empty());
    }
}
