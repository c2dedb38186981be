//! Containers: lifecycle, exit status, logs, exec, stats, listing, stop/remove.

use std::path::Path;
use std::time::{Duration, Instant};

use nodekit_proto::cri::v1 as cri;
use nodekit_proto::cri::v1::ContainerState;
use tonic::Code;

use super::{call, code_of, violation, CheckError, CheckFuture, LONG_RUNNING};
use crate::cri::Env;
use crate::report::Outcome;

/// The ExecSync timeout of the timeout check, seconds.
const EXEC_TIMEOUT_S: i64 = 1;
/// How long after that timeout the answer may come.
const EXEC_TIMEOUT_SLACK: Duration = Duration::from_secs(5);
/// How long a log line may take to reach the file.
const LOG_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn lifecycle(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("life");
        let pod = env.run_pod(&name).await?;
        let c = env
            .create_container(&pod, &name, "main", LONG_RUNNING)
            .await?;
        let created = env.container_status(&c).await?;
        if created.state != ContainerState::ContainerCreated as i32 || created.created_at <= 0 {
            return Err(violation(format!(
                "after CreateContainer: state {:?}, created_at {}; wanted CREATED with a time",
                created.state, created.created_at
            )));
        }
        env.start_container(&c).await?;
        let running = env.container_status(&c).await?;
        if running.state != ContainerState::ContainerRunning as i32 || running.started_at <= 0 {
            return Err(violation(format!(
                "after StartContainer: state {:?}, started_at {}; wanted RUNNING with a time",
                running.state, running.started_at
            )));
        }
        if running.image_ref.is_empty() {
            return Err(violation("ContainerStatus has no image_ref"));
        }
        let req = cri::StopContainerRequest {
            container_id: c.clone(),
            timeout: 10,
        };
        let started = Instant::now();
        call("StopContainer", env.runtime.clone().stop_container(req)).await?;
        let exited = env
            .wait_container(&c, ContainerState::ContainerExited)
            .await?;
        if exited.finished_at < exited.started_at || exited.exit_code != 0 {
            return Err(violation(format!(
                "after StopContainer: finished_at {} (started {}), exit code {} (SIGTERM handler exits 0)",
                exited.finished_at, exited.started_at, exited.exit_code
            )));
        }
        Ok(Outcome::passed_with(format!(
            "stopped in {} ms",
            started.elapsed().as_millis()
        )))
    })
}

pub(super) fn exit_codes(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("jobs");
        let pod = env.run_pod(&name).await?;
        let ok = env.run_container(&pod, &name, "ok", &["true"]).await?;
        let bad = env
            .run_container(&pod, &name, "bad", &["sh", "-c", "exit 3"])
            .await?;
        let mut wrong = Vec::new();
        for (id, code, reason) in [(ok, 0, "Completed"), (bad, 3, "Error")] {
            let s = env
                .wait_container(&id, ContainerState::ContainerExited)
                .await?;
            if s.exit_code != code || s.reason != reason || s.finished_at <= 0 {
                wrong.push(format!(
                    "exit {code} reported as code {}, reason {:?}, finished_at {}",
                    s.exit_code, s.reason, s.finished_at
                ));
            }
        }
        if wrong.is_empty() {
            Ok(Outcome::passed())
        } else {
            Err(violation(wrong.join("; ")))
        }
    })
}

/// Whether `line` is `<RFC 3339 time> <stream> <F|P> <text>`; returns (stream, tag, text).
fn parse_cri_line(line: &str) -> Option<(&str, &str, &str)> {
    let mut parts = line.splitn(4, ' ');
    let (time, stream, tag) = (parts.next()?, parts.next()?, parts.next()?);
    let text = parts.next().unwrap_or("");
    let date = time.get(..10).unwrap_or("");
    let zone = time.get(19..).unwrap_or("");
    let time_ok = time.as_bytes().get(10) == Some(&b'T')
        && (zone.ends_with('Z') || zone.contains(['+', '-']))
        && date.bytes().filter(|b| *b == b'-').count() == 2;
    let stream_ok = matches!(stream, "stdout" | "stderr");
    (time_ok && stream_ok && matches!(tag, "F" | "P")).then_some((stream, tag, text))
}

