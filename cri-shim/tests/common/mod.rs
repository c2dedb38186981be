//! The test lab: the conformance runner's CRI lab (`nodekit_conformance::cri::lab`: a node
//! network namespace `nk-...` with a local registry holding busybox-static images, bridge +
//! host-local CNI config, runc or crun), shared with suite `cri` and `nodekit-bench cri`, running the
//! real `nodekit-cri` binary driven over its unix socket; plus this crate's test helpers (a
//! CNI plugin that refuses pods, panicking CRI calls, a streaming client). Drop removes
//! everything the lab made: processes, runtime containers, mounts, namespaces, cgroups.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

pub use nodekit_conformance::cri::lab::OciRuntime;
pub use nodekit_conformance::cri::lab::IMAGE;
use nodekit_conformance::cri::lab::{CriRuntime, Lab as CriLab, LabOptions as CriLabOptions};
use nodekit_nsutil::NetNs;
use nodekit_proto::cri::v1 as cri;
use nodekit_proto::cri::v1::image_service_client::ImageServiceClient;
use nodekit_proto::cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

pub mod apiserver;

/// A CNI plugin (in the lab's CNI bin dir) that refuses every ADD with code 11.
const FAIL_PLUGIN: &str = "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = ADD ] || exit 0\necho '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"nk-fail refuses this pod\"}'\nexit 1\n";

/// An ImageSpec naming `name`.
pub fn image_spec(name: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: name.into(),
        ..Default::default()
    })
}

pub struct Lab {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    /// A handle on the lab's node namespace.
    pub node: NetNs,
    pub prefix: String,
    pub cgroup_parent: String,
    /// Flags `start_shim` adds after the lab's.
    shim_args: Vec<String>,
    lab: CriLab,
}

pub struct LabOptions {
    /// Write the bridge conflist before starting (else the conf dir is empty).
    pub network: bool,
    /// Start the registry and push the busybox image.
    pub registry: bool,
    /// A plugin type appended to the conflist (one of the fake plugins).
    pub extra_plugin: Option<&'static str>,
    /// The OCI runtime the shim drives.
    pub runtime: OciRuntime,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            network: true,
            registry: true,
            extra_plugin: None,
            runtime: OciRuntime::Runc,
        }
    }
}

impl LabOptions {
    /// The default lab with the shim driving `runtime`.
    pub fn with_runtime(runtime: OciRuntime) -> Self {
        Self {
            runtime,
            ..Default::default()
        }
    }
}

/// Makes the async test body `fn NAME(runtime: OciRuntime)` one test per OCI runtime,
/// `NAME::runc` and `NAME::crun`, so the paths where runc and crun differ run under both.
#[macro_export]
macro_rules! per_runtime {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            #[tokio::test]
            async fn runc() {
                super::$body($crate::common::OciRuntime::Runc).await
            }
            #[tokio::test]
            async fn crun() {
                super::$body($crate::common::OciRuntime::Crun).await
            }
        }
    )*};
}

impl std::ops::Deref for Lab {
    type Target = CriLab;
    fn deref(&self) -> &CriLab {
        &self.lab
    }
}

impl Lab {
    pub async fn start(opts: LabOptions) -> Lab {
        let lab = CriLab::create(&CriLabOptions {
            network: opts.network,
            registry: opts.registry,
            extra_plugin: opts.extra_plugin.map(String::from),
            oci_runtime: opts.runtime,
        })
        .unwrap_or_else(|e| panic!("building the lab (needs root): {e}"));
        let fail = lab.cni_bin_dir().join("nk-fail");
        std::fs::write(&fail, FAIL_PLUGIN).unwrap();
        std::fs::set_permissions(&fail, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lazy = || Channel::from_static("http://[::]:1").connect_lazy();
        let mut lab = Lab {
            runtime: RuntimeServiceClient::new(lazy()),
            images: ImageServiceClient::new(lazy()),
            node: NetNs::open(lab.node().path()).unwrap(),
            prefix: lab.prefix().to_string(),
            cgroup_parent: lab.cgroup_parent(),
            shim_args: Vec::new(),
            lab,
        };
        lab.start_shim().await;
        lab
    }

    pub fn write_conflist(&self, extra_plugin: Option<&str>) {
        self.lab.write_conflist(extra_plugin).unwrap();
    }

    pub fn shim_args(&self) -> Vec<String> {
        self.lab.nodekit_args()
    }

    /// Starts (or restarts) `nodekit-cri` in the lab and connects the clients.
    pub async fn start_shim(&mut self) {
        let runtime = CriRuntime::Nodekit {
            binary: env!("CARGO_BIN_EXE_nodekit-cri").into(),
            args: self.shim_args.clone(),
            log_filter: "nodekit_cri=debug,info".into(),
        };
        let socket = self
            .lab
            .start_runtime(&runtime)
            .unwrap_or_else(|e| panic!("{e}"));
        let ch = nodekit_proto::uds::connect(&socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to nodekit-cri: {e}\n{}", self.shim_log()));
        self.runtime = RuntimeServiceClient::new(ch.clone());
        self.images = ImageServiceClient::new(ch);
    }

    /// Restarts the shim with `args` after the lab's flags (kept for later restarts).
    pub async fn restart_shim_with(&mut self, args: &[&str]) {
        self.shim_args = args.iter().map(|a| a.to_string()).collect();
        self.start_shim().await;
    }

    /// Serves the registry over HTTPS too; returns the CA file a client must trust.
    pub fn start_tls_registry(&mut self) -> std::path::PathBuf {
        self.lab
            .start_tls_registry()
            .unwrap_or_else(|e| panic!("starting the HTTPS registry: {e}"))
    }

    /// Kills the shim like a crash would (SIGKILL), leaving pods and containers running.
    pub fn kill_shim(&mut self) {
        self.lab.kill_runtime();
    }

    pub fn shim_log(&self) -> String {
        self.lab.runtime_log()
    }

    pub fn sandbox_config(&self, name: &str) -> cri::PodSandboxConfig {
        self.lab.template().sandbox(name)
    }

    pub fn container_config(&self, name: &str, command: &[&str]) -> cri::ContainerConfig {
        self.lab.template().container(name, command)
    }

    pub async fn pull(&mut self) -> String {
        self.images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", self.shim_log()))
            .into_inner()
            .image_ref
    }

    pub async fn run_pod(&mut self, name: &str) -> String {
        let config = self.sandbox_config(name);
        self.run_pod_with(config)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.shim_log()))
    }

