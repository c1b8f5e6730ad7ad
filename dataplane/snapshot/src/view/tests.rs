use super::*;
use crate::schema::{
    AuthorizationPolicy, Identity, PeerAuthentication, Protocol, Service, ServicePort, Workload,
};

/// Every field of a workload and a service set, and some of everything else.
fn sample() -> Snapshot {
    let labelled = Workload {
        uid: "uid-1".into(),
        name: "client-5d4f8c7b9-x2x4z".into(),
        namespace: "default".into(),
        service_account: "client".into(),
        trust_domain: "cluster.local".into(),
        ips: vec![vec![10, 0, 0, 1], vec![0xfd; 16]],
        node: "node-1".into(),
        protocol: Protocol::Tcp as i32,
        waypoint: "10.0.9.9:15008".into(),
        netns_path: "/run/netns/client".into(),
        labels: [("app", "client"), ("version", "v2")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
        netns_from_agent: true,
        canonical_service: "client".into(),
        canonical_revision: "v2".into(),
        workload_name: "client".into(),
        unresolved_waypoint: "waypoint.default.svc.cluster.local".into(),
    };
    let plain = Workload {
        uid: "uid-2".into(),
        name: "server".into(),
        namespace: "prod".into(),
        service_account: "server".into(),
        trust_domain: "cluster.local".into(),
        ips: vec![vec![10, 0, 1, 2]],
        node: "node-2".into(),
        ..Default::default()
    };
    Snapshot {
        schema_version: SCHEMA_VERSION,
        node: "node-1".into(),
        workloads: vec![labelled, plain],
        services: vec![Service {
            name: "server".into(),
            namespace: "prod".into(),
            hostname: "server.prod.svc.cluster.local".into(),
            vips: vec![vec![10, 96, 0, 1], vec![0xfd; 16]],
            ports: vec![
                ServicePort {
                    port: 80,
                    target_port: 8080,
                },
                ServicePort {
                    port: 443,
                    target_port: 0,
                },
            ],
            endpoints: vec!["uid-2".into(), "uid-gone".into()],
            waypoint: "10.0.9.9:15008".into(),
            unresolved_waypoint: "waypoint.prod.svc.cluster.local".into(),
        }],
        policies: vec![AuthorizationPolicy {
            name: "allow".into(),
            namespace: "prod".into(),
            ..Default::default()
        }],
        peer_authentications: vec![PeerAuthentication {
            name: "strict".into(),
            namespace: "prod".into(),
            mode: 2,
            ..Default::default()
        }],
        identities: vec![Identity {
            spiffe_id: "spiffe://cluster.local/ns/default/sa/client".into(),
            cert_chain: vec![vec![0x30, 1, 2]],
            private_key: vec![0x30, 3, 4],
            not_before_unix: 1,
            not_after_unix: 2,
        }],
        trust_roots: vec![vec![0x30, 0x03, 1, 2, 3]],
        source: "test".into(),
        root_namespace: "istio-system".into(),
    }
}

fn owned_workload(w: &WorkloadView<'_>) -> Workload {
    Workload {
        uid: w.uid.into(),
        name: w.name.into(),
        namespace: w.namespace.into(),
        service_account: w.service_account.into(),
        trust_domain: w.trust_domain.into(),
        ips: w.ips.iter().map(|ip| ip.to_vec()).collect(),
        node: w.node.into(),
        protocol: w.protocol,
        waypoint: w.waypoint.into(),
        netns_path: w.netns_path.into(),
        labels: w.labels(),
        netns_from_agent: w.netns_from_agent,
        canonical_service: w.canonical_service.into(),
        canonical_revision: w.canonical_revision.into(),
        // As sent, so that the two readers are compared on the wire's value.
        workload_name: w.workload_name.into(),
        unresolved_waypoint: w.unresolved_waypoint.into(),
    }
}

fn owned_service(s: &ServiceView<'_>) -> Service {
    Service {
        name: s.name.into(),
        namespace: s.namespace.into(),
        hostname: s.hostname.into(),
        vips: s.vips.iter().map(|ip| ip.to_vec()).collect(),
        ports: s.ports.to_vec(),
        endpoints: s.endpoints.iter().map(|uid| (*uid).to_owned()).collect(),
        waypoint: s.waypoint.into(),
        unresolved_waypoint: s.unresolved_waypoint.into(),
    }
}

/// The snapshot a reader that reads every view sees, or the first refusal.
fn read_in_place(payload: &[u8]) -> Result<Snapshot, DecodeError> {
    let view = SnapshotView::decode(payload)?;
    let mut snapshot = view.rest.clone();
    snapshot.workloads = view
        .workloads()
        .map(|w| w.map(|w| owned_workload(&w)))
        .collect::<Result<_, _>>()?;
    snapshot.services = view
        .services()
        .map(|s| s.map(|s| owned_service(&s)))
        .collect::<Result<_, _>>()?;
    Ok(snapshot)
}

/// Both readers accept `payload` and agree on it, or both refuse it.
fn agree(payload: &[u8]) -> bool {
    let prost = schema::decode(payload);
    let in_place = read_in_place(payload);
    match (&prost, &in_place) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{payload:02x?}"),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "prost {:?} but in place {:?} for {payload:02x?}",
            prost.as_ref().err(),
            in_place.as_ref().err()
        ),
    }
    prost.is_ok()
}

