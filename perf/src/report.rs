//! Lab results: the table printed at the end of a run, the JSON committed to bench-results/,
//! and an SVG plot of the same numbers. Every mesh figure sits next to its no-mesh baseline
//! from the same run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::load::Latency;
use crate::sys::Machine;

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub gbit_per_s: f64,
    pub bytes: u64,
    pub seconds: f64,
    /// CPU of both data planes together during the run, in cores (CPU seconds / wall second).
    pub dataplane_cores: f64,
    /// CPU seconds each process spent during the run.
    pub cpu: ProcessCpu,
}

/// CPU seconds (user + system, from /proc) each process of a scenario spent during one run:
/// the load generator, the server app, and each node's data plane; and how often each data
/// plane slept.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProcessCpu {
    pub client_s: f64,
    pub server_s: f64,
    pub dataplane_s: [f64; 2],
    /// How often each data plane's threads blocked (voluntary context switches, all threads).
    /// Each block is a wakeup later, and on a VM a wakeup of an idle vCPU goes through the host:
    /// this counts what the latency figures pay for.
    pub dataplane_sleeps: [f64; 2],
}

impl ProcessCpu {
    /// (process, CPU seconds) in table order.
    pub fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("load generator", self.client_s),
            ("server app", self.server_s),
            ("node-1 data plane", self.dataplane_s[0]),
            ("node-2 data plane", self.dataplane_s[1]),
        ]
    }

    pub fn median(runs: &[ProcessCpu]) -> ProcessCpu {
        let m = |f: &dyn Fn(&ProcessCpu) -> f64| median(runs.iter().map(f).collect());
        ProcessCpu {
            client_s: m(&|c| c.client_s),
            server_s: m(&|c| c.server_s),
            dataplane_s: [m(&|c| c.dataplane_s[0]), m(&|c| c.dataplane_s[1])],
            dataplane_sleeps: [m(&|c| c.dataplane_sleeps[0]), m(&|c| c.dataplane_sleeps[1])],
        }
    }

    /// Each figure divided by `units` (bytes in GB, requests in thousands, ...).
    pub fn per(&self, units: f64) -> ProcessCpu {
        ProcessCpu {
            client_s: self.client_s / units,
            server_s: self.server_s / units,
            dataplane_s: [self.dataplane_s[0] / units, self.dataplane_s[1] / units],
            dataplane_sleeps: [
                self.dataplane_sleeps[0] / units,
                self.dataplane_sleeps[1] / units,
            ],
        }
    }

    /// These figures, measured over the fixed-rate run `r`, per 1000 of its requests. They span
    /// the warm-up too, so they divide by every request sent, not by the measured ones.
    pub fn per_1000_requests_of(&self, r: &crate::gen::RateResult) -> ProcessCpu {
        self.per(r.sent.max(1) as f64 / 1000.0)
    }
}

/// The noise indicator under every table: CPU time the hypervisor took during the runs.
fn steal_line(t: &mut String, steal: Option<f64>) {
    if let Some(steal) = steal {
        let _ = writeln!(
            t,
            "hypervisor steal during the runs: {steal:.1}% of CPU time"
        );
    }
}

/// The median of a set of figures (mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Throughput {
    /// Data-plane CPU per unit of throughput: cores per Gbit/s.
    pub fn cores_per_gbit(&self) -> f64 {
        self.dataplane_cores / self.gbit_per_s
    }

    /// Median of each figure over rounds.
    pub fn median(runs: &[Throughput]) -> Throughput {
        Throughput {
            gbit_per_s: median(runs.iter().map(|r| r.gbit_per_s).collect()),
            bytes: median(runs.iter().map(|r| r.bytes as f64).collect()) as u64,
            seconds: median(runs.iter().map(|r| r.seconds).collect()),
            dataplane_cores: median(runs.iter().map(|r| r.dataplane_cores).collect()),
            cpu: ProcessCpu::median(&runs.iter().map(|r| r.cpu).collect::<Vec<_>>()),
        }
    }
}

impl Latency {
    /// Median of each percentile over rounds.
    pub fn median(runs: &[Latency]) -> Latency {
        let m = |f: fn(&Latency) -> f64| median(runs.iter().map(f).collect());
        Latency {
            count: runs.iter().map(|r| r.count).sum(),
            mean_us: m(|r| r.mean_us),
            p50_us: m(|r| r.p50_us),
            p90_us: m(|r| r.p90_us),
            p99_us: m(|r| r.p99_us),
            p999_us: m(|r| r.p999_us),
            max_us: runs.iter().map(|r| r.max_us).fold(0.0, f64::max),
        }
    }
}

/// Every round, for whoever wants more than the medians.
#[derive(Clone, Debug, Serialize)]
pub struct Rounds {
    pub direct_throughput: Vec<Throughput>,
    pub mesh_throughput: Vec<Throughput>,
    pub tls_throughput: Vec<Throughput>,
    pub direct_latency: Vec<Latency>,
    pub mesh_latency: Vec<Latency>,
}

/// New connections per second, direct beside mesh, for one client thread count (medians
/// over rounds). In `Report::connection_rates` every mesh connection is a new stream on a
/// pooled tunnel; see [`FreshHandshakeRate`] for the other case.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRate {
    pub threads: usize,
    pub direct_per_s: f64,
    pub mesh_per_s: f64,
    pub direct_latency: Latency,
    pub mesh_latency: Latency,
    /// The same through two plain TCP relays (see [`Report::relays_throughput`]), where
    /// measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays_latency: Option<Latency>,
    /// Connections that failed, over all rounds and paths (should be 0).
    pub failures: u64,
}

/// New connections when each one needs a fresh mTLS handshake: node 1's data plane gives
/// every stream a tunnel of its own and closes it when the stream ends
/// (`--pool-max-streams 1 --pool-idle-timeout 0s`), so each mesh connection dials, handshakes
/// and closes a tunnel to node 2. One client thread.
#[derive(Clone, Debug, Serialize)]
pub struct FreshHandshakeRate {
    #[serde(flatten)]
    pub rate: ConnRate,
    /// Tunnels node 1's data plane dialled per mesh connection, over all rounds: 1 when no
    /// tunnel was reused, the check that the scenario measured what it says.
    pub handshakes_per_connection: f64,
}

/// One side (direct or mesh) of a fixed-rate run: medians over rounds (counts summed).
#[derive(Clone, Debug, Serialize)]
pub struct RateRun {
    pub achieved_rps: f64,
    pub requests: u64,
    /// Requests never answered, over all rounds (should be 0).
    pub errors: u64,
    /// From each request's intended send time to its response.
    pub latency: Latency,
    /// How late the generator sent (its own floor under the latency figures).
    pub send_lag: Latency,
    pub cpu_per_1000_requests: ProcessCpu,
}

impl RateRun {
    pub fn of(runs: &[crate::gen::RateResult], cpu: &[ProcessCpu]) -> RateRun {
        let per_1000: Vec<ProcessCpu> = runs
            .iter()
            .zip(cpu)
            .map(|(r, c)| c.per_1000_requests_of(r))
            .collect();
        RateRun {
            achieved_rps: median(runs.iter().map(|r| r.achieved_rps).collect()),
            requests: runs.iter().map(|r| r.requests).sum(),
            errors: runs.iter().map(|r| r.errors).sum(),
            latency: Latency::median(&runs.iter().map(|r| r.latency).collect::<Vec<_>>()),
            send_lag: Latency::median(&runs.iter().map(|r| r.send_lag).collect::<Vec<_>>()),
            cpu_per_1000_requests: ProcessCpu::median(&per_1000),
        }
    }
}

/// Request/response at one fixed offered rate (open loop), direct beside mesh.
#[derive(Clone, Debug, Serialize)]
pub struct FixedRate {
    pub offered_rps: f64,
    pub connections: usize,
    /// Bulk streams between the same pods during the requests (0: the requests alone). Their
    /// CPU is in the processes' figures of such a load, which are then not per request.
    pub beside_bulk: usize,
    /// The bulk streams' median throughput (direct, mesh), over their whole run: from half a
    /// second before the requests to half a second after.
    pub bulk_gbit_per_s: Option<(f64, f64)>,
    pub direct: RateRun,
    pub mesh: RateRun,
    /// The same load through two plain TCP relays (see [`Report::relays_throughput`]), where
    /// measured. Its `dataplane` CPU figures are the relays'.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays: Option<RateRun>,
}

/// How the table and the progress bar name the bulk streams beside a fixed-rate load.
pub fn beside_bulk_text(streams: usize) -> String {
    match streams {
        0 => String::new(),
        n => format!(", beside {n} bulk stream(s)"),
    }
}

