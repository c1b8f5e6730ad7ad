//! A complete snapshot read in place.
//!
//! Workloads and services are nearly all of a snapshot's bytes. Decoding them with prost gives
//! every string its own allocation, about ten per workload, which the index build then copies
//! or drops. At 100k workloads those allocations and frees were a third of a full adopt in a
//! profile (the same-run ratios are in bench-results/README.md). Here they are parsed as views
//! whose strings borrow the payload, so the build allocates only what the index keeps. Every
//! other field is small and goes through prost.
//!
//! The reader accepts exactly what prost accepts, with the same meaning: the same wire-type,
//! varint, length, UTF-8 and recursion checks, the last of a repeated singular field wins,
//! unknown fields (groups too) are skipped. Tests compare the two on every truncation and
//! byte change of a sample, and a fuzz target on any input.

use std::collections::BTreeMap;

use prost::Message;
use smallvec::SmallVec;

use crate::schema::{self, DecodeError, Snapshot, SCHEMA_VERSION};

/// prost's default nesting budget: a message or group deeper than this is refused.
const RECURSION_LIMIT: u32 = 100;

/// Snapshot field numbers read in place (see `schema::Snapshot`).
const WORKLOADS: u32 = 3;
const SERVICES: u32 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wire {
    Varint,
    SixtyFourBit,
    LengthDelimited,
    StartGroup,
    EndGroup,
    ThirtyTwoBit,
}

fn malformed(problem: &'static str) -> DecodeError {
    DecodeError::Malformed(problem)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (count, &byte) in self.buf.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (count * 7);
            if byte < 0x80 {
                // The tenth byte may only carry the top bit of a u64.
                if count == 9 && byte >= 0x02 {
                    break;
                }
                self.buf = &self.buf[count + 1..];
                return Ok(value);
            }
        }
        Err(malformed("invalid varint"))
    }

    fn key(&mut self) -> Result<(u32, Wire), DecodeError> {
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| malformed("invalid key value"))?;
        let wire = match key & 7 {
            0 => Wire::Varint,
            1 => Wire::SixtyFourBit,
            2 => Wire::LengthDelimited,
            3 => Wire::StartGroup,
            4 => Wire::EndGroup,
            5 => Wire::ThirtyTwoBit,
            _ => return Err(malformed("invalid wire type value")),
        };
        let tag = key >> 3;
        if tag == 0 {
            return Err(malformed("invalid tag value: 0"));
        }
        Ok((tag, wire))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= self.buf.len())
            .ok_or_else(|| malformed("buffer underflow"))?;
        let (taken, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(taken)
    }

    fn bytes(&mut self, wire: Wire) -> Result<&'a [u8], DecodeError> {
        expect(wire, Wire::LengthDelimited)?;
        let len = self.varint()?;
        self.take(len)
    }

    fn string(&mut self, wire: Wire) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(wire)?)
            .map_err(|_| malformed("invalid string value: data is not UTF-8 encoded"))
    }

    fn number(&mut self, wire: Wire) -> Result<u64, DecodeError> {
        expect(wire, Wire::Varint)?;
        self.varint()
    }

    /// An embedded message's bytes, after the nesting check prost makes before entering it.
    fn message(&mut self, wire: Wire, budget: u32) -> Result<Reader<'a>, DecodeError> {
        if budget == 0 {
            return Err(malformed("recursion limit reached"));
        }
        Ok(Reader::new(self.bytes(wire)?))
    }

    /// Skips an unknown field, nested groups included.
    fn skip(&mut self, tag: u32, wire: Wire, budget: u32) -> Result<(), DecodeError> {
        if budget == 0 {
            return Err(malformed("recursion limit reached"));
        }
        match wire {
            Wire::Varint => {
                self.varint()?;
            }
            Wire::SixtyFourBit => {
                self.take(8)?;
            }
            Wire::ThirtyTwoBit => {
                self.take(4)?;
            }
            Wire::LengthDelimited => {
                let len = self.varint()?;
                self.take(len)?;
            }
            Wire::StartGroup => loop {
                let (inner, inner_wire) = self.key()?;
                if inner_wire == Wire::EndGroup {
                    if inner != tag {
                        return Err(malformed("unexpected end group tag"));
                    }
                    break;
                }
                self.skip(inner, inner_wire, budget - 1)?;
            },
            Wire::EndGroup => return Err(malformed("unexpected end group tag")),
        }
        Ok(())
    }
}