    /// RunPodSandbox with `config` and the default handler.
    pub async fn run_pod_with(
        &mut self,
        config: cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        self.runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// Creates and starts a container; returns its ID.
    pub async fn run_container(
        &mut self,
        pod: &str,
        pod_name: &str,
        name: &str,
        command: &[&str],
    ) -> String {
        let config = self.container_config(name, command);
        self.run_container_with(pod, pod_name, config).await
    }

    /// Creates and starts a container from `config`; returns its ID.
    pub async fn run_container_with(
        &mut self,
        pod: &str,
        pod_name: &str,
        config: cri::ContainerConfig,
    ) -> String {
        let id = self.create_container_with(pod, pod_name, config).await;
        self.start_container(&id).await;
        id
    }

    /// Runs busybox httpd on port 8080 serving `/www` (`hello from nk\n` at `/index.html`).
    pub async fn run_httpd(&mut self, pod: &str, pod_name: &str) -> String {
        self.run_container(
            pod,
            pod_name,
            "httpd",
            &["httpd", "-f", "-p", "8080", "-h", "/www"],
        )
        .await
    }

    /// StartContainer; also asserts that the lab's OCI runtime (not another) holds the
    /// container's state.
    pub async fn start_container(&mut self, id: &str) {
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", self.shim_log()));
        assert!(
            self.lab.container_pid(id).is_some(),
            "{} has no state of container {id}",
            self.oci_runtime().name()
        );
    }

    pub async fn create_container(
        &mut self,
        pod: &str,
        pod_name: &str,
        name: &str,
        command: &[&str],
    ) -> String {
        let config = self.container_config(name, command);
        self.create_container_with(pod, pod_name, config).await
    }

    /// CreateContainer with a config of the test's own; panics on an error.
    pub async fn create_container_with(
        &mut self,
        pod: &str,
        pod_name: &str,
        config: cri::ContainerConfig,
    ) -> String {
        self.try_create_container(pod, pod_name, config)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", self.shim_log()))
    }

    /// CreateContainer with a config of the test's own; returns the ID or the error.
    pub async fn try_create_container(
        &mut self,
        pod: &str,
        pod_name: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(self.sandbox_config(pod_name)),
        };
        self.runtime
            .create_container(req)
            .await
            .map(|r| r.into_inner().container_id)
    }

    pub async fn container_status(&mut self, id: &str) -> cri::ContainerStatus {
        self.runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    }

    pub async fn sandbox_status(&mut self, id: &str) -> cri::PodSandboxStatus {
        self.runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    }

