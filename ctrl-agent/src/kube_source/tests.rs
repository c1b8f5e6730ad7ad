//! The Kubernetes source: the translation of kube's types into the model (and on to the
//! snapshot through the shared translation), the stores' handling of watcher events, and the
//! watchers themselves against the kube-apiserver double in `tests/fake_apiserver`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::DynamicObject;
use kube::runtime::watcher::Event;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::model::{self, ModelOptions};
use super::world::{Applied, Kept, Kind, Store, StoredPod, Update, World};
use super::*;
use crate::config::{
    ActionSpec, MtlsModeSpec, OwnerReferenceSpec, ProtocolSpec, WaypointSpec, WorkloadSpec,
};
use mesh_snapshot::view::WorkloadView;

#[path = "../../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;
use fake_apiserver::objects;

fn typed<K: DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("a valid object")
}

fn dynamic(api_version: &str, kind: &str, mut value: Value) -> DynamicObject {
    value["apiVersion"] = api_version.into();
    value["kind"] = kind.into();
    typed(value)
}

/// Lists `objects` into `store` whole: converted from the type they are served as, with no
/// field dropped first.
fn listed<K: Kept>(store: &mut Store<K>, objects: Vec<Value>) {
    store.apply(Event::Init);
    for o in objects {
        let kept = K::kept(typed(o)).expect("a usable object");
        store.apply(Event::InitApply(kept));
    }
    store.apply(Event::InitDone);
}

#[derive(Default)]
struct Cluster {
    namespaces: Vec<Value>,
    pods: Vec<Value>,
    services: Vec<Value>,
    slices: Vec<Value>,
    policies: Vec<Value>,
    peer_authentications: Vec<Value>,
    gateways: Vec<Value>,
    gateway_classes: Vec<Value>,
}

impl Cluster {
    /// Every kind's objects, as the API server serves them.
    fn served(&self) -> [(Kind, &'static str, &'static str, &[Value]); 8] {
        [
            (Kind::Namespaces, "v1", "Namespace", &self.namespaces),
            (Kind::Pods, "v1", "Pod", &self.pods),
            (Kind::Services, "v1", "Service", &self.services),
            (
                Kind::EndpointSlices,
                "discovery.k8s.io/v1",
                "EndpointSlice",
                &self.slices,
            ),
            (
                Kind::AuthorizationPolicies,
                "security.istio.io/v1",
                "AuthorizationPolicy",
                &self.policies,
            ),
            (
                Kind::PeerAuthentications,
                "security.istio.io/v1",
                "PeerAuthentication",
                &self.peer_authentications,
            ),
            (
                Kind::Gateways,
                "gateway.networking.k8s.io/v1",
                "Gateway",
                &self.gateways,
            ),
            (
                Kind::GatewayClasses,
                "gateway.networking.k8s.io/v1",
                "GatewayClass",
                &self.gateway_classes,
            ),
        ]
    }

    /// The world as the watchers store it: each object listed untyped and trimmed to what
    /// the model reads.
    fn world(&self) -> World {
        let mut w = World::default();
        for (kind, api_version, type_name, objects) in self.served() {
            w.apply(Update::Event(kind, Event::Init));
            for o in objects {
                let object = dynamic(api_version, type_name, o.clone());
                w.apply(Update::Event(kind, Event::InitApply(object)));
            }
            w.apply(Update::Event(kind, Event::InitDone));
        }
        w
    }

    /// The world with every object whole, as served.
    fn whole_world(&self) -> World {
        let [namespaces, pods, services, slices, policies, peer_authentications, gateways, gateway_classes] =
            self.served().map(|(_, api_version, type_name, objects)| {
                let with_type = |o: &Value| {
                    let mut o = o.clone();
                    o["apiVersion"] = api_version.into();
                    o["kind"] = type_name.into();
                    o
                };
                objects.iter().map(with_type).collect::<Vec<_>>()
            });
        let mut w = World::default();
        listed(&mut w.namespaces, namespaces);
        listed(&mut w.pods, pods);
        listed(&mut w.services, services);
        listed(&mut w.endpoint_slices, slices);
        listed(&mut w.authorization_policies, policies);
        listed(&mut w.peer_authentications, peer_authentications);
        listed(&mut w.gateways, gateways);
        listed(&mut w.gateway_classes, gateway_classes);
        w
    }

    /// The model of the world as stored, which must be the model of the whole objects: the
    /// store keeps every field the model reads.
    fn model(&self) -> model::Model {
        let stored = model::model(&self.world(), &options());
        let whole = model::model(&self.whole_world(), &options());
        assert_eq!(
            stored.config, whole.config,
            "the model read a trimmed field"
        );
        assert_eq!(
            stored.problems, whole.problems,
            "the model read a trimmed field"
        );
        stored
    }
}

fn options() -> ModelOptions {
    ModelOptions {
        node: "node-1".into(),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
    }
}

fn workload<'a>(config: &'a FileConfig, name: &str) -> Option<&'a WorkloadSpec> {
    config
        .workloads
        .iter()
        .find(|w| w.name == name)
        .map(|w| &**w)
}

