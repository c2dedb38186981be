//! The OCI side: runtime specs built from CRI requests, and container users.

pub mod sandbox;
pub mod spec;
pub mod user;
