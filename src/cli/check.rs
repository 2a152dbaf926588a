//! `check`: one pass of discovery, listener resolution and a CES probe, printed as a report.

use super::{CliError, kube_client};
use crate::app;
use crate::cloud::client::HttpCloud;
use crate::cloud::{BatchQuery, CloudApi, Lane, MetricQuery};
use crate::collector::{CyclePlan, NAMESPACE, calls_per_cycle, distinct_listeners, distinct_pools};
use crate::config::{Config, format_duration};
use crate::discovery::inventory::{Inventory, InventorySettings, Targets};
use crate::discovery::pools::PoolStage;
use crate::discovery::{self, DiscoveryEvent, Observed, observe};
use crate::telemetry::Telemetry;
use k8s_openapi::api::core::v1::Service;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Text from the cloud (listener names, error messages) with control characters and bidirectional
/// overrides escaped (`\u{1b}`, `\n`), so it cannot move the cursor, clear or reorder the terminal.
fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// `check`: one pass of discovery, listener resolution and a CES probe; prints what would be collected.
pub async fn check(cfg: Config) -> Result<(), CliError> {
    let mut problems: Vec<String> = Vec::new();
    print_config(&cfg);
    let telemetry = Telemetry::new();
    let cloud = Arc::new(HttpCloud::new(&cfg, telemetry.clone()).map_err(app::AppError::from)?);
    print_project(&cfg, cloud.as_ref()).await?;
    let kube = kube_client().await?;
    if let Err(p) = print_leader(&cfg, &kube).await {
        problems.push(p);
    }
    let targets = resolve_once(&cfg, cloud.clone(), kube, &telemetry).await?;
    print_services(&cfg, &targets, &mut problems);
    print_ingresses(&targets, &mut problems);
    let listeners = distinct_listeners(&targets);
    probe_ces(&cfg, cloud.as_ref(), &listeners, &mut problems).await;
    print_plan(
        &cfg,
        &targets,
        listeners.len(),
        cloud.ces_batch_limit(),
        &mut problems,
    );
    print_problems(problems)
}

/// The config verdict, with the keys that have no effect and the settings that weaken the transport.
fn print_config(cfg: &Config) {
    println!("config: ok");
    for k in &cfg.ignored_keys {
        println!("  note: {k} is a cloudeye-exporter key with no effect here");
    }
    for w in cfg
        .transport_warnings()
        .into_iter()
        .chain(cfg.batch_size_warning())
    {
        println!("  warning: {w}");
    }
}

/// The project, configured or resolved through IAM; a failed lookup ends the check.
async fn print_project<C: CloudApi>(cfg: &Config, cloud: &C) -> Result<(), CliError> {
    match cloud.project_id().await {
        Ok(id) if cfg.auth.project_id.is_empty() => println!(
            "project: {} -> {id} (resolved through IAM at {})",
            cfg.auth.project_name,
            cfg.endpoints.iam.base_url()
        ),
        Ok(id) => println!("project: {id} (configured)"),
        Err(e) => {
            println!("project: FAILED: {e}");
            return Err(CliError::Check(format!("project lookup failed: {e}")));
        }
    }
    Ok(())
}

/// The Service → listener table; a Service's problems and a refused namespace go to `problems`.
fn print_services(cfg: &Config, targets: &Targets, problems: &mut Vec<String>) {
    println!(
        "\n{:<20} {:<24} {:<38} {:<4} {:<38} {:>5} {:<17} NAME",
        "NAMESPACE", "SERVICE", "ELB", "API", "LISTENER", "PORT", "PROTOCOL"
    );
    for r in &targets.reports {
        let elb = r.elb_id.as_deref().unwrap_or("-");
        let api = r.api.map(|v| v.as_str()).unwrap_or("-");
        let mine: Vec<_> = targets
            .listeners
            .iter()
            .filter(|t| {
                t.owner == discovery::Owner::Service
                    && t.namespace == r.namespace
                    && t.service == r.name
            })
            .collect();
        if mine.is_empty() {
            println!(
                "{:<20} {:<24} {:<38} {:<4} {:<38} {:>5} {:<17} -",
                r.namespace, r.name, elb, api, "-", "-", "-"
            );
        }
        for t in mine {
            println!(
                "{:<20} {:<24} {:<38} {:<4} {:<38} {:>5} {:<17} {}",
                t.namespace,
                t.service,
                t.elb_id,
                api,
                escape_controls(&t.listener_id),
                t.port,
                escape_controls(&t.protocol),
                escape_controls(&t.listener_name)
            );
        }
        for p in &r.problems {
            problems.push(format!("{}/{}: {p}", r.namespace, r.name));
        }
    }
    for (scope, message) in &targets.forbidden {
        problems.push(format!(
            "namespace {}: {message}; grant get/list/watch on services (deploy/clusterrole.yaml)",
            discovery::scope_name(scope)
        ));
    }
    if targets.reports.is_empty() {
        println!(
            "(no Service carries the annotation {})",
            cfg.discovery.annotation
        );
    }
}

