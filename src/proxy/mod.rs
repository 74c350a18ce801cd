//! The relay's proxy: it reads the request, hands each phase to the filter chain, does the
//! upstream exchange itself (DESIGN §5) and books the result.
//!
//! It is not a `ProxyHttp` behind Pingora's `HttpProxy`: the relay answers every request in what
//! would be `request_filter`, so the proxy framework's other phases (cache, upstream peer,
//! retries, downstream modules) never ran, yet its per-request future (13.7 KB) and session state
//! were built and held for every request and open stream. Nor is it an `HttpServerApp`, whose
//! generic connection loop carries HTTP/2 acceptance (3.8 KB held by every connection) and boxes
//! each request's future anew, nor a `ServerApp` behind Pingora's listening service (see
//! `service`): the proxy listens on plain TCP or TLS without h2c, so its connections are
//! HTTP/1.1, spoken by the relay's own client side (`downstream_h1`).

mod dns;
mod downstream_h1;
mod exchange;
mod h1;
mod header_names;
pub mod health;
pub mod oauth;
mod oneshot;
mod pool;
mod service;
mod upstream_h1;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use relay_filters::account_state::StateRules;
use relay_filters::accounts::InflightLease;
use relay_filters::chain::{Chain, Flow, RequestView};
use relay_filters::context::RequestCtx;
use relay_filters::cost::PriceSource;
use relay_filters::error::{error_body, ErrorKind, Rejection};
use relay_filters::key_limits::user_subject;
use relay_filters::model_list::{render, servable_models, Dialect};
use relay_filters::request_body::{parse_request_body, validate_for};
use relay_filters::route::{match_route, ModelsRoute, Route};
use relay_filters::{now_ms, Protocol, UsageRecord};

use crate::background::account_events::AccountEvents;
use crate::background::usage_writer::UsageQueue;
use crate::cache::{AccountCache, PriceCache};
use crate::metrics::metrics;
use crate::store::redis_counters::RedisUsageCounters;
use downstream_h1::{Downstream as Session, HeadError};

pub use dns::Resolver;
pub use pool::UpstreamPool;
pub use service::ProxyService;

/// Proxy settings taken from the config.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub max_body_bytes: usize,
    /// Longest wait for the next request on a kept-alive client connection.
    pub client_idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub max_attempts: u32,
    pub failover_statuses: Vec<u16>,
    pub drain_on_disconnect: bool,
    pub drain_timeout: Duration,
    pub state_rules: StateRules,
}

/// Everything the proxy service shares between requests.
pub struct RelayProxy {
    pub chain: Chain,
    pub settings: ProxySettings,
    /// Makes new upstream connections (TCP, TLS).
    pub connector: pingora::connectors::TransportConnector,
    /// Idle upstream connections.
    pub pool: Arc<UpstreamPool>,
    pub resolver: Resolver,
    pub usage: UsageQueue,
    pub account_events: AccountEvents,
    pub accounts: Arc<AccountCache>,
    pub prices: Arc<PriceCache>,
    /// Usage counters in Redis, when configured.
    pub counters: Option<Arc<RedisUsageCounters>>,
}

/// Per-request state of the proxy around the filters' context.
#[derive(Default)]
pub struct ProxyCtx {
    /// Set once the route is an API call.
    pub req: Option<RequestCtx>,
    /// Status sent to the client.
    pub status: u16,
    pub error_type: Option<&'static str>,
    /// Time until the first response byte went to the client.
    pub ttfb: Option<Duration>,
    /// Time spent waiting on upstreams (for the overhead metric).
    pub upstream_time: Duration,
    pub lease: Option<InflightLease>,
    /// The response filters' `on_end` ran.
    pub ended: bool,
    /// The usage record was made.
    pub booked: bool,
}

fn header_map(session: &Session) -> &http::HeaderMap {
    &session.req_header().headers
}

/// The request body length the client announced, if any.
fn declared_length(session: &Session) -> Option<usize> {
    header_map(session)
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
}