pub(super) fn logs(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("logs");
        let pod = env.run_pod(&name).await?;
        let c = env
            .run_container(
                &pod,
                &name,
                "talker",
                &["sh", "-c", "echo out; echo err >&2"],
            )
            .await?;
        let status = env
            .wait_container(&c, ContainerState::ContainerExited)
            .await?;
        let template = env.template.container("talker", &[]);
        let path = env.template.log_root.join(&name).join(&template.log_path);
        let deadline = Instant::now() + LOG_TIMEOUT;
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= 2 || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut seen = Vec::new();
        for line in text.lines() {
            let (stream, tag, body) = parse_cri_line(line).ok_or_else(|| {
                violation(format!("{}: not a CRI log line: {line:?}", path.display()))
            })?;
            seen.push((stream.to_string(), tag.to_string(), body.to_string()));
        }
        for want in [("stdout", "out"), ("stderr", "err")] {
            if !seen
                .iter()
                .any(|(s, t, b)| s == want.0 && t == "F" && b == want.1)
            {
                return Err(violation(format!(
                    "{}: no full {} line {:?} in {text:?}",
                    path.display(),
                    want.0,
                    want.1
                )));
            }
        }
        let reported = Path::new(&status.log_path);
        let note = if reported == path {
            "ContainerStatus.log_path is the full path"
        } else if reported == Path::new(&template.log_path) {
            "ContainerStatus.log_path is the path relative to the pod's log directory"
        } else {
            return Err(violation(format!(
                "ContainerStatus.log_path {:?} is neither {} nor {}",
                status.log_path,
                path.display(),
                template.log_path
            )));
        };
        Ok(Outcome::passed_with(note))
    })
}

pub(super) fn exec_sync(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let (_, c) = env.pod_with_container("exec").await?;
        let r = env
            .exec_sync(&c, &["sh", "-c", "echo hi; echo oops >&2; exit 7"], 10)
            .await?;
        let (out, err) = (
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr),
        );
        if out != "hi\n" || err != "oops\n" || r.exit_code != 7 {
            return Err(violation(format!(
                "stdout {out:?}, stderr {err:?}, exit code {}; wanted \"hi\\n\", \"oops\\n\", 7",
                r.exit_code
            )));
        }
        Ok(Outcome::passed())
    })
}

pub(super) fn exec_sync_timeout(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let (_, c) = env.pod_with_container("slow").await?;
        let started = Instant::now();
        let req = cri::ExecSyncRequest {
            container_id: c.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: EXEC_TIMEOUT_S,
        };
        let (code, message) = code_of("ExecSync", env.runtime.clone().exec_sync(req)).await?;
        let took = started.elapsed();
        if code != Code::DeadlineExceeded {
            return Err(violation(format!(
                "ExecSync sleep 30 with timeout {EXEC_TIMEOUT_S}s: {code:?} ({message}) after {} ms; wanted DeadlineExceeded",
                took.as_millis()
            )));
        }
        if took > Duration::from_secs(EXEC_TIMEOUT_S as u64) + EXEC_TIMEOUT_SLACK {
            return Err(violation(format!(
                "DeadlineExceeded came after {} ms",
                took.as_millis()
            )));
        }
        Ok(Outcome::passed_with(format!(
            "after {} ms",
            took.as_millis()
        )))
    })
}

pub(super) fn exec_url(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let (_, c) = env.pod_with_container("stream").await?;
        let req = cri::ExecRequest {
            container_id: c,
            cmd: vec!["echo".into(), "hi".into()],
            stdout: true,
            ..Default::default()
        };
        let r = call("Exec", env.runtime.clone().exec(req)).await?;
        if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
            return Err(violation(format!("Exec answered URL {:?}", r.url)));
        }
        Ok(Outcome::passed_with(r.url))
    })
}

/// What is missing from one container's stats.
fn stats_gaps(s: &cri::ContainerStats, id: &str) -> Vec<String> {
    let mut gaps = Vec::new();
    if s.attributes.as_ref().map(|a| a.id.as_str()) != Some(id) {
        gaps.push(format!("attributes.id is not {id}"));
    }
    let cpu = s
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref());
    if cpu.is_none_or(|v| v.value == 0) {
        gaps.push("no cpu.usage_core_nano_seconds".into());
    }
    let mem = s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref());
    if mem.is_none_or(|v| v.value == 0) {
        gaps.push("no memory.working_set_bytes".into());
    }
    gaps
}

pub(super) fn stats(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let (pod, c) = env.pod_with_container("stats").await?;
        // Some CPU time to account for.
        env.exec_sync(
            &c,
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
            ],
            30,
        )
        .await?;
        let one = call(
            "ContainerStats",
            env.runtime
                .clone()
                .container_stats(cri::ContainerStatsRequest {
                    container_id: c.clone(),
                }),
        )
        .await?
        .stats
        .ok_or_else(|| violation("ContainerStats answered without stats"))?;
        let mut gaps = stats_gaps(&one, &c);
        let listed = call(
            "ListContainerStats",
            env.runtime
                .clone()
                .list_container_stats(cri::ListContainerStatsRequest {
                    filter: Some(cri::ContainerStatsFilter {
                        pod_sandbox_id: pod,
                        ..Default::default()
                    }),
                }),
        )
        .await?;
        match listed
            .stats
            .iter()
            .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == c))
        {
            Some(s) => gaps.extend(
                stats_gaps(s, &c)
                    .into_iter()
                    .map(|g| format!("listed: {g}")),
            ),
            None => gaps.push("ListContainerStats by pod lacks the container".into()),
        }
        if gaps.is_empty() {
            Ok(Outcome::passed())
        } else {
            Err(violation(gaps.join("; ")))
        }
    })
}

