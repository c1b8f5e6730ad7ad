//! Installing, removing and checking the pod redirect rules (`mesh_core::redirect`) inside a
//! pod's network namespace, with the `nft` tool run from a thread entered into it, and the
//! policy routing that goes with them ([`crate::routing`]).

use std::io::{self, Write};
use std::process::{Child, Command, Stdio};

use mesh_core::redirect;

use crate::netns::NetNs;
use crate::routing;

/// Runs `nft` inside `netns` with `stdin` as its input; `args` e.g. `["-f", "-"]`.
/// Runs `nft` in `netns` (from a thread that enters it), feeding it `stdin`.
pub fn nft_in(netns: &NetNs, args: &[&str], stdin: &str) -> io::Result<String> {
    let home = NetNs::current()?;
    // A child process starts in the namespace of the thread that spawns it.
    let child = netns.run_in(&home, || spawn_nft(args))??;
    finish_nft(child, args, stdin)
}

/// Runs `nft` in the caller's own network namespace (the node's, for the agent's host rules)
/// with `stdin` as its input; its output, or an error carrying what nft printed.
pub fn nft(args: &[&str], stdin: &str) -> io::Result<String> {
    finish_nft(spawn_nft(args)?, args, stdin)
}

fn spawn_nft(args: &[&str]) -> io::Result<Child> {
    Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

fn finish_nft(mut child: Child, args: &[&str], stdin: &str) -> io::Result<String> {
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Installs (or reinstalls) the policy routing, then the capture rules (one nft transaction,
/// replacing what was there). The routing is best effort: where a family cannot have it,
/// the data plane connects from the pod's own address (it checks which families do), so
/// only a failure of the rules fails the capture, and leaves it as it was.
pub fn install(netns: &NetNs) -> io::Result<()> {
    let home = NetNs::current()?;
    if let Err(error) = netns.run_in(&home, routing::install).and_then(|r| r) {
        tracing::warn!(netns = %netns.path(), %error,
            "no policy routing for original sources: applications in this pod see connections from their own address");
    }
    nft_in(netns, &["-f", "-"], &redirect::pod_ruleset()).map(drop)
}

/// Removes the capture rules, then the policy routing (never the other way round: rules
/// without the routing would send the application's replies out of the pod); harmless if
/// they are not there. Both are tried; the first failure is reported.
pub fn remove(netns: &NetNs) -> io::Result<()> {
    let rules = nft_in(netns, &["-f", "-"], &redirect::pod_ruleset_removal()).map(drop);
    let home = NetNs::current()?;
    let routing = netns
        .run_in(&home, routing::remove)
        .and_then(|r| r)
        .map_err(|e| io::Error::new(e.kind(), format!("policy routing: {e}")));
    rules.and(routing)
}

/// Whether the capture is in place: both nat chains, both redirects, the mark exemption and
/// the connection marking. (The policy routing is not capture: without it the data plane
/// connects from the pod's own address.)
pub fn check(netns: &NetNs) -> io::Result<bool> {
    match nft_in(netns, &["list", "table", "inet", redirect::TABLE], "") {
        Ok(listing) => Ok(redirect::ruleset_is_complete(&listing)),
        // No such table.
        Err(_) => Ok(false),
    }
}
