//! The policy routing that brings an application's replies back to the data plane when the
//! data plane connected to it from the client's address (see `mesh_core::redirect`): in the
//! calling thread's network namespace, for IPv4 and IPv6, a rule sending packets marked
//! [`ORIGINAL_SOURCE_MARK`] to table [`ORIGINAL_SOURCE_TABLE`], and there a route that makes
//! every address local (`ip rule add fwmark 0x111/0xfff pref 32764 lookup 100`,
//! `ip route add local default dev lo table 100`).
//!
//! Spoken over rtnetlink directly, so neither process needs `ip` in its image.

use std::io;
use std::mem::MaybeUninit;

use mesh_core::redirect::{
    MARK_MASK, ORIGINAL_SOURCE_MARK, ORIGINAL_SOURCE_RULE_PRIORITY, ORIGINAL_SOURCE_TABLE,
};
use socket2::{Domain, Protocol, Socket, Type};

const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];
const NLMSG_HEADER: usize = 16;
/// `struct fib_rule_hdr` and `struct rtmsg` are both 12 bytes.
const BODY: usize = 12;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
/// The loopback device is always the first in a network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// Adds the rule and the route in both families; what is already there stays.
pub fn install() -> io::Result<()> {
    let netlink = Netlink::open()?;
    for family in FAMILIES {
        netlink
            .ask(&route(family, libc::RTM_NEWROUTE, CREATE), &[libc::EEXIST])
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENETDOWN) => io::Error::new(e.kind(), format!("loopback is down: {e}")),
                _ => e,
            })?;
        netlink.ask(&rule(family, libc::RTM_NEWRULE, CREATE), &[libc::EEXIST])?;
    }
    Ok(())
}

/// Removes the rule and the route in both families; harmless if they are not there.
pub fn remove() -> io::Result<()> {
    let netlink = Netlink::open()?;
    for family in FAMILIES {
        netlink.ask(&rule(family, libc::RTM_DELRULE, 0), &[libc::ENOENT])?;
        netlink.ask(
            &route(family, libc::RTM_DELROUTE, 0),
            &[libc::ESRCH, libc::ENOENT],
        )?;
    }
    Ok(())
}

/// Whether the rule and the route are both in place, in both families.
pub fn installed() -> io::Result<bool> {
    let netlink = Netlink::open()?;
    for family in FAMILIES {
        let rules = netlink.dump(&request(libc::RTM_GETRULE, DUMP, &body(family)))?;
        if !rules.iter().any(|m| is_our_rule(m)) {
            return Ok(false);
        }
        let routes = netlink.dump(&request(libc::RTM_GETROUTE, DUMP, &body(family)))?;
        if !routes.iter().any(|m| is_our_route(m)) {
            return Ok(false);
        }
    }
    Ok(true)
}

const CREATE: u16 = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
const DUMP: u16 = libc::NLM_F_DUMP as u16;

/// `fib_rule_hdr` or `rtmsg` with only the family set.
fn body(family: u8) -> [u8; BODY] {
    let mut body = [0u8; BODY];
    body[0] = family;
    body
}

fn rule(family: u8, kind: u16, flags: u16) -> Vec<u8> {
    let mut hdr = body(family);
    hdr[4] = ORIGINAL_SOURCE_TABLE;
    hdr[7] = FR_ACT_TO_TBL;
    let mut message = request(kind, flags, &hdr);
    attribute(&mut message, FRA_PRIORITY, ORIGINAL_SOURCE_RULE_PRIORITY);
    attribute(&mut message, FRA_FWMARK, ORIGINAL_SOURCE_MARK);
    attribute(&mut message, FRA_FWMASK, MARK_MASK);
    attribute(&mut message, FRA_TABLE, u32::from(ORIGINAL_SOURCE_TABLE));
    message
}

