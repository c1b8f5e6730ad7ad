//! The CNI specification (1.1, and the older versions it still speaks) as this plugin needs it:
//! the environment, the network config on stdin, and error results. Pure functions, tested
//! without a runtime.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

/// The newest version spoken: what VERSION and errors without a config report.
pub const CNI_VERSION: &str = "1.1.0";
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// GC's list of the attachments the runtime still knows (spec 1.1).
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// The same list under the key of the first 1.1 wording; libcni sends both.
const ATTACHMENTS_LEGACY: &str = "cni.dev/attachments";
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/mesh/cni.sock";
pub const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(10);

/// Error codes from the specification; 100 and up are this plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// The capture rules could not be installed.
    RulesFailed = 100,
    /// The agent refused the pod.
    AgentRefused = 101,
    /// CHECK found the pod unknown to the agent.
    Unknown = 102,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl Error {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Error {
        Error {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error result printed on stdout, in the config's version (ours when there was none).
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    /// Spec 1.1: can the plugin serve ADD? Only `CNI_COMMAND` is set.
    Status,
    /// Spec 1.1: clean up what belongs to attachments not in the valid list.
    Gc,
    Version,
}

/// The `CNI_*` environment of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// Empty for DEL when the sandbox's namespace is already gone.
    pub netns: String,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
}

fn parse_cni_args(args: &str) -> HashMap<&str, &str> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

/// Reads and checks the environment (a function of a lookup, so tests pass a map).
pub fn invocation(env: impl Fn(&str) -> Option<String>) -> Result<Invocation, Error> {
    let get = |k: &str| env(k).unwrap_or_default();
    let command = match get("CNI_COMMAND").as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "STATUS" => Command::Status,
        "GC" => Command::Gc,
        "VERSION" => Command::Version,
        "" => {
            return Err(Error::new(
                Code::InvalidEnvironment,
                "CNI_COMMAND is not set",
                "",
            ))
        }
        other => {
            return Err(Error::new(
                Code::InvalidEnvironment,
                format!("unknown CNI_COMMAND {other:?}"),
                "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
            ))
        }
    };
    let invocation = Invocation {
        command,
        container_id: get("CNI_CONTAINERID"),
        netns: get("CNI_NETNS"),
        ifname: get("CNI_IFNAME"),
        pod_namespace: String::new(),
        pod_name: String::new(),
    };
    // These concern the network, not one container: no container, namespace or pod.
    if matches!(command, Command::Version | Command::Status | Command::Gc) {
        return Ok(invocation);
    }
    if invocation.container_id.is_empty() {
        return Err(Error::new(
            Code::InvalidEnvironment,
            "CNI_CONTAINERID is not set",
            "",
        ));
    }
    if invocation.netns.is_empty() && command != Command::Del {
        return Err(Error::new(
            Code::InvalidEnvironment,
            "CNI_NETNS is not set",
            "",
        ));
    }
    let cni_args = get("CNI_ARGS");
    let args = parse_cni_args(&cni_args);
    let pod_namespace = args.get("K8S_POD_NAMESPACE").copied().unwrap_or_default();
    let pod_name = args.get("K8S_POD_NAME").copied().unwrap_or_default();
    if pod_namespace.is_empty() || pod_name.is_empty() {
        return Err(Error::new(
            Code::InvalidEnvironment,
            "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME",
            "this plugin serves Kubernetes pods",
        ));
    }
    Ok(Invocation {
        pod_namespace: pod_namespace.to_owned(),
        pod_name: pod_name.to_owned(),
        ..invocation
    })
}

/// The network config from stdin, with this plugin's fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub cni_version: String,
    /// The network's name (`name`): GC concerns only the sandboxes attached to it.
    pub network: String,
    pub agent_socket: PathBuf,
    pub agent_wait: Duration,
    /// The result of the plugins before us, passed on unchanged.
    pub prev_result: Option<Value>,
    /// Pods in these namespaces are passed through without asking the agent (`exclude_namespaces`):
    /// the mesh's own namespace, whose pod runs the agent, and by default kube-system.
    pub exclude_namespaces: Vec<String>,
    /// GC's input, checked whenever it is present (see [`Config::gc_attachments`]).
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// One entry of GC's valid-attachments list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl Config {
    /// Whether the pod is one that must start even when the agent is not there.
    pub fn excludes(&self, invocation: &Invocation) -> bool {
        self.exclude_namespaces.contains(&invocation.pod_namespace)
    }

    /// GC's valid attachments; GC without them is an invalid config.
    pub fn gc_attachments(&self) -> Result<&[Attachment], Error> {
        self.valid_attachments.as_deref().ok_or_else(|| {
            Error::new(
                Code::InvalidConfig,
                format!("GC without {VALID_ATTACHMENTS}"),
                "the runtime must list the attachments it still knows",
            )
        })
    }
}

