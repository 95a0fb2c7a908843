//! Reloads the static file on SIGHUP and when it changes on disk.

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

/// Result label values for [`strait_proxy::metrics::CONFIG_RELOADS`].
fn count(success: bool) {
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

/// Watches `path` (its directory, so atomic renames and ConfigMap symlink swaps are seen)
/// and SIGHUP, reloading until `shutdown` resolves. Owns the publisher: one writer.
pub async fn run(path: PathBuf, mut publisher: Publisher, shutdown: impl Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
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
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload with SIGHUP");
            None
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    let mut last = digest(&path);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                let now = digest(&path);
                // Other files in the directory change too; reload only when ours did.
                if now != last {
                    last = now;
                    reload(&path, &mut publisher);
                }
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading configuration");
                last = digest(&path);
                reload(&path, &mut publisher);
            }
            () = &mut shutdown => return,
        }
    }
}

fn digest(path: &std::path::Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}
