//! The immutable routing index a worker consults per connection.
//!
//! Workers share one `Arc<Index>` per generation and never mutate it; a new generation is a new
//! index, adopted between connections, so a connection keeps the index it started with.
//!
//! The big maps are layered (a frozen hash map under a small persistent overlay, see
//! `layered`): the next generation is the previous one with a delta applied, sharing the
//! frozen part, so a one-pod change costs an overlay insert, not a rebuild of the world. A
//! complete snapshot is the same operation on an empty index. Parts that are rebuilt as a
//! whole when they change (compiled policies, TLS material) sit behind their own `Arc`, so a
//! worker can tell in O(1) whether they changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU64;
use std::sync::{Arc, OnceLock};

use mesh_snapshot::delta::{self, Delta};
use mesh_snapshot::schema::{self, DecodeError, Protocol, Snapshot};
use mesh_snapshot::view::{self, ServiceView, SnapshotView, WorkloadView};

use crate::authz::{self, Applicable, Decision, Mtls, PeerAuth, Policies};
use crate::identity::{SpiffeId, SpiffeIdError};
use crate::layered::{Layered, FOLD_MIN};
use crate::ports;

/// A workload's addresses: one (or two, dual-stack) nearly always, held inline (an
/// allocation per pod less, and no pointer to follow when the address map is filled).
pub type Addresses = smallvec::SmallVec<[IpAddr; 1]>;

/// A workload as the data path needs it: parsed addresses and identity. The uid is the one
/// the maps are keyed by, and what a pod has in common with its owner's other pods is one
/// shared [`Owner`]: about 80 bytes per pod less than each pod holding those fields
/// (bench-results/README.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: Arc<str>,
    pub name: String,
    pub owner: Arc<Owner>,
    pub ips: Addresses,
    /// Shared within an index build, as the owner's strings are.
    pub node: Arc<str>,
    pub protocol: Protocol,
    /// Where the data plane finds this pod's network namespace (pods of this node only).
    pub netns: NetnsSource,
    /// The waypoint that takes traffic addressed to this workload. Boxed: most workloads have
    /// none, and every workload pays for the field.
    pub waypoint: Option<Box<Waypoint>>,
}

/// What a pod has in common with the other pods of its owner (a Deployment's, say): one
/// allocation per distinct set within an index build (within each of its parse runs, on a
/// large one), its strings shared too. A pod without an owner has one of its own.
#[derive(Debug, PartialEq, Eq)]
pub struct Owner {
    pub namespace: Arc<str>,
    pub identity: SpiffeId,
    /// Istio's canonical service and revision, from the workload's labels (metric labels).
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    /// Istio's workload name (metric labels): the owner-derived name the agent sent (a
    /// Deployment's for its pods), else the pod's name.
    pub workload_name: Arc<str>,
}

/// A waypoint as a workload or service names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waypoint {
    /// Its service's VIP, or a pod's address, and HBONE port.
    At(SocketAddr),
    /// Known by hostname only, with no address yet: its traffic is refused until it has one.
    Unresolved(Box<str>),
}

impl std::fmt::Display for Waypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waypoint::At(address) => address.fmt(f),
            Waypoint::Unresolved(hostname) => f.write_str(hostname),
        }
    }
}

/// A service as metrics name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
}

/// How a local pod's network namespace is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NetnsSource {
    /// Not a pod this node serves.
    None,
    /// A path (file-configured labs): `/run/netns/<name>`.
    Path(String),
    /// Enrolled through CNI: the agent hands the namespace over as a descriptor, by uid.
    Agent,
}

#[derive(Clone, Debug)]
struct Service {
    name: ServiceName,
    /// VIP:port frontends with their target ports.
    frontends: Vec<(SocketAddr, u16)>,
    /// The waypoint that takes traffic addressed to this service.
    waypoint: Option<Waypoint>,
    /// Endpoint uids as the snapshot lists them. A connection looks its endpoint up by uid
    /// when it picks one, as ztunnel does: so a workload that comes, goes or changes touches
    /// no service, and an index keeps no map from workloads back to services.
    listed: Listed,
    record: Fingerprint,
}

/// A service's endpoint uids, in order: two allocations per service (the joined uids and where
/// each ends), not one per uid.
#[derive(Clone, Debug, Default)]
struct Listed {
    uids: Box<str>,
    /// Where each uid ends in `uids`.
    ends: Box<[u32]>,
}

impl Listed {
    fn new(uids: &[&str]) -> Option<Listed> {
        let mut joined = String::with_capacity(uids.iter().map(|u| u.len()).sum());
        let mut ends = Vec::with_capacity(uids.len());
        for uid in uids {
            joined.push_str(uid);
            ends.push(u32::try_from(joined.len()).ok()?);
        }
        Some(Listed {
            uids: joined.into(),
            ends: ends.into(),
        })
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> &str {
        let start = match i {
            0 => 0,
            _ => self.ends[i - 1] as usize,
        };
        &self.uids[start..self.ends[i] as usize]
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// Where an outbound connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Through HBONE to the destination's node: CONNECT `target` over a tunnel to `tunnel`,
    /// accepting only a server that proves `identity`.
    Hbone {
        destination: &'a Workload,
        target: SocketAddr,
        tunnel: SocketAddr,
        /// The service whose VIP was dialled, if it was one.
        service: Option<&'a ServiceName>,
    },
    /// Not in the mesh: plain TCP to `target`.
    Passthrough { target: SocketAddr },
    /// A service VIP with no endpoint to send to.
    NoEndpoint { service: SocketAddr },
    /// The destination's waypoint has no pod to send to. Nothing goes around it: the
    /// waypoint is where the destination's L7 policies are enforced.
    NoWaypoint { waypoint: SocketAddr },
    /// The destination's waypoint is known by hostname only, with no address yet: refused
    /// for the same reason.
    UnresolvedWaypoint { hostname: &'a str },
}

/// A service as the admin dump shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary<'a> {
    pub name: &'a ServiceName,
    /// VIP:port frontends, sorted.
    pub frontends: Vec<SocketAddr>,
    /// How many of its endpoints this index has a workload for.
    pub endpoints: usize,
    pub waypoint: Option<&'a Waypoint>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("workload {uid:?}: {field}: {problem}")]
    Workload {
        uid: String,
        field: &'static str,
        problem: String,
    },
    #[error("service {name:?}: {field}: {problem}")]
    Service {
        name: String,
        field: &'static str,
        problem: String,
    },
    #[error("identity {spiffe_id:?}: {0}", spiffe_id = .1)]
    Identity(SpiffeIdError, String),
    /// The payload itself: not the protobuf it should be, or another schema version.
    #[error("{0}")]
    Payload(String),
    #[error("duplicate workload uid {0:?}")]
    DuplicateUid(String),
    #[error("address {ip} belongs to both {first:?} and {second:?}")]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        second: String,
    },
}

/// Parses a 4- or 16-byte address from the snapshot.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| Ipv4Addr::from(b).into()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| Ipv6Addr::from(b).into()),
        _ => None,
    }
}

pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Version stamp of the snapshot an index was built from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    pub epoch: u64,
    pub generation: u64,
}

/// The big maps: a frozen std hash map under a small persistent overlay (see `layered`). A
/// hash trie (imbl's HashMap) took 127 bytes per small entry at 100k entries, and a
/// persistent B-tree's lookups cost ten std hash lookups at 100k-1M entries (snapbench).
type Map<K, V> = Layered<K, V>;

/// A hash of the encoded record a workload or service was read from, seeded once per process;
/// `None` for one a delta brought (decoded, so no record). A complete snapshot is compared
/// with the index it replaces through these (see [`Index::rebase_encoded`]). A changed record
/// that hashed as the one it replaces would keep the old: about one chance in 2^64 per
/// changed record, from a seed no publisher knows.
type Fingerprint = Option<NonZeroU64>;

fn fingerprint(record: &[u8]) -> Fingerprint {
    static SEED: OnceLock<foldhash::quality::RandomState> = OnceLock::new();
    if record.is_empty() {
        return None;
    }
    let hash = SEED.get_or_init(Default::default).hash_one(record);
    NonZeroU64::new(hash).or(Some(NonZeroU64::MIN))
}

/// A workload as the uid map holds it: with its record's fingerprint.
#[derive(Clone, Debug)]
struct Known {
    workload: Arc<Workload>,
    record: Fingerprint,
}

/// What [`Index::rebase_encoded`] made, and how much differed.
#[derive(Debug)]
pub struct Rebased {
    pub index: Index,
    pub changes: Changes,
}

/// Records a complete snapshot changed, added or removed against the index it replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub workloads: usize,
    pub services: usize,
}

/// What comparing one run of workload records with an index found: the changed (and new)
/// ones, each record's uid hash and position in the snapshot, and how many uids the index
/// holds.
struct ComparedRun<'a> {
    changed: Vec<WorkloadView<'a>>,
    uids: Vec<(u64, u32)>,
    still_listed: usize,
}

/// The names (uids, service keys) a complete snapshot lists, as their sorted hashes with the
/// positions of their records: a name listed twice, or one no longer listed, is found by
/// sorting and searching instead of through a set of strings (at 100k, most of a comparison
/// is cache misses). Equal hashes are told apart by the names, read again from the records.
struct Named(Vec<(u64, u32)>);

/// Seeded once per process, as fingerprints are: with a fixed seed, names made to collide
/// (a file source's uids are anyone's to choose) would turn each search into a scan.
fn name_hash(name: &str) -> u64 {
    static SEED: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    SEED.get_or_init(Default::default).hash_one(name)
}

impl Named {
    fn sorted(mut hashes: Vec<(u64, u32)>) -> Named {
        hashes.sort_unstable();
        Named(hashes)
    }

    /// Whether a name is listed twice.
    fn has_twins<N: Ord>(&self, name_at: impl Fn(u32) -> Option<N>) -> bool {
        self.0
            .chunk_by(|a, b| a.0 == b.0)
            .filter(|same_hash| same_hash.len() > 1)
            .any(|same_hash| {
                let mut names: Vec<Option<N>> = same_hash.iter().map(|h| name_at(h.1)).collect();
                names.sort_unstable();
                names.windows(2).any(|pair| pair[0] == pair[1])
            })
    }

    /// Whether `name` is listed.
    fn lists<N: PartialEq>(&self, name: &str, name_at: impl Fn(u32) -> Option<N>) -> bool
    where
        for<'n> &'n str: PartialEq<N>,
    {
        let hash = name_hash(name);
        let from = self.0.partition_point(|h| h.0 < hash);
        self.0[from..]
            .iter()
            .take_while(|h| h.0 == hash)
            .any(|h| name_at(h.1).is_some_and(|listed| name == listed))
    }
}

/// What a delta carries to turn `held` into `wanted` (keyed by `key`, the last of a key
/// winning, as in a build): the values that differ, and the keys that leave.
fn differences<V: PartialEq>(
    held: &imbl::OrdMap<String, V>,
    wanted: Vec<V>,
    key: fn(&V) -> String,
) -> (Vec<V>, Vec<String>) {
    let wanted: BTreeMap<String, V> = wanted.into_iter().map(|v| (key(&v), v)).collect();
    let leaving = absent(held.keys(), |k| wanted.contains_key(k));
    let differing = wanted
        .into_iter()
        .filter(|(k, v)| held.get(k) != Some(v))
        .map(|(_, v)| v)
        .collect();
    (differing, leaving)
}

/// The keys in `keys` that `kept` does not keep, as a delta names them.
fn absent<'k, K: ToString + 'k>(
    keys: impl Iterator<Item = &'k K>,
    kept: impl Fn(&K) -> bool,
) -> Vec<String> {
    keys.filter(|k| !kept(k)).map(ToString::to_string).collect()
}

