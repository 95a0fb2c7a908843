//! The `strait` binary: command line, logging, signals, and wiring a source to the proxy.

#![forbid(unsafe_code)]

mod sidecar;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use strait_control::kubernetes::translate::{ServiceRouting, TranslateOptions, CONTROLLER};
use strait_control::kubernetes::{self, leader, status::PublishSource};
use strait_control::publisher::Publisher;
use strait_control::source::file;
use strait_proxy::admin::{serve_admin, Admin};
use strait_proxy::listener::{bind, bind_for_worker, serve, BindError, ListenerContext};
use strait_proxy::table::spec::{ListenerProtocol, Spec};
use strait_proxy::table::TableHandle;
use strait_proxy::tcp::serve_tcp;
use strait_proxy::workers::{WorkerHandles, Workers};
use tokio::net::TcpListener;
use tokio::sync::watch;

mod otel;

/// mimalloc (why: proxy/src/allocator.rs).
#[global_allocator]
static ALLOCATOR: strait_proxy::allocator::Allocator = strait_proxy::allocator::Allocator;

/// Exit code for a configuration rejected at startup (sysexits EX_CONFIG); nothing is bound.
const EXIT_CONFIG: u8 = 78;
/// Exit code when an address cannot be bound (sysexits EX_UNAVAILABLE).
const EXIT_BIND: u8 = 69;

/// Strait: an ingress and service proxy.
///
/// Runs a reverse proxy from a YAML configuration file. The file is reloaded on SIGHUP and
/// when it changes; a file that does not validate is rejected and the running table stays.
/// SIGTERM or SIGINT drains: new connections are refused, /ready turns 503, and in-flight
/// requests finish (up to limits.drain_timeout) before exit.
#[derive(Debug, Parser)]
#[command(name = "strait", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Configuration file (YAML) to serve.
    #[arg(long, short = 'c', env = "STRAIT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Admin listener address for /live, /ready, /metrics, /config [default: admin.address
    /// from the config, else 127.0.0.1:9901].
    #[arg(long, value_name = "IP:PORT", global = true)]
    admin_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Log level or filter (e.g. `info`, `debug`, `strait::access=off,info`); RUST_LOG wins
    /// when set.
    #[arg(long, default_value = "info", value_name = "FILTER", global = true)]
    log_level: String,

    /// Worker threads for the proxy [default: one per CPU core].
    #[arg(long, value_name = "N", global = true)]
    worker_threads: Option<usize>,

    /// Export a span per sampled request to this OTLP/HTTP collector (base URL, e.g.
    /// http://127.0.0.1:4318, or https:// with the system's roots or the CA bundle in
    /// OTEL_EXPORTER_OTLP_CERTIFICATE) [default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
    /// OTEL_EXPORTER_OTLP_ENDPOINT, then tracing.otlp_endpoint from the config].
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,

    #[command(flatten)]
    kube: KubeArgs,
}

/// Ingress controller flags; each overrides the same setting of the config file's
/// `kubernetes` section.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Kubernetes (Ingress controller)")]
struct KubeArgs {
    /// Run as an Ingress controller: watch the cluster (in-cluster service account, else
    /// KUBECONFIG or ~/.kube/config) and serve its Ingresses. --config is optional then.
    #[arg(long)]
    kubernetes: bool,

    /// Address of the HTTP listener for Ingress routes [default: 0.0.0.0:8080].
    #[arg(long, value_name = "IP:PORT")]
    http_addr: Option<SocketAddr>,

    /// Also listen here for requests routed by Service name (`Host: svc.ns:port`), with
    /// per-request balancing over the Service's ready endpoints (sidecar outbound traffic);
    /// off unless set.
    #[arg(long, value_name = "IP:PORT")]
    service_addr: Option<SocketAddr>,

    /// Address of the HTTPS listener for Ingress routes [default: 0.0.0.0:8443], with the
    /// certificates of the Ingresses' TLS Secrets; bound while at least one is usable.
    #[arg(long, value_name = "IP:PORT")]
    https_addr: Option<SocketAddr>,

