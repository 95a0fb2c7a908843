//! The control loop: reloads the static file on SIGHUP and when it changes on disk, and
//! rebuilds the table when a DNS backend's answer changes. It owns the one publisher.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::publisher::Publisher;
use crate::source::file;

/// Editors and `kubectl` write files in several steps; wait this long after the last change.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Counts a configuration load in [`strait_proxy::metrics::CONFIG_RELOADS`].
pub fn count(success: bool) {
    let result = if success { "success" } else { "failure" };
    metrics::counter!(strait_proxy::metrics::CONFIG_RELOADS, "result" => result).increment(1);
}

/// Loads `path` and publishes it. Failures are logged with file:line:column and counted;
/// the table in force stays.
pub fn reload(path: &std::path::Path, publisher: &mut Publisher) -> bool {
    let loaded = match file::load(path) {
        Ok(l) => l,
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!("config rejected, keeping the running table: {line}");
            }
            count(false);
            return false;
        }
    };
    match publisher.publish(loaded.spec.clone(), &path.display().to_string()) {
        Ok(generation) => {
            tracing::info!(generation, file = %path.display(), "config reloaded");
            count(true);
            true
        }
        Err(errors) => {
            for line in loaded.diagnose(&errors).to_string().lines() {
                tracing::error!("config rejected, keeping the running table: {line}");
            }
            count(false);
            false
        }
    }
}

/// Reload triggers, set up before serving so no change and no SIGHUP is missed (an
/// unhandled SIGHUP would end the process).
pub struct Reloader {
    path: PathBuf,
    publisher: Publisher,
    last: Option<u64>,
    changes: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Reloader {
    /// Watches `path` (its directory, so atomic renames and ConfigMap symlink swaps are
    /// seen) and SIGHUP. `loaded_text` is what is in force now. Must run inside the runtime.
    pub fn new(path: PathBuf, publisher: Publisher, loaded_text: &str) -> Self {
        let (tx, changes) = mpsc::channel::<()>(1);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), PathBuf::from);
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok_and(|e| !e.kind.is_access()) {
                // A full channel already means "reload pending".
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload with SIGHUP");
                None
            }
        };
        let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        Self {
            path,
            publisher,
            last: Some(hash(loaded_text.as_bytes())),
            changes,
            _watcher: watcher,
            hup,
        }
    }

    /// Reloads on every trigger until `shutdown` resolves. Owns the publisher: one writer.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        // The file may have changed between the first load and the watch.
        self.reload_if_changed();
        tokio::pin!(shutdown);
        loop {
            let hup = async {
                match self.hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(()) = self.changes.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while self.changes.try_recv().is_ok() {}
                    self.reload_if_changed();
                }
                Some(()) = hup => {
                    tracing::info!("SIGHUP: reloading configuration");
                    self.last = digest(&self.path);
                    reload(&self.path, &mut self.publisher);
                }
                () = self.publisher.dns_changed() => {
                    match self.publisher.rebuild() {
                        Ok(generation) => tracing::info!(generation, "table rebuilt with new DNS answers"),
                        // The configuration compiled before; only a bug gets here.
                        Err(errors) => for e in errors {
                            tracing::error!(error = %e, "rebuild after a DNS change failed; keeping the running table");
                        },
                    }
                }
                () = &mut shutdown => return,
            }
        }
    }

    /// Other files in the directory change too; reload only when ours did.
    fn reload_if_changed(&mut self) {
        let now = digest(&self.path);
        if now != self.last {
            self.last = now;
            reload(&self.path, &mut self.publisher);
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn digest(path: &std::path::Path) -> Option<u64> {
    std::fs::read(path).ok().map(|b| hash(&b))
}
