//! The differential test of chaperone's request reading, with the real
//! kube-apiserver v1.20.2 as the oracle (issue 24, item 1).
//!
//! Thousands of request targets, generated deterministically from real ones
//! (percent-encoding of every character, `%2F` inside and between segments,
//! double encoding, doubled slashes, dot segments, trailing slashes, upper
//! case, the legacy `/watch/` and `/proxy/` forms, query forms), are sent
//! byte for byte over HTTP/1.1 to the real server, each with an `Audit-ID`
//! of its own. The server's Metadata-level audit log says how it read each
//! one (`verb` and `objectRef`: the server's own `RequestInfo`). For every
//! target, chaperone's reading (`http::Uri` as hyper parses the request
//! line, then [`CanonicalTarget::parse`] and [`RequestInfo::from_target`],
//! exactly as the pipeline does) must be one of:
//! - the server's reading, field for field (verb, apiGroup, apiVersion,
//!   resource, subresource, namespace, name; resource or non-resource); or
//! - a refusal (chaperone answers 400 and forwards nothing): on the safe side
//!   whatever the server would have done, counted and printed.
//!
//! And the canonical target chaperone forwards in place of the raw one
//! ([`CanonicalTarget::path_and_query`]) is sent too: the server must read it
//! exactly as chaperone judged it.
//!
//! Which server answers count: every request that produced an audit event
//! is compared, whatever its status (a 404 for an unknown resource or a
//! missing object is still the server's reading of the target: the audit
//! `objectRef` is its `RequestInfo`, computed before routing). A request
//! without an event was refused before `RequestInfo` (Go's HTTP parser: an
//! invalid escape, a request target that is not a path; or `RequestInfo`
//! failing, as for `/api/v1/watch`): those are server refusals, and
//! chaperone must not read them as anything the server would serve.
//!
//! Known and accepted: a `#` in the request target. hyper (`http::Uri`)
//! drops everything from `#` on before chaperone sees the request, and Go
//! keeps it as part of the path; chaperone judges and forwards the target
//! without it, so the server reads what chaperone judged (the canonical check
//! covers it). Those targets are counted apart ("fragment"), not compared
//! with the server's reading of the raw bytes.
//!
//! The same corpus goes again over HTTP/2 (ALPN `h2`, the `h2` crate that
//! hyper itself uses), each target as the raw `:path`, and chaperone's
//! reading of the `:path` (as hyper's HTTP/2 server hands it over, an
//! `http::uri::PathAndQuery`) must equal the server's for every target it
//! accepted. A target that is no `PathAndQuery` cannot be sent by this
//! client, and hyper refuses it as a `:path` before chaperone: counted as
//! "no :path for hyper". Corpus size, accepted and agreeing targets are
//! printed per protocol.
//!
//! Needs the real server (`cargo xtask kube`; skips without it, fails under
//! CI). No root.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chaperone::request::{CanonicalTarget, RequestInfo};
use chaperone_tests::{real_api::RealApiServer, require_real_api, sim::client::tls_config};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Concurrent connections to the server.
const CONNECTIONS: usize = 8;
/// A response body that sends nothing for this long is a watch (or a
/// stream): the connection is closed and a new one opened.
const IDLE: Duration = Duration::from_millis(150);
/// The name in the bodies of the generated creates (the server's audit
/// `objectRef` takes a create's name from the body when the path has none).
const BODY_NAME: &str = "oracle-dry";

// === the corpus ===

