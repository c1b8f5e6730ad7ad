//! Istio L4 authorization, evaluated where ztunnel evaluates it: at the destination.
//!
//! Policies are compiled once per snapshot into matchers; the policies that apply to each local
//! workload are resolved once too, so a decision only looks at that workload's policies.
//!
//! Semantics (Istio's, as translated for ztunnel):
//! - scope: a policy without a selector covers its namespace, or the whole mesh in the root
//!   namespace; with a selector it covers the matching workloads of its namespace (of every
//!   namespace, in the root namespace);
//! - a policy's rules are OR; within a rule `from`, `to` and each `when` are AND; the entries of
//!   `from` (or `to`) are OR; the fields of one entry are AND; the values of one field are OR;
//! - any matching DENY denies; otherwise, if ALLOW policies apply, one must match; otherwise the
//!   connection is allowed. AUDIT policies and dry-run policies only log;
//! - HTTP-only attributes (methods, paths, hosts, request principals, remote IP blocks, HTTP
//!   `when` keys) cannot be checked at L4. Without a waypoint such a rule fails closed: in an
//!   ALLOW policy the rule never matches, in a DENY policy its HTTP parts are dropped so it
//!   matches more;
//! - a field or `when` condition whose values do not all parse (an address block, a port), or a
//!   condition with neither values nor not-values, cannot be understood either, and fails
//!   closed the same way: the field is dropped whole and the rule is handled like an HTTP one.
//!   Dropping only the values that do not parse would narrow a `not` field, and turn a field
//!   with none left into "anything". The agent refuses such policies; this is for a snapshot
//!   that carries one anyway.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use mesh_snapshot::schema::{self, Action};

use crate::identity::SpiffeId;

/// Istio's default root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// What a connection looks like to authorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The peer's verified SPIFFE identity; `None` for plaintext.
    pub source: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any value, but there must be one.
    Presence,
}

impl StrMatch {
    fn parse(pattern: &str) -> StrMatch {
        if pattern == "*" {
            StrMatch::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StrMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StrMatch::Prefix(prefix.to_owned())
        } else {
            StrMatch::Exact(pattern.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(e) => value == e,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Suffix(s) => value.ends_with(s.as_str()),
            StrMatch::Presence => !value.is_empty(),
        }
    }
}

fn any_str(matchers: &[StrMatch], value: Option<&str>) -> bool {
    value.is_some_and(|v| matchers.iter().any(|m| m.matches(v)))
}

/// An address block (`10.0.0.0/8`, or a single address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = s.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let shift = 32 - u32::from(self.prefix);
                let mask = if shift == 32 { 0 } else { u32::MAX << shift };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let shift = 128 - u32::from(self.prefix);
                let mask = if shift == 128 { 0 } else { u128::MAX << shift };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn any_cidr(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(ip))
}

/// One Istio `source`, `operation` or `when` entry, compiled. Every non-empty field must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Match {
    principals: Vec<StrMatch>,
    not_principals: Vec<StrMatch>,
    namespaces: Vec<StrMatch>,
    not_namespaces: Vec<StrMatch>,
    service_accounts: Vec<(String, String)>,
    not_service_accounts: Vec<(String, String)>,
    source_ips: Vec<Cidr>,
    not_source_ips: Vec<Cidr>,
    destination_ips: Vec<Cidr>,
    not_destination_ips: Vec<Cidr>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
}

