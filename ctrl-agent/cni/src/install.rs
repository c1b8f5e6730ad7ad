//! `mesh-cni install`: what the chart's installer container runs on every node. It copies this
//! binary into the node's CNI bin directory, chains the plugin at the end of the node's primary
//! network configuration, keeps it chained when the primary plugin rewrites its file, and on
//! SIGTERM takes the plugin out of the chain again, leaving the file as it found it; unless
//! the stop is a restart (`--pod-name`, below).
//!
//! Given its pod (`--pod-name`, `--pod-namespace`), the installer tells an uninstall from a
//! restart at SIGTERM by the pod's DaemonSet, as the agent does (`ctrl_agent::uninstall`).
//! A restart or an upgrade leaves the plugin chained: a pod created while the agent is away
//! then waits for it (ADD answers "try again"), where an unchained plugin would let it start
//! outside the mesh. Only a DaemonSet the API shows alive, placing pods on this node and still
//! keeping the chain (`cni.enabled`) means a restart. Anything else unchains, an API that
//! cannot answer included, as Istio's installer does: `helm uninstall` takes the RBAC away
//! right after the DaemonSet, and a plugin left chained without its agent would hold up every
//! new pod on the node. Without a pod (run by hand) SIGTERM unchains.
//!
//! The runtime uses the first configuration file in the directory by name (libcni's order), so
//! that is the one chained. A single-plugin `.conf` is rewritten as a `.conflist` beside it
//! (the original is kept and restored on uninstall). The binary stays in the bin directory on
//! uninstall: pods added while the plugin was chained still need it for their DEL.
//!
//! The chained entry lists the namespaces whose pods the plugin lets through without the agent:
//! always the mesh's own (`--mesh-namespace`; its pod runs the agent, so its ADD cannot wait
//! for it), plus `--exclude-namespaces` (kube-system unless given).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ctrl_agent::uninstall::{Departure, NodeRules};
use serde_json::{json, Value};

pub const PLUGIN_TYPE: &str = "mesh-cni";
/// Excluded besides the mesh's own namespace when `--exclude-namespaces` is not given.
pub const DEFAULT_EXCLUDED: &str = "kube-system";
/// Where the untouched bytes of a chained file are kept, to restore them exactly.
const BACKUP_SUFFIX: &str = ".mesh-cni-backup";

#[derive(Debug, Clone)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub agent_socket: Option<String>,
    /// The namespace the mesh's DaemonSet runs in; required by `install`.
    pub mesh_namespace: Option<String>,
    /// Further namespaces let through without the agent.
    pub exclude_namespaces: Vec<String>,
    /// Check the chain this often while running.
    pub interval: Duration,
    /// This installer's pod (namespace, name), to tell an uninstall from a restart.
    pub pod: Option<(String, String)>,
}

/// Parses `install|uninstall [--bin-dir D] [--conf-dir D] [--agent-socket P]
/// [--mesh-namespace NS] [--exclude-namespaces NS,NS] [--once]`; a value may also follow its
/// flag after `=` (as the chart passes them).
pub fn parse(args: &[String]) -> Result<(String, Options, bool), String> {
    let mut it = args.iter();
    let mode = it.next().cloned().ok_or("expected install or uninstall")?;
    let mut options = Options {
        bin_dir: PathBuf::from("/opt/cni/bin"),
        conf_dir: PathBuf::from("/etc/cni/net.d"),
        agent_socket: None,
        mesh_namespace: None,
        exclude_namespaces: vec![DEFAULT_EXCLUDED.to_owned()],
        interval: Duration::from_secs(2),
        pod: None,
    };
    let (mut pod_name, mut pod_namespace) = (None, None);
    let mut once = false;
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || match &inline {
            Some(value) => Ok(value.clone()),
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value")),
        };
        match flag {
            "--bin-dir" => options.bin_dir = value()?.into(),
            "--conf-dir" => options.conf_dir = value()?.into(),
            "--agent-socket" => options.agent_socket = Some(value()?),
            "--mesh-namespace" => {
                let namespace = value()?;
                if namespace.is_empty() {
                    return Err("--mesh-namespace needs a namespace".into());
                }
                options.mesh_namespace = Some(namespace);
            }
            // Empty: none besides the mesh's own.
            "--exclude-namespaces" => {
                options.exclude_namespaces = value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|ns| !ns.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "--interval-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|_| "--interval-ms takes a number".to_owned())?;
                options.interval = Duration::from_millis(ms.max(10));
            }
            "--pod-name" => pod_name = Some(value()?),
            "--pod-namespace" => pod_namespace = Some(value()?),
            "--once" if inline.is_none() => once = true,
            _ => return Err(format!("unknown flag {arg}")),
        }
    }
    if mode == "install" && options.mesh_namespace.is_none() {
        // Without it the mesh's own pod would wait for the agent it runs: a rebooted node
        // could never start it again.
        return Err("install needs --mesh-namespace (the namespace the mesh runs in)".into());
    }
    options.pod = match (pod_namespace, pod_name) {
        (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
            Some((namespace, name))
        }
        (None, None) => None,
        _ => return Err("--pod-name and --pod-namespace go together, neither empty".into()),
    };
    Ok((mode, options, once))
}