#[derive(Clone, Debug)]
struct Probe {
    method: &'static str,
    target: String,
    body: Option<(&'static str, String)>,
}

/// A real request target: its path and how much variation it gets.
struct Base {
    path: &'static str,
    /// Per-character encodings and the other path variants (false for the
    /// expensive ones such as /openapi/v2: a few variants only).
    full: bool,
    /// Collections: also every query form.
    collection: bool,
    /// Named objects: also DELETE/PATCH (dryRun=All).
    named: bool,
}

const fn base(path: &'static str, full: bool, collection: bool, named: bool) -> Base {
    Base {
        path,
        full,
        collection,
        named,
    }
}

const BASES: &[Base] = &[
    // core, namespaced and cluster-scoped, collections and objects
    base("/api/v1/namespaces", true, true, false),
    base("/api/v1/namespaces/prod", true, false, true),
    base("/api/v1/namespaces/prod/status", true, false, false),
    base("/api/v1/namespaces/prod/finalize", false, false, false),
    base("/api/v1/namespaces/prod/secrets", true, true, false),
    base("/api/v1/namespaces/prod/secrets/db", true, false, true),
    base("/api/v1/namespaces/prod/configmaps", true, true, false),
    base("/api/v1/namespaces/prod/configmaps/cm", true, false, true),
    base("/api/v1/namespaces/prod/pods/web", true, false, true),
    base(
        "/api/v1/namespaces/prod/pods/web/status",
        true,
        false,
        false,
    ),
    base("/api/v1/namespaces/prod/pods/web/log", true, false, false),
    base("/api/v1/namespaces/prod/pods/web/exec", true, false, false),
    base(
        "/api/v1/namespaces/prod/pods/web/binding",
        false,
        false,
        false,
    ),
    base(
        "/api/v1/namespaces/prod/serviceaccounts/default/token",
        false,
        false,
        false,
    ),
    base("/api/v1/secrets", true, true, false),
    base("/api/v1/nodes/node-1", false, false, false),
    base("/api/v1/nodes/node-1/proxy/stats", false, false, false),
    base(
        "/api/v1/namespaces/prod/services/svc/proxy/a/b",
        true,
        false,
        false,
    ),
    // the legacy special-verb forms
    base("/api/v1/watch/namespaces/prod/secrets", true, false, false),
    base(
        "/api/v1/watch/namespaces/prod/secrets/db",
        true,
        false,
        false,
    ),
    base("/api/v1/watch/secrets", false, false, false),
    base("/api/v1/watch", false, false, false),
    base(
        "/api/v1/proxy/namespaces/prod/pods/web/some/path",
        true,
        false,
        false,
    ),
    base("/api/v1/proxy/nodes/node-1/stats", false, false, false),
    // groups
    base(
        "/apis/apps/v1/namespaces/prod/deployments",
        true,
        true,
        false,
    ),
    base(
        "/apis/apps/v1/namespaces/prod/deployments/d/scale",
        true,
        false,
        false,
    ),
    base("/apis/apps/v1/deployments", false, true, false),
    base(
        "/apis/apps/v1/watch/namespaces/prod/deployments",
        false,
        false,
        false,
    ),
    base(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:aggregate-to-admin",
        true,
        false,
        false,
    ),
    base(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/prod/rolebindings/rb",
        false,
        false,
        false,
    ),
    // unknown (CRD-less) group and resource
    base(
        "/apis/example.com/v1/namespaces/prod/widgets/w1",
        true,
        false,
        false,
    ),
    base("/api/v1/namespaces/prod/widgets", false, true, false),
    // discovery and non-resource URLs
    base("/api", false, false, false),
    base("/api/v1", false, false, false),
    base("/apis/apps", false, false, false),
    base("/apis/apps/v1", false, false, false),
    base("/version", true, false, false),
    base("/healthz", false, false, false),
    base("/readyz", false, false, false),
    base("/openapi/v2", false, false, false),
];

/// Query forms for collections: watch, selectors, repeated and encoded keys,
/// `;`, and list options that do not decode.
const QUERIES: &[&str] = &[
    "watch=true",
    "watch=1",
    "watch=True",
    "watch=false",
    "watch=FALSE",
    "watch=0",
    "watch=",
    "watch",
    "w%61tch=1",
    "%77atch=true",
    "watch=false&watch=true",
    "watch=1&watch=0",
    "watch=tru%65",
    "dryRun=All",
    "fieldSelector=metadata.name%3Ddb",
    "fieldSelector=metadata.name=db",
    "fieldSelector=metadata.name%3D%3Ddb",
    "fieldSelector=metadata.name!%3Ddb",
    "fieldSelector=metadata.name%3Ddb&watch=1",
    "field%53elector=metadata.name%3Dcm",
    "fieldSelector=metadata.name%3Dcm,metadata.name%3Ddb",
    "fieldSelector=metadata.name%3Ddb%2Cmetadata.name%3Dcm",
    "fieldSelector=metadata.namespace%3Dprod,metadata.name%3Dcm",
    "fieldSelector=metadata.name%3Ddb&fieldSelector=metadata.name%3Dcm",
    "fieldSelector=metadata.name%3Da%2Fb",
    "fieldSelector=metadata.name%3D..",
    "fieldSelector=metadata.name%3Dd%5C%2Cb",
    "fieldSelector=x%5C%3Dy%3Dz,metadata.name%3Ddb",
    "fieldSelector=metadata.name%3Ddb,bad",
    "labelSelector=app%3Dweb",
    "labelSelector=app+in+(a,b)",
    "labelSelector=app%3Dweb&fieldSelector=metadata.name%3Ddb",
    "labelSelector=!!bad&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a%3D%3D%3Db&fieldSelector=metadata.name%3Ddb",
    "labelSelector=app+in+(a,b),!x,y%3Dz&fieldSelector=metadata.name%3Ddb",
    "labelSelector=example.com/app%3D%3Dweb,tier!%3Dfe&fieldSelector=metadata.name%3Ddb",
    "labelSelector=in+in+(in),a+notin+(),b+in+(,)&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a%3C1,b%3E2&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a%3C-1&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a%3Db%3Dc&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a+in+(b+c)&fieldSelector=metadata.name%3Ddb",
    "labelSelector=Example.com/a&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a,&fieldSelector=metadata.name%3Ddb",
    "labelSelector=!a%3Db&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a%3D%00junk&fieldSelector=metadata.name%3Ddb",
    "labelSelector=a%3D-b&fieldSelector=metadata.name%3Ddb",
    "limit=abc&fieldSelector=metadata.name%3Ddb",
    "limit=%2B5&fieldSelector=metadata.name%3Ddb",
    "limit=1.5&fieldSelector=metadata.name%3Ddb",
    "limit=&fieldSelector=metadata.name%3Ddb",
    "limit=5&fieldSelector=metadata.name%3Ddb",
    "timeoutSeconds=x&fieldSelector=metadata.name%3Ddb",
    "timeoutSeconds=&fieldSelector=metadata.name%3Ddb",
    "resourceVersion=0&fieldSelector=metadata.name%3Ddb",
    "allowWatchBookmarks=maybe&fieldSelector=metadata.name%3Ddb",
    "a=1;watch=true",
    "watch=1;",
    "fieldSelector=metadata.name%3Ddb%3B",
    "watch=1#x",
    "watch=%zz",
    "&&watch=1&&",
    "watch=1&dryRun=All&pretty=true",
];

/// `%XX` for one byte, upper or lower hex.
fn escape(b: u8, lower: bool) -> String {
    if lower {
        format!("%{b:02x}")
    } else {
        format!("%{b:02X}")
    }
}

/// A small deterministic generator (xorshift64*), so the corpus is the same
/// on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Path variants of one base path (the base itself first).
fn path_variants(path: &str, full: bool, rng: &mut Rng) -> Vec<String> {
    let mut out = vec![path.to_owned(), format!("{path}/")];
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let join = |segs: &[String]| format!("/{}", segs.join("/"));
    let owned: Vec<String> = segments.iter().map(|s| (*s).to_owned()).collect();
    // a few for every base
    out.push(path.replace('/', "%2F"));
    out.push(format!("{path}#frag"));
    out.push(path.to_ascii_uppercase());
    if !full {
        return out;
    }
    // every character percent-encoded on its own, upper and lower hex by turn
    for (i, b) in path.bytes().enumerate() {
        if b == b'/' {
            continue;
        }
        out.push(format!(
            "{}{}{}",
            &path[..i],
            escape(b, i % 2 == 1),
            &path[i + 1..]
        ));
    }
    // a whole segment encoded, each segment in turn
    for i in 0..owned.len() {
        let mut segs = owned.clone();
        segs[i] = segs[i]
            .bytes()
            .map(|b| escape(b, i % 2 == 0))
            .collect::<String>();
        out.push(join(&segs));
    }
    // each separator: %2F, %2f, %252F, `//`
    for (i, b) in path.bytes().enumerate() {
        if b != b'/' {
            continue;
        }
        for sep in ["%2F", "%2f", "%252F", "//", "/%2F", "%2F/", "/./", "/%2e/"] {
            if i == 0 && sep.starts_with('%') {
                // `%2Fapi...` is not a request target at all (Go and hyper
                // both refuse it); covered once below.
                continue;
            }
            out.push(format!("{}{sep}{}", &path[..i], &path[i + 1..]));
        }
    }
    out.push(path.trim_start_matches('/').to_owned());
    // dot segments after a random segment
    for dots in [
        "/.",
        "/..",
        "/%2e",
        "/%2E%2E",
        "/%2e%2E",
        "/x/..",
        "/x/%2E%2E",
        "/.%2e",
    ] {
        let i = rng.below(owned.len()) + 1;
        let (head, tail) = owned.split_at(i);
        out.push(format!("{}{dots}/{}", join(head), tail.join("/")));
    }
    // each segment upper-cased, and one character of it
    for i in 0..owned.len() {
        let mut segs = owned.clone();
        segs[i] = segs[i].to_ascii_uppercase();
        out.push(join(&segs));
        let mut segs = owned.clone();
        if let Some(first) = segs[i].get(..1) {
            segs[i] = format!("{}{}", first.to_ascii_uppercase(), &segs[i][1..]);
            out.push(join(&segs));
        }
    }
    // characters and escapes with a meaning of their own, in a random segment
    for odd in [
        "%20", "+", ";x", "%3B", "%3F", "%23", "%00", "%0A", "%ff", "%C3%A9", "%zz", "%", "%2",
        "%25", "%5C", "\\", ":", "@", "!", "$", "~", "%7E", "*", "'", "(", ")", "=", "&", ",",
    ] {
        let i = rng.below(owned.len());
        let mut segs = owned.clone();
        segs[i] = format!("{}{odd}", segs[i]);
        out.push(join(&segs));
        let mut segs = owned.clone();
        segs[i] = format!("{odd}{}", segs[i]);
        out.push(join(&segs));
    }
    out
}

fn corpus(server_addr: &str) -> Vec<Probe> {
    let mut rng = Rng(0x5eed_0f0c_1e00);
    let mut probes = Vec::new();
    let get = |target: String| Probe {
        method: "GET",
        target,
        body: None,
    };
    for b in BASES {
        let variants = path_variants(b.path, b.full, &mut rng);
        for v in &variants {
            probes.push(get(v.clone()));
        }
        if b.collection {
            // every query form on the base and on two encoded variants of it
            let encoded: Vec<&String> = variants.iter().skip(6).step_by(7).take(2).collect();
            for q in QUERIES {
                probes.push(get(format!("{}?{q}", b.path)));
                for v in &encoded {
                    probes.push(get(format!("{v}?{q}")));
                }
            }
            // creates (dry run), on a sample of the variants
            for v in variants.iter().step_by(5) {
                probes.push(Probe {
                    method: "POST",
                    target: format!("{v}?dryRun=All"),
                    body: Some((
                        "application/json",
                        json!({"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": BODY_NAME}})
                        .to_string(),
                    )),
                });
            }
        }
        if b.named {
            for v in variants.iter().step_by(3) {
                let method = ["DELETE", "PATCH", "HEAD", "PUT"][rng.below(4)];
                let body = match method {
                    "PATCH" => Some((
                        "application/merge-patch+json",
                        r#"{"metadata":{"labels":{"oracle":"x"}}}"#.to_owned(),
                    )),
                    "PUT" => Some(("application/json", "{}".to_owned())),
                    _ => None,
                };
                probes.push(Probe {
                    method,
                    target: format!("{v}?dryRun=All"),
                    body,
                });
            }
        }
    }
    // request targets that are not origin-form paths
    for t in [
        format!("https://{server_addr}/api/v1/namespaces/prod/secrets/db"),
        format!("https://{server_addr}/api/v1/namespaces/prod/secr%65ts"),
        "%2Fapi%2Fv1%2Fnamespaces%2Fprod%2Fsecrets".to_owned(),
        "//api/v1/namespaces/prod/secrets".to_owned(),
        "/%2Fapi/v1/namespaces/prod/secrets".to_owned(),
        "*".to_owned(),
    ] {
        probes.push(get(t));
    }
    probes
}

