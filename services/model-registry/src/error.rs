//! The registry's errors and the one place they become HTTP statuses.

use ferrite_platform::ApiError;
use ferrite_platform::amqp::AmqpError;
use ferrite_platform::storage::StorageError;

use crate::domain::{InvalidInput, VersionKind};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A request field (named by `param`) is invalid.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
    },
    /// An uploaded or referenced artifact is not a usable model folder; `param` names the file.
    #[error("{message}")]
    BadArtifact { message: String, param: String },
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("the model version `{0}` does not exist")]
    VersionNotFound(String),
    #[error("the alias `{0}` does not exist")]
    AliasNotFound(String),
    #[error("the file `{0}` does not exist in this version")]
    FileNotFound(String),
    #[error("the model `{0}` already exists")]
    ModelExists(String),
    /// A model's versions are all of one kind: a serving alias or a `<name>` reference would
    /// otherwise switch between, say, a whole model and an adapter from one version to the next.
    #[error(
        "the model `{model}` holds versions of kind `{existing}`, so a version of kind `{}` \
         cannot be added to it; register it under a model of its own",
        .new.as_str()
    )]
    KindMismatch {
        model: String,
        /// The kind of the versions the model holds, as stored.
        existing: String,
        new: VersionKind,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "the upload's Content-Encoding `{0}` is not supported; send the tar archive \
         uncompressed (identity)"
    )]
    UnsupportedEncoding(String),
    #[error("the upload is larger than {limit_bytes} bytes")]
    TooLarge { limit_bytes: u64 },
    #[error("database query failed")]
    Database(#[from] sqlx::Error),
    #[error("object storage failed")]
    Storage(#[from] StorageError),
    #[error("could not record the event")]
    Outbox(#[from] AmqpError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    pub fn invalid(param: &str, error: InvalidInput) -> Self {
        Self::Invalid {
            message: error.0,
            param: Some(param.to_owned()),
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        use actix_web::http::StatusCode;
        match error {
            RegistryError::Invalid { message, param } => {
                let api = ApiError::invalid_request("invalid_value", message);
                match param {
                    Some(param) => api.with_param(param),
                    None => api,
                }
            }
            RegistryError::BadArtifact { message, param } => {
                ApiError::invalid_request("invalid_artifact", message).with_param(param)
            }
            RegistryError::ModelNotFound(name) => ApiError::not_found("model", &name),
            RegistryError::VersionNotFound(reference) => {
                ApiError::not_found("model_version", &reference)
            }
            RegistryError::AliasNotFound(alias) => ApiError::not_found("alias", &alias),
            RegistryError::FileNotFound(path) => ApiError::not_found("file", &path),
            RegistryError::ModelExists(name) => {
                ApiError::conflict("model_exists", format!("the model `{name}` already exists"))
            }
            error @ RegistryError::KindMismatch { .. } => {
                ApiError::conflict("kind_mismatch", error.to_string()).with_param("kind")
            }
            RegistryError::Forbidden(message) => ApiError::forbidden(message),
            error @ RegistryError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                error.to_string(),
            ),
            error @ RegistryError::UnsupportedEncoding(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_encoding",
                error.to_string(),
            )
            .with_param("Content-Encoding"),
            RegistryError::Database(error) => error.into(),
            error @ (RegistryError::Storage(_)
            | RegistryError::Outbox(_)
            | RegistryError::Io { .. }) => ApiError::internal(&error),
        }
    }
}

/// Turns a unique-constraint violation into `conflict`, and any other error into its
/// [`RegistryError::Database`].
pub fn on_unique_violation(error: sqlx::Error, conflict: RegistryError) -> RegistryError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => conflict,
        _ => RegistryError::Database(error),
    }
}
