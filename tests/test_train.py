"""Tests of train.py and checkpoint.py: exact resume, DDP equivalence, learning, the export, errors, configuration."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import mdm
import sde_batch
import train
from distributed import Dist
from model import Denoiser, ModelConfig, embed_codes

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for seconds on 2 cores: 2 layers of width 32, 16 rows of 48 tokens per step.
# The sequence length is pinned so that step counts below do not depend on the default preset, and the
# dtype so that runs compared with each other cannot resolve --dtype=auto differently (its probe is timed).
STEP_TOKENS = 16 * 48
SMALL = [
    "--dtype=fp32",
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


def test_killed_run_resumes_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    horizon = f"--tokens={12 * STEP_TOKENS}"
    whole, part = tmp_path / "whole", tmp_path / "part"
    train.main([*SMALL, horizon, f"--out_dir={whole}", "--eval_every=0"])
    assert re.search(r"per-module AdamW .*\n  embedding +lr x3 +wd x1 +eps x1", capsys.readouterr().out)
    # "Kill" after 5 steps (the checkpoint of step 5 is the last thing written), then resume.
    train.main([*SMALL, horizon, f"--out_dir={part}", "--eval_every=0", "--max_steps=5"])
    assert max(losses(part)) == 5
    train.main([f"--resume={part / 'ckpt.pt'}"])
    a, b = losses(whole), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(6, 13):
        assert a[step] == b[step], (step, a[step], b[step])
    ckpt = checkpoint.read_checkpoint(part / "ckpt.pt")
    assert ckpt["step"] == 12 and ckpt["data"]["step"] == 12
    assert ckpt["module_table"]["embedding"] == {"lr": 3.0, "wd": 1.0, "eps": 1.0}, "the table is saved"
    assert {g["name"]: g["lr_mult"] for g in ckpt["optimizer"]["groups"]}["block1.attn_qkv"] == 0.5
    assert train.main([f"--resume={part / 'ckpt.pt'}"])["step"] == 12, "resuming a finished run ends at once"


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
        checkpoint.read_checkpoint(ckpt)
    torch.save({"hello": torch.zeros(1)}, ckpt)
    with pytest.raises(ValueError, match="not a trimodal-mdm checkpoint"):
        checkpoint.read_checkpoint(ckpt)
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
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    done = torchrun([f"--resume={two / 'ckpt'}"], env, watch=tmp_path / "watch")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_teardown_freed_the_wrappers(tmp_path / "watch")
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4 * abs(a[step]), (step, a[step], b[step])
    # The shards gather into the same model as the one-process run (EMA weights). Adam divides each gradient by
    # its running RMS, so float-level differences in how one and two processes sum the gradients grow to a few
    # 1e-6 in rarely updated embedding rows: far below one step's update (lr 1e-3), far above a gathering error.
    full, sharded = checkpoint.load_for_inference(one / "ckpt.pt"), checkpoint.load_for_inference(two / "ckpt")
    for (name, p), q in zip(full.model.named_parameters(), sharded.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=2e-5), name


def test_a_sharded_checkpoint_resumes_on_one_process_and_a_one_process_checkpoint_on_two(tmp_path: Path) -> None:
    """Checkpoints reshard: FSDP2's of two processes resumes on one (no process group, no FSDP), and one process's
    (its DCP folder under --fsdp=true, or a plain ckpt.pt) resumes under FSDP2 on two, each continuing the
    uninterrupted run's losses; the last checkpoint, a DCP folder, exports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [*SMALL, f"--tokens={4 * STEP_TOKENS}", "--eval_every=0", "--micro_batch=4", "--ckpt_every=1"]
    whole, chain, plain = tmp_path / "whole", tmp_path / "chain", tmp_path / "plain"
    train.main([*args, f"--out_dir={whole}"])
    done = torchrun([*args, "--fsdp=true", f"--out_dir={chain}", "--max_steps=2"], env)  # steps 1-2 on two
    assert done.returncode == 0, done.stderr[-3000:]
    train.main([f"--resume={chain / 'ckpt'}", "--max_steps=1"])  # step 3 on one, which writes a DCP folder too
    assert checkpoint.read_checkpoint(chain / "ckpt")["world"] == 1
    done = torchrun([f"--resume={chain / 'ckpt'}"], env)  # step 4 on two
    assert done.returncode == 0, done.stderr[-3000:]
    train.main([*args, f"--out_dir={plain}", "--max_steps=2"])  # a plain ckpt.pt after step 2
    done = torchrun([f"--resume={plain / 'ckpt.pt'}", "--fsdp=true"], env)  # steps 3-4 on two, each its chunk
    assert done.returncode == 0, done.stderr[-3000:]
    a, full = losses(whole), checkpoint.load_for_inference(whole / "ckpt.pt")
    for out in (chain, plain):
        b = losses(out)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4]
        for step in a:
            assert abs(a[step] - b[step]) < 1e-4 * abs(a[step]), (out.name, step, a[step], b[step])
        resumed = checkpoint.load_for_inference(out / "export")  # the DCP folder's EMA weights (see the test above)
        for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-4, atol=2e-5), (out.name, name)


