#!/usr/bin/env python3
"""Offline consistency checks for deploy/ and the Dockerfile (run by scripts/validate-deploy.sh).

kubernetes-validate checks each Kubernetes-native object against the API schema. This script checks what a
schema cannot: the files that are not native objects (the ServiceMonitor custom resource, the Prometheus
scrape-config list, the prometheus-adapter rules inside their ConfigMap, kustomization.yaml), and that the
pieces fit together (names, labels, ports, paths, the metric name an HPA asks for, the container image).

Modes:
  check_deploy.py [--root DIR]                 run every check; exit 1 listing every failure
  check_deploy.py [--root DIR] --list-native   print the deploy/ files that hold only Kubernetes-native objects
  check_deploy.py [--root DIR] --kustomized F  check `kubectl kustomize deploy/` output saved in F
  check_deploy.py [--root DIR] --kustomized-overlay F   the same for `kubectl kustomize overlays/example`
  check_deploy.py --split-native IN OUT        write the Kubernetes-native objects of IN to OUT (for schema checks)
"""

import argparse
import importlib.util
import json
import os
import re
import sys

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("check_deploy.py: PyYAML is missing (scripts/validate-deploy.sh installs it into .venv)")

# --- the contract (../shared/PRODUCT.md) ------------------------------------------------------------------------

# Default CES metric set; each becomes <prefix>_sys_elb_listener_<metric>.
EXPORTED_CES_METRICS = [
    "m1_cps", "m1e_server_rps", "m1f_lvs_rps", "m21_client_rps", "m22_in_bandwidth", "m23_out_bandwidth",
    "m2_act_conn", "m3_inact_conn", "m4_ncps", "m5_in_pps", "m6_out_pps", "m7_in_Bps", "m8_out_Bps",
]
PREFIX = "huaweicloud"
# Labels on every ELB series; a target label of the same name would rename them to exported_<name>.
EXPORTED_LABELS = {"namespace", "service", "lbaas_instance_id", "lbaas_listener_id", "listener_name",
                   "port", "protocol"}
CONFIG_PATH = "/etc/elb-exporter/clouds.yml"
METRICS_PORT = 8087
NONROOT_UID = 65532
KNOWN_GLOBAL_KEYS = {"port", "metric_path", "prefix", "scrape_batch_size"}
KNOWN_LEADER_KEYS = {"enabled", "lease_name", "lease_namespace", "identity", "lease_duration", "renew_deadline",
                     "retry_period"}
KNOWN_AUTH_KEYS = {"auth_url", "region", "project_name", "project_id", "access_key", "secret_key",
                   "security_token"}
EXAMPLE_HPA_SERIES = "huaweicloud_sys_elb_listener_m7_in_Bps"
ADAPTER_SNIPPET = "adapter/elb-exporter-rules.yaml"
MERGE_SCRIPT = "adapter/merge-adapter-rules.py"
RULE_FILE = "prometheus/elb-exporter.rules.yml"
RULE_TESTS = "prometheus/elb-exporter.rules.test.yml"
DASHBOARD = "grafana/elb-exporter.json"
OVERLAY = "overlays/example"
# The label that identifies one series of a family (the adapter's inner max keeps it).
IDENTITY_LABEL = {"listener": "lbaas_listener_id", "pool": "lbaas_pool_id"}
REQUIRED_ALERTS = {"ElbExporterAbsent", "ElbExporterCollectionFailing", "ElbExporterDataTooOld", "ElbExporterCesThrottled",
                   "ElbExporterCredentialsRejected", "ElbExporterCesBudgetExceeded", "ElbExporterDiscoveryProblems",
                   "ElbExporterServiceSeriesVanished", "ElbExporterNoLeader", "ElbExporterSeveralLeaders",
                   "ElbExporterFollowerNotWarm"}

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
NATIVE_GROUP = re.compile(r"^(v1|[a-z0-9-]+/v[0-9a-z]+|[a-z0-9.-]+\.k8s\.io/v[0-9a-z]+)$")