/// A local workload with what its authorization is resolved from.
#[derive(Clone, Debug)]
struct Local {
    workload: Arc<Workload>,
    labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct Index {
    generation: Generation,
    node: String,
    root_namespace: String,
    source: String,
    by_uid: Map<Arc<str>, Known>,
    by_ip: Map<IpAddr, Arc<Workload>>,
    services: Map<Arc<str>, Arc<Service>>,
    /// (vip, service port) -> (service, target port).
    by_vip: Map<SocketAddr, (Arc<Service>, u16)>,
    local: imbl::OrdMap<Arc<str>, Local>,
    identities: Arc<HashMap<SpiffeId, schema::Identity>>,
    trust_roots: Arc<Vec<Vec<u8>>>,
    policy_sources: imbl::OrdMap<String, schema::AuthorizationPolicy>,
    peer_authentications: imbl::OrdMap<String, schema::PeerAuthentication>,
    policies: Arc<Policies>,
    /// Per local workload: the policies that apply to it and its mTLS mode.
    local_authz: Arc<HashMap<Arc<str>, (Applicable, PeerAuth)>>,
}

/// Shares what a build meets many times: strings (namespaces, nodes, identities' parts,
/// canonical names), identities and owners, one allocation per distinct value instead of one
/// per workload.
#[derive(Default)]
struct Interner<'a> {
    strings: HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// By the addresses of their interned parts (trust domain, namespace, service account):
    /// `strings` holds one allocation per value for the interner's life, so equal addresses
    /// are equal strings, and no part is hashed again.
    identities: HashMap<[usize; 3], SpiffeId, foldhash::fast::RandomState>,
    /// By the addresses of their interned fields (in `OwnerFields` order), as identities are.
    owners: HashMap<[usize; 6], Arc<Owner>, foldhash::fast::RandomState>,
    /// The last owner, by its fields as the snapshot has them, and the last node. The
    /// Kubernetes source publishes pods in `namespace/name` order, so a Deployment's pods
    /// follow one another: a hit costs a few comparisons and one count update.
    recent_owner: Option<(OwnerFields<'a>, Arc<Owner>)>,
    recent_node: Option<Arc<str>>,
}

/// An owner's fields as a workload carries them: namespace, trust domain, service account,
/// canonical service and revision, workload name.
type OwnerFields<'a> = [&'a str; 6];

/// An interned string's address: its identity within one interner.
fn address(s: &Arc<str>) -> usize {
    Arc::as_ptr(s).cast::<u8>() as usize
}

impl<'a> Interner<'a> {
    fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(known) = self.strings.get(s) {
            return known.clone();
        }
        let shared: Arc<str> = s.into();
        self.strings.insert(shared.clone());
        shared
    }

    fn node(&mut self, node: &str) -> Arc<str> {
        if let Some(last) = self.recent_node.as_ref().filter(|last| ***last == *node) {
            return last.clone();
        }
        let shared = self.string(node);
        self.recent_node = Some(shared.clone());
        shared
    }

    /// The owner with `fields`, or with the canonical names `resolved` here in place of the
    /// (empty) ones in `fields`.
    fn owner(
        &mut self,
        fields: OwnerFields<'a>,
        resolved: Option<(&str, &str)>,
    ) -> Result<Arc<Owner>, SpiffeIdError> {
        let recent = self.recent_owner.as_ref();
        if let Some((_, owner)) = recent.filter(|(last, _)| resolved.is_none() && *last == fields) {
            return Ok(owner.clone());
        }
        let mut named = fields;
        if let Some((service, revision)) = resolved {
            named[3] = service;
            named[4] = revision;
        }
        let parts = named.map(|s| self.string(s));
        let key = parts.each_ref().map(address);
        let owner = match self.owners.get(&key) {
            Some(known) => known.clone(),
            None => {
                let [namespace, domain, account, service, revision, workload_name] = parts;
                let identity = self.identity(&domain, &namespace, &account)?;
                let owner = Arc::new(Owner {
                    namespace,
                    identity,
                    canonical_service: service,
                    canonical_revision: revision,
                    workload_name,
                });
                self.owners.insert(key, owner.clone());
                owner
            }
        };
        if resolved.is_none() {
            self.recent_owner = Some((fields, owner.clone()));
        }
        Ok(owner)
    }

    /// The identity of interned parts.
    fn identity(
        &mut self,
        trust_domain: &Arc<str>,
        namespace: &Arc<str>,
        service_account: &Arc<str>,
    ) -> Result<SpiffeId, SpiffeIdError> {
        let key = [trust_domain, namespace, service_account].map(address);
        if let Some(known) = self.identities.get(&key) {
            return Ok(known.clone());
        }
        let id = SpiffeId::new(trust_domain, namespace, service_account)?;
        self.identities.insert(key, id.clone());
        Ok(id)
    }
}

/// Parses and checks one workload of the snapshot for a node; returns it with its labels,
/// which the caller keeps for local workloads only (their policies are resolved from them).
fn parse_workload<'a>(
    w: WorkloadView<'a>,
    node: &str,
    interner: &mut Interner<'a>,
) -> Result<(Arc<Workload>, BTreeMap<String, String>), IndexError> {
    let bad = |field, problem: String| IndexError::Workload {
        uid: w.uid.to_owned(),
        field,
        problem,
    };
    let ips = w
        .ips
        .iter()
        .map(|b| ip_from_bytes(b).ok_or_else(|| bad("ips", format!("{} bytes", b.len()))))
        .collect::<Result<Addresses, _>>()?;
    let netns = if w.node != node {
        NetnsSource::None
    } else if w.netns_from_agent {
        NetnsSource::Agent
    } else if !w.netns_path.is_empty() {
        NetnsSource::Path(w.netns_path.to_owned())
    } else {
        NetnsSource::None
    };
    // Labels become a map only where something reads them: policies of local workloads, and
    // canonical names an older agent left for the reader to resolve.
    let labels = if netns != NetnsSource::None || w.canonical_service.is_empty() {
        w.labels()
    } else {
        BTreeMap::new()
    };
    let resolved = w
        .canonical_service
        .is_empty()
        .then(|| schema::canonical_names(w.name, &labels));
    let fields = [
        w.namespace,
        w.trust_domain,
        w.service_account,
        w.canonical_service,
        w.canonical_revision,
        w.workload_name(),
    ];
    let owner = interner
        .owner(
            fields,
            resolved.as_ref().map(|(s, r)| (s.as_str(), r.as_str())),
        )
        .map_err(|e| bad("identity", e.to_string()))?;
    let protocol = Protocol::try_from(w.protocol).unwrap_or(Protocol::Hbone);
    let waypoint = parse_waypoint(w.waypoint, w.unresolved_waypoint)
        .map_err(|problem| bad("waypoint", problem))?;
    // Straight into its shared allocation: a workload is over 100 bytes, moved once.
    Ok((
        Arc::new(Workload {
            uid: w.uid.into(),
            name: w.name.to_owned(),
            owner,
            ips,
            node: interner.node(w.node),
            protocol,
            netns,
            waypoint: waypoint.map(Box::new),
        }),
        labels,
    ))
}

/// A waypoint as the snapshot carries it: an address (`ip:port`), or a hostname that has
/// none yet; both empty for none.
fn parse_waypoint(address: &str, unresolved: &str) -> Result<Option<Waypoint>, String> {
    match (address, unresolved) {
        ("", "") => Ok(None),
        ("", hostname) => Ok(Some(Waypoint::Unresolved(hostname.into()))),
        (address, "") => match address.parse::<SocketAddr>() {
            Ok(waypoint) if waypoint.port() != 0 => Ok(Some(Waypoint::At(waypoint))),
            _ => Err(format!("{address:?} is not an ip:port")),
        },
        (address, hostname) => Err(format!(
            "both an address ({address:?}) and an unresolved hostname ({hostname:?})"
        )),
    }
}

/// From this many workloads, a build parses them on several threads (and runs its other
/// independent steps two at a time, see `join`). Below it a whole build
/// takes a few milliseconds on one (measured at 1k: 0.6 ms), and the gain was measured only
/// at 100k and 1M (bench-results/README.md).
const PARALLEL_PARSE_FROM: usize = 16 * 1024;

/// An encoded snapshot from which a build counts as large for [`set_build_thread_start`]:
/// about 11k workloads at the 184 bytes each that snapbench's clusters take.
const LARGE_BUILD_BYTES: usize = 2 << 20;

/// At most this many threads parse a build's workloads and services (the watcher's and
/// helpers).
const PARSE_THREADS: usize = 4;