// === chaperone's reading ===

/// How a reader (chaperone or the server) read a request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reading {
    /// The decoded path (Go's `URL.Path`): what non-resource rules match.
    path: String,
    resource_request: bool,
    verb: String,
    api_group: String,
    api_version: String,
    resource: String,
    subresource: String,
    namespace: String,
    name: String,
}

enum Chaperone {
    /// Read, and forwarded as this path and query.
    Read(Reading, String),
    /// hyper refused the request target (a 400 before chaperone).
    HyperRefused,
    /// `CanonicalTarget::parse` refused it: a 400 from chaperone.
    Refused(String),
}

fn chaperone_reading(method: &str, target: &str) -> Chaperone {
    // As hyper hands the request to the pipeline: the request target parsed
    // as an `http::Uri` (which drops a `#fragment`).
    let Ok(uri) = target.parse::<http::Uri>() else {
        return Chaperone::HyperRefused;
    };
    read_path(method, uri.path(), uri.query())
}

/// Chaperone's reading of an HTTP/2 request: hyper (its `h2`) takes the
/// `:path` pseudo-header as an `http::uri::PathAndQuery`.
fn chaperone_reading_h2(method: &str, path: &str) -> Chaperone {
    let Ok(path) = path.parse::<http::uri::PathAndQuery>() else {
        return Chaperone::HyperRefused;
    };
    read_path(method, path.path(), path.query())
}

