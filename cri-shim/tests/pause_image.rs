//! `--pause-image`: the sandbox's namespace holder is a container run by runc or crun from
//! the lab's `sleep` pause image (pulled on first use), which the pod's containers join;
//! stop/remove and failures leave nothing, and a restarted shim finds it.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Lab, LabOptions, OciRuntime};
use nodekit_conformance::cri::lab::{ABSENT_IMAGE, PAUSE_IMAGE};
use nodekit_proto::cri::v1 as cri;

fn ns(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
        .to_string_lossy()
        .into_owned()
}

fn status_field(pid: i32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn entries(path: std::path::PathBuf) -> Vec<String> {
    std::fs::read_dir(&path)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn pause_image_sandboxes_hold_the_pod_namespaces_and_leave_nothing(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.restart_shim_with(&["--pause-image", PAUSE_IMAGE]).await;
    lab.pull().await;
    let web = lab.run_pod("web").await;
    let client = lab.run_pod("client").await;
    assert!(
        lab.image_status(PAUSE_IMAGE).await.is_some(),
        "the pause image was pulled"
    );
    let mut known = lab.leftover_runtime_containers();
    known.sort();
    let mut pods = vec![web.clone(), client.clone()];
    pods.sort();
    assert_eq!(known, pods, "runc runs one sandbox container per pod");

    let pause = lab.init_pid(&web);
    let cmdline = std::fs::read_to_string(format!("/proc/{pause}/cmdline")).unwrap();
    assert_eq!(
        cmdline.split('\0').collect::<Vec<_>>(),
        ["/bin/sleep", "2147483647", ""],
        "the image's entrypoint and cmd"
    );
    assert_eq!(status_field(pause, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pause, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(pause, "NoNewPrivs:"), "1");
    assert_eq!(
        status_field(pause, "NSpid:").split_whitespace().last(),
        Some("1")
    );
    let root_ro = std::fs::read_to_string(format!("/proc/{pause}/mountinfo"))
        .unwrap()
        .lines()
        .any(|l| {
            l.split(' ').nth(4) == Some("/") && l.split(' ').nth(5).unwrap().starts_with("ro")
        });
    assert!(root_ro, "read-only rootfs");
    let cgroup = std::fs::read_to_string(format!("/proc/{pause}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("{}/{web}", lab.cgroup_parent)),
        "in the sandbox's cgroup: {cgroup}"
    );

    let server = lab.run_httpd(&web, "web").await;
    let sidecar = lab
        .run_container(&web, "web", "sidecar", &["sleep", "3600"])
        .await;
    let (a, b) = (lab.init_pid(&server), lab.init_pid(&sidecar));
    for kind in ["ipc", "uts", "net"] {
        assert_eq!(
            ns(a, kind),
            ns(pause, kind),
            "{kind} shared with the sandbox"
        );
        assert_eq!(
            ns(b, kind),
            ns(pause, kind),
            "{kind} shared with the sandbox"
        );
    }
    let me = std::process::id() as i32;
    assert_ne!(ns(pause, "ipc"), ns(me, "ipc"), "own IPC namespace");
    assert_ne!(ns(pause, "uts"), ns(me, "uts"), "own UTS namespace");
    let hostname = lab.exec(&sidecar, &["hostname"], 5).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&hostname.stdout).trim(), "web");

    let web_ip = lab.sandbox_status(&web).await.network.unwrap().ip;
    let probe = lab
        .run_container(&client, "client", "probe", &["sleep", "3600"])
        .await;
    let url = format!("http://{web_ip}:8080/index.html");
    lab.expect_http(&probe, &url, "hello from nk\n").await;

    lab.kill_shim();
    lab.start_shim().await;
    let status = lab.sandbox_status(&web).await;
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    let late = lab
        .run_container(&web, "web", "late", &["sleep", "3600"])
        .await;
    assert_eq!(
        ns(lab.init_pid(&late), "ipc"),
        ns(pause, "ipc"),
        "after a restart new containers join the same sandbox"
    );

    for pod in [&web, &client] {
        lab.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .unwrap();
    }
    let left = lab.leftover_runtime_containers();
    assert!(
        !left.contains(&web) && !left.contains(&client),
        "sandbox containers deleted at stop: {left:?}"
    );
    assert!(lab.leftover_netns().is_empty(), "netns removed at stop");
    for pod in [&web, &client] {
        lab.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .unwrap();
    }
    lab.assert_nothing_left();
    assert!(entries(lab.path("state/sandboxes")).is_empty());
    assert!(entries(lab.path("root/sandboxes")).is_empty());
}
per_runtime!(pause_image_sandboxes_hold_the_pod_namespaces_and_leave_nothing);

async fn unpullable_or_failing_pause_containers_fail_run_pod_sandbox_and_leave_nothing(
    runtime: OciRuntime,
) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.restart_shim_with(&["--pause-image", ABSENT_IMAGE])
        .await;
    let err = lab
        .run_pod_with(lab.sandbox_config("doomed"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("pause image") && err.message().contains(ABSENT_IMAGE),
        "names the pause image: {err}"
    );
    assert!(lab.list_pods().await.is_empty());
    lab.assert_nothing_left();
    assert!(entries(lab.path("state/sandboxes")).is_empty());

    // A sandbox container runc refuses (a sysctl the kernel lacks) fails after the netns,
    // CNI ADD and rootfs mount: all of it is undone.
    lab.restart_shim_with(&["--pause-image", PAUSE_IMAGE]).await;
    let mut config = lab.sandbox_config("doomed");
    if let Some(linux) = config.linux.as_mut() {
        linux.sysctls.insert("net.nk.absent".into(), "1".into());
    }
    let err = lab.run_pod_with(config).await.unwrap_err();
    assert!(
        err.message().contains("/proc/sys/net/nk/absent"),
        "runc's refusal surfaces: {err}"
    );
    assert!(lab.list_pods().await.is_empty());
    // netns, runc state, rootfs mount, CNI address: all undone.
    lab.assert_nothing_left();
    assert!(entries(lab.path("state/sandboxes")).is_empty());
    assert!(entries(lab.path("root/sandboxes")).is_empty());

    // The name is free again.
    lab.run_pod("doomed").await;
}
per_runtime!(unpullable_or_failing_pause_containers_fail_run_pod_sandbox_and_leave_nothing);

async fn host_network_pause_containers_keep_the_node_network_and_hostname(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.restart_shim_with(&["--pause-image", PAUSE_IMAGE]).await;
    let pod = lab.run_host_network_pod().await;
    let (pause, shim) = (lab.init_pid(&pod), lab.runtime_pid().unwrap());
    for kind in ["net", "uts"] {
        assert_eq!(
            ns(pause, kind),
            ns(shim, kind),
            "the node's {kind} namespace"
        );
    }
    assert_ne!(
        ns(pause, "ipc"),
        ns(shim, "ipc"),
        "still its own IPC namespace"
    );
    lab.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    lab.assert_nothing_left();
}
per_runtime!(host_network_pause_containers_keep_the_node_network_and_hostname);
