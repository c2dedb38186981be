//! The embedded datastore: a directory holding `state.json` (a snapshot), `journal` (one
//! checksummed line per committed transaction) and `lock`.
//!
//! The journal is a preallocated, zero-filled ring: records overwrite blocks that already
//! exist, so `fdatasync` flushes data only (no size or extent change to commit), several
//! times cheaper than appending. When a record no longer fits, the transaction is committed
//! as a new snapshot instead (temp file, fsync, rename, directory fsync) and the ring starts
//! again at offset 0.
//!
//! Crash safety: a transaction is durable once its record is synced. Replay starts after the
//! snapshot's sequence number and stops at the first record that is torn (bad checksum) or
//! stale (an older lap of the ring), so a crash at any point loses only the unacknowledged
//! transaction.
//!
//! Concurrency: one `flock` serialises every plugin process. Waiters keep waiting while the
//! lock changes hands; they give up only when one holder has kept it longer than the timeout
//! (the timeout starts once it is held), so a burst of 50 ADDs queues instead of failing.
//! Each commit writes a fresh commit ID into the lock file before touching the journal; a
//! process reuses its cached state only while that ID is unchanged.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::model::{Block, Change, Handle, IpamState, NodeInfo, Pool};
use super::store::Datastore;
use super::IpamError;

/// How long one holder may keep the lock before waiters give up with "try again later".
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(15);
/// Size of the journal ring. Small on purpose: every plugin process replays what the ring
/// holds since the last snapshot, so this bounds the work of loading the store.
const JOURNAL_BYTES: u64 = 64 << 10;
/// Where the holder's "pid time" stamp lives in the lock file.
const STAMP_OFFSET: u64 = 0;
/// Where the last commit ID lives in the lock file.
const COMMIT_ID_OFFSET: u64 = 64;

/// The file-backed [`Datastore`].
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    lock_timeout: Duration,
    cache: Mutex<Option<Cached>>,
    /// The journal stays open: it is only ever overwritten in place, never replaced.
    journal: std::sync::OnceLock<File>,
}

/// The state as last seen, reused while nobody has committed since (saves reparsing).
#[derive(Debug)]
struct Cached {
    fingerprint: Fingerprint,
    seq: u64,
    position: u64,
    state: IpamState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    snapshot: Option<(u64, i64, i64, u64)>,
    commit_id: String,
}

/// One change inside a journal record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Op {
    PutPool { pool: Pool },
    DelPool { name: String },
    PutBlock { block: Arc<Block> },
    DelBlock { key: String },
    PutHandle { handle: Arc<Handle> },
    DelHandle { id: String },
    PutNode { node: NodeInfo },
    DelNode { name: String },
}

impl From<Change> for Op {
    fn from(change: Change) -> Self {
        match change {
            Change::Pool(_, Some(pool)) => Op::PutPool { pool },
            Change::Pool(name, None) => Op::DelPool { name },
            Change::Block(_, Some(block)) => Op::PutBlock { block },
            Change::Block(key, None) => Op::DelBlock { key },
            Change::Handle(_, Some(handle)) => Op::PutHandle { handle },
            Change::Handle(id, None) => Op::DelHandle { id },
            Change::Node(_, Some(node)) => Op::PutNode { node },
            Change::Node(name, None) => Op::DelNode { name },
        }
    }
}

impl From<Op> for Change {
    fn from(op: Op) -> Self {
        match op {
            Op::PutPool { pool } => Change::Pool(pool.name.clone(), Some(pool)),
            Op::DelPool { name } => Change::Pool(name, None),
            Op::PutBlock { block } => Change::Block(block.key(), Some(block)),
            Op::DelBlock { key } => Change::Block(key, None),
            Op::PutHandle { handle } => Change::Handle(handle.id.clone(), Some(handle)),
            Op::DelHandle { id } => Change::Handle(id, None),
            Op::PutNode { node } => Change::Node(node.name.clone(), Some(node)),
            Op::DelNode { name } => Change::Node(name, None),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    seq: u64,
    ops: Vec<Op>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    seq: u64,
    state: IpamState,
}

/// What `load` found: the state at `seq`, and where the next record goes.
struct Loaded {
    seq: u64,
    position: u64,
    state: IpamState,
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, IpamError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| IpamError::Io {
            op: "creating",
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            cache: Mutex::new(None),
            journal: std::sync::OnceLock::new(),
        })
    }

