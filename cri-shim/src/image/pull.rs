//! Pulling an image from an OCI distribution registry with oci-client: manifest (an index
//! resolved to this platform), config, then each missing layer streamed to a temp file
//! (oci-client checks the blob digest), unpacked and checked against its diff ID, and moved
//! into the store by chain ID. Loopback registries and those configured insecure are reached
//! over plain HTTP, as containerd and docker do.

use std::net::IpAddr;

use std::path::PathBuf;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::ImageConfiguration;
use sha2::{Digest, Sha256};

use super::hosts::{self, RegistryHost};
use super::{normalize, unpack, ImageError, ImageRecord, ImageStore};
use crate::store;

/// Registry access settings.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host` or `host:port`) reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// containerd's `config_path`: `DIR/<host>/hosts.toml` mirrors (see [`hosts`]).
    pub registry_config_dir: Option<PathBuf>,
}

/// Installs the process-wide rustls crypto provider (ring) once; oci-client's HTTP client
/// needs one before it is built.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Whether `registry` (`host[:port]`) is reached over plain HTTP.
pub fn is_plain_http(registry: &str, opts: &PullOptions) -> bool {
    if opts.insecure_registries.iter().any(|r| r == registry) {
        return true;
    }
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    opts.insecure_registries.iter().any(|r| r == host)
        || host == "localhost"
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The chain IDs of a layer stack from its diff IDs (OCI image spec: `chain[0] = diff[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff[n])`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(prev) => format!("sha256:{:x}", Sha256::digest(format!("{prev} {diff}"))),
        };
        out.push(next);
    }
    out
}

fn registry_error(reference: &str, err: OciDistributionError) -> ImageError {
    let not_found = match &err {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code: 404, .. } => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound
            )
        }),
        _ => false,
    };
    let unauthorized = matches!(
        &err,
        OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_)
    );
    if not_found {
        ImageError::RemoteNotFound {
            reference: reference.to_string(),
            message: err.to_string(),
        }
    } else if unauthorized {
        ImageError::Unauthorized {
            reference: reference.to_string(),
            message: err.to_string(),
        }
    } else {
        ImageError::Registry {
            reference: reference.to_string(),
            source: err,
        }
    }
}

/// One host an image can come from, with a client set up for it.
struct Endpoint {
    host: RegistryHost,
    client: Client,
    /// The image's reference, its mirror registry set when the host is not the upstream.
    reference: Reference,
    /// The host as a URL, for logs.
    url: String,
}

/// Clients for the hosts of `reference`'s registry (see [`hosts`]), in order.
fn endpoints(reference: &Reference, opts: &PullOptions) -> Result<Vec<Endpoint>, ImageError> {
    let registry = reference.registry();
    let hosts = hosts::hosts_for(
        opts.registry_config_dir.as_deref(),
        registry,
        is_plain_http(reference.resolve_registry(), opts),
    )
    .map_err(|source| ImageError::Hosts {
        reference: reference.whole(),
        source,
    })?;
    ensure_crypto_provider();
    hosts
        .into_iter()
        .map(|host| {
            let mut extra_root_certificates = Vec::new();
            for path in &host.ca {
                let data = std::fs::read(path).map_err(|source| store::StoreError::Io {
                    path: path.clone(),
                    source,
                })?;
                extra_root_certificates.push(Certificate {
                    encoding: CertificateEncoding::Pem,
                    data,
                });
            }
            let client = Client::new(ClientConfig {
                protocol: if host.plain_http {
                    ClientProtocol::Http
                } else {
                    ClientProtocol::Https
                },
                accept_invalid_certificates: host.skip_verify,
                extra_root_certificates,
                connect_timeout: Some(host.dial_timeout),
                http_proxy: host.proxy.clone(),
                https_proxy: host.proxy.clone(),
                ..Default::default()
            });
            let mut mirrored = with_repository_prefix(reference, &host.repository_prefix);
            if let Some(base) = host.base.as_deref().filter(|b| *b != registry) {
                mirrored.set_mirror_registry(base.to_string());
            }
            Ok(Endpoint {
                url: host.describe(registry),
                host,
                client,
                reference: mirrored,
            })
        })
        .collect()
}

