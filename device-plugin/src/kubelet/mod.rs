//! The kubelet side of the device plugin contract, for a node agent (and the conformance
//! runner, which uses it to drive any plugin): a Registration server on `kubelet.sock`
//! ([`registration`]) and a [`DeviceManager`] that connects back to each registered plugin,
//! follows its ListAndWatch stream, keeps capacity (devices) and allocatable (healthy
//! devices of a connected plugin) per resource, allocates devices to containers
//! (GetPreferredAllocation when offered, then Allocate), checkpoints allocations
//! ([`checkpoint`]) and frees them when a pod goes. A plugin whose stream ends keeps its
//! devices (none allocatable) for a grace period, then its capacity drops to 0.

pub mod checkpoint;
pub mod registration;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nodekit_proto::deviceplugin::v1beta1 as api;
use nodekit_proto::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use nodekit_proto::uds::{self, UdsError};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::transport::Channel;

use crate::config::check_resource_name;
use crate::plugin::{API_VERSION, KUBELET_SOCKET};
use checkpoint::{CheckpointError, Entry};

/// The kubelet's grace period for a vanished plugin's devices.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(300);

/// How long connecting back to a registering plugin may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the manager works.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The device plugin directory (kubelet.sock and the plugins' sockets).
    pub plugin_dir: PathBuf,
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// How long a disconnected plugin's devices still count as capacity.
    pub grace_period: Duration,
}

impl ManagerConfig {
    /// The kubelet's layout: checkpoint `kubelet_internal_checkpoint` in `plugin_dir`, grace
    /// period [`DEFAULT_GRACE_PERIOD`].
    pub fn new(plugin_dir: impl Into<PathBuf>) -> Self {
        let plugin_dir = plugin_dir.into();
        Self {
            checkpoint: plugin_dir.join("kubelet_internal_checkpoint"),
            plugin_dir,
            grace_period: DEFAULT_GRACE_PERIOD,
        }
    }
}

/// What the manager knows about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The plugin's device ID.
    pub id: String,
    /// Whether the plugin last said `Healthy`.
    pub healthy: bool,
    /// NUMA nodes from the device's topology.
    pub numa: Vec<i64>,
}

/// What the manager knows about one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceState {
    /// The plugin's socket.
    pub endpoint: PathBuf,
    /// The plugin asked for PreStartContainer calls.
    pub pre_start_required: bool,
    /// The plugin offers GetPreferredAllocation.
    pub preferred_allocation: bool,
    /// The devices of the last list, in the plugin's order (empty after the grace period).
    pub devices: Vec<DeviceState>,
    /// Whether the plugin's ListAndWatch stream is open.
    pub connected: bool,
    /// How many times the plugin registered.
    pub registrations: u64,
    /// How many device lists it sent since its last registration.
    pub lists: u64,
    generation: u64,
}

impl ResourceState {
    /// Capacity: the devices advertised (kept through the grace period).
    pub fn capacity(&self) -> usize {
        self.devices.len()
    }

    /// Allocatable: healthy devices of a connected plugin.
    pub fn allocatable(&self) -> usize {
        if self.connected {
            self.devices.iter().filter(|d| d.healthy).count()
        } else {
            0
        }
    }

    /// The device called `id`.
    pub fn device(&self, id: &str) -> Option<&DeviceState> {
        self.devices.iter().find(|d| d.id == id)
    }
}

/// Every resource, as one consistent picture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By resource name.
    pub resources: BTreeMap<String, ResourceState>,
}

/// One container's devices of one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerAllocation {
    /// The device IDs.
    pub device_ids: Vec<String>,
    /// The plugin's Allocate answer.
    pub response: api::ContainerAllocateResponse,
}