/// A waypoint at an address.
fn at(s: &str) -> WaypointSpec {
    WaypointSpec::At(s.parse().expect("address"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn pods_become_workloads_with_uid_addresses_node_account_and_labels() {
    // A status as servers before Kubernetes 1.16 wrote it: one address, no list.
    let mut old_status = objects::pod("shop", "old", "uid-old", "node-2", &["10.0.0.8"], json!({}));
    old_status["status"]
        .as_object_mut()
        .expect("status")
        .remove("podIPs");
    let cluster = Cluster {
        namespaces: vec![objects::namespace("shop", json!({}))],
        pods: vec![
            objects::pod(
                "shop",
                "cart",
                "uid-cart",
                "node-2",
                &["10.0.0.7", "fd00::7"],
                json!({"app": "cart"}),
            ),
            old_status,
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let old = workload(&m.config, "old").expect("old is a workload");
    assert_eq!(old.ips, [ip("10.0.0.8")], "podIP without podIPs");
    let w = workload(&m.config, "cart").expect("cart is a workload");
    assert_eq!(w.uid, "uid-cart");
    assert_eq!(w.namespace, "shop");
    assert_eq!(w.ips, [ip("10.0.0.7"), ip("fd00::7")]);
    assert_eq!(w.node, "node-2");
    assert_eq!(w.service_account, "cart-sa");
    assert_eq!(w.labels.get("app").map(String::as_str), Some("cart"));
    assert_eq!(w.protocol, ProtocolSpec::Tcp, "not enrolled: plain TCP");
}

#[test]
fn a_pod_is_published_under_the_workload_name_istio_derives_from_its_owners() {
    let owned = |name: &str, ip: &str, labels: Value, generate_name: &str, owner: (&str, &str)| {
        let mut pod = objects::pod("shop", name, name, "node-2", &[ip], labels);
        pod["metadata"]["generateName"] = generate_name.into();
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": owner.0, "name": owner.1,
            "uid": format!("owner-{name}"), "controller": true, "blockOwnerDeletion": true,
        }]);
        pod
    };
    let hash = "7d9f8b6c5";
    let mut named_by_hand = owned("static", "10.0.0.4", json!({}), "", ("ReplicaSet", "rs"));
    named_by_hand["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("generateName");
    let cluster = Cluster {
        namespaces: vec![objects::namespace("shop", json!({}))],
        pods: vec![
            owned(
                "cart-7d9f8b6c5-x2x4z",
                "10.0.0.1",
                json!({"app": "cart", "pod-template-hash": hash}),
                "cart-7d9f8b6c5-",
                ("ReplicaSet", "cart-7d9f8b6c5"),
            ),
            owned("db-0", "10.0.0.2", json!({}), "db-", ("StatefulSet", "db")),
            owned(
                "backup-29012345-q7w8e",
                "10.0.0.3",
                json!({}),
                "backup-29012345-",
                ("Job", "backup-29012345"),
            ),
            named_by_hand,
            owned(
                "web-5c6d7e8f9-a1b2c",
                "10.0.0.5",
                json!({"pod-template-hash": "5c6d7e8f9", "service.istio.io/workload-name": "front"}),
                "web-5c6d7e8f9-",
                ("ReplicaSet", "web-5c6d7e8f9"),
            ),
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let snap = crate::translate::routing_only(&m.config, "node-1");
    let mut names: Vec<(&str, &str)> = snap
        .workloads
        .iter()
        // As the data plane reads it: an empty field (the pod's own name, not sent twice) is the name.
        .map(|w| (w.name.as_str(), WorkloadView::from(w).workload_name()))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            ("backup-29012345-q7w8e", "backup"),
            ("cart-7d9f8b6c5-x2x4z", "cart"),
            ("db-0", "db"),
            ("static", "static"),
            ("web-5c6d7e8f9-a1b2c", "front"),
        ],
        "a CronJob's, a Deployment's and a StatefulSet's pods by their owners; a pod named \
         by hand by its name; Istio's workload-name label over the owners"
    );
}

#[test]
fn finished_host_network_unscheduled_and_addressless_pods_elsewhere_are_not_workloads() {
    let mut done = objects::pod("shop", "job", "u1", "node-2", &["10.0.0.1"], json!({}));
    done["status"]["phase"] = "Succeeded".into();
    let mut failed = objects::pod("shop", "crash", "u2", "node-2", &["10.0.0.2"], json!({}));
    failed["status"]["phase"] = "Failed".into();
    let mut host = objects::pod("shop", "host", "u3", "node-2", &["192.0.2.1"], json!({}));
    host["spec"]["hostNetwork"] = true.into();
    let mut unscheduled = objects::pod("shop", "waiting", "u4", "node-2", &[], json!({}));
    unscheduled["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("nodeName");
    let elsewhere = objects::pod("shop", "starting", "u5", "node-2", &[], json!({}));
    // Pending with an address (init containers running) is a workload, as in istiod.
    let mut initialising = objects::pod("shop", "init", "u6", "node-2", &["10.0.0.6"], json!({}));
    initialising["status"]["phase"] = "Pending".into();
    // This node's pod before it has an address: kept for CNI, which reports the address.
    let here = objects::pod("shop", "new", "u7", "node-1", &[], json!({}));
    let cluster = Cluster {
        pods: vec![
            done,
            failed,
            host,
            unscheduled,
            elsewhere,
            initialising,
            here,
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    let names: Vec<&str> = m.config.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["init", "new"]);
    assert!(workload(&m.config, "new").is_some_and(|w| w.ips.is_empty()));
}

#[test]
fn istio_labels_enroll_namespaces_and_pods_and_none_or_a_sidecar_opts_a_pod_out() {
    let mut sidecar_pod =
        objects::pod("shop", "injected", "u5", "node-1", &["10.0.0.5"], json!({}));
    sidecar_pod["metadata"]["annotations"] =
        json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
    let cluster = Cluster {
        namespaces: vec![
            objects::namespace("shop", json!({"istio.io/dataplane-mode": "ambient"})),
            objects::namespace("legacy", json!({})),
        ],
        pods: vec![
            objects::pod("shop", "cart", "u1", "node-1", &["10.0.0.1"], json!({})),
            objects::pod(
                "shop",
                "batch",
                "u2",
                "node-1",
                &["10.0.0.2"],
                json!({"istio.io/dataplane-mode": "none"}),
            ),
            objects::pod("legacy", "old", "u3", "node-1", &["10.0.0.3"], json!({})),
            sidecar_pod,
            objects::pod(
                "legacy",
                "opted-in",
                "u4",
                "node-1",
                &["10.0.0.4"],
                json!({"istio.io/dataplane-mode": "ambient"}),
            ),
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    let protocol = |name| workload(&m.config, name).map(|w| w.protocol);
    assert_eq!(protocol("cart"), Some(ProtocolSpec::Hbone));
    assert_eq!(protocol("batch"), Some(ProtocolSpec::Tcp));
    assert_eq!(protocol("old"), Some(ProtocolSpec::Tcp));
    assert_eq!(protocol("opted-in"), Some(ProtocolSpec::Hbone));
    assert_eq!(protocol("injected"), Some(ProtocolSpec::Tcp));
    // CNI asks the same question of the same model, and gets the same answers.
    use crate::enroll::{decide, Capture};
    assert_eq!(decide(&m.config, "node-1", "shop", "cart"), Capture::Yes);
    assert!(matches!(
        decide(&m.config, "node-1", "shop", "batch"),
        Capture::No(_)
    ));
    assert_eq!(
        decide(&m.config, "node-1", "legacy", "opted-in"),
        Capture::Yes
    );
    assert_eq!(
        decide(&m.config, "node-1", "shop", "injected"),
        Capture::No("the pod runs Istio's sidecar, which captures its traffic")
    );
}

/// A ready waypoint as Istio deploys one: its Gateway (labelled with the traffic it takes, if
/// given), whose status names the Service Istio generates for it, and that Service.
fn waypoint(namespace: &str, name: &str, vip: &str, takes: Option<&str>) -> [Value; 2] {
    let labels = match takes {
        Some(takes) => json!({"istio.io/waypoint-for": takes}),
        None => json!({}),
    };
    let gateway = objects::waypoint_gateway(
        namespace,
        name,
        labels,
        Some(objects::hostname_address(namespace, name)),
    );
    let mut service = objects::service(namespace, name, &[vip], &[("mesh", 15008, json!(15008))]);
    service["metadata"]["labels"] = json!({
        "gateway.istio.io/managed": "istio.io-mesh-controller",
        "gateway.networking.k8s.io/gateway-name": name,
    });
    [gateway, service]
}

/// Lets the namespaces `namespaces` (as in a Gateway's `allowedRoutes.namespaces`) use the
/// waypoint's Gateway.
fn allow_routes_from(gateway: &mut Value, namespaces: Value) {
    gateway["spec"]["listeners"][0]["allowedRoutes"] = json!({"namespaces": namespaces});
}

#[test]
fn use_waypoint_names_a_ready_gateway_and_none_opts_out() {
    let [shop_gateway, shop_service] = waypoint("shop", "shop-wp", "10.96.0.10", Some("all"));
    // Addressed by IP, in another namespace, open to all.
    let mut shared = objects::waypoint_gateway(
        "mesh",
        "wp",
        json!({"istio.io/waypoint-for": "workload"}),
        Some(json!({"type": "IPAddress", "value": "fd00::10"})),
    );
    allow_routes_from(&mut shared, json!({"from": "All"}));
    // In another namespace, open to its own only (the default).
    let [closed, closed_service] = waypoint("mesh", "closed", "10.96.0.20", Some("all"));
    let not_ready = objects::waypoint_gateway("shop", "not-ready", json!({}), None);
    let pod = |name: &str, uid: &str, ip: &str, labels: Value| {
        objects::pod("shop", name, uid, "node-1", &[ip], labels)
    };
    let cluster = Cluster {
        namespaces: vec![
            objects::namespace(
                "shop",
                json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "shop-wp"}),
            ),
            objects::namespace("mesh", json!({})),
        ],
        pods: vec![
            pod("cart", "u1", "10.0.0.1", json!({})),
            pod(
                "direct",
                "u2",
                "10.0.0.2",
                json!({"istio.io/use-waypoint": "none"}),
            ),
            pod(
                "shared",
                "u3",
                "10.0.0.3",
                json!({"istio.io/use-waypoint": "wp", "istio.io/use-waypoint-namespace": "mesh"}),
            ),
            pod(
                "refused",
                "u4",
                "10.0.0.4",
                json!({"istio.io/use-waypoint": "closed", "istio.io/use-waypoint-namespace": "mesh"}),
            ),
            // Its own label wins over the namespace's, even while it names no waypoint yet.
            pod(
                "early",
                "u5",
                "10.0.0.5",
                json!({"istio.io/use-waypoint": "not-ready"}),
            ),
        ],
        services: vec![
            shop_service,
            closed_service,
            objects::service("shop", "cart", &["10.96.0.1"], &[("http", 80, json!(8080))]),
        ],
        gateways: vec![shop_gateway, shared, closed, not_ready],
        ..Cluster::default()
    };
    let m = cluster.model();
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let waypoint = |name| workload(&m.config, name).and_then(|w| w.waypoint.clone());
    assert_eq!(waypoint("cart"), Some(at("10.96.0.10:15008")));
    assert_eq!(waypoint("direct"), None);
    assert_eq!(waypoint("shared"), Some(at("[fd00::10]:15008")));
    assert_eq!(
        waypoint("refused"),
        None,
        "mesh/closed allows its own namespace only"
    );
    assert_eq!(
        waypoint("early"),
        None,
        "a Gateway without an address is no waypoint yet"
    );
    let svc = m.config.services.iter().find(|s| s.name == "cart");
    assert_eq!(
        svc.and_then(|s| s.waypoint.clone()),
        Some(at("10.96.0.10:15008")),
        "services follow their namespace's label too"
    );
}

/// Namespace shop, captured and using waypoint `wp`, with one pod (cart), the waypoint's
/// Service and these Gateways.
fn shop_using_waypoint_wp(service: Value, gateways: Vec<Value>) -> Cluster {
    Cluster {
        namespaces: vec![objects::namespace(
            "shop",
            json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
        )],
        pods: vec![objects::pod(
            "shop",
            "cart",
            "u1",
            "node-1",
            &["10.0.0.1"],
            json!({}),
        )],
        services: vec![service],
        gateways,
        ..Cluster::default()
    }
}

/// As in istiod: without the Gateway, or before Istio gave it an address, the label names no
/// waypoint and traffic goes direct; the Service alone (as older releases of this agent
/// read) is not a waypoint.
#[test]
fn a_waypoint_is_its_gateway_once_it_has_an_address() {
    let [gateway, service] = waypoint("shop", "wp", "10.96.0.10", Some("all"));
    let mut cluster = shop_using_waypoint_wp(service, Vec::new());
    let via = |cluster: &Cluster| {
        let m = cluster.model();
        workload(&m.config, "cart").and_then(|w| w.waypoint.clone())
    };
    assert_eq!(via(&cluster), None, "only the Service");
    let mut not_ready = gateway.clone();
    not_ready["status"]
        .as_object_mut()
        .expect("a status")
        .remove("addresses");
    cluster.gateways = vec![not_ready];
    assert_eq!(via(&cluster), None, "not ready");
    cluster.gateways = vec![gateway.clone()];
    assert_eq!(via(&cluster), Some(at("10.96.0.10:15008")), "ready");
    // A hostname that is no Service's, and one of another form: nowhere to send to.
    let mut elsewhere = gateway;
    elsewhere["status"]["addresses"] = json!([objects::hostname_address("shop", "gone")]);
    cluster.gateways = vec![elsewhere.clone()];
    let unresolved = |hostname: &str| Some(WaypointSpec::Unresolved(hostname.to_owned()));
    assert_eq!(
        via(&cluster),
        unresolved("gone.shop.svc.cluster.local"),
        "no such Service: refused, as ztunnel refuses it, not sent around the waypoint"
    );
    elsewhere["status"]["addresses"] = json!([{"type": "Hostname", "value": "wp.example.com"}]);
    cluster.gateways = vec![elsewhere.clone()];
    assert_eq!(
        via(&cluster),
        unresolved("wp.example.com"),
        "not a Service's hostname"
    );
    // ztunnel looks the hostname up among the Gateway's namespace's services.
    let mut other_namespace = objects::service(
        "mesh",
        "wp",
        &["10.96.0.30"],
        &[("mesh", 15008, json!(15008))],
    );
    other_namespace["metadata"]["labels"] = json!({});
    cluster.services.push(other_namespace);
    elsewhere["status"]["addresses"] = json!([objects::hostname_address("mesh", "wp")]);
    cluster.gateways = vec![elsewhere.clone()];
    assert_eq!(
        via(&cluster),
        unresolved("wp.mesh.svc.cluster.local"),
        "another namespace's Service"
    );
    // A hostname is preferred to an address, wherever it is listed; an address that does
    // not parse is passed over.
    elsewhere["status"]["addresses"] = json!([
        {"type": "IPAddress", "value": "10.96.0.99"},
        objects::hostname_address("shop", "wp"),
    ]);
    cluster.gateways = vec![elsewhere.clone()];
    assert_eq!(via(&cluster), Some(at("10.96.0.10:15008")), "the hostname");
    elsewhere["status"]["addresses"] = json!([
        {"type": "IPAddress", "value": "not-an-address"},
        {"value": "10.96.0.99"},
    ]);
    cluster.gateways = vec![elsewhere.clone()];
    assert_eq!(
        via(&cluster),
        Some(at("10.96.0.99:15008")),
        "the first address that parses (the type defaults to IPAddress)"
    );
    // An empty hostname (the CRD forbids it) is no address: never an empty "unresolved"
    // waypoint, which the snapshot could not tell from none.
    elsewhere["status"]["addresses"] = json!([
        {"type": "Hostname", "value": ""},
        {"type": "IPAddress", "value": "10.96.0.99"},
    ]);
    cluster.gateways = vec![elsewhere];
    assert_eq!(
        via(&cluster),
        Some(at("10.96.0.99:15008")),
        "empty hostname"
    );
}

/// As in istiod: a waypoint takes traffic addressed to services unless `istio.io/waypoint-for`
/// on its Gateway, else on its GatewayClass, says otherwise; `workload` takes traffic to
/// pods' own addresses only, `all` both, `none` neither.
#[test]
fn a_waypoint_takes_the_traffic_its_gateway_or_class_names() {
    // (the Gateway's label, its class's label)
    let takes = [
        (None, None),
        (Some("service"), None),
        (Some("workload"), None),
        (Some("all"), None),
        (Some("none"), None),
        (None, Some("workload")),
        (Some("service"), Some("workload")),
        (None, Some("all")),
    ];
    let mut cluster = Cluster::default();
    for (i, (gateway_label, class_label)) in takes.iter().enumerate() {
        let ns = format!("ns{i}");
        cluster.namespaces.push(objects::namespace(
            &ns,
            json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
        ));
        cluster.pods.push(objects::pod(
            &ns,
            "app",
            &format!("u{i}"),
            "node-1",
            &[&format!("10.0.0.{}", i + 1)],
            json!({}),
        ));
        let [mut gateway, service] =
            waypoint(&ns, "wp", &format!("10.96.0.{}", i + 100), *gateway_label);
        let class = format!("class-{i}");
        gateway["spec"]["gatewayClassName"] = class.clone().into();
        let class_labels = match class_label {
            Some(takes) => json!({"istio.io/waypoint-for": takes}),
            None => json!({}),
        };
        cluster
            .gateway_classes
            .push(objects::gateway_class(&class, class_labels));
        cluster.gateways.push(gateway);
        cluster.services.push(service);
        cluster.services.push(objects::service(
            &ns,
            "app",
            &[&format!("10.96.0.{}", i + 1)],
            &[("http", 80, json!(8080))],
        ));
    }
    let m = cluster.model();
    let routed: Vec<(bool, bool)> = (0..takes.len())
        .map(|i| {
            let ns = format!("ns{i}");
            let pod = m.config.workloads.iter().find(|w| w.namespace == ns);
            let service = m
                .config
                .services
                .iter()
                .find(|s| s.namespace == ns && s.name == "app");
            (
                service.and_then(|s| s.waypoint.clone()).is_some(),
                pod.and_then(|w| w.waypoint.clone()).is_some(),
            )
        })
        .collect();
    assert_eq!(
        routed,
        [
            (true, false),
            (true, false),
            (false, true),
            (true, true),
            (false, false),
            (false, true),
            (true, false),
            (true, true),
        ],
        "(service's traffic, pod's own traffic) through the waypoint, for {takes:?}"
    );
}

/// `allowedRoutes.namespaces.from: Selector` on the Gateway's HBONE listener: the namespaces
/// its label selector matches may use the waypoint; without a selector, none.
#[test]
fn a_waypoint_s_selector_says_which_other_namespaces_may_use_it() {
    let [mut gateway, service] = waypoint("mesh", "wp", "10.96.0.10", Some("all"));
    let selector = json!({"from": "Selector", "selector": {
        "matchLabels": {"team": "shop"},
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["untrusted"]}],
    }});
    allow_routes_from(&mut gateway, selector);
    let uses = |labels: Value| {
        let mut labels = labels;
        labels["istio.io/dataplane-mode"] = "ambient".into();
        labels["istio.io/use-waypoint"] = "wp".into();
        labels["istio.io/use-waypoint-namespace"] = "mesh".into();
        labels
    };
    let mut cluster = Cluster {
        namespaces: vec![
            objects::namespace("mesh", json!({})),
            objects::namespace("a", uses(json!({"team": "shop"}))),
            objects::namespace("b", uses(json!({"team": "shop", "tier": "untrusted"}))),
            objects::namespace("c", uses(json!({"team": "web"}))),
        ],
        pods: ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let ip = format!("10.0.0.{}", i + 1);
                objects::pod(ns, ns, &format!("u{i}"), "node-1", &[&ip], json!({}))
            })
            .collect(),
        services: vec![service],
        gateways: vec![gateway.clone()],
        ..Cluster::default()
    };
    let using = |cluster: &Cluster| {
        let m = cluster.model();
        ["a", "b", "c"].map(|name| {
            workload(&m.config, name)
                .and_then(|w| w.waypoint.clone())
                .is_some()
        })
    };
    assert_eq!(using(&cluster), [true, false, false]);
    allow_routes_from(&mut gateway, json!({"from": "Selector"}));
    cluster.gateways = vec![gateway];
    assert_eq!(using(&cluster), [false, false, false], "no selector: none");
}

#[test]
fn a_waypoint_s_own_pods_and_service_have_no_waypoint_in_a_namespace_using_it() {
    let managed = json!({
        "gateway.istio.io/managed": "istio.io-mesh-controller",
        "istio.io/waypoint-for": "all",
    });
    let [gateway, waypoint_service] = waypoint("shop", "waypoint", "10.96.0.10", Some("all"));
    let cluster = Cluster {
        namespaces: vec![objects::namespace(
            "shop",
            json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}),
        )],
        pods: vec![
            objects::pod("shop", "cart", "u1", "node-1", &["10.0.0.1"], json!({})),
            objects::pod(
                "shop",
                "waypoint-7d9f",
                "u2",
                "node-1",
                &["10.0.0.2"],
                managed,
            ),
            // Deployed by another controller than Istio's: known by its Gateway's name.
            objects::pod(
                "shop",
                "waypoint-other",
                "u3",
                "node-1",
                &["10.0.0.3"],
                json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}),
            ),
        ],
        services: vec![
            objects::service("shop", "cart", &["10.96.0.1"], &[("http", 80, json!(8080))]),
            waypoint_service,
        ],
        gateways: vec![gateway],
        ..Cluster::default()
    };
    let m = cluster.model();
    let of_workload = |name| workload(&m.config, name).map(|w| w.waypoint.clone());
    let of_service = |name: &str| {
        let s = m.config.services.iter().find(|s| s.name == name);
        s.map(|s| s.waypoint.clone())
    };
    let via = Some(Some(at("10.96.0.10:15008")));
    assert_eq!(of_workload("cart"), via);
    assert_eq!(of_service("cart"), via);
    assert_eq!(of_workload("waypoint-7d9f"), Some(None));
    assert_eq!(of_workload("waypoint-other"), Some(None));
    assert_eq!(of_service("waypoint"), Some(None));
}

