"""The demo checkpoint (engine/demo.py): built twice, it is the same bytes."""

from ringllm.engine.demo import build_demo_checkpoint, checkpoint_digest


def test_demo_checkpoint_is_deterministic(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    build_demo_checkpoint(tmp_path / "a")
    build_demo_checkpoint(tmp_path / "b")
    assert checkpoint_digest(tmp_path / "a") == checkpoint_digest(tmp_path / "b")