    /// The IngressClass to serve (its controller must be strait.io/ingress-controller)
    /// [default: strait].
    #[arg(long, value_name = "NAME")]
    ingress_class: Option<String>,

    /// Namespace to watch; repeat for several [default: all namespaces].
    #[arg(long = "watch-namespace", value_name = "NAMESPACE")]
    watch_namespaces: Vec<String>,

    /// Copy this Service's load-balancer address into the status of served Ingresses.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        conflicts_with = "publish_address"
    )]
    publish_service: Option<String>,

    /// Write this address (IP or hostname) into the status of served Ingresses; repeat
    /// for several.
    #[arg(long = "publish-address", value_name = "ADDRESS")]
    publish_address: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a configuration file; print every problem with file:line:column and exit
    /// non-zero if there is any.
    Validate {
        /// The file to check.
        file: PathBuf,
    },
    /// Run as a sidecar next to one application (docs/sidecar.md).
    Sidecar(sidecar::SidecarArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Validate { file }) = &cli.command {
        return validate(file);
    }
    let preset = match &cli.command {
        Some(Command::Sidecar(args)) => {
            match sidecar::preset(args, cli.admin_addr, cli.config.as_ref()) {
                Ok(loaded) => Some(loaded),
                Err(code) => return code,
            }
        }
        _ => None,
    };
    let _log_guard = init_logging(cli.log_format, &cli.log_level);
    // Validate before anything is bound, so a bad file fails fast with a distinct code.
    let loaded = match &cli.config {
        _ if preset.is_some() => preset,
        Some(path) => match file::load(path) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("{e}");
                tracing::error!("configuration rejected; not starting");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => None,
    };
    let kube_enabled = cli.kube.kubernetes
        || loaded
            .as_ref()
            .and_then(|l| l.spec.kubernetes.as_ref())
            .is_some_and(|k| k.enabled);
    let mode = match (loaded, kube_enabled) {
        (Some(l), false) => Mode::File(Box::new(l)),
        (loaded, true) => {
            let static_spec = loaded.as_ref().map(|l| l.spec.clone()).unwrap_or_default();
            match kube_options(&cli.kube, &static_spec) {
                Ok(options) => Mode::Kubernetes(Box::new(options), loaded.map(Box::new)),
                Err(e) => {
                    eprintln!("strait: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (None, false) => {
            eprintln!(
                "strait: --config FILE or --kubernetes is required (see `strait --help`; try \
                 examples/standalone.yaml)"
            );
            return ExitCode::from(2);
        }
    };

    // Traffic runs on one single-threaded runtime per worker (strait_proxy::workers): with
    // one worker, this thread's runtime serves everything; with more, it keeps the control
    // plane, admin and signals, and the workers serve the listeners.
    let threads = cli
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strait: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Started before any table exists: per-worker state is sized by the worker count.
    let workers = if threads > 1 {
        match Workers::start(threads) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("strait: cannot start {threads} worker threads: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let code = runtime.block_on(run(
        cli,
        mode,
        workers.as_ref().map(Workers::handles).cloned(),
    ));
    if let Some(w) = workers {
        w.stop();
    }
    code
}

fn validate(path: &Path) -> ExitCode {
    match file::load(path) {
        Ok(l) => {
            println!(
                "{}: ok ({} listeners, {} backends)",
                path.display(),
                l.spec.listeners.len(),
                l.spec.backends.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Lines buffered for the log writer thread. The crate's default (128,000) preallocates and
/// touches several MB up front; a few thousand lines absorb any burst a proxy produces.
const LOG_BUFFER_LINES: usize = 8192;

fn init_logging(format: LogFormat, level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `Targets` takes the same `target=level,level` syntax as RUST_LOG without pulling a
    // regex engine into the binary.
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_owned());
    let filter: Targets = spec.parse().unwrap_or_else(|e| {
        eprintln!("strait: invalid log filter {spec:?} ({e}); using info");
        Targets::new().with_default(LevelFilter::INFO)
    });
    // Logging never blocks a request: lines go through a bounded buffer to a writer thread
    // and are dropped (not queued without bound) if it falls behind.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .finish(std::io::stdout());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
    guard
}

fn install_metrics() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(strait_proxy::metrics::REQUEST_DURATION.to_owned()),
            strait_proxy::metrics::DURATION_BUCKETS,
        )
        .and_then(|b| b.install_recorder());
    match handle {
        Ok(h) => {
            strait_proxy::metrics::describe();
            kubernetes::describe_metrics();
            Some(h)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    }
}

/// Where tables come from.
enum Mode {
    /// The static configuration file, reloaded when it changes.
    File(Box<file::Loaded>),
    /// The cluster, plus the static listeners, routes and backends of the file if given
    /// (reloaded as in `File` mode, its listeners fixed).
    Kubernetes(Box<kubernetes::Options>, Option<Box<file::Loaded>>),
}

/// The Kubernetes source's options: flags override the config file's `kubernetes` section.
fn kube_options(args: &KubeArgs, spec: &Spec) -> Result<kubernetes::Options, String> {
    let file = spec.kubernetes.clone().unwrap_or_default();
    let publish = match (&args.publish_service, &args.publish_address) {
        (Some(s), _) => Some(s.clone()),
        (None, a) if !a.is_empty() => None,
        (None, _) => file.publish_service.clone(),
    };
    let addresses = if args.publish_address.is_empty() {
        file.publish_address.clone()
    } else {
        args.publish_address.clone()
    };
    let publish = match (publish, addresses.is_empty()) {
        (Some(s), _) => {
            let Some((namespace, name)) = s.split_once('/') else {
                return Err(format!("--publish-service {s:?}: expected NAMESPACE/NAME"));
            };
            PublishSource::Service {
                namespace: namespace.into(),
                name: name.into(),
            }
        }
        (None, false) => PublishSource::Addresses(addresses),
        (None, true) => PublishSource::None,
    };
    let namespaces = if args.watch_namespaces.is_empty() {
        file.watch_namespaces.clone()
    } else {
        args.watch_namespaces.clone()
    };
    let http_addr = args.http_addr.map_or(file.http_addr, |a| a.to_string());
    let service_addr = args
        .service_addr
        .map(|a| a.to_string())
        .or(file.service_addr.clone());
    // Without the Ingress listener, TCP services open beside the Service listener (a
    // sidecar's loopback).
    let tcp_from = match (&service_addr, file.ingresses) {
        (Some(s), false) => s,
        _ => &http_addr,
    };
    let tcp_ip = tcp_from
        .parse::<SocketAddr>()
        .map_or_else(|_| "0.0.0.0".into(), |a| a.ip().to_string());
    Ok(kubernetes::Options {
        translate: TranslateOptions {
            ingress_class: args.ingress_class.clone().unwrap_or(file.ingress_class),
            controller: CONTROLLER.into(),
            // Routes for every Service only when a listener serves them.
            service_routing: service_addr.is_some().then(|| ServiceRouting {
                namespace: pod_namespace(),
                cluster_domain: file.cluster_domain.clone(),
                defaults: file.service_defaults.clone(),
            }),
            tcp_ip,
            // Filled by the controller from the listeners it serves.
            reserved_ports: Vec::new(),
        },
        service_addr,
        ingresses: file.ingresses,
        namespaces,
        http_addr,
        https_addr: Some(args.https_addr.map_or(file.https_addr, |a| a.to_string())),
        publish,
        debounce: file.debounce,
        max_delay: file.max_delay,
        identity: leader::default_identity(),
        lease_namespace: pod_namespace(),
    })
}

/// The Kubernetes client: the pod's service account when running in a cluster, else the
/// kubeconfig (`KUBECONFIG`, else `~/.kube/config`) as kubectl finds it. In-cluster first,
/// so a kubeconfig left in an image never points a deployed Strait at another cluster.
async fn kube_client() -> Result<kube::Client, kube::Error> {
    let config = match kube::Config::incluster() {
        Ok(c) => c,
        Err(_) => kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?,
    };
    kube::Client::try_from(config)
}

/// Logs each SIGHUP received when there is no file to reload (Kubernetes mode without
/// `--config`), instead of letting it end the process.
async fn ignore_sighup() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: no --config file to reload; the cluster is watched continuously");
    }
}

/// The namespace Strait runs in: `POD_NAMESPACE` (downward API), else the service
/// account's, else `default`.
fn pod_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()
        })
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// How soon a dynamic listener whose address could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Longest the exit waits for the Kubernetes source to release its Lease after the drain.
const LEASE_RELEASE_WAIT: Duration = Duration::from_secs(5);

