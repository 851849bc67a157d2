//! kube-sim: a Kubernetes API-server simulator for chaperone's tests and demo.
//! Faithful where clients look (see shared/fixtures), small elsewhere.

pub mod stream;
