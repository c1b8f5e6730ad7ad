//! The data plane's I/O layer: everything that touches the kernel or the network: monoio
//! workers, sockets and namespaces, TLS and HTTP/2, the admin endpoints. The decisions it acts
//! on come from `mesh-core`.

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod bufio;
pub mod h2glue;
pub mod ipc;
pub mod local;
pub mod logs;
pub mod metrics;
pub mod netns;
pub mod netns_sync;
pub mod pool;
pub mod procfs;
pub mod redirect;
pub mod relay;
pub mod routing;
pub mod runtime;
pub mod sockets;
pub mod splice;
pub mod stats;
pub mod tls;
pub mod upgrade;
pub mod view;
pub mod watch;
pub mod worker;
