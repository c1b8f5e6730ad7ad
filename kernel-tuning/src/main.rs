//! `meshtune`: node tuning for the data plane. Every command that changes the node shows what
//! it would do unless given `--yes`; `revert` puts back exactly what `apply` changed.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kernel_tuning::doctor::{self, Verdict};
use kernel_tuning::planner::{self, format_list, Topology};
use kernel_tuning::profile::{self, Status};
use kernel_tuning::state::{self, Write};
use kernel_tuning::sysfs::{in_host_netns, is_node_wide_file, setting_file, Netns, Reach, Root};

/// Why a node-wide setting is skipped, in `apply`'s and `plan`'s output.
const HELD_NODE_WIDE: &str =
    "node-wide, and this is not the host's network namespace: --node-wide sets it for the whole node";
/// Why a queue of a device seen through another namespace's /sys is skipped, in `plan`'s output.
const HELD_OTHER_NAMESPACE: &str =
    "another network namespace's device (this /sys is not this namespace's): --node-wide sets it there";

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Where /proc and /sys are found (tests point this at a scratch tree).
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    /// Output JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lists the profiles, or shows one: every setting with its reason.
    Profile { name: Option<String> },
    /// What the node has against what the data plane (and a profile) wants.
    Doctor {
        #[arg(long, default_value = "throughput")]
        profile: String,
    },
    /// Sets a profile's sysctls (dry run without --yes); saves what was there for revert.
    Apply {
        #[arg(long)]
        profile: String,
        #[arg(long)]
        yes: bool,
        #[arg(long, default_value = "/var/lib/mesh/tuning-state.json")]
        state: PathBuf,
        /// Also set node-wide settings (sysctls outside net.*, module parameters) from a
        /// network namespace other than the host's, where they are skipped by default: they
        /// change the whole node, not the namespace.
        #[arg(long)]
        node_wide: bool,
    },
    /// Proposes which cores run workers and which take interrupts; applies the interrupt and
    /// steering routing with --apply --yes.
    Plan {
        /// At most this many workers.
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Put workers on both SMT siblings of a core.
        #[arg(long)]
        use_smt: bool,
        #[arg(long)]
        apply: bool,
        #[arg(long)]
        yes: bool,
        #[arg(long, default_value = "/var/lib/mesh/tuning-plan-state.json")]
        state: PathBuf,
        /// Also write, from a network namespace other than the host's, what reaches beyond it:
        /// IRQ affinity (/proc/irq is the whole node's), and the queues of devices seen through
        /// another namespace's /sys. Skipped there by default.
        #[arg(long)]
        node_wide: bool,
    },
    /// Restores what an apply changed (dry run without --yes). Refused while an apply of the
    /// same state file runs; a lock left by a killed apply is taken over.
    Revert {
        #[arg(long, default_value = "/var/lib/mesh/tuning-state.json")]
        state: PathBuf,
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Root::new(&args.root);
    match args.command {
        Cmd::Profile { name } => match name {
            None => {
                for p in profile::all() {
                    println!("{:<12} {}", p.name, p.summary);
                }
            }
            Some(name) => {
                let p = find(&name)?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&p)?);
                } else {
                    println!("{}: {}", p.name, p.summary);
                    for s in &p.settings {
                        println!("  {} = {}\n      {}", s.key, s.value, s.why);
                    }
                }
            }
        },
        Cmd::Doctor { profile } => {
            let p = find(&profile)?;
            let probe = args.root == std::path::Path::new("/");
            let checks = doctor::run(&root, Some(&p), probe);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    let mark = match c.verdict {
                        Verdict::Ok => "ok  ",
                        Verdict::Warn => "WARN",
                        Verdict::Info => "info",
                    };
                    println!("{mark} {:<44} {:<28} wanted: {}", c.name, c.found, c.wanted);
                    if c.verdict == Verdict::Warn {
                        println!("     {}", c.why);
                    }
                }
            }
        }
        Cmd::Apply {
            profile,
            yes,
            state,
            node_wide,
        } => {
            let p = find(&profile)?;
            let comparison = profile::compare(&p, &root);
            // From a pod's or a lab's namespace, a writable kernel.* sysctl still changes the
            // whole node: only on request.
            let hold_node_wide = !node_wide && !in_host_netns(&root);
            let mut writes = Vec::new();
            for c in &comparison {
                let held =
                    hold_node_wide && is_node_wide_file(c.key) && c.status != Status::Missing;
                let action = match c.status {
                    _ if held => "skip",
                    Status::Same => "keep",
                    Status::Change => "set ",
                    Status::Missing | Status::ReadOnly => "skip",
                };
                let note = match c.status {
                    _ if held => format!("  ({HELD_NODE_WIDE})"),
                    Status::ReadOnly => "  (read-only here: a host-wide setting)".into(),
                    Status::Missing => "  (not in this kernel or namespace)".into(),
                    Status::Change if is_node_wide_file(c.key) => {
                        "  (node-wide, from any namespace)".into()
                    }
                    _ => String::new(),
                };
                println!(
                    "{action} {:<36} {:>24} -> {}{note}",
                    c.key,
                    c.current.as_deref().unwrap_or("(absent)"),
                    c.target
                );
                if c.status == Status::Change && !held {
                    writes.push(Write {
                        path: setting_file(c.key),
                        value: c.target.clone(),
                    });
                }
            }
            if !yes {
                println!(
                    "dry run: nothing changed; pass --yes to apply ({} change(s))",
                    writes.len()
                );
                return Ok(());
            }
            let saved = state::apply(&root, p.name, &writes, &state)?;
            println!(
                "applied {} change(s); revert with: meshtune revert --state {} --yes",
                saved.entries.len(),
                state.display()
            );
        }
        Cmd::Plan {
            workers,
            use_smt,
            apply,
            yes,
            state,
            node_wide,
        } => {
            let topology = Topology::read(&root);
            let plan = planner::plan(&topology, planner::Options { workers, use_smt });
            // IRQ affinity changes the whole node from any namespace; a device's queues are
            // the namespace's own only if /sys shows this namespace's devices.
            let netns = Netns::read(&root);
            let (mut writes, mut held) = (Vec::new(), Vec::new());
            for w in &plan.writes {
                match netns.held_back(&w.path, node_wide) {
                    None => writes.push(w.clone()),
                    Some(reach) => held.push(Held {
                        path: w.path.clone(),
                        value: w.value.clone(),
                        reach,
                    }),
                }
            }
            if args.json {
                let shown = PlanOutput {
                    plan: &plan,
                    skipped: &held,
                };
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                println!(
                    "workers:      {} cpu(s): {}",
                    plan.worker_cpus.len(),
                    format_list(&plan.worker_cpus)
                );
                println!(
                    "housekeeping: {}",
                    if plan.housekeeping_cpus.is_empty() {
                        "(shared)".into()
                    } else {
                        format_list(&plan.housekeeping_cpus)
                    }
                );
                println!(
                    "run:          dataplane --workers {} --cores {}",
                    plan.worker_cpus.len(),
                    format_list(&plan.worker_cpus)
                );
                for n in &plan.notes {
                    println!("note:         {n}");
                }
                for w in &writes {
                    println!("write:        {} <- {}", w.path.display(), w.value);
                }
                for h in &held {
                    let why = match h.reach {
                        Reach::OtherNamespace => HELD_OTHER_NAMESPACE,
                        Reach::Node | Reach::Namespace => HELD_NODE_WIDE,
                    };
                    println!("skip:         {} <- {}  ({why})", h.path.display(), h.value);
                }
            }
            if apply {
                if !yes {
                    println!("dry run: nothing changed; pass --yes to apply the writes");
                    return Ok(());
                }
                let saved = state::apply(&root, "core plan", &writes, &state)?;
                println!(
                    "applied {} write(s); revert with: meshtune revert --state {} --yes",
                    saved.entries.len(),
                    state.display()
                );
            }
        }
        Cmd::Revert { state, yes } => {
            if !yes {
                let saved = state::load(&state)?;
                for e in &saved.entries {
                    println!("restore {} -> {}", e.path.display(), e.previous);
                }
                println!(
                    "dry run: nothing changed; pass --yes to revert {:?}",
                    saved.what
                );
                return Ok(());
            }
            let saved = state::revert(&root, &state)?;
            println!(
                "reverted {} change(s) of {:?}",
                saved.entries.len(),
                saved.what
            );
        }
    }
    Ok(())
}

/// A planned write `plan` leaves alone here, and why.
#[derive(serde::Serialize)]
struct Held {
    path: PathBuf,
    value: String,
    reach: Reach,
}

/// `plan --json`: the plan, and which of its writes are skipped here.
#[derive(serde::Serialize)]
struct PlanOutput<'a> {
    #[serde(flatten)]
    plan: &'a planner::Plan,
    skipped: &'a [Held],
}

fn find(name: &str) -> anyhow::Result<profile::Profile> {
    profile::find(name).ok_or_else(|| {
        let names: Vec<&str> = profile::all().iter().map(|p| p.name).collect();
        anyhow::anyhow!("no profile {name:?}; profiles: {}", names.join(", "))
    })
}
