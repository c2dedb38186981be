//! The lab's test images, built from the host's busybox-static: one gzipped layer (the
//! busybox binary, its applets as symlinks, `/etc/passwd`, `/etc/group`, a web root), and
//! OCI image configs and manifests over it. Pure functions over bytes.

use std::io::Write;

use sha2::Digest;

/// The busybox applets linked into the layer's `/bin`.
const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "ls", "httpd", "nc", "wget", "hostname", "id", "true", "false",
    "kill", "ps", "env", "pwd", "mkdir", "touch", "trap", "tty", "stty", "unshare",
];

/// What the web root serves (`/www/index.html`).
const INDEX_HTML: &str = "hello from nk\n";

/// A gzipped layer tarball with its digests.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The gzipped tar.
    pub gzip: Vec<u8>,
    /// `sha256:` of the uncompressed tar (the image config's diff ID).
    pub diff_id: String,
}

/// The layer: directories, `bin/busybox` (read from `busybox`, the host's static binary),
/// applet symlinks, users and groups, and `www/index.html`.
pub fn busybox_layer(busybox: &[u8]) -> std::io::Result<Layer> {
    let mut tar = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o755),
        ("sys", 0o755),
        ("dev", 0o755),
        ("root", 0o700),
        ("www", 0o755),
    ] {
        tar.append_data(
            &mut header(tar::EntryType::Directory, mode, 0),
            dir,
            &[][..],
        )?;
    }
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, busybox.len() as u64),
        "bin/busybox",
        busybox,
    )?;
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    for (path, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("www/index.html", INDEX_HTML),
    ] {
        tar.append_data(
            &mut header(tar::EntryType::Regular, 0o644, text.len() as u64),
            path,
            text.as_bytes(),
        )?;
    }
    let raw = tar.into_inner()?;
    let diff_id = digest(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw)?;
    Ok(Layer {
        gzip: gz.finish()?,
        diff_id,
    })
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// An OCI image config over `layer`: `PATH=/bin`, the given entrypoint and command, and
/// labels (which also make images over the same layer distinct).
pub fn config(
    layer: &Layer,
    entrypoint: &[&str],
    cmd: &[&str],
    labels: &[(&str, &str)],
) -> Vec<u8> {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let mut image = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/", "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    });
    if !entrypoint.is_empty() {
        image["config"]["Entrypoint"] = serde_json::json!(entrypoint);
    }
    image.to_string().into_bytes()
}

/// The OCI image manifest of `config` and `layer`.
pub fn manifest(config: &[u8], layer: &Layer) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest(&layer.gzip),
            "size": layer.gzip.len(),
        }],
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_holds_busybox_its_applets_and_the_web_root() {
        let layer = busybox_layer(b"#!fake busybox").expect("layer");
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&layer.gzip[..]), &mut raw)
            .expect("gunzip");
        assert_eq!(layer.diff_id, digest(&raw));
        let mut archive = tar::Archive::new(&raw[..]);
        let names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        for wanted in ["bin/busybox", "bin/sh", "bin/wget", "www/index.html", "tmp"] {
            assert!(
                names.iter().any(|n| n.trim_end_matches('/') == wanted),
                "{wanted} in {names:?}"
            );
        }
    }

    #[test]
    fn the_manifest_names_config_and_layer_by_digest_and_size() {
        let layer = busybox_layer(b"x").expect("layer");
        let config = config(&layer, &[], &["sh"], &[("purpose", "spare")]);
        let parsed: serde_json::Value =
            serde_json::from_slice(&manifest(&config, &layer)).expect("json");
        assert_eq!(parsed["config"]["digest"], digest(&config));
        assert_eq!(parsed["config"]["size"], config.len());
        assert_eq!(parsed["layers"][0]["digest"], digest(&layer.gzip));
        let c: serde_json::Value = serde_json::from_slice(&config).expect("config json");
        assert_eq!(c["rootfs"]["diff_ids"][0], layer.diff_id);
        assert_eq!(c["config"]["Labels"]["purpose"], "spare");
    }
}
