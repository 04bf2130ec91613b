"""Language models: GPT-2 in Flax NNX, LoRA, DP fine-tuning and the Secret Sharer exposure test.

* :mod:`jaxdp.lm.model`     -- :class:`GPT2` / :class:`GPT2Config`, loading local Hugging Face safetensors.
* :mod:`jaxdp.lm.tokenizer` -- local ``tokenizer.json`` via ``tokenizers``, byte-level fallback.
* :mod:`jaxdp.lm.lora`      -- LoRA adapters (:func:`apply_lora`, :func:`merge_lora`), freezing filters.
* :mod:`jaxdp.lm.finetune`  -- per-sequence loss, DP and non-private fine-tuning of the trainable part only.
* :mod:`jaxdp.lm.exposure`  -- canaries, exact and extrapolated exposure.
"""
from jaxdp.lm.exposure import (CanaryFormat, all_candidate_scores, exposure, exposure_from_rank,
                               extrapolated_exposure, rank_of, sample_candidate_scores)
from jaxdp.lm.finetune import (TRAINABLE, FinetuneResult, finetune, make_dp_step, make_loss_fn,
                               make_nonprivate_step, merge_model, sequence_nll, split_trainable)
from jaxdp.lm.lora import LoRALinear, apply_lora, last_k_filter, lora_filter, merge_lora
from jaxdp.lm.model import GPT2, GPT2Config, load_pretrained, save_pretrained
from jaxdp.lm.tokenizer import ByteTokenizer, encode_batch, load_tokenizer

__all__ = [
    "GPT2", "GPT2Config", "load_pretrained", "save_pretrained", "ByteTokenizer", "load_tokenizer",
    "encode_batch", "LoRALinear", "apply_lora", "merge_lora", "lora_filter", "last_k_filter", "TRAINABLE",
    "split_trainable", "merge_model", "sequence_nll", "make_loss_fn", "make_dp_step", "make_nonprivate_step",
    "finetune", "FinetuneResult", "CanaryFormat", "exposure", "exposure_from_rank", "rank_of",
    "extrapolated_exposure", "all_candidate_scores", "sample_candidate_scores",
]
