//! Every address the API server answers on, found by the node itself and
//! kept in step with the redirect's `TARGETS` map. A guarded agent that
//! dials any of them lands on the proxy; one that is missed reaches the API
//! server with nothing in between (issue 24, attack 2).
//!
//! The sources, united:
//! - configured extras (`--target`; by default `KUBERNETES_SERVICE_HOST:PORT`);
//! - the `default/kubernetes` Service: every ClusterIP (`spec.clusterIPs`,
//!   IPv4 and IPv6) on every service port, watched;
//! - the `default/kubernetes` Endpoints (core `v1`, served by every version
//!   from 1.20 on, unlike `discovery.k8s.io/v1` EndpointSlices): every
//!   address, ready or not, on every port, watched;
//! - the EndpointSlices labelled `kubernetes.io/service-name=kubernetes`
//!   in `default` (`discovery.k8s.io/v1`, or `v1beta1` on servers without
//!   v1 such as 1.20, as discovery says): every address of every slice,
//!   ready or not, on every port, watched. kube-apiserver writes the
//!   slice `kubernetes` itself; a dual-stack or hand-made slice may name
//!   addresses the Endpoints do not;
//! - the host of chaperone's own API server URL (in-cluster or kubeconfig),
//!   resolved at start and again every [`RESOLVE_INTERVAL`].
//!
//! A source that cannot be read keeps its last known addresses: a watch
//! that fails (RBAC, the network) never shrinks what is guarded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{
    Api, Client,
    api::DynamicObject,
    runtime::{WatchStreamExt as _, watcher},
};

use crate::redirect::{RedirectError, Redirector};

/// The namespace and name of the Service (and its Endpoints) every cluster
/// has for its API server.
pub const KUBERNETES_NAMESPACE: &str = "default";
pub const KUBERNETES_NAME: &str = "kubernetes";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The API group of EndpointSlices.
pub const ENDPOINT_SLICE_GROUP: &str = "discovery.k8s.io";

/// How long to wait before asking discovery again for EndpointSlices.
const SLICE_DISCOVERY_RETRY: Duration = Duration::from_secs(30);

/// How often the API server's host name is resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);

/// Where the targets go: the eBPF `TARGETS` map in production, a fake in
/// tests.
pub trait TargetSink: Send + Sync {
    /// Replace the targets with exactly `targets`.
    fn set_targets(&self, targets: &[SocketAddr]) -> Result<(), RedirectError>;
}

impl TargetSink for Redirector {
    fn set_targets(&self, targets: &[SocketAddr]) -> Result<(), RedirectError> {
        Redirector::set_targets(self, targets)
    }
}

/// Where a target came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Configured,
    Service,
    Endpoints,
    EndpointSlices,
    ServerHost,
}

#[derive(Default)]
struct Sources {
    configured: BTreeSet<SocketAddr>,
    service: BTreeSet<SocketAddr>,
    endpoints: BTreeSet<SocketAddr>,
    endpoint_slices: BTreeSet<SocketAddr>,
    server_host: BTreeSet<SocketAddr>,
}

impl Sources {
    fn slot(&mut self, source: Source) -> &mut BTreeSet<SocketAddr> {
        match source {
            Source::Configured => &mut self.configured,
            Source::Service => &mut self.service,
            Source::Endpoints => &mut self.endpoints,
            Source::EndpointSlices => &mut self.endpoint_slices,
            Source::ServerHost => &mut self.server_host,
        }
    }

    fn union(&self) -> BTreeSet<SocketAddr> {
        let mut all = BTreeSet::new();
        for set in [
            &self.configured,
            &self.service,
            &self.endpoints,
            &self.endpoint_slices,
            &self.server_host,
        ] {
            all.extend(set.iter().copied().map(canonical));
        }
        all
    }
}

/// Keeps the redirect targets equal to the union of the sources.
pub struct TargetTracker {
    sink: Arc<dyn TargetSink>,
    state: Mutex<(Sources, BTreeSet<SocketAddr>)>,
}

impl TargetTracker {
    /// A tracker that starts with the configured targets (applied at once).
    pub fn new(
        sink: Arc<dyn TargetSink>,
        configured: &[SocketAddr],
    ) -> Result<Self, RedirectError> {
        let tracker = TargetTracker {
            sink,
            state: Mutex::new((Sources::default(), BTreeSet::new())),
        };
        tracker.set(Source::Configured, configured.iter().copied())?;
        Ok(tracker)
    }

    /// Every target now in the map.
    pub fn current(&self) -> Vec<SocketAddr> {
        self.lock().1.iter().copied().collect()
    }

