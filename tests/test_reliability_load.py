"""Load, the short CI variant of ``benchmarks/load.py``: gradio_client users and OpenAI-client users
against the app, chat and image questions mixed. No request fails; a full queue is a polite
refusal, counted as handled."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import pytest
from test_app import free_port, serve

import app
from benchmarks.load import API_KINDS, GRADIO_KINDS, example_images, run_load
from experts import Registry
from llama_adapter import Pipeline
from llama_adapter.engine import EngineConfig

pytestmark = pytest.mark.slow


def test_six_users_asking_two_questions_each_without_a_failure():
    served = serve()
    images = example_images(served.examples)[:4]  # the warm-up reads each through OCR once
    report = run_load(served.url, users=6, api_users=2, requests=2, images=images, pid=os.getpid())
    print(report.table())
    assert report.failed == 0, report.table()
    # The same 12 requests on any machine (seeded users), every kind among them, every one answered.
    assert len(report.results) == report.count("ok") == 12, report.table()
    assert {r.kind for r in report.results} == {*GRADIO_KINDS, *API_KINDS}, report.table()
    assert report.throughput() > 0
    # Memory is reported, not judged, here: in a process shared with the other tests it is still
    # settling. `python -m benchmarks.load` measures the server alone.
    assert report.rss_start and report.rss_end
    assert served.pipe.running == 0


@pytest.fixture
def slow_app(tiny_pipe) -> Iterator[str]:
    """The app on the tiny model, slowed to 50 ms a token, with room for one waiting request."""
    model = tiny_pipe.model
    real = model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return real(*args, **kwargs)

    model.forward = slow
    pipe: Pipeline = dataclasses.replace(tiny_pipe)
    pipe.start_engine(EngineConfig(max_batch=1, max_waiting=1))
    demo = app.build_demo(pipe, registry=Registry([]), examples_dir=app.EXAMPLES_DIR / "none", queue_size=1)
    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        pipe.engine.close()
        del model.forward


def test_a_full_queue_is_a_polite_refusal_and_nothing_fails(slow_app):
    # Five users at once against one running and one waiting: the first burst already overflows.
    report = run_load(slow_app, users=5, requests=3, mix=(1.0, 0.0, 0.0), max_new_tokens=16)
    print(report.table())
    assert report.failed == 0, report.table()
    assert report.queue_full > 0 and report.count("ok") > 0, report.table()
