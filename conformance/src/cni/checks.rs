//! The checks of suite `cni`, each a test whose name reads as a sentence. Every check makes
//! its own pod namespaces and DELs every attachment it made before returning (`Pod` is a
//! drop guard), so checks are independent of each other's order.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nodekit_nsutil::{unique_name, NetNs, NsError};
use serde_json::Value;

use super::exec::{
    interpret, Attachment, CallError, CniCommand, ExecError, GcKeys, PluginCall, Reply,
};
use super::result::{self, AddResult, Expectation};
use super::version::CniVersion;
use super::Env;
use crate::inspect::{self, InspectError, NetState};
use crate::lab::{LabError, PodNs};
use crate::report::Outcome;

/// What stopped a check before it could judge the plugin, or the judgement itself.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A pod namespace could not be made.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A namespace could not be entered.
    #[error(transparent)]
    Ns(#[from] NsError),
    /// Inspecting a namespace failed.
    #[error(transparent)]
    Inspect(#[from] InspectError),
    /// A plugin call failed where the spec requires success.
    #[error("{step}: {source}")]
    Call {
        /// The step of the check (`ADD of pod A`).
        step: String,
        /// The failure.
        #[source]
        source: Box<CallError>,
    },
    /// A plugin could not be run.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The runner's own socket or process work failed (not the plugin's fault).
    #[error("{step}: {source}")]
    Io {
        /// What the runner was doing.
        step: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The plugin's behaviour contradicts the spec; the message says how.
    #[error("{0}")]
    Violation(String),
}

fn call_err(step: impl Into<String>) -> impl FnOnce(CallError) -> CheckError {
    let step = step.into();
    move |source| CheckError::Call {
        step,
        source: Box::new(source),
    }
}

fn io_err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckError {
    let step = step.into();
    move |source| CheckError::Io { step, source }
}

/// A check's entry point.
pub type CheckFn = fn(&Env) -> Result<Outcome, CheckError>;

/// A check with its sentence-like name.
pub type Check = crate::suite::Check<CheckFn>;

/// The checks after the per-plugin VERSION checks, in run order.
pub const CHECKS: &[Check] = &[
    Check {
        name: "ADD returns a spec-shaped result",
        run: add_returns_spec_shaped_result,
    },
    Check {
        name: "ADD creates the interface in the pod netns with the reported addresses and MAC",
        run: add_creates_the_reported_interface,
    },
    Check {
        name: "ADD assigns addresses inside the configured pool",
        run: add_assigns_addresses_in_the_pool,
    },
    Check {
        name: "two pods on the node reach each other over TCP and ICMP",
        run: two_pods_reach_each_other,
    },
    Check {
        name: "a repeated ADD of the same container and ifname is handled per spec",
        run: repeated_add_is_handled,
    },
    Check {
        name: "CHECK with the ADD result as prevResult succeeds",
        run: check_succeeds,
    },
    Check {
        name: "DEL removes the pod interface and its host-side peer",
        run: del_removes_interface_and_peer,
    },
    Check {
        name: "DEL is idempotent: a second DEL succeeds",
        run: second_del_succeeds,
    },
    Check {
        name: "DEL after the pod netns is deleted succeeds",
        run: del_after_netns_gone_succeeds,
    },
    Check {
        name: "DEL of a never-added container succeeds",
        run: del_of_unknown_container_succeeds,
    },
    Check {
        name: "GC removes attachments missing from the valid list and keeps the valid one",
        run: gc_removes_stale_attachments,
    },
    Check {
        name: "STATUS reports the plugins ready",
        run: status_succeeds,
    },
    Check {
        name: "ADD with an unsupported cniVersion fails with code 1 and leaves nothing behind",
        run: unsupported_version_is_code_1,
    },
    Check {
        name: "ADD with malformed JSON config fails with code 6 and leaves nothing behind",
        run: malformed_config_is_code_6,
    },
    Check {
        name: "a call without CNI_COMMAND fails with code 4 and leaves nothing behind",
        run: missing_command_is_code_4,
    },
    Check {
        name: "ADD without CNI_CONTAINERID fails with code 4 and leaves nothing behind",
        run: missing_container_id_is_code_4,
    },
    Check {
        name: "ADD without CNI_IFNAME fails with code 4 and leaves nothing behind",
        run: missing_ifname_is_code_4,
    },
    Check {
        name: "ADD into a netns path that does not exist fails with error JSON and leaves nothing behind",
        run: missing_netns_fails,
    },
    Check {
        name: "ADD with an ifname longer than 15 characters fails with error JSON and leaves nothing behind",
        run: long_ifname_fails,
    },
    Check {
        name: "20 parallel ADDs get distinct addresses and 20 parallel DELs leave no host links",
        run: parallel_add_and_del,
    },
];

/// The name of the VERSION check of plugin `plugin_type`.
pub fn version_check_name(plugin_type: &str) -> String {
    format!(
        "VERSION of {plugin_type} reports supportedVersions including the conflist's cniVersion"
    )
}

/// The interface name used in pods.
const IFNAME: &str = "eth0";

/// An attachment in its own pod namespace; on drop it is DELeted (if it was added and not
/// deleted since) and then its namespace removed.
struct Pod<'e> {
    env: &'e Env,
    ns: Option<PodNs>,
    att: Attachment,
    cached: Option<Value>,
    needs_del: bool,
}

impl<'e> Pod<'e> {
    /// A fresh pod namespace with a unique container ID; nothing added yet.
    fn new(env: &'e Env) -> Result<Self, CheckError> {
        let ns = env.lab.pod()?;
        let att = Attachment {
            container_id: unique_name("ctr"),
            netns: ns.path(),
            ifname: IFNAME.to_string(),
        };
        Ok(Self {
            env,
            ns: Some(ns),
            att,
            cached: None,
            needs_del: false,
        })
    }

    /// A pod with the attachment added; the ADD failing fails the check.
    fn added(env: &'e Env, what: &str) -> Result<Self, CheckError> {
        let mut pod = Self::new(env)?;
        pod.add().map_err(call_err(format!("ADD of {what}")))?;
        Ok(pod)
    }

    /// ADD; the result is cached for CHECK and DEL.
    fn add(&mut self) -> Result<&Value, CallError> {
        self.needs_del = true;
        let result = self.env.rt.add(&self.att)?;
        Ok(self.cached.insert(result))
    }

    /// DEL with the cached result.
    fn del(&mut self) -> Result<(), CallError> {
        self.env.rt.del(&self.att, self.cached.as_ref())?;
        self.needs_del = false;
        Ok(())
    }

    /// The cached ADD result.
    fn result(&self) -> Result<&Value, CheckError> {
        self.cached
            .as_ref()
            .ok_or_else(|| CheckError::Violation("no ADD result cached".into()))
    }

    /// The typed view of the cached ADD result.
    fn view(&self) -> Result<AddResult, CheckError> {
        Ok(result::read(
            self.result()?,
            &self.att.netns,
            &self.att.ifname,
        ))
    }

    /// The pod namespace (until it is removed).
    fn ns(&self) -> Result<&PodNs, CheckError> {
        self.ns
            .as_ref()
            .ok_or_else(|| CheckError::Violation("the pod netns was already removed".into()))
    }

    /// Links and addresses inside the pod.
    fn state(&self) -> Result<NetState, CheckError> {
        Ok(inspect::dump(self.ns()?)?)
    }

    /// Removes the pod namespace (the runtime deleting a dead sandbox).
    fn remove_netns(&mut self) {
        self.ns = None;
    }

    /// The address to reach the pod at.
    fn ip(&self) -> Result<IpAddr, CheckError> {
        self.view()?.primary_ip().ok_or_else(|| {
            CheckError::Violation(format!(
                "the ADD result assigns no address to {}",
                self.att.ifname
            ))
        })
    }

    /// The node-side link of the pod's interface: the veth peer index read from the pod
    /// interface's `iflink`, if that index names a link in the node namespace.
    fn host_peer(&self, node: &NetState) -> Result<Option<(u32, String)>, CheckError> {
        let pod = self.state()?;
        let Some(link) = pod.link(&self.att.ifname) else {
            return Ok(None);
        };
        let Some(peer) = link.peer_index.filter(|p| *p != link.index) else {
            return Ok(None);
        };
        Ok(node.link_by_index(peer).map(|l| (l.index, l.name.clone())))
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if self.needs_del {
            if let Err(e) = self.env.rt.del(&self.att, self.cached.as_ref()) {
                tracing::warn!(container_id = %self.att.container_id, ?e, "cleanup DEL failed");
            }
        }
    }
}

fn node_state(env: &Env) -> Result<NetState, CheckError> {
    Ok(inspect::dump(env.lab.node())?)
}

fn list(items: &[String]) -> String {
    items.join(", ")
}

/// VERSION reports supportedVersions including the conflist's cniVersion (per plugin).
pub fn version_check(env: &Env, index: usize) -> Result<Outcome, CheckError> {
    let reply = match env.rt.version_of(index) {
        Ok(reply) => reply,
        Err(e) => return Ok(Outcome::Failed(e.to_string())),
    };
    let wanted = env.rt.conf().cni_version;
    let supported: Vec<CniVersion> = reply
        .supported_versions
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let shown = reply.supported_versions.join(", ");
    if supported.contains(&wanted) {
        Ok(Outcome::passed_with(format!("supports {shown}")))
    } else {
        Ok(Outcome::Failed(format!(
            "plugin {}: supportedVersions [{shown}] does not include the conflist's cniVersion {wanted}",
            env.rt.conf().plugin_type(index)
        )))
    }
}

fn add_returns_spec_shaped_result(env: &Env) -> Result<Outcome, CheckError> {
    let pod = Pod::added(env, "a pod")?;
    let exp = Expectation {
        version: env.rt.version(),
        netns: &pod.att.netns,
        ifname: &pod.att.ifname,
    };
    match result::validate(pod.result()?, exp) {
        Ok(view) => {
            let addrs: Vec<String> = view
                .sandbox_addresses()
                .iter()
                .map(ToString::to_string)
                .collect();
            Ok(Outcome::passed_with(format!(
                "cniVersion {}, {} with {}",
                view.cni_version,
                pod.att.ifname,
                list(&addrs)
            )))
        }
        Err(problems) => Ok(Outcome::Failed(format!(
            "{} (result: {})",
            problems.join("; "),
            pod.result()?
        ))),
    }
}

fn add_creates_the_reported_interface(env: &Env) -> Result<Outcome, CheckError> {
    let pod = Pod::added(env, "a pod")?;
    let view = pod.view()?;
    let state = pod.state()?;
    let Some(link) = state.link(&pod.att.ifname) else {
        return Ok(Outcome::Failed(format!(
            "no interface {} in the pod netns (it has: {})",
            pod.att.ifname,
            list(&state.non_loopback())
        )));
    };
    let mut problems = Vec::new();
    if !link.up {
        problems.push(format!("{} is down", link.name));
    }
    if let Some(mac) = view.sandbox().and_then(|s| s.mac.as_deref()) {
        if link.mac.as_deref().map(str::to_ascii_lowercase) != Some(mac.to_ascii_lowercase()) {
            problems.push(format!(
                "the result reports MAC {mac} but {} has {}",
                link.name,
                link.mac.as_deref().unwrap_or("none")
            ));
        }
    }
    let present = state.addrs_of(link.index);
    let reported = view.sandbox_addresses();
    if reported.is_empty() {
        problems.push("the result assigns no address to the sandbox interface".into());
    }
    for addr in &reported {
        if !present.contains(addr) {
            problems.push(format!(
                "{addr} is reported but {} has [{}]",
                link.name,
                list(&present.iter().map(ToString::to_string).collect::<Vec<_>>())
            ));
        }
    }
    if problems.is_empty() {
        Ok(Outcome::passed())
    } else {
        Ok(Outcome::Failed(problems.join("; ")))
    }
}

fn add_assigns_addresses_in_the_pool(env: &Env) -> Result<Outcome, CheckError> {
    let pools = env.rt.conf().pools();
    if pools.is_empty() {
        return Ok(Outcome::Skipped(
            "the config names no pool (ipam.pools[].cidr or ipam.ranges[][].subnet)".into(),
        ));
    }
    let pod = Pod::added(env, "a pod")?;
    let view = pod.view()?;
    let outside: Vec<String> = view
        .ips
        .iter()
        .filter(|ip| !pools.iter().any(|pool| pool.contains(ip.address.ip())))
        .map(|ip| ip.address.to_string())
        .collect();
    let pools_shown: Vec<String> = pools.iter().map(ToString::to_string).collect();
    if view.ips.is_empty() {
        Ok(Outcome::Failed("the result has no addresses".into()))
    } else if outside.is_empty() {
        Ok(Outcome::passed())
    } else {
        Ok(Outcome::Failed(format!(
            "{} outside the configured pools {}",
            list(&outside),
            list(&pools_shown)
        )))
    }
}

/// A TCP round trip from pod `from` to a listener in pod `to`.
fn tcp_round_trip(from: &Pod<'_>, to: &Pod<'_>) -> Result<(), CheckError> {
    tcp_echo(from.ns()?, to.ns()?, to.ip()?)
        .map(|_| ())
        .map_err(|e| {
            let source = from.ip().map(|i| i.to_string()).unwrap_or_default();
            CheckError::Violation(format!("TCP from pod A ({source}) to pod B: {e}"))
        })
}

/// A TCP connection from `client` to a listener bound to `ip` in `server`, echoing a
/// payload; returns the source address the server saw.
pub(super) fn tcp_echo(client: &NetNs, server: &NetNs, ip: IpAddr) -> Result<IpAddr, String> {
    const PAYLOAD: &[u8] = b"nodekit-conformance";
    const TIMEOUT: Duration = Duration::from_secs(3);
    let listener = server
        .run(move || TcpListener::bind((ip, 0)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listen on {ip}: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))?
        .port();
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener setup: {e}"))?;
    let dest = SocketAddr::new(ip, port);
    std::thread::scope(|scope| {
        let served = scope.spawn(move || -> std::io::Result<IpAddr> {
            let deadline = Instant::now() + TIMEOUT;
            let (mut stream, peer) = loop {
                match listener.accept() {
                    Ok(conn) => break conn,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no connection arrived",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e),
                }
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            let mut buf = vec![0u8; PAYLOAD.len()];
            stream.read_exact(&mut buf)?;
            stream.write_all(&buf)?;
            Ok(peer.ip())
        });
        let echoed = client
            .run(move || -> std::io::Result<Vec<u8>> {
                let mut stream = TcpStream::connect_timeout(&dest, TIMEOUT)?;
                stream.set_read_timeout(Some(TIMEOUT))?;
                stream.write_all(PAYLOAD)?;
                let mut buf = vec![0u8; PAYLOAD.len()];
                stream.read_exact(&mut buf)?;
                Ok(buf)
            })
            .map_err(|e| e.to_string())?;
        let served = served
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("server thread panicked")));
        match (echoed, served) {
            (Ok(echo), Ok(peer)) if echo == PAYLOAD => Ok(peer),
            (Ok(_), Ok(_)) => Err(format!("TCP to {dest}: the echo came back altered")),
            (Err(e), _) => Err(format!("TCP to {dest}: {e}")),
            (_, Err(e)) => Err(format!("TCP to {dest}: the listener saw: {e}")),
        }
    })
}

