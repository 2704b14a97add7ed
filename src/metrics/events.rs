//! Reading TensorBoard event files back: an independent decoder of the scalars `RunLogger`
//! writes (and tensorboard-rs writes), for tests and tools that check logged curves.

use super::tfrecord::records;
use crate::{Error, Result};
use std::fs;
use std::path::Path;

/// How every event file's name starts.
pub(super) const EVENT_PREFIX: &str = "events.out.tfevents.";

/// Every simple-value scalar in the folder's `events.out.tfevents.*` files as (tag, step,
/// value), files in name order (their names start with the creation time), records in order.
pub fn read_scalars(dir: &Path) -> Result<Vec<(String, i64, f32)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))? {
        let entry = entry.map_err(|e| Error::file(dir, format!("cannot list: {e}")))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(EVENT_PREFIX)
        {
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        return Err(Error::file(dir, format!("no {EVENT_PREFIX}* files")));
    }
    files.sort();
    let mut out = Vec::new();
    for path in &files {
        let bytes = fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        for (offset, data) in records(&bytes).map_err(|msg| Error::file(path, msg))? {
            decode_event(data, &mut out)
                .map_err(|msg| Error::file(path, format!("record at byte {offset}: {msg}")))?;
        }
    }
    Ok(out)
}

// Just enough protobuf for Event{step=2 int64, summary=5 Summary{value=1 repeated
// Value{tag=1 string, simple_value=2 float}}}; every other field is skipped by wire type.
enum Field<'a> {
    Varint(u64),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
    Other,
}

struct Pb<'a>(&'a [u8]);

impl<'a> Pb<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.0.len())
            .ok_or("field runs past end of message")?;
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn next(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => self.take(8).map(|_| Field::Other)?,
            2 => {
                let n = self.varint()?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32([b[0], b[1], b[2], b[3]])
            }
            wire => return Err(format!("unsupported protobuf wire type {wire}")),
        };
        Ok(Some((key >> 3, field)))
    }
}

fn decode_event(data: &[u8], out: &mut Vec<(String, i64, f32)>) -> std::result::Result<(), String> {
    // Fields may come in any order and proto3 omits step 0, so collect values before stamping.
    let mut step = 0i64;
    let mut values = Vec::new();
    let mut pb = Pb(data);
    while let Some((num, field)) = pb.next()? {
        match (num, field) {
            (2, Field::Varint(v)) => step = v as i64,
            (5, Field::Bytes(summary)) => {
                let mut pb = Pb(summary);
                while let Some((num, field)) = pb.next()? {
                    if let (1, Field::Bytes(value)) = (num, field) {
                        values.extend(decode_value(value)?);
                    }
                }
            }
            _ => {}
        }
    }
    out.extend(values.into_iter().map(|(tag, v)| (tag, step, v)));
    Ok(())
}

// `None` for images, histograms and other non-scalar values.
fn decode_value(data: &[u8]) -> std::result::Result<Option<(String, f32)>, String> {
    let (mut tag, mut simple) = (String::new(), None);
    let mut pb = Pb(data);
    while let Some((num, field)) = pb.next()? {
        match (num, field) {
            (1, Field::Bytes(b)) => {
                tag = String::from_utf8(b.to_vec()).map_err(|_| "tag is not UTF-8")?
            }
            (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
            _ => {}
        }
    }
    Ok(simple.map(|v| (tag, v)))
}