fn read_path(method: &str, path: &str, query: Option<&str>) -> Chaperone {
    match CanonicalTarget::parse(path, query) {
        Err(e) => Chaperone::Refused(e.to_string()),
        Ok(canonical) => {
            let method = http::Method::from_bytes(method.as_bytes()).expect("a method");
            let info = RequestInfo::from_target(&method, &canonical);
            let reading = Reading {
                path: info.path,
                resource_request: info.is_resource_request,
                verb: info.verb,
                api_group: info.api_group,
                api_version: info.api_version,
                resource: info.resource,
                subresource: info.subresource,
                namespace: info.namespace,
                name: info.name,
            };
            Chaperone::Read(reading, canonical.path_and_query.to_string())
        }
    }
}

fn server_reading(event: &Value) -> Reading {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let object = &event["objectRef"];
    // `requestURI` is Go's `URL.RequestURI()`: `EscapedPath()`, a valid
    // encoding of `URL.Path`, and the raw query.
    let uri = s(&event["requestURI"]);
    let escaped = uri.split('?').next().unwrap_or_default();
    let path = percent_decode(escaped);
    Reading {
        path,
        resource_request: object.is_object(),
        verb: s(&event["verb"]),
        api_group: s(&object["apiGroup"]),
        api_version: s(&object["apiVersion"]),
        resource: s(&object["resource"]),
        subresource: s(&object["subresource"]),
        namespace: s(&object["namespace"]),
        name: s(&object["name"]),
    }
}

/// Percent-decodes a valid escaped path.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The server's audit `objectRef` takes a create's name from the body when
/// the path names none: that is not a reading of the target.
fn same_reading(chaperone: &Reading, server: &Reading) -> bool {
    if chaperone == server {
        return true;
    }
    chaperone.verb == "create"
        && chaperone.name.is_empty()
        && server.name == BODY_NAME
        && *chaperone
            == Reading {
                name: String::new(),
                ..server.clone()
            }
}

// === sending raw requests ===

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

struct Sender {
    addr: std::net::SocketAddr,
    connector: tokio_rustls::TlsConnector,
    token: String,
}

