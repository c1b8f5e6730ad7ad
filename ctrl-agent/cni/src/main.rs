//! `mesh-cni`: a chained CNI plugin (spec 1.0). For a pod the agent says belongs in the mesh,
//! ADD installs the capture rules in the pod's network namespace and hands that namespace to
//! the agent as a descriptor; DEL undoes both; CHECK verifies them. Anything that fails leaves
//! no rules behind and answers with the spec's error JSON, so the runtime retries instead of
//! starting a pod whose traffic would bypass the mesh.
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
    let outcome = run();
    let code = match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            eprintln!("mesh-cni: {} ({})", e.msg, e.details);
            println!("{}", e.to_json());
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

fn run() -> Result<Option<serde_json::Value>, Error> {
    let invocation = spec::invocation(|k| std::env::var(k).ok())?;
    if invocation.command == Command::Version {
        return Ok(Some(spec::version_result()));
    }
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|e| Error::new(Code::IoFailure, "cannot read stdin", e.to_string()))?;
    let config = spec::config(&stdin)?;
    match invocation.command {
        Command::Add => add(&invocation, &config).map(Some),
        Command::Del => del(&invocation, &config).map(|()| None),
        Command::Check => check(&invocation, &config).map(|()| None),
        Command::Version => Ok(Some(spec::version_result())),
    }
}

/// Connects to the agent, waiting up to `wait` for it (a node that is still booting).
fn agent(config: &Config, wait: Duration) -> Result<Channel, Error> {
    let deadline = Instant::now() + wait;
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
    let channel = agent(config, config.agent_wait)?;
    let capture = match ask(
        &channel,
        &Request::Decide {
            namespace: invocation.pod_namespace.clone(),
            name: invocation.pod_name.clone(),
        },
        None,
    )? {
        Reply::Decision { capture, .. } => capture,
        Reply::NotYet { reason } => {
            return Err(Error::new(
                Code::TryAgainLater,
                "pod cannot be enrolled yet",
                reason,
            ))
        }
        other => return Err(unexpected(other)),
    };
    let netns = NetNs::open(&invocation.netns).map_err(|e| {
        Error::new(
            Code::IoFailure,
            "cannot open the pod's network namespace",
            format!("{}: {e}", invocation.netns),
        )
    })?;
    if capture {
        mesh_io::redirect::install(&netns).map_err(|e| {
            Error::new(
                Code::RulesFailed,
                "cannot install the capture rules",
                e.to_string(),
            )
        })?;
    }
    let reply = ask(
        &channel,
        &Request::Add {
            pod: pod_ref(invocation),
            ips,
            netns_path: invocation.netns.clone(),
            captured: capture,
        },
        Some(&netns),
    );
    match reply {
        Ok(Reply::Done) => Ok(spec::add_result(config)),
        failed => {
            // Leave nothing half done: no rules without an enrollment.
            if capture {
                let _ = mesh_io::redirect::remove(&netns);
            }
            Err(match failed {
                Ok(Reply::Refused { reason }) => {
                    Error::new(Code::AgentRefused, "ctrl-agent refused the pod", reason)
                }
                Ok(other) => unexpected(other),
                Err(e) => e,
            })
        }
    }
}

fn del(invocation: &Invocation, config: &Config) -> Result<(), Error> {
    // DEL must succeed for pods we never saw or already forgot; if the agent is down, its
    // restart reconciles (the namespace will be gone).
    match agent(config, Duration::from_secs(2)) {
        Ok(channel) => match ask(
            &channel,
            &Request::Remove {
                pod: pod_ref(invocation),
            },
            None,
        ) {
            Ok(Reply::Done) => {}
            Ok(other) => eprintln!("mesh-cni: DEL: unexpected reply {other:?}"),
            Err(e) => eprintln!("mesh-cni: DEL: {}", e.msg),
        },
        Err(e) => eprintln!("mesh-cni: DEL without the agent: {}", e.details),
    }
    if !invocation.netns.is_empty() {
        if let Ok(netns) = NetNs::open(&invocation.netns) {
            mesh_io::redirect::remove(&netns).map_err(|e| {
                Error::new(
                    Code::RulesFailed,
                    "cannot remove the capture rules",
                    e.to_string(),
                )
            })?;
        }
    }
    Ok(())
}

fn check(invocation: &Invocation, config: &Config) -> Result<(), Error> {
    let channel = agent(config, config.agent_wait)?;
    let (known, captured) = match ask(
        &channel,
        &Request::Status {
            container_id: invocation.container_id.clone(),
        },
        None,
    )? {
        Reply::Status { known, captured } => (known, captured),
        other => return Err(unexpected(other)),
    };
    if !known {
        return Err(Error::new(
            Code::Unknown,
            "ctrl-agent does not know this sandbox",
            "",
        ));
    }
    let netns = NetNs::open(&invocation.netns).map_err(|e| {
        Error::new(
            Code::IoFailure,
            "cannot open the pod's network namespace",
            e.to_string(),
        )
    })?;
    let rules = mesh_io::redirect::check(&netns)
        .map_err(|e| Error::new(Code::IoFailure, "cannot list the rules", e.to_string()))?;
    match (captured, rules) {
        (true, false) => Err(Error::new(
            Code::RulesFailed,
            "the pod is enrolled but its capture rules are missing or incomplete",
            "",
        )),
        (false, true) => Err(Error::new(
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