def test_a_sharded_checkpoint_on_one_process_and_one_stopped_between_its_renames_still_load(tmp_path: Path) -> None:
    """--fsdp=true on one process writes a DCP folder without a process group; a save stopped after renaming the
    old folder away leaves the complete new one as ckpt.tmp, which a resume of ckpt finds."""
    out = tmp_path / "run"
    train.main([*SMALL, f"--tokens={4 * STEP_TOKENS}", f"--out_dir={out}", "--eval_every=0", "--fsdp=true"])
    assert (out / "ckpt" / "meta.pt").is_file() and (out / "export" / "model.safetensors").is_file()
    (out / "ckpt").rename(out / "ckpt.tmp")
    assert checkpoint.read_checkpoint(out / "ckpt")["step"] == 4
    assert checkpoint.load_for_inference(out / "ckpt").step == 4


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


def test_a_run_that_fails_mid_loop_gives_the_signal_handlers_back(tmp_path: Path, monkeypatch) -> None:
    """Else a notebook or test process that ran train.main would ignore SIGTERM (the handler only records it)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def broken(*args, **kwargs):
        raise RuntimeError("a failure inside the loop")

    monkeypatch.setattr(train, "train_step", broken)
    with pytest.raises(RuntimeError, match="inside the loop"):
        train.main([*SMALL, f"--tokens={4 * STEP_TOKENS}", f"--out_dir={tmp_path}", "--eval_every=0"])
    assert {s: signal.getsignal(s) for s in before} == before


def test_config_parsing_and_batch_validation(tmp_path: Path) -> None:
    options, resume = train.parse_options(["--lr=1e-3", "--anti_masking", "false", "--preset=small", "--batch-size=32"])
    cfg, data_cfg = train.split_options(
        {**options, "seq_len": 64, "audio_speeds": (0.9,)}, train.TrainConfig(), data.DataConfig()
    )
    assert cfg.lr == 1e-3 and cfg.anti_masking is False and cfg.preset == "small" and cfg.batch_size == 32
    assert data_cfg.seq_len == 64 and data_cfg.audio_speeds == (0.9,) and resume == ""
    assert train.parse_options(["--code_init"])[0] == {"code_init": True}, "a bare boolean flag is true"
    assert train.parse_options(["--text_files=a.txt,b.jsonl"])[0] == {"text_files": ("a.txt", "b.jsonl")}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 5e-4, "seq_len": 128, "audio_speeds": [0.9, 1.1]}))
    options, _ = train.parse_options([f"--config={path}", "--seq_len=64"])
    assert options == {"lr": 5e-4, "seq_len": 64, "audio_speeds": (0.9, 1.1)}, "the command line wins over the file"
    path.write_text(json.dumps({"lrr": 1}))
    with pytest.raises(ValueError, match="unknown option 'lrr'"):
        train.parse_options([f"--config={path}"])
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold one JSON object of options, not a list"):
        train.parse_options([f"--config={path}"])
    d = Dist(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="must be even"):
        train.validate(train.TrainConfig(batch_size=7), d)
    with pytest.raises(ValueError, match="does not divide"):
        train.validate(train.TrainConfig(batch_size=16, micro_batch=3), d)
    with pytest.raises(ValueError, match="unknown preset"):
        train.TrainConfig(preset="huge").model_config(48)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch_size=64.9"], "--batch_size/--batch-size: invalid int value: '64.9'"),
        (["--lr=fast"], "--lr: invalid float value: 'fast'"),
        (["--anti_masking=maybe"], "--anti_masking/--anti-masking: invalid bool value: 'maybe'"),
        (["--audio_speeds=0.9,fast"], "--audio_speeds/--audio-speeds: invalid tuple[float, ...] value"),
        (["--lrr=1"], "unrecognized arguments: --lrr=1"),
        (["--lr"], "--lr: expected one argument"),
    ],
)
def test_a_value_that_does_not_parse_is_an_error_naming_its_option(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        train.parse_options(argv)


def test_help_prints_every_option_with_its_default_and_comment() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = "".join(done.stdout.split())  # argparse wraps lines (also after a hyphen): compare without spaces
    for cls in (train.TrainConfig, data.DataConfig):
        helps = train.option_help(cls)
        for f in dataclasses.fields(cls):
            assert f.name in helps, f"{cls.__name__}.{f.name} needs a one-line comment: what --help prints"
            assert f"--{f.name}" in text and "".join(f"{helps[f.name]} (default: {f.default})".split()) in text, f.name


def test_every_parameter_is_in_exactly_one_group_with_its_rows_settings_and_depth_factor() -> None:
    vocab = mdm.Vocab(text=50, audio=20, image=17)
    model = Denoiser(ModelConfig(d_model=32, n_layers=3, n_heads=2), vocab)
    cfg = train.TrainConfig(depth_factor=0.25, modules="embedding.lr=4,mlp_gate.eps=10,attn_out.wd=0.5")
    groups = train.param_groups(model, cfg, cfg.settings())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    named = {g["name"]: g for g in groups}
    assert len(named) == 2 + 1 + 3 * 6, "embedding, unembedding, the final norm; six kinds in each block"
    assert named["embedding"]["lr_mult"] == 4.0 and named["unembedding"]["lr_mult"] == 1.0
    assert [named[f"block{i}.mlp_up"]["lr_mult"] for i in range(3)] == [1.0, 0.5, 0.25]
    assert named["block1.mlp_gate"]["eps"] == pytest.approx(1e-7) and named["block1.mlp_up"]["eps"] == 1e-8
    assert named["block2.attn_out"]["weight_decay"] == pytest.approx(0.05)
    assert named["block1.norms"]["weight_decay"] == 0.0 and named["norms"]["lr_mult"] == 1.0
    kinds = {train.module_kind(name) for name, _ in model.named_parameters()}
    assert kinds == set(train.MODULE_TABLE), "every kind of the table names parameters, and only those"


def test_the_sde_rule_rescales_every_groups_eps_and_weight_decay() -> None:
    """A run at 4x the reference batch (kappa = 4): eps_g = eps_mult · eps / 2, lambda_g = wd_mult · lambda · 2."""
    vocab = mdm.Vocab(text=50, audio=20, image=17)
    model = Denoiser(ModelConfig(d_model=32, n_layers=2, n_heads=2), vocab)
    cfg = train.TrainConfig(modules="attn_qkv.eps=3,mlp_down.wd=2,embedding.eps=0.5")
    ref = sde_batch.Reference(16, 1e6, cfg.settings())
    plan = sde_batch.plan(ref, 64, 1e6, 48)
    assert plan.kappa == pytest.approx(4.0)
    table = train.module_table(cfg.modules)
    for g in train.param_groups(model, cfg, plan.settings):
        row = table[g["name"].split(".")[-1]]
        assert g["eps"] == pytest.approx(row.eps * cfg.eps / 2), g["name"]
        assert g["weight_decay"] == pytest.approx(row.wd * cfg.weight_decay * 2), g["name"]


@pytest.mark.parametrize("change", ["embeding.lr=2", "mlp_up.beta=2", "norms.lr=-1", "norms.eps=x", "norms.lr"])
def test_a_bad_module_table_change_is_a_one_line_error(tmp_path: Path, change: str) -> None:
    with pytest.raises(SystemExit, match=r"train.py: error: --modules: .* is not kind.lr\|wd\|eps=value"):
        train.main([*SMALL, f"--out_dir={tmp_path}", f"--modules={change}"])


@pytest.mark.parametrize("anti_masking", [False, True])
def test_the_forward_process_applies_each_rows_role(anti_masking: bool) -> None:
    vocab = mdm.Vocab(text=30, audio=12, image=17)
    layout = data.Layout(vocab, 24, 4, 6)
    media, text = layout.media_slot("audio_text"), layout.text_slot("audio_text")
    ids = torch.stack([layout.pair_row("audio_text", torch.arange(6) % 12, torch.tensor([1, 2, 3]))] * 3)
    given, hidden = torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    given[0, media], hidden[1, text] = True, True  # row 0 transcribes its clip, row 1 is unconditional, row 2 joint
    batch = data.Batch(ids, torch.zeros_like(given), torch.full((3,), 2), given, hidden)
    c = train.corrupt_batch(batch, vocab, train.TrainConfig(anti_masking=anti_masking), step=0)
    rows = [0, 3] if anti_masking else [0]  # a row and its anti-masked complement share the role
    assert len(c.x0) == (6 if anti_masking else 3)
    for r in rows:
        assert torch.equal(c.x_t[r, media], c.x0[r, media]) and not c.maskable[r, media].any(), "given: clean, unscored"
        assert c.maskable[r, text].all()
    for r in [r + 1 for r in rows]:
        assert vocab.is_mask(c.x_t[r, text]).all() and not c.maskable[r, text].any(), "hidden: masked, unscored"
    assert c.maskable[2].sum() == ids.shape[1] - 1, "joint: every data position"
    if anti_masking:  # the two copies of each row partition its scored positions
        assert not (c.masked[:3] & c.masked[3:]).any() and torch.equal(c.masked[:3] | c.masked[3:], c.maskable[:3])


def test_media_embeddings_start_from_codes_on_a_fresh_run_only(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real = embed_codes

    def counting(model, modality, codes, generator=None):
        calls.append(modality)
        assert codes.shape[0] == model.vocab.content_size(modality)  # one code per token of the block
        return real(model, modality, codes, generator)

    monkeypatch.setattr(train, "embed_codes", counting)
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
    torch.save({"format": checkpoint.CKPT_FORMAT, "weights": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    return {
        "strict_bad_file": ([f"--text_files={bad}", "--strict=true"], "not UTF-8 text"),
        "truncated_resume": ([f"--resume={truncated}"], "truncated or corrupt"),
        "horizon_shorter_than_warmup": (["--tokens=3e5"], "must be shorter than the horizon"),
        "unknown_option": (["--learning_rate=1"], "unrecognized arguments: --learning_rate=1"),
        "bad_value": (["--batch_size=64.9"], "--batch_size/--batch-size: invalid int value: '64.9'"),
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
    stopped = checkpoint.read_checkpoint(cut / "ckpt.pt")["step"]
    assert stopped >= 3 and max(losses(cut)) == stopped, "the checkpoint is of the last finished step"
    subprocess.run([*script, f"--resume={cut / 'ckpt.pt'}", "--max_steps=4"], env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(
        [*script, *args, f"--out_dir={whole}", f"--max_steps={stopped + 4}"], env=env, check=True, capture_output=True
    )
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, stopped + 5))
    assert all(a[k] == b[k] for k in a), "bit-identical losses after the resume"


def test_a_codec_is_loaded_only_as_tensors_and_only_the_one_recorded(tmp_path: Path) -> None:
    import fsq
    from lab.torchscript import export_torchscript

    ts = tmp_path / "codec.ts"
    export_torchscript(fsq.load_audio_codec(), ts)
    with pytest.raises(SystemExit, match="is a TorchScript program"):  # a program is never loaded, named or not
        train.main([*SMALL, f"--out_dir={tmp_path / 'ts'}", f"--audio_codec={ts}"])
    out = tmp_path / "run"
    train.main([*SMALL, f"--tokens={5 * STEP_TOKENS}", f"--out_dir={out}", "--eval_every=0"])
    ckpt = checkpoint.read_checkpoint(out / "ckpt.pt")
    assert ckpt["audio_codec_sha256"] == fsq.file_sha256(fsq.DEFAULT_AUDIO_CODEC)
    swapped = tmp_path / "swapped.pt"
    torch.save({**ckpt, "audio_codec_sha256": "0" * 64}, swapped)
    with pytest.raises(ValueError, match="not the file this run was trained with"):
        checkpoint.load_for_inference(swapped)
    other = tmp_path / "other.pt"  # a moved copy of the codec is fine; another codec is not
    other.write_bytes(fsq.DEFAULT_AUDIO_CODEC.read_bytes())
    assert checkpoint.load_for_inference(out / "ckpt.pt", audio_codec=str(other)).step == 5
    fsq.AudioCodec(fsq.AudioCodecConfig(channels=8, res_blocks=1)).save(other)
    with pytest.raises(ValueError, match="not the file this run was trained with"):
        checkpoint.load_for_inference(out / "ckpt.pt", audio_codec=str(other))
    with pytest.raises(SystemExit, match="not the one this checkpoint was trained with"):
        train.main([f"--resume={out / 'ckpt.pt'}", f"--audio_codec={other}"])


def test_the_export_loads_with_model_and_data_alone_and_gives_the_checkpoints_logits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.main([*SMALL, f"--tokens={5 * STEP_TOKENS}", f"--out_dir={out}", "--eval_every=0"])
    code = f"""
