//! The checks of suite `cri`, each a test whose name reads as a sentence. A check makes its
//! own uniquely named pods ([`Env::run_pod`] records them) and the runner stops and removes
//! them after it, also when it failed, so checks are independent.

mod containers;
mod errors;
mod images;
mod pods;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use nodekit_proto::cri::v1 as cri;
use tonic::{Code, Status};

use super::Env;
use crate::report::Outcome;

/// How long one RPC may take before the check fails.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a container may take to reach a state.
const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// A container that runs until stopped and exits 0 on SIGTERM (PID 1 ignores signals it
/// has no handler for).
pub const LONG_RUNNING: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"];

/// What stopped a check before it could judge the runtime, or the judgement itself.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// An RPC failed where the contract requires success.
    #[error("{step}: {code:?}: {message}")]
    Rpc {
        /// The step of the check.
        step: String,
        /// The gRPC code.
        code: Code,
        /// The runtime's message.
        message: String,
    },
    /// An RPC did not answer within [`RPC_TIMEOUT`].
    #[error("{step}: no answer within {RPC_TIMEOUT:?}")]
    Timeout {
        /// The step of the check.
        step: String,
    },
    /// The runtime's behaviour contradicts the contract; the message says how.
    #[error("{0}")]
    Violation(String),
}

fn violation(message: impl Into<String>) -> CheckError {
    CheckError::Violation(message.into())
}

/// A check's future.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<Outcome, CheckError>> + 'a>>;

/// A check's entry point.
pub type CheckFn = for<'a> fn(&'a Env) -> CheckFuture<'a>;

/// A check with its sentence-like name.
pub type Check = crate::suite::Check<CheckFn>;

/// The checks, in run order (the leftover check last).
pub const CHECKS: &[Check] = &[
    Check {
        name: "Version names the runtime and CRI API v1",
        run: images::version,
    },
    Check {
        name: "Status reports RuntimeReady and NetworkReady",
        run: images::status,
    },
    Check {
        name: "PullImage returns a reference that ImageStatus and ListImages show",
        run: images::pull_and_list,
    },
    Check {
        name: "ImageStatus of an absent image answers no image, not an error",
        run: images::absent_image_status,
    },
    Check {
        name: "PullImage of an image the registry lacks fails",
        run: images::pull_missing_fails,
    },
    Check {
        name: "RemoveImage removes the image and is idempotent",
        run: images::remove_is_idempotent,
    },
    Check {
        name: "a pod sandbox is READY with an IP from the network plugin",
        run: pods::sandbox_ready_with_ip,
    },
    Check {
        name: "a pod reaches another pod's IP (httpd in one, wget by ExecSync in the other)",
        run: pods::pod_reaches_pod,
    },
    Check {
        name: "a container goes CREATED, RUNNING, then EXITED when stopped",
        run: containers::lifecycle,
    },
    Check {
        name: "exit codes are reported: 0 with reason Completed, non-zero with reason Error",
        run: containers::exit_codes,
    },
    Check {
        name: "stdout and stderr are logged in CRI format at the log path",
        run: containers::logs,
    },
    Check {
        name: "ExecSync returns the command's stdout, stderr and exit code",
        run: containers::exec_sync,
    },
    Check {
        name:
            "ExecSync past its timeout fails with DEADLINE_EXCEEDED in time and stops the command",
        run: containers::exec_sync_timeout,
    },
    Check {
        name: "Exec answers with a streaming URL",
        run: containers::exec_url,
    },
    Check {
        name: "ContainerStats and ListContainerStats report CPU and memory",
        run: containers::stats,
    },
    Check {
        name: "ListContainers filters by pod, label and state",
        run: containers::list_filters,
    },
    Check {
        name: "containers of a pod share its /dev/shm; another pod's is its own",
        run: pods::shared_dev_shm,
    },
    Check {
        name: "a RuntimeDefault seccomp profile filters the container; Unconfined does not",
        run: containers::seccomp_profiles,
    },
    Check {
        name: "StopContainer and RemoveContainer are idempotent",
        run: containers::stop_remove_idempotent,
    },
    Check {
        name: "StopPodSandbox and RemovePodSandbox are idempotent and take the pod's containers",
        run: pods::stop_remove_idempotent,
    },
    Check {
        name: "RemovePodSandbox of a removed pod succeeds; StopPodSandbox answers OK or NOT_FOUND",
        run: pods::removed_pod_calls_succeed,
    },
    Check {
        name: "RunPodSandbox without metadata or a name is INVALID_ARGUMENT",
        run: errors::sandbox_invalid_argument,
    },
    Check {
        name: "CreateContainer without metadata or an image is INVALID_ARGUMENT",
        run: errors::container_invalid_argument,
    },
    Check {
        name: "unknown pod and container IDs are NOT_FOUND",
        run: errors::unknown_ids_not_found,
    },
    Check {
        name: "removed pods leave no containers, processes, mounts or namespaces",
        run: pods::nothing_left,
    },
];

