"""Checks of the deploy kit; run by deploy/validate, which provides the virtualenv.

Each check prints one line, `ok` or `FAIL` followed by what is wrong; the exit status is 1 if any
check failed. What is checked, and against what:

- Dockerfile: parsed with Docker's own parser (PyPI `dockerfile`) and linted with hadolint;
  one stage per binary of services/*/Cargo.toml, a `cargo build --release --locked`.
- compose files: the Compose Specification schema (as vendored by PyPI `check-jsonschema`),
  build targets and image names against the Dockerfile's stages, health-check routes, settings
  that services must share.
- Kubernetes manifests: kubernetes-validate's bundled schemas (strict: unknown fields are
  errors), images against the Dockerfile, probe routes and ports against the services' code
  and configs, secretKeyRefs against secrets.example.yaml, replica rules, kustomization.yaml.
- alert rules and the Grafana dashboard: structure, every PromQL expression parsed (PyPI
  `promql-parser`), every metric name found in the services' sources.

Whether each FEEDLOOP_* variable and ConfigMap loads into its service's config struct is
checked by the Rust test services/feedloop/tests/deploy_config.rs (it needs a build).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import dockerfile
import jsonschema
import kubernetes_validate.utils as kv
import promql_parser
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# A Kubernetes release kubernetes-validate 1.37 bundles schemas for (1.25 to 1.37).
K8S_VERSION = "1.34"
SERVICES = ("registry", "collector", "cdc", "labeler", "eraser", "trigger")
# Images built from deploy/Dockerfile are named feedloop/<stage>:<tag>.
OWN_IMAGE = re.compile(r"^feedloop/(?P<stage>[a-z0-9-]+):[\w.-]+$")
ENV_NAME = re.compile(r"^FEEDLOOP_[A-Z0-9_]+(__[A-Z0-9_]+)+$")
# Grafana's variables, replaced by plausible values before parsing an expression.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
GROUP_KEYS = {"name", "interval", "rules", "limit", "query_offset", "labels"}

failures = 0


def check(title: str, fn: Callable[[], Iterable[str]]) -> None:
    """Runs `fn`, which yields problems; prints `ok` or `FAIL` with them."""
    global failures
    try:
        problems = list(fn())
    except Exception as e:  # a check that cannot run is a failed check
        problems = [f"{type(e).__name__}: {e}"]
    if problems:
        failures += 1
        print(f"FAIL  {title}")
        for p in problems:
            print(f"        - {p}")
    else:
        print(f"ok    {title}")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --- what the sources say -------------------------------------------------------------------


def binaries() -> set[str]:
    """The [[bin]] names of the workspace's service crates."""
    names = set()
    for manifest in sorted((ROOT / "services").glob("*/Cargo.toml")):
        names |= {b["name"] for b in tomllib.loads(manifest.read_text()).get("bin", [])}
    return names


def source_metric_names() -> set[str]:
    """Every "feedloop_…" string literal of the services' sources (the CLI exports none)."""
    names = set()
    for src in (ROOT / "services").glob("*/src/**/*.rs"):
        if src.parts[len(ROOT.parts) + 1] == "feedloop":
            continue
        names |= set(re.findall(r'"(feedloop_[a-z0-9_]+)"', src.read_text()))
    return names


def distributions_are_summaries() -> bool:
    """The recorder renders histogram! as a summary unless buckets are configured."""
    telemetry = (ROOT / "services/core/src/telemetry.rs").read_text()
    return "set_buckets" not in telemetry


def service_routes(service: str) -> set[str]:
    """The operational routes a service serves: every one has /healthz and /metrics
    (feedloop_core::http::ops_routes); /readyz only where its code routes it (its own, or
    feedloop_core::http::postgres_readyz)."""
    routes = {"/healthz", "/metrics"}
    code = "".join(p.read_text() for p in (ROOT / "services" / service / "src").glob("**/*.rs"))
    if '"/readyz"' in code or "http::postgres_readyz(" in code:
        routes.add("/readyz")
    return routes


