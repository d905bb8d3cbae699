"""Shared, cached model builds for the method tests.

Every `models.init` is one XLA compile (about 2 s on a small CPU, whatever the model's
size), so each (preset, sites) pair is initialised once per session and shared by the
tests that need it. The cached trees are never mutated: tests copy before they edit.
"""

import functools

import flax.linen as nn
import jax
import pytest

from ptune import models


@functools.cache
def _abstract(preset: str, sites: models.Sites, num_labels: int):
    cfg = models.model_config(preset, num_labels=num_labels)
    return cfg, nn.unbox(models.abstract_params(models.build(cfg, sites)))


@functools.cache
def _tiny(preset: str, sites: models.Sites):
    cfg = models.model_config(preset, num_labels=3)
    model = models.build(cfg, sites)
    return cfg, model, models.init(model, jax.random.key(0))


@pytest.fixture(scope="session")
def abstract():
    """abstract(preset, sites, num_labels) -> (config, unboxed ShapeDtypeStruct tree); nothing allocated."""
    return _abstract


@pytest.fixture(scope="session")
def tiny():
    """tiny(preset, sites) -> (config with num_labels=3, model, params from models.init(model, key(0)))."""
    return _tiny
