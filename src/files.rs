//! The files spool writes outside its log: export files and rebuilt projections.
//!
//! Invariant: a file is written into a temporary that this process created itself (exclusively,
//! under a name no one else chose) beside its target, synced, and put in place by one rename, or
//! by one link when nothing may be replaced; only such a temporary is ever removed. Nothing is
//! written through a symbolic link, or over a device, fifo, socket or directory, and a target that
//! appears meanwhile is never replaced when the rule was "a new file only".
//!
//! Boundary: the file system only; it knows nothing of what the bytes mean.

use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A path refused by a rule, named.
    #[error("{path}: {rule}")]
    Refused { path: PathBuf, rule: &'static str },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FileError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
        move |source| FileError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// What may already be at a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Nothing: the file must be new.
    Refuse,
    /// A regular file, replaced whole (never a link, device, fifo, socket or directory).
    ReplaceRegular,
}

/// Checks what is at `target` against the rule, without changing anything.
pub fn check_target(target: &Path, existing: Existing) -> Result<(), FileError> {
    let refused = |rule| FileError::Refused {
        path: target.to_owned(),
        rule,
    };
    if target.file_name().is_none() {
        return Err(refused("names no file"));
    }
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FileError::Io {
            what: "reading",
            path: target.to_owned(),
            source,
        }),
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(refused("is a symbolic link; spool writes only a file it names itself"))
        }
        Ok(meta) if !meta.file_type().is_file() => Err(refused(
            "is not a regular file (a directory, device, fifo or socket); spool replaces only regular files",
        )),
        Ok(_) if existing == Existing::Refuse => Err(refused(
            "exists; spool writes only a new file here (remove it or name another)",
        )),
        Ok(_) => Ok(()),
    }
}

/// A file being written: a temporary beside its target until [`NewFile::place`] puts it there.
/// Dropped before that, it removes its temporary (and nothing else).
pub struct NewFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    existing: Existing,
    placed: bool,
}

impl NewFile {
    /// Checks `target` and creates a new temporary beside it.
    pub fn create(target: &Path, existing: Existing) -> Result<NewFile, FileError> {
        check_target(target, existing)?;
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        // A name of our own: a file another process left can neither be taken nor removed.
        for _ in 0..8 {
            let temp = dir.join(format!(
                ".{name}.{:016x}.spool-partial",
                rand::random::<u64>()
            ));
            match File::options().write(true).create_new(true).open(&temp) {
                Ok(file) => {
                    return Ok(NewFile {
                        target: target.to_owned(),
                        temp,
                        file: Some(file),
                        existing,
                        placed: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(FileError::Io {
                        what: "creating a file beside",
                        path: target.to_owned(),
                        source,
                    })
                }
            }
        }
        Err(FileError::Refused {
            path: target.to_owned(),
            rule: "no unused temporary name beside it",
        })
    }

    /// The temporary's path (for a library, such as SQLite, that opens files by name).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary, open for writing.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is open until placed")
    }

    /// Syncs the temporary and puts it at the target: renamed over a regular file where that is
    /// allowed, linked where the target must be new (which fails if one appeared meanwhile).
    pub fn place(mut self) -> Result<(), FileError> {
        let file = self.file.take().expect("placed once");
        // The bytes a library wrote by name are synced through this handle as well.
        file.sync_all()
            .map_err(FileError::io("syncing", &self.temp))?;
        drop(file);
        match self.existing {
            Existing::ReplaceRegular => {
                // What is there now must still be a file spool may replace.
                check_target(&self.target, self.existing)?;
                std::fs::rename(&self.temp, &self.target)
                    .map_err(FileError::io("moving the new file to", &self.target))?
            }
            Existing::Refuse => {
                std::fs::hard_link(&self.temp, &self.target).map_err(|source| {
                    match source.kind() {
                        std::io::ErrorKind::AlreadyExists => FileError::Refused {
                            path: self.target.clone(),
                            rule: "appeared while spool wrote it; it was left as it is",
                        },
                        _ => FileError::Io {
                            what: "linking the new file to",
                            path: self.target.clone(),
                            source,
                        },
                    }
                })?;
                let _ = std::fs::remove_file(&self.temp);
            }
        }
        self.placed = true;
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself durable; a directory that cannot be opened (no read permission)
            // still holds the file.
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.placed {
            self.file.take();
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".spool-partial"))
            .collect()
    }

    #[test]
    fn a_new_file_is_placed_whole_and_only_its_own_temporary_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("notes.txt");
        // Files that look like temporaries but are someone else's stay.
        std::fs::write(dir.path().join("notes.partial"), "mine").unwrap();
        std::fs::write(dir.path().join("notes.rebuilding"), "mine").unwrap();
        let mut file = NewFile::create(&target, Existing::Refuse).unwrap();
        file.file().write_all(b"hello").unwrap();
        assert!(!target.exists(), "nothing at the target until placed");
        file.place().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        assert_eq!(
            std::fs::read(dir.path().join("notes.partial")).unwrap(),
            b"mine"
        );
        assert_eq!(
            std::fs::read(dir.path().join("notes.rebuilding")).unwrap(),
            b"mine"
        );
        assert!(leftovers(dir.path()).is_empty());

        // Dropped unplaced: the temporary goes, the target stays as it was.
        let mut file = NewFile::create(&dir.path().join("other"), Existing::Refuse).unwrap();
        file.file().write_all(b"half").unwrap();
        drop(file);
        assert!(!dir.path().join("other").exists());
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn links_devices_fifos_directories_and_existing_files_are_refused_by_rule() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("authorized_keys");
        std::fs::write(&victim, "ssh-ed25519 AAAA").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain system call on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let cases: [(&Path, Existing, &str); 6] = [
            (&link, Existing::ReplaceRegular, "symbolic link"),
            (&link, Existing::Refuse, "symbolic link"),
            (&fifo, Existing::ReplaceRegular, "not a regular file"),
            (&sub, Existing::ReplaceRegular, "not a regular file"),
            (
                Path::new("/dev/null"),
                Existing::ReplaceRegular,
                "not a regular file",
            ),
            (&victim, Existing::Refuse, "exists"),
        ];
        for (path, existing, rule) in cases {
            let err = NewFile::create(path, existing).err().unwrap().to_string();
            assert!(err.contains(rule), "{path:?}: {err}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"ssh-ed25519 AAAA");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(leftovers(dir.path()).is_empty());

        // A regular file may be replaced where the rule allows it.
        let mut file = NewFile::create(&victim, Existing::ReplaceRegular).unwrap();
        file.file().write_all(b"new").unwrap();
        file.place().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"new");
    }

    #[test]
    fn a_file_that_appears_while_a_new_one_is_written_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x");
        let file = NewFile::create(&target, Existing::Refuse).unwrap();
        std::fs::write(&target, "theirs").unwrap();
        let err = file.place().unwrap_err().to_string();
        assert!(err.contains("appeared"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"theirs");
        assert!(leftovers(dir.path()).is_empty());
    }
}
