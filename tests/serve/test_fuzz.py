"""The server's OpenAPI schema fuzzed with schemathesis (a bounded run): no request gets a 5xx.

Every operation of /openapi.json (files, fine-tuning jobs, models, chat, graders, evals) gets generated
requests, valid and invalid, against a live server with a data dir; the answer must be a non-5xx status, in
OpenAI's error shape when it is an error.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (the dev extra)")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from hypothesis import HealthCheck, settings  # noqa: E402
from live_server import serving  # noqa: E402

EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path_factory.mktemp("fuzz-data"),
                 max_upload_bytes=4096) as (url, _):
        yield url.removesuffix("/v1")


def test_no_request_gets_a_5xx(live):
    """Each operation in turn (schemathesis's own pytest plugin does not load under pytest 9)."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{live}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
            "/v1/fine_tuning/alpha/graders/run", "/v1/fine_tuning/alpha/graders/validate", "/v1/evals",
            "/v1/evals/{eval_id}", "/v1/evals/{eval_id}/runs", "/v1/evals/{eval_id}/runs/{run_id}",
            "/v1/evals/{eval_id}/runs/{run_id}/cancel", "/v1/evals/{eval_id}/runs/{run_id}/output_items",
            "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"} <= {op.path for op in operations}
    calls = {"n": 0}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            response = case.call(base_url=live, timeout=60)
            calls["n"] += 1
            assert response.status_code < 500, (case.method, case.path, response.status_code,
                                                response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, response.text

        check()
    assert calls["n"] >= len(operations)
