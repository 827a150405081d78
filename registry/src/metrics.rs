//! Prometheus metrics: requests by route and status, bytes in and out, upload sessions, storage errors.

use std::sync::Arc;

use axum::http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;

use crate::gc::GcReport;
use crate::metadata::Usage;
use crate::quota::QuotaUsage;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: String,
}

/// One value per configured quota rule, never per scope: a per-child rule such as `cache/*` has a
/// scope per app, and a series per app would grow without bound.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    quota: String,
}

#[derive(Default)]
struct QuotaGauges {
    limit: Family<QuotaLabels, Gauge>,
    used: Family<QuotaLabels, Gauge>,
    scopes: Family<QuotaLabels, Gauge>,
}

/// The last garbage collection: when it finished, how long it took, what it freed.
#[derive(Default)]
struct GcGauges {
    finished: Gauge,
    duration_seconds: Gauge<f64, AtomicU64>,
    objects_deleted: Gauge,
    bytes_freed: Gauge,
    expired_tags: Gauge,
    failures: Counter,
    retention_skipped: Counter,
}

/// One series per configured upstream (named by its prefix), so the count stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamRequestLabels {
    upstream: String,
    method: &'static str,
}

#[derive(Default)]
struct ProxyCounters {
    manifest_requests: Family<UpstreamRequestLabels, Counter>,
    blob_bytes: Family<UpstreamLabels, Counter>,
    cache_hits: Family<UpstreamLabels, Counter>,
    stale_served: Family<UpstreamLabels, Counter>,
    rate_limit_remaining: Family<UpstreamLabels, Gauge>,
}

/// This instance's local copy of blobs read from the object store (`storage.blob_cache`).
#[derive(Default)]
struct BlobCacheCounters {
    hits: Counter,
    misses: Counter,
    bytes: Gauge,
}

struct Inner {
    registry: Registry,
    proxy: ProxyCounters,
    blob_cache: BlobCacheCounters,
    gc: GcGauges,
    storage_bytes: Family<NamespaceLabels, Gauge>,
    quotas: QuotaGauges,
    requests: Family<RequestLabels, Counter>,
    bytes_received: Counter,
    bytes_sent: Counter,
    bytes_sent_from_files: Counter,
    upload_sessions: Gauge,
    storage_errors: Counter,
}

/// The method label: a fixed set, since any client can invent methods and each label value is a
/// series kept for the life of the process.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn upstream_labels(upstream: &str) -> UpstreamLabels {
    UpstreamLabels {
        upstream: upstream.to_owned(),
    }
}

