//! Writing files so that a reader never sees a half-written one: temporary name in the same
//! directory, fsync, rename over the target.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name a file is written under before it is renamed to `path`.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = temporary_path(path);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Opens `path` for reading after checking that it is a regular file: a FIFO would block the
/// reader forever and a device (`/dev/zero`) never ends, so both are refused up front.
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(Error::format(
            path.display().to_string(),
            format!("{what}: expected a regular file"),
        ));
    }
    std::fs::File::open(path).map_err(|e| Error::io(path, e))
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The process id in a temporary name made by [`temporary_path`] (`.NAME.tmp-PID`), if it is one.
fn temporary_owner(file_name: &str) -> Option<u32> {
    let (head, pid) = file_name.rsplit_once(".tmp-")?;
    if !head.starts_with('.') || head.len() < 2 || pid.is_empty() {
        return None;
    }
    pid.parse().ok()
}

fn process_is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // kill(pid, 0) sends nothing: it only asks whether the process exists (EPERM: it does).
    let answered = unsafe { libc::kill(pid, 0) };
    answered == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the temporaries that [`temporary_path`] named in `dir` and whose writer is dead (a
/// `kill -9` mid-write leaves them): only names of our pattern, never one of a live process.
/// Returns what was removed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_owner(&name) else {
            continue;
        };
        if pid == std::process::id() || process_is_alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = if entry.file_type().map_err(|e| Error::io(&path, e))?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(removed)
}

pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path.display().to_string(),
            format!(
                "not valid UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("ferrolm-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.txt");
        write_atomic(&path, b"hello").unwrap();
        assert_eq!(read(&path).unwrap(), b"hello");
        assert!(!temporary_path(&path).exists());
        let missing = write_atomic(&dir.join("no/such/dir.txt"), b"x").unwrap_err();
        assert!(matches!(missing, Error::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_regular_files_are_read() {
        let err = read(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read(&std::env::temp_dir()).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed() {
        let dir = std::env::temp_dir().join(format!("ferrolm-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid 0x7fff_fff0 does not exist; ours does; other names are not ours to touch.
        let dead = dir.join(".train-00000.safetensors.tmp-2147483632");
        let dead_dir = dir.join(".part.tmp-2147483632");
        let live = temporary_path(&dir.join("manifest.json"));
        let foreign = dir.join("notes.tmp-2147483632");
        for f in [&dead, &live, &foreign] {
            std::fs::write(f, b"x").unwrap();
        }
        std::fs::create_dir_all(dead_dir.join("inner")).unwrap();
        let mut removed = remove_stale_temporaries(&dir).unwrap();
        removed.sort();
        assert_eq!(removed, vec![dead_dir.clone(), dead.clone()]);
        assert!(live.exists() && foreign.exists());
        assert_eq!(temporary_owner(".a.tmp-12"), Some(12));
        assert_eq!(temporary_owner("a.tmp-12"), None);
        assert_eq!(temporary_owner(".a.tmp-x"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
