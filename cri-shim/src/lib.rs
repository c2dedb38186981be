//! `nodekit-cri`: a CRI v1 runtime and image service. Pods are sandboxes (a network namespace
//! wired by CNI plus a pause process holding the IPC/UTS/PID namespaces), containers are run
//! by an OCI runtime (runc or crun) under a per-container monitor that writes CRI logs and
//! records the exit status, images are pulled from OCI registries into a content-addressed
//! store and mounted with overlayfs. All state lives in files so a restarted shim carries on.

pub mod attach_socket;
pub mod cgroups;
pub mod cni;
pub mod config;
pub mod error;
pub mod image;
pub mod logs;
pub mod manager;
pub mod monitor;
pub mod oci;
pub mod pause;
pub mod process;
pub mod runtime;
pub mod server;
pub mod service;
pub mod store;
pub mod streaming;
