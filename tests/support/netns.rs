//! Test pods: real Linux network namespaces with private addresses, so the endpoints tests hand
//! to Kubernetes look like real pods. The real API server rejects loopback and link-local
//! EndpointSlice addresses, so upstreams on 127.0.0.x cannot stand in for pods there.
//!
//! A [`Pod`] is a separate network stack of its own. Its address (in 10.250.0.0/16) exists only
//! inside its namespace; the only way in is a veth pair whose host end holds the other usable
//! address of the pod's /30, which gives the host a connected route to the pod. Nothing on the
//! host binds the pod's address, so a reply from it really crossed the veth.
//!
//! The servers "in" a pod still run in this test process, on the test's Tokio runtime: a socket
//! keeps the network namespace it was created in, whichever thread later uses it. So
//! [`Pod::bind`] creates the listening socket on a short-lived thread that has entered the
//! namespace and hands it back. Tests then steer a pod's upstream exactly as they steer one on
//! loopback (delays, failures, hit counts through [`Upstream`]) instead of starting, signalling
//! and scraping a separate process per pod.
//!
//! Needs root and iproute2 (`ip`); each step fails with a message saying so. Dropping a `Pod`
//! (also while a panicking test unwinds) deletes its veth and namespace. The first `Pod` of a
//! process also deletes namespaces left behind by test processes that were killed before their
//! drops ran.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use nix::sched::{setns, CloneFlags};

use super::Upstream;

/// Every namespace name is `strait-t<pid>-<n>`, so a later process can tell whose it was.
const PREFIX: &str = "strait-t";
/// Number of /30 blocks in 10.250.0.0/16.
const BLOCKS: u32 = 1 << 14;
const NEEDS: &str = "tests need root and iproute2; .ci/run installs iproute2";

static NEXT: AtomicU32 = AtomicU32::new(0);
static SWEPT: Once = Once::new();

/// A network namespace with a private address, reachable from the host through its veth.
/// Dropping it removes both.
pub struct Pod {
    name: String,
    /// Host end of the veth pair; `None` until created, so a failed setup cleans up only
    /// what exists.
    veth: Option<String>,
    host_ip: Ipv4Addr,
    ip: Ipv4Addr,
}