async fn run(cli: Cli, mode: Mode, workers: Option<WorkerHandles>) -> ExitCode {
    let prometheus = install_metrics();
    let handle = TableHandle::default();
    let mut publisher = Publisher::new(handle.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_watch = stop_rx.clone();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // The source starts before anything serves, so no change is missed; listeners serve
    // once a table is in force.
    let mut source = None;
    let spec = match mode {
        Mode::File(loaded) => {
            let source = loaded.path.display().to_string();
            if let Err(errors) = publisher.publish(loaded.spec.clone(), &source) {
                eprintln!("{}", loaded.diagnose(&errors));
                return ExitCode::from(EXIT_CONFIG);
            }
            strait_control::reload::count(true);
            let reloader = strait_control::reload::Reloader::new(
                loaded.path.clone(),
                publisher,
                &loaded.text,
                loaded.spec.referenced_files(),
            );
            tokio::spawn(reloader.run(stopped()));
            loaded.spec
        }
        Mode::Kubernetes(options, loaded) => {
            let static_spec = loaded.as_ref().map(|l| l.spec.clone()).unwrap_or_default();
            let spec = kubernetes::base_spec(static_spec, &options);
            // TCP services come and go with their Services' annotations.
            publisher.allow_listener_changes();
            let fixed = spec.listeners.iter().map(|l| l.name.clone()).collect();
            tokio::spawn(follow_listeners(
                handle.clone(),
                fixed,
                spec.limits.clone(),
                stop_watch,
                workers.clone(),
            ));
            let client = match kube_client().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot configure the Kubernetes client");
                    eprintln!("strait: cannot configure the Kubernetes client (in-cluster service account, KUBECONFIG or ~/.kube/config): {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let statics = match loaded {
                Some(loaded) => {
                    let (tx, rx) = watch::channel(None);
                    let reloader = strait_control::reload::Reloader::forwarding(&loaded, tx);
                    tokio::spawn(reloader.run(stopped()));
                    Some(rx)
                }
                None => {
                    // SIGHUP's default action ends the process; `kill -HUP` (a habit from
                    // file mode) must not take a controller down.
                    tokio::spawn(ignore_sighup());
                    None
                }
            };
            source = Some(tokio::spawn(kubernetes::run(
                client,
                *options,
                publisher,
                spec.clone(),
                statics,
                stopped(),
            )));
            spec
        }
    };

    let from_env = |name: &str| std::env::var(name).ok().filter(|e| !e.is_empty());
    let (traces_env, base_env) = (
        from_env(otel::TRACES_ENDPOINT_VARIABLE),
        from_env(otel::ENDPOINT_VARIABLE),
    );
    // The flag, then the specification's order for the variables, then the file.
    let otlp = cli
        .otlp_endpoint
        .as_deref()
        .filter(|e| !e.is_empty())
        .map(otel::Endpoint::Base)
        .or(traces_env.as_deref().map(otel::Endpoint::Traces))
        .or(base_env.as_deref().map(otel::Endpoint::Base))
        .or(spec
            .tracing
            .otlp_endpoint
            .as_deref()
            .map(otel::Endpoint::Base));
    let exporter = match otlp.map(|e| otel::start(e, &spec.tracing.service_name)) {
        None => None,
        Some(Ok(x)) => {
            tracing::info!(url = x.url(), "exporting spans over OTLP");
            Some(x)
        }
        Some(Err(e)) => {
            tracing::error!("{e:#}");
            eprintln!("strait: {e:#}");
            return ExitCode::from(2);
        }
    };

    let admin_addr = cli
        .admin_addr
        .map_or_else(|| spec.admin.address.clone(), |a| a.to_string());
    let (bound, admin_sock) = match bind_all(&spec, &admin_addr).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("strait: {e}");
            return ExitCode::from(EXIT_BIND);
        }
    };

    let mut servers = tokio::task::JoinSet::new();
    for (l, sock) in spec.listeners.iter().zip(bound) {
        let local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let cx = ListenerContext::new(l.name.as_str().into(), handle.clone(), spec.limits.clone());
        let (protocol, handle, stopped) = (l.protocol, handle.clone(), stopped.clone());
        let serving = serve_on(workers.as_ref(), sock, &l.name, move |sock| {
            // Bound now, so clients queue in the backlog rather than being refused; served
            // once a table is in force (in Kubernetes mode, after every watch has listed).
            let (cx, table, stop, first_stop) = (cx.clone(), handle.clone(), stopped(), stopped());
            async move {
                let first = tokio::select! {
                    () = table.first_published() => true,
                    () = first_stop => false,
                };
                if first {
                    serve_protocol(protocol, sock, cx, stop).await;
                }
            }
        });
        // Logged once the workers' sockets are bound: tests and scripts connect on this line.
        tracing::info!(listener = %l.name, address = %local, protocol = ?l.protocol, "listening");
        servers.spawn(serving);
    }
    let admin = Arc::new(Admin::new(handle.clone(), prometheus.clone()));
    let admin_local = admin_sock
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(address = %admin_local, "admin listening");
    // The admin listener stays up through the drain so probes see /ready turn 503; it ends
    // with the process.
    tokio::spawn(serve_admin(
        admin_sock,
        Arc::clone(&admin),
        std::future::pending(),
    ));
    if let Some(p) = prometheus {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                p.run_upkeep();
            }
        });
    }
    wait_for_stop_signal().await;
    admin.start_draining();
    let drain = handle
        .current()
        .map_or(spec.limits.drain_timeout, |t| t.spec.limits.drain_timeout);
    tracing::info!(timeout = ?drain, "draining: refusing new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(drain, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?drain, "drain timeout reached; closing remaining connections");
    } else {
        tracing::info!("drained; exiting");
    }
    // Both bounded, and run together: the Kubernetes source releases its Lease as it stops
    // (it started stopping with the drain), and queued spans are sent.
    let release = async {
        if let Some(task) = source {
            if tokio::time::timeout(LEASE_RELEASE_WAIT, task)
                .await
                .is_err()
            {
                tracing::warn!("the Kubernetes source did not stop in time; exiting anyway");
            }
        }
    };
    let flush = async {
        if let Some(x) = exporter {
            x.shutdown().await;
        }
    };
    tokio::join!(release, flush);
    ExitCode::SUCCESS
}