fn exclude_namespaces(value: Option<&Value>) -> Result<Vec<String>, Error> {
    let invalid = || {
        Error::new(
            Code::InvalidConfig,
            "exclude_namespaces must be a list of namespace names",
            "",
        )
    };
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(names)) => names
            .iter()
            .map(|name| match name.as_str() {
                Some(ns) if !ns.is_empty() => Ok(ns.to_owned()),
                _ => Err(invalid()),
            })
            .collect(),
        Some(_) => Err(invalid()),
    }
}

fn valid_attachments(
    object: &serde_json::Map<String, Value>,
) -> Result<Option<Vec<Attachment>>, Error> {
    let Some(list) = object
        .get(VALID_ATTACHMENTS)
        .or_else(|| object.get(ATTACHMENTS_LEGACY))
    else {
        return Ok(None);
    };
    let invalid = |what: String| Error::new(Code::InvalidConfig, what, "");
    let entries = list
        .as_array()
        .ok_or_else(|| invalid(format!("{VALID_ATTACHMENTS} must be a list")))?;
    entries
        .iter()
        .map(|entry| {
            let field = |key: &str| entry.get(key).and_then(Value::as_str);
            match (field("containerID"), field("ifname")) {
                (Some(container_id), Some(ifname)) if !container_id.is_empty() => Ok(Attachment {
                    container_id: container_id.to_owned(),
                    ifname: ifname.to_owned(),
                }),
                _ => Err(invalid(format!(
                    "{VALID_ATTACHMENTS} entry {entry} lacks containerID or ifname"
                ))),
            }
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

pub fn config(stdin: &[u8]) -> Result<Config, Error> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        Error::new(
            Code::DecodeFailure,
            "network config on stdin is not JSON",
            e.to_string(),
        )
    })?;
    let object = value.as_object().ok_or_else(|| {
        Error::new(
            Code::DecodeFailure,
            "network config is not a JSON object",
            "",
        )
    })?;
    let version = object
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::new(Code::InvalidConfig, "cniVersion is missing", ""))?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(Error::new(
            Code::IncompatibleVersion,
            format!("cniVersion {version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let agent_socket = match object.get("agentSocket") {
        None => PathBuf::from(DEFAULT_AGENT_SOCKET),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(_) => {
            return Err(Error::new(
                Code::InvalidConfig,
                "agentSocket must be a non-empty string",
                "",
            ))
        }
    };
    let agent_wait = match object.get("agentWaitSeconds") {
        None => DEFAULT_AGENT_WAIT,
        Some(v) => v
            .as_f64()
            .filter(|s| (0.0..=300.0).contains(s))
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::new(
                    Code::InvalidConfig,
                    "agentWaitSeconds must be a number from 0 to 300",
                    "",
                )
            })?,
    };
    Ok(Config {
        cni_version: version.to_owned(),
        network: object
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        agent_socket,
        agent_wait,
        prev_result: object.get("prevResult").cloned(),
        exclude_namespaces: exclude_namespaces(object.get("exclude_namespaces"))?,
        valid_attachments: valid_attachments(object)?,
    })
}

/// The pod's addresses from the previous plugin's result (`ips[].address`, CIDR form).
pub fn prev_result_ips(prev: &Value) -> Result<Vec<IpAddr>, Error> {
    let ips = prev
        .get("ips")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::new(Code::InvalidConfig, "prevResult has no ips", ""))?;
    ips.iter()
        .map(|entry| {
            let address = entry.get("address").and_then(Value::as_str).unwrap_or("");
            address
                .split('/')
                .next()
                .and_then(|ip| ip.parse().ok())
                .ok_or_else(|| {
                    Error::new(
                        Code::InvalidConfig,
                        format!("prevResult address {address:?} is not ip/prefix"),
                        "",
                    )
                })
        })
        .collect()
}

/// What ADD prints: the previous result, unchanged but for the version we speak.
pub fn add_result(config: &Config) -> Value {
    let mut result = config.prev_result.clone().unwrap_or_else(|| json!({}));
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), json!(config.cni_version));
    }
    result
}

