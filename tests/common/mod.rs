//! Test harness: a real `consul agent -dev` on free loopback ports, real HTTP backends and
//! raw TCP backends on 127.0.0.1:0, the router in-process or as the real binary, HTTP and
//! raw clients, and waits on events. `use common::*;` brings in everything below.
//!
//! - `consul`: [`ConsulAgent`], a dev agent of the test's own.
//! - `fake_consul`: a scripted fake Consul for what a real agent cannot be made to do.
//! - `router`: [`start_router`] (in-process) and [`RouterProcess`] (the binary).
//! - `backend`: [`Backend`] (an echoing HTTP backend) and [`serve_http`].
//! - `raw`: [`RawBackend`] (exact bytes per connection, scripted answers), raw clients.
//! - `client`: whole HTTP responses ([`get`], [`send`], [`h2`]) and the admin API.
//! - `metrics`: samples of `/metrics`.
//! - `process`: child processes with captured output ([`Process`]).
//! - `wait`: [`wait_until`] and friends.
//! - `tls_client`: [`tls_connect`], a TLS client that accepts any certificate.
//! - `net`, `temp`, `tools`: free ports and TCP states, temporary directories, programs.
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod fake_consul;

pub mod backend;
pub mod client;
pub mod consul;
pub mod metrics;
pub mod net;
pub mod process;
pub mod raw;
pub mod router;
pub mod temp;
pub mod tls_client;
pub mod tools;
pub mod wait;

pub use backend::*;
pub use client::*;
pub use consul::*;
pub use metrics::*;
pub use net::*;
pub use process::*;
pub use raw::*;
pub use router::*;
pub use temp::*;
pub use tools::*;
pub use wait::*;
