//! Runtime identity and readiness, and the image service.

use std::time::{Duration, Instant};

use nodekit_proto::cri::v1 as cri;
use tonic::Code;

use super::{call, code_of, violation, CheckError, CheckFuture};
use crate::cri::lab::{ABSENT_IMAGE, SPARE_IMAGE};
use crate::cri::pod::image_spec;
use crate::cri::Env;
use crate::report::Outcome;

/// How long a runtime may take to report itself ready after it started.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) fn version(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let v = call(
            "Version",
            env.runtime.clone().version(cri::VersionRequest::default()),
        )
        .await?;
        if v.runtime_name.is_empty() || v.runtime_version.is_empty() {
            return Err(violation(format!(
                "runtime_name {:?} and runtime_version {:?} must both be set",
                v.runtime_name, v.runtime_version
            )));
        }
        if v.runtime_api_version != "v1" {
            return Err(violation(format!(
                "runtime_api_version is {:?}, wanted \"v1\"",
                v.runtime_api_version
            )));
        }
        Ok(Outcome::passed_with(format!(
            "{} {}",
            v.runtime_name, v.runtime_version
        )))
    })
}

pub(super) fn status(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let s = call(
                "Status",
                env.runtime
                    .clone()
                    .status(cri::StatusRequest { verbose: false }),
            )
            .await?
            .status
            .ok_or_else(|| violation("Status answered without a status"))?;
            let not_ready: Vec<String> = ["RuntimeReady", "NetworkReady"]
                .iter()
                .filter_map(
                    |want| match s.conditions.iter().find(|c| c.r#type == *want) {
                        Some(c) if c.status => None,
                        Some(c) => Some(format!("{want} false ({}: {})", c.reason, c.message)),
                        None => Some(format!("{want} missing")),
                    },
                )
                .collect();
            if not_ready.is_empty() {
                return Ok(Outcome::passed());
            }
            if Instant::now() > deadline {
                return Err(violation(format!(
                    "after {READY_TIMEOUT:?}: {}",
                    not_ready.join("; ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The image service's view of `image`.
async fn image_status(env: &Env, image: &str) -> Result<Option<cri::Image>, CheckError> {
    let req = cri::ImageStatusRequest {
        image: Some(image_spec(image)),
        verbose: false,
    };
    Ok(call(
        &format!("ImageStatus {image}"),
        env.images.clone().image_status(req),
    )
    .await?
    .image)
}

async fn pull(env: &Env, image: &str) -> Result<String, CheckError> {
    let req = cri::PullImageRequest {
        image: Some(image_spec(image)),
        ..Default::default()
    };
    Ok(call(
        &format!("PullImage {image}"),
        env.images.clone().pull_image(req),
    )
    .await?
    .image_ref)
}

pub(super) fn pull_and_list(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        // The lab's spare image is pulled for real; a custom runtime's may be present.
        let image = if env.custom() {
            env.template.image.clone()
        } else {
            SPARE_IMAGE.to_string()
        };
        let image_ref = pull(env, &image).await?;
        if image_ref.is_empty() {
            return Err(violation("PullImage answered an empty image_ref"));
        }
        let by_tag = image_status(env, &image)
            .await?
            .ok_or_else(|| violation(format!("ImageStatus {image}: no image after the pull")))?;
        if !by_tag.repo_tags.iter().any(|t| t == &image) {
            return Err(violation(format!(
                "ImageStatus {image}: repo_tags {:?} lack the pulled tag",
                by_tag.repo_tags
            )));
        }
        if by_tag.size == 0 {
            return Err(violation(format!("ImageStatus {image}: size 0")));
        }
        let by_ref = image_status(env, &image_ref).await?.ok_or_else(|| {
            violation(format!(
                "ImageStatus of the returned reference {image_ref}: no image"
            ))
        })?;
        if by_ref.id != by_tag.id {
            return Err(violation(format!(
                "ImageStatus by reference gives ID {}, by tag {}",
                by_ref.id, by_tag.id
            )));
        }
        let listed = call(
            "ListImages",
            env.images
                .clone()
                .list_images(cri::ListImagesRequest { filter: None }),
        )
        .await?;
        if !listed.images.iter().any(|i| i.id == by_tag.id) {
            return Err(violation(format!(
                "ListImages lacks {} ({} images listed)",
                by_tag.id,
                listed.images.len()
            )));
        }
        Ok(Outcome::passed())
    })
}

pub(super) fn absent_image_status(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        match image_status(env, ABSENT_IMAGE).await? {
            None => Ok(Outcome::passed()),
            Some(i) => Err(violation(format!(
                "ImageStatus {ABSENT_IMAGE} answered an image: {i:?}"
            ))),
        }
    })
}

pub(super) fn pull_missing_fails(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        if env.custom() {
            return Ok(Outcome::Skipped(
                "needs the lab's registry (the image it lacks is known)".into(),
            ));
        }
        let req = cri::PullImageRequest {
            image: Some(image_spec(ABSENT_IMAGE)),
            ..Default::default()
        };
        let (code, message) = code_of("PullImage", env.images.clone().pull_image(req)).await?;
        if code == Code::Ok {
            return Err(violation(format!("PullImage {ABSENT_IMAGE} succeeded")));
        }
        if image_status(env, ABSENT_IMAGE).await?.is_some() {
            return Err(violation("the failed pull left an image behind"));
        }
        Ok(Outcome::passed_with(format!("{code:?}: {message}")))
    })
}

pub(super) fn remove_is_idempotent(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        if env.custom() {
            return Ok(Outcome::Skipped(
                "removes images: only on the lab's own registry".into(),
            ));
        }
        let image_ref = pull(env, SPARE_IMAGE).await?;
        for round in ["RemoveImage", "RemoveImage again"] {
            let req = cri::RemoveImageRequest {
                image: Some(image_spec(&image_ref)),
            };
            call(round, env.images.clone().remove_image(req)).await?;
        }
        for name in [SPARE_IMAGE, image_ref.as_str()] {
            if let Some(i) = image_status(env, name).await? {
                return Err(violation(format!(
                    "ImageStatus {name} after RemoveImage: {:?}",
                    i.repo_tags
                )));
            }
        }
        Ok(Outcome::passed())
    })
}
