//! PLACEHOLDER: replaced by the real-kube branch's module at merge.
use anyhow::Result;
use std::{net::SocketAddr, path::Path, process::Command, time::Duration};
pub struct RealApiServer;
#[allow(unused_variables, clippy::missing_panics_doc)]
impl RealApiServer {
    pub fn binaries_present() -> bool {
        false
    }
    pub fn shared() -> Result<&'static RealApiServer> {
        anyhow::bail!("stub")
    }
    pub fn start() -> Result<RealApiServer> {
        anyhow::bail!("stub")
    }
    pub fn addr(&self) -> SocketAddr {
        unreachable!()
    }
    pub fn url(&self) -> String {
        unreachable!()
    }
    pub fn ca_pem(&self) -> String {
        unreachable!()
    }
    pub fn admin_token(&self) -> String {
        unreachable!()
    }
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        unreachable!()
    }
    pub fn write_person_kubeconfig(
        &self,
        path: &Path,
        username: &str,
        groups: &[&str],
    ) -> Result<()> {
        unreachable!()
    }
    pub fn kubectl(&self) -> Command {
        unreachable!()
    }
    pub fn create(&self, object: serde_json::Value) -> Result<serde_json::Value> {
        unreachable!()
    }
    pub fn install_crds(&self, yaml: &str) -> Result<()> {
        unreachable!()
    }
    pub fn patch_status(
        &self,
        api_path: &str,
        patch: serde_json::Value,
    ) -> Result<serde_json::Value> {
        unreachable!()
    }
    pub fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        bound_pod: Option<(&str, &str)>,
        audiences: Option<&[&str]>,
        ttl: Duration,
    ) -> Result<String> {
        unreachable!()
    }
    pub fn audit_events(&self) -> Result<Vec<serde_json::Value>> {
        unreachable!()
    }
    pub fn version(&self) -> &'static str {
        "v1.20.2"
    }
}
