"""Flower's dashboard as a person sees it, in Debian's headless Chromium (issue 4).

Flower's HTTP API and its Prometheus /metrics are covered in test_pipeline.py
(test_flower_asks_for_a_login_and_shows_koubou_tasks_readably); here the pages themselves, whose
tables Flower's JavaScript fills in from its own endpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser import Chromium, unavailable_reason
from tests.harness import System, http

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")


def row_text(table: str, containing: str) -> str:
    """JavaScript: the text of the first row of `table` that contains `containing`, else null."""
    return (
        f"(() => {{ const row = [...document.querySelectorAll('#{table} tbody tr')]"
        f".find(r => r.innerText.includes({json.dumps(containing)})); return row ? row.innerText : null; }})()"
    )


def test_flower_dashboard_shows_the_workers_and_a_finished_task(system: System, tmp_path: Path) -> None:
    (worker,) = [w for w in http("GET", f"{system.api}/health")[1]["workers"] if w.startswith("celery@")]
    prompt = "Shown in Flower's dashboard: " + "a long prompt, " * 20
    code, body = system.delegate(prompt=prompt, sync=True, options={"timeout": 60})
    assert code == 200 and body["status"] == "completed", body
    task_id = body["task_id"]
    user, password = (system.home / "config" / "flower-auth").read_text().strip().split(":", 1)
    flower = f"http://127.0.0.1:{system.flower_port}"

    with Chromium(tmp_path / "chromium") as browser:
        # No login given at the browser's prompt: refused, and nothing of the cluster shows.
        assert browser.open(f"{flower}/") == 401
        assert worker not in browser.evaluate("document.documentElement.outerHTML")

        browser.credentials = (user, password)
        assert browser.open(f"{flower}/") == 200
        # Rendered by Flower's JavaScript from /workers?json=1 (the server's own HTML says "True").
        shown = browser.wait_for(row_text("workers-table", worker))
        assert "Online" in shown, shown
        browser.wait_for("Number(document.getElementById('workers-online').textContent) >= 1")
        browser.screenshot(tmp_path / "flower-workers.png")

        assert browser.open(f"{flower}/tasks") == 200
        shown = browser.wait_for(row_text("tasks-table", task_id))  # filled in from /tasks/datatable
        browser.screenshot(tmp_path / "flower-tasks.png")
    assert "koubou.delegate" in shown and "SUCCESS" in shown and worker in shown, shown
    # Readable arguments: the task type, the model and the start of the prompt, abbreviated.
    assert "general" in shown and "fake-model:1b" in shown and "Shown in Flower's dashboard" in shown, shown
    assert "…" in shown and prompt.strip() not in shown, shown