def service_defaults(service: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / "services" / service / "default.toml").read_text())


def env_section_problems(where: str, service: str, name: str) -> list[str]:
    """A quick look at a FEEDLOOP_ variable: well formed, and its section is one the service
    has. (The Rust test loads the whole config.)"""
    if not ENV_NAME.match(name):
        return [f"{where}: {name} is not FEEDLOOP_<SECTION>__<KEY>"]
    section = name.removeprefix("FEEDLOOP_").split("__")[0].lower()
    if section not in service_defaults(service):
        return [f"{where}: {name}: {service} has no [{section}] section"]
    return []


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[dockerfile.Command]]:
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for cmd in dockerfile.parse_file(str(DEPLOY / "Dockerfile")):
        if cmd.cmd == "FROM":
            current = []
            value = cmd.value
            if len(value) == 3 and value[1].upper() == "AS":
                stages[value[2]] = current
        current.append(cmd)
    return stages


def check_dockerfile() -> Iterable[str]:
    stages = dockerfile_stages()
    commands = list(dockerfile.parse_file(str(DEPLOY / "Dockerfile")))
    args = dict(a.value[0].split("=", 1) for a in commands if a.cmd == "ARG" and "=" in a.value[0])
    if args.get("RUST_IMAGE") != "rust:1.95-bookworm":
        yield f"the builder should be rust:1.95-bookworm, not {args.get('RUST_IMAGE')}"
    builds = [c.original for c in stages.get("builder", []) if c.cmd == "RUN" and "cargo build" in c.original]
    if not builds:
        yield "the builder stage runs no cargo build"
    for b in builds:
        for flag in ("--release", "--locked"):
            if flag not in b:
                yield f"cargo build without {flag}"
    for binary in sorted(binaries()):
        stage = stages.get(binary)
        if stage is None:
            yield f"binary {binary} has no stage `{binary}`"
            continue
        entry = [c for c in stage if c.cmd == "ENTRYPOINT"]
        if not entry or entry[-1].value[0] != f"/usr/local/bin/{binary}":
            yield f"stage {binary}: ENTRYPOINT should be /usr/local/bin/{binary}"
        if not any(f"target/release/{binary}" in b for b in builds):
            yield f"binary {binary} is not copied out of the build"
    users = [c.value[0] for c in stages.get("runtime", []) if c.cmd == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        yield "the runtime stage should end as a non-root USER"


def check_hadolint() -> Iterable[str]:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), "--no-color", str(DEPLOY / "Dockerfile")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        yield from (done.stdout + done.stderr).strip().splitlines()


# --- compose --------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    schema = (resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json")
    return json.loads(schema.read_text())


def schema_problems(doc: Any, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))]


def check_compose_schema(path: Path) -> Callable[[], Iterable[str]]:
    return lambda: schema_problems(yaml.safe_load(path.read_text()), compose_schema())


def env_map(env: Any) -> dict[str, str]:
    if isinstance(env, list):
        return dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in (env or {}).items()}