impl Match {
    fn matches(&self, c: &Connection, principal: Option<&str>) -> bool {
        let namespace = c.source.as_ref().map(SpiffeId::namespace);
        let account = c
            .source
            .as_ref()
            .map(|id| (id.namespace(), id.service_account()));
        let in_accounts = |list: &[(String, String)]| {
            account.is_some_and(|(ns, sa)| list.iter().any(|(n, s)| n == ns && s == sa))
        };
        (self.principals.is_empty() || any_str(&self.principals, principal))
            && !any_str(&self.not_principals, principal)
            && (self.namespaces.is_empty() || any_str(&self.namespaces, namespace))
            && !any_str(&self.not_namespaces, namespace)
            && (self.service_accounts.is_empty() || in_accounts(&self.service_accounts))
            && !in_accounts(&self.not_service_accounts)
            && (self.source_ips.is_empty() || any_cidr(&self.source_ips, c.source_ip))
            && !any_cidr(&self.not_source_ips, c.source_ip)
            && (self.destination_ips.is_empty()
                || any_cidr(&self.destination_ips, c.destination_ip))
            && !any_cidr(&self.not_destination_ips, c.destination_ip)
            && (self.destination_ports.is_empty()
                || self.destination_ports.contains(&c.destination_port))
            && !self.not_destination_ports.contains(&c.destination_port)
    }
}

/// The namespace a principal pattern pins down, if it names one whole
/// (`td/ns/X/sa/Y`, or a prefix that reaches past `/ns/X/`).
fn principal_namespace(m: &StrMatch) -> Option<&str> {
    let (text, whole) = match m {
        StrMatch::Exact(e) => (e.as_str(), true),
        StrMatch::Prefix(p) => (p.as_str(), false),
        StrMatch::Suffix(_) | StrMatch::Presence => return None,
    };
    let after = &text[text.find("/ns/")? + "/ns/".len()..];
    match after.find('/') {
        Some(end) => Some(&after[..end]),
        None if whole => None,
        None => None,
    }
}

impl Match {
    /// Namespaces outside which this match cannot hold, when its fields say so.
    fn required_namespaces(&self) -> Option<Vec<&str>> {
        if !self.namespaces.is_empty() {
            return self
                .namespaces
                .iter()
                .map(|m| match m {
                    StrMatch::Exact(ns) => Some(ns.as_str()),
                    _ => None,
                })
                .collect();
        }
        if !self.principals.is_empty() {
            return self.principals.iter().map(principal_namespace).collect();
        }
        if !self.service_accounts.is_empty() {
            return Some(
                self.service_accounts
                    .iter()
                    .map(|(ns, _)| ns.as_str())
                    .collect(),
            );
        }
        None
    }
}

/// A rule: every clause must hold; a clause holds if any of its matches does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rule {
    clauses: Vec<Vec<Match>>,
}

impl Rule {
    fn matches(&self, c: &Connection, principal: Option<&str>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| m.matches(c, principal)))
    }

    /// Source namespaces this rule can match at all: from the first clause whose every
    /// alternative names its namespaces. `None`: any source (plaintext included).
    fn required_namespaces(&self) -> Option<Vec<&str>> {
        self.clauses.iter().find_map(|clause| {
            let mut all = Vec::new();
            for m in clause {
                all.extend(m.required_namespaces()?);
            }
            (!clause.is_empty()).then_some(all)
        })
    }
}

/// The rules of some policies, indexed by the source namespace they require, so a decision
/// looks only at rules that could match its source. Entries are (policy, rule), ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RuleSet {
    by_namespace: HashMap<String, Vec<(usize, usize)>>,
    anywhere: Vec<(usize, usize)>,
}

impl RuleSet {
    fn build(policies: &[Policy], ids: &[usize]) -> RuleSet {
        let mut set = RuleSet::default();
        for &id in ids {
            for (r, rule) in policies[id].rules.iter().enumerate() {
                match rule.required_namespaces() {
                    Some(namespaces) => {
                        let mut namespaces = namespaces;
                        namespaces.sort_unstable();
                        namespaces.dedup();
                        for ns in namespaces {
                            set.by_namespace
                                .entry(ns.to_owned())
                                .or_default()
                                .push((id, r));
                        }
                    }
                    None => set.anywhere.push((id, r)),
                }
            }
        }
        set
    }

    /// Rules that could match `c`, in (policy, rule) order.
    fn candidates<'a>(&'a self, c: &Connection) -> impl Iterator<Item = (usize, usize)> + 'a {
        let bucket: &[(usize, usize)] = c
            .source
            .as_ref()
            .and_then(|id| self.by_namespace.get(id.namespace()))
            .map_or(&[], Vec::as_slice);
        merge_sorted(bucket, &self.anywhere)
    }
}

