import sys, time, torch, statistics
torch.set_num_threads(2)
import attention_drift
from attention_drift.core.models import load_model
from attention_drift.core.data import load_example
from attention_drift.editing import apply_edit
print(attention_drift.__file__)
model = load_model("smollm2-135m")
recs = sorted(load_example(), key=lambda r: r.kind != "counterfact")[:3]
apply_edit(model, recs[0].rewrite, "rome", progress=False).restore()
ts = []
for rep in range(2):
    for r in recs:
        t = time.perf_counter(); res = apply_edit(model, r.rewrite, "rome", progress=False); ts.append(time.perf_counter() - t); res.restore()
print("ROME s/edit", [round(x, 2) for x in ts], "median", round(statistics.median(ts), 2))
