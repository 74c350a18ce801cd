//! The proxy's listening service: its accept loop and the task of each client connection.
//!
//! Pingora's listening service spawns, for every accepted connection, a task whose future holds
//! the listener's handshake (its TLS path included, also on plain TCP: 8.1 KB) beside the application's
//! own connection future, which `ServerApp` boxes apart (3.7 KB). Both lived as long as the
//! connection: about 14 KiB of allocator blocks per open stream or idle keep-alive connection,
//! most of it never used after the first poll. Here a connection is one task whose future is
//! the relay's connection loop; a TLS handshake runs boxed and is freed once done.
//!
//! The listener is the socket the node bound at start (so the address is never let go and
//! taken again), with Pingora's backlog. Graceful upgrades (listening sockets handed over from
//! an old process) are not used by the relay, so the service takes none.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::{ListenFds, ShutdownWatch};
use tokio::net::{TcpListener, TcpStream};

use super::RelayProxy;

/// Pending connections the kernel may queue (Pingora's value; Linux caps it at `somaxconn`).
const BACKLOG: i32 = 65535;
/// Longest time a client may take to finish a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause of the accept loop when the process is out of file descriptors or kernel memory.
const NO_FDS_PAUSE: Duration = Duration::from_secs(1);

/// The proxy's Pingora service: accepts client connections on the node's proxy socket and
/// serves each in a task of its own.
pub struct ProxyService {
    name: String,
    listener: Option<std::net::TcpListener>,
    tls: Option<Arc<Acceptor>>,
    app: Arc<RelayProxy>,
}

impl ProxyService {
    /// A service over `listener` (already bound), with TLS when `tls` is given.
    pub fn new(
        name: &str,
        listener: std::net::TcpListener,
        tls: Option<Arc<pingora::tls::ServerConfig>>,
        app: RelayProxy,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        // A second `listen` on a listening socket sets its backlog (std binds with a small one).
        // SAFETY: `listen` on a descriptor this listener owns; no memory is passed.
        if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            name: name.to_string(),
            listener: Some(listener),
            tls: tls.map(|config| Arc::new(Acceptor::from_server_config(config))),
            app: Arc::new(app),
        })
    }

    /// Accepts connections until shutdown begins; each is served by a task of its own.
    async fn accept_loop(&self, listener: TcpListener, mut shutdown: ShutdownWatch) {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            match accepted {
                Ok((tcp, _)) => {
                    let app = self.app.clone();
                    let tls = self.tls.clone();
                    let shutdown = shutdown.clone();
                    // Pingora's handle: with work stealing off it names one of the service's
                    // single-threaded runtimes at random, so connections spread over the threads
                    // (`tokio::spawn` would keep them all on the accepting one).
                    pingora_runtime::current_handle().spawn(connection(app, tcp, tls, shutdown));
                }
                Err(e) => match e.raw_os_error() {
                    // A client gone before its connection was taken: routine.
                    Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO) => {
                        tracing::debug!(error = %e, "a client left before its connection was accepted");
                    }
                    // Out of descriptors or kernel memory: `accept` would fail again at once
                    // until connections close.
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        tracing::error!(error = %e, "accepting a client connection failed; pausing a second");
                        tokio::time::sleep(NO_FDS_PAUSE).await;
                    }
                    _ => tracing::error!(error = %e, "accepting a client connection failed"),
                },
            }
        }
    }
}

/// One client connection, from its TLS handshake (when the listener has TLS) to its end.
async fn connection(
    app: Arc<RelayProxy>,
    tcp: TcpStream,
    tls: Option<Arc<Acceptor>>,
    shutdown: ShutdownWatch,
) {
    // Answers leave in whole pieces (head and body in one vectored write): Nagle would only
    // delay the last one.
    let _ = tcp.set_nodelay(true);
    let stream = L4Stream::from(tcp);
    let stream: Stream = match tls {
        None => Box::new(stream),
        // Boxed: the handshake's future is large and needed only until it is done.
        Some(acceptor) => {
            let handshake = Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, async move {
                acceptor.tls_handshake(stream).await
            }));
            match handshake.await {
                Ok(Ok(tls)) => Box::new(tls),
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "client TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!("client TLS handshake timed out");
                    return;
                }
            }
        }
    };
    app.serve_connection(stream, &shutdown).await;
}

#[async_trait]
impl pingora::services::Service for ProxyService {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                // E.g. a socket the reactor cannot register: nothing is served without it.
                tracing::error!(error = %e, "the proxy cannot listen; stopping");
                crate::log_sink::flush_global();
                std::process::exit(1);
            }
        };
        self.app.pool.start_sweeping();
        self.accept_loop(listener, shutdown).await;
    }

    fn name(&self) -> &str {
        &self.name
    }
}
