//! What the CNI plugin and the agent say to each other over the agent's CNI socket
//! (`mesh_io::ipc`, one JSON message per request and reply).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The label Istio uses to put namespaces and pods in (or out of) ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Should the pod be captured? (Asked first by plugins that installed the rules
    /// themselves; the agent still answers them.)
    Decide { namespace: String, name: String },
    /// The sandbox is up. The pod's network namespace rides along as the message's
    /// descriptor; the agent decides whether to capture the pod and installs or removes the
    /// rules there itself, so the plugin needs no `nft` on the node. `captured`: whether the
    /// rules are in place already (the plugin installed them; this one never does).
    Add {
        pod: PodRef,
        ips: Vec<IpAddr>,
        netns_path: String,
        captured: bool,
        /// The network (the CNI config's `name`) the sandbox is attached to, so that GC of
        /// another network never releases it. Empty from plugins before GC was handled.
        #[serde(default)]
        network: String,
    },
    /// The sandbox is going away.
    Remove { pod: PodRef },
    /// CNI GC: of the sandboxes attached to `network`, only those in `valid` (container ids)
    /// still exist; the agent releases the others, as if their DEL had come.
    Collect { network: String, valid: Vec<String> },
    /// What the agent knows about a sandbox.
    Status { container_id: String },
    /// From a new agent on the node (a rolling update's next pod): stop changing the node's
    /// enrollments, which it takes over from the state file, and answer plugins `Moved` so
    /// that they ask again at the socket path, which the new agent binds next.
    HandOver,
    /// From the agent that handed the node over to this one, while it waits: is this one
    /// leaving? Answered `Serving` or `Leaving`.
    Waiting,
}

impl Request {
    /// Each request's `op`, as it goes on the wire, in the order of [`Request::op_index`].
    pub const OPS: [&'static str; 7] = [
        "decide",
        "add",
        "remove",
        "collect",
        "status",
        "hand_over",
        "waiting",
    ];

    /// Where this request's `op` is in [`Request::OPS`].
    pub fn op_index(&self) -> usize {
        match self {
            Request::Decide { .. } => 0,
            Request::Add { .. } => 1,
            Request::Remove { .. } => 2,
            Request::Collect { .. } => 3,
            Request::Status { .. } => 4,
            Request::HandOver => 5,
            Request::Waiting => 6,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Decision {
        capture: bool,
        reason: String,
    },
    /// The pod belongs in the mesh but cannot be served yet (the agent does not know it):
    /// the runtime should retry.
    NotYet {
        reason: String,
    },
    Done,
    Status {
        known: bool,
        captured: bool,
        /// Whether the capture rules are in place in the sandbox's namespace, as the agent
        /// listed them; `None` when it could not list them (or an older agent).
        #[serde(default)]
        rules: Option<bool>,
    },
    Refused {
        reason: String,
    },
    /// This agent handed the node's enrollments over to a new one: ask again at the socket
    /// path (the new agent's once it has bound it). Nothing was done.
    Moved {
        reason: String,
    },
    /// The answer to `HandOver`: the state file is final; `pods` enrollments are in it.
    HandedOver {
        pods: usize,
    },
    /// The answer to `Waiting`: this agent serves the node.
    Serving,
    /// The answer to `Waiting`: this agent is stopping while the one that handed the node
    /// over to it still runs (its pod deleted by a rollback, say): take the node back now.
    Leaving,
}

impl Reply {
    /// Each reply's `reply`, as it goes on the wire, in the order of [`Reply::name_index`].
    pub const NAMES: [&'static str; 9] = [
        "decision",
        "not_yet",
        "done",
        "status",
        "refused",
        "moved",
        "handed_over",
        "serving",
        "leaving",
    ];

    /// Where this reply's name is in [`Reply::NAMES`].
    pub fn name_index(&self) -> usize {
        match self {
            Reply::Decision { .. } => 0,
            Reply::NotYet { .. } => 1,
            Reply::Done => 2,
            Reply::Status { .. } => 3,
            Reply::Refused { .. } => 4,
            Reply::Moved { .. } => 5,
            Reply::HandedOver { .. } => 6,
            Reply::Serving => 7,
            Reply::Leaving => 8,
        }
    }
}
