//! The OCI side: runtime specs built from CRI requests, their seccomp filters, and
//! container users.

pub mod sandbox;
pub mod seccomp;
pub mod spec;
pub mod user;
