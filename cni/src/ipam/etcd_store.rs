//! The etcd v3 datastore, for many nodes sharing one IPAM.
//!
//! A transaction reads every IPAM key under the prefix (one range read, each key's
//! `mod_revision` remembered), runs the logic on that state, and commits the records it
//! changed in one etcd transaction guarded by compares: a key that existed must still be at
//! the revision read, a key that did not must still not exist. So two writers that touch the
//! same block (or claim the same free block, or the same handle) can never both commit; the
//! loser re-reads and runs again, up to [`MAX_ATTEMPTS`] times. A watcher (netd) follows the
//! changes after its last read on one long-lived etcd watch ([`Datastore::changes`]), so a
//! change costs each watcher one small event, not a read of the whole prefix. Keys:
//! `PREFIX/ipam/pools/NAME`, `PREFIX/ipam/blocks/CIDR` (`/` as `_`), `PREFIX/ipam/handles/ID`,
//! `PREFIX/ipam/nodes/NAME`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
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
    /// The etcd revision of the last state read (or change followed), where a watch resumes.
    revision: std::sync::atomic::AtomicI64,
    /// The watch [`Datastore::changes`] follows, with the revision it resumes at.
    follow: std::sync::Mutex<Option<(i64, WatchStream)>>,
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
            follow: std::sync::Mutex::new(None),
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
            let Some(change) = self.change_of(&key, Some(kv.value()))? else {
                continue;
            };
            revisions.insert(key, kv.mod_revision());
            changes.push(change);
        }
        state.apply(changes);
        Ok((state, revisions))
    }

    /// The record change that `key` taking `value` (`None`: deleted) stands for; `None` for
    /// a key that holds no IPAM record.
    fn change_of(&self, key: &str, value: Option<&[u8]>) -> Result<Option<Change>, IpamError> {
        let Some((kind, name)) = key
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.split_once('/'))
        else {
            return Ok(None);
        };
        let corrupt = |e: serde_json::Error| IpamError::Corrupt {
            reason: format!("etcd key {key}: {e}"),
        };
        Ok(Some(match (kind, value) {
            ("pools", Some(v)) => {
                let pool: Pool = serde_json::from_slice(v).map_err(corrupt)?;
                Change::Pool(pool.name.clone(), Some(pool))
            }
            ("pools", None) => Change::Pool(name.to_string(), None),
            ("blocks", Some(v)) => {
                let block: Block = serde_json::from_slice(v).map_err(corrupt)?;
                Change::Block(block.key(), Some(Arc::new(block)))
            }
            ("blocks", None) => Change::Block(name.replace('_', "/"), None),
            ("handles", Some(v)) => {
                let handle: Handle = serde_json::from_slice(v).map_err(corrupt)?;
                Change::Handle(handle.id.clone(), Some(Arc::new(handle)))
            }
            ("handles", None) => Change::Handle(name.to_string(), None),
            ("nodes", Some(v)) => {
                let node: NodeInfo = serde_json::from_slice(v).map_err(corrupt)?;
                Change::Node(node.name.clone(), Some(node))
            }
            ("nodes", None) => Change::Node(name.to_string(), None),
            _ => return Ok(None),
        }))
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

    /// Follows one long-lived watch on the prefix from the revision after the last read (a
    /// read or transaction in between restarts it there). Returns the first batch of
    /// changes, an empty list after `timeout`, `None` when etcd cancelled the watch
    /// (compaction) or ended the stream: read again then.
    fn changes(&self, timeout: Duration) -> Result<Option<Vec<Change>>, IpamError> {
        use std::sync::atomic::Ordering;
        let from = self.revision.load(Ordering::Relaxed) + 1;
        let mut follow = self.follow.lock().unwrap_or_else(|e| e.into_inner());
        self.runtime.block_on(async {
            let stream = match &mut *follow {
                Some((at, stream)) if *at == from => stream,
                slot => {
                    let options = WatchOptions::new().with_prefix().with_start_revision(from);
                    let stream = self
                        .client
                        .clone()
                        .watch(self.prefix.as_str(), Some(options))
                        .await
                        .map_err(|e| unavailable(&self.endpoints, e))?;
                    &mut slot.insert((from, stream)).1
                }
            };
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let resp = match tokio::time::timeout_at(deadline, stream.message()).await {
                    Err(_) => return Ok(Some(Vec::new())),
                    Ok(Err(e)) => {
                        *follow = None;
                        return Err(unavailable(&self.endpoints, e));
                    }
                    Ok(Ok(Some(resp))) if !resp.canceled() => resp,
                    Ok(Ok(_)) => {
                        *follow = None;
                        return Ok(None);
                    }
                };
                let mut changes = Vec::new();
                let mut last = None;
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let value = (event.event_type() == EventType::Put).then(|| kv.value());
                    changes.extend(self.change_of(&key, value)?);
                    last = Some(kv.mod_revision());
                }
                // Creation and progress notices carry no events.
                if let Some(last) = last {
                    self.revision.store(last, Ordering::Relaxed);
                    if let Some((at, _)) = &mut *follow {
                        *at = last + 1;
                    }
                    return Ok(Some(changes));
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
