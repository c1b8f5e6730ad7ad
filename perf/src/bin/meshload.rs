//! `meshload`: the lab's traffic, run as its own process inside a pod's namespace.
//! Prints one JSON result line on stdout.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use clap::{Parser, Subcommand};
use perf::load;

#[derive(Parser)]
#[command(about = "Load generator for the mesh lab")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an echo server and a sink server until killed.
    Serve {
        #[arg(long, default_value_t = perf::lab::ECHO_PORT)]
        echo: u16,
        #[arg(long, default_value_t = perf::lab::SINK_PORT)]
        sink: u16,
    },
    /// One bulk stream to a sink.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Closed-loop request/response latency on one connection to an echo server.
    Rr {
        #[arg(long)]
        to: SocketAddr,
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let connect = |to: SocketAddr| -> std::io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        Ok(s)
    };
    match args.command {
        Cmd::Serve { echo, sink } => {
            let e = load::serve_echo(TcpListener::bind(("0.0.0.0", echo))?)?;
            let _s = load::serve_sink(TcpListener::bind(("0.0.0.0", sink))?)?;
            println!("{{\"serving\":true}}");
            std::io::stdout().flush()?;
            let _ = e.join();
        }
        Cmd::Bulk { to, seconds } => {
            let r = load::bulk(connect(to)?, Duration::from_secs_f64(seconds))?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Rr {
            to,
            size,
            seconds,
            warmup,
        } => {
            let r = load::ping_pong(
                connect(to)?,
                size,
                Duration::from_secs_f64(warmup),
                Duration::from_secs_f64(seconds),
            )?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Conns {
            to,
            threads,
            seconds,
        } => {
            let r =
                load::connection_rate(threads, Duration::from_secs_f64(seconds), || connect(to))?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Hold { to, count } => {
            let held = load::hold(count, || connect(to))?;
            println!("{{\"held\":{}}}", held.len());
            std::io::stdout().flush()?;
            // Hold until the parent closes our stdin.
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
        }
    }
    Ok(())
}
