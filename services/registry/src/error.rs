//! The registry's errors, each with its Confluent error code and HTTP status.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use feedloop_core::error::{Classify, ErrorClass};

use crate::api::reply;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {0} not found.")]
    VersionNotFound(i32),
    #[error("Schema {0} not found.")]
    SchemaNotFound(String),
    #[error("Subject '{0}' was soft deleted.Set permanent=true to delete permanently")]
    SubjectSoftDeleted(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error(
        "Subject '{subject}' Version {version} was soft deleted.Set permanent=true to delete permanently"
    )]
    VersionSoftDeleted { subject: String, version: i32 },
    #[error(
        "Subject '{subject}' Version {version} was not deleted first before being permanently deleted"
    )]
    VersionNotSoftDeleted { subject: String, version: i32 },
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectConfigNotFound(String),
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error(
        "Invalid compatibility level. Valid values are none, backward, forward, full, backward_transitive, forward_transitive, and full_transitive"
    )]
    InvalidCompatibility,
    #[error("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]", details.join(", "))]
    Incompatible {
        subject: String,
        details: Vec<String>,
    },
    #[error("Malformed request body: {0}")]
    BadRequest(String),
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Error in the backend data store: {0}")]
    Store(#[from] sqlx::Error),
}

impl RegistryError {
    /// Confluent's error code.
    pub fn code(&self) -> u32 {
        match self {
            Self::SubjectNotFound(_) => 40401,
            Self::VersionNotFound(_) => 40402,
            Self::SchemaNotFound(_) => 40403,
            Self::SubjectSoftDeleted(_) => 40404,
            Self::SubjectNotSoftDeleted(_) => 40405,
            Self::VersionSoftDeleted { .. } => 40406,
            Self::VersionNotSoftDeleted { .. } => 40407,
            Self::SubjectConfigNotFound(_) => 40408,
            Self::InvalidSchema(_) => 42201,
            Self::InvalidVersion(_) => 42202,
            Self::InvalidCompatibility => 42203,
            Self::Incompatible { .. } => 409,
            Self::BadRequest(_) => 400,
            Self::Unauthorized => 401,
            Self::Store(_) => 50001,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.code() {
            400 => StatusCode::BAD_REQUEST,
            401 => StatusCode::UNAUTHORIZED,
            409 => StatusCode::CONFLICT,
            40401..=40499 => StatusCode::NOT_FOUND,
            42201..=42299 => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl Classify for RegistryError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Store(_) => ErrorClass::Unavailable,
            _ => ErrorClass::BadInput,
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        if let Self::Store(e) = &self {
            tracing::error!(error = %e, "Registry store failed");
        }
        let status = self.status();
        let mut resp = reply(serde_json::json!({
            "error_code": self.code(),
            "message": self.to_string(),
        }))
        .into_response();
        *resp.status_mut() = status;
        if status == StatusCode::UNAUTHORIZED
            && let Ok(v) = "Basic realm=\"feedloop-registry\"".parse()
        {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}
