//! One advertised resource: its inventory, the device list it publishes (re-published on
//! every health change, driven by inotify), and the answers to GetPreferredAllocation,
//! Allocate and PreStartContainer. Everything here is transport-free; `service` puts it on
//! gRPC.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use nodekit_proto::deviceplugin::v1beta1 as api;
use tokio::sync::watch;

use crate::cdi::{self, CdiError};
use crate::config::ResourceConfig;
use crate::discovery::{Device, DeviceNode, DiscoveryError, Inventory, Source};
use crate::preferred::{self, Candidate};
use crate::template::{Context, Template};
use crate::watch::{DirWatcher, WatchError};

/// The kubelet's health strings.
pub const HEALTHY: &str = "Healthy";
/// See [`HEALTHY`].
pub const UNHEALTHY: &str = "Unhealthy";

/// A resource could not be set up or refreshed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// Discovery failed.
    #[error("resource {resource}: {source}")]
    Discovery {
        /// The resource name.
        resource: String,
        /// The failure.
        #[source]
        source: DiscoveryError,
    },
    /// The CDI spec could not be written.
    #[error("resource {resource}: {source}")]
    Cdi {
        /// The resource name.
        resource: String,
        /// The failure.
        #[source]
        source: CdiError,
    },
    /// The health watch could not be set up.
    #[error("resource {resource}: {source}")]
    Watch {
        /// The resource name.
        resource: String,
        /// The failure.
        #[source]
        source: WatchError,
    },
}

/// A request the plugin refuses; maps onto a gRPC status naming the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The device ID is not one of this resource's.
    #[error("unknown device ID {id:?} for resource {resource}")]
    UnknownDevice {
        /// The ID.
        id: String,
        /// The resource.
        resource: String,
    },
    /// The device is unhealthy now.
    #[error("device {id:?} of resource {resource} is unhealthy")]
    Unhealthy {
        /// The ID.
        id: String,
        /// The resource.
        resource: String,
    },
    /// A container request lists no device.
    #[error("container request {index} lists no device IDs")]
    NoDevices {
        /// Index of the container request.
        index: usize,
    },
    /// A preferred allocation size below zero.
    #[error("allocation size {size} is negative")]
    NegativeSize {
        /// The size given.
        size: i32,
    },
}

