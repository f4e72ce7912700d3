"""Fetch the pictures of data/photos.csv into build/photos/{train,train-art,train-art2,val,test}/NAME.png.

They come from Debian's packages (`apt-get download`, pinned to the manifest's versions; every
picture's licence and author are in the manifest, the package's metadata says the same):
plasma-workspace-wallpapers' natural photos (train, val, test) and its rendered artwork,
smooth gradients and sharp edges (train-art, and six in val); ukui-wallpapers' rendered
artwork (train-art2, added with stage 11 so that earlier stages stay reproducible). Each is scaled to 800 px on
its long side (PIL's Lanczos, the same bytes every run) and written as PNG. Split by file:
training never reads val/ or test/.
Not used anywhere, on purpose: mate-backgrounds, lomiri-wallpapers* and matplotlib's sample
data, kept for an independent check.

    python data/fetch_photos.py [--out build/photos]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

LONG_SIDE = 800
HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/photos"))
    args = ap.parse_args()
    rows = list(csv.DictReader(open(HERE / "photos.csv", encoding="utf-8")))
    todo = [r for r in rows if not (args.out / r["split"] / f"{r['name']}.png").exists()]
    if not todo:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for pkg, ver in sorted({(r["package"], r["version"]) for r in todo}):
            subprocess.run(["apt-get", "download", f"{pkg}={ver}"], cwd=tmp, check=True)
            deb = next(Path(tmp).glob(f"{pkg}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        for r in todo:
            im = Image.open(Path(tmp) / "root" / r["path"]).convert("RGB")
            scale = LONG_SIDE / max(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            dest = args.out / r["split"] / f"{r['name']}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            im.save(dest)
            print(f"{dest}: {im.width}x{im.height}, {r['licence']}, {r['author']}")


if __name__ == "__main__":
    main()
