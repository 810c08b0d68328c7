//! Routes grouped by path, so that a method the path does not serve is a 405 naming those it does.

use actix_web::dev::{AppService, HttpServiceFactory};
use actix_web::http::header::Allow;
use actix_web::http::{Method, StatusCode};
use actix_web::{FromRequest, Handler, HttpRequest, HttpResponse, Responder, web};

use crate::error::{ApiError, ErrorEnvelope};

/// One path and the handler of each method it serves, registered with `cfg.service(...)`.
///
/// With actix's `cfg.route(path, web::get().to(...))` each method is its own resource, so a
/// request whose method none of them takes falls through to the 404 for unknown paths. Here the
/// methods share one resource, and any other method gets a 405 in the usual error shape with
/// the `Allow` header HTTP asks for. Register each path once: a second endpoint for the same
/// path is never reached, as the first answers every method with a handler or a 405.
pub struct Endpoint {
    resource: actix_web::Resource,
    allowed: Vec<Method>,
}

/// An endpoint at `path` (an actix pattern such as `/v1/jobs/{id}`) serving no method yet.
pub fn endpoint(path: &str) -> Endpoint {
    Endpoint {
        resource: web::resource(path),
        allowed: Vec::new(),
    }
}

/// `Endpoint::get(handler)` and its kin: shorthands for [`Endpoint::method`].
macro_rules! shorthands {
    ($($name:ident => $method:ident),*) => {$(
        pub fn $name<F, Args>(self, handler: F) -> Self
        where
            F: Handler<Args>,
            Args: FromRequest + 'static,
            F::Output: Responder + 'static,
        {
            self.method(Method::$method, handler)
        }
    )*};
}

impl Endpoint {
    shorthands!(get => GET, post => POST, put => PUT, delete => DELETE);

    /// Serves `method` with `handler`.
    pub fn method<F, Args>(mut self, method: Method, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        let get = method == Method::GET;
        self.allowed.push(method.clone());
        self.resource = self
            .resource
            .route(web::route().method(method).to(handler.clone()));
        if get {
            // HEAD is GET without the body (RFC 9110, 9.3.2); actix sends no body for HEAD.
            self.allowed.push(Method::HEAD);
            let head = web::route().method(Method::HEAD).to(handler);
            self.resource = self.resource.route(head);
        }
        self
    }
}

impl HttpServiceFactory for Endpoint {
    fn register(self, config: &mut AppService) {
        let allowed = self.allowed;
        let refuse = move |req: HttpRequest| {
            let allowed = allowed.clone();
            async move { method_not_allowed(&req, allowed) }
        };
        self.resource
            .default_service(web::to(refuse))
            .register(config);
    }
}

fn method_not_allowed(req: &HttpRequest, allowed: Vec<Method>) -> HttpResponse {
    let served: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    let error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!(
            "`{}` is not allowed on {}; it serves {}",
            req.method(),
            req.path(),
            served.join(", ")
        ),
    );
    HttpResponse::build(error.status())
        .insert_header(Allow(allowed))
        .json(ErrorEnvelope {
            error: error.body().clone(),
        })
}
