//! The access log and the router's own logs: `access_log`, `access_log_file`, `log_format`
//! (top-level keys).

use std::path::PathBuf;

use super::parse::parse_choice;
use super::{invalid, ConfigError, Overrides};
use crate::access_log;

/// The format of the router's own logs (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// This group's keys as written (taken from the top level of the file).
#[derive(Debug, Default)]
pub(super) struct FileLogs {
    /// `access_log`
    pub access_log: Option<String>,
    /// `access_log_file`
    pub access_log_file: Option<String>,
    /// `log_format`
    pub log_format: Option<String>,
}

/// This group, validated.
#[derive(Debug)]
pub(super) struct LogsConfig {
    /// Access log format (`Off`: none).
    pub access_log: access_log::Format,
    /// Access log file; `None` is standard output.
    pub access_log_file: Option<PathBuf>,
    /// Format of the router's own logs.
    pub log_format: LogFormat,
}

/// Checks the log keys; the flags win, and an empty file name means standard output. The
/// file is opened at start, not here.
pub(super) fn validate(file: FileLogs, o: &Overrides) -> Result<LogsConfig, ConfigError> {
    let access_log = match o.access_log.as_deref().or(file.access_log.as_deref()) {
        None => access_log::Format::Off,
        Some(s) => s.parse().map_err(|e: String| invalid("access_log", e))?,
    };
    let access_log_file = o
        .access_log_file
        .as_deref()
        .or(file.access_log_file.as_deref())
        .filter(|f| !f.is_empty())
        .map(PathBuf::from);
    let log_format = parse_choice(
        "log_format",
        o.log_format.as_deref().or(file.log_format.as_deref()),
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
    )?;
    Ok(LogsConfig {
        access_log,
        access_log_file,
        log_format,
    })
}
