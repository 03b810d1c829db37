//! The Confluent Schema Registry REST subset, over axum.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use feedloop_core::{
    avro::compat::CompatibilityLevel,
    config::Secret,
    http::{basic_credentials, constant_time_eq, ops_routes, track},
};
use serde::{Deserialize, Serialize};

use crate::{
    error::RegistryError,
    observability,
    service::{Registry, VersionSpec, prepare},
};

pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A JSON answer with the registry's content type.
pub fn reply<T: Serialize>(body: T) -> impl IntoResponse {
    match serde_json::to_vec(&body) {
        Ok(bytes) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub users: Arc<BTreeMap<String, Secret>>,
}

type ApiResult = Result<Response, RegistryError>;

/// The router: API routes behind Basic auth, plus the unauthenticated ops routes.
pub fn router(state: AppState, max_body_bytes: usize, timeout: std::time::Duration) -> Router {
    let api = Router::new()
        .route("/", get(|| async { reply(serde_json::json!({})) }))
        .route("/schemas/types", get(|| async { reply(["AVRO"]) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_by_id))
        .route("/schemas/ids/{id}/versions", get(versions_by_id))
        .route("/subjects", get(list_subjects))
        .route(
            "/subjects/{subject}",
            axum::routing::post(lookup).delete(delete_subject),
        )
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(|| async { reply(Vec::<i32>::new()) }),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            axum::routing::post(check_version),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            axum::routing::post(check_all),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .route(
            "/mode",
            get(|| async { reply(serde_json::json!({"mode": "READWRITE"})) }),
        )
        .route(
            "/mode/{subject}",
            get(|| async { reply(serde_json::json!({"mode": "READWRITE"})) }),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .merge(ops_routes())
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(feedloop_core::http::timeout(timeout))
        .layer(middleware::from_fn_with_state(observability::HTTP, track))
        .with_state(state)
}

async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let ok = basic_credentials(req.headers()).is_some_and(|c| {
        state
            .users
            .get(&c.user)
            .is_some_and(|p| constant_time_eq(p.expose().as_bytes(), c.password.as_bytes()))
    });
    if ok {
        next.run(req).await
    } else {
        RegistryError::Unauthorized.into_response()
    }
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.registry.store().ping().await {
        Ok(()) => "ready".into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "postgres unreachable").into_response(),
    }
}

/// Query flags. Booleans are read leniently: clients send `true`, `True` (Python) or `1`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Flags {
    #[serde(deserialize_with = "lenient_bool")]
    deleted: bool,
    #[serde(deserialize_with = "lenient_bool")]
    permanent: bool,
    #[serde(deserialize_with = "lenient_bool")]
    verbose: bool,
    #[serde(rename = "defaultToGlobal", deserialize_with = "lenient_bool")]
    default_to_global: bool,
    #[serde(rename = "subjectPrefix")]
    subject_prefix: Option<String>,
}

fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let raw = String::deserialize(d)?;
    Ok(raw.eq_ignore_ascii_case("true") || raw == "1")
}

#[derive(Debug, Deserialize)]
struct SchemaRequest {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Option<Vec<serde_json::Value>>,
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, RegistryError> {
    serde_json::from_slice(body).map_err(|e| RegistryError::BadRequest(e.to_string()))
}

fn prepared(body: &Bytes) -> Result<crate::service::Prepared, RegistryError> {
    let req: SchemaRequest = parse_body(body)?;
    prepare(
        &req.schema,
        req.schema_type.as_deref(),
        req.references.is_some_and(|r| !r.is_empty()),
    )
}

fn schema_id(raw: &str) -> Result<i32, RegistryError> {
    raw.parse::<i32>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| RegistryError::SchemaNotFound(raw.to_owned()))
}

async fn schema_by_id(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let id = schema_id(&id)?;
    let text = s
        .registry
        .store()
        .schema_by_id(id)
        .await?
        .ok_or_else(|| RegistryError::SchemaNotFound(id.to_string()))?;
    Ok(reply(serde_json::json!({ "schema": text })).into_response())
}

