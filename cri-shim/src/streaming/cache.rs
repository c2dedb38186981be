//! Pending streaming requests under single-use, expiring tokens (the kubelet streaming
//! library's request cache: one minute, at most 1000 in flight).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{StreamRequest, StreamingError};

/// How long a returned URL stays valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);

/// How many requests may wait for their client at once.
pub const MAX_IN_FLIGHT: usize = 1000;

/// Requests by token; each is taken at most once and only before it expires.
#[derive(Debug)]
pub struct RequestCache {
    ttl: Duration,
    max: usize,
    entries: Mutex<HashMap<String, (Instant, StreamRequest)>>,
}

impl RequestCache {
    /// An empty cache whose entries live `ttl`, holding at most `max` of them.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            entries: Mutex::default(),
        }
    }

    /// Stores `request` under a new random token and returns the token. Expired entries
    /// are dropped first; a full cache refuses.
    pub fn insert(&self, request: StreamRequest) -> Result<String, StreamingError> {
        let token = crate::store::random_id()?[..32].to_string();
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (expires, _)| *expires > now);
        if entries.len() >= self.max {
            return Err(StreamingError::TooManyInFlight(self.max));
        }
        entries.insert(token.clone(), (now + self.ttl, request));
        Ok(token)
    }

    /// Removes and returns the request under `token`, unless it is unknown or expired.
    pub fn take(&self, token: &str) -> Option<StreamRequest> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (expires, request) = entries.remove(token)?;
        (expires > Instant::now()).then_some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::cri::v1 as cri;

    fn exec(id: &str) -> StreamRequest {
        StreamRequest::Exec(cri::ExecRequest {
            container_id: id.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_token_is_taken_once() {
        let cache = RequestCache::new(TOKEN_TTL, 10);
        let a = cache.insert(exec("a")).unwrap();
        let b = cache.insert(exec("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(cache.take(&b), Some(exec("b")));
        assert_eq!(cache.take(&b), None);
        assert_eq!(cache.take("nope"), None);
        assert_eq!(cache.take(&a), Some(exec("a")));
    }

    #[test]
    fn expired_tokens_are_refused_and_make_room() {
        let cache = RequestCache::new(Duration::from_millis(20), 1);
        let a = cache.insert(exec("a")).unwrap();
        assert!(matches!(
            cache.insert(exec("b")),
            Err(StreamingError::TooManyInFlight(1))
        ));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(cache.take(&a), None);
        let c = cache.insert(exec("c")).unwrap();
        assert_eq!(cache.take(&c), Some(exec("c")));
    }
}
