//! Which staging and target paths the node service accepts: absolute, no `..`, no symlink
//! as the last component, and (unless `--allow-any-path`) resolving under the kubelet root
//! even through symlinks in the existing part of the path.

use std::io;
use std::path::{Component, Path, PathBuf};

/// A path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The path is not acceptable; `why` says how.
    #[error("{field} {path:?}: {why}")]
    Refused {
        /// The request field.
        field: &'static str,
        /// The path given.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The path could not be inspected.
    #[error("{field} {path:?}: resolving {at}")]
    Resolve {
        /// The request field.
        field: &'static str,
        /// The path given.
        path: String,
        /// The ancestor that failed.
        at: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The rule for request paths.
#[derive(Debug, Clone)]
pub struct PathPolicy {
    kubelet_root: PathBuf,
    allow_any: bool,
}

impl PathPolicy {
    /// Paths must lie under `kubelet_root` unless `allow_any`.
    pub fn new(kubelet_root: impl Into<PathBuf>, allow_any: bool) -> Self {
        Self {
            kubelet_root: kubelet_root.into(),
            allow_any,
        }
    }

    /// Validates `raw` (the value of request field `field`) and returns it with symlinks in
    /// its existing ancestors resolved: the path to mount at and to look for in mountinfo.
    pub fn resolve(&self, field: &'static str, raw: &str) -> Result<PathBuf, PathError> {
        let refuse = |why: &str| PathError::Refused {
            field,
            path: raw.to_string(),
            why: why.to_string(),
        };
        if raw.contains('\0') {
            return Err(refuse("contains a NUL byte"));
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(refuse("must be absolute"));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(refuse("must not contain `..`"));
        }
        let is_symlink = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if is_symlink {
            return Err(refuse("must not be a symlink"));
        }
        let resolved =
            resolve_existing_prefix(path).map_err(|(at, source)| PathError::Resolve {
                field,
                path: raw.to_string(),
                at,
                source,
            })?;
        if !self.allow_any {
            let root = std::fs::canonicalize(&self.kubelet_root)
                .unwrap_or_else(|_| self.kubelet_root.clone());
            if resolved == root || !resolved.starts_with(&root) {
                return Err(refuse(&format!(
                    "must lie under the kubelet root {} (resolves to {}); see --kubelet-root and --allow-any-path",
                    root.display(),
                    resolved.display()
                )));
            }
        }
        Ok(resolved)
    }
}

/// Canonicalizes the longest existing ancestor of `path` and appends the rest.
fn resolve_existing_prefix(path: &Path) -> Result<PathBuf, (PathBuf, io::Error)> {
    let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
    let mut at = path;
    loop {
        match std::fs::canonicalize(at) {
            Ok(mut base) => {
                base.extend(missing.iter().rev());
                return Ok(base);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match (at.parent(), at.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name);
                    at = parent;
                }
                _ => return Err((at.to_path_buf(), e)),
            },
            Err(e) => return Err((at.to_path_buf(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_the_root_resolve_even_when_missing() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("pods/p")).expect("mkdir");
        let policy = PathPolicy::new(root.path(), false);
        let raw = root.path().join("pods/p/volumes/v/mount");
        let got = policy
            .resolve("target_path", raw.to_str().expect("utf8"))
            .expect("accepted");
        let canon_root = std::fs::canonicalize(root.path()).expect("canon");
        assert_eq!(got, canon_root.join("pods/p/volumes/v/mount"));
    }

    #[test]
    fn relative_dotdot_outside_and_symlink_escapes_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).expect("link");
        std::os::unix::fs::symlink(outside.path(), root.path().join("last")).expect("link");
        let policy = PathPolicy::new(root.path(), false);
        let r = root.path().display().to_string();
        for bad in [
            "relative/path".to_string(),
            format!("{r}/pods/../../etc"),
            "/etc/kubelet-lookalike".to_string(),
            format!("{r}/escape/x"),
            format!("{r}/last"),
            r.clone(),
        ] {
            let err = policy.resolve("target_path", &bad).unwrap_err();
            assert!(matches!(err, PathError::Refused { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn allow_any_path_still_requires_absolute_paths_without_dotdot() {
        let policy = PathPolicy::new("/var/lib/kubelet", true);
        assert!(policy.resolve("staging_target_path", "/tmp/x/y").is_ok());
        assert!(policy.resolve("staging_target_path", "tmp/x").is_err());
        assert!(policy.resolve("staging_target_path", "/tmp/../x").is_err());
    }
}