/// A Gateway that does not read is named, and is no waypoint; the rest is published.
#[test]
fn a_gateway_that_does_not_read_is_named_and_no_waypoint() {
    let [mut gateway, service] = waypoint("shop", "wp", "10.96.0.10", Some("all"));
    gateway["spec"]["listeners"][0]["port"] = "fifteen thousand".into();
    let cluster = shop_using_waypoint_wp(service, vec![gateway]);
    let m = cluster.model();
    assert_eq!(
        workload(&m.config, "cart").map(|w| w.waypoint.clone()),
        Some(None)
    );
    assert_eq!(m.problems.len(), 1, "{:?}", m.problems);
    assert!(
        m.problems[0].starts_with("gateway shop/wp: spec.listeners[0].port: invalid type"),
        "{:?}",
        m.problems
    );
}

/// The model a `Modeler` keeps up to date equals the model built from scratch, through a
/// long run of pod, namespace, service, Gateway and EndpointSlice events; and it translates
/// again only what it must.
#[test]
fn a_model_kept_up_to_date_equals_one_built_from_scratch() {
    let namespaces = ["shop", "pay", "mesh"];
    let cluster = Cluster {
        namespaces: vec![
            objects::namespace(
                "shop",
                json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
            ),
            objects::namespace("pay", json!({})),
            objects::namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"})),
        ],
        pods: (0..30)
            .map(|i| {
                let ip = format!("10.0.0.{}", i + 1);
                let node = if i % 3 == 0 { "node-1" } else { "node-2" };
                objects::pod(
                    namespaces[i % 3],
                    &format!("pod-u{i}"),
                    &format!("u{i}"),
                    node,
                    &[&ip],
                    json!({"app": format!("app-{}", i % 4)}),
                )
            })
            .collect(),
        services: vec![objects::service(
            "shop",
            "cart",
            &["10.96.0.1"],
            &[("http", 80, json!(8080))],
        )],
        slices: vec![objects::endpoint_slice(
            "shop",
            "cart",
            &[("u0", "10.0.0.1", true), ("u3", "10.0.0.4", true)],
            &[("http", 8080)],
        )],
        ..Cluster::default()
    };
    let mut world = cluster.world();
    let mut modeler = model::Modeler::new(options());
    let mut last = modeler.model(&world);
    // A small deterministic generator: the same run every time.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |bound: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % bound as u64) as usize
    };
    let address = |ip: usize| format!("10.0.{}.{}", ip / 250, ip % 250 + 1);
    // Pods with two addresses, and now and then one with another pod's uid, chain clashes:
    // who keeps what then depends on pods the event did not touch.
    let pod_event = |i: usize, uid: usize, ips: &[usize], labels: Value| {
        let ips: Vec<String> = ips.iter().map(|&ip| address(ip)).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let pod = objects::pod(
            namespaces[i % 3],
            &format!("pod-u{i}"),
            &format!("u{uid}"),
            if i.is_multiple_of(3) {
                "node-1"
            } else {
                "node-2"
            },
            &ips,
            labels,
        );
        Update::Event(Kind::Pods, Event::Apply(dynamic("v1", "Pod", pod)))
    };
    let (mut retranslated, mut reused, mut services_kept) = (0, 0, 0);
    let (mut address_clashes, mut uid_clashes) = (0, 0);
    // Models in which shop's pods or service went through the waypoint, and models in which
    // they did not.
    let mut via_waypoint = [0, 0];
    for step in 0..300 {
        let touched_pod = next(40);
        let kind = next(10);
        let only_a_pod = match kind {
            // A pod moves, relabels, or comes (uids 30-39 are new).
            0..=5 => {
                let labels = json!({"app": format!("app-{}", next(4))});
                let uid = if next(10) == 0 { next(40) } else { touched_pod };
                let ips = if next(3) == 0 {
                    vec![next(60), next(60)]
                } else {
                    vec![next(60)]
                };
                world.apply(pod_event(touched_pod, uid, &ips, labels));
                true
            }
            6 => {
                let name = format!("pod-u{touched_pod}");
                let pod =
                    objects::pod(namespaces[touched_pod % 3], &name, "x", "n", &[], json!({}));
                world.apply(Update::Event(
                    Kind::Pods,
                    Event::Delete(dynamic("v1", "Pod", pod)),
                ));
                true
            }
            7 => {
                let mode = if next(2) == 0 { "ambient" } else { "none" };
                let ns = objects::namespace("pay", json!({"istio.io/dataplane-mode": mode}));
                world.apply(Update::Event(
                    Kind::Namespaces,
                    Event::Apply(dynamic("v1", "Namespace", ns)),
                ));
                false
            }
            8 => {
                // One at a time (so that each must retranslate by itself): the waypoint's
                // Service comes or goes, its Gateway becomes ready, not ready, or goes, or
                // its class changes which traffic it takes.
                let [gateway, service] = waypoint("shop", "wp", "10.96.0.9", None);
                let gateway_api = "gateway.networking.k8s.io/v1";
                let update = match next(3) {
                    0 => {
                        let event = if next(2) == 0 {
                            Event::Apply(dynamic("v1", "Service", service))
                        } else {
                            Event::Delete(dynamic("v1", "Service", service))
                        };
                        Update::Event(Kind::Services, event)
                    }
                    1 => {
                        let mut not_ready = gateway.clone();
                        not_ready["status"]["addresses"] = json!([]);
                        let event = match next(3) {
                            0 => Event::Apply(dynamic(gateway_api, "Gateway", gateway)),
                            1 => Event::Apply(dynamic(gateway_api, "Gateway", not_ready)),
                            _ => Event::Delete(dynamic(gateway_api, "Gateway", gateway)),
                        };
                        Update::Event(Kind::Gateways, event)
                    }
                    _ => {
                        let takes = ["all", "workload", "service"][next(3)];
                        let class = objects::gateway_class(
                            "istio-waypoint",
                            json!({"istio.io/waypoint-for": takes}),
                        );
                        let class = dynamic(gateway_api, "GatewayClass", class);
                        Update::Event(Kind::GatewayClasses, Event::Apply(class))
                    }
                };
                world.apply(update);
                false
            }
            _ => {
                let a = format!("u{}", next(40));
                let slice = objects::endpoint_slice(
                    "shop",
                    "cart",
                    &[
                        (a.as_str(), "10.0.0.1", next(2) == 0),
                        ("u3", "10.0.0.4", true),
                    ],
                    &[("http", 8080)],
                );
                world.apply(Update::Event(
                    Kind::EndpointSlices,
                    Event::Apply(dynamic("discovery.k8s.io/v1", "EndpointSlice", slice)),
                ));
                true
            }
        };
        if step % 37 == 36 {
            // A relist (after a 410) finds every pod as it was but one, deleted in the gap:
            // the store no longer says which changed, and the modeler compares them all.
            let pods: Vec<StoredPod> = world.pods.objects().skip(1).cloned().collect();
            world.pods.apply(Event::Init);
            for pod in pods {
                world.pods.apply(Event::InitApply(pod));
            }
            world.pods.apply(Event::InitDone);
        }
        let kept = modeler.model(&world);
        let fresh = model::model(&world, &options());
        assert_eq!(kept.config, fresh.config, "step {step}");
        assert_eq!(kept.problems, fresh.problems, "step {step}");
        let through_waypoint = kept.config.workloads.iter().any(|w| w.waypoint.is_some())
            || kept.config.services.iter().any(|s| s.waypoint.is_some());
        via_waypoint[usize::from(through_waypoint)] += 1;
        for problem in &kept.problems {
            address_clashes += usize::from(problem.contains("an address is also"));
            uid_clashes += usize::from(problem.contains("its uid is also"));
        }
        // Pods the event did not touch keep the spec they had, unless a namespace, service
        // or Gateway changed (then every pod is translated again).
        let touched_name = format!("pod-u{touched_pod}");
        for w in kept
            .config
            .workloads
            .iter()
            .filter(|w| w.name != touched_name)
        {
            let Some(before) = last
                .config
                .workloads
                .iter()
                .find(|b| (&b.namespace, &b.name) == (&w.namespace, &w.name))
            else {
                continue;
            };
            if Arc::ptr_eq(before, w) {
                reused += 1;
            } else {
                retranslated += 1;
                assert!(!only_a_pod, "step {step}: {} translated again", w.uid);
            }
        }
        // After a pod event (not a slice's), a service whose endpoints stayed the same keeps
        // its spec.
        let pod_event = kind <= 6;
        for s in &kept.config.services {
            let before = last
                .config
                .services
                .iter()
                .find(|b| (&b.namespace, &b.name) == (&s.namespace, &s.name));
            if let Some(before) = before.filter(|b| pod_event && ***b == **s) {
                assert!(Arc::ptr_eq(before, s), "step {step}: {} copied", s.name);
                services_kept += 1;
            }
        }
        last = kept;
    }
    assert!(
        reused > 1000 && retranslated > 100,
        "{reused} reused, {retranslated} not"
    );
    assert!(services_kept > 10, "{services_kept} services kept");
    assert!(
        via_waypoint.iter().all(|&models| models > 20),
        "{via_waypoint:?} models without and with the waypoint"
    );
    assert!(
        address_clashes > 100 && uid_clashes > 10,
        "{address_clashes} address and {uid_clashes} uid clashes seen"
    );
}

