//! Pod sandboxes: readiness, networking between pods, teardown.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use nodekit_proto::cri::v1 as cri;
use tonic::Code;

use super::{call, code_of, violation, CheckError, CheckFuture, LONG_RUNNING};
use crate::cri::lab::POD_SUBNET;
use crate::cri::Env;
use crate::report::Outcome;

/// How long a pod's web server may take to answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod's IP from its status.
fn pod_ip(status: &cri::PodSandboxStatus) -> Result<IpAddr, CheckError> {
    let ip = status.network.as_ref().map(|n| n.ip.as_str()).unwrap_or("");
    ip.parse()
        .map_err(|_| violation(format!("PodSandboxStatus network.ip {ip:?} is not an IP")))
}

pub(super) fn sandbox_ready_with_ip(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("ready");
        let id = env.run_pod(&name).await?;
        let s = env.sandbox_status(&id).await?;
        if s.state != cri::PodSandboxState::SandboxReady as i32 {
            return Err(violation(format!("state {:?}, wanted READY", s.state)));
        }
        if s.metadata.as_ref().map(|m| m.name.as_str()) != Some(name.as_str()) {
            return Err(violation(format!("metadata {:?}", s.metadata)));
        }
        if s.created_at <= 0 {
            return Err(violation("created_at is not set"));
        }
        let ip = pod_ip(&s)?;
        if !env.custom() {
            let subnet: ipnetwork::IpNetwork = POD_SUBNET
                .parse()
                .map_err(|e| violation(format!("{POD_SUBNET}: {e}")))?;
            if !subnet.contains(ip) {
                return Err(violation(format!("IP {ip} is outside {POD_SUBNET}")));
            }
        }
        let listed = call(
            "ListPodSandbox",
            env.runtime
                .clone()
                .list_pod_sandbox(cri::ListPodSandboxRequest {
                    filter: Some(cri::PodSandboxFilter {
                        label_selector: [("app".to_string(), name.clone())].into(),
                        ..Default::default()
                    }),
                }),
        )
        .await?;
        let ids: Vec<&str> = listed.items.iter().map(|p| p.id.as_str()).collect();
        if ids != [id.as_str()] {
            return Err(violation(format!(
                "ListPodSandbox by label app={name}: {ids:?}, wanted [{id}]"
            )));
        }
        Ok(Outcome::passed_with(format!("pod IP {ip}")))
    })
}

pub(super) fn pod_reaches_pod(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let web_name = env.unique("web");
        let web = env.run_pod(&web_name).await?;
        env.run_container(
            &web,
            &web_name,
            "httpd",
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo hello from nk > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www",
            ],
        )
        .await?;
        let ip = pod_ip(&env.sandbox_status(&web).await?)?;
        let (_, client) = env.pod_with_container("client").await?;
        let url = match ip {
            IpAddr::V4(v4) => format!("http://{v4}/index.html"),
            IpAddr::V6(v6) => format!("http://[{v6}]/index.html"),
        };
        let deadline = Instant::now() + HTTP_TIMEOUT;
        loop {
            // No `wget -T`: busybox 1.35's crashes. ExecSync's timeout bounds a hung connect.
            let last = match env
                .exec_sync(&client, &["wget", "-q", "-O", "-", &url], 5)
                .await
            {
                Ok(r)
                    if r.exit_code == 0
                        && String::from_utf8_lossy(&r.stdout).contains("hello from nk") =>
                {
                    return Ok(Outcome::passed_with(format!("fetched {url}")));
                }
                Ok(r) => format!(
                    "exit {}, stdout {:?}, stderr {:?}",
                    r.exit_code,
                    String::from_utf8_lossy(&r.stdout),
                    String::from_utf8_lossy(&r.stderr)
                ),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(violation(format!("wget {url} from the other pod: {last}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

async fn stop_pod(env: &Env, step: &str, id: &str) -> Result<(Code, String), CheckError> {
    let req = cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    };
    code_of(step, env.runtime.clone().stop_pod_sandbox(req)).await
}

async fn remove_pod(env: &Env, step: &str, id: &str) -> Result<(Code, String), CheckError> {
    let req = cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    };
    code_of(step, env.runtime.clone().remove_pod_sandbox(req)).await
}

/// Fails with the step's code unless it answered OK.
fn ok(step: &str, answer: (Code, String)) -> Result<(), CheckError> {
    match answer {
        (Code::Ok, _) => Ok(()),
        (code, message) => Err(CheckError::Rpc {
            step: step.into(),
            code,
            message,
        }),
    }
}

pub(super) fn stop_remove_idempotent(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let (pod, c) = env.pod_with_container("stopme").await?;
        for step in ["StopPodSandbox", "StopPodSandbox again"] {
            ok(step, stop_pod(env, step, &pod).await?)?;
        }
        let s = env.sandbox_status(&pod).await?;
        if s.state != cri::PodSandboxState::SandboxNotready as i32 {
            return Err(violation(format!(
                "after StopPodSandbox the state is {:?}, wanted NOTREADY",
                s.state
            )));
        }
        let cs = env.container_status(&c).await?;
        if cs.state != cri::ContainerState::ContainerExited as i32 {
            return Err(violation(format!(
                "after StopPodSandbox the container is {:?}, wanted EXITED",
                cs.state
            )));
        }
        for step in ["RemovePodSandbox", "RemovePodSandbox again"] {
            ok(step, remove_pod(env, step, &pod).await?)?;
        }
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        };
        let (code, _) = code_of(
            "PodSandboxStatus",
            env.runtime.clone().pod_sandbox_status(req),
        )
        .await?;
        if code != Code::NotFound {
            return Err(violation(format!(
                "PodSandboxStatus of the removed pod: {code:?}, wanted NotFound"
            )));
        }
        let left = call(
            "ListContainers",
            env.runtime
                .clone()
                .list_containers(cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter {
                        pod_sandbox_id: pod.clone(),
                        ..Default::default()
                    }),
                }),
        )
        .await?;
        if !left.containers.is_empty() {
            return Err(violation(format!(
                "ListContainers still shows {} container(s) of the removed pod",
                left.containers.len()
            )));
        }
        Ok(Outcome::passed())
    })
}

