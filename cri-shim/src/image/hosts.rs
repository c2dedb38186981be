//! Registry hosts with containerd's `hosts.toml` meaning (`config_path`, e.g.
//! `/etc/containerd/certs.d`): `DIR/<host[:port]>/hosts.toml`, else `DIR/_default/hosts.toml`,
//! lists mirrors as `[host."URL"]` tables, tried in file order, then `server` (default: the
//! registry itself). Each host has `capabilities` (`pull`, `resolve`, `push`), `skip_verify`,
//! `ca` (PEM files, relative to the file's directory), `override_path` (the URL path replaces
//! `/v2`; it must contain a `/v2` segment), `dial_timeout` and `proxy`. `header` and `client`
//! are refused (the registry client can send neither). Only the transport changes: images
//! keep their original names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

/// A `hosts.toml` that cannot be read or used; `path` and `field` say where.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file exists but could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path}: {source}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A field holds something we cannot use.
    #[error("{path}: {field}: {reason}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field (`host."http://m:5000".capabilities`...).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// One place an image can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// Where requests go: `host[:port][/path]` in front of `/v2/...`; `None` for the image's
    /// own registry reached the usual way (no `server` configured).
    pub base: Option<String>,
    /// Path segments between `/v2/` and the repository (an `override_path` URL's path after
    /// its `/v2`), empty normally.
    pub repository_prefix: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// May serve manifests and blobs by digest.
    pub pull: bool,
    /// May resolve tags to manifests.
    pub resolve: bool,
    /// Accept any TLS certificate.
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files).
    pub ca: Vec<PathBuf>,
    /// How long connecting may take before the next host is tried.
    pub dial_timeout: Duration,
    /// HTTP(S) proxy URL for this host.
    pub proxy: Option<String>,
}

/// containerd's default `dial_timeout`.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(30);

impl RegistryHost {
    /// The image's own registry, reached as before mirrors existed.
    pub fn upstream(plain_http: bool) -> Self {
        Self {
            base: None,
            repository_prefix: String::new(),
            plain_http,
            pull: true,
            resolve: true,
            skip_verify: false,
            ca: Vec::new(),
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            proxy: None,
        }
    }

    /// The host as a URL, for logs and errors.
    pub fn describe(&self, registry: &str) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        let base = self.base.as_deref().unwrap_or(registry);
        match self.repository_prefix.as_str() {
            "" => format!("{scheme}://{base}"),
            prefix => format!("{scheme}://{base}/v2/{prefix}"),
        }
    }
}

