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

/// The families whose replies the pod's namespace routes back to the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routed {
    pub v4: bool,
    pub v6: bool,
}

impl Routed {
    /// Whether replies to a client at `ip` come back to the data plane.
    pub fn covers(self, ip: std::net::IpAddr) -> bool {
        if ip.is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }

    fn set(&mut self, family: u8, value: bool) {
        if family == V4 {
            self.v4 = value;
        } else {
            self.v6 = value;
        }
    }
}

const V4: u8 = libc::AF_INET as u8;
const V6: u8 = libc::AF_INET6 as u8;

/// Adds the rule and the route, per family; what is already there stays, and a foreign
/// default route in our table is replaced. IPv6 is left out where the namespace's loopback
/// has none (the kernel would refuse it). Capture does not depend on this: where a family
/// could not be added (said in the error), the data plane connects from the pod's own
/// address.
pub fn install() -> io::Result<Routed> {
    let netlink = Netlink::open()?;
    let mut routed = Routed::default();
    let mut failures = Vec::new();
    for family in families() {
        let added = netlink
            .ask(&route(family, libc::RTM_NEWROUTE, REPLACE), &[])
            .and_then(|()| netlink.ask(&rule(family, libc::RTM_NEWRULE, CREATE), &[libc::EEXIST]));
        match added {
            Ok(()) => routed.set(family, true),
            Err(e) => {
                let name = if family == V4 { "IPv4" } else { "IPv6" };
                let hint = if e.raw_os_error() == Some(libc::ENETDOWN) {
                    " (the pod's loopback is down)"
                } else {
                    ""
                };
                failures.push(format!("{name}: {e}{hint}"));
            }
        }
    }
    if failures.is_empty() {
        Ok(routed)
    } else {
        Err(io::Error::other(failures.join("; ")))
    }
}

/// Removes the rule and the route in both families; harmless if they are not there. Tries
/// everything, and reports the first failure.
pub fn remove() -> io::Result<()> {
    let netlink = Netlink::open()?;
    let mut first = None;
    for family in [V4, V6] {
        let rule = netlink.ask(
            &rule(family, libc::RTM_DELRULE, 0),
            &[libc::ENOENT, libc::EAFNOSUPPORT],
        );
        let route = netlink.ask(
            &route(family, libc::RTM_DELROUTE, 0),
            &[libc::ESRCH, libc::ENOENT, libc::EAFNOSUPPORT],
        );
        first = first.or(rule.err()).or(route.err());
    }
    first.map_or(Ok(()), Err)
}

/// The families that have both the rule and the route in place.
pub fn installed() -> io::Result<Routed> {
    let netlink = Netlink::open()?;
    let mut routed = Routed::default();
    for family in families() {
        let rules = netlink.dump(&request(libc::RTM_GETRULE, DUMP, &body(family)))?;
        let routes = netlink.dump(&request(libc::RTM_GETROUTE, DUMP, &body(family)))?;
        routed.set(
            family,
            rules.iter().any(|m| is_our_rule(m, family))
                && routes.iter().any(|m| is_our_route(m, family)),
        );
    }
    Ok(routed)
}

/// IPv4, and IPv6 where the calling thread's namespace has it on its loopback.
fn families() -> Vec<u8> {
    let v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0");
    if v6 {
        vec![V4, V6]
    } else {
        vec![V4]
    }
}