/// A cluster of services whose pods are none of the model's: no event changes the model's
/// pods, and a kept model still follows its services.
#[test]
fn a_kept_model_follows_services_when_no_pod_is_in_it() {
    let cart = objects::service("shop", "cart", &["10.96.0.1"], &[("http", 80, json!(8080))]);
    let cluster = Cluster {
        services: vec![cart],
        ..Cluster::default()
    };
    let mut world = cluster.world();
    let mut modeler = model::Modeler::new(options());
    let names = |m: &model::Model| -> Vec<String> {
        m.config.services.iter().map(|s| s.name.clone()).collect()
    };
    assert_eq!(names(&modeler.model(&world)), ["cart"]);
    let web = objects::service("shop", "web", &["10.96.0.2"], &[("http", 80, json!(8080))]);
    world.apply(Update::Event(
        Kind::Services,
        Event::Apply(dynamic("v1", "Service", web)),
    ));
    assert_eq!(names(&modeler.model(&world)), ["cart", "web"]);
    let mut udp_only = objects::service("shop", "cart", &["10.96.0.1"], &[("dns", 53, json!(53))]);
    udp_only["spec"]["ports"][0]["protocol"] = "UDP".into();
    world.apply(Update::Event(
        Kind::Services,
        Event::Apply(dynamic("v1", "Service", udp_only)),
    ));
    assert_eq!(names(&modeler.model(&world)), ["web"]);
}

#[test]
fn services_map_cluster_ips_ports_and_ready_pod_endpoints() {
    let mut udp = objects::service("shop", "dns", &["10.96.0.53"], &[("dns", 53, json!(53))]);
    udp["spec"]["ports"][0]["protocol"] = "UDP".into();
    let mut headless = objects::service("shop", "db", &["None"], &[("sql", 5432, json!(5432))]);
    headless["spec"]["clusterIPs"] = json!(["None"]);
    let mut cart_slice = objects::endpoint_slice(
        "shop",
        "cart",
        &[
            ("u1", "10.0.0.1", true),
            ("u2", "10.0.0.2", false),
            ("u-unknown", "10.0.0.9", true),
            ("u3", "10.0.0.3", true),
            ("u4", "10.0.0.4", true),
        ],
        &[("http", 8080), ("grpc", 9000)],
    );
    // An endpoint that says nothing of readiness is ready (Kubernetes' rule); one that is not
    // a pod is no workload's, whatever uid it carries.
    cart_slice["endpoints"][3]["conditions"] = json!({});
    cart_slice["endpoints"][4]["targetRef"]["kind"] = "Node".into();
    let cluster = Cluster {
        pods: vec![
            objects::pod("shop", "cart-1", "u1", "node-1", &["10.0.0.1"], json!({})),
            objects::pod("shop", "cart-2", "u2", "node-2", &["10.0.0.2"], json!({})),
            objects::pod("shop", "cart-3", "u3", "node-2", &["10.0.0.3"], json!({})),
            objects::pod("shop", "cart-4", "u4", "node-2", &["10.0.0.4"], json!({})),
        ],
        services: vec![
            objects::service(
                "shop",
                "cart",
                &["10.96.0.1", "fd00::1"],
                &[
                    ("http", 80, json!(8080)),
                    ("grpc", 9090, json!("grpc-port")),
                    ("admin", 9901, json!("no-such-port")),
                ],
            ),
            udp,
            headless,
        ],
        slices: vec![cart_slice],
        ..Cluster::default()
    };
    let m = cluster.model();
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let names: Vec<&str> = m.config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["cart"],
        "no TCP port, or no virtual address: nothing to route"
    );
    let s = &m.config.services[0];
    assert_eq!(s.vips, [ip("10.96.0.1"), ip("fd00::1")]);
    let ports: Vec<(u16, Option<u16>)> = s.ports.iter().map(|p| (p.port, p.target_port)).collect();
    assert_eq!(
        ports,
        [(80, Some(8080)), (9090, Some(9000))],
        "a named target port is resolved through the endpoints; an unresolved one is left out"
    );
    assert_eq!(s.endpoints, ["u1", "u3"], "ready pods the model knows");

    // And on through the one translation every source uses.
    let snap = crate::translate::routing_only(&m.config, "node-1");
    assert_eq!(snap.services[0].hostname, "cart.shop.svc.cluster.local");
    assert_eq!(snap.services[0].ports[1].target_port, 9000);
    assert_eq!(snap.workloads.len(), 4);
}

