//! The SPDY/3 frame parser of exec/attach (`exec/spdy.rs`): any bytes, in
//! any chunks, never panic; the frame reader reports the input's prefix
//! (an incomplete last frame held back), the same whatever the chunks;
//! header blocks inflate and split without panicking.
#![no_main]

use chaperone::exec::spdy::{AgentFrames, FrameReader, HeaderInflater, Piece, header_pairs};
use libfuzzer_sys::fuzz_target;

fn raw(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut reader = FrameReader::new();
    let mut seen = Vec::new();
    for chunk in chunks {
        let result = reader.push(chunk, &mut |piece| {
            match piece {
                Piece::Head(_, raw) => seen.extend_from_slice(raw),
                Piece::Payload(data) => seen.extend_from_slice(data),
                Piece::End => {}
            }
            Ok(())
        });
        if result.is_err() {
            return (seen, false);
        }
    }
    (seen, true)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let split = (usize::from(selector) * input.len() / 256).min(input.len());
    let (head, tail) = input.split_at(split);
    let (whole, whole_ok) = raw(&[input]);
    let (pieces, pieces_ok) = raw(&[head, tail]);
    assert_eq!(
        whole_ok, pieces_ok,
        "the split at {split} changed the verdict"
    );
    if whole_ok {
        // A frame still incomplete at the end is held back, not reported:
        // what is reported is the input's prefix, however it was split.
        assert!(
            input.starts_with(&whole),
            "the reported bytes are not the input's prefix"
        );
        assert_eq!(pieces, whole, "split at {split}: reported bytes differ");
    }
    let mut agent = AgentFrames::new();
    if agent.push(head, &mut |_| {}).is_ok() {
        let _ = agent.push(tail, &mut |_| {});
    }
    let mut block = Vec::new();
    if HeaderInflater::new().inflate(input, &mut block).is_ok() {
        let _ = header_pairs(&block);
    }
    let _ = header_pairs(input);
});