impl Sender {
    async fn connect(&self) -> anyhow::Result<BufReader<Tls>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = self
            .connector
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await?;
        Ok(BufReader::new(tls))
    }

    fn request_bytes(&self, probe: &Probe, audit_id: &str) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAudit-ID: {audit_id}\r\nAccept: application/json\r\nUser-Agent: chaperone-request-oracle\r\n",
            probe.method, probe.target, self.addr, self.token
        );
        let body = probe.body.as_ref().map(|(_, b)| b.as_str()).unwrap_or("");
        if let Some((content_type, _)) = &probe.body {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        head.into_bytes()
    }

    /// Sends one request on `conn` (opening one when there is none) and
    /// reads the answer; returns the status, or `None` when the server
    /// closed without one. The connection is dropped when it cannot be
    /// reused (a stream cut short, `Connection: close`, an error).
    async fn send(
        &self,
        conn: &mut Option<BufReader<Tls>>,
        probe: &Probe,
        audit_id: &str,
    ) -> Option<u16> {
        let bytes = self.request_bytes(probe, audit_id);
        for attempt in 0..2 {
            let reused = conn.is_some();
            if conn.is_none() {
                *conn = self.connect().await.ok();
            }
            let stream = conn.as_mut()?;
            let status = tokio::time::timeout(
                Duration::from_secs(20),
                exchange(stream, &bytes, probe.method == "HEAD"),
            )
            .await
            .unwrap_or(Err(Outcome::Broken(None)));
            match status {
                Ok(status) => return Some(status),
                Err(Outcome::Broken(status)) => {
                    *conn = None;
                    // An idle keep-alive connection the server closed: once more.
                    if status.is_none() && reused && attempt == 0 {
                        continue;
                    }
                    return status;
                }
            }
        }
        None
    }
}

enum Outcome {
    /// The connection cannot be reused; the status if one was read.
    Broken(Option<u16>),
}

async fn exchange(stream: &mut BufReader<Tls>, request: &[u8], head: bool) -> Result<u16, Outcome> {
    let broken = |s| Outcome::Broken(s);
    stream
        .get_mut()
        .write_all(request)
        .await
        .map_err(|_| broken(None))?;
    let mut line = String::new();
    if stream
        .read_line(&mut line)
        .await
        .map_err(|_| broken(None))?
        == 0
    {
        return Err(broken(None));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(broken(None))?;
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    loop {
        line.clear();
        if stream
            .read_line(&mut line)
            .await
            .map_err(|_| broken(Some(status)))?
            == 0
        {
            return Err(broken(Some(status)));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let (name, value) = (name.to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" => close = value.contains("close"),
            _ => {}
        }
    }
    if head || status == 204 || status == 304 {
        return if close {
            Err(broken(Some(status)))
        } else {
            Ok(status)
        };
    }
    if chunked {
        loop {
            line.clear();
            match tokio::time::timeout(IDLE, stream.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(broken(Some(status))),
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| broken(Some(status)))?;
            let mut chunk = vec![0; size + 2];
            match tokio::time::timeout(IDLE, stream.read_exact(&mut chunk)).await {
                Ok(Ok(_)) => {}
                _ => return Err(broken(Some(status))),
            }
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = length {
        let mut body = vec![0; length];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut body)).await {
            Ok(Ok(_)) => {}
            _ => return Err(broken(Some(status))),
        }
    } else {
        // Delimited by the end of the connection.
        return Err(broken(Some(status)));
    }
    if close {
        Err(broken(Some(status)))
    } else {
        Ok(status)
    }
}

/// Sends every probe (as `(audit id, probe)`) over `CONNECTIONS`
/// keep-alive connections; returns the status each got (`None`: no answer).
fn send_all(server: &RealApiServer, probes: Vec<(String, Probe)>) -> HashMap<String, Option<u16>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let config = tls_config(&server.ca_pem(), &[b"http/1.1"]).expect("a TLS configuration");
    let sender = Arc::new(Sender {
        addr: server.addr(),
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        token: server.admin_token(),
    });
    let queue = Arc::new(Mutex::new(VecDeque::from(probes)));
    let results = Arc::new(Mutex::new(HashMap::new()));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let (sender, queue, results) = (sender.clone(), queue.clone(), results.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = None;
                loop {
                    let next = queue.lock().unwrap().pop_front();
                    let Some((id, probe)) = next else { break };
                    let status = sender.send(&mut conn, &probe, &id).await;
                    results.lock().unwrap().insert(id, status);
                }
            }));
        }
        for task in tasks {
            task.await.expect("a sender task");
        }
    });
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

