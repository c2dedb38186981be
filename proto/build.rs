//! Compiles the vendored protos of each enabled feature with protox (pure Rust, no protoc)
//! and generates prost messages plus tonic clients and servers into OUT_DIR.

use std::env;
use std::error::Error;

/// (cargo feature, root proto file under `proto/`)
const PROTOS: &[(&str, &str)] = &[
    ("csi", "csi/v1.12.0/csi.proto"),
    ("cri", "cri/k8s-cri-0.11.0/api.proto"),
    ("deviceplugin", "deviceplugin/v1beta1/api.proto"),
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    for (feature, file) in PROTOS {
        let enabled = env::var_os(format!("CARGO_FEATURE_{}", feature.to_uppercase())).is_some();
        if !enabled {
            continue;
        }
        // protox ships google/protobuf/*.proto, which csi.proto imports.
        let fds = protox::compile([*file], ["proto"])?;
        tonic_prost_build::configure()
            .emit_rerun_if_changed(false)
            .compile_fds(fds)?;
    }
    Ok(())
}