/// The first batch of a cycle proves the AK may read metrics (ces:metricData:list) and finds out
/// whether this cloud takes batches of that size.
async fn probe_ces<C: CloudApi>(
    cfg: &Config,
    cloud: &C,
    listeners: &[(Arc<str>, Arc<str>)],
    problems: &mut Vec<String>,
) {
    let Some(q) = first_batch(cfg, listeners) else {
        return;
    };
    let (_, listener) = &listeners[0];
    match cloud.batch_query(&q).await {
        Ok(r) => println!(
            "ces: ok ({} metrics in one call; {} for listener {listener}: {})",
            q.metrics.len(),
            cfg.collection.metrics[0],
            r.newest
                .first()
                .copied()
                .flatten()
                .map(|d| d.value.to_string())
                .unwrap_or_else(|| "no datapoint in the window".into())
        ),
        Err(e) => problems.push(format!("CES probe failed: {e}")),
    }
}

/// The CES calls a cycle needs at the batch size this cloud takes (`ces_limit`: what the probe found);
/// a plan over the rate limit is a problem.
fn print_plan(
    cfg: &Config,
    targets: &Targets,
    listeners: usize,
    ces_limit: Option<usize>,
    problems: &mut Vec<String>,
) {
    let batch = match ces_limit {
        Some(limit) if limit < cfg.effective_batch_size() => {
            println!(
                "ces: batch size {limit}: CES refused a larger batch and accepted {limit} metrics per call (the limit of Open Telekom Cloud and some Huawei regions)"
            );
            limit
        }
        _ => cfg.effective_batch_size(),
    };
    let pools = distinct_pools(targets);
    let metrics = cfg.collection.metrics.len();
    let pool_metrics = cfg.collection.pool_metrics.len();
    // Listener and pool series are packed into the same batches.
    let series = listeners * metrics + pools.len() * pool_metrics;
    let calls = calls_per_cycle(series, 1, batch);
    let per_min = calls as f64 * 60.0 / cfg.collection.interval.as_secs_f64();
    // Pools only when there are some: the line stays as it was for Service-only clusters.
    let pool_part = if pools.is_empty() {
        String::new()
    } else {
        format!(" + {} pools x {pool_metrics} pool metrics", pools.len())
    };
    println!(
        "\nplan: {} listeners x {} metrics{pool_part} = {} series -> {} CES batch call(s) per {} interval (batch size {}), {:.1} calls/minute (limit {}/minute); {} ELB(s) re-listed every {}",
        listeners,
        metrics,
        series,
        calls,
        format_duration(cfg.collection.interval),
        batch,
        per_min,
        cfg.cloud.rate_limit.ces_per_minute,
        targets.elbs,
        format_duration(cfg.discovery.listener_refresh),
    );
    let plan = CyclePlan::new(
        calls,
        cfg.collection.interval,
        cfg.cloud.rate_limit.ces_per_minute,
    );
    if plan.over_budget {
        problems.push(format!(
            "{per_min:.0} CES calls/minute exceed cloud.rate_limit.ces_per_minute ({}): cycles will be paced to one every {} instead of {}; collect fewer metrics or raise collection.interval",
            cfg.cloud.rate_limit.ces_per_minute,
            format_duration(plan.period),
            format_duration(cfg.collection.interval),
        ));
    }
}

/// `check: ok`, or the problems found and an error that makes the exit code non-zero.
fn print_problems(problems: Vec<String>) -> Result<(), CliError> {
    if problems.is_empty() {
        println!("\ncheck: ok");
        Ok(())
    } else {
        println!("\nproblems:");
        for p in &problems {
            // Problems quote cloud answers (error messages).
            println!("  - {}", escape_controls(p));
        }
        Err(CliError::Check(format!(
            "{} problem(s) found",
            problems.len()
        )))
    }
}

