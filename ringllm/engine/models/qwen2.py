"""Qwen2 and Qwen2.5: bias on the q/k/v projections, no q/k norm."""

from ringllm.engine.models.decoder import DecoderForCausalLM, ModelShape


class Qwen2ForCausalLM(DecoderForCausalLM):
    @staticmethod
    def read_shape(cfg: dict) -> ModelShape:
        return ModelShape.from_hf_config(cfg, qkv_bias=True, qk_norm=False)
