//! The device plugin: [`resource`] (one resource's devices and answers), [`service`] (its
//! gRPC service) and [`daemon`] (a server per resource on its own socket, registration with
//! the kubelet, restarts, signals).

pub mod daemon;
pub mod resource;
pub mod service;

/// The kubelet's registration socket, in the device plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

/// The device plugin API version spoken.
pub const API_VERSION: &str = "v1beta1";

/// Where the kubelet looks for device plugin sockets.
pub const DEFAULT_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";

/// The socket file name of `resource`: `nodekit-` + the name with every character other
/// than letters, digits, `.` and `-` replaced by `-`, + `.sock` (`nodekit-nodekit.io-fuse.sock`).
pub fn socket_name(resource: &str) -> String {
    let sanitized: String = resource
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("nodekit-{sanitized}.sock")
}

#[cfg(test)]
mod tests {
    #[test]
    fn socket_names_are_plain_file_names() {
        assert_eq!(
            super::socket_name("nodekit.io/fuse"),
            "nodekit-nodekit.io-fuse.sock"
        );
        assert_eq!(
            super::socket_name("nvidia.com/gpu_x"),
            "nodekit-nvidia.com-gpu-x.sock"
        );
    }
}