/// How many threads read `workloads` records, in a build or a comparison.
fn threads_for(workloads: usize) -> usize {
    if workloads < PARALLEL_PARSE_FROM {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(PARSE_THREADS)
}

/// What parsing a build's workloads gives: all of them in order, twice (a reference for the
/// uid map and one for the address map, each moved into its map), and the local ones again
/// with the labels their policies are resolved from. A reference is taken while the workload
/// is new in the cache: dropping a third one per workload after the maps were built was a
/// pass over cold counts, 2-5 ms at 100k on the build's critical path.
#[derive(Debug)]
struct Parsed {
    workloads: Vec<Known>,
    addressed: Vec<Arc<Workload>>,
    locals: Vec<Local>,
}

/// Runs `each` on every run, each on its own thread (the calling thread takes the first), and
/// returns their results in run order.
fn in_runs<I: Send, R: Send>(mut runs: Vec<I>, each: &(impl Fn(I) -> R + Sync)) -> Vec<R> {
    if runs.len() > 1 {
        // This thread takes the first half, a helper the rest (which halves it again).
        let rest = runs.split_off(runs.len() / 2);
        let (mut first, rest) = join(true, || in_runs(runs, each), || in_runs(rest, each));
        first.extend(rest);
        return first;
    }
    runs.into_iter().map(each).collect()
}

/// Parses every workload, the runs in parallel, and returns them in order. The first
/// malformed workload in snapshot order refuses the whole, as it would on one thread.
fn parse_workloads<'a, W>(runs: Vec<W>, node: &str) -> Result<Parsed, IndexError>
where
    W: ExactSizeIterator<Item = Result<WorkloadView<'a>, DecodeError>> + Send,
{
    let parse_run = |run: W| -> Result<Parsed, IndexError> {
        // Each run has its own interner: a shared string is allocated once per run.
        let mut interner = Interner::default();
        let mut parsed = Parsed {
            workloads: Vec::with_capacity(run.len()),
            addressed: Vec::with_capacity(run.len()),
            locals: Vec::new(),
        };
        for w in run {
            let w = w.map_err(payload_error)?;
            let record = fingerprint(w.record);
            let (workload, labels) = parse_workload(w, node, &mut interner)?;
            if workload.netns != NetnsSource::None {
                parsed.locals.push(Local {
                    workload: workload.clone(),
                    labels,
                });
            }
            parsed.addressed.push(workload.clone());
            parsed.workloads.push(Known { workload, record });
        }
        Ok(parsed)
    };
    let count = runs.iter().map(ExactSizeIterator::len).sum();
    let mut all = Parsed {
        workloads: Vec::with_capacity(count),
        addressed: Vec::with_capacity(count),
        locals: Vec::new(),
    };
    for run in in_runs(runs, &parse_run) {
        let run = run?;
        all.workloads.extend(run.workloads);
        all.addressed.extend(run.addressed);
        all.locals.extend(run.locals);
    }
    Ok(all)
}

/// Services with their keys.
type Keyed = Vec<(Arc<str>, Arc<Service>)>;

/// Parses every service, the runs in parallel, and returns them in order with their keys, or
/// the first malformed one in snapshot order.
fn parse_services<'a, S>(runs: Vec<S>) -> Result<Keyed, IndexError>
where
    S: ExactSizeIterator<Item = Result<ServiceView<'a>, DecodeError>> + Send,
{
    let parse_run = |run: S| -> Result<Keyed, IndexError> {
        run.map(|s| {
            let s = s.map_err(payload_error)?;
            Ok((Arc::<str>::from(s.key()), Arc::new(parse_service(&s)?)))
        })
        .collect()
    };
    let mut all = Vec::new();
    for run in in_runs(runs, &parse_run) {
        all.extend(run?);
    }
    Ok(all)
}

fn payload_error(error: DecodeError) -> IndexError {
    IndexError::Payload(error.to_string())
}

/// Takes out the services that leave (`removed`, and the old versions of `incoming`) with
/// the frontends that still route to them, then puts `incoming` in by key and by each of its
/// frontends.
fn replace_services(
    services: &mut Map<Arc<str>, Arc<Service>>,
    by_vip: &mut Map<SocketAddr, (Arc<Service>, u16)>,
    removed: &[String],
    incoming: Keyed,
) {
    let leaving = removed
        .iter()
        .map(String::as_str)
        .chain(incoming.iter().map(|(key, _)| &**key));
    for key in leaving {
        let Some(old) = services.remove(key) else {
            continue;
        };
        for (frontend, _) in &old.frontends {
            if by_vip
                .get(frontend)
                .is_some_and(|(s, _)| Arc::ptr_eq(s, &old))
            {
                by_vip.remove(frontend);
            }
        }
    }
    for (key, service) in incoming {
        for (frontend, target) in &service.frontends {
            by_vip.insert(*frontend, (service.clone(), *target));
        }
        services.insert(key, service);
    }
}

/// Puts `workload` in by `ip`; an address another workload has is refused.
fn place_address(
    by_ip: &mut Map<IpAddr, Arc<Workload>>,
    ip: IpAddr,
    workload: Arc<Workload>,
) -> Result<(), IndexError> {
    match by_ip.insert(ip, workload) {
        None => Ok(()),
        Some(first) => Err(IndexError::DuplicateIp {
            ip,
            first: first.uid.to_string(),
            second: by_ip
                .get(&ip)
                .map_or_else(String::new, |w| w.uid.to_string()),
        }),
    }
}

/// What every thread that takes part in a large build runs before its share, as the process
/// set it (the data plane puts the thread's malloc heap on huge pages there). Set once,
/// before any build.
static BUILD_THREAD_START: OnceLock<fn()> = OnceLock::new();

/// Sets what every thread that takes part in a large build runs first: the thread that
/// builds from an encoded snapshot of 2 MiB or more (`LARGE_BUILD_BYTES`), and each helper of
/// a build parsed in parallel. A second call changes nothing. Small builds skip it: a huge page
/// for a heap that holds a few workloads would cost more memory than the build.
pub fn set_build_thread_start(start: fn()) {
    let _ = BUILD_THREAD_START.set(start);
}

fn build_thread_started() {
    if let Some(start) = BUILD_THREAD_START.get() {
        start();
    }
}

/// Runs `a` and `b`: on the calling thread and a helper at once when `parallel`, else one
/// after the other. The helper inherits the calling thread's scheduling class: the watcher
/// leaves its real-time class before a whole build, so helpers never run above the workers.
fn join<A, B>(parallel: bool, a: impl FnOnce() -> A, b: impl FnOnce() -> B + Send) -> (A, B)
where
    B: Send,
{
    if !parallel {
        let a = a();
        return (a, b());
    }
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| {
            build_thread_started();
            b()
        });
        let a = a();
        match helper.join() {
            Ok(b) => (a, b),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Parses and checks one service: its frontends with target ports.
fn parse_service(s: &ServiceView<'_>) -> Result<Service, IndexError> {
    let bad = |field, problem: String| IndexError::Service {
        name: format!("{}/{}", s.namespace, s.name),
        field,
        problem,
    };
    let vips = s
        .vips
        .iter()
        .map(|b| ip_from_bytes(b).ok_or_else(|| bad("vips", format!("{} bytes", b.len()))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut frontends = Vec::new();
    for p in &s.ports {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("ports", format!("port {} out of range", p.port)))?;
        let target = u16::try_from(p.target_port).map_err(|_| {
            bad(
                "ports",
                format!("target port {} out of range", p.target_port),
            )
        })?;
        let target = if target == 0 { port } else { target };
        for vip in &vips {
            frontends.push((SocketAddr::new(*vip, port), target));
        }
    }
    let listed = Listed::new(&s.endpoints)
        .ok_or_else(|| bad("endpoints", "more than 4 GiB of uids".to_owned()))?;
    let waypoint = parse_waypoint(s.waypoint, s.unresolved_waypoint)
        .map_err(|problem| bad("waypoint", problem))?;
    let hostname = if s.hostname.is_empty() {
        format!("{}.{}.svc.cluster.local", s.name, s.namespace)
    } else {
        s.hostname.to_owned()
    };
    Ok(Service {
        name: ServiceName {
            name: s.name.to_owned(),
            namespace: s.namespace.to_owned(),
            hostname,
        },
        frontends,
        waypoint,
        listed,
        record: fingerprint(s.record),
    })
}

impl Index {
    /// Builds and checks an index. Anything malformed refuses the whole snapshot: a data plane
    /// that half-applied a config would be harder to reason about than one that kept the last.
    pub fn build(mut snapshot: Snapshot, generation: Generation) -> Result<Index, IndexError> {
        let workloads = std::mem::take(&mut snapshot.workloads);
        let services = std::mem::take(&mut snapshot.services);
        Index::built(
            snapshot,
            vec![workloads.iter().map(|w| Ok(w.into()))],
            vec![services.iter().map(|s| Ok(s.into()))],
            generation,
        )
    }

    /// [`Index::build`] from an encoded snapshot (as the region holds it), reading its
    /// workloads and services in place: only what the index keeps is allocated.
    pub fn build_encoded(payload: &[u8], generation: Generation) -> Result<Index, IndexError> {
        // Before the view's own allocations, so that they are on the prepared heap too.
        if payload.len() >= LARGE_BUILD_BYTES {
            build_thread_started();
        }
        let mut view = SnapshotView::decode(payload).map_err(payload_error)?;
        let rest = std::mem::take(&mut view.rest);
        let threads = threads_for(view.workloads().len());
        Index::built(
            rest,
            view.workload_parts(threads).collect(),
            view.service_parts(threads).collect(),
            generation,
        )
    }

    /// Compares one run of workload records (the first at `first` in the snapshot) with this
    /// index. `None` when a record does not read or the run alone changes more than `budget`.
    fn compare_run<'a>(
        &self,
        first: usize,
        run: &[&'a [u8]],
        budget: usize,
    ) -> Option<ComparedRun<'a>> {
        let mut compared = ComparedRun {
            changed: Vec::new(),
            uids: Vec::with_capacity(run.len()),
            still_listed: 0,
        };
        for (at, record) in (first..).zip(run) {
            let uid = view::workload_uid(record).ok()?;
            compared
                .uids
                .push((name_hash(uid), u32::try_from(at).ok()?));
            if let Some(known) = self.by_uid.get(uid) {
                compared.still_listed += 1;
                if known.record.is_some() && known.record == fingerprint(record) {
                    continue;
                }
            }
            if compared.changed.len() == budget {
                return None;
            }
            compared.changed.push(view::workload(record).ok()?);
        }
        Some(compared)
    }

    /// This index's successor for a complete snapshot (`payload`, as the region holds it),
    /// made by comparing rather than building: workloads and services whose records are
    /// byte for byte those this index read stay shared with it, and the rest go in as a delta
    /// brings them. What a data plane meets when the agent restarts (a new epoch, mostly the
    /// world it had) or compacts its log while this reader was behind; a build would read
    /// every record again and hold two whole indexes at once.
    ///
    /// `None` when comparing does not pay or cannot tell, and the caller builds (a build also
    /// names whatever is malformed, in snapshot order): another node or root namespace, a uid
    /// or service listed twice, a record that does not read, more changed workloads than an
    /// eighth of this index's or [`FOLD_MIN`], whichever is more (past that its maps are copied
    /// anyway, see `layered`), or changes a build would refuse.
    pub fn rebase_encoded(&self, payload: &[u8], generation: Generation) -> Option<Rebased> {
        let mut view = SnapshotView::decode(payload).ok()?;
        let rest = std::mem::take(&mut view.rest);
        if rest.node != self.node || rest.root_namespace != self.root_namespace {
            return None;
        }
        let budget = (self.by_uid.len() / 8).max(FOLD_MIN);

        // Workloads: a record whose uid this index holds with the same fingerprint is kept.
        // Looking each uid up is most of a comparison (cache misses), so a large snapshot is
        // compared in runs on several threads, as a build parses it.
        let records = view.workload_records();
        let threads = threads_for(records.len());
        let chunk = records.len().div_ceil(threads).max(1);
        let runs: Vec<(usize, &[&[u8]])> = records
            .chunks(chunk)
            .enumerate()
            .map(|(n, run)| (n * chunk, run))
            .collect();
        let mut changed = Vec::new();
        let mut uids = Vec::with_capacity(records.len());
        let mut still_listed = 0;
        for run in in_runs(runs, &|(first, run)| self.compare_run(first, run, budget)) {
            let run = run?;
            changed.extend(run.changed);
            uids.extend(run.uids);
            still_listed += run.still_listed;
        }
        if changed.len() > budget {
            return None;
        }
        // A uid listed twice is a build's to refuse. Without one, every listed uid this index
        // holds counts once, so a count short of the index's means some left.
        let uids = Named::sorted(uids);
        let uid_at = |at: u32| view::workload_uid(records[at as usize]).ok();
        if uids.has_twins(uid_at) {
            return None;
        }
        let mut delta = Delta::default();
        if still_listed < self.by_uid.len() {
            let held = self.by_uid.iter().map(|(uid, _)| uid);
            delta.removed_workloads = absent(held, |uid| uids.lists(uid, uid_at));
        }
        if changed.len() + delta.removed_workloads.len() > budget {
            return None;
        }

        // Services, the same way by key.
        let records = view.service_records();
        let mut keys = Vec::with_capacity(records.len());
        let mut changed_services = Vec::new();
        let mut still_listed = 0;
        let mut key = String::new();
        for (at, record) in records.iter().enumerate() {
            let (namespace, name) = view::service_namespace_name(record).ok()?;
            delta::write_namespaced_key(&mut key, namespace, name);
            keys.push((name_hash(&key), u32::try_from(at).ok()?));
            if let Some(held) = self.services.get(key.as_str()) {
                still_listed += 1;
                if held.record.is_some() && held.record == fingerprint(record) {
                    continue;
                }
            }
            changed_services.push(view::service(record).ok()?);
        }
        let keys = Named::sorted(keys);
        let key_at = |at: u32| {
            let (namespace, name) = view::service_namespace_name(records[at as usize]).ok()?;
            Some(delta::namespaced_key(namespace, name))
        };
        if keys.has_twins(key_at) {
            return None;
        }
        if still_listed < self.services.len() {
            let held = self.services.iter().map(|(key, _)| key);
            delta.removed_services = absent(held, |key| keys.lists(key, key_at));
        }

        // The rest is small: what differs from this index's goes in (the last of a key wins,
        // as in a build), and what it lacks leaves.
        (delta.policies, delta.removed_policies) =
            differences(&self.policy_sources, rest.policies, delta::policy_key);
        (
            delta.peer_authentications,
            delta.removed_peer_authentications,
        ) = differences(
            &self.peer_authentications,
            rest.peer_authentications,
            delta::peer_authentication_key,
        );
        let mut identities = HashMap::with_capacity(rest.identities.len());
        for id in rest.identities {
            identities.insert(id.spiffe_id.parse::<SpiffeId>().ok()?, id);
        }
        if identities != *self.identities {
            delta.removed_identities =
                absent(self.identities.keys(), |id| identities.contains_key(id));
            delta.identities = identities
                .into_iter()
                .filter(|(id, identity)| self.identities.get(id) != Some(identity))
                .map(|(_, identity)| identity)
                .collect();
        }
        if rest.trust_roots != *self.trust_roots {
            delta.replace_trust_roots = true;
            delta.trust_roots = rest.trust_roots;
        }

        let changes = Changes {
            workloads: changed.len() + delta.removed_workloads.len(),
            services: changed_services.len() + delta.removed_services.len(),
        };
        let mut next = self
            .clone()
            .applied(
                vec![changed.into_iter().map(Ok)],
                vec![changed_services.into_iter().map(Ok)],
                delta,
                generation,
            )
            .ok()?;
        next.source = rest.source;
        next.fold_maps(false);
        Some(Rebased {
            index: next,
            changes,
        })
    }

    /// An index of `rest` (a snapshot without its workloads and services) with `workloads`
    /// and `services`, each in consecutive runs that are parsed in parallel.
    fn built<'a>(
        rest: Snapshot,
        workloads: Vec<impl ExactSizeIterator<Item = Result<WorkloadView<'a>, DecodeError>> + Send>,
        services: Vec<impl ExactSizeIterator<Item = Result<ServiceView<'a>, DecodeError>> + Send>,
        generation: Generation,
    ) -> Result<Index, IndexError> {
        let mut empty = Index::empty();
        empty.node = rest.node;
        empty.root_namespace = rest.root_namespace;
        empty.generation = generation;
        let delta = Delta {
            policies: rest.policies,
            peer_authentications: rest.peer_authentications,
            identities: rest.identities,
            replace_trust_roots: true,
            trust_roots: rest.trust_roots,
            source: rest.source,
            ..Delta::default()
        };
        // Nothing shares the empty maps: the build writes the hash maps in place.
        let mut index = empty.applied(workloads, services, delta, generation)?;
        index.fold_maps(true);
        Ok(index)
    }

    /// The next generation: this index with `delta` applied. Untouched parts are shared with
    /// `self`; a delta with anything malformed is refused whole and `self` stays as it was.
    pub fn apply(&self, mut delta: Delta, generation: Generation) -> Result<Index, IndexError> {
        let workloads = std::mem::take(&mut delta.workloads);
        let services = std::mem::take(&mut delta.services);
        let mut next = self.clone().applied(
            vec![workloads.iter().map(|w| Ok(w.into()))],
            vec![services.iter().map(|s| Ok(s.into()))],
            delta,
            generation,
        )?;
        next.fold_maps(false);
        Ok(next)
    }

    /// Folds overlays into their bases: all of them, or those grown large.
    fn fold_maps(&mut self, all: bool) {
        if all {
            self.by_uid.fold();
            self.by_ip.fold();
            self.services.fold();
            self.by_vip.fold();
        } else {
            self.by_uid.fold_if_large();
            self.by_ip.fold_if_large();
            self.services.fold_if_large();
            self.by_vip.fold_if_large();
        }
    }

    /// Applies `workloads` and `services` (changed or new, each in consecutive runs that are
    /// parsed in parallel) and the rest of `delta`, whose own workload and service lists are
    /// not read.
    fn applied<'a>(
        self,
        workloads: Vec<impl ExactSizeIterator<Item = Result<WorkloadView<'a>, DecodeError>> + Send>,
        services: Vec<impl ExactSizeIterator<Item = Result<ServiceView<'a>, DecodeError>> + Send>,
        delta: Delta,
        generation: Generation,
    ) -> Result<Index, IndexError> {
        let mut next = self;
        next.generation = generation;
        // Into an empty index (a build) nothing leaves.
        let from_empty = next.by_uid.is_empty() && next.services.is_empty();
        if !delta.source.is_empty() {
            next.source = delta.source;
        }

        // A build large enough to parse on several threads also runs its independent steps
        // two at a time.
        let parallel = workloads.len() > 1;
        let count = workloads.iter().map(ExactSizeIterator::len).sum();
        let service_count = services.iter().map(ExactSizeIterator::len).sum();
        next.by_uid.reserve(count);
        next.by_ip.reserve(count);
        next.services.reserve(service_count);
        next.by_vip.reserve(service_count);
        let Parsed {
            workloads,
            addressed,
            locals,
        } = parse_workloads(workloads, &next.node)?;
        // A malformed service is reported after a uid or an address twice, the order one
        // thread meets them in.
        let (incoming, malformed_service) = match parse_services(services) {
            Ok(incoming) => (incoming, None),
            Err(error) => (Vec::new(), Some(error)),
        };

        // Workloads: every changed or removed one leaves first (with its addresses), so that
        // two pods swapping addresses in one delta is not a conflict.
        let mut local_changed = !locals.is_empty();
        let leaving = delta
            .removed_workloads
            .iter()
            .map(String::as_str)
            .chain(workloads.iter().map(|w| &*w.workload.uid));
        for uid in leaving.take_while(|_| !from_empty) {
            if let Some(old) = next.by_uid.remove(uid) {
                for ip in &old.workload.ips {
                    next.by_ip.remove(ip);
                }
                // Only touch the local map when it holds the pod: an unchanged map tells
                // workers to skip listener work.
                if next.local.contains_key(uid) {
                    next.local.remove(uid);
                    local_changed = true;
                }
            }
        }
        // Then each goes in by uid while they go in by address, and the services after them
        // on the address side, the shorter of the two (9-12 ms at 100k, the uid side 10-14).
        let (by_uid, by_ip) = join(
            parallel,
            || -> Result<(), IndexError> {
                for local in locals {
                    next.local.insert(local.workload.uid.clone(), local);
                }
                for known in workloads {
                    let uid = known.workload.uid.clone();
                    if let Some(first) = next.by_uid.insert(uid, known) {
                        return Err(IndexError::DuplicateUid(first.workload.uid.to_string()));
                    }
                }
                Ok(())
            },
            || -> Result<(), IndexError> {
                for workload in addressed {
                    // The list's reference goes in with the last address: for a pod with one,
                    // no count is updated on the line the uid side is reading.
                    let Some((&last, others)) = workload.ips.split_last() else {
                        continue;
                    };
                    for &ip in others {
                        place_address(&mut next.by_ip, ip, workload.clone())?;
                    }
                    place_address(&mut next.by_ip, last, workload)?;
                }
                replace_services(
                    &mut next.services,
                    &mut next.by_vip,
                    &delta.removed_services,
                    incoming,
                );
                Ok(())
            },
        );
        by_uid?;
        by_ip?;
        if let Some(error) = malformed_service {
            return Err(error);
        }

        // Identities and trust roots: small, rebuilt whole when touched.
        if !delta.identities.is_empty() || !delta.removed_identities.is_empty() {
            let mut identities = HashMap::clone(&next.identities);
            for id in &delta.removed_identities {
                if let Ok(parsed) = id.parse::<SpiffeId>() {
                    identities.remove(&parsed);
                }
            }
            for id in delta.identities {
                let parsed: SpiffeId = id
                    .spiffe_id
                    .parse()
                    .map_err(|e| IndexError::Identity(e, id.spiffe_id.clone()))?;
                identities.insert(parsed, id);
            }
            next.identities = Arc::new(identities);
        }
        if delta.replace_trust_roots {
            next.trust_roots = Arc::new(delta.trust_roots);
        }

        // Policies: compiled whole when any changes; local workloads' scopes re-resolved when
        // policies or the local workloads change.
        let policies_changed = !delta.policies.is_empty()
            || !delta.removed_policies.is_empty()
            || !delta.peer_authentications.is_empty()
            || !delta.removed_peer_authentications.is_empty();
        for key in &delta.removed_policies {
            next.policy_sources.remove(key);
        }
        for p in delta.policies {
            next.policy_sources.insert(delta::policy_key(&p), p);
        }
        for key in &delta.removed_peer_authentications {
            next.peer_authentications.remove(key);
        }
        for p in delta.peer_authentications {
            next.peer_authentications
                .insert(delta::peer_authentication_key(&p), p);
        }
        if policies_changed {
            let sources: Vec<schema::AuthorizationPolicy> =
                next.policy_sources.values().cloned().collect();
            next.policies = Arc::new(Policies::build(&sources, next.root_namespace()));
        }
        if policies_changed || local_changed {
            next.resolve_local_authz();
        }
        Ok(next)
    }

    fn root_namespace(&self) -> &str {
        if self.root_namespace.is_empty() {
            authz::DEFAULT_ROOT_NAMESPACE
        } else {
            &self.root_namespace
        }
    }

    /// Enforcement happens at the destination: scopes are resolved for local pods only.
    fn resolve_local_authz(&mut self) {
        let peer_authentications: Vec<schema::PeerAuthentication> =
            self.peer_authentications.values().cloned().collect();
        let root = self.root_namespace().to_owned();
        let resolved = self
            .local
            .iter()
            .map(|(uid, local)| {
                let w = &local.workload;
                (
                    uid.clone(),
                    (
                        self.policies.applicable(&w.owner.namespace, &local.labels),
                        PeerAuth::resolve(
                            &peer_authentications,
                            &root,
                            &w.owner.namespace,
                            &local.labels,
                        ),
                    ),
                )
            })
            .collect();
        self.local_authz = Arc::new(resolved);
    }

    /// An index with nothing in it: what a data plane serves before its first snapshot.
    pub fn empty() -> Index {
        Index {
            generation: Generation::default(),
            node: String::new(),
            root_namespace: String::new(),
            source: String::new(),
            by_uid: Map::default(),
            by_ip: Map::default(),
            services: Map::default(),
            by_vip: Map::default(),
            local: imbl::OrdMap::new(),
            identities: Arc::default(),
            trust_roots: Arc::default(),
            policy_sources: imbl::OrdMap::new(),
            peer_authentications: imbl::OrdMap::new(),
            policies: Arc::default(),
            local_authz: Arc::default(),
        }
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }
    pub fn node(&self) -> &str {
        &self.node
    }
    pub fn source(&self) -> &str {
        &self.source
    }
    /// Drops this index, freeing the workloads only it holds in address order. Dropped as
    /// any value is, they go in hash order: scattered chunks, which glibc spends most of the
    /// free unlinking and merging. At 100k workloads address order, its sort included, takes
    /// the free to about x0.4 (bench-results/README.md). An index whose workload map another
    /// generation shares (a pod change's) frees a few overlay entries, as before.
    pub fn release(mut self) {
        let by_uid = std::mem::take(&mut self.by_uid);
        // Every other reference this index holds to its workloads goes first, so that a
        // count of one below means this index was the last holder.
        drop(self);
        let Some(mut workloads) = by_uid.into_values_if_unshared() else {
            return;
        };
        // Those a later generation still holds are only let go.
        workloads.retain(|known| Arc::strong_count(&known.workload) == 1);
        workloads.sort_unstable_by_key(|known| Arc::as_ptr(&known.workload) as usize);
        drop(workloads);
    }

    pub fn workload_count(&self) -> usize {
        self.by_uid.len()
    }
    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.by_uid.values().map(|known| &*known.workload)
    }
    /// Every service, in no particular order.
    pub fn services(&self) -> Vec<ServiceSummary<'_>> {
        self.services
            .values()
            .map(|s| {
                let mut frontends: Vec<SocketAddr> = s.frontends.iter().map(|(a, _)| *a).collect();
                frontends.sort();
                frontends.dedup();
                let present = s.listed.iter().filter(|uid| self.by_uid.contains_key(*uid));
                ServiceSummary {
                    name: &s.name,
                    frontends,
                    endpoints: present.count(),
                    waypoint: s.waypoint.as_ref(),
                }
            })
            .collect()
    }

    pub fn trust_roots(&self) -> &[Vec<u8>] {
        &self.trust_roots
    }

    /// Workloads on this node that the data plane serves from inside their network namespace,
    /// by uid.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.local.values().map(|l| &*l.workload)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|w| &**w)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.by_uid.get(uid).map(|known| &*known.workload)
    }

    /// Certificate chain and key for a local identity.
    pub fn identity(&self, id: &SpiffeId) -> Option<&schema::Identity> {
        self.identities.get(id)
    }

    pub fn identities(&self) -> impl Iterator<Item = (&SpiffeId, &schema::Identity)> {
        self.identities.iter()
    }

    /// Whether `other` has the same certificates, keys and trust roots (TLS configs built for
    /// one serve the other).
    pub fn same_tls_material(&self, other: &Index) -> bool {
        Arc::ptr_eq(&self.identities, &other.identities)
            && Arc::ptr_eq(&self.trust_roots, &other.trust_roots)
    }

    /// Whether `other` decides every inbound connection as this one does (same policies, same
    /// local workloads and scopes), so live connections need no re-check.
    pub fn same_authorization(&self, other: &Index) -> bool {
        Arc::ptr_eq(&self.policies, &other.policies)
            && Arc::ptr_eq(&self.local_authz, &other.local_authz)
    }

    /// Whether `other` has the same local workloads (listeners to open or close).
    pub fn same_local_workloads(&self, other: &Index) -> bool {
        self.local.ptr_eq(&other.local)
    }

    /// Authorizes an inbound connection to local workload `uid`. A workload this node does not
    /// serve gets no policies resolved and is refused.
    pub fn authorize(&self, uid: &str, connection: &authz::Connection) -> Decision {
        match self.local_authz.get(uid) {
            Some((applicable, _)) => self.policies.evaluate(applicable, connection),
            None => Decision {
                allowed: false,
                reason: authz::Reason::NotAllowed,
                audited: Vec::new(),
                dry_run: None,
            },
        }
    }

    /// Whether plaintext to `port` of local workload `uid` is refused (PeerAuthentication).
    pub fn inbound_mtls(&self, uid: &str, port: u16) -> Mtls {
        self.local_authz
            .get(uid)
            .map_or(Mtls::Permissive, |(_, peer)| peer.mode(port))
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Decides where an outbound connection to `dst` goes. `pick` spreads service traffic over
    /// endpoints (callers pass a per-worker counter, so selection is round robin per core).
    /// A service VIP goes to the service's waypoint if it has one, a workload's address to
    /// the workload's (as ztunnel: what was dialled decides which waypoint, so a service
    /// without one reaches its endpoints directly even when they have one).
    pub fn route_outbound(&self, dst: SocketAddr, pick: u64) -> Route<'_> {
        if let Some((service, target_port)) = self.by_vip.get(&dst) {
            if let Some(waypoint) = &service.waypoint {
                return self.via_waypoint(waypoint, dst, Some(&service.name), pick);
            }
            let Some(workload) = self.endpoint(service, pick) else {
                return Route::NoEndpoint { service: dst };
            };
            let route = match address_like(workload, dst) {
                Some(ip) => self.route_to_workload(workload, SocketAddr::new(ip, *target_port)),
                None => Route::NoEndpoint { service: dst },
            };
            return match route {
                Route::Hbone {
                    destination,
                    target,
                    tunnel,
                    ..
                } => Route::Hbone {
                    destination,
                    target,
                    tunnel,
                    service: Some(&service.name),
                },
                other => other,
            };
        }
        match self.workload_by_ip(dst.ip()) {
            Some(workload) => match workload.waypoint.as_deref() {
                Some(waypoint) => self.via_waypoint(waypoint, dst, None, pick),
                None => self.route_to_workload(workload, dst),
            },
            None => Route::Passthrough { target: dst },
        }
    }

    /// Through `waypoint` (a service VIP and port, or a pod's address and port) to `target`,
    /// which is CONNECTed as dialled (ztunnel's "to server waypoint"): HBONE to one of the
    /// waypoint's pods, proving that pod's identity. Waypoint pods terminate HBONE
    /// themselves whether or not they are enrolled.
    fn via_waypoint<'a>(
        &'a self,
        waypoint: &'a Waypoint,
        target: SocketAddr,
        service: Option<&'a ServiceName>,
        pick: u64,
    ) -> Route<'a> {
        let waypoint = match waypoint {
            Waypoint::At(address) => *address,
            Waypoint::Unresolved(hostname) => return Route::UnresolvedWaypoint { hostname },
        };
        let (pod, port) = match self.by_vip.get(&waypoint) {
            Some((waypoint_service, port)) => (self.endpoint(waypoint_service, pick), *port),
            None => (self.workload_by_ip(waypoint.ip()), waypoint.port()),
        };
        match pod.and_then(|pod| Some((pod, address_like(pod, target)?))) {
            Some((pod, ip)) => Route::Hbone {
                destination: pod,
                target,
                tunnel: SocketAddr::new(ip, port),
                service,
            },
            None => Route::NoWaypoint { waypoint },
        }
    }

    /// The endpoint `pick` selects: the listed uid at `pick`, one lookup, when this index has
    /// its workload. When it has not (a pod listed before it arrived, or after it left), one
    /// of those it has, chosen by the rest of `pick`: so every endpoint present takes the
    /// same share, and only picks that land on a missing one pay a scan of the list.
    fn endpoint(&self, service: &Service, pick: u64) -> Option<&Workload> {
        let listed = &service.listed;
        let n = listed.len() as u64;
        if n == 0 {
            return None;
        }
        if let Some(known) = self.by_uid.get(listed.get((pick % n) as usize)) {
            return Some(&known.workload);
        }
        let present = || listed.iter().filter_map(|uid| self.by_uid.get(uid));
        let count = present().count() as u64;
        if count == 0 {
            return None;
        }
        present()
            .nth(((pick / n) % count) as usize)
            .map(|known| &*known.workload)
    }

    fn route_to_workload<'a>(&'a self, workload: &'a Workload, target: SocketAddr) -> Route<'a> {
        match workload.protocol {
            Protocol::Hbone => Route::Hbone {
                destination: workload,
                target,
                tunnel: SocketAddr::new(target.ip(), ports::HBONE),
                service: None,
            },
            Protocol::Tcp => Route::Passthrough { target },
        }
    }
}

