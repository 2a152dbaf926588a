//! The exporter's own metrics (`elb_exporter_*`), kept in a `prometheus` registry and rendered per scrape.
//! They are few and small; the per-listener cloud series are pre-rendered by `exposition` instead.

use crate::cloud::operation::Operation;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Builds one metric from its table row; the kinds the table uses implement it.
trait Build: prometheus::core::Collector + Clone + Sized + 'static {
    fn build(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> prometheus::Result<Self>;
}

/// A label list on an unlabelled metric is a table mistake, refused rather than dropped.
fn no_labels(name: &str, labels: &[&str]) -> prometheus::Result<()> {
    match labels {
        [] => Ok(()),
        _ => Err(prometheus::Error::Msg(format!(
            "{name}: labels on an unlabelled metric"
        ))),
    }
}

macro_rules! build_scalar {
    ($($t:ty),*) => {$(
        impl Build for $t {
            fn build(name: &str, help: &str, labels: &[&str], _: &[f64]) -> prometheus::Result<Self> {
                no_labels(name, labels)?;
                <$t>::new(name, help)
            }
        }
    )*};
}
build_scalar!(IntGauge, Gauge);

macro_rules! build_vec {
    ($($t:ty),*) => {$(
        impl Build for $t {
            fn build(name: &str, help: &str, labels: &[&str], _: &[f64]) -> prometheus::Result<Self> {
                <$t>::new(Opts::new(name, help), labels)
            }
        }
    )*};
}
build_vec!(IntCounterVec, IntGaugeVec, GaugeVec);

