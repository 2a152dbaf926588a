//! The listing rule: how one API's ELBs are listed (filtered by id, or one project-wide paged
//! listing) and what it costs. A pure core shared by the inventory's listener listings and the
//! ELB name listings.

use crate::cloud::ElbVersion;

/// What the inventory knows of the number of listeners a project has on one API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectSize {
    /// No project-wide listing finished yet.
    Unknown,
    /// From the last complete project-wide listing.
    Exactly(usize),
    /// A project-wide listing stopped at its page budget after this many.
    AtLeast(usize),
}

/// How one API's ELBs are listed, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to list.
    Idle,
    /// Listings filtered by load balancer id: `calls` of them.
    Filtered {
        /// One per ELB id batch ([`ElbVersion::ids_per_listing`]).
        calls: usize,
    },
    /// One paged listing of every listener of the project: `calls` pages expected, abandoned after
    /// `budget` pages (what the filtered listings would cost).
    ProjectWide {
        /// Pages expected from the project's size.
        calls: usize,
        /// Pages after which the listing is abandoned.
        budget: usize,
    },
}

impl Plan {
    /// Listing calls the plan expects.
    pub fn calls(self) -> usize {
        match self {
            Plan::Idle => 0,
            Plan::Filtered { calls } | Plan::ProjectWide { calls, .. } => calls,
        }
    }
}

/// The listing rule: filtered listings cost ceil(ELBs / ids per listing) calls; a project-wide listing
/// floor(listeners / page size) + 1 (paging stops at the first short page). The project-wide listing is
/// chosen only when strictly cheaper; with the size unknown it is tried (its cost is at least one call),
/// bounded by the filtered cost, so the worst case is one wasted round of filtered size.
pub fn plan(version: ElbVersion, elbs: usize, size: ProjectSize) -> Plan {
    if elbs == 0 {
        return Plan::Idle;
    }
    let filtered = elbs.div_ceil(version.ids_per_listing());
    let project_wide = match size {
        ProjectSize::Unknown => 1,
        ProjectSize::Exactly(n) | ProjectSize::AtLeast(n) => n / version.page_size() + 1,
    };
    if project_wide < filtered {
        Plan::ProjectWide {
            calls: project_wide,
            budget: filtered,
        }
    } else {
        Plan::Filtered { calls: filtered }
    }
}