pub fn version_result() -> Value {
    json!({"cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const POD_ARGS: &str =
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_INFRA_CONTAINER_ID=abc";

    #[test]
    fn environment_of_an_add() {
        let inv = invocation(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", POD_ARGS),
        ]))
        .expect("valid");
        assert_eq!(inv.command, Command::Add);
        assert_eq!(
            (inv.pod_namespace.as_str(), inv.pod_name.as_str()),
            ("shop", "cart-1")
        );
    }

    #[test]
    fn environment_errors_carry_code_4() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[("CNI_COMMAND", "UPDATE")],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/x"),
                ("CNI_ARGS", POD_ARGS),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_ARGS", POD_ARGS),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_NETNS", "/x"),
            ],
        ];
        for case in cases {
            let err = invocation(env(case)).expect_err("refused");
            assert_eq!(err.code, Code::InvalidEnvironment, "{case:?}: {err:?}");
        }
        // DEL may come after the namespace is gone.
        let del = invocation(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_ARGS", POD_ARGS),
        ]))
        .expect("DEL without netns");
        assert_eq!(del.netns, "");
        // VERSION needs nothing else.
        assert!(invocation(env(&[("CNI_COMMAND", "VERSION")])).is_ok());
    }

    #[test]
    fn config_parsing_and_its_errors() {
        let good = br#"{"cniVersion":"1.0.0","name":"net","type":"mesh-cni","agentSocket":"/run/a.sock",
            "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.2.3/24","gateway":"10.1.2.1"}]}}"#;
        let cfg = config(good).expect("valid");
        assert_eq!(cfg.agent_socket, PathBuf::from("/run/a.sock"));
        let ips = prev_result_ips(cfg.prev_result.as_ref().expect("prev")).expect("ips");
        assert_eq!(ips, ["10.1.2.3".parse::<IpAddr>().expect("ip")]);
        assert_eq!(add_result(&cfg)["ips"][0]["gateway"], "10.1.2.1");

        let cases: &[(&[u8], Code)] = &[
            (b"not json", Code::DecodeFailure),
            (b"[1,2]", Code::DecodeFailure),
            (br#"{"name":"net"}"#, Code::InvalidConfig),
            (br#"{"cniVersion":"2.0.0"}"#, Code::IncompatibleVersion),
            (
                br#"{"cniVersion":"1.0.0","agentSocket":7}"#,
                Code::InvalidConfig,
            ),
            (
                br#"{"cniVersion":"1.0.0","agentWaitSeconds":-1}"#,
                Code::InvalidConfig,
            ),
        ];
        for (input, code) in cases {
            assert_eq!(
                config(input).expect_err("refused").code,
                *code,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let bad_ips = serde_json::json!({"ips":[{"address":"nonsense"}]});
        assert_eq!(
            prev_result_ips(&bad_ips).expect_err("refused").code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn version_1_1_0_is_spoken() {
        let cfg = config(
            br#"{"cniVersion":"1.1.0","name":"net","type":"mesh-cni",
            "prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.1.2.3/24"}]}}"#,
        )
        .expect("1.1.0 accepted");
        assert_eq!(add_result(&cfg)["cniVersion"], "1.1.0");
        // The older ones still are, each echoed as given.
        for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
            let stdin = format!(r#"{{"cniVersion":"{version}","prevResult":{{"ips":[]}}}}"#);
            let cfg = config(stdin.as_bytes()).expect("accepted");
            assert_eq!(add_result(&cfg)["cniVersion"], version);
        }
        let listed = version_result();
        assert_eq!(
            listed["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        // STATUS and GC concern the network: CNI_COMMAND is all the environment they get.
        for command in [("STATUS", Command::Status), ("GC", Command::Gc)] {
            let inv = invocation(env(&[("CNI_COMMAND", command.0)])).expect(command.0);
            assert_eq!(inv.command, command.1);
        }
    }

    #[test]
    fn excluded_namespaces_from_the_config() {
        let cfg =
            config(br#"{"cniVersion":"1.0.0","exclude_namespaces":["mesh-system","kube-system"]}"#)
                .expect("valid");
        let pod = |namespace: &str| Invocation {
            command: Command::Add,
            container_id: "abc".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            pod_namespace: namespace.into(),
            pod_name: "p".into(),
        };
        assert!(cfg.excludes(&pod("kube-system")) && cfg.excludes(&pod("mesh-system")));
        assert!(!cfg.excludes(&pod("shop")));
        // A config written before the option excludes nothing.
        let old = config(br#"{"cniVersion":"1.0.0"}"#).expect("valid");
        assert!(!old.excludes(&pod("kube-system")));
        for bad in [
            &br#"{"cniVersion":"1.0.0","exclude_namespaces":"kube-system"}"#[..],
            br#"{"cniVersion":"1.0.0","exclude_namespaces":[""]}"#,
            br#"{"cniVersion":"1.0.0","exclude_namespaces":[7]}"#,
        ] {
            assert_eq!(config(bad).expect_err("refused").code, Code::InvalidConfig);
        }
    }

    #[test]
    fn gc_input_is_checked() {
        let cfg = config(
            br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .expect("valid");
        let listed = [Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        }];
        assert_eq!(cfg.gc_attachments(), Ok(&listed[..]));
        // The first 1.1 wording's key, which libcni also sends.
        let legacy = config(
            br#"{"cniVersion":"1.1.0","cni.dev/attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .expect("valid");
        assert_eq!(legacy.gc_attachments(), Ok(&listed[..]));
        let empty =
            config(br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[]}"#).expect("valid");
        assert_eq!(empty.gc_attachments(), Ok(&[][..]));
        let missing = config(br#"{"cniVersion":"1.1.0"}"#).expect("valid");
        assert_eq!(
            missing.gc_attachments().expect_err("refused").code,
            Code::InvalidConfig
        );
        for bad in [
            &br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":{}}"#[..],
            br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
            br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":"","ifname":"eth0"}]}"#,
            br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":"abc"}]}"#,
        ] {
            assert_eq!(
                config(bad).expect_err("refused").code,
                Code::InvalidConfig,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = Error::new(Code::TryAgainLater, "agent not ready", "socket /x");
        let v = e.to_json("0.4.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "agent not ready");
        assert_eq!(v["cniVersion"], "0.4.0");
    }
}