/// A registration was refused or an allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The plugin speaks another API version.
    #[error("unsupported device plugin API version {version:?} (supported: {API_VERSION})")]
    UnsupportedVersion {
        /// The version it sent.
        version: String,
    },
    /// The resource name is not an extended resource name.
    #[error("invalid resource name {name:?}: {reason}")]
    InvalidResourceName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The endpoint is not a socket file name in the plugin directory.
    #[error(
        "invalid endpoint {endpoint:?}: must be a socket file name in the device plugin directory"
    )]
    InvalidEndpoint {
        /// The endpoint.
        endpoint: String,
    },
    /// The plugin's socket could not be reached.
    #[error("resource {resource}: cannot reach the plugin: {source}")]
    Connect {
        /// The resource.
        resource: String,
        /// The failure.
        #[source]
        source: UdsError,
    },
    /// A call to the plugin failed.
    #[error("resource {resource}: {call} failed: {status}")]
    Plugin {
        /// The resource.
        resource: String,
        /// The RPC.
        call: &'static str,
        /// The plugin's status.
        status: tonic::Status,
    },
    /// The plugin answered something the contract does not allow.
    #[error("resource {resource}: {call}: {problem}")]
    Misbehaved {
        /// The resource.
        resource: String,
        /// The RPC.
        call: &'static str,
        /// What was wrong.
        problem: String,
    },
    /// No plugin registered this resource, or it is not connected.
    #[error("resource {resource} has no connected device plugin")]
    NoPlugin {
        /// The resource.
        resource: String,
    },
    /// Fewer free healthy devices than requested.
    #[error("resource {resource}: {requested} requested, {free} free and healthy")]
    Insufficient {
        /// The resource.
        resource: String,
        /// Devices asked for.
        requested: usize,
        /// Devices free.
        free: usize,
    },
    /// The checkpoint could not be used.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// kubelet.sock could not be bound.
    #[error("serving kubelet.sock: {0}")]
    Serve(#[source] UdsError),
}