impl From<RequestError> for tonic::Status {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Unhealthy { .. } => tonic::Status::failed_precondition(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

/// The current device list, shared with every ListAndWatch stream.
pub type DeviceList = Arc<Vec<Device>>;

/// One resource being advertised.
#[derive(Debug)]
pub struct ResourcePlugin {
    config: ResourceConfig,
    cdi_dir: PathBuf,
    env: Vec<(String, Template)>,
    annotations: Vec<(String, Template)>,
    inventory: Mutex<Inventory>,
    devices: watch::Sender<DeviceList>,
}

impl ResourcePlugin {
    /// Discovers the resource's devices and writes its CDI spec when configured.
    pub fn new(config: ResourceConfig, cdi_dir: PathBuf) -> Result<Arc<Self>, ResourceError> {
        let inventory = Inventory::new(Source::of(&config), config.replicas).map_err(|source| {
            ResourceError::Discovery {
                resource: config.name.clone(),
                source,
            }
        })?;
        let devices = watch::Sender::new(Arc::new(inventory.devices()));
        let plugin = Arc::new(Self {
            env: config.env_templates(),
            annotations: config.annotation_templates(),
            config,
            cdi_dir,
            inventory: Mutex::new(inventory),
            devices,
        });
        plugin.write_cdi_spec()?;
        Ok(plugin)
    }

    /// The extended resource name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &ResourceConfig {
        &self.config
    }

    /// The options sent with Register and GetDevicePluginOptions.
    pub fn options(&self) -> api::DevicePluginOptions {
        api::DevicePluginOptions {
            pre_start_required: self.config.pre_start_required,
            get_preferred_allocation_available: true,
        }
    }

    /// The current device list and every later one.
    pub fn subscribe(&self) -> watch::Receiver<DeviceList> {
        self.devices.subscribe()
    }

    /// The current device list.
    pub fn devices(&self) -> DeviceList {
        self.devices.borrow().clone()
    }

    fn inventory(&self) -> MutexGuard<'_, Inventory> {
        // A panic while holding the lock leaves a consistent inventory: keep using it.
        self.inventory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rescans and re-evaluates health; publishes the list (and rewrites the CDI spec when
    /// devices were added) if anything changed. Returns whether it did.
    pub fn refresh(&self) -> Result<bool, ResourceError> {
        let (added, devices) = {
            let mut inventory = self.inventory();
            let added = inventory
                .rescan()
                .map_err(|source| ResourceError::Discovery {
                    resource: self.config.name.clone(),
                    source,
                })?;
            (added, inventory.devices())
        };
        let changed = self.devices.send_if_modified(|current| {
            if **current == devices {
                return false;
            }
            *current = Arc::new(devices);
            true
        });
        if added {
            self.write_cdi_spec()?;
        }
        Ok(changed)
    }

    /// Watches the device directories and refreshes on every change; returns only when the
    /// watch itself fails (a failed rescan is logged and retried at the next change).
    pub async fn watch_health(self: Arc<Self>) -> Result<(), ResourceError> {
        let dirs = self.inventory().source().watch_dirs();
        let watch_err = |source| ResourceError::Watch {
            resource: self.config.name.clone(),
            source,
        };
        let mut watcher = DirWatcher::new(dirs).map_err(watch_err)?;
        loop {
            // The first pass catches what changed between discovery and the watch.
            match self.refresh() {
                Ok(true) => tracing::info!(
                    resource = %self.config.name,
                    healthy = self.devices().iter().filter(|d| d.healthy).count(),
                    "device list changed"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "rescan failed"),
            }
            watcher.next().await.map_err(watch_err)?;
        }
    }

    fn write_cdi_spec(&self) -> Result<(), ResourceError> {
        if !self.config.cdi {
            return Ok(());
        }
        let spec = cdi::build_spec(
            &self.config.name,
            &self.devices(),
            &self.shared_nodes(),
            &self.config.permissions,
        );
        cdi::write_spec(&self.cdi_dir, &spec).map_err(|source| ResourceError::Cdi {
            resource: self.config.name.clone(),
            source,
        })?;
        Ok(())
    }

    fn shared_nodes(&self) -> Vec<DeviceNode> {
        self.inventory().source().shared_nodes()
    }

    /// Looks up `ids`, all of which must exist (and be healthy when `healthy` is set).
    fn lookup<'a>(
        &self,
        devices: &'a [Device],
        ids: &[String],
        healthy: bool,
    ) -> Result<Vec<&'a Device>, RequestError> {
        ids.iter()
            .map(|id| {
                let device = devices.iter().find(|d| d.id == *id).ok_or_else(|| {
                    RequestError::UnknownDevice {
                        id: id.clone(),
                        resource: self.config.name.clone(),
                    }
                })?;
                if healthy && !device.healthy {
                    return Err(RequestError::Unhealthy {
                        id: id.clone(),
                        resource: self.config.name.clone(),
                    });
                }
                Ok(device)
            })
            .collect()
    }

