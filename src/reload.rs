//! [`Running::reload`] (SIGHUP): what changed between two configurations, and putting the
//! new one in force.

use std::sync::Arc;

use crate::config::Config;
use crate::consul::{AbortOnDrop, ConsulClient, Discovery};
use crate::listener::activation::Role;
use crate::{
    bind, build_options, open_access_log, proxy, reap_idle, spawn_admin, spawn_proxy, Running,
    StartError,
};

/// What a reload changed, by configuration key.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Keys whose new values are in force.
    pub applied: Vec<&'static str>,
    /// Keys that changed but take effect only at the next start.
    pub need_restart: Vec<&'static str>,
}

/// Keys read only at start: the runtime's threads and the log subscriber.
/// `tls` and `proxy_protocol` change what a listener puts in front of HTTP, which a bound
/// listener keeps; certificate files themselves are re-read at every reload.
const NEED_RESTART: [&str; 4] = ["workers", "log_format", "tls", "proxy_protocol"];

impl Running {
    /// Puts `cfg` in force (SIGHUP). Whatever can fail is done first (binding moved
    /// listeners, opening a new access log file, a new Consul client), so an error leaves the
    /// old configuration whole. Then: moved listeners take over and the old ones drain; new
    /// connections get the new proxy settings while open ones keep theirs; the table is
    /// rebuilt from the answers already held with the new domains and policies (a changed
    /// `[consul]` section restarts discovery, keeping the live table until the new one is
    /// ready); the admin token changes at once. `workers` and `log_format` need a restart.
    pub async fn reload(&mut self, cfg: Config) -> Result<Reloaded, StartError> {
        let old = &self.config;
        let mut done = Reloaded::default();
        for key in changed_keys(old, &cfg) {
            if NEED_RESTART.contains(&key) {
                done.need_restart.push(key);
            } else {
                done.applied.push(key);
            }
        }
        // A listener whose address did not change keeps its socket (an inherited one too).
        let proxy_bind = if cfg.listen != old.listen {
            Some(bind(&mut self.inherited, Role::Http, cfg.listen).await?)
        } else {
            None
        };
        let admin_bind = if cfg.admin_listen != old.admin_listen {
            Some(bind(&mut self.inherited, Role::Admin, cfg.admin_listen).await?)
        } else {
            None
        };
        let access_log =
            if (cfg.access_log, &cfg.access_log_file) != (old.access_log, &old.access_log_file) {
                open_access_log(&cfg)?
            } else {
                self.access_log.clone()
            };
        let consul = if cfg.consul != old.consul {
            Some(ConsulClient::new(&cfg.consul)?)
        } else {
            None
        };

        // SIGHUP re-reads the certificate files (a bad one keeps the old certificate).
        if let Some(side) = &self.tls {
            crate::log_reload(&side.tls.store.reload());
        }
        // Nothing can fail from here on.
        self.access_log = access_log;
        self.proxy.store(Arc::new(proxy::Proxy::new(
            &cfg,
            self.routes.clone(),
            self.access_log.clone(),
        )));
        if let Some((listener, addr)) = proxy_bind {
            let new = spawn_proxy(
                listener,
                self.proxy.clone(),
                cfg.proxy_protocol,
                self.limit.clone(),
                None,
            );
            let old = std::mem::replace(&mut self.proxy_listener, new);
            self.retired.push(old.retire());
            self.proxy_addr = addr;
        }
        if let Some((listener, addr)) = admin_bind {
            let new = spawn_admin(listener, self.admin.clone(), self.proxy.clone());
            let old = std::mem::replace(&mut self.admin_listener, new);
            self.retired.push(old.retire());
            self.admin_addr = addr;
        }
        self.retired.retain(|t| !t.is_finished());
        self.admin.set_token(cfg.admin_token.clone());
        if cfg.proxy.max_connections != old.proxy.max_connections {
            self.limit.set_max(cfg.proxy.max_connections);
        }
        if cfg.proxy.idle_timeout != old.proxy.idle_timeout {
            let reaper = tokio::spawn(reap_idle(self.routes.clone(), cfg.proxy.idle_timeout));
            self.reaper = AbortOnDrop(reaper.abort_handle());
        }
        match consul {
            Some(client) => {
                self.discovery = Discovery::new(
                    client,
                    cfg.consul.clone(),
                    build_options(&cfg),
                    self.routes.clone(),
                )
                .spawn();
            }
            None => self.discovery.reconfigure(build_options(&cfg)),
        }
        self.config = cfg;
        Ok(done)
    }
}

