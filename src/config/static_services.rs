//! `[[static_services]]`: services with fixed instances, routed like Consul's and merged with
//! them, so the router works with no Consul at all and keeps a few fixed backends beside it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::balance::Strategy;

/// Largest weight of a static instance (Consul's own weights are small numbers too).
pub const MAX_STATIC_WEIGHT: u32 = 1000;

/// One `[[static_services]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStaticService {
    /// Service name: `<name>.<domain>` routes to it.
    pub name: String,
    /// Strategy; the top-level `strategy` when absent.
    pub strategy: Option<String>,
    /// Extra hosts, like `router.host=` tags.
    pub hosts: Option<Vec<String>>,
    /// `"host:port"` or `{ address = "host:port", weight = 2 }`.
    pub instances: Vec<FileStaticInstance>,
}

/// One instance as written.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileStaticInstance {
    /// `"10.0.0.5:8080"`
    Address(String),
    /// `{ address = "10.0.0.7:8080", weight = 2 }`
    Table {
        /// `host:port`
        address: String,
        /// Share of the traffic, 1 by default.
        weight: Option<u32>,
    },
}

/// A validated static service.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticService {
    /// Its name.
    pub name: String,
    /// Its strategy, if it names one.
    pub strategy: Option<Strategy>,
    /// Extra hosts, as written (normalised when the table is built).
    pub hosts: Vec<String>,
    /// Its instances, never empty.
    pub instances: Vec<StaticInstance>,
}

/// A validated static instance.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticInstance {
    /// An IP, or a host name resolved like a Consul instance's (once per `consul.dns_ttl`).
    pub host: String,
    /// The port.
    pub port: u16,
    /// Weight, 1 to [`MAX_STATIC_WEIGHT`].
    pub weight: u32,
}

/// Checks every entry: a name given once, a known strategy, at least one instance, each a
/// `host:port` given once with a weight from 1 to [`MAX_STATIC_WEIGHT`].
pub(super) fn validate(
    file: Option<Vec<FileStaticService>>,
) -> Result<Arc<[StaticService]>, ConfigError> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, s) in file.unwrap_or_default().into_iter().enumerate() {
        let at = |m: String| invalid("static_services", format!("entry {}: {m}", i + 1));
        let name = s.name.trim();
        if name.is_empty() || name.contains(['/', ' ']) {
            return Err(at(format!("name {:?} must be a service name", s.name)));
        }
        if !names.insert(name.to_ascii_lowercase()) {
            return Err(at(format!("name {name:?} is given twice")));
        }
        let strategy = s
            .strategy
            .as_deref()
            .map(str::parse::<Strategy>)
            .transpose()
            .map_err(|e| at(format!("{name:?}: strategy: {e}")))?;
        if s.instances.is_empty() {
            return Err(at(format!("{name:?}: instances must not be empty")));
        }
        let mut instances: Vec<StaticInstance> = Vec::with_capacity(s.instances.len());
        for inst in s.instances {
            let (address, weight) = match inst {
                FileStaticInstance::Address(a) => (a, None),
                FileStaticInstance::Table { address, weight } => (address, weight),
            };
            let weight = weight.unwrap_or(1);
            if weight == 0 || weight > MAX_STATIC_WEIGHT {
                return Err(at(format!(
                    "{name:?}: instance {address:?}: weight must be 1 to {MAX_STATIC_WEIGHT}"
                )));
            }
            let (host, port) = host_port(&address)
                .ok_or_else(|| at(format!("{name:?}: {address:?} is not host:port")))?;
            if instances.iter().any(|i| i.host == host && i.port == port) {
                return Err(at(format!("{name:?}: {address:?} is given twice")));
            }
            instances.push(StaticInstance { host, port, weight });
        }
        out.push(StaticService {
            name: name.to_owned(),
            strategy,
            hosts: s.hosts.unwrap_or_default(),
            instances,
        });
    }
    Ok(out.into())
}

