//! The checks of suite `device-plugin`, each a test whose name reads as a sentence. Checks
//! that remove a device node put it back (a drop guard) and pods they allocate for are
//! removed again, so every check starts from the full, healthy lab.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nodekit_device_plugin::kubelet::{ManagerError, ResourceState};
use nodekit_device_plugin::lab::{self, LabError, GPU_RESOURCE, RESOURCE};
use nodekit_proto::deviceplugin::v1beta1 as api;
use nodekit_proto::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use tonic::transport::Channel;

use super::Env;
use crate::report::Outcome;

/// How long a plugin may take to (re-)register and send its first list.
pub const REGISTER_WAIT: Duration = Duration::from_secs(10);

/// How long a health change may take to reach the kubelet.
pub const HEALTH_WAIT: Duration = Duration::from_secs(1);

/// What stopped a check, or its judgement.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The plugin's behaviour contradicts the contract; the message says how.
    #[error("{0}")]
    Violation(String),
    /// The kubelet side failed (an allocation the plugin refused, ...).
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The lab could not be changed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A file operation of the runner failed.
    #[error("{step}: {source}")]
    Io {
        /// What the runner was doing.
        step: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn violation(message: impl Into<String>) -> CheckError {
    CheckError::Violation(message.into())
}

/// A check's entry point.
pub type CheckFn = fn(&Env) -> Result<Outcome, CheckError>;

/// A check with its sentence-like name.
pub type Check = crate::suite::Check<CheckFn>;

/// The checks, in run order (the kubelet restart last).
pub const CHECKS: &[Check] = &[
    Check {
        name: "registers each resource with the kubelet (API v1beta1, endpoint a socket in the device plugin directory)",
        run: registers_each_resource,
    },
    Check {
        name: "GetDevicePluginOptions agrees with the options sent at registration",
        run: options_agree_with_registration,
    },
    Check {
        name: "ListAndWatch lists every lab device node, each ID once, all Healthy",
        run: lists_every_device,
    },
    Check {
        name: "a removed device node turns its devices Unhealthy within 1 s, and Healthy again within 1 s of its return",
        run: health_follows_device_nodes,
    },
    Check {
        name: "GetPreferredAllocation honours must_include and keeps replicas of one device together",
        run: preferred_allocation_honours_must_include,
    },
    Check {
        name: "GetPreferredAllocation keeps GPUs on one NUMA node",
        run: preferred_allocation_keeps_numa,
    },
    Check {
        name: "Allocate answers with device specs, environment, mounts, annotations and CDI devices",
        run: allocate_response_fields,
    },
    Check {
        name: "GPU allocations carry the NVIDIA control devices",
        run: gpu_allocations_carry_control_devices,
    },
    Check {
        name: "Allocate of an unknown device ID fails with INVALID_ARGUMENT naming the ID",
        run: unknown_id_is_invalid_argument,
    },
    Check {
        name: "Allocate of an Unhealthy device fails with FAILED_PRECONDITION naming the ID",
        run: unhealthy_id_is_failed_precondition,
    },
    Check {
        name: "PreStartContainer succeeds for allocated devices when the plugin asks for it",
        run: pre_start_succeeds,
    },
    Check {
        name: "the plugin registers again after a kubelet restart (kubelet.sock removed and recreated, sockets wiped)",
        run: reregisters_after_kubelet_restart,
    },
];

/// The resources the target must advertise.
fn expected(env: &Env) -> &'static [&'static str] {
    if env.custom {
        &[RESOURCE]
    } else {
        &[RESOURCE, GPU_RESOURCE]
    }
}

/// Waits until `resource` is registered, connected and has sent a list (the full
/// [`REGISTER_WAIT`] only until one wait has timed out).
fn registered(env: &Env, resource: &str) -> Result<ResourceState, CheckError> {
    let wait = if env.gave_up.load(Ordering::Relaxed) {
        Duration::from_millis(100)
    } else {
        REGISTER_WAIT
    };
    let ready = env.rt.block_on(env.manager.wait_for(wait, |s| {
        s.resources
            .get(resource)
            .is_some_and(|r| r.connected && r.lists > 0)
    }));
    ready
        .and_then(|s| s.resources.get(resource).cloned())
        .ok_or_else(|| {
            env.gave_up.store(true, Ordering::Relaxed);
            violation(format!(
                "{resource} was not registered with a device list within {REGISTER_WAIT:?}"
            ))
        })
}

