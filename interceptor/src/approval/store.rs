//! Where approvals are kept: `ApprovalRequest` objects in the cluster
//! (watched), or JSON files in a local directory (polled). Both feed the
//! same cache in [`super::Approvals`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use time::OffsetDateTime;

use super::{ApprovalRequest, Approvals, State, format_time};

/// An approval that could not be written, read or decided on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create ApprovalRequest {name} in namespace {namespace}: {source} \
         (is the approvalrequests.chaperone.dev CRD installed, and may chaperone-node create them?)"
    )]
    Create {
        name: String,
        namespace: String,
        source: kube::Error,
    },
    #[error("cannot update ApprovalRequest {name}: {source}")]
    Update { name: String, source: kube::Error },
    #[error("the SubjectAccessReview for {user} failed: {source}")]
    Review { user: String, source: kube::Error },
    #[error(
        "{user} may not {verb} approvalrequests.chaperone.dev in namespace {namespace} \
         (bind the ClusterRole chaperone-approver)"
    )]
    Forbidden {
        user: String,
        verb: String,
        namespace: String,
    },
    #[error("{0:?} is not an approval id")]
    BadId(String),
    #[error("{0}")]
    Encode(serde_json::Error),
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no approval {name} in {}", .dir.display())]
    NotFound { name: String, dir: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{name}: {source}")]
    Patch {
        name: String,
        source: serde_json::Error,
    },
    #[error("{}: {source}", .dir.display())]
    List {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The approvals' home.
pub enum Backend {
    /// `ApprovalRequest` objects in `namespace`.
    Cluster {
        client: kube::Client,
        namespace: String,
    },
    /// One JSON file per approval.
    Local(LocalStore),
}

impl Backend {
    pub fn namespace(&self) -> &str {
        match self {
            Backend::Cluster { namespace, .. } => namespace,
            Backend::Local(local) => &local.namespace,
        }
    }

    fn api(client: &kube::Client, namespace: &str) -> Api<ApprovalRequest> {
        Api::namespaced(client.clone(), namespace)
    }

    pub(super) async fn create(&self, object: &ApprovalRequest) -> Result<(), StoreError> {
        match self {
            Backend::Cluster { client, namespace } => {
                let api = Self::api(client, namespace);
                api.create(&PostParams::default(), object)
                    .await
                    .map_err(|source| StoreError::Create {
                        name: object.name().to_owned(),
                        namespace: namespace.clone(),
                        source,
                    })?;
                // The status subresource ignores status on create.
                let status = json!({"status": {"state": "Pending"}});
                if let Err(error) = api
                    .patch_status(
                        object.name(),
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await
                {
                    tracing::debug!(%error, "could not set the new approval's state");
                }
                Ok(())
            }
            Backend::Local(local) => local.write(object),
        }
    }

    async fn patch_status(
        &self,
        object: &ApprovalRequest,
        status: serde_json::Value,
    ) -> Result<(), StoreError> {
        match self {
            Backend::Cluster { client, namespace } => Self::api(client, namespace)
                .patch_status(
                    object.name(),
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "status": status })),
                )
                .await
                .map(drop)
                .map_err(|source| StoreError::Update {
                    name: object.name().to_owned(),
                    source,
                }),
            Backend::Local(local) => local.patch_status(object.name(), &status),
        }
    }

    /// Marks an approval used, on the version that was seen approved: `Ok(false)`
    /// when it changed since (another node used it first).
    pub(super) async fn mark_used(
        &self,
        object: &ApprovalRequest,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let status = json!({"usedAt": format_time(now)});
        match self {
            Backend::Cluster { client, namespace } => {
                let patch = json!({
                    "metadata": {"resourceVersion": object.metadata.resource_version},
                    "status": status,
                });
                match Self::api(client, namespace)
                    .patch_status(
                        object.name(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                    Err(source) => Err(StoreError::Update {
                        name: object.name().to_owned(),
                        source,
                    }),
                }
            }
            Backend::Local(local) => local.patch_status(object.name(), &status).map(|()| true),
        }
    }

    pub(super) async fn expire(&self, object: &ApprovalRequest) -> Result<(), StoreError> {
        self.patch_status(object, json!({"state": State::Expired}))
            .await
    }

    /// Puts a refused decision back to `Pending`, saying why.
    pub(super) async fn refuse_decision(
        &self,
        object: &ApprovalRequest,
        why: &str,
    ) -> Result<(), StoreError> {
        self.patch_status(
            object,
            json!({
                "state": State::Pending,
                "decidedBy": null,
                "decidedByGroups": null,
                "decidedAt": null,
                "grant": null,
                "grantExpiresAt": null,
                "grantScope": null,
                "refusedDecision": why,
            }),
        )
        .await
    }

    /// Whether `user` may `verb` (`approve`/`deny`) this approval.
    pub(super) async fn may_decide(
        &self,
        user: &str,
        groups: &[String],
        verb: &str,
        object: &ApprovalRequest,
    ) -> Result<(), StoreError> {
        match self {
            // The directory's permissions decide who can write decisions.
            Backend::Local(_) => Ok(()),
            Backend::Cluster { client, namespace } => {
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user.to_owned()),
                        groups: (!groups.is_empty()).then(|| groups.to_vec()),
                        resource_attributes: Some(ResourceAttributes {
                            group: Some("chaperone.dev".into()),
                            resource: Some("approvalrequests".into()),
                            verb: Some(verb.into()),
                            namespace: Some(namespace.clone()),
                            name: Some(object.name().to_owned()),
                            ..ResourceAttributes::default()
                        }),
                        ..SubjectAccessReviewSpec::default()
                    },
                    ..SubjectAccessReview::default()
                };
                let api: Api<SubjectAccessReview> = Api::all(client.clone());
                let answer =
                    api.create(&PostParams::default(), &review)
                        .await
                        .map_err(|source| StoreError::Review {
                            user: user.to_owned(),
                            source,
                        })?;
                if answer.status.as_ref().is_some_and(|s| s.allowed) {
                    Ok(())
                } else {
                    Err(StoreError::Forbidden {
                        user: user.to_owned(),
                        verb: verb.to_owned(),
                        namespace: namespace.clone(),
                    })
                }
            }
        }
    }
}