/// Cheap to clone; every clone feeds the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("berth_registry");
        let requests = Family::<RequestLabels, Counter>::default();
        let (bytes_received, bytes_sent) = (Counter::default(), Counter::default());
        let bytes_sent_from_files = Counter::default();
        let (upload_sessions, storage_errors) = (Gauge::default(), Counter::default());
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes of blob and manifest data received",
            bytes_received.clone(),
        );
        registry.register(
            "sent_bytes",
            "Bytes of response bodies sent",
            bytes_sent.clone(),
        );
        registry.register(
            "sent_from_file_bytes",
            "Bytes of blob bodies the kernel sends straight from the file (sendfile), a part of sent_bytes",
            bytes_sent_from_files.clone(),
        );
        registry.register(
            "upload_sessions",
            "Upload sessions opened by this process and not yet finished or cancelled",
            upload_sessions.clone(),
        );
        registry.register(
            "storage_errors",
            "Requests that failed inside a store",
            storage_errors.clone(),
        );
        let gc = GcGauges::default();
        let storage_bytes = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "gc_last_run_timestamp_seconds",
            "When the last garbage collection finished (unix time)",
            gc.finished.clone(),
        );
        registry.register(
            "gc_last_run_duration_seconds",
            "How long the last garbage collection took",
            gc.duration_seconds.clone(),
        );
        registry.register(
            "gc_last_run_deleted_objects",
            "Blobs and manifests whose storage the last garbage collection deleted",
            gc.objects_deleted.clone(),
        );
        registry.register(
            "gc_last_run_freed_bytes",
            "Bytes the last garbage collection freed",
            gc.bytes_freed.clone(),
        );
        registry.register(
            "gc_last_run_expired_tags",
            "Tags retention deleted in the last garbage collection",
            gc.expired_tags.clone(),
        );
        registry.register(
            "retention_skipped",
            "Garbage collections whose retention deleted nothing because Cloud Controller or UAA did not answer",
            gc.retention_skipped.clone(),
        );
        registry.register(
            "gc_failures",
            "Garbage collections that failed",
            gc.failures.clone(),
        );
        registry.register(
            "storage_bytes",
            "Bytes of blobs and manifests each top-level namespace can read, each digest counted once, as of the last garbage collection",
            storage_bytes.clone(),
        );
        let quotas = QuotaGauges::default();
        registry.register(
            "quota_limit_bytes",
            "Bytes each scope of the quota may hold",
            quotas.limit.clone(),
        );
        registry.register(
            "quota_used_bytes",
            "Bytes the quota's fullest scope holds, each digest counted once (for a plain prefix, its only scope)",
            quotas.used.clone(),
        );
        registry.register(
            "quota_scopes",
            "Scopes of the quota holding anything (1 for a plain prefix, one per child for PREFIX/*)",
            quotas.scopes.clone(),
        );
        let proxy = ProxyCounters::default();
        registry.register(
            "proxy_upstream_manifest_requests",
            "Manifest requests the pull-through cache sent upstream, by method: a GET is a pull on Docker Hub, a HEAD is not",
            proxy.manifest_requests.clone(),
        );
        registry.register(
            "proxy_upstream_blob_bytes",
            "Blob bytes the pull-through cache fetched from upstream",
            proxy.blob_bytes.clone(),
        );
        registry.register(
            "proxy_cache_hits",
            "Manifest pulls of proxied repositories served without an upstream GET",
            proxy.cache_hits.clone(),
        );
        registry.register(
            "proxy_stale_served",
            "Manifest pulls served from the cache because the upstream failed the tag's check (down, 5xx, 429)",
            proxy.stale_served.clone(),
        );
        registry.register(
            "proxy_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream answered with",
            proxy.rate_limit_remaining.clone(),
        );
        let blob_cache = BlobCacheCounters::default();
        registry.register(
            "blob_cache_hits",
            "Blob reads served from this instance's local copy (storage.blob_cache)",
            blob_cache.hits.clone(),
        );
        registry.register(
            "blob_cache_misses",
            "Blob reads that went to the object store while storage.blob_cache is on",
            blob_cache.misses.clone(),
        );
        registry.register(
            "blob_cache_bytes",
            "Bytes of blobs in this instance's local copy",
            blob_cache.bytes.clone(),
        );
        Metrics(Arc::new(Inner {
            registry,
            proxy,
            blob_cache,
            gc,
            storage_bytes,
            quotas,
            requests,
            bytes_received,
            bytes_sent,
            bytes_sent_from_files,
            upload_sessions,
            storage_errors,
        }))
    }
}

impl Metrics {
    /// A blob read while `storage.blob_cache` is on: from the local copy, or not.
    pub fn blob_cache_read(&self, hit: bool) {
        let counters = &self.0.blob_cache;
        if hit {
            &counters.hits
        } else {
            &counters.misses
        }
        .inc();
    }

    pub fn set_blob_cache_bytes(&self, bytes: u64) {
        self.0.blob_cache.bytes.set(bytes as i64);
    }

    pub fn proxy_manifest_request(&self, upstream: &str, method: &'static str) {
        let labels = UpstreamRequestLabels {
            upstream: upstream.to_owned(),
            method,
        };
        self.0.proxy.manifest_requests.get_or_create(&labels).inc();
    }

    pub fn proxy_blob_bytes(&self, upstream: &str, bytes: u64) {
        self.0
            .proxy
            .blob_bytes
            .get_or_create(&upstream_labels(upstream))
            .inc_by(bytes);
    }

    pub fn proxy_cache_hit(&self, upstream: &str) {
        self.0
            .proxy
            .cache_hits
            .get_or_create(&upstream_labels(upstream))
            .inc();
    }

    pub fn proxy_stale_served(&self, upstream: &str) {
        self.0
            .proxy
            .stale_served
            .get_or_create(&upstream_labels(upstream))
            .inc();
    }

    pub fn proxy_rate_limit_remaining(&self, upstream: &str, remaining: u64) {
        self.0
            .proxy
            .rate_limit_remaining
            .get_or_create(&upstream_labels(upstream))
            .set(remaining as i64);
    }

    pub fn observe_request(
        &self,
        route: &'static str,
        method: &Method,
        status: u16,
        bytes_sent: u64,
        storage_failed: bool,
    ) {
        let labels = RequestLabels {
            route,
            method: method_label(method),
            status,
        };
        self.0.requests.get_or_create(&labels).inc();
        self.0.bytes_sent.inc_by(bytes_sent);
        if storage_failed {
            self.0.storage_errors.inc();
        }
    }

