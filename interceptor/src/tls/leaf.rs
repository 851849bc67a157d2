//! Leaf certificates for the API-server names, issued on demand.
//!
//! An agent reaches the API server as `kubernetes.default.svc` (SNI), or as
//! the ClusterIP or an endpoint IP (no SNI at all: kubectl sends none when
//! the server is an IP address). So each certificate carries the standard
//! API-server names, the configured IPs, the original destination of the
//! connection, and the SNI asked for. Certificates are cached per
//! `(SNI, original destination)`, live for a short time (24 h by default),
//! and are renewed once less than a third of their lifetime remains.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache},
    sign::CertifiedKey,
};

use super::{
    TlsError,
    ca::{LeafRequest, LocalCa},
    crypto_provider,
};

/// The ALPN protocols chaperone offers agents, preferred first.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A source of the current time; tests inject their own.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// What leaf certificates contain and how long they live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafConfig {
    /// The cluster's DNS domain, for `kubernetes.default.svc.<domain>`.
    pub cluster_domain: String,
    /// Addresses every leaf carries (the `kubernetes` ClusterIP, endpoint IPs).
    pub ips: Vec<IpAddr>,
    /// Names every leaf carries besides the standard API-server names.
    pub extra_names: Vec<String>,
    /// How long a leaf is valid.
    pub lifetime: Duration,
    /// How many distinct leaves to keep; beyond that the ones closest to
    /// expiry are dropped (SNI is chosen by the client).
    pub max_cached: usize,
}

impl Default for LeafConfig {
    fn default() -> Self {
        LeafConfig {
            cluster_domain: "cluster.local".into(),
            ips: Vec::new(),
            extra_names: Vec::new(),
            lifetime: Duration::from_secs(24 * 3600),
            max_cached: 1024,
        }
    }
}

impl LeafConfig {
    /// The names of the API server inside a cluster.
    pub fn standard_names(&self) -> Vec<String> {
        let mut names = vec![
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ];
        let domain = self.cluster_domain.trim_matches('.');
        if !domain.is_empty() {
            names.push(format!("kubernetes.default.svc.{domain}"));
        }
        names
    }
}

