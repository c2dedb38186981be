//! The IPAM on a real etcd (Debian's etcd-server, started per test inside its own `nk-`
//! namespace): atomic commits under concurrent writers, the plugins end to end, and an
//! unreachable etcd failing with "try again later".

mod common;

use common::{nodekitctl, Etcd, Node, Pod};
use nodekit_cni::ipam::allocator;
use nodekit_cni::ipam::etcd_store::EtcdStore;
use nodekit_cni::ipam::model::{Handle, Pool};
use nodekit_cni::ipam::store::{transact_with, Datastore};
use serde_json::json;

fn handle(id: &str, node: &str) -> Handle {
    Handle {
        id: id.into(),
        network: "n".into(),
        container_id: id.into(),
        ifname: "eth0".into(),
        node: node.into(),
        netns: String::new(),
        addresses: vec![],
        pod: None,
    }
}

fn store() -> EtcdStore {
    EtcdStore::open(&[Etcd::URL.to_string()], "/nk-test").expect("connect to etcd")
}

#[test]
fn concurrent_writers_on_several_nodes_never_share_an_address() {
    let node = Node::new();
    let _etcd = Etcd::start(&node.ns);
    node.ns
        .run(|| {
            store()
                .transact(&mut |s| {
                    let pool = Pool::new("p", "10.50.0.0/24".parse().unwrap(), Some(28))?;
                    allocator::ensure_pool(s, pool, allocator::Overrides::ALL)
                })
                .unwrap()
        })
        .unwrap();
    let addresses: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|w| {
                let ns = &node.ns;
                scope.spawn(move || {
                    ns.run(move || {
                        let store = store();
                        (0..10)
                            .map(|i| {
                                let h = handle(&format!("w{w}-{i}"), &format!("node{}", w % 3));
                                transact_with(&store, |s| {
                                    allocator::assign(s, h.clone(), &allocator::Choice::default())
                                })
                                .unwrap()[0]
                                    .address
                                    .to_string()
                            })
                            .collect::<Vec<_>>()
                    })
                    .unwrap()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let mut unique = addresses.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        60,
        "an address was handed out twice: {addresses:?}"
    );
    let state = node.ns.run(|| store().read().unwrap()).unwrap();
    assert_eq!(state.handles().len(), 60);
    let used: usize = state.blocks().values().map(|b| b.allocations.len()).sum();
    assert_eq!(used, 60);
    // Each node allocated from blocks with its own affinity first.
    for block in state.blocks().values() {
        assert!(block.affinity.is_some());
    }
}

#[test]
fn the_plugins_work_over_etcd_and_nodekitctl_reads_the_same_store() {
    let node = Node::new();
    let _etcd = Etcd::start(&node.ns);
    let mut conf = node.conf(
        "1.1.0",
        "routed",
        json!([{"name": "default", "cidr": "10.51.0.0/16"}]),
    );
    conf["ipam"]["datastore"] =
        json!({"type": "etcd", "endpoints": [Etcd::URL], "prefix": "/nk-e2e"});
    let (a, b) = (Pod::new(), Pod::new());
    let ra = node.add(&conf, "a", &a).expect_ok();
    let rb = node.add(&conf, "b", &b).expect_ok();
    assert_ne!(ra.ip(), rb.ip());
    assert!(a.ping(&rb.ip()));
    let again = node.add(&conf, "a", &a).expect_ok();
    assert_eq!(again.ips(), ra.ips());
    node.del(&conf, "a", Some(&a)).expect_ok();
    let text = nodekitctl(
        Some(&node.ns),
        &[
            "--datastore",
            "etcd",
            "--etcd-endpoints",
            Etcd::URL,
            "--prefix",
            "/nk-e2e",
            "ipam",
            "show",
        ],
    );
    assert!(
        text.contains("n1=1"),
        "one address left, held by n1: {text}"
    );
}

#[test]
fn an_unreachable_etcd_fails_add_with_code_11_naming_the_endpoint_and_leaves_nothing() {
    let node = Node::new();
    let pod = Pod::new();
    let mut conf = node.conf(
        "1.1.0",
        "routed",
        json!([{"name": "default", "cidr": "10.52.0.0/16"}]),
    );
    conf["ipam"]["datastore"] = json!({"type": "etcd", "endpoints": ["http://127.0.0.1:1"]});
    let started = std::time::Instant::now();
    let run = node.add(&conf, "ctr", &pod);
    assert_eq!(run.code(), 11, "{}", run.out);
    assert!(run.msg().contains("127.0.0.1:1"), "{}", run.msg());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(node.links().len(), 1, "{:?}", node.links());
    assert_eq!(pod.links().len(), 1, "{:?}", pod.links());
}

#[test]
fn node_labels_select_pools_and_removing_a_node_releases_its_addresses() {
    let node = Node::new();
    let _etcd = Etcd::start(&node.ns);
    let ctl = |args: &[&str]| {
        let etcd = [
            "--datastore",
            "etcd",
            "--etcd-endpoints",
            Etcd::URL,
            "--prefix",
            "/nk-sel",
        ];
        let full: Vec<&str> = etcd.iter().chain(args).copied().collect();
        nodekitctl(Some(&node.ns), &full)
    };
    ctl(&[
        "ipam",
        "pool",
        "add",
        "rack-a",
        "10.60.0.0/24",
        "--node-selector",
        "rack=a",
    ]);
    ctl(&[
        "ipam",
        "pool",
        "add",
        "rack-b",
        "10.61.0.0/24",
        "--node-selector",
        "rack=b",
        "--strict-affinity",
    ]);
    ctl(&[
        "node",
        "set",
        "n1",
        "--ip",
        "192.0.2.1",
        "--label",
        "rack=b",
    ]);
    assert!(ctl(&["node", "list"]).contains("rack=b"));
    let mut conf = node.conf("1.1.0", "routed", json!([]));
    conf["ipam"]["datastore"] =
        json!({"type": "etcd", "endpoints": [Etcd::URL], "prefix": "/nk-sel"});
    let pods: Vec<Pod> = (0..2).map(|_| Pod::new()).collect();
    for (i, pod) in pods.iter().enumerate() {
        let added = node.add(&conf, &format!("c{i}"), pod).expect_ok();
        assert!(added.ip().starts_with("10.61.0."), "{:?}", added.ips());
    }
    let removed = ctl(&["node", "remove", "n1"]);
    assert!(removed.contains("2 allocation(s) released"), "{removed}");
    assert!(ctl(&["ipam", "show"]).contains("10.61.0.0/24"));
    assert!(!ctl(&["node", "list"]).contains("n1"));
    // An unlabelled node gets no pool, and is told why.
    let stray = node.add(&conf, "c9", &Pod::new());
    assert_eq!(stray.code(), 7, "{}", stray.out);
    assert!(stray.msg().contains("rack=a"), "{}", stray.msg());
}
