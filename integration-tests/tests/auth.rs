//! Every HTTP API refuses missing and wrong credentials, on every route, and bodies over its
//! limit; the operational routes (`/healthz`, `/readyz`, `/metrics`) stay open for probes and
//! Prometheus. One dev stack (every service, in-process) on the shared broker.

use std::time::Duration;

use feedloop::dev::{BrokerChoice, Stack, StackOptions};
use feedloop_integration_tests::infra;
use reqwest::{Method, StatusCode};
use serde_json::json;

const WRONG: &str = "not-the-secret-0123456789abcdef";

/// How a request presents (or fails to present) its credential.
#[derive(Debug, Clone, Copy)]
enum Cred<'a> {
    None,
    Basic(&'a str, &'a str),
    Bearer(&'a str),
    WriteKeyHeader(&'a str),
}

async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    cred: Cred<'_>,
    body: Option<serde_json::Value>,
) -> StatusCode {
    let mut req = http.request(method, url);
    req = match cred {
        Cred::None => req,
        Cred::Basic(user, password) => req.basic_auth(user, Some(password)),
        Cred::Bearer(token) => req.bearer_auth(token),
        Cred::WriteKeyHeader(key) => req.header("x-write-key", key),
    };
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .status()
}

/// Every service in-process, on the shared broker.
async fn dev_stack() -> Stack {
    Stack::up(StackOptions {
        broker: BrokerChoice::External(infra().kafka_bootstrap),
        ..StackOptions::default()
    })
    .await
    .expect("dev stack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_refuses_missing_and_wrong_credentials_on_every_route() {
    let stack = dev_stack().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let token = stack.admin_token().to_owned();
    let key = stack.write_key().to_owned();
    let id = "0193f5a0-0000-7000-8000-000000000001";
    let one = json!({"type": "track", "event": "screen_viewed", "userId": "u-auth",
                     "messageId": "m-auth-1", "properties": {"screen": "home"}});

    // (service, method, route, body): every authenticated route of every API.
    let registry = &stack.registry_url;
    let eraser = &stack.eraser_url;
    let trigger = &stack.trigger_url;
    let collector = &stack.collector_url;
    let bearer_routes: Vec<(Method, String, Option<serde_json::Value>)> = vec![
        (Method::GET, format!("{eraser}/v1/erasure-requests"), None),
        (
            Method::POST,
            format!("{eraser}/v1/erasure-requests"),
            Some(json!({"user_ids": ["u-auth"], "reason": "r", "requested_by": "t"})),
        ),
        (
            Method::GET,
            format!("{eraser}/v1/erasure-requests/{id}"),
            None,
        ),
        (
            Method::POST,
            format!("{eraser}/v1/erasure-requests/{id}/retry"),
            None,
        ),
        (
            Method::GET,
            format!("{eraser}/v1/erasure-requests/{id}/certificate"),
            None,
        ),
        (Method::GET, format!("{trigger}/v1/datasets"), None),
        (
            Method::GET,
            format!("{trigger}/v1/datasets/match_outcomes/partitions"),
            None,
        ),
        (Method::GET, format!("{trigger}/v1/triggers"), None),
    ];
    for (method, url, body) in &bearer_routes {
        for cred in [
            Cred::None,
            Cred::Bearer(WRONG),
            Cred::Bearer(&token[..token.len() - 1]),
            Cred::Basic("feedloop", &token),
        ] {
            let status = call(&http, method.clone(), url, cred, body.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {url} with {cred:?}"
            );
        }
        let status = call(
            &http,
            method.clone(),
            url,
            Cred::Bearer(&token),
            body.clone(),
        )
        .await;
        assert_ne!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {url} with the token"
        );
    }

    let registry_routes = [
        (Method::GET, format!("{registry}/subjects")),
        (Method::GET, format!("{registry}/schemas/ids/1")),
        (Method::GET, format!("{registry}/config")),
        (Method::PUT, format!("{registry}/config")),
        (Method::GET, format!("{registry}/mode")),
        (
            Method::POST,
            format!("{registry}/subjects/x-value/versions"),
        ),
        (Method::DELETE, format!("{registry}/subjects/x-value")),
        (
            Method::POST,
            format!("{registry}/compatibility/subjects/x-value/versions/latest"),
        ),
    ];
    for (method, url) in &registry_routes {
        for cred in [
            Cred::None,
            Cred::Basic("feedloop", WRONG),
            Cred::Basic("nobody", &token),
            Cred::Bearer(&token),
        ] {
            let status = call(&http, method.clone(), url, cred, Some(json!({}))).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {url} with {cred:?}"
            );
        }
    }
    assert_eq!(
        call(
            &http,
            Method::GET,
            &format!("{registry}/subjects"),
            Cred::Basic("feedloop", &token),
            None
        )
        .await,
        StatusCode::OK
    );

    let native = format!("{collector}/v1/events");
    let segment_routes = [
        "batch", "b", "import", "track", "identify", "page", "screen",
    ]
    .map(|r| format!("{collector}/v1/{r}"));
    for url in std::iter::once(&native).chain(&segment_routes) {
        let body = if *url == native {
            json!([])
        } else if url.ends_with("batch") || url.ends_with("/b") || url.ends_with("import") {
            json!({"batch": [one]})
        } else {
            one.clone()
        };
        for cred in [
            Cred::None,
            Cred::Basic(WRONG, ""),
            Cred::WriteKeyHeader(WRONG),
            Cred::Bearer(&key),
        ] {
            let status = call(&http, Method::POST, url, cred, Some(body.clone())).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "POST {url} with {cred:?}");
        }
        for cred in [Cred::Basic(&key, ""), Cred::WriteKeyHeader(&key)] {
            let status = call(&http, Method::POST, url, cred, Some(body.clone())).await;
            assert_eq!(status, StatusCode::OK, "POST {url} with {cred:?}");
        }
    }
    // Segment SDKs may put the key in the body: a wrong one there is refused too, and a wrong
    // key in the headers is not rescued by a right one in the body.
    let batch = format!("{collector}/v1/batch");
    let with_key = |k: &str| json!({"writeKey": k, "batch": [one]});
    assert_eq!(
        call(
            &http,
            Method::POST,
            &batch,
            Cred::None,
            Some(with_key(WRONG))
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            &http,
            Method::POST,
            &batch,
            Cred::None,
            Some(with_key(&key))
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        call(
            &http,
            Method::POST,
            &batch,
            Cred::Basic(WRONG, ""),
            Some(with_key(&key))
        )
        .await,
        StatusCode::UNAUTHORIZED
    );

    // The operational routes answer without credentials.
    for base in [
        registry,
        collector,
        &stack.cdc_url,
        &stack.labeler_url,
        eraser,
        trigger,
    ] {
        for route in ["/healthz", "/metrics", "/readyz"] {
            let status = call(
                &http,
                Method::GET,
                &format!("{base}{route}"),
                Cred::None,
                None,
            )
            .await;
            assert!(
                status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                "{base}{route} answered {status}"
            );
        }
    }
    stack.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_refuses_bodies_over_its_limit() {
    let stack = dev_stack().await;
    let http = reqwest::Client::new();
    let token = stack.admin_token().to_owned();
    let key = stack.write_key().to_owned();
    // Each a little over its limit: the collector's and the registry's 1 MiB, the eraser's
    // 256 KiB.
    let over = |limit: usize| json!({"padding": "x".repeat(limit + (64 << 10))});
    let cases = [
        (
            format!("{}/v1/events", stack.collector_url),
            Cred::Basic(&key, ""),
            1 << 20,
        ),
        (
            format!("{}/v1/batch", stack.collector_url),
            Cred::Basic(&key, ""),
            1 << 20,
        ),
        (
            format!("{}/subjects/x-value/versions", stack.registry_url),
            Cred::Basic("feedloop", &token),
            1 << 20,
        ),
        (
            format!("{}/v1/erasure-requests", stack.eraser_url),
            Cred::Bearer(&token),
            256 << 10,
        ),
    ];
    for (url, cred, limit) in cases {
        let status = call(&http, Method::POST, &url, cred, Some(over(limit))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "POST {url}");
    }
    stack.down().await;
}
