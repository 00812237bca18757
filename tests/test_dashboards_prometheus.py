"""The dashboards and rules against a real Prometheus server scraping two daemons.

Two `profilerd serve` processes with their own runtime and data directories stand in for two
nodes: node-a without GPUs, node-b on the simulated NVML library (three GPUs). CPU workloads run
under `profilerd run`: examples/data_starved.py as rank 0 of job "starved" on node-a, and
examples/compute_bound.py as job "compute" on node-b. This test process is rank 1 of "starved"
on node-b and holds its GPU 0 (see StandInRank: a simulated GPU can only be attributed to a
process that exists before the daemon starts), so "starved" spans both nodes.

Prometheus (the Debian package's binary, run directly on loopback with a private config and
storage) scrapes both daemons every second and evaluates the production rule files, unmodified,
every second. No `for:` needs shortening: an alert is "pending" as soon as its expression holds.
The test then resolves the dashboards' template variables and evaluates every panel expression,
every variable query and every recording rule through the HTTP API, asserting each has series.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from profilerd.gpu.simnvml import build_library
from tests.conftest import EXAMPLES, REPO
from tests.test_dashboards import (
    FAST_RULES,
    RULE_FILES,
    Node,
    Query,
    StandInRank,
    all_panels,
    clean_env,
    dashboards,
    gpu_scenario,
    http_get,
    make_node,
    panel_queries,
    recording_rules,
    short_dir,
    stop_process,
    substitute,
    wait_until,
)

pytestmark = pytest.mark.slow

SCRAPE_JOB = "profilerd"
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval would be with 1 s scrapes, rounded up
WORKLOAD_SECONDS = "120"  # longer than the test; the workloads are stopped at the end
PROFILERD_RUN = (sys.executable, "-m", "profilerd", "run", "--no-status", "--", sys.executable)


@dataclass
class PrometheusServer:
    """`prometheus` on 127.0.0.1 with its own config and storage; stopped by stop()."""

    binary: str
    root: Path
    targets: list[str]
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.root / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def start(self) -> PrometheusServer:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [
                {"job_name": SCRAPE_JOB, "honor_labels": True, "static_configs": [{"targets": self.targets}]}
            ],
        }
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        for _attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port = _free_port()
            with (self.root / "prometheus.log").open("wb") as log:
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={self.root / 'prometheus.yml'}",
                        f"--storage.tsdb.path={self.root / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=warn",
                    ],
                    cwd=self.root,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if wait_until(self._ready_or_exited, 30.0, "Prometheus to be ready") == "ready":
                return self
        raise AssertionError(f"Prometheus did not start:\n{self.log()}")

    def _ready_or_exited(self) -> str | None:
        assert self.process is not None
        if self.process.poll() is not None:
            return "exited"
        try:
            http_get(f"{self.url}/-/ready", timeout_s=1.0)
        except (OSError, urllib.error.HTTPError):
            return None
        return "ready"

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        document = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert document["status"] == "success", document
        return document["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            return self.api("query", query=expr)["result"]
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse or evaluate
            raise AssertionError(f"Prometheus rejected {expr!r}: {exc.read().decode()}") from exc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _grafana_regex(values: list[str]) -> str:
    """A multi-value selection as Grafana writes it into a Prometheus regex matcher."""
    escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def resolve_variables(server: PrometheusServer, dashboard: dict[str, Any], chosen: dict[str, str]) -> dict[str, str]:
    """Each query variable's values from Prometheus, in order, as Grafana would: a variable in
    `chosen` takes that value (it must be offered), the others "All"."""
    values = {"__rate_interval": RATE_INTERVAL}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = substitute(match.group(1), values), match.group(2)
        offered = server.api(f"label/{label}/values", **{"match[]": selector})
        assert offered, f"variable ${variable['name']} offers nothing ({variable['definition']})"
        name = variable["name"]
        if name in chosen:
            assert chosen[name] in offered, f"${name} offers {offered}, not {chosen[name]!r}"
            values[name] = _grafana_regex([chosen[name]])
        else:
            values[name] = variable.get("allValue") or _grafana_regex(sorted(offered))
    return values


def alerts(server: PrometheusServer) -> list[dict[str, Any]]:
    return server.api("alerts")["alerts"]


def active(server: PrometheusServer, name: str, **labels: str) -> list[dict[str, Any]]:
    return [
        a
        for a in alerts(server)
        if a["labels"]["alertname"] == name and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


@dataclass
class Cluster:
    prometheus: PrometheusServer
    node_a: Node
    node_b: Node
    workloads: dict[str, subprocess.Popen[bytes]]
    root: Path

    def diagnostics(self) -> str:
        parts = [f"--- prometheus\n{self.prometheus.log()}"]
        for node in (self.node_a, self.node_b):
            parts.append(f"--- daemon {node.name}\n{node.log()[-3000:]}")
        for name in self.workloads:
            path = self.root / f"{name}.log"
            parts.append(f"--- workload {name}\n{path.read_text(errors='replace')[-3000:] if path.exists() else ''}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def sim_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc) to build the simulated NVML library")
    return build_library(tmp_path_factory.mktemp("simnvml"))


@pytest.fixture
def cluster(sim_nvml: Path) -> Iterator[Cluster]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`, which .ci/run installs)")
    root = short_dir()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        rules_file = root / "rules.toml"
        rules_file.write_text(FAST_RULES)
        env = clean_env()
        node_a = make_node("node-a", root, env)
        node_b = make_node(
            "node-b",
            root,
            env,
            PROFILERD_NVML_LIBRARY=str(sim_nvml),
            SIMNVML_SCENARIO=str(gpu_scenario(root / "scenario.txt")),
        )
        for node, extra in ((node_a, ["--gpu", "none"]), (node_b, [])):
            stack.callback(node.stop)
            node.start("--rules", str(rules_file), *extra)
        prometheus = PrometheusServer(binary, root, [node_a.address, node_b.address])
        stack.callback(prometheus.stop)
        prometheus.start()

        # The stand-in: rank 1 of "starved" on node-b, on its GPU 0. It steps 10 ms five times a
        # second, so that it adds little step time and the job's data wait is rank 0's doing.
        stand_in = StandInRank(node_b, "starved", 1, 2, comm_s=0.001, step_s=0.01, every_s=0.2)
        stack.callback(stand_in.stop)
        stand_in.start()
        for node in (node_a, node_b):
            node.send(b"XX\x01\x02")  # an unreadable datagram: a dropped message on each node

        workloads: dict[str, subprocess.Popen[bytes]] = {}
        for name, node, script, extra_env in (
            ("starved", node_a, "data_starved.py", {"RANK": "0", "WORLD_SIZE": "2"}),
            ("compute", node_b, "compute_bound.py", {"OMP_NUM_THREADS": "1"}),
        ):
            with (root / f"{name}.log").open("wb") as log:
                process = subprocess.Popen(
                    [*PROFILERD_RUN, str(EXAMPLES / script), "--seconds", WORKLOAD_SECONDS],
                    env={**node.env, "PROFILERD_JOB_ID": name, **extra_env},
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            # SIGTERM reaches the training child through `profilerd run`; SIGKILL, the group.
            stack.callback(stop_process, process, 30.0, group=True)
            workloads[name] = process
        yield Cluster(prometheus, node_a, node_b, workloads, root)


def test_dashboards_and_rules_against_a_real_prometheus(cluster: Cluster) -> None:
    prometheus = cluster.prometheus
    try:
        _check(cluster, prometheus)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.diagnostics()}") from exc


def _check(cluster: Cluster, prometheus: PrometheusServer) -> None:
    # Both daemons are scraped cleanly (honor_labels keeps the training job's label).
    def targets_up() -> bool:
        targets = prometheus.api("targets")["activeTargets"]
        return len(targets) == 2 and all(t["health"] == "up" and not t["lastError"] for t in targets)

    wait_until(targets_up, 15.0, "both daemons to be scraped")

    # The data-starved workload makes the data-starved alert go pending (or firing).
    wait_until(
        lambda: active(prometheus, "ProfilerdJobDataStarved", job="starved"),
        60.0,
        "ProfilerdJobDataStarved to go pending for job starved",
        interval_s=0.5,
    )

    # Every dashboard panel expression, with its template variables resolved from the server.
    selections = {"profilerd-jobs.json": {"job": "starved"}, "profilerd-node-gpus.json": {}}
    queries: list[Query] = []
    for name, dashboard in dashboards().items():
        values = resolve_variables(prometheus, dashboard, selections[name])
        for query in panel_queries(dashboard, name):
            queries.append(Query(query.where, substitute(query.expr, values)))
    # Every recording rule, by its recorded series: it was evaluated and produced something.
    for rule in recording_rules():
        queries.append(Query(f"recording rule {rule['record']}", rule["record"]))

    def empty() -> list[Query]:
        return [q for q in queries if not prometheus.query(q.expr)]

    missing: list[Query] = []
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        missing = empty()
        if not missing:
            break
        time.sleep(1.0)
    assert not missing, "no series for:\n" + "\n".join(f"{q.where}: {q.expr}" for q in missing)
    assert len(queries) > 60
    assert {p["type"] for name in dashboards() for p in all_panels(dashboards()[name])} >= {
        "timeseries",
        "state-timeline",
        "table",
    }

    # Every rule evaluates without error on real data (no many-to-many matches, no bad joins).
    for group in prometheus.api("rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"

    # The job-wide view spans both nodes; the stand-in rank holds GPU 0 of node-b.
    nodes = {s["metric"]["instance"] for s in prometheus.query('profilerd_step_duration_seconds_count{job="starved"}')}
    assert nodes == {cluster.node_a.address, cluster.node_b.address}
    scores = prometheus.query('job_instance_rank:profilerd_straggler:score5m{job="starved"}')
    assert {s["metric"]["rank"] for s in scores} == {"0", "1"}
    phases = prometheus.query('job_phase:profilerd_step_phase:ratio_rate5m{job="starved"}')
    assert sum(float(s["value"][1]) for s in phases) == pytest.approx(1.0)

    # The other alerts tell the two jobs apart: "compute" is not data-starved but leaves node-b's
    # unclaimed GPU idle; "starved" holds a busy GPU. node-b's GPUs report thermal throttling
    # (the simulated default) and GPU 0 an XID error.
    assert not active(prometheus, "ProfilerdJobDataStarved", job="compute")
    wait_until(
        lambda: active(prometheus, "ProfilerdGpuIdleWhileTraining", job="compute"),
        20.0,
        "ProfilerdGpuIdleWhileTraining for job compute",
        interval_s=0.5,
    )
    assert not active(prometheus, "ProfilerdGpuIdleWhileTraining", job="starved")
    assert active(prometheus, "ProfilerdGpuThermalThrottling", instance=cluster.node_b.address, gpu="0")
    assert active(prometheus, "ProfilerdGpuXidError", instance=cluster.node_b.address, gpu="0")
    assert not active(prometheus, "ProfilerdDaemonDown")
    for name, process in cluster.workloads.items():
        assert process.poll() is None, f"workload {name} ended early with {process.returncode}"