async fn raw_schema_by_id(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let id = schema_id(&id)?;
    let text = s
        .registry
        .store()
        .schema_by_id(id)
        .await?
        .ok_or_else(|| RegistryError::SchemaNotFound(id.to_string()))?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

async fn usages(s: &AppState, id: &str) -> Result<Vec<(String, i32)>, RegistryError> {
    let id = schema_id(id)?;
    if s.registry.store().schema_by_id(id).await?.is_none() {
        return Err(RegistryError::SchemaNotFound(id.to_string()));
    }
    Ok(s.registry.store().usages(id).await?)
}

async fn subjects_by_id(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let mut subjects: Vec<String> = usages(&s, &id).await?.into_iter().map(|(s, _)| s).collect();
    subjects.dedup();
    Ok(reply(subjects).into_response())
}

async fn versions_by_id(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let pairs: Vec<serde_json::Value> = usages(&s, &id)
        .await?
        .into_iter()
        .map(|(subject, version)| serde_json::json!({"subject": subject, "version": version}))
        .collect();
    Ok(reply(pairs).into_response())
}

async fn list_subjects(State(s): State<AppState>, Query(f): Query<Flags>) -> ApiResult {
    let subjects = s
        .registry
        .store()
        .subjects(f.deleted, f.subject_prefix.as_deref().unwrap_or(""))
        .await?;
    Ok(reply(subjects).into_response())
}

async fn list_versions(
    State(s): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let versions: Vec<i32> = s
        .registry
        .visible(&subject, f.deleted)
        .await?
        .into_iter()
        .map(|v| v.version)
        .collect();
    Ok(reply(versions).into_response())
}

async fn register(
    State(s): State<AppState>,
    Path(subject): Path<String>,
    body: Bytes,
) -> ApiResult {
    let schema = prepared(&body)?;
    let (id, _version) = s.registry.register(&subject, schema).await?;
    Ok(reply(serde_json::json!({ "id": id })).into_response())
}

async fn lookup(
    State(s): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let schema = prepared(&body)?;
    let v = s.registry.lookup(&subject, &schema, f.deleted).await?;
    Ok(reply(serde_json::json!({
        "subject": subject, "id": v.schema_id, "version": v.version, "schema": v.schema,
    }))
    .into_response())
}

async fn get_version(
    State(s): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let v = s
        .registry
        .version(&subject, VersionSpec::parse(&version)?, f.deleted)
        .await?;
    Ok(reply(serde_json::json!({
        "subject": subject, "id": v.schema_id, "version": v.version, "schema": v.schema,
    }))
    .into_response())
}

async fn get_version_schema(
    State(s): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let v = s
        .registry
        .version(&subject, VersionSpec::parse(&version)?, f.deleted)
        .await?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], v.schema).into_response())
}

async fn delete_subject(
    State(s): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let versions = s.registry.delete_subject(&subject, f.permanent).await?;
    Ok(reply(versions).into_response())
}

async fn delete_version(
    State(s): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let v = s
        .registry
        .delete_version(&subject, VersionSpec::parse(&version)?, f.permanent)
        .await?;
    Ok(reply(v).into_response())
}

fn check_reply(result: crate::service::CheckResult, verbose: bool) -> Response {
    if verbose {
        reply(serde_json::json!({"is_compatible": result.compatible, "messages": result.messages}))
            .into_response()
    } else {
        reply(serde_json::json!({"is_compatible": result.compatible})).into_response()
    }
}

async fn check_version(
    State(s): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    let schema = prepared(&body)?;
    let result = s.registry.check(&subject, Some(spec), &schema).await?;
    Ok(check_reply(result, f.verbose))
}

async fn check_all(
    State(s): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let schema = prepared(&body)?;
    let result = s.registry.check(&subject, None, &schema).await?;
    Ok(check_reply(result, f.verbose))
}

#[derive(Debug, Deserialize)]
struct ConfigRequest {
    compatibility: Option<String>,
    #[serde(rename = "compatibilityLevel")]
    compatibility_level: Option<String>,
}

fn level_of(body: &Bytes) -> Result<CompatibilityLevel, RegistryError> {
    let req: ConfigRequest = parse_body(body)?;
    req.compatibility
        .or(req.compatibility_level)
        .ok_or(RegistryError::InvalidCompatibility)?
        .parse()
        .map_err(|_| RegistryError::InvalidCompatibility)
}

async fn get_global_config(State(s): State<AppState>) -> ApiResult {
    let level = s
        .registry
        .store()
        .level(None)
        .await?
        .unwrap_or(CompatibilityLevel::Backward);
    Ok(reply(serde_json::json!({"compatibilityLevel": level.as_str()})).into_response())
}

async fn put_global_config(State(s): State<AppState>, body: Bytes) -> ApiResult {
    let level = level_of(&body)?;
    s.registry.store().set_level(None, level).await?;
    Ok(reply(serde_json::json!({"compatibility": level.as_str()})).into_response())
}

async fn get_subject_config(
    State(s): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let store = s.registry.store();
    let level = match store.level(Some(&subject)).await? {
        Some(level) => level,
        None if f.default_to_global => store
            .level(None)
            .await?
            .unwrap_or(CompatibilityLevel::Backward),
        None => return Err(RegistryError::SubjectConfigNotFound(subject)),
    };
    Ok(reply(serde_json::json!({"compatibilityLevel": level.as_str()})).into_response())
}

async fn put_subject_config(
    State(s): State<AppState>,
    Path(subject): Path<String>,
    body: Bytes,
) -> ApiResult {
    let level = level_of(&body)?;
    s.registry.store().set_level(Some(&subject), level).await?;
    Ok(reply(serde_json::json!({"compatibility": level.as_str()})).into_response())
}

async fn delete_subject_config(
    State(s): State<AppState>,
    Path(subject): Path<String>,
) -> ApiResult {
    let previous = s
        .registry
        .store()
        .delete_level(&subject)
        .await?
        .ok_or_else(|| RegistryError::SubjectNotFound(subject.clone()))?;
    Ok(reply(serde_json::json!({"compatibilityLevel": previous.as_str()})).into_response())
}
