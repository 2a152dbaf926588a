//! ELB names for `elb_exporter_listener_info` and `elb_exporter_pool_info` (`elb_name`).
//!
//! Listener listings do not carry the load balancer's name, so names come from the load balancer
//! listings (`GET /v2|v3/{project_id}/elb/loadbalancers`), planned like listener listings (see
//! [`super::plan::plan`]): one paged project-wide listing per API, or listings filtered by id
//! (v3: 50 ids per call, v2: one) when that takes fewer calls. The ELBs whose listeners were found are
//! named once as soon as no listener lookup of their API is pending (so a cold start or a burst of new
//! Services costs one listing), and every ELB is named again every `listener_refresh` on the
//! background lane. Until a name is known, and after a failed listing for an ELB never named, the name
//! is empty: the info series never waits for it. A failed listing keeps the last known names and is
//! retried with backoff.

use super::plan::{Plan, ProjectSize, plan};
use crate::cloud::{CloudError, ElbVersion, Lane, LbListing};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// First retry delay after a failed load balancer listing; doubles up to the refresh period.
const RETRY_BASE: Duration = Duration::from_secs(15);

/// Which load balancers a name listing asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameQuery {
    /// Every load balancer of the project on the API, at most `budget` pages.
    ProjectWide {
        /// Most pages to read while the project's size is unknown.
        budget: u32,
    },
    /// These ids (the client chunks them per API).
    Ids(Vec<Arc<str>>),
}

/// A name listing to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameJob {
    /// The ELB API listed (v2 shared, v3 dedicated).
    pub version: ElbVersion,
    /// Priority for new ELBs, background for periodic re-listings.
    pub lane: Lane,
    /// Which load balancers to ask for.
    pub query: NameQuery,
    /// The ELBs the listing names (found or not).
    pub covered: Vec<Arc<str>>,
}

#[derive(Debug)]
struct NameApi {
    /// Load balancers the project has on this API, as the last project-wide listing saw.
    size: ProjectSize,
    in_flight: bool,
    /// When every ELB of this API is named again (`None` before the first listing).
    refresh_at: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
}

/// The names known, and the lookup state per API.
#[derive(Debug)]
pub struct Names {
    names: HashMap<Arc<str>, Arc<str>>,
    /// ELBs a finished listing covered (named or absent from it): not looked up again until the refresh.
    asked: HashSet<Arc<str>>,
    apis: [NameApi; 2],
    refresh: Duration,
}

fn index(v: ElbVersion) -> usize {
    match v {
        ElbVersion::V2 => 0,
        ElbVersion::V3 => 1,
    }
}

impl Names {
    /// Nothing known yet; names are listed again every `refresh`.
    pub fn new(refresh: Duration) -> Self {
        let api = || NameApi {
            size: ProjectSize::Unknown,
            in_flight: false,
            refresh_at: None,
            retry_at: None,
            failures: 0,
        };
        Names {
            names: HashMap::new(),
            asked: HashSet::new(),
            apis: [api(), api()],
            refresh,
        }
    }

    /// The ELB's name; empty while unknown.
    pub fn name(&self, id: &str) -> Arc<str> {
        self.names.get(id).cloned().unwrap_or_else(|| "".into())
    }

    /// Calls one refresh of `version`'s names takes for `elbs` ELBs (the inventory's plan gauge).
    pub fn planned_calls(&self, version: ElbVersion, elbs: usize) -> usize {
        plan(version, elbs, self.apis[index(version)].size).calls()
    }

    /// The listing to start now on `version`, whose ELBs with listeners are `elbs`; `busy` while a
    /// listener lookup of that API is pending (new names wait for it, so one listing names them all).
    pub fn due(
        &mut self,
        version: ElbVersion,
        elbs: &[Arc<str>],
        busy: bool,
        now: Instant,
    ) -> Option<NameJob> {
        let api = &mut self.apis[index(version)];
        if api.in_flight || elbs.is_empty() || api.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        let (lane, covered) = if api.refresh_at.is_some_and(|t| now >= t) {
            (Lane::Background, elbs.to_vec())
        } else {
            let new: Vec<Arc<str>> = elbs
                .iter()
                .filter(|id| !self.asked.contains(*id))
                .cloned()
                .collect();
            if new.is_empty() || busy {
                return None;
            }
            (Lane::Priority, new)
        };
        api.in_flight = true;
        let (query, covered) = match plan(version, covered.len(), api.size) {
            Plan::ProjectWide { budget, .. } => (
                NameQuery::ProjectWide {
                    budget: u32::try_from(budget).unwrap_or(u32::MAX),
                },
                elbs.to_vec(),
            ),
            _ => (NameQuery::Ids(covered.clone()), covered),
        };
        Some(NameJob {
            version,
            lane,
            query,
            covered,
        })
    }

