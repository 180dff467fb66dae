"""Tests of train.py: exact resume, DDP equivalence, learning, checkpoint errors, configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mdm
import train

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for seconds on 2 cores: 2 layers of width 32, 16 rows of 48 tokens per step.
# The sequence length is pinned so that step counts below do not depend on the default preset.
STEP_TOKENS = 16 * 48
SMALL = [
    "--seq_len=48",
    "--d_model=32",
    "--n_layers=2",
    "--n_heads=2",
    "--batch_size=16",
    "--log_every=1",
    "--eval_batches=1",
    "--final_report=false",
    "--warmup_tokens=3000",
]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def vals(out: Path) -> list[dict]:
    return [json.loads(line)["val"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line]


def test_killed_run_resumes_exactly(tmp_path: Path) -> None:
    horizon = f"--tokens={12 * STEP_TOKENS}"
    whole, part = tmp_path / "whole", tmp_path / "part"
    train.main([*SMALL, horizon, f"--out_dir={whole}", "--eval_every=0"])
    # "Kill" after 5 steps (the checkpoint of step 5 is the last thing written), then resume.
    train.main([*SMALL, horizon, f"--out_dir={part}", "--eval_every=0", "--max_steps=5"])
    assert max(losses(part)) == 5
    train.main([f"--resume={part / 'ckpt.pt'}"])
    a, b = losses(whole), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(6, 13):
        assert a[step] == b[step], (step, a[step], b[step])
    ckpt = train.read_checkpoint(part / "ckpt.pt")
    assert ckpt["step"] == 12 and ckpt["data"]["step"] == 12


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.main([*SMALL, f"--tokens={5 * STEP_TOKENS}", f"--out_dir={out}", "--eval_every=0"])
    ckpt = out / "ckpt.pt"
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        train.main([f"--resume={ckpt}"])
    assert (out / "metrics.jsonl").read_text() == before, "nothing was restarted"
    ckpt.write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train.read_checkpoint(ckpt)
    torch.save({"hello": torch.zeros(1)}, ckpt)
    with pytest.raises(ValueError, match="not a trimodal-mdm checkpoint"):
        train.read_checkpoint(ckpt)
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main([f"--resume={tmp_path / 'missing.pt'}"])


def test_short_run_lowers_validation_nelbo_of_every_modality(tmp_path: Path) -> None:
    out = tmp_path / "learn"
    train.main(
        [
            *SMALL,
            f"--tokens={60 * STEP_TOKENS}",
            f"--out_dir={out}",
            "--eval_every=60",
            "--eval_batches=2",
            "--lr=1e-2",
            "--ema=0",
        ]
    )
    first, last = vals(out)[0], vals(out)[-1]
    for m in mdm.MODALITIES:
        assert last[m] < 0.9 * first[m], (m, first[m], last[m])
    assert (out / "loss.png").stat().st_size > 1000


# Loaded by every process of a torchrun run through PYTHONPATH: it turns off the cyclic garbage collector, so an
# object in a reference cycle lives until something collects it explicitly (or the interpreter's exit frees it, the
# condition under which gloo aborts with "terminate called without an active exception" while another process still
# runs), delays rank 0 before it tears the process group down, and writes at exit how many DDP / FSDP wrappers are
# still alive in this process.
WATCH_TEARDOWN = """
import atexit, gc, json, os, sys, time
gc.disable()
rank = os.environ.get("RANK")

