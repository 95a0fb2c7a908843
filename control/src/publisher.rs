//! The one writer of the routing table: checks, compiles and publishes configurations.

use std::sync::Arc;

use strait_proxy::health_check::HealthChecker;
use strait_proxy::table::spec::Spec;

use crate::dns::DnsManager;
use strait_proxy::table::{compile, CompileError, Registries, TableHandle};

/// Compiles configurations and swaps them into a [`TableHandle`].
#[derive(Debug)]
pub struct Publisher {
    handle: TableHandle,
    registries: Registries,
    generation: u64,
    /// Listener names and addresses in force; bound sockets cannot change on reload.
    listeners: Option<Vec<(String, String)>>,
    /// The configuration in force and where it came from, rebuilt when DNS answers change.
    current: Option<(Arc<Spec>, String)>,
    dns: DnsManager,
    health: HealthChecker,
}

impl Publisher {
    /// A publisher for this handle. Nothing is published until [`Publisher::publish`].
    pub fn new(handle: TableHandle) -> Self {
        Self {
            handle,
            registries: Registries::default(),
            generation: 0,
            listeners: None,
            current: None,
            dns: DnsManager::default(),
            health: HealthChecker::default(),
        }
    }

    /// Validates, compiles and publishes `spec`. On error the table in force is unchanged.
    pub fn publish(&mut self, spec: Spec, source: &str) -> Result<u64, Vec<CompileError>> {
        // The serve loop (HTTP or TCP) is chosen when a listener starts: its protocol is as
        // fixed as its address.
        let mut listeners: Vec<(String, String)> = spec
            .listeners
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    format!("{} ({:?})", l.address, l.protocol).to_lowercase(),
                )
            })
            .collect();
        listeners.sort();
        if let Some(running) = &self.listeners {
            if *running != listeners {
                return Err(vec![CompileError {
                    path: "listeners".into(),
                    message: format!(
                        "listeners changed (running: {}); restart Strait to apply listener changes \
                         (routes and backends reload live)",
                        describe(running)
                    ),
                }]);
            }
        }
        let spec = Arc::new(spec);
        self.compile_and_swap(spec, source)?;
        self.listeners = Some(listeners);
        Ok(self.generation)
    }

    /// Rebuilds the configuration in force, so that changed DNS answers become endpoints.
    pub fn rebuild(&mut self) -> Result<u64, Vec<CompileError>> {
        let Some((spec, source)) = self.current.clone() else {
            return Ok(self.generation);
        };
        self.compile_and_swap(spec, &source)?;
        Ok(self.generation)
    }

    /// Resolves when a DNS answer changed and [`Publisher::rebuild`] should run.
    pub async fn dns_changed(&mut self) {
        self.dns.changed().await;
    }

    fn compile_and_swap(&mut self, spec: Arc<Spec>, source: &str) -> Result<(), Vec<CompileError>> {
        // A dry run first, so a rejected configuration registers no metrics and touches no
        // live state.
        compile(Arc::clone(&spec), source, self.generation + 1, None)?;
        if let Some(running) = self.handle.current() {
            if running.spec.limits != spec.limits || running.spec.admin != spec.admin {
                tracing::warn!(
                    "limits and admin settings changed; they apply at the next restart \
                     (drain_timeout applies at once)"
                );
            }
        }
        let table = compile(
            Arc::clone(&spec),
            source,
            self.generation + 1,
            Some(&self.registries),
        )?;
        self.generation += 1;
        let live: Vec<_> = table
            .backends
            .iter()
            .filter_map(|b| b.client_key.clone())
            .collect();
        self.handle.publish(table);
        self.registries.endpoints.prune();
        self.registries.rate_limits.prune();
        self.registries.clients.retain_backends(&live);
        self.registries.backends.prune();
        if let Some(table) = self.handle.current() {
            self.health.sync(&table);
        }
        let names = self.registries.names.prune();
        self.dns.sync(&spec.dns, names);
        self.current = Some((spec, source.to_owned()));
        Ok(())
    }
}

fn describe(l: &[(String, String)]) -> String {
    let parts: Vec<String> = l.iter().map(|(n, a)| format!("{n}={a}")).collect();
    parts.join(", ")
}
