//! nodekit's device plugin (kubelet deviceplugin v1beta1) and the kubelet side of that
//! contract.
//!
//! The plugin advertises node devices (configured paths and globs, or the built-in NVIDIA
//! discovery) as extended resources, one gRPC server per resource on its own unix socket,
//! watches their health with inotify, and re-registers when the kubelet restarts. The
//! kubelet side ([`kubelet`]) is what a node agent (and the conformance runner) uses to
//! accept registrations, track capacity and allocate devices to containers.

pub mod cdi;
pub mod config;
pub mod discovery;
pub mod kubelet;
pub mod lab;
pub mod plugin;
pub mod preferred;
pub mod template;
pub mod watch;
