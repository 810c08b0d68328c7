//! Bearer-token authentication with four roles; tokens are stored only as SHA-256 digests.
//!
//! Handlers take a [`Principal`] argument and call [`Principal::require`]: a missing or unknown
//! token is a 401, a known token without the role is a 403. Tokens never reach a log line.

use std::future::Future;
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;
use crate::http::{Json, endpoint};
use crate::secret::Secret;

/// What a token may do. An admin may do everything any other role may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Engineer,
    Labeler,
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Engineer => "engineer",
            Role::Labeler => "labeler",
            Role::Client => "client",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Role::Admin),
            "engineer" => Some(Role::Engineer),
            "labeler" => Some(Role::Labeler),
            "client" => Some(Role::Client),
            _ => None,
        }
    }
}

/// The caller behind a valid token.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Principal {
    pub token_id: Uuid,
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// Passes when the caller has one of `roles`, or is an admin.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if self.role == Role::Admin || roles.contains(&self.role) {
            return Ok(());
        }
        let wanted: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(ApiError::forbidden(format!(
            "this route needs the role {}; the token has `{}`",
            wanted.join(" or "),
            self.role.as_str()
        )))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token store query failed: {0}")]
    Database(#[from] sqlx::Error),
}

/// Name of the token registered from `FERRITE_ADMIN_TOKEN`.
const BOOTSTRAP_NAME: &str = "bootstrap-admin";

/// Issues, checks and revokes tokens; shared by every service in one process.
#[derive(Clone, Debug)]
pub struct Auth {
    pool: PgPool,
}

/// A token as created: the only moment its value is known outside the caller.
#[derive(Debug)]
pub struct IssuedToken {
    pub id: Uuid,
    pub token: Secret<String>,
}

impl Auth {
    /// `pool` must be confined to the `auth` schema (see [`crate::db`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub async fn issue(&self, name: &str, role: Role) -> Result<IssuedToken, AuthError> {
        let mut random = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut random);
        let token = format!("fer_{}", hex::encode(random));
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, token_sha256) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(name)
        .bind(role.as_str())
        .bind(digest(&token))
        .execute(&self.pool)
        .await?;
        tracing::info!(token.id = %id, token.role = role.as_str(), "token issued");
        Ok(IssuedToken {
            id,
            token: Secret::new(token),
        })
    }

    /// Makes `token` the bootstrap admin token, so a fresh install can issue the others.
    ///
    /// A bootstrap token revoked through the API stays revoked across restarts, and a new
    /// value (a rotation) retires the previous bootstrap token.
    pub async fn ensure_admin(&self, token: &Secret<String>) -> Result<(), AuthError> {
        let digest = digest(token.expose());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE api_tokens SET revoked_at = now() \
             WHERE name = $1 AND token_sha256 <> $2 AND revoked_at IS NULL",
        )
        .bind(BOOTSTRAP_NAME)
        .bind(&digest)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, token_sha256) VALUES ($1, $2, 'admin', $3) \
             ON CONFLICT (token_sha256) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(BOOTSTRAP_NAME)
        .bind(&digest)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The principal behind `token`, or `None` when it is unknown or revoked.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>, AuthError> {
        let row: Option<(Uuid, String, String)> = sqlx::query_as(
            "SELECT id, name, role FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
        )
        .bind(digest(token))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(token_id, name, role)| {
            Role::parse(&role).map(|role| Principal {
                token_id,
                name,
                role,
            })
        }))
    }

    pub async fn revoke(&self, id: Uuid) -> Result<bool, AuthError> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn list(&self) -> Result<Vec<TokenSummary>, AuthError> {
        let rows: Vec<(Uuid, String, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT id, name, role, created_at FROM api_tokens \
             WHERE revoked_at IS NULL ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, name, role, created_at)| {
                Role::parse(&role).map(|role| TokenSummary {
                    id,
                    name,
                    role,
                    created_at,
                })
            })
            .collect())
    }
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::internal(&e)
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let auth = req.app_data::<web::Data<Auth>>().cloned();
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .cloned();
        Box::pin(async move {
            let auth = auth.ok_or_else(|| {
                ApiError::internal(&std::io::Error::other("Auth is not registered as app data"))
            })?;
            let token = header
                .as_ref()
                .and_then(|value| value.to_str().ok())
                // The scheme is case-insensitive (RFC 9110, section 11.1).
                .and_then(|value| {
                    let (scheme, token) = value.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then_some(token)
                })
                .map(str::trim)
                .filter(|token| !token.is_empty())
                .ok_or_else(|| {
                    ApiError::unauthorized("send a token as `Authorization: Bearer <token>`")
                })?;
            auth.authenticate(token)
                .await?
                .ok_or_else(|| ApiError::unauthorized("the token is unknown or revoked"))
        })
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenSummary {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who or what the token is for, e.g. `labeler-ana` or `ci`.
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    /// The token itself; it is shown only once.
    pub token: String,
}

/// Issues a token (admin only).
#[utoipa::path(post, path = "/v1/auth/tokens", tag = "auth", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400), (status = 401), (status = 403)))]
async fn create_token(
    principal: Principal,
    auth: web::Data<Auth>,
    body: Json<CreateToken>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Admin])?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(
            ApiError::invalid_request("invalid_value", "`name` must be 1-200 characters")
                .with_param("name"),
        );
    }
    let issued = auth.issue(name, body.role).await?;
    Ok(HttpResponse::Created().json(CreatedToken {
        id: issued.id,
        name: name.to_owned(),
        role: body.role,
        token: issued.token.expose().clone(),
    }))
}

/// Lists live tokens, without their values (admin only).
#[utoipa::path(get, path = "/v1/auth/tokens", tag = "auth",
    responses((status = 200, body = [TokenSummary]), (status = 401), (status = 403)))]
async fn list_tokens(
    principal: Principal,
    auth: web::Data<Auth>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Admin])?;
    Ok(HttpResponse::Ok().json(auth.list().await?))
}

/// Revokes a token (admin only).
#[utoipa::path(delete, path = "/v1/auth/tokens/{id}", tag = "auth",
    responses((status = 204), (status = 404), (status = 401), (status = 403)))]
async fn revoke_token(
    principal: Principal,
    auth: web::Data<Auth>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Admin])?;
    if auth.revoke(*id).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found("token", &id.to_string()))
    }
}

/// The caller's own identity.
#[utoipa::path(get, path = "/v1/auth/whoami", tag = "auth",
    responses((status = 200, body = Principal), (status = 401)))]
async fn whoami(principal: Principal) -> HttpResponse {
    HttpResponse::Ok().json(principal)
}

/// Token routes, mounted once per process.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        endpoint("/v1/auth/tokens")
            .post(create_token)
            .get(list_tokens),
    )
    .service(endpoint("/v1/auth/tokens/{id}").delete(revoke_token))
    .service(endpoint("/v1/auth/whoami").get(whoami));
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(create_token, list_tokens, revoke_token, whoami))]
pub struct AuthApi;

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role) -> Principal {
        Principal {
            token_id: Uuid::nil(),
            name: "t".into(),
            role,
        }
    }

    #[test]
    fn admin_passes_every_role_check() {
        assert!(principal(Role::Admin).require(&[Role::Labeler]).is_ok());
    }

    #[test]
    fn a_labeler_is_refused_an_engineer_route_with_403() {
        let err = principal(Role::Labeler)
            .require(&[Role::Engineer])
            .expect_err("refused");
        assert_eq!(err.status(), actix_web::http::StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_stored_digest_is_sha256_of_the_token() {
        // SHA-256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            hex::encode(digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