/// `IP:port`, `[v6]:port` or `name:port` with a non-zero port; the host comes out without
/// brackets. A name is letters, digits, `-` and `.`.
fn host_port(s: &str) -> Option<(String, u16)> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return (addr.port() != 0).then(|| (addr.ip().to_string(), addr.port()));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !host.starts_with(['-', '.']);
    name_ok.then(|| (host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn parse(text: &str) -> Result<Arc<[StaticService]>, String> {
        let file = Config::parse_file(text, Path::new("t.toml")).map_err(|e| e.to_string())?;
        Config::from_file(file, &Default::default())
            .map(|c| c.static_services)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn good_entries() {
        assert!(parse("").unwrap().is_empty());
        let s = parse(
            "[[static_services]]\nname = \"legacy\"\nstrategy = \"least-load\"\n\
             hosts = [\"old.example.com\"]\n\
             instances = [\"10.0.0.5:8080\", \"[::1]:81\", { address = \"Db.Local:5432\", weight = 2 }]\n\
             [[static_services]]\nname = \"two\"\ninstances = [{ address = \"127.0.0.1:1\" }]",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "legacy");
        assert_eq!(s[0].strategy, Some(Strategy::LeastLoad));
        assert_eq!(s[0].hosts, ["old.example.com"]);
        let inst: Vec<(&str, u16, u32)> = s[0]
            .instances
            .iter()
            .map(|i| (i.host.as_str(), i.port, i.weight))
            .collect();
        assert_eq!(
            inst,
            [("10.0.0.5", 8080, 1), ("::1", 81, 1), ("db.local", 5432, 2)]
        );
        assert_eq!(s[1].strategy, None);
        assert_eq!(s[1].instances[0].weight, 1);
    }

    #[test]
    fn bad_entries_are_named() {
        let one = |body: &str| parse(&format!("[[static_services]]\n{body}")).unwrap_err();
        for (body, want) in [
            (
                "name = \"a\"\ninstances = []",
                "static_services: entry 1: \"a\": instances must not be empty",
            ),
            (
                "name = \"a\"\ninstances = [\"10.0.0.5\"]",
                "static_services: entry 1: \"a\": \"10.0.0.5\" is not host:port",
            ),
            (
                "name = \"a\"\ninstances = [\"10.0.0.5:0\"]",
                "static_services: entry 1: \"a\": \"10.0.0.5:0\" is not host:port",
            ),
            (
                "name = \"a\"\ninstances = [\"bad host:80\"]",
                "static_services: entry 1: \"a\": \"bad host:80\" is not host:port",
            ),
            (
                "name = \"a\"\ninstances = [{ address = \"10.0.0.5:80\", weight = 0 }]",
                "static_services: entry 1: \"a\": instance \"10.0.0.5:80\": weight must be 1 to 1000",
            ),
            (
                "name = \"a\"\ninstances = [{ address = \"10.0.0.5:80\", weight = 1001 }]",
                "static_services: entry 1: \"a\": instance \"10.0.0.5:80\": weight must be 1 to 1000",
            ),
            (
                "name = \"a\"\ninstances = [\"10.0.0.5:80\", \"10.0.0.5:80\"]",
                "static_services: entry 1: \"a\": \"10.0.0.5:80\" is given twice",
            ),
            (
                "name = \"\"\ninstances = [\"10.0.0.5:80\"]",
                "static_services: entry 1: name \"\" must be a service name",
            ),
        ] {
            assert_eq!(one(body), want, "{body}");
        }
        let e = one("name = \"a\"\nstrategy = \"round-robin\"\ninstances = [\"1.2.3.4:80\"]");
        assert!(
            e.starts_with("static_services: entry 1: \"a\": strategy:"),
            "{e}"
        );
        let e = parse(
            "[[static_services]]\nname = \"a\"\ninstances = [\"1.2.3.4:80\"]\n\
             [[static_services]]\nname = \"A\"\ninstances = [\"1.2.3.4:81\"]",
        )
        .unwrap_err();
        assert_eq!(e, "static_services: entry 2: name \"A\" is given twice");
        // Unknown keys are refused by name.
        let e = one("name = \"a\"\ninstance = [\"1.2.3.4:80\"]");
        assert!(e.contains("instance"), "{e}");
    }
}
