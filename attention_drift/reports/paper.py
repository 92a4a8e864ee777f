"""What the paper reports, as data: the reference each figure of the gallery prints beside ours.

Source: *Revealing and Mitigating Over-Attention in Knowledge Editing* (ICLR 2025); GPT-J-6B with
ROME unless a line says otherwise (its Table 3 and Section 3). Where the paper measured something
else than the figure shows (a P(true) change against our accuracy or log-odds), the line says
what the paper measured, so no one reads the two as the same protocol.
"""

REPORTED: dict[str, str] = {
    "prevalence": "Paper (GPT-J-6B, ROME): neighbourhood 82.4 → 80.3, distract neighbourhood 62.0 → 30.4, "
                  "relation 79.7 → 11.9.",
    "main_table": "Paper (GPT-J-6B), distract neighbourhood pre 62.0: ROME 30.4, +SADR 49.4; MEMIT 38.0, +SADR 47.4; "
                  "PMET 39.8, +SADR 47.5.",
    "case_study": "Paper (GPT-2 XL, ROME, 'Eiffel Tower is located in' → New York): P(Egypt) 0.716 before, 0.0002 after, "
                  "0.762 with the pre-edit attention of layers 20-47 restored.",
    "drift_vs_failure": "Paper (GPT-J-6B, ROME): Pearson r 0.49-0.62 (p < 1e-5) of the max drift to the subject's last "
                        "token with failure severity, on DNS and RS prompts.",
    "drift_failure_links": "Paper (GPT-J-6B, ROME): Pearson r 0.49-0.62 (p < 1e-5) of the max drift to the subject's "
                           "last token with failure severity, on DNS and RS prompts.",
    "patch_accuracy": "Paper (GPT-J-6B, ROME): restoring the pre-edit attention of a 10-layer window raises P(true) by "
                      "28.6% to 739.2% (relative; measured as P(true), not accuracy).",
    "patch_windows": "Paper (GPT-J-6B, ROME): restoring the pre-edit attention of a 10-layer window raises P(true) by "
                     "28.6% to 739.2% (relative; measured as P(true), not log-odds).",
    "patch_contamination": "Paper (GPT-J-6B, ROME): edited outputs over 6 layers at one position lower P(correct) by up "
                           "to 4.59% (MLP), 3.74% (attention), 5.26% (whole model); measured as P(true) (the right panel).",
}
"""Reference line per figure name (the file stem); figures without an entry have no paper value."""

CONTAMINATION: dict[str, float] = {"mlp_out": 4.59, "attn_out": 3.74, "whole model": 5.26}
"""The paper's contamination numbers (GPT-J-6B, ROME): the largest drop of P(correct), in %, that the
edited MLP / attention outputs over 6 layers at one position (and the whole edited model) cause."""

