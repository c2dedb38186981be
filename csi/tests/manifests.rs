//! Parses every manifest in `deploy/csi/` and checks they agree with each other and with the
//! driver: the driver name everywhere, flags the binary knows, the socket path shared by the
//! driver, the sidecars and the kubelet registration, the kubelet directory mounted with
//! Bidirectional propagation, the distributed provisioner's flags, and RBAC for the
//! DaemonSet's service account.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use nodekit_csi::driver::{DEFAULT_DRIVER_NAME, DEFAULT_KUBELET_ROOT};
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/csi")
}

/// Every document of every YAML file, as JSON values keyed by "Kind/name".
fn documents() -> HashMap<String, Value> {
    let mut docs = HashMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/csi exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/csi");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let kind = value["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a document without kind", file.display()));
            let name = value["metadata"]["name"].as_str().expect("metadata.name");
            assert!(
                value["apiVersion"].is_string(),
                "{kind}/{name} has no apiVersion"
            );
            let key = format!("{kind}/{name}");
            assert!(
                docs.insert(key.clone(), value).is_none(),
                "{key} is defined twice"
            );
        }
    }
    docs
}

fn doc<'a>(docs: &'a HashMap<String, Value>, key: &str) -> &'a Value {
    docs.get(key)
        .unwrap_or_else(|| panic!("no {key} in deploy/csi: have {:?}", docs.keys()))
}

fn container<'a>(ds: &'a Value, name: &str) -> &'a Value {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("the DaemonSet has no container {name}"))
}

/// `--flag=value` arguments of a container, with `$(VAR)` replaced from its plain env values.
fn args(c: &Value) -> HashMap<String, String> {
    let env: HashMap<String, String> = c["env"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|v| {
                    Some((
                        v["name"].as_str()?.to_string(),
                        v["value"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let a = a.as_str().expect("string arg");
            let (k, v) = a.split_once('=').unwrap_or((a, "true"));
            let mut v = v.to_string();
            for (name, value) in &env {
                v = v.replace(&format!("$({name})"), value);
            }
            (k.to_string(), v)
        })
        .collect()
}

/// The container path a volume of the DaemonSet is mounted at in container `c`, and the
/// mount's propagation.
fn mount_of<'a>(c: &'a Value, volume: &str) -> (&'a str, Option<&'a str>) {
    let m = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume)
        .unwrap_or_else(|| panic!("{} does not mount {volume}", c["name"]));
    (
        m["mountPath"].as_str().expect("mountPath"),
        m["mountPropagation"].as_str(),
    )
}

fn host_path<'a>(ds: &'a Value, volume: &str) -> &'a str {
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == volume)
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {volume}"))
}

/// The long flags `nodekit-csi --help` lists.
fn driver_flags() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_nodekit-csi"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.'])
                .split('=')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn the_driver_objects_name_the_driver_and_the_local_volume_policy() {
    let docs = documents();
    let driver = doc(&docs, &format!("CSIDriver/{DEFAULT_DRIVER_NAME}"));
    assert_eq!(driver["spec"]["attachRequired"], false);
    assert_eq!(driver["spec"]["podInfoOnMount"], true);
    assert_eq!(driver["spec"]["storageCapacity"], true);
    assert_eq!(driver["spec"]["fsGroupPolicy"], "File");
    let classes: Vec<&Value> = docs
        .iter()
        .filter(|(k, _)| k.starts_with("StorageClass/"))
        .map(|(_, v)| v)
        .collect();
    assert!(!classes.is_empty());
    for sc in classes {
        assert_eq!(sc["provisioner"], DEFAULT_DRIVER_NAME);
        assert_eq!(sc["volumeBindingMode"], "WaitForFirstConsumer");
        assert_eq!(sc["allowVolumeExpansion"], true);
        for (key, value) in sc["parameters"].as_object().into_iter().flatten() {
            assert!(
                key == "fsType" || key.starts_with("csi.storage.k8s.io/"),
                "parameter {key} would be refused by CreateVolume"
            );
            if key.ends_with("fstype") || key == "fsType" {
                assert!(
                    ["ext4", "xfs"].contains(&value.as_str().unwrap_or_default()),
                    "{value}"
                );
            }
        }
    }
    let snap = doc(&docs, "VolumeSnapshotClass/nodekit-snapshots");
    assert_eq!(snap["driver"], DEFAULT_DRIVER_NAME);
}

