//! The HTTPS server and router: authentication, impersonation,
//! authorization, then discovery, reviews, and the generic REST handlers
//! (get, list, watch, create, update, patch, apply, delete, logs, streams).

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    RecordedRequest, State,
    auth::{Attributes, Impersonation, UserInfo},
    discovery,
    patch::PatchType,
    resources::{self, ResourceDef},
    selectors::{FieldSelector, LabelSelector},
    status::{self, ApiError},
    store::{self, EventType, WriteOptions},
    stream::{self, Body, StreamTarget},
    table::{self, IncludeObject},
    wire::{self, Accept},
};

/// Largest request body accepted (the API server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// Recorded requests kept (oldest dropped first).
const MAX_RECORDED: usize = 20_000;

pub(crate) async fn serve(state: Arc<State>, listener: TcpListener, cancel: CancellationToken) {
    let acceptor = TlsAcceptor::from(state.tls.server_config.clone());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((tcp, peer)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let state_streams = state.config.http2_max_streams;
        let acceptor = acceptor.clone();
        let cancel = cancel.clone();
        conns.spawn(async move {
            let tls = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)) => match r {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                },
            };
            let _open = OpenConnection::count(&state);
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(state_streams);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                },
            }
        });
    }
    conns.shutdown().await;
}

/// Counts a served connection in [`State::open_connections`] while it lives.
struct OpenConnection(Arc<State>);

