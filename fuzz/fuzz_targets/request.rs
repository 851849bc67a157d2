//! Request interpretation (`request.rs`, the guard's `interpret` stage): any
//! request target hyper accepts is either refused as ambiguous or read one
//! way, and the target chaperone forwards reads the same way again, so the
//! API server acts on exactly what the guard judged.
#![no_main]

use chaperone::request::{CanonicalTarget, RequestInfo};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, target)) = data.split_first() else {
        return;
    };
    let method: http::Method = METHODS[usize::from(selector) % METHODS.len()]
        .parse()
        .expect("a standard method");
    // What hyper hands the guard: a URI parsed from the request line.
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let Ok(canonical) = CanonicalTarget::parse(uri.path(), uri.query()) else {
        return;
    };
    let info = RequestInfo::from_target(&method, &canonical);
    let forwarded = canonical.uri(&uri);
    let again = CanonicalTarget::parse(forwarded.path(), forwarded.query())
        .unwrap_or_else(|e| panic!("the forwarded target {forwarded} is ambiguous: {e}"));
    assert_eq!(again, canonical, "the forwarded target reads differently");
    assert_eq!(
        format!("{:?}", RequestInfo::from_target(&method, &again)),
        format!("{info:?}"),
        "the forwarded target is another request"
    );
    let _ = info.resource_path();
});