import json, sys, torch
from safetensors.torch import load_file
from data import Layout, TextTokenizer
from model import Denoiser, ModelConfig

folder = {str(out / "export")!r}
config = json.load(open(folder + "/config.json"))
layout = Layout.from_dict(config["layout"])
model = Denoiser(ModelConfig(**config["model"]), layout.vocab)
model.load_state_dict(load_file(folder + "/model.safetensors"))
tokenizer = TextTokenizer.load(folder + "/text_bpe.tiktoken")
x = torch.load({str(tmp_path / "x.pt")!r})
torch.save(model(x), {str(tmp_path / "logits.pt")!r})
assert not {{"train", "checkpoint", "sample", "evaluate"}} & set(sys.modules), "the export needs none of them"
"""
    inf = checkpoint.load_for_inference(out / "ckpt.pt")  # EMA weights, as in the export
    test = data.build_data(dataclasses.replace(inf.data_config, audio_speeds=()))
    x = data.BatchIterator(test, "test", 8, train.TrainConfig().ratios).batch(0).ids
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), inf.model(x)), "exactly the checkpoint's logits"
    again = checkpoint.load_for_inference(out / "export")  # the export is also a checkpoint for sample.py
    assert again.step == inf.step and again.data_config.audio_speeds == inf.data_config.audio_speeds


class Payload:
    """An object whose unpickling would run code: a checkpoint must never unpickle it."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PAYLOAD_MARK"]),))