impl RelayProxy {
    /// Writes a complete response (head + body) to the client.
    async fn respond(
        session: &mut Session,
        status: u16,
        content_type: &str,
        body: Bytes,
        extra: &[(&str, String)],
    ) -> pingora::Result<()> {
        let mut resp = ResponseHeader::build_no_case(status, Some(2 + extra.len()))?;
        resp.insert_header("content-type", content_type)?;
        resp.insert_header("content-length", body.len().to_string())?;
        for (k, v) in extra {
            resp.insert_header(k.to_string(), v.as_str())?;
        }
        session.write_response_header(&resp)?;
        session.write_response_body(body, true).await?;
        Ok(())
    }

    async fn reject(
        session: &mut Session,
        ctx: &mut ProxyCtx,
        protocol: Protocol,
        rejection: &Rejection,
        ids: &RequestIds,
    ) -> pingora::Result<()> {
        let status = rejection.kind.status();
        ctx.status = status;
        ctx.error_type = Some(rejection.kind.type_name());
        if let Some(hit) = rejection.limit {
            let status = match status {
                402 => "402",
                403 => "403",
                429 => "429",
                _ => "other",
            };
            crate::metrics::metrics()
                .limit_refusals
                .with_label_values(&[hit.limit, hit.whose, status])
                .inc();
        }
        let mut extra = ids.headers().to_vec();
        if let Some(s) = rejection.retry_after {
            extra.push(("retry-after", s.to_string()));
        }
        let body = Bytes::from(rejection.body(protocol));
        // Boxed: inline, this rare path's 1.1 KB future sized every request's future, held as
        // long as its stream.
        Box::pin(Self::respond(
            session,
            status,
            "application/json",
            body,
            &extra,
        ))
        .await?;
        Ok(())
    }

    /// Reads the whole request body, refusing it past `max_body_bytes`.
    async fn read_body(&self, session: &mut Session) -> pingora::Result<Result<Bytes, Rejection>> {
        let max = self.settings.max_body_bytes;
        // A body the client cannot frame is its fault: answered 400 (the error's source is
        // the client).
        Ok(session.read_body(max).await?.ok_or_else(|| too_large(max)))
    }

