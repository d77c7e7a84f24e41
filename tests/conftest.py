"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from workbench.models.random import tiny_hf_config


@pytest.fixture
def tiny_transformers_model() -> Callable[..., PreTrainedModel]:
    """Factory: transformers' own model for `tiny_hf_config(variant, **overrides)`, every parameter random.

    transformers initialises norms to 1 and biases to 0; random values there make a swapped, dropped or
    misnamed norm or bias change the logits, so loader and agreement tests can see it. Matrices get std
    0.1 rather than 0.02: with 0.02, greedy decoding of a tiny model repeats one token, which hides bugs
    in positions and the cache.
    """

    def make(variant: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
        overrides.setdefault("initializer_range", 0.1)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_hf_config(variant, **overrides)))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
                elif name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        return model.float().eval()

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one CPU thread: tiny models are fastest so. With two threads every small operation
    waits for the second one, which on a busy 2-core machine costs milliseconds (10 s for a decode loop)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_one_thread() -> Iterator[None]:
    """`one_thread` for a module's fixtures (training a drafter once for all its tests), which run before a
    test's own fixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def throwaway_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A module's trained checkpoints (drafters, judges) go to a throwaway folder; the converted models stay
    in the real cache."""
    folder = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("workbench.training.checkpoints.cache_root", lambda: folder)
        yield folder


@pytest.fixture(autouse=True)
def private_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs recorded by tests go to a throwaway store, never the user's own."""
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path_factory.mktemp("store") / "runs.duckdb"))


@pytest.fixture(scope="module")
def chromium():
    """Debian's headless Chromium through Playwright, one per test module (the browser tests); a missing
    Chromium fails the test with the command that installs it."""
    from playwright.sync_api import expect, sync_playwright

    from workbench.apps.render_probe import launch_chromium

    # expect()'s own default is 5 s, which a first page load on a loaded 2-core machine (CI) can outlast
    # while the page still says "Loading..."; the pages' actions already wait up to a minute
    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            yield browser
        finally:
            browser.close()
