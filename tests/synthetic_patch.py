"""Synthetic patching run lines shaped like ``patch_record``'s (no sweeps, no random control), for
the report and figures tests: ``patch_from_lines(synthetic_patch_lines(...))`` is a ``patch.json``."""

import numpy as np

from attention_drift.measure.patch_record import CONTAMINATION_COMPONENTS, KEY_POSITIONS, SUMMARY_VARIANTS


def synthetic_patch_lines(case_ids, n_layers: int = 6, prompts: int = 2, seed: int = 0,
                          mlp_drop: float = 0.3, attn_drop: float = 0.2) -> list[dict]:
    """One line per case id: ``prompts`` distract prompts (pre: the true answer wins; post: the new
    target wins) and one contamination entry whose substituted MLP / attention outputs lower
    log P(true) by about ``mlp_drop`` / ``attn_drop`` nats at the last position."""
    rng = np.random.default_rng(seed)
    lines = []
    for case_id in case_ids:
        cases = []
        for i in range(prompts):
            pre, post = [-1.0 + 0.1 * rng.standard_normal(), -3.0], [-3.0, -1.0 + 0.1 * rng.standard_normal()]
            cases.append({"prompt": f"p{case_id}-{i}", "group": "distract_neighborhood", "pre": pre, "post": post,
                          "variants": {v: [-2.0, -2.0] for v in SUMMARY_VARIANTS}})
        lp_pre = -1.0 + 0.1 * rng.standard_normal()
        components = {}
        for comp, drop in zip(CONTAMINATION_COMPONENTS, (mlp_drop, attn_drop)):
            lp_true = np.full((len(KEY_POSITIONS), n_layers), lp_pre)
            lp_true[-1] -= drop * (1 + 0.1 * rng.standard_normal(n_layers))
            components[comp] = {"lp_true": lp_true.tolist(), "lp_new": np.full_like(lp_true, -3.0).tolist()}
        contamination = [{"prompt": f"p{case_id}-0", "pre": [lp_pre, -3.0], "post": [lp_pre - 1.0, -1.0],
                          "positions": [1, 2, 3], "tokens": ["a", "b", "c"], "labels": list(KEY_POSITIONS),
                          "components": components}]
        lines.append({"case_id": case_id, "kind": "counterfact", "cases": cases, "sweeps": [],
                      "contamination": contamination, "top_heads": [[0, 0, 0.1]], "method": "rome"})
    return lines
