//! Cgroups as the shim sees them: where the hierarchies are mounted (v1, hybrid or v2), the
//! `cgroupsPath` a container gets under each driver, placing the pause process in its
//! sandbox's cgroup, and usage read back for the stats RPCs.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where containers go when the sandbox names no cgroup parent.
pub const DEFAULT_PARENT: &str = "/nodekit";

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading or writing a cgroup file failed.
    #[error("cgroup file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup manager the runtime is told to use, reported by RuntimeConfig so a kubelet
/// can detect a mismatch with its own setting.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum CgroupDriver {
    /// Paths in the cgroup filesystem (`/kubepods/pod1/ID`).
    Cgroupfs,
    /// systemd slices and scopes (`kubepods.slice:nodekit:ID`).
    Systemd,
}

impl CgroupDriver {
    /// The OCI `linux.cgroupsPath` of a container (or pause) `id` under `parent`.
    pub fn cgroups_path(self, parent: &str, id: &str) -> String {
        match self {
            CgroupDriver::Cgroupfs => {
                let parent = if parent.is_empty() {
                    DEFAULT_PARENT
                } else {
                    parent
                };
                format!("{}/{id}", parent.trim_end_matches('/'))
            }
            CgroupDriver::Systemd => {
                let slice = parent
                    .rsplit('/')
                    .find(|s| !s.is_empty())
                    .unwrap_or("system.slice");
                format!("{slice}:nodekit:{id}")
            }
        }
    }

    /// The directory (relative to a hierarchy's mount point) that `cgroups_path` names.
    pub fn fs_path(self, cgroups_path: &str) -> PathBuf {
        match self {
            CgroupDriver::Cgroupfs => PathBuf::from(cgroups_path.trim_start_matches('/')),
            CgroupDriver::Systemd => {
                let mut parts = cgroups_path.splitn(3, ':');
                let slice = parts.next().unwrap_or_default();
                let prefix = parts.next().unwrap_or_default();
                let name = parts.next().unwrap_or_default();
                expand_slice(slice).join(format!("{prefix}-{name}.scope"))
            }
        }
    }
}

/// systemd's slice nesting: `a-b.slice` lives in `a.slice/a-b.slice`.
fn expand_slice(slice: &str) -> PathBuf {
    let stem = slice.strip_suffix(".slice").unwrap_or(slice);
    let mut path = PathBuf::new();
    let mut acc = String::new();
    for part in stem.split('-').filter(|p| !p.is_empty()) {
        if !acc.is_empty() {
            acc.push('-');
        }
        acc.push_str(part);
        path.push(format!("{acc}.slice"));
    }
    path
}

/// The mounted hierarchies: cgroup v1 controllers and the unified (v2) mount if any.
#[derive(Debug, Clone, Default)]
pub struct Hierarchies {
    /// v1 controller (or `name=...`) -> mount point.
    pub v1: BTreeMap<String, PathBuf>,
    /// The cgroup2 mount (the only one on a pure v2 host; `/sys/fs/cgroup/unified` on hybrid).
    pub unified: Option<PathBuf>,
}