/// The first CES batch a cycle would send for `listeners` (None without listeners).
fn first_batch(cfg: &Config, listeners: &[(Arc<str>, Arc<str>)]) -> Option<BatchQuery> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let metrics: Vec<MetricQuery> = listeners
        .iter()
        .flat_map(|(elb, listener)| {
            cfg.collection.metrics.iter().map(move |m| MetricQuery {
                namespace: NAMESPACE.into(),
                metric_name: m.clone(),
                dimensions: vec![
                    ("lbaas_instance_id".into(), elb.to_string()),
                    ("lbaas_listener_id".into(), listener.to_string()),
                ],
            })
        })
        .take(cfg.effective_batch_size())
        .collect();
    (!metrics.is_empty()).then(|| BatchQuery {
        metrics,
        from_ms: now - cfg.collection.lookback.as_millis() as i64,
        to_ms: now,
        period: "1",
        filter: cfg.collection.filter,
        lane: Lane::Priority,
    })
}

/// `check`: who holds the Lease, read from the apiserver, or that election is off.
async fn print_leader(cfg: &Config, kube: &kube::Client) -> Result<(), String> {
    let Some(le) = &cfg.leader_election else {
        println!("leader election: off (this process collects on its own)");
        return Ok(());
    };
    let api = kube::Api::namespaced(kube.clone(), &le.lease_namespace);
    let lease = format!("lease {}/{}", le.lease_namespace, le.lease_name);
    match crate::leader::describe(&api, &le.lease_name).await {
        Ok(Some(r)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64;
            let age = r.renew_ms.map_or_else(
                || "never".into(),
                |ms| format!("{:.1}s ago", (now - ms) as f64 / 1000.0),
            );
            let warm = r.peer_url.as_deref().map_or_else(
                || "no warm-copy address (set POD_IP: a takeover serves nothing until its first cycle)".into(),
                |url| format!("warm copy for followers at {url}"),
            );
            match r.holder {
                Some(h) => println!(
                    "leader: {h} ({lease}, renewed {age}, lease {}s, {} transition(s)); {warm}; this process would be {}",
                    r.lease_duration_s, r.transitions, le.identity
                ),
                None => println!(
                    "leader: none ({lease} released {age}); the next replica to try takes it"
                ),
            }
            Ok(())
        }
        Ok(None) => {
            println!("leader: none yet ({lease} does not exist; the first replica creates it)");
            Ok(())
        }
        Err(e) => {
            println!("leader: UNKNOWN ({lease}: {e})");
            Err(format!(
                "{lease}: {e}; grant get/create/update on leases in {} (deploy/role.yaml)",
                le.lease_namespace
            ))
        }
    }
}

/// The Ingress → listener table of `check`; a shared listener is a note, anything else a problem.
fn print_ingresses(targets: &Targets, problems: &mut Vec<String>) {
    if targets.ingresses == 0 && targets.ingress_problems.is_empty() {
        return;
    }
    println!(
        "\n{:<20} {:<24} {:<38} {:<38} {:>5} {:<17} NAME",
        "NAMESPACE", "INGRESS", "ELB", "LISTENER", "PORT", "PROTOCOL"
    );
    for t in targets
        .listeners
        .iter()
        .filter(|t| t.owner == discovery::Owner::Ingress)
    {
        println!(
            "{:<20} {:<24} {:<38} {:<38} {:>5} {:<17} {}",
            t.namespace, t.service, t.elb_id, t.listener_id, t.port, t.protocol, t.listener_name
        );
    }
    if !targets.pools.is_empty() {
        println!(
            "\n{:<20} {:<24} {:<24} {:<38} {:>5} POOL NAME",
            "NAMESPACE", "INGRESS", "BACKEND SERVICE", "POOL", "PORT"
        );
    }
    for p in &targets.pools {
        println!(
            "{:<20} {:<24} {:<24} {:<38} {:>5} {}",
            p.namespace, p.ingress, p.service, p.pool_id, p.port, p.pool_name
        );
    }
    for (problem, text) in &targets.ingress_problems {
        match problem {
            discovery::Problem::SharedListener => {
                println!("  note: {} (its traffic is in the pool series)", text)
            }
            _ => problems.push(text.clone()),
        }
    }
}

