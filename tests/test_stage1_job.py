"""The stage-1 batch job (SPEC §2.6): dedup, empty samples, index content, rerun, resume after SIGKILL, 2 processes.

A tiny random Llama (tests/helpers/stage1_tiny.py) is saved with ``save_pretrained`` so the job loads it by path, as a
user's ``--llm PATH``. The subprocess tests share one uninterrupted single-process reference cache (24 samples, 9 shards).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from manifests.schema import ManifestWriter, RowFetcher, read_manifest_info
from pipeline.cache.store import CacheIdentityError, CacheReader
from stage1_embed_text.backends.llm import load_llm
from stage1_embed_text.encode.encoder import FacetEncoder
from stage1_embed_text.encode.prompts import FLAME, clean_for_prompt
from stage1_embed_text.job import EmbedConfig, run_embed
from stage1_embed_text.plan import make_plan
from stage1_embed_text.plan.stored import StoredPlan
from tests.helpers.stage1_tiny import tiny_causal_lm, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 160  # the tiny long template is 120 tokens, so the 200-token LONG_TEXT is cut to 40 caption tokens
LONG_TEXT = " ".join(["zebra"] * 40)

# (key, raw, short, long); comments give the expected row.
SAMPLES = [
    ("k0", "a red apple", "A red apple on a table.", "A red apple lies on a wooden table in the sun."),  # row 0
    ("k1", "a red apple.", "A red apple on a table.", "A red apple lies on a wooden table in the sun"),  # row 0 (clean-up)
    ("k2", None, None, None),  # no caption: counted, no row
    ("k3", "  ", "", None),  # blank captions are absent too
    ("k4", "dog", None, "Two dogs play in the park."),  # row 1, short absent
    ("k5", "a red apple", "A red apple on a table.", "A green apple and a rocket."),  # row 2: raw+short of row 0
    ("k6", 'say "hi"?', None, None),  # row 3: raw only, cleaned to "say 'hi'."
    ("k7", "dog", None, "Two dogs play in the park."),  # row 1
    ("k8", "cat", "A cat.", LONG_TEXT),  # row 4, long caption truncated
]


def _write_manifest(path: Path, samples) -> Path:
    w = ManifestWriter(path, {"name": "test", "args": {}}, rows_per_part=4)
    for key, raw, short, long in samples:
        w.add({"key": key, "raw_caption": raw, "short_caption": short, "long_caption": long, "split": "train"})
    w.close()
    return path


def _big_samples(n=24):
    """Two 'vendors' per concept sharing raw+short captions but not long ones, some exact duplicates."""
    out = []
    for i in range(n):
        c = i // 2
        long = None if c % 5 == 0 else f"Drawing number {c} in style {'ab'[i % 2] if c % 3 else 'a'}."
        out.append((f"s{i:03d}", f"thing {c}", f"A short caption about thing {c}." if c % 4 else None, long))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """FLAME_HOME in a tmp dir, the tiny model folder, and a subprocess environment that sees the tests."""
    root = tmp_path_factory.mktemp("stage1_job")
    model = root / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    old = os.environ.get("FLAME_HOME")
    os.environ["FLAME_HOME"] = str(root / "home")
    sub = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    yield {"root": root, "model": model, "env": sub}
    if old is None:
        os.environ.pop("FLAME_HOME")
    else:
        os.environ["FLAME_HOME"] = old


def _config(env, manifest, out, **kw):
    base = dict(manifest=str(manifest), out=str(out), llm=str(env["model"]), dtype="float32",
                context_tokens=CONTEXT, shard_rows=2, chunk_rows=1, progress=False)
    return EmbedConfig(**(base | kw))


def _files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache by relative path; ``meta.json`` without its creation time."""
    out = {}
    for p in sorted(cache.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "meta.json":
                meta = json.loads(data)
                meta.pop("created")
                data = json.dumps(meta, sort_keys=True).encode()
            out[str(p.relative_to(cache))] = data
    return out


def _plan(tmp_path, samples, name="cache", **kw):
    manifest = _write_manifest(tmp_path / f"manifest-{name}", samples)
    info = make_plan(manifest, FLAME, tmp_path / name, **({"shard_rows": 2, "chunk_rows": 1} | kw))
    return manifest, info, StoredPlan(tmp_path / name)


def test_plan_dedupes_rows_and_texts(tmp_path):
    manifest, info, plan = _plan(tmp_path, SAMPLES)
    keys = [k for s in range(3) for k in plan.keys(s)[0].to_pylist()]
    rows = [r for s in range(3) for r in plan.keys(s)[1].tolist()]
    assert keys == ["k0", "k1", "k4", "k7", "k5", "k6", "k8"] and rows == [0, 0, 1, 1, 2, 3, 4]
    assert (info.n_samples, info.n_keys, info.n_rows, info.n_empty) == (9, 7, 5, 2)
    assert info.empty_examples == ["k2", "k3"]
    fetcher = RowFetcher(manifest, ["raw_caption", "short_caption", "long_caption"])
    # the manifest's captions as they are (the encoder cleans them; the index holds the cleaned text's SHA-1)
    assert plan.texts(1, np.array([1]), fetcher) == [{"raw": 'say "hi"?', "short": None, "long": None}]
    assert plan.sha1_hex(1, np.array([1]))["raw"] == [hashlib.sha1(b"say 'hi'.").hexdigest()]
    assert plan.texts(0, np.array([0]), fetcher)[0]["long"] == "A red apple lies on a wooden table in the sun."
    owner = np.concatenate([plan.owner(s) for s in range(3)])
    assert owner.tolist() == [[0, 0, 0], [1, -1, 1], [0, 0, 2], [3, -1, -1], [4, 4, 4]]
    assert plan.rows(1).column("sample").to_pylist() == [5, 6]  # manifest positions of k5 and k6
    assert info.n_unique_texts == 10 and info.absent == {"raw": 0, "short": 2, "long": 1}
    assert info.layout.n_shards == 3 and plan.keys(1)[0].to_pylist() == ["k5", "k6"]

    again = make_plan(manifest, FLAME, tmp_path / "again", shard_rows=2, chunk_rows=1)
    assert again.plan_hash == info.plan_hash
    for name in ("rows.parquet", "keys.parquet"):
        assert (tmp_path / "again/plan" / name).read_bytes() == (tmp_path / "cache/plan" / name).read_bytes()
    before = (tmp_path / "cache/plan/plan.json").stat().st_mtime_ns
    assert make_plan(manifest, FLAME, tmp_path / "cache", shard_rows=2, chunk_rows=1) == info  # reused as is
    assert (tmp_path / "cache/plan/plan.json").stat().st_mtime_ns == before
    _, fewer, _ = _plan(tmp_path, SAMPLES[:-1], name="fewer")
    assert fewer.plan_hash != info.plan_hash
    _, swapped, _ = _plan(tmp_path, [SAMPLES[1], SAMPLES[0], *SAMPLES[2:]], name="swapped")
    assert swapped.plan_hash != info.plan_hash  # same rows, other keys -> rows
    with pytest.raises(ValueError, match=r"shard_rows=4, chunk_rows=3: need chunk_rows >= 1 dividing shard_rows >= 1"):
        make_plan(manifest, FLAME, tmp_path / "bad", shard_rows=4, chunk_rows=3)


def test_unicode_is_not_normalized_texts_and_keys_stay_byte_exact(tmp_path):
    """Issue 24 item 7 (README "Unicode"): captions and keys are used byte for byte as the manifest holds them.
    "café" in NFC (é = U+00E9) and in NFD (e + U+0301) are two texts (two rows, two SHA-1s) and two keys; the
    prompt text handed to the tokenizer is the stored one; equal bytes still dedupe into one row."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd and len(nfc.encode()) == 5 and len(nfd.encode()) == 6
    samples = [(nfc, f"un {nfc} noir", None, None), (nfd, f"un {nfd} noir", None, None),
               ("again", f"un {nfc} noir", None, None)]
    manifest, info, plan = _plan(tmp_path, samples)
    assert (info.n_keys, info.n_rows) == (3, 2)  # the NFC caption of "again" shares row 0; NFD is its own row
    assert [k for s in range(info.layout.n_shards) for k in plan.keys(s)[0].to_pylist()] == [nfc, "again", nfd]
    fetcher = RowFetcher(manifest, ["raw_caption", "short_caption", "long_caption"])
    texts = [plan.texts(0, np.array([r]), fetcher)[0]["raw"] for r in (0, 1)]
    assert texts == [f"un {nfc} noir", f"un {nfd} noir"]  # the manifest's captions (packing cleans them)
    cleaned = [clean_for_prompt(t) for t in texts]
    assert cleaned == [f"un {nfc} noir.", f"un {nfd} noir."]
    assert len({hashlib.sha1(t.encode()).digest() for t in cleaned}) == 2


def test_plan_with_split_and_limit_counts_manifest_positions(tmp_path):
    w = ManifestWriter(tmp_path / "m", {"name": "test", "args": {}}, rows_per_part=3)
    for i in range(10):
        w.add({"key": f"k{i}", "raw_caption": f"text {i % 4}", "split": "test" if i % 3 == 0 else "train"})
    w.close()
    info = make_plan(tmp_path / "m", FLAME, tmp_path / "c", shard_rows=2, chunk_rows=1, split="train", limit=5)
    plan = StoredPlan(tmp_path / "c")
    # train rows: k1 k2 k4 k5 k7 (limit 5); texts 1 2 0 1 3 -> rows 0 1 2 0 3
    assert (info.n_samples, info.n_keys, info.n_rows) == (5, 5, 4)
    assert [plan.keys(s)[0].to_pylist() for s in range(2)] == [["k1", "k5", "k2"], ["k4", "k7"]]
    assert [plan.rows(s).column("sample").to_pylist() for s in range(2)] == [[1, 2], [4, 7]]


def test_job_writes_deduplicated_cache_equal_to_encoder(env, tmp_path):
    manifest = _write_manifest(tmp_path / "manifest", SAMPLES)
    cache = tmp_path / "cache"
    summary = run_embed(_config(env, manifest, cache))

    enc = FacetEncoder(load_llm(str(env["model"]), dtype="float32"), context_tokens=CONTEXT)
    uniq = [SAMPLES[i] for i in (0, 4, 5, 6, 8)]  # the first sample of each row, in row order
    expected = enc.encode([{"raw": r, "short": s, "long": lg} for _, r, s, lg in uniq])

    assert summary.to_dict() | {"tokens_per_s": 0, "encode_s": 0, "wall_s": 0} == {
        "cache": str(cache), "samples": 9, "empty_samples": 2, "keys": 7, "rows": 5, "dedup_ratio": 1.4,
        "unique_texts": 10, "absent_texts": {"raw": 0, "short": 2, "long": 1}, "absent_facets": 13,
        "truncated_rows": 1, "truncated_texts": {"raw": 0, "short": 0, "long": 1}, "shards": 3,
        "shards_written": 3, "shards_skipped": 0, "sequences": 10,
        "tokens": int(expected.tokens.sum() - expected.tokens[2, :2].sum()), "tokens_per_s": 0, "encode_s": 0,
        "wall_s": 0, "world_size": 1,
    }
    reader = CacheReader(cache, expect={"dim": 64, "layer": 3, "prompt_set_hash": FLAME.content_hash})
    assert reader.identity.llm == str(env["model"]) and reader.identity.max_tokens == CONTEXT
    index = reader.index.to_pydict()
    assert index["key"] == ["k0", "k1", "k4", "k7", "k5", "k6", "k8"]
    assert index["row"] == [0, 0, 1, 1, 2, 3, 4]
    sha = lambda t: hashlib.sha1(t.encode()).hexdigest()  # noqa: E731
    assert index["raw_sha1"][5] == sha("say 'hi'.") and index["short_sha1"][5] is None
    assert index["long_sha1"][0] == index["long_sha1"][1] == sha("A red apple lies on a wooden table in the sun.")
    tokens = expected.tokens[[0, 0, 1, 1, 2, 3, 4]]
    for i, g in enumerate(("raw", "short", "long")):
        assert index[f"{g}_tokens"] == tokens[:, i].tolist()
    assert [t == 0 for t in index["short_tokens"]] == [False, False, True, True, False, True, False]
    assert index["long_truncated"] == [False] * 6 + [True] and not any(index["raw_truncated"])
    assert index["long_tokens"][6] == CONTEXT

    vec, mask = reader.get(["k0", "k1", "k4", "k5", "k6", "k7", "k8"])
    rows = [0, 0, 1, 2, 3, 1, 4]
    assert mask.tolist() == expected.mask[rows].tolist()
    assert mask.sum(axis=1).tolist() == [11, 11, 8, 11, 1, 8, 11]
    np.testing.assert_allclose(vec.astype(np.float32), expected.vectors[rows], rtol=0, atol=2e-4)
    # row 2 copies raw + short of row 0 (another shard) byte for byte; its long facets are its own
    all_vec, _ = reader.load_all()
    assert all_vec[2, :4].tobytes() == all_vec[0, :4].tobytes()
    assert not np.array_equal(all_vec[2, 4:], all_vec[0, 4:])


def test_rerun_of_finished_cache_does_nothing(env, tmp_path):
    manifest = _write_manifest(tmp_path / "manifest", SAMPLES)
    cache = tmp_path / "cache"
    run_embed(_config(env, manifest, cache))
    before = {p: (cache / p).stat().st_mtime_ns for p in _files(cache)}
    summary = run_embed(_config(env, manifest, cache))
    assert (summary.shards_written, summary.shards_skipped, summary.sequences, summary.tokens) == (0, 3, 0, 0)
    assert {p: (cache / p).stat().st_mtime_ns for p in _files(cache)} == before
    with pytest.raises(CacheIdentityError, match="planned differently"):
        run_embed(_config(env, manifest, cache, limit=3))


def test_verify_names_a_damaged_shard_and_its_command_redoes_only_that_shard(env, tmp_path, capsys):
    """Issue 24 item 2: a negated stored vector (still finite and unit-norm) is found only by the checksums; the
    printed command (delete the marker, rerun the same `flame embed`) rewrites that shard alone, byte-identical."""
    import shlex

    import zarr

    from flame_pipeline.cli import main
    from pipeline.cache.verify import verify_cache

    manifest = _write_manifest(tmp_path / "manifest", SAMPLES)
    cache = tmp_path / "cache"
    run_embed(_config(env, manifest, cache))
    original = _files(cache)
    assert verify_cache(cache).ok
    vectors = zarr.open_group(cache / "store.zarr", mode="r+")["vectors"]
    vectors[2, 0] = -vectors[2, 0]  # row 2 = shard 1
    assert main(["inspect", str(cache), "--json"]) == 0  # finite and unit-norm: invisible without checksums
    capsys.readouterr()
    report = verify_cache(cache)
    assert list(report.damaged) == [1]
    assert report.damaged[1] == ["store.zarr/vectors/c/1/0/0 differs from its checksum"]
    assert main(["inspect", str(cache), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "shard 1: store.zarr/vectors/c/1/0/0 differs from its checksum" in out and report.redo[1] in out
    rm, command = report.redo[1].split(" && ")
    assert shlex.split(rm) == ["rm", str(cache / "done" / "shard-00001.json")]
    (cache / "done" / "shard-00001.json").unlink()
    others = {p: (cache / p).stat().st_mtime_ns for p in original if "/c/1/" not in p and "00001" not in p}
    assert main(shlex.split(command)[1:]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    assert _files(cache) == original and verify_cache(cache).ok
    assert {p: (cache / p).stat().st_mtime_ns for p in others} == others  # nothing else was rewritten


def test_cli_without_vllm_refuses_backend_vllm_cleanly(env, tmp_path, capsys):
    from flame_pipeline.cli import main
    from stage1_embed_text.backends.vllm_settings import vllm_available

    if vllm_available()[0]:
        pytest.skip("vLLM is importable here")
    manifest = _write_manifest(tmp_path / "manifest", SAMPLES[:1])
    rc = main(["embed", "--manifest", str(manifest), "--out", str(tmp_path / "c"), "--backend", "vllm"])
    assert rc == 2 and "vLLM is not importable in this environment" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _cli(env, manifest, out):
    return ["--manifest", str(manifest), "--out", str(out), "--llm", str(env["model"]), "--dtype", "float32",
            "--context-tokens", str(CONTEXT), "--shard-rows", "2", "--chunk-rows", "1", "--no-progress"]


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted single-process cache of the 24-sample manifest, built by ``python -m stage1_embed_text``."""
    manifest = _write_manifest(env["root"] / "big-manifest", _big_samples())
    out = env["root"] / "reference"
    proc = subprocess.run([sys.executable, "-m", "stage1_embed_text", *_cli(env, manifest, out)],
                          env=env["env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["samples"], summary["keys"], summary["rows"], summary["shards"]) == (24, 24, 18, 9)
    return manifest, out


def test_resume_after_sigkill_gives_identical_cache(env, reference, tmp_path):
    manifest, ref = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stage1_embed_text", *_cli(env, manifest, out)]
    proc = subprocess.Popen(cmd, env=env["env"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "done" / "shard-00000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list((out / "done").glob("shard-*.json")))
    assert 1 <= n_done < 9, f"the kill should land mid-way, found {n_done} finished shards"
    with pytest.raises(Exception, match="unfinished"):
        CacheReader(out)
    rerun = subprocess.run(cmd, env=env["env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == n_done and summary["shards_written"] == 9 - n_done
    assert _files(out) == _files(ref)


def test_two_processes_give_the_same_cache_as_one(env, reference, tmp_path):
    manifest, ref = reference
    shard1 = _plan(tmp_path, _big_samples(), name="plan-only")[2].owner(1)
    assert shard1[0].tolist() == [1, 1, 2]  # rank 1's shard 1 copies texts of rank 0's shard 0
    out = tmp_path / "two"
    # plan once (no LLM), as on a CPU node before a multi-node job; both ranks then reuse that plan as it is
    plan = subprocess.run([sys.executable, "-m", "stage1_embed_text", *_cli(env, manifest, out), "--plan-only"],
                          env=env["env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0 and "24 samples -> 24 keys -> 18 rows (9 shards)" in plan.stdout, plan.stderr[-2000:]
    assert not (out / "meta.json").exists()
    planned = (out / "plan" / "plan.json").stat().st_mtime_ns
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "stage1_embed_text", *_cli(env, manifest, out)]
    proc = subprocess.run(cmd, env=env["env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["world_size"], summary["shards_written"], summary["rows"]) == (2, 9, 18)
    assert (out / "plan" / "plan.json").stat().st_mtime_ns == planned
    assert _files(out) == _files(ref)


def test_second_job_on_a_cache_is_refused_and_a_dead_holder_is_taken_over(env, tmp_path, capsys):
    """The lock is filelock's OS lock on writer.lock, whose content names the holder: a live holder (another
    process) refuses the job in one line; once that process is killed (-9) the next job takes the lock over."""
    import socket

    from flame_pipeline.cli import main

    manifest = _write_manifest(tmp_path / "manifest", SAMPLES)
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / "writer.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.cache.files import CacheFiles; "
         "from pipeline.cache.lock import CacheLock; lock = CacheLock(CacheFiles(sys.argv[1])); lock.acquire(); "
         "print('held', "
         "flush=True); time.sleep(120)", str(cache)], env=env["env"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = json.loads(lock.read_text())["started"]
        args = ["embed", *_cli(env, manifest, cache)]
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flame")]
        assert err == [f"flame embed: cache {cache} is being written by process {holder.pid} on "
                       f"{socket.gethostname()} since {started}; wait for that job, or delete {lock} if it is dead"]
        assert sorted(p.name for p in cache.iterdir()) == ["writer.lock"]  # nothing planned, nothing deleted
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # a killed holder's file stays; its OS lock is gone
    assert main(args) == 0
    assert not lock.exists() and len(CacheReader(cache)) == 7


def test_disk_full_is_one_line_and_a_rerun_finishes_the_same_cache(env, tmp_path, capsys, monkeypatch):
    import errno

    from flame_pipeline.cli import main
    from pipeline.cache.store import CacheWriter

    manifest = _write_manifest(tmp_path / "manifest", SAMPLES)
    ref, cache = tmp_path / "ref", tmp_path / "cache"
    assert main(["embed", *_cli(env, manifest, ref)]) == 0
    write = CacheWriter.write_shard

    def full_after_one(self, shard, *a, **kw):
        if shard > 0:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.files.index_part(shard)))
        return write(self, shard, *a, **kw)

    monkeypatch.setattr(CacheWriter, "write_shard", full_after_one)
    capsys.readouterr()
    assert main(["embed", *_cli(env, manifest, cache)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flame")]
    assert err == [f"flame embed: no space left on the device writing {cache / 'index/shard-00001.parquet'}: the 1 "
                   "finished shards are kept; free space and rerun the same command to finish the cache"]
    monkeypatch.setattr(CacheWriter, "write_shard", write)
    assert main(["embed", *_cli(env, manifest, cache)]) == 0
    assert _files(cache) == _files(ref)


def test_stage2_counts_rows_per_part_from_the_job_record_without_lookups(env, tmp_path):
    from stage2_train_vision.config import DataConfig
    from stage2_train_vision.data.stream import _counts_from_cache, stream_shards

    manifest = _write_manifest(tmp_path / "manifest", SAMPLES)  # parts k0-k3, k4-k7, k8
    cache = tmp_path / "cache"
    run_embed(_config(env, manifest, cache))
    reader = CacheReader(cache)
    cfg = DataConfig(manifest=str(manifest), cache=str(cache), split="train")
    info = read_manifest_info(manifest)
    recorded = _counts_from_cache(cfg, reader, info)
    assert recorded is not None
    shards, skipped = recorded
    assert [s.n_valid for s in shards] == [2, 4, 1] and skipped == {"missing_vector": 2}  # k2, k3 have no caption
    part = manifest / info.parts[1]
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 1))  # a rewritten part: counted again
    assert _counts_from_cache(cfg, reader, info) is None
    shards, skipped = stream_shards(cfg, reader)
    assert [s.n_valid for s in shards] == [2, 4, 1] and skipped == {"missing_vector": 2}