/// Merges two ascending slices.
fn merge_sorted<'a>(
    a: &'a [(usize, usize)],
    b: &'a [(usize, usize)],
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || match (a.get(i), b.get(j)) {
        (Some(x), Some(y)) if x <= y => {
            i += 1;
            Some(*x)
        }
        (_, Some(y)) => {
            j += 1;
            Some(*y)
        }
        (Some(x), None) => {
            i += 1;
            Some(*x)
        }
        (None, None) => None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    Allow,
    Deny,
    Audit,
}

/// A compiled policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name`, as it appears in decision logs.
    pub name: String,
    pub action: PolicyAction,
    pub dry_run: bool,
    /// HTTP attributes were found and handled the fail-closed way (see the module docs).
    pub has_http_attributes: bool,
    /// Values that do not parse were found and handled the fail-closed way (module docs).
    pub has_unreadable_values: bool,
    namespace: String,
    selector: BTreeMap<String, String>,
    rules: Vec<Rule>,
}

impl Policy {
    /// Number of rules (an ALLOW policy with none matches nothing).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The unindexed definition of a match; the tests hold the index to it.
    #[cfg(test)]
    fn matches(&self, c: &Connection, principal: Option<&str>) -> bool {
        self.rules.iter().any(|r| r.matches(c, principal))
    }
}

/// Reads the values of one rule's fields, all or nothing: a field with a value that does not
/// parse is left empty and the rule marked, so that it fails closed (see the module docs).
#[derive(Default)]
struct Values {
    unreadable: bool,
}

impl Values {
    fn all<T>(&mut self, values: &[String], parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
        match values.iter().map(|v| parse(v)).collect::<Option<Vec<T>>>() {
            Some(parsed) => parsed,
            None => {
                self.unreadable = true;
                Vec::new()
            }
        }
    }

    fn ports(&mut self, values: &[String]) -> Vec<u16> {
        self.all(values, |p| p.parse().ok())
    }

    fn cidrs(&mut self, values: &[String]) -> Vec<Cidr> {
        self.all(values, Cidr::parse)
    }
}

fn strs(values: &[String]) -> Vec<StrMatch> {
    values.iter().map(|v| StrMatch::parse(v)).collect()
}

fn accounts(values: &[String], policy_namespace: &str) -> Vec<(String, String)> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => (ns.to_owned(), sa.to_owned()),
            None => (policy_namespace.to_owned(), v.clone()),
        })
        .collect()
}

const L4_WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn when_match(c: &schema::Condition, values: &mut Values) -> Match {
    let mut m = Match::default();
    // Istio refuses a condition without values: it would constrain nothing.
    values.unreadable |= c.values.is_empty() && c.not_values.is_empty();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = values.cidrs(&c.values);
            m.not_source_ips = values.cidrs(&c.not_values);
        }
        "source.namespace" => {
            m.namespaces = strs(&c.values);
            m.not_namespaces = strs(&c.not_values);
        }
        "source.principal" => {
            m.principals = strs(&c.values);
            m.not_principals = strs(&c.not_values);
        }
        "destination.ip" => {
            m.destination_ips = values.cidrs(&c.values);
            m.not_destination_ips = values.cidrs(&c.not_values);
        }
        "destination.port" => {
            m.destination_ports = values.ports(&c.values);
            m.not_destination_ports = values.ports(&c.not_values);
        }
        _ => {}
    }
    m
}