/// Starts feeding the cache from the backend.
pub(super) fn spawn_feed(approvals: Arc<Approvals>) {
    let weak = Arc::downgrade(&approvals);
    match &approvals.backend {
        Backend::Cluster { client, namespace } => {
            let api = Backend::api(client, namespace);
            tokio::spawn(async move {
                let mut relist: Option<Vec<ApprovalRequest>> = None;
                let mut failures = crate::logs::Throttle::default();
                let mut events = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(event) = events.next().await {
                    let Some(approvals) = weak.upgrade() else {
                        return;
                    };
                    // `Init` starts every retry's list: only what the list
                    // brings shows the watch works again.
                    if event
                        .as_ref()
                        .is_ok_and(|e| !matches!(e, watcher::Event::Init))
                    {
                        failures.reset();
                    }
                    match event {
                        Ok(watcher::Event::Init) => relist = Some(Vec::new()),
                        Ok(watcher::Event::InitApply(object)) => {
                            relist.get_or_insert_with(Vec::new).push(object)
                        }
                        Ok(watcher::Event::InitDone) => {
                            approvals.replace_all(relist.take().unwrap_or_default())
                        }
                        Ok(watcher::Event::Apply(object)) => approvals.upsert(object),
                        Ok(watcher::Event::Delete(object)) => approvals.remove(object.name()),
                        Err(error) => {
                            if let Some(left_out) = failures.allow() {
                                tracing::warn!(
                                    repeated = left_out,
                                    "{}; retrying",
                                    crate::logs::watch_error(
                                        &error,
                                        "ApprovalRequest objects (approvalrequests.chaperone.dev)"
                                    )
                                )
                            }
                        }
                    }
                }
            });
        }
        Backend::Local(local) => {
            let dir = local.dir.clone();
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    let Some(approvals) = weak.upgrade() else {
                        return;
                    };
                    match LocalStore::read_dir(&dir) {
                        Ok(objects) => {
                            if last.as_ref() != Some(&objects) {
                                approvals.replace_all(objects.clone());
                                last = Some(objects);
                            }
                        }
                        Err(error) => {
                            tracing::warn!(dir = %dir.display(), %error, "reading local approvals")
                        }
                    }
                    drop(approvals);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
    }
}

/// Local mode: `DIR/<id>.json`, written atomically (temp file + rename).
#[derive(Clone, Debug)]
pub struct LocalStore {
    pub dir: PathBuf,
    /// The namespace the objects say they are in (for a uniform shape).
    pub namespace: String,
}

impl LocalStore {
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(LocalStore {
            dir,
            namespace: "local".into(),
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf, StoreError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(StoreError::BadId(name.to_owned()));
        }
        Ok(self.dir.join(format!("{name}.json")))
    }

    pub fn write(&self, object: &ApprovalRequest) -> Result<(), StoreError> {
        let path = self.path(object.name())?;
        let tmp = path.with_extension("json.tmp");
        let mut object = object.clone();
        object.metadata.namespace = Some(self.namespace.clone());
        if object.metadata.creation_timestamp.is_none() {
            object.metadata.creation_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff_now()),
            );
        }
        let text = serde_json::to_vec_pretty(&object).map_err(StoreError::Encode)?;
        match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            Ok(()) => Ok(()),
            Err(source) => Err(StoreError::Write { path, source }),
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        self.path(name).is_ok_and(|path| path.exists())
    }

    pub fn read(&self, name: &str) -> Result<ApprovalRequest, StoreError> {
        let path = self.path(name)?;
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    name: name.to_owned(),
                    dir: self.dir.clone(),
                });
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        serde_json::from_slice(&text).map_err(|source| StoreError::Parse { path, source })
    }

    /// Merges `status` into the object's status (JSON merge patch).
    pub fn patch_status(&self, name: &str, status: &serde_json::Value) -> Result<(), StoreError> {
        let object = self.read(name)?;
        let mut value = serde_json::to_value(&object).map_err(StoreError::Encode)?;
        merge(
            value
                .as_object_mut()
                .expect("an object")
                .entry("status")
                .or_insert_with(|| json!({})),
            status,
        );
        let object: ApprovalRequest =
            serde_json::from_value(value).map_err(|source| StoreError::Patch {
                name: name.to_owned(),
                source,
            })?;
        self.write(&object)
    }

    pub fn read_dir(dir: &Path) -> std::io::Result<Vec<ApprovalRequest>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(text) = std::fs::read(&path)
                && let Ok(object) = serde_json::from_slice::<ApprovalRequest>(&text)
            {
                out.push(object);
            }
        }
        out.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(out)
    }

    pub fn list(&self) -> Result<Vec<ApprovalRequest>, StoreError> {
        Self::read_dir(&self.dir).map_err(|source| StoreError::List {
            dir: self.dir.clone(),
            source,
        })
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// RFC 7386 JSON merge patch.
pub(super) fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match patch {
        serde_json::Value::Object(patch) => {
            if !target.is_object() {
                *target = json!({});
            }
            let target = target.as_object_mut().expect("made an object");
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(json!(null)), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}
