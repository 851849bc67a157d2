//! [`BodyCapture`]: a bounded, masked copy of a request or response body for
//! the recordings and the audit log (`requestObject`, `responseObject`), at
//! the record levels `Request` and `RequestResponse`.
//!
//! A body is captured as it streams: nothing waits for it and at most
//! [`MAX_BODY`] bytes are kept. A complete JSON body within the cap becomes
//! the object itself; anything else (too large, a watch or log stream, not
//! JSON) becomes a summary object:
//!
//! ```json
//! {"kind": "chaperone.dev/BodyPrefix", "bytes": 1048576, "lines": 12,
//!  "truncated": true, "prefix": "{\"kind\":\"SecretList\",..."}
//! ```
//!
//! Request bodies are masked here with the same rules as responses (a
//! Secret's values, ConfigMap and env values, pattern rules); response
//! bodies are captured as the agent received them (already masked), with
//! pattern rules applied again to any text kept. A body that must be masked
//! and cannot be (not JSON) is not kept:
//! `{"kind": "chaperone.dev/Unrecorded", "reason": "..."}`.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::mask::{Masker, ResponseMask};
use crate::proxy::body::{BodyObserver, CutShort};
use crate::request::RequestInfo;

/// Most bytes of one body kept for the record.
pub const MAX_BODY: usize = 64 << 10;

/// A body being captured.
pub struct BodyCapture {
    masker: Masker,
    /// The JSON transform for bodies of masked kinds.
    mask: Option<ResponseMask>,
    /// A body that must be masked and is not JSON: not kept.
    refused: Option<String>,
    kept: Vec<u8>,
    scratch: Vec<u8>,
    bytes: u64,
    lines: u64,
    truncated: bool,
    json: bool,
}

impl BodyCapture {
    /// For the request body of `request` with its `Content-Type`.
    pub fn request(masker: &Masker, request: &RequestInfo, content_type: Option<&str>) -> Self {
        let json = content_type.is_none_or(is_json_like);
        let mut capture = Self::new(masker, json);
        if let Some(target) = masker.target(request).filter(|t| t.is_json()) {
            if json {
                capture.mask = masker.json_response(target, false);
            } else {
                capture.refused = Some(format!(
                    "a {} body of {:?} is masked and cannot be read to mask it",
                    request.resource,
                    content_type.unwrap_or_default()
                ));
            }
        }
        capture
    }

    /// For a response body as the agent received it.
    pub fn response(masker: &Masker, content_type: Option<&str>) -> Self {
        Self::new(masker, content_type.is_none_or(is_json_like))
    }

    fn new(masker: &Masker, json: bool) -> Self {
        Self {
            masker: masker.clone(),
            mask: None,
            refused: None,
            kept: Vec::new(),
            scratch: Vec::new(),
            bytes: 0,
            lines: 0,
            truncated: false,
            json,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        self.lines += memchr::memchr_iter(b'\n', chunk).count() as u64;
        if self.refused.is_some() || self.truncated {
            return;
        }
        let data = match &mut self.mask {
            None => chunk,
            Some(mask) => {
                self.scratch.clear();
                if let Err(error) = mask.push(chunk, &mut self.scratch) {
                    self.refused = Some(error.to_string());
                    return;
                }
                &self.scratch[..]
            }
        };
        keep(&mut self.kept, &mut self.truncated, data);
    }

    /// The recorded value; `None` for an empty body.
    pub fn finish(mut self) -> Option<Value> {
        if let Some(mask) = &mut self.mask {
            self.scratch.clear();
            match mask.finish(&mut self.scratch) {
                Ok(()) => keep(&mut self.kept, &mut self.truncated, &self.scratch),
                Err(error) if !self.truncated => self.refused = Some(error.to_string()),
                Err(_) => {}
            }
        }
        if let Some(reason) = self.refused {
            return Some(json!({
                "kind": "chaperone.dev/Unrecorded",
                "bytes": self.bytes,
                "reason": reason,
            }));
        }
        if self.bytes == 0 {
            return None;
        }
        if self.json
            && !self.truncated
            && let Ok(value) = serde_json::from_slice::<Value>(&self.kept)
            && value.is_object()
        {
            return Some(value);
        }
        let text = String::from_utf8_lossy(&self.kept);
        let prefix = match self.masker.mask_text(text.as_bytes()) {
            Some(masked) => String::from_utf8_lossy(&masked).into_owned(),
            None => text.into_owned(),
        };
        Some(json!({
            "kind": "chaperone.dev/BodyPrefix",
            "bytes": self.bytes,
            "lines": self.lines,
            "truncated": self.truncated,
            "prefix": prefix,
        }))
    }
}

/// Where a captured body lands when its stream ends.
pub type CaptureSlot = Arc<Mutex<Option<Value>>>;

impl BodyCapture {
    /// A body observer that captures into `slot` (the request body, which
    /// ends before the exchange is recorded).
    pub fn into_observer(self, slot: CaptureSlot) -> Box<dyn BodyObserver> {
        Box::new(CaptureObserver {
            capture: Some(self),
            slot,
        })
    }
}

struct CaptureObserver {
    capture: Option<BodyCapture>,
    slot: CaptureSlot,
}

impl BodyObserver for CaptureObserver {
    fn on_data(&mut self, chunk: &[u8]) {
        if let Some(capture) = &mut self.capture {
            capture.push(chunk);
        }
    }

