//! One request on a fresh upstream connection, closed afterwards: the control plane's calls to
//! providers (health checks, token refreshes), through the proxy's own connector, TLS and
//! HTTP/1.1 client.

use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;
use relay_filters::context::UpstreamRequest;

use super::dns::Resolver;
use super::upstream_h1::H1Upstream;

/// Sends requests, each on a connection of its own.
pub struct OneShot {
    connector: pingora::connectors::TransportConnector,
    resolver: Resolver,
    /// Longest wait for connecting, writing and each read.
    timeout: Duration,
}

impl OneShot {
    /// A client with its own connector (default TLS settings).
    pub fn new(timeout: Duration) -> Self {
        OneShot {
            connector: pingora::connectors::TransportConnector::new(None),
            resolver: Resolver::default(),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req` with `body`, reads the status and the body up to `limit` bytes, waiting for
    /// the body at most `body_wait` once the head is in (what came by then is kept; the
    /// answer says whether the body came whole).
    pub async fn exchange(
        &self,
        req: &UpstreamRequest,
        body: &[u8],
        limit: usize,
        body_wait: Duration,
    ) -> Result<Answer, String> {
        let addr = self
            .resolver
            .resolve(&req.host, req.port)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", req.host))?;
        let mut peer = HttpPeer::new(addr, req.tls, req.host.to_string());
        peer.options.connection_timeout = Some(self.timeout);
        peer.options.total_connection_timeout = Some(self.timeout);
        peer.options.read_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        let stream = self
            .connector
            .new_stream(&peer)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        // A silence in the body may last as long as the body may take.
        let mut up = H1Upstream::new(stream, Some(self.timeout.max(body_wait)));
        up.send(req, body)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let head = up
            .read_head()
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let mut answer = Vec::new();
        let mut complete = false;
        let _ = tokio::time::timeout(body_wait, async {
            while answer.len() < limit {
                match up.read_body().await {
                    Ok(Some(piece)) => answer.extend_from_slice(&piece),
                    Ok(None) => {
                        complete = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        })
        .await;
        complete &= answer.len() <= limit;
        answer.truncate(limit);
        up.shutdown().await;
        Ok(Answer {
            status: head.status.as_u16(),
            body: answer,
            complete,
        })
    }
}

/// What came back.
pub struct Answer {
    pub status: u16,
    /// The body, or its start.
    pub body: Vec<u8>,
    /// Whether the body came whole (within the limit and the wait).
    pub complete: bool,
}
