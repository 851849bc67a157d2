//! Chaperone: a transparent guard between AI agents and the Kubernetes API
//! server. See ARCHITECTURE.md at the repository root for the map; each module
//! below owns one concern of the data path.
//!
//! `unsafe` is denied everywhere but the two modules that make raw bpf(2)
//! and socket calls (`redirect/bpf_sys.rs`, `redirect/preflight.rs`); a new
//! `unsafe` block anywhere else fails the build.
#![deny(unsafe_code)]

pub mod admin;
pub mod approval;
pub mod audit;
pub mod cli;
pub mod config;
#[cfg(test)]
mod crd_schema;
pub mod exchange;
pub mod exec;
pub mod gate;
pub mod guard;
pub mod identity;
pub mod kstatus;
pub mod kubectl;
pub mod limits;
pub mod logs;
pub mod mask;
pub mod metrics;
pub mod node;
pub mod pods;
pub mod policy;
pub mod protect;
pub mod proxy;
pub mod record;
pub mod redirect;
pub mod removal;
pub mod request;
pub mod status;
pub mod targets;
pub mod tls;
pub mod usage;
pub mod webhook;
