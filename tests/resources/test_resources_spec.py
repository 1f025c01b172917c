"""Resource specs: parsing the CLI syntax, validation, detection, and the pure ResourcePool."""

from __future__ import annotations

import math

import psutil
import pytest

from corral.resources import (
    ENV_VAR,
    ResourcePool,
    detect_gpus,
    detect_resources,
    format_resources,
    parse_resources,
    resource_amounts,
    resources_from_env,
    task_resources,
    validate_resources,
    validate_worker_resources,
)


# -- parsing ------------------------------------------------------------------------
def test_parse_amounts_and_scientific_notation():
    assert parse_resources("GPU=2,MEMORY=100e9") == {"GPU": 2, "MEMORY": 100_000_000_000}
    assert parse_resources(" GPU = 0.5 , ") == {"GPU": 0.5}
    assert parse_resources("") == {}


def test_parse_indexed_resources():
    assert parse_resources("GPU=[0,1]") == {"GPU": [0, 1]}
    assert parse_resources("GPU=[0, 1],MEM=4") == {"GPU": [0, 1], "MEM": 4}
    assert parse_resources("GPU=[GPU-ab12,3]") == {"GPU": ["GPU-ab12", 3]}
    assert parse_resources("GPU=[]") == {"GPU": []}
    assert resource_amounts(parse_resources("GPU=[0,1],MEM=4")) == {"GPU": 2, "MEM": 4}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("GPU=-1", "GPU must be a finite non-negative number, got -1"),
        ("GPU=nan", "GPU must be a finite non-negative number, got nan"),
        ("GPU=inf", "GPU must be a finite non-negative number, got inf"),
        ("GPU=two", "GPU: 'two' is not a number"),
        ("GPU", "'GPU' is not of the form NAME=AMOUNT"),
        ("=2", "'=2' is not of the form"),
        ("GPU=[0,1", "GPU: '\\[0,1' has no closing bracket"),
        ("GPU=[0,0]", "GPU lists index 0 twice"),
    ],
)
def test_parse_refuses_bad_specs_naming_resource_and_value(text, match):
    with pytest.raises(ValueError, match=match):
        parse_resources(text)


def test_format_round_trips_through_parse():
    offer = {"GPU": [0, 1], "MEMORY": 100e9, "LIC": 3, "F": 0.25}
    assert parse_resources(format_resources(offer)) == offer


# -- validation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("demand", "match"),
    [
        ({"GPU": -1}, "GPU must be a finite non-negative number, got -1"),
        ({"GPU": math.nan}, "GPU must be a finite non-negative number, got nan"),
        ({"GPU": math.inf}, "GPU must be a finite non-negative number, got inf"),
        ({"GPU": "1"}, "GPU must be a number, got '1'"),
        ({"GPU": True}, "GPU must be a number, got True"),
        ({"GPU": [0]}, "lists of indices are for what workers offer"),
        ({"": 1}, "names must be non-empty strings"),
        ({3: 1}, "names must be non-empty strings, got 3"),
        ("GPU=1", "must be a mapping"),
    ],
)
def test_task_demands_are_validated(demand, match):
    with pytest.raises(ValueError, match=match):
        validate_resources(demand)


def test_valid_demands_pass_unchanged():
    assert validate_resources({"GPU": 1, "MEM": 0.5, "X": 0}) == {"GPU": 1, "MEM": 0.5, "X": 0}
    assert validate_resources(None) == {}


@pytest.mark.parametrize(
    ("offer", "match"),
    [
        ({"GPU": [-1]}, "GPU index -1 is negative"),
        ({"GPU": [1.5]}, "GPU index 1.5 is not an integer or a string"),
        ({"GPU": [""]}, "GPU has an empty index"),
        ({"GPU": [1, 1]}, "GPU lists index 1 twice"),
        ({"GPU": -2}, "GPU must be a finite non-negative number, got -2"),
    ],
)
def test_worker_offers_are_validated(offer, match):
    with pytest.raises(ValueError, match=match):
        validate_worker_resources(offer)


# -- environment and detection ----------------------------------------------------------
def test_env_var_uses_the_cli_syntax():
    assert resources_from_env({ENV_VAR: "GPU=[0,1],MEM=2"}) == {"GPU": [0, 1], "MEM": 2}
    assert resources_from_env({}) == {}
    with pytest.raises(ValueError, match=f"{ENV_VAR}: GPU must be a finite"):
        resources_from_env({ENV_VAR: "GPU=-3"})


