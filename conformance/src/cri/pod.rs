//! Pod sandbox and container configs as a kubelet would send them, from one template per
//! target (namespace, log directory root, cgroup parent, image).

use std::path::PathBuf;

use nodekit_proto::cri::v1 as cri;

/// What every pod and container of a run shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTemplate {
    /// The pods' Kubernetes namespace.
    pub namespace: String,
    /// Each pod logs to `log_root/<pod name>`.
    pub log_root: PathBuf,
    /// The pods' cgroup parent (empty: the runtime's default).
    pub cgroup_parent: String,
    /// The containers' image.
    pub image: String,
}

impl PodTemplate {
    /// The sandbox config of pod `name`: uid `uid-<name>`, hostname `name`, label
    /// `app=<name>`, logs in `log_root/name`.
    pub fn sandbox(&self, name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.log_root.join(name).to_string_lossy().into_owned(),
            labels: [("app".to_string(), name.to_string())].into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The config of container `name` running `command`: the template's image, log path
    /// `<name>.log`, label `c=<name>`.
    pub fn container(&self, name: &str, command: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(self.image_spec()),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            labels: [("c".to_string(), name.to_string())].into(),
            ..Default::default()
        }
    }

    /// The template's image as a spec.
    pub fn image_spec(&self) -> cri::ImageSpec {
        image_spec(&self.image)
    }
}

/// An image spec naming `image`.
pub fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_the_template() {
        let t = PodTemplate {
            namespace: "ns".into(),
            log_root: PathBuf::from("/logs"),
            cgroup_parent: "/nk".into(),
            image: "img:1".into(),
        };
        let s = t.sandbox("web");
        assert_eq!(s.log_directory, "/logs/web");
        assert_eq!(s.metadata.map(|m| m.uid), Some("uid-web".into()));
        assert_eq!(s.linux.map(|l| l.cgroup_parent), Some("/nk".into()));
        let c = t.container("c1", &["sleep", "1"]);
        assert_eq!(c.image.map(|i| i.image), Some("img:1".into()));
        assert_eq!(c.command, ["sleep", "1"]);
        assert_eq!(c.log_path, "c1.log");
    }
}
