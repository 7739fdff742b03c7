"""Schemathesis over /openapi.json against a real server on the demo programs (issue #10, finding 6).

At least 1,000 generated cases, valid and invalid; each response must have a status the
schema documents for its route (never a 500) and a body that matches the documented schema.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from flywheel.http.server import start_background, stop_background
from flywheel.store import Store

CASES = 1200

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(demo_store_rw: Store) -> Iterator[str]:
    yield start_background(port=0)
    stop_background()


def test_every_generated_request_gets_a_documented_status(url: str) -> None:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: Counter[tuple[str, int]] = Counter()

    def documented_status(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> None:
        documented = {int(code) for code in case.operation.definition.raw["responses"]}
        assert response.status_code != 500, f"500 on {case.operation.label}: {response.text[:500]}"
        assert response.status_code in documented, (
            f"{case.operation.label} answered {response.status_code}, documented {sorted(documented)}: "
            f"{response.text[:300]}"
        )

    strategy = st.one_of(
        schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
        schema.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    with requests.Session() as session:

        @settings(
            max_examples=CASES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call_and_validate(
                base_url=url, session=session, checks=[documented_status, response_schema_conformance]
            )
            seen[(case.operation.label, response.status_code)] += 1

        fuzz()

    total = sum(seen.values())
    print(f"{total} cases:", dict(sorted(seen.items())))
    assert total >= 1000
    assert {label for label, _ in seen} >= {"POST /predict", "POST /feedback", "GET /export"}
