//! TensorBoard logging for one training run, plus an independent reader of the event files.
//!
//! `RunLogger` writes the event file itself (TFRecord framing around hand-encoded `Event`
//! protos), synchronously, and mirrors every scalar to `scalars.jsonl` so scripts can read
//! figures without TensorBoard. Writing synchronously is what makes resume exact: a checkpoint
//! records how many bytes of both files were on disk ([`LogMark`]), and a resumed run cuts them
//! back to that length before it goes on, so the steps it repeats are not logged twice
//! (TensorBoard would draw them as a zig-zag). `read_scalars` parses the event files with its
//! own decoder and is checked against files tensorboard-rs writes.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const EVENT_PREFIX: &str = "events.out.tfevents.";

/// How far a run's logs had got when a checkpoint was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMark {
    /// The event file's name inside the log folder.
    pub event_file: String,
    pub event_bytes: u64,
    pub jsonl_bytes: u64,
}

pub struct RunLogger {
    events: Appender,
    jsonl: Appender,
}

/// A file we only append to, knowing its length without asking the filesystem.
struct Appender {
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
}

impl Appender {
    /// Opens `path` for appending, first cutting it to `keep` bytes when given.
    fn open(path: &Path, keep: Option<u64>, create_new: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(!create_new)
            .create_new(create_new)
            .append(true)
            .open(path)?;
        let mut len = file.metadata()?.len();
        if let Some(k) = keep {
            if len < k {
                return Err(std::io::Error::other(format!(
                    "holds {len} bytes, fewer than the {k} the checkpoint saw: it changed since"
                )));
            }
            file.set_len(k)?;
            len = k;
        }
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            len,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::file(&self.path, format!("write failed: {e}")))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::file(&self.path, format!("write failed: {e}")))
    }
}

#[derive(serde::Serialize)]
struct JsonLine<'a> {
    tag: &'a str,
    step: usize,
    // serde_json writes non-finite values as `null`, keeping each line strict JSON.
    value: f64,
}

impl RunLogger {
    /// The logger of a run writing to `out_dir`: TensorBoard folder `root/name` (`name`: the
    /// recipe's, else `out_dir`'s last component), resumed at `mark` when there is one (a
    /// logger that cannot resume starts a new event file, with a warning).
    pub fn for_run(
        root: &Path,
        name: Option<&str>,
        out_dir: &Path,
        mark: Option<&LogMark>,
    ) -> Result<Self> {
        let name = name.map(str::to_string).unwrap_or_else(|| {
            out_dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
        let dir = root.join(name);
        match mark {
            Some(mark) => Self::resume(&dir, mark).or_else(|e| {
                eprintln!("warning: {e}; logging to a new event file");
                Self::create(&dir)
            }),
            None => Self::create(&dir),
        }
    }

    /// Opens (or creates) a run folder with a new event file. An existing `scalars.jsonl` is
    /// appended to.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("cannot create run folder: {e}")))?;
        let jsonl = open_jsonl(dir, None)?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // TensorBoard's own naming; the counter keeps two loggers of one process and second
        // apart.
        let mut n = 0;
        let events = loop {
            let name = format!(
                "{EVENT_PREFIX}{secs:010}.{}.{}.{n}",
                hostname(),
                std::process::id()
            );
            match Appender::open(&dir.join(&name), None, true) {
                Ok(a) => break a,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(Error::file(dir.join(&name), format!("cannot create: {e}"))),
            }
        };
        let mut log = Self { events, jsonl };
        let wall = wall_time();
        log.events
            .write(&record(&event(wall, 0, Body::FileVersion("brain.Event:2"))))?;
        log.flush()?;
        Ok(log)
    }

    /// Reopens the logs of a run at a checkpoint's mark: both files are cut back to the
    /// lengths they had when the checkpoint was written, and appended to from there.
    pub fn resume(dir: &Path, mark: &LogMark) -> Result<Self> {
        let path = dir.join(&mark.event_file);
        let events = Appender::open(&path, Some(mark.event_bytes), false)
            .map_err(|e| Error::file(&path, format!("cannot resume the event file: {e}")))?;
        let jsonl = open_jsonl(dir, Some(mark.jsonl_bytes))?;
        Ok(Self { events, jsonl })
    }

    /// TensorBoard stores scalars as f32; the JSON mirror keeps the full f64.
    pub fn scalar(&mut self, tag: &str, value: f64, step: usize) -> Result<()> {
        let mut line = serde_json::to_vec(&JsonLine { tag, step, value })
            .map_err(|e| Error::file(&self.jsonl.path, format!("write failed: {e}")))?;
        line.push(b'\n');
        self.jsonl.write(&line)?;
        let body = Body::Scalar(tag, value as f32);
        self.events
            .write(&record(&event(wall_time(), step as u64, body)))
    }

    /// Both files are on disk (in the page cache) when this returns.
    pub fn flush(&mut self) -> Result<()> {
        self.jsonl.flush()?;
        self.events.flush()
    }

    /// Flushes and says how far the logs go, for a checkpoint to keep.
    pub fn mark(&mut self) -> Result<LogMark> {
        self.flush()?;
        Ok(LogMark {
            event_file: self
                .events
                .path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            event_bytes: self.events.len,
            jsonl_bytes: self.jsonl.len,
        })
    }

    pub fn close(mut self) -> Result<()> {
        self.flush()
    }
}

fn open_jsonl(dir: &Path, keep: Option<u64>) -> Result<Appender> {
    let path = dir.join("scalars.jsonl");
    Appender::open(&path, keep, false).map_err(|e| Error::file(&path, format!("cannot open: {e}")))
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "localhost".into())
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

enum Body<'a> {
    FileVersion(&'a str),
    Scalar(&'a str, f32),
}

// Event{wall_time=1 double, step=2 int64, file_version=3 string, summary=5 Summary{value=1
// Value{tag=1 string, simple_value=2 float}}}, the fields the reader below decodes.
fn event(wall: f64, step: u64, body: Body) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend(wall.to_le_bytes());
    e.push(0x10);
    put_varint(&mut e, step);
    match body {
        Body::FileVersion(v) => put_bytes(&mut e, 0x1a, v.as_bytes()),
        Body::Scalar(tag, v) => {
            let mut value = vec![];
            put_bytes(&mut value, 0x0a, tag.as_bytes());
            value.push(0x15);
            value.extend(v.to_le_bytes());
            let mut summary = vec![];
            put_bytes(&mut summary, 0x0a, &value);
            put_bytes(&mut e, 0x2a, &summary);
        }
    }
    e
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    out.push(key);
    put_varint(out, bytes.len() as u64);
    out.extend(bytes);
}

/// TFRecord framing (see `read_records`).
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend(len);
    r.extend(masked_crc32c(&len).to_le_bytes());
    r.extend(data);
    r.extend(masked_crc32c(data).to_le_bytes());
    r
}

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
        read_records(&bytes, &mut out).map_err(|msg| Error::file(path, msg))?;
    }
    Ok(out)
}