async fn list_ids(env: &Env, filter: cri::ContainerFilter) -> Result<Vec<String>, CheckError> {
    let mut ids: Vec<String> = call(
        "ListContainers",
        env.runtime
            .clone()
            .list_containers(cri::ListContainersRequest {
                filter: Some(filter),
            }),
    )
    .await?
    .containers
    .into_iter()
    .map(|c| c.id)
    .collect();
    ids.sort();
    Ok(ids)
}

pub(super) fn list_filters(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let name = env.unique("list");
        let pod = env.run_pod(&name).await?;
        let a = env.run_container(&pod, &name, "a", LONG_RUNNING).await?;
        let b = env.run_container(&pod, &name, "b", &["true"]).await?;
        env.wait_container(&b, ContainerState::ContainerExited)
            .await?;
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        let by_pod = cri::ContainerFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        };
        let cases = [
            ("by pod", by_pod.clone(), both),
            (
                "by pod and label c=a",
                cri::ContainerFilter {
                    label_selector: [("c".to_string(), "a".to_string())].into(),
                    ..by_pod.clone()
                },
                vec![a.clone()],
            ),
            (
                "by pod and state EXITED",
                cri::ContainerFilter {
                    state: Some(cri::ContainerStateValue {
                        state: ContainerState::ContainerExited as i32,
                    }),
                    ..by_pod.clone()
                },
                vec![b.clone()],
            ),
            (
                "by ID",
                cri::ContainerFilter {
                    id: a.clone(),
                    ..Default::default()
                },
                vec![a.clone()],
            ),
        ];
        let mut wrong = Vec::new();
        for (what, filter, want) in cases {
            let got = list_ids(env, filter).await?;
            if got != want {
                wrong.push(format!("{what}: {got:?}, wanted {want:?}"));
            }
        }
        if wrong.is_empty() {
            Ok(Outcome::passed())
        } else {
            Err(violation(wrong.join("; ")))
        }
    })
}

pub(super) fn stop_remove_idempotent(env: &Env) -> CheckFuture<'_> {
    Box::pin(async move {
        let (_, c) = env.pod_with_container("idem").await?;
        for step in ["StopContainer", "StopContainer again"] {
            let req = cri::StopContainerRequest {
                container_id: c.clone(),
                timeout: 10,
            };
            call(step, env.runtime.clone().stop_container(req)).await?;
        }
        let s = env.container_status(&c).await?;
        if s.state != ContainerState::ContainerExited as i32 {
            return Err(violation(format!(
                "after StopContainer the state is {:?}",
                s.state
            )));
        }
        for step in ["RemoveContainer", "RemoveContainer again"] {
            let req = cri::RemoveContainerRequest {
                container_id: c.clone(),
            };
            call(step, env.runtime.clone().remove_container(req)).await?;
        }
        let req = cri::ContainerStatusRequest {
            container_id: c.clone(),
            verbose: false,
        };
        let (code, _) =
            code_of("ContainerStatus", env.runtime.clone().container_status(req)).await?;
        if code != Code::NotFound {
            return Err(violation(format!(
                "ContainerStatus of the removed container: {code:?}, wanted NotFound"
            )));
        }
        Ok(Outcome::passed())
    })
}

pub(super) fn seccomp_profiles(env: &Env) -> CheckFuture<'_> {
    use cri::security_profile::ProfileType;
    Box::pin(async move {
        let name = env.unique("seccomp");
        let pod = env.run_pod(&name).await?;
        let mut modes = Vec::new();
        for (container, profile_type, want) in [
            ("default", ProfileType::RuntimeDefault, "2"),
            ("unconfined", ProfileType::Unconfined, "0"),
        ] {
            let mut config = env.template.container(container, LONG_RUNNING);
            config.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: profile_type as i32,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            let id = env.create_container_with(&pod, &name, config).await?;
            env.start_container(&id).await?;
            let status = env
                .exec_sync(&id, &["cat", "/proc/self/status"], 10)
                .await?;
            let mode = String::from_utf8_lossy(&status.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()));
            if mode.as_deref() != Some(want) {
                return Err(violation(format!(
                    "{profile_type:?}: /proc/self/status says Seccomp: {mode:?}; wanted {want} (2 = filter)"
                )));
            }
            modes.push(format!("{profile_type:?} {want}"));
        }
        Ok(Outcome::passed_with(modes.join(", ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_recognised() {
        assert_eq!(
            parse_cri_line("2024-05-01T10:00:00.123456789Z stdout F hello world"),
            Some(("stdout", "F", "hello world"))
        );
        assert_eq!(
            parse_cri_line("2024-05-01T10:00:00.1+02:00 stderr P part"),
            Some(("stderr", "P", "part"))
        );
        assert_eq!(
            parse_cri_line("2024-05-01T10:00:00Z stdout F "),
            Some(("stdout", "F", ""))
        );
        assert_eq!(parse_cri_line("hello"), None);
        assert_eq!(parse_cri_line("2024-05-01T10:00:00Z stdin F x"), None);
        assert_eq!(parse_cri_line("yesterday stdout F x"), None);
    }
}
