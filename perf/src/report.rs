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
    /// Median of each figure over rounds.
    pub fn median(runs: &[Throughput]) -> Throughput {
        Throughput {
            gbit_per_s: median(runs.iter().map(|r| r.gbit_per_s).collect()),
            bytes: median(runs.iter().map(|r| r.bytes as f64).collect()) as u64,
            seconds: median(runs.iter().map(|r| r.seconds).collect()),
            dataplane_cores: median(runs.iter().map(|r| r.dataplane_cores).collect()),
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
    pub direct_latency: Vec<Latency>,
    pub mesh_latency: Vec<Latency>,
}

/// New connections per second, direct beside mesh, for one client thread count (medians
/// over rounds). Through the mesh every connection is a new stream on a pooled tunnel.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRate {
    pub threads: usize,
    pub direct_per_s: f64,
    pub mesh_per_s: f64,
    pub direct_latency: Latency,
    pub mesh_latency: Latency,
    /// Connections that failed, over all rounds (should be 0).
    pub failures: u64,
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
    pub idle_rss_bytes: u64,
    pub loaded_rss_bytes: u64,
    pub bytes_per_connection: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub commit: String,
    pub started: String,
    pub machine: Machine,
    pub driver: String,
    pub workers_per_node: usize,
    pub pinned: bool,
    /// Direct and mesh runs alternated this many times; figures are medians over rounds.
    pub rounds: usize,
    /// CPU time the hypervisor took from this VM during the measurements (noise indicator).
    pub steal_percent: Option<f64>,
    pub topology: String,
    /// Kernel-tuning profile applied in every lab namespace, if any.
    pub tuning: Option<String>,
    pub direct_throughput: Throughput,
    pub mesh_throughput: Throughput,
    pub rr_size_bytes: usize,
    pub direct_latency: Latency,
    pub mesh_latency: Latency,
    pub connection_rates: Vec<ConnRate>,
    pub memory: Option<Memory>,
    pub ratios: Ratios,
    pub rounds_detail: Rounds,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    pub throughput_mesh_over_direct: f64,
    pub dataplane_cores_per_gbit: f64,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
}

