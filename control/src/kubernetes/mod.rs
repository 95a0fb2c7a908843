//! The Kubernetes source: Ingresses and the Services they name, turned into a [`Spec`](strait_proxy::table::spec::Spec).

pub mod annotations;
