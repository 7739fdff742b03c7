from __future__ import annotations

import json
from pathlib import Path

from flywheel.counters import RequestCounters, prometheus


def test_report_sums_every_process_file(tmp_path: Path) -> None:
    other = {"request_count": 10, "error_count": 2, "latency_sum_ms": 80.0, "models_served": ["b"]}
    (tmp_path / "99999.json").write_text(json.dumps(other))
    metrics = RequestCounters(tmp_path)
    metrics.record("a", 10.0, error=False)
    metrics.record("a", 0.0, error=True)
    report = metrics.report()
    assert report == {
        "request_count": 12,
        "error_count": 3,
        "average_latency_ms": 10.0,
        "models_served": ["a", "b"],
    }


def test_background_flush_writes_idle_counters(tmp_path: Path) -> None:
    metrics = RequestCounters(tmp_path)
    metrics.start()
    try:
        metrics.record("a", 5.0, error=False)
        import time

        time.sleep(0.8)
        assert json.loads(metrics.path.read_text())["request_count"] == 1
    finally:
        metrics.stop()


def test_prometheus_text_escapes_labels() -> None:
    text = prometheus(
        {"request_count": 1, "error_count": 0, "average_latency_ms": 2.5, "models_served": ['we"ird']},
        {"outbox_backlog": 3},
    )
    assert 'flywheel_model_served{model="we\\"ird"} 1' in text
    assert "flywheel_outbox_backlog 3" in text and text.endswith("\n")


def test_files_of_dead_processes_are_pruned_after_a_grace(tmp_path: Path) -> None:
    import os
    import time

    record = {"request_count": 5, "error_count": 0, "latency_sum_ms": 50.0, "models_served": ["gone"]}
    long_dead = tmp_path / "99999990.json"  # no such process (beyond any pid_max)
    long_dead.write_text(json.dumps(record))
    an_hour_ago = time.time() - 3600
    os.utime(long_dead, (an_hour_ago, an_hour_ago))
    just_died = tmp_path / "99999991.json"  # its last numbers still count for a while
    just_died.write_text(json.dumps(record))
    metrics = RequestCounters(tmp_path)
    metrics.record("a", 10.0, error=False)
    report = metrics.report()
    assert report["request_count"] == 6 and report["models_served"] == ["a", "gone"]
    assert not long_dead.exists() and just_died.exists()
