//! The object store: one resourceVersion counter, the change history, compaction and snapshots.

use super::{
    ApiError, FakeApiServer, lock, now,
    watch::{WatchMsg, WatchSink, render_change},
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc;

/// Keys are `namespace/name`, which sorts like the etcd keys the real list walks.
pub(super) type Key = String;

pub(super) struct Store {
    pub(super) rv: u64,
    /// Watches and exact reads may start from an RV `>= oldest_valid`; older ones are compacted.
    pub(super) oldest_valid: u64,
    pub(super) objects: BTreeMap<Key, Service>,
    pub(super) leases: BTreeMap<Key, Lease>,
    pub(super) history: VecDeque<Change>,
    pub(super) history_limit: usize,
    pub(super) watches: HashMap<u64, WatchSink>,
    pub(super) next_watch_id: u64,
    pub(super) next_uid: u64,
    pub(super) bookmark_interval: Duration,
    pub(super) streaming_lists: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

pub(super) struct Change {
    pub(super) rv: u64,
    pub(super) kind: ChangeKind,
    /// State after the change; for a deletion, the last state stamped with the deletion RV.
    pub(super) object: Service,
    pub(super) prev: Option<Service>,
}

impl FakeApiServer {
    /// Creates or updates a Service (namespace defaults to "default") and notifies watches.
    /// Returns the stored object. An update that changes nothing is a no-op, as upstream.
    /// Removing the last finalizer of a terminating Service deletes it.
    pub fn apply(&self, mut svc: Service) -> Service {
        let mut st = lock(&self.inner.store);
        let ns = svc
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        svc.metadata.namespace = Some(ns.clone());
        if svc.metadata.name.as_deref().unwrap_or_default().is_empty() {
            let prefix = svc
                .metadata
                .generate_name
                .clone()
                .unwrap_or_else(|| "service-".to_owned());
            st.next_uid += 1;
            svc.metadata.name = Some(format!("{prefix}{:05x}", st.next_uid));
        }
        let key = format!("{ns}/{}", svc.metadata.name.as_deref().unwrap_or_default());

        let stored = match st.objects.get(&key).cloned() {
            Some(old) => {
                // Server-owned metadata survives whatever the caller sent.
                svc.metadata.uid.clone_from(&old.metadata.uid);
                svc.metadata
                    .creation_timestamp
                    .clone_from(&old.metadata.creation_timestamp);
                svc.metadata
                    .deletion_timestamp
                    .clone_from(&old.metadata.deletion_timestamp);
                svc.metadata.deletion_grace_period_seconds =
                    old.metadata.deletion_grace_period_seconds;
                svc.metadata
                    .resource_version
                    .clone_from(&old.metadata.resource_version);
                if svc == old {
                    return old;
                }
                let rv = st.next_rv();
                svc.metadata.resource_version = Some(rv.to_string());
                st.objects.insert(key.clone(), svc.clone());
                st.record(Change {
                    rv,
                    kind: ChangeKind::Modified,
                    object: svc.clone(),
                    prev: Some(old),
                });
                let terminating = svc.metadata.deletion_timestamp.is_some();
                if terminating && svc.metadata.finalizers.as_ref().is_none_or(Vec::is_empty) {
                    st.remove(&key);
                }
                svc
            }
            None => {
                st.next_uid += 1;
                let n = st.next_uid;
                svc.metadata.uid = Some(format!("5e1f0000-0000-4000-8000-{n:012x}"));
                svc.metadata.creation_timestamp = Some(now());
                svc.metadata.deletion_timestamp = None;
                svc.metadata.deletion_grace_period_seconds = None;
                let rv = st.next_rv();
                svc.metadata.resource_version = Some(rv.to_string());
                st.objects.insert(key, svc.clone());
                st.record(Change {
                    rv,
                    kind: ChangeKind::Added,
                    object: svc.clone(),
                    prev: None,
                });
                svc
            }
        };
        let rv = st.rv;
        drop(st);
        self.inner.rv_tx.send_replace(rv);
        stored
    }

    /// Deletes a Service; returns whether it existed. With finalizers it only becomes terminating
    /// (MODIFIED with `deletionTimestamp`) until an `apply` removes them.
    pub fn delete(&self, namespace: &str, name: &str) -> bool {
        let key = format!("{namespace}/{name}");
        let mut st = lock(&self.inner.store);
        let Some(old) = st.objects.get(&key).cloned() else {
            return false;
        };
        if old
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| !f.is_empty())
        {
            if old.metadata.deletion_timestamp.is_none() {
                let mut svc = old.clone();
                svc.metadata.deletion_timestamp = Some(now());
                svc.metadata.deletion_grace_period_seconds = Some(0);
                let rv = st.next_rv();
                svc.metadata.resource_version = Some(rv.to_string());
                st.objects.insert(key, svc.clone());
                st.record(Change {
                    rv,
                    kind: ChangeKind::Modified,
                    object: svc,
                    prev: Some(old),
                });
            }
        } else {
            st.remove(&key);
        }
        let rv = st.rv;
        drop(st);
        self.inner.rv_tx.send_replace(rv);
        true
    }

    /// Expires every resourceVersion up to the current one. Open watches keep running (the watch
    /// cache is unaffected), but resuming from, or reading exactly at, an older RV gets 410.
    pub fn compact(&self) {
        let rv = lock(&self.inner.store).compact();
        self.inner.rv_tx.send_replace(rv);
    }
}

impl Store {
    pub(super) fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub(super) fn compact(&mut self) -> u64 {
        // The real RV is etcd's global revision, which other resources keep advancing. Without that
        // bump, "everything up to now is expired" would also expire the RV a fresh list returns and
        // the watcher would relist forever.
        self.rv += 1;
        self.oldest_valid = self.rv;
        self.history.clear();
        self.rv
    }

    pub(super) fn remove(&mut self, key: &str) {
        if let Some(old) = self.objects.remove(key) {
            let rv = self.next_rv();
            let mut gone = old.clone();
            gone.metadata.resource_version = Some(rv.to_string());
            self.record(Change {
                rv,
                kind: ChangeKind::Deleted,
                object: gone,
                prev: Some(old),
            });
        }
    }

    pub(super) fn record(&mut self, change: Change) {
        let mut closed = Vec::new();
        for (id, w) in &self.watches {
            let (msg, essential) = match render_change(&change, &w.filter) {
                Some(line) => (
                    WatchMsg::Event {
                        rv: change.rv,
                        line,
                    },
                    true,
                ),
                None => (WatchMsg::Progress(change.rv), false),
            };
            match w.tx.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) if !essential => {}
                Err(_) => closed.push(*id),
            }
        }
        for id in closed {
            // Dropping the sender ends the stream cleanly once the queue drains, which is what the
            // cacher does to a watcher that cannot keep up.
            tracing::debug!(id, "closing unresponsive watch");
            self.watches.remove(&id);
        }
        self.history.push_back(change);
        self.trim_history();
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(evicted) = self.history.pop_front() {
                self.oldest_valid = self.oldest_valid.max(evicted.rv);
            }
        }
    }

    /// The object set as it was at `rv`, rebuilt by undoing newer history.
    pub(super) fn snapshot_at(&self, rv: u64) -> Result<BTreeMap<Key, Service>, ApiError> {
        if rv < self.oldest_valid {
            return Err(ApiError::too_old(rv, self.oldest_valid));
        }
        let mut objects = self.objects.clone();
        for c in self.history.iter().rev().take_while(|c| c.rv > rv) {
            let key = key_of(&c.object);
            match &c.prev {
                Some(prev) => objects.insert(key, prev.clone()),
                None => objects.remove(&key),
            };
        }
        Ok(objects)
    }
}

fn key_of(svc: &Service) -> Key {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or_default(),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}
