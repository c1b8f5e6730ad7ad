//! Process logging shared by the mesh's binaries, so that an operator reads one format from
//! every process on a node: `RUST_LOG` filters (default `info`), stderr, JSON on request, and
//! a filter that can be changed while the process runs (the admin endpoint's `/logging`).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

type Reload = dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync;

/// Changes the process's log filter at runtime.
#[derive(Clone)]
pub struct LogLevel {
    reload: Arc<Reload>,
    current: Arc<Mutex<String>>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel")
            .field("current", &self.current())
            .finish()
    }
}

impl LogLevel {
    /// The filter in force, in `RUST_LOG` syntax.
    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Replaces the filter (`RUST_LOG` syntax, e.g. `debug` or `info,access=off`).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::try_new(directives)
            .map_err(|e| format!("bad log filter {directives:?}: {e}"))?;
        (self.reload)(filter)?;
        if let Ok(mut current) = self.current.lock() {
            *current = directives.to_owned();
        }
        Ok(())
    }
}

/// Installs the global subscriber; `json` selects one JSON object per line for log shippers.
pub fn init(json: bool) -> LogLevel {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let reload: Arc<Reload> = if json {
        let logs = logs.json().with_filter_reloading();
        let handle = logs.reload_handle();
        logs.init();
        Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    } else {
        let logs = logs
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter_reloading();
        let handle = logs.reload_handle();
        logs.init();
        Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    };
    LogLevel {
        reload,
        current: Arc::new(Mutex::new(directives)),
    }
}