impl Policy {
    pub fn compile(p: &schema::AuthorizationPolicy) -> Policy {
        let action = match Action::try_from(p.action).unwrap_or(Action::Allow) {
            Action::Allow => PolicyAction::Allow,
            Action::Deny => PolicyAction::Deny,
            Action::Audit => PolicyAction::Audit,
        };
        let mut has_http_attributes = false;
        let mut has_unreadable_values = false;
        let mut rules = Vec::with_capacity(p.rules.len());
        for rule in &p.rules {
            let mut http = false;
            let mut values = Values::default();
            let mut clauses = Vec::new();
            if !rule.from.is_empty() {
                clauses.push(
                    rule.from
                        .iter()
                        .map(|s| {
                            http |= !s.request_principals.is_empty()
                                || !s.not_request_principals.is_empty()
                                || !s.remote_ip_blocks.is_empty()
                                || !s.not_remote_ip_blocks.is_empty();
                            Match {
                                principals: strs(&s.principals),
                                not_principals: strs(&s.not_principals),
                                namespaces: strs(&s.namespaces),
                                not_namespaces: strs(&s.not_namespaces),
                                service_accounts: accounts(&s.service_accounts, &p.namespace),
                                not_service_accounts: accounts(
                                    &s.not_service_accounts,
                                    &p.namespace,
                                ),
                                source_ips: values.cidrs(&s.ip_blocks),
                                not_source_ips: values.cidrs(&s.not_ip_blocks),
                                ..Match::default()
                            }
                        })
                        .collect(),
                );
            }
            if !rule.to.is_empty() {
                clauses.push(
                    rule.to
                        .iter()
                        .map(|o| {
                            http |= !o.hosts.is_empty()
                                || !o.not_hosts.is_empty()
                                || !o.methods.is_empty()
                                || !o.not_methods.is_empty()
                                || !o.paths.is_empty()
                                || !o.not_paths.is_empty();
                            Match {
                                destination_ports: values.ports(&o.ports),
                                not_destination_ports: values.ports(&o.not_ports),
                                ..Match::default()
                            }
                        })
                        .collect(),
                );
            }
            for condition in &rule.when {
                http |= !L4_WHEN_KEYS.contains(&condition.key.as_str());
                clauses.push(vec![when_match(condition, &mut values)]);
            }
            has_http_attributes |= http;
            has_unreadable_values |= values.unreadable;
            // ALLOW: an HTTP (or unreadable) rule can never be shown to match at L4, so it is
            // left out. DENY (and AUDIT): those parts are already gone; the rest matches more.
            if !((http || values.unreadable) && action == PolicyAction::Allow) {
                rules.push(Rule { clauses });
            }
        }
        Policy {
            name: format!("{}/{}", p.namespace, p.name),
            action,
            dry_run: p.dry_run,
            has_http_attributes,
            has_unreadable_values,
            namespace: p.namespace.clone(),
            selector: p.selector.clone(),
            rules,
        }
    }
}

/// The policies of a snapshot, compiled, with an index by scope.
#[derive(Debug, Default)]
pub struct Policies {
    policies: Vec<Policy>,
    global: Vec<usize>,
    by_namespace: HashMap<String, Vec<usize>>,
    /// Selector policies: (policy, namespace it applies in; `None` = every namespace).
    selected: Vec<(usize, Option<String>)>,
}

/// The policies that apply to one workload, split by what they do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applicable {
    deny: RuleSet,
    allow: RuleSet,
    /// Whether any ALLOW policy applies (one with no rules still makes ALLOW mandatory).
    any_allow: bool,
    audit: RuleSet,
    dry_run_deny: RuleSet,
    dry_run_allow: RuleSet,
    dry_run_any_allow: bool,
}

/// A policy of a [`Policies`]; decisions name policies by this, not by copying their names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyId(usize);

/// Why a connection was allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No ALLOW policy applies and no DENY matched.
    NoPolicy,
    /// This ALLOW policy matched.
    Allowed(PolicyId),
    /// This DENY policy matched.
    Denied(PolicyId),
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// AUDIT policies that matched (for the log).
    pub audited: Vec<PolicyId>,
    /// What the dry-run policies would have decided, if that differs.
    pub dry_run: Option<Reason>,
}