fn expect(found: Wire, wanted: Wire) -> Result<(), DecodeError> {
    if found == wanted {
        Ok(())
    } else {
        Err(malformed("invalid wire type"))
    }
}

/// A complete snapshot whose workloads and services are read in place from its payload.
pub struct SnapshotView<'a> {
    /// Every other field, decoded by prost (workloads and services left empty).
    pub rest: Snapshot,
    workloads: Vec<&'a [u8]>,
    services: Vec<&'a [u8]>,
}

impl<'a> SnapshotView<'a> {
    /// Splits the payload's top level and checks the schema version. The workloads and
    /// services are checked as they are read: a caller that reads all of them has checked
    /// everything prost would have.
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(payload);
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        // The other fields, in their order, make a smaller snapshot that prost decodes.
        let mut rest = Vec::new();
        while !reader.is_empty() {
            let field = reader.buf;
            let (tag, wire) = reader.key()?;
            match tag {
                WORKLOADS => workloads.push(reader.message(wire, RECURSION_LIMIT)?.buf),
                SERVICES => services.push(reader.message(wire, RECURSION_LIMIT)?.buf),
                _ => {
                    reader.skip(tag, wire, RECURSION_LIMIT)?;
                    rest.extend_from_slice(&field[..field.len() - reader.buf.len()]);
                }
            }
        }
        let rest = Snapshot::decode(rest.as_slice())?;
        if rest.schema_version != SCHEMA_VERSION {
            return Err(DecodeError::Version {
                found: rest.schema_version,
            });
        }
        Ok(SnapshotView {
            rest,
            workloads,
            services,
        })
    }

    pub fn workloads(
        &self,
    ) -> impl ExactSizeIterator<Item = Result<WorkloadView<'a>, DecodeError>> + '_ {
        self.workloads
            .iter()
            .map(|bytes| WorkloadView::parse(bytes))
    }

    /// The workloads in `parts` consecutive runs of nearly equal length (fewer when there are
    /// fewer workloads), in order: for reading them on several threads.
    pub fn workload_parts(
        &self,
        parts: usize,
    ) -> impl Iterator<
        Item = impl ExactSizeIterator<Item = Result<WorkloadView<'a>, DecodeError>> + Send + '_,
    > + '_ {
        runs(&self.workloads, parts).map(|run| run.iter().map(|bytes| WorkloadView::parse(bytes)))
    }

    pub fn services(
        &self,
    ) -> impl ExactSizeIterator<Item = Result<ServiceView<'a>, DecodeError>> + '_ {
        self.services.iter().map(|bytes| ServiceView::parse(bytes))
    }

    /// The services in runs, as [`SnapshotView::workload_parts`].
    pub fn service_parts(
        &self,
        parts: usize,
    ) -> impl Iterator<
        Item = impl ExactSizeIterator<Item = Result<ServiceView<'a>, DecodeError>> + Send + '_,
    > + '_ {
        runs(&self.services, parts).map(|run| run.iter().map(|bytes| ServiceView::parse(bytes)))
    }

    /// Each workload's encoded bytes, in snapshot order, unread.
    pub fn workload_records(&self) -> &[&'a [u8]] {
        &self.workloads
    }

    /// Each service's encoded bytes, in snapshot order, unread.
    pub fn service_records(&self) -> &[&'a [u8]] {
        &self.services
    }
}

/// Reads one workload record (one of [`SnapshotView::workload_records`]).
pub fn workload(record: &[u8]) -> Result<WorkloadView<'_>, DecodeError> {
    WorkloadView::parse(record)
}

/// Reads one service record (one of [`SnapshotView::service_records`]).
pub fn service(record: &[u8]) -> Result<ServiceView<'_>, DecodeError> {
    ServiceView::parse(record)
}

