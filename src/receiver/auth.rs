//! Sender authentication: bearer tokens and API keys, compared in constant time.

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::config::AuthConfig;

/// Checks a request's credentials. Tokens are kept as SHA-256 digests and compared with
/// `subtle`, so neither a token's content nor its length shows in the time a check takes.
pub struct Authenticator {
    bearer: Vec<[u8; 32]>,
    api_keys: Vec<[u8; 32]>,
    api_key_header: HeaderName,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// True when `presented` matches one of `known`; every entry is compared, always.
fn matches(known: &[[u8; 32]], presented: &[u8]) -> bool {
    let d = digest(presented);
    known
        .iter()
        .fold(subtle::Choice::from(0), |found, k| found | k.ct_eq(&d))
        .into()
}

impl Authenticator {
    /// `None` when no credentials are configured (authentication off).
    pub fn new(cfg: &AuthConfig) -> Option<Authenticator> {
        if cfg.bearer_tokens.is_empty() && cfg.api_keys.is_empty() {
            return None;
        }
        Some(Authenticator {
            bearer: cfg
                .bearer_tokens
                .iter()
                .map(|t| digest(t.as_bytes()))
                .collect(),
            api_keys: cfg.api_keys.iter().map(|t| digest(t.as_bytes())).collect(),
            api_key_header: HeaderName::from_bytes(cfg.api_key_header.as_bytes())
                .unwrap_or(HeaderName::from_static("x-api-key")),
        })
    }

    /// Whether the request carries a valid bearer token or API key (gRPC metadata arrives
    /// as HTTP/2 headers, so one check serves both protocols).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|token| matches(&self.bearer, token));
        let api_key = headers
            .get(&self.api_key_header)
            .is_some_and(|v| matches(&self.api_keys, v.as_bytes()));
        bearer | api_key
    }

    /// [`Authenticator::allows`], or HTTP basic authentication whose password is one of
    /// the bearer tokens (the user name is ignored): what a browser can send to the admin
    /// server's status page after asking for it.
    pub fn allows_person(&self, headers: &HeaderMap) -> bool {
        use base64::Engine;
        let basic = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|pair| {
                let colon = pair.iter().position(|&c| c == b':')?;
                Some(matches(&self.bearer, &pair[colon + 1..]))
            })
            .unwrap_or(false);
        self.allows(headers) | basic
    }
}

/// The message of a refused request.
pub const UNAUTHENTICATED: &str = "missing or invalid credentials: send \"authorization: Bearer <token>\" or the configured API key header";

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            bearer_tokens: vec!["token-aaaaaaaaaaaaaaaa".into()],
            api_keys: vec!["key-bbbbbbbbbbbbbbbbbb".into()],
            api_key_header: "x-llmtail-key".into(),
        })
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens_and_api_keys_are_checked_in_their_own_headers() {
        let a = auth();
        assert!(a.allows(&headers(&[(
            "authorization",
            "Bearer token-aaaaaaaaaaaaaaaa"
        )])));
        assert!(a.allows(&headers(&[("x-llmtail-key", "key-bbbbbbbbbbbbbbbbbb")])));
        assert!(!a.allows(&headers(&[])));
        assert!(!a.allows(&headers(&[(
            "authorization",
            "Bearer token-aaaaaaaaaaaaaaab"
        )])));
        assert!(!a.allows(&headers(&[("authorization", "token-aaaaaaaaaaaaaaaa")])));
        // A key is not a token and a token is not a key.
        assert!(!a.allows(&headers(&[(
            "authorization",
            "Bearer key-bbbbbbbbbbbbbbbbbb"
        )])));
        assert!(!a.allows(&headers(&[("x-llmtail-key", "token-aaaaaaaaaaaaaaaa")])));
        assert!(!a.allows(&headers(&[("x-api-key", "key-bbbbbbbbbbbbbbbbbb")])));
    }

    #[test]
    fn no_credentials_configured_means_no_check() {
        assert!(Authenticator::new(&AuthConfig::default()).is_none());
    }
}