impl Hierarchies {
    /// Reads the current mount namespace's hierarchies from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        Ok(Self::parse(
            &fs::read_to_string(path).map_err(io_err(path))?,
        ))
    }

    /// Parses mountinfo text.
    pub fn parse(mountinfo: &str) -> Self {
        let mut h = Self::default();
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = pre.split(' ').nth(4) else {
                continue;
            };
            let mut post = post.split(' ');
            let fstype = post.next().unwrap_or_default();
            let super_opts = post.nth(1).unwrap_or_default();
            match fstype {
                "cgroup2" => h.unified = Some(PathBuf::from(mount_point)),
                "cgroup" => {
                    for opt in super_opts.split(',') {
                        if !matches!(opt, "rw" | "ro") && !opt.starts_with("release_agent") {
                            h.v1.insert(opt.to_string(), PathBuf::from(mount_point));
                        }
                    }
                }
                _ => {}
            }
        }
        h
    }

    /// True when controllers live on v1 hierarchies (v1 or hybrid).
    pub fn is_v1(&self) -> bool {
        !self.v1.is_empty()
    }

    /// The cgroup2 mount of a hybrid host (v1 controllers plus a unified mount), which crun
    /// refuses to run beside.
    pub fn hybrid_unified(&self) -> Option<&Path> {
        self.unified.as_deref().filter(|_| self.is_v1())
    }

    /// Every distinct hierarchy mount point (v1 ones and the unified one).
    fn mounts(&self) -> Vec<&Path> {
        let mut all: Vec<&Path> = self.v1.values().map(PathBuf::as_path).collect();
        all.extend(self.unified.as_deref());
        all.sort();
        all.dedup();
        all
    }

    /// Moves `pid` into the cgroup `rel` of every hierarchy, creating it (and initialising
    /// cpuset parents, which v1 leaves empty) as needed.
    pub fn enter(&self, rel: &Path, pid: u32) -> Result<(), CgroupError> {
        for mount in self.mounts() {
            let dir = mount.join(rel);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            if self.v1.get("cpuset").map(PathBuf::as_path) == Some(mount) {
                init_cpuset(mount, rel)?;
            }
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(io_err(&procs))?;
        }
        Ok(())
    }

    /// Removes the cgroup `rel` from every hierarchy; an absent one is success.
    pub fn remove(&self, rel: &Path) -> Result<(), CgroupError> {
        for mount in self.mounts() {
            let dir = mount.join(rel);
            match fs::remove_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&dir)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Usage of the cgroup `rel`, from v1 controllers when present, else from cgroup2.
    pub fn stats(&self, rel: &Path) -> Stats {
        if self.is_v1() {
            let file = |ctl: &str, name: &str| {
                self.v1
                    .get(ctl)
                    .and_then(|m| fs::read_to_string(m.join(rel).join(name)).ok())
            };
            let mem = file("memory", "memory.stat")
                .map(|s| parse_flat(&s))
                .unwrap_or_default();
            let usage = file("memory", "memory.usage_in_bytes").and_then(|s| s.trim().parse().ok());
            let limit = file("memory", "memory.limit_in_bytes")
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|l| *l < 1 << 62);
            let oom = file("memory", "memory.oom_control").map(|s| parse_flat(&s));
            Stats {
                cpu_usage_ns: file("cpuacct", "cpuacct.usage").and_then(|s| s.trim().parse().ok()),
                memory_usage: usage,
                working_set: usage.map(|u: u64| {
                    u.saturating_sub(mem.get("total_inactive_file").copied().unwrap_or(0))
                }),
                rss: mem.get("total_rss").copied(),
                page_faults: mem.get("total_pgfault").copied(),
                major_page_faults: mem.get("total_pgmajfault").copied(),
                memory_limit: limit,
                oom_kills: oom.and_then(|o| o.get("oom_kill").copied()),
            }
        } else {
            let Some(base) = self.unified.as_ref().map(|u| u.join(rel)) else {
                return Stats::default();
            };
            let read = |name: &str| fs::read_to_string(base.join(name)).ok();
            let cpu = read("cpu.stat").map(|s| parse_flat(&s)).unwrap_or_default();
            let mem = read("memory.stat")
                .map(|s| parse_flat(&s))
                .unwrap_or_default();
            let usage = read("memory.current").and_then(|s| s.trim().parse().ok());
            Stats {
                cpu_usage_ns: cpu.get("usage_usec").map(|u| u * 1000),
                memory_usage: usage,
                working_set: usage
                    .map(|u: u64| u.saturating_sub(mem.get("inactive_file").copied().unwrap_or(0))),
                rss: mem.get("anon").copied(),
                page_faults: mem.get("pgfault").copied(),
                major_page_faults: mem.get("pgmajfault").copied(),
                memory_limit: read("memory.max").and_then(|s| s.trim().parse().ok()),
                oom_kills: read("memory.events")
                    .map(|s| parse_flat(&s))
                    .and_then(|e| e.get("oom_kill").copied()),
            }
        }
    }

    /// The memory controller's directory for `rel` (where the OOM counter lives).
    pub fn memory_dir(&self, rel: &Path) -> Option<PathBuf> {
        match self.v1.get("memory") {
            Some(m) => Some(m.join(rel)),
            None => self.unified.as_ref().map(|u| u.join(rel)),
        }
    }
}

