//! The real `nodekit-device-plugin` binary against the kubelet-side library, over real unix
//! sockets in a temp lab (device nodes made with mknod: needs root).

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodekit_device_plugin::kubelet::{DeviceManager, ManagerError, Snapshot};
use nodekit_device_plugin::lab::{self, Lab, PluginProcess, GPU_RESOURCE, RESOURCE};
use nodekit_device_plugin::plugin::socket_name;
use nodekit_proto::deviceplugin::v1beta1 as api;

const WAIT: Duration = Duration::from_secs(10);

fn plugin(lab: &Lab) -> PluginProcess {
    PluginProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_nodekit-device-plugin")),
        &lab.plugin_args(),
        &lab.log_path(),
    )
    .expect("start the plugin")
}

/// Waits until both lab resources registered and sent a list.
async fn registered(manager: &DeviceManager) -> Snapshot {
    manager
        .wait_for(WAIT, |s| {
            [RESOURCE, GPU_RESOURCE].iter().all(|r| {
                s.resources
                    .get(*r)
                    .is_some_and(|r| r.connected && r.lists > 0)
            })
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "both resources registered within {WAIT:?}: {:?}",
                manager.snapshot()
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_lists_devices_with_replicas_and_numa_topology() {
    let lab = Lab::create().unwrap();
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    let _kubelet = manager.serve().unwrap();
    let _plugin = plugin(&lab);
    let snap = registered(&manager).await;

    let labr = &snap.resources[RESOURCE];
    assert_eq!(labr.capacity(), lab::NODES.len() * lab::REPLICAS);
    assert_eq!(labr.allocatable(), labr.capacity());
    assert!(labr.device("lab0::1").is_some(), "{labr:?}");
    assert!(labr.pre_start_required && labr.preferred_allocation);
    assert_eq!(
        labr.endpoint,
        lab.plugin_dir().join(socket_name(RESOURCE)),
        "endpoint is the socket in the plugin dir"
    );

    let gpu = &snap.resources[GPU_RESOURCE];
    assert_eq!(gpu.capacity(), 4);
    assert_eq!(gpu.device(&lab::gpu_uuid(3)).unwrap().numa, vec![1]);
    assert_eq!(gpu.device(&lab::gpu_uuid(0)).unwrap().numa, vec![0]);
    assert!(!gpu.pre_start_required);
    // The CDI spec of the lab resource was written.
    let spec = lab.cdi_dir().join("nodekit-nodekit.io-lab.json");
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&spec).unwrap()).unwrap();
    assert_eq!(spec["kind"], RESOURCE);
    assert_eq!(spec["devices"].as_array().unwrap().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_node_turns_unhealthy_and_back_within_a_second() {
    let lab = Lab::create().unwrap();
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    let _kubelet = manager.serve().unwrap();
    let _plugin = plugin(&lab);
    registered(&manager).await;

    let health = |s: &Snapshot, id: &str| s.resources[RESOURCE].device(id).map(|d| d.healthy);
    std::fs::remove_file(lab.node("lab2")).unwrap();
    let started = Instant::now();
    let snap = manager
        .wait_for(Duration::from_secs(1), |s| {
            health(s, "lab2::0") == Some(false)
        })
        .await
        .expect("lab2 unhealthy within 1 s");
    let took = started.elapsed();
    assert_eq!(health(&snap, "lab2::1"), Some(false), "both replicas");
    assert_eq!(health(&snap, "lab1::0"), Some(true));
    assert_eq!(snap.resources[RESOURCE].allocatable(), 6);

    lab::make_node(&lab.node("lab2")).unwrap();
    manager
        .wait_for(Duration::from_secs(1), |s| {
            health(s, "lab2::0") == Some(true)
        })
        .await
        .expect("lab2 healthy again within 1 s");
    eprintln!("removal seen after {took:?}");

    // A GPU node too (the NVIDIA discovery watches its dev dir).
    std::fs::remove_file(lab.gpu_root().join("dev/nvidia1")).unwrap();
    let uuid = lab::gpu_uuid(1);
    manager
        .wait_for(Duration::from_secs(1), |s| {
            s.resources[GPU_RESOURCE].device(&uuid).map(|d| d.healthy) == Some(false)
        })
        .await
        .expect("GPU 1 unhealthy within 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_prefers_packing_checkpoints_and_survives_a_manager_restart() {
    let lab = Lab::create().unwrap();
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    let kubelet = manager.serve().unwrap();
    let _plugin = plugin(&lab);
    registered(&manager).await;

    let a = manager
        .allocate("pod-a", "main", RESOURCE, 2)
        .await
        .unwrap();
    let physical: Vec<&str> = a
        .device_ids
        .iter()
        .map(|id| id.split("::").next().unwrap())
        .collect();
    assert_eq!(
        physical[0], physical[1],
        "packed on one device: {:?}",
        a.device_ids
    );
    let r = &a.response;
    assert_eq!(r.devices.len(), 1, "replicas share one node: {r:?}");
    assert_eq!(
        r.devices[0].host_path,
        lab.node(physical[0]).display().to_string()
    );
    assert_eq!(r.devices[0].permissions, "rw");
    assert_eq!(r.envs["NODEKIT_LAB_DEVICES"], a.device_ids.join(","));
    assert_eq!(r.mounts[0].container_path, lab::MOUNT_CONTAINER_PATH);
    assert!(r.mounts[0].read_only);
    assert_eq!(
        r.annotations["nodekit.io/lab-paths"],
        r.devices[0].container_path
    );
    assert_eq!(r.cdi_devices.len(), 2);
    assert!(manager.pre_start("pod-a", "main", RESOURCE).await.unwrap());

    // GPUs: two on one NUMA node, with the control devices.
    let g = manager
        .allocate("pod-g", "main", GPU_RESOURCE, 2)
        .await
        .unwrap();
    let snap = manager.snapshot();
    let numa: Vec<_> = g
        .device_ids
        .iter()
        .map(|id| {
            snap.resources[GPU_RESOURCE]
                .device(id)
                .unwrap()
                .numa
                .clone()
        })
        .collect();
    assert_eq!(numa[0], numa[1], "{:?}", g.device_ids);
    let paths: Vec<&str> = g
        .response
        .devices
        .iter()
        .map(|d| d.container_path.as_str())
        .collect();
    assert!(
        paths.contains(&"/dev/nvidiactl") && paths.contains(&"/dev/nvidia-uvm"),
        "{paths:?}"
    );
    assert!(!manager
        .pre_start("pod-g", "main", GPU_RESOURCE)
        .await
        .unwrap());

    // All but the 2 taken: 6 free; 7 is too many.
    let e = manager
        .allocate("pod-b", "main", RESOURCE, 7)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ManagerError::Insufficient { free: 6, .. }),
        "{e}"
    );

    // A restarted manager reads the checkpoint: same devices for pod-a, not for others.
    kubelet.stop().await;
    manager.disconnect_all();
    drop(manager);
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    assert_eq!(manager.allocated(RESOURCE).len(), 2);
    let _kubelet = manager.serve().unwrap();
    registered(&manager).await;
    let again = manager
        .allocate("pod-a", "main", RESOURCE, 2)
        .await
        .unwrap();
    assert_eq!(again, a);
    let b = manager
        .allocate("pod-b", "main", RESOURCE, 6)
        .await
        .unwrap();
    assert!(b.device_ids.iter().all(|id| !a.device_ids.contains(id)));
    assert_eq!(manager.remove_pod("pod-a").await.unwrap(), 1);
    assert_eq!(manager.allocated(RESOURCE).len(), 6);
    manager
        .allocate("pod-c", "main", RESOURCE, 2)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_invalid_argument_and_unhealthy_ones_failed_precondition() {
    let lab = Lab::create().unwrap();
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    let _kubelet = manager.serve().unwrap();
    let _plugin = plugin(&lab);
    registered(&manager).await;
    let mut client = manager.client(RESOURCE).unwrap();
    let request = |ids: &[&str]| api::AllocateRequest {
        container_requests: vec![api::ContainerAllocateRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        }],
    };
    let status = client
        .allocate(request(&["lab0::0", "no-such"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("no-such"), "{status:?}");

    std::fs::remove_file(lab.node("lab3")).unwrap();
    manager
        .wait_for(WAIT, |s| {
            s.resources[RESOURCE]
                .device("lab3::0")
                .is_some_and(|d| !d.healthy)
        })
        .await
        .unwrap();
    let status = client.allocate(request(&["lab3::1"])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("lab3::1"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_restart_makes_the_plugin_register_again() {
    let lab = Lab::create().unwrap();
    // The plugin starts first: no kubelet.sock yet, it retries.
    let _plugin = plugin(&lab);
    let socket = lab.plugin_dir().join(socket_name(RESOURCE));
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "plugin socket never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    let kubelet = manager.serve().unwrap();
    registered(&manager).await;

    // The kubelet restarts: kubelet.sock goes, the plugin sockets are wiped, kubelet.sock
    // comes back.
    kubelet.stop().await;
    for entry in std::fs::read_dir(lab.plugin_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_socket() {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let _kubelet = manager.serve().unwrap();
    let snap = manager
        .wait_for(WAIT, |s| {
            [RESOURCE, GPU_RESOURCE].iter().all(|r| {
                s.resources
                    .get(*r)
                    .is_some_and(|r| r.registrations >= 2 && r.connected && r.lists > 0)
            })
        })
        .await
        .unwrap_or_else(|| panic!("re-registration: {:?}", manager.snapshot()));
    assert!(socket.exists(), "the plugin made its socket again");
    assert_eq!(snap.resources[RESOURCE].capacity(), 8);
    manager.allocate("pod", "c", RESOURCE, 1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_and_sigterm_removes_the_sockets() {
    let lab = Lab::create().unwrap();
    let manager = lab.manager(Duration::from_secs(60)).unwrap();
    let _kubelet = manager.serve().unwrap();
    let plugin = plugin(&lab);
    registered(&manager).await;

    // One more resource, and a broken config that must be ignored.
    let extra = format!(
        "{}  - name: nodekit.io/extra\n    devices: [\"{}\"]\n",
        lab.config_yaml(),
        lab.node("lab0").display()
    );
    lab.write_config("resources: [{name: broken}]").unwrap();
    plugin.signal(Signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    lab.write_config(&extra).unwrap();
    plugin.signal(Signal::SIGHUP).unwrap();
    manager
        .wait_for(WAIT, |s| {
            s.resources
                .get("nodekit.io/extra")
                .is_some_and(|r| r.lists > 0)
        })
        .await
        .unwrap_or_else(|| panic!("extra resource after SIGHUP: {:?}", manager.snapshot()));

    let status = plugin.terminate().expect("the plugin exits");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let left: Vec<_> = std::fs::read_dir(lab.plugin_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "kubelet.sock")
        .collect();
    assert!(left.is_empty(), "sockets left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_plugin_keeps_capacity_for_the_grace_period_then_drops_to_zero() {
    let lab = Lab::create().unwrap();
    let manager = lab.manager(Duration::from_millis(300)).unwrap();
    let _kubelet = manager.serve().unwrap();
    let plugin = plugin(&lab);
    registered(&manager).await;
    plugin.signal(Signal::SIGKILL).unwrap();
    let snap = manager
        .wait_for(WAIT, |s| !s.resources[RESOURCE].connected)
        .await
        .expect("disconnect seen");
    // Right after the disconnect the devices are still there, none allocatable.
    let r = &snap.resources[RESOURCE];
    assert_eq!((r.capacity(), r.allocatable()), (8, 0));
    manager
        .wait_for(WAIT, |s| s.resources[RESOURCE].capacity() == 0)
        .await
        .expect("capacity 0 after the grace period");
    let e = manager.allocate("p", "c", RESOURCE, 1).await.unwrap_err();
    assert!(matches!(e, ManagerError::NoPlugin { .. }), "{e}");
}

#[test]
fn a_malformed_config_exits_non_zero_naming_the_field_and_leaves_no_socket() {
    let lab = Lab::create().unwrap();
    lab.write_config(&format!(
        "resources:\n  - name: nodekit.io/x\n    devices: [\"{}\"]\n    replicas: -2\n",
        lab.node("lab0").display()
    ))
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodekit-device-plugin"))
        .args(lab.plugin_args())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("resources[0].replicas"), "{stderr}");
    let entries = std::fs::read_dir(lab.plugin_dir()).unwrap().count();
    assert_eq!(entries, 0, "nothing created in the plugin dir");
}