    /// Changes how long a single holder may keep the lock before waiters fail.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn io(&self, op: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> IpamError {
        let path = self.path(name);
        move |source| IpamError::Io { op, path, source }
    }

    fn open_lock_file(&self) -> Result<File, IpamError> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.path("lock"))
            .map_err(self.io("opening", "lock"))
    }

    /// Takes the store lock, waiting as long as the lock keeps changing hands. Uncontended it
    /// is one non-blocking `flock`; contended, a helper thread blocks in `flock` on its own
    /// descriptor (so the lock is handed over the moment it is free, no polling) while this
    /// thread watches the holder's stamp for the timeout. A helper whose caller gave up
    /// releases the lock as soon as it gets it.
    fn lock(&self) -> Result<Flock<File>, IpamError> {
        let locking = |errno: nix::errno::Errno| IpamError::Io {
            op: "locking",
            path: self.path("lock"),
            source: errno.into(),
        };
        let file = match Flock::lock(self.open_lock_file()?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return self.stamped(lock),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, errno)) => return Err(locking(errno)),
        };
        let waiter = self.open_lock_file()?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // If the receiver is gone the lock comes back in the error and is dropped: unlocked.
            let _ = tx.send(Flock::lock(waiter, FlockArg::LockExclusive));
        });
        let mut seen: Option<(String, Instant)> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(lock)) => return self.stamped(lock),
                Ok(Err((_, errno))) => return Err(locking(errno)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(locking(nix::errno::Errno::EINTR))
                }
            }
            let mut stamp = String::new();
            let _ = (&file).seek(SeekFrom::Start(STAMP_OFFSET));
            let _ = (&file).take(32).read_to_string(&mut stamp);
            match &seen {
                Some((holder, since)) if *holder == stamp => {
                    if since.elapsed() > self.lock_timeout {
                        let mut fields = stamp.split_whitespace();
                        let pid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                        let taken: u64 = fields.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                        return Err(IpamError::LockTimeout {
                            path: self.path("lock"),
                            holder: pid,
                            held_ms: now_ms().saturating_sub(taken),
                        });
                    }
                }
                _ => seen = Some((stamp, Instant::now())),
            }
        }
    }

    /// Writes the holder stamp (pid, time) that waiters judge the timeout by.
    fn stamped(&self, lock: Flock<File>) -> Result<Flock<File>, IpamError> {
        let stamp = format!("{:>10} {:>20}\n", std::process::id(), now_ms());
        lock.write_at(stamp.as_bytes(), STAMP_OFFSET)
            .map_err(self.io("stamping", "lock"))?;
        Ok(lock)
    }

    fn fingerprint(&self, lock: &File) -> Result<Fingerprint, IpamError> {
        let snapshot = match fs::metadata(self.path("state.json")) {
            Ok(m) => Some((m.ino(), m.mtime(), m.mtime_nsec(), m.size())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io("reading", "state.json")(e)),
        };
        let mut id = [0u8; 32];
        let n = lock
            .read_at(&mut id, COMMIT_ID_OFFSET)
            .map_err(self.io("reading", "lock"))?;
        Ok(Fingerprint {
            snapshot,
            commit_id: String::from_utf8_lossy(&id[..n]).into_owned(),
        })
    }

    /// Records that a commit is about to happen, invalidating every other process's cache.
    fn new_commit_id(&self, lock: &File) -> Result<(), IpamError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "{:>10}-{:>20}-{:>20}\n",
            std::process::id(),
            nanos % 100_000_000_000_000_000_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        lock.write_at(&id.as_bytes()[..32.min(id.len())], COMMIT_ID_OFFSET)
            .map_err(self.io("writing commit id", "lock"))?;
        Ok(())
    }

    /// Opens the journal ring, creating it zero-filled (and durable) when absent or short.
    fn open_journal(&self) -> Result<File, IpamError> {
        let path = self.path("journal");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(self.io("opening", "journal"))?;
        let len = file
            .metadata()
            .map_err(self.io("reading", "journal"))?
            .len();
        if len < JOURNAL_BYTES {
            let zeros = vec![0u8; (JOURNAL_BYTES - len) as usize];
            file.write_all_at(&zeros, len)
                .and_then(|()| file.sync_all())
                .map_err(self.io("preallocating", "journal"))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io("syncing", "."))?;
        }
        Ok(file)
    }

    /// Loads the state (caller holds the lock).
    fn load(&self, journal: &File) -> Result<Loaded, IpamError> {
        let mut snapshot = match fs::read(self.path("state.json")) {
            Ok(bytes) => {
                serde_json::from_slice::<Snapshot>(&bytes).map_err(|e| IpamError::Corrupt {
                    reason: format!("{}: {e}", self.path("state.json").display()),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => return Err(self.io("reading", "state.json")(e)),
        };
        let mut bytes = Vec::with_capacity(JOURNAL_BYTES as usize);
        (&*journal)
            .seek(SeekFrom::Start(0))
            .and_then(|_| (&*journal).read_to_end(&mut bytes))
            .map_err(self.io("reading", "journal"))?;
        let mut position = 0u64;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let Some(json) = verified_body(line) else {
                break; // torn record, or the zeros past the last one
            };
            let record: Record = serde_json::from_slice(json).map_err(|e| IpamError::Corrupt {
                reason: format!("journal record at byte {position}: {e}"),
            })?;
            if record.seq <= snapshot.seq {
                break; // a stale record from the previous lap of the ring
            }
            if record.seq != snapshot.seq + 1 {
                return Err(IpamError::Corrupt {
                    reason: format!(
                        "journal record at byte {position} has sequence {} after {}",
                        record.seq, snapshot.seq
                    ),
                });
            }
            snapshot
                .state
                .apply(record.ops.into_iter().map(Change::from));
            snapshot.seq = record.seq;
            position += line.len() as u64;
        }
        Ok(Loaded {
            seq: snapshot.seq,
            position,
            state: snapshot.state,
        })
    }

    /// Commits `state` at `seq` as a new snapshot; the ring then restarts at offset 0.
    fn write_snapshot(&self, seq: u64, state: &IpamState) -> Result<(), IpamError> {
        let tmp = self.path("state.json.tmp");
        let body = serde_json::to_vec(&Snapshot {
            seq,
            state: state.clone(),
        })
        .map_err(|e| IpamError::Corrupt {
            reason: e.to_string(),
        })?;
        let mut file = File::create(&tmp).map_err(self.io("writing", "state.json.tmp"))?;
        file.write_all(&body)
            .and_then(|()| file.sync_all())
            .map_err(self.io("writing", "state.json.tmp"))?;
        fs::rename(&tmp, self.path("state.json")).map_err(self.io("renaming", "state.json"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("syncing", "."))
    }
}

impl Datastore for FileStore {
    fn transact(
        &self,
        f: &mut dyn FnMut(&mut IpamState) -> Result<(), IpamError>,
    ) -> Result<(), IpamError> {
        let lock = self.lock()?;
        let journal = match self.journal.get() {
            Some(journal) => journal,
            None => {
                let opened = self.open_journal()?;
                self.journal.get_or_init(|| opened)
            }
        };
        let fingerprint = self.fingerprint(&lock)?;
        // The cached state is taken, not copied: if `f` fails it is dropped, and the next
        // transaction reloads from disk.
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|mut cache| cache.take())
            .filter(|c| c.fingerprint == fingerprint);
        let Loaded {
            seq,
            position,
            mut state,
        } = match cached {
            Some(c) => Loaded {
                seq: c.seq,
                position: c.position,
                state: c.state,
            },
            None => self.load(journal)?,
        };
        f(&mut state)?;
        let ops: Vec<Op> = state.take_changes().into_iter().map(Op::from).collect();
        let (seq, position) = if ops.is_empty() {
            (seq, position)
        } else {
            let record = Record { seq: seq + 1, ops };
            let json = serde_json::to_string(&record).map_err(|e| IpamError::Corrupt {
                reason: e.to_string(),
            })?;
            let line = format!("{} {json}\n", checksum(json.as_bytes()));
            self.new_commit_id(&lock)?;
            if position + line.len() as u64 <= JOURNAL_BYTES {
                journal
                    .write_all_at(line.as_bytes(), position)
                    .and_then(|()| journal.sync_data())
                    .map_err(self.io("writing", "journal"))?;
                (record.seq, position + line.len() as u64)
            } else {
                self.write_snapshot(record.seq, &state)?;
                (record.seq, 0)
            }
        };
        let fingerprint = self.fingerprint(&lock)?;
        if let Ok(mut cache) = self.cache.lock() {
            *cache = Some(Cached {
                fingerprint,
                seq,
                position,
                state,
            });
        }
        Ok(())
    }

    fn read(&self) -> Result<IpamState, IpamError> {
        let mut state = IpamState::default();
        self.transact(&mut |s| {
            state = s.clone();
            Ok(())
        })?;
        Ok(state)
    }

    /// Polls the commit ID in the lock file (every commit changes it) every 20 ms until it
    /// changes or `timeout` passes; it cannot say what changed, so always `None`.
    fn changes(&self, timeout: Duration) -> Result<Option<Vec<Change>>, IpamError> {
        let seen = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.fingerprint.clone()));
        let lock = self.open_lock_file()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if Some(self.fingerprint(&lock)?) != seen {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }
}

