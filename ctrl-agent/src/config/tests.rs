use super::*;

const GOOD: &str = r#"
trustDomain: cluster.local
workloads:
  - uid: client-1
    name: client
    serviceAccount: client
    ips: [10.0.1.2]
    node: node-1
    netns: /run/netns/client
    labels: {app: client}
  - uid: server-1
    name: server
    namespace: apps
    serviceAccount: server
    ips: [10.0.2.2, "fd00::2"]
    node: node-2
  - uid: legacy-1
    name: legacy
    ips: [10.0.2.9]
    node: node-2
    protocol: TCP
services:
  - name: server
    namespace: apps
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [server-1]
policies:
  - name: allow-client
    namespace: apps
    action: ALLOW
    selector: {matchLabels: {app: server}}
    rules:
      - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
        to: [{operation: {ports: ["8080"]}}]
  - name: deny-legacy
    namespace: apps
    action: DENY
    rules:
      - from: [{source: {serviceAccounts: [legacy, "other/robot"]}}]
peerAuthentications:
  - name: strict
    namespace: apps
    mtls: {mode: STRICT}
  - name: server-ports
    namespace: apps
    selector: {matchLabels: {app: server}}
    mtls: {mode: STRICT}
    portLevelMtls: {8081: {mode: PERMISSIVE}}
"#;

#[test]
fn a_complete_file_parses() {
    let cfg = FileConfig::parse(GOOD).expect("valid");
    assert_eq!(cfg.workloads.len(), 3);
    assert_eq!(cfg.workloads[0].namespace, "default");
    assert_eq!(cfg.workloads[2].protocol, ProtocolSpec::Tcp);
    assert_eq!(
        cfg.identity(&cfg.workloads[1]).expect("id").to_string(),
        "spiffe://cluster.local/ns/apps/sa/server"
    );
    assert_eq!(cfg.policies[0].action, ActionSpec::Allow);
    assert_eq!(cfg.peer_authentications[0].mtls.mode, MtlsModeSpec::Strict);
    assert_eq!(cfg.root_namespace, "istio-system");
    assert_eq!(
        cfg.policies[1].rules[0].from[0].source.service_accounts,
        ["legacy", "other/robot"]
    );
    assert_eq!(
        cfg.peer_authentications[1].port_level_mtls[&8081].mode,
        MtlsModeSpec::Permissive
    );
}

#[test]
fn a_waypoint_is_an_address_or_a_hostname_without_one() {
    let cfg = FileConfig::parse(
        "services:
  - {name: s, vips: [10.96.0.1], ports: [{port: 80}], waypoint: '10.96.0.20:15008'}
  - {name: t, vips: [10.96.0.2], ports: [{port: 80}], waypoint: wp.shop.svc.cluster.local}
  - {name: u, vips: [10.96.0.3], ports: [{port: 80}], waypoint: '[fd00::20]:15008'}",
    )
    .expect("valid");
    let waypoints: Vec<_> = cfg.services.iter().map(|s| s.waypoint.clone()).collect();
    assert_eq!(
        waypoints,
        [
            Some(WaypointSpec::At("10.96.0.20:15008".parse().expect("addr"))),
            Some(WaypointSpec::Unresolved("wp.shop.svc.cluster.local".into())),
            Some(WaypointSpec::At("[fd00::20]:15008".parse().expect("addr"))),
        ]
    );
}

fn error_for(yaml: &str) -> ConfigError {
    FileConfig::parse(yaml).expect_err("must be refused")
}