    /// Replaces what `source` contributes and updates the map if the union
    /// changed. On a failed update the previous map stays (it was
    /// `set_targets`' job to leave it whole) and the next change retries.
    pub fn set(
        &self,
        source: Source,
        targets: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<(), RedirectError> {
        let mut state = self.lock();
        *state.0.slot(source) = targets.into_iter().map(canonical).collect();
        let wanted = state.0.union();
        if wanted == state.1 {
            return Ok(());
        }
        let list: Vec<SocketAddr> = wanted.iter().copied().collect();
        self.sink.set_targets(&list)?;
        tracing::info!(?source, targets = ?list, "API-server addresses redirected");
        state.1 = wanted;
        Ok(())
    }

    fn set_logged(&self, source: Source, targets: BTreeSet<SocketAddr>) {
        if let Err(error) = self.set(source, targets) {
            tracing::error!(
                ?source,
                %error,
                "cannot update the redirect targets: an API-server address may not be guarded"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Sources, BTreeSet<SocketAddr>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the `kubernetes` Service, Endpoints and EndpointSlices and
    /// re-resolves `server` (chaperone's own API server URL) until the
    /// watches end.
    pub async fn run(self: Arc<Self>, client: Client, server: http::Uri) {
        let resolver = tokio::spawn({
            let tracker = self.clone();
            async move { tracker.resolve_server_forever(server).await }
        });
        let slices = tokio::spawn({
            let tracker = self.clone();
            let client = client.clone();
            async move { tracker.watch_slices(client).await }
        });
        let services = watcher(
            Api::<Service>::namespaced(client.clone(), KUBERNETES_NAMESPACE),
            watcher::Config::default().fields(&format!("metadata.name={KUBERNETES_NAME}")),
        )
        .default_backoff()
        .map(|event| event.map(|e| map_event(e, |s| service_targets(&s))));
        let endpoints = watcher(
            Api::<Endpoints>::namespaced(client, KUBERNETES_NAMESPACE),
            watcher::Config::default().fields(&format!("metadata.name={KUBERNETES_NAME}")),
        )
        .default_backoff()
        .map(|event| event.map(|e| map_event(e, |e| endpoints_targets(&e))));
        let services = services.map(|event| (Source::Service, event));
        let endpoints = endpoints.map(|event| (Source::Endpoints, event));
        let mut updates = std::pin::pin!(futures::stream::select(services, endpoints));
        // What each watch's initial list held: `None` outside a list.
        let mut listing: [Option<BTreeSet<SocketAddr>>; 2] = [None, None];
        while let Some((source, event)) = updates.next().await {
            let slot = usize::from(source == Source::Endpoints);
            match event {
                Err(error) => tracing::warn!(
                    ?source,
                    %error,
                    "watching default/kubernetes failed; keeping its last known addresses \
                     (does the node agent's Role allow get/list/watch on services and endpoints \
                     in `default`?)"
                ),
                Ok(watcher::Event::Apply(targets)) => self.set_logged(source, targets),
                Ok(watcher::Event::Delete(_)) => self.set_logged(source, BTreeSet::new()),
                Ok(watcher::Event::Init) => listing[slot] = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(targets)) => {
                    listing[slot]
                        .get_or_insert_with(BTreeSet::new)
                        .extend(targets);
                }
                Ok(watcher::Event::InitDone) => {
                    let targets = listing[slot].take().unwrap_or_default();
                    self.set_logged(source, targets);
                }
            }
        }
        resolver.abort();
        slices.abort();
        tracing::error!(
            "the watches of default/kubernetes ended: new API-server addresses are not redirected"
        );
    }

    /// Watches every EndpointSlice of the `kubernetes` Service, at the
    /// version discovery recommends (`v1`, else `v1beta1`). A server that
    /// serves none is asked again every [`SLICE_DISCOVERY_RETRY`].
    async fn watch_slices(&self, client: Client) {
        let mut told = false;
        let resource = loop {
            let why = match kube::discovery::group(&client, ENDPOINT_SLICE_GROUP).await {
                Ok(group) => match group.recommended_kind("EndpointSlice") {
                    Some((resource, _)) => break resource,
                    None => "the API server serves no EndpointSlices".to_owned(),
                },
                Err(error) => format!("cannot discover EndpointSlices (discovery.k8s.io): {error}"),
            };
            // Said once; the Endpoints still give every address meanwhile.
            if !told {
                tracing::info!(
                    "{why}; the Endpoints are watched, and discovery is asked again every {} s",
                    SLICE_DISCOVERY_RETRY.as_secs()
                );
                told = true;
            } else {
                tracing::debug!("{why}");
            }
            tokio::time::sleep(SLICE_DISCOVERY_RETRY).await;
        };
        tracing::debug!(version = %resource.version, "watching the kubernetes EndpointSlices");
        let mut events = std::pin::pin!(
            watcher(
                Api::<DynamicObject>::namespaced_with(client, KUBERNETES_NAMESPACE, &resource),
                watcher::Config::default()
                    .labels(&format!("{SERVICE_NAME_LABEL}={KUBERNETES_NAME}")),
            )
            .default_backoff()
        );
        // Each slice's addresses by name; the source is their union.
        let mut slices: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
        let mut listing: Option<BTreeMap<String, BTreeSet<SocketAddr>>> = None;
        let name = |slice: &DynamicObject| slice.metadata.name.clone().unwrap_or_default();
        let mut throttle = crate::logs::Throttle::default();
        while let Some(event) = events.next().await {
            match event {
                Err(error) => {
                    if let Some(left_out) = throttle.allow() {
                        tracing::warn!(
                            left_out,
                            "{}; keeping their last known addresses",
                            crate::logs::watch_error(
                                &error,
                                "the kubernetes EndpointSlices (endpointslices.discovery.k8s.io)"
                            )
                        );
                    }
                    continue;
                }
                Ok(watcher::Event::Apply(slice)) => {
                    slices.insert(name(&slice), endpoint_slice_targets(&slice.data));
                }
                Ok(watcher::Event::Delete(slice)) => {
                    slices.remove(&name(&slice));
                }
                Ok(watcher::Event::Init) => {
                    listing = Some(BTreeMap::new());
                    continue;
                }
                Ok(watcher::Event::InitApply(slice)) => {
                    listing
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name(&slice), endpoint_slice_targets(&slice.data));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    throttle.reset();
                    slices = listing.take().unwrap_or_default();
                }
            }
            let union = slices.values().flatten().copied().collect();
            self.set_logged(Source::EndpointSlices, union);
        }
    }

    async fn resolve_server_forever(&self, server: http::Uri) {
        let Some((host, port)) = host_port(&server) else {
            tracing::warn!(%server, "the API server URL has no host");
            return;
        };
        let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match resolve(&host, port).await {
                Ok(addrs) if !addrs.is_empty() => self.set_logged(Source::ServerHost, addrs),
                Ok(_) => tracing::warn!(%host, "the API server's host resolved to nothing"),
                Err(error) => tracing::warn!(
                    %host,
                    %error,
                    "cannot resolve the API server's host; keeping its last addresses"
                ),
            }
        }
    }
}

/// A watch event with its object replaced by what `f` makes of it.
fn map_event<K, T>(event: watcher::Event<K>, f: impl Fn(K) -> T) -> watcher::Event<T> {
    match event {
        watcher::Event::Apply(k) => watcher::Event::Apply(f(k)),
        watcher::Event::Delete(k) => watcher::Event::Delete(f(k)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(k) => watcher::Event::InitApply(f(k)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Every ClusterIP of the Service on every service port.
pub fn service_targets(service: &Service) -> BTreeSet<SocketAddr> {
    let Some(spec) = &service.spec else {
        return BTreeSet::new();
    };
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if let Some(ip) = &spec.cluster_ip {
        ips.push(ip);
    }
    let ports: Vec<u16> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect();
    cross(ips, &ports)
}

/// Every address of the Endpoints, ready or not, on every port of its subset.
pub fn endpoints_targets(endpoints: &Endpoints) -> BTreeSet<SocketAddr> {
    let mut all = BTreeSet::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports: Vec<u16> = subset
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| u16::try_from(p.port).ok())
            .collect();
        let ips = subset
            .addresses
            .iter()
            .flatten()
            .chain(subset.not_ready_addresses.iter().flatten())
            .map(|a| a.ip.as_str());
        all.extend(cross(ips, &ports));
    }
    all
}

/// Every address of an EndpointSlice (`v1` or `v1beta1`: the fields read
/// here are the same), ready or not, on every TCP port.
pub fn endpoint_slice_targets(slice: &serde_json::Value) -> BTreeSet<SocketAddr> {
    let ports: Vec<u16> = slice["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"].as_str().is_none_or(|p| p == "TCP"))
        .filter_map(|p| p["port"].as_u64())
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    let ips = slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
        .filter_map(serde_json::Value::as_str);
    cross(ips, &ports)
}

fn cross<'a>(ips: impl IntoIterator<Item = &'a str>, ports: &[u16]) -> BTreeSet<SocketAddr> {
    let mut all = BTreeSet::new();
    for ip in ips {
        // "None" (a headless service) and garbage are not addresses.
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        for port in ports {
            all.insert(canonical(SocketAddr::new(ip, *port)));
        }
    }
    all
}

/// The host and port of an `https://` URL (IPv6 brackets removed).
pub fn host_port(server: &http::Uri) -> Option<(String, u16)> {
    let host = server.host()?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = server.port_u16().unwrap_or(match server.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    Some((host, port))
}

async fn resolve(host: &str, port: u16) -> std::io::Result<BTreeSet<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok([SocketAddr::new(ip, port)].into());
    }
    Ok(tokio::net::lookup_host((host, port))
        .await?
        .map(canonical)
        .collect())
}