impl OpenConnection {
    fn count(state: &Arc<State>) -> Self {
        state.open_connections.fetch_add(1, Ordering::Relaxed);
        state.served_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(state.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The uid of a service account: the stored object's, or a stable made-up one.
pub(crate) fn service_account_uid(state: &State, namespace: &str, name: &str) -> String {
    state
        .store
        .get("serviceaccounts", Some(namespace), name)
        .and_then(|sa| {
            sa.pointer("/metadata/uid")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| store::stable_uid(&format!("serviceaccount/{namespace}/{name}")))
}

fn authenticate(state: &State, token: &str) -> Option<UserInfo> {
    if token == state.admin_token {
        return Some(UserInfo {
            username: "kubernetes-admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            extra: Default::default(),
        });
    }
    if let Some(u) = state
        .static_tokens
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(token)
    {
        return Some(u.clone());
    }
    state
        .issuer
        .verify(token, &state.api_audiences)
        .map(|(u, _)| u)
}

fn authorize(state: &State, user: &UserInfo, a: &Attributes) -> (bool, String) {
    state
        .authorizer
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .authorize(user, a)
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.map(|q| {
        form_urlencoded_pairs(q)
            .into_iter()
            .collect::<HashMap<String, String>>()
    })
    .unwrap_or_default()
}

fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

/// Go's `unescape(s, encodePath)`: every `%XX` decoded once, `+` kept;
/// `None` for an invalid escape (Go answers 400). Bytes that are not UTF-8
/// are replaced, where Go would keep them.
fn go_path_unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let value = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(value);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn record(state: &State, r: RecordedRequest) -> usize {
    let mut reqs = state.requests.lock().unwrap_or_else(|p| p.into_inner());
    if reqs.len() >= MAX_RECORDED {
        reqs.drain(..MAX_RECORDED / 10);
    }
    reqs.push(r);
    reqs.len() - 1
}

fn update_record(state: &State, idx: usize, f: impl FnOnce(&mut RecordedRequest)) {
    let mut reqs = state.requests.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = reqs.get_mut(idx) {
        f(r);
    }
}

/// The parsed request: who, what, how to answer.
struct Ctx {
    state: Arc<State>,
    user: UserInfo,
    query: HashMap<String, String>,
    accept: Accept,
    pretty: bool,
    user_agent: String,
    /// The client accepts gzip (`Accept-Encoding`).
    gzip: bool,
}

impl Ctx {
    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("true") | Some("1"))
    }

    fn json(&self, status: u16, v: &Value) -> Response<Body> {
        wire::object_response(status, v, self.pretty, self.accept.yaml, self.gzip)
    }

    fn err(&self, e: &ApiError) -> Response<Body> {
        wire::error_response(e, self.pretty)
    }

    fn write_options(&self, subresource: &str) -> WriteOptions {
        // Like the API server: an explicit fieldManager, else the User-Agent's program name.
        let manager = self.q("fieldManager").map(String::from).or_else(|| {
            let prog = self.user_agent.split('/').next().unwrap_or("").trim();
            (!prog.is_empty()).then(|| prog.to_string())
        });
        WriteOptions {
            dry_run: self.q("dryRun") == Some("All"),
            field_manager: manager,
            force: self.flag("force"),
            subresource: (!subresource.is_empty()).then(|| subresource.to_string()),
            propagation: self.q("propagationPolicy").map(String::from),
        }
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    let accept = Accept::parse(
        headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let user_agent = headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let pretty = user_agent.starts_with("curl");
    let idx = record(
        &state,
        RecordedRequest {
            method: req.method().to_string(),
            uri: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_else(|| req.uri().path().to_string()),
            http_version: format!("{:?}", req.version()),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            token: token.clone(),
            authenticated: None,
            impersonated: None,
            wanted_protobuf: accept.protobuf,
            status: 0,
        },
    );
    let response = handle_authenticated(&state, req, token, accept, pretty, user_agent, idx).await;
    let code = response.status().as_u16();
    update_record(&state, idx, |r| r.status = code);
    response
}

async fn handle_authenticated(
    state: &Arc<State>,
    req: Request<Incoming>,
    token: Option<String>,
    accept: Accept,
    pretty: bool,
    user_agent: String,
    idx: usize,
) -> Response<Body> {
    // The API server reads Go's `url.URL.Path`: the path percent-decoded
    // once (`%2F` included); an invalid escape never reaches a handler.
    let Some(path) = go_path_unescape(req.uri().path()) else {
        return text_response(400, "400 Bad Request");
    };
    if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") && token.is_none() {
        return text_response(200, "ok");
    }
    let Some(user) = token.as_deref().and_then(|t| authenticate(state, t)) else {
        return wire::error_response(&ApiError::unauthorized(), pretty);
    };
    update_record(state, idx, |r| r.authenticated = Some(user.clone()));
    let imp = Impersonation::from_headers(req.headers());
    let user = if imp.is_empty() {
        user
    } else {
        let Some(target) = imp.user_info() else {
            return wire::error_response(
                &ApiError::internal(
                    "requested impersonation of groups or extra without a user; add Impersonate-User",
                ),
                pretty,
            );
        };
        let checks = [("users", target.username.clone())]
            .into_iter()
            .chain(imp.groups.iter().map(|g| ("groups", g.clone())));
        for (resource, name) in checks {
            let a = Attributes {
                verb: "impersonate".into(),
                resource: resource.into(),
                name: name.clone(),
                ..Default::default()
            };
            if !authorize(state, &user, &a).0 {
                return wire::error_response(
                    &ApiError::forbidden(
                        &user.username,
                        "impersonate",
                        "",
                        resource,
                        "",
                        "",
                        &name,
                    ),
                    pretty,
                );
            }
        }
        update_record(state, idx, |r| r.impersonated = Some(target.clone()));
        target
    };
    if accept.protobuf && !accept.json {
        return wire::error_response(&ApiError::not_acceptable(), pretty);
    }
    // Every route but the health checks, OpenAPI and the JWKS (which checks
    // its own type) produces JSON (and YAML, protobuf): nothing else is
    // acceptable.
    let own_types = matches!(
        path.as_str(),
        "/healthz" | "/livez" | "/readyz" | "/openid/v1/jwks"
    ) || path.starts_with("/openapi/");
    if !own_types && !accept.json && !accept.protobuf {
        return wire::error_response(&ApiError::route_not_acceptable(), pretty);
    }
    let gzip = req
        .headers()
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|e| e.split(';').next().unwrap_or("").trim() == "gzip")
        });
    let ctx = Ctx {
        state: state.clone(),
        user,
        query: query_map(req.uri().query()),
        accept,
        pretty,
        user_agent,
        gzip,
    };
    route(ctx, req, &path).await
}

fn text_response(status: u16, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("cache-control", "no-cache, private")
        .body(wire::full(text.to_string()))
        .expect("valid response")
}

fn raw_json(status: u16, content_type: &str, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("JSON");
    Response::builder()
        .status(status)
        .header("cache-control", "public, max-age=3600")
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(wire::full(body))
        .expect("valid response")
}

