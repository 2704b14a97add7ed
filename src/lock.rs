//! One writer per run folder: `train` holds an flock(2) on `OUT/.eabfit.lock` while it runs.
//!
//! The kernel drops an flock when its holder exits, however it exits (kill -9 included), so a
//! dead run's lock needs no cleanup: the next run simply gets it. The file keeps the holder's
//! pid so a refused run can say who holds the folder.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".eabfit.lock";

/// Held until dropped (or until the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the lock of `dir` (which must exist) or says which pid holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::file(&path, format!("cannot open the run lock: {e}")))?;
    if let Err(e) = try_flock(&file) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(Error::file(&path, format!("cannot lock: {e}")));
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let holder = match text.trim().parse::<u32>() {
            Ok(pid) => format!("pid {pid}"),
            Err(_) => "another process (pid not yet written)".to_string(),
        };
        return Err(Error::file(
            dir,
            format!(
                "held by {holder}, another eabfit run writing this folder; wait for it to end or choose another train.out_dir"
            ),
        ));
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()))
        .map_err(|e| Error::file(&path, format!("cannot write the holder's pid: {e}")))?;
    Ok(DirLock { _file: file, path })
}

#[cfg(unix)]
fn try_flock(file: &File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // Safety: a valid open descriptor owned by `file` for the whole call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn try_flock(_: &File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_folder_is_refused_naming_the_pid_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts just as another process would.
        let msg = lock_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        drop(held);
        lock_dir(dir.path()).unwrap();
    }
}
