//! Environment overrides: addresses and the Redis URL from `TOLLGATE_*`
//! variables, Redis credentials only from the environment.

use super::{Config, RedisStore, Secret};

/// Where environment overrides come from; tests hand in a map.
pub trait Env {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<S: std::hash::BuildHasher> Env for std::collections::HashMap<&str, &str, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

// === impl Config ===

impl Config {
    /// `TOLLGATE_LISTEN` and `TOLLGATE_ADMIN_LISTEN` replace the addresses,
    /// `TOLLGATE_REDIS_URL` the Redis URL; `TOLLGATE_REDIS_USERNAME` and
    /// `TOLLGATE_REDIS_PASSWORD` are the credentials for every Redis URL.
    pub fn apply_env(&mut self, env: &dyn Env) {
        if let Some(a) = env.var("TOLLGATE_LISTEN").filter(|a| !a.is_empty()) {
            self.listener.address = a;
        }
        if let Some(a) = env.var("TOLLGATE_ADMIN_LISTEN").filter(|a| !a.is_empty()) {
            self.admin.address = a;
        }
        if let Some(u) = env.var("TOLLGATE_REDIS_URL").filter(|u| !u.is_empty()) {
            self.limiter
                .redis
                .get_or_insert_with(RedisStore::default)
                .url = Some(u);
        }
        let secret = |name| env.var(name).filter(|v| !v.is_empty()).map(Secret);
        let (username, password) = (
            secret("TOLLGATE_REDIS_USERNAME"),
            secret("TOLLGATE_REDIS_PASSWORD"),
        );
        if let Some(r) = self.limiter.redis.as_mut() {
            r.username = username;
            r.password = password;
        }
    }
}
