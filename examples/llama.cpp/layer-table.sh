#!/usr/bin/env bash
# The per-layer table of docs/llama.cpp.md: for each model, a TopK SAE per layer trained through
# the workbench (capture -> sae-train-capture) on the first 80% of the model's texts (the data
# folder's stories.txt or dreams.txt) and
# judged by sae-llama-evaluate on the other 20% (tokens it never saw): FVU, L0, CE loss recovered
# and KL, as SAELens's evals.py defines them; and a TopK skip transcoder per block, trained on the
# same capture's MLP inputs and outputs (python3 -m libsae train --target) and spliced in the same
# way (its prediction replaces the MLP's output). Prints a markdown table.
#   examples/llama.cpp/layer-table.sh [WORK_DIR]     (default /tmp/libsae-layer-table)
# Needs the programs prepare.sh builds ($LLCPP_BUILD) and the converted models.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
eval "$("$here/prepare.sh")"
work=${1:-/tmp/libsae-layer-table}
python=${SAE_PYTHON:-/usr/bin/python3}
mkdir -p "$work"
rows="$work/rows.jsonl"
: >"$rows"
for model in stories260K aidreams260K; do
    gguf="$LLAMA_CPP_DIR/models/$model.gguf"
    layers=$("$python" -c "import struct,sys; h=open(sys.argv[1],'rb').read(28); print(struct.unpack('7i',h)[2])" \
             "$DATA/$model/model.bin")
    hooks=$(seq -s, -f "blocks.%g.hook_resid_pre" 0 $((layers - 1))),$(seq -s, -f \
        "blocks.%g.hook_mlp_in" 0 $((layers - 1))),$(seq -s, -f "blocks.%g.hook_mlp_out" 0 $((layers - 1)))
    dir="$work/$model"
    texts="$DATA/$model/stories.txt"
    [ -f "$texts" ] || texts="$DATA/$model/dreams.txt"
    mkdir -p "$dir"
    total=$(wc -l <"$texts")
    head -n $((total * 4 / 5)) "$texts" >"$dir/train.txt"
    tail -n $((total - total * 4 / 5)) "$texts" >"$dir/eval.txt"
    for part in train eval; do
        "$LLCPP_BUILD/sae-llama-capture" -m "$gguf" --hooks "$hooks" --corpus "$dir/$part.txt" \
            -o "$dir/cap-$part" --no-progress --threads 1 >"$dir/cap-$part.log"
    done
    "$LLCPP_BUILD/sae-train-capture" "$dir/cap-train" -o "$dir/topk" \
        --hooks "$(seq -s, -f "blocks.%g.hook_resid_pre" 0 $((layers - 1)))" --arch topk --k 8 \
        --latents 512 >"$dir/train.log"
    mkdir -p "$dir/transcoder"
    for ((l = 0; l < layers; l++)); do
        PYTHONPATH="$here/../../bindings/python" LIBSAE_LIBRARY="$LLCPP_BUILD/libsae/lib/libsae.so" \
            "$python" -m libsae train --arch topk -k 8 --d-sae 512 --steps 1500 --batch-size 256 \
            --skip --target "$dir/cap-train/shard-00000.blocks.$l.hook_mlp_out.npy" -q \
            "$dir/cap-train/shard-00000.blocks.$l.hook_mlp_in.npy" \
            "$dir/transcoder/blocks.$l.safetensors" >>"$dir/train.log"
    done
    for ((l = 0; l < layers; l++)); do
        hook="blocks.$l.hook_resid_pre"
        "$LLCPP_BUILD/sae-llama-evaluate" -m "$gguf" --dict "$dir/topk/$hook.safetensors" \
            --hook "$hook" --capture "$dir/cap-eval" --threads 1 |
            "$python" -c "import json,sys; r=json.loads(sys.stdin.read()); r['model']='$model'; r['dict']='TopK SAE'; print(json.dumps(r))" \
            >>"$rows"
        "$LLCPP_BUILD/sae-llama-evaluate" -m "$gguf" --dict "$dir/transcoder/blocks.$l.safetensors" \
            --hook "blocks.$l.hook_mlp_in" --capture "$dir/cap-eval" --threads 1 |
            "$python" -c "import json,sys; r=json.loads(sys.stdin.read()); r['model']='$model'; r['dict']='TopK skip transcoder'; print(json.dumps(r))" \
            >>"$rows"
    done
done
"$python" - "$rows" <<'EOF'
import json, sys
print("| model | dictionary | hook | tokens | FVU | L0 | CE loss clean / spliced / zero | CE loss recovered | KL (spliced) |")
print("|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"| {r['model']} | {r['dict']} | `{r['hook']}` | {r['tokens']} | {r['fvu']:.3f} | {r['l0']:.1f} | "
          f"{r['ce_loss_clean']:.3f} / {r['ce_loss_spliced']:.3f} / {r['ce_loss_zero_ablated']:.3f} | "
          f"{r['ce_loss_recovered']:.3f} | {r['kl_spliced']:.3f} |")
EOF
