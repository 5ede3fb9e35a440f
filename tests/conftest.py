import faulthandler
import os
import signal

import pytest

os.environ.setdefault("RINGLLM_NO_PROGRESS", "1")
faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: the stacks of a hung test run


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory):
    from ringllm.engine.demo import demo_model_path

    return demo_model_path(tmp_path_factory.mktemp("ringllm-cache"))


@pytest.fixture(scope="session")
def real_model():
    """The real trained model's GGUF file (tests/real_model.py); skips only when the registry is unreachable."""
    from tests.real_model import RealModelUnavailable, real_model_path

    try:
        return real_model_path()
    except RealModelUnavailable as e:
        pytest.skip(str(e))
