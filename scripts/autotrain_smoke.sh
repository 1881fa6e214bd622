#!/usr/bin/env bash
# AutoTrain smoke test: `autotrain llm --train --trainer sft --peft` fine-tunes a retnet-hf folder offline.
#
# autotrain-advanced 0.8.36 pins transformers 4.48, trl 0.13, peft 0.14, so it gets its own
# virtual environment (VENV, default /tmp/venv-autotrain; reused when it already has autotrain). The model folder is
# made with this repository's environment (transformers 5.x) and trained by AutoTrain under 4.48 through the code the
# folder carries (trust_remote_code). Run from anywhere: bash scripts/autotrain_smoke.sh [WORK_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"                    # the project's interpreter (transformers 5.x, retnet_hf installed)
VENV="${AUTOTRAIN_VENV:-/tmp/venv-autotrain}"
WORK="${1:-$(mktemp -d /tmp/autotrain-smoke.XXXXXX)}"
DATA="$ROOT/retnet_hf/sample_data/guanaco-llama2-300.parquet"  # the package's sample chat rows
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -x "$VENV/bin/autotrain" ]; then
    start=$(date +%s)
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0 autotrain-advanced==0.8.36
    # autotrain pulls a torchvision built for another torch; its import (through timm, which accelerate's CLI
    # imports) fails with "operator torchvision::nms does not exist". Neither is needed for LLM fine-tuning.
    "$VENV/bin/pip" uninstall -q -y torchvision timm
    echo "autotrain venv installed in $(( $(date +%s) - start )) s"
fi

# A tiny RetNet folder (saved with its code and a tokenizer_config naming PreTrainedTokenizerFast, which 4.48
# needs) and 16 guanaco rows as a local jsonl.
mkdir -p "$WORK/data"
"$PYTHON" - "$WORK" "$DATA" <<'EOF'
import json, sys
import pandas as pd
import torch
from retnet_hf import RetNetConfig, RetNetForCausalLM
from retnet_hf.data import save_tokenizer, set_chat_template, to_guanaco, train_tokenizer

work, data = sys.argv[1], sys.argv[2]
rows = [to_guanaco(t) for t in pd.read_parquet(data)["text"][:200]]
tok = set_chat_template(train_tokenizer(rows, 512))
torch.manual_seed(0)
config = RetNetConfig(vocab_size=len(tok), decoder_embed_dim=64, decoder_value_embed_dim=128,
                      decoder_ffn_embed_dim=128, decoder_layers=2, decoder_retention_heads=2,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
RetNetForCausalLM(config).save_pretrained(f"{work}/model")
save_tokenizer(tok, f"{work}/model")
with open(f"{work}/data/train.jsonl", "w") as f:
    for row in rows[:16]:
        f.write(json.dumps({"text": row}) + "\n")
EOF

# The command (also in the README). --project-name must be a bare name: AutoTrain writes it under the current folder.
cd "$WORK"
PATH="$VENV/bin:$PATH" autotrain llm --train --model "$WORK/model" --data-path "$WORK/data" --train-split train \
    --text-column text --project-name retnet-sft --trainer sft --peft --quantization none \
    --target-modules all-linear --epochs 1 --batch-size 4 --gradient-accumulation 1 --block_size 64 \
    --model-max-length 128 --lr 1e-3 --logging-steps 1 --backend local 2>&1 | tee "$WORK/autotrain.log"

# AutoTrain reports failures in its log but can exit 0: check that an adapter was written and that it loads on the
# base model under transformers 4.48 and changes its output.
test -f "$WORK/retnet-sft/adapter_model.safetensors" || { echo "AUTOTRAIN SMOKE FAILED: no adapter in $WORK/retnet-sft"; exit 1; }
"$VENV/bin/python" - "$WORK" <<'EOF'
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

work = sys.argv[1]
base = AutoModelForCausalLM.from_pretrained(f"{work}/model", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(f"{work}/retnet-sft")
ids = tok("### Human: Hello### Assistant:", return_tensors="pt").input_ids
with torch.no_grad():
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, f"{work}/retnet-sft").eval()
    after = tuned(ids).logits
adapted = sorted({n.split(".")[-1] for n, m in tuned.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)})
print("adapted projections:", adapted)
assert adapted == sorted(["q_proj", "k_proj", "v_proj", "g_proj", "out_proj", "fc1", "gate", "fc2"]), adapted
assert (after - before).abs().max() > 0, "the adapter did not change the output"
import re
losses = [float(x) for x in re.findall(r"'loss': ([0-9.]+)", open(f"{work}/autotrain.log").read())]
first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
print(f"training loss: first 10 steps {first:.3f}, last 10 steps {last:.3f} ({len(losses)} logged)")
assert len(losses) >= 20 and last < first, "the training loss did not fall"
print("AUTOTRAIN SMOKE OK: adapter trained by autotrain (transformers 4.48) loads, changes the logits, loss fell")
EOF
