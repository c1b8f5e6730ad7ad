//! Objects as an API server returns them (JSON), for tests to serve and benchmarks to load:
//! with the fields a real cluster fills in (managedFields, owner references, container
//! specs, volumes, conditions, container statuses), not only the ones the mesh reads, so
//! that what the agent stores of them is measured and tested on what it really receives.

use serde_json::{json, Value};

/// What the API server adds to every object's metadata.
fn served(mut object: Value, managers: Value) -> Value {
    let metadata = &mut object["metadata"];
    metadata["resourceVersion"] = "1".into();
    metadata["creationTimestamp"] = "2026-11-01T10:00:00Z".into();
    metadata["managedFields"] = managers;
    object
}

fn manager(name: &str, subresource: Option<&str>, fields: Value) -> Value {
    let mut entry = json!({
        "manager": name, "operation": "Update", "apiVersion": "v1",
        "time": "2026-11-01T10:00:01Z", "fieldsType": "FieldsV1", "fieldsV1": fields,
    });
    if let Some(subresource) = subresource {
        entry["subresource"] = subresource.into();
    }
    entry
}

pub fn namespace(name: &str, labels: Value) -> Value {
    served(
        json!({
            "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }),
        json!([manager(
            "kubectl-create",
            None,
            json!({"f:metadata": {"f:labels": {}}})
        )]),
    )
}

/// A running pod of a Deployment with its addresses (dual-stack when given two).
pub fn pod(ns: &str, name: &str, uid: &str, node: &str, ips: &[&str], labels: Value) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let condition = |kind: &str| {
        json!({"type": kind, "status": "True", "lastProbeTime": null,
               "lastTransitionTime": "2026-11-01T10:00:04Z"})
    };
    let conditions = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .map(condition);
    let image = "registry.example/shop/app:1.4.2";
    served(
        json!({
            "metadata": {
                "name": name, "namespace": ns, "uid": uid, "labels": labels,
                "generateName": format!("{name}-"),
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-01T09:59:00Z"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"),
                    "uid": format!("rs-{uid}"), "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": format!("{name}-sa"),
                "serviceAccount": format!("{name}-sa"),
                "containers": [{
                    "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [
                        {"name": "LOG_LEVEL", "value": "info"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                    ],
                    "resources": {"limits": {"cpu": "500m", "memory": "256Mi"},
                                  "requests": {"cpu": "100m", "memory": "128Mi"}},
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                        "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3,
                    },
                    "volumeMounts": [{"name": "kube-api-access", "readOnly": true,
                                      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                }],
                "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ]}}],
                "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
                "securityContext": {}, "enableServiceLinks": true, "priority": 0,
                "preemptionPolicy": "PreemptLowerPriority",
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                ],
            },
            "status": {
                "phase": if ips.is_empty() { "Pending" } else { "Running" },
                "podIP": ips.first().copied().unwrap_or_default(),
                "podIPs": pod_ips,
                "hostIP": "192.168.0.10", "hostIPs": [{"ip": "192.168.0.10"}],
                "qosClass": "Burstable", "startTime": "2026-11-01T10:00:02Z",
                "conditions": conditions,
                "containerStatuses": [{
                    "name": "app", "image": image, "ready": true, "started": true, "restartCount": 0,
                    "imageID": format!("{image}@sha256:9f2c4e1b7d3a8c6e5f0b1a2d3c4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a"),
                    "containerID": format!("containerd://{uid}-app"),
                    "state": {"running": {"startedAt": "2026-11-01T10:00:03Z"}}, "lastState": {},
                }],
            },
        }),
        json!([
            manager(
                "kube-controller-manager",
                None,
                json!({
                    "f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}},
                                   "f:ownerReferences": {".": {}, "k:{\"uid\":\"rs\"}": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {
                        ".": {}, "f:env": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                        "f:ports": {}, "f:readinessProbe": {}, "f:resources": {}}},
                        "f:dnsPolicy": {}, "f:restartPolicy": {}, "f:serviceAccountName": {}},
                })
            ),
            manager(
                "kubelet",
                Some("status"),
                json!({
                    "f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {},
                                 "f:hostIPs": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {},
                                 "f:startTime": {}},
                })
            ),
        ]),
    )
}

/// A ClusterIP service; `ports` are (name, port, targetPort).
pub fn service(ns: &str, name: &str, ips: &[&str], ports: &[(&str, i32, Value)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, port, target)| json!({"name": n, "port": port, "targetPort": target, "protocol": "TCP"}))
        .collect();
    served(
        json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("svc-{name}"),
                         "labels": {"app": name}},
            "spec": {"clusterIP": ips[0], "clusterIPs": ips, "ports": ports, "type": "ClusterIP",
                     "selector": {"app": name}, "sessionAffinity": "None",
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "internalTrafficPolicy": "Cluster"},
            "status": {"loadBalancer": {}},
        }),
        json!([manager(
            "kubectl-client-side-apply",
            None,
            json!({
                "f:spec": {"f:ports": {}, "f:selector": {}, "f:type": {}},
            })
        )]),
    )
}

