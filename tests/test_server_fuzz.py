"""Fuzz the whole HTTP API from its own OpenAPI schema (schemathesis) against a real server on 127.0.0.1.

The checks, per request: no 5xx, the status code is one the schema declares, the content type and
the body match the schema. Two phases: schemathesis's coverage cases (the schema's boundaries: ids
0, 2^63-1, 2^63, -1, 0.5, "AAA", missing or wrong-typed fields, ...) and random cases, valid and
invalid inputs both (positive and negative generation), with and without the write token. Bounded: FUZZ_EXAMPLES per operation and mode (a few hundred requests,
well under a minute on 2 loaded cores); raise ``CBIR_FUZZ_EXAMPLES`` for a longer run.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

FUZZ_EXAMPLES = int(os.environ.get("CBIR_FUZZ_EXAMPLES", "8"))
TOKEN = "fuzz-token-0123456789abcdef"


def test_fuzz_the_api_from_its_schema(demo_index):
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)
    from schemathesis.generation import GenerationMode

    from cbir.server import BackgroundServer, Guard, create_app

    idx, path, encoder = demo_index
    app = create_app(idx, index_path=path, encoder=encoder, device="cpu",
                     guard=Guard.for_bind("127.0.0.1", token=TOKEN))
    schema = schemathesis.openapi.from_dict(app.openapi())
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    calls: dict[str, int] = {}
    statuses: dict[int, int] = {}
    with BackgroundServer(app) as url:
        operations = [r.ok() for r in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "GET /api/health", "POST /api/search", "GET /api/search/{image_id}", "POST /api/images",
            "DELETE /api/images/{image_id}", "GET /api/images/{image_id}", "GET /api/thumb/{image_id}"}
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        for op in operations:
            config = schema.config.generation_for(operation=op)
            for case in schema.iter_coverage_cases(op, generation_modes=modes, generation_config=config):
                for auth in ({"authorization": f"Bearer {TOKEN}"}, {}):
                    response = case.call_and_validate(base_url=url, headers=dict(auth), checks=checks)
                    key = f"{op.method.upper()} {op.path}"
                    calls[key] = calls.get(key, 0) + 1
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for auth in ({"authorization": f"Bearer {TOKEN}"}, {}):
                    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                              suppress_health_check=list(HealthCheck))
                    @given(case=op.as_strategy(generation_mode=mode))
                    def run(case):
                        response = case.call_and_validate(base_url=url, headers=dict(auth), checks=checks)
                        key = f"{op.method.upper()} {op.path}"
                        calls[key] = calls.get(key, 0) + 1
                        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

                    try:
                        run()
                    except hypothesis.errors.Unsatisfiable:
                        assert mode == GenerationMode.NEGATIVE  # nothing to negate (GET /api/health)
    total = sum(calls.values())
    print(f"\nfuzz: {total} requests over {len(calls)} operations; status codes {dict(sorted(statuses.items()))}")
    assert len(calls) == len(operations) and total >= len(operations) * 2
    assert not any(s >= 500 for s in statuses)
