"""bench.py runs end to end on tiny shapes and returns well-formed, sane results.

No timing thresholds here: the speed targets live in bench.py (its "Targets" table), not in tests
that a busy machine would make flaky. One ``bench.main(["--quick", ...])`` run feeds every check.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import mdm
import sample
from lab import bench
from model import PRESETS, Denoiser, ModelConfig


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole quick benchmark, once (one thread: the tests may share the cores with other work)."""
    threads = torch.get_num_threads()
    path = tmp_path_factory.mktemp("bench") / "results.json"
    try:
        results = bench.main(["--quick", "--threads", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(path.read_text())["targets"] == results["targets"]
    return results


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_machine_header_and_matmul_limit(quick: dict) -> None:
    m = quick["machine"]
    assert m["threads"] == 1 and m["cores"] >= 1 and m["torch"] == torch.__version__
    assert set(quick["matmul"]["limit_gflops"]) == {"fp32", "bf16"}
    assert all(positive(r["gflops"]) and r["best_gflops"] >= r["gflops"] for r in quick["matmul"]["rows"])


def test_training_step_figures_are_sane(quick: dict) -> None:
    tr = quick["train"]
    modes = {(r["shape"], r["mode"]) for r in tr["rows"]}
    assert {("tiny", "eager fp32"), ("tiny", "AR eager fp32"), ("small", "eager bf16")} <= modes
    for r in tr["rows"]:
        assert positive(r["tokens_per_s"]) and positive(r["gflops"]) and positive(r["step_s"])
        assert 0 < r["mfu"] <= 1.5, r
        assert 0 <= r["data_s"] < r["step_s"]
    for s in tr["split"]:
        parts = [s[f"{p}_s"] for p in ("data", "forward", "backward", "optimizer")]
        assert all(positive(p) for p in parts)
        assert 0 < s["data_share_of_step"] < 1
    for r in tr["ar"]:
        assert positive(r["ratio_step"]) and positive(r["ratio_paired"]) and positive(r["ratio_compute"])
        # MDM predicts the masked positions only, the AR twin every data position
        assert 0 < r["mdm_masked_per_row"] < r["ar_predicted_per_row"]


def test_logits_and_anti_masking_sections(quick: dict) -> None:
    for r in quick["logits"]["rows"]:
        assert positive(r["masked_step_s"]) and positive(r["naive_step_s"])
        assert 0 < r["flop_saving"] < 1  # logits at masked positions only always do less work
    assert quick["logits"]["rows"][1]["vocab"] > 50_000
    a = quick["antimask"]
    assert positive(a["ratio"]) and positive(a["ratio_paired"])
    assert {r["mode"] for r in a["rows"]} == {"anti-masking", "independent masks"}


def test_profile_names_the_top_operators(quick: dict) -> None:
    for p in quick["profile"].values():
        assert p["top"] and all(t["op"] and t["calls"] > 0 for t in p["top"])
        assert math.isclose(sum(p["share"].values()), 1.0)


def test_cached_sampling_is_identical_with_no_more_evaluations(quick: dict) -> None:
    rows = quick["sampling"]["rows"]
    assert {r["task"] for r in rows} == {"text", "t2i", "i2t", "t2s", "s2t"}
    assert {r["sampler"] for r in rows} == set(sample.SAMPLERS)
    for r in rows:
        assert r["identical"], r
        passes = 2 if r["guidance"] else 1  # classifier-free guidance: conditional and unconditional pass
        assert 1 <= r["nfe_cached"] <= r["nfe_uncached"] <= passes * r["steps"]
        assert positive(r["s_per_sample_cached"]) and positive(r["s_per_sample_uncached"])
    assert "randomly initialised" in quick["sampling"]["model"]


def test_memory_measured_and_arithmetic(quick: dict) -> None:
    measured = quick["memory"]["measured"]
    assert measured and all(0 < r["baseline_mb"] <= r["peak_mb"] for r in measured)
    presets = {r["preset"] for r in quick["memory"]["arithmetic"]}
    assert {f"{p} (preset)" for p in PRESETS} <= presets
    for r in quick["memory"]["arithmetic"]:
        assert r["fsdp_per_gpu_GB"] < r["single_GB"] < r["ddp_per_gpu_GB"]
    for c in quick["memory"]["checks"]:  # the fitted activation formula reproduces a direct measurement
        assert math.isclose(c["fitted_bytes_per_token_layer"], c["direct_bytes_per_token_layer"], rel_tol=0.02)


def test_targets_and_markdown(quick: dict, capsys: pytest.CaptureFixture) -> None:
    statuses = {t["status"] for t in quick["targets"]}
    assert statuses <= {"pass", "miss", "n/a"} and quick["targets"]
    text = bench.report(quick, bench.parse_args(["--quick"]))
    for heading in ("Matmul limit", "Training step", "Sampling", "Memory arithmetic", "Targets"):
        assert heading in text


def test_naive_loss_head_equals_logits_at_masked_positions() -> None:
    """The "naive" variant bench.py compares with computes the same NLL, only with more work."""
    vocab = mdm.Vocab(text=20, audio=12, image=9)
    model = Denoiser(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_len=16), vocab)
    torch.nn.init.normal_(model.unembed.weight, std=0.5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.cat(
        [torch.full((3, 1), vocab.task("text")), vocab.to_global(torch.randint(20, (3, 15), generator=g), "text")],
        dim=1,
    )
    c = mdm.corrupt(x0, torch.zeros_like(x0, dtype=torch.bool), vocab, mdm.Schedule(), generator=g)
    torch.testing.assert_close(bench.NaiveNLL(model)(c.x_t, c.x0, c.masked), model.nll_at(c.x_t, c.x0, c.masked))


def test_parameter_count_and_flops_formula() -> None:
    vocab = mdm.Vocab(text=1024, audio=875, image=17)
    for name in ("tiny", "small"):
        cfg = PRESETS[name]
        assert bench.param_count(cfg, vocab) == Denoiser(cfg, vocab).num_parameters()
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2)
    h = cfg.mlp_hidden
    expected = 6 * 2 * (4 * 64 * 64 + 3 * 64 * h) * 100 + 12 * 2 * 64 * 50 * 100 + 6 * 64 * 1000
    assert bench.step_flops(cfg, tokens=100, seq_len=50, unembed_columns=1000) == expected


def test_unknown_section_is_an_error() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nope"])


def test_benchmarks_file_has_the_markdown_block() -> None:
    text = (Path(bench.__file__).parent / "BENCHMARKS.md").read_text()
    assert "### Targets" in text and "python -m lab.bench" in text
