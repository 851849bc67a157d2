//! One request through the proxy: guard, rewrite, forward upstream, stream
//! the response back (through the guard's transform and observer), or tunnel
//! an upgraded connection.

use std::{convert::Infallible, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::{body::Incoming, upgrade::OnUpgrade};

use super::{
    Shared,
    body::{BodyObserver, CutShort, ProxyBody, RequestBody, Transformed, status_response},
    guard::{ConnectionInfo, Forward, Guard, ResponseObserver, Verdict},
    tunnel,
    upstream::UpstreamBody,
};
use crate::kstatus::Status;

/// Hop-by-hop headers (RFC 9110 §7.6.1): meaningful for one connection only,
/// never forwarded. Headers named in `Connection` are removed as well.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
];

pub(super) async fn handle<G: Guard>(
    shared: Arc<Shared<G>>,
    upstream: Arc<super::Upstream>,
    conn: Arc<ConnectionInfo>,
    connection: Arc<G::Connection>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let upgrade = is_upgrade_request(&parts.headers);
    let agent_upgrade = if upgrade {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };

    let mut body = RequestBody::new(body.map_err(Into::into).boxed_unsync());
    // Boxed: the guard's future holds every stage's state (tens of KiB),
    // and inline it made this request's future as large, copied whole each
    // time hyper and tokio move it (into the stream, into the task, out of
    // it): a third of a proxied GET's instructions were those copies.
    let mut forward = match Box::pin(
        shared
            .guard
            .check(&conn, &connection, &mut parts, &mut body),
    )
    .await
    {
        Verdict::Respond(response) => return Ok(response),
        Verdict::Forward(forward) => forward,
    };

    // A declared body over the limit is refused before anything is sent.
    if let Some(length) = content_length(&parts.headers)
        && length > shared.config.max_request_body
    {
        return Ok(status_response(&too_large(shared.config.max_request_body)));
    }

    let upstream = if forward.own_credentials {
        upstream.with_own_credentials()
    } else {
        &upstream
    };
    let mut upstream_request = Request::builder()
        .method(parts.method.clone())
        .uri(upstream.uri_for(parts.uri.path_and_query()))
        .version(http::Version::HTTP_11)
        .body(observe_request(
            if upgrade {
                body.into_body()
            } else {
                Limited::new(body.into_body(), shared.config.max_request_body)
                    .map_err(Into::into)
                    .boxed_unsync()
            },
            forward.request_observer.take(),
        ))
        .expect("method and URI come from a valid request");
    let headers = upstream_request.headers_mut();
    *headers = parts.headers;
    strip_hop_by_hop(headers, upgrade);
    headers.remove(header::HOST);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }

    let response = match upstream.send(upstream_request, upgrade).await {
        Ok(response) => response,
        Err(error) => {
            let status = upstream_error(&shared, &error);
            tracing::warn!(conn = %conn.id, error = %error_chain(&error), "upstream request failed");
            return Ok(answer_with_status(forward.observer, &status));
        }
    };

    if upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(switch_protocols(
            &shared,
            &conn,
            response,
            agent_upgrade,
            forward,
        ));
    }
    Ok(stream_response(response, forward))
}

/// Chaperone answers with a `Status` instead of the API server's response
/// (upstream unreachable, a body that cannot be masked): the observer sees
/// that answer begin and end, so it is recorded and audited like any other.
fn answer_with_status(
    observer: Option<Box<dyn ResponseObserver>>,
    status: &Status,
) -> Response<ProxyBody> {
    let response = status_response(status);
    if let Some(observer) = observer
        && let Some(mut body) = observer.on_response(response.status(), response.headers())
    {
        body.on_data(&status.to_body());
        body.on_end(Ok(()));
    }
    response
}

fn observe_request(body: ProxyBody, observer: Option<Box<dyn BodyObserver>>) -> ProxyBody {
    match observer {
        None => body,
        Some(observer) => Transformed::new(body, None, Some(observer)).boxed_unsync(),
    }
}

fn stream_response(response: Response<UpstreamBody>, forward: Forward) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let transform = match forward.response_transform {
        Some(factory) if parts.status.is_success() => match factory(&parts.headers) {
            Ok(transform) => transform,
            Err(status) => return answer_with_status(forward.observer, &status),
        },
        _ => None,
    };
    if transform.is_some() {
        // The transform changes the length; the body is sent chunked.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let body_observer = forward
        .observer
        .and_then(|observer| observer.on_response(parts.status, &parts.headers));
    let body = body.map_err(Into::into).boxed_unsync();
    let body = if transform.is_none() && body_observer.is_none() {
        body
    } else {
        Transformed::new(body, transform, body_observer).boxed_unsync()
    };
    Response::from_parts(parts, body)
}

fn switch_protocols<G: Guard>(
    shared: &Arc<Shared<G>>,
    conn: &Arc<ConnectionInfo>,
    mut response: Response<UpstreamBody>,
    agent_upgrade: Option<OnUpgrade>,
    forward: Forward,
) -> Response<ProxyBody> {
    let Some(agent_upgrade) = agent_upgrade else {
        return status_response(&Status::bad_request(
            "chaperone: the API server switched protocols but this connection cannot be upgraded \
             (upgrades need HTTP/1.1)",
        ));
    };
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    // Keep Connection/Upgrade: they are the point of a 101.
    for name in HOP_BY_HOP.iter().filter(|n| **n != header::CONNECTION) {
        parts.headers.remove(name);
    }
    let mut observer = forward.observer;
    let tap = observer.as_mut().and_then(|o| o.on_upgrade(&parts.headers));
    // Without a tap (port-forward), the tunnel's end is the exchange's end.
    let mut tunnel_end = observer.and_then(|o| o.on_response(parts.status, &parts.headers));
    let conn = conn.clone();
    shared.tunnels.spawn(async move {
        let result = match tokio::try_join!(agent_upgrade, upstream_upgrade) {
            Ok((agent, upstream)) => {
                tunnel::pump(conn.id, agent, upstream, tap).await;
                Ok(())
            }
            Err(error) => {
                tracing::warn!(conn = %conn.id, %error, "upgrade failed");
                Err(CutShort::Upgrade(error.to_string()))
            }
        };
        if let Some(end) = tunnel_end.as_mut() {
            end.on_end(result);
        }
    });
    Response::from_parts(parts, super::body::empty())
}

fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
/// `keep_upgrade` keeps `Upgrade` for an upgrade request.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // `TE: trailers` is the one TE value that is end-to-end (gRPC, HTTP/2).
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn too_large(limit: usize) -> Status {
    Status::too_large(format!(
        "chaperone: the request body is larger than {limit} bytes, the most chaperone forwards"
    ))
}

fn upstream_error<G: Guard>(
    shared: &Shared<G>,
    error: &hyper_util::client::legacy::Error,
) -> Status {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return too_large(shared.config.max_request_body);
        }
        source = current.source();
    }
    if error.is_connect() {
        Status::service_unavailable(format!(
            "chaperone: cannot reach the API server at {}: {}",
            shared.upstream.base(),
            error_chain(error)
        ))
    } else {
        Status::bad_gateway(format!(
            "chaperone: the request to the API server at {} failed: {}",
            shared.upstream.base(),
            error_chain(error)
        ))
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_with_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer agent"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers, false);
        let left: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(left, vec!["authorization", "accept"]);
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_header() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade_request(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
        assert!(headers.get(header::CONNECTION).is_none());
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(!is_upgrade_request(&headers));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade_request(&headers));
    }
}