/// One worker count of the sweep: both data planes restarted with `workers` workers.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub workers: usize,
    pub streams: usize,
    pub direct_gbit_per_s: f64,
    pub mesh_gbit_per_s: f64,
    pub mesh_dataplane_cores: f64,
    pub conn_threads: usize,
    pub direct_conns_per_s: f64,
    pub mesh_conns_per_s: f64,
    /// New connections that failed, direct and mesh together (should be 0).
    pub conn_failures: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub held_connections: usize,
    /// Per node: data-plane RSS before and with the connections held, and the difference per
    /// connection.
    pub nodes: Vec<NodeMemory>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeMemory {
    pub node: String,
    /// After the lab's other scenarios, before any connection is held.
    pub idle_rss_bytes: u64,
    /// Holding half of the connections, then all of them.
    pub half_loaded_rss_bytes: u64,
    pub loaded_rss_bytes: u64,
    /// RSS growth per connection over the second half (see `half_loaded_rss_bytes`).
    pub bytes_per_connection: f64,
}

/// The head of every result file: what ran, from which commit, when and where. Taken when a
/// run starts, so edits to the tree during the run do not count.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub command: String,
    pub commit: String,
    pub started: String,
    pub machine: Machine,
    /// The start, to the second: it names the result files.
    #[serde(skip)]
    pub started_at: time::OffsetDateTime,
}

impl Provenance {
    pub fn now() -> Provenance {
        let now = time::OffsetDateTime::now_utc();
        let started_at = now.replace_nanosecond(0).unwrap_or(now);
        Provenance {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            commit: crate::sys::git_commit(),
            started: started_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            machine: crate::sys::machine(),
            started_at,
        }
    }

