//! The cloud API operations the exporter calls: the `api` label of its own metrics, the rate limiter
//! each one draws from, the permission a 403 of each lacks.

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
