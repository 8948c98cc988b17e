"""Counted compute (benchmarks.compute): the equal-compute arithmetic by hand, what a count says about each method in
the tiny world, and the cache that lets a table be rewritten without counting again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from benchmarks import compute
from benchmarks.compute import METHOD_FLAGS, images_at_equal_compute, method_cost, run_flops


def test_equal_compute_solves_for_the_images_that_the_same_total_buys():
    ours = {"gen_flops_per_image": 40.0, "kd_flops_per_step": 3.0}
    cheap = {"gen_flops_per_image": 15.0, "kd_flops_per_step": 3.0}
    total = run_flops(ours, 100, 50)
    assert total == 100 * 40 + 50 * 3  # 4150
    assert images_at_equal_compute(cheap, total, 50) == (4150 - 150) // 15 == 266
    assert run_flops(cheap, 266, 50) <= total < run_flops(cheap, 267, 50)
    assert images_at_equal_compute(cheap, 10.0, 50) == 1  # never zero images, even when the steps alone cost more


def tiny_flags(world, name: str) -> list[str]:
    run = world.argv("unused")[2:]  # the tiny world's flags, without --run-dir
    return [*METHOD_FLAGS[name], *run]


def test_a_count_tells_the_methods_apart_in_the_tiny_world(world):
    costs = {name: method_cost(tiny_flags(world, name), None) for name in ("ours-online", "dmkd", "deepinv")}
    steps = 4  # the tiny world's --sampler-steps, every one guided
    # DM-KD: one classifier-free-guided UNet call per step, on the conditional and unconditional branch, then the
    # teacher's logits on the finished image (smaller than one UNet forward in the tiny world).
    assert 2 * steps < costs["dmkd"]["prior_forwards_per_image"] < 2 * steps + 1
    # Ours adds, per guided step, the latent gradient through the prior (forward + backward) and ε̂ recomputed.
    assert costs["ours-online"]["prior_forwards_per_image"] > costs["dmkd"]["prior_forwards_per_image"] + 2 * steps
    assert "prior_forwards_per_image" not in costs["deepinv"]  # no prior
    kd = {cost["kd_flops_per_step"] for cost in costs.values()}
    assert len(kd) == 1 and kd.pop() > 0  # the same student step, whoever made the images


def test_counts_are_cached_per_resolved_config_and_counted_code(world, tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    counted = []
    monkeypatch.setattr(compute, "count_cost", lambda cfg: counted.append(cfg.method) or {"gen_flops_per_image": 1.0})
    flags = tiny_flags(world, "dmkd")
    assert method_cost(flags, cache) == {"gen_flops_per_image": 1.0} and counted == ["dmkd"]
    assert method_cost(flags, cache) == {"gen_flops_per_image": 1.0} and counted == ["dmkd"]  # read back
    assert len(json.loads(cache.read_text())) == 1
    method_cost([*flags, "--sampler-steps", "5"], cache)  # another config: counted
    method_cost(tiny_flags(world, "deepinv"), cache)
    assert counted == ["dmkd", "dmkd", "deepinv"]
    monkeypatch.setattr(compute, "code_fingerprint", lambda: "changed code")
    method_cost(flags, cache)  # the code changed: counted again
    assert counted == ["dmkd", "dmkd", "deepinv", "dmkd"] and len(json.loads(cache.read_text())) == 4
    method_cost(flags, None)  # no cache: always counted, nothing written
    assert len(counted) == 5 and len(json.loads(cache.read_text())) == 4


def test_the_fingerprint_covers_the_counted_code():
    compute.code_fingerprint.cache_clear()
    first = compute.code_fingerprint()
    assert first == compute.code_fingerprint() and len(first) == 64
    for part in ("engine", "models", "losses", "augment"):
        assert part in compute.COUNTED_CODE and (compute.ROOT / part).is_dir()


def test_a_new_model_saved_at_the_same_path_is_counted_again(world, tmp_path, monkeypatch):
    """The key holds the bytes of a user's own --teacher (checkpoint and sidecar) and --prior (folder), not their
    paths: retraining a model in place must not read back the old model's count."""
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(world.teacher, teacher)
    shutil.copy(world.teacher.with_suffix(".json"), teacher.with_suffix(".json"))
    prior = tmp_path / "prior"
    shutil.copytree(world.prior, prior)
    cache = tmp_path / "cache.json"
    counted = []
    monkeypatch.setattr(compute, "count_cost", lambda cfg: counted.append(1) or {"gen_flops_per_image": 1.0})
    flags = [*tiny_flags(world, "ours-online"), "--teacher", str(teacher), "--prior", str(prior)]
    method_cost(flags, cache)
    method_cost(flags, cache)
    assert len(counted) == 1  # same bytes: read back
    teacher.write_bytes(teacher.read_bytes() + b" ")  # the weights changed in place
    method_cost(flags, cache)
    sidecar = json.loads(teacher.with_suffix(".json").read_text())
    teacher.with_suffix(".json").write_text(json.dumps({**sidecar, "image_size": 32}))  # the architecture's input
    method_cost(flags, cache)
    unet_config = next(prior.rglob("config.json"))
    unet_config.write_text(unet_config.read_text() + "\n")  # the prior folder changed
    method_cost(flags, cache)
    assert len(counted) == 4 and len(json.loads(cache.read_text())) == 4


def test_a_model_file_is_hashed_once_per_process_until_it_changes(tmp_path):
    """A table asks for the same models' fingerprint once per method (GBs at Stable Diffusion scale): the digest is
    read back while the file keeps its size and modification time, and recomputed when either moves."""
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"a" * 64)
    first = compute.file_sha256(weights)
    hits = compute._file_sha256.cache_info().hits
    assert compute.file_sha256(weights) == first and compute._file_sha256.cache_info().hits == hits + 1
    weights.write_bytes(b"b" * 64)  # same size, new bytes
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later save, even on a coarse clock
    assert compute.file_sha256(weights) == hashlib.sha256(b"b" * 64).digest() != first
