//! `--registry-config-dir` (containerd's hosts.toml): `registry.k8s.io/...`, unreachable from
//! the lab, is pulled through the lab's local registry as a mirror, after a mirror that is
//! down; the image keeps its `registry.k8s.io` name, and the pause image comes the same way.
#![allow(clippy::unwrap_used)]

mod common;

use common::{image_spec, Lab, LabOptions};
use nodekit_conformance::cri::lab::{REGISTRY, TLS_REGISTRY};
use nodekit_proto::cri::v1 as cri;
use tonic::Code;

const MIRRORED: &str = "registry.k8s.io/nk/busybox:1";
const MIRRORED_PAUSE: &str = "registry.k8s.io/nk/pause:1";

async fn pull(lab: &mut Lab, name: &str) -> Result<String, tonic::Status> {
    lab.images
        .pull_image(cri::PullImageRequest {
            image: image_spec(name),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

/// Writes `DIR/<host>/hosts.toml`.
fn hosts_toml(dir: &std::path::Path, host: &str, text: &str) {
    std::fs::create_dir_all(dir.join(host)).unwrap();
    std::fs::write(dir.join(host).join("hosts.toml"), text).unwrap();
}

#[tokio::test]
async fn registry_k8s_io_is_pulled_through_the_second_mirror_when_the_first_is_down() {
    let mut lab = Lab::start(LabOptions::default()).await;
    let certs = lab.path("certs.d");
    // Port 1 of the node namespace's loopback has no listener: that mirror is down.
    hosts_toml(
        &certs,
        "registry.k8s.io",
        &format!(
            "server = \"https://registry.k8s.io\"\n\n\
             [host.\"http://127.0.0.1:1\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n\
             [host.\"http://{REGISTRY}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    );
    let certs_arg = certs.to_string_lossy().into_owned();
    lab.restart_shim_with(&[
        "--registry-config-dir",
        &certs_arg,
        "--pause-image",
        MIRRORED_PAUSE,
    ])
    .await;

    let id = pull(&mut lab, MIRRORED)
        .await
        .unwrap_or_else(|e| panic!("PullImage {MIRRORED}: {e}\n{}", lab.shim_log()));
    let status = lab.image_status(MIRRORED).await.unwrap();
    assert_eq!(status.id, id);
    assert_eq!(status.repo_tags, [MIRRORED], "recorded under its own name");
    assert!(
        status.repo_digests[0].starts_with("registry.k8s.io/nk/busybox@sha256:"),
        "{:?}",
        status.repo_digests
    );
    let log = lab.shim_log();
    assert!(
        log.contains("registry host failed, trying the next") && log.contains("127.0.0.1:1"),
        "the down mirror was tried first:\n{log}"
    );
    assert_eq!(
        pull(&mut lab, common::IMAGE).await.unwrap(),
        id,
        "the same image as the lab registry's own"
    );

    // The pause image comes through the mirror too, and containers run from mirrored images.
    let pod = lab.run_pod("mirrored").await;
    let config = cri::ContainerConfig {
        image: image_spec(MIRRORED),
        ..lab.container_config("c", &["sh", "-c", "echo mirrored"])
    };
    let c = lab
        .try_create_container(&pod, "mirrored", config)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer from {MIRRORED}: {e}"));
    lab.start_container(&c).await;
    assert_eq!(lab.wait_exited(&c).await.exit_code, 0);
    lab.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();

    // Without a mirror for it, the upstream itself is tried (and is unreachable here).
    let err = pull(&mut lab, "quay.io/nk/absent:1").await.unwrap_err();
    assert!(err.message().contains("quay.io"), "{err}");
}

#[tokio::test]
async fn default_hosts_respect_capabilities_and_override_path_and_bad_files_name_the_field() {
    let mut lab = Lab::start(LabOptions::default()).await;
    let certs = lab.path("certs.d");
    // A down pull-only mirror first (asked for blobs, never to resolve the tag), then the lab
    // registry with an override_path whose path goes on after /v2.
    hosts_toml(
        &certs,
        "_default",
        &format!(
            "[host.\"http://127.0.0.1:1\"]\n  capabilities = [\"pull\"]\n\n\
             [host.\"http://{REGISTRY}/v2/nk\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"
        ),
    );
    hosts_toml(
        &certs,
        "broken.example",
        "[host.\"http://m:5000\"]\n  capabilities = [\"fly\"]\n",
    );
    let certs_arg = certs.to_string_lossy().into_owned();
    lab.restart_shim_with(&["--registry-config-dir", &certs_arg])
        .await;
    let via_default = pull(&mut lab, "mirror.example/busybox:1")
        .await
        .unwrap_or_else(|e| panic!("PullImage via _default: {e}\n{}", lab.shim_log()));
    let log = lab.shim_log();
    assert!(
        log.contains("127.0.0.1:1/v2/busybox/blobs/sha256:")
            && !log.contains("127.0.0.1:1/v2/busybox/manifests/"),
        "the pull-only mirror was asked for blobs only:\n{log}"
    );
    assert_eq!(pull(&mut lab, common::IMAGE).await.unwrap(), via_default);

    let err = pull(&mut lab, "broken.example/nk/busybox:1")
        .await
        .unwrap_err();
    let file = certs.join("broken.example/hosts.toml");
    assert!(
        err.message().contains(&*file.to_string_lossy())
            && err.message().contains("capabilities")
            && err.message().contains("fly"),
        "{err}"
    );
    assert_eq!(err.code(), Code::Unknown);
}

#[tokio::test]
async fn https_mirrors_are_verified_against_their_ca_unless_told_to_skip() {
    let mut lab = Lab::start(LabOptions::default()).await;
    let ca = lab.start_tls_registry();
    let certs = lab.path("certs.d");
    let host_dir = certs.join("registry.k8s.io");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(&ca, host_dir.join("lab-ca.pem")).unwrap();
    let certs_arg = certs.to_string_lossy().into_owned();
    lab.restart_shim_with(&["--registry-config-dir", &certs_arg])
        .await;
    // Only the HTTPS mirror can serve the image: the server is unreachable from the lab.
    let mirror = |extra: &str| {
        format!(
            "server = \"https://registry.k8s.io\"\n\n\
             [host.\"https://{TLS_REGISTRY}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{extra}"
        )
    };

    hosts_toml(
        &certs,
        "registry.k8s.io",
        &mirror("  ca = \"lab-ca.pem\"\n"),
    );
    let id = pull(&mut lab, MIRRORED).await.unwrap_or_else(|e| {
        panic!(
            "PullImage over HTTPS with the lab CA: {e}\n{}",
            lab.shim_log()
        )
    });
    assert_eq!(lab.image_status(MIRRORED).await.unwrap().id, id);
    lab.images
        .remove_image(cri::RemoveImageRequest {
            image: image_spec(MIRRORED),
        })
        .await
        .unwrap();

    hosts_toml(&certs, "registry.k8s.io", &mirror(""));
    let err = pull(&mut lab, MIRRORED).await.unwrap_err();
    assert!(
        err.message().to_ascii_lowercase().contains("certificate"),
        "an unknown CA is refused: {err}"
    );
    assert!(lab.image_status(MIRRORED).await.is_none());

    hosts_toml(&certs, "registry.k8s.io", &mirror("  skip_verify = true\n"));
    assert_eq!(pull(&mut lab, MIRRORED).await.unwrap(), id);
}
