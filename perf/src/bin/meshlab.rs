//! `meshlab`: the main job. Brings up two simulated nodes, pushes real traffic through the
//! mesh and around it, prints the table, saves JSON and SVG to bench-results/.
//!
//! `meshlab clean` removes what an interrupted lab (killed with SIGKILL) may have left behind.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use mesh_io::procfs::Process;
use perf::gen::{BulkResult, ConnRateResult, RateResult};
use perf::lab::{self, Lab, LabOptions, ECHO_PORT, SINK_PORT, TLS_SINK_PORT};
use perf::load::Latency;
use perf::report::{
    self, AbReport, AbSide, ConnRate, FixedRate, FreshHandshakeRate, Memory, NodeMemory,
    ProcessCpu, Provenance, RateRun, Ratios, Report, SweepPoint, Throughput,
};
use perf::tls_baseline::TlsBulkResult;
use perf::{bins, sys};

#[derive(Parser)]
#[command(about = "Two-node mesh lab: throughput, latency and memory, mesh vs direct")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the standard lab (the default).
    Run,
    /// Remove namespaces and processes left by labs whose process is gone, and restore the
    /// node-wide settings a tuned one changed.
    Clean,
    /// Put two result files side by side, each figure with its ratio (second / first).
    Compare { first: PathBuf, second: PathBuf },
    /// A kernel-tuning profile's effect, measured within one run: every round measures the
    /// mesh untuned, applies the profile (in every lab namespace, and its node-wide settings on
    /// this machine), measures again, reverts.
    Tuning {
        profile: String,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Two data-plane variants measured within one run, rounds alternating (A B, B A, ...):
    /// another build (`--variant-dataplane`) and/or extra flags (`--variant-arg`) against this
    /// build. Both nodes' data planes restart for each side; memory is measured with `--hold`
    /// connections.
    Ab {
        /// The baseline's data-plane binary (default: this build's).
        #[arg(long)]
        baseline_dataplane: Option<PathBuf>,
        #[arg(long)]
        variant_dataplane: Option<PathBuf>,
        #[arg(long = "variant-arg", allow_hyphen_values = true)]
        variant_args: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Data-plane workers per node (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Pin each node's workers to cores (both simulated nodes then pin to the same cores).
    #[arg(long)]
    pin: bool,
    /// I/O driver for the data planes: auto, io-uring or epoll.
    #[arg(long, default_value = "auto")]
    driver: String,
    /// Length of each bulk-stream run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Length of each fixed-rate request/response run (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 3.0)]
    rr_seconds: f64,
    /// Direct and mesh runs alternate this many times; the table shows medians over rounds
    /// (this VM's timing drifts by tens of percent from one minute to the next).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of each new-connection-rate run (0 to skip the scenario).
    #[arg(long, default_value_t = 3.0)]
    conn_seconds: f64,
    /// Connections to hold open for the memory measurement (0 to skip).
    #[arg(long, default_value_t = 10000)]
    hold: usize,
    /// Run the worker-count sweep (1..cores workers per node; restarts the data planes).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sweep: bool,
    /// Apply this kernel-tuning profile (`meshtune profile`) before measuring: inside every lab
    /// namespace, and its node-wide settings on this machine until the lab ends. Compare with
    /// an untuned run through `meshlab compare`.
    #[arg(long)]
    tuning: Option<String>,
    /// Extra flag for both data planes (repeatable), e.g. `--dataplane-arg=--no-access-log`.
    #[arg(long = "dataplane-arg", allow_hyphen_values = true)]
    dataplane_args: Vec<String>,
    /// Where to write the JSON and SVG results.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Print the table only; write nothing.
    #[arg(long)]
    no_save: bool,
}

impl RunArgs {
    /// Length of the connection-rate runs inside scenarios that always measure it (the worker
    /// sweep, A/B sides), also when `--conn-seconds 0` skips the standalone scenario.
    fn conn_seconds_always(&self) -> f64 {
        if self.conn_seconds > 0.0 {
            self.conn_seconds
        } else {
            3.0
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command.unwrap_or(Cmd::Run) {
        Cmd::Run => run(args.run),
        Cmd::Clean => clean(),
        Cmd::Tuning { profile, run } => tuning(run, &profile),
        Cmd::Ab {
            baseline_dataplane,
            variant_dataplane,
            variant_args,
            run,
        } => dataplane_ab(run, baseline_dataplane, variant_dataplane, variant_args),
        Cmd::Compare { first, second } => {
            let read = |p: &PathBuf| -> anyhow::Result<serde_json::Value> {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not JSON", p.display()))
            };
            print!("{}", report::compare(&read(&first)?, &read(&second)?));
            Ok(())
        }
    }
}

/// A progress bar on stderr, weighted by each step's expected seconds, with time left.
/// Redrawn in place on a terminal; one line per step otherwise (CI logs).
struct Progress {
    total: f64,
    done: f64,
    started: Instant,
    /// Time spent in weighted steps only: the rate that predicts the time left.
    measuring: Duration,
    tty: bool,
}

impl Progress {
    fn new(total_seconds: f64) -> Progress {
        use std::io::IsTerminal;
        Progress {
            total: total_seconds.max(1.0),
            done: 0.0,
            started: Instant::now(),
            measuring: Duration::ZERO,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Runs one step of about `seconds`, showing `what` while it runs.
    fn step<T>(&mut self, what: &str, seconds: f64, f: impl FnOnce() -> T) -> T {
        let fraction = (self.done / self.total).min(1.0);
        let elapsed = self.measuring.as_secs_f64();
        let left = if self.done > 0.0 {
            format!(
                "{:.0}s left",
                elapsed / self.done * (self.total - self.done)
            )
        } else {
            String::new()
        };
        const WIDTH: usize = 30;
        let filled = (fraction * WIDTH as f64) as usize;
        let bar = format!(
            "[{}{}] {:>3.0}% {left:>9} | {what}",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            fraction * 100.0
        );
        if self.tty {
            eprint!("\r\x1b[2K{bar}");
        } else {
            eprintln!("{bar}");
        }
        let began = Instant::now();
        let out = f();
        if seconds > 0.0 {
            self.measuring += began.elapsed();
            self.done += seconds;
        }
        out
    }

    fn finish(&self) {
        if self.tty {
            eprintln!(
                "\r\x1b[2K[{}] 100% done in {:.0}s",
                "#".repeat(30),
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Reads the first stdout line of a meshload process (its JSON result or readiness line).
fn first_line(child: &mut Child) -> anyhow::Result<String> {
    let out = child.stdout.as_mut().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim().is_empty() {
        let status = child.wait()?;
        bail!("meshload produced no result ({status})");
    }
    Ok(line)
}

/// The figures a meshload child prints, once it has finished.
fn meshload_result<T: serde::de::DeserializeOwned>(mut child: Child) -> anyhow::Result<T> {
    let line = first_line(&mut child)?;
    child.wait()?;
    serde_json::from_str(&line).with_context(|| format!("meshload said {line:?}"))
}

fn bulk_result(child: Child) -> anyhow::Result<BulkResult> {
    meshload_result(child)
}

/// The lab with its server apps: echo and sink servers in n2-a (enrolled) and n2-b (not),
/// and the plain TLS sink in n2-b.
struct Bench {
    lab: Lab,
    /// Server process per target pod.
    servers: Vec<(&'static str, u32)>,
    tls_server: u32,
    tls_ca: PathBuf,
    /// The plain TCP relays in n1-b and n2-b (see `Report::relays_throughput`).
    relays: [u32; 2],
    driver: String,
}

impl Bench {
    fn meshload<T: serde::de::DeserializeOwned>(
        &self,
        pod: &str,
        args: &[&str],
    ) -> anyhow::Result<T> {
        meshload_result(self.lab.spawn_in(pod, &self.lab.bins.meshload, args)?)
    }

    /// Runs `f` on the path to `to`, reporting the CPU each process spent: the generator's
    /// own figure comes from its result, the rest from /proc.
    fn with_cpu<T>(
        &self,
        to: SocketAddr,
        f: impl FnOnce() -> anyhow::Result<(T, f64)>,
    ) -> anyhow::Result<(T, ProcessCpu)> {
        let (server, middle) = self.path_of(to);
        let read = |pid: Option<u32>| {
            pid.and_then(|pid| Process::Pid(pid).cpu_seconds())
                .unwrap_or(0.0)
        };
        let sleeps = |pid: Option<u32>| pid.and_then(sys::voluntary_switches).unwrap_or(0) as f64;
        let before: Vec<f64> = middle.iter().map(|p| read(*p)).collect();
        let sleeps_before: Vec<f64> = middle.iter().map(|p| sleeps(*p)).collect();
        let server_before = read(server);
        let (out, client_s) = f()?;
        Ok((
            out,
            ProcessCpu {
                client_s,
                server_s: read(server) - server_before,
                dataplane_s: [read(middle[0]) - before[0], read(middle[1]) - before[1]],
                dataplane_sleeps: [
                    sleeps(middle[0]) - sleeps_before[0],
                    sleeps(middle[1]) - sleeps_before[1],
                ],
            },
        ))
    }

    /// The server a connection to `to` ends at, and the processes in its path on node 1 and
    /// node 2: the relays for the relays' ports (which lead to n2-b's server), else the data
    /// planes (idle on a direct path, whose figures then show their background).
    fn path_of(&self, to: SocketAddr) -> (Option<u32>, [Option<u32>; 2]) {
        if [RELAY_ECHO_PORT, RELAY_SINK_PORT].contains(&to.port()) {
            let server = self.servers.iter().find(|(pod, _)| *pod == "n2-b");
            return (server.map(|(_, pid)| *pid), self.relays.map(Some));
        }
        let server = if to.port() == TLS_SINK_PORT {
            Some(self.tls_server)
        } else {
            self.servers
                .iter()
                .find(|(pod, _)| self.lab.pod(pod).ip == to.ip())
                .map(|(_, pid)| *pid)
        };
        (server, [0, 1].map(|n| self.lab.dataplane_pid(n)))
    }

    fn bulk(
        &self,
        pod: &str,
        to: SocketAddr,
        connections: usize,
        seconds: f64,
    ) -> anyhow::Result<Throughput> {
        let (r, cpu) = self.with_cpu(to, || {
            let r = bulk_result(self.spawn_bulk(pod, to, connections, seconds)?)?;
            Ok((r, r.client_cpu_s))
        })?;
        Ok(throughput(r.bytes, r.seconds, cpu))
    }

    /// Starts `connections` bulk streams from `pod` to `to` for `seconds`; [`bulk_result`]
    /// waits for their figures.
    fn spawn_bulk(
        &self,
        pod: &str,
        to: SocketAddr,
        connections: usize,
        seconds: f64,
    ) -> anyhow::Result<Child> {
        let threads = connections.min(cores());
        self.lab.spawn_in(
            pod,
            &self.lab.bins.meshload,
            &[
                "bulk",
                "--to",
                &to.to_string(),
                "--connections",
                &connections.to_string(),
                "--threads",
                &threads.to_string(),
                "--seconds",
                &seconds.to_string(),
            ],
        )
    }

    fn tls_bulk(&self, seconds: f64) -> anyhow::Result<(Throughput, String)> {
        let to = self.lab.addr("n2-b", TLS_SINK_PORT);
        let (r, cpu) = self.with_cpu(to, || {
            let r: TlsBulkResult = self.meshload(
                "n1-b",
                &[
                    "tls-bulk",
                    "--to",
                    &to.to_string(),
                    "--ca",
                    &self.tls_ca.to_string_lossy(),
                    "--seconds",
                    &seconds.to_string(),
                ],
            )?;
            let client = r.client_cpu_s;
            Ok((r, client))
        })?;
        Ok((throughput(r.bytes, r.seconds, cpu), r.cipher_suite))
    }

    /// The fixed-rate load from `pod` to `to`, with its bulk streams (to the sink of the same
    /// pod) running from before the first request to after the last; their throughput is
    /// returned too.
    fn rate(
        &self,
        pod: &str,
        to: SocketAddr,
        load: &RateLoad,
        seconds: f64,
    ) -> anyhow::Result<(RateResult, ProcessCpu, Option<f64>)> {
        let bulk = if load.beside_bulk > 0 {
            let sink = SocketAddr::new(to.ip(), SINK_PORT);
            // The generator warms up for RATE_WARMUP_S before it measures.
            let around = seconds + RATE_WARMUP_S + 2.0 * BULK_LEAD_S;
            let child = self.spawn_bulk(pod, sink, load.beside_bulk, around)?;
            std::thread::sleep(Duration::from_secs_f64(BULK_LEAD_S));
            Some(child)
        } else {
            None
        };
        let (r, cpu) = self.with_cpu(to, || {
            let r: RateResult = self.meshload(
                pod,
                &[
                    "rate",
                    "--to",
                    &to.to_string(),
                    "--rps",
                    &load.rps.to_string(),
                    "--connections",
                    &load.connections.to_string(),
                    "--threads",
                    &load.connections.min(cores()).to_string(),
                    "--size",
                    &RR_SIZE.to_string(),
                    "--seconds",
                    &seconds.to_string(),
                    "--warmup",
                    &RATE_WARMUP_S.to_string(),
                ],
            )?;
            Ok((r, r.client_cpu_s))
        })?;
        let bulk_gbit_per_s = bulk
            .map(|child| bulk_result(child).map(|b| b.gbit_per_s()))
            .transpose()?;
        Ok((r, cpu, bulk_gbit_per_s))
    }

    fn conns(
        &self,
        pod: &str,
        to: SocketAddr,
        threads: usize,
        seconds: f64,
    ) -> anyhow::Result<ConnRateResult> {
        self.meshload(
            pod,
            &[
                "conns",
                "--to",
                &to.to_string(),
                "--threads",
                &threads.to_string(),
                "--seconds",
                &seconds.to_string(),
            ],
        )
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn throughput(bytes: u64, seconds: f64, cpu: ProcessCpu) -> Throughput {
    Throughput {
        gbit_per_s: bytes as f64 * 8.0 / seconds / 1e9,
        bytes,
        seconds,
        dataplane_cores: (cpu.dataplane_s[0] + cpu.dataplane_s[1]) / seconds,
        cpu,
    }
}

const RR_SIZE: usize = 1024;

/// How long the fixed-rate generator runs before it starts measuring.
const RATE_WARMUP_S: f64 = 0.5;

/// How long bulk streams beside a fixed-rate load start before it (and run on after it).
const BULK_LEAD_S: f64 = 0.5;

/// One offered load of the fixed-rate scenario.
struct RateLoad {
    rps: f64,
    connections: usize,
    /// Bulk streams pushed between the same two pods while the requests run.
    beside_bulk: usize,
}

/// The latency target's load (Istio quotes added latency at 1000 requests/s).
const LATENCY_LOAD: RateLoad = RateLoad {
    rps: 1000.0,
    connections: 1,
    beside_bulk: 0,
};

/// The latency load beside a bulk stream over the same path: whether a bulk flow holds back
/// the requests that share its data planes (and, on one worker, its pooled connection).
const BESIDE_BULK_LOAD: RateLoad = RateLoad {
    beside_bulk: 1,
    ..LATENCY_LOAD
};

/// The path loaded ten times harder over several connections: every worker busy, and many
/// requests in flight at once.
const LOADED_LOAD: RateLoad = RateLoad {
    rps: 10000.0,
    connections: 8,
    beside_bulk: 0,
};

/// The standard suite's loads: the latency load first (the headline round trip), then the
/// loaded path, then the latency load beside a bulk stream.
const RATE_LOADS: [RateLoad; 3] = [LATENCY_LOAD, LOADED_LOAD, BESIDE_BULK_LOAD];

/// New-connection rate, direct and mesh alternating, for 1 and 4 client threads.
fn connection_rates(
    bench: &Bench,
    progress: &mut Progress,
    rounds: usize,
    seconds: f64,
) -> anyhow::Result<Vec<ConnRate>> {
    let lab = &bench.lab;
    let mut out = Vec::new();
    for threads in [1, 4] {
        let (mut direct, mut mesh, mut relays) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            let what = format!(
                "new connections, {threads} thread(s), direct, mesh, two relays (round {round}/{rounds})"
            );
            progress.step(&what, 3.0 * seconds, || -> anyhow::Result<()> {
                direct.push(bench.conns("n1-b", lab.addr("n2-b", ECHO_PORT), threads, seconds)?);
                mesh.push(bench.conns("n1-a", lab.addr("n2-a", ECHO_PORT), threads, seconds)?);
                relays.push(bench.conns(
                    "n1-b",
                    lab.addr("n1-b", RELAY_ECHO_PORT),
                    threads,
                    seconds,
                )?);
                Ok(())
            })?;
        }
        out.push(conn_rate(threads, &direct, &mesh, Some(&relays)));
    }
    Ok(out)
}

/// Medians over rounds of alternating direct, mesh (and relays) connection-rate runs.
fn conn_rate(
    threads: usize,
    direct: &[ConnRateResult],
    mesh: &[ConnRateResult],
    relays: Option<&[ConnRateResult]>,
) -> ConnRate {
    let rate =
        |runs: &[ConnRateResult]| report::median(runs.iter().map(|r| r.per_second()).collect());
    let latency = |runs: &[ConnRateResult]| {
        Latency::median(&runs.iter().map(|r| r.latency).collect::<Vec<_>>())
    };
    ConnRate {
        threads,
        direct_per_s: rate(direct),
        mesh_per_s: rate(mesh),
        direct_latency: latency(direct),
        mesh_latency: latency(mesh),
        relays_per_s: relays.map(rate),
        relays_latency: relays.map(latency),
        failures: direct
            .iter()
            .chain(mesh)
            .chain(relays.unwrap_or_default())
            .map(|r| r.failures)
            .sum(),
    }
}

/// Node 1's data-plane flags for the fresh-handshake scenario: a tunnel per stream, closed
/// when the stream ends.
const FRESH_TUNNEL_ARGS: [&str; 4] = ["--pool-max-streams", "1", "--pool-idle-timeout", "0s"];

/// New-connection rate when every mesh connection needs a fresh mTLS handshake, direct and
/// mesh alternating, one client thread. Node 1's data plane restarts with
/// [`FRESH_TUNNEL_ARGS`] for it and restarts as it was afterwards; its dial counter says how
/// many tunnels the mesh connections took.
fn fresh_handshake_rate(
    bench: &mut Bench,
    progress: &mut Progress,
    rounds: usize,
    seconds: f64,
) -> anyhow::Result<FreshHandshakeRate> {
    let usual = bench.lab.options.dataplane_args.clone();
    bench
        .lab
        .options
        .dataplane_args
        .extend(FRESH_TUNNEL_ARGS.map(String::from));
    let restarted = bench.lab.restart_dataplane(0);
    bench.lab.options.dataplane_args = usual;
    let measured = restarted.and_then(|()| {
        let lab = &bench.lab;
        let dialled_before = lab.total(0, "hbone_connections_dialed")?;
        let (mut direct, mut mesh) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let what =
                format!("new connections, a fresh mTLS handshake each, round {round}/{rounds}");
            progress.step(&what, 2.0 * seconds, || -> anyhow::Result<()> {
                direct.push(bench.conns("n1-b", lab.addr("n2-b", ECHO_PORT), 1, seconds)?);
                mesh.push(bench.conns("n1-a", lab.addr("n2-a", ECHO_PORT), 1, seconds)?);
                Ok(())
            })?;
        }
        let dialled = lab.total(0, "hbone_connections_dialed")? - dialled_before;
        let attempted: u64 = mesh.iter().map(|r| r.connections + r.failures).sum();
        Ok(FreshHandshakeRate {
            rate: conn_rate(1, &direct, &mesh, None),
            handshakes_per_connection: dialled as f64 / attempted.max(1) as f64,
        })
    });
    // Back to pooled tunnels for the scenarios after this one, also when it failed.
    bench.lab.restart_dataplane(0)?;
    measured
}

/// RSS per held connection, as the growth between holding half of `count` and all of it:
/// the first half also refills the freed memory the data plane keeps from earlier scenarios
/// (glibc's retained heap), which a difference against the idle RSS would take for free room.
fn memory(lab: &Lab, count: usize) -> anyhow::Result<Memory> {
    let pids: Vec<u32> = (0..2).filter_map(|n| lab.dataplane_pid(n)).collect();
    let rss = || -> Vec<u64> {
        pids.iter()
            .map(|p| Process::Pid(*p).status_bytes("VmRSS:").unwrap_or(0))
            .collect()
    };
    let idle = rss();
    let program = lab.bins.meshload.clone();
    let to = lab.addr("n2-a", ECHO_PORT).to_string();
    let first_half = count / 2;
    let mut holders = Vec::new();
    let mut samples = Vec::new();
    for held in [first_half, count - first_half] {
        let mut holder = lab.spawn_in(
            "n1-a",
            &program,
            &["hold", "--to", &to, "--count", &held.to_string()],
        )?;
        let line = first_line(&mut holder)?;
        holders.push(holder);
        if !line.contains("held") {
            bail!("hold failed: {line}");
        }
        // Let allocator and kernel settle before reading RSS.
        std::thread::sleep(Duration::from_millis(500));
        samples.push(rss());
    }
    for mut holder in holders {
        drop(holder.stdin.take());
        holder.wait()?;
    }
    let (half, loaded) = (&samples[0], &samples[1]);
    let second_half = (count - first_half).max(1);
    Ok(Memory {
        held_connections: count,
        nodes: (0..pids.len())
            .map(|i| NodeMemory {
                node: lab::NODE_NAMES[i].into(),
                idle_rss_bytes: idle[i],
                half_loaded_rss_bytes: half[i],
                loaded_rss_bytes: loaded[i],
                bytes_per_connection: loaded[i].saturating_sub(half[i]) as f64 / second_half as f64,
            })
            .collect(),
    })
}

/// Scaling with workers: both data planes restarted with 1..=cores workers; at each count,
/// `cores` bulk streams and new connections from 4 threads, direct beside mesh.
fn worker_sweep(
    bench: &mut Bench,
    progress: &mut Progress,
    args: &RunArgs,
) -> anyhow::Result<Vec<SweepPoint>> {
    let streams = cores();
    let conn_seconds = args.conn_seconds_always();
    let mut points = Vec::new();
    for workers in 1..=cores() {
        let what = format!("worker sweep: {workers} worker(s) per node");
        let point = progress.step(
            &what,
            sweep_seconds(args),
            || -> anyhow::Result<SweepPoint> {
                bench.lab.options.workers = workers;
                for node in 0..2 {
                    bench.lab.restart_dataplane(node)?;
                }
                let lab = &bench.lab;
                // The first mesh connection after a restart opens the pooled tunnel.
                bench.conns("n1-a", lab.addr("n2-a", ECHO_PORT), 1, 0.3)?;
                let direct =
                    bench.bulk("n1-b", lab.addr("n2-b", SINK_PORT), streams, args.seconds)?;
                let mesh =
                    bench.bulk("n1-a", lab.addr("n2-a", SINK_PORT), streams, args.seconds)?;
                let direct_conns =
                    bench.conns("n1-b", lab.addr("n2-b", ECHO_PORT), 4, conn_seconds)?;
                let mesh_conns =
                    bench.conns("n1-a", lab.addr("n2-a", ECHO_PORT), 4, conn_seconds)?;
                Ok(SweepPoint {
                    workers,
                    streams,
                    direct_gbit_per_s: direct.gbit_per_s,
                    mesh_gbit_per_s: mesh.gbit_per_s,
                    mesh_dataplane_cores: mesh.dataplane_cores,
                    conn_threads: 4,
                    direct_conns_per_s: direct_conns.per_second(),
                    mesh_conns_per_s: mesh_conns.per_second(),
                    conn_failures: direct_conns.failures + mesh_conns.failures,
                })
            },
        )?;
        points.push(point);
    }
    Ok(points)
}

fn sweep_seconds(args: &RunArgs) -> f64 {
    4.0 + 2.0 * args.seconds + 2.0 * args.conn_seconds_always()
}

/// The ports of the plain TCP relays: connections to them in n1-b go through n1-b's relay
/// and n2-b's relay to n2-b's echo and sink.
const RELAY_ECHO_PORT: u16 = 7010;
const RELAY_SINK_PORT: u16 = 7011;

/// Starts the two relays, far end first; returns their process ids (node 1's, node 2's).
fn start_relays(lab: &mut Lab) -> anyhow::Result<[u32; 2]> {
    let route = |port: u16, to: SocketAddr| format!("{port}={to}");
    let far = [
        route(RELAY_ECHO_PORT, lab.addr("n2-b", ECHO_PORT)),
        route(RELAY_SINK_PORT, lab.addr("n2-b", SINK_PORT)),
    ];
    let near = [
        route(RELAY_ECHO_PORT, lab.addr("n2-b", RELAY_ECHO_PORT)),
        route(RELAY_SINK_PORT, lab.addr("n2-b", RELAY_SINK_PORT)),
    ];
    let program = lab.bins.meshload.clone();
    let mut pids = [0; 2];
    for (node, pod, routes) in [(1, "n2-b", far), (0, "n1-b", near)] {
        let mut relay = lab.spawn_in(
            pod,
            &program,
            &["relay", "--route", &routes[0], "--route", &routes[1]],
        )?;
        let line = first_line(&mut relay)?;
        if !line.contains("relaying") {
            bail!("relay in {pod} failed: {line}");
        }
        pids[node] = relay.id();
        lab.keep(relay);
    }
    Ok(pids)
}

/// Brings the lab up with the server apps and the relays running.
fn start_lab(args: &RunArgs) -> anyhow::Result<(Bench, usize)> {
    let bins = bins::locate()?;
    lab::install_interrupt_cleanup()?;
    let mut options = LabOptions {
        driver: args.driver.clone(),
        pin: args.pin,
        dataplane_args: args.dataplane_args.clone(),
        ..LabOptions::default()
    };
    if let Some(w) = args.workers {
        options.workers = w;
    }
    let workers = options.workers;
    let mut lab = Lab::up(bins, options)?;
    let program = lab.bins.meshload.clone();
    let mut servers = Vec::new();
    for pod in ["n2-a", "n2-b"] {
        let mut server = lab.spawn_in(pod, &program, &["serve"])?;
        first_line(&mut server)?;
        servers.push((pod, server.id()));
        lab.keep(server);
    }
    let relays = start_relays(&mut lab)?;
    let (cert, key) = perf::tls_baseline::write_cert(&lab.dir)?;
    let mut tls = lab.spawn_in(
        "n2-b",
        &program,
        &[
            "tls-serve",
            "--cert",
            &cert.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
        ],
    )?;
    first_line(&mut tls)?;
    let tls_server = tls.id();
    lab.keep(tls);
    let driver = lab.stats(0)?["driver"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    Ok((
        Bench {
            lab,
            servers,
            tls_server,
            tls_ca: cert,
            relays,
            driver,
        },
        workers,
    ))
}

/// One side of an A/B comparison: the mesh and passthrough paths' figures in one round.
fn mesh_figures(bench: &Bench, args: &RunArgs, hold: usize) -> anyhow::Result<AbFigures> {
    let lab = &bench.lab;
    let throughput = bench.bulk("n1-a", lab.addr("n2-a", SINK_PORT), 1, args.seconds)?;
    let passthrough = bench.bulk("n1-a", lab.addr("n2-b", SINK_PORT), 1, args.seconds)?;
    let mesh_rate = |load| bench.rate("n1-a", lab.addr("n2-a", ECHO_PORT), load, args.rr_seconds);
    let (rate, rate_cpu, _) = mesh_rate(&LATENCY_LOAD)?;
    let (loaded, _, _) = mesh_rate(&LOADED_LOAD)?;
    let (beside_bulk, _, bulk_beside) = mesh_rate(&BESIDE_BULK_LOAD)?;
    let conns = bench.conns(
        "n1-a",
        lab.addr("n2-a", ECHO_PORT),
        1,
        args.conn_seconds_always(),
    )?;
    let memory = if hold > 0 {
        let m = memory(lab, hold)?;
        let mean = |f: &dyn Fn(&NodeMemory) -> f64| {
            m.nodes.iter().map(f).sum::<f64>() / m.nodes.len().max(1) as f64
        };
        Some((
            mean(&|n| n.bytes_per_connection / 1024.0),
            mean(&|n| n.idle_rss_bytes as f64 / 1e6),
        ))
    } else {
        None
    };
    Ok(AbFigures {
        throughput,
        passthrough,
        latency: rate.latency,
        sleeps_per_request: rate_cpu
            .per_1000_requests_of(&rate)
            .dataplane_sleeps
            .iter()
            .sum::<f64>()
            / 1000.0,
        latency_loaded: loaded.latency,
        latency_beside_bulk: beside_bulk.latency,
        bulk_beside_gbit_per_s: bulk_beside.context("no bulk stream ran beside the requests")?,
        connections_per_s: conns.per_second(),
        rate_errors: rate.errors + loaded.errors + beside_bulk.errors,
        connection_failures: conns.failures,
        memory,
    })
}

struct AbFigures {
    throughput: Throughput,
    passthrough: Throughput,
    latency: Latency,
    sleeps_per_request: f64,
    latency_loaded: Latency,
    latency_beside_bulk: Latency,
    bulk_beside_gbit_per_s: f64,
    connections_per_s: f64,
    /// Requests unanswered over the fixed-rate loads.
    rate_errors: u64,
    connection_failures: u64,
    /// (KiB per held connection, idle RSS in MB), means of the two nodes.
    memory: Option<(f64, f64)>,
}

fn ab_side(runs: &[AbFigures]) -> AbSide {
    let memory: Vec<(f64, f64)> = runs.iter().filter_map(|r| r.memory).collect();
    let some_median = |f: fn(&(f64, f64)) -> f64| {
        (!memory.is_empty()).then(|| report::median(memory.iter().map(f).collect()))
    };
    let latency =
        |f: fn(&AbFigures) -> Latency| Latency::median(&runs.iter().map(f).collect::<Vec<_>>());
    AbSide {
        throughput: Throughput::median(
            &runs
                .iter()
                .map(|r| r.throughput.clone())
                .collect::<Vec<_>>(),
        ),
        passthrough_throughput: Throughput::median(
            &runs
                .iter()
                .map(|r| r.passthrough.clone())
                .collect::<Vec<_>>(),
        ),
        latency: latency(|r| r.latency),
        sleeps_per_request: report::median(runs.iter().map(|r| r.sleeps_per_request).collect()),
        latency_loaded: latency(|r| r.latency_loaded),
        latency_beside_bulk: latency(|r| r.latency_beside_bulk),
        bulk_beside_gbit_per_s: report::median(
            runs.iter().map(|r| r.bulk_beside_gbit_per_s).collect(),
        ),
        connections_per_s: report::median(runs.iter().map(|r| r.connections_per_s).collect()),
        rate_errors: runs.iter().map(|r| r.rate_errors).sum(),
        connection_failures: runs.iter().map(|r| r.connection_failures).sum(),
        kib_per_held_connection: some_median(|m| m.0),
        idle_rss_mb: some_median(|m| m.1),
    }
}

/// The sides in the order a round measures them: the baseline first in odd rounds, the
/// variant first in even ones (A B, B A, A B, ...). Neither side always runs second, and a
/// drift over the run weighs on both alike.
fn round_order(round: usize) -> [usize; 2] {
    if round % 2 == 1 {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// Measures two variants of the mesh within one run. Every round switches to each side in
/// [`round_order`] and measures it; the lab ends switched back to the baseline (side 0).
/// `describe` names the experiment once the rounds are done; `kind` starts the saved files'
/// names (`tuning`, `ab`).
fn ab(
    kind: &str,
    args: &RunArgs,
    labels: [String; 2],
    hold: usize,
    mut switch: impl FnMut(&mut Bench, usize) -> anyhow::Result<()>,
    describe: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if !sys::is_root() {
        bail!("meshlab creates network namespaces and nftables rules: run it as root");
    }
    let run = Provenance::now();
    let rounds = args.rounds.max(1);
    let side_seconds = 5.0
        + 2.0 * args.seconds
        + 3.0 * args.rr_seconds
        + args.conn_seconds_always()
        + hold as f64 / 800.0;
    let mut progress = Progress::new(rounds as f64 * 2.0 * side_seconds);
    let (mut bench, workers) = progress.step(
        "building and starting the lab (2 nodes, 4 pods, 2 agents, 2 data planes)",
        // Not counted: it takes seconds, or minutes when cargo builds first.
        0.0,
        || start_lab(args),
    )?;
    let mut sides: [Vec<AbFigures>; 2] = [Vec::new(), Vec::new()];
    let ticks_before = sys::cpu_ticks();
    for round in 1..=rounds {
        for side in round_order(round) {
            let label = &labels[side];
            let what = format!("round {round}/{rounds}: {label}");
            let figures = progress.step(&what, side_seconds, || {
                switch(&mut bench, side)?;
                mesh_figures(&bench, args, hold)
            })?;
            sides[side].push(figures);
        }
    }
    switch(&mut bench, 0)?;
    let steal_percent = sys::steal_percent(ticks_before, sys::cpu_ticks());
    progress.finish();
    let driver = bench.driver.clone();
    teardown(bench.lab);
    let [baseline_label, variant_label] = labels;
    let result = AbReport {
        run,
        driver,
        workers_per_node: workers,
        experiment: describe(),
        baseline_label,
        variant_label,
        rounds,
        steal_percent,
        baseline: ab_side(&sides[0]),
        variant: ab_side(&sides[1]),
    };
    let stem = result.run.file_stem(kind);
    publish(args, &stem, &result.table(), |dir, stem| {
        result.save(dir, stem)
    })
}

/// A kernel-tuning profile against none: applied to the lab (its namespaces and the node) for
/// the variant, every changed value reverted (and checked) for the baseline.
fn tuning(args: RunArgs, profile: &str) -> anyhow::Result<()> {
    if kernel_tuning::profile::find(profile).is_none() {
        bail!("no tuning profile {profile:?} (meshtune profile lists them)");
    }
    let changed = std::cell::RefCell::new(perf::lab::TuningChanges::default());
    let mut applied = false;
    ab(
        "tuning",
        &args,
        [
            "untuned".into(),
            format!("profile {profile} in every lab namespace and on the node"),
        ],
        0,
        |bench, side| {
            if side == 1 && !applied {
                *changed.borrow_mut() = bench.lab.apply_tuning(profile)?;
                applied = true;
            } else if side == 0 && applied {
                let restored = bench.lab.revert_tuning()?;
                if restored != *changed.borrow() {
                    bail!(
                        "reverted {restored}, but the profile changed {}",
                        changed.borrow()
                    );
                }
                applied = false;
            }
            Ok(())
        },
        || format!("kernel-tuning profile {profile} ({})", changed.borrow()),
    )
}

/// Another data-plane build and/or other flags against this build: both nodes' data planes
/// are restarted with each side's binary and flags before it is measured.
fn dataplane_ab(
    args: RunArgs,
    baseline_dataplane: Option<PathBuf>,
    variant_dataplane: Option<PathBuf>,
    variant_args: Vec<String>,
) -> anyhow::Result<()> {
    let built = bins::locate()?.dataplane;
    let baseline = baseline_dataplane.unwrap_or_else(|| built.clone());
    let variant = variant_dataplane.unwrap_or(built);
    for bin in [&baseline, &variant] {
        if !bin.is_file() {
            bail!("no data-plane binary at {}", bin.display());
        }
    }
    let base_args = args.dataplane_args.clone();
    let mut variant_full = base_args.clone();
    variant_full.extend(variant_args.iter().cloned());
    // What ran: the lab's own `--driver` too (the flag it passes), unless it is the default.
    let label = |bin: &PathBuf, extra: &[String]| {
        let lab_driver = lab::driver_flag(&args.driver, extra).filter(|[_, d]| *d != "auto");
        let flags: Vec<&str> = lab_driver
            .into_iter()
            .flatten()
            .chain(extra.iter().map(String::as_str))
            .collect();
        format!("{} {}", bin.display(), flags.join(" "))
            .trim()
            .to_owned()
    };
    let labels = [label(&baseline, &base_args), label(&variant, &variant_full)];
    let experiment = format!("data plane: {} vs {}", labels[0], labels[1]);
    ab(
        "ab",
        &args,
        labels,
        args.hold,
        // Both data planes restart before every measurement, also when a round measures the
        // side the last one did: each side starts from the same state.
        |bench, side| {
            let (bin, flags) = if side == 0 {
                (&baseline, &base_args)
            } else {
                (&variant, &variant_full)
            };
            bench.lab.bins.dataplane = bin.clone();
            bench.lab.options.dataplane_args = flags.clone();
            for node in 0..2 {
                bench.lab.restart_dataplane(node)?;
            }
            // The first mesh connection after a restart opens the pooled tunnel.
            bench.conns("n1-a", bench.lab.addr("n2-a", ECHO_PORT), 1, 0.3)?;
            Ok(())
        },
        || experiment,
    )
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if !sys::is_root() {
        bail!("meshlab creates network namespaces and nftables rules: run it as root");
    }
    let run = Provenance::now();
    let rounds = args.rounds.max(1);
    let r = rounds as f64;
    let conn_seconds = args.conn_seconds;
    let bulk_seconds = 5.0 * (args.seconds + 0.3);
    let rate_seconds = 2.0 * (args.rr_seconds + 0.9);
    let total = r * bulk_seconds
        + r * (RATE_LOADS.len() as f64 + 0.5) * rate_seconds
        + if conn_seconds > 0.0 {
            // Pooled with 1 and 4 threads (direct, mesh, relays), then fresh handshakes with 1.
            r * (2.0 * 3.0 + 2.0) * conn_seconds
        } else {
            0.0
        }
        + args.hold as f64 / 800.0
        + if args.sweep {
            cores() as f64 * sweep_seconds(&args)
        } else {
            0.0
        };
    let mut progress = Progress::new(total);
    let (mut bench, workers) = progress.step(
        "building and starting the lab (2 nodes, 4 pods, 2 agents, 2 data planes)",
        // Not counted: it takes seconds, or minutes when cargo builds first.
        0.0,
        || start_lab(&args),
    )?;
    if let Some(profile) = &args.tuning {
        let changed = bench.lab.apply_tuning(profile)?;
        eprintln!("tuning profile {profile}: changed {changed}");
    }

    let ticks_before = sys::cpu_ticks();
    let (mut direct_runs, mut tls_runs, mut mesh_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut passthrough_runs, mut relay_runs) = (Vec::new(), Vec::new());
    let mut cipher_suite = String::new();
    for round in 1..=rounds {
        let what = format!(
            "one bulk stream, {0}s each direct, plain TLS, mesh, passthrough, two relays (round {round}/{rounds})",
            args.seconds
        );
        progress.step(&what, bulk_seconds, || -> anyhow::Result<()> {
            let lab = &bench.lab;
            direct_runs.push(bench.bulk("n1-b", lab.addr("n2-b", SINK_PORT), 1, args.seconds)?);
            let (tls, suite) = bench.tls_bulk(args.seconds)?;
            tls_runs.push(tls);
            cipher_suite = suite;
            mesh_runs.push(bench.bulk("n1-a", lab.addr("n2-a", SINK_PORT), 1, args.seconds)?);
            // From a mesh pod to a pod outside the mesh: node 1 relays plain TCP.
            passthrough_runs.push(bench.bulk(
                "n1-a",
                lab.addr("n2-b", SINK_PORT),
                1,
                args.seconds,
            )?);
            relay_runs.push(bench.bulk(
                "n1-b",
                lab.addr("n1-b", RELAY_SINK_PORT),
                1,
                args.seconds,
            )?);
            Ok(())
        })?;
    }
    let direct_throughput = Throughput::median(&direct_runs);
    let relays_throughput = Throughput::median(&relay_runs);
    let tls_throughput = Throughput::median(&tls_runs);
    let mesh_throughput = Throughput::median(&mesh_runs);
    let passthrough_throughput = Throughput::median(&passthrough_runs);

    let mut fixed_rates = Vec::new();
    let (mut first_direct, mut first_mesh) = (Vec::new(), Vec::new());
    for (i, load) in RATE_LOADS.iter().enumerate() {
        let (mut direct, mut mesh, mut relays) = (Vec::new(), Vec::new(), Vec::new());
        // The headline load also runs through the two relays.
        let with_relays = i == 0;
        for round in 1..=rounds {
            let what = format!(
                "{RR_SIZE} B request/response at {:.0}/s over {} connection(s){}, open loop (round {round}/{rounds})",
                load.rps, load.connections, report::beside_bulk_text(load.beside_bulk)
            );
            let seconds = rate_seconds * if with_relays { 1.5 } else { 1.0 };
            progress.step(&what, seconds, || -> anyhow::Result<()> {
                let lab = &bench.lab;
                direct.push(bench.rate(
                    "n1-b",
                    lab.addr("n2-b", ECHO_PORT),
                    load,
                    args.rr_seconds,
                )?);
                mesh.push(bench.rate(
                    "n1-a",
                    lab.addr("n2-a", ECHO_PORT),
                    load,
                    args.rr_seconds,
                )?);
                if with_relays {
                    relays.push(bench.rate(
                        "n1-b",
                        lab.addr("n1-b", RELAY_ECHO_PORT),
                        load,
                        args.rr_seconds,
                    )?);
                }
                Ok(())
            })?;
        }
        let side = |runs: &[(RateResult, ProcessCpu, Option<f64>)]| {
            let results: Vec<RateResult> = runs.iter().map(|r| r.0).collect();
            let cpu: Vec<ProcessCpu> = runs.iter().map(|r| r.1).collect();
            RateRun::of(&results, &cpu)
        };
        let bulk_beside = |runs: &[(RateResult, ProcessCpu, Option<f64>)]| {
            let rates: Option<Vec<f64>> = runs.iter().map(|r| r.2).collect();
            rates.map(report::median)
        };
        if i == 0 {
            first_direct = direct.iter().map(|r| r.0.latency).collect();
            first_mesh = mesh.iter().map(|r| r.0.latency).collect();
        }
        fixed_rates.push(FixedRate {
            offered_rps: load.rps,
            connections: load.connections,
            beside_bulk: load.beside_bulk,
            bulk_gbit_per_s: bulk_beside(&direct).zip(bulk_beside(&mesh)),
            direct: side(&direct),
            mesh: side(&mesh),
            relays: with_relays.then(|| side(&relays)),
        });
    }
    let direct_latency = fixed_rates[0].direct.latency;
    let mesh_latency = fixed_rates[0].mesh.latency;

    let connection_rates = if conn_seconds > 0.0 {
        connection_rates(&bench, &mut progress, rounds, conn_seconds)?
    } else {
        Vec::new()
    };
    let memory = if args.hold > 0 {
        let what = format!("holding {} idle connections through the mesh", args.hold);
        Some(progress.step(&what, args.hold as f64 / 800.0, || {
            memory(&bench.lab, args.hold)
        })?)
    } else {
        None
    };
    // After the memory figures, which count the heap node 1 kept from the scenarios before:
    // this one restarts node 1's data plane.
    let fresh_handshake_rate = if conn_seconds > 0.0 {
        Some(fresh_handshake_rate(
            &mut bench,
            &mut progress,
            rounds,
            conn_seconds,
        )?)
    } else {
        None
    };
    // Last: it restarts the data planes.
    let worker_sweep = if args.sweep {
        worker_sweep(&mut bench, &mut progress, &args)?
    } else {
        Vec::new()
    };
    let steal_percent = sys::steal_percent(ticks_before, sys::cpu_ticks());
    progress.finish();
    let driver = bench.driver.clone();
    teardown(bench.lab);

    let report = Report {
        run,
        driver,
        rounds,
        steal_percent,
        rounds_detail: perf::report::Rounds {
            direct_throughput: direct_runs,
            mesh_throughput: mesh_runs,
            tls_throughput: tls_runs,
            direct_latency: first_direct,
            mesh_latency: first_mesh,
        },
        workers_per_node: workers,
        pinned: args.pin,
        topology: "2 namespace nodes over veth, pods attached by CNI (bridge + host-local + mesh-cni), apps and data planes sharing all cores".into(),
        ratios: Ratios::of(
            &direct_throughput,
            &mesh_throughput,
            Some(&tls_throughput),
            &direct_latency,
            &mesh_latency,
        ),
        direct_throughput,
        mesh_throughput,
        tls_throughput: Some(tls_throughput),
        passthrough_throughput: Some(passthrough_throughput),
        relays_throughput: Some(relays_throughput),
        tls_cipher_suite: Some(cipher_suite),
        rr_size_bytes: RR_SIZE,
        latency_method: format!(
            "round trip: open loop at {:.0} requests/s on {} connection, latency from each request's intended send time",
            LATENCY_LOAD.rps, LATENCY_LOAD.connections
        ),
        direct_latency,
        mesh_latency,
        fixed_rates,
        connection_rates,
        fresh_handshake_rate,
        worker_sweep,
        memory,
        tuning: args.tuning.clone(),
    };
    let stem = report.run.file_stem("lab");
    publish(&args, &stem, &report.table(), |dir, stem| {
        report.save(dir, stem)
    })
}

/// Stops the lab and removes its logs and scratch files.
fn teardown(lab: Lab) {
    let log_dir = lab.dir.clone();
    lab.down();
    let _ = std::fs::remove_dir_all(&log_dir);
}

/// Prints a result's table and, unless `--no-save`, writes `<kind>-<time>.json` and `.svg`.
fn publish(
    args: &RunArgs,
    stem: &str,
    table: &str,
    save: impl FnOnce(&std::path::Path, &str) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<()> {
    println!("{table}");
    if !args.no_save {
        let path = save(&args.out, stem)?;
        println!("saved {} (and .svg)", path.display());
    }
    std::io::stdout().flush()?;
    Ok(())
}

fn clean() -> anyhow::Result<()> {
    let list = sys::run("ip", &["netns", "list"])?;
    let mut removed = 0;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        // Leave the namespaces of live labs alone.
        if !lab::of_a_gone_lab(name) {
            continue;
        }
        if let Ok(pids) = sys::run("ip", &["netns", "pids", name]) {
            for p in pids.split_whitespace() {
                let _ = sys::run("kill", &["-KILL", p]);
            }
        }
        sys::run("ip", &["netns", "del", name])?;
        removed += 1;
    }
    println!("removed {removed} leftover lab namespaces");
    let restored = lab::restore_leftover_node_tuning()?;
    println!("restored the node-wide tuning of {restored} lab(s)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ab_run_takes_its_sides_in_turn_and_each_goes_first_every_other_round() {
        let orders: Vec<[usize; 2]> = (1..=4).map(round_order).collect();
        assert_eq!(orders, [[0, 1], [1, 0], [0, 1], [1, 0]]);
    }
}
