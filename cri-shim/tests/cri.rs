//! End-to-end tests of the `nodekit-cri` binary over its CRI socket, inside `nk-` network
//! namespaces with a local registry and the reference bridge + host-local CNI plugins.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{image_spec, log_records, Lab, LabOptions, OciRuntime, IMAGE};
use nodekit_proto::cri::v1 as cri;
use tonic::Code;

#[tokio::test]
async fn version_status_and_runtime_config_report_the_runtime() {
    let mut lab = Lab::start(LabOptions {
        network: false,
        registry: false,
        ..Default::default()
    })
    .await;
    let v = lab
        .runtime
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
        ("nodekit-cri", "v1")
    );

    let status = |lab: &mut Lab| {
        let mut rt = lab.runtime.clone();
        async move {
            rt.status(cri::StatusRequest { verbose: false })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
                .conditions
        }
    };
    let conds = status(&mut lab).await;
    let net = conds.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    assert!(!net.status);
    assert_eq!(net.reason, "NetworkPluginNotReady");
    assert_eq!(net.message, "cni config uninitialized");
    assert!(conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status));

    lab.write_conflist(None);
    let conds = status(&mut lab).await;
    assert!(
        conds.iter().any(|c| c.r#type == "NetworkReady" && c.status),
        "{conds:?}"
    );

    let rc = lab
        .runtime
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rc.linux.unwrap().cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    let err = lab
        .runtime
        .checkpoint_container(cri::CheckpointContainerRequest {
            container_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("CheckpointContainer"), "{err}");
}

#[tokio::test]
async fn images_are_pulled_listed_inspected_and_removed() {
    let mut lab = Lab::start(LabOptions::default()).await;
    let id = lab.pull().await;
    assert!(id.starts_with("sha256:"), "{id}");

    for name in [IMAGE, id.as_str()] {
        let img = lab
            .image_status(name)
            .await
            .unwrap_or_else(|| panic!("ImageStatus({name}) is nil"));
        assert_eq!(img.id, id);
        assert_eq!(img.repo_tags, [IMAGE]);
        assert!(img.repo_digests[0].starts_with("127.0.0.1:5000/nk/busybox@sha256:"));
        assert!(
            img.size > 500_000,
            "compressed busybox is ~1 MB: {}",
            img.size
        );
    }
    let list = lab
        .images
        .list_images(cri::ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.images.len(), 1);
    let fs = lab
        .images
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(fs.image_filesystems[0].used_bytes.as_ref().unwrap().value > 1_000_000);

    let missing = lab
        .images
        .pull_image(cri::PullImageRequest {
            image: image_spec("127.0.0.1:5000/nk/busybox:nope"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing}");

    for _ in 0..2 {
        lab.images
            .remove_image(cri::RemoveImageRequest {
                image: image_spec(IMAGE),
            })
            .await
            .unwrap();
    }
    assert!(
        lab.image_status(&id).await.is_none(),
        "ImageStatus of a removed image is nil, not an error"
    );
    let fs = lab
        .images
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        fs.image_filesystems[0].used_bytes.as_ref().unwrap().value,
        0,
        "layers removed"
    );
}

#[tokio::test]
async fn pods_get_addresses_and_reach_each_other() {
    let mut lab = Lab::start(LabOptions::default()).await;
    lab.pull().await;
    let web = lab.run_pod("web").await;
    let client = lab.run_pod("client").await;
    let status = lab.sandbox_status(&web).await;
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    let web_ip = status.network.unwrap().ip;
    assert!(
        web_ip.starts_with("10.88."),
        "pod IP from host-local: {web_ip:?}"
    );

    let server = lab.run_httpd(&web, "web").await;
    let probe = lab
        .run_container(&client, "client", "probe", &["sleep", "3600"])
        .await;
    let hostname = lab.exec(&probe, &["hostname"], 5).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&hostname.stdout).trim(), "client");

    let url = format!("http://{web_ip}:8080/index.html");
    lab.expect_http(&probe, &url, "hello from nk\n").await;
    let _ = server;
}