impl From<ManagerError> for tonic::Status {
    fn from(e: ManagerError) -> Self {
        match e {
            ManagerError::UnsupportedVersion { .. }
            | ManagerError::InvalidResourceName { .. }
            | ManagerError::InvalidEndpoint { .. } => {
                tonic::Status::invalid_argument(e.to_string())
            }
            ManagerError::Connect { .. } => tonic::Status::unavailable(e.to_string()),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}

/// A connected plugin.
#[derive(Debug)]
struct Endpoint {
    client: DevicePluginClient<Channel>,
    watcher: AbortHandle,
}

#[derive(Debug)]
struct Inner {
    config: ManagerConfig,
    state: Arc<watch::Sender<Snapshot>>,
    endpoints: Mutex<HashMap<String, Endpoint>>,
    allocations: Mutex<Vec<Entry>>,
    allocating: tokio::sync::Mutex<()>,
    generations: std::sync::atomic::AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for endpoint in lock(&self.endpoints).values() {
            endpoint.watcher.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent: a panic elsewhere is no reason to stop.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The kubelet's device manager. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct DeviceManager {
    inner: Arc<Inner>,
}

impl DeviceManager {
    /// A manager with the allocations of its checkpoint (empty when there is none).
    pub fn new(config: ManagerConfig) -> Result<Self, ManagerError> {
        let allocations = checkpoint::load(&config.checkpoint)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                state: Arc::new(watch::Sender::new(Snapshot::default())),
                endpoints: Mutex::new(HashMap::new()),
                allocations: Mutex::new(allocations),
                allocating: tokio::sync::Mutex::new(()),
                generations: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// The path of kubelet.sock.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.inner.config.plugin_dir.join(KUBELET_SOCKET)
    }

    /// The current picture.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.state.borrow().clone()
    }

    /// One resource's state.
    pub fn resource(&self, name: &str) -> Option<ResourceState> {
        self.inner.state.borrow().resources.get(name).cloned()
    }

    /// Waits until `done` holds for the picture (checked now and after every change);
    /// `None` on timeout.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Snapshot) -> bool,
    ) -> Option<Snapshot> {
        let mut rx = self.inner.state.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| done(s))).await;
        match waited {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// A client of the plugin serving `resource` (for calls the manager does not make).
    pub fn client(&self, resource: &str) -> Option<DevicePluginClient<Channel>> {
        lock(&self.inner.endpoints)
            .get(resource)
            .map(|e| e.client.clone())
    }

    /// Handles a Register call: validates it, connects back, opens ListAndWatch, and
    /// replaces any earlier plugin of the same resource.
    pub async fn register(&self, request: api::RegisterRequest) -> Result<(), ManagerError> {
        if request.version != API_VERSION {
            return Err(ManagerError::UnsupportedVersion {
                version: request.version,
            });
        }
        let resource = request.resource_name;
        check_resource_name(&resource).map_err(|reason| ManagerError::InvalidResourceName {
            name: resource.clone(),
            reason,
        })?;
        let endpoint = &request.endpoint;
        if endpoint.is_empty()
            || endpoint.contains('/')
            || endpoint == KUBELET_SOCKET
            || endpoint == "."
            || endpoint == ".."
        {
            return Err(ManagerError::InvalidEndpoint {
                endpoint: endpoint.clone(),
            });
        }
        let socket = self.inner.config.plugin_dir.join(endpoint);
        let connect_err = |source| ManagerError::Connect {
            resource: resource.clone(),
            source,
        };
        let dial = async {
            let channel = uds::connect(&socket).await.map_err(connect_err)?;
            let mut client = DevicePluginClient::new(channel);
            let stream = client
                .list_and_watch(api::Empty {})
                .await
                .map_err(|status| ManagerError::Plugin {
                    resource: resource.clone(),
                    call: "ListAndWatch",
                    status,
                })?
                .into_inner();
            Ok::<_, ManagerError>((client, stream))
        };
        let (client, stream) = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ManagerError::Misbehaved {
                    resource,
                    call: "connect and ListAndWatch",
                    problem: format!("no answer within {CONNECT_TIMEOUT:?}"),
                })
            }
        };
        let options = request.options.unwrap_or_default();
        let generation = 1 + self
            .inner
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Publish the registration before the watcher can report lists under it.
        self.inner.state.send_modify(|s| {
            let previous = s.resources.get(&resource);
            let state = ResourceState {
                endpoint: socket.clone(),
                pre_start_required: options.pre_start_required,
                preferred_allocation: options.get_preferred_allocation_available,
                devices: previous.map(|p| p.devices.clone()).unwrap_or_default(),
                connected: true,
                registrations: previous.map_or(0, |p| p.registrations) + 1,
                lists: 0,
                generation,
            };
            s.resources.insert(resource.clone(), state);
        });
        let watcher = tokio::spawn(follow(
            self.inner.state.clone(),
            resource.clone(),
            generation,
            stream,
            self.inner.config.grace_period,
        ))
        .abort_handle();
        let old =
            lock(&self.inner.endpoints).insert(resource.clone(), Endpoint { client, watcher });
        if let Some(old) = old {
            old.watcher.abort();
        }
        tracing::info!(%resource, endpoint = %socket.display(), generation, "plugin registered");
        Ok(())
    }

    /// The devices of `resource` held by any container.
    pub fn allocated(&self, resource: &str) -> BTreeSet<String> {
        lock(&self.inner.allocations)
            .iter()
            .filter(|e| e.resource == resource)
            .flat_map(|e| e.device_ids.iter().cloned())
            .collect()
    }

    /// Every allocation (as checkpointed).
    pub fn allocations(&self) -> Vec<Entry> {
        lock(&self.inner.allocations).clone()
    }

    /// Gives `count` devices of `resource` to a pod's container: the same ones again if it
    /// already holds some (also after a restart, from the checkpoint), else free healthy
    /// devices, chosen by the plugin's GetPreferredAllocation when it offers one, then
    /// Allocate. The allocation is checkpointed before it is returned.
    pub async fn allocate(
        &self,
        pod_uid: &str,
        container: &str,
        resource: &str,
        count: usize,
    ) -> Result<ContainerAllocation, ManagerError> {
        let _serialised = self.inner.allocating.lock().await;
        let existing = lock(&self.inner.allocations)
            .iter()
            .find(|e| e.pod_uid == pod_uid && e.container == container && e.resource == resource)
            .map(|e| ContainerAllocation {
                device_ids: e.device_ids.clone(),
                response: e.response.clone(),
            });
        if let Some(existing) = existing {
            return Ok(existing);
        }
        let no_plugin = || ManagerError::NoPlugin {
            resource: resource.to_string(),
        };
        let state = self
            .resource(resource)
            .filter(|s| s.connected)
            .ok_or_else(no_plugin)?;
        let mut client = self.client(resource).ok_or_else(no_plugin)?;
        let taken = self.allocated(resource);
        let free: Vec<String> = state
            .devices
            .iter()
            .filter(|d| d.healthy && !taken.contains(&d.id))
            .map(|d| d.id.clone())
            .collect();
        if free.len() < count {
            return Err(ManagerError::Insufficient {
                resource: resource.to_string(),
                requested: count,
                free: free.len(),
            });
        }
        let plugin_err = |call| {
            move |status| ManagerError::Plugin {
                resource: resource.to_string(),
                call,
                status,
            }
        };
        let mut ids: Vec<String> = free[..count].to_vec();
        if state.preferred_allocation {
            let request = api::PreferredAllocationRequest {
                container_requests: vec![api::ContainerPreferredAllocationRequest {
                    available_device_i_ds: free.clone(),
                    must_include_device_i_ds: Vec::new(),
                    allocation_size: i32::try_from(count).unwrap_or(i32::MAX),
                }],
            };
            let answer = client
                .get_preferred_allocation(request)
                .await
                .map_err(plugin_err("GetPreferredAllocation"))?
                .into_inner();
            let preferred = answer
                .container_responses
                .into_iter()
                .next()
                .map(|r| r.device_i_ds)
                .unwrap_or_default();
            let distinct: BTreeSet<&String> = preferred.iter().collect();
            if preferred.len() == count
                && distinct.len() == count
                && preferred.iter().all(|id| free.contains(id))
            {
                ids = preferred;
            } else {
                tracing::warn!(%resource, ?preferred, "unusable preferred allocation; choosing in list order");
            }
        }
        let answer = client
            .allocate(api::AllocateRequest {
                container_requests: vec![api::ContainerAllocateRequest {
                    devices_ids: ids.clone(),
                }],
            })
            .await
            .map_err(plugin_err("Allocate"))?
            .into_inner();
        let mut responses = answer.container_responses;
        if responses.len() != 1 {
            return Err(ManagerError::Misbehaved {
                resource: resource.to_string(),
                call: "Allocate",
                problem: format!("{} container responses for 1 request", responses.len()),
            });
        }
        let response = responses.remove(0);
        let entry = Entry {
            pod_uid: pod_uid.to_string(),
            container: container.to_string(),
            resource: resource.to_string(),
            device_ids: ids.clone(),
            response: response.clone(),
        };
        self.update_allocations(|all| all.push(entry))?;
        Ok(ContainerAllocation {
            device_ids: ids,
            response,
        })
    }

    /// Calls PreStartContainer for a container's devices of `resource` when the plugin asked
    /// for it; returns whether it was called.
    pub async fn pre_start(
        &self,
        pod_uid: &str,
        container: &str,
        resource: &str,
    ) -> Result<bool, ManagerError> {
        let Some(state) = self.resource(resource) else {
            return Ok(false);
        };
        if !state.pre_start_required {
            return Ok(false);
        }
        let ids: Vec<String> = lock(&self.inner.allocations)
            .iter()
            .filter(|e| e.pod_uid == pod_uid && e.container == container && e.resource == resource)
            .flat_map(|e| e.device_ids.iter().cloned())
            .collect();
        let mut client = self
            .client(resource)
            .ok_or_else(|| ManagerError::NoPlugin {
                resource: resource.to_string(),
            })?;
        client
            .pre_start_container(api::PreStartContainerRequest { devices_ids: ids })
            .await
            .map_err(|status| ManagerError::Plugin {
                resource: resource.to_string(),
                call: "PreStartContainer",
                status,
            })?;
        Ok(true)
    }

    /// Frees every device a pod holds; returns how many allocations went.
    pub async fn remove_pod(&self, pod_uid: &str) -> Result<usize, ManagerError> {
        let _serialised = self.inner.allocating.lock().await;
        let mut removed = 0;
        self.update_allocations(|all| {
            let before = all.len();
            all.retain(|e| e.pod_uid != pod_uid);
            removed = before - all.len();
        })?;
        Ok(removed)
    }

    /// Applies `change` to the allocations and checkpoints them; on a failed write the
    /// change is undone.
    fn update_allocations(&self, change: impl FnOnce(&mut Vec<Entry>)) -> Result<(), ManagerError> {
        let mut all = lock(&self.inner.allocations);
        let mut next = all.clone();
        change(&mut next);
        checkpoint::save(&self.inner.config.checkpoint, &next)?;
        *all = next;
        Ok(())
    }

    /// Serves the Registration service on kubelet.sock.
    pub fn serve(&self) -> Result<registration::KubeletServer, ManagerError> {
        registration::KubeletServer::start(self.clone())
    }

    /// Forgets every plugin (ends their streams); allocations stay checkpointed.
    pub fn disconnect_all(&self) {
        for (_, endpoint) in lock(&self.inner.endpoints).drain() {
            endpoint.watcher.abort();
        }
    }

    /// The plugin directory.
    pub fn plugin_dir(&self) -> &Path {
        &self.inner.config.plugin_dir
    }
}

