//! The lab's image registry: Debian's `docker-registry` serving on [`REGISTRY`] inside the
//! node namespace, its storage in the lab directory, and image pushes with the OCI
//! distribution protocol over plain HTTP/1.1 (one `Connection: close` request per call:
//! upload each blob, then put the manifest).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nodekit_nsutil::NetNs;

use super::image::{digest, manifest, Layer};
use super::LabError;

/// Where the registry listens (loopback of the node namespace).
pub const REGISTRY: &str = "127.0.0.1:5000";
/// Where the HTTPS registry listens (same storage as [`REGISTRY`]).
pub const TLS_REGISTRY: &str = "127.0.0.1:5443";
/// The registry executable.
pub const BINARY: &str = "/usr/bin/docker-registry";
/// Makes the HTTPS registry's CA and certificate.
pub const OPENSSL: &str = "/usr/bin/openssl";
/// How long the registry may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one HTTP exchange may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the registry inside `node` with its storage under `dir/registry`, logging to
/// `dir/registry.log`; returns once it accepts connections.
pub fn start(node: &NetNs, dir: &Path) -> Result<Child, LabError> {
    serve(node, dir, "registry", REGISTRY, "")
}

/// Starts a second registry on [`TLS_REGISTRY`] serving the same storage over HTTPS, with a
/// certificate for 127.0.0.1 issued by a CA of its own (made with Debian's openssl);
/// returns it and the CA's PEM file, which a client must trust.
pub fn start_tls(node: &NetNs, dir: &Path) -> Result<(Child, PathBuf), LabError> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(LabError::io("creating", &pki))?;
    let ext = pki.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(LabError::io("writing", &ext))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for args in [
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=nk lab CA",
            ],
            &[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ]
        .concat(),
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ][..],
    ] {
        let out = Command::new(OPENSSL)
            .args(args)
            .current_dir(&pki)
            .output()
            .map_err(|source| LabError::Spawn {
                what: OPENSSL,
                source,
            })?;
        if !out.status.success() {
            return Err(LabError::Start {
                what: "openssl",
                detail: format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
    }
    let tls = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        pki.join("server.pem").display(),
        pki.join("server.key").display()
    );
    let child = serve(node, dir, "registry-tls", TLS_REGISTRY, &tls)?;
    Ok((child, pki.join("ca.pem")))
}

/// Runs docker-registry on `addr` over the storage `dir/registry`, with `http_extra` appended
/// to its `http:` section (`tls:` settings), config and log named after `name`.
fn serve(
    node: &NetNs,
    dir: &Path,
    name: &str,
    addr: &str,
    http_extra: &str,
) -> Result<Child, LabError> {
    let storage = dir.join("registry");
    std::fs::create_dir_all(&storage).map_err(LabError::io("creating", &storage))?;
    let config = dir.join(format!("{name}.yml"));
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{http_extra}",
            storage.display()
        ),
    )
    .map_err(LabError::io("writing", &config))?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).map_err(LabError::io("creating", &log_path))?;
    let mut cmd = Command::new(BINARY);
    cmd.arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log);
    node.apply_to_command(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        what: BINARY,
        source,
    })?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if node.run(|| TcpStream::connect(addr).is_ok())? {
            return Ok(child);
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Start {
                what: "docker-registry",
                detail: format!(
                    "not listening on {addr}: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pushes the image `REGISTRY/repo:tag` made of `config` and `layer` (run inside the node
/// namespace, where the registry listens).
pub fn push(
    node: &NetNs,
    repo: &str,
    tag: &str,
    config: &[u8],
    layer: &Layer,
) -> Result<(), LabError> {
    let manifest = manifest(config, layer);
    node.run(|| {
        upload_blob(repo, &layer.gzip)?;
        upload_blob(repo, config)?;
        let target = format!("/v2/{repo}/manifests/{tag}");
        let resp = exchange(
            "PUT",
            &target,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )?;
        expect_status(&resp, 201, &target)
    })?
}

/// One blob: start an upload session, then finish it in a single PUT with the digest.
fn upload_blob(repo: &str, blob: &[u8]) -> Result<(), LabError> {
    let start = format!("/v2/{repo}/blobs/uploads/");
    let resp = exchange("POST", &start, "application/octet-stream", &[])?;
    expect_status(&resp, 202, &start)?;
    let location = resp.location.ok_or_else(|| LabError::Registry {
        step: start.clone(),
        detail: "202 without a Location header".into(),
    })?;
    let path = location
        .strip_prefix(&format!("http://{REGISTRY}"))
        .unwrap_or(&location);
    let sep = if path.contains('?') { '&' } else { '?' };
    let target = format!("{path}{sep}digest={}", digest(blob));
    let resp = exchange("PUT", &target, "application/octet-stream", blob)?;
    expect_status(&resp, 201, &target)
}

/// A response's status line code, `Location` header and body.
#[derive(Debug)]
struct Response {
    status: u16,
    location: Option<String>,
    body: String,
}

fn expect_status(resp: &Response, want: u16, step: &str) -> Result<(), LabError> {
    if resp.status == want {
        return Ok(());
    }
    Err(LabError::Registry {
        step: step.to_string(),
        detail: format!("HTTP {} (wanted {want}): {}", resp.status, resp.body.trim()),
    })
}

/// One HTTP/1.1 request to the registry; reads the response to the end.
fn exchange(
    method: &str,
    target: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Response, LabError> {
    let step = format!("{method} {target}");
    let err = |detail: String| LabError::Registry {
        step: step.clone(),
        detail,
    };
    let mut stream = TcpStream::connect(REGISTRY).map_err(|e| err(e.to_string()))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| err(e.to_string()))?;
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {REGISTRY}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| err(e.to_string()))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| err(e.to_string()))?;
    parse_response(&raw).ok_or_else(|| {
        err(format!(
            "malformed response: {}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let location = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("location"))
        .map(|(_, v)| v.trim().to_string());
    Some(Response {
        status,
        location,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_give_status_location_and_body() {
        let r = parse_response(
            b"HTTP/1.1 202 Accepted\r\nlocation: http://127.0.0.1:5000/v2/x/blobs/uploads/u?_state=s\r\nContent-Length: 0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(r.status, 202);
        assert_eq!(
            r.location.as_deref(),
            Some("http://127.0.0.1:5000/v2/x/blobs/uploads/u?_state=s")
        );
        let r = parse_response(b"HTTP/1.1 400 Bad Request\r\n\r\n{\"errors\":[]}").expect("parses");
        assert_eq!(
            (r.status, r.location, r.body.as_str()),
            (400, None, "{\"errors\":[]}")
        );
        assert!(parse_response(b"garbage").is_none());
    }
}