async fn route(ctx: Ctx, req: Request<Incoming>, path: &str) -> Response<Body> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let is_resource = matches!(
        segs.as_slice(),
        ["api", "v1", _, ..] | ["apis", _, _, _, ..]
    );
    if !is_resource {
        let verb = match *req.method() {
            Method::GET | Method::HEAD => "get",
            Method::POST => "post",
            Method::PUT => "put",
            Method::DELETE => "delete",
            _ => "get",
        };
        let a = Attributes {
            verb: verb.into(),
            path: Some(path.to_string()),
            ..Default::default()
        };
        if !authorize(&ctx.state, &ctx.user, &a).0 {
            return ctx.err(&ApiError::forbidden_path(&ctx.user.username, verb, path));
        }
        return non_resource(&ctx, &segs);
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => unreachable!("checked above"),
    };
    // The API server's RequestInfo rules for namespaces.
    let mut rest: Vec<&str> = rest.to_vec();
    let mut namespace = "";
    if rest.first() == Some(&"namespaces") && rest.len() > 1 {
        namespace = rest[1];
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest.drain(..2);
        } else {
            namespace = "";
        }
    }
    let (resource, name, subresource) = match rest.as_slice() {
        [r] => (*r, "", ""),
        [r, n] => (*r, *n, ""),
        [r, n, s] => (*r, *n, *s),
        _ => return ctx.err(&ApiError::no_such_path()),
    };
    let (resource, namespace) = if resource == "namespaces" {
        (resource, "")
    } else {
        (resource, namespace)
    };
    let registry = ctx.state.store.registry();
    if registry.versions(group).is_empty() {
        // No handler for the group at all: Go's NotFound. (A version the
        // simulator does not serve of a group it does gets the Status: it
        // serves fewer versions than kube-apiserver.)
        return wire::page_not_found();
    }
    let Some(def) = registry.find(group, version, resource).cloned() else {
        return ctx.err(&ApiError::no_such_path());
    };
    if !subresource.is_empty() && def.subresource(subresource).is_none() {
        return ctx.err(&ApiError::no_such_path());
    }
    let is_watch = ctx.flag("watch");
    let verb = match (req.method().clone(), name.is_empty()) {
        (Method::GET | Method::HEAD, true) if is_watch => "watch",
        (Method::GET | Method::HEAD, true) => "list",
        (Method::GET | Method::HEAD, false) => "get",
        (Method::POST, _) => "create",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, true) => "deletecollection",
        (Method::DELETE, false) => "delete",
        (m, _) => {
            return ctx.err(&ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({m})"
            )));
        }
    };
    let verb = if matches!(subresource, "exec" | "attach" | "portforward") {
        "create"
    } else {
        verb
    };
    let attrs = Attributes {
        verb: verb.into(),
        group: def.group.clone(),
        resource: def.plural.clone(),
        subresource: subresource.into(),
        namespace: namespace.into(),
        name: name.into(),
        path: None,
    };
    if !authorize(&ctx.state, &ctx.user, &attrs).0 {
        return ctx.err(&ApiError::forbidden(
            &ctx.user.username,
            verb,
            &def.group,
            &def.plural,
            subresource,
            namespace,
            name,
        ));
    }
    if def.namespaced && namespace.is_empty() && !name.is_empty() {
        return ctx.err(&ApiError::no_such_path());
    }
    let (namespace, name, subresource) = (
        namespace.to_string(),
        name.to_string(),
        subresource.to_string(),
    );
    match subresource.as_str() {
        "exec" | "attach" | "portforward" => {
            return streaming(&ctx, req, &def, &namespace, &name, &subresource).await;
        }
        "log" => return pod_log(&ctx, &def, &namespace, &name),
        "token" => return token_request(&ctx, req, &namespace, &name).await,
        _ => {}
    }
    if resources::is_review(&def) {
        if req.method() != Method::POST {
            return ctx.err(&ApiError::method_not_allowed(
                "reviews are created with POST",
            ));
        }
        return review(&ctx, req, &def, &namespace).await;
    }
    match verb {
        "get" => match ctx.state.store.get_in(&def, &namespace, &name) {
            Ok(obj) => respond_object(&ctx, &def, 200, obj),
            Err(e) => ctx.err(&e),
        },
        "list" => list(&ctx, &def, &namespace),
        "watch" => watch(&ctx, &def, &namespace),
        "create" => {
            let body = match read_json(&ctx, req).await {
                Ok(b) => b,
                Err(e) => return ctx.err(&e),
            };
            match ctx
                .state
                .store
                .create_in(&def, &namespace, body, &ctx.write_options(""))
            {
                Ok(obj) => respond_object(&ctx, &def, 201, obj),
                Err(e) => ctx.err(&e),
            }
        }
        "update" => {
            let body = match read_json(&ctx, req).await {
                Ok(b) => b,
                Err(e) => return ctx.err(&e),
            };
            match ctx.state.store.update_in(
                &def,
                &namespace,
                &name,
                body,
                &ctx.write_options(&subresource),
            ) {
                Ok(obj) => respond_object(&ctx, &def, 200, obj),
                Err(e) => ctx.err(&e),
            }
        }
        "patch" => patch(&ctx, req, &def, &namespace, &name, &subresource).await,
        "delete" => delete(&ctx, req, &def, &namespace, &name).await,
        "deletecollection" => delete_collection(&ctx, &def, &namespace),
        _ => ctx.err(&ApiError::no_such_path()),
    }
}

