"""The model runner on the CPU (engine/runner/model_runner.py): the host shortcut that skips the per-step
logprobs lookup while no row holds logprobs. The runner as a whole is covered by the engine tests
(test_fidelity, test_parallel, test_llm); its CUDA paths by test_model_runner_gpu.py."""

import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint("qwen3", tmp_path_factory.mktemp("host-path"))


def test_logprobs_reach_a_request_admitted_after_plain_ones(ckpt):
    """The runner skips the per-step logprobs lookup while no request row holds logprobs; a later request with
    logprobs still gets them, a plain one beside it does not, and a plain one after both finished neither."""
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=4))
    try:
        outs: dict[str, list] = {}

        def run(requests):
            for rid, params in requests:
                engine.add_request(rid, [1, 2, 3, 4], params)
                outs[rid] = []
            while engine.has_work:
                for o in engine.step():
                    if o.token_id is not None:
                        outs[o.rid].append(o)

        plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        run([("a", plain)])
        assert engine.runner.row_table.held["logprobs"] == 0
        run([("b", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)), ("c", plain)])
        run([("d", plain)])
        assert all(o.logprob is not None and len(o.top_logprobs) == 2 for o in outs["b"])
        assert all(o.logprob is None for rid in "acd" for o in outs[rid])
        assert [len(outs[r]) for r in "abcd"] == [4] * 4
        assert [o.token_id for o in outs["b"]] == [o.token_id for o in outs["a"]]  # greedy either way
    finally:
        engine.close()
