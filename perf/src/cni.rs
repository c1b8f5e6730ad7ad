//! A CNI runtime for the lab, doing what a container runtime's libcni does with a network
//! configuration list: run each plugin binary in turn with the `CNI_*` environment, the plugin's
//! config on stdin (plus the network's name, version, and the previous plugin's result), in the
//! host's (here: the simulated node's) network namespace; DEL in reverse order with the cached
//! ADD result. The plugins are real: Debian's `bridge` and `host-local`, then `mesh-cni`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::{json, Value};

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/cni";

/// Our plugin's `type` in a conflist.
pub const MESH_PLUGIN: &str = "mesh-cni";

/// A pod sandbox as the runtime describes it to CNI.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub container_id: String,
    pub netns_path: String,
    pub namespace: String,
    pub name: String,
    /// Extra `CNI_ARGS` (e.g. `IP` for host-local's static requests).
    pub args: Vec<(String, String)>,
}

/// A failed plugin invocation, with the error result it printed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{plugin} {command}: code {code}: {msg} ({details})")]
pub struct CniError {
    pub plugin: String,
    pub command: String,
    pub code: u64,
    pub msg: String,
    pub details: String,
}

pub struct Runtime {
    conflist: Value,
    plugin_dirs: Vec<PathBuf>,
    /// Network namespace (name under /run/netns) the plugins run in: the node.
    host_netns: String,
    results: Mutex<HashMap<String, Value>>,
}

impl Runtime {
    pub fn new(conflist: Value, plugin_dirs: Vec<PathBuf>, host_netns: &str) -> Runtime {
        Runtime {
            conflist,
            plugin_dirs,
            host_netns: host_netns.to_owned(),
            results: Mutex::new(HashMap::new()),
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn add(&self, sandbox: &Sandbox) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let result = self.invoke("ADD", &plugin, sandbox, prev.as_ref())?;
            prev = result.or(prev);
        }
        let result = prev.unwrap_or_else(|| json!({}));
        if let Ok(mut cache) = self.results.lock() {
            cache.insert(sandbox.container_id.clone(), result.clone());
        }
        Ok(result)
    }

    pub fn del(&self, sandbox: &Sandbox) -> Result<(), CniError> {
        let cached = self
            .results
            .lock()
            .ok()
            .and_then(|mut c| c.remove(&sandbox.container_id));
        for plugin in self.plugins().iter().rev() {
            self.invoke("DEL", plugin, sandbox, cached.as_ref())?;
        }
        Ok(())
    }

    /// The runtime loses a sandbox without DEL (it crashed mid-way, say): it no longer lists
    /// it, and no plugin hears of it until GC.
    pub fn forget(&self, sandbox: &Sandbox) {
        if let Ok(mut cache) = self.results.lock() {
            cache.remove(&sandbox.container_id);
        }
    }

    /// CNI 1.1 GC, as a runtime sends it to each plugin of the network: the attachments it
    /// still knows in `cni.dev/valid-attachments`, `CNI_COMMAND` alone in the environment.
    /// Only our plugin is called: Debian's reference plugins here predate GC (and this lab's
    /// network is declared 1.0.0 for them), so the call says 1.1.0 to ours alone. `network`
    /// overrides the network's name (GC of another network).
    pub fn gc(&self, network: Option<&str>) -> Result<(), CniError> {
        let valid: Vec<Value> = self
            .results
            .lock()
            .map(|c| {
                c.keys()
                    .map(|id| json!({"containerID": id, "ifname": "eth0"}))
                    .collect()
            })
            .unwrap_or_default();
        let mut config = self.plugin(MESH_PLUGIN).ok_or_else(|| CniError {
            plugin: MESH_PLUGIN.into(),
            command: "GC".into(),
            code: 999,
            msg: "no mesh-cni in the network".into(),
            details: String::new(),
        })?;
        config["cniVersion"] = json!("1.1.0");
        config["name"] = network.map_or_else(|| self.conflist["name"].clone(), |n| json!(n));
        config["cni.dev/valid-attachments"] = Value::Array(valid);
        let stdin = serde_json::to_vec(&config).unwrap_or_default();
        self.exec(
            MESH_PLUGIN,
            "GC",
            &[("CNI_COMMAND", "GC".to_owned())],
            &stdin,
        )
        .map(drop)
    }

