"""oslo.messaging's own functional suite, run against the zmqrelay driver
and a relay started for it.

    RPC_TRANSPORT_URL=zmqrelay://127.0.0.1:PORT/ NOTIFY_TRANSPORT_URL=... \\
        python -m pytest --pyargs oslo_messaging.tests.functional.test_functional

The suite has 21 tests.  Two of them skip themselves for any URL that is
not rabbit:// (or amqp://): they test rabbit's mandatory flag and call
monitoring, which tests/oslo/test_driver.py tests for this driver
(test_at_least_once_..., test_call_monitor_...).  MetricsTestCase needs an
oslo.metrics collector (it starts ``python3 -m oslo_metrics`` and reads
http://localhost:3000); it may fail for want of one, as it does with rabbit.
Every other test must pass.

It runs twice: with discovery off, and with MURANO_ZMQ_DISCOVERY_INTERFACES
=127.0.0.1 (every transport's Node and the relay on zeroconf), as services
with discovery on run.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from murano_zmq.discovery.zeroconf import INTERFACES_ENV

from .conftest import zmqrelay_url

SUITE = "oslo_messaging.tests.functional.test_functional"


def _suite_installed() -> bool:
    # Found, not imported: importing oslo_messaging.tests monkey-patches
    # this process with eventlet.
    spec = importlib.util.find_spec("oslo_messaging")
    if spec is None or not spec.submodule_search_locations:
        return False
    here = pathlib.Path(list(spec.submodule_search_locations)[0])
    return ((here / "tests" / "functional" / "test_functional.py").exists()
            and all(importlib.util.find_spec(m) for m in ("oslotest", "testscenarios")))


pytestmark = pytest.mark.skipif(not _suite_installed(),
                                reason="needs oslo.messaging's tests, oslotest and testscenarios (the oslo extra)")

SKIPPED_BY_THE_SUITE = {  # for every URL but rabbit:// (and amqp://)
    "CallTestCase.test_mandatory_call",
    "CallTestCase.test_monitor_long_call",
}
MAY_FAIL = {  # needs an oslo.metrics collector, see above
    "MetricsTestCase.test_functional",
}
EXPECTED_TESTS = 21

# Bounds: the suite takes about 70 s here; a test of it that hangs is cut at
# PER_TEST seconds by pytest-timeout, the whole run at WHOLE_RUN.
PER_TEST = 120
WHOLE_RUN = 600


def run_suite(url: str, workdir, discovery: str | None = None) -> dict[str, str]:
    """{"Class.test": outcome} for every test of the suite (`discovery`:
    the zeroconf interfaces its nodes use, None: off)."""
    report = workdir / "functional.xml"
    env = dict(os.environ, RPC_TRANSPORT_URL=url, NOTIFY_TRANSPORT_URL=url)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop(INTERFACES_ENV, None)
    if discovery:
        env[INTERFACES_ENV] = discovery
    command = [sys.executable, "-m", "pytest", "--pyargs", SUITE, "-p", "no:cacheprovider", "-q",
               f"--timeout={PER_TEST}", f"--junitxml={report}", "-W", "ignore::DeprecationWarning"]
    # A session of its own: whatever the suite starts (its oslo_metrics
    # server) is stopped with it.
    proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=WHOLE_RUN)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    text = output.decode(errors="replace")
    assert report.exists(), f"the suite wrote no report:\n{text[-5000:]}"
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname').rsplit('.', 1)[-1]}.{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
        outcomes[name] = outcome
    print(text[-3000:])
    return outcomes


@pytest.mark.timeout(WHOLE_RUN + 60)
@pytest.mark.parametrize("discovery", [None, "127.0.0.1"], ids=["discovery-off", "discovery-on"])
def test_oslo_messaging_functional_suite_passes(relay_factory, tmp_path, discovery):
    relay = relay_factory(*(["--discovery-interfaces", discovery] if discovery else []))
    outcomes = run_suite(zmqrelay_url(relay), tmp_path, discovery)
    summary = "\n".join(f"{outcome:8} {name}" for name, outcome in sorted(outcomes.items()))
    print(summary)
    assert len(outcomes) == EXPECTED_TESTS, summary
    skipped = {name for name, outcome in outcomes.items() if outcome == "skipped"}
    failed = {name for name, outcome in outcomes.items() if outcome == "failed"}
    passed = {name for name, outcome in outcomes.items() if outcome == "passed"}
    assert skipped == SKIPPED_BY_THE_SUITE, summary
    assert failed <= MAY_FAIL, summary
    assert passed >= set(outcomes) - SKIPPED_BY_THE_SUITE - MAY_FAIL, summary
    assert len(passed) >= EXPECTED_TESTS - len(SKIPPED_BY_THE_SUITE) - len(MAY_FAIL)