#[test]
fn errors_name_the_field_and_the_problem() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "workloads: [{uid: a, name: a, ips: [10.0.0.300], node: n}]",
            "workloads[0].ips[0]",
            "invalid IP address",
        ),
        (
            "workloads: [{uid: a, name: a, ips: [10.0.0.1], node: n, protocol: UDP}]",
            "workloads[0].protocol",
            "unknown variant `UDP`",
        ),
        (
            "workloads: [{uid: a, name: a, ipz: [10.0.0.1], node: n}]",
            "workloads[0].ipz",
            "unknown field `ipz`",
        ),
        (
            "workloads: [{uid: a, name: a, ips: [10.0.0.1], node: n}, {uid: a, name: b, ips: [10.0.0.2], node: n}]",
            "workloads[1].uid",
            "used by another workload",
        ),
        (
            "workloads: [{uid: a, name: a, ips: [10.0.0.1], node: n}, {uid: b, name: b, ips: [10.0.0.1], node: n}]",
            "workloads[1].ips[0]",
            "also the address of workload \"a\"",
        ),
        (
            "workloads: [{uid: a, name: a, serviceAccount: 'x/y', ips: [10.0.0.1], node: n}]",
            "workloads[0].serviceAccount",
            "service account",
        ),
        (
            "workloads: [{uid: a, name: a, ips: [10.0.0.1], node: n, netns: relative/path}]",
            "workloads[0].netns",
            "not an absolute path",
        ),
        (
            "services: [{name: s, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [ghost]}]",
            "services[0].endpoints[0]",
            "no workload has uid \"ghost\"",
        ),
        (
            "services: [{name: s, vips: [10.96.0.1], ports: [{port: 80}]}, {name: t, vips: [10.96.0.2], ports: [{port: 80}]}, {name: s, namespace: default, vips: [10.96.0.3], ports: [{port: 80}]}]",
            "services[2].name",
            "default/s is already the name of another service",
        ),
        (
            "services: [{name: s, vips: [10.96.0.1], ports: [{port: 70000}]}]",
            "services[0].ports[0].port",
            "invalid value",
        ),
        (
            "policies: [{name: p, rules: [{to: [{operation: {ports: [http]}}]}]}]",
            "policies[0].rules[0].to[0].operation.ports[0]",
            "not a port number",
        ),
        (
            "policies: [{name: p, rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]}]",
            "policies[0].rules[0].from[0].source.ipBlocks[0]",
            "not an address or CIDR",
        ),
        (
            "policies: [{name: p, rules: [{when: [{key: source.ip, values: [10.0.0.0/33]}]}]}]",
            "policies[0].rules[0].when[0].values[0]",
            "\"10.0.0.0/33\" is not an address or CIDR block",
        ),
        (
            "policies: [{name: p, rules: [{when: [{key: source.namespace, values: [a]}, {key: destination.port, values: [http]}]}]}]",
            "policies[0].rules[0].when[1].values[0]",
            "\"http\" is not a port number",
        ),
        (
            "policies: [{name: p, action: DENY, rules: [{when: [{key: destination.ip, notValues: [10.0.0.1, nope]}]}]}]",
            "policies[0].rules[0].when[0].notValues[1]",
            "\"nope\" is not an address or CIDR block",
        ),
        (
            "policies: [{name: p, rules: [{when: [{key: source.ip}]}]}]",
            "policies[0].rules[0].when[0].values",
            "needs values or notValues",
        ),
        (
            "policies: [{name: p, action: PERMIT}]",
            "policies[0].action",
            "unknown variant `PERMIT`",
        ),
        ("workloads: 7", "workloads", "invalid type"),
        (
            "workloads: [{uid: a, name: a, ips: [10.0.0.1], node: n, waypoint: 10.96.0.20}]",
            "workloads[0].waypoint",
            "\"10.96.0.20\" is neither ip:port nor a hostname",
        ),
        (
            "services: [{name: s, vips: [10.96.0.1], ports: [{port: 80}], waypoint: '10.96.0.20:0'}]",
            "services[0].waypoint",
            "port 0",
        ),
        (
            "services: [{name: s, vips: [10.96.0.1], ports: [{port: 80}], waypoint: Waypoint.shop}]",
            "services[0].waypoint",
            "is neither ip:port nor a hostname",
        ),
        (
            "peerAuthentications: [{name: p, portLevelMtls: {80: {mode: STRICT}}}]",
            "peerAuthentications[0].portLevelMtls",
            "needs a workload selector",
        ),
    ];
    for (yaml, field, problem) in cases {
        let e = error_for(yaml);
        assert_eq!(&e.field, field, "{yaml}: {e}");
        assert!(e.problem.contains(problem), "{yaml}: {e}");
    }
}

#[test]
fn when_values_of_keys_without_a_syntax_and_good_ones_are_accepted() {
    let yaml = r#"
policies:
  - name: p
    rules:
      - when:
          - {key: source.ip, values: [10.0.0.0/8, "fd00::1"]}
          - {key: destination.port, notValues: ["9000"]}
          - {key: source.namespace, values: ["*"]}
          - {key: source.principal, values: ["cluster.local/ns/a/sa/*"]}
          - {key: "request.headers[x-user]", values: [anything at all]}
"#;
    let cfg = FileConfig::parse(yaml).expect("valid");
    assert_eq!(cfg.policies[0].rules[0].when.len(), 5);
}

#[test]
fn a_file_has_no_creation_times_and_cannot_set_one() {
    let cfg =
        FileConfig::parse("peerAuthentications: [{name: p, mtls: {mode: STRICT}}]").expect("valid");
    assert_eq!(cfg.peer_authentications[0].created_unix, None);
    let e = error_for("peerAuthentications: [{name: p, createdUnix: 5}]");
    assert_eq!(e.field, "peerAuthentications[0].createdUnix", "{e}");
}
