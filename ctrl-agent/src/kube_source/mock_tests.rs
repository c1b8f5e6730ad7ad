//! One kind's watch loop (`watch`) against kube's mock HTTP service (tower-test): each request
//! the watcher makes is checked as the API server would see it (list, then watch from the
//! list's resourceVersion with bookmarks, resume from the last bookmark, relist after 410), and
//! answered by hand. The whole-process behaviour is in `tests.rs`, against the loopback double.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::client::Body;
use kube::runtime::watcher::Event;
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_test::mock::{self, Handle};

use super::world::{Kind, Update};
use super::{crd_resource, watch};
use crate::metrics::AgentMetrics;
use std::sync::Arc;

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn pod(name: &str, resource_version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "resourceVersion": resource_version},
    })
}

fn pod_list(resource_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList",
           "metadata": {"resourceVersion": resource_version}, "items": items})
}

fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

fn watch_events(events: &[(&str, Value)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, object) in events {
        body.extend(
            json!({"type": kind, "object": object})
                .to_string()
                .into_bytes(),
        );
        body.push(b'\n');
    }
    body
}

/// The path and query of the next request, after checking it is a GET.
async fn next_get(
    handle: &mut ApiHandle,
) -> (
    String,
    String,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the watcher makes another request")
        .expect("the client is alive");
    assert_eq!(request.method(), http::Method::GET);
    (
        request.uri().path().to_owned(),
        request.uri().query().unwrap_or_default().to_owned(),
        respond,
    )
}

/// The query of the next request, after checking it is a GET of the pods collection.
async fn next_request(
    handle: &mut ApiHandle,
) -> (String, tower_test::mock::SendResponse<Response<Body>>) {
    let (path, query, respond) = next_get(handle).await;
    assert_eq!(path, "/api/v1/pods");
    (query, respond)
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn reply(respond: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: Vec<u8>) {
    let response = Response::builder()
        .status(StatusCode::from_u16(code).expect("status"))
        .body(Body::from(body))
        .expect("response");
    respond.send_response(response);
}

async fn next_update(updates: &mut mpsc::Receiver<Update>) -> String {
    let update = tokio::time::timeout(Duration::from_secs(10), updates.recv())
        .await
        .expect("an update in time")
        .expect("the watch loop is alive");
    match update {
        Update::Absent(kind) => format!("absent {}", kind.name()),
        Update::Event(_, Event::Init) => "init".into(),
        Update::Event(_, Event::InitApply(o)) => format!("init-apply {}", o.name_any()),
        Update::Event(_, Event::InitDone) => "init-done".into(),
        Update::Event(_, Event::Apply(o)) => format!("apply {}", o.name_any()),
        Update::Event(_, Event::Delete(o)) => format!("delete {}", o.name_any()),
    }
}

/// Answers the next request, which must be a list, with one pod named `name`, and checks the
/// watch loop passes the list on whole.
async fn answer_list(
    api: &mut ApiHandle,
    updates: &mut mpsc::Receiver<Update>,
    resource_version: &str,
    name: &str,
) {
    let (query, respond) = next_request(api).await;
    assert_eq!(param(&query, "watch"), None, "a list: {query}");
    let list = pod_list(resource_version, vec![pod(name, "1")]);
    reply(respond, 200, list.to_string().into_bytes());
    for expected in ["init", &format!("init-apply {name}"), "init-done"] {
        assert_eq!(next_update(updates).await, expected);
    }
}

/// Runs `test` with a pods watch loop on kube's mock service.
fn with_pods_watch<F, Fut>(test: F) -> Arc<AgentMetrics>
where
    F: FnOnce(ApiHandle, mpsc::Receiver<Update>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    with_watch(Kind::Pods, ApiResource::erase::<Pod>(&()), test)
}

/// Runs `test` with a watch loop of `kind` on kube's mock service; what the loop counted.
fn with_watch<F, Fut>(kind: Kind, resource: ApiResource, test: F) -> Arc<AgentMetrics>
where
    F: FnOnce(ApiHandle, mpsc::Receiver<Update>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let api = Api::<DynamicObject>::all_with(client, &resource);
        let (tx, rx) = mpsc::channel(16);
        let metrics = Arc::new(AgentMetrics::default());
        let watching = tokio::spawn(watch(api, kind, tx, metrics.clone()));
        test(handle, rx).await;
        watching.abort();
        metrics
    })
}