    /// Answers GetPreferredAllocation (see [`preferred`]).
    pub fn preferred_allocation(
        &self,
        request: &api::PreferredAllocationRequest,
    ) -> Result<api::PreferredAllocationResponse, RequestError> {
        let devices = self.devices();
        let candidates = |ids: &[String]| -> Result<Vec<Candidate<'_>>, RequestError> {
            Ok(self
                .lookup(&devices, ids, false)?
                .into_iter()
                .map(|d| Candidate {
                    id: &d.id,
                    physical: &d.physical,
                    numa: d.numa,
                })
                .collect())
        };
        let mut container_responses = Vec::new();
        for req in &request.container_requests {
            let size =
                usize::try_from(req.allocation_size).map_err(|_| RequestError::NegativeSize {
                    size: req.allocation_size,
                })?;
            let available = candidates(&req.available_device_i_ds)?;
            let must = candidates(&req.must_include_device_i_ds)?;
            container_responses.push(api::ContainerPreferredAllocationResponse {
                device_i_ds: preferred::choose(
                    &available,
                    &must,
                    size,
                    self.config.allocation_policy,
                ),
            });
        }
        Ok(api::PreferredAllocationResponse {
            container_responses,
        })
    }

    /// Answers Allocate: every ID must be known and healthy; the whole request is checked
    /// before any response is built.
    pub fn allocate(
        &self,
        request: &api::AllocateRequest,
    ) -> Result<api::AllocateResponse, RequestError> {
        let devices = self.devices();
        let mut chosen = Vec::new();
        for (index, req) in request.container_requests.iter().enumerate() {
            if req.devices_ids.is_empty() {
                return Err(RequestError::NoDevices { index });
            }
            chosen.push(self.lookup(&devices, &req.devices_ids, true)?);
        }
        let shared: Vec<DeviceNode> = self
            .shared_nodes()
            .into_iter()
            .filter(DeviceNode::exists)
            .collect();
        Ok(api::AllocateResponse {
            container_responses: chosen
                .iter()
                .map(|devices| self.container_response(devices, &shared))
                .collect(),
        })
    }

    fn container_response(
        &self,
        devices: &[&Device],
        shared: &[DeviceNode],
    ) -> api::ContainerAllocateResponse {
        let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
        // Replicas share nodes: each node once, in request order.
        let mut seen = BTreeSet::new();
        let nodes: Vec<&DeviceNode> = devices
            .iter()
            .flat_map(|d| d.nodes.iter())
            .filter(|n| seen.insert(n.host_path.clone()))
            .collect();
        let paths: Vec<String> = nodes
            .iter()
            .map(|n| n.container_path.display().to_string())
            .collect();
        let ctx = Context {
            ids: &ids,
            paths: &paths,
            resource: &self.config.name,
        };
        let render = |templates: &[(String, Template)]| -> HashMap<String, String> {
            templates
                .iter()
                .map(|(k, t)| (k.clone(), t.render(&ctx)))
                .collect()
        };
        let spec = |n: &DeviceNode| api::DeviceSpec {
            container_path: n.container_path.display().to_string(),
            host_path: n.host_path.display().to_string(),
            permissions: self.config.permissions.clone(),
        };
        api::ContainerAllocateResponse {
            envs: render(&self.env),
            mounts: self
                .config
                .mounts
                .iter()
                .map(|m| api::Mount {
                    container_path: m.container_path.display().to_string(),
                    host_path: m.host_path.display().to_string(),
                    read_only: m.read_only,
                })
                .collect(),
            devices: nodes
                .iter()
                .copied()
                .chain(shared.iter().filter(|s| !seen.contains(&s.host_path)))
                .map(spec)
                .collect(),
            annotations: render(&self.annotations),
            cdi_devices: if self.config.cdi {
                ids.iter()
                    .map(|id| api::CdiDevice {
                        name: cdi::qualified_name(&self.config.name, id),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Answers PreStartContainer: the devices must be known and healthy.
    pub fn pre_start(&self, request: &api::PreStartContainerRequest) -> Result<(), RequestError> {
        self.lookup(&self.devices(), &request.devices_ids, true)
            .map(|_| ())
    }
}

/// The device list as ListAndWatch sends it.
pub fn list_response(devices: &[Device]) -> api::ListAndWatchResponse {
    api::ListAndWatchResponse {
        devices: devices
            .iter()
            .map(|d| api::Device {
                id: d.id.clone(),
                health: if d.healthy { HEALTHY } else { UNHEALTHY }.to_string(),
                topology: d.numa.map(|n| api::TopologyInfo {
                    nodes: vec![api::NumaNode { id: i64::from(n) }],
                }),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn plugin(dir: &Path, extra: &str) -> Arc<ResourcePlugin> {
        for n in ["lab0", "lab1"] {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        let text = format!(
            "cdiDir: {d}/cdi\nresources:\n  - name: nodekit.io/lab\n    devices: [\"{d}/lab*\"]\n{extra}",
            d = dir.display()
        );
        let c = config::parse(&text, Path::new("t.yaml")).unwrap();
        ResourcePlugin::new(c.resources[0].clone(), c.cdi_dir.clone()).unwrap()
    }

    fn alloc(ids: &[&[&str]]) -> api::AllocateRequest {
        api::AllocateRequest {
            container_requests: ids
                .iter()
                .map(|c| api::ContainerAllocateRequest {
                    devices_ids: c.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn allocate_returns_device_specs_env_mounts_annotations_and_cdi_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = plugin(
            d,
            "    replicas: 2\n    permissions: rwm\n    env: {LAB: \"{ids}\", N: \"{count}\"}\n    annotations: {a/b: \"{paths}\"}\n    mounts: [{hostPath: /etc/hostname, containerPath: /etc/lab, readOnly: true}]\n    cdi: true\n",
        );
        let resp = p
            .allocate(&alloc(&[&["lab0::0", "lab0::1"], &["lab1::1"]]))
            .unwrap();
        assert_eq!(resp.container_responses.len(), 2);
        let first = &resp.container_responses[0];
        let lab0 = d.join("lab0").display().to_string();
        assert_eq!(
            first.devices,
            vec![api::DeviceSpec {
                container_path: lab0.clone(),
                host_path: lab0.clone(),
                permissions: "rwm".into()
            }]
        );
        assert_eq!(first.envs["LAB"], "lab0::0,lab0::1");
        assert_eq!(first.envs["N"], "2");
        assert_eq!(first.annotations["a/b"], lab0);
        assert_eq!(first.mounts[0].container_path, "/etc/lab");
        assert!(first.mounts[0].read_only);
        let cdi: Vec<_> = first.cdi_devices.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(cdi, ["nodekit.io/lab=lab0::0", "nodekit.io/lab=lab0::1"]);
        assert_eq!(resp.container_responses[1].envs["LAB"], "lab1::1");
        assert!(cdi::spec_path(&d.join("cdi"), "nodekit.io/lab").is_file());
    }

    #[test]
    fn unknown_ids_are_invalid_and_unhealthy_ones_a_failed_precondition_naming_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = plugin(dir.path(), "");
        let e = p.allocate(&alloc(&[&["lab0"], &["nope"]])).unwrap_err();
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("\"nope\""), "{status:?}");
        std::fs::remove_file(dir.path().join("lab1")).unwrap();
        assert!(p.refresh().unwrap());
        assert!(!p.refresh().unwrap(), "nothing changed the second time");
        let status = tonic::Status::from(p.allocate(&alloc(&[&["lab1"]])).unwrap_err());
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("\"lab1\""), "{status:?}");
        let status = tonic::Status::from(p.allocate(&alloc(&[&[]])).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let list = list_response(&p.devices());
        let health: Vec<_> = list.devices.iter().map(|d| d.health.as_str()).collect();
        assert_eq!(health, [HEALTHY, UNHEALTHY]);
    }

    #[test]
    fn preferred_allocation_packs_replicas_per_container_request() {
        let dir = tempfile::tempdir().unwrap();
        let p = plugin(dir.path(), "    replicas: 3\n");
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let req = api::PreferredAllocationRequest {
            container_requests: vec![api::ContainerPreferredAllocationRequest {
                available_device_i_ds: ids(&["lab0::0", "lab1::0", "lab1::1", "lab1::2"]),
                must_include_device_i_ds: vec![],
                allocation_size: 2,
            }],
        };
        let resp = p.preferred_allocation(&req).unwrap();
        assert_eq!(
            resp.container_responses[0].device_i_ds,
            ids(&["lab1::0", "lab1::1"])
        );
        let mut bad = req.clone();
        bad.container_requests[0].allocation_size = -1;
        assert_eq!(
            p.preferred_allocation(&bad).unwrap_err(),
            RequestError::NegativeSize { size: -1 }
        );
    }
}
