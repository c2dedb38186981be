//! `nodekit`: the CNI plugin (bridge and routed modes), run by a container runtime.

fn main() -> std::process::ExitCode {
    nodekit_cni::skel::plugin_main(&nodekit_cni::plugin::NodekitPlugin)
}