#[test]
fn the_dry_run_annotation_reads_as_istiod_reads_it() {
    // istiod parses it with Go's strconv.ParseBool: a value it reads as true is not
    // enforced by ztunnel; anything else is enforced.
    let values = [
        "1", "t", "T", "true", "TRUE", "True", "tRuE", "yes", "0", "false", "",
    ];
    let policies = values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let mut policy = objects::authorization_policy(
                "shop",
                &format!("p{i:02}"),
                json!({"action": "DENY", "rules": [{}]}),
            );
            policy["metadata"]["annotations"] = json!({"istio.io/dry-run": value});
            policy
        })
        .collect();
    let m = Cluster {
        policies,
        ..Cluster::default()
    }
    .model();
    let dry: Vec<(&str, bool)> = values
        .iter()
        .zip(&m.config.policies)
        .map(|(value, p)| (*value, p.dry_run))
        .collect();
    assert_eq!(
        dry,
        [
            ("1", true),
            ("t", true),
            ("T", true),
            ("true", true),
            ("TRUE", true),
            ("True", true),
            ("tRuE", false),
            ("yes", false),
            ("0", false),
            ("false", false),
            ("", false),
        ]
    );
}

#[test]
fn istio_policies_keep_their_fields_and_dry_run_annotation() {
    let mut dry = objects::authorization_policy(
        "shop",
        "audit-only",
        json!({"action": "DENY", "rules": [{}]}),
    );
    dry["metadata"]["annotations"] = json!({"istio.io/dry-run": "true"});
    let cluster = Cluster {
        policies: vec![
            objects::authorization_policy(
                "shop",
                "allow-front",
                json!({
                    "selector": {"matchLabels": {"app": "cart"}},
                    "action": "ALLOW",
                    "rules": [{
                        "from": [{"source": {
                            "principals": ["cluster.local/ns/shop/sa/front"],
                            "notNamespaces": ["evil"],
                            "ipBlocks": ["10.0.0.0/8"],
                            "serviceAccounts": ["front"],
                        }}],
                        "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}],
                        "when": [{"key": "source.ip", "values": ["10.0.0.1"]}],
                    }],
                }),
            ),
            dry,
            // Attached to a waypoint: not ztunnel's (nor ours) to enforce.
            objects::authorization_policy(
                "shop",
                "waypoint-only",
                json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}]}),
            ),
            objects::authorization_policy(
                "shop",
                "ext-authz",
                json!({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}),
            ),
        ],
        peer_authentications: vec![
            objects::peer_authentication(
                "istio-system",
                "default",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            objects::peer_authentication(
                "shop",
                "cart-ports",
                json!({
                    "selector": {"matchLabels": {"app": "cart"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
                }),
            ),
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    let names: Vec<&str> = m.config.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["allow-front", "audit-only"]);
    let p = &m.config.policies[0];
    assert_eq!(p.action, ActionSpec::Allow);
    assert_eq!(
        p.selector
            .as_ref()
            .map(|s| s.match_labels.get("app").cloned()),
        Some(Some("cart".into()))
    );
    let source = &p.rules[0].from[0].source;
    assert_eq!(source.principals, ["cluster.local/ns/shop/sa/front"]);
    assert_eq!(source.not_namespaces, ["evil"]);
    assert_eq!(source.ip_blocks, ["10.0.0.0/8"]);
    assert_eq!(source.service_accounts, ["front"]);
    assert_eq!(p.rules[0].to[0].operation.ports, ["8080"]);
    assert_eq!(p.rules[0].when[0].key, "source.ip");
    assert!(!p.dry_run);
    assert!(m.config.policies[1].dry_run);
    assert_eq!(m.config.policies[1].action, ActionSpec::Deny);

    // The CUSTOM policy is left out, as by ztunnel, but said (the waypoint's is not).
    assert_eq!(
        m.problems,
        [
            "AuthorizationPolicy shop/ext-authz: action CUSTOM (external authorization) is not \
          enforced by this L4 data plane, nor by ztunnel (only a waypoint or gateway enforces \
          it); left out"
        ]
    );

    let pas = &m.config.peer_authentications;
    assert_eq!(pas.len(), 2);
    assert_eq!(pas[0].namespace, "istio-system");
    assert_eq!(pas[0].mtls.mode, MtlsModeSpec::Strict);
    assert_eq!(
        pas[1].port_level_mtls.get(&8080).map(|m| m.mode),
        Some(MtlsModeSpec::Permissive)
    );
}

#[test]
fn a_malformed_pod_is_named_and_the_rest_still_published() {
    let mut bad = objects::pod("shop", "bad", "u1", "node-1", &["not-an-ip"], json!({}));
    bad["metadata"]["labels"] = json!({});
    let mut clash = objects::pod("shop", "clash", "u3", "node-1", &["10.0.0.2"], json!({}));
    clash["metadata"]["uid"] = "u3".into();
    let cluster = Cluster {
        pods: vec![
            bad,
            objects::pod("shop", "good", "u2", "node-1", &["10.0.0.2"], json!({})),
            clash,
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    let names: Vec<&str> = m.config.workloads.iter().map(|w| w.name.as_str()).collect();
    // Objects are visited by namespace/name: "clash" comes before "good" and keeps 10.0.0.2.
    assert_eq!(names, ["clash"]);
    let problems = m.problems.join("\n");
    assert!(
        problems.contains("pod shop/bad: status.podIPs: \"not-an-ip\""),
        "{problems}"
    );
    assert!(
        problems.contains("pod shop/good: an address is also pod shop/clash's"),
        "{problems}"
    );

    // Two pods with one uid (no API server does that; a broken double might): the first
    // stays, as with addresses, so a model's uids are unique.
    let cluster = Cluster {
        pods: vec![
            objects::pod("shop", "a", "same", "node-1", &["10.0.0.1"], json!({})),
            objects::pod("shop", "b", "same", "node-1", &["10.0.0.2"], json!({})),
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    let names: Vec<&str> = m.config.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["a"]);
    assert_eq!(
        m.problems,
        ["pod shop/b: its uid is also pod shop/a's; left out"]
    );
}

/// A Terminating pod (deletionTimestamp set, phase still Running through its grace period) or
/// an older one does not keep an address from the pod now holding it: the new pod gets its
/// workload and its service endpoints whatever the names' order.
#[test]
fn of_two_pods_claiming_one_address_the_live_and_newest_keeps_it() {
    let pod = |name: &str, uid: &str, created: &str| {
        let mut pod = objects::pod("shop", name, uid, "node-1", &["10.0.0.7"], json!({}));
        pod["metadata"]["creationTimestamp"] = created.into();
        pod
    };
    let cart = objects::service("shop", "cart", &["10.96.0.1"], &[("http", 80, json!(8080))]);
    let slice = objects::endpoint_slice(
        "shop",
        "cart",
        &[("u-old", "10.0.0.7", true), ("u-new", "10.0.0.7", true)],
        &[("http", 8080)],
    );
    // "a-old" comes first in store order. Each case on its own decides against it: it is
    // terminating (created the same second as the other), or older.
    let mut terminating = pod("a-old", "u-old", "2026-11-01T10:00:00Z");
    terminating["metadata"]["deletionTimestamp"] = "2026-11-02T08:00:00Z".into();
    let cases = [
        (
            "terminating",
            terminating,
            pod("b-new", "u-new", "2026-11-01T10:00:00Z"),
        ),
        (
            "stale",
            pod("a-old", "u-old", "2026-11-01T10:00:00Z"),
            pod("b-new", "u-new", "2026-11-02T08:00:05Z"),
        ),
    ];
    for (case, old, new) in cases {
        let cluster = Cluster {
            pods: vec![old, new],
            services: vec![cart.clone()],
            slices: vec![slice.clone()],
            ..Cluster::default()
        };
        let m = cluster.model();
        let names: Vec<&str> = m.config.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["b-new"], "{case}");
        assert_eq!(m.config.services[0].endpoints, ["u-new"], "{case}");
        assert_eq!(
            m.problems,
            ["pod shop/a-old: an address is also pod shop/b-new's; left out"],
            "{case}"
        );
    }

    // Created the same second: store order decides, until the first starts terminating (an
    // event that changes nothing else of it).
    let cluster = Cluster {
        pods: vec![
            pod("a-old", "u-old", "2026-11-01T10:00:00Z"),
            pod("b-new", "u-new", "2026-11-01T10:00:00Z"),
        ],
        ..Cluster::default()
    };
    let mut world = cluster.world();
    let mut modeler = model::Modeler::new(options());
    let names = |m: &model::Model| -> Vec<String> {
        m.config.workloads.iter().map(|w| w.name.clone()).collect()
    };
    assert_eq!(names(&modeler.model(&world)), ["a-old"]);
    let mut deleted = pod("a-old", "u-old", "2026-11-01T10:00:00Z");
    deleted["metadata"]["deletionTimestamp"] = "2026-11-02T08:00:00Z".into();
    let applied = world.apply(Update::Event(
        Kind::Pods,
        Event::Apply(dynamic("v1", "Pod", deleted)),
    ));
    assert_eq!(applied, Applied::Changed, "the deletion is kept");
    let kept = modeler.model(&world);
    assert_eq!(names(&kept), ["b-new"]);
    assert_eq!(kept.config, model::model(&world, &options()).config);
}

#[test]
fn a_relist_replaces_a_store_whole_and_the_world_waits_for_every_kind() {
    let pod = |name: &str| -> DynamicObject {
        dynamic(
            "v1",
            "Pod",
            objects::pod("shop", name, name, "node-1", &["10.0.0.1"], json!({})),
        )
    };
    let pods = |event| Update::Event(Kind::Pods, event);
    let mut world = World::default();
    assert_eq!(world.waiting_for().len(), 8);
    assert_eq!(world.apply(pods(Event::Init)), Applied::Nothing);
    world.apply(pods(Event::InitApply(pod("a"))));
    world.apply(pods(Event::InitApply(pod("b"))));
    assert!(world.waiting_for().contains(&"pods"), "mid-list");
    assert_eq!(world.apply(pods(Event::InitDone)), Applied::Changed);
    assert!(!world.waiting_for().contains(&"pods"));
    assert_eq!(world.pods.len(), 2);
    for kind in [
        Kind::Namespaces,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::AuthorizationPolicies,
        Kind::GatewayClasses,
    ] {
        world.apply(Update::Event(kind, Event::Init));
        world.apply(Update::Event(kind, Event::InitDone));
    }
    assert_eq!(world.waiting_for(), ["peerauthentications", "gateways"]);
    // The CRDs are not installed: the rest of the cluster goes out without them.
    assert_eq!(
        world.apply(Update::Absent(Kind::PeerAuthentications)),
        Applied::Changed
    );
    assert_eq!(world.waiting_for(), ["gateways"]);
    assert_eq!(
        world.apply(Update::Absent(Kind::Gateways)),
        Applied::Changed
    );
    assert!(world.waiting_for().is_empty());

    // A relist after a 410: until it is done the old objects stand and the world waits.
    world.apply(pods(Event::Init));
    world.apply(pods(Event::InitApply(pod("b"))));
    world.apply(pods(Event::InitApply(pod("c"))));
    assert_eq!(world.waiting_for(), ["pods"]);
    let names = |w: &World| -> Vec<String> { w.pods.objects().map(|p| p.name.clone()).collect() };
    assert_eq!(names(&world), ["a", "b"]);
    world.apply(pods(Event::InitDone));
    assert_eq!(names(&world), ["b", "c"], "a was deleted during the gap");
    // Watch events after the list.
    world.apply(pods(Event::Delete(pod("b"))));
    world.apply(pods(Event::Apply(pod("d"))));
    assert_eq!(names(&world), ["c", "d"]);
    assert_eq!(
        world.apply(pods(Event::Delete(pod("zz")))),
        Applied::Nothing
    );

    // A malformed pod is skipped in a list, and replaces (removes) a good one in a watch.
    let mut bad = pod("d");
    bad.data["spec"] = json!("not a pod spec");
    assert_eq!(
        world.apply(pods(Event::Apply(bad.clone()))),
        Applied::Changed
    );
    assert_eq!(names(&world), ["c"]);
    world.apply(pods(Event::Init));
    world.apply(pods(Event::InitApply(bad)));
    world.apply(pods(Event::InitApply(pod("e"))));
    world.apply(pods(Event::InitDone));
    assert_eq!(names(&world), ["e"]);
}

#[test]
fn a_store_keeps_what_the_model_reads_and_an_event_that_changes_none_of_it_changes_nothing() {
    let served = |name: &str, ip: &str| {
        objects::pod("shop", name, name, "node-1", &[ip], json!({"app": name}))
    };
    let event = |value: Value| dynamic("v1", "Pod", value);
    let relist = |store: &mut Store<StoredPod>, pods: &[(&str, &str)]| {
        store.apply_untyped(Kind::Pods, Event::Init);
        for (name, ip) in pods {
            store.apply_untyped(Kind::Pods, Event::InitApply(event(served(name, ip))));
        }
        store.apply_untyped(Kind::Pods, Event::InitDone)
    };
    let mut store = Store::<StoredPod>::default();
    assert_eq!(
        relist(&mut store, &[("a", "10.0.0.1"), ("b", "10.0.0.2")]),
        Applied::Changed
    );

    // What is kept of a pod as an API server serves it: what the model reads, no more (the
    // model tests check that the model of the kept part is the model of the whole).
    let mut sidecar = served("s", "10.0.0.3");
    sidecar["metadata"]["annotations"]["sidecar.istio.io/status"] = "{}".into();
    store.apply_untyped(Kind::Pods, Event::Apply(event(sidecar)));
    assert_eq!(
        store.get("shop", "a"),
        Some(&StoredPod {
            name: "a".into(),
            namespace: Some("shop".into()),
            uid: Some("a".into()),
            labels: [("app".to_owned(), "a".to_owned())].into(),
            sidecar: false,
            redirection_annotated: false,
            node_name: Some("node-1".into()),
            host_network: false,
            service_account_name: Some("a-sa".into()),
            phase: Some("Running".into()),
            ips: vec!["10.0.0.1".into()],
            // 2026-11-01T10:00:00Z
            created_unix: Some(1_793_527_200),
            deleting: false,
            generate_name: "a-".into(),
            owner_references: vec![OwnerReferenceSpec {
                kind: "ReplicaSet".into(),
                name: "a-rs".into(),
                controller: true,
            }],
        })
    );
    assert!(store.get("shop", "s").is_some_and(|s| s.sidecar));
    store.apply_untyped(Kind::Pods, Event::Delete(event(served("s", "10.0.0.3"))));

    let pointer = |store: &Store<_>, name: &str| {
        store
            .entries()
            .find(|(key, _)| *key == format!("shop/{name}"))
            .map(|(_, pod)| Arc::as_ptr(pod))
            .expect("stored")
    };
    let (a, b) = (pointer(&store, "a"), pointer(&store, "b"));
    let revision = store.revision();
    // The kubelet reports a restart and a new resourceVersion: nothing the model reads.
    let mut restarted = served("a", "10.0.0.1");
    restarted["metadata"]["resourceVersion"] = "7".into();
    restarted["status"]["containerStatuses"][0]["restartCount"] = 1.into();
    restarted["status"]["conditions"][2]["status"] = "False".into();
    assert_eq!(
        store.apply_untyped(Kind::Pods, Event::Apply(event(restarted))),
        Applied::Nothing
    );
    assert_eq!(pointer(&store, "a"), a, "the stored pod stays");
    assert_eq!(store.revision(), revision);
    // A new address is read.
    assert_eq!(
        store.apply_untyped(Kind::Pods, Event::Apply(event(served("a", "10.0.0.9")))),
        Applied::Changed
    );
    let a = pointer(&store, "a");

    // A relist (after a 410) that finds every pod as it was changes nothing, and the pods
    // keep their pointers, by which the modeler keeps their translations.
    assert_eq!(
        relist(&mut store, &[("a", "10.0.0.9"), ("b", "10.0.0.2")]),
        Applied::Nothing
    );
    assert_eq!((pointer(&store, "a"), pointer(&store, "b")), (a, b));
    // One that finds one pod moved and another gone is a change; the rest keep theirs.
    assert_eq!(relist(&mut store, &[("b", "10.0.0.3")]), Applied::Changed);
    assert_ne!(pointer(&store, "b"), b);
    assert_eq!(store.len(), 1);
    let b = pointer(&store, "b");
    assert_eq!(
        relist(&mut store, &[("b", "10.0.0.3"), ("c", "10.0.0.4")]),
        Applied::Changed,
        "a pod came"
    );
    assert_eq!(pointer(&store, "b"), b);

    // What changed since a revision, for readers that follow the store by its changes.
    let seen = store.revision();
    assert_eq!(store.changed_since(seen), Some(vec![]));
    store.apply_untyped(Kind::Pods, Event::Apply(event(served("c", "10.0.0.5"))));
    store.apply_untyped(Kind::Pods, Event::Apply(event(served("a", "10.0.0.6"))));
    store.apply_untyped(Kind::Pods, Event::Apply(event(served("c", "10.0.0.7"))));
    store.apply_untyped(Kind::Pods, Event::Delete(event(served("b", "10.0.0.3"))));
    store.apply_untyped(Kind::Pods, Event::Delete(event(served("zz", "10.0.0.3"))));
    assert_eq!(
        store.changed_since(seen),
        Some(vec!["shop/a", "shop/b", "shop/c"]),
        "each changed key once, in key order; a delete of nothing is no change"
    );
    let seen = store.revision();
    relist(&mut store, &[("c", "10.0.0.7")]);
    assert_eq!(
        store.changed_since(seen),
        None,
        "a relist that changed things"
    );
    // The store remembers a bounded number of changes; further back, a reader compares all.
    let seen = store.revision();
    for n in 0..5000 {
        let ip = format!("10.1.{}.{}", n / 250, n % 250 + 1);
        store.apply_untyped(Kind::Pods, Event::Apply(event(served("c", &ip))));
    }
    assert_eq!(store.changed_since(seen), None);
    assert_eq!(
        store.changed_since(store.revision() - 1),
        Some(vec!["shop/c"])
    );
}

// --- The watchers against the kube-apiserver double, in process. ---

/// The baseline's pod on this node.
fn baseline_cart() -> Value {
    objects::pod(
        "shop",
        "cart",
        "uid-cart",
        "node-1",
        &["10.0.0.1"],
        json!({}),
    )
}

fn baseline(server: &fake_apiserver::FakeApiServer) {
    use fake_apiserver::*;
    server.apply(
        NAMESPACES,
        objects::namespace("shop", json!({"istio.io/dataplane-mode": "ambient"})),
    );
    server.apply(PODS, baseline_cart());
    server.apply(
        PODS,
        objects::pod("shop", "web", "uid-web", "node-2", &["10.0.0.2"], json!({})),
    );
    server.apply_cart_service();
    server.apply(
        AUTHORIZATION_POLICIES,
        objects::authorization_policy("shop", "deny-all", json!({"action": "DENY", "rules": [{}]})),
    );
    server.apply(
        PEER_AUTHENTICATIONS,
        objects::peer_authentication(
            "istio-system",
            "default",
            json!({"mtls": {"mode": "STRICT"}}),
        ),
    );
}

struct Watching {
    handoff: Arc<Handoff>,
    wake: mpsc::Receiver<()>,
}

impl Watching {
    fn start(server: &fake_apiserver::FakeApiServer) -> Watching {
        Watching::with(server, |_| {})
    }

    fn with(
        server: &fake_apiserver::FakeApiServer,
        adjust: impl FnOnce(&mut KubeOptions),
    ) -> Watching {
        let client = kube::Config::new(server.url().parse().expect("url"));
        let mut options = KubeOptions::new(client, options());
        adjust(&mut options);
        let handoff = Arc::new(Handoff::default());
        let (tx, wake) = mpsc::channel();
        // Nothing is captured here: no pod is annotated.
        let (_, no_redirections) = tokio::sync::mpsc::unbounded_channel();
        start(
            options,
            handoff.clone(),
            tx,
            no_redirections,
            Default::default(),
        )
        .expect("start");
        Watching { handoff, wake }
    }

    /// Waits for the first model, and until `paths` are watched: what the server applies
    /// after this arrives as watch events.
    fn watching(self, server: &fake_apiserver::FakeApiServer, paths: &[&str]) -> Watching {
        self.until("the first model", |_| true);
        server.wait_for("the watches", Duration::from_secs(5), |s| {
            paths.iter().all(|path| !s.watch_versions(path).is_empty())
        });
        self
    }

    /// The next model handed over that satisfies `f`.
    fn until(&self, what: &str, f: impl Fn(&FileConfig) -> bool) -> Arc<FileConfig> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            let _ = self.wake.recv_timeout(left);
            if let Some(config) = self.handoff.take() {
                if f(&config) {
                    return config;
                }
            }
        }
    }
}

fn names(config: &FileConfig) -> Vec<&str> {
    config.workloads.iter().map(|w| w.name.as_str()).collect()
}

#[test]
fn nothing_is_handed_over_until_every_kind_is_listed() {
    let server = fake_apiserver::FakeApiServer::start();
    baseline(&server);
    server.set_list_delay(
        fake_apiserver::PEER_AUTHENTICATIONS,
        Duration::from_millis(800),
    );
    let started = Instant::now();
    let watching = Watching::start(&server);
    let first = watching.until("the first model", |_| true);
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "handed over before the slow list finished"
    );
    assert_eq!(names(&first), ["cart", "web"]);
    assert_eq!(first.services[0].endpoints, ["uid-cart"]);
    assert_eq!(first.policies[0].name, "deny-all");
    assert_eq!(first.peer_authentications[0].name, "default");
    // Watches asked for bookmarks and started from the list's resourceVersion.
    server.wait_for("a pod watch", Duration::from_secs(5), |s| {
        !s.watch_versions(fake_apiserver::PODS).is_empty()
    });
    let watch = server
        .queries(fake_apiserver::PODS)
        .into_iter()
        .find(|q| q.contains_key("watch"))
        .expect("a watch");
    assert_eq!(
        watch.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );
}

#[test]
fn an_http_410_on_resuming_relists_and_a_missing_crd_is_empty() {
    use fake_apiserver::*;
    let server = FakeApiServer::start();
    baseline(&server);
    server.set_missing(PEER_AUTHENTICATIONS, true);
    server.set_http_gone(PODS, true);
    let watching = Watching::start(&server);
    let first = watching.until("the first model", |_| true);
    assert_eq!(names(&first), ["cart", "web"]);
    assert!(
        first.peer_authentications.is_empty(),
        "CRD not served: empty"
    );
    server.wait_for("a pod watch", Duration::from_secs(5), |s| {
        !s.watch_versions(PODS).is_empty()
    });
    // "web" goes while nobody watches, and the history is compacted past it; the watch is cut,
    // and resuming it gets an HTTP 410: only a relist shows "web" gone.
    server.delete_in_gap(PODS, "shop/web");
    let lists = server.lists(PODS);
    server.cut_watches(PODS);
    let after = watching.until("web gone", |c| names(c) == ["cart"]);
    assert_eq!(names(&after), ["cart"]);
    assert!(server.lists(PODS) > lists, "relisted");
}

#[test]
fn a_burst_of_events_is_one_hand_over() {
    use fake_apiserver::*;
    let server = FakeApiServer::start();
    baseline(&server);
    let watching = Watching::with(&server, |o| o.debounce = Duration::from_millis(300))
        .watching(&server, &[PODS]);
    for i in 0..20 {
        let name = format!("burst-{i}");
        let ip = format!("10.0.1.{i}");
        server.apply(
            PODS,
            objects::pod("shop", &name, &name, "node-2", &[ip.as_str()], json!({})),
        );
    }
    let after = watching.until("the burst", |c| c.workloads.len() == 22);
    assert_eq!(after.workloads.len(), 22);
    std::thread::sleep(Duration::from_millis(600));
    let mut wakes = 0;
    while watching.wake.try_recv().is_ok() {
        wakes += 1;
    }
    assert_eq!(wakes, 0, "one hand-over for the whole burst");
    assert!(watching.handoff.take().is_none());
}

#[test]
fn an_event_that_changes_nothing_the_mesh_uses_is_not_handed_over() {
    use fake_apiserver::*;
    let server = FakeApiServer::start();
    baseline(&server);
    let watching = Watching::start(&server).watching(&server, &[PODS]);
    // The kubelet reports a container restart: a new pod version, the same workload.
    let mut restarted = baseline_cart();
    restarted["status"]["containerStatuses"] = json!([{"name": "app", "restartCount": 3, "ready": true, "image": "app", "imageID": "", "started": true, "state": {"running": {}}, "lastState": {}}]);
    server.apply(PODS, restarted);
    // Many debounce periods (50 ms) later, nothing was handed over or woken for it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(watching.wake.try_recv().is_err(), "no wake for the restart");
    assert!(
        watching.handoff.take().is_none(),
        "no model for the restart"
    );
    // The watch is still live: a change that matters arrives.
    server.apply(
        PODS,
        objects::pod("shop", "new", "uid-new", "node-2", &["10.0.0.9"], json!({})),
    );
    let after = watching.until("the new pod", |c| workload(c, "new").is_some());
    assert_eq!(after.workloads.len(), 3);
}

#[test]
fn a_change_made_during_a_relist_that_finds_everything_as_it_was_is_still_handed_over() {
    use fake_apiserver::*;
    let server = FakeApiServer::start();
    baseline(&server);
    let watching = Watching::start(&server).watching(&server, &[PODS, SERVICES]);
    // The pods' watch expires and their relist is slow; the world waits for it.
    server.set_list_delay(PODS, Duration::from_millis(1500));
    let lists = server.lists(PODS);
    server.expire_watches(PODS);
    server.wait_for("the pod relist", Duration::from_secs(5), |s| {
        s.lists(PODS) > lists
    });
    // Meanwhile a service comes: not handed over while the pods relist, but not lost when
    // the relist then finds every pod as it was.
    server.apply(
        SERVICES,
        objects::service(
            "shop",
            "late",
            &["10.96.0.77"],
            &[("http", 80, json!(8080))],
        ),
    );
    let after = watching.until("the service", |c| {
        c.services.iter().any(|s| s.name == "late")
    });
    assert_eq!(names(&after), ["cart", "web"]);
}

#[test]
fn a_malformed_object_is_skipped_in_a_list_and_in_a_watch_and_the_watch_goes_on() {
    use fake_apiserver::*;
    let server = FakeApiServer::start();
    baseline(&server);
    let mut bad = objects::pod(
        "shop",
        "bad",
        "uid-bad",
        "node-1",
        &["10.0.0.66"],
        json!({}),
    );
    bad["spec"] = json!("not a pod spec");
    server.apply(PODS, bad.clone());
    let watching = Watching::start(&server);
    let first = watching.until("the first model", |_| true);
    assert_eq!(
        names(&first),
        ["cart", "web"],
        "the bad pod is left out of the list"
    );
    server.wait_for("a pod watch", Duration::from_secs(5), |s| {
        !s.watch_versions(PODS).is_empty()
    });
    let mut bad_service =
        objects::service("shop", "bad", &["10.96.0.66"], &[("http", 80, json!(80))]);
    bad_service["spec"]["ports"] = json!("eighty");
    server.apply(SERVICES, bad_service);
    server.apply(PODS, bad);
    server.apply(
        PODS,
        objects::pod(
            "shop",
            "next",
            "uid-next",
            "node-1",
            &["10.0.0.7"],
            json!({}),
        ),
    );
    let later = watching.until("the next pod", |c| names(c).contains(&"next"));
    assert_eq!(names(&later), ["cart", "next", "web"]);
    assert_eq!(later.services.len(), 1);
    assert_eq!(server.lists(PODS), 1, "skipped, not relisted");
}

/// A security policy that does not read fails closed: leaving out a DENY would open what it
/// denied, and leaving out an ALLOW would open its workloads to everyone. Checked the way a
/// user would see it: the data plane's index, built from the translated snapshot, decides.
#[test]
fn unreadable_security_policies_fail_closed_on_their_scope() {
    use mesh_core::authz::{Connection, Mtls};
    use mesh_core::identity::SpiffeId;
    use mesh_core::index::{Generation, Index};

    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    let pod = |ns: &str, name: &str, node: &str, ip: &str, app: &str| {
        objects::pod(
            ns,
            name,
            &format!("uid-{name}"),
            node,
            &[ip],
            json!({"app": app}),
        )
    };
    let cluster = Cluster {
        namespaces: vec![
            objects::namespace("shop", ambient.clone()),
            objects::namespace("pay", ambient),
        ],
        pods: vec![
            pod("shop", "cart", "node-1", "10.0.0.7", "cart"),
            pod("shop", "front", "node-2", "10.0.0.8", "front"),
            pod("pay", "till", "node-1", "10.0.1.7", "till"),
            pod("pay", "ledger", "node-1", "10.0.1.8", "ledger"),
        ],
        policies: vec![
            objects::authorization_policy(
                "shop",
                "allow-front",
                json!({
                    "selector": {"matchLabels": {"app": "cart"}},
                    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/front-sa"]}}]}],
                }),
            ),
            // Would deny front on port 8080 only, had its port read: denies all of cart.
            objects::authorization_policy(
                "shop",
                "deny-broken",
                json!({
                    "selector": {"matchLabels": {"app": "cart"}},
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"ports": ["http"]}}]}],
                }),
            ),
            // An ALLOW that does not read allows nothing on till; ledger has no policy.
            objects::authorization_policy(
                "pay",
                "allow-broken",
                json!({"selector": {"matchLabels": {"app": "till"}}, "rules": [{"frm": []}]}),
            ),
            objects::authorization_policy(
                "pay",
                "audit-broken",
                json!({"action": "AUDIT", "rules": [{"frm": []}]}),
            ),
        ],
        // Needs a selector for its port override: does not read, so shop is STRICT.
        peer_authentications: vec![objects::peer_authentication(
            "shop",
            "broken",
            json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"80": {"mode": "DISABLE"}}}),
        )],
        ..Cluster::default()
    };
    let m = cluster.model();
    let problems = m.problems.join("\n");
    for expected in [
        "AuthorizationPolicy shop/deny-broken: spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port number; enforced as deny-all on its scope (fail closed)",
        "AuthorizationPolicy pay/allow-broken: spec.rules[0].frm",
        "enforced as allow-nothing on its scope (fail closed)",
        "AuthorizationPolicy pay/audit-broken: spec.rules[0].frm",
        "left out (AUDIT only logs)",
        "PeerAuthentication shop/broken: spec.portLevelMtls: needs a workload selector (as in Istio); enforced as STRICT on its scope (fail closed)",
    ] {
        assert!(problems.contains(expected), "{expected:?} not in\n{problems}");
    }
    assert_eq!(m.problems.len(), 4, "{problems}");

    let enrolled: HashMap<(String, String), Vec<IpAddr>> = [
        ("shop", "cart", "10.0.0.7"),
        ("pay", "till", "10.0.1.7"),
        ("pay", "ledger", "10.0.1.8"),
    ]
    .into_iter()
    .map(|(ns, name, a)| ((ns.to_owned(), name.to_owned()), vec![ip(a)]))
    .collect();
    let snapshot = crate::translate::snapshot(
        &m.config,
        "node-1",
        &enrolled,
        Vec::new(),
        Vec::new(),
        "kube".into(),
    );
    let index = Index::build(snapshot, Generation::default()).expect("the snapshot indexes");
    let from_front = |to: &str| Connection {
        source: Some(SpiffeId::new("cluster.local", "shop", "front-sa").expect("id")),
        source_ip: ip("10.0.0.8"),
        destination_ip: ip(to),
        destination_port: 8080,
    };
    let cart = index.authorize("uid-cart", &from_front("10.0.0.7"));
    assert!(
        !cart.allowed,
        "allow-front alone would allow; the broken DENY must deny"
    );
    assert_eq!(
        index.policies().describe(&cart.reason),
        "denied by shop/deny-broken"
    );
    assert!(!index.authorize("uid-till", &from_front("10.0.1.7")).allowed);
    assert!(
        index
            .authorize("uid-ledger", &from_front("10.0.1.8"))
            .allowed
    );
    assert_eq!(index.inbound_mtls("uid-cart", 80), Mtls::Strict);
    assert_eq!(index.inbound_mtls("uid-ledger", 80), Mtls::Permissive);
}

