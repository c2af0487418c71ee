"""Shared pytest fixtures: one generated shapes_lt world and one tiny random CLIP per test session, the token
cache of the session, and open_clip's weight caches emptied for the offline tests."""
import os

import open_clip
import pytest
import torch

import data
from util import clip_models


# The project's own modules: a deprecation warning raised by a call of theirs fails the test that made it, so that an
# API on its way out is replaced before it goes (torchvision's image decoders: TorchCodec's now).
PROJECT_MODULES = r"(anss|cvlp|data|evaluate|lgr|predict|test_equations|util|tools|tests)(\.|$)"


def pytest_configure(config):
    for category in ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}:{PROJECT_MODULES}")
    # torchvision warns from inside its own module, so its decoders are caught by their message instead
    config.addinivalue_line("filterwarnings", "error:The image decoding and encoding capabilities of TorchVision")


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """The tokenised-corpus cache of this test session (data.cache_dir), not the user's ~/.cache/vl-ltr; the stages
    run as subprocesses inherit it."""
    before = os.environ.get("VL_LTR_CACHE")
    os.environ["VL_LTR_CACHE"] = str(tmp_path_factory.mktemp("token_cache"))
    yield
    if before is None:
        os.environ.pop("VL_LTR_CACHE")
    else:
        os.environ["VL_LTR_CACHE"] = before


@pytest.fixture(scope="session")
def shapes_env(tmp_path_factory):
    """{"root": a data root holding the cached shapes_lt world (seed 0), "clip": a random shapes-tiny CLIP
    state dict to pass as --clip-weights (so no test trains the stand-in)}."""
    root = tmp_path_factory.mktemp("shapes_lt")
    data.load_data("shapes_lt", str(root), seed=0)             # generates and caches the world once
    clip = root / "clip.pt"
    torch.manual_seed(0)
    torch.save(clip_models.create_clip("shapes-tiny", 32).state_dict(), clip)
    return {"root": root, "clip": clip}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random shapes-tiny CLIP state dict (seed 0) for --clip-weights, without generating the shapes_lt world."""
    path = tmp_path_factory.mktemp("clip") / "shapes_tiny.pt"
    torch.manual_seed(0)
    torch.save(clip_models.create_clip("shapes-tiny", 32).state_dict(), path)
    return path


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """open_clip's two caches moved to empty folders under tmp_path; no download may start."""
    import huggingface_hub
    monkeypatch.setenv("HOME", str(tmp_path))                    # ~/.cache/clip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("download started"))
    return tmp_path