def check_compose_kit() -> Iterable[str]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    stages = dockerfile_stages()
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        if build.get("context") != ".." or build.get("dockerfile") != "deploy/Dockerfile":
            yield f"{name}: build should be {{context: .., dockerfile: deploy/Dockerfile}}"
        target = build.get("target")
        if target not in stages:
            yield f"{name}: build target {target!r} is not a stage of deploy/Dockerfile"
        m = OWN_IMAGE.match(svc.get("image", ""))
        if not m or m["stage"] != target:
            yield f"{name}: image should be feedloop/{target}:<tag>, not {svc.get('image')!r}"
        for dep in svc.get("depends_on", {}):
            if dep not in services:
                yield f"{name}: depends on unknown service {dep}"
    for name in SERVICES:
        svc = services.get(name)
        if svc is None:
            yield f"service {name} is missing"
            continue
        env = env_map(svc.get("environment"))
        for var in env:
            if var.startswith("FEEDLOOP_"):
                yield from env_section_problems(f"compose {name}", name, var)
        listen = env.get("FEEDLOOP_HTTP__LISTEN", "")
        port = listen.rsplit(":", 1)[-1]
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:2] != ["CMD", "http-probe"] or len(test) != 4:
            yield f"{name}: the health check should be [CMD, http-probe, PORT, PATH]"
        else:
            if test[2] != port:
                yield f"{name}: the health check probes port {test[2]}, the service listens on {listen!r}"
            if test[3] not in service_routes(name):
                yield f"{name}: the health check probes {test[3]}, which {name} does not serve"
    yield from shared_settings(
        "compose", {n: env_map(services[n].get("environment")) for n in SERVICES if n in services},
        lambda env, name: {k.split("__", 1)[1].lower(): v for k, v in env.items()
                           if k.startswith(f"FEEDLOOP_{name.upper()}__")})
    mounts = {n: [v for v in services[n].get("volumes", []) if v.endswith(":/var/lib/feedloop/datasets")]
              for n in ("labeler", "eraser")}
    if mounts["labeler"] != mounts["eraser"] or not mounts["labeler"]:
        yield f"labeler and eraser must mount the same datasets volume: {mounts}"


# Settings services share, which must be equal: (section, keys or None for all, services).
SHARED = (("keys", None, ("collector", "cdc", "eraser")),
          ("state", None, ("labeler", "eraser")),
          ("datasets", ("root", "options"), ("labeler", "eraser")))


def env_value(raw: str, default: Any) -> Any:
    """A variable's value typed like the default it replaces (as the config loader does)."""
    if isinstance(default, str):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def shared_settings(where: str, configs: dict[str, Any],
                    section: Callable[[Any, str], dict[str, Any]]) -> Iterable[str]:
    """The data-key store (collector, cdc, eraser), the join-state store and the dataset root
    (labeler, eraser) must be the same for every service that uses them: compared in effect,
    each service's defaults overlaid with what the kit sets. `section(config, name)` gives
    what the kit sets for a service in section `name`, by lower-case key."""
    for name, keys, owners in SHARED:
        values = {}
        for o in owners:
            if o not in configs:
                continue
            effective = dict(service_defaults(o).get(name, {}))
            for k, v in section(configs[o], name).items():
                effective[k] = env_value(v, effective.get(k)) if isinstance(v, str) else v
            values[o] = {k: v for k, v in effective.items() if keys is None or k in keys}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            yield f"{where}: [{name}] differs between {', '.join(values)}: {values}"


# --- Kubernetes -----------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def check_k8s_schemas() -> Iterable[str]:
    for path in k8s_files():
        for doc in yaml_docs(path):
            where = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                kv.validate(doc, K8S_VERSION, strict=True)
            except kv.ValidationError as e:
                yield f"{where}: {'.'.join(map(str, e.path))}: {e.message}"
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError, kv.VersionNotSupportedError) as e:
                yield f"{where}: {e.message}"