/// The index of a model, with the pods of this node enrolled (they are given addresses).
fn index_of(config: &FileConfig, enrolled: &[(&str, &str, &str)]) -> mesh_core::index::Index {
    use mesh_core::index::{Generation, Index};
    let enrolled: HashMap<(String, String), Vec<IpAddr>> = enrolled
        .iter()
        .map(|(ns, name, a)| ((ns.to_string(), name.to_string()), vec![ip(a)]))
        .collect();
    let snapshot = crate::translate::snapshot(
        config,
        "node-1",
        &enrolled,
        Vec::new(),
        Vec::new(),
        "kube".into(),
    );
    Index::build(snapshot, Generation::default()).expect("the snapshot indexes")
}

#[test]
fn a_when_value_that_does_not_read_fails_closed() {
    use mesh_core::authz::Connection;
    use mesh_core::identity::SpiffeId;

    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    let cluster = Cluster {
        namespaces: vec![objects::namespace("pay", ambient)],
        pods: vec![objects::pod(
            "pay",
            "till",
            "uid-till",
            "node-1",
            &["10.0.1.7"],
            json!({"app": "till"}),
        )],
        policies: vec![objects::authorization_policy(
            "pay",
            "allow-office",
            json!({
                "selector": {"matchLabels": {"app": "till"}},
                "rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.0/33"]}]}],
            }),
        )],
        ..Cluster::default()
    };
    let m = cluster.model();
    assert_eq!(
        m.problems,
        ["AuthorizationPolicy pay/allow-office: spec.rules[0].when[0].values[0]: \"10.0.0.0/33\" \
          is not an address or CIDR block; enforced as allow-nothing on its scope (fail closed)"]
    );
    let index = index_of(&m.config, &[("pay", "till", "10.0.1.7")]);
    let from_anywhere = Connection {
        source: Some(SpiffeId::new("cluster.local", "shop", "front").expect("id")),
        source_ip: ip("10.9.9.9"),
        destination_ip: ip("10.0.1.7"),
        destination_port: 8080,
    };
    assert!(!index.authorize("uid-till", &from_anywhere).allowed);
}

