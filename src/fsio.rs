//! Writes that never leave a half-written file or folder where the user expects a whole one:
//! everything is built under a hidden temporary name beside its target and renamed into place,
//! and a failed write (full disk, `ulimit -f`, unwritable folder) removes its temporary.
//!
//! A kill -9 can leave a hidden `.NAME.tmp<pid>` behind (nothing can run on SIGKILL); it is
//! never read, and the next write of the same target removes it.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `.NAME.tmp<pid>` beside `path`.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.tmp{}", std::process::id()))
}

/// Removes the temporaries of earlier writes of `path` that were killed (any pid): they are
/// never whole, and nothing else writes under their names.
fn remove_stale_temps(path: &Path) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(parent_of(path)) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let pid = n.strip_prefix(&prefix).unwrap_or_default();
        if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
            let p = e.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// Writes the temporary with `write`, then renames it over `path`; on any failure the
/// temporary is removed and `path` keeps what it had.
fn via_temp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = parent_of(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    remove_stale_temps(path);
    let tmp = temp_beside(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| Error::file(path, format!("cannot rename: {e}")))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `body` to `path` atomically (see the module comment).
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    via_temp(path, |tmp| {
        std::fs::write(tmp, body).map_err(|e| Error::file(path, format!("write failed: {e}")))
    })
}

/// Saves tensors as safetensors atomically, readable by everyone like any other file we write
/// (the safetensors writer creates its files owner-only).
pub fn save_safetensors<K: AsRef<str> + Ord + std::fmt::Display>(
    tensors: &std::collections::HashMap<K, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    via_temp(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp)
            .map_err(|e| Error::file(path, format!("write failed: {e}")))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::file(path, e))?;
        }
        Ok(())
    })
}

/// Builds a folder with `fill` in a temporary sibling, then puts it at `dir` in one step: an
/// existing `dir` is swapped out atomically (renameat2 RENAME_EXCHANGE) and removed after, so
/// at every instant `dir` is either the whole old folder or the whole new one. On filesystems
/// without the exchange the old folder is moved aside first; a crash in that window leaves it
/// whole at `.NAME.old<pid>`.
pub fn replace_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, e))?;
    remove_stale_temps(dir);
    let tmp = temp_beside(dir);
    let result = std::fs::create_dir(&tmp)
        .map_err(|e| Error::file(dir, format!("cannot create a folder beside it: {e}")))
        .and_then(|()| fill(&tmp).map_err(|e| blame_target(e, &tmp, dir)))
        .and_then(|()| swap_in(&tmp, dir));
    // After a swap `tmp` holds the old folder; after a failure, the partial new one.
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// An error about a file in the temporary folder names where that file was going instead:
/// the temporary is gone by the time the user reads the message.
fn blame_target(e: Error, tmp: &Path, dir: &Path) -> Error {
    match e {
        Error::File { path, msg } => match path.strip_prefix(tmp) {
            Ok(rest) => Error::File {
                path: dir.join(rest),
                msg,
            },
            Err(_) => Error::File { path, msg },
        },
        e => e,
    }
}

fn swap_in(tmp: &Path, dir: &Path) -> Result<()> {
    if !dir.exists() {
        return std::fs::rename(tmp, dir)
            .map_err(|e| Error::file(dir, format!("cannot rename into place: {e}")));
    }
    match exchange(tmp, dir) {
        Ok(()) => Ok(()),
        Err(_) => {
            let old = parent_of(dir).join(format!(
                ".{}.old{}",
                dir.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dir, &old)
                .map_err(|e| Error::file(dir, format!("cannot move the old folder aside: {e}")))?;
            if let Err(e) = std::fs::rename(tmp, dir) {
                let _ = std::fs::rename(&old, dir);
                return Err(Error::file(dir, format!("cannot rename into place: {e}")));
            }
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        }
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // Safety: two valid NUL-terminated paths; the syscall reads them and nothing else.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_failed_fill_keeps_the_old_folder_and_leaves_no_temporary() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ck");
        replace_dir(&dir, |t| write_atomic(&t.join("a"), b"old")).unwrap();
        let err = replace_dir(&dir, |t| {
            write_atomic(&t.join("a"), b"new")?;
            Err(Error::file(t.join("b"), "disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(
            err.to_string()
                .starts_with(&dir.join("b").display().to_string()),
            "names the target, not the temporary: {err}"
        );
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"old");
        assert_eq!(listing(root.path()), ["ck"]);
        assert_eq!(listing(&dir), ["a"]);
    }

    #[test]
    fn a_replace_swaps_the_whole_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ck");
        replace_dir(&dir, |t| {
            write_atomic(&t.join("a"), b"old")?;
            write_atomic(&t.join("stale"), b"x")
        })
        .unwrap();
        replace_dir(&dir, |t| write_atomic(&t.join("a"), b"new")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"new");
        assert_eq!(listing(&dir), ["a"], "nothing of the old folder survives");
        assert_eq!(listing(root.path()), ["ck"]);
    }

    #[test]
    fn temporaries_of_killed_writers_are_cleared_by_the_next_write() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ck");
        std::fs::create_dir(root.path().join(".ck.tmp999999")).unwrap();
        std::fs::write(root.path().join(".ck.tmp999999/a"), b"half").unwrap();
        std::fs::create_dir(root.path().join(".ck.tmpx")).unwrap(); // not one of ours
        replace_dir(&dir, |t| write_atomic(&t.join("a"), b"whole")).unwrap();
        assert_eq!(listing(root.path()), [".ck.tmpx", "ck"]);
    }
}
