//! A counting, fault-injecting proxy in front of a registry.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::*;

/// What the proxy does to one matching request instead of relaying it faithfully.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer this status without asking upstream (`Retry-After: 1` with a 429).
    Status(u16),
    /// Relay this many bytes of the body, then drop the connection.
    Cut(usize),
    /// Flip the first byte of the body, keeping its length.
    Corrupt,
    /// Wait this long before relaying.
    Delay(Duration),
    /// Relay the body at this many bytes per second, in tenth-of-a-second slices.
    Throttle(usize),
    /// Relay this many bytes of the body, then send nothing more, keeping the connection open.
    Stall(usize),
}

struct Rule {
    needle: String,
    fault: Fault,
    /// Matching requests still to fault; `None` for all of them.
    left: Option<u32>,
}

/// One request the proxy answered.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct ProxyLog {
    rules: Vec<Rule>,
    exchanges: Vec<Exchange>,
    /// Blob body bytes relayed to the client, by digest.
    blob_bytes: BTreeMap<String, u64>,
}

struct ProxyContext {
    upstream: String,
    client: reqwest::Client,
    log: Mutex<ProxyLog>,
}

/// An HTTP proxy in front of a registry that counts the blob bytes it relays and injects faults
/// into requests whose path contains a chosen string.
pub struct Proxy {
    context: Arc<ProxyContext>,
    server: BackgroundServer,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let context = Arc::new(ProxyContext {
            upstream: format!("http://{upstream}"),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client"),
            log: Mutex::default(),
        });
        let state = context.clone();
        let server = BackgroundServer::start("proxy", None, move || {
            Router::new().fallback(relay).with_state(state)
        });
        Proxy { context, server }
    }

    pub fn host(&self) -> String {
        self.server.addr.to_string()
    }

    /// Applies `fault` to the next `times` requests (all of them with `None`) whose path
    /// contains `needle`; a needle may start with a method (`"GET /v2/..."`) to fault only that.
    pub fn inject(&self, needle: &str, fault: Fault, times: Option<u32>) {
        self.log().rules.push(Rule {
            needle: needle.into(),
            fault,
            left: times,
        });
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.log().exchanges.clone()
    }

    /// Blob bytes relayed since the last call, by digest.
    pub fn take_blob_bytes(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.log().blob_bytes)
    }

    /// Waits until every fault injected for `needle` has been applied.
    pub fn wait_until_applied(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let pending = |log: &ProxyLog| {
            log.rules
                .iter()
                .any(|r| r.needle == needle && r.left != Some(0))
        };
        while pending(&self.log()) {
            assert!(Instant::now() < deadline, "no request for {needle} arrived");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, ProxyLog> {
        self.context.log.lock().expect("proxy log lock")
    }
}

async fn relay(State(context): State<Arc<ProxyContext>>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    let range = header_text(request.headers(), "range");
    let line = format!("{} {path}", request.method());
    let fault = {
        let mut log = context.log.lock().expect("proxy log lock");
        let rule = log
            .rules
            .iter_mut()
            .find(|r| line.contains(&r.needle) && r.left != Some(0));
        rule.map(|rule| {
            rule.left = rule.left.map(|n| n - 1);
            rule.fault
        })
    };
    let response = match fault {
        Some(Fault::Status(status)) => fault_status(status),
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            forward(&context, request, &path, None).await
        }
        fault => forward(&context, request, &path, fault).await,
    };
    let status = response.status().as_u16();
    let mut log = context.log.lock().expect("proxy log lock");
    log.exchanges.push(Exchange {
        path,
        range,
        status,
    });
    response
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn fault_status(status: u16) -> Response {
    let mut response = Response::new(Body::from(
        r#"{"errors":[{"code":"UNAVAILABLE","message":"injected by the test proxy"}]}"#,
    ));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    if status == 429 {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    response
}

async fn forward(
    context: &Arc<ProxyContext>,
    request: Request,
    path: &str,
    fault: Option<Fault>,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("a request body");
    let mut headers = parts.headers.clone();
    headers.remove("host");
    let upstream = context
        .client
        .request(parts.method.clone(), format!("{}{path}", context.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(err) => {
            let mut response = Response::new(Body::from(err.to_string()));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            return response;
        }
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if !matches!(name.as_str(), "transfer-encoding" | "connection") {
            response = response.header(name, value);
        }
    }
    let blob = match parts.method {
        axum::http::Method::GET => path.split_once("/blobs/").map(|(_, d)| d.to_owned()),
        _ => None,
    };
    let relayed = Relayed {
        upstream: upstream.bytes_stream().boxed(),
        sent: 0,
        fault,
        blob,
        context: context.clone(),
        fail_next: false,
        done: false,
        pending: Bytes::new(),
    };
    let stream = futures_util::stream::unfold(relayed, Relayed::next);
    response
        .body(Body::from_stream(stream))
        .expect("a relayed response")
}

/// A response body on its way through the proxy: counted, and cut or corrupted on request.
struct Relayed {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    sent: usize,
    fault: Option<Fault>,
    blob: Option<String>,
    context: Arc<ProxyContext>,
    fail_next: bool,
    done: bool,
    /// What a throttled body has received from upstream and not relayed yet.
    pending: Bytes,
}

impl Relayed {
    async fn next(mut self) -> Option<(io::Result<Bytes>, Relayed)> {
        if self.done {
            return None;
        }
        if self.fail_next {
            // Give the server time to flush what was relayed before the connection drops.
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.done = true;
            return Some((Err(io::Error::other("cut by the test proxy")), self));
        }
        let mut chunk = if self.pending.is_empty() {
            match self.upstream.next().await? {
                Ok(chunk) => chunk,
                Err(err) => {
                    self.done = true;
                    return Some((Err(io::Error::other(err)), self));
                }
            }
        } else {
            std::mem::take(&mut self.pending)
        };
        if let Some(Fault::Throttle(per_second)) = self.fault {
            let slice = (per_second / 10).max(1);
            if chunk.len() > slice {
                self.pending = chunk.split_off(slice);
            }
            let pause = Duration::from_secs_f64(chunk.len() as f64 / per_second as f64);
            tokio::time::sleep(pause).await;
        }
        if let Some(Fault::Stall(limit)) = self.fault
            && self.sent >= limit
        {
            std::future::pending::<()>().await;
        }
        match self.fault {
            Some(Fault::Stall(limit)) if self.sent + chunk.len() > limit => {
                self.pending = chunk.split_off(limit - self.sent);
            }
            Some(Fault::Cut(limit)) if self.sent + chunk.len() >= limit => {
                chunk = chunk.slice(..limit - self.sent);
                self.fail_next = true;
            }
            Some(Fault::Corrupt) if self.sent == 0 && !chunk.is_empty() => {
                let mut bytes = chunk.to_vec();
                bytes[0] ^= 0xff;
                chunk = Bytes::from(bytes);
            }
            _ => {}
        }
        self.sent += chunk.len();
        if let Some(digest) = &self.blob {
            let mut log = self.context.log.lock().expect("proxy log lock");
            *log.blob_bytes.entry(digest.clone()).or_default() += chunk.len() as u64;
        }
        Some((Ok(chunk), self))
    }
}
