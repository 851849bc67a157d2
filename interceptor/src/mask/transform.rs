//! Masking as the proxy's response body transform: the adapter between
//! [`ResponseMask`] and [`BodyTransform`], counting what it masked for the
//! audit annotation and the metrics.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use http::{HeaderMap, header};

use super::{Masker, ResponseMask};
use crate::proxy::{
    body::{BodyError, BodyTransform},
    guard::TransformFactory,
};
use crate::request::RequestInfo;

/// The transform for the response to `request`, chosen from the response's
/// `Content-Type`: masks what must not be seen and stores how many values
/// it masked in `masked`. A body that cannot be masked is refused (its
/// `Status` answers instead).
pub fn response_transform(
    masker: Masker,
    request: Arc<RequestInfo>,
    masked: Arc<AtomicU32>,
) -> TransformFactory {
    Box::new(move |headers: &HeaderMap| {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        match masker.plan(&request, content_type) {
            Ok(Some(mask)) => Ok(Some(
                Box::new(MaskTransform { mask, masked }) as Box<dyn BodyTransform>
            )),
            Ok(None) => Ok(None),
            Err(error) => Err(Box::new(error.status())),
        }
    })
}

/// A masking transform that counts what it masked for audit and metrics.
struct MaskTransform {
    mask: ResponseMask,
    masked: Arc<AtomicU32>,
}

impl MaskTransform {
    fn count(&self) {
        let stats = self.mask.stats();
        let total = stats.values_masked + stats.pattern_matches;
        self.masked
            .store(u32::try_from(total).unwrap_or(u32::MAX), Ordering::Relaxed);
    }
}

impl BodyTransform for MaskTransform {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BodyError> {
        self.mask
            .push(chunk, out)
            .map_err(|e| Box::new(e) as BodyError)?;
        // Logs and exec: send what is complete now (a prompt, a line).
        self.mask.flush(out);
        self.count();
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), BodyError> {
        self.mask
            .finish(out)
            .map_err(|e| Box::new(e) as BodyError)?;
        self.count();
        Ok(())
    }
}