fn route(family: u8, kind: u16, flags: u16) -> Vec<u8> {
    let mut msg = body(family);
    // dst_len 0: the default route.
    msg[4] = ORIGINAL_SOURCE_TABLE;
    msg[5] = libc::RTPROT_BOOT;
    msg[6] = libc::RT_SCOPE_HOST;
    msg[7] = libc::RTN_LOCAL;
    let mut message = request(kind, flags, &msg);
    attribute(&mut message, RTA_TABLE, u32::from(ORIGINAL_SOURCE_TABLE));
    attribute(&mut message, RTA_OIF, LOOPBACK_INDEX);
    message
}

fn request(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&0u32.to_ne_bytes()); // length, set as attributes are added
    message.extend_from_slice(&kind.to_ne_bytes());
    let flags = flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence: one request at a time
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    message.extend_from_slice(body);
    set_length(&mut message);
    message
}

fn attribute(message: &mut Vec<u8>, kind: u16, value: u32) {
    message.extend_from_slice(&8u16.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&value.to_ne_bytes());
    set_length(message);
}

fn set_length(message: &mut [u8]) {
    let length = message.len() as u32;
    message[..4].copy_from_slice(&length.to_ne_bytes());
}

/// The u32 attributes after a message's 12-byte body, by type.
fn attributes(payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload.get(BODY..).unwrap_or_default();
    std::iter::from_fn(move || {
        let length = usize::from(u16::from_ne_bytes([*rest.first()?, *rest.get(1)?]));
        let kind = u16::from_ne_bytes([*rest.get(2)?, *rest.get(3)?]);
        let value = rest.get(4..length)?;
        rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}

fn u32_attribute(payload: &[u8], kind: u16) -> Option<u32> {
    attributes(payload)
        .find(|(k, _)| *k == kind)
        .and_then(|(_, v)| Some(u32::from_ne_bytes(v.try_into().ok()?)))
}

/// A rule dumped by the kernel (its payload after the netlink header) is ours.
fn is_our_rule(payload: &[u8]) -> bool {
    let table = u32_attribute(payload, FRA_TABLE).or_else(|| payload.get(4).map(|&t| u32::from(t)));
    payload.get(7) == Some(&FR_ACT_TO_TBL)
        && table == Some(u32::from(ORIGINAL_SOURCE_TABLE))
        && u32_attribute(payload, FRA_FWMARK) == Some(ORIGINAL_SOURCE_MARK)
        && u32_attribute(payload, FRA_FWMASK) == Some(MARK_MASK)
}

/// A route dumped by the kernel is the local default route of our table, through loopback.
fn is_our_route(payload: &[u8]) -> bool {
    let table = u32_attribute(payload, RTA_TABLE).or_else(|| payload.get(4).map(|&t| u32::from(t)));
    payload.get(1) == Some(&0)
        && payload.get(7) == Some(&libc::RTN_LOCAL)
        && table == Some(u32::from(ORIGINAL_SOURCE_TABLE))
        && u32_attribute(payload, RTA_OIF) == Some(LOOPBACK_INDEX)
}

struct Netlink(Socket);

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW.cloexec(),
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        Ok(Netlink(socket))
    }

    /// Sends one change and waits for its acknowledgement; `tolerated` errors count as done.
    fn ask(&self, message: &[u8], tolerated: &[i32]) -> io::Result<()> {
        self.0.send(message)?;
        let mut outcome = None;
        self.read_until(|kind, payload| {
            if kind == libc::NLMSG_ERROR as u16 {
                outcome = Some(error_code(payload));
                return true;
            }
            false
        })?;
        match outcome {
            Some(0) => Ok(()),
            Some(errno) if tolerated.contains(&errno) => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Err(io::Error::other("netlink: no acknowledgement")),
        }
    }

    /// Sends a dump request and collects the payloads of what comes back.
    fn dump(&self, message: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.0.send(message)?;
        let mut found = Vec::new();
        let mut failed = None;
        self.read_until(|kind, payload| match kind as i32 {
            libc::NLMSG_DONE => true,
            libc::NLMSG_ERROR => {
                let errno = error_code(payload);
                if errno != 0 {
                    failed = Some(errno);
                }
                true
            }
            _ => {
                found.push(payload.to_vec());
                false
            }
        })?;
        match failed {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(found),
        }
    }

    /// Reads messages, handing each (type, payload) to `done` until it says so.
    fn read_until(&self, mut done: impl FnMut(u16, &[u8]) -> bool) -> io::Result<()> {
        let mut buffer = vec![MaybeUninit::<u8>::uninit(); 32 * 1024];
        loop {
            let read = self.0.recv(&mut buffer)?;
            // SAFETY: recv initialised the first `read` bytes.
            #[allow(unsafe_code)]
            let bytes = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), read) };
            let mut rest = bytes;
            while rest.len() >= NLMSG_HEADER {
                let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let Some(payload) = rest.get(NLMSG_HEADER..length) else {
                    return Err(io::Error::other("netlink: truncated message"));
                };
                if done(kind, payload) {
                    return Ok(());
                }
                rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
            }
        }
    }
}