// TFRecord framing: u64 length, masked crc32c(length), data, masked crc32c(data); little-endian.
fn read_records(
    mut rest: &[u8],
    out: &mut Vec<(String, i64, f32)>,
) -> std::result::Result<(), String> {
    let mut offset = 0usize;
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(format!("truncated record header at byte {offset}"));
        }
        if masked_crc32c(&rest[..8]) != le_u32(&rest[8..12]) {
            return Err(format!("length CRC mismatch at byte {offset}"));
        }
        let len = u64::from_le_bytes([
            rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], rest[6], rest[7],
        ]);
        let end = usize::try_from(len)
            .ok()
            .and_then(|n| n.checked_add(16))
            .filter(|&end| end <= rest.len())
            .ok_or_else(|| format!("truncated record at byte {offset} (needs {len} data bytes)"))?;
        let data = &rest[12..end - 4];
        if masked_crc32c(data) != le_u32(&rest[end - 4..end]) {
            return Err(format!("data CRC mismatch in record at byte {offset}"));
        }
        decode_event(data, out).map_err(|msg| format!("record at byte {offset}: {msg}"))?;
        rest = &rest[end..];
        offset += end;
    }
    Ok(())
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            // 0x82F63B78 is the Castagnoli polynomial 0x1EDC6F41, bit-reversed.
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord stores CRCs masked, so CRCs of data that itself holds CRCs stay well-distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    // TF writes this as ((crc >> 15) | (crc << 17)) + 0xa282ead8.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
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

#[cfg(test)]
mod tests {
    use super::*;

    const WRITES: [(&str, usize, f64); 6] = [
        ("loss/train", 0, 0.0),
        ("loss/train", 1, 2.5),
        ("lr", 1, 1e-4),
        ("loss/train", 2, -0.1),
        ("eab/gate_mean", 1000, 0.333),
        ("loss/train", 3, 1e30),
    ];

    fn write_run(dir: &Path, writes: &[(&str, usize, f64)]) {
        let mut log = RunLogger::create(dir).unwrap();
        for &(tag, step, value) in writes {
            log.scalar(tag, value, step).unwrap();
        }
        log.close().unwrap();
    }

