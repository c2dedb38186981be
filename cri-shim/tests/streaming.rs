//! End-to-end tests of the streaming server: Exec, Attach and PortForward URLs from the CRI
//! socket, opened as `channel.k8s.io` WebSockets the way a kubelet's proxy opens them, and
//! by the real kubectl through a stand-in API server.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{log_records, Lab, LabOptions, OciRuntime};
use nodekit_proto::cri::v1 as cri;
use tokio_tungstenite::tungstenite;
use tonic::Code;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// A pod with one running `sleep` container under `runtime`: (lab, container ID, sandbox ID).
async fn lab_with_container(name: &str, runtime: OciRuntime) -> (Lab, String, String) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod(name).await;
    let id = lab
        .run_container(&pod, name, "main", &["sleep", "3600"])
        .await;
    (lab, id, pod)
}

fn exec_request(id: &str, cmd: &[&str], stdin: bool, tty: bool) -> cri::ExecRequest {
    cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    }
}

async fn exec_url(lab: &mut Lab, req: cri::ExecRequest) -> String {
    let answer = lab.runtime.exec(req).await.map(|r| r.into_inner().url);
    streaming_url(lab, "exec", answer)
}

/// The URL of an Exec or Attach (`kind`) answer, on the shim's loopback streaming server.
fn streaming_url(lab: &Lab, kind: &str, answer: Result<String, tonic::Status>) -> String {
    let url = answer.unwrap_or_else(|e| panic!("{kind}: {e}\n{}", lab.shim_log()));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(url.contains(&format!("/{kind}/")), "{url}");
    url
}

fn status(all: &BTreeMap<u8, Vec<u8>>) -> serde_json::Value {
    let raw = all.get(&ERROR).map(Vec::as_slice).unwrap_or_default();
    serde_json::from_slice(raw)
        .unwrap_or_else(|e| panic!("error channel {:?}: {e}", String::from_utf8_lossy(raw)))
}

