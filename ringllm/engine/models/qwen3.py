"""Qwen3: no q/k/v bias, RMSNorm on each head of q and k before rotary."""

from ringllm.engine.models.decoder import DecoderForCausalLM, ModelShape


class Qwen3ForCausalLM(DecoderForCausalLM):
    @staticmethod
    def read_shape(cfg: dict) -> ModelShape:
        return ModelShape.from_hf_config(cfg, qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=True)
