"""Training: masks, palette, loss goes down, exact resume, safe checkpoints, DDP under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tilerun.masks import random_mask
from tilerun.model import TileNetConfig, default_palette, load_tilenet, read_metadata
from tilerun.train import (
    TrainConfig,
    TrainingError,
    compute_loss,
    kmeans_palette,
    make_batch,
    make_picture_batch,
    merge,
    nearest_class,
    optimizer_path,
    picture_inputs,
    train,
)

# Small enough that a step takes milliseconds; the same architecture as the shipped one.
TINY = TileNetConfig(classes=4, stem=4, mid=4, width=8, global_dim=8, prefill_radii=(1, 3), prefill_iterations=4)


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(steps=4, crop=32, batch_size=2, classes=4, checkpoint_every=2, kmeans_samples=2000, warmup=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    """Two 53x71 photos-ish: smooth gradients with blocks of four colours (odd sizes on purpose)."""
    d = tmp_path_factory.mktemp("train_images")
    rng = np.random.default_rng(0)
    for i in range(2):
        yy, xx = np.mgrid[0:53, 0:71]
        im = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).astype(np.float64)
        im[10:30, 20 + 10 * i : 45 + 10 * i] = (220, 30, 40)
        im[35:50, 5:25] = (20, 200, 60)
        im += rng.normal(0, 4, im.shape)
        Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(d / f"img{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "too_small.png")  # skipped: under the crop
    return d


# -- masks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [None, "thick", "thin", "box"])
def test_masks_bounded_nonempty_deterministic(kind):
    covs = []
    for seed in range(30):
        m = random_mask(np.random.default_rng(seed), 37, 64, kind=kind, max_coverage=0.5)
        assert m.shape == (37, 64) and m.dtype == bool
        assert 0 < m.mean() <= 0.5
        again = random_mask(np.random.default_rng(seed), 37, 64, kind=kind, max_coverage=0.5)
        assert np.array_equal(m, again)
        covs.append(m.mean())
    assert max(covs) > 0.1  # not degenerate: some masks are big
    assert len({round(c, 4) for c in covs}) > 15  # and they vary


def test_mask_kinds_differ_and_scale_keeps_coverage():
    def mean_cov(kind, size, scale=None):
        return np.mean([random_mask(np.random.default_rng(s), size, size, kind=kind, scale=scale).mean()
                        for s in range(40)])

    assert mean_cov("thin", 128) < 0.6 * mean_cov("thick", 128)
    # Holes sized for a 128 crop on a 512 image: 16x the holes, about the same coverage, smaller holes.
    assert abs(mean_cov("thick", 512, 128) - mean_cov("thick", 128)) < 0.08
    big = random_mask(np.random.default_rng(1), 512, 512, kind="box")
    small = random_mask(np.random.default_rng(1), 512, 512, kind="box", scale=128)
    from scipy.ndimage import label

    assert label(small)[1] > label(big)[1]
    with pytest.raises(ValueError, match="kind"):
        random_mask(np.random.default_rng(0), 8, 8, kind="circle")


def test_mask_coverage_cap_is_enforced():
    for seed in range(30):
        m = random_mask(np.random.default_rng(seed), 40, 40, kind="thick", max_coverage=0.05)
        assert m.mean() <= 0.05


# -- classes --------------------------------------------------------------------------------------
def test_kmeans_palette_recovers_colours():
    rng = np.random.default_rng(0)
    colours = np.array([[200, 20, 30], [10, 10, 10], [40, 220, 90]])
    im = colours[rng.integers(0, 3, (60, 60))] + rng.integers(-3, 4, (60, 60, 3))
    pal = kmeans_palette([np.clip(im, 0, 255).astype(np.uint8)], 3, seed=1, samples=5000)
    assert pal.dtype == np.uint8 and pal.shape == (3, 3)
    lum = pal.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lum) >= 0)  # sorted dark to light
    for c in colours:
        assert np.abs(pal.astype(int) - c).sum(1).min() <= 4
    with pytest.raises(TrainingError, match="distinct"):
        kmeans_palette([np.zeros((4, 4, 3), np.uint8)], 2)


def test_nearest_class():
    pal = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1, 0, 0]])
    rgb = torch.tensor([[0.1, 0.9, 0.8], [0.1, 0.9, 0.1], [0.1, 0.9, 0.1]])[None, :, :, None]  # 3 pixels
    assert nearest_class(rgb, pal)[0, :, 0].tolist() == [0, 1, 2]


def test_batches_are_a_function_of_seed_step_rank():
    ims = [np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)]
    cfg = tiny_cfg()
    a = make_batch(ims, step=3, rank=0, cfg=cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, make_batch(ims, step=3, rank=0, cfg=cfg)))
    assert not np.array_equal(a[1], make_batch(ims, step=3, rank=1, cfg=cfg)[1])
    assert not np.array_equal(a[1], make_batch(ims, step=4, rank=0, cfg=cfg)[1])


def test_augmented_crops_are_rotations_and_channel_orders_of_a_crop():
    im = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    cfg = tiny_cfg(crop=8, batch_size=64, augment=True)
    crops, _ = make_batch([im], step=0, rank=0, cfg=cfg)
    assert all(np.array_equal(x, y) for x, y in zip(crops, make_batch([im], step=0, rank=0, cfg=cfg)[0]))
    windows = {im[y : y + 8, x : x + 8].tobytes() for y in range(33) for x in range(43)}
    kinds = set()
    for c in crops:
        found = [(k, f, tuple(p)) for k in range(4) for f in (False, True)
                 for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                 if np.ascontiguousarray(np.rot90(c, -k)[:, ::-1][..., np.argsort(p)] if f
                                         else np.rot90(c, -k)[..., np.argsort(p)]).tobytes() in windows]
        assert found, "an augmented crop is no rotation/flip/channel order of any window of the image"
        kinds.add(found[0][0])
    assert kinds == {0, 1, 2, 3}  # every rotation occurs in 64 crops


def test_picture_batches_cut_their_crops_from_their_pictures():
    im = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    cfg = tiny_cfg(crop=16, batch_size=8, augment=True, picture_context=True)
    crops, masks, pictures, origins = make_picture_batch([im], step=2, rank=0, cfg=cfg)
    again = make_picture_batch([im], step=2, rank=0, cfg=cfg)
    assert np.array_equal(crops, again[0]) and np.array_equal(masks, again[1])
    assert not np.array_equal(masks, make_picture_batch([im], step=2, rank=1, cfg=cfg)[1])
    for crop, pic, (y, x) in zip(crops, pictures, origins):
        assert np.array_equal(pic[y : y + 16, x : x + 16], crop)
        assert sorted(pic.shape[:2]) == [40, 50] and np.array_equal(np.sort(pic, None), np.sort(im, None))
    assert {p.shape[:2] for p in pictures} == {(40, 50), (50, 40)}  # turned with their crops


def test_picture_inputs_give_a_crop_its_pictures_summary_and_context():
    from tilerun.model import TileNet

    cfg = TileNetConfig.from_dict({**TINY.to_dict(), "class_prior": True, "class_fill": True, "coarse_scale": 8,
                                   "class_cells": 2})
    torch.manual_seed(0)
    net = TileNet(cfg, default_palette(4)).eval()
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 255, (72, 56, 3), dtype=np.uint8), rng.integers(0, 255, (40, 96, 3), dtype=np.uint8)]
    holes = np.zeros((2, 32, 32), bool)
    holes[:, 4:28, 6:30] = True

    def crop_alone(i, y, x):
        t = torch.from_numpy(pictures[i][y : y + 32, x : x + 32].copy()).permute(2, 0, 1)[None].float() / 255
        return t, torch.from_numpy(holes[i : i + 1, None]).float()

    with torch.no_grad():
        # A crop that is its whole picture: the same bits as its own summary and context.
        whole = [p[:32, :32].copy() for p in pictures]
        kw = picture_inputs(net, whole, holes, [(0, 0), (0, 0)], torch.device("cpu"))
        x = torch.cat([crop_alone(0, 0, 0)[0], crop_alone(1, 0, 0)[0]])
        m = torch.from_numpy(holes[:, None]).float()
        assert all(torch.equal(a, b) for a, b in zip(net(x, m), net(x, m, **kw)))
        # Crops inside bigger pictures of two sizes (one batch, grids padded): each item as the
        # crop given its own picture's summary and context alone, and unlike the crop without them.
        origins = [(20, 12), (4, 60)]
        kw = picture_inputs(net, pictures, holes, origins, torch.device("cpu"))
        x = torch.cat([crop_alone(i, y, x)[0] for i, (y, x) in enumerate(origins)])
        batch = net(x, m, **kw)
        for i, (y, x0) in enumerate(origins):
            one = picture_inputs(net, pictures[i : i + 1], holes[i : i + 1], [(y, x0)], torch.device("cpu"))
            alone = net(x[i : i + 1], m[i : i + 1], **one)
            assert torch.allclose(alone[1], batch[1][i : i + 1], atol=1e-6)
            assert not torch.allclose(net(x[i : i + 1], m[i : i + 1])[1], alone[1], atol=1e-4)


# -- training ------------------------------------------------------------------------------------
def _fixed_loss(model, images_dir: Path, cfg: TrainConfig) -> float:
    ims = [np.asarray(Image.open(images_dir / f"img{i}.png")) for i in range(2)]
    pal = torch.tensor(model.palette, dtype=torch.float32) / 255
    total = 0.0
    with torch.no_grad():
        for step in range(1000, 1004):  # batches the run never saw
            x, m = make_batch(ims, step=step, rank=0, cfg=cfg)
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
            total += compute_loss(model, x, torch.from_numpy(m)[:, None].float(), pal, cfg)[1]["loss"]
    return total / 4


def test_training_lowers_the_loss(images_dir, tmp_path):
    cfg = tiny_cfg(steps=25, checkpoint_every=25, lr=1e-2)
    train([images_dir], out=tmp_path / "a.safetensors", cfg=cfg, net_cfg=TINY, stop_at=1, progress=False)
    train([images_dir], out=tmp_path / "b.safetensors", cfg=cfg, net_cfg=TINY, progress=False)
    before = _fixed_loss(load_tilenet(tmp_path / "a.safetensors"), images_dir, cfg)
    after = _fixed_loss(load_tilenet(tmp_path / "b.safetensors"), images_dir, cfg)
    assert after < 0.85 * before, (before, after)


def test_resume_continues_exactly(images_dir, tmp_path):
    cfg = tiny_cfg(steps=4, checkpoint_every=2)
    full, split = tmp_path / "full.safetensors", tmp_path / "split.safetensors"
    train([images_dir], out=full, cfg=cfg, net_cfg=TINY, progress=False)
    train([images_dir], out=split, cfg=cfg, net_cfg=TINY, stop_at=2, progress=False)
    assert json.loads(read_metadata(split)["training"])["step"] == 2
    mid = load_file(str(split))
    train([images_dir], out=split, cfg=cfg, net_cfg=TINY, resume=True, progress=False)
    a, b = load_file(str(full)), load_file(str(split))
    assert a.keys() == b.keys()
    assert any(not torch.equal(mid[k], b[k]) for k in a)  # the resumed run did train
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = load_file(str(optimizer_path(full))), load_file(str(optimizer_path(split)))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)

    with pytest.raises(TrainingError, match="lr"):
        train([images_dir], out=split, cfg=tiny_cfg(steps=4, lr=0.5), net_cfg=TINY, resume=True, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train([images_dir], out=split, cfg=cfg, net_cfg=TINY, progress=False)  # would overwrite


def test_checkpoint_is_safetensors_with_metadata(images_dir, tmp_path):
    out = tmp_path / "m.safetensors"
    train([images_dir], out=out, cfg=tiny_cfg(steps=2), net_cfg=TINY, exclude=["img1.*"], progress=False)
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])  # a plain JSON header, then raw tensor bytes: nothing to unpickle
    meta = header["__metadata__"]
    training = json.loads(meta["training"])
    assert training["images"] == ["img0.png"] and training["excluded"] == ["img1.*"]
    assert training["recipe"]["crop"] == 32 and training["recipe"]["classes"] == 4
    rf = json.loads(meta["receptive_field"])
    assert rf["stride"] == 4 and 0 < rf["radius"] <= rf["halo"] < 64
    model = load_tilenet(out)
    assert model.cfg == TINY and len(model.palette) == 4
    assert model.palette != default_palette(4)  # the k-means colours, not the untrained ones
    saved = load_file(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    x = torch.rand(1, 3, 20, 24)
    m = torch.zeros(1, 1, 20, 24)
    m[..., 5:12, 6:15] = 1
    logits, rgb = model(x, m)
    assert logits.shape == (1, 4, 20, 24)
    assert torch.equal(rgb[m.expand_as(rgb) == 0], x[m.expand_as(x) == 0])  # known pixels pass through


def test_no_images_large_enough(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(TrainingError, match="no training images"):
        train([tmp_path], out=tmp_path / "m.safetensors", cfg=tiny_cfg(), net_cfg=TINY, progress=False)


def test_ddp_two_processes(images_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from tilerun.model import TileNetConfig, read_metadata
        from tilerun.train import TrainConfig, train
        cfg = TrainConfig(steps=2, crop=32, batch_size=2, classes=4, checkpoint_every=1, kmeans_samples=2000)
        net = TileNetConfig.from_dict(json.loads({json.dumps(json.dumps(TINY.to_dict()))}))
        train([sys.argv[1]], out=sys.argv[2], cfg=cfg, net_cfg=net, progress=False)
    """))
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(images_dir), str(out)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    training = json.loads(read_metadata(out)["training"])
    assert training["world_size"] == 2 and training["step"] == 2


