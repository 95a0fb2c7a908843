//! STUB (replaced by the annotations branch).
#![allow(missing_docs)]
use std::collections::BTreeMap;
use strait_proxy::table::spec::{BackendSpec, RouteSpec};
#[derive(Debug, Default, Clone)]
pub struct IngressSettings;
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct AnnotationError;
pub fn parse(_a: &BTreeMap<String, String>) -> Result<IngressSettings, Vec<AnnotationError>> {
    Ok(IngressSettings)
}
impl IngressSettings {
    pub fn apply_route(&self, _r: &mut RouteSpec) {}
    pub fn apply_backend(&self, _b: &mut BackendSpec) {}
    pub fn has_backend_settings(&self) -> bool {
        false
    }
}
