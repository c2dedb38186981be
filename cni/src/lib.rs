//! nodekit's CNI side: the spec types ([`spec`]), the plugin skeleton ([`skel`]), the IPAM
//! ([`ipam`]) behind `nodekit-ipam` and `nodekitctl`, and the `nodekit` plugin ([`plugin`]).

pub mod ctl;
pub mod delegate;
pub mod ipam;
pub mod netd;
pub mod netlink;
pub mod plugin;
pub mod skel;
pub mod spec;
