//! `meshload`: the lab's traffic, run as its own process inside a pod's namespace. Prints one
//! JSON line on stdout: the result, or a readiness line for servers and holders.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_io::runtime::{self, DriverChoice};
use perf::{gen, tls_baseline};

#[derive(Parser)]
#[command(about = "Thread-per-core load generator for the mesh lab")]
struct Args {
    /// I/O driver: auto (io_uring where allowed), io-uring or epoll.
    #[arg(long, default_value = "auto", global = true)]
    driver: DriverChoice,
    #[command(subcommand)]
    command: Cmd,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo and sink servers, one SO_REUSEPORT listener per thread, until killed.
    Serve {
        #[arg(long, default_value_t = perf::lab::ECHO_PORT)]
        echo: u16,
        #[arg(long, default_value_t = perf::lab::SINK_PORT)]
        sink: u16,
        #[arg(long, default_value_t = cores())]
        threads: usize,
    },
    /// Plain TCP relays (the floor of any proxy in the path), one SO_REUSEPORT listener per
    /// route and thread, until killed.
    Relay {
        /// `PORT=ADDRESS`: connections to PORT are relayed to ADDRESS (repeatable).
        #[arg(long = "route", value_parser = parse_route, required = true)]
        routes: Vec<(u16, SocketAddr)>,
        #[arg(long, default_value_t = cores())]
        threads: usize,
    },
    /// A plain TLS 1.3 sink (the crypto reference), until killed.
    TlsServe {
        #[arg(long, default_value_t = perf::lab::TLS_SINK_PORT)]
        port: u16,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Bulk streams to a sink.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// One plain TLS stream to a TLS sink, trusting `ca`.
    TlsBulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Open-loop request/response at a fixed offered rate; latency from intended send times.
    Rate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000.0)]
        rps: f64,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
    },
    /// New connections back to back (connect, one byte each way, close) on `threads` threads.
    Conns {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Open and hold connections to an echo server; prints a line when all are open and
    /// holds them until stdin closes.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
}

fn parse_route(route: &str) -> Result<(u16, SocketAddr), String> {
    let (port, to) = route
        .split_once('=')
        .ok_or_else(|| format!("{route:?} is not PORT=ADDRESS"))?;
    let port = port
        .parse()
        .map_err(|e| format!("port {port:?} in {route:?}: {e}"))?;
    let to = to
        .parse()
        .map_err(|e| format!("address {to:?} in {route:?}: {e}"))?;
    Ok((port, to))
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let driver = runtime::resolve(args.driver).map_err(anyhow::Error::msg)?;
    // Held and proxied connections need far more descriptors than the default soft limit.
    mesh_io::sockets::raise_nofile_limit()?;
    let secs = Duration::from_secs_f64;
    let result = match args.command {
        Cmd::Serve {
            echo,
            sink,
            threads,
        } => {
            gen::serve(driver, threads, echo, sink, |echo, sink| {
                print_line(&format!(
                    "{{\"serving\":true,\"driver\":\"{}\",\"echo\":{echo},\"sink\":{sink}}}",
                    driver.name()
                ))
            })?;
            return Ok(());
        }
        Cmd::Relay { routes, threads } => {
            // The data plane's heap (freed buffers kept, not unmapped), so the floor does not
            // pay an mmap and munmap per connection for its buffers where the data plane
            // would not.
            runtime::MallocPolicy::default().apply()?;
            gen::relay(driver, threads, &routes, |ports| {
                print_line(&format!(
                    "{{\"relaying\":true,\"driver\":\"{}\",\"ports\":{ports:?}}}",
                    driver.name()
                ))
            })?;
            return Ok(());
        }
        Cmd::TlsServe { port, cert, key } => {
            tls_baseline::serve(port, &cert, &key, |port| {
                print_line(&format!("{{\"serving\":true,\"port\":{port}}}"))
            })?;
            return Ok(());
        }
        Cmd::Bulk {
            to,
            connections,
            threads,
            seconds,
        } => serde_json::to_string(&gen::bulk(driver, to, connections, threads, secs(seconds))?)?,
        Cmd::TlsBulk { to, ca, seconds } => {
            serde_json::to_string(&tls_baseline::bulk(to, &ca, secs(seconds))?)?
        }
        Cmd::Rate {
            to,
            rps,
            connections,
            threads,
            size,
            seconds,
            warmup,
        } => serde_json::to_string(&gen::rate(
            driver,
            to,
            gen::RateSpec {
                rps,
                connections,
                threads,
                size,
                warmup: secs(warmup),
                duration: secs(seconds),
            },
        )?)?,
        Cmd::Conns {
            to,
            threads,
            seconds,
        } => serde_json::to_string(&gen::connection_rate(driver, to, threads, secs(seconds))?)?,
        Cmd::Hold { to, count } => {
            gen::hold(driver, to, count, || {
                print_line(&format!("{{\"held\":{count}}}"));
                // Hold until the parent closes our stdin.
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
            })?;
            return Ok(());
        }
    };
    print_line(&result);
    Ok(())
}