/// `reference` with `prefix/` in front of its repository (an `override_path` host's path).
fn with_repository_prefix(reference: &Reference, prefix: &str) -> Reference {
    if prefix.is_empty() {
        return reference.clone();
    }
    let registry = reference.registry().to_string();
    let repository = format!("{prefix}/{}", reference.repository());
    match (reference.tag(), reference.digest()) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    }
}

/// The failures of one request tried host after host. Like containerd, any failure moves
/// on to the next host; the error kept is the first one other than "not found", else the
/// first.
struct Failures<'a> {
    whole: &'a str,
    first: Option<ImageError>,
}

impl<'a> Failures<'a> {
    fn new(whole: &'a str) -> Self {
        Self { whole, first: None }
    }

    fn record(&mut self, ep: &Endpoint, err: OciDistributionError) {
        tracing::warn!(image = %self.whole, host = %ep.url, %err, "registry host failed, trying the next");
        let err = registry_error(self.whole, err);
        let replace = match &self.first {
            None => true,
            Some(first) => {
                matches!(first, ImageError::RemoteNotFound { .. })
                    && !matches!(err, ImageError::RemoteNotFound { .. })
            }
        };
        if replace {
            self.first = Some(err);
        }
    }

    fn into_error(self) -> ImageError {
        self.first.unwrap_or_else(|| ImageError::NoHost {
            reference: self.whole.to_string(),
        })
    }
}

/// Fetches the blob `layer` into `out` from the first host able to pull it.
async fn fetch_blob(
    endpoints: &[Endpoint],
    whole: &str,
    auth: &RegistryAuth,
    layer: &OciDescriptor,
    out: Blob<'_>,
) -> Result<Vec<u8>, ImageError> {
    let mut failures = Failures::new(whole);
    for ep in endpoints.iter().filter(|e| e.host.pull) {
        ep.client
            .store_auth_if_needed(ep.reference.resolve_registry(), auth)
            .await;
        let result = match out {
            Blob::Memory => {
                let mut bytes = Vec::new();
                ep.client
                    .pull_blob(&ep.reference, layer, &mut bytes)
                    .await
                    .map(|()| bytes)
            }
            Blob::File(path) => match tokio::fs::File::create(path).await {
                Ok(file) => ep
                    .client
                    .pull_blob(&ep.reference, layer, file)
                    .await
                    .map(|()| Vec::new()),
                Err(e) => Err(e.into()),
            },
        };
        match result {
            Ok(bytes) => return Ok(bytes),
            Err(e) => failures.record(ep, e),
        }
    }
    Err(failures.into_error())
}

/// Where a fetched blob goes.
#[derive(Clone, Copy)]
enum Blob<'a> {
    /// Returned as bytes (the config).
    Memory,
    /// Written to this file (layers).
    File(&'a std::path::Path),
}

