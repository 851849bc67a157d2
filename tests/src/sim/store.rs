//! The generic object store: every resource is JSON kept in field order, with
//! a global resourceVersion counter, a bounded event history for watches that
//! resume, and a broadcast channel that fans events out to watchers.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use base64::Engine;
use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, broadcast};

use super::{
    fields,
    patch::{self, PatchType},
    resources::{self, Registry, ResourceDef},
    selectors::{FieldSelector, LabelSelector},
    status::ApiError,
};

/// How many events the store keeps for watches that resume from a
/// resourceVersion; older ones are "compacted" (410 Gone).
const HISTORY: usize = 10_000;
/// Where the resourceVersion counter starts; anything below is compacted.
const FIRST_RESOURCE_VERSION: u64 = 100;
/// Pod annotation whose lines are the pod's first container's log.
pub const LOG_ANNOTATION: &str = "sim.chaperone.dev/log";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it.
#[derive(Debug)]
pub struct WatchEvent {
    pub resource_version: u64,
    pub kind: EventType,
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub object: Value,
    /// For MODIFIED: the object before the change (watchers with selectors
    /// turn a change into ADDED or DELETED when it enters or leaves them).
    pub previous: Option<Value>,
}

/// Options of a write (query parameters of the request).
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// `dryRun=All`: validate and answer, persist nothing.
    pub dry_run: bool,
    /// `fieldManager`, or the one derived from the User-Agent.
    pub field_manager: Option<String>,
    /// `force` (server-side apply).
    pub force: bool,
    /// The subresource written (`status`), if any.
    pub subresource: Option<String>,
    /// A delete's `propagationPolicy` (`Foreground`, `Background`,
    /// `Orphan`), from its DeleteOptions or the query.
    pub propagation: Option<String>,
}

/// One log line of a container.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub timestamp: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    group: String,
    resource: String,
    namespace: String,
    name: String,
}

struct Inner {
    resource_version: u64,
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<WatchEvent>>,
    registry: Registry,
    /// (namespace, pod, container) -> lines.
    logs: HashMap<(String, String, String), Vec<LogLine>>,
}

/// The simulator's state. Cheap to share (`Arc`); all methods are sync and
/// hold a lock only briefly.
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// Woken whenever a log line is appended or a pod is deleted.
    pub(crate) log_changed: Notify,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// RFC 3339 (seconds, UTC), as Kubernetes writes timestamps.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// RFC 3339 with nanoseconds, as the kubelet timestamps log lines.
fn now_rfc3339_nanos() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    )
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    meta(obj)
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj.as_object_mut()
            .expect("objects are JSON objects")
            .insert("metadata".into(), json!({}));
    }
    obj.get_mut("metadata")
        .and_then(Value::as_object_mut)
        .expect("metadata is an object")
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn validate_name(def: &ResourceDef, name: &str) -> Result<(), ApiError> {
    let (ok, msg) = if def.plural == "namespaces" {
        (is_dns_label(name), LABEL_MSG)
    } else {
        (is_dns_subdomain(name), SUBDOMAIN_MSG)
    };
    if name.is_empty() {
        return Err(ApiError::invalid(
            &def.group,
            &def.kind,
            name,
            "metadata.name",
            "FieldValueRequired",
            "Required value: name or generateName is required",
        ));
    }
    if !ok {
        return Err(ApiError::invalid(
            &def.group,
            &def.kind,
            name,
            "metadata.name",
            "FieldValueInvalid",
            &format!("Invalid value: \"{name}\": {msg}"),
        ));
    }
    Ok(())
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Puts metadata fields in the API server's order, then the top-level fields
/// (`kind`, `apiVersion`, `metadata`, then per-kind order).
fn canonical(def: &ResourceDef, obj: Value) -> Value {
    let Value::Object(mut m) = obj else {
        return obj;
    };
    if let Some(Value::Object(meta)) = m.get_mut("metadata") {
        const ORDER: &[&str] = &[
            "name",
            "generateName",
            "namespace",
            "selfLink",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "labels",
            "annotations",
            "ownerReferences",
            "finalizers",
            "managedFields",
        ];
        let mut sorted = Map::new();
        for k in ORDER {
            if let Some(v) = meta.shift_remove(*k) {
                sorted.insert((*k).to_string(), v);
            }
        }
        sorted.append(meta);
        *meta = sorted;
    }
    let tail: &[&str] = match (def.group.as_str(), def.kind.as_str()) {
        ("", "Secret") => &["immutable", "data", "type"],
        ("", "ConfigMap") => &["immutable", "data", "binaryData"],
        _ => &["spec", "status"],
    };
    let mut out = Map::new();
    for k in ["kind", "apiVersion", "metadata"].iter().chain(tail) {
        if let Some(v) = m.shift_remove(*k) {
            out.insert((*k).to_string(), v);
        }
    }
    out.append(&mut m);
    Value::Object(out)
}

/// Deterministic UUID-shaped id for things the simulator names but does not
/// store (service accounts that were never created).
pub fn stable_uid(seed: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b).to_string()
}

