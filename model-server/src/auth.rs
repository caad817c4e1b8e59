//! Bearer-token authentication for the w2s.v1 services (health and reflection stay open).

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::ConfigError;

/// Server side: accepts a request when no token is configured or its `authorization` header
/// is `Bearer <token>`.
#[derive(Clone)]
pub struct RequireBearer {
    expected: Option<Vec<u8>>,
}

impl RequireBearer {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {t}").into_bytes()),
        }
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("missing or invalid bearer token"))
        }
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone)]
pub struct AddBearer {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AddBearer {
    pub fn new(token: Option<&str>) -> Result<Self, ConfigError> {
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ConfigError::from("the token must be printable ASCII"))
            })
            .transpose()?;
        Ok(Self { header })
    }
}

impl Interceptor for AddBearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_checks() {
        let mut open = RequireBearer::new(None);
        assert!(open.call(Request::new(())).is_ok());
        let mut guarded = RequireBearer::new(Some("s3cret"));
        assert!(guarded.call(Request::new(())).is_err());
        let mut add = AddBearer::new(Some("s3cret")).unwrap();
        let request = add.call(Request::new(())).unwrap();
        assert!(guarded.call(request).is_ok());
        let mut wrong = AddBearer::new(Some("nope")).unwrap();
        assert!(guarded.call(wrong.call(Request::new(())).unwrap()).is_err());
    }
}