def check_kustomization() -> Iterable[str]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in k8s_files()}
    # The Secret is applied by hand, with real values (see secrets.example.yaml).
    expected = present - {"secrets.example.yaml"}
    for missing in sorted(expected - listed):
        yield f"kustomization.yaml does not list {missing}"
    for extra in sorted(listed - present):
        yield f"kustomization.yaml lists {extra}, which does not exist"
    if "secrets.example.yaml" in listed:
        yield "kustomization.yaml must not apply the placeholder Secret"


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in k8s_files() for doc in yaml_docs(path)]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def check_k8s_kit() -> Iterable[str]:
    objects = k8s_objects()
    stages = dockerfile_stages()
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    secret = next(o for o in yaml_docs(K8S / "secrets.example.yaml") if o["kind"] == "Secret")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    configs: dict[str, dict[str, Any]] = {}
    seen = set()
    for w in workloads(objects):
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"]:
            where = f"{w['kind']}/{name} container {c['name']}"
            m = OWN_IMAGE.match(c["image"])
            if not m or m["stage"] not in stages:
                yield f"{where}: image {c['image']} is not feedloop/<Dockerfile stage>:<tag>"
                continue
            service = m["stage"]
            seen.add(service)
            config = None
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    cm = config_maps.get(v["configMap"]["name"])
                    if cm is None:
                        yield f"{where}: ConfigMap {v['configMap']['name']} is not in the kit"
                    else:
                        config = tomllib.loads(cm["data"]["config.toml"])
            if config is None:
                yield f"{where}: no config.toml ConfigMap mounted"
                continue
            configs[service] = config
            defaults = service_defaults(service)
            for section in config:
                if section not in defaults:
                    yield f"{where}: its ConfigMap has [{section}], which {service} does not know"
            if c.get("args") != ["--config", "/etc/feedloop/config.toml"]:
                yield f"{where}: args should be --config /etc/feedloop/config.toml"
            for e in c.get("env", []):
                if e["name"].startswith("FEEDLOOP_"):
                    yield from env_section_problems(where, service, e["name"])
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and (ref["name"] != secret["metadata"]["name"] or ref["key"] not in secret_keys):
                    yield f"{where}: {e['name']} refers to {ref}, not a key of secrets.example.yaml"
            port = int(config["http"]["listen"].rsplit(":", 1)[-1])
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if ports.get("http") != port:
                yield f"{where}: containerPort `http` should be {port} (http.listen)"
            annotations = w["spec"]["template"]["metadata"].get("annotations", {})
            if annotations.get("prometheus.io/port") != str(port):
                yield f"{where}: prometheus.io/port should be {port}"
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = c.get(probe, {}).get("httpGet")
                if get is None:
                    yield f"{where}: no {probe} (httpGet)"
                    continue
                if get["path"] not in service_routes(service):
                    yield f"{where}: {probe} on {get['path']}, which {service} does not serve"
                if get["port"] not in ("http", port):
                    yield f"{where}: {probe} on port {get['port']}"
            if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
                yield f"{where}: resource requests and limits are required"
        selector = w["spec"]["selector"]["matchLabels"]
        if not any(o["kind"] == "PodDisruptionBudget" and o["spec"]["selector"]["matchLabels"] == selector
                   for o in objects):
            yield f"{w['kind']}/{name}: no PodDisruptionBudget"
        if not any(o["kind"] == "Service" and o["spec"].get("selector") == selector for o in objects):
            yield f"{w['kind']}/{name}: no Service"
    for service in SERVICES:
        if service not in seen:
            yield f"no workload runs {service}"
    by_name = {w["metadata"]["name"]: w for w in workloads(objects)}
    # One replication slot; per-dataset locks; an uncoordinated erasure worker (see the files).
    for single in ("cdc", "labeler", "eraser"):
        w = by_name.get(single, {})
        if w.get("spec", {}).get("replicas") != 1 or w["spec"].get("strategy", {}).get("type") != "Recreate":
            yield f"{single} must run replicas: 1 with strategy Recreate"
    yield from shared_settings("k8s", configs, lambda cfg, name: cfg.get(name, {}))
    for key in ("kafka", "registry"):
        values = {s: c.get(key, {}).get("bootstrap" if key == "kafka" else "url")
                  for s, c in configs.items() if key in c}
        if len(set(values.values())) > 1:
            yield f"k8s: [{key}] differs between services: {values}"


# --- metrics: alert rules and the dashboard -------------------------------------------------


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def metric_problems(where: str, expr: str, known: set[str], allowed_missing: set[str]) -> list[str]:
    """Parses `expr`; every metric it selects must be exported (a summary's _sum and _count
    included). Names in `allowed_missing` are ones a rule declares it needs."""
    try:
        names = metric_names(expr)
    except Exception as e:
        return [f"{where}: does not parse as PromQL: {e}"]
    problems = []
    summaries = distributions_are_summaries()
    if summaries and "histogram_quantile" in expr:
        problems.append(f"{where}: histogram_quantile, but the services export summaries (use quantile=)")
    for name in sorted(names):
        base = re.sub(r"_(sum|count|bucket)$", "", name)
        if summaries and name.endswith("_bucket") and base in known:
            problems.append(f"{where}: {name}: the services export summaries, which have no _bucket series")
        elif name in known or base in known:
            if name in allowed_missing:
                problems.append(f"{where}: {name} exists now: drop the rule's requires_metric")
        elif name not in allowed_missing:
            problems.append(f"{where}: {name} is not a metric of the services (services/*/src)")
    return problems


