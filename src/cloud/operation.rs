//! The cloud API operations the exporter calls: the `api` label of its own metrics, the rate limiter
//! each one draws from, the permission a 403 of each lacks. A leaf (it imports nothing), so that
//! `telemetry`, which every stage writes into, names them without depending on the cloud client.

/// Which cloud API a request went to; the `api` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `GET /v3/projects?name=<region>`: the project id of the region.
    IamListProjects,
    /// `GET /v3/auth/projects`: the fallback when the user may not list projects by name.
    IamListAuthProjects,
    /// Listeners, v2 (shared) or v3 (dedicated).
    ElbListListeners,
    /// The CES batch metric query.
    CesBatchQuery,
    /// Backend server groups of Ingress ELBs.
    ElbListPools,
    /// Forwarding policies of Ingress listeners.
    ElbListL7policies,
    /// Load balancers, to bind Ingresses named by VIP address or CCE's auto-created ELB name.
    ElbListLoadbalancers,
}

impl Operation {
    /// Every operation, for pre-created series.
    pub const ALL: [Operation; 7] = [
        Operation::IamListProjects,
        Operation::IamListAuthProjects,
        Operation::ElbListListeners,
        Operation::CesBatchQuery,
        Operation::ElbListPools,
        Operation::ElbListL7policies,
        Operation::ElbListLoadbalancers,
    ];

    /// The `api` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::IamListProjects => "iam_list_projects",
            Operation::IamListAuthProjects => "iam_list_auth_projects",
            Operation::ElbListListeners => "elb_list_listeners",
            Operation::CesBatchQuery => "ces_batch_query",
            Operation::ElbListPools => "elb_list_pools",
            Operation::ElbListL7policies => "elb_list_l7policies",
            Operation::ElbListLoadbalancers => "elb_list_loadbalancers",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