/// Binds and serves the listeners a table adds beyond the `fixed` ones bound at startup,
/// and stops those a later table drops (their open connections finish on their own).
async fn follow_listeners(
    handle: TableHandle,
    fixed: std::collections::HashSet<String>,
    limits: strait_proxy::table::spec::LimitsSpec,
    mut stop: watch::Receiver<bool>,
    workers: Option<WorkerHandles>,
) {
    let mut tables = handle.subscribe();
    let mut running: std::collections::HashMap<String, (String, watch::Sender<bool>)> =
        std::collections::HashMap::new();
    // The table in force first, then every new one: a table published before this task
    // subscribed is not missed.
    tables.mark_changed();
    // Listeners of the table in force whose address could not be bound: tried again after
    // BIND_RETRY, not only with the next table (a port another Service gave up may still be
    // held for a moment by its closing listener).
    let mut unbound = std::collections::HashSet::new();
    loop {
        tokio::select! {
            r = tables.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(BIND_RETRY), if !unbound.is_empty() => {}
        }
        let Some(table) = handle.current() else {
            continue;
        };
        // Only listeners this table still wants are retried.
        unbound.retain(|name: &String| table.spec.listeners.iter().any(|l| &l.name == name));
        let wanted: Vec<_> = table
            .spec
            .listeners
            .iter()
            .filter(|l| !fixed.contains(&l.name))
            .collect();
        running.retain(|name, (address, tx)| {
            let keep = wanted
                .iter()
                .any(|l| &l.name == name && &l.address == address);
            if !keep {
                tracing::info!(listener = %name, "listener removed; no longer accepting");
                let _ = tx.send(true);
            }
            keep
        });
        for l in wanted {
            if running.contains_key(&l.name) {
                continue;
            }
            let sock = match bind(&l.address).await {
                Ok(s) => s,
                Err(e) => {
                    // Retried shortly; the rest keeps serving. Logged as an error once.
                    if unbound.insert(l.name.clone()) {
                        tracing::error!(listener = %l.name, "{e}");
                    }
                    continue;
                }
            };
            unbound.remove(&l.name);
            let local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let (tx, own) = watch::channel(false);
            let global = stop.clone();
            let cx = ListenerContext::new(l.name.as_str().into(), handle.clone(), limits.clone());
            let protocol = l.protocol;
            let serving = serve_on(workers.as_ref(), sock, &l.name, move |sock| {
                let (mut own, mut global) = (own.clone(), global.clone());
                let shutdown = async move {
                    tokio::select! {
                        _ = own.wait_for(|s| *s) => {}
                        _ = global.wait_for(|s| *s) => {}
                    }
                };
                serve_protocol(protocol, sock, cx.clone(), shutdown)
            });
            tracing::info!(listener = %l.name, address = %local, protocol = ?l.protocol, "listening");
            tokio::spawn(serving);
            running.insert(l.name.clone(), (l.address.clone(), tx));
        }
    }
}

