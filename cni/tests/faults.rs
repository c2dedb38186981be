//! Faults: the plugin SIGKILLed at any point of ADD and DEL (through the test hook and by a
//! real kill of its whole process group after a random delay), and etcd dying in the middle
//! of a burst of ADDs. Whatever happens, `nodekitctl ipam check` + release leaves no address
//! leaked, and nothing half-made survives.

#![allow(clippy::unwrap_used)] // test harness: a failed setup step should panic

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Etcd, Node, Pod};
use serde_json::{json, Value};

/// Runs `nodekit` with CNI_COMMAND=`command` in its own process group inside the node, and
/// SIGKILLs the group after `kill_after` (if it is still running).
fn run_and_kill(
    node: &Node,
    conf: &Value,
    command: &str,
    container: &str,
    pod: &Pod,
    kill_after: Duration,
) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodekit"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", &node.cni_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", pod.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    node.ns.apply_to_command(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    std::thread::sleep(kill_after);
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

#[test]
fn sigkill_anywhere_in_add_or_del_leaks_nothing_after_check_and_release() {
    let node = Node::new();
    let conf = node.conf(
        "1.1.0",
        "routed",
        json!([{"name": "p", "cidr": "10.70.0.0/16"}]),
    );
    let baseline = node.links();
    let mut seed = std::process::id() as u64;
    let mut random_delay = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Duration::from_micros((seed >> 33) % 8000)
    };
    for round in 0..24 {
        let pod = Pod::new();
        let container = format!("k{round}");
        match round % 3 {
            // The hook kills ADD exactly at each step.
            0 => {
                let point = ["after-veth", "after-host", "after-pod"][(round / 3) % 3];
                let run = node.run(
                    "nodekit",
                    "ADD",
                    &conf,
                    (&container, Some(pod.path()), "eth0"),
                    &[("NODEKIT_FAULT", &format!("kill:{point}"))],
                );
                assert!(!run.ok, "killed at {point}");
            }
            // A real kill of ADD (and its IPAM child) at a random moment.
            1 => run_and_kill(&node, &conf, "ADD", &container, &pod, random_delay()),
            // A complete ADD, then DEL killed at a random moment.
            _ => {
                node.add(&conf, &container, &pod).expect_ok();
                run_and_kill(&node, &conf, "DEL", &container, &pod, random_delay());
            }
        }
        // The runtime gives up on the sandbox: its namespace goes away.
        drop(pod);
    }
    node.ctl(&["ipam", "release", "--from-check"]);
    assert!(node.ctl(&["ipam", "check"]).contains("no leaked"));
    assert_eq!(node.allocated(), 0, "an address leaked");
    // The kernel tears a dead namespace down asynchronously, its veth ends with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while node.links() != baseline && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(node.links(), baseline, "a veth was left behind");
    assert!(
        node.ipv4_routes().iter().all(|r| !r.starts_with("nk")),
        "a host route was left behind: {:?}",
        node.ipv4_routes()
    );
}

#[test]
fn etcd_dying_during_a_burst_fails_adds_with_code_11_cleanly_and_they_succeed_once_it_is_back() {
    let node = Node::new();
    let mut etcd = Etcd::start(&node.ns);
    let mut conf = node.conf(
        "1.1.0",
        "routed",
        json!([{"name": "p", "cidr": "10.71.0.0/16"}]),
    );
    conf["ipam"]["datastore"] =
        json!({"type": "etcd", "endpoints": [etcd.url()], "prefix": "/burst"});
    let pods: Vec<Pod> = (0..16).map(|_| Pod::new()).collect();
    let runs: Vec<common::Run> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || {
                    // The second half starts after etcd is gone, so some ADDs surely fail.
                    if i >= 8 {
                        std::thread::sleep(Duration::from_millis(150));
                    }
                    node.add(conf, &format!("b{i}"), pod)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        etcd.stop();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failed = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        if run.ok {
            assert_eq!(pods[i].links().len(), 2, "lo + eth0");
        } else {
            assert_eq!(run.code(), 11, "{}", run.out);
            assert!(run.msg().contains("127.0.0.1:2379"), "{}", run.msg());
            assert_eq!(
                pods[i].links().len(),
                1,
                "a failed ADD left an interface: {}",
                run.out
            );
            failed.push(i);
        }
    }
    assert!(failed.len() >= 8, "the ADDs after the outage must fail");
    assert_eq!(node.links().len(), 1 + runs.iter().filter(|r| r.ok).count());
    etcd.restart(&node.ns);
    let mut ips: Vec<String> = runs.iter().filter(|r| r.ok).map(|r| r.ip()).collect();
    for i in failed {
        ips.push(node.add(&conf, &format!("b{i}"), &pods[i]).expect_ok().ip());
    }
    let count = ips.len();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), count, "duplicate addresses after the outage");
    assert_eq!(count, 16);
}