    /// The config of the plugin of this `type` in the list.
    pub fn plugin(&self, plugin_type: &str) -> Option<Value> {
        self.plugins()
            .into_iter()
            .find(|p| p["type"] == plugin_type)
    }

    /// The result of the last ADD of a sandbox, as the runtime cached it.
    pub fn result(&self, container_id: &str) -> Option<Value> {
        self.results
            .lock()
            .ok()
            .and_then(|c| c.get(container_id).cloned())
    }

    pub fn check(&self, sandbox: &Sandbox) -> Result<(), CniError> {
        let cached = self
            .results
            .lock()
            .ok()
            .and_then(|c| c.get(&sandbox.container_id).cloned());
        for plugin in self.plugins() {
            self.invoke("CHECK", &plugin, sandbox, cached.as_ref())?;
        }
        Ok(())
    }

    /// Runs one plugin of the list by its `type` (tests use it for single invocations).
    pub fn invoke(
        &self,
        command: &str,
        plugin: &Value,
        sandbox: &Sandbox,
        prev_result: Option<&Value>,
    ) -> Result<Option<Value>, CniError> {
        let mut config = plugin.clone();
        config["cniVersion"] = self.conflist["cniVersion"].clone();
        config["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev_result {
            config["prevResult"] = prev.clone();
        }
        let mut args = vec![
            ("IgnoreUnknown".to_owned(), "1".to_owned()),
            ("K8S_POD_NAMESPACE".to_owned(), sandbox.namespace.clone()),
            ("K8S_POD_NAME".to_owned(), sandbox.name.clone()),
            (
                "K8S_POD_INFRA_CONTAINER_ID".to_owned(),
                sandbox.container_id.clone(),
            ),
        ];
        args.extend(sandbox.args.iter().cloned());
        let cni_args = args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        let env = [
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", sandbox.container_id.clone()),
            ("CNI_NETNS", sandbox.netns_path.clone()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_ARGS", cni_args),
        ];
        let stdin = serde_json::to_vec(&config).unwrap_or_default();
        self.exec(plugin["type"].as_str().unwrap_or(""), command, &env, &stdin)
    }

    /// Runs a plugin binary with exactly the given environment and stdin.
    pub fn exec(
        &self,
        plugin_type: &str,
        command: &str,
        env: &[(&str, String)],
        stdin: &[u8],
    ) -> Result<Option<Value>, CniError> {
        let failure = |code: u64, msg: String| CniError {
            plugin: plugin_type.to_owned(),
            command: command.to_owned(),
            code,
            msg,
            details: String::new(),
        };
        let binary = self
            .plugin_dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| failure(999, format!("plugin {plugin_type:?} not found")))?;
        let cni_path = self
            .plugin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        // Our plugin runs with no PATH at all, as on nodes without the nft tool: capture rules
        // are the agent's to install, from its own container. (`ip` is found first, on ours.)
        let path = match plugin_type {
            MESH_PLUGIN => String::new(),
            _ => std::env::var("PATH").unwrap_or_default(),
        };
        let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
            .unwrap_or("ip");
        let mut child = Command::new(ip)
            .args(["netns", "exec", &self.host_netns])
            .arg(&binary)
            .env_clear()
            .env("PATH", path)
            .env("CNI_PATH", cni_path)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failure(999, format!("cannot run {}: {e}", binary.display())))?;
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin);
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failure(999, e.to_string()))?;
        let stdout: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if out.status.success() {
            return Ok(stdout);
        }
        let result = stdout.unwrap_or(Value::Null);
        Err(CniError {
            plugin: plugin_type.to_owned(),
            command: command.to_owned(),
            code: result["code"].as_u64().unwrap_or(999),
            msg: result["msg"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            details: result["details"].as_str().unwrap_or("").to_owned(),
        })
    }
}