async fn containers_exit_with_their_code_and_log_in_cri_format(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("jobs").await;
    let failing = lab
        .run_container(
            &pod,
            "jobs",
            "failing",
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
        )
        .await;
    let ok = lab.run_container(&pod, "jobs", "ok", &["true"]).await;

    let s = lab.wait_exited(&failing).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"));
    assert!(s.started_at > 0 && s.finished_at >= s.started_at, "{s:?}");
    assert_eq!(s.image.unwrap().image, IMAGE);
    let mut records = log_records(&s.log_path);
    records.sort();
    assert_eq!(
        records,
        [
            ("stderr".to_string(), "F".to_string(), "err".to_string()),
            ("stdout".to_string(), "F".to_string(), "out".to_string())
        ],
        "log at {}",
        s.log_path
    );
    let s = lab.wait_exited(&ok).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));

    let exited = lab
        .runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerExited as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(exited.len(), 2);
}
per_runtime!(containers_exit_with_their_code_and_log_in_cri_format);

async fn exec_sync_returns_output_and_exit_code_and_honours_its_timeout(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("exec").await;
    let c = lab
        .run_container(&pod, "exec", "sleeper", &["sleep", "3600"])
        .await;

    let out = lab
        .exec(&c, &["sh", "-c", "echo hi; echo oops >&2; exit 7"], 10)
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"hi\n"[..], &b"oops\n"[..], 7)
    );
    let id = lab.exec(&c, &["id", "-u"], 10).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), "0");

    let started = Instant::now();
    let err = lab.exec(&c, &["sleep", "30"], 1).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "timeout took {:?}",
        started.elapsed()
    );
    // Killed and reaped by `runc exec`: only init is a `sleep`. (Killing `runc exec` first
    // left a zombie parented outside the container's PID namespace, and the container's
    // init, once killed, waited for it to be reaped: StopPodSandbox took ~1.3 s, not 0.1 s.)
    let ps = lab
        .exec(&c, &["sh", "-c", "cat /proc/[0-9]*/stat"], 10)
        .await
        .unwrap();
    let stats = String::from_utf8_lossy(&ps.stdout);
    assert!(
        stats.matches("(sleep)").count() == 1,
        "timed-out process killed and reaped: {stats}"
    );

    let stats = lab
        .runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(stats.memory.unwrap().working_set_bytes.unwrap().value > 0);
    assert!(stats.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    let pod_stats = lab
        .runtime
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(pod_stats.linux.unwrap().containers.len(), 1);
    let listed = lab
        .runtime
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .stats;
    let listed_containers: Vec<String> = listed
        .iter()
        .flat_map(|s| s.linux.iter().flat_map(|l| &l.containers))
        .filter_map(|c| c.attributes.as_ref().map(|a| a.id.clone()))
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed_containers, std::slice::from_ref(&c));

    lab.runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: c.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_shares: 512,
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpuset_cpus: "0".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", lab.shim_log()));
    let cgroup_file = |hierarchy: &str, file: &str| {
        let path = format!("/sys/fs/cgroup/{hierarchy}{}/{c}/{file}", lab.cgroup_parent);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        [
            cgroup_file("memory", "memory.limit_in_bytes"),
            cgroup_file("cpu", "cpu.shares"),
            cgroup_file("cpu", "cpu.cfs_period_us"),
            cgroup_file("cpu", "cpu.cfs_quota_us"),
            cgroup_file("cpuset", "cpuset.cpus"),
        ],
        [
            (64u64 << 20).to_string(),
            "512".into(),
            "100000".into(),
            "50000".into(),
            "0".into()
        ]
    );
}
per_runtime!(exec_sync_returns_output_and_exit_code_and_honours_its_timeout);

