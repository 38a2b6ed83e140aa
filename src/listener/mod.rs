//! What happens on an accepted connection before HTTP: the PROXY protocol header.

pub mod proxy_protocol;
