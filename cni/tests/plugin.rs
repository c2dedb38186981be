//! The `nodekit` and `nodekit-ipam` binaries run as a runtime runs them, in fresh `nk-`
//! namespaces: wiring in both modes, the protocol's commands, rollback and concurrency.

mod common;

use common::{Node, Pod};
use serde_json::json;

fn pools() -> serde_json::Value {
    json!([{"name": "default", "cidr": "10.244.0.0/16", "blockSize": 26}])
}

fn dual_pools() -> serde_json::Value {
    json!([
        {"name": "default", "cidr": "10.244.0.0/16"},
        {"name": "default-v6", "cidr": "fd00:244::/64"}
    ])
}

#[test]
fn bridge_mode_dual_stack_pods_on_one_node_reach_each_other() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "bridge", dual_pools());
    let (a, b) = (Pod::new(), Pod::new());
    let ra = node.add(&conf, "ctr-a", &a).expect_ok();
    let rb = node.add(&conf, "ctr-b", &b).expect_ok();
    assert_eq!(ra.ips(), vec!["10.244.0.2/26", "fd00:244::2/122"]);
    assert_eq!(rb.ips(), vec!["10.244.0.3/26", "fd00:244::3/122"]);
    // interfaces: bridge, host veth, pod; the IP points at the pod interface.
    assert_eq!(ra.out["interfaces"][0]["name"], "nkt0");
    assert_eq!(ra.out["interfaces"][2]["sandbox"], a.path());
    assert_eq!(ra.out["ips"][0]["interface"], 2);
    assert_eq!(ra.out["ips"][0]["gateway"], "10.244.0.1");
    assert!(a.ping(&rb.ip()), "ping a -> b");
    assert!(b.tcp_to(&a, &ra.ip()), "tcp b -> a");
    assert!(a.ping("10.244.0.1"), "the gateway on the bridge answers");
    assert!(a.ping("fd00:244::3"), "ping v6 a -> b");
    assert!(
        a.ping("fd00:244::1"),
        "the v6 gateway on the bridge answers"
    );
}