async fn stop_and_remove_are_idempotent_and_leave_nothing_behind(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("gone").await;
    // sleep as PID 1 ignores SIGTERM: the stop timeout must end in SIGKILL.
    let c = lab
        .run_container(&pod, "gone", "stubborn", &["sleep", "3600"])
        .await;
    let started = Instant::now();
    for _ in 0..2 {
        lab.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: c.clone(),
                timeout: 1,
            })
            .await
            .unwrap();
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for the stop timeout"
    );
    let s = lab.container_status(&c).await;
    assert_eq!(
        (s.state, s.exit_code),
        (cri::ContainerState::ContainerExited as i32, 137)
    );
    for _ in 0..2 {
        lab.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: c.clone(),
            })
            .await
            .unwrap();
    }
    let err = lab
        .runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: c.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    lab.run_container(&pod, "gone", "second", &["sleep", "3600"])
        .await;
    // Created but never started: StopPodSandbox must kill it too.
    let idle = lab
        .create_container(&pod, "gone", "idle", &["sleep", "3600"])
        .await;
    for _ in 0..2 {
        lab.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap();
    }
    let status = lab.sandbox_status(&pod).await;
    assert_eq!(status.state, cri::PodSandboxState::SandboxNotready as i32);
    let idle = lab.container_status(&idle).await;
    assert_eq!(idle.state, cri::ContainerState::ContainerExited as i32);
    assert!(
        lab.leftover_netns().is_empty(),
        "StopPodSandbox removes the netns"
    );
    for _ in 0..2 {
        lab.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap();
    }
    assert!(lab.list_pods().await.is_empty());
    let containers = lab
        .runtime
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert!(containers.containers.is_empty());
    lab.assert_nothing_left();
}
per_runtime!(stop_and_remove_are_idempotent_and_leave_nothing_behind);

#[tokio::test]
async fn bad_requests_name_the_field_and_unknown_ids_are_not_found() {
    let mut lab = Lab::start(LabOptions::default()).await;
    let mut no_meta = lab.sandbox_config("bad");
    no_meta.metadata = None;
    let err = lab.run_pod_with(no_meta).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("config.metadata"), "{err}");
    let mut no_name = lab.sandbox_config("bad");
    no_name.metadata.as_mut().unwrap().name.clear();
    let err = lab.run_pod_with(no_name).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("config.metadata.name"),
        "{err}"
    );

    let pod = lab.run_pod("ok").await;
    let mut no_image = lab.container_config("c", &["true"]);
    no_image.image = None;
    let err = lab
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(no_image),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("config.image.image"),
        "{err}"
    );
    let not_pulled = lab.container_config("c", &["true"]);
    let err = lab
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(not_pulled),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "image not present: {err}");

    let unknown = "0".repeat(64);
    let err = lab
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: unknown.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = lab
        .runtime
        .start_container(cri::StartContainerRequest {
            container_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = lab
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: unknown.clone(),
            config: Some(lab.container_config("c", &["true"])),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = lab
        .runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    lab.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: unknown.clone(),
        })
        .await
        .unwrap();
    lab.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: unknown,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn cni_add_failure_rolls_back_everything() {
    let mut lab = Lab::start(LabOptions {
        extra_plugin: Some("nk-fail"),
        ..Default::default()
    })
    .await;
    let config = lab.sandbox_config("doomed");
    let err = lab.run_pod_with(config).await.unwrap_err();
    assert!(
        err.message().contains("nk-fail refuses this pod"),
        "plugin message surfaces: {err}"
    );
    assert!(lab.list_pods().await.is_empty());
    assert!(lab.leftover_netns().is_empty(), "netns removed");
    assert!(lab.cgroup_pids().is_empty(), "no pause left");
    let held = lab.held_addresses();
    assert!(
        held.is_empty(),
        "bridge's address released by DEL: {held:?}"
    );
    assert!(
        std::fs::read_dir(lab.path("state/sandboxes"))
            .unwrap()
            .next()
            .is_none(),
        "no sandbox state"
    );

    // The name is free again once the network works.
    lab.write_conflist(None);
    lab.run_pod("doomed").await;
}

async fn a_restarted_shim_finds_running_sandboxes_and_containers(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("survivor").await;
    let c = lab
        .run_container(
            &pod,
            "survivor",
            "loop",
            &["sh", "-c", "while true; do echo tick; sleep 0.2; done"],
        )
        .await;
    lab.kill_shim();
    lab.start_shim().await;

    let pods = lab.list_pods().await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
    let s = lab.container_status(&c).await;
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    let out = lab.exec(&c, &["echo", "still here"], 5).await.unwrap();
    assert_eq!(out.stdout, b"still here\n");
    let before = log_records(&s.log_path).len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        log_records(&s.log_path).len() > before,
        "the monitor kept logging across the restart"
    );

    // Log rotation: the kubelet renames the file, then asks for a reopen.
    std::fs::rename(&s.log_path, format!("{}.1", s.log_path)).unwrap();
    lab.runtime
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !log_records(&s.log_path).is_empty(),
        "the monitor reopened the log"
    );

    lab.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    lab.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    assert!(
        lab.leftover_netns().is_empty(),
        "netns removed by path after the restart"
    );
    assert!(lab.leftover_runtime_containers().is_empty());
    assert!(lab.leftover_mounts().is_empty());
}
per_runtime!(a_restarted_shim_finds_running_sandboxes_and_containers);

