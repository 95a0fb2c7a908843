//! STUB (replaced by the status branch).
#![allow(missing_docs)]
use k8s_openapi::api::networking::v1::IngressLoadBalancerIngress;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch::Receiver;
#[derive(Debug, Clone)]
pub enum PublishSource {
    Service { namespace: String, name: String },
    Addresses(Vec<String>),
    None,
}
#[derive(Debug, Default)]
pub struct Served {
    pub ingresses: Vec<ServedIngress>,
}
#[derive(Debug)]
pub struct ServedIngress {
    pub namespace: String,
    pub name: String,
    pub current: Vec<IngressLoadBalancerIngress>,
}
pub struct StatusWriter;
impl StatusWriter {
    pub fn new(_c: kube::Client, _p: PublishSource) -> Self {
        Self
    }
    pub async fn run(
        self,
        _l: Receiver<bool>,
        _s: Receiver<Arc<Served>>,
        _x: impl Future<Output = ()>,
    ) {
    }
}