/// Runs one RPC with [`RPC_TIMEOUT`].
pub async fn call<T>(
    step: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, CheckError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(CheckError::Rpc {
            step: step.to_string(),
            code: s.code(),
            message: s.message().to_string(),
        }),
        Err(_) => Err(CheckError::Timeout {
            step: step.to_string(),
        }),
    }
}

/// The code an RPC answers with (`Ok` on success) and its message.
async fn code_of<T>(
    step: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<(Code, String), CheckError> {
    match call(step, fut).await {
        Ok(_) => Ok((Code::Ok, String::new())),
        Err(CheckError::Rpc { code, message, .. }) => Ok((code, message)),
        Err(e) => Err(e),
    }
}

/// Fails unless every `(step, (code, message))` answered `want`, listing those that did not.
fn expect_codes(want: Code, answers: &[(&str, (Code, String))]) -> Result<Outcome, CheckError> {
    let wrong: Vec<String> = answers
        .iter()
        .filter(|(_, (code, _))| *code != want)
        .map(|(step, (code, message))| format!("{step}: {code:?} ({message})"))
        .collect();
    if wrong.is_empty() {
        Ok(Outcome::passed())
    } else {
        Err(violation(format!("wanted {want:?}; {}", wrong.join("; "))))
    }
}

impl Env {
    /// Runs pod `name` (recorded for teardown); returns its ID.
    pub async fn run_pod(&self, name: &str) -> Result<String, CheckError> {
        let req = cri::RunPodSandboxRequest {
            config: Some(self.template.sandbox(name)),
            runtime_handler: String::new(),
        };
        let r = call(
            &format!("RunPodSandbox {name}"),
            self.runtime.clone().run_pod_sandbox(req),
        )
        .await?;
        self.track(&r.pod_sandbox_id);
        Ok(r.pod_sandbox_id)
    }

    /// Creates container `name` running `command` in pod `pod` (named `pod_name`).
    pub async fn create_container(
        &self,
        pod: &str,
        pod_name: &str,
        name: &str,
        command: &[&str],
    ) -> Result<String, CheckError> {
        self.create_container_with(pod, pod_name, self.template.container(name, command))
            .await
    }

    /// Creates a container from a config of the check's own in pod `pod` (named `pod_name`).
    pub async fn create_container_with(
        &self,
        pod: &str,
        pod_name: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, CheckError> {
        self.ensure_image().await?;
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(self.template.sandbox(pod_name)),
        };
        let r = call(
            &format!("CreateContainer {}", name.unwrap_or_default()),
            self.runtime.clone().create_container(req),
        )
        .await?;
        Ok(r.container_id)
    }

    /// Starts container `id`.
    pub async fn start_container(&self, id: &str) -> Result<(), CheckError> {
        let req = cri::StartContainerRequest {
            container_id: id.into(),
        };
        call("StartContainer", self.runtime.clone().start_container(req)).await?;
        Ok(())
    }

    /// Creates and starts a container; returns its ID.
    pub async fn run_container(
        &self,
        pod: &str,
        pod_name: &str,
        name: &str,
        command: &[&str],
    ) -> Result<String, CheckError> {
        let id = self.create_container(pod, pod_name, name, command).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// A pod with one long-running container: `(pod ID, container ID)`.
    pub async fn pod_with_container(&self, what: &str) -> Result<(String, String), CheckError> {
        let name = self.unique(what);
        let pod = self.run_pod(&name).await?;
        let c = self
            .run_container(&pod, &name, "main", LONG_RUNNING)
            .await?;
        Ok((pod, c))
    }

    /// The status of container `id`.
    pub async fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, CheckError> {
        let req = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        call(
            "ContainerStatus",
            self.runtime.clone().container_status(req),
        )
        .await?
        .status
        .ok_or_else(|| violation(format!("ContainerStatus {id} answered without a status")))
    }

    /// Polls container `id` until it is in `state`.
    pub async fn wait_container(
        &self,
        id: &str,
        state: cri::ContainerState,
    ) -> Result<cri::ContainerStatus, CheckError> {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let s = self.container_status(id).await?;
            if s.state == state as i32 {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(violation(format!(
                    "container {id} not {state:?} after {STATE_TIMEOUT:?}: state {:?}, reason {:?}, message {:?}",
                    cri::ContainerState::try_from(s.state),
                    s.reason,
                    s.message
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status of pod `id`.
    pub async fn sandbox_status(&self, id: &str) -> Result<cri::PodSandboxStatus, CheckError> {
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        call(
            "PodSandboxStatus",
            self.runtime.clone().pod_sandbox_status(req),
        )
        .await?
        .status
        .ok_or_else(|| violation(format!("PodSandboxStatus {id} answered without a status")))
    }

    /// ExecSync of `cmd` in container `id` with `timeout` seconds.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, CheckError> {
        let req = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        };
        call(
            &format!("ExecSync {}", cmd.join(" ")),
            self.runtime.clone().exec_sync(req),
        )
        .await
    }
}