fn non_resource(ctx: &Ctx, segs: &[&str]) -> Response<Body> {
    let registry = ctx.state.store.registry();
    let found = match segs {
        ["version"] => Some(discovery::version(ctx.state.config.minor_version)),
        ["healthz"] | ["livez"] | ["readyz"] => return text_response(200, "ok"),
        ["api"] => Some(discovery::api_versions(&ctx.state.addr.to_string())),
        ["api", v] => discovery::resource_list(&registry, "", v),
        ["apis"] => Some(discovery::api_group_list(&registry)),
        ["apis", g] => discovery::api_group(&registry, g),
        ["apis", g, v] => discovery::resource_list(&registry, g, v),
        [".well-known", "openid-configuration"] => {
            return raw_json(
                200,
                "application/json",
                &ctx.state.issuer.discovery_document(),
            );
        }
        ["openid", "v1", "jwks"] => {
            // The route produces only application/jwk-set+json: a client
            // asking for application/json alone gets 406, as from
            // kube-apiserver (whose go-restful route says so).
            if !ctx.accept.jwk_set {
                return ctx.err(&ApiError::route_not_acceptable());
            }
            return raw_json(200, "application/jwk-set+json", &ctx.state.issuer.jwks());
        }
        ["openapi", "v3"] => Some(discovery::openapi_v3_root(&registry)),
        ["openapi", "v3", "api", v] => discovery::openapi_v3_group_version(&registry, "", v),
        ["openapi", "v3", "apis", g, v] => discovery::openapi_v3_group_version(&registry, g, v),
        _ => None,
    };
    match found {
        Some(v) => ctx.json(200, &v),
        None => ctx.err(&ApiError::no_such_path()),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            ApiError::bad_request(format!(
                "reading the request body failed (limit {MAX_BODY} bytes): {e}"
            ))
        })
}

async fn read_json(ctx: &Ctx, req: Request<Incoming>) -> Result<Value, ApiError> {
    let ct = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let _ = ctx;
    let body = read_body(req).await?;
    if ct.starts_with("application/vnd.kubernetes.protobuf") {
        return super::proto::decode(&body).map_err(|why| {
            let mut e = ApiError::unsupported_media_type(&ct);
            e.message = format!("{}: {why}", e.message);
            e
        });
    }
    if ct.starts_with("application/yaml") {
        return serde_yaml::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid YAML: {e}"))
        });
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

/// Strips `kind`/`apiVersion` from list items of built-in resources, as the
/// API server does (fixture `secret-list`).
fn list_item(def: &ResourceDef, obj: &Value) -> Value {
    if !def.builtin {
        return obj.clone();
    }
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.shift_remove("kind");
        m.shift_remove("apiVersion");
    }
    o
}

fn respond_object(ctx: &Ctx, def: &ResourceDef, status: u16, obj: Value) -> Response<Body> {
    if ctx.accept.metadata_only && !ctx.accept.table {
        return ctx.json(status, &table::partial_metadata(&obj));
    }
    if ctx.accept.table && status == 200 {
        let rv = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let t = table::table(
            def,
            &[obj],
            &rv,
            IncludeObject::parse(ctx.q("includeObject")),
            true,
        );
        return ctx.json(200, &t);
    }
    ctx.json(status, &obj)
}

fn selectors(ctx: &Ctx) -> Result<(LabelSelector, FieldSelector), ApiError> {
    Ok((
        LabelSelector::parse(ctx.q("labelSelector").unwrap_or(""))?,
        FieldSelector::parse(ctx.q("fieldSelector").unwrap_or(""))?,
    ))
}

