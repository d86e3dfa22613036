//! Writing a file or a directory so that a reader (or a crash) never sees half of it: the new
//! one is written beside the target, flushed to disk, and renamed into place; the parent
//! directory is then flushed too, so the rename itself survives a power cut.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes`, durably and atomically (see the module docs). Two writers of
/// the same path at once each rename a whole file over the other's. The file is readable as an
/// ordinary file (0644 on Unix, where a temporary file would be private).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// A file streamed to disk and put in place whole, as [`write_atomic`] does with bytes in
/// memory: written beside `path` under a temporary name, and renamed over it by
/// [`AtomicFile::commit`]. Dropped without a commit (an error half-way), it leaves nothing.
pub struct AtomicFile {
    writer: BufWriter<tempfile::NamedTempFile>,
    path: PathBuf,
}

impl AtomicFile {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let name = path
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
        let mut builder = tempfile::Builder::new();
        let prefix = format!(".{name}.");
        builder.prefix(&prefix).suffix(".tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o644));
        }
        Ok(AtomicFile {
            writer: BufWriter::with_capacity(64 * 1024, builder.tempfile_in(parent(path))?),
            path: path.to_path_buf(),
        })
    }

    /// Flushes the file to disk, renames it into place, and flushes the directory.
    pub fn commit(self) -> std::io::Result<()> {
        let tmp = self.writer.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        sync_dir(parent(&self.path))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.writer.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

/// The directory `path` is in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries (a rename into it) to disk. Only Unix can open a directory
/// for that; elsewhere the rename is as durable as the file system makes it.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Puts the complete directory `new` in the place of `dir`, durably: every file in `new` is
/// flushed to disk first, the old `dir` is set aside as `dir.old` and removed only once `new`
/// is in place. A crash in between leaves `dir.old`, which [`recover_dir`] puts back.
pub fn replace_dir(new: &Path, dir: &Path) -> std::io::Result<()> {
    sync_tree(new)?;
    let old = aside(dir);
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(new, dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Puts back the directory a [`replace_dir`] cut short set aside, if `dir` is missing.
pub fn recover_dir(dir: &Path) -> std::io::Result<()> {
    let old = aside(dir);
    if !dir.exists() && old.is_dir() {
        std::fs::rename(&old, dir)?;
    }
    Ok(())
}

fn aside(dir: &Path) -> std::path::PathBuf {
    let mut old = dir.as_os_str().to_owned();
    old.push(".old");
    old.into()
}

/// Flushes every file below `dir`, and the directories themselves.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["run.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        // A directory that is not there is an error, not a panic.
        assert!(write_atomic(&dir.path().join("missing/x.json"), b"x").is_err());
    }

    #[test]
    fn a_streamed_file_appears_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let mut cut = AtomicFile::create(&path).unwrap();
        cut.write_all(b"half of a new fi").unwrap();
        drop(cut);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        let mut file = AtomicFile::create(&path).unwrap();
        for i in 0..10_000 {
            writeln!(file, "line {i}").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        file.commit().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 10_000);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_is_replaced_whole_and_a_cut_swap_is_put_back() {
        let root = tempfile::tempdir().unwrap();
        let (dir, new) = (
            root.path().join("checkpoint"),
            root.path().join("checkpoint.tmp"),
        );
        for (d, text) in [(&dir, "old"), (&new, "new")] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
            std::fs::write(d.join("sub/state.json"), text).unwrap();
        }
        replace_dir(&new, &dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/state.json")).unwrap(),
            "new"
        );
        assert!(!new.exists() && !root.path().join("checkpoint.old").exists());
        // A crash after the old one was set aside and before the new one was in place.
        std::fs::rename(&dir, root.path().join("checkpoint.old")).unwrap();
        recover_dir(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/state.json")).unwrap(),
            "new"
        );
        // With the directory in place there is nothing to put back.
        recover_dir(&dir).unwrap();
        assert!(dir.is_dir());
    }
}
