"""The tools keep working: the benchmark, the page's benchmark and the screenshot script."""

import json
import subprocess
import sys

import pytest

from tests.helpers import TOOLS


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_benchmark_quick_run_completes_and_loses_nothing(tmp_path):
    """Keeps bench_chat.py working; no speed is asserted (the machines are shared and noisy)."""
    bench = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "bench_chat.py"),
            "--quick",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "| fan-out throughput, 100 receivers" in bench.stdout
    assert "Lost, duplicated or reordered deliveries in all runs: 0" in bench.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {row["scenario"] for row in rows} == {
        "throughput",
        "efficiency",
        "latency",
        "http",
        "memory",
        "resume",
    }


@pytest.mark.browser
def test_screenshot_script_still_makes_a_picture(browser, tmp_path):
    from tools.screenshot import make_screenshot, make_workshop_screenshots

    make_screenshot(browser, tmp_path / "shot.png")
    make_workshop_screenshots(browser, tmp_path)
    for shot in ("shot.png", "screenshot-workshop.png", "screenshot-workshop-phone.png"):
        assert (tmp_path / shot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.browser
@pytest.mark.slow
def test_page_benchmark_runs_and_reports_each_level(browser):
    from tools import bench_page

    costs = bench_page.per_append(browser, [50, 100])
    assert sorted(costs) == [50, 100] and all(cost > 0 for cost in costs.values())
    lag = bench_page.lag(browser, rate=100, seconds=1)
    assert lag["behind_at_end_s"] <= lag["worst_lag_s"]
