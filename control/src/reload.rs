//! The control loop: reloads the static file on SIGHUP and when it changes on disk, and
//! rebuilds the table when a DNS backend's answer changes. It owns the one publisher, or,
//! beside the Kubernetes source, hands each accepted file to it (that source owns the
//! publisher then, and merges the file with the cluster's objects).

use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use strait_proxy::table::spec::Spec;

use crate::publisher::Publisher;
use crate::source::file;

/// Editors and `kubectl` write files in several steps; wait this long after the last change.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Wait before trying again a rebuild that failed.
const REBUILD_RETRY: Duration = Duration::from_secs(1);

/// Counts a configuration load in [`strait_proxy::metrics::CONFIG_RELOADS`].
pub fn count(success: bool) {
    let result = if success { "success" } else { "failure" };
    metrics::counter!(strait_proxy::metrics::CONFIG_RELOADS, "result" => result).increment(1);
}

/// Loads `path`; a file that fails to parse or validate is logged with file:line:column and
/// counted as a failed reload.
fn load_or_reject(path: &Path) -> Option<file::Loaded> {
    match file::load(path) {
        Ok(l) => Some(l),
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!("config rejected, keeping the running table: {line}");
            }
            count(false);
            None
        }
    }
}

/// Loads `path` and publishes it. Failures are logged with file:line:column and counted;
/// the table in force stays. Returns the files the configuration references, when it parsed.
pub fn reload(path: &Path, publisher: &mut Publisher) -> Option<Vec<PathBuf>> {
    let loaded = load_or_reject(path)?;
    let files = loaded.spec.referenced_files();
    match publisher.publish(loaded.spec.clone(), &path.display().to_string()) {
        Ok(generation) => {
            tracing::info!(generation, file = %path.display(), "config reloaded");
            count(true);
        }
        Err(errors) => {
            for line in loaded.diagnose(&errors).to_string().lines() {
                tracing::error!("config rejected, keeping the running table: {line}");
            }
            count(false);
        }
    }
    Some(files)
}

/// Loads `path` for a source that merges it with its own configuration: a file that fails to
/// parse or validate, or whose listeners differ from `listeners` (those in force; bound
/// sockets cannot change on reload), is logged and counted as rejected; else its spec is
/// sent on `tx` and counted as loaded. Returns the files the configuration references, when
/// it parsed.
fn reload_into(
    path: &Path,
    tx: &watch::Sender<Option<Arc<Spec>>>,
    listeners: &[(String, String)],
) -> Option<Vec<PathBuf>> {
    let loaded = load_or_reject(path)?;
    let files = loaded.spec.referenced_files();
    let now = crate::publisher::listener_set(&loaded.spec);
    if now != listeners {
        tracing::error!(
            file = %path.display(),
            "config rejected, keeping the running table: listeners changed; restart Strait to \
             apply listener changes (routes and backends reload live)"
        );
        count(false);
        return Some(files);
    }
    // The latest accepted file replaces one the source has not taken yet: only it matters.
    tx.send_replace(Some(Arc::new(loaded.spec)));
    tracing::info!(file = %path.display(), "config reloaded; merging it with the cluster's objects");
    count(true);
    Some(files)
}

/// Where a reloaded file goes.
enum Target {
    /// Published on its own (standalone mode); DNS changes rebuild it.
    Publish(Box<Publisher>),
    /// Handed to a source that merges it with its own configuration (Kubernetes), which
    /// owns the publisher. The listeners are those in force.
    Forward(watch::Sender<Option<Arc<Spec>>>, Vec<(String, String)>),
}

