"""Property-based fuzzing of what a request can carry: click parsing never fails other than with a clear
InvalidRequest, and the real server answers arbitrary infer parameters with no 5xx."""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.errors import InvalidRequest
from lib.transforms.request_clicks import MAX_CLICKS, validate_clicks

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=16,
)
CLICK = st.lists(st.integers(-5, 140) | st.floats(-5, 140) | st.integers() | JSON, min_size=0, max_size=4)
REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "foreground": st.lists(CLICK, max_size=4) | JSON,
        "background": st.lists(CLICK, max_size=4) | JSON,
        "label": JSON,
        "preset": st.sampled_from(["kits", "ct", "mr", "brain"]) | JSON,
    },
)


def test_a_click_beyond_any_float_is_refused_not_an_error():  # found by the fuzzing below
    try:
        validate_clicks({"foreground": [[10**400, 1, 1]]}, (10, 10, 10))
    except InvalidRequest as e:
        assert "outside the image" in str(e)


@given(request=REQUEST, shape=st.tuples(*[st.integers(1, 200)] * 3))
@settings(max_examples=1000, deadline=None)
def test_click_parsing_accepts_valid_clicks_or_says_why_not(request, shape):
    try:
        clicks = validate_clicks(request, shape)
    except InvalidRequest as e:
        assert str(e)
        return
    assert len(clicks.foreground) > 0 and len(clicks) <= MAX_CLICKS and clicks.frame == "image"
    for points in (clicks.foreground, clicks.background):
        assert points.dtype == np.int64 and points.shape[1] == 3
        assert ((points >= 0) & (points < np.array(shape))).all()


@given(params=REQUEST)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_server_answers_arbitrary_infer_parameters_without_a_5xx(server, params):
    from test_server import post_infer

    status, body = post_infer(server[0], "demo_ct_02_aniso", params)
    assert status < 500, (params, body[:500])
    if status >= 400:
        assert json.loads(body)["detail"]


TRAIN_OPTIONS = ("steps", "learning_rate", "val_split", "seed", "batch_size", "activation_checkpointing", "multi_gpu",
                 "model")


@given(request=st.dictionaries(st.sampled_from(TRAIN_OPTIONS) | st.text(max_size=3), JSON, max_size=6))
@settings(max_examples=1000, deadline=None)
def test_training_options_are_typed_and_in_range_or_refused_with_a_reason(request):
    from lib.trainers.sam3d_trainer import DEFAULT_OPTIONS as defaults
    from lib.trainers.sam3d_trainer import TRAINING_OPTIONS, training_options

    try:
        options = training_options(request)
    except InvalidRequest as e:
        assert str(e).startswith("training option ")
        return
    assert set(options) == set(defaults)
    for name, value in options.items():
        if TRAINING_OPTIONS[name].or_auto:  # auto (None) or a boolean
            assert value in (None, True, False), (name, value)
            continue
        assert type(value) is type(defaults[name]), (name, value)
        if TRAINING_OPTIONS[name].number:
            lowest, highest, _ = TRAINING_OPTIONS[name].number
            assert lowest <= value <= highest