def test_gpus_detected_from_cuda_visible_devices():
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "0,2"}) == [0, 2]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "GPU-5d2c,GPU-77aa"}) == ["GPU-5d2c", "GPU-77aa"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == [1]


def test_auto_detects_gpus_and_memory(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    memory = psutil.virtual_memory().total
    assert detect_resources() == {"GPU": [3, 1], "MEMORY": memory}
    assert parse_resources("auto") == {"GPU": [3, 1], "MEMORY": memory}
    # Items after ``auto`` override it.
    assert parse_resources("auto,MEMORY=10,LIC=1") == {"GPU": [3, 1], "MEMORY": 10, "LIC": 1}


def test_auto_without_gpus_offers_memory_only(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    assert detect_resources() == {"MEMORY": psutil.virtual_memory().total}


# -- the pool -----------------------------------------------------------------------
def test_pool_amounts():
    pool = ResourcePool({"MEM": 10})
    assert pool.fits({"MEM": 10}) and not pool.fits({"MEM": 11}) and not pool.fits({"GPU": 1})
    assert pool.fits({"GPU": 0}) and pool.fits({})
    held = pool.acquire({"MEM": 6})
    assert held == {} and pool.available == {"MEM": 4}
    assert not pool.fits({"MEM": 5})
    pool.release({"MEM": 6}, held)
    assert pool.available == {"MEM": 10}


def test_pool_whole_indices_are_exclusive():
    pool = ResourcePool({"GPU": [0, 1, 2]})
    a = pool.acquire({"GPU": 1})
    b = pool.acquire({"GPU": 2})
    assert a == {"GPU": [(0, 1.0)]} and b == {"GPU": [(1, 1.0), (2, 1.0)]}
    assert not pool.fits({"GPU": 0.1})
    pool.release({"GPU": 1}, a)
    assert pool.acquire({"GPU": 1}) == {"GPU": [(0, 1.0)]}
    pool.validate([({"GPU": 1}, {"GPU": [(0, 1.0)]}), ({"GPU": 2}, b)])


def test_pool_fractions_share_one_index_best_fit():
    pool = ResourcePool({"GPU": [0, 1]})
    a = pool.acquire({"GPU": 0.5})
    b = pool.acquire({"GPU": 0.5})
    assert a == b == {"GPU": [(0, 0.5)]}  # two halves share GPU 0
    c = pool.acquire({"GPU": 0.6})
    assert c == {"GPU": [(1, 0.6)]}
    # 0.8 GPU is free in total but no single GPU has 0.5 left.
    assert pool.available["GPU"] == pytest.approx(0.4)
    assert not pool.fits({"GPU": 0.4 + 0.01})
    assert pool.fits({"GPU": 0.4})
    pool.release({"GPU": 0.5}, a)
    assert not pool.fits({"GPU": 1})
    assert pool.acquire({"GPU": 0.5}) == {"GPU": [(0, 0.5)]}


def test_pool_mixed_whole_and_fraction():
    pool = ResourcePool({"GPU": [0, 1, 2]})
    held = pool.acquire({"GPU": 1.5})
    assert held == {"GPU": [(0, 1.0), (1, 0.5)]}
    assert pool.acquire({"GPU": 0.5}) == {"GPU": [(1, 0.5)]}
    assert pool.acquire({"GPU": 1}) == {"GPU": [(2, 1.0)]}
    assert not pool.fits({"GPU": 0.01})


def test_pool_shrinks_without_touching_running_tasks():
    pool = ResourcePool({"GPU": [0, 1], "MEM": 10})
    held = pool.acquire({"GPU": 2, "MEM": 8})
    pool.update({"GPU": [0], "MEM": 4})
    assert pool.available == {"GPU": -1, "MEM": -4}
    assert not pool.fits({"MEM": 1})
    pool.validate([({"GPU": 2, "MEM": 8}, held)])  # held beyond the new totals: allowed
    pool.release({"GPU": 2, "MEM": 8}, held)
    assert pool.available == {"GPU": 1, "MEM": 4}
    assert pool.usage == {"GPU": {0: 0.0}}  # index 1 is gone once free
    assert pool.acquire({"GPU": 1}) == {"GPU": [(0, 1.0)]}


def test_pool_validate_catches_oversubscription():
    pool = ResourcePool({"MEM": 1})
    with pytest.raises(AssertionError, match="MEM"):
        pool.validate([({"MEM": 1}, None)])  # books say nothing is used
    pool.acquire({"MEM": 1})
    pool.used["MEM"] = 2
    pool.available["MEM"] = -1
    with pytest.raises(AssertionError, match="oversubscribed"):
        pool.validate([({"MEM": 1}, None), ({"MEM": 1}, None)])


def test_task_view_lists_indices_and_amounts():
    assert task_resources({"GPU": 1, "MEM": 5}, {"GPU": [(1, 1.0)]}) == {"GPU": [1], "MEM": 5}