#[test]
fn routed_mode_dual_stack_pods_reach_each_other_over_host_routes() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "routed", dual_pools());
    let (a, b) = (Pod::new(), Pod::new());
    let ra = node.add(&conf, "ctr-a", &a).expect_ok();
    let rb = node.add(&conf, "ctr-b", &b).expect_ok();
    assert_eq!(ra.ips().len(), 2, "one address per family: {}", ra.out);
    assert_eq!(ra.out["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(ra.out["ips"][1]["gateway"], "fe80::ecee:eeff:feee:eeee");
    let host = ra.out["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(host.len(), 15);
    assert_eq!(ra.out["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert!(
        !node.links().contains("nkt0"),
        "routed mode makes no bridge"
    );
    let proxy_arp = node
        .ns
        .run(|| std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp")))
        .unwrap()
        .unwrap();
    assert_eq!(proxy_arp.trim(), "1");
    let b_v6 = rb.ips()[1].split('/').next().unwrap().to_string();
    assert!(a.ping(&rb.ip()), "ping v4 a -> b");
    assert!(a.ping(&b_v6), "ping v6 a -> b");
    assert!(b.tcp_to(&a, &ra.ip()));
    assert!(
        node.ipv4_routes().iter().any(|r| r.starts_with(&host)),
        "host route via {host}"
    );
}

#[test]
fn add_twice_returns_the_same_addresses_and_del_is_idempotent() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "bridge", pools());
    let pod = Pod::new();
    let first = node.add(&conf, "ctr", &pod).expect_ok();
    let again = node.add(&conf, "ctr", &pod).expect_ok();
    assert_eq!(first.ips(), again.ips());
    assert_eq!(node.allocated(), 1);
    node.del(&conf, "ctr", Some(&pod)).expect_ok();
    node.del(&conf, "ctr", Some(&pod)).expect_ok();
    node.del(&conf, "never-added", None).expect_ok();
    assert_eq!(node.allocated(), 0);
    assert_eq!(
        pod.links().len(),
        1,
        "only lo is left in the pod: {:?}",
        pod.links()
    );
    // DEL after the pod namespace is gone still releases the address.
    let gone = Pod::new();
    node.add(&conf, "ctr-gone", &gone).expect_ok();
    let path = gone.path().to_string();
    drop(gone);
    node.run(
        "nodekit",
        "DEL",
        &conf,
        ("ctr-gone", Some(&path), "eth0"),
        &[],
    )
    .expect_ok();
    assert_eq!(node.allocated(), 0);
    assert_eq!(
        node.links(),
        ["lo", "nkt0"].iter().map(|s| s.to_string()).collect()
    );
}

#[test]
fn a_failed_add_leaves_nothing_behind_at_any_point() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "bridge", pools());
    let first = Pod::new();
    node.add(&conf, "ctr-first", &first).expect_ok();
    let baseline = node.links();
    for point in ["after-ipam", "after-veth", "after-host", "after-pod"] {
        let pod = Pod::new();
        let run = node.run(
            "nodekit",
            "ADD",
            &conf,
            ("ctr-x", Some(pod.path()), "eth0"),
            &[("NODEKIT_FAULT", point)],
        );
        assert!(!run.ok, "{point}: the fault must fail ADD");
        assert!(run.msg().contains(point), "{}", run.msg());
        assert_eq!(node.links(), baseline, "{point}: host side left behind");
        assert_eq!(
            pod.links().len(),
            1,
            "{point}: pod side left behind: {:?}",
            pod.links()
        );
        assert_eq!(node.allocated(), 1, "{point}: address leaked");
    }
    // The interface name is already taken in the pod (by the first attachment).
    let taken = node.add(&conf, "ctr-other", &first);
    assert!(
        !taken.ok && taken.msg().contains("already exists"),
        "{}",
        taken.out
    );
    assert_eq!(node.links(), baseline);
    assert_eq!(node.allocated(), 1);
    // Bad ifname and a namespace that does not exist: code 4, nothing allocated.
    let pod = Pod::new();
    let bad = node.run(
        "nodekit",
        "ADD",
        &conf,
        ("ctr-y", Some(pod.path()), "much-too-long-ifname"),
        &[],
    );
    assert_eq!(bad.code(), 4, "{}", bad.out);
    let missing = node.run(
        "nodekit",
        "ADD",
        &conf,
        ("ctr-y", Some("/run/netns/nk-does-not-exist"), "eth0"),
        &[],
    );
    assert_eq!(missing.code(), 4, "{}", missing.out);
    assert!(missing.msg().contains("CNI_NETNS"));
    let not_a_netns = node.run(
        "nodekit",
        "ADD",
        &conf,
        ("ctr-y", Some("/proc/self/status"), "eth0"),
        &[],
    );
    assert_eq!(not_a_netns.code(), 4, "{}", not_a_netns.out);
    assert!(not_a_netns.msg().contains("not a network namespace"));
    assert_eq!(node.allocated(), 1);
    assert_eq!(node.links(), baseline);
}

