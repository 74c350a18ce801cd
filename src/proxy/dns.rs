//! Asynchronous, cached resolution of upstream host names (`HttpPeer::new` with a host name
//! would resolve blocking on the hot path and panic on failure).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Host:port → address, cached for a minute.
pub struct Resolver {
    cache: moka::sync::Cache<(Arc<str>, u16), SocketAddr>,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver {
            cache: moka::sync::Cache::builder()
                .max_capacity(4096)
                .time_to_live(Duration::from_secs(60))
                .build(),
        }
    }
}

impl Resolver {
    /// Resolves `host:port`, from the cache when possible.
    pub async fn resolve(&self, host: &Arc<str>, port: u16) -> std::io::Result<SocketAddr> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let key = (host.clone(), port);
        if let Some(addr) = self.cache.get(&key) {
            return Ok(addr);
        }
        let addr = tokio::net::lookup_host((&**host, port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{host} has no address")))?;
        self.cache.insert(key, addr);
        Ok(addr)
    }
}
