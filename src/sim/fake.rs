//! An in-memory [`CloudApi`] for unit tests of the pipeline: no HTTP, no signing, answers and faults
//! scripted per call, and every call recorded. Works under tokio's paused clock (delays are tokio
//! sleeps), so deadlines and schedules are tested in milliseconds of real time.

use crate::cloud::Operation;
use crate::cloud::{
    BatchQuery, BatchResult, CloudApi, CloudError, Datapoint, ElbVersion, ErrorBody, Lane,
    LbListing, Listener, Listing, LoadBalancer, MetricQuery, Pool,
};
use crate::sim::publication::Publication;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// What the next CES call does instead of answering at once.
#[derive(Debug, Clone)]
pub enum Script {
    /// Answer after this long.
    Delay(Duration),
    /// Fail with this HTTP status (after no delay).
    Fail(u16),
}

/// One recorded CES call.
#[derive(Debug, Clone)]
pub struct FakeCall {
    /// (listener id, metric name) of each metric asked, in order.
    pub series: Vec<(String, String)>,
    pub at: tokio::time::Instant,
    /// The end of the asked window (Unix ms): when the caller asked, by its clock.
    pub to_ms: i64,
    pub lane: Lane,
}

/// One recorded ELB listing: of listeners (`ElbListListeners`) or of load balancers, for names
/// (`ElbListLoadbalancers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeListing {
    pub op: Operation,
    pub version: ElbVersion,
    /// The load balancer ids asked for; `None` for a project-wide listing.
    pub ids: Option<Vec<String>>,
    pub lane: Lane,
    pub at: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    listeners: HashMap<(ElbVersion, String), Vec<Listener>>,
    /// Load balancer names by (API, id), for the load balancer listings.
    lb_names: HashMap<(ElbVersion, String), String>,
    /// What the next listener listings do (`Delay`, `Fail`); later ones answer at once.
    listing_scripts: VecDeque<Script>,
    elb_listings: Vec<FakeListing>,
    /// Value of (listener id, metric); a pair not set has no datapoint in the window.
    values: HashMap<(String, String), f64>,
    scripts: VecDeque<Script>,
    calls: Vec<FakeCall>,
    /// (load balancer, lane) of each pool listing; every load balancer has no pool.
    pool_listings: Vec<(String, Lane)>,
    /// When set, the newest datapoint is the newest minute published at the asked time.
    publication: Option<Publication>,
    /// A listener whose minutes are published on a model of their own (some series later than others).
    listener_publication: HashMap<String, Publication>,
    /// Added to the timestamps of a listener's datapoints (a clock-skewed or corrupt answer).
    shifted: HashMap<String, i64>,
    /// Added to every CES answer.
    latency: Duration,
    /// Answer each datapoint's minute number (Unix minutes) instead of the set value.
    stamp: bool,
}

/// The fake cloud. `Default` knows no load balancer and answers every metric with no datapoint.
#[derive(Default)]
pub struct FakeCloud {
    state: Mutex<State>,
}

impl FakeCloud {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_listener(&self, version: ElbVersion, elb: &str, l: Listener) {
        self.state()
            .listeners
            .entry((version, elb.to_string()))
            .or_default()
            .push(l);
    }

    /// `elb`'s listeners on `version` are `ls` from now on (none: the API does not know it).
    pub fn set_listeners(&self, version: ElbVersion, elb: &str, ls: Vec<Listener>) {
        let mut st = self.state();
        if ls.is_empty() {
            st.listeners.remove(&(version, elb.to_string()));
        } else {
            st.listeners.insert((version, elb.to_string()), ls);
        }
    }

    /// The load balancer listings of `version` know `elb` by `name`.
    pub fn add_loadbalancer(&self, version: ElbVersion, elb: &str, name: &str) {
        self.state()
            .lb_names
            .insert((version, elb.to_string()), name.to_string());
    }

    /// The next listener listings (filtered or project-wide) follow `scripts` in order.
    pub fn script_listings(&self, scripts: impl IntoIterator<Item = Script>) {
        self.state().listing_scripts.extend(scripts);
    }

