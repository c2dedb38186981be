//! Processes the lab owns, found through `/proc`: by a string in their command line (the
//! lab's unique directory or namespace prefix), and their memory.

use std::path::Path;

/// A process and its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// The PID.
    pub pid: i32,
    /// `argv`, split at NULs.
    pub cmdline: Vec<String>,
}

impl Proc {
    /// The file name of `argv[0]`.
    pub fn program(&self) -> &str {
        self.cmdline
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or("")
    }
}

/// Every process (but this one) whose command line contains `needle`.
pub fn mentioning(needle: &str) -> Vec<Proc> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if pid != me && cmdline.iter().any(|a| a.contains(needle)) {
            out.push(Proc { pid, cmdline });
        }
    }
    out
}

/// SIGKILL to `pid` (gone already is fine).
pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
}

/// A process's memory: resident set size and proportional set size (shared pages divided
/// among their users), KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    /// VmRSS.
    pub rss_kib: u64,
    /// Pss from `smaps_rollup`.
    pub pss_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, o: Memory) -> Memory {
        Memory {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
        }
    }
}

/// The memory of `pid`; `None` when it is gone.
pub fn memory(pid: i32) -> Option<Memory> {
    let dir = Path::new("/proc").join(pid.to_string());
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let rollup = std::fs::read_to_string(dir.join("smaps_rollup")).unwrap_or_default();
    Some(Memory {
        rss_kib: field_kib(&status, "VmRSS")?,
        pss_kib: field_kib(&rollup, "Pss").unwrap_or(0),
    })
}

/// The value of `key` (`VmRSS:   1234 kB`) in a `/proc` text, KiB.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().trim_end_matches("kB").trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_fields_are_read_by_exact_key() {
        let text = "Name:\tx\nVmRSS:\t    6120 kB\nPss_Anon:  3 kB\nPss:   12 kB\n";
        assert_eq!(field_kib(text, "VmRSS"), Some(6120));
        assert_eq!(field_kib(text, "Pss"), Some(12));
        assert_eq!(field_kib(text, "VmHWM"), None);
    }

    #[test]
    fn this_process_has_memory_and_is_never_listed() {
        let me = std::process::id() as i32;
        assert!(memory(me).is_some_and(|m| m.rss_kib > 0));
        let arg0 = std::env::args().next().unwrap_or_default();
        assert!(mentioning(&arg0).iter().all(|p| p.pid != me));
        let p = Proc {
            pid: 1,
            cmdline: vec!["/usr/bin/containerd-shim-runc-v2".into(), "-id".into()],
        };
        assert_eq!(p.program(), "containerd-shim-runc-v2");
    }
}