def test_a_checkpoint_with_a_pickled_program_is_refused_unrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.CKPT_FORMAT, "step": Payload()}, evil)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.read_checkpoint(evil)
    assert not mark.exists(), "the payload did not run"


@pytest.mark.parametrize(
    "option,message",
    [
        ("--cond_media=1.5", r"cond_keep, cond_drop, cond_media \(0.7, 0.1, 1.5\) must be probabilities"),
        ("--cond_keep=0.95", r"cond_keep, cond_drop, cond_media \(0.95, 0.1, 0.5\) .* keep \+ drop <= 1"),
        ("--audio_speeds=0.9,3", r"speed factors must lie in \[0.5, 2.0\]"),
        ("--estimator=counts", r"--estimator must be time or count, got 'counts'"),
    ],
)
def test_impossible_recipes_are_one_line_errors(tmp_path: Path, option: str, message: str) -> None:
    with pytest.raises(SystemExit, match=f"train.py: error: .*{message}"):
        train.main([*SMALL, f"--out_dir={tmp_path}", option])


def test_the_mask_count_estimator_trains_and_keeps_given_and_hidden_segments_out_of_the_draw(tmp_path: Path) -> None:
    train.main([*SMALL, "--estimator=count", f"--tokens={6 * STEP_TOKENS}", f"--out_dir={tmp_path}", "--eval_every=0"])
    assert sorted(losses(tmp_path)) == list(range(1, 7)) and all(0 < v < 20 for v in losses(tmp_path).values())
    v = mdm.Vocab(text=20, audio=8, image=8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (8, 10), generator=g)
    segment = torch.zeros(8, 10, dtype=torch.bool)
    segment[:, 1:4] = True
    none = torch.zeros_like(segment)
    given, hidden = (
        torch.where(torch.arange(8)[:, None] < 4, segment, none),
        torch.where(torch.arange(8)[:, None] >= 4, segment, none),
    )
    batch = data.Batch(ids, none, torch.zeros(8, dtype=torch.long), given, hidden)
    c = train.corrupt_batch(batch, v, train.TrainConfig(estimator="count"), step=0)
    outside = torch.cat([segment, segment])
    assert not (c.masked & outside).any() and (c.maskable == ~outside).all()
    assert (c.masked.sum(-1)[:8] + c.masked.sum(-1)[8:] == 7 + 1).all()  # the anti-masked copy: N + 1 - k
    assert (c.x_t[:4, 1:4] == ids[:4, 1:4]).all() and v.is_mask(c.x_t[4:8, 1:4]).all()  # given clean, hidden masked


