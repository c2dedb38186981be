//! The etcd v3 datastore, for many nodes sharing one IPAM.
//!
//! A transaction reads every IPAM key under the prefix (one range read, each key's
//! `mod_revision` remembered), runs the logic on that state, and commits the records it
//! changed in one etcd transaction guarded by compares: a key that existed must still be at
//! the revision read, a key that did not must still not exist. So two writers that touch the
//! same block (or claim the same free block, or the same handle) can never both commit; the
//! loser re-reads and runs again, up to [`MAX_ATTEMPTS`] times. Keys:
//! `PREFIX/ipam/pools/NAME`, `PREFIX/ipam/blocks/CIDR` (`/` as `_`), `PREFIX/ipam/handles/ID`,
//! `PREFIX/ipam/nodes/NAME`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, WatchOptions,
};

use super::model::{Block, Change, Handle, IpamState, NodeInfo, Pool};
use super::store::Datastore;
use super::IpamError;

/// How often a transaction that lost a race is run again before "try again later".
pub const MAX_ATTEMPTS: usize = 32;
/// How long to wait for etcd to answer before calling it unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The etcd-backed [`Datastore`]. It owns a small runtime: the plugins are synchronous
/// programs and the etcd client is async.
pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    runtime: tokio::runtime::Runtime,
    client: Client,
    /// The etcd revision of the last state read, where a watch resumes.
    revision: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://IP:PORT`); keys live under `prefix`.
    pub fn open(endpoints: &[String], prefix: &str) -> Result<Self, IpamError> {
        if endpoints.is_empty() {
            return Err(IpamError::InvalidConfig {
                field: "ipam.datastore.endpoints".into(),
                reason: "at least one etcd endpoint is needed".into(),
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unavailable(endpoints, e))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let client = runtime
            .block_on(Client::connect(endpoints, Some(options)))
            .map_err(|e| unavailable(endpoints, e))?;
        Ok(Self {
            endpoints: endpoints.to_vec(),
            prefix: format!("{}/ipam/", prefix.trim_end_matches('/')),
            runtime,
            client,
            revision: std::sync::atomic::AtomicI64::new(0),
        })
    }

    fn key(&self, change: &Change) -> String {
        match change {
            Change::Pool(name, _) => format!("{}pools/{name}", self.prefix),
            Change::Block(cidr, _) => format!("{}blocks/{}", self.prefix, cidr.replace('/', "_")),
            Change::Handle(id, _) => format!("{}handles/{id}", self.prefix),
            Change::Node(name, _) => format!("{}nodes/{name}", self.prefix),
        }
    }

    /// Reads the whole IPAM state with each key's mod revision.
    async fn load(
        &self,
        client: &mut Client,
    ) -> Result<(IpamState, HashMap<String, i64>), IpamError> {
        let resp = client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| unavailable(&self.endpoints, e))?;
        if let Some(header) = resp.header() {
            self.revision
                .store(header.revision(), std::sync::atomic::Ordering::Relaxed);
        }
        let mut state = IpamState::default();
        let mut revisions = HashMap::new();
        let mut changes = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let corrupt = |e: serde_json::Error| IpamError::Corrupt {
                reason: format!("etcd key {key}: {e}"),
            };
            let rest = key.strip_prefix(&self.prefix).unwrap_or_default();
            let change = if rest.starts_with("pools/") {
                let pool: Pool = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                Change::Pool(pool.name.clone(), Some(pool))
            } else if rest.starts_with("blocks/") {
                let block: Block = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                Change::Block(block.key(), Some(Arc::new(block)))
            } else if rest.starts_with("handles/") {
                let handle: Handle = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                Change::Handle(handle.id.clone(), Some(Arc::new(handle)))
            } else if rest.starts_with("nodes/") {
                let node: NodeInfo = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                Change::Node(node.name.clone(), Some(node))
            } else {
                continue;
            };
            revisions.insert(key, kv.mod_revision());
            changes.push(change);
        }
        state.apply(changes);
        Ok((state, revisions))
    }

    /// The guarded etcd transaction committing `changes` read at `revisions`.
    fn commit_txn(
        &self,
        changes: Vec<Change>,
        revisions: &HashMap<String, i64>,
    ) -> Result<Txn, IpamError> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for change in changes {
            let key = self.key(&change);
            compares.push(match revisions.get(&key) {
                Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, *rev),
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            });
            let value = match &change {
                Change::Pool(_, Some(pool)) => Some(serde_json::to_vec(pool)),
                Change::Block(_, Some(block)) => Some(serde_json::to_vec(block.as_ref())),
                Change::Handle(_, Some(handle)) => Some(serde_json::to_vec(handle.as_ref())),
                Change::Node(_, Some(node)) => Some(serde_json::to_vec(node)),
                _ => None,
            };
            ops.push(match value {
                Some(json) => TxnOp::put(
                    key,
                    json.map_err(|e| IpamError::Corrupt {
                        reason: e.to_string(),
                    })?,
                    None,
                ),
                None => TxnOp::delete(key, None),
            });
        }
        Ok(Txn::new().when(compares).and_then(ops))
    }
}

impl Datastore for EtcdStore {
    fn transact(
        &self,
        f: &mut dyn FnMut(&mut IpamState) -> Result<(), IpamError>,
    ) -> Result<(), IpamError> {
        let mut client = self.client.clone();
        self.runtime.block_on(async {
            for attempt in 0..MAX_ATTEMPTS {
                let (mut state, revisions) = self.load(&mut client).await?;
                f(&mut state)?;
                let changes = state.take_changes();
                if changes.is_empty() {
                    return Ok(());
                }
                let txn = self.commit_txn(changes, &revisions)?;
                let resp = client
                    .txn(txn)
                    .await
                    .map_err(|e| unavailable(&self.endpoints, e))?;
                if resp.succeeded() {
                    return Ok(());
                }
                tracing::debug!(attempt, "etcd transaction lost a race, retrying");
                let pause = 1 + (std::process::id() as u64 + attempt as u64 * 7) % 10;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Err(IpamError::Contended {
                attempts: MAX_ATTEMPTS,
            })
        })
    }

    fn read(&self) -> Result<IpamState, IpamError> {
        let mut client = self.client.clone();
        self.runtime
            .block_on(self.load(&mut client))
            .map(|(state, _)| state)
    }

    /// An etcd watch on the prefix from the revision after the last read: returns at the
    /// first change (or at once if one already happened), else after `timeout`.
    fn wait_for_change(&self, timeout: Duration) -> Result<(), IpamError> {
        let mut client = self.client.clone();
        let from = self.revision.load(std::sync::atomic::Ordering::Relaxed) + 1;
        self.runtime.block_on(async {
            let options = WatchOptions::new().with_prefix().with_start_revision(from);
            let mut stream = client
                .watch(self.prefix.as_str(), Some(options))
                .await
                .map_err(|e| unavailable(&self.endpoints, e))?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, stream.message()).await {
                    Err(_) => return Ok(()),
                    Ok(Err(e)) => return Err(unavailable(&self.endpoints, e)),
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Ok(Some(resp))) if !resp.events().is_empty() => return Ok(()),
                    Ok(Ok(Some(_))) => {}
                }
            }
        })
    }
}

fn unavailable(endpoints: &[String], err: impl std::fmt::Display) -> IpamError {
    IpamError::Unavailable {
        endpoints: endpoints.join(","),
        reason: err.to_string(),
    }
}