#[test]
fn exhaustion_is_specific_reported_by_status_and_relieved_by_release_or_a_new_pool() {
    let node = Node::new();
    let conf = node.conf(
        "1.1.0",
        "bridge",
        json!([{"name": "tiny", "cidr": "10.77.0.0/29", "blockSize": 29}]),
    );
    let pods: Vec<Pod> = (0..6).map(|_| Pod::new()).collect();
    for (i, pod) in pods.iter().take(5).enumerate() {
        node.run("nodekit", "STATUS", &conf, ("", None, ""), &[])
            .expect_ok();
        node.add(&conf, &format!("ctr-{i}"), pod).expect_ok();
    }
    let baseline = node.links();
    let full = node.add(&conf, "ctr-5", &pods[5]);
    assert_eq!(full.code(), 100, "{}", full.out);
    let msg = full.msg();
    for needle in [
        "tiny",
        "10.77.0.0/29",
        "5 usable",
        "5 in use",
        "n1 5",
        "pool add",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from {msg}");
    }
    assert_eq!(node.links(), baseline);
    assert_eq!(pods[5].links().len(), 1, "the pod got no interface");
    let status = node.run("nodekit", "STATUS", &conf, ("", None, ""), &[]);
    assert_eq!(status.code(), 50, "{}", status.out);
    assert!(status.msg().contains("tiny"));
    // Releasing one address makes the next ADD succeed.
    node.del(&conf, "ctr-0", Some(&pods[0])).expect_ok();
    node.add(&conf, "ctr-5", &pods[5]).expect_ok();
    // Full again; adding a pool with the CLI makes the next ADD succeed.
    assert_eq!(node.add(&conf, "ctr-0", &pods[0]).code(), 100);
    node.ctl(&["ipam", "pool", "add", "more", "10.78.0.0/24"]);
    let relieved = node.add(&conf, "ctr-0", &pods[0]).expect_ok();
    assert!(
        relieved.ip().starts_with("10.78.0."),
        "{:?}",
        relieved.ips()
    );
    node.run("nodekit", "STATUS", &conf, ("", None, ""), &[])
        .expect_ok();
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses_and_concurrent_add_del_keeps_the_store_sound() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "routed", pools());
    let pods: Vec<Pod> = (0..50).map(|_| Pod::new()).collect();
    let runs: Vec<common::Run> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || node.add(conf, &format!("ctr-{i}"), pod))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<String> = runs.into_iter().map(|r| r.expect_ok().ip()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "duplicate addresses handed out");
    assert_eq!(node.allocated(), 50);
    // Delete the even half while adding 25 new ones, all at once.
    let fresh: Vec<Pod> = (0..25).map(|_| Pod::new()).collect();
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            let (node, conf) = (&node, &conf);
            s.spawn(move || node.del(conf, &format!("ctr-{i}"), Some(pod)).expect_ok());
        }
        for (i, pod) in fresh.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || node.add(conf, &format!("new-{i}"), pod).expect_ok());
        }
    });
    assert_eq!(node.allocated(), 50);
    assert_eq!(node.links().len(), 51, "lo + 50 host veths");
}

#[test]
fn gc_releases_attachments_missing_from_either_valid_list_key() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "bridge", pools());
    let pods: Vec<Pod> = (0..3).map(|_| Pod::new()).collect();
    for (i, pod) in pods.iter().enumerate() {
        node.add(&conf, &format!("ctr-{i}"), pod).expect_ok();
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-0", "ifname": "eth0"}, {"containerID": "ctr-1", "ifname": "eth0"}]);
    node.run("nodekit", "GC", &gc, ("", None, ""), &[])
        .expect_ok();
    assert_eq!(node.allocated(), 2);
    assert_eq!(pods[2].links().len(), 1, "ctr-2's veth is gone");
    let mut gc = conf.clone();
    gc["cni.dev/attachments"] = json!([{"containerID": "ctr-1", "ifname": "eth0"}]);
    node.run("nodekit", "GC", &gc, ("", None, ""), &[])
        .expect_ok();
    assert_eq!(node.allocated(), 1);
    assert_eq!(pods[0].links().len(), 1);
    assert_eq!(
        pods[1].links().len(),
        2,
        "the valid attachment is untouched"
    );
}

#[test]
fn check_passes_on_a_healthy_attachment_and_fails_when_the_interface_is_gone() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "routed", dual_pools());
    let pod = Pod::new();
    let added = node.add(&conf, "ctr", &pod).expect_ok();
    let mut check = conf.clone();
    check["prevResult"] = added.out.clone();
    node.run(
        "nodekit",
        "CHECK",
        &check,
        ("ctr", Some(pod.path()), "eth0"),
        &[],
    )
    .expect_ok();
    let host = added.out["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Remove the host veth behind the plugin's back.
    let removed = node
        .ns
        .run(|| {
            rt.block_on(async {
                nodekit_cni::netlink::Netlink::connect()?
                    .delete_link(&host)
                    .await
            })
        })
        .unwrap()
        .unwrap();
    assert!(removed);
    let broken = node.run(
        "nodekit",
        "CHECK",
        &check,
        ("ctr", Some(pod.path()), "eth0"),
        &[],
    );
    assert!(
        !broken.ok && broken.msg().contains("missing"),
        "{}",
        broken.out
    );
}