/// Follows one plugin's ListAndWatch stream; when it ends, the resource is disconnected
/// and, if nothing registered it again within `grace`, its devices are dropped.
async fn follow(
    state: Arc<watch::Sender<Snapshot>>,
    resource: String,
    generation: u64,
    mut stream: tonic::Streaming<api::ListAndWatchResponse>,
    grace: Duration,
) {
    loop {
        match stream.message().await {
            Ok(Some(list)) => {
                let devices: Vec<DeviceState> = list
                    .devices
                    .into_iter()
                    .map(|d| DeviceState {
                        healthy: d.health == crate::plugin::resource::HEALTHY,
                        numa: d
                            .topology
                            .map(|t| t.nodes.iter().map(|n| n.id).collect())
                            .unwrap_or_default(),
                        id: d.id,
                    })
                    .collect();
                state.send_if_modified(|s| match current(s, &resource, generation) {
                    Some(r) => {
                        r.devices = devices;
                        r.lists += 1;
                        true
                    }
                    _ => false,
                });
            }
            Ok(None) => break,
            Err(status) => {
                tracing::warn!(%resource, %status, "ListAndWatch failed");
                break;
            }
        }
    }
    tracing::info!(%resource, grace = ?grace, "plugin stream ended");
    state.send_if_modified(|s| match current(s, &resource, generation) {
        Some(r) => {
            r.connected = false;
            true
        }
        None => false,
    });
    tokio::time::sleep(grace).await;
    state.send_if_modified(|s| match current(s, &resource, generation) {
        Some(r) if !r.connected => {
            r.devices.clear();
            true
        }
        _ => false,
    });
}

