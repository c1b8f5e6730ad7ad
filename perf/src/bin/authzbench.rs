//! `authzbench`: time per authorization decision for 10, 1k and 10k policies, as the data plane
//! makes it for each new inbound connection.
//!
//! - common: the policies are spread over 100 namespaces and three of them (namespace-wide
//!   DENY, selector ALLOW, mesh-wide DENY) apply to the destination;
//! - all in scope: every policy applies to the destination; their rules name sources in 100
//!   team namespaces, and the caller is in none of them (the rules are indexed by the source
//!   namespace they require, so these are never looked at);
//! - all in the caller's namespace: every rule names the caller's namespace and only the last
//!   one matches: the worst case, a scan of every rule.
//!
//! Each figure is the median over batches, and a ratio to deciding with no policy at all,
//! measured in the same run. Results go to bench-results/authz-<time>.json.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use mesh_core::authz::Connection;
use mesh_core::index::{Generation, Index};
use mesh_snapshot::schema::{
    Action, AuthorizationPolicy, Protocol, Rule, RuleOperation, RuleSource, Snapshot, Workload,
};
use perf::report;
use serde::Serialize;

const BATCHES: usize = 15;
const DECISIONS_PER_BATCH: usize = 20_000;

fn workload(uid: &str, ns: &str, app: &str, ip: [u8; 4]) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: ns.into(),
        service_account: uid.into(),
        trust_domain: "cluster.local".into(),
        ips: vec![ip.to_vec()],
        node: "node-1".into(),
        protocol: Protocol::Hbone as i32,
        netns_path: "/run/netns/bench".into(),
        labels: BTreeMap::from([("app".into(), app.into())]),
        ..Default::default()
    }
}