/// The configuration file the runtime uses: the first `.conflist`/`.conf`/`.json` by name,
/// our own rewrites of a `.conf` excepted (they are found through the original).
fn primary(conf_dir: &Path) -> Result<PathBuf, String> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(|e| format!("reading {}: {e}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| format!("no CNI configuration in {}", conf_dir.display()))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    // Per process: during a surging rolling update two installers run on the node.
    let tmp = path.with_extension(format!("mesh-cni-tmp-{}", std::process::id()));
    fs::write(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn plugin_entry(options: &Options) -> Value {
    let mut entry = json!({"type": PLUGIN_TYPE});
    if let Some(socket) = &options.agent_socket {
        entry["agentSocket"] = json!(socket);
    }
    let mut excluded: Vec<&str> = options.mesh_namespace.iter().map(String::as_str).collect();
    for namespace in &options.exclude_namespaces {
        if !excluded.contains(&namespace.as_str()) {
            excluded.push(namespace);
        }
    }
    entry["exclude_namespaces"] = json!(excluded);
    entry
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Copies the running binary into the bin directory (atomically: a runtime may be executing
/// the old copy).
pub fn install_binary(options: &Options) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let target = options.bin_dir.join(PLUGIN_TYPE);
    let tmp = options
        .bin_dir
        .join(format!(".{PLUGIN_TYPE}.{}.tmp", std::process::id()));
    fs::copy(&me, &tmp)
        .and_then(|_| fs::rename(&tmp, &target))
        .map_err(|e| format!("copying {} to {}: {e}", me.display(), target.display()))
}

/// Chains the plugin into the primary configuration; returns whether a file changed.
pub fn chain(options: &Options) -> Result<bool, String> {
    let path = primary(&options.conf_dir)?;
    let is_list = path.extension().and_then(|e| e.to_str()) == Some("conflist");
    let original = read_json(&path)?;
    let (list_path, mut list) = if is_list {
        (path.clone(), original)
    } else {
        // A single-plugin file becomes a list beside it; the runtime then picks the list
        // only if it sorts first, so the original is moved out of the way (kept as backup).
        let list_path = path.with_extension("conflist");
        let version = original
            .get("cniVersion")
            .cloned()
            .unwrap_or(json!("1.0.0"));
        let name = original
            .get("name")
            .cloned()
            .unwrap_or(json!("k8s-pod-network"));
        (
            list_path,
            json!({"cniVersion": version, "name": name, "plugins": [original]}),
        )
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| format!("{} has no plugins list", list_path.display()))?;
    let entry = plugin_entry(options);
    let wanted_last = plugins.last().is_some_and(|p| *p == entry);
    if wanted_last && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(false);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry);
    let bytes = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
    let backup = backup_path(&path);
    // A .conf here is always the primary plugin's latest (ours replaced it with a list and
    // removed it): that is what an uninstall must restore, not an older backup.
    if !is_list || !backup.exists() {
        fs::copy(&path, &backup).map_err(|e| format!("backing up {}: {e}", path.display()))?;
    }
    write_atomic(&list_path, &bytes)?;
    if list_path != path {
        fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
    }
    Ok(true)
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(BACKUP_SUFFIX);
    PathBuf::from(name)
}

/// Takes the plugin out of every configuration in the directory. Where the result is the file
/// as it was before we chained it, its original bytes are put back.
pub fn unchain(options: &Options) -> Result<(), String> {
    let entries: Vec<PathBuf> = fs::read_dir(&options.conf_dir)
        .map_err(|e| format!("reading {}: {e}", options.conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    for backup in entries
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(BACKUP_SUFFIX))
    {
        let original_path = PathBuf::from(
            backup
                .to_string_lossy()
                .trim_end_matches(BACKUP_SUFFIX)
                .to_owned(),
        );
        if original_path.extension().and_then(|e| e.to_str()) != Some("conflist") {
            // A .conf we rewrote as a list: drop the list, restore the file.
            let list = original_path.with_extension("conflist");
            if list.exists() {
                fs::remove_file(&list).map_err(|e| format!("removing {}: {e}", list.display()))?;
            }
            fs::rename(backup, &original_path)
                .map_err(|e| format!("restoring {}: {e}", original_path.display()))?;
            continue;
        }
        let mut current = read_json(&original_path)?;
        if let Some(plugins) = current.get_mut("plugins").and_then(Value::as_array_mut) {
            plugins.retain(|p| !is_ours(p));
        }
        let before = read_json(backup)?;
        if current == before {
            fs::rename(backup, &original_path)
                .map_err(|e| format!("restoring {}: {e}", original_path.display()))?;
        } else {
            // The primary plugin rewrote its file meanwhile: keep its changes, minus us.
            let bytes = serde_json::to_vec_pretty(&current).map_err(|e| e.to_string())?;
            write_atomic(&original_path, &bytes)?;
            fs::remove_file(backup).map_err(|e| format!("removing {}: {e}", backup.display()))?;
        }
    }
    // Lists chained without a backup (e.g. the backup was lost): still take us out.
    for path in entries
        .iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("conflist") && p.exists())
    {
        let Ok(mut list) = read_json(path) else {
            continue;
        };
        let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        if plugins.iter().any(is_ours) {
            plugins.retain(|p| !is_ours(p));
            let bytes = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
            write_atomic(path, &bytes)?;
        }
    }
    Ok(())
}

/// Installs, then keeps the chain in place until SIGTERM/SIGINT, then unchains unless the stop
/// is a restart.
pub fn run(options: &Options, once: bool) -> Result<(), String> {
    // Before chaining: a SIGTERM that comes right after must still be handled.
    let stop = Arc::new(AtomicBool::new(false));
    if !once {
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, stop.clone())
                .map_err(|e| format!("installing signal handler: {e}"))?;
        }
    }
    install_binary(options)?;
    chain(options)?;
    eprintln!(
        "mesh-cni: installed into {} and chained in {}",
        options.bin_dir.display(),
        options.conf_dir.display()
    );
    if once {
        return Ok(());
    }
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(options.interval);
        match chain(options) {
            Ok(true) => eprintln!("mesh-cni: configuration was rewritten; chained again"),
            Ok(false) => {}
            Err(e) => eprintln!("mesh-cni: cannot chain: {e}"),
        }
    }
    let Some((namespace, name)) = &options.pod else {
        unchain(options)?;
        eprintln!("mesh-cni: removed from the chain");
        return Ok(());
    };
    let (departure, why) = ctrl_agent::uninstall::at_shutdown(namespace, name, NodeRules::CniChain);
    eprintln!("mesh-cni: {why}");
    match departure {
        Departure::Restart => {
            eprintln!("mesh-cni: left chained; pods created until the agent is back wait for it")
        }
        Departure::Uninstall => {
            unchain(options)?;
            eprintln!("mesh-cni: removed from the chain");
        }
    }
    Ok(())
}