/// A list `continue` token: the list's resourceVersion and the last key sent.
fn continue_token(rv: u64, last: &Value) -> String {
    use base64::Engine;
    let ns = last
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = last
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{ns}/{name}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

/// `(resourceVersion, start key)` of a `continue` token.
fn parse_continue(token: &str) -> Result<(u64, String), ApiError> {
    use base64::Engine;
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: use the metadata.continue of the previous page, with the same selectors",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v
        .get("start")
        .and_then(Value::as_str)
        .ok_or_else(bad)?
        .to_string();
    Ok((rv, start))
}

fn list(ctx: &Ctx, def: &ResourceDef, namespace: &str) -> Response<Body> {
    let (labels, fields) = match selectors(ctx) {
        Ok(s) => s,
        Err(e) => return ctx.err(&e),
    };
    let (mut items, mut rv) = ctx
        .state
        .store
        .list_in(def, Some(namespace), &labels, &fields);
    // Pagination: items come in key order (namespace, name).
    if let Some(token) = ctx.q("continue").filter(|t| !t.is_empty()) {
        let (token_rv, start) = match parse_continue(token) {
            Ok(t) => t,
            Err(e) => return ctx.err(&e),
        };
        rv = token_rv;
        items.retain(|o| {
            let ns = o
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            let name = o
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            format!("{ns}/{name}\u{0}") > start
        });
    }
    let mut page_meta = serde_json::Map::new();
    page_meta.insert("resourceVersion".into(), rv.to_string().into());
    if let Some(limit) = ctx
        .q("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = items.last().expect("limit > 0");
        page_meta.insert("continue".into(), continue_token(rv, last).into());
        page_meta.insert("remainingItemCount".into(), remaining.into());
    }
    if ctx.accept.table {
        let mut t = table::table(
            def,
            &items,
            &rv.to_string(),
            IncludeObject::parse(ctx.q("includeObject")),
            true,
        );
        t["metadata"] = Value::Object(page_meta);
        return ctx.json(200, &t);
    }
    if ctx.accept.metadata_only {
        let list = json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": page_meta,
            "items": items.iter().map(table::partial_metadata).collect::<Vec<_>>(),
        });
        return ctx.json(200, &list);
    }
    let list = json!({
        "kind": format!("{}List", def.kind),
        "apiVersion": def.api_version(),
        "metadata": page_meta,
        "items": items.iter().map(|o| list_item(def, o)).collect::<Vec<_>>(),
    });
    ctx.json(200, &list)
}

type Tx = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

/// A streaming response whose body is fed through the returned sender.
fn streaming_response(content_type: &str) -> (Tx, Response<Body>) {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(64);
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let body = BodyExt::boxed(StreamBody::new(stream));
    let resp = Response::builder()
        .status(200)
        .header("cache-control", "no-cache, private")
        .header("content-type", content_type)
        .body(body)
        .expect("valid response");
    (tx, resp)
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON");
    line.push(b'\n');
    Bytes::from(line)
}

/// One watch served, counted for its user while it lasts
/// ([`super::SimHandle::open_watches_of`]).
struct WatchOf {
    state: Arc<State>,
    username: String,
}

impl WatchOf {
    fn count(state: &Arc<State>, username: &str) -> WatchOf {
        *state
            .watches_by_user
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(username.to_owned())
            .or_default() += 1;
        WatchOf {
            state: state.clone(),
            username: username.to_owned(),
        }
    }
}

impl Drop for WatchOf {
    fn drop(&mut self) {
        let mut counts = self
            .state
            .watches_by_user
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.username) {
            *count -= 1;
        }
    }
}

fn watch(ctx: &Ctx, def: &ResourceDef, namespace: &str) -> Response<Body> {
    let (labels, fields) = match selectors(ctx) {
        Ok(s) => s,
        Err(e) => return ctx.err(&e),
    };
    let from = match ctx.q("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                return ctx.err(&ApiError::bad_request(format!(
                    "invalid resourceVersion {rv:?}: use the resourceVersion of a list or an object"
                )));
            }
        },
    };
    let timeout = ctx
        .q("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let bookmarks = ctx.flag("allowWatchBookmarks");
    let as_table = ctx.accept.table;
    let metadata_only = ctx.accept.metadata_only;
    let include = IncludeObject::parse(ctx.q("includeObject"));
    let (tx, resp) = streaming_response("application/json");
    let started = ctx.state.store.watch_in(def, from);
    let counted = WatchOf::count(&ctx.state, &ctx.user.username);
    let store = ctx.state.store.clone();
    let def = def.clone();
    let namespace = namespace.to_string();
    let interval = ctx.state.config.bookmark_interval;
    tokio::spawn(async move {
        let _counted = counted;
        let (first, mut rx, mut last_rv) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = tx
                    .send(Ok(Frame::data(event_line("ERROR", &e.to_status()))))
                    .await;
                return;
            }
        };
        let selected = |o: &Value| labels.matches(o) && fields.matches(o);
        // The event this watcher sees, if any: a change that moves an object
        // into or out of the selectors is ADDED or DELETED, like the API server.
        let seen = |ev: &store::WatchEvent| -> Option<&'static str> {
            if ev.group != def.group
                || ev.resource != def.plural
                || !(namespace.is_empty() || ev.namespace == namespace)
            {
                return None;
            }
            let now = selected(&ev.object);
            match (ev.kind, ev.previous.as_ref().map(&selected)) {
                (EventType::Modified, Some(false)) if now => Some("ADDED"),
                (EventType::Modified, Some(true)) if !now => Some("DELETED"),
                (kind, _) if now => Some(kind.as_str()),
                _ => None,
            }
        };
        let render = |kind: &str, ev: &store::WatchEvent| {
            let obj = if as_table {
                let rv = ev.resource_version.to_string();
                table::table(&def, std::slice::from_ref(&ev.object), &rv, include, true)
            } else if metadata_only {
                table::partial_metadata(&ev.object)
            } else {
                ev.object.clone()
            };
            event_line(kind, &obj)
        };
        for ev in &first {
            if let Some(kind) = seen(ev)
                && tx.send(Ok(Frame::data(render(kind, ev)))).await.is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    let rv = store.resource_version();
                    if rx.is_empty() {
                        let mut obj = json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                        if as_table {
                            obj = table::table(&def, &[], &rv.to_string(), include, false);
                        }
                        if tx.send(Ok(Frame::data(event_line("BOOKMARK", &obj)))).await.is_err() {
                            return;
                        }
                    }
                }
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        last_rv = ev.resource_version;
                        if let Some(kind) = seen(&ev)
                            && tx.send(Ok(Frame::data(render(kind, &ev)))).await.is_err() {
                                return;
                            }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // This watcher fell too far behind: it must re-list.
                        let e = ApiError::expired(last_rv, store.resource_version());
                        let _ = tx.send(Ok(Frame::data(event_line("ERROR", &e.to_status())))).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    resp
}

