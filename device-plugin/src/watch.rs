//! Directory watching with inotify on the tokio reactor (no polling): device health and
//! the device-plugin directory (kubelet restarts) are both driven by it. A directory that
//! does not exist yet is watched through its nearest existing ancestor and picked up once
//! it appears.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use futures::{FutureExt, StreamExt};
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The entry was created or moved in.
    Created,
    /// The entry was deleted or moved out.
    Removed,
    /// Anything else (attributes, the watched directory itself, a queue overflow).
    Other,
}

/// One change in a watched directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The entry's path (the directory itself for events on it).
    pub path: PathBuf,
    /// What happened.
    pub kind: ChangeKind,
}

/// inotify failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The inotify instance could not be made or registered with the runtime.
    #[error("cannot create an inotify instance: {0}")]
    Init(#[source] std::io::Error),
    /// A watch could not be added.
    #[error("cannot watch {}: {source}", path.display())]
    AddWatch {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading events failed.
    #[error("reading inotify events: {0}")]
    Read(#[source] std::io::Error),
    /// The inotify descriptor reported end of file.
    #[error("the inotify event stream ended")]
    Ended,
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Watches a set of directories for entries appearing and disappearing.
#[derive(Debug)]
pub struct DirWatcher {
    stream: EventStream<[u8; 4096]>,
    dirs: Vec<PathBuf>,
    watched: HashMap<WatchDescriptor, PathBuf>,
}

impl DirWatcher {
    /// Starts watching `dirs` (must be called inside a tokio runtime).
    pub fn new(dirs: Vec<PathBuf>) -> Result<Self, WatchError> {
        let stream = Inotify::init()
            .and_then(|i| i.into_event_stream([0u8; 4096]))
            .map_err(WatchError::Init)?;
        let mut watcher = Self {
            stream,
            dirs,
            watched: HashMap::new(),
        };
        watcher.ensure_watches()?;
        Ok(watcher)
    }

    /// Watches each directory, or its nearest existing ancestor while it is missing.
    fn ensure_watches(&mut self) -> Result<(), WatchError> {
        for dir in self.dirs.clone() {
            let Some(target) = nearest_existing(&dir) else {
                continue;
            };
            if self.watched.values().any(|w| *w == target) {
                continue;
            }
            match self.stream.watches().add(&target, MASK) {
                Ok(wd) => {
                    self.watched.insert(wd, target);
                }
                // Removed between the check and the call: the next event re-evaluates.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(nix::libc::ENOTDIR) => {}
                Err(source) => {
                    return Err(WatchError::AddWatch {
                        path: target,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Waits for changes, then returns every change queued by then (at least one).
    pub async fn next(&mut self) -> Result<Vec<Change>, WatchError> {
        let first = self.stream.next().await;
        let mut changes = Vec::new();
        let mut event = first;
        loop {
            match event {
                Some(Ok(e)) => {
                    let change = self.change(&e.wd, e.name.as_deref(), e.mask);
                    if e.mask.contains(EventMask::IGNORED) {
                        self.watched.remove(&e.wd);
                    }
                    changes.push(change);
                }
                Some(Err(e)) => return Err(WatchError::Read(e)),
                None => return Err(WatchError::Ended),
            }
            // Drain what is already queued without waiting.
            match self.stream.next().now_or_never() {
                Some(next) => event = next,
                None => break,
            }
        }
        self.ensure_watches()?;
        Ok(changes)
    }

    fn change(
        &self,
        wd: &WatchDescriptor,
        name: Option<&std::ffi::OsStr>,
        mask: EventMask,
    ) -> Change {
        let dir = self.watched.get(wd).cloned().unwrap_or_default();
        let path = match name {
            Some(name) => dir.join(name),
            None => dir,
        };
        let kind = if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            ChangeKind::Created
        } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
            ChangeKind::Removed
        } else {
            ChangeKind::Other
        };
        Change { path, kind }
    }
}

fn nearest_existing(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().find(|a| a.is_dir()).map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(w: &mut DirWatcher) -> Vec<Change> {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("an inotify event within 5 s")
            .unwrap()
    }

    #[tokio::test]
    async fn creation_and_removal_of_entries_are_reported_with_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DirWatcher::new(vec![dir.path().to_path_buf()]).unwrap();
        let f = dir.path().join("dev0");
        std::fs::write(&f, b"").unwrap();
        let changes = next(&mut w).await;
        assert_eq!(changes[0].path, f);
        assert_eq!(changes[0].kind, ChangeKind::Created);
        std::fs::remove_file(&f).unwrap();
        let changes = next(&mut w).await;
        assert!(
            changes
                .iter()
                .any(|c| c.path == f && c.kind == ChangeKind::Removed),
            "{changes:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_directory_is_watched_once_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        let mut w = DirWatcher::new(vec![sub.clone()]).unwrap();
        std::fs::create_dir_all(&sub).unwrap();
        // The first batch reports `a` (its ancestor's entry); watches move down the path.
        next(&mut w).await;
        while !w.watched.values().any(|p| *p == sub) {
            next(&mut w).await;
        }
        std::fs::write(sub.join("x"), b"").unwrap();
        let changes = next(&mut w).await;
        assert!(
            changes.iter().any(|c| c.path == sub.join("x")),
            "{changes:?}"
        );
    }
}
