//! ContainerStats / PodSandboxStats from cgroups: CPU (cumulative and, from the previous
//! sample, nano-cores), memory (usage, working set, RSS, faults, available) and the
//! writable layer's disk use.

use nodekit_proto::cri::v1::{
    ContainerAttributes, ContainerStats, CpuUsage, FilesystemIdentifier, FilesystemUsage,
    LinuxPodSandboxStats, MemoryUsage, PodSandboxAttributes, PodSandboxStats, UInt64Value,
};

use super::records::{ContainerRecord, SandboxRecord};
use super::{lock, now_ns, Manager};
use crate::error::CriError;
use crate::image::disk_usage;

fn v(x: Option<u64>) -> Option<UInt64Value> {
    x.map(|value| UInt64Value { value })
}

impl Manager {
    /// Stats of one container record.
    pub fn stats_of(&self, rec: &ContainerRecord) -> ContainerStats {
        let now = now_ns();
        let s = self
            .cgroups
            .stats(&self.opts.cgroup_driver.fs_path(&rec.cgroups_path));
        let nano_cores = s.cpu_usage_ns.and_then(|usage| {
            let prev = lock(&self.cpu_samples).insert(rec.id.clone(), (now, usage));
            prev.and_then(|(t, u)| {
                let dt = now.checked_sub(t).filter(|d| *d > 0)? as u128;
                Some((u128::from(usage.saturating_sub(u)) * 1_000_000_000 / dt) as u64)
            })
        });
        let upper = self.container_root_dir(&rec.id).join("upper");
        let (bytes, inodes) = disk_usage(&upper);
        let cfg = &rec.config.0;
        ContainerStats {
            attributes: Some(ContainerAttributes {
                id: rec.id.clone(),
                metadata: cfg.metadata.clone(),
                labels: cfg.labels.clone(),
                annotations: cfg.annotations.clone(),
            }),
            cpu: Some(CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: v(s.cpu_usage_ns),
                usage_nano_cores: v(nano_cores),
            }),
            memory: Some(MemoryUsage {
                timestamp: now,
                working_set_bytes: v(s.working_set),
                available_bytes: v(s
                    .memory_limit
                    .zip(s.working_set)
                    .map(|(l, w)| l.saturating_sub(w))),
                usage_bytes: v(s.memory_usage),
                rss_bytes: v(s.rss),
                page_faults: v(s.page_faults),
                major_page_faults: v(s.major_page_faults),
            }),
            writable_layer: Some(FilesystemUsage {
                timestamp: now,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: self.opts.root.to_string_lossy().into_owned(),
                }),
                used_bytes: Some(UInt64Value { value: bytes }),
                inodes_used: Some(UInt64Value { value: inodes }),
            }),
            swap: None,
        }
    }

    /// ContainerStats: NOT_FOUND for unknown IDs.
    pub fn container_stats(&self, id: &str) -> Result<ContainerStats, CriError> {
        Ok(self.stats_of(&self.container(id)?))
    }

    /// PodSandboxStats: NOT_FOUND for unknown IDs.
    pub fn pod_sandbox_stats(&self, id: &str) -> Result<PodSandboxStats, CriError> {
        let sandbox = self.sandbox(id)?;
        Ok(self.sandbox_stats_of(&sandbox, &self.containers()))
    }

    /// Stats of one sandbox record: the sum of its containers' (found in `all`, every
    /// container, so a listing refreshes them once) CPU and memory, with each container's.
    pub fn sandbox_stats_of(
        &self,
        sandbox: &SandboxRecord,
        all: &[ContainerRecord],
    ) -> PodSandboxStats {
        let containers: Vec<ContainerStats> = all
            .iter()
            .filter(|c| c.sandbox_id == sandbox.id)
            .map(|c| self.stats_of(c))
            .collect();
        let now = now_ns();
        let sum = |f: &dyn Fn(&ContainerStats) -> Option<u64>| -> Option<UInt64Value> {
            let vals: Vec<u64> = containers.iter().filter_map(f).collect();
            (!vals.is_empty()).then(|| UInt64Value {
                value: vals.iter().sum(),
            })
        };
        let cpu = CpuUsage {
            timestamp: now,
            usage_core_nano_seconds: sum(&|c| {
                c.cpu
                    .as_ref()?
                    .usage_core_nano_seconds
                    .as_ref()
                    .map(|v| v.value)
            }),
            usage_nano_cores: sum(&|c| c.cpu.as_ref()?.usage_nano_cores.as_ref().map(|v| v.value)),
        };
        let memory = MemoryUsage {
            timestamp: now,
            working_set_bytes: sum(&|c| {
                c.memory
                    .as_ref()?
                    .working_set_bytes
                    .as_ref()
                    .map(|v| v.value)
            }),
            usage_bytes: sum(&|c| c.memory.as_ref()?.usage_bytes.as_ref().map(|v| v.value)),
            rss_bytes: sum(&|c| c.memory.as_ref()?.rss_bytes.as_ref().map(|v| v.value)),
            page_faults: sum(&|c| c.memory.as_ref()?.page_faults.as_ref().map(|v| v.value)),
            major_page_faults: sum(&|c| {
                c.memory
                    .as_ref()?
                    .major_page_faults
                    .as_ref()
                    .map(|v| v.value)
            }),
            available_bytes: None,
        };
        let cfg = &sandbox.config.0;
        PodSandboxStats {
            attributes: Some(PodSandboxAttributes {
                id: sandbox.id.clone(),
                metadata: cfg.metadata.clone(),
                labels: cfg.labels.clone(),
                annotations: cfg.annotations.clone(),
            }),
            linux: Some(LinuxPodSandboxStats {
                cpu: Some(cpu),
                memory: Some(memory),
                network: None,
                process: None,
                containers,
            }),
            windows: None,
        }
    }
}
