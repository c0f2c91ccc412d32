"""The served model (``mlflow models serve`` of a registered version) answers bad requests with a 4xx
and a message naming the problem, never a 500 or a hang, and still answers good requests after them.

One server for the module: ``bench.faults.serving.served_model`` (a tiny ``fractalmar_tiny16``
registered in a SQLite MLflow store, served on 127.0.0.1). The bad requests are
``bench.faults.serving.BAD_INPUTS``, the ones the ``serving-bad-inputs`` fault scenario sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from bench.faults.serving import BAD_INPUTS, GOOD_PARAMS, error_message, post, served_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served_model(tmp_path_factory.mktemp("serving")) as url:
        yield url


@pytest.mark.parametrize(("case", "body", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_request_is_a_4xx_naming_the_problem(server: str, case: str, body: object, expected: str) -> None:
    status, text = post(server, body)
    message = error_message(text)
    assert 400 <= status < 500, f"{case}: answered {status or 'nothing in time'}: {message[:500]}"
    assert expected.lower() in message.lower(), (
        f"{case}: the message does not say {expected!r}: {message[:500]}"
    )


def test_good_requests_still_answered(server: str) -> None:
    """Between bad requests the server stays healthy: every image comes back, one per label."""
    for body, _ in zip((b for _, b, _ in BAD_INPUTS), range(3)):
        post(server, body)
    request = {"dataframe_records": [{"label": 0}, {"label": 9}], "params": {**GOOD_PARAMS, "batch_size": 1}}
    status, text = post(server, request)
    assert status == 200, text[:500]
    predictions = json.loads(text)["predictions"]
    assert [p["label"] for p in predictions] == [0, 9] and all(p["image"] for p in predictions)


def test_served_schedules_equal_direct_sampling(server: str) -> None:
    """The served params take every schedule setting: the images equal ``model.sample`` in-process
    with the same settings and seed (the served weights are the fixture's seed-0 tiny model)."""
    import numpy as np
    import torch

    from fractalgen.models import build_model
    from fractalgen.platform.generation.sampling import to_uint8
    from fractalgen.platform.generation.serving import decode_images

    params = {**GOOD_PARAMS, "cfg": 3.0, "cfg_schedule": "interval:start=0.25,end=1", "lower_cfg": 1.5,
              "lower_cfg_schedule": "power-cosine:exponent=2", "temperature_end": 0.8, "seed": 4}  # fmt: skip
    status, text = post(server, {"dataframe_records": [{"label": 2}, {"label": 7}], "params": params})
    assert status == 200, text[:500]
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny16").eval()
    direct = model.sample(
        torch.tensor([2, 7]), seed=4, num_iters=(2, 2), cfg=3.0, cfg_schedule="interval:start=0.25,end=1",
        lower_cfg=1.5, lower_cfg_schedule="power-cosine:exponent=2", temperature=1.0, temperature_end=0.8,
    )  # fmt: skip
    np.testing.assert_array_equal(decode_images(json.loads(text)), to_uint8(direct))
