//! Traffic threads: one single-threaded runtime per worker, each serving every listener.
//!
//! As nginx's worker processes and Envoy's worker threads: a connection lives on the worker
//! that accepted it, and so do the upstream connections its requests open (each worker keeps
//! its own idle lists, [`crate::pool`]), so a request never waits for another thread and no
//! thread wakes another. tokio's work-stealing scheduler, used before, cost 1.5 to 2 us more
//! per keep-alive request on two cores (docs/performance.md, "Worker threads instead of the
//! work-stealing scheduler").

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker index; 0 on any other thread.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Workers in this process; 1 until [`Workers::start`] starts more.
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// The index of the worker running on this thread (0 outside worker threads: the process's
/// own runtime counts as worker 0 when it serves traffic itself).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers serve traffic (per-worker state is sized by this).
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Running worker threads.
#[derive(Debug)]
pub struct Workers {
    handles: WorkerHandles,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

/// Where to run tasks on the workers; cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerHandles(Arc<[Handle]>);

impl Workers {
    /// Starts `n` worker threads, each running a current-thread runtime with I/O and timers,
    /// until [`Workers::stop`]. Call before any endpoint state exists: idle connection lists
    /// are sized by the count set here.
    pub fn start(n: usize) -> io::Result<Self> {
        let n = n.max(1);
        COUNT.store(n, Ordering::Relaxed);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("strait-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(i));
                    let _ = runtime.block_on(stopped);
                    // Tasks still running (past the drain timeout) are dropped; blocking
                    // work is not waited for.
                    runtime.shutdown_background();
                })?;
            stops.push(stop);
            threads.push(thread);
        }
        Ok(Self {
            handles: WorkerHandles(handles.into()),
            stops,
            threads,
        })
    }

    /// Where to run tasks on these workers.
    pub fn handles(&self) -> &WorkerHandles {
        &self.handles
    }

    /// Stops every worker (their remaining tasks are dropped) and waits for the threads.
    pub fn stop(self) {
        drop(self.stops);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl WorkerHandles {
    /// Runs `make(i)` on every worker `i`, and returns a future that resolves once all of
    /// them have. `make` itself runs in worker `i`'s runtime context, so a socket it binds
    /// ([`crate::listener::bind_for_worker`]) belongs to that worker.
    pub fn spawn_each<F, Fut>(&self, mut make: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tasks: Vec<_> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let _context = h.enter();
                h.spawn(make(i))
            })
            .collect();
        async move {
            for t in tasks {
                // One that panicked has ended; the others are still awaited.
                let _ = t.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_worker_runs_its_own_task_on_its_own_thread() {
        let workers = Workers::start(3).expect("threads start");
        assert_eq!(count(), 3);
        let (tx, rx) = std::sync::mpsc::channel();
        let handles = workers.handles().0.clone();
        let all = workers.handles().spawn_each(|i| {
            let tx = tx.clone();
            // `make` runs in worker i's context already (this test's runtime is another).
            let in_context = Handle::try_current().is_ok_and(|h| h.id() == handles[i].id());
            async move {
                let thread = std::thread::current().name().map(str::to_owned);
                tx.send((i, current(), thread, in_context)).unwrap();
            }
        });
        all.await;
        let mut seen: Vec<_> = (0..3)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("each worker runs its task")
            })
            .collect();
        seen.sort();
        for (i, (asked, index, thread, in_context)) in seen.into_iter().enumerate() {
            assert_eq!((asked, index), (i, i));
            assert_eq!(
                thread.as_deref(),
                Some(format!("strait-worker-{i}").as_str())
            );
            assert!(in_context);
        }
        // Not a worker thread.
        assert_eq!(current(), 0);
        workers.stop();
    }
}