/// The workload's address of `like`'s family, else its first.
fn address_like(workload: &Workload, like: SocketAddr) -> Option<IpAddr> {
    workload
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or_else(|| workload.ips.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_snapshot::schema::{Identity, Service as SnapService, ServicePort, Workload as W};

    fn workload(uid: &str, ip: [u8; 4], node: &str, protocol: Protocol, netns: &str) -> W {
        W {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            service_account: format!("sa-{uid}"),
            trust_domain: "cluster.local".into(),
            ips: vec![ip.to_vec()],
            node: node.into(),
            protocol: protocol as i32,
            netns_path: netns.into(),
            ..Default::default()
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            node: "n1".into(),
            workloads: vec![
                workload(
                    "client",
                    [10, 0, 1, 2],
                    "n1",
                    Protocol::Hbone,
                    "/run/netns/c",
                ),
                workload("server-a", [10, 0, 2, 2], "n2", Protocol::Hbone, ""),
                workload("server-b", [10, 0, 2, 3], "n2", Protocol::Hbone, ""),
                workload("legacy", [10, 0, 2, 9], "n2", Protocol::Tcp, ""),
            ],
            services: vec![
                SnapService {
                    name: "server".into(),
                    namespace: "default".into(),
                    vips: vec![vec![10, 96, 0, 10]],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 8080,
                    }],
                    endpoints: vec!["server-a".into(), "server-b".into(), "gone".into()],
                    ..Default::default()
                },
                SnapService {
                    name: "empty".into(),
                    namespace: "default".into(),
                    vips: vec![vec![10, 96, 0, 11]],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 0,
                    }],
                    ..Default::default()
                },
            ],
            identities: vec![Identity {
                spiffe_id: "spiffe://cluster.local/ns/default/sa/sa-client".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// What a reader of the index sees, in a comparable order.
    fn contents(index: &Index) -> Vec<String> {
        let mut seen: Vec<String> = index.workloads().map(|w| format!("{w:?}")).collect();
        seen.extend(index.services().iter().map(|s| format!("{s:?}")));
        seen.extend(index.local_workloads().map(|w| format!("local {}", w.uid)));
        seen.extend(index.identities().map(|(id, _)| format!("identity {id}")));
        seen.sort();
        seen
    }

    /// `index` with `delta` applied as generation `generation` of epoch 0.
    fn apply_at(index: &Index, delta: Delta, generation: u64) -> Index {
        let stamp = Generation {
            epoch: 0,
            generation,
        };
        index.apply(delta, stamp).expect("applies")
    }

    #[test]
    fn a_released_index_frees_its_own_workloads_and_leaves_a_later_generation_whole() {
        let first = Index::build(snapshot(), Generation::default()).expect("builds");
        let watched = Arc::downgrade(&first.by_uid.get("server-a").expect("server-a").workload);
        // The next generation shares the first one's workloads.
        let delta = Delta {
            workloads: vec![workload(
                "server-b",
                [10, 0, 2, 4],
                "n2",
                Protocol::Hbone,
                "",
            )],
            ..Delta::default()
        };
        // Releasing `older` leaves `newer` as it was, and the watched workload with it.
        let release_keeps = |older: Index, newer: &Index, why: &str| {
            let before = contents(newer);
            older.release();
            assert_eq!(contents(newer), before, "{why}");
            assert!(watched.upgrade().is_some(), "{why}");
        };
        let second = apply_at(&first, delta, 2);
        release_keeps(first, &second, "freed a workload the next generation holds");
        // A fold gives the next generation a base of its own; the one it replaced still
        // shares its workloads.
        let delta = Delta {
            removed_workloads: vec!["legacy".into()],
            ..Delta::default()
        };
        let mut third = apply_at(&second, delta, 3);
        third.fold_maps(true);
        release_keeps(second, &third, "freed a workload a folded generation holds");
        third.release();
        assert!(
            watched.upgrade().is_none(),
            "a workload outlived the last index holding it"
        );
    }

    #[test]
    fn an_encoded_snapshot_builds_the_index_its_decoded_form_builds() {
        let mut snap = snapshot();
        snap.workloads[0].labels = [("app".to_owned(), "client".to_owned())].into();
        snap.workloads[2].labels = [("app".to_owned(), "server".to_owned())].into();
        snap.workloads[1].canonical_service = "server".into();
        let payload = mesh_snapshot::encode(&snap);
        let in_place = Index::build_encoded(&payload, Generation::default()).expect("builds");
        let decoded = Index::build(snap, Generation::default()).expect("builds");
        assert_eq!(contents(&in_place), contents(&decoded));
        assert_eq!(in_place.workload_count(), 4);
        assert_eq!(
            in_place.route_outbound(addr("10.96.0.10:80"), 1),
            decoded.route_outbound(addr("10.96.0.10:80"), 1)
        );
    }

    /// The test snapshot with `n` more workloads (client-side pods on another node).
    fn with_many_workloads(n: usize) -> Snapshot {
        let mut snap = snapshot();
        let template = snap.workloads[1].clone();
        for i in 0..n {
            snap.workloads.push(W {
                uid: format!("pod-{i}"),
                name: format!("pod-{i}"),
                ips: vec![vec![10, 200, (i >> 8) as u8, i as u8]],
                ..template.clone()
            });
        }
        snap
    }

    #[test]
    fn a_build_large_enough_to_parse_on_several_threads_is_the_one_thread_build() {
        let mut snap = with_many_workloads(PARALLEL_PARSE_FROM + 100);
        // Local pods in every run, with the labels their policies are resolved from.
        for i in (7..PARALLEL_PARSE_FROM + 100).step_by(5000) {
            let w = &mut snap.workloads[4 + i];
            w.node = "n1".into();
            w.netns_path = format!("/run/netns/pod-{i}");
            w.labels = [("app".to_owned(), format!("app-{i}"))].into();
        }
        let payload = mesh_snapshot::encode(&snap);
        let in_place = Index::build_encoded(&payload, Generation::default()).expect("builds");
        let decoded = Index::build(snap, Generation::default()).expect("builds");
        assert_eq!(contents(&in_place), contents(&decoded));
        assert_eq!(in_place.local_workloads().count(), 5);
        // Three runs whatever this machine's core count: the same workloads, in order.
        let view = SnapshotView::decode(&payload).expect("decodes");
        let in_runs = parse_workloads(view.workload_parts(3).collect(), "n1").expect("parses");
        let in_one = parse_workloads(vec![view.workloads()], "n1").expect("parses");
        assert_eq!(in_runs.workloads.len(), PARALLEL_PARSE_FROM + 104);
        let local_uids = |parsed: &Parsed| -> Vec<String> {
            let uids = parsed.locals.iter().map(|l| l.workload.uid.to_string());
            uids.collect()
        };
        assert_eq!(
            local_uids(&in_runs),
            ["client", "pod-7", "pod-5007", "pod-10007", "pod-15007"]
        );
        assert_eq!(format!("{in_runs:?}"), format!("{in_one:?}"));
    }

    /// `with_many_workloads` with services listing the added pods ten at a time; the last one
    /// also lists a uid no workload has.
    fn with_many_services(n: usize) -> Snapshot {
        let mut snap = with_many_workloads(n);
        for s in 0..n.div_ceil(10) {
            let mut endpoints: Vec<String> = (s * 10..(s * 10 + 10).min(n))
                .map(|i| format!("pod-{i}"))
                .collect();
            if s == n.div_ceil(10) - 1 {
                endpoints.push("not-yet".into());
            }
            snap.services.push(SnapService {
                name: format!("app-{s}"),
                namespace: "default".into(),
                vips: vec![vec![10, 97, (s >> 8) as u8, s as u8]],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints,
                ..Default::default()
            });
        }
        snap
    }

    /// The index of `snap` built as a large build is: workloads and services parsed in three
    /// runs each, the other steps two at a time, whatever this machine's core count.
    fn built_in_parallel(snap: &Snapshot) -> Result<Index, IndexError> {
        let payload = mesh_snapshot::encode(snap);
        let mut view = SnapshotView::decode(&payload).map_err(payload_error)?;
        let rest = std::mem::take(&mut view.rest);
        let workloads = view.workload_parts(3).collect();
        let services = view.service_parts(3).collect();
        Index::built(rest, workloads, services, Generation::default())
    }

    static BUILD_THREADS_STARTED: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    thread_local! {
        static THIS_THREAD_STARTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The thread start these tests set: counts starts, and marks the thread it ran on.
    fn count_build_thread_start() {
        BUILD_THREADS_STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        THIS_THREAD_STARTED.with(|started| started.set(true));
    }

    #[test]
    fn every_helper_of_a_parallel_build_runs_the_process_s_thread_start_first() {
        use std::sync::atomic::Ordering;
        set_build_thread_start(count_build_thread_start);
        let before = BUILD_THREADS_STARTED.load(Ordering::Relaxed);
        built_in_parallel(&with_many_services(PARALLEL_PARSE_FROM + 100)).expect("builds");
        // Workloads and services in three runs each (two helpers each), then the two maps
        // (one helper). Other tests' builds in this process can only add to the count.
        let started = BUILD_THREADS_STARTED.load(Ordering::Relaxed) - before;
        assert!(started >= 5, "{started} helper starts");
    }

    #[test]
    fn the_building_thread_runs_the_thread_start_for_a_large_build_only() {
        set_build_thread_start(count_build_thread_start);
        let started_on_a_thread_by = |workloads: usize| {
            let payload = mesh_snapshot::encode(&with_many_workloads(workloads));
            let large = payload.len() >= LARGE_BUILD_BYTES;
            let started = std::thread::spawn(move || {
                Index::build_encoded(&payload, Generation::default()).expect("builds");
                THIS_THREAD_STARTED.with(std::cell::Cell::get)
            })
            .join()
            .expect("the build's thread");
            (large, started)
        };
        assert_eq!(started_on_a_thread_by(100), (false, false));
        let workloads = LARGE_BUILD_BYTES / 32;
        assert_eq!(
            started_on_a_thread_by(workloads),
            (true, true),
            "{workloads} workloads"
        );
    }

    #[test]
    fn a_build_on_several_threads_resolves_services_and_takes_changes_as_the_one_thread_build() {
        let n = PARALLEL_PARSE_FROM + 100;
        let snap = with_many_services(n);
        let parallel = built_in_parallel(&snap).expect("builds");
        let single = Index::build(snap.clone(), Generation::default()).expect("builds");
        assert_eq!(observable(&parallel), observable(&single));
        let vip = |s: usize| SocketAddr::new(IpAddr::from([10, 97, (s >> 8) as u8, s as u8]), 80);
        match parallel.route_outbound(vip(1234), 3) {
            Route::Hbone { destination, .. } => assert_eq!(&*destination.uid, "pod-12343"),
            other => panic!("routed {other:?}"),
        }

        // A listed pod moves, another leaves, and the one listed before it existed comes:
        // a connection to the services listing them finds them as they are now.
        let mut moved = snap.workloads[4 + 20].clone();
        moved.ips = vec![vec![10, 201, 0, 1]];
        let mut arrived = snap.workloads[4].clone();
        arrived.uid = "not-yet".into();
        arrived.ips = vec![vec![10, 201, 0, 2]];
        let delta = Delta {
            workloads: vec![moved, arrived],
            removed_workloads: vec!["pod-31".into()],
            ..Delta::default()
        };
        let generation = Generation {
            epoch: 0,
            generation: 2,
        };
        let parallel = parallel.apply(delta.clone(), generation).expect("applies");
        let single = single.apply(delta, generation).expect("applies");
        assert_eq!(observable(&parallel), observable(&single));
        let endpoints = |index: &Index, s: usize| -> Vec<String> {
            let mut uids: Vec<String> = (0..11)
                .filter_map(|pick| match index.route_outbound(vip(s), pick) {
                    Route::Hbone {
                        destination,
                        target,
                        ..
                    } => Some(format!("{} {}", destination.uid, target.ip())),
                    _ => None,
                })
                .collect();
            uids.sort();
            uids.dedup();
            uids
        };
        assert!(endpoints(&parallel, 2).contains(&"pod-20 10.201.0.1".to_owned()));
        assert!(!endpoints(&parallel, 3)
            .iter()
            .any(|e| e.starts_with("pod-31 ")));
        assert!(endpoints(&parallel, n.div_ceil(10) - 1).contains(&"not-yet 10.201.0.2".to_owned()));
    }

    #[test]
    fn a_build_on_several_threads_refuses_what_the_one_thread_build_refuses_first() {
        let n = PARALLEL_PARSE_FROM + 100;
        let refusals = |change: &dyn Fn(&mut Snapshot)| {
            let mut snap = with_many_services(n);
            change(&mut snap);
            let parallel = built_in_parallel(&snap).err();
            let single = Index::build(snap, Generation::default()).err();
            assert_eq!(parallel, single);
            parallel
        };
        let uid_twice = |s: &mut Snapshot| s.workloads[4 + 16_000].uid = "pod-7".into();
        let address_twice =
            |s: &mut Snapshot| s.workloads[4 + 15_000].ips = vec![vec![10, 200, 0, 9]];
        let bad_service = |s: &mut Snapshot| s.services[900].ports[0].port = 70_000;
        assert_eq!(
            refusals(&|s| {
                bad_service(s);
                address_twice(s);
                uid_twice(s);
            }),
            Some(IndexError::DuplicateUid("pod-7".into()))
        );
        assert_eq!(
            refusals(&|s| {
                bad_service(s);
                address_twice(s);
            }),
            Some(IndexError::DuplicateIp {
                ip: IpAddr::from([10, 200, 0, 9]),
                first: "pod-9".into(),
                second: "pod-15000".into(),
            })
        );
        assert!(matches!(
            refusals(&bad_service),
            Some(IndexError::Service { field: "ports", .. })
        ));
        // Services are parsed in runs too (of 550 here): the first malformed one in snapshot
        // order is named, whichever run holds it.
        let named = |bad: &[usize]| match refusals(&|s| {
            for &b in bad {
                let name = format!("app-{b}");
                let service = s.services.iter_mut().find(|s| s.name == name);
                service.expect("generated").ports[0].port = 70_000;
            }
        }) {
            Some(IndexError::Service { name, .. }) => name,
            other => panic!("refused: {other:?}"),
        };
        assert_eq!(named(&[1500, 900]), "default/app-900");
        assert_eq!(named(&[1500, 100]), "default/app-100");
    }

    #[test]
    fn the_first_malformed_workload_in_snapshot_order_is_named_whichever_thread_finds_it() {
        let refusal = |bad: &[usize]| {
            let mut snap = with_many_workloads(18_000);
            for &i in bad {
                snap.workloads[4 + i].ips = vec![vec![10, 200, 0]];
            }
            let payload = mesh_snapshot::encode(&snap);
            let view = SnapshotView::decode(&payload).expect("decodes");
            // Runs of 6002: the first is the caller's, the others the helpers'.
            let runs = view.workload_parts(3).collect();
            match parse_workloads(runs, "n1") {
                Err(IndexError::Workload { uid, field, .. }) => (uid, field),
                other => panic!("refused: {other:?}"),
            }
        };
        assert_eq!(refusal(&[15_000]), ("pod-15000".to_owned(), "ips"));
        assert_eq!(refusal(&[9_000, 15_000]), ("pod-9000".to_owned(), "ips"));
        assert_eq!(refusal(&[100, 15_000]), ("pod-100".to_owned(), "ips"));
    }

    #[test]
    fn a_payload_that_is_not_a_snapshot_is_refused_with_what_is_wrong() {
        let mut payload = mesh_snapshot::encode(&snapshot());
        // Cut inside the last field: its length now runs past the end.
        payload.truncate(payload.len() - 1);
        let refused = Index::build_encoded(&payload, Generation::default()).err();
        assert!(
            matches!(&refused, Some(IndexError::Payload(why)) if why.contains("not valid protobuf")),
            "{refused:?}"
        );
        // A workload whose uid is not UTF-8, found while reading the workloads in place.
        let mut snap = snapshot();
        snap.workloads.truncate(1);
        let mut payload = mesh_snapshot::encode(&snap);
        let at = payload
            .windows(6)
            .position(|w| w == b"client")
            .expect("the uid is in the payload");
        payload[at] = 0xff;
        let refused = Index::build_encoded(&payload, Generation::default()).err();
        assert!(
            matches!(&refused, Some(IndexError::Payload(why)) if why.contains("UTF-8")),
            "{refused:?}"
        );
    }

    #[test]
    fn pods_with_the_same_owner_fields_share_one_owner_and_the_others_get_their_own() {
        let mut snap = snapshot();
        let template = snap.workloads[1].clone();
        let pod = |uid: &str, last: u8, revision: &str| W {
            uid: uid.into(),
            name: uid.into(),
            ips: vec![vec![10, 0, 9, last]],
            canonical_service: "cart".into(),
            canonical_revision: revision.into(),
            workload_name: "cart".into(),
            ..template.clone()
        };
        // a2 comes after b1: the owner of a1 is found again by its fields, not only as the
        // last one met.
        snap.workloads
            .extend([pod("a1", 1, "v1"), pod("b1", 2, "v2"), pod("a2", 3, "v1")]);
        let payload = mesh_snapshot::encode(&snap);
        let built = [
            Index::build(snap, Generation::default()).expect("builds"),
            Index::build_encoded(&payload, Generation::default()).expect("builds"),
        ];
        for index in built {
            let owner = |uid| index.workload_by_uid(uid).expect("built").owner.clone();
            assert!(Arc::ptr_eq(&owner("a1"), &owner("a2")));
            assert!(!Arc::ptr_eq(&owner("a1"), &owner("b1")));
            assert_eq!(&*owner("a2").canonical_revision, "v1");
            assert_eq!(&*owner("b1").canonical_revision, "v2");
            assert_eq!(owner("a1").identity, owner("b1").identity);
            assert_eq!(&*owner("b1").workload_name, "cart");
        }
    }

    #[test]
    fn canonical_names_come_from_the_agent_or_else_from_the_labels() {
        let mut snap = snapshot();
        snap.workloads[1].canonical_service = "server".into();
        snap.workloads[1].canonical_revision = "v3".into();
        // An older agent's snapshot: names resolved here from the labels.
        snap.workloads[2].labels = [("app".to_owned(), "server".to_owned())].into();
        let index = Index::build(snap, Generation::default()).expect("builds");
        let names = |uid: &str| {
            let w = index.workload_by_uid(uid).expect("indexed");
            (
                w.owner.canonical_service.to_string(),
                w.owner.canonical_revision.to_string(),
            )
        };
        assert_eq!(names("server-a"), ("server".into(), "v3".into()));
        assert_eq!(names("server-b"), ("server".into(), "latest".into()));
        assert_eq!(names("legacy"), ("legacy".into(), "latest".into()));
    }

    #[test]
    fn workload_names_come_from_the_agent_or_else_are_the_pod_names() {
        let mut snap = snapshot();
        snap.workloads[1].workload_name = "server".into();
        let payload = mesh_snapshot::encode(&snap);
        let decoded = Index::build(snap, Generation::default()).expect("builds");
        let in_place = Index::build_encoded(&payload, Generation::default()).expect("builds");
        for index in [decoded, in_place] {
            let name = |uid: &str| {
                let w = index.workload_by_uid(uid).expect("indexed");
                w.owner.workload_name.to_string()
            };
            assert_eq!(name("server-a"), "server");
            assert_eq!(name("server-b"), "server-b", "none sent: the pod's name");
        }
    }

    #[test]
    fn routes_by_workload_ip_service_vip_or_passthrough() {
        let index = Index::build(snapshot(), Generation::default()).expect("builds");
        let hbone_to = |r: Route<'_>| match r {
            Route::Hbone {
                destination,
                target,
                tunnel,
                ..
            } => (destination.uid.clone(), target, tunnel),
            other => panic!("expected HBONE, got {other:?}"),
        };
        assert_eq!(
            hbone_to(index.route_outbound(addr("10.0.2.2:9000"), 0)),
            (
                "server-a".into(),
                addr("10.0.2.2:9000"),
                addr("10.0.2.2:15008")
            )
        );
        // The VIP resolves to its endpoints in turn, with the target port applied. It lists
        // server-a, server-b and a uid no workload has: the picks that land on that one go to
        // the others in turn, so over a whole cycle (3 listed x 2 present) each takes half.
        let picked: Vec<_> = (0..6)
            .map(|pick| hbone_to(index.route_outbound(addr("10.96.0.10:80"), pick)).1)
            .collect();
        assert_eq!(&picked[..2], [addr("10.0.2.2:8080"), addr("10.0.2.3:8080")]);
        for endpoint in [addr("10.0.2.2:8080"), addr("10.0.2.3:8080")] {
            assert_eq!(picked.iter().filter(|p| **p == endpoint).count(), 3);
        }
        assert_eq!(
            index.route_outbound(addr("10.0.2.9:5432"), 0),
            Route::Passthrough {
                target: addr("10.0.2.9:5432")
            }
        );
        assert_eq!(
            index.route_outbound(addr("8.8.8.8:53"), 0),
            Route::Passthrough {
                target: addr("8.8.8.8:53")
            }
        );
        assert_eq!(
            index.route_outbound(addr("10.96.0.11:80"), 0),
            Route::NoEndpoint {
                service: addr("10.96.0.11:80")
            }
        );
        // A port the service does not expose is not the service.
        assert_eq!(
            index.route_outbound(addr("10.96.0.10:81"), 0),
            Route::Passthrough {
                target: addr("10.96.0.10:81")
            }
        );
    }

    /// The lab snapshot with a waypoint: two waypoint pods (not enrolled: waypoints terminate
    /// HBONE themselves) behind a waypoint service at 10.96.0.20, port 15008.
    fn with_waypoint() -> Snapshot {
        let mut s = snapshot();
        for (uid, ip) in [("wp-1", [10, 0, 3, 2]), ("wp-2", [10, 0, 3, 3])] {
            let mut pod = workload(uid, ip, "n2", Protocol::Tcp, "");
            pod.service_account = "waypoint".into();
            s.workloads.push(pod);
        }
        s.services.push(SnapService {
            name: "waypoint".into(),
            namespace: "default".into(),
            vips: vec![vec![10, 96, 0, 20]],
            ports: vec![ServicePort {
                port: 15008,
                target_port: 15008,
            }],
            endpoints: vec!["wp-1".into(), "wp-2".into()],
            ..Default::default()
        });
        s
    }

    /// Where an HBONE route goes: (pod proven, CONNECT target, tunnel, service).
    fn hbone_parts(route: Route<'_>) -> (String, SocketAddr, SocketAddr, Option<String>) {
        match route {
            Route::Hbone {
                destination,
                target,
                tunnel,
                service,
            } => (
                destination.owner.identity.to_string(),
                target,
                tunnel,
                service.map(|s| s.name.clone()),
            ),
            other => panic!("expected HBONE, got {other:?}"),
        }
    }

    #[test]
    fn a_service_with_a_waypoint_is_reached_through_one_of_its_pods() {
        let mut s = with_waypoint();
        s.services[0].waypoint = "10.96.0.20:15008".into();
        let index = Index::build(s, Generation::default()).expect("builds");
        let waypoint_id = "spiffe://cluster.local/ns/default/sa/waypoint".to_owned();
        // The VIP is CONNECTed as dialled (the waypoint picks the endpoint), over a tunnel to
        // a waypoint pod that must prove the waypoint's identity; picks spread over its pods.
        let routes: Vec<_> = (0..2)
            .map(|pick| hbone_parts(index.route_outbound(addr("10.96.0.10:80"), pick)))
            .collect();
        for (route, tunnel) in routes.iter().zip(["10.0.3.2:15008", "10.0.3.3:15008"]) {
            assert_eq!(
                route,
                &(
                    waypoint_id.clone(),
                    addr("10.96.0.10:80"),
                    addr(tunnel),
                    Some("server".to_owned())
                )
            );
        }
        // The service's pods, dialled by address, have no waypoint of their own: direct.
        assert_eq!(
            hbone_parts(index.route_outbound(addr("10.0.2.2:8080"), 0)),
            (
                "spiffe://cluster.local/ns/default/sa/sa-server-a".to_owned(),
                addr("10.0.2.2:8080"),
                addr("10.0.2.2:15008"),
                None
            )
        );
        // The admin dump shows the service's waypoint.
        let server = index
            .services()
            .into_iter()
            .find(|s| s.name.name == "server");
        assert_eq!(
            server.and_then(|s| s.waypoint),
            Some(&Waypoint::At(addr("10.96.0.20:15008")))
        );
    }

    #[test]
    fn a_workload_with_a_waypoint_is_reached_through_it_when_dialled_by_address() {
        let mut s = with_waypoint();
        s.workloads[1].waypoint = "10.96.0.20:15008".into();
        // A waypoint named by a pod's address rather than a service's.
        s.workloads[2].waypoint = "10.0.3.3:15008".into();
        let index = Index::build(s, Generation::default()).expect("builds");
        let waypoint_id = "spiffe://cluster.local/ns/default/sa/waypoint".to_owned();
        assert_eq!(
            hbone_parts(index.route_outbound(addr("10.0.2.2:8080"), 1)),
            (
                waypoint_id.clone(),
                addr("10.0.2.2:8080"),
                addr("10.0.3.3:15008"),
                None
            )
        );
        assert_eq!(
            hbone_parts(index.route_outbound(addr("10.0.2.3:8080"), 0)),
            (
                waypoint_id,
                addr("10.0.2.3:8080"),
                addr("10.0.3.3:15008"),
                None
            )
        );
        // Through the service (which has no waypoint), its endpoints are reached directly.
        assert_eq!(
            hbone_parts(index.route_outbound(addr("10.96.0.10:80"), 0)).2,
            addr("10.0.2.2:15008")
        );
    }

    #[test]
    fn a_waypoint_without_pods_refuses_rather_than_being_bypassed() {
        let mut s = with_waypoint();
        s.services[0].waypoint = "10.96.0.20:15008".into();
        s.services[2].endpoints.clear();
        s.workloads[1].waypoint = "10.0.9.9:15008".into();
        let index = Index::build(s, Generation::default()).expect("builds");
        assert_eq!(
            index.route_outbound(addr("10.96.0.10:80"), 0),
            Route::NoWaypoint {
                waypoint: addr("10.96.0.20:15008")
            }
        );
        assert_eq!(
            index.route_outbound(addr("10.0.2.2:8080"), 0),
            Route::NoWaypoint {
                waypoint: addr("10.0.9.9:15008")
            }
        );
    }

    #[test]
    fn waypoints_set_and_removed_by_deltas_route_as_a_rebuild_does() {
        let mut reference = with_waypoint();
        let index = Index::build(reference.clone(), Generation::default()).expect("builds");
        let tunnel = |index: &Index, dst: &str| hbone_parts(index.route_outbound(addr(dst), 0)).2;
        let index = apply_both(&index, &mut reference, |s| {
            s.services[0].waypoint = "10.96.0.20:15008".into();
            s.workloads[2].waypoint = "10.0.3.3:15008".into();
        });
        assert_eq!(tunnel(&index, "10.96.0.10:80"), addr("10.0.3.2:15008"));
        assert_eq!(tunnel(&index, "10.0.2.3:8080"), addr("10.0.3.3:15008"));
        // The waypoint's pods change: routes follow without touching the service using it.
        let index = apply_both(&index, &mut reference, |s| {
            s.workloads[4].ips = vec![vec![10, 0, 3, 12]];
        });
        assert_eq!(tunnel(&index, "10.96.0.10:80"), addr("10.0.3.12:15008"));
        // The waypoint loses its address: refused, not sent around it; and gets it back.
        let unresolved = "waypoint.default.svc.cluster.local";
        let index = apply_both(&index, &mut reference, |s| {
            s.services[0].waypoint.clear();
            s.services[0].unresolved_waypoint = unresolved.into();
        });
        assert_eq!(
            index.route_outbound(addr("10.96.0.10:80"), 0),
            Route::UnresolvedWaypoint {
                hostname: unresolved
            }
        );
        let index = apply_both(&index, &mut reference, |s| {
            s.services[0].unresolved_waypoint.clear();
            s.services[0].waypoint = "10.96.0.20:15008".into();
        });
        assert_eq!(tunnel(&index, "10.96.0.10:80"), addr("10.0.3.12:15008"));
        let index = apply_both(&index, &mut reference, |s| {
            s.services[0].waypoint.clear();
            s.workloads[2].waypoint.clear();
        });
        assert_eq!(tunnel(&index, "10.96.0.10:80"), addr("10.0.2.2:15008"));
        assert_eq!(tunnel(&index, "10.0.2.3:8080"), addr("10.0.2.3:15008"));
    }

    #[test]
    fn a_waypoint_known_only_by_hostname_refuses_rather_than_being_bypassed() {
        let mut s = with_waypoint();
        s.services[0].unresolved_waypoint = "wp.default.svc.cluster.local".into();
        s.workloads[1].unresolved_waypoint = "wp.default.svc.cluster.local".into();
        let index = Index::build(s, Generation::default()).expect("builds");
        for dialled in ["10.96.0.10:80", "10.0.2.2:8080"] {
            assert_eq!(
                index.route_outbound(addr(dialled), 0),
                Route::UnresolvedWaypoint {
                    hostname: "wp.default.svc.cluster.local"
                },
                "{dialled}"
            );
        }
        // The admin dump names it.
        let server = index
            .services()
            .into_iter()
            .find(|s| s.name.name == "server");
        assert_eq!(
            server.and_then(|s| s.waypoint).map(ToString::to_string),
            Some("wp.default.svc.cluster.local".to_owned())
        );
    }

    #[test]
    fn a_malformed_waypoint_address_refuses_the_snapshot() {
        let refused = |s: Snapshot| Index::build(s, Generation::default()).err();
        for bad in ["waypoint.default:15008", "10.96.0.20", "10.96.0.20:0"] {
            let (mut on_workload, mut on_service) = (snapshot(), snapshot());
            on_workload.workloads[1].waypoint = bad.into();
            on_service.services[0].waypoint = bad.into();
            let culprits = (refused(on_workload), refused(on_service));
            assert!(
                matches!(
                    culprits,
                    (
                        Some(IndexError::Workload {
                            field: "waypoint",
                            ..
                        }),
                        Some(IndexError::Service {
                            field: "waypoint",
                            ..
                        })
                    )
                ),
                "{bad:?}: {culprits:?}"
            );
        }
        // An address and an unresolved hostname at once: which one the agent meant is unknown.
        let mut both = snapshot();
        both.services[0].waypoint = "10.96.0.20:15008".into();
        both.services[0].unresolved_waypoint = "wp.default.svc.cluster.local".into();
        assert!(matches!(
            refused(both),
            Some(IndexError::Service {
                field: "waypoint",
                ..
            })
        ));
    }

    #[test]
    fn local_workloads_are_those_on_this_node_with_a_namespace() {
        let index = Index::build(snapshot(), Generation::default()).expect("builds");
        let local: Vec<_> = index.local_workloads().map(|w| &*w.uid).collect();
        assert_eq!(local, ["client"]);
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sa-client"
            .parse()
            .expect("id");
        assert!(index.identity(&id).is_some());
    }

    #[test]
    fn malformed_snapshots_are_refused_with_the_culprit_named() {
        let mut s = snapshot();
        s.workloads[1].ips = vec![vec![1, 2, 3]];
        assert_eq!(
            Index::build(s, Generation::default()).err(),
            Some(IndexError::Workload {
                uid: "server-a".into(),
                field: "ips",
                problem: "3 bytes".into()
            })
        );

        let mut s = snapshot();
        s.workloads[2].ips = s.workloads[1].ips.clone();
        assert!(matches!(
            Index::build(s, Generation::default()),
            Err(IndexError::DuplicateIp { .. })
        ));

        let mut s = snapshot();
        s.workloads[0].service_account = "a/b".into();
        assert!(matches!(
            Index::build(s, Generation::default()),
            Err(IndexError::Workload {
                field: "identity",
                ..
            })
        ));

        let mut s = snapshot();
        s.services[0].ports[0].port = 70000;
        assert!(matches!(
            Index::build(s, Generation::default()),
            Err(IndexError::Service { field: "ports", .. })
        ));
    }

    /// What a user of the index can observe, in a canonical order.
    fn observable(index: &Index) -> String {
        let mut workloads: Vec<String> = index
            .workloads()
            .map(|w| {
                format!(
                    "{} {:?} {:?} {:?} {:?}",
                    w.uid, w.ips, w.netns, w.protocol, w.waypoint
                )
            })
            .collect();
        workloads.sort();
        let mut services: Vec<String> = index
            .services()
            .into_iter()
            .map(|s| {
                format!(
                    "{}/{} {:?} {} {:?}",
                    s.name.namespace, s.name.name, s.frontends, s.endpoints, s.waypoint
                )
            })
            .collect();
        services.sort();
        let mut routes = Vec::new();
        for w in index.workloads() {
            for ip in &w.ips {
                routes.push(format!(
                    "{:?}",
                    index.route_outbound(SocketAddr::new(*ip, 80), 0)
                ));
            }
        }
        for service in index.services() {
            for vip in service.frontends {
                for pick in 0..3 {
                    routes.push(format!("{:?}", index.route_outbound(vip, pick)));
                }
            }
        }
        routes.sort();
        let local: Vec<&str> = index.local_workloads().map(|w| &*w.uid).collect();
        let mut ids: Vec<String> = index.identities().map(|(id, _)| id.to_string()).collect();
        ids.sort();
        format!(
            "{workloads:#?}\n{services:#?}\n{routes:#?}\n{local:?}\n{ids:?}\n{:?}",
            index.trust_roots()
        )
    }

    fn apply_both(
        index: &Index,
        reference: &mut Snapshot,
        change: impl FnOnce(&mut Snapshot),
    ) -> Index {
        let before = reference.clone();
        change(reference);
        let delta = delta::diff(&before, reference).expect("a delta");
        let next = index
            .apply(delta, Generation::default())
            .expect("delta applies");
        let rebuilt = Index::build(reference.clone(), Generation::default()).expect("builds");
        assert_eq!(observable(&next), observable(&rebuilt));
        next
    }

    #[test]
    fn applying_deltas_gives_what_a_rebuild_from_the_whole_snapshot_gives() {
        let mut reference = snapshot();
        let index = Index::build(reference.clone(), Generation::default()).expect("builds");
        // A pod restarts with a new address.
        let index = apply_both(&index, &mut reference, |s| {
            s.workloads[1].ips = vec![vec![10, 0, 2, 20]];
        });
        assert_eq!(
            index.route_outbound(addr("10.0.2.20:9000"), 0),
            Route::Hbone {
                destination: index.workload_by_uid("server-a").expect("there"),
                target: addr("10.0.2.20:9000"),
                tunnel: addr("10.0.2.20:15008"),
                service: None
            }
        );
        assert_eq!(index.workload_by_ip("10.0.2.2".parse().expect("ip")), None);
        // The workload a service listed but the snapshot lacked appears: it becomes an endpoint.
        let index = apply_both(&index, &mut reference, |s| {
            let mut gone = s.workloads[2].clone();
            gone.uid = "gone".into();
            gone.ips = vec![vec![10, 0, 2, 30]];
            s.workloads.push(gone);
        });
        assert_eq!(
            index.services()[0].endpoints + index.services()[1].endpoints,
            3
        );
        // Two pods swap addresses in one delta: not a conflict.
        let index = apply_both(&index, &mut reference, |s| {
            let a = s.workloads[1].ips.clone();
            s.workloads[1].ips = s.workloads[2].ips.clone();
            s.workloads[2].ips = a;
        });
        // A pod leaves; a service changes its port; the local pod gets a new namespace path.
        let index = apply_both(&index, &mut reference, |s| {
            s.workloads.retain(|w| w.uid != "server-b");
            s.services[0].ports[0].port = 8000;
            s.workloads[0].netns_path = "/run/netns/c2".into();
        });
        // Identities and roots change; the second service goes away.
        let index = apply_both(&index, &mut reference, |s| {
            s.identities.clear();
            s.trust_roots = vec![vec![9, 9]];
            s.services.pop();
        });
        // The local pod moves to another node: no longer local.
        let index = apply_both(&index, &mut reference, |s| {
            s.workloads[0].node = "n2".into()
        });
        assert_eq!(index.local_workloads().count(), 0);
    }

    #[test]
    fn a_bad_delta_is_refused_whole_and_the_index_stays() {
        let index = Index::build(snapshot(), Generation::default()).expect("builds");
        let before = observable(&index);
        let mut taken = snapshot().workloads[0].clone();
        taken.uid = "newcomer".into();
        // Its address belongs to "client".
        let delta = Delta {
            workloads: vec![taken],
            removed_workloads: vec!["server-a".into()],
            ..Delta::default()
        };
        assert!(matches!(
            index.apply(delta, Generation::default()),
            Err(IndexError::DuplicateIp { .. })
        ));
        let twice = Delta {
            workloads: vec![
                snapshot().workloads[1].clone(),
                snapshot().workloads[1].clone(),
            ],
            ..Delta::default()
        };
        assert!(matches!(
            index.apply(twice, Generation::default()),
            Err(IndexError::DuplicateUid(_))
        ));
        assert_eq!(observable(&index), before);
    }

    #[test]
    fn a_remote_pod_change_shares_policies_tls_and_local_pods_with_the_previous_generation() {
        let mut reference = snapshot();
        let index = Index::build(reference.clone(), Generation::default()).expect("builds");
        let next = apply_both(&index, &mut reference, |s| {
            s.workloads[1].ips = vec![vec![10, 0, 2, 20]];
        });
        assert!(next.same_authorization(&index));
        assert!(next.same_tls_material(&index));
        assert!(next.same_local_workloads(&index));
        let with_policy = apply_both(&next, &mut reference, |s| {
            s.policies.push(schema::AuthorizationPolicy {
                name: "deny-all".into(),
                namespace: "default".into(),
                action: schema::Action::Deny as i32,
                rules: vec![schema::Rule::default()],
                ..Default::default()
            });
        });
        assert!(!with_policy.same_authorization(&next));
        assert!(with_policy.same_tls_material(&next));
    }

    #[test]
    fn a_long_run_of_changes_folds_its_overlays_and_still_matches_a_rebuild() {
        let mut reference = snapshot();
        let mut index = Index::build(reference.clone(), Generation::default()).expect("builds");
        for n in 0..crate::layered::FOLD_MIN + 10 {
            let last = 20 + (n % 200) as u8;
            index = apply_both(&index, &mut reference, |s| {
                s.workloads[1].ips = vec![vec![10, 0, 3, last]];
                s.services[0].ports[0].port = 1000 + (n % 50) as u32;
            });
        }
        assert!(index.by_ip.overlay_len() < crate::layered::FOLD_MIN);
    }

    /// `index`'s successor for `reference` after `change`, by comparing; checked against a
    /// build of the same bytes.
    fn rebase_both(
        index: &Index,
        reference: &mut Snapshot,
        change: impl FnOnce(&mut Snapshot),
    ) -> Rebased {
        change(reference);
        let payload = mesh_snapshot::encode(reference);
        let generation = Generation {
            epoch: 2,
            generation: 7,
        };
        let rebased = index
            .rebase_encoded(&payload, generation)
            .expect("compares");
        let built = Index::build_encoded(&payload, generation).expect("builds");
        assert_eq!(observable(&rebased.index), observable(&built));
        assert_eq!(rebased.index.generation(), generation);
        assert_eq!(rebased.index.source(), built.source());
        assert_eq!(rebased.index.policy_sources, built.policy_sources);
        assert_eq!(
            rebased.index.peer_authentications,
            built.peer_authentications
        );
        let decisions = |index: &Index| -> Vec<String> {
            let mut seen = Vec::new();
            for local in index.local_workloads() {
                for peer in ["sa-client", "sa-pod", "other"] {
                    let connection = authz::Connection {
                        source: format!("spiffe://cluster.local/ns/default/sa/{peer}")
                            .parse()
                            .ok(),
                        source_ip: "10.0.2.2".parse().expect("ip"),
                        destination_ip: local.ips[0],
                        destination_port: 8080,
                    };
                    seen.push(format!(
                        "{} {peer} {:?} {:?}",
                        local.uid,
                        index.authorize(&local.uid, &connection),
                        index.inbound_mtls(&local.uid, 8080)
                    ));
                }
            }
            seen.sort();
            seen
        };
        assert_eq!(decisions(&rebased.index), decisions(&built));
        rebased
    }

    #[test]
    fn a_complete_snapshot_compared_with_the_index_gives_what_a_build_gives() {
        let mut reference = with_many_services(200);
        reference.source = "agent 1".into();
        let index = Index::build_encoded(&mesh_snapshot::encode(&reference), Generation::default())
            .expect("builds");

        // The same world again (an agent restart): nothing read in, everything shared.
        let same = rebase_both(&index, &mut reference, |_| {});
        assert_eq!(same.changes, Changes::default());
        assert!(same.index.same_local_workloads(&index));
        assert!(same.index.same_authorization(&index));
        assert!(same.index.same_tls_material(&index));
        assert_eq!(same.index.by_uid.overlay_len(), 0);

        // In another order, with a new source: still nothing to read.
        let reordered = rebase_both(&index, &mut reference, |s| {
            s.workloads.reverse();
            s.services.reverse();
            s.source = "agent 2".into();
        });
        assert_eq!(reordered.changes, Changes::default());

        // Pods come, go and change (one takes a leaver's address); a service changes its
        // port, one goes, one comes; the local pod's namespace path changes.
        let churned = rebase_both(&reordered.index, &mut reference, |s| {
            let leaver = s
                .workloads
                .iter()
                .position(|w| w.uid == "pod-5")
                .expect("pod-5");
            let freed = s.workloads.remove(leaver).ips;
            s.workloads.retain(|w| w.uid != "pod-6");
            let pod = s
                .workloads
                .iter_mut()
                .find(|w| w.uid == "pod-7")
                .expect("pod-7");
            pod.ips = freed;
            let mut newcomer = pod.clone();
            newcomer.uid = "not-yet".into();
            newcomer.ips = vec![vec![10, 201, 0, 1]];
            s.workloads.push(newcomer);
            let client = s
                .workloads
                .iter_mut()
                .find(|w| w.uid == "client")
                .expect("client");
            client.netns_path = "/run/netns/c2".into();
            s.services[0].ports[0].port = 8000;
            s.services.remove(1);
            s.services.push(SnapService {
                name: "late".into(),
                namespace: "default".into(),
                vips: vec![vec![10, 98, 0, 1]],
                ports: vec![ServicePort {
                    port: 443,
                    target_port: 0,
                }],
                endpoints: vec!["pod-7".into()],
                ..Default::default()
            });
        });
        assert_eq!(
            churned.changes,
            Changes {
                workloads: 5,
                services: 3
            },
            "pod-5 and pod-6 gone, pod-7 and the client changed, not-yet new; \
             a service changed, one gone, one new"
        );
        assert!(!churned.index.same_local_workloads(&reordered.index));

        // Policies, peer authentications, identities and trust roots change.
        let secured = rebase_both(&churned.index, &mut reference, |s| {
            s.policies.push(schema::AuthorizationPolicy {
                name: "only-client".into(),
                namespace: "default".into(),
                action: schema::Action::Allow as i32,
                rules: vec![schema::Rule {
                    from: vec![schema::RuleSource {
                        principals: vec!["cluster.local/ns/default/sa/sa-client".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            });
            s.peer_authentications.push(schema::PeerAuthentication {
                name: "strict".into(),
                namespace: "default".into(),
                mode: schema::MtlsMode::Strict as i32,
                ..Default::default()
            });
            s.identities.push(Identity {
                spiffe_id: "spiffe://cluster.local/ns/default/sa/sa-pod".into(),
                ..Default::default()
            });
            s.trust_roots = vec![vec![1, 2, 3]];
        });
        assert!(!secured.index.same_authorization(&churned.index));
        assert!(!secured.index.same_tls_material(&churned.index));
        assert_eq!(secured.index.identities().count(), 2);

        // And leave again.
        let plain = rebase_both(&secured.index, &mut reference, |s| {
            s.policies.clear();
            s.peer_authentications.clear();
            s.identities.truncate(1);
        });
        assert_eq!(plain.index.identities().count(), 1);
    }

    #[test]
    fn a_snapshot_that_comparing_cannot_take_is_left_to_a_build() {
        let reference = with_many_services(9 * FOLD_MIN);
        let index = Index::build_encoded(&mesh_snapshot::encode(&reference), Generation::default())
            .expect("builds");
        let compare = |change: &dyn Fn(&mut Snapshot)| {
            let mut next = reference.clone();
            change(&mut next);
            index
                .rebase_encoded(&mesh_snapshot::encode(&next), Generation::default())
                .map(|r| r.changes)
        };
        assert_eq!(compare(&|_| {}), Some(Changes::default()));
        // More than an eighth of the workloads changed: a build is cheaper than an overlay.
        assert!(index.workload_count() / 8 > FOLD_MIN);
        let many = index.workload_count() / 8 + 1;
        assert_eq!(
            compare(&|s| {
                for w in s.workloads.iter_mut().take(many) {
                    w.name.push_str("-renamed");
                }
            }),
            None
        );
        assert!(compare(&|s| {
            for w in s.workloads.iter_mut().take(many - 1) {
                w.name.push_str("-renamed");
            }
        })
        .is_some());
        // Another node's view, or a uid or service listed twice: a build decides.
        assert_eq!(compare(&|s| s.node = "n2".into()), None);
        assert_eq!(compare(&|s| s.root_namespace = "istio-config".into()), None);
        assert_eq!(
            compare(&|s| {
                let twin = s.workloads[3].clone();
                s.workloads.push(twin);
            }),
            None
        );
        assert_eq!(
            compare(&|s| {
                let mut twin = s.services[2].clone();
                twin.ports[0].port = 81;
                s.services.insert(2, twin);
            }),
            None
        );
        // A changed pod that a build refuses (its address is another's) is refused by a
        // build, with the culprit named, not half taken.
        let mut clash = reference.clone();
        clash.workloads[4].ips = clash.workloads[5].ips.clone();
        let payload = mesh_snapshot::encode(&clash);
        assert!(index
            .rebase_encoded(&payload, Generation::default())
            .is_none());
        assert!(matches!(
            Index::build_encoded(&payload, Generation::default()),
            Err(IndexError::DuplicateIp { .. })
        ));
        // A workload a delta brought has no record to compare: it is read in again.
        let mut reference = reference.clone();
        let before = reference.clone();
        reference.workloads[4].protocol = Protocol::Tcp as i32;
        let delta = delta::diff(&before, &reference).expect("a delta");
        let applied = index.apply(delta, Generation::default()).expect("applies");
        let again = applied
            .rebase_encoded(&mesh_snapshot::encode(&reference), Generation::default())
            .expect("compares");
        assert_eq!(
            again.changes,
            Changes {
                workloads: 1,
                services: 0
            }
        );
    }

    #[test]
    fn a_large_snapshot_is_compared_in_runs_that_find_twins_and_leavers_across_them() {
        // Large enough to be compared on several threads where the machine has them (the
        // runs split the snapshot in order: the first and last pods are in different runs).
        let mut reference = with_many_services(PARALLEL_PARSE_FROM + 1000);
        let index = Index::build_encoded(&mesh_snapshot::encode(&reference), Generation::default())
            .expect("builds");
        let compare = |snap: &Snapshot| {
            index
                .rebase_encoded(&mesh_snapshot::encode(snap), Generation::default())
                .map(|r| r.changes)
        };
        let last = reference.workloads.len() - 1;
        // The last pod listed again at the front: a build refuses it, so comparing leaves it.
        let mut twin = reference.clone();
        twin.workloads.insert(0, reference.workloads[last].clone());
        assert_eq!(compare(&twin), None);
        assert!(matches!(
            Index::build_encoded(&mesh_snapshot::encode(&twin), Generation::default()),
            Err(IndexError::DuplicateUid(_))
        ));
        // A twin and a leaver together keep the count of listed pods: still found.
        twin.workloads.remove(1);
        assert_eq!(compare(&twin), None);
        // Leavers at both ends, and a changed pod in the middle.
        let rebased = rebase_both(&index, &mut reference, |s| {
            s.workloads.remove(last);
            s.workloads.remove(4);
            let middle = s.workloads.len() / 2;
            s.workloads[middle].protocol = Protocol::Tcp as i32;
        });
        assert_eq!(
            rebased.changes,
            Changes {
                workloads: 3,
                services: 0
            }
        );
    }
}
