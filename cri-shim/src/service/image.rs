//! ImageService.

use std::sync::Arc;

use nodekit_proto::cri::v1 as cri;
use nodekit_proto::cri::v1::image_service_server::ImageService;
use tonic::{Request, Response, Status};

use super::{convert, rpc, Reply};
use crate::error::CriError;
use crate::image::{disk_usage, pull};
use crate::manager::Manager;

/// ImageService.
#[derive(Debug, Clone)]
pub struct ImageSvc(pub Arc<Manager>);

fn image_name(spec: Option<cri::ImageSpec>) -> Result<String, CriError> {
    match spec.map(|s| s.image).filter(|s| !s.is_empty()) {
        Some(name) => Ok(name),
        None => Err(CriError::invalid("image.image", "must not be empty")),
    }
}

#[tonic::async_trait]
impl ImageService for ImageSvc {
    async fn list_images(
        &self,
        r: Request<cri::ListImagesRequest>,
    ) -> Reply<cri::ListImagesResponse> {
        let wanted = r
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|s| !s.is_empty());
        let store = self.0.images();
        let images = match wanted {
            Some(name) => store.get(&name).iter().map(convert::image).collect(),
            None => store.list().iter().map(convert::image).collect(),
        };
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        r: Request<cri::ImageStatusRequest>,
    ) -> Reply<cri::ImageStatusResponse> {
        let r = r.into_inner();
        rpc("ImageStatus", async {
            let found = self.0.images().get(&image_name(r.image)?);
            Ok(cri::ImageStatusResponse {
                image: found.as_ref().map(convert::image),
                info: found
                    .map(|f| convert::info(r.verbose, &f))
                    .unwrap_or_default(),
            })
        })
        .await
    }

    async fn pull_image(&self, r: Request<cri::PullImageRequest>) -> Reply<cri::PullImageResponse> {
        let r = r.into_inner();
        rpc("PullImage", async {
            let name = image_name(r.image)?;
            let a = r.auth.unwrap_or_default();
            let auth = pull::auth_from(&a.username, &a.password, &a.auth, &a.registry_token);
            let id = pull::pull(self.0.images(), &name, &auth, self.0.pull_options()).await?;
            tracing::info!(image = %name, %id, "pulled");
            Ok(cri::PullImageResponse { image_ref: id })
        })
        .await
    }

    async fn remove_image(
        &self,
        r: Request<cri::RemoveImageRequest>,
    ) -> Reply<cri::RemoveImageResponse> {
        let r = r.into_inner();
        rpc("RemoveImage", async {
            let name = image_name(r.image)?;
            let in_use = self.0.layers_in_use();
            self.0.images().remove(&name, &in_use)?;
            Ok(cri::RemoveImageResponse {})
        })
        .await
    }

    async fn image_fs_info(
        &self,
        _r: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let root = self.0.images().root().to_path_buf();
        let (bytes, inodes) = tokio::task::spawn_blocking(move || disk_usage(&root.join("layers")))
            .await
            .unwrap_or_default();
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp: crate::manager::now_ns(),
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: self.0.images().root().to_string_lossy().into_owned(),
                }),
                used_bytes: Some(cri::UInt64Value { value: bytes }),
                inodes_used: Some(cri::UInt64Value { value: inodes }),
            }],
            container_filesystems: vec![],
        }))
    }
}