async fn patch(
    ctx: &Ctx,
    req: Request<Incoming>,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
    subresource: &str,
) -> Response<Body> {
    let ct = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let Some(pt) = PatchType::from_content_type(&ct) else {
        return ctx.err(&ApiError::unsupported_media_type(&ct));
    };
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return ctx.err(&e),
    };
    let parsed: Result<Value, String> = if pt == PatchType::Apply {
        serde_yaml::from_slice(&body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    };
    let body = match parsed {
        Ok(v) => v,
        Err(e) => {
            return ctx.err(&ApiError::bad_request(format!(
                "the patch is not valid: {e}"
            )));
        }
    };
    let opts = ctx.write_options(subresource);
    let store = &ctx.state.store;
    if pt == PatchType::Apply {
        return match store.apply_in(def, namespace, name, body, &opts) {
            Ok((obj, created)) => respond_object(ctx, def, if created { 201 } else { 200 }, obj),
            Err(e) => ctx.err(&e),
        };
    }
    match store.patch_in(def, namespace, name, pt, &body, &opts) {
        Ok(obj) => respond_object(ctx, def, 200, obj),
        Err(e) => ctx.err(&e),
    }
}

async fn delete(
    ctx: &Ctx,
    req: Request<Incoming>,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
) -> Response<Body> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return ctx.err(&e),
    };
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return ctx.err(&ApiError::bad_request(format!(
                    "the DeleteOptions body is not valid JSON: {e}"
                )));
            }
        }
    };
    let mut opts = ctx.write_options("");
    if let Some(dry) = options.get("dryRun").and_then(Value::as_array) {
        opts.dry_run |= dry.iter().any(|d| d == "All");
    }
    if let Some(policy) = options.get("propagationPolicy").and_then(Value::as_str) {
        opts.propagation = Some(policy.to_string());
    }
    match ctx
        .state
        .store
        .delete_in(def, namespace, name, &opts, options.get("preconditions"))
    {
        Ok(obj) if def.group.is_empty() && def.plural == "pods" => ctx.json(200, &obj),
        // Kept for its finalizers: the object, marked for deletion.
        Ok(obj) if obj.pointer("/metadata/deletionTimestamp").is_some() => ctx.json(200, &obj),
        Ok(obj) => {
            let uid = obj
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            ctx.json(
                200,
                &status::delete_success(&def.group, &def.plural, name, uid),
            )
        }
        Err(e) => ctx.err(&e),
    }
}

fn delete_collection(ctx: &Ctx, def: &ResourceDef, namespace: &str) -> Response<Body> {
    let (labels, fields) = match selectors(ctx) {
        Ok(s) => s,
        Err(e) => return ctx.err(&e),
    };
    let opts = ctx.write_options("");
    let (items, _) = ctx
        .state
        .store
        .list_in(def, Some(namespace), &labels, &fields);
    let mut deleted = Vec::new();
    for item in items {
        let ns = item
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = item
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Ok(obj) = ctx.state.store.delete_in(def, &ns, &name, &opts, None) {
            deleted.push(list_item(def, &obj));
        }
    }
    let list = json!({
        "kind": format!("{}List", def.kind),
        "apiVersion": def.api_version(),
        "metadata": {"resourceVersion": ctx.state.store.resource_version().to_string()},
        "items": deleted,
    });
    ctx.json(200, &list)
}