/// Sends every probe over HTTP/2 (ALPN `h2`), its target as the raw
/// `:path`, over `CONNECTIONS` connections; the status each got (`None`:
/// no answer, or a target the `h2` client cannot send as a `:path`).
fn send_all_h2(
    server: &RealApiServer,
    probes: Vec<(String, Probe)>,
) -> HashMap<String, Option<u16>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let config = tls_config(&server.ca_pem(), &[b"h2"]).expect("a TLS configuration");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let (addr, token) = (server.addr(), server.admin_token());
    let queue = Arc::new(Mutex::new(VecDeque::from(probes)));
    let results = Arc::new(Mutex::new(HashMap::new()));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let (queue, results) = (queue.clone(), results.clone());
            let (connector, token) = (connector.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<h2::client::SendRequest<bytes::Bytes>> = None;
                loop {
                    let next = queue.lock().unwrap().pop_front();
                    let Some((id, probe)) = next else { break };
                    let mut status = None;
                    for _attempt in 0..2 {
                        if conn.is_none() {
                            conn = h2_connect(&connector, addr).await.ok();
                        }
                        let Some(sender) = conn.clone() else { break };
                        match tokio::time::timeout(
                            Duration::from_secs(20),
                            h2_send(sender, addr, &token, &probe, &id),
                        )
                        .await
                        {
                            Ok(Ok(code)) => {
                                status = code;
                                break;
                            }
                            // The connection went away (GOAWAY, an error): a new one.
                            _ => conn = None,
                        }
                    }
                    results.lock().unwrap().insert(id, status);
                }
            }));
        }
        for task in tasks {
            task.await.expect("a sender task");
        }
    });
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

async fn h2_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> anyhow::Result<h2::client::SendRequest<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    anyhow::ensure!(
        tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        "the server did not choose HTTP/2"
    );
    let (sender, connection) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.ready().await?)
}

/// One request; `Ok(None)` when the target is no `:path` the client can
/// send, `Err` when the connection failed.
async fn h2_send(
    sender: h2::client::SendRequest<bytes::Bytes>,
    addr: std::net::SocketAddr,
    token: &str,
    probe: &Probe,
    audit_id: &str,
) -> anyhow::Result<Option<u16>> {
    let Ok(path) = http::uri::PathAndQuery::from_maybe_shared(probe.target.clone()) else {
        return Ok(None);
    };
    let uri = http::Uri::builder()
        .scheme("https")
        .authority(addr.to_string())
        .path_and_query(path)
        .build()?;
    let mut request = http::Request::builder()
        .method(probe.method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("audit-id", audit_id)
        .header("accept", "application/json")
        .header("user-agent", "chaperone-request-oracle");
    if let Some((content_type, _)) = &probe.body {
        request = request.header("content-type", *content_type);
    }
    let mut sender = sender.ready().await?;
    let (response, mut body) = sender.send_request(request.body(())?, probe.body.is_none())?;
    if let Some((_, text)) = &probe.body {
        body.send_data(bytes::Bytes::from(text.clone()), true)?;
    }
    let response = response.await;
    match response {
        // The stream's body (a watch's included) is dropped: a reset of this
        // stream only.
        Ok(response) => Ok(Some(response.status().as_u16())),
        // The server reset this stream (a request it refused): no status.
        Err(e) if e.is_reset() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The audit events by audit ID (the last stage seen of each): read until
/// every request has one or their number stops growing (a request the
/// server refused before `RequestInfo` never gets one).
fn audit_by_id(
    server: &RealApiServer,
    want: &HashMap<String, Option<u16>>,
) -> HashMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = usize::MAX;
    loop {
        let mut by_id = HashMap::new();
        for event in server.audit_events().expect("the audit log") {
            if let Some(id) = event["auditID"].as_str()
                && want.contains_key(id)
            {
                by_id.insert(id.to_owned(), event);
            }
        }
        if by_id.len() == want.len() || by_id.len() == last || Instant::now() > deadline {
            return by_id;
        }
        last = by_id.len();
        std::thread::sleep(Duration::from_millis(700));
    }
}

// === the seed ===

fn seed(server: &RealApiServer) {
    for ns in ["prod", "oracle"] {
        server
            .ensure(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .expect("a namespace");
    }
    for object in [
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "default", "namespace": "prod"}}),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "db", "namespace": "prod"},
               "stringData": {"password": "oracle-secret-value"}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "cm", "namespace": "prod"}, "data": {"k": "v"}}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}},
               "spec": {"serviceAccountName": "default",
                        "automountServiceAccountToken": false,
                        "nodeName": "node-1",
                        "containers": [{"name": "app", "image": "example.invalid/app"}]}}),
    ] {
        server.ensure(object).expect("a seeded object");
    }
}

// === the test ===

