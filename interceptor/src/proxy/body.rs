//! The body type that flows through the proxy, both directions, and the
//! streaming transform hook that masking plugs into.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

use crate::kstatus::Status;

/// Errors inside a proxied body. A body error aborts the stream (HTTP/2
/// RST_STREAM, HTTP/1.1 connection close): an agent never receives a
/// truncated body as if it were complete.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy produces or forwards.
pub type ProxyBody = UnsyncBoxBody<Bytes, BodyError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// A Kubernetes `Status` response, as the API server would send it.
pub fn status_response(status: &Status) -> http::Response<ProxyBody> {
    let mut response = http::Response::builder()
        .status(status.code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("cache-control", "no-cache, private");
    if let Some(seconds) = status.retry_after_seconds {
        response = response.header(http::header::RETRY_AFTER, seconds);
    }
    response
        .body(full(status.to_body()))
        .expect("a Status response is always valid")
}

/// A streaming rewrite of a response body (masking). `push` gets the body in
/// whatever chunks arrive and appends what to send to `out`; `finish` flushes
/// what is held back at the end. An error aborts the response.
pub trait BodyTransform: Send + 'static {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BodyError>;
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), BodyError>;
}

/// Sees the bytes the agent actually receives (after any transform) and the
/// end of the body; used for recording and metrics. Must be cheap.
pub trait BodyObserver: Send + 'static {
    fn on_data(&mut self, chunk: &[u8]);
    /// `Ok` when the body completed, `Err` with a reason when it was cut
    /// short (client gone, upstream error, transform refused).
    fn on_end(&mut self, result: Result<(), CutShort>);
}

/// Why a body ended before its end: what recording and audit write as the
/// `StreamEnded` reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CutShort {
    #[error("the body was dropped before it ended (client went away)")]
    ClientGone,
    #[error("the response was dropped before its end")]
    ResponseDropped,
    #[error("upgrade failed: {0}")]
    Upgrade(String),
    /// The upstream body, or the transform rewriting it, failed.
    #[error("{0}")]
    Failed(String),
}

/// A body passed through an optional transform and an optional observer.
pub struct Transformed {
    inner: ProxyBody,
    transform: Option<Box<dyn BodyTransform>>,
    observer: Option<Box<dyn BodyObserver>>,
    finished: bool,
    /// The body ended with its last data frame; the observer hears of it
    /// once that frame is out (next poll or drop).
    end_pending: bool,
    scratch: Vec<u8>,
}

impl Transformed {
    pub fn new(
        inner: ProxyBody,
        transform: Option<Box<dyn BodyTransform>>,
        observer: Option<Box<dyn BodyObserver>>,
    ) -> Self {
        Transformed {
            inner,
            transform,
            observer,
            finished: false,
            end_pending: false,
            scratch: Vec::new(),
        }
    }

    /// Nothing left to read and nothing to add: an empty request body (a
    /// GET's HEADERS frame ends its stream) is never polled.
    fn untouched_end(&self) -> bool {
        self.transform.is_none() && http_body::Body::is_end_stream(&self.inner)
    }

    fn end(&mut self, result: Result<(), CutShort>) {
        if let Some(mut observer) = self.observer.take() {
            observer.on_end(result);
        }
    }
}

impl Drop for Transformed {
    fn drop(&mut self) {
        if self.end_pending || (!self.finished && self.untouched_end()) {
            self.end(Ok(()));
        } else if !self.finished {
            self.end(Err(CutShort::ClientGone));
        }
    }
}

impl http_body::Body for Transformed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if this.finished {
                if std::mem::take(&mut this.end_pending) {
                    this.end(Ok(()));
                }
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => {
                    this.finished = true;
                    this.end(Err(CutShort::Failed(error.to_string())));
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => data,
                        // Trailers pass through untouched.
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    // The upstream sent its last frame: end here, so that
                    // this frame carries the end of the stream (HTTP/2
                    // END_STREAM) instead of an empty frame one more
                    // scheduling round later.
                    let last = http_body::Body::is_end_stream(&this.inner);
                    let out = match &mut this.transform {
                        None => frame,
                        Some(transform) => {
                            this.scratch.clear();
                            let mut result = transform.push(&frame, &mut this.scratch);
                            if last && result.is_ok() {
                                result = transform.finish(&mut this.scratch);
                            }
                            if let Err(error) = result {
                                this.finished = true;
                                this.end(Err(CutShort::Failed(error.to_string())));
                                return Poll::Ready(Some(Err(error)));
                            }
                            if this.scratch.is_empty() && !last {
                                continue;
                            }
                            Bytes::copy_from_slice(&this.scratch)
                        }
                    };
                    if last {
                        this.finished = true;
                        this.end_pending = true;
                    }
                    if let Some(observer) = &mut this.observer {
                        observer.on_data(&out);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(None) => {
                    this.finished = true;
                    let mut tail = Vec::new();
                    if let Some(transform) = &mut this.transform
                        && let Err(error) = transform.finish(&mut tail)
                    {
                        this.end(Err(CutShort::Failed(error.to_string())));
                        return Poll::Ready(Some(Err(error)));
                    }
                    if tail.is_empty() {
                        this.end(Ok(()));
                        return Poll::Ready(None);
                    }
                    if let Some(observer) = &mut this.observer {
                        observer.on_data(&tail);
                    }
                    this.end(Ok(()));
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.untouched_end()
    }
}

/// The agent's request body before it is forwarded. A [`super::Guard`] may
/// read it (bounded) to decide with [`RequestBody::read_whole`]; whatever
/// was read is forwarded unchanged, followed by what was not.
pub struct RequestBody {
    read: bytes::BytesMut,
    rest: Option<ProxyBody>,
    /// Trailers or an error met while reading, replayed in order.
    after: Option<Result<Frame<Bytes>, BodyError>>,
}

/// What [`RequestBody::read_whole`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WholeBody {
    /// The complete body, within the limit.
    Complete(Bytes),
    /// Longer than the limit (declared or read so far): not all of it read.
    TooLarge { read: usize },
    /// Reading it failed (the agent went away mid-body).
    Failed(String),
}

impl RequestBody {
    pub fn new(body: ProxyBody) -> Self {
        RequestBody {
            read: bytes::BytesMut::new(),
            rest: Some(body),
            after: None,
        }
    }

