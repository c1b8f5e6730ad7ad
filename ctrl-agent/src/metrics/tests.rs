use super::*;

/// The value of `series` (name and labels, as written) in Prometheus text.
pub(crate) fn value(text: &str, series: &str) -> f64 {
    mesh_io::stats::series_value(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn publications_certificates_and_refusals_are_scraped_as_they_happened() {
    let metrics = AgentMetrics::default();
    let before = metrics.render(None, false);
    // Nothing published yet: not ready, and no timestamp that would read as 1970.
    assert!(metrics.readiness().is_err());
    assert!(!before.contains("meshagent_snapshot_last_publish_timestamp_seconds"));
    assert!(!before.contains("meshagent_certificate_earliest_expiry_timestamp_seconds"));
    assert!(
        !before.contains("meshagent_kube_"),
        "no cluster, no cluster figures"
    );

    let version = |generation| Version {
        epoch: 7,
        generation,
    };
    metrics.published(Published::Complete, version(1), Duration::from_millis(30));
    metrics.published(Published::Change, version(2), Duration::from_micros(200));
    metrics.published(Published::Change, version(3), Duration::from_micros(300));
    metrics.publish_failed();
    metrics.region(Footprint {
        base_bytes: 17_000_000,
        log_bytes: 4096,
        slot_capacity: 64 << 20,
        file_bytes: 18_000_000,
        compactions: 3,
    });
    metrics.certificates_held(3, [2_000_000_000, 1_900_000_000].into_iter());
    metrics.certificate_issued();
    metrics.certificate_issued();
    metrics.certificate_failed(&CaError::Time);
    // Refused twice in a row counts once: the source went bad once.
    metrics.source_checked(true);
    metrics.source_checked(true);

    let text = metrics.render(None, false);
    for (series, expected) in [
        (
            "meshagent_snapshot_publications_total{kind=\"complete\"}",
            1.0,
        ),
        (
            "meshagent_snapshot_publications_total{kind=\"change\"}",
            2.0,
        ),
        (
            "meshagent_snapshot_publish_seconds_count{kind=\"change\"}",
            2.0,
        ),
        (
            "meshagent_snapshot_publish_seconds_bucket{kind=\"complete\",le=\"0.05\"}",
            1.0,
        ),
        (
            "meshagent_snapshot_publish_seconds_bucket{kind=\"complete\",le=\"0.01\"}",
            0.0,
        ),
        ("meshagent_snapshot_epoch", 7.0),
        ("meshagent_snapshot_generation", 3.0),
        ("meshagent_snapshot_publish_failures_total", 1.0),
        ("meshagent_snapshot_base_bytes", 17e6),
        ("meshagent_snapshot_log_bytes", 4096.0),
        ("meshagent_snapshot_slot_capacity_bytes", 67_108_864.0),
        ("meshagent_snapshot_region_memory_bytes", 18e6),
        ("meshagent_snapshot_compactions_total", 3.0),
        ("meshagent_identities_wanted", 3.0),
        ("meshagent_certificates", 2.0),
        (
            "meshagent_certificate_earliest_expiry_timestamp_seconds",
            1_900_000_000.0,
        ),
        ("meshagent_certificates_issued_total", 2.0),
        (
            "meshagent_certificate_failures_total{reason=\"local\"}",
            1.0,
        ),
        (
            "meshagent_certificate_failures_total{reason=\"unreachable\"}",
            0.0,
        ),
        ("meshagent_source_refusals_total", 1.0),
        ("meshagent_source_refused", 1.0),
    ] {
        assert_eq!(value(&text, series), expected, "{series}");
    }
    let published_at = value(&text, "meshagent_snapshot_last_publish_timestamp_seconds");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    assert!((now - published_at).abs() < 60.0, "{published_at} vs {now}");
    // The process's own figures, under this process's prefix.
    assert!(value(&text, "process_resident_memory_bytes") > 0.0);
    assert!(text.contains("meshagent_memory_private_bytes "), "{text}");
    assert!(!text.contains("meshdp_"), "{text}");
    // Published once: ready, whatever the source says now.
    assert_eq!(metrics.readiness(), Ok(()));

    metrics.source_checked(false);
    assert_eq!(
        value(&metrics.render(None, false), "meshagent_source_refused"),
        0.0
    );
}

#[test]
fn readiness_says_which_kinds_are_still_being_listed() {
    let metrics = AgentMetrics::default();
    metrics.list_started(Kind::Pods);
    metrics.list_started(Kind::Services);
    metrics.kinds_waiting(&["pods"]);
    let why = metrics.readiness().expect_err("nothing published");
    assert_eq!(why, "no snapshot published yet: listing pods");
    let text = metrics.render(None, true);
    assert_eq!(value(&text, "meshagent_kube_listed{kind=\"pods\"}"), 0.0);
    assert_eq!(
        value(&text, "meshagent_kube_listed{kind=\"services\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "meshagent_kube_lists_total{kind=\"pods\"}"),
        1.0
    );
}

#[test]
fn cni_requests_are_counted_by_the_op_and_reply_names_the_wire_uses() {
    let metrics = AgentMetrics::default();
    let pod = crate::cni_api::PodRef {
        container_id: "c".into(),
        namespace: "ns".into(),
        name: "p".into(),
    };
    let requests = [
        Request::Decide {
            namespace: "ns".into(),
            name: "p".into(),
        },
        Request::Add {
            pod: pod.clone(),
            ips: vec![],
            netns_path: "/x".into(),
            captured: false,
            network: String::new(),
        },
        Request::Remove { pod },
        Request::Collect {
            network: "n".into(),
            valid: vec![],
        },
        Request::Status {
            container_id: "c".into(),
        },
        Request::HandOver,
        Request::Waiting,
    ];
    let replies = [
        Reply::Decision {
            capture: true,
            reason: String::new(),
        },
        Reply::NotYet {
            reason: String::new(),
        },
        Reply::Done,
        Reply::Status {
            known: false,
            captured: false,
            rules: None,
        },
        Reply::Refused {
            reason: String::new(),
        },
        Reply::Moved {
            reason: String::new(),
        },
        Reply::HandedOver { pods: 0 },
        Reply::Serving,
        Reply::Leaving,
    ];
    // The label values are the names on the wire, one for each variant.
    assert_eq!(requests.len(), Request::OPS.len());
    assert_eq!(replies.len(), Reply::NAMES.len());
    for request in &requests {
        let wire = serde_json::to_value(request).expect("encodes");
        assert_eq!(wire["op"], Request::OPS[request.op_index()], "{wire}");
    }
    for reply in &replies {
        let wire = serde_json::to_value(reply).expect("encodes");
        assert_eq!(wire["reply"], Reply::NAMES[reply.name_index()], "{wire}");
    }

    let add = requests[1].op_index();
    metrics.cni_answered(add, &Reply::Done);
    metrics.cni_answered(add, &Reply::Done);
    metrics.cni_answered(add, &replies[1]);
    let text = metrics.render(None, false);
    assert_eq!(
        value(
            &text,
            "meshagent_cni_requests_total{op=\"add\",reply=\"done\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "meshagent_cni_requests_total{op=\"add\",reply=\"not_yet\"}"
        ),
        1.0
    );
    let series = text
        .lines()
        .filter(|l| l.starts_with("meshagent_cni_requests_total{"))
        .count();
    assert_eq!(series, 2, "only what happened:\n{text}");
}

#[test]
fn the_endpoint_keeps_the_log_filter_to_the_loopback() {
    let endpoint = Endpoint {
        metrics: Arc::new(AgentMetrics::default()),
        shared: None,
        kube: false,
        log_level: None,
    };
    let request = |method, path, peer: &str| mesh_io::admin::Request {
        method,
        path,
        query: "level=debug",
        peer: peer.parse().expect("address"),
    };
    // From the pod network (a scraper, another pod): metrics yes, the log filter no.
    let (status, _, text) = endpoint.respond(&request("GET", "/metrics", "10.0.0.7"));
    assert_eq!(status, 200);
    assert!(text.contains("meshagent_snapshot_generation 0"), "{text}");
    assert_eq!(
        endpoint.respond(&request("POST", "/logging", "10.0.0.7")).0,
        403
    );
    assert_eq!(
        endpoint.respond(&request("GET", "/logging", "fd00::7")).0,
        403
    );
    // From the loopback it gets through (to a process whose filter is fixed here).
    assert_eq!(
        endpoint
            .respond(&request("POST", "/logging", "127.0.0.1"))
            .0,
        503
    );
    assert_eq!(endpoint.respond(&request("GET", "/logging", "::1")).0, 503);
    assert_eq!(
        endpoint
            .respond(&request("GET", "/logging", "::ffff:127.0.0.1"))
            .0,
        503,
        "the loopback as a dual-stack listener sees it"
    );
    assert_eq!(
        endpoint
            .respond(&request("GET", "/logging", "::ffff:10.0.0.7"))
            .0,
        403
    );
    let (status, _, why) = endpoint.respond(&request("GET", "/healthz/ready", "10.0.0.7"));
    assert_eq!((status, why.as_str()), (503, "no snapshot published yet\n"));
    assert_eq!(
        endpoint.respond(&request("GET", "/nothing", "127.0.0.1")).0,
        404
    );
}