/// The state of `resource` if it still belongs to registration `generation`.
fn current<'a>(
    s: &'a mut Snapshot,
    resource: &str,
    generation: u64,
) -> Option<&'a mut ResourceState> {
    s.resources
        .get_mut(resource)
        .filter(|r| r.generation == generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::deviceplugin::v1beta1::registration_client::RegistrationClient;

    fn request(version: &str, endpoint: &str, resource: &str) -> api::RegisterRequest {
        api::RegisterRequest {
            version: version.into(),
            endpoint: endpoint.into(),
            resource_name: resource.into(),
            options: None,
        }
    }

    #[tokio::test]
    async fn registrations_are_validated_before_connecting_back() {
        let dir = tempfile::tempdir().unwrap();
        let manager = DeviceManager::new(ManagerConfig::new(dir.path())).unwrap();
        let server = manager.serve().unwrap();
        let channel = uds::connect(server.socket()).await.unwrap();
        let mut client = RegistrationClient::new(channel);
        let cases = [
            (
                request("v1alpha1", "p.sock", "a.io/b"),
                tonic::Code::InvalidArgument,
                "v1alpha1",
            ),
            (
                request(API_VERSION, "p.sock", "gpu"),
                tonic::Code::InvalidArgument,
                "gpu",
            ),
            (
                request(API_VERSION, "../p.sock", "a.io/b"),
                tonic::Code::InvalidArgument,
                "../p.sock",
            ),
            (
                request(API_VERSION, KUBELET_SOCKET, "a.io/b"),
                tonic::Code::InvalidArgument,
                KUBELET_SOCKET,
            ),
            (
                request(API_VERSION, "absent.sock", "a.io/b"),
                tonic::Code::Unavailable,
                "absent.sock",
            ),
        ];
        for (req, code, named) in cases {
            let status = client.register(req).await.unwrap_err();
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(named), "{status:?}");
        }
        assert!(manager.snapshot().resources.is_empty());
        server.stop().await;
        assert!(
            !manager.kubelet_socket().exists(),
            "stop removes kubelet.sock"
        );
    }

    #[test]
    fn allocatable_counts_healthy_devices_of_a_connected_plugin_only() {
        let device = |id: &str, healthy| DeviceState {
            id: id.into(),
            healthy,
            numa: vec![],
        };
        let mut r = ResourceState {
            endpoint: PathBuf::from("/x"),
            pre_start_required: false,
            preferred_allocation: false,
            devices: vec![device("a", true), device("b", false), device("c", true)],
            connected: true,
            registrations: 1,
            lists: 1,
            generation: 1,
        };
        assert_eq!((r.capacity(), r.allocatable()), (3, 2));
        r.connected = false;
        assert_eq!((r.capacity(), r.allocatable()), (3, 0));
    }
}