    /// A result file's name stem: `kind` and the UTC second the run started, so files sort
    /// by time.
    pub fn file_stem(&self, kind: &str) -> String {
        let t = self.started_at;
        format!(
            "{kind}-{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: Provenance,
    pub driver: String,
    pub workers_per_node: usize,
    pub pinned: bool,
    /// Direct and mesh runs alternated this many times; figures are medians over rounds.
    pub rounds: usize,
    /// CPU time the hypervisor took from this VM during the measurements (noise indicator).
    pub steal_percent: Option<f64>,
    pub topology: String,
    /// Kernel-tuning profile applied to the lab (every namespace, and node-wide settings on the
    /// machine), if any.
    pub tuning: Option<String>,
    pub direct_throughput: Throughput,
    pub mesh_throughput: Throughput,
    /// One plain TLS 1.3 stream between two unenrolled pods on the two nodes: the crypto
    /// reference for the mesh stream.
    pub tls_throughput: Option<Throughput>,
    pub tls_cipher_suite: Option<String>,
    /// One stream from a mesh pod to a pod outside the mesh: node 1's data plane relays
    /// plain TCP (no TLS), node 2's is not involved.
    pub passthrough_throughput: Option<Throughput>,
    /// One stream between the two unenrolled pods through two plain TCP relays (`meshload
    /// relay`, one thread per core), one in each pod's namespace, where the data planes have
    /// their listeners in enrolled pods: the same hops as the mesh path without TLS, HTTP/2,
    /// policy or capture rules. The floor any two-proxy data plane pays on this machine; its
    /// `dataplane` CPU figures are the relays'. The latency and connection-rate scenarios
    /// measure the same path (`FixedRate::relays`, `ConnRate::relays_per_s`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays_throughput: Option<Throughput>,
    pub rr_size_bytes: usize,
    /// How `direct_latency` and `mesh_latency` were measured.
    pub latency_method: String,
    pub direct_latency: Latency,
    pub mesh_latency: Latency,
    /// Every offered rate, the first being the one `direct_latency`/`mesh_latency` show.
    pub fixed_rates: Vec<FixedRate>,
    pub connection_rates: Vec<ConnRate>,
    pub fresh_handshake_rate: Option<FreshHandshakeRate>,
    /// Scaling with data-plane workers (1..cores), measured last.
    pub worker_sweep: Vec<SweepPoint>,
    pub memory: Option<Memory>,
    pub ratios: Ratios,
    pub rounds_detail: Rounds,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    pub throughput_mesh_over_direct: f64,
    /// The mesh stream against one plain TLS stream between the same nodes.
    pub throughput_mesh_over_tls: Option<f64>,
    pub dataplane_cores_per_gbit: f64,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
}

impl Ratios {
    pub fn of(
        direct: &Throughput,
        mesh: &Throughput,
        tls: Option<&Throughput>,
        direct_lat: &Latency,
        mesh_lat: &Latency,
    ) -> Ratios {
        Ratios {
            throughput_mesh_over_direct: mesh.gbit_per_s / direct.gbit_per_s,
            throughput_mesh_over_tls: tls.map(|t| mesh.gbit_per_s / t.gbit_per_s),
            dataplane_cores_per_gbit: mesh.cores_per_gbit(),
            added_p50_us: mesh_lat.p50_us - direct_lat.p50_us,
            added_p99_us: mesh_lat.p99_us - direct_lat.p99_us,
        }
    }
}

/// A latency quantile's name and where a [`Latency`] holds it.
type Quantile = (&'static str, fn(&Latency) -> f64);

/// The quantiles the tables and plots show, in order.
const QUANTILES: [Quantile; 4] = [
    ("p50", |l| l.p50_us),
    ("p90", |l| l.p90_us),
    ("p99", |l| l.p99_us),
    ("p99.9", |l| l.p999_us),
];

/// Targets from DESIGN section 8, shown beside the results.
mod target {
    pub const GBIT: f64 = 8.7;
    pub const CORES_PER_GBIT: f64 = 0.086;
    pub const ADDED_P50_US: f64 = 30.0;
    pub const ADDED_P99_US: f64 = 45.0;
    pub const BYTES_PER_CONN: f64 = 2.5 * 1024.0;
    pub const IDLE_RSS: f64 = 17e6;
    /// New connections through the mesh, as a fraction of direct (3x ztunnel's rate).
    pub const CONN_RATE_OF_DIRECT: f64 = 0.6;
    /// The same with a fresh mTLS handshake per connection: 2x ztunnel's, which DESIGN section
    /// 8 gives as about 1.13k/s on this machine against 8133/s direct with one client thread.
    pub const FRESH_CONN_RATE_OF_DIRECT: f64 = 2.0 * 1130.0 / 8133.0;
    /// "No multi-millisecond stall on the first bytes of a connection": the mesh adds less
    /// than this to the connect-to-reply p99.
    pub const ADDED_CONNECT_P99_US: f64 = 2000.0;
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl Report {
    pub fn table(&self) -> String {
        let r = &self.ratios;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nmeshlab: {} | medians of {} alternating rounds | {} workers/node ({}), {} | {} ({} cores), kernel {} | commit {}",
            self.topology,
            self.rounds,
            self.workers_per_node,
            if self.pinned { "pinned" } else { "unpinned" },
            self.driver,
            self.run.machine.cpu_model,
            self.run.machine.cores,
            self.run.machine.kernel,
            self.run.commit
        );
        let _ = writeln!(t, "{}", self.run.machine.node_line());
        if let Some(profile) = &self.tuning {
            let _ = writeln!(
                t,
                "tuning: profile {profile} in every lab namespace and on the node"
            );
        }
        steal_line(&mut t, self.steal_percent);
        let row =
            |t: &mut String, name: &str, d: String, m: String, ratio: String, target: String| {
                let _ = writeln!(t, "{name:<40}{d:>11}{m:>11}{ratio:>17}   {target}");
            };
        row(
            &mut t,
            "",
            "direct".into(),
            "mesh".into(),
            "mesh vs direct".into(),
            "target".into(),
        );
        row(
            &mut t,
            "one stream, Gbit/s",
            format!("{:.2}", self.direct_throughput.gbit_per_s),
            format!("{:.2}", self.mesh_throughput.gbit_per_s),
            format!("x{:.2}", r.throughput_mesh_over_direct),
            format!(
                ">= {} Gbit/s: {}",
                target::GBIT,
                verdict(self.mesh_throughput.gbit_per_s >= target::GBIT)
            ),
        );
        row(
            &mut t,
            "data planes, cores per Gbit/s",
            "-".into(),
            format!("{:.3}", r.dataplane_cores_per_gbit),
            format!("{:.2} cores", self.mesh_throughput.dataplane_cores),
            format!(
                "<= {}: {}",
                target::CORES_PER_GBIT,
                verdict(r.dataplane_cores_per_gbit <= target::CORES_PER_GBIT)
            ),
        );
        if let Some(tls) = &self.tls_throughput {
            row(
                &mut t,
                "one plain TLS 1.3 stream, Gbit/s",
                format!("{:.2}", tls.gbit_per_s),
                format!("{:.2}", self.mesh_throughput.gbit_per_s),
                format!(
                    "x{:.2} of TLS",
                    r.throughput_mesh_over_tls.unwrap_or(f64::NAN)
                ),
                self.tls_cipher_suite.clone().unwrap_or_default(),
            );
        }
        if let Some(pass) = &self.passthrough_throughput {
            row(
                &mut t,
                "one stream, mesh pod to outside (TCP)",
                format!("{:.2}", self.direct_throughput.gbit_per_s),
                format!("{:.2}", pass.gbit_per_s),
                format!(
                    "x{:.2}",
                    pass.gbit_per_s / self.direct_throughput.gbit_per_s
                ),
                format!(
                    "node-1 data plane {:.3} CPU s/GB",
                    pass.cpu.dataplane_s[0] / (pass.bytes as f64 / 1e9)
                ),
            );
        }
        let gb = |th: &Throughput| th.cpu.per(th.bytes as f64 / 1e9);
        let (direct_gb, mesh_gb) = (gb(&self.direct_throughput), gb(&self.mesh_throughput));
        for ((name, d), (_, m)) in direct_gb.named().into_iter().zip(mesh_gb.named()) {
            row(
                &mut t,
                &format!("  CPU s per GB, {name}"),
                format!("{d:.3}"),
                format!("{m:.3}"),
                String::new(),
                String::new(),
            );
        }
        let _ = writeln!(t, "{}", self.latency_method);
        for (name, d, m, added, goal) in [
            (
                "1 KiB round trip p50, us",
                self.direct_latency.p50_us,
                self.mesh_latency.p50_us,
                r.added_p50_us,
                target::ADDED_P50_US,
            ),
            (
                "1 KiB round trip p99, us",
                self.direct_latency.p99_us,
                self.mesh_latency.p99_us,
                r.added_p99_us,
                target::ADDED_P99_US,
            ),
        ] {
            row(
                &mut t,
                name,
                format!("{d:.1}"),
                format!("{m:.1}"),
                format!("{added:+.1} us"),
                format!("<= +{goal} us: {}", verdict(added <= goal)),
            );
        }
        for f in &self.fixed_rates {
            let _ = writeln!(
                t,
                "open loop, {:.0} requests/s offered over {} connection(s), {} B each way{}:",
                f.offered_rps,
                f.connections,
                self.rr_size_bytes,
                beside_bulk_text(f.beside_bulk)
            );
            for (name, q) in QUANTILES {
                let (d, m) = (q(&f.direct.latency), q(&f.mesh.latency));
                row(
                    &mut t,
                    &format!("  latency {name}, us"),
                    format!("{d:.1}"),
                    format!("{m:.1}"),
                    format!("{:+.1} us", m - d),
                    String::new(),
                );
            }
            row(
                &mut t,
                "  achieved requests/s",
                format!("{:.0}", f.direct.achieved_rps),
                format!("{:.0}", f.mesh.achieved_rps),
                format!("x{:.3}", f.mesh.achieved_rps / f.direct.achieved_rps),
                if f.direct.errors + f.mesh.errors > 0 {
                    format!("{} UNANSWERED", f.direct.errors + f.mesh.errors)
                } else {
                    String::new()
                },
            );
            row(
                &mut t,
                "  generator send lag p99, us",
                format!("{:.1}", f.direct.send_lag.p99_us),
                format!("{:.1}", f.mesh.send_lag.p99_us),
                String::new(),
                String::new(),
            );
            if let Some((d, m)) = f.bulk_gbit_per_s {
                row(
                    &mut t,
                    "  the bulk streams beside, Gbit/s",
                    format!("{d:.2}"),
                    format!("{m:.2}"),
                    format!("x{:.2}", m / d),
                    String::new(),
                );
                // The processes' CPU is mostly the bulk streams': not a per-request figure.
                continue;
            }
            for ((name, d), (_, m)) in f
                .direct
                .cpu_per_1000_requests
                .named()
                .into_iter()
                .zip(f.mesh.cpu_per_1000_requests.named())
            {
                row(
                    &mut t,
                    &format!("  CPU ms/1000 req, {name}"),
                    format!("{:.2}", d * 1e3),
                    format!("{:.2}", m * 1e3),
                    String::new(),
                    String::new(),
                );
            }
            // Per request: the figure is per 1000 requests.
            let (d, m) = (
                f.direct.cpu_per_1000_requests.dataplane_sleeps,
                f.mesh.cpu_per_1000_requests.dataplane_sleeps,
            );
            for node in 0..2 {
                row(
                    &mut t,
                    &format!("  sleeps/req, node-{} data plane", node + 1),
                    format!("{:.2}", d[node] / 1e3),
                    format!("{:.2}", m[node] / 1e3),
                    String::new(),
                    String::new(),
                );
            }
        }
        // (what, tag for the rows below it, figures, least ratio to direct)
        let pooled = self.connection_rates.iter().map(|c| {
            (
                format!("{} thread(s)", c.threads),
                c.threads.to_string(),
                c,
                target::CONN_RATE_OF_DIRECT,
            )
        });
        let fresh = self.fresh_handshake_rate.iter().map(|f| {
            (
                "fresh handshake each".to_string(),
                "fresh".to_string(),
                &f.rate,
                target::FRESH_CONN_RATE_OF_DIRECT,
            )
        });
        for (what, tag, c, least) in pooled.chain(fresh) {
            let ratio = c.mesh_per_s / c.direct_per_s;
            row(
                &mut t,
                &format!("new connections/s, {what}"),
                format!("{:.0}", c.direct_per_s),
                format!("{:.0}", c.mesh_per_s),
                format!("x{ratio:.2}"),
                format!(
                    ">= x{least:.2}: {}{}",
                    verdict(ratio >= least),
                    if c.failures > 0 {
                        format!(" ({} FAILED)", c.failures)
                    } else {
                        String::new()
                    }
                ),
            );
            row(
                &mut t,
                &format!("  connect to reply p50, us ({tag})"),
                format!("{:.1}", c.direct_latency.p50_us),
                format!("{:.1}", c.mesh_latency.p50_us),
                format!("{:+.1} us", c.mesh_latency.p50_us - c.direct_latency.p50_us),
                String::new(),
            );
            let added_p99 = c.mesh_latency.p99_us - c.direct_latency.p99_us;
            row(
                &mut t,
                &format!("  connect to reply p99, us ({tag})"),
                format!("{:.1}", c.direct_latency.p99_us),
                format!("{:.1}", c.mesh_latency.p99_us),
                format!("{added_p99:+.1} us"),
                format!(
                    "< +{:.0} ms: {}",
                    target::ADDED_CONNECT_P99_US / 1e3,
                    verdict(added_p99 < target::ADDED_CONNECT_P99_US)
                ),
            );
        }
        if let Some(f) = &self.fresh_handshake_rate {
            row(
                &mut t,
                "  handshakes per connection (fresh)",
                "-".into(),
                format!("{:.2}", f.handshakes_per_connection),
                String::new(),
                String::new(),
            );
        }
        self.relays_table(&mut t);
        if let Some(mem) = &self.memory {
            for n in &mem.nodes {
                row(
                    &mut t,
                    &format!("{}: KiB per held connection", n.node),
                    "-".into(),
                    format!("{:.2}", n.bytes_per_connection / 1024.0),
                    format!("{} conns", mem.held_connections),
                    format!(
                        "<= 2.5 KiB: {}",
                        verdict(n.bytes_per_connection <= target::BYTES_PER_CONN)
                    ),
                );
                row(
                    &mut t,
                    &format!("{}: idle RSS, MB", n.node),
                    "-".into(),
                    format!("{:.1}", n.idle_rss_bytes as f64 / 1e6),
                    String::new(),
                    format!(
                        "<= 17 MB: {}",
                        verdict(n.idle_rss_bytes as f64 <= target::IDLE_RSS)
                    ),
                );
            }
        }
        for p in &self.worker_sweep {
            row(
                &mut t,
                &format!("{} worker(s): {} streams, Gbit/s", p.workers, p.streams),
                format!("{:.2}", p.direct_gbit_per_s),
                format!("{:.2}", p.mesh_gbit_per_s),
                format!("x{:.2}", p.mesh_gbit_per_s / p.direct_gbit_per_s),
                format!("data planes {:.2} cores", p.mesh_dataplane_cores),
            );
            row(
                &mut t,
                &format!(
                    "{} worker(s): new conns/s, {} thr",
                    p.workers, p.conn_threads
                ),
                format!("{:.0}", p.direct_conns_per_s),
                format!("{:.0}", p.mesh_conns_per_s),
                format!("x{:.2}", p.mesh_conns_per_s / p.direct_conns_per_s),
                if p.conn_failures > 0 {
                    format!("{} FAILED", p.conn_failures)
                } else {
                    String::new()
                },
            );
        }
        t
    }

    /// The floor: each measured figure through two plain TCP relays, beside direct and mesh.
    /// "mesh vs relays" is what the mesh's own work (TLS, HTTP/2, policy, capture) costs on
    /// top of the hops.
    fn relays_table(&self, t: &mut String) {
        let Some(relays) = &self.relays_throughput else {
            return;
        };
        let _ = writeln!(
            t,
            "two plain TCP relays, one in each unenrolled pod (no TLS, HTTP/2, policy or capture): the hops of any two-proxy path"
        );
        let row = |t: &mut String, name: &str, cells: [String; 5]| {
            let [d, r, m, rd, mr] = cells;
            let _ = writeln!(t, "{name:<40}{d:>11}{r:>11}{m:>11}{rd:>18}{mr:>16}");
        };
        let ratio = |x: f64, of: f64| format!("x{:.2}", x / of);
        let added = |x: f64, over: f64| format!("{:+.1} us", x - over);
        row(
            t,
            "",
            [
                "direct",
                "relays",
                "mesh",
                "relays vs direct",
                "mesh vs relays",
            ]
            .map(String::from),
        );
        let (direct, mesh) = (&self.direct_throughput, &self.mesh_throughput);
        row(
            t,
            "one stream, Gbit/s",
            [
                format!("{:.2}", direct.gbit_per_s),
                format!("{:.2}", relays.gbit_per_s),
                format!("{:.2}", mesh.gbit_per_s),
                ratio(relays.gbit_per_s, direct.gbit_per_s),
                ratio(mesh.gbit_per_s, relays.gbit_per_s),
            ],
        );
        let per_gb =
            |th: &Throughput, node: usize| th.cpu.dataplane_s[node] / (th.bytes as f64 / 1e9);
        for node in 0..2 {
            row(
                t,
                &format!("  CPU s per GB, node-{} proxy", node + 1),
                [
                    "-".into(),
                    format!("{:.3}", per_gb(relays, node)),
                    format!("{:.3}", per_gb(mesh, node)),
                    String::new(),
                    ratio(per_gb(mesh, node), per_gb(relays, node)),
                ],
            );
        }
        if let Some((f, on_relays)) = self
            .fixed_rates
            .first()
            .and_then(|f| f.relays.as_ref().map(|r| (f, r)))
        {
            for (name, q) in [QUANTILES[0], QUANTILES[2]] {
                let (d, r, m) = (
                    q(&f.direct.latency),
                    q(&on_relays.latency),
                    q(&f.mesh.latency),
                );
                row(
                    t,
                    &format!("1 KiB at {:.0}/s {name}, us", f.offered_rps),
                    [
                        format!("{d:.1}"),
                        format!("{r:.1}"),
                        format!("{m:.1}"),
                        added(r, d),
                        added(m, r),
                    ],
                );
            }
            let (r, m) = (
                &on_relays.cpu_per_1000_requests,
                &f.mesh.cpu_per_1000_requests,
            );
            for node in 0..2 {
                row(
                    t,
                    &format!("  CPU ms/1000 req, node-{} proxy", node + 1),
                    [
                        "-".into(),
                        format!("{:.2}", r.dataplane_s[node] * 1e3),
                        format!("{:.2}", m.dataplane_s[node] * 1e3),
                        String::new(),
                        ratio(m.dataplane_s[node], r.dataplane_s[node]),
                    ],
                );
                // Per request: the figure is per 1000 requests.
                row(
                    t,
                    &format!("  sleeps/req, node-{} proxy", node + 1),
                    [
                        "-".into(),
                        format!("{:.2}", r.dataplane_sleeps[node] / 1e3),
                        format!("{:.2}", m.dataplane_sleeps[node] / 1e3),
                        String::new(),
                        String::new(),
                    ],
                );
            }
        }
        for c in &self.connection_rates {
            let Some(r) = c.relays_per_s else { continue };
            row(
                t,
                &format!("new connections/s, {} thread(s)", c.threads),
                [
                    format!("{:.0}", c.direct_per_s),
                    format!("{r:.0}"),
                    format!("{:.0}", c.mesh_per_s),
                    ratio(r, c.direct_per_s),
                    ratio(c.mesh_per_s, r),
                ],
            );
        }
    }

    /// Writes `<stem>.json`, the summary plot `<stem>.svg`, and one plot per scenario
    /// (`<stem>-<scenario>.svg`) into `dir`; returns the JSON path.
    pub fn save(&self, dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join(format!("{stem}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::write(dir.join(format!("{stem}.svg")), self.svg())?;
        for (scenario, svg) in self.scenario_plots() {
            std::fs::write(dir.join(format!("{stem}-{scenario}.svg")), svg)?;
        }
        Ok(json)
    }

    fn plot_subtitle(&self) -> String {
        format!(
            "commit {} | {} ({} cores) | {}, {} workers/node | medians of {} rounds",
            self.run.commit,
            self.run.machine.cpu_model,
            self.run.machine.cores,
            self.driver,
            self.workers_per_node,
            self.rounds
        )
    }

    /// (scenario name, SVG) for every scenario this run measured.
    pub fn scenario_plots(&self) -> Vec<(&'static str, String)> {
        const DIRECT: (&str, &str) = ("direct (no mesh)", "#9aa5b1");
        const TLS: (&str, &str) = ("plain TLS 1.3", "#38a169");
        const MESH: (&str, &str) = ("mesh (two data planes, HBONE)", "#2b6cb0");
        const RELAYS: (&str, &str) = ("two plain TCP relays", "#d69e2e");
        let sub = self.plot_subtitle();
        let mut plots = Vec::new();
        let tls = self.tls_throughput.as_ref().map(|t| t.gbit_per_s);
        let mut groups = vec![(
            "one stream".to_owned(),
            vec![
                Some(self.direct_throughput.gbit_per_s),
                tls,
                self.relays_throughput.as_ref().map(|r| r.gbit_per_s),
                Some(self.mesh_throughput.gbit_per_s),
            ],
        )];
        if let Some(pass) = &self.passthrough_throughput {
            groups.push((
                "mesh pod to outside (TCP)".to_owned(),
                vec![None, None, None, Some(pass.gbit_per_s)],
            ));
        }
        for p in &self.worker_sweep {
            groups.push((
                format!("{} streams, {} worker(s)", p.streams, p.workers),
                vec![
                    Some(p.direct_gbit_per_s),
                    None,
                    None,
                    Some(p.mesh_gbit_per_s),
                ],
            ));
        }
        plots.push((
            "throughput",
            grouped_bars(
                "Bulk TCP streams",
                &sub,
                "Gbit/s",
                &[DIRECT, TLS, RELAYS, MESH],
                &groups,
            ),
        ));
        let mut groups = Vec::new();
        for f in &self.fixed_rates {
            for (name, q) in QUANTILES {
                groups.push((
                    format!(
                        "{name} @ {:.0}/s x{}{}",
                        f.offered_rps,
                        f.connections,
                        if f.beside_bulk > 0 { " +bulk" } else { "" }
                    ),
                    vec![
                        Some(q(&f.direct.latency)),
                        f.relays.as_ref().map(|r| q(&r.latency)),
                        Some(q(&f.mesh.latency)),
                    ],
                ));
            }
        }
        if !groups.is_empty() {
            plots.push((
                "latency",
                grouped_bars(
                    &format!(
                        "{} B request/response, open loop at fixed rates (from intended send time)",
                        self.rr_size_bytes
                    ),
                    &sub,
                    "us",
                    &[DIRECT, RELAYS, MESH],
                    &groups,
                ),
            ));
        }
        let mut groups: Vec<_> = self
            .connection_rates
            .iter()
            .map(|c| {
                (
                    format!("{} client thread(s)", c.threads),
                    vec![Some(c.direct_per_s), c.relays_per_s, Some(c.mesh_per_s)],
                )
            })
            .collect();
        if let Some(f) = &self.fresh_handshake_rate {
            groups.push((
                "1 thread, fresh handshake each".into(),
                vec![Some(f.rate.direct_per_s), None, Some(f.rate.mesh_per_s)],
            ));
        }
        for p in &self.worker_sweep {
            groups.push((
                format!("{} thr, {} worker(s)", p.conn_threads, p.workers),
                vec![Some(p.direct_conns_per_s), None, Some(p.mesh_conns_per_s)],
            ));
        }
        if !groups.is_empty() {
            plots.push((
                "connections",
                grouped_bars(
                    "New connections per second (connect, 1 byte each way, close)",
                    &sub,
                    "/s",
                    &[DIRECT, RELAYS, MESH],
                    &groups,
                ),
            ));
        }
        if let Some(mem) = &self.memory {
            let groups: Vec<_> = mem
                .nodes
                .iter()
                .flat_map(|n| {
                    [
                        (
                            format!("{}: KiB per held conn", n.node),
                            vec![Some(n.bytes_per_connection / 1024.0)],
                        ),
                        (
                            format!("{}: idle RSS, MB", n.node),
                            vec![Some(n.idle_rss_bytes as f64 / 1e6)],
                        ),
                    ]
                })
                .collect();
            plots.push((
                "memory",
                grouped_bars(
                    &format!(
                        "Data-plane memory, {} idle connections held through the mesh",
                        mem.held_connections
                    ),
                    &sub,
                    "",
                    &[MESH],
                    &groups,
                ),
            ));
        }
        plots
    }

    /// Two bar groups (throughput; latency p50/p99), direct beside mesh.
    pub fn svg(&self) -> String {
        let mut s = String::new();
        let (w, h) = (760.0, 340.0);
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="20" y="18" font-size="13">meshlab, commit {}, {} (medians of {} rounds)</text>
<text x="20" y="34" font-size="11">{} workers/node, {}, on {} ({} cores), kernel {}</text>
"#,
            self.run.commit,
            self.run.started,
            self.rounds,
            self.workers_per_node,
            self.driver,
            self.run.machine.cpu_model,
            self.run.machine.cores,
            self.run.machine.kernel
        );
        let panel = |s: &mut String,
                     x0: f64,
                     title: &str,
                     unit: &str,
                     bars: &[(&str, f64, f64)]| {
            let max = bars
                .iter()
                .flat_map(|(_, d, m)| [*d, *m])
                .fold(0.0_f64, f64::max)
                .max(1e-9);
            let (top, bottom, bw) = (66.0, 290.0, 34.0);
            let _ = writeln!(
                s,
                r#"<text x="{x0}" y="54" font-size="13">{title} ({unit})</text>"#
            );
            let _ = writeln!(
                s,
                r#"<line x1="{x0}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/>"#,
                x0 + 330.0
            );
            for (i, (label, d, m)) in bars.iter().enumerate() {
                let gx = x0 + 20.0 + i as f64 * 110.0;
                for (j, (v, color, name)) in [(*d, "#9aa5b1", "direct"), (*m, "#2b6cb0", "mesh")]
                    .iter()
                    .enumerate()
                {
                    let bh = (bottom - top) * v / max;
                    let x = gx + j as f64 * (bw + 4.0);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x}" y="{}" width="{bw}" height="{bh}" fill="{color}"><title>{name} {v:.2}</title></rect>"#,
                        bottom - bh
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{}" y="{}" text-anchor="middle" font-size="10">{v:.1}</text>"#,
                        x + bw / 2.0,
                        bottom - bh - 4.0
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#,
                    gx + bw + 2.0,
                    bottom + 16.0
                );
            }
        };
        panel(
            &mut s,
            20.0,
            "one TCP stream",
            "Gbit/s",
            &[(
                "throughput",
                self.direct_throughput.gbit_per_s,
                self.mesh_throughput.gbit_per_s,
            )],
        );
        panel(
            &mut s,
            390.0,
            "1 KiB round trip",
            "us",
            &[
                ("p50", self.direct_latency.p50_us, self.mesh_latency.p50_us),
                ("p99", self.direct_latency.p99_us, self.mesh_latency.p99_us),
                (
                    "p99.9",
                    self.direct_latency.p999_us,
                    self.mesh_latency.p999_us,
                ),
            ],
        );
        let _ = write!(
            s,
            r##"<rect x="20" y="312" width="12" height="12" fill="#9aa5b1"/><text x="38" y="322">direct (no mesh)</text>
<rect x="160" y="312" width="12" height="12" fill="#2b6cb0"/><text x="178" y="322">through both data planes (HBONE, mTLS)</text>
</svg>
"##
        );
        s
    }
}

/// Vertical bars in groups, one colour per series (`(name, colour)`), linear scale from zero.
/// A missing value leaves its slot empty.
/// Room for one series' name in a plot's legend.
const LEGEND_ENTRY_W: f64 = 220.0;

pub fn grouped_bars(
    title: &str,
    subtitle: &str,
    unit: &str,
    series: &[(&str, &str)],
    groups: &[(String, Vec<Option<f64>>)],
) -> String {
    let (left, top, bottom, bar_w, gap) = (60.0, 60.0, 300.0, 26.0, 34.0);
    let group_w = bar_w * series.len() as f64 + gap;
    let legend_w = 10.0 + LEGEND_ENTRY_W * series.len() as f64;
    let width = (left + group_w * groups.len() as f64 + 20.0)
        .max(legend_w)
        .max(760.0);
    let max = groups
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0_f64, |a, b| a.max(*b))
        .max(1e-9);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="380" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="18" font-size="13">{title}</text>
<text x="10" y="34" font-size="10">{subtitle}</text>
<text x="10" y="{}" font-size="10">{unit}</text>
<line x1="{left}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/>
"#,
        top - 6.0,
        width - 10.0
    );
    for (g, (label, values)) in groups.iter().enumerate() {
        let gx = left + 10.0 + g as f64 * group_w;
        for (i, value) in values.iter().enumerate() {
            let (Some(v), Some((name, colour))) = (value, series.get(i)) else {
                continue;
            };
            let h = (bottom - top) * v / max;
            let x = gx + i as f64 * bar_w;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{}" width="{}" height="{h}" fill="{colour}"><title>{name}: {v:.3}</title></rect><text x="{}" y="{}" text-anchor="middle" font-size="9">{}</text>"#,
                bottom - h,
                bar_w - 2.0,
                x + bar_w / 2.0 - 1.0,
                bottom - h - 3.0,
                short(*v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="10">{label}</text>"#,
            gx + bar_w * series.len() as f64 / 2.0,
            bottom + 16.0 + 12.0 * (g % 2) as f64
        );
    }
    for (i, (name, colour)) in series.iter().enumerate() {
        let x = 10.0 + i as f64 * LEGEND_ENTRY_W;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="352" width="12" height="12" fill="{colour}"/><text x="{}" y="362">{name}</text>"#,
            x + 18.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A value label short enough to sit above a bar.
fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A horizontal bar chart on a log scale (values spanning orders of magnitude), as SVG.
pub fn log_bar_chart(title: &str, subtitle: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let (label_w, chart_w, row_h, top) = (230.0, 470.0, 22.0, 52.0);
    let height = top + row_h * bars.len() as f64 + 30.0;
    let max = bars.iter().map(|(_, v)| *v).fold(1.0_f64, f64::max);
    let (lo, hi) = (1.0_f64.log10(), max.log10().ceil().max(1.0));
    let x = |v: f64| label_w + chart_w * (v.max(1.0).log10() - lo) / (hi - lo);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="18" font-size="13">{title}</text>
<text x="10" y="34" font-size="11">{subtitle}</text>
"#,
        w = label_w + chart_w + 90.0
    );
    let mut decade = lo.floor() as i32;
    while f64::from(decade) <= hi {
        let xd = x(10f64.powi(decade));
        let _ = writeln!(
            s,
            r##"<line x1="{xd}" y1="{top}" x2="{xd}" y2="{}" stroke="#ddd"/><text x="{xd}" y="{}" text-anchor="middle" font-size="10">{}</text>"##,
            height - 24.0,
            height - 10.0,
            10f64.powi(decade)
        );
        decade += 1;
    }
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{label}</text><rect x="{label_w}" y="{}" width="{}" height="{}" fill="#2b6cb0"/><text x="{}" y="{}" font-size="10">{value:.0} {unit}</text>"##,
            label_w - 8.0,
            y + 14.0,
            y + 3.0,
            (x(*value) - label_w).max(1.0),
            row_h - 6.0,
            x(*value) + 4.0,
            y + 14.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// What a row of [`compare`] holds, and so what its last column shows.
#[derive(Clone, Copy, PartialEq)]
enum Shown {
    /// A figure of each run as measured: second / first.
    Figure,
    /// A ratio within each run (mesh vs direct): second / first.
    InRunRatio,
    /// A signed difference within each run, in microseconds: second - first. A ratio of two
    /// such differences means nothing when one is near zero or they differ in sign.
    InRunMicros,
}

/// Two lab results side by side: every figure of the first, of the second, and second /
/// first (second - first for the latency the mesh adds). Works on the JSON (older files lack
/// newer figures; those rows say so). The in-run figures (mesh vs direct) are the rows to
/// trust across runs: absolute figures drift with the machine.
pub fn compare(a: &serde_json::Value, b: &serde_json::Value) -> String {
    use serde_json::Value;
    let mut t = String::new();
    let describe = |v: &Value| {
        format!(
            "{} commit {} | {} ({} cores), kernel {} | {} | {} workers/node | tuning {}",
            v["started"].as_str().unwrap_or("?"),
            v["commit"].as_str().unwrap_or("?"),
            v["machine"]["cpu_model"].as_str().unwrap_or("?"),
            v["machine"]["cores"],
            v["machine"]["kernel"].as_str().unwrap_or("?"),
            v["driver"].as_str().unwrap_or("?"),
            v["workers_per_node"],
            v["tuning"].as_str().unwrap_or("none"),
        )
    };
    let _ = writeln!(t, "first:  {}", describe(a));
    let _ = writeln!(t, "second: {}", describe(b));
    if a["machine"] != b["machine"] {
        let _ = writeln!(
            t,
            "different machines: compare the in-run ratios (marked *) only"
        );
    }
    let get = |v: &Value, path: &[&str]| -> Option<f64> {
        let mut cur = v;
        for key in path {
            cur = match key.parse::<usize>() {
                Ok(i) => cur.get(i)?,
                Err(_) => cur.get(*key)?,
            };
        }
        cur.as_f64()
    };
    let _ = writeln!(
        t,
        "{:<54}{:>14}{:>14}{:>14}",
        "(* = within one run)", "first", "second", "2nd vs 1st"
    );
    let mut row = |name: &str, path: &[&str], shown: Shown| {
        let (x, y) = (get(a, path), get(b, path));
        let cell = |v: Option<f64>| match v {
            None => "-".into(),
            Some(v) if v.abs() >= 1e4 => format!("{v:.0}"),
            Some(v) => format!("{v:.3}"),
        };
        let change = match (shown, x, y) {
            (Shown::InRunMicros, Some(x), Some(y)) => format!("{:+.1} us", y - x),
            (Shown::Figure | Shown::InRunRatio, Some(x), Some(y)) if x != 0.0 => {
                format!("x{:.3}", y / x)
            }
            _ => "-".into(),
        };
        let mark = if shown == Shown::Figure { " " } else { "*" };
        let _ = writeln!(
            t,
            "{mark}{name:<53}{:>14}{:>14}{:>14}",
            cell(x),
            cell(y),
            change
        );
    };
    row(
        "one stream direct, Gbit/s",
        &["direct_throughput", "gbit_per_s"],
        Shown::Figure,
    );
    row(
        "one stream mesh, Gbit/s",
        &["mesh_throughput", "gbit_per_s"],
        Shown::Figure,
    );
    row(
        "one stream mesh / direct",
        &["ratios", "throughput_mesh_over_direct"],
        Shown::InRunRatio,
    );
    row(
        "one plain TLS stream, Gbit/s",
        &["tls_throughput", "gbit_per_s"],
        Shown::Figure,
    );
    row(
        "one stream passthrough (mesh pod to outside), Gbit/s",
        &["passthrough_throughput", "gbit_per_s"],
        Shown::Figure,
    );
    row(
        "one stream through two plain relays, Gbit/s",
        &["relays_throughput", "gbit_per_s"],
        Shown::Figure,
    );
    row(
        "one stream mesh / plain TLS",
        &["ratios", "throughput_mesh_over_tls"],
        Shown::InRunRatio,
    );
    row(
        "data-plane cores per Gbit/s",
        &["ratios", "dataplane_cores_per_gbit"],
        Shown::Figure,
    );
    row(
        "1 KiB round trip p50 direct, us",
        &["direct_latency", "p50_us"],
        Shown::Figure,
    );
    row(
        "1 KiB round trip p50 mesh, us",
        &["mesh_latency", "p50_us"],
        Shown::Figure,
    );
    row(
        "1 KiB round trip p50 through two plain relays, us",
        &["fixed_rates", "0", "relays", "latency", "p50_us"],
        Shown::Figure,
    );
    row(
        "1 KiB round trip p50 added by mesh, us",
        &["ratios", "added_p50_us"],
        Shown::InRunMicros,
    );
    row(
        "1 KiB round trip p99 added by mesh, us",
        &["ratios", "added_p99_us"],
        Shown::InRunMicros,
    );
    for i in 0..2 {
        let threads = a["connection_rates"][i]["threads"]
            .as_u64()
            .or_else(|| b["connection_rates"][i]["threads"].as_u64());
        let Some(threads) = threads else { continue };
        let n = i.to_string();
        row(
            &format!("new connections/s direct, {threads} thread(s)"),
            &["connection_rates", &n, "direct_per_s"],
            Shown::Figure,
        );
        row(
            &format!("new connections/s mesh, {threads} thread(s)"),
            &["connection_rates", &n, "mesh_per_s"],
            Shown::Figure,
        );
        row(
            &format!("new connections/s two plain relays, {threads} thread(s)"),
            &["connection_rates", &n, "relays_per_s"],
            Shown::Figure,
        );
    }
    row(
        "new connections/s direct, fresh handshake each",
        &["fresh_handshake_rate", "direct_per_s"],
        Shown::Figure,
    );
    row(
        "new connections/s mesh, fresh handshake each",
        &["fresh_handshake_rate", "mesh_per_s"],
        Shown::Figure,
    );
    for i in 0.. {
        let f = |v: &Value| {
            let f = &v["fixed_rates"][i];
            let beside = match f["beside_bulk"].as_u64() {
                Some(n) if n > 0 => format!(" beside {n} bulk"),
                _ => String::new(),
            };
            Some((
                format!(
                    "{}/s x{}{beside}",
                    f["offered_rps"].as_f64()?,
                    f["connections"]
                ),
                !beside.is_empty(),
            ))
        };
        let Some((label, beside_bulk)) = f(a).or_else(|| f(b)) else {
            break;
        };
        let n = i.to_string();
        for (side, pct) in [
            ("direct", "p99_us"),
            ("mesh", "p50_us"),
            ("mesh", "p99_us"),
            ("mesh", "p999_us"),
        ] {
            row(
                &format!("{label} {side} latency {pct}"),
                &["fixed_rates", &n, side, "latency", pct],
                Shown::Figure,
            );
        }
        if beside_bulk {
            row(
                &format!("{label}: bulk mesh, Gbit/s"),
                &["fixed_rates", &n, "bulk_gbit_per_s", "1"],
                Shown::Figure,
            );
            // The processes' CPU is mostly the bulk streams': not a per-request figure.
            continue;
        }
        for (figure, unit) in [("dataplane_s", "CPU s"), ("dataplane_sleeps", "sleeps")] {
            for node in 0..2 {
                row(
                    &format!("{label} node-{} data plane {unit}/1000 req", node + 1),
                    &[
                        "fixed_rates",
                        &n,
                        "mesh",
                        "cpu_per_1000_requests",
                        figure,
                        &node.to_string(),
                    ],
                    Shown::Figure,
                );
            }
        }
    }
    for i in 0..8 {
        let workers = a["worker_sweep"][i]["workers"]
            .as_u64()
            .or_else(|| b["worker_sweep"][i]["workers"].as_u64());
        let Some(workers) = workers else { break };
        let n = i.to_string();
        row(
            &format!("{workers} worker(s): mesh streams, Gbit/s"),
            &["worker_sweep", &n, "mesh_gbit_per_s"],
            Shown::Figure,
        );
        row(
            &format!("{workers} worker(s): mesh new conns/s"),
            &["worker_sweep", &n, "mesh_conns_per_s"],
            Shown::Figure,
        );
    }
    for i in 0..2 {
        let n = i.to_string();
        let node = a["memory"]["nodes"][i]["node"].as_str().unwrap_or("node");
        row(
            &format!("{node}: bytes per held connection"),
            &["memory", "nodes", &n, "bytes_per_connection"],
            Shown::Figure,
        );
        row(
            &format!("{node}: idle RSS, bytes"),
            &["memory", "nodes", &n, "idle_rss_bytes"],
            Shown::Figure,
        );
    }
    t
}

#[cfg(test)]
mod compare_tests {
    use serde_json::json;

    #[test]
    fn figures_sit_side_by_side_with_their_ratio_and_missing_ones_say_so() {
        let machine = json!({"cpu_model": "X", "cores": 2, "kernel": "6.18"});
        let first = json!({"commit": "a", "machine": machine,
            "ratios": {"throughput_mesh_over_direct": 0.2, "added_p50_us": 100.0}});
        let second = json!({"commit": "b", "machine": machine,
            "ratios": {"throughput_mesh_over_direct": 0.3, "added_p50_us": 50.0},
            "connection_rates": [{"threads": 1, "direct_per_s": 8000.0, "mesh_per_s": 2000.0}]});
        let text = super::compare(&first, &second);
        let line = |start: &str| {
            text.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} in\n{text}"))
                .to_owned()
        };
        assert!(line("*one stream mesh / direct").ends_with("x1.500"));
        // The mesh added 50 us less in the second run: a difference, not a ratio.
        assert!(line("*1 KiB round trip p50 added").ends_with("-50.0 us"));
        // Absent from both runs.
        assert!(line("*1 KiB round trip p99 added")
            .trim_end()
            .ends_with('-'));
        // Only the second run measured connection rates.
        let conns = line(" new connections/s mesh, 1 thread");
        assert!(
            conns.contains(" - ") && conns.trim_end().ends_with('-'),
            "{conns}"
        );
        assert!(!text.contains("different machines"));
    }
}

/// The mesh and passthrough paths' figures on one side of an A/B comparison (medians over
/// rounds).
#[derive(Clone, Debug, Serialize)]
pub struct AbSide {
    pub throughput: Throughput,
    /// One stream from a mesh pod to a pod outside the mesh (plain TCP, relayed by node 1).
    pub passthrough_throughput: Throughput,
    /// 1 KiB request/response, open loop at 1000/s on one connection.
    pub latency: Latency,
    /// Sleeps of both data planes together per request of that load (see
    /// `ProcessCpu::dataplane_sleeps`): the wakeups the mesh path adds to each request.
    pub sleeps_per_request: f64,
    /// 1 KiB request/response at 10000/s over eight connections.
    pub latency_loaded: Latency,
    /// 1 KiB request/response at 1000/s on one connection beside one bulk stream between the
    /// same pods, and that stream's throughput.
    pub latency_beside_bulk: Latency,
    pub bulk_beside_gbit_per_s: f64,
    /// New connections per second, one client thread.
    pub connections_per_s: f64,
    /// Requests never answered, over the three fixed-rate loads and every round (should be 0).
    pub rate_errors: u64,
    /// New connections that failed, over every round (should be 0).
    pub connection_failures: u64,
    /// Data-plane memory (mean of the two nodes), when the comparison measures it.
    pub kib_per_held_connection: Option<f64>,
    pub idle_rss_mb: Option<f64>,
}

/// Two variants of the mesh measured within one run, their rounds alternating: a kernel
/// tuning profile against none, or one data-plane build or flag set against another.
#[derive(Clone, Debug, Serialize)]
pub struct AbReport {
    #[serde(flatten)]
    pub run: Provenance,
    pub driver: String,
    pub workers_per_node: usize,
    /// What differs between the two sides.
    pub experiment: String,
    pub baseline_label: String,
    pub variant_label: String,
    pub rounds: usize,
    pub steal_percent: Option<f64>,
    pub baseline: AbSide,
    pub variant: AbSide,
}

impl AbReport {
    /// (figure, baseline, variant) for the table and the plot.
    fn figures(&self) -> Vec<(&'static str, f64, f64)> {
        let (u, t) = (&self.baseline, &self.variant);
        let mut rows = vec![
            (
                "one stream, Gbit/s",
                u.throughput.gbit_per_s,
                t.throughput.gbit_per_s,
            ),
            (
                "data planes, cores per Gbit/s",
                u.throughput.cores_per_gbit(),
                t.throughput.cores_per_gbit(),
            ),
            (
                "one stream passthrough, Gbit/s",
                u.passthrough_throughput.gbit_per_s,
                t.passthrough_throughput.gbit_per_s,
            ),
            (
                "passthrough, cores per Gbit/s",
                u.passthrough_throughput.cores_per_gbit(),
                t.passthrough_throughput.cores_per_gbit(),
            ),
            (
                "1 KiB at 1000/s, p50 us",
                u.latency.p50_us,
                t.latency.p50_us,
            ),
            (
                "1 KiB at 1000/s, p99 us",
                u.latency.p99_us,
                t.latency.p99_us,
            ),
            (
                "same beside a bulk stream, p50 us",
                u.latency_beside_bulk.p50_us,
                t.latency_beside_bulk.p50_us,
            ),
            (
                "same beside a bulk stream, p99 us",
                u.latency_beside_bulk.p99_us,
                t.latency_beside_bulk.p99_us,
            ),
            (
                "that bulk stream, Gbit/s",
                u.bulk_beside_gbit_per_s,
                t.bulk_beside_gbit_per_s,
            ),
            // After the rows that read "same" as the 1000/s round trip.
            (
                "1 KiB at 10000/s on 8, p50 us",
                u.latency_loaded.p50_us,
                t.latency_loaded.p50_us,
            ),
            (
                "1 KiB at 10000/s on 8, p99 us",
                u.latency_loaded.p99_us,
                t.latency_loaded.p99_us,
            ),
            (
                "data-plane sleeps per request at 1000/s",
                u.sleeps_per_request,
                t.sleeps_per_request,
            ),
            (
                "new connections/s, 1 thread",
                u.connections_per_s,
                t.connections_per_s,
            ),
        ];
        if let (Some(a), Some(b)) = (u.kib_per_held_connection, t.kib_per_held_connection) {
            rows.push(("KiB per held connection", a, b));
        }
        if let (Some(a), Some(b)) = (u.idle_rss_mb, t.idle_rss_mb) {
            rows.push(("idle RSS, MB", a, b));
        }
        rows
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nmeshlab A/B: {} | mesh and passthrough paths | medians of {} rounds, alternating | {} workers/node, {} | {} ({} cores), kernel {} | commit {}",
            self.experiment,
            self.rounds,
            self.workers_per_node,
            self.driver,
            self.run.machine.cpu_model,
            self.run.machine.cores,
            self.run.machine.kernel,
            self.run.commit
        );
        let _ = writeln!(t, "baseline: {}", self.baseline_label);
        let _ = writeln!(t, "variant:  {}", self.variant_label);
        steal_line(&mut t, self.steal_percent);
        let _ = writeln!(
            t,
            "{:<42}{:>12}{:>12}{:>20}",
            "", "baseline", "variant", "variant/baseline"
        );
        for (name, u, v) in self.figures() {
            let _ = writeln!(
                t,
                "{name:<42}{u:>12.3}{v:>12.3}{:>20}",
                format!("x{:.3}", v / u)
            );
        }
        // Counts, not figures to divide: any at all makes the side's figures suspect.
        let (u, v) = (&self.baseline, &self.variant);
        for (name, u, v, flag) in [
            (
                "requests unanswered (fixed-rate loads)",
                u.rate_errors,
                v.rate_errors,
                "UNANSWERED",
            ),
            (
                "new connections failed",
                u.connection_failures,
                v.connection_failures,
                "FAILED",
            ),
        ] {
            let flag = if u + v > 0 { flag } else { "" };
            let _ = writeln!(t, "{name:<42}{u:>12}{v:>12}{flag:>20}");
        }
        t
    }

    /// Writes `<stem>.json` and `<stem>.svg` into `dir`; returns the JSON path.
    pub fn save(&self, dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join(format!("{stem}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")?;
        let mut bars = Vec::new();
        for (name, u, v) in self.figures() {
            bars.push((format!("{name}, baseline"), u));
            bars.push((format!("{name}, variant"), v));
        }
        let svg = log_bar_chart(
            &format!("A/B: {}", self.experiment),
            &format!(
                "{} | medians of {} alternating rounds | commit {}",
                self.run.machine.cpu_model, self.rounds, self.run.commit
            ),
            "",
            &bars,
        );
        std::fs::write(dir.join(format!("{stem}.svg")), svg)?;
        Ok(json)
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    fn provenance() -> Provenance {
        Provenance {
            command: "meshlab test".into(),
            commit: "abc".into(),
            started: "2026-01-01T00:00:00Z".into(),
            machine: Machine {
                cpu_model: "X".into(),
                cores: 2,
                kernel: "6.18".into(),
                hostname: "h".into(),
                node: Default::default(),
            },
            started_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn throughput() -> Throughput {
        Throughput {
            gbit_per_s: 1.0,
            bytes: 125_000_000,
            seconds: 1.0,
            dataplane_cores: 0.1,
            cpu: ProcessCpu::default(),
        }
    }

    fn latency() -> Latency {
        Latency {
            count: 100,
            mean_us: 50.0,
            p50_us: 50.0,
            p90_us: 60.0,
            p99_us: 70.0,
            p999_us: 80.0,
            max_us: 90.0,
        }
    }

    fn bare_report() -> Report {
        Report {
            run: provenance(),
            driver: "io_uring".into(),
            workers_per_node: 1,
            pinned: false,
            rounds: 1,
            steal_percent: None,
            topology: "test".into(),
            tuning: None,
            direct_throughput: throughput(),
            mesh_throughput: throughput(),
            tls_throughput: None,
            tls_cipher_suite: None,
            passthrough_throughput: None,
            relays_throughput: None,
            rr_size_bytes: 1024,
            latency_method: "test".into(),
            direct_latency: latency(),
            mesh_latency: latency(),
            fixed_rates: Vec::new(),
            connection_rates: Vec::new(),
            fresh_handshake_rate: None,
            worker_sweep: Vec::new(),
            memory: None,
            ratios: Ratios::of(&throughput(), &throughput(), None, &latency(), &latency()),
            rounds_detail: Rounds {
                direct_throughput: Vec::new(),
                mesh_throughput: Vec::new(),
                tls_throughput: Vec::new(),
                direct_latency: Vec::new(),
                mesh_latency: Vec::new(),
            },
        }
    }

    fn ab_side(rate_errors: u64, connection_failures: u64) -> AbSide {
        AbSide {
            throughput: throughput(),
            passthrough_throughput: throughput(),
            latency: latency(),
            sleeps_per_request: 2.0,
            latency_loaded: latency(),
            latency_beside_bulk: latency(),
            bulk_beside_gbit_per_s: 1.0,
            connections_per_s: 1000.0,
            rate_errors,
            connection_failures,
            kib_per_held_connection: None,
            idle_rss_mb: None,
        }
    }

    fn ab_report(baseline: AbSide, variant: AbSide) -> AbReport {
        AbReport {
            run: provenance(),
            driver: "io_uring".into(),
            workers_per_node: 1,
            experiment: "test".into(),
            baseline_label: "a".into(),
            variant_label: "b".into(),
            rounds: 1,
            steal_percent: None,
            baseline,
            variant,
        }
    }

    fn line<'a>(text: &'a str, start: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} in\n{text}"))
    }

    #[test]
    fn ab_errors_and_failures_are_counted_per_side_and_flagged() {
        let r = ab_report(ab_side(0, 0), ab_side(7, 3));
        let text = r.table();
        let unanswered = line(&text, "requests unanswered");
        let counts: Vec<&str> = unanswered.split_whitespace().rev().take(3).collect();
        assert_eq!(counts, ["UNANSWERED", "7", "0"], "{unanswered}");
        let failed = line(&text, "new connections failed");
        let counts: Vec<&str> = failed.split_whitespace().rev().take(3).collect();
        assert_eq!(counts, ["FAILED", "3", "0"], "{failed}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["variant"]["rate_errors"], 7);
        assert_eq!(json["variant"]["connection_failures"], 3);
        assert_eq!(json["baseline"]["rate_errors"], 0);

        // A clean run shows its zero counts, unflagged.
        let text = ab_report(ab_side(0, 0), ab_side(0, 0)).table();
        assert!(
            !text.contains("UNANSWERED") && !text.contains("FAILED"),
            "{text}"
        );
        assert!(line(&text, "requests unanswered")
            .trim_end()
            .ends_with(" 0"));
    }

    #[test]
    fn the_relays_floor_sits_between_direct_and_mesh_with_both_ratios() {
        let stream = |gbit_per_s: f64, proxy_cpu_s: [f64; 2]| Throughput {
            gbit_per_s,
            bytes: (gbit_per_s * 1e9 / 8.0) as u64,
            seconds: 1.0,
            dataplane_cores: proxy_cpu_s[0] + proxy_cpu_s[1],
            cpu: ProcessCpu {
                dataplane_s: proxy_cpu_s,
                ..ProcessCpu::default()
            },
        };
        let at = |p50_us: f64, sleeps_per_request: f64| RateRun {
            achieved_rps: 1000.0,
            requests: 1000,
            errors: 0,
            latency: Latency {
                p50_us,
                p99_us: 2.0 * p50_us,
                ..latency()
            },
            send_lag: latency(),
            cpu_per_1000_requests: ProcessCpu {
                dataplane_s: [p50_us / 1e4; 2],
                dataplane_sleeps: [sleeps_per_request * 1e3; 2],
                ..ProcessCpu::default()
            },
        };
        let report = Report {
            direct_throughput: stream(40.0, [0.0; 2]),
            relays_throughput: Some(stream(20.0, [0.5, 0.25])),
            mesh_throughput: stream(5.0, [0.625, 0.5]),
            fixed_rates: vec![FixedRate {
                offered_rps: 1000.0,
                connections: 1,
                beside_bulk: 0,
                bulk_gbit_per_s: None,
                direct: at(100.0, 0.0),
                mesh: at(300.0, 2.0),
                relays: Some(at(250.0, 1.5)),
            }],
            connection_rates: vec![ConnRate {
                threads: 1,
                direct_per_s: 10000.0,
                mesh_per_s: 3000.0,
                direct_latency: latency(),
                mesh_latency: latency(),
                relays_per_s: Some(4000.0),
                relays_latency: Some(latency()),
                failures: 0,
            }],
            ..bare_report()
        };
        let text = report.table();
        let floor = &text[text
            .find("two plain TCP relays")
            .expect("the floor section")..];
        let cells = |start: &str| -> Vec<String> {
            line(floor, start)
                .trim_start_matches(start)
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        // direct, relays, mesh, relays vs direct, mesh vs relays.
        assert_eq!(
            cells("one stream, Gbit/s"),
            ["40.00", "20.00", "5.00", "x0.50", "x0.25"],
            "{text}"
        );
        // 0.5 CPU s over 2.5 GB through the relays, 0.625 over 0.625 GB through the mesh.
        assert_eq!(
            cells("  CPU s per GB, node-1 proxy"),
            ["-", "0.200", "1.000", "x5.00"],
            "{text}"
        );
        assert_eq!(
            cells("1 KiB at 1000/s p50, us"),
            ["100.0", "250.0", "300.0", "+150.0", "us", "+50.0", "us"],
            "{text}"
        );
        // 25 ms against 30 ms per 1000 requests.
        assert_eq!(
            cells("  CPU ms/1000 req, node-1 proxy"),
            ["-", "25.00", "30.00", "x1.20"],
            "{text}"
        );
        assert_eq!(
            cells("  sleeps/req, node-2 proxy"),
            ["-", "1.50", "2.00"],
            "{text}"
        );
        assert_eq!(
            cells("new connections/s, 1 thread(s)"),
            ["10000", "4000", "3000", "x0.40", "x0.75"],
            "{text}"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["relays_throughput"]["gbit_per_s"], 20.0);
        assert_eq!(json["fixed_rates"][0]["relays"]["latency"]["p50_us"], 250.0);
        assert_eq!(json["connection_rates"][0]["relays_per_s"], 4000.0);
        let compared = compare(&json, &json);
        assert!(
            line(
                &compared,
                " new connections/s two plain relays, 1 thread(s)"
            )
            .contains("4000"),
            "{compared}"
        );
        // Runs saved before the relays carry none of their keys, and show no such section.
        let before = bare_report();
        assert!(!before.table().contains("two plain TCP relays"));
        let json = serde_json::to_value(&before).expect("json");
        assert!(json.get("relays_throughput").is_none());
    }

    #[test]
    fn worker_sweep_connection_failures_are_saved_and_flagged() {
        let point = |workers, conn_failures| SweepPoint {
            workers,
            streams: 2,
            direct_gbit_per_s: 2.0,
            mesh_gbit_per_s: 1.0,
            mesh_dataplane_cores: 0.5,
            conn_threads: 4,
            direct_conns_per_s: 8000.0,
            mesh_conns_per_s: 4000.0,
            conn_failures,
        };
        let report = Report {
            worker_sweep: vec![point(1, 0), point(2, 5)],
            ..bare_report()
        };
        let text = report.table();
        assert!(
            line(&text, "2 worker(s): new conns/s").ends_with("5 FAILED"),
            "{text}"
        );
        assert!(
            !line(&text, "1 worker(s): new conns/s").contains("FAILED"),
            "{text}"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["worker_sweep"][1]["conn_failures"], 5);
        assert_eq!(json["worker_sweep"][0]["conn_failures"], 0);
    }
}
