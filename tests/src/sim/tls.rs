//! The test cluster's CA and the simulator's serving certificate (rcgen),
//! and the rustls server configuration (ALPN h2 and http/1.1).

use std::{net::IpAddr, sync::Arc};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The DNS names a real API server's certificate carries.
pub const SERVICE_NAMES: &[&str] = &[
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
];

/// The cluster CA and a serving certificate signed by it.
pub struct ClusterTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

/// A self-signed cluster CA named `common_name`: its PEM, key and
/// parameters (to sign with). The simulator's and the real test server's.
pub fn cluster_ca(common_name: &str) -> anyhow::Result<(String, KeyPair, CertificateParams)> {
    let key = KeyPair::generate().context("generating a cluster CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key, params))
}

impl ClusterTls {
    /// A fresh CA and a serving certificate for 127.0.0.1, ::1, `extra_ips`,
    /// the `kubernetes.default…` names and `extra_names`.
    pub fn generate(extra_ips: &[IpAddr], extra_names: &[String]) -> anyhow::Result<Self> {
        let (ca_pem, ca_key, ca_params) = cluster_ca("kube-sim cluster CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut names: Vec<String> = vec!["127.0.0.1".into(), "::1".into()];
        names.extend(extra_ips.iter().map(IpAddr::to_string));
        names.extend(SERVICE_NAMES.iter().map(|s| s.to_string()));
        names.extend(extra_names.iter().cloned());
        names.dedup();
        let mut params =
            CertificateParams::new(names).context("building the serving certificate's names")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kube-apiserver");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let cert_pem = cert.pem();

        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .context("loading the serving certificate into rustls")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem,
            cert_pem,
            server_config: Arc::new(config),
        })
    }
}
