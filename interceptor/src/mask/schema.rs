//! Where the secrets are in a Kubernetes JSON document: a small graph of
//! paths, walked by the streaming transform one key or array index at a time.
//!
//! Each resource kind has a root. Every root also knows the envelopes a
//! response may wrap objects in, so one graph serves get, list (`items[*]`),
//! watch events (`object`) and Table responses (`rows[*].object`), nested in
//! any combination (a watch of Tables, a List of Tables). None of those
//! envelope keys is a top-level field of the objects themselves.

/// Index of a node in [`Schema::nodes`].
pub(crate) type NodeId = u16;

/// Nothing below this point needs masking.
pub(crate) const IGNORE: NodeId = 0;

/// What to do with a string at a leaf. Containers at a leaf position apply
/// the same action to every string inside them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leaf {
    /// A Secret `data` value: replaced by the base64 of a sized marker.
    Base64Secret,
    /// A Secret `stringData` value: replaced by a sized marker.
    PlainSecret,
    /// The last-applied-configuration annotation: JSON in a string, masked
    /// with the given root. `secret`: when it cannot be parsed, mask it
    /// whole (Secrets) rather than applying pattern rules (other kinds).
    EmbeddedJson { root: NodeId, secret: bool },
    /// Text where pattern rules apply (ConfigMap `data`).
    PatternText,
    /// Base64 text where pattern rules apply to the decoded bytes
    /// (ConfigMap `binaryData`).
    PatternBase64,
    /// A container env var's `name`: passed through, remembered for its value.
    EnvName,
    /// A container env var's `value`: masked whole when the name looks
    /// sensitive, pattern rules otherwise.
    EnvValue,
}

pub(crate) struct Node {
    /// Field path for stats and audit (`data`, `env`, ...).
    pub label: &'static str,
    pub leaf: Option<Leaf>,
    pub keys: Vec<(&'static [u8], NodeId)>,
    pub any_key: NodeId,
    pub any_index: NodeId,
}

/// The roots of the resource kinds chaperone masks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Roots {
    pub secret: NodeId,
    pub config_map: NodeId,
    pub workload: NodeId,
}

pub(crate) struct Schema {
    nodes: Vec<Node>,
    pub roots: Roots,
}

const LAST_APPLIED: &[u8] = b"kubectl.kubernetes.io/last-applied-configuration";

impl Schema {
    pub(crate) fn kubernetes() -> Self {
        let mut b = Builder {
            nodes: vec![Node::new("", None)],
        };

        let secret = b.add("", None);
        let data = b.add("data", Some(Leaf::Base64Secret));
        let data_map = b.map("data", data);
        let string_data = b.add("stringData", Some(Leaf::PlainSecret));
        let string_data_map = b.map("stringData", string_data);
        let secret_meta = b.metadata(Leaf::EmbeddedJson {
            root: secret,
            secret: true,
        });
        b.nodes[secret as usize].keys = vec![
            (b"data", data_map),
            (b"stringData", string_data_map),
            (b"metadata", secret_meta),
        ];
        b.envelopes(secret);

        let config_map = b.add("", None);
        let cm_data = b.add("data", Some(Leaf::PatternText));
        let cm_data_map = b.map("data", cm_data);
        let cm_binary = b.add("binaryData", Some(Leaf::PatternBase64));
        let cm_binary_map = b.map("binaryData", cm_binary);
        let cm_meta = b.metadata(Leaf::EmbeddedJson {
            root: config_map,
            secret: false,
        });
        b.nodes[config_map as usize].keys = vec![
            (b"data", cm_data_map),
            (b"binaryData", cm_binary_map),
            (b"metadata", cm_meta),
        ];
        b.envelopes(config_map);

        // Pods, pod templates and the workloads that embed them:
        // spec.containers, spec.template.spec.containers,
        // spec.jobTemplate.spec.template.spec.containers.
        let workload = b.add("", None);
        let env_name = b.add("env", Some(Leaf::EnvName));
        let env_value = b.add("env", Some(Leaf::EnvValue));
        let env_var = b.add("env", None);
        b.nodes[env_var as usize].keys = vec![(b"name", env_name), (b"value", env_value)];
        let env_list = b.add("env", None);
        b.nodes[env_list as usize].any_index = env_var;
        let container = b.add("containers", None);
        b.nodes[container as usize].keys = vec![(b"env", env_list)];
        let containers = b.add("containers", None);
        b.nodes[containers as usize].any_index = container;
        let pod_spec = b.add("spec", None);
        let template = b.add("template", None);
        b.nodes[template as usize].keys = vec![(b"spec", pod_spec)];
        b.nodes[pod_spec as usize].keys = vec![
            (b"containers", containers),
            (b"initContainers", containers),
            (b"ephemeralContainers", containers),
            (b"template", template),
            (b"jobTemplate", template),
        ];
        let workload_meta = b.metadata(Leaf::EmbeddedJson {
            root: workload,
            secret: false,
        });
        // A PodTemplate object has `template` at the top level.
        b.nodes[workload as usize].keys = vec![
            (b"spec", pod_spec),
            (b"template", template),
            (b"metadata", workload_meta),
        ];
        b.envelopes(workload);

        Self {
            nodes: b.nodes,
            roots: Roots {
                secret,
                config_map,
                workload,
            },
        }
    }