    /// Every ELB listing so far (listeners and load balancers), in the order they were asked.
    pub fn elb_listings(&self) -> Vec<FakeListing> {
        self.state().elb_listings.clone()
    }

    /// The listener listings so far.
    pub fn listener_listings(&self) -> Vec<FakeListing> {
        let st = self.state();
        st.elb_listings
            .iter()
            .filter(|l| l.op == Operation::ElbListListeners)
            .cloned()
            .collect()
    }

    /// Every metric of `listener` answers `value` from now on.
    pub fn set_value(&self, listener: &str, metric: &str, value: f64) {
        self.state()
            .values
            .insert((listener.to_string(), metric.to_string()), value);
    }

    /// The next CES calls follow `scripts` in order; later calls answer at once.
    pub fn script(&self, scripts: impl IntoIterator<Item = Script>) {
        self.state().scripts.extend(scripts);
    }

    /// Datapoints follow Cloud Eye's publication lag from now on (by default the asked minute is there).
    pub fn set_publication(&self, p: Publication) {
        self.state().publication = Some(p);
    }

    /// `listener`'s datapoints follow `p` instead of the cloud-wide model from now on.
    pub fn set_listener_publication(&self, listener: &str, p: Publication) {
        self.state()
            .listener_publication
            .insert(listener.to_string(), p);
    }

    /// `listener`'s datapoints are stamped `ms` later than their minute from now on.
    pub fn shift_stamps(&self, listener: &str, ms: i64) {
        self.state().shifted.insert(listener.to_string(), ms);
    }

    /// Every CES call answers after `d` (network and service time).
    pub fn set_latency(&self, d: Duration) {
        self.state().latency = d;
    }

    /// A datapoint's value is its minute (Unix ms / 60,000), so a reader of `/metrics` sees which
    /// minute each series shows; series still need a value set to have data.
    pub fn stamp_values(&self) {
        self.state().stamp = true;
    }

    pub fn calls(&self) -> Vec<FakeCall> {
        self.state().calls.clone()
    }

    pub fn pool_listings(&self) -> Vec<(String, Lane)> {
        self.state().pool_listings.clone()
    }

    pub fn listings(&self) -> usize {
        self.listener_listings().len()
    }

    /// Records a listener listing and takes its script.
    fn listener_listing(
        &self,
        version: ElbVersion,
        ids: Option<Vec<String>>,
        lane: Lane,
    ) -> Option<Script> {
        let mut st = self.state();
        st.elb_listings.push(FakeListing {
            op: Operation::ElbListListeners,
            version,
            ids,
            lane,
            at: tokio::time::Instant::now(),
        });
        st.listing_scripts.pop_front()
    }
}

/// Plays a listing's script: waits, or fails as the ELB API would.
async fn play(script: Option<Script>) -> Result<(), CloudError> {
    match script {
        Some(Script::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Some(Script::Fail(status)) => Err(failure(Operation::ElbListListeners, status)),
        None => Ok(()),
    }
}

/// The listener (or pool: values are kept by the series' own id) a metric asks about.
fn listener_of(m: &MetricQuery) -> &str {
    m.dimensions
        .iter()
        .find(|(k, _)| k == "lbaas_listener_id" || k == "lbaas_pool_id")
        .map_or("", |(_, v)| v.as_str())
}

fn failure(op: Operation, status: u16) -> CloudError {
    CloudError::from_status(
        op,
        ErrorBody {
            status,
            code: None,
            message: "scripted".into(),
            request_id: None,
        },
        None,
    )
}

/// A complete listing in one call of the listeners of each `(load balancer, listeners)`.
fn one_page<'a>(found: impl Iterator<Item = (String, &'a Vec<Listener>)>) -> Listing {
    let mut out = Listing {
        calls: 1,
        complete: true,
        ..Listing::default()
    };
    for (id, l) in found {
        out.seen += l.len();
        out.by_lb.insert(id, l.clone());
    }
    out
}

#[async_trait::async_trait]
impl CloudApi for FakeCloud {
    async fn project_id(&self) -> Result<String, CloudError> {
        Ok("fake-project".into())
    }

