#!/usr/bin/env python3
"""Merge elb-exporter's prometheus-adapter rules into an existing adapter ConfigMap (CCE: user-adapter-config).

    kubectl -n monitoring get configmap user-adapter-config -o json \\
      | python3 deploy/adapter/merge-adapter-rules.py deploy/adapter/elb-exporter-rules.yaml \\
      | kubectl replace -f -

Reads the ConfigMap (JSON or YAML) on stdin, prints it with the snippet's rules merged into `rules:` of its
config.yaml. Every other key and every other rule is kept. Idempotent: a rule with the same seriesQuery as one
of the snippet's (an earlier merge) is replaced in place. The output keeps metadata.resourceVersion, so
`kubectl replace` fails instead of overwriting a change made in between; run it again then.

Refuses (exit 1, nothing printed) while another rule would publish the same metric names - the practice guide's
`huaweicloud_sys_elb_(.*)` -> `elb01_${1}` rule for cloudeye-exporter: two rules for one metric make the adapter's
answer depend on rule order. Remove that rule first (docs/DEPLOY.md, "Migrating from the practice guide").

Needs PyYAML (Debian/Ubuntu: python3-yaml; pip: pyyaml). Comments inside config.yaml are not preserved.
"""

import json
import sys

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("merge-adapter-rules: PyYAML is missing (apt-get install python3-yaml, or pip install pyyaml)")

CONFIG_KEY = "config.yaml"


class MergeError(Exception):
    pass


def _names(rule):
    name = rule.get("name") or {}
    return str(name.get("matches", "")), str(name.get("as", ""))


def _overlaps(rule, ours):
    """True when `rule` (not one of ours) publishes metric names that one of `ours` publishes too."""
    matches, as_ = _names(rule)
    for o in ours:
        o_matches, o_as = _names(o)
        prefix = o_as.split("$", 1)[0]
        if (matches and matches == o_matches) or (prefix and as_.startswith(prefix)):
            return True
    return False


def merge_config(config_text, snippet_rules):
    """Returns the new config.yaml text: `snippet_rules` merged into the `rules:` of `config_text`."""
    config = yaml.safe_load(config_text) if config_text else None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise MergeError(f"{CONFIG_KEY} is not a mapping")
    rules = config.get("rules") or []
    if not isinstance(rules, list):
        raise MergeError(f"{CONFIG_KEY}: `rules` is not a list")
    ours = {r["seriesQuery"]: r for r in snippet_rules}
    merged, placed = [], set()
    for i, rule in enumerate(rules):
        sq = rule.get("seriesQuery") if isinstance(rule, dict) else None
        if sq in ours:
            if sq not in placed:
                merged.append(ours[sq])
                placed.add(sq)
            continue
        if isinstance(rule, dict) and _overlaps(rule, snippet_rules):
            matches, as_ = _names(rule)
            raise MergeError(
                f"{CONFIG_KEY}: rules[{i}] (seriesQuery {sq!r}, name {matches!r} -> {as_!r}) publishes the same "
                "metric names as elb-exporter's rules - the practice guide's rule for cloudeye-exporter? "
                "Remove it (and cloudeye-exporter) first: docs/DEPLOY.md, 'Migrating from the practice guide'")
        merged.append(rule)
    merged.extend(r for sq, r in ours.items() if sq not in placed)
    config["rules"] = merged
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1000)


def load_snippet(path):
    with open(path, encoding="utf-8") as f:
        snippet = yaml.safe_load(f)
    rules = (snippet or {}).get("rules") if isinstance(snippet, dict) else None
    if not isinstance(rules, list) or not rules:
        raise MergeError(f"{path}: no `rules:` list")
    for i, r in enumerate(rules):
        if not isinstance(r, dict) or not r.get("seriesQuery"):
            raise MergeError(f"{path}: rules[{i}] has no seriesQuery")
    return rules


def merge_configmap(cm, snippet_rules):
    if not isinstance(cm, dict) or cm.get("kind") != "ConfigMap":
        raise MergeError("stdin is not a ConfigMap (kubectl get configmap NAME -o json)")
    data = cm.setdefault("data", {}) or {}
    cm["data"] = data
    data[CONFIG_KEY] = merge_config(data.get(CONFIG_KEY, ""), snippet_rules)
    return cm


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        rules = load_snippet(argv[1])
        cm = yaml.safe_load(sys.stdin.read())
        out = merge_configmap(cm, rules)
    except (MergeError, OSError, yaml.YAMLError) as e:
        print(f"merge-adapter-rules: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
