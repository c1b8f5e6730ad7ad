//! Process logging shared by the mesh's binaries, so that an operator reads one format from
//! every process on a node: `RUST_LOG` filters (default `info`), stderr, JSON on request.

use std::io::IsTerminal;

/// Installs the global subscriber; `json` selects one JSON object per line for log shippers.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