#[test]
fn of_two_namespace_peer_authentications_the_older_applies_whatever_the_names() {
    use mesh_core::authz::Mtls;

    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    let created = |mut pa: Value, at: &str| {
        pa["metadata"]["creationTimestamp"] = at.into();
        pa
    };
    let pod = |ns: &str, name: &str, ip: &str| {
        objects::pod(ns, name, &format!("uid-{name}"), "node-1", &[ip], json!({}))
    };
    let cluster = Cluster {
        namespaces: vec![
            objects::namespace("pay", ambient.clone()),
            objects::namespace("shop", ambient),
        ],
        pods: vec![
            pod("pay", "till", "10.0.1.7"),
            pod("shop", "cart", "10.0.0.7"),
        ],
        peer_authentications: vec![
            // The older one is named after the newer one in both namespaces.
            created(
                objects::peer_authentication("pay", "strict", json!({"mtls": {"mode": "STRICT"}})),
                "2026-10-01T08:00:00Z",
            ),
            created(
                objects::peer_authentication(
                    "pay",
                    "debug-permissive",
                    json!({"mtls": {"mode": "PERMISSIVE"}}),
                ),
                "2026-11-02T09:30:00Z",
            ),
            created(
                objects::peer_authentication(
                    "shop",
                    "permissive",
                    json!({"mtls": {"mode": "PERMISSIVE"}}),
                ),
                "2026-10-01T08:00:00Z",
            ),
            created(
                objects::peer_authentication("shop", "lock", json!({"mtls": {"mode": "STRICT"}})),
                "2026-10-01T08:00:01Z",
            ),
        ],
        ..Cluster::default()
    };
    let m = cluster.model();
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let index = index_of(
        &m.config,
        &[("pay", "till", "10.0.1.7"), ("shop", "cart", "10.0.0.7")],
    );
    assert_eq!(index.inbound_mtls("uid-till", 80), Mtls::Strict);
    assert_eq!(index.inbound_mtls("uid-cart", 80), Mtls::Permissive);
}

