//! The resources the simulator serves: the built-in ones (as in the
//! `discovery-*` fixtures) and those added at run time by creating a
//! CustomResourceDefinition.

use serde_json::{Map, Value, json};

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const NO_COLLECTION_DELETE: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// A subresource as discovery lists it (`pods/log`, `deployments/scale`).
#[derive(Clone, Debug)]
pub struct Subresource {
    pub name: String,
    pub kind: String,
    pub verbs: Vec<String>,
    /// `(group, version)` when the subresource speaks another API group.
    pub group_version: Option<(String, String)>,
}

/// A CRD's `additionalPrinterColumns` entry.
#[derive(Clone, Debug)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub description: String,
    pub priority: i64,
}

/// One resource (a plural name in one group/version).
#[derive(Clone, Debug)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub verbs: Vec<String>,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub storage_version_hash: Option<String>,
    pub subresources: Vec<Subresource>,
    /// Built into the API server (lists omit `kind`/`apiVersion` in items and
    /// strategic merge patch is accepted), as opposed to a custom resource.
    pub builtin: bool,
    pub printer_columns: Vec<PrinterColumn>,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has_verb(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == verb)
    }

    pub fn subresource(&self, name: &str) -> Option<&Subresource> {
        self.subresources.iter().find(|s| s.name == name)
    }

    /// The discovery entries (`APIResource`) of this resource and its subresources.
    pub fn discovery_entries(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut main = Map::new();
        main.insert("name".into(), self.plural.clone().into());
        main.insert("singularName".into(), self.singular.clone().into());
        main.insert("namespaced".into(), self.namespaced.into());
        main.insert("kind".into(), self.kind.clone().into());
        main.insert("verbs".into(), json!(self.verbs));
        if !self.short_names.is_empty() {
            main.insert("shortNames".into(), json!(self.short_names));
        }
        if !self.categories.is_empty() {
            main.insert("categories".into(), json!(self.categories));
        }
        if let Some(hash) = &self.storage_version_hash {
            main.insert("storageVersionHash".into(), hash.clone().into());
        }
        out.push(Value::Object(main));
        for sub in &self.subresources {
            let mut e = Map::new();
            e.insert(
                "name".into(),
                format!("{}/{}", self.plural, sub.name).into(),
            );
            e.insert("singularName".into(), "".into());
            e.insert("namespaced".into(), self.namespaced.into());
            if let Some((g, v)) = &sub.group_version {
                e.insert("group".into(), g.clone().into());
                e.insert("version".into(), v.clone().into());
            }
            e.insert("kind".into(), sub.kind.clone().into());
            e.insert("verbs".into(), json!(sub.verbs));
            out.push(Value::Object(e));
        }
        out
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A subresource row: name, kind, verbs, `(group, version)` if another API's.
type SubSpec<'a> = (&'a str, &'a str, &'a [&'a str], Option<(&'a str, &'a str)>);

struct Builtin<'a> {
    group: &'a str,
    plural: &'a str,
    kind: &'a str,
    namespaced: bool,
    verbs: &'a [&'a str],
    short: &'a [&'a str],
    categories: &'a [&'a str],
    hash: Option<&'a str>,
    subs: &'a [SubSpec<'a>],
}

impl Builtin<'_> {
    fn build(&self) -> ResourceDef {
        ResourceDef {
            group: self.group.into(),
            version: "v1".into(),
            plural: self.plural.into(),
            singular: String::new(),
            kind: self.kind.into(),
            namespaced: self.namespaced,
            verbs: strings(self.verbs),
            short_names: strings(self.short),
            categories: strings(self.categories),
            storage_version_hash: self.hash.map(Into::into),
            subresources: self
                .subs
                .iter()
                .map(|(name, kind, verbs, gv)| Subresource {
                    name: name.to_string(),
                    kind: kind.to_string(),
                    verbs: strings(verbs),
                    group_version: gv.map(|(g, v)| (g.to_string(), v.to_string())),
                })
                .collect(),
            builtin: true,
            printer_columns: Vec::new(),
        }
    }
}

