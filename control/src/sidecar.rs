//! The sidecar preset (`strait sidecar`): the configuration a proxy next to one application
//! needs, built from a handful of settings.
//!
//! It is an ordinary [`Spec`], so everything the preset does can be printed as YAML
//! ([`to_yaml`]), checked with `strait validate` and tuned by hand from there: the preset
//! adds no behaviour of its own.
//!
//! - **Inbound**: one listener that forwards every request to the application on the
//!   loopback, optionally rate limited. The pod's Service targets this port.
//! - **Outbound**: the Kubernetes source's Service-name listener on the loopback, with
//!   retries, a retry budget and outlier detection on every Service, and no Ingress
//!   handling (only Services and EndpointSlices are watched).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strait_proxy::table::spec::{
    AdminSpec, BackendSpec, CircuitBreakerSpec, EndpointSpec, KubernetesSpec, ListenerProtocol,
    ListenerSpec, MatchSpec, OutlierSpec, RateLimitSpec, RetryBudgetSpec, RetrySpec, RouteSpec,
    ServiceDefaultsSpec, Spec, UpstreamProtocol,
};

/// Default inbound address: every interface, so the pod's Service can reach it.
pub const INBOUND_ADDR: &str = "0.0.0.0:15006";
/// Default outbound address: the loopback only, so only the pod's own containers use it.
pub const OUTBOUND_ADDR: &str = "127.0.0.1:15001";
/// Name of the inbound listener.
pub const INBOUND_LISTENER: &str = "sidecar-inbound";
/// Name of the application's backend.
pub const APP_BACKEND: &str = "app";

/// What a sidecar is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarOptions {
    /// The application's port on 127.0.0.1.
    pub app_port: u16,
    /// What the application speaks: `http1`, or `h2c` for gRPC.
    pub app_protocol: UpstreamProtocol,
    /// Where inbound requests arrive.
    pub inbound_addr: SocketAddr,
    /// Where the application sends outbound requests, routed by Service name.
    pub outbound_addr: SocketAddr,
    /// Inbound requests per second let through to the application; none: no limit.
    pub rate_limit: Option<u32>,
    /// The admin listener.
    pub admin_addr: SocketAddr,
    /// Namespaces whose Services are reachable outbound; empty: all.
    pub watch_namespaces: Vec<String>,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
}

impl SidecarOptions {
    /// Every setting at its default, for an application on `app_port`.
    pub fn new(app_port: u16) -> Self {
        Self {
            app_port,
            app_protocol: UpstreamProtocol::Http1,
            inbound_addr: INBOUND_ADDR.parse().expect("a valid default address"),
            outbound_addr: OUTBOUND_ADDR.parse().expect("a valid default address"),
            rate_limit: None,
            admin_addr: AdminSpec::default()
                .address
                .parse()
                .expect("a valid default address"),
            watch_namespaces: Vec::new(),
            cluster_domain: KubernetesSpec::default().cluster_domain,
        }
    }
}

/// The retries, circuit breaking and outlier detection every outbound Service gets.
///
/// - Two retries, on another pod, of refused connections (any method: the pod never saw
///   the request) and of 502 and 503 (idempotent methods only): what a pod that is starting
///   or stopping answers. Not 504, which would multiply the load on a slow Service.
/// - A retry budget rather than a fixed count: retries at most 20% of the requests in
///   flight (at least 3), so a Service that fails everything is not sent three times its
///   traffic.
/// - Outlier detection on gateway errors only: a pod answering 500 to a bad request is not
///   ejected for it, a pod that refuses connections or times out is, and up to half the
///   pods may be out at once, since a Service often has only two or three.
pub fn outbound_defaults() -> ServiceDefaultsSpec {
    ServiceDefaultsSpec {
        timeout: None,
        retry: Some(RetrySpec {
            retries: 2,
            statuses: vec![502, 503],
            ..RetrySpec::default()
        }),
        circuit_breaker: Some(CircuitBreakerSpec {
            retry_budget: Some(RetryBudgetSpec::default()),
            ..CircuitBreakerSpec::default()
        }),
        outlier_detection: Some(OutlierSpec {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }),
    }
}

/// The configuration of a sidecar.
pub fn spec(o: &SidecarOptions) -> Spec {
    let mut app = BackendSpec::new(
        APP_BACKEND,
        vec![EndpointSpec::Address(format!("127.0.0.1:{}", o.app_port))],
    );
    app.protocol = o.app_protocol;
    let mut inbound = RouteSpec::forward("inbound", MatchSpec::default(), APP_BACKEND);
    inbound.rate_limit = o.rate_limit.map(|requests| {
        Box::new(RateLimitSpec {
            requests,
            per: Duration::from_secs(1),
            burst: None,
            key: Default::default(),
            response_headers: false,
            max_keys: None,
        })
    });
    let listener = ListenerSpec {
        name: INBOUND_LISTENER.into(),
        address: o.inbound_addr.to_string(),
        protocol: ListenerProtocol::Http,
        tcp: None,
        routes: Arc::default(),
        default_route: Some(inbound),
        routes_from: None,
        tls: None,
    };
    Spec {
        admin: AdminSpec {
            address: o.admin_addr.to_string(),
        },
        listeners: vec![listener],
        backends: vec![Arc::new(app)],
        kubernetes: Some(KubernetesSpec {
            enabled: true,
            ingresses: false,
            service_addr: Some(o.outbound_addr.to_string()),
            watch_namespaces: o.watch_namespaces.clone(),
            cluster_domain: o.cluster_domain.clone(),
            service_defaults: outbound_defaults(),
            ..KubernetesSpec::default()
        }),
        ..Spec::default()
    }
}

/// Why a configuration could not be written out.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the configuration as YAML: {0}")]
pub struct YamlError(#[from] serde_yaml_ng::Error);

/// `spec` as a configuration file, without the fields that are unset.
pub fn to_yaml(spec: &Spec) -> Result<String, YamlError> {
    let mut value = serde_yaml_ng::to_value(spec)?;
    drop_nulls(&mut value);
    Ok(serde_yaml_ng::to_string(&value)?)
}

/// Unset optional fields serialize as `null`; a file written by hand leaves them out.
fn drop_nulls(v: &mut serde_yaml_ng::Value) {
    match v {
        serde_yaml_ng::Value::Mapping(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        serde_yaml_ng::Value::Sequence(s) => s.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_configuration_reads_back_as_the_same_spec() {
        let mut o = SidecarOptions::new(8080);
        o.rate_limit = Some(50);
        o.watch_namespaces = vec!["shop".into()];
        let spec = spec(&o);
        let text = to_yaml(&spec).unwrap();
        assert!(!text.contains("null"), "{text}");
        let back = crate::source::file::parse(std::path::Path::new("sidecar.yaml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, spec);
    }

    #[test]
    fn outbound_defaults_pass_validation() {
        let mut spec = spec(&SidecarOptions::new(1));
        let compiled = strait_proxy::table::compile::compile(Arc::new(spec.clone()), "t", 1, None);
        assert!(compiled.is_ok(), "{:?}", compiled.err());
        // And a bad one is caught at its path.
        let k = spec.kubernetes.as_mut().unwrap();
        k.service_defaults.retry.as_mut().unwrap().retries = 11;
        let errors = strait_proxy::table::compile::compile(Arc::new(spec), "t", 1, None)
            .err()
            .unwrap();
        assert_eq!(errors[0].path, "kubernetes.service_defaults.retry.retries");
    }
}