impl Policies {
    pub fn build(policies: &[schema::AuthorizationPolicy], root_namespace: &str) -> Policies {
        let mut out = Policies::default();
        for (i, p) in policies.iter().enumerate() {
            out.policies.push(Policy::compile(p));
            let in_root = p.namespace == root_namespace;
            if p.selector.is_empty() {
                if in_root {
                    out.global.push(i);
                } else {
                    out.by_namespace
                        .entry(p.namespace.clone())
                        .or_default()
                        .push(i);
                }
            } else {
                out.selected
                    .push((i, (!in_root).then(|| p.namespace.clone())));
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter()
    }

    /// `namespace/name` of a policy a decision refers to.
    pub fn name(&self, id: PolicyId) -> &str {
        &self.policies[id.0].name
    }

    /// A decision's reason in words, for logs.
    pub fn describe(&self, reason: &Reason) -> String {
        match reason {
            Reason::NoPolicy => "no policy applies".into(),
            Reason::Allowed(p) => format!("allowed by {}", self.name(*p)),
            Reason::Denied(p) => format!("denied by {}", self.name(*p)),
            Reason::NotAllowed => "no ALLOW policy matched".into(),
        }
    }

    /// Resolves which policies apply to a workload (done once per snapshot per local workload).
    pub fn applicable(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Applicable {
        let mut ids: Vec<usize> = self.global.clone();
        if let Some(ns) = self.by_namespace.get(namespace) {
            ids.extend(ns);
        }
        for (id, ns) in &self.selected {
            let in_scope = ns.as_deref().is_none_or(|n| n == namespace);
            let selected = self.policies[*id]
                .selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v));
            if in_scope && selected {
                ids.push(*id);
            }
        }
        ids.sort_unstable();
        let pick = |action: PolicyAction, dry_run: bool| -> Vec<usize> {
            ids.iter()
                .copied()
                .filter(|&id| {
                    let p = &self.policies[id];
                    p.action == action && p.dry_run == dry_run
                })
                .collect()
        };
        let allow = pick(PolicyAction::Allow, false);
        let dry_run_allow = pick(PolicyAction::Allow, true);
        Applicable {
            deny: RuleSet::build(&self.policies, &pick(PolicyAction::Deny, false)),
            any_allow: !allow.is_empty(),
            allow: RuleSet::build(&self.policies, &allow),
            audit: RuleSet::build(&self.policies, &pick(PolicyAction::Audit, false)),
            dry_run_deny: RuleSet::build(&self.policies, &pick(PolicyAction::Deny, true)),
            dry_run_any_allow: !dry_run_allow.is_empty(),
            dry_run_allow: RuleSet::build(&self.policies, &dry_run_allow),
        }
    }

    /// The first policy (in order) with a rule in `set` that matches.
    fn first_match(&self, set: &RuleSet, c: &Connection, principal: Option<&str>) -> Option<usize> {
        set.candidates(c)
            .find(|&(p, r)| self.policies[p].rules[r].matches(c, principal))
            .map(|(p, _)| p)
    }

    /// DENY first, then ALLOW if any applies; `extra` adds the dry-run sets for a shadow run.
    fn decide(
        &self,
        applicable: &Applicable,
        with_dry_run: bool,
        c: &Connection,
        principal: Option<&str>,
    ) -> Reason {
        let denied = self
            .first_match(&applicable.deny, c, principal)
            .or_else(|| {
                with_dry_run
                    .then(|| self.first_match(&applicable.dry_run_deny, c, principal))
                    .flatten()
            });
        if let Some(p) = denied {
            return Reason::Denied(PolicyId(p));
        }
        let any_allow = applicable.any_allow || (with_dry_run && applicable.dry_run_any_allow);
        if !any_allow {
            return Reason::NoPolicy;
        }
        let allowed = self
            .first_match(&applicable.allow, c, principal)
            .or_else(|| {
                with_dry_run
                    .then(|| self.first_match(&applicable.dry_run_allow, c, principal))
                    .flatten()
            });
        match allowed {
            Some(p) => Reason::Allowed(PolicyId(p)),
            None => Reason::NotAllowed,
        }
    }

    /// Decides one connection against the policies that apply to its destination.
    pub fn evaluate(&self, applicable: &Applicable, c: &Connection) -> Decision {
        let principal = c.source.as_ref().map(SpiffeId::principal);
        let reason = self.decide(applicable, false, c, principal);
        let allowed = matches!(reason, Reason::NoPolicy | Reason::Allowed(_));
        let mut audited: Vec<PolicyId> = Vec::new();
        for (p, r) in applicable.audit.candidates(c) {
            if audited.last() != Some(&PolicyId(p))
                && self.policies[p].rules[r].matches(c, principal)
            {
                audited.push(PolicyId(p));
            }
        }
        let has_dry_run = applicable.dry_run_any_allow
            || !applicable.dry_run_deny.anywhere.is_empty()
            || !applicable.dry_run_deny.by_namespace.is_empty();
        let dry_run = if has_dry_run {
            // As if the dry-run policies were enforced alongside the others.
            let shadow = self.decide(applicable, true, c, principal);
            let shadow_allowed = matches!(shadow, Reason::NoPolicy | Reason::Allowed(_));
            (shadow_allowed != allowed).then_some(shadow)
        } else {
            None
        };
        Decision {
            allowed,
            reason,
            audited,
            dry_run,
        }
    }
}

/// mTLS mode a workload requires for inbound plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mtls {
    /// Plaintext is accepted (PERMISSIVE, DISABLE, or no policy).
    Permissive,
    /// Plaintext is refused.
    Strict,
}