/// The built-in resources, in discovery order (alphabetical within a group).
pub fn builtin_resources() -> Vec<ResourceDef> {
    let scale = Some(("autoscaling", "v1"));
    let list = [
        Builtin {
            group: "",
            plural: "configmaps",
            kind: "ConfigMap",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["cm"],
            categories: &[],
            hash: Some("qFsyl6wFWjQ="),
            subs: &[],
        },
        Builtin {
            group: "",
            plural: "endpoints",
            kind: "Endpoints",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["ep"],
            categories: &[],
            hash: Some("fWeeMqaN/OA="),
            subs: &[],
        },
        Builtin {
            group: "",
            plural: "events",
            kind: "Event",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["ev"],
            categories: &[],
            hash: Some("r2yiGXH7wu8="),
            subs: &[],
        },
        Builtin {
            group: "",
            plural: "namespaces",
            kind: "Namespace",
            namespaced: false,
            verbs: NO_COLLECTION_DELETE,
            short: &["ns"],
            categories: &[],
            hash: Some("Q3oi5N2YM8M="),
            subs: &[
                ("finalize", "Namespace", &["update"], None),
                ("status", "Namespace", STATUS_VERBS, None),
            ],
        },
        Builtin {
            group: "",
            plural: "nodes",
            kind: "Node",
            namespaced: false,
            verbs: ALL_VERBS,
            short: &["no"],
            categories: &[],
            hash: Some("XwShjMxG9Fs="),
            subs: &[("status", "Node", STATUS_VERBS, None)],
        },
        Builtin {
            group: "",
            plural: "pods",
            kind: "Pod",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["po"],
            categories: &["all"],
            hash: Some("xPOwRZ+Yhw8="),
            subs: &[
                ("attach", "PodAttachOptions", &["create", "get"], None),
                ("exec", "PodExecOptions", &["create", "get"], None),
                ("log", "Pod", &["get"], None),
                (
                    "portforward",
                    "PodPortForwardOptions",
                    &["create", "get"],
                    None,
                ),
                ("status", "Pod", STATUS_VERBS, None),
            ],
        },
        Builtin {
            group: "",
            plural: "secrets",
            kind: "Secret",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &[],
            categories: &[],
            hash: Some("S6u1pOWzb84="),
            subs: &[],
        },
        Builtin {
            group: "",
            plural: "serviceaccounts",
            kind: "ServiceAccount",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["sa"],
            categories: &[],
            hash: Some("pbx9ZvyFpBE="),
            subs: &[(
                "token",
                "TokenRequest",
                &["create"],
                Some(("authentication.k8s.io", "v1")),
            )],
        },
        Builtin {
            group: "",
            plural: "services",
            kind: "Service",
            namespaced: true,
            verbs: NO_COLLECTION_DELETE,
            short: &["svc"],
            categories: &["all"],
            hash: Some("0/CO1lhkEBI="),
            subs: &[("status", "Service", STATUS_VERBS, None)],
        },
        Builtin {
            group: "apps",
            plural: "controllerrevisions",
            kind: "ControllerRevision",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &[],
            categories: &[],
            hash: Some("85nkx63pcBU="),
            subs: &[],
        },
        Builtin {
            group: "apps",
            plural: "daemonsets",
            kind: "DaemonSet",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["ds"],
            categories: &["all"],
            hash: Some("dd7pWHUlMKQ="),
            subs: &[("status", "DaemonSet", STATUS_VERBS, None)],
        },
        Builtin {
            group: "apps",
            plural: "deployments",
            kind: "Deployment",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["deploy"],
            categories: &["all"],
            hash: Some("8aSe+NMegvE="),
            subs: &[
                ("scale", "Scale", STATUS_VERBS, scale),
                ("status", "Deployment", STATUS_VERBS, None),
            ],
        },
        Builtin {
            group: "apps",
            plural: "replicasets",
            kind: "ReplicaSet",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["rs"],
            categories: &["all"],
            hash: Some("P1RzHs8/mWQ="),
            subs: &[
                ("scale", "Scale", STATUS_VERBS, scale),
                ("status", "ReplicaSet", STATUS_VERBS, None),
            ],
        },
        Builtin {
            group: "apps",
            plural: "statefulsets",
            kind: "StatefulSet",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &["sts"],
            categories: &["all"],
            hash: Some("H+vl74LkKdo="),
            subs: &[
                ("scale", "Scale", STATUS_VERBS, scale),
                ("status", "StatefulSet", STATUS_VERBS, None),
            ],
        },
        Builtin {
            group: "authentication.k8s.io",
            plural: "selfsubjectreviews",
            kind: "SelfSubjectReview",
            namespaced: false,
            verbs: &["create"],
            short: &[],
            categories: &[],
            hash: None,
            subs: &[],
        },
        Builtin {
            group: "authentication.k8s.io",
            plural: "tokenreviews",
            kind: "TokenReview",
            namespaced: false,
            verbs: &["create"],
            short: &[],
            categories: &[],
            hash: None,
            subs: &[],
        },
        Builtin {
            group: "authorization.k8s.io",
            plural: "localsubjectaccessreviews",
            kind: "LocalSubjectAccessReview",
            namespaced: true,
            verbs: &["create"],
            short: &[],
            categories: &[],
            hash: None,
            subs: &[],
        },
        Builtin {
            group: "authorization.k8s.io",
            plural: "selfsubjectaccessreviews",
            kind: "SelfSubjectAccessReview",
            namespaced: false,
            verbs: &["create"],
            short: &[],
            categories: &[],
            hash: None,
            subs: &[],
        },
        Builtin {
            group: "authorization.k8s.io",
            plural: "subjectaccessreviews",
            kind: "SubjectAccessReview",
            namespaced: false,
            verbs: &["create"],
            short: &[],
            categories: &[],
            hash: None,
            subs: &[],
        },
        Builtin {
            group: "apiextensions.k8s.io",
            plural: "customresourcedefinitions",
            kind: "CustomResourceDefinition",
            namespaced: false,
            verbs: ALL_VERBS,
            short: &["crd", "crds"],
            categories: &[],
            hash: Some("jfWCUB31mvA="),
            subs: &[("status", "CustomResourceDefinition", STATUS_VERBS, None)],
        },
        // `discovery.k8s.io/v1` from 1.21; 1.20 serves only `v1beta1`
        // (`Simulator::start` sets the version it claims).
        Builtin {
            group: "discovery.k8s.io",
            plural: "endpointslices",
            kind: "EndpointSlice",
            namespaced: true,
            verbs: ALL_VERBS,
            short: &[],
            categories: &[],
            // As the real v1.20.2 lists it at discovery.k8s.io/v1beta1.
            hash: Some("Nx3SIv6I0mE="),
            subs: &[],
        },
    ];
    list.iter().map(Builtin::build).collect()
}

