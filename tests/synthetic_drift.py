"""Synthetic drift runs shaped like a SmolLM2-135M run (30 layers x 9 heads), for the explorer tests.

Each record's line has the fields of ``analysis.drift_record``; patterns (when asked for) are
causal softmax rows with a first-token sink, and the line's per-head values are read off them
(prediction row -> subject's last token), so pattern panels and measured values agree.
"""

import json

import numpy as np

SUBJECTS = ["Danielle Darrieux", "Toyota Corolla", "Eiffel Tower", "Akira Nakamura", "Louvre Museum",
            "Barack Obama", "Apple A5", "Kenneth Clarke", "Lake Geneva", "Honda Civic", "Leonhard Euler"]
GROUPS = ("distract_neighborhood", "distract_relation")


def _tokens(text: str) -> list[str]:
    words = text.split(" ")
    return ["<|endoftext|>", words[0]] + [" " + w for w in words[1:]]


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Causal attention rows of [q, q] scores."""
    q = scores.shape[-1]
    return _softmax(np.where(np.tril(np.ones((q, q), dtype=bool)), scores, -np.inf))


def synthetic_run(n_records: int = 3, prompts_per_record: tuple[int, int] = (3, 2), n_layers: int = 30,
                  n_heads: int = 9, seed: int = 0, method: str = "rome", sadr: bool = False,
                  pattern_heads: int = 4, drifting: tuple[tuple[int, int], ...] = ((17, 3), (20, 5), (12, 1)),
                  shift: float = 0.0):
    """(lines, patterns): ``[{"meta": ...}, record lines...]`` and ``{(case_id, prompt_index):
    pattern dict}`` with the patterns of the ``pattern_heads`` first ``drifting`` heads (and the
    next heads by index) on every prompt. ``drifting`` heads gain attention to the subject's last
    token; ``shift`` scales that gain down (a run "with SADR" uses e.g. 0.7)."""
    rng = np.random.default_rng(seed)
    lines = [{"meta": {"format": "attention_drift.analysis.drift/1", "model": "smollm2-135m", "method": method,
                       "edit": {"stats_samples": 300, "sadr": {"weight": 0.01} if sadr else None},
                       "groups": list(GROUPS)}}]
    stored = list(drifting[:pattern_heads])
    extra = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in stored]
    stored += extra[: max(0, pattern_heads - len(stored))]
    patterns = {}
    for r in range(n_records):
        subject = SUBJECTS[r % len(SUBJECTS)]
        case_id = 1000 + r
        target_new = ["Rome", "English", "Tokyo", "violin"][r % 4]
        target_true = ["Paris", "French", "Berlin", "piano"][(r + 1) % 4]
        edit_sentence = f"{subject} is located in {target_new}."
        samples, before, after, kls = [], [], [], []
        n_p = prompts_per_record[r % len(prompts_per_record)]
        for i in range(n_p):
            group = GROUPS[i % 2]
            other = SUBJECTS[(r + i + 3) % len(SUBJECTS)]
            prompt = f"{edit_sentence} {other} is a famous example from the city of"
            toks = _tokens(prompt)
            q = len(toks)
            subject_last = len(_tokens(subject)) - 1
            query = q - 1
            rows = rng.normal(0.0, 1.2, (n_layers, n_heads, q))
            rows[..., 0] += 3.0
            gain = np.zeros((n_layers, n_heads))
            for k, (l, h) in enumerate(drifting):
                gain[l, h] = (3.5 - 1.0 * k) * (1.0 - shift) * rng.uniform(0.9, 1.1)
            gain += rng.normal(0, 0.15, gain.shape)
            moved = rows + rng.normal(0, 0.05, rows.shape)
            moved[..., subject_last] += gain
            row_b, row_a = _softmax(rows), _softmax(moved)
            full = {}
            for l, h in stored:
                scores = rng.normal(0.0, 1.2, (q, q))
                scores[:, 0] += 3.0
                later = scores + rng.normal(0, 0.3, (q, q)) * (np.arange(q)[:, None] > subject_last)
                scores[query], later[query] = rows[l, h], moved[l, h]
                full[(l, h)] = (_softmax_rows(scores), _softmax_rows(later))
            b = row_b[..., subject_last]
            a = row_a[..., subject_last]
            kl = (row_b * (np.log(row_b + 1e-8) - np.log(row_a + 1e-8))).sum(-1)
            before.append(b), after.append(a), kls.append(kl)
            lp_true_before = float(rng.uniform(-4, -1))
            lp_new_before = float(rng.uniform(-9, -5))
            drift_max = float((a - b).max())
            lp_true_after = lp_true_before - 2.5 * drift_max * float(rng.uniform(0.5, 1.5))
            lp_new_after = lp_new_before + 16.0 * drift_max * float(rng.uniform(0.3, 1.5))
            fails = lp_new_after > lp_true_after
            samples.append({
                "case_id": case_id, "group": group, "prompt": prompt, "target_true": target_true,
                "factors": {"max_drift_subject_last": drift_max, "sum_drift_subject_last": float((a - b).sum()),
                            "max_drift_subject": drift_max, "sum_drift_subject": float((a - b).sum()),
                            "max_drift_prompt_subject_last": float("nan"), "max_drift_edit_sentence": drift_max,
                            "max_drift_target_new": float(rng.uniform(0, 0.05)), "max_kl": float(kl.max()),
                            "sum_kl": float(kl.sum())},
                "lp_true_before": lp_true_before, "lp_new_before": lp_new_before, "lp_true_after": lp_true_after,
                "lp_new_after": lp_new_after, "fails": bool(fails),
                "flipped": bool(fails and not lp_new_before > lp_true_before),
                "severity": {"logodds_drop": (lp_true_before - lp_new_before) - (lp_true_after - lp_new_after)},
            })
            patterns[(case_id, i)] = {
                "tokens": toks, "query": query, "subject_last": subject_last,
                "heads": {head: {"before": pb.astype(np.float16), "after": pa.astype(np.float16)}
                          for head, (pb, pa) in full.items()},
            }
        line = {"case_id": case_id, "kind": "counterfact", "subject": subject, "target_new": target_new,
                "samples": samples,
                "heads": {"subject_last_before": np.stack(before).tolist(), "subject_last_after": np.stack(after).tolist(),
                          "delta_subject": (np.stack(after) - np.stack(before)).tolist(), "kl": np.stack(kls).tolist()},
                "edit_seconds": 1.5, "method": method}
        if sadr:
            selected = np.zeros((n_layers, n_heads))
            selected[4:] = rng.uniform(0, 1, (n_layers - 4, n_heads)) * (rng.uniform(0, 1, (n_layers - 4, n_heads)) > 0.8)
            for l, h in drifting:
                selected[l, h] = 0.9
            line["sadr_selected"] = selected.round(4).tolist()
        lines.append(line)
    return lines, patterns


def write_run(folder, lines) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "drift_records.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