/// One issued leaf, ready to serve.
pub struct Leaf {
    pub certified: Arc<CertifiedKey>,
    /// A server configuration that presents this leaf with ALPN h2 and
    /// http/1.1.
    pub server_config: Arc<ServerConfig>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Leaf {
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LeafKey {
    sni: Option<String>,
    orig_dst: IpAddr,
}

/// Issues, caches and renews leaf certificates signed by the chaperone CA.
pub struct LeafCache {
    ca: Arc<LocalCa>,
    config: LeafConfig,
    clock: Clock,
    sessions: Arc<ServerSessionMemoryCache>,
    entries: Mutex<HashMap<LeafKey, Arc<Leaf>>>,
}

// === impl LeafCache ===

impl LeafCache {
    pub fn new(ca: Arc<LocalCa>, config: LeafConfig) -> Self {
        Self::with_clock(ca, config, Arc::new(SystemTime::now))
    }

    pub fn with_clock(ca: Arc<LocalCa>, config: LeafConfig, clock: Clock) -> Self {
        LeafCache {
            ca,
            config,
            clock,
            sessions: ServerSessionMemoryCache::new(4096),
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &LeafConfig {
        &self.config
    }

    pub fn ca(&self) -> &Arc<LocalCa> {
        &self.ca
    }

    /// The leaf for a connection that asked for `sni` (if any) and was
    /// originally destined to `orig_dst`: cached while fresh, issued
    /// otherwise.
    pub fn get(&self, sni: Option<&str>, orig_dst: IpAddr) -> Result<Arc<Leaf>, TlsError> {
        let key = LeafKey {
            sni: sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()),
            orig_dst: canonical_ip(orig_dst),
        };
        let now = (self.clock)();
        if let Some(leaf) = self.lock().get(&key)
            && self.fresh(leaf, now)
        {
            return Ok(leaf.clone());
        }
        // Issue outside the lock: other handshakes keep going meanwhile.
        let leaf = Arc::new(self.issue(&key, now)?);
        let mut entries = self.lock();
        if entries.len() >= self.config.max_cached && !entries.contains_key(&key) {
            entries.retain(|_, leaf| self.fresh(leaf, now));
            while entries.len() >= self.config.max_cached.max(1) {
                let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, leaf)| leaf.not_after)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                entries.remove(&oldest);
            }
        }
        entries.insert(key, leaf.clone());
        Ok(leaf)
    }

    /// How many leaves are cached.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeafKey, Arc<Leaf>>> {
        // The map is only ever left consistent; a panic elsewhere does not
        // poison its contents.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fresh: valid now, with at least a third of its lifetime left.
    fn fresh(&self, leaf: &Leaf, now: SystemTime) -> bool {
        let lifetime = leaf
            .not_after
            .duration_since(leaf.not_before)
            .unwrap_or_default();
        let renew_at = leaf.not_after - lifetime / 3;
        now >= leaf.not_before && now < renew_at
    }

    fn issue(&self, key: &LeafKey, now: SystemTime) -> Result<Leaf, TlsError> {
        let mut dns_names = self.config.standard_names();
        for name in self.config.extra_names.iter().chain(key.sni.as_ref()) {
            if !dns_names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                dns_names.push(name.clone());
            }
        }
        let mut ips = self.config.ips.clone();
        if !ips.contains(&key.orig_dst) {
            ips.push(key.orig_dst);
        }
        // Back-date a little for agents whose clocks are behind ours, but
        // never more than the renewal margin.
        let skew = (self.config.lifetime / 3).min(Duration::from_secs(300));
        let not_before = now - skew;
        let not_after = now + self.config.lifetime;
        let issued = self.ca.issue(&LeafRequest {
            common_name: key.sni.clone().unwrap_or_else(|| "kubernetes".into()),
            dns_names,
            ips,
            not_before: Some(not_before),
            not_after: Some(not_after),
        })?;
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(issued.key_der))?;
        let certified = Arc::new(CertifiedKey::new(vec![issued.cert_der], signing_key));
        let mut server_config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedCert(certified.clone())));
        server_config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
        server_config.session_storage = self.sessions.clone();
        tracing::debug!(sni = ?key.sni, orig_dst = %key.orig_dst, "issued leaf certificate");
        Ok(Leaf {
            certified,
            server_config: Arc::new(server_config),
            not_before,
            not_after,
        })
    }
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache")
            .field("config", &self.config)
            .field("cached", &self.len())
            .finish_non_exhaustive()
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.96.0.1`, what a dual-stack
/// listener reports) is the IPv4 address the agent dialed.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        sync::atomic::{AtomicU64, Ordering},
    };

    use x509_parser::extensions::GeneralName;

    use super::*;

    fn ca() -> Arc<LocalCa> {
        let dir = tempfile::tempdir().unwrap();
        Arc::new(LocalCa::load_or_create(dir.path()).unwrap())
    }

    /// (DNS names, IPs) of a certificate.
    fn sans(der: &[u8]) -> (Vec<String>, Vec<IpAddr>) {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let mut names = Vec::new();
        let mut ips = Vec::new();
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => names.push(n.to_string()),
                GeneralName::IPAddress(b) => ips.push(match b.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
                    _ => panic!("bad IP SAN {b:?}"),
                }),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        (names, ips)
    }

    const CLUSTER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));

    #[test]
    fn a_leaf_for_an_sni_carries_the_api_server_names_the_sni_and_the_ips() {
        let config = LeafConfig {
            cluster_domain: "corp.example".into(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10))],
            ..LeafConfig::default()
        };
        let cache = LeafCache::new(ca(), config);
        let leaf = cache.get(Some("API.Cluster.Example."), CLUSTER_IP).unwrap();
        let (names, ips) = sans(leaf.certificate_der());
        assert_eq!(
            names,
            [
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.corp.example",
                "api.cluster.example",
            ]
        );
        assert_eq!(
            ips,
            [IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)), CLUSTER_IP]
        );
    }

    #[test]
    fn a_leaf_without_sni_carries_the_original_destination() {
        let cache = LeafCache::new(ca(), LeafConfig::default());
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1));
        let leaf = cache.get(None, v6).unwrap();
        let (names, ips) = sans(leaf.certificate_der());
        assert!(names.contains(&"kubernetes.default.svc.cluster.local".to_string()));
        assert_eq!(ips, [v6]);

        // A v4-mapped address is the v4 address the agent dialed.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 96, 0, 1).to_ipv6_mapped());
        let leaf = cache.get(None, mapped).unwrap();
        assert_eq!(sans(leaf.certificate_der()).1, [CLUSTER_IP]);
    }

    #[test]
    fn a_standard_name_as_sni_is_not_repeated() {
        let cache = LeafCache::new(ca(), LeafConfig::default());
        let leaf = cache
            .get(Some("kubernetes.default.svc"), CLUSTER_IP)
            .unwrap();
        let (names, _) = sans(leaf.certificate_der());
        assert_eq!(names.len(), 4, "{names:?}");
    }

    struct FakeClock(AtomicU64);

    impl FakeClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_secs(), Ordering::SeqCst);
        }
        fn clock(self: &Arc<Self>) -> Clock {
            let me = self.clone();
            Arc::new(move || {
                SystemTime::UNIX_EPOCH + Duration::from_secs(me.0.load(Ordering::SeqCst))
            })
        }
    }

    #[test]
    fn leaves_are_cached_per_sni_and_destination_and_renewed_before_expiry() {
        let start = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let clock = Arc::new(FakeClock(AtomicU64::new(start)));
        let config = LeafConfig {
            lifetime: Duration::from_secs(3 * 3600),
            ..LeafConfig::default()
        };
        let cache = LeafCache::with_clock(ca(), config, clock.clock());

        let first = cache.get(None, CLUSTER_IP).unwrap();
        assert!(Arc::ptr_eq(&first, &cache.get(None, CLUSTER_IP).unwrap()));
        let other_ip = cache
            .get(None, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &other_ip));
        let with_sni = cache.get(Some("kubernetes.default"), CLUSTER_IP).unwrap();
        assert!(!Arc::ptr_eq(&first, &with_sni));
        assert_eq!(cache.len(), 3);
        assert_eq!(
            first
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap(),
            Duration::from_secs(start + 3 * 3600)
        );

        // Still more than a third of the lifetime left: the same leaf.
        clock.advance(Duration::from_secs(3600 + 1800));
        assert!(Arc::ptr_eq(&first, &cache.get(None, CLUSTER_IP).unwrap()));
        // Less than a third left: renewed, with a new expiry.
        clock.advance(Duration::from_secs(1800 + 1));
        let renewed = cache.get(None, CLUSTER_IP).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert!(renewed.not_after > first.not_after);
        assert_ne!(renewed.certificate_der(), first.certificate_der());
        assert!(Arc::ptr_eq(&renewed, &cache.get(None, CLUSTER_IP).unwrap()));
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn the_cache_is_bounded() {
        let config = LeafConfig {
            max_cached: 2,
            ..LeafConfig::default()
        };
        let cache = LeafCache::new(ca(), config);
        for i in 0..5 {
            cache
                .get(Some(&format!("n{i}.example")), CLUSTER_IP)
                .unwrap();
        }
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn leaves_expire_after_their_lifetime() {
        let config = LeafConfig {
            lifetime: Duration::from_secs(600),
            ..LeafConfig::default()
        };
        let cache = LeafCache::new(ca(), config);
        let leaf = cache.get(None, CLUSTER_IP).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.certificate_der()).unwrap();
        let validity = cert.validity();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        // 600 s of lifetime plus at most 200 s of back-dating.
        assert_eq!(span, 800);
        assert!(!cert.is_ca());
    }
}
