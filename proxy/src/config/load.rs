//! Reading a config file: parse, environment overrides, validation.

use std::path::Path;

use super::{Config, ConfigError, Env};

// === impl Config ===

impl Config {
    /// Reads, parses, applies environment overrides and validates a file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let mut config = Self::parse(&text).map_err(|cause| ConfigError::Parse {
            path: path.to_owned(),
            cause,
        })?;
        config.apply_env(env);
        let problems = config.validate(path.parent());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// The config as `/config` shows it: Redis passwords masked (the
    /// environment's credentials are never serialized).
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if let Some(r) = &mut c.limiter.redis {
            r.url = r
                .url
                .as_deref()
                .map(|u| crate::redact::url(u, crate::redact::Bare::Password));
            r.urls = r
                .urls
                .iter()
                .map(|u| crate::redact::url(u, crate::redact::Bare::Password))
                .collect();
        }
        c
    }

    /// Parses YAML text (no validation).
    pub fn parse(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Err("the file is empty; see config/dev.yaml for an example".into());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }
}
