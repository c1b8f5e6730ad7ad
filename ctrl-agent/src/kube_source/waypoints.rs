//! Waypoints as istiod knows them: Gateway API Gateways (pilot's ambient `waypoints.go`).
//!
//! `istio.io/use-waypoint: <name>` names a Gateway. It is a waypoint once its status has an
//! address (Istio writes one when the waypoint's deployment first has a ready pod); until
//! then it is no waypoint, and traffic goes direct. Its address is a Service's hostname
//! (preferred, as istiod) or an IP address. The traffic it takes is `istio.io/waypoint-for`
//! on the Gateway, else on its GatewayClass, else `service`. Which namespaces may use it is
//! its HBONE listener's (port 15008) `allowedRoutes.namespaces`: `Same` when unset or when
//! it has no such listener.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::DynamicObject;
use kube::ResourceExt;
use serde::Deserialize;

use super::world::World;

/// Istio's label on a waypoint's Gateway or GatewayClass saying which traffic it takes:
/// `service` (the default), `workload`, `all` or `none`.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The listener istiod reads a waypoint's `allowedRoutes` from.
const HBONE_LISTENER: (&str, u32) = ("HBONE", 15008);

/// The traffic a waypoint may take: addressed to a service's VIP, or to a pod's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressed {
    ToService,
    ToWorkload,
}

/// A Gateway that is a waypoint.
#[derive(Debug)]
pub struct Waypoint {
    pub address: WaypointAddress,
    /// What `istio.io/waypoint-for` (from the Gateway or its class, `service` if neither
    /// says) lets it take: traffic to services' VIPs, to pods' own addresses.
    takes_services: bool,
    takes_workloads: bool,
    attach: Attachment,
}

#[derive(Debug, PartialEq, Eq)]
pub enum WaypointAddress {
    /// A Service's hostname (`<name>.<namespace>.svc.<cluster domain>`).
    Hostname(String),
    Ip(IpAddr),
    /// Only addresses of other types: a waypoint, but nowhere to send to.
    Unusable,
}

/// Which namespaces' objects may use a waypoint.
#[derive(Debug)]
enum Attachment {
    Same,
    All,
    /// Namespaces whose labels the selector matches; none without a selector.
    Selector(Option<LabelSelector>),
}