/// IPv4-mapped IPv6 is the IPv4 address it maps (the map stores one key).
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => SocketAddr::new(IpAddr::V6(v6), addr.port()),
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeSink(Mutex<Vec<Vec<SocketAddr>>>);

    impl TargetSink for FakeSink {
        fn set_targets(&self, targets: &[SocketAddr]) -> Result<(), RedirectError> {
            self.0.lock().unwrap().push(targets.to_vec());
            Ok(())
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_service_gives_every_cluster_ip_on_every_port() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.1",
                "clusterIPs": ["10.96.0.1", "fd00:10:96::1"],
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
            },
        }))
        .unwrap();
        assert_eq!(
            service_targets(&service),
            [addr("10.96.0.1:443"), addr("[fd00:10:96::1]:443")].into()
        );
    }

    #[test]
    fn the_endpoints_give_every_address_on_every_port() {
        let endpoints: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "subsets": [
                {
                    "addresses": [{"ip": "192.168.1.10"}, {"ip": "192.168.1.11"}],
                    "notReadyAddresses": [{"ip": "192.168.1.12"}],
                    "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
                },
                {
                    "addresses": [{"ip": "fd00::10"}],
                    "ports": [{"name": "https", "port": 6443}],
                },
            ],
        }))
        .unwrap();
        assert_eq!(
            endpoints_targets(&endpoints),
            [
                addr("192.168.1.10:6443"),
                addr("192.168.1.11:6443"),
                addr("192.168.1.12:6443"),
                addr("[fd00::10]:6443"),
            ]
            .into()
        );
    }

    #[test]
    fn an_endpoint_slice_gives_every_address_on_every_tcp_port() {
        // As kube-apiserver v1.20.2 writes it (discovery.k8s.io/v1beta1),
        // plus a not-ready IPv6 endpoint and a UDP port.
        let slice = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["192.0.2.77"], "conditions": {"ready": true}},
                {"addresses": ["fd00::77"], "conditions": {"ready": false}},
            ],
            "ports": [
                {"name": "https", "port": 26443, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        });
        assert_eq!(
            endpoint_slice_targets(&slice),
            [addr("192.0.2.77:26443"), addr("[fd00::77]:26443")].into()
        );
        // A slice with no ports (nothing ready yet) or no endpoints names nothing.
        assert!(endpoint_slice_targets(&serde_json::json!({"endpoints": null})).is_empty());
    }

    #[test]
    fn the_map_is_the_union_and_follows_each_source() {
        let sink = Arc::new(FakeSink::default());
        let tracker = TargetTracker::new(sink.clone(), &[addr("10.96.0.1:443")]).unwrap();
        tracker
            .set(Source::Endpoints, [addr("192.168.1.10:6443")])
            .unwrap();
        tracker
            .set(Source::Service, [addr("10.96.0.1:443")])
            .unwrap();
        assert_eq!(
            tracker.current(),
            [addr("10.96.0.1:443"), addr("192.168.1.10:6443")]
        );
        // The endpoint moves: the old address is no longer a target.
        tracker
            .set(Source::Endpoints, [addr("192.168.1.20:6443")])
            .unwrap();
        assert_eq!(
            tracker.current(),
            [addr("10.96.0.1:443"), addr("192.168.1.20:6443")]
        );
        // Unchanged unions do not touch the map.
        let updates = sink.0.lock().unwrap().len();
        tracker
            .set(Source::ServerHost, [addr("[::ffff:10.96.0.1]:443")])
            .unwrap();
        assert_eq!(sink.0.lock().unwrap().len(), updates);
    }

    #[test]
    fn server_urls_give_host_and_port() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(
            host_port(&uri("https://[fd00::1]:6443")),
            Some(("fd00::1".into(), 6443))
        );
        assert_eq!(
            host_port(&uri("https://api.example.com")),
            Some(("api.example.com".into(), 443))
        );
    }
}