/// A v1 cpuset cgroup accepts tasks only once `cpuset.cpus`/`cpuset.mems` are set: copy them
/// down from the first ancestor that has them.
fn init_cpuset(mount: &Path, rel: &Path) -> Result<(), CgroupError> {
    let mut dir = mount.to_path_buf();
    for part in rel.components() {
        let parent = dir.clone();
        dir.push(part);
        for name in ["cpuset.cpus", "cpuset.mems"] {
            let own = dir.join(name);
            let current = fs::read_to_string(&own).map_err(io_err(&own))?;
            if current.trim().is_empty() {
                let from = parent.join(name);
                let value = fs::read_to_string(&from).map_err(io_err(&from))?;
                fs::write(&own, value.trim()).map_err(io_err(&own))?;
            }
        }
    }
    Ok(())
}

/// `key value` lines (memory.stat, cpu.stat, memory.oom_control) as a map.
fn parse_flat(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Usage of one cgroup; `None` where the controller or file is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Cumulative CPU time in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    /// Memory charged, page cache included.
    pub memory_usage: Option<u64>,
    /// Usage minus inactive file cache (what the kubelet evicts on).
    pub working_set: Option<u64>,
    /// Anonymous memory.
    pub rss: Option<u64>,
    /// Page faults.
    pub page_faults: Option<u64>,
    /// Major page faults.
    pub major_page_faults: Option<u64>,
    /// The memory limit, when one is set.
    pub memory_limit: Option<u64>,
    /// How many times the OOM killer killed a task of the cgroup.
    pub oom_kills: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_mountinfo_lists_v1_controllers_and_the_unified_mount() {
        let h = Hierarchies::parse(HYBRID);
        assert!(h.is_v1());
        assert_eq!(h.v1["memory"], Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(h.v1["name=systemd"], Path::new("/sys/fs/cgroup/systemd"));
        assert_eq!(
            h.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(h.mounts().len(), 5);
    }

    #[test]
    fn cgroups_paths_follow_each_driver() {
        let fs_ = CgroupDriver::Cgroupfs;
        assert_eq!(fs_.cgroups_path("/kubepods/pod1/", "c"), "/kubepods/pod1/c");
        assert_eq!(fs_.cgroups_path("", "c"), "/nodekit/c");
        assert_eq!(
            fs_.fs_path("/kubepods/pod1/c"),
            Path::new("kubepods/pod1/c")
        );
        let sd = CgroupDriver::Systemd;
        let p = sd.cgroups_path("/kubepods.slice/kubepods-besteffort.slice", "c");
        assert_eq!(p, "kubepods-besteffort.slice:nodekit:c");
        assert_eq!(
            sd.fs_path(&p),
            Path::new("kubepods.slice/kubepods-besteffort.slice/nodekit-c.scope")
        );
    }

    #[test]
    fn v1_stats_compute_working_set_and_ignore_the_unlimited_sentinel() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("memory/pod/c");
        let cpu = dir.path().join("cpuacct/pod/c");
        fs::create_dir_all(&mem).unwrap();
        fs::create_dir_all(&cpu).unwrap();
        fs::write(mem.join("memory.usage_in_bytes"), "1000\n").unwrap();
        fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        fs::write(
            mem.join("memory.stat"),
            "total_inactive_file 300\ntotal_rss 500\ntotal_pgfault 7\ntotal_pgmajfault 1\n",
        )
        .unwrap();
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(cpu.join("cpuacct.usage"), "123456\n").unwrap();
        let mut h = Hierarchies::default();
        h.v1.insert("memory".into(), dir.path().join("memory"));
        h.v1.insert("cpuacct".into(), dir.path().join("cpuacct"));
        let s = h.stats(Path::new("pod/c"));
        assert_eq!(
            s,
            Stats {
                cpu_usage_ns: Some(123_456),
                memory_usage: Some(1000),
                working_set: Some(700),
                rss: Some(500),
                page_faults: Some(7),
                major_page_faults: Some(1),
                memory_limit: None,
                oom_kills: Some(2),
            }
        );
    }
}
