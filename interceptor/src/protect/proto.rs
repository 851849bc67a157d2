//! The protobuf path decoder: finds the intercept key in Kubernetes'
//! protobuf bodies (`application/vnd.kubernetes.protobuf`), which kubectl's
//! typed clients send (`kubectl create deployment`, `kubectl create job`).
//!
//! A body is the `k8s\0` magic, then a `runtime.Unknown` whose `raw` is the
//! object. Only the path to the intercept key is read; a field repeated on
//! the way is merged by the API server, so every occurrence is read. What
//! the key's values mean is for the caller ([`super::body`]) to judge.

use crate::pods::INTERCEPT_LABEL as INTERCEPT_KEY;

pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";
/// `ObjectMeta.labels` and `ObjectMeta.annotations`.
const LABELS: u32 = 11;
const ANNOTATIONS: u32 = 12;

/// Why a protobuf body could not be read (or is not the kind the request
/// names).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a truncated varint")]
    TruncatedVarint,
    #[error("a varint longer than 10 bytes")]
    LongVarint,
    #[error("a field number out of range")]
    FieldNumberOutOfRange,
    #[error("a truncated field")]
    TruncatedField,
    #[error("a length out of range")]
    LengthOutOfRange,
    #[error("wire type {0}, which Kubernetes never sends")]
    WireType(u64),
    #[error("field {0} is not a message")]
    NotAMessage(u32),
    #[error("a string that is not UTF-8")]
    NotUtf8,
    #[error("a protobuf body without the k8s magic")]
    NoMagic,
    #[error("a protobuf body of kind {0}")]
    OtherKind(String),
    #[error("an encoded protobuf body")]
    Encoded,
    #[error("a map entry that is not a message")]
    EntryNotAMessage,
    #[error("a malformed map entry")]
    BadEntry,
}

/// Which map of an `ObjectMeta` an entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    Labels,
    Annotations,
}

impl Map {
    /// The map's JSON field name.
    pub fn name(self) -> &'static str {
        match self {
            Map::Labels => "labels",
            Map::Annotations => "annotations",
        }
    }
}

/// One field: its number and, for length-delimited ones, the bytes.
struct Field<'b> {
    number: u32,
    bytes: Option<&'b [u8]>,
}

fn varint(input: &mut &[u8]) -> Result<u64, Malformed> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(Malformed::TruncatedVarint)?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Malformed::LongVarint)
}

/// The fields of one message, in order.
fn fields(mut input: &[u8]) -> Result<Vec<Field<'_>>, Malformed> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let key = varint(&mut input)?;
        let number = u32::try_from(key >> 3).map_err(|_| Malformed::FieldNumberOutOfRange)?;
        let take = |input: &mut &[u8], n: usize| -> Result<(), Malformed> {
            if input.len() < n {
                return Err(Malformed::TruncatedField);
            }
            *input = &input[n..];
            Ok(())
        };
        let bytes = match key & 7 {
            0 => {
                varint(&mut input)?;
                None
            }
            1 => {
                take(&mut input, 8)?;
                None
            }
            2 => {
                let len = usize::try_from(varint(&mut input)?)
                    .map_err(|_| Malformed::LengthOutOfRange)?;
                if input.len() < len {
                    return Err(Malformed::TruncatedField);
                }
                let (bytes, rest) = input.split_at(len);
                input = rest;
                Some(bytes)
            }
            5 => {
                take(&mut input, 4)?;
                None
            }
            wire => return Err(Malformed::WireType(wire)),
        };
        out.push(Field { number, bytes });
    }
    Ok(out)
}

/// Every length-delimited field `number` of a message.
fn embedded(message: &[u8], number: u32) -> Result<Vec<&[u8]>, Malformed> {
    fields(message)?
        .into_iter()
        .filter(|f| f.number == number)
        .map(|f| f.bytes.ok_or(Malformed::NotAMessage(number)))
        .collect()
}

fn string(bytes: &[u8]) -> Result<&str, Malformed> {
    std::str::from_utf8(bytes).map_err(|_| Malformed::NotUtf8)
}

/// The object inside the envelope, once its kind is the expected one.
fn object<'b>(body: &'b [u8], kind: &str) -> Result<&'b [u8], Malformed> {
    let unknown = body.strip_prefix(MAGIC).ok_or(Malformed::NoMagic)?;
    let mut raw: &[u8] = &[];
    for field in fields(unknown)? {
        match (field.number, field.bytes) {
            // typeMeta: apiVersion 1, kind 2.
            (1, Some(type_meta)) => {
                for said in embedded(type_meta, 2)? {
                    let said = string(said)?;
                    if kind != said {
                        return Err(Malformed::OtherKind(said.to_owned()));
                    }
                }
            }
            // A repeated bytes field: the last one counts.
            (2, Some(bytes)) => raw = bytes,
            // contentEncoding, contentType: only the plain form.
            (3 | 4, Some(b"")) => {}
            (3 | 4, _) => return Err(Malformed::Encoded),
            _ => {}
        }
    }
    Ok(raw)
}

/// The `(map, value)` of each intercept key in the labels and annotations
/// of the `ObjectMeta`s at `fields` (field numbers from the object) in a
/// body of `kind`, in order.
pub fn intercept_keys(
    body: &[u8],
    kind: &str,
    path: &[u32],
) -> Result<Vec<(Map, String)>, Malformed> {
    let mut level = vec![object(body, kind)?];
    for &number in path {
        let mut next = Vec::new();
        for message in level {
            next.extend(embedded(message, number)?);
        }
        level = next;
    }
    let mut keys = Vec::new();
    for metadata in level {
        for field in fields(metadata)? {
            let map = match field.number {
                LABELS => Map::Labels,
                ANNOTATIONS => Map::Annotations,
                _ => continue,
            };
            let entry = field.bytes.ok_or(Malformed::EntryNotAMessage)?;
            let mut key = "";
            let mut value = "";
            for part in fields(entry)? {
                match (part.number, part.bytes) {
                    (1, Some(bytes)) => key = string(bytes)?,
                    (2, Some(bytes)) => value = string(bytes)?,
                    _ => return Err(Malformed::BadEntry),
                }
            }
            if key == INTERCEPT_KEY {
                keys.push((map, value.to_owned()));
            }
        }
    }
    Ok(keys)
}