fn pod_log(ctx: &Ctx, def: &ResourceDef, namespace: &str, name: &str) -> Response<Body> {
    let pod = match ctx.state.store.get_in(def, namespace, name) {
        Ok(p) => p,
        Err(e) => return ctx.err(&e),
    };
    let containers: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let container = match ctx.q("container") {
        Some(c) if !c.is_empty() => {
            if !containers.iter().any(|x| x == c) {
                return ctx.err(&ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            c.to_string()
        }
        _ if containers.len() == 1 => containers[0].clone(),
        _ if containers.is_empty() => {
            return ctx.err(&ApiError::bad_request(format!(
                "pod {name} has no containers"
            )));
        }
        _ => {
            return ctx.err(&ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            )));
        }
    };
    let timestamps = ctx.flag("timestamps");
    let follow = ctx.flag("follow");
    let tail = ctx.q("tailLines").and_then(|t| t.parse::<usize>().ok());
    let store = ctx.state.store.clone();
    let lines = store.log_lines(namespace, name, &container, 0);
    let mut sent = lines.len();
    let start = tail.map_or(0, |t| lines.len().saturating_sub(t));
    let fmt = move |l: &store::LogLine| {
        if timestamps {
            format!("{} {}\n", l.timestamp, l.text)
        } else {
            format!("{}\n", l.text)
        }
    };
    let initial: String = lines[start..].iter().map(&fmt).collect();
    if !follow {
        return Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("cache-control", "no-cache, private")
            .body(wire::full(initial))
            .expect("valid response");
    }
    let (tx, resp) = streaming_response("text/plain");
    let uid = pod.pointer("/metadata/uid").cloned();
    let (namespace, name) = (namespace.to_string(), name.to_string());
    let def = def.clone();
    tokio::spawn(async move {
        if !initial.is_empty()
            && tx
                .send(Ok(Frame::data(Bytes::from(initial))))
                .await
                .is_err()
        {
            return;
        }
        loop {
            let notified = store.log_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let fresh = store.log_lines(&namespace, &name, &container, sent);
            if !fresh.is_empty() {
                sent += fresh.len();
                let chunk: String = fresh.iter().map(&fmt).collect();
                if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                    return;
                }
                continue;
            }
            let alive = store
                .get_in(&def, &namespace, &name)
                .ok()
                .is_some_and(|p| p.pointer("/metadata/uid").cloned() == uid);
            if !alive {
                return;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tx.closed() => return,
            }
        }
    });
    resp
}