@pytest.mark.parametrize(("fp32_s", "bf16_s", "expected"), [(2.0, 1.0, "bf16"), (1.0, 0.95, "fp32")])
def test_auto_dtype_takes_the_faster_one_and_the_run_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp32_s: float, bf16_s: float, expected: str
) -> None:
    """--dtype=auto on a CPU resolves by the timed probe (bf16 only when >= 1.1x faster); the checkpoint and
    config.json record the result, and a resumed run keeps it without probing again."""
    calls = []
    monkeypatch.setattr(train, "time_dtypes", lambda model, c: calls.append(1) or {"fp32": fp32_s, "bf16": bf16_s})
    args = [a for a in SMALL if not a.startswith("--dtype")]
    out = tmp_path / "run"
    train.main([*args, "--dtype=auto", f"--tokens={6 * STEP_TOKENS}", f"--out_dir={out}", "--max_steps=3"])
    assert json.loads((out / "config.json").read_text())["dtype"] == expected
    assert checkpoint.read_checkpoint(str(out / "ckpt.pt"))["config"]["dtype"] == expected and calls == [1]
    train.main([f"--resume={out / 'ckpt.pt'}"])
    assert calls == [1] and json.loads((out / "config.json").read_text())["dtype"] == expected


def test_dtype_probe_leaves_the_model_and_the_random_streams_alone() -> None:
    vocab = mdm.Vocab(text=16, audio=8, image=8)
    model = Denoiser(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_len=12), vocab)
    x0 = vocab.to_global(torch.randint(16, (4, 12)), "text")
    c = mdm.corrupt(x0, torch.zeros_like(x0, dtype=torch.bool), vocab, mdm.Schedule(), generator=torch.Generator())
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    seconds = train.time_dtypes(model, c, repeats=1)
    assert set(seconds) == {"fp32", "bf16"} and all(s > 0 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