const CREATE: u16 = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
const REPLACE: u16 = (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
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

/// A rule dumped by the kernel (its payload after the netlink header) is ours, of `family`
/// (a kernel without a family answers a dump as if for all of them).
fn is_our_rule(payload: &[u8], family: u8) -> bool {
    let table = u32_attribute(payload, FRA_TABLE).or_else(|| payload.get(4).map(|&t| u32::from(t)));
    payload.first() == Some(&family)
        && payload.get(7) == Some(&FR_ACT_TO_TBL)
        && table == Some(u32::from(ORIGINAL_SOURCE_TABLE))
        && u32_attribute(payload, FRA_FWMARK) == Some(ORIGINAL_SOURCE_MARK)
        && u32_attribute(payload, FRA_FWMASK) == Some(MARK_MASK)
}

/// A route dumped by the kernel is the local default route of our table, through loopback,
/// of `family`.
fn is_our_route(payload: &[u8], family: u8) -> bool {
    let table = u32_attribute(payload, RTA_TABLE).or_else(|| payload.get(4).map(|&t| u32::from(t)));
    payload.first() == Some(&family)
        && payload.get(1) == Some(&0)
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
        let ours = rule(V4, libc::RTM_NEWRULE, CREATE);
        assert_eq!(ours.len(), NLMSG_HEADER + BODY + 4 * 8);
        assert!(is_our_rule(&ours[NLMSG_HEADER..], V4));
        assert!(!is_our_rule(&ours[NLMSG_HEADER..], V6), "another family's");
        let mut other_mark = ours.clone();
        let at = other_mark.len() - 3 * 8 + 4; // the fwmark's value
        other_mark[at..at + 4].copy_from_slice(&0x222u32.to_ne_bytes());
        assert!(!is_our_rule(&other_mark[NLMSG_HEADER..], V4));
        let route = route(V6, libc::RTM_NEWROUTE, REPLACE);
        assert!(is_our_route(&route[NLMSG_HEADER..], V6));
        assert!(!is_our_route(&route[NLMSG_HEADER..], V4));
        assert!(!is_our_rule(&route[NLMSG_HEADER..], V6));
    }

    /// A namespace of its own (`ip netns add`: root, as in CI), removed afterwards.
    struct Scratch {
        name: String,
        netns: NetNs,
        home: NetNs,
    }

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let name = format!("meshdp-routing-{tag}-{}", std::process::id());
            ip(&["netns", "add", &name]);
            let netns = NetNs::open(format!("/run/netns/{name}")).expect("netns");
            Scratch {
                name,
                netns,
                home: NetNs::current().expect("own netns"),
            }
        }

        fn inside<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
            self.netns.run_in(&self.home, f).expect("enter")
        }

        /// `ip` inside the namespace.
        fn ip(&self, args: &[&str]) -> String {
            let mut full = vec!["-n", &self.name];
            full.extend_from_slice(args);
            ip(&full)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip (iproute2) runs");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    const BOTH: Routed = Routed { v4: true, v6: true };

    /// The real kernel, compared with what `ip` (iproute2) lists.
    #[test]
    fn installs_checks_and_removes_the_rule_and_route_in_a_fresh_namespace() {
        let ns = Scratch::new("both");
        // As the runtime leaves a pod's namespace: a local route needs its device up.
        ns.ip(&["link", "set", "lo", "up"]);
        assert_eq!(ns.inside(installed).expect("dump"), Routed::default());
        for _ in 0..2 {
            assert_eq!(ns.inside(install).expect("install"), BOTH);
        }
        assert_eq!(ns.inside(installed).expect("dump"), BOTH);
        for family in ["-4", "-6"] {
            let rules = ns.ip(&[family, "rule", "show"]);
            assert!(
                rules.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
                "{family} rules: {rules}"
            );
            let routes = ns.ip(&[family, "route", "show", "table", "100"]);
            assert!(
                routes.contains("local default dev lo"),
                "{family} routes: {routes}"
            );
        }
        // Someone deletes the v6 rule: only v4 is complete.
        ns.ip(&["-6", "rule", "del", "pref", "32764"]);
        let v4_only = Routed {
            v4: true,
            v6: false,
        };
        assert_eq!(ns.inside(installed).expect("dump"), v4_only);
        for _ in 0..2 {
            ns.inside(remove).expect("remove");
        }
        assert!(!ns.ip(&["-4", "rule", "show"]).contains("fwmark 0x111"));
        assert_eq!(ns.ip(&["-4", "route", "show", "table", "100"]).trim(), "");
        assert_eq!(ns.inside(installed).expect("dump"), Routed::default());
    }

    #[test]
    fn a_namespace_without_ipv6_gets_ipv4_and_a_down_loopback_is_named() {
        let ns = Scratch::new("v4");
        // Down loopback (a runtime that brings it up concurrently with the chain): nothing
        // can be routed to it yet, and the error says why.
        let down = ns.inside(install).expect_err("loopback down");
        assert!(down.to_string().contains("loopback is down"), "{down}");
        ns.ip(&["link", "set", "lo", "up"]);
        ns.inside(|| std::fs::write("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "1"))
            .expect("disable IPv6 on lo");
        let v4_only = Routed {
            v4: true,
            v6: false,
        };
        assert_eq!(ns.inside(install).expect("IPv4 only"), v4_only);
        assert_eq!(ns.inside(installed).expect("dump"), v4_only);
        ns.inside(remove).expect("remove");
        assert_eq!(ns.inside(installed).expect("dump"), Routed::default());
    }
}
