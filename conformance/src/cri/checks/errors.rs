//! Error codes of bad requests: missing fields are INVALID_ARGUMENT, unknown IDs NOT_FOUND.

use nodekit_proto::cri::v1 as cri;
use tonic::Code;

use super::{code_of, expect_codes, CheckFuture};
use crate::cri::Env;

/// An ID no runtime has.
const UNKNOWN_ID: &str = "0000000000000000000000000000000000000000000000000000000000000bad";

pub(super) fn sandbox_invalid_argument(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let mut no_metadata = env.template.sandbox(&env.unique("bad"));
        no_metadata.metadata = None;
        let mut no_name = env.template.sandbox(&env.unique("bad"));
        if let Some(m) = no_name.metadata.as_mut() {
            m.name.clear();
        }
        let mut answers = Vec::new();
        for (step, config) in [
            ("no config", None),
            ("no metadata", Some(no_metadata)),
            ("empty name", Some(no_name)),
        ] {
            let req = cri::RunPodSandboxRequest {
                config,
                runtime_handler: String::new(),
            };
            let mut rs = env.runtime.clone();
            let answer = code_of(step, async {
                let r = rs.run_pod_sandbox(req).await;
                // A runtime that accepted it made a pod: tear it down with the check's.
                if let Ok(ok) = &r {
                    env.track(&ok.get_ref().pod_sandbox_id);
                }
                r
            })
            .await?;
            answers.push((step, answer));
        }
        expect_codes(Code::InvalidArgument, &answers)
    })
}

pub(super) fn container_invalid_argument(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("badc");
        let pod = env.run_pod(&name).await?;
        env.ensure_image().await?;
        let mut no_metadata = env.template.container("c", &["true"]);
        no_metadata.metadata = None;
        let mut no_image = env.template.container("c", &["true"]);
        no_image.image = None;
        let mut answers = Vec::new();
        for (step, config) in [
            ("no config", None),
            ("no metadata", Some(no_metadata)),
            ("no image", Some(no_image)),
        ] {
            let req = cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config,
                sandbox_config: Some(env.template.sandbox(&name)),
            };
            answers.push((
                step,
                code_of(step, env.runtime.clone().create_container(req)).await?,
            ));
        }
        expect_codes(Code::InvalidArgument, &answers)
    })
}

pub(super) fn unknown_ids_not_found(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let id = || UNKNOWN_ID.to_string();
        let rs = || env.runtime.clone();
        let answers = [
            (
                "ContainerStatus",
                code_of(
                    "ContainerStatus",
                    rs().container_status(cri::ContainerStatusRequest {
                        container_id: id(),
                        verbose: false,
                    }),
                )
                .await?,
            ),
            (
                "StartContainer",
                code_of(
                    "StartContainer",
                    rs().start_container(cri::StartContainerRequest { container_id: id() }),
                )
                .await?,
            ),
            (
                "ExecSync",
                code_of(
                    "ExecSync",
                    rs().exec_sync(cri::ExecSyncRequest {
                        container_id: id(),
                        cmd: vec!["true".into()],
                        timeout: 5,
                    }),
                )
                .await?,
            ),
            (
                "Attach",
                code_of(
                    "Attach",
                    rs().attach(cri::AttachRequest {
                        container_id: id(),
                        stdout: true,
                        ..Default::default()
                    }),
                )
                .await?,
            ),
            (
                "ContainerStats",
                code_of(
                    "ContainerStats",
                    rs().container_stats(cri::ContainerStatsRequest { container_id: id() }),
                )
                .await?,
            ),
            (
                "PodSandboxStatus",
                code_of(
                    "PodSandboxStatus",
                    rs().pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: id(),
                        verbose: false,
                    }),
                )
                .await?,
            ),
            (
                "CreateContainer in an unknown pod",
                code_of(
                    "CreateContainer",
                    rs().create_container(cri::CreateContainerRequest {
                        pod_sandbox_id: id(),
                        config: Some(env.template.container("c", &["true"])),
                        sandbox_config: Some(env.template.sandbox("unknown")),
                    }),
                )
                .await?,
            ),
        ];
        expect_codes(Code::NotFound, &answers)
    })
}
