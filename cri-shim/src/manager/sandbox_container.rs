//! The sandbox container (`--pause-image`): the pod's namespace holder run from an image by
//! the OCI runtime like any container (overlay rootfs, spec builder, monitor) instead of the
//! `nodekit-pause` host process. Its runtime ID is the sandbox ID; its rootfs lives under
//! `ROOT/sandboxes/ID`, its bundle and exit record in the sandbox's state directory.

use std::path::PathBuf;

use oci_client::secrets::RegistryAuth;

use super::container::{finish_monitor, mkdirs, mount_rootfs, unmount_rootfs, write_bundle};
use super::records::{SandboxContainer, SandboxRecord};
use super::Manager;
use crate::error::CriError;
use crate::image::{pull, ImageError, ImageRecord};
use crate::monitor::StdioArgs;
use crate::oci::{sandbox, user};
use crate::process::ProcessRef;
use crate::runtime::{CreateParams, RuntimeError};
use crate::store;

impl Manager {
    fn sandbox_root_dir(&self, id: &str) -> PathBuf {
        self.opts.root.join("sandboxes").join(id)
    }

    /// The pause image `reference`, pulled when absent the way PullImage pulls (registry
    /// hosts, plain HTTP rules; no credentials, as containerd pulls its sandbox image).
    pub(super) async fn ensure_pause_image(
        &self,
        reference: &str,
    ) -> Result<ImageRecord, CriError> {
        let pause_err = |source| CriError::PauseImage {
            image: reference.to_string(),
            source,
        };
        if let Some(image) = self.images.get(reference) {
            return Ok(image);
        }
        tracing::info!(image = %reference, "pulling the pause image");
        pull::pull(
            &self.images,
            reference,
            &RegistryAuth::Anonymous,
            &self.pull_opts,
        )
        .await
        .map_err(pause_err)?;
        self.images
            .get(reference)
            .ok_or_else(|| pause_err(ImageError::NotFound(reference.to_string())))
    }

    /// Creates and starts the sandbox container of `rec` from `image`, in the sandbox's
    /// netns (none: the node's) and cgroup, with `hostname` in its own UTS namespace (none:
    /// the node's); returns its init process, whose namespaces the pod's containers join.
    /// Records the image first, so a failure or crash is undone by
    /// [`Manager::remove_sandbox_container`].
    pub(super) async fn start_sandbox_container(
        &self,
        rec: &mut SandboxRecord,
        image: &ImageRecord,
        hostname: Option<&str>,
        cgroups_path: String,
    ) -> Result<ProcessRef, CriError> {
        rec.sandbox_container = Some(SandboxContainer {
            image_id: image.id.clone(),
            chain_ids: image.chain_ids.clone(),
            monitor: None,
        });
        self.save_sandbox(rec)?;
        let dir = self.sandbox_dir(&rec.id);
        let bundle = dir.join("bundle");
        mkdirs(&bundle)?;
        let rootfs = mount_rootfs(&self.sandbox_root_dir(&rec.id), image, &self.images)?;
        let request = sandbox::pause_request(&rec.config.0);
        let image_cfg = image.config.config().clone();
        let image_user = image_cfg
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default();
        let sc = request
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref());
        let user = user::resolve(&rootfs, sc, &image_user)?;
        let spec = sandbox::build(&sandbox::SandboxSpecInput {
            sandbox_id: &rec.id,
            sandbox: &rec.config.0,
            request: &request,
            image: image_cfg.as_ref(),
            rootfs: &rootfs,
            user: &user,
            network: rec.netns.clone(),
            hostname,
            shm: self.sandbox_shm(rec),
            cgroups_path,
            oom_score_adj_floor: super::container::oom_score_adj_floor(),
        })?;
        write_bundle(&bundle, &spec)?;
        let (pid, monitor_pid) = self
            .runtime
            .create(&CreateParams {
                id: &rec.id,
                bundle: &bundle,
                log_path: None,
                exit_file: &dir.join("exit.json"),
                memory_cgroup: None,
                attach_socket: None,
                stdio: StdioArgs::default(),
            })
            .await?;
        if let Some(container) = rec.sandbox_container.as_mut() {
            container.monitor = ProcessRef::of(monitor_pid as i32);
        }
        self.save_sandbox(rec)?;
        self.runtime.start(&rec.id).await?;
        ProcessRef::of(pid).ok_or_else(|| {
            RuntimeError::Failed {
                verb: "start",
                id: rec.id.clone(),
                message: format!("the sandbox container (pid {pid}) exited at once"),
            }
            .into()
        })
    }

    /// Removes the sandbox container's runtime state, monitor, rootfs mount and directory (the
    /// caller killed its process); converges, and does nothing for `nodekit-pause` sandboxes.
    pub(super) async fn remove_sandbox_container(
        &self,
        rec: &SandboxRecord,
    ) -> Result<(), CriError> {
        let Some(container) = &rec.sandbox_container else {
            return Ok(());
        };
        self.runtime.delete(&rec.id).await?;
        finish_monitor(container.monitor).await;
        let root = self.sandbox_root_dir(&rec.id);
        unmount_rootfs(&root)?;
        Ok(store::remove_dir_all(&root)?)
    }
}