/// The built-in API groups in the order `/apis` lists them.
pub const BUILTIN_GROUP_ORDER: &[&str] = &[
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "apiextensions.k8s.io",
    "discovery.k8s.io",
];

/// Resources that exist only as a POST that answers (reviews): never stored.
pub fn is_review(def: &ResourceDef) -> bool {
    def.verbs == ["create"]
        && (def.group == "authentication.k8s.io" || def.group == "authorization.k8s.io")
}

/// The resources a CustomResourceDefinition object declares (one per served
/// version), or a reason it declares none.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceDef>, String> {
    let spec = crd.get("spec").ok_or("spec is required")?;
    let group = spec
        .get("group")
        .and_then(Value::as_str)
        .ok_or("spec.group is required")?;
    let names = spec.get("names").ok_or("spec.names is required")?;
    let plural = names
        .get("plural")
        .and_then(Value::as_str)
        .ok_or("spec.names.plural is required")?;
    let kind = names
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("spec.names.kind is required")?;
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let str_list = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let short_names = str_list(names.get("shortNames"));
    let categories = str_list(names.get("categories"));
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions is required")?;
    let mut out = Vec::new();
    for v in versions {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let version = v
            .get("name")
            .and_then(Value::as_str)
            .ok_or("spec.versions[].name is required")?;
        let mut subresources = Vec::new();
        if let Some(subs) = v.get("subresources") {
            if subs.get("status").is_some() {
                subresources.push(Subresource {
                    name: "status".into(),
                    kind: kind.into(),
                    verbs: strings(STATUS_VERBS),
                    group_version: None,
                });
            }
            if subs.get("scale").is_some() {
                subresources.push(Subresource {
                    name: "scale".into(),
                    kind: "Scale".into(),
                    verbs: strings(STATUS_VERBS),
                    group_version: Some(("autoscaling".into(), "v1".into())),
                });
            }
        }
        let printer_columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .filter_map(|c| {
                        Some(PrinterColumn {
                            name: c.get("name")?.as_str()?.into(),
                            type_: c
                                .get("type")
                                .and_then(Value::as_str)
                                .unwrap_or("string")
                                .into(),
                            json_path: c.get("jsonPath")?.as_str()?.into(),
                            description: c
                                .get("description")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .into(),
                            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(ResourceDef {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: singular.clone(),
            kind: kind.into(),
            namespaced,
            verbs: strings(ALL_VERBS),
            short_names: short_names.clone(),
            categories: categories.clone(),
            storage_version_hash: None,
            subresources,
            builtin: false,
            printer_columns,
        });
    }
    if out.is_empty() {
        return Err("spec.versions has no served version".into());
    }
    Ok(out)
}

/// All resources currently served: built-ins plus established CRDs.
#[derive(Clone, Debug)]
pub struct Registry {
    builtin: Vec<ResourceDef>,
    /// CRD name (`plural.group`) -> its resources.
    custom: Vec<(String, Vec<ResourceDef>)>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            builtin: builtin_resources(),
            custom: Vec::new(),
        }
    }
}

impl Registry {
    pub fn all(&self) -> impl Iterator<Item = &ResourceDef> {
        self.builtin
            .iter()
            .chain(self.custom.iter().flat_map(|(_, defs)| defs.iter()))
    }

    /// The resource `plural` served at `group`/`version`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceDef> {
        self.all()
            .find(|d| d.group == group && d.version == version && d.plural == plural)
    }

    /// A resource by `plural`, `plural.group`, kind or short name (as kubectl
    /// accepts them), any version.
    pub fn lookup(&self, name: &str) -> Option<&ResourceDef> {
        let (head, group) = match name.split_once('.') {
            Some((h, g)) => (h, Some(g)),
            None => (name, None),
        };
        self.all().find(|d| {
            group.is_none_or(|g| g == d.group)
                && (d.plural == head
                    || d.singular == head
                    || d.kind.eq_ignore_ascii_case(head)
                    || d.short_names.iter().any(|s| s == head))
        })
    }

    /// The resource for an object's `apiVersion` and `kind`.
    pub fn for_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceDef> {
        self.all()
            .find(|d| d.api_version() == api_version && d.kind == kind)
    }

    /// Group versions served for `group`, preferred first.
    pub fn versions(&self, group: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for d in self.all().filter(|d| d.group == group) {
            if !out.contains(&d.version) {
                out.push(d.version.clone());
            }
        }
        out
    }

    /// Non-core groups in `/apis` order: built-ins, then custom groups.
    pub fn groups(&self) -> Vec<String> {
        let mut out: Vec<String> = BUILTIN_GROUP_ORDER.iter().map(|g| g.to_string()).collect();
        for (_, defs) in &self.custom {
            for d in defs {
                if !out.contains(&d.group) {
                    out.push(d.group.clone());
                }
            }
        }
        out
    }

    /// Serves a built-in resource at `version` instead of `v1`.
    pub fn set_builtin_version(&mut self, group: &str, plural: &str, version: &str) {
        for def in &mut self.builtin {
            if def.group == group && def.plural == plural {
                def.version = version.into();
            }
        }
    }

    pub fn remove_builtin(&mut self, group: &str, plural: &str) {
        self.builtin
            .retain(|d| !(d.group == group && d.plural == plural));
    }

    pub fn add_crd(&mut self, crd_name: &str, defs: Vec<ResourceDef>) {
        self.remove_crd(crd_name);
        self.custom.push((crd_name.to_string(), defs));
    }

    pub fn remove_crd(&mut self, crd_name: &str) {
        self.custom.retain(|(n, _)| n != crd_name);
    }
}
