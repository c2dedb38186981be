//! nodekit CNI
