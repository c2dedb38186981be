//! Just enough of a Kubernetes API server for `kubectl exec`, `attach` and `port-forward`
//! against one pod: GET of the pod answers a running pod, and the `exec`, `attach` and
//! `portforward` subresources are turned into CRI Exec / Attach / PortForward calls whose streaming URL gets the
//! client's upgrade request (path rewritten) and then every byte both ways, the way the
//! kubelet proxies to a runtime's streaming server. Lives in the node namespace.

use std::net::SocketAddr;
use std::path::PathBuf;

use nodekit_proto::cri::v1 as cri;
use nodekit_proto::cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// Namespace and name kubectl is pointed at.
pub const NAMESPACE: &str = "nk-test";
/// The pod name kubectl is pointed at.
pub const POD: &str = "p";

pub struct ApiServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Target {
    netns: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    sandbox_id: String,
    container_id: String,
    container: String,
}

impl ApiServer {
    /// Serves pod `POD` (its container `container` is `container_id` in `sandbox_id`) on
    /// loopback of the namespace at `netns`.
    pub fn start(
        netns: PathBuf,
        runtime: RuntimeServiceClient<Channel>,
        sandbox_id: &str,
        container_id: &str,
        container: &str,
    ) -> ApiServer {
        let ns = nodekit_nsutil::NetNs::open(&netns).unwrap();
        let listener = ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let target = Target {
            netns,
            runtime,
            sandbox_id: sandbox_id.into(),
            container_id: container_id.into(),
            container: container.into(),
        };
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, target.clone()));
            }
        });
        ApiServer { addr, task }
    }
}

async fn serve(mut client: TcpStream, mut target: Target) {
    let head = read_head(&mut client).await;
    let request_line = head.lines().next().unwrap_or_default().to_string();
    let target_path = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (path, query) = target_path
        .split_once('?')
        .unwrap_or((target_path.as_str(), ""));
    let pod_path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{POD}");
    let params = parse_query(query);
    let flag = |name: &str| params.iter().any(|(k, v)| k == name && v == "true");
    // Discovery (kubectl asks before anything else) and the pod.
    let document = match path {
        "/api" => Some(
            serde_json::json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": []}),
        ),
        "/apis" => {
            Some(serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
        }
        "/api/v1" => Some(
            serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1",
            "resources": [{"name": "pods", "singularName": "pod", "namespaced": true,
                "kind": "Pod", "verbs": ["get"]}]}),
        ),
        p if p == pod_path => Some(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": POD, "namespace": NAMESPACE},
            "spec": {"containers": [{"name": target.container, "image": "busybox", "stdin": true}]},
            "status": {"phase": "Running"},
        })),
        _ => None,
    };
    if let Some(doc) = document {
        let doc = doc.to_string();
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{doc}",
            doc.len()
        );
        let _ = client.write_all(reply.as_bytes()).await;
        return;
    }
    let url = if path == format!("{pod_path}/exec") {
        let req = cri::ExecRequest {
            container_id: target.container_id.clone(),
            cmd: params
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect(),
            tty: flag("tty"),
            stdin: flag("stdin"),
            stdout: flag("stdout"),
            stderr: flag("stderr"),
        };
        target.runtime.exec(req).await.map(|r| r.into_inner().url)
    } else if path == format!("{pod_path}/attach") {
        let req = cri::AttachRequest {
            container_id: target.container_id.clone(),
            tty: flag("tty"),
            stdin: flag("stdin"),
            stdout: flag("stdout"),
            stderr: flag("stderr"),
        };
        target.runtime.attach(req).await.map(|r| r.into_inner().url)
    } else if path == format!("{pod_path}/portforward") {
        let req = cri::PortForwardRequest {
            pod_sandbox_id: target.sandbox_id.clone(),
            port: vec![],
        };
        target
            .runtime
            .port_forward(req)
            .await
            .map(|r| r.into_inner().url)
    } else {
        let _ = client
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    let url = match url {
        Ok(url) => url,
        Err(status) => {
            let body = status.message().to_string();
            let reply = format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(reply.as_bytes()).await;
            return;
        }
    };
    // http://ADDR/exec/TOKEN -> ADDR and /exec/TOKEN?QUERY
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, new_path) = rest.split_at(rest.find('/').unwrap());
    let authority = authority.to_string();
    let ns = target.netns.clone();
    let upstream = tokio::task::spawn_blocking(move || {
        nodekit_nsutil::NetNs::open(&ns)
            .unwrap()
            .run(|| std::net::TcpStream::connect(authority.as_str()))
            .unwrap()
            .unwrap()
    })
    .await
    .unwrap();
    upstream.set_nonblocking(true).unwrap();
    let mut upstream = TcpStream::from_std(upstream).unwrap();
    let new_target = if query.is_empty() {
        new_path.to_string()
    } else {
        format!("{new_path}?{query}")
    };
    let head = head.replacen(&target_path, &new_target, 1);
    upstream.write_all(head.as_bytes()).await.unwrap();
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// The request head up to and including the blank line (the client sends no body before
/// the upgrade).
async fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