fn text(all: &BTreeMap<u8, Vec<u8>>, channel: u8) -> String {
    String::from_utf8_lossy(all.get(&channel).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

async fn exec_without_tty_streams_stdout_stderr_stdin_and_the_exit_code(runtime: OciRuntime) {
    let (mut lab, id, _) = lab_with_container("wsexec", runtime).await;

    let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    let url = exec_url(&mut lab, exec_request(&id, &cmd, false, false)).await;
    let all = lab
        .stream_connect(&url, &["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(text(&all, STDOUT), "out\n");
    assert_eq!(text(&all, STDERR), "err\n");
    let st = status(&all);
    assert_eq!(st["status"], "Failure", "{st}");
    assert_eq!(st["reason"], "NonZeroExitCode", "{st}");
    assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode", "{st}");
    assert_eq!(st["details"]["causes"][0]["message"], "3", "{st}");

    // v5: stdin, ended with the CLOSE message.
    let url = exec_url(&mut lab, exec_request(&id, &["cat"], true, false)).await;
    let mut ch = lab
        .stream_connect(&url, &["v5.channel.k8s.io"])
        .await
        .unwrap();
    ch.send(STDIN, b"hello ").await;
    ch.send(STDIN, b"there\n").await;
    ch.send(CLOSE, &[STDIN]).await;
    let all = ch.collect().await;
    assert_eq!(text(&all, STDOUT), "hello there\n");
    assert_eq!(status(&all)["status"], "Success");

    // v4 base64: text messages.
    let url = exec_url(&mut lab, exec_request(&id, &["echo", "b64"], false, false)).await;
    let all = lab
        .stream_connect(&url, &["v4.base64.channel.k8s.io"])
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(text(&all, STDOUT), "b64\n");
    assert_eq!(status(&all)["status"], "Success");

    // A command that cannot run fails on the error channel.
    let url = exec_url(&mut lab, exec_request(&id, &["/no/such"], false, false)).await;
    let all = lab
        .stream_connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(status(&all)["status"], "Failure", "{all:?}");
}
per_runtime!(exec_without_tty_streams_stdout_stderr_stdin_and_the_exit_code);

async fn exec_with_tty_has_a_terminal_that_echoes_and_resizes(runtime: OciRuntime) {
    let (mut lab, id, _) = lab_with_container("wstty", runtime).await;
    let script =
        "tty; while read line; do [ \"$line\" = q ] && exit 0; echo got:$line; stty size; done";
    let url = exec_url(
        &mut lab,
        exec_request(&id, &["sh", "-c", script], true, true),
    )
    .await;
    let mut ch = lab
        .stream_connect(&url, &["v5.channel.k8s.io"])
        .await
        .unwrap();
    ch.send(RESIZE, br#"{"Width":100,"Height":30}"#).await;
    // Resizes travel apart from input: ask until the new size shows.
    let got = read_until(&mut ch, STDOUT, "30 100", Some(b"hi\r")).await;
    assert_eq!(got.keys().collect::<Vec<_>>(), [&STDOUT], "{got:?}");
    let out = &got[&STDOUT];
    assert!(out.contains("/dev/pts/"), "tty output: {out:?}");
    // The terminal echoes input and turns the typed \r into a line.
    assert!(out.contains("hi\r\n"), "no echo: {out:?}");
    assert!(out.contains("got:hi"), "{out:?}");
    ch.send(STDIN, b"q\r").await;
    let all = ch.collect().await;
    assert!(
        !all.contains_key(&STDERR),
        "a terminal has no stderr: {all:?}"
    );
    assert_eq!(status(&all)["status"], "Success", "{all:?}");
}
per_runtime!(exec_with_tty_has_a_terminal_that_echoes_and_resizes);

#[tokio::test]
async fn streaming_urls_are_single_use_and_requests_are_validated() {
    let (mut lab, id, pod) = lab_with_container("wsurl", OciRuntime::Runc).await;
    let http_status = |e: tungstenite::Error| match e {
        tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP error, got {other}"),
    };

    let url = exec_url(&mut lab, exec_request(&id, &["true"], false, false)).await;
    let bogus = format!("{}0", &url[..url.rfind('/').unwrap() + 1]);
    let err = lab.stream_connect(&bogus, &["v4.channel.k8s.io"]).await;
    assert_eq!(http_status(err.err().unwrap()), 404);
    // The token belongs to exec: not valid at /attach/.
    let wrong_kind = url.replace("/exec/", "/attach/");
    let err = lab
        .stream_connect(&wrong_kind, &["v4.channel.k8s.io"])
        .await;
    assert_eq!(http_status(err.err().unwrap()), 404);

    let url = exec_url(&mut lab, exec_request(&id, &["true"], false, false)).await;
    let all = lab
        .stream_connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(status(&all)["status"], "Success");
    let err = lab.stream_connect(&url, &["v4.channel.k8s.io"]).await;
    assert_eq!(http_status(err.err().unwrap()), 404, "a token is used once");

    // Requests the CRI rules refuse, and containers that cannot exec.
    let mut tty_stderr = exec_request(&id, &["true"], false, true);
    tty_stderr.stderr = true;
    let mut no_streams = exec_request(&id, &["true"], false, false);
    no_streams.stdout = false;
    no_streams.stderr = false;
    for (req, code) in [
        (tty_stderr, Code::InvalidArgument),
        (no_streams, Code::InvalidArgument),
        (exec_request(&id, &[], false, false), Code::InvalidArgument),
        (
            exec_request("nope", &["true"], false, false),
            Code::NotFound,
        ),
    ] {
        let err = lab.runtime.exec(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err}");
    }
    let exited = lab.run_container(&pod, "wsurl", "done", &["true"]).await;
    lab.wait_exited(&exited).await;
    let err = lab
        .runtime
        .exec(exec_request(&exited, &["true"], false, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let err = lab
        .runtime
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: "nope".into(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

async fn port_forward_reaches_a_port_inside_the_pod(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("wspf").await;
    lab.run_container(
        &pod,
        "wspf",
        "web",
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    .await;
    let url_for = |ports: Vec<i32>| {
        let mut rt = lab.runtime.clone();
        let pod = pod.clone();
        async move {
            rt.port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod,
                port: ports,
            })
            .await
            .unwrap()
            .into_inner()
            .url
        }
    };

    // httpd may take a moment to listen: retry until it answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let url = url_for(vec![8080]).await;
        let mut ch = lab
            .stream_connect(&url, &["v4.channel.k8s.io"])
            .await
            .unwrap();
        // Each channel opens with its port, little-endian.
        assert_eq!(ch.next().await, Some((0, 8080u16.to_le_bytes().to_vec())));
        assert_eq!(ch.next().await, Some((1, 8080u16.to_le_bytes().to_vec())));
        ch.send(0, b"GET /index.html HTTP/1.0\r\n\r\n").await;
        let all = ch.collect().await;
        if all.get(&0).is_some_and(|d| !d.is_empty()) {
            break String::from_utf8_lossy(&all[&0]).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no reply through the forward: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reply.starts_with("HTTP/1."), "{reply}");
    assert!(reply.contains("hello from nk"), "{reply}");

    // A port nobody listens on: the error channel says so.
    let url = url_for(vec![9]).await;
    let mut ch = lab
        .stream_connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    ch.next().await;
    ch.next().await;
    let all = ch.collect().await;
    let error = text(&all, 1);
    assert!(error.contains("localhost:9"), "{all:?}");
}
per_runtime!(port_forward_reaches_a_port_inside_the_pod);

/// Runs `kubectl` (client-go's real WebSocket and SPDY clients) in the node namespace against
/// the stand-in API server, which proxies to the shim's streaming server like a kubelet.
async fn kubectl(
    lab: &Lab,
    api: &common::apiserver::ApiServer,
    env: &[(&str, &str)],
    args: &[&str],
    input: &[u8],
) -> std::process::Output {
    let mut child = kubectl_command(lab, api, env, args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, input)
        .await
        .unwrap();
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kubectl ran past 60 s")
        .unwrap()
}

/// `kubectl ARGS` with `env`, pointed at the stand-in API server, run in the node namespace,
/// with piped stdout and stderr.
fn kubectl_command(
    lab: &Lab,
    api: &common::apiserver::ApiServer,
    env: &[(&str, &str)],
    args: &[&str],
) -> tokio::process::Command {
    assert!(
        which("kubectl"),
        "kubectl is missing: install it (apt-get install kubectl) for the client-go checks"
    );
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.arg(format!("--server=http://{}", api.addr))
        .arg(format!("--namespace={}", common::apiserver::NAMESPACE))
        .arg("--kubeconfig=/dev/null")
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    lab.node.apply_to_command(cmd.as_std_mut());
    cmd
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

#[tokio::test]
async fn kubectl_exec_works_over_websocket_and_spdy() {
    let (lab, id, pod) = lab_with_container("kexec", OciRuntime::Runc).await;
    let api = common::apiserver::ApiServer::start(
        lab.node.path().to_path_buf(),
        lab.runtime.clone(),
        &pod,
        &id,
        "main",
    );
    let cmd = [
        "exec",
        common::apiserver::POD,
        "-c",
        "main",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ];
    // kubectl speaks WebSocket v5 by default, SPDY/3.1 (v4.channel.k8s.io) when told.
    for env in [
        &[][..],
        &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")][..],
    ] {
        let out = kubectl(&lab, &api, env, &cmd, b"").await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{env:?}: stdout {stdout:?} stderr {stderr:?}\n{}",
            lab.shim_log()
        );
        assert_eq!(stdout, "out\n", "{env:?}");
        assert!(stderr.starts_with("err\n"), "{env:?}: {stderr:?}");
        // stdin, ended by kubectl when its own input ends.
        let cat = [
            "exec",
            "-i",
            common::apiserver::POD,
            "-c",
            "main",
            "--",
            "cat",
        ];
        let out = kubectl(&lab, &api, env, &cat, b"piped in\n").await;
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).as_ref()
            ),
            (Some(0), "piped in\n"),
            "{env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn kubectl_port_forward_reaches_the_pod_over_spdy() {
    let mut lab = Lab::start(LabOptions::default()).await;
    lab.pull().await;
    let pod = lab.run_pod("kpf").await;
    let id = lab
        .run_container(
            &pod,
            "kpf",
            "web",
            &["httpd", "-f", "-p", "8080", "-h", "/www"],
        )
        .await;
    let api = common::apiserver::ApiServer::start(
        lab.node.path().to_path_buf(),
        lab.runtime.clone(),
        &pod,
        &id,
        "web",
    );
    let mut child = kubectl_command(
        &lab,
        &api,
        &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")],
        &["port-forward", common::apiserver::POD, "18080:8080"],
    )
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        // Off the runtime thread: the stand-in API server relays on it meanwhile.
        let netns = lab.node.path().to_path_buf();
        let got = tokio::task::spawn_blocking(move || {
            nodekit_nsutil::NetNs::open(&netns)
                .unwrap()
                .run(|| -> std::io::Result<String> {
                    use std::io::{Read, Write};
                    let mut conn = std::net::TcpStream::connect("127.0.0.1:18080")?;
                    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                    // Whatever arrives until the end or a quiet spell.
                    let mut reply = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        reply.extend_from_slice(&buf[..n]);
                    }
                    Ok(String::from_utf8_lossy(&reply).into_owned())
                })
        })
        .await
        .unwrap()
        .unwrap();
        match got {
            Ok(reply) if reply.contains("hello from nk") => break reply,
            other => {
                if let Ok(Some(status)) = child.try_wait() {
                    let out = child.wait_with_output().await.unwrap();
                    panic!(
                        "kubectl port-forward exited {status}: {}\n{}",
                        String::from_utf8_lossy(&out.stderr),
                        lab.shim_log()
                    );
                }
                if Instant::now() >= deadline {
                    let _ = child.start_kill();
                    let out = child.wait_with_output().await.unwrap();
                    panic!(
                        "no reply through kubectl: {other:?}\n{}{}\n{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr),
                        lab.shim_log()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(reply.starts_with("HTTP/1."), "{reply}");
    let _ = child.kill().await;
}

/// Creates and starts a container with the given stdin and terminal settings.
async fn run_interactive(
    lab: &mut Lab,
    pod: &str,
    pod_name: &str,
    name: &str,
    command: &[&str],
    (stdin, stdin_once, tty): (bool, bool, bool),
) -> String {
    let mut config = lab.container_config(name, command);
    config.stdin = stdin;
    config.stdin_once = stdin_once;
    config.tty = tty;
    lab.run_container_with(pod, pod_name, config).await
}

fn attach_request(id: &str, stdin: bool, tty: bool) -> cri::AttachRequest {
    cri::AttachRequest {
        container_id: id.into(),
        stdin,
        tty,
        stdout: true,
        stderr: !tty,
    }
}

async fn attach_url(lab: &mut Lab, req: cri::AttachRequest) -> String {
    let answer = lab.runtime.attach(req).await.map(|r| r.into_inner().url);
    streaming_url(lab, "attach", answer)
}

/// An Attach session for `req` over the WebSocket subprotocol `protocol`.
async fn attach(lab: &mut Lab, req: cri::AttachRequest, protocol: &str) -> common::Channels {
    let url = attach_url(lab, req).await;
    lab.stream_connect(&url, &[protocol]).await.unwrap()
}

/// Asserts the container is still running a moment after a session ended (its stdin open).
async fn assert_still_running(lab: &mut Lab, id: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = lab.container_status(id).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerRunning as i32,
        "{s:?}"
    );
}

/// Reads the session's output (by channel) until `channel` holds `want`; sends `nudge` on
/// stdin every 300 ms meanwhile when given (a shell may not be reading yet).
async fn read_until(
    ch: &mut common::Channels,
    channel: u8,
    want: &str,
    nudge: Option<&[u8]>,
) -> BTreeMap<u8, String> {
    read_more(ch, BTreeMap::new(), channel, want, nudge).await
}

/// [`read_until`], adding to what `got` holds already.
async fn read_more(
    ch: &mut common::Channels,
    mut got: BTreeMap<u8, String>,
    channel: u8,
    want: &str,
    nudge: Option<&[u8]>,
) -> BTreeMap<u8, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if got.get(&channel).is_some_and(|t| t.contains(want)) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} on channel {channel}: {got:?}"
        );
        if let Some(input) = nudge {
            ch.send(STDIN, input).await;
        }
        let wait = Instant::now() + Duration::from_millis(300);
        while Instant::now() < wait {
            match tokio::time::timeout(Duration::from_millis(100), ch.next()).await {
                Ok(Some((c, data))) => got
                    .entry(c)
                    .or_default()
                    .push_str(&String::from_utf8_lossy(&data)),
                Ok(None) => panic!("session closed early: {got:?}"),
                Err(_) => {}
            }
        }
    }
}

/// Waits until the container's CRI log has a record of `stream` containing `want`.
async fn wait_logged(lab: &mut Lab, id: &str, stream: &str, want: &str) {
    let path = lab.container_status(id).await.log_path;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log_records(&path)
        .iter()
        .any(|(s, _, m)| s == stream && m.contains(want))
    {
        assert!(
            Instant::now() < deadline,
            "no {stream} record with {want:?} in {path}: {:?}",
            log_records(&path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn attach_relays_stdin_stdout_and_stderr_of_a_shell_and_output_is_logged(
    runtime: OciRuntime,
) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("attach").await;
    let id = run_interactive(
        &mut lab,
        &pod,
        "attach",
        "sh",
        &["sh"],
        (true, false, false),
    )
    .await;

    let mut ch = attach(
        &mut lab,
        attach_request(&id, true, false),
        "v5.channel.k8s.io",
    )
    .await;
    ch.send(STDIN, b"echo hello; echo oops >&2\n").await;
    let got = read_until(&mut ch, STDOUT, "hello\n", None).await;
    let got = read_more(&mut ch, got, STDERR, "oops\n", None).await;
    assert_eq!(got.get(&ERROR), None, "{got:?}");
    wait_logged(&mut lab, &id, "stdout", "hello").await;
    wait_logged(&mut lab, &id, "stderr", "oops").await;

    // The client leaves (closing its stdin): without stdin_once the shell keeps its stdin
    // and a later session carries on with it.
    ch.send(CLOSE, &[STDIN]).await;
    drop(ch);
    assert_still_running(&mut lab, &id).await;
    let mut ch = attach(
        &mut lab,
        attach_request(&id, true, false),
        "v4.base64.channel.k8s.io",
    )
    .await;
    read_until(&mut ch, STDOUT, "again", Some(b"echo again\n")).await;

    // Output reaches every attached session; one without stdin only watches.
    let mut watcher = attach(
        &mut lab,
        attach_request(&id, false, false),
        "v4.channel.k8s.io",
    )
    .await;
    let watched = tokio::spawn(async move {
        read_until(&mut watcher, STDOUT, "both", None).await;
    });
    read_until(&mut ch, STDOUT, "both", Some(b"echo both\n")).await;
    // The watcher's session may reach the monitor after that first "both" (attach shows
    // output from when it joins): the shell echoes on until the watcher has seen one.
    while !watched.is_finished() {
        ch.send(STDIN, b"echo both\n").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    watched.await.unwrap();

    // The shell exits: the session ends with a success status.
    ch.send(STDIN, b"exit 4\n").await;
    let all = ch.collect().await;
    assert_eq!(status(&all)["status"], "Success", "{all:?}");
    assert_eq!(lab.wait_exited(&id).await.exit_code, 4);
}
per_runtime!(attach_relays_stdin_stdout_and_stderr_of_a_shell_and_output_is_logged);

async fn attach_to_a_tty_container_shows_its_terminal_and_resizes_it(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("attty").await;
    let id = run_interactive(&mut lab, &pod, "attty", "sh", &["sh"], (true, false, true)).await;
    let mut ch = attach(
        &mut lab,
        attach_request(&id, true, true),
        "v5.channel.k8s.io",
    )
    .await;
    ch.send(STDIN, b"tty\r").await;
    read_until(&mut ch, STDOUT, "/dev/pts/", None).await;
    ch.send(RESIZE, br#"{"Width":100,"Height":30}"#).await;
    let got = read_until(&mut ch, STDOUT, "30 100", Some(b"stty size\r")).await;
    assert!(
        !got.contains_key(&STDERR),
        "a terminal has no stderr: {got:?}"
    );
    // The terminal's output is logged as stdout records.
    wait_logged(&mut lab, &id, "stdout", "30 100").await;
    ch.send(STDIN, b"exit\r").await;
    let all = ch.collect().await;
    assert_eq!(status(&all)["status"], "Success", "{all:?}");
    lab.wait_exited(&id).await;
}
per_runtime!(attach_to_a_tty_container_shows_its_terminal_and_resizes_it);

async fn stdin_once_closes_stdin_when_the_first_session_with_stdin_ends(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("once").await;
    let script = "cat; echo stdin closed";
    let id = run_interactive(
        &mut lab,
        &pod,
        "once",
        "cat",
        &["sh", "-c", script],
        (true, true, false),
    )
    .await;

    // A session without stdin does not count.
    drop(
        attach(
            &mut lab,
            attach_request(&id, false, false),
            "v5.channel.k8s.io",
        )
        .await,
    );
    assert_still_running(&mut lab, &id).await;

    let mut ch = attach(
        &mut lab,
        attach_request(&id, true, false),
        "v5.channel.k8s.io",
    )
    .await;
    ch.send(STDIN, b"abc\n").await;
    read_until(&mut ch, STDOUT, "abc\n", None).await;
    ch.send(CLOSE, &[STDIN]).await;
    let all = ch.collect().await;
    assert_eq!(text(&all, STDOUT), "stdin closed\n", "{all:?}");
    assert_eq!(status(&all)["status"], "Success", "{all:?}");
    assert_eq!(lab.wait_exited(&id).await.exit_code, 0);
}
per_runtime!(stdin_once_closes_stdin_when_the_first_session_with_stdin_ends);

#[tokio::test]
async fn attach_requests_are_validated_with_the_contracts_codes() {
    let mut lab = Lab::start(LabOptions::default()).await;
    lab.pull().await;
    let pod = lab.run_pod("atterr").await;
    let plain = lab
        .run_container(&pod, "atterr", "plain", &["sleep", "3600"])
        .await;
    let exited = lab.run_container(&pod, "atterr", "done", &["true"]).await;
    lab.wait_exited(&exited).await;
    let mut tty_stderr = attach_request(&plain, false, true);
    tty_stderr.stderr = true;
    let mut no_streams = attach_request(&plain, false, false);
    no_streams.stdout = false;
    no_streams.stderr = false;
    for (req, code, names) in [
        (
            attach_request("", false, false),
            Code::InvalidArgument,
            "container_id",
        ),
        (tty_stderr, Code::InvalidArgument, "stderr"),
        (no_streams, Code::InvalidArgument, "stdin"),
        (attach_request("nope", false, false), Code::NotFound, "nope"),
        (
            attach_request(&exited, false, false),
            Code::FailedPrecondition,
            "exited",
        ),
        (
            attach_request(&plain, true, false),
            Code::FailedPrecondition,
            "without stdin",
        ),
    ] {
        let err = lab.runtime.attach(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err}");
        assert!(err.message().contains(names), "{req:?}: {err}");
    }
    // Output only, from a container without stdin: fine. The token is for /attach/ only.
    let url = attach_url(&mut lab, attach_request(&plain, false, false)).await;
    let err = lab
        .stream_connect(&url.replace("/attach/", "/exec/"), &["v4.channel.k8s.io"])
        .await;
    assert!(err.is_err(), "an attach token opened an exec");
}

async fn attach_works_after_a_shim_restart(runtime: OciRuntime) {
    let mut lab = Lab::start(LabOptions::with_runtime(runtime)).await;
    lab.pull().await;
    let pod = lab.run_pod("attrestart").await;
    let id = run_interactive(
        &mut lab,
        &pod,
        "attrestart",
        "sh",
        &["sh"],
        (true, false, false),
    )
    .await;
    lab.kill_shim();
    lab.start_shim().await;
    let mut ch = attach(
        &mut lab,
        attach_request(&id, true, false),
        "v5.channel.k8s.io",
    )
    .await;
    read_until(&mut ch, STDOUT, "survived", Some(b"echo survived\n")).await;
    wait_logged(&mut lab, &id, "stdout", "survived").await;
}
per_runtime!(attach_works_after_a_shim_restart);

#[tokio::test]
async fn kubectl_attach_works_over_websocket_and_spdy() {
    let mut lab = Lab::start(LabOptions::default()).await;
    lab.pull().await;
    let pod = lab.run_pod("katt").await;
    // kubectl speaks WebSocket v5 by default, SPDY/3.1 when told.
    for (name, env) in [
        ("ws", &[][..]),
        (
            "spdy",
            &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")][..],
        ),
    ] {
        let id = run_interactive(&mut lab, &pod, "katt", name, &["sh"], (true, true, false)).await;
        let api = common::apiserver::ApiServer::start(
            lab.node.path().to_path_buf(),
            lab.runtime.clone(),
            &pod,
            &id,
            name,
        );
        // kubectl's input ends after the script: stdin_once closes the shell's stdin.
        let args = ["attach", "-i", common::apiserver::POD, "-c", name];
        let out = kubectl(&lab, &api, env, &args, b"echo from $0\necho err >&2\n").await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("from sh\n") && stderr.contains("err\n"),
            "{name}: {:?} stdout {stdout:?} stderr {stderr:?}\n{}",
            out.status,
            lab.shim_log()
        );
        assert_eq!(lab.wait_exited(&id).await.exit_code, 0, "{name}");
    }
}

async fn exec_commands_end_when_their_client_goes_away(runtime: OciRuntime) {
    let (mut lab, id, _) = lab_with_container("wsgone", runtime).await;
    for tty in [false, true] {
        let url = exec_url(&mut lab, exec_request(&id, &["sleep", "3600"], true, tty)).await;
        let ch = lab
            .stream_connect(&url, &["v5.channel.k8s.io"])
            .await
            .unwrap();
        // Wait until the command runs, then hang up.
        let sleeps = |lab: &mut Lab| {
            let mut rt = lab.runtime.clone();
            let id = id.clone();
            async move {
                let ps = rt
                    .exec_sync(cri::ExecSyncRequest {
                        container_id: id,
                        cmd: vec!["sh".into(), "-c".into(), "cat /proc/[0-9]*/stat".into()],
                        timeout: 10,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                String::from_utf8_lossy(&ps.stdout)
                    .matches("(sleep)")
                    .count()
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while sleeps(&mut lab).await < 2 {
            assert!(Instant::now() < deadline, "tty {tty}: the exec never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(ch);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sleeps(&mut lab).await > 1 {
            assert!(
                Instant::now() < deadline,
                "tty {tty}: the command outlived its client\n{}",
                lab.shim_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let runtime_dir = lab.path("state/runtime");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let execs: Vec<_> =
                nodekit_conformance::cri::lab::procs::mentioning(&runtime_dir.to_string_lossy())
                    .into_iter()
                    .filter(|p| p.program() == runtime.name())
                    .collect();
            if execs.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tty {tty}: {} exec left running: {execs:?}",
                runtime.name()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
per_runtime!(exec_commands_end_when_their_client_goes_away);
