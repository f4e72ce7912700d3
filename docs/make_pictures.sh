#!/bin/sh
# Regenerate the README pictures from tilerun's own outputs on sample_images/.
#
#   docs/make_pictures.sh                      # with the default (shipped) weights
#   MODEL=path/to/weights.safetensors docs/make_pictures.sh
#
# Runs `tilerun run sample_images OUT --preview`, then shrinks the previews of the
# images that have holes (chelsea and coffee carry sidecar masks) plus one without,
# to at most 960 px wide, 256-colour PNG: the three stay well under 1.5 MB in git.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# shellcheck disable=SC2086  # MODEL may be empty: no --model then
$PY -m tilerun run sample_images "$tmp/out" --preview ${MODEL:+--model "$MODEL"}

for name in chelsea coffee astronaut; do
    $PY - "$tmp/out/$name.preview.png" "docs/$name.preview.png" <<'PYEOF'
import sys
from PIL import Image

with Image.open(sys.argv[1]) as im:
    im = im.convert("RGB")
im.thumbnail((960, 960), Image.Resampling.LANCZOS)
# 256 colours: the class map and legend are flat colours already; photos dither well.
im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
    sys.argv[2], optimize=True
)
print(sys.argv[2], im.size)
PYEOF
done
du -ch docs/*.preview.png | tail -n 1