def test_prefill_model_tiles_exactly():
    """The trained architecture (local pre-fill + residual RGB) keeps tiled == whole-image output."""
    from tilerun import infer_image
    from tilerun.model import TileNet

    torch.manual_seed(3)
    model = TileNet(TINY).eval()
    with torch.no_grad():  # the zero-init residual head would hide the network: make it sensitive
        model.decoder.rgb.weight.normal_(0, 2.0)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    mask = random_mask(rng, 45, 61, kind="box", max_coverage=0.4)
    whole = infer_image(model, image, mask, tile=0)
    tiled = infer_image(model, image, mask, tile=16)
    assert np.array_equal(whole[0], tiled[0]) and np.array_equal(whole[1], tiled[1])
    assert (tiled[1][mask] != image[mask]).any()


def test_training_with_picture_context_runs_and_records_it(images_dir, tmp_path):
    net_cfg = TileNetConfig.from_dict({**TINY.to_dict(), "class_prior": True, "coarse_scale": 8})
    out = tmp_path / "p.safetensors"
    train([images_dir], out=out, cfg=tiny_cfg(steps=2, picture_context=True), net_cfg=net_cfg, progress=False)
    assert json.loads(read_metadata(out)["training"])["recipe"]["picture_context"] is True


def test_init_from_an_earlier_stage(images_dir, tmp_path):
    stage1, stage2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    train([images_dir], out=stage1, cfg=tiny_cfg(steps=2), net_cfg=TINY, progress=False)
    with_prior = TileNetConfig.from_dict({**TINY.to_dict(), "class_prior": True})
    cfg2 = tiny_cfg(steps=2, lr=1e-9, l2_weight=10.0)  # a negligible step: stage 2 starts where stage 1 ended
    train([images_dir], out=stage2, cfg=cfg2, net_cfg=with_prior, init_from=stage1, progress=False)
    a, b = load_file(str(stage1)), load_file(str(stage2))
    assert set(b) - set(a) == {"decoder.prior_scale"}
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    meta = json.loads(read_metadata(stage2)["training"])
    assert meta["init_from"]["file"] == "s1.safetensors" and meta["init_from"]["step"] == 2
    assert meta["recipe"]["l2_weight"] == 10.0
    # Back to the smaller architecture: stage 2 has a parameter it lacks.
    with pytest.raises(TrainingError, match="prior_scale"):
        train([images_dir], out=tmp_path / "s3.safetensors", cfg=tiny_cfg(steps=2), net_cfg=TINY, init_from=stage2,
              progress=False)
    # Another seed (or other images) would give another k-means palette: a later stage keeps
    # its start's classes instead, so the class head goes on meaning the same colours.
    s4 = tmp_path / "s4.safetensors"
    train([images_dir], out=s4, cfg=tiny_cfg(steps=2, seed=7), net_cfg=with_prior, init_from=stage1, progress=False)
    assert read_metadata(s4)["palette"] == read_metadata(stage1)["palette"]
    # Another number of classes cannot keep them: refused, naming the number that fits.
    with pytest.raises(TrainingError, match="--classes 4"):
        train([images_dir], out=tmp_path / "s5.safetensors", cfg=tiny_cfg(steps=2, classes=3),
              net_cfg=TileNetConfig.from_dict({**with_prior.to_dict(), "classes": 3}), init_from=stage1,
              progress=False)