    async fn handle_api(
        &self,
        session: &mut Session,
        ctx: &mut ProxyCtx,
        route: relay_filters::route::ApiRoute,
        ids: RequestIds,
    ) -> pingora::Result<()> {
        let protocol = route.protocol;
        let query = session.req_header().uri.query().map(str::to_string);
        // Cheap header-only check first, so unauthenticated clients never make us read a body.
        // The filter reuses the entry found here instead of hashing the key again.
        let mut pre_auth = None;
        if let Some(auth) = &self.chain.auth {
            match auth.authenticate(header_map(session), query.as_deref(), now_ms()) {
                Ok(key) => pre_auth = Some(relay_filters::context::AuthInfo { key }),
                Err(r) => {
                    session.set_keep_alive(false);
                    return Self::reject(session, ctx, protocol, &r, &ids).await;
                }
            }
        }
        // The body is read as JSON, for the session key, limits and metering: one the client
        // compressed is refused (415) before it is read, saying what to do instead.
        if let Some(coding) = header_map(session)
            .get_all(http::header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(str::trim)
            .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        {
            let r = Rejection::new(
                ErrorKind::UnsupportedEncoding,
                format!(
                    "request bodies with Content-Encoding {:?} are not accepted: send the body uncompressed",
                    coding.chars().take(32).collect::<String>()
                ),
            );
            session.set_keep_alive(false);
            return Self::reject(session, ctx, protocol, &r, &ids).await;
        }
        let expects_continue = header_map(session)
            .get(http::header::EXPECT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let declared_too_large =
            declared_length(session).is_some_and(|n| n > self.settings.max_body_bytes);
        if expects_continue && !declared_too_large {
            session.write_continue().await?;
        }
        let body = match self.read_body(session).await? {
            Ok(b) => b,
            Err(r) => {
                session.set_keep_alive(false);
                return Self::reject(session, ctx, protocol, &r, &ids).await;
            }
        };

        let (started, started_ms) = (std::time::Instant::now(), now_ms());
        let parsed =
            match parse_request_body(&body).and_then(|p| validate_for(protocol, &p).map(|_| p)) {
                Ok(p) => p,
                Err(e) => {
                    let r = Rejection::new(ErrorKind::InvalidRequest, e.to_string());
                    return Self::reject(session, ctx, protocol, &r, &ids).await;
                }
            };
        // Made in its place: as a local held across the chain's await, the context (1 KB) sized
        // this future, and so every open stream's, once more.
        let RequestIds { relay, client } = ids;
        let rctx = ctx.req.insert(RequestCtx::new(relay, route, started_ms));
        rctx.client_request_id = client;
        rctx.started = started;
        rctx.auth = pre_auth;
        rctx.request.model = parsed.model.as_deref().map(str::to_string);
        rctx.request.stream = parsed.stream || rctx.route.path_stream;
        rctx.request.previous_response_id =
            parsed.previous_response_id.as_deref().map(str::to_string);
        rctx.request.include_usage_requested = parsed.stream_options_include_usage;
        rctx.request.store_off = parsed.store_off;
        rctx.request.service_tier = parsed.service_tier;
        rctx.request.body_len = body.len();

        let view = RequestView {
            headers: header_map(session),
            query: query.as_deref(),
            body: &body,
            parsed: &parsed,
        };
        let flow = self.chain.run_request(rctx, &view).await;
        drop(parsed);
        if let Flow::Reject(r) = flow {
            let ids = RequestIds::of(rctx);
            return Self::reject(session, ctx, protocol, &r, &ids).await;
        }
        if let Some(s) = ctx.req.as_ref().and_then(|r| r.session.sticky) {
            metrics().sticky.with_label_values(&[s.as_str()]).inc();
        }
        // Boxed, as are the attempt and the pump inside: inline, the exchange made this future
        // 63 KB, copied whole into its box on every request and held by every open stream.
        Box::pin(self.exchange(session, ctx, query.as_deref(), body)).await?;
        Ok(())
    }

    /// The key a request the relay answers itself carries (a model list, a WebSocket handshake):
    /// refused without one, also when no authentication is configured.
    fn key_of(
        &self,
        session: &Session,
    ) -> Result<Arc<relay_filters::api_key_auth::KeyEntry>, Rejection> {
        let Some(auth) = &self.chain.auth else {
            return Err(Rejection::new(
                ErrorKind::Authentication,
                "no authentication configured",
            ));
        };
        let query = session.req_header().uri.query();
        auth.authenticate(header_map(session), query, now_ms())
    }

    /// The answer to a model list or lookup: the models the key can be served, in the shape
    /// the client expects (DESIGN §4), or the refusal in that shape's protocol.
    fn models(
        &self,
        session: &Session,
        route: &ModelsRoute,
    ) -> Result<Bytes, (Protocol, Rejection)> {
        let query = session.req_header().uri.query();
        let dialect = Dialect::of(route, header_map(session), query);
        let refused = |r| (dialect.protocol(), r);
        let key = self.key_of(session).map_err(refused)?;
        let accounts = self.accounts.snapshot();
        let prices = self.prices.table();
        // Models priced now (not one priced only from a scheduled time).
        let now = relay_filters::now_ms();
        let priced: Vec<&str> = prices
            .schedules()
            .filter(|(_, s)| s.at(now).is_some())
            .map(|(m, _)| m)
            .collect();
        let models = servable_models(&accounts, &priced, &key, dialect);
        let body = render(route, dialect, &models).map_err(refused)?;
        Ok(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()))
    }

    /// Builds and queues the usage record of a request that reached the chain.
    async fn book(&self, ctx: &mut ProxyCtx) {
        if let Some(record) = self.record(ctx) {
            self.usage.push(record).await;
        }
    }

    /// Books a request whose task is dropped before it was booked: a runtime stopping (the
    /// grace period of a shutdown is over) drops every request still running. What was metered
    /// of the answer is settled and the record queued or spooled without waiting.
    fn book_dropped(&self, ctx: &mut ProxyCtx) {
        if !ctx.booked {
            self.book_cut(ctx);
        }
        // Also for a request dropped between its booking and its settlement. Run if the runtime
        // still runs tasks; else a Redis hold or slot expires by itself.
        if let Some(settle) = self.limits_settlement(ctx) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(settle);
            }
        }
    }

    /// Books a cut request as it stands.
    fn book_cut(&self, ctx: &mut ProxyCtx) {
        if let Some(r) = ctx.req.as_mut() {
            // Not while a panic unwinds: the filters' state may be what panicked, and a second
            // panic in a drop would abort the process. The record is then booked as it stands.
            if !ctx.ended && !std::thread::panicking() {
                let streamed = r.usage.meter.is_some();
                for f in &self.chain.response {
                    f.on_end(r);
                }
                // The counts are those seen until the cut.
                r.usage.estimated |= streamed;
            }
        }
        if ctx.status == 0 {
            ctx.status = 499;
        }
        ctx.error_type.get_or_insert("interrupted");
        ctx.lease.take();
        if let Some(record) = self.record(ctx) {
            self.usage.push_now(record);
        }
    }

    /// The usage record of a request that reached the chain (once), counted in the metrics and
    /// the access log.
    fn record(&self, ctx: &mut ProxyCtx) -> Option<UsageRecord> {
        if std::mem::replace(&mut ctx.booked, true) {
            return None;
        }
        let r = ctx.req.as_mut()?;
        let auth = r.auth.as_ref()?;
        let elapsed = r.started.elapsed();
        // The request ends here: what only the record needs is moved into it.
        // The record's id is the relay's own: a client's x-request-id may repeat, and a record
        // with an id already stored is taken for a replay and not counted.
        let record = UsageRecord {
            id: std::mem::take(&mut r.request_id),
            request_id: r.client_request_id.take(),
            created_at: r.started_ms,
            user_id: Some(auth.key.user_id.clone()),
            api_key_id: Some(auth.key.id.clone()),
            account_id: r.upstream.account.as_ref().map(|a| a.id.clone()),
            session_key: r.session.key.take(),
            protocol: r.route.protocol.as_str().into(),
            // Checked when the body was read (no control characters), unlike the upstream's.
            requested_model: r.requested_model().map(str::to_string),
            // The upstream's word: a NUL in it would make the record unstorable in PostgreSQL.
            upstream_model: r
                .usage
                .upstream_model
                .take()
                .or_else(|| r.upstream.model.take())
                .map(storable_text),
            stream: r.request.stream,
            status: ctx.status,
            usage: r.usage.tokens,
            base_cost: r.usage.base_cost,
            billed_cost: r.usage.billed_cost,
            price_rate: auth.key.price_rate,
            latency_ms: elapsed.as_millis() as i64,
            ttfb_ms: ctx.ttfb.map(|d| d.as_millis() as i64),
            failover_count: r.upstream.failovers,
            // The relay's own word on how the request ended, else an error the upstream sent
            // inside its successful answer.
            error_type: ctx.error_type.map(Cow::Borrowed).or_else(|| {
                r.usage
                    .upstream_error
                    .take()
                    .map(|e| Cow::Owned(storable_text(e)))
            }),
            unpriced: r.usage.unpriced,
            estimated: r.usage.estimated,
            service_tier: r.usage.service_tier,
            upstream_request_id: r.usage.upstream_request_id.take(),
            response_id: r.usage.response_id.take().and_then(provider_id),
            passes: relay_filters::types::passes_json(&r.usage.sub_usage),
        };
        let protocol = r.route.protocol.as_str();
        let account = r
            .upstream
            .account
            .as_ref()
            .map(|a| a.name.as_str())
            .unwrap_or("none");
        let model = record
            .upstream_model
            .as_deref()
            .filter(|m| self.prices.table().contains(m))
            .unwrap_or("other");
        let u = &record.usage;
        crate::metrics::count_record(
            r.route.protocol,
            account,
            model,
            ctx.status,
            [
                u.input_tokens,
                u.output_tokens,
                u.cache_write_5m_tokens + u.cache_write_1h_tokens,
                u.cache_read_tokens,
            ],
            record.billed_cost,
        );
        let series = crate::metrics::protocol_series(r.route.protocol);
        series.duration[usize::from(record.stream)].observe(elapsed.as_secs_f64());
        series
            .overhead
            .observe(elapsed.saturating_sub(ctx.upstream_time).as_secs_f64());
        if record.unpriced {
            metrics().unpriced.with_label_values(&[protocol]).inc();
        }
        if record.estimated {
            metrics().estimated.with_label_values(&[protocol]).inc();
        }
        crate::access_log::log(&crate::access_log::AccessLine {
            request_id: &record.id,
            client_request_id: record.request_id.as_deref().unwrap_or("-"),
            protocol,
            account,
            model: record.upstream_model.as_deref().unwrap_or("-"),
            status: record.status,
            input: u.input_tokens,
            output: u.output_tokens,
            cost: record.billed_cost,
            latency_ms: record.latency_ms,
            failovers: record.failover_count,
        });
        if let Some(counters) = self.counters.clone() {
            // Counters are bookkeeping: never on the request's path, and skipped when no
            // runtime is left to run them (a request dropped at shutdown).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let r = record.clone();
                rt.spawn(async move {
                    if let Err(e) = counters.book(&r).await {
                        tracing::debug!(error = %e, "usage counters not updated in Redis");
                    }
                });
            }
        }
        Some(record)
    }
}

