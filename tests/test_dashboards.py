"""The Grafana dashboards and Prometheus rules in dashboards/, tested like code.

- the dashboard JSON: generated from dashboards/generate.py and up to date, importable into
  Grafana 10+ (structure, unique ids, every datasource templated, every variable defined);
- every expression in dashboards and rules parses (promtool), and every metric and label it
  names exists in the exporter: the set is a live scrape of a daemon on the simulated NVML
  library with a probed rank, plus the GPU family descriptions;
- `promtool check metrics` on that live scrape is clean;
- `promtool check rules`, and `promtool test rules` unit tests in which every alert fires and
  does not fire; every alert carries a for:, a severity, a summary, a description and a runbook
  link that exists in docs/alerts.md.

tests/test_dashboards_prometheus.py evaluates all of it in a real Prometheus server scraping two daemons.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from profilerd.exporters.gpu_metrics import CLOCK_EVENT_REASONS, describe_gpu_metric_families
from profilerd.exporters.prometheus import PHASE_LABELS
from profilerd.gpu.simnvml import GIB, Scenario, build_library
from profilerd.vocabulary import PRIMARY_VALUES
from profilerd_dashboards import DOCS_BASE_URL
from profilerd_probes import wire
from tests.conftest import REPO
from tests.wire_helpers import step_datagram

DASHBOARDS = REPO / "dashboards"
GRAFANA = DASHBOARDS / "grafana"
PROMETHEUS = DASHBOARDS / "prometheus"
RECORDING_RULES = PROMETHEUS / "profilerd-rules.yml"
ALERT_RULES = PROMETHEUS / "profilerd-alerts.yml"
RULE_FILES = (RECORDING_RULES, ALERT_RULES)
RULE_TESTS = (PROMETHEUS / "tests" / "profilerd-rules.test.yml", PROMETHEUS / "tests" / "profilerd-alerts.test.yml")
ALERTS_DOC = REPO / "docs" / "alerts.md"

# The alerts issue 8 asks for, by what they detect.
REQUIRED_ALERTS = {
    "GPU idle while a job trains": "ProfilerdGpuIdleWhileTraining",
    "a data-starved job": "ProfilerdJobDataStarved",
    "a communication-bound job": "ProfilerdJobCommunicationBound",
    "a straggler rank": "ProfilerdStragglerRank",
    "GPU memory near full": "ProfilerdGpuMemoryNearFull",
    "thermal throttling": "ProfilerdGpuThermalThrottling",
    "power throttling": "ProfilerdGpuPowerThrottling",
    "XID errors": "ProfilerdGpuXidError",
    "ECC errors": "ProfilerdGpuEccUncorrectedErrors",
    "probe data dropped": "ProfilerdProbeDataDropped",
    "the daemon down": "ProfilerdDaemonDown",
}
# Grafana's built-in panels in version 10 that the dashboards may use.
GRAFANA_10_PANELS = {"row", "timeseries", "stat", "table", "state-timeline", "bargauge", "gauge", "text"}
# Series Prometheus makes itself rather than scraping them.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
# Label values a selector may name, for labels whose values profilerd fixes.
KNOWN_LABEL_VALUES = {
    "phase": set(PHASE_LABELS.values()),
    "category": set(PRIMARY_VALUES),
    "reason": set(CLOCK_EVENT_REASONS),
    "kind": {"xid", "lost", "recovered"},
}
# Template variables substituted when an expression is checked offline.
OFFLINE_VARIABLES = {"job": ".*", "node": ".*", "rank": ".*", "gpu": ".*", "__rate_interval": "1m"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`, which .ci/run installs)")
    return path


# ------------------------------------------------------------------------------ reading files


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it lives, for error messages."""

    where: str
    expr: str


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(GRAFANA.glob("*.json"))}


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for item in dashboard["panels"]:
        yield item
        yield from item.get("panels", [])


