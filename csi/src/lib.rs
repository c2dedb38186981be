//! nodekit's CSI driver: local volumes as sparse image files in a pool directory, attached
//! to loop devices through the kernel's ioctls, formatted ext4 or xfs, mounted with mount(2);
//! snapshots by reflink (or a sparse copy); online expansion.
//!
//! Layers: [`controller`], [`node`] and [`identity`] are the gRPC services (argument checks
//! with the spec's codes, in-flight claims); [`provision`] and [`stage`] are their blocking
//! operations on the shared [`driver::Driver`]; [`loopdev`], [`mounter`], [`fstools`] and
//! [`image`] talk to the kernel and the tools behind narrow traits; [`state`] keeps the
//! crash-safe records and [`reconcile`] makes the kernel match them at start.

pub mod capability;
pub mod controller;
pub mod driver;
pub mod error;
pub mod fstools;
pub mod identity;
pub mod ids;
pub mod image;
pub mod inflight;
pub mod loopdev;
pub mod mounter;
pub mod mountinfo;
pub mod node;
pub mod paging;
pub mod paths;
pub mod provision;
pub mod reconcile;
pub mod rpc;
pub mod server;
pub mod stage;
pub mod state;
mod sys;
