//! `strait sidecar`: the command line of the sidecar preset. The configuration itself is
//! built by `strait_control::sidecar`, so that it is the same one `--print-config` shows.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use strait_control::sidecar::{self, SidecarOptions, INBOUND_ADDR, OUTBOUND_ADDR};
use strait_control::source::file;
use strait_proxy::table::spec::{Spec, UpstreamProtocol};

/// Run next to one application in its pod: inbound requests to the application on
/// 127.0.0.1, outbound requests to Services by name (Host: svc, svc.ns or
/// svc.ns.svc.cluster.local) with per-request balancing, retries and outlier detection.
/// The general flags (--admin-addr, --log-format, ...) may come before or after
/// `sidecar`.
#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// The application's port on 127.0.0.1; every inbound request goes there.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    app_port: u16,

    /// What the application speaks: http1, or h2c (HTTP/2 without TLS, as gRPC servers do).
    #[arg(long, value_enum, default_value_t = AppProtocol::Http1)]
    app_protocol: AppProtocol,

    /// Where inbound requests arrive; the pod's Service targets this port.
    #[arg(long, value_name = "IP:PORT", default_value = INBOUND_ADDR)]
    inbound_addr: SocketAddr,

    /// Where the application sends requests for other Services, with the Service's name as
    /// Host.
    #[arg(long, value_name = "IP:PORT", default_value = OUTBOUND_ADDR)]
    outbound_addr: SocketAddr,

    /// Inbound requests per second let through to the application (the same number at
    /// once after a quiet spell); more get 429. No limit unless set.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit: Option<u32>,

    /// Namespace whose Services are reachable outbound; repeat for several [default: all].
    #[arg(long = "watch-namespace", value_name = "NAMESPACE")]
    watch_namespaces: Vec<String>,

    /// The cluster's DNS domain, for svc.ns.svc.<domain> names.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,

    /// Print the equivalent configuration file and exit; `strait --config FILE` runs the
    /// same sidecar.
    #[arg(long)]
    print_config: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AppProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge, no TLS (gRPC).
    H2c,
}

/// What `strait sidecar` does before anything runs: `Err` is the exit code when it is
/// done already (printed the configuration, or refused the command line).
pub fn preset(
    args: &SidecarArgs,
    admin_addr: Option<SocketAddr>,
    config: Option<&PathBuf>,
) -> Result<file::Loaded, ExitCode> {
    if let Some(path) = config {
        eprintln!(
            "strait: `strait sidecar` takes no --config ({}); run `strait sidecar \
             --print-config` to start a file from the preset, then `strait --config FILE`",
            path.display()
        );
        return Err(ExitCode::from(2));
    }
    let mut o = SidecarOptions::new(args.app_port);
    o.app_protocol = match args.app_protocol {
        AppProtocol::Http1 => UpstreamProtocol::Http1,
        AppProtocol::H2c => UpstreamProtocol::H2c,
    };
    o.inbound_addr = args.inbound_addr;
    o.outbound_addr = args.outbound_addr;
    o.rate_limit = args.rate_limit;
    o.watch_namespaces.clone_from(&args.watch_namespaces);
    o.cluster_domain.clone_from(&args.cluster_domain);
    if let Some(a) = admin_addr {
        o.admin_addr = a;
    }
    let spec = sidecar::spec(&o);
    if args.print_config {
        return Err(print(args, &spec));
    }
    Ok(file::Loaded {
        spec,
        text: String::new(),
        path: PathBuf::from("(strait sidecar)"),
    })
}

fn print(args: &SidecarArgs, spec: &Spec) -> ExitCode {
    match sidecar::to_yaml(spec) {
        Ok(yaml) => {
            println!(
                "# What `strait sidecar --app-port {}` runs; `strait --config FILE` runs the same.\n\
                 # See docs/sidecar.md.\n{yaml}",
                args.app_port
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strait: {e}");
            ExitCode::FAILURE
        }
    }
}
