//! `mesh-cni`: a chained CNI plugin (spec 1.1). ADD hands the pod's network namespace to the
//! agent as a descriptor; the agent decides whether the pod belongs in the mesh and installs
//! the capture rules there before it answers (the plugin runs no `nft`). DEL releases the pod;
//! CHECK compares the rules the agent lists with what it knows. Anything that fails leaves no
//! rules behind and answers with the spec's error JSON, so the runtime retries instead of
//! starting a pod whose traffic would bypass the mesh. Pods of the excluded namespaces (the
//! mesh's own, whose pod runs the agent, and kube-system) pass through without the agent.
#![forbid(unsafe_code)]

mod install;
mod spec;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ctrl_agent::cni_api::{PodRef, Reply, Request};
use mesh_io::ipc::Channel;
use mesh_io::netns::NetNs;
use spec::{Code, Command, Config, Error, Invocation};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The chart's installer container runs the same binary with a subcommand; the runtime
    // never passes arguments (and always sets CNI_COMMAND).
    if std::env::var_os("CNI_COMMAND").is_none()
        && matches!(
            args.first().map(String::as_str),
            Some("install" | "uninstall")
        )
    {
        std::process::exit(installer(&args));
    }
    // Errors answer in the config's version once it is known.
    let mut cni_version = spec::CNI_VERSION.to_owned();
    let outcome = run(&mut cni_version);
    let code = match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            eprintln!("mesh-cni: {} ({})", e.msg, e.details);
            println!("{}", e.to_json(&cni_version));
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn installer(args: &[String]) -> i32 {
    let (mode, options, once) = match install::parse(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("mesh-cni: {e}");
            return 2;
        }
    };
    let result = if mode == "install" {
        install::run(&options, once)
    } else {
        install::unchain(&options)
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mesh-cni {mode}: {e}");
            1
        }
    }
}

fn run(cni_version: &mut String) -> Result<Option<serde_json::Value>, Error> {
    let invocation = spec::invocation(|k| std::env::var(k).ok())?;
    if invocation.command == Command::Version {
        return Ok(Some(spec::version_result()));
    }
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|e| Error::new(Code::IoFailure, "cannot read stdin", e.to_string()))?;
    let config = spec::config(&stdin)?;
    cni_version.clone_from(&config.cni_version);
    dispatch(&invocation, &config)
}

/// One command on a valid environment and config: what is printed on success.
fn dispatch(invocation: &Invocation, config: &Config) -> Result<Option<serde_json::Value>, Error> {
    let per_pod = matches!(
        invocation.command,
        Command::Add | Command::Del | Command::Check
    );
    if per_pod && config.excludes(invocation) {
        // Never the agent nor the pod's rules: the agent itself runs in an excluded pod, so
        // after a node reboot its own ADD could otherwise never succeed.
        return Ok(match invocation.command {
            Command::Add => Some(spec::add_result(config)),
            _ => None,
        });
    }
    match invocation.command {
        Command::Add => add(invocation, config).map(Some),
        Command::Del => del(invocation, config).map(|()| None),
        Command::Check => check(invocation, config).map(|()| None),
        // Ready whenever the config is valid. Not error 50 while the agent is unreachable,
        // although the spec suggests it for a missing daemon: the runtime would then report
        // the node's network not ready, and the agent's own pod (not host-network) would
        // never be started. ADD for a pod the agent must decide answers 11 meanwhile.
        Command::Status => Ok(None),
        Command::Gc => gc(config).map(|()| None),
        Command::Version => Ok(Some(spec::version_result())),
    }
}