/// Finds an executable in `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `ping -c1 -W2` from pod `from` to pod `to`, up to three attempts.
fn icmp_ping(from: &Pod<'_>, to: &Pod<'_>) -> Result<(), CheckError> {
    let Some(ping) = which("ping") else {
        return Err(CheckError::Violation(
            "ping not found in PATH: apt-get install iputils-ping".into(),
        ));
    };
    let target = to.ip()?.to_string();
    let mut last = String::new();
    for _ in 0..3 {
        let mut cmd = Command::new(&ping);
        cmd.args(["-c1", "-W2", &target]);
        from.ns()?.apply_to_command(&mut cmd);
        let out = cmd.output().map_err(io_err("run ping in pod A"))?;
        if out.status.success() {
            return Ok(());
        }
        last = format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Err(CheckError::Violation(format!(
        "ping from pod A to pod B at {target} failed: {last}"
    )))
}

fn two_pods_reach_each_other(env: &Env) -> Result<Outcome, CheckError> {
    let a = Pod::added(env, "pod A")?;
    let b = Pod::added(env, "pod B")?;
    tcp_round_trip(&a, &b)?;
    icmp_ping(&a, &b)?;
    Ok(Outcome::passed_with(format!("{} -> {}", a.ip()?, b.ip()?)))
}

fn repeated_add_is_handled(env: &Env) -> Result<Outcome, CheckError> {
    let pod = Pod::added(env, "a pod")?;
    let first = pod.view()?;
    let before = node_state(env)?;
    let again = env.rt.add(&pod.att);
    let after = node_state(env)?;
    let mut problems = Vec::new();
    let leaked = after.new_links_since(&before);
    if !leaked.is_empty() {
        problems.push(format!(
            "the repeated ADD left new links in the node netns: {}",
            list(&leaked)
        ));
    }
    let pod_state = pod.state()?;
    let note = match again {
        Ok(value) => {
            let second = result::read(&value, &pod.att.netns, &pod.att.ifname);
            let a: BTreeSet<IpNetwork> = first.sandbox_addresses().into_iter().collect();
            let b: BTreeSet<IpNetwork> = second.sandbox_addresses().into_iter().collect();
            if a != b {
                problems.push(format!(
                    "the repeated ADD returned different addresses ({b:?} instead of {a:?})"
                ));
            }
            "the repeated ADD returned the same addresses".to_string()
        }
        Err(CallError::Plugin { error, .. }) => {
            match pod_state.link(&pod.att.ifname) {
                Some(link) => {
                    let present = pod_state.addrs_of(link.index);
                    if let Some(missing) = first
                        .sandbox_addresses()
                        .into_iter()
                        .find(|a| !present.contains(a))
                    {
                        problems.push(format!(
                            "the failed repeated ADD removed {missing} from the existing attachment"
                        ));
                    }
                }
                None => problems.push(format!(
                    "the failed repeated ADD tore down the existing interface {}",
                    pod.att.ifname
                )),
            }
            format!("the repeated ADD returned error {error}")
        }
        Err(other) => {
            problems.push(format!("the repeated ADD broke the protocol: {other}"));
            String::new()
        }
    };
    if problems.is_empty() {
        Ok(Outcome::passed_with(note))
    } else {
        Ok(Outcome::Failed(problems.join("; ")))
    }
}

fn check_succeeds(env: &Env) -> Result<Outcome, CheckError> {
    if env.rt.version() < CniVersion::V0_4_0 {
        return Ok(Outcome::Skipped(format!(
            "negotiated CNI version is {}; CHECK needs 0.4.0",
            env.rt.version()
        )));
    }
    if env.rt.conf().disable_check {
        return Ok(Outcome::Skipped("the conflist sets disableCheck".into()));
    }
    let pod = Pod::added(env, "a pod")?;
    env.rt
        .check(&pod.att, pod.result()?)
        .map_err(call_err("CHECK right after ADD"))?;
    Ok(Outcome::passed())
}

fn del_removes_interface_and_peer(env: &Env) -> Result<Outcome, CheckError> {
    let mut pod = Pod::added(env, "a pod")?;
    let node_before = node_state(env)?;
    let peer = pod.host_peer(&node_before)?;
    pod.del().map_err(call_err("DEL"))?;
    let mut problems = Vec::new();
    let pod_after = pod.state()?;
    if pod_after.link(&pod.att.ifname).is_some() {
        problems.push(format!(
            "{} still exists in the pod netns after DEL",
            pod.att.ifname
        ));
    }
    let node_after = node_state(env)?;
    let note = match &peer {
        Some((index, name)) => {
            if node_after
                .link_by_index(*index)
                .is_some_and(|l| &l.name == name)
            {
                problems.push(format!(
                    "the host-side peer {name} (ifindex {index}) still exists in the node netns after DEL"
                ));
            }
            format!("removed {} and host peer {name}", pod.att.ifname)
        }
        None => format!(
            "removed {}; it had no peer in the node netns to check",
            pod.att.ifname
        ),
    };
    if problems.is_empty() {
        Ok(Outcome::passed_with(note))
    } else {
        Ok(Outcome::Failed(problems.join("; ")))
    }
}

fn second_del_succeeds(env: &Env) -> Result<Outcome, CheckError> {
    let mut pod = Pod::added(env, "a pod")?;
    pod.del().map_err(call_err("first DEL"))?;
    pod.del().map_err(call_err("second DEL"))?;
    Ok(Outcome::passed())
}

fn del_after_netns_gone_succeeds(env: &Env) -> Result<Outcome, CheckError> {
    let mut pod = Pod::added(env, "a pod")?;
    pod.remove_netns();
    pod.del()
        .map_err(call_err("DEL after the pod netns was deleted"))?;
    Ok(Outcome::passed())
}

fn del_of_unknown_container_succeeds(env: &Env) -> Result<Outcome, CheckError> {
    let mut pod = Pod::new(env)?;
    pod.del()
        .map_err(call_err("DEL of a container never added"))?;
    Ok(Outcome::passed())
}

/// Whether `pod`'s interface and (if known) host peer still exist, and CHECK passes.
fn still_works(env: &Env, pod: &Pod<'_>, peer: &Option<(u32, String)>) -> Vec<String> {
    let mut problems = Vec::new();
    match pod.state() {
        Ok(state) if state.link(&pod.att.ifname).is_some() => {}
        Ok(_) => problems.push(format!(
            "the valid attachment lost {} in its pod netns",
            pod.att.ifname
        )),
        Err(e) => problems.push(e.to_string()),
    }
    if let Some((index, name)) = peer {
        match node_state(env) {
            Ok(node) if node.link_by_index(*index).is_some_and(|l| &l.name == name) => {}
            Ok(_) => problems.push(format!(
                "the valid attachment's host peer {name} was removed"
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !env.rt.conf().disable_check {
        if let Ok(cached) = pod.result() {
            if let Err(e) = env.rt.check(&pod.att, cached) {
                problems.push(format!("CHECK of the valid attachment failed: {e}"));
            }
        }
    }
    problems
}

/// Whether the stale attachment's resources are gone from the node.
fn stale_gone(
    env: &Env,
    peer: &Option<(u32, String)>,
    what: &str,
) -> Result<Vec<String>, CheckError> {
    let node = node_state(env)?;
    Ok(match peer {
        Some((index, name)) if node.link_by_index(*index).is_some_and(|l| &l.name == name) => {
            vec![format!(
                "{what}'s host peer {name} is still in the node netns after GC"
            )]
        }
        _ => Vec::new(),
    })
}

fn gc_removes_stale_attachments(env: &Env) -> Result<Outcome, CheckError> {
    if let Ok(n) = &env.negotiated {
        if let Err(reason) = n.require(CniVersion::V1_1_0, "GC") {
            return Ok(Outcome::Skipped(reason));
        }
    }
    if env.rt.conf().disable_gc {
        return Ok(Outcome::Skipped("the conflist sets disableGC".into()));
    }
    let a = Pod::added(env, "pod A (valid)")?;
    let mut b = Pod::added(env, "pod B (stale)")?;
    let node = node_state(env)?;
    let peer_a = a.host_peer(&node)?;
    let peer_b = b.host_peer(&node)?;

    env.rt
        .gc(&[&a.att], GcKeys::Spec)
        .map_err(call_err("GC with cni.dev/valid-attachments listing pod A"))?;
    let mut problems = stale_gone(env, &peer_b, "pod B")?;
    problems.extend(still_works(env, &a, &peer_a));
    if problems.is_empty() {
        // The valid attachment still carries traffic to a pod added after GC.
        let c = Pod::added(env, "pod C after GC")?;
        if let Err(e) = tcp_round_trip(&a, &c) {
            problems.push(format!("after GC, pod A cannot reach a new pod: {e}"));
        }
    }

    // libcni sends the earlier draft's key too; a plugin may read either.
    let mut d = Pod::added(env, "pod D (stale)")?;
    let peer_d = d.host_peer(&node_state(env)?)?;
    env.rt.gc(&[&a.att], GcKeys::Both).map_err(call_err(
        "GC with cni.dev/valid-attachments and cni.dev/attachments listing pod A",
    ))?;
    problems.extend(stale_gone(env, &peer_d, "pod D")?);
    problems.extend(still_works(env, &a, &peer_a));

    // DEL of a collected attachment must still succeed.
    b.del().map_err(call_err("DEL of pod B after GC"))?;
    d.del().map_err(call_err("DEL of pod D after GC"))?;
    if problems.is_empty() {
        let note = if peer_b.is_some() {
            "stale host peers removed, pod A kept"
        } else {
            "pod A kept; no host peers to check for the stale pods"
        };
        Ok(Outcome::passed_with(note))
    } else {
        Ok(Outcome::Failed(problems.join("; ")))
    }
}

fn status_succeeds(env: &Env) -> Result<Outcome, CheckError> {
    if let Ok(n) = &env.negotiated {
        if let Err(reason) = n.require(CniVersion::V1_1_0, "STATUS") {
            return Ok(Outcome::Skipped(reason));
        }
    }
    env.rt.status().map_err(call_err("STATUS"))?;
    Ok(Outcome::passed())
}

/// What a bad-input check expects.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Error JSON with this well-known code.
    Code(i64, &'static str),
    /// Error JSON with any code.
    AnyError,
}

/// Runs the first plugin of the list with an ADD input broken by `mutate`, and judges the
/// answer and what it left in the node and pod namespaces.
fn bad_add(
    env: &Env,
    expect: Expect,
    mutate: impl FnOnce(PluginCall) -> PluginCall,
) -> Result<Outcome, CheckError> {
    if let Err(e) = env.ensure_warm() {
        return Ok(Outcome::Failed(format!(
            "cannot establish the network before comparing links: {e}"
        )));
    }
    let pod = Pod::new(env)?;
    let plugin = env.rt.conf().plugin_type(0).to_string();
    let call = mutate(env.rt.attachment_call_for(0, CniCommand::Add, &pod.att));
    let before = node_state(env)?;
    let raw = env.rt.invoke_raw(0, &call)?;
    let after = node_state(env)?;
    let pod_links = pod.state()?.non_loopback();
    // Clean up in case the plugin set something up anyway.
    let _ = env.rt.del(&pod.att, None);

    let mut problems = Vec::new();
    let mut note = String::new();
    match (interpret(&plugin, &raw), expect) {
        (Ok(Reply::Failure(e)), Expect::Code(code, meaning)) if e.code != code => {
            problems.push(format!(
                "the spec prescribes code {code} ({meaning}); plugin {plugin} returned {e}"
            ));
        }
        (Ok(Reply::Failure(e)), _) => note = format!("plugin {plugin} returned {e}"),
        (Ok(Reply::Success(_)), Expect::Code(code, meaning)) => problems.push(format!(
            "the spec prescribes error code {code} ({meaning}); plugin {plugin} {}",
            raw.summary()
        )),
        (Ok(Reply::Success(_)), Expect::AnyError) => problems.push(format!(
            "expected an error; plugin {plugin} {}",
            raw.summary()
        )),
        (Err(e), _) => problems.push(e.to_string()),
    }
    let leaked = after.new_links_since(&before);
    if !leaked.is_empty() {
        problems.push(format!(
            "new links left in the node netns: {}",
            list(&leaked)
        ));
    }
    if !pod_links.is_empty() {
        problems.push(format!("links left in the pod netns: {}", list(&pod_links)));
    }
    if problems.is_empty() {
        Ok(Outcome::passed_with(note))
    } else {
        Ok(Outcome::Failed(problems.join("; ")))
    }
}

/// Rewrites the configuration on stdin.
fn with_conf(
    call: PluginCall,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> PluginCall {
    let mut call = call;
    if let Ok(Value::Object(mut conf)) = serde_json::from_slice::<Value>(&call.stdin) {
        edit(&mut conf);
        call.stdin = Value::Object(conf).to_string().into_bytes();
    }
    call
}

fn unsupported_version_is_code_1(env: &Env) -> Result<Outcome, CheckError> {
    bad_add(env, Expect::Code(1, "incompatible CNI version"), |call| {
        with_conf(call, |conf| {
            conf.insert("cniVersion".into(), Value::String("99.0.0".into()));
        })
    })
}

fn malformed_config_is_code_6(env: &Env) -> Result<Outcome, CheckError> {
    bad_add(
        env,
        Expect::Code(6, "failed to decode content"),
        |mut call| {
            let text = String::from_utf8_lossy(&call.stdin).into_owned();
            let cut = text.len() / 2;
            call.stdin = text.as_bytes().get(..cut).unwrap_or_default().to_vec();
            call
        },
    )
}

fn missing_command_is_code_4(env: &Env) -> Result<Outcome, CheckError> {
    bad_add(
        env,
        Expect::Code(4, "invalid necessary environment variables"),
        |call| call.without("CNI_COMMAND"),
    )
}

fn missing_container_id_is_code_4(env: &Env) -> Result<Outcome, CheckError> {
    bad_add(
        env,
        Expect::Code(4, "invalid necessary environment variables"),
        |call| call.without("CNI_CONTAINERID"),
    )
}

fn missing_ifname_is_code_4(env: &Env) -> Result<Outcome, CheckError> {
    bad_add(
        env,
        Expect::Code(4, "invalid necessary environment variables"),
        |call| call.without("CNI_IFNAME"),
    )
}

fn missing_netns_fails(env: &Env) -> Result<Outcome, CheckError> {
    let missing = PathBuf::from(nodekit_nsutil::NETNS_RUN_DIR).join(unique_name("missing"));
    bad_add(env, Expect::AnyError, |call| {
        call.with("CNI_NETNS", &missing.display().to_string())
    })
}

fn long_ifname_fails(env: &Env) -> Result<Outcome, CheckError> {
    bad_add(env, Expect::AnyError, |call| {
        call.with("CNI_IFNAME", "eth0123456789abc")
    })
}

/// Runs `verb` on every pod at once, one thread each, and describes each failure as
/// `ADD #3: ...` (a panicking thread counts as a failure).
fn on_every_pod<'e>(
    pods: &mut [Pod<'e>],
    verb: &str,
    call: impl Fn(&mut Pod<'e>) -> Result<(), CallError> + Sync,
) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter_mut()
            .map(|pod| scope.spawn(|| call(pod)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .filter_map(|(i, h)| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{verb} #{i}: {e}")),
                Err(_) => Some(format!("{verb} #{i}: the {verb} thread panicked")),
            })
            .collect()
    })
}

fn parallel_add_and_del(env: &Env) -> Result<Outcome, CheckError> {
    const N: usize = 20;
    if let Err(e) = env.ensure_warm() {
        return Ok(Outcome::Failed(format!(
            "cannot establish the network before comparing links: {e}"
        )));
    }
    let before = node_state(env)?;
    let mut pods = (0..N)
        .map(|_| Pod::new(env))
        .collect::<Result<Vec<_>, _>>()?;
    let mut problems = on_every_pod(&mut pods, "ADD", |pod| pod.add().map(|_| ()));
    let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
    for pod in pods.iter().filter(|p| p.cached.is_some()) {
        for addr in pod.view()?.sandbox_addresses() {
            if !seen.insert(addr.ip()) {
                problems.push(format!("address {} was handed out twice", addr.ip()));
            }
        }
    }
    problems.extend(on_every_pod(&mut pods, "DEL", Pod::del));
    let after = node_state(env)?;
    let leaked = after.new_links_since(&before);
    if !leaked.is_empty() {
        problems.push(format!(
            "links left in the node netns after the DELs: {}",
            list(&leaked)
        ));
    }
    drop(pods);
    if problems.is_empty() {
        Ok(Outcome::passed_with(format!("{N} distinct addresses")))
    } else {
        Ok(Outcome::Failed(problems.join("; ")))
    }
}