/// The effective PeerAuthentication of one workload: a mode plus per-port overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAuth {
    strict: bool,
    ports: BTreeMap<u16, bool>,
}

impl PeerAuth {
    pub fn mode(&self, port: u16) -> Mtls {
        if self.ports.get(&port).copied().unwrap_or(self.strict) {
            Mtls::Strict
        } else {
            Mtls::Permissive
        }
    }

    /// Resolves mesh, namespace and workload PeerAuthentications for one workload. UNSET
    /// inherits from the wider scope. Of several at one scope the oldest wins, then the first
    /// by name (Istio's order); one without a creation time (from a file, or an older agent)
    /// counts as older than any with one, so a set without times is settled by name alone.
    pub fn resolve(
        all: &[schema::PeerAuthentication],
        root_namespace: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> PeerAuth {
        use schema::MtlsMode;
        fn first(c: Vec<&schema::PeerAuthentication>) -> Option<&schema::PeerAuthentication> {
            // `None < Some`: an unknown time sorts first.
            c.into_iter()
                .min_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)))
        }
        let mesh = first(
            all.iter()
                .filter(|p| p.namespace == root_namespace && p.selector.is_empty())
                .collect(),
        );
        let ns = first(
            all.iter()
                .filter(|p| {
                    p.namespace == namespace
                        && p.namespace != root_namespace
                        && p.selector.is_empty()
                })
                .collect(),
        );
        let workload = first(
            all.iter()
                .filter(|p| {
                    p.namespace == namespace
                        && p.namespace != root_namespace
                        && !p.selector.is_empty()
                        && p.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .collect(),
        );
        let mode =
            |p: &schema::PeerAuthentication| MtlsMode::try_from(p.mode).unwrap_or(MtlsMode::Unset);
        let mut strict = false;
        for p in [mesh, ns, workload].into_iter().flatten() {
            match mode(p) {
                MtlsMode::Unset => {}
                MtlsMode::Strict => strict = true,
                MtlsMode::Permissive | MtlsMode::Disable => strict = false,
            }
        }
        let ports = workload
            .map(|w| {
                w.port_level_mtls
                    .iter()
                    .filter_map(|(port, m)| {
                        let port = u16::try_from(*port).ok()?;
                        match MtlsMode::try_from(*m).unwrap_or(MtlsMode::Unset) {
                            MtlsMode::Unset => None,
                            MtlsMode::Strict => Some((port, true)),
                            MtlsMode::Permissive | MtlsMode::Disable => Some((port, false)),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        PeerAuth { strict, ports }
    }
}

#[cfg(test)]
mod tests;
