//! nodekit's CNI side: the spec types ([`spec`]), the plugin skeleton ([`skel`]), the IPAM
//! ([`ipam`]) behind `nodekit-ipam` and `nodekitctl`, and the `nodekit` plugin ([`plugin`]).

pub mod ipam;
pub mod skel;
pub mod spec;
pub mod netlink;
pub mod delegate;
pub mod plugin;