impl Pod {
    /// Creates the namespace and its veth, both ends up, `lo` up inside. Panics with the reason
    /// when it cannot (not root, no `ip`, 10.250.0.0/16 exhausted).
    ///
    /// Runs a handful of quick `ip` commands on the calling thread.
    pub fn create() -> Pod {
        SWEPT.call_once(|| sweep(true));
        let pid = std::process::id();
        let (name, n) = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("{PREFIX}{pid}-{n}");
            match ip(&["netns", "add", &name]) {
                Ok(()) => break (name, n),
                // A namespace of an earlier process with our pid that the sweep could not
                // remove: take the next name.
                Err(e) if e.contains("File exists") => continue,
                Err(e) => panic!("`ip netns add {name}` failed: {e} ({NEEDS})"),
            }
        };
        // From here on a panic drops `pod`, removing whatever exists of it.
        let mut pod = Pod {
            name,
            veth: None,
            host_ip: Ipv4Addr::UNSPECIFIED,
            ip: Ipv4Addr::UNSPECIFIED,
        };
        // The pid spreads concurrent test processes apart; the counter spreads this one's pods.
        let start = pid.wrapping_mul(97).wrapping_add(n) % BLOCKS;
        for i in 0..BLOCKS {
            let block = (start + i) % BLOCKS;
            // The veth is named after its block, and link names are unique on the host: creating
            // it claims the block atomically, even against another test process.
            let veth = format!("strait{block}");
            match ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ]) {
                Ok(()) => {}
                Err(e) if e.contains("File exists") => continue,
                Err(e) => panic!("`ip link add {veth} type veth` failed: {e} ({NEEDS})"),
            }
            pod.veth = Some(veth.clone());
            let base = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + block * 4;
            if host_has_address_in(Ipv4Addr::from(base)) {
                // Someone else (or a namespace still being torn down) uses this /30.
                let _ = ip(&["link", "del", &veth]);
                pod.veth = None;
                continue;
            }
            pod.host_ip = Ipv4Addr::from(base + 1);
            pod.ip = Ipv4Addr::from(base + 2);
            let host_cidr = format!("{}/30", pod.host_ip);
            let pod_cidr = format!("{}/30", pod.ip);
            let host_ip = pod.host_ip.to_string();
            let ns = pod.name.clone();
            for args in [
                &["addr", "add", &host_cidr, "dev", &veth][..],
                &["link", "set", &veth, "up"],
                &["-n", &ns, "addr", "add", &pod_cidr, "dev", "eth0"],
                &["-n", &ns, "link", "set", "eth0", "up"],
                &["-n", &ns, "link", "set", "lo", "up"],
                // Replies go back over the connected route anyway; the default route makes the
                // pod's table look like a real pod's.
                &["-n", &ns, "route", "add", "default", "via", &host_ip],
            ] {
                if let Err(e) = ip(args) {
                    panic!("`ip {}` failed: {e} ({NEEDS})", args.join(" "));
                }
            }
            return pod;
        }
        panic!("no free /30 left in 10.250.0.0/16 for {}", pod.name);
    }

    /// The pod's own address, as an EndpointSlice would list it.
    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }

    /// The host end of the veth: the source address of every connection from the host.
    pub fn host_ip(&self) -> IpAddr {
        IpAddr::V4(self.host_ip)
    }

    /// The namespace's name (`ip netns list`, `ip -n <name> ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A nonblocking listener on the pod's address, `port` 0 for any. Convert it with
    /// `tokio::net::TcpListener::from_std`.
    ///
    /// Each pod is its own network stack, so the same port is free in every pod: several pods
    /// can serve one targetPort, as real pods do.
    pub fn bind(&self, port: u16) -> std::net::TcpListener {
        let path = netns_path(&self.name);
        let addr = SocketAddr::new(self.ip(), port);
        // A thread of its own because setns moves the calling thread, and it must never be a
        // runtime worker; the thread ends right after, so none of ours stays in the pod.
        let bound = std::thread::spawn(move || -> Result<std::net::TcpListener, String> {
            let ns = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {}: {e} ({NEEDS})", path.display()))?;
            let listener =
                std::net::TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("nonblocking {addr}: {e}"))?;
            Ok(listener)
        })
        .join()
        .expect("the thread binding inside the pod does not panic");
        bound.unwrap_or_else(|e| panic!("listening in pod {}: {e}", self.name))
    }

    /// An [`Upstream`] answering with `name` on the pod's address, any port. Call it inside a
    /// Tokio runtime: the upstream is served there.
    pub fn upstream(&self, name: &str) -> Upstream {
        self.upstream_on(name, 0)
    }

    /// An [`Upstream`] answering with `name` on `port` of the pod's address.
    pub fn upstream_on(&self, name: &str, port: u16) -> Upstream {
        let listener = tokio::net::TcpListener::from_std(self.bind(port))
            .expect("a Tokio runtime to serve the pod's upstream");
        Upstream::serve_listener(name, listener)
    }

    /// [`super::grpc_health_server`], listening on the pod's address.
    pub async fn grpc_health_server(
        &self,
        service_name: &str,
        status: Option<tonic_health::ServingStatus>,
    ) -> (SocketAddr, tonic_health::server::HealthReporter) {
        let listener = tokio::net::TcpListener::from_std(self.bind(0))
            .expect("a Tokio runtime to serve the pod's gRPC health service");
        super::grpc_health_server_on(listener, service_name, status).await
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Every error is ignored: this runs during unwinding too, where a panic would abort.
        //
        // The veth goes first and explicitly: sockets made in the namespace (an upstream still
        // being served) keep it alive after `ip netns del`, and with it the pair and the host
        // address. Deleting one end removes both at once.
        if let Some(veth) = &self.veth {
            let _ = ip(&["link", "del", veth]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Deletes `strait-t<pid>-*` namespaces whose process no longer runs (a test killed before its
/// pods were dropped). The first [`Pod`] of each process does this on its own.
pub fn remove_stale() {
    sweep(false);
}

/// With `mine`, also deletes namespaces named with this process's pid: before this process's
/// first pod they can only be left by an earlier process that had the same pid.
fn sweep(mine: bool) {
    // Without `ip`, there is nothing to sweep; creating the pod reports it.
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let me = std::process::id();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let gone = !Path::new(&format!("/proc/{pid}")).exists();
        if gone || (mine && pid == me) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Whether the host has an address in the /30 starting at `base`.
fn host_has_address_in(base: Ipv4Addr) -> bool {
    Command::new("ip")
        .args(["-o", "addr", "show", "to", &format!("{base}/30")])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false)
}

/// Where iproute2 keeps the file that names a namespace.
fn netns_path(name: &str) -> std::path::PathBuf {
    let run = Path::new("/run/netns").join(name);
    if run.exists() {
        run
    } else {
        // Older iproute2, on systems where /var/run is not a link to /run.
        Path::new("/var/run/netns").join(name)
    }
}

/// Runs `ip args`; the error is its stderr, or why it could not run.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}