fn client(env: &Env, resource: &str) -> Result<DevicePluginClient<Channel>, CheckError> {
    registered(env, resource)?;
    env.manager
        .client(resource)
        .ok_or_else(|| violation(format!("no connection to the plugin of {resource}")))
}

fn healthy_ids(state: &ResourceState) -> Vec<String> {
    state
        .devices
        .iter()
        .filter(|d| d.healthy)
        .map(|d| d.id.clone())
        .collect()
}

fn unique_pod(what: &str) -> String {
    nodekit_nsutil::unique_name(what)
}

/// Removes a lab device node and puts it back (mknod) when dropped.
struct RemovedNode {
    path: PathBuf,
}

impl RemovedNode {
    fn remove(env: &Env, name: &str) -> Result<Self, CheckError> {
        let path = env.lab.node(name);
        std::fs::remove_file(&path).map_err(|source| CheckError::Io {
            step: format!("removing {}", path.display()),
            source,
        })?;
        Ok(Self { path })
    }

    fn restore(&self) -> Result<(), LabError> {
        if std::fs::symlink_metadata(&self.path).is_err() {
            lab::make_node(&self.path)?;
        }
        Ok(())
    }
}

impl Drop for RemovedNode {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// Removes the pod's allocations when dropped.
struct PodGuard<'a> {
    env: &'a Env,
    uid: String,
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        let _ = self.env.rt.block_on(self.env.manager.remove_pod(&self.uid));
    }
}

fn pod<'a>(env: &'a Env, what: &str) -> PodGuard<'a> {
    PodGuard {
        env,
        uid: unique_pod(what),
    }
}

fn registers_each_resource(env: &Env) -> Result<Outcome, CheckError> {
    let mut notes = Vec::new();
    for resource in expected(env) {
        let state = registered(env, resource)?;
        if state.endpoint.parent() != Some(env.lab.plugin_dir().as_path()) {
            return Err(violation(format!(
                "{resource}: endpoint {} is not in the device plugin directory",
                state.endpoint.display()
            )));
        }
        let is_socket = std::fs::symlink_metadata(&state.endpoint)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if !is_socket {
            return Err(violation(format!(
                "{resource}: endpoint {} is not a socket",
                state.endpoint.display()
            )));
        }
        let name = state
            .endpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        notes.push(format!("{resource} at {name}"));
    }
    Ok(Outcome::passed_with(notes.join(", ")))
}

fn options_agree_with_registration(env: &Env) -> Result<Outcome, CheckError> {
    for resource in expected(env) {
        let state = registered(env, resource)?;
        let mut client = client(env, resource)?;
        let options = env
            .rt
            .block_on(client.get_device_plugin_options(api::Empty {}))
            .map_err(|s| violation(format!("{resource}: GetDevicePluginOptions failed: {s}")))?
            .into_inner();
        if options.pre_start_required != state.pre_start_required
            || options.get_preferred_allocation_available != state.preferred_allocation
        {
            return Err(violation(format!(
                "{resource}: GetDevicePluginOptions says {options:?}, registration said pre_start_required={} get_preferred_allocation_available={}",
                state.pre_start_required, state.preferred_allocation
            )));
        }
    }
    Ok(Outcome::passed())
}