#[test]
fn a_client_configuration_that_cannot_be_used_fails_the_start_with_the_reason() {
    let mut client = kube::Config::new("https://10.0.0.1:443".parse().expect("url"));
    client.root_cert = Some(vec![b"not a certificate".to_vec()]);
    let (tx, _wake) = mpsc::channel();
    let (_, no_redirections) = tokio::sync::mpsc::unbounded_channel();
    let error = start(
        KubeOptions::new(client, options()),
        Arc::new(Handoff::default()),
        tx,
        no_redirections,
        Default::default(),
    )
    .expect_err("a root certificate that does not parse");
    assert!(
        error
            .to_string()
            .starts_with("cannot build the Kubernetes client: "),
        "{error}"
    );
}

/// The Helm chart's ClusterRole lets the agent get, list and watch every kind it watches: a
/// kind it may not list (403) stays unlisted, and then nothing is published at all.
#[test]
fn the_chart_lets_the_agent_list_and_watch_every_kind_it_watches() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/mesh-dataplane/templates/rbac.yaml"
    );
    let template = std::fs::read_to_string(path).expect("the chart's rbac.yaml");
    // The template's `{{ }}` lines are metadata; the rules are plain YAML.
    let yaml: String = template
        .lines()
        .filter(|l| !l.contains("{{"))
        .map(|l| format!("{l}\n"))
        .collect();
    let documents: Vec<Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| Value::deserialize(doc).expect("YAML"))
        .collect();
    let allows = |role_kind: &str, group: &str, plural: &str, verb: &str| {
        let role = documents
            .iter()
            .find(|doc| doc["kind"] == role_kind)
            .unwrap_or_else(|| panic!("a {role_kind}"));
        role["rules"].as_array().expect("rules").iter().any(|rule| {
            let has = |field: &str, wanted: &str| {
                rule[field]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x == wanted))
            };
            has("apiGroups", group) && has("resources", plural) && has("verbs", verb)
        })
    };
    for (kind, resource) in watched() {
        for verb in ["get", "list", "watch"] {
            assert!(
                allows("ClusterRole", &resource.group, &resource.plural, verb),
                "{kind:?}: {verb} {}/{} is not in the chart's ClusterRole",
                resource.group,
                resource.plural
            );
        }
    }
    // At shutdown (`crate::uninstall`): its own pod and node, and its DaemonSet in its
    // namespace.
    assert!(allows("ClusterRole", "", "pods", "get"));
    assert!(allows("ClusterRole", "", "nodes", "get"));
    assert!(allows("Role", "apps", "daemonsets", "get"));
}