class Checker:
    def __init__(self, root):
        self.root = root
        self.deploy = os.path.join(root, "deploy")
        self.errors = []
        self.passed = 0
        self.files = {}  # relative name -> list of documents

    # -- helpers ---------------------------------------------------------------------------------------------
    def check(self, cond, where, msg):
        if cond:
            self.passed += 1
        else:
            self.errors.append(f"{where}: {msg}")
        return bool(cond)

    def load(self, name):
        if name in self.files:
            return self.files[name]
        path = os.path.join(self.deploy, name)
        try:
            with open(path, encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except FileNotFoundError:
            self.errors.append(f"deploy/{name}: file is missing")
            docs = None
        except yaml.YAMLError as e:
            self.errors.append(f"deploy/{name}: not valid YAML: {e}")
            docs = None
        self.files[name] = docs
        return docs

    def obj(self, name, kind, obj_name=None):
        """The single object of `kind` (and name) in deploy/<name>, or None with an error recorded."""
        docs = self.load(name) or []
        found = [d for d in docs if isinstance(d, dict) and d.get("kind") == kind
                 and (obj_name is None or (d.get("metadata") or {}).get("name") == obj_name)]
        what = kind + (f" {obj_name}" if obj_name else "")
        if not self.check(len(found) == 1, f"deploy/{name}", f"expected exactly one {what}, found {len(found)}"):
            return None
        return found[0]

    # -- classification --------------------------------------------------------------------------------------
    def yaml_files(self):
        return sorted(n for n in os.listdir(self.deploy) if n.endswith((".yaml", ".yml")))

    def classify(self, name):
        docs = self.load(name)
        if not docs:
            return "invalid"
        if name in ("kustomization.yaml", "kustomization.yml"):
            return "kustomization"
        if len(docs) == 1 and isinstance(docs[0], list):
            if docs[0] and all(isinstance(j, dict) and "job_name" in j for j in docs[0]):
                return "scrape-config"
            return "invalid"
        if all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
            if all(NATIVE_GROUP.match(str(d["apiVersion"])) for d in docs):
                return "native"
            return "custom"
        return "invalid"

    # -- checks ----------------------------------------------------------------------------------------------
    def run_all(self):
        if not self.check(os.path.isdir(self.deploy), "deploy/", "directory is missing"):
            return
        kinds = {}
        for name in self.yaml_files():
            kinds[name] = self.classify(name)
            self.check(kinds[name] != "invalid", f"deploy/{name}",
                       "neither Kubernetes objects, a Prometheus scrape-config list nor kustomization.yaml")
        self.kinds = kinds
        self.check_kustomization()
        sa = self.check_rbac()
        secret = self.check_secrets()
        dep, container = self.check_deployment(sa, secret)
        self.check_leader_election(sa, dep)
        svc = self.check_service(dep, container)
        self.check_servicemonitor(svc)
        self.check_scrape_config(svc)
        rule_names = self.check_adapter_rules()
        self.check_merge_script()
        self.check_examples(rule_names)
        self.check_alert_rules()
        self.check_dashboard()
        self.check_dockerfile(container)
        self.check_license()
        self.check_overlay_config()

    def check_kustomization(self):
        k = self.obj("kustomization.yaml", "Kustomization")
        if not k:
            return
        w = "deploy/kustomization.yaml"
        self.check(k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", w, "apiVersion is not kustomize.config.k8s.io/v1beta1")
        ns = k.get("namespace")
        self.check(isinstance(ns, str) and ns, w, "no `namespace`")
        res = k.get("resources") or []
        self.check(res, w, "no `resources`")
        for r in res:
            where = f"{w}: resource {r!r}"
            if not self.check(isinstance(r, str) and os.path.isfile(os.path.join(self.deploy, r)), where,
                              "does not exist (kustomize would fail)"):
                continue
            kind = self.kinds.get(r)
            self.check(kind in ("native", "custom"), where,
                       f"is not a file of Kubernetes objects (it is {kind}); only the exporter's own objects belong here")
            self.check(not r.startswith(("adapter", "prometheus/", "grafana")), where,
                       "adapter rules, plain rule files and dashboards are not Kubernetes objects to apply")
            self.check(".example." not in r, where,
                       "example Secrets must not be applied by -k: they would overwrite the real Secret with placeholders")
            for d in self.load(r) or []:
                md = d.get("metadata") or {}
                if d.get("kind") not in CLUSTER_SCOPED:
                    self.check(md.get("namespace") in (None, ns), where,
                               f"{d.get('kind')} {md.get('name')} is in namespace {md.get('namespace')!r}, kustomization says {ns!r}")
        for needed in ("serviceaccount.yaml", "clusterrole.yaml", "clusterrolebinding.yaml", "role.yaml",
                       "rolebinding.yaml", "deployment.yaml", "pdb.yaml", "service.yaml", "servicemonitor.yaml",
                       "prometheus-rules.yaml"):
            self.check(needed in res, w, f"resources does not list {needed}")
        for kept_out in ("prometheus-additional.yaml", "example-app.yaml", "example-hpa.yaml",
                         "example-hpa-ingress.yaml"):
            self.check(kept_out not in res, w, f"{kept_out} is applied separately and must not be in resources")
        self.namespace = ns

    def check_rbac(self):
        sa = self.obj("serviceaccount.yaml", "ServiceAccount")
        role = self.obj("clusterrole.yaml", "ClusterRole")
        crb = self.obj("clusterrolebinding.yaml", "ClusterRoleBinding")
        if role:
            w = "deploy/clusterrole.yaml"
            rules = role.get("rules") or []
            # Read-only rules, one per (API group, resource) the exporter watches.
            expected = {("", "services"), ("networking.k8s.io", "ingresses")}
            got = {(tuple(r.get("apiGroups") or []), tuple(r.get("resources") or [])) for r in rules}
            self.check(got == {((g,), (r,)) for g, r in expected} and len(rules) == len(expected), w,
                       f"expected exactly the rules services (core) and ingresses (networking.k8s.io), got {sorted(got)}")
            for rule in rules:
                self.check(sorted(rule.get("verbs") or []) == ["get", "list", "watch"], w,
                           f"verbs must be exactly get, list, watch (got {rule.get('verbs')})")
                self.check(not rule.get("resourceNames") and not rule.get("nonResourceURLs"), w,
                           "unexpected resourceNames/nonResourceURLs")
        if crb and role and sa:
            w = "deploy/clusterrolebinding.yaml"
            ref = crb.get("roleRef") or {}
            self.check(ref.get("kind") == "ClusterRole" and ref.get("name") == role["metadata"]["name"]
                       and ref.get("apiGroup") == "rbac.authorization.k8s.io", w, "roleRef does not name the ClusterRole")
            subj = crb.get("subjects") or []
            self.check(any(s.get("kind") == "ServiceAccount" and s.get("name") == sa["metadata"]["name"]
                           and s.get("namespace") == sa["metadata"].get("namespace") for s in subj), w,
                       "no subject for the exporter's ServiceAccount in its namespace")
        return sa

    def check_leader_config(self, cfg, w):
        """Two replicas need leader election on, or both collect (double CES calls, series exported twice)."""
        le = cfg.get("leader_election")
        if self.check(isinstance(le, dict), w, "leader_election is missing (deployment.yaml runs 2 replicas)"):
            self.check(le.get("enabled") is True, w, "leader_election.enabled must be true with 2 replicas")
            self.check(set(le) <= KNOWN_LEADER_KEYS, w, f"unknown leader_election keys {sorted(set(le) - KNOWN_LEADER_KEYS)}")
            self.check(not le.get("lease_namespace") and not le.get("identity"), w,
                       "leave leader_election.lease_namespace and identity empty: they come from POD_NAMESPACE/POD_NAME")

    def check_leader_election(self, sa, dep):
        """Role/RoleBinding for Leases in the exporter's namespace only, the PDB, RollingUpdate, anti-affinity and
        the downward-API env the leader election defaults read."""
        role = self.obj("role.yaml", "Role")
        rb = self.obj("rolebinding.yaml", "RoleBinding")
        pdb = self.obj("pdb.yaml", "PodDisruptionBudget")
        if role:
            w = "deploy/role.yaml"
            rules = role.get("rules") or []
            self.check(len(rules) == 1, w, f"expected exactly one rule (leases get/create/update), found {len(rules)}")
            for rule in rules:
                self.check(rule.get("apiGroups") == ["coordination.k8s.io"], w, "rule must be for coordination.k8s.io only")
                self.check(rule.get("resources") == ["leases"], w, "rule must cover `leases` only")
                self.check(sorted(rule.get("verbs") or []) == ["create", "get", "update"], w,
                           f"verbs must be exactly get, create, update (got {rule.get('verbs')})")
            if sa:
                self.check(role["metadata"].get("namespace") == sa["metadata"].get("namespace"), w,
                           "the Role must be in the exporter's namespace")
        if rb and role and sa:
            w = "deploy/rolebinding.yaml"
            ref = rb.get("roleRef") or {}
            self.check(ref.get("kind") == "Role" and ref.get("name") == role["metadata"]["name"]
                       and ref.get("apiGroup") == "rbac.authorization.k8s.io", w, "roleRef does not name the Role")
            self.check(rb["metadata"].get("namespace") == role["metadata"].get("namespace"), w, "not in the Role's namespace")
            subj = rb.get("subjects") or []
            self.check(any(s.get("kind") == "ServiceAccount" and s.get("name") == sa["metadata"]["name"]
                           and s.get("namespace") == sa["metadata"].get("namespace") for s in subj), w,
                       "no subject for the exporter's ServiceAccount in its namespace")
        if not dep:
            return
        w = "deploy/deployment.yaml"
        spec = dep.get("spec") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        strategy = spec.get("strategy") or {}
        self.check(strategy.get("type") == "RollingUpdate", w, "strategy must be RollingUpdate (a follower takes over)")
        self.check((strategy.get("rollingUpdate") or {}).get("maxUnavailable") == 0, w,
                   "rollingUpdate.maxUnavailable must be 0: the new pod is ready before an old one stops")
        pod = (spec.get("template") or {}).get("spec") or {}
        terms = ((pod.get("affinity") or {}).get("podAntiAffinity") or {}).get(
            "preferredDuringSchedulingIgnoredDuringExecution") or []
        self.check(any((t.get("podAffinityTerm") or {}).get("topologyKey") == "kubernetes.io/hostname"
                       and ((t.get("podAffinityTerm") or {}).get("labelSelector") or {}).get("matchLabels", {}).items()
                       <= labels.items() and (t.get("podAffinityTerm") or {}).get("labelSelector") for t in terms), w,
                   "needs a preferred pod anti-affinity on kubernetes.io/hostname selecting its own pods")
        env = {e.get("name"): e for c in pod.get("containers") or [] for e in c.get("env") or []}
        for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                           ("POD_IP", "status.podIP")):
            ref = ((env.get(name) or {}).get("valueFrom") or {}).get("fieldRef") or {}
            self.check(ref.get("fieldPath") == path, w, f"env {name} must come from the downward API ({path})")
        if pdb:
            wp = "deploy/pdb.yaml"
            pspec = pdb.get("spec") or {}
            self.check(pspec.get("minAvailable") == 1, wp, "minAvailable must be 1")
            sel = (pspec.get("selector") or {}).get("matchLabels") or {}
            self.check(sel and sel.items() <= labels.items(), wp, "selector does not select the exporter's pods")
            self.check(pdb["metadata"].get("namespace") == dep["metadata"].get("namespace"), wp, "not in the Deployment's namespace")

    def check_secrets(self):
        secret = self.obj("secret.example.yaml", "Secret")
        if secret:
            w = "deploy/secret.example.yaml"
            self.check(secret["metadata"].get("name") == "elb-exporter-clouds", w, "Secret must be named elb-exporter-clouds")
            text = (secret.get("stringData") or {}).get("clouds.yml")
            if self.check(isinstance(text, str), w, "stringData.clouds.yml is missing"):
                try:
                    cfg = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    cfg = None
                    self.check(False, w, f"clouds.yml is not valid YAML: {e}")
                if self.check(isinstance(cfg, dict), w, "clouds.yml is not a mapping"):
                    g, a = cfg.get("global") or {}, cfg.get("auth") or {}
                    self.check(g.get("port") == f":{METRICS_PORT}", w, f"global.port must be \":{METRICS_PORT}\"")
                    self.check(g.get("prefix") == PREFIX, w, f"global.prefix must be {PREFIX!r} (the adapter rule expects it)")
                    self.check(g.get("metric_path", "/metrics") == "/metrics", w, "global.metric_path must be /metrics")
                    self.check(set(g) <= KNOWN_GLOBAL_KEYS, w, f"unknown global keys {sorted(set(g) - KNOWN_GLOBAL_KEYS)}")
                    self.check(set(a) <= KNOWN_AUTH_KEYS, w, f"unknown auth keys {sorted(set(a) - KNOWN_AUTH_KEYS)}")
                    for key in ("auth_url", "region", "project_name", "access_key", "secret_key"):
                        self.check(key in a, w, f"auth.{key} is missing")
                    self.check(str(a.get("auth_url", "")).startswith("https://iam."), w, "auth.auth_url is not an IAM https URL")
                    self.check_leader_config(cfg, w)
        aksk = self.obj("secret-aksk.example.yaml", "Secret")
        if aksk:
            w = "deploy/secret-aksk.example.yaml"
            keys = set((aksk.get("stringData") or {}).keys())
            self.check({"HUAWEICLOUD_SDK_AK", "HUAWEICLOUD_SDK_SK"} <= keys, w,
                       "stringData must hold HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK")
            try:
                dep_text = open(os.path.join(self.deploy, "deployment.yaml"), encoding="utf-8").read()
            except OSError:
                dep_text = ""
            for env in ("HUAWEICLOUD_SDK_AK", "HUAWEICLOUD_SDK_SK"):
                self.check(env in dep_text and aksk["metadata"]["name"] in dep_text, "deploy/deployment.yaml",
                           f"does not show how to pass {env} from Secret {aksk['metadata']['name']}")
        return secret

    def check_deployment(self, sa, secret):
        dep = self.obj("deployment.yaml", "Deployment")
        if not dep:
            return None, None
        w = "deploy/deployment.yaml"
        spec = dep.get("spec") or {}
        tpl = spec.get("template") or {}
        pod = tpl.get("spec") or {}
        labels = (tpl.get("metadata") or {}).get("labels") or {}
        self.check(spec.get("replicas") == 2, w, "replicas must be 2 (one leader, one follower)")
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        self.check(sel and sel.items() <= labels.items(), w, "selector.matchLabels do not match the pod template labels")
        if sa:
            self.check(pod.get("serviceAccountName") == sa["metadata"]["name"], w, "serviceAccountName is not the exporter's ServiceAccount")
            self.check(dep["metadata"].get("namespace") == sa["metadata"].get("namespace"), w, "not in the ServiceAccount's namespace")
        self.check(pod.get("automountServiceAccountToken", True) is True, w, "the token must be mounted (the exporter watches Services)")
        self.check(pod.get("terminationGracePeriodSeconds") == 30, w, "terminationGracePeriodSeconds must be 30")
        psc = pod.get("securityContext") or {}
        self.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == NONROOT_UID, w,
                   f"pod securityContext must set runAsNonRoot: true, runAsUser: {NONROOT_UID}")
        self.check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", w, "pod seccompProfile must be RuntimeDefault")
        containers = pod.get("containers") or []
        if not self.check(len(containers) == 1, w, "expected exactly one container"):
            return dep, None
        c = containers[0]
        self.check(isinstance(c.get("image"), str) and "elb-exporter" in c["image"], w, "image does not name elb-exporter")
        self.check(c.get("args") == ["--config", CONFIG_PATH], w, f"args must be ['--config', '{CONFIG_PATH}']")
        self.check(not c.get("command"), w, "`command` would override the image ENTRYPOINT; use args")
        env = {e.get("name"): e for e in c.get("env") or []}
        self.check((env.get("RUST_LOG") or {}).get("value") == "info", w, "env RUST_LOG=info is missing")
        ports = {p.get("name"): p for p in c.get("ports") or []}
        self.check((ports.get("http-metrics") or {}).get("containerPort") == METRICS_PORT, w,
                   f"containerPort {METRICS_PORT} named http-metrics is missing")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            self.check(get.get("path") == path, w, f"{probe} must GET {path}")
            self.check(get.get("port") in ("http-metrics", METRICS_PORT), w, f"{probe} port must be http-metrics")
        if c.get("startupProbe"):
            get = c["startupProbe"].get("httpGet") or {}
            self.check(get.get("path") == "/healthz" and get.get("port") in ("http-metrics", METRICS_PORT), w,
                       "startupProbe must GET /healthz on http-metrics")
        res = c.get("resources") or {}
        self.check((res.get("requests") or {}) == {"cpu": "50m", "memory": "64Mi"}, w, "requests must be cpu 50m, memory 64Mi")
        lim = res.get("limits") or {}
        self.check(lim.get("memory") == "256Mi" and str(lim.get("cpu")) in ("1", "1000m"), w, "limits must be cpu 1, memory 256Mi")
        csc = c.get("securityContext") or {}
        self.check(csc.get("readOnlyRootFilesystem") is True, w, "readOnlyRootFilesystem must be true")
        self.check(csc.get("allowPrivilegeEscalation") is False, w, "allowPrivilegeEscalation must be false")
        self.check((csc.get("capabilities") or {}).get("drop") == ["ALL"], w, "capabilities must drop ALL")
        self.check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, w, "container must run as non-root")
        self.check(csc.get("runAsUser", psc.get("runAsUser")) == NONROOT_UID, w, f"container must run as uid {NONROOT_UID}")
        self.check((csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", w,
                   "container seccompProfile must be RuntimeDefault")
        mounts = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == os.path.dirname(CONFIG_PATH)]
        if self.check(len(mounts) == 1, w, f"nothing mounted at {os.path.dirname(CONFIG_PATH)}"):
            m = mounts[0]
            self.check(m.get("readOnly") is True, w, "the config mount must be readOnly")
            vols = {v.get("name"): v for v in pod.get("volumes") or []}
            vsec = (vols.get(m.get("name")) or {}).get("secret") or {}
            if secret:
                self.check(vsec.get("secretName") == secret["metadata"]["name"], w,
                           f"the config volume does not mount Secret {secret['metadata']['name']}")
            items = vsec.get("items")
            self.check(not items or any(i.get("path") == os.path.basename(CONFIG_PATH) for i in items), w,
                       "the Secret's items do not provide clouds.yml")
        return dep, c

    def check_service(self, dep, container):
        svc = self.obj("service.yaml", "Service", "elb-exporter")
        if not svc:
            return None
        w = "deploy/service.yaml"
        md = svc["metadata"]
        ann = md.get("annotations") or {}
        want = {"prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}
        for k, v in want.items():
            self.check(ann.get(k) == v, w, f"annotation {k} must be the string {v!r} (got {ann.get(k)!r})")
        # One scrape path by default: the ServiceMonitor is applied by -k, so an annotation that CCE's auto
        # service discovery (or any annotation job) acts on would store every series a second time.
        k = self.load("kustomization.yaml") or [{}]
        if "servicemonitor.yaml" in ((k[0] or {}).get("resources") or []):
            self.check(str(ann.get("prometheus.io/scrape", "")).lower() != "true", w,
                       "prometheus.io/scrape: \"true\" next to the ServiceMonitor in kustomization.yaml: two scrape paths")
        self.check((md.get("labels") or {}).get("app") == "elb-exporter", w, "label app: elb-exporter is missing")
        # The guide's job labelmaps every Service label onto the series (invalid characters become '_').
        mapped = {re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in (md.get("labels") or {})}
        clash = mapped & (EXPORTED_LABELS | {"job", "instance"})
        self.check(not clash, w, f"Service labels {sorted(clash)} would clash with exported labels (labelmap)")
        ports = {p.get("name"): p for p in (svc.get("spec") or {}).get("ports") or []}
        p = ports.get("http-metrics") or {}
        self.check(p.get("port") == METRICS_PORT, w, f"port {METRICS_PORT} named http-metrics is missing")
        if dep:
            self.check(md.get("namespace") == dep["metadata"].get("namespace"), w, "not in the Deployment's namespace")
            labels = ((dep["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
            sel = (svc.get("spec") or {}).get("selector") or {}
            self.check(sel and sel.items() <= labels.items(), w, "selector does not match the exporter's pods")
        if container:
            cports = {cp.get("name"): cp.get("containerPort") for cp in container.get("ports") or []}
            tp = p.get("targetPort", p.get("port"))
            self.check(tp in cports or tp in cports.values(), w, f"targetPort {tp!r} is not a container port")
        return svc

    def check_servicemonitor(self, svc):
        sm = self.obj("servicemonitor.yaml", "ServiceMonitor")
        if not sm:
            return
        w = "deploy/servicemonitor.yaml"
        self.check(sm.get("apiVersion") == "monitoring.coreos.com/v1", w, "apiVersion must be monitoring.coreos.com/v1")
        md = sm.get("metadata") or {}
        self.check(md.get("name"), w, "metadata.name is missing")
        spec = sm.get("spec") or {}
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        self.check(sel, w, "spec.selector.matchLabels is missing")
        eps = spec.get("endpoints") or []
        if not self.check(eps, w, "spec.endpoints is empty"):
            return
        for ep in eps:
            self.check(ep.get("port") == "http-metrics", w, "endpoint port must be the Service port name http-metrics")
            self.check(ep.get("path", "/metrics") == "/metrics", w, "endpoint path must be /metrics")
            self.check(ep.get("honorLabels") is True, w,
                       "honorLabels must be true, or the exported namespace/service labels become exported_namespace/exported_service")
            self.check(ep.get("interval") == "60s", w, "interval must be 60s")
        if svc:
            self.check(sel.items() <= ((svc["metadata"].get("labels") or {}).items()), w,
                       "selector does not match the elb-exporter Service's labels")
            nss = spec.get("namespaceSelector")
            same_ns = md.get("namespace") == svc["metadata"].get("namespace")
            self.check((not nss and same_ns) or (nss or {}).get("any") is True
                       or svc["metadata"].get("namespace") in ((nss or {}).get("matchNames") or []), w,
                       "the elb-exporter Service is outside the ServiceMonitor's namespace selection")

    def check_scrape_config(self, svc):
        docs = self.load("prometheus-additional.yaml")
        w = "deploy/prometheus-additional.yaml"
        if not docs:
            return
        if not self.check(len(docs) == 1 and isinstance(docs[0], list), w,
                          "must be a YAML list of scrape configs (what additionalScrapeConfigs takes)"):
            return
        jobs = [j for j in docs[0] if isinstance(j, dict) and j.get("job_name") == "elb_metric"]
        if not self.check(len(jobs) == 1, w, "job_name elb_metric is missing"):
            return
        job = jobs[0]
        self.check((job.get("params") or {}).get("services") == ["SYS.ELB"], w, "params.services must be ['SYS.ELB']")
        sd = job.get("kubernetes_sd_configs") or []
        self.check(any(s.get("role") == "endpoints" for s in sd), w, "kubernetes_sd_configs with role endpoints is missing")
        rules = job.get("relabel_configs") or []
        ann_label = "__meta_kubernetes_service_annotation_prometheus_io_port"
        keep = [r for r in rules if r.get("action") == "keep" and r.get("source_labels") == [ann_label]]
        if self.check(keep and str(keep[0].get("regex")) == str(METRICS_PORT), w,
                      f"keep rule on {ann_label} with regex '{METRICS_PORT}' is missing"):
            if svc:
                port_ann = (svc["metadata"].get("annotations") or {}).get("prometheus.io/port", "")
                self.check(re.fullmatch(f"(?:{keep[0]['regex']})", str(port_ann)), w,
                           "the keep rule would drop the elb-exporter Service (prometheus.io/port annotation)")
        addr = [r for r in rules if r.get("target_label") == "__address__"]
        if self.check(addr, w, "the __address__ replace rule is missing"):
            r = addr[0]
            src = ";".join(["10.0.0.7:80", str(METRICS_PORT)])
            m = re.fullmatch(f"(?:{r.get('regex', '(.*)')})", src)
            got = m.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", r.get("replacement", "$1"))) if m else None
            self.check(r.get("source_labels") == ["__address__", ann_label] and got == f"10.0.0.7:{METRICS_PORT}", w,
                       f"the __address__ rule does not rewrite the target to <ip>:{METRICS_PORT} (got {got!r})")
        self.check(any(r.get("action") == "labelmap" and r.get("regex") == "__meta_kubernetes_service_label_(.+)"
                       for r in rules), w, "labelmap of the Service labels is missing")
        for src, tgt in (("__meta_kubernetes_namespace", "kubernetes_namespace"),
                         ("__meta_kubernetes_service_name", "kubernetes_service")):
            self.check(any(r.get("action", "replace") == "replace" and r.get("source_labels") == [src]
                           and r.get("target_label") == tgt for r in rules), w, f"replace {src} -> {tgt} is missing")
        targets = {r.get("target_label") for r in rules}
        self.check(not (targets & EXPORTED_LABELS) or job.get("honor_labels") is True, w,
                   "sets a target label named like an exported label without honor_labels: true")

    def check_adapter_rules(self):
        """deploy/adapter/elb-exporter-rules.yaml: a `rules:` snippet (never a whole ConfigMap), duplicate-safe."""
        w = f"deploy/{ADAPTER_SNIPPET}"
        names = {}
        for name in self.yaml_files():
            for d in self.load(name) or []:
                md = (d.get("metadata") or {}) if isinstance(d, dict) else {}
                self.check(not (d.get("kind") == "ConfigMap" and md.get("name") == "user-adapter-config")
                           if isinstance(d, dict) else True, f"deploy/{name}",
                           "a whole user-adapter-config ConfigMap would replace the monitoring add-on's rules; ship a snippet")
        docs = self.load(ADAPTER_SNIPPET)
        if not docs:
            return names
        snippet = docs[0]
        if not self.check(len(docs) == 1 and isinstance(snippet, dict) and set(snippet) == {"rules"}, w,
                          "must be a snippet holding only `rules:` (merged into the adapter config), not an object"):
            return names
        rules = snippet["rules"]
        if not self.check(isinstance(rules, list) and rules, w, "`rules` is empty"):
            return names
        elb_rules = 0
        for i, rule in enumerate(rules):
            rw = f"{w}: rules[{i}]"
            for key in ("seriesQuery", "resources", "name", "metricsQuery"):
                self.check(key in rule, rw, f"{key} is missing")
            ov = (rule.get("resources") or {}).get("overrides") or {}
            self.check((ov.get("namespace") or {}).get("resource") == "namespace", rw, "resources.overrides.namespace must map to resource namespace")
            res_labels = sorted(k for k in ov if k != "namespace")
            self.check(len(res_labels) == 1, rw, f"expected one resource label besides namespace, got {res_labels}")
            nm = rule.get("name") or {}
            if not self.check(nm.get("matches") and nm.get("as"), rw, "name.matches / name.as are missing"):
                continue
            sq = str(rule.get("seriesQuery", ""))
            m = re.search(r'__name__=~"([^"]*)"', sq)
            if not self.check(m, rw, "seriesQuery must select series by a __name__ regex"):
                continue
            family = "pool" if "_pool_" in m.group(1) else "listener"
            identity = IDENTITY_LABEL[family]
            for label in ["namespace"] + res_labels:
                self.check(f'{label}!=""' in sq, rw, f'seriesQuery must require {label}!=""')
            # Duplicate-safe shape: an inner max by (namespace, <resource label>, <series identity>) - one value per
            # series however often it is stored - then the sum per resource.
            mq = str(rule.get("metricsQuery", ""))
            shape = re.fullmatch(r"sum by \(<<\.GroupBy>>\) \(max by \(([^)]*)\) \(<<\.Series>>\{<<\.LabelMatchers>>\}\)\)", mq)
            if self.check(shape, rw, f"metricsQuery {mq!r} is not sum by (<<.GroupBy>>) (max by (...) (<<.Series>>{{<<.LabelMatchers>>}}))"):
                inner = {x.strip() for x in shape.group(1).split(",")}
                want = {"namespace", identity, *res_labels}
                self.check(inner == want, rw, f"the inner max must be by {sorted(want)} (got {sorted(inner)})")
            # Only the Service listener rule serves the example HPA (an Ingress rule selects the same names).
            if not re.fullmatch(m.group(1), EXAMPLE_HPA_SERIES) or res_labels != ["service"]:
                continue
            elb_rules += 1
            self.check(res_labels == ["service"] and ov["service"].get("resource") == "service", rw,
                       "resources.overrides.service must map to resource service")
            for metric in EXPORTED_CES_METRICS:
                series = f"{PREFIX}_sys_elb_listener_{metric}"
                if self.check(re.fullmatch(m.group(1), series), rw, f"seriesQuery does not select {series}"):
                    names[series] = adapter_name(nm["matches"], nm["as"], series)
            # Fill the template as prometheus-adapter does for the example HPA (Object metric on Service nginx).
            filled = fill_metrics_query(mq, EXAMPLE_HPA_SERIES, 'namespace="default",service="nginx"', "service")
            want_q = (f'sum by (service) (max by (namespace, service, lbaas_listener_id) '
                      f'({EXAMPLE_HPA_SERIES}{{namespace="default",service="nginx"}}))')
            self.check(filled == want_q, rw, f"metricsQuery for the example HPA gives {filled!r}, expected {want_q!r}")
        self.check(elb_rules == 1, w, f"expected exactly one rule selecting {PREFIX}_sys_elb_listener_* series of Services, found {elb_rules}")
        return names

    def check_merge_script(self):
        """deploy/adapter/merge-adapter-rules.py on a CCE-like user-adapter-config: keeps the add-on's rules, adds
        ours once (idempotent), refuses while the practice guide's elb01_ rule is there."""
        w = f"deploy/{MERGE_SCRIPT}"
        path = os.path.join(self.deploy, MERGE_SCRIPT)
        try:
            spec = importlib.util.spec_from_file_location("merge_adapter_rules", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except (OSError, SyntaxError, ImportError) as e:
            self.check(False, w, f"cannot load: {e}")
            return
        ours = mod.load_snippet(os.path.join(self.deploy, ADAPTER_SNIPPET))
        cce_rule = {"seriesQuery": '{__name__=~"^container_.*",container!="POD",namespace!="",pod!=""}',
                    "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                    "name": {"matches": "^container_(.*)_seconds_total$"},
                    "metricsQuery": "sum(rate(<<.Series>>{<<.LabelMatchers>>}[5m])) by (<<.GroupBy>>)"}
        cm = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "user-adapter-config", "namespace": "monitoring", "resourceVersion": "4711"},
              "data": {"config.yaml": yaml.safe_dump({"rules": [cce_rule], "resourceRules": {"cpu": {"containerQuery": "x"}}}),
                       "other.yaml": "kept: true\n"}}
        once = mod.merge_configmap(json.loads(json.dumps(cm)), ours)
        cfg = yaml.safe_load(once["data"]["config.yaml"])
        self.check(cfg.get("rules") == [cce_rule] + ours, w, f"merge must keep the add-on's rule and append ours: {cfg.get('rules')}")
        self.check(cfg.get("resourceRules") == {"cpu": {"containerQuery": "x"}} and once["data"]["other.yaml"] == "kept: true\n",
                   w, "merge must keep every other key of the ConfigMap")
        self.check(once["metadata"].get("resourceVersion") == "4711", w,
                   "merge must keep resourceVersion so that `kubectl replace` detects a concurrent change")
        twice = mod.merge_configmap(json.loads(json.dumps(once)), ours)
        self.check(yaml.safe_load(twice["data"]["config.yaml"]) == cfg, w, "merging twice must change nothing")
        guide = {"seriesQuery": '{lbaas_listener_id="abc"}', "name": {"matches": "huaweicloud_sys_elb_(.*)", "as": "elb01_${1}"},
                 "resources": {"overrides": {"kubernetes_namespace": {"resource": "namespace"},
                                             "kubernetes_service": {"resource": "service"}}},
                 "metricsQuery": 'sum(<<.Series>>{<<.LabelMatchers>>,lbaas_listener_id="abc"}) by (<<.GroupBy>>)'}
        cm["data"]["config.yaml"] = yaml.safe_dump({"rules": [cce_rule, guide]})
        try:
            mod.merge_configmap(cm, ours)
            self.check(False, w, "merge must refuse while the practice guide's elb01_ rule is in the config")
        except mod.MergeError as e:
            self.check("practice guide" in str(e), w, f"the refusal must point to the practice guide's rule: {e}")

    def check_examples(self, rule_names):
        app_dep = self.obj("example-app.yaml", "Deployment", "nginx")
        app_svc = self.obj("example-app.yaml", "Service", "nginx")
        hpa = self.obj("example-hpa.yaml", "HorizontalPodAutoscaler")
        if app_svc:
            w = "deploy/example-app.yaml"
            ann = app_svc["metadata"].get("annotations") or {}
            self.check(isinstance(ann.get("kubernetes.io/elb.id"), str) and ann["kubernetes.io/elb.id"], w,
                       "Service nginx needs a string annotation kubernetes.io/elb.id")
            self.check(ann.get("kubernetes.io/elb.class") in ("union", "performance"), w,
                       "kubernetes.io/elb.class must be union or performance")
            spec = app_svc.get("spec") or {}
            self.check(spec.get("type") == "LoadBalancer", w, "Service nginx must be type LoadBalancer")
            self.check(any(p.get("port") == 80 and p.get("protocol", "TCP") == "TCP" for p in spec.get("ports") or []), w,
                       "Service nginx needs port 80/TCP")
            if app_dep:
                labels = ((app_dep["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
                self.check((spec.get("selector") or {}).items() <= labels.items() and spec.get("selector"), w,
                           "Service nginx does not select the nginx pods")
        if not hpa:
            return
        w = "deploy/example-hpa.yaml"
        self.check(hpa.get("apiVersion") == "autoscaling/v2", w, "apiVersion must be autoscaling/v2")
        spec = hpa.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        self.check(ref.get("kind") == "Deployment" and ref.get("name") == "nginx", w, "scaleTargetRef must be Deployment nginx")
        self.check(spec.get("minReplicas") == 1 and spec.get("maxReplicas") == 10, w, "minReplicas 1 / maxReplicas 10 expected")
        if app_dep:
            self.check(hpa["metadata"].get("namespace") == app_dep["metadata"].get("namespace"), w, "not in nginx's namespace")
        metrics = spec.get("metrics") or []
        if not self.check(len(metrics) == 1 and metrics[0].get("type") == "Object", w, "expected one metric of type Object"):
            return
        obj = metrics[0].get("object") or {}
        name = (obj.get("metric") or {}).get("name")
        self.check(name == "elb01_listener_m7_in_Bps", w, "metric name must be elb01_listener_m7_in_Bps")
        exported = {f"elb01_listener_{m}" for m in EXPORTED_CES_METRICS}
        self.check(name in exported, w, f"metric {name!r} is not elb01_ + an exported listener metric")
        self.check(name in rule_names.values(), w, f"the adapter rule publishes no metric named {name!r}")
        d = obj.get("describedObject") or {}
        self.check(d.get("apiVersion") == "v1" and d.get("kind") == "Service", w, "describedObject must be a v1 Service")
        if app_svc:
            self.check(d.get("name") == app_svc["metadata"]["name"], w,
                       "describedObject must be the application's own Service (the one with the kubernetes.io/elb.id annotation)")
        t = obj.get("target") or {}
        # Value would scale on replicas x total/target: adding pods does not lower an ELB's total, so it runs away.
        self.check(t.get("type") == "AverageValue" and "value" not in t and str(t.get("averageValue")) == "1000", w,
                   "target must be type AverageValue (per pod), averageValue 1000, for a Service's total traffic")
        beh = spec.get("behavior") or {}
        up, down = beh.get("scaleUp") or {}, beh.get("scaleDown") or {}
        # CES data moves once a minute: react after a minute, shrink only after several quiet minutes.
        self.check(60 <= (up.get("stabilizationWindowSeconds") or 0) <= 120, w,
                   "behavior.scaleUp.stabilizationWindowSeconds must cover one CES minute (60..120 s)")
        self.check((down.get("stabilizationWindowSeconds") or 0) >= 300, w,
                   "behavior.scaleDown.stabilizationWindowSeconds must span several CES datapoints (>= 300 s)")
        for d, pol in (("scaleUp", up), ("scaleDown", down)):
            self.check(all((p.get("periodSeconds") or 0) >= 60 for p in pol.get("policies") or [{}]), w,
                       f"behavior.{d} policies must use periods of at least one CES minute (60 s)")

    def check_alert_rules(self):
        """prometheus-rules.yaml (PrometheusRule) == prometheus/elb-exporter.rules.yml; alerts aggregate over replicas."""
        pr = self.obj("prometheus-rules.yaml", "PrometheusRule")
        w = "deploy/prometheus-rules.yaml"
        if not pr:
            return
        self.check(pr.get("apiVersion") == "monitoring.coreos.com/v1", w, "apiVersion must be monitoring.coreos.com/v1")
        try:
            with open(os.path.join(self.deploy, RULE_FILE), encoding="utf-8") as f:
                plain = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            self.check(False, f"deploy/{RULE_FILE}", f"unreadable: {e}")
            return
        self.check(pr.get("spec") == plain, w, f"spec differs from deploy/{RULE_FILE}: edit both")
        alerts = [r for g in (plain or {}).get("groups") or [] for r in g.get("rules") or [] if "alert" in r]
        names = {r["alert"] for r in alerts}
        self.check(names >= REQUIRED_ALERTS, f"deploy/{RULE_FILE}", f"missing alerts {sorted(REQUIRED_ALERTS - names)}")
        for r in alerts:
            expr = " ".join(str(r.get("expr", "")).split())
            aggregated = expr.startswith("absent(") or "without (instance, pod" in expr or "group by (namespace, service)" in expr
            self.check(aggregated, f"deploy/{RULE_FILE}: {r['alert']}",
                       "must aggregate over replicas (max/min/sum without (instance, pod)) so a follower or a handover does not fire it")
            self.check((r.get("labels") or {}).get("severity") in ("critical", "warning"), f"deploy/{RULE_FILE}: {r['alert']}",
                       "needs a severity label (critical or warning)")
        try:
            with open(os.path.join(self.deploy, RULE_TESTS), encoding="utf-8") as f:
                tests = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            self.check(False, f"deploy/{RULE_TESTS}", f"unreadable: {e}")
            return
        tested = {a.get("alertname") for t in tests.get("tests") or [] for a in t.get("alert_rule_test") or []
                  if a.get("exp_alerts")}
        self.check(names <= tested, f"deploy/{RULE_TESTS}", f"alerts never tested firing: {sorted(names - tested)}")

    def check_dashboard(self):
        w = f"deploy/{DASHBOARD}"
        try:
            with open(os.path.join(self.deploy, DASHBOARD), encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            self.check(False, w, f"not valid JSON: {e}")
            return
        self.check(d.get("uid") and d.get("title") and isinstance(d.get("panels"), list), w, "uid, title and panels are required")
        variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list") or []}
        self.check((variables.get("datasource") or {}).get("type") == "datasource", w, "a datasource variable is required")
        for v in ("namespace", "service"):
            self.check(v in variables, w, f"variable {v} is missing")
        text = json.dumps(d)
        self.check("vector(" not in text, w, "no `vector(` padding: an empty panel must stay visibly empty")
        # The queries themselves run against the real Prometheus in tests/prometheus.rs.

    def check_license(self):
        try:
            text = open(os.path.join(self.root, "LICENSE"), encoding="utf-8").read()
        except OSError:
            text = ""
        self.check("Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text,
                   "LICENSE", "must hold the full Apache License 2.0 text")
        try:
            manifest = open(os.path.join(self.root, "Cargo.toml"), encoding="utf-8").read()
        except OSError:
            manifest = ""
        self.check(re.search(r'^license\s*=\s*"Apache-2\.0"', manifest, re.M), "Cargo.toml", 'license = "Apache-2.0" is missing')

    def check_overlay_config(self):
        """The example overlay's clouds.yml (its Secret) must be the same valid shape as secret.example.yaml's."""
        w = f"{OVERLAY}/clouds.yml"
        try:
            cfg = yaml.safe_load(open(os.path.join(self.root, OVERLAY, "clouds.yml"), encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            self.check(False, w, f"unreadable: {e}")
            return
        g, a = (cfg or {}).get("global") or {}, (cfg or {}).get("auth") or {}
        self.check(g.get("port") == f":{METRICS_PORT}" and g.get("prefix") == PREFIX, w, f"global.port/prefix must be :{METRICS_PORT}/{PREFIX}")
        self.check(set(g) <= KNOWN_GLOBAL_KEYS and set(a) <= KNOWN_AUTH_KEYS, w, "unknown keys")
        self.check(str(a.get("access_key", "")).startswith("REPLACE_") or a.get("access_key") == "", w,
                   "must hold placeholders, never real keys")
        self.check_leader_config(cfg or {}, w)

    def check_dockerfile(self, container):
        w = "Dockerfile"
        try:
            text = open(os.path.join(self.root, "Dockerfile"), encoding="utf-8").read()
        except OSError:
            self.check(False, w, "is missing")
            return
        lines = join_continuations(text)
        froms = [l for l in lines if re.match(r"(?i)^FROM\s", l)]
        self.check(len(froms) == 2, w, f"expected two stages (builder, runtime), found {len(froms)}")
        # Base images come from build arguments (mirror registries) whose defaults are pinned by digest.
        args = dict(re.findall(r"^ARG\s+([A-Z_]+)=(\S+)$", "\n".join(lines), re.M))
        digest = r"@sha256:[0-9a-f]{64}"
        self.check(froms and re.fullmatch(r"FROM \$\{RUST_IMAGE\} AS builder", froms[0])
                   and re.fullmatch(r"(docker\.io/library/)?rust:[0-9.]+-bookworm" + digest, args.get("RUST_IMAGE", "")), w,
                   "first stage must be `FROM ${RUST_IMAGE} AS builder`, ARG RUST_IMAGE=rust:<version>-bookworm@sha256:<digest>")
        self.check(len(froms) > 1 and froms[-1] == "FROM ${RUNTIME_IMAGE}"
                   and re.fullmatch(r"gcr\.io/distroless/cc-debian12:nonroot" + digest, args.get("RUNTIME_IMAGE", "")), w,
                   "runtime stage must be `FROM ${RUNTIME_IMAGE}`, ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:<digest>")
        builds = [i for i, l in enumerate(lines) if "cargo build --release --locked" in l]
        self.check(len(builds) == 2, w, "expected `cargo build --release --locked` twice (dependency layer, then the real source)")
        copy_manifest = next((i for i, l in enumerate(lines) if re.match(r"COPY\s+Cargo\.toml\s+Cargo\.lock\s", l)), None)
        copy_src = next((i for i, l in enumerate(lines) if re.match(r"COPY\s+src\b", l)), None)
        self.check(copy_manifest is not None and copy_src is not None and builds
                   and copy_manifest < builds[0] < copy_src < builds[-1], w,
                   "dependency caching order must be: COPY Cargo.toml Cargo.lock, build, COPY src, build")
        self.check(any("/usr/local/bin/elb-exporter" in l and l.startswith("COPY --from=builder") for l in lines), w,
                   "the runtime stage must COPY the binary to /usr/local/bin/elb-exporter")
        user = [l.split()[1] for l in lines if l.startswith("USER ")]
        self.check(user and user[-1].split(":")[0] in ("nonroot", str(NONROOT_UID)), w, f"must end with USER nonroot ({NONROOT_UID})")
        self.check(f"EXPOSE {METRICS_PORT}" in lines, w, f"EXPOSE {METRICS_PORT} is missing")
        self.check('ENTRYPOINT ["/usr/local/bin/elb-exporter"]' in lines, w, 'ENTRYPOINT ["/usr/local/bin/elb-exporter"] is missing')
        cmd = [l for l in lines if l.startswith("CMD ")]
        self.check(cmd and cmd[-1] == f'CMD ["--config", "{CONFIG_PATH}"]', w, f'CMD must be ["--config", "{CONFIG_PATH}"]')
        if container:
            self.check(container.get("args") == ["--config", CONFIG_PATH], "deploy/deployment.yaml", "args differ from the image CMD")
        # The builder copies only Cargo.toml, Cargo.lock and src/: sources that reach outside src/ would not build.
        self.check(not os.path.exists(os.path.join(self.root, "build.rs")) or re.search(r"^COPY\s+.*build\.rs", text, re.M), w,
                   "the crate has a build.rs that the Dockerfile does not COPY")
        # Targets declared in Cargo.toml outside src/ (e.g. [[bench]]) must exist in the builder, or cargo
        # refuses the manifest: the Dockerfile has to create or copy each of them.
        try:
            manifest = open(os.path.join(self.root, "Cargo.toml"), encoding="utf-8").read()
        except OSError:
            manifest = ""
        for declared in re.findall(r'^path\s*=\s*"([^"]+)"', manifest, re.M):
            if declared.startswith("src/"):
                continue
            self.check(declared in text, w,
                       f"Cargo.toml declares {declared}, which the Dockerfile neither copies nor creates")
        src = os.path.join(self.root, "src")
        for dirpath, _, files in os.walk(src):
            for fn in files:
                if not fn.endswith(".rs"):
                    continue
                p = os.path.join(dirpath, fn)
                try:
                    code = open(p, encoding="utf-8").read()
                except (OSError, UnicodeDecodeError):
                    continue
                for inc in re.findall(r'include_(?:str|bytes)!\s*\(\s*"([^"]+)"', code):
                    target = os.path.normpath(os.path.join(dirpath, inc))
                    inside = target.startswith(src + os.sep) or target in (
                        os.path.join(self.root, "Cargo.toml"), os.path.join(self.root, "Cargo.lock"))
                    self.check(inside, os.path.relpath(p, self.root),
                               f"include of {inc!r} reaches outside src/; the Dockerfile does not copy it")
        try:
            ignore = [l.strip() for l in open(os.path.join(self.root, ".dockerignore"), encoding="utf-8")
                      if l.strip() and not l.strip().startswith("#")]
        except OSError:
            ignore = []
        for pat in ("target/", ".git/", ".venv/"):
            self.check(pat in ignore or pat.rstrip("/") in ignore, ".dockerignore", f"does not exclude {pat}")
        for pat in ("src", "src/", "Cargo.toml", "Cargo.lock"):
            self.check(pat not in ignore, ".dockerignore", f"excludes {pat}, which the build needs")

    def check_kustomized(self, path):
        """`kubectl kustomize deploy/` output: the listed objects, all in the kustomization's namespace."""
        k = self.obj("kustomization.yaml", "Kustomization") or {}
        ns = k.get("namespace")
        want = set()
        for r in k.get("resources") or []:
            for d in self.load(r) or []:
                want.add((d.get("kind"), (d.get("metadata") or {}).get("name")))
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        got = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs}
        w = "kubectl kustomize deploy/"
        self.check(got == want, w, f"objects {sorted(got)} differ from the listed files' {sorted(want)}")
        for d in docs:
            md = d.get("metadata") or {}
            if d.get("kind") not in CLUSTER_SCOPED:
                self.check(md.get("namespace") == ns, w, f"{d.get('kind')} {md.get('name')} is not in namespace {ns}")
            for s in d.get("subjects") or []:
                if s.get("kind") == "ServiceAccount":
                    self.check(s.get("namespace") == ns, w, f"{d.get('kind')} subject {s.get('name')} is not in namespace {ns}")
        return len(docs)

    def check_kustomized_overlay(self, path):
        """`kubectl kustomize overlays/example` output: the base's objects plus the Namespace and the generated Secret,
        all in the overlay's namespace, with the overlay's image and the Deployment mounting the generated Secret."""
        w = f"kubectl kustomize {OVERLAY}"
        with open(os.path.join(self.root, OVERLAY, "kustomization.yaml"), encoding="utf-8") as f:
            ov = yaml.safe_load(f)
        ns = ov.get("namespace")
        base = self.obj("kustomization.yaml", "Kustomization") or {}
        want = {("Namespace", ns)}
        for r in base.get("resources") or []:
            for d in self.load(r) or []:
                want.add((d.get("kind"), (d.get("metadata") or {}).get("name")))
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        secrets = [d for d in docs if d.get("kind") == "Secret"]
        got = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs if d.get("kind") != "Secret"}
        self.check(got == want, w, f"objects {sorted(got)} differ from {sorted(want)} (+ the Secret)")
        if not self.check(len(secrets) == 1 and secrets[0]["metadata"]["name"].startswith("elb-exporter-clouds"), w,
                          "exactly one generated Secret elb-exporter-clouds-<hash> expected"):
            return len(docs)
        secret = secrets[0]["metadata"]["name"]
        self.check("clouds.yml" in (secrets[0].get("data") or {}), w, "the Secret has no clouds.yml")
        img = (ov.get("images") or [{}])[0]
        for d in docs:
            md = d.get("metadata") or {}
            if d.get("kind") not in CLUSTER_SCOPED:
                self.check(md.get("namespace") == ns, w, f"{d.get('kind')} {md.get('name')} is not in namespace {ns}")
            for sub in d.get("subjects") or []:
                if sub.get("kind") == "ServiceAccount":
                    self.check(sub.get("namespace") == ns, w, f"{d.get('kind')} subject {sub.get('name')} is not in namespace {ns}")
            if d.get("kind") == "Deployment":
                pod = d["spec"]["template"]["spec"]
                self.check(pod["containers"][0]["image"] == f"{img.get('newName')}:{img.get('newTag')}", w,
                           f"the Deployment's image is not the overlay's {img}")
                vols = [v["secret"]["secretName"] for v in pod.get("volumes") or [] if "secret" in v]
                self.check(vols == [secret], w, f"the Deployment mounts {vols}, not the generated Secret {secret}")
        return len(docs)


def split_native(path, out):
    """Writes the Kubernetes-native objects of a multi-document file to `out` (for kubernetes-validate); returns
    how many were written and how many custom resources were left out."""
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    native = [d for d in docs if NATIVE_GROUP.match(str(d.get("apiVersion", "")))]
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(native, f, sort_keys=False)
    return len(native), len(docs) - len(native)


def join_continuations(text):
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            if not cur:
                continue
            line = ""
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(re.sub(r"\s+", " ", cur.strip()))
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def adapter_name(matches, as_, series):
    """prometheus-adapter's name rule: regexp `matches`, `as` expanded with ${N} / $N."""
    m = re.search(matches, series)
    if not m:
        return None
    return re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda g: m.group(int(g.group(1) or g.group(2))) or "", as_)


def fill_metrics_query(template, series, label_matchers, group_by):
    """Fill a metricsQuery the way prometheus-adapter's Go template (delimiters << >>) does for these fields."""
    values = {"Series": series, "LabelMatchers": label_matchers, "GroupBy": group_by}

    def sub(m):
        key = m.group(1)
        return values[key] if key in values else m.group(0)

    filled = re.sub(r"<<\s*\.(\w+)\s*>>", sub, template)
    return filled if "<<" not in filled else f"unfilled template fields in {filled}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--list-native", action="store_true")
    ap.add_argument("--kustomized", metavar="FILE")
    ap.add_argument("--kustomized-overlay", metavar="FILE")
    ap.add_argument("--split-native", nargs=2, metavar=("IN", "OUT"))
    args = ap.parse_args()
    c = Checker(args.root)
    if args.split_native:
        n, custom = split_native(*args.split_native)
        print(f"{n} native objects ({custom} custom resources left out)")
        return 0 if n else 1
    if args.kustomized_overlay:
        n = c.check_kustomized_overlay(args.kustomized_overlay)
        for e in c.errors:
            print(f"FAIL {e}", file=sys.stderr)
        if c.errors:
            return 1
        print(f"check_deploy: kustomize build of {OVERLAY} ok ({n} objects)")
        return 0
    if args.list_native:
        bad = []
        for name in c.yaml_files():
            kind = c.classify(name)
            if kind == "native":
                print(os.path.join("deploy", name))
            elif kind == "invalid":
                bad.append(name)
        for e in c.errors:
            print(f"check_deploy: {e}", file=sys.stderr)
        if bad or c.errors:
            print(f"check_deploy: cannot classify {bad}", file=sys.stderr)
            return 1
        return 0
    if args.kustomized:
        n = c.check_kustomized(args.kustomized)
        for e in c.errors:
            print(f"FAIL {e}", file=sys.stderr)
        if c.errors:
            return 1
        print(f"check_deploy: kustomize build ok ({n} objects, namespace {c.obj('kustomization.yaml', 'Kustomization')['namespace']})")
        return 0
    c.run_all()
    for e in c.errors:
        print(f"FAIL {e}", file=sys.stderr)
    if c.errors:
        print(f"check_deploy: {len(c.errors)} check(s) failed, {c.passed} passed", file=sys.stderr)
        return 1
    kinds = getattr(c, "kinds", {})
    extra = sorted(n for n, k in kinds.items() if k != "native")
    print(f"check_deploy: {c.passed} checks passed (cross-file consistency, Dockerfile; non-native files: {', '.join(extra)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