    fn expected(writes: &[(&str, usize, f64)]) -> Vec<(String, i64, f32)> {
        writes
            .iter()
            .map(|&(t, s, v)| (t.to_string(), s as i64, v as f32))
            .collect()
    }

    fn event_file(dir: &Path) -> PathBuf {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(EVENT_PREFIX)
            })
            .collect();
        assert_eq!(files.len(), 1);
        files.pop().unwrap()
    }

    #[test]
    fn crc32c_check_value_and_mask_match_tensorboard_rs() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        for data in [&b""[..], b"a", b"123456789", &[0xffu8; 37]] {
            assert_eq!(
                masked_crc32c(data),
                tensorboard_rs::masked_crc32c::masked_crc32c(data)
            );
        }
    }

    #[test]
    fn scalars_round_trip_through_event_file_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        write_run(dir.path(), &WRITES);
        assert_eq!(read_scalars(dir.path()).unwrap(), expected(&WRITES));

        let text = fs::read_to_string(dir.path().join("scalars.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), WRITES.len());
        for (line, &(tag, step, value)) in lines.iter().zip(&WRITES) {
            assert_eq!(line["tag"], tag);
            assert_eq!(line["step"], step);
            assert_eq!(line["value"].as_f64(), Some(value));
        }
    }

    #[test]
    fn event_files_of_tensorboard_rs_read_back() {
        // The reader must not only agree with our writer: tensorboard-rs is an independent one.
        let dir = tempfile::tempdir().unwrap();
        let mut w = tensorboard_rs::summary_writer::SummaryWriter::new(dir.path());
        for &(tag, step, value) in &WRITES {
            w.add_scalar(tag, value as f32, step);
        }
        drop(w); // joins its writer thread
        assert_eq!(read_scalars(dir.path()).unwrap(), expected(&WRITES));
    }

    #[test]
    fn resuming_at_a_mark_drops_what_came_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RunLogger::create(dir.path()).unwrap();
        for &(tag, step, value) in &WRITES[..3] {
            log.scalar(tag, value, step).unwrap();
        }
        let mark = log.mark().unwrap();
        // A run killed after the mark: some records, the last one torn.
        log.scalar("loss/train", 99.0, 2).unwrap();
        log.close().unwrap();
        let path = dir.path().join(&mark.event_file);
        let torn = fs::read(&path).unwrap();
        fs::write(
            &path,
            [&torn[..], &torn[mark.event_bytes as usize..][..7]].concat(),
        )
        .unwrap();

        let mut log = RunLogger::resume(dir.path(), &mark).unwrap();
        for &(tag, step, value) in &WRITES[3..] {
            log.scalar(tag, value, step).unwrap();
        }
        log.close().unwrap();
        assert_eq!(read_scalars(dir.path()).unwrap(), expected(&WRITES));
        let text = fs::read_to_string(dir.path().join("scalars.jsonl")).unwrap();
        assert_eq!(text.lines().count(), WRITES.len());
        assert!(!text.contains("99"));

        fs::write(&path, b"").unwrap();
        let msg = RunLogger::resume(dir.path(), &mark)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains(&mark.event_file) && msg.contains("fewer"),
            "{msg}"
        );
    }

    #[test]
    fn reopening_a_run_in_the_same_second_keeps_both_event_files() {
        let dir = tempfile::tempdir().unwrap();
        write_run(dir.path(), &WRITES[..2]);
        write_run(dir.path(), &WRITES[2..]);
        assert_eq!(read_scalars(dir.path()).unwrap(), expected(&WRITES));
        let text = fs::read_to_string(dir.path().join("scalars.jsonl")).unwrap();
        assert_eq!(text.lines().count(), WRITES.len());
    }

    #[test]
    fn truncated_or_corrupt_event_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_run(dir.path(), &WRITES);
        let path = event_file(dir.path());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = fs::read(&path).unwrap();

        for cut in [3, 10, bytes.len() - 5] {
            fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
            let msg = read_scalars(dir.path()).unwrap_err().to_string();
            assert!(msg.contains(&name) && msg.contains("truncated"), "{msg}");
        }

        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 6; // inside the last record's data
        corrupt[last] ^= 0x40;
        fs::write(&path, &corrupt).unwrap();
        let msg = read_scalars(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(&name) && msg.contains("CRC"), "{msg}");
    }

    #[test]
    fn folder_without_event_files_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_scalars(dir.path()).is_err());
    }
}