/// Serves a listener of `protocol` on `sock` until `shutdown` resolves.
async fn serve_protocol(
    protocol: ListenerProtocol,
    sock: TcpListener,
    cx: ListenerContext,
    shutdown: impl Future<Output = ()>,
) {
    match protocol {
        ListenerProtocol::Http | ListenerProtocol::Https => serve(sock, cx, shutdown).await,
        ListenerProtocol::Tcp => serve_tcp(sock, cx, shutdown).await,
    }
}

/// The task that serves a bound listener with `serve(socket)`: on every worker, each on a
/// socket of its own bound to the same address (the kernel hands each new connection to one
/// of them), or, with no workers, on this runtime. Resolves once every worker has stopped.
fn serve_on<F, Fut>(
    workers: Option<&WorkerHandles>,
    sock: TcpListener,
    name: &str,
    mut serve: F,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    F: FnMut(TcpListener) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(workers) = workers else {
        return Box::pin(serve(sock));
    };
    let addr = match sock.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(listener = name, error = %e, "cannot hand the listener to the workers");
            return Box::pin(std::future::ready(()));
        }
    };
    // Bound without SO_REUSEPORT, this socket showed that nothing else holds the address;
    // the workers' own sockets take its place (a port 0 stays the port it was given).
    drop(sock);
    Box::pin(workers.spawn_each(|i| {
        // In worker i's context: the socket is registered with its runtime.
        match bind_for_worker(addr) {
            Ok(own) => Box::pin(serve(own)) as Pin<Box<dyn Future<Output = ()> + Send>>,
            Err(e) => {
                tracing::error!(listener = name, worker = i, %addr, error = %e, "worker cannot listen");
                Box::pin(std::future::ready(()))
            }
        }
    }))
}

/// Binds every listener (in configuration order) and the admin address before anything
/// serves, so a bind failure leaves nothing half-up.
async fn bind_all(
    spec: &strait_proxy::table::spec::Spec,
    admin_addr: &str,
) -> Result<(Vec<tokio::net::TcpListener>, tokio::net::TcpListener), BindError> {
    let mut bound = Vec::with_capacity(spec.listeners.len());
    for l in &spec.listeners {
        bound.push(bind(&l.address).await?);
    }
    Ok((bound, bind(admin_addr).await?))
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        () = recv(&mut term) => tracing::info!("SIGTERM received"),
        () = recv(&mut int) => tracing::info!("SIGINT received"),
    }
}