/// A request's context that books the request when dropped unbooked (see
/// [`RelayProxy::book_dropped`]).
struct Booking<'a> {
    proxy: &'a RelayProxy,
    ctx: ProxyCtx,
}

impl Drop for Booking<'_> {
    fn drop(&mut self) {
        self.proxy.book_dropped(&mut self.ctx);
    }
}

/// `text` with any NUL replaced (PostgreSQL refuses NUL in text values).
fn storable_text(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// Longest provider id kept in a record (theirs run 30 to 60 characters).
const MAX_PROVIDER_ID: usize = 128;

/// An id a provider gave, as a record keeps it: visible ASCII of at most [`MAX_PROVIDER_ID`]
/// characters, else none (an upstream's word, not trusted to be short or printable).
pub(crate) fn provider_id(id: String) -> Option<String> {
    (!id.is_empty() && id.len() <= MAX_PROVIDER_ID && id.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(id)
}

/// The id the provider knows a request by, from its answer's head: Anthropic's `request-id`,
/// else OpenAI's `x-request-id`. Not the id the relay sent in `x-request-id` (`sent`: the
/// client's, else the relay's own), which an upstream that echoes it gives back: that id is
/// in the record already.
pub(crate) fn provider_request_id(headers: &http::HeaderMap, sent: &str) -> Option<String> {
    let value = [exchange::REQUEST_ID, exchange::X_REQUEST_ID]
        .iter()
        .filter_map(|name| headers.get(name)?.to_str().ok())
        .find(|v| *v != sent)?;
    provider_id(value.to_owned())
}

/// A request's ids as the client sees them.
struct RequestIds {
    /// The relay's own (the usage record's id).
    relay: String,
    /// The client's `x-request-id`, when it sent a usable one.
    client: Option<String>,
}

impl RequestIds {
    /// The ids of a request that reached the chain.
    fn of(rctx: &RequestCtx) -> Self {
        RequestIds {
            relay: rctx.request_id.clone(),
            client: rctx.client_request_id.clone(),
        }
    }

    /// The id fields of an answer the relay writes itself.
    fn headers(&self) -> [(&'static str, String); 2] {
        id_headers(self.client.as_deref().unwrap_or(&self.relay), &self.relay)
    }
}

/// The id fields of an answer the relay writes itself: `x-request-id` (`echoed`: the client's
/// own, else the relay's) and `x-relay-request-id` (the relay's).
pub(crate) fn id_headers(echoed: &str, relay: &str) -> [(&'static str, String); 2] {
    [
        ("x-request-id", echoed.to_string()),
        (X_RELAY_REQUEST_ID, relay.to_string()),
    ]
}

/// Where every answer carries the relay's own id of the request: the usage record's id (an
/// upstream's answer keeps the upstream's `x-request-id`).
pub(crate) const X_RELAY_REQUEST_ID: &str = "x-relay-request-id";

/// The refusal of an unknown path, in the protocol its prefix suggests.
fn not_found(method: &str, path: &str) -> (Protocol, Rejection) {
    let protocol = if path.contains("/messages") {
        Protocol::Anthropic
    } else if path.contains("models/") || path.starts_with("/gemini") {
        Protocol::Gemini
    } else {
        Protocol::OpenaiChat
    };
    let r = Rejection::new(ErrorKind::NotFound, format!("no route for {method} {path}"));
    (protocol, r)
}

fn too_large(max: usize) -> Rejection {
    Rejection::new(
        ErrorKind::RequestTooLarge,
        format!("request body is larger than the limit of {max} bytes"),
    )
}

/// A byte of a request id taken from the client: letters, digits and `-_.:/+@`.
fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.:/+@".contains(&b)
}

impl RelayProxy {
    /// A client connection: its requests one after another while it stays reusable.
    pub(crate) async fn serve_connection(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut session = Session::new(stream, self.settings.client_idle_timeout);
        while self.process_request(&mut session, shutdown).await {}
        session.shutdown().await;
    }

    /// One request of a connection: read its head, serve it, book it; `true` when the
    /// connection can serve the next request.
    async fn process_request(&self, session: &mut Session, shutdown: &ShutdownWatch) -> bool {
        // An idle keep-alive connection waits here for its next request (at most
        // `client_idle_timeout`); a shutdown ends it. The read goes first: a request already in
        // is served (the connection then closes after it), and the shutdown is looked at only
        // while the read waits.
        let mut stopping = shutdown.clone();
        let stop = stopping.wait_for(|down| *down);
        let read = tokio::select! {
            biased;
            r = session.read_request() => r,
            _ = stop => return false,
        };
        match read {
            Ok(true) => {}
            // The client closed an idle connection, or let it idle too long.
            Ok(false) => return false,
            Err(e) => {
                let code = match e {
                    HeadError::Bad(_) => 400,
                    HeadError::TooLarge => 431,
                    HeadError::Unsupported => 501,
                    HeadError::Gone(_) => {
                        tracing::debug!(error = %e, "client connection failed before a request head");
                        return false;
                    }
                };
                tracing::warn!(error = %e, status = code, "unreadable request head");
                Box::pin(session.respond_error(code)).await;
                return false;
            }
        }
        if *shutdown.borrow() {
            session.set_keep_alive(false);
        }
        // Booked when dropped unbooked: a request still running when the runtime stops.
        let mut booking = Booking {
            proxy: self,
            ctx: ProxyCtx::default(),
        };
        let ctx = &mut booking.ctx;
        match self.serve(session, ctx).await {
            Ok(()) => {
                self.logging(None, ctx).await;
                session.finish().await
            }
            Err(e) => {
                // The relay answers its own refusals in the protocol's shape where they happen;
                // what reaches here is a client connection that failed mid-request (a body it
                // could not frame or did not send in time, a write to a gone client) or a fault
                // of the relay's. Answered with a bare status when nothing was sent yet and the
                // connection still takes it; the connection is never reused.
                let dead = matches!(
                    e.etype(),
                    pingora::ErrorType::WriteError
                        | pingora::ErrorType::ReadError
                        | pingora::ErrorType::ConnectionClosed
                );
                let code = match (e.etype(), e.esource()) {
                    (pingora::ErrorType::HTTPStatus(code), _) => *code,
                    (_, pingora::ErrorSource::Upstream) => 502,
                    (_, pingora::ErrorSource::Downstream) => 400,
                    _ => 500,
                };
                if dead {
                    tracing::debug!(error = %e, "client connection failed mid-request");
                } else {
                    tracing::warn!(error = %e, status = code, "request failed");
                    Box::pin(session.respond_error(code)).await;
                }
                self.logging(Some(&e), ctx).await;
                false
            }
        }
    }

    /// Serves one request: route, body, filters, upstream exchange. Every answer, also every
    /// refusal, is written here.
    async fn serve(&self, session: &mut Session, ctx: &mut ProxyCtx) -> pingora::Result<()> {
        // The client's id is taken when it is a plain token: it goes into the access log and
        // the record as it is, so spaces, quotes or `=` there could forge a log line's fields.
        let ids = RequestIds {
            relay: crate::store::new_id(),
            client: header_map(session)
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(is_id_byte))
                .map(str::to_string),
        };
        let head = session.req_header();
        let (method, path) = (head.method.as_str(), head.uri.path());
        // Matched on the head's own strings; an unknown path's refusal is made before the
        // session is borrowed again.
        let route = match_route(method, path).ok_or_else(|| not_found(method, path));
        match route {
            Ok(Route::Health) => {
                ctx.status = 200;
                Self::respond(session, 200, "text/plain", Bytes::from_static(b"ok"), &[]).await?;
                Ok(())
            }
            Ok(Route::Models(route)) => {
                match self.models(session, &route) {
                    Ok(body) => {
                        ctx.status = 200;
                        Self::respond(session, 200, "application/json", body, &ids.headers())
                            .await?;
                    }
                    Err((protocol, r)) => {
                        Self::reject(session, ctx, protocol, &r, &ids).await?;
                    }
                }
                Ok(())
            }
            Ok(Route::ResponsesWebsocket) => {
                Box::pin(self.refuse_websocket(session, ctx, &ids)).await
            }
            Ok(Route::Api(route)) => {
                let protocol = route.protocol;
                let gauge = &crate::metrics::protocol_series(protocol).inflight;
                gauge.inc();
                let result = self.handle_api(session, ctx, route, ids).await;
                gauge.dec();
                result
            }
            Err((protocol, r)) => {
                session.set_keep_alive(false);
                Self::reject(session, ctx, protocol, &r, &ids).await
            }
        }
    }

    /// A `GET` of the Responses path. A WebSocket handshake (Codex's first try) is answered 426
    /// once its key is good: Codex falls back to HTTP at once on a 426 (any other refusal it
    /// retries with backoff, seconds per session). A bad key gets its 401 as on HTTP. No
    /// `Upgrade` field is sent back: the answer asks the client to stay on the HTTP/1.1 it
    /// speaks, and the connection is closed after it, as a client that asked to switch
    /// protocols expects either the switch or the end. A plain `GET` is an unknown route.
    async fn refuse_websocket(
        &self,
        session: &mut Session,
        ctx: &mut ProxyCtx,
        ids: &RequestIds,
    ) -> pingora::Result<()> {
        let protocol = Protocol::OpenaiResponses;
        session.set_keep_alive(false);
        let head = session.req_header();
        if !relay_filters::route::asks_websocket(&head.headers) {
            let (_, r) = not_found(head.method.as_str(), head.uri.path());
            return Self::reject(session, ctx, protocol, &r, ids).await;
        }
        let r = match self.key_of(session) {
            Ok(_) => Rejection::new(
                ErrorKind::UpgradeRequired,
                "the Responses API is served over HTTP here, not WebSocket: POST the request",
            ),
            Err(r) => r,
        };
        Self::reject(session, ctx, protocol, &r, ids).await
    }

    /// Books the request: usage, cost, metrics and the usage record, for every request that was
    /// read, also failed and cut ones.
    async fn logging(&self, e: Option<&pingora::Error>, ctx: &mut ProxyCtx) {
        if let Some(e) = e {
            if ctx.status == 0 {
                ctx.status = 499;
                ctx.error_type.get_or_insert("client_error");
            }
            tracing::debug!(error = %e, "request ended with an error");
        }
        ctx.lease.take();
        // The key's slot before the booking, which waits while the usage queue is full.
        if let Some(r) = ctx.req.as_mut() {
            self.release_key_slot(r).await;
        }
        // Boxed: the record and its queueing (1.6 KB) would size the connection's future.
        Box::pin(self.book(ctx)).await;
        // The key's concurrency slot and cost hold go back, its cost is booked to its limits.
        if let Some(settle) = self.limits_settlement(ctx) {
            settle.await;
        }
    }

    /// Gives the request's key concurrency slot back (or its slot for a drained answer), if
    /// it holds one (once).
    async fn release_key_slot(&self, r: &mut RequestCtx) {
        let Some(limits) = self.chain.limits.as_ref() else {
            return;
        };
        for lease in [r.limits.slot.take(), r.limits.drain_slot.take()]
            .into_iter()
            .flatten()
        {
            limits.store().release_slot(&lease).await;
        }
    }

    /// What ends a request's hold on its key's limits, owned, to run now or apart from the
    /// request (once: the slot, hold and cost are taken out of the context).
    fn limits_settlement(
        &self,
        ctx: &mut ProxyCtx,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let limits = self.chain.limits.as_ref()?;
        let r = ctx.req.as_mut()?;
        let slot = r.limits.slot.take().or_else(|| r.limits.drain_slot.take());
        let hold = r.limits.cost.take();
        let user_hold = r.limits.user_cost.take();
        let cost = std::mem::take(&mut r.usage.billed_cost).max(0);
        // The cost is booked to the key and to its user, each counted whether or not it has a
        // limit now, so a limit set later finds the spend.
        let subjects = r
            .auth
            .as_ref()
            .filter(|_| hold.is_some() || user_hold.is_some() || cost > 0)
            .map(|a| (a.key.id.clone(), user_subject(&a.key.user_id)));
        if slot.is_none() && subjects.is_none() {
            return None;
        }
        let store = limits.store().clone();
        let started_ms = r.started_ms;
        Some(async move {
            if let Some(lease) = slot {
                store.release_slot(&lease).await;
            }
            if let Some((key, user)) = subjects {
                let day = relay_filters::key_limits::utc_day(started_ms);
                // At once: with Redis, each is a round trip.
                tokio::join!(
                    store.settle_cost(&key, &day, hold.as_ref(), cost),
                    store.settle_cost(&user, &day, user_hold.as_ref(), cost)
                );
            }
        })
    }
}

/// The error body for an upstream failure, in the client protocol's shape.
pub(crate) fn upstream_error_body(protocol: Protocol, status: u16, message: &str) -> Bytes {
    Bytes::from(error_body(protocol, ErrorKind::Upstream, status, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_are_short_and_printable() {
        assert_eq!(provider_id("req_011C".into()).as_deref(), Some("req_011C"));
        for bad in ["", "a b", "a\tb", "é", &"x".repeat(129)] {
            assert_eq!(provider_id(bad.to_string()), None, "{bad:?}");
        }
        assert_eq!(provider_id("x".repeat(128)).map(|s| s.len()), Some(128));
        let mut headers = http::HeaderMap::new();
        assert_eq!(provider_request_id(&headers, "sent"), None);
        headers.insert("x-request-id", http::HeaderValue::from_static("req_openai"));
        assert_eq!(
            provider_request_id(&headers, "sent").as_deref(),
            Some("req_openai")
        );
        // An upstream echoing the id the relay sent names no provider id.
        assert_eq!(provider_request_id(&headers, "req_openai"), None);
        // Nor does an echo in `request-id` hide an id of the provider's own.
        let mut echoed = headers.clone();
        echoed.insert("request-id", http::HeaderValue::from_static("sent"));
        assert_eq!(
            provider_request_id(&echoed, "sent").as_deref(),
            Some("req_openai")
        );
        headers.insert(
            "request-id",
            http::HeaderValue::from_static("req_anthropic"),
        );
        assert_eq!(
            provider_request_id(&headers, "sent").as_deref(),
            Some("req_anthropic")
        );
    }

    #[test]
    fn storable_text_replaces_nul_only() {
        assert_eq!(storable_text("claude-x".into()), "claude-x");
        assert_eq!(storable_text("a\0b\0".into()), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(storable_text("tab\there".into()), "tab\there");
    }
}
