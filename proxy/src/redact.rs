//! Keeps secrets out of `/config` and logs.

use crate::config::Config;

/// The config as `/config` shows it. Nothing in it is secret yet (TLS keys
/// are file paths, not contents); credentials added later are masked here.
pub fn config(c: &Config) -> Config {
    c.clone()
}
