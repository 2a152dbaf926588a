//! The exporter's own metrics (`elb_exporter_*`), kept in a `prometheus` registry and rendered per scrape.
//! They are few and small; the per-listener cloud series are pre-rendered by `exposition` instead.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Which cloud API a request went to; the `api` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    IamListProjects,
    /// `GET /v3/auth/projects`: the fallback when the user may not list projects by name.
    IamListAuthProjects,
    ElbListListeners,
    CesBatchQuery,
    /// Backend server groups of Ingress ELBs.
    ElbListPools,
    /// Forwarding policies of Ingress listeners.
    ElbListL7policies,
    /// Load balancers, to bind Ingresses named by VIP address or CCE's auto-created ELB name.
    ElbListLoadbalancers,
}

impl Api {
    pub const ALL: [Api; 7] = [
        Api::IamListProjects,
        Api::IamListAuthProjects,
        Api::ElbListListeners,
        Api::CesBatchQuery,
        Api::ElbListPools,
        Api::ElbListL7policies,
        Api::ElbListLoadbalancers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::IamListProjects => "iam_list_projects",
            Api::IamListAuthProjects => "iam_list_auth_projects",
            Api::ElbListListeners => "elb_list_listeners",
            Api::CesBatchQuery => "ces_batch_query",
            Api::ElbListPools => "elb_list_pools",
            Api::ElbListL7policies => "elb_list_l7policies",
            Api::ElbListLoadbalancers => "elb_list_loadbalancers",
        }
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every exporter metric. Cheap to clone (the collectors are reference-counted).
#[derive(Clone)]
pub struct Telemetry {
    pub registry: Registry,
    pub up: IntGauge,
    pub cloud_requests: IntCounterVec,
    pub cloud_failures: IntCounterVec,
    pub cloud_duration: HistogramVec,
    pub paused_calls: IntCounterVec,
    pub services: IntGauge,
    pub listeners: IntGauge,
    pub series: IntGauge,
    pub collection_duration: Gauge,
    pub last_success: Gauge,
    pub newest_datapoint_age: Gauge,
    pub ces_publication_lag: Gauge,
    pub exposure_delay: Histogram,
    pub planned_calls: IntGaugeVec,
    pub inventory_calls: IntGaugeVec,
    pub discovery_problems: IntGaugeVec,
    pub skipped: IntCounterVec,
    pub collections: IntCounterVec,
    pub watch_restarts: IntCounterVec,
    pub task_failures: IntCounterVec,
    pub effective_interval: Gauge,
    pub ces_batch_size: IntGauge,
    pub leader: IntGauge,
    pub http_dropped: IntCounterVec,
    pub info: GaugeVec,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let registry = Registry::new();
        // Registration only fails on duplicate names, which the fixed set below cannot have.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("unique metric names");
            c
        }
        let info = reg(
            &registry,
            GaugeVec::new(
                Opts::new("elb_exporter_build_info", "Build information; always 1."),
                &["version"],
            )
            .expect("valid metric"),
        );
        info.with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        let t = Telemetry {
            up: reg(
                &registry,
                IntGauge::new(
                    "elb_exporter_up",
                    "1 when the last collection from Cloud Eye succeeded completely, else 0.",
                )
                .expect("valid metric"),
            ),
            cloud_requests: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_cloud_requests_total",
                        "HTTP requests sent to the cloud APIs, retries included.",
                    ),
                    &["api"],
                )
                .expect("valid metric"),
            ),
            cloud_failures: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_cloud_request_failures_total",
                        "Cloud API requests that failed, by HTTP status or transport failure (timeout, connect, malformed).",
                    ),
                    &["api", "code"],
                )
                .expect("valid metric"),
            ),
            cloud_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "elb_exporter_cloud_request_duration_seconds",
                        "Latency of cloud API requests, one observation per HTTP request.",
                    )
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
                    &["api"],
                )
                .expect("valid metric"),
            ),
            paused_calls: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_cloud_calls_paused_total",
                        "Cloud calls not sent because the credentials were rejected (401) and calls pause so the AK is not locked.",
                    ),
                    &["api"],
                )
                .expect("valid metric"),
            ),
            services: reg(
                &registry,
                IntGauge::new(
                    "elb_exporter_services",
                    "Kubernetes Services carrying the ELB annotation.",
                )
                .expect("valid metric"),
            ),
            listeners: reg(
                &registry,
                IntGauge::new(
                    "elb_exporter_listeners",
                    "ELB listeners attributed to a Service port.",
                )
                .expect("valid metric"),
            ),
            series: reg(
                &registry,
                IntGauge::new(
                    "elb_exporter_series",
                    "Cloud series currently exported (listener x metric with a datapoint).",
                )
                .expect("valid metric"),
            ),
            collection_duration: reg(
                &registry,
                Gauge::new(
                    "elb_exporter_collection_duration_seconds",
                    "Wall time of the last collection cycle.",
                )
                .expect("valid metric"),
            ),
            last_success: reg(
                &registry,
                Gauge::new(
                    "elb_exporter_last_collection_success_timestamp_seconds",
                    "Unix time at which the last fully successful collection finished.",
                )
                .expect("valid metric"),
            ),
            newest_datapoint_age: reg(
                &registry,
                Gauge::new(
                    "elb_exporter_newest_datapoint_age_seconds",
                    "Age, at scrape time, of the newest Cloud Eye datapoint exported: the CES lag plus collection delay.",
                )
                .expect("valid metric"),
            ),
            ces_publication_lag: reg(
                &registry,
                Gauge::new(
                    "elb_exporter_ces_publication_lag_seconds",
                    "Estimated time from a minute's start to Cloud Eye publishing its datapoint (0.8 quantile of the last 20 minutes, learnt from the collected answers).",
                )
                .expect("valid metric"),
            ),
            exposure_delay: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "elb_exporter_exposure_delay_seconds",
                        "Delay the exporter added to each newly collected minute: from its expected publication (minute + estimated lag) to its exposure on /metrics.",
                    )
                    .buckets(vec![0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0]),
                )
                .expect("valid metric"),
            ),
            planned_calls: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "elb_exporter_planned_cloud_calls_per_minute",
                        "Cloud calls per minute the current targets need at the configured intervals.",
                    ),
                    &["api"],
                )
                .expect("valid metric"),
            ),
            inventory_calls: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "elb_exporter_inventory_calls",
                        "Listing calls (pages) the inventory made in the last listener_refresh period, by cloud call and ELB API version.",
                    ),
                    &["api", "version"],
                )
                .expect("valid metric"),
            ),
            discovery_problems: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "elb_exporter_discovery_problems",
                        "Annotated Services or ports that cannot be exported right now, by reason.",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            skipped: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_skipped_items_total",
                        "Parts of cloud responses skipped as unusable, by reason.",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            collections: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_collections_total",
                        "Collection cycles, by result.",
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            watch_restarts: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_kubernetes_watch_errors_total",
                        "Errors of the Kubernetes Service watch (each followed by a backed-off retry).",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            task_failures: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_task_failures_total",
                        "Pipeline tasks that ended or panicked while the exporter served; any makes /healthz fail.",
                    ),
                    &["task"],
                )
                .expect("valid metric"),
            ),
            effective_interval: reg(
                &registry,
                Gauge::new(
                    "elb_exporter_collection_effective_interval_seconds",
                    "Start-to-start period of full collection cycles: collection.interval, stretched when the planned CES calls exceed the rate limit.",
                )
                .expect("valid metric"),
            ),
            ces_batch_size: reg(
                &registry,
                IntGauge::new(
                    "elb_exporter_ces_batch_size",
                    "Metrics per CES batch call: global.scrape_batch_size, or 10 once CES refused a larger batch and accepted 10.",
                )
                .expect("valid metric"),
            ),
            leader: reg(
                &registry,
                IntGauge::new(
                    "elb_exporter_leader",
                    "1 while this replica collects from Cloud Eye and exports cloud series (leader of the Lease, or leader_election off), else 0.",
                )
                .expect("valid metric"),
            ),
            http_dropped: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "elb_exporter_http_connections_dropped_total",
                        "Connections to /metrics closed by the exporter, by reason (timeouts, limit, TLS).",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            info,
            registry,
        };
        // Pre-create the per-API series so dashboards see zeros rather than gaps.
        for api in Api::ALL {
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