/// Connects to the agent, waiting until `deadline` for it (a node that is still booting).
fn agent(config: &Config, deadline: Instant) -> Result<Channel, Error> {
    loop {
        match Channel::connect(&config.agent_socket) {
            Ok(channel) => {
                let _ = channel.set_timeout(Some(Duration::from_secs(30)));
                return Ok(channel);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::new(
                    Code::TryAgainLater,
                    "ctrl-agent is not reachable; the runtime should retry",
                    format!("{}: {e}", config.agent_socket.display()),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Asks the agent, waiting up to `wait` for one that answers: none may listen yet (a node
/// still booting), or the one listening may have handed the node over to its successor (a
/// rolling update), which binds the socket path next.
fn call(
    config: &Config,
    wait: Duration,
    request: &Request,
    netns: Option<&NetNs>,
) -> Result<Reply, Error> {
    let started = Instant::now();
    let mut deadline = started + wait;
    loop {
        let channel = agent(config, deadline)?;
        match ask(&channel, request, netns)? {
            Reply::Moved { reason } => {
                // A successor is on its way: worth the plugin's whole wait, even for a DEL
                // (which the successor would otherwise never hear of).
                deadline = deadline.max(started + config.agent_wait);
                if Instant::now() >= deadline {
                    return Err(Error::new(
                        Code::TryAgainLater,
                        "ctrl-agent is handing the node over to a new agent; the runtime should retry",
                        reason,
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            reply => return Ok(reply),
        }
    }
}

fn ask(channel: &Channel, request: &Request, netns: Option<&NetNs>) -> Result<Reply, Error> {
    let fds: Vec<_> = netns.iter().map(|n| n.fd()).collect();
    channel
        .send_json(request, &fds)
        .and_then(|()| channel.recv_json::<Reply>())
        .map_err(|e| {
            Error::new(
                Code::TryAgainLater,
                "talking to ctrl-agent failed",
                e.to_string(),
            )
        })?
        .map(|(reply, _)| reply)
        .ok_or_else(|| Error::new(Code::TryAgainLater, "ctrl-agent closed the connection", ""))
}

fn pod_ref(invocation: &Invocation) -> PodRef {
    PodRef {
        container_id: invocation.container_id.clone(),
        namespace: invocation.pod_namespace.clone(),
        name: invocation.pod_name.clone(),
    }
}

fn add(invocation: &Invocation, config: &Config) -> Result<serde_json::Value, Error> {
    let prev = config.prev_result.as_ref().ok_or_else(|| {
        Error::new(
            Code::InvalidConfig,
            "no prevResult: mesh-cni must be chained after the primary plugin",
            "",
        )
    })?;
    let ips = spec::prev_result_ips(prev)?;
    let netns = NetNs::open(&invocation.netns).map_err(|e| {
        Error::new(
            Code::IoFailure,
            "cannot open the pod's network namespace",
            format!("{}: {e}", invocation.netns),
        )
    })?;
    // The agent decides and installs the rules from its own container: nodes need no `nft`.
    let reply = call(
        config,
        config.agent_wait,
        &Request::Add {
            pod: pod_ref(invocation),
            ips,
            netns_path: invocation.netns.clone(),
            captured: false,
            network: config.network.clone(),
        },
        Some(&netns),
    )?;
    match reply {
        Reply::Done => Ok(spec::add_result(config)),
        Reply::NotYet { reason } => Err(Error::new(
            Code::TryAgainLater,
            "pod cannot be enrolled yet",
            reason,
        )),
        Reply::Refused { reason } => Err(Error::new(
            Code::AgentRefused,
            "ctrl-agent refused the pod",
            reason,
        )),
        other => Err(unexpected(other)),
    }
}

fn del(invocation: &Invocation, config: &Config) -> Result<(), Error> {
    // DEL must succeed for pods we never saw or already forgot; if the agent is down, its
    // restart reconciles (the namespace will be gone).
    let request = Request::Remove {
        pod: pod_ref(invocation),
    };
    match call(config, Duration::from_secs(2), &request, None) {
        Ok(Reply::Done) => {}
        Ok(other) => eprintln!("mesh-cni: DEL: unexpected reply {other:?}"),
        Err(e) => eprintln!("mesh-cni: DEL without the agent: {}: {}", e.msg, e.details),
    }
    Ok(())
}

/// Tells the agent which of this network's sandboxes still exist; it releases the others
/// (their DEL was lost, say, to a runtime crash), whose namespaces it would otherwise keep
/// open, and served, for good.
fn gc(config: &Config) -> Result<(), Error> {
    let attachments = config.gc_attachments()?;
    if config.network.is_empty() {
        return Err(Error::new(
            Code::InvalidConfig,
            "GC of a network config without a name",
            "the agent releases only the sandboxes of the network named",
        ));
    }
    let request = Request::Collect {
        network: config.network.clone(),
        valid: attachments.iter().map(|a| a.container_id.clone()).collect(),
    };
    match call(config, Duration::from_secs(2), &request, None)? {
        Reply::Done => Ok(()),
        Reply::Refused { reason } => Err(Error::new(
            Code::AgentRefused,
            "ctrl-agent refused the GC",
            reason,
        )),
        other => Err(unexpected(other)),
    }
}

fn check(invocation: &Invocation, config: &Config) -> Result<(), Error> {
    let (known, captured, rules) = match call(
        config,
        config.agent_wait,
        &Request::Status {
            container_id: invocation.container_id.clone(),
        },
        None,
    )? {
        Reply::Status {
            known,
            captured,
            rules,
        } => (known, captured, rules),
        other => return Err(unexpected(other)),
    };
    if !known {
        return Err(Error::new(
            Code::Unknown,
            "ctrl-agent does not know this sandbox",
            "",
        ));
    }
    match (captured, rules) {
        (_, None) => Err(Error::new(
            Code::IoFailure,
            "ctrl-agent cannot list the rules in the pod's namespace",
            "",
        )),
        (true, Some(false)) => Err(Error::new(
            Code::RulesFailed,
            "the pod is enrolled but its capture rules are missing or incomplete",
            "",
        )),
        (false, Some(true)) => Err(Error::new(
            Code::RulesFailed,
            "the pod is not enrolled but capture rules are installed",
            "",
        )),
        _ => Ok(()),
    }
}

fn unexpected(reply: Reply) -> Error {
    Error::new(
        Code::AgentRefused,
        "unexpected reply from ctrl-agent",
        format!("{reply:?}"),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    fn invocation(command: Command, namespace: &str, netns: &str) -> Invocation {
        Invocation {
            command,
            container_id: "abc".into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            pod_namespace: namespace.into(),
            pod_name: "pod-1".into(),
        }
    }

    /// A 1.1.0 config whose agent socket does not exist: any attempt to reach the agent fails.
    fn config(extra: serde_json::Value) -> Config {
        let mut stdin = json!({
            "cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "mesh-cni",
            "agentSocket": std::env::temp_dir().join(format!("mesh-cni-no-agent-{}.sock", std::process::id())),
            "agentWaitSeconds": 0,
            "exclude_namespaces": ["mesh-system", "kube-system"],
            "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}],
                           "ips": [{"address": "10.1.2.3/24", "interface": 0}]},
        });
        if let (Some(object), Some(extra)) = (stdin.as_object_mut(), extra.as_object()) {
            object.extend(extra.clone());
        }
        let config = spec::config(stdin.to_string().as_bytes()).expect("valid config");
        assert!(
            !config.agent_socket.exists(),
            "{:?} must not exist",
            config.agent_socket
        );
        config
    }

    /// A file that exists but is no network namespace: touching the pod's rules through it fails.
    struct NotANetns(PathBuf);

    impl NotANetns {
        fn new(test: &str) -> NotANetns {
            let path = std::env::temp_dir().join(format!(
                "mesh-cni-not-a-netns-{test}-{}",
                std::process::id()
            ));
            std::fs::write(&path, b"").expect("write");
            NotANetns(path)
        }
        fn path(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for NotANetns {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn an_excluded_pod_passes_through_without_the_agent() {
        let config = config(json!({}));
        let result = dispatch(
            &invocation(Command::Add, "kube-system", "/proc/self/ns/net"),
            &config,
        )
        .expect("ADD of a kube-system pod succeeds without the agent")
        .expect("ADD prints a result");
        let mut expected = config.prev_result.clone().expect("prevResult");
        expected["cniVersion"] = json!("1.1.0");
        assert_eq!(result, expected);
        // The mesh's own pod too: its ADD cannot wait for the agent it runs.
        assert!(dispatch(
            &invocation(Command::Add, "mesh-system", "/proc/self/ns/net"),
            &config
        )
        .is_ok());

        // DEL and CHECK neither ask the agent nor touch the pod's rules.
        let netns = NotANetns::new("excluded");
        assert_eq!(
            dispatch(
                &invocation(Command::Del, "kube-system", &netns.path()),
                &config
            ),
            Ok(None)
        );
        assert_eq!(
            dispatch(
                &invocation(Command::Check, "kube-system", &netns.path()),
                &config
            ),
            Ok(None)
        );
    }

    #[test]
    fn other_pods_still_need_the_agent() {
        let config = config(json!({}));
        let add = dispatch(
            &invocation(Command::Add, "shop", "/proc/self/ns/net"),
            &config,
        )
        .expect_err("no agent, no ADD");
        assert_eq!(add.code, Code::TryAgainLater, "{add:?}");
        let check = dispatch(
            &invocation(Command::Check, "shop", "/proc/self/ns/net"),
            &config,
        )
        .expect_err("no agent, no CHECK");
        assert_eq!(check.code, Code::TryAgainLater, "{check:?}");
        // DEL succeeds without the agent, and leaves the namespace alone: its rules are the
        // agent's to remove (they go with the namespace otherwise).
        let netns = NotANetns::new("other");
        assert_eq!(
            dispatch(&invocation(Command::Del, "shop", &netns.path()), &config),
            Ok(None)
        );
    }

    #[test]
    fn status_is_answered_and_gc_needs_its_list_a_name_and_the_agent() {
        let status = invocation(Command::Status, "", "");
        // Ready even with the agent away (see dispatch).
        assert_eq!(dispatch(&status, &config(json!({}))), Ok(None));

        // GC is the agent's to do (the lab's cni tests drive it with an agent): without
        // one, the runtime is told to try again.
        let gc = invocation(Command::Gc, "", "");
        let listed =
            json!({"cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]});
        let unreachable = dispatch(&gc, &config(listed.clone())).expect_err("no agent");
        assert_eq!(unreachable.code, Code::TryAgainLater, "{unreachable:?}");
        let refused = dispatch(&gc, &config(json!({}))).expect_err("GC without its list");
        assert_eq!(refused.code, Code::InvalidConfig);
        let mut unnamed = listed;
        unnamed["name"] = json!("");
        let refused = dispatch(&gc, &config(unnamed)).expect_err("GC without a network name");
        assert_eq!(refused.code, Code::InvalidConfig);
    }
}
