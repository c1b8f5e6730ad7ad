//! The second channel from the agent to the data plane: the network namespaces of pods
//! enrolled through CNI, passed as descriptors (SCM_RIGHTS) so that a reused path can never
//! send the data plane into the wrong pod.
//!
//! On every connection the agent sends `Reset`, one `Add` per enrolled pod (with its
//! namespace descriptor), then `Synced`; after that, an `Add` or `Remove` per change. A data
//! plane that restarts thus gets every namespace back without any CNI call.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NetnsUpdate {
    /// A full set follows; what it does not repeat before `Synced` is gone.
    Reset,
    /// The pod's network namespace rides along as the message's one descriptor.
    Add {
        uid: String,
    },
    Remove {
        uid: String,
    },
    Synced,
}
