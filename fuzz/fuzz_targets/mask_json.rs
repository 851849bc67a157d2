//! The streaming JSON masker (`mask/json.rs`): whatever bytes arrive, in
//! whatever chunks, it never panics, its output does not depend on where
//! the body was split, and a JSON body comes out as JSON.
#![no_main]

use chaperone::mask::{MaskRules, Masker, Target};
use libfuzzer_sys::fuzz_target;

const TARGETS: [Target; 3] = [Target::Secret, Target::ConfigMap, Target::Workload];

fn run(masker: &Masker, target: Target, watch: bool, chunks: &[&[u8]]) -> Option<Vec<u8>> {
    let mut mask = masker
        .json_response(target, watch)
        .expect("a JSON target has a JSON transform");
    let mut out = Vec::new();
    for chunk in chunks {
        mask.push(chunk, &mut out).ok()?;
    }
    mask.finish(&mut out).ok()?;
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let masker = Masker::new(&MaskRules::default()).expect("the default rules compile");
    let target = TARGETS[usize::from(selector & 3) % TARGETS.len()];
    let watch = selector & 4 != 0;
    let split = if body.is_empty() {
        0
    } else {
        usize::from(selector >> 3) * body.len() / 32
    };
    let whole = run(&masker, target, watch, &[body]);
    let (head, tail) = body.split_at(split.min(body.len()));
    let split_output = run(&masker, target, watch, &[head, tail]);
    assert_eq!(
        whole.is_some(),
        split_output.is_some(),
        "accepted whole but not split at {split} (or the other way)"
    );
    if let (Some(whole), Some(split_output)) = (&whole, &split_output) {
        assert_eq!(
            whole, split_output,
            "the output depends on the split at {split}"
        );
    }
    if !watch
        && serde_json::from_slice::<serde_json::Value>(body).is_ok()
        && let Some(out) = whole
    {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
            "valid JSON in, invalid JSON out: {}",
            String::from_utf8_lossy(&out)
        );
    }
});
