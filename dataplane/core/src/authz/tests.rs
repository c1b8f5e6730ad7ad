//! Cases from Istio's AuthorizationPolicy reference and ambient L4 docs, one row each:
//! policy set, source, destination, expected decision.

use std::collections::BTreeMap;

use mesh_snapshot::schema::{
    Action, AuthorizationPolicy, Condition, MtlsMode, PeerAuthentication, Rule, RuleOperation,
    RuleSource,
};

use super::*;

const ROOT: &str = "istio-system";

fn policy(ns: &str, name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: name.into(),
        namespace: ns.into(),
        action: action as i32,
        rules,
        ..Default::default()
    }
}

fn selected(mut p: AuthorizationPolicy, labels: &[(&str, &str)]) -> AuthorizationPolicy {
    p.selector = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    p
}

fn dry(mut p: AuthorizationPolicy) -> AuthorizationPolicy {
    p.dry_run = true;
    p
}

fn from(source: RuleSource) -> Rule {
    Rule {
        from: vec![source],
        ..Default::default()
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn principals(p: &[&str]) -> RuleSource {
    RuleSource {
        principals: s(p),
        ..Default::default()
    }
}

fn to_ports(p: &[&str]) -> RuleOperation {
    RuleOperation {
        ports: s(p),
        ..Default::default()
    }
}

/// A source: SPIFFE identity (or plaintext) and address.
struct Src(Option<&'static str>, &'static str);

const SLEEP: Src = Src(
    Some("spiffe://cluster.local/ns/default/sa/sleep"),
    "10.0.1.5",
);
const OTHER: Src = Src(
    Some("spiffe://cluster.local/ns/other/sa/client"),
    "10.0.2.9",
);
const FOO_BAR: Src = Src(Some("spiffe://cluster.local/ns/foo/sa/bar"), "10.0.3.3");
const PLAIN: Src = Src(None, "10.0.9.9");

/// The destination workload: namespace, labels, port.
struct Dst(&'static str, &'static [(&'static str, &'static str)], u16);

const HTTPBIN: Dst = Dst("default", &[("app", "httpbin")], 8000);
const HTTPBIN_9000: Dst = Dst("default", &[("app", "httpbin")], 9000);
const OTHER_APP: Dst = Dst("default", &[("app", "other")], 8000);
const IN_TEST: Dst = Dst("test", &[("app", "httpbin")], 8000);

fn decide(policies: &[AuthorizationPolicy], src: &Src, dst: &Dst) -> (Decision, Policies) {
    let compiled = Policies::build(policies, ROOT);
    let labels: BTreeMap<String, String> = dst
        .1
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let applicable = compiled.applicable(dst.0, &labels);
    let decision = compiled.evaluate(
        &applicable,
        &Connection {
            source: src.0.map(|id| id.parse().expect("test id")),
            source_ip: src.1.parse().expect("ip"),
            destination_ip: "10.0.0.10".parse().expect("ip"),
            destination_port: dst.2,
        },
    );
    (decision, compiled)
}

/// name, policies, source, destination, allowed, reason
/// A reason with the policy named, as the table writes it.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    NoPolicy,
    Allowed(String),
    Denied(String),
    NotAllowed,
}

fn named(policies: &Policies, reason: &Reason) -> Named {
    match reason {
        Reason::NoPolicy => Named::NoPolicy,
        Reason::Allowed(p) => Named::Allowed(policies.name(*p).to_owned()),
        Reason::Denied(p) => Named::Denied(policies.name(*p).to_owned()),
        Reason::NotAllowed => Named::NotAllowed,
    }
}

type Case = (
    &'static str,
    Vec<AuthorizationPolicy>,
    Src,
    Dst,
    bool,
    Named,
);

#[test]
fn istio_examples() {
    use Action::{Allow, Audit, Deny};
    let allow_sleep = selected(
        policy(
            "default",
            "allow-sleep",
            Allow,
            vec![from(principals(&["cluster.local/ns/default/sa/sleep"]))],
        ),
        &[("app", "httpbin")],
    );
    let cases: Vec<Case> = vec![
        (
            "no policy: allowed",
            vec![],
            SLEEP,
            HTTPBIN,
            true,
            Named::NoPolicy,
        ),
        (
            "allow-nothing (no rules) denies everything in the namespace",
            vec![policy("default", "allow-nothing", Allow, vec![])],
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "allow-all (one empty rule)",
            vec![policy("default", "allow-all", Allow, vec![Rule::default()])],
            OTHER,
            HTTPBIN,
            true,
            Named::Allowed("default/allow-all".into()),
        ),
        (
            "deny-all (one empty rule)",
            vec![policy("default", "deny-all", Deny, vec![Rule::default()])],
            SLEEP,
            HTTPBIN,
            false,
            Named::Denied("default/deny-all".into()),
        ),
        (
            "ALLOW by principal admits that principal",
            vec![allow_sleep.clone()],
            SLEEP,
            HTTPBIN,
            true,
            Named::Allowed("default/allow-sleep".into()),
        ),
        (
            "ALLOW by principal refuses another",
            vec![allow_sleep.clone()],
            OTHER,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "ALLOW by principal refuses plaintext",
            vec![allow_sleep.clone()],
            PLAIN,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "a selector policy does not apply to other workloads",
            vec![allow_sleep.clone()],
            OTHER,
            OTHER_APP,
            true,
            Named::NoPolicy,
        ),
        (
            "a namespace policy does not apply to other namespaces",
            vec![policy("default", "deny-all", Deny, vec![Rule::default()])],
            SLEEP,
            IN_TEST,
            true,
            Named::NoPolicy,
        ),
        (
            "a root-namespace policy applies mesh-wide",
            vec![policy(
                ROOT,
                "global-deny",
                Deny,
                vec![from(RuleSource {
                    namespaces: s(&["other"]),
                    ..Default::default()
                })],
            )],
            OTHER,
            IN_TEST,
            false,
            Named::Denied("istio-system/global-deny".into()),
        ),
        (
            "a root-namespace selector policy applies in every namespace",
            vec![selected(
                policy(ROOT, "deny-httpbin", Deny, vec![Rule::default()]),
                &[("app", "httpbin")],
            )],
            SLEEP,
            IN_TEST,
            false,
            Named::Denied("istio-system/deny-httpbin".into()),
        ),
        (
            "DENY by notNamespaces: everything not from foo",
            vec![policy(
                "default",
                "deny-not-foo",
                Deny,
                vec![from(RuleSource {
                    not_namespaces: s(&["foo"]),
                    ..Default::default()
                })],
            )],
            SLEEP,
            HTTPBIN,
            false,
            Named::Denied("default/deny-not-foo".into()),
        ),
        (
            "DENY by notNamespaces lets foo through",
            vec![policy(
                "default",
                "deny-not-foo",
                Deny,
                vec![from(RuleSource {
                    not_namespaces: s(&["foo"]),
                    ..Default::default()
                })],
            )],
            FOO_BAR,
            HTTPBIN,
            true,
            Named::NoPolicy,
        ),
        (
            "DENY beats a matching ALLOW",
            vec![
                policy("default", "allow-all", Allow, vec![Rule::default()]),
                policy(
                    "default",
                    "deny-other",
                    Deny,
                    vec![from(RuleSource {
                        namespaces: s(&["other"]),
                        ..Default::default()
                    })],
                ),
            ],
            OTHER,
            HTTPBIN,
            false,
            Named::Denied("default/deny-other".into()),
        ),
        (
            "any one of several ALLOW policies is enough",
            vec![
                allow_sleep.clone(),
                policy(
                    "default",
                    "allow-foo",
                    Allow,
                    vec![from(RuleSource {
                        namespaces: s(&["foo"]),
                        ..Default::default()
                    })],
                ),
            ],
            FOO_BAR,
            HTTPBIN,
            true,
            Named::Allowed("default/allow-foo".into()),
        ),
        (
            "principal prefix form",
            vec![policy(
                "default",
                "p",
                Allow,
                vec![from(principals(&["cluster.local/ns/foo/*"]))],
            )],
            FOO_BAR,
            HTTPBIN,
            true,
            Named::Allowed("default/p".into()),
        ),
        (
            "principal suffix form",
            vec![policy(
                "default",
                "p",
                Allow,
                vec![from(principals(&["*/sa/bar"]))],
            )],
            FOO_BAR,
            HTTPBIN,
            true,
            Named::Allowed("default/p".into()),
        ),
        (
            "principal presence form admits any mTLS peer",
            vec![policy(
                "default",
                "p",
                Allow,
                vec![from(principals(&["*"]))],
            )],
            OTHER,
            HTTPBIN,
            true,
            Named::Allowed("default/p".into()),
        ),
        (
            "principal presence form refuses plaintext",
            vec![policy(
                "default",
                "p",
                Allow,
                vec![from(principals(&["*"]))],
            )],
            PLAIN,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "notPrincipals [*] denies plaintext (require mTLS)",
            vec![policy(
                "default",
                "require-mtls",
                Deny,
                vec![from(RuleSource {
                    not_principals: s(&["*"]),
                    ..Default::default()
                })],
            )],
            PLAIN,
            HTTPBIN,
            false,
            Named::Denied("default/require-mtls".into()),
        ),
        (
            "notPrincipals [*] lets mTLS through",
            vec![policy(
                "default",
                "require-mtls",
                Deny,
                vec![from(RuleSource {
                    not_principals: s(&["*"]),
                    ..Default::default()
                })],
            )],
            SLEEP,
            HTTPBIN,
            true,
            Named::NoPolicy,
        ),
        (
            "ipBlocks with a CIDR",
            vec![policy(
                "default",
                "ips",
                Allow,
                vec![from(RuleSource {
                    ip_blocks: s(&["10.0.1.0/24", "1.2.3.4"]),
                    ..Default::default()
                })],
            )],
            SLEEP,
            HTTPBIN,
            true,
            Named::Allowed("default/ips".into()),
        ),
        (
            "notIpBlocks excludes",
            vec![policy(
                "default",
                "ips",
                Allow,
                vec![from(RuleSource {
                    ip_blocks: s(&["10.0.0.0/8"]),
                    not_ip_blocks: s(&["10.0.1.5"]),
                    ..Default::default()
                })],
            )],
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "port-scoped rule: matching port",
            vec![policy(
                "default",
                "ports",
                Allow,
                vec![Rule {
                    to: vec![to_ports(&["8000"])],
                    ..Default::default()
                }],
            )],
            OTHER,
            HTTPBIN,
            true,
            Named::Allowed("default/ports".into()),
        ),
        (
            "port-scoped rule: other port",
            vec![policy(
                "default",
                "ports",
                Allow,
                vec![Rule {
                    to: vec![to_ports(&["8000"])],
                    ..Default::default()
                }],
            )],
            OTHER,
            HTTPBIN_9000,
            false,
            Named::NotAllowed,
        ),
        (
            "notPorts",
            vec![policy(
                "default",
                "np",
                Deny,
                vec![Rule {
                    to: vec![RuleOperation {
                        not_ports: s(&["8000"]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )],
            OTHER,
            HTTPBIN_9000,
            false,
            Named::Denied("default/np".into()),
        ),
        (
            "from AND to: both must hold",
            vec![policy(
                "default",
                "both",
                Allow,
                vec![Rule {
                    from: vec![principals(&["cluster.local/ns/default/sa/sleep"])],
                    to: vec![to_ports(&["9000"])],
                    ..Default::default()
                }],
            )],
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "serviceAccounts in the policy's namespace",
            vec![policy(
                "default",
                "sa",
                Allow,
                vec![from(RuleSource {
                    service_accounts: s(&["sleep"]),
                    ..Default::default()
                })],
            )],
            SLEEP,
            HTTPBIN,
            true,
            Named::Allowed("default/sa".into()),
        ),
        (
            "serviceAccounts with namespace/name",
            vec![policy(
                "default",
                "sa",
                Allow,
                vec![from(RuleSource {
                    service_accounts: s(&["foo/bar"]),
                    ..Default::default()
                })],
            )],
            FOO_BAR,
            HTTPBIN,
            true,
            Named::Allowed("default/sa".into()),
        ),
        (
            "when source.namespace",
            vec![policy(
                "default",
                "when",
                Deny,
                vec![Rule {
                    when: vec![Condition {
                        key: "source.namespace".into(),
                        values: s(&["other"]),
                        not_values: vec![],
                    }],
                    ..Default::default()
                }],
            )],
            OTHER,
            HTTPBIN,
            false,
            Named::Denied("default/when".into()),
        ),
        (
            "when destination.ip",
            vec![policy(
                "default",
                "when",
                Allow,
                vec![Rule {
                    when: vec![Condition {
                        key: "destination.ip".into(),
                        values: s(&["10.0.0.0/24"]),
                        not_values: vec![],
                    }],
                    ..Default::default()
                }],
            )],
            OTHER,
            HTTPBIN,
            true,
            Named::Allowed("default/when".into()),
        ),
        (
            "L7: an ALLOW rule with methods never matches (fails closed)",
            vec![policy(
                "default",
                "get-only",
                Allow,
                vec![Rule {
                    from: vec![principals(&["cluster.local/ns/default/sa/sleep"])],
                    to: vec![RuleOperation {
                        methods: s(&["GET"]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )],
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "L7: a DENY rule with paths denies on its L4 parts alone",
            vec![policy(
                "default",
                "deny-admin",
                Deny,
                vec![Rule {
                    from: vec![principals(&["cluster.local/ns/default/sa/sleep"])],
                    to: vec![RuleOperation {
                        paths: s(&["/admin"]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )],
            SLEEP,
            HTTPBIN,
            false,
            Named::Denied("default/deny-admin".into()),
        ),
        (
            "L7: an HTTP when key in ALLOW fails closed",
            vec![policy(
                "default",
                "jwt",
                Allow,
                vec![Rule {
                    when: vec![Condition {
                        key: "request.auth.claims[iss]".into(),
                        values: s(&["x"]),
                        not_values: vec![],
                    }],
                    ..Default::default()
                }],
            )],
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "L7: remoteIpBlocks is an HTTP attribute",
            vec![policy(
                "default",
                "remote",
                Allow,
                vec![from(RuleSource {
                    remote_ip_blocks: s(&["10.0.0.0/8"]),
                    ..Default::default()
                })],
            )],
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "AUDIT changes nothing",
            vec![policy("default", "audit", Audit, vec![Rule::default()])],
            SLEEP,
            HTTPBIN,
            true,
            Named::NoPolicy,
        ),
        (
            "a dry-run DENY changes nothing",
            vec![dry(policy(
                "default",
                "try-deny",
                Deny,
                vec![Rule::default()],
            ))],
            SLEEP,
            HTTPBIN,
            true,
            Named::NoPolicy,
        ),
    ];
    for (name, policies, src, dst, allowed, reason) in cases {
        let (d, compiled) = decide(&policies, &src, &dst);
        assert_eq!(
            (d.allowed, named(&compiled, &d.reason)),
            (allowed, reason),
            "{name}"
        );
    }
}

#[test]
fn audit_and_dry_run_are_reported_for_the_log() {
    let (d, compiled) = decide(
        &[
            policy("default", "audit", Action::Audit, vec![Rule::default()]),
            dry(policy(
                "default",
                "try-deny",
                Action::Deny,
                vec![Rule::default()],
            )),
        ],
        &SLEEP,
        &HTTPBIN,
    );
    assert!(d.allowed);
    let audited: Vec<&str> = d.audited.iter().map(|p| compiled.name(*p)).collect();
    assert_eq!(audited, ["default/audit"]);
    assert_eq!(
        d.dry_run.map(|r| named(&compiled, &r)),
        Some(Named::Denied("default/try-deny".into()))
    );
}

#[test]
fn http_attributes_are_flagged_on_the_policy() {
    let p = Policy::compile(&policy(
        "default",
        "get",
        Action::Allow,
        vec![Rule {
            to: vec![RuleOperation {
                methods: s(&["GET"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    ));
    assert!(p.has_http_attributes);
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> Rule {
    Rule {
        when: vec![Condition {
            key: key.into(),
            values: s(values),
            not_values: s(not_values),
        }],
        ..Default::default()
    }
}

#[test]
fn values_that_do_not_parse_fail_closed() {
    use Action::{Allow, Deny};
    let allow = |rule: Rule| vec![policy("default", "allow", Allow, vec![rule])];
    let deny = |rule: Rule| vec![policy("default", "deny", Deny, vec![rule])];
    let allowed = || Named::Allowed("default/allow".into());
    let denied = || Named::Denied("default/deny".into());
    let cases: Vec<Case> = vec![
        (
            "ALLOW when source.ip with a bad block allows no one",
            allow(when("source.ip", &["10.0.0.0/33"], &[])),
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "ALLOW when destination.port with a name allows no port",
            allow(when("destination.port", &["http"], &[])),
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "ALLOW when source.ip with one good and one bad block: still nothing",
            allow(when("source.ip", &["10.0.1.0/24", "bogus"], &[])),
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "ALLOW when destination.ip notValues with a bad block does not stop excluding",
            allow(when("destination.ip", &[], &["10.0.0.0/99"])),
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "ALLOW when with neither values nor notValues allows no one",
            allow(when("source.ip", &[], &[])),
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "ALLOW with a port name in to.ports allows no port",
            allow(Rule {
                to: vec![to_ports(&["http"])],
                ..Default::default()
            }),
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "ALLOW with a bad notIpBlocks entry allows no one",
            allow(from(RuleSource {
                not_ip_blocks: s(&["10.0.2.0/24", "10.0.0.0/33"]),
                ..Default::default()
            })),
            SLEEP,
            HTTPBIN,
            false,
            Named::NotAllowed,
        ),
        (
            "the policy's readable rules still allow",
            vec![policy(
                "default",
                "allow",
                Allow,
                vec![
                    when("destination.port", &["http"], &[]),
                    when("destination.port", &["8000"], &[]),
                ],
            )],
            SLEEP,
            HTTPBIN,
            true,
            allowed(),
        ),
        (
            "DENY when source.ip with a bad block still denies",
            deny(when("source.ip", &["10.0.0.0/33"], &[])),
            SLEEP,
            HTTPBIN,
            false,
            denied(),
        ),
        (
            "DENY when destination.port with a name denies every port",
            deny(when("destination.port", &["http"], &[])),
            SLEEP,
            HTTPBIN_9000,
            false,
            denied(),
        ),
        (
            "DENY when source.ip notValues with a bad entry excludes no one",
            deny(when("source.ip", &[], &["10.0.1.0/24", "bogus"])),
            SLEEP,
            HTTPBIN,
            false,
            denied(),
        ),
        (
            "DENY with a bad notPorts entry excludes no port",
            deny(Rule {
                to: vec![RuleOperation {
                    not_ports: s(&["8000", "http"]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            SLEEP,
            HTTPBIN,
            false,
            denied(),
        ),
        (
            "DENY keeps its readable parts: another principal is not denied",
            deny(Rule {
                from: vec![principals(&["cluster.local/ns/other/sa/client"])],
                when: vec![Condition {
                    key: "source.ip".into(),
                    values: s(&["bogus"]),
                    not_values: vec![],
                }],
                ..Default::default()
            }),
            SLEEP,
            HTTPBIN,
            true,
            Named::NoPolicy,
        ),
    ];
    for (name, policies, src, dst, allowed, reason) in cases {
        let (d, compiled) = decide(&policies, &src, &dst);
        assert_eq!(
            (d.allowed, named(&compiled, &d.reason)),
            (allowed, reason),
            "{name}"
        );
        assert!(
            compiled.iter().all(|p| p.has_unreadable_values),
            "{name}: flagged for the admin view"
        );
        assert!(
            compiled.iter().all(|p| !p.has_http_attributes),
            "{name}: not an HTTP attribute"
        );
    }
}

#[test]
fn cidr_matching() {
    let c = |s: &str| Cidr::parse(s).expect("cidr");
    assert!(c("10.0.0.0/8").contains("10.255.1.1".parse().expect("ip")));
    assert!(!c("10.0.0.0/8").contains("11.0.0.1".parse().expect("ip")));
    assert!(c("0.0.0.0/0").contains("8.8.8.8".parse().expect("ip")));
    assert!(c("fd00::/8").contains("fd12::1".parse().expect("ip")));
    assert!(!c("fd00::/8").contains("10.0.0.1".parse().expect("ip")));
    assert!(c("10.0.0.7").contains("10.0.0.7".parse().expect("ip")));
    assert_eq!(Cidr::parse("10.0.0.0/33"), None);
    assert_eq!(Cidr::parse("nope"), None);
}

fn pa(
    ns: &str,
    name: &str,
    selector: &[(&str, &str)],
    mode: MtlsMode,
    ports: &[(u32, MtlsMode)],
) -> PeerAuthentication {
    PeerAuthentication {
        name: name.into(),
        namespace: ns.into(),
        selector: selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        mode: mode as i32,
        port_level_mtls: ports.iter().map(|(p, m)| (*p, *m as i32)).collect(),
        created_unix: None,
    }
}

fn created(mut p: PeerAuthentication, unix: i64) -> PeerAuthentication {
    p.created_unix = Some(unix);
    p
}

#[test]
fn the_oldest_peer_authentication_at_a_scope_wins_whatever_the_names() {
    use MtlsMode::{Permissive, Strict};
    let app = [("app", "httpbin")];
    let labels: BTreeMap<String, String> = [("app".to_string(), "httpbin".to_string())].into();
    let mode =
        |all: &[PeerAuthentication]| PeerAuth::resolve(all, ROOT, "default", &labels).mode(80);
    let cases: Vec<(&str, Vec<PeerAuthentication>, Mtls)> = vec![
        (
            "namespace: an older STRICT beats a newer PERMISSIVE named before it",
            vec![
                created(pa("default", "strict", &[], Strict, &[]), 1_000),
                created(
                    pa("default", "debug-permissive", &[], Permissive, &[]),
                    2_000,
                ),
            ],
            Mtls::Strict,
        ),
        (
            "namespace: an older PERMISSIVE beats a newer STRICT named before it",
            vec![
                created(pa("default", "z-permissive", &[], Permissive, &[]), 1_000),
                created(pa("default", "a-strict", &[], Strict, &[]), 2_000),
            ],
            Mtls::Permissive,
        ),
        (
            "mesh: the oldest in the root namespace",
            vec![
                created(pa(ROOT, "strict", &[], Strict, &[]), 1_000),
                created(pa(ROOT, "debug-permissive", &[], Permissive, &[]), 2_000),
            ],
            Mtls::Strict,
        ),
        (
            "workload: the oldest selecting it",
            vec![
                created(pa("default", "strict", &app, Strict, &[]), 1_000),
                created(
                    pa("default", "debug-permissive", &app, Permissive, &[]),
                    2_000,
                ),
            ],
            Mtls::Strict,
        ),
        (
            "same age: the first by name",
            vec![
                created(pa("default", "strict", &[], Strict, &[]), 1_000),
                created(
                    pa("default", "debug-permissive", &[], Permissive, &[]),
                    1_000,
                ),
            ],
            Mtls::Permissive,
        ),
        (
            "no time (a file) counts as older than any time",
            vec![
                created(pa("default", "a-permissive", &[], Permissive, &[]), 1_000),
                pa("default", "z-strict", &[], Strict, &[]),
            ],
            Mtls::Strict,
        ),
    ];
    for (name, all, want) in cases {
        assert_eq!(mode(&all), want, "{name}");
        let reversed: Vec<PeerAuthentication> = all.into_iter().rev().collect();
        assert_eq!(mode(&reversed), want, "{name}, listed the other way round");
    }
}

#[test]
fn peer_authentication_precedence() {
    use MtlsMode::{Disable, Permissive, Strict, Unset};
    let labels: BTreeMap<String, String> = [("app".to_string(), "httpbin".to_string())].into();
    let mode = |all: &[PeerAuthentication], port: u16| {
        PeerAuth::resolve(all, ROOT, "default", &labels).mode(port)
    };
    let cases: Vec<(&str, Vec<PeerAuthentication>, u16, Mtls)> = vec![
        ("nothing: permissive", vec![], 80, Mtls::Permissive),
        (
            "mesh STRICT",
            vec![pa(ROOT, "m", &[], Strict, &[])],
            80,
            Mtls::Strict,
        ),
        (
            "namespace PERMISSIVE overrides mesh STRICT",
            vec![
                pa(ROOT, "m", &[], Strict, &[]),
                pa("default", "n", &[], Permissive, &[]),
            ],
            80,
            Mtls::Permissive,
        ),
        (
            "namespace UNSET inherits mesh STRICT",
            vec![
                pa(ROOT, "m", &[], Strict, &[]),
                pa("default", "n", &[], Unset, &[]),
            ],
            80,
            Mtls::Strict,
        ),
        (
            "workload STRICT overrides namespace PERMISSIVE",
            vec![
                pa("default", "n", &[], Permissive, &[]),
                pa("default", "w", &[("app", "httpbin")], Strict, &[]),
            ],
            80,
            Mtls::Strict,
        ),
        (
            "DISABLE is not strict (ztunnel always speaks mTLS when it can)",
            vec![
                pa(ROOT, "m", &[], Strict, &[]),
                pa("default", "w", &[("app", "httpbin")], Disable, &[]),
            ],
            80,
            Mtls::Permissive,
        ),
        (
            "port-level PERMISSIVE under a STRICT workload",
            vec![pa(
                "default",
                "w",
                &[("app", "httpbin")],
                Strict,
                &[(8080, Permissive)],
            )],
            8080,
            Mtls::Permissive,
        ),
        (
            "and other ports stay STRICT",
            vec![pa(
                "default",
                "w",
                &[("app", "httpbin")],
                Strict,
                &[(8080, Permissive)],
            )],
            80,
            Mtls::Strict,
        ),
        (
            "a selector that does not match is ignored",
            vec![pa("default", "w", &[("app", "other")], Strict, &[])],
            80,
            Mtls::Permissive,
        ),
        (
            "another namespace's policy is ignored",
            vec![pa("other", "n", &[], Strict, &[])],
            80,
            Mtls::Permissive,
        ),
    ];
    for (name, all, port, want) in cases {
        assert_eq!(mode(&all, port), want, "{name}");
    }
}

/// Deterministic pseudo-random numbers for the differential test.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[test]
fn the_namespace_index_never_changes_a_decision() {
    let namespaces = ["a", "b", "c", "default"];
    let accounts = ["x", "y"];
    let mut rng = Lcg(42);
    let pick = |rng: &mut Lcg, v: &[&str]| v[rng.next(v.len())].to_string();
    for round in 0..300 {
        let mut policies = Vec::new();
        for i in 0..(1 + rng.next(6)) {
            let mut source = RuleSource::default();
            match rng.next(7) {
                0 => {
                    source.principals = vec![format!(
                        "cluster.local/ns/{}/sa/{}",
                        pick(&mut rng, &namespaces),
                        pick(&mut rng, &accounts)
                    )]
                }
                1 => {
                    source.principals = vec![format!(
                        "cluster.local/ns/{}/*",
                        pick(&mut rng, &namespaces)
                    )]
                }
                2 => source.principals = vec![format!("*/sa/{}", pick(&mut rng, &accounts))],
                3 => source.namespaces = vec![pick(&mut rng, &namespaces)],
                4 => source.not_namespaces = vec![pick(&mut rng, &namespaces)],
                5 => {
                    source.service_accounts = vec![format!(
                        "{}/{}",
                        pick(&mut rng, &namespaces),
                        pick(&mut rng, &accounts)
                    )]
                }
                _ => source.ip_blocks = vec!["10.0.0.0/16".into()],
            }
            let mut rule = from(source);
            if rng.next(2) == 0 {
                rule.to = vec![to_ports(&["8000"])];
            }
            let action = match rng.next(3) {
                0 => Action::Deny,
                1 => Action::Allow,
                _ => Action::Audit,
            };
            let mut p = policy("default", &format!("p{i}"), action, vec![rule]);
            p.dry_run = rng.next(5) == 0;
            policies.push(p);
        }
        let compiled = Policies::build(&policies, ROOT);
        let applicable = compiled.applicable("default", &BTreeMap::new());
        for _ in 0..20 {
            let source = match rng.next(5) {
                0 => None,
                _ => Some(format!(
                    "spiffe://cluster.local/ns/{}/sa/{}",
                    pick(&mut rng, &namespaces),
                    pick(&mut rng, &accounts)
                )),
            };
            let c = Connection {
                source: source.map(|s| s.parse().expect("id")),
                source_ip: if rng.next(2) == 0 {
                    "10.0.1.1"
                } else {
                    "10.9.1.1"
                }
                .parse()
                .expect("ip"),
                destination_ip: "10.0.0.10".parse().expect("ip"),
                destination_port: if rng.next(2) == 0 { 8000 } else { 9000 },
            };
            let principal = c.source.as_ref().map(SpiffeId::principal);
            // The definition, policy by policy, in order.
            let enforced = |action: PolicyAction| {
                compiled
                    .policies
                    .iter()
                    .filter(move |p| p.action == action && !p.dry_run)
            };
            let naive = if let Some(p) =
                enforced(PolicyAction::Deny).find(|p| p.matches(&c, principal))
            {
                Named::Denied(p.name.clone())
            } else if enforced(PolicyAction::Allow).next().is_none() {
                Named::NoPolicy
            } else if let Some(p) = enforced(PolicyAction::Allow).find(|p| p.matches(&c, principal))
            {
                Named::Allowed(p.name.clone())
            } else {
                Named::NotAllowed
            };
            let audited: Vec<String> = enforced(PolicyAction::Audit)
                .filter(|p| p.matches(&c, principal))
                .map(|p| p.name.clone())
                .collect();
            let d = compiled.evaluate(&applicable, &c);
            assert_eq!(
                named(&compiled, &d.reason),
                naive,
                "round {round}: {policies:?} {c:?}"
            );
            let got: Vec<String> = d
                .audited
                .iter()
                .map(|p| compiled.name(*p).to_owned())
                .collect();
            assert_eq!(got, audited, "round {round}");
        }
    }
}