/// `changed!(a, b; field, ...)`: the named fields that differ between two `Config`s, by name.
/// The pattern lists every field with no `..`, so a field added to `Config` fails to compile
/// until it is named here; the key is the field's own name (a section counts as one key).
macro_rules! changed {
    ($a:ident, $b:ident; $($field:ident),* $(,)?) => {{
        let Config { $($field: _),* } = $a;
        let mut keys = Vec::new();
        $(
            if $a.$field != $b.$field {
                keys.push(stringify!($field));
            }
        )*
        keys
    }};
}

/// The top-level keys whose values differ between `a` and `b`, in the file's order.
pub(crate) fn changed_keys(a: &Config, b: &Config) -> Vec<&'static str> {
    changed!(a, b;
        listen,
        proxy_protocol,
        admin_listen,
        admin_token,
        domains,
        strategy,
        workers,
        trusted_proxies,
        include_warning,
        hash_query,
        exclude_services,
        expose,
        underscore_headers,
        access_log,
        access_log_file,
        log_format,
        consul,
        proxy,
        tls,
        upstream_tls,
        static_services,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        let file = Config::parse_file(text, Path::new("t.toml")).unwrap();
        Config::from_file(file, &Default::default()).unwrap()
    }

    #[test]
    fn changed_keys_follow_the_values() {
        let a = Config::default();
        assert!(changed_keys(&a, &a.clone()).is_empty());
        // Written out as the default, a key has not changed.
        assert!(changed_keys(&a, &config("listen = \"127.0.0.1:8080\"")).is_empty());
        let b = config(
            "listen = \"127.0.0.1:81\"\nproxy_protocol = \"v2\"\nworkers = 2\n\
             [proxy]\nretries = 3\n[tls]\nlisten = \"127.0.0.1:8443\"\n\
             [[tls.certs]]\ncert = \"a.pem\"\nkey = \"a.key\"",
        );
        assert_eq!(
            changed_keys(&a, &b),
            ["listen", "proxy_protocol", "workers", "proxy", "tls"]
        );
    }

    #[test]
    fn every_key_is_named_as_in_the_file() {
        // Every key set to a value other than its default.
        let all = config(
            "listen = \"127.0.0.1:1\"\nproxy_protocol = \"v1\"\nadmin_listen = \"127.0.0.1:2\"\n\
             admin_token = \"t\"\ndomains = [\"a.test\"]\nstrategy = \"ip-hash\"\nworkers = 2\n\
             trusted_proxies = []\ninclude_warning = true\nhash_query = false\n\
             exclude_services = []\nexpose = \"tagged\"\nunderscore_headers = \"all\"\n\
             access_log = \"json\"\naccess_log_file = \"a.log\"\nlog_format = \"json\"\n\
             [consul]\nstale = false\n[proxy]\nretries = 3\n\
             [tls]\nlisten = \"127.0.0.1:3\"\ncerts = [{ cert = \"c\", key = \"k\" }]",
        );
        let keys = changed_keys(&Config::default(), &all);
        assert_eq!(keys.len(), 19, "{keys:?}");
        for key in keys {
            // A name the file does not know would be refused as unknown, whatever its value.
            let e = Config::parse_file(&format!("{key} = 0"), Path::new("t"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!e.contains("unknown field"), "{key}: {e}");
        }
    }
}