def panel_queries(dashboard: dict[str, Any], name: str) -> list[Query]:
    queries = []
    for item in all_panels(dashboard):
        for target in item.get("targets", []):
            queries.append(Query(f"{name}: panel {item['title']!r} query {target['refId']}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append(Query(f"{name}: annotation {annotation['name']!r}", annotation["expr"]))
    return queries


def variable_queries(dashboard: dict[str, Any], name: str) -> list[Query]:
    return [
        Query(f"{name}: variable ${v['name']}", v["definition"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def recording_rules() -> list[dict[str, Any]]:
    return rules(RECORDING_RULES)


def alert_rules() -> list[dict[str, Any]]:
    return rules(ALERT_RULES)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana template variables ($name or ${name}); an unknown one is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"undefined template variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![\w:.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_METRIC_IN_TEXT = re.compile(r"(?<![\w:])profilerd_[a-z0-9_]+(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """profilerd series and recording-rule names an expression reads (label names and
    functions do not start with profilerd_ and have no colon)."""
    bare = _STRING.sub('""', expr)
    return {name for name in _IDENT.findall(bare) if name.startswith("profilerd_") or ":" in name}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, operator, value)]) for every `metric{...}` in an expression."""
    return [(name, _MATCHER.findall(body)) for name, body in _SELECTOR.findall(expr)]


def every_query() -> list[Query]:
    queries = []
    for name, dashboard in dashboards().items():
        queries += panel_queries(dashboard, name)
        queries += variable_queries(dashboard, name)
    for path in RULE_FILES:
        for rule in rules(path):
            queries.append(Query(f"{path.name}: {rule.get('record') or rule.get('alert')}", rule["expr"]))
    return queries


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ live daemons


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll until predicate() is truthy, or fail naming what did not happen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 15.0, *, group: bool = False) -> None:
    """SIGTERM, then SIGKILL if it has not exited in time. With ``group`` (a process started
    with start_new_session=True), the SIGKILL goes to its whole process group, children too."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(timeout=10)


@dataclass
class Node:
    """A `profilerd serve` process with its own runtime and data directories: one node."""

    name: str
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def runtime_dir(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"])

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "profilerd" / "ingest.sock"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, *args: str, timeout_s: float = 20.0) -> Node:
        """Start the daemon and read its port from daemon.json in its runtime directory."""
        info = self.runtime_dir / "profilerd" / "daemon.json"
        with (self.root / "daemon.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "profilerd", "serve", "--port", "0", *args],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> int:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon {self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                document = json.loads(info.read_text())
            except (OSError, ValueError):
                return 0
            if document.get("pid") != self.process.pid:
                return 0
            try:
                http_get(f"http://127.0.0.1:{document['http_port']}/healthz", timeout_s=1.0)
            except OSError:
                return 0
            return int(document["http_port"])

        self.port = wait_until(ready, timeout_s, f"daemon {self.name} to serve")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def scrape(self) -> str:
        return http_get(f"{self.url}/metrics").decode()

    def send(self, *datagrams: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for datagram in datagrams:
                sock.sendto(datagram, str(self.socket_path))


def make_node(name: str, root: Path, base_env: dict[str, str], **extra: str) -> Node:
    """A node's directories under root/name, and the environment of its daemon and jobs."""
    home = root / name
    runtime = home / "run"
    runtime.mkdir(parents=True, mode=0o700)
    env = dict(base_env)
    env.update(
        {
            "XDG_RUNTIME_DIR": str(runtime),
            "PROFILERD_DATA_DIR": str(home / "data"),
            "PROFILERD_HTTP_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("PROFILERD_SOCKET", None)
    env.update(extra)
    return Node(name, home, env)


def gpu_scenario(path: Path) -> Path:
    """Three simulated GPUs: GPU 0 busy and held by this test process (a stand-in rank), GPU 1
    idle, GPU 2 split into MIG instances; an XID on GPU 0 shortly after start. The defaults of
    GPU_DEFAULTS hold sw_power_cap and sw_thermal clock event reasons."""
    scenario = Scenario(
        gpus=[{}, {"util_gpu": 5, "mem_used": 2 * GIB}, {"mig": 1, "mig_instances": 2}],
        processes=[(0, os.getpid(), 2 * GIB, 40)],
        xids=[(0, 48, 300)],
    )
    return scenario.write(path)


@dataclass
class StandInRank:
    """This test process, posing as one probed training rank: a hello, then a step of step_s
    every every_s seconds (backdated steps first, so the daemon has a window to analyse at once).

    NVML reports processes by PID and the simulated driver reads its process list when the
    daemon starts, before any `profilerd run` child exists; a process that already exists (this
    one) is the only rank the simulated GPU can be attributed to, as in tests/test_gpu_daemon.py.
    """

    node: Node
    job: str
    rank: int
    world_size: int
    data_wait_s: float = 0.0
    comm_s: float = 0.01
    step_s: float = 0.1
    every_s: float = 0.1
    backdated: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _seq: int = 0

    def _step(self, end_unix_s: float) -> bytes:
        self._seq += 1
        busy = self.step_s - self.data_wait_s - self.comm_s
        return step_datagram(
            pid=os.getpid(),
            rank=self.rank,
            seq=self._seq,
            step=self._seq,
            end_unix_s=end_unix_s,
            step_s=self.step_s,
            data_wait_s=self.data_wait_s,
            forward_s=0.3 * busy,
            backward_s=0.5 * busy,
            optimizer_s=0.1 * busy,
            comm_s=self.comm_s,
        )

    def start(self) -> StandInRank:
        hello = {
            "pid": os.getpid(),
            "job": self.job,
            "run_id": f"{self.job}-standin-{self.rank}",
            "rank": self.rank,
            "world_size": self.world_size,
            "hostname": self.node.name,
            "argv": ["stand-in"],
            "started_unix_s": time.time() - self.backdated * self.every_s,
        }
        now = time.time()
        steps = [self._step(now - (self.backdated - i) * self.every_s) for i in range(self.backdated)]
        self.node.send(wire.encode_json(wire.KIND_HELLO, hello), *steps)
        self._thread = threading.Thread(target=self._run, name=f"stand-in rank {self.rank}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.node.send(self._step(time.time()))
            except OSError:
                return  # the daemon is gone: the test is ending

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@pytest.fixture(scope="session")
def sim_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc) to build the simulated NVML library")
    return build_library(tmp_path_factory.mktemp("simnvml"))


FAST_RULES = "[evidence]\nmin_steps = 20\nmin_seconds = 2.0\n"


@dataclass(frozen=True)
class Exporter:
    """What the exporter produces: sample names with their label names, and one scrape's text."""

    labels: dict[str, set[str]]
    text: str

    @property
    def names(self) -> set[str]:
        return set(self.labels)


def exporter_from(text: str) -> Exporter:
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for family in describe_gpu_metric_families():
        suffixes = {"counter": ["_total"], "info": ["_info"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            labels.setdefault(family.name + suffix, set())
    return Exporter(labels, text)


@pytest.fixture(scope="module")
def live_exporter(sim_nvml: Path) -> Iterator[Exporter]:
    """One node's daemon on the simulated NVML library, with a data-starved stand-in rank on its
    GPU 0 and one unreadable datagram (a dropped message): every family has series."""
    root = short_dir()
    try:
        rules_file = root / "rules.toml"
        rules_file.write_text(FAST_RULES)
        env = clean_env()
        node = make_node(
            "gpu-node",
            root,
            env,
            PROFILERD_NVML_LIBRARY=str(sim_nvml),
            SIMNVML_SCENARIO=str(gpu_scenario(root / "scenario.txt")),
        )
        node.start("--rules", str(rules_file))
        rank = StandInRank(node, "scrape-job", 0, 1, data_wait_s=0.06, backdated=60)
        try:
            rank.start()
            node.send(b"XX\x01\x02")  # bad magic: counted as dropped
            needles = (
                'profilerd_rank_gpu_info{gpu="0",job="scrape-job"',
                "profilerd_recommendation_estimated_speedup_ratio{",
                "profilerd_gpu_events_total{",
                "profilerd_gpu_mig_instance_memory_used_bytes{",
                "profilerd_gpu_process_sm_utilization_ratio{",
                "profilerd_gpu_sm_active_ratio{",
                "profilerd_gpu_power_average_watts{",
                "profilerd_probe_messages_dropped_total{",
                "profilerd_process_cpu_cores{",
                "profilerd_host_cpu_utilization_ratio{",
            )

            def complete() -> str | None:
                text = node.scrape()
                return text if all(needle in text for needle in needles) else None

            text = wait_until(complete, 20.0, "every family in the daemon's scrape", interval_s=0.2)
            yield exporter_from(text)
        finally:
            rank.stop()
            node.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def short_dir() -> Path:
    """A private directory with a short path (AF_UNIX socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="pd-dash-", dir="/tmp"))


def clean_env() -> dict[str, str]:
    """The environment without anything that would point profilerd at another daemon or job."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("PROFILERD_", "TORCHELASTIC_", "SIMNVML_")) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            del env[key]
    return env


# ------------------------------------------------------------------------------ dashboards


def test_dashboard_files_are_generated_and_up_to_date() -> None:
    generator = load_generator()
    assert set(generator.DASHBOARDS) == {path.name for path in GRAFANA.glob("*.json")}
    for name, build in generator.DASHBOARDS.items():
        assert (GRAFANA / name).read_text() == generator.render(build), (
            f"{name} is out of date: run python dashboards/generate.py"
        )
    for path in generator.ALERT_FILES:
        text = path.read_text()
        assert generator.with_runbook_base(text, generator.DOCS_BASE_URL) == text, (
            f"{path.name}: runbook links out of date: run python dashboards/generate.py"
        )


def test_generator_knows_every_verdict_category_and_phase() -> None:
    """The verdict timeline maps each category to a number and the breakdown colours each
    phase: a category or phase the daemon adds must get one too."""
    generator = load_generator()
    assert set(generator.CATEGORY_CODES) == set(PRIMARY_VALUES)
    assert len(set(generator.CATEGORY_CODES.values())) == len(generator.CATEGORY_CODES)
    assert set(generator.PHASE_COLORS) == set(PHASE_LABELS.values())


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_dashboard_is_importable_into_grafana_10(name: str) -> None:
    dashboard = dashboards()[name]
    assert dashboard["id"] is None, "an exported dashboard must not carry a database id"
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    assert dashboard["schemaVersion"] >= 36  # Grafana 10.0 writes 38
    grafana = next(r for r in dashboard["__requires"] if r["id"] == "grafana")
    assert int(grafana["version"].split(".")[0]) >= 10
    assert dashboard["title"] and dashboard["panels"]

    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    occupied: dict[tuple[int, int], str] = {}
    for item in panels:
        assert item["type"] in GRAFANA_10_PANELS, item["type"]
        assert item["title"], f"untitled panel {item['id']}"
        pos = item["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["y"] >= 0 and pos["h"] > 0, item["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in occupied, f"{item['title']!r} overlaps {occupied[(x, y)]!r}"
                occupied[(x, y)] = item["title"]
        if item["type"] == "row":
            continue
        ref_ids = [t["refId"] for t in item["targets"]]
        assert item["targets"] and len(ref_ids) == len(set(ref_ids)), item["title"]
        assert all(t["expr"].strip() for t in item["targets"]), item["title"]


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_datasource_is_templated(name: str) -> None:
    dashboard = dashboards()[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    templated = {"type": "prometheus", "uid": "${datasource}"}

    def walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield f"{path}.datasource", value
                else:
                    yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{path}[{index}]")

    references = list(walk(dashboard, name))
    assert len(references) > 20
    for path, value in references:
        assert value == templated, f"{path} is {value!r}, not the $datasource variable"
    for item in all_panels(dashboard):
        if item["type"] != "row":
            assert item["datasource"] == templated and all(t["datasource"] == templated for t in item["targets"])


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_template_variable_is_defined_before_use(name: str) -> None:
    dashboard = dashboards()[name]
    defined = {"__rate_interval"}  # Grafana's own
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            for used in re.findall(r"\$(\w+)", variable["definition"]):
                assert used in defined, f"${variable['name']} uses ${used} before it is defined"
        defined.add(variable["name"])
    for query in panel_queries(dashboard, name):
        for used in re.findall(r"\$\{?(\w+)", query.expr):
            assert used in defined, f"{query.where} uses undefined ${used}"


def test_jobs_dashboard_has_the_variables_and_panels_the_issue_lists() -> None:
    dashboard = dashboards()["profilerd-jobs.json"]
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "job", "node", "rank"]
    titles = " | ".join(p["title"].lower() for p in all_panels(dashboard))
    for words in (
        "gpu utilization",
        "gpu memory",
        "gpu power",
        "gpu temperature",
        "gpu throttling",
        "step time breakdown",
        "verdict timeline",
        "step time per rank",
        "straggler",
        "top recommendations",
        "dropped probe messages",
        "sampler errors",
        "sampler lag",
    ):
        assert words in titles, f"no panel for {words!r}"


def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool parses each dashboard and rule expression as the body of a recording rule."""
    tool = promtool()
    queries = [q for q in every_query() if not q.expr.startswith("label_values(")]
    group = {
        "name": "parse",
        "rules": [
            {"record": f"parse:query:{i}", "expr": substitute(q.expr, OFFLINE_VARIABLES)} for i, q in enumerate(queries)
        ],
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        where = {f"parse:query:{i}": q.where for i, q in enumerate(queries)}
        output = re.sub(r'"(parse:query:\d+)"', lambda m: repr(where[m.group(1)]), result.stdout + result.stderr)
        pytest.fail(output)
    for query in every_query():
        if query.expr.startswith("label_values("):
            assert re.fullmatch(r"label_values\(.+, *\w+\)", query.expr), query.where


# ------------------------------------------------------------------------------ the exporter


def test_promtool_check_metrics_on_a_live_scrape_is_clean(live_exporter: Exporter) -> None:
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=live_exporter.text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_every_metric_referenced_exists_in_the_exporter(live_exporter: Exporter) -> None:
    recorded = {rule["record"] for rule in recording_rules()}
    texts = [(q.where, metric_names(q.expr)) for q in every_query()]
    for rule in alert_rules():
        for key, text in rule["annotations"].items():
            texts.append((f"{rule['alert']} {key}", set(_METRIC_IN_TEXT.findall(text))))
    missing = []
    for where, names in texts:
        for metric in sorted(names):
            known = recorded if ":" in metric else live_exporter.names
            if metric not in known:
                missing.append(f"{where}: {metric}")
    assert not missing, "not exported (or not recorded):\n" + "\n".join(missing)


def test_every_label_matched_exists_on_its_metric(live_exporter: Exporter) -> None:
    problems = []
    for query in every_query():
        for metric, matchers in selectors(query.expr):
            if metric in PROMETHEUS_SERIES or ":" in metric:
                continue
            have = live_exporter.labels.get(metric, set()) | {"instance", "job"}
            for label, operator, value in matchers:
                if label not in have:
                    problems.append(f"{query.where}: {metric} has no label {label!r}")
                if label in KNOWN_LABEL_VALUES and operator in ("=", "=~") and "$" not in value:
                    for alternative in value.split("|"):
                        if alternative not in KNOWN_LABEL_VALUES[label]:
                            problems.append(f"{query.where}: {label}={alternative!r} never occurs")
    assert not problems, "\n".join(problems)


def test_the_series_the_dashboards_assume_about_labels(live_exporter: Exporter) -> None:
    """The joins in the rules hold only if these label sets are as expected."""
    labels = live_exporter.labels
    assert labels["profilerd_rank_gpu_info"] >= {"job", "rank", "gpu", "uuid"}
    assert labels["profilerd_gpu_utilization_ratio"] == {"gpu", "uuid"}
    assert labels["profilerd_step_phase_seconds_total"] == {"job", "rank", "phase"}
    assert labels["profilerd_step_duration_seconds_count"] == {"job", "rank"}
    assert "instance" not in set().union(*labels.values()), "the exporter must leave instance to Prometheus"


# ------------------------------------------------------------------------------ rules


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests(path: Path) -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", path.name], cwd=path.parent, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    missing = {what: name for what, name in REQUIRED_ALERTS.items() if name not in names}
    assert not missing


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_every_alert_has_for_severity_summary_description_and_runbook() -> None:
    anchors = {_github_anchor(line.lstrip("#")) for line in ALERTS_DOC.read_text().splitlines() if line.startswith("#")}
    for rule in alert_rules():
        name = rule["alert"]
        assert name.startswith("Profilerd"), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: for: {rule.get('for')!r}"
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert len(annotations["summary"]) < 120, f"{name}: a summary is one line"
        assert len(annotations["description"]) > 150, f"{name}: the description must say what to do"
        url = annotations["runbook_url"]
        assert url == f"{DOCS_BASE_URL}/alerts.md#{name.lower()}", f"{name}: runbook_url {url}"
        assert name.lower() in anchors, f"docs/alerts.md has no section {name}"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS[1].read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested staying silent"


def test_every_recording_rule_is_unit_tested() -> None:
    tests = yaml.safe_load(RULE_TESTS[0].read_text())["tests"]
    tested = " ".join(check["expr"] for case in tests for check in case.get("promql_expr_test", []))
    untested = {rule["record"] for rule in recording_rules() if rule["record"] not in tested}
    assert not untested


def test_example_scrape_config_is_valid(tmp_path: Path) -> None:
    """The static configuration in docs/deployment.md, as promtool reads it."""
    text = (REPO / "docs" / "deployment.md").read_text()
    block = re.search(r"```yaml\n(# prometheus\.yml.*?)```", text, re.S)
    assert block, "docs/deployment.md has no prometheus.yml example"
    config = yaml.safe_load(block.group(1))
    assert config["scrape_configs"][0]["honor_labels"] is True
    rule_dir = tmp_path / "rules"
    rule_dir.mkdir()
    for path in RULE_FILES:
        shutil.copy(path, rule_dir / path.name)
    config["rule_files"] = [str(rule_dir / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployment_yaml_examples_parse_and_keep_the_training_job_label() -> None:
    """Every YAML example in docs/deployment.md parses; every scrape keeps the daemon's job label."""
    text = (REPO / "docs" / "deployment.md").read_text()
    documents = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        documents += [d for d in yaml.safe_load_all(block) if d is not None]
    manifests = [d for d in documents if isinstance(d, dict)]
    assert {"DaemonSet", "PodMonitor", "Service", "ServiceMonitor"} <= {d.get("kind") for d in manifests}
    scrapes = [s for d in manifests for s in d.get("scrape_configs", [])]
    scrapes += [s for d in documents if isinstance(d, list) for s in d if "job_name" in s]  # fragments
    assert len(scrapes) >= 2 and all(s["honor_labels"] is True for s in scrapes)
    for manifest in manifests:
        if manifest.get("kind") == "PodMonitor":
            assert all(e["honorLabels"] is True for e in manifest["spec"]["podMetricsEndpoints"])
        if manifest.get("kind") == "ServiceMonitor":
            assert all(e["honorLabels"] is True for e in manifest["spec"]["endpoints"])