/// The errno of an `NLMSG_ERROR` (0 for an acknowledgement), positive.
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(libc::EBADMSG, |b| -i32::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NetNs;

    #[test]
    fn a_rule_request_reads_back_as_ours_and_a_neighbour_does_not() {
        let ours = rule(libc::AF_INET as u8, libc::RTM_NEWRULE, CREATE);
        assert_eq!(ours.len(), NLMSG_HEADER + BODY + 4 * 8);
        assert!(is_our_rule(&ours[NLMSG_HEADER..]));
        let mut other_mark = ours.clone();
        let at = other_mark.len() - 3 * 8 + 4; // the fwmark's value
        other_mark[at..at + 4].copy_from_slice(&0x222u32.to_ne_bytes());
        assert!(!is_our_rule(&other_mark[NLMSG_HEADER..]));
        let route = route(libc::AF_INET6 as u8, libc::RTM_NEWROUTE, CREATE);
        assert!(is_our_route(&route[NLMSG_HEADER..]));
        assert!(!is_our_rule(&route[NLMSG_HEADER..]));
    }

    /// The real kernel: a network namespace of its own (root, as in CI), compared with what
    /// `ip` (iproute2) lists.
    #[test]
    fn installs_checks_and_removes_the_rule_and_route_in_a_fresh_namespace() {
        let name = format!("meshdp-routing-{}", std::process::id());
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip (iproute2) runs");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(&["netns", "add", &name]);
        // As the runtime leaves a pod's namespace: a local route needs its device up.
        run(&["-n", &name, "link", "set", "lo", "up"]);
        let result = std::panic::catch_unwind(|| {
            let netns = NetNs::open(format!("/run/netns/{name}")).expect("netns");
            let home = NetNs::current().expect("own netns");
            let inside = |f: fn() -> io::Result<bool>| {
                netns.run_in(&home, f).expect("enter").expect("netlink")
            };
            assert!(!inside(installed), "a fresh namespace has no such rule");
            for _ in 0..2 {
                inside(|| install().map(|()| true));
            }
            assert!(inside(installed));
            let exec = |args: &[&str]| {
                let mut full = vec!["netns", "exec", &name, "ip"];
                full.extend_from_slice(args);
                run(&full)
            };
            for family in ["-4", "-6"] {
                let rules = exec(&[family, "rule", "show"]);
                assert!(
                    rules.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
                    "{family} rules: {rules}"
                );
                let routes = exec(&[family, "route", "show", "table", "100"]);
                assert!(
                    routes.contains("local default dev lo"),
                    "{family} routes: {routes}"
                );
            }
            // Someone deletes the v6 rule: no longer complete.
            exec(&["-6", "rule", "del", "pref", "32764"]);
            assert!(!inside(installed));
            for _ in 0..2 {
                inside(|| remove().map(|()| true));
            }
            assert!(!exec(&["-4", "rule", "show"]).contains("fwmark 0x111"));
            assert_eq!(exec(&["-4", "route", "show", "table", "100"]).trim(), "");
        });
        run(&["netns", "del", &name]);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
