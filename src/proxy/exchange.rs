//! The upstream exchange done by the relay itself through Pingora's connector: send the buffered
//! body, fail over before the first byte reaches the client, then pump the response chunk by
//! chunk through the response filters while watching the client (DESIGN §5).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use pingora::http::ResponseHeader;
use pingora::upstreams::peer::HttpPeer;
use pingora::upstreams::peer::Peer as _;
use relay_filters::account_state::{
    apply_outcome, body_reset_hint, classify_error, reset_hint, Fault, Outcome,
};
use relay_filters::chain::ChunkAction;
use relay_filters::context::UpstreamRequest;
use relay_filters::error::{stream_error_event, ErrorKind};

use super::upstream_h1::{H1Error, H1Upstream, UpstreamHead};
use super::{now_ms, upstream_error_body, ProxyCtx, RelayProxy, Session};
use crate::metrics::metrics;

/// Hop-by-hop headers never copied from the upstream response.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Upstream answer headers that name the operator's provider account (its organization, its
/// project) or carry its cookies: not passed to tenants.
const ACCOUNT_HEADERS: &[&str] = &[
    "anthropic-organization-id",
    "openai-organization",
    "openai-project",
    "set-cookie",
];

/// Most bytes gathered from already-buffered upstream chunks into one client write.
const COALESCE_LIMIT: usize = 64 * 1024;

/// How long an answer is awaited after the request could not be written whole.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Largest error body read from an upstream answer that triggers failover.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Error statuses whose (small) body is read before deciding: it may say the account, not the
/// request, failed (a disabled organization, no credit left, a bad key) or, for a 403, that
/// the refusal is about a resource the request named.
fn reads_error_body(status: u16) -> bool {
    matches!(status, 400..=403)
}

/// Why an attempt did not produce a usable response head.
enum AttemptError {
    Connect(String),
    Timeout(String),
}

struct Attempt {
    upstream: H1Upstream,
    peer: HttpPeer,
    head: UpstreamHead,
    /// The start of the body, read already to classify an error answer.
    read_ahead: Option<Bytes>,
}

impl RelayProxy {
    async fn peer_for(&self, req: &UpstreamRequest) -> Result<HttpPeer, AttemptError> {
        let addr = self
            .resolver
            .resolve(&req.host, req.port)
            .await
            .map_err(|e| AttemptError::Connect(format!("cannot resolve upstream host: {e}")))?;
        let mut peer = HttpPeer::new(addr, req.tls, req.host.to_string());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.total_connection_timeout = Some(self.settings.connect_timeout);
        peer.options.idle_timeout = Some(self.settings.pool_idle_timeout);
        peer.options.read_timeout = Some(self.settings.idle_timeout);
        peer.options.write_timeout = Some(self.settings.idle_timeout);
        Ok(peer)
    }

    /// Connects (or reuses a pooled connection), sends the request and reads the response head.
    ///
    /// The attempt is boxed: inline, its connection, peer and head were copied into every future
    /// that held one, several times over (held streams keep those futures).
    async fn attempt(
        &self,
        req: &UpstreamRequest,
        body: &Bytes,
    ) -> Result<Box<Attempt>, AttemptError> {
        let peer = self.peer_for(req).await?;
        let payload = req.body.clone().unwrap_or_else(|| body.clone());
        // A pooled connection may have been closed by the upstream meanwhile: one fresh retry,
        // only when it failed before any byte of an answer (the request cannot have run).
        for fresh_retry in [false, true] {
            let pooled = if fresh_retry {
                None
            } else {
                self.pool.take(peer.reuse_hash())
            };
            let reused = pooled.is_some();
            let stream = match pooled {
                Some(s) => s,
                // Boxed: connecting (TCP and TLS) is an 8 KB future, and most exchanges find a
                // pooled connection; inline, every attempt would carry and copy it.
                None => match Box::pin(self.connector.new_stream(&peer)).await {
                    Ok(s) => s,
                    Err(e) => {
                        return Err(AttemptError::Connect(format!(
                            "cannot connect upstream: {e}"
                        )))
                    }
                },
            };
            let mut up = H1Upstream::new(stream, peer.options.read_timeout);
            let sent = async {
                if let Err(e) = up.send(req, &payload).await {
                    // An upstream may answer before taking the whole body (413, say) and close:
                    // its answer may already be in, and it is the one to pass on.
                    return match tokio::time::timeout(EARLY_ANSWER_WAIT, up.read_head()).await {
                        Ok(Ok(head)) => Ok(head),
                        _ => Err(e),
                    };
                }
                up.read_head().await
            };
            match tokio::time::timeout(self.settings.header_timeout, sent).await {
                Ok(Ok(head)) => {
                    return Ok(Box::new(Attempt {
                        upstream: up,
                        peer,
                        head,
                        read_ahead: None,
                    }))
                }
                Ok(Err(e)) if reused && !fresh_retry && up.may_resend(&e) => {
                    tracing::debug!(error = %e, "pooled upstream connection failed, retrying on a new one");
                    continue;
                }
                Ok(Err(e)) => {
                    return Err(AttemptError::Timeout(format!(
                        "upstream failed before answering: {e}"
                    )))
                }
                Err(_) => {
                    return Err(AttemptError::Timeout(
                        "upstream did not answer in time".into(),
                    ))
                }
            }
        }
        Err(AttemptError::Timeout("upstream connection failed".into()))
    }