impl Store {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(HISTORY);
        let store = Self {
            inner: Mutex::new(Inner {
                resource_version: FIRST_RESOURCE_VERSION,
                compacted: FIRST_RESOURCE_VERSION,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                registry: Registry::default(),
                logs: HashMap::new(),
            }),
            events,
            log_changed: Notify::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            store
                .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .expect("seed namespaces");
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops serving a built-in resource (one a real server of the claimed
    /// version does not have).
    pub fn remove_builtin(&self, group: &str, plural: &str) {
        self.lock().registry.remove_builtin(group, plural);
    }

    /// Serves a built-in resource at `version` (the one a real server of
    /// the claimed version serves) instead of `v1`.
    pub fn set_builtin_version(&self, group: &str, plural: &str, version: &str) {
        self.lock()
            .registry
            .set_builtin_version(group, plural, version);
    }

    /// A snapshot of the resources served right now.
    pub fn registry(&self) -> Registry {
        self.lock().registry.clone()
    }

    /// The current resourceVersion (the last one handed out).
    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    /// The oldest resourceVersion a watch may still resume from.
    pub fn compacted_resource_version(&self) -> u64 {
        self.lock().compacted
    }

    /// Forgets all event history, as an etcd compaction does: watches from any
    /// resourceVersion before now get `410 Gone`.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.compacted = inner.resource_version;
    }

    fn resolve(&self, resource: &str) -> Result<ResourceDef, ApiError> {
        self.lock()
            .registry
            .lookup(resource)
            .cloned()
            .ok_or_else(ApiError::no_such_path)
    }

    fn resolve_obj(&self, obj: &Value) -> Result<ResourceDef, ApiError> {
        let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        self.lock()
            .registry
            .for_kind(av, kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "no resource is served for apiVersion {av:?} kind {kind:?}; create its CustomResourceDefinition first"
                ))
            })
    }

    // === convenience API for tests (resource names as kubectl takes them) ===

    /// Creates an object; its resource comes from `apiVersion` and `kind`.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let def = self.resolve_obj(&obj)?;
        let ns = meta_str(&obj, "namespace").to_string();
        let ns = if def.namespaced && ns.is_empty() {
            "default".to_string()
        } else {
            ns
        };
        self.create_in(&def, &ns, obj, &WriteOptions::default())
    }

    /// Replaces an object (no resourceVersion precondition unless the object carries one).
    pub fn update(&self, obj: Value) -> Result<Value, ApiError> {
        let def = self.resolve_obj(&obj)?;
        let ns = meta_str(&obj, "namespace").to_string();
        let name = meta_str(&obj, "name").to_string();
        self.update_in(&def, &ns, &name, obj, &WriteOptions::default())
    }

    /// An object by resource (`pods`, `deployments.apps`, `po`), namespace and name.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let def = self.resolve(resource).ok()?;
        self.get_in(&def, namespace.unwrap_or(""), name).ok()
    }

    /// All objects of a resource (in one namespace, or all).
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        match self.resolve(resource) {
            Ok(def) => {
                self.list_in(
                    &def,
                    namespace,
                    &LabelSelector::default(),
                    &FieldSelector::default(),
                )
                .0
            }
            Err(_) => Vec::new(),
        }
    }

    /// Deletes an object; returns it.
    pub fn delete(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let def = self.resolve(resource)?;
        self.delete_in(
            &def,
            namespace.unwrap_or(""),
            name,
            &WriteOptions::default(),
            None,
        )
    }

    /// Appends a log line to a pod's container (`None`: the first container).
    pub fn append_log(
        &self,
        namespace: &str,
        pod: &str,
        container: Option<&str>,
        line: &str,
    ) -> Result<(), ApiError> {
        let pod_obj = self
            .get("pods", Some(namespace), pod)
            .ok_or_else(|| ApiError::not_found("", "pods", pod))?;
        let container = match container {
            Some(c) => c.to_string(),
            None => first_container(&pod_obj).unwrap_or_default(),
        };
        {
            let mut inner = self.lock();
            inner
                .logs
                .entry((namespace.into(), pod.into(), container))
                .or_default()
                .push(LogLine {
                    timestamp: now_rfc3339_nanos(),
                    text: line.trim_end_matches('\n').to_string(),
                });
        }
        self.log_changed.notify_waiters();
        Ok(())
    }

    /// The log lines of a container, from `skip` on.
    pub fn log_lines(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        skip: usize,
    ) -> Vec<LogLine> {
        self.lock()
            .logs
            .get(&(namespace.into(), pod.into(), container.into()))
            .map(|l| l.iter().skip(skip).cloned().collect())
            .unwrap_or_default()
    }

    // === the API server's operations, on a resolved resource ===

    pub fn get_in(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = key(def, namespace, name);
        self.lock()
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))
    }

    /// Objects of `def` (in `namespace`, or all) matching the selectors, and
    /// the list's resourceVersion.
    pub fn list_in(
        &self,
        def: &ResourceDef,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|(k, _)| k.group == def.group && k.resource == def.plural)
            .filter(|(k, _)| namespace.is_none_or(|ns| ns.is_empty() || k.namespace == ns))
            .filter(|(_, o)| labels.matches(o) && fields.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, inner.resource_version)
    }

    /// Starts a watch: the events to send first, and the live feed. With
    /// Open watch subscriptions (live receivers of the event channel).
    pub fn watchers(&self) -> usize {
        self.events.receiver_count()
    }

    /// `from` = `None` the first events are ADDED for every current object;
    /// otherwise they are the history after `from` (410 if compacted).
    #[allow(clippy::type_complexity)]
    pub fn watch_in(
        &self,
        def: &ResourceDef,
        from: Option<u64>,
    ) -> Result<
        (
            Vec<Arc<WatchEvent>>,
            broadcast::Receiver<Arc<WatchEvent>>,
            u64,
        ),
        ApiError,
    > {
        let inner = self.lock();
        let rx = self.events.subscribe();
        let current = inner.resource_version;
        let first = match from {
            None => inner
                .objects
                .iter()
                .filter(|(k, _)| k.group == def.group && k.resource == def.plural)
                .map(|(k, o)| {
                    Arc::new(WatchEvent {
                        resource_version: rv_of(o),
                        kind: EventType::Added,
                        group: k.group.clone(),
                        resource: k.resource.clone(),
                        namespace: k.namespace.clone(),
                        object: o.clone(),
                        previous: None,
                    })
                })
                .collect(),
            Some(rv) if rv < inner.compacted => return Err(ApiError::expired(rv, current)),
            Some(rv) => inner
                .history
                .iter()
                .filter(|e| {
                    e.resource_version > rv && e.group == def.group && e.resource == def.plural
                })
                .cloned()
                .collect(),
        };
        Ok((first, rx, current))
    }

    fn next_rv(inner: &mut Inner) -> u64 {
        inner.resource_version += 1;
        inner.resource_version
    }

    fn emit(
        &self,
        inner: &mut Inner,
        kind: EventType,
        def: &ResourceDef,
        obj: &Value,
        previous: Option<&Value>,
    ) {
        let event = Arc::new(WatchEvent {
            previous: previous.cloned(),
            resource_version: rv_of(obj),
            kind,
            group: def.group.clone(),
            resource: def.plural.clone(),
            namespace: meta_str(obj, "namespace").to_string(),
            object: obj.clone(),
        });
        inner.history.push_back(event.clone());
        while inner.history.len() > HISTORY {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.resource_version;
            }
        }
        // No receivers is fine.
        let _ = self.events.send(event);
    }

    pub fn create_in(
        &self,
        def: &ResourceDef,
        namespace: &str,
        mut obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        {
            let m = obj.as_object_mut().expect("object");
            m.entry("kind").or_insert_with(|| def.kind.clone().into());
            m.entry("apiVersion")
                .or_insert_with(|| def.api_version().into());
        }
        let meta = meta_mut(&mut obj);
        if def.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), namespace.into());
                }
            }
        } else {
            meta.shift_remove("namespace");
        }
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty()
            && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
        {
            name = format!("{prefix}{}", random_suffix());
            meta.insert("name".into(), name.clone().into());
        }
        validate_name(def, &name)?;
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            meta.shift_remove(k);
        }
        let crd_defs = if def.plural == "customresourcedefinitions" {
            Some(resources::from_crd(&obj).map_err(|why| {
                ApiError::invalid(
                    &def.group,
                    &def.kind,
                    &name,
                    "spec",
                    "FieldValueInvalid",
                    &why,
                )
            })?)
        } else {
            None
        };
        let now = now_rfc3339();
        let mut inner = self.lock();
        if def.namespaced {
            let ns_key = Key {
                group: String::new(),
                resource: "namespaces".into(),
                namespace: String::new(),
                name: namespace.to_string(),
            };
            if !inner.objects.contains_key(&ns_key) {
                return Err(ApiError::not_found("", "namespaces", namespace));
            }
        }
        let k = key(def, namespace, &name);
        if inner.objects.contains_key(&k) {
            return Err(ApiError::already_exists(&def.group, &def.plural, &name));
        }
        defaults_on_create(def, &mut obj, &now);
        let meta = meta_mut(&mut obj);
        meta.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
        if !def.group.is_empty() && obj.get("spec").is_some() {
            meta_mut(&mut obj).insert("generation".into(), 1.into());
        }
        meta_mut(&mut obj).insert("creationTimestamp".into(), now.clone().into());
        if let Some(manager) = &opts.field_manager {
            set_managed(&mut obj, manager, "Update", &def.api_version(), &now, None);
        }
        if opts.dry_run {
            return Ok(canonical(def, obj));
        }
        let rv = Self::next_rv(&mut inner);
        meta_mut(&mut obj).insert("resourceVersion".into(), rv.to_string().into());
        let obj = canonical(def, obj);
        inner.objects.insert(k, obj.clone());
        if let Some(defs) = crd_defs {
            inner.registry.add_crd(&name, defs);
        }
        self.emit(&mut inner, EventType::Added, def, &obj, None);
        if def.group.is_empty()
            && def.plural == "pods"
            && let (Some(lines), Some(container)) = (
                obj.pointer("/metadata/annotations")
                    .and_then(|a| a.get(LOG_ANNOTATION))
                    .and_then(Value::as_str),
                first_container(&obj),
            )
        {
            let ts = now_rfc3339_nanos();
            inner.logs.insert(
                (namespace.into(), name.clone(), container),
                lines
                    .lines()
                    .map(|l| LogLine {
                        timestamp: ts.clone(),
                        text: l.to_string(),
                    })
                    .collect(),
            );
        }
        Ok(obj)
    }

    /// Replaces an object. A `metadata.resourceVersion` in `obj` is a
    /// precondition (409 Conflict when stale).
    pub fn update_in(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        self.modify(def, namespace, name, opts, |old| {
            let new = obj;
            if !new.is_object() {
                return Err(ApiError::bad_request("the request body must be a JSON object"));
            }
            let body_name = meta_str(&new, "name");
            if !body_name.is_empty() && body_name != name {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            let wanted_rv = meta_str(&new, "resourceVersion").to_string();
            if !wanted_rv.is_empty() && wanted_rv != meta_str(old, "resourceVersion") {
                return Err(ApiError::conflict(
                    &def.group,
                    &def.plural,
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
            Ok(new)
        })
    }

    /// Applies a patch of the given type under the store lock.
    pub fn patch_in(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        patch_type: PatchType,
        body: &Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        self.modify(def, namespace, name, opts, |old| {
            let mut new = old.clone();
            match patch_type {
                PatchType::Json => patch::json_patch(&mut new, body).map_err(|e| {
                    ApiError::invalid(&def.group, &def.kind, name, "", "FieldValueInvalid", &e)
                })?,
                PatchType::Merge => patch::merge_patch(&mut new, body),
                PatchType::Strategic => {
                    if !def.builtin {
                        return Err(ApiError::unsupported_media_type(
                            "application/strategic-merge-patch+json (not supported for custom resources; use a merge patch)",
                        ));
                    }
                    patch::strategic_merge(&mut new, body).map_err(ApiError::bad_request)?
                }
                PatchType::Apply => unreachable!("server-side apply goes through apply_in"),
            }
            let wanted_rv = meta_str(body, "resourceVersion");
            if !wanted_rv.is_empty() && wanted_rv != meta_str(old, "resourceVersion") {
                return Err(ApiError::conflict(
                    &def.group,
                    &def.plural,
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
            Ok(new)
        })
    }

    /// The common read-modify-write of update and patch.
    fn modify(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        opts: &WriteOptions,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let k = key(def, namespace, name);
        let old = inner
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))?;
        let mut new = change(&old)?;
        split_status(def, &old, &mut new, opts.subresource.as_deref());
        self.finish_update(&mut inner, def, &k, &old, &mut new, opts, "Update", None)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_update(
        &self,
        inner: &mut Inner,
        def: &ResourceDef,
        k: &Key,
        old: &Value,
        new: &mut Value,
        opts: &WriteOptions,
        operation: &str,
        applied_fields: Option<&BTreeSet<fields::FieldPath>>,
    ) -> Result<Value, ApiError> {
        {
            let m = new.as_object_mut().expect("object");
            m.insert("kind".into(), def.kind.clone().into());
            m.insert("apiVersion".into(), def.api_version().into());
        }
        // Fields the server owns are carried over from the stored object.
        let old_meta = meta(old).cloned().unwrap_or_default();
        {
            let meta = meta_mut(new);
            // An update never sets, changes or removes a deletionTimestamp.
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match old_meta.get(f) {
                    Some(v) => {
                        meta.insert(f.into(), v.clone());
                    }
                    None => {
                        meta.shift_remove(f);
                    }
                }
            }
            meta.insert(
                "resourceVersion".into(),
                old_meta.get("resourceVersion").cloned().unwrap_or_default(),
            );
        }
        if def.kind == "Secret" && def.group.is_empty() {
            fold_string_data(new);
        }
        let mut new_c = canonical(def, new.clone());
        if strip_volatile(&new_c) == strip_volatile(old) && operation == "Update" {
            return Ok(old.clone());
        }
        if old.get("spec") != new_c.get("spec")
            && let Some(g) = old_meta.get("generation").and_then(Value::as_i64)
        {
            meta_mut(&mut new_c).insert("generation".into(), (g + 1).into());
        }
        let now = now_rfc3339();
        if let Some(manager) = &opts.field_manager {
            set_managed(
                &mut new_c,
                manager,
                operation,
                &def.api_version(),
                &now,
                applied_fields,
            );
        }
        if opts.dry_run {
            return Ok(new_c);
        }
        let rv = Self::next_rv(inner);
        meta_mut(&mut new_c).insert("resourceVersion".into(), rv.to_string().into());
        let new_c = canonical(def, new_c);
        if meta(&new_c).is_some_and(|m| m.contains_key("deletionTimestamp"))
            && finalizers(&new_c).is_empty()
        {
            // The last finalizer of an object being deleted is gone: the
            // object is (the update's answer is the object as it was last).
            inner.objects.remove(k);
            self.emit(inner, EventType::Deleted, def, &new_c, None);
            return Ok(new_c);
        }
        inner.objects.insert(k.clone(), new_c.clone());
        if def.plural == "customresourcedefinitions"
            && let Ok(defs) = resources::from_crd(&new_c)
        {
            inner.registry.add_crd(&k.name, defs);
        }
        self.emit(inner, EventType::Modified, def, &new_c, Some(old));
        Ok(new_c)
    }

    /// Server-side apply: creates the object, or merges the applied
    /// configuration into it; fields this manager applied before and no
    /// longer applies are removed; fields other managers own with a
    /// different value conflict unless `force`. Returns the object and
    /// whether it was created.
    pub fn apply_in(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        applied: Value,
        opts: &WriteOptions,
    ) -> Result<(Value, bool), ApiError> {
        let manager = opts.field_manager.clone().ok_or_else(|| {
            ApiError::bad_request(
                "PATCH, application/apply-patch+yaml requests require a fieldManager query parameter",
            )
        })?;
        if !applied.is_object() {
            return Err(ApiError::bad_request(
                "the applied configuration must be an object",
            ));
        }
        // An applied configuration owns map entries, not whole maps: no "."
        // for map fields (list items keep theirs), as the API server records it.
        let applied_set: BTreeSet<fields::FieldPath> = fields::field_set(&applied)
            .into_iter()
            .filter(|p| {
                !(p.last().is_some_and(|l| l == ".")
                    && p.len() >= 2
                    && p[p.len() - 2].starts_with("f:"))
            })
            .collect();
        let mut inner = self.lock();
        let k = key(def, namespace, name);
        let Some(old) = inner.objects.get(&k).cloned() else {
            drop(inner);
            let mut obj = applied;
            meta_mut(&mut obj).insert("name".into(), name.into());
            let created = self.create_in(
                def,
                namespace,
                obj,
                &WriteOptions {
                    field_manager: None,
                    ..opts.clone()
                },
            )?;
            // Record the apply as the owner of what it set.
            if opts.dry_run {
                let mut c = created;
                set_managed(
                    &mut c,
                    &manager,
                    "Apply",
                    &def.api_version(),
                    &now_rfc3339(),
                    Some(&applied_set),
                );
                return Ok((canonical(def, c), true));
            }
            let mut inner = self.lock();
            let mut c = inner.objects.get(&k).cloned().unwrap_or(created);
            set_managed(
                &mut c,
                &manager,
                "Apply",
                &def.api_version(),
                &now_rfc3339(),
                Some(&applied_set),
            );
            let c = canonical(def, c);
            inner.objects.insert(k, c.clone());
            return Ok((c, true));
        };
        let managed = managed_sets(&old);
        // Conflicts: leaves another manager owns whose live value differs.
        let mut conflicts = Vec::new();
        for leaf in fields::leaves(&applied_set) {
            for (other, op, set) in &managed {
                if other == &manager && op == "Apply" {
                    continue;
                }
                if set.contains(&leaf)
                    && fields::value_at(&old, &leaf) != fields::value_at(&applied, &leaf)
                {
                    conflicts.push((other.clone(), fields::display_path(&leaf)));
                }
            }
        }
        if !conflicts.is_empty() && !opts.force {
            return Err(ApiError::apply_conflict(&conflicts, &def.api_version()));
        }
        let mut new = old.clone();
        if let Some((_, _, previous)) = managed
            .iter()
            .find(|(m, op, _)| m == &manager && op == "Apply")
        {
            for leaf in fields::leaves(previous) {
                let owned_by_others = managed
                    .iter()
                    .any(|(m, _, s)| m != &manager && s.contains(&leaf));
                if !applied_set.contains(&leaf) && !owned_by_others {
                    fields::remove_at(&mut new, &leaf);
                }
            }
        }
        patch::apply_merge(&mut new, &applied);
        let same_owner = managed
            .iter()
            .any(|(m, op, set)| m == &manager && op == "Apply" && *set == applied_set);
        if same_owner && conflicts.is_empty() && strip_volatile(&new) == strip_volatile(&old) {
            // Nothing changes: no write, no new resourceVersion, no event.
            return Ok((old, false));
        }
        if opts.force && !conflicts.is_empty() {
            take_fields_from_others(&mut new, &manager, &applied_set);
        }
        let obj = self.finish_update(
            &mut inner,
            def,
            &k,
            &old,
            &mut new,
            opts,
            "Apply",
            Some(&applied_set),
        )?;
        Ok((obj, false))
    }

    /// Deletes an object (and, for a namespace, everything in it; for a CRD,
    /// all its custom resources). Preconditions: `uid` and `resourceVersion`.
    pub fn delete_in(
        &self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        opts: &WriteOptions,
        preconditions: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let k = key(def, namespace, name);
        let old = inner
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))?;
        if let Some(pre) = preconditions {
            for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                if let Some(want) = pre.get(field).and_then(Value::as_str) {
                    let have = meta_str(&old, field);
                    if want != have {
                        return Err(ApiError::conflict(
                            &def.group,
                            &def.plural,
                            name,
                            &format!(
                                "Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                            ),
                        ));
                    }
                }
            }
        }
        if opts.dry_run {
            return Ok(old);
        }
        // Finalizers (the propagation policy's own included) keep the
        // object, marked with a deletionTimestamp, until they are removed.
        let mut pending = finalizers(&old);
        let mut marks = |add: Option<&str>| {
            pending.retain(|f| f != "orphan" && f != "foregroundDeletion");
            if let Some(f) = add {
                pending.push(f.to_string());
            }
        };
        match opts.propagation.as_deref() {
            Some("Foreground") => marks(Some("foregroundDeletion")),
            Some("Orphan") => marks(Some("orphan")),
            Some("Background") => marks(None),
            _ => {}
        }
        if !pending.is_empty() {
            let mut obj = old.clone();
            let meta = meta_mut(&mut obj);
            if !meta.contains_key("deletionTimestamp") {
                meta.insert("deletionTimestamp".into(), now_rfc3339().into());
            }
            meta.insert("deletionGracePeriodSeconds".into(), 0.into());
            meta.insert("finalizers".into(), json!(pending));
            let rv = Self::next_rv(&mut inner);
            meta_mut(&mut obj).insert("resourceVersion".into(), rv.to_string().into());
            let obj = canonical(def, obj);
            inner.objects.insert(k, obj.clone());
            self.emit(&mut inner, EventType::Modified, def, &obj, Some(&old));
            return Ok(obj);
        }
        let mut removed = Vec::new();
        if def.group.is_empty() && def.plural == "namespaces" {
            let inside: Vec<Key> = inner
                .objects
                .keys()
                .filter(|c| c.namespace == name)
                .cloned()
                .collect();
            for c in inside {
                removed.push(c);
            }
        }
        if def.plural == "customresourcedefinitions" {
            let group = old
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or("");
            let plural = old
                .pointer("/spec/names/plural")
                .and_then(Value::as_str)
                .unwrap_or("");
            let inside: Vec<Key> = inner
                .objects
                .keys()
                .filter(|c| c.group == group && c.resource == plural)
                .cloned()
                .collect();
            removed.extend(inside);
        }
        removed.push(k);
        let mut last = old.clone();
        for rk in removed {
            let Some(mut obj) = inner.objects.remove(&rk) else {
                continue;
            };
            let rdef = inner
                .registry
                .all()
                .find(|d| d.group == rk.group && d.plural == rk.resource)
                .cloned();
            let rv = Self::next_rv(&mut inner);
            meta_mut(&mut obj).insert("resourceVersion".into(), rv.to_string().into());
            if let Some(rdef) = rdef {
                self.emit(&mut inner, EventType::Deleted, &rdef, &obj, None);
            }
            if rk.group.is_empty() && rk.resource == "pods" {
                inner
                    .logs
                    .retain(|(ns, pod, _), _| !(ns == &rk.namespace && pod == &rk.name));
            }
            last = obj;
        }
        if def.plural == "customresourcedefinitions" {
            inner.registry.remove_crd(name);
        }
        drop(inner);
        self.log_changed.notify_waiters();
        Ok(last)
    }
}

/// With a `status` subresource, writes to the object leave its status alone
/// and writes to `/status` change nothing else, as the API server does.
fn split_status(def: &ResourceDef, old: &Value, new: &mut Value, subresource: Option<&str>) {
    if def.subresource("status").is_none() {
        return;
    }
    if subresource == Some("status") {
        let status = new.get("status").cloned();
        *new = old.clone();
        if let Some(s) = status {
            new.as_object_mut()
                .expect("object")
                .insert("status".into(), s);
        }
    } else if subresource.is_none() {
        let m = new.as_object_mut().expect("object");
        match old.get("status") {
            Some(s) => {
                m.insert("status".into(), s.clone());
            }
            None => {
                m.shift_remove("status");
            }
        }
    }
}

fn key(def: &ResourceDef, namespace: &str, name: &str) -> Key {
    Key {
        group: def.group.clone(),
        resource: def.plural.clone(),
        namespace: if def.namespaced {
            namespace.to_string()
        } else {
            String::new()
        },
        name: name.to_string(),
    }
}

/// The resourceVersion of a stored object as a number.
pub fn rv_of(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion").parse().unwrap_or(0)
}

/// The first container of a pod spec.
pub fn first_container(pod: &Value) -> Option<String> {
    pod.pointer("/spec/containers/0/name")
        .and_then(Value::as_str)
        .map(String::from)
}

/// `metadata.finalizers`.
fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn strip_volatile(obj: &Value) -> Value {
    let mut o = obj.clone();
    let m = meta_mut(&mut o);
    m.shift_remove("resourceVersion");
    m.shift_remove("managedFields");
    o
}

/// Secret `stringData` is write-only: it is folded into `data` (base64).
fn fold_string_data(obj: &mut Value) {
    let Some(m) = obj.as_object_mut() else { return };
    if let Some(Value::Object(sd)) = m.shift_remove("stringData") {
        let data = m
            .entry("data")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("data is an object");
        for (k, v) in sd {
            let s = v.as_str().unwrap_or_default();
            data.insert(
                k,
                base64::engine::general_purpose::STANDARD.encode(s).into(),
            );
        }
    }
}

fn defaults_on_create(def: &ResourceDef, obj: &mut Value, now: &str) {
    let m = obj.as_object_mut().expect("object");
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "secrets") => {
            fold_string_data(obj);
            obj.as_object_mut()
                .expect("object")
                .entry("type")
                .or_insert_with(|| "Opaque".into());
        }
        ("", "namespaces") => {
            m.entry("spec")
                .or_insert_with(|| json!({"finalizers": ["kubernetes"]}));
            m.insert("status".into(), json!({"phase": "Active"}));
        }
        ("", "pods") => {
            let spec = m
                .entry("spec")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("spec is an object");
            spec.entry("serviceAccountName")
                .or_insert_with(|| "default".into());
            spec.entry("restartPolicy")
                .or_insert_with(|| "Always".into());
            let containers: Vec<Value> = spec
                .get("containers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let status = m
                .entry("status")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("status is an object");
            status.entry("phase").or_insert_with(|| "Running".into());
            status.entry("conditions").or_insert_with(|| {
                json!([
                    {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                    {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now}
                ])
            });
            status.entry("hostIP").or_insert_with(|| "10.0.0.1".into());
            status
                .entry("podIP")
                .or_insert_with(|| "10.244.0.10".into());
            let ip = status.get("podIP").cloned().unwrap_or_default();
            status
                .entry("podIPs")
                .or_insert_with(|| json!([{ "ip": ip }]));
            status.entry("startTime").or_insert_with(|| now.into());
            status.entry("containerStatuses").or_insert_with(|| {
                Value::Array(
                    containers
                        .iter()
                        .map(|c| {
                            json!({
                                "name": c.get("name").cloned().unwrap_or_default(),
                                "state": {"running": {"startedAt": now}},
                                "lastState": {},
                                "ready": true,
                                "restartCount": 0,
                                "image": c.get("image").cloned().unwrap_or_default(),
                                "imageID": "",
                                "started": true
                            })
                        })
                        .collect(),
                )
            });
            status
                .entry("qosClass")
                .or_insert_with(|| "BestEffort".into());
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let names = obj.pointer("/spec/names").cloned().unwrap_or_default();
            let stored: Vec<Value> = obj
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .map(|vs| {
                    vs.iter()
                        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                        .filter_map(|v| v.get("name").cloned())
                        .collect()
                })
                .unwrap_or_default();
            obj.as_object_mut().expect("object").insert(
                "status".into(),
                json!({
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "lastTransitionTime": now, "reason": "NoConflicts", "message": "no conflicts found"},
                        {"type": "Established", "status": "True", "lastTransitionTime": now, "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}
                    ],
                    "acceptedNames": names,
                    "storedVersions": stored
                }),
            );
        }
        _ => {}
    }
}

/// Each manager's (name, operation, field set) from `metadata.managedFields`.
fn managed_sets(obj: &Value) -> Vec<(String, String, BTreeSet<fields::FieldPath>)> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    (
                        e.get("manager")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        e.get("operation")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        e.get("fieldsV1")
                            .map(fields::from_fields_v1)
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Records `manager` as owner of the fields it set: for an Update, the fields
/// that changed (or, on create, all); for an Apply, the applied set.
fn set_managed(
    obj: &mut Value,
    manager: &str,
    operation: &str,
    api_version: &str,
    now: &str,
    applied: Option<&BTreeSet<fields::FieldPath>>,
) {
    let mut set = match applied {
        Some(s) => s.clone(),
        None => fields::field_set(obj),
    };
    let mut entries: Vec<Value> = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if applied.is_none() {
        let previous = entries
            .iter()
            .find(|e| {
                e.get("manager").and_then(Value::as_str) == Some(manager)
                    && e.get("operation").and_then(Value::as_str) == Some(operation)
            })
            .and_then(|e| e.get("fieldsV1"))
            .map(fields::from_fields_v1);
        if !entries.is_empty() && previous.is_none() {
            // A later manager owns only the fields that differ from what others own.
            let others: BTreeSet<fields::FieldPath> = entries
                .iter()
                .filter_map(|e| e.get("fieldsV1"))
                .flat_map(|f| fields::from_fields_v1(f).into_iter())
                .collect();
            let leaves: Vec<_> = fields::leaves(&set)
                .into_iter()
                .filter(|l| !others.contains(l))
                .collect();
            set = leaves
                .iter()
                .flat_map(|l| (1..=l.len()).map(move |n| l[..n].to_vec()))
                .collect();
            // Keep "." markers of maps this manager now touches.
            for p in fields::field_set(obj) {
                if p.last().is_some_and(|l| l == ".") && set.contains(&p[..p.len() - 1]) {
                    set.insert(p);
                }
            }
            if set.is_empty() {
                return;
            }
        }
    }
    let entry = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields::to_fields_v1(&set),
    });
    match entries.iter_mut().find(|e| {
        e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some(operation)
    }) {
        Some(e) => *e = entry,
        None => entries.push(entry),
    }
    meta_mut(obj).insert("managedFields".into(), Value::Array(entries));
}

/// After a forced apply, other managers give up the fields the applier took.
fn take_fields_from_others(obj: &mut Value, manager: &str, taken: &BTreeSet<fields::FieldPath>) {
    let Some(entries) = obj
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for e in entries.iter_mut() {
        if e.get("manager").and_then(Value::as_str) == Some(manager) {
            continue;
        }
        let mut theirs = e
            .get("fieldsV1")
            .map(fields::from_fields_v1)
            .unwrap_or_default();
        for leaf in fields::leaves(taken) {
            theirs.remove(&leaf);
        }
        e["fieldsV1"] = fields::to_fields_v1(&theirs);
    }
}
