//! `nodekit-ipam`: the IPAM plugin, run by a CNI plugin (ours or the reference `bridge`).

fn main() -> std::process::ExitCode {
    nodekit_cni::skel::plugin_main(&nodekit_cni::ipam::plugin::IpamPlugin)
}