/// Lists CCE Ingresses once per scope into the inventory (before the Services, so their ELBs are
/// looked up before the inventory reports itself synced).
async fn list_ingresses_once<C: CloudApi>(
    kube: &kube::Client,
    binder: &mut discovery::ingress::Binder<C>,
    scopes: &[discovery::Scope],
    tx: &mpsc::Sender<DiscoveryEvent>,
) -> Result<(), CliError> {
    use discovery::ingress::{IngressEvent, ObservedIngress};
    for scope in scopes {
        let api: kube::Api<k8s_openapi::api::networking::v1::Ingress> = match scope {
            None => kube::Api::all(kube.clone()),
            Some(ns) => kube::Api::namespaced(kube.clone(), ns),
        };
        let ev = match api.list(&kube::api::ListParams::default()).await {
            Ok(list) => IngressEvent::Resync {
                scope: scope.clone(),
                observed: list
                    .items
                    .iter()
                    .map(discovery::ingress::observe)
                    .filter(|o| !matches!(o, ObservedIngress::Ignored(_)))
                    .collect(),
            },
            Err(kube::Error::Api(s)) if s.code == 403 => IngressEvent::Forbidden {
                scope: scope.clone(),
                message: s.message.clone(),
            },
            Err(e) => return Err(CliError::Kube(format!("listing ingresses: {e}"))),
        };
        let ev = binder.bind(ev).await;
        let _ = tx.send(DiscoveryEvent::Ingress(ev)).await;
    }
    Ok(())
}

/// Lists the Services once and resolves their ELBs through the same inventory the exporter runs.
async fn resolve_once<C: CloudApi>(
    cfg: &Config,
    cloud: Arc<C>,
    kube: kube::Client,
    telemetry: &Telemetry,
) -> Result<Arc<Targets>, CliError> {
    let scopes = discovery::scopes(&cfg.discovery.namespaces);
    let (tx, rx) = mpsc::channel(scopes.len() + 1);
    let (inventory, mut targets) = Inventory::new(
        cloud.clone(),
        InventorySettings {
            listener_refresh: cfg.discovery.listener_refresh,
            scopes: scopes.len(),
            ingress_scopes: if cfg.discovery.ingresses {
                scopes.len()
            } else {
                0
            },
        },
        telemetry.clone(),
    );
    let task = tokio::spawn(inventory.run(rx));
    if cfg.discovery.ingresses {
        let mut binder = discovery::ingress::Binder::new(cloud.clone());
        list_ingresses_once(&kube, &mut binder, &scopes, &tx).await?;
    }
    for scope in scopes {
        let api: kube::Api<Service> = match &scope {
            None => kube::Api::all(kube.clone()),
            Some(ns) => kube::Api::namespaced(kube.clone(), ns),
        };
        let list = match api.list(&kube::api::ListParams::default()).await {
            Ok(l) => l,
            // One refused namespace is a problem to report, not a reason to check nothing else.
            Err(e) if discovery::is_forbidden(&e) => {
                let message = match &e {
                    kube::Error::Api(s) => s.message.clone(),
                    other => other.to_string(),
                };
                let _ = tx.send(DiscoveryEvent::Forbidden { scope, message }).await;
                continue;
            }
            Err(e) => return Err(CliError::Kube(format!("listing services: {e}"))),
        };
        let observed: Vec<Observed> = list
            .items
            .iter()
            .map(|s| observe(s, &cfg.discovery.annotation))
            .filter(Observed::worth_keeping)
            .collect();
        let _ = tx.send(DiscoveryEvent::Resync { scope, observed }).await;
    }
    let wait = async {
        loop {
            if targets.borrow_and_update().synced {
                return targets.borrow().clone();
            }
            if targets.changed().await.is_err() {
                return targets.borrow().clone();
            }
        }
    };
    let limit = cfg.cloud.request_timeout * cfg.cloud.retry.max_attempts + Duration::from_secs(30);
    let result = tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| CliError::Check("listener lookups did not finish in time".into()));
    drop(tx);
    task.abort();
    let listed = result?;
    // Pools behind Ingress listeners: one listing per Ingress ELB.
    let (mut stage, out) = PoolStage::new(cloud, cfg.discovery.listener_refresh);
    tokio::time::timeout(limit, stage.update(&listed))
        .await
        .map_err(|_| CliError::Check("pool lookups did not finish in time".into()))?;
    let resolved = out.borrow().clone();
    Ok(resolved)
}