def _report():
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    alive = sum(isinstance(o, (DistributedDataParallel, FSDPModule)) for o in gc.get_objects())
    with open(os.path.join(os.environ["WATCH_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump({"wrappers_alive_at_exit": alive}, f)

if rank is not None:
    atexit.register(_report)
    import torch.distributed as dist
    real = dist.destroy_process_group
    def late(*args, **kwargs):
        if rank == "0":
            time.sleep(1.0)  # rank 0 reaches the teardown a second after rank 1
        return real(*args, **kwargs)
    dist.destroy_process_group = late
"""


def torchrun(args: list[str], env: dict, watch: Path | None = None) -> subprocess.CompletedProcess:
    """Two CPU processes under torchrun; with ``watch``, instrumented by WATCH_TEARDOWN (reports land there)."""
    if watch is not None:
        watch.mkdir(parents=True, exist_ok=True)
        (watch / "sitecustomize.py").write_text(WATCH_TEARDOWN)
        env = {**env, "PYTHONPATH": f"{watch}{os.pathsep}{env.get('PYTHONPATH', '')}", "WATCH_DIR": str(watch)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py")]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True)


def assert_teardown_freed_the_wrappers(watch: Path) -> None:
    """Every process freed its DDP / FSDP wrappers before exit, so no process group dies with the interpreter."""
    for rank in (0, 1):
        report = json.loads((watch / f"rank{rank}.json").read_text())
        assert report["wrappers_alive_at_exit"] == 0, (rank, report)


def test_two_ddp_processes_match_one_process(tmp_path: Path) -> None:
    horizon = f"--tokens={4 * STEP_TOKENS}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*SMALL, horizon, "--eval_every=0", "--micro_batch=4"]
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"--out_dir={one}"], check=True, env=env, capture_output=True
    )
    done = torchrun([*args, f"--out_dir={two}"], env, watch=tmp_path / "watch")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_teardown_freed_the_wrappers(tmp_path / "watch")
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4 * abs(a[step]), (step, a[step], b[step])


def test_fsdp_on_two_processes_matches_one_process_and_resumes_from_shards(tmp_path: Path) -> None:
    """FSDP2 (fully_shard) on CPU/gloo: same losses as one process; a sharded checkpoint resumes exactly."""
    horizon = f"--tokens={4 * STEP_TOKENS}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*SMALL, horizon, "--eval_every=0", "--micro_batch=4", "--ckpt_every=1"]
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"--out_dir={one}"], check=True, env=env, capture_output=True
    )
    done = torchrun([*args, "--fsdp=true", f"--out_dir={two}", "--max_steps=2"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == ["rank0.pt", "rank1.pt"]
    done = torchrun([f"--resume={two / 'ckpt'}"], env, watch=tmp_path / "watch")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_teardown_freed_the_wrappers(tmp_path / "watch")
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4 * abs(a[step]), (step, a[step], b[step])
    # The shards gather into the same model as the one-process run (EMA weights).
    full, sharded = train.load_for_inference(one / "ckpt.pt"), train.load_for_inference(two / "ckpt")
    for (name, p), q in zip(full.model.named_parameters(), sharded.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = train.train_step
    calls = {"n": 0}

    def failing(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            result.loss = float("nan")
        return result

    monkeypatch.setattr(train, "train_step", failing)
    with pytest.raises(
        SystemExit, match=r"non-finite loss .* at step 2; the last good checkpoint is .*ckpt.pt \(step 2\)"
    ):
        train.main([*SMALL, f"--tokens={6 * STEP_TOKENS}", f"--out_dir={tmp_path}", "--eval_every=0", "--ckpt_every=2"])


def test_config_parsing_and_batch_validation(tmp_path: Path) -> None:
    cfg, over = train.parse_config(["--lr=1e-3", "--anti_masking", "false", "--preset=small", "--batch-size=32"])
    assert cfg.lr == 1e-3 and cfg.anti_masking is False and cfg.preset == "small" and cfg.batch_size == 32
    assert over["resume"] == ""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 5e-4, "seq_len": 128}))
    cfg, _ = train.parse_config([f"--config={path}", "--seq_len=64"])
    assert cfg.lr == 5e-4 and cfg.seq_len == 64, "the command line wins over the file"
    with pytest.raises(ValueError, match="unknown option --lrr"):
        train.parse_config(["--lrr=1"])
    with pytest.raises(ValueError, match="cannot read 'abc' as float"):
        train.parse_config(["--lr=abc"])
    d = train.Dist(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="must be even"):
        train.validate(train.TrainConfig(batch_size=7), d)
    with pytest.raises(ValueError, match="does not divide"):
        train.validate(train.TrainConfig(batch_size=16, micro_batch=3), d)
    with pytest.raises(ValueError, match="unknown preset"):
        train.TrainConfig(preset="huge").model_config()


def test_parameter_groups_cover_the_model_with_depth_factors() -> None:
    vocab = mdm.Vocab(text=50, audio=20, image=17)
    model = mdm.Denoiser(mdm.ModelConfig(d_model=32, n_layers=3, n_heads=2), vocab)
    cfg = train.TrainConfig(depth_factor=0.25, lr_embed=4.0)
    groups = {g["name"]: g for g in train.param_groups(model, cfg, cfg.optim_settings())}
    assert groups["embedding"]["lr_mult"] == 4.0
    assert [groups[f"block{i}.mlp"]["lr_mult"] for i in range(3)] == [1.0, 0.5, 0.25]
    assert groups["block1.norms"]["weight_decay"] == 0.0 and groups["block1.mlp"]["weight_decay"] == 0.1


def test_pair_rows_are_conditional_unconditional_or_joint(tmp_path: Path) -> None:
    import data as data_lib

    vocab = mdm.Vocab(text=30, audio=12, image=17)
    layout = data_lib.Layout(vocab, 40, 8, 6)
    rows = [layout.pair_row("image_text", torch.arange(8) % 17, torch.tensor([1, 2, 3])) for _ in range(3000)]
    ids = torch.stack(rows)
    batch = data_lib.Batch(ids, torch.zeros_like(ids, dtype=torch.bool), torch.full((3000,), 1), vocab.modality_of(ids))
    given, hidden = train.segment_roles(batch, layout, 0.5, 0.1, torch.Generator().manual_seed(0))
    assert not (given & hidden).any()
    media, text = layout.media_slot("image_text"), layout.text_slot("image_text")
    for mask in (given, hidden):  # a whole segment or nothing
        for seg in (media, text):
            part = mask[:, seg]
            assert (part.all(1) | ~part.any(1)).all()
        assert not mask[:, : media.start].any(), "TASK and BOS_image are never picked"
    assert abs(given.any(1).float().mean() - 0.5) < 0.04 and abs(hidden.any(1).float().mean() - 0.1) < 0.02
    assert abs(given[:, media].all(1).float().mean() - 0.25) < 0.03, "media and text equally often"
    # p_media: conditional rows show the media (captioning) that often; unconditional rows stay 1/2
    given, hidden = train.segment_roles(batch, layout, 0.5, 0.1, torch.Generator().manual_seed(1), p_media=0.8)
    assert abs(given[:, media].all(1).float().mean() - 0.4) < 0.03
    assert abs(given[:, text].all(1).float().mean() - 0.1) < 0.02
    assert abs(hidden[:, media].all(1).float().mean() - 0.05) < 0.015
    with pytest.raises(ValueError, match="summing to at most 1"):
        train.validate(train.TrainConfig(cond_keep=0.8, cond_drop=0.3), train.Dist(0, 1, 0, torch.device("cpu")))


@pytest.mark.parametrize("anti_masking", [False, True])
def test_recognition_rows_condition_on_augmented_copies_and_nothing_else_changes(anti_masking: bool) -> None:
    import data as data_lib

    vocab = mdm.Vocab(text=30, audio=12, image=17)
    layout = data_lib.Layout(vocab, 24, 4, 6)
    media = layout.media_slot("audio_text")
    n = 4000
    ids = torch.stack([layout.pair_row("audio_text", torch.arange(6) % 12, torch.tensor([1, 2, 3]))] * n)
    copies = torch.stack([layout.pair_row("audio_text", torch.full((6,), k), torch.tensor([1, 2, 3])) for k in (7, 9)])
    pad = torch.zeros_like(ids, dtype=torch.bool)
    batch = data_lib.Batch(ids, pad, torch.full((n,), 2), vocab.modality_of(ids), copies.expand(n, 2, -1))
    cfg = train.TrainConfig(cond_keep=0.7, cond_drop=0.1, anti_masking=anti_masking)
    c = train.corrupt_batch(batch, layout, cfg, step=0, seed=0)
    assert len(c.x0) == (2 * n if anti_masking else n)  # anti-masking: each row and its complement
    without = data_lib.Batch(batch.ids, batch.pad, batch.task, batch.modality)  # the same rows, no copies
    plain = train.corrupt_batch(without, layout, cfg, step=0, seed=0)
    changed = (c.x0 != plain.x0).any(1)
    # given segments leave the loss (not maskable) and stay clean; hidden ones leave it as MASK
    media_given = ~plain.maskable[:, media].any(1) & (plain.x_t[:, media] == plain.x0[:, media]).all(1)
    # only rows whose media is given clean change, only in the media, and to one of the copies
    assert not (changed & ~media_given).any()
    assert torch.equal((c.x0 != plain.x0)[:, media].any(1), changed)
    assert not (c.x0 != plain.x0)[:, : media.start].any() and not (c.x0 != plain.x0)[:, media.stop :].any()
    picked = c.x0[changed][:, media.start]
    assert set(picked.tolist()) == {int(vocab.to_global(torch.tensor(k), "audio")) for k in (7, 9)}
    # the given media is clean and unsupervised; everything the row predicts is as before
    assert torch.equal(c.masked, plain.masked) and torch.equal(c.weight, plain.weight)
    assert torch.equal(c.x_t[changed][:, media], c.x0[changed][:, media])
    frac = changed.float().sum() / media_given.float().sum()
    assert abs(frac - 2 / 3) < 0.05, "the original and each of K = 2 copies equally often"


def test_options_a_checkpoint_predates_take_the_values_its_run_used() -> None:
    old = dict(vars(train.TrainConfig()))
    for key in train.LEGACY_DEFAULTS:
        del old[key]
    cfg = train.config_from_checkpoint({"config": old})
    assert cfg.audio_speeds == "" and cfg.speeds() == ()  # no speed copies: the run never had them
    assert cfg.cond_media == 0.5 and cfg.code_init is False
    assert train.config_from_checkpoint({"config": vars(train.TrainConfig())}) == train.TrainConfig()


@pytest.mark.parametrize(
    "option,message",
    [
        ({"cond_media": 1.5}, "--cond_media is a probability"),
        ({"audio_speeds": "0.9,fast"}, "comma-separated factors"),
        ({"audio_speeds": "0.9,3"}, r"lie in \[0.5, 2.0\]"),
    ],
)
def test_bad_conditioning_options_are_clear_errors(option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train.validate(train.TrainConfig(**option), train.Dist(0, 1, 0, torch.device("cpu")))


def test_media_embeddings_start_from_codes_on_a_fresh_run_only(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real = mdm.embed_codes

    def counting(model, modality, codes, generator=None):
        calls.append(modality)
        assert codes.shape[0] == model.vocab.content_size(modality)  # one code per token of the block
        return real(model, modality, codes, generator)

    monkeypatch.setattr(mdm, "embed_codes", counting)
    out = tmp_path / "run"
    train.main([*SMALL, f"--tokens={4 * STEP_TOKENS}", f"--out_dir={out}", "--eval_every=0", "--max_steps=2"])
    assert sorted(calls) == ["audio", "image"]
    train.main([f"--resume={out / 'ckpt.pt'}"])  # the embeddings come from the checkpoint
    assert sorted(calls) == ["audio", "image"]
    train.main([*SMALL, f"--tokens={4 * STEP_TOKENS}", f"--out_dir={tmp_path / 'off'}", "--code_init=false"])
    assert sorted(calls) == ["audio", "image"]


def expected_error_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: the command-line options and a fragment of the one line train.py must print."""
    bad = tmp / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    truncated = tmp / "truncated.pt"
    torch.save({"format": train.CKPT_FORMAT, "weights": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    return {
        "strict_bad_file": ([f"--text_files={bad}", "--strict=true"], "not UTF-8 text"),
        "truncated_resume": ([f"--resume={truncated}"], "truncated or corrupt"),
        "horizon_shorter_than_warmup": (["--tokens=3e5"], "must be shorter than the horizon"),
        "unknown_option": (["--learning_rate=1"], "unknown option --learning_rate"),
        "bad_value": (["--lr=fast"], "cannot read 'fast' as float"),
    }


@pytest.mark.parametrize(
    "case", ["strict_bad_file", "truncated_resume", "horizon_shorter_than_warmup", "unknown_option", "bad_value"]
)
def test_expected_errors_end_in_one_line_without_a_traceback(tmp_path: Path, case: str) -> None:
    args, fragment = expected_error_cases(tmp_path)[case]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"--out_dir={tmp_path / 'run'}"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and fragment in lines[0], done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_checkpoints_and_resumes_bit_identically(tmp_path: Path, sig: signal.Signals) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*SMALL, f"--tokens={2000 * STEP_TOKENS}", "--eval_every=0", "--ckpt_every=0"]
    script = [sys.executable, str(ROOT / "train.py")]
    cut = tmp_path / "cut"
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([*script, *args, f"--out_dir={cut}"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    metrics, deadline = cut / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):  # three finished steps logged
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    log.close()
    assert proc.returncode == 128 + sig, (tmp_path / "stderr.txt").read_text()[-2000:]
    stopped = train.read_checkpoint(cut / "ckpt.pt")["step"]
    assert stopped >= 3 and max(losses(cut)) == stopped, "the checkpoint is of the last finished step"
    subprocess.run([*script, f"--resume={cut / 'ckpt.pt'}", "--max_steps=4"], env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(
        [*script, *args, f"--out_dir={whole}", f"--max_steps={stopped + 4}"], env=env, check=True, capture_output=True
    )
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, stopped + 5))
    assert all(a[k] == b[k] for k in a), "bit-identical losses after the resume"


def test_loading_runs_no_code_that_nothing_vouches_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsq

    ts = tmp_path / "codec.ts"
    fsq.export_torchscript(fsq.load_audio_codec(), ts)
    out = tmp_path / "run"  # a run that names a TorchScript codec itself: its hash is recorded
    train.main([*SMALL, f"--tokens={5 * STEP_TOKENS}", f"--out_dir={out}", "--eval_every=0", f"--audio_codec={ts}"])
    ckpt = train.read_checkpoint(out / "ckpt.pt")
    assert ckpt["audio_codec_sha256"] == fsq.file_sha256(ts)
    assert isinstance(train.load_for_inference(out / "ckpt.pt").audio_codec, fsq.ScriptedAudioCodec)

    jit_loads: list[str] = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda path, *a, **k: jit_loads.append(str(path)) or real(path, *a, **k))
    unvouched = tmp_path / "unvouched.pt"
    torch.save({**ckpt, "audio_codec_sha256": ""}, unvouched)
    with pytest.raises(ValueError, match="nothing vouches for it"):
        train.load_for_inference(unvouched)
    swapped = tmp_path / "swapped.pt"
    torch.save({**ckpt, "audio_codec_sha256": "0" * 64}, swapped)
    with pytest.raises(ValueError, match="not the file this run was trained with"):
        train.load_for_inference(swapped)
    assert jit_loads == [], "no TorchScript file was loaded"
    # the user names the codec: it is theirs to trust
    assert isinstance(train.load_for_inference(unvouched, audio_codec=str(ts)).audio_codec, fsq.ScriptedAudioCodec)
    assert jit_loads == [str(ts)]
    # resuming names nothing new: the recorded hash must match, and a codec named on the command line must be it
    other = tmp_path / "other.ts"
    other.write_bytes(ts.read_bytes() + b"\0")
    with pytest.raises(SystemExit, match="not the one this checkpoint was trained with"):
        train.main([f"--resume={out / 'ckpt.pt'}", f"--audio_codec={other}"])


class Payload:
    """An object whose unpickling would run code: a checkpoint must never unpickle it."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PAYLOAD_MARK"]),))


def test_a_checkpoint_with_a_pickled_program_is_refused_unrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    evil = tmp_path / "evil.pt"
    torch.save({"format": train.CKPT_FORMAT, "step": Payload()}, evil)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train.read_checkpoint(evil)
    assert not mark.exists(), "the payload did not run"