async fn streaming(
    ctx: &Ctx,
    req: Request<Incoming>,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
    subresource: &str,
) -> Response<Body> {
    let pod = match ctx.state.store.get_in(def, namespace, name) {
        Ok(p) => p,
        Err(e) => return ctx.err(&e),
    };
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let wanted = ctx.q("container").filter(|c| !c.is_empty());
    let container = match wanted {
        Some(c) => match containers
            .iter()
            .find(|x| x.get("name").and_then(Value::as_str) == Some(c))
        {
            Some(x) => x.clone(),
            None => {
                return ctx.err(&ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
        },
        None => containers.first().cloned().unwrap_or_default(),
    };
    let env = container
        .get("env")
        .and_then(Value::as_array)
        .map(|env| {
            env.iter()
                .filter_map(|e| {
                    Some((
                        e.get("name")?.as_str()?.to_string(),
                        e.get("value")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let ports = ctx
        .state
        .pod_ports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(namespace.to_string(), name.to_string()))
        .cloned()
        .unwrap_or_default();
    let target = StreamTarget {
        namespace: namespace.into(),
        pod: name.into(),
        container: container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        env,
        ports,
        ..StreamTarget::default()
    };
    match subresource {
        "exec" => stream::exec(req, target).await,
        "attach" => stream::attach(req, target).await,
        _ => stream::port_forward(req, target).await,
    }
}

/// `POST .../serviceaccounts/NAME/token` (TokenRequest).
async fn token_request(
    ctx: &Ctx,
    req: Request<Incoming>,
    namespace: &str,
    name: &str,
) -> Response<Body> {
    let body = match read_json(ctx, req).await {
        Ok(b) => b,
        Err(e) => return ctx.err(&e),
    };
    let audiences: Option<Vec<String>> = body
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty());
    let ttl = body
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(3600);
    let pod = body
        .pointer("/spec/boundObjectRef")
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("Pod"))
        .map(|r| {
            (
                r.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                r.get("uid")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        });
    let uid = service_account_uid(&ctx.state, namespace, name);
    let req = super::TokenRequest {
        namespace: namespace.into(),
        service_account: name.into(),
        pod,
        audience: audiences,
        ttl: Duration::from_secs(ttl),
    };
    match ctx.state.issuer.mint(&req, &uid) {
        Ok(token) => {
            let exp = time::OffsetDateTime::now_utc() + time::Duration::seconds(ttl as i64);
            let exp = exp
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let mut out = body.clone();
            if let Some(m) = out.as_object_mut() {
                m.insert("kind".into(), "TokenRequest".into());
                m.insert("apiVersion".into(), "authentication.k8s.io/v1".into());
                m.insert(
                    "status".into(),
                    json!({"token": token, "expirationTimestamp": exp}),
                );
            }
            ctx.json(201, &out)
        }
        Err(e) => ctx.err(&ApiError::internal(format!(
            "minting the token failed: {e}"
        ))),
    }
}

async fn review(
    ctx: &Ctx,
    req: Request<Incoming>,
    def: &ResourceDef,
    namespace: &str,
) -> Response<Body> {
    let body = match read_json(ctx, req).await {
        Ok(b) => b,
        Err(e) => return ctx.err(&e),
    };
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let status = match def.plural.as_str() {
        "selfsubjectreviews" => json!({"userInfo": ctx.user.to_review_user()}),
        "tokenreviews" => {
            let token = spec.get("token").and_then(Value::as_str).unwrap_or("");
            let audiences: Vec<String> = spec
                .get("audiences")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .filter(|a: &Vec<String>| !a.is_empty())
                .unwrap_or_else(|| ctx.state.api_audiences.clone());
            let static_user = if token == ctx.state.admin_token
                || ctx
                    .state
                    .static_tokens
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(token)
            {
                authenticate(&ctx.state, token).map(|u| (u, audiences.clone()))
            } else {
                None
            };
            match static_user.or_else(|| ctx.state.issuer.verify(token, &audiences)) {
                Some((user, auds)) => json!({
                    "authenticated": true,
                    "user": user.to_review_user(),
                    "audiences": auds,
                }),
                None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
            }
        }
        _ => {
            let (user, ns_override) = match def.plural.as_str() {
                "selfsubjectaccessreviews" => (ctx.user.clone(), None),
                _ => {
                    let extra = spec
                        .get("extra")
                        .and_then(|e| serde_json::from_value(e.clone()).ok())
                        .unwrap_or_default();
                    let groups = spec
                        .get("groups")
                        .and_then(|g| serde_json::from_value(g.clone()).ok())
                        .unwrap_or_default();
                    let u = UserInfo {
                        username: spec
                            .get("user")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                        uid: spec.get("uid").and_then(Value::as_str).unwrap_or("").into(),
                        groups,
                        extra,
                    };
                    let ns =
                        (def.plural == "localsubjectaccessreviews").then(|| namespace.to_string());
                    (u, ns)
                }
            };
            let attrs = if let Some(ra) = spec.get("resourceAttributes") {
                let s = |k: &str| ra.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                Attributes {
                    verb: s("verb"),
                    group: s("group"),
                    resource: s("resource"),
                    subresource: s("subresource"),
                    namespace: ns_override.clone().unwrap_or_else(|| s("namespace")),
                    name: s("name"),
                    path: None,
                }
            } else if let Some(nra) = spec.get("nonResourceAttributes") {
                Attributes {
                    verb: nra.get("verb").and_then(Value::as_str).unwrap_or("").into(),
                    path: Some(nra.get("path").and_then(Value::as_str).unwrap_or("").into()),
                    ..Default::default()
                }
            } else {
                return ctx.err(&ApiError::invalid(
                    &def.group,
                    &def.kind,
                    "",
                    "spec.resourceAttributes",
                    "FieldValueRequired",
                    "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
                ));
            };
            let (allowed, reason) = authorize(&ctx.state, &user, &attrs);
            let mut st = serde_json::Map::new();
            st.insert("allowed".into(), allowed.into());
            if !reason.is_empty() {
                st.insert("reason".into(), reason.into());
            }
            Value::Object(st)
        }
    };
    // kube-apiserver 1.20 records who wrote the review's spec, as for any
    // create (operation Update, the manager from the User-Agent).
    let mut metadata = json!({"creationTimestamp": null});
    if let Some(manager) = ctx.write_options("").field_manager {
        let fields = super::fields::field_set(&json!({"spec": spec}));
        metadata["managedFields"] = json!([{
            "manager": manager,
            "operation": "Update",
            "apiVersion": def.api_version(),
            "time": super::store::now_rfc3339(),
            "fieldsType": "FieldsV1",
            "fieldsV1": super::fields::to_fields_v1(&fields),
        }]);
    }
    let out = json!({
        "kind": def.kind,
        "apiVersion": def.api_version(),
        "metadata": metadata,
        "spec": spec,
        "status": status,
    });
    ctx.json(201, &out)
}
