//! The gRPC face: RuntimeService and ImageService of CRI v1 (runtime.v1, as pinned in the
//! proto crate) over the [`Manager`]. Every RPC of the pinned version exists; those this
//! runtime does not support answer UNIMPLEMENTED with a message.

pub mod convert;
mod image;

use std::sync::Arc;

use nodekit_proto::cri::v1 as cri;
use nodekit_proto::cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cgroups::CgroupDriver;
use crate::error::CriError;
use crate::manager::container::state_of;
use crate::manager::Manager;
use crate::streaming::{StreamRequest, StreamingServer};
use convert::labels_match;

pub use image::ImageSvc;

/// The CRI API version this runtime speaks.
pub const RUNTIME_API_VERSION: &str = "v1";

/// RuntimeService: the manager, and the streaming server that serves Exec, Attach and
/// PortForward.
#[derive(Debug, Clone)]
pub struct RuntimeSvc(pub Arc<Manager>, pub Arc<StreamingServer>);

type Reply<T> = Result<Response<T>, Status>;

/// Runs one RPC body in a span named after it, logging failures.
async fn rpc<T, F>(name: &'static str, body: F) -> Reply<T>
where
    F: std::future::Future<Output = Result<T, CriError>>,
{
    let span = tracing::info_span!("rpc", method = name);
    async move {
        match body.await {
            Ok(v) => Ok(Response::new(v)),
            Err(err) => {
                tracing::warn!(%err, "failed");
                Err(err.into())
            }
        }
    }
    .instrument(span)
    .await
}

fn unimplemented<T>(what: &'static str) -> Reply<T> {
    Err(CriError::Unimplemented(what).into())
}

/// The CRI rules for the streams of Exec (and Attach).
fn check_stdio(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), CriError> {
    if tty && stderr {
        return Err(CriError::invalid(
            "stderr",
            "tty and stderr cannot both be true (a terminal has one output)",
        ));
    }
    if !(stdin || stdout || stderr) {
        return Err(CriError::invalid(
            "stdin",
            "one of stdin, stdout, or stderr must be set",
        ));
    }
    Ok(())
}

fn id_matches(filter: &str, id: &str) -> bool {
    filter.is_empty() || id.starts_with(filter)
}

#[tonic::async_trait]
impl RuntimeService for RuntimeSvc {
    async fn version(&self, _r: Request<cri::VersionRequest>) -> Reply<cri::VersionResponse> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "nodekit-cri".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        r: Request<cri::RunPodSandboxRequest>,
    ) -> Reply<cri::RunPodSandboxResponse> {
        let r = r.into_inner();
        rpc("RunPodSandbox", async {
            let id = self.0.run_pod_sandbox(r.config, &r.runtime_handler).await?;
            Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
        })
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<cri::StopPodSandboxRequest>,
    ) -> Reply<cri::StopPodSandboxResponse> {
        let id = r.into_inner().pod_sandbox_id;
        rpc("StopPodSandbox", async {
            self.0.stop_pod_sandbox(&id).await?;
            Ok(cri::StopPodSandboxResponse {})
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<cri::RemovePodSandboxRequest>,
    ) -> Reply<cri::RemovePodSandboxResponse> {
        let id = r.into_inner().pod_sandbox_id;
        rpc("RemovePodSandbox", async {
            self.0.remove_pod_sandbox(&id).await?;
            Ok(cri::RemovePodSandboxResponse {})
        })
        .await
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<cri::PodSandboxStatusRequest>,
    ) -> Reply<cri::PodSandboxStatusResponse> {
        let r = r.into_inner();
        rpc("PodSandboxStatus", async {
            let rec = self.0.sandbox(&r.pod_sandbox_id)?;
            let ready = self.0.sandbox_ready(&rec);
            let containers = self
                .0
                .containers()
                .iter()
                .filter(|c| c.sandbox_id == rec.id)
                .map(|c| convert::container_status(c, self.0.images()))
                .collect();
            Ok(cri::PodSandboxStatusResponse {
                status: Some(convert::pod_sandbox_status(&rec, ready)),
                info: convert::info(r.verbose, &rec),
                containers_statuses: containers,
                timestamp: crate::manager::now_ns(),
            })
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<cri::ListPodSandboxRequest>,
    ) -> Reply<cri::ListPodSandboxResponse> {
        let filter = r.into_inner().filter.unwrap_or_default();
        let items = self
            .0
            .sandboxes()
            .iter()
            .filter(|s| s.phase != crate::manager::records::SandboxPhase::Creating)
            .map(|s| convert::pod_sandbox(s, self.0.sandbox_ready(s)))
            .filter(|s| id_matches(&filter.id, &s.id))
            .filter(|s| filter.state.as_ref().is_none_or(|f| f.state == s.state))
            .filter(|s| labels_match(&filter.label_selector, &s.labels))
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        r: Request<cri::CreateContainerRequest>,
    ) -> Reply<cri::CreateContainerResponse> {
        let r = r.into_inner();
        rpc("CreateContainer", async {
            let id = self
                .0
                .create_container(&r.pod_sandbox_id, r.config, r.sandbox_config)
                .await?;
            Ok(cri::CreateContainerResponse { container_id: id })
        })
        .await
    }

    async fn start_container(
        &self,
        r: Request<cri::StartContainerRequest>,
    ) -> Reply<cri::StartContainerResponse> {
        let id = r.into_inner().container_id;
        rpc("StartContainer", async {
            self.0.start_container(&id).await?;
            Ok(cri::StartContainerResponse {})
        })
        .await
    }

    async fn stop_container(
        &self,
        r: Request<cri::StopContainerRequest>,
    ) -> Reply<cri::StopContainerResponse> {
        let r = r.into_inner();
        rpc("StopContainer", async {
            self.0.stop_container(&r.container_id, r.timeout).await?;
            Ok(cri::StopContainerResponse {})
        })
        .await
    }

    async fn remove_container(
        &self,
        r: Request<cri::RemoveContainerRequest>,
    ) -> Reply<cri::RemoveContainerResponse> {
        let id = r.into_inner().container_id;
        rpc("RemoveContainer", async {
            self.0.remove_container(&id).await?;
            Ok(cri::RemoveContainerResponse {})
        })
        .await
    }

    async fn list_containers(
        &self,
        r: Request<cri::ListContainersRequest>,
    ) -> Reply<cri::ListContainersResponse> {
        let filter = r.into_inner().filter.unwrap_or_default();
        let containers = self
            .0
            .containers()
            .iter()
            .filter(|c| c.phase != crate::manager::records::ContainerPhase::Creating)
            .filter(|c| id_matches(&filter.id, &c.id))
            .filter(|c| id_matches(&filter.pod_sandbox_id, &c.sandbox_id))
            .filter(|c| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|f| f.state == state_of(c) as i32)
            })
            .filter(|c| labels_match(&filter.label_selector, &c.config.0.labels))
            .map(convert::container)
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        r: Request<cri::ContainerStatusRequest>,
    ) -> Reply<cri::ContainerStatusResponse> {
        let r = r.into_inner();
        rpc("ContainerStatus", async {
            let rec = self.0.container(&r.container_id)?;
            Ok(cri::ContainerStatusResponse {
                status: Some(convert::container_status(&rec, self.0.images())),
                info: convert::info(r.verbose, &rec),
            })
        })
        .await
    }

    async fn update_container_resources(
        &self,
        r: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Reply<cri::UpdateContainerResourcesResponse> {
        let r = r.into_inner();
        rpc("UpdateContainerResources", async {
            self.0
                .update_container_resources(&r.container_id, r.linux)
                .await?;
            Ok(cri::UpdateContainerResourcesResponse {})
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        r: Request<cri::ReopenContainerLogRequest>,
    ) -> Reply<cri::ReopenContainerLogResponse> {
        let id = r.into_inner().container_id;
        rpc("ReopenContainerLog", async {
            self.0.reopen_container_log(&id).await?;
            Ok(cri::ReopenContainerLogResponse {})
        })
        .await
    }

    async fn exec_sync(&self, r: Request<cri::ExecSyncRequest>) -> Reply<cri::ExecSyncResponse> {
        let r = r.into_inner();
        rpc("ExecSync", async {
            let out = self.0.exec_sync(&r.container_id, &r.cmd, r.timeout).await?;
            Ok(cri::ExecSyncResponse {
                stdout: out.stdout,
                stderr: out.stderr,
                exit_code: out.exit_code,
            })
        })
        .await
    }

    async fn exec(&self, r: Request<cri::ExecRequest>) -> Reply<cri::ExecResponse> {
        let r = r.into_inner();
        rpc("Exec", async {
            if r.cmd.is_empty() {
                return Err(CriError::invalid("cmd", "must not be empty"));
            }
            check_stdio(r.stdin, r.stdout, r.stderr, r.tty)?;
            self.0
                .running_container(&r.container_id, "exec needs a running container")?;
            let url = self.1.url(StreamRequest::Exec(r))?;
            Ok(cri::ExecResponse { url })
        })
        .await
    }

    async fn attach(&self, r: Request<cri::AttachRequest>) -> Reply<cri::AttachResponse> {
        let r = r.into_inner();
        rpc("Attach", async {
            CriError::non_empty(&r.container_id, "container_id")?;
            check_stdio(r.stdin, r.stdout, r.stderr, r.tty)?;
            let rec = self
                .0
                .running_container(&r.container_id, "attach needs a running container")?;
            if r.stdin && !rec.config.0.stdin {
                return Err(CriError::StdinNotEnabled { id: rec.id });
            }
            let url = self.1.url(StreamRequest::Attach(r))?;
            Ok(cri::AttachResponse { url })
        })
        .await
    }

    async fn port_forward(
        &self,
        r: Request<cri::PortForwardRequest>,
    ) -> Reply<cri::PortForwardResponse> {
        let r = r.into_inner();
        rpc("PortForward", async {
            CriError::non_empty(&r.pod_sandbox_id, "pod_sandbox_id")?;
            if let Err(reason) = crate::streaming::portforward::request_ports(&r.port) {
                return Err(CriError::invalid("port", reason));
            }
            self.0.ready_sandbox_netns(&r.pod_sandbox_id)?;
            let url = self.1.url(StreamRequest::PortForward(r))?;
            Ok(cri::PortForwardResponse { url })
        })
        .await
    }

    async fn container_stats(
        &self,
        r: Request<cri::ContainerStatsRequest>,
    ) -> Reply<cri::ContainerStatsResponse> {
        let id = r.into_inner().container_id;
        rpc("ContainerStats", async {
            Ok(cri::ContainerStatsResponse {
                stats: Some(self.0.container_stats(&id)?),
            })
        })
        .await
    }

    async fn list_container_stats(
        &self,
        r: Request<cri::ListContainerStatsRequest>,
    ) -> Reply<cri::ListContainerStatsResponse> {
        let filter = r.into_inner().filter.unwrap_or_default();
        let stats = self
            .0
            .containers()
            .iter()
            .filter(|c| state_of(c) == cri::ContainerState::ContainerRunning)
            .filter(|c| id_matches(&filter.id, &c.id))
            .filter(|c| id_matches(&filter.pod_sandbox_id, &c.sandbox_id))
            .filter(|c| labels_match(&filter.label_selector, &c.config.0.labels))
            .map(|c| self.0.stats_of(c))
            .collect();
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        r: Request<cri::PodSandboxStatsRequest>,
    ) -> Reply<cri::PodSandboxStatsResponse> {
        let id = r.into_inner().pod_sandbox_id;
        rpc("PodSandboxStats", async {
            Ok(cri::PodSandboxStatsResponse {
                stats: Some(self.0.pod_sandbox_stats(&id)?),
            })
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        r: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Reply<cri::ListPodSandboxStatsResponse> {
        let filter = r.into_inner().filter.unwrap_or_default();
        let containers = self.0.containers();
        let stats = self
            .0
            .sandboxes()
            .iter()
            .filter(|s| self.0.sandbox_ready(s))
            .filter(|s| id_matches(&filter.id, &s.id))
            .filter(|s| labels_match(&filter.label_selector, &s.config.0.labels))
            .map(|s| self.0.sandbox_stats_of(s, &containers))
            .collect();
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        r: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Reply<cri::UpdateRuntimeConfigResponse> {
        let cidr = r
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "UpdateRuntimeConfig (the CNI config owns addressing)");
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(&self, r: Request<cri::StatusRequest>) -> Reply<cri::StatusResponse> {
        let verbose = r.into_inner().verbose;
        let runtime_ok = crate::runtime::resolve_binary(
            self.0.options().runtime_path.as_deref(),
            self.0.options().runtime.name(),
        )
        .is_some();
        let network = self.0.network_config();
        let condition =
            |kind: &str, ok: bool, reason: &str, message: String| cri::RuntimeCondition {
                r#type: kind.into(),
                status: ok,
                reason: if ok { String::new() } else { reason.into() },
                message: if ok { String::new() } else { message },
            };
        let conditions = vec![
            condition(
                "RuntimeReady",
                runtime_ok,
                "RuntimeNotReady",
                "OCI runtime binary not found".into(),
            ),
            condition(
                "NetworkReady",
                network.is_ok(),
                "NetworkPluginNotReady",
                network
                    .as_ref()
                    .err()
                    .map(|_| "cni config uninitialized".to_string())
                    .unwrap_or_default(),
            ),
        ];
        let mut info = std::collections::HashMap::new();
        if verbose {
            if let Ok(net) = &network {
                info.insert("cniconfig".into(), net.to_value().to_string());
            }
        }
        let handler = |name: &str| cri::RuntimeHandler {
            name: name.into(),
            features: Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: false,
                user_namespaces: false,
            }),
        };
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: vec![handler(""), handler(self.0.options().runtime.name())],
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _r: Request<cri::CheckpointContainerRequest>,
    ) -> Reply<cri::CheckpointContainerResponse> {
        unimplemented("CheckpointContainer")
    }

    type GetContainerEventsStream =
        futures::stream::Empty<Result<cri::ContainerEventResponse, Status>>;

    async fn get_container_events(
        &self,
        _r: Request<cri::GetEventsRequest>,
    ) -> Reply<Self::GetContainerEventsStream> {
        unimplemented("GetContainerEvents (evented PLEG)")
    }

    async fn list_metric_descriptors(
        &self,
        _r: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Reply<cri::ListMetricDescriptorsResponse> {
        unimplemented("ListMetricDescriptors")
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _r: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Reply<cri::ListPodSandboxMetricsResponse> {
        unimplemented("ListPodSandboxMetrics")
    }

    async fn runtime_config(
        &self,
        _r: Request<cri::RuntimeConfigRequest>,
    ) -> Reply<cri::RuntimeConfigResponse> {
        let driver = match self.0.options().cgroup_driver {
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
        };
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }
}
