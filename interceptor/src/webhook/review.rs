//! The `admission.k8s.io/v1` `AdmissionReview` as the webhook reads and
//! answers it, and the JSON Patch operations it answers with.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ADMISSION_V1;
use crate::approval::attest::UserInfo;

/// An `admission.k8s.io/v1` `AdmissionReview`, request or response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AdmissionRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<AdmissionResponse>,
}

/// The fields of an admission request the webhook reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<GroupVersionResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_object: Option<Value>,
    /// Who the API server authenticated as the writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_info: Option<UserInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub resource: String,
}

/// The webhook's answer. `patch` is the base64 of a JSON Patch (RFC 6902).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AdmissionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The `status` of a denied review, as the API server shows it to the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionStatus {
    pub code: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub message: String,
}

impl AdmissionResponse {
    pub(super) fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            status: None,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
        }
    }

    pub(super) fn deny(uid: &str, code: u16, reason: &str, message: String) -> Self {
        Self {
            allowed: false,
            status: Some(AdmissionStatus {
                code,
                reason: reason.to_owned(),
                message,
            }),
            ..Self::allow(uid)
        }
    }

    pub(super) fn with_patch(mut self, ops: &[PatchOp]) -> Self {
        let json = serde_json::to_vec(ops).expect("a JSON Patch always serializes");
        self.patch_type = Some("JSONPatch".to_owned());
        self.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
        self
    }

    /// The decoded JSON Patch, if the response carries one.
    pub fn decoded_patch(&self) -> Option<Result<Value, BadPatch>> {
        let patch = self.patch.as_deref()?;
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(patch)
                .map_err(BadPatch::NotBase64)
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(BadPatch::NotJson)),
        )
    }

    pub(super) fn into_review(self) -> AdmissionReview {
        AdmissionReview {
            api_version: ADMISSION_V1.to_owned(),
            kind: "AdmissionReview".to_owned(),
            request: None,
            response: Some(self),
        }
    }
}

/// One JSON Patch operation; only the two the webhook emits.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum PatchOp {
    Add { path: String, value: Value },
    Replace { path: String, value: Value },
}

/// An `AdmissionResponse` patch that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum BadPatch {
    #[error("patch is not base64: {0}")]
    NotBase64(base64::DecodeError),
    #[error("patch is not JSON: {0}")]
    NotJson(serde_json::Error),
}
