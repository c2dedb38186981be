//! One operation at a time per volume or snapshot: a second RPC on the same object while the
//! first runs is refused (the caller answers ABORTED) instead of queued.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

/// The set of objects with an operation in flight.
#[derive(Debug, Default)]
pub struct InFlight {
    keys: Mutex<HashSet<String>>,
}

/// Holds an object's slot; released on drop.
#[derive(Debug)]
pub struct InFlightGuard {
    owner: Arc<InFlight>,
    keys: Vec<String>,
}

impl InFlight {
    /// Claims every key in `keys` (an operation on a clone holds both volumes), all or
    /// nothing; `None` when any is taken.
    pub fn try_claim(self: &Arc<Self>, keys: &[&str]) -> Option<InFlightGuard> {
        let mut held = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.iter().any(|k| held.contains(*k)) {
            return None;
        }
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        held.extend(keys.iter().cloned());
        Some(InFlightGuard {
            owner: Arc::clone(self),
            keys,
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut held = self
            .owner
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for k in &self.keys {
            held.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_until_its_guard_drops() {
        let f = Arc::new(InFlight::default());
        let g = f.try_claim(&["a"]).expect("free");
        assert!(f.try_claim(&["a"]).is_none());
        assert!(f.try_claim(&["b", "a"]).is_none(), "all or nothing");
        let b = f
            .try_claim(&["b"])
            .expect("b was not taken by the failed claim");
        drop(g);
        assert!(f.try_claim(&["a"]).is_some());
        drop(b);
    }
}
