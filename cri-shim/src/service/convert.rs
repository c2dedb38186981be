//! Records to CRI messages.

use std::collections::HashMap;

use nodekit_proto::cri::v1 as cri;

use crate::image::{ImageRecord, ImageStore};
use crate::manager::container::{exit_reason, state_of};
use crate::manager::records::{ContainerRecord, SandboxRecord};
use crate::manager::sandbox::namespace_modes;

/// The CRI state of a sandbox.
pub fn sandbox_state(ready: bool) -> cri::PodSandboxState {
    if ready {
        cri::PodSandboxState::SandboxReady
    } else {
        cri::PodSandboxState::SandboxNotready
    }
}

/// ListPodSandbox item.
pub fn pod_sandbox(rec: &SandboxRecord, ready: bool) -> cri::PodSandbox {
    let cfg = &rec.config.0;
    cri::PodSandbox {
        id: rec.id.clone(),
        metadata: cfg.metadata.clone(),
        state: sandbox_state(ready) as i32,
        created_at: rec.created_at,
        labels: cfg.labels.clone(),
        annotations: cfg.annotations.clone(),
        runtime_handler: rec.runtime_handler.clone(),
    }
}

/// PodSandboxStatus.
pub fn pod_sandbox_status(rec: &SandboxRecord, ready: bool) -> cri::PodSandboxStatus {
    let cfg = &rec.config.0;
    let (network, pid, ipc) = namespace_modes(cfg);
    let mut ips = rec.ips.iter();
    cri::PodSandboxStatus {
        id: rec.id.clone(),
        metadata: cfg.metadata.clone(),
        state: sandbox_state(ready) as i32,
        created_at: rec.created_at,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: ips.next().cloned().unwrap_or_default(),
            additional_ips: ips.map(|ip| cri::PodIp { ip: ip.clone() }).collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: network as i32,
                    pid: pid as i32,
                    ipc: ipc as i32,
                    ..Default::default()
                }),
            }),
        }),
        labels: cfg.labels.clone(),
        annotations: cfg.annotations.clone(),
        runtime_handler: rec.runtime_handler.clone(),
    }
}

/// The image name and reference a container shows: its image's first tag and first repo
/// digest (else the ID), as containerd reports them.
fn image_names(rec: &ContainerRecord, images: &ImageStore) -> (Option<cri::ImageSpec>, String) {
    let requested = rec.config.0.image.clone();
    match images.get(&rec.image_id) {
        Some(img) => (
            img.repo_tags
                .first()
                .map(|t| cri::ImageSpec {
                    image: t.clone(),
                    ..Default::default()
                })
                .or(requested),
            img.repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| rec.image_id.clone()),
        ),
        None => (requested, rec.image_id.clone()),
    }
}

/// ListContainers item.
pub fn container(rec: &ContainerRecord) -> cri::Container {
    let cfg = &rec.config.0;
    cri::Container {
        id: rec.id.clone(),
        pod_sandbox_id: rec.sandbox_id.clone(),
        metadata: cfg.metadata.clone(),
        image: cfg.image.clone(),
        image_ref: rec.image_id.clone(),
        state: state_of(rec) as i32,
        created_at: rec.created_at,
        labels: cfg.labels.clone(),
        annotations: cfg.annotations.clone(),
        image_id: rec.image_id.clone(),
    }
}

/// ContainerStatus.
pub fn container_status(rec: &ContainerRecord, images: &ImageStore) -> cri::ContainerStatus {
    let cfg = &rec.config.0;
    let (image, image_ref) = image_names(rec, images);
    let exit = rec.exit.as_ref();
    cri::ContainerStatus {
        id: rec.id.clone(),
        metadata: cfg.metadata.clone(),
        state: state_of(rec) as i32,
        created_at: rec.created_at,
        started_at: rec.started_at,
        finished_at: exit.map_or(0, |e| e.finished_at),
        exit_code: exit.map_or(0, |e| e.exit_code),
        image,
        image_ref,
        reason: exit_reason(rec).to_string(),
        message: rec.start_error.clone().unwrap_or_default(),
        labels: cfg.labels.clone(),
        annotations: cfg.annotations.clone(),
        mounts: cfg.mounts.clone(),
        log_path: rec
            .log_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        resources: cfg
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|r| cri::ContainerResources {
                linux: Some(r),
                windows: None,
            }),
        image_id: rec.image_id.clone(),
        user: Some(cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: i64::from(rec.user.0),
                gid: i64::from(rec.user.1),
                supplemental_groups: rec.user.2.iter().map(|g| i64::from(*g)).collect(),
            }),
        }),
    }
}

/// An image as ListImages/ImageStatus show it.
pub fn image(rec: &ImageRecord) -> cri::Image {
    let user = rec
        .config
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let name = user.split(':').next().unwrap_or_default().to_string();
    let (uid, username) = match name.parse::<i64>() {
        Ok(uid) => (Some(cri::Int64Value { value: uid }), String::new()),
        Err(_) => (None, name),
    };
    cri::Image {
        id: rec.id.clone(),
        repo_tags: rec.repo_tags.clone(),
        repo_digests: rec.repo_digests.clone(),
        size: rec.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: rec.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// Whether every selector label is present with the same value.
pub fn labels_match(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The verbose `info` map: the record as JSON under "info".
pub fn info<T: serde::Serialize>(verbose: bool, rec: &T) -> HashMap<String, String> {
    if !verbose {
        return HashMap::new();
    }
    [(
        "info".to_string(),
        serde_json::to_string(rec).unwrap_or_default(),
    )]
    .into()
}
