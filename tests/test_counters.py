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