/// The record JSON of a complete line whose checksum matches; `None` for a torn write.
fn verified_body(line: &[u8]) -> Option<&[u8]> {
    let body = line.strip_suffix(b"\n")?;
    let space = body.iter().position(|b| *b == b' ')?;
    let (sum, json) = (&body[..space], &body[space + 1..]);
    (checksum(json).as_bytes() == sum).then_some(json)
}

fn checksum(json: &[u8]) -> String {
    let digest = Sha256::digest(json);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::allocator;
    use crate::ipam::store::transact_with;

    fn pool_state(store: &FileStore) {
        store
            .transact(&mut |s| {
                let p = Pool::new("p", "10.0.0.0/16".parse().unwrap(), None)?;
                s.put_pool(p);
                Ok(())
            })
            .unwrap();
    }

    fn handle(id: &str) -> Handle {
        Handle {
            id: id.into(),
            network: "n".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            node: "n1".into(),
            netns: String::new(),
            addresses: vec![],
            pod: None,
        }
    }

    #[test]
    fn committed_state_survives_reopen_and_failed_transactions_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        pool_state(&store);
        let got = transact_with(&store, |s| {
            allocator::assign(s, handle("a"), &allocator::Choice::default())
        })
        .unwrap();
        let err = store.transact(&mut |s| {
            allocator::assign(s, handle("b"), &allocator::Choice::default())?;
            Err(IpamError::NoPools)
        });
        assert!(err.is_err());
        assert_eq!(
            store.read().unwrap().handles().len(),
            1,
            "the failed change is gone here too"
        );
        let reopened = FileStore::open(dir.path()).unwrap().read().unwrap();
        assert_eq!(reopened.handles().len(), 1);
        assert_eq!(reopened.handles()["a"].addresses, vec![got[0].address]);
    }

    #[test]
    fn a_torn_record_is_ignored_and_overwritten_by_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        pool_state(&store);
        transact_with(&store, |s| {
            allocator::assign(s, handle("a"), &allocator::Choice::default())
        })
        .unwrap();
        let path = dir.path().join("journal");
        let end = fs::read(&path)
            .unwrap()
            .iter()
            .position(|b| *b == 0)
            .unwrap();
        let journal = OpenOptions::new().write(true).open(&path).unwrap();
        journal
            .write_all_at(
                b"0123456789abcdef {\"seq\":3,\"ops\":[{\"delHandle",
                end as u64,
            )
            .unwrap();
        let state = FileStore::open(dir.path()).unwrap().read().unwrap();
        assert!(state.handles().contains_key("a"));
        let store = FileStore::open(dir.path()).unwrap();
        transact_with(&store, |s| {
            allocator::assign(s, handle("b"), &allocator::Choice::default())
        })
        .unwrap();
        let state = FileStore::open(dir.path()).unwrap().read().unwrap();
        assert_eq!(state.handles().len(), 2);
        assert_eq!(fs::metadata(&path).unwrap().len(), JOURNAL_BYTES);
    }

    #[test]
    fn wrapping_the_ring_keeps_everything_and_replays_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        pool_state(&store);
        for i in 0..400 {
            let id = format!("h{i}");
            transact_with(&store, |s| {
                allocator::assign(s, handle(&id), &allocator::Choice::default())
            })
            .unwrap();
            if i % 2 == 0 {
                store
                    .transact(&mut |s| {
                        allocator::release(s, &id);
                        Ok(())
                    })
                    .unwrap();
            }
        }
        assert!(
            dir.path().join("state.json").exists(),
            "the ring wrapped into a snapshot"
        );
        let state = FileStore::open(dir.path()).unwrap().read().unwrap();
        assert_eq!(state.handles().len(), 200);
        let used: usize = state.blocks().values().map(|b| b.allocations.len()).sum();
        assert_eq!(used, 200);
    }

    #[test]
    fn concurrent_threads_with_separate_stores_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        pool_state(&FileStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let store = FileStore::open(&path).unwrap();
                    (0..20)
                        .map(|i| {
                            let id = format!("t{t}-{i}");
                            transact_with(&store, |s| {
                                allocator::assign(s, handle(&id), &allocator::Choice::default())
                            })
                            .unwrap()[0]
                                .address
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn a_holder_that_never_lets_go_times_out_waiters_with_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let held = store.lock().unwrap();
        let waiter = FileStore::open(dir.path())
            .unwrap()
            .with_lock_timeout(Duration::from_millis(100));
        let err = waiter.read().unwrap_err();
        assert!(
            matches!(err, IpamError::LockTimeout { holder, .. } if holder == std::process::id())
        );
        drop(held);
        assert!(waiter.read().is_ok());
    }
}