    pub async fn image_status(&mut self, name: &str) -> Option<cri::Image> {
        self.images
            .image_status(cri::ImageStatusRequest {
                image: image_spec(name),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image
    }

    pub async fn list_pods(&mut self) -> Vec<cri::PodSandbox> {
        self.runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items
    }

    /// Asserts that nothing pods or containers made is left: no pod netns, runtime state, mount
    /// under the lab, process in the lab's cgroups or held address.
    pub fn assert_nothing_left(&self) {
        assert!(
            self.leftover_netns().is_empty(),
            "{:?}",
            self.leftover_netns()
        );
        let state = self.leftover_runtime_containers();
        assert!(state.is_empty(), "runtime state left: {state:?}");
        let mounts = self.leftover_mounts();
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
        assert!(self.cgroup_pids().is_empty(), "processes left");
        let held = self.held_addresses();
        assert!(held.is_empty(), "addresses still held: {held:?}");
    }

    /// Pod addresses host-local still holds for the lab's network.
    pub fn held_addresses(&self) -> Vec<String> {
        std::fs::read_dir(self.path("ipam/nk-test"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Fetches `url` with wget in the container `probe` until it answers `body` (10 s).
    pub async fn expect_http(&mut self, probe: &str, url: &str, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self
                .exec(probe, &["wget", "-q", "-O", "-", url], 5)
                .await
                .unwrap();
            if got.exit_code == 0 {
                assert_eq!(String::from_utf8_lossy(&got.stdout), body);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{probe} cannot reach {url}: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a hostNetwork pod with one `sleep` container and checks it has the node's network
    /// (no pod netns or IP; the registry on the node's loopback answers) and hostname.
    /// Returns the pod ID.
    pub async fn run_host_network_pod(&mut self) -> String {
        self.pull().await;
        let mut config = self.sandbox_config("hostnet");
        config.linux.as_mut().unwrap().security_context = Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        let pod = self
            .run_pod_with(config)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.shim_log()));
        assert!(
            self.leftover_netns().is_empty(),
            "no pod netns for hostNetwork"
        );
        let status = self.sandbox_status(&pod).await;
        assert_eq!(status.network.unwrap().ip, "");
        let c = self
            .create_container(&pod, "hostnet", "c", &["sleep", "3600"])
            .await;
        self.start_container(&c).await;
        // The registry listens on the node namespace's loopback: reachable only from there.
        let got = self
            .exec(
                &c,
                &["wget", "-q", "-O", "-", "http://127.0.0.1:5000/v2/"],
                5,
            )
            .await
            .unwrap();
        assert_eq!(got.exit_code, 0, "{got:?}");
        let host = nix::unistd::gethostname()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = self.exec(&c, &["hostname"], 5).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&name.stdout).trim(), host);
        pod
    }

    /// The host PID of the init process of the runtime's container `id`.
    pub fn init_pid(&self, id: &str) -> i32 {
        self.lab
            .container_pid(id)
            .unwrap_or_else(|| panic!("{} state {id}: no PID", self.oci_runtime().name()))
    }

    pub async fn wait_exited(&mut self, id: &str) -> cri::ContainerStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.container_status(id).await;
            if s.state == cri::ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not exit: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn exec(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        self.runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Opens a streaming URL from inside the node namespace (where the shim listens on
    /// loopback) as a WebSocket offering `protocols`.
    pub async fn stream_connect(
        &self,
        url: &str,
        protocols: &[&str],
    ) -> Result<Channels, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let authority = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("not an http URL: {url}"))
            .to_string();
        let tcp = self
            .node
            .run(move || std::net::TcpStream::connect(authority.as_str()))
            .unwrap()
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let mut request = url.replacen("http://", "ws://", 1).into_client_request()?;
        if !protocols.is_empty() {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                protocols.join(", ").parse().unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(request, tcp).await?;
        Ok(Channels {
            ws,
            base64: protocols.first().is_some_and(|p| p.contains("base64")),
        })
    }
}

/// `<RFC3339Nano> <stream> <F|P> <msg>` records of a CRI log file.
pub fn log_records(path: &str) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let ts = it.next().unwrap();
            assert!(
                ts.ends_with('Z') && ts.contains('T') && ts.len() == 30,
                "RFC3339Nano: {ts}"
            );
            let stream = it.next().unwrap().to_string();
            let tag = it.next().unwrap().to_string();
            (stream, tag, it.next().unwrap_or("").to_string())
        })
        .collect()
}

/// The client side of a `channel.k8s.io` WebSocket session.
pub struct Channels {
    pub ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    pub base64: bool,
}

impl Channels {
    /// Sends `data` on `channel`.
    pub async fn send(&mut self, channel: u8, data: &[u8]) {
        use base64::Engine;
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let msg = if self.base64 {
            let text = format!(
                "{}{}",
                char::from(b'0' + channel),
                base64::engine::general_purpose::STANDARD.encode(data)
            );
            Message::Text(text.into())
        } else {
            Message::Binary([&[channel][..], data].concat().into())
        };
        self.ws.send(msg).await.unwrap();
    }

    /// The next message's channel and payload; `None` once the server closed.
    pub async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        use base64::Engine;
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("no message from the streaming server within 20 s")?;
            match msg.ok()? {
                Message::Binary(b) if !b.is_empty() => return Some((b[0], b[1..].to_vec())),
                Message::Text(t) if !t.is_empty() => {
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(&t.as_bytes()[1..])
                        .unwrap();
                    return Some((t.as_bytes()[0] - b'0', data));
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Everything received per channel until the server closes the connection.
    pub async fn collect(mut self) -> std::collections::BTreeMap<u8, Vec<u8>> {
        let mut all = std::collections::BTreeMap::<u8, Vec<u8>>::new();
        while let Some((channel, data)) = self.next().await {
            all.entry(channel).or_default().extend(data);
        }
        all
    }
}