/// A length-delimited field.
fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

fn with_workload(extra: &[u8]) -> Vec<u8> {
    let mut payload = crate::encode(&sample());
    let mut w = sample().workloads[1].encode_to_vec();
    w.extend_from_slice(extra);
    payload.extend_from_slice(&field(WORKLOADS, &w));
    payload
}

#[test]
fn a_sample_reads_the_same_in_place_as_through_prost() {
    let payload = crate::encode(&sample());
    assert!(agree(&payload));
    let read = read_in_place(&payload).expect("reads");
    assert_eq!(read.workloads, sample().workloads);
    assert_eq!(read.services, sample().services);
    assert_eq!(read.identities, sample().identities);
}

#[test]
fn a_workload_name_reads_as_sent_and_an_older_agents_empty_one_as_the_pod_name() {
    let payload = crate::encode(&sample());
    let view = SnapshotView::decode(&payload).expect("decodes");
    let names: Vec<(&str, &str)> = view
        .workloads()
        .map(|w| w.map(|w| (w.name, w.workload_name())))
        .collect::<Result<_, _>>()
        .expect("reads");
    assert_eq!(
        names,
        [("client-5d4f8c7b9-x2x4z", "client"), ("server", "server")],
        "the Deployment's name as the agent sent it; the name where it sent none"
    );
    let decoded = schema::decode(&payload).expect("decodes");
    assert_eq!(decoded.workloads[0].workload_name, "client");
    assert_eq!(
        WorkloadView::from(&decoded.workloads[1]).workload_name(),
        "server"
    );
}

#[test]
fn every_truncation_and_byte_change_is_accepted_or_refused_as_prost_does() {
    let payload = crate::encode(&sample());
    let mut accepted = 0;
    for len in 0..payload.len() {
        agree(&payload[..len]);
    }
    for at in 0..payload.len() {
        let original = payload[at];
        for value in [0x00, 0x01, 0x02, 0x07, 0x7f, 0x80, 0xff, original ^ 0x08] {
            let mut changed = payload.clone();
            changed[at] = value;
            accepted += usize::from(agree(&changed));
        }
    }
    // The changes must reach the accepting paths too (string bytes, numbers), not only the
    // refusals.
    assert!(accepted > payload.len(), "only {accepted} accepted");
}

