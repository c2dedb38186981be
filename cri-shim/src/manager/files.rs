//! The files a sandbox gives its containers: /etc/hostname, hosts and resolv.conf, and the
//! pod's /dev/shm.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nodekit_proto::cri::v1::DnsConfig;

use super::container::mkdirs;
use super::mount_err;
use crate::error::CriError;

/// Mounts the pod's /dev/shm at `path`: a 64 MiB tmpfs (containerd's size) that every
/// container of the pod binds, so processes sharing the IPC namespace share POSIX shared
/// memory as well.
pub fn mount_shm(path: &Path) -> Result<(), CriError> {
    mkdirs(path)?;
    mount(
        Some("shm"),
        path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(mount_err("mounting the pod's /dev/shm on", path))
}

/// `/etc/hosts` for a pod: the loopback names plus the pod's own address and hostname.
pub fn hosts(hostname: &str, ips: &[String]) -> String {
    let mut out = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    for ip in ips {
        out.push_str(&format!("{ip}\t{hostname}\n"));
    }
    out
}

/// `/etc/resolv.conf` from the pod's DNS config; without one, the node's file is used.
pub fn resolv_conf(dns: Option<&DnsConfig>, node_resolv: &Path) -> String {
    match dns.filter(|d| !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty())) {
        Some(d) => {
            let mut out = String::new();
            if !d.searches.is_empty() {
                out.push_str(&format!("search {}\n", d.searches.join(" ")));
            }
            for s in &d.servers {
                out.push_str(&format!("nameserver {s}\n"));
            }
            if !d.options.is_empty() {
                out.push_str(&format!("options {}\n", d.options.join(" ")));
            }
            out
        }
        None => std::fs::read_to_string(node_resolv).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_follows_dns_config_or_copies_the_node_file() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&dns), Path::new("/nonexistent")),
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("resolv.conf");
        std::fs::write(&node, "nameserver 1.1.1.1\n").unwrap();
        assert_eq!(resolv_conf(None, &node), "nameserver 1.1.1.1\n");
        assert_eq!(
            resolv_conf(Some(&DnsConfig::default()), &node),
            "nameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn hosts_maps_the_pod_ip_to_its_hostname() {
        let h = hosts("web-0", &["10.88.0.5".into()]);
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.88.0.5\tweb-0\n"));
    }
}
