import faulthandler
import os
import re
import signal

import pytest

os.environ.setdefault("RINGLLM_NO_PROGRESS", "1")
# One torch (OpenMP) thread per process, here and in every server, engine and worker a test starts (they inherit
# it). The suite runs many torch processes at once on a 2-core box (two pytest-xdist workers, their servers, and
# whatever else loads the machine); with two threads each, a thread descheduled in the middle of an op holds its
# partner spinning at the op's barrier, and a loaded box ran the demo-model tests up to 12x slower (a KV-pool
# test: 6 s alone, 74 s beside two CPU hogs; 7 s with one thread). Set before torch is imported (conftest is
# loaded first); OMP_NUM_THREADS in the environment still wins. Servers of the real GGUF model keep torch's own
# count (tests/helpers.py's start_server).
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = os.environ["TESTS_ONE_TORCH_THREAD"] = "1"
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


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """pyproject's `-n auto`: two pytest-xdist workers (the suite's servers and engines keep more than two cores
    busy anyway), or none, the tests running in this process, where parallel workers would get in each other's
    way: on a machine with an NVIDIA GPU (its tests share the one device and size their KV pools from its free
    memory), for the soak and GPU marks (scripts/soak.sh, scripts/gpu_*.sh), and with -s (xdist workers do not
    show a test's output)."""
    picks_alone = re.search(r"(?<!not )\b(gpu|soak)\b", config.option.markexpr or "")
    if os.path.exists("/dev/nvidiactl") or picks_alone or config.option.capture == "no":
        return 0
    return 2


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """How the suite is shared between pytest-xdist's workers (pytest_xdist_auto_num_workers): a test module is
    one unit of work, so a module-scoped server starts once; all of tests/compat is one unit, since its modules
    share one session-scoped real-model server (tests/compat/conftest.py's default_server, a minute of CPU to
    start). The units with the most tests go first, so the long compat unit starts at once on one worker
    while the other takes the rest."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/compat" if nodeid.startswith("tests/compat/") else nodeid.split("::", 1)[0]

    return ByModule(config, log)


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
