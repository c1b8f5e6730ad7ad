//! Process logging shared by the mesh's binaries, so that an operator reads one format from
//! every process on a node: `RUST_LOG` filters (default `info`), stderr, JSON on request, and
//! a filter that can be changed while the process runs (the admin endpoint's `/logging`).

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;

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

/// The admin endpoints' `/logging`, in the data plane and in ctrl-agent: `POST
/// ?level=<RUST_LOG filter>` sets the filter; `GET` (or a `POST` without a level) reports the
/// one in force. `level` is `None` in a process whose filter cannot change.
pub fn answer_logging(
    level: Option<&LogLevel>,
    method: &str,
    query: &str,
) -> (u16, &'static str, String) {
    let Some(level) = level else {
        return (
            503,
            "text/plain",
            "log level is fixed in this process\n".into(),
        );
    };
    let asked = (method == "POST")
        .then(|| crate::admin::query_value(query, "level"))
        .flatten();
    match asked {
        None => (200, "text/plain", format!("{}\n", level.current())),
        Some(directives) => match level.set(&directives) {
            Ok(()) => {
                tracing::info!(filter = %directives, "log filter changed");
                (200, "text/plain", format!("{directives}\n"))
            }
            Err(e) => (400, "text/plain", format!("{e}\n")),
        },
    }
}

/// Installs the global subscriber; `json` selects one JSON object per line for log shippers.
pub fn init(json: bool) -> LogLevel {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Lines(std::io::stderr));
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

/// A thread's lines waiting for [`flush_lines`], and where they go then.
struct Pending {
    bytes: Vec<u8>,
    out: Box<dyn Write>,
}

thread_local! {
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// The most a write to a pipe (a container's stderr) carries without another writer's bytes
/// landing inside it: PIPE_BUF.
const ATOMIC_WRITE: usize = libc::PIPE_BUF;

/// From now on, the lines this thread logs wait and go to `out` together: whole lines, as many
/// as fit in one atomic write, each write as soon as the next line would not fit, and the rest
/// at [`flush_lines`]. For the access logger, which writes a line per connection: about one
/// syscall per 4 KiB instead of one per line, and as many fewer wakeups of whatever reads the
/// process's stderr, with no other thread's line landing inside one of its lines.
pub fn batch_lines_on_this_thread(out: impl Write + 'static) {
    PENDING.with(|p| {
        *p.borrow_mut() = Some(Pending {
            bytes: Vec::with_capacity(ATOMIC_WRITE),
            out: Box::new(out),
        })
    });
}

/// Writes the lines this thread has waiting, if it batches.
pub fn flush_lines() {
    PENDING.with(|p| {
        if let Some(pending) = p.borrow_mut().as_mut() {
            pending.flush();
        }
    });
}

impl Pending {
    /// Takes one line (the log format writes each in one call), after writing out what waits
    /// if the two would not fit in one atomic write. A line longer than that goes alone, as it
    /// would unbatched.
    fn push(&mut self, line: &[u8]) {
        if !self.bytes.is_empty() && self.bytes.len() + line.len() > ATOMIC_WRITE {
            self.flush();
        }
        self.bytes.extend_from_slice(line);
    }

    fn flush(&mut self) {
        if !self.bytes.is_empty() {
            // As with a line written directly, a log sink that fails loses the lines.
            let _ = self.out.write_all(&self.bytes);
            self.bytes.clear();
        }
    }
}

/// The log format's writer: `M`'s, except on a thread that batches its lines.
#[derive(Clone, Copy)]
struct Lines<M>(M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Lines<M> {
    type Writer = LineWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self.0.make_writer())
    }
}

struct LineWriter<W>(W);

impl<W: Write> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let batched = PENDING.with(|p| match p.borrow_mut().as_mut() {
            Some(pending) => {
                pending.push(buf);
                true
            }
            None => false,
        });
        if batched {
            Ok(buf.len())
        } else {
            self.0.write(buf)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every write it receives, kept apart.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut writes) = self.0.lock() {
                writes.push(buf.to_vec());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Writes {
        fn taken(&self) -> Vec<String> {
            self.0
                .lock()
                .map(|mut w| {
                    w.drain(..)
                        .map(|b| String::from_utf8_lossy(&b).into())
                        .collect()
                })
                .unwrap_or_default()
        }
    }

    #[test]
    fn a_batching_thread_writes_its_lines_together_and_others_line_by_line() {
        let sink = Writes::default();
        let make = {
            let sink = sink.clone();
            move || sink.clone()
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Lines(make))
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("one");
            tracing::info!("two");
            assert_eq!(sink.taken().len(), 2, "a line per write on other threads");

            batch_lines_on_this_thread(sink.clone());
            for n in 0..3 {
                tracing::info!(n, "connection");
            }
            assert!(sink.taken().is_empty(), "written before the flush");
            flush_lines();
            let writes = sink.taken();
            assert_eq!(writes.len(), 1, "{writes:?}");
            assert_eq!(writes[0].lines().count(), 3, "{writes:?}");
            assert!(writes[0].contains("connection n=2"), "{writes:?}");
            flush_lines();
            assert!(sink.taken().is_empty(), "an empty flush writes nothing");

            // A long drain does not wait for its end: its lines go out as they fill a write
            // no other writer's bytes can land inside.
            let line = "x".repeat(1000);
            for _ in 0..100 {
                tracing::info!(%line);
            }
            let early = sink.taken();
            let early_bytes: usize = early.iter().map(String::len).sum();
            assert!(
                early_bytes >= 100 * 1000 - ATOMIC_WRITE,
                "{early_bytes} bytes out before the flush"
            );
            flush_lines();
            let writes: Vec<String> = early.into_iter().chain(sink.taken()).collect();
            for write in &writes {
                assert!(
                    write.len() <= ATOMIC_WRITE && write.ends_with('\n'),
                    "{write:?}"
                );
            }
            let lines: usize = writes.iter().map(|w| w.lines().count()).sum();
            assert_eq!(lines, 100, "lines lost or doubled");
            assert!(writes.len() <= 50, "{} writes for 100 lines", writes.len());

            // A line longer than one atomic write goes alone, whole.
            let long = "y".repeat(ATOMIC_WRITE * 2);
            tracing::info!("short");
            tracing::info!(%long);
            tracing::info!("short");
            flush_lines();
            let writes = sink.taken();
            assert_eq!(writes.len(), 3, "{writes:?}");
            assert!(writes[1].contains(&long) && writes[1].ends_with('\n'));
        });
    }
}
