//! The object store: current objects, a change log back to the compaction point, and the
//! open watches.
//!
//! Like etcd under the real server, one counter orders every write of every resource, and
//! each object's `metadata.resourceVersion` is the counter's value at its last write. The log
//! keeps each change with the object before and after it, which is enough to answer a watch
//! from any version since the compaction point and to rebuild the list a `continue` token or
//! `resourceVersionMatch=Exact` asks for. Each open watch has its own channel that writes
//! push into while holding the lock, so no change falls between a watch's replay and its
//! live events, and compaction never touches a watch that is already open.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use super::resources::Allocator;

/// (storage name, namespace, name); namespace is empty for cluster-scoped objects. The order
/// is the order lists come back in, as etcd's key order gives the real server.
pub type Key = (&'static str, String, String);

/// One write.
pub struct Change {
    pub rv: u64,
    pub key: Key,
    /// The object before the write; `None` for a create.
    pub prev: Option<Arc<Value>>,
    /// The object after the write; `None` for a delete.
    pub cur: Option<Arc<Value>>,
}

pub struct Watcher {
    pub storage: &'static str,
    pub tx: mpsc::UnboundedSender<Arc<Change>>,
}

/// What Strait wrote that tests look at.
#[derive(Default)]
pub struct Record {
    /// Every successful write to a `/status` subresource: (storage, namespace, name, status).
    pub status_writes: Vec<(&'static str, String, String, Value)>,
    /// Every request the server answered: (method, path and query, status code).
    pub requests: Vec<(String, String, u16)>,
}

pub struct Store {
    pub rv: u64,
    /// Versions below this are gone: watching or listing from them is 410 Expired.
    pub compacted: u64,
    pub objects: BTreeMap<Key, Arc<Value>>,
    pub log: VecDeque<Arc<Change>>,
    pub watchers: Vec<Watcher>,
    pub alloc: Allocator,
    pub record: Record,
}

impl Store {
    pub fn new() -> Self {
        Self {
            rv: 0,
            compacted: 0,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            watchers: Vec::new(),
            alloc: Allocator::default(),
            record: Record::default(),
        }
    }

    /// Writes `obj` (or deletes, for `None`) under `key` at the next version, logs the change
    /// and hands it to the open watches of that storage. Returns the stored object.
    pub fn commit(&mut self, key: Key, obj: Option<Value>) -> Option<Arc<Value>> {
        self.rv += 1;
        let rv = self.rv;
        let cur = obj.map(|mut o| {
            o["metadata"]["resourceVersion"] = rv.to_string().into();
            Arc::new(o)
        });
        let prev = match &cur {
            Some(c) => self.objects.insert(key.clone(), Arc::clone(c)),
            None => self.objects.remove(&key),
        };
        let change = Arc::new(Change {
            rv,
            key,
            prev,
            cur: cur.clone(),
        });
        self.log.push_back(Arc::clone(&change));
        let storage = change.key.0;
        self.watchers
            .retain(|w| w.storage != storage || w.tx.send(Arc::clone(&change)).is_ok());
        cur
    }

    /// Forgets history: from now on every version below the current one is expired.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.log.clear();
    }

    /// The objects of `storage` as they were at version `at` (which must not be below the
    /// compaction point), by undoing the logged changes after it.
    pub fn snapshot(&self, storage: &str, at: u64) -> BTreeMap<Key, Arc<Value>> {
        let mut m: BTreeMap<Key, Arc<Value>> = self
            .objects
            .iter()
            .filter(|(k, _)| k.0 == storage)
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for c in self.log.iter().rev() {
            if c.rv <= at {
                break;
            }
            if c.key.0 != storage {
                continue;
            }
            match &c.prev {
                Some(p) => m.insert(c.key.clone(), Arc::clone(p)),
                None => m.remove(&c.key),
            };
        }
        m
    }

    /// Logged changes of `storage` after version `after`, oldest first.
    pub fn changes_since(&self, storage: &str, after: u64) -> Vec<Arc<Change>> {
        self.log
            .iter()
            .filter(|c| c.rv > after && c.key.0 == storage)
            .cloned()
            .collect()
    }
}