/// An EndpointSlice of `service`; `endpoints` are (pod uid, address, ready), `ports`
/// (name, port).
pub fn endpoint_slice(
    ns: &str,
    service: &str,
    endpoints: &[(&str, &str, bool)],
    ports: &[(&str, i32)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(uid, ip, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": "node-2",
                "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("pod-{uid}"), "uid": uid},
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    served(
        json!({
            "metadata": {
                "name": format!("{service}-abcde"),
                "namespace": ns,
                "generateName": format!("{service}-"),
                "labels": {"kubernetes.io/service-name": service,
                           "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-01T10:00:05Z"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                     "uid": format!("svc-{service}"), "controller": true,
                                     "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }),
        json!([manager(
            "kube-controller-manager",
            None,
            json!({
                "f:addressType": {}, "f:endpoints": {}, "f:ports": {},
            })
        )]),
    )
}

fn istio(ns: &str, name: &str, uid: String, spec: Value) -> Value {
    let mut object = json!({"metadata": {"name": name, "namespace": ns, "uid": uid, "generation": 1},
                            "spec": spec});
    let applied = object.to_string();
    object["metadata"]["annotations"] =
        json!({"kubectl.kubernetes.io/last-applied-configuration": applied});
    served(
        object,
        json!([manager(
            "kubectl-client-side-apply",
            None,
            json!({"f:spec": {}})
        )]),
    )
}

pub fn authorization_policy(ns: &str, name: &str, spec: Value) -> Value {
    istio(ns, name, format!("ap-{name}"), spec)
}

pub fn peer_authentication(ns: &str, name: &str, spec: Value) -> Value {
    istio(ns, name, format!("pa-{name}"), spec)
}

/// A waypoint's Gateway as `istioctl waypoint apply` makes it, with its labels, and the
/// status Istio writes once the waypoint has a ready pod: its Service's hostname (`address`
/// `None`: not ready yet) and the conditions (not read by the mesh).
pub fn waypoint_gateway(ns: &str, name: &str, labels: Value, address: Option<Value>) -> Value {
    let mut gateway = served(
        json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("gw-{ns}-{name}"),
                         "generation": 1, "labels": labels},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
            "status": {"conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted",
                 "observedGeneration": 1, "lastTransitionTime": "2026-11-01T10:00:02Z",
                 "message": "Resource accepted"},
                {"type": "Programmed", "status": if address.is_some() { "True" } else { "False" },
                 "reason": "Programmed", "observedGeneration": 1,
                 "lastTransitionTime": "2026-11-01T10:00:05Z", "message": "Resource programmed"},
            ]},
        }),
        json!([manager(
            "istioctl",
            None,
            json!({"f:spec": {"f:gatewayClassName": {}}})
        )]),
    );
    if let Some(address) = address {
        gateway["status"]["addresses"] = json!([address]);
    }
    gateway
}

/// `{type: Hostname, value: <name>.<ns>.svc.cluster.local}`, as Istio writes a waypoint's.
pub fn hostname_address(ns: &str, service: &str) -> Value {
    json!({"type": "Hostname", "value": format!("{service}.{ns}.svc.cluster.local")})
}

/// A GatewayClass (cluster-scoped), as Istio installs `istio-waypoint`.
pub fn gateway_class(name: &str, labels: Value) -> Value {
    served(
        json!({
            "metadata": {"name": name, "uid": format!("gc-{name}"), "labels": labels},
            "spec": {"controllerName": "istio.io/mesh-controller",
                     "description": "The default Istio waypoint GatewayClass"},
            "status": {"conditions": [{"type": "Accepted", "status": "True"}]},
        }),
        json!([manager("pilot-discovery", None, json!({"f:spec": {}}))]),
    )
}

/// The mesh's own release namespace, and the name of the DaemonSet pod that runs the agent
/// (and the CNI installer) on this node.
pub const MESH_NAMESPACE: &str = "mesh-system";
pub const MESH_POD: &str = "mesh-dataplane-x7k2p";

/// The mesh's pod on this node, controlled by DaemonSet `mesh-dataplane` when `owned`.
pub fn mesh_pod(owned: bool) -> Value {
    let owners = if owned {
        json!([
            {"apiVersion": "apps/v1", "kind": "ControllerRevision", "name": "rev",
             "uid": "uid-rev", "controller": false},
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "mesh-dataplane",
             "uid": "uid-ds", "controller": true, "blockOwnerDeletion": true},
        ])
    } else {
        json!([])
    };
    json!({
        "metadata": {"name": MESH_POD, "namespace": MESH_NAMESPACE, "uid": "uid-mesh-pod",
                     "resourceVersion": "1", "ownerReferences": owners},
        "spec": {"nodeName": MESH_NODE, "containers": [{"name": "ctrl-agent", "image": "mesh"}]},
    })
}

/// The node the mesh's pod runs on.
pub const MESH_NODE: &str = "node-1";

pub fn node(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1",
                        "labels": labels}})
}

/// DaemonSet `mesh-dataplane`, keeping both kinds of node rules; `deleting`: a deletion
/// timestamp, as a foreground deletion leaves it while its pods go (`helm uninstall` deletes
/// in the background: the DaemonSet is simply gone). Its pods go to nodes labelled
/// `pool: mesh`.
pub fn mesh_daemon_set(deleting: bool) -> Value {
    let mut ds = json!({
        "metadata": {"name": "mesh-dataplane", "namespace": MESH_NAMESPACE, "uid": "uid-ds",
                     "resourceVersion": "1",
                     "annotations": {"mesh-dataplane.dev/node-rules": "cni-chain,host-probe-table"}},
        "spec": {"selector": {"matchLabels": {"app": "mesh"}},
                 "template": {"metadata": {"labels": {"app": "mesh"}},
                              "spec": {"nodeSelector": {"pool": "mesh"},
                                       "containers": [{"name": "ctrl-agent", "image": "mesh"}]}}},
    });
    if deleting {
        ds["metadata"]["deletionTimestamp"] = "2026-12-03T10:00:00Z".into();
        ds["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    }
    ds
}
