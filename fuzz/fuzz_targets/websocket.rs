//! The WebSocket frame parser of exec/attach (`exec/websocket.rs`): any
//! bytes, in any chunks, never panic, and what is reported as the wire
//! bytes of heads and payloads is the input's prefix, in order (a frame
//! still incomplete at the end is held back), whatever the chunks.
#![no_main]

use chaperone::exec::websocket::{FrameReader, Messages, Piece};
use libfuzzer_sys::fuzz_target;

fn raw(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut reader = FrameReader::new();
    let mut seen = Vec::new();
    for chunk in chunks {
        let result = reader.push(chunk, &mut |piece| {
            match piece {
                Piece::Head(_, raw) => seen.extend_from_slice(raw),
                Piece::Payload { data, raw } => {
                    assert_eq!(data.len(), raw.len(), "unmasking changed the length");
                    seen.extend_from_slice(raw);
                }
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
            "the reported wire bytes are not the input's prefix"
        );
        assert_eq!(pieces, whole, "split at {split}: reported bytes differ");
    }
    // The channel layer over it (stdin taken over, as for recording).
    let mut messages = Messages::new(b"\x00");
    let _ = messages.push(head, &mut |_| {});
    let _ = messages.push(tail, &mut |_| {});
    let _ = messages.can_inject();
});