fn lists_every_device(env: &Env) -> Result<Outcome, CheckError> {
    let state = registered(env, RESOURCE)?;
    let ids: Vec<&str> = state.devices.iter().map(|d| d.id.as_str()).collect();
    let distinct: BTreeSet<&str> = ids.iter().copied().collect();
    if distinct.len() != ids.len() {
        return Err(violation(format!("duplicate device IDs: {ids:?}")));
    }
    if let Some(sick) = state.devices.iter().find(|d| !d.healthy) {
        return Err(violation(format!(
            "{} is Unhealthy on a healthy lab",
            sick.id
        )));
    }
    if env.custom {
        if ids.len() < lab::NODES.len() {
            return Err(violation(format!(
                "{} devices for {} lab nodes: {ids:?}",
                ids.len(),
                lab::NODES.len()
            )));
        }
        return Ok(Outcome::passed_with(format!("{} devices", ids.len())));
    }
    let want: BTreeSet<String> = lab::NODES
        .iter()
        .flat_map(|n| (0..lab::REPLICAS).map(move |r| format!("{n}::{r}")))
        .collect();
    let got: BTreeSet<String> = distinct.iter().map(|s| s.to_string()).collect();
    if got != want {
        return Err(violation(format!("lab devices {got:?}, expected {want:?}")));
    }
    let gpus = registered(env, GPU_RESOURCE)?;
    for (minor, _, numa) in lab::GPUS {
        let uuid = lab::gpu_uuid(*minor);
        let device = gpus
            .device(&uuid)
            .ok_or_else(|| violation(format!("GPU {uuid} (nvidia{minor}) is not listed")))?;
        if device.numa != [i64::from(*numa)] {
            return Err(violation(format!(
                "GPU {uuid} has topology {:?}, sysfs says NUMA node {numa}",
                device.numa
            )));
        }
    }
    Ok(Outcome::passed_with(format!(
        "{} lab devices, {} GPUs with NUMA topology",
        ids.len(),
        gpus.capacity()
    )))
}

fn health_follows_device_nodes(env: &Env) -> Result<Outcome, CheckError> {
    let before = healthy_ids(&registered(env, RESOURCE)?).len();
    let removed = RemovedNode::remove(env, "lab1")?;
    let started = Instant::now();
    let down = env.rt.block_on(env.manager.wait_for(HEALTH_WAIT, |s| {
        s.resources[RESOURCE].allocatable() < before
    }));
    let down_after = started.elapsed();
    let down = down.ok_or_else(|| {
        violation(format!(
            "removing {} changed no device to Unhealthy within {HEALTH_WAIT:?}",
            removed.path.display()
        ))
    })?;
    let unhealthy: Vec<String> = down.resources[RESOURCE]
        .devices
        .iter()
        .filter(|d| !d.healthy)
        .map(|d| d.id.clone())
        .collect();
    removed.restore()?;
    let started = Instant::now();
    let up = env.rt.block_on(env.manager.wait_for(HEALTH_WAIT, |s| {
        s.resources[RESOURCE].allocatable() == before
    }));
    let up_after = started.elapsed();
    if up.is_none() {
        return Err(violation(format!(
            "{unhealthy:?} still Unhealthy {HEALTH_WAIT:?} after the node came back"
        )));
    }
    Ok(Outcome::passed_with(format!(
        "{unhealthy:?} Unhealthy after {} ms, Healthy after {} ms",
        down_after.as_millis(),
        up_after.as_millis()
    )))
}

fn preferred(
    env: &Env,
    client: &mut DevicePluginClient<Channel>,
    available: &[String],
    must: &[String],
    size: i32,
) -> Result<Vec<String>, CheckError> {
    let request = api::PreferredAllocationRequest {
        container_requests: vec![api::ContainerPreferredAllocationRequest {
            available_device_i_ds: available.to_vec(),
            must_include_device_i_ds: must.to_vec(),
            allocation_size: size,
        }],
    };
    let answer = env
        .rt
        .block_on(client.get_preferred_allocation(request))
        .map_err(|s| violation(format!("GetPreferredAllocation failed: {s}")))?
        .into_inner();
    let [one] = answer.container_responses.as_slice() else {
        return Err(violation(format!(
            "{} container responses for one request",
            answer.container_responses.len()
        )));
    };
    let ids = one.device_i_ds.clone();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    if ids.len() != size as usize || distinct.len() != ids.len() {
        return Err(violation(format!("asked for {size} devices, got {ids:?}")));
    }
    if let Some(stray) = ids.iter().find(|id| !available.contains(id)) {
        return Err(violation(format!(
            "{stray} was not among the available devices"
        )));
    }
    if let Some(missing) = must.iter().find(|m| !ids.contains(m)) {
        return Err(violation(format!(
            "must_include {missing} missing from {ids:?}"
        )));
    }
    Ok(ids)
}

fn physical(id: &str) -> &str {
    id.split("::").next().unwrap_or(id)
}

