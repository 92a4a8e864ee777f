"""Seeded ancestral sampling from a bridge's model, shared by the statistics corpus and the
context templates (KV-cached, temperature 1, optional top-k)."""

import torch


@torch.no_grad()
def sample_tokens(
    model, prefix: list[int], batch: int, length: int, generator: torch.Generator, top_k: int | None = None
) -> list[list[int]]:
    """``batch`` continuations of ``prefix`` up to ``length`` tokens in all (KV-cached sampling).

    Temperature 1; ``top_k`` restricts each step to the k most likely tokens. With
    transformers 5 the decoder layers hand the KV cache to attention as ``cache=``, while
    the bridge's attention reads ``past_key_values=``, so the cache would stay empty and
    every step would see only its own token; a temporary pre-hook passes it under both
    names (and generation falls back to full forwards if the cache still does not fill).
    """
    ids = torch.tensor([prefix] * batch, dtype=torch.long)
    if ids.shape[1] >= length:
        return ids[:, :length].tolist()
    handles = [block.attn.register_forward_pre_hook(_pass_cache, with_kwargs=True) for block in model.blocks]
    try:
        hf = model.original_model
        out = hf(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        cached = cache is not None and cache.get_seq_length() == ids.shape[1]
        while True:
            nxt = _draw(out.logits[:, -1].float(), generator, top_k)
            ids = torch.cat([ids, nxt], dim=1)
            if ids.shape[1] >= length:
                return ids.tolist()
            out = hf(input_ids=nxt, cache=cache, use_cache=True) if cached else hf(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()


def _pass_cache(module, args, kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


def _draw(logits: torch.Tensor, generator: torch.Generator, top_k: int | None) -> torch.Tensor:
    if top_k is None:
        return torch.multinomial(torch.softmax(logits, -1).to(generator.device), 1, generator=generator).to(logits.device)
    values, indices = logits.topk(top_k, dim=-1)
    probs = torch.softmax(values, -1).to(generator.device)  # draws reproducible on any model device
    return indices.gather(-1, torch.multinomial(probs, 1, generator=generator).to(indices.device))