/// A workload record's uid, read without the rest: the last value of field 1, as a full
/// read gives it. Other fields are skipped unchecked, so a record this accepts may still be
/// refused by [`workload`].
pub fn workload_uid(record: &[u8]) -> Result<&str, DecodeError> {
    let [uid] = strings_in(record, [1])?;
    Ok(uid)
}

/// A service record's namespace and name (fields 2 and 1), read as [`workload_uid`] reads.
pub fn service_namespace_name(record: &[u8]) -> Result<(&str, &str), DecodeError> {
    let [namespace, name] = strings_in(record, [2, 1])?;
    Ok((namespace, name))
}

/// The last value of each string field `tags` names in a message, empty where absent.
fn strings_in<const N: usize>(record: &[u8], tags: [u32; N]) -> Result<[&str; N], DecodeError> {
    let mut found = [""; N];
    let mut reader = Reader::new(record);
    while !reader.is_empty() {
        let (tag, wire) = reader.key()?;
        match tags.iter().position(|t| *t == tag) {
            Some(at) => found[at] = reader.string(wire)?,
            None => reader.skip(tag, wire, RECURSION_LIMIT - 1)?,
        }
    }
    Ok(found)
}

/// `records` in `parts` consecutive runs of nearly equal length.
fn runs<'s, 'a>(records: &'s [&'a [u8]], parts: usize) -> std::slice::Chunks<'s, &'a [u8]> {
    records.chunks(records.len().div_ceil(parts.max(1)).max(1))
}

/// `schema::Workload` with borrowed strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadView<'a> {
    pub uid: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub trust_domain: &'a str,
    pub ips: SmallVec<[&'a [u8]; 2]>,
    pub node: &'a str,
    pub protocol: i32,
    pub waypoint: &'a str,
    pub netns_path: &'a str,
    /// In wire order; a key listed twice means its last value, as in a protobuf map.
    labels: Vec<(&'a str, &'a str)>,
    pub netns_from_agent: bool,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
    /// As sent; read through [`WorkloadView::workload_name`], which falls back to the name.
    workload_name: &'a str,
    pub unresolved_waypoint: &'a str,
    /// The encoded workload this view reads; empty for a view of a decoded one.
    pub record: &'a [u8],
}

impl<'a> WorkloadView<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        // Inside a snapshot's repeated field: one level down.
        const BUDGET: u32 = RECURSION_LIMIT - 1;
        let mut reader = Reader::new(bytes);
        let mut w = WorkloadView {
            record: bytes,
            ..WorkloadView::default()
        };
        while !reader.is_empty() {
            let (tag, wire) = reader.key()?;
            match tag {
                1 => w.uid = reader.string(wire)?,
                2 => w.name = reader.string(wire)?,
                3 => w.namespace = reader.string(wire)?,
                4 => w.service_account = reader.string(wire)?,
                5 => w.trust_domain = reader.string(wire)?,
                6 => w.ips.push(reader.bytes(wire)?),
                7 => w.node = reader.string(wire)?,
                // int32 and enum fields keep the low 32 bits, as prost does.
                8 => w.protocol = reader.number(wire)? as i32,
                9 => w.waypoint = reader.string(wire)?,
                10 => w.netns_path = reader.string(wire)?,
                11 => w
                    .labels
                    .push(map_entry(reader.message(wire, BUDGET)?, BUDGET - 1)?),
                12 => w.netns_from_agent = reader.number(wire)? != 0,
                13 => w.canonical_service = reader.string(wire)?,
                14 => w.canonical_revision = reader.string(wire)?,
                15 => w.workload_name = reader.string(wire)?,
                16 => w.unresolved_waypoint = reader.string(wire)?,
                _ => reader.skip(tag, wire, BUDGET)?,
            }
        }
        Ok(w)
    }

    /// Istio's workload name (metric labels): the agent's, or the pod's name in a snapshot
    /// from an agent that sent none.
    pub fn workload_name(&self) -> &'a str {
        if self.workload_name.is_empty() {
            self.name
        } else {
            self.workload_name
        }
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        for (key, value) in &self.labels {
            labels.insert((*key).to_owned(), (*value).to_owned());
        }
        labels
    }
}

