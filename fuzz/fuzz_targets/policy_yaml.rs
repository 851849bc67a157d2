//! Policy YAML (`policy/spec.rs`, `policy/compile.rs`): any text is read
//! into documents or errors with a line, and what reads compiles or says
//! why, without panicking.
#![no_main]

use chaperone::policy::{PolicySet, parse_documents};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let documents = parse_documents(text);
    let policies: Vec<_> = documents
        .into_iter()
        .filter_map(Result::ok)
        .map(|d| d.policy)
        .collect();
    if let Err(errors) = PolicySet::compile(&policies) {
        assert!(!errors.is_empty(), "a failed compile names its errors");
    }
});