/// The hosts to try for `registry` (`host[:port]`, as in image names), in order. The file is
/// looked up as containerd does: `DIR/host_port_/`, `DIR/host:port/`, then `DIR/_default/`.
/// Without a config dir or any of these files, only the upstream (`plain_http` saying how it
/// is reached).
pub fn hosts_for(
    config_dir: Option<&Path>,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, HostsError> {
    let Some(dir) = config_dir else {
        return Ok(vec![RegistryHost::upstream(plain_http)]);
    };
    let underscored = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map(|(host, port)| format!("{host}_{port}_"));
    for sub in underscored
        .iter()
        .map(String::as_str)
        .chain([registry, "_default"])
    {
        let path = dir.join(sub).join("hosts.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => return parse(&text, &path, plain_http),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(HostsError::Read { path, source }),
        }
    }
    Ok(vec![RegistryHost::upstream(plain_http)])
}

/// Parses one `hosts.toml` (read from `path`, which relative `ca` paths and errors refer to):
/// its `[host."URL"]` tables in file order, then the `server` (or the upstream, reached as
/// `plain_http` says).
pub fn parse(text: &str, path: &Path, plain_http: bool) -> Result<Vec<RegistryHost>, HostsError> {
    let table: Table = toml::from_str(text).map_err(|e| HostsError::Syntax {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let field_err = |field: &str, reason: String| HostsError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    let mut hosts = Vec::new();
    if let Some(value) = table.get("host") {
        let Value::Table(entries) = value else {
            return Err(field_err("host", "must be a table of URLs".into()));
        };
        for (url, value) in entries {
            let prefix = format!("host.{url:?}");
            let Value::Table(settings) = value else {
                return Err(field_err(&prefix, "must be a table".into()));
            };
            let host = host_entry(Some(url), settings, &prefix, dir, &field_err)?;
            hosts.push(host);
        }
    }
    let server = match table.get("server") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(field_err("server", "must be a URL string".into())),
    };
    let top: Table = table
        .iter()
        .filter(|(k, _)| k.as_str() != "host" && k.as_str() != "server")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut upstream = host_entry(server, &top, "", dir, &field_err)?;
    if server.is_none() {
        upstream.plain_http = plain_http;
    }
    hosts.push(upstream);
    Ok(hosts)
}

/// One host from its URL (`None`: the upstream) and its settings; `prefix` names the table.
fn host_entry(
    url: Option<&str>,
    settings: &Table,
    prefix: &str,
    dir: &Path,
    field_err: &dyn Fn(&str, String) -> HostsError,
) -> Result<RegistryHost, HostsError> {
    let name = |field: &str| {
        if prefix.is_empty() {
            field.to_string()
        } else {
            format!("{prefix}.{field}")
        }
    };
    let override_path = match settings.get("override_path") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(_) => {
            return Err(field_err(
                &name("override_path"),
                "must be a boolean".into(),
            ))
        }
    };
    let mut host = RegistryHost::upstream(false);
    if let Some(url) = url {
        let url_field = if prefix.is_empty() {
            "server".to_string()
        } else {
            prefix.to_string()
        };
        let (plain_http, base, repository_prefix) = parse_url(url, override_path)
            .map_err(|reason| field_err(&url_field, format!("{url:?}: {reason}")))?;
        host.plain_http = plain_http;
        host.base = Some(base);
        host.repository_prefix = repository_prefix;
    }
    for (key, value) in settings {
        let field = name(key);
        match (key.as_str(), value) {
            ("capabilities", Value::Array(caps)) => {
                host.pull = false;
                host.resolve = false;
                for cap in caps {
                    match cap.as_str() {
                        Some("pull") => host.pull = true,
                        Some("resolve") => host.resolve = true,
                        Some("push") => {}
                        _ => {
                            return Err(field_err(
                                &field,
                                format!("unknown capability {cap:?} (pull, resolve, push)"),
                            ))
                        }
                    }
                }
            }
            ("skip_verify", Value::Boolean(b)) => host.skip_verify = *b,
            ("ca", Value::String(p)) => host.ca.push(dir.join(p)),
            ("ca", Value::Array(paths)) => {
                for p in paths {
                    let p = p
                        .as_str()
                        .ok_or_else(|| field_err(&field, "must hold file paths".into()))?;
                    host.ca.push(dir.join(p));
                }
            }
            ("dial_timeout", Value::String(d)) => {
                host.dial_timeout = parse_duration(d)
                    .ok_or_else(|| field_err(&field, format!("{d:?} is not a duration like 1s or 500ms")))?;
            }
            ("proxy", Value::String(proxy)) => {
                let scheme_ok = ["http://", "https://", "socks5://", "socks5h://"]
                    .iter()
                    .any(|s| proxy.starts_with(s));
                if !scheme_ok {
                    return Err(field_err(
                        &field,
                        format!("{proxy:?} must be an http, https, socks5 or socks5h URL"),
                    ));
                }
                host.proxy = Some(proxy.clone());
            }
            ("override_path", _) => {}
            ("header" | "client", _) => {
                return Err(field_err(
                    &field,
                    "not supported: nodekit-cri's registry client sends neither custom headers nor client certificates"
                        .into(),
                ))
            }
            ("capabilities" | "skip_verify" | "ca" | "dial_timeout" | "proxy", _) => {
                return Err(field_err(&field, format!("has the wrong type: {value:?}")))
            }
            _ => return Err(field_err(&field, "unknown field".into())),
        }
    }
    Ok(host)
}

/// `scheme://authority[/path]` to (plain HTTP, the base the client puts `/v2/...` after, the
/// repository prefix). Without `override_path`, `/v2` follows the path; with it, the path
/// replaces `/v2`, and since the client always sends `/v2/<name>`, it must hold a `/v2`
/// segment: what precedes it joins the base, what follows prefixes the repository.
fn parse_url(url: &str, override_path: bool) -> Result<(bool, String, String), String> {
    let (plain_http, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (false, rest)
    } else {
        return Err("must start with http:// or https://".into());
    };
    let rest = rest.trim_end_matches('/');
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() || authority.contains(['?', '#', '@']) {
        return Err("needs a host[:port]".into());
    }
    if !override_path {
        return Ok((plain_http, format!("{authority}{path}"), String::new()));
    }
    let segments: Vec<&str> = path.split('/').collect();
    let v2 = segments.iter().rposition(|s| *s == "v2").ok_or_else(|| {
        "with override_path the path must hold a /v2 segment (the client always sends /v2/<name>)"
            .to_string()
    })?;
    Ok((
        plain_http,
        format!("{authority}{}", segments[..v2].join("/")),
        segments[v2 + 1..].join("/"),
    ))
}

/// A Go duration as containerd reads `dial_timeout`: `1s`, `500ms`, `1m30s`.
fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * seconds).ok()?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(base: &str, plain_http: bool, pull: bool, resolve: bool) -> RegistryHost {
        RegistryHost {
            base: Some(base.into()),
            plain_http,
            pull,
            resolve,
            ..RegistryHost::upstream(plain_http)
        }
    }

    #[test]
    fn hosts_come_in_file_order_then_the_server() {
        let text = r#"
server = "https://registry.k8s.io"

[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]

[host."https://mirror.lan/cache"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["ca.pem", "/etc/other.pem"]

[host."http://a.lan:5000/v2"]
  override_path = true

[host."https://odd.lan/api/v2/upstream/"]
  override_path = true
  dial_timeout = "1m500ms"
  proxy = "http://proxy.lan:3128"
"#;
        let hosts = parse(
            text,
            Path::new("/etc/certs.d/registry.k8s.io/hosts.toml"),
            false,
        )
        .unwrap();
        let mut cached = mirror("mirror.lan/cache", false, true, false);
        cached.skip_verify = true;
        cached.ca = vec![
            "/etc/certs.d/registry.k8s.io/ca.pem".into(),
            "/etc/other.pem".into(),
        ];
        let mut odd = mirror("odd.lan/api", false, true, true);
        odd.repository_prefix = "upstream".into();
        odd.dial_timeout = Duration::from_millis(60_500);
        odd.proxy = Some("http://proxy.lan:3128".into());
        assert_eq!(odd.describe("x"), "https://odd.lan/api/v2/upstream");
        assert_eq!(
            hosts,
            vec![
                mirror("127.0.0.1:5001", true, true, true),
                cached,
                mirror("a.lan:5000", true, true, true),
                odd,
                mirror("registry.k8s.io", false, true, true),
            ]
        );
    }

    #[test]
    fn without_server_the_upstream_comes_last_and_keeps_its_transport() {
        let text = "[host.\"http://m:5000\"]\n";
        let hosts = parse(text, Path::new("/d/x/hosts.toml"), true).unwrap();
        assert_eq!(hosts[1], RegistryHost::upstream(true));
        let top_level = parse("capabilities = [\"pull\"]\n", Path::new("/h.toml"), false).unwrap();
        assert_eq!(
            top_level,
            vec![RegistryHost {
                resolve: false,
                ..RegistryHost::upstream(false)
            }]
        );
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let path = Path::new("/etc/certs.d/docker.io/hosts.toml");
        let cases = [
            (
                "[host.\"http://m\"]\ncapabilities = [\"fly\"]\n",
                "host.\"http://m\".capabilities",
            ),
            ("[host.\"ftp://m\"]\n", "host.\"ftp://m\""),
            (
                "[host.\"http://m/x\"]\noverride_path = true\n",
                "host.\"http://m/x\"",
            ),
            ("[host.\"http://m\"]\nheader = {a = \"b\"}\n", "header"),
            ("[host.\"http://m\"]\nclient = \"c.pem\"\n", "client"),
            (
                "[host.\"http://m\"]\ndial_timeout = \"soon\"\n",
                "dial_timeout",
            ),
            ("proxy = \"ftp://p\"\n", "proxy"),
            ("server = 3\n", "server"),
            ("skip_verify = \"yes\"\n", "skip_verify"),
            ("mirrors = []\n", "mirrors"),
        ];
        for (text, field) in cases {
            let err = parse(text, path, false).unwrap_err().to_string();
            assert!(
                err.starts_with("/etc/certs.d/docker.io/hosts.toml: ") && err.contains(field),
                "{text:?}: {err}"
            );
        }
        let err = parse("server = ", path, false).unwrap_err().to_string();
        assert!(err.contains("hosts.toml"), "{err}");
    }

    #[test]
    fn the_registry_dir_wins_over_default_and_none_means_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let write = |sub: &str, text: &str| {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            std::fs::write(dir.path().join(sub).join("hosts.toml"), text).unwrap();
        };
        assert_eq!(
            hosts_for(Some(dir.path()), "registry.k8s.io", false).unwrap(),
            vec![RegistryHost::upstream(false)]
        );
        write("_default", "[host.\"http://default:1\"]\n");
        write("127.0.0.1:5000", "server = \"http://127.0.0.1:5000\"\n");
        write("10.0.0.1_5000_", "server = \"http://first:1\"\n");
        write("10.0.0.1:5000", "server = \"http://second:1\"\n");
        let hosts = hosts_for(Some(dir.path()), "10.0.0.1:5000", false).unwrap();
        assert_eq!(
            hosts[0].base.as_deref(),
            Some("first:1"),
            "host_port_ first"
        );
        let hosts = hosts_for(Some(dir.path()), "registry.k8s.io", false).unwrap();
        assert_eq!(hosts[0].base.as_deref(), Some("default:1"));
        let hosts = hosts_for(Some(dir.path()), "127.0.0.1:5000", true).unwrap();
        assert_eq!(hosts, vec![mirror("127.0.0.1:5000", true, true, true)]);
        assert_eq!(
            hosts_for(None, "x", true).unwrap(),
            vec![RegistryHost::upstream(true)]
        );
    }
}