/// The value of one series of `kind` (`meshagent_kube_<family>{kind="..."}`) as scraped.
fn scraped(metrics: &AgentMetrics, family: &str, kind: Kind) -> u64 {
    let series = format!("meshagent_kube_{family}{{kind=\"{}\"}}", kind.name());
    crate::metrics::tests::value(&metrics.render(None, true), &series) as u64
}

#[test]
fn a_list_then_a_watch_from_its_version_with_bookmarks_then_a_resume_from_the_last_bookmark() {
    with_pods_watch(|mut api, mut updates| async move {
        answer_list(&mut api, &mut updates, "100", "a").await;

        let (query, respond) = next_request(&mut api).await;
        assert_eq!(param(&query, "watch"), Some("true"), "{query}");
        assert_eq!(param(&query, "resourceVersion"), Some("100"), "{query}");
        assert_eq!(
            param(&query, "allowWatchBookmarks"),
            Some("true"),
            "{query}"
        );
        // An event, a bookmark, then the connection ends (as when a watch times out).
        let bookmark = json!({"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"resourceVersion": "150"}});
        reply(
            respond,
            200,
            watch_events(&[("ADDED", pod("b", "101")), ("BOOKMARK", bookmark)]),
        );
        assert_eq!(next_update(&mut updates).await, "apply b");

        let (query, respond) = next_request(&mut api).await;
        assert_eq!(
            param(&query, "watch"),
            Some("true"),
            "resumed, not relisted: {query}"
        );
        assert_eq!(param(&query, "resourceVersion"), Some("150"), "{query}");
        reply(respond, 200, watch_events(&[("DELETED", pod("a", "151"))]));
        assert_eq!(next_update(&mut updates).await, "delete a");
    });
}

#[test]
fn an_http_410_on_resuming_a_watch_relists_and_the_relist_replaces_the_kind() {
    let metrics = with_pods_watch(|mut api, mut updates| async move {
        answer_list(&mut api, &mut updates, "100", "a").await;
        let (query, respond) = next_request(&mut api).await;
        assert_eq!(param(&query, "resourceVersion"), Some("100"), "{query}");
        reply(
            respond,
            410,
            status(410, "Expired").to_string().into_bytes(),
        );

        // A relist.
        answer_list(&mut api, &mut updates, "300", "c").await;
        let (query, _respond) = next_request(&mut api).await;
        assert_eq!(param(&query, "resourceVersion"), Some("300"), "{query}");
    });
    // What an SRE sees: the relist, both objects, no failure (a 410 is expected).
    assert_eq!(scraped(&metrics, "lists_total", Kind::Pods), 2);
    assert_eq!(scraped(&metrics, "objects_received_total", Kind::Pods), 2);
    assert_eq!(scraped(&metrics, "watch_errors_total", Kind::Pods), 0);
    assert_eq!(scraped(&metrics, "lists_total", Kind::Services), 0);
}

#[test]
fn a_failed_list_is_retried_and_a_404_of_a_core_kind_is_not_taken_for_empty() {
    let metrics = with_pods_watch(|mut api, mut updates| async move {
        let (_, respond) = next_request(&mut api).await;
        reply(
            respond,
            500,
            status(500, "InternalError").to_string().into_bytes(),
        );
        let (query, respond) = next_request(&mut api).await;
        assert_eq!(param(&query, "watch"), None, "the list again: {query}");
        reply(
            respond,
            404,
            status(404, "NotFound").to_string().into_bytes(),
        );

        // Still retried: when the kind is served, its objects arrive.
        let (query, respond) = next_request(&mut api).await;
        assert_eq!(param(&query, "watch"), None, "{query}");
        reply(
            respond,
            200,
            pod_list("7", vec![pod("a", "5")]).to_string().into_bytes(),
        );
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("init-done") {
            seen.push(next_update(&mut updates).await);
        }
        // kube's watcher announces each list attempt (Init) before making it.
        assert_eq!(seen, ["init", "init", "init", "init-apply a", "init-done"]);
    });
    assert_eq!(
        scraped(&metrics, "watch_errors_total", Kind::Pods),
        2,
        "the 500 and the 404"
    );
    assert_eq!(scraped(&metrics, "lists_total", Kind::Pods), 3);
    assert_eq!(scraped(&metrics, "objects_received_total", Kind::Pods), 1);
}

const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const GROUP: &str = "/apis/security.istio.io";

/// Answers the next request, which must be a list of the policies, with a 404.
async fn policies_not_found(api: &mut ApiHandle) {
    let (path, query, respond) = next_get(api).await;
    assert_eq!((path.as_str(), param(&query, "watch")), (POLICIES, None));
    reply(
        respond,
        404,
        status(404, "NotFound").to_string().into_bytes(),
    );
}

/// Answers the next request, which must be `path`, with `code` and `body`.
async fn answer(api: &mut ApiHandle, path: &str, code: u16, body: Value) {
    let (asked, _, respond) = next_get(api).await;
    assert_eq!(asked, path);
    reply(respond, code, body.to_string().into_bytes());
}

/// The `APIResourceList` of security.istio.io/`version`, with the policies when `policies`.
fn resources(version: &str, policies: bool) -> Value {
    let listed = if policies {
        json!([{"name": "authorizationpolicies", "singularName": "", "namespaced": true,
                "kind": "AuthorizationPolicy", "verbs": ["get", "list", "watch"]}])
    } else {
        json!([])
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1",
           "groupVersion": format!("security.istio.io/{version}"), "resources": listed})
}

#[test]
fn a_404_on_the_policies_counts_as_empty_only_when_discovery_finds_them_served_nowhere() {
    let resource = crd_resource(Kind::AuthorizationPolicies, "AuthorizationPolicy");
    with_watch(
        Kind::AuthorizationPolicies,
        resource,
        |mut api, mut updates| async move {
            // Discovery fails: a transient error, not "no policies".
            policies_not_found(&mut api).await;
            answer(&mut api, GROUP, 503, status(503, "ServiceUnavailable")).await;

            // The group is served, and the kind only at v1beta1 (Istio before 1.22): policies
            // exist that cannot be read.
            policies_not_found(&mut api).await;
            let group = json!({"kind": "APIGroup", "apiVersion": "v1", "name": "security.istio.io",
            "versions": [{"groupVersion": "security.istio.io/v1beta1", "version": "v1beta1"}]});
            answer(&mut api, GROUP, 200, group.clone()).await;
            let v1beta1 = format!("{GROUP}/v1beta1");
            answer(&mut api, &v1beta1, 200, resources("v1beta1", true)).await;
            // Read again, unchanged: the answer stands.
            answer(&mut api, GROUP, 200, group.clone()).await;

            // The kind moves to v1 while discovery reads: the group's one version no longer
            // has it, which alone would mean "served nowhere", but the group changed
            // meanwhile, so discovery reads again and finds it at v1 (retried, not empty).
            policies_not_found(&mut api).await;
            answer(&mut api, GROUP, 200, group).await;
            answer(&mut api, &v1beta1, 200, resources("v1beta1", false)).await;
            let both = json!({"kind": "APIGroup", "apiVersion": "v1", "name": "security.istio.io",
            "versions": [{"groupVersion": "security.istio.io/v1", "version": "v1"},
                         {"groupVersion": "security.istio.io/v1beta1", "version": "v1beta1"}]});
            answer(&mut api, GROUP, 200, both.clone()).await;
            answer(&mut api, GROUP, 200, both.clone()).await;
            answer(&mut api, &format!("{GROUP}/v1"), 200, resources("v1", true)).await;
            answer(&mut api, &v1beta1, 200, resources("v1beta1", false)).await;
            answer(&mut api, GROUP, 200, both).await;

            // The group is not served at all: no Istio security CRDs, so no policies.
            policies_not_found(&mut api).await;
            answer(&mut api, GROUP, 404, status(404, "NotFound")).await;

            // Still retried: once served at v1, the policies arrive.
            let (path, _, respond) = next_get(&mut api).await;
            assert_eq!(path, POLICIES);
            let policy = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "shop", "resourceVersion": "5"},
            "spec": {"action": "DENY"}});
            let list = json!({"apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicyList", "metadata": {"resourceVersion": "7"},
            "items": [policy]});
            reply(respond, 200, list.to_string().into_bytes());

            let mut seen = Vec::new();
            while seen.last().map(String::as_str) != Some("init-done") {
                seen.push(next_update(&mut updates).await);
            }
            // One Init per list attempt; "absent" only after the group was found not served.
            assert_eq!(
                seen,
                [
                    "init",
                    "init",
                    "init",
                    "init",
                    "absent authorizationpolicies",
                    "init",
                    "init-apply deny",
                    "init-done"
                ]
            );
        },
    );
}