#[test]
fn the_daemonset_wires_sockets_paths_and_flags_consistently() {
    let docs = documents();
    let ds = doc(&docs, "DaemonSet/nodekit-csi");
    let driver = container(ds, "nodekit-csi");
    let driver_args = args(driver);
    let known = driver_flags();
    for flag in driver_args.keys() {
        assert!(
            known.contains(flag),
            "nodekit-csi has no flag {flag}: {known:?}"
        );
    }
    assert_eq!(driver_args["--driver-name"], DEFAULT_DRIVER_NAME);
    assert_eq!(driver_args["--mode"], "all");
    assert_eq!(driver_args["--node-id"], "$(NODE_NAME)");
    assert_eq!(driver["securityContext"]["privileged"], true);

    // One socket: the driver listens where every sidecar connects, and the kubelet is told
    // the host path of the same file.
    let endpoint = driver_args["--endpoint"]
        .strip_prefix("unix://")
        .expect("unix endpoint");
    let (socket_dir, _) = mount_of(driver, "socket-dir");
    assert_eq!(Path::new(endpoint).parent(), Some(Path::new(socket_dir)));
    let socket_name = Path::new(endpoint).file_name().expect("socket name");
    for name in [
        "csi-provisioner",
        "csi-resizer",
        "csi-snapshotter",
        "node-driver-registrar",
        "livenessprobe",
    ] {
        let c = container(ds, name);
        let (dir, _) = mount_of(c, "socket-dir");
        assert_eq!(
            Path::new(&args(c)["--csi-address"]),
            Path::new(dir).join(socket_name),
            "{name} connects to the driver's socket"
        );
    }
    let registrar = args(container(ds, "node-driver-registrar"));
    assert_eq!(
        Path::new(&registrar["--kubelet-registration-path"]),
        Path::new(host_path(ds, "socket-dir")).join(socket_name)
    );
    let (registration, _) = mount_of(container(ds, "node-driver-registrar"), "registration-dir");
    assert_eq!(registration, "/registration");
    assert_eq!(
        host_path(ds, "registration-dir"),
        format!("{DEFAULT_KUBELET_ROOT}/plugins_registry")
    );

    // The kubelet directory, at the same path inside, with Bidirectional propagation.
    let (kubelet, propagation) = mount_of(driver, "kubelet-dir");
    assert_eq!(kubelet, driver_args["--kubelet-root"]);
    assert_eq!(kubelet, host_path(ds, "kubelet-dir"));
    assert_eq!(propagation, Some("Bidirectional"));
    let (dev, _) = mount_of(driver, "dev-dir");
    assert_eq!(
        (dev, host_path(ds, "dev-dir")),
        ("/dev", "/dev"),
        "loop devices need the host's /dev"
    );
    let (data, _) = mount_of(driver, "data-dir");
    for dir in ["--state-dir", "--pool-dir"] {
        assert!(
            Path::new(&driver_args[dir]).starts_with(data),
            "{dir} lies on the data hostPath"
        );
    }

    // Distributed provisioning with capacity, distributed snapshots.
    let prov = args(container(ds, "csi-provisioner"));
    assert_eq!(prov["--node-deployment"], "true");
    assert_eq!(prov["--strict-topology"], "true");
    assert_eq!(prov["--enable-capacity"], "true");
    assert_eq!(
        args(container(ds, "csi-snapshotter"))["--node-deployment"],
        "true"
    );
    for name in ["csi-provisioner", "csi-snapshotter"] {
        let env = container(ds, name)["env"].as_array().expect("env");
        assert!(
            env.iter().any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
            "{name} needs NODE_NAME for node deployment"
        );
    }

    // The livenessprobe serves the port the driver container's probe checks.
    let port = args(container(ds, "livenessprobe"))["--health-port"].clone();
    let ports = driver["ports"].as_array().expect("ports");
    let probe_port = &driver["livenessProbe"]["httpGet"]["port"];
    let named = ports
        .iter()
        .find(|p| &p["name"] == probe_port)
        .expect("probe port is a named port");
    assert_eq!(named["containerPort"].to_string(), port);
}

#[test]
fn rbac_binds_the_daemonsets_service_account() {
    let docs = documents();
    let ds = doc(&docs, "DaemonSet/nodekit-csi");
    let sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    let ns = ds["metadata"]["namespace"].as_str().expect("namespace");
    assert_eq!(
        doc(&docs, &format!("ServiceAccount/{sa}"))["metadata"]["namespace"],
        ns
    );
    for binding in ["ClusterRoleBinding/nodekit-csi", "RoleBinding/nodekit-csi"] {
        let b = doc(&docs, binding);
        let subject = &b["subjects"][0];
        assert_eq!(
            (subject["name"].as_str(), subject["namespace"].as_str()),
            (Some(sa), Some(ns)),
            "{binding}"
        );
        let role = format!(
            "{}/{}",
            b["roleRef"]["kind"].as_str().expect("kind"),
            b["roleRef"]["name"].as_str().expect("name")
        );
        doc(&docs, &role);
    }
    let rules = doc(&docs, "ClusterRole/nodekit-csi")["rules"]
        .as_array()
        .expect("rules")
        .clone();
    let allows = |resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r["resources"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|x| x == resource))
                && r["verbs"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(|x| x == verb))
        })
    };
    for (resource, verb) in [
        ("persistentvolumes", "create"),
        ("persistentvolumes", "delete"),
        ("persistentvolumeclaims/status", "patch"),
        ("volumesnapshotcontents", "update"),
        ("volumesnapshotcontents/status", "update"),
        ("storageclasses", "watch"),
        ("csinodes", "get"),
    ] {
        assert!(
            allows(resource, verb),
            "the ClusterRole lacks {verb} on {resource}"
        );
    }
    let role_rules = doc(&docs, "Role/nodekit-csi")["rules"].to_string();
    assert!(
        role_rules.contains("csistoragecapacities"),
        "capacity objects need a Role"
    );
}