    /// Runs the exchange with failover and pumps the response to the client.
    pub(super) async fn exchange(
        &self,
        session: &mut Session,
        ctx: &mut ProxyCtx,
        query: Option<&str>,
        body: Bytes,
    ) -> pingora::Result<()> {
        let Some(rctx) = ctx.req.as_mut() else {
            return Ok(());
        };
        let protocol = rctx.protocol();
        let (Some(sticky), Some(rewrite)) = (self.chain.sticky.clone(), self.chain.rewrite.clone())
        else {
            // A chain without scheduling or rewriting cannot reach an upstream.
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "the filter chain has no sticky_upstream or header_rewrite",
            ));
        };
        let max_attempts = self.settings.max_attempts.max(1);
        let mut last_failure: Option<LastFailure> = None;
        let mut attempt_no = 0u32;
        let mut established: Option<Box<Attempt>> = None;
        while attempt_no < max_attempts {
            attempt_no += 1;
            // Taken, not copied: a failover builds the next account's request anew.
            let (Some(account), Some(req)) =
                (rctx.upstream.account.clone(), rctx.upstream.request.take())
            else {
                break;
            };
            // The slot taken when the account was picked.
            ctx.lease = rctx.upstream.lease.take();
            let started = Instant::now();
            // Boxed: the attempt only lives until the response head is in.
            let result = Box::pin(self.attempt(&req, &body)).await;
            ctx.upstream_time += started.elapsed();
            let now = now_ms();
            let failure_reason: &'static str;
            match result {
                Ok(mut att) => {
                    let status = att.head.status.as_u16();
                    metrics()
                        .upstream_ttfb
                        .with_label_values(&[protocol.as_str(), &account.name])
                        .observe(started.elapsed().as_secs_f64());
                    let is_failover = self.settings.failover_statuses.contains(&status);
                    if !is_failover && !reads_error_body(status) {
                        let change = apply_outcome(
                            &account,
                            Outcome::Status {
                                status,
                                reset_at_ms: None,
                                fault: Fault::ByStatus,
                            },
                            &self.settings.state_rules,
                            now,
                        );
                        self.account_events.send(&account, change);
                        established = Some(att);
                        break;
                    }
                    // Read the (small) error body: it may carry a reset hint or say what failed.
                    let err_body =
                        mask_account_ids(read_limited(&mut att.upstream, ERROR_BODY_LIMIT).await);
                    let fault = classify_error(status, &err_body);
                    let is_auth_error = matches!(status, 401 | 403);
                    let passed_on = fault == Fault::NotTheAccount
                        || (fault == Fault::ByStatus && !is_failover && !is_auth_error);
                    if passed_on {
                        // The client's own error (a bad request, a file it may not use): passed
                        // on as it came, the account none the worse for it.
                        att.read_ahead = Some(err_body);
                        established = Some(att);
                        break;
                    }
                    let Attempt { upstream, head, .. } = *att;
                    let reset =
                        reset_hint(&head.headers, now).or_else(|| body_reset_hint(&err_body, now));
                    let outcome = Outcome::Status {
                        status,
                        reset_at_ms: reset,
                        fault,
                    };
                    let change = apply_outcome(&account, outcome, &self.settings.state_rules, now);
                    self.account_events.send(&account, change);
                    upstream.shutdown().await;
                    failure_reason = match (fault, status) {
                        (Fault::NoCredit, _) => "no_credit",
                        (Fault::Disabled | Fault::KeyInvalid, _) | (_, 401 | 403) => "auth_error",
                        (_, 429) => "rate_limited",
                        (_, 529) => "overloaded",
                        _ => "server_error",
                    };
                    // An account's own refusal (its credential, its organization, its credit)
                    // is not the client's: should it be the last answer, the client is told the
                    // upstream failed, not that its request or key did.
                    let account_refused = failure_reason == "auth_error"
                        || (fault == Fault::NoCredit && status != 429);
                    last_failure = Some(LastFailure {
                        status,
                        head,
                        body: err_body,
                        account_refused,
                    });
                }
                Err(AttemptError::Connect(msg)) => {
                    tracing::warn!(account = %account.name, error = %msg, "upstream connect failed");
                    let change = apply_outcome(
                        &account,
                        Outcome::ConnectError,
                        &self.settings.state_rules,
                        now,
                    );
                    self.account_events.send(&account, change);
                    failure_reason = "connect_error";
                }
                Err(AttemptError::Timeout(msg)) => {
                    tracing::warn!(account = %account.name, error = %msg, "upstream failed before its response head");
                    let change =
                        apply_outcome(&account, Outcome::Timeout, &self.settings.state_rules, now);
                    self.account_events.send(&account, change);
                    failure_reason = "timeout";
                }
            }
            ctx.lease = None;
            if attempt_no >= max_attempts {
                break;
            }
            // A client that has left is not served by another account: the attempts end
            // here, and the last failure is its answer (written to nobody).
            if matches!(session.watch_client().now_or_never(), Some(Err(()))) {
                break;
            }
            let Some(next) = sticky.failover(rctx).await else {
                break;
            };
            metrics()
                .failovers
                .with_label_values(&[failure_reason])
                .inc();
            rctx.upstream.failovers += 1;
            rctx.upstream.tried.push(next.id.clone());
            // The client's headers are read in place: nothing writes to the session before
            // the attempts are over.
            let client_headers = &session.req_header().headers;
            match rewrite.build(rctx, &next, client_headers, query, &body) {
                Ok(r) => {
                    rctx.upstream.request = Some(r);
                    rctx.upstream.account = Some(next);
                }
                Err(_) => break,
            }
        }

        let Some(att) = established else {
            // Every attempt failed: pass the last upstream answer through, or 502.
            ctx.lease = None;
            let message = match &last_failure {
                Some(f) if f.account_refused => format!(
                    "the upstream provider refused the account (HTTP {}); no other account could serve",
                    f.status
                ),
                Some(_) => String::new(),
                None => "no upstream account could be reached".to_string(),
            };
            return match last_failure {
                Some(f) if !f.account_refused => {
                    ctx.status = f.status;
                    ctx.error_type = Some(ErrorKind::Upstream.type_name());
                    rctx.usage.upstream_request_id =
                        super::provider_request_id(&f.head.headers, rctx.sent_request_id());
                    let resp = copy_head(&f.head, rctx, Some(f.body.len()));
                    session.write_response_header(&resp)?;
                    session.write_response_body(f.body, true).await?;
                    Ok(())
                }
                _ => {
                    ctx.status = 502;
                    ctx.error_type = Some(ErrorKind::Upstream.type_name());
                    let body = upstream_error_body(protocol, 502, &message);
                    // Boxed: a rare path whose future (1.1 KB) would size this one.
                    Box::pin(Self::respond(
                        session,
                        502,
                        "application/json",
                        body,
                        &super::id_headers(rctx.echoed_request_id(), &rctx.request_id),
                    ))
                    .await
                }
            };
        };
        // No more failover: the request body (20 to 200 KiB for real clients) need not live as
        // long as the stream.
        drop(body);
        let pumped = Box::pin(self.pump(session, ctx, att)).await;
        // An id the stream did not give early (a JSON answer's, read at its end).
        if let Some(r) = ctx.req.as_mut() {
            if let Some(remember) = sticky.remember_response(r) {
                remember.await;
            }
        }
        pumped
    }

    /// Writes the response head and streams the body through the response filters.
    async fn pump(
        &self,
        session: &mut Session,
        ctx: &mut ProxyCtx,
        mut att: Box<Attempt>,
    ) -> pingora::Result<()> {
        let Attempt {
            upstream: up,
            head,
            read_ahead,
            ..
        } = &mut *att;
        let Some(rctx) = ctx.req.as_mut() else {
            return Ok(());
        };
        let status = head.status.as_u16();
        ctx.status = status;
        if status >= 400 {
            ctx.error_type = Some(ErrorKind::Upstream.type_name());
        }
        rctx.usage.upstream_request_id =
            super::provider_request_id(&head.headers, rctx.sent_request_id());
        for f in &self.chain.response {
            f.on_response_head(rctx, status, &head.headers);
        }
        let resp = copy_head(head, rctx, None);
        // Only a streamed answer is long enough to watch the client during.
        let stream =
            is_event_stream(head) || head.headers.get(http::header::CONTENT_LENGTH).is_none();
        // The head and body writes are queued by the client side and leave together when it
        // flushes: a streamed answer is flushed before every wait for the upstream, so nothing
        // the upstream sent is held back, and what it sent back to back (the head, the first
        // events, the end) goes out in one write.
        let mut client_gone = session.write_response_header(&resp).is_err();
        // Both heads are done with: an open stream need not hold their fields (providers send
        // 20 to 40).
        drop(resp);
        head.headers = http::HeaderMap::new();
        session.forget_request_fields();
        let started = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        let mut watch_client = stream;
        let mut complete = false;
        let mut cut = false;
        // Where the bytes the client got end, for an error event after a cut.
        let mut sent_tail = SentTail::default();
        // A read result taken while coalescing, handled on the next turn.
        let mut held: Option<Result<Option<Bytes>, H1Error>> = None;
        if let Some(start) = read_ahead.take() {
            held = Some(Ok(Some(start)));
        } else if stream {
            held = up.read_body().now_or_never();
        }
        loop {
            if held.is_none() && stream && !client_gone {
                // About to wait for the upstream: what is written so far goes out now.
                client_gone = session.flush().await.is_err();
            }
            if client_gone && drain_deadline.is_none() {
                // The client has left: a drained answer holds a slot for drained answers, not
                // its key's (a user who stops an answer and asks again is not refused while the
                // upstream finishes the last one).
                if self.settings.drain_on_disconnect {
                    let max = rctx.auth.as_ref().and_then(|a| a.key.max_concurrency);
                    if let (Some(limits), Some(max)) = (self.chain.limits.as_ref(), max) {
                        limits.hand_over_to_drain(&mut rctx.limits, max).await;
                    }
                }
                if !self.settings.drain_on_disconnect {
                    rctx.usage.estimated = true;
                    break;
                }
                drain_deadline = Some(Instant::now() + self.settings.drain_timeout);
            }
            let next = if let Some(r) = held.take() {
                r
            } else if let Some(deadline) = drain_deadline {
                match tokio::time::timeout_at(deadline.into(), up.read_body()).await {
                    Ok(r) => r,
                    Err(_) => {
                        rctx.usage.estimated = true;
                        break;
                    }
                }
            } else if watch_client && !up.response_done() {
                tokio::select! {
                    r = up.read_body() => r,
                    idle = session.watch_client() => {
                        match idle {
                            Err(()) => client_gone = true,
                            // The client's next request, kept for its turn: stop watching.
                            Ok(()) => watch_client = false,
                        }
                        continue;
                    }
                }
            } else {
                up.read_body().await
            };
            match next {
                Ok(Some(mut chunk)) => {
                    // Events the upstream sent back to back are already buffered: take them
                    // too and write them to the client at once, one write instead of one per
                    // event. Only what is ready now is taken; nothing waits for more. The
                    // filters then see them as one piece (they read any split alike).
                    if !up.response_done() {
                        let mut batch: Option<BytesMut> = None;
                        while batch.as_ref().map_or(chunk.len(), BytesMut::len) < COALESCE_LIMIT
                            && !up.response_done()
                        {
                            // What is buffered is taken in one go, the socket tried after.
                            if up.buffered() > 0 {
                                let room = (chunk.len() + up.buffered()) * 2;
                                let b = batch.get_or_insert_with(|| {
                                    let mut b = BytesMut::with_capacity(room);
                                    b.extend_from_slice(&chunk);
                                    b
                                });
                                match up.take_buffered(b, COALESCE_LIMIT) {
                                    Ok(true) => continue,
                                    Ok(false) => {}
                                    Err(e) => {
                                        held = Some(Err(e));
                                        break;
                                    }
                                }
                            }
                            match up.read_body().now_or_never() {
                                Some(Ok(Some(more))) => {
                                    batch
                                        .get_or_insert_with(|| {
                                            let mut b = BytesMut::with_capacity(
                                                (chunk.len() + more.len()) * 2,
                                            );
                                            b.extend_from_slice(&chunk);
                                            b
                                        })
                                        .extend_from_slice(&more);
                                }
                                Some(other) => {
                                    held = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                        if let Some(b) = batch {
                            chunk = b.freeze();
                        }
                        if held.is_none() && up.response_done() {
                            // The end came with the batch: it goes out with the last chunk.
                            held = Some(Ok(None));
                        }
                    }
                    let out = self.filter_chunk(rctx, chunk);
                    if rctx.usage.response_id.is_some() && !rctx.session.response_remembered {
                        if let Some(remember) = self
                            .chain
                            .sticky
                            .as_ref()
                            .and_then(|s| s.remember_response(rctx))
                        {
                            tokio::spawn(remember);
                        }
                    }
                    if !client_gone && !out.is_empty() {
                        if ctx.ttfb.is_none() {
                            ctx.ttfb = Some(rctx.started.elapsed());
                        }
                        sent_tail.push(&out);
                        if session.write_response_body(out, false).await.is_err() {
                            client_gone = true;
                        }
                    }
                }
                Ok(None) => {
                    complete = true;
                    for f in &self.chain.response {
                        if let Some(rest) = f.on_body_end(rctx) {
                            if !client_gone
                                && session.write_response_body(rest, false).await.is_err()
                            {
                                client_gone = true;
                            }
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(request_id = %rctx.request_id, error = %e, "upstream stream cut");
                    cut = true;
                    break;
                }
            }
        }
        ctx.upstream_time += started.elapsed();
        for f in &self.chain.response {
            f.on_end(rctx);
        }
        ctx.ended = true;
        // Cuts in a row count against the account; a whole answer ends the row.
        let outcome = if cut {
            Some(Outcome::Cut)
        } else {
            complete.then_some(Outcome::Whole)
        };
        if let (Some(outcome), Some(account)) = (outcome, rctx.upstream.account.as_ref()) {
            let change = apply_outcome(account, outcome, &self.settings.state_rules, now_ms());
            self.account_events.send(account, change);
        }
        if cut {
            ctx.error_type = Some(ErrorKind::Upstream.type_name());
            // What was metered until the cut: the upstream may have counted more.
            rctx.usage.estimated = true;
            if !client_gone && rctx.request.stream {
                // Cut inside an event: that event is ended first, or the client's parser would
                // read the error event as more lines of it.
                let mut ev = if sent_tail.ends_event() {
                    Vec::new()
                } else {
                    b"\n\n".to_vec()
                };
                ev.extend(stream_error_event(
                    rctx.protocol(),
                    "the upstream ended the stream early",
                ));
                let _ = session.write_response_body(Bytes::from(ev), false).await;
            }
        } else if client_gone {
            ctx.error_type.get_or_insert("client_disconnected");
        }
        // A whole answer's connection and the account's concurrency slot are given back before
        // the client gets the end of the answer: the client's next request, which may follow at
        // once, finds them free (on every node, for a cap the nodes share).
        if let Some(lease) = ctx.lease.take() {
            lease.release().await;
        }
        // The attempt is taken apart in a block of its own: its peer (672 bytes) must not live
        // on across the writes below, which would make room for it in the state of every
        // open stream.
        let failed = {
            let Attempt { upstream, peer, .. } = *att;
            if complete {
                if let Some((stream, idle)) =
                    upstream.into_reusable(self.settings.pool_idle_timeout)
                {
                    self.pool.put(peer.reuse_hash(), stream, idle);
                }
                None
            } else {
                Some(upstream)
            }
        };
        if cut && !rctx.request.stream {
            // A cut answer must not look whole: no last chunk, and the connection ends.
            session.set_keep_alive(false);
            let _ = session.flush().await;
        } else if !client_gone {
            let _ = session.write_response_body(Bytes::new(), true).await;
        }
        if let Some(upstream) = failed {
            upstream.shutdown().await;
        }
        Ok(())
    }

    /// Runs one response body chunk through the response filters.
    fn filter_chunk(&self, rctx: &mut relay_filters::context::RequestCtx, chunk: Bytes) -> Bytes {
        let mut out = chunk;
        for f in &self.chain.response {
            if let ChunkAction::Replace(b) = f.on_body_chunk(rctx, &out) {
                out = b;
            }
        }
        out
    }
}

/// The client-facing copy of an upstream response head. `body_len` is the length of a body the
/// relay writes itself; otherwise the upstream's length is kept, except on event streams (whose
/// bytes a filter may edit). Without a length the body is sent chunked, so the connection stays
/// reusable. The upstream's `x-request-id` is kept (the id its provider knows the request by,
/// which SDKs report); the request's own id goes in `x-request-id` only when the upstream sent
/// none, and always in `x-relay-request-id`.
fn copy_head(
    head: &UpstreamHead,
    rctx: &relay_filters::context::RequestCtx,
    body_len: Option<usize>,
) -> ResponseHeader {
    // Filled as a plain header map and wrapped afterwards: `ResponseHeader`'s own insertions take
    // each name through a title-cased copy and parse it back, two allocations per field.
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = head.status;
    // Room for what is added here (length or chunked, request id): growing the map would
    // double it. (Date and connection are written by the client side into the head's bytes.)
    let headers = &mut parts.headers;
    headers.reserve(head.headers.len() + 3);
    let event_stream = is_event_stream(head);
    for (name, value) in head.headers.iter() {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || ACCOUNT_HEADERS.contains(&n)
            || (n == "content-length" && (body_len.is_some() || event_stream))
        {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    match body_len {
        Some(n) => {
            headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        }
        None if !headers.contains_key(http::header::CONTENT_LENGTH) => {
            headers.insert(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }
        None => {}
    }
    // A request id is at most 128 visible characters (the client's own, or a UUID); one that is
    // not a valid value is left out rather than failing the answer.
    if !headers.contains_key(X_REQUEST_ID) {
        if let Ok(v) = http::HeaderValue::from_str(rctx.echoed_request_id()) {
            headers.insert(X_REQUEST_ID, v);
        }
    }
    if let Ok(v) = http::HeaderValue::from_str(&rctx.request_id) {
        headers.insert(X_RELAY_REQUEST_ID, v);
    }
    ResponseHeader::from(parts)
}

pub(super) const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
/// Anthropic's id of a request, in its answers' heads.
pub(super) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("request-id");
const X_RELAY_REQUEST_ID: http::HeaderName =
    http::HeaderName::from_static(super::X_RELAY_REQUEST_ID);

fn is_event_stream(head: &UpstreamHead) -> bool {
    head.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The last bytes written to the client, to tell whether they end an SSE event.
#[derive(Default)]
struct SentTail {
    last: [u8; 4],
    len: usize,
}

impl SentTail {
    fn push(&mut self, bytes: &[u8]) {
        for &b in &bytes[bytes.len().saturating_sub(4)..] {
            self.last.rotate_left(1);
            self.last[3] = b;
        }
        self.len = (self.len + bytes.len()).min(4);
    }

    /// Whether what was written ends with a blank line (an event's end, in any of the line
    /// ends SSE allows), or nothing was written.
    fn ends_event(&self) -> bool {
        let t = &self.last[4 - self.len..];
        t.is_empty() || t.ends_with(b"\n\n") || t.ends_with(b"\r\r") || t.ends_with(b"\r\n\r\n")
    }
}

/// The last failed attempt's answer, kept for the client should no other account serve.
struct LastFailure {
    status: u16,
    head: UpstreamHead,
    body: Bytes,
    /// The provider refused the account itself (its credential, organization or credit).
    account_refused: bool,
}

/// Reads a (small) response body until at least `limit` bytes are in (whole pieces, so what is
/// read can still be passed on unchanged); the rest is left unread.
/// An upstream error body with the provider account's organization and project ids (OpenAI's
/// `org-…` and `proj_…`, as in "Rate limit reached … in organization org-…") masked with `*`,
/// byte for byte, so the body keeps its length: the tenant learns nothing of the account.
fn mask_account_ids(body: Bytes) -> Bytes {
    const PREFIXES: [&[u8]; 2] = [b"org-", b"proj_"];
    /// Shorter runs are words ("org-wide"), not ids.
    const MIN_ID: usize = 8;
    let id_byte = |b: &u8| b.is_ascii_alphanumeric();
    let mut masked: Option<Vec<u8>> = None;
    let mut at = 0;
    while at < body.len() {
        let starts = PREFIXES
            .iter()
            .find(|p| body[at..].starts_with(p) && (at == 0 || !id_byte(&body[at - 1])));
        let Some(prefix) = starts else {
            at += 1;
            continue;
        };
        let from = at + prefix.len();
        let run = body[from..].iter().take_while(|b| id_byte(b)).count();
        if run >= MIN_ID {
            let out = masked.get_or_insert_with(|| body.to_vec());
            out[from..from + run].fill(b'*');
        }
        at = from + run;
    }
    masked.map_or(body, Bytes::from)
}

async fn read_limited(up: &mut H1Upstream, limit: usize) -> Bytes {
    let mut buf = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = up.read_body().await {
            buf.extend_from_slice(&chunk);
            if buf.len() >= limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::SentTail;

    #[test]
    fn account_ids_in_error_bodies_are_masked_in_place() {
        let mask = |s: &str| {
            let out = super::mask_account_ids(bytes::Bytes::copy_from_slice(s.as_bytes()));
            assert_eq!(out.len(), s.len(), "{s}");
            String::from_utf8(out.to_vec()).expect("text")
        };
        assert_eq!(
            mask(
                r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-AbC123xyz789 on tokens per min"}}"#
            ),
            r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-************ on tokens per min"}}"#
        );
        assert_eq!(
            mask("project proj_0123456789abcdef, org-ABCDEFGH."),
            "project proj_****************, org-********."
        );
        // Words and ids of other things stay.
        for same in [
            "an org-wide limit",
            "sorg-ABCDEFGHIJ",
            "no ids here",
            "org-",
            "",
        ] {
            assert_eq!(mask(same), same);
        }
    }

    #[test]
    fn the_sent_tail_tells_whether_an_event_ended() {
        let ends = |pieces: &[&str]| {
            let mut t = SentTail::default();
            for p in pieces {
                t.push(p.as_bytes());
            }
            t.ends_event()
        };
        assert!(ends(&[]));
        assert!(ends(&["event: ping\ndata: {}\n\n"]));
        assert!(ends(&["data: {}\r\n\r\n"]));
        assert!(ends(&["data: {}\r\r"]));
        assert!(ends(&["data: {}\n", "\n"]));
        assert!(ends(&["data: {}\r\n\r", "", "\n"]));
        assert!(!ends(&["data: {\"type\":\"content_bl"]));
        assert!(!ends(&["data: {}\n"]));
        assert!(!ends(&["data: {}\r\n"]));
        assert!(!ends(&["\n\n", "data"]));
    }
}