def check_alerts() -> Iterable[str]:
    doc = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    known = source_metric_names()
    if set(doc) != {"groups"}:
        yield f"top level: expected only `groups`, found {sorted(doc)}"
    group_names, alert_names = set(), set()
    for group in doc.get("groups", []):
        gname = group.get("name")
        if not gname or gname in group_names:
            yield f"group {gname!r}: a unique name is required"
        group_names.add(gname)
        if set(group) - GROUP_KEYS:
            yield f"group {gname}: unknown keys {sorted(set(group) - GROUP_KEYS)}"
        if not group.get("rules"):
            yield f"group {gname}: no rules"
        for rule in group.get("rules", []):
            alert = rule.get("alert")
            where = f"{gname}/{alert}"
            if set(rule) - RULE_KEYS:
                yield f"{where}: unknown keys {sorted(set(rule) - RULE_KEYS)}"
            if not alert or not re.fullmatch(r"[A-Z][A-Za-z0-9]+", alert) or alert in alert_names:
                yield f"{where}: a unique CamelCase `alert` name is required"
            alert_names.add(alert)
            if not isinstance(rule.get("expr"), str):
                yield f"{where}: `expr` must be a PromQL string"
                continue
            if "for" in rule:
                try:
                    promql_parser.parse_duration(str(rule["for"]))
                except Exception:
                    yield f"{where}: `for: {rule['for']}` is not a duration"
            labels, annotations = rule.get("labels", {}), rule.get("annotations", {})
            if labels.get("severity") not in ("warning", "critical"):
                yield f"{where}: labels.severity must be warning or critical"
            for key in ("summary", "description"):
                if not annotations.get(key):
                    yield f"{where}: annotations.{key} is required"
            # "name: what it is…": a metric this rule needs and the services lack.
            requires = annotations.get("requires_metric", "")
            needed = {requires.split(":")[0].strip()} if requires else set()
            yield from metric_problems(where, rule["expr"], known, needed)


def check_dashboard() -> Iterable[str]:
    dash = json.loads((DEPLOY / "grafana/feedloop.json").read_text())
    known = source_metric_names()
    ids = set()
    panels = [p for top in dash["panels"] for p in [top, *top.get("panels", [])]]
    if not any(p.get("targets") for p in panels):
        yield "no panel queries anything"
    for panel in panels:
        if panel["id"] in ids:
            yield f"panel id {panel['id']} is used twice"
        ids.add(panel["id"])
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} {target['refId']}"
            if target.get("datasource", {}).get("uid") != "${datasource}":
                yield f"{where}: use the ${{datasource}} variable"
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            yield from metric_problems(where, expr, known, set())


def main() -> int:
    check("Dockerfile: a stage per binary, cargo build --release --locked, non-root", check_dockerfile)
    check("Dockerfile: hadolint", check_hadolint)
    for name in ("compose.yaml", "compose.scylla.yaml"):
        check(f"{name}: Compose Specification schema", check_compose_schema(DEPLOY / name))
    check("compose.yaml: build targets, images, health checks, shared settings", check_compose_kit)
    check(f"k8s: kubernetes-validate --strict, Kubernetes {K8S_VERSION}", check_k8s_schemas)
    check("k8s: kustomization.yaml resources", check_kustomization)
    check("k8s: images, configs, probes, ports, secrets, budgets, replicas", check_k8s_kit)
    check("prometheus/alerts.yaml: rule structure, PromQL, metric names", check_alerts)
    check("grafana/feedloop.json: panels, PromQL, metric names", check_dashboard)
    if failures:
        print(f"{failures} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