/// Reload triggers, set up before serving so no change and no SIGHUP is missed (an
/// unhandled SIGHUP would end the process).
pub struct Reloader {
    path: PathBuf,
    target: Target,
    last: Option<u64>,
    /// Certificates and other files the configuration reads; their changes reload it too.
    files: Vec<PathBuf>,
    /// Directories watched (the config's, and those of `files`).
    watched: HashSet<PathBuf>,
    changes: mpsc::Receiver<()>,
    /// The last rebuild for a DNS change failed and is to be tried again.
    rebuild_failed: bool,
    watcher: Option<notify::RecommendedWatcher>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Reloader {
    /// Watches `path` (its directory, so atomic renames and ConfigMap symlink swaps are
    /// seen) and SIGHUP. `loaded_text` is what is in force now. Must run inside the runtime.
    /// `files` are the files the loaded configuration references.
    pub fn new(
        path: PathBuf,
        publisher: Publisher,
        loaded_text: &str,
        files: Vec<PathBuf>,
    ) -> Self {
        Self::with_target(
            path,
            Target::Publish(Box::new(publisher)),
            loaded_text,
            files,
        )
    }

    /// Like [`Reloader::new`], for a file that a source merges with its own configuration:
    /// each accepted version of `loaded` is put in `tx` (the latest replaces one not taken
    /// yet) instead of being published. The listeners of `loaded` stay fixed.
    pub fn forwarding(loaded: &file::Loaded, tx: watch::Sender<Option<Arc<Spec>>>) -> Self {
        let target = Target::Forward(tx, crate::publisher::listener_set(&loaded.spec));
        Self::with_target(
            loaded.path.clone(),
            target,
            &loaded.text,
            loaded.spec.referenced_files(),
        )
    }

    fn with_target(path: PathBuf, target: Target, loaded_text: &str, files: Vec<PathBuf>) -> Self {
        let (tx, changes) = mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok_and(|e| !e.kind.is_access()) {
                // A full channel already means "reload pending".
                let _ = tx.try_send(());
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP");
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
        let last = Some(content_digest(loaded_text.as_bytes(), &files));
        let mut reloader = Self {
            path,
            target,
            last,
            files,
            watched: HashSet::new(),
            changes,
            rebuild_failed: false,
            watcher,
            hup,
        };
        reloader.watch_dirs();
        reloader
    }

    /// Watches the directory of the config file and of every referenced file (directories,
    /// so atomic renames and Kubernetes' symlink swaps are seen).
    fn watch_dirs(&mut self) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let dirs: HashSet<PathBuf> = std::iter::once(&self.path)
            .chain(&self.files)
            .map(|p| {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), PathBuf::from)
            })
            .collect();
        for dir in dirs.difference(&self.watched) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a directory; reload with SIGHUP");
            }
        }
        for dir in self.watched.difference(&dirs) {
            let _ = watcher.unwatch(dir);
        }
        self.watched = dirs;
    }

    fn reload(&mut self) {
        // Taken before reading, so a file that changes while the reload reads it (a key
        // written just after its certificate) makes the next check differ and reload again.
        self.last = self.digest();
        let files = match &mut self.target {
            Target::Publish(publisher) => reload(&self.path, publisher),
            Target::Forward(tx, listeners) => reload_into(&self.path, tx, listeners),
        };
        if let Some(files) = files {
            if files != self.files {
                self.files = files;
                self.watch_dirs();
                // The digest covers other files now; compare against them from here on.
                self.last = self.digest();
            }
        }
    }

    /// The config file's content and every referenced file's, so a rotated certificate
    /// reloads even though the config text did not change.
    fn digest(&self) -> Option<u64> {
        std::fs::read(&self.path)
            .ok()
            .map(|text| content_digest(&text, &self.files))
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
                    self.reload();
                }
                () = dns_changed(&mut self.target) => self.rebuild(),
                // A rebuild re-reads certificate files, which may be half-rotated: retry
                // until one goes through, or the DNS change would be lost.
                () = tokio::time::sleep(REBUILD_RETRY), if self.rebuild_failed => self.rebuild(),
                () = &mut shutdown => return,
            }
        }
    }

    fn rebuild(&mut self) {
        let Target::Publish(publisher) = &mut self.target else {
            return;
        };
        match publisher.rebuild() {
            Ok(generation) => {
                self.rebuild_failed = false;
                tracing::info!(generation, "table rebuilt with new DNS answers");
            }
            Err(errors) => {
                self.rebuild_failed = true;
                for e in errors {
                    tracing::error!(error = %e, retry_in = ?REBUILD_RETRY, "rebuild after a DNS change failed; keeping the running table");
                }
            }
        }
    }

    /// Other files in the directory change too; reload only when ours did.
    fn reload_if_changed(&mut self) {
        if self.digest() != self.last {
            self.reload();
        }
    }
}

/// A DNS answer changed for the table this reloader publishes (never, when it forwards: the
/// source it forwards to watches DNS itself).
async fn dns_changed(target: &mut Target) {
    match target {
        Target::Publish(publisher) => publisher.dns_changed().await,
        Target::Forward(..) => std::future::pending().await,
    }
}

fn content_digest(config: &[u8], files: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    config.hash(&mut h);
    for f in files {
        // A missing file hashes differently from an empty one.
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}
