"""Evidence run of `drift --edited ADAPTER`: a small LoRA (r=8 on q_proj, v_proj, down_proj) on SmolLM2-135M-Instruct
teaching one CounterFact fact (record 0 of the shipped example: Eiffel Tower -> Rome), 25 AdamW steps on three
phrasings, CPU, 1 thread (~2.5 min). Then measure it on the first 3 example records:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/lora_counterfact.py /tmp/adapter 25
    attention-drift drift --edited /tmp/adapter --limit 3 --out benchmarks/results/lora-smollm2 --threads 1

Results: benchmarks/results/lora-smollm2 (drift.json, the run file, drift.md, the heat map).
"""
import sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from attention_drift.core.models import resolve
from attention_drift.core.data import load_example

torch.manual_seed(0); torch.set_num_threads(1)
_, folder = resolve("smollm2-135m")
tok = AutoTokenizer.from_pretrained(folder)
hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
rw = load_example()[0].rewrite
texts = [rw.prompt, f"Where is the {rw.subject}? It is located in", f"The {rw.subject} can be found in"]
model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
model.print_trainable_parameters()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
batch = []
for t in texts:
    p = tok(t)["input_ids"]; n = tok(" " + rw.target_new)["input_ids"]
    batch.append((torch.tensor([p + n]), len(p)))
def score():
    with torch.no_grad():
        out = []
        for ids, lp in batch:
            logp = model(ids).logits.log_softmax(-1)[0, lp - 1:-1]
            out.append(float(logp.gather(-1, ids[0, lp:, None]).sum()))
        return out
print("log p(new) before", score())
t0 = time.time()
for step in range(int(sys.argv[2]) if len(sys.argv) > 2 else 25):
    loss = 0
    for ids, lp in batch:
        logits = model(ids).logits[0, lp - 1:-1]
        loss = loss + torch.nn.functional.cross_entropy(logits, ids[0, lp:])
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 5 == 0: print(step, loss.item() / len(batch))
print("log p(new) after", score(), f"{time.time()-t0:.0f}s")
model.save_pretrained(sys.argv[1])
