"""Llama 3 (3, 3.1, 3.2): no q/k norm, optional attention bias, llama3 rotary scaling (see layers.rope_inv_freq)."""

from ringllm.engine.models.decoder import DecoderForCausalLM, ModelShape


class LlamaForCausalLM(DecoderForCausalLM):
    @staticmethod
    def read_shape(cfg: dict) -> ModelShape:
        return ModelShape.from_hf_config(cfg, qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=False)