/// A typical L4 rule: some principals of one namespace and a port.
fn rule(namespace: &str, i: usize) -> Rule {
    Rule {
        from: vec![RuleSource {
            principals: vec![
                format!("cluster.local/ns/{namespace}/sa/frontend-{i}"),
                format!("cluster.local/ns/{namespace}/sa/batch-{i}-*"),
            ],
            ..Default::default()
        }],
        to: vec![RuleOperation {
            ports: vec!["8080".into(), "9090".into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn policy(
    i: usize,
    ns: String,
    action: Action,
    selector: Option<&str>,
    source_namespace: &str,
) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: format!("p{i}"),
        namespace: ns,
        action: action as i32,
        selector: selector
            .map(|app| BTreeMap::from([("app".into(), app.into())]))
            .unwrap_or_default(),
        rules: vec![rule(source_namespace, i)],
        ..Default::default()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Common,
    Spread,
    CallersNamespace,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Common => "common",
            Scope::Spread => "all in scope",
            Scope::CallersNamespace => "all, caller's ns",
        }
    }
}

/// `n` policies laid out for `scope`; the caller is `web/frontend`, allowed by the last one.
fn snapshot(n: usize, scope: Scope) -> Snapshot {
    let mut policies: Vec<AuthorizationPolicy> = (0..n)
        .map(|i| {
            let (ns, source_ns) = match scope {
                Scope::Common => (format!("team-{}", i % 100), format!("team-{}", i % 100)),
                Scope::Spread => ("shop".to_owned(), format!("team-{}", i % 100)),
                Scope::CallersNamespace => ("shop".to_owned(), "web".to_owned()),
            };
            let action = if i % 2 == 0 {
                Action::Deny
            } else {
                Action::Allow
            };
            policy(i, ns, action, None, &source_ns)
        })
        .collect();
    if scope == Scope::Common && n > 0 {
        // The few that apply to the destination in the common case.
        policies.push(policy(n, "shop".into(), Action::Deny, None, "team-1"));
        policies.push(policy(
            n + 1,
            "istio-system".into(),
            Action::Deny,
            None,
            "team-2",
        ));
        policies.push(policy(
            n + 2,
            "shop".into(),
            Action::Allow,
            Some("checkout"),
            "web",
        ));
    }
    if let Some(last) = policies.last_mut() {
        last.action = Action::Allow as i32;
        last.rules[0].from[0].principals = vec!["cluster.local/ns/web/sa/frontend".into()];
    }
    Snapshot {
        node: "node-1".into(),
        workloads: vec![workload("checkout-1", "shop", "checkout", [10, 0, 0, 10])],
        policies,
        ..Default::default()
    }
}

#[derive(Serialize)]
struct Row {
    policies: usize,
    scope: &'static str,
    applicable: usize,
    ns_per_decision: f64,
    /// Deciding with no policy, measured just before this row (the host's speed drifts).
    no_policy_ns: f64,
    vs_no_policy: f64,
    allowed: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(index: &Index, c: &Connection) -> (f64, bool) {
    let allowed = index.authorize("checkout-1", c).allowed;
    let batches = (0..BATCHES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..DECISIONS_PER_BATCH {
                black_box(index.authorize(black_box("checkout-1"), black_box(c)));
            }
            start.elapsed().as_nanos() as f64 / DECISIONS_PER_BATCH as f64
        })
        .collect();
    (median(batches), allowed)
}

fn main() -> anyhow::Result<()> {
    let run = report::Provenance::now();
    let connection = Connection {
        source: Some("spiffe://cluster.local/ns/web/sa/frontend".parse()?),
        source_ip: "10.1.0.7".parse()?,
        destination_ip: "10.0.0.10".parse()?,
        destination_port: 8080,
    };
    let empty = Index::build(snapshot(0, Scope::Common), Generation::default())?;
    // Warm up caches and CPU frequency.
    measure(&empty, &connection);
    let mut rows = Vec::new();
    for n in [10, 1_000, 10_000] {
        for scope in [Scope::Common, Scope::Spread, Scope::CallersNamespace] {
            let index = Index::build(snapshot(n, scope), Generation::default())?;
            let (baseline, _) = measure(&empty, &connection);
            let (ns, allowed) = measure(&index, &connection);
            let applicable = if scope == Scope::Common { 3 } else { n };
            rows.push(Row {
                policies: n,
                scope: scope.name(),
                applicable,
                ns_per_decision: ns,
                no_policy_ns: baseline,
                vs_no_policy: ns / baseline,
                allowed,
            });
        }
    }
    let machine = &run.machine;
    println!(
        "authorization decision time on {} ({} cores)",
        machine.cpu_model, machine.cores
    );
    println!(
        "{:>9} {:>17} {:>11} {:>14} {:>12} {:>10}",
        "policies", "scope", "applicable", "ns/decision", "no policy", "ratio"
    );
    for r in &rows {
        println!(
            "{:>9} {:>17} {:>11} {:>14.0} {:>12.0} {:>9.1}x",
            r.policies, r.scope, r.applicable, r.ns_per_decision, r.no_policy_ns, r.vs_no_policy
        );
    }
    let stem = run.file_stem("authz");
    if std::env::args().any(|a| a == "--no-save") {
        return Ok(());
    }
    let out = std::path::Path::new("bench-results");
    std::fs::create_dir_all(out)?;
    let path = out.join(format!("{stem}.json"));
    let mut result = serde_json::to_value(&run)?;
    result["batches"] = BATCHES.into();
    result["decisions_per_batch"] = DECISIONS_PER_BATCH.into();
    result["rows"] = serde_json::to_value(&rows)?;
    std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")?;
    let bars: Vec<(String, f64)> = rows
        .iter()
        .map(|r| {
            (
                format!("{} policies, {}", r.policies, r.scope),
                r.ns_per_decision,
            )
        })
        .collect();
    std::fs::write(
        out.join(format!("{stem}.svg")),
        perf::report::log_bar_chart(
            &format!("authorization decision time, commit {}", run.commit),
            &format!(
                "{} ({} cores); deciding with no policy: {:.0}-{:.0} ns",
                machine.cpu_model,
                machine.cores,
                rows.iter().map(|r| r.no_policy_ns).fold(f64::MAX, f64::min),
                rows.iter().map(|r| r.no_policy_ns).fold(0.0, f64::max)
            ),
            "ns",
            &bars,
        ),
    )?;
    println!("saved {} (and .svg)", path.display());
    Ok(())
}