fn preferred_allocation_honours_must_include(env: &Env) -> Result<Outcome, CheckError> {
    let state = registered(env, RESOURCE)?;
    if !state.preferred_allocation {
        return Ok(Outcome::Skipped(
            "the plugin does not offer GetPreferredAllocation".into(),
        ));
    }
    let mut client = client(env, RESOURCE)?;
    let available = healthy_ids(&state);
    let must = available.last().cloned().into_iter().collect::<Vec<_>>();
    let ids = preferred(env, &mut client, &available, &must, 2)?;
    if env.custom {
        return Ok(Outcome::passed_with(format!("chose {ids:?}")));
    }
    if physical(&ids[0]) != physical(&ids[1]) {
        return Err(violation(format!(
            "{ids:?} spans two devices although {} has a free replica",
            physical(&must[0])
        )));
    }
    let plain = preferred(env, &mut client, &available, &[], 2)?;
    if physical(&plain[0]) != physical(&plain[1]) {
        return Err(violation(format!("{plain:?} spans two devices")));
    }
    Ok(Outcome::passed_with(format!(
        "must_include {must:?} -> {ids:?}, none -> {plain:?}"
    )))
}

fn preferred_allocation_keeps_numa(env: &Env) -> Result<Outcome, CheckError> {
    if env.custom {
        return Ok(Outcome::Skipped(format!(
            "{GPU_RESOURCE} is defined by the lab config of nodekit's plugin"
        )));
    }
    let state = registered(env, GPU_RESOURCE)?;
    let mut client = client(env, GPU_RESOURCE)?;
    let numa_of = |id: &String| state.device(id).map(|d| d.numa.clone()).unwrap_or_default();
    let available = healthy_ids(&state);
    let ids = preferred(env, &mut client, &available, &[], 2)?;
    if numa_of(&ids[0]) != numa_of(&ids[1]) {
        return Err(violation(format!("{ids:?} span NUMA nodes")));
    }
    // GPU 2 is on node 1: its partner must be GPU 3.
    let must = vec![lab::gpu_uuid(2)];
    let with_must = preferred(env, &mut client, &available, &must, 2)?;
    if !with_must.contains(&lab::gpu_uuid(3)) {
        return Err(violation(format!(
            "must_include {} (NUMA 1) got partner outside NUMA 1: {with_must:?}",
            must[0]
        )));
    }
    Ok(Outcome::passed_with(format!(
        "NUMA {:?} for two GPUs",
        numa_of(&ids[0])
    )))
}