#[test]
fn chaperone_reads_every_request_target_as_the_real_api_server_does() {
    require_real_api!();
    let started = Instant::now();
    let server = RealApiServer::start().expect("the real API server starts");
    seed(&server);

    // The server takes a client's Audit-ID as the event's auditID (1.20
    // does; the matching below depends on it).
    let probe_id = "oracle-audit-id-check";
    let reply = server
        .request("GET", "/version", &[("audit-id", probe_id)], Vec::new())
        .expect("GET /version");
    assert_eq!(reply.status, 200);

    let corpus = corpus(&server.addr().to_string());
    println!(
        "request oracle: corpus of {} request targets ({} methods)",
        corpus.len(),
        {
            let mut m: Vec<_> = corpus.iter().map(|p| p.method).collect();
            m.sort();
            m.dedup();
            m.join("/")
        }
    );

    // Chaperone's reading of every raw target, and the canonical forms it
    // would forward (each distinct one sent once).
    let readings: Vec<Chaperone> = corpus
        .iter()
        .map(|p| chaperone_reading(p.method, &p.target))
        .collect();
    let mut canonical_ids: BTreeMap<(String, String, Option<String>), String> = BTreeMap::new();
    let mut to_send: Vec<(String, Probe)> = Vec::new();
    to_send.push((
        probe_id.to_owned(),
        Probe {
            method: "GET",
            target: "/version".into(),
            body: None,
        },
    ));
    for (i, (probe, reading)) in corpus.iter().zip(&readings).enumerate() {
        to_send.push((format!("oracle-raw-{i}"), probe.clone()));
        if let Chaperone::Read(_, forwarded) = reading {
            let key = (
                probe.method.to_owned(),
                forwarded.clone(),
                probe.body.as_ref().map(|b| b.1.clone()),
            );
            if !canonical_ids.contains_key(&key) {
                let id = format!("oracle-canonical-{}", canonical_ids.len());
                canonical_ids.insert(key, id.clone());
                to_send.push((
                    id,
                    Probe {
                        target: forwarded.clone(),
                        ..probe.clone()
                    },
                ));
            }
        }
    }
    let sent = to_send.len();
    let send_started = Instant::now();
    let statuses = send_all(&server, to_send);
    let send_time = send_started.elapsed();
    let events = audit_by_id(&server, &statuses);
    assert!(
        events.contains_key(probe_id),
        "the server did not take the client's Audit-ID as the audit ID"
    );

    // Compare.
    let mut agreements = 0;
    let mut refused = 0;
    let mut refused_served = 0;
    let mut refused_by_server_too = 0;
    let mut hyper_refused = 0;
    let mut server_refused = 0;
    let mut fragments = 0;
    let mut server_refusals: Vec<String> = Vec::new();
    let mut refused_but_served: Vec<String> = Vec::new();
    let mut disagreements: Vec<String> = Vec::new();
    let mut canonical_disagreements: Vec<String> = Vec::new();
    let mut refusal_reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (probe, reading)) in corpus.iter().zip(&readings).enumerate() {
        let id = format!("oracle-raw-{i}");
        let status = statuses.get(&id).copied().flatten();
        let event = events.get(&id);
        let served = event.and_then(|e| e["responseStatus"]["code"].as_u64());
        *codes
            .entry(match (status, event) {
                (_, Some(_)) => format!("{}", served.unwrap_or(0)),
                (Some(s), None) => format!("{s} without an audit event"),
                (None, None) => "no answer".into(),
            })
            .or_default() += 1;
        let what = format!("{} {}", probe.method, probe.target);
        match reading {
            Chaperone::HyperRefused => {
                hyper_refused += 1;
            }
            Chaperone::Refused(why) => {
                refused += 1;
                let reason = why
                    .split(['"', '('])
                    .next()
                    .unwrap_or(why)
                    .trim()
                    .to_owned();
                *refusal_reasons.entry(reason).or_default() += 1;
                match event {
                    Some(_) if served.is_some_and(|c| (200..300).contains(&c)) => {
                        refused_served += 1;
                        refused_but_served.push(format!("{what}: {why}"));
                    }
                    Some(_) => {}
                    None => refused_by_server_too += 1,
                }
            }
            Chaperone::Read(mine, forwarded) => {
                let fragment = probe.target.contains('#');
                if fragment {
                    fragments += 1;
                }
                match event {
                    None => {
                        server_refused += 1;
                        server_refusals.push(format!("{what}: {status:?}"));
                    }
                    Some(_) if fragment => {}
                    Some(event) => {
                        let theirs = server_reading(event);
                        if same_reading(mine, &theirs) {
                            agreements += 1;
                        } else {
                            disagreements.push(format!(
                                "{what}\n    chaperone: {mine:?}\n    server:    {theirs:?} (HTTP {})",
                                served.unwrap_or(0)
                            ));
                        }
                    }
                }
                // What chaperone forwards is read by the server as judged.
                let key = (
                    probe.method.to_owned(),
                    forwarded.clone(),
                    probe.body.as_ref().map(|b| b.1.clone()),
                );
                let canonical_id = &canonical_ids[&key];
                match events.get(canonical_id) {
                    Some(event) => {
                        let theirs = server_reading(event);
                        if !same_reading(mine, &theirs) {
                            canonical_disagreements.push(format!(
                                "{what} forwarded as {forwarded}\n    chaperone: {mine:?}\n    server:    {theirs:?}"
                            ));
                        }
                    }
                    // Refused before `RequestInfo` in both forms (as
                    // `/api/v1/watch`): the same outcome; or the raw form
                    // had a `#fragment` the server read as part of the path
                    // (`/api/v1/watch#frag`), which chaperone never sees.
                    None if event.is_none() || fragment => {}
                    None => canonical_disagreements.push(format!(
                        "{what} forwarded as {forwarded}: the server refused the canonical form ({:?})",
                        statuses.get(canonical_id)
                    )),
                }
            }
        }
    }

    println!(
        "request oracle: sent {sent} requests ({} raw, {} canonical) in {:.1} s; total {:.1} s",
        corpus.len(),
        canonical_ids.len(),
        send_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!("request oracle: server answers (audit responseStatus.code): {codes:?}");
    println!(
        "request oracle: {} targets; {agreements} read alike; {refused} refused by chaperone \
         ({refused_served} of them served 2xx by the server, {refused_by_server_too} refused by \
         the server too); {hyper_refused} not a request target for hyper; {server_refused} read \
         by chaperone but refused by the server before RequestInfo; {fragments} with a #fragment \
         (dropped by hyper, not compared raw); {} disagreements; {} canonical-form disagreements",
        corpus.len(),
        disagreements.len(),
        canonical_disagreements.len()
    );
    println!("request oracle: chaperone's refusals by reason: {refusal_reasons:?}");
    if let Some(path) = std::env::var_os("ORACLE_DUMP") {
        // Everything, for a closer look: ORACLE_DUMP=/tmp/oracle.txt
        let mut text = String::new();
        for line in disagreements
            .iter()
            .map(|d| format!("DISAGREEMENT {d}"))
            .chain(
                canonical_disagreements
                    .iter()
                    .map(|d| format!("CANONICAL {d}")),
            )
            .chain(
                server_refusals
                    .iter()
                    .map(|d| format!("SERVER REFUSED {d}")),
            )
            .chain(
                refused_but_served
                    .iter()
                    .map(|d| format!("CHAPERONE REFUSED, SERVER SERVED {d}")),
            )
        {
            text.push_str(&line);
            text.push('\n');
        }
        std::fs::write(path, text).expect("writing ORACLE_DUMP");
    }
    for d in disagreements.iter().take(20) {
        println!("DISAGREEMENT {d}");
    }
    for d in canonical_disagreements.iter().take(20) {
        println!("CANONICAL DISAGREEMENT {d}");
    }
    assert!(
        agreements > corpus.len() / 3,
        "too few targets compared ({agreements} of {}): is the audit log read?",
        corpus.len()
    );
    assert!(
        disagreements.is_empty() && canonical_disagreements.is_empty(),
        "{} targets read differently by chaperone and the API server, {} canonical forms \
         read differently (first ones above)",
        disagreements.len(),
        canonical_disagreements.len()
    );

    // The same corpus over HTTP/2: each target as the raw `:path`.
    let h2_probes: Vec<(String, Probe)> = corpus
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("oracle-h2-{i}"), p.clone()))
        .collect();
    let h2_started = Instant::now();
    let h2_statuses = send_all_h2(&server, h2_probes);
    let h2_time = h2_started.elapsed();
    let h2_events = audit_by_id(&server, &h2_statuses);
    let (mut h2_accepted, mut h2_agreements, mut h2_refused, mut h2_not_a_path) = (0, 0, 0, 0);
    let mut h2_disagreements: Vec<String> = Vec::new();
    let mut h2_refused_but_served: Vec<String> = Vec::new();
    for (i, probe) in corpus.iter().enumerate() {
        let event = h2_events.get(&format!("oracle-h2-{i}"));
        if event.is_some() {
            h2_accepted += 1;
        }
        let what = format!("{} {}", probe.method, probe.target);
        match (chaperone_reading_h2(probe.method, &probe.target), event) {
            (Chaperone::HyperRefused, _) => h2_not_a_path += 1,
            (Chaperone::Refused(why), event) => {
                h2_refused += 1;
                if event
                    .and_then(|e| e["responseStatus"]["code"].as_u64())
                    .is_some_and(|c| (200..300).contains(&c))
                {
                    h2_refused_but_served.push(format!("{what}: {why}"));
                }
            }
            (Chaperone::Read(..), None) => {}
            (Chaperone::Read(mine, _), Some(event)) => {
                let theirs = server_reading(event);
                if same_reading(&mine, &theirs) {
                    h2_agreements += 1;
                } else {
                    h2_disagreements.push(format!(
                        "{what}\n    chaperone: {mine:?}\n    server:    {theirs:?}"
                    ));
                }
            }
        }
    }
    println!(
        "request oracle: HTTP/1.1: {} targets sent, {} accepted by the server (an audit event), \
         {agreements} read alike",
        corpus.len(),
        corpus
            .iter()
            .enumerate()
            .filter(|(i, _)| events.contains_key(&format!("oracle-raw-{i}")))
            .count()
    );
    println!(
        "request oracle: HTTP/2: {} targets sent in {:.1} s, {h2_accepted} accepted by the server, \
         {h2_agreements} read alike; {h2_refused} refused by chaperone ({} of them served 2xx); \
         {h2_not_a_path} no :path for hyper; {} disagreements",
        corpus.len(),
        h2_time.as_secs_f64(),
        h2_refused_but_served.len(),
        h2_disagreements.len()
    );
    for d in h2_disagreements.iter().take(20) {
        println!("HTTP/2 DISAGREEMENT {d}");
    }
    assert!(
        h2_agreements > corpus.len() / 3,
        "too few HTTP/2 targets compared ({h2_agreements} of {}): were they sent over HTTP/2?",
        corpus.len()
    );
    assert!(
        h2_disagreements.is_empty(),
        "{} targets read differently over HTTP/2 by chaperone and the API server (first ones above)",
        h2_disagreements.len()
    );
}