    /// Records a finished listing; returns whether a name changed.
    pub fn record(
        &mut self,
        job: &NameJob,
        result: Result<LbListing, CloudError>,
        now: Instant,
    ) -> bool {
        let refresh = self.refresh;
        let api = &mut self.apis[index(job.version)];
        api.in_flight = false;
        let listing = match result {
            Ok(l) => l,
            Err(e) => {
                api.failures = api.failures.saturating_add(1);
                let backoff = RETRY_BASE
                    .saturating_mul(1u32 << api.failures.min(10).saturating_sub(1))
                    .min(refresh);
                api.retry_at = Some(now + backoff);
                warn!(api = job.version.as_str(), error = %e, retry_in_ms = backoff.as_millis() as u64, "load balancer listing failed; ELB names stay as last known (empty when never known)");
                return false;
            }
        };
        api.failures = 0;
        api.retry_at = None;
        if let NameQuery::ProjectWide { .. } = job.query {
            if !listing.complete {
                // Over budget: the next attempt (at once) is planned as filtered listings.
                api.size = ProjectSize::AtLeast(listing.lbs.len());
                info!(
                    api = job.version.as_str(),
                    loadbalancers_at_least = listing.lbs.len(),
                    "project-wide load balancer listing over budget; listing by id"
                );
                return false;
            }
            api.size = ProjectSize::Exactly(listing.lbs.len());
        }
        if job.lane == Lane::Background || api.refresh_at.is_none() {
            api.refresh_at = Some(now + refresh);
        }
        let found: HashMap<&str, &str> = listing
            .lbs
            .iter()
            .map(|lb| (lb.id.as_str(), lb.name.as_str()))
            .collect();
        let mut changed = false;
        for id in &job.covered {
            self.asked.insert(id.clone());
            // An ELB absent from the answer (deleted, or moved API) loses its name.
            let name = found.get(&**id).copied().unwrap_or("");
            if *self.name(id) != *name {
                changed = true;
                if name.is_empty() {
                    self.names.remove(id);
                } else {
                    self.names.insert(id.clone(), name.into());
                }
            }
        }
        changed
    }

    /// Whether some of `version`'s `elbs` still wait for their first name listing (not after a failed
    /// one): readiness waits for it, so a restart does not export every info series without its name
    /// first.
    pub fn pending(&self, version: ElbVersion, elbs: &[Arc<str>]) -> bool {
        self.apis[index(version)].failures == 0 && elbs.iter().any(|id| !self.asked.contains(id))
    }

    /// Forgets the ELBs no longer referenced.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.names.retain(|id, _| keep(id));
        self.asked.retain(|id| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::LoadBalancer;

    fn ids(n: usize) -> Vec<Arc<str>> {
        (0..n).map(|i| Arc::from(format!("lb-{i}"))).collect()
    }

    fn listing(ids: &[Arc<str>], complete: bool) -> LbListing {
        LbListing {
            lbs: ids
                .iter()
                .map(|id| LoadBalancer {
                    id: id.to_string(),
                    name: format!("name-{id}"),
                    vip_address: String::new(),
                    guaranteed: None,
                })
                .collect(),
            complete,
            calls: 1,
        }
    }

    #[test]
    fn new_elbs_are_named_once_then_at_the_refresh() {
        let now = Instant::now();
        let refresh = Duration::from_secs(300);
        let mut n = Names::new(refresh);
        let elbs = ids(3);
        assert_eq!(
            n.due(ElbVersion::V2, &elbs, true, now),
            None,
            "waits while busy"
        );
        // v2 takes one id per filtered listing: one project-wide page (budget: the 3 filtered calls).
        let job = n.due(ElbVersion::V2, &elbs, false, now).expect("due");
        assert_eq!(job.lane, Lane::Priority);
        assert_eq!(job.query, NameQuery::ProjectWide { budget: 3 });
        assert_eq!(
            n.due(ElbVersion::V2, &elbs, false, now),
            None,
            "one in flight"
        );
        assert!(n.record(&job, Ok(listing(&elbs, true)), now));
        assert_eq!(&*n.name("lb-1"), "name-lb-1");
        assert_eq!(n.due(ElbVersion::V2, &elbs, false, now), None, "all named");
        // A new ELB: the project's size is known, so one filtered call.
        let more = ids(4);
        let job = n.due(ElbVersion::V2, &more, false, now).expect("due");
        assert_eq!(job.query, NameQuery::Ids(vec!["lb-3".into()]));
        assert!(!n.record(&job, Ok(LbListing::default()), now));
        assert_eq!(&*n.name("lb-3"), "", "absent from the answer: empty");
        assert_eq!(n.due(ElbVersion::V2, &more, false, now), None, "asked once");
        let job = n
            .due(ElbVersion::V2, &more, false, now + refresh)
            .expect("refresh");
        assert_eq!((job.lane, job.covered.len()), (Lane::Background, 4));
    }

    #[test]
    fn a_failed_listing_keeps_the_names_and_backs_off() {
        let now = Instant::now();
        let mut n = Names::new(Duration::from_secs(300));
        let elbs = ids(2);
        let job = n.due(ElbVersion::V2, &elbs, false, now).expect("due");
        n.record(&job, Ok(listing(&elbs, true)), now);
        let later = now + Duration::from_secs(300);
        let job = n.due(ElbVersion::V2, &elbs, false, later).expect("refresh");
        let err = CloudError::Malformed(crate::cloud::Operation::ElbListLoadbalancers, "x".into());
        assert!(!n.record(&job, Err(err), later));
        assert_eq!(&*n.name("lb-0"), "name-lb-0");
        assert_eq!(n.due(ElbVersion::V2, &elbs, false, later), None);
        assert!(
            n.due(ElbVersion::V2, &elbs, false, later + RETRY_BASE)
                .is_some()
        );
    }
}
