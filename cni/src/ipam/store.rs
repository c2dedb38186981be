//! The datastore seam: IPAM logic runs inside [`Datastore::transact`], which gives it a
//! consistent [`IpamState`] and commits what it changed atomically. The file backend does that
//! under a lock; an etcd backend does it optimistically with compares on revisions.

use super::model::{Change, IpamState};
use super::IpamError;

/// A store of pools, blocks and handles shared by every plugin process of a node (file) or of
/// a cluster (etcd).
pub trait Datastore {
    /// Runs `f` against the current state and commits its changes atomically; when `f`
    /// fails nothing is written. Backends may run `f` more than once (optimistic retries),
    /// so `f` must only compute from the state it is given.
    fn transact(
        &self,
        f: &mut dyn FnMut(&mut IpamState) -> Result<(), IpamError>,
    ) -> Result<(), IpamError>;

    /// A consistent copy of the current state, for reports.
    fn read(&self) -> Result<IpamState, IpamError>;

    /// What a watcher such as netd waits on: returns the changes committed since the last
    /// [`Datastore::read`] (or transaction, or batch of changes) of this handle, in commit
    /// order, to be applied to that state with [`IpamState::apply`], or an empty list when
    /// nothing changed within `timeout`. `None` when the backend cannot say what changed
    /// (it returns once something may have): the caller reads again.
    fn changes(&self, timeout: std::time::Duration) -> Result<Option<Vec<Change>>, IpamError>;
}

/// Runs `f` in a transaction and returns its value.
pub fn transact_with<T>(
    store: &dyn Datastore,
    mut f: impl FnMut(&mut IpamState) -> Result<T, IpamError>,
) -> Result<T, IpamError> {
    let mut out = None;
    store.transact(&mut |state| {
        out = Some(f(state)?);
        Ok(())
    })?;
    out.ok_or_else(|| IpamError::Corrupt {
        reason: "transaction committed without running".into(),
    })
}
