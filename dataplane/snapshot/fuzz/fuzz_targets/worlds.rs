//! The pieces of the small worlds the index targets start from (one module for all of them).

use mesh_snapshot::schema::{Protocol, Service, ServicePort, Workload};

/// A workload at 10.0.0.`last` on `node`; on node `n1` it is local (it has a netns path).
pub fn workload(uid: &str, last: u8, node: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: uid.into(),
        trust_domain: "cluster.local".into(),
        ips: vec![vec![10, 0, 0, last]],
        node: node.into(),
        protocol: Protocol::Hbone as i32,
        netns_path: if node == "n1" {
            "/run/netns/a".into()
        } else {
            String::new()
        },
        ..Default::default()
    }
}

/// Service `default/s` at 10.96.0.1:80 (to 8080), listing `endpoints` by uid.
pub fn service(endpoints: &[&str]) -> Service {
    Service {
        name: "s".into(),
        namespace: "default".into(),
        vips: vec![vec![10, 96, 0, 1]],
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
        }],
        endpoints: endpoints.iter().map(|&uid| uid.into()).collect(),
        ..Default::default()
    }
}