fn allocate_response_fields(env: &Env) -> Result<Outcome, CheckError> {
    registered(env, RESOURCE)?;
    let pod = pod(env, "dp-fields");
    let alloc = env
        .rt
        .block_on(env.manager.allocate(&pod.uid, "main", RESOURCE, 2))?;
    let r = &alloc.response;
    if r.devices.is_empty() {
        return Err(violation("no DeviceSpec in the Allocate response"));
    }
    for d in &r.devices {
        let host = PathBuf::from(&d.host_path);
        if host.parent() != Some(env.lab.dev_dir().as_path()) || !host.exists() {
            return Err(violation(format!(
                "DeviceSpec host path {} is not a lab device node",
                d.host_path
            )));
        }
        if !d.container_path.starts_with('/') {
            return Err(violation(format!(
                "DeviceSpec container path {:?} is not absolute",
                d.container_path
            )));
        }
        if d.permissions.is_empty() || !d.permissions.chars().all(|c| "rwm".contains(c)) {
            return Err(violation(format!(
                "DeviceSpec permissions {:?} are not drawn from r, w, m",
                d.permissions
            )));
        }
    }
    if env.custom {
        return Ok(Outcome::passed_with(format!(
            "{} device specs for {:?}",
            r.devices.len(),
            alloc.device_ids
        )));
    }
    let ids = alloc.device_ids.join(",");
    if r.envs.get("NODEKIT_LAB_DEVICES") != Some(&ids) {
        return Err(violation(format!(
            "env NODEKIT_LAB_DEVICES = {:?}, expected {ids:?}",
            r.envs.get("NODEKIT_LAB_DEVICES")
        )));
    }
    let mount_ok = r.mounts.iter().any(|m| {
        m.host_path == lab::MOUNT_HOST_PATH
            && m.container_path == lab::MOUNT_CONTAINER_PATH
            && m.read_only
    });
    if !mount_ok {
        return Err(violation(format!(
            "the configured read-only mount is missing: {:?}",
            r.mounts
        )));
    }
    let paths: Vec<&str> = r
        .devices
        .iter()
        .map(|d| d.container_path.as_str())
        .collect();
    if r.annotations.get("nodekit.io/lab-paths") != Some(&paths.join(",")) {
        return Err(violation(format!(
            "annotation nodekit.io/lab-paths = {:?}, expected {:?}",
            r.annotations.get("nodekit.io/lab-paths"),
            paths.join(",")
        )));
    }
    let cdi: Vec<String> = r.cdi_devices.iter().map(|c| c.name.clone()).collect();
    let want: Vec<String> = alloc
        .device_ids
        .iter()
        .map(|id| format!("{RESOURCE}={id}"))
        .collect();
    if cdi != want {
        return Err(violation(format!("CDI devices {cdi:?}, expected {want:?}")));
    }
    let spec_path = env.lab.cdi_dir().join("nodekit-nodekit.io-lab.json");
    let spec = std::fs::read_to_string(&spec_path).map_err(|source| CheckError::Io {
        step: format!("reading the CDI spec {}", spec_path.display()),
        source,
    })?;
    let spec: serde_json::Value = serde_json::from_str(&spec)
        .map_err(|e| violation(format!("CDI spec {} is not JSON: {e}", spec_path.display())))?;
    let names: Vec<&str> = spec["devices"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["name"].as_str()).collect())
        .unwrap_or_default();
    if let Some(id) = alloc
        .device_ids
        .iter()
        .find(|id| !names.contains(&id.as_str()))
    {
        return Err(violation(format!("CDI spec has no device {id}: {names:?}")));
    }
    Ok(Outcome::passed_with(format!(
        "{:?}: {} device spec(s), {} env, {} mount(s), {} annotation(s), {} CDI device(s)",
        alloc.device_ids,
        r.devices.len(),
        r.envs.len(),
        r.mounts.len(),
        r.annotations.len(),
        r.cdi_devices.len()
    )))
}

fn gpu_allocations_carry_control_devices(env: &Env) -> Result<Outcome, CheckError> {
    if env.custom {
        return Ok(Outcome::Skipped(format!(
            "{GPU_RESOURCE} is defined by the lab config of nodekit's plugin"
        )));
    }
    registered(env, GPU_RESOURCE)?;
    let pod = pod(env, "dp-gpu");
    let alloc = env
        .rt
        .block_on(env.manager.allocate(&pod.uid, "main", GPU_RESOURCE, 1))?;
    let paths: Vec<&str> = alloc
        .response
        .devices
        .iter()
        .map(|d| d.container_path.as_str())
        .collect();
    for control in ["/dev/nvidiactl", "/dev/nvidia-uvm"] {
        if !paths.contains(&control) {
            return Err(violation(format!("{control} missing from {paths:?}")));
        }
    }
    if alloc.response.envs.get("NVIDIA_VISIBLE_DEVICES") != alloc.device_ids.first() {
        return Err(violation(format!(
            "NVIDIA_VISIBLE_DEVICES = {:?} for {:?}",
            alloc.response.envs.get("NVIDIA_VISIBLE_DEVICES"),
            alloc.device_ids
        )));
    }
    Ok(Outcome::passed_with(format!("{paths:?}")))
}

fn allocate_error(env: &Env, ids: &[String]) -> Result<tonic::Status, CheckError> {
    let mut client = client(env, RESOURCE)?;
    let request = api::AllocateRequest {
        container_requests: vec![api::ContainerAllocateRequest {
            devices_ids: ids.to_vec(),
        }],
    };
    match env.rt.block_on(client.allocate(request)) {
        Ok(answer) => Err(violation(format!(
            "Allocate of {ids:?} succeeded: {:?}",
            answer.into_inner()
        ))),
        Err(status) => Ok(status),
    }
}

fn expect_status(
    status: &tonic::Status,
    code: tonic::Code,
    id: &str,
) -> Result<Outcome, CheckError> {
    if status.code() != code {
        return Err(violation(format!(
            "Allocate of {id} failed with {:?}, expected {code:?}: {}",
            status.code(),
            status.message()
        )));
    }
    if !status.message().contains(id) {
        return Err(violation(format!(
            "the message does not name {id}: {:?}",
            status.message()
        )));
    }
    Ok(Outcome::passed_with(status.message().to_string()))
}