    /// Reads the body if it is at most `limit` bytes. `declared` is its
    /// `Content-Length`: a larger declared body is not read at all.
    pub async fn read_whole(&mut self, limit: usize, declared: Option<usize>) -> WholeBody {
        if declared.is_some_and(|d| d > limit) {
            return WholeBody::TooLarge { read: 0 };
        }
        while self.after.is_none() {
            let Some(rest) = &mut self.rest else {
                break;
            };
            if self.read.len() > limit {
                return WholeBody::TooLarge {
                    read: self.read.len(),
                };
            }
            match rest.frame().await {
                None => self.rest = None,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.read.extend_from_slice(&data),
                    Err(trailers) => self.after = Some(Ok(trailers)),
                },
                Some(Err(error)) => {
                    let why = error.to_string();
                    self.after = Some(Err(error));
                    return WholeBody::Failed(why);
                }
            }
        }
        if self.read.len() > limit {
            return WholeBody::TooLarge {
                read: self.read.len(),
            };
        }
        match &self.after {
            Some(Err(error)) => WholeBody::Failed(error.to_string()),
            _ => WholeBody::Complete(Bytes::copy_from_slice(&self.read)),
        }
    }

    /// The body to forward: what was read, then the rest.
    pub fn into_body(self) -> ProxyBody {
        if self.read.is_empty() && self.after.is_none() {
            return self.rest.unwrap_or_else(empty);
        }
        Replayed {
            read: Some(self.read.freeze()).filter(|b| !b.is_empty()),
            after: self.after,
            rest: self.rest,
        }
        .boxed_unsync()
    }
}

/// A body whose first bytes were read before it was forwarded.
struct Replayed {
    read: Option<Bytes>,
    after: Option<Result<Frame<Bytes>, BodyError>>,
    rest: Option<ProxyBody>,
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(read) = this.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(after) = this.after.take() {
            // Nothing follows trailers or an error.
            this.rest = None;
            return Poll::Ready(Some(after));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_none()
            && self.after.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let read = self.read.as_ref().map_or(0, |b| b.len() as u64);
        match &self.rest {
            None => http_body::SizeHint::with_exact(read),
            Some(rest) => {
                let inner = rest.size_hint();
                let mut hint = http_body::SizeHint::new();
                hint.set_lower(inner.lower() + read);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod request_body_tests {
    use super::*;
    use futures::stream;
    use http_body_util::StreamBody;

    fn chunked(chunks: &[&'static [u8]]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        StreamBody::new(stream::iter(frames)).boxed_unsync()
    }

    async fn all(body: ProxyBody) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_body_read_whole_is_forwarded_unchanged() {
        let mut body = RequestBody::new(chunked(&[b"{\"a\":", b"1}"]));
        assert_eq!(
            body.read_whole(64, None).await,
            WholeBody::Complete(Bytes::from_static(b"{\"a\":1}"))
        );
        assert_eq!(all(body.into_body()).await, b"{\"a\":1}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_forwarded_whole_after_its_read_prefix() {
        let mut body = RequestBody::new(chunked(&[b"0123", b"4567", b"89"]));
        assert_eq!(
            body.read_whole(5, None).await,
            WholeBody::TooLarge { read: 8 }
        );
        assert_eq!(all(body.into_body()).await, b"0123456789");

        // A declared length over the limit: nothing is read.
        let mut body = RequestBody::new(chunked(&[b"0123", b"4567", b"89"]));
        assert_eq!(
            body.read_whole(5, Some(10)).await,
            WholeBody::TooLarge { read: 0 }
        );
        assert_eq!(all(body.into_body()).await, b"0123456789");
    }

    #[tokio::test]
    async fn an_unread_body_is_forwarded_as_is() {
        let body = RequestBody::new(chunked(&[b"abc"]));
        assert_eq!(all(body.into_body()).await, b"abc");
    }
}