/// Pulls `name` into `store` and returns the image ID. Layers already present are skipped.
/// The manifest comes from the first host able to resolve it (or, for a digest, to pull),
/// each blob from the first host able to pull it; the image keeps the name `name`.
pub async fn pull(
    store: &ImageStore,
    name: &str,
    auth: &RegistryAuth,
    opts: &PullOptions,
) -> Result<String, ImageError> {
    let reference = normalize(name)?;
    let whole = reference.whole();
    let endpoints = endpoints(&reference, opts)?;
    let by_digest = reference.digest().is_some();
    let mut failures = Failures::new(&whole);
    let mut resolved = None;
    for ep in endpoints.iter().filter(|e| {
        if by_digest {
            e.host.pull
        } else {
            e.host.resolve
        }
    }) {
        match ep
            .client
            .pull_image_manifest_and_list_digest(&ep.reference, auth)
            .await
        {
            Ok(found) => {
                resolved = Some(found);
                break;
            }
            Err(e) => failures.record(ep, e),
        }
    }
    let Some((manifest, digest, list_digest)) = resolved else {
        return Err(failures.into_error());
    };
    let config_bytes = fetch_blob(&endpoints, &whole, auth, &manifest.config, Blob::Memory).await?;
    let bad = |reason: String| ImageError::BadImage {
        reference: whole.clone(),
        reason,
    };
    let config: ImageConfiguration =
        serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config: {e}")))?;
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != manifest.layers.len() {
        return Err(bad(format!(
            "{} layers but {} diff IDs",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    let chains = chain_ids(&diff_ids);
    for ((layer, diff_id), chain) in manifest.layers.iter().zip(&diff_ids).zip(&chains) {
        if store.has_layer(chain) {
            continue;
        }
        let unique = store::random_id()?;
        let blob = store.tmp_dir().join(format!("blob-{unique}"));
        let dest = store.tmp_dir().join(format!("layer-{unique}"));
        let pulled = fetch_blob(&endpoints, &whole, auth, layer, Blob::File(&blob)).await;
        let unpacked = match pulled {
            Ok(_) => {
                let (b, d, media, diff) = (
                    blob.clone(),
                    dest.clone(),
                    layer.media_type.clone(),
                    diff_id.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir(&d).map_err(|source| unpack::UnpackError::Io {
                        dest: d.clone(),
                        source,
                    })?;
                    unpack::unpack_layer(&b, &media, &d, &diff)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(unpack::UnpackError::Io {
                        dest: dest.clone(),
                        source: std::io::Error::other(e),
                    })
                })
                .map_err(|source| ImageError::Unpack {
                    reference: whole.clone(),
                    source,
                })
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&blob);
        if let Err(e) = unpacked {
            store::remove_dir_all(&dest)?;
            return Err(e);
        }
        store.commit_layer(chain, &dest)?;
    }
    let repo = format!("{}/{}", reference.registry(), reference.repository());
    let id = manifest.config.digest.clone();
    let size = manifest.config.size.max(0) as u64
        + manifest
            .layers
            .iter()
            .map(|l| l.size.max(0) as u64)
            .sum::<u64>();
    store.add(ImageRecord {
        id: id.clone(),
        repo_tags: reference
            .tag()
            .filter(|_| reference.digest().is_none())
            .map(|t| vec![format!("{repo}:{t}")])
            .unwrap_or_default(),
        repo_digests: vec![format!("{repo}@{}", list_digest.unwrap_or(digest))],
        size,
        chain_ids: chains,
        config,
    })?;
    Ok(id)
}

/// Registry credentials from a CRI AuthConfig (`username`/`password`, base64 `auth`, or a
/// registry token).
pub fn auth_from(username: &str, password: &str, auth: &str, registry_token: &str) -> RegistryAuth {
    use base64::Engine;
    if !username.is_empty() {
        return RegistryAuth::Basic(username.to_string(), password.to_string());
    }
    if let Some((u, p)) = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        })
    {
        return RegistryAuth::Basic(u, p);
    }
    if !registry_token.is_empty() {
        return RegistryAuth::Bearer(registry_token.to_string());
    }
    RegistryAuth::Anonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_listed_registries_use_plain_http() {
        let opts = PullOptions {
            insecure_registries: vec!["reg.lan".into(), "10.0.0.1:5000".into()],
            ..Default::default()
        };
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "reg.lan:443",
            "10.0.0.1:5000",
        ] {
            assert!(is_plain_http(r, &opts), "{r}");
        }
        for r in ["index.docker.io", "10.0.0.1:6000", "registry.k8s.io"] {
            assert!(!is_plain_http(r, &opts), "{r}");
        }
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let diffs = vec!["sha256:aa".to_string(), "sha256:bb".to_string()];
        let chains = chain_ids(&diffs);
        assert_eq!(chains[0], "sha256:aa");
        assert_eq!(
            chains[1],
            format!("sha256:{:x}", Sha256::digest("sha256:aa sha256:bb"))
        );
    }

    #[test]
    fn auth_config_forms_map_to_registry_auth() {
        assert!(
            matches!(auth_from("u", "p", "", ""), RegistryAuth::Basic(u, p) if u == "u" && p == "p")
        );
        assert!(
            matches!(auth_from("", "", "dTpw", ""), RegistryAuth::Basic(u, p) if u == "u" && p == "p")
        );
        assert!(matches!(auth_from("", "", "", "tok"), RegistryAuth::Bearer(t) if t == "tok"));
        assert!(matches!(auth_from("", "", "", ""), RegistryAuth::Anonymous));
    }

    #[test]
    fn short_names_normalise_to_docker_hub_library() {
        assert_eq!(
            normalize("busybox").unwrap().whole(),
            "docker.io/library/busybox:latest"
        );
        assert!(normalize("bad name").is_err());
    }
}