impl<'a> From<&'a schema::Workload> for WorkloadView<'a> {
    fn from(w: &'a schema::Workload) -> Self {
        WorkloadView {
            uid: &w.uid,
            name: &w.name,
            namespace: &w.namespace,
            service_account: &w.service_account,
            trust_domain: &w.trust_domain,
            ips: w.ips.iter().map(Vec::as_slice).collect(),
            node: &w.node,
            protocol: w.protocol,
            waypoint: &w.waypoint,
            netns_path: &w.netns_path,
            labels: w
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            netns_from_agent: w.netns_from_agent,
            canonical_service: &w.canonical_service,
            canonical_revision: &w.canonical_revision,
            workload_name: &w.workload_name,
            unresolved_waypoint: &w.unresolved_waypoint,
            record: &[],
        }
    }
}

/// A `map<string, string>` entry; a missing key or value is empty.
fn map_entry<'a>(mut entry: Reader<'a>, budget: u32) -> Result<(&'a str, &'a str), DecodeError> {
    let (mut key, mut value) = ("", "");
    while !entry.is_empty() {
        let (tag, wire) = entry.key()?;
        match tag {
            1 => key = entry.string(wire)?,
            2 => value = entry.string(wire)?,
            _ => entry.skip(tag, wire, budget)?,
        }
    }
    Ok((key, value))
}

/// `schema::Service` with borrowed strings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceView<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub hostname: &'a str,
    pub vips: SmallVec<[&'a [u8]; 1]>,
    pub ports: SmallVec<[schema::ServicePort; 1]>,
    pub endpoints: Vec<&'a str>,
    pub waypoint: &'a str,
    pub unresolved_waypoint: &'a str,
    /// The encoded service this view reads; empty for a view of a decoded one.
    pub record: &'a [u8],
}

impl<'a> ServiceView<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        const BUDGET: u32 = RECURSION_LIMIT - 1;
        let mut reader = Reader::new(bytes);
        let mut s = ServiceView {
            record: bytes,
            ..ServiceView::default()
        };
        while !reader.is_empty() {
            let (tag, wire) = reader.key()?;
            match tag {
                1 => s.name = reader.string(wire)?,
                2 => s.namespace = reader.string(wire)?,
                3 => s.hostname = reader.string(wire)?,
                4 => s.vips.push(reader.bytes(wire)?),
                5 => s
                    .ports
                    .push(service_port(reader.message(wire, BUDGET)?, BUDGET - 1)?),
                6 => s.endpoints.push(reader.string(wire)?),
                7 => s.waypoint = reader.string(wire)?,
                8 => s.unresolved_waypoint = reader.string(wire)?,
                _ => reader.skip(tag, wire, BUDGET)?,
            }
        }
        Ok(s)
    }

    /// The key deltas name the service by.
    pub fn key(&self) -> String {
        crate::delta::namespaced_key(self.namespace, self.name)
    }
}

impl<'a> From<&'a schema::Service> for ServiceView<'a> {
    fn from(s: &'a schema::Service) -> Self {
        ServiceView {
            name: &s.name,
            namespace: &s.namespace,
            hostname: &s.hostname,
            vips: s.vips.iter().map(Vec::as_slice).collect(),
            ports: s.ports.iter().cloned().collect(),
            endpoints: s.endpoints.iter().map(String::as_str).collect(),
            waypoint: &s.waypoint,
            unresolved_waypoint: &s.unresolved_waypoint,
            record: &[],
        }
    }
}

fn service_port(mut port: Reader<'_>, budget: u32) -> Result<schema::ServicePort, DecodeError> {
    let mut p = schema::ServicePort::default();
    while !port.is_empty() {
        let (tag, wire) = port.key()?;
        match tag {
            // uint32 fields keep the low 32 bits, as prost does.
            1 => p.port = port.number(wire)? as u32,
            2 => p.target_port = port.number(wire)? as u32,
            _ => port.skip(tag, wire, budget)?,
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests;
