//! Content negotiation where masking applies: the upstream must answer JSON,
//! the one format chaperone masks. Protobuf (and YAML, CBOR, ...) are
//! negotiated away; a request that accepts nothing else is refused.

use http::HeaderValue;

use crate::kstatus::Status;

const JSON: &str = "application/json";

/// The request accepts no JSON variant, so a masked response cannot be
/// given. The proxy answers [`NotAcceptable::status`] (406).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the request accepts only {accepted:?}; masked responses are only available as JSON")]
pub struct NotAcceptable {
    /// The Accept header as the client sent it.
    pub accepted: String,
}

impl NotAcceptable {
    /// The Kubernetes `Status` for the client.
    pub fn status(&self) -> Status {
        Status::not_acceptable(format!(
            "chaperone masks secrets in this resource and returns it only as JSON, \
             but the request accepts only \"{}\"; send Accept: application/json \
             (Table variants such as application/json;as=Table;v=v1;g=meta.k8s.io are fine)",
            self.accepted
        ))
    }
}

/// The Accept header to send upstream for a request whose response will be
/// masked: the client's JSON media ranges (Table variants and parameters
/// kept, in order), wildcards turned into JSON, everything else dropped.
/// No header (or an empty one) becomes `application/json`. The header is
/// returned unchanged when it already names only JSON.
pub fn negotiate_accept(accept: Option<&HeaderValue>) -> Result<HeaderValue, NotAcceptable> {
    let Some(accept) = accept else {
        return Ok(HeaderValue::from_static(JSON));
    };
    let Ok(text) = accept.to_str() else {
        return Err(NotAcceptable {
            accepted: String::from_utf8_lossy(accept.as_bytes()).into_owned(),
        });
    };
    if text.trim().is_empty() {
        return Ok(HeaderValue::from_static(JSON));
    }
    let mut kept: Vec<String> = Vec::new();
    let mut changed = false;
    for range in text.split(',') {
        let range = range.trim();
        if range.is_empty() {
            changed = true;
            continue;
        }
        let (media, params) = range.split_at(range.find(';').unwrap_or(range.len()));
        let media = media.trim().to_ascii_lowercase();
        let entry = match media.as_str() {
            JSON => range.to_owned(),
            "*/*" | "application/*" => {
                changed = true;
                format!("{JSON}{params}")
            }
            _ => {
                changed = true;
                continue;
            }
        };
        if kept.contains(&entry) {
            changed = true;
        } else {
            kept.push(entry);
        }
    }
    if kept.is_empty() {
        return Err(NotAcceptable {
            accepted: text.to_owned(),
        });
    }
    if !changed {
        return Ok(accept.clone());
    }
    HeaderValue::from_str(&kept.join(", ")).map_err(|_| NotAcceptable {
        accepted: text.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiate(accept: &str) -> Result<String, NotAcceptable> {
        negotiate_accept(Some(&HeaderValue::from_str(accept).unwrap()))
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn kubectl_table_accept_is_kept_as_is() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(kubectl).unwrap(), kubectl);
    }

    #[test]
    fn protobuf_is_dropped_when_json_is_also_accepted() {
        assert_eq!(
            negotiate("application/vnd.kubernetes.protobuf,application/json").unwrap(),
            "application/json"
        );
        assert_eq!(
            negotiate(
                "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io, application/json;as=Table;v=v1;g=meta.k8s.io, application/json"
            )
            .unwrap(),
            "application/json;as=Table;v=v1;g=meta.k8s.io, application/json"
        );
    }

    #[test]
    fn wildcards_and_missing_headers_become_json() {
        assert_eq!(negotiate("*/*").unwrap(), "application/json");
        assert_eq!(
            negotiate("application/vnd.kubernetes.protobuf, */*;q=0.5").unwrap(),
            "application/json;q=0.5"
        );
        assert_eq!(
            negotiate_accept(None).unwrap().to_str().unwrap(),
            "application/json"
        );
        assert_eq!(negotiate("").unwrap(), "application/json");
    }

    #[test]
    fn protobuf_only_is_not_acceptable_with_a_406_status() {
        let err = negotiate("application/vnd.kubernetes.protobuf").unwrap_err();
        let status = err.status();
        assert_eq!(status.code, 406);
        assert_eq!(status.reason, "NotAcceptable");
        assert!(
            status.message.contains("application/json"),
            "{}",
            status.message
        );
        assert!(negotiate("application/yaml").is_err());
        assert!(negotiate("application/vnd.kubernetes.protobuf;stream=watch").is_err());
    }
}