def test_merge_averages_replicas_of_one_start(images_dir, tmp_path):
    # The design document's replicas trained in parallel and merged: two seeds from one
    # start, then the mean of their weights, with both provenances in the metadata.
    start, a, b, out = (tmp_path / f"{n}.safetensors" for n in ("start", "a", "b", "merged"))
    train([images_dir], out=start, cfg=tiny_cfg(steps=2), net_cfg=TINY, progress=False)
    for path, seed in ((a, 1), (b, 2)):
        train([images_dir], out=path, cfg=tiny_cfg(steps=3, seed=seed), net_cfg=TINY, init_from=start, progress=False)
    merge([a, b], out=out)
    wa, wb, wm = (load_file(str(p)) for p in (a, b, out))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the replicas differ ...
    assert all(torch.allclose(wm[k], (wa[k] + wb[k]) / 2, atol=1e-7) for k in wa)  # ... the merge is their mean
    meta = read_metadata(out)
    assert meta["palette"] == read_metadata(start)["palette"]
    merged = json.loads(meta["training"])["merged"]
    assert [(m["file"], m["recipe"]["seed"], m["init_from"]["file"]) for m in merged] == [
        ("a.safetensors", 1, "start.safetensors"), ("b.safetensors", 2, "start.safetensors")]
    # It is tilerun weights like any other: loads, and a later stage can start from it.
    load_tilenet(out)
    later = tmp_path / "later.safetensors"
    train([images_dir], out=later, cfg=tiny_cfg(steps=1), net_cfg=TINY, init_from=out, progress=False)
    assert json.loads(read_metadata(later)["training"])["init_from"]["merged"] == merged
    # Replicas of other starts mean other colours per class: refused, naming the file.
    other = tmp_path / "other.safetensors"
    train([images_dir], out=other, cfg=tiny_cfg(steps=2, seed=5), net_cfg=TINY, progress=False)
    assert read_metadata(other)["palette"] != meta["palette"]
    with pytest.raises(TrainingError, match="other.safetensors: another palette"):
        merge([a, other], out=tmp_path / "bad.safetensors")
    with pytest.raises(TrainingError, match="at least two"):
        merge([a], out=tmp_path / "bad.safetensors")
    # The command: an existing --out needs --overwrite (exit 2); a mismatch is one line, exit 1.
    from click.testing import CliRunner

    from tilerun.cli import main

    res = CliRunner().invoke(main, ["merge", str(a), str(b), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(main, ["merge", str(a), str(b), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0 and load_file(str(out)).keys() == wm.keys()
    res = CliRunner().invoke(main, ["merge", str(a), str(other), "--out", str(tmp_path / "bad.safetensors")])
    assert res.exit_code == 1 and "another palette" in res.output and "Traceback" not in res.output


def test_switch_changes_settings_that_add_no_parameter(images_dir, tmp_path):
    # The same network with other classical parts around it: the weights are copied, the
    # configuration switched, the training's provenance kept with what was switched.
    import dataclasses

    from click.testing import CliRunner

    from tilerun.cli import main

    start, out = tmp_path / "start.safetensors", tmp_path / "switched.safetensors"
    net_cfg = dataclasses.replace(TINY, class_prior=True, coarse_scale=16, class_fill=True)
    train([images_dir], out=start, cfg=tiny_cfg(steps=2), net_cfg=net_cfg, progress=False)
    res = CliRunner().invoke(main, ["switch", str(start), "--set", "class_cells=2", "--set", "coarse_biharmonic=true",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    before, after = load_tilenet(start), load_tilenet(out)
    assert after.cfg == dataclasses.replace(before.cfg, class_cells=2, coarse_biharmonic=True)
    assert after.palette == before.palette
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    training = json.loads(read_metadata(out)["training"])
    assert training["switched"] == ["class_cells=2", "coarse_biharmonic=true"]
    assert training["step"] == json.loads(read_metadata(start)["training"])["step"]
    # Its context has the switched cells: 32 px for the class shares.
    image, mask = np.zeros((64, 96, 3), np.uint8), np.zeros((64, 96), bool)
    mask[8:40, 8:40] = True
    assert after.coarse_context(image, mask)[1].shape[-2:] == (2, 3)
    assert before.coarse_context(image, mask)[1].shape[-2:] == (1, 2)
    # Refused, one line each: an existing --out (exit 2), a field that changes the parameters or
    # no such field (exit 1).
    res = CliRunner().invoke(main, ["switch", str(start), "--set", "class_cells=2", "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    bad = tmp_path / "bad.safetensors"
    res = CliRunner().invoke(main, ["switch", str(start), "--set", "width=16", "--out", str(bad)])
    assert res.exit_code == 1 and "changes the network's parameters" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["switch", str(start), "--set", "class_cell=2", "--out", str(bad)])
    assert res.exit_code == 1 and "'class_cell=2': not FIELD=VALUE" in res.output
    res = CliRunner().invoke(main, ["switch", str(start), "--set", "class_fill=maybe", "--out", str(bad)])
    assert res.exit_code == 1 and "class_fill takes a bool" in res.output
    assert not bad.exists()


def test_class_prior_keeps_known_pixels_class():
    from tilerun.model import TileNet

    torch.manual_seed(0)
    model = TileNet(TileNetConfig.from_dict({**TINY.to_dict(), "class_prior": True}),
                    [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)]).eval()
    x = torch.rand(1, 3, 24, 28)
    m = torch.zeros(1, 1, 24, 28)
    m[..., 4:12, 6:20] = 1
    with torch.no_grad():
        logits, _ = model(x, m)
    truth = nearest_class(x, torch.tensor(model.palette, dtype=torch.float32) / 255)
    known = m[:, 0] == 0
    assert torch.equal(logits.argmax(1)[known], truth[known])


def test_harmonic_fill_converges_to_laplace_and_keeps_known_pixels():
    """A linear ramp is harmonic: the sweeps must recover it in a hole where the local mean cannot,
    and more sweeps must get closer; known pixels never change."""
    from tilerun.model.net import harmonic_fill, local_fill

    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    ramp = ((0.3 * xx + 0.7 * yy) / 80)[None, None]
    known = torch.ones_like(ramp)
    known[..., 10:38, 20:50] = 0
    start = local_fill(ramp * known, known, (1, 3))
    errors = [(harmonic_fill(start, known, n) - ramp).abs().max().item() for n in (0, 10, 40, 200)]
    assert errors[0] > 0.05  # the local mean leaves a ramp's hole visibly wrong
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3
    out = harmonic_fill(start, known, 40)
    assert torch.equal(out[known.bool().expand_as(out)], ramp[known.bool().expand_as(ramp)])


def test_harmonic_fill_reach_is_one_pixel_per_sweep():
    """Finite reach is what keeps tiling exact: a known pixel moves hole pixels at most `n` sweeps away."""
    from tilerun.model.net import harmonic_fill

    known = torch.zeros(1, 1, 41, 41)
    known[..., 20, 20] = 1
    x = torch.zeros(1, 1, 41, 41)
    x[..., 20, 20] = 1
    for n in (3, 7):
        changed = harmonic_fill(x, known, n)[0, 0] != 0
        ys, xs = torch.nonzero(changed, as_tuple=True)
        assert max((ys - 20).abs().max(), (xs - 20).abs().max()) == n


def test_harmonic_fill_on_sparse_holes_gives_the_dense_bits(monkeypatch):
    """Below SPARSE_SWEEPS_BELOW the sweeps run on the hole pixels alone; they must give exactly
    the dense result (tiles and the whole image may take different paths), holes on the edges,
    several images in a batch and many channels (swept as rows of pixels) included."""
    import tilerun.model.net as net

    torch.manual_seed(3)
    for shape, share in (((1, 3, 60, 71), 0.05), ((3, 3, 33, 40), 0.2), ((2, 1, 17, 9), 0.6), ((2, 16, 30, 41), 0.1)):
        known = (torch.rand(shape[0], 1, *shape[2:]) > share).float()
        known[..., 0, :5] = 0  # a hole along the border: its neighbours mirror
        known[-1, :, -3:, -2:] = 0
        fill = net.local_fill(torch.rand(shape) * known, known, (1, 3))
        monkeypatch.setattr(net, "SPARSE_SWEEPS_BELOW", 0.0)
        dense = net.harmonic_fill(fill, known, 9)
        monkeypatch.setattr(net, "SPARSE_SWEEPS_BELOW", 1.1)
        sparse = net.harmonic_fill(fill, known, 9)
        assert torch.equal(dense, sparse)
        assert not torch.equal(dense, fill)  # the sweeps did change the holes


def test_slope_fill_continues_a_ramp_into_a_thin_hole():
    """On a linear ramp every border pixel's value plus its slope times the offset is the ramp
    itself, so the local fill plus the slope fill gives the ramp back in a thin hole, where the
    local fill alone is pulled towards the nearer side."""
    import tilerun.model.net as net

    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    ramp = torch.stack([0.2 + 0.006 * xx + 0.002 * yy, 0.9 - 0.004 * xx, 0.1 + 0.008 * yy])[None]
    known = torch.ones(1, 1, 48, 64)
    known[..., 8:40, 30:36] = 0  # 6 px wide
    known[..., 20:26, 10:50] = 0  # crossed by a band 6 px high
    hole = known[0, 0] == 0
    local = net.local_fill(ramp * known, known, (1, 3, 7))
    slopes = net.slope_fill(ramp * known, known, (1, 3, 7))
    assert (slopes[..., ~hole] == 0).all()
    assert (local - ramp)[..., hole].abs().max() > 0.005
    assert (local + slopes - ramp)[..., hole].abs().max() < 1e-5


@pytest.mark.parametrize("channels", [3, 16])
def test_harmonic_fill_on_the_holes_box_in_chunks_gives_the_whole_sweep_bits(monkeypatch, channels):
    """On CPU the sweeps cover only the holes' bounding box (+ a ring of known pixels), a few
    channels at a time, and skip channels that are zero: the bits of sweeping every pixel and
    channel at once."""
    import tilerun.model.net as net

    torch.manual_seed(4)
    known = torch.ones(2, 1, 50, 61)
    known[0, :, 10:30, 20:26] = 0
    known[1, :, 25:49, 40:61] = 0  # to the right edge, which mirrors
    fill = net.local_fill(torch.rand(2, channels, 50, 61) * known, known, (1, 3))
    if channels > 3:
        fill[:, [2, 7]] = 0  # classes absent from the window: not swept, still zero
    x, prev, hole = fill, fill, 1 - known
    for omega in net._omegas(9, net.HARMONIC_RHO):  # the plain sweep over everything
        nxt = net._neighbour_mean(x).sub_(x).mul_(hole).add_(x).sub_(prev).mul_(omega).add_(prev)
        prev, x = x, nxt
    monkeypatch.setattr(net, "SPARSE_SWEEPS_BELOW", 0.0)  # dense, in the box
    assert torch.equal(net.harmonic_fill(fill, known, 9), x)
    assert torch.equal(net._dense_sweeps(fill, known, 9, net.HARMONIC_RHO), x)  # dense, everywhere, in buffers
    with_grad = net._dense_sweeps(fill.clone().requires_grad_(), known, 9, net.HARMONIC_RHO)  # autograd's way
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), x)
    monkeypatch.setattr(net, "SPARSE_SWEEPS_BELOW", 1.1)  # the holes alone
    assert torch.equal(net.harmonic_fill(fill, known, 9), x)
    assert torch.equal(net.harmonic_fill(fill, torch.ones_like(known), 9), fill)  # no hole: nothing to do


def test_slope_fill_on_the_holes_box_gives_the_whole_window_values():
    """On CPU the slope fill computes the holes' bounding box and its reach only: the values of
    computing every pixel, holes at the edges and a batch included."""
    import tilerun.model.net as net

    torch.manual_seed(5)
    image = torch.rand(2, 3, 70, 90)
    known = torch.ones(2, 1, 70, 90)
    known[0, :, 30:52, 40:62] = 0  # wide enough that the coarsest scale counts in its middle
    known[1, :, 60:70, 0:8] = 0  # a corner: the box is cut by the edge
    whole = net._slope_fill(image, known, (1, 3, 7))
    assert torch.equal(net.slope_fill(image, known, (1, 3, 7)), whole)
    assert whole.abs().sum() > 0
    assert torch.equal(net.slope_fill(image, torch.ones_like(known), (1, 3, 7)), torch.zeros_like(image))


def test_the_idle_correction_loss_counts_what_the_far_field_leaves_out():
    """``--idle-weight``: an L1 loss on the RGB correction where its weight (the local pre-fill's
    reach) leaves it out, deep in a hole wider than the reach; nothing for a model without a far field."""
    import dataclasses

    from tilerun.model import TileNet

    torch.manual_seed(0)
    model = TileNet(dataclasses.replace(TINY, coarse_scale=8), default_palette(4)).train()
    with torch.no_grad():  # a correction everywhere: the far field's share of it is idle
        model.decoder.rgb.bias.fill_(0.2)
    image = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 8:56, 8:56] = 1  # 48 px: its middle is beyond the pre-fill's reach (2 x 3 px)
    pal = torch.tensor(default_palette(4), dtype=torch.float32) / 255
    terms = {}
    logits, rgb = model(image, mask, terms=terms)
    assert 0 < terms["idle_correction"].item() <= 0.2
    assert torch.equal(rgb, model(image, mask)[1])  # the outputs do not change
    plain, with_idle = (compute_loss(model, image, mask, pal, tiny_cfg(idle_weight=w)) for w in (0.0, 1.0))
    assert "idle" not in plain[1]
    assert with_idle[1]["idle"] == pytest.approx(terms["idle_correction"].item(), rel=1e-5)
    assert with_idle[0].item() == pytest.approx(plain[0].item() + with_idle[1]["idle"], rel=1e-5)
    none: dict = {}
    TileNet(TINY, default_palette(4)).train()(image, mask, terms=none)
    assert none == {}
