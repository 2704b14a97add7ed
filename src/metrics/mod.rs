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

use crate::scan::ScanReport;
use crate::{Error, Result};

mod events;
mod tfrecord;

pub use events::read_scalars;
use events::EVENT_PREFIX;
use tfrecord::record;
pub use tfrecord::{crc32c, masked_crc32c};

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
    /// The main rank's logger of a training run: writes the resolved recipe beside the run's
    /// checkpoints, then opens (or, from `mark`, resumes) the run's TensorBoard log.
    pub fn for_main_rank(
        out_dir: &Path,
        recipe_yaml: &str,
        root: &Path,
        name: Option<&str>,
        mark: Option<&LogMark>,
    ) -> Result<Self> {
        crate::fsio::write_atomic(&out_dir.join("recipe.yaml"), recipe_yaml.as_bytes())?;
        Self::for_run(root, name, out_dir, mark)
    }

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

/// Per-layer scan figures of an eval, one TensorBoard curve per layer and figure.
pub fn log_layers(log: &mut RunLogger, report: &ScanReport, step: usize) -> Result<()> {
    for l in &report.layers {
        let i = l.layer;
        log.scalar(&format!("layers/top1/{i:02}"), l.top[0], step)?;
        log.scalar(
            &format!("layers/top1_over_median/{i:02}"),
            l.top[0] / l.median.max(f64::MIN_POSITIVE),
            step,
        )?;
        // How far the largest |h| stands above the next: a single outlier (the paper's) against
        // a stream that grows everywhere, which top-1/median alone cannot tell apart.
        if l.top[1] > 0.0 {
            log.scalar(
                &format!("layers/top1_over_top2/{i:02}"),
                l.top[0] / l.top[1],
                step,
            )?;
        }
        if let Some(t) = l.top1_after_first {
            log.scalar(&format!("layers/top1_after_first/{i:02}"), t, step)?;
        }
        log.scalar(
            &format!("layers/first_token_attn/{i:02}"),
            l.first_token_attn,
            step,
        )?;
        if let Some(a) = l.slot_attn {
            log.scalar(&format!("layers/eab_slot_attn/{i:02}"), a, step)?;
        }
        if let Some(a) = l.top1_at {
            log.scalar(&format!("layers/top1_dim/{i:02}"), a.dim as f64, step)?;
            log.scalar(&format!("layers/top1_dim_share/{i:02}"), a.dim_share, step)?;
            log.scalar(&format!("layers/top1_first/{i:02}"), a.first, step)?;
        }
    }
    Ok(())
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