pub(super) fn removed_pod_calls_succeed(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("gone");
        let pod = env.run_pod(&name).await?;
        ok(
            "StopPodSandbox",
            stop_pod(env, "StopPodSandbox", &pod).await?,
        )?;
        ok(
            "RemovePodSandbox",
            remove_pod(env, "RemovePodSandbox", &pod).await?,
        )?;
        // The kubelet repeats both for pods whose runtime state is already reclaimed.
        let step = "RemovePodSandbox of the removed pod";
        ok(step, remove_pod(env, step, &pod).await?)?;
        let step = "StopPodSandbox of the removed pod";
        match stop_pod(env, step, &pod).await? {
            (Code::Ok, _) => Ok(Outcome::passed_with("StopPodSandbox answered OK")),
            // The spec asks for no error; the kubelet takes NOT_FOUND as done too.
            (Code::NotFound, _) => Ok(Outcome::passed_with(
                "StopPodSandbox answered NOT_FOUND (the kubelet takes it as done)",
            )),
            (code, message) => Err(CheckError::Rpc {
                step: step.into(),
                code,
                message,
            }),
        }
    })
}

pub(super) fn nothing_left(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let Some(lab) = env.lab.as_ref() else {
            return Ok(Outcome::Skipped(
                "needs the lab (it inspects the node's processes and mounts)".into(),
            ));
        };
        // Every earlier check's pods are gone by now; this one makes and removes one more.
        let (pod, _) = env.pod_with_container("last").await?;
        ok(
            "StopPodSandbox",
            stop_pod(env, "StopPodSandbox", &pod).await?,
        )?;
        ok(
            "RemovePodSandbox",
            remove_pod(env, "RemovePodSandbox", &pod).await?,
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left = Vec::new();
            let containers = lab.leftover_runtime_containers();
            if !containers.is_empty() {
                left.push(format!("runc containers {containers:?}"));
            }
            let pids = lab.cgroup_pids();
            if !pids.is_empty() {
                left.push(format!("processes in the pods' cgroups {pids:?}"));
            }
            let helpers: Vec<String> = lab
                .helper_processes()
                .iter()
                .map(|p| format!("{} ({})", p.program(), p.pid))
                .collect();
            if !helpers.is_empty() {
                left.push(format!("helpers {helpers:?}"));
            }
            let netns = lab.leftover_netns();
            if !netns.is_empty() {
                left.push(format!("network namespaces {netns:?}"));
            }
            let mounts = lab.leftover_mounts();
            if !mounts.is_empty() {
                left.push(format!("mounts {mounts:?}"));
            }
            if left.is_empty() {
                return Ok(Outcome::passed());
            }
            if Instant::now() > deadline {
                return Err(violation(format!("left behind: {}", left.join("; "))));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

pub(super) fn shared_dev_shm(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("shm");
        let pod = env.run_pod(&name).await?;
        let writer = env
            .run_container(&pod, &name, "writer", LONG_RUNNING)
            .await?;
        let reader = env
            .run_container(&pod, &name, "reader", LONG_RUNNING)
            .await?;
        let wrote = env
            .exec_sync(&writer, &["sh", "-c", "echo shared > /dev/shm/nk-seg"], 10)
            .await?;
        if wrote.exit_code != 0 {
            return Err(violation(format!(
                "writing /dev/shm/nk-seg: exit {}: {}",
                wrote.exit_code,
                String::from_utf8_lossy(&wrote.stderr)
            )));
        }
        let read = env
            .exec_sync(&reader, &["cat", "/dev/shm/nk-seg"], 10)
            .await?;
        if read.stdout != b"shared\n" {
            return Err(violation(format!(
                "the pod's other container read {:?} (exit {}) from /dev/shm/nk-seg; wanted \"shared\\n\"",
                String::from_utf8_lossy(&read.stdout),
                read.exit_code
            )));
        }
        let (_, stranger) = env.pod_with_container("shm-other").await?;
        let miss = env
            .exec_sync(&stranger, &["cat", "/dev/shm/nk-seg"], 10)
            .await?;
        if miss.exit_code == 0 {
            return Err(violation("another pod sees this pod's /dev/shm/nk-seg"));
        }
        Ok(Outcome::passed())
    })
}
