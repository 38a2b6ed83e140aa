//! HTTP/1.1 upgrades (WebSocket and others): after the backend's 101, both connections are
//! joined and bytes copied both ways until either side closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::InFlight;
use super::pool::Sender;

/// Spawns the tunnel between the client's and the backend's upgraded connections.
pub fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    sender: Sender,
    in_flight: InFlight,
    gauge: metrics::Gauge,
) {
    tokio::spawn(async move {
        let upgraded = tokio::try_join!(client, backend);
        // The backend connection now belongs to the tunnel; it never returns to the pool.
        drop(sender);
        let (client, backend) = match upgraded {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        gauge.increment(1.0);
        let mut client = TokioIo::new(client);
        let mut backend = TokioIo::new(backend);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
            tracing::debug!(error = %e, "upgraded connection ended with error");
        }
        gauge.decrement(1.0);
        drop(in_flight);
    });
}