async fn a_process_that_cannot_start_leaves_no_runtime_state(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("broken").await;
    let req = cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(lab.container_config("nope", &["/no/such/binary"])),
        sandbox_config: None,
    };
    let created = lab.runtime.create_container(req).await;
    match created {
        Err(err) => assert!(err.message().contains("/no/such/binary"), "{err}"),
        Ok(resp) => {
            let id = resp.into_inner().container_id;
            let err = lab
                .runtime
                .start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .unwrap_err();
            assert!(err.message().contains("/no/such/binary"), "{err}");
            let s = lab.container_status(&id).await;
            assert_eq!(
                (s.state, s.reason.as_str()),
                (cri::ContainerState::ContainerExited as i32, "StartError")
            );
        }
    }
    assert!(
        lab.leftover_runtime_containers().is_empty(),
        "{:?}",
        lab.leftover_runtime_containers()
    );
}
per_runtime!(a_process_that_cannot_start_leaves_no_runtime_state);

#[tokio::test]
async fn host_network_pods_skip_cni_and_share_the_node_namespace() {
    let mut lab = Lab::start(LabOptions::default()).await;
    let pod = lab.run_host_network_pod().await;
    lab.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    assert!(lab.leftover_runtime_containers().is_empty());
}

#[tokio::test]
async fn crun_runs_containers_on_a_hybrid_cgroup_host_without_touching_its_mounts() {
    let unified_before = mounted_cgroup2();
    let mut lab = Lab::start(LabOptions::with_runtime(OciRuntime::Crun)).await;
    lab.pull().await;
    let pod = lab.run_pod("crun").await;
    let c = lab
        .run_container(&pod, "crun", "sleeper", &["sleep", "3600"])
        .await;
    // crun saw a plain cgroup v1 host: the container has a v1 memory cgroup of its own.
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", lab.init_pid(&c))).unwrap();
    let memory = format!(":memory:{}/{c}", lab.cgroup_parent);
    assert!(cgroups.lines().any(|l| l.ends_with(&memory)), "{cgroups}");
    lab.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    lab.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    assert!(lab.leftover_runtime_containers().is_empty());
    assert_eq!(
        mounted_cgroup2(),
        unified_before,
        "the host's cgroup2 mount must stay"
    );
}

/// The cgroup2 mount points of this (the host's) mount namespace.
fn mounted_cgroup2() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

#[tokio::test]
async fn containers_of_a_pod_share_its_dev_shm_until_the_pod_stops() {
    let mut lab = Lab::start(LabOptions::default()).await;
    lab.pull().await;
    let pod = lab.run_pod("shm").await;
    let writer = lab
        .run_container(&pod, "shm", "writer", &["sleep", "3600"])
        .await;
    let reader = lab
        .run_container(&pod, "shm", "reader", &["sleep", "3600"])
        .await;
    let wrote = lab
        .exec(&writer, &["sh", "-c", "echo shared > /dev/shm/seg"], 10)
        .await
        .unwrap();
    assert_eq!(wrote.exit_code, 0, "{wrote:?}");
    let read = lab
        .exec(&reader, &["cat", "/dev/shm/seg"], 10)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        "shared\n",
        "{read:?}"
    );
    let mounts = lab
        .exec(&reader, &["cat", "/proc/mounts"], 10)
        .await
        .unwrap();
    let mounts = String::from_utf8_lossy(&mounts.stdout).into_owned();
    let shm = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/dev/shm"));
    assert!(
        shm.is_some_and(|l| l.contains("tmpfs") && l.contains("size=65536k")),
        "a 64 MiB tmpfs at /dev/shm: {mounts}"
    );
    let other = lab.run_pod("other").await;
    let stranger = lab
        .run_container(&other, "other", "stranger", &["sleep", "3600"])
        .await;
    let miss = lab
        .exec(&stranger, &["cat", "/dev/shm/seg"], 10)
        .await
        .unwrap();
    assert_ne!(miss.exit_code, 0, "another pod's /dev/shm is its own");

    for id in [pod, other] {
        lab.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .unwrap();
    }
    let left: Vec<String> = lab
        .leftover_mounts()
        .into_iter()
        .filter(|m| m.ends_with("/shm"))
        .collect();
    assert!(left.is_empty(), "stopped pods keep no /dev/shm: {left:?}");
}