#[test]
fn old_config_versions_get_results_in_their_shape_and_new_commands_are_refused() {
    let node = Node::new();
    let pod = Pod::new();
    let conf = node.conf("0.4.0", "bridge", pools());
    let added = node.add(&conf, "ctr", &pod).expect_ok();
    assert_eq!(added.out["cniVersion"], "0.4.0");
    assert_eq!(added.out["ips"][0]["version"], "4");
    let gc = node.run("nodekit", "GC", &conf, ("", None, ""), &[]);
    assert_eq!(gc.code(), 1, "{}", gc.out);
    let v1 = node.conf("1.0.0", "bridge", pools());
    let pod2 = Pod::new();
    let added = node.add(&v1, "ctr2", &pod2).expect_ok();
    assert!(added.out["ips"][0].get("version").is_none());
    let bad = node.add(&node.conf("2.0.0", "bridge", pools()), "ctr3", &Pod::new());
    assert_eq!(bad.code(), 1);
    let version = node
        .run(
            "nodekit",
            "VERSION",
            &json!({"cniVersion": "1.1.0"}),
            ("", None, ""),
            &[],
        )
        .expect_ok();
    assert!(version.out["supportedVersions"].as_array().unwrap().len() >= 5);
}

#[test]
fn a_chained_result_keeps_the_previous_plugins_interfaces() {
    let node = Node::new();
    let pod = Pod::new();
    let mut conf = node.conf("1.1.0", "bridge", pools());
    conf["prevResult"] = json!({"cniVersion": "1.1.0", "interfaces": [{"name": "other0"}], "ips": [{"address": "192.0.2.5/24", "interface": 0}]});
    let added = node.add(&conf, "ctr", &pod).expect_ok();
    assert_eq!(added.out["interfaces"][0]["name"], "other0");
    assert_eq!(added.out["ips"][0]["address"], "192.0.2.5/24");
    assert_eq!(
        added.out["ips"][1]["interface"], 3,
        "our pod interface, shifted by one"
    );
}

#[test]
fn our_plugin_works_with_host_local_and_our_ipam_works_under_the_reference_bridge() {
    common::require_reference();
    let node = Node::new();
    let (a, b) = (Pod::new(), Pod::new());
    let mut with_host_local = node.conf("1.0.0", "bridge", json!([]));
    with_host_local["ipam"] = json!({"type": "host-local", "ranges": [[{"subnet": "10.66.0.0/24"}]], "dataDir": node.dir.path().join("host-local")});
    let ra = node.add(&with_host_local, "hl-a", &a).expect_ok();
    let rb = node.add(&with_host_local, "hl-b", &b).expect_ok();
    assert!(ra.ip().starts_with("10.66.0."));
    assert!(a.ping(&rb.ip()));
    node.del(&with_host_local, "hl-a", Some(&a)).expect_ok();
    node.del(&with_host_local, "hl-b", Some(&b)).expect_ok();

    let reference = json!({
        "cniVersion": "1.0.0", "name": "nk-ref", "type": "bridge", "bridge": "nkr0", "isGateway": true,
        "ipam": {"type": "nodekit-ipam", "nodeName": "n1", "datastore": {"type": "file", "path": node.store_path()},
                  "pools": [{"name": "ref", "cidr": "10.67.0.0/16"}]}
    });
    let (c, d) = (Pod::new(), Pod::new());
    let rc = node
        .run(
            "bridge",
            "ADD",
            &reference,
            ("ref-c", Some(c.path()), "eth0"),
            &[],
        )
        .expect_ok();
    let rd = node
        .run(
            "bridge",
            "ADD",
            &reference,
            ("ref-d", Some(d.path()), "eth0"),
            &[],
        )
        .expect_ok();
    assert_eq!(rc.ips(), vec!["10.67.0.2/26"]);
    assert!(
        c.ping(&rd.ip()),
        "reference bridge pods with our IPAM reach each other"
    );
    assert!(
        c.ping("10.67.0.1"),
        "the reference bridge took our block gateway"
    );
    node.run(
        "bridge",
        "DEL",
        &reference,
        ("ref-c", Some(c.path()), "eth0"),
        &[],
    )
    .expect_ok();
    assert_eq!(node.allocated(), 1);
}