    async fn list_listeners_of(
        &self,
        version: ElbVersion,
        loadbalancer_ids: &[&str],
        lane: Lane,
    ) -> Result<Listing, CloudError> {
        let ids = loadbalancer_ids.iter().map(|id| id.to_string()).collect();
        play(self.listener_listing(version, Some(ids), lane)).await?;
        let st = self.state();
        Ok(one_page(loadbalancer_ids.iter().filter_map(|id| {
            let l = st.listeners.get(&(version, id.to_string()))?;
            Some((id.to_string(), l))
        })))
    }

    /// One page holds the whole project.
    async fn list_all_listeners(
        &self,
        version: ElbVersion,
        lane: Lane,
        _max_pages: u32,
        _page_gap: Duration,
    ) -> Result<Listing, CloudError> {
        play(self.listener_listing(version, None, lane)).await?;
        let st = self.state();
        Ok(one_page(
            st.listeners
                .iter()
                .filter(|((v, _), _)| *v == version)
                .map(|((_, id), l)| (id.clone(), l)),
        ))
    }

    async fn list_pools(
        &self,
        _version: ElbVersion,
        loadbalancer_id: &str,
        lane: Lane,
    ) -> Result<Vec<Pool>, CloudError> {
        self.state()
            .pool_listings
            .push((loadbalancer_id.to_string(), lane));
        Ok(Vec::new())
    }

    /// One page holds every asked (or, project-wide, every) load balancer.
    async fn list_loadbalancers(
        &self,
        version: ElbVersion,
        ids: Option<&[&str]>,
        lane: Lane,
        _max_pages: u32,
    ) -> Result<LbListing, CloudError> {
        let mut st = self.state();
        st.elb_listings.push(FakeListing {
            op: Operation::ElbListLoadbalancers,
            version,
            ids: ids.map(|ids| ids.iter().map(|id| id.to_string()).collect()),
            lane,
            at: tokio::time::Instant::now(),
        });
        let lbs = st
            .lb_names
            .iter()
            .filter(|((v, id), _)| {
                *v == version && ids.is_none_or(|ids| ids.contains(&id.as_str()))
            })
            .map(|((_, id), name)| LoadBalancer {
                id: id.clone(),
                name: name.clone(),
                vip_address: String::new(),
                guaranteed: Some(version == ElbVersion::V3),
            })
            .collect();
        Ok(LbListing {
            lbs,
            complete: true,
            calls: 1,
        })
    }

    async fn batch_query(&self, query: &BatchQuery) -> Result<BatchResult, CloudError> {
        let script = {
            let mut st = self.state();
            st.calls.push(FakeCall {
                series: query
                    .metrics
                    .iter()
                    .map(|m| (listener_of(m).to_string(), m.metric_name.clone()))
                    .collect(),
                at: tokio::time::Instant::now(),
                to_ms: query.to_ms,
                lane: query.lane,
            });
            (st.scripts.pop_front(), st.latency)
        };
        let (script, latency) = script;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match script {
            Some(Script::Delay(d)) => tokio::time::sleep(d).await,
            Some(Script::Fail(status)) => return Err(failure(Operation::CesBatchQuery, status)),
            None => {}
        }
        let st = self.state();
        let newest_of = |listener: &str| {
            let minute = match st
                .listener_publication
                .get(listener)
                .or(st.publication.as_ref())
            {
                Some(p) => p.newest(query.to_ms),
                None => query.to_ms - query.to_ms % 60_000,
            };
            (
                minute,
                minute + st.shifted.get(listener).copied().unwrap_or(0),
            )
        };
        let newest = query
            .metrics
            .iter()
            .map(|m| {
                let (minute, stamp) = newest_of(listener_of(m));
                st.values
                    .get(&(listener_of(m).to_string(), m.metric_name.clone()))
                    .map(|v| Datapoint {
                        timestamp_ms: stamp,
                        value: if st.stamp {
                            (minute / 60_000) as f64
                        } else {
                            *v
                        },
                    })
            })
            .collect();
        Ok(BatchResult {
            newest,
            skipped: Vec::new(),
        })
    }
}