    pub fn add_received(&self, bytes: u64) {
        self.0.bytes_received.inc_by(bytes);
    }

    pub fn add_sent_from_file(&self, bytes: u64) {
        self.0.bytes_sent_from_files.inc_by(bytes);
    }

    pub fn upload_started(&self) {
        self.0.upload_sessions.inc();
    }

    pub fn upload_ended(&self) {
        self.0.upload_sessions.dec();
    }

    /// Starts the session gauge from the sessions that survived a restart.
    pub fn set_upload_sessions(&self, open: usize) {
        self.0.upload_sessions.set(open as i64);
    }

    pub fn gc_finished(&self, unix_now: u64, report: &GcReport, succeeded: bool) {
        let gc = &self.0.gc;
        gc.finished.set(unix_now as i64);
        gc.duration_seconds.set(report.duration_ms as f64 / 1e3);
        gc.objects_deleted.set(report.objects_deleted as i64);
        gc.bytes_freed.set(report.bytes_freed as i64);
        gc.expired_tags.set(report.expired_tags as i64);
        if !succeeded {
            gc.failures.inc();
        }
    }

    /// Replaces the per-namespace storage figures (a namespace emptied since drops out).
    pub fn retention_skipped(&self) {
        self.0.gc.retention_skipped.inc();
    }

    pub fn set_usage(&self, usage: &Usage) {
        self.0.storage_bytes.clear();
        for entry in &usage.namespaces {
            self.0
                .storage_bytes
                .get_or_create(&NamespaceLabels {
                    namespace: entry.name.clone(),
                })
                .set(entry.bytes as i64);
        }
    }

    /// Replaces the quota figures with `usage` (a rule no longer configured drops out).
    pub fn set_quotas(&self, usage: &[QuotaUsage]) {
        let gauges = &self.0.quotas;
        for family in [&gauges.limit, &gauges.used, &gauges.scopes] {
            family.clear();
        }
        for entry in usage {
            let labels = QuotaLabels {
                quota: entry.quota.clone(),
            };
            gauges
                .limit
                .get_or_create(&labels)
                .set(entry.max_bytes as i64);
            gauges
                .used
                .get_or_create(&labels)
                .set(entry.max_used_bytes as i64);
            gauges
                .scopes
                .get_or_create(&labels)
                .set(entry.scopes as i64);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_observed() {
        let metrics = Metrics::default();
        metrics.observe_request("manifest", &Method::GET, 200, 512, false);
        metrics.observe_request("blob", &Method::GET, 500, 0, true);
        metrics.add_received(42);
        let text = metrics.render();
        assert!(text.contains(r#"berth_registry_http_requests_total{route="manifest",method="GET",status="200"} 1"#), "{text}");
        assert!(
            text.contains("berth_registry_sent_bytes_total 512"),
            "{text}"
        );
        assert!(
            text.contains("berth_registry_received_bytes_total 42"),
            "{text}"
        );
        assert!(
            text.contains("berth_registry_storage_errors_total 1"),
            "{text}"
        );
    }

    #[test]
    fn quotas_are_labelled_by_rule_and_dropped_with_it() {
        let metrics = Metrics::default();
        metrics.set_quotas(&[QuotaUsage {
            quota: "cache/*".into(),
            max_bytes: 10,
            scopes: 3,
            max_used_bytes: 7,
        }]);
        let text = metrics.render();
        for line in [
            r#"berth_registry_quota_limit_bytes{quota="cache/*"} 10"#,
            r#"berth_registry_quota_used_bytes{quota="cache/*"} 7"#,
            r#"berth_registry_quota_scopes{quota="cache/*"} 3"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        metrics.set_quotas(&[]);
        assert!(!metrics.render().contains("cache/*"));
    }

    #[test]
    fn invented_methods_share_one_series() {
        let metrics = Metrics::default();
        metrics.observe_request("base", &Method::GET, 200, 0, false);
        let before = metrics.render().lines().count();
        for i in 0..1000 {
            let invented = Method::from_bytes(format!("X{i}").as_bytes()).unwrap();
            metrics.observe_request("base", &invented, 405, 0, false);
        }
        let text = metrics.render();
        assert_eq!(text.lines().count(), before + 1, "{text}");
        assert!(
            text.contains(r#"method="other",status="405"} 1000"#),
            "{text}"
        );
    }
}