    #[inline]
    pub(crate) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// Whether the child of `id` depends on the key's text.
    #[inline]
    pub(crate) fn needs_key(&self, id: NodeId) -> bool {
        let node = self.node(id);
        node.leaf.is_none() && (!node.keys.is_empty() || node.any_key != IGNORE)
    }

    /// The node of the value under `key` in an object at `id`.
    #[inline]
    pub(crate) fn child_key(&self, id: NodeId, key: &[u8]) -> NodeId {
        let node = self.node(id);
        if node.leaf.is_some() {
            return id;
        }
        node.keys
            .iter()
            .find(|(name, _)| *name == key)
            .map_or(node.any_key, |(_, child)| *child)
    }

    /// The node of the elements of an array at `id`.
    #[inline]
    pub(crate) fn child_index(&self, id: NodeId) -> NodeId {
        let node = self.node(id);
        if node.leaf.is_some() {
            id
        } else {
            node.any_index
        }
    }
}

impl Node {
    fn new(label: &'static str, leaf: Option<Leaf>) -> Self {
        Self {
            label,
            leaf,
            keys: Vec::new(),
            any_key: IGNORE,
            any_index: IGNORE,
        }
    }
}

struct Builder {
    nodes: Vec<Node>,
}

impl Builder {
    fn add(&mut self, label: &'static str, leaf: Option<Leaf>) -> NodeId {
        self.nodes.push(Node::new(label, leaf));
        NodeId::try_from(self.nodes.len() - 1).expect("a small schema")
    }

    /// An object whose every value is `value`.
    fn map(&mut self, label: &'static str, value: NodeId) -> NodeId {
        let id = self.add(label, None);
        self.nodes[id as usize].any_key = value;
        id
    }

    /// `metadata.annotations[last-applied-configuration]`.
    fn metadata(&mut self, last_applied: Leaf) -> NodeId {
        let leaf = self.add(
            "metadata.annotations.kubectl.kubernetes.io/last-applied-configuration",
            Some(last_applied),
        );
        let annotations = self.add("metadata.annotations", None);
        self.nodes[annotations as usize].keys = vec![(LAST_APPLIED, leaf)];
        let metadata = self.add("metadata", None);
        self.nodes[metadata as usize].keys = vec![(b"annotations", annotations)];
        metadata
    }

    /// `items[*]`, `rows[*].object` and `object` lead back to `root`.
    fn envelopes(&mut self, root: NodeId) {
        let items = self.add("items", None);
        self.nodes[items as usize].any_index = root;
        let row = self.add("rows", None);
        self.nodes[row as usize].keys = vec![(b"object", root)];
        let rows = self.add("rows", None);
        self.nodes[rows as usize].any_index = row;
        let node = &mut self.nodes[root as usize];
        node.keys.push((b"items", items));
        node.keys.push((b"rows", rows));
        node.keys.push((b"object", root));
    }
}