impl Ratios {
    pub fn of(
        direct: &Throughput,
        mesh: &Throughput,
        direct_lat: &Latency,
        mesh_lat: &Latency,
    ) -> Ratios {
        Ratios {
            throughput_mesh_over_direct: mesh.gbit_per_s / direct.gbit_per_s,
            dataplane_cores_per_gbit: mesh.dataplane_cores / mesh.gbit_per_s,
            added_p50_us: mesh_lat.p50_us - direct_lat.p50_us,
            added_p99_us: mesh_lat.p99_us - direct_lat.p99_us,
        }
    }
}

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
            self.machine.cpu_model,
            self.machine.cores,
            self.machine.kernel,
            self.commit
        );
        if let Some(profile) = &self.tuning {
            let _ = writeln!(t, "tuning: profile {profile} in every lab namespace");
        }
        steal_line(&mut t, self.steal_percent);
        let row =
            |t: &mut String, name: &str, d: String, m: String, ratio: String, target: String| {
                let _ = writeln!(t, "{name:<34}{d:>11}{m:>11}{ratio:>17}   {target}");
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
        for c in &self.connection_rates {
            let ratio = c.mesh_per_s / c.direct_per_s;
            row(
                &mut t,
                &format!("new connections/s, {} thread(s)", c.threads),
                format!("{:.0}", c.direct_per_s),
                format!("{:.0}", c.mesh_per_s),
                format!("x{ratio:.2}"),
                format!(
                    ">= x{}: {}{}",
                    target::CONN_RATE_OF_DIRECT,
                    verdict(ratio >= target::CONN_RATE_OF_DIRECT),
                    if c.failures > 0 {
                        format!(" ({} FAILED)", c.failures)
                    } else {
                        String::new()
                    }
                ),
            );
            row(
                &mut t,
                &format!("  connect to reply p50, us ({})", c.threads),
                format!("{:.1}", c.direct_latency.p50_us),
                format!("{:.1}", c.mesh_latency.p50_us),
                format!("{:+.1} us", c.mesh_latency.p50_us - c.direct_latency.p50_us),
                String::new(),
            );
        }
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
        t
    }

    /// Writes `<stem>.json` and `<stem>.svg` into `dir`; returns the JSON path.
    pub fn save(&self, dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join(format!("{stem}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::write(dir.join(format!("{stem}.svg")), self.svg())?;
        Ok(json)
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
            self.commit,
            self.started,
            self.rounds,
            self.workers_per_node,
            self.driver,
            self.machine.cpu_model,
            self.machine.cores,
            self.machine.kernel
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

/// A horizontal bar chart on a log scale (values spanning orders of magnitude), as SVG.
/// A result file's name stem: `kind` and the UTC second the run started, so files sort by time.
pub fn file_stem(kind: &str, started: time::OffsetDateTime) -> String {
    format!(
        "{kind}-{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        started.year(),
        started.month() as u8,
        started.day(),
        started.hour(),
        started.minute(),
        started.second()
    )
}

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

/// Two lab results side by side: every figure of the first, of the second, and second /
/// first. Works on the JSON (older files lack newer figures; those rows say so). The in-run
/// ratios (mesh vs direct) are the rows to trust across runs: absolute figures drift with the
/// machine.
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
        "{:<44}{:>14}{:>14}{:>14}",
        "(* = ratio within one run)", "first", "second", "second/first"
    );
    let mut row = |name: &str, path: &[&str], in_run: bool| {
        let (x, y) = (get(a, path), get(b, path));
        let cell = |v: Option<f64>| match v {
            None => "-".into(),
            Some(v) if v.abs() >= 1e4 => format!("{v:.0}"),
            Some(v) => format!("{v:.3}"),
        };
        let ratio = match (x, y) {
            (Some(x), Some(y)) if x != 0.0 => format!("x{:.3}", y / x),
            _ => "-".into(),
        };
        let mark = if in_run { "*" } else { " " };
        let _ = writeln!(
            t,
            "{mark}{name:<43}{:>14}{:>14}{:>14}",
            cell(x),
            cell(y),
            ratio
        );
    };
    row(
        "one stream direct, Gbit/s",
        &["direct_throughput", "gbit_per_s"],
        false,
    );
    row(
        "one stream mesh, Gbit/s",
        &["mesh_throughput", "gbit_per_s"],
        false,
    );
    row(
        "one stream mesh / direct",
        &["ratios", "throughput_mesh_over_direct"],
        true,
    );
    row(
        "data-plane cores per Gbit/s",
        &["ratios", "dataplane_cores_per_gbit"],
        false,
    );
    row(
        "1 KiB round trip p50 direct, us",
        &["direct_latency", "p50_us"],
        false,
    );
    row(
        "1 KiB round trip p50 mesh, us",
        &["mesh_latency", "p50_us"],
        false,
    );
    row(
        "1 KiB round trip p50 added by mesh, us",
        &["ratios", "added_p50_us"],
        true,
    );
    row(
        "1 KiB round trip p99 added by mesh, us",
        &["ratios", "added_p99_us"],
        true,
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
            false,
        );
        row(
            &format!("new connections/s mesh, {threads} thread(s)"),
            &["connection_rates", &n, "mesh_per_s"],
            false,
        );
    }
    for i in 0..2 {
        let n = i.to_string();
        let node = a["memory"]["nodes"][i]["node"].as_str().unwrap_or("node");
        row(
            &format!("{node}: bytes per held connection"),
            &["memory", "nodes", &n, "bytes_per_connection"],
            false,
        );
        row(
            &format!("{node}: idle RSS, bytes"),
            &["memory", "nodes", &n, "idle_rss_bytes"],
            false,
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
        assert!(line("*1 KiB round trip p50 added").ends_with("x0.500"));
        // Only the second run measured connection rates.
        let conns = line(" new connections/s mesh, 1 thread");
        assert!(
            conns.contains(" - ") && conns.trim_end().ends_with('-'),
            "{conns}"
        );
        assert!(!text.contains("different machines"));
    }
}

/// The mesh path's figures on one side of a tuning comparison (medians over rounds).
#[derive(Clone, Debug, Serialize)]
pub struct TuningSide {
    pub throughput: Throughput,
    pub latency: Latency,
    /// New connections per second, one client thread.
    pub connections_per_s: f64,
}

/// A kernel-tuning profile measured within one run: untuned and tuned rounds alternate.
#[derive(Clone, Debug, Serialize)]
pub struct TuningReport {
    pub command: String,
    pub commit: String,
    pub started: String,
    pub machine: Machine,
    pub driver: String,
    pub workers_per_node: usize,
    pub profile: String,
    /// Values the profile changed in the lab's namespaces (each round).
    pub values_changed: usize,
    pub rounds: usize,
    pub steal_percent: Option<f64>,
    pub untuned: TuningSide,
    pub tuned: TuningSide,
}

impl TuningReport {
    /// (figure, untuned, tuned) for the table and the plot.
    fn figures(&self) -> [(&'static str, f64, f64); 5] {
        let (u, t) = (&self.untuned, &self.tuned);
        [
            (
                "one stream, Gbit/s",
                u.throughput.gbit_per_s,
                t.throughput.gbit_per_s,
            ),
            (
                "data planes, cores per Gbit/s",
                u.throughput.dataplane_cores / u.throughput.gbit_per_s,
                t.throughput.dataplane_cores / t.throughput.gbit_per_s,
            ),
            (
                "1 KiB round trip p50, us",
                u.latency.p50_us,
                t.latency.p50_us,
            ),
            (
                "1 KiB round trip p99, us",
                u.latency.p99_us,
                t.latency.p99_us,
            ),
            (
                "new connections/s, 1 thread",
                u.connections_per_s,
                t.connections_per_s,
            ),
        ]
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nmeshlab tuning: profile {} ({} values changed in the lab's namespaces) | mesh path only | medians of {} rounds, untuned and tuned alternating | {} workers/node, {} | {} ({} cores), kernel {} | commit {}",
            self.profile,
            self.values_changed,
            self.rounds,
            self.workers_per_node,
            self.driver,
            self.machine.cpu_model,
            self.machine.cores,
            self.machine.kernel,
            self.commit
        );
        steal_line(&mut t, self.steal_percent);
        let _ = writeln!(
            t,
            "{:<34}{:>12}{:>12}{:>16}",
            "", "untuned", "tuned", "tuned/untuned"
        );
        for (name, u, v) in self.figures() {
            let _ = writeln!(
                t,
                "{name:<34}{u:>12.3}{v:>12.3}{:>16}",
                format!("x{:.3}", v / u)
            );
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
            bars.push((format!("{name}, untuned"), u));
            bars.push((format!("{name}, tuned"), v));
        }
        let svg = log_bar_chart(
            &format!(
                "Tuning profile {}: mesh path, untuned vs tuned",
                self.profile
            ),
            &format!(
                "{} | medians of {} alternating rounds | commit {}",
                self.machine.cpu_model, self.rounds, self.commit
            ),
            "",
            &bars,
        );
        std::fs::write(dir.join(format!("{stem}.svg")), svg)?;
        Ok(json)
    }
}