#[tokio::test]
async fn seccomp_profiles_filter_syscalls_and_bad_ones_are_invalid() {
    let mut lab = Lab::start(LabOptions::default()).await;
    lab.pull().await;
    let pod = lab.run_pod("seccomp").await;
    let dir = tempfile::tempdir().unwrap();
    let deny_mkdir = dir.path().join("deny-mkdir.json");
    std::fs::write(
        &deny_mkdir,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/seccomp-deny-mkdir.json"
        )),
    )
    .unwrap();
    let mut started = Vec::new();
    for (name, profile_type, localhost_ref) in [
        (
            "default",
            cri::security_profile::ProfileType::RuntimeDefault,
            "",
        ),
        (
            "unconfined",
            cri::security_profile::ProfileType::Unconfined,
            "",
        ),
        (
            "localhost",
            cri::security_profile::ProfileType::Localhost,
            deny_mkdir.to_str().unwrap(),
        ),
    ] {
        let mut config = lab.container_config(name, &["sleep", "3600"]);
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile {
                    profile_type: profile_type as i32,
                    localhost_ref: localhost_ref.into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = lab
            .try_create_container(&pod, "seccomp", config)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"));
        lab.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        started.push(id);
    }
    let [default, unconfined, localhost] = &started[..] else {
        unreachable!()
    };
    let mode = |out: cri::ExecSyncResponse| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
    };
    let status = ["cat", "/proc/self/status"];
    assert_eq!(
        mode(lab.exec(default, &status, 10).await.unwrap()).as_deref(),
        Some("2")
    );
    assert_eq!(
        mode(lab.exec(unconfined, &status, 10).await.unwrap()).as_deref(),
        Some("0")
    );
    // A user namespace needs no capability: only the default profile refuses it.
    let userns = ["unshare", "-U", "true"];
    let refused = lab.exec(default, &userns, 10).await.unwrap();
    assert_ne!(refused.exit_code, 0, "{refused:?}");
    let allowed = lab.exec(unconfined, &userns, 10).await.unwrap();
    assert_eq!(allowed.exit_code, 0, "{allowed:?}");
    let mkdir = ["mkdir", "/tmp/d"];
    assert_ne!(lab.exec(localhost, &mkdir, 10).await.unwrap().exit_code, 0);
    assert_eq!(lab.exec(default, &mkdir, 10).await.unwrap().exit_code, 0);

    let mut config = lab.container_config("missing", &["true"]);
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: "/nonexistent/profile.json".into(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = lab
        .try_create_container(&pod, "seccomp", config)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("seccomp"), "{err}");
}

#[test]
fn the_systemd_cgroup_driver_needs_systemd_as_init() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cri.sock");
    let mut shim = std::process::Command::new(env!("CARGO_BIN_EXE_nodekit-cri"))
        .arg("--listen")
        .arg(&socket)
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--cni-conf-dir")
        .arg(dir.path().join("cniconf"))
        .args(["--cgroup-driver", "systemd"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while shim.try_wait().unwrap().is_none() && !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if std::path::Path::new("/run/systemd/system").is_dir() {
        let serving = socket.exists();
        let _ = shim.kill();
        let _ = shim.wait();
        assert!(serving, "with systemd as init the shim serves");
        return;
    }
    let out = shim.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused to start: {stderr}");
    assert!(
        stderr.contains("--cgroup-driver systemd needs systemd as init"),
        "{stderr}"
    );
    assert!(!socket.exists(), "no socket was bound");
}

async fn a_container_over_its_memory_limit_exits_oom_killed(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("oom").await;
    // `tail` keeps the newline-free /dev/zero in memory until the cgroup's limit kills it.
    let mut config = lab.container_config("hog", &["busybox", "tail", "/dev/zero"]);
    config.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog = lab.run_container_with(&pod, "oom", config).await;
    let s = lab.wait_exited(&hog).await;
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{s:?}"
    );
    let calm = lab.run_container(&pod, "oom", "calm", &["true"]).await;
    let s = lab.wait_exited(&calm).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}");
}
per_runtime!(a_container_over_its_memory_limit_exits_oom_killed);