impl Build for Histogram {
    fn build(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> prometheus::Result<Self> {
        no_labels(name, labels)?;
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
    }
}

impl Build for HistogramVec {
    fn build(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> prometheus::Result<Self> {
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
    }
}

/// Declares [`Telemetry`] from one table: each row is a field, its metric kind, name, labels, optional
/// histogram buckets and help text (which is also the field's doc), registered in row order.
macro_rules! telemetry {
    ($(
        $field:ident: $kind:ty = $name:literal [$($label:literal),*] $(buckets [$($b:literal),*])?,
            $help:literal;
    )*) => {
        /// Every exporter metric. Cheap to clone (the collectors are reference-counted).
        #[derive(Clone)]
        pub struct Telemetry {
            /// Holds every metric below; rendered on each scrape of `/metrics`.
            pub registry: Registry,
            $(
                #[doc = $help]
                pub $field: $kind,
            )*
        }

        impl Telemetry {
            fn register(registry: Registry) -> Self {
                Telemetry {
                    $(
                        $field: {
                            let m = <$kind as Build>::build(
                                $name,
                                $help,
                                &[$($label),*],
                                &[$($($b),*)?],
                            )
                            .expect("valid metric");
                            // Registration only fails on duplicate names, which the table cannot have
                            // (the tests build it).
                            registry.register(Box::new(m.clone())).expect("unique metric names");
                            m
                        },
                    )*
                    registry,
                }
            }
        }
    };
}

telemetry! {
    info: GaugeVec = "elb_exporter_build_info" ["version"],
        "Build information; always 1.";
    up: IntGauge = "elb_exporter_up" [],
        "1 when the last collection from Cloud Eye succeeded completely, else 0.";
    cloud_requests: IntCounterVec = "elb_exporter_cloud_requests_total" ["api"],
        "HTTP requests sent to the cloud APIs, retries included.";
    cloud_failures: IntCounterVec = "elb_exporter_cloud_request_failures_total" ["api", "code"],
        "Cloud API requests that failed, by HTTP status or transport failure (timeout, connect, malformed).";
    cloud_duration: HistogramVec = "elb_exporter_cloud_request_duration_seconds" ["api"]
        buckets [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        "Latency of cloud API requests, one observation per HTTP request.";
    paused_calls: IntCounterVec = "elb_exporter_cloud_calls_paused_total" ["api"],
        "Cloud calls not sent because the credentials were rejected (401) and calls pause so the AK is not locked.";
    services: IntGauge = "elb_exporter_services" [],
        "Kubernetes Services carrying the ELB annotation.";
    listeners: IntGauge = "elb_exporter_listeners" [],
        "ELB listeners attributed to a Service port.";
    series: IntGauge = "elb_exporter_series" [],
        "Cloud series currently exported (listener x metric with a datapoint).";
    collection_duration: Gauge = "elb_exporter_collection_duration_seconds" [],
        "Wall time of the last collection cycle.";
    last_success: Gauge = "elb_exporter_last_collection_success_timestamp_seconds" [],
        "Unix time at which the last fully successful collection finished.";
    newest_datapoint_age: Gauge = "elb_exporter_newest_datapoint_age_seconds" [],
        "Age, at scrape time, of the newest Cloud Eye datapoint exported: the CES lag plus collection delay.";
    ces_publication_lag: Gauge = "elb_exporter_ces_publication_lag_seconds" [],
        "Estimated time from a minute's start to Cloud Eye publishing its datapoint (0.8 quantile of the last 20 minutes, learnt from the collected answers).";
    exposure_delay: Histogram = "elb_exporter_exposure_delay_seconds" []
        buckets [0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0],
        "Delay the exporter added to each newly collected minute: from its expected publication (minute + estimated lag) to its exposure on /metrics.";
    planned_calls: IntGaugeVec = "elb_exporter_planned_cloud_calls_per_minute" ["api"],
        "Cloud calls per minute the current targets need at the configured intervals.";
    inventory_calls: IntGaugeVec = "elb_exporter_inventory_calls" ["api", "version"],
        "Listing calls (pages) the inventory made in the last listener_refresh period, by cloud call and ELB API version.";
    discovery_problems: IntGaugeVec = "elb_exporter_discovery_problems" ["reason"],
        "Annotated Services or ports that cannot be exported right now, by reason.";
    skipped: IntCounterVec = "elb_exporter_skipped_items_total" ["reason"],
        "Parts of cloud responses skipped as unusable, by reason.";
    collections: IntCounterVec = "elb_exporter_collections_total" ["result"],
        "Collection cycles, by result.";
    watch_errors: IntCounterVec = "elb_exporter_kubernetes_watch_errors_total" ["kind"],
        "Errors of the Kubernetes Service watch (each followed by a backed-off retry).";
    task_failures: IntCounterVec = "elb_exporter_task_failures_total" ["task"],
        "Pipeline tasks that ended or panicked while the exporter served; any makes /healthz fail.";
    effective_interval: Gauge = "elb_exporter_collection_effective_interval_seconds" [],
        "Start-to-start period of full collection cycles: collection.interval, stretched when the planned CES calls exceed the rate limit.";
    ces_batch_size: IntGauge = "elb_exporter_ces_batch_size" [],
        "Metrics per CES batch call: global.scrape_batch_size, or 10 once CES refused a larger batch and accepted 10.";
    leader: IntGauge = "elb_exporter_leader" [],
        "1 while this replica collects from Cloud Eye and exports cloud series (leader of the Lease, or leader_election off), else 0.";
    warm_copy_series: IntGauge = "elb_exporter_warm_copy_series" [],
        "Cloud series in this follower's copy of the leader's, served from the moment it takes over until its first cycle; 0 on the leader and while no copy is held.";
    warm_copy_failures: IntCounterVec = "elb_exporter_warm_copy_failures_total" ["reason"],
        "Failed requests for the leader's warm copy, by reason (unreachable, refused, not_leading, layout, format, status).";
    http_dropped: IntCounterVec = "elb_exporter_http_connections_dropped_total" ["reason"],
        "Connections to /metrics closed by the exporter, by reason (timeouts, limit, TLS).";
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A fresh registry with every metric registered, the build info set and the per-API and
    /// per-result series pre-created.
    pub fn new() -> Self {
        let t = Self::register(Registry::new());
        t.info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        // Pre-create the per-API series so dashboards see zeros rather than gaps.
        for api in Operation::ALL {
            t.cloud_requests.with_label_values(&[api.as_str()]);
            t.planned_calls.with_label_values(&[api.as_str()]);
        }
        for r in ["success", "failure"] {
            t.collections.with_label_values(&[r]);
        }
        t
    }

    /// Renders the registry in the text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's names, kinds and label names are a published contract (dashboards, alerts, the HPA
    /// guide): a slip in a row shows here before it reaches a user.
    #[test]
    fn every_family_keeps_its_name_kind_and_labels() {
        let t = Telemetry::new();
        // Labelled families render only once a child exists.
        for v in [
            &t.cloud_requests,
            &t.paused_calls,
            &t.skipped,
            &t.watch_errors,
        ] {
            v.with_label_values(&["x"]).inc();
        }
        for v in [&t.task_failures, &t.http_dropped, &t.warm_copy_failures] {
            v.with_label_values(&["x"]).inc();
        }
        t.cloud_failures.with_label_values(&["x", "y"]).inc();
        t.cloud_duration.with_label_values(&["x"]).observe(1.0);
        t.inventory_calls.with_label_values(&["x", "y"]).set(1);
        t.discovery_problems.with_label_values(&["x"]).set(1);
        let got: Vec<String> = t
            .registry
            .gather()
            .iter()
            .map(|f| {
                let labels: Vec<&str> = f.get_metric()[0]
                    .get_label()
                    .iter()
                    .map(|l| l.name())
                    .collect();
                format!("{} {:?} {}", f.name(), f.get_field_type(), labels.join(","))
            })
            .collect();
        let want = [
            "elb_exporter_build_info GAUGE version",
            "elb_exporter_ces_batch_size GAUGE ",
            "elb_exporter_ces_publication_lag_seconds GAUGE ",
            "elb_exporter_cloud_calls_paused_total COUNTER api",
            "elb_exporter_cloud_request_duration_seconds HISTOGRAM api",
            "elb_exporter_cloud_request_failures_total COUNTER api,code",
            "elb_exporter_cloud_requests_total COUNTER api",
            "elb_exporter_collection_duration_seconds GAUGE ",
            "elb_exporter_collection_effective_interval_seconds GAUGE ",
            "elb_exporter_collections_total COUNTER result",
            "elb_exporter_discovery_problems GAUGE reason",
            "elb_exporter_exposure_delay_seconds HISTOGRAM ",
            "elb_exporter_http_connections_dropped_total COUNTER reason",
            "elb_exporter_inventory_calls GAUGE api,version",
            "elb_exporter_kubernetes_watch_errors_total COUNTER kind",
            "elb_exporter_last_collection_success_timestamp_seconds GAUGE ",
            "elb_exporter_leader GAUGE ",
            "elb_exporter_listeners GAUGE ",
            "elb_exporter_newest_datapoint_age_seconds GAUGE ",
            "elb_exporter_planned_cloud_calls_per_minute GAUGE api",
            "elb_exporter_series GAUGE ",
            "elb_exporter_services GAUGE ",
            "elb_exporter_skipped_items_total COUNTER reason",
            "elb_exporter_task_failures_total COUNTER task",
            "elb_exporter_up GAUGE ",
            "elb_exporter_warm_copy_failures_total COUNTER reason",
            "elb_exporter_warm_copy_series GAUGE ",
        ];
        assert_eq!(got, want);
    }
}