/// The Gateway's fields read here (the store keeps these only: `world::Kind::reads`).
#[derive(Debug, Default, Deserialize)]
struct GatewayBody {
    #[serde(default)]
    spec: GatewaySpecBody,
    #[serde(default)]
    status: GatewayStatusBody,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewaySpecBody {
    #[serde(default)]
    gateway_class_name: String,
    #[serde(default)]
    listeners: Vec<ListenerBody>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListenerBody {
    port: u32,
    protocol: String,
    allowed_routes: Option<AllowedRoutesBody>,
}

#[derive(Debug, Deserialize)]
struct AllowedRoutesBody {
    namespaces: Option<RouteNamespacesBody>,
}

#[derive(Debug, Deserialize)]
struct RouteNamespacesBody {
    from: Option<String>,
    selector: Option<LabelSelector>,
}

#[derive(Debug, Default, Deserialize)]
struct GatewayStatusBody {
    #[serde(default)]
    addresses: Vec<GatewayAddressBody>,
}

#[derive(Debug, Deserialize)]
struct GatewayAddressBody {
    /// The Gateway API's default when unset.
    #[serde(rename = "type", default = "ip_address_type")]
    address_type: String,
    value: String,
}

fn ip_address_type() -> String {
    "IPAddress".into()
}

/// The waypoints of a world by `namespace/name`, and a problem line for each Gateway that
/// could not be read.
pub fn index(world: &World) -> (HashMap<String, Waypoint>, Vec<String>) {
    let mut waypoints = HashMap::new();
    let mut problems = Vec::new();
    for (key, gateway) in world.gateways.entries() {
        match waypoint(gateway, world) {
            Ok(Some(waypoint)) => {
                waypoints.insert(key.to_owned(), waypoint);
            }
            Ok(None) => {}
            Err(problem) => {
                problems.push(format!("gateway {key}: {problem}; not used as a waypoint"))
            }
        }
    }
    (waypoints, problems)
}

/// The waypoint a Gateway is, if it is one yet.
fn waypoint(gateway: &DynamicObject, world: &World) -> Result<Option<Waypoint>, String> {
    let body: GatewayBody = serde_path_to_error::deserialize(&gateway.data)
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    if body.status.addresses.is_empty() {
        return Ok(None);
    }
    let addresses = &body.status.addresses;
    // An empty hostname (which the CRD's schema forbids) is no address at all.
    let hostname = addresses
        .iter()
        .find(|a| a.address_type == "Hostname" && !a.value.is_empty());
    let address = match hostname {
        Some(hostname) => WaypointAddress::Hostname(hostname.value.clone()),
        None => addresses
            .iter()
            .filter(|a| a.address_type == "IPAddress")
            .find_map(|a| a.value.parse().ok())
            .map_or(WaypointAddress::Unusable, WaypointAddress::Ip),
    };
    let class_labels = world
        .gateway_classes
        .get_key(&body.spec.gateway_class_name)
        .map(|class| class.labels());
    let takes = gateway
        .labels()
        .get(WAYPOINT_FOR_LABEL)
        .or_else(|| class_labels?.get(WAYPOINT_FOR_LABEL))
        .map_or("service", String::as_str);
    let routes = body
        .spec
        .listeners
        .iter()
        .find(|l| (l.protocol.as_str(), l.port) == HBONE_LISTENER)
        .and_then(|l| l.allowed_routes.as_ref()?.namespaces.as_ref());
    let attach = match routes.map(|r| (r.from.as_deref(), &r.selector)) {
        Some((Some("All"), _)) => Attachment::All,
        Some((Some("Selector"), selector)) => Attachment::Selector(selector.clone()),
        _ => Attachment::Same,
    };
    Ok(Some(Waypoint {
        address,
        takes_services: matches!(takes, "service" | "all"),
        takes_workloads: matches!(takes, "workload" | "all"),
        attach,
    }))
}

impl Waypoint {
    /// Whether it takes `traffic`.
    pub fn takes(&self, traffic: Addressed) -> bool {
        match traffic {
            Addressed::ToService => self.takes_services,
            Addressed::ToWorkload => self.takes_workloads,
        }
    }

    /// Whether objects of `namespace` (with these labels) may use it.
    pub fn allows(
        &self,
        own_namespace: &str,
        namespace: &str,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        match &self.attach {
            Attachment::Same => own_namespace == namespace,
            Attachment::All => true,
            Attachment::Selector(None) => false,
            Attachment::Selector(Some(selector)) => {
                selects(selector, namespace_labels.unwrap_or(&BTreeMap::new()))
            }
        }
    }
}

/// The Service a waypoint's hostname names: `(namespace, name)` of
/// `<name>.<namespace>.svc.<cluster domain>`.
pub fn service_of_hostname(hostname: &str) -> Option<(&str, &str)> {
    let mut parts = hostname.splitn(4, '.');
    let (name, namespace) = (parts.next()?, parts.next()?);
    (parts.next()? == "svc" && !parts.next()?.is_empty()).then_some((namespace, name))
}

/// Kubernetes label selector semantics: every `matchLabels` entry and every expression must
/// hold; an empty selector selects everything. An operator Kubernetes does not define
/// selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let listed = |v: &String| e.values.iter().flatten().any(|x| x == v);
        match e.operator.as_str() {
            "In" => value.is_some_and(listed),
            "NotIn" => !value.is_some_and(listed),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(value: serde_json::Value) -> LabelSelector {
        serde_json::from_value(value).expect("a selector")
    }

    #[test]
    fn label_selectors_select_as_kubernetes_does() {
        let shop = labels(&[("team", "shop"), ("tier", "web")]);
        let cases = [
            (json!({}), true),
            (json!({"matchLabels": {"team": "shop"}}), true),
            (json!({"matchLabels": {"team": "web"}}), false),
            (
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "db"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["web"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "team", "operator": "Exists"}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "team", "operator": "Gt", "values": ["1"]}]}),
                false,
            ),
            (
                json!({"matchLabels": {"team": "shop"},
                       "matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]}),
                false,
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(
                selects(&selector(value.clone()), &shop),
                expected,
                "{value}"
            );
        }
    }

    #[test]
    fn a_service_hostname_names_its_namespace_and_service() {
        assert_eq!(
            service_of_hostname("wp.shop.svc.cluster.local"),
            Some(("shop", "wp"))
        );
        assert_eq!(
            service_of_hostname("wp.shop.svc.corp.example"),
            Some(("shop", "wp"))
        );
        for other in ["wp.shop.svc", "wp.shop.svc.", "wp.example.com", "wp", ""] {
            assert_eq!(service_of_hostname(other), None, "{other}");
        }
    }
}