#[test]
fn wire_corners_read_as_prost_reads_them() {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    // A repeated singular string: the last one wins.
    cases.push(("uid twice", field(1, b"uid-3"), true));
    // A label listed twice: the last value wins.
    let mut labels = field(11, &[field(1, b"app"), field(2, b"one")].concat());
    labels.extend(field(11, &[field(1, b"app"), field(2, b"two")].concat()));
    cases.push(("label twice", labels, true));
    // A label entry with neither key nor value, and one with an unknown field.
    cases.push(("empty label", field(11, &[]), true));
    cases.push((
        "label with an unknown field",
        field(11, &[field(1, b"k"), field(9, b"?")].concat()),
        true,
    ));
    // Unknown fields of every wire type.
    let mut unknown = Vec::new();
    encode_key(40, WireType::Varint, &mut unknown);
    encode_varint(u64::MAX, &mut unknown);
    encode_key(41, WireType::SixtyFourBit, &mut unknown);
    unknown.extend([1; 8]);
    encode_key(42, WireType::ThirtyTwoBit, &mut unknown);
    unknown.extend([1; 4]);
    encode_key(43, WireType::StartGroup, &mut unknown);
    encode_key(44, WireType::Varint, &mut unknown);
    unknown.push(5);
    encode_key(43, WireType::EndGroup, &mut unknown);
    cases.push(("unknown fields", unknown, true));
    // A group closed by another field's end.
    let mut crossed = Vec::new();
    encode_key(43, WireType::StartGroup, &mut crossed);
    encode_key(45, WireType::EndGroup, &mut crossed);
    cases.push(("crossed group", crossed, false));
    // A stray end of group.
    let mut stray = Vec::new();
    encode_key(43, WireType::EndGroup, &mut stray);
    cases.push(("stray end group", stray, false));
    // Groups nested as deep as prost allows inside a workload, and one deeper.
    for (depth, ok) in [(99, true), (100, false)] {
        let mut nested = Vec::new();
        for _ in 0..depth {
            encode_key(43, WireType::StartGroup, &mut nested);
        }
        for _ in 0..depth {
            encode_key(43, WireType::EndGroup, &mut nested);
        }
        cases.push(("nested groups", nested, ok));
    }
    // A known field with the wrong wire type.
    let mut wrong = Vec::new();
    encode_key(1, WireType::Varint, &mut wrong);
    wrong.push(1);
    cases.push(("uid as a number", wrong, false));
    // Numbers: a ten-byte varint may carry only the top bit; enums keep the low 32 bits.
    let mut ten = Vec::new();
    encode_key(8, WireType::Varint, &mut ten);
    ten.extend([0xff; 9]);
    ten.push(0x01);
    cases.push(("ten-byte varint", ten.clone(), true));
    *ten.last_mut().expect("a byte") = 0x02;
    cases.push(("overflowing varint", ten, false));
    // A string that is not UTF-8, and one longer than its message.
    cases.push(("not UTF-8", field(2, &[0xc3, 0x28]), false));
    let mut long = Vec::new();
    encode_key(2, WireType::LengthDelimited, &mut long);
    encode_varint(1000, &mut long);
    cases.push(("past the end", long, false));
    // Field number 0.
    cases.push(("tag 0", vec![0x02, 0x00], false));
    for (what, extra, ok) in cases {
        assert_eq!(agree(&with_workload(&extra)), ok, "{what}");
    }
}

#[test]
fn a_snapshot_of_another_schema_version_is_refused() {
    let mut s = sample();
    s.schema_version = SCHEMA_VERSION + 1;
    let payload = s.encode_to_vec();
    assert!(matches!(
        SnapshotView::decode(&payload),
        Err(DecodeError::Version { found }) if found == SCHEMA_VERSION + 1
    ));
}

#[test]
fn a_records_uid_and_service_key_read_alone_are_those_a_full_read_gives() {
    let snapshot = sample();
    let workload = snapshot.workloads[0].encode_to_vec();
    let service = snapshot.services[0].encode_to_vec();
    // The uid listed again at the end: the last one is the workload's, as prost has it.
    let mut relisted = workload.clone();
    relisted.extend_from_slice(&field(1, b"renamed"));
    let mut checked = 0;
    for record in [workload.clone(), relisted] {
        for at in 0..record.len() {
            for value in [0x00, 0x0a, 0x12, 0x7f, 0x80, record[at] ^ 0x01] {
                let mut changed = record.clone();
                changed[at] = value;
                // Whatever a full read accepts, the uid read alone gives the same uid.
                let full = WorkloadView::parse(&changed).map(|w| w.uid.to_owned());
                if let Ok(uid) = full {
                    assert_eq!(
                        workload_uid(&changed).ok(),
                        Some(uid.as_str()),
                        "{changed:02x?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > workload.len(), "only {checked} accepted");
    fn read(record: &[u8]) -> Result<(&str, &str), DecodeError> {
        ServiceView::parse(record).map(|s| (s.namespace, s.name))
    }
    assert_eq!(service_namespace_name(&service).ok(), read(&service).ok());
    let mut renamed = service.clone();
    renamed.extend_from_slice(&field(2, b"other-ns"));
    assert_eq!(
        service_namespace_name(&renamed).ok(),
        Some(("other-ns", snapshot.services[0].name.as_str()))
    );
    assert_eq!(service_namespace_name(&renamed).ok(), read(&renamed).ok());
}