fn unknown_id_is_invalid_argument(env: &Env) -> Result<Outcome, CheckError> {
    let state = registered(env, RESOURCE)?;
    let bogus = "nodekit-conformance-no-such-device".to_string();
    let mut ids: Vec<String> = healthy_ids(&state).into_iter().take(1).collect();
    ids.push(bogus.clone());
    let status = allocate_error(env, &ids)?;
    expect_status(&status, tonic::Code::InvalidArgument, &bogus)
}

fn unhealthy_id_is_failed_precondition(env: &Env) -> Result<Outcome, CheckError> {
    let before = healthy_ids(&registered(env, RESOURCE)?);
    let removed = RemovedNode::remove(env, "lab3")?;
    let down = env
        .rt
        .block_on(env.manager.wait_for(REGISTER_WAIT, |s| {
            s.resources[RESOURCE].allocatable() < before.len()
        }))
        .ok_or_else(|| violation("removing lab3 made no device Unhealthy"))?;
    let sick = down.resources[RESOURCE]
        .devices
        .iter()
        .find(|d| !d.healthy)
        .map(|d| d.id.clone())
        .ok_or_else(|| violation("no Unhealthy device in the list"))?;
    let status = allocate_error(env, std::slice::from_ref(&sick))?;
    let outcome = expect_status(&status, tonic::Code::FailedPrecondition, &sick);
    drop(removed);
    env.rt.block_on(env.manager.wait_for(REGISTER_WAIT, |s| {
        s.resources[RESOURCE].allocatable() == before.len()
    }));
    outcome
}

fn pre_start_succeeds(env: &Env) -> Result<Outcome, CheckError> {
    let state = registered(env, RESOURCE)?;
    if !state.pre_start_required {
        return Ok(Outcome::Skipped(
            "the plugin does not ask for PreStartContainer".into(),
        ));
    }
    let pod = pod(env, "dp-prestart");
    env.rt
        .block_on(env.manager.allocate(&pod.uid, "main", RESOURCE, 1))?;
    let called = env
        .rt
        .block_on(env.manager.pre_start(&pod.uid, "main", RESOURCE))?;
    if !called {
        return Err(violation("PreStartContainer was not called"));
    }
    Ok(Outcome::passed())
}

fn reregisters_after_kubelet_restart(env: &Env) -> Result<Outcome, CheckError> {
    let before: Vec<u64> = expected(env)
        .iter()
        .map(|r| registered(env, r).map(|s| s.registrations))
        .collect::<Result<_, _>>()?;
    let mut kubelet = env
        .kubelet
        .lock()
        .map_err(|_| violation("the kubelet handle is poisoned"))?;
    if let Some(old) = kubelet.take() {
        env.rt.block_on(old.stop());
    }
    // What a starting kubelet does: clear the directory of plugin sockets.
    let dir = env.lab.plugin_dir();
    let entries = std::fs::read_dir(&dir).map_err(|source| CheckError::Io {
        step: format!("listing {}", dir.display()),
        source,
    })?;
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_socket()).unwrap_or(false) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let started = Instant::now();
    *kubelet = Some({
        let _entered = env.rt.enter();
        env.manager.serve()?
    });
    drop(kubelet);
    let again = env.rt.block_on(env.manager.wait_for(REGISTER_WAIT, |s| {
        expected(env).iter().zip(&before).all(|(r, n)| {
            s.resources
                .get(*r)
                .is_some_and(|st| st.registrations > *n && st.connected && st.lists > 0)
        })
    }));
    if again.is_none() {
        return Err(violation(format!(
            "not every resource registered again within {REGISTER_WAIT:?}: {:?}",
            env.manager.snapshot()
        )));
    }
    let took = started.elapsed();
    let pod = pod(env, "dp-restart");
    env.rt
        .block_on(env.manager.allocate(&pod.uid, "main", RESOURCE, 1))?;
    Ok(Outcome::passed_with(format!(
        "registered again and allocating after {} ms",
        took.as_millis()
    )))
}