#[test]
fn ipam_check_finds_and_release_frees_a_leaked_attachment() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "bridge", pools());
    let (kept, leaked) = (Pod::new(), Pod::new());
    node.add(&conf, "kept", &kept).expect_ok();
    node.add(&conf, "leaked", &leaked).expect_ok();
    drop(leaked); // the runtime lost the pod without calling DEL
    let ctl = |args: &[&str]| node.ctl(args);
    let report = ctl(&["ipam", "check"]);
    assert!(
        report.contains("nk-test.leaked.eth0") && !report.contains("kept"),
        "{report}"
    );
    assert!(ctl(&["ipam", "show"]).contains("n1=2"));
    ctl(&["ipam", "release", "--from-check"]);
    assert_eq!(node.allocated(), 1);
    assert!(ctl(&["ipam", "check"]).contains("no leaked"));
    let json: serde_json::Value =
        serde_json::from_str(&ctl(&["-o", "json", "ipam", "show"])).unwrap();
    assert_eq!(json["pools"][0]["used"], 1);
}

#[test]
fn hairpin_mode_is_set_on_the_bridge_port_only_when_asked() {
    use netlink_packet_route::link::{InfoBridgePort, InfoPortData, LinkAttribute, LinkInfo};
    let node = Node::new();
    let mut conf = node.conf("1.1.0", "bridge", pools());
    let hairpin_of = |host: String| -> Option<bool> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let link = node
            .ns
            .run(|| {
                rt.block_on(async { nodekit_cni::netlink::Netlink::connect()?.link(&host).await })
            })
            .unwrap()
            .unwrap()
            .expect("host veth exists");
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                    port.iter().find_map(|p| match p {
                        InfoBridgePort::HairpinMode(on) => Some(*on),
                        _ => None,
                    })
                }
                _ => None,
            }),
            _ => None,
        })
    };
    let plain = Pod::new();
    let added = node.add(&conf, "plain", &plain).expect_ok();
    assert_eq!(
        hairpin_of(added.out["interfaces"][1]["name"].as_str().unwrap().into()),
        Some(false)
    );
    conf["hairpinMode"] = json!(true);
    let hairpin = Pod::new();
    let added = node.add(&conf, "hairpin", &hairpin).expect_ok();
    assert_eq!(
        hairpin_of(added.out["interfaces"][1]["name"].as_str().unwrap().into()),
        Some(true)
    );
}

#[test]
fn unsupported_fields_are_code_2_and_invalid_values_code_7_naming_the_field() {
    let node = Node::new();
    let pod = Pod::new();
    let mut conf = node.conf("1.1.0", "tunnel", pools());
    let run = node.add(&conf, "ctr", &pod);
    assert_eq!(run.code(), 2, "{}", run.out);
    assert!(run.msg().contains("mode") && run.msg().contains("tunnel"));
    conf["mode"] = json!("bridge");
    conf["ipam"]["pols"] = json!([]);
    let run = node.add(&conf, "ctr", &pod);
    assert_eq!(run.code(), 2, "{}", run.out);
    assert!(run.msg().contains("ipam.pols"), "{}", run.msg());
    let mut conf = node.conf(
        "1.1.0",
        "bridge",
        json!([{"name": "p", "cidr": "10.1.2.3/16"}]),
    );
    let run = node.add(&conf, "ctr", &pod);
    assert_eq!(run.code(), 7, "{}", run.out);
    assert!(
        run.msg().contains("cidr") && run.msg().contains("10.1.0.0/16"),
        "{}",
        run.msg()
    );
    conf["mtu"] = json!(10);
    let run = node.add(&conf, "ctr", &pod);
    assert_eq!(run.code(), 7, "{}", run.out);
    assert!(run.msg().contains("mtu"));
    assert_eq!(pod.links().len(), 1);
    // The bridge is the node's, shared by all pods, and stays; no veth is left.
    let links = node.links();
    assert!(links.iter().all(|l| l == "lo" || l == "nkt0"), "{links:?}");
}