    fn on_end(&mut self, _result: Result<(), CutShort>) {
        if let Some(capture) = self.capture.take() {
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = capture.finish();
        }
    }
}

fn keep(kept: &mut Vec<u8>, truncated: &mut bool, data: &[u8]) {
    let room = MAX_BODY - kept.len();
    if data.len() > room {
        kept.extend_from_slice(&data[..room]);
        *truncated = true;
    } else {
        kept.extend_from_slice(data);
    }
}

fn is_json_like(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json") || media.to_ascii_lowercase().ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskRules;

    fn masker() -> Masker {
        Masker::new(&MaskRules::default()).unwrap()
    }

    fn request(method: &str, path: &str) -> RequestInfo {
        RequestInfo::parse(&method.parse().unwrap(), path, None)
    }

    #[test]
    fn a_secret_request_body_is_recorded_masked() {
        let masker = masker();
        let create = request("POST", "/api/v1/namespaces/a/secrets");
        let mut capture = BodyCapture::request(&masker, &create, Some("application/json"));
        let body =
            br#"{"kind":"Secret","metadata":{"name":"s"},"data":{"password":"aHVudGVyMg=="}}"#;
        for chunk in body.chunks(7) {
            capture.push(chunk);
        }
        let value = capture.finish().unwrap();
        assert_eq!(value["metadata"]["name"], "s");
        assert_ne!(value["data"]["password"], "aHVudGVyMg==");

        let mut yaml = BodyCapture::request(&masker, &create, Some("application/apply-patch+yaml"));
        yaml.push(b"data:\n  password: aHVudGVyMg==\n");
        let value = yaml.finish().unwrap();
        assert_eq!(value["kind"], "chaperone.dev/Unrecorded");
        assert!(!value.to_string().contains("aHVudGVyMg=="));
    }

    #[test]
    fn large_and_streamed_bodies_keep_a_masked_prefix() {
        let masker = masker();
        let mut capture = BodyCapture::response(&masker, Some("text/plain"));
        capture.push(b"password=hunter2\n");
        for _ in 0..10_000 {
            capture.push(b"a log line that goes on and on\n");
        }
        let value = capture.finish().unwrap();
        assert_eq!(value["kind"], "chaperone.dev/BodyPrefix");
        assert_eq!(value["truncated"], true);
        assert_eq!(value["lines"], 10_001);
        let prefix = value["prefix"].as_str().unwrap();
        assert!(prefix.len() < MAX_BODY + 100, "bounded: {}", prefix.len());
        assert!(!prefix.contains("hunter2"), "{}", &prefix[..60]);
        assert!(BodyCapture::response(&masker, None).finish().is_none());
    }
}
