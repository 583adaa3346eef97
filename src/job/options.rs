//! Backend options: settings that belong to one backend (`gguf_dtype`, `nnef`, ...),
//! carried by a job as plain names and values, declared by each backend
//! ([`crate::backend::Backend::options`]) and read by it into its own typed options.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A job's backend options, by name. Checked against the backend's
/// [`OptionSpec`]s when the job is resolved ([`super::request`]); each backend parses
/// them into its own typed options.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendOptions(BTreeMap<String, String>);

impl BackendOptions {
    /// The value of option `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Sets option `name` to `value`.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    /// Every option set, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether option `name` is `"true"` (`default` when unset).
    pub fn flag(&self, name: &str, default: bool) -> bool {
        self.get(name).map_or(default, |v| v == "true")
    }
}

/// One option a backend takes.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    /// Its name (`gguf_dtype`).
    pub name: &'static str,
    /// The values it takes.
    pub values: &'static [&'static str],
    /// What it does.
    pub help: &'static str,
}

impl OptionSpec {
    /// A `true` / `false` option.
    pub const fn flag(name: &'static str, help: &'static str) -> OptionSpec {
        OptionSpec {
            name,
            values: &["true", "false"],
            help,
        }
    }
}
